//! The fault path's common part (mmu.c): kvm_mmu_page_fault with its MMIO fast path
//! and statistics, struct kvm_page_fault, faulting in the host page, the huge-page
//! decision, mmu_set_spte, and the direct fault of guests without paging
//! (direct_page_fault, direct_map, fast_page_fault and the direct prefetch).
//! The shadow-paging fault itself is in paging_tmpl.rs.

use super::context::{shadow_leaf, KvmMmu, MmuEnv, RootHpa};
use super::page_track::PG_LEVEL_4K;
use super::paging_tmpl;
use super::rmap::{index_of, kvm_pages_per_hpage, sp_of, SptePtr};
use super::role::child_role;
use super::shadow::{Mmu, SpIndex};
use super::spte::{
    check_mmio_generation, make_mmio_spte, make_spte, MakeSpte, Spte, HOST_PHYS_BITS,
};
use crate::errno::Result;
use crate::memslot::{MemSlot, MemSlots};
use crate::paging::pte::PT_WRITABLE;
use crate::paging::{
    WalkError, ACC_ALL, ACC_WRITE, PFERR_FETCH, PFERR_PRESENT, PFERR_RSVD, PFERR_USER, PFERR_WRITE,
};
use crate::stats::VcpuStat;

/// PTE_PREFETCH_NUM: the aligned block of SPTEs filled around a fault.
pub const PTE_PREFETCH_NUM: usize = 8;

/// What a fault handler returns (RET_PF_*), plus the guest fault to inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PfRet {
    /// Enter the guest again (the access faults again if nothing changed).
    Retry,
    /// The instruction must be emulated: MMIO, or a write to a protected page table.
    Emulate,
    /// A write the shadow MMU refuses to map (a tracked page table): emulated after
    /// kvm_mmu_write_protect_fault.
    WriteProtected,
    Fixed,
    Spurious,
    /// The guest's own tables refuse the access: the fault goes to the guest.
    Guest(WalkError),
}

/// struct kvm_page_fault's inputs: the hardware error code, decoded.
#[derive(Clone, Copy, Debug)]
pub struct PageFault {
    pub addr: u64,
    pub error_code: u32,
    pub present: bool,
    pub write: bool,
    pub user: bool,
    pub exec: bool,
    pub rsvd: bool,
    /// An implicit supervisor access (descriptor tables): never exempt from SMAP.
    pub implicit: bool,
}

impl PageFault {
    pub fn new(addr: u64, error_code: u32) -> PageFault {
        PageFault {
            addr,
            error_code,
            present: error_code & PFERR_PRESENT != 0,
            write: error_code & PFERR_WRITE != 0,
            user: error_code & PFERR_USER != 0,
            exec: error_code & PFERR_FETCH != 0,
            rsvd: error_code & PFERR_RSVD != 0,
            implicit: false,
        }
    }
}

/// The host side of a fault (kvm_mmu_faultin_pfn): the frame, or none (MMIO).
#[derive(Clone, Copy, Debug)]
pub struct HostPage {
    /// `hva >> 12` of the guest page in memory the core owns; None: no memslot.
    pub pfn: Option<u64>,
    /// The memslot is writable (map_writable).
    pub writable: bool,
    pub dirty_log: bool,
}

/// The largest gfn an MMIO SPTE can hold (kvm_mmu_max_gfn).
const MAX_GFN: u64 = (1 << (HOST_PHYS_BITS - 12)) - 1;

