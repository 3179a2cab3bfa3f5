//! KVM_GET/SET_VCPU_EVENTS (api.txt 4.29, 4.30): pending and injected exception,
//! interrupt (with its shadow), NMI, SIPI vector, SMM/latched INIT and triple fault.
//!
//! # Sources
//!
//! * The device: `tools/probe_state.py`, results in `docs/device-state.md` (kernel `6.18.44`,
//!   KVM with the PVM vendor module).
//! * The kernel (facts only, no code): `arch/x86/kvm/x86.c` `kvm_vcpu_ioctl_x86_get_vcpu_events`,
//!   `kvm_vcpu_ioctl_x86_set_vcpu_events`, `process_nmi`, `kvm_deliver_exception_payload`,
//!   `kvm_exception_is_soft`, `__get_sregs`, `__set_sregs`, `kvm_vcpu_reset`.
//!
//! # SET: the checks, in the kernel's order (all `EINVAL`)
//!
//! 1. A flag outside NMI_PENDING (1), SIPI_VECTOR (2), SHADOW (4), SMM (8), PAYLOAD (0x10),
//!    TRIPLE_FAULT (0x20).
//! 2. PAYLOAD without KVM_CAP_EXCEPTION_PAYLOAD enabled on the VM.
//! 3. An injected or pending exception with `nr` > 31 or `nr` == 2 (NMI). Before this check,
//!    without PAYLOAD `exception.pending` and `exception_has_payload` are forced to 0 (so a
//!    pending exception is accepted and dropped, whatever its `nr`); with PAYLOAD, a pending
//!    exception clears `injected`, and a non-pending one clears `exception_has_payload`.
//!
//! Nothing has changed when these fail. Then the state is written (exception; interrupt
//! injected/nr/soft; the shadow only with SHADOW; NMI injected; NMI pending only with
//! NMI_PENDING; NMI masked; the SIPI vector only with SIPI_VECTOR and an irqchip), and only
//! then come two more checks, so a failing SET **has already applied all of that**:
//!
//! 4. SMM with `smi.smm`, `smi.pending` or `smi.smm_inside_nmi` non-zero: KVM here has no SMM.
//!    With SMM and an irqchip, `smi.latched_init` latches (or clears) an INIT.
//! 5. TRIPLE_FAULT without KVM_CAP_X86_TRIPLE_FAULT_EVENT enabled (after the INIT latch).
//!
//! # GET
//!
//! * flags = NMI_PENDING | SHADOW | SMM (0xd), plus PAYLOAD and TRIPLE_FAULT when their
//!   capabilities are enabled. `sipi_vector`, `smi.smm/pending/smm_inside_nmi`, pads and
//!   `reserved` read 0; `interrupt.soft` reads 0.
//! * Booleans read back as 0/1 (`injected`, `pending`, `has_error_code`, `soft`, NMI `masked`).
//! * `exception.injected`/`pending` read 0 for #BP and #OF (soft exceptions). Without
//!   EXCEPTION_PAYLOAD a pending exception is also reported as injected, and if it has a
//!   payload, the payload is delivered first (CR2 for #PF, DR6 for #DB) and cleared. That only
//!   happens when the capability was turned off (`args[0]` = 0) after the exception was set.
//! * `exception.nr`, `error_code`, the payload and `interrupt.nr` read back whatever was set,
//!   even when nothing is injected.
//! * `interrupt.injected` is reported only for a non-soft interrupt.
//! * `interrupt.shadow` reads back the byte that was set (any value 0-255, see below).
//! * `nmi.pending` is limited when read (`process_nmi`, also run at the start of every SET): at
//!   most 2, or 1 while NMIs are masked or an NMI is injected.
//! * `smi.latched_init` is the latched INIT (irqchip only). `triple_fault.pending` is reported
//!   only while the capability is enabled.
//!
//! # One interrupt, two views
//!
//! The injected interrupt is one piece of state seen by KVM_GET/SET_VCPU_EVENTS
//! (`interrupt.injected/nr/soft`) and by KVM_GET/SET_SREGS (`interrupt_bitmap`): the bitmap
//! shows bit `nr` when a non-soft interrupt is injected; SET_SREGS with a non-empty bitmap
//! injects its lowest vector as a non-soft interrupt, and an empty bitmap changes nothing. In
//! [`VcpuState`] it lives in `events.interrupt` and in `sregs.interrupt_bitmap`, which
//! [`set_interrupt`] keeps equal and [`sync_interrupt`] reconciles after SET_SREGS (or after
//! a runner cleared the bitmap on delivery); see [`queued_interrupt`].
//!
//! # Difference from KVM on hardware (the device is followed)
//!
//! `interrupt.shadow` is stored as the raw byte by the device's vendor module (PVM): 3, 4 and
//! 0xff read back as set. KVM on Intel keeps only MOV-SS (1) or else STI (2) (3 reads back 1,
//! 4 reads back 0); KVM on AMD has one shadow bit (any non-zero value reads back 3). Since the
//! two hardware vendors disagree and the device agrees with Intel on the meaningful values
//! 0, 1 and 2, the simulator stores the byte like the device.

