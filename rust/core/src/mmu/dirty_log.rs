//! The MMU side of dirty logging (mmu.c): write protection when a slot starts
//! logging (kvm_mmu_slot_remove_write_access), re-protection of harvested pages
//! (kvm_arch_mmu_enable_log_dirty_pt_masked), and huge-page recovery when logging
//! stops (kvm_mmu_zap_collapsible_sptes).
//!
//! Dirty-log protection clears W only and keeps MMU-writable (spte_write_protect
//! with pt_protect=false): the SPTE may become writable again on the next write
//! fault, which logs the page. Page-table protection (write tracking) clears both.

use super::rmap::{index_of, sp_of};
use super::shadow::{Mmu, KVM_MAX_HUGEPAGE_LEVEL};
use super::spte::Spte;
use crate::memslot::MemSlot;
use crate::paging::pte::PT_WRITABLE;

impl Mmu {
    /// __rmap_write_protect over the leaves mapping `gfn` at `level` (dirty-log
    /// flavour: W only). Returns whether any SPTE changed.
    fn rmap_clear_writable(&mut self, gfn: u64, level: u8) -> bool {
        let ptrs: Vec<u64> = match self.slot_meta_for_gfn(gfn) {
            Some(m) => m.rmap.iter(gfn, level).collect(),
            None => return false,
        };
        let mut changed = false;
        for p in ptrs {
            let s = self.spte(p);
            if s.is_writable() {
                self.update_spte(p, Spte(s.0 & !PT_WRITABLE));
                changed = true;
            }
        }
        changed
    }

    /// kvm_mmu_slot_apply_flags when KVM_MEM_LOG_DIRTY_PAGES goes on: write-protect
    /// every leaf of the slot (huge ones too, so the next write maps 4 KiB), then
    /// flush. Nothing is protected with KVM_DIRTY_LOG_INITIALLY_SET: the bitmap says
    /// every page is dirty, and CLEAR_DIRTY_LOG protects lazily.
    pub fn slot_logging_enabled(&mut self, slot: &MemSlot, initially_set: bool) {
        if initially_set || slot.readonly() {
            return;
        }
        let gfns: Vec<(u64, u8)> = match self.slot_meta_for_gfn(slot.base_gfn) {
            Some(m) => m.rmap.iter_all().map(|(g, l, _)| (g, l)).collect(),
            None => return,
        };
        for (gfn, level) in gfns {
            self.rmap_clear_writable(gfn, level);
        }
        // kvm_mmu_slot_remove_write_access flushes unconditionally.
        self.flush_remote_tlbs();
    }

    /// kvm_mmu_slot_apply_flags when logging stops: zap the direct leaves mapped
    /// smaller than the slot now allows, so later faults map huge pages again.
    /// Indirect level-1 pages follow the guest's 4 KiB mappings and stay.
    pub fn slot_logging_disabled(&mut self, slot: &MemSlot) {
        let entries: Vec<(u64, u8, u64)> = match self.slot_meta_for_gfn(slot.base_gfn) {
            Some(m) => m
                .rmap
                .iter_all()
                .filter(|&(_, l, _)| l < KVM_MAX_HUGEPAGE_LEVEL)
                .collect(),
            None => return,
        };
        let mut flush = false;
        for (gfn, level, p) in entries {
            let sp = self.get(sp_of(p));
            if !sp.role.direct() || sp.role.invalid() {
                continue;
            }
            debug_assert_eq!(sp.get_gfn(index_of(p)), gfn);
            // kvm_mmu_max_mapping_level for the page's range, as logging is now off.
            let max = self
                .slot_meta_for_gfn(sp.gfn)
                .map_or(1, |m| m.track.max_level(sp.gfn, KVM_MAX_HUGEPAGE_LEVEL))
                .min(super::fault::host_mapping_level(slot, sp.gfn));
            if level < max {
                flush |= self.zap_spte(p);
            }
        }
        if flush {
            self.flush_remote_tlbs();
        }
    }

    /// kvm_arch_mmu_enable_log_dirty_pt_masked: re-protect the pages of `mask` (bit i
    /// = gfn `base + i`) after a harvest. With INITIALLY_SET nothing was protected when
    /// logging started, so the huge pages over the first and last page are
    /// write-protected here (page-table flavour, as KVM does), to be split on write.
    /// Returns whether a flush is needed.
    pub fn reprotect_masked(&mut self, base: u64, mask: u64, initially_set: bool) -> bool {
        if mask == 0 {
            return false;
        }
        let mut flush = false;
        if initially_set {
            let start = base + u64::from(mask.trailing_zeros());
            let end = base + 63 - u64::from(mask.leading_zeros());
            flush |= self.write_protect_gfn(start, 2);
            if (start >> 9) != (end >> 9) {
                flush |= self.write_protect_gfn(end, 2);
            }
        }
        let mut bits = mask;
        while bits != 0 {
            let gfn = base + u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            flush |= self.rmap_clear_writable(gfn, 1);
        }
        flush
    }
}
