//! The software /dev/kvm: file descriptors and the system ioctls.
//!
//! Every simulated file (system, VM, vCPU) is a real file descriptor of this
//! process (a memfd), so its number never collides with other files, a vCPU fd
//! can be mmap'ed for kvm_run exactly like the device's, and descriptors show up
//! in /proc/self/fd with KVM-like names.

use std::collections::HashMap;
use std::os::fd::{AsFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use crate::errno::{Errno, Result};
use crate::uaccess::UserAccess;
use crate::uapi::{self, cap};
use crate::vcpu::{Vcpu, VCPU_MMAP_SIZE};
use crate::vm::Vm;

/// What a simulated file descriptor refers to.
#[derive(Clone, Debug)]
pub enum KvmFile {
    System,
    Vm(Arc<Vm>),
    Vcpu(Arc<Vcpu>),
    /// A binary-statistics file (KVM_GET_STATS_FD); it takes no ioctls.
    Stats,
}

struct Entry {
    file: KvmFile,
    /// The descriptor's number. It is closed by [`SimKvm::close`] only: if userspace
    /// closes it with close(2) instead, the number may be reused by another file, and
    /// the stale entry is then replaced without closing anything.
    fd: RawFd,
    /// A vCPU file holds a reference on its VM, as in the kernel.
    _vm_ref: Option<Arc<Vm>>,
}

/// One software /dev/kvm: the table of open simulated files.
#[derive(Default)]
pub struct SimKvm {
    files: Mutex<HashMap<RawFd, Entry>>,
}

fn new_memfd(name: &str) -> Result<OwnedFd> {
    let name = std::ffi::CString::new(name).map_err(|_| Errno::EINVAL)?;
    nix::sys::memfd::memfd_create(
        name.as_c_str(),
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .map_err(Errno::from)
}

/// KVM_CHECK_EXTENSION: exactly what the simulator implements.
pub fn check_extension(capability: u64) -> i64 {
    static ONLINE: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    let online =
        *ONLINE.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()) as i64);
    match capability {
        cap::USER_MEMORY
        | cap::DESTROY_MEMORY_REGION_WORKS
        | cap::JOIN_MEMORY_REGIONS_WORKS
        | cap::READONLY_MEM
        | cap::USER_MEMORY2
        | cap::SET_TSS_ADDR
        | cap::SET_IDENTITY_MAP_ADDR
        | cap::MMU_SHADOW_CACHE_CONTROL
        | cap::ENABLE_CAP
        | cap::ENABLE_CAP_VM
        | cap::EXCEPTION_PAYLOAD
        | cap::X86_TRIPLE_FAULT_EVENT
        | cap::BINARY_STATS_FD
        | cap::EXT_CPUID
        | cap::IRQCHIP
        | cap::MP_STATE
        | cap::VCPU_EVENTS
        | cap::DEBUGREGS
        | cap::SREGS2 => 1,
        // KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET.
        cap::MANUAL_DIRTY_LOG_PROTECT2 => 3,
        // The largest ring, in bytes (KVM_DIRTY_RING_MAX_ENTRIES entries).
        cap::DIRTY_LOG_RING | cap::DIRTY_LOG_RING_ACQ_REL => {
            (crate::dirty_ring::MAX_ENTRIES * crate::dirty_ring::ENTRY_SIZE) as i64
        }
        cap::NR_VCPUS => online.min(crate::vm::KVM_MAX_VCPUS as i64),
        cap::MAX_VCPUS => crate::vm::KVM_MAX_VCPUS as i64,
        cap::MAX_VCPU_ID => crate::vm::KVM_MAX_VCPU_IDS as i64,
        cap::NR_MEMSLOTS => i64::from(crate::memslot::KVM_USER_MEM_SLOTS),
        // Bit mask of supported VM types: KVM_X86_DEFAULT_VM only.
        cap::VM_TYPES => 1,
        _ => 0,
    }
}

/// Capabilities the simulator reports as non-zero, for listings.
pub fn supported_capabilities() -> Vec<(u64, i64)> {
    (0..256)
        .map(|c| (c, check_extension(c)))
        .filter(|&(_, v)| v != 0)
        .collect()
}

impl Drop for SimKvm {
    fn drop(&mut self) {
        for (_, e) in self.table().drain() {
            let _ = nix::unistd::close(e.fd);
        }
    }
}

