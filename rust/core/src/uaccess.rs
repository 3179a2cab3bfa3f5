//! copy_from_user / copy_to_user for the software /dev/kvm.
//!
//! An ioctl argument is a user pointer in this process, exactly as the kernel
//! sees it. The simulator reads and writes it with process_vm_readv/writev on
//! its own pid, so a bad pointer yields EFAULT (as the kernel's uaccess does),
//! never a crash.

use std::io::{IoSlice, IoSliceMut};

use nix::sys::uio::{process_vm_readv, process_vm_writev, RemoteIoVec};
use nix::unistd::Pid;
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::errno::{Errno, Result};

/// User memory as seen by an ioctl handler.
pub trait UserAccess {
    fn copy_from_user(&mut self, addr: u64, buf: &mut [u8]) -> Result<()>;
    fn copy_to_user(&mut self, addr: u64, buf: &[u8]) -> Result<()>;
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

/// Highest user address + 1 on x86-64 with 4-level host paging (TASK_SIZE_MAX).
pub const TASK_SIZE_MAX: u64 = 0x7fff_ffff_f000;

impl UserAccess for ProcessVm {
    fn copy_from_user(&mut self, addr: u64, buf: &mut [u8]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        check_range(addr, buf.len())?;
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
}
