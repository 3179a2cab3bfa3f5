//! The KVM uapi for x86-64: request numbers, struct layouts and constants.
//!
//! Struct layouts come from the kvm-bindings crate (generated from the kernel
//! headers). Where kvm-bindings has no byte-conversion derive for a struct, a
//! zerocopy mirror is declared here and checked against the kvm-bindings type
//! at compile time (size and every field offset), so nothing is hand-copied
//! unchecked.

use std::mem::{offset_of, size_of};

pub use kvm_bindings::{
    kvm_cpuid2, kvm_cpuid_entry2, kvm_debugregs, kvm_dtable, kvm_mp_state, kvm_msr_entry, kvm_msrs,
    kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events,
};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

// ---- asm-generic/ioctl.h ----
pub const IOC_NONE: u64 = 0;
pub const IOC_WRITE: u64 = 1;
pub const IOC_READ: u64 = 2;

pub const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (ty << 8) | nr
}
pub const fn ioc_size(request: u64) -> usize {
    ((request >> 16) & 0x3fff) as usize
}
pub const fn ioc_nr(request: u64) -> u64 {
    request & 0xff
}

pub const KVMIO: u64 = 0xAE;
const fn io(nr: u64) -> u64 {
    ioc(IOC_NONE, KVMIO, nr, 0)
}
const fn ior<T>(nr: u64) -> u64 {
    ioc(IOC_READ, KVMIO, nr, size_of::<T>())
}
const fn iow<T>(nr: u64) -> u64 {
    ioc(IOC_WRITE, KVMIO, nr, size_of::<T>())
}
const fn iowr<T>(nr: u64) -> u64 {
    ioc(IOC_READ | IOC_WRITE, KVMIO, nr, size_of::<T>())
}

// ---- zerocopy mirrors of kvm-bindings structs without byte derives ----

