//! The shadow-paging fault and sync (paging_tmpl.h, FNAME(...)), for both gpte
//! formats (4-byte 32-bit tables, 8-byte PAE/long-mode tables): FNAME(page_fault),
//! FNAME(fetch) building the shadow path, FNAME(pte_prefetch), FNAME(sync_spte), and
//! mmu.c's __kvm_sync_page and mmu_sync_children built on them.

use super::context::{for_each_shadow_entry, walk_start, KvmMmu, LoggedMem, MmuEnv, RootHpa};
use super::fault::{
    direct_pte_prefetch, faultin_pfn, get_child_sp, gfn_round_for_level, handle_page_track,
    hugepage_adjust, mmu_set_spte, root_ready, HostPage, PageFault, PfRet, PTE_PREFETCH_NUM,
};
use super::page_track::PG_LEVEL_4K;
use super::rmap::{index_of, kvm_pages_per_hpage, sp_of, spte_ptr, SptePtr};
use super::role::Role;
use super::shadow::{Mmu, SpIndex};
use super::spte::{make_mmio_spte, make_spte, spte_index, MakeSpte, Spte};
use crate::errno::Result;
use crate::memslot::MemSlots;
use crate::paging::pte::{
    PT32_BASE_ADDR_MASK, PT64_BASE_ADDR_MASK, PT64_NX, PT_ACCESSED, PT_DIRTY, PT_PRESENT,
};
use crate::paging::walker::gpte_access;
use crate::paging::{Access, GuestMem, GuestMmu, PagingMode, Walk, ACC_EXEC, ACC_USER, ACC_WRITE};

/// struct guest_walker as FNAME(fetch) uses it, indexed by level - 1.
#[derive(Clone, Copy, Debug)]
pub struct GuestWalker {
    /// Level of the guest leaf.
    pub level: u8,
    pub gfn: u64,
    /// The leaf's effective rights (W dropped for a clean leaf on a read).
    pub pte_access: u8,
    pub table_gfn: [u64; 5],
    pub pte_gpa: [u64; 5],
    /// The gptes as read, and as the walk's A/D update left them.
    pub ptes: [u64; 5],
    pub ptes_after: [u64; 5],
    /// Rights accumulated above each level (what a shadow page there inherits).
    pub pt_access: [u8; 5],
    pub wide: bool,
    pub prefetch_ptes: [u64; PTE_PREFETCH_NUM],
}

impl GuestWalker {
    pub fn new(walk: &Walk, mode: PagingMode, write: bool) -> GuestWalker {
        let wide = mode != PagingMode::Bits32;
        let nx_mask = if wide { PT64_NX } else { 0 };
        let mut gw = GuestWalker {
            level: walk.level,
            gfn: walk.gpa >> 12,
            pte_access: walk.access,
            table_gfn: [0; 5],
            pte_gpa: [0; 5],
            ptes: [0; 5],
            ptes_after: [0; 5],
            pt_access: [0; 5],
            wide,
            prefetch_ptes: [0; PTE_PREFETCH_NUM],
        };
        // A PAE PDPTE is a register: it grants nothing and is not a table entry here.
        let skip = usize::from(mode == PagingMode::Pae);
        let mut bits = !0u64;
        for &(level, gpa, value) in &walk.gptes[skip..] {
            let l = usize::from(level) - 1;
            gw.pt_access[l] = gpte_access(bits ^ nx_mask, wide);
            bits &= value ^ nx_mask;
            gw.table_gfn[l] = gpa >> 12;
            gw.pte_gpa[l] = gpa;
            gw.ptes[l] = value;
            let mut after = value | PT_ACCESSED;
            if level == walk.level && write {
                after |= PT_DIRTY;
            }
            gw.ptes_after[l] = after;
        }
        // FNAME(protect_clean_gpte): a clean leaf is mapped read-only until written.
        if !write && !walk.dirty {
            gw.pte_access &= !ACC_WRITE;
        }
        gw
    }

    fn gpte_size(&self) -> usize {
        if self.wide {
            8
        } else {
            4
        }
    }
}

