//! The per-vCPU dirty ring (virt/kvm/dirty_ring.c): an array of `struct
//! kvm_dirty_gfn` in the vCPU's mmap area at page KVM_DIRTY_LOG_PAGE_OFFSET, which
//! KVM fills (flags 0 -> DIRTY) and userspace harvests (-> RESET) in order;
//! KVM_RESET_DIRTY_RINGS gives the harvested entries back (-> 0) and re-protects
//! their pages, coalescing runs within a slot into 64-page masks.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use crate::errno::{Errno, Result};
use crate::hostmem::SharedMapping;

/// sizeof(struct kvm_dirty_gfn).
pub const ENTRY_SIZE: u64 = 16;
/// KVM_DIRTY_RING_MAX_ENTRIES.
pub const MAX_ENTRIES: u64 = 65536;
/// KVM_DIRTY_RING_RSVD_ENTRIES; no PML buffer here (shadow paging).
pub const RSVD_ENTRIES: u64 = 64;
pub const KVM_DIRTY_GFN_F_DIRTY: u32 = 1;
pub const KVM_DIRTY_GFN_F_RESET: u32 = 2;

/// kvm_vm_ioctl_enable_dirty_log_ring's size checks (bytes).
pub fn check_size(size: u64) -> Result<()> {
    if size == 0 || !size.is_power_of_two() {
        return Err(Errno::EINVAL);
    }
    if size < RSVD_ENTRIES * ENTRY_SIZE || size < crate::uapi::PAGE_SIZE {
        return Err(Errno::EINVAL);
    }
    if size > MAX_ENTRIES * ENTRY_SIZE {
        return Err(Errno::E2BIG);
    }
    Ok(())
}

struct Indices {
    dirty_index: u32,
    reset_index: u32,
}

/// One vCPU's ring, mapped from the vCPU's memfd.
pub struct DirtyRing {
    map: SharedMapping,
    entries: u32,
    idx: Mutex<Indices>,
}

impl std::fmt::Debug for DirtyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = self.idx.lock().unwrap_or_else(|e| e.into_inner());
        write!(
            f,
            "DirtyRing({} entries, dirty {} reset {})",
            self.entries, i.dirty_index, i.reset_index
        )
    }
}

impl DirtyRing {
    /// Map `size` bytes of `fd` at page KVM_DIRTY_LOG_PAGE_OFFSET (the file must be
    /// that long).
    pub fn new(fd: &std::os::fd::OwnedFd, size: u64) -> Result<DirtyRing> {
        let offset = (crate::uapi::KVM_DIRTY_LOG_PAGE_OFFSET * crate::uapi::PAGE_SIZE) as i64;
        let map = SharedMapping::new_at(fd.as_fd(), offset, size as usize)?;
        Ok(DirtyRing {
            map,
            entries: (size / ENTRY_SIZE) as u32,
            idx: Mutex::new(Indices {
                dirty_index: 0,
                reset_index: 0,
            }),
        })
    }

