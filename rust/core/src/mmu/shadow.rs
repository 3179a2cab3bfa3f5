//! Shadow-page bookkeeping (mmu.c's kvm_mmu_page life cycle): the VM's arena of
//! shadow pages, the gfn hash, the active list, parent links, unsync marking, roots,
//! zapping, the page limit with reclaim, and fast zap-all.
//!
//! A shadow page is named by its arena index ([`SpIndex`]); a non-leaf SPTE holds the
//! child's index ([`Spte::nonleaf`]) and an SPTE is named by [`SptePtr`] (sp index,
//! SPTE index), which is what the rmaps and the parent lists store. A page goes
//! through KVM's states: on the active list (valid, or obsolete after a fast zap-all),
//! an invalid root still in use, on a caller's invalid list (prepared, not yet
//! committed), and freed (its index on the free list, reused by the next allocation).
//!
//! Per-memslot metadata (rmaps, write tracking, large-page disallow counts) lives here
//! too, keyed by memslot id and mirroring the slots' gfn ranges, so zapping works the
//! same before and after the memslot table changes (KVM zaps while the old slot is
//! still installed).

use std::fmt;
use std::sync::Arc;

use super::page_track::SlotTrack;
use super::rmap::{index_of, sp_of, spte_ptr, Rmap, SptePtr, RMAP_RECYCLE_THRESHOLD};
use super::role::Role;
use super::spte::{self, Spte, SPTE_ENT_PER_PAGE, SPTE_MMU_WRITABLE};
use crate::errno::Errno;
use crate::memslot::{MemSlot, MemSlots};
use crate::paging::pte::PT_WRITABLE;
use crate::stats::{StatsFile, VmStat};
use crate::vm::KVM_MIN_ALLOC_MMU_PAGES;

/// A shadow page's arena index.
pub type SpIndex = u32;

/// KVM_MMU_HASH_SHIFT: 4096 hash buckets.
pub const KVM_MMU_HASH_SHIFT: u32 = 12;
const HASH_BUCKETS: usize = 1 << KVM_MMU_HASH_SHIFT;
/// make_mmu_pages_available reclaims when fewer pages than this are left...
pub const KVM_MIN_FREE_MMU_PAGES: u64 = 5;
/// ...until this many are free.
pub const KVM_REFILL_PAGES: u64 = 25;
/// The default limit is one shadow page per this many memslot pages.
pub const KVM_MEMSLOT_PAGES_TO_MMU_PAGES_RATIO: u64 = 50;
/// KVM_PAGE_ARRAY_NR: pages gathered per unsync walk.
pub const KVM_PAGE_ARRAY_NR: usize = 16;
/// Leaves exist at levels 1 (4K), 2 (2M) and 3 (1G).
pub const KVM_MAX_HUGEPAGE_LEVEL: u8 = 3;
/// PT64_ROOT_MAX_LEVEL.
const ROOT_MAX_LEVEL: usize = 5;
/// No page (list ends, empty hash buckets, path sentinels).
pub const NIL: SpIndex = SpIndex::MAX;
/// The parent-path index of the walk's starting page (INVALID_INDEX).
const INVALID_INDEX: u16 = u16::MAX;
/// No SPTE (an empty parent list's inline slot).
const NO_SPTE: SptePtr = SptePtr::MAX;

/// kvm_page_table_hashfn: hash_64(gfn, 12), the golden-ratio multiplicative hash.
#[inline]
pub fn kvm_page_table_hashfn(gfn: u64) -> usize {
    (gfn.wrapping_mul(0x61c8_8646_80b5_83eb) >> (64 - KVM_MMU_HASH_SHIFT)) as usize
}

/// The default shadow-page limit for `total_pages` of memslots (x86.c, commit of a
/// created or deleted slot): one per 50 pages, at least KVM_MIN_ALLOC_MMU_PAGES.
pub fn default_mmu_pages(total_pages: u64) -> u64 {
    (total_pages / KVM_MEMSLOT_PAGES_TO_MMU_PAGES_RATIO).max(KVM_MIN_ALLOC_MMU_PAGES)
}

/// The pages_4k/2m/1g gauge for leaves at `level`.
fn page_stat(level: u8) -> VmStat {
    match level {
        1 => VmStat::Pages4k,
        2 => VmStat::Pages2m,
        _ => VmStat::Pages1g,
    }
}

/// Where a page is in its life cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageState {
    /// On active_mmu_pages (valid, or obsolete until zapped).
    Active,
    /// Zapped while a root: off the active list, kept (and counted in n_used) until
    /// its root_count drops to 0.
    InvalidRoot,
    /// Prepared for zapping, on a caller's invalid list until commit_zap.
    Zapped,
    /// Freed; the index is on the free list.
    Free,
}

/// The parent SPTEs linking to a page (KVM's parent_ptes pte_list): the first one
/// inline, since most pages have exactly one parent.
#[derive(Clone, Debug)]
pub struct ParentPtes {
    first: SptePtr,
    more: Vec<SptePtr>,
}

impl Default for ParentPtes {
    fn default() -> Self {
        ParentPtes {
            first: NO_SPTE,
            more: Vec::new(),
        }
    }
}

impl ParentPtes {
    pub fn is_empty(&self) -> bool {
        self.first == NO_SPTE
    }

    pub fn len(&self) -> usize {
        if self.is_empty() {
            0
        } else {
            1 + self.more.len()
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = SptePtr> + '_ {
        (!self.is_empty())
            .then_some(self.first)
            .into_iter()
            .chain(self.more.iter().copied())
    }

    pub fn contains(&self, p: SptePtr) -> bool {
        self.iter().any(|q| q == p)
    }

    /// Heap bytes beyond the inline entry.
    pub fn heap_bytes(&self) -> usize {
        self.more.capacity() * std::mem::size_of::<SptePtr>()
    }

    fn add(&mut self, p: SptePtr) {
        if self.is_empty() {
            self.first = p;
        } else {
            self.more.push(p);
        }
    }

    /// Remove `p`, moving the last entry into the hole as pte_list_remove does.
    fn remove(&mut self, p: SptePtr) -> bool {
        if self.first == p {
            self.first = self.more.pop().unwrap_or(NO_SPTE);
            return true;
        }
        match self.more.iter().position(|&q| q == p) {
            Some(i) => {
                self.more.swap_remove(i);
                true
            }
            None => false,
        }
    }

    fn first(&self) -> Option<SptePtr> {
        (!self.is_empty()).then_some(self.first)
    }
}

/// struct kvm_mmu_page.
pub struct ShadowPage {
    pub role: Role,
    /// The guest table's gfn (indirect), or the first gfn of the range (direct).
    pub gfn: u64,
    pub spt: Box<[Spte; SPTE_ENT_PER_PAGE]>,
    /// shadowed_translation: per SPTE `gfn << 12 | ACC` (pages that are not direct).
    pub shadowed: Option<Box<[u64; SPTE_ENT_PER_PAGE]>>,
    pub parent_ptes: ParentPtes,
    pub root_count: u32,
    pub unsync: bool,
    pub unsync_children: u16,
    pub unsync_child_bitmap: [u64; SPTE_ENT_PER_PAGE / 64],
    pub write_flooding_count: u8,
    pub mmu_valid_gen: u8,
    prev: SpIndex,
    next: SpIndex,
    hash_next: SpIndex,
    state: PageState,
}

impl fmt::Debug for ShadowPage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let present = self.spt.iter().filter(|s| s.is_shadow_present()).count();
        f.debug_struct("ShadowPage")
            .field("gfn", &format_args!("{:#x}", self.gfn))
            .field("role", &self.role)
            .field("state", &self.state)
            .field("present", &present)
            .field("parents", &self.parent_ptes.len())
            .field("root_count", &self.root_count)
            .field("unsync", &self.unsync)
            .field("unsync_children", &self.unsync_children)
            .field("mmu_valid_gen", &self.mmu_valid_gen)
            .finish()
    }
}

impl ShadowPage {
    fn new() -> ShadowPage {
        ShadowPage {
            role: Role::default(),
            gfn: 0,
            spt: Box::new([Spte::NONPRESENT; SPTE_ENT_PER_PAGE]),
            shadowed: None,
            parent_ptes: ParentPtes::default(),
            root_count: 0,
            unsync: false,
            unsync_children: 0,
            unsync_child_bitmap: [0; SPTE_ENT_PER_PAGE / 64],
            write_flooding_count: 0,
            mmu_valid_gen: 0,
            prev: NIL,
            next: NIL,
            hash_next: NIL,
            state: PageState::Free,
        }
    }

    pub fn state(&self) -> PageState {
        self.state
    }

    /// kvm_mmu_page_get_gfn: the gfn SPTE `index` maps (or would map).
    pub fn get_gfn(&self, index: usize) -> u64 {
        if self.role.passthrough() {
            return self.gfn;
        }
        match &self.shadowed {
            Some(t) if !self.role.direct() => t[index] >> 12,
            _ => self.gfn + ((index as u64) << (9 * (u32::from(self.role.level()) - 1))),
        }
    }

    /// kvm_mmu_page_get_access: the guest's rights for SPTE `index`.
    pub fn get_access(&self, index: usize) -> u8 {
        match &self.shadowed {
            Some(t) if self.role.has_gptes() => (t[index] & 0x7) as u8,
            _ => self.role.access(),
        }
    }

    /// kvm_mmu_page_set_translation. Direct and passthrough pages compute their
    /// translations, so only pages with gptes record them.
    fn set_translation(&mut self, index: usize, gfn: u64, access: u8) {
        if self.role.has_gptes() {
            if let Some(t) = &mut self.shadowed {
                t[index] = (gfn << 12) | u64::from(access);
                return;
            }
        }
        debug_assert_eq!(gfn, self.get_gfn(index), "gfn mismatch in a direct page");
    }

    fn test_bit(&self, i: usize) -> bool {
        self.unsync_child_bitmap[i / 64] & (1 << (i % 64)) != 0
    }
}

/// A page's unsync path from the walk's start (KVM's struct mmu_page_path): the parent
/// page at each level and the SPTE index of the child below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmuPagePath {
    parent: [SpIndex; ROOT_MAX_LEVEL],
    idx: [u16; ROOT_MAX_LEVEL],
}

impl Default for MmuPagePath {
    fn default() -> Self {
        MmuPagePath {
            parent: [NIL; ROOT_MAX_LEVEL],
            idx: [INVALID_INDEX; ROOT_MAX_LEVEL],
        }
    }
}

/// Per-memslot MMU metadata (KVM's memslot->arch): rmap + write tracking/lpage info.
pub struct SlotMeta {
    pub base_gfn: u64,
    pub npages: u64,
    pub rmap: Rmap,
    pub track: SlotTrack,
}

/// The VM's shadow MMU state (KVM's kvm->arch MMU fields).
pub struct Mmu {
    pages: Vec<ShadowPage>,
    free: Vec<SpIndex>,
    /// mmu_page_hash: bucket heads of lists through `hash_next`, newest first.
    hash: Box<[SpIndex]>,
    /// active_mmu_pages: head = newest.
    active_head: SpIndex,
    active_tail: SpIndex,
    n_used: u64,
    n_max: u64,
    n_requested: u64,
    mmu_valid_gen: u8,
    indirect_shadow_pages: u64,
    slots: Vec<Option<SlotMeta>>,
    /// (base_gfn, end_gfn, id) of `slots`, sorted by gfn.
    slot_ranges: Vec<(u64, u64, u16)>,
    free_obsolete_roots_requests: u64,
    /// The MMU-notifier protocol (kvm->mmu_invalidate_*): invalidations running,
    /// their gfn hull, and the sequence number bumped when one ends.
    pub invalidate_in_progress: u32,
    pub invalidate_range: (u64, u64),
    pub invalidate_seq: u64,
    /// The gfn ranges zapped by the running invalidations (their hull blocks faults;
    /// the audit checks these).
    pub invalidate_ranges: Vec<(u64, u64)>,
    stats: Arc<StatsFile>,
    remote_kick: Box<dyn Fn() -> bool + Send + Sync>,
}

impl fmt::Debug for Mmu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mmu")
            .field("n_used", &self.n_used)
            .field("n_max", &self.n_max)
            .field("n_requested", &self.n_requested)
            .field("mmu_valid_gen", &self.mmu_valid_gen)
            .field("arena", &self.pages.len())
            .field("free", &self.free.len())
            .field("slots", &self.slot_ranges.len())
            .finish()
    }
}

impl Mmu {
    /// An empty MMU. Like KVM, the limit is 0 until the first memslot sets the default.
    pub fn new(stats: Arc<StatsFile>) -> Mmu {
        Mmu {
            pages: Vec::new(),
            free: Vec::new(),
            hash: vec![NIL; HASH_BUCKETS].into_boxed_slice(),
            active_head: NIL,
            active_tail: NIL,
            n_used: 0,
            n_max: 0,
            n_requested: 0,
            mmu_valid_gen: 0,
            indirect_shadow_pages: 0,
            slots: Vec::new(),
            slot_ranges: Vec::new(),
            free_obsolete_roots_requests: 0,
            invalidate_in_progress: 0,
            invalidate_range: (0, 0),
            invalidate_seq: 0,
            invalidate_ranges: Vec::new(),
            stats,
            remote_kick: Box::new(|| false),
        }
    }

    pub fn stats(&self) -> &Arc<StatsFile> {
        &self.stats
    }

    #[inline]
    fn stat_add(&self, s: VmStat, n: u64) {
        self.stats.add(s as usize, n);
    }

    #[inline]
    fn stat_sub(&self, s: VmStat, n: u64) {
        self.stats.sub(s as usize, n);
    }

    /// Tell the MMU whether a remote flush had to kick another vCPU out of guest mode
    /// (kvm_make_all_cpus_request's result). Without it no vCPU is running elsewhere,
    /// as for a VM driven by one thread.
    pub fn set_remote_kick(&mut self, kick: impl Fn() -> bool + Send + Sync + 'static) {
        self.remote_kick = Box::new(kick);
    }

    /// kvm_flush_remote_tlbs: every call is a request (and a KVM_REQ_TLB_FLUSH for each
    /// vCPU, which the vCPUs see in remote_tlb_flush_requests); remote_tlb_flush counts
    /// only flushes that had to interrupt a vCPU in guest mode.
    pub fn flush_remote_tlbs(&self) {
        self.stat_add(VmStat::RemoteTlbFlushRequests, 1);
        if (self.remote_kick)() {
            self.stat_add(VmStat::RemoteTlbFlush, 1);
        }
    }