/// FNAME(gpte_changed): re-read the gpte of `level`; for level 1 also the aligned
/// block of 8 around it, which the prefetch uses.
fn gpte_changed(slots: &MemSlots, gw: &mut GuestWalker, level: u8) -> bool {
    let l = usize::from(level) - 1;
    let size = gw.gpte_size();
    let gpa = gw.pte_gpa[l];
    let Some(page) = slots.guest_page(gpa >> 12) else {
        return true;
    };
    let cur = if level == PG_LEVEL_4K {
        let base = (gpa & 0xfff) as usize & !(PTE_PREFETCH_NUM * size - 1);
        let mut block = [0u8; PTE_PREFETCH_NUM * 8];
        let block = &mut block[..PTE_PREFETCH_NUM * size];
        if !page.read(base, block) {
            return true;
        }
        for (p, b) in gw.prefetch_ptes.iter_mut().zip(block.chunks_exact(size)) {
            *p = if size == 8 {
                u64::from_le_bytes(b.try_into().expect("8 bytes"))
            } else {
                u64::from(u32::from_le_bytes(b.try_into().expect("4 bytes")))
            };
        }
        gw.prefetch_ptes[((gpa & 0xfff) as usize - base) / size]
    } else {
        match page.load((gpa & 0xfff) as usize, size) {
            Some(v) => v,
            None => return true,
        }
    };
    cur != gw.ptes[l] && cur != gw.ptes_after[l]
}

/// FNAME(page_fault): the guest walk, then the host page, then FNAME(fetch).
pub fn page_fault(env: &mut MmuEnv<'_>, ctx: &mut KvmMmu, f: &PageFault) -> Result<PfRet> {
    let access = Access {
        write: f.write,
        user: f.user,
        fetch: f.exec,
        implicit: f.implicit,
    };
    let walk = match ctx
        .guest
        .walk_no_canonical_check(&env.guest_mem(), f.addr, access)
    {
        Ok(w) => w,
        Err(e) => return Ok(PfRet::Guest(e)),
    };
    let mut gw = GuestWalker::new(&walk, ctx.guest.mode, f.write);
    if handle_page_track(env.mmu, f, gw.gfn) {
        // shadow_page_table_clear_flood.
        let mut sps = Vec::with_capacity(5);
        for_each_shadow_entry(env.mmu, &ctx.root.hpa, ctx.root_level(), f.addr, |_, s| {
            sps.push(s.sp);
            true
        });
        for sp in sps {
            env.mmu.get_mut(sp).write_flooding_count = 0;
        }
        return Ok(PfRet::WriteProtected);
    }
    let host = match faultin_pfn(ctx, env.slots, f, gw.gfn) {
        Ok(h) => h,
        Err(PfRet::Retry) => return Ok(super::notifier::break_cow(env, gw.gfn)),
        Err(r) => return Ok(r),
    };
    // CR0.WP=0: a supervisor write to a read-only page is allowed; KVM maps it
    // writable and supervisor-only (and not executable under SMEP).
    if f.write
        && gw.pte_access & ACC_WRITE == 0
        && !ctx.guest.ctx.wp()
        && !f.user
        && host.pfn.is_some()
    {
        gw.pte_access |= ACC_WRITE;
        gw.pte_access &= !ACC_USER;
        if ctx.guest.ctx.smep() {
            gw.pte_access &= !ACC_EXEC;
        }
    }
    // is_page_fault_stale: an obsolete root, or an invalidation covering the gfn.
    if let RootHpa::Page(sp) = ctx.root.hpa {
        if env.mmu.is_obsolete(sp) {
            return Ok(PfRet::Retry);
        }
    }
    if env.mmu.invalidation_blocks(&host, gw.gfn) {
        return Ok(PfRet::Retry);
    }
    env.mmu.make_mmu_pages_available()?;
    Ok(fetch(env, ctx, f, &mut gw, host))
}

