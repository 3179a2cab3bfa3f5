//! Fuzz target `run_insns`: random instruction bytes run by the simulated vCPU
//! (KVM_RUN) in a random mode on a small guest, with checks after every exit.
//!
//! An input is a fixed header, the code, then a tail that `arbitrary` reads lazily:
//!
//! - header (72 bytes): mode (real; 32-bit protected mode without paging, with
//!   2-level paging or PAE; long mode 4- or 5-level; each protected mode at CPL0 or
//!   CPL3), flags (TDP or shadow MMU, large pages, trap or interrupt gates, DPL3
//!   gates, RFLAGS.TF/IF/AC, slot 0 logging from the start), the instruction budget,
//!   the code length, the stack pointer, more flags (CR0.WP off, EFER.NXE off, an I/O
//!   bitmap, single-step from the start, IOPL 3, DF, SMEP/SMAP/UMIP/FSGSBASE/PCID in
//!   the guest's CPUID), whether to run the differential check (below) and eight
//!   registers;
//! - the code (up to 255 bytes) at CODE, where RIP starts;
//! - the tail: up to 8 gpte edits (flag bits flipped in an entry at any level of the
//!   identity map), up to 4 extra mappings (a random gva to a page of a slot, the
//!   MMIO hole or no memory, with random flags), bytes for the read-only slot, a
//!   second code chunk, random GDT descriptors and the I/O bitmap; then, lazily, the
//!   data of MMIO and port reads and a host event before each KVM_RUN (dirty-log
//!   harvests, logging toggled on slot 0, immediate_exit, kick, single-step on/off,
//!   an exception queued with KVM_SET_VCPU_EVENTS, KVM_SET_SREGS of GET_SREGS, host
//!   discard / migrate / write-protect / age, invalidation start and end).
//!
//! Guest memory is one host mapping holding three memslots (1 MiB at gpa 0, a 64 KiB
//! read-only slot at 1 MiB, and a 64 KiB dirty-logged slot at 1 MiB + 128 KiB, with
//! the 64 KiB MMIO hole between them) separated by canary pages that no slot maps.
//! The identity map covers all of it; gva 0xe000_0000 maps the hole and
//! 0xe000_1000 the APIC page (no memory). The GDT has flat 64/32/16-bit code and
//! data segments at DPL0 and 3 and a TSS, the IDT (or IVT) 256 gates to a sled of
//! HLTs, so every exception is delivered and exits with HLT.
//!
//! KVM_RUN repeats up to 32 times (each run bounded by the simulator's instruction
//! budget, 16 to 1039 instructions from the header) until a shutdown, an emulation
//! failure or a failed entry. After
//! every return:
//! - immediate_exit gives EINTR with exit_reason untouched, a kick EINTR with
//!   KVM_EXIT_INTR (unless an MMIO or IO exit is completed first);
//! - KVM_RUN returned 0 or EINTR (no other errno: all host memory exists; a fault
//!   KVM retries, under a host invalidation or with CR3 outside every memslot,
//!   runs until the budget ends the run with EINTR, as a signal would on KVM);
//! - the exit fields are consistent: a known exit reason; MMIO: len 1..=8, within
//!   one page, the page has no slot (or is read-only and the access a write); IO:
//!   direction 0/1, size 1/2/4, count >= 1, data_offset the PIO page and the data
//!   inside the mmap area; internal error: suberror and ndata in range; debug: #DB
//!   or #BP, and a #DB's pc is the linear RIP (kvm_get_linear_rip);
//! - RIP is canonical in 64-bit mode and below 4 GiB otherwise; RFLAGS has bit 1
//!   set and no reserved bit; SS.DPL is the CPL (CS.RPL) in protected mode; the
//!   sregs pass KVM_SET_SREGS's checks;
//! - the canary pages, and the read-only slot, are unchanged (nothing outside the
//!   memslots is touched, the read-only slot is never written);
//! - `Vm::audit` holds;
//! - a dirty-log harvest (KVM_GET_DIRTY_LOG into a user buffer) reports every page
//!   of a logging slot whose bytes changed since the last harvest (host writes of a
//!   discard excepted) and no bit past the slot's end.
//!
//!
//! Differential check (header byte 7, bit 0): the same input runs again on the
//! other MMU (TDP for shadow, shadow for TDP) and every KVM_RUN must return the
//! same result, exit reason, registers, sregs and exit union, and guest memory must
//! end the same (the A and D bits of the table area aside: shadow paging sets them
//! at faults, TDP at every walk). Only inputs that give the MMUs no room to differ
//! are compared: no discard or invalidation event, and CR0.PG/WP, CR3, CR4, EFER
//! and the table area (but for A/D bits) as set up, since after a guest write to
//! its tables either MMU may use a stale translation until a flush, as a TLB may
//! (the shadow MMU's emulated write drops it at once, TDP keeps the decoded code
//! page until the end of a batch).
//!
//! `RUN_FUZZ_VERBOSE=1` prints the setup, every exit and whether the differential
//! check ran.

#![no_main]

use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use kvmmmu_core::errno::Errno;
use kvmmmu_core::hostmem::HostRegion;
use kvmmmu_core::memslot::RegionIoctl;
use kvmmmu_core::uaccess::ProcessVm;
use kvmmmu_core::uapi::{
    self, kvm_dirty_log, kvm_userspace_memory_region2, kvm_vcpu_events, run_off,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY,
};
use kvmmmu_core::vcpu::run::*;
use kvmmmu_core::vcpu::sregs::{
    check_sregs, CR0_ET, CR0_PE, CR0_PG, CR0_WP, CR4_LA57, CR4_PAE, CR4_PSE, EFER_LMA, EFER_LME,
    EFER_NXE,
};
use kvmmmu_core::vcpu::{Vcpu, KVM_PIO_PAGE_OFFSET, VCPU_MMAP_SIZE};
use kvmmmu_core::vm::Vm;
use libfuzzer_sys::fuzz_target;

// ---------------------------------------------------------------- guest layout