use crate::errno::{Errno, Result};
use crate::uaccess::{read_struct, write_struct, UserAccess};
use crate::uapi::{self, kvm_vcpu_events};
use crate::vm::VmCaps;

use super::debugregs;
use super::{Vcpu, VcpuState};

pub const VALID_NMI_PENDING: u32 = kvm_bindings::KVM_VCPUEVENT_VALID_NMI_PENDING;
pub const VALID_SIPI_VECTOR: u32 = kvm_bindings::KVM_VCPUEVENT_VALID_SIPI_VECTOR;
pub const VALID_SHADOW: u32 = kvm_bindings::KVM_VCPUEVENT_VALID_SHADOW;
pub const VALID_SMM: u32 = kvm_bindings::KVM_VCPUEVENT_VALID_SMM;
pub const VALID_PAYLOAD: u32 = kvm_bindings::KVM_VCPUEVENT_VALID_PAYLOAD;
pub const VALID_TRIPLE_FAULT: u32 = kvm_bindings::KVM_VCPUEVENT_VALID_TRIPLE_FAULT;
/// Every flag SET accepts.
pub const VALID_FLAGS: u32 = VALID_NMI_PENDING
    | VALID_SIPI_VECTOR
    | VALID_SHADOW
    | VALID_SMM
    | VALID_PAYLOAD
    | VALID_TRIPLE_FAULT;
/// The flags GET always reports.
pub const GET_FLAGS: u32 = VALID_NMI_PENDING | VALID_SHADOW | VALID_SMM;

pub const DB_VECTOR: u8 = 1;
pub const NMI_VECTOR: u8 = 2;
pub const BP_VECTOR: u8 = 3;
pub const OF_VECTOR: u8 = 4;
pub const PF_VECTOR: u8 = 14;

/// An exception queued for the guest (kvm_queued_exception).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueuedException {
    /// Injected: delivery already started (re-injected on the next entry).
    pub injected: bool,
    /// Pending: not yet delivered; only with KVM_CAP_EXCEPTION_PAYLOAD from userspace.
    pub pending: bool,
    pub nr: u8,
    pub has_error_code: bool,
    pub error_code: u32,
    pub has_payload: bool,
    /// CR2 for #PF, DR6 bits for #DB: applied when the exception is delivered.
    pub payload: u64,
}

/// The injected external or soft interrupt (vcpu->arch.interrupt).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueuedInterrupt {
    pub injected: bool,
    pub nr: u8,
    /// A software interrupt (INT n): not visible to GET_VCPU_EVENTS or GET_SREGS.
    pub soft: bool,
}

/// The event state of one vCPU.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventsState {
    pub exception: QueuedException,
    /// With `sregs.interrupt_bitmap`: read it through [`queued_interrupt`].
    pub interrupt: QueuedInterrupt,
    /// KVM_X86_SHADOW_INT_MOV_SS (1) / KVM_X86_SHADOW_INT_STI (2), stored as the device does.
    pub interrupt_shadow: u8,
    pub nmi_injected: bool,
    /// NMIs pending after the last `process_nmi`.
    pub nmi_pending: u32,
    /// NMIs queued since (vcpu->arch.nmi_queued); folded in by [`process_nmi`].
    pub nmi_queued: u32,
    pub nmi_masked: bool,
    /// KVM_REQ_TRIPLE_FAULT.
    pub triple_fault_pending: bool,
}

impl EventsState {
    /// What INIT clears (kvm_vcpu_reset with init_event, and the vendor reset): the NMI state,
    /// the injected/pending flags of the exception and interrupt queues (their vectors, error
    /// code and payload stay), the interrupt shadow and the NMI mask. The caller clears the
    /// interrupt bitmap (INIT resets the sregs).
    pub fn init_reset(&mut self) {
        self.exception.injected = false;
        self.exception.pending = false;
        self.interrupt.injected = false;
        self.interrupt_shadow = 0;
        self.nmi_injected = false;
        self.nmi_pending = 0;
        self.nmi_queued = 0;
        self.nmi_masked = false;
    }
}

/// What the VM contributes to these ioctls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmFacts {
    /// KVM_CREATE_IRQCHIP ran: the vCPU has an in-kernel local APIC.
    pub irqchip: bool,
    pub caps: VmCaps,
}

impl VmFacts {
    /// Read from the VM (its lock is taken and released here, before the vCPU's).
    pub fn of(vcpu: &Vcpu) -> VmFacts {
        vcpu.vm().map_or_else(VmFacts::default, |vm| {
            let st = vm.state();
            VmFacts {
                irqchip: st.irqchip,
                caps: st.caps,
            }
        })
    }
}

// ------------------------------------------------------------------------- interrupt

/// The bitmap GET_SREGS shows for `q`: bit `nr` for an injected non-soft interrupt.
pub fn interrupt_bitmap_of(q: &QueuedInterrupt) -> [u64; 4] {
    let mut bm = [0u64; 4];
    if q.injected && !q.soft {
        bm[usize::from(q.nr) / 64] = 1 << (q.nr % 64);
    }
    bm
}

