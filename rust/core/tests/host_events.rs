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
