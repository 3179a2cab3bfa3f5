//! Shadow page-table entries in KVM's non-EPT format (spte.h, spte.c with the masks of
//! kvm_mmu_reset_all_pte_masks), as built for shadow paging on a 64-bit host:
//!
//! | bits  | meaning |
//! |-------|---------|
//! | 0 1 2 | P, W, U (hardware) |
//! | 5 6 7 | A, D, PS (hardware) |
//! | 9     | Host-writable (software): the host lets the guest write this page |
//! | 10    | MMU-writable (software): the shadow MMU does not write-protect it |
//! | 11    | SPTE_MMU_PRESENT: KVM's "shadow-present", never set on MMIO SPTEs |
//! | 12-51 | PFN; in a non-leaf SPTE, the child shadow page's arena index |
//! | 52-53 | TDP A/D type, always 0 (A/D enabled) in this format |
//! | 63    | NX |
//!
//! Host assumptions, as on the reference machine (AMD EPYC, kvm 6.18): MAXPHYADDR 48,
//! no L1TF mitigation (so MMIO GPAs are stored unsplit), no SME C-bit, no PAT
//! memtype bits (those are TDP-only).

use std::fmt;

use crate::paging::pte::{
    PT64_NX, PT_ACCESSED, PT_DIRTY, PT_PAGE_SIZE, PT_PRESENT, PT_USER, PT_WRITABLE,
};
use crate::paging::rsvd::rsvd_bits;
use crate::paging::{ACC_EXEC, ACC_USER, ACC_WRITE};

/// Bit 9 (DEFAULT_SPTE_HOST_WRITABLE): cleared for read-only memslots and VMAs.
pub const SPTE_HOST_WRITABLE: u64 = 1 << 9;
/// Bit 10 (DEFAULT_SPTE_MMU_WRITABLE): cleared while the gfn holds a shadowed guest
/// page table; with it set and W clear, the SPTE is only write-protected for dirty
/// logging and may be made writable again without mmu_lock (fast page fault).
pub const SPTE_MMU_WRITABLE: u64 = 1 << 10;
/// Bit 11: set on every SPTE backed by memory, leaf or not.
pub const SPTE_MMU_PRESENT: u64 = 1 << 11;
/// Bits 51:12 (SPTE_BASE_ADDR_MASK).
pub const SPTE_BASE_ADDR_MASK: u64 = rsvd_bits(12, 51);
/// Bits 53:52: how a TDP SPTE tracks A/D (enabled = 0, which PAE requires here,
/// because bits 62:52 are reserved in PAE entries).
pub const SPTE_TDP_AD_MASK: u64 = 3 << 52;
pub const SPTE_TDP_AD_DISABLED: u64 = 1 << 52;
pub const SPTE_TDP_AD_WRPROT_ONLY: u64 = 2 << 52;
/// The value of an empty SPTE on 64-bit hosts (since v6.10): bit 63, which suppresses
/// #VE for TDX and is ignored in non-present non-EPT entries. Shadow pages are
/// allocated filled with it and zapped SPTEs return to it.
pub const SHADOW_NONPRESENT_VALUE: u64 = 1 << 63;
pub const SPTE_ENT_PER_PAGE: usize = 512;

/// The host's MAXPHYADDR (boot_cpu_data.x86_phys_bits): MMIO SPTEs keep only the GPA
/// bits below it (shadow_nonpresent_or_rsvd_lower_gfn_mask).
pub const HOST_PHYS_BITS: u32 = 48;

