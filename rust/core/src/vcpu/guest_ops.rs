//! Trace-driven guest operations on the simulated vCPU (simulator only): memory
//! accesses that go through the shadow MMU as the hardware would, with the SPTEs as
//! the vCPU's TLB, and the guest's TLB maintenance (INVLPG, MOV CR3, MOV CR0/CR4,
//! WRMSR EFER, a full flush) with KVM's reaction to each.
//!
//! An access first looks the address up in the shadow tables under the current
//! root. A present leaf that allows the access is used directly (the CPU sets its
//! A bit), so a guest that edits a gpte of an unsync page keeps the old translation
//! until it flushes. A miss is a hardware #PF into KVM's fault path: fixed (and the
//! access retried), reflected to the guest, or emulated (MMIO, or a write to a
//! write-protected page table, which then zaps the SPTEs it fed).

use crate::errno::{Errno, Result};
use crate::mmu::context::{
    mark_page_dirty, shadow_leaf, KvmMmu, LoggedMem, MmuEnv, KVM_MMU_NUM_PREV_ROOTS,
};
use crate::mmu::fault::{kvm_mmu_page_fault, PageFault, PfRet};
use crate::mmu::shadow::Mmu;
use crate::paging::{
    is_canonical, Access, GuestMem, PagingMode, WalkCtx, WalkError, PFERR_PRESENT, PFERR_RSVD,
};
use crate::vm::VmState;

use super::cr::Cr3Write;
use super::sregs::{
    CR0_PG, CR0_WP, CR4_LA57, CR4_PAE, CR4_PCIDE, CR4_PGE, CR4_PKE, CR4_PSE, CR4_SMAP, CR4_SMEP,
    EFER_LMA, EFER_LME, EFER_NXE,
};
use super::{Vcpu, VcpuState};

/// How often one access may go back to the fault handler before it is a livelock
/// (KVM would keep re-entering the guest).
const MAX_FAULTS_PER_ACCESS: usize = 32;

/// KVM_MMU_CR0_ROLE_BITS, KVM_MMU_CR4_ROLE_BITS, KVM_MMU_EFER_ROLE_BITS.
const CR0_ROLE_BITS: u64 = CR0_PG | CR0_WP;
const CR4_ROLE_BITS: u64 = CR4_PSE | CR4_PAE | CR4_SMEP | CR4_SMAP | CR4_PKE | CR4_LA57;
const EFER_ROLE_BITS: u64 = EFER_LME | EFER_LMA | EFER_NXE;

/// The outcome of one guest access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessOutcome {
    /// Done: a read filled the buffer, a write reached memory.
    Done,
    /// No memory behind `gpa` (or a write to a read-only slot): KVM_EXIT_MMIO.
    Mmio { gpa: u64 },
    /// The guest takes this fault (#PF with CR2 and error code, or #GP).
    Fault(WalkError),
    /// The vCPU's dirty ring is at its soft limit: KVM_RUN would exit with
    /// KVM_EXIT_DIRTY_RING_FULL and not enter the guest until a reset.
    DirtyRingFull,
}

/// The kind of a guest access.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccessKind {
    pub write: bool,
    pub fetch: bool,
    /// CPL 3.
    pub user: bool,
    pub implicit: bool,
}

impl AccessKind {
    fn access(self) -> Access {
        Access {
            write: self.write,
            user: self.user,
            fetch: self.fetch,
            implicit: self.implicit,
        }
    }
}

