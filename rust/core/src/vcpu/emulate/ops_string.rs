//! String instructions (MOVS, STOS, LODS, CMPS, SCAS, INS, OUTS) with REP/REPZ/
//! REPNZ, and port I/O (IN, OUT) with the protected-mode I/O permission check.
//!
//! A REP instruction runs one iteration per step and stays at its RIP until the
//! count runs out (as the hardware, which is interruptible between iterations), so
//! batching, kicks and MMIO exits all fall between iterations.

use iced_x86::{Code, Instruction, Mnemonic, OpKind};

use super::alu::{self, flags::*};
use super::segment::{implicit_kind, SegReg};
use super::{gp0, size_mask, unimplemented, Cpu, Exit, PendingRead, Stop, R};

/// The address size of a string instruction's operands.
fn string_asize(ins: &Instruction) -> u32 {
    for i in 0..ins.op_count() {
        match ins.op_kind(i) {
            OpKind::MemorySegSI | OpKind::MemoryESDI | OpKind::MemorySegDI => return 2,
            OpKind::MemorySegESI | OpKind::MemoryESEDI | OpKind::MemorySegEDI => return 4,
            OpKind::MemorySegRSI | OpKind::MemoryESRDI | OpKind::MemorySegRDI => return 8,
            _ => {}
        }
    }
    4
}

