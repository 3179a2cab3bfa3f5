//! Segmentation: linear addresses with the limit and type checks of protected mode,
//! real-mode bases, long mode's flat segments (FS/GS bases, canonical checks), and
//! descriptor loads from the GDT/LDT (implicit supervisor accesses).

use iced_x86::Register;

use super::{exc_ec, gp0, vector, Cpu, R};
use crate::paging::is_canonical;
use crate::uapi::kvm_segment;
use crate::vcpu::guest_ops::AccessKind;
use crate::vcpu::sregs::CR4_LA57;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegReg {
    Es,
    Cs,
    Ss,
    Ds,
    Fs,
    Gs,
}

impl SegReg {
    pub fn from_register(r: Register) -> Option<SegReg> {
        Some(match r {
            Register::ES => SegReg::Es,
            Register::CS => SegReg::Cs,
            Register::SS => SegReg::Ss,
            Register::DS => SegReg::Ds,
            Register::FS => SegReg::Fs,
            Register::GS => SegReg::Gs,
            _ => return None,
        })
    }
}

/// A segment descriptor as read from a table.
#[derive(Clone, Copy, Debug, Default)]
pub struct Desc {
    pub lo: u32,
    pub hi: u32,
    /// Bits 63:32 of the base (16-byte system descriptors in long mode).
    pub base_hi: u32,
}

impl Desc {
    pub fn base(&self) -> u64 {
        u64::from((self.lo >> 16) | ((self.hi & 0xff) << 16) | (self.hi & 0xff00_0000))
            | (u64::from(self.base_hi) << 32)
    }
    pub fn limit(&self) -> u32 {
        let raw = (self.lo & 0xffff) | (self.hi & 0xf_0000);
        if self.g() {
            (raw << 12) | 0xfff
        } else {
            raw
        }
    }
    pub fn typ(&self) -> u8 {
        ((self.hi >> 8) & 0xf) as u8
    }
    pub fn s(&self) -> bool {
        self.hi & (1 << 12) != 0
    }
    pub fn dpl(&self) -> u8 {
        ((self.hi >> 13) & 3) as u8
    }
    pub fn present(&self) -> bool {
        self.hi & (1 << 15) != 0
    }
    pub fn avl(&self) -> bool {
        self.hi & (1 << 20) != 0
    }
    pub fn l(&self) -> bool {
        self.hi & (1 << 21) != 0
    }
    pub fn db(&self) -> bool {
        self.hi & (1 << 22) != 0
    }
    pub fn g(&self) -> bool {
        self.hi & (1 << 23) != 0
    }
    pub fn is_code(&self) -> bool {
        self.s() && self.typ() & 8 != 0
    }
    pub fn segment(&self, selector: u16) -> kvm_segment {
        kvm_segment {
            base: self.base(),
            limit: self.limit(),
            selector,
            type_: self.typ(),
            present: u8::from(self.present()),
            dpl: self.dpl(),
            db: u8::from(self.db()),
            s: u8::from(self.s()),
            l: u8::from(self.l()),
            g: u8::from(self.g()),
            avl: u8::from(self.avl()),
            unusable: 0,
            padding: 0,
        }
    }
}

/// A null selector's cached state: unusable.
pub fn null_segment(selector: u16) -> kvm_segment {
    kvm_segment {
        selector,
        unusable: 1,
        ..Default::default()
    }
}

/// The real-mode (and virtual-8086) state of a segment register loaded with `sel`.
pub fn real_segment(old: &kvm_segment, sel: u16) -> kvm_segment {
    kvm_segment {
        selector: sel,
        base: u64::from(sel) << 4,
        present: 1,
        s: 1,
        unusable: 0,
        ..*old
    }
}

