//! SET_SREGS validity and the vCPU reset state, as the kernel checks them.
//!
//! This module is pure: it decides whether a `KVM_SET_SREGS` / `KVM_SET_SREGS2` / `KVM_SET_REGS`
//! input is accepted (errno `EINVAL` otherwise) and what `KVM_GET_SREGS` / `KVM_GET_REGS` read
//! back afterwards. It holds no vCPU and touches no MMU: the caller owns the state and, after a
//! successful set, resets its MMU context when [`mmu_reset_needed`] says so and reloads the PAE
//! PDPTRs when [`is_pae_paging`] (the kernel ignores a failed PDPTR load here).
//!
//! # Sources
//!
//! * The device: `tools/probe_sregs.py`, results in `docs/device-sregs.md` (kernel
//!   `6.18.44-fc-v782`, KVM with the PVM vendor module, shadow MMU).
//! * The kernel (facts only, no code): `arch/x86/kvm/x86.c` `kvm_is_valid_sregs`,
//!   `__set_sregs_common`, `__set_sregs`, `__set_sregs2`, `kvm_is_valid_cr0`, `kvm_is_valid_cr4`,
//!   `kvm_set_cr8`, `kvm_vcpu_reset`, `__set_regs`; `arch/x86/kvm/x86.h` `__cr4_reserved_bits`;
//!   `arch/x86/kvm/lapic.c` `kvm_apic_set_base`; `arch/x86/kvm/cpuid.h` `kvm_vcpu_is_legal_cr3`.
//!
//! # The rules (every failure is `EINVAL`, and a failed set changes nothing)
//!
//! 1. CR0 bits 63:32 set.
//! 2. CR0.NW without CR0.CD.
//! 3. CR0.PG without CR0.PE.
//! 4. EFER.LME and CR0.PG both set ("long mode"): CR4.PAE and EFER.LMA must be set, and CR3 must
//!    be a legal GPA (no bit at or above MAXPHYADDR; bits 62:61 are masked only with LAM). CR3 is
//!    not checked outside long mode, and its low 12 bits are never checked.
//! 5. Not long mode: EFER.LMA must be clear and CS.L must be 0.
//! 6. CR4: bits outside the set KVM knows, plus the feature bits whose feature the guest lacks
//!    (OSXSAVE/XSAVE, SMEP, SMAP, FSGSBASE, PKE/PKU, LA57, UMIP, VMXE/VMX, PCIDE/PCID, LAM_SUP/LAM,
//!    CET/SHSTK|IBT, FRED). SMXE (14), KL (19), PKS (24) and bits 15, 25-27, 29-31, 33-63 are
//!    always reserved. PCIDE is not tied to LMA or to CR3[11:0] here (that is MOV CR4 only).
//! 7. apic_base, only when it differs from the current value: bits 0-7 and 9, bits at or above
//!    MAXPHYADDR, EXTD (bit 10) without X2APIC in the guest CPUID, and EXTD without EN (bit 11).
//! 8. EFER is never validated by SET_SREGS (kvm_valid_efer is the WRMSR path): every bit is stored,
//!    e.g. SVME and bit 20, subject only to rules 4 and 5.
//!
//! What is stored (read back) after a successful set:
//!
//! * CR0, CR2, CR3, CR4, EFER, apic_base: exactly as given (no ET forcing, reserved CR0 bits
//!   kept).
//! * Segments: every byte of every `kvm_segment`, padding included, as given.
//! * GDT/IDT: base and limit; the `kvm_dtable` padding reads back 0.
//! * CR8: the value if it fits in bits 3:0; otherwise the set is ignored and CR8 keeps its old
//!   value (`kvm_set_cr8` fails and `__set_sregs_common` ignores the failure).
//! * interrupt_bitmap: the lowest set bit becomes the pending (injected) interrupt and is the only
//!   bit read back; an all-zero bitmap leaves the previously pending interrupt in place. The
//!   bitmap is the SET_SREGS/GET_SREGS view of the vCPU's one injected interrupt, which
//!   KVM_GET/SET_VCPU_EVENTS also show: `vcpu::events` keeps it equal to `events.interrupt`
//!   (`events::queued_interrupt`, `events::sync_interrupt`, `events::set_interrupt`). The vCPU
//!   runner reads the interrupt with `events::queued_interrupt` and, when it delivers it, clears
//!   the bitmap (or calls `events::set_interrupt` with `injected: false`).
//! * KVM_SET_REGS: never fails; RFLAGS bit 1 is forced to 1 and RFLAGS.VM (bit 17) is cleared;
//!   everything else (reserved RFLAGS bits, non-canonical RIP) is stored as given.
//!
//! # Deliberate differences from the device
//!
//! The device's PVM module cannot run legacy paging and mishandles one CR4 bit. There the
//! simulator follows KVM on hardware and the documentation, and the errno/read-back comparison
//! against the device must expect a difference. [`DEVICE_DIFFERENCES`] lists the probe cases
//! (names as in `tools/probe_sregs.py`) with the reason:
//!
//! * CR0.PG with EFER.LME=0 (legacy 32-bit or PAE paging): the device accepts it but drops PG, so
//!   CR0 reads back without PG; the simulator keeps PG (it supports 2-level and PAE paging).
//! * SET_SREGS2 with PDPTRS_VALID in PAE paging: the device drops PG and reads back flags=0 and no
//!   PDPTRs; the simulator keeps PG, the PDPTRs and the flag.
//!
//! Everywhere else the simulator matches the device, including where the device differs from
//! upstream KVM on hardware: on a fresh vCPU (empty CPUID) the device accepts CR4.SMEP, SMAP,
//! FSGSBASE, UMIP and OSXSAVE, and so does [`CpuFeatures::default`]; RFLAGS.VM is cleared.

use crate::errno::{Errno, Result};
use kvm_bindings::{kvm_cpuid_entry2, kvm_dtable, kvm_regs, kvm_segment, kvm_sregs, kvm_sregs2};

// ------------------------------------------------------------------------------------ bits

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_MP: u64 = 1 << 1;
pub const CR0_EM: u64 = 1 << 2;
pub const CR0_TS: u64 = 1 << 3;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_WP: u64 = 1 << 16;
pub const CR0_AM: u64 = 1 << 18;
pub const CR0_NW: u64 = 1 << 29;
pub const CR0_CD: u64 = 1 << 30;
pub const CR0_PG: u64 = 1 << 31;

pub const CR4_VME: u64 = 1 << 0;
pub const CR4_PVI: u64 = 1 << 1;
pub const CR4_TSD: u64 = 1 << 2;
pub const CR4_DE: u64 = 1 << 3;
pub const CR4_PSE: u64 = 1 << 4;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_MCE: u64 = 1 << 6;
pub const CR4_PGE: u64 = 1 << 7;
pub const CR4_PCE: u64 = 1 << 8;
pub const CR4_OSFXSR: u64 = 1 << 9;
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
pub const CR4_UMIP: u64 = 1 << 11;
pub const CR4_LA57: u64 = 1 << 12;
pub const CR4_VMXE: u64 = 1 << 13;
pub const CR4_SMXE: u64 = 1 << 14;
pub const CR4_FSGSBASE: u64 = 1 << 16;
pub const CR4_PCIDE: u64 = 1 << 17;
pub const CR4_OSXSAVE: u64 = 1 << 18;
pub const CR4_SMEP: u64 = 1 << 20;
pub const CR4_SMAP: u64 = 1 << 21;
pub const CR4_PKE: u64 = 1 << 22;
pub const CR4_CET: u64 = 1 << 23;
pub const CR4_LAM_SUP: u64 = 1 << 28;
pub const CR4_FRED: u64 = 1 << 32;

