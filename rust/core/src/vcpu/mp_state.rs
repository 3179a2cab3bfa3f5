//! KVM_GET/SET_MP_STATE (api.txt 4.37, 4.38), and the local APIC's INIT/SIPI events that
//! KVM processes when it reports the state.
//!
//! # Sources
//!
//! * The device: `tools/probe_state.py`, results in `docs/device-state.md` (kernel
//!   `6.18.44`, KVM with the PVM vendor module).
//! * The kernel (facts only, no code): `arch/x86/kvm/x86.c` `kvm_arch_vcpu_ioctl_get_mpstate`,
//!   `kvm_arch_vcpu_ioctl_set_mpstate`, `kvm_arch_vcpu_create`, `kvm_vcpu_reset`,
//!   `kvm_vcpu_deliver_sipi_vector`, `kvm_vcpu_is_bsp`, `__set_sregs_common`;
//!   `arch/x86/kvm/lapic.c` `kvm_apic_accept_events`.
//!
//! # The rules
//!
//! * SET: RUNNABLE is always accepted. UNINITIALIZED, INIT_RECEIVED, HALTED, SIPI_RECEIVED and
//!   AP_RESET_HOLD need an in-kernel irqchip (KVM_CREATE_IRQCHIP), else `EINVAL`. Every other
//!   value (STOPPED, CHECK_STOP, OPERATING, LOAD, SUSPENDED, 11 and up) is `EINVAL`.
//! * SIPI_RECEIVED is obsolete inside KVM: SET stores INIT_RECEIVED and pends a SIPI in the local
//!   APIC. The next GET (or KVM_RUN) accepts the SIPI: CS.selector = vector << 8, CS.base =
//!   vector << 12, RIP = 0, state RUNNABLE. So SIPI_RECEIVED reads back RUNNABLE **on KVM on
//!   hardware too**: this is upstream KVM behaviour, not a PVM artifact. The vector is the one
//!   last given with KVM_SET_VCPU_EVENTS + KVM_VCPUEVENT_VALID_SIPI_VECTOR (0 by default), cut
//!   to 8 bits.
//! * GET first accepts pending APIC events (irqchip only): a latched INIT (KVM_SET_VCPU_EVENTS
//!   with KVM_VCPUEVENT_VALID_SMM and `smi.latched_init`) resets the vCPU as INIT does (see
//!   [`init_reset`]) and leaves the BSP (apic_base.BSP set) RUNNABLE and an AP INIT_RECEIVED; then
//!   a pending SIPI is delivered if the vCPU is in INIT_RECEIVED, and dropped otherwise.
//! * Initial state: RUNNABLE, except UNINITIALIZED for a vCPU other than the reset BSP (id 0)
//!   when the VM has an irqchip (device: vCPU 1 is UNINITIALIZED with an irqchip, RUNNABLE
//!   without).
//! * KVM_SET_SREGS puts the BSP back to RUNNABLE when the new state is the reset state's
//!   entry point (RIP 0xfff0, CS 0xf000/0xffff0000, CR0.PE clear): [`after_set_sregs`], which
//!   `Vcpu::set_sregs` (and SET_SREGS2) must call after a successful set; until it does, that
//!   one probed case differs from the device.
//! * KVM_RUN must call [`accept_events`] first and not run a vCPU in UNINITIALIZED or
//!   INIT_RECEIVED (KVM waits; HALTED waits for an event).
//!
//! The device and the simulator agree on every other probed case.

use kvm_bindings::{
    kvm_mp_state, KVM_MP_STATE_AP_RESET_HOLD, KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED,
    KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_SIPI_RECEIVED, KVM_MP_STATE_UNINITIALIZED,
};

use crate::errno::{Errno, Result};
use crate::uaccess::{read_struct, write_struct, UserAccess};
use crate::uapi;

use super::debugregs::DebugRegs;
use super::events::VmFacts;
use super::sregs::{self, APIC_BASE_BSP, CR0_CD, CR0_ET, CR0_NW, CR0_PE};
use super::{Vcpu, VcpuState};

