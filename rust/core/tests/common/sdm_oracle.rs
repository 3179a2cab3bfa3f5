//! An independent, deliberately plain model of x86 linear-address translation,
//! written from the Intel SDM Vol. 3A chapter 4 ("Paging") plus the handful of
//! choices KVM documents for its software walker (paging_tmpl.h). It shares no
//! code or types with `kvmmmu_core::paging`: the tests convert between the two.
//!
//! Every rule cites the SDM section it comes from. Where KVM deliberately
//! differs from silicon, the comment says "KVM:" and why.
//!
//! The model does, in order (SDM 4.5 "walk", 4.6 "access rights", 4.7
//! "page-fault exceptions", 4.8 "accessed and dirty flags"):
//! 1. pick the paging mode from CR0.PG, CR4.PAE, EFER.LMA, CR4.LA57 (4.1.1);
//! 2. (IA-32e only) refuse a non-canonical address with #GP(0) (3.3.7.1);
//! 3. walk top-down: each entry must be present, then free of reserved bits;
//! 4. combine W, U and !XD over all levels, check them against the access;
//! 5. only when everything passed, set A on every entry top-down and D on the
//!    leaf for a write (KVM never writes A/D for a faulting access).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

// ---- Control-register and EFER bits (SDM Vol. 3A 2.5, 2.2.1) -------------
pub const CR0_WP: u64 = 1 << 16;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PSE: u64 = 1 << 4;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_LA57: u64 = 1 << 12;
pub const CR4_SMEP: u64 = 1 << 20;
pub const CR4_SMAP: u64 = 1 << 21;
pub const CR4_PKE: u64 = 1 << 22;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const EFER_NXE: u64 = 1 << 11;

// ---- Paging-structure entry bits (SDM tables 4-4..4-6, 4-8..4-11, 4-14..4-20)
pub const PTE_P: u64 = 1 << 0;
pub const PTE_W: u64 = 1 << 1;
pub const PTE_U: u64 = 1 << 2;
pub const PTE_A: u64 = 1 << 5;
pub const PTE_D: u64 = 1 << 6;
pub const PTE_PS: u64 = 1 << 7;
pub const PTE_XD: u64 = 1 << 63;
/// Address bits of an 8-byte entry as KVM masks them (51:12). Bits between
/// MAXPHYADDR and 51 are reserved and fault before they could be used.
pub const ADDR_MASK_8: u64 = 0x000f_ffff_ffff_f000;

// ---- Page-fault error code (SDM 4.7, figure 4-12) -------------------------
pub const PF_P: u32 = 1 << 0;
pub const PF_W: u32 = 1 << 1;
pub const PF_U: u32 = 1 << 2;
pub const PF_RSVD: u32 = 1 << 3;
pub const PF_ID: u32 = 1 << 4;
pub const PF_PK: u32 = 1 << 5;

pub const VEC_GP: u8 = 13;
pub const VEC_PF: u8 = 14;

// ---- KVM's ACC_* encoding of the effective rights (kvm-mmu-semantics 1.6) ---
pub const ACC_EXEC: u8 = 1;
pub const ACC_WRITE: u8 = 2;
pub const ACC_USER: u8 = 4;

/// Bits `lo..=hi` set.
pub const fn bits(lo: u32, hi: u32) -> u64 {
    let top = if hi >= 63 {
        u64::MAX
    } else {
        (1u64 << (hi + 1)) - 1
    };
    top & !((1u64 << lo) - 1)
}

/// The CPU state the walk depends on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OracleCpu {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    /// The PAE PDPTE registers (SDM 4.4.1), as loaded by MOV to CR3/CR0/CR4.
    pub pdptrs: [u64; 4],
    /// CPUID.80000008H:EAX[7:0].
    pub maxphyaddr: u8,
    /// CPUID.80000001H:EDX.Page1GB[26].
    pub gbpages: bool,
    pub pkru: u32,
    pub rflags_ac: bool,
}

/// What kind of access is being made (SDM 4.6: "supervisor-mode" vs
/// "user-mode", "explicit" vs "implicit"; data read/write vs instruction fetch).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OracleAccess {
    pub write: bool,
    /// A user-mode access: CPL = 3 and not implicit.
    pub user: bool,
    pub fetch: bool,
    /// An implicit supervisor-mode access (to a GDT/IDT/TSS...).
    pub implicit: bool,
}

