//! The VM: memory slots, vCPUs, and the VM ioctls.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::errno::{Errno, Result};
use crate::hostmem::HostRegion;
use crate::memslot::{Change, MemSlots, RegionIoctl};
use crate::mmu::shadow::Mmu;
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
    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2's flags (kvm->manual_dirty_log_protect).
    pub manual_dirty_log: u64,
}

/// VM-wide state behind the VM lock (kvm->slots_lock and friends in one). Lock order:
/// a vCPU's state lock may be held while taking this one, never the reverse.
#[derive(Debug)]
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
    /// The shadow MMU: shadow pages, rmaps, write tracking, the page limit.
    pub mmu: Mmu,
    /// KVM_CAP_DIRTY_LOG_RING(_ACQ_REL): each vCPU's ring size in bytes (0: none).
    pub dirty_ring_size: u64,
    /// Two-dimensional paging (NPT/EPT) instead of the shadow MMU (simulator option).
    pub tdp: bool,
    /// kvm->arch.wall_clock: the gpa last written to MSR_KVM_WALL_CLOCK(_NEW).
    pub wall_clock: u64,
}

/// KVM_MIN_ALLOC_MMU_PAGES.
pub const KVM_MIN_ALLOC_MMU_PAGES: u64 = 64;
/// The highest KVM_SET_TSS_ADDR: the three pages must end below 4 GiB (VMX's check).
pub const TSS_ADDR_MAX: u64 = 0xffff_d000;

