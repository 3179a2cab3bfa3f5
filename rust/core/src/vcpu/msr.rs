//! KVM_GET_MSRS / KVM_SET_MSRS (api.txt 4.18, 4.19) for the few MSRs the model has: IA32_EFER
//! and the paravirtual wall clock, whose write makes KVM itself write guest memory (and log the
//! pages it writes) without KVM_RUN.
//!
//! # Sources
//!
//! * The device: a probe on kernel `6.18.44` (KVM with the PVM vendor module, Intel host),
//!   recorded in `tests/test_msr_dirty.py`, which compares both backends.
//! * The kernel (facts only, no code): `arch/x86/kvm/x86.c` `msr_io`, `__msr_io`,
//!   `kvm_set_msr_common` (MSR_EFER, MSR_KVM_WALL_CLOCK(_NEW)), `set_efer`,
//!   `kvm_get_msr_common`, `kvm_write_wall_clock`; `virt/kvm/kvm_main.c` `kvm_read_guest`,
//!   `kvm_write_guest`, `mark_page_dirty_in_slot`.
//!
//! # The rules
//!
//! * `struct kvm_msrs {u32 nmsrs; u32 pad; struct kvm_msr_entry {u32 index; u32 reserved;
//!   u64 data;} entries[]}`. The header is read first (EFAULT); `nmsrs >= 256` (MAX_IO_MSRS)
//!   is `E2BIG`; then the entries are read (EFAULT). Entries are processed in order and the
//!   batch stops at the first MSR that fails; the return value is the number processed. GET
//!   writes all `nmsrs` entries back (the ones after a failure unchanged).
//! * MSR_IA32_EFER, host-initiated: bits other than SCE, LME, LMA and NXE (the host's
//!   efer_reserved_bits on the probed Intel host) fail; CPUID and paging are not checked (the
//!   device clears LME with paging on); LMA keeps its old value. A change resets the MMU
//!   context. GET returns EFER.
//! * MSR_KVM_WALL_CLOCK_NEW and MSR_KVM_WALL_CLOCK (host-initiated: no PV feature check): the
//!   VM's `wall_clock` becomes `data` (GET of either returns it; 0 at first) and
//!   kvm_write_wall_clock runs at that gpa: nothing if the gpa is 0 or its version (u32) cannot
//!   be read; version += 1, and once more if it was odd; write the version (stop if that
//!   fails), the whole `pvclock_wall_clock {version, sec, nsec}` (its result ignored), then
//!   version + 1. The set always succeeds. Each write is kvm_write_guest: page by page, each
//!   page that was written logged (to this vCPU's ring, which KVM uses as the vCPU is loaded
//!   during its ioctl, else the slot's bitmap); a page without a slot (or read-only) ends that
//!   write. Page tracking is not involved.
//! * Any other MSR fails (the batch stops there).

use std::time::{SystemTime, UNIX_EPOCH};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::dirty_ring::DirtyRing;
use crate::errno::{Errno, Result};
use crate::memslot::MemSlots;
use crate::mmu::context::mark_page_dirty;
use crate::paging::GuestMem;
use crate::uaccess::{read_struct, UserAccess};
use crate::uapi;
use crate::vm::VmState;

use super::sregs::{EFER_LMA, EFER_LME, EFER_NXE, EFER_SCE};
use super::{Vcpu, VcpuState};

pub const MSR_IA32_EFER: u32 = 0xc000_0080;
pub const MSR_KVM_WALL_CLOCK: u32 = 0x11;
pub const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
/// MAX_IO_MSRS: `nmsrs` must be below it.
pub const MAX_IO_MSRS: u32 = 256;
/// The EFER bits a host-initiated write may set (efer_reserved_bits of the probed host).
pub const EFER_HOST_ALLOWED: u64 = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE;

const PAGE_SIZE: u64 = 4096;

/// struct kvm_msrs's header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct MsrsHeader {
    pub nmsrs: u32,
    pub pad: u32,
}