/// The expected result of one access.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OracleOutcome {
    Ok {
        gpa: u64,
        /// Level of the leaf: 1 = 4 KiB, 2 = 2/4 MiB, 3 = 1 GiB (0: paging off).
        level: u8,
        page_size: u64,
        /// Effective ACC bits (EXEC=1, WRITE=2, USER=4), W as the tables grant it.
        access: u8,
        /// (level, gpa, value read) top-down; a PAE PDPTE is level 3.
        gptes: Vec<(u8, u64, u64)>,
    },
    Fault {
        vector: u8,
        error_code: u32,
        /// CR2 for a #PF; 0 for #GP.
        address: u64,
    },
}

/// The expected outcome plus the expected guest memory after the access.
#[derive(Clone, Debug)]
pub struct OracleResult {
    pub outcome: OracleOutcome,
    pub mem_after: OracleMem,
    /// Every successful A/D write, in order: (gpa of the entry, new value).
    pub ad_writes: Vec<(u64, u64)>,
    /// Table pages that were written (dirty-logged).
    pub dirty_gfns: BTreeSet<u64>,
}

/// Sparse guest-physical memory: which gfns are backed (a memslot exists),
/// which of those are read-only, and the non-zero 8-byte words.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OracleMem {
    pub backed: BTreeSet<u64>,
    pub read_only: BTreeSet<u64>,
    /// 8-byte-aligned gpa -> little-endian value. Zero words are not stored.
    pub words: BTreeMap<u64, u64>,
}

impl OracleMem {
    pub fn is_backed(&self, gpa: u64) -> bool {
        self.backed.contains(&(gpa >> 12))
    }
    pub fn is_writable(&self, gpa: u64) -> bool {
        self.is_backed(gpa) && !self.read_only.contains(&(gpa >> 12))
    }
    /// Back `gfn` with (zeroed) memory.
    pub fn add_page(&mut self, gfn: u64) {
        self.backed.insert(gfn);
    }
    /// Read `size` (4 or 8) bytes at a naturally aligned `gpa`; None if unbacked.
    pub fn read(&self, gpa: u64, size: usize) -> Option<u64> {
        assert!(size == 4 || size == 8, "entry size {size}");
        assert_eq!(gpa % size as u64, 0, "misaligned entry read at {gpa:#x}");
        if !self.is_backed(gpa) {
            return None;
        }
        let word = self.words.get(&(gpa & !7)).copied().unwrap_or(0);
        Some(if size == 8 {
            word
        } else {
            (word >> ((gpa & 4) * 8)) & 0xffff_ffff
        })
    }
    /// Write regardless of read-only (used to build the tables).
    pub fn write(&mut self, gpa: u64, size: usize, value: u64) {
        assert!(size == 4 || size == 8);
        assert_eq!(gpa % size as u64, 0);
        let key = gpa & !7;
        let old = self.words.get(&key).copied().unwrap_or(0);
        let new = if size == 8 {
            value
        } else {
            let shift = (gpa & 4) * 8;
            (old & !(0xffff_ffffu64 << shift)) | ((value & 0xffff_ffff) << shift)
        };
        if new == 0 {
            self.words.remove(&key);
        } else {
            self.words.insert(key, new);
        }
    }
    pub fn write64(&mut self, gpa: u64, value: u64) {
        self.write(gpa, 8, value)
    }
    pub fn write32(&mut self, gpa: u64, value: u32) {
        self.write(gpa, 4, value as u64)
    }
    pub fn read64(&self, gpa: u64) -> u64 {
        self.read(gpa, 8).expect("unbacked")
    }
    pub fn read32(&self, gpa: u64) -> u32 {
        self.read(gpa, 4).expect("unbacked") as u32
    }
}

/// SDM 4.1.1, table 4-1 (and KVM's role derivation, kvm-mmu-semantics 1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagingMode {
    None,
    Bits32,
    Pae,
    Level4,
    Level5,
}

pub fn paging_mode(cpu: &OracleCpu) -> PagingMode {
    if cpu.cr0 & CR0_PG == 0 {
        PagingMode::None
    } else if cpu.cr4 & CR4_PAE == 0 {
        PagingMode::Bits32
    } else if cpu.efer & EFER_LMA == 0 {
        // CR4.LA57 has no effect outside IA-32e mode.
        PagingMode::Pae
    } else if cpu.cr4 & CR4_LA57 == 0 {
        PagingMode::Level4
    } else {
        PagingMode::Level5
    }
}

