//! copy_from_user / copy_to_user for the software /dev/kvm.
//!
//! An ioctl argument is a user pointer in this process, exactly as the kernel
//! sees it. The simulator reads and writes it with process_vm_readv/writev on
//! its own pid, so a bad pointer yields EFAULT (as the kernel's uaccess does),
//! never a crash. Large zero runs are written by reading /dev/zero into them (the
//! kernel's clear_user: no source to read, no pages pinned), and scattered pieces go
//! out in one process_vm_writev per batch. Memory the core itself owns (a
//! registered HostRegion: GuestMemory) is copied directly: the registry's `Arc`
//! keeps it mapped for the copy and it is mapped read/write for its whole life.
//! The readv of /dev/zero is the one raw system call; it lives in hostmem.

use std::io::{IoSlice, IoSliceMut};
use std::sync::{Arc, OnceLock};

use nix::libc;

use nix::sys::uio::{process_vm_readv, process_vm_writev, RemoteIoVec};
use nix::unistd::Pid;
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::errno::{Errno, Result};
use crate::hostmem::{zero_fill, HostRegion};

/// User memory as seen by an ioctl handler.
pub trait UserAccess {
    fn copy_from_user(&mut self, addr: u64, buf: &mut [u8]) -> Result<()>;
    fn copy_to_user(&mut self, addr: u64, buf: &[u8]) -> Result<()>;

    /// Zero every `(addr, len)` range (clear_user), in order.
    fn clear_user(&mut self, ranges: &[(u64, usize)]) -> Result<()> {
        clear_by_copy(self, ranges)
    }

    /// The core-owned memory (a registered HostRegion) that holds all of
    /// `[addr, addr + len)`, with the offset of `addr` in it, when the access may
    /// write it directly (no window of this accessor overlaps it).
    fn owned_region(&mut self, _addr: u64, _len: usize) -> Option<(Arc<HostRegion>, usize)> {
        None
    }

    /// copy_to_user of every `(addr, bytes)` segment, in order.
    fn copy_to_user_segs(&mut self, segs: &[(u64, &[u8])]) -> Result<()> {
        for &(addr, buf) in segs {
            self.copy_to_user(addr, buf)?;
        }
        Ok(())
    }
}

/// Read a plain-data struct from user memory.
pub fn read_struct<T: FromBytes + IntoBytes>(ua: &mut dyn UserAccess, addr: u64) -> Result<T> {
    let mut v = T::new_zeroed();
    ua.copy_from_user(addr, v.as_mut_bytes())?;
    Ok(v)
}

/// Write a plain-data struct to user memory.
pub fn write_struct<T: IntoBytes + Immutable>(
    ua: &mut dyn UserAccess,
    addr: u64,
    v: &T,
) -> Result<()> {
    ua.copy_to_user(addr, v.as_bytes())
}

/// The process's own address space, through process_vm_readv/writev.
#[derive(Default)]
pub struct ProcessVm;

fn check_range(addr: u64, len: usize) -> Result<()> {
    // The kernel's access_ok: the whole range must lie below the user address limit.
    let end = addr.checked_add(len as u64).ok_or(Errno::EFAULT)?;
    if end > TASK_SIZE_MAX {
        return Err(Errno::EFAULT);
    }
    Ok(())
}

/// Segments per readv / process_vm_writev (the kernel's UIO_MAXIOV).
const IOV_MAX: usize = 1024;

/// /dev/zero, opened once: reading it into user memory is the kernel's clear_user.
fn dev_zero() -> Option<&'static std::fs::File> {
    static ZERO: OnceLock<Option<std::fs::File>> = OnceLock::new();
    ZERO.get_or_init(|| std::fs::File::open("/dev/zero").ok())
        .as_ref()
}

/// The core-owned region holding `[addr, addr + len)`, reusing `cache` when it does.
fn owned_region(
    cache: &mut Option<Arc<HostRegion>>,
    addr: u64,
    len: usize,
) -> Option<(Arc<HostRegion>, usize)> {
    if let Some(r) = cache {
        if let Some(off) = addr.checked_sub(r.addr()) {
            if off
                .checked_add(len as u64)
                .is_some_and(|e| e <= r.size() as u64)
            {
                return Some((r.clone(), off as usize));
            }
        }
    }
    let (r, off) = HostRegion::lookup(addr, len as u64)?;
    *cache = Some(r.clone());
    Some((r, off))
}

