//! KVM_RUN on the simulator (kvm_arch_vcpu_ioctl_run) and KVM_SET_GUEST_DEBUG.
//!
//! Entry: kvm_run.flags cleared; an uninitialized AP is not run; the sync-regs
//! masks are checked; CR8 comes from kvm_run (no in-kernel APIC); a read
//! userspace was asked for completes (the instruction runs again with the data);
//! immediate_exit is EINTR (exit_reason untouched, as on the device); events queued
//! by KVM_SET_VCPU_EVENTS are delivered; then the guest runs in batches of at most
//! [`BATCH`] instructions with the vCPU and VM locked, re-checking kick() and
//! immediate_exit between batches. Every return writes if_flag, cr8, apic_base and
//! ready_for_interrupt_injection as post_kvm_run_save does.
//!
//! Device facts this follows (kernel 6.18, kvm_pvm; see docs/simulated-vcpu.md):
//! an MMIO read exits with RIP at the instruction, an MMIO write after it; HLT
//! exits with RIP after the HLT; immediate_exit after an MMIO read exit completes
//! the read first, then EINTR without touching exit_reason; a VM without memslots
//! gives ENOSPC with exit_reason 0; the exit union is not cleared between exits.

use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use super::emulate::{
    Cpu, EmuState, Exit, GuestDebug, PendingRead, RunStop, KVM_GUESTDBG_ENABLE,
    KVM_GUESTDBG_VALID_MASK,
};
use super::{Vcpu, KVM_PIO_PAGE_OFFSET};
use crate::errno::{Errno, Result};
use crate::stats::VcpuStat;
use crate::uaccess::UserAccess;
use crate::uapi::{self, run_off};

/// Whether the thread running KVM_RUN has a signal to handle: on the device a signal
/// interrupts KVM_RUN with EINTR. The embedder (the Python bindings, which check
/// Python's pending signals such as Ctrl-C) installs it once; it is asked between
/// batches.
static SIGNAL_PENDING: OnceLock<fn() -> bool> = OnceLock::new();

/// Install the signal check (first call wins).
pub fn set_signal_check(pending: fn() -> bool) {
    let _ = SIGNAL_PENDING.set(pending);
}

/// Instructions per lock hold: another thread can harvest dirty logs, run another
/// vCPU or kick between batches.
pub const BATCH: usize = 1024;

pub const KVM_EXIT_UNKNOWN: u32 = 0;
pub const KVM_EXIT_IO: u32 = 2;
pub const KVM_EXIT_DEBUG: u32 = 4;
pub const KVM_EXIT_HLT: u32 = 5;
pub const KVM_EXIT_MMIO: u32 = 6;
pub const KVM_EXIT_SHUTDOWN: u32 = 8;
pub const KVM_EXIT_FAIL_ENTRY: u32 = 9;
pub const KVM_EXIT_INTR: u32 = 10;
pub const KVM_EXIT_INTERNAL_ERROR: u32 = 17;
pub const KVM_EXIT_DIRTY_RING_FULL: u32 = 31;
pub const KVM_EXIT_IO_IN: u8 = 0;
pub const KVM_EXIT_IO_OUT: u8 = 1;
pub const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
pub const KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES: u64 = 1;
/// KVM_SYNC_X86_REGS | SREGS | EVENTS.
const KVM_SYNC_X86_VALID_FIELDS: u64 = 0x7;

const PIO_DATA: usize = KVM_PIO_PAGE_OFFSET * uapi::PAGE_SIZE as usize;

impl Vcpu {
    fn run_u8(&self, off: usize) -> u8 {
        self.run_area().load_u8(off).unwrap_or(0)
    }
    fn run_put(&self, off: usize, b: &[u8]) {
        let _ = self.run_area().write(off, b);
    }
    fn run_u64(&self, off: usize) -> u64 {
        let mut b = [0u8; 8];
        let _ = self.run_area().read(off, &mut b);
        u64::from_le_bytes(b)
    }

    /// Ask a running (or about-to-run) KVM_RUN to return EINTR, like a signal.
    pub fn kick(&self) {
        self.kick.store(true, Ordering::SeqCst);
    }

    fn interrupted(&self) -> bool {
        self.kick.swap(false, Ordering::SeqCst)
            || self.run_u8(run_off::IMMEDIATE_EXIT) != 0
            || SIGNAL_PENDING.get().is_some_and(|pending| pending())
    }

