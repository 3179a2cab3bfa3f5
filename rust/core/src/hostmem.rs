//! Host memory the core owns: anonymous, MAP_NORESERVE mappings that back guest
//! memory, and the shared memfd mappings of the vCPU area and the stats files.
//! This is the only place that maps or dereferences raw host memory.
//!
//! A memslot may only name memory registered here (DESIGN.md): the registry maps
//! an hva range back to its region, and a slot keeps its region alive through an
//! `Arc`, so memory can never be unmapped under a slot.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use nix::libc;
use nix::sys::mman::{mmap_anonymous, munmap, MapFlags, ProtFlags};

use crate::errno::{Errno, Result};
use crate::uapi::PAGE_SIZE;

/// A mapping this module made, with every access to it bounds-checked. Dropping it
/// unmaps it.
pub struct Mapping {
    ptr: NonNull<u8>,
    size: usize,
}

// SAFETY: the mapping is plain memory owned by this object for its whole life;
// concurrent access is the guest-memory model (like hardware, no locking) and the
// KVM contract for shared areas (e.g. immediate_exit); every access goes through the
// bounds-checked methods below, with atomics or byte copies.
unsafe impl Send for Mapping {}
// SAFETY: see Send; shared references only copy bytes in and out or use atomics.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// The host virtual address of the first byte.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    pub fn size(&self) -> usize {
        self.size
    }

    #[inline]
    fn check(&self, off: usize, len: usize) -> Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Errno::EFAULT),
        }
    }

    /// Copy bytes out of the mapping.
    pub fn read(&self, off: usize, buf: &mut [u8]) -> Result<()> {
        self.check(off, buf.len())?;
        // SAFETY: [off, off+len) is inside the live mapping (checked above) and
        // `buf` is a distinct Rust allocation, so the ranges cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    /// Copy bytes into the mapping.
    pub fn write(&self, off: usize, buf: &[u8]) -> Result<()> {
        self.check(off, buf.len())?;
        // SAFETY: as in `read`; the destination is inside the mapping we own.
        unsafe {
            std::ptr::copy_nonoverlapping(buf.as_ptr(), self.ptr.as_ptr().add(off), buf.len())
        };
        Ok(())
    }

    /// Atomically load a naturally aligned 4- or 8-byte little-endian value (a gpte
    /// the guest may be writing concurrently).
    #[inline]
    pub fn load(&self, off: usize, size: usize) -> Result<u64> {
        self.check(off, size)?;
        if !size.is_power_of_two() || off & (size - 1) != 0 {
            return Err(Errno::EINVAL);
        }
        // SAFETY: in bounds (checked), naturally aligned (checked), and the atomic
        // types have the size and alignment of the integers they wrap.
        unsafe {
            let p = self.ptr.as_ptr().add(off);
            match size {
                4 => Ok(u64::from(
                    (*(p as *const AtomicU32)).load(Ordering::Acquire),
                )),
                8 => Ok((*(p as *const AtomicU64)).load(Ordering::Acquire)),
                _ => Err(Errno::EINVAL),
            }
        }
    }

    /// Atomic compare-exchange of a naturally aligned 4- or 8-byte value:
    /// Ok(true) if it held `old` and now holds `new`.
    pub fn cmpxchg(&self, off: usize, size: usize, old: u64, new: u64) -> Result<bool> {
        self.check(off, size)?;
        if !size.is_power_of_two() || off & (size - 1) != 0 {
            return Err(Errno::EINVAL);
        }
        // SAFETY: as in `load`.
        unsafe {
            let p = self.ptr.as_ptr().add(off);
            match size {
                4 => Ok((*(p as *const AtomicU32))
                    .compare_exchange(old as u32, new as u32, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()),
                8 => Ok((*(p as *const AtomicU64))
                    .compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()),
                _ => Err(Errno::EINVAL),
            }
        }
    }

    /// Atomically load one byte (fields userspace may write concurrently).
    pub fn load_u8(&self, off: usize) -> Result<u8> {
        self.check(off, 1)?;
        // SAFETY: in bounds; AtomicU8 has the alignment and size of u8, and the
        // reference does not outlive this call.
        let a = unsafe { &*(self.ptr.as_ptr().add(off) as *const AtomicU8) };
        Ok(a.load(Ordering::Acquire))
    }

    /// A naturally aligned u64 of the mapping as an atomic (live counters that
    /// userspace reads through its own mapping or pread).
    pub fn atomic_u64(&self, off: usize) -> Result<&AtomicU64> {
        self.check(off, 8)?;
        if off % 8 != 0 {
            return Err(Errno::EINVAL);
        }
        // SAFETY: in bounds and 8-byte aligned (the mapping is page aligned); the
        // returned reference borrows `self`, so it cannot outlive the mapping.
        Ok(unsafe { &*(self.ptr.as_ptr().add(off) as *const AtomicU64) })
    }

    /// `n` naturally aligned u64s of the mapping from `off`, as atomics.
    pub fn atomic_u64s(&self, off: usize, n: usize) -> Result<&[AtomicU64]> {
        self.check(off, n.checked_mul(8).ok_or(Errno::EFAULT)?)?;
        if off & 7 != 0 {
            return Err(Errno::EINVAL);
        }
        // SAFETY: in bounds and 8-byte aligned; AtomicU64 has the layout of u64; the
        // slice borrows `self`, so it cannot outlive the mapping.
        Ok(
            unsafe {
                std::slice::from_raw_parts(self.ptr.as_ptr().add(off) as *const AtomicU64, n)
            },
        )
    }

    /// A naturally aligned u32 of the mapping as an atomic (dirty-ring entry flags,
    /// which userspace changes concurrently).
    pub fn atomic_u32(&self, off: usize) -> Result<&AtomicU32> {
        self.check(off, 4)?;
        if off & 3 != 0 {
            return Err(Errno::EINVAL);
        }
        // SAFETY: in bounds and 4-byte aligned (the mapping is page aligned); the
        // returned reference borrows `self`, so it cannot outlive the mapping.
        Ok(unsafe { &*(self.ptr.as_ptr().add(off) as *const AtomicU32) })
    }

    /// Raw base pointer, for the buffer protocol of the Python binding only.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by this module with exactly this base and
        // length, and no reference into it outlives `self`.
        let _ = unsafe { munmap(self.ptr.cast(), self.size) };
    }
}

