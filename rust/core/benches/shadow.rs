//! The shadow MMU end to end, through `Vcpu::guest_access` as the Python API drives
//! it: cold shadow faults, warm accesses, CR3 switches among N address spaces, and
//! the metadata bytes per mapped 4 KiB page.
//!
//! - `shadow/cold_fault/faults` (the faults/s figure): a fresh 4-level guest whose
//!   64 Ki leaf gptes have A clear, so KVM's prefetch skips them and every page's
//!   first 8-byte read is one shadow page fault fixed by the fault path;
//!   `shadow/cold_fault/first_touch_prefetch`: the same with A set, where each fault
//!   also maps the 7 neighbours of its aligned block (pages/s). The guest, its page
//!   tables and the host pages behind its data are made before the clock starts
//!   (`iter_custom`: only the loop of accesses is timed, one fresh VM per iteration).
//! - `shadow/warm_read`: 8-byte reads of pages already mapped (the SPTE is the TLB).
//! - `shadow/cr3_switch`: N processes (own PML4 and user tables, kernel half shared
//!   from PML4[256] down); MOV CR3 to the next one, then one read of its private page.
//!   KVM caches 3 previous roots, so N <= 4 hits the cache and N = 16 does not.
//! - printed before the timings: `Mmu::memory_bytes()` over `pages_4k` after mapping
//!   256 Ki pages, without and with prefetch, and its breakdown.
//!
//! `SHADOW_BENCH_COLD=<pages>` runs the cold-fault loop once on a fresh guest and
//! exits (for callgrind/perf: the loop is the non-inlined function `touch_cold`),
//! e.g. `valgrind --tool=callgrind --toggle-collect='*touch_cold*' <bench binary>`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use kvmmmu_core::mmu::shadow::{Mmu, ShadowPage};
use kvmmmu_core::paging::PagingMode;
use kvmmmu_core::stats::{VcpuStat, VmStat};
use kvmmmu_core::testkit::TestGuest;
use kvmmmu_core::vcpu::guest_ops::{AccessKind, AccessOutcome};

const P: u64 = 1;
const W: u64 = 2;
const U: u64 = 4;
const A: u64 = 0x20;
/// Data pages from gpa 16 MiB up, mapped at GVA in order.
const DATA: u64 = 16 << 20;
const GVA: u64 = 0x40_0000_0000;
/// The kernel half of the CR3-switch guests (PML4 index 256).
const KERNEL_GVA: u64 = 0xffff_8000_0000_0000;

const COLD_PAGES: u64 = 64 << 10;
const COLD_MEM: u64 = 512 << 20;
const MEM_PAGES: u64 = 256 << 10;
const MEM_MEM: u64 = (1 << 30) + (64 << 20);

/// A 4-level guest with `pages` data pages mapped at GVA (leaf A bit as asked).
fn build(mem: u64, pages: u64, accessed: bool) -> TestGuest {
    let mut g = TestGuest::new(PagingMode::Long4, mem).unwrap();
    let cr3 = g.cr3();
    let a = if accessed { A } else { 0 };
    for i in 0..pages {
        g.map(cr3, GVA + i * 4096, DATA + i * 4096, 1, P | W | U | a);
    }
    g
}

/// The page-table area of a built guest, to stamp into fresh guests: the table
/// allocator is deterministic, so a fresh guest's root is the template's root.
struct Template {
    mem: u64,
    pages: u64,
    tables_start: u64,
    image: Vec<u8>,
}

impl Template {
    fn new(mem: u64, pages: u64, accessed: bool) -> Template {
        let g = build(mem, pages, accessed);
        let tables_start = g.tables_start();
        let mut image = vec![0u8; (mem - tables_start) as usize];
        g.host.read(tables_start as usize, &mut image).unwrap();
        Template {
            mem,
            pages,
            tables_start,
            image,
        }
    }

    /// A fresh VM with the template's tables, its data pages faulted in on the host
    /// (so the timed loop does not measure Linux's page faults), no SPTE yet.
    fn instantiate(&self) -> TestGuest {
        let g = TestGuest::new(PagingMode::Long4, self.mem).unwrap();
        g.host
            .write(self.tables_start as usize, &self.image)
            .unwrap();
        // A read maps the shared zero page: no RSS, and no Linux fault in the loop.
        let mut b = [0u8; 1];
        for i in 0..self.pages {
            g.host.read((DATA + i * 4096) as usize, &mut b).unwrap();
            black_box(&mut b);
        }
        g
    }
}

fn read8(g: &TestGuest, gva: u64) -> u64 {
    let mut b = [0u8; 8];
    let r = g
        .vcpu
        .guest_access(gva, &mut b, AccessKind::default())
        .unwrap();
    assert_eq!(r, AccessOutcome::Done, "read at {gva:#x}");
    u64::from_le_bytes(b)
}

