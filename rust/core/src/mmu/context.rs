//! The per-vCPU MMU (KVM's `struct kvm_mmu` for the shadow MMU): the cpu and root
//! roles, the current root and the cached previous roots, the vCPU's pending MMU
//! requests, and the guest events that act on roots: loading them (kvm_mmu_load),
//! CR3 switches (kvm_mmu_new_pgd, fast_pgd_switch), context resets (CR0/CR4/EFER),
//! syncing (kvm_mmu_sync_roots), INVLPG (kvm_mmu_invalidate_addr) and guest TLB
//! flushes (kvm_vcpu_flush_tlb_guest).
//!
//! Everything here runs with the vCPU's state and the VM's MMU both locked, which is
//! KVM's mmu_lock held for write.

use super::paging_tmpl::{sync_children, sync_spte};
use super::rmap::spte_ptr;
use super::role::{pae_root_role, shadow_root_role, CpuRole, Role, PT64_ROOT_4LEVEL};
use super::shadow::{Mmu, SpIndex, NIL};
use super::spte::{spte_index, Spte};
use crate::dirty_ring::DirtyRing;
use crate::errno::Result;
use crate::memslot::MemSlots;
use crate::paging::{GuestMem, GuestMmu, WalkCtx};
use crate::stats::{StatsFile, VcpuStat, VmStat};

/// KVM_MMU_NUM_PREV_ROOTS.
pub const KVM_MMU_NUM_PREV_ROOTS: usize = 3;

/// What a root "hpa" names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootHpa {
    /// INVALID_PAGE: loaded on the next entry.
    Invalid,
    /// A shadow page (4- and 5-level roots).
    Page(SpIndex),
    /// The vCPU's pae_root: four level-2 pages ([`NIL`] = INVALID_PAE_ROOT), for
    /// 32-bit, PAE and non-paging guests (KVM shadows them with PAE tables).
    Pae([SpIndex; 4]),
    /// The guest's CR3 is outside every memslot: KVM's dummy root, a zero page.
    Dummy,
}

/// `struct kvm_mmu_root_info`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Root {
    pub pgd: u64,
    pub hpa: RootHpa,
}

impl Root {
    pub const INVALID: Root = Root {
        pgd: 0,
        hpa: RootHpa::Invalid,
    };

    /// The shadow page of a 4/5-level root.
    pub fn page(&self) -> Option<SpIndex> {
        match self.hpa {
            RootHpa::Page(sp) => Some(sp),
            _ => None,
        }
    }
}

/// The vCPU's shadow MMU context (struct kvm_mmu) and its MMU requests.
#[derive(Clone, Debug)]
pub struct KvmMmu {
    pub cpu_role: CpuRole,
    pub root_role: Role,
    /// The guest walker for this context (CR3, PDPTEs, PKRU and AC refreshed per entry).
    pub guest: GuestMmu,
    pub root: Root,
    pub prev_roots: [Root; KVM_MMU_NUM_PREV_ROOTS],
    /// The PDPTEs a PAE root was built from (load_pdptrs frees the root when the
    /// registers change).
    pub root_pdptrs: [u64; 4],
    /// KVM_REQ_MMU_SYNC.
    pub req_sync: bool,
    /// KVM_REQ_TLB_FLUSH_GUEST.
    pub req_flush_guest: bool,
    /// KVM_REQ_TLB_FLUSH_CURRENT.
    pub req_flush_current: bool,
    /// KVM_REQ_MMU_FREE_OBSOLETE_ROOTS raised by this vCPU itself (dummy root).
    pub req_free_obsolete: bool,
    /// The context must be rebuilt before the next entry (KVM_SET_SREGS and the like).
    pub reset_pending: bool,
    /// Two-dimensional paging: CR3 writes and INVLPG do not exit to KVM.
    pub tdp: bool,
    /// The VM's free-obsolete-roots broadcasts and remote flush requests seen so far.
    seen_obsolete: u64,
    seen_flush: u64,
}

