//! One instruction: fetch, decode, execute, then the instruction-boundary work
//! (RIP, interrupt shadow, single-step #DB, pending exits); and the delivery of
//! events queued by KVM_SET_VCPU_EVENTS at entry.

use super::alu::flags::*;
use super::exception::EventKind;
use super::{
    vector, Cpu, Exc, Exit, Stop, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP,
    KVM_GUESTDBG_USE_HW_BP,
};
use crate::errno::Errno;
use crate::vcpu::debugregs::DR6_ACTIVE_LOW;
use crate::vcpu::events;

/// DR6.BS: the #DB came from single-stepping.
const DR6_BS: u64 = 1 << 14;

/// Why the run loop stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunStop {
    Exit(Exit),
    Err(Errno),
    /// KVM's fault path keeps saying "retry" (an MMU-notifier invalidation of the
    /// page is in progress): the instruction runs again after the locks are dropped,
    /// as KVM re-enters the guest until the invalidation ends.
    Retry,
}

impl Cpu<'_> {
    fn code_mask(&self) -> u64 {
        match self.bitness() {
            64 => u64::MAX,
            32 => 0xffff_ffff,
            _ => 0xffff,
        }
    }

    fn single_stepping(&self) -> bool {
        let c = self.emu.guest_debug.control;
        c & KVM_GUESTDBG_ENABLE != 0 && c & KVM_GUESTDBG_SINGLESTEP != 0
    }

    /// Execute one instruction. Ok: keep running.
    pub fn step(&mut self) -> Result<(), RunStop> {
        let rip0 = self.st.regs.rip;
        let rflags0 = self.st.regs.rflags;
        let gpr0 = self.gpr;
        let out_len = self.emu.mmio_out.len();
        self.exit_after = None;
        self.shadow_set = 0;
        if self.emu.guest_debug.control & KVM_GUESTDBG_USE_HW_BP != 0 {
            self.check_code_breakpoint()?;
        }
        let res = match self.fetch() {
            Ok(ins) => {
                self.next_rip = rip0.wrapping_add(ins.len() as u64) & self.code_mask();
                self.exec(&ins)
            }
            Err(e) => Err(e),
        };
        match res {
            Ok(()) => {
                self.st.regs.rip = self.next_rip;
                self.emu.retired = self.emu.retired.wrapping_add(1);
                self.emu.mmio_in.clear();
                if self.next_rip != rip0 {
                    // A REP INS keeps the rest of what one exit read ahead.
                    self.emu.pio_in = None;
                }
                self.st.events.interrupt_shadow = self.shadow_set;
                // MOV SS / POP SS hold the single-step trap until after the next instruction.
                let tf = rflags0 & TF != 0 && self.shadow_set & super::SHADOW_MOV_SS == 0;
                if self.single_stepping() {
                    self.pending_exits()?;
                    let pc = self.st.sregs.cs.base.wrapping_add(self.st.regs.rip);
                    return Err(RunStop::Exit(Exit::Debug {
                        exception: u32::from(vector::DB),
                        pc,
                        dr6: Some(DR6_BS | DR6_ACTIVE_LOW),
                        dr7: None,
                    }));
                }
                if tf {
                    self.st.debugregs.dr6 |= DR6_BS;
                    let rip = self.st.regs.rip;
                    let e = Exc {
                        vector: vector::DB,
                        error_code: None,
                    };
                    self.raise(e, rip, EventKind::Exception)
                        .map_err(|s| self.stop_to_run(s))?;
                }
                self.pending_exits()
            }
            Err(stop) => {
                self.gpr = gpr0;
                self.st.regs.rflags = rflags0;
                self.st.regs.rip = rip0;
                self.emu.mmio_out.truncate(out_len);
                match stop {
                    Stop::Exc(e) => {
                        self.emu.mmio_in.clear();
                        self.emu.pio_in = None;
                        // Faults push the faulting instruction's address.
                        self.raise(e, rip0, EventKind::Exception)
                            .map_err(|s| self.stop_to_run(s))?;
                        self.pending_exits()
                    }
                    other => Err(self.stop_to_run(other)),
                }
            }
        }
    }

    fn stop_to_run(&self, s: Stop) -> RunStop {
        match s {
            Stop::Exit(Exit::Emulation { len: 0, .. }) => RunStop::Exit(Exit::Emulation {
                bytes: self.fetched_bytes(),
                len: self.insn_fetched,
            }),
            Stop::Exit(x) => RunStop::Exit(x),
            Stop::Err(Errno::EAGAIN) => RunStop::Retry,
            Stop::Err(e) => RunStop::Err(e),
            // Unreachable: raise() resolves exceptions.
            Stop::Exc(_) => RunStop::Exit(Exit::Shutdown),
        }
    }

    /// kvm_vcpu_check_code_breakpoint: userspace's execute breakpoints (DR0-3 with
    /// R/W = 00 in its DR7) match the linear RIP before the instruction; as on the
    /// device (KVM's check before each emulated instruction), RFLAGS.RF is ignored.
    fn check_code_breakpoint(&self) -> Result<(), RunStop> {
        let gd = &self.emu.guest_debug;
        let dr7 = gd.debugreg[7];
        let pc = self.st.sregs.cs.base.wrapping_add(self.st.regs.rip);
        let pc = if self.mode64() { pc } else { pc & 0xffff_ffff };
        let mut dr6 = 0u64;
        for i in 0..4 {
            let enabled = (dr7 >> (2 * i)) & 3 != 0;
            let rw = (dr7 >> (16 + 4 * i)) & 3;
            if enabled && rw == 0 && gd.debugreg[i] == pc {
                dr6 |= 1 << i;
            }
        }
        if dr6 == 0 {
            return Ok(());
        }
        Err(RunStop::Exit(Exit::Debug {
            exception: u32::from(vector::DB),
            pc,
            dr6: Some(dr6 | DR6_ACTIVE_LOW),
            dr7: None,
        }))
    }

    /// Exits owed after a completed instruction: MMIO write fragments, then OUT/HLT.
    fn pending_exits(&mut self) -> Result<(), RunStop> {
        if let Some((gpa, len, data)) = self.emu.mmio_out.pop_front() {
            if let Some(x) = self.exit_after.take() {
                // Reported after the fragments (KVM finishes the MMIO first).
                self.emu.deferred = Some(x);
            }
            return Err(RunStop::Exit(Exit::Mmio {
                gpa,
                len,
                write: true,
                data,
            }));
        }
        match self.exit_after.take() {
            Some(x) => Err(RunStop::Exit(x)),
            None => Ok(()),
        }
    }

    /// Deliver what KVM_SET_VCPU_EVENTS queued (kvm_check_and_inject_events): the
    /// exception (with its payload), an NMI, the injected interrupt; a pending
    /// triple fault is a shutdown.
    pub fn inject_events(&mut self) -> Result<(), RunStop> {
        if std::mem::take(&mut self.st.events.triple_fault_pending) {
            return Err(RunStop::Exit(Exit::Shutdown));
        }
        let rip = self.st.regs.rip;
        let ex = self.st.events.exception;
        if ex.injected || ex.pending {
            self.st.events.exception.injected = false;
            self.st.events.exception.pending = false;
            if ex.has_payload {
                match ex.nr {
                    events::PF_VECTOR => self.st.sregs.cr2 = ex.payload,
                    events::DB_VECTOR => {
                        self.st.debugregs.dr6 = crate::vcpu::debugregs::apply_db_payload(
                            self.st.debugregs.dr6,
                            ex.payload,
                        )
                    }
                    _ => {}
                }
                self.st.events.exception.has_payload = false;
                self.st.events.exception.payload = 0;
            }
            let e = Exc {
                vector: ex.nr,
                error_code: ex.has_error_code.then_some(ex.error_code),
            };
            self.raise(e, rip, EventKind::Exception)
                .map_err(|s| self.stop_to_run(s))?;
            return Ok(());
        }
        events::process_nmi(&mut self.st.events);
        let nmi = self.st.events.nmi_injected
            || (self.st.events.nmi_pending > 0 && !self.st.events.nmi_masked);
        if nmi {
            if !self.st.events.nmi_injected {
                self.st.events.nmi_pending -= 1;
            }
            self.st.events.nmi_injected = false;
            self.st.events.nmi_masked = true;
            let e = Exc {
                vector: vector::NMI,
                error_code: None,
            };
            self.raise(e, rip, EventKind::External)
                .map_err(|s| self.stop_to_run(s))?;
            return Ok(());
        }
        let q = events::queued_interrupt(self.st);
        if q.injected {
            let mut q2 = q;
            q2.injected = false;
            events::set_interrupt(self.st, q2);
            let e = Exc {
                vector: q.nr,
                error_code: None,
            };
            let kind = if q.soft {
                EventKind::Soft
            } else {
                EventKind::External
            };
            self.raise(e, rip, kind).map_err(|s| self.stop_to_run(s))?;
        }
        Ok(())
    }
}
