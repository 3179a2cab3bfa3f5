//! CPUID: KVM_GET_SUPPORTED_CPUID, KVM_SET_CPUID2, KVM_GET_CPUID2 and the KVM leaves of
//! cpuid.txt (KVM_CPUID_SIGNATURE, KVM_CPUID_FEATURES).
//!
//! # Sources
//!
//! * The kernel (facts only, no code): `arch/x86/kvm/cpuid.c` (`kvm_dev_ioctl_get_cpuid`,
//!   `__do_cpuid_func`, `do_host_cpuid`, `kvm_vcpu_ioctl_set_cpuid2`, `kvm_set_cpuid`,
//!   `kvm_check_cpuid`, `kvm_update_cpuid_runtime`, `kvm_vcpu_ioctl_get_cpuid2`,
//!   `kvm_find_cpuid_entry2`), `arch/x86/kvm/x86.c` (the KVM_GET_SUPPORTED_CPUID,
//!   KVM_SET_CPUID2 and KVM_GET_CPUID2 cases), `Documentation/virt/kvm/x86/cpuid.rst`.
//! * The device: `tools/probe_cpuid.py`, results in `docs/device-cpuid.md`.
//!
//! # The simulator's supported table ([`supported_cpuid`])
//!
//! Deterministic: nothing comes from the host CPU. It is built from [`CpuFeatures::SUPPORTED`]
//! (the caps SET_SREGS and the MMU check against), so the table and the checks can never
//! disagree: `CpuFeatures::from_cpuid(&supported_cpuid(), &CpuFeatures::SUPPORTED)` is
//! `CpuFeatures::SUPPORTED`. Layout as KVM builds it: every basic leaf 0..=0xd, every extended
//! leaf 0x80000000..=0x80000008, then 0x40000000..=0x40000001; leaves 4, 7, 0xb and 0xd carry
//! `KVM_CPUID_FLAG_SIGNIFCANT_INDEX` (the kernel's `cpuid_function_is_indexed`).
//!
//! * Vendor "GenuineIntel" (leaf 0), so a guest given this table gets Intel semantics, which are
//!   also what a vCPU without CPUID has (`is_amd_compatible` is false); family 6 model 0x8f
//!   stepping 8 (leaf 1 EAX 0x806f8), CLFLUSH line 64 bytes.
//! * 1.EDX: FPU TSC MSR PAE CX8 APIC SEP PGE CMOV PAT PSE PSE-36 CLFLUSH MMX FXSR SSE SSE2 (the
//!   x86-64 baseline; the paging bits PSE, PAE, PGE, PSE-36 are what the MMU implements).
//!   1.ECX: SSE3 SSSE3 CX16 SSE4.1 SSE4.2 POPCNT HYPERVISOR, plus X2APIC, XSAVE, PCID, VMX
//!   when the caps have them. OSXSAVE is never reported (it is a runtime bit, see below).
//! * 6.EAX = 4 (ARAT), as KVM always reports.
//! * 7.0: EBX FSGSBASE SMEP SMAP, ECX UMIP PKU LA57 (CET as SHSTK), each when the caps have it;
//!   7.1 (LAM, FRED) only when the caps have one of them (then 7.0.EAX = 1).
//! * 0xd: XCR0 x87|SSE (0x3) when XSAVE is supported, save area 576 bytes; 0xd.1 all zero (no
//!   XSAVEOPT/XSAVEC/XGETBV1/XSAVES).
//! * 0x80000001: ECX LAHF_LM (SVM when the caps have it); EDX SYSCALL, NX, PDPE1GB, LM per caps.
//! * 0x80000008.EAX: MAXPHYADDR from the caps (48, like the reference machine's 0x3030), linear
//!   width 57 with LA57 else 48, GuestPhysAddrSize 0 (KVM reports 0 without TDP: the simulator
//!   is a shadow MMU).
//! * 2.EAX = 1 (AL = 1, no cache descriptors); 3, 4.0, 5, 8..0xc, 0x80000002..4 (brand) and
//!   0x80000005..7: zero (KVM zeroes these or passes host values; the simulator has no host).
//! * 0x40000000: EAX 0x40000001, "KVMKVMKVM\0\0\0". 0x40000001: EAX = NOP_IO_DELAY only
//!   ([`SIM_KVM_FEATURES`] = 0x2): the simulator has no kvmclock, async PF, PV EOI, steal time
//!   or any other PV MSR/hypercall, so it claims none of them (KVM reports 0x01007efb); EBX,
//!   ECX, EDX (hints) are 0. MMU_OP (bit 2) is deprecated and never reported.
//!
//! # The rules (kernel behaviour; the device agrees unless noted)
//!
//! KVM_GET_SUPPORTED_CPUID (system fd), in this order:
//! 1. the `kvm_cpuid2` header is unreadable: `EFAULT`;
//! 2. `nent` < 1: `E2BIG`;
//! 3. `nent` > 256 (`KVM_MAX_CPUID_ENTRIES`) is clamped to 256 (not an error);
//! 4. the table does not fit in `nent`: `E2BIG`; nothing is written, `nent` keeps its value;
//! 5. the entries are unwritable: `EFAULT` (`nent` not written back);
//! 6. success: the entries, then the header with `nent` = the number of entries (its padding
//!    word as given).
//!
//! KVM_SET_CPUID2 (vCPU fd):
//! 1. header unreadable: `EFAULT`; 2. `nent` > 256: `E2BIG`; 3. entries unreadable: `EFAULT`;
//! 4. the first entry with function 0x80000008 (any index) has a linear-address width
//!    (`EAX[15:8]`) other than 0, 48 or 57: `EINVAL`;
//! 5. leaf 0xd.0 enables a dynamic xfeature (XTILE_DATA, XCR0 bit 18): `EPERM` (the simulator
//!    has no `ARCH_REQ_XCOMP_GUEST_PERM`);
//! 6. otherwise the table is stored verbatim (`nent` = 0 included; duplicates, unknown leaves,
//!    index, flags and padding kept; MAXPHYADDR is not validated) and the vCPU's features become
//!    `CpuFeatures::from_cpuid(entries, &CpuFeatures::SUPPORTED)`. A failed set changes nothing.
//!    The after-KVM_RUN rule (only an identical table is accepted) is not modelled: the
//!    simulator has no KVM_RUN yet.
//!
//! KVM_GET_CPUID2 (vCPU fd): header unreadable `EFAULT`; `nent` < stored count `E2BIG` with
//! `nent` not written back; entries unwritable `EFAULT`; success writes the entries and `nent` =
//! the stored count (0 on a vCPU that never had KVM_SET_CPUID2). The entries read back are the
//! stored ones with the kernel's runtime bits (`kvm_update_cpuid_runtime`) reflecting the vCPU
//! now: 1.ECX.OSXSAVE = CR4.OSXSAVE and 1.EDX.APIC = APIC_BASE.EN (first entry of function 1),
//! 7.0.ECX.OSPKE = CR4.PKE, 0xd.0.EBX = the XSAVE size for XCR0 (576: XCR0 is x87 only, the
//! simulator has no XSETBV/KVM_SET_XCRS yet), and 0xd.1.EBX the same when 0xd.1.EAX has XSAVEC or
//! XSAVES.
//!
//! # Deliberate differences from the device ([`DEVICE_DIFFERENCES`])
//!
//! * The device's PVM module rewrites the table given to KVM_SET_CPUID2 into a host-like one
//!   (leaf 1, 7.x, 0xd.x changed, 0xd subleaves added, some leaves dropped); the simulator, like
//!   KVM on hardware, stores what it was given.
//! * The device accepts CR4.SMEP/SMAP/FSGSBASE/UMIP/OSXSAVE/PKE after a KVM_SET_CPUID2 whose table
//!   lacks those features (even an empty table); the simulator, like the kernel, rejects them.
//! * The supported table is the simulator's own (see above), not the host's: its length, vendor,
//!   feature bits and 0x40000001.EAX differ from the device's.

