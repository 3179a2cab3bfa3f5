//! The simulated vCPU: an x86 interpreter over the MMU model.
//!
//! The simulator models a CPU that runs guest code natively on KVM's shadow (or TDP)
//! tables: every instruction fetch and data access goes through
//! [`Vcpu::access_locked`], so SPTEs act as the TLB, faults take KVM's fault path,
//! A/D bits, unsync pages, dirty logging and MMIO happen there. This module decodes
//! (iced-x86) and executes; KVM_RUN (vcpu/run.rs) drives it in batches.
//!
//! An instruction either completes, raises an exception (its register effects are
//! undone from a snapshot, then the exception is delivered through the IVT/IDT), or
//! stops for userspace: an MMIO or PIO read stops before the instruction completes
//! and runs it again on the next KVM_RUN with the data userspace supplied (KVM's
//! emulator does the same); writes complete and exit afterwards.

mod alu;
mod decode;
mod exception;
mod ops_basic;
mod ops_flow;
mod ops_string;
mod segment;
mod step;
mod system;

use std::collections::VecDeque;

use iced_x86::{Instruction, OpKind, Register};

use crate::errno::Errno;
use crate::paging::WalkError;
use crate::vm::VmState;

use super::guest_ops::{AccessKind, AccessOutcome};
use super::{Vcpu, VcpuState};

pub use alu::flags;
pub use decode::DecodeCache;
pub use segment::{flat_segment, SegReg};
pub use step::RunStop;
pub use system::{SHADOW_MOV_SS, SHADOW_STI};

/// Exception vectors.
pub mod vector {
    pub const DE: u8 = 0;
    pub const DB: u8 = 1;
    pub const NMI: u8 = 2;
    pub const BP: u8 = 3;
    pub const OF: u8 = 4;
    pub const BR: u8 = 5;
    pub const UD: u8 = 6;
    pub const NM: u8 = 7;
    pub const DF: u8 = 8;
    pub const TS: u8 = 10;
    pub const NP: u8 = 11;
    pub const SS: u8 = 12;
    pub const GP: u8 = 13;
    pub const PF: u8 = 14;
    pub const MF: u8 = 16;
    pub const AC: u8 = 17;
    pub const MC: u8 = 18;
}

/// Why KVM_RUN returns to userspace (the kvm_run exit it fills).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// KVM_EXIT_IO: one access of `size` bytes, `count` times; OUT data in `data`.
    Io {
        port: u16,
        size: u8,
        input: bool,
        count: u32,
        data: [u8; 8],
    },
    /// KVM_EXIT_MMIO: one fragment of at most 8 bytes.
    Mmio {
        gpa: u64,
        len: u32,
        write: bool,
        data: [u8; 8],
    },
    Hlt,
    Shutdown,
    /// KVM_EXIT_INTERNAL_ERROR / KVM_INTERNAL_ERROR_EMULATION with the fetched bytes.
    Emulation {
        bytes: [u8; 15],
        len: u8,
    },
    /// KVM_EXIT_DEBUG.
    Debug {
        exception: u32,
        pc: u64,
        /// Written only when KVM writes them for this kind of exit.
        dr6: Option<u64>,
        dr7: Option<u64>,
    },
    DirtyRingFull,
    /// KVM_EXIT_FAIL_ENTRY with a hardware entry failure reason.
    FailEntry {
        reason: u64,
    },
}

/// An exception raised by an instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exc {
    pub vector: u8,
    pub error_code: Option<u32>,
}

/// How an instruction stops short of completing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    Exc(Exc),
    /// Back to userspace before the instruction completes (it runs again).
    Exit(Exit),
    /// A failure of the model itself (KVM_RUN returns this errno).
    Err(Errno),
}

impl From<Errno> for Stop {
    fn from(e: Errno) -> Stop {
        Stop::Err(e)
    }
}

pub type R<T> = std::result::Result<T, Stop>;

