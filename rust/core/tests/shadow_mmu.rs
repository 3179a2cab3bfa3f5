//! The shadow MMU's reaction to guest events (mmu.txt "Reaction to events"), one
//! test per behaviour, on small simulated guests; the audit runs after every step.

use kvmmmu_core::paging::PagingMode;
use kvmmmu_core::paging::WalkError;
use kvmmmu_core::stats::{VcpuStat, VmStat};
use kvmmmu_core::testkit::TestGuest;
use kvmmmu_core::vcpu::guest_ops::{AccessKind, AccessOutcome, ControlReg};

const P: u64 = 1;
const W: u64 = 2;
const U: u64 = 4;
const A: u64 = 0x20;
const MEM: u64 = 16 << 20;
/// Test pages live at gpa 1 MiB..; the alias maps all guest memory at ALIAS + gpa.
const DATA: u64 = 1 << 20;
const GVA: u64 = 0x4000_0000;
const ALIAS: u64 = 0x8000_0000;

fn vm_stat(g: &TestGuest, s: VmStat) -> u64 {
    g.vm.stats.get(s as usize)
}

fn vcpu_stat(g: &TestGuest, s: VcpuStat) -> u64 {
    g.vcpu.stats.get(s as usize)
}

/// A guest in `mode` with `n` data pages mapped user-writable at GVA and all of
/// guest memory aliased (4 KiB, supervisor-writable) at ALIAS, so the guest can
/// edit its own page tables.
fn guest(mode: PagingMode, n: u64) -> (TestGuest, u64) {
    let mut g = TestGuest::new(mode, MEM).unwrap();
    let cr3 = g.cr3();
    for i in 0..n {
        g.map(cr3, GVA + i * 4096, DATA + i * 4096, 1, P | W | U);
    }
    // The alias of the table area (top 2 MiB, where the allocator works).
    for gpa in (MEM - (2 << 20)..MEM).step_by(4096) {
        g.map(cr3, ALIAS + gpa, gpa, 1, P | W);
    }
    g.reload_pdptrs();
    (g, cr3)
}

fn ok(r: AccessOutcome) {
    assert_eq!(r, AccessOutcome::Done);
}

fn pf(r: AccessOutcome) -> u32 {
    match r {
        AccessOutcome::Fault(WalkError::PageFault { error_code, .. }) => error_code,
        other => panic!("expected #PF, got {other:?}"),
    }
}

/// A guest write of gpte `v` at `gpa` through the alias (a native store).
fn guest_set_gpte(g: &TestGuest, gpa: u64, v: u64) {
    let mut b = v.to_le_bytes();
    let n = if g.mode == PagingMode::Bits32 { 4 } else { 8 };
    let r = g
        .access(
            ALIAS + gpa,
            &mut b[..n],
            AccessKind {
                write: true,
                ..Default::default()
            },
        )
        .unwrap();
    ok(r);
}

#[test]
fn first_touch_builds_the_shadow_path_and_prefetches() {
    let (g, _) = guest(PagingMode::Long4, 8);
    g.write_u64(DATA + 8, 0x1122_3344);
    let mut b = [0u8; 8];
    ok(g.access(GVA + 8, &mut b, AccessKind::default()).unwrap());
    assert_eq!(u64::from_le_bytes(b), 0x1122_3344);
    g.audit().unwrap();
    assert_eq!(vcpu_stat(&g, VcpuStat::PfFixed), 1);
    // 4 shadow pages (PML4, PDPT, PD, PT), and the 7 neighbours were prefetched... only
    // those with A set in the gpte: the kit's leaves have no A, so nothing is prefetched.
    assert_eq!(vm_stat(&g, VmStat::Pages4k), 1);
    // Touching the other pages faults once each.
    for i in 1..8 {
        ok(g.read(GVA + i * 4096, true).unwrap());
    }
    assert_eq!(vcpu_stat(&g, VcpuStat::PfFixed), 8);
    g.audit().unwrap();
}

