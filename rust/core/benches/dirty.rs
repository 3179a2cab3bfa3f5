//! Dirty logging, phase by phase (issue 6, item 5), on slots of 1 GiB, 64 GiB and
//! 1 TiB with 0.1 % or 10 % of their pages dirty, or a fixed 1000 pages (the
//! "harvest follows the dirty pages, not the slot" comparison).
//!
//! The layout is the one of tests/dirty_log.rs: page tables in slot 0 (8 MiB at gpa 0),
//! the measured slot 1 at gpa 1 GiB, which the guest maps with 1 GiB pages at GVA
//! (writes under logging still map 4 KiB). MAXPHYADDR is raised to 46 so the 1 TiB
//! slot is addressable. The dirty set is D pages spread evenly over the slot
//! (page k * npages / D); its sample S (at most `DIRTY_BENCH_SAMPLE` pages, default
//! 16384, spread evenly over the dirty set) is dirtied by guest writes; the rest of
//! the dirty set is set directly in the slot's DirtyBitmap (bitmap modes) or pushed
//! directly onto the vCPU's ring (ring mode): those pages have no SPTE, so their
//! re-protection is an rmap lookup that finds nothing.
//!
//! One round of a mode, each phase timed on its own (`Instant`, medians over the
//! rounds are printed):
//!
//! 1. (untimed) the guest writes S with logging off: writable 4 KiB SPTEs;
//! 2. **enable**: flags-only KVM_SET_USER_MEMORY_REGION with KVM_MEM_LOG_DIRTY_PAGES
//!    (write-protects the |S| SPTEs, allocates the sparse bitmap);
//! 3. **dirty pass**: one 8-byte guest write per page of S, the first after the
//!    protection (a write fault on a write-protected, MMU-writable SPTE), per page;
//! 4. (untimed) the rest of the dirty set, set directly;
//! 5. **harvest**, by mode:
//!    - `get`: Vm::get_dirty_log into a user buffer (ProcessVm): take the dirty
//!      words, re-protect, copy the whole bitmap out (npages / 8 bytes);
//!    - `get_api`: Vm::harvest_dirty_pages without manual protect (the model's
//!      own harvest: slot-relative page numbers, no bitmap copy);
//!    - `manual`: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2; GET_DIRTY_LOG (copy of the live
//!      bitmap) then **clear** on its own: KVM_CLEAR_DIRTY_LOG of the whole slot with
//!      the bitmap GET returned (re-protects);
//!    - `manual_api`: Vm::harvest_dirty_pages with manual protect (GET + CLEAR(all));
//!    - `ring`: a VM with a 65536-entry ring (KVM_CAP_DIRTY_LOG_RING, 1 MiB): the guest
//!      writes push S; the rest is pushed in batches up to the soft limit (65472);
//!      per batch, **collect** (what userspace does: read the DIRTY entries from the
//!      vCPU's mmap area, keep their offsets, mark them RESET) then **reset** on its
//!      own (KVM_RESET_DIRTY_RINGS: re-protect, coalescing runs into 64-page masks);
//!      the figures are the sums over all batches of the dirty set;
//! 6. **disable**: flags-only KVM_SET_USER_MEMORY_REGION without the flag.
//!
//! Every harvest is checked to report exactly the D pages.
//!
//! Printed first: model memory of an untouched 1 TiB logging slot
//! (Mmu::memory_bytes + DirtyBitmap::memory_bytes; target < 1 MiB).
//!
//! Not criterion: the phases depend on each other's state (a harvest needs a dirty
//! log, a disable an enabled slot), and a round of the largest case (27 M dirty
//! pages) takes seconds, so criterion's warm-up and sample counts do not fit. Each
//! case runs `DIRTY_BENCH_REPS` rounds (default 5; 3 when D > 1 M).
//!
//! ```sh
//! cargo bench -p kvmmmu-core --bench dirty                 # every case (a few minutes)
//! cargo bench -p kvmmmu-core --bench dirty -- 1TiB/1000    # cases whose name contains it
//! DIRTY_BENCH_REPS=9 DIRTY_BENCH_SAMPLE=4096 cargo bench -p kvmmmu-core --bench dirty -- 64GiB
//! DIRTY_BENCH_SAMPLE=0 DIRTY_BENCH_MODES=get_api,ring cargo bench -p kvmmmu-core --bench dirty -- /1000
//! ```
//!
//! `DIRTY_BENCH_SAMPLE=0`: every dirty page is set directly (no SPTE anywhere: the
//! harvest's bitmap and rmap work alone); `DIRTY_BENCH_MODES`: a comma list of modes.

