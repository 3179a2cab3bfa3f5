//! Dirty logging across the sync of an unsync shadow page (fuzzer finding, issue 6):
//! FNAME(sync_spte) rebuilds an SPTE with make_spte, which marks the page dirty when
//! the new SPTE is writable in a logging slot, exactly as a fault does. Otherwise a
//! guest write through that SPTE would never reach the log.

use kvmmmu_core::memslot::RegionIoctl;
use kvmmmu_core::paging::PagingMode;
use kvmmmu_core::testkit::TestGuest;
use kvmmmu_core::uapi::{self, kvm_userspace_memory_region2};
use kvmmmu_core::vcpu::guest_ops::AccessOutcome;

const P: u64 = 1;
const W: u64 = 2;
const U: u64 = 4;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const MEM: u64 = 8 << 20;
const DATA: u64 = 1 << 20;
const GVA: u64 = 0x4000_0000;
const ALIAS: u64 = 0x8000_0000;
const RING_ENTRIES: usize = 256;

fn set_logging(g: &TestGuest, on: bool) {
    let r = kvm_userspace_memory_region2 {
        slot: 0,
        flags: if on { uapi::KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
        memory_size: MEM,
        userspace_addr: g.host.addr(),
        ..Default::default()
    };
    g.vm.set_user_memory_region(&r, RegionIoctl::V2).unwrap();
}

/// The gfns the log holds now, harvested (bitmap: GET; ring: entries collected and
/// reset).
fn harvest(g: &TestGuest, ring: bool, next: &mut usize) -> Vec<u64> {
    if !ring {
        return g.vm.harvest_dirty_pages(0).unwrap();
    }
    let base = (uapi::KVM_DIRTY_LOG_PAGE_OFFSET * 4096) as i64;
    let mut out = Vec::new();
    loop {
        let off = base + 16 * (*next % RING_ENTRIES) as i64;
        let mut e = [0u8; 16];
        nix::sys::uio::pread(g.vcpu.memfd(), &mut e, off).unwrap();
        if u32::from_le_bytes(e[0..4].try_into().unwrap()) & 1 == 0 {
            break;
        }
        out.push(u64::from_le_bytes(e[8..16].try_into().unwrap()));
        nix::sys::uio::pwrite(g.vcpu.memfd(), &2u32.to_le_bytes(), off).unwrap();
        *next += 1;
    }
    g.vm.reset_dirty_rings().unwrap();
    out.sort_unstable();
    out.dedup();
    out
}

fn done(r: kvmmmu_core::errno::Result<AccessOutcome>) {
    assert_eq!(r.unwrap(), AccessOutcome::Done);
}

fn write_after_sync_is_logged(ring: bool) {
    let ring_bytes = if ring { RING_ENTRIES as u64 * 16 } else { 0 };
    let mut g = TestGuest::build(PagingMode::Long4, MEM, ring_bytes, false).unwrap();
    let cr3 = g.cr3();
    // A supervisor page, dirty in the guest's tables, and an alias of its page table.
    g.map(cr3, GVA, DATA, 1, P | W | A | D);
    let gpte = g.entry_gpa(cr3, GVA, 1);
    g.map(cr3, ALIAS, gpte & !0xfff, 1, P | W | A | D);
    let alias = ALIAS + (gpte & 0xfff);
    // A read maps GVA writable (the gpte is dirty); a write through the alias makes
    // its page table unsync (a level-1 page the guest may write).
    done(g.read(GVA, false));
    done(g.write(alias, DATA | P | W | A | D, false));
    set_logging(&g, true);
    let mut next = 0;
    harvest(&g, ring, &mut next);
    // Logging write-protected GVA's SPTE. The guest gives the page to user mode and
    // flushes its TLB: the sync rebuilds the SPTE with the new rights, writable.
    done(g.write(alias, DATA | P | W | U | A | D, false));
    g.vcpu.guest_flush_tlb().unwrap();
    assert_eq!(
        harvest(&g, ring, &mut next),
        [DATA >> 12, gpte >> 12],
        "the gpte write, and the page the sync made writable"
    );
    // The write that follows cannot fault: it is only in the next harvest because
    // the sync's write-enabling was logged and the harvest re-protected the page.
    done(g.write(GVA, 7, true));
    assert_eq!(harvest(&g, ring, &mut next), [DATA >> 12], "no lost write");
    g.audit().unwrap();
}

#[test]
fn sync_that_makes_an_spte_writable_logs_the_page_bitmap() {
    write_after_sync_is_logged(false);
}

#[test]
fn sync_that_makes_an_spte_writable_logs_the_page_ring() {
    write_after_sync_is_logged(true);
}