/// MMIO generation: `gen[7:0]` in SPTE bits 10:3, `gen[18:8]` in bits 62:52.
pub const MMIO_SPTE_GEN_LOW_START: u32 = 3;
pub const MMIO_SPTE_GEN_LOW_END: u32 = 10;
pub const MMIO_SPTE_GEN_HIGH_START: u32 = 52;
pub const MMIO_SPTE_GEN_HIGH_END: u32 = 62;
const MMIO_SPTE_GEN_LOW_BITS: u32 = MMIO_SPTE_GEN_LOW_END - MMIO_SPTE_GEN_LOW_START + 1;
const MMIO_SPTE_GEN_LOW_MASK: u64 = rsvd_bits(MMIO_SPTE_GEN_LOW_START, MMIO_SPTE_GEN_LOW_END);
const MMIO_SPTE_GEN_HIGH_MASK: u64 = rsvd_bits(MMIO_SPTE_GEN_HIGH_START, MMIO_SPTE_GEN_HIGH_END);
/// The 19 generation bits an MMIO SPTE can hold.
pub const MMIO_SPTE_GEN_MASK: u64 = (1 << 19) - 1;
/// Bit 63 of a memslots generation: an update is in flight, so no MMIO SPTE is current.
pub const KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS: u64 = 1 << 63;

/// shadow_mmio_value/mask for non-EPT: P plus reserved PA bit 51, so any access faults
/// with PFEC.RSVD and KVM can recognise an MMIO GPA without a memslot lookup. KVM turns
/// this off (value 0) for a host MAXPHYADDR of 52 or with `kvm.mmio_caching=N`, which
/// is how the reference machine runs: then no MMIO SPTE is ever created, and the caller
/// must not call [`make_mmio_spte`].
pub const SHADOW_MMIO_VALUE: u64 = (1 << 51) | PT_PRESENT;
pub const SHADOW_MMIO_MASK: u64 = SHADOW_MMIO_VALUE;
/// The gpte rights an MMIO SPTE caches (W and U; the ACC bits equal PTE bits 1 and 2).
pub const SHADOW_MMIO_ACCESS_MASK: u8 = ACC_WRITE | ACC_USER;
const MMIO_GFN_MASK: u64 = rsvd_bits(12, HOST_PHYS_BITS - 1);

/// Index of `addr`'s SPTE in a shadow page at `level` (SPTE_INDEX).
#[inline]
pub fn spte_index(addr: u64, level: u8) -> usize {
    ((addr >> (12 + 9 * (u32::from(level) - 1))) & 0x1ff) as usize
}

/// One shadow page-table entry.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Spte(pub u64);

impl Spte {
    pub const NONPRESENT: Spte = Spte(SHADOW_NONPRESENT_VALUE);
    /// An unused PAE root slot (INVALID_PAE_ROOT).
    pub const INVALID_PAE_ROOT: Spte = Spte(0);

    /// A link to the shadow page at arena index `child_index` (make_nonleaf_spte):
    /// full access, because permissions live in the leaves.
    #[inline]
    pub const fn nonleaf(child_index: u32) -> Spte {
        Spte(
            SPTE_MMU_PRESENT
                | ((child_index as u64) << 12)
                | PT_PRESENT
                | PT_WRITABLE
                | PT_USER
                | PT_ACCESSED,
        )
    }

    /// An entry of the per-vCPU PAE root page pointing at root PD `child_index`
    /// (mmu_alloc_shadow_roots/mmu_alloc_direct_roots): P only, since W/U/A are
    /// reserved in PDPTEs, and no SPTE_MMU_PRESENT since it lives outside any SP.
    #[inline]
    pub const fn pae_root(child_index: u32) -> Spte {
        Spte(((child_index as u64) << 12) | PT_PRESENT)
    }

    #[inline]
    pub const fn is_valid_pae_root(self) -> bool {
        self.0 != 0
    }

    /// is_shadow_present_pte: bit 11, so MMIO and empty SPTEs are not present.
    #[inline]
    pub const fn is_shadow_present(self) -> bool {
        self.0 & SPTE_MMU_PRESENT != 0
    }

    /// is_last_spte: everything at level 1, and PS entries above it.
    #[inline]
    pub const fn is_leaf(self, level: u8) -> bool {
        level == 1 || self.is_large()
    }

    #[inline]
    pub const fn is_large(self) -> bool {
        self.0 & PT_PAGE_SIZE != 0
    }

    #[inline]
    pub const fn is_writable(self) -> bool {
        self.0 & PT_WRITABLE != 0
    }