/// Zeros to clear memory with.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// clear_user as copies of zeros.
fn clear_by_copy<U: UserAccess + ?Sized>(ua: &mut U, ranges: &[(u64, usize)]) -> Result<()> {
    for &(addr, len) in ranges {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZEROS.len());
            ua.copy_to_user(addr + done as u64, &ZEROS[..n])?;
            done += n;
        }
    }
    Ok(())
}

/// Zero `len` bytes of core-owned memory at `off` in `r`.
pub(crate) fn clear_region(r: &HostRegion, off: usize, len: usize) -> Result<()> {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZEROS.len());
        r.write(off + done, &ZEROS[..n])?;
        done += n;
    }
    Ok(())
}

/// Highest user address + 1 on x86-64 with 4-level host paging (TASK_SIZE_MAX).
pub const TASK_SIZE_MAX: u64 = 0x7fff_ffff_f000;

impl UserAccess for ProcessVm {
    fn copy_from_user(&mut self, addr: u64, buf: &mut [u8]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        check_range(addr, buf.len())?;
        if let Some((r, off)) = owned_region(&mut None, addr, buf.len()) {
            return r.read(off, buf);
        }
        let len = buf.len();
        let remote = [RemoteIoVec {
            base: addr as usize,
            len,
        }];
        let mut local = [IoSliceMut::new(buf)];
        match process_vm_readv(Pid::this(), &mut local, &remote) {
            Ok(n) if n == len => Ok(()),
            _ => Err(Errno::EFAULT),
        }
    }

    fn copy_to_user(&mut self, addr: u64, buf: &[u8]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        check_range(addr, buf.len())?;
        if let Some((r, off)) = owned_region(&mut None, addr, buf.len()) {
            return r.write(off, buf);
        }
        let remote = [RemoteIoVec {
            base: addr as usize,
            len: buf.len(),
        }];
        let local = [IoSlice::new(buf)];
        match process_vm_writev(Pid::this(), &local, &remote) {
            Ok(n) if n == buf.len() => Ok(()),
            _ => Err(Errno::EFAULT),
        }
    }

    fn owned_region(&mut self, addr: u64, len: usize) -> Option<(Arc<HostRegion>, usize)> {
        check_range(addr, len).ok()?;
        owned_region(&mut None, addr, len)
    }

    fn clear_user(&mut self, ranges: &[(u64, usize)]) -> Result<()> {
        let Some(zero) = dev_zero() else {
            return ranges.iter().try_for_each(|&(addr, len)| {
                check_range(addr, len)?;
                clear_by_copy(self, &[(addr, len)])
            });
        };
        let mut iov = Vec::with_capacity(ranges.len().min(IOV_MAX));
        let mut cache = None;
        for batch in ranges.chunks(IOV_MAX) {
            iov.clear();
            for &(addr, len) in batch {
                check_range(addr, len)?;
                if let Some((r, off)) = owned_region(&mut cache, addr, len) {
                    clear_region(&r, off, len)?;
                } else if len > 0 {
                    iov.push(libc::iovec {
                        iov_base: addr as usize as *mut libc::c_void,
                        iov_len: len,
                    });
                }
            }
            zero_fill(zero, &mut iov)?;
        }
        Ok(())
    }

    fn copy_to_user_segs(&mut self, segs: &[(u64, &[u8])]) -> Result<()> {
        let mut cache = None;
        for batch in segs.chunks(IOV_MAX) {
            let mut total = 0;
            let mut local = Vec::with_capacity(batch.len());
            let mut remote = Vec::with_capacity(batch.len());
            for &(addr, buf) in batch {
                if buf.is_empty() {
                    continue;
                }
                check_range(addr, buf.len())?;
                if let Some((r, off)) = owned_region(&mut cache, addr, buf.len()) {
                    r.write(off, buf)?;
                    continue;
                }
                total += buf.len();
                local.push(IoSlice::new(buf));
                remote.push(RemoteIoVec {
                    base: addr as usize,
                    len: buf.len(),
                });
            }
            if total == 0 {
                continue;
            }
            match process_vm_writev(Pid::this(), &local, &remote) {
                Ok(n) if n == total => {}
                _ => return Err(Errno::EFAULT),
            }
        }
        Ok(())
    }
}

/// A caller-provided buffer that stands at `base` in user memory (the copy of an
/// fcntl.ioctl-style argument). Accesses inside it are plain copies; anything
/// else (embedded pointers) goes to the process's address space.
pub struct UserBuf<'a> {
    pub base: u64,
    pub data: &'a mut [u8],
}

/// Where an access falls relative to the window.
enum Place {
    Inside(usize),
    /// Starts inside the window but runs past its end: refused (EFAULT), so a short
    /// buffer is never written beyond its end.
    Straddles,
    Outside,
}