    /// KVM_RUN.
    pub fn run(&self) -> Result<i64> {
        let mut emu = self.emu.lock().unwrap_or_else(|e| e.into_inner());
        let r = self.run_locked(&mut emu);
        // A kick is a signal: it is consumed when KVM_RUN returns, whatever the exit
        // (a VMM's handler sets immediate_exit for the next entry, as kick() in Python
        // does), so it never makes a later KVM_RUN fail spuriously.
        self.kick.store(false, Ordering::SeqCst);
        self.post_run_save();
        r
    }

    fn set_exit_reason(&self, reason: u32) {
        self.run_put(run_off::EXIT_REASON, &reason.to_le_bytes());
    }

    fn run_locked(&self, emu: &mut EmuState) -> Result<i64> {
        let vm = self.vm().ok_or(Errno::EIO)?;
        self.run_put(run_off::FLAGS, &0u16.to_le_bytes());
        let irqchip = vm.state().irqchip;
        {
            let mut st = self.state();
            super::mp_state::accept_events(&mut st, irqchip);
            if st.mp.current(irqchip) == kvm_bindings::KVM_MP_STATE_UNINITIALIZED {
                drop(st);
                if self.interrupted() {
                    self.set_exit_reason(KVM_EXIT_INTR);
                    self.stats.add(VcpuStat::SignalExits as usize, 1);
                    return Err(Errno::EINTR);
                }
                return Err(Errno::EAGAIN);
            }
        }
        let valid = self.run_u64(run_off::KVM_VALID_REGS);
        let dirty = self.run_u64(run_off::KVM_DIRTY_REGS);
        if (valid | dirty) & !KVM_SYNC_X86_VALID_FIELDS != 0 {
            return Err(Errno::EINVAL);
        }
        if !irqchip {
            let cr8 = self.run_u64(run_off::CR8);
            if cr8 & !0xf != 0 {
                return Err(Errno::EINVAL);
            }
            self.state().sregs.cr8 = cr8;
        }
        // complete_userspace_io.
        let mut resume_one = false;
        match emu.pending_read.take() {
            Some(PendingRead::Mmio { lin, gpa, len }) => {
                let mut d = [0u8; 8];
                let _ = self.run_area().read(run_off::EXIT_UNION + 8, &mut d);
                let n = (len as usize).min(8);
                d[n..].fill(0);
                emu.mmio_in.push_back((lin, gpa, d));
                resume_one = true;
            }
            Some(PendingRead::Pio { size, count, .. }) => {
                let n = usize::from(size) * count as usize;
                let mut d = vec![0u8; n.min(4096)];
                let _ = self.run_area().read(PIO_DATA, &mut d);
                emu.pio_in = Some(d);
                resume_one = true;
            }
            Some(PendingRead::None) | None => {}
        }
        if let Some((gpa, len, data)) = emu.mmio_out.pop_front() {
            // complete_emulated_mmio: the next fragment of a write.
            return self.exit_to_user(
                Exit::Mmio {
                    gpa,
                    len,
                    write: true,
                    data,
                },
                emu,
            );
        }
        if let Some(x) = emu.deferred.take() {
            return self.exit_to_user(x, emu);
        }
        if resume_one {
            match self.run_batch(&vm, emu, 1, false) {
                Ok(()) | Err(RunStop::Retry) => {}
                Err(stop) => return self.finish_stop(stop, emu),
            }
        }
        if self.run_u8(run_off::IMMEDIATE_EXIT) != 0 {
            return Err(Errno::EINTR);
        }
        self.set_exit_reason(KVM_EXIT_UNKNOWN);
        loop {
            if self.interrupted() {
                self.set_exit_reason(KVM_EXIT_INTR);
                self.stats.add(VcpuStat::SignalExits as usize, 1);
                return Err(Errno::EINTR);
            }
            if irqchip && !self.wake_if_halted() {
                // vcpu_block: nothing can wake it but an event or a signal (kick).
                std::thread::sleep(std::time::Duration::from_millis(1));
                continue;
            }
            let n = match emu.budget {
                Some(0) => {
                    self.set_exit_reason(KVM_EXIT_INTR);
                    self.stats.add(VcpuStat::SignalExits as usize, 1);
                    return Err(Errno::EINTR);
                }
                Some(b) => (b as usize).min(BATCH),
                None => BATCH,
            };
            // Every entry delivers what is queued (kvm_check_and_inject_events).
            let r = self.run_batch(&vm, emu, n, true);
            if let Some(b) = emu.budget.as_mut() {
                // The whole batch counts, also when it ended early at an exit.
                *b = b.saturating_sub(n as u64);
            }
            match r {
                Ok(()) => {}
                // Let the thread ending the invalidation take the VM lock.
                Err(RunStop::Retry) => std::thread::yield_now(),
                // With an in-kernel APIC, HLT halts the vCPU inside KVM_RUN
                // (__kvm_emulate_halt): counted, no exit to userspace.
                Err(RunStop::Exit(Exit::Hlt)) if irqchip => {
                    self.stats.add(VcpuStat::HaltExits as usize, 1);
                    self.stats.add(VcpuStat::Exits as usize, 1);
                    self.state().mp.set_state(super::mp_state::HALTED);
                }
                Err(stop) => return self.finish_stop(stop, emu),
            }
        }
    }

