//! The vCPU: its architectural state, its mmap area and its ioctls.

pub mod cr;
pub mod debugregs;
pub mod emulate;
pub mod events;
pub mod guest_ops;
pub mod mmu;
pub mod mp_state;
pub mod msr;
pub mod run;
pub mod sregs;

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::errno::{Errno, Result};
use crate::hostmem::SharedMapping;
use crate::uaccess::{read_struct, write_struct, UserAccess};
use crate::uapi::{self, kvm_regs, kvm_sregs};
use crate::vm::Vm;

pub use sregs::CpuFeatures;

/// KVM_GET_VCPU_MMAP_SIZE: kvm_run page, PIO data page, coalesced-MMIO ring page.
pub const VCPU_MMAP_SIZE: usize = 3 * uapi::PAGE_SIZE as usize;
/// KVM_PIO_PAGE_OFFSET: the PIO data page, in pages from the start of the area.
pub const KVM_PIO_PAGE_OFFSET: usize = 1;

/// Architectural state of one vCPU.
#[derive(Clone, Debug)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// What SET_SREGS checks against: from the CPUID table once KVM_SET_CPUID2 ran.
    pub features: CpuFeatures,
    pub events: events::EventsState,
    /// KVM_GET/SET_DEBUGREGS.
    pub debugregs: debugregs::DebugRegs,
    /// KVM_GET/SET_MP_STATE and the local APIC's INIT/SIPI latch.
    pub mp: mp_state::MpState,
    /// The CPUID table given to KVM_SET_CPUID2, as given (empty until then); see crate::cpuid.
    pub cpuid: Vec<uapi::kvm_cpuid_entry2>,
    /// PAE paging: the PDPTE registers (loaded from CR3 at the architectural points).
    pub pdptrs: [u64; 4],
    /// PKRU (XSAVE state component 9; set through the simulator-only API).
    pub pkru: u32,
    /// The vCPU's shadow MMU context: roles, roots, pending MMU requests.
    pub mmu: crate::mmu::context::KvmMmu,
    /// STAR, LSTAR, CSTAR, SFMASK and KERNEL_GS_BASE as the guest's WRMSR set them
    /// (SYSCALL/SYSRET/SWAPGS; not reachable through KVM_GET/SET_MSRS yet).
    pub syscall_msrs: emulate::SyscallMsrs,
}

impl VcpuState {
    /// The state after KVM_CREATE_VCPU; only vCPU 0 is the bootstrap processor.
    pub fn reset(bsp: bool) -> Self {
        VcpuState {
            regs: sregs::reset_regs(),
            sregs: sregs::reset_sregs_for(bsp),
            features: CpuFeatures::default(),
            events: events::EventsState::default(),
            debugregs: debugregs::DebugRegs::default(),
            mp: mp_state::MpState::reset(bsp),
            cpuid: Vec::new(),
            pdptrs: [0; 4],
            pkru: 0,
            mmu: crate::mmu::context::KvmMmu::default(),
            syscall_msrs: emulate::SyscallMsrs::default(),
        }
    }
}

/// sizeof(struct kvm_sregs2): the kvm_sregs fields up to apic_base, then flags and pdptrs[4].
const SREGS2_SIZE: usize = 320;
/// Bytes of kvm_sregs shared with kvm_sregs2 (everything before interrupt_bitmap).
const SREGS_COMMON: usize = 280;
const _: () = assert!(std::mem::size_of::<uapi::kvm_sregs2_raw>() == SREGS2_SIZE);

/// KVM_GET_SREGS2's bytes: flags PDPTRS_VALID and the PDPTEs only in PAE paging.
fn sregs2_bytes(s: &kvm_sregs, pae: bool, pdptrs: &[u64; 4]) -> [u8; SREGS2_SIZE] {
    use zerocopy::IntoBytes;
    let mut out = [0u8; SREGS2_SIZE];
    out[..SREGS_COMMON].copy_from_slice(&s.as_bytes()[..SREGS_COMMON]);
    if pae {
        out[SREGS_COMMON..SREGS_COMMON + 8].copy_from_slice(&1u64.to_le_bytes());
        for (i, p) in pdptrs.iter().enumerate() {
            let o = SREGS_COMMON + 8 + 8 * i;
            out[o..o + 8].copy_from_slice(&p.to_le_bytes());
        }
    }
    out
}

