//! Event delivery: through the real-mode IVT, the 32-bit IDT (interrupt and trap
//! gates, stack switch from the 32-bit TSS) and the 64-bit IDT (16-byte gates,
//! RSP0 or IST from the 64-bit TSS, 16-byte stack alignment), and the SDM's
//! double-fault rules (a fault during #DF is a triple fault: KVM_EXIT_SHUTDOWN).
//!
//! Delivery reads and pushes first and commits CS, SS, RSP, RIP and RFLAGS only
//! at the end, so a fault during delivery leaves the interrupted state intact.

use super::alu::flags::*;
use super::segment::{implicit_kind, Desc};
use super::{exc_ec, gp0, vector, Cpu, Exc, Exit, Stop, R};
use crate::uapi::kvm_segment;
use crate::vcpu::guest_ops::AccessKind;

/// What is being delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// An exception raised by the CPU (faults and traps).
    Exception,
    /// INT n, INT3, INTO: gate DPL checked against CPL.
    Soft,
    /// INT1 (ICEBP): like an exception, without the DPL check.
    PrivSoft,
    /// An external interrupt or NMI (EXT = 1 in error codes).
    External,
}

fn class(v: u8) -> u8 {
    match v {
        vector::DE | vector::TS | vector::NP | vector::SS | vector::GP => 1,
        vector::PF => 2,
        _ => 0,
    }
}

/// KVM's exception_type() == EXCPT_FAULT: every vector but the traps (#DB, #BP,
/// #OF) and the aborts (#DF, #MC); reserved vectors count as faults.
fn is_fault(v: u8) -> bool {
    !matches!(
        v,
        vector::DB | vector::NMI | vector::BP | vector::OF | vector::DF | vector::MC
    )
}

/// The SDM's table: the second exception is turned into #DF.
fn makes_df(first: u8, second: u8) -> bool {
    let (a, b) = (class(first), class(second));
    (a == 1 && b == 1) || (a == 2 && b != 0)
}

