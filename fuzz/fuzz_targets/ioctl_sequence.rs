//! Fuzz target `ioctl_sequence`: random sequences of ioctls on the software /dev/kvm.
//!
//! Each input is decoded (with `arbitrary`) into a list of operations run against one
//! `SimKvm` with a system fd, a VM, two vCPUs and three host regions: memory-slot
//! updates (v1 and v2) with interesting slot ids, flags, gpas, sizes and hvas, passed
//! in a `UserBuf` or as bad raw pointers through `ProcessVm`; SET/GET_(S)REGS;
//! SET of vCPU events, debug registers and MP state; CREATE_VM/CREATE_VCPU;
//! CHECK_EXTENSION; raw requests (any number, with random struct bytes); close and
//! reopen; dropping and re-creating host regions that slots still use.
//!
//! After every operation the harness checks: the result is Ok or an errno the
//! operation may return (exactly EFAULT for bad pointers, exactly EINVAL for a region
//! the kernel's first checks refuse, the fd kind's default for unknown requests); a
//! failed operation changed nothing (except SET_VCPU_EVENTS, which applies part of
//! its input before some refusals, as the kernel does); the slot table passes
//! `check_invariants()`, every slot resolves by `lookup()` at its first and last gfn,
//! its host region is still registered and mapped; after a SET of vCPU state, GET is
//! accepted again by SET and is a fixed point (sregs, regs, events, debugregs,
//! MP state).
//!
//! At the end of an input every fd is closed, and then every VM, vCPU and host region
//! of the run must be gone.
//!
//! No pointer handed to the simulator can reach memory this process owns except the
//! harness's own buffers, sized for anything the simulator may write there: "bad"
//! pointers are below mmap_min_addr or end past TASK_SIZE_MAX, so a wrong write shows
//! up as a wrong errno, never as silent corruption of the fuzzer.

#![no_main]

use std::mem::{offset_of, size_of};
use std::os::fd::RawFd;
use std::sync::{Arc, Weak};

use arbitrary::Arbitrary;
use kvmmmu_core::errno::Errno;
use kvmmmu_core::hostmem::HostRegion;
use kvmmmu_core::kvm::{check_extension, KvmFile, SimKvm};
use kvmmmu_core::memslot::{MemSlots, KVM_MEM_MAX_NR_PAGES, KVM_USER_MEM_SLOTS};
use kvmmmu_core::uaccess::{ProcessVm, UserBuf, TASK_SIZE_MAX};
use kvmmmu_core::uapi::{
    self, kvm_dtable, kvm_regs, kvm_segment, kvm_sregs, kvm_userspace_memory_region,
    kvm_userspace_memory_region2, IOCTL_NUMBERS, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY,
    PAGE_SIZE,
};
use kvmmmu_core::vcpu::Vcpu;
use kvmmmu_core::vm::{Vm, KVM_MAX_VCPU_IDS};
use libfuzzer_sys::fuzz_target;
use zerocopy::{FromBytes, IntoBytes};

// ---------------------------------------------------------------- interesting values

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

const SLOTS: &[u32] = &[
    0,
    1,
    2,
    3,
    7,
    KVM_USER_MEM_SLOTS - 2,
    KVM_USER_MEM_SLOTS - 1,
    KVM_USER_MEM_SLOTS,
    KVM_USER_MEM_SLOTS + 1,
    0xffff,
    1 << 16,       // address space 1, slot 0
    (1 << 16) | 1, // address space 1, slot 1
    2 << 16,
    0x7fff_0000,
    u32::MAX,
];

const FLAGS: &[u32] = &[
    0,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY,
    uapi::KVM_MEM_GUEST_MEMFD,
    1 << 3,
    1 << 31,
    u32::MAX,
];

const GPAS: &[u64] = &[
    0,
    0x1000,
    0x2000,
    0x8000,
    0x10000,
    0x100000,
    0xfee0_0000,
    1 << 32,
    1 << 48,
    (1 << 52) - 0x1000,
    (1 << 52) - 0x10000,
    1 << 52,
    1 << 63,
    !0xfff,
    0x800,
    0x1001,
    u64::MAX,
];

const SIZES: &[u64] = &[
    0,
    0x1000,
    0x2000,
    0x4000,
    0x10000,
    0x100000,
    0x200000,
    100,
    0x1001,
    KVM_MEM_MAX_NR_PAGES * PAGE_SIZE,
    (KVM_MEM_MAX_NR_PAGES + 1) * PAGE_SIZE,
    1 << 47,
    !0xfff,
    u64::MAX,
];

/// Addresses that no mapping of this process can hold for any struct up to 1 KiB:
/// below mmap_min_addr (at least 4096 on x86-64), or ending past TASK_SIZE_MAX.
const BAD_PTRS: &[u64] = &[
    0,
    8,
    0x100,
    0xbff,
    TASK_SIZE_MAX - 8,
    TASK_SIZE_MAX,
    0x8000_0000_0000,
    0x8000_1234_5678,
    0xffff_8000_0000_0000,
    0xffff_ffff_8100_0000,
    u64::MAX - 3,
    u64::MAX,
];

/// A pointer that faults: a listed one, or a random one forced below mmap_min_addr
/// or above TASK_SIZE_MAX (a random user address could be live memory of the fuzzer).
fn bad_ptr(p: Pick<u64>) -> u64 {
    match p {
        Pick::Listed(_) => p.get(BAD_PTRS),
        Pick::Raw(v) if v & 1 == 0 => v % 0xc00,
        Pick::Raw(v) => v | (1 << 47),
    }
}

/// Interesting hvas that are not derived from a host region.
const HVAS: &[u64] = &[
    0,
    0x1000,
    0x10000,
    0x40_0000,
    TASK_SIZE_MAX - 0x1000,
    TASK_SIZE_MAX,
    0x8000_0000_0000,
    0xffff_8000_0000_0000,
    !0xfff,
    0x7000_0000_0000,
    0x1001,
];

const VCPU_IDS: &[u64] = &[
    0,
    1,
    2,
    3,
    255,
    256,
    KVM_MAX_VCPU_IDS - 1,
    KVM_MAX_VCPU_IDS,
    u32::MAX as u64,
    1 << 32,       // must not wrap to id 0
    (1 << 32) + 1, // must not wrap to id 1
    u64::MAX,
];

const REGION_SIZES: &[u64] = &[0x1000, 0x10000, 0x100000, 0x201000, 64 << 20, 1 << 30];