/// The effective rights of a translation (SDM 4.6: "user-mode address" iff
/// U/S=1 in every entry; "writable" iff R/W=1 in every entry; executable iff
/// XD=0 in every entry).
#[derive(Clone, Copy, Debug)]
struct Rights {
    write: bool,
    user: bool,
    exec: bool,
}

impl Rights {
    const ALL: Rights = Rights {
        write: true,
        user: true,
        exec: true,
    };
    /// AND in one entry. 4-byte entries have no XD bit (bit 63 is 0 there).
    fn and(self, entry: u64) -> Rights {
        Rights {
            write: self.write && entry & PTE_W != 0,
            user: self.user && entry & PTE_U != 0,
            exec: self.exec && entry & PTE_XD == 0,
        }
    }
    fn acc(self) -> u8 {
        (if self.exec { ACC_EXEC } else { 0 })
            | (if self.write { ACC_WRITE } else { 0 })
            | (if self.user { ACC_USER } else { 0 })
    }
}

/// One entry the walk used.
#[derive(Clone, Copy, Debug)]
struct Used {
    level: u8,
    gpa: u64,
    value: u64,
    /// 4 or 8
    size: usize,
    /// false for a PAE PDPTE (it lives in a register, SDM 4.4.1).
    in_memory: bool,
}

/// A translation before the access-rights check.
struct Translation {
    gpa: u64,
    level: u8,
    page_size: u64,
    rights: Rights,
    /// Protection key of the leaf (bits 62:59; SDM 4.6.2). 0 outside IA-32e.
    pkey: u32,
    used: Vec<Used>,
}

/// A walk that stopped: the P/RSVD part of the error code (SDM 4.7).
/// Not present (or no memory behind the entry: KVM treats an unreadable gpte
/// like a not-present one) -> 0; reserved bit -> P|RSVD.
type Stop = u32;
const NOT_PRESENT: Stop = 0;
const RESERVED: Stop = PF_P | PF_RSVD;

fn nxe(cpu: &OracleCpu) -> bool {
    cpu.efer & EFER_NXE != 0
}

/// Bits MAXPHYADDR..=hi: physical-address bits the CPU does not have.
fn above_maxphy(cpu: &OracleCpu, hi: u32) -> u64 {
    let m = cpu.maxphyaddr as u32;
    if m > hi {
        0
    } else {
        bits(m, hi)
    }
}

// ===========================================================================
// 32-bit paging (SDM 4.3, tables 4-4 to 4-6)
// ===========================================================================
fn walk_32bit(cpu: &OracleCpu, mem: &OracleMem, gva: u64) -> Result<Translation, Stop> {
    // 32-bit paging translates 32-bit linear addresses.
    let la = gva & 0xffff_ffff;
    let mut used = Vec::new();

    // SDM 4.3: "A PDE is selected using the physical address defined as
    // follows: bits 39:32 are all 0; bits 31:12 are from CR3; bits 11:2 are
    // bits 31:22 of the linear address; bits 1:0 are 0."
    let pde_gpa = (cpu.cr3 & 0xffff_f000) | (((la >> 22) & 0x3ff) << 2);
    let pde = mem.read(pde_gpa, 4).ok_or(NOT_PRESENT)?;
    // SDM 4.3: "If the PDE's P flag (bit 0) is 0 ... the translation does not
    // use any other paging-structure entry" -> #PF.
    if pde & PTE_P == 0 {
        return Err(NOT_PRESENT);
    }
    used.push(Used {
        level: 2,
        gpa: pde_gpa,
        value: pde,
        size: 4,
        in_memory: true,
    });

    // SDM 4.3: "If the PDE's PS flag is 1 and CR4.PSE = 1, the PDE maps a
    // 4-MByte page"; with CR4.PSE = 0 bit 7 is ignored and the PDE
    // references a page table.
    if cpu.cr4 & CR4_PSE != 0 && pde & PTE_PS != 0 {
        // Table 4-4: bits 21:(M-19) reserved, bits (M-20):13 are physical
        // address bits (M-1):32. KVM: always behaves as PSE-36 with M = 36
        // (is_cpuid_PSE36() is 1): reserved = 21:17, PA[35:32] = PDE[16:13].
        if pde & bits(17, 21) != 0 {
            return Err(RESERVED);
        }
        let frame = (pde & 0xffc0_0000) | (((pde >> 13) & 0xf) << 32);
        return Ok(Translation {
            gpa: frame | (la & 0x3f_ffff),
            level: 2,
            page_size: 4 << 20,
            rights: Rights::ALL.and(pde),
            pkey: 0,
            used,
        });
    }

    // Table 4-5: a PDE that references a page table has no reserved bits.
    // SDM 4.3: "A PTE is selected using ... bits 31:12 from the PDE; bits
    // 11:2 are bits 21:12 of the linear address".
    let pte_gpa = (pde & 0xffff_f000) | (((la >> 12) & 0x3ff) << 2);
    let pte = mem.read(pte_gpa, 4).ok_or(NOT_PRESENT)?;
    if pte & PTE_P == 0 {
        return Err(NOT_PRESENT);
    }
    // Table 4-6: a 32-bit PTE has no reserved bits (bit 7 is PAT).
    used.push(Used {
        level: 1,
        gpa: pte_gpa,
        value: pte,
        size: 4,
        in_memory: true,
    });
    Ok(Translation {
        gpa: (pte & 0xffff_f000) | (la & 0xfff),
        level: 1,
        page_size: 4096,
        rights: Rights::ALL.and(pde).and(pte),
        pkey: 0,
        used,
    })
}

