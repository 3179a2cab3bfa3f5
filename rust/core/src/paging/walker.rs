//! The guest page-table walker (paging_tmpl.h FNAME(walk_addr_generic)),
//! generic over the gpte format.

use super::permission::permission_fault;
use super::pte::{Pt32, Pt64, PteFormat, PT64_NX, PT64_PKEY_SHIFT, PT_ACCESSED, PT_DIRTY};
use super::pte::{PT_PAGE_SIZE, PT_PRESENT};
use super::rsvd::RsvdMasks;
use super::{
    Access, Gptes, GuestMem, PagingMode, Walk, WalkCtx, WalkError, ACC_ALL, PFERR_FETCH,
    PFERR_PRESENT, PFERR_RSVD,
};

/// How many times a walk restarts when its A/D compare-exchange loses a race.
const MAX_RETRIES: usize = 64;

/// The guest MMU context: the walk state derived once from the CPU state, as KVM
/// derives its cpu_role and reserved-bit masks when the paging context is reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestMmu {
    pub ctx: WalkCtx,
    pub mode: PagingMode,
    pub rsvd: RsvdMasks,
}

impl GuestMmu {
    pub fn new(ctx: &WalkCtx) -> GuestMmu {
        let mode = ctx.mode();
        GuestMmu {
            ctx: *ctx,
            mode,
            rsvd: RsvdMasks::new(ctx, mode),
        }
    }

    /// A guest access: the canonical check of long mode, then the walk.
    #[inline]
    pub fn walk<M: GuestMem + ?Sized>(
        &self,
        mem: &M,
        gva: u64,
        access: Access,
    ) -> Result<Walk, WalkError> {
        if self.mode.is_long() && !super::is_canonical(gva, self.mode == PagingMode::Long5) {
            return Err(WalkError::GeneralProtection { error_code: 0 });
        }
        self.walk_no_canonical_check(mem, gva, access)
    }

    /// The walk alone (KVM's gva_to_gpa, as KVM_TRANSLATE uses it).
    #[inline]
    pub fn walk_no_canonical_check<M: GuestMem + ?Sized>(
        &self,
        mem: &M,
        gva: u64,
        access: Access,
    ) -> Result<Walk, WalkError> {
        match self.mode {
            PagingMode::None => Ok(Walk {
                gpa: gva,
                level: 0,
                page_size: 4096,
                access: ACC_ALL,
                pkey: 0,
                dirty: false,
                gptes: Gptes::EMPTY,
            }),
            PagingMode::Bits32 => walk_generic::<Pt32, M>(self, mem, gva & 0xffff_ffff, access),
            PagingMode::Pae => walk_generic::<Pt64, M>(self, mem, gva & 0xffff_ffff, access),
            PagingMode::Long4 | PagingMode::Long5 => {
                walk_generic::<Pt64, M>(self, mem, gva, access)
            }
        }
    }
}

#[inline]
fn read_gpte<P: PteFormat, M: GuestMem + ?Sized>(mem: &M, gpa: u64) -> Option<u64> {
    mem.read_gpte(gpa, P::SIZE)
}

/// Is `pte` at `level` the last level of the walk (FNAME(is_last_gpte))?
#[inline]
fn is_last<P: PteFormat>(ctx: &WalkCtx, level: u8, pte: u64) -> bool {
    if level == 1 {
        return true;
    }
    if pte & PT_PAGE_SIZE == 0 {
        return false;
    }
    // In 32-bit paging, PDE.PS only means "4 MiB page" with CR4.PSE; higher levels
    // of the 8-byte formats have already failed the reserved-bit check if PS is illegal.
    P::WIDE || (level == 2 && ctx.pse())
}

fn fault(errcode: u32, ctx: &WalkCtx, access: Access, gva: u64) -> WalkError {
    let mut e = errcode | access.pfec() & !PFERR_FETCH;
    if access.fetch && (ctx.nx() || ctx.smep()) {
        e |= PFERR_FETCH;
    }
    WalkError::PageFault {
        error_code: e,
        address: gva,
    }
}