impl Default for KvmMmu {
    fn default() -> Self {
        KvmMmu {
            cpu_role: CpuRole::default(),
            root_role: Role::default(),
            guest: GuestMmu::new(&WalkCtx::default()),
            root: Root::INVALID,
            prev_roots: [Root::INVALID; KVM_MMU_NUM_PREV_ROOTS],
            root_pdptrs: [0; 4],
            req_sync: false,
            req_flush_guest: false,
            req_flush_current: false,
            req_free_obsolete: false,
            reset_pending: true,
            tdp: false,
            seen_obsolete: 0,
            seen_flush: 0,
        }
    }
}

/// What an MMU operation works on: the VM's shadow MMU and memslots, and the
/// vCPU's counters (the parts of struct kvm and struct kvm_vcpu a fault touches).
pub struct MmuEnv<'a> {
    pub mmu: &'a mut Mmu,
    pub slots: &'a MemSlots,
    pub stats: &'a StatsFile,
    /// The running vCPU's dirty ring, if the VM logs through rings.
    pub ring: Option<&'a DirtyRing>,
    /// The VM uses two-dimensional paging (direct gpa -> hpa tables) instead of
    /// shadowing the guest's tables.
    pub tdp: bool,
}

impl<'a> MmuEnv<'a> {
    #[inline]
    pub fn stat(&self, s: VcpuStat) {
        self.stats.add(s as usize, 1);
    }

    /// mark_page_dirty_in_slot for the running vCPU: its ring, else the bitmap.
    #[inline]
    pub fn mark_page_dirty(&self, gfn: u64) {
        mark_page_dirty(self.slots, self.ring, gfn);
    }

    /// Guest memory for walks and emulated accesses: the memslots, with KVM's own
    /// writes (A/D bits) logged to this vCPU.
    pub fn guest_mem(&self) -> LoggedMem<'a> {
        LoggedMem {
            slots: self.slots,
            ring: self.ring,
        }
    }
}

/// mark_page_dirty_in_slot: the ring of the vCPU that wrote (entries are slot and
/// slot-relative gfn), else the slot's bitmap; nothing for slots that do not log.
#[inline]
pub fn mark_page_dirty(slots: &MemSlots, ring: Option<&DirtyRing>, gfn: u64) {
    let Some(slot) = slots.lookup(gfn) else {
        return;
    };
    if !slot.dirty_logging() {
        return;
    }
    let rel = gfn - slot.base_gfn;
    match ring {
        Some(r) => r.push((u32::from(slot.as_id) << 16) | u32::from(slot.id), rel),
        None => {
            if let Some(b) = &slot.dirty_bitmap {
                b.set(rel);
            }
        }
    }
}

/// The memslots as guest memory for a vCPU (its ring gets the walker's writes).
#[derive(Clone, Copy)]
pub struct LoggedMem<'a> {
    pub slots: &'a MemSlots,
    pub ring: Option<&'a DirtyRing>,
}

impl GuestMem for LoggedMem<'_> {
    #[inline]
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        self.slots.read(gpa, buf)
    }
    #[inline]
    fn read_gpte(&self, gpa: u64, size: usize) -> Option<u64> {
        self.slots.read_gpte(gpa, size)
    }
    #[inline]
    fn cmpxchg(&self, gpa: u64, size: usize, old: u64, new: u64) -> std::result::Result<bool, ()> {
        self.slots.cmpxchg(gpa, size, old, new)
    }
    fn mark_dirty(&self, gfn: u64) {
        mark_page_dirty(self.slots, self.ring, gfn);
    }
}

/// One step of a shadow walk (struct kvm_shadow_walk_iterator): the SPTE for the
/// address at `level`, in page `sp`.
#[derive(Clone, Copy, Debug)]
pub struct ShadowStep {
    pub level: u8,
    pub sp: SpIndex,
    pub index: usize,
}

impl ShadowStep {
    pub fn sptep(&self) -> u64 {
        spte_ptr(self.sp, self.index)
    }
}

