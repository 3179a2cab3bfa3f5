//! Dirty logging through the shadow MMU: the cases of reference/real-kvm-here.md
//! section 3 (slot 1 = 64 pages at 16 MiB, logging; page tables in slot 0) and the
//! huge-page rules of kvm-mmu-semantics.md 8.2.

use std::sync::Arc;

use kvmmmu_core::errno::Errno;
use kvmmmu_core::hostmem::HostRegion;
use kvmmmu_core::memslot::RegionIoctl;
use kvmmmu_core::paging::PagingMode;
use kvmmmu_core::stats::VmStat;
use kvmmmu_core::testkit::TestGuest;
use kvmmmu_core::uapi::{self, kvm_enable_cap, kvm_userspace_memory_region2};
use kvmmmu_core::vcpu::guest_ops::AccessOutcome;

const P: u64 = 1;
const W: u64 = 2;
const U: u64 = 4;
const SLOT1: u64 = 16 << 20;
const GVA: u64 = 0x4000_0000;
const LOG: u32 = uapi::KVM_MEM_LOG_DIRTY_PAGES;

struct Rig {
    g: TestGuest,
    host: Arc<HostRegion>,
    npages: u64,
}

impl Rig {
    fn new(npages: u64, thp: bool) -> Rig {
        Self::with_ring(npages, thp, 0)
    }

    fn with_ring(npages: u64, thp: bool, ring: u64) -> Rig {
        Self::build(npages, thp, ring, false)
    }

    fn build(npages: u64, thp: bool, ring: u64, tdp: bool) -> Rig {
        let mut g = TestGuest::build(PagingMode::Long4, 8 << 20, ring, tdp).unwrap();
        let host = HostRegion::new(npages * 4096 + (2 << 20)).unwrap();
        if thp {
            host.set_thp(true).unwrap();
        }
        let cr3 = g.cr3();
        if thp {
            // One 2 MiB guest page over the whole slot.
            g.map(cr3, GVA, SLOT1, 2, P | W | U);
        } else {
            for i in 0..npages {
                g.map(cr3, GVA + i * 4096, SLOT1 + i * 4096, 1, P | W | U);
            }
        }
        let r = Rig { g, host, npages };
        r.set_flags(0);
        r
    }

    fn hva(&self) -> u64 {
        // 2 MiB-aligned inside the region, so gpa and hva agree in their low bits.
        (self.host.addr() + (2 << 20) - 1) & !((2 << 20) - 1)
    }

    fn set_flags(&self, flags: u32) {
        let r = kvm_userspace_memory_region2 {
            slot: 1,
            flags,
            guest_phys_addr: SLOT1,
            memory_size: self.npages * 4096,
            userspace_addr: self.hva(),
            ..Default::default()
        };
        self.g
            .vm
            .set_user_memory_region(&r, RegionIoctl::V2)
            .unwrap();
    }

    fn write(&self, pages: &[u64]) {
        for &p in pages {
            assert_eq!(
                self.g.write(GVA + p * 4096, p, true).unwrap(),
                AccessOutcome::Done
            );
        }
        self.g.audit().unwrap();
    }

    fn read(&self, pages: &[u64]) {
        for &p in pages {
            assert_eq!(
                self.g.read(GVA + p * 4096, true).unwrap(),
                AccessOutcome::Done
            );
        }
    }

    fn harvest(&self) -> Vec<u64> {
        let r = self.g.vm.harvest_dirty_pages(1).unwrap();
        self.g.audit().unwrap();
        r
    }

    fn enable_cap(&self, cap: u64, arg0: u64) -> Result<(), Errno> {
        let mut c = kvm_enable_cap {
            cap: cap as u32,
            ..Default::default()
        };
        c.args[0] = arg0;
        self.g.vm.enable_cap(&c)
    }
}

