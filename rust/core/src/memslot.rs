//! Memory slots: gfn -> slot -> hva, with KVM_SET_USER_MEMORY_REGION's rules
//! (api.txt 4.34; virt/kvm/kvm_main.c __kvm_set_memory_region) and errnos.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::dirty_log::DirtyBitmap;
use crate::errno::{Errno, Result};
use crate::hostmem::HostRegion;
use crate::paging::GuestMem;
use crate::uaccess::TASK_SIZE_MAX;
use crate::uapi::{
    kvm_userspace_memory_region2, KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY,
    PAGE_SHIFT, PAGE_SIZE,
};

/// KVM_USER_MEM_SLOTS on x86 (KVM_CAP_NR_MEMSLOTS).
pub const KVM_USER_MEM_SLOTS: u32 = 32764;
/// Address spaces: 1, as on the device here (no SMM address space).
pub const KVM_ADDRESS_SPACE_NUM: u32 = 1;
/// KVM_MEM_MAX_NR_PAGES: (1 << 31) - 1.
pub const KVM_MEM_MAX_NR_PAGES: u64 = (1 << 31) - 1;
/// Highest gfn + 1 a slot may reach under the shadow MMU (52-bit guest physical space).
pub const KVM_MAX_GFN_END: u64 = 1 << (52 - PAGE_SHIFT);

/// Which of kvm_mr_change a successful update performed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Create,
    Delete,
    Move,
    FlagsOnly,
    /// Identical re-set: returns 0 with no effect.
    Unchanged,
}

/// One memory slot.
#[derive(Clone, Debug)]
pub struct MemSlot {
    pub id: u16,
    pub as_id: u16,
    pub base_gfn: u64,
    pub npages: u64,
    pub userspace_addr: u64,
    pub flags: u32,
    /// The host memory behind the slot and the offset of `userspace_addr` in it.
    pub host: Arc<HostRegion>,
    pub host_offset: usize,
    /// memslot->dirty_bitmap: present while KVM_MEM_LOG_DIRTY_PAGES is set (unless the
    /// VM logs only through dirty rings).
    pub dirty_bitmap: Option<Arc<DirtyBitmap>>,
}

impl MemSlot {
    pub fn end_gfn(&self) -> u64 {
        self.base_gfn + self.npages
    }
    pub fn contains(&self, gfn: u64) -> bool {
        gfn >= self.base_gfn && gfn < self.end_gfn()
    }
    /// hva of a gfn inside the slot (__gfn_to_hva_memslot).
    pub fn gfn_to_hva(&self, gfn: u64) -> u64 {
        self.userspace_addr + ((gfn - self.base_gfn) << PAGE_SHIFT)
    }
    pub fn readonly(&self) -> bool {
        self.flags & KVM_MEM_READONLY != 0
    }
    pub fn dirty_logging(&self) -> bool {
        self.flags & KVM_MEM_LOG_DIRTY_PAGES != 0
    }
}

#[derive(Clone, Copy, Debug)]
struct Range {
    base_gfn: u64,
    end_gfn: u64,
    id: u16,
}

/// The slot table of one address space: slots by id, plus a gfn-sorted index
/// searched by bisection with a last-hit cache (KVM's lru_slot).
#[derive(Debug, Default)]
pub struct MemSlots {
    by_id: Vec<Option<MemSlot>>,
    sorted: Vec<Range>,
    last_hit: AtomicUsize,
    /// Bumped on every change; MMIO sptes carry it (KVM's memslot generation).
    generation: u64,
    /// How new logging slots get their bitmap (the VM's dirty-log capabilities).
    pub dirty_policy: DirtyPolicy,
}

/// The VM-wide choices that shape a logging slot's bitmap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirtyPolicy {
    /// kvm_use_dirty_bitmap: false for a VM that logs through dirty rings only.
    pub use_bitmap: bool,
    /// KVM_DIRTY_LOG_INITIALLY_SET with manual protect: new bitmaps start all ones.
    pub initially_set: bool,
}

impl Default for DirtyPolicy {
    fn default() -> Self {
        DirtyPolicy {
            use_bitmap: true,
            initially_set: false,
        }
    }
}

