//! Per-mode walker tests with hand-derived expectations. Every check asserts
//! two things: the SDM oracle gives the value written here by hand (so these
//! are also the oracle's self-tests), and the walker agrees with the oracle on
//! everything (outcome, gpa/level/size/access, gptes, memory after, the order
//! of A/D writes, dirty logging).

mod common;

use common::*;
use kvmmmu_core::paging::GuestMem;
use std::sync::Mutex;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Ok { gpa: u64, level: u8, size: u64 },
    Pf(u32),
    Gp,
}

const R: OracleAccess = OracleAccess {
    write: false,
    user: false,
    fetch: false,
    implicit: false,
};
const W: OracleAccess = OracleAccess { write: true, ..R };
const F: OracleAccess = OracleAccess { fetch: true, ..R };
const UR: OracleAccess = OracleAccess { user: true, ..R };
const UW: OracleAccess = OracleAccess {
    user: true,
    write: true,
    ..R
};
const UF: OracleAccess = OracleAccess {
    user: true,
    fetch: true,
    ..R
};
const IMPLICIT_R: OracleAccess = OracleAccess {
    implicit: true,
    ..R
};

const K4: u64 = 4 << 10;
const M2: u64 = 2 << 20;
const M4: u64 = 4 << 20;
const G1: u64 = 1 << 30;

/// 4/5-level test address: indices PML5 0, PML4 0x24, PDPT 0xd1, PD 0xb3,
/// PT 0x189, offset 0xabc.
const GVA: u64 = 0x1234_5678_9abc;
/// PAE/32-bit test address: PDPTE 3, PAE PD 0x91 / PT 0x145; 32-bit PD 0x348 /
/// PT 0x345; offset 0xabc.
const GVA32: u64 = 0xd234_5abc;
const T0: u64 = 0x10; // first table gfn
const FRAME: u64 = 0x8765_4000;
const UPPER: u64 = PTE_P | PTE_W | PTE_U;
const LEAF: u64 = PTE_P | PTE_W | PTE_U;

fn gva_for(mode: Mode) -> u64 {
    match mode {
        Mode::Level4 | Mode::Level5 | Mode::Off => GVA,
        _ => GVA32,
    }
}

fn chain(mode: Mode, leaf_level: u8, frame: u64) -> (OracleMem, Chain) {
    let mut mem = OracleMem::default();
    let c = build_chain(
        mode,
        &mut mem,
        gva_for(mode),
        T0,
        leaf_level,
        UPPER,
        LEAF,
        frame,
    );
    (mem, c)
}

/// Check the oracle against the hand expectation, then the walker against
/// the oracle. Returns what the walker did.
fn check_opts(
    what: &str,
    cpu: &OracleCpu,
    mem: &OracleMem,
    gva: u64,
    acc: OracleAccess,
    expect: Expect,
    opts: CompareOpts,
) -> Observed {
    let exp = observe_oracle(cpu, mem, gva, acc);
    let oracle_says = match &exp.outcome {
        OracleOutcome::Ok {
            gpa,
            level,
            page_size,
            ..
        } => Expect::Ok {
            gpa: *gpa,
            level: *level,
            size: *page_size,
        },
        OracleOutcome::Fault {
            vector: 14,
            error_code,
            address,
        } => {
            assert_eq!(*address, gva, "{what}: CR2");
            Expect::Pf(*error_code)
        }
        OracleOutcome::Fault {
            vector: 13,
            error_code: 0,
            ..
        } => Expect::Gp,
        o => panic!("{what}: oracle gave {o:?}"),
    };
    assert_eq!(
        oracle_says, expect,
        "{what}: ORACLE disagrees with the hand-derived expectation (access {acc:?})"
    );
    if let Expect::Pf(_) | Expect::Gp = expect {
        assert_eq!(exp.mem_after, *mem, "{what}: oracle wrote on a fault");
    }
    let tmem = TestMem::new(mem);
    let got = observe_walker(cpu, &tmem, gva, acc);
    let d = diff(paging_mode(cpu) == PagingMode::None, &exp, &got, opts);
    assert!(
        d.is_empty(),
        "{what}: walker differs from the oracle (access {acc:?}):{d}"
    );
    got
}

fn check(
    what: &str,
    cpu: &OracleCpu,
    mem: &OracleMem,
    gva: u64,
    acc: OracleAccess,
    expect: Expect,
) -> Observed {
    check_opts(
        what,
        cpu,
        mem,
        gva,
        acc,
        expect,
        CompareOpts {
            exact_writes: true,
            gptes_modulo_ad: false,
        },
    )
}

fn ok4k(gpa: u64) -> Expect {
    Expect::Ok {
        gpa,
        level: 1,
        size: K4,
    }
}

fn gptes_of(o: &Observed) -> Vec<(u8, u64, u64)> {
    match &o.outcome {
        OracleOutcome::Ok { gptes, .. } => gptes.clone(),
        o => panic!("not a translation: {o:?}"),
    }
}

// ---------------------------------------------------------------------------

#[test]
fn translate_4k_in_every_mode() {
    for mode in [
        Mode::Bits32 { pse: false },
        Mode::Bits32 { pse: true },
        Mode::Pae,
        Mode::Level4,
        Mode::Level5,
    ] {
        let (mem, c) = chain(mode, 1, FRAME);
        let gva = gva_for(mode);
        for acc in [R, W, F, UR, UW, UF] {
            check(
                &format!("{mode:?} 4K"),
                &c.cpu,
                &mem,
                gva,
                acc,
                ok4k(0x8765_4abc),
            );
        }
    }
}