#[test]
fn get_dirty_log_reports_exactly_the_written_pages_and_rearms() {
    let r = Rig::new(64, false);
    r.read(&[0, 3, 10]);
    r.set_flags(LOG);
    assert_eq!(r.harvest(), Vec::<u64>::new(), "enabling logs nothing");
    r.write(&[0, 3, 7, 8, 63]);
    r.read(&[10]);
    assert_eq!(r.harvest(), vec![0, 3, 7, 8, 63]);
    assert_eq!(r.harvest(), Vec::<u64>::new(), "the log was cleared");
    r.write(&[1, 3]);
    assert_eq!(
        r.harvest(),
        vec![1, 3],
        "pages written again are logged again"
    );
    // Host writes through the mapping are not logged.
    r.host
        .write((r.hva() - r.host.addr()) as usize, &[1; 8])
        .unwrap();
    assert_eq!(r.harvest(), Vec::<u64>::new());
}

#[test]
fn manual_protect_get_keeps_and_clear_rearms() {
    let r = Rig::new(64, false);
    r.enable_cap(uapi::cap::MANUAL_DIRTY_LOG_PROTECT2, 1)
        .unwrap();
    r.set_flags(LOG);
    r.write(&[2, 4, 40]);
    let live = |r: &Rig| {
        let st = r.g.vm.state();
        let b = st.memslots.get(1).unwrap().dirty_bitmap.clone().unwrap();
        let mut v = vec![];
        b.for_each_word(|w, x| v.push((w, x)));
        v
    };
    assert_eq!(live(&r), vec![(0, 1 << 2 | 1 << 4 | 1 << 40)]);
    // The harvest API does GET + CLEAR(all) in manual mode.
    assert_eq!(r.harvest(), vec![2, 4, 40]);
    assert!(live(&r).is_empty());
    r.write(&[2, 5]);
    assert_eq!(r.harvest(), vec![2, 5]);
}

#[test]
fn initially_set_reports_every_page_until_cleared() {
    let r = Rig::new(64, false);
    r.enable_cap(uapi::cap::MANUAL_DIRTY_LOG_PROTECT2, 3)
        .unwrap();
    r.read(&[0, 1]);
    r.set_flags(LOG);
    assert_eq!(r.harvest(), (0..64).collect::<Vec<_>>());
    r.write(&[9]);
    assert_eq!(r.harvest(), vec![9]);
}

#[test]
fn manual_protect_cap_arguments() {
    let r = Rig::new(8, false);
    let cap = uapi::cap::MANUAL_DIRTY_LOG_PROTECT2;
    assert_eq!(
        r.enable_cap(cap, 2),
        Err(Errno::EINVAL),
        "INITIALLY_SET alone"
    );
    assert_eq!(r.enable_cap(cap, 4), Err(Errno::EINVAL));
    r.enable_cap(cap, 3).unwrap();
    r.enable_cap(cap, 0).unwrap();
}

#[test]
fn logging_breaks_huge_pages_and_disabling_recovers_them() {
    let r = Rig::new(512, true);
    r.write(&[0]);
    let stat = |r: &Rig, s: VmStat| r.g.vm.stats.get(s as usize);
    assert_eq!(stat(&r, VmStat::Pages2m), 1);
    r.set_flags(LOG);
    r.g.audit().unwrap();
    r.write(&[5]);
    assert_eq!(
        stat(&r, VmStat::Pages2m),
        0,
        "the write split the huge page"
    );
    assert_eq!(r.harvest(), vec![5]);
    r.set_flags(0);
    r.g.audit().unwrap();
    r.write(&[6]);
    assert_eq!(stat(&r, VmStat::Pages2m), 1, "logging off: huge again");
}

/// The ring's entries as (flags, slot, offset), from the vCPU's mmap area.
fn ring_entries(r: &Rig, n: usize) -> Vec<(u32, u32, u64)> {
    let mut buf = vec![0u8; 16 * n];
    let off = (uapi::KVM_DIRTY_LOG_PAGE_OFFSET * 4096) as i64;
    nix::sys::uio::pread(r.g.vcpu.memfd(), &mut buf, off).unwrap();
    buf.chunks(16)
        .map(|e| {
            (
                u32::from_le_bytes(e[0..4].try_into().unwrap()),
                u32::from_le_bytes(e[4..8].try_into().unwrap()),
                u64::from_le_bytes(e[8..16].try_into().unwrap()),
            )
        })
        .collect()
}

