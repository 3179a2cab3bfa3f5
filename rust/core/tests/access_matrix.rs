//! The generated permission matrix, in the spirit of kvm-unit-tests'
//! x86/access.c (kvm-mmu-semantics.md 1.7): enumerate PTE/PDE/PDPTE flags,
//! protection keys, the kind of access and the CPU controls; for every case
//! build fresh tables, run the walker and the SDM oracle, and compare the
//! outcome (fault vs success, vector, error code, CR2, gpa, level, size,
//! effective access, gptes) and guest memory afterwards (A/D effects, their
//! order, dirty logging).
//!
//! Modes: 4-level and 5-level long mode (MAXPHYADDR 46, and 36 for the cases
//! whose bit-36 flags are only reserved there), PAE, 32-bit paging with
//! CR4.PSE off and on.
//!
//! Release builds run the whole space (about 15.3 million cases: 4.88 M for
//! each of 4- and 5-level at MAXPHYADDR 46, 2.17 M each for their bit-36
//! cases at MAXPHYADDR 36, 0.92 M PAE, 0.27 M 32-bit; ~25 s on 2 cores).
//! Debug builds run a deterministic 1-in-8 sample of the same space (set
//! ACCESS_MATRIX_FULL=1 to force the whole space, ACCESS_MATRIX_SAMPLE=N to
//! run 1 case in N).
//!
//! Reductions relative to access.c's 2^31 counter (all of them only drop
//! cases that are duplicates by the architecture's own definition):
//! * a not-present entry keeps only its NX and reserved-bit flags (the SDM
//!   ignores every other bit of a not-present entry);
//! * PTE flags are enumerated only when the PDE leads to a page table (a
//!   not-present, reserved-faulting or large-page PDE never reaches it);
//!   otherwise the PTE is a fully permissive P|W|U, so a walker that wrongly
//!   went on would be caught;
//! * a non-leaf PDE's D (ignored, SDM table 4-19) is tied to its A;
//! * PKRU.AD/WD for key 1 only with CR4.PKE (access.c's filter);
//! * EFLAGS.AC and implicit accesses only with CR4.SMAP, for supervisor data
//!   accesses (the only ones they can change);
//! * the MAXPHYADDR=36 variant enumerates only cases with a bit-36 flag (the
//!   rest is the MAXPHYADDR=46 space again).
//!
//! access.c's filters kept: not fetch+write together, PKRU.AD/WD only with
//! CR4.PKE, PDE.bit13 only with PDE.PS, at most one reserved-bit flag.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use common::*;

// Generator-local entry flags.
const F_W: u16 = 1 << 0;
const F_U: u16 = 1 << 1;
const F_A: u16 = 1 << 2;
const F_D: u16 = 1 << 3;
const F_PS: u16 = 1 << 4;
const F_NX: u16 = 1 << 5;
const F_P: u16 = 1 << 6;
/// bit 51 (reserved below MAXPHYADDR 52)
const F_B51: u16 = 1 << 7;
/// bit 36 (reserved at MAXPHYADDR 36)
const F_B36: u16 = 1 << 8;
/// bit 13: reserved in a 2 MiB PDE; PA bit 32 (PSE-36) in a 32-bit 4 MiB PDE
const F_B13: u16 = 1 << 9;
/// bit 21: reserved in a 32-bit 4 MiB PDE
const F_B21: u16 = 1 << 10;

const FLAG_NAMES: [(u16, &str); 11] = [
    (F_P, "P"),
    (F_W, "W"),
    (F_U, "U"),
    (F_A, "A"),
    (F_D, "D"),
    (F_PS, "PS"),
    (F_NX, "NX"),
    (F_B51, "bit51"),
    (F_B36, "bit36"),
    (F_B13, "bit13"),
    (F_B21, "bit21"),
];

fn fmt_flags(f: u16) -> String {
    let v: Vec<&str> = FLAG_NAMES
        .iter()
        .filter(|(b, _)| f & b != 0)
        .map(|&(_, n)| n)
        .collect();
    if v.is_empty() {
        "0".into()
    } else {
        v.join("|")
    }
}