#[test]
fn gptes_reporting() {
    // 4-level: (level, gpa of the entry, value read), top-down.
    let (mem, c) = chain(Mode::Level4, 1, FRAME);
    let got = check("4-level gptes", &c.cpu, &mem, GVA, R, ok4k(0x8765_4abc));
    assert_eq!(
        gptes_of(&got),
        vec![
            (4, 0x10120, UPPER | 0x11000),
            (3, 0x11688, UPPER | 0x12000),
            (2, 0x12598, UPPER | 0x13000),
            (1, 0x13c48, LEAF | FRAME),
        ]
    );
    // 5-level.
    let (mem, c) = chain(Mode::Level5, 1, FRAME);
    let got = check("5-level gptes", &c.cpu, &mem, GVA, R, ok4k(0x8765_4abc));
    assert_eq!(
        gptes_of(&got),
        vec![
            (5, 0x10000, UPPER | 0x11000),
            (4, 0x11120, UPPER | 0x12000),
            (3, 0x12688, UPPER | 0x13000),
            (2, 0x13598, UPPER | 0x14000),
            (1, 0x14c48, LEAF | FRAME),
        ]
    );
    // PAE: the PDPTE (from the register) first, at CR3[31:5] + 8*3.
    let (mem, c) = chain(Mode::Pae, 1, FRAME);
    assert_eq!(c.cpu.cr3, 0x10020);
    let got = check("PAE gptes", &c.cpu, &mem, GVA32, R, ok4k(0x8765_4abc));
    assert_eq!(
        gptes_of(&got),
        vec![
            (3, 0x10038, PTE_P | 0x11000),
            (2, 0x11488, UPPER | 0x12000),
            (1, 0x12a28, LEAF | FRAME),
        ]
    );
    // 32-bit.
    let (mem, c) = chain(Mode::Bits32 { pse: false }, 1, FRAME);
    let got = check("32-bit gptes", &c.cpu, &mem, GVA32, R, ok4k(0x8765_4abc));
    assert_eq!(
        gptes_of(&got),
        vec![(2, 0x10d20, UPPER | 0x11000), (1, 0x11d14, LEAF | FRAME)]
    );
    // Large page: the list ends at the leaf.
    let (mem, c) = chain(Mode::Level4, 2, 0x4560_0000);
    let got = check(
        "4-level 2M gptes",
        &c.cpu,
        &mem,
        GVA,
        R,
        Expect::Ok {
            gpa: 0x4578_9abc,
            level: 2,
            size: M2,
        },
    );
    assert_eq!(
        gptes_of(&got),
        vec![
            (4, 0x10120, UPPER | 0x11000),
            (3, 0x11688, UPPER | 0x12000),
            (2, 0x12598, LEAF | PTE_PS | 0x4560_0000),
        ]
    );
}

#[test]
fn large_pages_2m() {
    for mode in [Mode::Level4, Mode::Level5] {
        let (mem, c) = chain(mode, 2, 0x4560_0000);
        let ok = Expect::Ok {
            gpa: 0x4578_9abc,
            level: 2,
            size: M2,
        };
        check("2M read", &c.cpu, &mem, GVA, R, ok);
        let got = check("2M write", &c.cpu, &mem, GVA, W, ok);
        assert_eq!(
            c.get(&got.mem_after, 2),
            LEAF | PTE_PS | PTE_A | PTE_D | 0x4560_0000,
            "D in the 2M PDE"
        );
        // Bit 12 is PAT, not an address bit.
        let mut m = mem.clone();
        c.set(&mut m, 2, c.get(&mem, 2) | 1 << 12);
        check("2M PAT", &c.cpu, &m, GVA, R, ok);
        // Bits 13 and 20 are reserved; bit 25 is an address bit.
        for b in [13, 20] {
            let mut m = mem.clone();
            c.set(&mut m, 2, c.get(&mem, 2) | 1 << b);
            check("2M rsvd", &c.cpu, &m, GVA, R, Expect::Pf(PF_P | PF_RSVD));
            check("2M rsvd user write", &c.cpu, &m, GVA, UW, Expect::Pf(0xf));
        }
        let mut m = mem.clone();
        c.set(&mut m, 2, c.get(&mem, 2) | 1 << 25);
        check(
            "2M bit 25",
            &c.cpu,
            &m,
            GVA,
            R,
            Expect::Ok {
                gpa: 0x4778_9abc,
                level: 2,
                size: M2,
            },
        );
    }
    // PAE 2 MiB: offset = GVA32 & 0x1fffff = 0x145abc.
    let (mem, c) = chain(Mode::Pae, 2, 0x4560_0000);
    check(
        "PAE 2M",
        &c.cpu,
        &mem,
        GVA32,
        W,
        Expect::Ok {
            gpa: 0x4574_5abc,
            level: 2,
            size: M2,
        },
    );
    let mut m = mem.clone();
    c.set(&mut m, 2, c.get(&mem, 2) | 1 << 13);
    check("PAE 2M bit 13", &c.cpu, &m, GVA32, R, Expect::Pf(9));
}

#[test]
fn large_pages_1g() {
    for mode in [Mode::Level4, Mode::Level5] {
        let (mem, c) = chain(mode, 3, 0x8000_0000);
        let mut cpu = c.cpu;
        // Without GBPAGES, PDPTE.PS is a reserved bit.
        cpu.gbpages = false;
        check("1G no gbpages", &cpu, &mem, GVA, R, Expect::Pf(0x9));
        check("1G no gbpages user", &cpu, &mem, GVA, UR, Expect::Pf(0xd));
        check("1G no gbpages write", &cpu, &mem, GVA, W, Expect::Pf(0xb));
        cpu.gbpages = true;
        let ok = Expect::Ok {
            gpa: 0x9678_9abc,
            level: 3,
            size: G1,
        };
        check("1G", &cpu, &mem, GVA, R, ok);
        let got = check("1G write", &cpu, &mem, GVA, W, ok);
        assert_eq!(
            c.get(&got.mem_after, 3),
            LEAF | PTE_PS | PTE_A | PTE_D | 0x8000_0000
        );
        let mut m = mem.clone();
        c.set(&mut m, 3, c.get(&mem, 3) | 1 << 12);
        check("1G PAT", &cpu, &m, GVA, R, ok);
        for b in [13, 21, 29] {
            let mut m = mem.clone();
            c.set(&mut m, 3, c.get(&mem, 3) | 1 << b);
            check("1G rsvd", &cpu, &m, GVA, R, Expect::Pf(9));
        }
        let mut m = mem.clone();
        c.set(&mut m, 3, c.get(&mem, 3) | 1 << 30);
        check(
            "1G bit 30",
            &cpu,
            &m,
            GVA,
            R,
            Expect::Ok {
                gpa: 0xd678_9abc,
                level: 3,
                size: G1,
            },
        );
    }
}