/// The injected interrupt, from both views: a bit in the bitmap that `events.interrupt` does
/// not explain was put there by SET_SREGS (the lowest one is injected, non-soft); an empty
/// bitmap under an injected non-soft interrupt means it was delivered (nr stays).
pub fn queued_interrupt(st: &VcpuState) -> QueuedInterrupt {
    let q = st.events.interrupt;
    let bm = st.sregs.interrupt_bitmap;
    if bm == interrupt_bitmap_of(&q) {
        return q;
    }
    match super::sregs::first_pending_vector(&bm) {
        Some(v) => QueuedInterrupt {
            injected: true,
            nr: v as u8,
            soft: false,
        },
        None => QueuedInterrupt {
            injected: false,
            ..q
        },
    }
}

/// Make `events.interrupt` and `sregs.interrupt_bitmap` agree again (see [`queued_interrupt`]).
pub fn sync_interrupt(st: &mut VcpuState) {
    let q = queued_interrupt(st);
    set_interrupt(st, q);
}

/// Set the injected interrupt in both views (kvm_queue_interrupt / SET_VCPU_EVENTS).
pub fn set_interrupt(st: &mut VcpuState, q: QueuedInterrupt) {
    st.events.interrupt = q;
    st.sregs.interrupt_bitmap = interrupt_bitmap_of(&q);
}

// ------------------------------------------------------------------------------- NMI

/// process_nmi: fold the queued NMIs into the pending count, at most 2, or 1 while NMIs are
/// masked or one is being injected.
pub fn process_nmi(ev: &mut EventsState) {
    let limit = if ev.nmi_masked || ev.nmi_injected {
        1
    } else {
        2
    };
    ev.nmi_pending = ev
        .nmi_pending
        .saturating_add(std::mem::take(&mut ev.nmi_queued))
        .min(limit);
}

// ------------------------------------------------------------------------- GET / SET

/// kvm_exception_is_soft: #BP and #OF, whose injection needs an instruction length.
pub fn exception_is_soft(nr: u8) -> bool {
    nr == BP_VECTOR || nr == OF_VECTOR
}

/// kvm_deliver_exception_payload on a pending exception: CR2 for #PF, DR6 for #DB.
fn deliver_payload(st: &mut VcpuState) {
    let ex = &mut st.events.exception;
    if !ex.has_payload {
        return;
    }
    match ex.nr {
        PF_VECTOR => st.sregs.cr2 = ex.payload,
        DB_VECTOR => {
            st.debugregs.dr6 = debugregs::apply_db_payload(st.debugregs.dr6, ex.payload);
        }
        _ => {}
    }
    ex.has_payload = false;
    ex.payload = 0;
}

/// KVM_GET_VCPU_EVENTS on `st` (it processes queued NMIs and may deliver a payload).
pub fn get_events(st: &mut VcpuState, vm: &VmFacts) -> kvm_vcpu_events {
    process_nmi(&mut st.events);
    sync_interrupt(st);
    let payload_cap = vm.caps.exception_payload;
    if !payload_cap && st.events.exception.pending && st.events.exception.has_payload {
        deliver_payload(st);
    }
    let ev = &st.events;
    let ex = ev.exception;
    let mut out = kvm_vcpu_events::default();
    if !exception_is_soft(ex.nr) {
        out.exception.injected = u8::from(ex.injected || (!payload_cap && ex.pending));
        out.exception.pending = u8::from(ex.pending);
    }
    out.exception.nr = ex.nr;
    out.exception.has_error_code = u8::from(ex.has_error_code);
    out.exception.error_code = ex.error_code;
    out.exception_has_payload = u8::from(ex.has_payload);
    out.exception_payload = ex.payload;

    out.interrupt.injected = u8::from(ev.interrupt.injected && !ev.interrupt.soft);
    out.interrupt.nr = ev.interrupt.nr;
    out.interrupt.shadow = ev.interrupt_shadow;

    out.nmi.injected = u8::from(ev.nmi_injected);
    out.nmi.pending = ev.nmi_pending as u8;
    out.nmi.masked = u8::from(ev.nmi_masked);

    out.smi.latched_init = u8::from(vm.irqchip && st.mp.init_pending);

    out.flags = GET_FLAGS;
    if payload_cap {
        out.flags |= VALID_PAYLOAD;
    }
    if vm.caps.triple_fault_event {
        out.triple_fault.pending = u8::from(ev.triple_fault_pending);
        out.flags |= VALID_TRIPLE_FAULT;
    }
    out
}

/// The checks SET_VCPU_EVENTS makes before changing anything (rules 1-3), with the exception
/// fields normalized as the kernel does.
pub fn check_set(new: &kvm_vcpu_events, vm: &VmFacts) -> Result<kvm_vcpu_events> {
    let mut ev = *new;
    if ev.flags & !VALID_FLAGS != 0 {
        return Err(Errno::EINVAL);
    }
    if ev.flags & VALID_PAYLOAD != 0 {
        if !vm.caps.exception_payload {
            return Err(Errno::EINVAL);
        }
        if ev.exception.pending != 0 {
            ev.exception.injected = 0;
        } else {
            ev.exception_has_payload = 0;
        }
    } else {
        ev.exception.pending = 0;
        ev.exception_has_payload = 0;
    }
    let ex = &ev.exception;
    if (ex.injected != 0 || ex.pending != 0) && (ex.nr > 31 || ex.nr == NMI_VECTOR) {
        return Err(Errno::EINVAL);
    }
    Ok(ev)
}

