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
//! only accepted with KVM's dummy root (CR3 outside every memslot) and, below, for
//! pages under a host invalidation.
//!
//! # Dirty logging, TDP, host memory events (issue 6)
//!
//! The input also picks the MMU, shadow paging or two-dimensional paging
//! (`Vm::set_tdp`; the CPU walks the guest's tables afresh on every access, no TLB
//! is modelled, so every TDP access is checked as coherent), and a dirty-log
//! flavour: the bitmap (KVM_GET_DIRTY_LOG fetches and clears: `harvest_dirty_pages`
//! or the ioctl's path into a user buffer through `ProcessVm`), manual protect
//! (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 1: GET, then KVM_CLEAR_DIRTY_LOG of what GET
//! returned, all of it or a 64-page-aligned part), INITIALLY_SET (= 3), or a dirty
//! ring of 4 to 64 KiB per vCPU (read from the vCPU's mmap area at page 64 through
//! its memfd, entries set to RESET in order, then KVM_RESET_DIRTY_RINGS). More
//! operations: KVM_MEM_LOG_DIRTY_PAGES toggled on slot 0 or slot 1 (a flags-only
//! region update), harvests of either slot (or of the ring: all entries or the first
//! half), and host memory events: discard, migrate, write-protect, age, and an
//! invalidation start ... end with other operations in between.
//!
//! The dirty log is checked against a model, per (slot id, slot-relative page):
//! - `must`, what the next harvest has to report (no loss): a page whose bytes a
//!   guest access changed (the bytes it wrote, or A/D bits the walker set in a gpte
//!   on its path: the walk's gptes and the accessed bytes are compared before and
//!   after every access), a page a completed write went to while the TLB was
//!   coherent (even if it wrote the same bytes), every page of a slot whose logging
//!   starts under INITIALLY_SET, and pages reported but not given back (the part a
//!   manual CLEAR left, ring entries not reset).
//! - `may`, a conservative superset, what could have been dirtied since the last
//!   harvest (no false page): `must`; the page-table pages on the path of every
//!   successful walk (the walker may set A/D there); the target of every walk that
//!   grants write access (shadow paging maps a W=1, D=1 gpte writable on a read
//!   fault, and that logs the page) or of any write; with TDP (and without paging)
//!   every page an access reads, since a read fault maps the page writable
//!   (ACC_ALL) and logs it; under shadow paging every page that has a writable SPTE
//!   at the end of a step (the sync of an unsync page, also inside a fault, can make
//!   a present SPTE writable from a D=1 gpte, which logs it; this is not needed with
//!   TDP, whose no-false-page check is therefore sharper: a prefetched writable SPTE
//!   in a logging slot would show); and the pages of an INITIALLY_SET bitmap.
//! - Host writes are not logged (as in KVM): a discard adds nothing to either set,
//!   and the VMM's copy (next item) takes the discarded pages' new bytes.
//! - The VMM's copy: for a window of each logging slot (slot 0: the data pages and
//!   the table pages in use; slot 1: its first pages), a copy of the memory taken
//!   when logging starts and refreshed with the reported pages at each harvest must
//!   equal guest memory right after the harvest, except pages still pending (not
//!   cleared, not reset): an end-to-end no-loss check that also covers writes through
//!   stale translations, whose gpa the target does not know.
//!
//! After every step, besides `Vm::audit` (which checks in bitmap modes that no
//! writable SPTE escapes the bitmap): each page added to `must` is already in the
//! bitmap, or in ring mode has an entry not yet reset, and in ring mode every writable
//! leaf of a logging slot has such an entry (the audit's rule for rings). The ring
//! is read up to the model's count and every entry read must be DIRTY, the one past
//! it not. `DirtyRingFull` must come exactly when the entries not reset reach the
//! soft limit (size - 64); the target then harvests the whole ring and repeats the
//! access. A final harvest of everything ends each input.
//!
//! Host invalidations: between InvalidateStart and InvalidateEnd (nested starts are
//! allowed; all end before a memslot change, which KVM would wait for) a coherent
//! access whose page (with TDP also a guest page-table page on its walk) lies in a
//! range being invalidated must return `EAGAIN` (the vCPU would retry the fault
//! forever), except a write to a page that shadows a guest table under shadow paging
//! (KVM emulates it from its write tracking before the retry check); one outside the
//! hull of the running ranges must not; in the hull's gaps either may happen. Under
//! shadow paging, discards only hit pages that hold no shadowed guest table: KVM does
//! not see host writes to the tables it shadows (the audit would report the stale
//! SPTEs). Aging with clear must leave a range that tests young no more.
//!
//! `MMU_FUZZ_VERBOSE=1` prints the decoded input, each step and the VM and vCPU
//! counters at the end; with `MMU_FUZZ_DUMP=1` also every shadow page before each
//! audit. `MMU_FUZZ_SEEK=ev1,ev2` (operation names such as `HostDiscard`, `tdp` or
//! `shadow`, the log flavour `bitmap`, `manual`, `initially-set` or `ring`, and
//! `ring-full`, `inval-eagain`, `discard-logging`, `partial-clear`, `reported`,
//! `ring-partial`) panics at the end of an input that saw them all: a way to find
//! seeds (`MMU_FUZZ_SEEK=?` prints the events of each input instead). `MMU_FUZZ_KNOWN` (`|`-separated) lets a run go past bugs
//! already reported: any substring of a failure message skips that failure, and
//! `pae-pdptr` (PAE roots kept when MOV CR0/CR3/CR4 reloads other PDPTEs) and
//! `pse-audit` (the audit reads PS in 32-bit PDEs with CR4.PSE=0) avoid those two
//! (both fixed since; the switches stay for bisecting older cores).

#![no_main]

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use arbitrary::Arbitrary;
use kvmmmu_core::errno::Errno;
use kvmmmu_core::hostmem::HostRegion;
use kvmmmu_core::memslot::{MemSlots, RegionIoctl};
use kvmmmu_core::mmu::context::RootHpa;
use kvmmmu_core::mmu::rmap::kvm_pages_per_hpage;
use kvmmmu_core::paging::{
    Access, GuestMem, GuestMmu, PagingMode, Walk, WalkCtx, WalkError, ACC_WRITE,
};
use kvmmmu_core::stats::{VCPU_STATS, VM_STATS};
use kvmmmu_core::testkit::TestGuest;
use kvmmmu_core::uaccess::ProcessVm;
use kvmmmu_core::uapi::{
    self, kvm_clear_dirty_log, kvm_dirty_log, kvm_enable_cap, kvm_userspace_memory_region2,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY,
};
use kvmmmu_core::vcpu::guest_ops::{AccessKind, AccessOutcome, ControlReg};
use kvmmmu_core::vcpu::sregs::{
    CR0_WP, CR4_PAE, CR4_PGE, CR4_PSE, CR4_SMAP, CR4_SMEP, EFER_NXE, RFLAGS_AC,
};
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
/// The dirty ring in the vCPU's mmap area (KVM_DIRTY_LOG_PAGE_OFFSET), its entry
/// flags (struct kvm_dirty_gfn { u32 flags; u32 slot; u64 offset; }) and the entries
/// KVM keeps in reserve (the soft limit is the size minus these).
const RING_BASE: u64 = uapi::KVM_DIRTY_LOG_PAGE_OFFSET * 4096;
const RING_DIRTY: u32 = 1;
const RING_RESET: u32 = 2;
const RING_RSVD: u32 = 64;
/// Pages of the table area (from the top) and of slot 1 in the VMM's copy.
const WINDOW_TABLE_PAGES: u64 = 32;
const WINDOW_SLOT1_PAGES: u64 = 16;

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