/// The CR4 bits KVM knows at all (the complement of the kernel's `CR4_RESERVED_BITS`); the
/// feature-gated ones among them are further restricted by [`cr4_reserved_bits`].
pub const CR4_KNOWN_BITS: u64 = CR4_VME
    | CR4_PVI
    | CR4_TSD
    | CR4_DE
    | CR4_PSE
    | CR4_PAE
    | CR4_MCE
    | CR4_PGE
    | CR4_PCE
    | CR4_OSFXSR
    | CR4_OSXMMEXCPT
    | CR4_UMIP
    | CR4_LA57
    | CR4_VMXE
    | CR4_FSGSBASE
    | CR4_PCIDE
    | CR4_OSXSAVE
    | CR4_SMEP
    | CR4_SMAP
    | CR4_PKE
    | CR4_CET
    | CR4_LAM_SUP
    | CR4_FRED;

/// CR3 bits 62 (LAM_U48) and 61 (LAM_U57): masked before the CR3 legality check only when the
/// guest has LAM.
pub const CR3_LAM_BITS: u64 = (1 << 62) | (1 << 61);

pub const EFER_SCE: u64 = 1 << 0;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const EFER_NXE: u64 = 1 << 11;
pub const EFER_SVME: u64 = 1 << 12;

/// CR8 holds the 4-bit task priority; any higher bit makes `kvm_set_cr8` fail.
pub const CR8_TPR_MASK: u64 = 0xf;

pub const APIC_BASE_BSP: u64 = 1 << 8;
pub const APIC_BASE_EXTD: u64 = 1 << 10;
pub const APIC_BASE_EN: u64 = 1 << 11;
/// The architectural default APIC page.
pub const APIC_DEFAULT_PHYS_BASE: u64 = 0xfee0_0000;
/// apic_base bits 0-7 and 9 are always reserved (bit 8 is BSP, 10 EXTD, 11 EN).
pub const APIC_BASE_LOW_RESERVED: u64 = 0x2ff;

pub const RFLAGS_FIXED: u64 = 1 << 1;
pub const RFLAGS_VM: u64 = 1 << 17;
pub const RFLAGS_AC: u64 = 1 << 18;

/// `kvm_sregs2.flags` bit: the `pdptrs` field is valid.
pub const SREGS2_FLAGS_PDPTRS_VALID: u64 = 1;

/// MAXPHYADDR the kernel assumes when the guest CPUID has no leaf 0x80000008, i.e. on a vCPU
/// that never had KVM_SET_CPUID2 (`cpuid_query_maxphyaddr`).
pub const DEFAULT_MAXPHYADDR: u8 = 36;

// ------------------------------------------------------------------------------ features

/// The guest CPU features that shape the checks (from the vCPU's CPUID).
///
/// Only some fields matter to SET_SREGS: `maxphyaddr` (CR3 in long mode, apic_base), the CR4
/// feature bits (`xsave`, `smep`, `smap`, `fsgsbase`, `pku`, `la57`, `umip`, `vmx`, `pcid`,
/// `lam`, `cet`, `fred`), `lam` (CR3 bits 62:61) and `x2apic` (apic_base EXTD). `lm`, `nx`,
/// `pdpe1gb` and `svm` are carried for the MMU and the MSR paths: SET_SREGS never validates
/// EFER.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuFeatures {
    /// Guest MAXPHYADDR, CPUID 0x80000008.EAX[7:0] (36 if that leaf is absent).
    pub maxphyaddr: u8,
    /// CPUID 0x80000001.EDX[29].
    pub lm: bool,
    /// CPUID 0x80000001.EDX[20].
    pub nx: bool,
    /// CPUID 0x80000001.EDX[26] (1 GiB pages).
    pub pdpe1gb: bool,
    /// CPUID 7.0.ECX[16].
    pub la57: bool,
    /// CPUID 7.0.EBX[7].
    pub smep: bool,
    /// CPUID 7.0.EBX[20].
    pub smap: bool,
    /// CPUID 7.0.ECX[3].
    pub pku: bool,
    /// CPUID 7.0.ECX[2].
    pub umip: bool,
    /// CPUID 7.0.EBX[0].
    pub fsgsbase: bool,
    /// CPUID 1.ECX[17].
    pub pcid: bool,
    /// CPUID 1.ECX[26].
    pub xsave: bool,
    /// CPUID 1.ECX[5].
    pub vmx: bool,
    /// CPUID 0x80000001.ECX[2].
    pub svm: bool,
    /// CPUID 1.ECX[21].
    pub x2apic: bool,
    /// CPUID 7.1.EAX[26] (linear address masking).
    pub lam: bool,
    /// CPUID 7.0.ECX[7] (shadow stacks) or 7.0.EDX[20] (IBT).
    pub cet: bool,
    /// CPUID 7.1.EAX[17].
    pub fred: bool,
}

impl CpuFeatures {
    /// A vCPU that never had KVM_SET_CPUID2, as the device checks it (measured, see
    /// `docs/device-sregs.md`): MAXPHYADDR 36 (the kernel's default for an empty CPUID, so CR3
    /// bits 36-63 in long mode and apic_base bits 36-63 are `EINVAL`), no X2APIC, and the CR4 bits
    /// the device accepts: SMEP, SMAP, FSGSBASE, UMIP, OSXSAVE yes; LA57, VMXE, PCIDE, CET,
    /// LAM_SUP, FRED no; PKE yes (before KVM_SET_CPUID2 only host-reserved CR4 bits are
    /// checked, and the model implements protection keys). `lm` and `nx` are set (the simulator's CPU has them; SET_SREGS
    /// does not look at them), `pdpe1gb` is not.
    pub const FRESH_VCPU: CpuFeatures = CpuFeatures {
        maxphyaddr: DEFAULT_MAXPHYADDR,
        lm: true,
        nx: true,
        pdpe1gb: false,
        la57: false,
        smep: true,
        smap: true,
        pku: true,
        umip: true,
        fsgsbase: true,
        pcid: false,
        xsave: true,
        vmx: false,
        svm: false,
        x2apic: false,
        lam: false,
        cet: false,
        fred: false,
    };

    /// The simulator's supported set: a vCPU after KVM_SET_CPUID2 with the simulator's
    /// KVM_GET_SUPPORTED_CPUID: what the model implements. NX, LM, X2APIC, SMEP, SMAP, UMIP,
    /// FSGSBASE, XSAVE, and the walker's 1 GiB pages (PDPE1GB) and 5-level paging (LA57); no
    /// PKU (KVM never offers it with the shadow MMU, the simulator's default; the walker
    /// implements protection keys for CR4.PKE), PCID, VMX, SVM, LAM, CET, FRED. MAXPHYADDR
    /// 48, the reference machine's 0x80000008.EAX = 0x3030.
    pub const SUPPORTED: CpuFeatures = CpuFeatures {
        maxphyaddr: 48,
        lm: true,
        nx: true,
        pdpe1gb: true,
        la57: true,
        smep: true,
        smap: true,
        pku: false,
        umip: true,
        fsgsbase: true,
        pcid: false,
        xsave: true,
        vmx: false,
        svm: false,
        x2apic: true,
        lam: false,
        cet: false,
        fred: false,
    };