// ===========================================================================
// PAE paging (SDM 4.4, tables 4-7 to 4-11)
// ===========================================================================

/// SDM tables 4-8..4-11: in PAE paging entries, bits 62:MAXPHYADDR are
/// reserved, and bit 63 (XD) is reserved when IA32_EFER.NXE = 0.
fn pae_reserved(cpu: &OracleCpu) -> u64 {
    above_maxphy(cpu, 62) | if nxe(cpu) { 0 } else { PTE_XD }
}

fn walk_pae(cpu: &OracleCpu, mem: &OracleMem, gva: u64) -> Result<Translation, Stop> {
    let la = gva & 0xffff_ffff;
    let mut used = Vec::new();

    // SDM 4.4.1: the translation uses PDPTE register i, i = bits 31:30 of the
    // linear address. The registers were loaded (and their reserved bits
    // checked, #GP on MOV) by MOV to CR0/CR3/CR4 -- not re-read or checked here.
    let i = ((la >> 30) & 3) as usize;
    let pdpte = cpu.pdptrs[i];
    // SDM 4.4.1: "If the P flag of PDPTEi is 0, the processor ignores bits
    // 63:1, and there is no page directory" -> #PF (not present).
    if pdpte & PTE_P == 0 {
        return Err(NOT_PRESENT);
    }
    // Reported as level 3 at its memory home: CR3[31:5] + 8*i (SDM 4.4.1:
    // "CR3 ... bits 31:5 locate the page-directory-pointer table").
    used.push(Used {
        level: 3,
        gpa: (cpu.cr3 & 0xffff_ffe0) + 8 * i as u64,
        value: pdpte,
        size: 8,
        in_memory: false,
    });
    // The PDPTE carries no access rights (its bits 1, 2 and 63 are reserved,
    // table 4-8), so it does not enter the W/U/XD combination.

    // SDM 4.4.2: PDE at bits 51:12 from PDPTEi, bits 11:3 = linear 29:21.
    let pde_gpa = (pdpte & ADDR_MASK_8) | (((la >> 21) & 0x1ff) << 3);
    let pde = mem.read(pde_gpa, 8).ok_or(NOT_PRESENT)?;
    if pde & PTE_P == 0 {
        return Err(NOT_PRESENT);
    }
    let mut rsvd = pae_reserved(cpu);
    if pde & PTE_PS != 0 {
        // Table 4-9: a 2-MByte PDE reserves bits 20:13.
        rsvd |= bits(13, 20);
    }
    if pde & rsvd != 0 {
        return Err(RESERVED);
    }
    used.push(Used {
        level: 2,
        gpa: pde_gpa,
        value: pde,
        size: 8,
        in_memory: true,
    });
    if pde & PTE_PS != 0 {
        // Table 4-9: bits (M-1):21 are the 2-MByte frame.
        return Ok(Translation {
            gpa: (pde & ADDR_MASK_8 & !bits(0, 20)) | (la & bits(0, 20)),
            level: 2,
            page_size: 2 << 20,
            rights: Rights::ALL.and(pde),
            pkey: 0,
            used,
        });
    }

    // Table 4-10: PDE references a page table (bits (M-1):12).
    let pte_gpa = (pde & ADDR_MASK_8) | (((la >> 12) & 0x1ff) << 3);
    let pte = mem.read(pte_gpa, 8).ok_or(NOT_PRESENT)?;
    if pte & PTE_P == 0 {
        return Err(NOT_PRESENT);
    }
    // Table 4-11: PTE reserved bits are the common ones (bit 7 is PAT).
    if pte & pae_reserved(cpu) != 0 {
        return Err(RESERVED);
    }
    used.push(Used {
        level: 1,
        gpa: pte_gpa,
        value: pte,
        size: 8,
        in_memory: true,
    });
    Ok(Translation {
        gpa: (pte & ADDR_MASK_8) | (la & 0xfff),
        level: 1,
        page_size: 4096,
        rights: Rights::ALL.and(pde).and(pte),
        pkey: 0,
        used,
    })
}