pub const RUNNABLE: u32 = KVM_MP_STATE_RUNNABLE;
pub const UNINITIALIZED: u32 = KVM_MP_STATE_UNINITIALIZED;
pub const INIT_RECEIVED: u32 = KVM_MP_STATE_INIT_RECEIVED;
pub const HALTED: u32 = KVM_MP_STATE_HALTED;
pub const SIPI_RECEIVED: u32 = KVM_MP_STATE_SIPI_RECEIVED;
pub const AP_RESET_HOLD: u32 = KVM_MP_STATE_AP_RESET_HOLD;

/// The multiprocessing state and the local APIC's INIT/SIPI latch of one vCPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MpState {
    /// kvm_vcpu_is_reset_bsp: the vCPU id is the boot CPU id (0).
    reset_bsp: bool,
    /// None until first set: the initial state, which depends on the VM's irqchip (fixed
    /// before any vCPU exists), so it is resolved on read by [`MpState::current`].
    state: Option<u32>,
    /// KVM_APIC_INIT in the APIC's pending events: a latched INIT.
    pub init_pending: bool,
    /// KVM_APIC_SIPI in the APIC's pending events.
    pub sipi_pending: bool,
    /// The APIC's SIPI vector (KVM_VCPUEVENT_VALID_SIPI_VECTOR stores all 32 bits).
    pub sipi_vector: u32,
}

impl MpState {
    /// The state of a new vCPU (KVM_CREATE_VCPU); `reset_bsp` is true for vCPU id 0.
    pub fn reset(reset_bsp: bool) -> Self {
        MpState {
            reset_bsp,
            state: None,
            init_pending: false,
            sipi_pending: false,
            sipi_vector: 0,
        }
    }

    /// The stored state (no event processing): kvm_arch_vcpu_create's initial value until set.
    pub fn current(&self, irqchip: bool) -> u32 {
        self.state.unwrap_or(if irqchip && !self.reset_bsp {
            UNINITIALIZED
        } else {
            RUNNABLE
        })
    }

    /// kvm_set_mp_state.
    pub fn set_state(&mut self, state: u32) {
        self.state = Some(state);
    }
}

/// kvm_vcpu_is_bsp: the BSP flag of apic_base (not the vCPU id).
pub fn is_bsp(st: &VcpuState) -> bool {
    st.sregs.apic_base & APIC_BASE_BSP != 0
}

/// The validity check of KVM_SET_MP_STATE (EINVAL).
pub fn check_set(mp_state: u32, irqchip: bool) -> Result<()> {
    match mp_state {
        RUNNABLE => Ok(()),
        UNINITIALIZED | HALTED | AP_RESET_HOLD | INIT_RECEIVED | SIPI_RECEIVED if irqchip => Ok(()),
        _ => Err(Errno::EINVAL),
    }
}

/// KVM_SET_MP_STATE on `st`: SIPI_RECEIVED becomes INIT_RECEIVED with a pending SIPI.
pub fn set_mp_state(st: &mut VcpuState, mp_state: u32, irqchip: bool) -> Result<()> {
    check_set(mp_state, irqchip)?;
    if mp_state == SIPI_RECEIVED {
        st.mp.set_state(INIT_RECEIVED);
        st.mp.sipi_pending = true;
    } else {
        st.mp.set_state(mp_state);
    }
    Ok(())
}

/// KVM_GET_MP_STATE on `st`: accept pending APIC events, then report the state.
pub fn get_mp_state(st: &mut VcpuState, irqchip: bool) -> u32 {
    accept_events(st, irqchip);
    st.mp.current(irqchip)
}

/// kvm_apic_accept_events: process a latched INIT, then a pending SIPI. Only an in-kernel
/// APIC has events. Neither SMM nor nesting exists here, so INIT and SIPI are never blocked.
/// KVM_RUN does this too before it runs the vCPU.
pub fn accept_events(st: &mut VcpuState, irqchip: bool) {
    if !irqchip || !(st.mp.init_pending || st.mp.sipi_pending) {
        return;
    }
    if st.mp.init_pending {
        st.mp.init_pending = false;
        init_reset(st);
        let next = if is_bsp(st) { RUNNABLE } else { INIT_RECEIVED };
        st.mp.set_state(next);
    }
    if st.mp.sipi_pending {
        st.mp.sipi_pending = false;
        if st.mp.current(irqchip) == INIT_RECEIVED {
            deliver_sipi(st, st.mp.sipi_vector as u8);
            st.mp.set_state(RUNNABLE);
        }
    }
}