const U64S: &[u64] = &[
    0,
    1,
    2,
    0x202,
    0xfff0,
    0xffff,
    0x1_0000,
    0x6000_0010, // CR0 at reset
    0x8000_0011, // CR0.PG|ET|PE
    0x8005_0033, // CR0 of a 64-bit guest
    0x8000_0000, // CR0.PG without PE
    0x2000_0000, // CR0.NW without CD
    0x20,        // CR4.PAE
    0x1000,      // CR4.LA57
    0x620,       // CR4 PAE|OSFXSR|OSXMMEXCPT
    0x100,       // EFER.LME
    0x500,       // EFER.LME|LMA
    0x400,       // EFER.LMA alone
    0xd01,       // EFER SCE|LME|LMA|NXE
    0xfee0_0900, // APIC base, BSP, enabled
    0xfee0_0800, // APIC base, enabled
    0xfee0_0c00, // x2APIC
    0x1000_0000_0000,
    0xffff_8000_0000_0000,
    0x8000_0000_0000_0000,
    u32::MAX as u64,
    u64::MAX,
];

// ---------------------------------------------------------------- the operations

#[derive(Arbitrary, Clone, Copy, Debug)]
enum FdSel {
    Sys(u8),
    Vm(u8),
    Vcpu(u8),
    /// Any descriptor seen in this run, open or closed.
    Any(u8),
}

/// How an ioctl argument reaches the simulator.
#[derive(Arbitrary, Clone, Copy, Debug)]
enum ArgMode {
    /// A UserBuf at the real address of a harness buffer (what the Python binding does).
    Buf,
    /// A UserBuf at a fake base below mmap_min_addr: a plain window.
    FakeBase,
    /// A UserBuf at a fake base holding only the first `n` bytes of the struct.
    Truncated(u8),
    /// A bad raw pointer through ProcessVm.
    Bad(Pick<u64>),
}

#[derive(Arbitrary, Clone, Copy, Debug)]
enum Hva {
    /// Inside host region `region`, `page` pages in, plus `skew` bytes.
    InRegion {
        region: u8,
        page: u16,
        skew: u8,
    },
    /// `back` pages before the end of host region `region`.
    RegionEnd {
        region: u8,
        back: u16,
    },
    /// The address a dropped region had.
    Stale(u8),
    Other(Pick<u64>),
}

#[derive(Arbitrary, Clone, Copy, Debug)]
enum Gpa {
    /// A page in the first 256 pages (so slots overlap and touch).
    Low(u8),
    Other(Pick<u64>),
}

#[derive(Arbitrary, Clone, Copy, Debug)]
enum Size {
    Pages(u8),
    Other(Pick<u64>),
}

#[derive(Arbitrary, Clone, Debug)]
struct RegionOp {
    v2: bool,
    fd: FdSel,
    slot: Pick<u32>,
    flags: Pick<u32>,
    gpa: Gpa,
    size: Size,
    hva: Hva,
    /// v2 tail: guest_memfd_offset, guest_memfd and padding garbage.
    memfd_offset: u64,
    memfd: u32,
    pad_garbage: Option<(u8, u64)>,
    arg: ArgMode,
}

/// One field of kvm_sregs to overwrite: (byte offset, width).
fn sregs_fields() -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    let segs = [
        offset_of!(kvm_sregs, cs),
        offset_of!(kvm_sregs, ds),
        offset_of!(kvm_sregs, es),
        offset_of!(kvm_sregs, fs),
        offset_of!(kvm_sregs, gs),
        offset_of!(kvm_sregs, ss),
        offset_of!(kvm_sregs, tr),
        offset_of!(kvm_sregs, ldt),
    ];
    for s in segs {
        v.extend([
            (s + offset_of!(kvm_segment, base), 8),
            (s + offset_of!(kvm_segment, limit), 4),
            (s + offset_of!(kvm_segment, selector), 2),
            (s + offset_of!(kvm_segment, type_), 1),
            (s + offset_of!(kvm_segment, present), 1),
            (s + offset_of!(kvm_segment, dpl), 1),
            (s + offset_of!(kvm_segment, db), 1),
            (s + offset_of!(kvm_segment, s), 1),
            (s + offset_of!(kvm_segment, l), 1),
            (s + offset_of!(kvm_segment, g), 1),
            (s + offset_of!(kvm_segment, avl), 1),
            (s + offset_of!(kvm_segment, unusable), 1),
            (s + offset_of!(kvm_segment, padding), 1),
        ]);
    }
    for d in [offset_of!(kvm_sregs, gdt), offset_of!(kvm_sregs, idt)] {
        v.extend([
            (d + offset_of!(kvm_dtable, base), 8),
            (d + offset_of!(kvm_dtable, limit), 2),
            (d + offset_of!(kvm_dtable, padding), 6),
        ]);
    }
    v.extend([
        (offset_of!(kvm_sregs, cr0), 8),
        (offset_of!(kvm_sregs, cr2), 8),
        (offset_of!(kvm_sregs, cr3), 8),
        (offset_of!(kvm_sregs, cr4), 8),
        (offset_of!(kvm_sregs, cr8), 8),
        (offset_of!(kvm_sregs, efer), 8),
        (offset_of!(kvm_sregs, apic_base), 8),
    ]);
    for i in 0..4 {
        v.push((offset_of!(kvm_sregs, interrupt_bitmap) + 8 * i, 8));
    }
    v
}

#[derive(Arbitrary, Clone, Debug)]
enum SregsInput {
    /// Any bytes.
    Raw(Box<[u8; size_of::<kvm_sregs>()]>),
    /// The vCPU's current state with some fields replaced.
    Edit(Vec<(u8, Pick<u64>)>),
}

#[derive(Arbitrary, Clone, Debug)]
enum RegsInput {
    Raw([u64; 18]),
    Edit(Vec<(u8, Pick<u64>)>),
}

/// Bytes for a SET of a vCPU state struct: any bytes, or the current state patched.
#[derive(Arbitrary, Clone, Debug)]
enum StateInput {
    Raw(Vec<u8>),
    /// (byte offset, width 1/2/4/8, value)
    Edit(Vec<(u16, u8, Pick<u64>)>),
}

/// vCPU state with a GET/SET pair.
#[derive(Clone, Copy, Debug)]
struct StatePair {
    name: &'static str,
    get: u64,
    set: u64,
    size: usize,
    /// A failed SET changes nothing. Not so for SET_VCPU_EVENTS: the kernel applies
    /// the exception, interrupt, NMI and SIPI fields before it refuses SMM state
    /// (without CONFIG_KVM_SMM) or a triple fault, and the simulator does the same.
    atomic: bool,
}