/// shadow_walk_init_using_root: where a shadow walk of `addr` starts under `root`
/// (None: no valid root, or an invalid PAE root for this quarter).
#[inline]
pub fn walk_start(root: &RootHpa, root_level: u8, addr: u64) -> Option<(u8, SpIndex)> {
    match *root {
        RootHpa::Page(sp) => Some((root_level, sp)),
        RootHpa::Pae(r) => {
            let sp = r[super::role::pae_root_index(addr)];
            (sp != NIL).then_some((2, sp))
        }
        RootHpa::Invalid | RootHpa::Dummy => None,
    }
}

/// for_each_shadow_entry_using_root: call `f` for each SPTE on the path of `addr`,
/// top-down, while it returns true; stops after a leaf or a non-present SPTE.
pub fn for_each_shadow_entry(
    mmu: &Mmu,
    root: &RootHpa,
    root_level: u8,
    addr: u64,
    mut f: impl FnMut(&Mmu, ShadowStep) -> bool,
) {
    let Some((mut level, mut sp)) = walk_start(root, root_level, addr) else {
        return;
    };
    loop {
        let step = ShadowStep {
            level,
            sp,
            index: spte_index(addr, level),
        };
        if !f(mmu, step) {
            return;
        }
        let s = mmu.get(sp).spt[step.index];
        if !s.is_shadow_present() || s.is_leaf(level) {
            return;
        }
        sp = s.child_index();
        level -= 1;
    }
}

/// The leaf (or last) step of the shadow path of `addr` and its SPTE.
#[inline]
pub fn shadow_leaf(
    mmu: &Mmu,
    root: &RootHpa,
    root_level: u8,
    addr: u64,
) -> Option<(ShadowStep, Spte)> {
    let (mut level, mut sp) = walk_start(root, root_level, addr)?;
    loop {
        let index = spte_index(addr, level);
        let s = mmu.get(sp).spt[index];
        if !s.is_shadow_present() || s.is_leaf(level) {
            return Some((ShadowStep { level, sp, index }, s));
        }
        sp = s.child_index();
        level -= 1;
    }
}

impl KvmMmu {
    /// The root level of the shadow tables (3 for PAE roots).
    #[inline]
    pub fn root_level(&self) -> u8 {
        self.root_role.level()
    }

    /// Whether the context is stale for `ctx`: the role-relevant registers changed
    /// without going through a reset (KVM resets on every such change).
    fn roles_stale(&self, ctx: &WalkCtx) -> bool {
        // KVM_MMU_CR0_ROLE_BITS, KVM_MMU_CR4_ROLE_BITS, KVM_MMU_EFER_ROLE_BITS.
        const CR0: u64 = (1 << 31) | (1 << 16);
        const CR4: u64 = (1 << 4) | (1 << 5) | (1 << 20) | (1 << 21) | (1 << 22) | (1 << 12);
        const EFER: u64 = (1 << 8) | (1 << 10) | (1 << 11);
        let g = &self.guest.ctx;
        (g.cr0 ^ ctx.cr0) & CR0 != 0
            || (g.cr4 ^ ctx.cr4) & CR4 != 0
            || (g.efer ^ ctx.efer) & EFER != 0
            || g.maxphyaddr != ctx.maxphyaddr
            || g.gbpages != ctx.gbpages
    }

    /// kvm_init_mmu: roles and the walker from the CPU state; with TDP the root role
    /// does not depend on the guest (kvm_calc_tdp_mmu_root_page_role, 4 levels).
    pub fn init(&mut self, ctx: &WalkCtx, tdp: bool) {
        self.cpu_role = CpuRole::calc(ctx, false);
        self.tdp = tdp;
        self.root_role = if tdp {
            super::role::tdp_root_role(PT64_ROOT_4LEVEL, false)
        } else {
            shadow_root_role(&self.cpu_role)
        };
        self.guest = GuestMmu::new(ctx);
    }

    /// The registers the walker reads live (CR3, PDPTEs, PKRU, EFLAGS.AC).
    #[inline]
    pub fn refresh(&mut self, ctx: &WalkCtx) {
        self.guest.ctx = *ctx;
    }