/// The gva under test: canonical for 4- and 5-level paging, and with a
/// non-zero offset below every page size.
const GVA_64: u64 = 0xffff_9234_5678_9abc;
/// For PAE/32-bit: PDPTE index 3.
const GVA_32: u64 = 0xd234_5abc;
const FIRST_TABLE_GFN: u64 = 0x100;
const FRAME_4K: u64 = 0x8765_4000;
const FRAME_2M: u64 = 0x4560_0000;
const FRAME_4M: u64 = 0x8740_0000;

#[derive(Clone, Copy, Debug)]
struct Cpu {
    nx: bool,
    wp: bool,
    smep: bool,
    smap: bool,
    pke: bool,
}

#[derive(Clone, Copy, Debug, Default)]
struct Acc {
    user: bool,
    write: bool,
    fetch: bool,
    twice: bool,
    implicit: bool,
    ac: bool,
}

#[derive(Clone, Copy, Debug, Default)]
struct Pku {
    ad: bool,
    wd: bool,
    leaf_key: bool,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    mode: Mode,
    maxphy: u8,
    cpu: Cpu,
    pku: Pku,
    acc: Acc,
    pdpte_ro: bool,
    pde: u16,
    pte: u16,
}

impl Case {
    fn describe(&self) -> String {
        let c = self.cpu;
        let a = self.acc;
        let mut cpu = Vec::new();
        for (on, n) in [
            (c.nx, "EFER.NX"),
            (c.wp, "CR0.WP"),
            (c.smep, "CR4.SMEP"),
            (c.smap, "CR4.SMAP"),
            (c.pke, "CR4.PKE"),
        ] {
            if on {
                cpu.push(n);
            }
        }
        let mut acc = Vec::new();
        acc.push(if a.user { "user" } else { "supervisor" });
        acc.push(if a.fetch {
            "fetch"
        } else if a.write {
            "write"
        } else {
            "read"
        });
        if a.implicit {
            acc.push("implicit");
        }
        if a.ac {
            acc.push("EFLAGS.AC");
        }
        if a.twice {
            acc.push("twice(after a supervisor read)");
        }
        format!(
            "{:?} MAXPHYADDR={} cpu=[{}] access=[{}] PDE={} PTE={}{} pku=[AD1={} WD1={} leafkey={}]",
            self.mode,
            self.maxphy,
            cpu.join(" "),
            acc.join(" "),
            fmt_flags(self.pde),
            fmt_flags(self.pte),
            if self.pdpte_ro { " PDPTE=RO" } else { "" },
            self.pku.ad as u8,
            self.pku.wd as u8,
            self.pku.leaf_key as u8,
        )
    }

    fn eight_byte(&self) -> bool {
        !matches!(self.mode, Mode::Bits32 { .. })
    }
    fn long(&self) -> bool {
        matches!(self.mode, Mode::Level4 | Mode::Level5)
    }
    fn pse(&self) -> bool {
        matches!(self.mode, Mode::Bits32 { pse: true })
    }
    /// Is the PDE a leaf (a large page) in this mode?
    fn pde_leaf(&self, pde: u16) -> bool {
        pde & F_PS != 0 && (self.eight_byte() || self.pse())
    }

    /// Flags of one entry that are reserved-bit violations here.
    fn reserved_flags(&self, f: u16) -> u32 {
        let mut n = 0;
        n += (f & F_B51 != 0) as u32;
        n += (f & F_B36 != 0) as u32;
        if self.eight_byte() {
            n += (f & F_B13 != 0) as u32;
        }
        n += (f & F_B21 != 0) as u32;
        n += (f & F_NX != 0 && !self.cpu.nx) as u32;
        n
    }

    fn gva(&self) -> u64 {
        if self.long() {
            GVA_64
        } else {
            GVA_32
        }
    }

    fn access(&self) -> OracleAccess {
        OracleAccess {
            write: self.acc.write,
            user: self.acc.user,
            fetch: self.acc.fetch,
            implicit: self.acc.implicit,
        }
    }