#[test]
fn prefetch_fills_accessed_neighbours() {
    let (mut g, cr3) = guest(PagingMode::Long4, 0);
    for i in 0..8 {
        g.map(cr3, GVA + i * 4096, DATA + i * 4096, 1, P | W | U | A);
    }
    ok(g.read(GVA, true).unwrap());
    assert_eq!(vm_stat(&g, VmStat::Pages4k), 8);
    g.audit().unwrap();
    for i in 1..8 {
        ok(g.read(GVA + i * 4096, true).unwrap());
    }
    assert_eq!(
        vcpu_stat(&g, VcpuStat::PfFixed),
        1,
        "the rest hit prefetched SPTEs"
    );
}

#[test]
fn guest_fault_is_reflected_with_the_walkers_error_code() {
    let (g, _) = guest(PagingMode::Long4, 1);
    assert_eq!(pf(g.read(GVA + 0x10_0000, true).unwrap()), 0x4);
    assert_eq!(vcpu_stat(&g, VcpuStat::PfGuest), 1);
    assert_eq!(g.vcpu.state().sregs.cr2, GVA + 0x10_0000);
    g.audit().unwrap();
}

#[test]
fn unsync_page_keeps_stale_translation_until_invlpg() {
    for mode in [PagingMode::Long4, PagingMode::Pae, PagingMode::Bits32] {
        let (mut g, cr3) = guest(mode, 2);
        ok(g.write(GVA, 7, true).unwrap());
        let pte = g.entry_gpa(cr3, GVA, 1);
        // The guest clears P in its own PTE (a native store through the alias).
        guest_set_gpte(&g, pte, 0);
        g.audit().unwrap();
        assert_eq!(vm_stat(&g, VmStat::MmuUnsync), 1, "{mode:?}");
        // Still mapped: the SPTE is the TLB.
        ok(g.read(GVA, true).unwrap());
        g.vcpu.guest_invlpg(GVA).unwrap();
        g.audit().unwrap();
        assert_eq!(pf(g.read(GVA, true).unwrap()), 0x4, "{mode:?}");
        g.audit().unwrap();
    }
}

#[test]
fn cr3_reload_syncs_unsync_pages() {
    let (mut g, cr3) = guest(PagingMode::Long4, 2);
    ok(g.read(GVA, true).unwrap());
    let pte = g.entry_gpa(cr3, GVA, 1);
    guest_set_gpte(&g, pte, (DATA + 4096) | P | W | U);
    ok(g.read(GVA, true).unwrap());
    g.write_u64(DATA + 4096, 0xbeef);
    g.mov_cr3(cr3).unwrap();
    g.audit().unwrap();
    let mut b = [0u8; 8];
    ok(g.access(
        GVA,
        &mut b,
        AccessKind {
            user: true,
            ..Default::default()
        },
    )
    .unwrap());
    assert_eq!(u64::from_le_bytes(b), 0xbeef, "remapped after MOV CR3");
}

#[test]
fn upper_level_write_is_emulated_and_zaps() {
    let (mut g, cr3) = guest(PagingMode::Long4, 2);
    ok(g.read(GVA, true).unwrap());
    let pde = g.entry_gpa(cr3, GVA, 2);
    let old = g.read_gpte(pde);
    let before = vm_stat(&g, VmStat::MmuPteWrite);
    guest_set_gpte(&g, pde, 0);
    assert_eq!(vm_stat(&g, VmStat::MmuPteWrite), before + 1);
    assert!(vcpu_stat(&g, VcpuStat::PfEmulate) >= 1);
    g.audit().unwrap();
    // No stale translation: the write went through the emulator, which zapped it.
    assert_eq!(pf(g.read(GVA, true).unwrap()), 0x4);
    guest_set_gpte(&g, pde, old);
    ok(g.read(GVA, true).unwrap());
    g.audit().unwrap();
}

#[test]
fn write_flooding_zaps_after_three_writes() {
    let (mut g, cr3) = guest(PagingMode::Long4, 2);
    ok(g.read(GVA, true).unwrap());
    let pde = g.entry_gpa(cr3, GVA, 2);
    let spare = pde + 8 * 7;
    for i in 0..3 {
        guest_set_gpte(&g, spare, i);
        g.audit().unwrap();
    }
    assert_eq!(vm_stat(&g, VmStat::MmuFlooded), 1);
}