    /// The features a guest CPUID table gives, limited to what `caps` (the simulator's supported
    /// set) allows, as the kernel does after KVM_SET_CPUID2 (guest CPUID AND KVM caps). MAXPHYADDR
    /// is taken from leaf 0x80000008 if the table's 0x80000000.EAX reaches it, else 36; it is not
    /// limited by `caps`.
    pub fn from_cpuid(entries: &[kvm_cpuid_entry2], caps: &CpuFeatures) -> CpuFeatures {
        // Indexed leaves match their index; the others take the first entry of the
        // function whatever its index (kvm_find_cpuid_entry).
        let find = |function: u32, index: u32| {
            let i = if crate::cpuid::is_indexed(function) {
                crate::cpuid::find_index(entries, function, index)
            } else {
                crate::cpuid::find(entries, function)
            };
            i.map(|i| &entries[i])
        };
        let reg = |function: u32, index: u32, pick: fn(&kvm_cpuid_entry2) -> u32| {
            find(function, index).map_or(0, pick)
        };
        let bit = |v: u32, b: u32| v & (1 << b) != 0;
        let l1_ecx = reg(1, 0, |e| e.ecx);
        let l7_ebx = reg(7, 0, |e| e.ebx);
        let l7_ecx = reg(7, 0, |e| e.ecx);
        let l7_edx = reg(7, 0, |e| e.edx);
        let l71_eax = reg(7, 1, |e| e.eax);
        let e1_ecx = reg(0x8000_0001, 0, |e| e.ecx);
        let e1_edx = reg(0x8000_0001, 0, |e| e.edx);
        let max_ext = reg(0x8000_0000, 0, |e| e.eax);
        let maxphyaddr = match find(0x8000_0008, 0) {
            Some(e) if max_ext >= 0x8000_0008 => (e.eax & 0xff) as u8,
            _ => DEFAULT_MAXPHYADDR,
        };
        CpuFeatures {
            maxphyaddr,
            lm: caps.lm && bit(e1_edx, 29),
            nx: caps.nx && bit(e1_edx, 20),
            pdpe1gb: caps.pdpe1gb && bit(e1_edx, 26),
            la57: caps.la57 && bit(l7_ecx, 16),
            smep: caps.smep && bit(l7_ebx, 7),
            smap: caps.smap && bit(l7_ebx, 20),
            pku: caps.pku && bit(l7_ecx, 3),
            umip: caps.umip && bit(l7_ecx, 2),
            fsgsbase: caps.fsgsbase && bit(l7_ebx, 0),
            pcid: caps.pcid && bit(l1_ecx, 17),
            xsave: caps.xsave && bit(l1_ecx, 26),
            vmx: caps.vmx && bit(l1_ecx, 5),
            svm: caps.svm && bit(e1_ecx, 2),
            x2apic: caps.x2apic && bit(l1_ecx, 21),
            lam: caps.lam && bit(l71_eax, 26),
            cet: caps.cet && (bit(l7_ecx, 7) || bit(l7_edx, 20)),
            fred: caps.fred && bit(l71_eax, 17),
        }
    }
}

/// The features of a vCPU before KVM_SET_CPUID2: [`CpuFeatures::FRESH_VCPU`]. This is what the
/// device checks SET_SREGS against on a fresh vCPU (MAXPHYADDR 36, not the 48 or 46 of
/// KVM_GET_SUPPORTED_CPUID); use [`CpuFeatures::SUPPORTED`] or [`CpuFeatures::from_cpuid`] after
/// KVM_SET_CPUID2.
impl Default for CpuFeatures {
    fn default() -> Self {
        CpuFeatures::FRESH_VCPU
    }
}

/// Bits at or above MAXPHYADDR (`kvm_vcpu_reserved_gpa_bits_raw`).
pub fn reserved_gpa_bits(f: &CpuFeatures) -> u64 {
    if f.maxphyaddr >= 64 {
        0
    } else {
        u64::MAX << f.maxphyaddr
    }
}

/// The CR4 bits SET_SREGS rejects for these features (`__cr4_reserved_bits` over the guest
/// features, plus the bits KVM does not know).
pub fn cr4_reserved_bits(f: &CpuFeatures) -> u64 {
    let gated = [
        (f.xsave, CR4_OSXSAVE),
        (f.smep, CR4_SMEP),
        (f.smap, CR4_SMAP),
        (f.fsgsbase, CR4_FSGSBASE),
        (f.pku, CR4_PKE),
        (f.la57, CR4_LA57),
        (f.umip, CR4_UMIP),
        (f.vmx, CR4_VMXE),
        (f.pcid, CR4_PCIDE),
        (f.lam, CR4_LAM_SUP),
        (f.cet, CR4_CET),
        (f.fred, CR4_FRED),
    ];
    gated
        .iter()
        .filter(|(has, _)| !has)
        .fold(!CR4_KNOWN_BITS, |acc, (_, b)| acc | b)
}

/// The apic_base bits that are reserved for these features.
pub fn apic_base_reserved_bits(f: &CpuFeatures) -> u64 {
    let extd = if f.x2apic { 0 } else { APIC_BASE_EXTD };
    reserved_gpa_bits(f) | APIC_BASE_LOW_RESERVED | extd
}

// --------------------------------------------------------------------------------- reset