/// How the VM logs dirty pages.
#[derive(Arbitrary, Clone, Copy, Debug)]
enum LogFlavour {
    Bitmap,
    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE.
    Manual,
    /// ... and KVM_DIRTY_LOG_INITIALLY_SET.
    InitiallySet,
    /// A dirty ring of 4096 << (n % 5) bytes per vCPU.
    Ring(u8),
}

#[derive(Arbitrary, Clone, Copy, Debug)]
struct Setup {
    tdp: bool,
    log: LogFlavour,
    /// Slot 0 logs dirty pages from the start (after the tables are built).
    slot0_log: bool,
}

/// Host memory for a host event: a page and up to 15 more (255: to the end).
#[derive(Arbitrary, Clone, Copy, Debug)]
enum HostPick {
    /// A data page of slot 0.
    Data(u8),
    /// A page of the table area.
    Table(u16),
    /// Any page of slot 0.
    Slot0(u16),
    /// A page of slot 1's memory (if it exists).
    Slot1(u16),
    /// The page gva number `n` maps now (identity without paging).
    Mapped(u8),
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
    /// KVM_MEM_LOG_DIRTY_PAGES toggled (a flags-only region update).
    ToggleLog {
        slot1: bool,
    },
    /// A harvest of the slot's log (bitmap flavours) or of the ring. `how` picks the
    /// API (harvest_dirty_pages or the ioctl path; manual: what CLEAR clears; ring:
    /// everything or the first half); `part` where a partial CLEAR starts and ends.
    Harvest {
        slot1: bool,
        how: u8,
        part: u16,
    },
    HostDiscard {
        at: HostPick,
        pages: u8,
    },
    HostMigrate(HostPick),
    HostWriteProtect {
        at: HostPick,
        pages: u8,
    },
    HostAge {
        at: HostPick,
        pages: u8,
        clear: bool,
        flush: bool,
    },
    InvalidateStart {
        at: HostPick,
        pages: u8,
    },
    InvalidateEnd,
}

#[derive(Arbitrary, Debug)]
struct Input {
    mode: Mode,
    alias_accessed: bool,
    setup: Setup,
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
    pages: Set<u64>,
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flavour {
    Bitmap,
    Manual { initially_set: bool },
    Ring { entries: u32 },
}

/// (slot id, slot-relative page).
type Key = (u32, u64);

/// The VMM's copy of some pages of a logging slot (see the module comment).
struct Window {
    pages: Vec<u64>,
    copy: Vec<u8>,
}

/// What the dirty log must and may report (see the module comment).
struct DirtyModel {
    flavour: Flavour,
    must: Set<Key>,
    may: Set<Key>,
    /// Pages added to `must` in this step, checked against the log after it.
    step_must: Vec<Key>,
    /// The vCPU's memfd (the ring is at RING_BASE in it).
    ring: Option<File>,
    /// Free-running index of the next entry to read.
    ring_next: u64,
    /// Entries read and not yet reset, in ring order, and the same as a multiset.
    ring_seen: Vec<Key>,
    ring_pending: Map<Key, u32>,
    windows: [Option<Window>; 2],
    /// [harvests, pages reported, must pages checked, ring full, EAGAIN under an
    /// invalidation, host events, discards skipped (shadowed tables), window pages
    /// compared]
    stats: [u64; 8],
}

impl DirtyModel {
    fn ring_entries(&self) -> Option<u32> {
        match self.flavour {
            Flavour::Ring { entries } => Some(entries),
            _ => None,
        }
    }
}

/// One page of an access, with what the checks need from before it.
struct Chunk {
    gva: u64,
    len: usize,
    fresh: bool,
    walk: Result<Walk, WalkError>,
    /// The walk's gpa (the gva itself without paging).
    gpa: u64,
    /// The bytes at `gpa` before the access (empty if the walk failed or no memory).
    bytes: Vec<u8>,
    /// The walk's gptes: gpa, and the value in memory before the access.
    gptes: Vec<(u64, u64)>,
}

struct Fuzz {
    g: TestGuest,
    mode: PagingMode,
    tdp: bool,
    dirty: DirtyModel,
    /// Slot-relative pages of slot 0 in the VMM's copy.
    slot0_window: Vec<u64>,
    /// Invalidations this target started and did not end, the gfn ranges invalidated
    /// since the count left 0 (its own and the host events' in between) and their hull.
    inval_depth: u32,
    inval_ranges: Vec<(u64, u64)>,
    inval_hull: (u64, u64),
    roots: Vec<u64>,
    gvas: Vec<u64>,
    /// Repeated mappings: (first gva, stride, count).
    runs: Vec<(u64, u64, u64)>,
    slot1: Option<Slot1>,
    slot0_flags: u32,
    tlb: Tlb,
    verbose: bool,
    /// MMU_FUZZ_DUMP: print the shadow pages before each audit.
    dump: bool,
    /// MMU_FUZZ_SEEK: events (`,`-separated) that make the input stop with a panic at
    /// its end once they all happened (to find seeds), and the events so far.
    seek: Vec<String>,
    events: HashSet<String>,
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
    // Computed once per place (the coverage instrumentation makes the loop costly).
    type Cache = Vec<((usize, usize, u64), Arc<Vec<u8>>)>;
    static CACHE: std::sync::Mutex<Cache> = std::sync::Mutex::new(Vec::new());
    let bytes = {
        let mut c = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        match c.iter().find(|(k, _)| *k == (off, len, tag)) {
            Some((_, b)) => b.clone(),
            None => {
                let words: Vec<u32> = (0..len / 4)
                    .map(|i| (((tag + (off + 4 * i) as u64) >> 1) as u32) & !1)
                    .collect();
                let b: Arc<Vec<u8>> =
                    Arc::new(words.iter().flat_map(|w| w.to_le_bytes()).collect());
                if c.len() < 64 {
                    c.push(((off, len, tag), b.clone()));
                }
                b
            }
        }
    };
    host.write(off, &bytes).expect("inside the region");
}

/// A cheap hasher for the target's sets of small integer keys (SipHash showed in
/// profiles).
#[derive(Default)]
struct FxHasher(u64);

impl std::hash::Hasher for FxHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }
}

type Set<T> = HashSet<T, std::hash::BuildHasherDefault<FxHasher>>;
type Map<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<FxHasher>>;