// ===========================================================================
// 4-level and 5-level paging (SDM 4.5, tables 4-12 to 4-20)
// ===========================================================================

/// SDM 4.5 tables: in 4/5-level entries bits 51:MAXPHYADDR are reserved;
/// bits 62:52 are ignored (62:59 are the protection key, SDM 4.6.2); bit 63
/// (XD) is reserved when IA32_EFER.NXE = 0.
fn ia32e_reserved_common(cpu: &OracleCpu) -> u64 {
    above_maxphy(cpu, 51) | if nxe(cpu) { 0 } else { PTE_XD }
}

fn ia32e_reserved(cpu: &OracleCpu, level: u8, entry: u64) -> u64 {
    let common = ia32e_reserved_common(cpu);
    let ps = entry & PTE_PS != 0;
    match level {
        // Tables 4-14 (PML5E) and 4-15 (PML4E): bit 7 (PS) "Reserved (must be 0)".
        5 | 4 => common | PTE_PS,
        3 if ps => {
            if cpu.gbpages {
                // Table 4-16: a 1-GByte PDPTE reserves bits 29:13.
                common | bits(13, 29)
            } else {
                // SDM 4.1.4: without 1-GByte page support PDPTE.PS is reserved.
                common | PTE_PS
            }
        }
        // Table 4-18: a 2-MByte PDE reserves bits 20:13.
        2 if ps => common | bits(13, 20),
        // Tables 4-17, 4-19, 4-20: only the common bits (PTE bit 7 is PAT).
        _ => common,
    }
}

/// SDM 3.3.7.1 / 4.5.1: a linear address is canonical when bits 63:N-1 are
/// all equal, N = 48 (4-level) or 57 (5-level).
pub fn is_canonical(gva: u64, la_bits: u32) -> bool {
    let shift = 64 - la_bits;
    (((gva << shift) as i64) >> shift) as u64 == gva
}

fn walk_ia32e(cpu: &OracleCpu, mem: &OracleMem, gva: u64, levels: u8) -> Result<Translation, Stop> {
    let mut used = Vec::new();
    let mut rights = Rights::ALL;
    // SDM 4.5.2/4.5.3: CR3 bits (M-1):12 locate the top-level table.
    let mut table = cpu.cr3 & ADDR_MASK_8;
    for level in (1..=levels).rev() {
        // SDM 4.5: each level indexes 9 bits of the linear address:
        // PML5 56:48, PML4 47:39, PDPT 38:30, PD 29:21, PT 20:12.
        let shift = 12 + 9 * (level as u32 - 1);
        let gpa = table | (((gva >> shift) & 0x1ff) << 3);
        let entry = mem.read(gpa, 8).ok_or(NOT_PRESENT)?;
        // SDM 4.5.4: P = 0 -> the walk stops, #PF (not present).
        if entry & PTE_P == 0 {
            return Err(NOT_PRESENT);
        }
        // SDM 4.7: "RSVD ... reserved bit set to 1 in some paging-structure entry".
        if entry & ia32e_reserved(cpu, level, entry) != 0 {
            return Err(RESERVED);
        }
        used.push(Used {
            level,
            gpa,
            value: entry,
            size: 8,
            in_memory: true,
        });
        rights = rights.and(entry);
        // A PDPTE with PS=1 maps a 1-GByte page (reaching here means
        // 1-GByte pages are supported), a PDE with PS=1 a 2-MByte page, a
        // PTE always a 4-KByte page.
        let leaf = level == 1 || ((level == 2 || level == 3) && entry & PTE_PS != 0);
        if leaf {
            let offset_bits = shift; // 12, 21 or 30
            let frame = entry & ADDR_MASK_8 & !bits(0, offset_bits - 1);
            return Ok(Translation {
                gpa: frame | (gva & bits(0, offset_bits - 1)),
                level,
                page_size: 1 << offset_bits,
                rights,
                // SDM 4.6.2: the protection key is bits 62:59 of the entry that
                // maps the page; keys of non-leaf entries are ignored.
                pkey: ((entry >> 59) & 0xf) as u32,
                used,
            });
        }
        table = entry & ADDR_MASK_8;
    }
    unreachable!("level 1 is always a leaf")
}

