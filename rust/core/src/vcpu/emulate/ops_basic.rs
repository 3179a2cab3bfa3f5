//! Instruction dispatch, data movement, arithmetic, logic, shifts and bit operations.

use iced_x86::{Code, ConditionCode, Instruction, Mnemonic, OpKind, Register};

use super::alu::{self, flags::*, Shift};
use super::{exc, sign_extend, size_mask, ud, unimplemented, vector, Cpu, Loc, R};

impl Cpu<'_> {
    /// Execute one decoded instruction (RIP already points at its end in `next_rip`).
    pub fn exec(&mut self, ins: &Instruction) -> R<()> {
        use Mnemonic as M;
        if ins.is_jcc_short_or_near() {
            if self.cond(ins.condition_code()) {
                let t = ins.near_branch_target();
                self.check_branch(t)?;
                self.next_rip = t;
            }
            return Ok(());
        }
        if ins.has_lock_prefix() && !ins.op0_kind().eq(&OpKind::Memory) {
            return Err(ud());
        }
        match ins.mnemonic() {
            M::Mov => self.op_mov(ins),
            M::Movzx => {
                let v = self.read_op(ins, 1)?;
                let d = self.op_loc(ins, 0)?;
                self.write_loc(d, v)
            }
            M::Movsx | M::Movsxd => {
                let s = self.op_size(ins, 1);
                let v = sign_extend(self.read_op(ins, 1)?, s);
                let d = self.op_loc(ins, 0)?;
                self.write_loc(d, v)
            }
            M::Lea => {
                let ea = self.effective_address(ins);
                let d = self.op_loc(ins, 0)?;
                self.write_loc(d, ea)
            }
            M::Xchg => {
                let a = self.op_loc(ins, 0)?;
                let b = self.op_loc(ins, 1)?;
                let va = self.read_loc(a)?;
                let vb = self.read_loc(b)?;
                // Memory first: a fault leaves the register alone.
                if matches!(b, Loc::Mem(..)) {
                    self.write_loc(b, va)?;
                    self.write_loc(a, vb)
                } else {
                    self.write_loc(a, vb)?;
                    self.write_loc(b, va)
                }
            }
            M::Cmpxchg => {
                let size = self.op_size(ins, 0);
                let d = self.op_loc(ins, 0)?;
                let dv = self.read_loc(d)?;
                let src = self.read_op(ins, 1)?;
                let acc = self.reg(0, size, false);
                let (_, f) = alu::sub(acc, dv, false, size);
                if f & ZF != 0 {
                    self.write_loc(d, src)?;
                } else {
                    // The destination is written back unchanged (a locked RMW).
                    self.write_loc(d, dv)?;
                    self.set_reg(0, size, false, dv);
                }
                self.set_arith(f);
                Ok(())
            }
            M::Xadd => {
                let size = self.op_size(ins, 0);
                let d = self.op_loc(ins, 0)?;
                let s = self.op_loc(ins, 1)?;
                let dv = self.read_loc(d)?;
                let sv = self.read_loc(s)?;
                let (r, f) = alu::add(dv, sv, false, size);
                self.write_loc(d, r)?;
                self.write_loc(s, dv)?;
                if let (Loc::Reg(a, ..), Loc::Reg(b, ..)) = (d, s) {
                    if a == b {
                        self.write_loc(d, r)?;
                    }
                }
                self.set_arith(f);
                Ok(())
            }
            M::Push => {
                let size = (-ins.stack_pointer_increment()) as u32;
                let v = match ins.op0_kind() {
                    OpKind::Register if ins.op0_register().is_segment_register() => {
                        let s = super::SegReg::from_register(ins.op0_register())
                            .ok_or_else(unimplemented)?;
                        u64::from(self.seg(s).selector)
                    }
                    _ => self.read_op(ins, 0)?,
                };
                self.push(v, size)
            }
            M::Pop => {
                let size = ins.stack_pointer_increment() as u32;
                if ins.op0_kind() == OpKind::Register && ins.op0_register().is_segment_register() {
                    let s = super::SegReg::from_register(ins.op0_register())
                        .ok_or_else(unimplemented)?;
                    let v = self.peek(0, size)?;
                    self.load_data_segment(s, v as u16)?;
                    self.pop(size)?;
                    if s == super::SegReg::Ss {
                        self.shadow_set = super::SHADOW_MOV_SS;
                    }
                    return Ok(());
                }
                let v = self.peek(0, size)?;
                let old_sp = self.gpr[4];
                self.pop(size)?;
                let d = self.op_loc(ins, 0)?;
                if let Err(e) = self.write_loc(d, v) {
                    self.gpr[4] = old_sp;
                    return Err(e);
                }
                Ok(())
            }
            M::Pusha | M::Pushad => {
                let size = if ins.mnemonic() == M::Pusha { 2 } else { 4 };
                let sp0 = self.gpr[4];
                for i in 0..8u8 {
                    let v = if i == 4 {
                        sp0
                    } else {
                        self.gpr[usize::from(i)]
                    };
                    if let Err(e) = self.push(v, size) {
                        self.gpr[4] = sp0;
                        return Err(e);
                    }
                }
                Ok(())
            }
            M::Popa | M::Popad => {
                let size = if ins.mnemonic() == M::Popa { 2 } else { 4 };
                let mut vals = [0u64; 8];
                for (k, v) in vals.iter_mut().enumerate() {
                    *v = self.peek(u64::from(size) * k as u64, size)?;
                }
                let m = self.sp_mask();
                let sp = self.gpr[4].wrapping_add(8 * u64::from(size)) & m;
                for (k, v) in vals.iter().enumerate() {
                    let reg = 7 - k as u8;
                    if reg != 4 {
                        self.set_reg(reg, size, false, *v);
                    }
                }
                self.gpr[4] = (self.gpr[4] & !m) | sp;
                Ok(())
            }
            M::Pushf | M::Pushfd | M::Pushfq => {
                if self.v86() && self.iopl() < 3 {
                    return Err(super::gp0());
                }
                let size = (-ins.stack_pointer_increment()) as u32;
                let v = self.rflags() & !(VM | RF);
                self.push(v, size)
            }
            M::Popf | M::Popfd | M::Popfq => {
                if self.v86() && self.iopl() < 3 {
                    return Err(super::gp0());
                }
                let size = ins.stack_pointer_increment() as u32;
                let v = self.pop(size)?;
                self.popf(v, size);
                Ok(())
            }
            M::Add | M::Or | M::Adc | M::Sbb | M::And | M::Sub | M::Xor | M::Cmp | M::Test => {
                self.op_alu(ins)
            }
            M::Inc | M::Dec => {
                let size = self.op_size(ins, 0);
                let d = self.op_loc(ins, 0)?;
                let v = self.read_loc(d)?;
                let (r, f) = if ins.mnemonic() == M::Inc {
                    alu::add(v, 1, false, size)
                } else {
                    alu::sub(v, 1, false, size)
                };
                self.write_loc(d, r)?;
                // CF is kept.
                self.set_arith((f & !CF) | (self.rflags() & CF));
                Ok(())
            }
            M::Neg => {
                let size = self.op_size(ins, 0);
                let d = self.op_loc(ins, 0)?;
                let v = self.read_loc(d)?;
                let (r, f) = alu::sub(0, v, false, size);
                self.write_loc(d, r)?;
                self.set_arith(f);
                Ok(())
            }
            M::Not => {
                let size = self.op_size(ins, 0);
                let d = self.op_loc(ins, 0)?;
                let v = self.read_loc(d)?;
                self.write_loc(d, !v & size_mask(size))
            }
            M::Mul | M::Imul | M::Div | M::Idiv => self.op_muldiv(ins),
            M::Rol | M::Ror | M::Rcl | M::Rcr | M::Shl | M::Sal | M::Shr | M::Sar => {
                self.op_shift(ins)
            }
            M::Shld | M::Shrd => {
                let size = self.op_size(ins, 0);
                let d = self.op_loc(ins, 0)?;
                let dv = self.read_loc(d)?;
                let sv = self.read_op(ins, 1)?;
                let c = self.read_op(ins, 2)? as u32 & if size == 8 { 63 } else { 31 };
                if let Some((r, f)) = alu::double_shift(ins.mnemonic() == M::Shld, dv, sv, c, size)
                {
                    self.write_loc(d, r)?;
                    self.set_arith(f);
                }
                Ok(())
            }
            M::Bt | M::Bts | M::Btr | M::Btc => self.op_bt(ins),
            M::Bsf | M::Bsr => {
                let size = self.op_size(ins, 0);
                let v = self.read_op(ins, 1)? & size_mask(size);
                if v == 0 {
                    // Destination unchanged (as hardware does), ZF set.
                    self.set_arith((self.rflags() & !ZF) | ZF);
                    return Ok(());
                }
                let r = if ins.mnemonic() == M::Bsf {
                    u64::from(v.trailing_zeros())
                } else {
                    63 - u64::from(v.leading_zeros())
                };
                let d = self.op_loc(ins, 0)?;
                self.write_loc(d, r)?;
                self.set_arith(self.rflags() & !ZF);
                Ok(())
            }
            M::Cmpxchg8b | M::Cmpxchg16b => {
                // EDX:EAX (RDX:RAX) against the memory; equal: ZF=1 and ECX:EBX stored,
                // else ZF=0 and the memory loaded into EDX:EAX (also written back).
                let half = if ins.mnemonic() == M::Cmpxchg16b {
                    8
                } else {
                    4
                };
                let Loc::Mem(seg, ea, _) = self.op_loc(ins, 0)? else {
                    return Err(ud());
                };
                if half == 8 && ea & 15 != 0 {
                    return Err(super::gp0());
                }
                let lo = self.read_mem(seg, ea, half)?;
                let hi = self.read_mem(seg, ea.wrapping_add(u64::from(half)), half)?;
                let (al, ah) = (self.reg(0, half, false), self.reg(2, half, false));
                let f = self.rflags() & !ZF;
                if lo == al && hi == ah {
                    let (bl, ch) = (self.reg(3, half, false), self.reg(1, half, false));
                    self.write_mem(seg, ea, half, bl)?;
                    self.write_mem(seg, ea.wrapping_add(u64::from(half)), half, ch)?;
                    self.st.regs.rflags = f | ZF;
                } else {
                    self.write_mem(seg, ea, half, lo)?;
                    self.write_mem(seg, ea.wrapping_add(u64::from(half)), half, hi)?;
                    self.set_reg(0, half, false, lo);
                    self.set_reg(2, half, false, hi);
                    self.st.regs.rflags = f;
                }
                Ok(())
            }
            M::Popcnt | M::Lzcnt | M::Tzcnt => {
                let size = self.op_size(ins, 0);
                let v = self.read_op(ins, 1)? & size_mask(size);
                let bits = size * 8;
                let r = match ins.mnemonic() {
                    M::Popcnt => v.count_ones(),
                    M::Lzcnt => (v.leading_zeros() - (64 - bits)).min(bits),
                    _ => v.trailing_zeros().min(bits),
                };
                let d = self.op_loc(ins, 0)?;
                self.write_loc(d, u64::from(r))?;
                let mut f = 0;
                if ins.mnemonic() == M::Popcnt {
                    if v == 0 {
                        f |= ZF;
                    }
                } else {
                    if r == bits {
                        f |= CF;
                    }
                    if r == 0 {
                        f |= ZF;
                    }
                }
                self.set_arith(f);
                Ok(())
            }
            M::Xlatb => {
                let seg =
                    super::SegReg::from_register(ins.memory_segment()).unwrap_or(super::SegReg::Ds);
                let ea = self.effective_address(ins);
                let v = self.read_mem(seg, ea, 1)?;
                self.set_reg(0, 1, false, v);
                Ok(())
            }
            M::Clflush | M::Clflushopt | M::Clwb => {
                // No caches: only the address's checks (a read of one byte).
                let seg =
                    super::SegReg::from_register(ins.memory_segment()).unwrap_or(super::SegReg::Ds);
                let ea = self.effective_address(ins);
                self.read_mem(seg, ea, 1).map(|_| ())
            }
            M::Bswap => {
                let size = self.op_size(ins, 0);
                let d = self.op_loc(ins, 0)?;
                let v = self.read_loc(d)?;
                let r = match size {
                    8 => v.swap_bytes(),
                    4 => u64::from((v as u32).swap_bytes()),
                    _ => 0, // undefined for 16-bit operands
                };
                self.write_loc(d, r)
            }
            M::Cbw | M::Cwde | M::Cdqe => {
                let size = match ins.mnemonic() {
                    M::Cbw => 2,
                    M::Cwde => 4,
                    _ => 8,
                };
                let half = size / 2;
                let v = sign_extend(self.reg(0, half, false), half);
                self.set_reg(0, size, false, v);
                Ok(())
            }
            M::Cwd | M::Cdq | M::Cqo => {
                let size = match ins.mnemonic() {
                    M::Cwd => 2,
                    M::Cdq => 4,
                    _ => 8,
                };
                let a = self.reg(0, size, false);
                let hi = if a & (1 << (size * 8 - 1)) != 0 {
                    u64::MAX
                } else {
                    0
                };
                self.set_reg(2, size, false, hi);
                Ok(())
            }
            M::Nop
            | M::Pause
            | M::Lfence
            | M::Sfence
            | M::Mfence
            | M::Prefetchnta
            | M::Prefetcht0
            | M::Prefetcht1
            | M::Prefetcht2
            | M::Prefetchw
            | M::Endbr64
            | M::Endbr32 => Ok(()),
            M::Clc => self.flag_op(CF, false),
            M::Stc => self.flag_op(CF, true),
            M::Cmc => {
                self.st.regs.rflags ^= CF;
                Ok(())
            }
            M::Cld => self.flag_op(DF, false),
            M::Std => self.flag_op(DF, true),
            M::Lahf => {
                if self.mode64() && !self.lahf_lm() {
                    return Err(ud());
                }
                let v = (self.rflags() & (SF | ZF | AF | PF | CF)) | FIXED;
                self.set_reg(0, 1, true, v);
                Ok(())
            }
            M::Sahf => {
                if self.mode64() && !self.lahf_lm() {
                    return Err(ud());
                }
                let ah = self.reg(0, 1, true);
                let m = SF | ZF | AF | PF | CF;
                self.st.regs.rflags = (self.rflags() & !m) | (ah & m);
                Ok(())
            }
            M::Ud0 | M::Ud1 | M::Ud2 => Err(ud()),
            m if is_setcc(m) => {
                let v = u64::from(self.cond(ins.condition_code()));
                let d = self.op_loc(ins, 0)?;
                self.write_loc(d, v)
            }
            m if is_cmovcc(m) => {
                let size = self.op_size(ins, 0);
                let v = self.read_op(ins, 1)?;
                let d = self.op_loc(ins, 0)?;
                if self.cond(ins.condition_code()) {
                    self.write_loc(d, v)
                } else if size == 4 {
                    // A 32-bit CMOV zero-extends its destination even when false.
                    let old = self.read_loc(d)?;
                    self.write_loc(d, old)
                } else {
                    Ok(())
                }
            }
            _ => self.exec_more(ins),
        }
    }

    fn lahf_lm(&self) -> bool {
        crate::cpuid::find_index(&self.st.cpuid, 0x8000_0001, 0)
            .map(|i| self.st.cpuid[i].ecx & 1 != 0)
            .unwrap_or(true)
    }

    fn flag_op(&mut self, f: u64, set: bool) -> R<()> {
        if set {
            self.st.regs.rflags |= f;
        } else {
            self.st.regs.rflags &= !f;
        }
        Ok(())
    }

    /// POPF/IRET's rules for which flags may change at this CPL and IOPL.
    pub fn popf(&mut self, v: u64, size: u32) {
        let mut mask = ARITH | TF | DF | NT | AC | ID | IF | IOPL;
        let cpl = self.cpl();
        if self.protected() && !self.v86() {
            if cpl > 0 {
                mask &= !IOPL;
            }
            if cpl > self.iopl() {
                mask &= !IF;
            }
        } else if self.v86() {
            mask &= !IOPL;
        }
        if size == 2 {
            mask &= 0xffff;
        }
        let old = self.rflags();
        self.st.regs.rflags = ((old & !mask) | (v & mask) | FIXED) & !RF;
    }

    pub fn cond(&self, cc: ConditionCode) -> bool {
        let f = self.rflags();
        let cf = f & CF != 0;
        let zf = f & ZF != 0;
        let sf = f & SF != 0;
        let of = f & OF != 0;
        let pf = f & PF != 0;
        match cc {
            ConditionCode::None => true,
            ConditionCode::o => of,
            ConditionCode::no => !of,
            ConditionCode::b => cf,
            ConditionCode::ae => !cf,
            ConditionCode::e => zf,
            ConditionCode::ne => !zf,
            ConditionCode::be => cf || zf,
            ConditionCode::a => !cf && !zf,
            ConditionCode::s => sf,
            ConditionCode::ns => !sf,
            ConditionCode::p => pf,
            ConditionCode::np => !pf,
            ConditionCode::l => sf != of,
            ConditionCode::ge => sf == of,
            ConditionCode::le => zf || sf != of,
            ConditionCode::g => !zf && sf == of,
        }
    }

    fn op_mov(&mut self, ins: &Instruction) -> R<()> {
        let k0 = ins.op0_kind();
        let k1 = ins.op1_kind();
        if k0 == OpKind::Register {
            let r = ins.op0_register();
            if r.is_cr() || r.is_dr() {
                return self.mov_to_cr_dr(ins);
            }
            if r.is_segment_register() {
                let s = super::SegReg::from_register(r).ok_or_else(unimplemented)?;
                if s == super::SegReg::Cs {
                    return Err(ud());
                }
                let v = self.read_op(ins, 1)? as u16;
                self.load_data_segment(s, v)?;
                if s == super::SegReg::Ss {
                    self.shadow_set = super::SHADOW_MOV_SS;
                }
                return Ok(());
            }
        }
        if k1 == OpKind::Register {
            let r = ins.op1_register();
            if r.is_cr() || r.is_dr() {
                return self.mov_from_cr_dr(ins);
            }
            if r.is_segment_register() {
                let s = super::SegReg::from_register(r).ok_or_else(unimplemented)?;
                let v = u64::from(self.seg(s).selector);
                let d = self.op_loc(ins, 0)?;
                return self.write_loc(d, v);
            }
        }
        let v = self.read_op(ins, 1)?;
        let d = self.op_loc(ins, 0)?;
        self.write_loc(d, v)
    }

    fn op_alu(&mut self, ins: &Instruction) -> R<()> {
        use Mnemonic as M;
        let size = self.op_size(ins, 0);
        let d = self.op_loc(ins, 0)?;
        let a = self.read_loc(d)?;
        let b = self.read_op(ins, 1)? & size_mask(size);
        let cf = self.flag(CF);
        let (r, f) = match ins.mnemonic() {
            M::Add => alu::add(a, b, false, size),
            M::Adc => alu::add(a, b, cf, size),
            M::Sub | M::Cmp => alu::sub(a, b, false, size),
            M::Sbb => alu::sub(a, b, cf, size),
            M::And | M::Test => alu::logic(a & b, size),
            M::Or => alu::logic(a | b, size),
            _ => alu::logic(a ^ b, size),
        };
        if !matches!(ins.mnemonic(), M::Cmp | M::Test) {
            self.write_loc(d, r)?;
        }
        self.set_arith(f);
        Ok(())
    }

    fn op_shift(&mut self, ins: &Instruction) -> R<()> {
        use Mnemonic as M;
        let size = self.op_size(ins, 0);
        let d = self.op_loc(ins, 0)?;
        let v = self.read_loc(d)?;
        let count = if ins.op_count() < 2 {
            1
        } else {
            self.read_op(ins, 1)? as u32
        } & if size == 8 { 63 } else { 31 };
        let op = match ins.mnemonic() {
            M::Rol => Shift::Rol,
            M::Ror => Shift::Ror,
            M::Rcl => Shift::Rcl,
            M::Rcr => Shift::Rcr,
            M::Shl | M::Sal => Shift::Shl,
            M::Shr => Shift::Shr,
            _ => Shift::Sar,
        };
        if let Some((r, f)) = alu::shift(op, v, count, size, self.rflags()) {
            self.write_loc(d, r)?;
            self.set_arith(f);
        }
        Ok(())
    }

    fn op_bt(&mut self, ins: &Instruction) -> R<()> {
        use Mnemonic as M;
        let size = self.op_size(ins, 0);
        let bits = u64::from(size * 8);
        let mut d = self.op_loc(ins, 0)?;
        let off = self.read_op(ins, 1)?;
        let bit = if ins.op1_kind() == OpKind::Register {
            if let Loc::Mem(seg, ea, sz) = d {
                // A register bit offset reaches outside the operand (signed).
                let so = sign_extend(off & size_mask(size), size) as i64;
                let delta = so.div_euclid(bits as i64) * i64::from(size);
                let ea = ea.wrapping_add(delta as u64) & self.addr_mask(ins);
                d = Loc::Mem(seg, ea, sz);
                so.rem_euclid(bits as i64) as u64
            } else {
                off & (bits - 1)
            }
        } else {
            off & (bits - 1)
        };
        let v = self.read_loc(d)?;
        let was = (v >> bit) & 1 != 0;
        let r = match ins.mnemonic() {
            M::Bts => Some(v | (1 << bit)),
            M::Btr => Some(v & !(1 << bit)),
            M::Btc => Some(v ^ (1 << bit)),
            _ => None,
        };
        if let Some(r) = r {
            self.write_loc(d, r)?;
        }
        let f = self.rflags() & !CF;
        self.st.regs.rflags = if was { f | CF } else { f };
        Ok(())
    }

    /// The address-size mask of a memory operand.
    pub fn addr_mask(&self, ins: &Instruction) -> u64 {
        let r = if ins.memory_base() != Register::None {
            ins.memory_base()
        } else {
            ins.memory_index()
        };
        match r.size() {
            2 => 0xffff,
            4 => 0xffff_ffff,
            8 => u64::MAX,
            _ => match self.bitness() {
                64 => u64::MAX,
                32 => 0xffff_ffff,
                _ => 0xffff,
            },
        }
    }

    fn op_muldiv(&mut self, ins: &Instruction) -> R<()> {
        use Mnemonic as M;
        if ins.mnemonic() == M::Imul && ins.op_count() > 1 {
            let size = self.op_size(ins, 0);
            let (a, b) = if ins.op_count() == 3 {
                (self.read_op(ins, 1)?, self.read_op(ins, 2)?)
            } else {
                (self.read_op(ins, 0)?, self.read_op(ins, 1)?)
            };
            let a = sign_extend(a & size_mask(size), size) as i64 as i128;
            let b = sign_extend(b & size_mask(size), size) as i64 as i128;
            let p = a * b;
            let r = (p as u64) & size_mask(size);
            let overflow = sign_extend(r, size) as i64 as i128 != p;
            let d = self.op_loc(ins, 0)?;
            self.write_loc(d, r)?;
            // SF and PF from the result, ZF clear (undefined; this machine's CPU).
            let mut f = alu::szp(r, size) & !ZF;
            if overflow {
                f |= CF | OF;
            }
            self.set_arith(f);
            return Ok(());
        }
        let size = self.op_size(ins, 0);
        let bits = size * 8;
        let m = size_mask(size);
        let src = self.read_op(ins, 0)? & m;
        // The double-width accumulator: AX for bytes, else DX:AX, EDX:EAX, RDX:RAX.
        let (lo, hi) = if size == 1 {
            (self.reg(0, 1, false), self.reg(0, 1, true))
        } else {
            (self.reg(0, size, false), self.reg(2, size, false))
        };
        let set_pair = |cpu: &mut Self, lo: u64, hi: u64| {
            if size == 1 {
                cpu.set_reg(0, 2, false, (lo & 0xff) | ((hi & 0xff) << 8));
            } else {
                cpu.set_reg(0, size, false, lo);
                cpu.set_reg(2, size, false, hi);
            }
        };
        match ins.mnemonic() {
            M::Mul => {
                let p = u128::from(lo) * u128::from(src);
                let (l, h) = ((p as u64) & m, ((p >> bits) as u64) & m);
                set_pair(self, l, h);
                let mut f = alu::szp(l, size) & !ZF;
                if h != 0 {
                    f |= CF | OF;
                }
                self.set_arith(f);
            }
            M::Imul => {
                let a = sign_extend(lo, size) as i64 as i128;
                let b = sign_extend(src, size) as i64 as i128;
                let p = a * b;
                let (l, h) = ((p as u64) & m, ((p >> bits) as u64) & m);
                set_pair(self, l, h);
                let mut f = alu::szp(l, size) & !ZF;
                if sign_extend(l, size) as i64 as i128 != p {
                    f |= CF | OF;
                }
                self.set_arith(f);
            }
            M::Div => {
                if src == 0 {
                    return Err(exc(vector::DE));
                }
                let n = (u128::from(hi) << bits) | u128::from(lo);
                let q = n / u128::from(src);
                let r = n % u128::from(src);
                if q > u128::from(m) {
                    return Err(exc(vector::DE));
                }
                set_pair(self, q as u64, r as u64);
            }
            _ => {
                if src == 0 {
                    return Err(exc(vector::DE));
                }
                let n = ((u128::from(hi) << bits) | u128::from(lo)) as i128;
                // Sign-extend the 2*bits-wide dividend.
                let n = (n << (128 - 2 * bits)) >> (128 - 2 * bits);
                let dv = sign_extend(src, size) as i64 as i128;
                let q = n.wrapping_div(dv);
                let r = n.wrapping_rem(dv);
                let lim = 1i128 << (bits - 1);
                if q >= lim || q < -lim {
                    return Err(exc(vector::DE));
                }
                set_pair(self, (q as u64) & m, (r as u64) & m);
            }
        }
        Ok(())
    }

    /// Instructions of the other groups.
    fn exec_more(&mut self, ins: &Instruction) -> R<()> {
        if let Some(r) = self.exec_flow(ins) {
            return r;
        }
        if let Some(r) = self.exec_string(ins) {
            return r;
        }
        if let Some(r) = self.exec_system(ins) {
            return r;
        }
        let _ = Code::INVALID;
        Err(self.emulation_failure())
    }
}

fn is_setcc(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
        M::Seta
            | M::Setae
            | M::Setb
            | M::Setbe
            | M::Sete
            | M::Setg
            | M::Setge
            | M::Setl
            | M::Setle
            | M::Setne
            | M::Setno
            | M::Setnp
            | M::Setns
            | M::Seto
            | M::Setp
            | M::Sets
    )
}

fn is_cmovcc(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
        M::Cmova
            | M::Cmovae
            | M::Cmovb
            | M::Cmovbe
            | M::Cmove
            | M::Cmovg
            | M::Cmovge
            | M::Cmovl
            | M::Cmovle
            | M::Cmovne
            | M::Cmovno
            | M::Cmovnp
            | M::Cmovns
            | M::Cmovo
            | M::Cmovp
            | M::Cmovs
    )
}
