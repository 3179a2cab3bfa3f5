//! Property: on random guests in every paging mode, random guest edits of their own
//! page tables (native stores through an alias mapping, so they go through the
//! MMU: unsync pages, emulated writes, flooding), accesses at CPL0 and CPL3,
//! INVLPG, CR3 switches between address spaces that share tables, guest TLB
//! flushes and CR0.WP / CR4.SMEP / EFER.NX changes keep the shadow MMU's audit
//! clean after every step, and every access to an address whose translation the
//! guest has not changed since its last TLB maintenance sees exactly what the
//! guest walker says (the gpa and its data, or the fault and its error code).
//! An address whose gptes changed may see the old or the new translation until the
//! guest flushes it, as on hardware; those accesses are only required not to
//! break the audit.

use std::collections::HashSet;

use kvmmmu_core::hostmem::HostRegion;
use kvmmmu_core::paging::{self, Access, GuestMem, PagingMode, WalkError};
use kvmmmu_core::testkit::TestGuest;
use kvmmmu_core::vcpu::guest_ops::{AccessKind, AccessOutcome, ControlReg};
use proptest::prelude::*;

const P: u64 = 1;
const W: u64 = 2;
const U: u64 = 4;
const A: u64 = 0x20;
const D: u64 = 0x40;
const PS: u64 = 0x80;
const NX: u64 = 1 << 63;
const MEM: u64 = 8 << 20;
/// Data pages: [1 MiB, 3 MiB). Tables come from the top of memory.
const DATA: u64 = 1 << 20;
const DATA_PAGES: u64 = 512;
/// The alias of the table area (the top 1 MiB), for the guest's own edits.
const ALIAS: u64 = 0xc000_0000;
const TABLES: u64 = MEM - (1 << 20);
/// Test addresses: 8 pages in one table, 4 in another, and one 2/4 MiB large page.
const GVAS: [u64; 13] = [
    0x0040_0000,
    0x0040_1000,
    0x0040_2000,
    0x0040_3000,
    0x0040_4000,
    0x0040_5000,
    0x0040_6000,
    0x0040_7000,
    0x0080_0000,
    0x0080_1000,
    0x0080_7000,
    0x0081_0000,
    0x0100_0000,
];
const BIG: usize = 12;

/// Guest memory as a walk sees it without changing it (the A/D update needs a
/// compare-exchange, which this refuses), for computing the expected outcome.
struct Snapshot<'a>(&'a HostRegion);

impl GuestMem for Snapshot<'_> {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        gpa.checked_add(buf.len() as u64).is_some_and(|e| e <= MEM)
            && self.0.read(gpa as usize, buf).is_ok()
    }
    fn cmpxchg(&self, _: u64, _: usize, _: u64, _: u64) -> Result<bool, ()> {
        Err(())
    }
}

