//! Fuzz target `mmu_ops`: sequences of guest and host events on a small simulated
//! guest, run through the shadow MMU, with the MMU audit after every step.
//!
//! Each input is decoded (with `arbitrary`) into a paging mode (none, 32-bit, PAE,
//! 4- or 5-level), the guest's initial page tables (built host-side before the guest
//! runs: three address spaces; data mappings at chosen gvas with chosen levels,
//! flags and targets, some repeated up to 64 times at a 4 KiB to 512 GiB stride;
//! entries shared between address spaces; and an alias that maps the 2 MiB table
//! area supervisor-writable at ALIAS_GVA, shared by all address spaces) and up to
//! 256 operations:
//!
//! - page-table writes made by the guest through the alias (a native store, so they
//!   meet the MMU: write protection and emulation, unsync pages, write flooding):
//!   a whole gpte at an entry on the current path of a gva, or 1/2/4/8 bytes at any
//!   offset of the table area, with a new leaf, a new table, flipped flag bits, a
//!   copy of another entry, zero or raw bits;
//! - guest reads, writes and fetches of 1 to 16 bytes at CPL0 or CPL3 (or implicit
//!   supervisor accesses) at the mapped gvas, the alias, some unmapped ones and
//!   raw gvas, and sweeps over a repeated mapping;
//! - INVLPG, a guest TLB flush, MOV CR3 among the roots and to bad values (no
//!   memslot, a data page, the next 32 bytes), CR0.WP, CR4.PSE/SMEP/SMAP/PGE,
//!   EFER.NX and EFLAGS.AC toggles;
//! - a second memslot (fresh host memory, read-only and dirty-logged variants)
//!   created, moved and deleted; slot 0 deleted and re-created (also read-only or
//!   dirty-logged); KVM_SET_NR_MMU_PAGES between 64 and 200 (reclaim); THP on and
//!   off for either region.
//!
//! After every operation `Vm::audit` must pass. Every access that stays within one
//! page is also checked against a walk of the guest's tables made just before it
//! (the walker on the same memslots, with A/D updates suppressed):
//! - the model faults iff that walk faults, with the same fault, unless the walk
//!   faults and the guest's TLB may be stale (below), when the access may complete;
//! - while the guest's TLB is known to be coherent for the gva, a completed read
//!   returns the bytes in guest memory at the walk's gpa, a completed write put its
//!   bytes there, and an MMIO exit names that gpa. Coherent means: no guest write
//!   since the last event after which KVM's SPTEs match the guest's tables (MOV CR3,
//!   a guest TLB flush, CR0.WP or CR4.SMEP/SMAP/PGE changes, a memslot delete or
//!   move), or an INVLPG of that page since the last write; and no change of
//!   EFER.NX or CR4.PSE since the last zap of everything (a memslot delete or move):
//!   those change how gptes read without changing the shadow-page role, so KVM keeps
//!   SPTEs made under the old rule, even across MOV CR3. Between a guest write and
//!   the next such event the SPTEs are a TLB that may hold old translations.
//!
//! Data pages are filled with distinct even 32-bit words (not-present as gptes), so a
//! read from a wrong gpa shows. Livelock (`EAGAIN` from 32 faults in one access) is
//! only accepted with KVM's dummy root (CR3 outside every memslot); no dirty ring is
//! enabled, so `DirtyRingFull` is a failure.
//!
//! `MMU_FUZZ_VERBOSE=1` prints the decoded input, each step and the VM and vCPU
//! counters at the end. `MMU_FUZZ_KNOWN` (`|`-separated) lets a run go past bugs
//! already reported: any substring of a failure message skips that failure, and
//! `pae-pdptr` (PAE roots kept when MOV CR0/CR3/CR4 reloads other PDPTEs) and
//! `pse-audit` (the audit reads PS in 32-bit PDEs with CR4.PSE=0) avoid those two.

#![no_main]

use std::collections::HashSet;
use std::sync::Arc;

use arbitrary::Arbitrary;
use kvmmmu_core::errno::Errno;
use kvmmmu_core::hostmem::HostRegion;
use kvmmmu_core::memslot::{MemSlots, RegionIoctl};
use kvmmmu_core::mmu::context::RootHpa;
use kvmmmu_core::paging::{Access, GuestMem, GuestMmu, PagingMode, Walk, WalkError};
use kvmmmu_core::stats::{VCPU_STATS, VM_STATS};
use kvmmmu_core::testkit::TestGuest;
use kvmmmu_core::uaccess::ProcessVm;
use kvmmmu_core::uapi::{
    self, kvm_userspace_memory_region2, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY,
};
use kvmmmu_core::vcpu::guest_ops::{AccessKind, AccessOutcome, ControlReg};
use kvmmmu_core::vcpu::sregs::{CR0_WP, CR4_PGE, CR4_PSE, CR4_SMAP, CR4_SMEP, EFER_NXE, RFLAGS_AC};
use libfuzzer_sys::fuzz_target;

// ---------------------------------------------------------------- the guest

