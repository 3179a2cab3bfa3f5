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
