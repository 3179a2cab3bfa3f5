//! Fuzz target `walk`: the guest page-table walker (`kvmmmu_core::paging`) against
//! the independent SDM oracle of the integration tests.
//!
//! Each input is decoded (with `arbitrary`) into a small guest-physical memory (up to
//! eight 4 KiB pages at chosen gfns, some absent, some read-only), 4- and 8-byte
//! entries written into those pages (mostly present and pointing at other pool pages,
//! with interesting flag bits, at the table index a later access uses), a CPU state
//! (CR0.PG/WP, CR4.PSE/PAE/LA57/SMEP/SMAP/PKE, EFER.LMA/NXE, CR3 in the pool, PAE
//! PDPTRs, MAXPHYADDR, 1 GiB pages, PKRU, EFLAGS.AC) and up to eight accesses
//! (gva, read/write/fetch, user/supervisor, implicit).
//!
//! Each access runs, in order, on three memories with the same contents:
//! - the walker (`paging::walk`) on the tests' `TestMem` behind a recorder: every read
//!   must be a naturally aligned 4/8-byte gpte that is answered iff a slot backs it,
//!   every compare-exchange must hit an entry this walk read, only set A/D, succeed
//!   only in a writable slot, and every dirty mark must follow a successful write to
//!   that page. The outcome, the memory afterwards, the A/D writes (exact when no
//!   entry of the walk aliases another) and the dirty-logged gfns must equal the
//!   oracle's (`sdm_oracle::oracle_walk`, run on its own copy of the memory);
//! - for inputs that ask for it, the walker (`GuestMmu::walk`, generic path) on a real
//!   `MemSlots` over one `HostRegion`, through the same recorder: same `Walk` or fault
//!   bit for bit, the same sequence of memory operations, and at the end the same
//!   memory contents as `TestMem`.
//!
//! Also checked on every successful walk: each in-memory entry it reports was read,
//! `Walk::pkey` is the leaf's key when protection keys apply (else 0) and
//! `Walk::dirty` is the leaf's D bit in memory after the walk.
//!
//! The oracle, `TestMem` and the comparison come from `rust/core/tests/common/`,
//! included by path rather than copied.
//!
//! Set `WALK_FUZZ_VERBOSE=1` to print every decoded case and its outcomes to stderr.

#![no_main]

#[path = "../../rust/core/tests/common/mod.rs"]
mod common;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt::{self, Write as _};
use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use common::*;
use kvmmmu_core::errno::Errno;
use kvmmmu_core::hostmem::HostRegion;
use kvmmmu_core::memslot::{MemSlots, RegionIoctl};
use kvmmmu_core::paging::{walk, GuestMem, GuestMmu, Walk};
use kvmmmu_core::uapi::{kvm_userspace_memory_region2, KVM_MEM_READONLY};
use libfuzzer_sys::fuzz_target;

// ---------------------------------------------------------------- the input

const MAX_PAGES: usize = 8;
const MAX_ENTRIES: usize = 48;
const MAX_ACCESSES: usize = 8;
const MAX_CHAINS: usize = 3;

/// A value that is usually one of a list of interesting ones, sometimes anything.
#[derive(Arbitrary, Clone, Copy, Debug)]
enum Pick<T> {
    Listed(u8),
    Raw(T),
}

impl<T: Copy> Pick<T> {
    fn get(self, list: &[T]) -> T {
        match self {
            Pick::Listed(i) => list[i as usize % list.len()],
            Pick::Raw(v) => v,
        }
    }
}

/// Pool gfns: a run of 16 consecutive pages at 4 MiB (so that 4 MiB PDEs pointing
/// there only use the PSE-36 bits), and pages around the MAXPHYADDR boundaries
/// (2^36, 2^40, 2^46, 2^48) and at the top of the 52-bit space.
const GFNS: &[u64] = &[
    0x400,
    0x401,
    0x402,
    0x403,
    0x404,
    0x405,
    0x406,
    0x407,
    0x408,
    0x409,
    0x40a,
    0x40b,
    0x40c,
    0x40d,
    0x40e,
    0x40f,
    0,
    1,
    0xfffff,
    0x10_0000,
    (1 << 24) - 1,
    1 << 24,
    (1 << 28) - 1,
    1 << 28,
    (1 << 34) - 1,
    1 << 34,
    1 << 36,
    (1 << 40) - 1,
];

const MAXPHYS: &[u8] = &[36, 40, 46, 48, 52];

