//! Memslot lookup (gfn -> slot) with 1, 100 and 10,000 slots.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use kvmmmu_core::errno::Errno;
use kvmmmu_core::hostmem::HostRegion;
use kvmmmu_core::memslot::{MemSlots, RegionIoctl};
use kvmmmu_core::uapi::kvm_userspace_memory_region2;

const SLOT_PAGES: u64 = 16;

fn table(n: u32, host: &HostRegion) -> MemSlots {
    let mut slots = MemSlots::new();
    for i in 0..n {
        // one-page holes between slots so misses are exercised too
        let r = kvm_userspace_memory_region2 {
            slot: i,
            guest_phys_addr: u64::from(i) * (SLOT_PAGES + 1) * 4096,
            memory_size: SLOT_PAGES * 4096,
            userspace_addr: host.addr(),
            ..Default::default()
        };
        slots
            .set_region(&r, RegionIoctl::V1, |h, l| {
                HostRegion::lookup(h, l).ok_or(Errno::EFAULT)
            })
            .unwrap();
    }
    slots
}

fn bench_lookup(c: &mut Criterion) {
    let host = HostRegion::new(SLOT_PAGES * 4096).unwrap();
    let mut g = c.benchmark_group("memslot_lookup");
    for n in [1u32, 100, 10_000] {
        let slots = table(n, &host);
        let span = u64::from(n) * (SLOT_PAGES + 1);
        // a fixed pseudo-random sequence of gfns across the whole table
        let gfns: Vec<u64> = (0..4096u64)
            .map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 11) % span)
            .collect();
        g.bench_with_input(BenchmarkId::new("random", n), &n, |b, _| {
            b.iter(|| {
                let mut hits = 0u32;
                for &gfn in &gfns {
                    hits += u32::from(slots.lookup(black_box(gfn)).is_some());
                }
                hits
            })
        });
        g.bench_with_input(BenchmarkId::new("sequential", n), &n, |b, _| {
            b.iter(|| {
                let mut hits = 0u32;
                for gfn in 0..4096u64.min(span) {
                    hits += u32::from(slots.lookup(black_box(gfn)).is_some());
                }
                hits
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_lookup);
criterion_main!(benches);
