//! Control registers as the guest writes them: MOV to CR0/CR3/CR4 and WRMSR EFER,
//! with the architectural #GP checks and the PAE PDPTE loads of kvm_set_cr0,
//! kvm_set_cr3, kvm_set_cr4 and set_efer (x86.c). The interpreter and the
//! trace-driven API use these; KVM_SET_SREGS has its own, laxer rules (sregs.rs).

use crate::paging::{GuestMem, WalkError};

use super::sregs::{
    check_cr0, check_cr3_long_mode, check_cr4, CR0_CD, CR0_ET, CR0_NW, CR0_PG, CR4_LA57, CR4_PAE,
    CR4_PCIDE, CR4_PGE, CR4_PSE, CR4_SMEP, EFER_LMA, EFER_LME, EFER_NXE, EFER_SCE, EFER_SVME,
};
use super::{Vcpu, VcpuState};

const GP: WalkError = WalkError::GeneralProtection { error_code: 0 };
/// X86_CR0_PDPTR_BITS: CR0 bits whose change reloads the PDPTEs in PAE paging.
const CR0_PDPTR_BITS: u64 = CR0_CD | CR0_NW | CR0_PG;
/// X86_CR4_PDPTR_BITS.
const CR4_PDPTR_BITS: u64 = CR4_PGE | CR4_PSE | CR4_PAE | CR4_SMEP;
/// CR3[11:0] is the PCID with CR4.PCIDE; bit 63 is "no flush" on MOV.
const CR3_PCID_NOFLUSH: u64 = 1 << 63;

/// A successful MOV to CR3, for the MMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cr3Write {
    pub old: u64,
    pub new: u64,
    pub pcide: bool,
    /// CR3[63] with CR4.PCIDE: keep the TLB.
    pub noflush: bool,
}

impl VcpuState {
    fn is_paging(&self) -> bool {
        self.sregs.cr0 & CR0_PG != 0
    }
    fn is_long_mode(&self) -> bool {
        self.sregs.efer & EFER_LMA != 0
    }
    fn is_pae_paging(&self) -> bool {
        super::sregs::is_pae_paging(&self.sregs)
    }
    fn is_64_bit_mode(&self) -> bool {
        self.is_long_mode() && self.sregs.cs.l != 0
    }
}

impl Vcpu {
    /// MOV to CR3 ([`VcpuState::set_cr3`] with this vCPU's VM as guest memory).
    pub fn mov_cr3(&self, cr3: u64) -> Result<Cr3Write, WalkError> {
        self.with_state_and_mem(|st, mem| st.set_cr3(mem, cr3))
    }

    /// MOV to CR0 ([`VcpuState::set_cr0`]); returns the old CR0.
    pub fn mov_cr0(&self, cr0: u64) -> Result<u64, WalkError> {
        self.with_state_and_mem(|st, mem| st.set_cr0(mem, cr0))
    }

    /// MOV to CR4 ([`VcpuState::set_cr4`]); returns the old CR4.
    pub fn mov_cr4(&self, cr4: u64) -> Result<u64, WalkError> {
        self.with_state_and_mem(|st, mem| st.set_cr4(mem, cr4))
    }

    /// WRMSR IA32_EFER ([`VcpuState::set_efer`]); returns the old EFER.
    pub fn wrmsr_efer(&self, efer: u64) -> Result<u64, WalkError> {
        self.state().set_efer(efer)
    }

    /// Lock the vCPU, then its VM's memslots (no VM: no guest memory).
    fn with_state_and_mem<T>(&self, f: impl FnOnce(&mut VcpuState, &dyn GuestMem) -> T) -> T {
        let vm = self.vm();
        let mut st = self.state();
        match vm {
            Some(vm) => {
                let vmg = vm.state();
                f(&mut st, &vmg.memslots)
            }
            None => f(&mut st, &NoMem),
        }
    }
}

/// Guest memory of a VM that is gone: nothing is readable.
struct NoMem;
impl GuestMem for NoMem {
    fn read(&self, _gpa: u64, _buf: &mut [u8]) -> bool {
        false
    }
    fn cmpxchg(&self, _: u64, _: usize, _: u64, _: u64) -> std::result::Result<bool, ()> {
        Err(())
    }
}

impl VcpuState {
    /// The PDPTEs at `cr3` for this vCPU's MAXPHYADDR (None: unreadable or reserved bits).
    fn pdptrs_at(&self, mem: &dyn GuestMem, cr3: u64) -> Option<[u64; 4]> {
        super::mmu::load_pdptrs(mem, cr3, self.features.maxphyaddr)
    }