    /// A HALTED vCPU (in-kernel APIC) becomes RUNNABLE on an event it can take: an
    /// NMI, a queued exception or interrupt, a triple fault, INIT. False: still halted.
    fn wake_if_halted(&self) -> bool {
        let mut st = self.state();
        if st.mp.current(true) != super::mp_state::HALTED {
            return true;
        }
        let ev = &st.events;
        let wake = ev.nmi_pending > 0
            || ev.nmi_queued > 0
            || ev.nmi_injected
            || ev.exception.injected
            || ev.exception.pending
            || ev.triple_fault_pending
            || st.mp.init_pending
            || super::events::queued_interrupt(&st).injected;
        if wake {
            st.mp.set_state(super::mp_state::RUNNABLE);
        }
        wake
    }

    /// Run up to `n` instructions with the vCPU and VM locked.
    fn run_batch(
        &self,
        vm: &crate::vm::Vm,
        emu: &mut EmuState,
        n: usize,
        entry: bool,
    ) -> std::result::Result<(), RunStop> {
        let mut st = self.state();
        let mut vmg = vm.state();
        if self.dirty_ring.as_ref().is_some_and(|r| r.soft_full()) {
            return Err(RunStop::Exit(Exit::DirtyRingFull));
        }
        emu.decode.invalidate_code();
        let mut cpu = Cpu::new(self, &mut st, &mut vmg, emu);
        let mut r = Ok(());
        if entry {
            r = cpu.inject_events();
        }
        if r.is_ok() {
            for _ in 0..n {
                r = cpu.step();
                if r.is_err() {
                    break;
                }
            }
        }
        cpu.finish();
        r
    }

    fn finish_stop(&self, stop: RunStop, emu: &mut EmuState) -> Result<i64> {
        match stop {
            RunStop::Exit(x) => self.exit_to_user(x, emu),
            RunStop::Err(e) => Err(e),
            RunStop::Retry => Err(Errno::EAGAIN),
        }
    }

    /// Fill kvm_run for an exit and count it.
    fn exit_to_user(&self, x: Exit, _emu: &mut EmuState) -> Result<i64> {
        let u = run_off::EXIT_UNION;
        self.stats.add(VcpuStat::Exits as usize, 1);
        match x {
            Exit::Io {
                port,
                size,
                input,
                count,
                data,
            } => {
                self.stats.add(VcpuStat::IoExits as usize, 1);
                self.set_exit_reason(KVM_EXIT_IO);
                self.run_put(
                    u,
                    &[
                        if input {
                            KVM_EXIT_IO_IN
                        } else {
                            KVM_EXIT_IO_OUT
                        },
                        size,
                    ],
                );
                self.run_put(u + 2, &port.to_le_bytes());
                self.run_put(u + 4, &count.to_le_bytes());
                self.run_put(u + 8, &(PIO_DATA as u64).to_le_bytes());
                if !input {
                    self.run_put(PIO_DATA, &data[..usize::from(size).min(8)]);
                }
            }
            Exit::Mmio {
                gpa,
                len,
                write,
                data,
            } => {
                self.stats.add(VcpuStat::MmioExits as usize, 1);
                self.set_exit_reason(KVM_EXIT_MMIO);
                self.run_put(u, &gpa.to_le_bytes());
                if write {
                    self.run_put(u + 8, &data[..(len as usize).min(8)]);
                }
                self.run_put(u + 16, &len.to_le_bytes());
                self.run_put(u + 20, &[u8::from(write)]);
            }
            Exit::Hlt => {
                self.stats.add(VcpuStat::HaltExits as usize, 1);
                self.set_exit_reason(KVM_EXIT_HLT);
            }
            Exit::Shutdown => self.set_exit_reason(KVM_EXIT_SHUTDOWN),
            Exit::Emulation { bytes, len } => {
                self.stats.add(VcpuStat::InsnEmulationFail as usize, 1);
                self.set_exit_reason(KVM_EXIT_INTERNAL_ERROR);
                // The device's layout: suberror, ndata 8, flags, insn_size and 15 bytes
                // (past insn_size 0x90, KVM's memset), then kvm_pvm's exit information
                // 0x1000, 0, 0, 0, 0 (the same for any RIP).
                let mut data = [0u8; 64];
                data[..8].copy_from_slice(
                    &KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES.to_le_bytes(),
                );
                let n = usize::from(len).min(15);
                data[8] = n as u8;
                data[9..24].fill(0x90);
                data[9..9 + n].copy_from_slice(&bytes[..n]);
                data[24..32].copy_from_slice(&0x1000u64.to_le_bytes());
                self.run_put(u, &KVM_INTERNAL_ERROR_EMULATION.to_le_bytes());
                self.run_put(u + 4, &8u32.to_le_bytes());
                self.run_put(u + 8, &data);
            }
            Exit::Debug {
                exception,
                pc,
                dr6,
                dr7,
            } => {
                self.set_exit_reason(KVM_EXIT_DEBUG);
                self.run_put(u, &exception.to_le_bytes());
                self.run_put(u + 8, &pc.to_le_bytes());
                if let Some(d) = dr6 {
                    self.run_put(u + 16, &d.to_le_bytes());
                }
                if let Some(d) = dr7 {
                    self.run_put(u + 24, &d.to_le_bytes());
                }
            }
            Exit::DirtyRingFull => self.set_exit_reason(KVM_EXIT_DIRTY_RING_FULL),
            Exit::FailEntry { reason } => {
                self.set_exit_reason(KVM_EXIT_FAIL_ENTRY);
                self.run_put(u, &reason.to_le_bytes());
                self.run_put(u + 8, &0u32.to_le_bytes());
            }
        }
        Ok(0)
    }