    /// Build the CPU state and fresh tables for this case.
    fn build(&self) -> (OracleCpu, OracleMem, Chain) {
        let mut mem = OracleMem::default();
        let pde_is_leaf = self.pde_leaf(self.pde);
        let leaf_level = if pde_is_leaf { 2 } else { 1 };
        let frame = match (pde_is_leaf, self.eight_byte()) {
            (false, _) => FRAME_4K,
            (true, true) => FRAME_2M,
            (true, false) => FRAME_4M,
        };
        // Upper levels (PML5E/PML4E) are P|W|U as in access.c, A clear so that
        // setting it is observed; their pkey is 2, which PKRU fully denies.
        let key2 = if self.long() { 2u64 << 59 } else { 0 };
        let upper = PTE_P | PTE_W | PTE_U | key2;
        let chain = build_chain(
            self.mode,
            &mut mem,
            self.gva(),
            FIRST_TABLE_GFN,
            leaf_level,
            upper,
            0,
            frame,
        );

        let mut cpu = chain.cpu;
        cpu.maxphyaddr = self.maxphy;
        if self.cpu.nx {
            cpu.efer |= EFER_NXE;
        }
        if self.cpu.wp {
            cpu.cr0 |= CR0_WP;
        }
        if self.cpu.smep {
            cpu.cr4 |= CR4_SMEP;
        }
        if self.cpu.smap {
            cpu.cr4 |= CR4_SMAP;
        }
        if self.cpu.pke {
            cpu.cr4 |= CR4_PKE;
        }
        cpu.rflags_ac = self.acc.ac;
        cpu.pkru = if self.long() {
            // access.c: key 2 fully denied, key 1 per the flags.
            0x30 | (self.pku.wd as u32) << 3 | (self.pku.ad as u32) << 2
        } else if self.cpu.pke {
            // Outside long mode PKU must be ignored: deny everything.
            !0
        } else {
            0
        };

        // PDPTE (4/5-level): P|W|U, key 2; W cleared for "PDPTE read-only".
        if self.long() {
            let v = chain.get(&mem, 3) & !if self.pdpte_ro { PTE_W } else { 0 };
            chain.set(&mut mem, 3, v);
        }

        let leaf_key = if self.pku.leaf_key { 1u64 << 59 } else { 0 };
        // PDE
        let pde_addr = if pde_is_leaf {
            frame
        } else {
            chain.table[1] << 12
        };
        let mut pde = self.entry_bits(self.pde) | pde_addr;
        if pde_is_leaf {
            pde |= leaf_key;
        } else {
            pde |= key2;
        }
        chain.set(&mut mem, 2, pde);
        // PTE
        if !pde_is_leaf {
            let pte = self.entry_bits(self.pte) | FRAME_4K | leaf_key;
            chain.set(&mut mem, 1, pte);
        }
        (cpu, mem, chain)
    }

    fn entry_bits(&self, f: u16) -> u64 {
        let mut v = 0;
        for (flag, bit) in [
            (F_P, PTE_P),
            (F_W, PTE_W),
            (F_U, PTE_U),
            (F_A, PTE_A),
            (F_D, PTE_D),
            (F_PS, PTE_PS),
            (F_NX, PTE_XD),
            (F_B51, 1 << 51),
            (F_B36, 1 << 36),
            (F_B13, 1 << 13),
            (F_B21, 1 << 21),
        ] {
            if f & flag != 0 {
                v |= bit;
            }
        }
        v
    }
}

/// All subsets of `mask`.
fn subsets(mask: u16) -> impl Iterator<Item = u16> {
    let mut next = Some(0u16);
    std::iter::from_fn(move || {
        let cur = next?;
        next = if cur == mask {
            None
        } else {
            Some(((cur | !mask).wrapping_add(1)) & mask)
        };
        Some(cur)
    })
}

/// One mode's variant of the matrix.
#[derive(Clone, Copy, Debug)]
struct Variant {
    mode: Mode,
    maxphy: u8,
    /// Only cases with a bit-36 flag (see the module comment).
    only_b36: bool,
}

