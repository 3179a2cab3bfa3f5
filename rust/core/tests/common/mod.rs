//! Test support for the guest page-table walker: a sparse guest memory that
//! implements `kvmmmu_core::paging::GuestMem` (some gfns absent, some
//! read-only), page-table builders, the adapter that runs the walker and
//! converts its result into the oracle's types, and the comparison.
//!
//! The oracle itself (`sdm_oracle`) does not use anything from the walker.

#![allow(dead_code)]

pub mod sdm_oracle;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::Mutex;

use kvmmmu_core::paging::{walk, Access, GuestMem, Walk, WalkCtx, WalkError};

pub use sdm_oracle::*;

// ---------------------------------------------------------------------------
// Guest memory
// ---------------------------------------------------------------------------

/// Guest memory for the walker: an `OracleMem` behind a lock, plus a log of
/// the walker's writes and dirty marks.
#[derive(Default)]
pub struct TestMem {
    pub mem: Mutex<OracleMem>,
    /// Successful cmpxchg's: (gpa, new value), in order.
    pub writes: Mutex<Vec<(u64, u64)>>,
    /// mark_dirty() calls, in order.
    pub dirty: Mutex<Vec<u64>>,
    /// Number of cmpxchg's refused (unbacked or read-only).
    pub refused: Mutex<u32>,
}

impl TestMem {
    pub fn new(mem: &OracleMem) -> TestMem {
        TestMem {
            mem: Mutex::new(mem.clone()),
            ..Default::default()
        }
    }
    pub fn snapshot(&self) -> OracleMem {
        self.mem.lock().unwrap().clone()
    }
    pub fn take_log(&self) -> (Vec<(u64, u64)>, Vec<u64>) {
        (
            std::mem::take(&mut *self.writes.lock().unwrap()),
            std::mem::take(&mut *self.dirty.lock().unwrap()),
        )
    }
}

impl GuestMem for TestMem {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        assert!(
            buf.len() == 4 || buf.len() == 8,
            "walker read of {} bytes",
            buf.len()
        );
        let mem = self.mem.lock().unwrap();
        // Byte by byte, so that even an unaligned read would be answered right.
        for (i, b) in buf.iter_mut().enumerate() {
            let a = gpa.wrapping_add(i as u64);
            if !mem.is_backed(a) {
                return false;
            }
            let word = mem.words.get(&(a & !7)).copied().unwrap_or(0);
            *b = (word >> ((a & 7) * 8)) as u8;
        }
        true
    }

    fn cmpxchg(&self, gpa: u64, size: usize, old: u64, new: u64) -> Result<bool, ()> {
        assert!(size == 4 || size == 8, "walker cmpxchg of {size} bytes");
        assert_eq!(gpa % size as u64, 0, "misaligned cmpxchg at {gpa:#x}");
        let mut mem = self.mem.lock().unwrap();
        if !mem.is_writable(gpa) {
            *self.refused.lock().unwrap() += 1;
            return Err(());
        }
        let cur = mem.read(gpa, size).unwrap();
        if cur != old {
            return Ok(false);
        }
        mem.write(gpa, size, new);
        self.writes.lock().unwrap().push((gpa, new));
        Ok(true)
    }

    fn mark_dirty(&self, gfn: u64) {
        self.dirty.lock().unwrap().push(gfn);
    }
}

// ---------------------------------------------------------------------------
// The adapter: the only place that touches the walker's types
// ---------------------------------------------------------------------------

pub fn to_walk_ctx(cpu: &OracleCpu) -> WalkCtx {
    WalkCtx {
        cr0: cpu.cr0,
        cr3: cpu.cr3,
        cr4: cpu.cr4,
        efer: cpu.efer,
        pdptrs: cpu.pdptrs,
        maxphyaddr: cpu.maxphyaddr,
        gbpages: cpu.gbpages,
        pkru: cpu.pkru,
        rflags_ac: cpu.rflags_ac,
    }
}

pub fn to_access(acc: OracleAccess) -> Access {
    Access {
        write: acc.write,
        user: acc.user,
        fetch: acc.fetch,
        implicit: acc.implicit,
    }
}

/// Run the walker and express its answer in the oracle's terms.
pub fn run_walker<M: GuestMem>(
    cpu: &OracleCpu,
    mem: &M,
    gva: u64,
    acc: OracleAccess,
) -> OracleOutcome {
    to_outcome(&walk(&to_walk_ctx(cpu), mem, gva, to_access(acc)))
}