/// The hardware's check of a leaf SPTE (CR0.WP is always 1 under shadow paging; the
/// guest's SMEP/SMAP are live while it pages). Ok(gpa) or Err(hardware error code).
fn tlb_lookup(
    mmu: &mut Mmu,
    ctx: &KvmMmu,
    cpu: &WalkCtx,
    addr: u64,
    kind: AccessKind,
) -> std::result::Result<u64, u32> {
    let pfec = kind.access().pfec();
    let Some((step, spte)) = shadow_leaf(mmu, &ctx.root.hpa, ctx.root_level(), addr) else {
        return Err(pfec);
    };
    if spte.is_mmio() {
        return Err(pfec | PFERR_RSVD | PFERR_PRESENT);
    }
    if !spte.is_shadow_present() {
        return Err(pfec);
    }
    let user = kind.user && !kind.implicit;
    let paging = cpu.mode() != PagingMode::None;
    let mut denied = (kind.write && !spte.is_writable())
        || (user && !spte.is_user())
        || (kind.fetch && !spte.is_executable());
    if paging && !user && spte.is_user() {
        denied |= if kind.fetch {
            cpu.smep()
        } else {
            cpu.smap() && (kind.implicit || !cpu.rflags_ac)
        };
    }
    if denied {
        return Err(pfec | PFERR_PRESENT);
    }
    mmu.mark_accessed(step.sptep());
    let gfn = mmu.get(step.sp).get_gfn(step.index);
    let offset_mask = (1u64 << (12 + 9 * (u32::from(step.level) - 1))) - 1;
    Ok((gfn << 12) | (addr & offset_mask & !0xfff) | (addr & 0xfff))
}

/// Read or write `buf` at `gpa` (within one page); false if no writable/readable slot.
fn data_access(vm: &VmState, gpa: u64, buf: &mut [u8], write: bool) -> bool {
    if write {
        vm.memslots.write(gpa, buf)
    } else {
        vm.memslots.read(gpa, buf)
    }
}

impl Vcpu {
    /// One guest access of `buf.len()` bytes at `gva` (split at page boundaries like
    /// the CPU). A write takes its bytes from `buf`, a read fills it. The access is
    /// made by a MOV-like instruction, which KVM emulates when it writes a
    /// write-protected page table.
    pub fn guest_access(
        &self,
        gva: u64,
        buf: &mut [u8],
        kind: AccessKind,
    ) -> Result<AccessOutcome> {
        self.guest_access_insn(gva, buf, kind, true)
    }

    /// [`Vcpu::guest_access`] for an instruction that KVM's emulator does or does not
    /// flag as page-table writing (`page_table_writing`). For one that does not
    /// (string moves, arithmetic on memory), a write to a write-protected page table
    /// is not emulated: KVM unshadows the gfn and lets the guest retry natively
    /// (retry_instruction), once per access.
    pub fn guest_access_insn(
        &self,
        gva: u64,
        buf: &mut [u8],
        kind: AccessKind,
        page_table_writing: bool,
    ) -> Result<AccessOutcome> {
        let vm = self.vm().ok_or(Errno::EIO)?;
        let mut st = self.state();
        let mut vmg = vm.state();
        self.access_locked(&mut st, &mut vmg, gva, buf, kind, page_table_writing)
    }

    /// Run `f` with the vCPU and its VM locked once for many guest accesses (a trace
    /// replay, a benchmark): what each access does is the same as
    /// [`Vcpu::guest_access`], without taking the locks per access (as a vCPU inside
    /// KVM_RUN does not).
    pub fn access_session<T>(&self, f: impl FnOnce(&mut AccessSession<'_>) -> T) -> Result<T> {
        let vm = self.vm().ok_or(Errno::EIO)?;
        let st = self.state();
        let vmg = vm.state();
        let mut session = AccessSession {
            vcpu: self,
            st,
            vmg,
        };
        Ok(f(&mut session))
    }

    pub(crate) fn access_locked(
        &self,
        st: &mut VcpuState,
        vmg: &mut VmState,
        gva: u64,
        buf: &mut [u8],
        kind: AccessKind,
        page_table_writing: bool,
    ) -> Result<AccessOutcome> {
        let mut gpa = 0;
        self.access_locked_gpa(st, vmg, gva, buf, kind, page_table_writing, &mut gpa)
    }

    /// [`Vcpu::access_locked`] that also gives the gpa of the last page it reached
    /// (the interpreter's instruction fetch caches it).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn access_locked_gpa(
        &self,
        st: &mut VcpuState,
        vmg: &mut VmState,
        gva: u64,
        buf: &mut [u8],
        kind: AccessKind,
        page_table_writing: bool,
        gpa_out: &mut u64,
    ) -> Result<AccessOutcome> {
        if self.dirty_ring.as_ref().is_some_and(|r| r.soft_full()) {
            return Ok(AccessOutcome::DirtyRingFull);
        }
        let cpu = st.walk_ctx();
        let mode = cpu.mode();
        let gva = if mode.is_long() {
            if !is_canonical(gva, mode == PagingMode::Long5) {
                return Ok(AccessOutcome::Fault(WalkError::GeneralProtection {
                    error_code: 0,
                }));
            }
            gva
        } else {
            gva & 0xffff_ffff
        };
        let mut done = 0usize;
        while done < buf.len() {
            let addr = gva.wrapping_add(done as u64);
            let addr = if mode.is_long() {
                addr
            } else {
                addr & 0xffff_ffff
            };
            let n = (buf.len() - done).min(4096 - (addr & 0xfff) as usize);
            let chunk = &mut buf[done..done + n];
            match self.access_page(
                st,
                vmg,
                &cpu,
                addr,
                chunk,
                kind,
                page_table_writing,
                gpa_out,
            )? {
                AccessOutcome::Done => done += n,
                other => return Ok(other),
            }
        }
        Ok(AccessOutcome::Done)
    }