use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvmmmu_core::dirty_log::DirtyBitmap;
use kvmmmu_core::dirty_ring::{KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET, RSVD_ENTRIES};
use kvmmmu_core::hostmem::{HostRegion, SharedMapping};
use kvmmmu_core::memslot::RegionIoctl;
use kvmmmu_core::paging::PagingMode;
use kvmmmu_core::testkit::TestGuest;
use kvmmmu_core::uaccess::ProcessVm;
use kvmmmu_core::uapi::{
    self, kvm_clear_dirty_log, kvm_dirty_log, kvm_enable_cap, kvm_userspace_memory_region2,
};
use kvmmmu_core::vcpu::guest_ops::AccessOutcome;
use kvmmmu_core::vm::Vm;

const P: u64 = 1;
const W: u64 = 2;
const U: u64 = 4;
const GIB: u64 = 1 << 30;
const SLOT1_GPA: u64 = GIB;
/// Guest-virtual base of slot 1 (PML4 index 2: canonical, away from the tables).
const GVA: u64 = 1 << 40;
const LOG: u32 = uapi::KVM_MEM_LOG_DIRTY_PAGES;
/// 65536 entries of 16 bytes: the largest ring KVM allows.
const RING_BYTES: u64 = 1 << 20;
const RING_ENTRIES: u64 = RING_BYTES / 16;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Get,
    GetApi,
    Manual,
    ManualApi,
    Ring,
}

impl Mode {
    const ALL: [Mode; 5] = [
        Mode::Get,
        Mode::GetApi,
        Mode::Manual,
        Mode::ManualApi,
        Mode::Ring,
    ];

    fn name(self) -> &'static str {
        match self {
            Mode::Get => "get",
            Mode::GetApi => "get_api",
            Mode::Manual => "manual",
            Mode::ManualApi => "manual_api",
            Mode::Ring => "ring",
        }
    }
}

/// A guest with the measured slot 1 (logging off) mapped at GVA with 1 GiB pages.
struct Rig {
    g: TestGuest,
    _host: Arc<HostRegion>,
    hva: u64,
    npages: u64,
    /// A user buffer for GET/CLEAR_DIRTY_LOG (one bit per page), pre-faulted.
    buf: Vec<u64>,
    ring: Option<SharedMapping>,
    /// Next ring entry userspace will look at (its own fetch index).
    ring_next: u64,
}

impl Rig {
    fn new(size: u64, ring: bool) -> Rig {
        let mut g = TestGuest::new_with_ring(
            PagingMode::Long4,
            8 << 20,
            if ring { RING_BYTES } else { 0 },
        )
        .unwrap();
        {
            let mut st = g.vcpu.state();
            st.features.maxphyaddr = 46;
            st.mmu.reset_pending = true;
        }
        let host = HostRegion::new(size).unwrap();
        let cr3 = g.cr3();
        for i in 0..size / GIB {
            g.map(cr3, GVA + i * GIB, SLOT1_GPA + i * GIB, 3, P | W | U);
        }
        let npages = size / 4096;
        let ring = ring.then(|| {
            let off = (uapi::KVM_DIRTY_LOG_PAGE_OFFSET * uapi::PAGE_SIZE) as i64;
            SharedMapping::new_at(g.vcpu.memfd().as_fd(), off, RING_BYTES as usize).unwrap()
        });
        let r = Rig {
            hva: host.addr(),
            g,
            _host: host,
            npages,
            buf: vec![1u64; npages.div_ceil(64) as usize],
            ring,
            ring_next: 0,
        };
        r.set_flags(0);
        r
    }

    fn set_flags(&self, flags: u32) {
        let m = kvm_userspace_memory_region2 {
            slot: 1,
            flags,
            guest_phys_addr: SLOT1_GPA,
            memory_size: self.npages * 4096,
            userspace_addr: self.hva,
            ..Default::default()
        };
        self.g
            .vm
            .set_user_memory_region(&m, RegionIoctl::V2)
            .unwrap();
    }