/// A walker result in the oracle's terms.
pub fn to_outcome(r: &Result<Walk, WalkError>) -> OracleOutcome {
    match *r {
        Ok(w) => OracleOutcome::Ok {
            gpa: w.gpa,
            level: w.level,
            page_size: w.page_size,
            access: w.access,
            gptes: w.gptes.to_vec(),
        },
        Err(WalkError::PageFault {
            error_code,
            address,
        }) => OracleOutcome::Fault {
            vector: VEC_PF,
            error_code,
            address,
        },
        Err(WalkError::GeneralProtection { error_code }) => OracleOutcome::Fault {
            vector: VEC_GP,
            error_code,
            address: 0,
        },
    }
}

/// Two entries of the walk at the same gpa (KVM's A/D cmpxchg then retries, so the order
/// of A/D writes is not fixed).
pub fn has_aliases(o: &OracleOutcome) -> bool {
    match o {
        OracleOutcome::Ok { gptes, .. } => {
            let mut g: Vec<u64> = gptes.iter().map(|t| t.1).collect();
            g.sort_unstable();
            g.windows(2).any(|w| w[0] == w[1])
        }
        _ => false,
    }
}

/// What one access did, as observed from outside (walker) or predicted (oracle).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub outcome: OracleOutcome,
    pub mem_after: OracleMem,
    pub writes: Vec<(u64, u64)>,
    pub dirty: BTreeSet<u64>,
}

/// Run the walker on `mem` (which it may modify) and collect what it did.
pub fn observe_walker(cpu: &OracleCpu, mem: &TestMem, gva: u64, acc: OracleAccess) -> Observed {
    let outcome = run_walker(cpu, mem, gva, acc);
    let (writes, dirty) = mem.take_log();
    Observed {
        outcome,
        mem_after: mem.snapshot(),
        writes,
        dirty: dirty.into_iter().collect(),
    }
}

pub fn observe_oracle(cpu: &OracleCpu, mem: &OracleMem, gva: u64, acc: OracleAccess) -> Observed {
    let r = oracle_walk(cpu, mem, gva, acc);
    Observed {
        outcome: r.outcome,
        mem_after: r.mem_after,
        writes: r.ad_writes,
        dirty: r.dirty_gfns,
    }
}

/// How strictly to compare.
#[derive(Clone, Copy, Debug, Default)]
pub struct CompareOpts {
    /// Compare the order and values of the walker's successful cmpxchg's
    /// (only meaningful when no entry aliases another: with aliasing KVM's
    /// retry loop legitimately writes in a different sequence).
    pub exact_writes: bool,
    /// Compare gptes values modulo A/D bits (when aliased entries make the
    /// value read in the final pass depend on the retry).
    pub gptes_modulo_ad: bool,
}

/// Describe every difference between the walker (`got`) and the oracle
/// (`exp`); empty when they agree.
pub fn diff(paging_off: bool, exp: &Observed, got: &Observed, opts: CompareOpts) -> String {
    let mut s = String::new();
    match (&exp.outcome, &got.outcome) {
        (
            OracleOutcome::Ok {
                gpa: eg,
                level: el,
                page_size: eps,
                access: ea,
                gptes: ept,
            },
            OracleOutcome::Ok {
                gpa: gg,
                level: gl,
                page_size: gps,
                access: ga,
                gptes: gpt,
            },
        ) => {
            if eg != gg {
                let _ = write!(s, " gpa: expected {eg:#x} got {gg:#x};");
            }
            // With paging off the API leaves level/page_size/access unspecified.
            if !paging_off {
                if el != gl {
                    let _ = write!(s, " level: expected {el} got {gl};");
                }
                if eps != gps {
                    let _ = write!(s, " page_size: expected {eps:#x} got {gps:#x};");
                }
                if ea != ga {
                    let _ = write!(s, " access: expected {ea:#x} got {ga:#x};");
                }
            }
            let mask = if opts.gptes_modulo_ad {
                !(PTE_A | PTE_D)
            } else {
                !0
            };
            let norm = |v: &Vec<(u8, u64, u64)>| -> Vec<(u8, u64, u64)> {
                v.iter().map(|&(l, a, x)| (l, a, x & mask)).collect()
            };
            if norm(ept) != norm(gpt) {
                let _ = write!(
                    s,
                    " gptes: expected {} got {};",
                    fmt_gptes(ept),
                    fmt_gptes(gpt)
                );
            }
        }
        (e, g) => {
            if e != g {
                let _ = write!(
                    s,
                    " outcome: expected {} got {};",
                    fmt_outcome(e),
                    fmt_outcome(g)
                );
            }
        }
    }
    if exp.mem_after != got.mem_after {
        let _ = write!(
            s,
            " memory after:{};",
            mem_diff(&exp.mem_after, &got.mem_after)
        );
    }
    if opts.exact_writes && exp.writes != got.writes {
        let _ = write!(
            s,
            " A/D writes (gpa, new): expected {} got {};",
            fmt_pairs(&exp.writes),
            fmt_pairs(&got.writes)
        );
    }
    if exp.dirty != got.dirty {
        let _ = write!(
            s,
            " dirty gfns: expected {:x?} got {:x?};",
            exp.dirty, got.dirty
        );
    }
    s
}

