//! The vCPU's view of the MMU: the walk context from its registers, PAE PDPTE
//! loading, KVM_TRANSLATE, and trace-driven walks for the simulator-only API.

use crate::errno::{Errno, Result};
use crate::memslot::MemSlots;
use crate::mmu::context::LoggedMem;
use crate::paging::{self, rsvd::pdpte_valid, Access, GuestMem, Walk, WalkCtx, WalkError};
use crate::uaccess::{read_struct, write_struct, UserAccess};
use crate::uapi::{self, kvm_translation};

use super::sregs::RFLAGS_AC;
use super::{Vcpu, VcpuState};

impl VcpuState {
    /// The CPU state the walker needs, from sregs, CPUID features, PKRU and RFLAGS.
    pub fn walk_ctx(&self) -> WalkCtx {
        let s = &self.sregs;
        WalkCtx {
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
            pdptrs: self.pdptrs,
            maxphyaddr: self.features.maxphyaddr,
            gbpages: self.features.pdpe1gb,
            pkru: self.pkru,
            rflags_ac: self.regs.rflags & RFLAGS_AC != 0,
        }
    }
}

/// load_pdptrs: read the four PDPTEs at CR3[31:5]; None if one is unreadable or a
/// present one sets reserved bits (the caller then raises #GP and keeps the old ones).
pub fn load_pdptrs(mem: &dyn GuestMem, cr3: u64, maxphyaddr: u8) -> Option<[u64; 4]> {
    let base = cr3 & 0xffff_ffe0;
    let mut out = [0u64; 4];
    for (i, p) in out.iter_mut().enumerate() {
        let mut b = [0u8; 8];
        if !mem.read(base + 8 * i as u64, &mut b) {
            return None;
        }
        *p = u64::from_le_bytes(b);
        if !pdpte_valid(*p, maxphyaddr) {
            return None;
        }
    }
    Some(out)
}

impl Vcpu {
    /// Run `f` with the VM's memslots as guest memory (EIO if the VM is gone).
    pub fn with_guest_mem<T>(&self, f: impl FnOnce(&MemSlots) -> T) -> Result<T> {
        let vm = self.vm().ok_or(Errno::EIO)?;
        let st = vm.state();
        Ok(f(&st.memslots))
    }

    /// Run `f` with guest memory whose writes by KVM (the walker's A/D bits) are
    /// logged for this vCPU: to its dirty ring in ring mode, else to the bitmaps.
    pub fn with_logged_mem<T>(&self, f: impl FnOnce(&LoggedMem<'_>) -> T) -> Result<T> {
        let vm = self.vm().ok_or(Errno::EIO)?;
        let st = vm.state();
        Ok(f(&LoggedMem {
            slots: &st.memslots,
            ring: self.dirty_ring.as_ref(),
        }))
    }

    /// After SET_SREGS into PAE paging, the kernel loads the PDPTEs from CR3 (and
    /// ignores a failed load, keeping the old registers).
    pub(crate) fn reload_pdptrs_if_pae(&self, st: &mut VcpuState) {
        if !super::sregs::is_pae_paging(&st.sregs) {
            return;
        }
        if let Some(p) = self.load_pdptrs_for(st, st.sregs.cr3) {
            st.pdptrs = p;
        }
    }

    /// The PDPTEs at `cr3` for this vCPU's MAXPHYADDR (None: unreadable or reserved bits).
    pub(crate) fn load_pdptrs_for(&self, st: &VcpuState, cr3: u64) -> Option<[u64; 4]> {
        let maxphy = st.features.maxphyaddr;
        self.with_guest_mem(|m| load_pdptrs(m, cr3, maxphy))
            .ok()
            .flatten()
    }

    /// A guest access through the vCPU's current paging state (simulator only).
    pub fn walk(&self, gva: u64, access: Access) -> Result<std::result::Result<Walk, WalkError>> {
        let ctx = self.state().walk_ctx();
        self.with_logged_mem(|m| paging::walk(&ctx, m, gva, access))
    }

    /// Many walks under one lock: for each gva, the gpa (u64::MAX on a fault), the
    /// fault vector (0 on success) and the error code.
    pub fn walk_many(
        &self,
        gvas: &[u64],
        access: Access,
        gpas: &mut [u64],
        vectors: &mut [u8],
        error_codes: &mut [u32],
    ) -> Result<()> {
        let mmu = paging::GuestMmu::new(&self.state().walk_ctx());
        self.with_logged_mem(|m| {
            for (i, &gva) in gvas.iter().enumerate() {
                match mmu.walk(m, gva, access) {
                    Ok(w) => {
                        gpas[i] = w.gpa;
                        vectors[i] = 0;
                        error_codes[i] = 0;
                    }
                    Err(e) => {
                        gpas[i] = u64::MAX;
                        vectors[i] = e.vector();
                        error_codes[i] = e.error_code();
                    }
                }
            }
        })
    }

    /// KVM_TRANSLATE: a supervisor read walk without the canonical check (it sets A
    /// bits on the way, as the kernel's does), always reporting writeable=1, usermode=0.
    pub fn translate(&self, gva: u64) -> Result<kvm_translation> {
        let mmu = paging::GuestMmu::new(&self.state().walk_ctx());
        let r = self.with_logged_mem(|m| mmu.walk_no_canonical_check(m, gva, Access::READ))?;
        Ok(kvm_translation {
            linear_address: gva,
            physical_address: r.map_or(u64::MAX, |w| w.gpa),
            valid: u8::from(r.is_ok()),
            writeable: 1,
            usermode: 0,
            pad: [0; 5],
        })
    }
}

/// vCPU ioctls of this module; None if `request` is not one of them.
pub fn ioctl(vcpu: &Vcpu, request: u64, arg: u64, ua: &mut dyn UserAccess) -> Option<Result<i64>> {
    match request {
        uapi::KVM_TRANSLATE => Some((|| {
            let t: kvm_translation = read_struct(ua, arg)?;
            let out = vcpu.translate(t.linear_address)?;
            write_struct(ua, arg, &out)?;
            Ok(0)
        })()),
        _ => None,
    }
}