const STATE_PAIRS: &[StatePair] = &[
    StatePair {
        name: "VCPU_EVENTS",
        get: uapi::KVM_GET_VCPU_EVENTS,
        set: uapi::KVM_SET_VCPU_EVENTS,
        size: size_of::<uapi::kvm_vcpu_events>(),
        atomic: false,
    },
    StatePair {
        name: "DEBUGREGS",
        get: uapi::KVM_GET_DEBUGREGS,
        set: uapi::KVM_SET_DEBUGREGS,
        size: size_of::<uapi::kvm_debugregs>(),
        atomic: true,
    },
    StatePair {
        name: "MP_STATE",
        get: uapi::KVM_GET_MP_STATE,
        set: uapi::KVM_SET_MP_STATE,
        size: size_of::<uapi::kvm_mp_state>(),
        atomic: true,
    },
];

#[derive(Arbitrary, Clone, Copy, Debug)]
enum Request {
    Known(u8),
    /// A known request with garbage in the upper 32 bits (the kernel ignores them).
    KnownHigh(u8, u32),
    /// A KVMIO request built from direction, size and number.
    Kvmio {
        dir: u8,
        size: u16,
        nr: u8,
    },
    Any(u64),
}

#[derive(Arbitrary, Clone, Debug)]
enum RawArg {
    Value(Pick<u64>),
    /// A pointer `offset` bytes into a scratch buffer that starts with `bytes`.
    Scratch(u8, Vec<u8>),
    Bad(Pick<u64>),
}

#[derive(Arbitrary, Clone, Debug)]
enum Op {
    SetRegion(RegionOp),
    SetSregs {
        fd: FdSel,
        sregs: SregsInput,
        arg: ArgMode,
    },
    GetSregs {
        fd: FdSel,
        arg: ArgMode,
    },
    SetRegs {
        fd: FdSel,
        regs: RegsInput,
        arg: ArgMode,
    },
    GetRegs {
        fd: FdSel,
        arg: ArgMode,
    },
    CreateVcpu {
        fd: FdSel,
        id: Pick<u64>,
    },
    CreateVm {
        fd: FdSel,
        vm_type: Pick<u64>,
    },
    CheckExtension {
        fd: FdSel,
        cap: u16,
    },
    Raw {
        fd: FdSel,
        request: Request,
        arg: RawArg,
    },
    /// SET of one more piece of vCPU state (events, debug registers, MP state).
    VcpuState {
        fd: FdSel,
        pair: u8,
        input: StateInput,
        arg: ArgMode,
    },
    Close(FdSel),
    Reopen,
    DropRegion(u8),
    NewRegion {
        idx: u8,
        size: Pick<u64>,
    },
}

// ---------------------------------------------------------------- the harness

/// Every errno the simulator may return at all.
const KNOWN_ERRNOS: &[Errno] = &[
    Errno::EPERM,
    Errno::ENOENT,
    Errno::EINTR,
    Errno::EIO,
    Errno::ENXIO,
    Errno::E2BIG,
    Errno::EBADF,
    Errno::EAGAIN,
    Errno::ENOMEM,
    Errno::EFAULT,
    Errno::EBUSY,
    Errno::EEXIST,
    Errno::ENODEV,
    Errno::EINVAL,
    Errno::EMFILE,
    Errno::ENOTTY,
    Errno::ENOSPC,
    Errno::ERANGE,
    Errno::ENOSYS,
    Errno::EOPNOTSUPP,
];

/// Errnos that creating a file may add (memfd_create, ftruncate, mmap).
const RESOURCE_ERRNOS: &[Errno] = &[Errno::EMFILE, ENFILE, Errno::ENOMEM];
const ENFILE: Errno = Errno(23);

/// Size of the harness's scratch buffer: larger than anything the simulator may write
/// at a pointer 255 bytes in (256 CPUID entries are 10 KiB).
const SCRATCH: usize = 64 << 10;
/// A base address below mmap_min_addr: a UserBuf window that no real mapping backs
/// (structs are at most 1 KiB, so the window and what follows it stay below 4096).
const FAKE_BASE: u64 = 0x200;

/// Bytes of a plain-data struct, as a copy.
fn bytes_of<T: IntoBytes + zerocopy::Immutable>(v: &T) -> Vec<u8> {
    v.as_bytes().to_vec()
}

/// (id, base_gfn, npages, userspace_addr, flags) of one slot.
type SlotSummary = (u16, u64, u64, u64, u32);

/// The part of the slot table a failed ioctl must leave untouched: generation and slots.
fn snapshot(slots: &MemSlots) -> (u64, Vec<SlotSummary>) {
    let list = slots
        .iter()
        .map(|s| (s.id, s.base_gfn, s.npages, s.userspace_addr, s.flags))
        .collect();
    (slots.generation(), list)
}

struct Harness {
    kvm: SimKvm,
    /// Every fd number any simulated file had in this run, in order of appearance.
    seen: Vec<RawFd>,
    /// Every VM and vCPU created in this run (kept to check them after each step).
    vms: Vec<Arc<Vm>>,
    vcpus: Vec<Arc<Vcpu>>,
    regions: Vec<Option<Arc<HostRegion>>>,
    /// Address and size of every host region of this run (to check they are gone).
    region_log: Vec<(u64, u64)>,
    scratch: Vec<u8>,
}

/// What a file answers to a request it does not handle (kvm_dev_ioctl, kvm_vm_ioctl,
/// kvm_vcpu_ioctl defaults; stats files have no ioctls).
fn default_errno(kind: &Option<KvmFile>) -> Errno {
    match kind {
        None => Errno::EBADF,
        Some(KvmFile::System) | Some(KvmFile::Vcpu(_)) => Errno::EINVAL,
        Some(KvmFile::Vm(_)) | Some(KvmFile::Stats) => Errno::ENOTTY,
    }
}

fn expect(cond: bool, what: std::fmt::Arguments<'_>) {
    if !cond {
        panic!("{what}");
    }
}

fn allowed(r: Result<i64, Errno>, ok: bool, errs: &[Errno], what: &str) {
    match r {
        Ok(v) => expect(ok && v >= 0, format_args!("{what}: unexpected success {v}")),
        Err(e) => {
            expect(
                KNOWN_ERRNOS.contains(&e),
                format_args!("{what}: unknown errno {e:?}"),
            );
            expect(
                errs.contains(&e),
                format_args!("{what}: errno {e:?} not in {errs:?}"),
            );
        }
    }
}