    #[inline]
    pub const fn is_mmu_writable(self) -> bool {
        self.0 & SPTE_MMU_WRITABLE != 0
    }

    #[inline]
    pub const fn is_host_writable(self) -> bool {
        self.0 & SPTE_HOST_WRITABLE != 0
    }

    #[inline]
    pub const fn is_user(self) -> bool {
        self.0 & PT_USER != 0
    }

    #[inline]
    pub const fn is_executable(self) -> bool {
        self.0 & PT64_NX == 0
    }

    #[inline]
    pub const fn is_accessed(self) -> bool {
        self.0 & PT_ACCESSED != 0
    }

    #[inline]
    pub const fn is_dirty(self) -> bool {
        self.0 & PT_DIRTY != 0
    }

    /// spte_ad_enabled (meaningful for shadow-present SPTEs only).
    #[inline]
    pub const fn ad_enabled(self) -> bool {
        self.0 & SPTE_TDP_AD_MASK != SPTE_TDP_AD_DISABLED
    }

    /// The frame a leaf maps (spte_to_pfn).
    #[inline]
    pub const fn pfn(self) -> u64 {
        (self.0 & SPTE_BASE_ADDR_MASK) >> 12
    }

    /// The arena index of the shadow page a non-leaf SPTE links to.
    #[inline]
    pub const fn child_index(self) -> u32 {
        self.pfn() as u32
    }

    /// The ACC_* rights a present SPTE grants.
    #[inline]
    pub const fn access(self) -> u8 {
        let mut acc = 0;
        if self.is_executable() {
            acc |= ACC_EXEC;
        }
        if self.is_writable() {
            acc |= ACC_WRITE;
        }
        if self.is_user() {
            acc |= ACC_USER;
        }
        acc
    }

    /// mark_spte_for_access_track with A/D bits (always, for this format): clear A, so
    /// the next access through the SPTE shows up as the hardware setting it again.
    #[inline]
    #[must_use]
    pub const fn mark_for_access_track(self) -> Spte {
        Spte(self.0 & !PT_ACCESSED)
    }

    /// is_mmio_spte, with MMIO caching enabled.
    #[inline]
    pub const fn is_mmio(self) -> bool {
        self.0 & SHADOW_MMIO_MASK == SHADOW_MMIO_VALUE
    }

    /// get_mmio_spte_gfn.
    #[inline]
    pub const fn mmio_gfn(self) -> u64 {
        (self.0 & MMIO_GFN_MASK) >> 12
    }

    /// get_mmio_spte_access: the cached ACC_WRITE/ACC_USER rights.
    #[inline]
    pub const fn mmio_access(self) -> u8 {
        (self.0 as u8) & SHADOW_MMIO_ACCESS_MASK
    }

    /// get_mmio_spte_generation: the 19-bit memslot generation snapshot.
    #[inline]
    pub const fn mmio_generation(self) -> u64 {
        ((self.0 & MMIO_SPTE_GEN_LOW_MASK) >> MMIO_SPTE_GEN_LOW_START)
            | ((self.0 & MMIO_SPTE_GEN_HIGH_MASK)
                >> (MMIO_SPTE_GEN_HIGH_START - MMIO_SPTE_GEN_LOW_BITS))
    }
}

impl fmt::Debug for Spte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        if self.is_mmio() {
            return write!(
                f,
                "Spte({v:#x} mmio gfn={:#x} access={:#o} gen={:#x})",
                self.mmio_gfn(),
                self.mmio_access(),
                self.mmio_generation()
            );
        }
        if !self.is_shadow_present() {
            return if v == SHADOW_NONPRESENT_VALUE || v == 0 {
                write!(f, "Spte(nonpresent)")
            } else {
                write!(f, "Spte({v:#x} nonpresent)")
            };
        }
        write!(f, "Spte({v:#x}")?;
        let flags = [
            (PT_PRESENT, "P"),
            (PT_WRITABLE, "W"),
            (PT_USER, "U"),
            (PT_ACCESSED, "A"),
            (PT_DIRTY, "D"),
            (PT_PAGE_SIZE, "PS"),
            (SPTE_HOST_WRITABLE, "HW"),
            (SPTE_MMU_WRITABLE, "MW"),
            (PT64_NX, "NX"),
        ];
        for (bit, name) in flags {
            if v & bit != 0 {
                write!(f, " {name}")?;
            }
        }
        write!(f, " pfn={:#x})", self.pfn())
    }
}