/// Entry options for one level; `pde` selects PDE-only flags.
fn entry_options(v: Variant, pde: bool) -> Vec<u16> {
    let eight = !matches!(v.mode, Mode::Bits32 { .. });
    let pse = matches!(v.mode, Mode::Bits32 { pse: true });
    let mut base = F_W | F_U | F_A | F_D | F_P;
    if pde {
        base |= F_PS;
    }
    if eight {
        base |= F_NX;
    }
    let mut out = Vec::new();
    for f in subsets(base) {
        let present = f & F_P != 0;
        // A not-present entry keeps only its NX flag (and the reserved ones).
        if !present && f & (F_W | F_U | F_A | F_D | F_PS) != 0 {
            continue;
        }
        let leaf = !pde || (f & F_PS != 0 && (eight || pse));
        // Non-leaf PDE: D is ignored, tie it to A.
        if present && !leaf && ((f & F_A != 0) != (f & F_D != 0)) {
            continue;
        }
        let mut extras = vec![0u16];
        if eight {
            if v.maxphy < 52 {
                extras.push(F_B51);
            }
            if v.maxphy <= 36 {
                extras.push(F_B36);
            }
            // bit 13 only with PS (access.c's filter).
            if pde && f & F_PS != 0 {
                extras.push(F_B13);
            }
        } else if pde && f & F_PS != 0 && pse {
            // 32-bit 4 MiB page: bit 21 reserved; bit 13 is PA bit 32 (valid,
            // combined with everything).
            extras.push(F_B21);
            extras.push(F_B13);
            extras.push(F_B13 | F_B21);
        }
        for e in extras {
            out.push(f | e);
        }
    }
    out
}

fn cpu_options(v: Variant) -> Vec<Cpu> {
    let mut out = Vec::new();
    for bits in 0..32u32 {
        out.push(Cpu {
            nx: bits & 1 != 0,
            wp: bits & 2 != 0,
            smep: bits & 4 != 0,
            smap: bits & 8 != 0,
            pke: bits & 16 != 0,
        });
    }
    let _ = v;
    out
}

fn pku_options(v: Variant, cpu: Cpu) -> Vec<Pku> {
    let long = matches!(v.mode, Mode::Level4 | Mode::Level5);
    let pae = v.mode == Mode::Pae;
    let mut out = vec![Pku::default()];
    if long || pae {
        // Leaf key 1 (in PAE bits 62:59 are reserved: a reserved-bit flag).
        out.push(Pku {
            leaf_key: true,
            ..Default::default()
        });
    }
    if long && cpu.pke {
        // Key-1 rights with the leaf on key 1, and on key 0 (must not matter).
        for leaf_key in [false, true] {
            for (ad, wd) in [(true, false), (false, true), (true, true)] {
                out.push(Pku { ad, wd, leaf_key });
            }
        }
    }
    out
}

fn access_options(cpu: Cpu) -> Vec<Acc> {
    let mut out = Vec::new();
    for user in [false, true] {
        for kind in 0..3 {
            for twice in [false, true] {
                let base = Acc {
                    user,
                    write: kind == 1,
                    fetch: kind == 2,
                    twice,
                    ..Default::default()
                };
                if cpu.smap && !user && kind != 2 {
                    for (implicit, ac) in
                        [(false, false), (false, true), (true, false), (true, true)]
                    {
                        out.push(Acc {
                            implicit,
                            ac,
                            ..base
                        });
                    }
                } else {
                    out.push(base);
                }
            }
        }
    }
    out
}