    /// kvm_mmu_reset_context: free every root, then rebuild the context.
    pub fn reset_context(&mut self, env: &mut MmuEnv<'_>, ctx: &WalkCtx) {
        let old_role = self.root_role;
        self.init(ctx, env.tdp);
        self.reset_pending = false;
        // With TDP the root outlives guest paging changes (KVM keeps it when only the
        // CPU role changed); the shadow MMU unloads every root.
        if !(env.tdp && old_role == self.root_role && self.root.hpa != RootHpa::Invalid) {
            self.free_roots(env.mmu, true, [true; KVM_MMU_NUM_PREV_ROOTS]);
        }
    }

    /// kvm_mmu_free_roots for the current root (if `current`) and the chosen previous roots.
    pub fn free_roots(
        &mut self,
        mmu: &mut Mmu,
        current: bool,
        prev: [bool; KVM_MMU_NUM_PREV_ROOTS],
    ) {
        let mut invalid_list = Vec::new();
        for (i, &free) in prev.iter().enumerate() {
            if free {
                free_root(mmu, &mut self.prev_roots[i], &mut invalid_list);
            }
        }
        if current {
            free_root(mmu, &mut self.root, &mut invalid_list);
        }
        mmu.commit_zap(&mut invalid_list);
    }

    /// A PAE guest's root no longer matches its PDPTE registers.
    #[inline]
    pub fn pdptrs_changed(&self, ctx: &WalkCtx) -> bool {
        matches!(self.root.hpa, RootHpa::Pae(_))
            && !self.root_role.direct()
            && self.cpu_role.base.level() == 3
            && ctx.pdptrs != self.root_pdptrs
    }

    /// The requests a vCPU services before entering the guest (vcpu_enter_guest), then
    /// kvm_mmu_reload. `ctx` is the CPU state now.
    pub fn enter(&mut self, env: &mut MmuEnv<'_>, ctx: &WalkCtx) -> Result<()> {
        // The common case: nothing pending, the context current, the root loaded.
        if !self.reset_pending
            && !self.req_sync
            && !self.req_flush_guest
            && !self.req_flush_current
            && !self.req_free_obsolete
            && matches!(self.root.hpa, RootHpa::Page(_) | RootHpa::Pae(_))
            && env.mmu.free_obsolete_roots_requests() == self.seen_obsolete
            && env.mmu.stats().get(VmStat::RemoteTlbFlushRequests as usize) == self.seen_flush
            && !self.roles_stale(ctx)
            && (self.root_role.direct() || self.root.pgd == ctx.cr3)
            && !self.pdptrs_changed(ctx)
        {
            self.refresh(ctx);
            return Ok(());
        }
        if self.reset_pending || self.roles_stale(ctx) {
            self.reset_context(env, ctx);
        }
        if self.pdptrs_changed(ctx) {
            // load_pdptrs: new PDPTE values free the current (PAE) root.
            self.free_roots(env.mmu, true, [false; KVM_MMU_NUM_PREV_ROOTS]);
        }
        self.refresh(ctx);
        if !self.root_role.direct() && self.root.hpa != RootHpa::Invalid && self.root.pgd != ctx.cr3
        {
            // CR3 changed by a path that did not tell the MMU (an INIT, a state
            // restore): what kvm_set_cr3 would have done.
            self.new_pgd(env.mmu, ctx.cr3);
            self.req_sync = true;
        }
        let broadcasts = env.mmu.free_obsolete_roots_requests();
        if broadcasts != self.seen_obsolete || self.req_free_obsolete {
            self.seen_obsolete = broadcasts;
            self.req_free_obsolete = false;
            self.free_obsolete_roots(env.mmu);
        }
        if std::mem::take(&mut self.req_sync) {
            self.sync_roots(env);
        }
        let flushes = env.mmu.stats().get(VmStat::RemoteTlbFlushRequests as usize);
        if flushes != self.seen_flush {
            // KVM_REQ_TLB_FLUSH: kvm_vcpu_flush_tlb_all, which covers the current context.
            self.seen_flush = flushes;
            self.req_flush_current = false;
            env.stat(VcpuStat::TlbFlush);
        }
        if std::mem::take(&mut self.req_flush_current) {
            // kvm_vcpu_flush_tlb_current.
            env.stat(VcpuStat::TlbFlush);
        }
        if std::mem::take(&mut self.req_flush_guest) {
            self.flush_tlb_guest(env);
        }
        if self.root.hpa == RootHpa::Invalid {
            self.load(env)?;
            // The load's own remote flushes are for this entry.
            self.seen_flush = env.mmu.stats().get(VmStat::RemoteTlbFlushRequests as usize);
        }
        Ok(())
    }