#[derive(Clone, Debug)]
enum Op {
    Access {
        gva: usize,
        off: u16,
        write: bool,
        fetch: bool,
        user: bool,
        value: u64,
    },
    /// Change gpte number `level` (1 = leaf side) on the path of `gva` by `how`.
    Edit {
        gva: usize,
        depth: u8,
        how: u8,
        target: u16,
    },
    Invlpg {
        gva: usize,
    },
    MovCr3 {
        root: usize,
    },
    Flush,
    ToggleWp,
    ToggleSmep,
    ToggleNx,
    /// KVM_SET_NR_MMU_PAGES: small limits force reclaim.
    SetLimit {
        pages: u8,
    },
    /// Let the host back guest memory with huge pages (or not).
    Thp {
        on: bool,
    },
    /// Create or delete a second memslot (deleting zaps everything, fast).
    Slot {
        create: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let gva = 0..GVAS.len();
    prop_oneof![
        6 => (gva.clone(), 0u16..512, any::<bool>(), any::<bool>(), any::<bool>(), any::<u64>()).prop_map(
            |(gva, off, write, fetch, user, value)| Op::Access { gva, off: off * 8, write, fetch: fetch && !write, user, value }
        ),
        4 => (gva.clone(), 0u8..5, 0u8..8, 0u16..DATA_PAGES as u16).prop_map(|(gva, depth, how, target)| Op::Edit { gva, depth, how, target }),
        2 => gva.prop_map(|gva| Op::Invlpg { gva }),
        1 => (0usize..3).prop_map(|root| Op::MovCr3 { root }),
        1 => Just(Op::Flush),
        1 => Just(Op::ToggleWp),
        1 => Just(Op::ToggleSmep),
        1 => Just(Op::ToggleNx),
        1 => any::<u8>().prop_map(|pages| Op::SetLimit { pages }),
        1 => any::<bool>().prop_map(|on| Op::Thp { on }),
        1 => any::<bool>().prop_map(|create| Op::Slot { create }),
    ]
}

fn mode() -> impl Strategy<Value = PagingMode> {
    prop_oneof![
        Just(PagingMode::None),
        Just(PagingMode::Bits32),
        Just(PagingMode::Pae),
        Just(PagingMode::Long4),
        Just(PagingMode::Long5),
    ]
}

#[derive(Clone, Debug)]
struct Setup {
    /// Per test address: mapped, data page, leaf flags.
    leaves: Vec<(bool, u16, u8)>,
}

fn setup() -> impl Strategy<Value = Setup> {
    prop::collection::vec(
        (
            prop::bool::weighted(0.85),
            0u16..DATA_PAGES as u16,
            any::<u8>(),
        ),
        GVAS.len(),
    )
    .prop_map(|leaves| Setup { leaves })
}

struct Model {
    g: TestGuest,
    extra: Option<std::sync::Arc<HostRegion>>,
    roots: Vec<u64>,
    wide: bool,
    /// Addresses whose translation may be stale (changed since their last flush).
    stale: HashSet<usize>,
}

impl Model {
    fn build(mode: PagingMode, s: &Setup, tdp: bool) -> Model {
        let mut g = TestGuest::build(mode, MEM, 0, tdp).unwrap();
        let wide = mode != PagingMode::Bits32;
        let cr3 = g.cr3();
        let mut roots = vec![cr3];
        if mode != PagingMode::None {
            // The alias first, so the test addresses' tables come after it.
            for gpa in (TABLES..MEM).step_by(4096) {
                g.map(cr3, ALIAS + gpa - TABLES, gpa, 1, P | W | A | D);
            }
            for (i, &(mapped, page, fl)) in s.leaves.iter().enumerate() {
                let mut flags = P | A;
                flags |= if fl & 1 != 0 { W } else { 0 };
                flags |= if fl & 2 != 0 { U } else { 0 };
                flags |= if fl & 4 != 0 { D } else { 0 };
                flags &= if fl & 8 != 0 { !A } else { !0 };
                if wide && fl & 0x10 != 0 {
                    flags |= NX;
                }
                if i == BIG {
                    // A large page: 2 MiB (4 MiB for 32-bit tables), aligned, inside data.
                    // 2 MiB at 2 MiB, or 4 MiB at 0: data and low memory, never tables.
                    let gpa = if wide { 2 << 20 } else { 0 };
                    let _ = page;
                    g.map(
                        cr3,
                        GVAS[i],
                        gpa,
                        2,
                        if mapped { flags } else { flags & !P },
                    );
                } else {
                    let gpa = DATA + (u64::from(page) << 12);
                    g.map(
                        cr3,
                        GVAS[i],
                        gpa,
                        1,
                        if mapped { flags } else { flags & !P },
                    );
                }
            }
            // Two more address spaces sharing every table below the root.
            for _ in 0..2 {
                let r = g.new_root();
                let n = if mode == PagingMode::Pae {
                    4
                } else {
                    4096 / if wide { 8 } else { 4 }
                };
                let size = if wide { 8 } else { 4 };
                for i in 0..n {
                    let v = g.read_gpte(cr3 + i * size);
                    g.write_gpte(r + i * size, v);
                }
                roots.push(r);
            }
            g.reload_pdptrs();
        }
        Model {
            g,
            extra: None,
            roots,
            wide,
            stale: HashSet::new(),
        }
    }

    fn cpu(&self) -> paging::WalkCtx {
        self.g.vcpu.state().walk_ctx()
    }

    /// The gptes a walk of `gva` reads under the current CR3 (gpa of each entry).
    fn path(&self, gva: u64) -> Vec<(u8, u64)> {
        self.path_under(gva, self.cpu().cr3)
    }

