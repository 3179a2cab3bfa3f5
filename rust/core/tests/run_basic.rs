//! KVM_RUN on the simulator: exits and their kvm_run contents (long mode, CPL0).

use iced_x86::code_asm::*;
use kvmmmu_core::paging::PagingMode;
use kvmmmu_core::testkit::TestGuest;
use kvmmmu_core::uapi::run_off::EXIT_UNION;
use kvmmmu_core::vcpu::run::*;

const P: u64 = 1;
const W: u64 = 2;
const CODE: u64 = 0x1000;
const MMIO: u64 = 0xe000_0000;

/// A long-mode guest with 0..2 MiB identity mapped, MMIO at 0xe0000000, `code` at
/// 0x1000 and RSP at 0x8000.
fn guest(code: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> TestGuest {
    let mut g = TestGuest::new(PagingMode::Long4, 4 << 20).unwrap();
    let root = g.cr3();
    g.map(root, 0, 0, 2, P | W);
    g.map(root, MMIO, MMIO, 1, P | W);
    g.flat_segments(0);
    let bytes = TestGuest::assemble(64, CODE, code);
    g.write_bytes(CODE, &bytes);
    let mut r = g.vcpu.get_regs();
    r.rip = CODE;
    r.rsp = 0x8000;
    r.rflags = 2;
    g.vcpu.set_regs(&r).unwrap();
    g
}

fn u32_at(g: &TestGuest, off: usize) -> u32 {
    u32::from_le_bytes(g.run_bytes(off, 4).try_into().unwrap())
}
fn u64_at(g: &TestGuest, off: usize) -> u64 {
    u64::from_le_bytes(g.run_bytes(off, 8).try_into().unwrap())
}

#[test]
fn out_mmio_hlt_exits() {
    let g = guest(|a| {
        a.mov(rax, 0x1122_3344_5566_7788u64)?;
        a.mov(rdx, MMIO)?;
        a.mov(rbx, qword_ptr(rdx))?; // MMIO read
        a.mov(qword_ptr(rdx + 8), rax)?; // MMIO write
        a.out(0x10, al)?;
        a.hlt()?;
        Ok(())
    });
    // The read exits with RIP at the instruction.
    let (r, reason) = g.run();
    assert_eq!((r, reason), (Ok(0), KVM_EXIT_MMIO));
    assert_eq!(u64_at(&g, EXIT_UNION), MMIO);
    assert_eq!(u32_at(&g, EXIT_UNION + 16), 8);
    assert_eq!(g.run_bytes(EXIT_UNION + 20, 1), [0]);
    let rip_read = g.vcpu.get_regs().rip;
    assert_eq!(rip_read, CODE + 10 + 10);
    g.put_run_bytes(EXIT_UNION + 8, &0xa1a2_a3a4_a5a6_a7a8u64.to_le_bytes());
    // The write exits after the instruction, with the data.
    let (r, reason) = g.run();
    assert_eq!((r, reason), (Ok(0), KVM_EXIT_MMIO));
    assert_eq!(g.vcpu.get_regs().rbx, 0xa1a2_a3a4_a5a6_a7a8);
    assert_eq!(u64_at(&g, EXIT_UNION), MMIO + 8);
    assert_eq!(u64_at(&g, EXIT_UNION + 8), 0x1122_3344_5566_7788);
    assert_eq!(g.run_bytes(EXIT_UNION + 20, 1), [1]);
    assert_eq!(g.vcpu.get_regs().rip, rip_read + 3 + 4);
    // OUT: direction, size, port, count, data_offset and the data in the PIO page.
    let (r, reason) = g.run();
    assert_eq!((r, reason), (Ok(0), KVM_EXIT_IO));
    assert_eq!(g.run_bytes(EXIT_UNION, 2), [KVM_EXIT_IO_OUT, 1]);
    assert_eq!(g.run_bytes(EXIT_UNION + 2, 2), 0x10u16.to_le_bytes());
    assert_eq!(u32_at(&g, EXIT_UNION + 4), 1);
    assert_eq!(u64_at(&g, EXIT_UNION + 8), 4096);
    assert_eq!(g.run_bytes(4096, 1), [0x88]);
    // HLT: RIP after it.
    let rip_out = g.vcpu.get_regs().rip;
    let (r, reason) = g.run();
    assert_eq!((r, reason), (Ok(0), KVM_EXIT_HLT));
    assert_eq!(g.vcpu.get_regs().rip, rip_out + 1);
    let s = &g.vcpu.stats;
    use kvmmmu_core::stats::VcpuStat;
    assert_eq!(s.get(VcpuStat::MmioExits as usize), 2);
    assert_eq!(s.get(VcpuStat::IoExits as usize), 1);
    assert_eq!(s.get(VcpuStat::HaltExits as usize), 1);
    // The two MMIO accesses go through KVM's emulator (once each).
    assert_eq!(s.get(VcpuStat::InsnEmulation as usize), 2);
    g.audit().unwrap();
}

#[test]
fn port_in_completes_on_reentry() {
    let g = guest(|a| {
        a.mov(dx, 0x3f8u32)?;
        a.in_(eax, dx)?;
        a.hlt()?;
        Ok(())
    });
    let (r, reason) = g.run();
    assert_eq!((r, reason), (Ok(0), KVM_EXIT_IO));
    assert_eq!(g.run_bytes(EXIT_UNION, 2), [KVM_EXIT_IO_IN, 4]);
    let rip = g.vcpu.get_regs().rip;
    assert_eq!(rip, CODE + 4);
    g.put_run_bytes(4096, &0xdead_beefu32.to_le_bytes());
    let (r, reason) = g.run();
    assert_eq!((r, reason), (Ok(0), KVM_EXIT_HLT));
    assert_eq!(g.vcpu.get_regs().rax, 0xdead_beef);
}

#[test]
fn unimplemented_instruction_is_an_emulation_failure() {
    // XGETBV is decoded but not modelled.
    let g = guest(|a| {
        a.nop()?;
        a.xgetbv()?;
        Ok(())
    });
    let (r, reason) = g.run();
    assert_eq!((r, reason), (Ok(0), KVM_EXIT_INTERNAL_ERROR));
    assert_eq!(u32_at(&g, EXIT_UNION), KVM_INTERNAL_ERROR_EMULATION);
    assert_eq!(u32_at(&g, EXIT_UNION + 4), 8);
    assert_eq!(u64_at(&g, EXIT_UNION + 8), 1);
    assert_eq!(g.run_bytes(EXIT_UNION + 16, 4), [15, 0x0f, 0x01, 0xd0]);
    // The exit information as the device gives it.
    assert_eq!(u64_at(&g, EXIT_UNION + 32), 0x1000);
    assert_eq!(g.vcpu.get_regs().rip, CODE + 1);
}

#[test]
fn immediate_exit_and_no_memslots() {
    let g = guest(|a| a.hlt());
    g.put_run_bytes(kvmmmu_core::uapi::run_off::IMMEDIATE_EXIT, &[1]);
    g.put_run_bytes(kvmmmu_core::uapi::run_off::EXIT_REASON, &[0x77, 0, 0, 0]);
    let (r, reason) = g.run();
    assert_eq!(r, Err(kvmmmu_core::errno::Errno::EINTR));
    assert_eq!(reason, 0x77, "exit_reason untouched (device)");
    g.put_run_bytes(kvmmmu_core::uapi::run_off::IMMEDIATE_EXIT, &[0]);
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT));

    let vm = kvmmmu_core::vm::Vm::new(0).unwrap();
    let v = vm.create_vcpu(0).unwrap();
    assert_eq!(v.run(), Err(kvmmmu_core::errno::Errno::ENOSPC));
}