/// Userspace harvests: set RESET on the first `n` entries from `from`.
fn ring_harvest(r: &Rig, from: usize, n: usize) {
    for i in from..from + n {
        let off = (uapi::KVM_DIRTY_LOG_PAGE_OFFSET * 4096) as i64 + 16 * i as i64;
        nix::sys::uio::pwrite(r.g.vcpu.memfd(), &3u32.to_le_bytes(), off).unwrap();
    }
}

#[test]
fn dirty_ring_entries_reset_and_errors() {
    let r = Rig::with_ring(64, false, 65536);
    r.set_flags(LOG);
    r.write(&[0, 9, 33]);
    assert_eq!(
        ring_entries(&r, 4),
        vec![(1, 1, 0), (1, 1, 9), (1, 1, 33), (0, 0, 0)]
    );
    ring_harvest(&r, 0, 3);
    assert_eq!(r.g.vm.reset_dirty_rings(), Ok(3));
    r.g.audit().unwrap();
    assert_eq!(ring_entries(&r, 3), vec![(0, 1, 0), (0, 1, 9), (0, 1, 33)]);
    r.write(&[9, 12]);
    assert_eq!(&ring_entries(&r, 5)[3..], &[(1, 1, 9), (1, 1, 12)]);
    ring_harvest(&r, 3, 2);
    assert_eq!(r.g.vm.reset_dirty_rings(), Ok(2));
    // Bitmap ioctls are refused in ring mode; the ring can be set once, before vCPUs.
    assert_eq!(r.g.vm.harvest_dirty_pages(1), Err(Errno::ENXIO));
    assert_eq!(
        r.enable_cap(uapi::cap::DIRTY_LOG_RING, 65536),
        Err(Errno::EINVAL)
    );
    let plain = Rig::new(8, false);
    assert_eq!(plain.g.vm.reset_dirty_rings(), Err(Errno::EINVAL));
}

#[test]
fn dirty_ring_soft_limit_stops_the_vcpu_until_reset() {
    // 4096 bytes = 256 entries, 64 reserved: full after 192.
    let r = Rig::with_ring(256, false, 4096);
    r.set_flags(LOG);
    for p in 0..192u64 {
        assert_eq!(
            r.g.write(GVA + p * 4096, p, true).unwrap(),
            AccessOutcome::Done
        );
    }
    assert_eq!(
        r.g.write(GVA + 200 * 4096, 1, true).unwrap(),
        AccessOutcome::DirtyRingFull
    );
    ring_harvest(&r, 0, 192);
    assert_eq!(r.g.vm.reset_dirty_rings(), Ok(192));
    assert_eq!(
        r.g.write(GVA + 200 * 4096, 1, true).unwrap(),
        AccessOutcome::Done
    );
    r.g.audit().unwrap();
}

#[test]
fn tdp_logs_through_its_direct_tables_too() {
    for (ring, thp) in [(0, false), (65536, false), (0, true)] {
        let r = Rig::build(if thp { 512 } else { 64 }, thp, ring, true);
        r.write(&[0]);
        r.set_flags(LOG);
        r.g.audit().unwrap();
        r.write(&[0, 3, 7]);
        r.read(&[10]);
        // With TDP a read fault maps the page writable (the access is ACC_ALL) and
        // make_spte logs every writable SPTE it creates in a logging slot: page 10
        // counts as dirty. (The shadow MMU maps clean guest pages read-only.)
        if ring == 0 {
            assert_eq!(r.harvest(), vec![0, 3, 7, 10]);
            r.write(&[3]);
            r.read(&[10]);
            assert_eq!(
                r.harvest(),
                vec![3],
                "protected again, so a read no longer logs"
            );
        } else {
            let e = ring_entries(&r, 5);
            assert_eq!(&e[..4], &[(1, 1, 0), (1, 1, 3), (1, 1, 7), (1, 1, 10)]);
        }
    }
}