    /// The hardware's TLB check alone (shadow MMU): the gpa `addr` translates to for
    /// `kind` through a present SPTE, or None (a miss, a fault, TDP). No fault is
    /// taken and nothing is read; the interpreter revalidates its cached code page
    /// with it after KVM handled a fault elsewhere.
    pub(crate) fn tlb_probe_locked(
        &self,
        st: &mut VcpuState,
        vmg: &mut VmState,
        addr: u64,
        kind: AccessKind,
    ) -> Result<Option<u64>> {
        let cpu = st.walk_ctx();
        let VmState {
            mmu, memslots, tdp, ..
        } = vmg;
        if *tdp {
            return Ok(None);
        }
        let mut env = MmuEnv {
            mmu,
            slots: memslots,
            stats: &self.stats,
            ring: self.dirty_ring.as_ref(),
            tdp: false,
        };
        st.mmu.enter(&mut env, &cpu)?;
        Ok(tlb_lookup(env.mmu, &st.mmu, &cpu, addr, kind).ok())
    }

    #[allow(clippy::too_many_arguments)]
    fn access_page(
        &self,
        st: &mut VcpuState,
        vmg: &mut VmState,
        cpu: &WalkCtx,
        addr: u64,
        buf: &mut [u8],
        kind: AccessKind,
        page_table_writing: bool,
        gpa_out: &mut u64,
    ) -> Result<AccessOutcome> {
        let VcpuState {
            mmu: ctx, sregs, ..
        } = st;
        // KVM's last_retry_eip/last_retry_addr: unprotect-and-retry once per access.
        let mut retried = false;
        for _ in 0..MAX_FAULTS_PER_ACCESS {
            let VmState {
                mmu, memslots, tdp, ..
            } = &mut *vmg;
            let mut env = MmuEnv {
                mmu,
                slots: memslots,
                stats: &self.stats,
                ring: self.dirty_ring.as_ref(),
                tdp: *tdp,
            };
            ctx.enter(&mut env, cpu)?;
            if env.tdp {
                return tdp_access(&mut env, ctx, sregs, addr, buf, kind, gpa_out);
            }
            let error_code = match tlb_lookup(env.mmu, ctx, cpu, addr, kind) {
                Ok(gpa) => {
                    *gpa_out = gpa;
                    if data_access(vmg, gpa, buf, kind.write) {
                        return Ok(AccessOutcome::Done);
                    }
                    return Ok(AccessOutcome::Mmio { gpa });
                }
                Err(e) => e,
            };
            let mut f = PageFault::new(addr, error_code);
            f.implicit = kind.implicit;
            match kvm_mmu_page_fault(&mut env, ctx, &f)? {
                PfRet::Fixed | PfRet::Spurious | PfRet::Retry => continue,
                PfRet::Guest(e) => {
                    if let WalkError::PageFault { address, .. } = e {
                        sregs.cr2 = address;
                    }
                    return Ok(AccessOutcome::Fault(e));
                }
                PfRet::WriteProtected if !page_table_writing && !retried => {
                    // retry_instruction: unshadow the written gfn, re-execute natively.
                    retried = true;
                    if let Ok(w) = ctx
                        .guest
                        .walk_no_canonical_check(env.slots, addr, kind.access())
                    {
                        env.mmu.unprotect_page(w.gpa >> 12);
                    }
                    continue;
                }
                PfRet::Emulate | PfRet::WriteProtected => {
                    // x86_emulate_instruction.
                    self.stats
                        .add(crate::stats::VcpuStat::InsnEmulation as usize, 1);
                    return Ok(emulate_access(
                        vmg,
                        self.dirty_ring.as_ref(),
                        ctx,
                        sregs,
                        cpu,
                        addr,
                        buf,
                        kind,
                        gpa_out,
                    ));
                }
            }
        }
        Err(Errno::EAGAIN)
    }