impl SimKvm {
    pub fn new() -> Self {
        Self::default()
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<RawFd, Entry>> {
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn install(&self, file: KvmFile, fd: OwnedFd, vm_ref: Option<Arc<Vm>>) -> RawFd {
        let raw = fd.into_raw_fd();
        // A stale entry under this number belonged to a descriptor userspace already
        // closed with close(2) (that is how the kernel could hand the number out again).
        self.table().insert(
            raw,
            Entry {
                file,
                fd: raw,
                _vm_ref: vm_ref,
            },
        );
        raw
    }

    /// open("/dev/kvm"): a new system file descriptor.
    pub fn open(&self) -> Result<RawFd> {
        Ok(self.install(KvmFile::System, new_memfd("kvmmmu-kvm")?, None))
    }

    /// close(fd). Objects live on while other files refer to them, as in the kernel.
    pub fn close(&self, fd: RawFd) -> Result<()> {
        let entry = self.table().remove(&fd).ok_or(Errno::EBADF)?;
        let _ = nix::unistd::close(entry.fd);
        drop(entry);
        Ok(())
    }

    /// The object behind a simulated fd.
    pub fn file(&self, fd: RawFd) -> Result<KvmFile> {
        self.table()
            .get(&fd)
            .map(|e| e.file.clone())
            .ok_or(Errno::EBADF)
    }

    /// Open simulated descriptors, sorted.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut v: Vec<_> = self.table().keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// ioctl(fd, request, arg): `arg` is a value or a user pointer, as for the kernel.
    pub fn ioctl(&self, fd: RawFd, request: u64, arg: u64, ua: &mut dyn UserAccess) -> Result<i64> {
        // The request is an unsigned int in the kernel.
        let request = request & 0xffff_ffff;
        match self.file(fd)? {
            KvmFile::System => self.system_ioctl(request, arg, ua),
            KvmFile::Vm(vm) => match request {
                uapi::KVM_CREATE_VCPU => {
                    let vcpu = vm.create_vcpu(arg)?;
                    let fd = vcpu
                        .memfd()
                        .as_fd()
                        .try_clone_to_owned()
                        .map_err(Errno::from)?;
                    Ok(i64::from(self.install(KvmFile::Vcpu(vcpu), fd, Some(vm))))
                }
                uapi::KVM_GET_STATS_FD => {
                    let fd = vm.stats.open_fd()?;
                    Ok(i64::from(self.install(KvmFile::Stats, fd, None)))
                }
                _ => vm.ioctl(request, arg, ua),
            },
            KvmFile::Stats => Err(Errno::ENOTTY),
            KvmFile::Vcpu(vcpu) => {
                if (request >> 8) & 0xff != uapi::KVMIO {
                    return Err(Errno::EINVAL);
                }
                if request == uapi::KVM_GET_STATS_FD {
                    let fd = vcpu.stats.open_fd()?;
                    return Ok(i64::from(self.install(KvmFile::Stats, fd, None)));
                }
                vcpu.ioctl(request, arg, ua)
            }
        }
    }

    fn system_ioctl(&self, request: u64, arg: u64, ua: &mut dyn UserAccess) -> Result<i64> {
        match request {
            uapi::KVM_GET_API_VERSION if arg == 0 => Ok(uapi::KVM_API_VERSION),
            uapi::KVM_CREATE_VM => {
                let vm = Vm::new(arg)?;
                Ok(i64::from(self.install(
                    KvmFile::Vm(vm),
                    new_memfd("kvmmmu-vm")?,
                    None,
                )))
            }
            uapi::KVM_CHECK_EXTENSION => Ok(check_extension(arg)),
            uapi::KVM_GET_VCPU_MMAP_SIZE if arg == 0 => Ok(VCPU_MMAP_SIZE as i64),
            // kvm_dev_ioctl's "goto out" and kvm_arch_dev_ioctl's default.
            _ => crate::cpuid::system_ioctl(request, arg, ua).unwrap_or(Err(Errno::EINVAL)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uaccess::ProcessVm;

    #[test]
    fn system_vm_vcpu_lifecycle() {
        let k = SimKvm::new();
        let sys = k.open().unwrap();
        let ua = &mut ProcessVm;
        assert_eq!(k.ioctl(sys, uapi::KVM_GET_API_VERSION, 0, ua), Ok(12));
        assert_eq!(
            k.ioctl(sys, uapi::KVM_GET_API_VERSION, 1, ua),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            k.ioctl(sys, uapi::KVM_CREATE_VM, 99, ua),
            Err(Errno::EINVAL)
        );
        let vm = k.ioctl(sys, uapi::KVM_CREATE_VM, 0, ua).unwrap() as RawFd;
        assert_eq!(
            k.ioctl(vm, uapi::KVM_GET_API_VERSION, 0, ua),
            Err(Errno::ENOTTY)
        );
        let vcpu = k.ioctl(vm, uapi::KVM_CREATE_VCPU, 0, ua).unwrap() as RawFd;
        assert_eq!(
            k.ioctl(vm, uapi::KVM_CREATE_VCPU, 0, ua),
            Err(Errno::EEXIST)
        );
        assert_eq!(
            k.ioctl(vm, uapi::KVM_CREATE_VCPU, 4096, ua),
            Err(Errno::EINVAL)
        );
        assert_eq!(k.ioctl(vcpu, 0xdead, 0, ua), Err(Errno::EINVAL));
        assert_eq!(k.ioctl(vcpu, uapi::KVM_GET_REGS, 0, ua), Err(Errno::EFAULT));
        k.close(vm).unwrap();
        // the vCPU keeps its VM alive
        let mut regs = uapi::kvm_regs::default();
        let p = &mut regs as *mut _ as u64;
        assert_eq!(k.ioctl(vcpu, uapi::KVM_GET_REGS, p, ua), Ok(0));
        assert_eq!(regs.rflags, 2);
        assert_eq!(
            k.ioctl(vm, uapi::KVM_GET_API_VERSION, 0, ua),
            Err(Errno::EBADF)
        );
        let weak = match k.file(vcpu).unwrap() {
            KvmFile::Vcpu(v) => Arc::downgrade(&v.vm().unwrap()),
            _ => unreachable!(),
        };
        k.close(vcpu).unwrap();
        assert!(
            weak.upgrade().is_none(),
            "the VM is freed with its last file"
        );
        k.close(sys).unwrap();
        assert!(k.fds().is_empty());
    }
}