#[test]
fn pse_4m_pages_and_pse36() {
    // 4 MiB page: offset = GVA32 & 0x3fffff = 0x345abc.
    let (mem, c) = chain(Mode::Bits32 { pse: true }, 2, 0x8740_0000);
    let ok = Expect::Ok {
        gpa: 0x8774_5abc,
        level: 2,
        size: M4,
    };
    check("4M", &c.cpu, &mem, GVA32, R, ok);
    let got = check("4M write", &c.cpu, &mem, GVA32, W, ok);
    assert_eq!(
        c.get(&got.mem_after, 2),
        LEAF | PTE_PS | PTE_A | PTE_D | 0x8740_0000
    );
    // PSE-36: PDE bits 16:13 are PA bits 35:32.
    let mut m = mem.clone();
    c.set(&mut m, 2, c.get(&mem, 2) | 0xa << 13);
    check(
        "4M PSE-36",
        &c.cpu,
        &m,
        GVA32,
        R,
        Expect::Ok {
            gpa: 0xa_8774_5abc,
            level: 2,
            size: M4,
        },
    );
    // Bit 12 is PAT.
    let mut m = mem.clone();
    c.set(&mut m, 2, c.get(&mem, 2) | 1 << 12);
    check("4M PAT", &c.cpu, &m, GVA32, R, ok);
    // Bits 21:17 reserved (KVM: regardless of MAXPHYADDR).
    for b in [17, 18, 21] {
        for maxphy in [36, 40, 46] {
            let mut m = mem.clone();
            let mut cpu = c.cpu;
            cpu.maxphyaddr = maxphy;
            c.set(&mut m, 2, c.get(&mem, 2) | 1 << b);
            check("4M rsvd", &cpu, &m, GVA32, R, Expect::Pf(9));
            check("4M rsvd user", &cpu, &m, GVA32, UR, Expect::Pf(0xd));
        }
    }
    // CR4.PSE = 0: PS is ignored, the PDE points to a page table.
    let (mem, c) = chain(Mode::Bits32 { pse: false }, 1, FRAME);
    let mut m = mem.clone();
    c.set(&mut m, 2, c.get(&mem, 2) | PTE_PS);
    let got = check(
        "PS ignored without PSE",
        &c.cpu,
        &m,
        GVA32,
        W,
        ok4k(0x8765_4abc),
    );
    // ... and D is not set in it (it is not the leaf).
    assert_eq!(c.get(&got.mem_after, 2), c.get(&m, 2) | PTE_A);
}

#[test]
fn pae_pdptes() {
    let (mem, c) = chain(Mode::Pae, 1, FRAME);
    // PDPTE 3 not present.
    let mut cpu = c.cpu;
    cpu.pdptrs[3] = 0;
    check("PDPTE !P read", &cpu, &mem, GVA32, R, Expect::Pf(0));
    check("PDPTE !P write", &cpu, &mem, GVA32, W, Expect::Pf(2));
    check("PDPTE !P user", &cpu, &mem, GVA32, UW, Expect::Pf(6));
    check(
        "PDPTE !P fetch (no NX/SMEP)",
        &cpu,
        &mem,
        GVA32,
        F,
        Expect::Pf(0),
    );
    cpu.efer |= EFER_NXE;
    check(
        "PDPTE !P fetch (NX)",
        &cpu,
        &mem,
        GVA32,
        F,
        Expect::Pf(0x10),
    );
    // P=0 with other bits set: still not present.
    cpu.pdptrs[3] = 0x11000 | PTE_W | 1 << 63;
    check("PDPTE !P junk", &cpu, &mem, GVA32, R, Expect::Pf(0));
    // Each PDPTE slot selects by gva bits 31:30.
    for i in 0..4u64 {
        let mut cpu = c.cpu;
        cpu.pdptrs = [0; 4];
        cpu.pdptrs[i as usize] = PTE_P | 0x11000;
        let gva = (i << 30) | (GVA32 & 0x3fff_ffff);
        check("PDPTE slot", &cpu, &mem, gva, R, ok4k(0x8765_4abc));
        let other = (((i + 1) % 4) << 30) | (GVA32 & 0x3fff_ffff);
        check("other PDPTE slot", &cpu, &mem, other, R, Expect::Pf(0));
    }
    // The walk uses the registers: the PDPT page in memory is not re-read...
    let mut m = mem.clone();
    m.write64(c.entry[3], 0);
    check(
        "PDPT memory ignored",
        &c.cpu,
        &m,
        GVA32,
        R,
        ok4k(0x8765_4abc),
    );
    // ... its reserved bits are not checked here (load_pdptrs did) ...
    let mut cpu = c.cpu;
    cpu.pdptrs[3] |= PTE_W | PTE_U;
    check(
        "PDPTE rsvd not rechecked",
        &cpu,
        &mem,
        GVA32,
        UW,
        ok4k(0x8765_4abc),
    );
    // ... and its A bit is never written.
    let got = check("PDPTE no A", &c.cpu, &mem, GVA32, W, ok4k(0x8765_4abc));
    assert_eq!(got.mem_after.read64(c.entry[3]), PTE_P | 0x11000);
    assert_eq!(
        got.writes,
        vec![
            (0x11488, UPPER | PTE_A | 0x12000),
            (0x12a28, LEAF | PTE_A | PTE_D | FRAME)
        ]
    );
}