    fn flags(&self, i: u32) -> &AtomicU32 {
        let off = ((i & (self.entries - 1)) as u64 * ENTRY_SIZE) as usize;
        self.map.atomic_u32(off).expect("entry inside the ring")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Indices> {
        self.idx.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Entries pushed and not yet reset.
    pub fn used(&self) -> u32 {
        let i = self.lock();
        i.dirty_index.wrapping_sub(i.reset_index)
    }

    /// kvm_dirty_ring_soft_full: KVM_RUN refuses to enter the guest from here on.
    pub fn soft_full(&self) -> bool {
        u64::from(self.used()) >= u64::from(self.entries) - RSVD_ENTRIES
    }

    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// kvm_dirty_ring_push: slot and offset first, then the DIRTY flag (release).
    /// Guest accesses stop at the soft limit, but KVM's own writes from a vCPU ioctl
    /// (the wall-clock MSRs) can fill the ring: then, as KVM does after its one-time
    /// warning, the push overwrites entries userspace has not handed back.
    pub fn push(&self, slot: u32, offset: u64) {
        let mut i = self.lock();
        let e = ((i.dirty_index & (self.entries - 1)) as u64 * ENTRY_SIZE) as usize;
        self.map
            .write(e + 4, &slot.to_le_bytes())
            .expect("entry inside the ring");
        self.map
            .write(e + 8, &offset.to_le_bytes())
            .expect("entry inside the ring");
        self.flags(i.dirty_index)
            .store(KVM_DIRTY_GFN_F_DIRTY, Ordering::Release);
        i.dirty_index = i.dirty_index.wrapping_add(1);
    }

    /// kvm_dirty_ring_reset: give back the harvested entries from reset_index on,
    /// calling `reset(slot, offset, mask)` for each coalesced run. Returns the count.
    pub fn reset(&self, mut reset: impl FnMut(u32, u64, u64)) -> u64 {
        let mut i = self.lock();
        let mut count = 0u64;
        let (mut cur_slot, mut cur_offset, mut mask) = (0u32, 0u64, 0u64);
        let mut first_round = true;
        loop {
            let f = self.flags(i.reset_index);
            if f.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_RESET == 0 {
                break;
            }
            let e = ((i.reset_index & (self.entries - 1)) as u64 * ENTRY_SIZE) as usize;
            let next_slot = self.map.load(e + 4, 4).expect("entry inside the ring") as u32;
            let next_offset = self.map.load(e + 8, 8).expect("entry inside the ring");
            f.store(0, Ordering::Release);
            i.reset_index = i.reset_index.wrapping_add(1);
            count += 1;
            if !first_round && next_slot == cur_slot {
                let delta = next_offset.wrapping_sub(cur_offset) as i64;
                if (0..64).contains(&delta) {
                    mask |= 1 << delta;
                    continue;
                }
                if delta > -64 && delta < 0 && (mask << -delta >> -delta) == mask {
                    cur_offset = next_offset;
                    mask = (mask << -delta) | 1;
                    continue;
                }
            }
            if mask != 0 {
                reset(cur_slot, cur_offset, mask);
            }
            cur_slot = next_slot;
            cur_offset = next_offset;
            mask = 1;
            first_round = false;
            if count >= u64::from(self.entries) {
                break;
            }
        }
        if mask != 0 {
            reset(cur_slot, cur_offset, mask);
        }
        count
    }
}

impl crate::vm::Vm {
    /// KVM_RESET_DIRTY_RINGS: every vCPU's harvested entries are given back and their
    /// pages re-protected (kvm_reset_dirty_gfn); one flush if any. Returns the count.
    pub fn reset_dirty_rings(&self) -> Result<i64> {
        let mut guard = self.state();
        let st = &mut *guard;
        if st.dirty_ring_size == 0 {
            return Err(Errno::EINVAL);
        }
        let vcpus: Vec<_> = st.vcpus.values().cloned().collect();
        let mut cleared = 0u64;
        for v in &vcpus {
            let Some(ring) = &v.dirty_ring else { continue };
            cleared += ring.reset(|slot, offset, mask| {
                let (as_id, id) = (slot >> 16, slot & 0xffff);
                if as_id >= crate::memslot::KVM_ADDRESS_SPACE_NUM
                    || id >= crate::memslot::KVM_USER_MEM_SLOTS
                {
                    return;
                }
                let Some(s) = st.memslots.get(id as u16) else {
                    return;
                };
                if offset + 63 - u64::from(mask.leading_zeros()) >= s.npages {
                    return;
                }
                let base = s.base_gfn + offset;
                st.mmu.reprotect_masked(base, mask, false);
            });
        }
        if cleared != 0 {
            st.mmu.flush_remote_tlbs();
        }
        Ok(cleared as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_sizes() {
        assert_eq!(check_size(4096), Ok(()));
        assert_eq!(check_size(1 << 20), Ok(()));
        assert_eq!(check_size(0), Err(Errno::EINVAL));
        assert_eq!(check_size(1000), Err(Errno::EINVAL));
        assert_eq!(check_size(2048), Err(Errno::EINVAL));
        assert_eq!(check_size(2 << 20), Err(Errno::E2BIG));
    }

    #[test]
    fn push_harvest_reset_coalesces() {
        let fd = nix::sys::memfd::memfd_create(c"ring", nix::sys::memfd::MemFdCreateFlag::empty())
            .unwrap();
        nix::unistd::ftruncate(&fd, (64 * 4096 + 4096) as i64).unwrap();
        let r = DirtyRing::new(&fd, 4096).unwrap();
        for off in [0u64, 9, 33, 2, 200] {
            r.push(1, off);
        }
        assert_eq!(r.used(), 5);
        // Userspace harvests the first four.
        for k in 0..4 {
            r.flags(k).fetch_or(KVM_DIRTY_GFN_F_RESET, Ordering::AcqRel);
        }
        let mut calls = vec![];
        assert_eq!(r.reset(|s, o, m| calls.push((s, o, m))), 4);
        // 0, 9, 33 coalesce forward; 2 goes backwards within the mask.
        assert_eq!(calls, vec![(1, 0, 1 | 1 << 9 | 1 << 33 | 1 << 2)]);
        assert_eq!(r.used(), 1);
    }
}