/// Enumerate the cases of one variant, calling `f` on each.
fn for_each_case(v: Variant, mut f: impl FnMut(&Case)) {
    let pdes = entry_options(v, true);
    let ptes = entry_options(v, false);
    let long = matches!(v.mode, Mode::Level4 | Mode::Level5);
    for cpu in cpu_options(v) {
        for pku in pku_options(v, cpu) {
            for acc in access_options(cpu) {
                let ros: &[bool] = if long { &[false, true] } else { &[false] };
                for &pdpte_ro in ros {
                    for &pde in &pdes {
                        let mut case = Case {
                            mode: v.mode,
                            maxphy: v.maxphy,
                            cpu,
                            pku,
                            acc,
                            pdpte_ro,
                            pde,
                            pte: PERMISSIVE_PTE,
                        };
                        let pde_rsvd = case.reserved_flags(pde)
                            + (v.mode == Mode::Pae && pku.leaf_key && case.pde_leaf(pde)) as u32;
                        if pde_rsvd > 1 {
                            continue;
                        }
                        let reaches_pte = pde & F_P != 0 && pde_rsvd == 0 && !case.pde_leaf(pde);
                        if !reaches_pte {
                            if (!v.only_b36 || pde & F_B36 != 0)
                                && !(v.mode == Mode::Pae && pku.leaf_key && !case.pde_leaf(pde))
                            {
                                f(&case);
                            }
                            continue;
                        }
                        for &pte in &ptes {
                            let rsvd = pde_rsvd
                                + case.reserved_flags(pte)
                                + (v.mode == Mode::Pae && pku.leaf_key) as u32;
                            if rsvd > 1 {
                                continue;
                            }
                            if v.only_b36 && pte & F_B36 == 0 {
                                continue;
                            }
                            case.pte = pte;
                            f(&case);
                        }
                    }
                }
            }
        }
    }
}

/// PTE used when the walk must not reach it.
const PERMISSIVE_PTE: u16 = F_P | F_W | F_U;

fn variants() -> Vec<Variant> {
    vec![
        Variant {
            mode: Mode::Level4,
            maxphy: 46,
            only_b36: false,
        },
        Variant {
            mode: Mode::Level4,
            maxphy: 36,
            only_b36: true,
        },
        Variant {
            mode: Mode::Level5,
            maxphy: 46,
            only_b36: false,
        },
        Variant {
            mode: Mode::Level5,
            maxphy: 36,
            only_b36: true,
        },
        Variant {
            mode: Mode::Pae,
            maxphy: 46,
            only_b36: false,
        },
        Variant {
            mode: Mode::Pae,
            maxphy: 36,
            only_b36: true,
        },
        Variant {
            mode: Mode::Bits32 { pse: false },
            maxphy: 36,
            only_b36: false,
        },
        Variant {
            mode: Mode::Bits32 { pse: true },
            maxphy: 36,
            only_b36: false,
        },
    ]
}

// ---------------------------------------------------------------------------
// access.c's own expected-outcome rules (kvm-mmu-semantics 1.7, steps 1-8),
// extended with SMAP/implicit/AC, as a second, differently-shaped statement
// of the rules to check the oracle against (4/5-level only).
// ---------------------------------------------------------------------------

struct AccessCExpect {
    fault: bool,
    error: u32,
    pde_after: u64,
    pte_after: u64,
}