const MEM: u64 = 8 << 20;
/// Data pages: 64 pages from gpa 1 MiB, filled with a pattern (the rest of guest
/// memory below the table area is zero).
const DATA_BASE: u64 = 1 << 20;
const DATA_PAGES: u64 = 64;
/// The table area: the top 2 MiB, where the test kit allocates page tables downwards.
const TABLE_BASE: u64 = 6 << 20;
/// The table area is mapped 4 KiB, supervisor read/write, at ALIAS_GVA.
const ALIAS_GVA: u64 = 0xc000_0000;
const ROOTS: usize = 3;
const MAX_MAPS: usize = 24;
const MAX_SHARES: usize = 4;
const MAX_OPS: usize = 256;

const P: u64 = 1;
const W: u64 = 1 << 1;
const U: u64 = 1 << 2;
const PWT: u64 = 1 << 3;
const PCD: u64 = 1 << 4;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const G: u64 = 1 << 8;
const NX: u64 = 1 << 63;

/// Region bases for gvas (the low 32 bits work in every mode; the rest need long
/// mode, and some are canonical only with LA57).
const GVA_BASES: &[u64] = &[
    0x0000_0000,
    0x0040_0000,
    0x0080_0000,
    0x4000_0000,
    0x7fc0_0000,
    0xbfc0_0000,
    0xc040_0000,
    0xffc0_0000,
    0x0000_7fff_ffc0_0000,
    0xffff_8000_0000_0000,
    0xffff_ffff_ffc0_0000,
    0x0000_8000_0000_0000,
    0xff00_0000_0000_0000,
    0x0100_0000_0000_0000,
];

/// Gpas with no memory (until the second slot lands there) and where it may go.
const FAR_GPAS: &[u64] = &[
    MEM,
    16 << 20,
    0xfee0_0000,
    0x1_0000_0000,
    0xf_ffff_f000,
    0x40_0000_0000,
];
const SLOT1_GPAS: &[u64] = &[MEM, 16 << 20, 0x1_0000_0000, 0xc000_0000, 2 << 20, 0];

#[derive(Arbitrary, Clone, Copy, Debug)]
enum Mode {
    None,
    Bits32,
    Pae,
    Long4,
    Long5,
}

impl Mode {
    fn paging(self) -> PagingMode {
        match self {
            Mode::None => PagingMode::None,
            Mode::Bits32 => PagingMode::Bits32,
            Mode::Pae => PagingMode::Pae,
            Mode::Long4 => PagingMode::Long4,
            Mode::Long5 => PagingMode::Long5,
        }
    }
}

#[derive(Arbitrary, Clone, Copy, Debug)]
enum GvaPick {
    Region { base: u8, page: u16 },
    Raw(u64),
}

#[derive(Arbitrary, Clone, Copy, Debug)]
enum GpaPick {
    Data(u16),
    /// A page of the table area (the tables themselves, or free ones).
    Table(u16),
    Far(u8),
    /// Inside the second slot's usual places.
    Slot1 {
        at: u8,
        page: u8,
    },
    Raw(u64),
}

/// Flag bits for a gpte (P is implied unless `not present` is asked).
#[derive(Arbitrary, Clone, Copy, Debug)]
struct Flags(u16);

impl Flags {
    fn bits(self, wide: bool) -> u64 {
        let f = self.0;
        let mut v = P;
        for (bit, flag) in [(0, W), (1, U), (2, PWT), (3, PCD), (4, A), (5, D), (7, G)] {
            if f & (1 << bit) != 0 {
                v |= flag;
            }
        }
        if wide && f & (1 << 8) != 0 {
            v |= NX;
        }
        if f & (1 << 9) != 0 {
            v &= !P;
        }
        if f & (1 << 10) != 0 {
            // A reserved bit: above MAXPHYADDR (wide) or bit 21 of a 4 MiB PDE.
            v |= if wide { 1 << 51 } else { 1 << 21 };
        }
        if f & (1 << 11) != 0 {
            v |= 0xe00; // the ignored bits 9-11
        }
        if wide && f & (1 << 12) != 0 {
            v |= 0x3 << 59; // protection key 3
        }
        v
    }
}

#[derive(Arbitrary, Clone, Copy, Debug)]
struct MapSpec {
    gva: GvaPick,
    /// 1 = 4 KiB, 2 = 2/4 MiB, 3 = 1 GiB (long mode); clamped per mode.
    level: u8,
    to: GpaPick,
    flags: Flags,
    /// Bit i: map in address space i (0: in all).
    roots: u8,
    /// Map `1 + n % 64` gvas `stride` apart (4 KiB, 2 MiB, 1 GiB, 512 GiB), to the
    /// next pages or (odd `n`) all to the same page: many shadow pages, long rmaps.
    repeat: Option<(u8, u8)>,
}

/// Make two address spaces share the table below an entry.
#[derive(Arbitrary, Clone, Copy, Debug)]
struct Share {
    from: u8,
    to: u8,
    gva: GvaPick,
    level: u8,
}

#[derive(Arbitrary, Clone, Copy, Debug)]
enum EntryPick {
    /// The entry at `level` on the path of gva number `gva` under root `root`, or
    /// where that path ends now.
    Path { gva: u8, level: u8, root: u8 },
    /// Any byte of the table area.
    Offset(u32),
}