/// The kvm_sregs (interrupt_bitmap zero), flags and PDPTEs of a kvm_sregs2.
fn sregs2_parts(raw: &[u8; SREGS2_SIZE]) -> (kvm_sregs, u64, [u64; 4]) {
    use zerocopy::{FromZeros, IntoBytes};
    let mut s = kvm_sregs::new_zeroed();
    s.as_mut_bytes()[..SREGS_COMMON].copy_from_slice(&raw[..SREGS_COMMON]);
    let word = |o: usize| u64::from_le_bytes(raw[o..o + 8].try_into().expect("8 bytes"));
    let pdptrs = [0, 1, 2, 3].map(|i| word(SREGS_COMMON + 8 + 8 * i));
    (s, word(SREGS_COMMON), pdptrs)
}

/// One vCPU of a VM.
pub struct Vcpu {
    pub id: u32,
    /// The VM owns its vCPUs; a vCPU file keeps the VM alive through its fd entry.
    vm: Weak<Vm>,
    state: Mutex<VcpuState>,
    /// The mmap area (kvm_run at offset 0), shared with userspace through `memfd`.
    run: SharedMapping,
    memfd: OwnedFd,
    /// KVM's per-vCPU counters (KVM_GET_STATS_FD).
    pub stats: crate::stats::StatsFile,
    /// The dirty ring, when the VM enabled KVM_CAP_DIRTY_LOG_RING before this vCPU.
    pub dirty_ring: Option<crate::dirty_ring::DirtyRing>,
    /// The interpreter's state (decode cache, reads awaiting userspace); held for
    /// the whole of KVM_RUN, as KVM holds vcpu->mutex.
    emu: Mutex<emulate::EmuState>,
    /// Set by [`Vcpu::kick`]: the run loop returns EINTR at its next batch boundary.
    kick: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Vcpu({})", self.id)
    }
}

impl Vcpu {
    /// Create the vCPU and its mmap area, backed by a memfd that userspace can map.
    pub fn new(vm: Weak<Vm>, id: u32) -> Result<Arc<Vcpu>> {
        Self::new_with_ring(vm, id, 0)
    }