/// One anonymous mapping owned by the core: guest memory.
pub struct HostRegion {
    map: Mapping,
    /// madvise(MADV_HUGEPAGE) was asked: the host may map it with 2 MiB pages.
    thp: std::sync::atomic::AtomicBool,
    /// The host's page table for the region, where it differs from "page i of the
    /// region is frame hva >> 12, writable": pages migrated or refilled after a
    /// discard (new frames), and pages made read-only (KSM merging, fork's COW).
    pages: Mutex<HostPages>,
    /// Some page differs (the fast path skips the lock otherwise).
    changed: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct HostPages {
    pfn: BTreeMap<u64, u64>,
    readonly: std::collections::BTreeSet<u64>,
}

/// Frames handed out for migrated or refilled pages: above any hva >> 12 of a
/// 47-bit address space, inside the 40-bit PFN field of an SPTE.
static NEXT_PFN: AtomicU64 = AtomicU64::new(1 << 38);

impl Deref for HostRegion {
    type Target = Mapping;
    fn deref(&self) -> &Mapping {
        &self.map
    }
}

fn registry() -> &'static Mutex<BTreeMap<u64, Weak<HostRegion>>> {
    static REG: OnceLock<Mutex<BTreeMap<u64, Weak<HostRegion>>>> = OnceLock::new();
    REG.get_or_init(Default::default)
}