    /// kvm_mmu_free_obsolete_roots: roots of an old generation, invalid roots, and
    /// roots without a shadow page (PAE and dummy roots) are freed.
    fn free_obsolete_roots(&mut self, mmu: &mut Mmu) {
        let obsolete = |r: &Root| match r.hpa {
            RootHpa::Invalid => false,
            RootHpa::Page(sp) => mmu.is_obsolete(sp),
            RootHpa::Pae(_) | RootHpa::Dummy => true,
        };
        let current = obsolete(&self.root);
        let prev = [0, 1, 2].map(|i| obsolete(&self.prev_roots[i]));
        if current || prev.iter().any(|&b| b) {
            self.free_roots(mmu, current, prev);
        }
    }

    /// kvm_mmu_load: allocate the roots (mmu_alloc_shadow_roots / mmu_alloc_direct_roots),
    /// then sync them.
    pub fn load(&mut self, env: &mut MmuEnv<'_>) -> Result<()> {
        let cr3 = self.guest.ctx.cr3;
        let role = self.root_role;
        if env.tdp {
            // mmu_alloc_direct_roots: one root for the whole guest-physical space.
            env.mmu.make_mmu_pages_available()?;
            let sp = alloc_root(env.mmu, 0, role);
            self.root = Root {
                pgd: 0,
                hpa: RootHpa::Page(sp),
            };
            return Ok(());
        }
        if role.direct() {
            env.mmu.make_mmu_pages_available()?;
            // Non-paging guests: four PAE roots covering 4 GiB identity-mapped.
            let mut pae = [NIL; 4];
            for (i, r) in pae.iter_mut().enumerate() {
                *r = alloc_root(env.mmu, (i as u64) << 18, pae_root_role(role, i));
            }
            self.root = Root {
                pgd: 0,
                hpa: RootHpa::Pae(pae),
            };
            return Ok(());
        }
        let root_gfn = (cr3 & crate::paging::pte::PT64_BASE_ADDR_MASK) >> 12;
        let visible = |gfn: u64| env.slots.lookup(gfn).is_some();
        if !visible(root_gfn) {
            self.root = Root {
                pgd: cr3,
                hpa: RootHpa::Dummy,
            };
            return Ok(());
        }
        env.mmu.make_mmu_pages_available()?;
        if self.cpu_role.base.level() >= PT64_ROOT_4LEVEL {
            let sp = alloc_root(env.mmu, root_gfn, role);
            self.root = Root {
                pgd: cr3,
                hpa: RootHpa::Page(sp),
            };
        } else {
            let mut pae = [NIL; 4];
            let pae_guest = self.cpu_role.base.level() == 3;
            for (i, r) in pae.iter_mut().enumerate() {
                let gfn = if pae_guest {
                    let pdpte = self.guest.ctx.pdptrs[i];
                    if pdpte & 1 == 0
                        || !visible((pdpte & crate::paging::pte::PT64_BASE_ADDR_MASK) >> 12)
                    {
                        continue;
                    }
                    (pdpte & crate::paging::pte::PT64_BASE_ADDR_MASK) >> 12
                } else {
                    root_gfn
                };
                *r = alloc_root(env.mmu, gfn, pae_root_role(role, i));
            }
            self.root = Root {
                pgd: cr3,
                hpa: RootHpa::Pae(pae),
            };
            self.root_pdptrs = self.guest.ctx.pdptrs;
        }
        self.sync_roots(env);
        Ok(())
    }