    /// A vCPU whose mmap area also holds a dirty ring of `ring_size` bytes at page
    /// KVM_DIRTY_LOG_PAGE_OFFSET (none if 0).
    pub fn new_with_ring(vm: Weak<Vm>, id: u32, ring_size: u64) -> Result<Arc<Vcpu>> {
        let name = format!("kvmmmu-vcpu:{id}");
        let memfd = nix::sys::memfd::memfd_create(
            std::ffi::CString::new(name)
                .map_err(|_| Errno::EINVAL)?
                .as_c_str(),
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .map_err(Errno::from)?;
        let file_size = if ring_size == 0 {
            VCPU_MMAP_SIZE as u64
        } else {
            uapi::KVM_DIRTY_LOG_PAGE_OFFSET * uapi::PAGE_SIZE + ring_size
        };
        nix::unistd::ftruncate(&memfd, file_size as i64).map_err(Errno::from)?;
        let dirty_ring = (ring_size != 0)
            .then(|| crate::dirty_ring::DirtyRing::new(&memfd, ring_size))
            .transpose()?;
        let run = SharedMapping::new(memfd.as_fd(), VCPU_MMAP_SIZE)?;
        let stats = crate::stats::StatsFile::new(
            &format!("kvm-vcpu-stats:{id}"),
            &format!("kvm-{}/vcpu-{id}", std::process::id()),
            crate::stats::VCPU_STATS,
        )?;
        Ok(Arc::new(Vcpu {
            id,
            vm,
            state: Mutex::new(VcpuState::reset(id == 0)),
            run,
            memfd,
            stats,
            dirty_ring,
            emu: Mutex::new(emulate::EmuState::default()),
            kick: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// The VM, while it exists (it does as long as any of its files is open).
    pub fn vm(&self) -> Option<Arc<Vm>> {
        self.vm.upgrade()
    }

    /// The memfd behind the mmap area (the vCPU "file").
    pub fn memfd(&self) -> &OwnedFd {
        &self.memfd
    }

    pub fn run_area(&self) -> &SharedMapping {
        &self.run
    }

    pub fn state(&self) -> MutexGuard<'_, VcpuState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get_regs(&self) -> kvm_regs {
        self.state().regs
    }

    pub fn set_regs(&self, regs: &kvm_regs) -> Result<()> {
        let mut st = self.state();
        sregs::apply_regs(&mut st.regs, regs);
        Ok(())
    }

    pub fn get_sregs(&self) -> kvm_sregs {
        self.state().sregs
    }

    pub fn set_sregs(&self, new: &kvm_sregs) -> Result<()> {
        let mut st = self.state();
        let features = st.features;
        let old = st.sregs;
        sregs::set_sregs(&features, &mut st.sregs, new)?;
        mp_state::after_set_sregs(&mut st);
        self.reload_pdptrs_if_pae(&mut st);
        st.mmu.reset_pending |= sregs::mmu_reset_needed(&old, &st.sregs);
        Ok(())
    }

    /// KVM_SET_SREGS2 (__set_sregs2): unknown flags or PDPTRS_VALID outside PAE paging are
    /// EINVAL; with PDPTRS_VALID the given PDPTEs are used instead of a load from CR3; the
    /// pending interrupt is left alone (there is no interrupt_bitmap).
    fn set_sregs2(&self, raw: &[u8; SREGS2_SIZE]) -> Result<()> {
        let (new, flags, pdptrs) = sregs2_parts(raw);
        if flags & !sregs::SREGS2_FLAGS_PDPTRS_VALID != 0 {
            return Err(Errno::EINVAL);
        }
        let valid_pdptrs = flags & sregs::SREGS2_FLAGS_PDPTRS_VALID != 0;
        if valid_pdptrs && !sregs::is_pae_paging(&new) {
            return Err(Errno::EINVAL);
        }
        let mut st = self.state();
        let features = st.features;
        let old = st.sregs;
        sregs::set_sregs(&features, &mut st.sregs, &new)?;
        mp_state::after_set_sregs(&mut st);
        st.mmu.reset_pending |= sregs::mmu_reset_needed(&old, &st.sregs);
        if valid_pdptrs {
            st.pdptrs = pdptrs;
        } else {
            self.reload_pdptrs_if_pae(&mut st);
        }
        Ok(())
    }

    /// vCPU ioctl dispatch (kvm_vcpu_ioctl + kvm_arch_vcpu_ioctl).
    pub fn ioctl(&self, request: u64, arg: u64, ua: &mut dyn UserAccess) -> Result<i64> {
        match request {
            uapi::KVM_GET_REGS => {
                let regs = self.get_regs();
                write_struct(ua, arg, &regs)?;
                Ok(0)
            }
            uapi::KVM_SET_REGS => {
                let regs: kvm_regs = read_struct(ua, arg)?;
                self.set_regs(&regs)?;
                Ok(0)
            }
            uapi::KVM_GET_SREGS => {
                let s = self.get_sregs();
                write_struct(ua, arg, &s)?;
                Ok(0)
            }
            uapi::KVM_SET_SREGS => {
                let s: kvm_sregs = read_struct(ua, arg)?;
                self.set_sregs(&s)?;
                Ok(0)
            }
            uapi::KVM_GET_SREGS2 => {
                let st = self.state();
                let pae = sregs::is_pae_paging(&st.sregs);
                let out = sregs2_bytes(&st.sregs, pae, &st.pdptrs);
                drop(st);
                ua.copy_to_user(arg, &out)?;
                Ok(0)
            }
            uapi::KVM_SET_SREGS2 => {
                let mut raw = [0u8; SREGS2_SIZE];
                ua.copy_from_user(arg, &mut raw)?;
                self.set_sregs2(&raw)?;
                Ok(0)
            }
            uapi::KVM_ENABLE_CAP => {
                // kvm_vcpu_ioctl_enable_cap: only Hyper-V capabilities exist per vCPU on
                // x86, and the simulator has none. The argument is still read first.
                let _cap: uapi::kvm_enable_cap = read_struct(ua, arg)?;
                Err(Errno::EINVAL)
            }
            _ => run::ioctl(self, request, arg, ua)
                .or_else(|| events::ioctl(self, request, arg, ua))
                .or_else(|| mmu::ioctl(self, request, arg, ua))
                .or_else(|| debugregs::ioctl(self, request, arg, ua))
                .or_else(|| mp_state::ioctl(self, request, arg, ua))
                .or_else(|| msr::ioctl(self, request, arg, ua))
                .or_else(|| crate::cpuid::vcpu_ioctl(self, request, arg, ua))
                // kvm_arch_vcpu_ioctl's default.
                .unwrap_or(Err(Errno::EINVAL)),
        }
    }
}