// ===========================================================================
// Access rights (SDM 4.6) and protection keys (SDM 4.6.2)
// ===========================================================================

/// Returns (fault, pk): whether the access violates the rights, and whether
/// the protection-key check alone would refuse it (PFEC.PK).
fn check_rights(
    cpu: &OracleCpu,
    acc: OracleAccess,
    r: Rights,
    pkey: u32,
    long_mode: bool,
) -> (bool, bool) {
    let wp = cpu.cr0 & CR0_WP != 0;
    let smep = cpu.cr4 & CR4_SMEP != 0;
    let smap = cpu.cr4 & CR4_SMAP != 0;
    let supervisor = !acc.user; // implicit accesses are supervisor-mode accesses
    let mut fault = false;

    if acc.fetch {
        // SDM 4.6.1, instruction fetches.
        if supervisor {
            // "If CR4.SMEP = 1, instructions may be fetched from any
            // supervisor-mode address with a translation for which the
            // instruction fetch is permitted; may not be fetched from any
            // user-mode address." (independent of CR0.WP)
            if smep && r.user {
                fault = true;
            }
        } else if !r.user {
            // User-mode fetches only from user-mode addresses.
            fault = true;
        }
        // "If IA32_EFER.NXE = 1, ... instructions may be fetched only from
        // addresses with XD = 0 in every paging-structure entry."
        if nxe(cpu) && !r.exec {
            fault = true;
        }
    } else if acc.user {
        // SDM 4.6.1, user-mode data accesses: only to user-mode addresses;
        // writes need R/W = 1 everywhere (CR0.WP does not matter for CPL 3).
        if !r.user || (acc.write && !r.write) {
            fault = true;
        }
    } else {
        // SDM 4.6.1, supervisor-mode data accesses.
        // SMAP: to a user-mode address, an implicit access always faults; an
        // explicit one faults unless EFLAGS.AC = 1.
        if r.user && smap && (acc.implicit || !cpu.rflags_ac) {
            fault = true;
        }
        // Writes: "If CR0.WP = 0, data may be written to any
        // (supervisor/permitted user) address; if CR0.WP = 1, only to
        // addresses with R/W = 1 in every entry."
        if acc.write && wp && !r.write {
            fault = true;
        }
    }

    // SDM 4.6.2: protection keys apply with CR4.PKE = 1 in 4/5-level paging,
    // to data accesses to user-mode addresses only.
    // KVM: cr4_pke is part of the role only when EFER.LMA = 1.
    let mut pk = false;
    if cpu.cr4 & CR4_PKE != 0 && long_mode && !acc.fetch && r.user {
        let ad = (cpu.pkru >> (2 * pkey)) & 1 != 0;
        let wd = (cpu.pkru >> (2 * pkey + 1)) & 1 != 0;
        // AD: no data access at all. WD: no user-mode writes; supervisor-mode
        // writes only refused when CR0.WP = 1.
        if ad || (wd && acc.write && (acc.user || wp)) {
            pk = true;
        }
    }
    (fault || pk, pk)
}

/// SDM 4.7 error-code assembly for everything but the P/RSVD/PK part.
fn access_bits(cpu: &OracleCpu, acc: OracleAccess) -> u32 {
    let mut ec = 0;
    if acc.write {
        ec |= PF_W;
    }
    if acc.user {
        ec |= PF_U;
    }
    // SDM 4.7: I/D is set for a fetch when CR4.SMEP = 1, or when PAE/4-level
    // paging is in use and IA32_EFER.NXE = 1.
    // KVM: tests only (EFER.NXE || CR4.SMEP) -- also under 32-bit paging
    // (paging_tmpl.h error path; cpu_role.base.efer_nx ignores CR4.PAE).
    if acc.fetch && (nxe(cpu) || cpu.cr4 & CR4_SMEP != 0) {
        ec |= PF_ID;
    }
    ec
}

