//! Host translation updates (mmu.txt "Host translation updates", kvm-mmu-semantics.md
//! section 9): the host discards, migrates, write-protects or ages the memory behind
//! the guest, and the shadow MMU drops or updates exactly the affected SPTEs.

use kvmmmu_core::errno::Errno;
use kvmmmu_core::paging::PagingMode;
use kvmmmu_core::stats::VcpuStat;
use kvmmmu_core::testkit::TestGuest;
use kvmmmu_core::vcpu::guest_ops::{AccessKind, AccessOutcome};

const P: u64 = 1;
const W: u64 = 2;
const U: u64 = 4;
const DATA: u64 = 1 << 20;
const GVA: u64 = 0x4000_0000;

fn guest() -> TestGuest {
    let mut g = TestGuest::new(PagingMode::Long4, 8 << 20).unwrap();
    let cr3 = g.cr3();
    for i in 0..4 {
        g.map(cr3, GVA + i * 4096, DATA + i * 4096, 1, P | W | U);
    }
    g
}

fn hva(g: &TestGuest, gpa: u64) -> u64 {
    g.host.addr() + gpa
}

fn read(g: &TestGuest, gva: u64) -> u64 {
    let mut b = [0u8; 8];
    assert_eq!(
        g.access(
            gva,
            &mut b,
            AccessKind {
                user: true,
                ..Default::default()
            }
        )
        .unwrap(),
        AccessOutcome::Done
    );
    u64::from_le_bytes(b)
}

fn fixed(g: &TestGuest) -> u64 {
    g.vcpu.stats.get(VcpuStat::PfFixed as usize)
}

#[test]
fn discarded_memory_reads_as_zero_through_a_new_frame() {
    let g = guest();
    g.write(GVA, 0x1234, true).unwrap();
    assert_eq!(read(&g, GVA), 0x1234);
    g.vm.host_discard(hva(&g, DATA), 4096).unwrap();
    g.audit().unwrap();
    let before = fixed(&g);
    assert_eq!(
        read(&g, GVA),
        0,
        "the SPTE was zapped: the guest sees the new page"
    );
    assert_eq!(fixed(&g), before + 1);
    assert_eq!(read(&g, GVA + 4096), 0, "other pages untouched");
    g.audit().unwrap();
}

#[test]
fn migrated_page_is_remapped_to_its_new_frame() {
    let g = guest();
    g.write(GVA, 7, true).unwrap();
    let pfn = g.vm.host_migrate(hva(&g, DATA)).unwrap();
    g.audit().unwrap();
    assert_eq!(read(&g, GVA), 7, "contents move with the page");
    let st = g.vm.state();
    let (_, sp) = st.mmu.iter().find(|(_, sp)| sp.role.level() == 1).unwrap();
    assert!(sp
        .spt
        .iter()
        .any(|s| s.is_shadow_present() && s.pfn() == pfn));
    drop(st);
    g.audit().unwrap();
}

#[test]
fn write_protected_host_page_maps_read_only_and_a_write_breaks_cow() {
    let g = guest();
    g.write(GVA, 9, true).unwrap();
    g.vm.host_write_protect(hva(&g, DATA), 4096).unwrap();
    g.audit().unwrap();
    assert_eq!(read(&g, GVA), 9);
    g.audit().unwrap();
    g.write(GVA, 10, true).unwrap();
    g.audit().unwrap();
    assert_eq!(read(&g, GVA), 10);
    assert_eq!(g.read_u64(DATA), 10);
}

#[test]
fn aging_clears_and_tests_accessed_bits() {
    let g = guest();
    read(&g, GVA);
    let h = hva(&g, DATA);
    assert!(g.vm.host_age(h, 4096, false, false), "test_young");
    assert!(g.vm.host_age(h, 4096, true, true), "clear_flush_young");
    assert!(!g.vm.host_age(h, 4096, false, false), "cleared");
    read(&g, GVA);
    assert!(g.vm.host_age(h, 4096, false, false), "the CPU set A again");
    g.audit().unwrap();
}

#[test]
fn no_fault_maps_a_page_while_its_invalidation_runs() {
    let g = guest();
    read(&g, GVA);
    let h = hva(&g, DATA);
    g.vm.host_invalidate_start(h, 4096);
    g.audit().unwrap();
    let mut b = [0u8; 8];
    assert_eq!(
        g.access(GVA, &mut b, AccessKind::default()),
        Err(Errno::EAGAIN),
        "the vCPU would spin until the invalidation ends"
    );
    read(&g, GVA + 4096);
    g.audit().unwrap();
    g.vm.host_invalidate_end().unwrap();
    read(&g, GVA);
    g.audit().unwrap();
    assert_eq!(g.vm.host_invalidate_end(), Err(Errno::EINVAL));
}

#[test]
fn events_on_a_slot_not_aligned_to_huge_frames() {
    use kvmmmu_core::hostmem::HostRegion;
    use kvmmmu_core::memslot::RegionIoctl;
    use kvmmmu_core::uapi::kvm_userspace_memory_region2;
    let g = guest();
    // A slot at gfn 0x800 (8 MiB): its 1 GiB frame starts at gfn 0, below the slot.
    let host = HostRegion::new(0x76000).unwrap();
    let r = kvm_userspace_memory_region2 {
        slot: 1,
        guest_phys_addr: 0x80_0000,
        memory_size: 0x76000,
        userspace_addr: host.addr(),
        ..Default::default()
    };
    g.vm.set_user_memory_region(&r, RegionIoctl::V2).unwrap();
    g.vm.host_discard(host.addr() + 0x41000, 13 * 4096).unwrap();
    assert!(!g.vm.host_age(host.addr(), 0x76000, false, false));
    g.audit().unwrap();
}