/// Bits an entry may get on top of its address and flags: NX, PS, reserved bits for
/// the MAXPHYADDRs in use (36, 40, 46, 47, 48, 51), bit 52 (ignored in 4/5-level
/// paging, reserved in PAE), the PSE-36 and 4 MiB reserved bits (13, 16, 17, 21), a
/// protection-key bit (62), 2 MiB/1 GiB frame-alignment bits (20, 29) and G.
const EXTRA_BITS: [u32; 16] = [63, 7, 51, 52, 36, 13, 16, 62, 40, 46, 47, 48, 21, 17, 29, 8];

/// Extra bits of an entry: each byte picks one of `EXTRA_BITS` half the time.
#[derive(Arbitrary, Clone, Copy, Debug)]
struct Extra([u8; 2]);

impl Extra {
    fn bits(self) -> u64 {
        self.0
            .iter()
            .filter(|&&b| b % 32 < 16)
            .fold(0, |v, &b| v | 1 << EXTRA_BITS[usize::from(b % 32)])
    }
}

/// Flags of an entry: bits 1-6 and 8-11 of `flags`; PS (bit 7) when bits 14 and 15
/// are both set (a quarter of the time); a protection key (bits 62:59) when bit 4 of
/// `pkey` is set.
fn entry_flags(flags: u16, pkey: u8) -> u64 {
    let ps = if flags & 0xc000 == 0xc000 { PTE_PS } else { 0 };
    let key = if pkey & 0x10 != 0 {
        u64::from(pkey & 0xf) << 59
    } else {
        0
    };
    u64::from(flags & 0xf7e) | ps | key
}