#[test]
fn canonical_addresses() {
    // Only the top table exists and it is empty: canonical addresses take a
    // not-present #PF, non-canonical ones #GP(0) before any table is read.
    for (mode, cases) in [
        (
            Mode::Level4,
            vec![
                (0x0000_7fff_ffff_ffffu64, false),
                (0x0000_8000_0000_0000, true),
                (0xffff_7fff_ffff_ffff, true),
                (0xffff_8000_0000_0000, false),
                (0x00ff_ffff_ffff_ffff, true),
                (0x8000_0000_0000_0000, true),
                (0x0001_0000_0000_0000, true),
            ],
        ),
        (
            Mode::Level5,
            vec![
                (0x0000_8000_0000_0000, false),
                (0x00ff_ffff_ffff_ffff, false),
                (0x0100_0000_0000_0000, true),
                (0xff00_0000_0000_0000, false),
                (0xfeff_ffff_ffff_ffff, true),
                (0xffff_8000_0000_0000, false),
                (0x7fff_ffff_ffff_ffff, true),
            ],
        ),
    ] {
        let mut mem = OracleMem::default();
        mem.add_page(T0);
        let mut cpu = mode.cpu();
        cpu.cr3 = T0 << 12;
        cpu.efer |= EFER_NXE;
        for (gva, gp) in cases {
            for acc in [R, W, F, UR, UW, UF, IMPLICIT_R] {
                let e = if gp {
                    Expect::Gp
                } else {
                    Expect::Pf(
                        (if acc.write { PF_W } else { 0 })
                            | (if acc.user { PF_U } else { 0 })
                            | (if acc.fetch { PF_ID } else { 0 }),
                    )
                };
                check(&format!("{mode:?} {gva:#x}"), &cpu, &mem, gva, acc, e);
            }
        }
    }
    // No canonical check outside long mode.
    let (mem, c) = chain(Mode::Pae, 1, FRAME);
    check("PAE high gva", &c.cpu, &mem, GVA32, R, ok4k(0x8765_4abc));
}

#[test]
fn maxphyaddr_boundaries() {
    for maxphy in [36u8, 46, 48, 52] {
        let m1 = maxphy as u32 - 1;
        // 4-level
        let (mem, c) = chain(Mode::Level4, 1, FRAME);
        let mut cpu = c.cpu;
        cpu.maxphyaddr = maxphy;
        let what = format!("4-level M={maxphy}");
        let mut m = mem.clone();
        c.set(&mut m, 1, c.get(&mem, 1) | 1 << m1);
        check(&what, &cpu, &m, GVA, R, ok4k(0x8765_4abc | 1 << m1));
        if maxphy < 52 {
            for level in [4u8, 3, 2, 1] {
                let mut m = mem.clone();
                c.set(&mut m, level, c.get(&mem, level) | 1 << maxphy);
                check(&what, &cpu, &m, GVA, R, Expect::Pf(9));
                check(&what, &cpu, &m, GVA, UW, Expect::Pf(0xf));
            }
        } else {
            // M=52: bit 51 is an address bit; a table up there has no memslot.
            let mut m = mem.clone();
            c.set(&mut m, 2, c.get(&mem, 2) | 1 << 51);
            check(&what, &cpu, &m, GVA, R, Expect::Pf(0));
        }
        // Bits 62:52 are ignored in 4-level paging (not part of the address).
        for b in [52, 55, 58, 62] {
            let mut m = mem.clone();
            for level in [4u8, 3, 2, 1] {
                c.set(&mut m, level, c.get(&mem, level) | 1 << b);
            }
            check(&what, &cpu, &m, GVA, R, ok4k(0x8765_4abc));
        }

        // PAE
        let (mem, c) = chain(Mode::Pae, 1, FRAME);
        let mut cpu = c.cpu;
        cpu.maxphyaddr = maxphy;
        let what = format!("PAE M={maxphy}");
        let mut m = mem.clone();
        c.set(&mut m, 1, c.get(&mem, 1) | 1 << m1);
        check(&what, &cpu, &m, GVA32, R, ok4k(0x8765_4abc | 1 << m1));
        // Bits 62:M reserved -- including 62:52 even at M=52.
        let mut rsvd = vec![52u32, 58, 62];
        if maxphy < 52 {
            rsvd.push(maxphy as u32);
        }
        for b in rsvd {
            for level in [2u8, 1] {
                let mut m = mem.clone();
                c.set(&mut m, level, c.get(&mem, level) | 1 << b);
                check(&what, &cpu, &m, GVA32, R, Expect::Pf(9));
            }
        }
    }
}

#[test]
fn bit63_xd() {
    for mode in [Mode::Level4, Mode::Pae] {
        let (mem, c) = chain(mode, 1, FRAME);
        let gva = gva_for(mode);
        let top = if mode == Mode::Pae { 2 } else { 4 };
        for level in (1..=top).rev() {
            let mut m = mem.clone();
            c.set(&mut m, level, c.get(&mem, level) | PTE_XD);
            // NXE=0: bit 63 reserved.
            check("XD rsvd", &c.cpu, &m, gva, R, Expect::Pf(9));
            check("XD rsvd user fetch", &c.cpu, &m, gva, UF, Expect::Pf(0xd));
            let mut cpu = c.cpu;
            cpu.efer |= EFER_NXE;
            check("XD read", &cpu, &m, gva, R, ok4k(0x8765_4abc));
            check("XD fetch", &cpu, &m, gva, F, Expect::Pf(0x11));
            check("XD user fetch", &cpu, &m, gva, UF, Expect::Pf(0x15));
        }
    }
}

#[test]
fn not_present_at_every_level() {
    for mode in [
        Mode::Bits32 { pse: false },
        Mode::Pae,
        Mode::Level4,
        Mode::Level5,
    ] {
        let (mem, c) = chain(mode, 1, FRAME);
        let gva = gva_for(mode);
        for level in mode.levels() {
            let mut m = mem.clone();
            c.set(&mut m, level, c.get(&mem, level) & !PTE_P);
            for nx in [false, true] {
                let mut cpu = c.cpu;
                if nx {
                    cpu.efer |= EFER_NXE;
                }
                for acc in [R, W, F, UR, UW, UF] {
                    let ec = (if acc.write { PF_W } else { 0 })
                        | (if acc.user { PF_U } else { 0 })
                        | (if acc.fetch && nx { PF_ID } else { 0 });
                    check(
                        &format!("{mode:?} level {level} !P"),
                        &cpu,
                        &m,
                        gva,
                        acc,
                        Expect::Pf(ec),
                    );
                }
            }
            // Reserved bits in a not-present entry do not matter.
            if mode != (Mode::Bits32 { pse: false }) {
                let mut m = mem.clone();
                c.set(
                    &mut m,
                    level,
                    (c.get(&mem, level) & !PTE_P) | 1 << 51 | PTE_XD,
                );
                check("!P with rsvd", &c.cpu, &m, gva, W, Expect::Pf(2));
            }
        }
    }
}