    /// post_kvm_run_save.
    fn post_run_save(&self) {
        let irqchip = self.vm().is_some_and(|vm| vm.state().irqchip);
        let st = self.state();
        let if_flag = st.regs.rflags & (1 << 9) != 0;
        let ev = &st.events;
        let ready = irqchip
            || (if_flag
                && ev.interrupt_shadow == 0
                && !ev.exception.injected
                && !ev.exception.pending
                && !ev.nmi_injected
                && !super::events::queued_interrupt(&st).injected);
        self.run_put(run_off::IF_FLAG, &[u8::from(if_flag)]);
        self.run_put(run_off::READY_FOR_INTERRUPT_INJECTION, &[u8::from(ready)]);
        self.run_put(run_off::CR8, &st.sregs.cr8.to_le_bytes());
        self.run_put(run_off::APIC_BASE, &st.sregs.apic_base.to_le_bytes());
    }

    /// Simulator only: let each following KVM_RUN execute at most `n` more
    /// instructions in total before returning EINTR (None: no limit).
    pub fn set_instruction_budget(&self, n: Option<u64>) {
        self.emu.lock().unwrap_or_else(|e| e.into_inner()).budget = n;
    }

    /// KVM_SET_GUEST_DEBUG (kvm_arch_vcpu_ioctl_set_guest_debug).
    pub fn set_guest_debug(&self, control: u32, debugreg: [u64; 8]) -> Result<()> {
        if control & !KVM_GUESTDBG_VALID_MASK != 0 {
            return Err(Errno::EINVAL);
        }
        let mut emu = self.emu.lock().unwrap_or_else(|e| e.into_inner());
        emu.guest_debug = if control & KVM_GUESTDBG_ENABLE != 0 {
            GuestDebug { control, debugreg }
        } else {
            GuestDebug::default()
        };
        Ok(())
    }
}

/// vCPU ioctls of this module; None if `request` is not one of them.
pub fn ioctl(vcpu: &Vcpu, request: u64, arg: u64, ua: &mut dyn UserAccess) -> Option<Result<i64>> {
    match request {
        uapi::KVM_RUN => Some(if arg != 0 {
            Err(Errno::EINVAL)
        } else {
            vcpu.run()
        }),
        uapi::KVM_SET_GUEST_DEBUG => Some((|| {
            // struct kvm_guest_debug: control, pad, arch.debugreg[8].
            let mut raw = [0u8; 72];
            ua.copy_from_user(arg, &mut raw)?;
            let word = |o: usize| u64::from_le_bytes(raw[o..o + 8].try_into().unwrap_or([0; 8]));
            let control = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
            vcpu.set_guest_debug(control, std::array::from_fn(|i| word(8 + 8 * i)))?;
            Ok(0)
        })()),
        _ => None,
    }
}