/// The leaf levels of the present leaves mapping gfns [start, end).
fn leaf_levels_over(g: &TestGuest, start: u64, end: u64) -> Vec<u8> {
    let st = g.vm.state();
    let mut out = Vec::new();
    for (_, sp) in st.mmu.iter() {
        let level = sp.role.level();
        for (i, s) in sp.spt.iter().enumerate() {
            if !(s.is_shadow_present() && s.is_leaf(level)) {
                continue;
            }
            let gfn = sp.get_gfn(i);
            let pages = kvmmmu_core::mmu::rmap::kvm_pages_per_hpage(level);
            if gfn < end && start < gfn + pages {
                out.push(level);
            }
        }
    }
    out
}

/// Fuzzer finding (issue 6): with THP, a fault for a gfn outside an invalidation but
/// inside the same 2 MiB host page installed a 2 MiB leaf over the gfns being
/// invalidated. Linux splits a host huge page (an invalidation of all of it) before
/// it changes part of it, so host_pfn_mapping_level sees 4 KiB pages there.
fn no_huge_leaf_over_a_running_invalidation(mut g: TestGuest, gva: u64, gpa: u64) {
    g.host.set_thp(true).unwrap();
    let cr3 = g.cr3();
    g.map(cr3, gva, gpa, 2, P | W | U);
    let h = hva(&g, gpa);
    let (gfn0, gfn1) = ((gpa >> 12) + 0x13b, (gpa >> 12) + 0x147);
    read(&g, gva);
    assert_eq!(leaf_levels_over(&g, gfn0, gfn1), [2], "a huge leaf first");
    g.vm.host_invalidate_start(h + 0x13b000, 12 * 4096);
    assert!(leaf_levels_over(&g, gfn0, gfn1).is_empty(), "zapped");
    // A write to another page of the same 2 MiB: 4 KiB, not over the range.
    g.write(gva + 0x1fc000, 5, true).unwrap();
    assert_eq!(leaf_levels_over(&g, gpa >> 12, (gpa >> 12) + 512), [1]);
    assert!(leaf_levels_over(&g, gfn0, gfn1).is_empty());
    g.audit().unwrap();
    g.vm.host_invalidate_end().unwrap();
    // The host is free to map the 2 MiB huge again (nothing changed in it).
    g.vm.host_invalidate_start(h + 0x1fc000, 4096);
    g.vm.host_invalidate_end().unwrap();
    assert_eq!(read(&g, gva + 0x13b000), 0);
    assert_eq!(leaf_levels_over(&g, gfn0, gfn1), [2]);
    g.audit().unwrap();
}

#[test]
fn no_huge_leaf_over_a_running_invalidation_tdp() {
    let g = TestGuest::new_tdp(PagingMode::Long4, 8 << 20).unwrap();
    no_huge_leaf_over_a_running_invalidation(g, 0x4000_0000, 2 << 20);
}

#[test]
fn no_huge_leaf_over_a_running_invalidation_shadow() {
    let g = TestGuest::new(PagingMode::Long4, 8 << 20).unwrap();
    no_huge_leaf_over_a_running_invalidation(g, 0x4000_0000, 2 << 20);
}

/// Fuzzer finding (issue 6): a fault for a gpa without a memslot retried (EAGAIN)
/// because the hull of two running invalidations covered it. KVM only retries a
/// fault that has a slot (is_page_fault_stale: `fault->slot &&
/// mmu_invalidate_retry_gfn`); an MMIO access is emulated.
fn mmio_is_not_blocked_by_an_invalidation_hull(mut g: TestGuest) {
    use kvmmmu_core::hostmem::HostRegion;
    use kvmmmu_core::memslot::RegionIoctl;
    use kvmmmu_core::uapi::kvm_userspace_memory_region2;
    let host = HostRegion::new(1 << 20).unwrap();
    let r = kvm_userspace_memory_region2 {
        slot: 1,
        guest_phys_addr: 16 << 20,
        memory_size: 1 << 20,
        userspace_addr: host.addr(),
        ..Default::default()
    };
    g.vm.set_user_memory_region(&r, RegionIoctl::V2).unwrap();
    let cr3 = g.cr3();
    g.map(cr3, GVA + 0x10_0000, 12 << 20, 1, P | W | U);
    // Map the guest's tables first (TDP: their faults in the hull would wait).
    read(&g, GVA);
    // Gfns 0x100 and 0x1000 are invalidated: the hull covers the hole at 12 MiB.
    g.vm.host_invalidate_start(hva(&g, DATA), 4096);
    g.vm.host_invalidate_start(host.addr(), 4096);
    let mut b = [0u8; 8];
    let out = g.access(GVA + 0x10_0000, &mut b, AccessKind::default());
    assert!(
        matches!(out, Ok(AccessOutcome::Mmio { .. })),
        "an MMIO access is emulated, not retried: {out:?}"
    );
    g.vm.host_invalidate_end().unwrap();
    g.vm.host_invalidate_end().unwrap();
    g.audit().unwrap();
}

#[test]
fn mmio_is_not_blocked_by_an_invalidation_hull_shadow() {
    mmio_is_not_blocked_by_an_invalidation_hull(guest());
}

#[test]
fn mmio_is_not_blocked_by_an_invalidation_hull_tdp() {
    let mut g = TestGuest::new_tdp(PagingMode::Long4, 8 << 20).unwrap();
    let cr3 = g.cr3();
    g.map(cr3, GVA, DATA, 1, P | W | U);
    mmio_is_not_blocked_by_an_invalidation_hull(g);
}