#[test]
fn compute_loop_and_flags() {
    let g = guest(|a| {
        a.mov(ecx, 1000)?;
        a.xor(eax, eax)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.add(eax, ecx)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.mov(ebx, 0xffff_ffffu32)?;
        a.add(ebx, 1)?;
        a.pushfq()?;
        a.pop(rsi)?;
        a.hlt()?;
        Ok(())
    });
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT));
    let r = g.vcpu.get_regs();
    assert_eq!(r.rax, 500_500);
    assert_eq!(r.rcx, 0);
    assert_eq!(r.rbx, 0);
    // CF, PF, AF, ZF and the fixed bit.
    assert_eq!(r.rsi & 0xfff, 0x57);
}

#[test]
fn string_io_exits() {
    // REP OUTSB: one exit per byte, RIP on the instruction (also after the last,
    // until the re-entry finishes it); REP INSW: one exit for the whole count.
    let data = 0x3000u64;
    let g = guest(|a| {
        a.mov(ecx, 4)?;
        a.mov(edx, 0x30)?;
        a.mov(esi, data as u32)?;
        a.rep().outsb()?;
        a.mov(ecx, 3)?;
        a.mov(edi, data as u32 + 0x100)?;
        a.rep().insw()?;
        a.hlt()?;
        Ok(())
    });
    g.write_bytes(data, b"abcd");
    for (i, byte) in b"abcd".iter().enumerate() {
        assert_eq!(g.run(), (Ok(0), KVM_EXIT_IO));
        assert_eq!(g.run_bytes(EXIT_UNION, 2), [KVM_EXIT_IO_OUT, 1]);
        assert_eq!(u32_at(&g, EXIT_UNION + 4), 1);
        assert_eq!(g.run_bytes(4096, 1), [*byte]);
        let r = g.vcpu.get_regs();
        assert_eq!((r.rip, r.rcx), (CODE + 15, 3 - i as u64));
    }
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_IO));
    assert_eq!(g.run_bytes(EXIT_UNION, 2), [KVM_EXIT_IO_IN, 2]);
    assert_eq!(u32_at(&g, EXIT_UNION + 4), 3);
    g.put_run_bytes(4096, &[1, 2, 3, 4, 5, 6]);
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT));
    assert_eq!(g.read_bytes(data + 0x100, 8), [1, 2, 3, 4, 5, 6, 0, 0]);
    assert_eq!(g.vcpu.get_regs().rcx, 0);
}