#[test]
fn gpte_in_missing_memslot() {
    for mode in [
        Mode::Bits32 { pse: true },
        Mode::Pae,
        Mode::Level4,
        Mode::Level5,
    ] {
        let (mem, c) = chain(mode, 1, FRAME);
        let gva = gva_for(mode);
        for level in mode.levels() {
            let mut m = mem.clone();
            m.backed.remove(&c.table[level as usize]);
            check("table unbacked", &c.cpu, &m, gva, R, Expect::Pf(0));
            check("table unbacked", &c.cpu, &m, gva, UW, Expect::Pf(6));
        }
        // The data page itself is never read by the walk: FRAME has no memslot.
        assert!(!mem.is_backed(FRAME));
        check(
            "data page unbacked",
            &c.cpu,
            &mem,
            gva,
            W,
            ok4k(0x8765_4abc),
        );
    }
}

#[test]
fn read_only_memslot() {
    for mode in [
        Mode::Bits32 { pse: false },
        Mode::Pae,
        Mode::Level4,
        Mode::Level5,
    ] {
        let (mem, c) = chain(mode, 1, FRAME);
        let gva = gva_for(mode);
        // The page table's page is read-only: the walk succeeds, the PTE gets
        // neither A nor D, the upper levels still get A.
        let mut m = mem.clone();
        m.read_only.insert(c.table[1]);
        let got = check("RO PT", &c.cpu, &m, gva, W, ok4k(0x8765_4abc));
        assert_eq!(c.get(&got.mem_after, 1), c.get(&m, 1));
        assert_eq!(c.get(&got.mem_after, 2), c.get(&m, 2) | PTE_A);
        assert!(!got.dirty.contains(&c.table[1]));
        assert!(got.dirty.contains(&c.table[2]));
        // Everything read-only: no writes at all, no dirty pages.
        let mut m = mem.clone();
        m.read_only = m.backed.clone();
        let got = check("RO all", &c.cpu, &m, gva, W, ok4k(0x8765_4abc));
        assert_eq!(got.mem_after, m);
        assert!(got.writes.is_empty() && got.dirty.is_empty());
    }
}

#[test]
fn accessed_dirty_rules() {
    let (mem, c) = chain(Mode::Level4, 1, FRAME);
    let top_down_a = |last: u64| {
        vec![
            (0x10120, UPPER | PTE_A | 0x11000),
            (0x11688, UPPER | PTE_A | 0x12000),
            (0x12598, UPPER | PTE_A | 0x13000),
            (0x13c48, last),
        ]
    };
    // Read: A everywhere, top-down, no D.
    let got = check("read A", &c.cpu, &mem, GVA, R, ok4k(0x8765_4abc));
    assert_eq!(got.writes, top_down_a(LEAF | PTE_A | FRAME));
    assert_eq!(got.dirty, [0x10, 0x11, 0x12, 0x13].into_iter().collect());
    // Write: D on the leaf only.
    let got = check("write AD", &c.cpu, &mem, GVA, W, ok4k(0x8765_4abc));
    assert_eq!(got.writes, top_down_a(LEAF | PTE_A | PTE_D | FRAME));
    // Read then write (the second access sets only D).
    let tmem = TestMem::new(&mem);
    let first = observe_walker(&c.cpu, &tmem, GVA, R);
    assert_eq!(first.writes.len(), 4);
    let after_read = first.mem_after.clone();
    let got = check("then write", &c.cpu, &after_read, GVA, W, ok4k(0x8765_4abc));
    assert_eq!(got.writes, vec![(0x13c48, LEAF | PTE_A | PTE_D | FRAME)]);
    // All A/D already set: nothing written, nothing dirty.
    let got = check("preset", &c.cpu, &got.mem_after, GVA, W, ok4k(0x8765_4abc));
    assert!(got.writes.is_empty() && got.dirty.is_empty());
    // Faults write nothing, not even in the upper levels that were walked.
    let mut cpu = c.cpu;
    cpu.cr0 |= CR0_WP;
    let mut m = mem.clone();
    c.set(&mut m, 1, c.get(&mem, 1) & !PTE_W);
    let got = check("write fault", &cpu, &m, GVA, W, Expect::Pf(3));
    assert!(got.writes.is_empty() && got.mem_after == m);
    let mut m = mem.clone();
    c.set(&mut m, 1, c.get(&mem, 1) | 1 << 51);
    let got = check("rsvd fault", &cpu, &m, GVA, R, Expect::Pf(9));
    assert!(got.writes.is_empty());
    let mut m = mem.clone();
    c.set(&mut m, 1, c.get(&mem, 1) & !PTE_U);
    check("user fault", &cpu, &m, GVA, UR, Expect::Pf(5));
    // D is never set on a non-leaf entry, even on a write through a 2M page.
    let (mem, c) = chain(Mode::Level4, 2, 0x4560_0000);
    let got = check(
        "2M write",
        &c.cpu,
        &mem,
        GVA,
        W,
        Expect::Ok {
            gpa: 0x4578_9abc,
            level: 2,
            size: M2,
        },
    );
    assert_eq!(c.get(&got.mem_after, 3), UPPER | PTE_A | 0x12000);

    // 32-bit: 4-byte entries, the neighbouring entry in the same 8 bytes is
    // left alone.
    let (mut mem, c) = chain(Mode::Bits32 { pse: false }, 1, FRAME);
    let neighbour = c.entry[1] ^ 4;
    mem.write32(neighbour, 0xdead_b000);
    let got = check("32-bit write", &c.cpu, &mem, GVA32, W, ok4k(0x8765_4abc));
    assert_eq!(
        got.writes,
        vec![
            (0x10d20, UPPER | PTE_A | 0x11000),
            (0x11d14, LEAF | PTE_A | PTE_D | FRAME)
        ]
    );
    assert_eq!(got.mem_after.read32(neighbour), 0xdead_b000);
}