#[test]
fn cr0_wp_clear_lets_supervisor_write_read_only_page() {
    let (mut g, cr3) = guest(PagingMode::Long4, 0);
    g.map(cr3, GVA, DATA, 1, P | U);
    assert_eq!(pf(g.write(GVA, 1, false).unwrap()), 0x3);
    let cr0 = g.vcpu.state().sregs.cr0;
    g.vcpu
        .guest_write_control(ControlReg::Cr0, cr0 & !(1 << 16))
        .unwrap()
        .unwrap();
    ok(g.write(GVA, 1, false).unwrap());
    g.audit().unwrap();
    // The SPTE became supervisor-only: a user read faults into KVM, which fixes it.
    ok(g.read(GVA, true).unwrap());
    g.audit().unwrap();
}

#[test]
fn mmio_access_has_no_memory() {
    let (mut g, cr3) = guest(PagingMode::Long4, 0);
    g.map(cr3, GVA, 0x1_0000_0000, 1, P | W);
    let r = g.read(GVA, false).unwrap();
    assert_eq!(r, AccessOutcome::Mmio { gpa: 0x1_0000_0000 });
    g.audit().unwrap();
    // Second time: the MMIO SPTE answers without pf_taken.
    let taken = vcpu_stat(&g, VcpuStat::PfTaken);
    assert_eq!(
        g.read(GVA, false).unwrap(),
        AccessOutcome::Mmio { gpa: 0x1_0000_0000 }
    );
    assert_eq!(vcpu_stat(&g, VcpuStat::PfTaken), taken);
}

#[test]
fn nonpaging_guest_uses_direct_pages() {
    let g = TestGuest::new(PagingMode::None, MEM).unwrap();
    g.write_u64(0x5008, 42);
    let mut b = [0u8; 8];
    ok(g.access(0x5008, &mut b, AccessKind::default()).unwrap());
    assert_eq!(u64::from_le_bytes(b), 42);
    g.audit().unwrap();
    ok(g.write(0x6000, 1, false).unwrap());
    g.audit().unwrap();
}

#[test]
fn huge_guest_pages_with_thp_get_huge_sptes() {
    let (mut g, cr3) = guest(PagingMode::Long4, 0);
    g.host.set_thp(true).unwrap();
    g.map(cr3, 0x4000_0000, 2 << 20, 2, P | W | U);
    ok(g.read(0x4000_0000 + 0x1234, true).unwrap());
    assert_eq!(vm_stat(&g, VmStat::Pages2m), 1);
    g.audit().unwrap();
    // Without THP the same mapping is shadowed with 4 KiB SPTEs.
    let (mut g, cr3) = guest(PagingMode::Long4, 0);
    g.map(cr3, 0x4000_0000, 2 << 20, 2, P | W | U);
    ok(g.read(0x4000_0000 + 0x1234, true).unwrap());
    assert_eq!(vm_stat(&g, VmStat::Pages2m), 0);
    assert_eq!(
        vm_stat(&g, VmStat::Pages4k),
        8,
        "the fault and its direct prefetch"
    );
    g.audit().unwrap();
}

#[test]
fn page_limit_reclaims_the_oldest_pages_but_never_roots() {
    use kvmmmu_core::uaccess::ProcessVm;
    let (mut g, cr3) = guest(PagingMode::Long4, 0);
    // One page in each of 150 page tables (each 2 MiB of gva has its own PT).
    for i in 0..150u64 {
        g.map(cr3, GVA + (i << 21), DATA + (i << 12), 1, P | W | U);
    }
    g.vm.ioctl(kvmmmu_core::uapi::KVM_SET_NR_MMU_PAGES, 64, &mut ProcessVm)
        .unwrap();
    for i in 0..150u64 {
        ok(g.read(GVA + (i << 21), true).unwrap());
        let st = g.vm.state();
        assert!(st.mmu.n_used() <= st.mmu.n_max() + 4, "soft limit");
        drop(st);
    }
    g.audit().unwrap();
    assert!(vm_stat(&g, VmStat::MmuRecycled) > 0);
    // The root survived every reclaim: its translations still work.
    ok(g.read(GVA, true).unwrap());
    g.audit().unwrap();
}

