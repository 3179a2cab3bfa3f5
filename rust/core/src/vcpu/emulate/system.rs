//! System instructions: MOV CR/DR, CLTS, LMSW/SMSW, INVLPG, the descriptor-table
//! registers (LGDT/LIDT/SGDT/SIDT/LLDT/LTR/SLDT/STR), CPUID, RDMSR/WRMSR, RDTSC,
//! HLT, CLI/STI. Control-register writes take the same path as the guest-op API
//! (kvm_set_cr0/3/4, set_efer and the MMU's reaction).

use iced_x86::{Instruction, Mnemonic, Register};

use super::alu::flags::*;
use super::segment::{flat_segment, implicit_kind, SegReg};
use super::{exc_ec, gp0, ud, vector, Cpu, Exit, Stop, R};
use crate::stats::VcpuStat;
use crate::uapi::kvm_segment;
use crate::vcpu::guest_ops::ControlReg;
use crate::vcpu::msr;
use crate::vcpu::sregs::{CR0_TS, CR4_DE, CR4_TSD};

pub const SHADOW_MOV_SS: u8 = 1;
const MSR_FS_BASE: u32 = 0xc000_0100;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SFMASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_GS_BASE: u32 = 0xc000_0101;
pub const SHADOW_STI: u8 = 2;