use zerocopy::IntoBytes;

use crate::errno::{Errno, Result};
use crate::uaccess::{read_struct, write_struct, UserAccess};
use crate::uapi::{self, kvm_cpuid_entry2, kvm_nent_header, kvm_sregs};
use crate::vcpu::sregs::{APIC_BASE_EN, CR4_OSXSAVE, CR4_PKE};
use crate::vcpu::{CpuFeatures, Vcpu};

// ------------------------------------------------------------------------------ constants

/// `KVM_MAX_CPUID_ENTRIES`.
pub const KVM_MAX_CPUID_ENTRIES: u32 = 256;
/// `KVM_CPUID_FLAG_SIGNIFCANT_INDEX` (sic, the kernel's spelling).
pub const KVM_CPUID_FLAG_SIGNIFCANT_INDEX: u32 = 1 << 0;
/// `KVM_CPUID_FLAG_STATEFUL_FUNC`, `KVM_CPUID_FLAG_STATE_READ_NEXT` (never produced here).
pub const KVM_CPUID_FLAG_STATEFUL_FUNC: u32 = 1 << 1;
pub const KVM_CPUID_FLAG_STATE_READ_NEXT: u32 = 1 << 2;

/// Leaf 0x40000000: EAX = the highest KVM leaf, EBX/ECX/EDX = "KVMKVMKVM\0\0\0".
pub const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
/// Leaf 0x40000001: EAX = the KVM_FEATURE_* bits, EDX = the KVM_HINTS_* bits.
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
pub const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// Bit numbers in KVM_CPUID_FEATURES.EAX (`asm/kvm_para.h`, cpuid.rst).
pub mod kvm_feature {
    pub const CLOCKSOURCE: u32 = 0;
    pub const NOP_IO_DELAY: u32 = 1;
    /// Deprecated: never reported by any KVM since 2.6.35.
    pub const MMU_OP: u32 = 2;
    pub const CLOCKSOURCE2: u32 = 3;
    pub const ASYNC_PF: u32 = 4;
    pub const STEAL_TIME: u32 = 5;
    pub const PV_EOI: u32 = 6;
    pub const PV_UNHALT: u32 = 7;
    pub const PV_TLB_FLUSH: u32 = 9;
    pub const ASYNC_PF_VMEXIT: u32 = 10;
    pub const PV_SEND_IPI: u32 = 11;
    pub const POLL_CONTROL: u32 = 12;
    pub const PV_SCHED_YIELD: u32 = 13;
    pub const ASYNC_PF_INT: u32 = 14;
    pub const MSI_EXT_DEST_ID: u32 = 15;
    pub const HC_MAP_GPA_RANGE: u32 = 16;
    pub const MIGRATION_CONTROL: u32 = 17;
    pub const CLOCKSOURCE_STABLE_BIT: u32 = 24;
}

/// What KVM on hardware reports in KVM_CPUID_FEATURES.EAX (with schedstats on), and the device
/// too: CLOCKSOURCE, NOP_IO_DELAY, CLOCKSOURCE2, ASYNC_PF, STEAL_TIME, PV_EOI, PV_UNHALT,
/// PV_TLB_FLUSH, ASYNC_PF_VMEXIT, PV_SEND_IPI, POLL_CONTROL, PV_SCHED_YIELD, ASYNC_PF_INT,
/// CLOCKSOURCE_STABLE_BIT.
pub const KVM_HOST_FEATURES: u32 = 0x0100_7efb;

/// What the simulator reports in KVM_CPUID_FEATURES.EAX: NOP_IO_DELAY only (no PV feature).
pub const SIM_KVM_FEATURES: u32 = 1 << kvm_feature::NOP_IO_DELAY;

/// "GenuineIntel" as EBX, ECX, EDX of leaf 0.
pub const VENDOR_INTEL: [u32; 3] = [0x756e_6547, 0x6c65_746e, 0x4965_6e69];
/// "AuthenticAMD" as EBX, ECX, EDX of leaf 0.
pub const VENDOR_AMD: [u32; 3] = [0x6874_7541, 0x444d_4163, 0x6974_6e65];
/// "HygonGenuine" as EBX, ECX, EDX of leaf 0.
pub const VENDOR_HYGON: [u32; 3] = [0x6f67_7948, 0x656e_6975, 0x6e65_476e];

/// The highest basic leaf of the simulator's table.
pub const SIM_MAX_BASIC_LEAF: u32 = 0xd;
/// The highest extended leaf of the simulator's table.
pub const SIM_MAX_EXT_LEAF: u32 = 0x8000_0008;
/// Leaf 1 EAX: family 6, model 0x8f, stepping 8.
pub const SIM_SIGNATURE_EAX: u32 = 0x0008_06f8;

/// XCR0 of a vCPU after reset (x87 only); the simulator has no XSETBV or KVM_SET_XCRS.
pub const XCR0_RESET: u64 = 1;
/// XCR0 bits the simulator supports: x87 and SSE.
pub const SIM_SUPPORTED_XCR0: u64 = 0x3;
/// The XSAVE legacy region plus header (`XSAVE_HDR_OFFSET + XSAVE_HDR_SIZE`): the save area size
/// for any XCR0 within x87|SSE.
pub const XSAVE_LEGACY_SIZE: u32 = 512 + 64;
/// `XFEATURE_MASK_USER_DYNAMIC`: XTILE_DATA (AMX), which needs ARCH_REQ_XCOMP_GUEST_PERM.
pub const XFEATURE_MASK_USER_DYNAMIC: u64 = 1 << 18;