    /// The same under any of the roots (PAE: the PDPTE as in memory).
    fn path_under(&self, gva: u64, cr3: u64) -> Vec<(u8, u64)> {
        let ctx = self.cpu();
        let mode = ctx.mode();
        let (mut level, bits, size) = match mode {
            PagingMode::None => return vec![],
            PagingMode::Bits32 => (2u8, 10u32, 4u64),
            PagingMode::Pae => (2, 9, 8),
            PagingMode::Long4 => (4, 9, 8),
            PagingMode::Long5 => (5, 9, 8),
        };
        let mask = if self.wide {
            0x000f_ffff_ffff_f000
        } else {
            0xffff_f000
        };
        let mut table = if mode == PagingMode::Pae {
            let pdpte = self.g.read_u64((cr3 & 0xffff_ffe0) + 8 * ((gva >> 30) & 3));
            if pdpte & P == 0 {
                return vec![];
            }
            pdpte & mask
        } else {
            cr3 & mask
        };
        let mut out = vec![];
        loop {
            let e =
                table + ((gva >> (12 + bits * u32::from(level - 1))) & ((1 << bits) - 1)) * size;
            if e >= MEM {
                return out;
            }
            out.push((level, e));
            let v = self.g.read_gpte(e);
            if level == 1 || v & P == 0 || v & PS != 0 {
                return out;
            }
            table = v & mask;
            level -= 1;
        }
    }