/// The inputs of make_spte besides the gfn, which only the caller's unsync and
/// dirty-log steps need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MakeSpte {
    /// sp->role.level of the page holding the SPTE; above 1 the leaf is huge (PS).
    pub level: u8,
    /// ACC_* rights the guest tables grant (pte_access).
    pub access: u8,
    pub pfn: u64,
    /// The SPTE being replaced (NONPRESENT if none, or if the caller dropped it).
    pub old_spte: Spte,
    /// Installed speculatively (prefetch), not for the faulting access.
    pub prefetch: bool,
    /// Rebuilt while syncing an unsync page (sync_spte): KVM must not unsync pages
    /// until the guest's TLB flush is emulated, and the A bit is kept.
    pub synchronizing: bool,
    /// The host mapping is writable (not a read-only memslot or VMA).
    pub host_writable: bool,
    /// kvm_slot_dirty_track_enabled(slot).
    pub dirty_log: bool,
    /// is_nx_huge_page_enabled (the iTLB multihit mitigation; `nx_huge_pages=N` on
    /// the reference machine): huge leaves are never executable.
    pub nx_huge_pages: bool,
}

/// What make_spte reports besides the SPTE.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MakeSpteResult {
    /// A write was requested but refused because the gfn is write-tracked or its
    /// shadow pages could not go unsync (make_spte's return value).
    pub wrprot: bool,
    /// The SPTE is writable in a dirty-logged slot: the caller marks the gfn dirty now
    /// (mark_page_dirty_in_slot).
    pub mark_dirty: bool,
}

/// make_spte for shadow paging (spte.c, v6.13+). `mmu_try_to_unsync_pages` is the
/// caller's mmu_try_to_unsync_pages(gfn, synchronizing, prefetch): it is called only
/// when KVM calls it (a write is allowed and the old SPTE was not a writable leaf),
/// may unsync shadow pages, and returns true to refuse the write.
pub fn make_spte(
    input: &MakeSpte,
    mmu_try_to_unsync_pages: impl FnOnce() -> bool,
) -> (Spte, MakeSpteResult) {
    let level = input.level;
    let mut access = input.access;
    let mut spte = SPTE_MMU_PRESENT | PT_PRESENT;
    let mut result = MakeSpteResult::default();

    // A prefetched SPTE starts unaccessed, so aging can tell if the guest used it.
    if !input.prefetch || input.synchronizing {
        spte |= PT_ACCESSED;
    }
    if level > 1 && access & ACC_EXEC != 0 && input.nx_huge_pages {
        access &= !ACC_EXEC;
    }
    if access & ACC_EXEC == 0 {
        spte |= PT64_NX;
    }
    if access & ACC_USER != 0 {
        spte |= PT_USER;
    }
    if level > 1 {
        spte |= PT_PAGE_SIZE;
    }
    if input.host_writable {
        spte |= SPTE_HOST_WRITABLE;
    } else {
        access &= !ACC_WRITE;
    }
    debug_assert_eq!(input.pfn << 12 & !SPTE_BASE_ADDR_MASK, 0);
    spte |= input.pfn << 12;

    if access & ACC_WRITE != 0 {
        // Replacing a writable leaf: any shadow pages of the gfn are already unsync.
        // KVM tests the old value without checking it is shadow-present.
        let old = input.old_spte;
        if (!old.is_leaf(level) || !old.is_writable()) && mmu_try_to_unsync_pages() {
            result.wrprot = true;
        } else {
            // Writable SPTEs are created dirty: the write is about to happen anyway.
            spte |= PT_WRITABLE | SPTE_MMU_WRITABLE | PT_DIRTY;
        }
    }

    let mut spte = Spte(spte);
    if input.prefetch && !input.synchronizing {
        spte = spte.mark_for_access_track();
    }
    // Huge pages are never created in dirty-logged slots (kvm_mmu_hugepage_adjust).
    if spte.is_writable() && input.dirty_log {
        debug_assert_eq!(level, 1);
        result.mark_dirty = true;
    }
    (spte, result)
}