#[derive(Arbitrary, Clone, Copy, Debug)]
enum Value {
    Zero,
    Leaf {
        to: GpaPick,
        flags: Flags,
        large: bool,
    },
    Table {
        page: u16,
        flags: Flags,
    },
    Flip(u16),
    Copy(EntryPick),
    Raw(u64),
}

#[derive(Arbitrary, Clone, Copy, Debug)]
enum Op {
    /// A gpte written by the guest through the alias: the whole entry, or `size`
    /// (1, 2, 4, 8) bytes of the value at `delta` (0..7) bytes past the entry.
    WriteGpte {
        at: EntryPick,
        value: Value,
        partial: Option<(u8, u8)>,
    },
    Access {
        gva: u8,
        off: u16,
        size: u8,
        kind: u8,
        data: u64,
    },
    AccessRaw {
        gva: u64,
        size: u8,
        kind: u8,
    },
    /// An 8-byte access to every gva of a repeated mapping.
    Sweep {
        run: u8,
        kind: u8,
    },
    Invlpg(u8),
    FlushTlb,
    MovCr3(u8),
    ToggleWp,
    ToggleCr4(u8),
    ToggleNx,
    ToggleAc,
    Slot1Create {
        at: u8,
        pages: u16,
        flags: u8,
    },
    Slot1Move(u8),
    Slot1Delete,
    Slot0Reinstall {
        flags: u8,
    },
    NrMmuPages(u8),
    Thp {
        slot1: bool,
        on: bool,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    mode: Mode,
    alias_accessed: bool,
    maps: Vec<MapSpec>,
    shares: Vec<Share>,
    ops: Vec<Op>,
}

// ---------------------------------------------------------------- the checker's walk

/// The memslots as the walker sees them, but A/D updates are not written: a walk
/// that says what the guest's tables translate to now without changing them.
struct NoAdMem<'a>(&'a MemSlots);

impl GuestMem for NoAdMem<'_> {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        self.0.read(gpa, buf)
    }
    fn read_gpte(&self, gpa: u64, size: usize) -> Option<u64> {
        self.0.read_gpte(gpa, size)
    }
    fn cmpxchg(&self, gpa: u64, size: usize, _old: u64, _new: u64) -> Result<bool, ()> {
        // Where the real update would fail (no slot, read-only), fail the same way.
        let mut b = [0u8; 8];
        match self.0.lookup(gpa >> 12) {
            Some(s) if !s.readonly() && self.0.read(gpa, &mut b[..size]) => Ok(true),
            _ => Err(()),
        }
    }
}

/// Which translations the guest's TLB must hold fresh (see the module comment).
#[derive(Debug)]
struct Tlb {
    all: bool,
    pages: HashSet<u64>,
    /// EFER.NX or CR4.PSE changed: they change how gptes read but are not in the
    /// shadow-page role (KVM forces role.efer_nx, and PSE is only in the extended
    /// role), so KVM keeps using SPTEs made under the old rule, even across MOV CR3,
    /// until the pages are zapped. Nothing is fresh until a zap of everything.
    reinterpreted: bool,
}

impl Tlb {
    fn fresh(&self, gva: u64) -> bool {
        !self.reinterpreted && (self.all || self.pages.contains(&(gva >> 12)))
    }
    fn flushed(&mut self) {
        self.all = true;
        self.pages.clear();
    }
    fn stale(&mut self) {
        self.all = false;
        self.pages.clear();
    }
    fn zapped_all(&mut self) {
        self.reinterpreted = false;
        self.flushed();
    }
}

struct Slot1 {
    host: Arc<HostRegion>,
    gpa: u64,
    size: u64,
    flags: u32,
}

struct Fuzz {
    g: TestGuest,
    mode: PagingMode,
    roots: Vec<u64>,
    gvas: Vec<u64>,
    /// Repeated mappings: (first gva, stride, count).
    runs: Vec<(u64, u64, u64)>,
    slot1: Option<Slot1>,
    slot0_flags: u32,
    tlb: Tlb,
    verbose: bool,
    known: Vec<String>,
    /// Accesses checked against the walk: [fault, completed and fresh, completed stale].
    checked: [u64; 3],
}

fn page_size(mode: PagingMode, level: u8) -> u64 {
    match (mode, level) {
        (_, 1) => 4096,
        (PagingMode::Bits32, _) => 4 << 20,
        (_, 2) => 2 << 20,
        _ => 1 << 30,
    }
}

/// Distinct even 32-bit words (never a present gpte) for `len` bytes of host
/// memory at `off`.
fn pattern(host: &HostRegion, off: usize, len: usize, tag: u64) {
    let words: Vec<u32> = (0..len / 4)
        .map(|i| (((tag + (off + 4 * i) as u64) >> 1) as u32) & !1)
        .collect();
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    host.write(off, &bytes).expect("inside the region");
}