    /// Bytes of model metadata the MMU holds now: the shadow-page arena (SPTE pages,
    /// shadowed translations, bookkeeping), the hash, and per-memslot rmaps and
    /// tracking. Cost follows what is mapped, not the size of guest memory.
    pub fn memory_bytes(&self) -> usize {
        let page =
            std::mem::size_of::<ShadowPage>() + std::mem::size_of::<[Spte; SPTE_ENT_PER_PAGE]>();
        let arena: usize = self
            .pages
            .iter()
            .map(|sp| {
                page + sp.shadowed.as_ref().map_or(0, |_| 8 * SPTE_ENT_PER_PAGE)
                    + sp.parent_ptes.heap_bytes()
            })
            .sum();
        let slots: usize = self
            .slots
            .iter()
            .flatten()
            .map(|m| m.rmap.memory_bytes() + m.track.memory_bytes())
            .sum();
        std::mem::size_of::<Self>()
            + arena
            + self.free.capacity() * 4
            + self.hash.len() * 4
            + slots
            + self.slot_ranges.capacity() * std::mem::size_of::<(u64, u64, u16)>()
    }

    pub fn n_used(&self) -> u64 {
        self.n_used
    }

    pub fn n_max(&self) -> u64 {
        self.n_max
    }

    pub fn n_requested(&self) -> u64 {
        self.n_requested
    }

    pub fn mmu_valid_gen(&self) -> u8 {
        self.mmu_valid_gen
    }

    /// Live pages that shadow guest tables (writes to guest memory must be checked).
    pub fn indirect_shadow_pages(&self) -> u64 {
        self.indirect_shadow_pages
    }

    /// How many times KVM_REQ_MMU_FREE_OBSOLETE_ROOTS went to all vCPUs: a vCPU that
    /// saw a smaller number must drop its obsolete roots.
    pub fn free_obsolete_roots_requests(&self) -> u64 {
        self.free_obsolete_roots_requests
    }

    // ---- memslot metadata ----

    fn slot_id(&self, gfn: u64) -> Option<usize> {
        let i = self.slot_ranges.partition_point(|r| r.1 <= gfn);
        let &(base, _, id) = self.slot_ranges.get(i)?;
        (gfn >= base).then_some(id as usize)
    }

    /// The metadata of the memslot holding `gfn`.
    pub fn slot_meta_for_gfn(&self, gfn: u64) -> Option<&SlotMeta> {
        self.slot_id(gfn).and_then(|id| self.slots[id].as_ref())
    }

    pub fn slot_meta(&self, id: u16) -> Option<&SlotMeta> {
        self.slots.get(id as usize).and_then(Option::as_ref)
    }

    pub fn slot_meta_mut(&mut self, id: u16) -> Option<&mut SlotMeta> {
        self.slots.get_mut(id as usize).and_then(Option::as_mut)
    }

    fn total_slot_pages(&self) -> u64 {
        self.slots.iter().flatten().map(|m| m.npages).sum()
    }

    fn add_slot_meta(&mut self, slot: &MemSlot) {
        let id = slot.id as usize;
        if self.slots.len() <= id {
            self.slots.resize_with(id + 1, || None);
        }
        debug_assert!(self.slots[id].is_none(), "slot {id} created twice");
        self.slots[id] = Some(SlotMeta {
            base_gfn: slot.base_gfn,
            npages: slot.npages,
            rmap: Rmap::new(slot.base_gfn, slot.npages),
            track: SlotTrack::new(slot.base_gfn, slot.npages, slot.userspace_addr),
        });
        let i = self.slot_ranges.partition_point(|r| r.0 < slot.base_gfn);
        self.slot_ranges
            .insert(i, (slot.base_gfn, slot.end_gfn(), slot.id));
    }

    fn remove_slot_meta(&mut self, id: u16) {
        if let Some(m) = self.slots.get_mut(id as usize).and_then(Option::take) {
            debug_assert!(m.rmap.is_empty(), "slot {id} freed with rmaps");
        }
        self.slot_ranges.retain(|r| r.2 != id);
    }

    /// KVM_MR_CREATE: allocate the slot's metadata (kvm_alloc_memslot_metadata), then
    /// recompute the default limit.
    pub fn slot_created(&mut self, slot: &MemSlot) {
        self.add_slot_meta(slot);
        self.update_default_limit(self.total_slot_pages());
    }

    /// KVM_MR_DELETE: zap everything first (kvm_arch_flush_shadow_memslot), free the
    /// metadata, recompute the default limit.
    pub fn slot_deleted(&mut self, slot: &MemSlot) {
        self.zap_all_fast();
        self.remove_slot_meta(slot.id);
        self.update_default_limit(self.total_slot_pages());
    }

    /// KVM_MR_MOVE: zap everything, then the slot gets new metadata at its new place.
    pub fn slot_moved(&mut self, old: &MemSlot, new: &MemSlot) {
        self.zap_all_fast();
        self.remove_slot_meta(old.id);
        self.add_slot_meta(new);
    }

    // ---- limit ----

    /// After a memslot was created or deleted, without a KVM_SET_NR_MMU_PAGES limit.
    pub fn update_default_limit(&mut self, total_pages: u64) {
        if self.n_requested == 0 {
            self.change_mmu_pages(default_mmu_pages(total_pages));
        }
    }

    /// KVM_SET_NR_MMU_PAGES (kvm_vm_ioctl_set_nr_mmu_pages).
    pub fn set_nr_mmu_pages(&mut self, n: u64) -> Result<(), Errno> {
        if n < KVM_MIN_ALLOC_MMU_PAGES {
            return Err(Errno::EINVAL);
        }
        self.change_mmu_pages(n);
        self.n_requested = n;
        Ok(())
    }

    /// kvm_mmu_change_mmu_pages: shrinking below the pages in use zaps the oldest; if
    /// roots keep it above the goal, the limit stays at what is in use.
    pub fn change_mmu_pages(&mut self, mut goal: u64) {
        if self.n_used > goal {
            self.zap_oldest(self.n_used - goal);
            goal = self.n_used;
        }
        self.n_max = goal;
    }

    /// kvm_mmu_available_pages.
    pub fn available_pages(&self) -> u64 {
        self.n_max.saturating_sub(self.n_used)
    }

    /// make_mmu_pages_available, before a fault or root allocation. Soft: it only
    /// promises one free page, while the caller may take up to four or five.
    pub fn make_mmu_pages_available(&mut self) -> Result<(), Errno> {
        let avail = self.available_pages();
        if avail >= KVM_MIN_FREE_MMU_PAGES {
            return Ok(());
        }
        self.zap_oldest(KVM_REFILL_PAGES - avail);
        if self.available_pages() == 0 {
            return Err(Errno::ENOSPC);
        }
        Ok(())
    }