    /// MOV to CR3 (kvm_set_cr3): #GP for bits at or above MAXPHYADDR, or in PAE paging
    /// for an invalid PDPTE; the PDPTEs are always reloaded in PAE paging. Returns what
    /// the MMU needs to switch roots and flush.
    pub fn set_cr3(&mut self, mem: &dyn GuestMem, cr3: u64) -> Result<Cr3Write, WalkError> {
        let st = self;
        let pcide = st.sregs.cr4 & CR4_PCIDE != 0;
        let (cr3, noflush) = if pcide {
            (cr3 & !CR3_PCID_NOFLUSH, cr3 & CR3_PCID_NOFLUSH != 0)
        } else {
            (cr3, false)
        };
        let old = st.sregs.cr3;
        let out = Cr3Write {
            old,
            new: cr3,
            pcide,
            noflush,
        };
        if cr3 == old && !st.is_pae_paging() {
            return Ok(out);
        }
        if check_cr3_long_mode(&st.features, cr3).is_err() {
            return Err(GP);
        }
        if st.is_pae_paging() {
            let pdptrs = st.pdptrs_at(mem, cr3).ok_or(GP)?;
            st.pdptrs = pdptrs;
        }
        st.sregs.cr3 = cr3;
        Ok(out)
    }

    /// MOV to CR0 (kvm_set_cr0).
    /// Returns the old CR0.
    pub fn set_cr0(&mut self, mem: &dyn GuestMem, cr0: u64) -> Result<u64, WalkError> {
        let st = self;
        let old = st.sregs.cr0;
        let cr0 = cr0 | CR0_ET;
        if check_cr0(cr0).is_err() {
            return Err(GP);
        }
        let efer = st.sregs.efer;
        let enabling_paging = cr0 & CR0_PG != 0 && old & CR0_PG == 0;
        if enabling_paging && efer & EFER_LME != 0 {
            // Entering long mode needs PAE, and CS.L=0 at that moment.
            if st.sregs.cr4 & CR4_PAE == 0 || st.sregs.cs.l != 0 {
                return Err(GP);
            }
        }
        let mut pdptrs = None;
        if efer & EFER_LME == 0
            && cr0 & CR0_PG != 0
            && st.sregs.cr4 & CR4_PAE != 0
            && (cr0 ^ old) & CR0_PDPTR_BITS != 0
        {
            pdptrs = Some(st.pdptrs_at(mem, st.sregs.cr3).ok_or(GP)?);
        }
        if cr0 & CR0_PG == 0 && (st.is_64_bit_mode() || st.sregs.cr4 & CR4_PCIDE != 0) {
            return Err(GP);
        }
        // EFER.LMA follows paging while EFER.LME is set (vmx_set_cr0/svm_set_cr0).
        if efer & EFER_LME != 0 {
            if enabling_paging {
                st.sregs.efer |= EFER_LMA;
            } else if cr0 & CR0_PG == 0 && old & CR0_PG != 0 {
                st.sregs.efer &= !EFER_LMA;
            }
        }
        if let Some(p) = pdptrs {
            st.pdptrs = p;
        }
        st.sregs.cr0 = cr0;
        Ok(old)
    }

    /// MOV to CR4 (kvm_set_cr4).
    /// Returns the old CR4.
    pub fn set_cr4(&mut self, mem: &dyn GuestMem, cr4: u64) -> Result<u64, WalkError> {
        let st = self;
        let old = st.sregs.cr4;
        if check_cr4(&st.features, cr4).is_err() {
            return Err(GP);
        }
        let mut pdptrs = None;
        if st.is_long_mode() {
            if cr4 & CR4_PAE == 0 || (cr4 ^ old) & CR4_LA57 != 0 {
                return Err(GP);
            }
        } else if st.is_paging() && cr4 & CR4_PAE != 0 && (cr4 ^ old) & CR4_PDPTR_BITS != 0 {
            pdptrs = Some(st.pdptrs_at(mem, st.sregs.cr3).ok_or(GP)?);
        }
        if cr4 & CR4_PCIDE != 0
            && old & CR4_PCIDE == 0
            && (st.sregs.cr3 & 0xfff != 0 || !st.is_long_mode())
        {
            return Err(GP);
        }
        if let Some(p) = pdptrs {
            st.pdptrs = p;
        }
        st.sregs.cr4 = cr4;
        Ok(old)
    }

    /// WRMSR IA32_EFER (set_efer): reserved bits and LME changes while paging are
    /// #GP; LMA is read-only (it follows CR0.PG).
    /// Returns the old EFER.
    pub fn set_efer(&mut self, efer: u64) -> Result<u64, WalkError> {
        let st = self;
        let f = st.features;
        let mut allowed = EFER_SCE | EFER_LMA;
        if f.lm {
            allowed |= EFER_LME;
        }
        if f.nx {
            allowed |= EFER_NXE;
        }
        if f.svm {
            allowed |= EFER_SVME;
        }
        if efer & !allowed != 0 {
            return Err(GP);
        }
        let old = st.sregs.efer;
        if st.is_paging() && (old ^ efer) & EFER_LME != 0 {
            return Err(GP);
        }
        st.sregs.efer = (efer & !EFER_LMA) | (old & EFER_LMA);
        Ok(old)
    }
}