/// kvm_mmu_faultin_pfn: Err(ret) ends the fault here (emulate).
pub fn faultin_pfn(
    mmu: &KvmMmu,
    slots: &MemSlots,
    f: &PageFault,
    gfn: u64,
) -> std::result::Result<HostPage, PfRet> {
    let _ = mmu;
    match slots.lookup(gfn) {
        None => {
            // kvm_handle_noslot_fault.
            if !slots_mmio_caching() || gfn > MAX_GFN {
                return Err(PfRet::Emulate);
            }
            Ok(HostPage {
                pfn: None,
                writable: false,
                dirty_log: false,
            })
        }
        // A write to a read-only slot: KVM_PFN_ERR_RO_FAULT, emulated as MMIO.
        Some(s) if f.write && s.readonly() => Err(PfRet::Emulate),
        Some(s) => {
            let (pfn, host_writable) = s.host.frame(s.gfn_to_hva(gfn));
            if f.write && !host_writable {
                // get_user_pages(FOLL_WRITE) breaks COW: the caller does it.
                return Err(PfRet::Retry);
            }
            Ok(HostPage {
                pfn: Some(pfn),
                writable: !s.readonly() && host_writable,
                dirty_log: s.dirty_logging(),
            })
        }
    }
}

/// enable_mmio_caching: KVM's module parameter (on by default; the device here runs
/// with mmio_caching=N). A process-wide switch, as in the kernel.
static MMIO_CACHING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

pub fn slots_mmio_caching() -> bool {
    MMIO_CACHING.load(std::sync::atomic::Ordering::Relaxed)
}