/// make_mmio_spte: remembers that `gfn` is MMIO, with the gpte rights `access` and
/// the memslot generation `gen` (of which the low 19 bits are kept).
pub fn make_mmio_spte(gfn: u64, access: u8, gen: u64) -> Spte {
    let gen = gen & MMIO_SPTE_GEN_MASK;
    debug_assert_eq!(gfn << 12 & !MMIO_GFN_MASK, 0);
    let gen_bits = ((gen << MMIO_SPTE_GEN_LOW_START) & MMIO_SPTE_GEN_LOW_MASK)
        | ((gen << (MMIO_SPTE_GEN_HIGH_START - MMIO_SPTE_GEN_LOW_BITS)) & MMIO_SPTE_GEN_HIGH_MASK);
    let access = u64::from(access & SHADOW_MMIO_ACCESS_MASK);
    Spte(gen_bits | SHADOW_MMIO_VALUE | access | (gfn << 12))
}

/// check_mmio_spte: the MMIO SPTE still describes the memslots of generation
/// `current_gen` (never while a memslot update is in progress).
pub fn check_mmio_generation(spte: Spte, current_gen: u64) -> bool {
    if current_gen & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS != 0 {
        return false;
    }
    current_gen & MMIO_SPTE_GEN_MASK == spte.mmio_generation()
}