fn page_fault(error_code: u32, gva: u64) -> OracleOutcome {
    OracleOutcome::Fault {
        vector: VEC_PF,
        error_code,
        address: gva,
    }
}

// ===========================================================================
// The oracle
// ===========================================================================

/// What the access `acc` to `gva` does: the outcome, and guest memory after it.
pub fn oracle_walk(cpu: &OracleCpu, mem: &OracleMem, gva: u64, acc: OracleAccess) -> OracleResult {
    let mut after = mem.clone();
    let mut ad_writes = Vec::new();
    let mut dirty_gfns = BTreeSet::new();

    let mode = paging_mode(cpu);
    let walked = match mode {
        // KVM's nonpaging walker: gpa = gva, no checks, no entries.
        PagingMode::None => {
            return OracleResult {
                outcome: OracleOutcome::Ok {
                    gpa: gva,
                    level: 0,
                    page_size: 4096,
                    access: ACC_EXEC | ACC_WRITE | ACC_USER,
                    gptes: Vec::new(),
                },
                mem_after: after,
                ad_writes,
                dirty_gfns,
            };
        }
        PagingMode::Bits32 => walk_32bit(cpu, mem, gva),
        PagingMode::Pae => walk_pae(cpu, mem, gva),
        PagingMode::Level4 | PagingMode::Level5 => {
            let la_bits = if mode == PagingMode::Level5 { 57 } else { 48 };
            // SDM 6.15 / 3.3.7.1: a memory reference to a non-canonical
            // address in 64-bit mode raises #GP(0), before any paging.
            if !is_canonical(gva, la_bits) {
                return OracleResult {
                    outcome: OracleOutcome::Fault {
                        vector: VEC_GP,
                        error_code: 0,
                        address: 0,
                    },
                    mem_after: after,
                    ad_writes,
                    dirty_gfns,
                };
            }
            let levels = if mode == PagingMode::Level5 { 5 } else { 4 };
            walk_ia32e(cpu, mem, gva, levels)
        }
    };

    let t = match walked {
        Ok(t) => t,
        Err(stop) => {
            return OracleResult {
                outcome: page_fault(stop | access_bits(cpu, acc), gva),
                mem_after: after,
                ad_writes,
                dirty_gfns,
            }
        }
    };

    let long_mode = matches!(mode, PagingMode::Level4 | PagingMode::Level5);
    let (fault, pk) = check_rights(cpu, acc, t.rights, t.pkey, long_mode);
    if fault {
        // SDM 4.7: P = 1 (a protection violation), PK if the key refused it.
        let ec = PF_P | if pk { PF_PK } else { 0 } | access_bits(cpu, acc);
        return OracleResult {
            outcome: page_fault(ec, gva),
            mem_after: after,
            ad_writes,
            dirty_gfns,
        };
    }

    // SDM 4.8: the processor sets A in every paging-structure entry used and
    // D in the entry that maps the page on a write. KVM: only after the
    // access passed every check, top-down, never in a PAE PDPTE (a register),
    // silently skipped for a table in a read-only memslot; each write is
    // dirty-logged. We OR into the live value, which is what KVM's
    // cmpxchg-and-retry converges to when entries alias each other.
    let leaf_level = t.level;
    for u in t.used.iter().filter(|u| u.in_memory) {
        if !after.is_writable(u.gpa) {
            continue;
        }
        let old = after.read(u.gpa, u.size).expect("read during the walk");
        let mut new = old | PTE_A;
        if u.level == leaf_level && acc.write {
            new |= PTE_D;
        }
        if new != old {
            after.write(u.gpa, u.size, new);
            ad_writes.push((u.gpa, new));
            dirty_gfns.insert(u.gpa >> 12);
        }
    }

    OracleResult {
        outcome: OracleOutcome::Ok {
            gpa: t.gpa,
            level: t.level,
            page_size: t.page_size,
            access: t.rights.acc(),
            gptes: t.used.iter().map(|u| (u.level, u.gpa, u.value)).collect(),
        },
        mem_after: after,
        ad_writes,
        dirty_gfns,
    }
}