const PAGE: u64 = 4096;
/// (slot id, gpa, size, host offset, flags) of the three memslots.
const SLOT0: (u32, u64, u64, u64) = (0, 0, 0x10_0000, 0x1000);
const SLOT_RO: (u32, u64, u64, u64) = (1, 0x10_0000, 0x1_0000, 0x10_2000);
const SLOT_LOG: (u32, u64, u64, u64) = (2, 0x12_0000, 0x1_0000, 0x11_3000);
const HOLE: u64 = 0x11_0000;
const HOST_SIZE: u64 = 0x12_4000;
const CANARIES: [u64; 4] = [0, 0x10_1000, 0x11_2000, 0x12_3000];
const CANARY: u8 = 0xcc;
/// The identity map covers slot 0, the read-only slot, the hole and the log slot.
const IDENT_END: u64 = 0x13_0000;
const MMIO_GVA: u64 = 0xe000_0000;
const APIC_GPA: u64 = 0xfee0_0000;

const CODE: u64 = 0x1000;
const CODE2: u64 = 0x7000;
const GDT: u64 = 0x3000;
const IDT: u64 = 0x4000;
const TSS: u64 = 0x5000;
const STUBS: u64 = 0x6000;
const STACK0: u64 = 0x9000;
const STACK3: u64 = 0xb000;
const TABLES: u64 = 0x1_0000;
const TABLES_END: u64 = 0x3_0000;
const DATA: u64 = 0x3_0000;

const P: u64 = 1;
const W: u64 = 1 << 1;
const U: u64 = 1 << 2;
const A: u64 = 1 << 5;
const PS: u64 = 1 << 7;
const NX: u64 = 1 << 63;
const TABLE_FLAGS: u64 = P | W | U | A;

const MAX_RUNS: usize = 32;
const HEADER: usize = 72;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Real,
    Pm32,
    Pg32,
    Pae,
    Long4,
    Long5,
}

impl Mode {
    fn levels(self) -> u8 {
        match self {
            Mode::Real | Mode::Pm32 => 0,
            Mode::Pg32 => 2,
            Mode::Pae => 3,
            Mode::Long4 => 4,
            Mode::Long5 => 5,
        }
    }
    fn long(self) -> bool {
        matches!(self, Mode::Long4 | Mode::Long5)
    }
    fn wide(self) -> bool {
        self.levels() > 2
    }
}

/// Flag bits a gpte edit flips.
fn flip_bits(f: u16, wide: bool) -> u64 {
    const BITS: [u64; 12] = [P, W, U, 1 << 3, 1 << 4, A, 1 << 6, PS, 1 << 8, 0xe00, 0, 0];
    let mut v = 0;
    for (i, b) in BITS.iter().enumerate() {
        if f & (1 << i) != 0 {
            v |= b;
        }
    }
    if f & (1 << 12) != 0 {
        // A reserved bit: above MAXPHYADDR, or bit 21 of a 32-bit PDE.
        v |= if wide { 1 << 51 } else { 1 << 21 };
    }
    if wide && f & (1 << 13) != 0 {
        v |= NX;
    }
    if wide && f & (1 << 14) != 0 {
        v |= 1 << 12; // PAT of a large page, or an address bit of a table
    }
    v
}

#[derive(Arbitrary, Debug)]
struct GpteEdit {
    level: u8,
    index: u16,
    flip: u16,
}

#[derive(Arbitrary, Debug)]
struct ExtraMap {
    gva: u64,
    /// 0: slot 0, 1: read-only slot, 2: log slot, 3: the hole, 4: no memory.
    target: u8,
    page: u16,
    flags: u16,
}

#[derive(Arbitrary, Debug)]
enum Event {
    None,
    Harvest(bool),
    ToggleLog,
    ImmediateExit,
    Kick,
    SingleStep(bool),
    Inject { nr: u8, error: Option<u32> },
    SregsRoundTrip,
    Discard(u16, u8),
    Migrate(u16),
    WriteProtect(u16, u8),
    Age(u16, u8, u8),
    InvalStart(u16, u8),
    InvalEnd,
}

/// The header, decoded.
struct Setup {
    mode: Mode,
    cpl: u8,
    tdp: bool,
    large: bool,
    trap_gates: bool,
    dpl3_gates: bool,
    rflags: u64,
    log0: bool,
    budget: u64,
    rsp: u64,
    no_wp: bool,
    no_nx: bool,
    iomap: bool,
    step: bool,
    features: bool,
    regs: [u64; 8],
}

impl Setup {
    fn decode(h: &[u8; HEADER]) -> Setup {
        let (mode, cpl) = match h[0] % 11 {
            0 => (Mode::Real, 0),
            1 => (Mode::Pm32, 0),
            2 => (Mode::Pm32, 3),
            3 => (Mode::Pg32, 0),
            4 => (Mode::Pg32, 3),
            5 => (Mode::Pae, 0),
            6 => (Mode::Pae, 3),
            7 => (Mode::Long4, 0),
            8 => (Mode::Long4, 3),
            9 => (Mode::Long5, 0),
            _ => (Mode::Long5, 3),
        };
        let f = h[1];
        let g = h[6];
        let mut rflags = 2;
        for (bit, fl) in [(4, 1 << 8), (5, 1 << 9), (6, 1 << 18)] {
            if f & (1 << bit) != 0 {
                rflags |= fl;
            }
        }
        if g & (1 << 4) != 0 {
            rflags |= 3 << 12;
        }
        if g & (1 << 5) != 0 {
            rflags |= 1 << 10;
        }
        let regs: [u64; 8] = std::array::from_fn(|i| {
            u64::from_le_bytes(h[8 + 8 * i..16 + 8 * i].try_into().unwrap())
        });
        let top = if cpl == 3 { STACK3 } else { STACK0 };
        let rsp = if h[5] & 0x80 != 0 {
            regs[6]
        } else {
            top - 8 * u64::from(h[5] & 0x7f)
        };
        Setup {
            mode,
            cpl,
            tdp: f & 1 != 0,
            large: f & 2 != 0,
            trap_gates: f & 4 != 0,
            dpl3_gates: f & 8 != 0,
            rflags,
            log0: f & 0x80 != 0,
            budget: 16 + u64::from(u16::from_le_bytes([h[2], h[3]])) % 1024,
            rsp,
            no_wp: g & 1 != 0,
            no_nx: g & 2 != 0,
            iomap: g & 4 != 0,
            step: g & 8 != 0,
            features: g & 0x40 != 0,
            regs,
        }
    }
}

// ---------------------------------------------------------------- the harness