#[derive(Arbitrary, Clone, Copy, Debug)]
struct PageSpec {
    gfn: Pick<u64>,
    /// 0, 1: present and writable; 2: read-only slot; 3: no slot.
    kind: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PageKind {
    Rw,
    Ro,
    Absent,
}

#[derive(Arbitrary, Clone, Copy, Debug)]
enum ValueSpec {
    /// Present, pointing at pool page `target`.
    Table {
        target: u8,
        flags: u16,
        pkey: u8,
        extra: Extra,
    },
    /// Present with PS: a 2 MiB-aligned frame (1 GiB-aligned with `gb`) below
    /// MAXPHYADDR.
    Large {
        frame: u32,
        gb: bool,
        flags: u16,
        pkey: u8,
        extra: Extra,
    },
    /// Not present, other bits anything.
    Absent(u64),
    Raw(u64),
}

#[derive(Arbitrary, Clone, Copy, Debug)]
enum At {
    /// At the index access `access` uses at `level`, in the entry size of the mode.
    Gva { access: u8, level: u8 },
    /// The same, in every pool page.
    AllPages { access: u8, level: u8 },
    /// At byte offset `offset` (aligned down), 8 bytes wide if `wide`.
    Offset { offset: u16, wide: bool },
}

#[derive(Arbitrary, Clone, Copy, Debug)]
struct EntrySpec {
    page: u8,
    at: At,
    value: ValueSpec,
}

#[derive(Arbitrary, Clone, Copy, Debug)]
enum GvaSpec {
    Raw(u64),
    /// Table indices per level (level 1 first), page offset; canonical unless told.
    Indices {
        idx: [u16; 5],
        offset: u16,
        noncanonical: bool,
    },
    /// The same index at every level (self-referencing tables: aliasing).
    Same {
        idx: u16,
        offset: u16,
    },
    /// The index of entry `entry` (when written at an offset) at `level`.
    Entry {
        entry: u8,
        level: u8,
        rest: u64,
    },
}

#[derive(Arbitrary, Clone, Copy, Debug)]
struct AccessSpec {
    /// % 3: read, write, fetch.
    kind: u8,
    user: bool,
    /// Implicit supervisor access (only for supervisor data accesses).
    implicit: bool,
    gva: GvaSpec,
}

#[derive(Arbitrary, Clone, Copy, Debug)]
enum Cr3Spec {
    Pool { page: u8, low: u16 },
    Raw(u64),
}

#[derive(Arbitrary, Clone, Copy, Debug)]
enum PdpteSpec {
    Pool {
        page: u8,
        low: u16,
    },
    NotPresent(u64),
    /// Kept only if MOV to CR3 would have loaded it (else made not present).
    Raw(u64),
}

#[derive(Arbitrary, Clone, Copy, Debug)]
struct CpuSpec {
    /// % 8: 0 paging off, 1 32-bit, 2 PAE, 3-4 4-level, 5-6 5-level,
    /// 7 PG/PAE/LMA/LA57 from `flags` (any combination KVM_SET_SREGS accepts).
    mode: u8,
    /// WP, PSE, SMEP, SMAP, PKE, NXE, LA57 (noise outside 5-level), then PG, PAE, LMA
    /// (LMA only kept with PG and PAE).
    flags: u16,
    /// Other bits of CR0, CR4, EFER (never the ones above).
    noise: Option<(u32, u32, u16)>,
    cr3: Cr3Spec,
    pdptrs: [PdpteSpec; 4],
    maxphy: u8,
    gbpages: bool,
    pkru: u32,
    ac: bool,
}

/// A whole path of present entries for one access, from the table CR3 (or the PAE
/// PDPTE) points at down to a leaf at level 1, 2 or 3 (so that deep walks and large
/// pages are common; `entries` are written afterwards and may spoil it).
#[derive(Arbitrary, Clone, Copy, Debug)]
struct ChainSpec {
    access: u8,
    /// % 3 + 1, capped by the mode (2 in 32-bit and PAE paging).
    leaf: u8,
    /// The pool page of the next table, per level below the top.
    pages: [u8; 4],
    /// Flags per level, top first (as `entry_flags`, without PS); bit 12 asks for NX.
    flags: [u16; 5],
    pkey: u8,
    /// Extra bits for the entry of one level.
    extra: (u8, Extra),
    /// The leaf's frame: a pool page (4 KiB leaf) or 2 MiB units (large leaf).
    frame: u32,
}

#[derive(Arbitrary, Debug)]
struct Input {
    cpu: CpuSpec,
    /// Also run every access on a `MemSlots` over a `HostRegion`.
    memslots: bool,
    pages: Vec<PageSpec>,
    accesses: Vec<AccessSpec>,
    chains: Vec<ChainSpec>,
    entries: Vec<EntrySpec>,
}

// ---------------------------------------------------------------- decoding

/// One decoded test case.
struct Case {
    cpu: OracleCpu,
    mode: PagingMode,
    /// (gfn, kind) in input order; unique gfns.
    pages: Vec<(u64, PageKind)>,
    /// Guest memory before the first access.
    mem: OracleMem,
    accesses: Vec<(u64, OracleAccess)>,
    memslots: bool,
}

fn entry_size(mode: PagingMode) -> u64 {
    if mode == PagingMode::Bits32 {
        4
    } else {
        8
    }
}

fn index_bits(mode: PagingMode) -> u32 {
    if mode == PagingMode::Bits32 {
        10
    } else {
        9
    }
}

/// Index of `gva` in the table of `level` (1..=5).
fn index(mode: PagingMode, gva: u64, level: u8) -> u64 {
    let b = index_bits(mode);
    (gva >> (12 + b * (u32::from(level) - 1))) & ((1 << b) - 1)
}

/// Levels of tables in memory.
fn mem_levels(mode: PagingMode) -> u8 {
    match mode {
        PagingMode::Bits32 | PagingMode::Pae => 2,
        PagingMode::Level5 => 5,
        _ => 4,
    }
}

/// A PAE PDPTE MOV to CR3 accepts (SDM 4.4.1, table 4-8): not present, or no bit
/// set in 2:1, 8:5, 63:MAXPHYADDR.
fn pdpte_loadable(v: u64, maxphy: u8) -> bool {
    v & PTE_P == 0 || v & (bits(1, 2) | bits(5, 8) | bits(u32::from(maxphy), 63)) == 0
}

fn decode(input: &Input) -> Case {
    // Pool pages.
    let mut pages: Vec<(u64, PageKind)> = Vec::new();
    for p in input.pages.iter().take(MAX_PAGES) {
        let gfn = p.gfn.get(GFNS) & ((1 << 40) - 1);
        if pages.iter().any(|&(g, _)| g == gfn) {
            continue;
        }
        let kind = match p.kind % 4 {
            0 | 1 => PageKind::Rw,
            2 => PageKind::Ro,
            _ => PageKind::Absent,
        };
        pages.push((gfn, kind));
    }
    if pages.is_empty() {
        pages.push((0x400, PageKind::Rw));
    }
    let pool = |i: u8| pages[i as usize % pages.len()].0;

    // CPU state.
    let c = &input.cpu;
    let f = |i: u32| c.flags & (1 << i) != 0;
    let (pg, pae, lma, la57) = match c.mode % 8 {
        0 => (false, f(7), false, f(6)),
        1 => (true, false, false, f(6)),
        2 => (true, true, false, f(6)),
        3 | 4 => (true, true, true, false),
        5 | 6 => (true, true, true, true),
        _ => (f(7), f(8), f(9), f(6)),
    };
    // EFER.LMA only in long mode, with CR0.PG and CR4.PAE: KVM_SET_SREGS refuses any
    // other combination (rules 4 and 5 in vcpu/sregs.rs), and MOV to CR0/CR4 keeps it so.
    let lma = lma && pg && pae;
    let set = |cond: bool, bit: u64| if cond { bit } else { 0 };
    let mut cpu = OracleCpu {
        cr0: set(pg, CR0_PG) | set(f(0), CR0_WP),
        cr4: set(f(1), CR4_PSE)
            | set(pae, CR4_PAE)
            | set(la57, CR4_LA57)
            | set(f(2), CR4_SMEP)
            | set(f(3), CR4_SMAP)
            | set(f(4), CR4_PKE),
        efer: set(lma, EFER_LMA | EFER_LME) | set(f(5), EFER_NXE),
        maxphyaddr: MAXPHYS[c.maxphy as usize % MAXPHYS.len()],
        gbpages: c.gbpages,
        pkru: c.pkru,
        rflags_ac: c.ac,
        ..Default::default()
    };
    if let Some((n0, n4, ne)) = c.noise {
        cpu.cr0 |= u64::from(n0) & !(CR0_PG | CR0_WP);
        cpu.cr4 |= u64::from(n4) & !(CR4_PSE | CR4_PAE | CR4_LA57 | CR4_SMEP | CR4_SMAP | CR4_PKE);
        cpu.efer |= u64::from(ne) & !(EFER_LMA | EFER_LME | EFER_NXE);
    }
    cpu.cr3 = match c.cr3 {
        Cr3Spec::Pool { page, low } => (pool(page) << 12) | u64::from(low & 0xfff),
        Cr3Spec::Raw(v) => v & bits(0, 51),
    };
    for (r, s) in cpu.pdptrs.iter_mut().zip(c.pdptrs) {
        *r = match s {
            PdpteSpec::Pool { page, low } => PTE_P | (pool(page) << 12) | u64::from(low & 0xe18),
            PdpteSpec::NotPresent(v) => v & !PTE_P,
            PdpteSpec::Raw(v) => v,
        };
        if !pdpte_loadable(*r, cpu.maxphyaddr) {
            *r &= !PTE_P;
        }
    }
    let mode = paging_mode(&cpu);
    let esize = entry_size(mode);

    // Accesses (gvas first: entries may be placed at their indices).
    let entries: Vec<EntrySpec> = input.entries.iter().take(MAX_ENTRIES).copied().collect();
    let mut accesses = Vec::new();
    for a in input.accesses.iter().take(MAX_ACCESSES) {
        let b = index_bits(mode);
        let from_indices = |idx: [u64; 5], offset: u64| -> u64 {
            let mut g = offset & 0xfff;
            for (l, &i) in idx.iter().enumerate() {
                g |= (i & ((1 << b) - 1)) << (12 + b * l as u32);
            }
            g
        };
        let (raw, canonical) = match a.gva {
            GvaSpec::Raw(v) => (v, false),
            GvaSpec::Indices {
                idx,
                offset,
                noncanonical,
            } => (
                from_indices(idx.map(u64::from), u64::from(offset)),
                !noncanonical,
            ),
            GvaSpec::Same { idx, offset } => {
                (from_indices([u64::from(idx); 5], u64::from(offset)), true)
            }
            GvaSpec::Entry { entry, level, rest } => {
                let level = u32::from(level % 5);
                let hit = match entries.get(entry as usize) {
                    Some(EntrySpec {
                        at: At::Offset { offset, .. },
                        ..
                    }) => Some((u64::from(*offset) & 0xfff) / esize),
                    _ => None,
                };
                let v = match hit {
                    Some(i) => {
                        let shift = 12 + b * level;
                        let m = ((1u64 << b) - 1) << shift;
                        (rest & !m) | (i << shift)
                    }
                    None => rest,
                };
                (v, true)
            }
        };
        let gva = match mode {
            PagingMode::None => raw,
            // Linear addresses are 32 bits outside IA-32e mode (the emulator truncates
            // them before the walk).
            PagingMode::Bits32 | PagingMode::Pae => raw & 0xffff_ffff,
            PagingMode::Level4 | PagingMode::Level5 if canonical => {
                let sh = if mode == PagingMode::Level5 { 7 } else { 16 };
                (((raw << sh) as i64) >> sh) as u64
            }
            PagingMode::Level4 | PagingMode::Level5 => raw,
        };
        let fetch = a.kind % 3 == 2;
        let acc = OracleAccess {
            write: a.kind % 3 == 1,
            user: a.user,
            fetch,
            implicit: a.implicit && !a.user && !fetch,
        };
        accesses.push((gva, acc));
    }

    // Memory contents.
    let mut mem = OracleMem::default();
    for &(gfn, kind) in &pages {
        match kind {
            PageKind::Rw => mem.add_page(gfn),
            PageKind::Ro => {
                mem.add_page(gfn);
                mem.read_only.insert(gfn);
            }
            PageKind::Absent => {}
        }
    }
    let in_pool = |gfn: u64| pages.iter().any(|&(g, _)| g == gfn);
    for ch in input.chains.iter().take(MAX_CHAINS) {
        let Some(&(gva, _)) = accesses.get(ch.access as usize % accesses.len().max(1)) else {
            break;
        };
        let top = match mode {
            PagingMode::None => break,
            PagingMode::Bits32 | PagingMode::Pae => 2,
            PagingMode::Level4 => 4,
            PagingMode::Level5 => 5,
        };
        let leaf = (1 + ch.leaf % 3).min(top);
        let mut table = match mode {
            PagingMode::Bits32 => (cpu.cr3 & 0xffff_f000) >> 12,
            PagingMode::Pae => (cpu.pdptrs[((gva >> 30) & 3) as usize] & ADDR_MASK_8) >> 12,
            _ => (cpu.cr3 & ADDR_MASK_8) >> 12,
        };
        for (i, level) in (leaf..=top).rev().enumerate() {
            if !in_pool(table) {
                break;
            }
            let flags = ch.flags[i];
            let mut v = PTE_P | entry_flags(flags & 0x3fff, 0);
            if flags & 0x1000 != 0 {
                v |= PTE_XD;
            }
            if level == ch.extra.0 % 5 + 1 {
                v |= ch.extra.1.bits();
            }
            let next = pool(ch.pages[i % 4]);
            if level > leaf {
                v |= next << 12;
            } else if level == 1 {
                v |= (pool(ch.frame as u8) << 12) | entry_flags(0, ch.pkey);
            } else {
                let below = bits(0, u32::from(cpu.maxphyaddr) - 1);
                let shift = match (mode, level) {
                    (_, 3) => 30,
                    (PagingMode::Bits32, _) => 22,
                    _ => 21,
                };
                let frame = (u64::from(ch.frame) << shift) & ADDR_MASK_8 & below;
                v |= PTE_PS | frame | entry_flags(0, ch.pkey);
            }
            let gpa = (table << 12) | (index(mode, gva, level) * esize);
            mem.write(gpa, esize as usize, v);
            table = next;
        }
    }
    for e in &entries {
        let v = match e.value {
            ValueSpec::Table {
                target,
                flags,
                pkey,
                extra,
            } => PTE_P | (pool(target) << 12) | entry_flags(flags, pkey) | extra.bits(),
            ValueSpec::Large {
                frame,
                gb,
                flags,
                pkey,
                extra,
            } => {
                let shift = if gb { 30 } else { 21 };
                let below = bits(0, u32::from(cpu.maxphyaddr) - 1);
                let frame = (u64::from(frame) << shift) & ADDR_MASK_8 & below;
                PTE_P | PTE_PS | frame | entry_flags(flags, pkey) | extra.bits()
            }
            ValueSpec::Absent(v) => v & !PTE_P,
            ValueSpec::Raw(v) => v,
        };
        let gva_index = |access: u8, level: u8| {
            let gva = accesses
                .get(access as usize % accesses.len().max(1))
                .map_or(0, |a| a.0);
            let level = 1 + level % mem_levels(mode);
            index(mode, gva, level) * esize
        };
        let (offsets, size): (Vec<(u64, u64)>, u64) = match e.at {
            At::Gva { access, level } => (vec![(pool(e.page), gva_index(access, level))], esize),
            At::AllPages { access, level } => {
                let off = gva_index(access, level);
                (pages.iter().map(|&(g, _)| (g, off)).collect(), esize)
            }
            At::Offset { offset, wide } => {
                let size = if wide { 8 } else { 4 };
                let off = u64::from(offset) & 0xfff & !(size - 1);
                (vec![(pool(e.page), off)], size)
            }
        };
        for (gfn, off) in offsets {
            mem.write((gfn << 12) | off, size as usize, v);
        }
    }

    Case {
        cpu,
        mode,
        pages,
        mem,
        accesses,
        memslots: input.memslots,
    }
}

fn fmt_access(a: &OracleAccess) -> String {
    let kind = if a.fetch {
        "fetch"
    } else if a.write {
        "write"
    } else {
        "read"
    };
    let who = if a.user {
        "user"
    } else if a.implicit {
        "implicit supervisor"
    } else {
        "supervisor"
    };
    format!("{who} {kind}")
}

/// The case as a human reads it: CPU state, pool pages with their non-zero words,
/// the accesses.
impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.cpu;
        writeln!(f, "mode {:?}", self.mode)?;
        let mut cr0 = Vec::new();
        for (b, n) in [(CR0_PG, "PG"), (CR0_WP, "WP")] {
            if c.cr0 & b != 0 {
                cr0.push(n);
            }
        }
        let mut cr4 = Vec::new();
        for (b, n) in [
            (CR4_PSE, "PSE"),
            (CR4_PAE, "PAE"),
            (CR4_LA57, "LA57"),
            (CR4_SMEP, "SMEP"),
            (CR4_SMAP, "SMAP"),
            (CR4_PKE, "PKE"),
        ] {
            if c.cr4 & b != 0 {
                cr4.push(n);
            }
        }
        let mut efer = Vec::new();
        for (b, n) in [(EFER_LMA, "LMA"), (EFER_NXE, "NXE")] {
            if c.efer & b != 0 {
                efer.push(n);
            }
        }
        writeln!(
            f,
            "cr0 {:#x} [{}]  cr4 {:#x} [{}]  efer {:#x} [{}]",
            c.cr0,
            cr0.join("|"),
            c.cr4,
            cr4.join("|"),
            c.efer,
            efer.join("|")
        )?;
        writeln!(
            f,
            "cr3 {:#x}  maxphyaddr {}  gbpages {}  pkru {:#x}  rflags.ac {}",
            c.cr3, c.maxphyaddr, c.gbpages, c.pkru, c.rflags_ac
        )?;
        if self.mode == PagingMode::Pae {
            writeln!(f, "pdptrs {:#x?}", c.pdptrs)?;
        }
        for &(gfn, kind) in &self.pages {
            writeln!(f, "page gfn {gfn:#x} ({kind:?})")?;
            let lo = gfn << 12;
            for (&gpa, &v) in self.mem.words.range(lo..lo + 4096) {
                writeln!(f, "    [{gpa:#x}] = {v:#018x}")?;
            }
        }
        for (i, (gva, a)) in self.accesses.iter().enumerate() {
            writeln!(f, "access #{}: {} at gva {gva:#x}", i + 1, fmt_access(a))?;
        }
        write!(f, "memslots run: {}", self.memslots)
    }
}