/// kvm_vcpu_deliver_sipi_vector: start at vector:0000 in real mode.
pub fn deliver_sipi(st: &mut VcpuState, vector: u8) {
    st.sregs.cs.selector = u16::from(vector) << 8;
    st.sregs.cs.base = u64::from(vector) << 12;
    st.regs.rip = 0;
}

/// kvm_vcpu_reset(init_event = true) on the modelled state, as the device shows it: general
/// registers, segments, descriptor tables, CR2/CR3/CR4/CR8/EFER and the debug registers take
/// their reset values; CR0 becomes ET plus the old CD and NW; apic_base is kept; the event
/// queues are cleared (see `EventsState::init_reset`). The CPUID table (features) is kept, and
/// RDX is CPUID.1.EAX from it (0x600 when the table has no leaf 1, as at creation).
pub fn init_reset(st: &mut VcpuState) {
    let old_cr0 = st.sregs.cr0;
    let apic_base = st.sregs.apic_base;
    st.regs = sregs::reset_regs();
    if let Some(leaf1) = crate::cpuid::find(&st.cpuid, 1).map(|i| &st.cpuid[i]) {
        st.regs.rdx = u64::from(leaf1.eax);
    }
    st.sregs = sregs::reset_sregs_for(apic_base & APIC_BASE_BSP != 0);
    st.sregs.apic_base = apic_base;
    st.sregs.cr0 = CR0_ET | (old_cr0 & (CR0_CD | CR0_NW));
    st.debugregs = DebugRegs::default();
    st.events.init_reset();
}

/// `__set_sregs_common`'s "older userspace won't unhalt the vcpu on reset": after a successful
/// KVM_SET_SREGS/SREGS2, a BSP whose RIP is 0xfff0 with CS 0xf000 / base 0xffff0000 and CR0.PE
/// clear becomes RUNNABLE. Call it with the state after the set.
pub fn after_set_sregs(st: &mut VcpuState) {
    if is_bsp(st)
        && st.regs.rip == 0xfff0
        && st.sregs.cs.selector == 0xf000
        && st.sregs.cs.base == 0xffff_0000
        && st.sregs.cr0 & CR0_PE == 0
    {
        st.mp.set_state(RUNNABLE);
    }
}

/// vCPU ioctls of this module; None if `request` is not one of them.
pub fn ioctl(vcpu: &Vcpu, request: u64, arg: u64, ua: &mut dyn UserAccess) -> Option<Result<i64>> {
    match request {
        uapi::KVM_GET_MP_STATE => Some(get_ioctl(vcpu, arg, ua)),
        uapi::KVM_SET_MP_STATE => Some(set_ioctl(vcpu, arg, ua)),
        _ => None,
    }
}

fn get_ioctl(vcpu: &Vcpu, arg: u64, ua: &mut dyn UserAccess) -> Result<i64> {
    let vm = VmFacts::of(vcpu);
    let mp_state = get_mp_state(&mut vcpu.state(), vm.irqchip);
    write_struct(ua, arg, &kvm_mp_state { mp_state })?;
    Ok(0)
}