impl Harness {
    fn new() -> Self {
        let kvm = SimKvm::new();
        let mut h = Harness {
            kvm,
            seen: Vec::new(),
            vms: Vec::new(),
            vcpus: Vec::new(),
            regions: Vec::new(),
            region_log: Vec::new(),
            scratch: vec![0; SCRATCH],
        };
        let ua = &mut ProcessVm;
        let sys = h.kvm.open().expect("open");
        let vm = h
            .kvm
            .ioctl(sys, uapi::KVM_CREATE_VM, 0, ua)
            .expect("KVM_CREATE_VM") as RawFd;
        for id in 0..2 {
            h.kvm
                .ioctl(vm, uapi::KVM_CREATE_VCPU, id, ua)
                .expect("KVM_CREATE_VCPU");
        }
        for size in [1 << 20, 64 << 10, 2 << 20] {
            let r = HostRegion::new(size).expect("HostRegion::new");
            h.region_log.push((r.addr(), r.size() as u64));
            h.regions.push(Some(r));
        }
        h.sync();
        h
    }

    /// Record descriptors and objects that appeared since the last step.
    fn sync(&mut self) {
        for fd in self.kvm.fds() {
            if !self.seen.contains(&fd) {
                self.seen.push(fd);
            }
            match self.kvm.file(fd) {
                Ok(KvmFile::Vm(vm)) if !self.vms.iter().any(|v| Arc::ptr_eq(v, &vm)) => {
                    self.vms.push(vm);
                }
                Ok(KvmFile::Vcpu(vcpu)) if !self.vcpus.iter().any(|v| Arc::ptr_eq(v, &vcpu)) => {
                    self.vcpus.push(vcpu);
                }
                _ => {}
            }
        }
    }

    fn pick_fd(&self, sel: FdSel) -> RawFd {
        let open: Vec<(RawFd, KvmFile)> = self
            .kvm
            .fds()
            .into_iter()
            .filter_map(|fd| Some((fd, self.kvm.file(fd).ok()?)))
            .collect();
        let of_kind = |want: fn(&KvmFile) -> bool, i: u8| {
            let v: Vec<RawFd> = open
                .iter()
                .filter(|(_, f)| want(f))
                .map(|&(fd, _)| fd)
                .collect();
            (!v.is_empty()).then(|| v[i as usize % v.len()])
        };
        let any = |i: u8| {
            if self.seen.is_empty() {
                -1
            } else {
                self.seen[i as usize % self.seen.len()]
            }
        };
        match sel {
            FdSel::Sys(i) => of_kind(|f| matches!(f, KvmFile::System), i).unwrap_or_else(|| any(i)),
            FdSel::Vm(i) => of_kind(|f| matches!(f, KvmFile::Vm(_)), i).unwrap_or_else(|| any(i)),
            FdSel::Vcpu(i) => {
                of_kind(|f| matches!(f, KvmFile::Vcpu(_)), i).unwrap_or_else(|| any(i))
            }
            FdSel::Any(i) => any(i),
        }
    }

    fn region(&self, i: u8) -> Option<&Arc<HostRegion>> {
        self.regions[i as usize % self.regions.len()].as_ref()
    }

    fn hva(&self, h: Hva) -> u64 {
        match h {
            Hva::InRegion { region, page, skew } => match self.region(region) {
                Some(r) => r.addr() + u64::from(page) * PAGE_SIZE + u64::from(skew),
                None => self.region_log[region as usize % self.region_log.len()].0,
            },
            Hva::RegionEnd { region, back } => {
                let (addr, size) = self.region_log[region as usize % self.region_log.len()];
                (addr + size).wrapping_sub(u64::from(back) * PAGE_SIZE)
            }
            Hva::Stale(i) => self.region_log[i as usize % self.region_log.len()].0,
            Hva::Other(p) => p.get(HVAS),
        }
    }

    /// Run one ioctl with `payload` as the struct behind the argument; returns the
    /// result and the payload as the simulator left it (for GET requests).
    fn call(&mut self, fd: RawFd, request: u64, payload: &[u8], mode: ArgMode) -> IoctlOut {
        let mut data = payload.to_vec();
        let r = match mode {
            ArgMode::Buf => {
                let base = data.as_ptr() as u64;
                let mut ua = UserBuf {
                    base,
                    data: &mut data,
                };
                self.kvm.ioctl(fd, request, base, &mut ua)
            }
            ArgMode::FakeBase => {
                let mut ua = UserBuf {
                    base: FAKE_BASE,
                    data: &mut data,
                };
                self.kvm.ioctl(fd, request, FAKE_BASE, &mut ua)
            }
            ArgMode::Truncated(n) => {
                let n = n as usize % data.len().max(1);
                let mut ua = UserBuf {
                    base: FAKE_BASE,
                    data: &mut data[..n],
                };
                self.kvm.ioctl(fd, request, FAKE_BASE, &mut ua)
            }
            ArgMode::Bad(p) => self.kvm.ioctl(fd, request, bad_ptr(p), &mut ProcessVm),
        };
        IoctlOut {
            r,
            data,
            faults: matches!(mode, ArgMode::Truncated(_) | ArgMode::Bad(_)),
        }
    }

    fn kind(&self, fd: RawFd) -> Option<KvmFile> {
        self.kvm.file(fd).ok()
    }

    // ------------------------------------------------------------ operations

