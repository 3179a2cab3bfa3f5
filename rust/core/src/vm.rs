//! The VM: memory slots, vCPUs, and the VM ioctls.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::errno::{Errno, Result};
use crate::hostmem::HostRegion;
use crate::memslot::{Change, MemSlots, RegionIoctl};
use crate::uaccess::{read_struct, UserAccess};
use crate::uapi::{
    self, kvm_enable_cap, kvm_userspace_memory_region, kvm_userspace_memory_region2,
};
use crate::vcpu::Vcpu;

/// KVM_MAX_VCPU_IDS on x86 (KVM_CAP_MAX_VCPU_ID).
pub const KVM_MAX_VCPU_IDS: u64 = 4096;
/// KVM_MAX_VCPUS on x86 (KVM_CAP_MAX_VCPUS).
pub const KVM_MAX_VCPUS: usize = 1024;

/// Capabilities enabled on the VM with KVM_ENABLE_CAP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmCaps {
    /// KVM_CAP_EXCEPTION_PAYLOAD: pending exceptions and their payload in VCPU_EVENTS.
    pub exception_payload: bool,
    /// KVM_CAP_X86_TRIPLE_FAULT_EVENT: triple_fault.pending in VCPU_EVENTS.
    pub triple_fault_event: bool,
}

/// VM-wide state behind the VM lock (kvm->slots_lock and friends in one).
#[derive(Debug, Default)]
pub struct VmState {
    pub memslots: MemSlots,
    pub vcpus: BTreeMap<u32, Arc<Vcpu>>,
    /// KVM_CREATE_IRQCHIP ran (an in-kernel PIC/IOAPIC/LAPIC model).
    pub irqchip: bool,
    pub caps: VmCaps,
    /// KVM_SET_TSS_ADDR (VMX's real-mode TSS; stored, never used by the model).
    pub tss_addr: Option<u64>,
    /// KVM_SET_IDENTITY_MAP_ADDR (VMX's EPT identity map; stored only).
    pub identity_map_addr: Option<u64>,
    /// KVM_SET_NR_MMU_PAGES (n_requested_mmu_pages); 0 means "the default".
    pub n_requested_mmu_pages: u64,
}

/// KVM_MIN_ALLOC_MMU_PAGES.
pub const KVM_MIN_ALLOC_MMU_PAGES: u64 = 64;
/// KVM_PERMILLE_MMU_PAGES: the default shadow-page limit is 2% of guest pages.
pub const KVM_PERMILLE_MMU_PAGES: u64 = 20;
/// The highest KVM_SET_TSS_ADDR: the three pages must end below 4 GiB (VMX's check).
pub const TSS_ADDR_MAX: u64 = 0xffff_d000;

impl VmState {
    /// n_max_mmu_pages: the requested limit, or the default computed from the
    /// memslots (kvm_mmu_calculate_default_mmu_pages).
    pub fn n_max_mmu_pages(&self) -> u64 {
        if self.n_requested_mmu_pages != 0 {
            return self.n_requested_mmu_pages;
        }
        let pages: u64 = self.memslots.iter().map(|s| s.npages).sum();
        (pages * KVM_PERMILLE_MMU_PAGES / 1000).max(KVM_MIN_ALLOC_MMU_PAGES)
    }
}

pub struct Vm {
    state: Mutex<VmState>,
    self_ref: Weak<Vm>,
    /// KVM's VM-wide counters (KVM_GET_STATS_FD).
    pub stats: crate::stats::StatsFile,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").field("state", &*self.state()).finish()
    }
}

impl Vm {
    /// KVM_CREATE_VM: only the default VM type (0) exists.
    pub fn new(vm_type: u64) -> Result<Arc<Vm>> {
        if vm_type != 0 {
            return Err(Errno::EINVAL);
        }
        let stats = crate::stats::StatsFile::new(
            "kvm-vm-stats",
            &format!("kvm-{}", std::process::id()),
            crate::stats::VM_STATS,
        )?;
        Ok(Arc::new_cyclic(|w| Vm {
            state: Mutex::new(VmState::default()),
            self_ref: w.clone(),
            stats,
        }))
    }

    pub fn state(&self) -> MutexGuard<'_, VmState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// KVM_SET_USER_MEMORY_REGION(2) with the simulator's host-memory rule.
    pub fn set_user_memory_region(
        &self,
        mem: &kvm_userspace_memory_region2,
        ioctl: RegionIoctl,
    ) -> Result<Change> {
        self.state().memslots.set_region(mem, ioctl, |hva, len| {
            HostRegion::lookup(hva, len).ok_or(Errno::EFAULT)
        })
    }