impl Cpu<'_> {
    pub fn seg(&self, s: SegReg) -> &kvm_segment {
        let r = &self.st.sregs;
        match s {
            SegReg::Es => &r.es,
            SegReg::Cs => &r.cs,
            SegReg::Ss => &r.ss,
            SegReg::Ds => &r.ds,
            SegReg::Fs => &r.fs,
            SegReg::Gs => &r.gs,
        }
    }

    pub fn seg_mut(&mut self, s: SegReg) -> &mut kvm_segment {
        let r = &mut self.st.sregs;
        match s {
            SegReg::Es => &mut r.es,
            SegReg::Cs => &mut r.cs,
            SegReg::Ss => &mut r.ss,
            SegReg::Ds => &mut r.ds,
            SegReg::Fs => &mut r.fs,
            SegReg::Gs => &mut r.gs,
        }
    }

    fn seg_fault(s: SegReg) -> super::Stop {
        if s == SegReg::Ss {
            exc_ec(vector::SS, 0)
        } else {
            gp0()
        }
    }

    /// The linear address of `size` bytes at `off` in `s`, with the checks of the
    /// current mode (#GP(0), or #SS(0) for the stack).
    pub fn linearize(&self, s: SegReg, off: u64, size: u32, write: bool) -> R<u64> {
        if self.mode64() {
            let base = match s {
                SegReg::Fs | SegReg::Gs => self.seg(s).base,
                _ => 0,
            };
            let lin = base.wrapping_add(off);
            let la57 = self.st.sregs.cr4 & CR4_LA57 != 0;
            let last = lin.wrapping_add(u64::from(size.max(1)) - 1);
            if !is_canonical(lin, la57) || !is_canonical(last, la57) {
                return Err(Self::seg_fault(s));
            }
            return Ok(lin);
        }
        let seg = self.seg(s);
        let off = off & 0xffff_ffff;
        if self.protected() && !self.v86() {
            if seg.unusable != 0 || seg.present == 0 {
                return Err(Self::seg_fault(s));
            }
            let code = seg.type_ & 8 != 0;
            // Writes need a writable data segment; reads of execute-only code fault.
            if (write && code) || seg.type_ & 2 == 0 && (write || code) {
                return Err(Self::seg_fault(s));
            }
        }
        let last = off + u64::from(size.max(1)) - 1;
        let limit = u64::from(seg.limit);
        let expand_down = seg.type_ & 0xc == 0x4 && (self.protected() && !self.v86());
        let ok = if expand_down {
            let top = if seg.db != 0 { 0xffff_ffff } else { 0xffff };
            off > limit && last <= top
        } else {
            last <= limit
        };
        if !ok {
            return Err(Self::seg_fault(s));
        }
        Ok(seg.base.wrapping_add(off) & 0xffff_ffff)
    }

    /// Read the descriptor for `sel` from the GDT or LDT: None past the table limit.
    pub fn read_descriptor(&mut self, sel: u16, wide: bool) -> R<Option<Desc>> {
        let (base, limit) = if sel & 4 != 0 {
            let ldt = self.st.sregs.ldt;
            if ldt.unusable != 0 || ldt.present == 0 {
                return Ok(None);
            }
            (ldt.base, ldt.limit)
        } else {
            (self.st.sregs.gdt.base, u32::from(self.st.sregs.gdt.limit))
        };
        let off = u64::from(sel & !7);
        let len = if wide { 16 } else { 8 };
        if off + len - 1 > u64::from(limit) {
            return Ok(None);
        }
        let mut b = [0u8; 16];
        self.read_lin(
            base.wrapping_add(off),
            &mut b[..len as usize],
            implicit_kind(false),
        )?;
        let w = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Ok(Some(Desc {
            lo: w(0),
            hi: w(4),
            base_hi: if wide { w(8) } else { 0 },
        }))
    }

    /// Set the accessed bit of a descriptor (as the CPU does on a load).
    pub fn set_desc_accessed(&mut self, sel: u16, d: &Desc) -> R<()> {
        if d.typ() & 1 != 0 || !d.s() {
            return Ok(());
        }
        let base = if sel & 4 != 0 {
            self.st.sregs.ldt.base
        } else {
            self.st.sregs.gdt.base
        };
        let lin = base.wrapping_add(u64::from(sel & !7) + 5);
        let b = [((d.hi >> 8) as u8) | 1];
        self.write_lin(lin, &b, implicit_kind(true))
    }

    /// MOV/POP to a data segment register or SS (load_segment_descriptor): the
    /// protected-mode checks raise #GP(sel), #SS(sel) or #NP(sel).
    pub fn load_data_segment(&mut self, s: SegReg, sel: u16) -> R<()> {
        if !self.protected() || self.v86() {
            let old = *self.seg(s);
            *self.seg_mut(s) = real_segment(&old, sel);
            return Ok(());
        }
        let cpl = self.cpl();
        let ec = u32::from(sel & !3);
        if sel & !3 == 0 {
            // A null selector: fine for data segments, #GP for SS outside 64-bit mode
            // (and in 64-bit mode at CPL3 or with RPL != CPL).
            if s == SegReg::Ss && (!self.mode64() || cpl == 3 || (sel as u8 & 3) != cpl) {
                return Err(gp0());
            }
            let mut seg = null_segment(sel);
            if s == SegReg::Ss {
                seg.dpl = cpl;
                seg.db = 1;
            }
            *self.seg_mut(s) = seg;
            return Ok(());
        }
        let Some(d) = self.read_descriptor(sel, false)? else {
            return Err(exc_ec(vector::GP, ec));
        };
        let rpl = (sel & 3) as u8;
        if s == SegReg::Ss {
            if rpl != cpl || !d.s() || d.is_code() || d.typ() & 2 == 0 || d.dpl() != cpl {
                return Err(exc_ec(vector::GP, ec));
            }
            if !d.present() {
                return Err(exc_ec(vector::SS, ec));
            }
        } else {
            if !d.s() || (d.is_code() && d.typ() & 2 == 0) {
                return Err(exc_ec(vector::GP, ec));
            }
            // Data and non-conforming code: max(CPL, RPL) <= DPL.
            let conforming_code = d.is_code() && d.typ() & 4 != 0;
            if !conforming_code && (rpl > d.dpl() || cpl > d.dpl()) {
                return Err(exc_ec(vector::GP, ec));
            }
            if !d.present() {
                return Err(exc_ec(vector::NP, ec));
            }
        }
        self.set_desc_accessed(sel, &d)?;
        let mut seg = d.segment(sel);
        seg.type_ |= 1;
        *self.seg_mut(s) = seg;
        Ok(())
    }

    /// The descriptor of a code segment a far transfer loads (checks of a direct
    /// JMP/CALL far, RET far and IRET to the same or outer privilege).
    pub fn code_descriptor(&mut self, sel: u16, target_cpl: u8, ret: bool) -> R<Desc> {
        let ec = u32::from(sel & !3);
        if sel & !3 == 0 {
            return Err(gp0());
        }
        let Some(d) = self.read_descriptor(sel, false)? else {
            return Err(exc_ec(vector::GP, ec));
        };
        if !d.is_code() {
            return Err(exc_ec(vector::GP, ec));
        }
        let conforming = d.typ() & 4 != 0;
        if ret {
            if (sel & 3) as u8 != target_cpl
                || (conforming && d.dpl() > target_cpl)
                || (!conforming && d.dpl() != target_cpl)
            {
                return Err(exc_ec(vector::GP, ec));
            }
        } else if conforming {
            if d.dpl() > target_cpl {
                return Err(exc_ec(vector::GP, ec));
            }
        } else if d.dpl() != target_cpl || (sel & 3) as u8 > target_cpl {
            return Err(exc_ec(vector::GP, ec));
        }
        if self.long_mode() && d.l() && d.db() {
            return Err(exc_ec(vector::GP, ec));
        }
        if !d.present() {
            return Err(exc_ec(vector::NP, ec));
        }
        Ok(d)
    }

    /// Load CS from a checked descriptor at privilege `cpl`.
    pub fn set_cs(&mut self, sel: u16, d: &Desc, cpl: u8) -> R<()> {
        self.set_desc_accessed(sel, d)?;
        let mut cs = d.segment((sel & !3) | u16::from(cpl));
        cs.type_ |= 1;
        if !self.long_mode() {
            cs.l = 0;
        }
        self.st.sregs.cs = cs;
        Ok(())
    }
}

/// An implicit supervisor access (descriptor tables, TSS, IDT).
pub fn implicit_kind(write: bool) -> AccessKind {
    AccessKind {
        write,
        fetch: false,
        user: false,
        implicit: true,
    }
}

/// A flat 4 GiB code or data segment (what SYSCALL/SYSRET load; the test kit's
/// flat layout).
pub fn flat_segment(selector: u16, type_: u8, dpl: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}