    fn set_region(&mut self, op: &RegionOp) {
        let fd = self.pick_fd(op.fd);
        let mut r2 = kvm_userspace_memory_region2 {
            slot: op.slot.get(SLOTS),
            flags: op.flags.get(FLAGS),
            guest_phys_addr: match op.gpa {
                Gpa::Low(p) => u64::from(p) * PAGE_SIZE,
                Gpa::Other(p) => p.get(GPAS),
            },
            memory_size: match op.size {
                Size::Pages(n) => u64::from(n) * PAGE_SIZE,
                Size::Other(p) => p.get(SIZES),
            },
            userspace_addr: self.hva(op.hva),
            ..Default::default()
        };
        let payload = if op.v2 {
            r2.guest_memfd_offset = op.memfd_offset;
            r2.guest_memfd = op.memfd;
            if let Some((i, v)) = op.pad_garbage {
                r2.pad2[i as usize % r2.pad2.len()] = v;
            }
            bytes_of(&r2)
        } else {
            bytes_of(&kvm_userspace_memory_region {
                slot: r2.slot,
                flags: r2.flags,
                guest_phys_addr: r2.guest_phys_addr,
                memory_size: r2.memory_size,
                userspace_addr: r2.userspace_addr,
            })
        };
        let request = if op.v2 {
            uapi::KVM_SET_USER_MEMORY_REGION2
        } else {
            uapi::KVM_SET_USER_MEMORY_REGION
        };
        let kind = self.kind(fd);
        let vm = match &kind {
            Some(KvmFile::Vm(vm)) => Some(vm.clone()),
            _ => None,
        };
        let before = vm.as_ref().map(|vm| snapshot(&vm.state().memslots));
        let resolvable = HostRegion::lookup(r2.userspace_addr, r2.memory_size).is_some();
        let out = self.call(fd, request, &payload, op.arg);
        let what = format!(
            "{} {r2:?} via {:?}",
            if op.v2 { "REGION2" } else { "REGION" },
            op.arg
        );
        let Some(vm) = vm else {
            return self.wrong_kind(kind, out.r, &what);
        };
        self.check_faults(&out, &what);
        allowed(
            out.r,
            true,
            &[Errno::EINVAL, Errno::EEXIST, Errno::EFAULT],
            &what,
        );
        // The checks every kernel makes before anything else (api.txt 4.34).
        let id = r2.slot & 0xffff;
        let first_checks_fail = r2.flags & !(KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY) != 0
            || id >= KVM_USER_MEM_SLOTS
            || r2.slot >> 16 != 0
            || !r2.memory_size.is_multiple_of(PAGE_SIZE)
            || !r2.guest_phys_addr.is_multiple_of(PAGE_SIZE)
            || !r2.userspace_addr.is_multiple_of(PAGE_SIZE)
            || r2
                .userspace_addr
                .checked_add(r2.memory_size)
                .is_none_or(|e| e > TASK_SIZE_MAX)
            || r2.guest_phys_addr.checked_add(r2.memory_size).is_none()
            || r2.memory_size / PAGE_SIZE > KVM_MEM_MAX_NR_PAGES;
        if !out.faults && first_checks_fail {
            expect(
                out.r == Err(Errno::EINVAL),
                format_args!("{what}: {:?}, wanted EINVAL", out.r),
            );
        }
        let st = vm.state();
        let after = snapshot(&st.memslots);
        let (_, before_list) = before.as_ref().expect("a VM has a snapshot");
        match out.r {
            Err(e) => {
                expect(
                    before.as_ref() == Some(&after),
                    format_args!("{what}: failed with {e:?} but changed the table"),
                );
                if e == Errno::EEXIST {
                    let (b, n) = (r2.guest_phys_addr / PAGE_SIZE, r2.memory_size / PAGE_SIZE);
                    expect(
                        before_list.iter().any(|&(sid, base, np, _, _)| {
                            u32::from(sid) != id && base < b + n && b < base + np
                        }),
                        format_args!("{what}: EEXIST without an overlapping slot"),
                    );
                }
                if e == Errno::EFAULT && !out.faults {
                    expect(
                        !resolvable,
                        format_args!("{what}: EFAULT for memory the core owns"),
                    );
                }
            }
            Ok(_) => {
                let slot = st.memslots.get(id as u16);
                if r2.memory_size == 0 {
                    expect(
                        slot.is_none(),
                        format_args!("{what}: slot survived its deletion"),
                    );
                } else {
                    let s = slot.unwrap_or_else(|| panic!("{what}: succeeded but no slot"));
                    expect(
                        s.base_gfn == r2.guest_phys_addr / PAGE_SIZE
                            && s.npages == r2.memory_size / PAGE_SIZE
                            && s.userspace_addr == r2.userspace_addr
                            && s.flags == r2.flags,
                        format_args!("{what}: slot is {s:?}"),
                    );
                }
            }
        }
    }

    /// An ioctl on a closed fd or on the wrong kind of file.
    fn wrong_kind(&self, kind: Option<KvmFile>, r: Result<i64, Errno>, what: &str) {
        let want = default_errno(&kind);
        expect(
            r == Err(want),
            format_args!("{what} on {kind:?}: {r:?}, wanted {want:?}"),
        );
    }

    fn vcpu_of(&self, fd: RawFd) -> (Option<KvmFile>, Option<Arc<Vcpu>>) {
        let kind = self.kind(fd);
        let vcpu = match &kind {
            Some(KvmFile::Vcpu(v)) => Some(v.clone()),
            _ => None,
        };
        (kind, vcpu)
    }

    fn set_sregs(&mut self, fd: RawFd, input: &SregsInput, mode: ArgMode) {
        let (kind, vcpu) = self.vcpu_of(fd);
        let mut bytes = match (&vcpu, input) {
            (_, SregsInput::Raw(b)) => b.to_vec(),
            (Some(v), SregsInput::Edit(_)) => bytes_of(&v.get_sregs()),
            (None, SregsInput::Edit(_)) => vec![0; size_of::<kvm_sregs>()],
        };
        if let SregsInput::Edit(edits) = input {
            let fields = sregs_fields();
            for &(f, value) in edits {
                let (off, width) = fields[f as usize % fields.len()];
                bytes[off..off + width].copy_from_slice(&value.get(U64S).to_le_bytes()[..width]);
            }
        }
        let before = vcpu.as_ref().map(|v| bytes_of(&v.get_sregs()));
        let out = self.call(fd, uapi::KVM_SET_SREGS, &bytes, mode);
        let what = format!("SET_SREGS via {mode:?}");
        let Some(vcpu) = vcpu else {
            return self.wrong_kind(kind, out.r, &what);
        };
        self.check_faults(&out, &what);
        allowed(out.r, true, &[Errno::EINVAL, Errno::EFAULT], &what);
        if out.r.is_err() {
            expect(
                before == Some(bytes_of(&vcpu.get_sregs())),
                format_args!("{what}: failed with {:?} but changed sregs", out.r),
            );
            return;
        }
        // Idempotence: what GET_SREGS returns is accepted by SET_SREGS and is a fixed point.
        let got = self.call(
            fd,
            uapi::KVM_GET_SREGS,
            &[0; size_of::<kvm_sregs>()],
            ArgMode::Buf,
        );
        expect(
            got.r == Ok(0),
            format_args!("GET_SREGS after SET_SREGS: {:?}", got.r),
        );
        let again = self.call(fd, uapi::KVM_SET_SREGS, &got.data, ArgMode::Buf);
        let first = kvm_sregs::read_from_bytes(&got.data).expect("size");
        expect(
            again.r == Ok(0),
            format_args!(
                "SET_SREGS refuses what GET_SREGS returned: {:?}\n{first:#x?}",
                again.r
            ),
        );
        let got2 = self.call(
            fd,
            uapi::KVM_GET_SREGS,
            &[0; size_of::<kvm_sregs>()],
            ArgMode::Buf,
        );
        expect(
            got2.data == got.data,
            format_args!(
                "GET_SREGS is not a fixed point:\n{first:#x?}\nthen\n{:#x?}",
                kvm_sregs::read_from_bytes(&got2.data).expect("size")
            ),
        );
    }