impl MemSlots {
    /// The host region and offset behind `size` bytes at `gpa`, if one slot holds them.
    #[inline]
    fn host_of(&self, gpa: u64, size: usize) -> Option<(&MemSlot, usize)> {
        let slot = self.lookup(gpa >> PAGE_SHIFT)?;
        let page_off = (gpa & (PAGE_SIZE - 1)) as usize;
        if page_off + size > PAGE_SIZE as usize {
            return None;
        }
        let off = slot.host_offset + ((gpa - (slot.base_gfn << PAGE_SHIFT)) as usize);
        Some((slot, off))
    }
}

/// The memslots are the guest's physical memory: the walker reads gptes and sets
/// A/D bits through them, and never touches anything outside a slot.
impl GuestMem for MemSlots {
    #[inline]
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let Some((slot, off)) = self.host_of(gpa, buf.len()) else {
            return false;
        };
        match slot.host.load(off, buf.len()) {
            Ok(v) => {
                buf.copy_from_slice(&v.to_le_bytes()[..buf.len()]);
                true
            }
            Err(_) => slot.host.read(off, buf).is_ok(),
        }
    }

    #[inline]
    fn read_gpte(&self, gpa: u64, size: usize) -> Option<u64> {
        // A naturally aligned gpte never crosses a page (load checks the alignment).
        let slot = self.lookup(gpa >> PAGE_SHIFT)?;
        let off = slot.host_offset + (gpa - (slot.base_gfn << PAGE_SHIFT)) as usize;
        slot.host.load(off, size).ok()
    }

    fn cmpxchg(&self, gpa: u64, size: usize, old: u64, new: u64) -> std::result::Result<bool, ()> {
        let (slot, off) = self.host_of(gpa, size).ok_or(())?;
        if slot.readonly() {
            return Err(());
        }
        slot.host.cmpxchg(off, size, old, new).map_err(|_| ())
    }

    /// The walker's A/D updates are KVM writes: they are logged.
    fn mark_dirty(&self, gfn: u64) {
        self.mark_page_dirty(gfn);
    }
}

impl MemSlots {
    /// Write `buf` (within one page) at `gpa`: false if no slot backs it or the slot
    /// is read-only (the guest's write then exits as MMIO).
    pub fn write(&self, gpa: u64, buf: &[u8]) -> bool {
        let Some((slot, off)) = self.host_of(gpa, buf.len()) else {
            return false;
        };
        !slot.readonly() && slot.host.write(off, buf).is_ok()
    }
}

/// One guest page resolved to its host memory: several gpte reads for one slot
/// lookup (the fault path re-reads a whole block of a table).
#[derive(Clone, Copy)]
pub struct GuestPage<'a> {
    map: &'a crate::hostmem::Mapping,
    off: usize,
}

impl GuestPage<'_> {
    /// Atomic load of the aligned 4- or 8-byte entry at `page_off` of the page.
    #[inline]
    pub fn load(&self, page_off: usize, size: usize) -> Option<u64> {
        debug_assert!(page_off + size <= PAGE_SIZE as usize);
        self.map.load(self.off + page_off, size).ok()
    }

    /// Copy `buf.len()` bytes at `page_off` (kvm_vcpu_read_guest_atomic: one copy,
    /// not one atomic load per entry).
    #[inline]
    pub fn read(&self, page_off: usize, buf: &mut [u8]) -> bool {
        page_off + buf.len() <= PAGE_SIZE as usize
            && self.map.read(self.off + page_off, buf).is_ok()
    }
}

impl MemSlots {
    /// The host memory of guest page `gfn`, if a slot holds it.
    #[inline]
    pub fn guest_page(&self, gfn: u64) -> Option<GuestPage<'_>> {
        let slot = self.lookup(gfn)?;
        let off = slot.host_offset + ((gfn - slot.base_gfn) << PAGE_SHIFT) as usize;
        Some(GuestPage {
            map: &slot.host,
            off,
        })
    }
}

impl MemSlots {
    /// mark_page_dirty: a write by KVM or the guest to `gfn` is logged if its slot
    /// logs dirty pages (nothing happens outside memslots).
    #[inline]
    pub fn mark_page_dirty(&self, gfn: u64) {
        if let Some(slot) = self.lookup(gfn) {
            if let Some(b) = &slot.dirty_bitmap {
                b.set(gfn - slot.base_gfn);
            }
        }
    }
}

/// Which ioctl carried the region (v1 accepts fewer flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionIoctl {
    V1,
    V2,
}