/// KVM_SET_VCPU_EVENTS on `st`. On an error from rules 1-3 nothing changed; on an SMM or
/// TRIPLE_FAULT error the exception, interrupt and NMI state are already written (as in KVM).
pub fn set_events(st: &mut VcpuState, vm: &VmFacts, new: &kvm_vcpu_events) -> Result<()> {
    let ev = check_set(new, vm)?;
    process_nmi(&mut st.events);

    st.events.exception = QueuedException {
        injected: ev.exception.injected != 0,
        pending: ev.exception.pending != 0,
        nr: ev.exception.nr,
        has_error_code: ev.exception.has_error_code != 0,
        error_code: ev.exception.error_code,
        has_payload: ev.exception_has_payload != 0,
        payload: ev.exception_payload,
    };
    set_interrupt(
        st,
        QueuedInterrupt {
            injected: ev.interrupt.injected != 0,
            nr: ev.interrupt.nr,
            soft: ev.interrupt.soft != 0,
        },
    );
    if ev.flags & VALID_SHADOW != 0 {
        st.events.interrupt_shadow = ev.interrupt.shadow;
    }
    st.events.nmi_injected = ev.nmi.injected != 0;
    if ev.flags & VALID_NMI_PENDING != 0 {
        st.events.nmi_pending = 0;
        st.events.nmi_queued = u32::from(ev.nmi.pending);
    }
    st.events.nmi_masked = ev.nmi.masked != 0;
    if ev.flags & VALID_SIPI_VECTOR != 0 && vm.irqchip {
        st.mp.sipi_vector = ev.sipi_vector;
    }
    if ev.flags & VALID_SMM != 0 {
        if ev.smi.smm != 0 || ev.smi.pending != 0 || ev.smi.smm_inside_nmi != 0 {
            return Err(Errno::EINVAL);
        }
        if vm.irqchip {
            st.mp.init_pending = ev.smi.latched_init != 0;
        }
    }
    if ev.flags & VALID_TRIPLE_FAULT != 0 {
        if !vm.caps.triple_fault_event {
            return Err(Errno::EINVAL);
        }
        st.events.triple_fault_pending = ev.triple_fault.pending != 0;
    }
    Ok(())
}

/// vCPU ioctls of this module; None if `request` is not one of them.
pub fn ioctl(vcpu: &Vcpu, request: u64, arg: u64, ua: &mut dyn UserAccess) -> Option<Result<i64>> {
    match request {
        uapi::KVM_GET_VCPU_EVENTS => Some(get_ioctl(vcpu, arg, ua)),
        uapi::KVM_SET_VCPU_EVENTS => Some(set_ioctl(vcpu, arg, ua)),
        _ => None,
    }
}

fn get_ioctl(vcpu: &Vcpu, arg: u64, ua: &mut dyn UserAccess) -> Result<i64> {
    let vm = VmFacts::of(vcpu);
    let ev = get_events(&mut vcpu.state(), &vm);
    write_struct(ua, arg, &ev)?;
    Ok(0)
}