#[test]
fn memslot_delete_zaps_everything_and_roots_are_reloaded() {
    use kvmmmu_core::hostmem::HostRegion;
    use kvmmmu_core::memslot::RegionIoctl;
    use kvmmmu_core::uapi::kvm_userspace_memory_region2;
    let (mut g, cr3) = guest(PagingMode::Long4, 1);
    let extra = HostRegion::new(1 << 20).unwrap();
    let region = |size| kvm_userspace_memory_region2 {
        slot: 1,
        guest_phys_addr: 1 << 30,
        memory_size: size,
        userspace_addr: extra.addr(),
        ..Default::default()
    };
    g.vm.set_user_memory_region(&region(1 << 20), RegionIoctl::V2)
        .unwrap();
    g.map(cr3, GVA + 0x10_0000, 1 << 30, 1, P | W | U);
    ok(g.write(GVA + 0x10_0000, 5, true).unwrap());
    ok(g.read(GVA, true).unwrap());
    let zapped = vm_stat(&g, VmStat::MmuShadowZapped);
    g.vm.set_user_memory_region(&region(0), RegionIoctl::V2)
        .unwrap();
    g.audit().unwrap();
    assert!(vm_stat(&g, VmStat::MmuShadowZapped) > zapped);
    assert_eq!(vm_stat(&g, VmStat::Pages4k), 0);
    // The old root is an invalid root until the vCPU drops it on its next entry.
    assert_eq!(
        g.read(GVA + 0x10_0000, true).unwrap(),
        AccessOutcome::Mmio { gpa: 1 << 30 }
    );
    ok(g.read(GVA, true).unwrap());
    g.audit().unwrap();
    let st = g.vm.state();
    assert!(
        st.mmu.iter().all(|(_, sp)| !sp.role.invalid()),
        "invalid root freed"
    );
}

#[test]
fn cr3_switch_reuses_up_to_three_cached_roots() {
    let (mut g, cr3) = guest(PagingMode::Long4, 1);
    let mut roots = vec![cr3];
    for _ in 0..4 {
        let r = g.new_root();
        // Share the lower tables: copy the PML4.
        for i in 0..512 {
            let v = g.read_u64(cr3 + 8 * i);
            g.write_u64(r + 8 * i, v);
        }
        roots.push(r);
    }
    ok(g.read(GVA, true).unwrap());
    for &r in &roots[1..4] {
        g.mov_cr3(r).unwrap();
        ok(g.read(GVA, true).unwrap());
    }
    // Back to the first: it is the least recently used of the three cached roots.
    let miss = vm_stat(&g, VmStat::MmuCacheMiss);
    g.mov_cr3(roots[0]).unwrap();
    ok(g.read(GVA, true).unwrap());
    assert_eq!(
        vm_stat(&g, VmStat::MmuCacheMiss),
        miss,
        "cached root reused"
    );
    g.audit().unwrap();
    // A fifth address space pushes the oldest out of the cache.
    g.mov_cr3(roots[4]).unwrap();
    ok(g.read(GVA, true).unwrap());
    let ctx = g.vcpu.state().mmu.clone();
    assert_eq!(ctx.roots().count(), 4, "current + 3 previous");
    g.audit().unwrap();
}

#[test]
fn pae_roots_follow_the_pdptes() {
    let (g, _) = guest(PagingMode::Pae, 1);
    ok(g.read(GVA, true).unwrap());
    let ctx = g.vcpu.state().mmu.clone();
    match ctx.root.hpa {
        kvmmmu_core::mmu::context::RootHpa::Pae(r) => {
            assert!(r.iter().all(|&sp| sp != u32::MAX), "four present PDPTEs")
        }
        other => panic!("PAE guest root {other:?}"),
    }
    g.audit().unwrap();
}

