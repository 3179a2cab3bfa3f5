//! The guest's own translation: paging modes, guest PTE formats and the walker
//! (KVM's paging_tmpl.h, one generic walker instantiated per gpte format).
//!
//! The walker reads guest page tables through [`GuestMem`] (guest-physical
//! memory behind the memslots), checks present, reserved and permission bits
//! exactly as KVM does, and on success sets the accessed/dirty bits top-down
//! with compare-exchange, as KVM does.

pub mod permission;
pub mod pte;
pub mod rsvd;
pub mod walker;

pub use walker::GuestMmu;

use crate::vcpu::sregs::{
    CR0_PG, CR0_WP, CR4_LA57, CR4_PAE, CR4_PKE, CR4_PSE, CR4_SMAP, CR4_SMEP, EFER_LMA, EFER_NXE,
};

/// Page-fault error code bits ([host.h] PFERR_*).
pub const PFERR_PRESENT: u32 = 1 << 0;
pub const PFERR_WRITE: u32 = 1 << 1;
pub const PFERR_USER: u32 = 1 << 2;
pub const PFERR_RSVD: u32 = 1 << 3;
pub const PFERR_FETCH: u32 = 1 << 4;
pub const PFERR_PK: u32 = 1 << 5;

/// ACC_* access bits: what a translation allows.
pub const ACC_EXEC: u8 = 1;
pub const ACC_WRITE: u8 = 2;
pub const ACC_USER: u8 = 4;
pub const ACC_ALL: u8 = ACC_EXEC | ACC_WRITE | ACC_USER;

pub const PF_VECTOR: u8 = 14;
pub const GP_VECTOR: u8 = 13;

/// The CPU state a walk depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalkCtx {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    /// PAE paging: the PDPTE registers loaded at the architectural points.
    pub pdptrs: [u64; 4],
    /// Guest MAXPHYADDR (CPUID 0x80000008.EAX[7:0]).
    pub maxphyaddr: u8,
    /// Guest CPUID PDPE1GB: 1 GiB pages allowed.
    pub gbpages: bool,
    pub pkru: u32,
    /// EFLAGS.AC, which lets explicit supervisor accesses through SMAP.
    pub rflags_ac: bool,
}

impl Default for WalkCtx {
    fn default() -> Self {
        WalkCtx {
            cr0: 0,
            cr3: 0,
            cr4: 0,
            efer: 0,
            pdptrs: [0; 4],
            maxphyaddr: 48,
            gbpages: false,
            pkru: 0,
            rflags_ac: false,
        }
    }
}

/// The guest paging mode (cpu_role.base.level).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PagingMode {
    /// CR0.PG=0: gva == gpa.
    None,
    /// 2-level, 4-byte gptes.
    Bits32,
    /// 3-level PAE, 8-byte gptes, PDPTE registers.
    Pae,
    /// 4-level long mode.
    Long4,
    /// 5-level long mode (CR4.LA57).
    Long5,
}

impl PagingMode {
    /// The root level of the guest tables (0 without paging).
    pub fn root_level(self) -> u8 {
        match self {
            PagingMode::None => 0,
            PagingMode::Bits32 => 2,
            PagingMode::Pae => 3,
            PagingMode::Long4 => 4,
            PagingMode::Long5 => 5,
        }
    }
    pub fn is_long(self) -> bool {
        matches!(self, PagingMode::Long4 | PagingMode::Long5)
    }
}

impl WalkCtx {
    pub fn mode(&self) -> PagingMode {
        if self.cr0 & CR0_PG == 0 {
            PagingMode::None
        } else if self.cr4 & CR4_PAE == 0 {
            PagingMode::Bits32
        } else if self.efer & EFER_LMA == 0 {
            PagingMode::Pae
        } else if self.cr4 & CR4_LA57 != 0 {
            PagingMode::Long5
        } else {
            PagingMode::Long4
        }
    }
    pub fn nx(&self) -> bool {
        self.efer & EFER_NXE != 0
    }
    pub fn wp(&self) -> bool {
        self.cr0 & CR0_WP != 0
    }
    pub fn smep(&self) -> bool {
        self.cr4 & CR4_SMEP != 0
    }
    pub fn smap(&self) -> bool {
        self.cr4 & CR4_SMAP != 0
    }
    pub fn pse(&self) -> bool {
        self.cr4 & CR4_PSE != 0
    }
    /// Protection keys apply only with CR4.PKE in long mode.
    pub fn pke(&self) -> bool {
        self.cr4 & CR4_PKE != 0 && self.efer & EFER_LMA != 0
    }
}