    /// kvm_mmu_sync_roots: sync every unsync page reachable from the current root.
    pub fn sync_roots(&mut self, env: &mut MmuEnv<'_>) {
        if self.root_role.direct() {
            return;
        }
        let guest = self.guest;
        let role = self.root_role;
        let mem = env.guest_mem();
        match self.root.hpa {
            RootHpa::Page(sp) => {
                let page = env.mmu.get(sp);
                if page.unsync || page.unsync_children != 0 {
                    sync_children(env.mmu, mem, &guest, role, sp);
                }
            }
            RootHpa::Pae(r) => {
                for sp in r {
                    if sp != NIL {
                        sync_children(env.mmu, mem, &guest, role, sp);
                    }
                }
            }
            RootHpa::Invalid | RootHpa::Dummy => {}
        }
    }

    /// kvm_mmu_sync_prev_roots: previous roots with unsync pages are simply freed.
    fn sync_prev_roots(&mut self, mmu: &mut Mmu) {
        let prev = [0, 1, 2].map(|i| {
            self.prev_roots[i].page().is_some_and(|sp| {
                let p = mmu.get(sp);
                p.unsync || p.unsync_children != 0
            })
        });
        if prev.iter().any(|&b| b) {
            self.free_roots(mmu, false, prev);
        }
    }

    /// kvm_vcpu_flush_tlb_guest on the shadow MMU: a forced sync of every root.
    pub fn flush_tlb_guest(&mut self, env: &mut MmuEnv<'_>) {
        env.stat(VcpuStat::TlbFlush);
        self.sync_roots(env);
        self.sync_prev_roots(env.mmu);
    }

    /// kvm_mmu_new_pgd: switch to the root for `new_pgd`, reusing the current or a
    /// cached previous root when its role and pgd match (fast_pgd_switch).
    pub fn new_pgd(&mut self, mmu: &mut Mmu, new_pgd: u64) {
        let role = self.root_role;
        // PAE roots (and dummy roots, which have no page) are never cached.
        if matches!(self.root.hpa, RootHpa::Pae(_) | RootHpa::Dummy) {
            self.free_roots(mmu, true, [false; KVM_MMU_NUM_PREV_ROOTS]);
        }
        let usable = |mmu: &Mmu, r: &Root| match r.hpa {
            RootHpa::Page(sp) => (role.direct() || r.pgd == new_pgd) && mmu.get(sp).role == role,
            _ => false,
        };
        let found = if self.root.hpa != RootHpa::Invalid {
            // cached_root_find_and_keep_current: rotate the current root through the cache.
            if usable(mmu, &self.root) {
                true
            } else {
                let mut hit = false;
                for i in 0..KVM_MMU_NUM_PREV_ROOTS {
                    std::mem::swap(&mut self.root, &mut self.prev_roots[i]);
                    if usable(mmu, &self.root) {
                        hit = true;
                        break;
                    }
                }
                if !hit {
                    self.free_roots(mmu, true, [false; KVM_MMU_NUM_PREV_ROOTS]);
                }
                hit
            }
        } else {
            // cached_root_find_without_current.
            match (0..KVM_MMU_NUM_PREV_ROOTS).find(|&i| usable(mmu, &self.prev_roots[i])) {
                Some(i) => {
                    std::mem::swap(&mut self.root, &mut self.prev_roots[i]);
                    for j in i..KVM_MMU_NUM_PREV_ROOTS - 1 {
                        self.prev_roots[j] = self.prev_roots[j + 1];
                    }
                    self.prev_roots[KVM_MMU_NUM_PREV_ROOTS - 1] = Root::INVALID;
                    true
                }
                None => false,
            }
        };
        if !found {
            return;
        }
        // KVM_REQ_LOAD_MMU_PGD; flush_on_reuse is off. A reused root's flood count restarts.
        if let RootHpa::Page(sp) = self.root.hpa {
            mmu.get_mut(sp).write_flooding_count = 0;
        }
    }