pub fn fmt_outcome(o: &OracleOutcome) -> String {
    match o {
        OracleOutcome::Ok {
            gpa,
            level,
            page_size,
            access,
            ..
        } => format!("Ok(gpa {gpa:#x}, level {level}, size {page_size:#x}, acc {access:#x})"),
        OracleOutcome::Fault {
            vector,
            error_code,
            address,
        } => {
            if *vector == VEC_PF {
                format!(
                    "#PF(ec {error_code:#x} [{}], cr2 {address:#x})",
                    fmt_pfec(*error_code)
                )
            } else {
                format!("#{vector}({error_code:#x})")
            }
        }
    }
}

pub fn fmt_pfec(ec: u32) -> String {
    let names = [
        (PF_P, "P"),
        (PF_W, "W"),
        (PF_U, "U"),
        (PF_RSVD, "RSVD"),
        (PF_ID, "ID"),
        (PF_PK, "PK"),
    ];
    let v: Vec<&str> = names
        .iter()
        .filter(|(b, _)| ec & b != 0)
        .map(|&(_, n)| n)
        .collect();
    v.join("|")
}

fn fmt_gptes(v: &[(u8, u64, u64)]) -> String {
    let parts: Vec<String> = v
        .iter()
        .map(|(l, a, x)| format!("L{l}@{a:#x}={x:#x}"))
        .collect();
    format!("[{}]", parts.join(" "))
}

fn fmt_pairs(v: &[(u64, u64)]) -> String {
    let parts: Vec<String> = v.iter().map(|(a, x)| format!("{a:#x}={x:#x}")).collect();
    format!("[{}]", parts.join(" "))
}

fn mem_diff(e: &OracleMem, g: &OracleMem) -> String {
    let mut s = String::new();
    let keys: BTreeSet<u64> = e.words.keys().chain(g.words.keys()).copied().collect();
    for k in keys {
        let (ev, gv) = (
            e.words.get(&k).copied().unwrap_or(0),
            g.words.get(&k).copied().unwrap_or(0),
        );
        if ev != gv {
            let _ = write!(s, " [{k:#x}] expected {ev:#x} got {gv:#x}");
        }
    }
    if e.backed != g.backed || e.read_only != g.read_only {
        s.push_str(" (memslot layout changed!)");
    }
    s
}

// ---------------------------------------------------------------------------
// CPU-state and page-table builders
// ---------------------------------------------------------------------------

/// The four paging modes under test plus paging off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Off,
    Bits32 { pse: bool },
    Pae,
    Level4,
    Level5,
}

impl Mode {
    /// Minimal control-register state for this mode (no WP/NXE/SMEP/... yet).
    pub fn cpu(self) -> OracleCpu {
        let mut c = OracleCpu {
            maxphyaddr: 46,
            ..Default::default()
        };
        match self {
            Mode::Off => {}
            Mode::Bits32 { pse } => {
                c.cr0 = CR0_PG;
                if pse {
                    c.cr4 = CR4_PSE;
                }
            }
            Mode::Pae => {
                c.cr0 = CR0_PG;
                c.cr4 = CR4_PAE;
            }
            Mode::Level4 => {
                c.cr0 = CR0_PG;
                c.cr4 = CR4_PAE;
                c.efer = EFER_LME | EFER_LMA;
            }
            Mode::Level5 => {
                c.cr0 = CR0_PG;
                c.cr4 = CR4_PAE | CR4_LA57;
                c.efer = EFER_LME | EFER_LMA;
            }
        }
        c
    }
    pub fn entry_size(self) -> usize {
        if matches!(self, Mode::Bits32 { .. }) {
            4
        } else {
            8
        }
    }
    /// Levels of the tree in memory, top-down (PAE: the PDPT is a register).
    pub fn levels(self) -> Vec<u8> {
        match self {
            Mode::Off => vec![],
            Mode::Bits32 { .. } | Mode::Pae => vec![2, 1],
            Mode::Level4 => vec![4, 3, 2, 1],
            Mode::Level5 => vec![5, 4, 3, 2, 1],
        }
    }
    /// Index of `gva` in the table of `level`.
    pub fn index(self, gva: u64, level: u8) -> u64 {
        match self {
            Mode::Bits32 { .. } => (gva >> (12 + 10 * (level as u32 - 1))) & 0x3ff,
            _ => (gva >> (12 + 9 * (level as u32 - 1))) & 0x1ff,
        }
    }
}