impl HostRegion {
    /// Map `size` bytes (rounded up to a page) of zeroed, lazily backed memory.
    pub fn new(size: u64) -> Result<Arc<HostRegion>> {
        if size == 0 {
            return Err(Errno::EINVAL);
        }
        let size = size.checked_add(PAGE_SIZE - 1).ok_or(Errno::ENOMEM)? & !(PAGE_SIZE - 1);
        let len = NonZeroUsize::new(usize::try_from(size).map_err(|_| Errno::ENOMEM)?)
            .ok_or(Errno::EINVAL)?;
        // SAFETY: a fresh anonymous private mapping at a kernel-chosen address
        // aliases nothing; the Mapping owns it until it is dropped.
        let ptr = unsafe {
            mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE,
            )
        }
        .map_err(Errno::from)?;
        let region = Arc::new(HostRegion {
            map: Mapping {
                ptr: ptr.cast(),
                size: len.get(),
            },
            thp: std::sync::atomic::AtomicBool::new(false),
            pages: Mutex::new(HostPages::default()),
            changed: std::sync::atomic::AtomicBool::new(false),
        });
        registry()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(region.addr(), Arc::downgrade(&region));
        Ok(region)
    }

    fn host_pages(&self) -> std::sync::MutexGuard<'_, HostPages> {
        self.pages.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The host frame behind `hva` (a page of this region) and whether the host maps
    /// it writable: what get_user_pages gives KVM.
    #[inline]
    pub fn frame(&self, hva: u64) -> (u64, bool) {
        let page = hva >> 12;
        if !self.changed.load(Ordering::Acquire) {
            return (page, true);
        }
        let p = self.host_pages();
        (
            p.pfn.get(&page).copied().unwrap_or(page),
            !p.readonly.contains(&page),
        )
    }

    /// Whether any page of [hva, hva + len) left the plain layout (which also breaks
    /// a host huge page over it).
    pub fn changed_in(&self, hva: u64, len: u64) -> bool {
        if !self.changed.load(Ordering::Acquire) {
            return false;
        }
        let (a, b) = (hva >> 12, (hva + len).div_ceil(4096));
        let p = self.host_pages();
        p.pfn.range(a..b).next().is_some() || p.readonly.range(a..b).next().is_some()
    }

    /// Give the page at `hva` a new frame (page migration, or a fresh page after a
    /// discard). The contents are the caller's business.
    pub fn new_frame(&self, hva: u64) -> u64 {
        let pfn = NEXT_PFN.fetch_add(1, Ordering::Relaxed);
        self.host_pages().pfn.insert(hva >> 12, pfn);
        self.changed.store(true, Ordering::Release);
        pfn
    }

    /// Make the host's mapping of the page at `hva` read-only (KSM merge, fork) or
    /// writable again.
    pub fn set_host_readonly(&self, hva: u64, readonly: bool) {
        let mut p = self.host_pages();
        if readonly {
            p.readonly.insert(hva >> 12);
        } else {
            p.readonly.remove(&(hva >> 12));
        }
        drop(p);
        self.changed.store(true, Ordering::Release);
    }

    /// MADV_DONTNEED on [off, off + len): the pages read as zero from now on.
    pub fn discard(&self, off: usize, len: usize) -> Result<()> {
        self.check(off, len)?;
        if off & 0xfff != 0 || len & 0xfff != 0 {
            return Err(Errno::EINVAL);
        }
        if len == 0 {
            return Ok(());
        }
        // SAFETY: a page-aligned range inside this region's own private anonymous
        // mapping; MADV_DONTNEED only replaces its contents with zero pages.
        unsafe {
            nix::sys::mman::madvise(
                self.map.ptr.add(off).cast(),
                len,
                nix::sys::mman::MmapAdvise::MADV_DONTNEED,
            )
        }
        .map_err(Errno::from)?;
        Ok(())
    }

    /// Whether the region asked for transparent huge pages.
    pub fn thp(&self) -> bool {
        self.thp.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// madvise(MADV_HUGEPAGE): let the host back the region with 2 MiB pages, which
    /// lets KVM map guest huge pages with huge SPTEs (host_pfn_mapping_level). Like
    /// the advice, turning it off affects later faults only: huge pages the host
    /// already has stay (and so do the huge SPTEs over them).
    pub fn set_thp(&self, on: bool) -> Result<()> {
        let advice = if on {
            nix::sys::mman::MmapAdvise::MADV_HUGEPAGE
        } else {
            nix::sys::mman::MmapAdvise::MADV_NOHUGEPAGE
        };
        // SAFETY: the range is exactly this region's own live mapping; advice changes
        // no contents and no protection.
        unsafe { nix::sys::mman::madvise(self.map.ptr.cast(), self.map.size, advice) }
            .map_err(Errno::from)?;
        self.thp.store(on, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Find the live region holding `[hva, hva + len)`, with the offset of `hva` in it.
    pub fn lookup(hva: u64, len: u64) -> Option<(Arc<HostRegion>, usize)> {
        let reg = registry().lock().unwrap_or_else(|e| e.into_inner());
        let (&start, weak) = reg.range(..=hva).next_back()?;
        let region = weak.upgrade()?;
        let off = hva - start;
        let end = off.checked_add(len)?;
        (end <= region.size() as u64).then_some((region, off as usize))
    }
}

/// uaccess's clear_user: readv(/dev/zero) over `iov` until every byte is written.
/// A fault (or no progress) is EFAULT; a signal's short count or EINTR resumes
/// where it stopped.
pub(crate) fn zero_fill(zero: &std::fs::File, iov: &mut [libc::iovec]) -> Result<()> {
    use std::os::fd::AsRawFd;
    let mut first = 0;
    while first < iov.len() {
        let rest = &mut iov[first..];
        // SAFETY: readv writes only through the iovecs, each of which names a range
        // of this process's user address space below TASK_SIZE_MAX (checked by the
        // caller) that the ioctl's caller handed over as user memory, exactly as
        // process_vm_writev would write it; the kernel validates every page and
        // returns EFAULT (or a short count) for an unmapped or read-only one. No Rust
        // reference to that memory is created here.
        let r = unsafe { libc::readv(zero.as_raw_fd(), rest.as_ptr(), rest.len() as i32) };
        if r < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(Errno::EFAULT);
        }
        if r == 0 {
            return Err(Errno::EFAULT);
        }
        let mut left = r as usize;
        while left > 0 {
            let v = &mut iov[first];
            if left >= v.iov_len {
                left -= v.iov_len;
                first += 1;
            } else {
                v.iov_base = (v.iov_base as usize + left) as *mut libc::c_void;
                v.iov_len -= left;
                left = 0;
            }
        }
        while first < iov.len() && iov[first].iov_len == 0 {
            first += 1;
        }
    }
    Ok(())
}

impl Drop for HostRegion {
    fn drop(&mut self) {
        // Unregister before the Mapping field unmaps, so the address cannot be
        // handed out again while it is still registered.
        let mut reg = registry().lock().unwrap_or_else(|e| e.into_inner());
        if reg.get(&self.addr()).is_some_and(|w| w.strong_count() == 0) {
            reg.remove(&self.addr());
        }
    }
}

impl std::fmt::Debug for HostRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostRegion({:#x}+{:#x})", self.addr(), self.size())
    }
}

/// A shared mapping of a memfd: the vCPU's mmap area (kvm_run and later pages) and
/// the stats files, which userspace maps or reads from the same file descriptor.
pub struct SharedMapping {
    map: Mapping,
}

impl Deref for SharedMapping {
    type Target = Mapping;
    fn deref(&self) -> &Mapping {
        &self.map
    }
}

impl SharedMapping {
    /// Map `size` bytes of `fd` shared, read/write.
    pub fn new(fd: std::os::fd::BorrowedFd<'_>, size: usize) -> Result<SharedMapping> {
        Self::new_at(fd, 0, size)
    }

    /// Map `size` bytes of `fd` from byte `offset` (page aligned), shared, read/write.
    pub fn new_at(
        fd: std::os::fd::BorrowedFd<'_>,
        offset: i64,
        size: usize,
    ) -> Result<SharedMapping> {
        let len = NonZeroUsize::new(size).ok_or(Errno::EINVAL)?;
        // SAFETY: a new shared mapping of a memfd we created and sized; it aliases
        // only other mappings of the same file, which is the intended sharing.
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd,
                offset,
            )
        }
        .map_err(Errno::from)?;
        Ok(SharedMapping {
            map: Mapping {
                ptr: ptr.cast(),
                size,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_region_costs_nothing_until_touched() {
        let r = HostRegion::new(16 << 40).unwrap();
        assert_eq!(r.size(), 16 << 40);
        r.write((8 << 40) + 5, &[7]).unwrap();
        let mut b = [0u8; 2];
        r.read((8 << 40) + 4, &mut b).unwrap();
        assert_eq!(b, [0, 7]);
        assert_eq!(r.read(r.size() - 1, &mut b), Err(Errno::EFAULT));
    }

    #[test]
    fn lookup_by_hva() {
        let r = HostRegion::new(8192).unwrap();
        let (found, off) = HostRegion::lookup(r.addr() + 4096, 4096).unwrap();
        assert!(Arc::ptr_eq(&found, &r));
        assert_eq!(off, 4096);
        assert!(HostRegion::lookup(r.addr() + 4096, 8192).is_none());
        let addr = r.addr();
        drop((found, r));
        assert!(HostRegion::lookup(addr, 4096).is_none());
    }
}