/// FNAME(fetch): shadow pages for the guest tables down to the guest leaf's level,
/// direct pages below it if the leaf is mapped smaller, then the leaf and prefetch.
fn fetch(
    env: &mut MmuEnv<'_>,
    ctx: &mut KvmMmu,
    f: &PageFault,
    gw: &mut GuestWalker,
    mut host: HostPage,
) -> PfRet {
    let slots = env.slots;
    let mem = env.guest_mem();
    let mut top = ctx.cpu_role.base.level();
    if top == 3 {
        top = 2;
    }
    if gpte_changed(slots, gw, top) {
        return PfRet::Retry;
    }
    if !root_ready(ctx) {
        return PfRet::Retry;
    }
    let Some((mut level, mut sp)) = walk_start(&ctx.root.hpa, ctx.root_level(), f.addr) else {
        ctx.req_free_obsolete = true;
        return PfRet::Retry;
    };
    let guest = &ctx.guest;
    let root_role = ctx.root_role;
    let direct_access = gw.pte_access;
    loop {
        let sptep = spte_ptr(sp, spte_index(f.addr, level));
        env.mmu.get_mut(sp).write_flooding_count = 0;
        if level == gw.level {
            break;
        }
        let l = usize::from(level) - 2;
        let (table_gfn, access) = (gw.table_gfn[l], gw.pt_access[l]);
        let child = get_child_sp(env.mmu, sptep, table_gfn, false, access, |m, i| {
            sync_page(m, mem, guest, root_role, i)
        });
        if let Some(c) = child {
            // Sync before linking: the guest need not flush after making a gpte present.
            if env.mmu.get(c).unsync_children != 0 {
                sync_children(env.mmu, mem, guest, root_role, c);
            }
        }
        if gpte_changed(slots, gw, level - 1) {
            return PfRet::Retry;
        }
        if let Some(c) = child {
            env.mmu.link_shadow_page(sptep, c);
        }
        sp = env.mmu.spte(sptep).child_index();
        level -= 1;
    }
    let goal = hugepage_adjust(env.mmu, slots, gw.gfn, gw.level, &host);
    loop {
        let sptep = spte_ptr(sp, spte_index(f.addr, level));
        let base_gfn = gfn_round_for_level(gw.gfn, level);
        if level == goal {
            if let Some(p) = host.pfn.as_mut() {
                *p &= !(kvm_pages_per_hpage(level) - 1);
            }
            let r = mmu_set_spte(env, sptep, gw.pte_access, base_gfn, &host, false, f.write);
            // No prefetch while addresses are being invalidated.
            if r != PfRet::Spurious && env.mmu.invalidate_in_progress == 0 {
                pte_prefetch(env, guest, gw, sptep);
            }
            return r;
        }
        validate_direct_spte(env.mmu, sptep, direct_access);
        if let Some(c) = get_child_sp(env.mmu, sptep, base_gfn, true, direct_access, |_, _| 0) {
            env.mmu.link_shadow_page(sptep, c);
        }
        sp = env.mmu.spte(sptep).child_index();
        level -= 1;
    }
}

/// validate_direct_spte: a direct page made for other rights (the guest leaf went
/// from clean to dirty) is unlinked so a new one is made.
fn validate_direct_spte(mmu: &mut Mmu, sptep: SptePtr, direct_access: u8) {
    let s = mmu.spte(sptep);
    if s.is_shadow_present() && !s.is_large() {
        let child = s.child_index();
        if mmu.get(child).role.access() != direct_access {
            mmu.drop_parent_pte(child, sptep);
            mmu.flush_remote_tlbs();
        }
    }
}

/// FNAME(pte_prefetch): fill the non-present SPTEs of the faulting one's aligned block
/// of 8 from the gptes read by gpte_changed, stopping at the first unusable gpte.
fn pte_prefetch(env: &mut MmuEnv<'_>, guest: &GuestMmu, gw: &GuestWalker, sptep: SptePtr) {
    let sp = sp_of(sptep);
    let role = env.mmu.get(sp).role;
    if role.level() > PG_LEVEL_4K {
        return;
    }
    if role.direct() {
        direct_pte_prefetch(env, sptep);
        return;
    }
    let index = index_of(sptep);
    let base = index & !(PTE_PREFETCH_NUM - 1);
    for (j, &gpte) in gw.prefetch_ptes.iter().enumerate() {
        let i = base + j;
        if i == index || env.mmu.get(sp).spt[i].is_shadow_present() {
            continue;
        }
        if !prefetch_gpte(env, guest, sp, i, gpte) {
            break;
        }
    }
}