fn set_ioctl(vcpu: &Vcpu, arg: u64, ua: &mut dyn UserAccess) -> Result<i64> {
    let ev: kvm_vcpu_events = read_struct(ua, arg)?;
    let vm = VmFacts::of(vcpu);
    set_events(&mut vcpu.state(), &vm, &ev)?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::super::mp_state;
    use super::*;

    const NO_CAPS: VmFacts = VmFacts {
        irqchip: false,
        caps: VmCaps {
            exception_payload: false,
            triple_fault_event: false,
            manual_dirty_log: 0,
        },
    };
    const PAYLOAD: VmFacts = VmFacts {
        irqchip: false,
        caps: VmCaps {
            exception_payload: true,
            triple_fault_event: false,
            manual_dirty_log: 0,
        },
    };
    const TRIPLE: VmFacts = VmFacts {
        irqchip: false,
        caps: VmCaps {
            exception_payload: false,
            triple_fault_event: true,
            manual_dirty_log: 0,
        },
    };
    const IRQCHIP: VmFacts = VmFacts {
        irqchip: true,
        caps: VmCaps {
            exception_payload: false,
            triple_fault_event: false,
            manual_dirty_log: 0,
        },
    };

    fn st() -> VcpuState {
        VcpuState::reset(true)
    }

    /// What Vcpu::set_sregs does.
    fn set_sregs(s: &mut VcpuState, new: &crate::uapi::kvm_sregs) {
        let f = s.features;
        super::super::sregs::set_sregs(&f, &mut s.sregs, new).unwrap();
    }

    fn ev(f: impl FnOnce(&mut kvm_vcpu_events)) -> kvm_vcpu_events {
        let mut e = kvm_vcpu_events::default();
        f(&mut e);
        e
    }

    /// SET then GET on a fresh vCPU.
    fn set_get(vm: &VmFacts, e: kvm_vcpu_events) -> (Result<()>, kvm_vcpu_events) {
        let mut s = st();
        let r = set_events(&mut s, vm, &e);
        (r, get_events(&mut s, vm))
    }

    #[test]
    fn initial_flags() {
        // Device: 0xd, everything else 0; PAYLOAD/TRIPLE_FAULT appear with their caps.
        let g = get_events(&mut st(), &NO_CAPS);
        assert_eq!(g, ev(|e| e.flags = 0xd));
        assert_eq!(get_events(&mut st(), &PAYLOAD).flags, 0x1d);
        assert_eq!(get_events(&mut st(), &TRIPLE).flags, 0x2d);
    }

    #[test]
    fn flags_alone() {
        // Device: 0, 1, 2, 4, 8, 0xd, 0xf accepted; 0x10, 0x20 (no caps), 0x40, 0x80, 0x100,
        // 0x80000000 EINVAL.
        for f in [0u32, 1, 2, 4, 8, 0xd, 0xf] {
            assert_eq!(set_get(&NO_CAPS, ev(|e| e.flags = f)).0, Ok(()), "{f:#x}");
        }
        for f in [0x10u32, 0x20, 0x40, 0x80, 0x100, 0x8000_0000] {
            assert_eq!(set_get(&NO_CAPS, ev(|e| e.flags = f)).0, Err(Errno::EINVAL));
        }
        assert_eq!(set_get(&PAYLOAD, ev(|e| e.flags = 0x10)).0, Ok(()));
        assert_eq!(set_get(&TRIPLE, ev(|e| e.flags = 0x20)).0, Ok(()));
    }

    #[test]
    fn injected_exception() {
        let (r, g) = set_get(
            &NO_CAPS,
            ev(|e| {
                e.exception.injected = 2;
                e.exception.nr = 13;
                e.exception.has_error_code = 3;
                e.exception.error_code = 0x1234;
            }),
        );
        assert_eq!(r, Ok(()));
        assert_eq!(
            (
                g.exception.injected,
                g.exception.nr,
                g.exception.has_error_code,
                g.exception.error_code
            ),
            (1, 13, 1, 0x1234)
        );
    }

    #[test]
    fn exception_vector_range() {
        // Device: injected nr 31 ok; 32, 255 and 2 (NMI) EINVAL; not injected: any nr.
        for (nr, ok) in [
            (31u8, true),
            (32, false),
            (255, false),
            (2, false),
            (0, true),
        ] {
            let e = ev(|e| {
                e.exception.injected = 1;
                e.exception.nr = nr;
            });
            assert_eq!(set_get(&NO_CAPS, e).0.is_ok(), ok, "nr {nr}");
        }
        let (r, g) = set_get(
            &NO_CAPS,
            ev(|e| {
                e.exception.nr = 200;
                e.exception.has_error_code = 1;
                e.exception.error_code = 5;
            }),
        );
        assert_eq!(r, Ok(()));
        assert_eq!(
            (g.exception.nr, g.exception.injected, g.exception.error_code),
            (200, 0, 5)
        );
    }

    #[test]
    fn failed_set_changes_nothing() {
        let mut s = st();
        set_events(&mut s, &NO_CAPS, &ev(|e| e.interrupt.nr = 0x33)).unwrap();
        let before = s.clone();
        let bad = ev(|e| {
            e.flags = VALID_SHADOW | VALID_PAYLOAD;
            e.interrupt.shadow = 1;
        });
        assert_eq!(set_events(&mut s, &NO_CAPS, &bad), Err(Errno::EINVAL));
        assert_eq!(s.events, before.events);
    }

    #[test]
    fn pending_exception_without_payload_cap_is_dropped() {
        // Device: pending #PF without PAYLOAD: accepted, reads back only nr/ec; nr 40 too.
        let (r, g) = set_get(
            &PAYLOAD,
            ev(|e| {
                e.exception.pending = 1;
                e.exception.nr = 14;
                e.exception.has_error_code = 1;
                e.exception.error_code = 7;
            }),
        );
        assert_eq!(r, Ok(()));
        assert_eq!(
            (g.exception.pending, g.exception.injected, g.exception.nr),
            (0, 0, 14)
        );
        let (r, _) = set_get(
            &NO_CAPS,
            ev(|e| {
                e.exception.pending = 1;
                e.exception.nr = 40;
            }),
        );
        assert_eq!(r, Ok(()));
        // Pending plus injected without PAYLOAD: reads back injected.
        let (_, g) = set_get(
            &NO_CAPS,
            ev(|e| {
                e.exception.pending = 1;
                e.exception.injected = 1;
                e.exception.nr = 14;
            }),
        );
        assert_eq!((g.exception.pending, g.exception.injected), (0, 1));
    }

    #[test]
    fn pending_exception_with_payload() {
        // Device: pending #PF with payload 0xdeadb000 and ec 7 reads back as set; pending and
        // injected together: pending wins; injected with a payload: has_payload dropped, the
        // payload value kept; pending nr 40: EINVAL.
        let pf = |e: &mut kvm_vcpu_events| {
            e.flags = VALID_PAYLOAD;
            e.exception.pending = 1;
            e.exception.nr = 14;
            e.exception.has_error_code = 1;
            e.exception.error_code = 7;
            e.exception_has_payload = 1;
            e.exception_payload = 0xdead_b000;
        };
        let (_, g) = set_get(&PAYLOAD, ev(pf));
        assert_eq!((g.exception.pending, g.exception.injected), (1, 0));
        assert_eq!(
            (g.exception_has_payload, g.exception_payload),
            (1, 0xdead_b000)
        );
        let (_, g) = set_get(
            &PAYLOAD,
            ev(|e| {
                pf(e);
                e.exception.injected = 1;
            }),
        );
        assert_eq!((g.exception.pending, g.exception.injected), (1, 0));
        let (_, g) = set_get(
            &PAYLOAD,
            ev(|e| {
                pf(e);
                e.exception.pending = 0;
                e.exception.injected = 1;
            }),
        );
        assert_eq!((g.exception.injected, g.exception_has_payload), (1, 0));
        assert_eq!(g.exception_payload, 0xdead_b000);
        let (r, _) = set_get(
            &PAYLOAD,
            ev(|e| {
                pf(e);
                e.exception.nr = 40;
            }),
        );
        assert_eq!(r, Err(Errno::EINVAL));
    }

    #[test]
    fn soft_exceptions_hide_flags() {
        // Device: injected #BP or #OF reads back injected 0 (nr kept).
        for nr in [3u8, 4] {
            let (_, g) = set_get(
                &NO_CAPS,
                ev(|e| {
                    e.exception.injected = 1;
                    e.exception.nr = nr;
                }),
            );
            assert_eq!((g.exception.injected, g.exception.nr), (0, nr));
        }
    }

    #[test]
    fn payload_delivered_when_cap_turned_off() {
        // Device: cap on, pending #PF payload, cap off: GET reports injected and pending, the
        // payload gone, and CR2 holds it.
        let mut s = st();
        let e = ev(|e| {
            e.flags = VALID_PAYLOAD;
            e.exception.pending = 1;
            e.exception.nr = 14;
            e.exception.has_error_code = 1;
            e.exception.error_code = 2;
            e.exception_has_payload = 1;
            e.exception_payload = 0xdead_b000;
        });
        set_events(&mut s, &PAYLOAD, &e).unwrap();
        let g = get_events(&mut s, &NO_CAPS);
        assert_eq!((g.exception.injected, g.exception.pending), (1, 1));
        assert_eq!((g.exception_has_payload, g.exception_payload), (0, 0));
        assert_eq!(s.sregs.cr2, 0xdead_b000);
        assert_eq!(get_events(&mut s, &PAYLOAD).exception.injected, 0);
        // #DB: the payload goes to DR6 (device: 0xffff0ff0 + 0x4002 -> 0xffff4ff2).
        let mut s = st();
        let e = ev(|e| {
            e.flags = VALID_PAYLOAD;
            e.exception.pending = 1;
            e.exception.nr = 1;
            e.exception_has_payload = 1;
            e.exception_payload = 0x4002;
        });
        set_events(&mut s, &PAYLOAD, &e).unwrap();
        get_events(&mut s, &NO_CAPS);
        assert_eq!(s.debugregs.dr6, 0xffff_4ff2);
    }

    #[test]
    fn interrupt_and_shadow() {
        // Device: injected 0x20 reads back; soft hides injected; shadow only with the flag,
        // stored as the byte (1, 2, 3, 4, 0xff).
        let (_, g) = set_get(
            &NO_CAPS,
            ev(|e| {
                e.interrupt.injected = 2;
                e.interrupt.nr = 0x41;
            }),
        );
        assert_eq!((g.interrupt.injected, g.interrupt.nr), (1, 0x41));
        let (_, g) = set_get(
            &NO_CAPS,
            ev(|e| {
                e.interrupt.injected = 1;
                e.interrupt.nr = 0x80;
                e.interrupt.soft = 1;
            }),
        );
        assert_eq!(
            (g.interrupt.injected, g.interrupt.nr, g.interrupt.soft),
            (0, 0x80, 0)
        );
        assert_eq!(
            set_get(&NO_CAPS, ev(|e| e.interrupt.shadow = 1))
                .1
                .interrupt
                .shadow,
            0
        );
        for sh in [0u8, 1, 2, 3, 4, 0xff] {
            let e = ev(|e| {
                e.flags = VALID_SHADOW;
                e.interrupt.shadow = sh;
            });
            assert_eq!(set_get(&NO_CAPS, e).1.interrupt.shadow, sh);
        }
    }

    #[test]
    fn nmi_fields() {
        // Device: injected/masked read back 0/1; pending needs the flag, limited to 2, to 1
        // when masked or injected.
        let (_, g) = set_get(
            &NO_CAPS,
            ev(|e| {
                e.nmi.injected = 5;
                e.nmi.masked = 7;
                e.nmi.pad = 9;
            }),
        );
        assert_eq!((g.nmi.injected, g.nmi.masked, g.nmi.pad), (1, 1, 0));
        assert_eq!(
            set_get(&NO_CAPS, ev(|e| e.nmi.pending = 1)).1.nmi.pending,
            0
        );
        for (p, masked, inj, want) in [
            (1u8, 0u8, 0u8, 1u8),
            (2, 0, 0, 2),
            (5, 0, 0, 2),
            (255, 0, 0, 2),
            (2, 1, 0, 1),
            (2, 0, 1, 1),
        ] {
            let e = ev(|e| {
                e.flags = VALID_NMI_PENDING;
                e.nmi.pending = p;
                e.nmi.masked = masked;
                e.nmi.injected = inj;
            });
            assert_eq!(
                set_get(&NO_CAPS, e).1.nmi.pending,
                want,
                "{p} {masked} {inj}"
            );
        }
    }

    #[test]
    fn nmi_limit_applies_at_each_set() {
        // Device: pending 2 while masked, then unmask without the flag: 1 (the SET processed
        // the queue under the old mask); unmasked 2, mask, unmask: 1.
        let mut s = st();
        let e = ev(|e| {
            e.flags = VALID_NMI_PENDING;
            e.nmi.masked = 1;
            e.nmi.pending = 2;
        });
        set_events(&mut s, &NO_CAPS, &e).unwrap();
        set_events(&mut s, &NO_CAPS, &ev(|_| {})).unwrap();
        assert_eq!(get_events(&mut s, &NO_CAPS).nmi.pending, 1);
        let mut s = st();
        let e = ev(|e| {
            e.flags = VALID_NMI_PENDING;
            e.nmi.pending = 2;
        });
        set_events(&mut s, &NO_CAPS, &e).unwrap();
        set_events(&mut s, &NO_CAPS, &ev(|e| e.nmi.masked = 1)).unwrap();
        assert_eq!(get_events(&mut s, &NO_CAPS).nmi.pending, 1);
        set_events(&mut s, &NO_CAPS, &ev(|_| {})).unwrap();
        assert_eq!(get_events(&mut s, &NO_CAPS).nmi.pending, 1);
    }

    #[test]
    fn smm_refused_and_partial_apply() {
        // Device: SMM with smm/pending/inside_nmi: EINVAL, but the interrupt, shadow and NMI
        // state of that SET are already in place.
        for which in 0..3 {
            let e = ev(|e| {
                e.flags = VALID_SMM | VALID_SHADOW | VALID_NMI_PENDING;
                e.exception.injected = 1;
                e.exception.nr = 6;
                e.interrupt.injected = 1;
                e.interrupt.nr = 0x20;
                e.interrupt.shadow = 2;
                e.nmi.injected = 1;
                e.nmi.pending = 1;
                match which {
                    0 => e.smi.smm = 1,
                    1 => e.smi.pending = 1,
                    _ => e.smi.smm_inside_nmi = 1,
                }
            });
            let (r, g) = set_get(&NO_CAPS, e);
            assert_eq!(r, Err(Errno::EINVAL));
            assert_eq!(
                (
                    g.exception.injected,
                    g.interrupt.nr,
                    g.interrupt.shadow,
                    g.nmi.pending
                ),
                (1, 0x20, 2, 1)
            );
        }
        // The latched INIT comes after the SMM check, before the triple-fault one.
        let mut s = st();
        let e = ev(|e| {
            e.flags = VALID_SMM;
            e.smi.smm = 1;
            e.smi.latched_init = 1;
        });
        assert_eq!(set_events(&mut s, &IRQCHIP, &e), Err(Errno::EINVAL));
        assert!(!s.mp.init_pending);
        let e = ev(|e| {
            e.flags = VALID_SMM | VALID_TRIPLE_FAULT;
            e.smi.latched_init = 1;
        });
        assert_eq!(set_events(&mut s, &IRQCHIP, &e), Err(Errno::EINVAL));
        assert!(s.mp.init_pending);
    }

    #[test]
    fn latched_init_and_sipi_need_irqchip() {
        let li = ev(|e| {
            e.flags = VALID_SMM;
            e.smi.latched_init = 2;
        });
        assert_eq!(set_get(&NO_CAPS, li).1.smi.latched_init, 0);
        assert_eq!(set_get(&IRQCHIP, li).1.smi.latched_init, 1);
        // SMM flag without latched_init clears it; without the flag it stays.
        let mut s = VcpuState::reset(false);
        set_events(&mut s, &IRQCHIP, &li).unwrap();
        set_events(&mut s, &IRQCHIP, &ev(|_| {})).unwrap();
        assert_eq!(get_events(&mut s, &IRQCHIP).smi.latched_init, 1);
        set_events(&mut s, &IRQCHIP, &ev(|e| e.flags = VALID_SMM)).unwrap();
        assert_eq!(get_events(&mut s, &IRQCHIP).smi.latched_init, 0);
        // SIPI vector: stored with an irqchip, never reported.
        let sv = ev(|e| {
            e.flags = VALID_SIPI_VECTOR;
            e.sipi_vector = 0x12;
        });
        let mut s = VcpuState::reset(false);
        set_events(&mut s, &IRQCHIP, &sv).unwrap();
        assert_eq!(
            (s.mp.sipi_vector, get_events(&mut s, &IRQCHIP).sipi_vector),
            (0x12, 0)
        );
        let mut s = VcpuState::reset(false);
        set_events(&mut s, &NO_CAPS, &sv).unwrap();
        assert_eq!(s.mp.sipi_vector, 0);
    }

    #[test]
    fn triple_fault() {
        let tf = ev(|e| {
            e.flags = VALID_TRIPLE_FAULT;
            e.triple_fault.pending = 1;
        });
        assert_eq!(set_get(&NO_CAPS, tf).0, Err(Errno::EINVAL));
        let (r, g) = set_get(&TRIPLE, tf);
        assert_eq!((r, g.triple_fault.pending, g.flags), (Ok(()), 1, 0x2d));
        // Without the flag the reserved byte is ignored.
        assert_eq!(
            set_get(&TRIPLE, ev(|e| e.triple_fault.pending = 1))
                .1
                .triple_fault
                .pending,
            0
        );
        // Not reported while the capability is off.
        let mut s = st();
        set_events(&mut s, &TRIPLE, &tf).unwrap();
        assert_eq!(get_events(&mut s, &NO_CAPS).triple_fault.pending, 0);
        assert_eq!(get_events(&mut s, &TRIPLE).triple_fault.pending, 1);
    }

    #[test]
    fn interrupt_shared_with_sregs() {
        // Device: SET_SREGS bitmap bits 0x44 and 0xff: events show injected 0x44 and the bitmap
        // keeps only bit 0x44; an empty bitmap keeps it; events nr 0x77 not injected clears the
        // bitmap; a soft interrupt is not in the bitmap; SET_SREGS(GET_SREGS) keeps the soft
        // one; a new bit replaces it with a non-soft interrupt.
        let mut s = st();
        let mut sr = s.sregs;
        sr.interrupt_bitmap = [0, 0x30, 0, 1 << 63];
        set_sregs(&mut s, &sr);
        let g = get_events(&mut s, &NO_CAPS);
        assert_eq!((g.interrupt.injected, g.interrupt.nr), (1, 0x44));
        assert_eq!(s.sregs.interrupt_bitmap, [0, 0x10, 0, 0]);
        sr.interrupt_bitmap = [0; 4];
        set_sregs(&mut s, &sr);
        assert_eq!(get_events(&mut s, &NO_CAPS).interrupt.nr, 0x44);
        set_events(&mut s, &NO_CAPS, &ev(|e| e.interrupt.nr = 0x77)).unwrap();
        assert_eq!(s.sregs.interrupt_bitmap, [0; 4]);
        let soft = ev(|e| {
            e.interrupt.injected = 1;
            e.interrupt.nr = 0x99;
            e.interrupt.soft = 1;
        });
        set_events(&mut s, &NO_CAPS, &soft).unwrap();
        assert_eq!(s.sregs.interrupt_bitmap, [0; 4]);
        let cur = s.sregs;
        set_sregs(&mut s, &cur);
        assert_eq!(
            queued_interrupt(&s),
            QueuedInterrupt {
                injected: true,
                nr: 0x99,
                soft: true
            }
        );
        sr.interrupt_bitmap = [0, 0, 1 << 0x19, 0];
        set_sregs(&mut s, &sr);
        let g = get_events(&mut s, &NO_CAPS);
        assert_eq!((g.interrupt.injected, g.interrupt.nr), (1, 0x99));
        assert!(!s.events.interrupt.soft);
    }

    #[test]
    fn delivered_interrupt_clears_injected() {
        // A runner that delivers the interrupt clears the bitmap: injected drops, nr stays.
        let mut s = st();
        let e = ev(|e| {
            e.interrupt.injected = 1;
            e.interrupt.nr = 0x30;
        });
        set_events(&mut s, &NO_CAPS, &e).unwrap();
        s.sregs.interrupt_bitmap = [0; 4];
        let g = get_events(&mut s, &NO_CAPS);
        assert_eq!((g.interrupt.injected, g.interrupt.nr), (0, 0x30));
    }

    #[test]
    fn init_clears_events() {
        // Device: after a latched INIT, only exception nr/ec/payload and interrupt nr remain.
        let mut s = VcpuState::reset(false);
        let e = ev(|e| {
            e.flags = VALID_SMM | VALID_SHADOW | VALID_NMI_PENDING;
            e.exception.injected = 1;
            e.exception.nr = 13;
            e.exception.has_error_code = 1;
            e.exception.error_code = 0x77;
            e.exception_payload = 0x99;
            e.interrupt.injected = 1;
            e.interrupt.nr = 0x40;
            e.interrupt.shadow = 1;
            e.nmi.injected = 1;
            e.nmi.masked = 1;
            e.nmi.pending = 1;
            e.smi.latched_init = 1;
        });
        set_events(&mut s, &IRQCHIP, &e).unwrap();
        assert_eq!(
            mp_state::get_mp_state(&mut s, true),
            mp_state::INIT_RECEIVED
        );
        let g = get_events(&mut s, &IRQCHIP);
        let want = ev(|w| {
            w.flags = 0xd;
            w.exception.nr = 13;
            w.exception.has_error_code = 1;
            w.exception.error_code = 0x77;
            w.exception_payload = 0x99;
            w.interrupt.nr = 0x40;
        });
        assert_eq!(g, want);
        assert_eq!(s.sregs.interrupt_bitmap, [0; 4]);
    }
}