/// Feature bits used here (register, bit).
pub mod bits {
    // 1.ECX
    pub const SSE3: u32 = 1 << 0;
    pub const VMX: u32 = 1 << 5;
    pub const SSSE3: u32 = 1 << 9;
    pub const CX16: u32 = 1 << 13;
    pub const PCID: u32 = 1 << 17;
    pub const SSE4_1: u32 = 1 << 19;
    pub const SSE4_2: u32 = 1 << 20;
    pub const X2APIC: u32 = 1 << 21;
    pub const POPCNT: u32 = 1 << 23;
    pub const XSAVE: u32 = 1 << 26;
    pub const OSXSAVE: u32 = 1 << 27;
    pub const HYPERVISOR: u32 = 1 << 31;
    // 1.EDX
    pub const FPU: u32 = 1 << 0;
    pub const PSE: u32 = 1 << 3;
    pub const TSC: u32 = 1 << 4;
    pub const MSR: u32 = 1 << 5;
    pub const PAE: u32 = 1 << 6;
    pub const CX8: u32 = 1 << 8;
    pub const APIC: u32 = 1 << 9;
    pub const SEP: u32 = 1 << 11;
    pub const PGE: u32 = 1 << 13;
    pub const CMOV: u32 = 1 << 15;
    pub const PAT: u32 = 1 << 16;
    pub const PSE36: u32 = 1 << 17;
    pub const CLFLUSH: u32 = 1 << 19;
    pub const MMX: u32 = 1 << 23;
    pub const FXSR: u32 = 1 << 24;
    pub const SSE: u32 = 1 << 25;
    pub const SSE2: u32 = 1 << 26;
    // 6.EAX
    pub const ARAT: u32 = 1 << 2;
    // 7.0.EBX
    pub const FSGSBASE: u32 = 1 << 0;
    pub const SMEP: u32 = 1 << 7;
    pub const SMAP: u32 = 1 << 20;
    // 7.0.ECX
    pub const UMIP: u32 = 1 << 2;
    pub const PKU: u32 = 1 << 3;
    pub const OSPKE: u32 = 1 << 4;
    pub const SHSTK: u32 = 1 << 7;
    pub const LA57: u32 = 1 << 16;
    // 7.1.EAX
    pub const FRED: u32 = 1 << 17;
    pub const LAM: u32 = 1 << 26;
    // 0xd.1.EAX
    pub const XSAVEC: u32 = 1 << 1;
    pub const XSAVES: u32 = 1 << 3;
    // 0x80000001.ECX
    pub const LAHF_LM: u32 = 1 << 0;
    pub const SVM: u32 = 1 << 2;
    // 0x80000001.EDX
    pub const SYSCALL: u32 = 1 << 11;
    pub const NX: u32 = 1 << 20;
    pub const PDPE1GB: u32 = 1 << 26;
    pub const LM: u32 = 1 << 29;
}

/// Where the simulator deliberately differs from the device, with the reason (see the module
/// documentation).
pub const DEVICE_DIFFERENCES: &[(&str, &str)] = &[
    (
        "KVM_SET_CPUID2 then KVM_GET_CPUID2 read-back",
        "the device's PVM module rewrites the table into a host-like one; the simulator stores \
         what it was given, like KVM on hardware (only the runtime bits change)",
    ),
    (
        "CR4 feature bits after KVM_SET_CPUID2 without the feature",
        "the device accepts CR4.SMEP/SMAP/FSGSBASE/UMIP/OSXSAVE/PKE whatever the table says; the \
         simulator rejects them (EINVAL) when the table lacks the feature, like the kernel",
    ),
    (
        "KVM_GET_SUPPORTED_CPUID contents",
        "the device reports the host CPU filtered by KVM; the simulator reports its own fixed \
         table (GenuineIntel, MAXPHYADDR 48, 0x40000001.EAX = NOP_IO_DELAY only)",
    ),
];

// --------------------------------------------------------------------------------- lookup

/// `cpuid_function_is_indexed`: the leaves KVM marks with `KVM_CPUID_FLAG_SIGNIFCANT_INDEX`.
pub fn is_indexed(function: u32) -> bool {
    matches!(
        function,
        4 | 7
            | 0xb
            | 0xd
            | 0xf
            | 0x10
            | 0x12
            | 0x14
            | 0x17
            | 0x18
            | 0x1d
            | 0x1e
            | 0x1f
            | 0x24
            | 0x8000_001d
    )
}

/// `kvm_find_cpuid_entry_index`: the first entry of `function` whose index does not matter
/// (no `KVM_CPUID_FLAG_SIGNIFCANT_INDEX`) or equals `index`.
pub fn find_index(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> Option<usize> {
    entries.iter().position(|e| {
        e.function == function
            && (e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || e.index == index)
    })
}

/// `kvm_find_cpuid_entry` (KVM_CPUID_INDEX_NOT_SIGNIFICANT): the first entry of `function`,
/// whatever its index and flags.
pub fn find(entries: &[kvm_cpuid_entry2], function: u32) -> Option<usize> {
    entries.iter().position(|e| e.function == function)
}

/// True when leaf 0 names an AMD or Hygon CPU (`guest_cpuid_is_amd_or_hygon`), which switches
/// KVM to AMD semantics (e.g. reserved bits in the page-table walker).
pub fn is_amd_compatible(entries: &[kvm_cpuid_entry2]) -> bool {
    find(entries, 0).is_some_and(|i| {
        let v = [entries[i].ebx, entries[i].ecx, entries[i].edx];
        v == VENDOR_AMD || v == VENDOR_HYGON
    })
}

// ------------------------------------------------------------------------ supported table

fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index,
        flags: if is_indexed(function) {
            KVM_CPUID_FLAG_SIGNIFCANT_INDEX
        } else {
            0
        },
        eax: regs[0],
        ebx: regs[1],
        ecx: regs[2],
        edx: regs[3],
        padding: [0; 3],
    }
}

fn flag(on: bool, bit: u32) -> u32 {
    if on {
        bit
    } else {
        0
    }
}

/// The simulator's KVM_GET_SUPPORTED_CPUID table: [`supported_cpuid_for`] the simulator's caps.
pub fn supported_cpuid() -> Vec<kvm_cpuid_entry2> {
    supported_cpuid_for(&CpuFeatures::SUPPORTED)
}