/// FNAME(prefetch_invalid_gpte): a gpte that cannot be prefetched (or synced) drops
/// the SPTE: not present, not accessed, or with reserved bits.
fn prefetch_invalid_gpte(mmu: &mut Mmu, guest: &GuestMmu, sptep: SptePtr, gpte: u64) -> bool {
    if gpte & PT_PRESENT == 0 || gpte & PT_ACCESSED == 0 || guest.rsvd.is_set(gpte, 1) {
        mmu.drop_spte(sptep);
        return true;
    }
    false
}

#[inline]
fn gpte_to_gfn(gpte: u64, wide: bool) -> u64 {
    if wide {
        (gpte & PT64_BASE_ADDR_MASK) >> 12
    } else {
        (gpte & PT32_BASE_ADDR_MASK) >> 12
    }
}

/// The rights a level-1 gpte gives below a page with `role` (FNAME(gpte_access) and
/// FNAME(protect_clean_gpte)).
#[inline]
fn leaf_access(role: Role, gpte: u64, wide: bool) -> u8 {
    let mut access = role.access() & gpte_access(gpte, wide);
    if gpte & PT_DIRTY == 0 {
        access &= !ACC_WRITE;
    }
    access
}

/// FNAME(prefetch_gpte).
fn prefetch_gpte(env: &mut MmuEnv<'_>, guest: &GuestMmu, sp: SpIndex, i: usize, gpte: u64) -> bool {
    let sptep = spte_ptr(sp, i);
    if prefetch_invalid_gpte(env.mmu, guest, sptep, gpte) {
        return false;
    }
    let role = env.mmu.get(sp).role;
    let wide = !role.has_4_byte_gpte();
    let gfn = gpte_to_gfn(gpte, wide);
    let access = leaf_access(role, gpte, wide);
    let Some(slot) = env.slots.lookup(gfn) else {
        return false;
    };
    if (access & ACC_WRITE != 0 && slot.dirty_logging()) || slot.readonly() {
        return false;
    }
    let (pfn, host_writable) = slot.host.frame(slot.gfn_to_hva(gfn));
    if !host_writable {
        return false;
    }
    let host = HostPage {
        pfn: Some(pfn),
        writable: true,
        dirty_log: slot.dirty_logging(),
    };
    mmu_set_spte(env, sptep, access, gfn, &host, true, false);
    true
}

/// The role bits kvm_sync_page_check ignores (level, access, quadrant, passthrough).
fn sync_role_ign() -> u32 {
    Role::default()
        .with_level(0xf)
        .with_access(0x7)
        .with_quadrant(0x3)
        .with_passthrough(true)
        .word()
}

/// __kvm_sync_page: resync every SPTE of an unsync page from its gptes. < 0: the page
/// cannot be synced (zap it); > 0: a remote flush is needed.
pub fn sync_page(
    mmu: &mut Mmu,
    mem: LoggedMem<'_>,
    guest: &GuestMmu,
    root_role: Role,
    sp: SpIndex,
) -> i32 {
    let role = mmu.get(sp).role;
    if role.direct() || (role.word() ^ root_role.word()) & !sync_role_ign() != 0 {
        return -1;
    }
    let mut flush = 0i32;
    for i in 0..super::spte::SPTE_ENT_PER_PAGE {
        if mmu.get(sp).spt[i] == Spte::NONPRESENT {
            continue;
        }
        let ret = sync_spte(mmu, mem, guest, sp, i);
        if ret < -1 {
            return -1;
        }
        flush |= ret;
    }
    flush
}