fn access_c_expect(c: &Case, pde: u64, pte: u64) -> AccessCExpect {
    let a = c.acc;
    let mut e = AccessCExpect {
        fault: false,
        error: PF_P,
        pde_after: pde,
        pte_after: pte,
    };
    let pde_ps = c.pde & F_PS != 0;
    let has = |f: u16, bit: u16| f & bit != 0;
    let valid = |f: u16, ps: bool| -> bool {
        has(f, F_P)
            && !has(f, F_B51)
            && !has(f, F_B36)
            && (!ps || !has(f, F_B13))
            && (!has(f, F_NX) || c.cpu.nx)
    };
    // 3.
    if a.user {
        e.error |= PF_U;
    }
    if a.write {
        e.error |= PF_W;
    }
    if a.fetch {
        e.error |= PF_ID;
    }
    let mut writable;
    let mut user;
    let mut exec;
    let leaf_is_pde;
    // 4.
    if !valid(c.pde, pde_ps) {
        e.fault = true;
        if has(c.pde, F_P) {
            e.error |= PF_RSVD;
        } else {
            e.error &= !PF_P;
        }
    } else {
        // 5.
        writable = has(c.pde, F_W) && !c.pdpte_ro;
        user = has(c.pde, F_U);
        exec = !has(c.pde, F_NX);
        leaf_is_pde = pde_ps;
        let mut ok = true;
        if !pde_ps {
            // 6.
            if !valid(c.pte, false) {
                e.fault = true;
                ok = false;
                if has(c.pte, F_P) {
                    e.error |= PF_RSVD;
                } else {
                    e.error &= !PF_P;
                }
            } else {
                writable &= has(c.pte, F_W);
                user &= has(c.pte, F_U);
                exec &= !has(c.pte, F_NX);
            }
        }
        if ok {
            // 7.
            let kwritable = !c.cpu.wp && !a.user;
            let sup_data = !a.user && !a.fetch;
            if (a.user && !user)
                || (a.write && !writable && !kwritable)
                || (a.fetch && !exec && c.cpu.nx)
                || (a.fetch && !a.user && user && c.cpu.smep)
                || (sup_data && user && c.cpu.smap && (a.implicit || !a.ac))
            {
                e.fault = true;
            }
            if user
                && !a.fetch
                && c.pku.leaf_key
                && c.cpu.pke
                && (c.pku.ad || (a.write && c.pku.wd && !kwritable))
            {
                e.fault = true;
                e.error |= PF_PK;
            }
            if !e.fault {
                if leaf_is_pde {
                    e.pde_after |= PTE_A | if a.write { PTE_D } else { 0 };
                } else {
                    e.pde_after |= PTE_A;
                    e.pte_after |= PTE_A | if a.write { PTE_D } else { 0 };
                }
            }
        }
    }
    // 8.
    if !c.cpu.nx && !c.cpu.smep {
        e.error &= !PF_ID;
    }
    e
}

// ---------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------

const MAX_MISMATCHES: usize = 20;

struct Stats {
    mismatches: Mutex<Vec<String>>,
    stop: AtomicBool,
}

impl Stats {
    fn report(&self, s: String) {
        let mut m = self.mismatches.lock().unwrap();
        if m.len() < MAX_MISMATCHES {
            m.push(s);
        }
        if m.len() >= MAX_MISMATCHES {
            self.stop.store(true, Ordering::Relaxed);
        }
    }
}

/// Run one case: walker vs oracle (and, for long mode, the oracle vs
/// access.c's rules).
fn run_case(c: &Case, stats: &Stats) {
    let (cpu, mem, chain) = c.build();
    let gva = c.gva();
    let opts = CompareOpts {
        exact_writes: true,
        gptes_modulo_ad: false,
    };
    let tmem = TestMem::new(&mem);
    let mut omem = mem.clone();

    if c.acc.twice {
        let first = OracleAccess::default();
        let exp = observe_oracle(&cpu, &omem, gva, first);
        let got = observe_walker(&cpu, &tmem, gva, first);
        let d = diff(false, &exp, &got, opts);
        if !d.is_empty() {
            stats.report(format!(
                "{} -- first (supervisor read) access:{d}",
                c.describe()
            ));
            return;
        }
        omem = exp.mem_after;
    }
    let before = omem.clone();
    let exp = observe_oracle(&cpu, &omem, gva, c.access());
    let got = observe_walker(&cpu, &tmem, gva, c.access());
    let d = diff(false, &exp, &got, opts);
    if !d.is_empty() {
        stats.report(format!("{}:{d}", c.describe()));
        return;
    }

    if c.long() {
        // No page table behind a large-page PDE: its "PTE" reads as 0.
        let pte_of = |m: &OracleMem| {
            if chain.entry[1] == 0 {
                0
            } else {
                chain.get(m, 1)
            }
        };
        let x = access_c_expect(c, chain.get(&before, 2), pte_of(&before));
        let (of, oe) = match exp.outcome {
            OracleOutcome::Ok { .. } => (false, 0),
            OracleOutcome::Fault { error_code, .. } => (true, error_code),
        };
        let pde_ok = chain.get(&exp.mem_after, 2) == x.pde_after;
        let pte_ok = pte_of(&exp.mem_after) == x.pte_after;
        if of != x.fault || (of && oe != x.error) || !pde_ok || !pte_ok {
            stats.report(format!(
                "ORACLE vs access.c rules: {}: oracle {} / access.c fault={} ec={:#x} [{}] pde {:#x} pte {:#x}",
                c.describe(),
                fmt_outcome(&exp.outcome),
                x.fault,
                x.error,
                fmt_pfec(x.error),
                x.pde_after,
                x.pte_after
            ));
        }
    }
}