pub fn set_mmio_caching(on: bool) {
    MMIO_CACHING.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// host_pfn_mapping_level: the host maps guest memory with 4 KiB pages unless the
/// region asked for transparent huge pages (then 2 MiB where a whole aligned 2 MiB
/// of the region backs the frame). 1 GiB host pages (hugetlbfs) are not modelled.
pub(crate) fn host_mapping_level(slot: &MemSlot, gfn: u64) -> u8 {
    if !slot.host.thp() {
        return PG_LEVEL_4K;
    }
    let hva = slot.gfn_to_hva(gfn);
    let start = hva & !((2 << 20) - 1);
    let base = slot.host.addr();
    if start >= base
        && start + (2 << 20) <= base + slot.host.size() as u64
        && !slot.host.changed_in(start, 2 << 20)
    {
        2
    } else {
        PG_LEVEL_4K
    }
}

/// kvm_mmu_hugepage_adjust: the level of the leaf for this fault (and its frame).
pub fn hugepage_adjust(
    mmu: &Mmu,
    slots: &MemSlots,
    gfn: u64,
    max_level: u8,
    host: &HostPage,
) -> u8 {
    if max_level == PG_LEVEL_4K || host.pfn.is_none() || host.dirty_log {
        return PG_LEVEL_4K;
    }
    let Some(meta) = mmu.slot_meta_for_gfn(gfn) else {
        return PG_LEVEL_4K;
    };
    // kvm_mmu_max_mapping_level: disallow_lpage first, then the host's mapping.
    let level = meta
        .track
        .max_level(gfn, max_level.min(super::shadow::KVM_MAX_HUGEPAGE_LEVEL));
    if level == PG_LEVEL_4K {
        return level;
    }
    let Some(slot) = slots.lookup(gfn) else {
        return PG_LEVEL_4K;
    };
    let level = level.min(host_mapping_level(slot, gfn));
    // Linux splits a host huge page (invalidating all of it) before it changes part
    // of it, so while part of the frame is being invalidated the host maps it with
    // 4 KiB pages: a huge leaf would map gfns whose host pages are changing.
    let base = gfn_round_for_level(gfn, level);
    if level > PG_LEVEL_4K && mmu.invalidation_overlaps(base, base + kvm_pages_per_hpage(level)) {
        return PG_LEVEL_4K;
    }
    level
}

/// mmu_set_spte: install a leaf (or an MMIO SPTE for a frame without memslot).
#[allow(clippy::too_many_arguments)]
pub fn mmu_set_spte(
    env: &mut MmuEnv<'_>,
    sptep: SptePtr,
    pte_access: u8,
    gfn: u64,
    host: &HostPage,
    prefetch: bool,
    write_fault: bool,
) -> PfRet {
    let Some(pfn) = host.pfn else {
        env.stat(VcpuStat::PfMmioSpteCreated);
        let gen = env.slots.generation();
        let old = env.mmu.spte(sptep);
        if old.is_shadow_present() {
            env.mmu.zap_spte(sptep);
        }
        env.mmu
            .set_mmio_spte(sptep, make_mmio_spte(gfn, pte_access, gen));
        return PfRet::Emulate;
    };
    let level = env.mmu.get(sp_of(sptep)).role.level();
    let old = env.mmu.spte(sptep);
    if old.is_shadow_present() && prefetch && old.is_leaf(level) && old.pfn() == pfn {
        return PfRet::Spurious;
    }
    let mut wrprot = false;
    let mut mark_dirty = false;
    let changed = env
        .mmu
        .set_leaf_with(sptep, pfn, gfn, pte_access, |m, cur| {
            let input = MakeSpte {
                level,
                access: pte_access,
                pfn,
                old_spte: cur,
                prefetch,
                synchronizing: false,
                host_writable: host.writable,
                dirty_log: host.dirty_log,
                nx_huge_pages: false,
            };
            let (spte, r) = make_spte(&input, || m.try_to_unsync_pages(gfn, true, prefetch));
            wrprot = r.wrprot;
            mark_dirty = r.mark_dirty;
            spte
        });
    if mark_dirty {
        // A writable SPTE in a logging slot: the page counts as written now.
        env.mark_page_dirty(gfn);
    }
    if wrprot && write_fault {
        PfRet::WriteProtected
    } else if changed {
        PfRet::Fixed
    } else {
        PfRet::Spurious
    }
}

/// handle_mmio_page_fault: an access that hit a reserved-bit fault. An MMIO SPTE of
/// the current generation is emulated; a stale one takes the normal path (None);
/// anything else was zapped meanwhile and the access is retried.
fn handle_mmio_page_fault(env: &MmuEnv<'_>, ctx: &KvmMmu, addr: u64) -> Option<PfRet> {
    match shadow_leaf(env.mmu, &ctx.root.hpa, ctx.root_level(), addr) {
        Some((_, spte)) if spte.is_mmio() => {
            check_mmio_generation(spte, env.slots.generation()).then_some(PfRet::Emulate)
        }
        _ => Some(PfRet::Retry),
    }
}

/// kvm_mmu_page_fault up to emulation: the MMIO fast path, pf_taken, the MMU's fault
/// handler and the pf_* counters. Emulate and WriteProtected mean the caller
/// emulates the access (WriteProtected: a write to a shadowed page table, which
/// KVM may instead unprotect and retry).
pub fn kvm_mmu_page_fault(env: &mut MmuEnv<'_>, ctx: &mut KvmMmu, f: &PageFault) -> Result<PfRet> {
    if f.rsvd {
        if let Some(r) = handle_mmio_page_fault(env, ctx, f.addr) {
            return Ok(r);
        }
    }
    env.stat(VcpuStat::PfTaken);
    let r = if ctx.root_role.direct() {
        direct_page_fault(env, ctx, f)?
    } else {
        paging_tmpl::page_fault(env, ctx, f)?
    };
    // kvm_mmu_write_protect_fault (a shadow MMU, no event to reinject) ends in the
    // emulator too, but with EMULTYPE_ALLOW_RETRY_PF: the caller tells them apart.
    match r {
        PfRet::Fixed => env.stat(VcpuStat::PfFixed),
        PfRet::Emulate | PfRet::WriteProtected => env.stat(VcpuStat::PfEmulate),
        PfRet::Spurious => env.stat(VcpuStat::PfSpurious),
        PfRet::Guest(WalkError::PageFault { .. }) => env.stat(VcpuStat::PfGuest),
        _ => {}
    }
    Ok(r)
}

/// page_fault_handle_page_track: a present write fault on a write-tracked gfn can
/// never be fixed by mapping; it is emulated.
pub fn handle_page_track(mmu: &Mmu, f: &PageFault, gfn: u64) -> bool {
    !f.rsvd && f.present && f.write && mmu.gfn_is_write_tracked(gfn)
}

/// kvm_mmu_get_child_sp: the page below `sptep`, or None if a page is linked there
/// already (-EEXIST).
pub fn get_child_sp(
    mmu: &mut Mmu,
    sptep: SptePtr,
    gfn: u64,
    direct: bool,
    access: u8,
    sync: impl FnOnce(&mut Mmu, SpIndex) -> i32,
) -> Option<SpIndex> {
    let s = mmu.spte(sptep);
    if s.is_shadow_present() && !s.is_large() {
        return None;
    }
    let parent = mmu.get(sp_of(sptep)).role;
    let role = child_role(parent, index_of(sptep), direct, access);
    Some(mmu.get_shadow_page(gfn, role, sync).0)
}

/// gfn_round_for_level.
#[inline]
pub fn gfn_round_for_level(gfn: u64, level: u8) -> u64 {
    gfn & !(kvm_pages_per_hpage(level) - 1)
}

/// direct_page_fault for a guest without paging (gpa = gva, at most 2 MiB leaves).
fn direct_page_fault(env: &mut MmuEnv<'_>, ctx: &mut KvmMmu, f: &PageFault) -> Result<PfRet> {
    let gfn = f.addr >> 12;
    if handle_page_track(env.mmu, f, gfn) {
        return Ok(PfRet::WriteProtected);
    }
    if let Some(r) = fast_page_fault(env, ctx, f) {
        return Ok(r);
    }
    let host = match faultin_pfn(ctx, env.slots, f, gfn) {
        Ok(h) => h,
        Err(PfRet::Retry) => return Ok(super::notifier::break_cow(env, gfn)),
        Err(r) => return Ok(r),
    };
    if env.mmu.invalidation_blocks(&host, gfn) {
        return Ok(PfRet::Retry);
    }
    env.mmu.make_mmu_pages_available()?;
    // Non-paging guests get PAE tables (2 MiB at most); TDP maps up to 1 GiB.
    let max = if env.tdp {
        super::shadow::KVM_MAX_HUGEPAGE_LEVEL
    } else {
        2
    };
    let goal = hugepage_adjust(env.mmu, env.slots, gfn, max, &host);
    Ok(direct_map(env, ctx, f, gfn, goal, ACC_ALL, &host))
}

/// direct_map: build the direct path to `goal` and install the leaf.
fn direct_map(
    env: &mut MmuEnv<'_>,
    ctx: &KvmMmu,
    f: &PageFault,
    gfn: u64,
    goal: u8,
    access: u8,
    host: &HostPage,
) -> PfRet {
    let Some((mut level, mut sp)) =
        super::context::walk_start(&ctx.root.hpa, ctx.root_level(), f.addr)
    else {
        return PfRet::Retry;
    };
    let mut host = *host;
    loop {
        let sptep = super::rmap::spte_ptr(sp, super::spte::spte_index(f.addr, level));
        let base_gfn = gfn_round_for_level(gfn, level);
        if level == goal {
            if let Some(p) = host.pfn.as_mut() {
                *p &= !(kvm_pages_per_hpage(level) - 1);
            }
            let r = mmu_set_spte(env, sptep, access, base_gfn, &host, false, f.write);
            if r != PfRet::Spurious && level == PG_LEVEL_4K && env.mmu.invalidate_in_progress == 0 {
                direct_pte_prefetch(env, sptep);
            }
            return r;
        }
        if let Some(child) = get_child_sp(env.mmu, sptep, base_gfn, true, access, |_, _| 0) {
            env.mmu.link_shadow_page(sptep, child);
        }
        sp = env.mmu.spte(sptep).child_index();
        level -= 1;
    }
}

/// fast_page_fault: fix a write to an MMU-writable SPTE without the slow path
/// (dirty logging and write tracking leave such SPTEs), or report it spurious.
fn fast_page_fault(env: &mut MmuEnv<'_>, ctx: &KvmMmu, f: &PageFault) -> Option<PfRet> {
    // page_fault_can_be_fast: shadow paging always has A/D bits, so only present writes.
    if f.rsvd || !f.present || !f.write {
        return None;
    }
    let (step, spte) = shadow_leaf(env.mmu, &ctx.root.hpa, ctx.root_level(), f.addr)?;
    if !spte.is_shadow_present() || !spte.is_leaf(step.level) {
        return None;
    }
    if spte.is_writable() {
        env.stat(VcpuStat::PfFast);
        return Some(PfRet::Spurious);
    }
    if !spte.is_mmu_writable() {
        return None;
    }
    let gfn = env.mmu.get(step.sp).get_gfn(step.index);
    if step.level > PG_LEVEL_4K && env.slots.lookup(gfn).is_some_and(MemSlot::dirty_logging) {
        return None;
    }
    env.mmu
        .update_spte(step.sptep(), Spte(spte.0 | PT_WRITABLE));
    env.mark_page_dirty(gfn);
    env.stat(VcpuStat::PfFast);
    Some(PfRet::Fixed)
}

/// direct_pte_prefetch: map the non-present neighbours in the faulting SPTE's aligned
/// block of 8, in runs, from the page's own gfn range.
pub fn direct_pte_prefetch(env: &mut MmuEnv<'_>, sptep: SptePtr) {
    let (sp, i) = (sp_of(sptep), index_of(sptep));
    let base = i & !(PTE_PREFETCH_NUM - 1);
    let mut start = None;
    for j in base..=base + PTE_PREFETCH_NUM {
        let stop =
            j == base + PTE_PREFETCH_NUM || j == i || env.mmu.get(sp).spt[j].is_shadow_present();
        if !stop {
            start.get_or_insert(j);
            continue;
        }
        if let Some(s) = start.take() {
            if !direct_prefetch_many(env, sp, s, j) {
                return;
            }
        }
    }
}

/// direct_pte_prefetch_many: false if the run could not be mapped.
fn direct_prefetch_many(env: &mut MmuEnv<'_>, sp: SpIndex, start: usize, end: usize) -> bool {
    let access = env.mmu.get(sp).role.access();
    let gfn = env.mmu.get(sp).get_gfn(start);
    let Some(slot) = env.slots.lookup(gfn) else {
        return false;
    };
    // gfn_to_memslot_dirty_bitmap refuses logged slots for writable mappings, and
    // the atomic lookup maps writable, which a read-only slot refuses.
    if (access & ACC_WRITE != 0 && slot.dirty_logging()) || slot.readonly() {
        return false;
    }
    let n = (end - start).min((slot.end_gfn() - gfn) as usize);
    let host_base = HostPage {
        pfn: None,
        writable: true,
        dirty_log: slot.dirty_logging(),
    };
    let frames: Vec<(u64, bool)> = (0..n)
        .map(|k| slot.host.frame(slot.gfn_to_hva(gfn + k as u64)))
        .collect();
    for (k, (pfn, host_writable)) in frames.into_iter().enumerate() {
        if !host_writable {
            // gfn_to_page_many_atomic maps writable: a read-only host page ends the run.
            return true;
        }
        let host = HostPage {
            pfn: Some(pfn),
            ..host_base
        };
        mmu_set_spte(
            env,
            super::rmap::spte_ptr(sp, start + k),
            access,
            gfn + k as u64,
            &host,
            true,
            false,
        );
    }
    true
}

/// Is the root usable for faults? (FNAME(fetch)'s checks: a dummy root asks for a
/// reload, which happens on the next entry.)
pub fn root_ready(ctx: &mut KvmMmu) -> bool {
    match ctx.root.hpa {
        RootHpa::Invalid => false,
        RootHpa::Dummy => {
            ctx.req_free_obsolete = true;
            false
        }
        _ => true,
    }
}