/// The invariants every SPTE at `level` must keep (the audit's check): the writable
/// bits of shadow-present leaves (check_spte_writable_invariants), and the shape
/// make_spte/make_nonleaf_spte give present SPTEs in this format.
pub fn check_invariants(spte: Spte, level: u8) -> Result<(), &'static str> {
    if !(1..=5).contains(&level) {
        return Err("level out of range");
    }
    if !spte.is_shadow_present() {
        return Ok(());
    }
    if spte.is_mmio() {
        return Err("shadow-present SPTE matches the MMIO pattern");
    }
    if spte.0 & PT_PRESENT == 0 {
        return Err("shadow-present SPTE without the P bit");
    }
    if spte.0 & SPTE_TDP_AD_MASK != 0 {
        return Err("A/D type bits set in a non-EPT SPTE");
    }
    if level == 1 && spte.is_large() {
        return Err("PS set in a 4 KiB SPTE");
    }
    if !spte.is_leaf(level) {
        let full = PT_PRESENT | PT_WRITABLE | PT_USER;
        return if spte.0 & full != full || !spte.is_executable() {
            Err("non-leaf SPTE without full access")
        } else {
            Ok(())
        };
    }
    if level > 3 {
        return Err("huge leaf above 1 GiB");
    }
    if spte.is_writable() && !spte.is_host_writable() {
        return Err("Writable SPTE is not Host-writable");
    }
    if spte.is_writable() && !spte.is_mmu_writable() {
        return Err("Writable SPTE is not MMU-writable");
    }
    if spte.is_mmu_writable() && !spte.is_host_writable() {
        return Err("MMU-writable SPTE is not Host-writable");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paging::ACC_ALL;

    fn input(level: u8, access: u8) -> MakeSpte {
        MakeSpte {
            level,
            access,
            pfn: 0x1234,
            old_spte: Spte::NONPRESENT,
            prefetch: false,
            synchronizing: false,
            host_writable: true,
            dirty_log: false,
            nx_huge_pages: false,
        }
    }

    /// make_spte with an unsync step that allows the write and records the call.
    fn make(i: &MakeSpte) -> (Spte, MakeSpteResult, bool) {
        let mut called = false;
        let (s, r) = make_spte(i, || {
            called = true;
            false
        });
        (s, r, called)
    }

    #[test]
    fn layout_constants() {
        assert_eq!(SPTE_HOST_WRITABLE, 0x200);
        assert_eq!(SPTE_MMU_WRITABLE, 0x400);
        assert_eq!(SPTE_MMU_PRESENT, 0x800);
        assert_eq!(SPTE_BASE_ADDR_MASK, 0x000f_ffff_ffff_f000);
        assert_eq!(SPTE_TDP_AD_MASK, 0x0030_0000_0000_0000);
        assert_eq!(MMIO_SPTE_GEN_LOW_MASK, 0x7f8);
        assert_eq!(MMIO_SPTE_GEN_HIGH_MASK, 0x7ff0_0000_0000_0000);
        assert_eq!(SHADOW_MMIO_VALUE, 0x0008_0000_0000_0001);
        // The generation never overlaps the MMIO marker or the shadow-present bit.
        let gen = MMIO_SPTE_GEN_LOW_MASK | MMIO_SPTE_GEN_HIGH_MASK;
        assert_eq!(gen & (SHADOW_MMIO_MASK | SPTE_MMU_PRESENT), 0);
        assert_eq!(spte_index(0xffff_ffff_ffff_f000, 1), 511);
        assert_eq!(spte_index(0x0000_0080_0000_0000, 4), 1);
    }

    #[test]
    fn nonleaf_links_by_arena_index() {
        let s = Spte::nonleaf(0x1_2345);
        assert_eq!(s.0, (0x1_2345 << 12) | 0x800 | 0x27);
        assert_eq!(s.child_index(), 0x1_2345);
        assert!(s.is_shadow_present() && !s.is_leaf(2) && !s.is_mmio());
        assert_eq!(s.access(), ACC_ALL);
        assert!(s.is_accessed() && !s.is_dirty());
        assert_eq!(Spte::nonleaf(u32::MAX).child_index(), u32::MAX);
        assert_eq!(check_invariants(s, 4), Ok(()));
        // The same SPTE seen at level 1 is a leaf that breaks the writable rules.
        assert!(check_invariants(s, 1).is_err());
    }

    #[test]
    fn pae_roots_are_present_but_not_shadow_present() {
        let r = Spte::pae_root(7);
        assert_eq!(r.0, 0x7001);
        assert!(r.is_valid_pae_root() && !r.is_shadow_present());
        assert_eq!(r.child_index(), 7);
        assert!(!Spte::INVALID_PAE_ROOT.is_valid_pae_root());
    }

    #[test]
    fn nonpresent_value() {
        let n = Spte::NONPRESENT;
        assert!(!n.is_shadow_present() && !n.is_mmio());
        assert_eq!(format!("{n:?}"), "Spte(nonpresent)");
        assert_eq!(check_invariants(n, 1), Ok(()));
    }

    #[test]
    fn make_spte_read_only_access() {
        let (s, r, called) = make(&input(1, ACC_USER | ACC_EXEC));
        assert_eq!(s.0, (0x1234 << 12) | 0x800 | 0x200 | 0x20 | 0x4 | 0x1);
        assert!(!s.is_writable() && !s.is_mmu_writable() && s.is_host_writable());
        assert!(s.is_accessed() && !s.is_dirty() && s.is_executable());
        assert_eq!(s.pfn(), 0x1234);
        assert_eq!(s.access(), ACC_USER | ACC_EXEC);
        assert_eq!(r, MakeSpteResult::default());
        assert!(!called, "no write, no unsync");
        assert_eq!(check_invariants(s, 1), Ok(()));
    }

    #[test]
    fn make_spte_write_unsyncs_and_predirties() {
        let (s, r, called) = make(&input(1, ACC_ALL));
        assert!(called);
        assert!(s.is_writable() && s.is_mmu_writable() && s.is_host_writable());
        assert!(s.is_dirty() && s.is_accessed());
        assert!(!r.wrprot && !r.mark_dirty);
        assert_eq!(
            format!("{s:?}"),
            "Spte(0x1234e67 P W U A D HW MW pfn=0x1234)"
        );
        assert_eq!(check_invariants(s, 1), Ok(()));
    }

    #[test]
    fn make_spte_write_refused_by_write_tracking() {
        let (s, r) = make_spte(&input(1, ACC_ALL), || true);
        assert!(r.wrprot);
        assert!(!s.is_writable() && !s.is_mmu_writable() && !s.is_dirty());
        assert!(s.is_host_writable(), "the host still allows it");
        assert_eq!(check_invariants(s, 1), Ok(()));
    }

    #[test]
    fn make_spte_skips_unsync_over_a_writable_leaf() {
        let (old, _, _) = make(&input(1, ACC_ALL));
        let mut i = input(1, ACC_ALL);
        i.old_spte = old;
        let (s, r, called) = make(&i);
        assert!(!called && !r.wrprot && s.is_writable());
        // A read-only old leaf, or a non-leaf, does not skip it.
        i.old_spte = Spte(old.0 & !PT_WRITABLE);
        assert!(make(&i).2);
        i.level = 2;
        i.old_spte = Spte::nonleaf(3);
        assert!(make(&i).2);
    }

    #[test]
    fn make_spte_prefetch_leaves_a_clear() {
        let mut i = input(1, ACC_ALL);
        i.prefetch = true;
        let (s, _, _) = make(&i);
        assert!(!s.is_accessed());
        assert!(s.is_writable() && s.is_dirty(), "still created dirty");
        // Syncing an unsync page keeps A even though it is a prefetch.
        i.synchronizing = true;
        assert!(make(&i).0.is_accessed());
    }

    #[test]
    fn make_spte_large_page_sets_ps() {
        let mut i = input(2, ACC_ALL);
        i.pfn = 0x200;
        let (s, _, _) = make(&i);
        assert!(s.is_large() && s.is_leaf(2) && s.is_executable());
        assert_eq!(check_invariants(s, 2), Ok(()));
        let (s4k, _, _) = make(&input(1, ACC_ALL));
        assert!(!s4k.is_large());
        // With the NX hugepage mitigation a huge leaf loses exec, a 4 KiB one keeps it.
        i.nx_huge_pages = true;
        assert!(!make(&i).0.is_executable());
        let mut i = input(1, ACC_ALL);
        i.nx_huge_pages = true;
        assert!(make(&i).0.is_executable());
    }

    #[test]
    fn make_spte_host_read_only_page() {
        let mut i = input(1, ACC_ALL);
        i.host_writable = false;
        let (s, r, called) = make(&i);
        assert!(!called && !r.wrprot, "not a write-tracking refusal");
        assert!(!s.is_writable() && !s.is_host_writable() && !s.is_mmu_writable());
        assert_eq!(check_invariants(s, 1), Ok(()));
    }

    #[test]
    fn make_spte_nx_and_user() {
        let (s, _, _) = make(&input(1, ACC_WRITE));
        assert_eq!(s.0 & (PT64_NX | PT_USER), PT64_NX);
        assert_eq!(s.access(), ACC_WRITE);
        let (s, _, _) = make(&input(1, ACC_EXEC | ACC_USER));
        assert_eq!(s.0 & (PT64_NX | PT_USER), PT_USER);
    }

    #[test]
    fn make_spte_marks_dirty_in_logged_slots() {
        let mut i = input(1, ACC_ALL);
        i.dirty_log = true;
        assert!(make(&i).1.mark_dirty);
        // Nothing to log for a read-only or write-protected SPTE.
        i.access = ACC_USER;
        assert!(!make(&i).1.mark_dirty);
        i.access = ACC_ALL;
        assert!(!make_spte(&i, || true).1.mark_dirty);
    }

    #[test]
    fn mmio_round_trips() {
        for gen in [0u64, 1, 0x7ffff, 0x12345, 0xff, 0x100] {
            for (gfn, access) in [(0u64, 0u8), (0xfee00, ACC_WRITE), (0xf_ffff_ffff, ACC_ALL)] {
                let s = make_mmio_spte(gfn, access, gen);
                assert!(s.is_mmio() && !s.is_shadow_present(), "{s:?}");
                assert_eq!(s.mmio_gfn(), gfn);
                assert_eq!(s.mmio_access(), access & (ACC_WRITE | ACC_USER));
                assert_eq!(s.mmio_generation(), gen);
                assert!(check_mmio_generation(s, gen));
                assert_eq!(check_invariants(s, 1), Ok(()));
            }
        }
        let s = make_mmio_spte(0xfee00, ACC_WRITE | ACC_USER, 0x7ffff);
        assert_eq!(s.0, 0x7ff8_0000_fee0_07ff);
        assert_eq!(
            format!("{s:?}"),
            "Spte(0x7ff80000fee007ff mmio gfn=0xfee00 access=0o6 gen=0x7ffff)"
        );
    }

    #[test]
    fn mmio_generation_mismatch_is_detected() {
        let s = make_mmio_spte(0x100, ACC_WRITE, 6);
        assert!(check_mmio_generation(s, 6));
        assert!(!check_mmio_generation(s, 8));
        // Only 19 bits are stored: generations 2^19 apart alias (KVM zaps all on wrap).
        assert!(check_mmio_generation(s, 6 + (1 << 19)));
        assert_eq!(make_mmio_spte(0x100, 0, 1 << 19).mmio_generation(), 0);
        // Never current while an update is in progress.
        assert!(!check_mmio_generation(
            s,
            6 | KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
        ));
    }

    #[test]
    fn invariants_catch_bad_writable_bits() {
        let (good, _, _) = make(&input(1, ACC_ALL));
        assert_eq!(check_invariants(good, 1), Ok(()));
        let no_host = Spte(good.0 & !SPTE_HOST_WRITABLE);
        assert_eq!(
            check_invariants(no_host, 1),
            Err("Writable SPTE is not Host-writable")
        );
        let no_mmu = Spte(good.0 & !SPTE_MMU_WRITABLE);
        assert_eq!(
            check_invariants(no_mmu, 1),
            Err("Writable SPTE is not MMU-writable")
        );
        let mmu_only = Spte(good.0 & !(SPTE_HOST_WRITABLE | PT_WRITABLE));
        assert_eq!(
            check_invariants(mmu_only, 1),
            Err("MMU-writable SPTE is not Host-writable")
        );
        // MMU-writable without W: write-protected for dirty logging, which is legal.
        let dirty_logged = Spte(good.0 & !PT_WRITABLE);
        assert_eq!(check_invariants(dirty_logged, 1), Ok(()));
    }

    #[test]
    fn invariants_catch_bad_shapes() {
        let (good, _, _) = make(&input(1, ACC_ALL));
        let mmio_like = Spte(good.0 | (1 << 51));
        assert_eq!(
            check_invariants(mmio_like, 1),
            Err("shadow-present SPTE matches the MMIO pattern")
        );
        assert!(check_invariants(Spte(good.0 & !PT_PRESENT), 1).is_err());
        assert!(check_invariants(Spte(good.0 | PT_PAGE_SIZE), 1).is_err());
        assert!(check_invariants(Spte(good.0 | SPTE_TDP_AD_DISABLED), 1).is_err());
        assert!(check_invariants(Spte(good.0 | PT_PAGE_SIZE), 4).is_err());
        assert!(check_invariants(good, 0).is_err());
        let ro_link = Spte(Spte::nonleaf(1).0 & !PT_WRITABLE);
        assert_eq!(
            check_invariants(ro_link, 2),
            Err("non-leaf SPTE without full access")
        );
    }

    #[test]
    fn access_tracking_clears_only_a() {
        let (s, _, _) = make(&input(1, ACC_ALL));
        let t = s.mark_for_access_track();
        assert_eq!(t.0, s.0 & !PT_ACCESSED);
        assert!(t.ad_enabled() && t.is_writable() && t.is_dirty());
    }
}