// ---------------------------------------------------------------- recording memory

/// One memory operation of the walker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MemOp {
    Read {
        gpa: u64,
        size: usize,
        ok: bool,
    },
    Cmpxchg {
        gpa: u64,
        size: usize,
        old: u64,
        new: u64,
        r: Result<bool, ()>,
    },
    Dirty(u64),
}

/// A bound on the operations of one walk (5 levels, 64 retries, reads and writes).
const MAX_OPS: usize = 5 * 64 * 3 + 16;

/// Wraps a guest memory, records every operation and checks it against the slot
/// layout (`layout`: which gfns are backed, which read-only).
struct Recorder<'a> {
    inner: &'a dyn GuestMem,
    layout: &'a OracleMem,
    ops: RefCell<Vec<MemOp>>,
}

impl<'a> Recorder<'a> {
    fn new(inner: &'a dyn GuestMem, layout: &'a OracleMem) -> Self {
        Recorder {
            inner,
            layout,
            ops: RefCell::new(Vec::new()),
        }
    }

    fn take(&self) -> Vec<MemOp> {
        std::mem::take(&mut *self.ops.borrow_mut())
    }

    fn push(&self, op: MemOp) {
        let mut ops = self.ops.borrow_mut();
        assert!(ops.len() < MAX_OPS, "more than {MAX_OPS} memory operations");
        ops.push(op);
    }