impl Fuzz {
    fn new(input: &Input) -> Option<Fuzz> {
        let mode = input.mode.paging();
        let setup = input.setup;
        let (flavour, ring_size) = match setup.log {
            LogFlavour::Bitmap => (Flavour::Bitmap, 0),
            LogFlavour::Manual => (
                Flavour::Manual {
                    initially_set: false,
                },
                0,
            ),
            LogFlavour::InitiallySet => (
                Flavour::Manual {
                    initially_set: true,
                },
                0,
            ),
            LogFlavour::Ring(n) => {
                let size = 4096u64 << (n % 5);
                (
                    Flavour::Ring {
                        entries: (size / 16) as u32,
                    },
                    size,
                )
            }
        };
        let mut g = TestGuest::build(mode, MEM, ring_size, setup.tdp).expect("a small guest");
        if let Flavour::Manual { initially_set } = flavour {
            let mut cap = kvm_enable_cap {
                cap: uapi::cap::MANUAL_DIRTY_LOG_PROTECT2 as u32,
                ..Default::default()
            };
            cap.args[0] = if initially_set { 3 } else { 1 };
            g.vm.enable_cap(&cap).expect("manual dirty-log protect");
        }
        let ring = (ring_size != 0).then(|| {
            File::from(
                g.vcpu
                    .memfd()
                    .try_clone()
                    .expect("a second descriptor of the vCPU memfd"),
            )
        });
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
            tdp: setup.tdp,
            dirty: DirtyModel {
                flavour,
                must: Set::default(),
                may: Set::default(),
                step_must: Vec::new(),
                ring,
                ring_next: 0,
                ring_seen: Vec::new(),
                ring_pending: Map::default(),
                windows: [None, None],
                stats: [0; 8],
            },
            slot0_window: Vec::new(),
            inval_depth: 0,
            inval_ranges: Vec::new(),
            inval_hull: (u64::MAX, 0),
            roots,
            gvas: Vec::new(),
            runs: Vec::new(),
            slot1: None,
            slot0_flags: 0,
            tlb: Tlb {
                all: true,
                pages: Set::default(),
                reinterpreted: false,
            },
            verbose: std::env::var_os("MMU_FUZZ_VERBOSE").is_some(),
            dump: std::env::var_os("MMU_FUZZ_DUMP").is_some(),
            seek: env_list("MMU_FUZZ_SEEK", ','),
            events: HashSet::new(),
            known: env_list("MMU_FUZZ_KNOWN", '|'),
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
        // The VMM's copy of slot 0: the data pages and the first table pages allocated
        // (the roots, the alias's tables).
        let tables = (f.g.tables_start() >> 12)..(MEM >> 12);
        f.slot0_window = (DATA_BASE >> 12..(DATA_BASE >> 12) + DATA_PAGES)
            .chain(tables.rev().take(WINDOW_TABLE_PAGES as usize))
            .collect();
        if setup.slot0_log {
            let hva = f.g.host.addr();
            assert!(f.set_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, MEM, hva));
            f.slot0_flags = KVM_MEM_LOG_DIRTY_PAGES;
            f.log_changed(0, true);
        }
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

    /// MMU_FUZZ_DUMP: every shadow page with its non-empty SPTEs (kind, gfn, value).
    fn dump_shadow_pages(&self) {
        use kvmmmu_core::mmu::inspect::{shadow_pages, SpteKind};
        let st = self.g.vm.state();
        for sp in shadow_pages(&st.mmu) {
            let sptes: Vec<_> = (0..512)
                .filter(|&i| sp.kind(i) != SpteKind::None)
                .map(|i| (i, sp.kind(i), sp.gfns[i], sp.sptes[i].0))
                .collect();
            eprintln!(
                "  sp {} gfn {:#x} level {} direct {} quadrant {} {:?} {sptes:x?}",
                sp.index,
                sp.gfn,
                sp.level(),
                sp.role.direct(),
                sp.role.quadrant(),
                sp.state
            );
        }
    }