/// `#vector` without an error code.
pub fn exc(vector: u8) -> Stop {
    Stop::Exc(Exc {
        vector,
        error_code: None,
    })
}

/// `#vector(error_code)`.
pub fn exc_ec(vector: u8, error_code: u32) -> Stop {
    Stop::Exc(Exc {
        vector,
        error_code: Some(error_code),
    })
}

pub fn gp0() -> Stop {
    exc_ec(vector::GP, 0)
}

pub fn ud() -> Stop {
    exc(vector::UD)
}

/// A read KVM is waiting on userspace for (the instruction runs again on re-entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PendingRead {
    None,
    /// The fragment at linear address `lin`.
    Mmio {
        lin: u64,
        gpa: u64,
        len: u32,
    },
    Pio {
        port: u16,
        size: u8,
        count: u32,
    },
}

/// KVM_SET_GUEST_DEBUG state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestDebug {
    pub control: u32,
    pub debugreg: [u64; 8],
}

pub const KVM_GUESTDBG_ENABLE: u32 = 0x1;
pub const KVM_GUESTDBG_SINGLESTEP: u32 = 0x2;
pub const KVM_GUESTDBG_USE_SW_BP: u32 = 0x0001_0000;
pub const KVM_GUESTDBG_USE_HW_BP: u32 = 0x0002_0000;
pub const KVM_GUESTDBG_INJECT_DB: u32 = 0x0004_0000;
pub const KVM_GUESTDBG_INJECT_BP: u32 = 0x0008_0000;
pub const KVM_GUESTDBG_BLOCKIRQ: u32 = 0x0010_0000;
/// KVM_GUESTDBG_VALID_MASK on x86.
pub const KVM_GUESTDBG_VALID_MASK: u32 = KVM_GUESTDBG_ENABLE
    | KVM_GUESTDBG_SINGLESTEP
    | KVM_GUESTDBG_USE_SW_BP
    | KVM_GUESTDBG_USE_HW_BP
    | KVM_GUESTDBG_INJECT_DB
    | KVM_GUESTDBG_INJECT_BP
    | KVM_GUESTDBG_BLOCKIRQ;

/// The MSRs of SYSCALL/SYSRET/SWAPGS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallMsrs {
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub kernel_gs_base: u64,
}

/// The interpreter's per-vCPU state that is not architectural.
#[derive(Debug, Default)]
pub struct EmuState {
    pub decode: DecodeCache,
    /// A read exit userspace answers on the next KVM_RUN.
    pub pending_read: Option<PendingRead>,
    /// Data userspace supplied for MMIO read fragments (linear address, gpa,
    /// data), consumed in order by the instruction's rerun without a new
    /// translation (KVM completes the emulated read with it).
    pub mmio_in: VecDeque<(u64, u64, [u8; 8])>,
    /// Data userspace supplied for a port read (size * count bytes).
    pub pio_in: Option<Vec<u8>>,
    /// MMIO write fragments of a completed instruction not yet reported.
    pub mmio_out: VecDeque<(u64, u32, [u8; 8])>,
    /// An OUT/HLT exit owed after the MMIO write fragments of the same instruction.
    pub deferred: Option<Exit>,
    /// Instructions retired: the time base of RDTSC.
    pub retired: u64,
    /// Simulator only: instructions KVM_RUN may still execute before it returns
    /// EINTR as if kicked (bounded runs for fuzzing and tests); None: no limit.
    pub budget: Option<u64>,
    pub guest_debug: GuestDebug,
}

