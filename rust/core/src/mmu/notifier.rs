//! Host translation updates (mmu.txt "Host translation updates"; kvm_main.c's MMU
//! notifier callbacks and mmu.c's kvm_unmap_gfn_range / kvm_age_gfn /
//! kvm_test_age_gfn): the host changing the memory behind the guest.
//!
//! An invalidation converts its hva range, per overlapping memslot, into gfns and
//! zaps every SPTE mapping them, found through the rmaps; between its start and its
//! end no fault may install an SPTE for those gfns (the fault path retries), and the
//! end bumps the sequence number. The simulator's host events (discard, migrate,
//! write-protect) are each a start, the host's own change, and an end; aging clears
//! or tests the Accessed bits of the SPTEs over a range.

use super::context::MmuEnv;
use super::fault::PfRet;
use super::rmap::{kvm_hpage_gfn_shift, SptePtr};
use super::shadow::{Mmu, KVM_MAX_HUGEPAGE_LEVEL};
use crate::errno::{Errno, Result};
use crate::memslot::MemSlots;
use crate::paging::pte::PT_ACCESSED;

/// The gfn ranges, per memslot, that [hva, hva + len) backs (hva_to_gfn_memslot).
pub fn hva_to_gfns(slots: &MemSlots, hva: u64, len: u64) -> Vec<(u64, u64)> {
    let end = hva.saturating_add(len);
    slots
        .iter()
        .filter_map(|s| {
            let s_start = s.userspace_addr;
            let s_end = s.userspace_addr + (s.npages << 12);
            let (a, b) = (hva.max(s_start), end.min(s_end));
            (a < b).then(|| {
                let g0 = s.base_gfn + ((a - s_start) >> 12);
                let g1 = s.base_gfn + ((b - s_start).div_ceil(4096));
                (g0, g1)
            })
        })
        .collect()
}

impl Mmu {
    /// is_page_fault_stale's mmu_invalidate_retry_gfn: a fault for `gfn` that found
    /// `host` must not install an SPTE now. Only a fault with a memslot waits (MMIO
    /// is emulated).
    #[inline]
    pub fn invalidation_blocks(&self, host: &super::fault::HostPage, gfn: u64) -> bool {
        host.pfn.is_some()
            && self.invalidate_in_progress > 0
            && gfn >= self.invalidate_range.0
            && gfn < self.invalidate_range.1
    }

    /// Whether a running invalidation covers any gfn of [start, end) (the ranges
    /// themselves, not their hull).
    pub fn invalidation_overlaps(&self, start: u64, end: u64) -> bool {
        self.invalidate_in_progress > 0
            && self
                .invalidate_ranges
                .iter()
                .any(|&(a, b)| a < end && start < b)
    }

    /// The leaves mapping gfns [start, end) at every level (rmap frames overlapping).
    fn leaves_in(&self, start: u64, end: u64) -> Vec<SptePtr> {
        let mut out = Vec::new();
        let Some(meta) = self.slot_meta_for_gfn(start) else {
            return out;
        };
        for level in 1..=KVM_MAX_HUGEPAGE_LEVEL {
            let shift = kvm_hpage_gfn_shift(level);
            let (mut f, last) = (start >> shift, (end - 1) >> shift);
            // Walk the frames, or, for a huge range, the rmap itself.
            if last - f > meta.rmap.count() as u64 {
                for (g, l, p) in meta.rmap.iter_all() {
                    if l == level
                        && g < end
                        && (g >> shift) >= (start >> shift)
                        && (g >> shift) <= last
                    {
                        out.push(p);
                    }
                }
                continue;
            }
            while f <= last {
                // A frame may start below the slot: name it by a gfn inside both.
                out.extend(meta.rmap.iter((f << shift).max(start), level));
                f += 1;
            }
        }
        out
    }

    /// kvm_unmap_gfn_range: zap every leaf over gfns [start, end) (one memslot's
    /// range). Returns whether a flush is needed.
    pub fn zap_gfn_range(&mut self, start: u64, end: u64) -> bool {
        let mut flush = false;
        for p in self.leaves_in(start, end) {
            flush |= self.zap_spte(p);
        }
        flush
    }

    /// kvm_age_gfn (`clear`) or kvm_test_age_gfn: whether a leaf over [start, end)
    /// was accessed; clearing takes the A bits away (shadow paging has A/D bits).
    pub fn age_gfn_range(&mut self, start: u64, end: u64, clear: bool) -> bool {
        let mut young = false;
        for p in self.leaves_in(start, end) {
            let s = self.spte(p);
            if s.is_shadow_present() && s.is_accessed() {
                young = true;
                if !clear {
                    return true;
                }
                self.update_spte(p, super::spte::Spte(s.0 & !PT_ACCESSED));
            }
        }
        young
    }
}