    fn set_regs(&mut self, fd: RawFd, input: &RegsInput, mode: ArgMode) {
        let (kind, vcpu) = self.vcpu_of(fd);
        let mut regs = match (&vcpu, input) {
            (_, RegsInput::Raw(words)) => {
                kvm_regs::read_from_bytes(words.as_bytes()).expect("kvm_regs is 18 words")
            }
            (Some(v), RegsInput::Edit(_)) => v.get_regs(),
            (None, RegsInput::Edit(_)) => kvm_regs::default(),
        };
        if let RegsInput::Edit(edits) = input {
            let b = regs.as_mut_bytes();
            for &(i, value) in edits {
                let off = (i as usize % 18) * 8;
                b[off..off + 8].copy_from_slice(&value.get(U64S).to_le_bytes());
            }
        }
        let before = vcpu.as_ref().map(|v| bytes_of(&v.get_regs()));
        let out = self.call(fd, uapi::KVM_SET_REGS, regs.as_bytes(), mode);
        let what = format!("SET_REGS via {mode:?}");
        let Some(vcpu) = vcpu else {
            return self.wrong_kind(kind, out.r, &what);
        };
        self.check_faults(&out, &what);
        allowed(out.r, true, &[Errno::EINVAL, Errno::EFAULT], &what);
        if out.r.is_err() {
            expect(
                before == Some(bytes_of(&vcpu.get_regs())),
                format_args!("{what}: failed but changed regs"),
            );
            return;
        }
        let got = self.call(
            fd,
            uapi::KVM_GET_REGS,
            &[0; size_of::<kvm_regs>()],
            ArgMode::Buf,
        );
        expect(
            got.r == Ok(0),
            format_args!("GET_REGS after SET_REGS: {:?}", got.r),
        );
        let again = self.call(fd, uapi::KVM_SET_REGS, &got.data, ArgMode::Buf);
        expect(
            again.r == Ok(0),
            format_args!("SET_REGS refuses GET_REGS: {:?}", again.r),
        );
        let got2 = self.call(
            fd,
            uapi::KVM_GET_REGS,
            &[0; size_of::<kvm_regs>()],
            ArgMode::Buf,
        );
        expect(
            got2.data == got.data,
            format_args!("GET_REGS is not a fixed point"),
        );
    }

    /// SET_<pair>; if it failed (and the pair is atomic) the state must be unchanged;
    /// either way GET -> SET -> GET must then be a fixed point.
    fn vcpu_state(&mut self, fd: RawFd, pair: StatePair, input: &StateInput, mode: ArgMode) {
        let StatePair {
            name,
            get: get_req,
            set: set_req,
            size,
            atomic,
        } = pair;
        let (kind, vcpu) = self.vcpu_of(fd);
        let read = |h: &mut Self| {
            let out = h.call(fd, get_req, &vec![0; size], ArgMode::Buf);
            expect(out.r == Ok(0), format_args!("GET_{name}: {:?}", out.r));
            out.data
        };
        let before = vcpu.as_ref().map(|_| read(self));
        let mut bytes = match (input, &before) {
            (StateInput::Raw(b), _) => b.clone(),
            (StateInput::Edit(_), Some(cur)) => cur.clone(),
            (StateInput::Edit(_), None) => vec![0; size],
        };
        bytes.resize(size, 0);
        if let StateInput::Edit(edits) = input {
            for &(off, width, value) in edits {
                let width = [1, 2, 4, 8][width as usize % 4].min(size);
                let off = off as usize % (size - width + 1);
                bytes[off..off + width].copy_from_slice(&value.get(U64S).to_le_bytes()[..width]);
            }
        }
        let out = self.call(fd, set_req, &bytes, mode);
        let what = format!("SET_{name} via {mode:?}");
        if vcpu.is_none() {
            return self.wrong_kind(kind, out.r, &what);
        }
        self.check_faults(&out, &what);
        allowed(out.r, true, &[Errno::EINVAL, Errno::EFAULT], &what);
        if out.r.is_err() && atomic {
            let after = read(self);
            let before = before.unwrap_or_default();
            expect(
                before == after,
                format_args!(
                    "{what}: failed with {:?} but changed the state\nset    {bytes:02x?}\n\
                     before {before:02x?}\nafter  {after:02x?}",
                    out.r
                ),
            );
            return;
        }
        let got = read(self);
        let again = self.call(fd, set_req, &got, ArgMode::Buf);
        expect(
            again.r == Ok(0),
            format_args!(
                "SET_{name} refuses what GET_{name} returned: {:?}\n{got:02x?}",
                again.r
            ),
        );
        let got2 = read(self);
        expect(
            got2 == got,
            format_args!("GET_{name} is not a fixed point:\n{got:02x?}\nthen\n{got2:02x?}"),
        );
    }

    fn get(&mut self, fd: RawFd, request: u64, size: usize, mode: ArgMode, name: &str) {
        let (kind, vcpu) = self.vcpu_of(fd);
        // Poison, so a GET that claims success but writes nothing is caught.
        let out = self.call(fd, request, &vec![0xa5; size], mode);
        let what = format!("{name} via {mode:?}");
        let Some(vcpu) = vcpu else {
            return self.wrong_kind(kind, out.r, &what);
        };
        self.check_faults(&out, &what);
        allowed(out.r, true, &[Errno::EFAULT], &what);
        if out.r.is_ok() {
            let want = if request == uapi::KVM_GET_SREGS {
                bytes_of(&vcpu.get_sregs())
            } else {
                bytes_of(&vcpu.get_regs())
            };
            expect(
                out.data == want,
                format_args!("{what}: returned bytes differ from the state"),
            );
        }
    }

    /// A bad pointer or a truncated buffer must fault.
    fn check_faults(&self, out: &IoctlOut, what: &str) {
        if out.faults {
            expect(
                out.r == Err(Errno::EFAULT),
                format_args!("{what}: {:?}, wanted EFAULT", out.r),
            );
        }
    }

