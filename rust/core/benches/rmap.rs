//! The reverse map: add, remove and walk N contiguous 4K mappings (N = 512, 262144),
//! and the metadata it holds per mapped page.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use kvmmmu_core::mmu::rmap::{spte_ptr, Rmap};

const SIZES: [u64; 2] = [512, 262_144];
/// A 4 GiB slot at 1 GiB, so the mapped range is a small part of it.
const BASE: u64 = 1 << 18;
const SLOT: u64 = 1 << 20;

/// The SPTE that maps the n-th page: one 4K shadow page per 512 gfns, as a fault
/// path filling a guest's memory would produce.
fn sptep(n: u64) -> u64 {
    spte_ptr((n >> 9) as u32, (n & 0x1ff) as usize)
}

fn filled(n: u64) -> Rmap {
    let mut r = Rmap::new(BASE, SLOT);
    for g in 0..n {
        r.add(BASE + g, 1, sptep(g));
    }
    r
}

fn bench_rmap(c: &mut Criterion) {
    for n in SIZES {
        let r = filled(n);
        eprintln!(
            "rmap memory, {n} contiguous 4K mappings: {} bytes, {:.3} bytes per mapped page",
            r.memory_bytes(),
            r.memory_bytes() as f64 / n as f64
        );
    }

    let mut g = c.benchmark_group("rmap");
    for n in SIZES {
        g.throughput(Throughput::Elements(n));
        g.bench_with_input(BenchmarkId::new("add", n), &n, |b, &n| {
            b.iter_batched(
                || Rmap::new(BASE, SLOT),
                |mut r| {
                    for g in 0..n {
                        r.add(black_box(BASE + g), 1, sptep(g));
                    }
                    r
                },
                BatchSize::LargeInput,
            )
        });
        g.bench_with_input(BenchmarkId::new("remove", n), &n, |b, &n| {
            b.iter_batched(
                || filled(n),
                |mut r| {
                    for g in 0..n {
                        assert!(r.remove(black_box(BASE + g), 1, sptep(g)));
                    }
                    r
                },
                BatchSize::LargeInput,
            )
        });
        let r = filled(n);
        g.bench_with_input(BenchmarkId::new("iter", n), &n, |b, &n| {
            b.iter(|| {
                let mut sum = 0u64;
                for g in 0..n {
                    for p in r.iter(black_box(BASE + g), 1) {
                        sum = sum.wrapping_add(p);
                    }
                }
                sum
            })
        });
        g.bench_with_input(BenchmarkId::new("iter_all", n), &n, |b, _| {
            b.iter(|| r.iter_all().fold(0u64, |s, (gfn, _, p)| s ^ gfn ^ p))
        });
    }
    g.finish();
}

criterion_group!(benches, bench_rmap);
criterion_main!(benches);
