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
        let mut g = TestGuest::new(PagingMode::Long4, 8 << 20).unwrap();
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