#[test]
fn bits32_guest_pd_is_shadowed_by_four_quadrants() {
    let (g, _) = guest(PagingMode::Bits32, 1);
    ok(g.read(GVA, true).unwrap());
    let st = g.vm.state();
    let quadrants: Vec<u8> = st
        .mmu
        .iter()
        .filter(|(_, sp)| sp.role.level() == 2 && sp.root_count > 0)
        .map(|(_, sp)| sp.role.quadrant())
        .collect();
    assert_eq!(quadrants.len(), 4);
    let mut q = quadrants.clone();
    q.sort();
    assert_eq!(q, vec![0, 1, 2, 3]);
    drop(st);
    g.audit().unwrap();
}

#[test]
fn non_page_table_instruction_unshadows_the_table_instead_of_emulating() {
    let (mut g, cr3) = guest(PagingMode::Long4, 2);
    ok(g.read(GVA, true).unwrap());
    let pd = g.entry_gpa(cr3, GVA, 2) & !0xfff;
    let shadowed = |g: &TestGuest| g.vm.state().mmu.gfn_sps_with_gptes(pd >> 12).len();
    assert_eq!(shadowed(&g), 1);
    let spare = pd + 8 * 300;
    let mut b = 0x1234_5000u64.to_le_bytes();
    let kind = AccessKind {
        write: true,
        ..Default::default()
    };
    let pte_writes = vm_stat(&g, VmStat::MmuPteWrite);
    ok(g.vcpu
        .guest_access_insn(ALIAS + spare, &mut b, kind, false)
        .unwrap());
    assert_eq!(shadowed(&g), 0, "the PD's shadow page was zapped");
    assert_eq!(vm_stat(&g, VmStat::MmuPteWrite), pte_writes, "not emulated");
    assert_eq!(g.read_u64(spare), 0x1234_5000);
    g.audit().unwrap();
    // The next access through that table shadows it again.
    ok(g.read(GVA, true).unwrap());
    assert_eq!(shadowed(&g), 1);
    g.audit().unwrap();
}

#[test]
fn tdp_maps_guest_physical_memory_with_direct_pages() {
    let mut g = TestGuest::new_tdp(PagingMode::Long4, MEM).unwrap();
    let cr3 = g.cr3();
    g.map(cr3, GVA, DATA, 1, P | W | U);
    g.write_u64(DATA, 77);
    let mut b = [0u8; 8];
    ok(g.access(GVA, &mut b, AccessKind::default()).unwrap());
    assert_eq!(u64::from_le_bytes(b), 77);
    g.audit().unwrap();
    {
        let st = g.vm.state();
        assert!(
            st.mmu.iter().all(|(_, sp)| sp.role.direct()),
            "no shadowed guest tables"
        );
        assert_eq!(st.mmu.indirect_shadow_pages(), 0);
    }
    // Guest faults go to the guest without KVM; INVLPG and MOV CR3 do not exit.
    assert_eq!(pf(g.read(GVA + 0x20_0000, false).unwrap()), 0);
    assert_eq!(vcpu_stat(&g, VcpuStat::PfGuest), 0);
    g.vcpu.guest_invlpg(GVA).unwrap();
    assert_eq!(vcpu_stat(&g, VcpuStat::Invlpg), 0);
    // The guest edits its PTE: seen at once (no shadow to sync).
    let pte = g.entry_gpa(cr3, GVA, 1);
    g.write_u64(pte, (DATA + 4096) | P | W | U);
    g.write_u64(DATA + 4096, 78);
    ok(g.access(GVA, &mut b, AccessKind::default()).unwrap());
    assert_eq!(u64::from_le_bytes(b), 78);
    g.audit().unwrap();
}

#[test]
fn pae_pdpte_reload_with_new_values_rebuilds_the_root() {
    let (g, cr3) = guest(PagingMode::Pae, 1);
    ok(g.read(GVA, true).unwrap());
    // The guest clears PDPTE[1] (which maps GVA) in memory, then reloads CR3 with
    // the same value: the PDPTE registers change, and the old PAE root must go.
    guest_set_gpte(&g, cr3 + 8, 0);
    ok(g.read(GVA, true).unwrap());
    g.mov_cr3(cr3).unwrap();
    g.audit().unwrap();
    assert_eq!(pf(g.read(GVA, true).unwrap()), 0x4);
    g.audit().unwrap();
}