struct Fuzz {
    vm: Arc<Vm>,
    vcpu: Arc<Vcpu>,
    host: Arc<HostRegion>,
    mode: Mode,
    tdp: bool,
    next_table: u64,
    /// The tables of the identity path (level -> table gpa), for gpte edits.
    ident_tables: Vec<(u8, u64)>,
    ro_bytes: Vec<u8>,
    /// Slot 0's logging flag, and the bytes of each logging slot at its last harvest.
    log0: bool,
    snap: [Option<Vec<u8>>; 3],
    inval_depth: u32,
    /// For the differential run: what each KVM_RUN returned (result, exit reason,
    /// registers, sregs, exit union), and whether the input stays comparable
    /// between the MMUs (no discard or invalidation; CR0.PG/WP, CR3, CR4 and EFER
    /// as set up and the table area unchanged but for A/D bits, so that no stale
    /// translation can differ: either MMU may use one, as a TLB may).
    trace: Vec<String>,
    comparable: bool,
    /// Instructions per KVM_RUN (the simulator's budget counts whole batches, so it
    /// is set again before each run).
    budget: u64,
    verbose: bool,
    stats: [u64; 3],
}

/// Distinct odd words for the data pages, computed once (loops are slow under
/// coverage instrumentation).
fn data_pattern() -> &'static [u8] {
    static DATA_BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    DATA_BYTES.get_or_init(|| {
        (0..(SLOT0.2 - DATA) / 4)
            .flat_map(|i| ((i as u32).wrapping_mul(0x9e37_79b9) | 1).to_le_bytes())
            .collect()
    })
}

fn slot_of(gpa: u64) -> Option<(u32, u64, u64, u64)> {
    [SLOT0, SLOT_RO, SLOT_LOG]
        .into_iter()
        .find(|s| gpa >= s.1 && gpa < s.1 + s.2)
}

fn region(id: u32, flags: u32, host: &HostRegion) -> kvm_userspace_memory_region2 {
    let s = [SLOT0, SLOT_RO, SLOT_LOG][id as usize];
    kvm_userspace_memory_region2 {
        slot: s.0,
        flags,
        guest_phys_addr: s.1,
        memory_size: s.2,
        userspace_addr: host.addr() + s.3,
        ..Default::default()
    }
}

impl Fuzz {
    fn fail(&self, msg: String) -> ! {
        let st = self.vcpu.state();
        panic!(
            "run_insns ({:?}, {}): {msg}\nregs {:x?}\nsregs {:x?}",
            self.mode,
            if self.tdp { "tdp" } else { "shadow" },
            st.regs,
            st.sregs
        );
    }

    fn log(&self, a: std::fmt::Arguments) {
        if self.verbose {
            eprintln!("{a}");
        }
    }

    /// The host offset of a gpa inside a slot.
    fn off(gpa: u64) -> usize {
        let s = slot_of(gpa).expect("gpa in a slot");
        (s.3 + gpa - s.1) as usize
    }

    fn wr(&self, gpa: u64, b: &[u8]) {
        self.host.write(Self::off(gpa), b).expect("in the region");
    }

    fn rd64(&self, gpa: u64) -> u64 {
        self.host.load(Self::off(gpa), 8).expect("in the region")
    }

    fn read_gpte(&self, gpa: u64) -> u64 {
        if self.mode.wide() {
            self.rd64(gpa)
        } else {
            self.host.load(Self::off(gpa), 4).expect("in the region")
        }
    }

    fn write_gpte(&self, gpa: u64, v: u64) {
        if self.mode.wide() {
            self.wr(gpa, &v.to_le_bytes());
        } else {
            self.wr(gpa, &(v as u32).to_le_bytes());
        }
    }

    fn alloc_table(&mut self) -> Option<u64> {
        if self.next_table >= TABLES_END {
            return None;
        }
        let t = self.next_table;
        self.next_table += PAGE;
        Some(t)
    }

    /// The entry for `gva` at `level` under `root`, creating tables on the way.
    fn entry(&mut self, root: u64, gva: u64, level: u8) -> Option<u64> {
        let levels = self.mode.levels();
        let (bits, size) = if self.mode.wide() { (9, 8) } else { (10, 4) };
        let mut table = root;
        let mut l = levels;
        loop {
            let index = (gva >> (12 + bits * u32::from(l - 1))) & ((1 << bits) - 1);
            let e = table + index * size;
            if slot_of(e).is_none_or(|s| s.0 != SLOT0.0) {
                return None; // an edited entry points away from slot 0
            }
            if l == level {
                return Some(e);
            }
            let v = self.read_gpte(e);
            if v & P == 0 || self.is_large(v, l) {
                let t = self.alloc_table()?;
                let flags = if self.mode == Mode::Pae && l == 3 {
                    P
                } else {
                    TABLE_FLAGS
                };
                self.write_gpte(e, t | flags);
                table = t;
            } else {
                table = v & if self.mode.wide() {
                    0x000f_ffff_ffff_f000
                } else {
                    0xffff_f000
                };
            }
            l -= 1;
        }
    }

    /// Whether `v`, a present entry at `level`, maps a page (PS, not in a PAE PDPTE).
    fn is_large(&self, v: u64, level: u8) -> bool {
        v & PS != 0 && level > 1 && !(self.mode == Mode::Pae && level == 3)
    }

    fn map(&mut self, root: u64, gva: u64, gpa: u64, level: u8, flags: u64) -> bool {
        let Some(e) = self.entry(root, gva, level) else {
            return false;
        };
        self.write_gpte(e, gpa | flags | if level > 1 { PS } else { 0 });
        true
    }