/// One 8-byte read per page, in order: the measured cold loop. The accesses run in
/// one session (the vCPU and VM locked once, as a vCPU in KVM_RUN), so the figure is
/// the MMU's; `touch_cold_per_call` takes the locks for every access, as the
/// trace API's single calls do.
#[inline(never)]
fn touch_cold(g: &TestGuest, pages: u64) {
    g.vcpu
        .access_session(|s| {
            for i in 0..pages {
                let mut b = [0u8; 8];
                let r = s.access(black_box(GVA + i * 4096), &mut b, AccessKind::default());
                assert_eq!(r, Ok(AccessOutcome::Done));
                black_box(b);
            }
        })
        .unwrap();
}

#[inline(never)]
fn touch_cold_per_call(g: &TestGuest, pages: u64) {
    for i in 0..pages {
        black_box(read8(g, black_box(GVA + i * 4096)));
    }
}

fn vm_stat(g: &TestGuest, s: VmStat) -> u64 {
    g.vm.stats.get(s as usize)
}

fn pf_fixed(g: &TestGuest) -> u64 {
    g.vcpu.stats.get(VcpuStat::PfFixed as usize)
}

/// A cold loop over the first `n` pages.
type Touch = fn(&TestGuest, u64);

/// Time `touch` on `iters` fresh guests.
fn cold_iters(t: &Template, iters: u64, touch: Touch) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let g = t.instantiate();
        let start = Instant::now();
        touch(&g, t.pages);
        total += start.elapsed();
        drop(black_box(g));
    }
    total
}

fn bench_cold(c: &mut Criterion) {
    let mut grp = c.benchmark_group("shadow/cold_fault");
    grp.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(COLD_PAGES));
    let runs: [(&str, bool, u64, Touch); 3] = [
        ("faults", false, COLD_PAGES, touch_cold),
        (
            "faults_locking_per_access",
            false,
            COLD_PAGES,
            touch_cold_per_call,
        ),
        ("first_touch_prefetch", true, COLD_PAGES / 8, touch_cold),
    ];
    for (name, accessed, faults, touch) in runs {
        let t = Template::new(COLD_MEM, COLD_PAGES, accessed);
        // What is measured: one fixed fault per page (A clear), one per 8 (A set).
        let g = t.instantiate();
        touch_cold(&g, t.pages);
        assert_eq!(pf_fixed(&g), faults, "{name}");
        assert_eq!(vm_stat(&g, VmStat::Pages4k), COLD_PAGES, "{name}");
        drop(g);
        grp.bench_function(BenchmarkId::new(name, COLD_PAGES), |b| {
            b.iter_custom(|iters| cold_iters(&t, iters, touch))
        });
    }
    grp.finish();
}

fn bench_warm(c: &mut Criterion) {
    let mut grp = c.benchmark_group("shadow/warm_read");
    for pages in [512u64, COLD_PAGES] {
        let t = Template::new(COLD_MEM, pages, true);
        let g = t.instantiate();
        touch_cold(&g, pages);
        let fixed = pf_fixed(&g);
        grp.throughput(Throughput::Elements(pages));
        grp.bench_with_input(BenchmarkId::from_parameter(pages), &pages, |b, &n| {
            b.iter(|| {
                let mut sum = 0u64;
                for i in 0..n {
                    sum = sum.wrapping_add(read8(&g, black_box(GVA + i * 4096)));
                }
                sum
            })
        });
        assert_eq!(pf_fixed(&g), fixed, "warm reads took faults");
    }
    grp.finish();
}

/// N processes: a PML4 each, with a private user page at GVA (holding the process
/// number) and the kernel half (PML4[256]: one PDPT, PD and PT) shared.
fn processes(n: u64) -> (TestGuest, Vec<u64>) {
    let mut g = TestGuest::new(PagingMode::Long4, 64 << 20).unwrap();
    let first = g.cr3();
    for k in 0..512 {
        g.map(
            first,
            KERNEL_GVA + k * 4096,
            DATA + (1 << 20) + k * 4096,
            1,
            P | W | A,
        );
    }
    let e = g.entry_gpa(first, KERNEL_GVA, 4);
    let kernel_pml4e = g.read_u64(e);
    let mut roots = vec![first];
    for _ in 1..n {
        let r = g.new_root();
        let e = g.entry_gpa(r, KERNEL_GVA, 4);
        g.write_u64(e, kernel_pml4e);
        roots.push(r);
    }
    for (p, &r) in roots.iter().enumerate() {
        g.map(r, GVA, DATA + p as u64 * 4096, 1, P | W | U | A);
        g.write_u64(DATA + p as u64 * 4096, p as u64);
    }
    (g, roots)
}