type Tweak = Box<dyn Fn(&Chain, &mut OracleMem, &mut OracleCpu)>;
/// (what, tweak, access, expected at CPL0, expected at CPL3)
type Row = (&'static str, Tweak, OracleAccess, Expect, Expect);

/// real-kvm-here.md section 2: faults observed on the device (4-level,
/// EFER = LME|LMA|NXE, TEST_VA 0x8000000000). CPL0 = supervisor, CPL3 = user.
#[test]
fn device_observed_faults_4level() {
    let va = 0x80_0000_0000u64;
    let base = || {
        let mut mem = OracleMem::default();
        let mut c = build_chain(Mode::Level4, &mut mem, va, T0, 1, UPPER, LEAF, FRAME);
        c.cpu.efer |= EFER_NXE;
        c.cpu.cr0 |= CR0_WP;
        (mem, c)
    };
    let ok = ok4k(FRAME);
    let clear = |c: &Chain, m: &mut OracleMem, level: u8, bit: u64| {
        let v = c.get(m, level);
        c.set(m, level, v & !bit);
    };
    let set = |c: &Chain, m: &mut OracleMem, level: u8, bit: u64| {
        let v = c.get(m, level);
        c.set(m, level, v | bit);
    };
    let rows: Vec<Row> = vec![
        ("all permissive read", Box::new(|_, _, _| {}), R, ok, ok),
        ("all permissive write", Box::new(|_, _, _| {}), W, ok, ok),
        ("all permissive fetch", Box::new(|_, _, _| {}), F, ok, ok),
        (
            "PTE !P read",
            Box::new(move |c, m, _| clear(c, m, 1, PTE_P)),
            R,
            Expect::Pf(0),
            Expect::Pf(4),
        ),
        (
            "PTE !P write",
            Box::new(move |c, m, _| clear(c, m, 1, PTE_P)),
            W,
            Expect::Pf(2),
            Expect::Pf(6),
        ),
        (
            "PTE !P fetch",
            Box::new(move |c, m, _| clear(c, m, 1, PTE_P)),
            F,
            Expect::Pf(0x10),
            Expect::Pf(0x14),
        ),
        (
            "PDE !P",
            Box::new(move |c, m, _| clear(c, m, 2, PTE_P)),
            R,
            Expect::Pf(0),
            Expect::Pf(4),
        ),
        (
            "PML4E !P",
            Box::new(move |c, m, _| clear(c, m, 4, PTE_P)),
            R,
            Expect::Pf(0),
            Expect::Pf(4),
        ),
        (
            "write PTE R/W=0",
            Box::new(move |c, m, _| clear(c, m, 1, PTE_W)),
            W,
            Expect::Pf(3),
            Expect::Pf(7),
        ),
        (
            "write PDE R/W=0",
            Box::new(move |c, m, _| clear(c, m, 2, PTE_W)),
            W,
            Expect::Pf(3),
            Expect::Pf(7),
        ),
        (
            "write PTE R/W=0, CR0.WP=0",
            Box::new(move |c, m, cpu: &mut OracleCpu| {
                clear(c, m, 1, PTE_W);
                cpu.cr0 &= !CR0_WP;
            }),
            W,
            ok,
            Expect::Pf(7),
        ),
        (
            "read PTE U/S=0",
            Box::new(move |c, m, _| clear(c, m, 1, PTE_U)),
            R,
            ok,
            Expect::Pf(5),
        ),
        (
            "read PDPTE U/S=0",
            Box::new(move |c, m, _| clear(c, m, 3, PTE_U)),
            R,
            ok,
            Expect::Pf(5),
        ),
        (
            "write PTE U/S=0",
            Box::new(move |c, m, _| clear(c, m, 1, PTE_U)),
            W,
            ok,
            Expect::Pf(7),
        ),
        (
            "fetch NX in PTE",
            Box::new(move |c, m, _| set(c, m, 1, PTE_XD)),
            F,
            Expect::Pf(0x11),
            Expect::Pf(0x15),
        ),
        (
            "fetch NX in PDE",
            Box::new(move |c, m, _| set(c, m, 2, PTE_XD)),
            F,
            Expect::Pf(0x11),
            Expect::Pf(0x15),
        ),
        (
            "read NX in PTE",
            Box::new(move |c, m, _| set(c, m, 1, PTE_XD)),
            R,
            ok,
            ok,
        ),
        (
            "read bit 63, NXE=0",
            Box::new(move |c, m, cpu: &mut OracleCpu| {
                set(c, m, 1, PTE_XD);
                cpu.efer &= !EFER_NXE;
            }),
            R,
            Expect::Pf(9),
            Expect::Pf(0xd),
        ),
        (
            "read PTE bit 51",
            Box::new(move |c, m, _| set(c, m, 1, 1 << 51)),
            R,
            Expect::Pf(9),
            Expect::Pf(0xd),
        ),
        (
            "write PTE bit 51",
            Box::new(move |c, m, _| set(c, m, 1, 1 << 51)),
            W,
            Expect::Pf(0xb),
            Expect::Pf(0xf),
        ),
        (
            "read PDE bit 51",
            Box::new(move |c, m, _| set(c, m, 2, 1 << 51)),
            R,
            Expect::Pf(9),
            Expect::Pf(0xd),
        ),
        (
            "read PML4E.PS",
            Box::new(move |c, m, _| set(c, m, 4, PTE_PS)),
            R,
            Expect::Pf(9),
            Expect::Pf(0xd),
        ),
    ];
    for (what, tweak, acc, cpl0, cpl3) in &rows {
        let (mut mem, c) = base();
        let mut cpu = c.cpu;
        tweak(&c, &mut mem, &mut cpu);
        check(&format!("device: {what} CPL0"), &cpu, &mem, va, *acc, *cpl0);
        let uacc = OracleAccess { user: true, ..*acc };
        check(&format!("device: {what} CPL3"), &cpu, &mem, va, uacc, *cpl3);
    }
    // 2 MiB page with bit 13; 1 GiB page (no PDPE1GB): RSVD.
    let mut mem = OracleMem::default();
    let mut c = build_chain(Mode::Level4, &mut mem, va, T0, 2, UPPER, LEAF, 0x4560_0000);
    c.cpu.efer |= EFER_NXE;
    let mut m = mem.clone();
    c.set(&mut m, 2, c.get(&mem, 2) | 1 << 13);
    check("device: 2M bit 13", &c.cpu, &m, va, R, Expect::Pf(9));
    check(
        "device: 2M bit 13 CPL3",
        &c.cpu,
        &m,
        va,
        UR,
        Expect::Pf(0xd),
    );
    let mut mem = OracleMem::default();
    let c = build_chain(
        Mode::Level4,
        &mut mem,
        va + 0x20_0000,
        T0,
        3,
        UPPER,
        LEAF,
        0x8000_0000,
    );
    check("device: 1G", &c.cpu, &mem, va + 0x20_0000, R, Expect::Pf(9));
    check(
        "device: 1G CPL3",
        &c.cpu,
        &mem,
        va + 0x20_0000,
        UR,
        Expect::Pf(0xd),
    );
    // Non-canonical.
    let (mem, c) = base();
    check(
        "device: non-canonical",
        &c.cpu,
        &mem,
        0x0000_8000_0000_0000,
        R,
        Expect::Gp,
    );
    // SMEP: supervisor fetch from a U=1 page; SMAP, AC=0: supervisor read.
    let mut cpu = c.cpu;
    cpu.cr4 |= CR4_SMEP;
    check("device: SMEP fetch", &cpu, &mem, va, F, Expect::Pf(0x11));
    let mut cpu = c.cpu;
    cpu.cr4 |= CR4_SMAP;
    check("device: SMAP read", &cpu, &mem, va, R, Expect::Pf(0x1));
}

#[test]
fn smap_ac_and_implicit() {
    let (mem, c) = chain(Mode::Level4, 1, FRAME);
    let mut cpu = c.cpu;
    cpu.cr4 |= CR4_SMAP;
    check("SMAP read", &cpu, &mem, GVA, R, Expect::Pf(1));
    check("SMAP write", &cpu, &mem, GVA, W, Expect::Pf(3));
    check("SMAP implicit", &cpu, &mem, GVA, IMPLICIT_R, Expect::Pf(1));
    check("SMAP user read", &cpu, &mem, GVA, UR, ok4k(0x8765_4abc));
    check(
        "SMAP supervisor fetch",
        &cpu,
        &mem,
        GVA,
        F,
        ok4k(0x8765_4abc),
    );
    cpu.rflags_ac = true;
    check("SMAP AC read", &cpu, &mem, GVA, R, ok4k(0x8765_4abc));
    check("SMAP AC write", &cpu, &mem, GVA, W, ok4k(0x8765_4abc));
    check(
        "SMAP AC implicit",
        &cpu,
        &mem,
        GVA,
        IMPLICIT_R,
        Expect::Pf(1),
    );
    let iw = OracleAccess {
        write: true,
        ..IMPLICIT_R
    };
    check("SMAP AC implicit write", &cpu, &mem, GVA, iw, Expect::Pf(3));
    // Supervisor page: SMAP does not apply.
    let mut m = mem.clone();
    c.set(&mut m, 1, c.get(&mem, 1) & !PTE_U);
    cpu.rflags_ac = false;
    check(
        "SMAP sup page",
        &cpu,
        &m,
        GVA,
        IMPLICIT_R,
        ok4k(0x8765_4abc),
    );
    // 32-bit paging has SMAP/SMEP too.
    let (mem, c) = chain(Mode::Bits32 { pse: false }, 1, FRAME);
    let mut cpu = c.cpu;
    cpu.cr4 |= CR4_SMAP | CR4_SMEP;
    check("32-bit SMAP", &cpu, &mem, GVA32, R, Expect::Pf(1));
    check("32-bit SMEP", &cpu, &mem, GVA32, F, Expect::Pf(0x11));
}

#[test]
fn protection_keys() {
    let (mut mem, c) = chain(Mode::Level4, 1, FRAME);
    let v = c.get(&mem, 1);
    c.set(&mut mem, 1, v | 1 << 59); // leaf key 1
    let mut cpu = c.cpu;
    cpu.cr4 |= CR4_PKE;
    cpu.pkru = 0b01 << 2; // AD1
    check("AD user read", &cpu, &mem, GVA, UR, Expect::Pf(0x25));
    check("AD supervisor read", &cpu, &mem, GVA, R, Expect::Pf(0x21));
    check("AD fetch", &cpu, &mem, GVA, UF, ok4k(0x8765_4abc));
    cpu.pkru = 0b10 << 2; // WD1
    check("WD user read", &cpu, &mem, GVA, UR, ok4k(0x8765_4abc));
    check("WD user write", &cpu, &mem, GVA, UW, Expect::Pf(0x27));
    check("WD sup write WP=0", &cpu, &mem, GVA, W, ok4k(0x8765_4abc));
    cpu.cr0 |= CR0_WP;
    check("WD sup write WP=1", &cpu, &mem, GVA, W, Expect::Pf(0x23));
    // Keys only matter for user pages.
    let mut m = mem.clone();
    c.set(&mut m, 1, c.get(&mem, 1) & !PTE_U);
    check("WD sup page", &cpu, &m, GVA, W, ok4k(0x8765_4abc));
    // PK is reported along with another violation.
    let mut m = mem.clone();
    c.set(&mut m, 1, c.get(&mem, 1) & !PTE_W);
    check("WD + RO", &cpu, &m, GVA, UW, Expect::Pf(0x27));
    // The key of a non-leaf entry is ignored; key 0 is the PTE's here.
    let (mut mem, c) = chain(Mode::Level4, 1, FRAME);
    let v = c.get(&mem, 2);
    c.set(&mut mem, 2, v | 1 << 59);
    let mut cpu = c.cpu;
    cpu.cr4 |= CR4_PKE;
    cpu.pkru = 0b11 << 2;
    check("non-leaf key", &cpu, &mem, GVA, UW, ok4k(0x8765_4abc));
    // PKE outside long mode is ignored.
    let (mem, c) = chain(Mode::Pae, 1, FRAME);
    let mut cpu = c.cpu;
    cpu.cr4 |= CR4_PKE;
    cpu.pkru = !0;
    check("PKE in PAE", &cpu, &mem, GVA32, UW, ok4k(0x8765_4abc));
}

#[test]
fn nonpaging_is_identity() {
    let mem = OracleMem::default();
    let mut cpu = Mode::Off.cpu();
    cpu.cr3 = 0xdead_b000;
    cpu.cr4 = CR4_PAE | CR4_SMEP | CR4_SMAP;
    for gva in [0u64, 0xabc, 0xd234_5abc, 0x1234_5678_9abc] {
        for acc in [R, W, F, UR, UW, UF] {
            let got = check(
                "PG=0",
                &cpu,
                &mem,
                gva,
                acc,
                Expect::Ok {
                    gpa: gva,
                    level: 0,
                    size: K4,
                },
            );
            assert!(gptes_of(&got).is_empty() && got.writes.is_empty());
        }
    }
}

/// A self-referencing PML4 entry used at every level (recursive mapping): all
/// four reads hit the same entry, KVM's cmpxchg loop must retry, and the end
/// state is A (and D for a write) in that one entry.
#[test]
fn aliased_entries_retry() {
    let mut mem = OracleMem::default();
    mem.add_page(T0);
    let mut cpu = Mode::Level4.cpu();
    cpu.cr3 = T0 << 12;
    let i = 0x55u64;
    let gva = i << 39 | i << 30 | i << 21 | i << 12 | 0x123;
    mem.write64((T0 << 12) + i * 8, UPPER | T0 << 12);
    let opts = CompareOpts {
        exact_writes: false,
        gptes_modulo_ad: true,
    };
    let got = check_opts("recursive read", &cpu, &mem, gva, R, ok4k(0x10123), opts);
    assert_eq!(got.mem_after.read64(0x102a8), UPPER | PTE_A | 0x10000);
    let got = check_opts("recursive write", &cpu, &mem, gva, W, ok4k(0x10123), opts);
    assert_eq!(
        got.mem_after.read64(0x102a8),
        UPPER | PTE_A | PTE_D | 0x10000
    );
    assert_eq!(got.dirty, [T0].into_iter().collect());
}

/// Guest memory where "another vCPU" changes one entry just before the
/// walker's first cmpxchg of it, so that the cmpxchg loses the race.
struct RacyMem {
    inner: TestMem,
    race_gpa: u64,
    mutate: fn(u64) -> u64,
    fired: Mutex<bool>,
}

impl GuestMem for RacyMem {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        self.inner.read(gpa, buf)
    }
    fn cmpxchg(&self, gpa: u64, size: usize, old: u64, new: u64) -> Result<bool, ()> {
        let mut fired = self.fired.lock().unwrap();
        if !*fired && gpa == self.race_gpa {
            *fired = true;
            let mut m = self.inner.mem.lock().unwrap();
            let v = m.read(gpa, size).unwrap();
            m.write(gpa, size, (self.mutate)(v));
        }
        drop(fired);
        self.inner.cmpxchg(gpa, size, old, new)
    }
    fn mark_dirty(&self, gfn: u64) {
        self.inner.mark_dirty(gfn)
    }
}