impl UserBuf<'_> {
    fn place(&self, addr: u64, len: usize) -> Place {
        let Some(off) = addr.checked_sub(self.base) else {
            return Place::Outside;
        };
        if off >= self.data.len() as u64 {
            return Place::Outside;
        }
        match off.checked_add(len as u64) {
            Some(end) if end <= self.data.len() as u64 => Place::Inside(off as usize),
            _ => Place::Straddles,
        }
    }
}

impl UserAccess for UserBuf<'_> {
    fn copy_from_user(&mut self, addr: u64, buf: &mut [u8]) -> Result<()> {
        match self.place(addr, buf.len()) {
            Place::Inside(off) => {
                buf.copy_from_slice(&self.data[off..off + buf.len()]);
                Ok(())
            }
            Place::Straddles => Err(Errno::EFAULT),
            Place::Outside => ProcessVm.copy_from_user(addr, buf),
        }
    }

    fn copy_to_user(&mut self, addr: u64, buf: &[u8]) -> Result<()> {
        match self.place(addr, buf.len()) {
            Place::Inside(off) => {
                self.data[off..off + buf.len()].copy_from_slice(buf);
                Ok(())
            }
            Place::Straddles => Err(Errno::EFAULT),
            Place::Outside => ProcessVm.copy_to_user(addr, buf),
        }
    }

    fn clear_user(&mut self, ranges: &[(u64, usize)]) -> Result<()> {
        if ranges
            .iter()
            .all(|&(a, l)| matches!(self.place(a, l), Place::Outside))
        {
            return ProcessVm.clear_user(ranges);
        }
        for &(addr, len) in ranges {
            match self.place(addr, len) {
                Place::Inside(off) => self.data[off..off + len].fill(0),
                Place::Straddles => return Err(Errno::EFAULT),
                Place::Outside => ProcessVm.clear_user(&[(addr, len)])?,
            }
        }
        Ok(())
    }

    fn owned_region(&mut self, addr: u64, len: usize) -> Option<(Arc<HostRegion>, usize)> {
        let end = addr.checked_add(len as u64)?;
        let overlaps = addr < self.base + self.data.len() as u64 && end > self.base;
        if overlaps {
            return None;
        }
        ProcessVm.owned_region(addr, len)
    }

    fn copy_to_user_segs(&mut self, segs: &[(u64, &[u8])]) -> Result<()> {
        if segs
            .iter()
            .all(|&(a, b)| matches!(self.place(a, b.len()), Place::Outside))
        {
            return ProcessVm.copy_to_user_segs(segs);
        }
        segs.iter().try_for_each(|&(a, b)| self.copy_to_user(a, b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_pointers_fault() {
        let mut b = [0u8; 8];
        assert_eq!(ProcessVm.copy_from_user(0, &mut b), Err(Errno::EFAULT));
        assert_eq!(ProcessVm.copy_from_user(8, &mut b), Err(Errno::EFAULT));
        assert_eq!(ProcessVm.copy_to_user(0x10, &b), Err(Errno::EFAULT));
        assert_eq!(
            ProcessVm.copy_from_user(u64::MAX - 3, &mut b),
            Err(Errno::EFAULT)
        );
        assert_eq!(
            ProcessVm.copy_from_user(0xffff_8000_0000_0000, &mut b),
            Err(Errno::EFAULT)
        );
    }

    #[test]
    fn own_memory_round_trips() {
        let src = [1u8, 2, 3, 4, 5, 6, 7, 8];
        let mut dst = [0u8; 8];
        ProcessVm
            .copy_from_user(src.as_ptr() as u64, &mut dst)
            .unwrap();
        assert_eq!(src, dst);
        let mut target = vec![0u8; 8];
        ProcessVm
            .copy_to_user(target.as_mut_ptr() as u64, &src)
            .unwrap();
        assert_eq!(target, src);
    }

    #[test]
    fn window_and_fallback() {
        let outside = [9u8; 4];
        let mut data = vec![0u8; 16];
        let mut ub = UserBuf {
            base: 0x1000,
            data: &mut data,
        };
        ub.copy_to_user(0x1004, &[1, 2, 3, 4]).unwrap();
        let mut got = [0u8; 4];
        ub.copy_from_user(0x1004, &mut got).unwrap();
        assert_eq!(got, [1, 2, 3, 4]);
        ub.copy_from_user(outside.as_ptr() as u64, &mut got)
            .unwrap();
        assert_eq!(got, [9; 4]);
        // starts inside, runs past the end: refused, nothing written
        assert_eq!(ub.copy_from_user(0x100e, &mut got), Err(Errno::EFAULT));
        assert_eq!(ub.copy_to_user(0x100e, &[7; 4]), Err(Errno::EFAULT));
        assert_eq!(ub.data[14..], [0, 0]);
    }

    #[test]
    fn core_owned_memory_is_copied_directly() {
        let r = HostRegion::new(3 * 4096).unwrap();
        let a = r.addr();
        r.write(0, &[0xff; 3 * 4096]).unwrap();
        ProcessVm.copy_to_user(a + 10, &[1, 2, 3]).unwrap();
        ProcessVm
            .clear_user(&[(a + 100, 5000), (a + 3 * 4096 - 1, 1)])
            .unwrap();
        ProcessVm
            .copy_to_user_segs(&[(a + 200, &[4]), (a + 3 * 4096 - 2, &[5])])
            .unwrap();
        let mut b = vec![0u8; 3 * 4096];
        ProcessVm.copy_from_user(a, &mut b).unwrap();
        assert_eq!(b[10..13], [1, 2, 3]);
        assert_eq!(b[99], 0xff);
        assert!(b[100..5100]
            .iter()
            .enumerate()
            .all(|(i, &x)| x == u8::from(i == 100) * 4));
        assert_eq!(b[5100], 0xff);
        assert_eq!(b[3 * 4096 - 2..], [5, 0]);
        assert_eq!(ProcessVm.owned_region(a + 8, 16).map(|(_, o)| o), Some(8));
        assert!(ProcessVm.owned_region(a + 8, 3 * 4096).is_none());
        // A window over part of it: the copy, not the region, is the user's memory.
        let mut data = vec![0u8; 16];
        let mut ub = UserBuf {
            base: a + 64,
            data: &mut data,
        };
        assert!(ub.owned_region(a, 4096).is_none());
        assert!(ub.owned_region(a, 64).is_some());
        // Running past the region's end is not the region's: the process's view
        // decides (here the page after it is not mapped by us, or is someone else's).
        assert!(HostRegion::lookup(a + 3 * 4096 - 1, 2).is_none());
    }

    #[test]
    fn clear_and_scatter() {
        let mut target = vec![0xffu8; 10000];
        let a = target.as_mut_ptr() as u64;
        ProcessVm
            .clear_user(&[(a + 1, 4096), (a + 5000, 3), (a + 9999, 0)])
            .unwrap();
        assert_eq!(target[0], 0xff);
        assert!(target[1..4097].iter().all(|&x| x == 0));
        assert_eq!(target[4097], 0xff);
        assert_eq!(target[5000..5004], [0, 0, 0, 0xff]);
        ProcessVm
            .copy_to_user_segs(&[(a, &[1, 2]), (a + 9998, &[3, 4])])
            .unwrap();
        assert_eq!(target[..3], [1, 2, 0]);
        assert_eq!(target[9998..], [3, 4]);
        // Many ranges: more than one readv batch.
        let ranges: Vec<(u64, usize)> = (0..3000).map(|i| (a + 3 * i, 2)).collect();
        ProcessVm.clear_user(&ranges).unwrap();
        assert!(target[..9000]
            .iter()
            .enumerate()
            .all(|(i, &x)| x == 0 || i % 3 == 2));
        for bad in [0u64, 0x10, TASK_SIZE_MAX - 2, u64::MAX - 1] {
            assert_eq!(ProcessVm.clear_user(&[(bad, 4)]), Err(Errno::EFAULT));
            assert_eq!(
                ProcessVm.copy_to_user_segs(&[(a, &[9]), (bad, &[1, 2, 3, 4])]),
                Err(Errno::EFAULT)
            );
        }
        // Read-only memory faults.
        static RO: [u8; 64] = [7; 64];
        assert_eq!(
            ProcessVm.clear_user(&[(RO.as_ptr() as u64, 64)]),
            Err(Errno::EFAULT)
        );
        assert!(RO.iter().all(|&x| x == 7));
        // A window: inside is the copy, outside the process.
        let mut data = vec![5u8; 16];
        let mut ub = UserBuf {
            base: 0x1000,
            data: &mut data,
        };
        ub.clear_user(&[(0x1004, 4), (a + 100, 2)]).unwrap();
        assert_eq!(ub.data[3..9], [5, 0, 0, 0, 0, 5]);
        assert_eq!(ub.clear_user(&[(0x100e, 4)]), Err(Errno::EFAULT));
        assert_eq!(target[100..102], [0, 0]);
    }
}