    fn create_vcpu(&mut self, fd: RawFd, id: u64) {
        let kind = self.kind(fd);
        let existed = match &kind {
            Some(KvmFile::Vm(vm)) => {
                id < KVM_MAX_VCPU_IDS && vm.state().vcpus.contains_key(&(id as u32))
            }
            _ => false,
        };
        let r = self
            .kvm
            .ioctl(fd, uapi::KVM_CREATE_VCPU, id, &mut ProcessVm);
        let what = format!("CREATE_VCPU {id:#x}");
        let Some(KvmFile::Vm(vm)) = kind else {
            return self.wrong_kind(kind, r, &what);
        };
        match r {
            Ok(new) => {
                expect(
                    id < KVM_MAX_VCPU_IDS && !existed,
                    format_args!("{what}: succeeded"),
                );
                match self.kvm.file(new as RawFd) {
                    Ok(KvmFile::Vcpu(v)) => expect(
                        u64::from(v.id) == id && v.vm().is_some_and(|o| Arc::ptr_eq(&o, &vm)),
                        format_args!("{what}: fd {new} is vCPU {} of another VM?", v.id),
                    ),
                    other => panic!("{what}: fd {new} is {other:?}"),
                }
            }
            Err(e) if RESOURCE_ERRNOS.contains(&e) => {}
            Err(e) => {
                let want = if id >= KVM_MAX_VCPU_IDS {
                    Errno::EINVAL
                } else if existed {
                    Errno::EEXIST
                } else {
                    // KVM_MAX_VCPUS reached
                    Errno::EINVAL
                };
                expect(e == want, format_args!("{what}: {e:?}, wanted {want:?}"));
            }
        }
    }

    fn create_vm(&mut self, fd: RawFd, vm_type: u64) {
        let kind = self.kind(fd);
        let r = self
            .kvm
            .ioctl(fd, uapi::KVM_CREATE_VM, vm_type, &mut ProcessVm);
        let what = format!("CREATE_VM {vm_type:#x}");
        match kind {
            Some(KvmFile::System) => match r {
                Ok(new) => {
                    expect(vm_type == 0, format_args!("{what}: succeeded"));
                    let f = self.kvm.file(new as RawFd);
                    expect(
                        matches!(f, Ok(KvmFile::Vm(_))),
                        format_args!("{what}: fd is {f:?}"),
                    );
                }
                Err(e) if vm_type == 0 => {
                    expect(RESOURCE_ERRNOS.contains(&e), format_args!("{what}: {e:?}"))
                }
                Err(e) => expect(e == Errno::EINVAL, format_args!("{what}: {e:?}")),
            },
            // KVM_CREATE_VM is not a VM or vCPU ioctl.
            _ => self.wrong_kind(kind, r, &what),
        }
    }

    fn check_extension(&mut self, fd: RawFd, cap: u16) {
        let kind = self.kind(fd);
        let r = self.kvm.ioctl(
            fd,
            uapi::KVM_CHECK_EXTENSION,
            u64::from(cap),
            &mut ProcessVm,
        );
        let what = format!("CHECK_EXTENSION {cap}");
        match kind {
            Some(KvmFile::System) | Some(KvmFile::Vm(_)) => {
                let want = check_extension(u64::from(cap));
                expect(r == Ok(want), format_args!("{what}: {r:?}, wanted {want}"));
            }
            _ => self.wrong_kind(kind, r, &what),
        }
    }

    fn raw(&mut self, fd: RawFd, request: Request, arg: RawArg) {
        let known = |i: u8| IOCTL_NUMBERS[i as usize % IOCTL_NUMBERS.len()].1;
        let request = match request {
            Request::Known(i) => known(i),
            Request::KnownHigh(i, high) => known(i) | (u64::from(high) << 32),
            Request::Kvmio { dir, size, nr } => uapi::ioc(
                u64::from(dir & 3),
                uapi::KVMIO,
                u64::from(nr),
                usize::from(size & 0x3fff),
            ),
            Request::Any(r) => r,
        };
        let is_known = IOCTL_NUMBERS
            .iter()
            .any(|&(_, n)| n == request & 0xffff_ffff);
        let kind = self.kind(fd);
        // Known requests may dereference their argument: never hand them a value that
        // could be a live address of this process.
        let arg = match arg {
            RawArg::Value(v) if !is_known => RawArg::Value(v),
            RawArg::Value(v) => RawArg::Bad(v),
            other => other,
        };
        let r = match &arg {
            RawArg::Value(v) => self.kvm.ioctl(fd, request, v.get(U64S), &mut ProcessVm),
            RawArg::Bad(p) => self.kvm.ioctl(fd, request, bad_ptr(*p), &mut ProcessVm),
            RawArg::Scratch(off, bytes) => {
                let off = usize::from(*off);
                self.scratch.fill(0);
                let n = bytes.len().min(SCRATCH - off);
                self.scratch[off..off + n].copy_from_slice(&bytes[..n]);
                // A user pointer inside the struct that the kernel writes through
                // (dirty-log bitmaps) must fault, not land in the fuzzer's memory.
                let embedded = match request & 0xffff_ffff {
                    uapi::KVM_GET_DIRTY_LOG => Some(8),
                    uapi::KVM_CLEAR_DIRTY_LOG => Some(16),
                    _ => None,
                };
                if let Some(p) = embedded {
                    self.scratch[off + p..off + p + 8].copy_from_slice(&0x100u64.to_le_bytes());
                }
                let base = self.scratch.as_ptr() as u64;
                let addr = base + off as u64;
                let mut ua = UserBuf {
                    base,
                    data: &mut self.scratch,
                };
                self.kvm.ioctl(fd, request, addr, &mut ua)
            }
        };
        let what = format!("raw request {request:#x} arg {arg:?}");
        if is_known {
            if let Err(e) = r {
                expect(
                    KNOWN_ERRNOS.contains(&e),
                    format_args!("{what}: unknown errno {e:?}"),
                );
            }
        } else {
            // Unknown requests: each file kind's default errno, no side effect.
            let want = default_errno(&kind);
            expect(
                r == Err(want),
                format_args!("{what} on {kind:?}: {r:?}, wanted {want:?}"),
            );
        }
    }