    /// INVLPG executed by the guest (kvm_mmu_invlpg).
    pub fn guest_invlpg(&self, gva: u64) -> Result<()> {
        self.with_mmu(|ctx, env, _| {
            ctx.invlpg(env, gva);
            Ok(())
        })
    }

    /// A guest TLB flush that is not tied to an address or CR3 (INVPCID all-context,
    /// toggling CR4.PGE): KVM_REQ_TLB_FLUSH_GUEST, serviced now.
    pub fn guest_flush_tlb(&self) -> Result<()> {
        self.with_mmu(|ctx, env, _| {
            ctx.flush_tlb_guest(env);
            Ok(())
        })
    }

    /// Run `f` on this vCPU's MMU context with the VM's MMU (both locked, vCPU first),
    /// after bringing the context up to date with the registers.
    pub fn with_mmu<T>(
        &self,
        f: impl FnOnce(&mut KvmMmu, &mut MmuEnv<'_>, &WalkCtx) -> Result<T>,
    ) -> Result<T> {
        let vm = self.vm().ok_or(Errno::EIO)?;
        let mut st = self.state();
        let mut vmg = vm.state();
        self.with_mmu_locked(&mut st, &mut vmg, f)
    }

    /// [`Vcpu::with_mmu`] on state the caller has locked (the interpreter).
    pub(crate) fn with_mmu_locked<T>(
        &self,
        st: &mut VcpuState,
        vmg: &mut VmState,
        f: impl FnOnce(&mut KvmMmu, &mut MmuEnv<'_>, &WalkCtx) -> Result<T>,
    ) -> Result<T> {
        let cpu = st.walk_ctx();
        let VmState {
            mmu, memslots, tdp, ..
        } = vmg;
        let mut env = MmuEnv {
            mmu,
            slots: memslots,
            stats: &self.stats,
            ring: self.dirty_ring.as_ref(),
            tdp: *tdp,
        };
        if st.mmu.reset_pending {
            st.mmu.reset_context(&mut env, &cpu);
        }
        if st.mmu.pdptrs_changed(&cpu) {
            // load_pdptrs (MOV CR0/CR3/CR4 in PAE paging): new values free the root.
            st.mmu
                .free_roots(env.mmu, true, [false; KVM_MMU_NUM_PREV_ROOTS]);
        }
        st.mmu.refresh(&cpu);
        f(&mut st.mmu, &mut env, &cpu)
    }

    /// A guest write to CR0, CR3, CR4 or EFER with KVM's MMU reaction
    /// (kvm_post_set_cr0, kvm_set_cr3, kvm_post_set_cr4, set_efer).
    pub fn guest_write_control(
        &self,
        reg: ControlReg,
        value: u64,
    ) -> Result<std::result::Result<(), WalkError>> {
        let vm = self.vm().ok_or(Errno::EIO)?;
        let mut st = self.state();
        let mut vmg = vm.state();
        self.write_control_locked(&mut st, &mut vmg, reg, value)
    }

    /// [`Vcpu::guest_write_control`] on state the caller has locked (the interpreter).
    pub(crate) fn write_control_locked(
        &self,
        st: &mut VcpuState,
        vmg: &mut VmState,
        reg: ControlReg,
        value: u64,
    ) -> Result<std::result::Result<(), WalkError>> {
        match reg {
            ControlReg::Cr0 => {
                let old = match st.set_cr0(&vmg.memslots, value) {
                    Ok(o) => o,
                    Err(e) => return Ok(Err(e)),
                };
                let new = st.sregs.cr0;
                self.with_mmu_locked(st, vmg, |ctx, env, cpu| {
                    if (new ^ old) & CR0_PG != 0 && new & CR0_PG == 0 {
                        ctx.req_flush_guest = true;
                    }
                    if (new ^ old) & CR0_ROLE_BITS != 0 {
                        ctx.reset_context(env, cpu);
                    }
                    Ok(())
                })?;
            }
            ControlReg::Cr3 => {
                let w: Cr3Write = match st.set_cr3(&vmg.memslots, value) {
                    Ok(w) => w,
                    Err(e) => return Ok(Err(e)),
                };
                self.with_mmu_locked(st, vmg, |ctx, env, _| {
                    ctx.set_cr3(env.mmu, w.old, w.new, w.pcide, w.noflush);
                    Ok(())
                })?;
            }
            ControlReg::Cr4 => {
                let old = match st.set_cr4(&vmg.memslots, value) {
                    Ok(o) => o,
                    Err(e) => return Ok(Err(e)),
                };
                let new = st.sregs.cr4;
                self.with_mmu_locked(st, vmg, |ctx, env, cpu| {
                    if (new ^ old) & CR4_ROLE_BITS != 0 {
                        ctx.reset_context(env, cpu);
                    }
                    if new & CR4_PCIDE != 0 && old & CR4_PCIDE == 0 {
                        ctx.free_roots(env.mmu, true, [true; 3]);
                    }
                    if (new ^ old) & CR4_PGE != 0 || (new & CR4_PCIDE == 0 && old & CR4_PCIDE != 0)
                    {
                        ctx.req_flush_guest = true;
                    }
                    Ok(())
                })?;
            }
            ControlReg::Efer => {
                let old = match st.set_efer(value) {
                    Ok(o) => o,
                    Err(e) => return Ok(Err(e)),
                };
                let new = st.sregs.efer;
                self.with_mmu_locked(st, vmg, |ctx, env, cpu| {
                    if (new ^ old) & EFER_ROLE_BITS != 0 {
                        ctx.reset_context(env, cpu);
                    }
                    Ok(())
                })?;
            }
        }
        Ok(Ok(()))
    }
}

/// A guest access under two-dimensional paging: the CPU walks the guest's tables
/// itself (setting their A/D bits, faulting straight into the guest without KVM),
/// and every guest-physical access, table entries included, goes through the TDP
/// tables, whose misses are KVM's faults (kvm_tdp_page_fault). The hardware TLB is
/// not modelled here: the guest always sees its current tables, which the
/// architecture allows.
fn tdp_access(
    env: &mut MmuEnv<'_>,
    ctx: &mut KvmMmu,
    sregs: &mut crate::uapi::kvm_sregs,
    addr: u64,
    buf: &mut [u8],
    kind: AccessKind,
    gpa_out: &mut u64,
) -> Result<AccessOutcome> {
    let walk = match ctx
        .guest
        .walk_no_canonical_check(&env.guest_mem(), addr, kind.access())
    {
        Ok(w) => w,
        Err(e) => {
            if let WalkError::PageFault { address, .. } = e {
                sregs.cr2 = address;
            }
            return Ok(AccessOutcome::Fault(e));
        }
    };
    *gpa_out = walk.gpa;
    let skip = usize::from(ctx.guest.mode == PagingMode::Pae);
    for &(_, gpa, _) in &walk.gptes[skip..] {
        if let Some(out) = tdp_translate(env, ctx, gpa, false)? {
            return Ok(out);
        }
    }
    if let Some(out) = tdp_translate(env, ctx, walk.gpa, kind.write)? {
        return Ok(out);
    }
    // A write through a writable TDP SPTE was logged when the SPTE became writable.
    let ok = if kind.write {
        env.slots.write(walk.gpa, buf)
    } else {
        env.slots.read(walk.gpa, buf)
    };
    Ok(if ok {
        AccessOutcome::Done
    } else {
        AccessOutcome::Mmio { gpa: walk.gpa }
    })
}

/// The TDP half of an access to `gpa`: None when the TDP tables allow it (the CPU
/// sets the leaf's A bit), or how the access ends (MMIO).
fn tdp_translate(
    env: &mut MmuEnv<'_>,
    ctx: &mut KvmMmu,
    gpa: u64,
    write: bool,
) -> Result<Option<AccessOutcome>> {
    for _ in 0..MAX_FAULTS_PER_ACCESS {
        let mut ec = if write { crate::paging::PFERR_WRITE } else { 0 };
        match shadow_leaf(env.mmu, &ctx.root.hpa, ctx.root_level(), gpa) {
            Some((step, s)) if s.is_shadow_present() => {
                if !write || s.is_writable() {
                    env.mmu.mark_accessed(step.sptep());
                    return Ok(None);
                }
                ec |= PFERR_PRESENT;
            }
            Some((_, s)) if s.is_mmio() => ec |= PFERR_PRESENT | PFERR_RSVD,
            _ => {}
        }
        match kvm_mmu_page_fault(env, ctx, &PageFault::new(gpa, ec))? {
            PfRet::Fixed | PfRet::Spurious | PfRet::Retry => continue,
            // No memory behind it, or a write to a read-only slot: the emulator's MMIO.
            PfRet::Emulate | PfRet::WriteProtected | PfRet::Guest(_) => {
                return Ok(Some(AccessOutcome::Mmio { gpa }));
            }
        }
    }
    Err(Errno::EAGAIN)
}

/// The vCPU and its VM, locked for a run of accesses ([`Vcpu::access_session`]).
pub struct AccessSession<'a> {
    vcpu: &'a Vcpu,
    st: std::sync::MutexGuard<'a, VcpuState>,
    vmg: std::sync::MutexGuard<'a, VmState>,
}

impl AccessSession<'_> {
    /// One guest access, as [`Vcpu::guest_access`].
    pub fn access(&mut self, gva: u64, buf: &mut [u8], kind: AccessKind) -> Result<AccessOutcome> {
        self.vcpu
            .access_locked(&mut self.st, &mut self.vmg, gva, buf, kind, true)
    }
}