/// FNAME(sync_spte): bring SPTE `i` of an unsync level-1 page in line with its gpte;
/// like a fault, an SPTE it makes writable in a logging slot logs the page to the
/// syncing vCPU. -1 if the gpte cannot be read, 1 if a flush is needed.
pub fn sync_spte(
    mmu: &mut Mmu,
    mem: LoggedMem<'_>,
    guest: &GuestMmu,
    sp: SpIndex,
    i: usize,
) -> i32 {
    let slots = mem.slots;
    let page = mmu.get(sp);
    let role = page.role;
    let wide = !role.has_4_byte_gpte();
    let size = if wide { 8 } else { 4 };
    // FNAME(get_level1_sp_gpa): a 4-byte page's quadrant names its half of the table.
    let quadrant_off = if wide {
        0
    } else {
        u64::from(role.quadrant()) * 512 * 4
    };
    let pte_gpa = (page.gfn << 12) + quadrant_off + (i * size) as u64;
    let Some(gpte) = slots.read_gpte(pte_gpa, size) else {
        return -1;
    };
    let sptep = spte_ptr(sp, i);
    if prefetch_invalid_gpte(mmu, guest, sptep, gpte) {
        return 1;
    }
    let gfn = gpte_to_gfn(gpte, wide);
    let access = leaf_access(role, gpte, wide);
    let cur = mmu.spte(sptep);
    if cur.is_mmio() {
        // sync_mmio_spte.
        if gfn != cur.mmio_gfn() {
            mmu.clear_mmio_spte(sptep);
        } else {
            mmu.clear_mmio_spte(sptep);
            mmu.set_mmio_spte(sptep, make_mmio_spte(gfn, access, slots.generation()));
        }
        return 0;
    }
    if gfn != mmu.get(sp).get_gfn(i) {
        mmu.drop_spte(sptep);
        return 1;
    }
    if mmu.get(sp).get_access(i) == access {
        return 0;
    }
    mmu.set_access(sptep, access);
    let input = MakeSpte {
        level: 1,
        access,
        pfn: cur.pfn(),
        old_spte: cur,
        prefetch: true,
        synchronizing: true,
        host_writable: cur.is_host_writable(),
        dirty_log: slots.lookup(gfn).is_some_and(|s| s.dirty_logging()),
        nx_huge_pages: false,
    };
    let (spte, r) = make_spte(&input, || mmu.try_to_unsync_pages(gfn, false, true));
    if r.mark_dirty {
        mem.mark_dirty(gfn);
    }
    i32::from(mmu.update_spte(sptep, spte))
}

/// mmu_sync_children: sync (or zap) every unsync page below `parent`, 16 at a time,
/// write-protecting their gfns first.
pub fn sync_children(
    mmu: &mut Mmu,
    mem: LoggedMem<'_>,
    guest: &GuestMmu,
    root_role: Role,
    parent: SpIndex,
) {
    let mut batch = Vec::new();
    let mut invalid_list = Vec::new();
    let mut flush = false;
    while mmu.unsync_walk(parent, &mut batch) {
        let mut protected = false;
        for &(sp, _) in &batch {
            let gfn = mmu.get(sp).gfn;
            protected |= mmu.write_protect_gfn(gfn, 1);
        }
        if protected {
            mmu.flush_remote_tlbs();
            flush = false;
        }
        for (sp, path) in std::mem::take(&mut batch) {
            mmu.unlink_unsync_page(sp);
            let ret = sync_page(mmu, mem, guest, root_role, sp);
            if ret < 0 {
                mmu.prepare_zap(sp, &mut invalid_list);
            }
            flush |= ret > 0;
            mmu.clear_parents(&path);
        }
    }
    remote_flush_or_zap(mmu, &mut invalid_list, flush);
}

/// kvm_mmu_remote_flush_or_zap.
pub fn remote_flush_or_zap(mmu: &mut Mmu, invalid_list: &mut Vec<SpIndex>, flush: bool) {
    if !invalid_list.is_empty() {
        mmu.commit_zap(invalid_list);
    } else if flush {
        mmu.flush_remote_tlbs();
    }
}

const _: () = assert!(PTE_PREFETCH_NUM.is_power_of_two());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_ignores_level_access_quadrant() {
        let ign = sync_role_ign();
        let r = Role::default().with_level(2).with_cr0_wp(true);
        assert_eq!(
            (r.word() ^ r.with_level(1).with_access(3).with_quadrant(1).word()) & !ign,
            0
        );
        assert_ne!((r.word() ^ r.with_cr0_wp(false).word()) & !ign, 0);
    }
}
