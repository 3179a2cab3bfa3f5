//! Guest page-table walks: cold 4-level walks (no TLB in front of the walker: every
//! walk reads all four levels from guest memory) over many distinct pages.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kvmmmu_core::errno::Errno;
use kvmmmu_core::hostmem::HostRegion;
use kvmmmu_core::memslot::{MemSlots, RegionIoctl};
use kvmmmu_core::paging::{Access, GuestMmu, WalkCtx};
use kvmmmu_core::uapi::kvm_userspace_memory_region2;

const PAGES: u64 = 1 << 16; // 256 MiB of guest-virtual space, 128 page tables
const P: u64 = 1;
const W: u64 = 2;
const U: u64 = 4;
const A: u64 = 1 << 5;

/// A 4-level guest: tables from 1 MiB up, data pages mapped 1:1 above 64 MiB.
fn guest(accessed: bool) -> (MemSlots, WalkCtx) {
    let size = 512 << 20;
    let host = HostRegion::new(size).unwrap();
    let mut slots = MemSlots::new();
    let r = kvm_userspace_memory_region2 {
        slot: 0,
        memory_size: size,
        userspace_addr: host.addr(),
        ..Default::default()
    };
    slots
        .set_region(&r, RegionIoctl::V1, |h, l| {
            HostRegion::lookup(h, l).ok_or(Errno::EFAULT)
        })
        .unwrap();
    let a = if accessed { A } else { 0 };
    let put = |gpa: u64, v: u64| host.write(gpa as usize, &v.to_le_bytes()).unwrap();
    let (pml4, pdpt, pd) = (0x10_0000u64, 0x10_1000u64, 0x10_2000u64);
    put(pml4, pdpt | P | W | U | a);
    put(pdpt, pd | P | W | U | a);
    for t in 0..PAGES / 512 {
        let pt = 0x20_0000 + t * 4096;
        put(pd + 8 * t, pt | P | W | U | a);
        for i in 0..512 {
            let page = t * 512 + i;
            put(pt + 8 * i, (0x400_0000 + page * 4096) | P | W | U | a);
        }
    }
    let ctx = WalkCtx {
        cr0: 0x8001_0011,
        cr3: pml4,
        cr4: 0x20,
        efer: 0xd00,
        maxphyaddr: 48,
        ..Default::default()
    };
    (slots, ctx)
}

/// A fixed pseudo-random order over the first `pages` pages.
fn order(pages: u64) -> Vec<u64> {
    (0..PAGES)
        .map(|i| ((i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 20) % pages) * 4096 + 0x18)
        .collect()
}

fn bench_walk(c: &mut Criterion) {
    let (slots, ctx) = guest(true);
    let mmu = GuestMmu::new(&ctx);
    // 4096 pages: the 32 KiB of PTEs stay in the CPU caches, so this is the walker's
    // own cost; 65536 pages: 512 KiB of PTEs, most walks miss L2.
    let small = order(4096);
    let mut g = c.benchmark_group("walk_4level_4k_pages");
    g.throughput(Throughput::Elements(small.len() as u64));
    g.bench_function("read_random_pages", |b| {
        b.iter(|| {
            let mut sum = 0u64;
            for &gva in &small {
                sum ^= mmu.walk(&slots, black_box(gva), Access::READ).unwrap().gpa;
            }
            sum
        })
    });
    g.finish();

    let gvas = order(PAGES);
    let mut g = c.benchmark_group("walk_4level");
    g.throughput(Throughput::Elements(gvas.len() as u64));
    g.bench_function("read_random_pages", |b| {
        b.iter(|| {
            let mut sum = 0u64;
            for &gva in &gvas {
                sum ^= mmu.walk(&slots, black_box(gva), Access::READ).unwrap().gpa;
            }
            sum
        })
    });
    let user_write = Access {
        write: true,
        user: true,
        ..Access::default()
    };
    g.bench_function("user_write_random_pages", |b| {
        b.iter(|| {
            let mut sum = 0u64;
            for &gva in &gvas {
                sum ^= mmu.walk(&slots, black_box(gva), user_write).unwrap().gpa;
            }
            sum
        })
    });
    g.finish();

    // First touch: every walk sets A on the way (fresh tables per iteration batch).
    let mut g = c.benchmark_group("walk_4level_first_touch");
    g.throughput(Throughput::Elements(gvas.len() as u64));
    g.sample_size(10);
    g.bench_function("read_sets_accessed_bits", |b| {
        b.iter_batched(
            || guest(false),
            |(slots, ctx)| {
                let mmu = GuestMmu::new(&ctx);
                let mut sum = 0u64;
                for &gva in &gvas {
                    sum ^= mmu.walk(&slots, gva, Access::READ).unwrap().gpa;
                }
                sum
            },
            criterion::BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench_walk);
criterion_main!(benches);