    fn manual_protect(&self, on: bool) {
        let mut c = kvm_enable_cap {
            cap: uapi::cap::MANUAL_DIRTY_LOG_PROTECT2 as u32,
            ..Default::default()
        };
        c.args[0] = u64::from(on);
        self.g.vm.enable_cap(&c).unwrap();
    }

    fn bitmap(&self) -> Arc<DirtyBitmap> {
        let st = self.g.vm.state();
        st.memslots.get(1).unwrap().dirty_bitmap.clone().unwrap()
    }

    /// One guest write per page; returns the time taken.
    fn write_pages(&self, pages: &[u64]) -> Duration {
        let t = Instant::now();
        for &p in pages {
            let r = self.g.write(GVA + p * 4096, p, false).unwrap();
            debug_assert_eq!(r, AccessOutcome::Done);
            if r != AccessOutcome::Done {
                panic!("write to page {p}: {r:?}");
            }
        }
        t.elapsed()
    }

    fn get_dirty_log(&mut self) {
        let log = kvm_dirty_log {
            slot: 1,
            dirty_bitmap: self.buf.as_mut_ptr() as u64,
            ..Default::default()
        };
        self.g.vm.get_dirty_log(&log, &mut ProcessVm).unwrap();
    }

    fn clear_dirty_log(&mut self) {
        let log = kvm_clear_dirty_log {
            slot: 1,
            num_pages: u32::try_from(self.npages).unwrap(),
            first_page: 0,
            dirty_bitmap: self.buf.as_ptr() as u64,
        };
        self.g.vm.clear_dirty_log(&log, &mut ProcessVm).unwrap();
    }