fn bench_cr3(c: &mut Criterion) {
    let mut grp = c.benchmark_group("shadow/cr3_switch");
    const SWITCHES: u64 = 1024;
    grp.throughput(Throughput::Elements(SWITCHES));
    for n in [2u64, 4, 16] {
        let (g, roots) = processes(n);
        // Warm: every process has run once (its shadow tables exist).
        for (p, &r) in roots.iter().enumerate() {
            g.mov_cr3(r).unwrap();
            assert_eq!(read8(&g, GVA), p as u64);
            read8(&g, KERNEL_GVA);
        }
        let mut p = 0usize;
        grp.bench_with_input(BenchmarkId::new("switch_and_touch", n), &n, |b, _| {
            b.iter(|| {
                for _ in 0..SWITCHES {
                    p = (p + 1) % roots.len();
                    g.mov_cr3(roots[p]).unwrap();
                    assert_eq!(read8(&g, GVA), p as u64, "wrong address space");
                }
            })
        });
        g.audit().unwrap();
        eprintln!(
            "cr3_switch N={n}: shadow pages {}, pf_fixed {}, mmu_cache_miss {}",
            g.vm.state().mmu.n_used(),
            pf_fixed(&g),
            vm_stat(&g, VmStat::MmuCacheMiss)
        );
    }
    grp.finish();
}

/// Mmu::memory_bytes() split the same way it is computed.
fn breakdown(mmu: &Mmu) -> String {
    let (mut n, mut spt, mut shadowed, mut parents) = (0usize, 0usize, 0usize, 0usize);
    for (_, sp) in mmu.iter() {
        n += 1;
        spt += std::mem::size_of_val(&*sp.spt);
        shadowed += sp
            .shadowed
            .as_ref()
            .map_or(0, |t| std::mem::size_of_val(&**t));
        parents += sp.parent_ptes.heap_bytes();
    }
    let (mut rmap, mut track) = (0usize, 0usize);
    for id in 0..=u16::MAX {
        if let Some(m) = mmu.slot_meta(id) {
            rmap += m.rmap.memory_bytes();
            track += m.track.memory_bytes();
        }
    }
    let structs = n * std::mem::size_of::<ShadowPage>();
    let rest = mmu
        .memory_bytes()
        .saturating_sub(structs + spt + shadowed + parents + rmap + track);
    format!(
        "{n} shadow pages: SPTE pages {spt}, shadowed translations {shadowed}, \
         ShadowPage structs {structs} ({} B each), parent lists {parents}; \
         rmaps {rmap}; write tracking/lpage info {track}; \
         hash, free list, slot table and Mmu itself {rest}",
        std::mem::size_of::<ShadowPage>()
    )
}

/// Bytes of MMU metadata per mapped 4 KiB page after mapping MEM_PAGES pages.
fn memory_report() {
    for (what, accessed) in [("no prefetch (A clear)", false), ("prefetch (A set)", true)] {
        let g = build(MEM_MEM, MEM_PAGES, accessed);
        touch_cold(&g, MEM_PAGES);
        let mapped = vm_stat(&g, VmStat::Pages4k);
        let st = g.vm.state();
        let bytes = st.mmu.memory_bytes();
        eprintln!(
            "memory per mapped 4 KiB page, {MEM_PAGES} pages, {what}: {} bytes / {mapped} pages = \
             {:.2} bytes per page (pf_fixed {})",
            bytes,
            bytes as f64 / mapped as f64,
            pf_fixed(&g)
        );
        eprintln!("  {}", breakdown(&st.mmu));
    }
}

fn main() {
    if let Ok(v) = std::env::var("SHADOW_BENCH_COLD") {
        // One cold run for a profiler: SHADOW_BENCH_COLD=<pages>[,a] (",a": A set).
        let (pages, accessed) = match v.split_once(',') {
            Some((p, _)) => (p, true),
            None => (v.as_str(), false),
        };
        let pages: u64 = pages.parse().expect("SHADOW_BENCH_COLD=<pages>[,a]");
        let mem = (DATA + pages * 4096 + (pages / 512 + 16) * 4096).next_power_of_two();
        let g = Template::new(mem, pages, accessed).instantiate();
        let start = Instant::now();
        touch_cold(&g, pages);
        let t = start.elapsed();
        eprintln!(
            "{pages} pages, {} fixed faults in {t:?}: {:.0} pages/s",
            pf_fixed(&g),
            pages as f64 / t.as_secs_f64()
        );
        return;
    }
    memory_report();
    let mut c = Criterion::default().configure_from_args();
    bench_cold(&mut c);
    bench_warm(&mut c);
    bench_cr3(&mut c);
    c.final_summary();
}
