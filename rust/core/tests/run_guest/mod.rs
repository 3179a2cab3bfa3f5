//! Guests for the KVM_RUN tests: page tables, GDT, IDT, TSS and exception stubs
//! that record (vector, error code, CR2, return RIP, CS, SS, RSP) and halt.

#![allow(dead_code)]

use iced_x86::code_asm::*;
use kvmmmu_core::paging::PagingMode;
use kvmmmu_core::testkit::TestGuest;
use kvmmmu_core::uapi::kvm_segment;

pub const P: u64 = 1;
pub const W: u64 = 2;
pub const U: u64 = 4;
pub const A: u64 = 1 << 5;
pub const D: u64 = 1 << 6;

pub const CODE: u64 = 0x1000;
pub const GDT: u64 = 0x3000;
pub const IDT: u64 = 0x4000;
pub const TSS: u64 = 0x5000;
pub const STUBS: u64 = 0x6000;
pub const RESULT: u64 = 0x7000;
pub const STACK0: u64 = 0x9000;
pub const STACK3: u64 = 0xb000;
pub const MMIO: u64 = 0xe000_0000;

/// What an exception stub recorded.
#[derive(Debug, PartialEq, Eq)]
pub struct Report {
    pub vector: u64,
    pub error_code: u64,
    pub cr2: u64,
    pub rip: u64,
    pub cs: u64,
    pub rsp_at_entry: u64,
}

pub fn report(g: &TestGuest) -> Report {
    let q = |i: u64| g.read_u64(RESULT + 8 * i);
    Report {
        vector: q(0),
        error_code: q(1),
        cr2: q(2),
        rip: q(3),
        cs: q(4),
        rsp_at_entry: q(5),
    }
}

fn has_error_code(v: u32) -> bool {
    matches!(v, 8 | 10..=14 | 17)
}