impl crate::vm::Vm {
    /// invalidate_range_start: zap what [hva, hva + len) backs, flush, and block
    /// faults for those gfns until [`Vm::host_invalidate_end`].
    pub fn host_invalidate_start(&self, hva: u64, len: u64) {
        let mut guard = self.state();
        let st = &mut *guard;
        let ranges = hva_to_gfns(&st.memslots, hva, len);
        let mmu = &mut st.mmu;
        // mmu_invalidate_begin: a new run of invalidations starts from no range.
        if mmu.invalidate_in_progress == 0 {
            mmu.invalidate_range = (u64::MAX, 0);
        }
        mmu.invalidate_in_progress += 1;
        let mut flush = false;
        for (a, b) in ranges {
            // mmu_invalidate_range_add: the hull of every concurrent range.
            mmu.invalidate_range = (mmu.invalidate_range.0.min(a), mmu.invalidate_range.1.max(b));
            mmu.invalidate_ranges.push((a, b));
            flush |= mmu.zap_gfn_range(a, b);
        }
        if flush {
            mmu.flush_remote_tlbs();
        }
    }

    /// invalidate_range_end: the sequence moves on, then the range is released.
    pub fn host_invalidate_end(&self) -> Result<()> {
        let mut st = self.state();
        if st.mmu.invalidate_in_progress == 0 {
            return Err(Errno::EINVAL);
        }
        st.mmu.invalidate_seq += 1;
        st.mmu.invalidate_in_progress -= 1;
        if st.mmu.invalidate_in_progress == 0 {
            st.mmu.invalidate_ranges.clear();
        }
        Ok(())
    }

    /// The host region and offset behind [hva, hva + len), page aligned.
    fn host_range(
        hva: u64,
        len: u64,
    ) -> Result<(std::sync::Arc<crate::hostmem::HostRegion>, usize)> {
        if hva & 0xfff != 0 || len & 0xfff != 0 || len == 0 {
            return Err(Errno::EINVAL);
        }
        crate::hostmem::HostRegion::lookup(hva, len).ok_or(Errno::EFAULT)
    }

    /// The host discards [hva, hva + len) (MADV_DONTNEED, or munmap and a fresh map):
    /// the guest sees zero pages, new frames, on its next access.
    pub fn host_discard(&self, hva: u64, len: u64) -> Result<()> {
        let (region, off) = Self::host_range(hva, len)?;
        self.host_invalidate_start(hva, len);
        let r = region.discard(off, len as usize);
        for page in (hva..hva + len).step_by(4096) {
            region.new_frame(page);
            region.set_host_readonly(page, false);
        }
        self.host_invalidate_end()?;
        r
    }

    /// The host migrates the page at `hva` to a new frame (same contents).
    pub fn host_migrate(&self, hva: u64) -> Result<u64> {
        let (region, _) = Self::host_range(hva, 4096)?;
        self.host_invalidate_start(hva, 4096);
        let pfn = region.new_frame(hva);
        self.host_invalidate_end()?;
        Ok(pfn)
    }

    /// The host maps [hva, hva + len) read-only (KSM merging, fork's COW): a guest
    /// write then breaks the COW, which gives the page a new frame.
    pub fn host_write_protect(&self, hva: u64, len: u64) -> Result<()> {
        let (region, _) = Self::host_range(hva, len)?;
        self.host_invalidate_start(hva, len);
        for page in (hva..hva + len).step_by(4096) {
            region.set_host_readonly(page, true);
        }
        self.host_invalidate_end()
    }

    /// clear_flush_young / clear_young (`flush`: the first one) / test_young
    /// (`clear` false): whether a page of [hva, hva + len) was accessed.
    pub fn host_age(&self, hva: u64, len: u64, clear: bool, flush: bool) -> bool {
        let mut guard = self.state();
        let st = &mut *guard;
        let mut young = false;
        for (a, b) in hva_to_gfns(&st.memslots, hva, len) {
            young |= st.mmu.age_gfn_range(a, b, clear);
            if young && !clear {
                return true;
            }
        }
        if young && clear && flush {
            st.mmu.flush_remote_tlbs();
        }
        young
    }
}

/// A write fault on a page the host maps read-only: get_user_pages(FOLL_WRITE)
/// copies it to a new frame, and the host's change invalidates the old mapping
/// (which bumps the sequence, so the fault retries and maps the new frame).
pub fn break_cow(env: &mut MmuEnv<'_>, gfn: u64) -> PfRet {
    if let Some(slot) = env.slots.lookup(gfn) {
        let hva = slot.gfn_to_hva(gfn);
        if env.mmu.zap_gfn_range(gfn, gfn + 1) {
            env.mmu.flush_remote_tlbs();
        }
        slot.host.new_frame(hva);
        slot.host.set_host_readonly(hva, false);
        env.mmu.invalidate_seq += 1;
    }
    PfRet::Retry
}