/// The supported table a simulator with caps `f` reports (see the module documentation).
pub fn supported_cpuid_for(f: &CpuFeatures) -> Vec<kvm_cpuid_entry2> {
    use bits::*;
    let has_7_1 = f.lam || f.fred;
    let mut t = Vec::new();
    for function in 0..=SIM_MAX_BASIC_LEAF {
        let regs = match function {
            0 => [
                SIM_MAX_BASIC_LEAF,
                VENDOR_INTEL[0],
                VENDOR_INTEL[1],
                VENDOR_INTEL[2],
            ],
            1 => [
                SIM_SIGNATURE_EAX,
                8 << 8, // CLFLUSH line size in 8-byte units
                SSE3 | SSSE3
                    | CX16
                    | SSE4_1
                    | SSE4_2
                    | POPCNT
                    | HYPERVISOR
                    | flag(f.vmx, VMX)
                    | flag(f.pcid, PCID)
                    | flag(f.x2apic, X2APIC)
                    | flag(f.xsave, XSAVE),
                FPU | PSE
                    | TSC
                    | MSR
                    | PAE
                    | CX8
                    | APIC
                    | SEP
                    | PGE
                    | CMOV
                    | PAT
                    | PSE36
                    | CLFLUSH
                    | MMX
                    | FXSR
                    | SSE
                    | SSE2,
            ],
            2 => [1, 0, 0, 0],
            6 => [ARAT, 0, 0, 0],
            7 => [
                u32::from(has_7_1),
                flag(f.fsgsbase, FSGSBASE) | flag(f.smep, SMEP) | flag(f.smap, SMAP),
                flag(f.umip, UMIP) | flag(f.pku, PKU) | flag(f.la57, LA57) | flag(f.cet, SHSTK),
                0,
            ],
            0xd => {
                let xcr0 = if f.xsave { SIM_SUPPORTED_XCR0 } else { 0 };
                [xcr0 as u32, XSAVE_LEGACY_SIZE, XSAVE_LEGACY_SIZE, 0]
            }
            _ => [0; 4],
        };
        t.push(entry(function, 0, regs));
        if function == 7 && has_7_1 {
            t.push(entry(
                7,
                1,
                [flag(f.fred, FRED) | flag(f.lam, LAM), 0, 0, 0],
            ));
        }
        if function == 0xd && f.xsave {
            t.push(entry(0xd, 1, [0; 4]));
        }
    }
    for function in 0x8000_0000..=SIM_MAX_EXT_LEAF {
        let regs = match function {
            0x8000_0000 => [SIM_MAX_EXT_LEAF, 0, 0, 0],
            0x8000_0001 => [
                0,
                0,
                LAHF_LM | flag(f.svm, SVM),
                SYSCALL | flag(f.nx, NX) | flag(f.pdpe1gb, PDPE1GB) | flag(f.lm, LM),
            ],
            0x8000_0008 => {
                let virt: u32 = if f.la57 { 57 } else { 48 };
                [u32::from(f.maxphyaddr) | virt << 8, 0, 0, 0]
            }
            _ => [0; 4],
        };
        t.push(entry(function, 0, regs));
    }
    t.push(entry(
        KVM_CPUID_SIGNATURE,
        0,
        [
            KVM_CPUID_FEATURES,
            KVM_SIGNATURE[0],
            KVM_SIGNATURE[1],
            KVM_SIGNATURE[2],
        ],
    ));
    t.push(entry(KVM_CPUID_FEATURES, 0, [SIM_KVM_FEATURES, 0, 0, 0]));
    t
}

// ------------------------------------------------------------------------ vCPU table rules

/// `kvm_check_cpuid`: the checks KVM_SET_CPUID2 makes on a new table.
pub fn check_cpuid(entries: &[kvm_cpuid_entry2]) -> Result<()> {
    if let Some(i) = find(entries, 0x8000_0008) {
        let vaddr_bits = (entries[i].eax >> 8) & 0xff;
        if !matches!(vaddr_bits, 0 | 48 | 57) {
            return Err(Errno::EINVAL);
        }
    }
    if let Some(i) = find_index(entries, 0xd, 0) {
        let xfeatures = u64::from(entries[i].eax) | u64::from(entries[i].edx) << 32;
        if xfeatures & XFEATURE_MASK_USER_DYNAMIC != 0 {
            // fpu_enable_guest_xfd_features without ARCH_REQ_XCOMP_GUEST_PERM.
            return Err(Errno::EPERM);
        }
    }
    Ok(())
}

/// `xstate_required_size(xcr0, _)` for the XCR0 values the simulator can have (x87/SSE only).
fn xstate_required_size(_xcr0: u64) -> u32 {
    XSAVE_LEGACY_SIZE
}

fn set_bit(reg: &mut u32, bit: u32, on: bool) {
    if on {
        *reg |= bit;
    } else {
        *reg &= !bit;
    }
}

/// `kvm_update_cpuid_runtime`: the stored table as KVM_GET_CPUID2 reads it back for a vCPU whose
/// special registers are `sregs` (and whose XCR0 is [`XCR0_RESET`]).
pub fn runtime_view(entries: &[kvm_cpuid_entry2], sregs: &kvm_sregs) -> Vec<kvm_cpuid_entry2> {
    let mut t = entries.to_vec();
    if let Some(i) = find(&t, 1) {
        set_bit(&mut t[i].ecx, bits::OSXSAVE, sregs.cr4 & CR4_OSXSAVE != 0);
        set_bit(
            &mut t[i].edx,
            bits::APIC,
            sregs.apic_base & APIC_BASE_EN != 0,
        );
    }
    if let Some(i) = find_index(&t, 7, 0) {
        set_bit(&mut t[i].ecx, bits::OSPKE, sregs.cr4 & CR4_PKE != 0);
    }
    if let Some(i) = find_index(&t, 0xd, 0) {
        t[i].ebx = xstate_required_size(XCR0_RESET);
    }
    if let Some(i) = find_index(&t, 0xd, 1) {
        if t[i].eax & (bits::XSAVEC | bits::XSAVES) != 0 {
            t[i].ebx = xstate_required_size(XCR0_RESET);
        }
    }
    t
}

/// Install a new table on the vCPU (KVM_SET_CPUID2 after the copy from user memory): check it,
/// store it, and recompute the features SET_SREGS checks against. On error nothing changes.
pub fn set_vcpu_cpuid(vcpu: &Vcpu, entries: Vec<kvm_cpuid_entry2>) -> Result<()> {
    check_cpuid(&entries)?;
    let features = CpuFeatures::from_cpuid(&entries, &CpuFeatures::SUPPORTED);
    let mut st = vcpu.state();
    st.cpuid = entries;
    st.features = features;
    Ok(())
}

/// The vCPU's table as KVM_GET_CPUID2 returns it (runtime bits applied).
pub fn get_vcpu_cpuid(vcpu: &Vcpu) -> Vec<kvm_cpuid_entry2> {
    let st = vcpu.state();
    runtime_view(&st.cpuid, &st.sregs)
}

// ------------------------------------------------------------------------------- ioctls

/// The address of `entries[]` after a `kvm_cpuid2` header at `arg`.
fn entries_addr(arg: u64) -> Result<u64> {
    arg.checked_add(std::mem::size_of::<kvm_nent_header>() as u64)
        .ok_or(Errno::EFAULT)
}