    fn check_read(&self, gpa: u64, size: usize, ok: bool) {
        assert!(size == 4 || size == 8, "walker read of {size} bytes");
        assert!(
            gpa.is_multiple_of(size as u64),
            "misaligned {size}-byte read at {gpa:#x}"
        );
        let backed = self.layout.is_backed(gpa);
        assert!(
            ok == backed,
            "read at {gpa:#x}: memory answered {ok}, a slot backs it: {backed}"
        );
        self.push(MemOp::Read { gpa, size, ok });
    }
}

impl GuestMem for Recorder<'_> {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let ok = self.inner.read(gpa, buf);
        self.check_read(gpa, buf.len(), ok);
        ok
    }

    fn read_gpte(&self, gpa: u64, size: usize) -> Option<u64> {
        let v = self.inner.read_gpte(gpa, size);
        self.check_read(gpa, size, v.is_some());
        v
    }

    fn cmpxchg(&self, gpa: u64, size: usize, old: u64, new: u64) -> Result<bool, ()> {
        assert!(size == 4 || size == 8, "walker cmpxchg of {size} bytes");
        assert!(
            gpa.is_multiple_of(size as u64),
            "misaligned cmpxchg at {gpa:#x}"
        );
        assert!(
            self.ops.borrow().iter().any(|op| matches!(
                *op,
                MemOp::Read { gpa: g, size: s, ok: true } if g == gpa && s == size
            )),
            "cmpxchg at {gpa:#x}, which this walk never read"
        );
        assert!(
            new & old == old && (new ^ old) & !(PTE_A | PTE_D) == 0,
            "cmpxchg at {gpa:#x} from {old:#x} to {new:#x}: more than setting A/D"
        );
        let r = self.inner.cmpxchg(gpa, size, old, new);
        let writable = self.layout.is_writable(gpa);
        assert!(
            r.is_ok() == writable,
            "cmpxchg at {gpa:#x}: {r:?}, a writable slot backs it: {writable}"
        );
        self.push(MemOp::Cmpxchg {
            gpa,
            size,
            old,
            new,
            r,
        });
        r
    }

    fn mark_dirty(&self, gfn: u64) {
        assert!(
            self.ops.borrow().iter().any(|op| matches!(
                *op,
                MemOp::Cmpxchg { gpa, r: Ok(true), .. } if gpa >> 12 == gfn
            )),
            "mark_dirty({gfn:#x}) without a successful write to that page"
        );
        self.push(MemOp::Dirty(gfn));
        self.inner.mark_dirty(gfn);
    }
}

