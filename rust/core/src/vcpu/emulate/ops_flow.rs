//! Control flow: JMP, Jcc, CALL, RET (near and far), LOOP/JCXZ, ENTER/LEAVE,
//! INT n/INT3/INTO/INT1 and IRET.

use iced_x86::{Code, Instruction, Mnemonic, OpKind};

use super::alu::flags::*;
use super::exception::EventKind;
use super::segment::{real_segment, SegReg};
use super::{exc_ec, gp0, size_mask, vector, Cpu, Exc, Exit, Stop, R};

impl Cpu<'_> {
    /// The checks of a new RIP in the current code segment.
    pub fn check_branch(&self, target: u64) -> R<()> {
        if self.mode64() {
            let la57 = self.st.sregs.cr4 & crate::vcpu::sregs::CR4_LA57 != 0;
            if !crate::paging::is_canonical(target, la57) {
                return Err(gp0());
            }
        } else if target > u64::from(self.st.sregs.cs.limit) {
            return Err(gp0());
        }
        Ok(())
    }

    fn near_target(&mut self, ins: &Instruction) -> R<u64> {
        match ins.op0_kind() {
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                Ok(ins.near_branch_target())
            }
            _ => {
                let size = self.op_size(ins, 0);
                Ok(self.read_op(ins, 0)? & size_mask(size))
            }
        }
    }

    /// The operand size of a near/far transfer from its stack increment.
    fn branch_size(&self, ins: &Instruction) -> u32 {
        match ins.code() {
            Code::Retnw
            | Code::Retnw_imm16
            | Code::Retfw
            | Code::Retfw_imm16
            | Code::Iretw
            | Code::Enterw_imm16_imm8
            | Code::Leavew => 2,
            Code::Retnd
            | Code::Retnd_imm16
            | Code::Retfd
            | Code::Retfd_imm16
            | Code::Iretd
            | Code::Enterd_imm16_imm8
            | Code::Leaved => 4,
            Code::Retnq
            | Code::Retnq_imm16
            | Code::Retfq
            | Code::Retfq_imm16
            | Code::Iretq
            | Code::Enterq_imm16_imm8
            | Code::Leaveq => 8,
            _ => {
                let inc = ins.stack_pointer_increment().unsigned_abs();
                if inc == 0 {
                    self.bitness() / 8
                } else {
                    inc
                }
            }
        }
    }

    pub fn exec_flow(&mut self, ins: &Instruction) -> Option<R<()>> {
        use Mnemonic as M;
        Some(match ins.mnemonic() {
            M::Jmp => match ins.op0_kind() {
                OpKind::FarBranch16 | OpKind::FarBranch32 => {
                    let off = if ins.op0_kind() == OpKind::FarBranch16 {
                        u64::from(ins.far_branch16())
                    } else {
                        u64::from(ins.far_branch32())
                    };
                    self.far_jump(ins.far_branch_selector(), off, false, 0)
                }
                OpKind::Memory if is_far_mem(ins) => self.far_mem(ins, false),
                _ => self.near_target(ins).and_then(|t| {
                    self.check_branch(t)?;
                    self.next_rip = t;
                    Ok(())
                }),
            },
            M::Call => match ins.op0_kind() {
                OpKind::FarBranch16 | OpKind::FarBranch32 => {
                    let (off, size) = if ins.op0_kind() == OpKind::FarBranch16 {
                        (u64::from(ins.far_branch16()), 2)
                    } else {
                        (u64::from(ins.far_branch32()), 4)
                    };
                    self.far_jump(ins.far_branch_selector(), off, true, size)
                }
                OpKind::Memory if is_far_mem(ins) => self.far_mem(ins, true),
                _ => self.near_target(ins).and_then(|t| {
                    self.check_branch(t)?;
                    let size = self.branch_size(ins);
                    self.push(self.next_rip, size)?;
                    self.next_rip = t;
                    Ok(())
                }),
            },
            M::Ret => (|| {
                let size = self.branch_size(ins);
                let extra = if ins.op_count() > 0 {
                    u64::from(ins.immediate16())
                } else {
                    0
                };
                let t = self.peek(0, size)? & size_mask(size);
                self.check_branch(t)?;
                self.pop(size)?;
                let m = self.sp_mask();
                self.gpr[4] = (self.gpr[4] & !m) | (self.gpr[4].wrapping_add(extra) & m);
                self.next_rip = t;
                Ok(())
            })(),
            M::Retf => self.far_ret(ins),
            M::Loop | M::Loope | M::Loopne | M::Jcxz | M::Jecxz | M::Jrcxz => {
                let csize = counter_size(ins.code());
                let mut c = self.reg(1, csize, false);
                let take = if matches!(ins.mnemonic(), M::Jcxz | M::Jecxz | M::Jrcxz) {
                    c == 0
                } else {
                    c = c.wrapping_sub(1) & size_mask(csize);
                    let zf = self.flag(ZF);
                    c != 0
                        && match ins.mnemonic() {
                            M::Loope => zf,
                            M::Loopne => !zf,
                            _ => true,
                        }
                };
                let t = ins.near_branch_target();
                if take {
                    if let Err(e) = self.check_branch(t) {
                        return Some(Err(e));
                    }
                }
                if !matches!(ins.mnemonic(), M::Jcxz | M::Jecxz | M::Jrcxz) {
                    self.set_reg(1, csize, false, c);
                }
                if take {
                    self.next_rip = t;
                }
                Ok(())
            }
            M::Enter => self.enter(ins),
            M::Leave => (|| {
                let size = self.branch_size(ins);
                let m = self.sp_mask();
                let bp = self.gpr[5] & m;
                let v = self.read_mem(SegReg::Ss, bp, size)?;
                self.gpr[4] = (self.gpr[4] & !m) | (bp.wrapping_add(u64::from(size)) & m);
                self.set_reg(5, size, false, v);
                Ok(())
            })(),
            M::Int => self.soft_int(ins.immediate8(), EventKind::Soft),
            M::Int3 => {
                if self.emu.guest_debug.control & super::KVM_GUESTDBG_USE_SW_BP != 0 {
                    let pc = self.st.sregs.cs.base.wrapping_add(self.st.regs.rip);
                    return Some(Err(Stop::Exit(Exit::Debug {
                        exception: 3,
                        pc,
                        dr6: None,
                        dr7: None,
                    })));
                }
                self.soft_int(vector::BP, EventKind::Soft)
            }
            M::Into => {
                if self.mode64() {
                    Err(super::ud())
                } else if self.flag(OF) {
                    self.soft_int(vector::OF, EventKind::Soft)
                } else {
                    Ok(())
                }
            }
            M::Int1 => self.soft_int(vector::DB, EventKind::PrivSoft),
            M::Iret | M::Iretd | M::Iretq => self.iret(ins),
            m if ins.is_jcc_short_or_near() || m == M::Jmpe => {
                if self.cond(ins.condition_code()) {
                    let t = ins.near_branch_target();
                    if let Err(e) = self.check_branch(t) {
                        return Some(Err(e));
                    }
                    self.next_rip = t;
                }
                Ok(())
            }
            _ => return None,
        })
    }

    fn soft_int(&mut self, vec: u8, kind: EventKind) -> R<()> {
        let rip = self.next_rip;
        // A fault here is the INT instruction's (reported at its address).
        self.deliver(vec, None, rip, kind).map_err(|e| match e {
            Stop::Exc(x) => Stop::Exc(Exc { ..x }),
            o => o,
        })
    }

    fn enter(&mut self, ins: &Instruction) -> R<()> {
        let size = self.branch_size(ins);
        let alloc = u64::from(ins.immediate16());
        let level = u64::from(ins.immediate8_2nd() & 31);
        let m = self.sp_mask();
        let sp0 = self.gpr[4];
        let bp0 = self.gpr[5];
        let res = (|| {
            self.push(bp0, size)?;
            let frame = self.gpr[4] & m;
            let mut bp = bp0 & m;
            if level > 0 {
                for _ in 1..level {
                    bp = bp.wrapping_sub(u64::from(size)) & m;
                    let v = self.read_mem(SegReg::Ss, bp, size)?;
                    self.push(v, size)?;
                }
                self.push(frame, size)?;
            }
            let sp = (self.gpr[4] & m).wrapping_sub(alloc) & m;
            // The new stack top must be writable (#SS/#PF before any change).
            self.read_mem(SegReg::Ss, sp, 1)?;
            self.gpr[4] = (self.gpr[4] & !m) | sp;
            self.set_reg(5, size.max(2), false, frame);
            Ok(())
        })();
        if res.is_err() {
            self.gpr[4] = sp0;
            self.gpr[5] = bp0;
        }
        res
    }

    /// JMP/CALL m16:16/32/64.
    fn far_mem(&mut self, ins: &Instruction, call: bool) -> R<()> {
        let total = ins.memory_size().size() as u32;
        let osize = total - 2;
        let seg = SegReg::from_register(ins.memory_segment()).ok_or_else(super::unimplemented)?;
        let ea = self.effective_address(ins);
        let off = self.read_mem(seg, ea, osize)?;
        let sel = self.read_mem(seg, ea.wrapping_add(u64::from(osize)), 2)? as u16;
        self.far_jump(sel, off, call, osize)
    }

    /// Push a far CALL's return CS:IP; on a fault the stack pointer is as before.
    fn push_far_return(&mut self, cs: u64, ip: u64, size: u32) -> R<()> {
        let sp0 = self.gpr[4];
        let r = self.push(cs, size).and_then(|_| self.push(ip, size));
        if r.is_err() {
            self.gpr[4] = sp0;
        }
        r
    }

    /// A far JMP or CALL to a code segment at the current privilege (call gates and
    /// task switches are not modelled: emulation failure).
    fn far_jump(&mut self, sel: u16, off: u64, call: bool, size: u32) -> R<()> {
        let ret_cs = u64::from(self.st.sregs.cs.selector);
        let ret_ip = self.next_rip;
        if !self.protected() || self.v86() {
            if off > u64::from(self.st.sregs.cs.limit) {
                return Err(gp0());
            }
            if call {
                self.push_far_return(ret_cs, ret_ip, size)?;
            }
            let old = self.st.sregs.cs;
            self.st.sregs.cs = real_segment(&old, sel);
            self.next_rip = off;
            self.emu.decode.invalidate_code();
            return Ok(());
        }
        let cpl = self.cpl();
        // A system descriptor (call gate, TSS, task gate) needs what is not modelled.
        if let Some(d) = self.read_descriptor(sel, false)? {
            if !d.s() {
                return Err(self.emulation_failure());
            }
        }
        let d = self.code_descriptor(sel, cpl, false)?;
        let limit = u64::from(d.limit());
        if !(self.long_mode() && d.l()) && off > limit {
            return Err(gp0());
        }
        if call {
            self.push_far_return(ret_cs, ret_ip, size)?;
        }
        self.set_cs(sel, &d, cpl)?;
        self.next_rip = off;
        self.emu.decode.invalidate_code();
        Ok(())
    }

    fn far_ret(&mut self, ins: &Instruction) -> R<()> {
        let size = self.branch_size(ins);
        let extra = if ins.op_count() > 0 {
            u64::from(ins.immediate16())
        } else {
            0
        };
        let ip = self.peek(0, size)? & size_mask(size);
        let sel = self.peek(u64::from(size), size)? as u16;
        let m = self.sp_mask();
        if !self.protected() || self.v86() {
            if ip > u64::from(self.st.sregs.cs.limit) {
                return Err(gp0());
            }
            let sp = self.gpr[4].wrapping_add(2 * u64::from(size) + extra) & m;
            self.gpr[4] = (self.gpr[4] & !m) | sp;
            let old = self.st.sregs.cs;
            self.st.sregs.cs = real_segment(&old, sel);
            self.next_rip = ip;
            self.emu.decode.invalidate_code();
            return Ok(());
        }
        let cpl = self.cpl();
        let rpl = (sel & 3) as u8;
        if rpl < cpl {
            return Err(exc_ec(vector::GP, u32::from(sel & !3)));
        }
        let d = self.code_descriptor(sel, rpl, true)?;
        if rpl > cpl {
            // Return to an outer level: SS:ESP follow.
            let base = 2 * u64::from(size) + extra;
            let new_sp = self.peek(base, size)?;
            let new_ss = self.peek(base + u64::from(size), size)? as u16;
            self.set_cs(sel, &d, rpl)?;
            // The checks of the new SS run at the new CPL.
            let saved_ss = self.st.sregs.ss;
            self.st.sregs.ss.dpl = rpl;
            if let Err(e) = self.load_data_segment(SegReg::Ss, new_ss) {
                self.st.sregs.ss = saved_ss;
                return Err(e);
            }
            self.gpr[4] = new_sp.wrapping_add(extra) & size_mask(self.stack_size());
            self.null_outer_segments(rpl);
        } else {
            self.set_cs(sel, &d, cpl)?;
            let sp = self.gpr[4].wrapping_add(2 * u64::from(size) + extra) & m;
            self.gpr[4] = (self.gpr[4] & !m) | sp;
        }
        self.next_rip = ip;
        self.emu.decode.invalidate_code();
        Ok(())
    }

    /// After a return to an outer privilege level, data segments the new CPL may
    /// not use are nulled.
    fn null_outer_segments(&mut self, cpl: u8) {
        for s in [SegReg::Es, SegReg::Ds, SegReg::Fs, SegReg::Gs] {
            let seg = *self.seg(s);
            let conforming_code = seg.type_ & 0xc == 0xc;
            if seg.unusable == 0 && !conforming_code && seg.dpl < cpl {
                *self.seg_mut(s) = super::segment::null_segment(0);
            }
        }
    }

    fn iret(&mut self, ins: &Instruction) -> R<()> {
        let size = self.branch_size(ins);
        let m = self.sp_mask();
        let ip = self.peek(0, size)? & size_mask(size);
        let sel = self.peek(u64::from(size), size)? as u16;
        let fl = self.peek(2 * u64::from(size), size)?;
        self.st.events.nmi_masked = false;
        self.emu.decode.invalidate_code();
        if !self.protected() {
            if ip > u64::from(self.st.sregs.cs.limit) {
                return Err(gp0());
            }
            let sp = self.gpr[4].wrapping_add(3 * u64::from(size)) & m;
            self.gpr[4] = (self.gpr[4] & !m) | sp;
            let old = self.st.sregs.cs;
            self.st.sregs.cs = real_segment(&old, sel);
            self.popf(fl, size);
            self.next_rip = ip;
            return Ok(());
        }
        if self.v86() || self.flag(NT) || (fl & VM != 0 && self.cpl() == 0 && size == 4) {
            // Task returns and virtual-8086 mode are not modelled.
            return Err(self.emulation_failure());
        }
        let cpl = self.cpl();
        let rpl = (sel & 3) as u8;
        if rpl < cpl {
            return Err(exc_ec(vector::GP, u32::from(sel & !3)));
        }
        let d = self.code_descriptor(sel, rpl, true)?;
        let outer = rpl > cpl || self.mode64();
        let mut new_sp = 0;
        let mut new_ss = 0u16;
        if outer {
            new_sp = self.peek(3 * u64::from(size), size)?;
            new_ss = self.peek(4 * u64::from(size), size)? as u16;
        }
        let target_long = self.long_mode() && d.l();
        if !target_long && ip > u64::from(d.limit()) {
            return Err(gp0());
        }
        let saved = self.st.sregs;
        let saved_fl = self.rflags();
        // Flags follow POPF's rules at the old CPL.
        self.popf(fl, size);
        self.set_cs(sel, &d, rpl).inspect_err(|_| {
            self.st.sregs = saved;
            self.st.regs.rflags = saved_fl;
        })?;
        if outer {
            self.st.sregs.ss.dpl = rpl;
            let r = if new_ss & !3 == 0 && self.long_mode() && rpl < 3 && d.l() {
                let mut ss = super::segment::null_segment(new_ss);
                ss.dpl = rpl;
                ss.db = 1;
                self.st.sregs.ss = ss;
                Ok(())
            } else {
                self.load_data_segment(SegReg::Ss, new_ss)
            };
            if let Err(e) = r {
                self.st.sregs = saved;
                self.st.regs.rflags = saved_fl;
                return Err(e);
            }
            self.gpr[4] = new_sp & size_mask(if target_long { 8 } else { self.stack_size() });
            if rpl > cpl {
                self.null_outer_segments(rpl);
            }
        } else {
            let sp = self.gpr[4].wrapping_add(3 * u64::from(size)) & m;
            self.gpr[4] = (self.gpr[4] & !m) | sp;
        }
        self.next_rip = ip;
        Ok(())
    }
}

fn is_far_mem(ins: &Instruction) -> bool {
    matches!(
        ins.code(),
        Code::Jmp_m1616
            | Code::Jmp_m1632
            | Code::Jmp_m1664
            | Code::Call_m1616
            | Code::Call_m1632
            | Code::Call_m1664
    )
}

/// The counter register's size of LOOP/JCXZ (the address size).
fn counter_size(c: Code) -> u32 {
    use Code as C;
    match c {
        C::Loop_rel8_16_CX
        | C::Loop_rel8_32_CX
        | C::Loope_rel8_16_CX
        | C::Loope_rel8_32_CX
        | C::Loopne_rel8_16_CX
        | C::Loopne_rel8_32_CX
        | C::Jcxz_rel8_16
        | C::Jcxz_rel8_32 => 2,
        C::Loop_rel8_16_RCX
        | C::Loop_rel8_64_RCX
        | C::Loope_rel8_16_RCX
        | C::Loope_rel8_64_RCX
        | C::Loopne_rel8_16_RCX
        | C::Loopne_rel8_64_RCX
        | C::Jrcxz_rel8_16
        | C::Jrcxz_rel8_64 => 8,
        _ => 4,
    }
}