impl Cpu<'_> {
    /// Deliver an exception raised by an instruction or at entry, with the double-
    /// and triple-fault rules. `rip` is the return address pushed.
    pub fn raise(&mut self, e: Exc, rip: u64, kind: EventKind) -> R<()> {
        let mut cur = e;
        let mut kind = kind;
        for _ in 0..3 {
            match self.deliver(cur.vector, cur.error_code, rip, kind) {
                Ok(()) => return Ok(()),
                Err(Stop::Exc(next)) => {
                    if cur.vector == vector::DF {
                        return Err(Stop::Exit(Exit::Shutdown));
                    }
                    cur = if kind == EventKind::Exception && makes_df(cur.vector, next.vector) {
                        Exc {
                            vector: vector::DF,
                            error_code: Some(0),
                        }
                    } else {
                        next
                    };
                    kind = EventKind::Exception;
                }
                Err(other) => return Err(other),
            }
        }
        Err(Stop::Exit(Exit::Shutdown))
    }

    /// Deliver one event; Err(Stop::Exc) is a fault during delivery.
    pub fn deliver(&mut self, vec: u8, ec: Option<u32>, rip: u64, kind: EventKind) -> R<()> {
        self.emu.decode.invalidate_code();
        if !self.protected() {
            return self.deliver_real(vec, rip);
        }
        if self.v86() {
            // Virtual-8086 mode is not modelled.
            return Err(self.emulation_failure());
        }
        let ext = u32::from(kind == EventKind::External);
        let idt_ec = u32::from(vec) * 8 + 2 + ext;
        let long = self.long_mode();
        let gate_size = if long { 16 } else { 8 };
        let idt = self.st.sregs.idt;
        let off = u64::from(vec) * gate_size;
        if off + gate_size - 1 > u64::from(idt.limit) {
            return Err(exc_ec(vector::GP, idt_ec));
        }
        let mut g = [0u8; 16];
        self.read_lin(
            idt.base.wrapping_add(off),
            &mut g[..gate_size as usize],
            implicit_kind(false),
        )?;
        let w = |i: usize| u32::from_le_bytes([g[i], g[i + 1], g[i + 2], g[i + 3]]);
        let (lo, hi) = (w(0), w(4));
        let typ = ((hi >> 8) & 0x1f) as u8;
        let gate_dpl = ((hi >> 13) & 3) as u8;
        let present = hi & (1 << 15) != 0;
        let ok_type = if long {
            matches!(typ, 0xe | 0xf)
        } else {
            matches!(typ, 0x6 | 0x7 | 0xe | 0xf | 0x5)
        };
        if !ok_type {
            return Err(exc_ec(vector::GP, idt_ec));
        }
        let cpl = self.cpl();
        if kind == EventKind::Soft && gate_dpl < cpl {
            return Err(exc_ec(vector::GP, idt_ec));
        }
        if !present {
            return Err(exc_ec(vector::NP, idt_ec));
        }
        if typ == 0x5 {
            // Task gates (hardware task switches) are not modelled.
            return Err(self.emulation_failure());
        }
        let trap = typ & 1 != 0;
        let gate16 = !long && typ & 8 == 0;
        let sel = (lo >> 16) as u16;
        let mut target = u64::from(lo & 0xffff) | u64::from(hi & 0xffff_0000);
        if long {
            target |= u64::from(w(8)) << 32;
        }
        let ist = if long { g[4] & 7 } else { 0 };
        let ext_ec = ext;
        // The code segment.
        let sel_ec = u32::from(sel & !3) + ext_ec;
        if sel & !3 == 0 {
            return Err(exc_ec(vector::GP, ext_ec));
        }
        let Some(cs) = self.read_descriptor(sel, false)? else {
            return Err(exc_ec(vector::GP, sel_ec));
        };
        if !cs.is_code() || cs.dpl() > cpl {
            return Err(exc_ec(vector::GP, sel_ec));
        }
        if long && (!cs.l() || cs.db()) {
            return Err(exc_ec(vector::GP, sel_ec));
        }
        if !cs.present() {
            return Err(exc_ec(vector::NP, sel_ec));
        }
        let conforming = cs.typ() & 4 != 0;
        let new_cpl = if conforming { cpl } else { cs.dpl() };
        // The image of a fault-class exception has RF set (SDM 17.3.1.1; KVM sets it
        // before injecting one: inject_pending_event with exception_type()).
        let old_rflags = if kind == EventKind::Exception && is_fault(vec) {
            self.rflags() | RF
        } else {
            self.rflags()
        };
        let old_ss = self.st.sregs.ss;
        let old_rsp = self.gpr[4];
        let old_cs = self.st.sregs.cs.selector;
        let push_kind = AccessKind {
            write: true,
            fetch: false,
            user: new_cpl == 3,
            implicit: false,
        };
        if long {
            let mut rsp = if ist != 0 {
                self.tss_read(0x24 + 8 * u64::from(ist - 1), 8)?
            } else if new_cpl < cpl {
                self.tss_read(4 + 8 * u64::from(new_cpl), 8)?
            } else {
                old_rsp
            };
            rsp &= !0xf;
            let mut frame: Vec<u64> = vec![
                u64::from(old_ss.selector),
                old_rsp,
                old_rflags,
                u64::from(old_cs),
                rip,
            ];
            if let Some(e) = ec {
                frame.push(u64::from(e));
            }
            let la57 = self.st.sregs.cr4 & crate::vcpu::sregs::CR4_LA57 != 0;
            for v in frame {
                rsp = rsp.wrapping_sub(8);
                if !crate::paging::is_canonical(rsp, la57) {
                    return Err(exc_ec(vector::SS, ext_ec));
                }
                self.write_lin(rsp, &v.to_le_bytes(), push_kind)?;
            }
            if !crate::paging::is_canonical(target, la57) {
                return Err(exc_ec(vector::GP, ext_ec));
            }
            if new_cpl < cpl {
                let mut ss = super::segment::null_segment(u16::from(new_cpl));
                ss.dpl = new_cpl;
                ss.db = 1;
                self.st.sregs.ss = ss;
            }
            self.gpr[4] = rsp;
            self.set_cs(sel, &cs, new_cpl)?;
            self.finish_delivery(target, trap, kind);
            return Ok(());
        }
        // 32-bit (or 16-bit gate) protected mode.
        let (mut ss_seg, mut esp) = (old_ss, old_rsp & 0xffff_ffff);
        let switching = new_cpl < cpl;
        if switching {
            let (nss, nesp) = self.tss32_stack(new_cpl)?;
            ss_seg = nss;
            esp = nesp;
        }
        let sz: u32 = if gate16 { 2 } else { 4 };
        let mut frame: Vec<u64> = Vec::with_capacity(6);
        if switching {
            frame.push(u64::from(old_ss.selector));
            frame.push(old_rsp);
        }
        frame.push(old_rflags);
        frame.push(u64::from(old_cs));
        frame.push(rip);
        if let Some(e) = ec {
            frame.push(u64::from(e));
        }
        let sp_mask = if ss_seg.db != 0 { 0xffff_ffff } else { 0xffff };
        let mut sp = esp;
        for v in frame {
            sp = sp.wrapping_sub(u64::from(sz)) & sp_mask;
            let off = sp;
            // The stack segment's limit (expand-up or down) as for any push.
            let limit_ok = if ss_seg.type_ & 4 != 0 {
                off > u64::from(ss_seg.limit)
            } else {
                off + u64::from(sz) - 1 <= u64::from(ss_seg.limit)
            };
            if !limit_ok {
                let e = if switching {
                    u32::from(ss_seg.selector & !3) + ext_ec
                } else {
                    ext_ec
                };
                return Err(exc_ec(vector::SS, e));
            }
            let lin = ss_seg.base.wrapping_add(off) & 0xffff_ffff;
            let b = v.to_le_bytes();
            self.write_lin(lin, &b[..sz as usize], push_kind)?;
        }
        if target > u64::from(cs.limit()) {
            return Err(exc_ec(vector::GP, ext_ec));
        }
        if switching {
            self.st.sregs.ss = ss_seg;
        }
        self.gpr[4] = (if switching { 0 } else { old_rsp & !sp_mask }) | sp;
        self.set_cs(sel, &cs, new_cpl)?;
        let target = if gate16 { target & 0xffff } else { target };
        self.finish_delivery(target, trap, kind);
        Ok(())
    }

    fn finish_delivery(&mut self, target: u64, trap: bool, kind: EventKind) {
        let mut f = self.rflags() & !(TF | NT | RF | VM);
        if !trap {
            f &= !IF;
        }
        self.st.regs.rflags = f;
        self.st.regs.rip = target;
        self.next_rip = target;
        if kind == EventKind::External {
            // NMI delivery blocks NMIs until IRET.
        }
    }

    /// Real mode: the IVT entry at IDTR.base + 4 * vector; FLAGS, CS, IP pushed.
    fn deliver_real(&mut self, vec: u8, rip: u64) -> R<()> {
        let idt = self.st.sregs.idt;
        let off = u64::from(vec) * 4;
        if off + 3 > u64::from(idt.limit) {
            return Err(gp0());
        }
        let mut b = [0u8; 4];
        self.read_lin(
            idt.base.wrapping_add(off),
            &mut b,
            AccessKind {
                implicit: false,
                ..implicit_kind(false)
            },
        )?;
        let ip = u64::from(u16::from_le_bytes([b[0], b[1]]));
        let cs = u16::from_le_bytes([b[2], b[3]]);
        let fl = self.rflags();
        let sp0 = self.gpr[4];
        let frame = [
            fl & 0xffff,
            u64::from(self.st.sregs.cs.selector),
            rip & 0xffff,
        ];
        for v in frame {
            if let Err(e) = self.push(v, 2) {
                self.gpr[4] = sp0;
                return Err(e);
            }
        }
        self.st.regs.rflags = fl & !(IF | TF | AC | RF);
        let old = self.st.sregs.cs;
        self.st.sregs.cs = super::segment::real_segment(&old, cs);
        self.st.regs.rip = ip;
        self.next_rip = ip;
        Ok(())
    }

    /// A read of the current TSS at `off` (#TS(TR) past its limit).
    pub fn tss_read(&mut self, off: u64, size: u32) -> R<u64> {
        let tr = self.st.sregs.tr;
        if off + u64::from(size) - 1 > u64::from(tr.limit) {
            return Err(exc_ec(vector::TS, u32::from(tr.selector & !3)));
        }
        let mut b = [0u8; 8];
        self.read_lin(
            tr.base.wrapping_add(off),
            &mut b[..size as usize],
            implicit_kind(false),
        )?;
        Ok(u64::from_le_bytes(b))
    }

    /// SS:ESP for privilege level `cpl` from a 32-bit TSS, with the checks of a
    /// stack switch (#TS(selector)).
    fn tss32_stack(&mut self, cpl: u8) -> R<(kvm_segment, u64)> {
        let esp = self.tss_read(4 + 8 * u64::from(cpl), 4)?;
        let sel = self.tss_read(8 + 8 * u64::from(cpl), 2)? as u16;
        let ts = exc_ec(vector::TS, u32::from(sel & !3));
        if sel & !3 == 0 || (sel & 3) as u8 != cpl {
            return Err(ts);
        }
        let Some(d): Option<Desc> = self.read_descriptor(sel, false)? else {
            return Err(ts);
        };
        if !d.s() || d.is_code() || d.typ() & 2 == 0 || d.dpl() != cpl {
            return Err(ts);
        }
        if !d.present() {
            return Err(exc_ec(vector::SS, u32::from(sel & !3)));
        }
        let mut seg = d.segment(sel);
        seg.type_ |= 1;
        Ok((seg, esp))
    }
}