fn sample_divisor() -> u64 {
    if std::env::var("ACCESS_MATRIX_FULL").is_ok_and(|v| v == "1") {
        return 1;
    }
    if let Some(n) = std::env::var("ACCESS_MATRIX_SAMPLE")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        return n.max(1);
    }
    if cfg!(debug_assertions) {
        8
    } else {
        1
    }
}

fn run_variants(vs: &[Variant]) {
    let divisor = sample_divisor();
    let stats = Stats {
        mismatches: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
    };
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8);
    let t_all = Instant::now();
    for &v in vs {
        let t = Instant::now();
        let mut cases = Vec::new();
        let mut total = 0u64;
        for_each_case(v, |c| {
            // Deterministic 1-in-N sample (hash of the case index).
            if divisor == 1 || splitmix64(total) % divisor == 0 {
                cases.push(*c);
            }
            total += 1;
        });
        let next = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| loop {
                    if stats.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let start = next.fetch_add(1024, Ordering::Relaxed);
                    if start >= cases.len() {
                        break;
                    }
                    for c in &cases[start..(start + 1024).min(cases.len())] {
                        run_case(c, &stats);
                    }
                });
            }
        });
        eprintln!(
            "access_matrix: {:?} MAXPHYADDR={}{}: {} cases generated, {} run (1 in {divisor}), {:.2?}",
            v.mode,
            v.maxphy,
            if v.only_b36 { " (bit-36 cases only)" } else { "" },
            total,
            cases.len(),
            t.elapsed()
        );
        if stats.stop.load(Ordering::Relaxed) {
            break;
        }
    }
    eprintln!("access_matrix: total {:.2?}", t_all.elapsed());
    let m = stats.mismatches.lock().unwrap();
    if !m.is_empty() {
        for (i, s) in m.iter().enumerate() {
            eprintln!("MISMATCH {}: {s}", i + 1);
        }
        panic!(
            "{} mismatch(es){}",
            m.len(),
            if m.len() >= MAX_MISMATCHES {
                " (stopped at the limit)"
            } else {
                ""
            }
        );
    }
}

fn pick(f: impl Fn(&Variant) -> bool) -> Vec<Variant> {
    variants().into_iter().filter(|v| f(v)).collect()
}

#[test]
fn matrix_4level() {
    run_variants(&pick(|v| v.mode == Mode::Level4));
}

#[test]
fn matrix_5level() {
    run_variants(&pick(|v| v.mode == Mode::Level5));
}

#[test]
fn matrix_pae() {
    run_variants(&pick(|v| v.mode == Mode::Pae));
}

#[test]
fn matrix_32bit() {
    run_variants(&pick(|v| matches!(v.mode, Mode::Bits32 { .. })));
}

/// The generator itself: the filters hold and the space is what we think.
#[test]
fn generator_sanity() {
    for v in variants() {
        let mut n = 0u64;
        for_each_case(v, |c| {
            n += 1;
            assert!(!(c.acc.fetch && c.acc.write));
            assert!(c.pde & F_B13 == 0 || c.pde & F_PS != 0 || !c.eight_byte());
            assert!(!(c.pku.ad || c.pku.wd) || c.cpu.pke);
            assert!(!c.acc.implicit || (!c.acc.user && !c.acc.fetch));
            let r = c.reserved_flags(c.pde)
                + c.reserved_flags(c.pte)
                + (c.mode == Mode::Pae && c.pku.leaf_key) as u32;
            assert!(r <= 1, "{}", c.describe());
        });
        assert!(n > 0, "{v:?}");
    }
}