    /// MOV to CR3 after the architectural checks (kvm_set_cr3): switch roots if the
    /// value changed, then flush (and so sync) unless CR3[63] asked not to.
    pub fn set_cr3(
        &mut self,
        mmu: &mut Mmu,
        old_cr3: u64,
        new_cr3: u64,
        pcide: bool,
        noflush: bool,
    ) {
        if self.tdp {
            // The guest owns CR3 under NPT/EPT: no exit, no root change.
            return;
        }
        if new_cr3 != old_cr3 {
            self.new_pgd(mmu, new_cr3);
        }
        if noflush {
            return;
        }
        // kvm_invalidate_pcid: the current PCID is flushed, which syncs its root.
        self.req_sync = true;
        self.req_flush_current = true;
        if pcide {
            let pcid = new_cr3 & 0xfff;
            let prev = [0, 1, 2].map(|i| {
                self.prev_roots[i].hpa != RootHpa::Invalid && self.prev_roots[i].pgd & 0xfff == pcid
            });
            self.free_roots(mmu, false, prev);
        }
    }

    /// INVLPG (kvm_mmu_invlpg): for the current and every previous root, walk the
    /// path of `gva` and resync the entry of each unsync page on it.
    pub fn invlpg(&mut self, env: &mut MmuEnv<'_>, gva: u64) {
        if self.tdp {
            // Not intercepted with NPT/EPT: the CPU flushes its own TLB.
            return;
        }
        env.stat(VcpuStat::Invlpg);
        let la57 = self.cpu_role.cr4_la57;
        if self.cpu_role.efer_lma && !crate::paging::is_canonical(gva, la57) {
            return;
        }
        if self.root_role.direct() {
            return;
        }
        let gva = if self.cpu_role.efer_lma {
            gva
        } else {
            gva & 0xffff_ffff
        };
        let roots = [
            self.root,
            self.prev_roots[0],
            self.prev_roots[1],
            self.prev_roots[2],
        ];
        for r in roots {
            self.invalidate_addr(env, &r.hpa, gva);
        }
    }

    /// __kvm_mmu_invalidate_addr.
    fn invalidate_addr(&self, env: &mut MmuEnv<'_>, root: &RootHpa, gva: u64) {
        let mut path = Vec::with_capacity(5);
        for_each_shadow_entry(env.mmu, root, self.root_level(), gva, |mmu, step| {
            path.push(step);
            mmu.get(step.sp).unsync_children != 0
        });
        for step in path {
            // Pages below may have been zapped by an earlier step's sync.
            let sp = env.mmu.get(step.sp);
            if !sp.unsync || sp.role.invalid() {
                continue;
            }
            if sp.spt[step.index] == Spte::NONPRESENT {
                continue;
            }
            let ret = sync_spte(env.mmu, env.guest_mem(), &self.guest, step.sp, step.index);
            if ret < 0 {
                env.mmu.zap_spte(step.sptep());
            }
            if ret != 0 {
                env.mmu.flush_remote_tlbs();
            }
        }
    }

    /// Every root this vCPU holds (current first), for inspection.
    pub fn roots(&self) -> impl Iterator<Item = (usize, Root)> + '_ {
        std::iter::once(self.root)
            .chain(self.prev_roots)
            .enumerate()
            .filter(|(_, r)| r.hpa != RootHpa::Invalid)
    }
}

/// mmu_alloc_root: find or create the root page and take a reference.
fn alloc_root(mmu: &mut Mmu, gfn: u64, role: Role) -> SpIndex {
    let (sp, _) = mmu.get_shadow_page(gfn, role, |_, _| 0);
    mmu.get_root(sp);
    sp
}

/// mmu_free_root_page for each page a root holds, then INVALID_PAGE.
fn free_root(mmu: &mut Mmu, root: &mut Root, invalid_list: &mut Vec<SpIndex>) {
    match root.hpa {
        RootHpa::Page(sp) => mmu.put_root(sp, invalid_list),
        RootHpa::Pae(r) => {
            for sp in r {
                if sp != NIL {
                    mmu.put_root(sp, invalid_list);
                }
            }
        }
        RootHpa::Invalid | RootHpa::Dummy => {}
    }
    *root = Root::INVALID;
}
