//! KVM_RUN on the simulator: guest instructions per second and exits per second.
//!
//! - `run/compute_loop`: `dec ecx; jnz` in 64-bit CPL0 code (2 instructions per
//!   iteration, throughput in instructions); the target is < 30 ns per
//!   instruction (20x the device's ~0.6 us emulated instruction).
//! - `run/first_touch`: CPL3 code writing one byte to each of 4096 fresh pages whose
//!   gptes have A clear (one shadow page fault fixed per page), per page; host memory
//!   is populated before the clock starts (the device's 2.9 us is measured so too).
//! - `run/out_exit`: an `out` + `jmp` loop: one KVM_EXIT_IO per KVM_RUN.

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use iced_x86::code_asm::*;
use kvmmmu_core::paging::PagingMode;
use kvmmmu_core::testkit::TestGuest;
use kvmmmu_core::vcpu::run::{KVM_EXIT_HLT, KVM_EXIT_IO, KVM_EXIT_MMIO};

const P: u64 = 1;
const W: u64 = 2;
const U: u64 = 4;
const CODE: u64 = 0x1000;
const DATA: u64 = 0x40_0000;

fn guest(
    cpl: u8,
    pages: u64,
    code: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> TestGuest {
    let mut g = TestGuest::new(PagingMode::Long4, 64 << 20).unwrap();
    let root = g.cr3();
    for p in (0..0x20_0000u64).step_by(4096) {
        g.map(root, p, p, 1, P | W | U);
    }
    for i in 0..pages {
        g.map(root, DATA + i * 4096, DATA + i * 4096, 1, P | W | U);
    }
    g.map(root, 0xe000_0000, 0xe000_0000, 1, P | W | U);
    g.flat_segments(cpl);
    let bytes = TestGuest::assemble(64, CODE, code);
    g.write_bytes(CODE, &bytes);
    let mut r = g.vcpu.get_regs();
    r.rip = CODE;
    r.rsp = 0x8000;
    r.rflags = 2;
    g.vcpu.set_regs(&r).unwrap();
    g
}

fn compute(c: &mut Criterion) {
    const N: u64 = 1_000_000;
    let mut grp = c.benchmark_group("run");
    grp.throughput(Throughput::Elements(2 * N));
    grp.bench_function("compute_loop", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let g = guest(0, 0, |a| {
                    a.mov(ecx, N as u32)?;
                    let mut top = a.create_label();
                    a.set_label(&mut top)?;
                    a.dec(ecx)?;
                    a.jnz(top)?;
                    a.hlt()?;
                    Ok(())
                });
                let t = Instant::now();
                let (r, reason) = g.run();
                total += t.elapsed();
                assert_eq!((r.unwrap(), reason), (0, KVM_EXIT_HLT));
            }
            total
        })
    });
    const PAGES: u64 = 4096;
    grp.throughput(Throughput::Elements(PAGES));
    grp.bench_function("first_touch", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let g = guest(3, PAGES, |a| {
                    a.mov(rbx, DATA)?;
                    a.mov(ecx, PAGES as u32)?;
                    let mut top = a.create_label();
                    a.set_label(&mut top)?;
                    a.mov(byte_ptr(rbx), 1)?;
                    a.add(rbx, 4096)?;
                    a.dec(ecx)?;
                    a.jnz(top)?;
                    // CPL3 cannot HLT: end with an MMIO write.
                    a.mov(rax, 0xe000_0000u64)?;
                    a.mov(byte_ptr(rax), 0)?;
                    Ok(())
                });
                // Host memory populated first, as in the device's 2.9 us figure.
                for i in 0..PAGES {
                    g.write_bytes(DATA + i * 4096 + 8, &[0]);
                }
                let t = Instant::now();
                let (r, reason) = g.run();
                total += t.elapsed();
                assert_eq!((r.unwrap(), reason), (0, KVM_EXIT_MMIO));
            }
            total
        })
    });
    grp.throughput(Throughput::Elements(1));
    let g = guest(0, 0, |a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.out(0x10, al)?;
        a.jmp(top)?;
        Ok(())
    });
    grp.bench_function("out_exit", |b| {
        b.iter(|| {
            let (r, reason) = g.run();
            assert_eq!((r.unwrap(), reason), (0, KVM_EXIT_IO));
        })
    });
    grp.finish();
}

fn main() {
    let mut c = Criterion::default()
        .configure_from_args()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(10);
    compute(&mut c);
    c.final_summary();
}