fn read_entries(ua: &mut dyn UserAccess, addr: u64, n: usize) -> Result<Vec<kvm_cpuid_entry2>> {
    let mut v = vec![kvm_cpuid_entry2::default(); n];
    ua.copy_from_user(addr, v.as_mut_slice().as_mut_bytes())?;
    Ok(v)
}

fn write_entries(ua: &mut dyn UserAccess, addr: u64, v: &[kvm_cpuid_entry2]) -> Result<()> {
    ua.copy_to_user(addr, v.as_bytes())
}

/// KVM_GET_SUPPORTED_CPUID on `table` (the kernel's `kvm_dev_ioctl_get_cpuid` + the x86.c case).
pub fn get_supported_into(
    table: &[kvm_cpuid_entry2],
    arg: u64,
    ua: &mut dyn UserAccess,
) -> Result<i64> {
    let mut hdr: kvm_nent_header = read_struct(ua, arg)?;
    if hdr.nent < 1 {
        return Err(Errno::E2BIG);
    }
    let maxnent = hdr.nent.min(KVM_MAX_CPUID_ENTRIES) as usize;
    if table.len() > maxnent {
        return Err(Errno::E2BIG);
    }
    write_entries(ua, entries_addr(arg)?, table)?;
    hdr.nent = table.len() as u32;
    write_struct(ua, arg, &hdr)?;
    Ok(0)
}

fn set_cpuid2(vcpu: &Vcpu, arg: u64, ua: &mut dyn UserAccess) -> Result<i64> {
    let hdr: kvm_nent_header = read_struct(ua, arg)?;
    if hdr.nent > KVM_MAX_CPUID_ENTRIES {
        return Err(Errno::E2BIG);
    }
    let entries = if hdr.nent == 0 {
        Vec::new()
    } else {
        read_entries(ua, entries_addr(arg)?, hdr.nent as usize)?
    };
    set_vcpu_cpuid(vcpu, entries)?;
    Ok(0)
}

fn get_cpuid2(vcpu: &Vcpu, arg: u64, ua: &mut dyn UserAccess) -> Result<i64> {
    let mut hdr: kvm_nent_header = read_struct(ua, arg)?;
    let table = get_vcpu_cpuid(vcpu);
    if (hdr.nent as usize) < table.len() {
        return Err(Errno::E2BIG);
    }
    write_entries(ua, entries_addr(arg)?, &table)?;
    hdr.nent = table.len() as u32;
    write_struct(ua, arg, &hdr)?;
    Ok(0)
}

/// System ioctls of this module; None if `request` is not one of them.
pub fn system_ioctl(request: u64, arg: u64, ua: &mut dyn UserAccess) -> Option<Result<i64>> {
    match request {
        uapi::KVM_GET_SUPPORTED_CPUID => Some(get_supported_into(&supported_cpuid(), arg, ua)),
        _ => None,
    }
}