impl Cpu<'_> {
    fn require_cpl0(&self) -> R<()> {
        if self.cpl() != 0 {
            return Err(gp0());
        }
        Ok(())
    }

    /// A trapped instruction the hardware exits to KVM for (counted as an exit).
    fn intercepted(&mut self) {
        self.vcpu.stats.add(VcpuStat::Exits as usize, 1);
        self.emu.decode.invalidate_code();
    }

    pub fn exec_system(&mut self, ins: &Instruction) -> Option<R<()>> {
        use Mnemonic as M;
        Some(match ins.mnemonic() {
            M::Hlt => self.require_cpl0().map(|_| {
                self.exit_after = Some(Exit::Hlt);
            }),
            M::Cli | M::Sti => self.cli_sti(ins.mnemonic() == M::Sti),
            M::Cpuid => {
                self.intercepted();
                self.cpuid();
                Ok(())
            }
            M::Rdmsr => self.require_cpl0().and_then(|_| {
                self.intercepted();
                let idx = self.gpr[1] as u32;
                let v = match idx {
                    0x10 => Some(self.emu.retired),
                    0x1b => Some(self.st.sregs.apic_base),
                    MSR_FS_BASE => Some(self.st.sregs.fs.base),
                    MSR_STAR => Some(self.st.syscall_msrs.star),
                    MSR_LSTAR => Some(self.st.syscall_msrs.lstar),
                    MSR_CSTAR => Some(self.st.syscall_msrs.cstar),
                    MSR_SFMASK => Some(self.st.syscall_msrs.sfmask),
                    MSR_KERNEL_GS_BASE => Some(self.st.syscall_msrs.kernel_gs_base),
                    MSR_GS_BASE => Some(self.st.sregs.gs.base),
                    _ => msr::get_msr(self.st, self.vm, idx),
                };
                let v = v.ok_or_else(gp0)?;
                self.set_reg(0, 4, false, v & 0xffff_ffff);
                self.set_reg(2, 4, false, v >> 32);
                Ok(())
            }),
            M::Wrmsr => self.require_cpl0().and_then(|_| {
                self.intercepted();
                let idx = self.gpr[1] as u32;
                let v = (self.gpr[0] & 0xffff_ffff) | (self.gpr[2] << 32);
                if idx == msr::MSR_IA32_EFER {
                    return self.write_cr(ControlReg::Efer, v);
                }
                let canonical = crate::paging::is_canonical(v, false);
                let m = &mut self.st.syscall_msrs;
                match idx {
                    MSR_STAR => {
                        m.star = v;
                        return Ok(());
                    }
                    MSR_SFMASK => {
                        m.sfmask = v & 0xffff_ffff;
                        return Ok(());
                    }
                    MSR_LSTAR | MSR_CSTAR | MSR_KERNEL_GS_BASE if !canonical => return Err(gp0()),
                    MSR_LSTAR => {
                        m.lstar = v;
                        return Ok(());
                    }
                    MSR_CSTAR => {
                        m.cstar = v;
                        return Ok(());
                    }
                    MSR_KERNEL_GS_BASE => {
                        m.kernel_gs_base = v;
                        return Ok(());
                    }
                    _ => {}
                }
                if idx == MSR_FS_BASE || idx == MSR_GS_BASE {
                    if !crate::paging::is_canonical(v, false) {
                        return Err(gp0());
                    }
                    let s = if idx == MSR_FS_BASE {
                        &mut self.st.sregs.fs
                    } else {
                        &mut self.st.sregs.gs
                    };
                    s.base = v;
                    return Ok(());
                }
                let ring = self.vcpu.dirty_ring.as_ref();
                if msr::set_msr(self.st, self.vm, ring, idx, v) {
                    Ok(())
                } else {
                    Err(gp0())
                }
            }),
            M::Rdtsc | M::Rdtscp => {
                if self.st.sregs.cr4 & CR4_TSD != 0 && self.cpl() != 0 {
                    return Some(Err(gp0()));
                }
                let t = self.emu.retired;
                self.set_reg(0, 4, false, t & 0xffff_ffff);
                self.set_reg(2, 4, false, t >> 32);
                if ins.mnemonic() == M::Rdtscp {
                    self.set_reg(1, 4, false, 0);
                }
                Ok(())
            }
            M::Clts => self.require_cpl0().map(|_| {
                self.intercepted();
                self.st.sregs.cr0 &= !CR0_TS;
            }),
            M::Lmsw => self.require_cpl0().and_then(|_| {
                self.intercepted();
                let v = self.read_op(ins, 0)? & 0xf;
                let cr0 = self.st.sregs.cr0;
                // LMSW cannot clear PE.
                let new = (cr0 & !0xe) | v | (cr0 & 1);
                self.write_cr(ControlReg::Cr0, new)
            }),
            M::Smsw => {
                let v = self.st.sregs.cr0;
                let d = match self.op_loc(ins, 0) {
                    Ok(d) => d,
                    Err(e) => return Some(Err(e)),
                };
                let v = if matches!(d, super::Loc::Mem(..)) {
                    v & 0xffff
                } else {
                    v
                };
                self.write_loc(d, v)
            }
            M::Invlpg => self.require_cpl0().and_then(|_| {
                self.intercepted();
                let seg = SegReg::from_register(ins.memory_segment()).unwrap_or(SegReg::Ds);
                let ea = self.effective_address(ins);
                let lin = if self.mode64() {
                    let base = match seg {
                        SegReg::Fs | SegReg::Gs => self.seg(seg).base,
                        _ => 0,
                    };
                    base.wrapping_add(ea)
                } else {
                    self.seg(seg).base.wrapping_add(ea) & 0xffff_ffff
                };
                self.vcpu.with_mmu_locked(self.st, self.vm, |ctx, env, _| {
                    ctx.invlpg(env, lin);
                    Ok(())
                })?;
                Ok(())
            }),
            M::Lgdt | M::Lidt => self.require_cpl0().and_then(|_| {
                self.intercepted();
                let seg = SegReg::from_register(ins.memory_segment()).unwrap_or(SegReg::Ds);
                let ea = self.effective_address(ins);
                let limit = self.read_mem(seg, ea, 2)? as u16;
                let bsize = if self.mode64() { 8 } else { 4 };
                let mut base = self.read_mem(seg, ea.wrapping_add(2), bsize)?;
                if self.bitness() != 64 && self.op_size16(ins) {
                    base &= 0x00ff_ffff;
                }
                if self.mode64() && !crate::paging::is_canonical(base, false) {
                    return Err(gp0());
                }
                let t = if ins.mnemonic() == M::Lgdt {
                    &mut self.st.sregs.gdt
                } else {
                    &mut self.st.sregs.idt
                };
                t.base = base;
                t.limit = limit;
                Ok(())
            }),
            M::Sgdt | M::Sidt => {
                let t = if ins.mnemonic() == M::Sgdt {
                    self.st.sregs.gdt
                } else {
                    self.st.sregs.idt
                };
                let seg = SegReg::from_register(ins.memory_segment()).unwrap_or(SegReg::Ds);
                let ea = self.effective_address(ins);
                let bsize = if self.mode64() { 8 } else { 4 };
                self.write_mem(seg, ea, 2, u64::from(t.limit))
                    .and_then(|_| self.write_mem(seg, ea.wrapping_add(2), bsize, t.base))
            }
            M::Sldt | M::Str => {
                if !self.protected() || self.v86() {
                    return Some(Err(ud()));
                }
                let sel = if ins.mnemonic() == M::Sldt {
                    self.st.sregs.ldt.selector
                } else {
                    self.st.sregs.tr.selector
                };
                let d = match self.op_loc(ins, 0) {
                    Ok(d) => d,
                    Err(e) => return Some(Err(e)),
                };
                self.write_loc(d, u64::from(sel))
            }
            M::Lldt | M::Ltr => {
                if !self.protected() || self.v86() {
                    return Some(Err(ud()));
                }
                self.require_cpl0().and_then(|_| {
                    self.intercepted();
                    let sel = self.read_op(ins, 0)? as u16;
                    self.load_system_segment(sel, ins.mnemonic() == M::Ltr)
                })
            }
            M::Wbinvd | M::Invd => self.require_cpl0(),
            M::Syscall => self.syscall(),
            M::Sysretq | M::Sysret => self.sysret(ins.mnemonic() == M::Sysretq),
            M::Swapgs => {
                if !self.mode64() {
                    return Some(Err(ud()));
                }
                self.require_cpl0().map(|_| {
                    let m = &mut self.st.syscall_msrs;
                    std::mem::swap(&mut self.st.sregs.gs.base, &mut m.kernel_gs_base);
                })
            }
            M::Mov => return None,
            _ => return None,
        })
    }

    /// SYSCALL in long mode (EFER.SCE): CS/SS from STAR[47:32], RIP from LSTAR (64-bit)
    /// or CSTAR (compatibility mode), RCX/R11 = return RIP/RFLAGS, RFLAGS &= !SFMASK.
    fn syscall(&mut self) -> R<()> {
        if !self.long_mode() || self.st.sregs.efer & crate::vcpu::sregs::EFER_SCE == 0 {
            return Err(ud());
        }
        let m = self.st.syscall_msrs;
        let sel = ((m.star >> 32) & 0xfffc) as u16;
        self.gpr[1] = self.next_rip;
        self.gpr[11] = self.rflags() & !RF;
        let target = if self.mode64() { m.lstar } else { m.cstar };
        let mut cs = flat_segment(sel, 11, 0);
        cs.l = 1;
        cs.db = 0;
        self.st.sregs.cs = cs;
        self.st.sregs.ss = flat_segment(sel.wrapping_add(8), 3, 0);
        self.st.regs.rflags = (self.rflags() & !m.sfmask & !RF) | FIXED;
        self.next_rip = target;
        self.emu.decode.invalidate_code();
        Ok(())
    }

    /// SYSRET to CPL3: 64-bit (REX.W) or compatibility mode, CS/SS from STAR[63:48].
    fn sysret(&mut self, to64: bool) -> R<()> {
        if !self.mode64() || self.st.sregs.efer & crate::vcpu::sregs::EFER_SCE == 0 {
            return Err(ud());
        }
        self.require_cpl0()?;
        let base = ((self.st.syscall_msrs.star >> 48) & 0xffff) as u16;
        let rip = if to64 {
            self.gpr[1]
        } else {
            self.gpr[1] & 0xffff_ffff
        };
        if to64 && !crate::paging::is_canonical(rip, false) {
            return Err(gp0());
        }
        let cs_sel = if to64 { base.wrapping_add(16) } else { base } | 3;
        let mut cs = flat_segment(cs_sel, 11, 3);
        if to64 {
            cs.l = 1;
            cs.db = 0;
        }
        self.st.sregs.cs = cs;
        self.st.sregs.ss = flat_segment(base.wrapping_add(8) | 3, 3, 3);
        self.st.regs.rflags = (self.gpr[11] & 0x3c_7fd7) | FIXED;
        self.next_rip = rip;
        self.emu.decode.invalidate_code();
        Ok(())
    }

    fn op_size16(&self, ins: &Instruction) -> bool {
        // LGDT/LIDT with a 16-bit operand size load a 24-bit base.
        matches!(
            ins.code(),
            iced_x86::Code::Lgdt_m1632_16 | iced_x86::Code::Lidt_m1632_16
        )
    }

    fn cli_sti(&mut self, sti: bool) -> R<()> {
        if self.protected() && (self.v86() || self.cpl() > self.iopl()) {
            return Err(gp0());
        }
        if sti {
            if !self.flag(IF) {
                self.shadow_set = SHADOW_STI;
            }
            self.st.regs.rflags |= IF;
        } else {
            self.st.regs.rflags &= !IF;
        }
        Ok(())
    }

    /// kvm_cpuid on the vCPU's KVM_SET_CPUID2 table, with KVM's out-of-range rule
    /// (Intel: the highest basic leaf; AMD-compatible vendors: zeros).
    fn cpuid(&mut self) {
        let mut func = self.gpr[0] as u32;
        let mut index = self.gpr[1] as u32;
        let t = crate::cpuid::runtime_view(&self.st.cpuid, &self.st.sregs);
        let mut found = crate::cpuid::find_index(&t, func, index)
            .or_else(|| (!crate::cpuid::is_indexed(func)).then(|| crate::cpuid::find(&t, func))?);
        if found.is_none() && !crate::cpuid::is_amd_compatible(&t) {
            if let Some(b) = crate::cpuid::find(&t, 0) {
                let max_basic = t[b].eax;
                let class_max = if func < 0x4000_0000 {
                    Some(max_basic)
                } else if (0x4000_0000..=0x4fff_ffff).contains(&func) {
                    crate::cpuid::find(&t, func & 0xffff_ff00).map(|i| t[i].eax)
                } else if func >= 0xc000_0000 {
                    crate::cpuid::find(&t, 0xc000_0000).map(|i| t[i].eax)
                } else {
                    crate::cpuid::find(&t, func & 0x8000_0000).map(|i| t[i].eax)
                };
                if class_max.is_none_or(|m| func > m) {
                    func = max_basic;
                    if !crate::cpuid::is_indexed(func) {
                        index = 0;
                    }
                    found = crate::cpuid::find_index(&t, func, index)
                        .or_else(|| crate::cpuid::find(&t, func));
                }
            }
        }
        let (a, b, c, d) = match found {
            Some(i) => (t[i].eax, t[i].ebx, t[i].ecx, t[i].edx),
            None => (0, 0, 0, 0),
        };
        self.set_reg(0, 4, false, u64::from(a));
        self.set_reg(3, 4, false, u64::from(b));
        self.set_reg(1, 4, false, u64::from(c));
        self.set_reg(2, 4, false, u64::from(d));
    }

    /// A control-register write through kvm_set_cr*/set_efer with the MMU reaction.
    fn write_cr(&mut self, reg: ControlReg, v: u64) -> R<()> {
        self.emu.decode.invalidate_code();
        match self.vcpu.write_control_locked(self.st, self.vm, reg, v)? {
            Ok(()) => Ok(()),
            Err(e) => Err(super::walk_fault(e)),
        }
    }

    pub fn mov_to_cr_dr(&mut self, ins: &Instruction) -> R<()> {
        self.require_cpl0()?;
        self.intercepted();
        let r = ins.op0_register();
        let v = self.reg_by_name(ins.op1_register());
        if r.is_dr() {
            return self.mov_dr(r, Some(v)).map(|_| ());
        }
        match r {
            Register::CR0 => {
                // Bits 63:32 set is #GP in 64-bit mode.
                if v >> 32 != 0 {
                    return Err(gp0());
                }
                self.write_cr(ControlReg::Cr0, v)
            }
            Register::CR2 => {
                self.st.sregs.cr2 = v;
                Ok(())
            }
            Register::CR3 => self.write_cr(ControlReg::Cr3, v),
            Register::CR4 => self.write_cr(ControlReg::Cr4, v),
            Register::CR8 => {
                if v & !0xf != 0 {
                    return Err(gp0());
                }
                self.st.sregs.cr8 = v;
                Ok(())
            }
            _ => Err(ud()),
        }
    }

    pub fn mov_from_cr_dr(&mut self, ins: &Instruction) -> R<()> {
        self.require_cpl0()?;
        self.intercepted();
        let r = ins.op1_register();
        let v = if r.is_dr() {
            self.mov_dr(r, None)?
        } else {
            match r {
                Register::CR0 => self.st.sregs.cr0,
                Register::CR2 => self.st.sregs.cr2,
                Register::CR3 => self.st.sregs.cr3,
                Register::CR4 => self.st.sregs.cr4,
                Register::CR8 => self.st.sregs.cr8,
                _ => return Err(ud()),
            }
        };
        self.set_reg_by_name(ins.op0_register(), v);
        Ok(())
    }

    /// MOV to (Some) or from (None) a debug register.
    fn mov_dr(&mut self, r: Register, write: Option<u64>) -> R<u64> {
        let n = (r as u32 - Register::DR0 as u32) as usize;
        let n = match n {
            4 | 5 if self.st.sregs.cr4 & CR4_DE != 0 => return Err(ud()),
            4 => 6,
            5 => 7,
            n if n > 7 => return Err(ud()),
            n => n,
        };
        let d = &mut self.st.debugregs;
        match write {
            None => Ok(match n {
                0..=3 => d.db[n],
                6 => d.dr6,
                _ => d.dr7,
            }),
            Some(v) => {
                if n >= 6 && v >> 32 != 0 {
                    return Err(gp0());
                }
                match n {
                    0..=3 => d.db[n] = v,
                    6 => d.dr6 = (v & 0xffff_efff) | crate::vcpu::debugregs::DR6_ACTIVE_LOW,
                    _ => d.dr7 = (v & !0xd800) | crate::vcpu::debugregs::DR7_FIXED_1,
                }
                Ok(0)
            }
        }
    }

    /// LLDT / LTR: a system descriptor (16 bytes in long mode).
    fn load_system_segment(&mut self, sel: u16, tr: bool) -> R<()> {
        let ec = u32::from(sel & !3);
        if sel & !3 == 0 {
            if tr {
                return Err(gp0());
            }
            self.st.sregs.ldt = super::segment::null_segment(sel);
            return Ok(());
        }
        if sel & 4 != 0 {
            return Err(exc_ec(vector::GP, ec));
        }
        let wide = self.long_mode();
        let Some(d) = self.read_descriptor(sel, wide)? else {
            return Err(exc_ec(vector::GP, ec));
        };
        let ok = if tr {
            !d.s() && matches!(d.typ(), 0x1 | 0x9)
        } else {
            !d.s() && d.typ() == 0x2
        };
        if !ok || (wide && d.base_hi != 0 && !crate::paging::is_canonical(d.base(), false)) {
            return Err(exc_ec(vector::GP, ec));
        }
        if !d.present() {
            return Err(exc_ec(vector::NP, ec));
        }
        let mut seg: kvm_segment = d.segment(sel);
        if tr {
            // Mark the TSS busy in the GDT.
            let lin = self.st.sregs.gdt.base.wrapping_add(u64::from(sel & !7) + 5);
            let b = [((d.hi >> 8) as u8) | 2];
            self.write_lin(lin, &b, implicit_kind(true))?;
            seg.type_ |= 2;
            self.st.sregs.tr = seg;
        } else {
            self.st.sregs.ldt = seg;
        }
        Ok(())
    }

    /// An instruction iced decodes but the model does not execute.
    pub fn not_modelled(&self) -> Stop {
        self.emulation_failure()
    }
}