/// struct kvm_msr_entry.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct MsrEntry {
    pub index: u32,
    pub reserved: u32,
    pub data: u64,
}

/// kvm_read_guest: false if any page of the range has no slot.
fn read_guest(slots: &MemSlots, gpa: u64, buf: &mut [u8]) -> bool {
    let mut done = 0usize;
    while done < buf.len() {
        let at = gpa.wrapping_add(done as u64);
        let n = ((PAGE_SIZE - (at & (PAGE_SIZE - 1))) as usize).min(buf.len() - done);
        if !slots.read(at, &mut buf[done..done + n]) {
            return false;
        }
        done += n;
    }
    true
}

/// kvm_write_guest: page by page, each written page logged; stops (false) at a page
/// without a writable slot.
fn write_guest(slots: &MemSlots, ring: Option<&DirtyRing>, gpa: u64, buf: &[u8]) -> bool {
    let mut done = 0usize;
    while done < buf.len() {
        let at = gpa.wrapping_add(done as u64);
        let n = ((PAGE_SIZE - (at & (PAGE_SIZE - 1))) as usize).min(buf.len() - done);
        if !slots.write(at, &buf[done..done + n]) {
            return false;
        }
        mark_page_dirty(slots, ring, at >> 12);
        done += n;
    }
    true
}

/// The host's wall clock as kvm_get_wall_clock_epoch gives it: (seconds mod 2**32, ns).
fn wall_clock_now() -> (u32, u32) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as u32, d.subsec_nanos())
}

/// kvm_write_wall_clock at `gpa` (KVM's writes, logged to `ring` or the bitmaps).
pub fn write_wall_clock(slots: &MemSlots, ring: Option<&DirtyRing>, gpa: u64) {
    if gpa == 0 {
        return;
    }
    let mut v = [0u8; 4];
    if !read_guest(slots, gpa, &mut v) {
        return;
    }
    let mut version = u32::from_le_bytes(v);
    if version & 1 != 0 {
        version = version.wrapping_add(1);
    }
    version = version.wrapping_add(1);
    if !write_guest(slots, ring, gpa, &version.to_le_bytes()) {
        return;
    }
    let (sec, nsec) = wall_clock_now();
    let mut wc = [0u8; 12];
    wc[0..4].copy_from_slice(&version.to_le_bytes());
    wc[4..8].copy_from_slice(&sec.to_le_bytes());
    wc[8..12].copy_from_slice(&nsec.to_le_bytes());
    let _ = write_guest(slots, ring, gpa, &wc);
    version = version.wrapping_add(1);
    let _ = write_guest(slots, ring, gpa, &version.to_le_bytes());
}

/// One host-initiated MSR read: None if the MSR fails.
pub fn get_msr(st: &VcpuState, vmg: &VmState, index: u32) -> Option<u64> {
    match index {
        MSR_IA32_EFER => Some(st.sregs.efer),
        MSR_KVM_WALL_CLOCK | MSR_KVM_WALL_CLOCK_NEW => Some(vmg.wall_clock),
        _ => None,
    }
}

/// One host-initiated MSR write: false if the MSR fails.
pub fn set_msr(
    st: &mut VcpuState,
    vmg: &mut VmState,
    ring: Option<&DirtyRing>,
    index: u32,
    data: u64,
) -> bool {
    match index {
        MSR_IA32_EFER => {
            if data & !EFER_HOST_ALLOWED != 0 {
                return false;
            }
            let old = st.sregs.efer;
            let efer = (data & !EFER_LMA) | (old & EFER_LMA);
            st.sregs.efer = efer;
            if efer != old {
                st.mmu.reset_pending = true;
            }
            true
        }
        MSR_KVM_WALL_CLOCK | MSR_KVM_WALL_CLOCK_NEW => {
            vmg.wall_clock = data;
            write_wall_clock(&vmg.memslots, ring, data);
            true
        }
        _ => false,
    }
}