pub struct Vm {
    state: Mutex<VmState>,
    self_ref: Weak<Vm>,
    /// KVM's VM-wide counters (KVM_GET_STATS_FD), shared with the MMU that drives them.
    pub stats: Arc<crate::stats::StatsFile>,
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
        let stats = Arc::new(crate::stats::StatsFile::new(
            "kvm-vm-stats",
            &format!("kvm-{}", std::process::id()),
            crate::stats::VM_STATS,
        )?);
        let state = VmState {
            memslots: MemSlots::default(),
            vcpus: BTreeMap::new(),
            irqchip: false,
            caps: VmCaps::default(),
            tss_addr: None,
            identity_map_addr: None,
            mmu: Mmu::new(stats.clone()),
            dirty_ring_size: 0,
            tdp: false,
            wall_clock: 0,
        };
        Ok(Arc::new_cyclic(|w| Vm {
            state: Mutex::new(state),
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
        let mut guard = self.state();
        let st = &mut *guard;
        let id = (mem.slot & 0xffff) as u16;
        let old = st.memslots.get(id).cloned();
        let change = st.memslots.set_region(mem, ioctl, |hva, len| {
            HostRegion::lookup(hva, len).ok_or(Errno::EFAULT)
        })?;
        // kvm_arch_commit_memory_region / kvm_arch_flush_shadow_memslot.
        match (change, old, st.memslots.get(id)) {
            (Change::FlagsOnly, Some(old), Some(new)) => {
                // kvm_mmu_slot_apply_flags: only logging toggles of writable slots act.
                let initially_set = st.memslots.dirty_policy.initially_set;
                if !old.dirty_logging() && new.dirty_logging() {
                    st.mmu.slot_logging_enabled(new, initially_set);
                } else if old.dirty_logging() && !new.dirty_logging() && !new.readonly() {
                    st.mmu.slot_logging_disabled(new);
                }
            }
            (Change::Create, _, Some(new)) => st.mmu.slot_created(new),
            (Change::Delete, Some(old), _) => st.mmu.slot_deleted(&old),
            (Change::Move, Some(old), Some(new)) => st.mmu.slot_moved(&old, new),
            _ => {}
        }
        Ok(change)
    }

    /// Choose two-dimensional paging (as on a host with NPT/EPT and tdp_mmu=N: the
    /// legacy MMU with direct pages) or the shadow MMU, before any vCPU exists (EBUSY).
    pub fn set_tdp(&self, tdp: bool) -> Result<()> {
        let mut st = self.state();
        if !st.vcpus.is_empty() {
            return Err(Errno::EBUSY);
        }
        st.tdp = tdp;
        Ok(())
    }

    /// The vCPUs, by id.
    pub fn vcpus(&self) -> Vec<Arc<Vcpu>> {
        self.state().vcpus.values().cloned().collect()
    }

    /// Audit the shadow MMU with every vCPU's roots (crate::mmu::audit). The vCPU
    /// states are locked in id order before the VM, as the lock order asks.
    pub fn audit(&self) -> std::result::Result<(), String> {
        let vcpus = self.vcpus();
        let states: Vec<_> = vcpus.iter().map(|v| v.state()).collect();
        let ctxs: Vec<_> = states.iter().map(|s| &s.mmu).collect();
        let st = self.state();
        crate::mmu::audit::audit(&st.mmu, &st.memslots, &ctxs)
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
        let vcpu = Vcpu::new_with_ring(self.self_ref.clone(), id, st.dirty_ring_size)?;
        st.vcpus.insert(id, vcpu.clone());
        Ok(vcpu)
    }

    /// KVM_ENABLE_CAP on the VM (kvm_vm_ioctl_enable_cap_generic + the x86 part):
    /// `flags` must be 0, and only capabilities the simulator implements can be enabled.
    pub fn enable_cap(&self, cap: &kvm_enable_cap) -> Result<()> {
        let mut st = self.state();
        if matches!(
            u64::from(cap.cap),
            uapi::cap::DIRTY_LOG_RING | uapi::cap::DIRTY_LOG_RING_ACQ_REL
        ) {
            // kvm_vm_ioctl_enable_dirty_log_ring (generic: flags are not checked). The
            // kernel takes the size as a u32: the upper half of args[0] is dropped.
            let size = u64::from(cap.args[0] as u32);
            crate::dirty_ring::check_size(size)?;
            if st.dirty_ring_size != 0 || !st.vcpus.is_empty() {
                return Err(Errno::EINVAL);
            }
            st.dirty_ring_size = size;
            // kvm_use_dirty_bitmap: rings only, so logging slots get no bitmap.
            st.memslots.dirty_policy.use_bitmap = false;
            return Ok(());
        }
        if cap.flags != 0 {
            return Err(Errno::EINVAL);
        }
        match u64::from(cap.cap) {
            // Any args[0] is accepted; non-zero enables (x86.c).
            uapi::cap::EXCEPTION_PAYLOAD => st.caps.exception_payload = cap.args[0] != 0,
            uapi::cap::X86_TRIPLE_FAULT_EVENT => st.caps.triple_fault_event = cap.args[0] != 0,
            uapi::cap::MANUAL_DIRTY_LOG_PROTECT2 => {
                use crate::dirty_log::{INITIALLY_SET, MANUAL_PROTECT_ENABLE};
                let allowed = if cap.args[0] & MANUAL_PROTECT_ENABLE != 0 {
                    MANUAL_PROTECT_ENABLE | INITIALLY_SET
                } else {
                    MANUAL_PROTECT_ENABLE
                };
                if cap.args[0] & !allowed != 0 {
                    return Err(Errno::EINVAL);
                }
                st.caps.manual_dirty_log = cap.args[0];
                st.memslots.dirty_policy.initially_set =
                    cap.args[0] == MANUAL_PROTECT_ENABLE | INITIALLY_SET;
            }
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
            uapi::KVM_RESET_DIRTY_RINGS => self.reset_dirty_rings(),
            uapi::KVM_GET_DIRTY_LOG => {
                let log: uapi::kvm_dirty_log = read_struct(ua, arg)?;
                self.get_dirty_log(&log, ua)?;
                Ok(0)
            }
            uapi::KVM_CLEAR_DIRTY_LOG => {
                let log: uapi::kvm_clear_dirty_log = read_struct(ua, arg)?;
                self.clear_dirty_log(&log, ua)?;
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
                self.state().mmu.set_nr_mmu_pages(arg)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn region(slot: u32, gpa: u64, size: u64, hva: u64) -> kvm_userspace_memory_region2 {
        kvm_userspace_memory_region2 {
            slot,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: hva,
            ..Default::default()
        }
    }

    #[test]
    fn memslot_changes_reach_the_mmu() {
        let host = HostRegion::new(64 << 20).unwrap();
        let vm = Vm::new(0).unwrap();
        let set = |r| vm.set_user_memory_region(&r, RegionIoctl::V1);
        set(region(0, 0, 32 << 20, host.addr())).unwrap();
        set(region(1, 1 << 32, 32 << 20, host.addr() + (32 << 20))).unwrap();
        let check = || {
            let st = vm.state();
            st.mmu.check_invariants(&st.memslots).unwrap();
            st.mmu.n_max()
        };
        // default limit: 16384 pages / 50
        assert_eq!(check(), 327);
        set(region(1, 2 << 32, 32 << 20, host.addr() + (32 << 20))).unwrap(); // move
        assert_eq!(check(), 327);
        set(region(1, 0, 0, 0)).unwrap(); // delete
        assert_eq!(check(), 163);
        // a requested limit sticks across slot changes
        assert_eq!(
            vm.ioctl(
                uapi::KVM_SET_NR_MMU_PAGES,
                63,
                &mut crate::uaccess::ProcessVm
            ),
            Err(Errno::EINVAL)
        );
        vm.ioctl(
            uapi::KVM_SET_NR_MMU_PAGES,
            1000,
            &mut crate::uaccess::ProcessVm,
        )
        .unwrap();
        set(region(2, 3 << 32, 4 << 20, host.addr())).unwrap();
        assert_eq!(check(), 1000);
    }
}