    fn expected(&self, gva: u64, kind: AccessKind) -> Result<u64, WalkError> {
        let ctx = self.cpu();
        let access = Access {
            write: kind.write,
            user: kind.user,
            fetch: kind.fetch,
            implicit: false,
        };
        paging::walk(&ctx, &Snapshot(&self.g.host), gva, access).map(|w| w.gpa)
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Access {
                gva: i,
                off,
                write,
                fetch,
                user,
                value,
            } => {
                let gva = GVAS[i] + u64::from(off);
                let kind = AccessKind {
                    write,
                    fetch,
                    user,
                    implicit: false,
                };
                let expect = self.expected(gva, kind);
                let mut buf = value.to_le_bytes();
                let got = self.g.access(gva, &mut buf, kind).unwrap();
                if self.stale.contains(&i) {
                    return Ok(());
                }
                match (expect, got) {
                    (Ok(gpa), AccessOutcome::Mmio { gpa: m }) if gpa >= MEM => {
                        prop_assert_eq!(gpa & !0xfff, m & !0xfff)
                    }
                    (Ok(gpa), AccessOutcome::Done) => {
                        let mem = self.g.read_u64(gpa);
                        if write {
                            prop_assert_eq!(mem, value, "write at {:#x} -> {:#x}", gva, gpa);
                        } else {
                            prop_assert_eq!(
                                u64::from_le_bytes(buf),
                                mem,
                                "read at {:#x} -> {:#x}",
                                gva,
                                gpa
                            );
                        }
                    }
                    (Err(e), AccessOutcome::Fault(f)) => {
                        prop_assert_eq!(e, f, "fault at {:#x}", gva)
                    }
                    (e, g) => {
                        let path: Vec<_> = self
                            .path(gva)
                            .iter()
                            .map(|&(l, x)| (l, x, self.g.read_gpte(x)))
                            .collect();
                        prop_assert!(
                            false,
                            "{:#x} {:?}: walker {:x?}, MMU {:?}; path {:x?}; ctx {:x?}",
                            gva,
                            kind,
                            e,
                            g,
                            path,
                            self.cpu()
                        )
                    }
                }
            }
            Op::Edit {
                gva: i,
                depth,
                how,
                target,
            } => {
                let path = self.path(GVAS[i]);
                if path.is_empty() {
                    return Ok(());
                }
                let (level, e) = path[path.len() - 1 - (usize::from(depth) % path.len())];
                // The alias's own upper entries stay: the guest needs them to edit.
                if self.path(ALIAS).iter().any(|&(l, x)| l > 1 && x == e) {
                    return Ok(());
                }
                let old = self.g.read_gpte(e);
                let leaf = level == 1 || old & PS != 0;
                let new = match how {
                    0 => old ^ P,
                    1 => old ^ W,
                    2 => old ^ U,
                    3 => old ^ A,
                    4 if leaf => old ^ D,
                    5 if self.wide => old ^ NX,
                    6 | 7 if level == 1 => {
                        (old & 0xfff) | (old & NX) | (DATA + (u64::from(target) << 12))
                    }
                    _ => old ^ W,
                };
                // Every address whose walk reads this entry may now be stale.
                for (j, &g) in GVAS.iter().enumerate() {
                    if self.path(g).iter().any(|&(_, x)| x == e) {
                        self.stale.insert(j);
                    }
                }
                let size = if self.wide { 8 } else { 4 };
                let mut b = new.to_le_bytes();
                let r = self
                    .g
                    .access(
                        ALIAS + e - TABLES,
                        &mut b[..size],
                        AccessKind {
                            write: true,
                            ..Default::default()
                        },
                    )
                    .unwrap();
                prop_assert_eq!(
                    r,
                    AccessOutcome::Done,
                    "guest store to its gpte at {:#x}",
                    e
                );
            }
            Op::Invlpg { gva } => {
                self.g.vcpu.guest_invlpg(GVAS[gva]).unwrap();
                // The large page's INVLPG covers every address in it; others only their own.
                self.stale.remove(&gva);
            }
            Op::MovCr3 { root } => {
                if self.roots.len() > 1 {
                    let cr3 = self.roots[root % self.roots.len()];
                    self.g.mov_cr3(cr3).unwrap();
                    self.stale.clear();
                }
            }
            Op::Flush => {
                self.g.vcpu.guest_flush_tlb().unwrap();
                self.stale.clear();
            }
            Op::ToggleWp => {
                let cr0 = self.g.vcpu.state().sregs.cr0;
                let _ = self
                    .g
                    .vcpu
                    .guest_write_control(ControlReg::Cr0, cr0 ^ (1 << 16))
                    .unwrap();
            }
            Op::ToggleSmep => {
                let cr4 = self.g.vcpu.state().sregs.cr4;
                let _ = self
                    .g
                    .vcpu
                    .guest_write_control(ControlReg::Cr4, cr4 ^ (1 << 20))
                    .unwrap();
            }
            Op::SetLimit { pages } => {
                let n = 64 + u64::from(pages % 64);
                self.g
                    .vm
                    .ioctl(
                        kvmmmu_core::uapi::KVM_SET_NR_MMU_PAGES,
                        n,
                        &mut kvmmmu_core::uaccess::ProcessVm,
                    )
                    .unwrap();
            }
            Op::Thp { on } => self.g.host.set_thp(on).unwrap(),
            Op::Slot { create } => {
                use kvmmmu_core::memslot::RegionIoctl;
                use kvmmmu_core::uapi::kvm_userspace_memory_region2;
                if create && self.extra.is_none() {
                    let h = HostRegion::new(1 << 20).unwrap();
                    let r = kvm_userspace_memory_region2 {
                        slot: 1,
                        guest_phys_addr: 1 << 32,
                        memory_size: 1 << 20,
                        userspace_addr: h.addr(),
                        ..Default::default()
                    };
                    self.g
                        .vm
                        .set_user_memory_region(&r, RegionIoctl::V2)
                        .unwrap();
                    self.extra = Some(h);
                } else if !create && self.extra.is_some() {
                    let r = kvm_userspace_memory_region2 {
                        slot: 1,
                        ..Default::default()
                    };
                    self.g
                        .vm
                        .set_user_memory_region(&r, RegionIoctl::V2)
                        .unwrap();
                    self.extra = None;
                }
            }
            Op::ToggleNx => {
                // KVM's shadow pages do not depend on EFER.NX (the root role forces
                // efer_nx), so gptes with bit 63 already shadowed keep their SPTEs when
                // the guest clears EFER.NX, even across flushes: the guest must not
                // have such gptes when it clears NX for this property to hold.
                // (Shadow pages outlive their links, so any table counts, not just
                // the current paths.)
                let nx_in_use = self.wide
                    && (TABLES..MEM)
                        .step_by(8)
                        .any(|e| self.g.read_u64(e) & NX != 0);
                if nx_in_use {
                    return Ok(());
                }
                let efer = self.g.vcpu.state().sregs.efer;
                let _ = self
                    .g
                    .vcpu
                    .guest_write_control(ControlReg::Efer, efer ^ (1 << 11))
                    .unwrap();
            }
        }
        let audit = self.g.audit();
        prop_assert!(
            audit.is_ok(),
            "audit after {:?}: {}",
            op,
            audit.unwrap_err()
        );
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn shadow_mmu_matches_the_walker_after_tlb_maintenance(
        mode in mode(),
        s in setup(),
        ops in prop::collection::vec(op(), 1..80),
    ) {
        let mut m = Model::build(mode, &s, false);
        for o in &ops {
            m.step(o)?;
        }
    }

    /// The same guests under two-dimensional paging (direct gpa -> hpa tables), with
    /// the same audit.
    #[test]
    fn tdp_mmu_matches_the_walker(
        mode in mode(),
        s in setup(),
        ops in prop::collection::vec(op(), 1..80),
    ) {
        let mut m = Model::build(mode, &s, true);
        for o in &ops {
            m.step(o)?;
        }
    }
}