/// A chain of tables mapping one gva, built in an `OracleMem`.
#[derive(Clone, Debug)]
pub struct Chain {
    pub mode: Mode,
    pub cpu: OracleCpu,
    /// gpa of the entry at each level (index = level; 0 unused). For PAE,
    /// `entry[3]` is where the PDPTE lives in memory (the walker uses
    /// `cpu.pdptrs`).
    pub entry: [u64; 6],
    /// gfn of the table at each level.
    pub table: [u64; 6],
}

impl Chain {
    pub fn set(&self, mem: &mut OracleMem, level: u8, value: u64) {
        mem.write(self.entry[level as usize], self.mode.entry_size(), value);
    }
    pub fn get(&self, mem: &OracleMem, level: u8) -> u64 {
        mem.read(self.entry[level as usize], self.mode.entry_size())
            .unwrap()
    }
}

/// Build a chain of tables for `gva`: one page per level, starting at gfn
/// `first_table_gfn` (consecutive), every non-leaf entry = `upper` flags |
/// next table, the leaf at `leaf_level` = `leaf` flags | `frame` (with PS
/// added for a large leaf). For PAE the PDPT page is at `first_table_gfn`
/// too (CR3 points at it, plus offset 0x20 to exercise CR3[11:5]) and its
/// entry is also loaded into `cpu.pdptrs`.
#[allow(clippy::too_many_arguments)]
pub fn build_chain(
    mode: Mode,
    mem: &mut OracleMem,
    gva: u64,
    first_table_gfn: u64,
    leaf_level: u8,
    upper: u64,
    leaf: u64,
    frame: u64,
) -> Chain {
    let mut cpu = mode.cpu();
    let mut chain = Chain {
        mode,
        cpu,
        entry: [0; 6],
        table: [0; 6],
    };
    let size = mode.entry_size() as u64;
    let gfn = first_table_gfn;
    let top: u8 = match mode {
        Mode::Off => return chain,
        Mode::Bits32 { .. } => 2,
        Mode::Pae => 3,
        Mode::Level4 => 4,
        Mode::Level5 => 5,
    };
    if mode == Mode::Pae {
        mem.add_page(gfn);
        cpu.cr3 = (gfn << 12) | 0x20;
    } else {
        cpu.cr3 = gfn << 12;
    }
    for (level, gfn) in (leaf_level..=top).rev().zip(gfn..) {
        mem.add_page(gfn);
        chain.table[level as usize] = gfn;
        let idx = if mode == Mode::Pae && level == 3 {
            (gva >> 30) & 3
        } else {
            mode.index(gva, level)
        };
        let base = if mode == Mode::Pae && level == 3 {
            (gfn << 12) | 0x20
        } else {
            gfn << 12
        };
        let gpa = base + idx * size;
        chain.entry[level as usize] = gpa;
        let value = if level == leaf_level {
            leaf | frame | if level > 1 { PTE_PS } else { 0 }
        } else if mode == Mode::Pae && level == 3 {
            // PDPTE: only P and the address (table 4-8).
            PTE_P | ((gfn + 1) << 12)
        } else {
            upper | ((gfn + 1) << 12)
        };
        mem.write(gpa, size as usize, value);
        if mode == Mode::Pae && level == 3 {
            cpu.pdptrs[idx as usize] = value;
        }
    }
    chain.cpu = cpu;
    chain
}

// ---------------------------------------------------------------------------
// Tiny deterministic PRNG for sampling (splitmix64)
// ---------------------------------------------------------------------------

pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