/// `cargo test --release --test run_basic -- --ignored --nocapture perf_loop`: 100 M
/// instructions of `dec ecx; jnz` (PERF_LOOP=<iterations> to change; for profiling).
#[test]
#[ignore = "a timing loop, not a check"]
fn perf_loop() {
    let n: u32 = std::env::var("PERF_LOOP")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000_000);
    let g = guest(|a| {
        a.mov(ecx, n)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.hlt()?;
        Ok(())
    });
    let t = std::time::Instant::now();
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT));
    let ns = t.elapsed().as_nanos() as f64 / (2.0 * f64::from(n));
    println!("{ns:.1} ns per instruction");
}

/// `cargo test --release --test run_basic -- --ignored --nocapture perf_first_touch`:
/// CPL3 code writing one byte to each of PERF_PAGES (4096) fresh pages (gptes with A
/// clear, host memory populated): one shadow page fault per page.
#[test]
#[ignore = "a timing loop, not a check"]
fn perf_first_touch() {
    let pages: u32 = std::env::var("PERF_PAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4096);
    let data = 0x40_0000u64;
    let mut g = TestGuest::new(PagingMode::Long4, 64 << 20).unwrap();
    let root = g.cr3();
    g.map(root, 0, 0, 2, P | W | 4);
    g.map(root, MMIO, MMIO, 1, P | W | 4);
    for i in 0..u64::from(pages) {
        g.map(root, data + i * 4096, data + i * 4096, 1, P | W | 4);
        g.write_bytes(data + i * 4096 + 8, &[0]);
    }
    g.flat_segments(3);
    let code = TestGuest::assemble(64, CODE, |a| {
        a.mov(rbx, data)?;
        a.mov(ecx, pages)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.mov(byte_ptr(rbx), 1)?;
        a.add(rbx, 4096)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.mov(rax, MMIO)?;
        a.mov(byte_ptr(rax), 0)?;
        Ok(())
    });
    g.write_bytes(CODE, &code);
    let mut r = g.vcpu.get_regs();
    (r.rip, r.rsp, r.rflags) = (CODE, 0x8000, 2);
    g.vcpu.set_regs(&r).unwrap();
    let t = std::time::Instant::now();
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_MMIO));
    let ns = t.elapsed().as_nanos() as f64 / f64::from(pages);
    println!("{ns:.0} ns per first-touch page");
}