impl MemSlots {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    pub fn get(&self, id: u16) -> Option<&MemSlot> {
        self.by_id.get(id as usize).and_then(Option::as_ref)
    }

    /// Slots in gfn order.
    pub fn iter(&self) -> impl Iterator<Item = &MemSlot> {
        self.sorted.iter().filter_map(|r| self.get(r.id))
    }

    /// The slot holding `gfn` (gfn_to_memslot).
    #[inline]
    pub fn lookup(&self, gfn: u64) -> Option<&MemSlot> {
        let hint = self.last_hit.load(Ordering::Relaxed);
        if let Some(r) = self.sorted.get(hint) {
            if gfn >= r.base_gfn && gfn < r.end_gfn {
                return self.get(r.id);
            }
        }
        let i = self.sorted.partition_point(|r| r.end_gfn <= gfn);
        let r = self.sorted.get(i)?;
        if gfn < r.base_gfn {
            return None;
        }
        self.last_hit.store(i, Ordering::Relaxed);
        self.get(r.id)
    }

    fn overlaps(&self, base: u64, end: u64, except: Option<u16>) -> bool {
        let i = self.sorted.partition_point(|r| r.end_gfn <= base);
        self.sorted[i..]
            .iter()
            .take_while(|r| r.base_gfn < end)
            .any(|r| Some(r.id) != except)
    }

    fn index_insert(&mut self, r: Range) {
        let i = self.sorted.partition_point(|x| x.base_gfn < r.base_gfn);
        self.sorted.insert(i, r);
    }

    fn index_remove(&mut self, id: u16) {
        if let Some(i) = self.sorted.iter().rposition(|r| r.id == id) {
            self.sorted.remove(i);
        }
    }

    /// Apply KVM_SET_USER_MEMORY_REGION(2). `resolve` finds the host memory for a new
    /// slot's hva range (the simulator refuses memory it does not own: EFAULT); it is
    /// called only after every check the kernel makes has passed.
    pub fn set_region(
        &mut self,
        mem: &kvm_userspace_memory_region2,
        ioctl: RegionIoctl,
        resolve: impl FnOnce(u64, u64) -> Result<(Arc<HostRegion>, usize)>,
    ) -> Result<Change> {
        let valid_flags = match ioctl {
            RegionIoctl::V1 => KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY,
            // GUEST_MEMFD needs a VM type with private memory; only the default type exists.
            RegionIoctl::V2 => KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY,
        };
        if mem.flags & !valid_flags != 0 || mem.flags & KVM_MEM_GUEST_MEMFD != 0 {
            return Err(Errno::EINVAL);
        }
        let as_id = mem.slot >> 16;
        let id = mem.slot & 0xffff;
        if id >= KVM_USER_MEM_SLOTS {
            return Err(Errno::EINVAL);
        }
        if mem.memory_size & (PAGE_SIZE - 1) != 0 || mem.guest_phys_addr & (PAGE_SIZE - 1) != 0 {
            return Err(Errno::EINVAL);
        }
        // userspace_addr: page aligned, untagged, and access_ok for the whole range.
        if mem.userspace_addr & (PAGE_SIZE - 1) != 0
            || mem
                .userspace_addr
                .checked_add(mem.memory_size)
                .is_none_or(|end| end > TASK_SIZE_MAX)
        {
            return Err(Errno::EINVAL);
        }
        if as_id >= KVM_ADDRESS_SPACE_NUM {
            return Err(Errno::EINVAL);
        }
        if mem.guest_phys_addr.checked_add(mem.memory_size).is_none() {
            return Err(Errno::EINVAL);
        }
        let npages = mem.memory_size >> PAGE_SHIFT;
        if npages > KVM_MEM_MAX_NR_PAGES {
            return Err(Errno::EINVAL);
        }
        let id = id as u16;
        let old = self.get(id);

        if npages == 0 {
            if old.is_none() {
                return Err(Errno::EINVAL);
            }
            self.by_id[id as usize] = None;
            self.index_remove(id);
            self.generation += 2;
            return Ok(Change::Delete);
        }

        let base_gfn = mem.guest_phys_addr >> PAGE_SHIFT;
        let change = match old {
            None => Change::Create,
            Some(old) => {
                if mem.userspace_addr != old.userspace_addr
                    || npages != old.npages
                    || (mem.flags ^ old.flags) & KVM_MEM_READONLY != 0
                {
                    return Err(Errno::EINVAL);
                }
                if base_gfn != old.base_gfn {
                    Change::Move
                } else if mem.flags != old.flags {
                    Change::FlagsOnly
                } else {
                    return Ok(Change::Unchanged);
                }
            }
        };
        let end_gfn = base_gfn + npages;
        if matches!(change, Change::Create | Change::Move) {
            if self.overlaps(
                base_gfn,
                end_gfn,
                Some(id).filter(|_| change == Change::Move),
            ) {
                return Err(Errno::EEXIST);
            }
            // kvm_arch_prepare_memory_region: the slot must fit below kvm_mmu_max_gfn().
            if end_gfn > KVM_MAX_GFN_END {
                return Err(Errno::EINVAL);
            }
        }
        let (host, host_offset) = match (change, old) {
            (Change::Create, _) => resolve(mem.userspace_addr, mem.memory_size)?,
            (_, Some(old)) => (old.host.clone(), old.host_offset),
            (_, None) => unreachable!("only Create has no old slot"),
        };
        // kvm_prepare_memory_region: allocate or free the dirty bitmap as needed.
        let dirty_bitmap = if mem.flags & KVM_MEM_LOG_DIRTY_PAGES == 0 {
            None
        } else if let Some(b) = old.and_then(|o| o.dirty_bitmap.clone()) {
            Some(b)
        } else if self.dirty_policy.use_bitmap {
            let b = DirtyBitmap::new(npages);
            if self.dirty_policy.initially_set {
                b.set_all();
            }
            Some(Arc::new(b))
        } else {
            None
        };
        let slot = MemSlot {
            id,
            as_id: as_id as u16,
            base_gfn,
            npages,
            userspace_addr: mem.userspace_addr,
            flags: mem.flags,
            host,
            host_offset,
            dirty_bitmap,
        };
        if self.by_id.len() <= id as usize {
            self.by_id.resize(id as usize + 1, None);
        }
        if change == Change::Move {
            self.index_remove(id);
        }
        if change != Change::FlagsOnly {
            self.index_insert(Range {
                base_gfn,
                end_gfn,
                id,
            });
        }
        self.by_id[id as usize] = Some(slot);
        self.generation += 2;
        Ok(change)
    }