    /// kvm_mmu_zap_oldest_mmu_pages: zap from the tail of the active list (oldest
    /// first; lookups do not move pages, so this is FIFO), skipping roots in use,
    /// until `nr_to_zap` pages went to the invalid list. Returns that count.
    pub fn zap_oldest(&mut self, nr_to_zap: u64) -> usize {
        if self.active_head == NIL {
            return 0;
        }
        let mut invalid_list = Vec::new();
        let mut total = 0usize;
        'restart: loop {
            let mut sp = self.active_tail;
            while sp != NIL {
                let prev = self.pages[sp as usize].prev;
                if self.pages[sp as usize].root_count != 0 {
                    sp = prev;
                    continue;
                }
                let (unstable, nr) = self.prepare_zap_page(sp, &mut invalid_list);
                total += nr;
                if total as u64 >= nr_to_zap {
                    break 'restart;
                }
                // Zapped children may include `prev`: walk again from the tail.
                if unstable {
                    continue 'restart;
                }
                sp = prev;
            }
            break;
        }
        self.commit_zap(&mut invalid_list);
        self.stat_add(VmStat::MmuRecycled, total as u64);
        total
    }

    /// Memory pressure on the host (mmu.txt's shrinker event): zap up to `nr` of the
    /// oldest pages, as mmu_shrink_scan did before Linux 6.8 (today's kernels only
    /// free the pages cached for future faults, which the model does not keep).
    pub fn shrink(&mut self, nr: u64) -> usize {
        self.zap_oldest(nr)
    }

    // ---- pages ----

    pub fn get(&self, idx: SpIndex) -> &ShadowPage {
        &self.pages[idx as usize]
    }

    pub fn get_mut(&mut self, idx: SpIndex) -> &mut ShadowPage {
        &mut self.pages[idx as usize]
    }

    /// The SPTE `p` names.
    pub fn spte(&self, p: SptePtr) -> Spte {
        self.pages[sp_of(p) as usize].spt[index_of(p)]
    }

    /// Every page that is not freed, in arena order.
    pub fn iter(&self) -> impl Iterator<Item = (SpIndex, &ShadowPage)> + '_ {
        self.pages
            .iter()
            .enumerate()
            .filter(|(_, sp)| sp.state != PageState::Free)
            .map(|(i, sp)| (i as SpIndex, sp))
    }

    /// active_mmu_pages from the newest to the oldest.
    pub fn active_pages(&self) -> impl Iterator<Item = SpIndex> + '_ {
        let mut sp = self.active_head;
        std::iter::from_fn(move || {
            (sp != NIL).then(|| {
                let cur = sp;
                sp = self.pages[cur as usize].next;
                cur
            })
        })
    }

    /// is_obsolete_sp: invalid, or from before the last fast zap-all.
    pub fn is_obsolete(&self, idx: SpIndex) -> bool {
        let sp = &self.pages[idx as usize];
        sp.role.invalid() || sp.mmu_valid_gen != self.mmu_valid_gen
    }

    /// The hash bucket of `gfn`, newest first.
    fn bucket(&self, gfn: u64) -> impl Iterator<Item = SpIndex> + '_ {
        let mut sp = self.hash[kvm_page_table_hashfn(gfn)];
        std::iter::from_fn(move || {
            (sp != NIL).then(|| {
                let cur = sp;
                sp = self.pages[cur as usize].hash_next;
                cur
            })
        })
    }

    /// for_each_gfn_valid_sp_with_gptes: the non-obsolete pages shadowing guest table
    /// `gfn`, in hash order.
    pub fn gfn_sps_with_gptes(&self, gfn: u64) -> Vec<SpIndex> {
        self.bucket(gfn)
            .filter(|&i| {
                let sp = &self.pages[i as usize];
                !self.is_obsolete(i) && sp.gfn == gfn && sp.role.has_gptes()
            })
            .collect()
    }

    /// kvm_mmu_find_shadow_page for a caller that syncs nothing (direct roles, tests).
    pub fn find_shadow_page(&mut self, gfn: u64, role: Role) -> Option<SpIndex> {
        self.find_shadow_page_with(gfn, role, |_, _| 0)
    }

    /// kvm_mmu_find_shadow_page: a non-obsolete page with this gfn and role word. On
    /// the way, unsync pages of the gfn with another role are zapped when `role` is an
    /// upper level (the guest reuses the page as a directory). A matching unsync page
    /// is synced with `sync` (__kvm_sync_page: < 0 failed, so it is zapped and this is
    /// a miss; > 0 needs a remote flush). A miss counts mmu_cache_miss; other gfns
    /// met in the bucket feed max_mmu_page_hash_collisions.
    pub fn find_shadow_page_with(
        &mut self,
        gfn: u64,
        role: Role,
        sync: impl FnOnce(&mut Mmu, SpIndex) -> i32,
    ) -> Option<SpIndex> {
        let mut invalid_list = Vec::new();
        let mut collisions = 0u64;
        let mut found = None;
        // Prepared zaps leave the hash alone (pages leave it when freed), so the
        // bucket can be followed while zapping.
        let mut cur = self.hash[kvm_page_table_hashfn(gfn)];
        let mut sync = Some(sync);
        while cur != NIL {
            let i = cur;
            cur = self.pages[i as usize].hash_next;
            if self.is_obsolete(i) {
                continue;
            }
            let sp = &self.pages[i as usize];
            if sp.gfn != gfn {
                collisions += 1;
                continue;
            }
            if sp.role != role {
                if role.level() > 1 && sp.unsync {
                    self.prepare_zap(i, &mut invalid_list);
                }
                continue;
            }
            if sp.role.direct() {
                found = Some(i);
                break;
            }
            if sp.unsync {
                let ret = (sync.take().expect("one match per lookup"))(self, i);
                if ret < 0 {
                    self.prepare_zap(i, &mut invalid_list);
                    break;
                }
                if ret > 0 {
                    self.flush_remote_tlbs();
                }
            }
            self.pages[i as usize].write_flooding_count = 0;
            found = Some(i);
            break;
        }
        if found.is_none() {
            self.stat_add(VmStat::MmuCacheMiss, 1);
        }
        self.commit_zap(&mut invalid_list);
        self.stats
            .max(VmStat::MaxMmuPageHashCollisions as usize, collisions);
        found
    }

    /// kvm_mmu_alloc_shadow_page: a new page at the head of the active list and of its
    /// hash bucket, counted in n_used; a page with gptes write-protects its guest table
    /// (account_shadowed). A gfn outside every memslot is tracked nowhere.
    pub fn alloc_shadow_page(&mut self, gfn: u64, role: Role) -> SpIndex {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.pages.push(ShadowPage::new());
                (self.pages.len() - 1) as SpIndex
            }
        };
        let gen = self.mmu_valid_gen;
        let sp = &mut self.pages[idx as usize];
        debug_assert_eq!(sp.state, PageState::Free);
        sp.spt.fill(Spte::NONPRESENT);
        if role.direct() {
            sp.shadowed = None;
        } else {
            match &mut sp.shadowed {
                Some(t) => t.fill(0),
                None => sp.shadowed = Some(Box::new([0; SPTE_ENT_PER_PAGE])),
            }
        }
        sp.parent_ptes = ParentPtes::default();
        sp.root_count = 0;
        sp.unsync = false;
        sp.unsync_children = 0;
        sp.unsync_child_bitmap = [0; SPTE_ENT_PER_PAGE / 64];
        sp.write_flooding_count = 0;
        sp.mmu_valid_gen = gen;
        sp.gfn = gfn;
        sp.role = role;
        sp.state = PageState::Active;
        self.list_add_head(idx);
        self.n_used += 1;
        let bucket = kvm_page_table_hashfn(gfn);
        self.pages[idx as usize].hash_next = self.hash[bucket];
        self.hash[bucket] = idx;
        if role.has_gptes() {
            self.account_shadowed(idx);
        }
        idx
    }

    /// __kvm_mmu_get_shadow_page: find, else allocate. Returns (page, created).
    pub fn get_shadow_page(
        &mut self,
        gfn: u64,
        role: Role,
        sync: impl FnOnce(&mut Mmu, SpIndex) -> i32,
    ) -> (SpIndex, bool) {
        match self.find_shadow_page_with(gfn, role, sync) {
            Some(i) => (i, false),
            None => (self.alloc_shadow_page(gfn, role), true),
        }
    }

    fn list_add_head(&mut self, idx: SpIndex) {
        let head = self.active_head;
        let sp = &mut self.pages[idx as usize];
        sp.prev = NIL;
        sp.next = head;
        if head != NIL {
            self.pages[head as usize].prev = idx;
        } else {
            self.active_tail = idx;
        }
        self.active_head = idx;
    }

    fn list_del(&mut self, idx: SpIndex) {
        let (prev, next) = {
            let sp = &self.pages[idx as usize];
            (sp.prev, sp.next)
        };
        if prev != NIL {
            self.pages[prev as usize].next = next;
        } else {
            self.active_head = next;
        }
        if next != NIL {
            self.pages[next as usize].prev = prev;
        } else {
            self.active_tail = prev;
        }
        let sp = &mut self.pages[idx as usize];
        sp.prev = NIL;
        sp.next = NIL;
    }

    fn hash_del(&mut self, idx: SpIndex) {
        let bucket = kvm_page_table_hashfn(self.pages[idx as usize].gfn);
        let next = self.pages[idx as usize].hash_next;
        if self.hash[bucket] == idx {
            self.hash[bucket] = next;
        } else {
            let mut cur = self.hash[bucket];
            while cur != NIL {
                let n = self.pages[cur as usize].hash_next;
                if n == idx {
                    self.pages[cur as usize].hash_next = next;
                    break;
                }
                cur = n;
            }
        }
        self.pages[idx as usize].hash_next = NIL;
    }

    // ---- write tracking ----

    /// account_shadowed: upper levels write-track their table (the fault path never
    /// maps it writable); level 1 only blocks huge pages over it and write-protects
    /// its current mappings, because it may go unsync.
    fn account_shadowed(&mut self, idx: SpIndex) {
        self.indirect_shadow_pages += 1;
        let sp = &self.pages[idx as usize];
        let (gfn, level) = (sp.gfn, sp.role.level());
        let Some(id) = self.slot_id(gfn) else {
            return;
        };
        if level > 1 {
            self.write_track_add_gfn(gfn);
            return;
        }
        if let Some(m) = self.slots[id].as_mut() {
            m.track.disallow_lpage(gfn);
        }
        if self.write_protect_gfn(gfn, 1) {
            self.flush_remote_tlbs();
        }
    }

    fn unaccount_shadowed(&mut self, idx: SpIndex) {
        self.indirect_shadow_pages -= 1;
        let sp = &self.pages[idx as usize];
        let (gfn, level) = (sp.gfn, sp.role.level());
        if level > 1 {
            self.write_track_remove_gfn(gfn);
        } else if let Some(id) = self.slot_id(gfn) {
            if let Some(m) = self.slots[id].as_mut() {
                m.track.allow_lpage(gfn);
            }
        }
    }

    /// __kvm_write_track_add_gfn: count the tracker, forbid huge pages over the gfn and
    /// write-protect its mappings at every level (flushing if any was writable).
    pub fn write_track_add_gfn(&mut self, gfn: u64) {
        let Some(id) = self.slot_id(gfn) else {
            return;
        };
        if let Some(m) = self.slots[id].as_mut() {
            // Counts the tracker and disallows huge pages over the gfn.
            m.track.add_write_track(gfn);
        }
        if self.write_protect_gfn(gfn, 1) {
            self.flush_remote_tlbs();
        }
    }

    /// __kvm_write_track_remove_gfn.
    pub fn write_track_remove_gfn(&mut self, gfn: u64) {
        let Some(id) = self.slot_id(gfn) else {
            return;
        };
        if let Some(m) = self.slots[id].as_mut() {
            m.track.remove_write_track(gfn);
        }
    }

    /// kvm_gfn_is_write_tracked.
    pub fn gfn_is_write_tracked(&self, gfn: u64) -> bool {
        self.slot_meta_for_gfn(gfn)
            .is_some_and(|m| m.track.is_write_tracked(gfn))
    }

    /// kvm_mmu_slot_gfn_write_protect with page-table protection: clear W and
    /// MMU-writable on every leaf mapping `gfn` at `min_level` and above. Returns
    /// whether a TLB flush is needed (some leaf was MMU-writable).
    pub fn write_protect_gfn(&mut self, gfn: u64, min_level: u8) -> bool {
        let Some(id) = self.slot_id(gfn) else {
            return false;
        };
        let Some(meta) = self.slots[id].as_ref() else {
            return false;
        };
        let mut flush = false;
        for level in min_level..=KVM_MAX_HUGEPAGE_LEVEL {
            for p in meta.rmap.iter(gfn, level) {
                let s = &mut self.pages[sp_of(p) as usize].spt[index_of(p)];
                // spte_write_protect: nothing to do unless W or MMU-writable is set.
                if !s.is_writable() && !s.is_mmu_writable() {
                    continue;
                }
                flush |= s.is_mmu_writable();
                *s = Spte(s.0 & !(PT_WRITABLE | SPTE_MMU_WRITABLE));
            }
        }
        flush
    }

    /// mmu_try_to_unsync_pages, as make_spte's callback: true refuses the write (the
    /// gfn is write-tracked, or a page would have to go unsync while syncing or for a
    /// prefetch); otherwise every in-sync page of the gfn goes unsync.
    pub fn try_to_unsync_pages(&mut self, gfn: u64, can_unsync: bool, prefetch: bool) -> bool {
        if self.gfn_is_write_tracked(gfn) {
            return true;
        }
        // for_each_gfn_valid_sp_with_gptes, without collecting: unsyncing a page does
        // not change the bucket.
        let mut cur = self.hash[kvm_page_table_hashfn(gfn)];
        while cur != NIL {
            let i = cur;
            cur = self.pages[i as usize].hash_next;
            let sp = &self.pages[i as usize];
            if sp.gfn != gfn || !sp.role.has_gptes() || self.is_obsolete(i) {
                continue;
            }
            if !can_unsync {
                return true;
            }
            if sp.unsync {
                continue;
            }
            if prefetch {
                return true;
            }
            debug_assert_eq!(sp.role.level(), 1);
            self.unsync_page(i);
        }
        false
    }

    // ---- SPTEs ----

    /// __link_shadow_page: point `parent` at `child`. A huge leaf there is dropped
    /// first (with a flush); if the child is unsync or has unsync children, the
    /// parents learn it (mark_unsync).
    pub fn link_shadow_page(&mut self, parent: SptePtr, child: SpIndex) {
        let old = self.spte(parent);
        if old.is_shadow_present() {
            debug_assert!(old.is_large(), "linking over a non-leaf SPTE");
            self.drop_spte(parent);
            self.flush_remote_tlbs();
        }
        self.pages[sp_of(parent) as usize].spt[index_of(parent)] = Spte::nonleaf(child);
        let c = &mut self.pages[child as usize];
        c.parent_ptes.add(parent);
        if c.unsync_children != 0 || c.unsync {
            self.mark_unsync(parent);
        }
    }

    /// Install leaf `spte` for `gfn` with the guest rights `access`: [`Mmu::set_leaf_with`]
    /// for an SPTE made beforehand (its frame decides what is dropped).
    pub fn set_leaf(&mut self, sptep: SptePtr, spte: Spte, gfn: u64, access: u8) -> bool {
        self.set_leaf_with(sptep, spte.pfn(), gfn, access, |_, _| spte)
    }

    /// mmu_set_spte's bookkeeping for a leaf mapping frame `pfn` as `gfn` with the guest
    /// rights `access`. A link, or a leaf to another frame, is dropped first (flush);
    /// then `make` builds the SPTE from the old value as it is *now* (make_spte's
    /// old_spte: only a leaf to the same frame survives, so only then can make_spte
    /// skip mmu_try_to_unsync_pages) and may unsync pages through the `&mut Mmu`. The
    /// same frame is updated in place (flush if that removes MMU-writable, A or D; only
    /// the access is recorded anew, as in KVM); a new leaf goes into the rmap of its
    /// gfn and level (pages_*, max_mmu_rmap_size, and the whole rmap is zapped past
    /// RMAP_RECYCLE_THRESHOLD). Returns whether the SPTE changed (false: spurious).
    pub fn set_leaf_with(
        &mut self,
        sptep: SptePtr,
        pfn: u64,
        gfn: u64,
        access: u8,
        make: impl FnOnce(&mut Mmu, Spte) -> Spte,
    ) -> bool {
        let (sp, i) = (sp_of(sptep) as usize, index_of(sptep));
        let level = self.pages[sp].role.level();
        let old = self.pages[sp].spt[i];
        let mut flush = false;
        let mut was_rmapped = false;
        if old.is_shadow_present() {
            if level > 1 && !old.is_large() {
                self.drop_parent_pte(old.child_index(), sptep);
                flush = true;
            } else if old.pfn() != pfn {
                self.drop_spte(sptep);
                flush = true;
            } else {
                was_rmapped = true;
            }
        }
        let cur = self.pages[sp].spt[i];
        let spte = make(self, cur);
        debug_assert!(spte.is_shadow_present() && spte.is_leaf(level) && spte.pfn() == pfn);
        let changed = cur != spte;
        if changed {
            flush |= mmu_spte_update(&mut self.pages[sp].spt[i], spte);
        }
        if flush {
            self.flush_remote_tlbs();
        }
        if was_rmapped {
            // kvm_mmu_page_set_access: the rmap stays filed under the recorded gfn.
            let recorded = self.pages[sp].get_gfn(i);
            self.pages[sp].set_translation(i, recorded, access);
        } else {
            self.rmap_add(sptep, gfn, access);
        }
        changed
    }

    /// mmu_spte_update on a leaf that stays mapped (same frame): returns whether a TLB
    /// flush is needed (MMU-writable, A or D lost).
    pub fn update_spte(&mut self, sptep: SptePtr, new: Spte) -> bool {
        mmu_spte_update(
            &mut self.pages[sp_of(sptep) as usize].spt[index_of(sptep)],
            new,
        )
    }

    /// kvm_mmu_page_set_access: record new guest rights for a mapped SPTE.
    pub fn set_access(&mut self, sptep: SptePtr, access: u8) {
        let sp = &mut self.pages[sp_of(sptep) as usize];
        let i = index_of(sptep);
        let gfn = sp.get_gfn(i);
        sp.set_translation(i, gfn, access);
    }

    /// mmu_spte_clear_no_track on an MMIO SPTE.
    pub fn clear_mmio_spte(&mut self, sptep: SptePtr) {
        let s = &mut self.pages[sp_of(sptep) as usize].spt[index_of(sptep)];
        debug_assert!(s.is_mmio());
        *s = Spte::NONPRESENT;
    }

    /// Set A in a present leaf, as the CPU does when it uses the translation.
    pub fn mark_accessed(&mut self, sptep: SptePtr) {
        let s = &mut self.pages[sp_of(sptep) as usize].spt[index_of(sptep)];
        debug_assert!(s.is_shadow_present());
        s.0 |= crate::paging::pte::PT_ACCESSED;
    }

    /// mark_mmio_spte: an MMIO SPTE goes into an empty entry, without rmap or stats.
    pub fn set_mmio_spte(&mut self, sptep: SptePtr, spte: Spte) {
        debug_assert!(spte.is_mmio());
        if self.spte(sptep).is_shadow_present() {
            debug_assert!(false, "MMIO SPTE over a present one");
            self.zap_spte(sptep);
        }
        self.pages[sp_of(sptep) as usize].spt[index_of(sptep)] = spte;
    }

    /// __rmap_add.
    fn rmap_add(&mut self, sptep: SptePtr, gfn: u64, access: u8) {
        let (sp, i) = (sp_of(sptep) as usize, index_of(sptep));
        self.pages[sp].set_translation(i, gfn, access);
        let level = self.pages[sp].role.level();
        self.stat_add(page_stat(level), 1);
        let Some(id) = self.slot_id(gfn) else {
            debug_assert!(false, "leaf for gfn {gfn:#x} outside every memslot");
            return;
        };
        let Some(meta) = self.slots[id].as_mut() else {
            return;
        };
        // pte_list_add's count: the entries before this one.
        let count = meta.rmap.add(gfn, level, sptep) - 1;
        // A first mapping (the common case) cannot raise the maximum.
        if count > 0 {
            self.stats
                .max(VmStat::MaxMmuRmapSize as usize, count as u64);
        }
        if count > RMAP_RECYCLE_THRESHOLD {
            // kvm_zap_all_rmap_sptes, the new SPTE included: the guest refaults.
            for p in meta.rmap.take(gfn, level) {
                let s = &mut self.pages[sp_of(p) as usize].spt[index_of(p)];
                if s.is_shadow_present() {
                    *s = Spte::NONPRESENT;
                    self.stats.sub(page_stat(level) as usize, 1);
                }
            }
            self.flush_remote_tlbs();
        }
    }

    /// mmu_spte_clear_track_bits: empty the entry; a present leaf leaves pages_*.
    fn clear_track_bits(&mut self, sptep: SptePtr) -> Spte {
        let sp = &mut self.pages[sp_of(sptep) as usize];
        let level = sp.role.level();
        let old = std::mem::replace(&mut sp.spt[index_of(sptep)], Spte::NONPRESENT);
        if old.is_shadow_present() {
            self.stat_sub(page_stat(level), 1);
        }
        old
    }

    /// drop_spte: clear a leaf and take it out of its rmap.
    pub fn drop_spte(&mut self, sptep: SptePtr) {
        let old = self.clear_track_bits(sptep);
        if !old.is_shadow_present() {
            return;
        }
        let sp = &self.pages[sp_of(sptep) as usize];
        let (gfn, level) = (sp.get_gfn(index_of(sptep)), sp.role.level());
        if let Some(id) = self.slot_id(gfn) {
            if let Some(m) = self.slots[id].as_mut() {
                let removed = m.rmap.remove(gfn, level, sptep);
                debug_assert!(removed, "leaf {sptep:#x} missing from its rmap");
            }
        }
    }

    /// drop_parent_pte: unlink `child` from parent SPTE `sptep` and clear it.
    pub fn drop_parent_pte(&mut self, child: SpIndex, sptep: SptePtr) {
        let removed = self.pages[child as usize].parent_ptes.remove(sptep);
        debug_assert!(removed, "{sptep:#x} is not a parent of page {child}");
        self.pages[sp_of(sptep) as usize].spt[index_of(sptep)] = Spte::NONPRESENT;
    }

    /// mmu_page_zap_pte: drop a leaf, unlink a child page (which stays, parentless,
    /// until reclaimed or reused), or clear an MMIO SPTE. Returns whether the SPTE
    /// was shadow-present (the caller then owes a TLB flush).
    pub fn zap_spte(&mut self, sptep: SptePtr) -> bool {
        let (sp, i) = (sp_of(sptep) as usize, index_of(sptep));
        let s = self.pages[sp].spt[i];
        let level = self.pages[sp].role.level();
        if s.is_shadow_present() {
            if s.is_leaf(level) {
                self.drop_spte(sptep);
            } else {
                self.drop_parent_pte(s.child_index(), sptep);
            }
            true
        } else {
            if s.is_mmio() {
                self.pages[sp].spt[i] = Spte::NONPRESENT;
            }
            false
        }
    }

    // ---- unsync ----

    /// kvm_unsync_page: the guest may now write the table behind this level-1 page
    /// without KVM noticing until it flushes its TLB.
    pub fn unsync_page(&mut self, idx: SpIndex) {
        debug_assert_eq!(self.pages[idx as usize].role.level(), 1);
        debug_assert!(!self.pages[idx as usize].unsync);
        self.stat_add(VmStat::MmuUnsync, 1);
        self.pages[idx as usize].unsync = true;
        self.mark_parents_unsync(idx);
    }

    /// kvm_unlink_unsync_page: the page is in sync again. Its parents' bits are left to
    /// the unsync walk ([`Mmu::clear_parents`], or cleaned as stale).
    pub fn unlink_unsync_page(&mut self, idx: SpIndex) {
        debug_assert!(self.pages[idx as usize].unsync);
        self.pages[idx as usize].unsync = false;
        self.stat_sub(VmStat::MmuUnsync, 1);
    }

    /// kvm_mmu_mark_parents_unsync.
    fn mark_parents_unsync(&mut self, idx: SpIndex) {
        let parents: Vec<SptePtr> = self.pages[idx as usize].parent_ptes.iter().collect();
        for p in parents {
            self.mark_unsync(p);
        }
    }

    /// mark_unsync: set the child's bit in the page holding `sptep`; a page that just
    /// got its first unsync child tells its own parents.
    fn mark_unsync(&mut self, sptep: SptePtr) {
        let (sp, i) = (sp_of(sptep) as usize, index_of(sptep));
        let page = &mut self.pages[sp];
        let (w, b) = (i / 64, 1u64 << (i % 64));
        if page.unsync_child_bitmap[w] & b != 0 {
            return;
        }
        page.unsync_child_bitmap[w] |= b;
        page.unsync_children += 1;
        if page.unsync_children > 1 {
            return;
        }
        self.mark_parents_unsync(sp as SpIndex);
    }

    /// clear_unsync_child_bit.
    fn clear_unsync_child_bit(&mut self, sp: SpIndex, i: usize) {
        let page = &mut self.pages[sp as usize];
        debug_assert!(page.test_bit(i), "clearing a clear unsync bit");
        page.unsync_children = page.unsync_children.wrapping_sub(1);
        page.unsync_child_bitmap[i / 64] &= !(1 << (i % 64));
    }

    /// mmu_pages_add: true once the batch is full. Unsync pages are added once.
    fn mmu_pages_add(&self, pvec: &mut Vec<(SpIndex, u16)>, sp: SpIndex, idx: u16) -> bool {
        if self.pages[sp as usize].unsync && pvec.iter().any(|&(s, _)| s == sp) {
            return false;
        }
        pvec.push((sp, idx));
        pvec.len() == KVM_PAGE_ARRAY_NR
    }

    /// __mmu_unsync_walk: gather unsync pages below `sp`, clearing stale bits. Returns
    /// the unsync leaves found, or -1 when the batch filled up (-ENOSPC).
    fn __unsync_walk(&mut self, sp: SpIndex, pvec: &mut Vec<(SpIndex, u16)>) -> isize {
        let mut nr_unsync_leaf = 0;
        for w in 0..SPTE_ENT_PER_PAGE / 64 {
            // Only the current bit changes below, and only in `sp`.
            let mut bits = self.pages[sp as usize].unsync_child_bitmap[w];
            while bits != 0 {
                let i = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let ent = self.pages[sp as usize].spt[i];
                if !ent.is_shadow_present() || ent.is_large() {
                    self.clear_unsync_child_bit(sp, i);
                    continue;
                }
                let child = ent.child_index();
                let c = &self.pages[child as usize];
                if c.unsync_children != 0 {
                    if self.mmu_pages_add(pvec, child, i as u16) {
                        return -1;
                    }
                    let ret = self.__unsync_walk(child, pvec);
                    if ret == 0 {
                        self.clear_unsync_child_bit(sp, i);
                    } else if ret > 0 {
                        nr_unsync_leaf += ret;
                    } else {
                        return ret;
                    }
                } else if c.unsync {
                    nr_unsync_leaf += 1;
                    if self.mmu_pages_add(pvec, child, i as u16) {
                        return -1;
                    }
                } else {
                    self.clear_unsync_child_bit(sp, i);
                }
            }
        }
        nr_unsync_leaf
    }

    /// mmu_pages_next: advance to the next unsync leaf, recording the parents passed.
    fn mmu_pages_next(&self, pvec: &[(SpIndex, u16)], path: &mut MmuPagePath, i: usize) -> usize {
        let mut n = i + 1;
        while n < pvec.len() {
            let (sp, idx) = pvec[n];
            let level = self.pages[sp as usize].role.level() as usize;
            path.idx[level - 1] = idx;
            if level == 1 {
                break;
            }
            path.parent[level - 2] = sp;
            n += 1;
        }
        n
    }

    /// One mmu_unsync_walk batch below `parent` (at most 16 pages gathered), expanded
    /// as for_each_sp: the unsync level-1 pages with their parent paths, into `out`.
    /// Returns false when the walk found nothing (the `while` of mmu_sync_children).
    pub fn unsync_walk(&mut self, parent: SpIndex, out: &mut Vec<(SpIndex, MmuPagePath)>) -> bool {
        out.clear();
        if self.pages[parent as usize].unsync_children == 0 {
            return false;
        }
        let mut pvec = Vec::with_capacity(KVM_PAGE_ARRAY_NR);
        self.mmu_pages_add(&mut pvec, parent, INVALID_INDEX);
        let ret = self.__unsync_walk(parent, &mut pvec);
        // mmu_pages_first: the starting page's level holds it, one above is the sentinel.
        let mut path = MmuPagePath::default();
        let level = self.pages[parent as usize].role.level() as usize;
        debug_assert!(level >= 2);
        path.parent[level - 2] = parent;
        let mut i = self.mmu_pages_next(&pvec, &mut path, 0);
        while i < pvec.len() {
            out.push((pvec[i].0, path));
            i = self.mmu_pages_next(&pvec, &mut path, i);
        }
        ret != 0
    }

    /// mmu_pages_clear_parents: clear the bits on the path to a page just synced or
    /// zapped, upwards while each parent has no other unsync child.
    pub fn clear_parents(&mut self, path: &MmuPagePath) {
        for level in 0..ROOT_MAX_LEVEL {
            let sp = path.parent[level];
            if sp == NIL {
                return;
            }
            self.clear_unsync_child_bit(sp, path.idx[level] as usize);
            if self.pages[sp as usize].unsync_children != 0 {
                return;
            }
        }
    }

    /// mmu_zap_unsync_children.
    fn zap_unsync_children(&mut self, parent: SpIndex, invalid_list: &mut Vec<SpIndex>) -> usize {
        if self.pages[parent as usize].role.level() == 1 {
            return 0;
        }
        let mut zapped = 0;
        let mut batch = Vec::new();
        while self.unsync_walk(parent, &mut batch) {
            for (sp, path) in std::mem::take(&mut batch) {
                self.prepare_zap(sp, invalid_list);
                self.clear_parents(&path);
                zapped += 1;
            }
        }
        zapped
    }

    // ---- roots ----

    /// mmu_alloc_root's reference.
    pub fn get_root(&mut self, idx: SpIndex) {
        self.pages[idx as usize].root_count += 1;
    }

    /// mmu_free_root_page: drop a reference; the last one on an invalid root zaps it.
    pub fn put_root(&mut self, idx: SpIndex, invalid_list: &mut Vec<SpIndex>) {
        let sp = &mut self.pages[idx as usize];
        debug_assert!(sp.root_count > 0);
        sp.root_count -= 1;
        if sp.root_count == 0 && sp.role.invalid() {
            self.prepare_zap(idx, invalid_list);
        }
    }

    // ---- zap ----

    /// kvm_mmu_prepare_zap_page. Returns whether any page went to the invalid list.
    pub fn prepare_zap(&mut self, idx: SpIndex, invalid_list: &mut Vec<SpIndex>) -> bool {
        self.prepare_zap_page(idx, invalid_list).1 != 0
    }

    /// __kvm_mmu_prepare_zap_page: returns (the active list changed beyond this page,
    /// pages zapped including this one if it went to the list).
    fn prepare_zap_page(&mut self, idx: SpIndex, invalid_list: &mut Vec<SpIndex>) -> (bool, usize) {
        debug_assert!(matches!(
            self.pages[idx as usize].state,
            PageState::Active | PageState::InvalidRoot
        ));
        self.stat_add(VmStat::MmuShadowZapped, 1);
        let mut nr_zapped = self.zap_unsync_children(idx, invalid_list);
        // kvm_mmu_page_unlink_children (no nested TDP pages to zap recursively here).
        for i in 0..SPTE_ENT_PER_PAGE {
            self.zap_spte(spte_ptr(idx, i));
        }
        // kvm_mmu_unlink_parents.
        while let Some(p) = self.pages[idx as usize].parent_ptes.first() {
            self.drop_parent_pte(idx, p);
        }
        let list_unstable = nr_zapped != 0;
        let role = self.pages[idx as usize].role;
        if !role.invalid() && role.has_gptes() {
            self.unaccount_shadowed(idx);
        }
        if self.pages[idx as usize].unsync {
            self.unlink_unsync_page(idx);
        }
        let mut zapped_root = false;
        if self.pages[idx as usize].root_count == 0 {
            nr_zapped += 1;
            if self.pages[idx as usize].state == PageState::Active {
                self.list_del(idx);
            }
            self.pages[idx as usize].state = PageState::Zapped;
            invalid_list.push(idx);
            self.n_used -= 1;
        } else {
            // Freed when the last vCPU lets go of it (put_root).
            if self.pages[idx as usize].state == PageState::Active {
                self.list_del(idx);
            }
            self.pages[idx as usize].state = PageState::InvalidRoot;
            zapped_root = !self.is_obsolete(idx);
        }
        self.pages[idx as usize].role = role.with_invalid(true);
        if zapped_root {
            self.free_obsolete_roots_requests += 1;
        }
        (list_unstable, nr_zapped)
    }

    /// kvm_mmu_commit_zap_page: one remote flush (which also waits out lockless
    /// walkers), then free every page on the list.
    pub fn commit_zap(&mut self, invalid_list: &mut Vec<SpIndex>) {
        if invalid_list.is_empty() {
            return;
        }
        self.flush_remote_tlbs();
        for idx in invalid_list.drain(..) {
            let sp = &self.pages[idx as usize];
            debug_assert!(sp.role.invalid() && sp.root_count == 0);
            debug_assert_eq!(sp.state, PageState::Zapped);
            debug_assert!(sp.spt.iter().all(|s| !s.is_shadow_present()));
            self.hash_del(idx);
            let sp = &mut self.pages[idx as usize];
            sp.state = PageState::Free;
            sp.parent_ptes = ParentPtes::default();
            self.free.push(idx);
        }
    }

    /// kvm_mmu_unprotect_page: zap every valid page shadowing guest table `gfn`.
    pub fn unprotect_page(&mut self, gfn: u64) -> bool {
        let mut invalid_list = Vec::new();
        let sps = self.gfn_sps_with_gptes(gfn);
        for &i in &sps {
            // An earlier zap may have zapped this one as an unsync child.
            if !self.is_obsolete(i) {
                self.prepare_zap(i, &mut invalid_list);
            }
        }
        self.commit_zap(&mut invalid_list);
        !sps.is_empty()
    }

    /// kvm_mmu_zap_all_fast: flip the generation, so every page is obsolete and no
    /// lookup finds it, ask the vCPUs to drop their roots, and zap the obsolete pages
    /// from the tail. Roots still in use stay as invalid roots until put.
    pub fn zap_all_fast(&mut self) {
        self.mmu_valid_gen ^= 1;
        self.free_obsolete_roots_requests += 1;
        self.zap_obsolete_pages();
    }

    /// kvm_zap_obsolete_pages (without lock breaks: nothing runs concurrently here).
    fn zap_obsolete_pages(&mut self) {
        let mut invalid_list = Vec::new();
        'restart: loop {
            let mut sp = self.active_tail;
            while sp != NIL {
                let prev = self.pages[sp as usize].prev;
                // Pages are added at the head: the first valid one ends the obsolete run.
                if !self.is_obsolete(sp) {
                    break 'restart;
                }
                if self.pages[sp as usize].role.invalid() {
                    sp = prev;
                    continue;
                }
                let (unstable, _) = self.prepare_zap_page(sp, &mut invalid_list);
                if unstable {
                    continue 'restart;
                }
                sp = prev;
            }
            break;
        }
        self.commit_zap(&mut invalid_list);
    }

    // ---- audit ----

    /// The invariants this layer owns (reference/kvm-mmu-semantics.md 4, 5, 13-17 and
    /// 2-3 as far as the rmaps show them), checked against the memslot table `slots`.
    pub fn check_invariants(&self, slots: &MemSlots) -> Result<(), String> {
        self.check_slots(slots)?;
        let n = self.pages.len();
        let mut on_free = vec![false; n];
        for &i in &self.free {
            let i = i as usize;
            if i >= n || on_free[i] {
                return Err(format!("free list names page {i} twice or out of range"));
            }
            if self.pages[i].state != PageState::Free {
                return Err(format!(
                    "page {i} on the free list is {:?}",
                    self.pages[i].state
                ));
            }
            on_free[i] = true;
        }
        let mut used = 0u64;
        let mut indirect = 0u64;
        let mut unsync = 0u64;
        for (i, sp) in self.pages.iter().enumerate() {
            match sp.state {
                PageState::Free => {
                    if !on_free[i] {
                        return Err(format!("freed page {i} is not on the free list"));
                    }
                    continue;
                }
                PageState::Active => {
                    if sp.role.invalid() {
                        return Err(format!("invalid page {i} on the active list"));
                    }
                    if sp.mmu_valid_gen != self.mmu_valid_gen {
                        return Err(format!("obsolete page {i} survived a fast zap"));
                    }
                    used += 1;
                }
                PageState::InvalidRoot => {
                    if !sp.role.invalid() || sp.root_count == 0 {
                        return Err(format!("invalid root {i} is valid or unused"));
                    }
                    used += 1;
                }
                PageState::Zapped => {
                    if !sp.role.invalid() || sp.root_count != 0 {
                        return Err(format!("zapped page {i} is valid or a root"));
                    }
                }
            }
            if sp.role.has_gptes() && !sp.role.invalid() {
                indirect += 1;
            }
            if sp.unsync {
                unsync += 1;
                if sp.role.level() != 1 || !sp.role.has_gptes() || sp.role.invalid() {
                    return Err(format!("page {i} is unsync: {sp:?}"));
                }
            }
            let pop: u32 = sp.unsync_child_bitmap.iter().map(|w| w.count_ones()).sum();
            if u32::from(sp.unsync_children) != pop {
                return Err(format!(
                    "page {i}: unsync_children {} but {pop} bits",
                    sp.unsync_children
                ));
            }
            if sp.role.level() == 1 && pop != 0 {
                return Err(format!("level-1 page {i} has unsync children"));
            }
            if sp.role.invalid()
                && (!sp.parent_ptes.is_empty() || sp.spt.iter().any(|s| s.is_shadow_present()))
            {
                return Err(format!("invalid page {i} still has links or SPTEs"));
            }
        }
        if used != self.n_used {
            return Err(format!("n_used {} but {used} pages in use", self.n_used));
        }
        if indirect != self.indirect_shadow_pages {
            return Err(format!(
                "indirect_shadow_pages {} but {indirect} pages",
                self.indirect_shadow_pages
            ));
        }
        if unsync != self.stats.get(VmStat::MmuUnsync as usize) {
            return Err(format!(
                "mmu_unsync stat disagrees with {unsync} unsync pages"
            ));
        }
        self.check_lists()?;
        self.check_sptes()?;
        self.check_tracking()
    }

    fn check_slots(&self, slots: &MemSlots) -> Result<(), String> {
        let metas = self.slots.iter().flatten().count();
        if metas != slots.len() || self.slot_ranges.len() != metas {
            return Err(format!(
                "{metas} slot metadata, {} ranges, {} memslots",
                self.slot_ranges.len(),
                slots.len()
            ));
        }
        for s in slots.iter() {
            let m = self
                .slot_meta(s.id)
                .ok_or_else(|| format!("memslot {} has no metadata", s.id))?;
            if m.base_gfn != s.base_gfn || m.npages != s.npages {
                return Err(format!("metadata of memslot {} is stale", s.id));
            }
        }
        Ok(())
    }

    fn check_lists(&self) -> Result<(), String> {
        // Active list: consistent links, exactly the Active pages.
        let mut count = 0usize;
        let mut prev = NIL;
        let mut sp = self.active_head;
        while sp != NIL {
            let page = self
                .pages
                .get(sp as usize)
                .ok_or("active list out of range")?;
            if page.state != PageState::Active {
                return Err(format!("page {sp} on the active list is {:?}", page.state));
            }
            if page.prev != prev {
                return Err(format!("active list: page {sp} has a bad prev link"));
            }
            count += 1;
            if count > self.pages.len() {
                return Err("active list loops".into());
            }
            prev = sp;
            sp = page.next;
        }
        if prev != self.active_tail {
            return Err("active list tail is wrong".into());
        }
        let active = self
            .pages
            .iter()
            .filter(|p| p.state == PageState::Active)
            .count();
        if active != count {
            return Err(format!("{active} active pages but {count} on the list"));
        }
        // Hash: every page not freed, once, in its gfn's bucket.
        let mut seen = vec![false; self.pages.len()];
        for (b, &head) in self.hash.iter().enumerate() {
            let mut sp = head;
            while sp != NIL {
                let page = self.pages.get(sp as usize).ok_or("hash out of range")?;
                if seen[sp as usize] {
                    return Err(format!("page {sp} twice in the hash"));
                }
                seen[sp as usize] = true;
                if page.state == PageState::Free {
                    return Err(format!("freed page {sp} in the hash"));
                }
                if kvm_page_table_hashfn(page.gfn) != b {
                    return Err(format!("page {sp} in the wrong hash bucket"));
                }
                sp = page.hash_next;
            }
        }
        for (i, p) in self.pages.iter().enumerate() {
            if p.state != PageState::Free && !seen[i] {
                return Err(format!("page {i} is missing from the hash"));
            }
        }
        Ok(())
    }

    fn check_sptes(&self) -> Result<(), String> {
        let mut leaves = [0u64; 4];
        let mut links = 0usize;
        for (idx, sp) in self.iter() {
            let level = sp.role.level();
            for (i, &s) in sp.spt.iter().enumerate() {
                let p = spte_ptr(idx, i);
                if !s.is_shadow_present() {
                    if s != Spte::NONPRESENT && !s.is_mmio() {
                        return Err(format!("SPTE {p:#x} is neither present, empty nor MMIO"));
                    }
                    continue;
                }
                spte::check_invariants(s, level).map_err(|e| format!("SPTE {p:#x}: {e}"))?;
                if s.is_leaf(level) {
                    let gfn = sp.get_gfn(i);
                    let meta = self
                        .slot_meta_for_gfn(gfn)
                        .ok_or_else(|| format!("leaf {p:#x} maps gfn {gfn:#x} outside memslots"))?;
                    let n = meta.rmap.iter(gfn, level).filter(|&q| q == p).count();
                    if n != 1 {
                        return Err(format!("leaf {p:#x} is {n} times in its rmap"));
                    }
                    leaves[level as usize] += 1;
                    continue;
                }
                links += 1;
                let c = s.child_index();
                let child = self
                    .pages
                    .get(c as usize)
                    .ok_or_else(|| format!("link {p:#x} to page {c} out of range"))?;
                if matches!(child.state, PageState::Free | PageState::Zapped) {
                    return Err(format!("link {p:#x} to {:?} page {c}", child.state));
                }
                if child.role.level() + 1 != level {
                    return Err(format!("link {p:#x} to page {c} at the wrong level"));
                }
                if child.parent_ptes.iter().filter(|&q| q == p).count() != 1 {
                    return Err(format!("page {c} does not list parent {p:#x} once"));
                }
                // Invariant 5: a child with unsync pages below is marked.
                if (child.unsync || child.unsync_children != 0) && !sp.test_bit(i) {
                    return Err(format!("page {idx} lost the unsync bit of {i}"));
                }
            }
        }
        let parents: usize = self.iter().map(|(_, sp)| sp.parent_ptes.len()).sum();
        if parents != links {
            return Err(format!("{links} links but {parents} parent entries"));
        }
        for (idx, sp) in self.iter() {
            for p in sp.parent_ptes.iter() {
                let s = self
                    .pages
                    .get(sp_of(p) as usize)
                    .map(|q| q.spt[index_of(p)]);
                if s != Some(Spte::nonleaf(idx)) {
                    return Err(format!("parent {p:#x} of page {idx} does not link to it"));
                }
            }
        }
        // Every rmap entry is a present leaf of its gfn and level (with the count
        // match above, every leaf is in exactly one rmap exactly once).
        let mut rmapped = 0u64;
        for m in self.slots.iter().flatten() {
            for (gfn, level, p) in m.rmap.iter_all() {
                let sp = self
                    .pages
                    .get(sp_of(p) as usize)
                    .filter(|sp| sp.state != PageState::Free)
                    .ok_or_else(|| format!("rmap entry {p:#x} names a freed page"))?;
                let s = sp.spt[index_of(p)];
                if !s.is_shadow_present() || !s.is_leaf(level) || sp.role.level() != level {
                    return Err(format!("rmap entry {p:#x} is not a level-{level} leaf"));
                }
                let shift = 9 * (u32::from(level) - 1);
                if sp.get_gfn(index_of(p)) >> shift != gfn >> shift {
                    return Err(format!("rmap entry {p:#x} filed under gfn {gfn:#x}"));
                }
                rmapped += 1;
            }
        }
        let total: u64 = leaves.iter().sum();
        if rmapped != total {
            return Err(format!("{rmapped} rmap entries for {total} leaves"));
        }
        for level in 1..=3u8 {
            let stat = self.stats.get(page_stat(level) as usize);
            if stat != leaves[level as usize] {
                return Err(format!(
                    "{:?} is {stat} but {} leaves exist",
                    page_stat(level),
                    leaves[level as usize]
                ));
            }
        }
        Ok(())
    }

    fn check_tracking(&self) -> Result<(), String> {
        for (idx, sp) in self.iter() {
            if sp.role.invalid() || !sp.role.has_gptes() {
                continue;
            }
            let Some(meta) = self.slot_meta_for_gfn(sp.gfn) else {
                continue;
            };
            // Invariant 4: upper-level tables are write-tracked; level 1 at least
            // keeps huge pages off its gfn.
            if sp.role.level() > 1 && !meta.track.is_write_tracked(sp.gfn) {
                return Err(format!(
                    "page {idx}: upper-level gfn {:#x} not tracked",
                    sp.gfn
                ));
            }
            if meta.track.max_level(sp.gfn, KVM_MAX_HUGEPAGE_LEVEL) != 1 {
                return Err(format!("page {idx}: huge pages allowed over {:#x}", sp.gfn));
            }
            // Invariant 3: an in-sync table is mapped read-only everywhere.
            if !sp.unsync {
                for level in 1..=KVM_MAX_HUGEPAGE_LEVEL {
                    if meta
                        .rmap
                        .iter(sp.gfn, level)
                        .any(|p| self.spte(p).is_writable())
                    {
                        return Err(format!("in-sync table {:#x} mapped writable", sp.gfn));
                    }
                }
            }
        }
        // Invariant 2: no writable leaf for a write-tracked gfn.
        for m in self.slots.iter().flatten() {
            for (gfn, _, p) in m.rmap.iter_all() {
                if self.spte(p).is_writable() && m.track.is_write_tracked(gfn) {
                    return Err(format!("writable leaf {p:#x} for tracked gfn {gfn:#x}"));
                }
            }
        }
        Ok(())
    }
}