fn seg(base: u64, limit: u32, selector: u16, type_: u8, s: u8) -> kvm_segment {
    kvm_segment {
        base,
        limit,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 0,
        s,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The general registers of a fresh vCPU, exactly as the device reads them back: RIP 0xfff0,
/// RFLAGS 0x2, RDX 0x600 (the kernel's value when the CPUID has no leaf 1; a later
/// KVM_SET_CPUID2 does not change it), everything else 0.
pub fn reset_regs() -> kvm_regs {
    kvm_regs {
        rdx: 0x600,
        rip: 0xfff0,
        rflags: RFLAGS_FIXED,
        ..Default::default()
    }
}

/// The special registers of a fresh vCPU 0 (the BSP), exactly as the device reads them back.
pub fn reset_sregs() -> kvm_sregs {
    reset_sregs_for(true)
}

/// The special registers of a fresh vCPU; only apic_base depends on being the BSP (vCPU id 0 by
/// default): 0xfee00900 for the BSP, 0xfee00800 for the others. The same with and without an
/// in-kernel irqchip.
pub fn reset_sregs_for(bsp: bool) -> kvm_sregs {
    let data = seg(0, 0xffff, 0, 3, 1);
    let dt = kvm_dtable {
        base: 0,
        limit: 0xffff,
        padding: [0; 3],
    };
    kvm_sregs {
        cs: seg(0xffff_0000, 0xffff, 0xf000, 0xb, 1),
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: seg(0, 0xffff, 0, 0xb, 0),
        ldt: seg(0, 0xffff, 0, 2, 0),
        gdt: dt,
        idt: dt,
        cr0: CR0_CD | CR0_NW | CR0_ET,
        cr2: 0,
        cr3: 0,
        cr4: 0,
        cr8: 0,
        efer: 0,
        apic_base: APIC_DEFAULT_PHYS_BASE | APIC_BASE_EN | if bsp { APIC_BASE_BSP } else { 0 },
        interrupt_bitmap: [0; 4],
    }
}

// -------------------------------------------------------------------------------- checks

fn einval<T>() -> Result<T> {
    Err(Errno::EINVAL)
}

/// `kvm_is_valid_cr0`: bits 63:32, NW without CD, PG without PE.
pub fn check_cr0(cr0: u64) -> Result<()> {
    if cr0 >> 32 != 0 {
        return einval();
    }
    if cr0 & CR0_NW != 0 && cr0 & CR0_CD == 0 {
        return einval();
    }
    if cr0 & CR0_PG != 0 && cr0 & CR0_PE == 0 {
        return einval();
    }
    Ok(())
}

/// `kvm_is_valid_cr4` for SET_SREGS: no reserved bit (see [`cr4_reserved_bits`]).
pub fn check_cr4(f: &CpuFeatures, cr4: u64) -> Result<()> {
    if cr4 & cr4_reserved_bits(f) != 0 {
        return einval();
    }
    Ok(())
}

/// `kvm_vcpu_is_legal_cr3`: no bit at or above MAXPHYADDR, after masking the LAM bits when the
/// guest has LAM. Only checked in long mode.
pub fn check_cr3_long_mode(f: &CpuFeatures, cr3: u64) -> Result<()> {
    let cr3 = if f.lam { cr3 & !CR3_LAM_BITS } else { cr3 };
    if cr3 & reserved_gpa_bits(f) != 0 {
        return einval();
    }
    Ok(())
}

/// `kvm_apic_set_base` for a host-initiated change: reserved bits and the invalid mode (EXTD
/// without EN). The caller skips it when the value is unchanged (see [`check_sregs_from`]).
pub fn check_apic_base(f: &CpuFeatures, apic_base: u64) -> Result<()> {
    if apic_base & apic_base_reserved_bits(f) != 0 {
        return einval();
    }
    if apic_base & (APIC_BASE_EXTD | APIC_BASE_EN) == APIC_BASE_EXTD {
        return einval();
    }
    Ok(())
}

/// True when EFER.LME and CR0.PG are both set: the kernel's "long mode" test for SET_SREGS.
pub fn is_long_mode_request(s: &kvm_sregs) -> bool {
    s.efer & EFER_LME != 0 && s.cr0 & CR0_PG != 0
}

/// `kvm_is_valid_sregs` (mode consistency, CR3, CR4, CR0) followed by the apic_base check, with
/// no current state: apic_base is always checked.
pub fn check_sregs(f: &CpuFeatures, new: &kvm_sregs) -> Result<()> {
    check_sregs_common(f, new)?;
    check_apic_base(f, new.apic_base)
}

/// Like [`check_sregs`], but as the kernel does it against the vCPU's current state: an
/// apic_base equal to the current one is accepted without checks (it may even have bits that a
/// later KVM_SET_CPUID2 made reserved). CR3 has no such exemption.
pub fn check_sregs_from(f: &CpuFeatures, current: &kvm_sregs, new: &kvm_sregs) -> Result<()> {
    check_sregs_common(f, new)?;
    if new.apic_base != current.apic_base {
        check_apic_base(f, new.apic_base)?;
    }
    Ok(())
}

fn check_sregs_common(f: &CpuFeatures, new: &kvm_sregs) -> Result<()> {
    if is_long_mode_request(new) {
        if new.cr4 & CR4_PAE == 0 || new.efer & EFER_LMA == 0 {
            return einval();
        }
        check_cr3_long_mode(f, new.cr3)?;
    } else if new.efer & EFER_LMA != 0 || new.cs.l != 0 {
        return einval();
    }
    check_cr4(f, new.cr4)?;
    check_cr0(new.cr0)
}

// --------------------------------------------------------------------------------- apply

/// What the vCPU stores after a successful SET_SREGS (call a `check_sregs*` first): see the
/// module documentation for each field. `_f` is unused today: nothing stored depends on CPUID.
pub fn apply_sregs(_f: &CpuFeatures, state: &mut kvm_sregs, new: &kvm_sregs) {
    apply_common(state, new);
    if let Some(vector) = first_pending_vector(&new.interrupt_bitmap) {
        state.interrupt_bitmap = [0; 4];
        state.interrupt_bitmap[vector / 64] = 1 << (vector % 64);
    }
}

/// Check against the current state, then apply: the whole of KVM_SET_SREGS on `state`. On error
/// `state` is unchanged.
pub fn set_sregs(f: &CpuFeatures, state: &mut kvm_sregs, new: &kvm_sregs) -> Result<()> {
    check_sregs_from(f, state, new)?;
    apply_sregs(f, state, new);
    Ok(())
}

fn apply_common(state: &mut kvm_sregs, new: &kvm_sregs) {
    state.cs = new.cs;
    state.ds = new.ds;
    state.es = new.es;
    state.fs = new.fs;
    state.gs = new.gs;
    state.ss = new.ss;
    state.tr = new.tr;
    state.ldt = new.ldt;
    state.gdt = kvm_dtable {
        base: new.gdt.base,
        limit: new.gdt.limit,
        padding: [0; 3],
    };
    state.idt = kvm_dtable {
        base: new.idt.base,
        limit: new.idt.limit,
        padding: [0; 3],
    };
    state.cr0 = new.cr0;
    state.cr2 = new.cr2;
    state.cr3 = new.cr3;
    state.cr4 = new.cr4;
    if new.cr8 & !CR8_TPR_MASK == 0 {
        state.cr8 = new.cr8;
    }
    state.efer = new.efer;
    state.apic_base = new.apic_base;
}

/// The lowest vector set in an interrupt bitmap (`find_first_bit` over 256 bits).
pub fn first_pending_vector(bitmap: &[u64; 4]) -> Option<usize> {
    bitmap
        .iter()
        .enumerate()
        .find(|(_, w)| **w != 0)
        .map(|(i, w)| i * 64 + w.trailing_zeros() as usize)
}

/// PAE paging (CR0.PG, CR4.PAE, not EFER.LMA): after a set the kernel reloads the PDPTRs from
/// CR3 (a failed load is ignored), unless SET_SREGS2 supplied them.
pub fn is_pae_paging(s: &kvm_sregs) -> bool {
    s.cr0 & CR0_PG != 0 && s.cr4 & CR4_PAE != 0 && s.efer & EFER_LMA == 0
}

/// Whether the set changes CR0, CR3, CR4 or EFER (the kernel then resets the MMU context and
/// flushes the guest TLB) or enters PAE paging (the PDPTRs are reloaded).
pub fn mmu_reset_needed(old: &kvm_sregs, new: &kvm_sregs) -> bool {
    old.cr0 != new.cr0
        || old.cr3 != new.cr3
        || old.cr4 != new.cr4
        || old.efer != new.efer
        || is_pae_paging(new)
}

// ------------------------------------------------------------------------------- sregs2

/// The `kvm_sregs` part of a `kvm_sregs2` (interrupt_bitmap all zero, so applying it leaves the
/// pending interrupt alone, as `__set_sregs2` does).
pub fn sregs_from_sregs2(s2: &kvm_sregs2) -> kvm_sregs {
    kvm_sregs {
        cs: s2.cs,
        ds: s2.ds,
        es: s2.es,
        fs: s2.fs,
        gs: s2.gs,
        ss: s2.ss,
        tr: s2.tr,
        ldt: s2.ldt,
        gdt: s2.gdt,
        idt: s2.idt,
        cr0: s2.cr0,
        cr2: s2.cr2,
        cr3: s2.cr3,
        cr4: s2.cr4,
        cr8: s2.cr8,
        efer: s2.efer,
        apic_base: s2.apic_base,
        interrupt_bitmap: [0; 4],
    }
}

/// `__set_sregs2`'s own checks, before the SET_SREGS ones: unknown flags, and PDPTRS_VALID
/// outside PAE paging (judged on the new CR0/CR4/EFER).
pub fn check_sregs2_flags(s2: &kvm_sregs2) -> Result<()> {
    if s2.flags & !SREGS2_FLAGS_PDPTRS_VALID != 0 {
        return einval();
    }
    if s2.flags & SREGS2_FLAGS_PDPTRS_VALID != 0 && !is_pae_paging(&sregs_from_sregs2(s2)) {
        return einval();
    }
    Ok(())
}

/// The checks of KVM_SET_SREGS2 against the current state. After success apply
/// [`sregs_from_sregs2`] with [`apply_sregs`]; if PDPTRS_VALID, the caller stores `pdptrs` instead
/// of loading them from CR3.
pub fn check_sregs2_from(f: &CpuFeatures, current: &kvm_sregs, s2: &kvm_sregs2) -> Result<()> {
    check_sregs2_flags(s2)?;
    check_sregs_from(f, current, &sregs_from_sregs2(s2))
}

// --------------------------------------------------------------------------------- regs

/// KVM_SET_REGS has no failing input.
pub fn check_regs(_new: &kvm_regs) -> Result<()> {
    Ok(())
}

/// What KVM_GET_REGS reads back after KVM_SET_REGS: everything as given, except RFLAGS bit 1
/// forced to 1 (`__set_regs`) and RFLAGS.VM cleared (the device; the simulator has no
/// virtual-8086 mode either).
pub fn apply_regs(state: &mut kvm_regs, new: &kvm_regs) {
    *state = *new;
    state.rflags = (new.rflags | RFLAGS_FIXED) & !RFLAGS_VM;
}

// ----------------------------------------------------------------- device differences

/// The probe cases (`tools/probe_sregs.py`, `docs/device-sregs.md`) where the simulator
/// deliberately differs from the device, with the reason. Names are the probe's case names; a
/// sweep case is named `"<reg> ^ bit <n>"` and applies to every base it ran in.
pub const DEVICE_DIFFERENCES: &[(&str, &str)] = &[
    (
        "legacy 32-bit paging (PG, no PAE, no LME)",
        "device (PVM) drops CR0.PG when EFER.LME=0 (read back 0x10011); the simulator keeps PG \
         like KVM on hardware, it supports 2-level paging",
    ),
    (
        "legacy 32-bit paging + PSE",
        "device (PVM) drops CR0.PG when EFER.LME=0; the simulator keeps PG (2-level paging)",
    ),
    (
        "PAE paging (PG, PAE, no LME)",
        "device (PVM) drops CR0.PG when EFER.LME=0; the simulator keeps PG (PAE paging)",
    ),
    (
        "PAE paging + NXE",
        "device (PVM) drops CR0.PG when EFER.LME=0; the simulator keeps PG (PAE paging)",
    ),
    (
        "PAE paging flags=1 pdptrs",
        "SET_SREGS2 with PDPTRS_VALID in PAE paging: device drops PG and reads back flags=0 and \
         zero PDPTRs; the simulator keeps PG, the PDPTRs and flags=1",
    ),
    (
        "PAE paging flags=0",
        "SET_SREGS2 in PAE paging: device drops PG; the simulator keeps it",
    ),
];

// --------------------------------------------------------------------------------- tests

#[cfg(test)]
mod tests {
    use super::*;

    const F: CpuFeatures = CpuFeatures::FRESH_VCPU;

    fn flat(selector: u16, type_: u8, s: u8, l: u8, db: u8) -> kvm_segment {
        kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector,
            type_,
            present: 1,
            dpl: 0,
            db,
            s,
            l,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        }
    }

    /// The probe's "lm64" base: reset plus a flat 64-bit long-mode state.
    fn lm64() -> kvm_sregs {
        let mut s = reset_sregs();
        s.cr0 = 0x8005_0033;
        s.cr4 = CR4_PAE;
        s.efer = 0xd01;
        s.cr3 = 0x1000;
        s.cs = flat(0x8, 0xb, 1, 1, 0);
        let d = flat(0x10, 3, 1, 0, 1);
        (s.ds, s.es, s.fs, s.gs, s.ss) = (d, d, d, d, d);
        s.tr = kvm_segment {
            limit: 0x67,
            g: 0,
            db: 0,
            ..flat(0x18, 0xb, 0, 0, 0)
        };
        s.gdt.base = 0x500;
        s.gdt.limit = 0x1f;
        s.idt.base = 0x1000;
        s.idt.limit = 0xfff;
        s
    }

    /// The probe's "pm32" base: protected mode without paging.
    fn pm32() -> kvm_sregs {
        let mut s = lm64();
        s.cr0 = 0x10011;
        s.cr4 = 0;
        s.efer = 0;
        s.cr3 = 0;
        s.cs = flat(0x8, 0xb, 1, 0, 1);
        s
    }

    /// Run one probe-style case: start at `base`, change it with `m`, set. Returns the result and
    /// the state read back.
    fn case(
        f: &CpuFeatures,
        base: kvm_sregs,
        m: impl FnOnce(&mut kvm_sregs),
    ) -> (Result<()>, kvm_sregs, kvm_sregs) {
        let mut state = base;
        let mut new = base;
        m(&mut new);
        let r = set_sregs(f, &mut state, &new);
        (r, new, state)
    }

    fn ok_same(f: &CpuFeatures, base: kvm_sregs, m: impl FnOnce(&mut kvm_sregs)) {
        let (r, new, got) = case(f, base, m);
        assert_eq!(r, Ok(()));
        assert_eq!(got, new, "read-back differs from what was set");
    }

    fn rejected(f: &CpuFeatures, base: kvm_sregs, m: impl FnOnce(&mut kvm_sregs)) {
        let (r, _, got) = case(f, base, m);
        assert_eq!(r, Err(Errno::EINVAL));
        assert_eq!(got, base, "a failed set must change nothing");
    }

    #[test]
    fn reset_regs_match_device() {
        let r = reset_regs();
        assert_eq!((r.rip, r.rflags, r.rdx), (0xfff0, 0x2, 0x600));
        let others = [
            r.rax, r.rbx, r.rcx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
            r.r13, r.r14, r.r15,
        ];
        assert!(others.iter().all(|v| *v == 0));
    }

    #[test]
    fn reset_sregs_match_device() {
        let s = reset_sregs();
        assert_eq!(
            (s.cs.base, s.cs.limit, s.cs.selector),
            (0xffff_0000, 0xffff, 0xf000)
        );
        assert_eq!(
            (s.cs.type_, s.cs.present, s.cs.s, s.cs.db, s.cs.g),
            (0xb, 1, 1, 0, 0)
        );
        for d in [s.ds, s.es, s.fs, s.gs, s.ss] {
            assert_eq!(
                (d.base, d.limit, d.selector, d.type_, d.present, d.s),
                (0, 0xffff, 0, 3, 1, 1)
            );
        }
        assert_eq!(
            (s.tr.type_, s.tr.s, s.tr.present, s.tr.limit),
            (0xb, 0, 1, 0xffff)
        );
        assert_eq!(
            (s.ldt.type_, s.ldt.s, s.ldt.present, s.ldt.limit),
            (2, 0, 1, 0xffff)
        );
        assert_eq!(
            (s.gdt.base, s.gdt.limit, s.idt.base, s.idt.limit),
            (0, 0xffff, 0, 0xffff)
        );
        assert_eq!(s.cr0, 0x6000_0010);
        assert_eq!((s.cr2, s.cr3, s.cr4, s.cr8, s.efer), (0, 0, 0, 0, 0));
        assert_eq!(s.apic_base, 0xfee0_0900);
        assert_eq!(reset_sregs_for(false).apic_base, 0xfee0_0800);
        assert_eq!(s.interrupt_bitmap, [0; 4]);
        // The reset state is itself accepted and reads back unchanged.
        ok_same(&F, s, |_| {});
    }

    #[test]
    fn long_mode_and_protected_mode_bases_accepted() {
        ok_same(&F, reset_sregs(), |s| *s = lm64());
        ok_same(&F, reset_sregs(), |s| *s = pm32());
        ok_same(&CpuFeatures::SUPPORTED, reset_sregs(), |s| *s = lm64());
    }

    #[test]
    fn cr0_high_bits_rejected() {
        for bit in 32..64 {
            rejected(&F, lm64(), |s| s.cr0 ^= 1 << bit);
            rejected(&F, reset_sregs(), |s| s.cr0 ^= 1 << bit);
        }
    }

    #[test]
    fn cr0_low_bit_sweep_matches_device() {
        // Probe §2: toggling in lm64 fails for PE (PG without PE), NW (NW without CD), PG (LMA
        // without PG); in reset for CD (NW left alone) and PG (PG without PE).
        for bit in 0..32 {
            let lm_bad = matches!(bit, 0 | 29 | 31);
            let reset_bad = matches!(bit, 30 | 31);
            let (r, new, got) = case(&F, lm64(), |s| s.cr0 ^= 1 << bit);
            assert_eq!(r.is_err(), lm_bad, "lm64 bit {bit}");
            if !lm_bad {
                assert_eq!(got.cr0, new.cr0);
            }
            let (r, new, got) = case(&F, reset_sregs(), |s| s.cr0 ^= 1 << bit);
            assert_eq!(r.is_err(), reset_bad, "reset bit {bit}");
            if !reset_bad {
                assert_eq!(got.cr0, new.cr0);
            }
        }
    }

    #[test]
    fn cr0_cache_bits_and_raw_readback() {
        rejected(&F, reset_sregs(), |s| s.cr0 = CR0_ET | CR0_NW);
        rejected(&F, pm32(), |s| s.cr0 |= CR0_NW & !CR0_CD);
        ok_same(&F, pm32(), |s| s.cr0 |= CR0_CD);
        ok_same(&F, pm32(), |s| s.cr0 |= CR0_CD | CR0_NW);
        // No ET forcing and reserved bits 6-28 kept.
        ok_same(&F, reset_sregs(), |s| s.cr0 = 0);
        ok_same(&F, pm32(), |s| s.cr0 |= 0x1ffa_ffc0);
        ok_same(&F, lm64(), |s| s.cr0 = 0xffff_ffff);
    }

    #[test]
    fn pg_without_pe_rejected() {
        rejected(&F, reset_sregs(), |s| s.cr0 = CR0_PG | CR0_ET);
        rejected(&F, lm64(), |s| s.cr0 &= !CR0_PE);
    }

    #[test]
    fn cr4_sweep_matches_device() {
        // Probe §3/§4: allowed bits 0-11, 16, 18, 20, 21, 22.
        let device_ok = |bit: u32| matches!(bit, 0..=11 | 16 | 18 | 20 | 21 | 22);
        for feats in [F] {
            for bit in 0..64u32 {
                let mut expect_ok = device_ok(bit);
                let (r, new, got) = case(&feats, reset_sregs(), |s| s.cr4 ^= 1 << bit);
                assert_eq!(r.is_ok(), expect_ok, "reset bit {bit}");
                if expect_ok {
                    assert_eq!(got.cr4, new.cr4);
                }
                if bit == 5 {
                    expect_ok = false; // PAE cleared in long mode
                }
                let (r, _, _) = case(&feats, lm64(), |s| s.cr4 ^= 1 << bit);
                assert_eq!(r.is_ok(), expect_ok, "lm64 bit {bit}");
            }
        }
    }

    #[test]
    fn cr4_feature_bits_follow_cpuid() {
        let all = CpuFeatures {
            pku: true,
            la57: true,
            vmx: true,
            pcid: true,
            lam: true,
            cet: true,
            fred: true,
            ..CpuFeatures::SUPPORTED
        };
        for b in [
            CR4_PKE,
            CR4_LA57,
            CR4_VMXE,
            CR4_PCIDE,
            CR4_LAM_SUP,
            CR4_CET,
            CR4_FRED,
        ] {
            ok_same(&all, lm64(), |s| s.cr4 |= b);
            let without = CpuFeatures {
                pku: false,
                la57: false,
                ..CpuFeatures::SUPPORTED
            };
            rejected(&without, lm64(), |s| s.cr4 |= b);
        }
        // PCIDE is not tied to LMA or CR3[11:0] in SET_SREGS.
        ok_same(&all, pm32(), |s| s.cr4 |= CR4_PCIDE);
        ok_same(&all, lm64(), |s| {
            s.cr4 |= CR4_PCIDE;
            s.cr3 = 0x1005;
        });
        for b in [CR4_SMXE, 1 << 15, 1 << 19, 1 << 24, 1 << 63] {
            rejected(&all, lm64(), |s| s.cr4 |= b);
        }
        let none = CpuFeatures {
            smep: false,
            smap: false,
            umip: false,
            fsgsbase: false,
            xsave: false,
            ..F
        };
        for b in [CR4_SMEP, CR4_SMAP, CR4_UMIP, CR4_FSGSBASE, CR4_OSXSAVE] {
            ok_same(&F, lm64(), |s| s.cr4 |= b);
            rejected(&none, lm64(), |s| s.cr4 |= b);
        }
    }

    #[test]
    fn efer_never_validated_except_mode_bits() {
        // Probe §5: every bit toggles fine except LME in lm64 (LMA without LME) and LMA.
        for bit in 0..64 {
            let (r, new, got) = case(&F, lm64(), |s| s.efer ^= 1 << bit);
            assert_eq!(r.is_err(), matches!(bit, 8 | 10), "lm64 bit {bit}");
            if r.is_ok() {
                assert_eq!(got.efer, new.efer);
            }
            let (r, _, _) = case(&F, reset_sregs(), |s| s.efer ^= 1 << bit);
            assert_eq!(r.is_err(), bit == 10, "reset bit {bit}");
        }
        ok_same(&F, lm64(), |s| s.efer |= EFER_SVME | 1 << 20);
        ok_same(&F, lm64(), |s| s.efer = u64::MAX);
        ok_same(&F, pm32(), |s| s.efer = 1 << 63);
    }

    #[test]
    fn long_mode_consistency() {
        rejected(&F, lm64(), |s| s.efer &= !EFER_LMA); // LME+PG without LMA
        rejected(&F, lm64(), |s| s.cr4 &= !CR4_PAE); // LMA without PAE
        rejected(&F, lm64(), |s| s.cr4 = 0);
        rejected(&F, lm64(), |s| s.cr0 &= !CR0_PG); // LMA without PG
        rejected(&F, lm64(), |s| s.efer &= !EFER_LME); // LMA without LME
        rejected(&F, reset_sregs(), |s| s.efer = EFER_LMA);
        rejected(&F, reset_sregs(), |s| s.efer = 0xd01);
        ok_same(&F, reset_sregs(), |s| s.efer = EFER_LME);
        ok_same(&F, pm32(), |s| {
            s.efer = EFER_LME;
            s.cr4 = CR4_PAE;
        });
        ok_same(&F, lm64(), |s| s.efer &= !EFER_NXE);
    }

    #[test]
    fn cs_l_only_in_long_mode() {
        rejected(&F, pm32(), |s| {
            s.cs.l = 1;
            s.cs.db = 0;
        });
        rejected(&F, reset_sregs(), |s| s.cs.l = 1);
        rejected(&F, pm32(), |s| {
            s.cr0 |= CR0_PG;
            s.cs.l = 1;
        });
        rejected(&F, pm32(), |s| {
            s.efer = EFER_LME;
            s.cr4 = CR4_PAE;
            s.cs.l = 1;
        });
        ok_same(&F, lm64(), |s| s.cs.db = 1); // L=1 with DB=1 is not checked
        ok_same(&F, lm64(), |s| {
            s.cs.l = 0;
            s.cs.db = 1;
        });
    }

    #[test]
    fn cr3_checked_only_in_long_mode() {
        // Probe §6 (fresh vCPU: MAXPHYADDR 36) and §7 (after SET_CPUID2: 46 on that host).
        for bit in (0..12).chain(32..64) {
            let (r, ..) = case(&F, lm64(), |s| s.cr3 ^= 1 << bit);
            assert_eq!(r.is_err(), bit >= 36, "lm64 bit {bit}");
            ok_same(&F, pm32(), |s| s.cr3 ^= 1 << bit);
        }
        let m46 = CpuFeatures {
            maxphyaddr: 46,
            ..CpuFeatures::SUPPORTED
        };
        ok_same(&m46, lm64(), |s| s.cr3 = 1 << 45);
        rejected(&m46, lm64(), |s| s.cr3 = 1 << 46);
        rejected(&m46, lm64(), |s| s.cr3 = 1 << 63); // no PCID NOFLUSH masking
        let lam = CpuFeatures { lam: true, ..m46 };
        ok_same(&lam, lm64(), |s| s.cr3 = 0x1000 | CR3_LAM_BITS);
        rejected(&m46, lm64(), |s| s.cr3 = 0x1000 | 1 << 62);
    }

    #[test]
    fn cr3_no_exemption_when_unchanged() {
        // Probe §11: CR3=1<<40 set with MAXPHYADDR 46, CPUID then says 36: re-set fails.
        let m46 = CpuFeatures {
            maxphyaddr: 46,
            ..CpuFeatures::SUPPORTED
        };
        let mut state = lm64();
        let mut new = state;
        new.cr3 = 1 << 40;
        assert_eq!(set_sregs(&m46, &mut state, &new), Ok(()));
        let m36 = CpuFeatures {
            maxphyaddr: 36,
            ..m46
        };
        assert_eq!(
            set_sregs(&m36, &mut state.clone(), &state),
            Err(Errno::EINVAL)
        );
    }

    #[test]
    fn cr2_any_value() {
        for v in [
            0,
            0x1234,
            0xdead_beef,
            0x8000_0000_0000,
            0xffff_8000_0000_0000,
            u64::MAX,
        ] {
            ok_same(&F, reset_sregs(), |s| s.cr2 = v);
            ok_same(&F, lm64(), |s| s.cr2 = v);
        }
    }

    #[test]
    fn cr8_above_15_ignored() {
        for v in 0..16 {
            ok_same(&F, reset_sregs(), |s| s.cr8 = v);
        }
        for v in [0x10, 0x17, 0x1f, 0xff, 1 << 32, 1 << 63] {
            let (r, _, got) = case(&F, reset_sregs(), |s| s.cr8 = v);
            assert_eq!((r, got.cr8), (Ok(()), 0));
        }
        let mut five = reset_sregs();
        five.cr8 = 5;
        for v in [0x10, 0x17, 0xff, 1 << 63] {
            let (r, _, got) = case(&F, five, |s| s.cr8 = v);
            assert_eq!((r, got.cr8), (Ok(()), 5));
        }
        let (_, _, got) = case(&F, five, |s| s.cr8 = 0);
        assert_eq!(got.cr8, 0);
    }

    #[test]
    fn apic_base_rules() {
        for v in [
            0,
            0xfee0_0000,
            0xfee0_0100,
            0xfee0_0800,
            0x1234_5000,
            0x1234_5900,
            0xffff_f000,
        ] {
            ok_same(&F, reset_sregs(), |s| s.apic_base = v);
        }
        ok_same(&F, reset_sregs(), |s| s.apic_base = 0xf_0000_0000);
        for v in [
            0xfee0_0c00u64, // x2APIC, no X2APIC in CPUID
            0xfee0_0d00,
            0xfee0_0400, // EXTD without EN
            0xfee0_0500,
            0xfee0_0001, // bits 0-7
            0xfee0_0080,
            0xfee0_0200, // bit 9
            0xfee0_0a00,
            1 << 36, // at MAXPHYADDR 36
            0xffff_ffff_f000,
            1 << 63,
        ] {
            rejected(&F, reset_sregs(), |s| s.apic_base = v);
        }
        ok_same(&F, reset_sregs(), |s| s.apic_base ^= APIC_BASE_BSP);
        let s = CpuFeatures {
            maxphyaddr: 46,
            ..CpuFeatures::SUPPORTED
        };
        ok_same(&s, reset_sregs(), |r| r.apic_base = 0xfee0_0d00);
        ok_same(&s, reset_sregs(), |r| r.apic_base = 1 << 45);
        rejected(&s, reset_sregs(), |r| r.apic_base = 1 << 46);
        rejected(&s, reset_sregs(), |r| r.apic_base = 0xfee0_0400);
    }

    #[test]
    fn apic_base_unchanged_is_not_rechecked() {
        // Probe §11: x2APIC set while CPUID had X2APIC; after CPUID drops it, re-setting the
        // same value is fine but a different x2APIC value is not.
        let mut state = reset_sregs();
        state.apic_base = 0xfee0_0d00;
        assert_eq!(check_sregs_from(&F, &state, &state), Ok(()));
        assert_eq!(check_sregs(&F, &state), Err(Errno::EINVAL));
        let mut new = state;
        new.apic_base = 0xfee0_0c00;
        assert_eq!(check_sregs_from(&F, &state, &new), Err(Errno::EINVAL));
    }

    #[test]
    fn interrupt_bitmap_keeps_lowest_vector() {
        for (bits, expect) in [
            ([1u64, 0, 0, 0], [1u64, 0, 0, 0]),
            ([1 << 32, 0, 0, 0], [1 << 32, 0, 0, 0]),
            ([0, 0, 0, 1 << 63], [0, 0, 0, 1 << 63]),
            ([1 << 3, 0, 0, 1 << 8], [1 << 3, 0, 0, 0]),
            ([0, 1, 0, 0], [0, 1, 0, 0]),
        ] {
            for base in [reset_sregs(), lm64()] {
                let (r, _, got) = case(&F, base, |s| s.interrupt_bitmap = bits);
                assert_eq!((r, got.interrupt_bitmap), (Ok(()), expect));
            }
        }
        // An all-zero bitmap leaves the pending vector (33) in place.
        let mut state = reset_sregs();
        let mut new = state;
        new.interrupt_bitmap[0] = 1 << 33;
        set_sregs(&F, &mut state, &new).unwrap();
        let mut clear = state;
        clear.interrupt_bitmap = [0; 4];
        set_sregs(&F, &mut state, &clear).unwrap();
        assert_eq!(state.interrupt_bitmap, [1 << 33, 0, 0, 0]);
        assert_eq!(first_pending_vector(&[0, 0, 1 << 4, 0]), Some(132));
        assert_eq!(first_pending_vector(&[0; 4]), None);
    }

    #[test]
    fn segments_stored_raw() {
        ok_same(&F, lm64(), |s| s.cs.present = 0);
        ok_same(&F, lm64(), |s| s.ss.unusable = 1);
        ok_same(&F, lm64(), |s| s.tr.present = 0);
        ok_same(&F, lm64(), |s| s.ldt.unusable = 1);
        for t in 0..16 {
            ok_same(&F, lm64(), |s| s.cs.type_ = t);
        }
        ok_same(&F, lm64(), |s| s.ds.type_ = 0x1f);
        ok_same(&F, lm64(), |s| s.ds.present = 2);
        ok_same(&F, lm64(), |s| s.ds.dpl = 4);
        ok_same(&F, lm64(), |s| s.ds.padding = 0xff);
        ok_same(&F, lm64(), |s| s.ds.unusable = 2);
        ok_same(&F, lm64(), |s| {
            (s.ds.s, s.ds.db, s.ds.l, s.ds.g, s.ds.avl) = (2, 2, 2, 2, 2);
        });
        ok_same(&F, lm64(), |s| s.cs.dpl = 3); // CS.DPL != SS.DPL is not checked
        ok_same(&F, lm64(), |s| s.fs.base = 0x8000_0000_0000); // non-canonical base
        ok_same(&F, reset_sregs(), |s| s.cs.selector = 0x1000); // real-mode base mismatch
    }

    #[test]
    fn dtable_padding_reads_back_zero() {
        let (r, new, got) = case(&F, lm64(), |s| {
            s.gdt.padding = [0x1234, 0xffff, 1];
            s.idt.padding = [0x1234, 0, 1];
            s.gdt.base = 0x8000_0000_0000;
            s.idt.limit = 0xffff;
        });
        assert_eq!(r, Ok(()));
        assert_eq!((got.gdt.padding, got.idt.padding), ([0; 3], [0; 3]));
        assert_eq!((got.gdt.base, got.gdt.limit), (new.gdt.base, new.gdt.limit));
        assert_eq!((got.idt.base, got.idt.limit), (new.idt.base, new.idt.limit));
    }

    #[test]
    fn legacy_paging_kept_unlike_device() {
        // Device: accepted, CR0 read back without PG. Simulator: PG kept.
        for cr4 in [0, CR4_PSE, CR4_PAE] {
            ok_same(&F, pm32(), |s| {
                s.cr0 |= CR0_PG;
                s.cr4 = cr4;
                s.cr3 = 0x2000;
            });
        }
        ok_same(&F, pm32(), |s| {
            s.cr0 |= CR0_PG;
            s.cr4 = CR4_PAE;
            s.efer = EFER_NXE;
            s.cr3 = 0x2000;
        });
        let mut s = pm32();
        s.cr0 |= CR0_PG;
        s.cr4 = CR4_PAE;
        assert!(is_pae_paging(&s) && mmu_reset_needed(&pm32(), &s));
        assert!(!is_pae_paging(&lm64()) && !mmu_reset_needed(&lm64(), &lm64()));
        for name in [
            "legacy 32-bit paging (PG, no PAE, no LME)",
            "PAE paging (PG, PAE, no LME)",
        ] {
            assert!(DEVICE_DIFFERENCES.iter().any(|(n, _)| *n == name));
        }
    }

    #[test]
    fn set_regs_readback() {
        let mut st = reset_regs();
        for (rflags, expect) in [
            (0u64, 0x2u64),
            (0x202, 0x202),
            (u64::MAX, 0xffff_ffff_fffd_ffff),
            (0xa, 0xa),
            (0x8022, 0x8022),
            (0xffc0_0002, 0xffc0_0002),
            (0x1_0000_0002, 0x1_0000_0002),
            (0x2_0002, 0x2),
            (0x24_3002, 0x24_3002),
        ] {
            let new = kvm_regs {
                rflags,
                ..reset_regs()
            };
            assert_eq!(check_regs(&new), Ok(()));
            apply_regs(&mut st, &new);
            assert_eq!(st.rflags, expect, "rflags {rflags:#x}");
        }
        let new = kvm_regs {
            rip: 0x8000_0000_0000,
            rax: 0xdead_beef_1234_5678,
            rsp: 0x1001,
            rflags: 2,
            ..reset_regs()
        };
        apply_regs(&mut st, &new);
        assert_eq!(st, new);
    }

    #[test]
    fn sregs2_flags() {
        let base = sregs2_of(&reset_sregs());
        assert_eq!(check_sregs2_from(&F, &reset_sregs(), &base), Ok(()));
        for flags in [2, 1 << 63] {
            let s2 = kvm_sregs2 { flags, ..base };
            assert_eq!(check_sregs2_flags(&s2), Err(Errno::EINVAL));
        }
        // PDPTRS_VALID outside PAE paging: in reset and in long mode.
        let s2 = kvm_sregs2 { flags: 1, ..base };
        assert_eq!(check_sregs2_flags(&s2), Err(Errno::EINVAL));
        let s2 = kvm_sregs2 {
            flags: 1,
            ..sregs2_of(&lm64())
        };
        assert_eq!(check_sregs2_flags(&s2), Err(Errno::EINVAL));
        let mut pae = pm32();
        pae.cr0 |= CR0_PG;
        pae.cr4 = CR4_PAE;
        let s2 = kvm_sregs2 {
            flags: 1,
            pdptrs: [0x3001, 0x4001, 0, 0],
            ..sregs2_of(&pae)
        };
        assert_eq!(check_sregs2_from(&F, &pm32(), &s2), Ok(()));
        // SET_SREGS2 leaves a pending interrupt alone and masks CR8 like SET_SREGS.
        let mut state = reset_sregs();
        state.interrupt_bitmap[1] = 1;
        let mut s2 = sregs2_of(&state);
        s2.cr8 = 0x17;
        apply_sregs(&F, &mut state, &sregs_from_sregs2(&s2));
        assert_eq!((state.interrupt_bitmap, state.cr8), ([0, 1, 0, 0], 0));
    }

    fn sregs2_of(s: &kvm_sregs) -> kvm_sregs2 {
        kvm_sregs2 {
            cs: s.cs,
            ds: s.ds,
            es: s.es,
            fs: s.fs,
            gs: s.gs,
            ss: s.ss,
            tr: s.tr,
            ldt: s.ldt,
            gdt: s.gdt,
            idt: s.idt,
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.apic_base,
            flags: 0,
            pdptrs: [0; 4],
        }
    }

    #[test]
    fn features_from_cpuid() {
        let e = |function, index, eax, ebx, ecx, edx| kvm_cpuid_entry2 {
            function,
            index,
            flags: if function == 7 {
                crate::cpuid::KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        };
        // An empty table: MAXPHYADDR 36 and no feature.
        let none = CpuFeatures::from_cpuid(&[], &CpuFeatures::SUPPORTED);
        assert_eq!(none.maxphyaddr, 36);
        assert!(!none.smep && !none.x2apic && !none.lm);
        // The device's table after KVM_SET_CPUID2 (probe host).
        let table = [
            e(1, 0, 0xa0671, 0x0102_0800, 0xf7f8_3203, 0x1f8b_fbff),
            e(7, 0, 2, 0xf1bf_23eb, 0x1a00_5f46, 0xbc81_4410),
            e(0x8000_0000, 0, 0x8000_0008, 0, 0, 0),
            e(0x8000_0001, 0, 0, 0, 0x101, 0x2010_0800),
            e(0x8000_0008, 0, 0x392e, 0, 0, 0),
        ];
        let f = CpuFeatures::from_cpuid(&table, &CpuFeatures::SUPPORTED);
        // The device's table has neither PDPE1GB nor LA57.
        let expect = CpuFeatures {
            maxphyaddr: 46,
            pdpe1gb: false,
            la57: false,
            ..CpuFeatures::SUPPORTED
        };
        assert_eq!(f, expect);
        // KVM caps limit the guest: PKU in CPUID but not supported stays off.
        let mut t = table;
        t[1].ecx |= 1 << 3;
        assert!(!CpuFeatures::from_cpuid(&t, &CpuFeatures::SUPPORTED).pku);
        assert_eq!(CpuFeatures::default(), CpuFeatures::FRESH_VCPU);
    }

    #[test]
    fn reserved_masks() {
        assert_eq!(reserved_gpa_bits(&F), !((1u64 << 36) - 1));
        let m64 = CpuFeatures {
            maxphyaddr: 64,
            ..F
        };
        assert_eq!(reserved_gpa_bits(&m64), 0);
        assert_eq!(cr4_reserved_bits(&F) & 0x35_0fff, 0); // bits 0-11, 16, 18, 20, 21
        assert_eq!(cr4_reserved_bits(&F) & CR4_PKE, 0);
        assert_ne!(cr4_reserved_bits(&CpuFeatures::SUPPORTED) & CR4_PKE, 0);
        assert_eq!(apic_base_reserved_bits(&F) & APIC_BASE_EXTD, APIC_BASE_EXTD);
    }
}