    /// Check the table's invariants (used by tests and the fuzzer).
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        let live = self.by_id.iter().flatten().count();
        if live != self.sorted.len() {
            return Err(format!(
                "{live} slots but {} index entries",
                self.sorted.len()
            ));
        }
        for w in self.sorted.windows(2) {
            if w[0].end_gfn > w[1].base_gfn {
                return Err(format!("overlap or disorder: {:?} {:?}", w[0], w[1]));
            }
        }
        for r in &self.sorted {
            let s = self
                .get(r.id)
                .ok_or_else(|| format!("index names missing slot {}", r.id))?;
            if s.base_gfn != r.base_gfn || s.end_gfn() != r.end_gfn || s.npages == 0 {
                return Err(format!("index {r:?} disagrees with slot {s:?}"));
            }
            if s.host_offset + (s.npages << PAGE_SHIFT) as usize > s.host.size() {
                return Err(format!("slot {} runs past its host region", s.id));
            }
            if s.flags & !(KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY) != 0 {
                return Err(format!("slot {} has invalid flags {:#x}", s.id, s.flags));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(
        slot: u32,
        gpa: u64,
        size: u64,
        hva: u64,
        flags: u32,
    ) -> kvm_userspace_memory_region2 {
        kvm_userspace_memory_region2 {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: hva,
            ..Default::default()
        }
    }

    fn set(
        s: &mut MemSlots,
        mem: &Arc<HostRegion>,
        slot: u32,
        gpa: u64,
        size: u64,
        off: u64,
        flags: u32,
    ) -> Result<Change> {
        let r = region(slot, gpa, size, mem.addr() + off, flags);
        let out = s.set_region(&r, RegionIoctl::V1, |hva, len| {
            HostRegion::lookup(hva, len).ok_or(Errno::EFAULT)
        });
        s.check_invariants().unwrap();
        out
    }

    #[test]
    fn api_txt_rules() {
        let mem = HostRegion::new(1 << 24).unwrap();
        let mut s = MemSlots::new();
        assert_eq!(set(&mut s, &mem, 0, 0, 1 << 20, 0, 0), Ok(Change::Create));
        assert_eq!(
            set(&mut s, &mem, 0, 0, 1 << 20, 0, 0),
            Ok(Change::Unchanged)
        );
        // overlap, partial and identical
        assert_eq!(
            set(&mut s, &mem, 1, 0x80000, 1 << 20, 0, 0),
            Err(Errno::EEXIST)
        );
        assert_eq!(set(&mut s, &mem, 1, 0, 1 << 20, 0, 0), Err(Errno::EEXIST));
        // adjacent, same hva as another slot
        assert_eq!(
            set(&mut s, &mem, 1, 1 << 20, 1 << 20, 0, 0),
            Ok(Change::Create)
        );
        // no resize, no hva change, no READONLY toggle
        assert_eq!(
            set(&mut s, &mem, 1, 1 << 20, 2 << 20, 0, 0),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            set(&mut s, &mem, 1, 1 << 20, 1 << 20, 4096, 0),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            set(&mut s, &mem, 1, 1 << 20, 1 << 20, 0, 2),
            Err(Errno::EINVAL)
        );
        // flags-only and move
        assert_eq!(
            set(&mut s, &mem, 1, 1 << 20, 1 << 20, 0, 1),
            Ok(Change::FlagsOnly)
        );
        assert_eq!(
            set(&mut s, &mem, 1, 8 << 20, 1 << 20, 0, 1),
            Ok(Change::Move)
        );
        assert_eq!(s.lookup(8 << 8).unwrap().id, 1);
        assert!(s.lookup(1 << 8).is_none());
        // alignment, ids, flags
        assert_eq!(
            set(&mut s, &mem, 2, 0x1000_0800, 4096, 0, 0),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            set(&mut s, &mem, 2, 0x1000_0000, 100, 0, 0),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            set(&mut s, &mem, 2, 0x1000_0000, 4096, 1, 0),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            set(&mut s, &mem, 32764, 0x1000_0000, 4096, 0, 0),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            set(&mut s, &mem, 0x10000, 0x1000_0000, 4096, 0, 0),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            set(&mut s, &mem, 2, 0x1000_0000, 4096, 0, 1 << 3),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            set(&mut s, &mem, 2, 0x1000_0000, 4096, 0, 4),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            set(&mut s, &mem, 32763, 0x1000_0000, 4096, 0, 3),
            Ok(Change::Create)
        );
        // gpa range limit (52 bits), and the ok case at 2^48
        assert_eq!(
            set(&mut s, &mem, 3, 1 << 52, 4096, 0, 0),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            set(&mut s, &mem, 3, 1 << 48, 4096, 0, 0),
            Ok(Change::Create)
        );
        // delete, delete missing
        assert_eq!(set(&mut s, &mem, 3, 0, 0, 0, 0), Ok(Change::Delete));
        assert_eq!(set(&mut s, &mem, 3, 0, 0, 0, 0), Err(Errno::EINVAL));
        // memory the core does not own
        let r = region(4, 1 << 30, 4096, 0x7000_0000_0000, 0);
        let out = s.set_region(&r, RegionIoctl::V1, |hva, len| {
            HostRegion::lookup(hva, len).ok_or(Errno::EFAULT)
        });
        assert_eq!(out, Err(Errno::EFAULT));
        // kernel address, wrap
        let r = region(4, 1 << 30, 4096, 0xffff_8000_0000_0000, 0);
        assert_eq!(
            s.set_region(&r, RegionIoctl::V1, |_, _| unreachable!()),
            Err(Errno::EINVAL)
        );
        s.check_invariants().unwrap();
    }

    #[test]
    fn lookup_many_slots() {
        let mem = HostRegion::new(1 << 20).unwrap();
        let mut s = MemSlots::new();
        for i in 0..1000u32 {
            let r = region(i, u64::from(i) * 2 * 4096, 4096, mem.addr(), 0);
            s.set_region(&r, RegionIoctl::V1, |h, l| {
                HostRegion::lookup(h, l).ok_or(Errno::EFAULT)
            })
            .unwrap();
        }
        s.check_invariants().unwrap();
        for i in 0..1000u64 {
            assert_eq!(s.lookup(i * 2).map(|x| x.id), Some(i as u16));
            assert!(s.lookup(i * 2 + 1).is_none());
        }
    }
}