/// One instruction's execution context: the locked vCPU and VM state.
pub struct Cpu<'a> {
    pub vcpu: &'a Vcpu,
    pub st: &'a mut VcpuState,
    pub vm: &'a mut VmState,
    pub emu: &'a mut EmuState,
    /// The GPRs in encoding order (RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15),
    /// loaded from and stored back to `st.regs` by [`Cpu::new`] / [`Cpu::finish`].
    pub gpr: [u64; 16],
    /// RIP of the next instruction (the current one's end unless it branches).
    pub next_rip: u64,
    /// Exit after the current instruction completes (HLT, OUT).
    pub exit_after: Option<Exit>,
    /// The current instruction's bytes as fetched (for the emulation-failure exit).
    pub insn_bytes: [u8; 16],
    pub insn_fetched: u8,
    /// An instruction that sets the interrupt shadow (STI, MOV SS, POP SS).
    pub shadow_set: u8,
}

/// The instruction needs KVM's emulator and the model has none for it.
pub fn unimplemented() -> Stop {
    Stop::Exit(Exit::Emulation {
        bytes: [0; 15],
        len: 0,
    })
}

pub fn size_mask(size: u32) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

pub fn sign_extend(v: u64, size: u32) -> u64 {
    match size {
        1 => v as u8 as i8 as i64 as u64,
        2 => v as u16 as i16 as i64 as u64,
        4 => v as u32 as i32 as i64 as u64,
        _ => v,
    }
}

/// Where an operand lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loc {
    /// GPR index, size in bytes, high-byte register (AH..BH).
    Reg(u8, u32, bool),
    Mem(SegReg, u64, u32),
    Imm(u64),
}

fn gpr_of(r: Register) -> Option<(u8, u32, bool)> {
    let n = r as u32;
    let al = Register::AL as u32;
    let ax = Register::AX as u32;
    let eax = Register::EAX as u32;
    let rax = Register::RAX as u32;
    if (al..al + 20).contains(&n) {
        let i = n - al;
        return Some(match i {
            0..=3 => (i as u8, 1, false),
            4..=7 => ((i - 4) as u8, 1, true),
            _ => ((i - 4) as u8, 1, false),
        });
    }
    if (ax..ax + 16).contains(&n) {
        return Some(((n - ax) as u8, 2, false));
    }
    if (eax..eax + 16).contains(&n) {
        return Some(((n - eax) as u8, 4, false));
    }
    if (rax..rax + 16).contains(&n) {
        return Some(((n - rax) as u8, 8, false));
    }
    None
}