impl Cpu<'_> {
    pub fn exec_string(&mut self, ins: &Instruction) -> Option<R<()>> {
        use Mnemonic as M;
        let m = ins.mnemonic();
        let size = match m {
            M::Movsb | M::Stosb | M::Lodsb | M::Cmpsb | M::Scasb | M::Insb | M::Outsb => 1,
            M::Movsw | M::Stosw | M::Lodsw | M::Cmpsw | M::Scasw | M::Insw | M::Outsw => 2,
            M::Movsd | M::Stosd | M::Lodsd | M::Cmpsd | M::Scasd | M::Insd | M::Outsd => {
                if matches!(
                    ins.code(),
                    Code::Movsd_xmm_xmmm64
                        | Code::Movsd_xmmm64_xmm
                        | Code::Cmpsd_xmm_xmmm64_imm8
                        | Code::VEX_Vmovsd_xmm_xmm_xmm
                ) {
                    return None; // the SSE MOVSD/CMPSD
                }
                4
            }
            M::Movsq | M::Stosq | M::Lodsq | M::Cmpsq | M::Scasq => 8,
            M::In | M::Out => return Some(self.port_io(ins)),
            _ => return None,
        };
        Some(self.string_step(ins, m, size))
    }

    fn string_step(&mut self, ins: &Instruction, m: Mnemonic, size: u32) -> R<()> {
        use Mnemonic as M;
        let asize = string_asize(ins);
        let amask = size_mask(asize);
        let rep = ins.has_rep_prefix() || ins.has_repne_prefix();
        if rep && self.reg(1, asize, false) == 0 {
            return Ok(());
        }
        let src_seg = SegReg::from_register(ins.memory_segment()).unwrap_or(SegReg::Ds);
        let si = self.gpr[6] & amask;
        let di = self.gpr[7] & amask;
        let delta = if self.flag(DF) {
            u64::from(size).wrapping_neg()
        } else {
            u64::from(size)
        };
        let mut cmp_flags = None;
        let (mut adv_si, mut adv_di) = (false, false);
        match m {
            M::Movsb | M::Movsw | M::Movsd | M::Movsq => {
                let v = self.read_mem(src_seg, si, size)?;
                self.write_mem(SegReg::Es, di, size, v)?;
                (adv_si, adv_di) = (true, true);
            }
            M::Stosb | M::Stosw | M::Stosd | M::Stosq => {
                let v = self.reg(0, size, false);
                self.write_mem(SegReg::Es, di, size, v)?;
                adv_di = true;
            }
            M::Lodsb | M::Lodsw | M::Lodsd | M::Lodsq => {
                let v = self.read_mem(src_seg, si, size)?;
                self.set_reg(0, size, false, v);
                adv_si = true;
            }
            M::Cmpsb | M::Cmpsw | M::Cmpsd | M::Cmpsq => {
                let a = self.read_mem(src_seg, si, size)?;
                let b = self.read_mem(SegReg::Es, di, size)?;
                cmp_flags = Some(alu::sub(a, b, false, size).1);
                (adv_si, adv_di) = (true, true);
            }
            M::Scasb | M::Scasw | M::Scasd | M::Scasq => {
                let a = self.reg(0, size, false);
                let b = self.read_mem(SegReg::Es, di, size)?;
                cmp_flags = Some(alu::sub(a, b, false, size).1);
                adv_di = true;
            }
            M::Insb | M::Insw | M::Insd => {
                let port = self.reg(2, 2, false) as u16;
                self.io_permitted(port, size)?;
                // The destination's segment checks come before the port read.
                self.linearize(SegReg::Es, di, size, true)?;
                // pio_in_emulated: up to the page end (or start, with DF), at most
                // 1024 bytes, at most the count.
                let off = (di & 0xfff) as u32;
                let in_page = if self.flag(DF) {
                    off / size
                } else {
                    (4096 - off) / size
                };
                let count = if rep {
                    let c = self.reg(1, asize, false).min(u64::from(u32::MAX)) as u32;
                    c.min(in_page.max(1)).min(1024 / size)
                } else {
                    1
                };
                let v = self.port_in(port, size, count)?;
                self.write_mem(SegReg::Es, di, size, v)?;
                adv_di = true;
            }
            M::Outsb | M::Outsw | M::Outsd => {
                let port = self.reg(2, 2, false) as u16;
                self.io_permitted(port, size)?;
                let v = self.read_mem(src_seg, si, size)?;
                self.port_out(port, size, v);
                adv_si = true;
            }
            _ => return Err(unimplemented()),
        }
        if adv_si {
            self.gpr[6] = (self.gpr[6] & !amask) | (si.wrapping_add(delta) & amask);
            if asize == 4 {
                self.gpr[6] &= 0xffff_ffff;
            }
        }
        if adv_di {
            self.gpr[7] = (self.gpr[7] & !amask) | (di.wrapping_add(delta) & amask);
            if asize == 4 {
                self.gpr[7] &= 0xffff_ffff;
            }
        }
        if let Some(f) = cmp_flags {
            self.set_arith(f);
        }
        if rep {
            let c = self.reg(1, asize, false).wrapping_sub(1) & amask;
            self.set_reg(1, asize, false, c);
            let mut more = c != 0;
            if let Some(f) = cmp_flags {
                let zf = f & ZF != 0;
                if ins.has_repe_prefix() && !zf || ins.has_repne_prefix() && zf {
                    more = false;
                }
            }
            // Run this instruction again for the next iteration; after an OUTS
            // exit KVM's emulator also reruns it once more to finish (RIP stays on
            // it until the re-entry, as on the device).
            if more || (m == M::Outsb || m == M::Outsw || m == M::Outsd) {
                self.next_rip = self.st.regs.rip;
            }
        }
        Ok(())
    }

    /// IN and OUT with an immediate or DX port.
    fn port_io(&mut self, ins: &Instruction) -> R<()> {
        let input = ins.mnemonic() == Mnemonic::In;
        let (port_op, data_op) = if input { (1, 0) } else { (0, 1) };
        let port = if ins.op_kind(port_op) == OpKind::Register {
            self.reg(2, 2, false) as u16
        } else {
            ins.immediate8() as u16
        };
        let size = ins.op_register(data_op).size() as u32;
        self.io_permitted(port, size)?;
        if input {
            let v = self.port_in(port, size, 1)?;
            self.set_reg(0, size, false, v);
        } else {
            let v = self.reg(0, size, false);
            self.port_out(port, size, v);
        }
        Ok(())
    }

    /// A port read: the data userspace gave on re-entry, or a KVM_EXIT_IO for
    /// `count` accesses (a REP INS reads ahead, as KVM's emulator does).
    fn port_in(&mut self, port: u16, size: u32, count: u32) -> R<u64> {
        if let Some(d) = self.emu.pio_in.as_mut() {
            let mut b = [0u8; 8];
            let n = d.len().min(size as usize);
            b[..n].copy_from_slice(&d[..n]);
            d.drain(..n);
            if d.is_empty() {
                self.emu.pio_in = None;
            }
            return Ok(u64::from_le_bytes(b));
        }
        self.emu.pending_read = Some(PendingRead::Pio {
            port,
            size: size as u8,
            count,
        });
        Err(Stop::Exit(Exit::Io {
            port,
            size: size as u8,
            input: true,
            count,
            data: [0; 8],
        }))
    }

    /// A port write: the instruction completes, then KVM_EXIT_IO.
    fn port_out(&mut self, port: u16, size: u32, v: u64) {
        self.exit_after = Some(Exit::Io {
            port,
            size: size as u8,
            input: false,
            count: 1,
            data: v.to_le_bytes(),
        });
    }

    /// The I/O permission check: CPL <= IOPL, else the TSS I/O bitmap (#GP(0)).
    pub fn io_permitted(&mut self, port: u16, size: u32) -> R<()> {
        if !self.protected() || (!self.v86() && self.cpl() <= self.iopl()) {
            return Ok(());
        }
        let tr = self.st.sregs.tr;
        // A 16-bit TSS has no bitmap.
        if tr.type_ & 0x7 != 0x3 && tr.type_ & 0x7 != 0x1 || tr.type_ & 8 == 0 {
            return Err(gp0());
        }
        if tr.limit < 0x67 {
            return Err(gp0());
        }
        let base = self.read_tss_u16(0x66)?;
        let off = u64::from(base) + u64::from(port / 8);
        if off + 1 > u64::from(tr.limit) {
            return Err(gp0());
        }
        let mut b = [0u8; 2];
        self.read_lin(tr.base.wrapping_add(off), &mut b, implicit_kind(false))?;
        let bits = u16::from_le_bytes(b) >> (port & 7);
        if bits & ((1 << size) - 1) != 0 {
            return Err(gp0());
        }
        Ok(())
    }

    fn read_tss_u16(&mut self, off: u64) -> R<u16> {
        let tr = self.st.sregs.tr;
        let mut b = [0u8; 2];
        self.read_lin(tr.base.wrapping_add(off), &mut b, implicit_kind(false))?;
        Ok(u16::from_le_bytes(b))
    }
}