/// mmu_spte_update on an SPTE keeping its frame: returns whether a TLB flush is
/// needed (write access or A/D state removed from a present SPTE).
fn mmu_spte_update(slot: &mut Spte, new: Spte) -> bool {
    let old = std::mem::replace(slot, new);
    if !old.is_shadow_present() {
        return false;
    }
    (old.is_mmu_writable() && !new.is_writable())
        || (old.is_accessed() && !new.is_accessed())
        || (old.is_dirty() && !new.is_dirty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hostmem::HostRegion;
    use crate::memslot::RegionIoctl;
    use crate::mmu::role::child_role;
    use crate::mmu::spte::{make_mmio_spte, make_spte, MakeSpte};
    use crate::paging::{ACC_ALL, ACC_EXEC, ACC_USER, ACC_WRITE};
    use crate::stats::VM_STATS;
    use crate::uapi::kvm_userspace_memory_region2;

    const RO: u8 = ACC_USER | ACC_EXEC;

    struct Env {
        mmu: Mmu,
        slots: MemSlots,
        host: Arc<HostRegion>,
    }

    fn add_slot(slots: &mut MemSlots, host: &HostRegion, id: u32, gpa: u64, size: u64, off: u64) {
        let r = kvm_userspace_memory_region2 {
            slot: id,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host.addr() + off,
            ..Default::default()
        };
        slots
            .set_region(&r, RegionIoctl::V1, |h, l| {
                HostRegion::lookup(h, l).ok_or(Errno::EFAULT)
            })
            .unwrap();
    }

    /// A VM with one memslot of `npages` at gpa 0.
    fn env(npages: u64) -> Env {
        let host = HostRegion::new(npages << 12).unwrap();
        let mut slots = MemSlots::new();
        add_slot(&mut slots, &host, 0, 0, npages << 12, 0);
        let stats = Arc::new(StatsFile::new("t", "kvm-test", VM_STATS).unwrap());
        let mut mmu = Mmu::new(stats);
        mmu.slot_created(slots.get(0).unwrap());
        let e = Env { mmu, slots, host };
        e.check();
        e
    }

    /// A 64-bit guest's root role (shadow_root_role of a 4-level cpu role).
    fn root_role() -> Role {
        Role::default()
            .with_level(4)
            .with_access(ACC_ALL)
            .with_efer_nx(true)
            .with_cr0_wp(true)
    }

    impl Env {
        fn check(&self) {
            if let Err(e) = self.mmu.check_invariants(&self.slots) {
                panic!("invariant broken: {e}");
            }
        }

        fn stat(&self, s: VmStat) -> u64 {
            self.mmu.stats().get(s as usize)
        }

        /// A root for guest table `gfn`, referenced once.
        fn root(&mut self, gfn: u64) -> SpIndex {
            let (r, _) = self.mmu.get_shadow_page(gfn, root_role(), |_, _| 0);
            self.mmu.get_root(r);
            self.check();
            r
        }

        /// The indirect child for guest table `gfn` below SPTE `index` of `parent`.
        fn child(&mut self, parent: SpIndex, index: usize, gfn: u64) -> SpIndex {
            let role = child_role(self.mmu.get(parent).role, index, false, ACC_ALL);
            let (c, _) = self.mmu.get_shadow_page(gfn, role, |_, _| 0);
            self.mmu.link_shadow_page(spte_ptr(parent, index), c);
            self.check();
            c
        }

        /// A root -> L3 -> L2 -> L1 chain for guest tables at gfns 1..=4.
        fn chain(&mut self) -> [SpIndex; 4] {
            let r = self.root(1);
            let l3 = self.child(r, 0, 2);
            let l2 = self.child(l3, 0, 3);
            let l1 = self.child(l2, 0, 4);
            [r, l3, l2, l1]
        }

        fn pfn(&self, gfn: u64) -> u64 {
            (self.host.addr() >> 12) + gfn
        }

        /// Map `gfn` at SPTE `index` of `sp` with `access` the way the fault path does
        /// (make_spte, unsyncing on a write), and keep the books.
        fn leaf(&mut self, sp: SpIndex, index: usize, gfn: u64, access: u8) -> Spte {
            let level = self.mmu.get(sp).role.level();
            let pfn = self.pfn(gfn);
            let p = spte_ptr(sp, index);
            self.mmu
                .set_leaf_with(p, pfn, gfn, access, |mmu, old_spte| {
                    let input = MakeSpte {
                        level,
                        access,
                        pfn,
                        old_spte,
                        prefetch: false,
                        synchronizing: false,
                        host_writable: true,
                        dirty_log: false,
                        nx_huge_pages: false,
                    };
                    make_spte(&input, || mmu.try_to_unsync_pages(gfn, true, false)).0
                });
            self.check();
            self.mmu.spte(p)
        }

        fn rmap_len(&self, gfn: u64, level: u8) -> usize {
            self.mmu
                .slot_meta_for_gfn(gfn)
                .unwrap()
                .rmap
                .len(gfn, level)
        }

        fn zap(&mut self, sp: SpIndex) -> bool {
            let mut list = Vec::new();
            let r = self.mmu.prepare_zap(sp, &mut list);
            self.check();
            self.mmu.commit_zap(&mut list);
            self.check();
            r
        }
    }

    #[test]
    fn mmu_can_live_behind_the_vm_lock() {
        fn send<T: Send>() {}
        send::<Mmu>();
    }

    #[test]
    fn hash_is_kvms_hash_64() {
        assert_eq!(kvm_page_table_hashfn(0), 0);
        // GOLDEN_RATIO_64 >> 52.
        assert_eq!(kvm_page_table_hashfn(1), 0x61c);
        assert_eq!(kvm_page_table_hashfn(2), 0xc39);
        assert!((0..10_000u64).all(|g| kvm_page_table_hashfn(g) < 4096));
    }

    #[test]
    fn default_limit_agrees_with_vm_state() {
        // Through the VM: creating a slot sets the default limit.
        for npages in [1u64, 3199, 3200, 3250, 50_000, 1 << 20] {
            let host = HostRegion::new(npages << 12).unwrap();
            let vm = crate::vm::Vm::new(0).unwrap();
            let r = crate::uapi::kvm_userspace_memory_region2 {
                memory_size: npages << 12,
                userspace_addr: host.addr(),
                ..Default::default()
            };
            vm.set_user_memory_region(&r, crate::memslot::RegionIoctl::V1)
                .unwrap();
            assert_eq!(
                default_mmu_pages(npages),
                vm.state().mmu.n_max(),
                "{npages}"
            );
        }
        let mut e = env(50_000);
        assert_eq!(e.mmu.n_max(), 1000);
        let host2 = HostRegion::new(6400 << 12).unwrap();
        add_slot(&mut e.slots, &host2, 1, 1 << 30, 6400 << 12, 0);
        e.mmu.slot_created(e.slots.get(1).unwrap());
        assert_eq!(e.mmu.n_max(), 1128);
        e.check();
        // A requested limit is not overridden by slot changes.
        e.mmu.set_nr_mmu_pages(100).unwrap();
        let old = e.slots.get(1).unwrap().clone();
        e.mmu.slot_deleted(&old);
        assert_eq!((e.mmu.n_max(), e.mmu.n_requested()), (100, 100));
    }

    #[test]
    fn lookup_hits_misses_and_counts() {
        let mut e = env(1 << 12);
        let r = e.root(10);
        assert_eq!(e.stat(VmStat::MmuCacheMiss), 1);
        assert_eq!(e.mmu.find_shadow_page(10, root_role()), Some(r));
        assert_eq!(e.stat(VmStat::MmuCacheMiss), 1);
        // Same gfn, other role word: a miss (invariant 13).
        assert_eq!(
            e.mmu.find_shadow_page(10, root_role().with_cr0_wp(false)),
            None
        );
        assert_eq!(e.mmu.find_shadow_page(11, root_role()), None);
        assert_eq!(e.stat(VmStat::MmuCacheMiss), 3);
        assert_eq!((e.mmu.n_used(), e.mmu.indirect_shadow_pages()), (1, 1));
        // A hit resets write flooding.
        e.mmu.get_mut(r).write_flooding_count = 2;
        e.mmu.find_shadow_page(10, root_role());
        assert_eq!(e.mmu.get(r).write_flooding_count, 0);
        assert_eq!(e.mmu.active_pages().collect::<Vec<_>>(), [r]);
    }

    #[test]
    fn hash_collisions_feed_the_peak() {
        let mut e = env(1 << 14);
        let b = kvm_page_table_hashfn(100);
        let same: Vec<u64> = (101..1 << 14)
            .filter(|&g| kvm_page_table_hashfn(g) == b)
            .take(3)
            .collect();
        assert_eq!(same.len(), 3);
        let direct = Role::default().with_level(1).with_direct(true);
        let first = e.mmu.alloc_shadow_page(100, direct);
        for &g in &same {
            e.mmu.alloc_shadow_page(g, direct);
        }
        e.check();
        // The bucket is newest first: three other gfns before the oldest page.
        assert_eq!(e.mmu.find_shadow_page(100, direct), Some(first));
        assert_eq!(e.stat(VmStat::MaxMmuPageHashCollisions), 3);
        assert!(e.mmu.find_shadow_page(same[2], direct).is_some());
        assert_eq!(e.stat(VmStat::MaxMmuPageHashCollisions), 3, "a peak");
        // A miss walks the whole bucket.
        assert_eq!(e.mmu.find_shadow_page(same[2], direct.with_level(2)), None);
        assert_eq!(e.stat(VmStat::MaxMmuPageHashCollisions), 3);
    }

    #[test]
    fn chain_links_parents_and_tracks_tables() {
        let mut e = env(1 << 12);
        let [r, l3, l2, l1] = e.chain();
        assert_eq!(e.mmu.n_used(), 4);
        assert_eq!(e.mmu.spte(spte_ptr(r, 0)), Spte::nonleaf(l3));
        assert_eq!(
            e.mmu.get(l1).parent_ptes.iter().collect::<Vec<_>>(),
            [spte_ptr(l2, 0)]
        );
        assert_eq!(e.mmu.get(l1).role.level(), 1);
        // Upper tables are write-tracked, the level-1 table only blocks huge pages.
        for g in [1, 2, 3] {
            assert!(e.mmu.gfn_is_write_tracked(g), "{g}");
        }
        assert!(!e.mmu.gfn_is_write_tracked(4));
        let t = &e.mmu.slot_meta(0).unwrap().track;
        assert_eq!(t.max_level(4, 3), 1);
        assert_eq!(t.write_track_count(2), 1);
        // The active list is newest first.
        assert_eq!(e.mmu.active_pages().collect::<Vec<_>>(), [l1, l2, l3, r]);
        // A second link to the same child (another guest PDE naming the table).
        let role = child_role(e.mmu.get(l2).role, 7, false, ACC_ALL);
        assert_eq!(e.mmu.find_shadow_page(4, role), Some(l1));
        e.mmu.link_shadow_page(spte_ptr(l2, 7), l1);
        assert_eq!(e.mmu.get(l1).parent_ptes.len(), 2);
        e.check();
    }

    #[test]
    fn leaves_go_to_the_rmap_and_stats() {
        let mut e = env(1 << 12);
        let [_, _, l2, l1] = e.chain();
        for i in 0..8 {
            e.leaf(l1, i, 0x100 + i as u64, RO);
        }
        assert_eq!(e.stat(VmStat::Pages4k), 8);
        assert_eq!(e.rmap_len(0x100, 1), 1);
        // An alias of gfn 0x100 from another entry.
        e.leaf(l1, 100, 0x100, RO);
        assert_eq!(e.rmap_len(0x100, 1), 2);
        assert_eq!(e.stat(VmStat::MaxMmuRmapSize), 1);
        // A 2M leaf in the L2 page.
        e.leaf(l2, 5, 0x200, ACC_ALL);
        assert_eq!(e.stat(VmStat::Pages2m), 1);
        assert_eq!(e.rmap_len(0x3ff, 2), 1, "per 2M frame");
        // The shadowed translation records gfn and access.
        assert_eq!(e.mmu.get(l1).get_gfn(100), 0x100);
        assert_eq!(e.mmu.get(l1).get_access(100), RO);
        e.mmu.drop_spte(spte_ptr(l1, 100));
        assert_eq!((e.stat(VmStat::Pages4k), e.rmap_len(0x100, 1)), (8, 1));
        e.check();
    }

    #[test]
    fn one_gig_leaf() {
        let mut e = env(1 << 19);
        let r = e.root(1);
        let l3 = e.child(r, 0, 2);
        e.leaf(l3, 1, 1 << 18, RO);
        assert_eq!(e.stat(VmStat::Pages1g), 1);
        assert_eq!(e.rmap_len((1 << 18) + 12345, 3), 1);
        e.zap(l3);
        assert_eq!(e.stat(VmStat::Pages1g), 0);
    }

    #[test]
    fn set_leaf_like_mmu_set_spte() {
        let mut e = env(1 << 12);
        let [_, _, _, l1] = e.chain();
        let p = spte_ptr(l1, 3);
        let s = e.leaf(l1, 3, 0x100, ACC_ALL);
        assert!(s.is_writable());
        let flushes = e.stat(VmStat::RemoteTlbFlushRequests);
        // The same SPTE again is spurious.
        assert!(!e.mmu.set_leaf(p, s, 0x100, ACC_ALL));
        // Same frame, write removed: updated in place, flushed, still rmapped once.
        let ro = Spte(s.0 & !(PT_WRITABLE | SPTE_MMU_WRITABLE));
        assert!(e.mmu.set_leaf(p, ro, 0x100, RO));
        assert_eq!(e.stat(VmStat::RemoteTlbFlushRequests), flushes + 1);
        assert_eq!((e.rmap_len(0x100, 1), e.stat(VmStat::Pages4k)), (1, 1));
        assert_eq!(e.mmu.get(l1).get_access(3), RO);
        e.check();
        // Another frame: the old leaf leaves its rmap.
        e.leaf(l1, 3, 0x101, RO);
        assert_eq!((e.rmap_len(0x100, 1), e.rmap_len(0x101, 1)), (0, 1));
        assert_eq!(e.stat(VmStat::RemoteTlbFlushRequests), flushes + 2);
        assert_eq!(e.stat(VmStat::Pages4k), 1);
    }

    #[test]
    fn huge_leaf_replaces_a_link_and_back() {
        let mut e = env(1 << 12);
        let [_, _, l2, l1] = e.chain();
        e.leaf(l1, 0, 0x100, RO);
        // A 2M leaf where the L1 table was linked: the table is unlinked, not zapped.
        e.leaf(l2, 0, 0x200, RO);
        assert!(e.mmu.get(l1).parent_ptes.is_empty());
        assert_eq!(e.mmu.get(l1).state(), PageState::Active);
        assert_eq!((e.stat(VmStat::Pages2m), e.stat(VmStat::Pages4k)), (1, 1));
        // Linking a table over the huge leaf drops the leaf.
        e.mmu.link_shadow_page(spte_ptr(l2, 0), l1);
        e.check();
        assert_eq!((e.stat(VmStat::Pages2m), e.rmap_len(0x200, 2)), (0, 0));
    }

    #[test]
    fn shadowing_a_mapped_page_write_protects_it() {
        let mut e = env(1 << 12);
        let [_, _, l2, l1] = e.chain();
        let s = e.leaf(l1, 9, 0x150, ACC_ALL);
        assert!(s.is_writable());
        let flushes = e.stat(VmStat::RemoteTlbFlushRequests);
        let track = |e: &Env| {
            e.mmu
                .slot_meta(0)
                .unwrap()
                .track
                .lpage_disallow_count(0x150, 2)
        };
        let geometry = track(&e);
        // The guest starts using gfn 0x150 as a page table.
        let c = e.child(l2, 1, 0x150);
        assert_eq!(track(&e), geometry + 1);
        let now = e.mmu.spte(spte_ptr(l1, 9));
        assert!(!now.is_writable() && !now.is_mmu_writable() && now.is_host_writable());
        assert_eq!(e.stat(VmStat::RemoteTlbFlushRequests), flushes + 1);
        // Zapping the table lifts the huge-page block again.
        e.zap(c);
        assert_eq!(track(&e), geometry);
        e.check();
    }

    #[test]
    fn unsync_marks_every_ancestor() {
        let mut e = env(1 << 12);
        let [r, l3, l2, l1] = e.chain();
        // A writable mapping of the L1 table's gfn unsyncs it.
        let s = e.leaf(l1, 20, 4, ACC_ALL);
        assert!(s.is_writable());
        assert!(e.mmu.get(l1).unsync);
        assert_eq!(e.stat(VmStat::MmuUnsync), 1);
        for p in [r, l3, l2] {
            assert_eq!(e.mmu.get(p).unsync_children, 1);
            assert_eq!(e.mmu.get(p).unsync_child_bitmap[0], 1);
        }
        // An upper-level table's gfn is write-tracked: never unsynced, never writable.
        assert!(e.mmu.try_to_unsync_pages(3, true, false));
        let s = e.leaf(l1, 21, 3, ACC_ALL);
        assert!(!s.is_writable());
        // Syncing (can_unsync = false) and prefetches refuse the write.
        let c = e.child(l2, 2, 0x40);
        assert!(e.mmu.try_to_unsync_pages(0x40, false, false));
        assert!(e.mmu.try_to_unsync_pages(0x40, true, true));
        assert!(!e.mmu.get(c).unsync);
        // An already unsync page does not refuse a prefetch.
        assert!(!e.mmu.try_to_unsync_pages(4, true, true));
        e.check();
    }

    #[test]
    fn linking_an_unsync_page_marks_the_new_parents() {
        let mut e = env(1 << 12);
        let [r, l3, l2, l1] = e.chain();
        e.leaf(l1, 0, 4, ACC_ALL);
        // A second L2 (another guest PD) that also names the L1 table.
        let l2b = e.child(l3, 1, 0x30);
        assert_eq!(e.mmu.get(l3).unsync_children, 1, "l3 -> l2 already marked");
        let role = child_role(e.mmu.get(l2b).role, 5, false, ACC_ALL);
        assert_eq!(e.mmu.find_shadow_page(4, role), Some(l1));
        e.mmu.link_shadow_page(spte_ptr(l2b, 5), l1);
        e.check();
        assert_eq!(e.mmu.get(l2b).unsync_child_bitmap[0], 1 << 5);
        assert_eq!(e.mmu.get(l3).unsync_children, 2);
        assert_eq!(
            e.mmu.get(r).unsync_children,
            1,
            "the root's bit was set already"
        );
        let _ = l2;
    }

    #[test]
    fn zap_a_middle_page() {
        let mut e = env(1 << 12);
        let [r, l3, l2, l1] = e.chain();
        e.leaf(l2, 3, 0x400, RO);
        e.leaf(l1, 0, 0x100, RO);
        let mut list = Vec::new();
        assert!(e.mmu.prepare_zap(l2, &mut list));
        assert_eq!(list, [l2]);
        assert_eq!(e.mmu.get(l2).state(), PageState::Zapped);
        assert!(e.mmu.get(l2).role.invalid());
        assert_eq!(e.mmu.spte(spte_ptr(l3, 0)), Spte::NONPRESENT);
        assert_eq!(e.mmu.n_used(), 3, "counted out at prepare time");
        assert_eq!(e.stat(VmStat::Pages2m), 0);
        // The L1 table below is parentless but alive.
        assert!(e.mmu.get(l1).parent_ptes.is_empty());
        assert!(!e.mmu.gfn_is_write_tracked(3));
        assert_eq!(
            e.mmu
                .find_shadow_page(3, e.mmu.get(l2).role.with_invalid(false)),
            None
        );
        e.check();
        let before = e.stat(VmStat::RemoteTlbFlushRequests);
        e.mmu.commit_zap(&mut list);
        assert!(list.is_empty());
        assert_eq!(e.stat(VmStat::RemoteTlbFlushRequests), before + 1);
        assert_eq!(e.mmu.get(l2).state(), PageState::Free);
        assert_eq!(e.stat(VmStat::MmuShadowZapped), 1);
        e.check();
        // The freed index is reused first.
        let n = e.child(l3, 0, 0x33);
        assert_eq!(n, l2);
        assert_eq!(e.mmu.active_pages().collect::<Vec<_>>(), [n, l1, l3, r]);
        // Committing nothing flushes nothing.
        let before = e.stat(VmStat::RemoteTlbFlushRequests);
        e.mmu.commit_zap(&mut Vec::new());
        assert_eq!(e.stat(VmStat::RemoteTlbFlushRequests), before);
    }

    #[test]
    fn zapping_a_parent_zaps_its_unsync_children() {
        let mut e = env(1 << 12);
        let [r, l3, l2, l1] = e.chain();
        let l1b = e.child(l2, 1, 5);
        e.leaf(l1, 0, 4, ACC_ALL);
        e.leaf(l1b, 0, 5, ACC_ALL);
        assert_eq!(e.stat(VmStat::MmuUnsync), 2);
        assert_eq!(e.mmu.get(l2).unsync_children, 2);
        let mut list = Vec::new();
        e.mmu.prepare_zap(l3, &mut list);
        e.check();
        // l3 itself plus both unsync leaves below it; l2 survives, unlinked.
        assert_eq!(list.len(), 3);
        assert!(list.contains(&l1) && list.contains(&l1b) && list.contains(&l3));
        assert_eq!(e.stat(VmStat::MmuUnsync), 0);
        assert_eq!(e.stat(VmStat::MmuShadowZapped), 3);
        assert_eq!(e.mmu.get(l2).unsync_children, 0);
        assert_eq!(
            e.mmu.get(r).unsync_children,
            1,
            "a stale bit: the link is gone"
        );
        e.mmu.commit_zap(&mut list);
        e.check();
        // An unsync walk from the root cleans the stale bit and finds nothing.
        let mut batch = Vec::new();
        assert!(!e.mmu.unsync_walk(r, &mut batch));
        assert_eq!(e.mmu.get(r).unsync_children, 0);
        assert_eq!(e.stat(VmStat::Pages4k), 0);
        e.check();
    }

    #[test]
    fn zap_an_unsync_leaf_page() {
        let mut e = env(1 << 12);
        let [r, l3, l2, l1] = e.chain();
        e.leaf(l1, 0, 4, ACC_ALL);
        e.leaf(l1, 1, 0x100, ACC_ALL);
        let track = |e: &Env| e.mmu.slot_meta(0).unwrap().track.lpage_disallow_count(4, 2);
        let before = track(&e);
        assert!(e.zap(l1));
        assert_eq!(e.stat(VmStat::MmuUnsync), 0);
        assert_eq!(e.stat(VmStat::Pages4k), 0);
        assert_eq!(track(&e), before - 1);
        // The ancestors keep stale bits until a walk.
        assert_eq!(e.mmu.get(l2).unsync_children, 1);
        let mut batch = Vec::new();
        assert!(!e.mmu.unsync_walk(r, &mut batch));
        for p in [r, l3, l2] {
            assert_eq!(e.mmu.get(p).unsync_children, 0);
        }
        e.check();
    }

    #[test]
    fn unsync_walk_in_batches_like_mmu_sync_children() {
        let mut e = env(1 << 12);
        let r = e.root(1);
        let l3 = e.child(r, 0, 2);
        let mut leaves = Vec::new();
        for j in 0..3usize {
            let l2 = e.child(l3, j, 0x10 + j as u64);
            for k in 0..10usize {
                let g = 0x100 + (j * 16 + k) as u64;
                let l1 = e.child(l2, k, g);
                e.leaf(l1, 0, g, ACC_ALL);
                leaves.push(l1);
            }
        }
        assert_eq!(e.stat(VmStat::MmuUnsync), 30);
        let mut seen = Vec::new();
        let mut batch = Vec::new();
        let mut batches = 0;
        while e.mmu.unsync_walk(r, &mut batch) {
            batches += 1;
            assert!(batch.len() < KVM_PAGE_ARRAY_NR);
            // mmu_sync_children: write-protect the whole batch, flush, then sync each.
            let mut protected = false;
            for &(sp, _) in &batch {
                protected |= e.mmu.write_protect_gfn(e.mmu.get(sp).gfn, 1);
            }
            assert!(protected);
            e.mmu.flush_remote_tlbs();
            for (sp, path) in std::mem::take(&mut batch) {
                e.mmu.unlink_unsync_page(sp);
                e.mmu.clear_parents(&path);
                seen.push(sp);
            }
            e.check();
        }
        assert!(batches > 2);
        seen.sort_unstable();
        leaves.sort_unstable();
        assert_eq!(seen, leaves);
        assert_eq!(e.mmu.get(r).unsync_children, 0);
        assert_eq!(e.stat(VmStat::MmuUnsync), 0);
    }

    #[test]
    fn zap_a_root_in_use() {
        let mut e = env(1 << 12);
        let [r, l3, _, _] = e.chain();
        let reqs = e.mmu.free_obsolete_roots_requests();
        let mut list = Vec::new();
        assert!(!e.mmu.prepare_zap(r, &mut list), "nothing freeable");
        assert!(list.is_empty());
        assert_eq!(e.mmu.get(r).state(), PageState::InvalidRoot);
        assert_eq!(e.mmu.free_obsolete_roots_requests(), reqs + 1);
        assert_eq!(e.mmu.n_used(), 4, "an invalid root keeps counting");
        assert!(e.mmu.get(l3).parent_ptes.is_empty());
        assert_eq!(e.mmu.find_shadow_page(1, root_role()), None);
        assert!(!e.mmu.active_pages().any(|p| p == r));
        e.check();
        // Reclaim never touches it; the last put frees it.
        e.mmu.put_root(r, &mut list);
        assert_eq!(list, [r]);
        e.mmu.commit_zap(&mut list);
        assert_eq!(e.mmu.get(r).state(), PageState::Free);
        assert_eq!(e.mmu.n_used(), 3);
        assert_eq!(
            e.stat(VmStat::MmuShadowZapped),
            2,
            "zapped, then freed by put"
        );
        e.check();
    }

    #[test]
    fn put_root_of_a_valid_root_keeps_it() {
        let mut e = env(1 << 12);
        let r = e.root(1);
        e.mmu.get_root(r);
        let mut list = Vec::new();
        e.mmu.put_root(r, &mut list);
        e.mmu.put_root(r, &mut list);
        assert!(list.is_empty());
        assert_eq!(e.mmu.get(r).root_count, 0);
        assert_eq!(e.mmu.get(r).state(), PageState::Active);
        e.check();
    }

    #[test]
    fn reclaim_is_fifo_and_skips_roots() {
        let mut e = env(1 << 12);
        e.mmu.set_nr_mmu_pages(64).unwrap();
        let direct = Role::default()
            .with_level(1)
            .with_direct(true)
            .with_access(ACC_ALL);
        let old_root = e.root(1);
        let pages: Vec<SpIndex> = (0..63)
            .map(|i| e.mmu.alloc_shadow_page(0x1000 + 512 * i, direct))
            .collect();
        e.check();
        assert_eq!((e.mmu.n_used(), e.mmu.available_pages()), (64, 0));
        e.mmu.make_mmu_pages_available().unwrap();
        e.check();
        // 25 pages zapped: the oldest ones, minus the root that came first.
        assert_eq!(e.stat(VmStat::MmuRecycled), 25);
        assert_eq!(e.mmu.n_used(), 39);
        assert_eq!(e.mmu.get(old_root).state(), PageState::Active);
        for (i, &p) in pages.iter().enumerate() {
            let freed = e.mmu.get(p).state() == PageState::Free;
            assert_eq!(freed, i < 25, "page {i}");
        }
        // Enough room: nothing more happens.
        e.mmu.make_mmu_pages_available().unwrap();
        assert_eq!(e.stat(VmStat::MmuRecycled), 25);
        // A lookup hit does not make a page younger.
        let oldest = pages[25];
        assert_eq!(
            e.mmu.find_shadow_page(0x1000 + 512 * 25, direct),
            Some(oldest)
        );
        assert_eq!(e.mmu.zap_oldest(1), 1);
        assert_eq!(e.mmu.get(oldest).state(), PageState::Free);
        e.check();
    }

    #[test]
    fn reclaim_restarts_after_zapping_children() {
        let mut e = env(1 << 12);
        let [r, l3, l2, l1] = e.chain();
        e.leaf(l1, 0, 4, ACC_ALL);
        let l1b = e.child(l2, 1, 5);
        e.mmu.get_root(r);
        // Oldest first: l3 (the root is skipped); zapping it zaps unsync l1 as well.
        assert_eq!(e.mmu.zap_oldest(2), 2);
        assert_eq!(e.mmu.get(l3).state(), PageState::Free);
        assert_eq!(e.mmu.get(l1).state(), PageState::Free);
        assert_eq!(e.mmu.get(l2).state(), PageState::Active);
        assert_eq!(e.mmu.get(l1b).state(), PageState::Active);
        assert_eq!(e.stat(VmStat::MmuRecycled), 2);
        e.check();
    }

    #[test]
    fn only_roots_left_means_enospc() {
        let mut e = env(1 << 12);
        e.mmu.set_nr_mmu_pages(64).unwrap();
        for g in 0..64 {
            e.root(g);
        }
        assert_eq!(e.mmu.make_mmu_pages_available(), Err(Errno::ENOSPC));
        assert_eq!(e.stat(VmStat::MmuRecycled), 0);
        // Shrinking cannot zap roots: the limit stays at what is in use.
        e.mmu.set_nr_mmu_pages(64).unwrap();
        assert_eq!(e.mmu.n_max(), 64);
        e.check();
    }

    #[test]
    fn set_nr_mmu_pages_rules() {
        let mut e = env(1 << 12);
        assert_eq!(e.mmu.set_nr_mmu_pages(63), Err(Errno::EINVAL));
        assert_eq!(e.mmu.n_requested(), 0);
        let direct = Role::default()
            .with_level(1)
            .with_direct(true)
            .with_access(ACC_ALL);
        e.mmu.set_nr_mmu_pages(200).unwrap();
        for i in 0..100 {
            e.mmu.alloc_shadow_page(512 * i, direct);
        }
        let r = e.root(0x7000);
        e.mmu.set_nr_mmu_pages(64).unwrap();
        assert_eq!((e.mmu.n_used(), e.mmu.n_max()), (64, 64));
        assert_eq!(e.stat(VmStat::MmuRecycled), 37);
        assert_eq!(
            e.mmu.get(r).state(),
            PageState::Active,
            "newest, and a root"
        );
        // Growing only moves the limit.
        e.mmu.set_nr_mmu_pages(1 << 40).unwrap();
        assert_eq!((e.mmu.n_used(), e.mmu.n_max()), (64, 1 << 40));
        e.check();
    }

    #[test]
    fn fast_zap_all() {
        let mut e = env(1 << 12);
        let [r, _, _, l1] = e.chain();
        e.leaf(l1, 0, 4, ACC_ALL);
        e.leaf(l1, 1, 0x100, ACC_ALL);
        let reqs = e.mmu.free_obsolete_roots_requests();
        e.mmu.zap_all_fast();
        e.check();
        assert_eq!(e.mmu.mmu_valid_gen(), 1);
        assert_eq!(e.mmu.free_obsolete_roots_requests(), reqs + 1);
        assert_eq!(e.mmu.get(r).state(), PageState::InvalidRoot);
        assert_eq!(e.mmu.active_pages().count(), 0);
        assert_eq!(e.mmu.n_used(), 1);
        assert_eq!((e.stat(VmStat::Pages4k), e.stat(VmStat::MmuUnsync)), (0, 0));
        assert_eq!(e.mmu.indirect_shadow_pages(), 0);
        for g in 1..=4 {
            assert!(!e.mmu.gfn_is_write_tracked(g));
        }
        // A new root for the same table is a new page.
        let r2 = e.root(1);
        assert_ne!(r2, r);
        let mut list = Vec::new();
        e.mmu.put_root(r, &mut list);
        e.mmu.commit_zap(&mut list);
        assert_eq!(e.mmu.n_used(), 1);
        e.check();
        // Flipping back: generation 0 again, and the live root is zapped in turn.
        e.mmu.zap_all_fast();
        assert_eq!(e.mmu.mmu_valid_gen(), 0);
        assert_eq!(e.mmu.get(r2).state(), PageState::InvalidRoot);
        e.check();
    }

    #[test]
    fn deleting_or_moving_a_slot_zaps_everything() {
        let mut e = env(1 << 12);
        let host2 = HostRegion::new(1 << 24).unwrap();
        add_slot(&mut e.slots, &host2, 1, 1 << 32, 1 << 24, 0);
        e.mmu.slot_created(e.slots.get(1).unwrap());
        let [_, _, _, l1] = e.chain();
        e.leaf(l1, 0, 1 << 20, RO);
        e.leaf(l1, 1, 0x10, RO);
        let old = e.slots.get(1).unwrap().clone();
        // Moved: everything zapped first, then the metadata follows the slot.
        let mut moved = old.clone();
        moved.base_gfn = 1 << 22;
        e.mmu.slot_moved(&old, &moved);
        assert_eq!(e.stat(VmStat::Pages4k), 0);
        assert_eq!(e.mmu.slot_meta(1).unwrap().base_gfn, 1 << 22);
        assert!(e.mmu.slot_meta_for_gfn(1 << 20).is_none());
        e.mmu.slot_moved(&moved, &old);
        e.check();
        // Deleted: zapped and gone, limit back to the remaining slot's default.
        e.mmu.slot_deleted(&old);
        assert!(e.mmu.slot_meta(1).is_none());
        assert_eq!(e.mmu.n_max(), 4096 / 50);
        let mut slots = MemSlots::new();
        add_slot(&mut slots, &e.host, 0, 0, 1 << 24, 0);
        e.mmu.check_invariants(&slots).unwrap();
    }

    #[test]
    fn rmap_recycle_past_the_threshold() {
        let mut e = env(1 << 12);
        let r = e.root(1);
        let l3 = e.child(r, 0, 2);
        let l2 = e.child(l3, 0, 3);
        let a = e.child(l2, 0, 4);
        let b = e.child(l2, 1, 5);
        let p = e.pfn(0x100);
        let mut spte = Spte::NONPRESENT;
        for n in 0..1001 {
            let (sp, i) = if n < 512 { (a, n) } else { (b, n - 512) };
            let input = MakeSpte {
                level: 1,
                access: RO,
                pfn: p,
                old_spte: Spte::NONPRESENT,
                prefetch: false,
                synchronizing: false,
                host_writable: true,
                dirty_log: false,
                nx_huge_pages: false,
            };
            spte = make_spte(&input, || false).0;
            e.mmu.set_leaf(spte_ptr(sp, i), spte, 0x100, RO);
        }
        assert_eq!(
            (e.rmap_len(0x100, 1), e.stat(VmStat::MaxMmuRmapSize)),
            (1001, 1000)
        );
        e.check();
        // The 1002nd finds 1001 before it: all of them go, the new one included.
        let flushes = e.stat(VmStat::RemoteTlbFlushRequests);
        e.mmu.set_leaf(spte_ptr(b, 489), spte, 0x100, RO);
        assert_eq!(e.rmap_len(0x100, 1), 0);
        assert_eq!(e.stat(VmStat::Pages4k), 0);
        assert_eq!(e.stat(VmStat::MaxMmuRmapSize), 1001);
        assert_eq!(e.stat(VmStat::RemoteTlbFlushRequests), flushes + 1);
        e.check();
    }

    #[test]
    fn find_syncs_an_unsync_match() {
        let mut e = env(1 << 12);
        let [_, _, l2, l1] = e.chain();
        e.leaf(l1, 0, 4, ACC_ALL);
        let role = e.mmu.get(l1).role;
        // A sync that needs a flush.
        let before = e.stat(VmStat::RemoteTlbFlushRequests);
        let mut called = 0;
        let hit = e.mmu.find_shadow_page_with(4, role, |m, sp| {
            called += 1;
            assert!(m.get(sp).unsync);
            1
        });
        assert_eq!((hit, called), (Some(l1), 1));
        assert_eq!(e.stat(VmStat::RemoteTlbFlushRequests), before + 1);
        // A failed sync zaps the page: a miss.
        let misses = e.stat(VmStat::MmuCacheMiss);
        assert_eq!(e.mmu.find_shadow_page_with(4, role, |_, _| -1), None);
        assert_eq!(e.mmu.get(l1).state(), PageState::Free);
        assert_eq!(e.stat(VmStat::MmuCacheMiss), misses + 1);
        assert_eq!(e.mmu.spte(spte_ptr(l2, 0)), Spte::NONPRESENT);
        e.check();
    }

    #[test]
    fn upper_level_lookup_zaps_unsync_pages_of_the_gfn() {
        let mut e = env(1 << 12);
        let [_, l3, _, l1] = e.chain();
        e.leaf(l1, 0, 4, ACC_ALL);
        // The guest now uses gfn 4 as a page directory.
        let role = child_role(e.mmu.get(l3).role, 3, false, ACC_ALL);
        assert_eq!(e.mmu.find_shadow_page(4, role), None);
        assert_eq!(e.mmu.get(l1).state(), PageState::Free);
        assert_eq!(e.stat(VmStat::MmuUnsync), 0);
        e.check();
        // A level-1 lookup with another role leaves unsync pages alone.
        let [_, _, l2, _] = [0, 0, e.child(l3, 4, 0x60), 0];
        let c = e.child(l2, 0, 0x61);
        e.leaf(c, 0, 0x61, ACC_ALL);
        let other = e.mmu.get(c).role.with_access(ACC_USER);
        assert_eq!(e.mmu.find_shadow_page(0x61, other), None);
        assert!(e.mmu.get(c).unsync);
        e.check();
    }

    #[test]
    fn unprotect_zaps_every_shadow_of_a_gfn() {
        let mut e = env(1 << 12);
        let [_, _, l2, l1] = e.chain();
        let role = child_role(e.mmu.get(l2).role, 9, false, ACC_WRITE);
        let l1b = e.mmu.alloc_shadow_page(4, role);
        e.mmu.link_shadow_page(spte_ptr(l2, 9), l1b);
        e.check();
        assert_eq!(e.mmu.gfn_sps_with_gptes(4).len(), 2);
        assert!(e.mmu.unprotect_page(4));
        assert!(e.mmu.gfn_sps_with_gptes(4).is_empty());
        assert_eq!(e.mmu.get(l1).state(), PageState::Free);
        assert!(!e.mmu.unprotect_page(4));
        e.check();
    }

    #[test]
    fn mmio_sptes_are_cleared_without_books() {
        let mut e = env(1 << 12);
        let [_, _, _, l1] = e.chain();
        let p = spte_ptr(l1, 7);
        e.mmu
            .set_mmio_spte(p, make_mmio_spte(0xfee00, ACC_WRITE, 3));
        e.check();
        assert!(!e.mmu.zap_spte(p));
        assert_eq!(e.mmu.spte(p), Spte::NONPRESENT);
        e.check();
    }

    #[test]
    fn remote_flush_counts_only_kicks() {
        let mut e = env(1 << 12);
        let [_, _, l2, _] = e.chain();
        e.zap(l2);
        assert_eq!(e.stat(VmStat::RemoteTlbFlushRequests), 1);
        assert_eq!(
            e.stat(VmStat::RemoteTlbFlush),
            0,
            "no other vCPU in guest mode"
        );
        // Another vCPU is running: the flush interrupts it.
        e.mmu.set_remote_kick(|| true);
        e.mmu.unprotect_page(2);
        assert_eq!(e.stat(VmStat::RemoteTlbFlushRequests), 2);
        assert_eq!(e.stat(VmStat::RemoteTlbFlush), 1);
        e.check();
    }

    #[test]
    fn invariants_catch_broken_links() {
        let mut e = env(1 << 12);
        let [_, l3, l2, l1] = e.chain();
        e.leaf(l1, 0, 0x100, RO);
        let saved = e.mmu.get(l2).parent_ptes.clone();
        e.mmu.get_mut(l2).parent_ptes = ParentPtes::default();
        assert!(e.mmu.check_invariants(&e.slots).is_err());
        e.mmu.get_mut(l2).parent_ptes = saved;
        e.check();
        // A leaf the rmap does not know.
        let s = e.mmu.spte(spte_ptr(l1, 0));
        e.mmu.get_mut(l1).spt[1] = s;
        assert!(e.mmu.check_invariants(&e.slots).is_err());
        e.mmu.get_mut(l1).spt[1] = Spte::NONPRESENT;
        // A lost unsync bit.
        e.mmu.get_mut(l3).unsync_children = 1;
        assert!(e.mmu.check_invariants(&e.slots).is_err());
        e.mmu.get_mut(l3).unsync_children = 0;
        e.check();
    }

    /// xorshift64*: a fixed pseudo-random sequence per seed.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn pick<T: Copy>(&mut self, v: &[T]) -> Option<T> {
            (!v.is_empty()).then(|| v[self.below(v.len() as u64) as usize])
        }
    }

    /// Random operations in the order the fault, sync and reclaim paths would issue
    /// them, with every invariant checked after each step.
    #[test]
    fn random_operations_keep_the_invariants() {
        for seed in 1..=8u64 {
            let mut e = env(1 << 12);
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut held: Vec<SpIndex> = Vec::new();
            // Peaks of n_used, unsync pages, leaves; steps with a page holding
            // several unsync children.
            let mut peak = (0u64, 0u64, 0u64, 0u64);
            for step in 0..1500 {
                let live: Vec<SpIndex> = e
                    .mmu
                    .iter()
                    .filter(|(_, sp)| sp.state() == PageState::Active)
                    .map(|(i, _)| i)
                    .collect();
                match rng.below(40) {
                    0 => {
                        let (r, _) = e
                            .mmu
                            .get_shadow_page(1 + rng.below(8), root_role(), |_, _| 0);
                        e.mmu.get_root(r);
                        held.push(r);
                    }
                    1 => {
                        if let Some(k) = (!held.is_empty()).then(|| rng.below(held.len() as u64)) {
                            let r = held.swap_remove(k as usize);
                            let mut list = Vec::new();
                            e.mmu.put_root(r, &mut list);
                            e.mmu.commit_zap(&mut list);
                        }
                    }
                    2..=14 => {
                        let uppers: Vec<SpIndex> = live
                            .iter()
                            .copied()
                            .filter(|&i| e.mmu.get(i).role.level() > 1)
                            .collect();
                        let Some(p) = rng.pick(&uppers) else { continue };
                        let i = rng.below(16) as usize;
                        let old = e.mmu.spte(spte_ptr(p, i));
                        if old.is_shadow_present() && !old.is_large() {
                            continue;
                        }
                        let access = [ACC_ALL, RO, ACC_WRITE | ACC_USER][rng.below(3) as usize];
                        let role = child_role(e.mmu.get(p).role, i, false, access);
                        let (c, _) = e.mmu.get_shadow_page(1 + rng.below(40), role, |_, _| 0);
                        // The lookup may have zapped things, but never `p` (level > 1).
                        e.mmu.link_shadow_page(spte_ptr(p, i), c);
                    }
                    15..=28 => {
                        let Some(p) = rng.pick(&live) else { continue };
                        let level = e.mmu.get(p).role.level();
                        let i = rng.below(16) as usize;
                        match level {
                            1 => {
                                let access = [ACC_ALL, RO][rng.below(2) as usize];
                                e.leaf(p, i, rng.below(48), access);
                            }
                            2 => {
                                // Read-only 2M leaves (the fault path's lpage checks are
                                // not modelled here); the slot is too small for 1G.
                                e.leaf(p, i, rng.below(8) * 512, RO);
                            }
                            _ => {}
                        }
                    }
                    29 | 30 => {
                        let Some(p) = rng.pick(&live) else { continue };
                        if e.mmu.get(p).role.level() == 1 && rng.below(2) == 0 {
                            let i = rng.below(16) as usize;
                            if !e.mmu.spte(spte_ptr(p, i)).is_shadow_present() {
                                // Caching only U: make_spte takes an old SPTE with W set
                                // for a writable leaf without checking it is present (as
                                // KVM does), so a W-caching MMIO SPTE would let a later
                                // leaf skip unsync and write-tracking (MMIO caching is off
                                // on the reference machine).
                                let mmio = make_mmio_spte(0xfee00, ACC_USER, 1);
                                e.mmu.set_mmio_spte(spte_ptr(p, i), mmio);
                            }
                        } else {
                            e.mmu.zap_spte(spte_ptr(p, rng.below(16) as usize));
                        }
                    }
                    31 => {
                        if let Some(p) = rng.pick(&live) {
                            e.zap(p);
                        }
                    }
                    32 => {
                        e.mmu.zap_oldest(1 + rng.below(6));
                    }
                    33 => {
                        e.mmu.set_nr_mmu_pages(64 + rng.below(64)).unwrap();
                        let _ = e.mmu.make_mmu_pages_available();
                    }
                    34 => {
                        if rng.below(8) == 0 {
                            e.mmu.zap_all_fast();
                        } else {
                            e.mmu.unprotect_page(1 + rng.below(40));
                        }
                    }
                    _ => {
                        // mmu_sync_children from a held, still valid root.
                        let valid: Vec<SpIndex> = held
                            .iter()
                            .copied()
                            .filter(|&r| !e.mmu.get(r).role.invalid())
                            .collect();
                        let Some(r) = rng.pick(&valid) else { continue };
                        let mut batch = Vec::new();
                        while e.mmu.unsync_walk(r, &mut batch) {
                            let mut protected = false;
                            for &(sp, _) in &batch {
                                protected |= e.mmu.write_protect_gfn(e.mmu.get(sp).gfn, 1);
                            }
                            if protected {
                                e.mmu.flush_remote_tlbs();
                            }
                            for (sp, path) in std::mem::take(&mut batch) {
                                e.mmu.unlink_unsync_page(sp);
                                e.mmu.clear_parents(&path);
                            }
                        }
                        assert_eq!(e.mmu.get(r).unsync_children, 0);
                    }
                }
                if let Err(err) = e.mmu.check_invariants(&e.slots) {
                    panic!("seed {seed} step {step}: {err}");
                }
                peak.0 = peak.0.max(e.mmu.n_used());
                peak.1 = peak.1.max(e.stat(VmStat::MmuUnsync));
                peak.2 = peak
                    .2
                    .max(e.stat(VmStat::Pages4k) + e.stat(VmStat::Pages2m));
                peak.3 += u64::from(
                    e.mmu
                        .active_pages()
                        .any(|p| e.mmu.get(p).unsync_children > 1),
                );
            }
            // The run reached the states worth checking.
            assert!(
                peak.0 > 40 && peak.1 > 1 && peak.2 > 20,
                "seed {seed}: {peak:?}"
            );
            // Everything goes away with the slot.
            for r in held.drain(..) {
                let mut list = Vec::new();
                e.mmu.put_root(r, &mut list);
                e.mmu.commit_zap(&mut list);
            }
            let slot = e.slots.get(0).unwrap().clone();
            e.mmu.slot_deleted(&slot);
            assert_eq!(e.mmu.n_used(), 0, "seed {seed}");
            assert_eq!(e.mmu.iter().count(), 0);
            for s in [
                VmStat::Pages4k,
                VmStat::Pages2m,
                VmStat::Pages1g,
                VmStat::MmuUnsync,
            ] {
                assert_eq!(e.stat(s), 0, "{s:?}");
            }
        }
    }
}