// ---------------------------------------------------------------- memslots

/// The pool's backed pages in one `HostRegion`, mapped by one slot per run of
/// consecutive gfns of the same kind (so that slots of several pages and host
/// offsets other than 0 occur).
struct SlotMem {
    slots: MemSlots,
    host: Option<Arc<HostRegion>>,
    /// (gfn, offset in the host region) of every backed page.
    pages: Vec<(u64, usize)>,
}

fn build_slots(case: &Case) -> SlotMem {
    let mut backed: Vec<(u64, bool)> = case
        .pages
        .iter()
        .filter(|p| p.1 != PageKind::Absent)
        .map(|&(gfn, kind)| (gfn, kind == PageKind::Ro))
        .collect();
    backed.sort_unstable();
    let mut slots = MemSlots::new();
    if backed.is_empty() {
        return SlotMem {
            slots,
            host: None,
            pages: Vec::new(),
        };
    }
    let host = HostRegion::new(backed.len() as u64 * 4096).expect("HostRegion::new");
    let mut pages = Vec::new();
    for (i, &(gfn, _)) in backed.iter().enumerate() {
        let off = i * 4096;
        for w in 0..512u64 {
            let gpa = (gfn << 12) + 8 * w;
            if let Some(&v) = case.mem.words.get(&gpa) {
                host.write(off + 8 * w as usize, &v.to_le_bytes())
                    .expect("host write");
            }
        }
        pages.push((gfn, off));
    }
    let mut start = 0;
    let mut id = 0;
    while start < backed.len() {
        let mut end = start + 1;
        while end < backed.len()
            && backed[end].0 == backed[end - 1].0 + 1
            && backed[end].1 == backed[start].1
        {
            end += 1;
        }
        let r = kvm_userspace_memory_region2 {
            slot: id,
            flags: if backed[start].1 { KVM_MEM_READONLY } else { 0 },
            guest_phys_addr: backed[start].0 << 12,
            memory_size: (end - start) as u64 * 4096,
            userspace_addr: host.addr() + start as u64 * 4096,
            ..Default::default()
        };
        slots
            .set_region(&r, RegionIoctl::V1, |h, l| {
                HostRegion::lookup(h, l).ok_or(Errno::EFAULT)
            })
            .unwrap_or_else(|e| panic!("set_region {r:x?}: {e:?}"));
        id += 1;
        start = end;
    }
    if let Err(e) = slots.check_invariants() {
        panic!("memslots: {e}");
    }
    SlotMem {
        slots,
        host: Some(host),
        pages,
    }
}