    fn audit(&self, step: usize, op: &Op) {
        if self.dump {
            self.dump_shadow_pages();
        }
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

    /// An event worth a seed (see `seek`).
    fn event(&mut self, name: &str) {
        if !self.seek.is_empty() {
            self.events.insert(name.to_string());
        }
    }

    /// MMU_FUZZ_SEEK: stop if every event it names happened (`tdp`, `shadow` and the
    /// flavours `bitmap`, `manual`, `initially-set`, `ring` are events too).
    fn seek_done(&mut self) {
        if self.seek.is_empty() {
            return;
        }
        self.events
            .insert(if self.tdp { "tdp" } else { "shadow" }.to_string());
        self.events.insert(
            match self.dirty.flavour {
                Flavour::Bitmap => "bitmap",
                Flavour::Manual {
                    initially_set: false,
                } => "manual",
                Flavour::Manual {
                    initially_set: true,
                } => "initially-set",
                Flavour::Ring { .. } => "ring",
            }
            .to_string(),
        );
        if self.seek == ["?"] {
            let mut ev: Vec<_> = self.events.iter().collect();
            ev.sort();
            eprintln!("MMU_FUZZ_SEEK events: {ev:?}");
        } else if self.seek.iter().all(|e| self.events.contains(e)) {
            panic!("MMU_FUZZ_SEEK: found {:?}", self.seek);
        }
    }

    fn dummy_root(&self) -> bool {
        self.g.vcpu.state().mmu.root.hpa == RootHpa::Dummy
    }

    /// Whether the guest's TLB is known to be coherent for `gva` (always under TDP
    /// and without paging).
    fn fresh(&self, gva: u64) -> bool {
        self.mode == PagingMode::None || self.tdp || self.tlb.fresh(gva)
    }

    /// The pages of an access of `len` bytes at `gva`, each with a walk of the
    /// guest's tables as they are now (A/D updates suppressed) and the bytes the
    /// dirty-log checks compare after the access.
    fn chunks(&self, ctx: &WalkCtx, gva: u64, len: usize, access: Access) -> Vec<Chunk> {
        let mode = ctx.mode();
        let st = self.g.vm.state();
        let mem = NoAdMem(&st.memslots);
        let mut out = Vec::with_capacity(2);
        let mut done = 0usize;
        while done < len {
            let addr = gva.wrapping_add(done as u64);
            let addr = if mode.is_long() {
                addr
            } else {
                addr & 0xffff_ffff
            };
            let n = (len - done).min(4096 - (addr & 0xfff) as usize);
            let walk = GuestMmu::new(ctx).walk(&mem, addr, access);
            let gpa = match &walk {
                _ if mode == PagingMode::None => addr,
                Ok(w) => w.gpa,
                Err(_) => 0,
            };
            let mut bytes = vec![0u8; n];
            if walk.is_err() || !st.memslots.read(gpa, &mut bytes) {
                bytes.clear();
            }
            // The entries' memory now (a PAE walk reports the PDPTE registers, which
            // may differ from memory).
            let gsize = if mode == PagingMode::Bits32 { 4 } else { 8 };
            let gptes = walk
                .as_ref()
                .map(|w| {
                    w.gptes
                        .iter()
                        .map(|&(_, g, _)| (g, st.memslots.read_gpte(g, gsize).unwrap_or(0)))
                        .collect()
                })
                .unwrap_or_default();
            out.push(Chunk {
                gva: addr,
                len: n,
                fresh: self.fresh(addr),
                walk,
                gpa,
                bytes,
                gptes,
            });
            done += n;
        }
        out
    }

    /// The dirty-log bookkeeping of an access (see the module comment): what it must
    /// have logged (changed bytes, a completed coherent write) and what it may have.
    fn note_access(&mut self, chunks: &[Chunk], kind: AccessKind, done: bool) {
        let gsize = if self.g.vcpu.state().walk_ctx().mode() == PagingMode::Bits32 {
            4
        } else {
            8
        };
        let st = self.g.vm.state();
        if !st.memslots.iter().any(|s| s.dirty_logging()) {
            return;
        }
        let mut must = Vec::new();
        let mut may = Vec::new();
        for c in chunks {
            let Ok(w) = &c.walk else { continue };
            for &(gpa, v) in &c.gptes {
                may.push(gpa >> 12);
                if st.memslots.read_gpte(gpa, gsize).unwrap_or(0) != v {
                    must.push(gpa >> 12);
                }
            }
            if kind.write || self.tdp || w.access & ACC_WRITE != 0 {
                may.push(c.gpa >> 12);
            }
            if !c.bytes.is_empty() {
                let mut now = vec![0u8; c.len];
                if st.memslots.read(c.gpa, &mut now) && now != c.bytes {
                    must.push(c.gpa >> 12);
                }
            }
            if done && kind.write && c.fresh {
                must.push(c.gpa >> 12);
            }
        }
        let key = |gfn: u64| {
            st.memslots
                .lookup(gfn)
                .filter(|s| s.dirty_logging())
                .map(|s| (u32::from(s.id), gfn - s.base_gfn))
        };
        for k in must.into_iter().filter_map(key) {
            self.dirty.must.insert(k);
            self.dirty.may.insert(k);
            self.dirty.step_must.push(k);
        }
        for k in may.into_iter().filter_map(key) {
            self.dirty.may.insert(k);
        }
    }

    /// During a host invalidation: whether the access of chunk `c` must wait for it
    /// (Some(true): EAGAIN), must not (Some(false)), or may (None); see the module
    /// comment.
    fn inval_verdict(&self, c: &Chunk, write: bool) -> Option<bool> {
        if self.inval_depth == 0 {
            return Some(false);
        }
        if !c.fresh {
            return None;
        }
        let Ok(_) = &c.walk else {
            return Some(false);
        };
        let st = self.g.vm.state();
        let mut gfns: Vec<u64> = Vec::new();
        if self.tdp {
            // The CPU's gpte reads go through the TDP tables too (not the PDPTEs).
            let skip = usize::from(self.mode == PagingMode::Pae);
            gfns.extend(c.gptes.iter().skip(skip).map(|&(g, _)| g >> 12));
        }
        gfns.push(c.gpa >> 12);
        let last = gfns.len() - 1;
        let mut verdict = Some(false);
        for (i, &g) in gfns.iter().enumerate() {
            let Some(slot) = st.memslots.lookup(g) else {
                continue;
            };
            if self.inval_ranges.iter().any(|&(a, b)| g >= a && g < b) {
                if i == last
                    && write
                    && (slot.readonly() || (!self.tdp && !st.mmu.gfn_sps_with_gptes(g).is_empty()))
                {
                    // Write-tracked (under shadow paging): emulated before the retry
                    // check. A write to a read-only slot: emulated as MMIO before it
                    // too in KVM before 6.10 (kvm_faultin_pfn, then
                    // is_page_fault_stale), retried since (kvm_mmu_faultin_pfn checks
                    // mmu_invalidate_retry_gfn_unsafe first); either is accepted.
                    verdict = None;
                } else {
                    return Some(true);
                }
            } else if g >= self.inval_hull.0 && g < self.inval_hull.1 {
                verdict = None;
            }
        }
        verdict
    }

    /// One guest access with the checks of the module comment.
    fn access(&mut self, gva: u64, buf: &mut [u8], kind: AccessKind) -> Option<AccessOutcome> {
        // A KVM quirk the model keeps (mmu_pte_write_fetch_gpte): with CR4.PAE an
        // emulated 4-byte write is taken for one half of the aligned 8-byte gpte, so one
        // that straddles two gptes (offset 5-7 mod 8) is neither seen as misaligned nor
        // zaps the second gpte's SPTE, which stays stale (and the audit reports it).
        // Guests do not write gptes that way: such writes are made 3 bytes long.
        let buf = if kind.write
            && buf.len() == 4
            && gva & 7 > 4
            && self.g.vcpu.state().sregs.cr4 & CR4_PAE != 0
        {
            &mut buf[..3]
        } else {
            buf
        };
        let mut full = 0;
        loop {
            let ctx = self.g.vcpu.state().walk_ctx();
            let mode = ctx.mode();
            let gva = if mode.is_long() {
                gva
            } else {
                gva & 0xffff_ffff
            };
            let one_page = (gva & 0xfff) as usize + buf.len() <= 4096;
            let fresh = self.fresh(gva);
            let access = Access {
                write: kind.write,
                user: kind.user,
                fetch: kind.fetch,
                implicit: kind.implicit,
            };
            let chunks = self.chunks(&ctx, gva, buf.len(), access);
            let before: Option<Result<Walk, WalkError>> = one_page.then(|| chunks[0].walk);
            let ring_full = self.ring_soft_full();
            let data = buf.to_vec();
            let r = self.g.vcpu.guest_access(gva, buf, kind);
            if kind.write && mode != PagingMode::None {
                self.tlb.stale();
            }
            if r == Ok(AccessOutcome::DirtyRingFull) {
                if self.dirty.ring_entries().is_none() {
                    self.fail(format!(
                        "access at {gva:#x} ({mode:?}): DirtyRingFull without a dirty ring"
                    ));
                    return None;
                }
                if !ring_full {
                    self.fail(format!(
                        "access at {gva:#x}: DirtyRingFull with {} entries not reset (ring of {:?})",
                        self.dirty.ring_seen.len(),
                        self.dirty.ring_entries()
                    ));
                }
                full += 1;
                if full > 1 {
                    self.fail("DirtyRingFull again after a harvest of the whole ring".into());
                    return None;
                }
                self.dirty.stats[3] += 1;
                self.event("ring-full");
                self.log(format_args!("  access at {gva:#x}: ring full, harvest"));
                self.harvest_ring(true);
                continue;
            }
            if ring_full {
                self.fail(format!(
                    "access at {gva:#x}: the ring is at its soft limit ({} entries not reset), but the access ran: {r:?}",
                    self.dirty.ring_seen.len()
                ));
            }
            self.note_access(&chunks, kind, r == Ok(AccessOutcome::Done));
            let verdicts: Vec<Option<bool>> = chunks
                .iter()
                .map(|c| self.inval_verdict(c, kind.write))
                .collect();
            let out = match r {
                Ok(o) => o,
                Err(Errno::EAGAIN) if self.dummy_root() => return None,
                Err(Errno::EAGAIN) if self.inval_depth > 0 => {
                    self.dirty.stats[4] += 1;
                    self.event("inval-eagain");
                    self.log(format_args!(
                        "  access {kind:?} {gva:#x}: EAGAIN under an invalidation {:x?}, verdicts {verdicts:?}",
                        self.inval_ranges
                    ));
                    if verdicts.iter().all(|v| *v == Some(false)) {
                        self.fail(format!(
                            "{kind:?} access at {gva:#x} ({mode:?}): EAGAIN, but no page it uses is under invalidation {:x?} (hull {:x?}): walks {:x?}",
                            self.inval_ranges,
                            self.inval_hull,
                            chunks.iter().map(|c| (c.gva, c.gpa, &c.walk)).collect::<Vec<_>>()
                        ));
                    }
                    return None;
                }
                Err(e) => panic!("guest access {kind:?} at {gva:#x}: {e:?} ({mode:?})"),
            };
            self.log(format_args!(
                "  access {kind:?} {gva:#x} len {} -> {out:?}, walk {before:?}, fresh {fresh}",
                buf.len()
            ));
            let waits = match out {
                AccessOutcome::Done => verdicts.contains(&Some(true)),
                AccessOutcome::Mmio { .. } => verdicts[0] == Some(true),
                _ => false,
            };
            if waits {
                self.fail(format!(
                    "{kind:?} access at {gva:#x} ({mode:?}): {out:?} although it uses a page under invalidation {:x?}: walks {:x?}",
                    self.inval_ranges,
                    chunks.iter().map(|c| (c.gva, c.gpa, &c.walk)).collect::<Vec<_>>()
                ));
            }
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
                (AccessOutcome::DirtyRingFull, _) => unreachable!("handled above"),
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
            return Some(out);
        }
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
        if !self.seek.is_empty() {
            let name = format!("{op:?}");
            let name = name.split([' ', '(', '{']).next().unwrap_or_default();
            self.event(name);
        }
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
                self.end_invalidations();
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
                    self.log_changed(1, flags & KVM_MEM_LOG_DIRTY_PAGES != 0);
                }
            }
            Op::Slot1Move(at) => {
                let Some(s) = &self.slot1 else { return };
                let gpa = SLOT1_GPAS[at as usize % SLOT1_GPAS.len()];
                if gpa == s.gpa {
                    return;
                }
                self.end_invalidations();
                let s = self.slot1.as_ref().expect("slot 1");
                let (size, flags, hva) = (s.size, s.flags, s.host.addr());
                if self.set_region(1, flags, gpa, size, hva) {
                    // The bitmap moves with the slot: the dirty model is unchanged.
                    self.slot1.as_mut().expect("slot 1").gpa = gpa;
                    self.tlb.zapped_all();
                }
            }
            Op::Slot1Delete => {
                if self.slot1.is_none() {
                    return;
                }
                self.end_invalidations();
                let s = self.slot1.as_ref().expect("slot 1");
                let hva = s.host.addr();
                assert!(self.set_region(1, s.flags, s.gpa, 0, hva), "delete slot 1");
                self.slot1 = None;
                self.tlb.zapped_all();
                self.log_changed(1, false);
            }
            Op::Slot0Reinstall { flags } => {
                self.end_invalidations();
                let hva = self.g.host.addr();
                assert!(
                    self.set_region(0, self.slot0_flags, 0, 0, hva),
                    "delete slot 0"
                );
                self.log_changed(0, false);
                self.slot0_flags = slot_flags(flags);
                if !self.set_region(0, self.slot0_flags, 0, MEM, hva) {
                    // Flags refused, or slot 1 overlaps: put slot 0 back plain, alone.
                    if let Some(s) = self.slot1.take() {
                        assert!(self.set_region(1, s.flags, s.gpa, 0, s.host.addr()));
                        self.log_changed(1, false);
                    }
                    self.slot0_flags = 0;
                    assert!(self.set_region(0, 0, 0, MEM, hva), "re-create slot 0");
                }
                self.tlb.zapped_all();
                self.log_changed(0, self.slot0_flags & KVM_MEM_LOG_DIRTY_PAGES != 0);
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
            Op::ToggleLog { slot1 } => {
                self.end_invalidations();
                if slot1 {
                    let Some(s) = &self.slot1 else { return };
                    let (gpa, size, hva) = (s.gpa, s.size, s.host.addr());
                    let flags = s.flags ^ KVM_MEM_LOG_DIRTY_PAGES;
                    assert!(
                        self.set_region(1, flags, gpa, size, hva),
                        "logging toggle on slot 1"
                    );
                    self.slot1.as_mut().expect("slot 1").flags = flags;
                    self.log_changed(1, flags & KVM_MEM_LOG_DIRTY_PAGES != 0);
                } else {
                    let flags = self.slot0_flags ^ KVM_MEM_LOG_DIRTY_PAGES;
                    let hva = self.g.host.addr();
                    assert!(
                        self.set_region(0, flags, 0, MEM, hva),
                        "logging toggle on slot 0"
                    );
                    self.slot0_flags = flags;
                    self.log_changed(0, flags & KVM_MEM_LOG_DIRTY_PAGES != 0);
                }
            }
            Op::Harvest { slot1, how, part } => {
                if self.dirty.ring_entries().is_some() {
                    if how & 2 != 0 {
                        // The bitmap ioctls are refused in ring mode.
                        let r = self.g.vm.harvest_dirty_pages(u32::from(slot1));
                        if r != Err(Errno::ENXIO) {
                            self.fail(format!("harvest_dirty_pages in ring mode: {r:?}"));
                        }
                    }
                    self.harvest_ring(how & 1 == 0);
                } else {
                    self.harvest_bitmap(u32::from(slot1), how, part);
                }
            }
            Op::HostDiscard { at, pages } => {
                let Some((host, rel, n, slot, base)) = self.host_range(at, pages, true) else {
                    return;
                };
                if !self.tdp {
                    let st = self.g.vm.state();
                    if (base + rel..base + rel + n)
                        .any(|g| !st.mmu.gfn_sps_with_gptes(g).is_empty())
                    {
                        drop(st);
                        self.dirty.stats[6] += 1;
                        self.log(format_args!("  skipped: a page shadows a guest table"));
                        return;
                    }
                }
                let hva = host.addr() + rel * 4096;
                self.g.vm.host_discard(hva, n * 4096).expect("host_discard");
                self.host_event(base + rel, base + rel + n);
                let mut page = vec![0u8; 4096];
                for p in rel..rel + n {
                    host.read((p * 4096) as usize, &mut page)
                        .expect("host page");
                    if page.iter().any(|&b| b != 0) {
                        self.fail(format!(
                            "slot {slot} page {p:#x} holds data after a discard"
                        ));
                    }
                }
                // The VMM knows what it discarded: its copy takes the new bytes.
                self.window_refresh(slot, rel, n);
                if self.dirty.windows[slot as usize].is_some() {
                    self.event("discard-logging");
                }
            }
            Op::HostMigrate(at) => {
                let Some((host, rel, _, _, base)) = self.host_range(at, 0, true) else {
                    return;
                };
                self.g
                    .vm
                    .host_migrate(host.addr() + rel * 4096)
                    .expect("host_migrate");
                self.host_event(base + rel, base + rel + 1);
            }
            Op::HostWriteProtect { at, pages } => {
                let Some((host, rel, n, _, base)) = self.host_range(at, pages, true) else {
                    return;
                };
                self.g
                    .vm
                    .host_write_protect(host.addr() + rel * 4096, n * 4096)
                    .expect("host_write_protect");
                self.host_event(base + rel, base + rel + n);
            }
            Op::HostAge {
                at,
                pages,
                clear,
                flush,
            } => {
                let Some((host, rel, n, _, _)) = self.host_range(at, pages, false) else {
                    return;
                };
                let hva = host.addr() + rel * 4096;
                let young = self.g.vm.host_age(hva, n * 4096, clear, flush);
                self.dirty.stats[5] += 1;
                if clear && self.g.vm.host_age(hva, n * 4096, false, false) {
                    self.fail(format!(
                        "host_age: {n} pages at {hva:#x} still young after clear (young {young})"
                    ));
                }
            }
            Op::InvalidateStart { at, pages } => {
                let Some((host, rel, n, _, base)) = self.host_range(at, pages, true) else {
                    return;
                };
                if self.inval_depth == 0 {
                    self.inval_ranges.clear();
                    self.inval_hull = (u64::MAX, 0);
                }
                self.g
                    .vm
                    .host_invalidate_start(host.addr() + rel * 4096, n * 4096);
                self.inval_depth += 1;
                self.host_event(base + rel, base + rel + n);
            }
            Op::InvalidateEnd => {
                if self.inval_depth > 0 {
                    self.end_invalidation();
                } else {
                    let r = self.g.vm.host_invalidate_end();
                    if r != Err(Errno::EINVAL) {
                        self.fail(format!("invalidate end without a start: {r:?}"));
                    }
                }
            }
        }
    }

    // ------------------------------------------------------------ host events

    /// The host memory `at` picks: its region, the first page, the number of pages
    /// (`pages`: 1 + pages % 16, 255 to the end of the slot), the slot and its first gfn.
    fn host_range(
        &self,
        at: HostPick,
        pages: u8,
        invalidates: bool,
    ) -> Option<(Arc<HostRegion>, u64, u64, u32, u64)> {
        let npages0 = MEM >> 12;
        let (host, base, npages, slot, first) = match at {
            HostPick::Slot1(i) => {
                let s = self.slot1.as_ref()?;
                let np = s.size >> 12;
                (s.host.clone(), s.gpa >> 12, np, 1, u64::from(i) % np)
            }
            HostPick::Data(i) => (
                self.g.host.clone(),
                0,
                npages0,
                0,
                (DATA_BASE >> 12) + u64::from(i) % DATA_PAGES,
            ),
            HostPick::Table(i) => (
                self.g.host.clone(),
                0,
                npages0,
                0,
                (TABLE_BASE >> 12) + u64::from(i) % 512,
            ),
            HostPick::Slot0(i) => (self.g.host.clone(), 0, npages0, 0, u64::from(i) % npages0),
            HostPick::Mapped(i) => {
                let gva = self.gvas[i as usize % self.gvas.len()];
                let ctx = self.g.vcpu.state().walk_ctx();
                let st = self.g.vm.state();
                let gpa = if self.mode == PagingMode::None {
                    gva & 0xffff_ffff
                } else {
                    GuestMmu::new(&ctx)
                        .walk(&NoAdMem(&st.memslots), gva, Access::default())
                        .ok()?
                        .gpa
                };
                let s = st.memslots.lookup(gpa >> 12)?;
                match (s.id, &self.slot1) {
                    (0, _) => (self.g.host.clone(), 0, npages0, 0, gpa >> 12),
                    (_, Some(s1)) => (
                        s1.host.clone(),
                        s.base_gfn,
                        s.npages,
                        1,
                        (gpa >> 12) - s.base_gfn,
                    ),
                    _ => return None,
                }
            }
        };
        if base & ((1 << 18) - 1) != 0 && self.known.iter().any(|k| k == "notifier-frame") {
            // Known issue: host events on a slot whose base is not 1 GiB aligned panic
            // in Mmu::leaves_in (the first gfn of a 1 GiB frame is below the slot).
            return None;
        }
        let n = if pages == 255 {
            npages - first
        } else {
            (1 + u64::from(pages % 16)).min(npages - first)
        };
        self.log(format_args!(
            "  host memory: slot {slot} pages {first:#x}+{n} (gfn {:#x})",
            base + first
        ));
        let (a, b) = (base + first, base + first + n);
        if invalidates
            && self.inval_depth > 0
            && (a > self.inval_hull.1 || b < self.inval_hull.0)
            && self.known.iter().any(|k| k == "inval-hull")
        {
            // Known issue: the audit takes every gfn in the hull of the running
            // invalidations for invalidated, also in the gaps between their ranges.
            self.log(format_args!("  skipped: it would leave a gap in the hull"));
            return None;
        }
        Some((host, first, n, slot, base))
    }

    /// A host event invalidated gfns [a, b): while this target's invalidation runs,
    /// they join the ranges that block faults.
    fn host_event(&mut self, a: u64, b: u64) {
        self.dirty.stats[5] += 1;
        if self.inval_depth > 0 {
            self.inval_ranges.push((a, b));
            self.inval_hull = (self.inval_hull.0.min(a), self.inval_hull.1.max(b));
        }
    }

    fn end_invalidation(&mut self) {
        self.g.vm.host_invalidate_end().expect("invalidate end");
        self.inval_depth -= 1;
        if self.inval_depth == 0 {
            self.inval_ranges.clear();
            self.inval_hull = (u64::MAX, 0);
        }
    }

    /// End every running invalidation (before a memslot change, as KVM waits there).
    fn end_invalidations(&mut self) {
        while self.inval_depth > 0 {
            self.end_invalidation();
        }
    }

    // ------------------------------------------------------------ dirty logging

    /// Logging of `slot` started (`on`), stopped, or the slot went away or came back:
    /// in bitmap flavours its bitmap is new (empty, or full under INITIALLY_SET) or
    /// gone; ring entries stay in the ring whatever happens to the slot.
    fn log_changed(&mut self, slot: u32, on: bool) {
        if self.dirty.ring_entries().is_none() {
            self.dirty.must.retain(|k| k.0 != slot);
            self.dirty.may.retain(|k| k.0 != slot);
            self.dirty.step_must.retain(|k| k.0 != slot);
            if on
                && self.dirty.flavour
                    == (Flavour::Manual {
                        initially_set: true,
                    })
            {
                let npages = self
                    .g
                    .vm
                    .state()
                    .memslots
                    .get(slot as u16)
                    .map_or(0, |s| s.npages);
                for p in 0..npages {
                    self.dirty.must.insert((slot, p));
                    self.dirty.may.insert((slot, p));
                }
            }
        }
        self.dirty.windows[slot as usize] = if on { self.window_take(slot) } else { None };
    }

    /// The VMM's first copy of the window of a slot that starts logging.
    fn window_take(&self, slot: u32) -> Option<Window> {
        let st = self.g.vm.state();
        let s = st.memslots.get(slot as u16)?;
        let pages: Vec<u64> = if slot == 0 {
            self.slot0_window.clone()
        } else {
            (0..s.npages.min(WINDOW_SLOT1_PAGES)).collect()
        };
        let mut copy = vec![0u8; pages.len() * 4096];
        for (i, &p) in pages.iter().enumerate() {
            s.host
                .read(
                    s.host_offset + (p * 4096) as usize,
                    &mut copy[i * 4096..(i + 1) * 4096],
                )
                .expect("slot memory");
        }
        Some(Window { pages, copy })
    }

    /// The VMM's copy takes the current bytes of pages [rel, rel + n) (a discard).
    fn window_refresh(&mut self, slot: u32, rel: u64, n: u64) {
        let st = self.g.vm.state();
        let (Some(w), Some(s)) = (
            self.dirty.windows[slot as usize].as_mut(),
            st.memslots.get(slot as u16),
        ) else {
            return;
        };
        for (i, &p) in w.pages.iter().enumerate() {
            if p >= rel && p < rel + n {
                s.host
                    .read(
                        s.host_offset + (p * 4096) as usize,
                        &mut w.copy[i * 4096..(i + 1) * 4096],
                    )
                    .expect("slot memory");
            }
        }
    }

    /// After a harvest: copy the reported pages of the window, then every page not
    /// still pending must equal the copy.
    fn window_check(&mut self, slot: u32, reported: &Set<u64>, pending: &Set<u64>) {
        let st = self.g.vm.state();
        let (Some(w), Some(s)) = (
            self.dirty.windows[slot as usize].as_mut(),
            st.memslots.get(slot as u16),
        ) else {
            return;
        };
        let mut page = vec![0u8; 4096];
        let mut bad = None;
        for (i, &p) in w.pages.iter().enumerate() {
            if p >= s.npages {
                continue;
            }
            s.host
                .read(s.host_offset + (p * 4096) as usize, &mut page)
                .expect("slot memory");
            let copy = &mut w.copy[i * 4096..(i + 1) * 4096];
            if reported.contains(&p) {
                copy.copy_from_slice(&page);
            } else if !pending.contains(&p) {
                self.dirty.stats[7] += 1;
                if copy[..] != page[..] {
                    let at = (0..4096).find(|&b| copy[b] != page[b]).unwrap_or(0);
                    bad = Some((p, at, copy[at], page[at]));
                    copy.copy_from_slice(&page);
                }
            }
        }
        drop(st);
        if let Some((p, at, was, now)) = bad {
            self.fail(format!(
                "dirty log ({:?}): page {p:#x} of slot {slot} changed since it was last copied (byte {at:#x}: {was:#x} -> {now:#x}), but no harvest reported it",
                self.dirty.flavour
            ));
        }
    }

    /// The bitmap flavours' harvest of `slot`, with the no-loss and no-false-page
    /// checks, then the VMM's copy.
    fn harvest_bitmap(&mut self, slot: u32, how: u8, part: u16) {
        let info = self
            .g
            .vm
            .state()
            .memslots
            .get(slot as u16)
            .map(|s| (s.dirty_logging(), s.npages));
        let manual = matches!(self.dirty.flavour, Flavour::Manual { .. });
        let npages = info.map_or(1, |i| i.1);
        let nwords = npages.div_ceil(64);
        let res: Result<(Vec<u64>, Vec<u64>), Errno> = match how % 4 {
            // harvest_dirty_pages: GET (+ CLEAR of everything with manual protect).
            0 | 1 if !manual => self.g.vm.harvest_dirty_pages(slot).map(|r| (r, vec![])),
            3 if manual => self.g.vm.harvest_dirty_pages(slot).map(|r| (r, vec![])),
            _ if !manual => self.get_log(slot, npages).map(|r| (r, vec![])),
            k => self.get_log(slot, npages).map(|r| {
                // CLEAR exactly what GET returned, in all of the slot (k = 0), from a
                // word to the end (1) or in some words (2).
                let first = if k == 0 {
                    0
                } else {
                    u64::from(part & 0xff) % nwords
                };
                let count = if k == 2 {
                    1 + u64::from(part >> 8) % (nwords - first)
                } else {
                    nwords - first
                };
                let num = if first + count == nwords {
                    npages - 64 * first
                } else {
                    64 * count
                };
                let mut words = vec![0u64; count as usize];
                let mut kept = Vec::new();
                for &p in &r {
                    if p >= 64 * first && p < 64 * first + num {
                        words[((p - 64 * first) / 64) as usize] |= 1 << (p % 64);
                    } else {
                        kept.push(p);
                    }
                }
                let log = kvm_clear_dirty_log {
                    slot,
                    num_pages: num as u32,
                    first_page: 64 * first,
                    dirty_bitmap: words.as_mut_ptr() as u64,
                };
                let c = self.g.vm.clear_dirty_log(&log, &mut ProcessVm);
                if c.is_err() {
                    self.fail(format!(
                        "KVM_CLEAR_DIRTY_LOG of slot {slot} pages {:#x}+{num:#x}: {c:?}",
                        64 * first
                    ));
                }
                (r, kept)
            }),
        };
        self.log(format_args!(
            "  harvest slot {slot} ({:?}, how {how}): {res:x?}",
            self.dirty.flavour
        ));
        let (reported, kept) = match (info, res) {
            (Some((true, _)), Ok(r)) => r,
            (Some((true, _)), Err(e)) => {
                self.fail(format!("harvest of logging slot {slot}: {e:?}"));
                return;
            }
            (_, Err(Errno::ENOENT)) => return,
            (_, r) => {
                self.fail(format!(
                    "harvest of slot {slot}, which does not log: {r:?}, not ENOENT"
                ));
                return;
            }
        };
        let rep: Set<u64> = reported.iter().copied().collect();
        let kept: Set<u64> = kept.into_iter().collect();
        if !kept.is_empty() {
            self.event("partial-clear");
        }
        self.check_report(slot, &rep, npages);
        for k in [&mut self.dirty.must, &mut self.dirty.may] {
            k.retain(|k| k.0 != slot);
            k.extend(kept.iter().map(|&p| (slot, p)));
        }
        self.dirty.step_must.retain(|k| k.0 != slot);
        self.window_check(slot, &rep, &kept);
    }

    /// KVM_GET_DIRTY_LOG into a user buffer (one guard word past it, and garbage in it
    /// beforehand: the ioctl writes the whole bitmap and nothing more).
    fn get_log(&self, slot: u32, npages: u64) -> Result<Vec<u64>, Errno> {
        const JUNK: u64 = 0xa5a5_a5a5_a5a5_a5a5;
        let nwords = npages.div_ceil(64) as usize;
        let mut buf = vec![JUNK; nwords + 1];
        let log = kvm_dirty_log {
            slot,
            padding1: 0,
            dirty_bitmap: buf.as_mut_ptr() as u64,
        };
        self.g.vm.get_dirty_log(&log, &mut ProcessVm)?;
        if buf[nwords] != JUNK {
            self.fail(format!(
                "KVM_GET_DIRTY_LOG of slot {slot} wrote past its {nwords}-word bitmap"
            ));
        }
        if !npages.is_multiple_of(64) && buf[nwords - 1] >> (npages % 64) != 0 {
            self.fail(format!(
                "KVM_GET_DIRTY_LOG of slot {slot}: bits past page {npages:#x} set ({:#x})",
                buf[nwords - 1]
            ));
        }
        let mut pages = Vec::new();
        for (w, &v) in buf[..nwords].iter().enumerate() {
            let mut v = v;
            while v != 0 {
                pages.push(64 * w as u64 + u64::from(v.trailing_zeros()));
                v &= v - 1;
            }
        }
        Ok(pages)
    }

    /// No loss (everything in `must` for the slot is reported) and no false page
    /// (everything reported is in `may`).
    fn check_report(&mut self, slot: u32, rep: &Set<u64>, npages: u64) {
        self.dirty.stats[0] += 1;
        self.dirty.stats[1] += rep.len() as u64;
        if !rep.is_empty() {
            self.event("reported");
        }
        let mut lost: Vec<u64> = self
            .dirty
            .must
            .iter()
            .filter(|k| k.0 == slot)
            .map(|k| k.1)
            .filter(|p| !rep.contains(p))
            .collect();
        self.dirty.stats[2] += self.dirty.must.iter().filter(|k| k.0 == slot).count() as u64;
        let mut extra: Vec<u64> = rep
            .iter()
            .copied()
            .filter(|&p| !self.dirty.may.contains(&(slot, p)) || p >= npages)
            .collect();
        lost.sort_unstable();
        extra.sort_unstable();
        if !lost.is_empty() {
            self.fail(format!(
                "dirty log ({:?}): slot {slot} pages {lost:x?} were dirtied but the harvest does not report them",
                self.dirty.flavour
            ));
        }
        if !extra.is_empty() {
            self.fail(format!(
                "dirty log ({:?}): the harvest reports slot {slot} pages {extra:x?}, which nothing could have dirtied",
                self.dirty.flavour
            ));
        }
    }

    /// Entries `[index, index + n)` of the ring (free-running indices), as
    /// (flags, slot, offset).
    fn ring_read(&self, index: u64, n: u64) -> Vec<(u32, u32, u64)> {
        let entries = u64::from(self.dirty.ring_entries().expect("ring"));
        let f = self.dirty.ring.as_ref().expect("ring");
        let mut out = Vec::with_capacity(n as usize);
        let mut i = index;
        while i < index + n {
            let at = i % entries;
            let k = (entries - at).min(index + n - i);
            let mut buf = vec![0u8; (16 * k) as usize];
            f.read_exact_at(&mut buf, RING_BASE + 16 * at)
                .expect("ring read");
            out.extend(buf.chunks(16).map(|e| {
                (
                    u32::from_le_bytes(e[0..4].try_into().expect("4 bytes")),
                    u32::from_le_bytes(e[4..8].try_into().expect("4 bytes")),
                    u64::from_le_bytes(e[8..16].try_into().expect("8 bytes")),
                )
            }));
            i += k;
        }
        out
    }

    /// Read the entries pushed since the last read (as many as the ring says it
    /// holds): each must be DIRTY.
    fn ring_sync(&mut self) {
        let Some(entries) = self.dirty.ring_entries() else {
            return;
        };
        let used = self
            .g
            .vcpu
            .dirty_ring
            .as_ref()
            .expect("a ring on the vCPU")
            .used();
        let seen = self.dirty.ring_seen.len() as u32;
        if used < seen || used > entries {
            self.fail(format!(
                "dirty ring: {used} entries used, {seen} read before"
            ));
            return;
        }
        if used == seen {
            return;
        }
        let new = self.ring_read(self.dirty.ring_next, u64::from(used - seen));
        for (k, &(flags, slot, offset)) in new.iter().enumerate() {
            if flags != RING_DIRTY {
                self.fail(format!(
                    "dirty ring entry {} has flags {flags:#x}, not DIRTY",
                    self.dirty.ring_next + k as u64
                ));
            }
            let key = (slot, offset);
            self.dirty.ring_seen.push(key);
            *self.dirty.ring_pending.entry(key).or_insert(0) += 1;
        }
        self.dirty.ring_next += new.len() as u64;
    }

    /// Whether the ring is at its soft limit (the next access must stop).
    fn ring_soft_full(&mut self) -> bool {
        let Some(entries) = self.dirty.ring_entries() else {
            return false;
        };
        self.ring_sync();
        self.dirty.ring_seen.len() as u32 >= entries - RING_RSVD
    }

    /// Harvest the ring: everything or its first half, RESET set on those entries in
    /// order, then KVM_RESET_DIRTY_RINGS; with the no-loss and no-false-page checks
    /// and the VMM's copy.
    fn harvest_ring(&mut self, all: bool) {
        let Some(entries) = self.dirty.ring_entries() else {
            return;
        };
        self.ring_sync();
        let n = self.dirty.ring_seen.len() as u64;
        if n < u64::from(entries) {
            // The entry past the last one read is not DIRTY.
            let (flags, _, _) = self.ring_read(self.dirty.ring_next, 1)[0];
            if flags & RING_DIRTY != 0 {
                self.fail(format!(
                    "dirty ring entry {} is DIRTY (flags {flags:#x}) past the {n} the ring counts",
                    self.dirty.ring_next
                ));
            }
        }
        // No loss and no false page, over every entry not reset yet.
        for slot in [0u32, 1] {
            let rep: Set<u64> = self
                .dirty
                .ring_pending
                .keys()
                .filter(|k| k.0 == slot)
                .map(|k| k.1)
                .collect();
            self.check_report(slot, &rep, u64::MAX);
        }
        let others: Vec<Key> = self
            .dirty
            .ring_pending
            .keys()
            .filter(|k| k.0 > 1)
            .copied()
            .collect();
        if !others.is_empty() {
            self.fail(format!("dirty ring entries for unknown slots: {others:x?}"));
        }
        let k = if all { n } else { n / 2 };
        if k < n && k > 0 {
            self.event("ring-partial");
        }
        let first = self.dirty.ring_next - n;
        // RESET on the first k entries, in order (whole entries written back).
        let mut i = first;
        let f = self.dirty.ring.as_ref().expect("ring");
        while i < first + k {
            let at = i % u64::from(entries);
            let m = (u64::from(entries) - at).min(first + k - i);
            let mut buf = vec![0u8; (16 * m) as usize];
            f.read_exact_at(&mut buf, RING_BASE + 16 * at)
                .expect("ring read");
            for e in buf.chunks_mut(16) {
                let flags = u32::from_le_bytes(e[0..4].try_into().expect("4 bytes"));
                e[0..4].copy_from_slice(&(flags | RING_RESET).to_le_bytes());
            }
            f.write_all_at(&buf, RING_BASE + 16 * at)
                .expect("ring write");
            i += m;
        }
        let r = self.g.vm.reset_dirty_rings();
        self.log(format_args!(
            "  ring harvest: {k} of {n} entries, reset -> {r:?}"
        ));
        if r != Ok(k as i64) {
            self.fail(format!(
                "KVM_RESET_DIRTY_RINGS after {k} entries set to RESET: {r:?}"
            ));
        }
        if k > 0 {
            let back = self.ring_read(first, k);
            if let Some(e) = back.iter().find(|e| e.0 != 0) {
                self.fail(format!(
                    "a dirty ring entry reset by KVM_RESET_DIRTY_RINGS has flags {:#x}",
                    e.0
                ));
            }
        }
        let harvested: Vec<Key> = self.dirty.ring_seen.drain(..k as usize).collect();
        for key in &harvested {
            if let Some(c) = self.dirty.ring_pending.get_mut(key) {
                *c -= 1;
                if *c == 0 {
                    self.dirty.ring_pending.remove(key);
                }
            }
        }
        let pending: Set<Key> = self.dirty.ring_pending.keys().copied().collect();
        self.dirty.must = pending.clone();
        self.dirty.may = pending.clone();
        self.dirty.step_must.clear();
        for slot in [0u32, 1] {
            let rep: Set<u64> = harvested
                .iter()
                .filter(|k| k.0 == slot)
                .map(|k| k.1)
                .collect();
            let still: Set<u64> = pending
                .iter()
                .filter(|k| k.0 == slot)
                .map(|k| k.1)
                .collect();
            self.window_check(slot, &rep, &still);
        }
    }

    /// The checks after every step (see the module comment), then the audit.
    fn after_step(&mut self, step: usize, op: &Op) {
        self.ring_sync();
        // Pages added to `must` are in the log already.
        let keys = std::mem::take(&mut self.dirty.step_must);
        if !keys.is_empty() {
            let missing: Vec<Key> = if self.dirty.ring_entries().is_some() {
                keys.iter()
                    .filter(|k| !self.dirty.ring_pending.contains_key(k))
                    .copied()
                    .collect()
            } else {
                let st = self.g.vm.state();
                keys.iter()
                    .filter(|k| {
                        st.memslots
                            .get(k.0 as u16)
                            .and_then(|s| s.dirty_bitmap.as_ref())
                            .is_some_and(|b| !b.test(k.1))
                    })
                    .copied()
                    .collect()
            };
            if !missing.is_empty() {
                let mut missing = missing;
                missing.sort_unstable();
                missing.dedup();
                self.fail(format!(
                    "dirty log ({:?}): after op {step} {op:?} pages {missing:x?} (slot, page) were dirtied but are not in the log",
                    self.dirty.flavour
                ));
            }
        }
        // Writable leaves of logging slots: `may` (shadow paging), ring entries.
        let ring = self.dirty.ring_entries().is_some();
        if !self.tdp || ring {
            let st = self.g.vm.state();
            let mut unlogged = None;
            for s in st.memslots.iter().filter(|s| s.dirty_logging()) {
                let Some(meta) = st.mmu.slot_meta(s.id) else {
                    continue;
                };
                for (gfn, level, p) in meta.rmap.iter_all() {
                    let spte = st.mmu.spte(p);
                    if !(spte.is_shadow_present() && spte.is_writable()) {
                        continue;
                    }
                    let end = (gfn + kvm_pages_per_hpage(level)).min(s.end_gfn());
                    for g in gfn.max(s.base_gfn)..end {
                        let key = (u32::from(s.id), g - s.base_gfn);
                        if !self.tdp {
                            self.dirty.may.insert(key);
                        }
                        if ring && !self.dirty.ring_pending.contains_key(&key) {
                            unlogged = Some((g, level));
                        }
                    }
                }
            }
            drop(st);
            if let Some((g, level)) = unlogged {
                self.fail(format!(
                    "after op {step} {op:?}: writable level-{level} leaf over gfn {g:#x} of a logging slot, which has no dirty-ring entry"
                ));
            }
        }
        self.audit(step, op);
    }

    /// The end of an input: invalidations end, and a last harvest of everything.
    fn finish(&mut self) {
        self.end_invalidations();
        if self.dirty.ring_entries().is_some() {
            self.harvest_ring(true);
        } else {
            for slot in [0, 1] {
                self.harvest_bitmap(slot, 0, 0);
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
        f.after_step(step, op);
    }
    f.finish();
    if let Err(e) = f.g.audit() {
        f.fail(format!("audit failed after the final harvest: {e}"));
    }
    f.seek_done();
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
        eprintln!(
            "stats {nonzero:?} checked {:?} dirty [harvests, reported, must checked, ring full, inval EAGAIN, host events, discards skipped, copy pages compared] {:?}",
            f.checked, f.dirty.stats
        );
    }
});

/// The non-empty `sep`-separated items of the environment variable `var`.
fn env_list(var: &str, sep: char) -> Vec<String> {
    std::env::var(var)
        .map(|v| {
            v.split(sep)
                .filter(|k| !k.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}