/// vCPU ioctls of this module; None if `request` is not one of them.
pub fn ioctl(vcpu: &Vcpu, request: u64, arg: u64, ua: &mut dyn UserAccess) -> Option<Result<i64>> {
    match request {
        uapi::KVM_GET_MSRS => Some(msr_io(vcpu, arg, ua, false)),
        uapi::KVM_SET_MSRS => Some(msr_io(vcpu, arg, ua, true)),
        _ => None,
    }
}

/// msr_io: header, E2BIG, entries, then __msr_io with the vCPU loaded.
fn msr_io(vcpu: &Vcpu, arg: u64, ua: &mut dyn UserAccess, write: bool) -> Result<i64> {
    let hdr: MsrsHeader = read_struct(ua, arg)?;
    if hdr.nmsrs >= MAX_IO_MSRS {
        return Err(Errno::E2BIG);
    }
    let n = hdr.nmsrs as usize;
    let entries_at = arg + size_of::<MsrsHeader>() as u64;
    let mut entries = vec![MsrEntry::default(); n];
    ua.copy_from_user(entries_at, entries.as_mut_slice().as_mut_bytes())?;
    let vm = vcpu.vm().ok_or(Errno::EIO)?;
    let done = {
        // Lock order: the vCPU before its VM.
        let mut st = vcpu.state();
        let mut vmg = vm.state();
        let ring = vcpu.dirty_ring.as_ref();
        let mut done = 0usize;
        for e in entries.iter_mut() {
            let ok = if write {
                set_msr(&mut st, &mut vmg, ring, e.index, e.data)
            } else {
                match get_msr(&st, &vmg, e.index) {
                    Some(v) => {
                        e.data = v;
                        true
                    }
                    None => false,
                }
            };
            if !ok {
                break;
            }
            done += 1;
        }
        done
    };
    if !write {
        ua.copy_to_user(entries_at, entries.as_slice().as_bytes())?;
    }
    Ok(done as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_layout() {
        assert_eq!(size_of::<MsrsHeader>(), 8);
        assert_eq!(size_of::<MsrEntry>(), 16);
    }

    #[test]
    fn efer_host_write() {
        // Device: reserved bits fail; LMA alone is accepted and ignored; LME may be
        // cleared with paging on; LMA keeps its value.
        let vm = crate::vm::Vm::new(0).unwrap();
        let mut vmg = vm.state();
        let mut st = VcpuState::reset(true);
        for bad in [2u64, 1 << 12, 1 << 14, 1 << 21, 1 << 63] {
            assert!(!set_msr(&mut st, &mut vmg, None, MSR_IA32_EFER, bad));
        }
        assert!(set_msr(&mut st, &mut vmg, None, MSR_IA32_EFER, EFER_LMA));
        assert_eq!(st.sregs.efer, 0);
        st.sregs.efer = EFER_LME | EFER_LMA;
        st.sregs.cr0 |= 1 << 31;
        st.mmu.reset_pending = false;
        assert!(set_msr(&mut st, &mut vmg, None, MSR_IA32_EFER, 0));
        assert_eq!(st.sregs.efer, EFER_LMA);
        assert!(st.mmu.reset_pending);
        assert_eq!(get_msr(&st, &vmg, MSR_IA32_EFER), Some(EFER_LMA));
        assert_eq!(get_msr(&st, &vmg, 0x1234_5678), None);
        assert!(!set_msr(&mut st, &mut vmg, None, 0x1234_5678, 0));
    }

    #[test]
    fn wall_clock_without_memory() {
        // The gpa is stored even when nothing can be written.
        let vm = crate::vm::Vm::new(0).unwrap();
        let mut vmg = vm.state();
        let mut st = VcpuState::reset(true);
        assert_eq!(get_msr(&st, &vmg, MSR_KVM_WALL_CLOCK), Some(0));
        assert!(set_msr(
            &mut st,
            &mut vmg,
            None,
            MSR_KVM_WALL_CLOCK_NEW,
            1 << 63
        ));
        assert_eq!(get_msr(&st, &vmg, MSR_KVM_WALL_CLOCK), Some(1 << 63));
    }
}