    /// KVM_CREATE_VCPU.
    pub fn create_vcpu(&self, id: u64) -> Result<Arc<Vcpu>> {
        if id >= KVM_MAX_VCPU_IDS {
            return Err(Errno::EINVAL);
        }
        let id = id as u32;
        let mut st = self.state();
        if st.vcpus.len() >= KVM_MAX_VCPUS {
            return Err(Errno::EINVAL);
        }
        if st.vcpus.contains_key(&id) {
            return Err(Errno::EEXIST);
        }
        let vcpu = Vcpu::new(self.self_ref.clone(), id)?;
        st.vcpus.insert(id, vcpu.clone());
        Ok(vcpu)
    }

    /// KVM_ENABLE_CAP on the VM (kvm_vm_ioctl_enable_cap_generic + the x86 part):
    /// `flags` must be 0, and only capabilities the simulator implements can be enabled.
    pub fn enable_cap(&self, cap: &kvm_enable_cap) -> Result<()> {
        if cap.flags != 0 {
            return Err(Errno::EINVAL);
        }
        let mut st = self.state();
        match u64::from(cap.cap) {
            // Any args[0] is accepted; non-zero enables (x86.c).
            uapi::cap::EXCEPTION_PAYLOAD => st.caps.exception_payload = cap.args[0] != 0,
            uapi::cap::X86_TRIPLE_FAULT_EVENT => st.caps.triple_fault_event = cap.args[0] != 0,
            _ => return Err(Errno::EINVAL),
        }
        Ok(())
    }

    /// VM ioctls that need no new file descriptor (kvm_vm_ioctl + kvm_arch_vm_ioctl).
    pub fn ioctl(&self, request: u64, arg: u64, ua: &mut dyn UserAccess) -> Result<i64> {
        match request {
            uapi::KVM_CHECK_EXTENSION => Ok(crate::kvm::check_extension(arg)),
            uapi::KVM_CREATE_IRQCHIP => {
                let mut st = self.state();
                if st.irqchip {
                    return Err(Errno::EEXIST);
                }
                if !st.vcpus.is_empty() {
                    return Err(Errno::EINVAL);
                }
                st.irqchip = true;
                Ok(0)
            }
            uapi::KVM_ENABLE_CAP => {
                let cap: kvm_enable_cap = read_struct(ua, arg)?;
                self.enable_cap(&cap)?;
                Ok(0)
            }
            uapi::KVM_SET_TSS_ADDR => {
                // vmx_set_tss_addr: the three pages must lie below 4 GiB.
                if arg > TSS_ADDR_MAX {
                    return Err(Errno::EINVAL);
                }
                self.state().tss_addr = Some(arg);
                Ok(0)
            }
            uapi::KVM_SET_IDENTITY_MAP_ADDR => {
                let mut st = self.state();
                if !st.vcpus.is_empty() {
                    return Err(Errno::EINVAL);
                }
                let mut b = [0u8; 8];
                ua.copy_from_user(arg, &mut b)?;
                st.identity_map_addr = Some(u64::from_le_bytes(b));
                Ok(0)
            }
            uapi::KVM_SET_NR_MMU_PAGES => {
                if arg < KVM_MIN_ALLOC_MMU_PAGES {
                    return Err(Errno::EINVAL);
                }
                self.state().n_requested_mmu_pages = arg;
                Ok(0)
            }
            uapi::KVM_SET_USER_MEMORY_REGION => {
                let r: kvm_userspace_memory_region = read_struct(ua, arg)?;
                let r2 = kvm_userspace_memory_region2 {
                    slot: r.slot,
                    flags: r.flags,
                    guest_phys_addr: r.guest_phys_addr,
                    memory_size: r.memory_size,
                    userspace_addr: r.userspace_addr,
                    ..Default::default()
                };
                self.set_user_memory_region(&r2, RegionIoctl::V1)?;
                Ok(0)
            }
            uapi::KVM_SET_USER_MEMORY_REGION2 => {
                let r2: kvm_userspace_memory_region2 = read_struct(ua, arg)?;
                self.set_user_memory_region(&r2, RegionIoctl::V2)?;
                Ok(0)
            }
            // kvm_arch_vm_ioctl's default.
            _ => Err(Errno::ENOTTY),
        }
    }
}