/// KVM (kvm-mmu-semantics 1.5): an A/D cmpxchg that finds the entry changed
/// restarts the whole walk, which then sees the new value. The upper-level A
/// bits already written stay.
#[test]
fn cmpxchg_race_restarts_walk() {
    let (mem, c) = chain(Mode::Level4, 1, FRAME);
    let mut cpu = c.cpu;
    cpu.cr0 |= CR0_WP;
    let pte_gpa = c.entry[1];
    // (mutation of the PTE, access, expected outcome of the restarted walk)
    type Race = (fn(u64) -> u64, OracleAccess, Expect);
    let cases: [Race; 4] = [
        (|v| v | 1 << 9, W, ok4k(0x8765_4abc)), // benign: an AVL bit
        (|v| v & !PTE_P, R, Expect::Pf(0)),
        (|v| v & !PTE_W, W, Expect::Pf(3)),
        (|v| v & !PTE_U, UR, Expect::Pf(5)),
    ];
    for (mutate, acc, expect) in cases {
        let racy = RacyMem {
            inner: TestMem::new(&mem),
            race_gpa: pte_gpa,
            mutate,
            fired: Mutex::new(false),
        };
        let got = run_walker(&cpu, &racy, GVA, acc);
        assert!(
            *racy.fired.lock().unwrap(),
            "the walker never wrote the PTE"
        );
        // What the restarted walk sees: upper levels with A, the PTE mutated.
        let mut seen = mem.clone();
        for level in [4u8, 3, 2] {
            c.set(&mut seen, level, c.get(&mem, level) | PTE_A);
        }
        c.set(&mut seen, 1, mutate(c.get(&mem, 1)));
        let exp = oracle_walk(&cpu, &seen, GVA, acc);
        let want = match expect {
            Expect::Ok { gpa, .. } => {
                matches!(exp.outcome, OracleOutcome::Ok { gpa: g, .. } if g == gpa)
            }
            Expect::Pf(ec) => {
                matches!(exp.outcome, OracleOutcome::Fault { vector: 14, error_code, .. } if error_code == ec)
            }
            Expect::Gp => false,
        };
        assert!(want, "ORACLE: {:?} vs {expect:?}", exp.outcome);
        assert_eq!(got, exp.outcome, "walker outcome after a lost cmpxchg race");
        assert_eq!(
            racy.inner.snapshot(),
            exp.mem_after,
            "memory after the race"
        );
    }
}