fn walk_generic<P: PteFormat, M: GuestMem + ?Sized>(
    mmu: &GuestMmu,
    mem: &M,
    gva: u64,
    access: Access,
) -> Result<Walk, WalkError> {
    let (ctx, mode, rsvd) = (&mmu.ctx, mmu.mode, &mmu.rsvd);
    // Inverting NX lets it be ANDed like the other permission bits.
    let nx_mask = if P::WIDE { PT64_NX } else { 0 };
    'retry: for _ in 0..MAX_RETRIES {
        // The entries read, top-down; also what the A/D update works from.
        let mut gptes = Gptes::EMPTY;
        let mut level = mode.root_level();
        let mut table = if P::WIDE {
            ctx.cr3 & super::pte::PT64_BASE_ADDR_MASK
        } else {
            ctx.cr3 & super::pte::PT32_BASE_ADDR_MASK
        };
        if mode == PagingMode::Pae {
            let i = (gva >> 30) & 3;
            let pdpte = ctx.pdptrs[i as usize];
            // Reported at the PDPT slot it was loaded from (CR3[31:5]).
            gptes.push(3, (ctx.cr3 & 0xffff_ffe0) + 8 * i, pdpte);
            if pdpte & PT_PRESENT == 0 {
                return Err(fault(0, ctx, access, gva));
            }
            // PDPTEs were checked when loaded; they carry no rights and get no A bit.
            table = pdpte & super::pte::PT64_BASE_ADDR_MASK;
            level = 2;
        }
        let mut pte_access = !0u64;
        let mut pte;
        loop {
            let gpa = table + P::index(gva, level) * P::SIZE as u64;
            pte = match read_gpte::<P, M>(mem, gpa) {
                Some(v) => v,
                // No memslot behind the table: a not-present fault.
                None => return Err(fault(0, ctx, access, gva)),
            };
            gptes.push(level, gpa, pte);
            pte_access &= pte ^ nx_mask;
            if pte & PT_PRESENT == 0 {
                return Err(fault(0, ctx, access, gva));
            }
            if rsvd.is_set(pte, level) {
                return Err(fault(PFERR_RSVD | PFERR_PRESENT, ctx, access, gva));
            }
            if is_last::<P>(ctx, level, pte) {
                break;
            }
            table = P::table_gpa(pte);
            level -= 1;
        }

        let acc = gpte_access(pte_access ^ nx_mask, P::WIDE);
        let pkey = if P::WIDE && ctx.pke() {
            ((pte >> PT64_PKEY_SHIFT) & 0xf) as u8
        } else {
            0
        };
        let errcode = permission_fault(ctx, acc, pkey, access);
        if errcode != 0 {
            return Err(fault(errcode, ctx, access, gva));
        }
        let gpa = P::leaf_gpa(pte, level, gva);

        // A/D: only if some level lacks A, or a write finds the leaf clean.
        let mut accessed_dirty = pte_access & PT_ACCESSED != 0;
        if access.write {
            accessed_dirty &= pte & PT_DIRTY != 0;
        }
        let mut dirty = pte & PT_DIRTY != 0;
        if !accessed_dirty {
            // Top-down over the in-memory entries (a PAE PDPTE is a register: skipped).
            let skip = usize::from(mode == PagingMode::Pae);
            for &(l, egpa, orig) in &gptes[skip..] {
                let mut new = orig | PT_ACCESSED;
                if l == level && access.write {
                    new |= PT_DIRTY;
                }
                if new == orig {
                    continue;
                }
                match mem.cmpxchg(egpa, P::SIZE, orig, new) {
                    Ok(true) => {
                        mem.mark_dirty(egpa >> 12);
                        if l == level {
                            dirty = new & PT_DIRTY != 0;
                        }
                    }
                    // The entry changed under us: walk again.
                    Ok(false) => continue 'retry,
                    // A read-only slot: leave the bits alone.
                    Err(()) => {}
                }
            }
        }
        return Ok(Walk {
            gpa,
            level,
            page_size: P::page_size(level),
            access: acc,
            pkey,
            dirty,
            gptes,
        });
    }
    // Livelocked against concurrent writers: report a not-present fault, which the
    // guest retries (KVM would keep retrying).
    Err(fault(0, ctx, access, gva))
}

/// ACC_* rights from the ANDed entry bits (FNAME(gpte_access)), NX already un-inverted.
#[inline]
pub(crate) fn gpte_access(gpte: u64, wide: bool) -> u8 {
    let mut acc = 0u8;
    if gpte & super::pte::PT_WRITABLE != 0 {
        acc |= super::ACC_WRITE;
    }
    if gpte & super::pte::PT_USER != 0 {
        acc |= super::ACC_USER;
    }
    if !wide || gpte & PT64_NX == 0 {
        acc |= super::ACC_EXEC;
    }
    acc
}