pub fn seg(selector: u16, type_: u8, dpl: u8, long: bool, s: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db: u8::from(!long && s != 0),
        s,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// A long-mode (4-level) guest: 0..2 MiB mapped supervisor-only except the pages
/// given to `user_pages`, GDT (null, code64 0x08, data 0x10, code64 DPL3 0x1b,
/// data DPL3 0x23, TSS 0x28), an IDT with 32 recording stubs, RSP0 = STACK0,
/// `code` at CODE.
pub fn long_guest(
    cpl: u8,
    user_pages: &[u64],
    code: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> TestGuest {
    long_guest_on(
        TestGuest::new(PagingMode::Long4, 4 << 20).unwrap(),
        cpl,
        user_pages,
        code,
    )
}

/// [`long_guest`] on a given (fresh, 4-level) guest, e.g. one with TDP.
pub fn long_guest_on(
    mut g: TestGuest,
    cpl: u8,
    user_pages: &[u64],
    code: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> TestGuest {
    identity_map(&mut g, user_pages);
    let gdt: [u64; 7] = [
        0,
        0x0020_9a00_0000_0000,
        0x00cf_9200_0000_ffff,
        0x0020_fa00_0000_0000,
        0x00cf_f200_0000_ffff,
        tss_desc_lo(TSS, 0x67),
        0,
    ];
    write_gdt(&g, &gdt);
    // TSS: RSP0 and IST1.
    g.write_u64(TSS + 4, STACK0);
    g.write_u64(TSS + 0x24, STACK0 - 0x800);
    // IDT and stubs.
    let mut addr = STUBS;
    for v in 0..32u32 {
        let stub = TestGuest::assemble(64, addr, |a| {
            if has_error_code(v) {
                a.pop(rax)?;
            } else {
                a.xor(eax, eax)?;
            }
            a.mov(qword_ptr(RESULT + 8), rax)?;
            a.mov(qword_ptr(RESULT), v as i32)?;
            a.mov(rax, cr2)?;
            a.mov(qword_ptr(RESULT + 16), rax)?;
            a.mov(rax, qword_ptr(rsp))?;
            a.mov(qword_ptr(RESULT + 24), rax)?;
            a.mov(rax, qword_ptr(rsp + 8))?;
            a.mov(qword_ptr(RESULT + 32), rax)?;
            a.mov(qword_ptr(RESULT + 40), rsp)?;
            a.hlt()?;
            Ok(())
        });
        g.write_bytes(addr, &stub);
        let lo = (addr & 0xffff) | (0x08 << 16) | (0x8e << 40) | ((addr >> 16) & 0xffff) << 48;
        g.write_u64(IDT + 16 * u64::from(v), lo);
        g.write_u64(IDT + 16 * u64::from(v) + 8, addr >> 32);
        addr += 128;
    }
    {
        let mut st = g.vcpu.state();
        let s = &mut st.sregs;
        s.gdt.base = GDT;
        s.gdt.limit = 7 * 8 - 1;
        s.idt.base = IDT;
        s.idt.limit = 32 * 16 - 1;
        s.tr = kvm_segment {
            base: TSS,
            limit: 0x67,
            selector: 0x28,
            type_: 11,
            present: 1,
            g: 0,
            ..seg(0x28, 11, 0, false, 0)
        };
        s.tr.db = 0;
        flat_segments(s, cpl, true);
    }
    load_code(&g, 64, if cpl == 3 { STACK3 } else { STACK0 }, code);
    g
}

/// Maps 0..2 MiB identity, supervisor-writable except `user_pages` (user too),
/// and the MMIO page user-writable.
fn identity_map(g: &mut TestGuest, user_pages: &[u64]) {
    let root = g.cr3();
    for page in (0..0x20_0000u64).step_by(4096) {
        let u = if user_pages.contains(&page) { U } else { 0 };
        g.map(root, page, page, 1, P | W | u);
    }
    g.map(root, MMIO, MMIO, 1, P | W | U);
}

fn write_gdt(g: &TestGuest, gdt: &[u64]) {
    for (i, d) in gdt.iter().enumerate() {
        g.write_u64(GDT + 8 * i as u64, *d);
    }
}

/// CS and the data segments from the GDT layout both guests share: CPL0 code 0x08 /
/// data 0x10, CPL3 code 0x1b / data 0x23.
fn flat_segments(s: &mut kvmmmu_core::uapi::kvm_sregs, cpl: u8, long: bool) {
    let (csel, dsel) = if cpl == 3 { (0x1b, 0x23) } else { (0x08, 0x10) };
    s.cs = seg(csel, 11, cpl, long, 1);
    let d = seg(dsel, 3, cpl, false, 1);
    (s.ds, s.es, s.ss, s.fs, s.gs) = (d, d, d, d, d);
}

/// Assembles `code` for `bits` at CODE and starts there with RSP = `stack`, RFLAGS = 2.
fn load_code(
    g: &TestGuest,
    bits: u32,
    stack: u64,
    code: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) {
    g.write_bytes(CODE, &TestGuest::assemble(bits, CODE, code));
    let mut r = g.vcpu.get_regs();
    (r.rip, r.rsp, r.rflags) = (CODE, stack, 2);
    g.vcpu.set_regs(&r).unwrap();
}

fn tss_desc_lo(base: u64, limit: u64) -> u64 {
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40)
        | ((limit >> 16) & 0xf) << 48
        | ((base >> 24) & 0xff) << 56
}

/// A 32-bit protected-mode guest (`mode`: no paging, 2-level or PAE) with 0..2 MiB
/// identity mapped supervisor-writable, GDT (null, code32 0x08, data 0x10, code32
/// DPL3 0x1b, data DPL3 0x23, TSS 0x28), a 32-bit TSS with SS0:ESP0 = 0x10:STACK0,
/// an IDT of 32 interrupt gates to stubs recording (vector, error code, CR2, EIP,
/// CS, ESP at entry) as 8-byte fields at RESULT, and `code` at CODE.
pub fn pm32_guest(
    mode: PagingMode,
    cpl: u8,
    user_pages: &[u64],
    code: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> TestGuest {
    let mut g = TestGuest::new(mode, 4 << 20).unwrap();
    if mode != PagingMode::None {
        identity_map(&mut g, user_pages);
        g.reload_pdptrs();
    }
    let gdt: [u64; 6] = [
        0,
        0x00cf_9a00_0000_ffff,
        0x00cf_9200_0000_ffff,
        0x00cf_fa00_0000_ffff,
        0x00cf_f200_0000_ffff,
        tss_desc_lo(TSS, 0x67),
    ];
    write_gdt(&g, &gdt);
    g.write_bytes(TSS + 4, &(STACK0 as u32).to_le_bytes());
    g.write_bytes(TSS + 8, &0x10u32.to_le_bytes());
    let mut addr = STUBS;
    for v in 0..32u32 {
        let stub = TestGuest::assemble(32, addr, |a| {
            if has_error_code(v) {
                a.pop(eax)?;
            } else {
                a.xor(eax, eax)?;
            }
            a.mov(dword_ptr(RESULT as u32 + 8), eax)?;
            a.mov(dword_ptr(RESULT as u32), v)?;
            a.mov(eax, cr2)?;
            a.mov(dword_ptr(RESULT as u32 + 16), eax)?;
            a.mov(eax, dword_ptr(esp))?;
            a.mov(dword_ptr(RESULT as u32 + 24), eax)?;
            a.mov(eax, dword_ptr(esp + 4))?;
            a.mov(dword_ptr(RESULT as u32 + 32), eax)?;
            a.mov(dword_ptr(RESULT as u32 + 40), esp)?;
            a.hlt()?;
            Ok(())
        });
        g.write_bytes(addr, &stub);
        let lo = (addr & 0xffff) | (0x08 << 16) | (0x8e << 40) | ((addr >> 16) & 0xffff) << 48;
        g.write_u64(IDT + 8 * u64::from(v), lo);
        addr += 128;
    }
    {
        let mut st = g.vcpu.state();
        let s = &mut st.sregs;
        s.gdt.base = GDT;
        s.gdt.limit = 6 * 8 - 1;
        s.idt.base = IDT;
        s.idt.limit = 32 * 8 - 1;
        s.tr = seg(0x28, 11, 0, false, 0);
        s.tr.base = TSS;
        s.tr.limit = 0x67;
        s.tr.g = 0;
        flat_segments(s, cpl, false);
    }
    load_code(&g, 32, if cpl == 3 { STACK3 } else { STACK0 }, code);
    g
}

/// A real-mode guest: CS = DS = SS = 0, IVT at 0, `code` at CODE, SP = STACK0.
pub fn real_guest(code: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> TestGuest {
    let g = TestGuest::new(PagingMode::None, 4 << 20).unwrap();
    {
        let mut st = g.vcpu.state();
        let s = &mut st.sregs;
        s.cr0 = 0x10;
        let mut r = seg(0, 3, 0, false, 1);
        r.limit = 0xffff;
        r.g = 0;
        r.db = 0;
        s.cs = kvm_segment { type_: 11, ..r };
        (s.ds, s.es, s.ss, s.fs, s.gs) = (r, r, r, r, r);
        s.idt.base = 0;
        s.idt.limit = 0x3ff;
    }
    load_code(&g, 16, STACK0, code);
    g
}

/// Runs `f` on another thread after `ms` milliseconds: an event that must arrive
/// while KVM_RUN is inside the guest.
pub fn after(ms: u64, f: impl FnOnce() + Send + 'static) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(ms));
        f()
    })
}

/// Kicks `vcpu` from another thread after `ms` milliseconds.
pub fn kick_after(
    vcpu: &std::sync::Arc<kvmmmu_core::vcpu::Vcpu>,
    ms: u64,
) -> std::thread::JoinHandle<()> {
    let v = std::sync::Arc::clone(vcpu);
    after(ms, move || v.kick())
}