/// vCPU ioctls of this module; None if `request` is not one of them.
pub fn vcpu_ioctl(
    vcpu: &Vcpu,
    request: u64,
    arg: u64,
    ua: &mut dyn UserAccess,
) -> Option<Result<i64>> {
    match request {
        uapi::KVM_SET_CPUID2 => Some(set_cpuid2(vcpu, arg, ua)),
        uapi::KVM_GET_CPUID2 => Some(get_cpuid2(vcpu, arg, ua)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uaccess::UserBuf;
    use crate::vcpu::sregs::{reset_sregs, CR4_PAE};
    use std::sync::{Arc, Weak};

    /// A fake user address for buffers: below mmap_min_addr, so anything outside the buffer
    /// faults instead of touching real memory.
    const BASE: u64 = 0x1000;
    const ENTRY: usize = std::mem::size_of::<kvm_cpuid_entry2>();

    fn e(function: u32, index: u32, flags: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            padding: [0; 3],
        }
    }

    /// A kvm_cpuid2 buffer: header (nent, padding) and room for `room` entries, `entries` first.
    fn cpuid2(nent: u32, padding: u32, room: usize, entries: &[kvm_cpuid_entry2]) -> Vec<u8> {
        let mut b = vec![0u8; 8 + room * ENTRY];
        b[..4].copy_from_slice(&nent.to_le_bytes());
        b[4..8].copy_from_slice(&padding.to_le_bytes());
        let bytes = entries.as_bytes();
        b[8..8 + bytes.len()].copy_from_slice(bytes);
        b
    }

    fn header(b: &[u8]) -> (u32, u32) {
        let w = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        (w(0), w(4))
    }

    fn entries_of(b: &[u8], n: usize) -> Vec<kvm_cpuid_entry2> {
        let mut v = vec![kvm_cpuid_entry2::default(); n];
        v.as_mut_slice()
            .as_mut_bytes()
            .copy_from_slice(&b[8..8 + n * ENTRY]);
        v
    }

    fn sys(b: &mut [u8]) -> Result<i64> {
        let mut ua = UserBuf {
            base: BASE,
            data: b,
        };
        system_ioctl(uapi::KVM_GET_SUPPORTED_CPUID, BASE, &mut ua).unwrap()
    }

    fn vcall(v: &Vcpu, request: u64, b: &mut [u8]) -> Result<i64> {
        let mut ua = UserBuf {
            base: BASE,
            data: b,
        };
        vcpu_ioctl(v, request, BASE, &mut ua).unwrap()
    }

    fn new_vcpu() -> Arc<Vcpu> {
        Vcpu::new(Weak::new(), 0).unwrap()
    }

    fn set(v: &Vcpu, entries: &[kvm_cpuid_entry2]) -> Result<i64> {
        let mut b = cpuid2(entries.len() as u32, 0, entries.len(), entries);
        vcall(v, uapi::KVM_SET_CPUID2, &mut b)
    }

    fn get(v: &Vcpu, room: usize) -> (Result<i64>, u32, Vec<kvm_cpuid_entry2>) {
        let mut b = cpuid2(room as u32, 0x77, room, &[]);
        let r = vcall(v, uapi::KVM_GET_CPUID2, &mut b);
        let n = header(&b).0;
        let got = if r.is_ok() {
            entries_of(&b, n as usize)
        } else {
            Vec::new()
        };
        (r, n, got)
    }

    #[test]
    fn supported_table_layout() {
        let t = supported_cpuid();
        let keys: Vec<(u32, u32)> = t.iter().map(|e| (e.function, e.index)).collect();
        let mut want: Vec<(u32, u32)> = (0..=0xd).map(|f| (f, 0)).collect();
        want.insert(0xe, (0xd, 1));
        want.extend((0x8000_0000..=0x8000_0008).map(|f| (f, 0)));
        want.extend([(0x4000_0000, 0), (0x4000_0001, 0)]);
        assert_eq!(keys, want);
        assert_eq!(t.len(), 26);
        assert!(t.len() <= KVM_MAX_CPUID_ENTRIES as usize);
        for x in &t {
            let indexed = matches!(x.function, 4 | 7 | 0xb | 0xd);
            assert_eq!(x.flags, u32::from(indexed), "flags of {:#x}", x.function);
            assert_eq!(x.padding, [0; 3]);
        }
        // Leaf 0 and 0x80000000 give the highest leaf of their range; vendor GenuineIntel.
        assert_eq!(
            (t[0].eax, t[0].ebx, t[0].ecx, t[0].edx),
            (0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69)
        );
        assert_eq!(t[find(&t, 0x8000_0000).unwrap()].eax, 0x8000_0008);
        assert!(!is_amd_compatible(&t));
        // Deterministic.
        assert_eq!(t, supported_cpuid());
    }

    #[test]
    fn supported_table_matches_caps() {
        let t = supported_cpuid();
        let s = CpuFeatures::SUPPORTED;
        assert_eq!(CpuFeatures::from_cpuid(&t, &s), s);
        assert_eq!(s.maxphyaddr, 48);
        let l = |f, i| t[find_index(&t, f, i).unwrap()];
        let linear = if s.la57 { 57 } else { 48 };
        assert_eq!(l(0x8000_0008, 0).eax, linear << 8 | 48);
        let ext = l(0x8000_0001, 0).edx;
        assert_eq!(ext & bits::LM != 0, s.lm);
        assert_eq!(ext & bits::NX != 0, s.nx);
        let l1 = l(1, 0);
        for b in [
            bits::PSE,
            bits::PAE,
            bits::PGE,
            bits::PSE36,
            bits::APIC,
            bits::FPU,
        ] {
            assert_ne!(l1.edx & b, 0);
        }
        assert_eq!(
            l1.ecx & (bits::OSXSAVE | bits::HYPERVISOR),
            bits::HYPERVISOR
        );
        assert_eq!(l(7, 0).ecx & bits::OSPKE, 0);
        // Any caps: the table describes exactly them (the model's paging features included).
        let all = CpuFeatures {
            pdpe1gb: true,
            la57: true,
            pku: true,
            lam: true,
            fred: true,
            pcid: true,
            cet: true,
            vmx: true,
            svm: true,
            maxphyaddr: 52,
            ..s
        };
        let t2 = supported_cpuid_for(&all);
        assert_eq!(CpuFeatures::from_cpuid(&t2, &all), all);
        assert_eq!(t2[find(&t2, 0x8000_0008).unwrap()].eax, 57 << 8 | 52);
        assert_eq!(
            t2[find_index(&t2, 7, 1).unwrap()].eax,
            bits::FRED | bits::LAM
        );
        assert_eq!(t2[find_index(&t2, 7, 0).unwrap()].eax, 1);
        let none = CpuFeatures {
            xsave: false,
            ..CpuFeatures::from_cpuid(&[], &s)
        };
        let t3 = supported_cpuid_for(&none);
        assert_eq!(CpuFeatures::from_cpuid(&t3, &s).maxphyaddr, 36);
        assert!(find_index(&t3, 0xd, 1).is_none());
        assert_eq!(t3[find_index(&t3, 0xd, 0).unwrap()].eax, 0);
    }

    #[test]
    fn kvm_leaves() {
        let t = supported_cpuid();
        let sig = t[find(&t, KVM_CPUID_SIGNATURE).unwrap()];
        assert_eq!(
            (sig.eax, [sig.ebx, sig.ecx, sig.edx]),
            (KVM_CPUID_FEATURES, KVM_SIGNATURE)
        );
        let text: Vec<u8> = [sig.ebx, sig.ecx, sig.edx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        assert_eq!(&text, b"KVMKVMKVM\0\0\0");
        let feat = t[find(&t, KVM_CPUID_FEATURES).unwrap()];
        assert_eq!(
            (feat.eax, feat.ebx, feat.ecx, feat.edx),
            (SIM_KVM_FEATURES, 0, 0, 0)
        );
        assert_eq!(feat.eax & (1 << kvm_feature::MMU_OP), 0);
        assert_ne!(feat.eax & (1 << kvm_feature::NOP_IO_DELAY), 0);
        // What KVM (and the device) report: the cpuid.rst bits minus the VMM-owned ones.
        let kvm_bits = [0, 1, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 24];
        assert_eq!(
            kvm_bits.iter().fold(0u32, |a, b| a | 1 << b),
            KVM_HOST_FEATURES
        );
        assert_eq!(SIM_KVM_FEATURES & !KVM_HOST_FEATURES, 0);
    }

    #[test]
    fn get_supported_nent_rules() {
        let n = supported_cpuid().len();
        // nent 0 and too small: E2BIG, nothing written, nent kept.
        for nent in [0u32, 1, 2, n as u32 - 1] {
            let mut b = cpuid2(nent, 0xdead, n, &[]);
            let before = b.clone();
            assert_eq!(sys(&mut b), Err(Errno::E2BIG), "nent {nent}");
            assert_eq!(b, before);
        }
        // Exactly enough, more, more than KVM_MAX_CPUID_ENTRIES (clamped): nent written back,
        // the header's padding word untouched.
        for nent in [n as u32, n as u32 + 1, 256, 257, 100_000] {
            let mut b = cpuid2(nent, 0xdead, n, &[]);
            assert_eq!(sys(&mut b), Ok(0), "nent {nent}");
            assert_eq!(header(&b), (n as u32, 0xdead));
            assert_eq!(entries_of(&b, n), supported_cpuid());
        }
        // Another table: the clamp at 256 applies before the size check.
        let big = vec![kvm_cpuid_entry2::default(); 257];
        let mut b = cpuid2(1000, 0, 0, &[]);
        let mut ua = UserBuf {
            base: BASE,
            data: &mut b,
        };
        assert_eq!(get_supported_into(&big, BASE, &mut ua), Err(Errno::E2BIG));
    }

    #[test]
    fn get_supported_efault() {
        let n = supported_cpuid().len();
        // Header unreadable.
        let mut ua = UserBuf {
            base: BASE,
            data: &mut [],
        };
        assert_eq!(
            system_ioctl(uapi::KVM_GET_SUPPORTED_CPUID, 0, &mut ua).unwrap(),
            Err(Errno::EFAULT)
        );
        // Header readable, entries not: EFAULT and nent not written back.
        let mut b = cpuid2(n as u32, 0, 0, &[]);
        assert_eq!(sys(&mut b), Err(Errno::EFAULT));
        assert_eq!(header(&b), (n as u32, 0));
        // ... but nent too small is E2BIG first.
        let mut b = cpuid2(1, 0, 0, &[]);
        assert_eq!(sys(&mut b), Err(Errno::E2BIG));
        // Not our requests.
        let mut ua = UserBuf {
            base: BASE,
            data: &mut [],
        };
        assert!(system_ioctl(uapi::KVM_GET_API_VERSION, 0, &mut ua).is_none());
        assert!(system_ioctl(uapi::KVM_SET_CPUID2, 0, &mut ua).is_none());
    }

    #[test]
    fn set_cpuid2_nent_and_efault() {
        let v = new_vcpu();
        let mut b = cpuid2(257, 0, 0, &[]);
        assert_eq!(vcall(&v, uapi::KVM_SET_CPUID2, &mut b), Err(Errno::E2BIG));
        let mut b = cpuid2(100_000, 0, 0, &[]);
        assert_eq!(vcall(&v, uapi::KVM_SET_CPUID2, &mut b), Err(Errno::E2BIG));
        // Entries missing: EFAULT; nent 0 needs none.
        let mut b = cpuid2(1, 0, 0, &[]);
        assert_eq!(vcall(&v, uapi::KVM_SET_CPUID2, &mut b), Err(Errno::EFAULT));
        let mut b = cpuid2(0, 0, 0, &[]);
        assert_eq!(vcall(&v, uapi::KVM_SET_CPUID2, &mut b), Ok(0));
        let mut ua = UserBuf {
            base: BASE,
            data: &mut [],
        };
        assert_eq!(
            vcpu_ioctl(&v, uapi::KVM_SET_CPUID2, 0x10, &mut ua).unwrap(),
            Err(Errno::EFAULT)
        );
        assert_eq!(
            vcpu_ioctl(&v, uapi::KVM_GET_CPUID2, 0x10, &mut ua).unwrap(),
            Err(Errno::EFAULT)
        );
        assert!(vcpu_ioctl(&v, uapi::KVM_GET_SREGS, 0x10, &mut ua).is_none());
        // 256 entries are fine.
        let many: Vec<_> = (0..256).map(|i| e(0x1000 + i, 0, 0, [i; 4])).collect();
        assert_eq!(set(&v, &many), Ok(0));
        assert_eq!(get(&v, 256).2, many);
    }

    #[test]
    fn set_cpuid2_checks() {
        let v = new_vcpu();
        let l8 = |vaddr: u32| e(0x8000_0008, 0, 0, [vaddr << 8 | 40, 0, 0, 0]);
        for vaddr in 0..=255 {
            let want = if matches!(vaddr, 0 | 48 | 57) {
                Ok(0)
            } else {
                Err(Errno::EINVAL)
            };
            assert_eq!(set(&v, &[l8(vaddr)]), want, "vaddr {vaddr}");
        }
        // Only the first 0x80000008 entry counts, whatever its index or flags.
        assert_eq!(set(&v, &[l8(48), l8(40)]), Ok(0));
        assert_eq!(set(&v, &[l8(40), l8(48)]), Err(Errno::EINVAL));
        let mut odd = l8(40);
        (odd.index, odd.flags) = (3, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
        assert_eq!(set(&v, &[odd]), Err(Errno::EINVAL));
        // XTILE_DATA: EPERM; other XCR0 bits, high or low: fine. Only 0xd.0 is looked at.
        let d = |index, flags, eax, edx| e(0xd, index, flags, [eax, 0, 0, edx]);
        assert_eq!(set(&v, &[d(0, 1, 0x6_0003, 0)]), Err(Errno::EPERM));
        assert_eq!(set(&v, &[d(5, 0, 0x6_0003, 0)]), Err(Errno::EPERM));
        assert_eq!(set(&v, &[d(5, 1, 0x6_0003, 0)]), Ok(0));
        assert_eq!(set(&v, &[d(0, 1, 0x2_0003, 0xffff_ffff)]), Ok(0));
        assert_eq!(set(&v, &[l8(1), d(0, 1, 0x4_0000, 0)]), Err(Errno::EINVAL));
        // MAXPHYADDR is not validated.
        for phys in [0, 20, 52, 64, 255] {
            assert_eq!(
                set(&v, &[e(0x8000_0008, 0, 0, [48 << 8 | phys, 0, 0, 0])]),
                Ok(0)
            );
        }
    }

    #[test]
    fn failed_set_changes_nothing() {
        let v = new_vcpu();
        let t = supported_cpuid();
        assert_eq!(set(&v, &t), Ok(0));
        let before = v.state().clone();
        let bad = [e(0x8000_0008, 0, 0, [40 << 8 | 40, 0, 0, 0])];
        assert_eq!(set(&v, &bad), Err(Errno::EINVAL));
        let mut b = cpuid2(300, 0, 0, &[]);
        assert_eq!(vcall(&v, uapi::KVM_SET_CPUID2, &mut b), Err(Errno::E2BIG));
        let after = v.state().clone();
        assert_eq!(after.cpuid, before.cpuid);
        assert_eq!(after.features, before.features);
        assert_eq!(after.features, CpuFeatures::SUPPORTED);
    }

    #[test]
    fn table_stored_verbatim() {
        let v = new_vcpu();
        let mut odd = e(0x1234, 5, 0xfe, [1, 2, 3, 4]);
        odd.padding = [9, 9, 9];
        let table = [
            odd,
            e(
                0x4000_0000,
                0,
                0,
                [
                    0x4000_0001,
                    KVM_SIGNATURE[0],
                    KVM_SIGNATURE[1],
                    KVM_SIGNATURE[2],
                ],
            ),
            e(0x4000_0001, 0, 0, [KVM_HOST_FEATURES, 0, 0, 1]),
            e(0x4000_0001, 0, 0, [7, 7, 7, 7]), // a duplicate: kept
            e(2, 0, 0, [1, 2, 3, 4]),
        ];
        assert_eq!(set(&v, &table), Ok(0));
        let (r, n, got) = get(&v, 8);
        assert_eq!((r, n), (Ok(0), 5));
        assert_eq!(got, table);
        assert_eq!(v.state().cpuid, table);
    }

    #[test]
    fn runtime_bits_follow_the_vcpu() {
        let v = new_vcpu();
        let table = [
            e(1, 0, 0, [0x806f8, 0, bits::OSXSAVE | bits::XSAVE, 0]),
            e(7, 0, 1, [0, 0, bits::OSPKE | bits::PKU, 0]),
            e(0xd, 0, 1, [3, 0x1234, 0x240, 0]),
            e(0xd, 1, 1, [bits::XSAVEC, 0x999, 0, 0]),
        ];
        assert_eq!(set(&v, &table), Ok(0));
        // Fresh vCPU: CR4 = 0, APIC enabled.
        let (_, _, got) = get(&v, 4);
        assert_eq!(got[0].ecx, bits::XSAVE);
        assert_eq!(got[0].edx, bits::APIC);
        assert_eq!(got[1].ecx, bits::PKU);
        assert_eq!((got[2].ebx, got[3].ebx), (576, 576));
        // The stored table itself is untouched; only the view changes.
        assert_eq!(v.state().cpuid, table);
        let mut s = reset_sregs();
        s.cr4 = CR4_OSXSAVE | CR4_PKE | CR4_PAE;
        s.apic_base = 0xfee0_0100;
        let view = runtime_view(&table, &s);
        assert_eq!(view[0].ecx, bits::XSAVE | bits::OSXSAVE);
        assert_eq!(view[0].edx, 0);
        assert_eq!(view[1].ecx, bits::PKU | bits::OSPKE);
        // 0xd.1 without XSAVEC/XSAVES keeps its EBX; a 7.x entry of another index is not 7.0.
        let t2 = [e(0xd, 1, 1, [0, 0x999, 0, 0]), e(7, 1, 1, [0, 0, 0, 0])];
        assert_eq!(runtime_view(&t2, &s), t2);
        // Leaf 1 is found whatever its index/flags (first entry wins).
        let t3 = [e(1, 3, 1, [0; 4]), e(1, 0, 0, [0; 4])];
        let view = runtime_view(&t3, &s);
        assert_eq!((view[0].ecx, view[1].ecx), (bits::OSXSAVE, 0));
    }

    #[test]
    fn get_cpuid2_rules() {
        let v = new_vcpu();
        // Never set: 0 entries, any nent works and reads back 0.
        for room in [0, 1, 5] {
            let (r, n, _) = get(&v, room);
            assert_eq!((r, n), (Ok(0), 0));
        }
        let t = supported_cpuid();
        assert_eq!(set(&v, &t), Ok(0));
        // Too small: E2BIG, nent not written back.
        for room in [0, 1, t.len() - 1] {
            let (r, n, _) = get(&v, room);
            assert_eq!((r, n), (Err(Errno::E2BIG), room as u32));
        }
        // Enough: nent = the stored count, header padding untouched.
        let mut b = cpuid2(200, 0xabcd, t.len(), &[]);
        assert_eq!(vcall(&v, uapi::KVM_GET_CPUID2, &mut b), Ok(0));
        assert_eq!(header(&b), (t.len() as u32, 0xabcd));
        assert_eq!(entries_of(&b, t.len()), get_vcpu_cpuid(&v));
        // Header readable, entries not: EFAULT, nent untouched.
        let mut b = cpuid2(200, 0, 0, &[]);
        assert_eq!(vcall(&v, uapi::KVM_GET_CPUID2, &mut b), Err(Errno::EFAULT));
        assert_eq!(header(&b).0, 200);
        // The supported table reads back as given, but for the runtime APIC bit (set: the APIC
        // is enabled) — which it already has.
        assert_eq!(get_vcpu_cpuid(&v), t);
    }

    #[test]
    fn features_follow_the_table() {
        let v = new_vcpu();
        assert_eq!(v.state().features, CpuFeatures::FRESH_VCPU);
        assert_eq!(set(&v, &supported_cpuid()), Ok(0));
        assert_eq!(v.state().features, CpuFeatures::SUPPORTED);
        // MAXPHYADDR 40 from the guest table; the long-mode CR3 check follows it.
        let t = [
            e(0x8000_0000, 0, 0, [0x8000_0008, 0, 0, 0]),
            e(0x8000_0008, 0, 0, [48 << 8 | 40, 0, 0, 0]),
        ];
        assert_eq!(set(&v, &t), Ok(0));
        assert_eq!(v.state().features.maxphyaddr, 40);
        let mut s = reset_sregs();
        s.cr0 = 0x8005_0033;
        s.cr4 = CR4_PAE;
        s.efer = 0xd01;
        s.cs.l = 1;
        s.cr3 = 1 << 39;
        assert_eq!(v.set_sregs(&s), Ok(()));
        s.cr3 = 1 << 40;
        assert_eq!(v.set_sregs(&s), Err(Errno::EINVAL));
        // An empty table: no features at all, MAXPHYADDR 36 (the kernel's default).
        assert_eq!(set(&v, &[]), Ok(0));
        let f = v.state().features;
        assert_eq!(f, CpuFeatures::from_cpuid(&[], &CpuFeatures::SUPPORTED));
        assert_eq!((f.maxphyaddr, f.smep, f.lm), (36, false, false));
        let mut s = reset_sregs();
        s.cr4 = crate::vcpu::sregs::CR4_SMEP;
        assert_eq!(v.set_sregs(&s), Err(Errno::EINVAL));
    }

    #[test]
    fn lookups() {
        let t = [
            e(7, 1, 1, [1; 4]),
            e(7, 0, 1, [2; 4]),
            e(0xd, 9, 0, [3; 4]),
            e(1, 4, 1, [4; 4]),
        ];
        assert_eq!(find_index(&t, 7, 0), Some(1));
        assert_eq!(find_index(&t, 7, 1), Some(0));
        assert_eq!(find_index(&t, 7, 2), None);
        assert_eq!(find_index(&t, 0xd, 0), Some(2)); // index not significant
        assert_eq!(find_index(&t, 1, 0), None);
        assert_eq!(find(&t, 1), Some(3));
        assert_eq!(find(&t, 7), Some(0));
        for f in [
            4, 7, 0xb, 0xd, 0xf, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1d, 0x1e, 0x1f, 0x24,
        ] {
            assert!(is_indexed(f), "{f:#x}");
        }
        for f in [
            0,
            1,
            2,
            6,
            0x8000_0001,
            0x8000_0008,
            0x4000_0000,
            0x4000_0001,
        ] {
            assert!(!is_indexed(f), "{f:#x}");
        }
        assert!(is_indexed(0x8000_001d));
        let amd = [e(
            0,
            0,
            0,
            [0xd, VENDOR_AMD[0], VENDOR_AMD[1], VENDOR_AMD[2]],
        )];
        assert!(is_amd_compatible(&amd));
        let hygon = [e(
            0,
            0,
            0,
            [0xd, VENDOR_HYGON[0], VENDOR_HYGON[1], VENDOR_HYGON[2]],
        )];
        assert!(is_amd_compatible(&hygon));
        assert!(!is_amd_compatible(&[]));
        // The vendor string is EBX, EDX, ECX.
        let text = |r: [u32; 3]| -> Vec<u8> {
            [r[0], r[2], r[1]]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect()
        };
        assert_eq!(text(VENDOR_INTEL), b"GenuineIntel");
        assert_eq!(text(VENDOR_AMD), b"AuthenticAMD");
        assert_eq!(text(VENDOR_HYGON), b"HygonGenuine");
        assert_eq!(DEVICE_DIFFERENCES.len(), 3);
    }
}