impl Fuzz {
    fn new(input: &Input) -> Option<Fuzz> {
        let mode = input.mode.paging();
        let mut g = TestGuest::new(mode, MEM).expect("a small guest");
        pattern(&g.host, DATA_BASE as usize, (DATA_PAGES * 4096) as usize, 0);
        let mut roots = vec![g.cr3()];
        if mode != PagingMode::None {
            for _ in 1..ROOTS {
                roots.push(g.new_root());
            }
            let a = if input.alias_accessed { A | D } else { 0 };
            for k in 0..512 {
                g.map(
                    roots[0],
                    ALIAS_GVA + k * 4096,
                    TABLE_BASE + k * 4096,
                    1,
                    P | W | a,
                );
            }
            let pde = g.entry_gpa(roots[0], ALIAS_GVA, 2);
            let v = g.read_gpte(pde);
            for &r in &roots[1..] {
                let e = g.entry_gpa(r, ALIAS_GVA, 2);
                g.write_gpte(e, v);
            }
        }
        let mut f = Fuzz {
            g,
            mode,
            roots,
            gvas: Vec::new(),
            runs: Vec::new(),
            slot1: None,
            slot0_flags: 0,
            tlb: Tlb {
                all: true,
                pages: HashSet::new(),
                reinterpreted: false,
            },
            verbose: std::env::var_os("MMU_FUZZ_VERBOSE").is_some(),
            known: std::env::var("MMU_FUZZ_KNOWN")
                .map(|v| {
                    v.split('|')
                        .filter(|k| !k.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default(),
            checked: [0; 3],
        };
        for m in input.maps.iter().take(MAX_MAPS) {
            f.setup_map(m)?;
        }
        if mode != PagingMode::None {
            for s in input.shares.iter().take(MAX_SHARES) {
                f.setup_share(s)?;
            }
        }
        if f.g.tables_start() < TABLE_BASE {
            return None;
        }
        f.g.reload_pdptrs();
        // Accesses go to the mapped gvas, the alias of the tables, and a few others.
        for k in [0u64, 1, 255, 511] {
            f.gvas.push(f.alias_base() + k * 4096);
        }
        for &r in &f.roots {
            if let Some(a) = f.alias_of(r) {
                f.gvas.push(a);
            }
        }
        f.gvas
            .extend([0, 0x1000, 0xdead_b000, 0x0000_8000_0000_0000]);
        f.gvas.dedup();
        Some(f)
    }

    fn wide(&self) -> bool {
        self.mode != PagingMode::Bits32
    }

    fn long(&self) -> bool {
        matches!(self.mode, PagingMode::Long4 | PagingMode::Long5)
    }

    fn alias_base(&self) -> u64 {
        if self.mode == PagingMode::None {
            TABLE_BASE
        } else {
            ALIAS_GVA
        }
    }

    /// The gva through which the guest writes gpa (the alias; identity without paging).
    fn alias_of(&self, gpa: u64) -> Option<u64> {
        if self.mode == PagingMode::None {
            return Some(gpa);
        }
        (TABLE_BASE..MEM)
            .contains(&gpa)
            .then(|| ALIAS_GVA + (gpa - TABLE_BASE))
    }

    fn gva(&self, p: GvaPick) -> u64 {
        self.mask_gva(match p {
            GvaPick::Region { base, page } => {
                GVA_BASES[base as usize % GVA_BASES.len()] + u64::from(page % 1024) * 4096
            }
            GvaPick::Raw(v) => v & !0xfff,
        })
    }

    fn mask_gva(&self, v: u64) -> u64 {
        if self.long() {
            v
        } else {
            v & 0xffff_ffff
        }
    }

    fn gpa(&self, p: GpaPick) -> u64 {
        match p {
            GpaPick::Data(i) => DATA_BASE + (u64::from(i) % DATA_PAGES) * 4096,
            GpaPick::Table(i) => {
                // Mostly a page the kit really used for tables.
                let used = (MEM - self.g.tables_start()) >> 12;
                if i & 0x8000 == 0 && used > 0 {
                    self.g.tables_start() + (u64::from(i) % used) * 4096
                } else {
                    TABLE_BASE + (u64::from(i) % 512) * 4096
                }
            }
            GpaPick::Far(i) => FAR_GPAS[i as usize % FAR_GPAS.len()],
            GpaPick::Slot1 { at, page } => {
                SLOT1_GPAS[at as usize % SLOT1_GPAS.len()] + u64::from(page) * 4096
            }
            GpaPick::Raw(v) => v & 0x000f_ffff_ffff_f000,
        }
    }

    fn max_level(&self) -> u8 {
        match self.mode {
            PagingMode::None => 0,
            PagingMode::Bits32 | PagingMode::Pae => 2,
            PagingMode::Long4 | PagingMode::Long5 => 3,
        }
    }

    fn root_level(&self) -> u8 {
        self.mode.root_level()
    }

    /// Whether a leaf at `level` for `gva` would replace the alias's tables.
    fn covers_alias(&self, gva: u64, level: u8) -> bool {
        let span = page_size(self.mode, level);
        gva & !(span - 1) == ALIAS_GVA & !(span - 1)
    }

    fn setup_map(&mut self, m: &MapSpec) -> Option<()> {
        let gva = self.gva(m.gva);
        self.gvas.push(gva);
        if self.mode == PagingMode::None {
            return Some(());
        }
        let level = (m.level % 3 + 1).min(self.max_level());
        if level > 1 && self.covers_alias(gva, level) {
            return Some(());
        }
        let mut gpa = self.gpa(m.to);
        let flags = m.flags.bits(self.wide());
        if flags & ((1 << 51) | (1 << 21)) == 0 {
            gpa &= !(page_size(self.mode, level) - 1);
        }
        if !self.wide() {
            gpa &= 0xffff_f000;
        }
        let (count, stride, same) = match m.repeat {
            None => (1, 0, true),
            Some((n, s)) => {
                let stride = [0x1000u64, 0x20_0000, 0x4000_0000, 0x80_0000_0000][s as usize % 4];
                (1 + u64::from(n % 64), stride, n & 1 != 0)
            }
        };
        if count > 1 {
            self.runs.push((gva, stride, count));
        }
        for k in 0..count {
            let gva = self.mask_gva(gva.wrapping_add(k * stride));
            if level > 1 && self.covers_alias(gva, level) {
                continue;
            }
            let gpa = if same {
                gpa
            } else {
                gpa + k * page_size(self.mode, level)
            };
            for (i, &r) in self.roots.clone().iter().enumerate() {
                if m.roots == 0 || m.roots & (1 << i) != 0 {
                    if self.g.tables_start() < TABLE_BASE + 0x1_0000 {
                        return None;
                    }
                    self.g.map(r, gva, gpa, level, flags);
                }
            }
        }
        Some(())
    }

    fn setup_share(&mut self, s: &Share) -> Option<()> {
        let from = self.roots[s.from as usize % ROOTS];
        let to = self.roots[s.to as usize % ROOTS];
        let gva = self.gva(s.gva);
        let level = 2 + s.level % (self.root_level() - 1);
        if self.g.tables_start() < TABLE_BASE + 0x1_0000 {
            return Some(());
        }
        let e = self.g.entry_gpa(from, gva, level);
        let v = self.g.read_gpte(e);
        let e2 = self.g.entry_gpa(to, gva, level);
        self.g.write_gpte(e2, v);
        Some(())
    }

    fn read_gpte(&self, gpa: u64) -> Option<u64> {
        let size = if self.wide() { 8 } else { 4 };
        if gpa.checked_add(size)? > MEM {
            return None;
        }
        Some(self.g.read_gpte(gpa))
    }

    /// The gpa of the entry at `level` on the path of `gva` under `cr3` in the
    /// guest's tables as they are now (read-only), or of the entry where it ends.
    fn path_entry(&self, cr3: u64, gva: u64, level: u8) -> Option<u64> {
        let (bits, size, mask) = match self.mode {
            PagingMode::None => return None,
            PagingMode::Bits32 => (10u32, 4u64, 0xffff_f000u64),
            _ => (9, 8, 0x000f_ffff_ffff_f000),
        };
        let mut table = if self.mode == PagingMode::Pae {
            cr3 & 0xffff_ffe0
        } else {
            cr3 & mask
        };
        let mut l = self.root_level();
        loop {
            let index = (gva >> (12 + bits * u32::from(l - 1))) & ((1 << bits) - 1);
            let index = if self.mode == PagingMode::Pae && l == 3 {
                index & 3
            } else {
                index
            };
            let e = table + index * size;
            let v = self.read_gpte(e)?;
            let next = v & mask;
            if l <= level || l == 1 || v & P == 0 || (v & PS != 0 && l <= 3) || next >= MEM {
                return Some(e);
            }
            table = next;
            l -= 1;
        }
    }

    fn entry(&self, p: EntryPick) -> Option<u64> {
        match p {
            EntryPick::Path { gva, level, root } => {
                let gva = self.gvas[gva as usize % self.gvas.len()];
                let cr3 = self.roots[root as usize % self.roots.len()];
                let level = 1 + level % self.root_level().max(1);
                self.path_entry(cr3, gva, level)
            }
            EntryPick::Offset(o) => Some(TABLE_BASE + u64::from(o) % (MEM - TABLE_BASE)),
        }
    }

    fn value(&self, at: u64, v: Value) -> u64 {
        let wide = self.wide();
        let addr_mask = if wide {
            0x000f_ffff_ffff_f000
        } else {
            0xffff_f000
        };
        match v {
            Value::Zero => 0,
            Value::Leaf { to, flags, large } => {
                let ps = if large { PS } else { 0 };
                (self.gpa(to) & addr_mask) | flags.bits(wide) | ps
            }
            Value::Table { page, flags } => {
                (self.gpa(GpaPick::Table(page)) & addr_mask) | (flags.bits(wide) & !PS)
            }
            Value::Flip(bits) => {
                let cur = self
                    .read_gpte(at & !(if wide { 7 } else { 3 }))
                    .unwrap_or(0);
                let mut m = 0;
                for (bit, flag) in [(0, P), (1, W), (2, U), (3, A), (4, D), (5, PS), (6, G)] {
                    if bits & (1 << bit) != 0 {
                        m |= flag;
                    }
                }
                if wide && bits & (1 << 7) != 0 {
                    m |= NX;
                }
                if bits & (1 << 8) != 0 {
                    m |= 1 << 12; // the lowest address bit (PAT in a large page)
                }
                cur ^ m
            }
            Value::Copy(p) => self
                .entry(p)
                .and_then(|e| self.read_gpte(e & !(if wide { 7 } else { 3 })))
                .unwrap_or(0),
            Value::Raw(v) => v,
        }
    }

    fn log(&self, msg: std::fmt::Arguments<'_>) {
        if self.verbose {
            eprintln!("{msg}");
        }
    }

    fn audit(&self, step: usize, op: &Op) {
        if let Err(e) = self.g.audit() {
            self.fail(format!(
                "audit failed after op {step} {op:?} ({:?} guest): {e}",
                self.mode
            ));
        }
    }

    /// A failed check: a panic, unless `MMU_FUZZ_KNOWN` (substrings separated by
    /// `|`) names it, to explore past a bug that is already reported.
    fn fail(&self, msg: String) {
        if self.known.iter().any(|k| msg.contains(k.as_str())) {
            self.log(format_args!("  known issue: {msg}"));
            return;
        }
        panic!("{msg}");
    }

    fn dummy_root(&self) -> bool {
        self.g.vcpu.state().mmu.root.hpa == RootHpa::Dummy
    }

    /// One guest access with the checks of the module comment.
    fn access(&mut self, gva: u64, buf: &mut [u8], kind: AccessKind) -> Option<AccessOutcome> {
        let ctx = self.g.vcpu.state().walk_ctx();
        let mode = ctx.mode();
        let gva = if mode.is_long() {
            gva
        } else {
            gva & 0xffff_ffff
        };
        let one_page = (gva & 0xfff) as usize + buf.len() <= 4096;
        let fresh = self.mode == PagingMode::None || self.tlb.fresh(gva);
        let access = Access {
            write: kind.write,
            user: kind.user,
            fetch: kind.fetch,
            implicit: kind.implicit,
        };
        let before: Option<Result<Walk, WalkError>> = one_page.then(|| {
            let st = self.g.vm.state();
            GuestMmu::new(&ctx).walk(&NoAdMem(&st.memslots), gva, access)
        });
        let data = buf.to_vec();
        let r = self.g.vcpu.guest_access(gva, buf, kind);
        if kind.write && mode != PagingMode::None {
            self.tlb.stale();
        }
        let out = match r {
            Ok(o) => o,
            Err(Errno::EAGAIN) if self.dummy_root() => return None,
            Err(e) => panic!("guest access {kind:?} at {gva:#x}: {e:?} ({mode:?})"),
        };
        self.log(format_args!(
            "  access {kind:?} {gva:#x} len {} -> {out:?}, walk {before:?}, fresh {fresh}",
            buf.len()
        ));
        let Some(before) = before else {
            return Some(out);
        };
        self.checked[match out {
            AccessOutcome::Fault(_) | AccessOutcome::DirtyRingFull => 0,
            _ if fresh => 1,
            _ => 2,
        }] += 1;
        let what = || {
            format!(
                "{kind:?} access of {} bytes at {gva:#x} ({mode:?})",
                buf.len()
            )
        };
        match (out, before) {
            (AccessOutcome::Fault(e), Err(w)) => {
                if e != w {
                    self.fail(format!(
                        "{}: fault {e:x?}, but the walk says {w:x?}",
                        what()
                    ));
                }
            }
            (AccessOutcome::Fault(e), Ok(w)) => self.fail(format!(
                "{}: fault {e:x?} but the tables translate: {w:x?}",
                what()
            )),
            (AccessOutcome::DirtyRingFull, _) => {
                self.fail(format!("{}: DirtyRingFull without a dirty ring", what()))
            }
            (_, Err(w)) => {
                if fresh {
                    self.fail(format!(
                        "{}: completed ({out:?}) with a coherent TLB, but the tables fault: {w:x?}",
                        what()
                    ));
                }
            }
            (AccessOutcome::Done, Ok(w)) => {
                let gpa = if mode == PagingMode::None { gva } else { w.gpa };
                if fresh {
                    let st = self.g.vm.state();
                    let mut mem = vec![0u8; buf.len()];
                    let backed = st.memslots.read(gpa, &mut mem);
                    let ro = st.memslots.lookup(gpa >> 12).is_some_and(|s| s.readonly());
                    drop(st);
                    if !backed {
                        self.fail(format!("{}: completed, but no memory at {gpa:#x}", what()));
                    } else if kind.write && ro {
                        self.fail(format!("{}: wrote read-only memory at {gpa:#x}", what()));
                    } else if kind.write && mem != data {
                        self.fail(format!(
                            "{}: wrote {data:02x?} but memory at the walk's gpa {gpa:#x} holds {mem:02x?}",
                            what()
                        ));
                    } else if !kind.write && mem[..] != buf[..] {
                        self.fail(format!(
                            "{}: read {buf:02x?} but memory at the walk's gpa {gpa:#x} holds {mem:02x?}",
                            what()
                        ));
                    }
                }
            }
            (AccessOutcome::Mmio { gpa }, Ok(w)) => {
                let wgpa = if mode == PagingMode::None { gva } else { w.gpa };
                if fresh && gpa != wgpa {
                    self.fail(format!(
                        "{}: MMIO exit at {gpa:#x}, the walk says {wgpa:#x}",
                        what()
                    ));
                }
                let st = self.g.vm.state();
                let backed = match st.memslots.lookup(gpa >> 12) {
                    None => false,
                    Some(s) => !(kind.write && s.readonly()),
                };
                drop(st);
                if backed {
                    self.fail(format!(
                        "{}: MMIO exit at {gpa:#x}, which has memory",
                        what()
                    ));
                }
            }
        }
        Some(out)
    }

    fn kind(bits: u8) -> AccessKind {
        AccessKind {
            write: bits & 3 == 1,
            fetch: bits & 3 == 2,
            user: bits & 4 != 0,
            implicit: bits & 8 != 0,
        }
    }

    /// A guest write of a control register; true if it flushed the guest's TLB as
    /// far as the checks rely on (it was accepted).
    fn control(&mut self, reg: ControlReg, value: u64) -> bool {
        let pdptrs = self.g.vcpu.state().pdptrs;
        let ok = match self.g.vcpu.guest_write_control(reg, value) {
            Ok(Ok(())) => true,
            Ok(Err(_)) => false,
            Err(e) => panic!("guest write of {reg:?} = {value:#x}: {e:?}"),
        };
        self.log(format_args!("  {reg:?} = {value:#x}: accepted {ok}"));
        if ok && self.known.iter().any(|k| k == "pae-pdptr") {
            // Known issue: PAE roots are not rebuilt when MOV CR0/CR3/CR4 reloads
            // different PDPTEs, so nothing can be assumed flushed then.
            if self.g.vcpu.state().pdptrs != pdptrs {
                self.tlb.reinterpreted = true;
                return false;
            }
        }
        ok
    }

    fn set_region(&self, slot: u32, flags: u32, gpa: u64, size: u64, hva: u64) -> bool {
        let r = kvm_userspace_memory_region2 {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: hva,
            ..Default::default()
        };
        let res = self.g.vm.set_user_memory_region(&r, RegionIoctl::V2);
        self.log(format_args!(
            "  set region {slot} {gpa:#x}+{size:#x} flags {flags} -> {res:?}"
        ));
        res.is_ok()
    }

    fn run(&mut self, step: usize, op: &Op) {
        self.log(format_args!("op {step}: {op:?}"));
        match *op {
            Op::WriteGpte { at, value, partial } => {
                let Some(e) = self.entry(at) else { return };
                let v = self.value(e, value);
                let gsize = if self.wide() { 8 } else { 4 };
                let (gpa, bytes) = match partial {
                    None => (e & !(gsize - 1), v.to_le_bytes()[..gsize as usize].to_vec()),
                    Some((delta, size)) => {
                        let n = [1usize, 2, 4, 8][size as usize % 4];
                        (e + u64::from(delta % 8), v.to_le_bytes()[..n].to_vec())
                    }
                };
                let Some(gva) = self.alias_of(gpa) else {
                    return;
                };
                let mut b = bytes;
                self.access(
                    gva,
                    &mut b,
                    AccessKind {
                        write: true,
                        ..Default::default()
                    },
                );
            }
            Op::Access {
                gva,
                off,
                size,
                kind,
                data,
            } => {
                let gva = self.gvas[gva as usize % self.gvas.len()] + u64::from(off % 4096);
                let n = [1usize, 2, 4, 8, 8, 8, 3, 16][size as usize % 8];
                let mut b = [0u8; 16];
                b[..8].copy_from_slice(&data.to_le_bytes());
                b[8..].copy_from_slice(&data.rotate_left(17).to_le_bytes());
                self.access(gva, &mut b[..n], Self::kind(kind));
            }
            Op::AccessRaw { gva, size, kind } => {
                let n = 1 + size as usize % 8;
                let mut b = [0x5au8; 8];
                self.access(gva, &mut b[..n], Self::kind(kind));
            }
            Op::Sweep { run, kind } => {
                let Some(&(gva, stride, count)) =
                    self.runs.get(run as usize % self.runs.len().max(1))
                else {
                    return;
                };
                for k in 0..count {
                    let mut b = (k ^ 0xa5a5).to_le_bytes();
                    self.access(gva.wrapping_add(k * stride), &mut b, Self::kind(kind));
                }
            }
            Op::Invlpg(i) => {
                let gva = self.gvas[i as usize % self.gvas.len()];
                self.g.vcpu.guest_invlpg(gva).expect("invlpg");
                let gva = if self.long() { gva } else { gva & 0xffff_ffff };
                let la57 = self.mode == PagingMode::Long5;
                if !self.long() || kvmmmu_core::paging::is_canonical(gva, la57) {
                    self.tlb.pages.insert(gva >> 12);
                }
            }
            Op::FlushTlb => {
                self.g.vcpu.guest_flush_tlb().expect("flush");
                self.tlb.flushed();
            }
            Op::MovCr3(i) => {
                let n = self.roots.len();
                let cr3 = match i as usize % (n + 4) {
                    k if k < n => self.roots[k],
                    k if k == n => 0x3000_0000, // outside every memslot
                    k if k == n + 1 => DATA_BASE + 0x1000, // a data page as the root
                    k if k == n + 2 => self.roots[0] | 0x20, // PAE: the next 32 bytes
                    _ => self.g.cr3(),
                };
                if self.control(ControlReg::Cr3, cr3) {
                    self.tlb.flushed();
                }
            }
            Op::ToggleWp => {
                let cr0 = self.g.vcpu.state().sregs.cr0;
                if self.control(ControlReg::Cr0, cr0 ^ CR0_WP) {
                    self.tlb.flushed();
                }
            }
            Op::ToggleCr4(b) => {
                let bit = [CR4_PSE, CR4_SMEP, CR4_SMAP, CR4_PGE][b as usize % 4];
                if bit == CR4_PSE
                    && self.mode == PagingMode::Bits32
                    && self.known.iter().any(|k| k == "pse-audit")
                {
                    // Known issue: the audit reads PS in 4-byte PDEs even with CR4.PSE=0.
                    return;
                }
                let cr4 = self.g.vcpu.state().sregs.cr4;
                if self.control(ControlReg::Cr4, cr4 ^ bit) {
                    self.tlb.flushed();
                    if bit == CR4_PSE {
                        self.tlb.reinterpreted = true;
                    }
                }
            }
            Op::ToggleNx => {
                let efer = self.g.vcpu.state().sregs.efer;
                if self.control(ControlReg::Efer, efer ^ EFER_NXE) {
                    self.tlb.reinterpreted = true;
                }
            }
            Op::ToggleAc => {
                self.g.vcpu.state().regs.rflags ^= RFLAGS_AC;
            }
            Op::Slot1Create { at, pages, flags } => {
                if self.slot1.is_some() {
                    return;
                }
                let size = (1 + u64::from(pages % 1024)) * 4096;
                let gpa = SLOT1_GPAS[at as usize % SLOT1_GPAS.len()];
                let host = HostRegion::new(size).expect("host memory");
                pattern(&host, 0, size.min(DATA_PAGES * 4096) as usize, 0x4000_0000);
                let flags = slot_flags(flags);
                if self.set_region(1, flags, gpa, size, host.addr()) {
                    self.slot1 = Some(Slot1 {
                        host,
                        gpa,
                        size,
                        flags,
                    });
                }
            }
            Op::Slot1Move(at) => {
                let Some(s) = &self.slot1 else { return };
                let gpa = SLOT1_GPAS[at as usize % SLOT1_GPAS.len()];
                let (size, flags, hva) = (s.size, s.flags, s.host.addr());
                if gpa != s.gpa && self.set_region(1, flags, gpa, size, hva) {
                    self.slot1.as_mut().expect("slot 1").gpa = gpa;
                    self.tlb.zapped_all();
                }
            }
            Op::Slot1Delete => {
                let Some(s) = &self.slot1 else { return };
                let hva = s.host.addr();
                assert!(self.set_region(1, s.flags, s.gpa, 0, hva), "delete slot 1");
                self.slot1 = None;
                self.tlb.zapped_all();
            }
            Op::Slot0Reinstall { flags } => {
                let hva = self.g.host.addr();
                assert!(
                    self.set_region(0, self.slot0_flags, 0, 0, hva),
                    "delete slot 0"
                );
                self.slot0_flags = slot_flags(flags);
                if !self.set_region(0, self.slot0_flags, 0, MEM, hva) {
                    // Flags refused, or slot 1 overlaps: put slot 0 back plain, alone.
                    if let Some(s) = self.slot1.take() {
                        assert!(self.set_region(1, s.flags, s.gpa, 0, s.host.addr()));
                    }
                    self.slot0_flags = 0;
                    assert!(self.set_region(0, 0, 0, MEM, hva), "re-create slot 0");
                }
                self.tlb.zapped_all();
            }
            Op::NrMmuPages(n) => {
                let n = 64 + u64::from(n) % 137;
                self.g
                    .vm
                    .ioctl(uapi::KVM_SET_NR_MMU_PAGES, n, &mut ProcessVm)
                    .expect("KVM_SET_NR_MMU_PAGES");
            }
            Op::Thp { slot1, on } => {
                let host = match (&self.slot1, slot1) {
                    (Some(s), true) => s.host.clone(),
                    _ => self.g.host.clone(),
                };
                host.set_thp(on).expect("madvise");
            }
        }
    }
}

fn slot_flags(bits: u8) -> u32 {
    let mut f = 0;
    if bits & 1 != 0 {
        f |= KVM_MEM_READONLY;
    }
    if bits & 2 != 0 {
        f |= KVM_MEM_LOG_DIRTY_PAGES;
    }
    f
}

fuzz_target!(|input: Input| {
    let Some(mut f) = Fuzz::new(&input) else {
        return;
    };
    if f.verbose {
        eprintln!("{input:#?}\nroots {:x?}\ngvas {:x?}", f.roots, f.gvas);
    }
    f.g.audit().expect("audit of the fresh guest");
    for (step, op) in input.ops.iter().take(MAX_OPS).enumerate() {
        f.run(step, op);
        f.audit(step, op);
    }
    if f.verbose {
        let vm = VM_STATS
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n, f.g.vm.stats.get(i)));
        let vcpu = VCPU_STATS
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n, f.g.vcpu.stats.get(i)));
        let nonzero: Vec<_> = vm.chain(vcpu).filter(|(_, v)| *v != 0).collect();
        eprintln!("stats {nonzero:?} checked {:?}", f.checked);
    }
});