/// The words of the slot-backed memory that differ from `mem`.
fn slot_mem_diff(sm: &SlotMem, mem: &OracleMem) -> String {
    let mut s = String::new();
    let Some(host) = &sm.host else {
        return s;
    };
    let mut buf = [0u8; 4096];
    for &(gfn, off) in &sm.pages {
        host.read(off, &mut buf).expect("host read");
        for (w, chunk) in buf.chunks_exact(8).enumerate() {
            let gpa = (gfn << 12) + 8 * w as u64;
            let got = u64::from_le_bytes(chunk.try_into().unwrap());
            let want = mem.words.get(&gpa).copied().unwrap_or(0);
            if got != want {
                let _ = write!(s, " [{gpa:#x}] memslots {got:#x}, TestMem {want:#x};");
            }
        }
    }
    s
}

// ---------------------------------------------------------------- the checks

/// Checks of a successful walk against itself and the memory: every in-memory entry
/// it reports was read, the protection key and the dirty flag are the leaf's.
fn check_walk(case: &Case, w: &Walk, ops: &[MemOp], after: &OracleMem) -> String {
    let mut s = String::new();
    if case.mode == PagingMode::None {
        return s;
    }
    let esize = entry_size(case.mode) as usize;
    for &(level, gpa, _) in w.gptes.iter() {
        if case.mode == PagingMode::Pae && level == 3 {
            continue; // a register
        }
        let read = ops.iter().any(
            |op| matches!(*op, MemOp::Read { gpa: g, size, ok: true } if g == gpa && size == esize),
        );
        if !read {
            let _ = write!(s, " reported entry L{level}@{gpa:#x} was never read;");
        }
    }
    let Some(&(_, leaf_gpa, leaf)) = w.gptes.last() else {
        let _ = write!(s, " no entries reported for a paged walk;");
        return s;
    };
    let long = matches!(case.mode, PagingMode::Level4 | PagingMode::Level5);
    let pkey = if long && case.cpu.cr4 & CR4_PKE != 0 {
        ((leaf >> 59) & 0xf) as u8
    } else {
        0
    };
    if w.pkey != pkey {
        let _ = write!(s, " pkey {} but the leaf {leaf:#x} says {pkey};", w.pkey);
    }
    let d = after.read(leaf_gpa, esize).unwrap_or(0) & PTE_D != 0;
    if w.dirty != d {
        let _ = write!(s, " dirty {} but the leaf's D in memory is {d};", w.dirty);
    }
    s
}