/// One guest access.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    pub write: bool,
    /// A CPL3 access.
    pub user: bool,
    pub fetch: bool,
    /// An implicit supervisor access (descriptor tables and the like): never a user
    /// access, and never let through SMAP by EFLAGS.AC.
    pub implicit: bool,
}

impl Access {
    pub const READ: Access = Access {
        write: false,
        user: false,
        fetch: false,
        implicit: false,
    };

    /// The error-code bits the access itself contributes (W, U; I/D is added by the walker).
    pub fn pfec(self) -> u32 {
        let mut e = 0;
        if self.write {
            e |= PFERR_WRITE;
        }
        if self.user && !self.implicit {
            e |= PFERR_USER;
        }
        if self.fetch {
            e |= PFERR_FETCH;
        }
        e
    }
}

/// The guest entries a walk visited: (level, gpa of the entry, value read).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gptes {
    len: u8,
    items: [(u8, u64, u64); 5],
}

impl Gptes {
    pub const EMPTY: Gptes = Gptes {
        len: 0,
        items: [(0, 0, 0); 5],
    };
    fn push(&mut self, level: u8, gpa: u64, value: u64) {
        self.items[self.len as usize] = (level, gpa, value);
        self.len += 1;
    }
}

impl std::ops::Deref for Gptes {
    type Target = [(u8, u64, u64)];
    fn deref(&self) -> &Self::Target {
        &self.items[..self.len as usize]
    }
}

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Walk {
    pub gpa: u64,
    /// Level of the leaf: 1 = 4 KiB, 2 = 2 or 4 MiB, 3 = 1 GiB (0 without paging).
    pub level: u8,
    pub page_size: u64,
    /// Effective ACC bits the guest tables grant (AND over levels).
    pub access: u8,
    /// The leaf's protection key (0 without protection keys).
    pub pkey: u8,
    /// Whether the leaf is dirty (after this walk's own update).
    pub dirty: bool,
    /// Entries visited, top-down, as read (before this walk's A/D update).
    pub gptes: Gptes,
}

/// The fault a guest access raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// #PF with its error code; `address` is what CR2 receives.
    PageFault { error_code: u32, address: u64 },
    /// #GP (a non-canonical address).
    GeneralProtection { error_code: u32 },
}

impl WalkError {
    pub fn vector(&self) -> u8 {
        match self {
            WalkError::PageFault { .. } => PF_VECTOR,
            WalkError::GeneralProtection { .. } => GP_VECTOR,
        }
    }
    pub fn error_code(&self) -> u32 {
        match *self {
            WalkError::PageFault { error_code, .. }
            | WalkError::GeneralProtection { error_code } => error_code,
        }
    }
}

/// Guest-physical memory as the walker sees it (the memslots).
pub trait GuestMem {
    /// Read 4 or 8 bytes at `gpa`; false if no memslot backs it.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool;
    /// Read a naturally aligned 4- or 8-byte little-endian gpte (the walker's hot path;
    /// implementations may override it with an atomic load).
    #[inline]
    fn read_gpte(&self, gpa: u64, size: usize) -> Option<u64> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b[..size])
            .then(|| u64::from_le_bytes(b))
    }
    /// Atomic compare-exchange of a 4- or 8-byte value at `gpa`: Ok(true) swapped,
    /// Ok(false) the value changed meanwhile, Err(()) no memslot or read-only slot.
    #[allow(clippy::result_unit_err)]
    fn cmpxchg(&self, gpa: u64, size: usize, old: u64, new: u64) -> Result<bool, ()>;
    /// The walker wrote this guest page (A/D bits): dirty-logging hook.
    fn mark_dirty(&self, _gfn: u64) {}
}

/// True if `gva` is canonical for the linear-address width of the mode.
pub fn is_canonical(gva: u64, la57: bool) -> bool {
    let bits = if la57 { 57 } else { 48 };
    let shift = 64 - bits;
    (((gva << shift) as i64) >> shift) as u64 == gva
}

/// Translate `gva` for `access` in the CPU state `ctx` (KVM's gva_to_gpa plus the
/// architectural canonical-address check that precedes paging in long mode).
pub fn walk(
    ctx: &WalkCtx,
    mem: &dyn GuestMem,
    gva: u64,
    access: Access,
) -> Result<Walk, WalkError> {
    GuestMmu::new(ctx).walk(mem, gva, access)
}