    fn buf_popcount(&self) -> u64 {
        self.buf.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Userspace's side of a ring harvest: every DIRTY entry from our fetch index on,
    /// its offset kept, its flags set to RESET. Returns how many.
    fn ring_collect(&mut self, out: &mut Vec<u64>) -> u64 {
        let map = self.ring.as_ref().unwrap();
        let mut n = 0;
        loop {
            let off = ((self.ring_next % RING_ENTRIES) * 16) as usize;
            let flags = map.atomic_u32(off).unwrap();
            if flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_DIRTY == 0 {
                break;
            }
            debug_assert_eq!(map.load(off + 4, 4).unwrap(), 1);
            out.push(map.load(off + 8, 8).unwrap());
            flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
            self.ring_next += 1;
            n += 1;
        }
        n
    }

    fn ring_push(&self, rel: u64) {
        self.g.vcpu.dirty_ring.as_ref().unwrap().push(1, rel);
    }
}

/// The D pages of the dirty set, spread evenly over the slot, in order.
fn dirty_set(npages: u64, d: u64) -> Vec<u64> {
    (0..d)
        .map(|k| (u128::from(k) * u128::from(npages) / u128::from(d)) as u64)
        .collect()
}

/// Every `d / s`-th page of `set` (at most `s` pages), and the rest.
fn split_sample(set: &[u64], s: usize) -> (Vec<u64>, Vec<u64>) {
    if set.len() <= s {
        return (set.to_vec(), vec![]);
    }
    let mut sample = Vec::with_capacity(s);
    let mut rest = Vec::with_capacity(set.len() - s);
    let mut k = 0usize;
    for (i, &p) in set.iter().enumerate() {
        if k < s && i == k * set.len() / s {
            sample.push(p);
            k += 1;
        } else {
            rest.push(p);
        }
    }
    (sample, rest)
}

#[derive(Default)]
struct Times {
    enable: Vec<f64>,
    dirty_per_page: Vec<f64>,
    harvest: Vec<f64>,
    get: Vec<f64>,
    clear: Vec<f64>,
    collect: Vec<f64>,
    reset: Vec<f64>,
    disable: Vec<f64>,
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// A duration in seconds as text with a fitting unit.
fn fmt_s(s: Option<f64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s < 1e-6 => format!("{:.0} ns", s * 1e9),
        Some(s) if s < 1e-3 => format!("{:.1} us", s * 1e6),
        Some(s) if s < 1.0 => format!("{:.2} ms", s * 1e3),
        Some(s) => format!("{s:.2} s"),
    }
}

struct Case {
    size: u64,
    size_name: &'static str,
    dirty_name: &'static str,
    d: u64,
}

fn cases() -> Vec<Case> {
    let mut v = vec![];
    for (size, size_name) in [(GIB, "1GiB"), (64 * GIB, "64GiB"), (1024 * GIB, "1TiB")] {
        let npages = size / 4096;
        for (dirty_name, d) in [
            ("1000", 1000),
            ("0.1%", npages / 1000),
            ("10%", npages / 10),
        ] {
            v.push(Case {
                size,
                size_name,
                dirty_name,
                d,
            });
        }
    }
    v
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn run_case(c: &Case, modes: &[Mode], sample: usize) {
    let npages = c.size / 4096;
    let set = dirty_set(npages, c.d);
    let (s, rest) = split_sample(&set, sample);
    let reps = env_usize("DIRTY_BENCH_REPS", if c.d > 1 << 20 { 3 } else { 5 });
    println!(
        "\n== {}/{}: {} pages, D = {} dirty ({} by guest writes, {} set directly), {} rounds",
        c.size_name,
        c.dirty_name,
        npages,
        c.d,
        s.len(),
        rest.len(),
        reps
    );
    println!(
        "{:<11} {:>10} {:>12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "mode",
        "enable",
        "dirty/page",
        "harvest",
        "get",
        "clear",
        "collect",
        "reset",
        "disable",
        "harvest/D"
    );
    let mut plain: Option<Rig> = None;
    let mut ring_rig: Option<Rig> = None;
    let mut pages = Vec::new();
    for &mode in modes {
        let rig = if mode == Mode::Ring {
            plain = None; // one big rig at a time
            ring_rig.get_or_insert_with(|| Rig::new(c.size, true))
        } else {
            plain.get_or_insert_with(|| Rig::new(c.size, false))
        };
        if mode != Mode::Ring {
            rig.manual_protect(matches!(mode, Mode::Manual | Mode::ManualApi));
        }
        let mut t = Times::default();
        for _ in 0..reps {
            rig.write_pages(&s); // logging off: writable SPTEs
            let t0 = Instant::now();
            rig.set_flags(LOG);
            t.enable.push(t0.elapsed().as_secs_f64());
            let dt = rig.write_pages(&s);
            if !s.is_empty() {
                t.dirty_per_page.push(dt.as_secs_f64() / s.len() as f64);
            }
            let harvested: u64;
            match mode {
                Mode::Ring => {
                    let (mut collect, mut reset) = (Duration::ZERO, Duration::ZERO);
                    let cap = (RING_ENTRIES - RSVD_ENTRIES) as usize;
                    let mut it = rest.iter();
                    let mut queued = s.len();
                    let mut total = 0u64;
                    pages.clear();
                    loop {
                        for &p in it.by_ref().take(cap - queued) {
                            rig.ring_push(p);
                        }
                        let t0 = Instant::now();
                        let n = rig.ring_collect(&mut pages);
                        collect += t0.elapsed();
                        let t0 = Instant::now();
                        let r = rig.g.vm.reset_dirty_rings().unwrap();
                        reset += t0.elapsed();
                        assert_eq!(r as u64, n);
                        total += n;
                        queued = 0;
                        if it.len() == 0 {
                            break;
                        }
                    }
                    t.collect.push(collect.as_secs_f64());
                    t.reset.push(reset.as_secs_f64());
                    t.harvest.push((collect + reset).as_secs_f64());
                    harvested = total;
                    // Entries come in push order: the sample first, then the rest.
                    pages.sort_unstable();
                    assert_eq!(pages, set, "ring harvest");
                }
                Mode::Get => {
                    let b = rig.bitmap();
                    for &p in &rest {
                        b.set(p);
                    }
                    let t0 = Instant::now();
                    rig.get_dirty_log();
                    t.harvest.push(t0.elapsed().as_secs_f64());
                    harvested = rig.buf_popcount();
                }
                Mode::Manual => {
                    let b = rig.bitmap();
                    for &p in &rest {
                        b.set(p);
                    }
                    let t0 = Instant::now();
                    rig.get_dirty_log();
                    let get = t0.elapsed();
                    let t1 = Instant::now();
                    rig.clear_dirty_log();
                    let clear = t1.elapsed();
                    t.get.push(get.as_secs_f64());
                    t.clear.push(clear.as_secs_f64());
                    t.harvest.push((get + clear).as_secs_f64());
                    harvested = rig.buf_popcount();
                    let mut left = 0;
                    b.for_each_word(|_, v| left += v.count_ones());
                    assert_eq!(left, 0, "CLEAR left bits set");
                }
                Mode::GetApi | Mode::ManualApi => {
                    let b = rig.bitmap();
                    for &p in &rest {
                        b.set(p);
                    }
                    let t0 = Instant::now();
                    let got = rig.g.vm.harvest_dirty_pages(1).unwrap();
                    t.harvest.push(t0.elapsed().as_secs_f64());
                    harvested = got.len() as u64;
                    assert_eq!(got, set, "harvest_dirty_pages");
                }
            }
            assert_eq!(harvested, c.d, "{}: harvested pages", mode.name());
            let t0 = Instant::now();
            rig.set_flags(0);
            t.disable.push(t0.elapsed().as_secs_f64());
        }
        let h = median(&t.harvest);
        println!(
            "{:<11} {:>10} {:>12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            mode.name(),
            fmt_s(median(&t.enable)),
            fmt_s(median(&t.dirty_per_page)),
            fmt_s(h),
            fmt_s(median(&t.get)),
            fmt_s(median(&t.clear)),
            fmt_s(median(&t.collect)),
            fmt_s(median(&t.reset)),
            fmt_s(median(&t.disable)),
            fmt_s(h.map(|h| h / c.d as f64)),
        );
        if mode == Mode::GetApi {
            // After a round: what the model holds for this slot and its SPTEs.
            let st = rig.g.vm.state();
            println!(
                "    (after a round, logging off: Mmu::memory_bytes {} B, shadow pages {})",
                st.mmu.memory_bytes(),
                st.mmu.n_used()
            );
        }
    }
}

/// Model memory of an untouched 1 TiB slot, logging on: a lone slot in a fresh VM.
fn memory_report() {
    let size = 1u64 << 40;
    let host = HostRegion::new(size).unwrap();
    let vm = Vm::new(0).unwrap();
    let region = |flags| kvm_userspace_memory_region2 {
        slot: 0,
        flags,
        guest_phys_addr: 0,
        memory_size: size,
        userspace_addr: host.addr(),
        ..Default::default()
    };
    vm.set_user_memory_region(&region(0), RegionIoctl::V2)
        .unwrap();
    let mmu_off = vm.state().mmu.memory_bytes();
    vm.set_user_memory_region(&region(LOG), RegionIoctl::V2)
        .unwrap();
    let st = vm.state();
    let mmu = st.mmu.memory_bytes();
    let bitmap = st
        .memslots
        .get(0)
        .unwrap()
        .dirty_bitmap
        .as_ref()
        .unwrap()
        .memory_bytes();
    println!(
        "untouched 1 TiB slot, logging on: Mmu::memory_bytes {mmu} B (logging off: {mmu_off} B) \
         + DirtyBitmap::memory_bytes {bitmap} B = {} B ({:.1} KiB; target < 1 MiB: {})",
        mmu + bitmap,
        (mmu + bitmap) as f64 / 1024.0,
        if mmu + bitmap < 1 << 20 {
            "met"
        } else {
            "NOT met"
        }
    );
    // The bitmap once every chunk holds a dirty page (1 page per 128 MiB).
    let b = DirtyBitmap::new(size / 4096);
    for c in 0..(size / 4096) / kvmmmu_core::dirty_log::CHUNK_PAGES {
        b.set(c * kvmmmu_core::dirty_log::CHUNK_PAGES);
    }
    println!(
        "  the same bitmap with one dirty page per 128 MiB chunk (8192 pages): {} B \
         (KVM's: {} B flat, twice that with the GET buffer)",
        b.memory_bytes(),
        size / 4096 / 8
    );
}

fn main() {
    // cargo bench passes --bench (and maybe other flags); the first free word filters.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let sample = env_usize("DIRTY_BENCH_SAMPLE", 16384);
    if filter.is_none() {
        memory_report();
    }
    let modes: Vec<Mode> = match std::env::var("DIRTY_BENCH_MODES") {
        Ok(v) => Mode::ALL
            .into_iter()
            .filter(|m| v.split(',').any(|x| x == m.name()))
            .collect(),
        Err(_) => Mode::ALL.to_vec(),
    };
    for c in cases() {
        let name = format!("{}/{}", c.size_name, c.dirty_name);
        if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        run_case(&c, &modes, sample);
    }
}