    fn close(&mut self, fd: RawFd) {
        let open = self.kind(fd).is_some();
        let r = self.kvm.close(fd);
        if open {
            expect(r.is_ok(), format_args!("close({fd}) of an open fd: {r:?}"));
            expect(
                self.kind(fd).is_none(),
                format_args!("fd {fd} still open after close"),
            );
        } else {
            expect(
                r == Err(Errno::EBADF),
                format_args!("close({fd}) of a closed fd: {r:?}"),
            );
        }
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::SetRegion(r) => self.set_region(r),
            Op::SetSregs { fd, sregs, arg } => {
                let fd = self.pick_fd(*fd);
                self.set_sregs(fd, sregs, *arg)
            }
            Op::GetSregs { fd, arg } => {
                let fd = self.pick_fd(*fd);
                self.get(
                    fd,
                    uapi::KVM_GET_SREGS,
                    size_of::<kvm_sregs>(),
                    *arg,
                    "GET_SREGS",
                )
            }
            Op::SetRegs { fd, regs, arg } => {
                let fd = self.pick_fd(*fd);
                self.set_regs(fd, regs, *arg)
            }
            Op::GetRegs { fd, arg } => {
                let fd = self.pick_fd(*fd);
                self.get(
                    fd,
                    uapi::KVM_GET_REGS,
                    size_of::<kvm_regs>(),
                    *arg,
                    "GET_REGS",
                )
            }
            Op::CreateVcpu { fd, id } => {
                if self.vcpus.len() < 32 {
                    let fd = self.pick_fd(*fd);
                    self.create_vcpu(fd, id.get(VCPU_IDS))
                }
            }
            Op::CreateVm { fd, vm_type } => {
                if self.vms.len() < 8 {
                    let fd = self.pick_fd(*fd);
                    self.create_vm(fd, vm_type.get(&[0, 1, 2, 3, 4, u64::MAX]))
                }
            }
            Op::CheckExtension { fd, cap } => {
                let fd = self.pick_fd(*fd);
                self.check_extension(fd, *cap)
            }
            Op::Raw { fd, request, arg } => {
                if self.vms.len() < 8 && self.vcpus.len() < 32 && self.seen.len() < 64 {
                    let fd = self.pick_fd(*fd);
                    self.raw(fd, *request, arg.clone())
                }
            }
            Op::VcpuState {
                fd,
                pair,
                input,
                arg,
            } => {
                let fd = self.pick_fd(*fd);
                self.vcpu_state(
                    fd,
                    STATE_PAIRS[*pair as usize % STATE_PAIRS.len()],
                    input,
                    *arg,
                )
            }
            Op::Close(sel) => {
                let fd = self.pick_fd(*sel);
                self.close(fd)
            }
            Op::Reopen => {
                if self.seen.len() < 64 {
                    let r = self.kvm.open();
                    expect(r.is_ok(), format_args!("open: {r:?}"));
                }
            }
            Op::DropRegion(i) => {
                let n = self.regions.len();
                self.regions[*i as usize % n] = None;
            }
            Op::NewRegion { idx, size } => {
                let n = self.regions.len();
                let slot = &mut self.regions[*idx as usize % n];
                if slot.is_none() {
                    let size = size.get(REGION_SIZES) % (1 << 31);
                    match HostRegion::new(size) {
                        Ok(r) => {
                            self.region_log.push((r.addr(), r.size() as u64));
                            *slot = Some(r);
                        }
                        Err(e) => expect(
                            size == 0 && e == Errno::EINVAL,
                            format_args!("HostRegion::new({size:#x}): {e:?}"),
                        ),
                    }
                }
            }
        }
        self.sync();
        self.check();
    }

    /// Invariants that hold after every step.
    fn check(&self) {
        for vm in &self.vms {
            let st = vm.state();
            let slots = &st.memslots;
            if let Err(e) = slots.check_invariants() {
                panic!("check_invariants: {e}");
            }
            // The shadow MMU follows every memslot change (metadata per slot, limit).
            if let Err(e) = st.mmu.check_invariants(slots) {
                panic!("mmu check_invariants: {e}");
            }
            for s in slots.iter() {
                for gfn in [s.base_gfn, s.end_gfn() - 1] {
                    let found = slots.lookup(gfn).map(|x| x.id);
                    expect(
                        found == Some(s.id),
                        format_args!("lookup({gfn:#x}) = {found:?}, slot {} holds it", s.id),
                    );
                }
                if s.base_gfn > 0 {
                    let below = slots.lookup(s.base_gfn - 1).map(|x| x.id);
                    expect(
                        below != Some(s.id),
                        format_args!("slot {} found below its base", s.id),
                    );
                }
                expect(
                    slots.lookup(s.end_gfn()).map(|x| x.id) != Some(s.id),
                    format_args!("past end"),
                );
                // The host memory stays registered and mapped while the slot holds it,
                // even after the harness dropped its own reference.
                let len = s.npages * PAGE_SIZE;
                match HostRegion::lookup(s.userspace_addr, len) {
                    Some((r, off)) => expect(
                        Arc::ptr_eq(&r, &s.host) && off == s.host_offset,
                        format_args!("slot {} hva resolves to {r:?}+{off:#x}", s.id),
                    ),
                    None => panic!("slot {}: its host memory is no longer registered", s.id),
                }
                let mut b = [0u8; 1];
                let last = s.host_offset + len as usize - 1;
                for off in [s.host_offset, last] {
                    s.host.read(off, &mut b).expect("slot memory readable");
                }
            }
            for (&id, vcpu) in &st.vcpus {
                expect(
                    vcpu.id == id,
                    format_args!("vCPU {} filed under {id}", vcpu.id),
                );
            }
        }
    }

    /// Close everything; every object of this run must then be gone.
    fn finish(mut self) {
        for fd in self.kvm.fds() {
            expect(
                self.kvm.close(fd).is_ok(),
                format_args!("close({fd}) at the end"),
            );
        }
        expect(
            self.kvm.fds().is_empty(),
            format_args!("fds left after closing all"),
        );
        let vms: Vec<Weak<Vm>> = self.vms.drain(..).map(|v| Arc::downgrade(&v)).collect();
        let vcpus: Vec<Weak<Vcpu>> = self.vcpus.drain(..).map(|v| Arc::downgrade(&v)).collect();
        let live = vms.iter().filter(|w| w.strong_count() > 0).count();
        let live_vcpus = vcpus.iter().filter(|w| w.strong_count() > 0).count();
        expect(
            live + live_vcpus == 0,
            format_args!("{live} VMs and {live_vcpus} vCPUs outlive all their descriptors"),
        );
        self.regions.clear();
        for &(addr, size) in &self.region_log {
            expect(
                HostRegion::lookup(addr, size).is_none(),
                format_args!("host region {addr:#x}+{size:#x} still registered at the end"),
            );
        }
    }
}

struct IoctlOut {
    r: Result<i64, Errno>,
    data: Vec<u8>,
    /// The argument could not be read or written whole (bad pointer, truncated buffer).
    faults: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let mut h = Harness::new();
    h.check();
    for op in input.ops.iter().take(256) {
        h.step(op);
    }
    h.finish();
});