fn set_ioctl(vcpu: &Vcpu, arg: u64, ua: &mut dyn UserAccess) -> Result<i64> {
    let m: kvm_mp_state = read_struct(ua, arg)?;
    let vm = VmFacts::of(vcpu);
    set_mp_state(&mut vcpu.state(), m.mp_state, vm.irqchip)?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{
        KVM_MP_STATE_CHECK_STOP, KVM_MP_STATE_LOAD, KVM_MP_STATE_OPERATING, KVM_MP_STATE_STOPPED,
        KVM_MP_STATE_SUSPENDED,
    };

    fn fresh(id: u32) -> VcpuState {
        VcpuState::reset(id == 0)
    }

    #[test]
    fn initial_state() {
        // Device: vCPU 0 RUNNABLE with and without irqchip; vCPU 1 UNINITIALIZED with an
        // irqchip, RUNNABLE without.
        assert_eq!(get_mp_state(&mut fresh(0), false), RUNNABLE);
        assert_eq!(get_mp_state(&mut fresh(0), true), RUNNABLE);
        assert_eq!(get_mp_state(&mut fresh(1), false), RUNNABLE);
        assert_eq!(get_mp_state(&mut fresh(1), true), UNINITIALIZED);
    }

    #[test]
    fn without_irqchip_only_runnable() {
        for s in 0..=12u32 {
            let mut st = fresh(0);
            let want = if s == RUNNABLE {
                Ok(())
            } else {
                Err(Errno::EINVAL)
            };
            assert_eq!(set_mp_state(&mut st, s, false), want, "state {s}");
            assert_eq!(get_mp_state(&mut st, false), RUNNABLE);
        }
    }

    #[test]
    fn with_irqchip_accepted_and_read_back() {
        for s in [
            RUNNABLE,
            UNINITIALIZED,
            INIT_RECEIVED,
            HALTED,
            AP_RESET_HOLD,
        ] {
            for id in [0, 1] {
                let mut st = fresh(id);
                set_mp_state(&mut st, s, true).unwrap();
                assert_eq!(get_mp_state(&mut st, true), s, "state {s} vCPU {id}");
            }
        }
    }

    #[test]
    fn with_irqchip_rejected() {
        for s in [
            KVM_MP_STATE_STOPPED,
            KVM_MP_STATE_CHECK_STOP,
            KVM_MP_STATE_OPERATING,
            KVM_MP_STATE_LOAD,
            KVM_MP_STATE_SUSPENDED,
            11,
            0xffff_ffff,
            1 << 31,
        ] {
            let mut st = fresh(1);
            assert_eq!(set_mp_state(&mut st, s, true), Err(Errno::EINVAL), "{s}");
            // Device: a failed set leaves vCPU 1 UNINITIALIZED.
            assert_eq!(get_mp_state(&mut st, true), UNINITIALIZED);
        }
    }

    #[test]
    fn sipi_received_reads_back_runnable_and_jumps() {
        // Device: vCPU 1, vector 0x12: GET gives RUNNABLE, CS 0x1200/0x12000, RIP 0.
        let mut st = fresh(1);
        st.mp.sipi_vector = 0x12;
        set_mp_state(&mut st, SIPI_RECEIVED, true).unwrap();
        // Nothing happens before the GET.
        assert_eq!((st.sregs.cs.selector, st.regs.rip), (0xf000, 0xfff0));
        assert_eq!(get_mp_state(&mut st, true), RUNNABLE);
        assert_eq!(
            (st.sregs.cs.selector, st.sregs.cs.base, st.sregs.cs.limit),
            (0x1200, 0x12000, 0xffff)
        );
        assert_eq!(st.regs.rip, 0);
    }

    #[test]
    fn sipi_vector_is_cut_to_8_bits() {
        // Device: sipi_vector 0x1ab -> CS 0xab00.
        let mut st = fresh(1);
        st.mp.sipi_vector = 0x1ab;
        set_mp_state(&mut st, SIPI_RECEIVED, true).unwrap();
        assert_eq!(get_mp_state(&mut st, true), RUNNABLE);
        assert_eq!((st.sregs.cs.selector, st.sregs.cs.base), (0xab00, 0xab000));
    }

    #[test]
    fn latched_init_on_bsp_and_ap() {
        // Device: INIT resets the vCPU; the BSP ends RUNNABLE, an AP INIT_RECEIVED.
        for (id, want) in [(0, RUNNABLE), (1, INIT_RECEIVED)] {
            let mut st = fresh(id);
            st.sregs.cr0 = 0x6000_0011;
            st.sregs.cr2 = 0x1234;
            st.sregs.cr3 = 0x5000;
            st.sregs.cr4 = 0x20;
            st.sregs.cr8 = 5;
            st.sregs.efer = 0x800;
            st.sregs.cs.selector = 8;
            st.regs.rax = 0x55;
            st.regs.rip = 0x1000;
            st.debugregs.db[0] = 1;
            st.mp.init_pending = true;
            assert_eq!(get_mp_state(&mut st, true), want, "vCPU {id}");
            let mut expect = sregs::reset_sregs_for(id == 0);
            expect.cr0 = 0x6000_0010;
            assert_eq!(st.sregs, expect);
            assert_eq!(st.regs, sregs::reset_regs());
            assert_eq!(st.debugregs, DebugRegs::default());
            assert!(!st.mp.init_pending);
        }
    }

    #[test]
    fn init_rdx_from_cpuid() {
        // Device: after KVM_SET_CPUID2 (leaf 1 EAX 0xa0671) RDX stays 0x600 until an INIT,
        // which loads 0xa0671.
        let mut st = fresh(1);
        st.cpuid.push(kvm_bindings::kvm_cpuid_entry2 {
            function: 1,
            eax: 0xa0671,
            ..Default::default()
        });
        assert_eq!(st.regs.rdx, 0x600);
        st.mp.init_pending = true;
        assert_eq!(get_mp_state(&mut st, true), INIT_RECEIVED);
        assert_eq!(st.regs.rdx, 0xa0671);
    }

    #[test]
    fn init_keeps_apic_base_and_uses_its_bsp_bit() {
        // Device: vCPU 0 with apic_base.BSP cleared goes to INIT_RECEIVED.
        let mut st = fresh(0);
        st.sregs.apic_base = 0xfee0_0800;
        st.mp.init_pending = true;
        assert_eq!(get_mp_state(&mut st, true), INIT_RECEIVED);
        assert_eq!(st.sregs.apic_base, 0xfee0_0800);
    }

    #[test]
    fn init_then_sipi() {
        // Device: SIPI pending (SIPI_RECEIVED) plus latched INIT: an AP is reset and then
        // started at the vector; the BSP is reset and the SIPI dropped.
        let mut ap = fresh(1);
        ap.mp.sipi_vector = 0x20;
        set_mp_state(&mut ap, SIPI_RECEIVED, true).unwrap();
        ap.mp.init_pending = true;
        assert_eq!(get_mp_state(&mut ap, true), RUNNABLE);
        assert_eq!(
            (ap.sregs.cs.selector, ap.sregs.cs.base, ap.regs.rip),
            (0x2000, 0x20000, 0)
        );
        let mut bsp = fresh(0);
        bsp.mp.sipi_vector = 0x20;
        set_mp_state(&mut bsp, SIPI_RECEIVED, true).unwrap();
        bsp.mp.init_pending = true;
        assert_eq!(get_mp_state(&mut bsp, true), RUNNABLE);
        assert_eq!((bsp.sregs.cs.selector, bsp.regs.rip), (0xf000, 0xfff0));
        assert!(!bsp.mp.sipi_pending);
    }

    #[test]
    fn sipi_dropped_outside_wait_for_sipi() {
        // RUNNABLE set after SIPI_RECEIVED: the SIPI is dropped at the GET.
        let mut st = fresh(1);
        st.mp.sipi_vector = 0x30;
        set_mp_state(&mut st, SIPI_RECEIVED, true).unwrap();
        set_mp_state(&mut st, HALTED, true).unwrap();
        assert_eq!(get_mp_state(&mut st, true), HALTED);
        assert_eq!(st.sregs.cs.selector, 0xf000);
        assert!(!st.mp.sipi_pending);
    }

    #[test]
    fn no_events_without_irqchip() {
        let mut st = fresh(0);
        st.mp.init_pending = true;
        st.regs.rax = 1;
        assert_eq!(get_mp_state(&mut st, false), RUNNABLE);
        assert_eq!(st.regs.rax, 1);
    }

    #[test]
    fn set_sregs_unhalts_the_bsp_only() {
        // Device: HALTED, then SET_SREGS(GET_SREGS()) on the reset state: vCPU 0 RUNNABLE,
        // vCPU 1 stays HALTED.
        for (id, want) in [(0, RUNNABLE), (1, HALTED)] {
            let mut st = fresh(id);
            set_mp_state(&mut st, HALTED, true).unwrap();
            after_set_sregs(&mut st);
            assert_eq!(get_mp_state(&mut st, true), want);
        }
        let mut st = fresh(0);
        set_mp_state(&mut st, HALTED, true).unwrap();
        st.sregs.cr0 |= CR0_PE;
        after_set_sregs(&mut st);
        assert_eq!(get_mp_state(&mut st, true), HALTED);
    }
}