macro_rules! mirror {
    ($(#[$m:meta])* $name:ident => $orig:path { $($f:ident : $t:ty),* $(,)? }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
        #[allow(non_camel_case_types)]
        pub struct $name { $(pub $f: $t),* }
        impl Default for $name {
            fn default() -> Self {
                zerocopy::FromZeros::new_zeroed()
            }
        }
        const _: () = {
            assert!(size_of::<$name>() == size_of::<$orig>());
            $( assert!(offset_of!($name, $f) == offset_of!($orig, $f)); )*
        };
    };
}

mirror!(
    /// `struct kvm_userspace_memory_region` (api.txt 4.34).
    kvm_userspace_memory_region => kvm_bindings::kvm_userspace_memory_region {
        slot: u32, flags: u32, guest_phys_addr: u64, memory_size: u64, userspace_addr: u64,
    }
);
mirror!(
    /// `struct kvm_userspace_memory_region2`.
    kvm_userspace_memory_region2 => kvm_bindings::kvm_userspace_memory_region2 {
        slot: u32, flags: u32, guest_phys_addr: u64, memory_size: u64, userspace_addr: u64,
        guest_memfd_offset: u64, guest_memfd: u32, pad1: u32, pad2: [u64; 14],
    }
);
mirror!(
    /// `struct kvm_enable_cap` (api.txt 4.36).
    kvm_enable_cap => kvm_bindings::kvm_enable_cap {
        cap: u32, flags: u32, args: [u64; 4], pad: [u8; 64],
    }
);
mirror!(
    /// `struct kvm_translation`.
    kvm_translation => kvm_bindings::kvm_translation {
        linear_address: u64, physical_address: u64, valid: u8, writeable: u8, usermode: u8,
        pad: [u8; 5],
    }
);
mirror!(
    /// `struct kvm_dirty_gfn`: one dirty-ring entry.
    kvm_dirty_gfn => kvm_bindings::kvm_dirty_gfn { flags: u32, slot: u32, offset: u64 }
);
mirror!(
    /// `struct kvm_sregs2`.
    kvm_sregs2_raw => kvm_bindings::kvm_sregs2 {
        cs: [u8; 24], ds: [u8; 24], es: [u8; 24], fs: [u8; 24], gs: [u8; 24], ss: [u8; 24],
        tr: [u8; 24], ldt: [u8; 24], gdt: [u8; 16], idt: [u8; 16],
        cr0: u64, cr2: u64, cr3: u64, cr4: u64, cr8: u64, efer: u64, apic_base: u64,
        flags: u64, pdptrs: [u64; 4],
    }
);

/// `struct kvm_dirty_log`: the union holds the user pointer of the bitmap.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[allow(non_camel_case_types)]
pub struct kvm_dirty_log {
    pub slot: u32,
    pub padding1: u32,
    pub dirty_bitmap: u64,
}
const _: () = assert!(size_of::<kvm_dirty_log>() == size_of::<kvm_bindings::kvm_dirty_log>());

/// `struct kvm_clear_dirty_log`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[allow(non_camel_case_types)]
pub struct kvm_clear_dirty_log {
    pub slot: u32,
    pub num_pages: u32,
    pub first_page: u64,
    pub dirty_bitmap: u64,
}
const _: () =
    assert!(size_of::<kvm_clear_dirty_log>() == size_of::<kvm_bindings::kvm_clear_dirty_log>());

/// Header of `struct kvm_cpuid2` / `struct kvm_msrs` / `struct kvm_msr_list`: nent, then entries.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[allow(non_camel_case_types)]
pub struct kvm_nent_header {
    pub nent: u32,
    pub padding: u32,
}
const _: () = assert!(size_of::<kvm_nent_header>() == size_of::<kvm_cpuid2>());

// ---- kvm_run (first page of the vCPU mmap area) ----
pub const KVM_RUN_SIZE: usize = size_of::<kvm_bindings::kvm_run>();
pub mod run_off {
    //! Byte offsets into `struct kvm_run`, from kvm-bindings.
    use kvm_bindings::kvm_run;
    use std::mem::offset_of;
    pub const REQUEST_INTERRUPT_WINDOW: usize = offset_of!(kvm_run, request_interrupt_window);
    pub const IMMEDIATE_EXIT: usize = offset_of!(kvm_run, immediate_exit);
    pub const EXIT_REASON: usize = offset_of!(kvm_run, exit_reason);
    pub const READY_FOR_INTERRUPT_INJECTION: usize =
        offset_of!(kvm_run, ready_for_interrupt_injection);
    pub const IF_FLAG: usize = offset_of!(kvm_run, if_flag);
    pub const FLAGS: usize = offset_of!(kvm_run, flags);
    pub const CR8: usize = offset_of!(kvm_run, cr8);
    pub const APIC_BASE: usize = offset_of!(kvm_run, apic_base);
    pub const EXIT_UNION: usize = offset_of!(kvm_run, __bindgen_anon_1);
    pub const KVM_VALID_REGS: usize = offset_of!(kvm_run, kvm_valid_regs);
    pub const KVM_DIRTY_REGS: usize = offset_of!(kvm_run, kvm_dirty_regs);
}

// ---- request numbers ----
// system ioctls
pub const KVM_GET_API_VERSION: u64 = io(0x00);
pub const KVM_CREATE_VM: u64 = io(0x01);
pub const KVM_GET_MSR_INDEX_LIST: u64 = iowr::<u32>(0x02); // struct kvm_msr_list: u32 nmsrs
pub const KVM_CHECK_EXTENSION: u64 = io(0x03);
pub const KVM_GET_VCPU_MMAP_SIZE: u64 = io(0x04);
pub const KVM_GET_SUPPORTED_CPUID: u64 = iowr::<kvm_nent_header>(0x05);
// VM ioctls
pub const KVM_CREATE_VCPU: u64 = io(0x41);
pub const KVM_GET_DIRTY_LOG: u64 = iow::<kvm_dirty_log>(0x42);
pub const KVM_SET_NR_MMU_PAGES: u64 = io(0x44);
pub const KVM_GET_NR_MMU_PAGES: u64 = io(0x45);
pub const KVM_SET_USER_MEMORY_REGION: u64 = iow::<kvm_userspace_memory_region>(0x46);
pub const KVM_SET_TSS_ADDR: u64 = io(0x47);
pub const KVM_SET_IDENTITY_MAP_ADDR: u64 = iow::<u64>(0x48);
pub const KVM_SET_USER_MEMORY_REGION2: u64 = iow::<kvm_userspace_memory_region2>(0x49);
pub const KVM_CREATE_IRQCHIP: u64 = io(0x60);
pub const KVM_ENABLE_CAP: u64 = iow::<kvm_enable_cap>(0xa3);
pub const KVM_CLEAR_DIRTY_LOG: u64 = iowr::<kvm_clear_dirty_log>(0xc0);
pub const KVM_RESET_DIRTY_RINGS: u64 = io(0xc7);
pub const KVM_GET_STATS_FD: u64 = io(0xce);
// vCPU ioctls
pub const KVM_RUN: u64 = io(0x80);
pub const KVM_GET_REGS: u64 = ior::<kvm_regs>(0x81);
pub const KVM_SET_REGS: u64 = iow::<kvm_regs>(0x82);
pub const KVM_GET_SREGS: u64 = ior::<kvm_sregs>(0x83);
pub const KVM_SET_SREGS: u64 = iow::<kvm_sregs>(0x84);
pub const KVM_TRANSLATE: u64 = iowr::<kvm_translation>(0x85);
pub const KVM_GET_MSRS: u64 = iowr::<kvm_nent_header>(0x88);
pub const KVM_SET_MSRS: u64 = iow::<kvm_nent_header>(0x89);
pub const KVM_SET_CPUID2: u64 = iow::<kvm_nent_header>(0x90);
pub const KVM_GET_CPUID2: u64 = iowr::<kvm_nent_header>(0x91);
pub const KVM_GET_MP_STATE: u64 = ior::<kvm_mp_state>(0x98);
pub const KVM_SET_MP_STATE: u64 = iow::<kvm_mp_state>(0x99);
pub const KVM_SET_GUEST_DEBUG: u64 = iow::<kvm_bindings::kvm_guest_debug>(0x9b);
pub const KVM_GET_VCPU_EVENTS: u64 = ior::<kvm_vcpu_events>(0x9f);
pub const KVM_SET_VCPU_EVENTS: u64 = iow::<kvm_vcpu_events>(0xa0);
pub const KVM_GET_DEBUGREGS: u64 = ior::<kvm_debugregs>(0xa1);
pub const KVM_SET_DEBUGREGS: u64 = iow::<kvm_debugregs>(0xa2);
pub const KVM_GET_TSC_KHZ: u64 = io(0xa3);
pub const KVM_GET_SREGS2: u64 = ior::<kvm_sregs2_raw>(0xcc);
pub const KVM_SET_SREGS2: u64 = iow::<kvm_sregs2_raw>(0xcd);

/// Every request number this crate knows, by kernel name (checked against Python's uapi).
pub const IOCTL_NUMBERS: &[(&str, u64)] = &[
    ("KVM_GET_API_VERSION", KVM_GET_API_VERSION),
    ("KVM_CREATE_VM", KVM_CREATE_VM),
    ("KVM_GET_MSR_INDEX_LIST", KVM_GET_MSR_INDEX_LIST),
    ("KVM_CHECK_EXTENSION", KVM_CHECK_EXTENSION),
    ("KVM_GET_VCPU_MMAP_SIZE", KVM_GET_VCPU_MMAP_SIZE),
    ("KVM_GET_SUPPORTED_CPUID", KVM_GET_SUPPORTED_CPUID),
    ("KVM_CREATE_VCPU", KVM_CREATE_VCPU),
    ("KVM_GET_DIRTY_LOG", KVM_GET_DIRTY_LOG),
    ("KVM_SET_NR_MMU_PAGES", KVM_SET_NR_MMU_PAGES),
    ("KVM_GET_NR_MMU_PAGES", KVM_GET_NR_MMU_PAGES),
    ("KVM_SET_USER_MEMORY_REGION", KVM_SET_USER_MEMORY_REGION),
    ("KVM_SET_TSS_ADDR", KVM_SET_TSS_ADDR),
    ("KVM_SET_IDENTITY_MAP_ADDR", KVM_SET_IDENTITY_MAP_ADDR),
    ("KVM_SET_USER_MEMORY_REGION2", KVM_SET_USER_MEMORY_REGION2),
    ("KVM_CREATE_IRQCHIP", KVM_CREATE_IRQCHIP),
    ("KVM_ENABLE_CAP", KVM_ENABLE_CAP),
    ("KVM_CLEAR_DIRTY_LOG", KVM_CLEAR_DIRTY_LOG),
    ("KVM_RESET_DIRTY_RINGS", KVM_RESET_DIRTY_RINGS),
    ("KVM_GET_STATS_FD", KVM_GET_STATS_FD),
    ("KVM_RUN", KVM_RUN),
    ("KVM_GET_REGS", KVM_GET_REGS),
    ("KVM_SET_REGS", KVM_SET_REGS),
    ("KVM_GET_SREGS", KVM_GET_SREGS),
    ("KVM_SET_SREGS", KVM_SET_SREGS),
    ("KVM_TRANSLATE", KVM_TRANSLATE),
    ("KVM_GET_MSRS", KVM_GET_MSRS),
    ("KVM_SET_MSRS", KVM_SET_MSRS),
    ("KVM_SET_CPUID2", KVM_SET_CPUID2),
    ("KVM_GET_CPUID2", KVM_GET_CPUID2),
    ("KVM_GET_MP_STATE", KVM_GET_MP_STATE),
    ("KVM_SET_MP_STATE", KVM_SET_MP_STATE),
    ("KVM_SET_GUEST_DEBUG", KVM_SET_GUEST_DEBUG),
    ("KVM_GET_VCPU_EVENTS", KVM_GET_VCPU_EVENTS),
    ("KVM_SET_VCPU_EVENTS", KVM_SET_VCPU_EVENTS),
    ("KVM_GET_DEBUGREGS", KVM_GET_DEBUGREGS),
    ("KVM_SET_DEBUGREGS", KVM_SET_DEBUGREGS),
    ("KVM_GET_TSC_KHZ", KVM_GET_TSC_KHZ),
    ("KVM_GET_SREGS2", KVM_GET_SREGS2),
    ("KVM_SET_SREGS2", KVM_SET_SREGS2),
];

/// Struct sizes by C name, from the kvm-bindings types (checked against Python's ctypes).
pub const STRUCT_SIZES: &[(&str, usize)] = &[
    (
        "kvm_userspace_memory_region",
        size_of::<kvm_userspace_memory_region>(),
    ),
    (
        "kvm_userspace_memory_region2",
        size_of::<kvm_userspace_memory_region2>(),
    ),
    ("kvm_regs", size_of::<kvm_regs>()),
    ("kvm_segment", size_of::<kvm_segment>()),
    ("kvm_dtable", size_of::<kvm_dtable>()),
    ("kvm_sregs", size_of::<kvm_sregs>()),
    ("kvm_sregs2", size_of::<kvm_bindings::kvm_sregs2>()),
    ("kvm_translation", size_of::<kvm_translation>()),
    ("kvm_cpuid_entry2", size_of::<kvm_cpuid_entry2>()),
    ("kvm_cpuid2", size_of::<kvm_cpuid2>()),
    ("kvm_msr_entry", size_of::<kvm_msr_entry>()),
    ("kvm_msrs", size_of::<kvm_msrs>()),
    ("kvm_vcpu_events", size_of::<kvm_vcpu_events>()),
    ("kvm_debugregs", size_of::<kvm_debugregs>()),
    ("kvm_mp_state", size_of::<kvm_mp_state>()),
    ("kvm_enable_cap", size_of::<kvm_enable_cap>()),
    ("kvm_dirty_log", size_of::<kvm_dirty_log>()),
    ("kvm_clear_dirty_log", size_of::<kvm_clear_dirty_log>()),
    ("kvm_dirty_gfn", size_of::<kvm_dirty_gfn>()),
    (
        "kvm_guest_debug",
        size_of::<kvm_bindings::kvm_guest_debug>(),
    ),
    ("kvm_run", KVM_RUN_SIZE),
];

// ---- constants ----
pub const KVM_API_VERSION: i64 = 12;
pub const PAGE_SIZE: u64 = 4096;
pub const PAGE_SHIFT: u32 = 12;

pub const KVM_MEM_LOG_DIRTY_PAGES: u32 = 1 << 0;
pub const KVM_MEM_READONLY: u32 = 1 << 1;
pub const KVM_MEM_GUEST_MEMFD: u32 = 1 << 2;

pub const KVM_DIRTY_LOG_PAGE_OFFSET: u64 = 64;

/// Capability numbers (include/uapi/linux/kvm.h).
pub mod cap {
    pub const IRQCHIP: u64 = 0;
    pub const HLT: u64 = 1;
    pub const MMU_SHADOW_CACHE_CONTROL: u64 = 2;
    pub const USER_MEMORY: u64 = 3;
    pub const SET_TSS_ADDR: u64 = 4;
    pub const VAPIC: u64 = 6;
    pub const EXT_CPUID: u64 = 7;
    pub const CLOCKSOURCE: u64 = 8;
    pub const NR_VCPUS: u64 = 9;
    pub const NR_MEMSLOTS: u64 = 10;
    pub const MP_STATE: u64 = 14;
    pub const COALESCED_MMIO: u64 = 15;
    pub const SYNC_MMU: u64 = 16;
    pub const DESTROY_MEMORY_REGION_WORKS: u64 = 21;
    pub const JOIN_MEMORY_REGIONS_WORKS: u64 = 30;
    pub const SET_IDENTITY_MAP_ADDR: u64 = 37;
    pub const VCPU_EVENTS: u64 = 41;
    pub const INTR_SHADOW: u64 = 49;
    pub const DEBUGREGS: u64 = 50;
    pub const X86_ROBUST_SINGLESTEP: u64 = 51;
    pub const ENABLE_CAP: u64 = 54;
    pub const GET_TSC_KHZ: u64 = 61;
    pub const MAX_VCPUS: u64 = 66;
    pub const SYNC_REGS: u64 = 74;
    pub const READONLY_MEM: u64 = 81;
    pub const ENABLE_CAP_VM: u64 = 98;
    pub const MAX_VCPU_ID: u64 = 128;
    pub const IMMEDIATE_EXIT: u64 = 136;
    pub const EXCEPTION_PAYLOAD: u64 = 164;
    pub const MANUAL_DIRTY_LOG_PROTECT2: u64 = 168;
    pub const DIRTY_LOG_RING: u64 = 192;
    pub const SREGS2: u64 = 200;
    pub const BINARY_STATS_FD: u64 = 203;
    pub const EXIT_ON_EMULATION_FAILURE: u64 = 204;
    pub const X86_TRIPLE_FAULT_EVENT: u64 = 218;
    pub const DIRTY_LOG_RING_ACQ_REL: u64 = 223;
    pub const DIRTY_LOG_RING_WITH_BITMAP: u64 = 225;
    pub const USER_MEMORY2: u64 = 231;
    pub const VM_TYPES: u64 = 235;
}