/// The registers the guest-op API writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlReg {
    Cr0,
    Cr3,
    Cr4,
    Efer,
}

/// The emulator's memory access (emulator_read_write_onepage): translate with the
/// guest walker (setting A/D bits), then read or write guest memory; a write lands
/// first and is then reported to the shadow MMU (kvm_page_track_write).
#[allow(clippy::too_many_arguments)]
fn emulate_access(
    vmg: &mut VmState,
    ring: Option<&crate::dirty_ring::DirtyRing>,
    ctx: &KvmMmu,
    sregs: &mut crate::uapi::kvm_sregs,
    cpu: &WalkCtx,
    addr: u64,
    buf: &mut [u8],
    kind: AccessKind,
    gpa_out: &mut u64,
) -> AccessOutcome {
    let walk = match ctx.guest.walk_no_canonical_check(
        &LoggedMem {
            slots: &vmg.memslots,
            ring,
        },
        addr,
        kind.access(),
    ) {
        Ok(w) => w,
        Err(e) => {
            if let WalkError::PageFault { address, .. } = e {
                sregs.cr2 = address;
            }
            return AccessOutcome::Fault(e);
        }
    };
    let gpa = walk.gpa;
    *gpa_out = gpa;
    if !data_access(vmg, gpa, buf, kind.write) {
        return AccessOutcome::Mmio { gpa };
    }
    if kind.write {
        let pae = cpu.cr4 & CR4_PAE != 0;
        let VmState { mmu, memslots, .. } = vmg;
        // kvm_vcpu_write_guest logs the page, then kvm_page_track_write.
        mark_page_dirty(memslots, ring, gpa >> 12);
        mmu.track_write(memslots, pae, gpa, buf.len());
    }
    AccessOutcome::Done
}