    fn new(s: &Setup, u: &mut Unstructured, code: &[u8]) -> Option<Fuzz> {
        let host = HostRegion::new(HOST_SIZE).ok()?;
        for c in CANARIES {
            host.write(c as usize, &[CANARY; PAGE as usize]).ok()?;
        }
        let vm = Vm::new(0).expect("VM");
        vm.set_tdp(s.tdp).expect("set_tdp");
        let log0 = if s.log0 { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        for (id, flags) in [
            (0, log0),
            (1, KVM_MEM_READONLY),
            (2, KVM_MEM_LOG_DIRTY_PAGES),
        ] {
            vm.set_user_memory_region(&region(id, flags, &host), RegionIoctl::V2)
                .expect("memslot");
        }
        let vcpu = vm.create_vcpu(0).expect("vCPU");
        let mut f = Fuzz {
            vm,
            vcpu,
            host,
            mode: s.mode,
            tdp: s.tdp,
            next_table: TABLES,
            ident_tables: Vec::new(),
            ro_bytes: Vec::new(),
            log0: s.log0,
            snap: [None, None, None],
            inval_depth: 0,
            trace: Vec::new(),
            comparable: true,
            budget: 0,
            verbose: std::env::var_os("RUN_FUZZ_VERBOSE").is_some(),
            stats: [0; 3],
        };
        // Data: distinct words; the HLT sled; the code.
        let data = data_pattern();
        f.wr(DATA, data);
        f.wr(SLOT_LOG.1, &data[..SLOT_LOG.2 as usize]);
        f.wr(STUBS, &[0xf4; PAGE as usize]);
        f.wr(CODE, code);
        f.build_tables(s, u)?;
        f.build_descriptors(s, u)?;
        // The read-only slot and a second code chunk.
        let ro: Vec<u8> = u.arbitrary().ok()?;
        let ro: Vec<u8> = ro.into_iter().take(256).collect();
        f.wr(SLOT_RO.1, &ro);
        let code2: Vec<u8> = u.arbitrary().ok()?;
        f.wr(CODE2, &code2[..code2.len().min(256)]);
        let mut rob = vec![0u8; SLOT_RO.2 as usize];
        f.host.read(SLOT_RO.3 as usize, &mut rob).ok()?;
        f.ro_bytes = rob;
        f.set_cpu(s);
        for slot in [0u32, 2] {
            if slot == 2 || s.log0 {
                f.snap[slot as usize] = Some(f.slot_bytes(slot));
            }
        }
        if s.step {
            f.vcpu.set_guest_debug(0x3, [0; 8]).expect("single-step");
        }
        f.budget = s.budget;
        Some(f)
    }

    fn build_tables(&mut self, s: &Setup, u: &mut Unstructured) -> Option<()> {
        let levels = self.mode.levels();
        if levels == 0 {
            return Some(());
        }
        let root = self.alloc_table()?;
        if self.mode == Mode::Pae {
            for i in 0..4 {
                let pd = self.alloc_table()?;
                self.write_gpte(root + 8 * i, pd | P);
            }
        }
        let leaf = P | W | U;
        if s.large {
            // One 2 MiB (4 MiB without PAE) page over everything.
            self.map(root, 0, 0, 2, leaf);
        } else {
            for page in (0..IDENT_END).step_by(PAGE as usize) {
                self.map(root, page, page, 1, leaf);
            }
        }
        self.map(root, MMIO_GVA, HOLE, 1, leaf);
        self.map(root, MMIO_GVA + PAGE, APIC_GPA, 1, leaf);
        // The tables on the identity path (gva 0), for edits.
        let mut t = root;
        for l in (1..=levels).rev() {
            self.ident_tables.push((l, t));
            let v = self.read_gpte(t);
            if l == 1 || v & P == 0 || self.is_large(v, l) {
                break;
            }
            t = v & 0x000f_ffff_ffff_f000;
        }
        let n: u8 = u.int_in_range(0..=8).ok()?;
        for _ in 0..n {
            let e: GpteEdit = u.arbitrary().ok()?;
            let &(_, table) = &self.ident_tables[usize::from(e.level) % self.ident_tables.len()];
            let entries = if self.mode.wide() { 512 } else { 1024 };
            let size = if self.mode.wide() { 8 } else { 4 };
            let at = table + (u64::from(e.index) % entries) * size;
            let v = self.read_gpte(at) ^ flip_bits(e.flip, self.mode.wide());
            self.write_gpte(at, v);
        }
        let n: u8 = u.int_in_range(0..=4).ok()?;
        for _ in 0..n {
            let m: ExtraMap = u.arbitrary().ok()?;
            let gva = if self.mode.long() {
                let bits = if self.mode == Mode::Long5 { 57 } else { 48 };
                (((m.gva << (64 - bits)) as i64) >> (64 - bits)) as u64 & !0xfff
            } else {
                m.gva & 0xffff_f000
            };
            let p = u64::from(m.page);
            let gpa = match m.target % 5 {
                0 => (p % (SLOT0.2 / PAGE)) * PAGE,
                1 => SLOT_RO.1 + (p % 16) * PAGE,
                2 => SLOT_LOG.1 + (p % 16) * PAGE,
                3 => HOLE + (p % 16) * PAGE,
                _ => 0x4000_0000 + p * PAGE,
            };
            let flags = (P | W | U) ^ flip_bits(m.flags, self.mode.wide());
            self.map(root, gva, gpa, 1, flags & !PS);
        }
        let mut st = self.vcpu.state();
        st.sregs.cr3 = root;
        if self.mode == Mode::Pae {
            drop(st);
            let p: [u64; 4] = std::array::from_fn(|i| self.rd64(root + 8 * i as u64));
            self.vcpu.state().pdptrs = p;
        }
        Some(())
    }

    fn build_descriptors(&mut self, s: &Setup, u: &mut Unstructured) -> Option<()> {
        let dpl = if s.dpl3_gates { 3u64 } else { 0 };
        let ty = if s.trap_gates { 0xf } else { 0xe };
        let attr = (0x80 | (dpl << 5) | ty) << 40;
        let random: [u64; 3] = u.arbitrary().ok()?;
        match self.mode {
            Mode::Real => {
                for v in 0..256u64 {
                    let ivt = (STUBS + 16 * v) as u32; // segment 0
                    self.wr(4 * v, &ivt.to_le_bytes());
                }
            }
            m => {
                let long = m.long();
                let tss_lo = |base: u64, limit: u64| {
                    (limit & 0xffff)
                        | ((base & 0xff_ffff) << 16)
                        | (0x89 << 40)
                        | ((limit >> 16) & 0xf) << 48
                        | ((base >> 24) & 0xff) << 56
                };
                let limit = if s.iomap { 0x68 + 32 } else { 0x67 };
                let gdt: [u64; 12] = [
                    0,
                    if long {
                        0x0020_9a00_0000_0000
                    } else {
                        0x00cf_9a00_0000_ffff
                    },
                    0x00cf_9200_0000_ffff,
                    if long {
                        0x0020_fa00_0000_0000
                    } else {
                        0x00cf_fa00_0000_ffff
                    },
                    0x00cf_f200_0000_ffff,
                    tss_lo(TSS, limit),
                    0, // TSS high half (long mode)
                    0x00cf_9a00_0000_ffff,
                    0x000f_9a00_0000_ffff,
                    random[0],
                    random[1],
                    random[2],
                ];
                for (i, d) in gdt.iter().enumerate() {
                    self.wr(GDT + 8 * i as u64, &d.to_le_bytes());
                }
                if long {
                    self.wr(TSS + 4, &STACK0.to_le_bytes());
                    self.wr(TSS + 0x24, &(STACK0 - 0x800).to_le_bytes());
                } else {
                    self.wr(TSS + 4, &(STACK0 as u32).to_le_bytes());
                    self.wr(TSS + 8, &0x10u32.to_le_bytes());
                }
                if s.iomap {
                    let map: [u8; 32] = u.arbitrary().ok()?;
                    self.wr(TSS + 0x66, &0x68u16.to_le_bytes());
                    self.wr(TSS + 0x68, &map);
                } else {
                    self.wr(TSS + 0x66, &0x68u16.to_le_bytes());
                }
                for v in 0..256u64 {
                    let a = STUBS + 16 * v;
                    let lo = (a & 0xffff) | (0x08 << 16) | attr | ((a >> 16) & 0xffff) << 48;
                    if long {
                        self.wr(IDT + 16 * v, &lo.to_le_bytes());
                        self.wr(IDT + 16 * v + 8, &(a >> 32).to_le_bytes());
                    } else {
                        self.wr(IDT + 8 * v, &lo.to_le_bytes());
                    }
                }
            }
        }
        Some(())
    }

    fn set_cpu(&self, s: &Setup) {
        let mut st = self.vcpu.state();
        let seg = |selector: u16, type_: u8, dpl: u8, long: bool, code: bool| uapi::kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector,
            type_,
            present: 1,
            dpl,
            db: u8::from(!long),
            s: 1,
            l: u8::from(long && code),
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let sr = &mut st.sregs;
        sr.cr4 = 0;
        sr.efer = 0;
        if s.mode == Mode::Real {
            sr.cr0 = CR0_ET;
            let mut r = seg(0, 3, 0, false, false);
            r.limit = 0xffff;
            r.g = 0;
            r.db = 0;
            sr.cs = uapi::kvm_segment { type_: 11, ..r };
            (sr.ds, sr.es, sr.ss, sr.fs, sr.gs) = (r, r, r, r, r);
            sr.idt.base = 0;
            sr.idt.limit = 0x3ff;
        } else {
            sr.cr0 = CR0_PE | CR0_ET;
            let long = s.mode.long();
            if s.mode.levels() > 0 {
                sr.cr0 |= CR0_PG | if s.no_wp { 0 } else { CR0_WP };
            }
            match s.mode {
                Mode::Pg32 => sr.cr4 = CR4_PSE,
                Mode::Pae => {
                    sr.cr4 = CR4_PAE | CR4_PSE;
                    sr.efer = if s.no_nx { 0 } else { EFER_NXE };
                }
                Mode::Long4 | Mode::Long5 => {
                    sr.cr4 = CR4_PAE | if s.mode == Mode::Long5 { CR4_LA57 } else { 0 };
                    sr.efer = EFER_LME | EFER_LMA | if s.no_nx { 0 } else { EFER_NXE };
                }
                _ => {}
            }
            sr.gdt.base = GDT;
            sr.gdt.limit = 12 * 8 - 1;
            sr.idt.base = IDT;
            sr.idt.limit = if long { 256 * 16 - 1 } else { 256 * 8 - 1 };
            sr.tr = uapi::kvm_segment {
                base: TSS,
                limit: if s.iomap { 0x68 + 32 } else { 0x67 },
                selector: 0x28,
                type_: 11,
                present: 1,
                dpl: 0,
                db: 0,
                s: 0,
                l: 0,
                g: 0,
                avl: 0,
                unusable: 0,
                padding: 0,
            };
            let (csel, dsel) = if s.cpl == 3 {
                (0x1b, 0x23)
            } else {
                (0x08, 0x10)
            };
            sr.cs = seg(csel, 11, s.cpl, long, true);
            if long {
                sr.cs.db = 0;
            }
            let d = seg(dsel, 3, s.cpl, false, false);
            (sr.ds, sr.es, sr.ss, sr.fs, sr.gs) = (d, d, d, d, d);
        }
        st.features.pdpe1gb = true;
        st.features.la57 = s.mode == Mode::Long5;
        if s.features {
            // As if KVM_SET_CPUID2 offered them: MOV CR4 may then set them.
            let f = &mut st.features;
            (f.smep, f.smap, f.umip, f.fsgsbase, f.pcid) = (true, true, true, true, true);
        }
        st.mmu.reset_pending = true;
        drop(st);
        let mut r = self.vcpu.get_regs();
        [r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8] = s.regs;
        (r.r9, r.r10, r.r11, r.r12) = (1, 0x1000, 0x7fff_ffff, u64::MAX);
        (r.r13, r.r14, r.r15) = (HOLE, MMIO_GVA, SLOT_LOG.1);
        r.rip = CODE;
        r.rsp = s.rsp;
        r.rflags = s.rflags;
        self.vcpu.set_regs(&r).expect("set_regs");
    }

    fn slot_bytes(&self, slot: u32) -> Vec<u8> {
        let s = [SLOT0, SLOT_RO, SLOT_LOG][slot as usize];
        let mut b = vec![0u8; s.2 as usize];
        self.host.read(s.3 as usize, &mut b).expect("slot memory");
        b
    }

    fn run_u32(&self, off: usize) -> u32 {
        let mut b = [0u8; 4];
        self.vcpu.run_area().read(off, &mut b).expect("kvm_run");
        u32::from_le_bytes(b)
    }

    fn run_bytes(&self, off: usize, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.vcpu.run_area().read(off, &mut b).expect("kvm_run");
        b
    }

    // ------------------------------------------------------------ host events

    /// A page of slot 0's data area or of the log slot, as (hva, first gpa).
    fn host_page(&self, p: u16) -> (u64, u64) {
        let p = u64::from(p);
        if p & 1 == 0 {
            let gpa = DATA + ((p >> 1) % ((SLOT0.2 - DATA) / PAGE)) * PAGE;
            (self.host.addr() + SLOT0.3 + gpa, gpa)
        } else {
            let gpa = SLOT_LOG.1 + ((p >> 1) % (SLOT_LOG.2 / PAGE)) * PAGE;
            (self.host.addr() + SLOT_LOG.3 + gpa - SLOT_LOG.1, gpa)
        }
    }

    /// `n` pages from `p`, clipped to the slot.
    fn host_range(&self, p: u16, n: u8) -> (u64, u64, u64) {
        let (hva, gpa) = self.host_page(p);
        let s = slot_of(gpa).expect("slot");
        let left = (s.1 + s.2 - gpa) / PAGE;
        let n = (u64::from(n % 4) + 1).min(left);
        (hva, gpa, n)
    }

    fn event(&mut self, e: &Event) {
        match *e {
            Event::None => {}
            Event::Harvest(which) => self.harvest(if which { 2 } else { 0 }),
            Event::ToggleLog => {
                if self.inval_depth > 0 {
                    return; // KVM waits for invalidations before a memslot change
                }
                self.log0 = !self.log0;
                let flags = if self.log0 {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                };
                self.vm
                    .set_user_memory_region(&region(0, flags, &self.host), RegionIoctl::V2)
                    .expect("logging toggle");
                self.snap[0] = self.log0.then(|| self.slot_bytes(0));
            }
            Event::ImmediateExit => {
                let _ = self.vcpu.run_area().write(run_off::IMMEDIATE_EXIT, &[1]);
            }
            Event::Kick => self.vcpu.kick(),
            Event::SingleStep(on) => {
                let control = if on { 0x3 } else { 0 };
                self.vcpu
                    .set_guest_debug(control, [0; 8])
                    .expect("guest debug");
            }
            Event::Inject { nr, error } => {
                let mut ev = kvm_vcpu_events::default();
                ev.exception.injected = 1;
                ev.exception.nr = nr % 32;
                ev.exception.has_error_code = u8::from(error.is_some());
                ev.exception.error_code = error.unwrap_or(0);
                let r = self.vcpu.ioctl(
                    uapi::KVM_SET_VCPU_EVENTS,
                    &ev as *const kvm_vcpu_events as u64,
                    &mut ProcessVm,
                );
                if let Err(e) = r {
                    if e != Errno::EINVAL {
                        self.fail(format!("KVM_SET_VCPU_EVENTS: {e:?}"));
                    }
                }
            }
            Event::SregsRoundTrip => {
                let s = self.vcpu.get_sregs();
                if let Err(e) = self.vcpu.set_sregs(&s) {
                    self.fail(format!("KVM_SET_SREGS of KVM_GET_SREGS: {e:?}"));
                }
            }
            Event::Discard(p, n) => {
                self.comparable = false;
                let (hva, gpa, n) = self.host_range(p, n);
                if !self.tdp {
                    let st = self.vm.state();
                    if (gpa >> 12..(gpa >> 12) + n)
                        .any(|g| !st.mmu.gfn_sps_with_gptes(g).is_empty())
                    {
                        // KVM does not see host writes to the tables it shadows.
                        return;
                    }
                }
                self.vm.host_discard(hva, n * PAGE).expect("host_discard");
                // Host writes are not logged: the VMM's copy takes the new bytes.
                let s = slot_of(gpa).expect("slot");
                if let Some(snap) = self.snap[s.0 as usize].as_mut() {
                    let at = (gpa - s.1) as usize;
                    snap[at..at + (n * PAGE) as usize].fill(0);
                }
            }
            Event::Migrate(p) => {
                let (hva, _, _) = self.host_range(p, 0);
                self.vm.host_migrate(hva).expect("host_migrate");
            }
            Event::WriteProtect(p, n) => {
                let (hva, _, n) = self.host_range(p, n);
                self.vm
                    .host_write_protect(hva, n * PAGE)
                    .expect("host_write_protect");
            }
            Event::Age(p, n, how) => {
                let (hva, _, n) = self.host_range(p, n);
                self.vm.host_age(hva, n * PAGE, how & 1 != 0, how & 2 != 0);
            }
            Event::InvalStart(p, n) => {
                self.comparable = false;
                if self.inval_depth < 2 {
                    let (hva, _, n) = self.host_range(p, n);
                    self.vm.host_invalidate_start(hva, n * PAGE);
                    self.inval_depth += 1;
                }
            }
            Event::InvalEnd => {
                if self.inval_depth > 0 {
                    self.vm.host_invalidate_end().expect("invalidate end");
                    self.inval_depth -= 1;
                }
            }
        }
    }

    /// KVM_GET_DIRTY_LOG of a logging slot into a user buffer: every page whose bytes
    /// changed since the last harvest is reported, nothing past the slot's end.
    fn harvest(&mut self, slot: u32) {
        let Some(old) = self.snap[slot as usize].take() else {
            return;
        };
        let npages = old.len() / PAGE as usize;
        let nwords = npages.div_ceil(64);
        let mut buf = vec![0xa5a5_a5a5_a5a5_a5a5u64; nwords + 1];
        let log = kvm_dirty_log {
            slot,
            padding1: 0,
            dirty_bitmap: buf.as_mut_ptr() as u64,
        };
        if let Err(e) = self.vm.get_dirty_log(&log, &mut ProcessVm) {
            self.fail(format!("KVM_GET_DIRTY_LOG of slot {slot}: {e:?}"));
        }
        if buf[nwords] != 0xa5a5_a5a5_a5a5_a5a5 {
            self.fail(format!(
                "KVM_GET_DIRTY_LOG of slot {slot} wrote past the bitmap"
            ));
        }
        let now = self.slot_bytes(slot);
        let mut lost = Vec::new();
        for p in 0..npages {
            let r = p * PAGE as usize..(p + 1) * PAGE as usize;
            let reported = buf[p / 64] >> (p % 64) & 1 != 0;
            if reported {
                self.stats[1] += 1;
            }
            if old[r.clone()] != now[r] && !reported {
                lost.push(p);
            }
        }
        self.stats[0] += 1;
        if !lost.is_empty() {
            self.fail(format!(
                "dirty log: slot {slot} pages {lost:x?} changed since the last harvest but are not reported"
            ));
        }
        self.snap[slot as usize] = Some(now);
    }

    // ------------------------------------------------------------ the checks

    fn check_exit(&self, reason: u32) {
        let u = run_off::EXIT_UNION;
        match reason {
            KVM_EXIT_MMIO => {
                let gpa = u64::from_le_bytes(self.run_bytes(u, 8).try_into().unwrap());
                let len = self.run_u32(u + 16);
                let write = self.run_bytes(u + 20, 1)[0];
                if !(1..=8).contains(&len) || write > 1 {
                    self.fail(format!("MMIO exit: len {len}, is_write {write}"));
                }
                if gpa >> 12 != (gpa + u64::from(len) - 1) >> 12 {
                    self.fail(format!("MMIO exit at {gpa:#x} len {len} crosses a page"));
                }
                match slot_of(gpa) {
                    None => {}
                    Some(s) if s.0 == SLOT_RO.0 && write == 1 => {}
                    Some(s) => self.fail(format!(
                        "MMIO exit (write {write}) at {gpa:#x} inside slot {}",
                        s.0
                    )),
                }
            }
            KVM_EXIT_IO => {
                let b = self.run_bytes(u, 16);
                let (dir, size) = (b[0], b[1]);
                let count = u32::from_le_bytes(b[4..8].try_into().unwrap());
                let off = u64::from_le_bytes(b[8..16].try_into().unwrap());
                let bytes = u64::from(size) * u64::from(count);
                if dir > 1
                    || !matches!(size, 1 | 2 | 4)
                    || count == 0
                    || off != (KVM_PIO_PAGE_OFFSET as u64) * PAGE
                    || off + bytes > VCPU_MMAP_SIZE as u64
                    || bytes > PAGE
                {
                    self.fail(format!(
                        "IO exit: direction {dir} size {size} count {count} data_offset {off:#x}"
                    ));
                }
            }
            KVM_EXIT_INTERNAL_ERROR => {
                let sub = self.run_u32(u);
                let ndata = self.run_u32(u + 4);
                if sub == KVM_INTERNAL_ERROR_EMULATION {
                    let n = self.run_bytes(u + 16, 1)[0];
                    if n > 15 {
                        self.fail(format!("emulation failure with {n} instruction bytes"));
                    }
                }
                if ndata > 16 {
                    self.fail(format!("internal error {sub} with ndata {ndata}"));
                }
            }
            KVM_EXIT_DEBUG => {
                let ex = self.run_u32(u);
                if ex != 1 && ex != 3 {
                    self.fail(format!("debug exit with exception {ex}"));
                }
                // kvm_inject_emulated_db / kvm_vcpu_do_singlestep: pc is
                // kvm_get_linear_rip, RIP in 64-bit mode, else (u32)(CS.base + RIP).
                let pc = u64::from_le_bytes(self.run_bytes(u + 8, 8).try_into().unwrap());
                let (r, sr) = (self.vcpu.get_regs(), self.vcpu.get_sregs());
                let linear = if sr.efer & EFER_LMA != 0 && sr.cs.l != 0 {
                    r.rip
                } else {
                    sr.cs.base.wrapping_add(r.rip) & 0xffff_ffff
                };
                if ex == 1 && pc != linear {
                    self.fail(format!(
                        "#DB exit with pc {pc:#x}, but the linear RIP is {linear:#x}"
                    ));
                }
            }
            KVM_EXIT_HLT
            | KVM_EXIT_SHUTDOWN
            | KVM_EXIT_FAIL_ENTRY
            | KVM_EXIT_DIRTY_RING_FULL
            | KVM_EXIT_INTR
            | KVM_EXIT_UNKNOWN => {}
            r => self.fail(format!("unknown exit reason {r}")),
        }
    }

    fn check_state(&self) {
        let st = self.vcpu.state();
        let (r, s) = (st.regs, st.sregs);
        let features = st.features;
        drop(st);
        let lma = s.efer & EFER_LMA != 0;
        if lma && s.cs.l != 0 {
            let bits = if s.cr4 & CR4_LA57 != 0 { 57 } else { 48 };
            if ((r.rip << (64 - bits)) as i64 >> (64 - bits)) as u64 != r.rip {
                self.fail(format!("RIP {:#x} not canonical in 64-bit mode", r.rip));
            }
        } else if r.rip >> 32 != 0 {
            self.fail(format!("RIP {:#x} above 4 GiB outside 64-bit mode", r.rip));
        }
        const RESERVED: u64 = (1 << 3) | (1 << 5) | (1 << 15) | !0x3f_ffff;
        if r.rflags & 2 == 0 || r.rflags & RESERVED != 0 {
            self.fail(format!("RFLAGS {:#x}", r.rflags));
        }
        let vm86 = r.rflags & (1 << 17) != 0;
        if s.cr0 & CR0_PE != 0 && !vm86 && s.ss.dpl != (s.cs.selector & 3) as u8 {
            self.fail(format!(
                "SS.DPL {} but CS.RPL {} (CPL)",
                s.ss.dpl,
                s.cs.selector & 3
            ));
        }
        if let Err(e) = check_sregs(&features, &s) {
            self.fail(format!("KVM_SET_SREGS would refuse the state: {e:?}"));
        }
    }

    fn check_memory(&self) {
        let mut b = vec![0u8; PAGE as usize];
        for c in CANARIES {
            self.host.read(c as usize, &mut b).expect("canary");
            // Slice comparisons (memcmp) first: byte loops are slow under coverage.
            if b[..] == [CANARY; PAGE as usize][..] {
                continue;
            }
            if let Some(i) = b.iter().position(|&x| x != CANARY) {
                self.fail(format!(
                    "host memory outside every memslot changed at host offset {:#x}",
                    c as usize + i
                ));
            }
        }
        let ro = self.slot_bytes(1);
        if ro == self.ro_bytes {
            // unchanged
        } else if let Some(i) = ro.iter().zip(&self.ro_bytes).position(|(a, b)| a != b) {
            self.fail(format!(
                "the read-only slot changed at gpa {:#x}",
                SLOT_RO.1 + i as u64
            ));
        }
        if let Err(e) = self.vm.audit() {
            self.fail(format!("audit: {e}"));
        }
    }

    /// Userspace's side of a read exit: the data from the input.
    fn answer(&self, reason: u32, u: &mut Unstructured) {
        let o = run_off::EXIT_UNION;
        match reason {
            KVM_EXIT_MMIO if self.run_bytes(o + 20, 1)[0] == 0 => {
                let d: [u8; 8] = u.arbitrary().unwrap_or([0xff; 8]);
                let _ = self.vcpu.run_area().write(o + 8, &d);
            }
            KVM_EXIT_IO if self.run_bytes(o, 1)[0] == KVM_EXIT_IO_IN => {
                let b = self.run_bytes(o, 16);
                let n =
                    usize::from(b[1]) * u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize;
                let mut d = vec![0u8; n.min(PAGE as usize)];
                let _ = u.fill_buffer(&mut d);
                let _ = self
                    .vcpu
                    .run_area()
                    .write(KVM_PIO_PAGE_OFFSET * PAGE as usize, &d);
            }
            _ => {}
        }
    }

    fn run(&mut self, u: &mut Unstructured) {
        // Whether the last exit is one KVM completes on the next KVM_RUN.
        let mut pending = false;
        let s0 = self.vcpu.get_sregs();
        let tables0 = self.table_area();
        let paging = |s: &uapi::kvm_sregs| (s.cr0 & (CR0_PG | CR0_WP), s.cr3, s.cr4, s.efer);
        for i in 0..MAX_RUNS {
            let ev: Event = if u.is_empty() {
                Event::None
            } else {
                u.arbitrary().unwrap_or(Event::None)
            };
            self.event(&ev);
            self.vcpu.set_instruction_budget(Some(self.budget));
            let before = self.run_u32(run_off::EXIT_REASON);
            let r = self.vcpu.run();
            let _ = self.vcpu.run_area().write(run_off::IMMEDIATE_EXIT, &[0]);
            let reason = self.run_u32(run_off::EXIT_REASON);
            // Without an exit to complete (complete_userspace_io runs first and may
            // exit again), immediate_exit is EINTR with exit_reason untouched and a
            // kick is EINTR with KVM_EXIT_INTR.
            if !pending {
                match ev {
                    Event::ImmediateExit if r != Err(Errno::EINTR) || reason != before => self
                        .fail(format!(
                            "KVM_RUN with immediate_exit: {r:?}, exit {before} -> {reason}"
                        )),
                    Event::Kick if r != Err(Errno::EINTR) || reason != KVM_EXIT_INTR => {
                        self.fail(format!("KVM_RUN after a kick: {r:?}, exit {reason}"))
                    }
                    _ => {}
                }
            }
            pending = r == Ok(0) && matches!(reason, KVM_EXIT_MMIO | KVM_EXIT_IO);
            self.stats[2] += 1;
            let sr = self.vcpu.get_sregs();
            if paging(&sr) != paging(&s0) || self.comparable && self.table_area() != tables0 {
                self.comparable = false;
            }
            self.trace.push(format!(
                "run {i}: {r:?} exit {reason} {:x?} {sr:x?} {:02x?}",
                self.vcpu.get_regs(),
                self.run_bytes(run_off::EXIT_UNION, 32)
            ));
            self.log(format_args!(
                "run {i}: {ev:?} -> {r:?} exit {reason} rip {:#x}",
                self.vcpu.get_regs().rip
            ));
            self.check_state();
            self.check_memory();
            match r {
                Ok(0) => {}
                // immediate_exit, a kick, or the budget used up: run on.
                Err(Errno::EINTR) => continue,
                other => self.fail(format!("KVM_RUN returned {other:?} (exit {reason})")),
            }
            self.check_exit(reason);
            if matches!(
                reason,
                KVM_EXIT_SHUTDOWN | KVM_EXIT_INTERNAL_ERROR | KVM_EXIT_FAIL_ENTRY
            ) {
                break;
            }
            self.answer(reason, u);
        }
        while self.inval_depth > 0 {
            self.vm.host_invalidate_end().expect("invalidate end");
            self.inval_depth -= 1;
        }
        self.harvest(0);
        self.harvest(2);
        self.check_memory();
    }
}

impl Fuzz {
    /// The table area with the A and D bits masked (shadow paging sets them at
    /// faults, TDP at every walk).
    fn table_area(&self) -> Vec<u8> {
        let mut m = vec![0u8; (TABLES_END - TABLES) as usize];
        self.host
            .read(Self::off(TABLES), &mut m)
            .expect("table area");
        for e in m.iter_mut().step_by(4) {
            *e &= !0x60;
        }
        m
    }
}

/// One execution of an input; None if the guest could not be built.
fn execute(s: &Setup, code: &[u8], tail: &[u8]) -> Option<Fuzz> {
    let mut u = Unstructured::new(tail);
    let mut f = Fuzz::new(s, &mut u, code)?;
    f.log(format_args!(
        "mode {:?} cpl {} tdp {} budget {} code {code:02x?}",
        s.mode, s.cpl, s.tdp, s.budget
    ));
    f.check_memory();
    f.run(&mut u);
    f.log(format_args!(
        "stats [harvests, reported, runs] {:?}",
        f.stats
    ));
    Some(f)
}

/// Guest memory as the differential run compares it: slot 0 with the A and D bits
/// of the table area masked (shadow paging sets them at faults, TDP at every walk),
/// and the log slot.
fn comparable_memory(f: &Fuzz) -> Vec<u8> {
    let mut m = f.slot_bytes(0);
    m[TABLES as usize..TABLES_END as usize].copy_from_slice(&f.table_area());
    m.extend(f.slot_bytes(2));
    m
}

fuzz_target!(|data: &[u8]| {
    let mut h = [0u8; HEADER];
    let n = data.len().min(HEADER);
    h[..n].copy_from_slice(&data[..n]);
    let rest = &data[n..];
    let code_len = usize::from(h[4]).min(rest.len());
    let (code, tail) = rest.split_at(code_len);
    let mut s = Setup::decode(&h);
    let Some(a) = execute(&s, code, tail) else {
        return;
    };
    if std::env::var_os("RUN_FUZZ_VERBOSE").is_some() {
        eprintln!("differential: {} comparable: {}", h[7] & 1, a.comparable);
    }
    if h[7] & 1 == 0 || !a.comparable {
        return;
    }
    // Differential: the same input on the other MMU gives the same runs and memory.
    s.tdp = !s.tdp;
    let Some(b) = execute(&s, code, tail) else {
        return;
    };
    if !b.comparable {
        return;
    }
    for (x, y) in a.trace.iter().zip(&b.trace) {
        assert!(
            x == y,
            "run_insns ({:?}): tdp={} and tdp={} differ:\n{x}\n{y}",
            s.mode,
            a.tdp,
            b.tdp
        );
    }
    assert_eq!(
        a.trace.len(),
        b.trace.len(),
        "runs with tdp={} and tdp={}",
        a.tdp,
        b.tdp
    );
    let (ma, mb) = (comparable_memory(&a), comparable_memory(&b));
    if ma != mb {
        let i = ma.iter().zip(&mb).position(|(x, y)| x != y).unwrap_or(0);
        panic!(
            "run_insns ({:?}): memory differs between tdp={} and tdp={} at offset {i:#x} of slot 0 + log slot: {:#x} vs {:#x}",
            s.mode, a.tdp, b.tdp, ma[i], mb[i]
        );
    }
});