impl<'a> Cpu<'a> {
    pub fn new(
        vcpu: &'a Vcpu,
        st: &'a mut VcpuState,
        vm: &'a mut VmState,
        emu: &'a mut EmuState,
    ) -> Cpu<'a> {
        let r = &st.regs;
        let gpr = [
            r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ];
        Cpu {
            vcpu,
            st,
            vm,
            emu,
            gpr,
            next_rip: 0,
            exit_after: None,
            insn_bytes: [0; 16],
            insn_fetched: 0,
            shadow_set: 0,
        }
    }

    /// Store the GPRs back into the architectural state.
    pub fn finish(&mut self) {
        let g = self.gpr;
        let r = &mut self.st.regs;
        (r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi) =
            (g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]);
        (r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15) =
            (g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]);
    }

    // ---- modes ----

    pub fn protected(&self) -> bool {
        self.st.sregs.cr0 & super::sregs::CR0_PE != 0
    }
    pub fn long_mode(&self) -> bool {
        self.st.sregs.efer & super::sregs::EFER_LMA != 0
    }
    pub fn mode64(&self) -> bool {
        self.long_mode() && self.st.sregs.cs.l != 0
    }
    pub fn v86(&self) -> bool {
        self.protected() && self.st.regs.rflags & flags::VM != 0
    }
    pub fn cpl(&self) -> u8 {
        if !self.protected() {
            0
        } else if self.v86() {
            3
        } else {
            self.st.sregs.ss.dpl & 3
        }
    }
    pub fn iopl(&self) -> u8 {
        ((self.st.regs.rflags >> 12) & 3) as u8
    }
    /// The code size in bits.
    pub fn bitness(&self) -> u32 {
        if self.mode64() {
            64
        } else if self.st.sregs.cs.db != 0 {
            32
        } else {
            16
        }
    }
    /// The stack's address size in bytes.
    pub fn stack_size(&self) -> u32 {
        if self.mode64() {
            8
        } else if self.st.sregs.ss.db != 0 {
            4
        } else {
            2
        }
    }

    // ---- registers ----

    pub fn reg(&self, idx: u8, size: u32, hi: bool) -> u64 {
        let v = self.gpr[usize::from(idx & 15)];
        if hi {
            (v >> 8) & 0xff
        } else {
            v & size_mask(size)
        }
    }

    pub fn set_reg(&mut self, idx: u8, size: u32, hi: bool, value: u64) {
        let r = &mut self.gpr[usize::from(idx & 15)];
        *r = match (size, hi) {
            (1, true) => (*r & !0xff00) | ((value & 0xff) << 8),
            (1, false) => (*r & !0xff) | (value & 0xff),
            (2, _) => (*r & !0xffff) | (value & 0xffff),
            // A 32-bit write zero-extends into the whole register.
            (4, _) => value & 0xffff_ffff,
            _ => value,
        };
    }

    pub fn reg_by_name(&self, r: Register) -> u64 {
        match gpr_of(r) {
            Some((i, s, h)) => self.reg(i, s, h),
            None => 0,
        }
    }

    pub fn set_reg_by_name(&mut self, r: Register, v: u64) {
        if let Some((i, s, h)) = gpr_of(r) {
            self.set_reg(i, s, h, v);
        }
    }

    pub fn rflags(&self) -> u64 {
        self.st.regs.rflags
    }

    pub fn set_arith(&mut self, f: u64) {
        self.st.regs.rflags = (self.st.regs.rflags & !flags::ARITH) | (f & flags::ARITH);
    }

    pub fn flag(&self, f: u64) -> bool {
        self.st.regs.rflags & f != 0
    }

    // ---- operands ----

    /// The size in bytes of operand `i`.
    pub fn op_size(&self, ins: &Instruction, i: u32) -> u32 {
        match ins.op_kind(i) {
            OpKind::Register => ins.op_register(i).size() as u32,
            OpKind::Memory => ins.memory_size().size() as u32,
            OpKind::Immediate8 | OpKind::Immediate8_2nd => 1,
            OpKind::Immediate16 | OpKind::Immediate8to16 => 2,
            OpKind::Immediate32 | OpKind::Immediate8to32 => 4,
            _ => 8,
        }
    }

    /// The effective address of the memory operand (wrapped to the address size).
    pub fn effective_address(&self, ins: &Instruction) -> u64 {
        let base = ins.memory_base();
        let index = ins.memory_index();
        let mut ea = ins.memory_displacement64();
        let mut asize = 0u32;
        if base == Register::RIP || base == Register::EIP {
            // iced gives the absolute target.
            return if base == Register::EIP {
                ea & 0xffff_ffff
            } else {
                ea
            };
        }
        if base != Register::None {
            ea = ea.wrapping_add(self.reg_by_name(base));
            asize = base.size() as u32;
        }
        if index != Register::None {
            let scale = u64::from(ins.memory_index_scale());
            ea = ea.wrapping_add(self.reg_by_name(index).wrapping_mul(scale));
            asize = index.size() as u32;
        }
        if asize == 0 {
            asize = match self.bitness() {
                64 => 8,
                32 => 4,
                _ => {
                    if ins.memory_displ_size() == 4 {
                        4
                    } else {
                        2
                    }
                }
            };
        }
        ea & size_mask(asize)
    }

    pub fn op_loc(&self, ins: &Instruction, i: u32) -> R<Loc> {
        match ins.op_kind(i) {
            OpKind::Register => {
                let r = ins.op_register(i);
                match gpr_of(r) {
                    Some((idx, size, hi)) => Ok(Loc::Reg(idx, size, hi)),
                    None => Err(unimplemented()),
                }
            }
            OpKind::Memory => {
                let seg = SegReg::from_register(ins.memory_segment()).ok_or_else(unimplemented)?;
                Ok(Loc::Mem(
                    seg,
                    self.effective_address(ins),
                    ins.memory_size().size() as u32,
                ))
            }
            _ => match ins.try_immediate(i) {
                Ok(v) => Ok(Loc::Imm(v)),
                Err(_) => Err(unimplemented()),
            },
        }
    }

    pub fn read_loc(&mut self, loc: Loc) -> R<u64> {
        match loc {
            Loc::Reg(i, s, h) => Ok(self.reg(i, s, h)),
            Loc::Mem(seg, off, size) => self.read_mem(seg, off, size),
            Loc::Imm(v) => Ok(v),
        }
    }

    pub fn write_loc(&mut self, loc: Loc, v: u64) -> R<()> {
        match loc {
            Loc::Reg(i, s, h) => {
                self.set_reg(i, s, h, v);
                Ok(())
            }
            Loc::Mem(seg, off, size) => self.write_mem(seg, off, size, v),
            Loc::Imm(_) => Err(ud()),
        }
    }

    pub fn read_op(&mut self, ins: &Instruction, i: u32) -> R<u64> {
        let loc = self.op_loc(ins, i)?;
        self.read_loc(loc)
    }

    // ---- memory ----

    /// The access kind of an ordinary data access at the current CPL.
    pub fn data_kind(&self, write: bool) -> AccessKind {
        AccessKind {
            write,
            fetch: false,
            user: self.cpl() == 3,
            implicit: false,
        }
    }

    /// `size` bytes at offset `off` of segment `seg`.
    pub fn read_mem(&mut self, seg: SegReg, off: u64, size: u32) -> R<u64> {
        let lin = self.linearize(seg, off, size, false)?;
        let mut b = [0u8; 8];
        let n = size.min(8) as usize;
        self.read_lin(lin, &mut b[..n], self.data_kind(false))?;
        Ok(u64::from_le_bytes(b))
    }

    pub fn write_mem(&mut self, seg: SegReg, off: u64, size: u32, v: u64) -> R<()> {
        let lin = self.linearize(seg, off, size, true)?;
        let n = size.min(8) as usize;
        let b = v.to_le_bytes();
        self.write_lin(lin, &b[..n], self.data_kind(true))
    }

    /// A read of linear memory through the MMU (MMIO: the data of an earlier exit, or
    /// a new exit).
    pub fn read_lin(&mut self, lin: u64, buf: &mut [u8], kind: AccessKind) -> R<()> {
        self.access_lin(lin, buf, kind, true)
    }

    pub fn write_lin(&mut self, lin: u64, buf: &[u8], kind: AccessKind) -> R<()> {
        let mut tmp = [0u8; 16];
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(16);
            tmp[..n].copy_from_slice(&buf[done..done + n]);
            self.access_lin(lin.wrapping_add(done as u64), &mut tmp[..n], kind, true)?;
            done += n;
        }
        Ok(())
    }

    /// One access, page by page; `ptw`: KVM's emulator flags the instruction as
    /// page-table writing (a write-protected gpte write is emulated, not retried).
    pub fn access_lin(&mut self, lin: u64, buf: &mut [u8], kind: AccessKind, ptw: bool) -> R<()> {
        let lin = if self.long_mode() {
            lin
        } else {
            lin & 0xffff_ffff
        };
        let mut done = 0usize;
        while done < buf.len() {
            let addr = lin.wrapping_add(done as u64);
            let addr = if self.long_mode() {
                addr
            } else {
                addr & 0xffff_ffff
            };
            let n = (buf.len() - done).min(4096 - (addr & 0xfff) as usize);
            let chunk = &mut buf[done..done + n];
            if !kind.write && self.emu.mmio_in.front().is_some_and(|f| f.0 == addr) {
                self.mmio_completed(addr, chunk)?;
                done += n;
                continue;
            }
            let out = self
                .vcpu
                .access_locked(self.st, self.vm, addr, chunk, kind, ptw)?;
            match out {
                AccessOutcome::Done => {}
                AccessOutcome::Mmio { gpa } => self.mmio(addr, gpa, chunk, kind.write)?,
                AccessOutcome::Fault(e) => return Err(walk_fault(e)),
                AccessOutcome::DirtyRingFull => return Err(Stop::Exit(Exit::DirtyRingFull)),
            }
            done += n;
        }
        Ok(())
    }

    /// An access that reached no memory: KVM's emulated MMIO, in fragments of 8 bytes.
    fn mmio(&mut self, lin: u64, gpa: u64, chunk: &mut [u8], write: bool) -> R<()> {
        if !write {
            let len = chunk.len().min(8) as u32;
            self.emu.pending_read = Some(PendingRead::Mmio { lin, gpa, len });
            return Err(Stop::Exit(Exit::Mmio {
                gpa,
                len,
                write: false,
                data: [0; 8],
            }));
        }
        for (i, frag) in chunk.chunks(8).enumerate() {
            let mut d = [0u8; 8];
            d[..frag.len()].copy_from_slice(frag);
            let gpa = gpa.wrapping_add(8 * i as u64);
            self.emu.mmio_out.push_back((gpa, frag.len() as u32, d));
        }
        Ok(())
    }

    /// The rerun of a read that exited: the data userspace gave, fragment by
    /// fragment; a fragment still missing is the next exit.
    fn mmio_completed(&mut self, lin: u64, chunk: &mut [u8]) -> R<()> {
        let Some(&(_, gpa0, _)) = self.emu.mmio_in.front() else {
            return Ok(());
        };
        let len = chunk.len();
        for (i, frag) in chunk.chunks_mut(8).enumerate() {
            let flin = lin.wrapping_add(8 * i as u64);
            match self.emu.mmio_in.front() {
                Some(&(l, _, d)) if l == flin => {
                    frag.copy_from_slice(&d[..frag.len()]);
                    self.emu.mmio_in.pop_front();
                }
                _ => {
                    let gpa = gpa0.wrapping_add(8 * i as u64);
                    let n = (len - 8 * i).min(8) as u32;
                    self.emu.pending_read = Some(PendingRead::Mmio {
                        lin: flin,
                        gpa,
                        len: n,
                    });
                    return Err(Stop::Exit(Exit::Mmio {
                        gpa,
                        len: n,
                        write: false,
                        data: [0; 8],
                    }));
                }
            }
        }
        Ok(())
    }

    // ---- stack ----

    pub fn sp_mask(&self) -> u64 {
        size_mask(self.stack_size())
    }

    pub fn push(&mut self, v: u64, size: u32) -> R<()> {
        let mask = self.sp_mask();
        let sp = self.gpr[4].wrapping_sub(u64::from(size)) & mask;
        self.write_mem(SegReg::Ss, sp, size, v)?;
        self.gpr[4] = (self.gpr[4] & !mask) | sp;
        Ok(())
    }

    pub fn pop(&mut self, size: u32) -> R<u64> {
        let mask = self.sp_mask();
        let sp = self.gpr[4] & mask;
        let v = self.read_mem(SegReg::Ss, sp, size)?;
        self.gpr[4] = (self.gpr[4] & !mask) | (sp.wrapping_add(u64::from(size)) & mask);
        Ok(v)
    }

    /// Read at `sp + delta` of the stack without popping.
    pub fn peek(&mut self, delta: u64, size: u32) -> R<u64> {
        let sp = self.gpr[4].wrapping_add(delta) & self.sp_mask();
        self.read_mem(SegReg::Ss, sp, size)
    }
}

/// The fault a walk reports, as an exception.
pub fn walk_fault(e: WalkError) -> Stop {
    exc_ec(e.vector(), e.error_code())
}