fn verbose() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    *V.get_or_init(|| std::env::var_os("WALK_FUZZ_VERBOSE").is_some())
}

fn fail(case: &Case, i: usize, what: &str) -> ! {
    panic!("access #{}: {what}\n---- the case\n{case}", i + 1)
}

fn run(case: &Case) {
    if verbose() {
        eprintln!("---- case\n{case}");
    }
    let ctx = to_walk_ctx(&case.cpu);
    let mmu = GuestMmu::new(&ctx);
    let paging_off = case.mode == PagingMode::None;
    let fail = |i: usize, what: &str| fail(case, i, what);

    let tmem = TestMem::new(&case.mem);
    let trec = Recorder::new(&tmem, &case.mem);
    let mut omem = case.mem.clone();
    let smem = case.memslots.then(|| build_slots(case));
    let srec = smem.as_ref().map(|s| Recorder::new(&s.slots, &case.mem));

    for (i, &(gva, acc)) in case.accesses.iter().enumerate() {
        let exp = observe_oracle(&case.cpu, &omem, gva, acc);
        let r = walk(&ctx, &trec, gva, to_access(acc));
        let ops = trec.take();
        let (writes, dirty) = tmem.take_log();
        let got = Observed {
            outcome: to_outcome(&r),
            mem_after: tmem.snapshot(),
            writes,
            dirty: dirty.into_iter().collect::<BTreeSet<u64>>(),
        };
        if verbose() {
            eprintln!(
                "access #{}: {} at {gva:#x}: walker {}, oracle {}, {} memory ops, \
                 {} A/D writes{}",
                i + 1,
                fmt_access(&acc),
                fmt_outcome(&got.outcome),
                fmt_outcome(&exp.outcome),
                ops.len(),
                got.writes.len(),
                if has_aliases(&exp.outcome) {
                    ", aliased"
                } else {
                    ""
                }
            );
        }
        let aliased = has_aliases(&exp.outcome);
        let opts = CompareOpts {
            exact_writes: !aliased,
            gptes_modulo_ad: aliased,
        };
        let d = diff(paging_off, &exp, &got, opts);
        if !d.is_empty() {
            fail(
                i,
                &format!(
                    "walker and oracle disagree on {} at {gva:#x}:{d}",
                    fmt_access(&acc)
                ),
            );
        }
        if let Ok(w) = &r {
            let d = check_walk(case, w, &ops, &got.mem_after);
            if !d.is_empty() {
                fail(i, &format!("walk {w:x?}:{d}"));
            }
        }

        if let (Some(sm), Some(srec)) = (&smem, &srec) {
            let rs = mmu.walk(srec, gva, to_access(acc));
            let sops = srec.take();
            if rs != r {
                fail(i, &format!("memslots walk {rs:x?}, TestMem walk {r:x?}"));
            }
            if sops != ops {
                fail(
                    i,
                    &format!(
                        "memory operations differ:\n  memslots {sops:x?}\n  TestMem  {ops:x?}"
                    ),
                );
            }
            let d = slot_mem_diff(sm, &got.mem_after);
            if !d.is_empty() {
                fail(i, &format!("memory after differs:{d}"));
            }
        }
        omem = exp.mem_after;
    }
}

fuzz_target!(|input: Input| {
    let case = decode(&input);
    run(&case);
});
