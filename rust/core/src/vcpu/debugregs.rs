//! KVM_GET/SET_DEBUGREGS (api.txt 4.32, 4.33): DR0-DR3, DR6 and DR7 of a vCPU.
//!
//! # Sources
//!
//! * The device: `tools/probe_state.py`, results in `docs/device-state.md` (kernel
//!   `6.18.44`, KVM with the PVM vendor module).
//! * The kernel (facts only, no code): `arch/x86/kvm/x86.c` `kvm_vcpu_ioctl_x86_get_debugregs`,
//!   `kvm_vcpu_ioctl_x86_set_debugregs`, `kvm_vcpu_reset`, `kvm_deliver_exception_payload`;
//!   `arch/x86/kvm/x86.h` `kvm_dr6_valid`, `kvm_dr7_valid`.
//!
//! # The rules (every failure is `EINVAL`, and a failed set changes nothing)
//!
//! 1. `flags` must be 0 (any bit, e.g. 1, 0x80 or bit 63).
//! 2. DR6 bits 63:32 must be 0.
//! 3. DR7 bits 63:32 must be 0.
//!
//! `reserved[]` is ignored on SET and reads back 0, like `flags`. DB0-DB3 take any 64-bit value
//! (non-canonical included). DR6 and DR7 are stored exactly as given: KVM does not force their
//! fixed-1 bits on this path, so DR6=0 and DR7=0 read back 0 (the device agrees).
//!
//! Reset (vCPU creation and INIT): DB0-DB3 = 0, DR6 = 0xffff0ff0, DR7 = 0x400.
//!
//! The device and the simulator agree on every probed case.

use crate::errno::{Errno, Result};
use crate::uaccess::{read_struct, write_struct, UserAccess};
use crate::uapi::{self, kvm_debugregs};

use super::Vcpu;

/// DR6's architectural reset value: its fixed-1 bits and its active-low bits (`DR6_ACTIVE_LOW`).
pub const DR6_ACTIVE_LOW: u64 = 0xffff_0ff0;
/// DR6 B0-B3, the breakpoint-condition bits (`DR_TRAP_BITS`).
pub const DR6_TRAP_BITS: u64 = 0xf;
/// DR6 bit 12: reserved in DR6, "enabled breakpoint" in a #DB payload.
pub const DR6_BIT12: u64 = 1 << 12;
/// DR7's reset value: its fixed-1 bit 10 (`DR7_FIXED_1`).
pub const DR7_FIXED_1: u64 = 0x400;

/// The debug registers userspace sees through KVM_GET/SET_DEBUGREGS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DebugRegs {
    pub db: [u64; 4],
    pub dr6: u64,
    pub dr7: u64,
}

impl Default for DebugRegs {
    /// The reset (and INIT) values.
    fn default() -> Self {
        DebugRegs {
            db: [0; 4],
            dr6: DR6_ACTIVE_LOW,
            dr7: DR7_FIXED_1,
        }
    }
}

/// `kvm_dr6_valid` / `kvm_dr7_valid`: no bit above 31.
pub fn dr_valid(v: u64) -> bool {
    v >> 32 == 0
}

/// The checks of KVM_SET_DEBUGREGS, in the kernel's order (all EINVAL).
pub fn check_set(new: &kvm_debugregs) -> Result<()> {
    if new.flags != 0 || !dr_valid(new.dr6) || !dr_valid(new.dr7) {
        return Err(Errno::EINVAL);
    }
    Ok(())
}

/// KVM_SET_DEBUGREGS on `state`: unchanged on error.
pub fn set(state: &mut DebugRegs, new: &kvm_debugregs) -> Result<()> {
    check_set(new)?;
    state.db = new.db;
    state.dr6 = new.dr6;
    state.dr7 = new.dr7;
    Ok(())
}

/// KVM_GET_DEBUGREGS: the registers, `flags` and `reserved[]` zero.
pub fn get(state: &DebugRegs) -> kvm_debugregs {
    kvm_debugregs {
        db: state.db,
        dr6: state.dr6,
        dr7: state.dr7,
        ..Default::default()
    }
}

/// How a pending #DB's payload lands in DR6 when KVM delivers it (`kvm_deliver_exception_payload`):
/// B0-B3 are cleared, the fixed-1/active-low bits set, the payload's bits set, the active-low
/// bits the payload names cleared (the payload has them active-high), and bit 12 cleared.
pub fn apply_db_payload(dr6: u64, payload: u64) -> u64 {
    let mut v = dr6 & !DR6_TRAP_BITS;
    v |= DR6_ACTIVE_LOW;
    v |= payload;
    v ^= payload & DR6_ACTIVE_LOW;
    v & !DR6_BIT12
}

/// vCPU ioctls of this module; None if `request` is not one of them.
pub fn ioctl(vcpu: &Vcpu, request: u64, arg: u64, ua: &mut dyn UserAccess) -> Option<Result<i64>> {
    match request {
        uapi::KVM_GET_DEBUGREGS => Some(get_ioctl(vcpu, arg, ua)),
        uapi::KVM_SET_DEBUGREGS => Some(set_ioctl(vcpu, arg, ua)),
        _ => None,
    }
}

fn get_ioctl(vcpu: &Vcpu, arg: u64, ua: &mut dyn UserAccess) -> Result<i64> {
    let d = get(&vcpu.state().debugregs);
    write_struct(ua, arg, &d)?;
    Ok(0)
}

fn set_ioctl(vcpu: &Vcpu, arg: u64, ua: &mut dyn UserAccess) -> Result<i64> {
    let d: kvm_debugregs = read_struct(ua, arg)?;
    set(&mut vcpu.state().debugregs, &d)?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs(db: [u64; 4], dr6: u64, dr7: u64) -> kvm_debugregs {
        kvm_debugregs {
            db,
            dr6,
            dr7,
            ..Default::default()
        }
    }

    #[test]
    fn reset_values() {
        let r = get(&DebugRegs::default());
        assert_eq!(
            (r.db, r.dr6, r.dr7, r.flags),
            ([0; 4], 0xffff_0ff0, 0x400, 0)
        );
        assert_eq!(r.reserved, [0; 9]);
    }

    #[test]
    fn round_trip_breakpoint() {
        // Device: db0=0x1234 with dr7=0x401 reads back.
        let mut s = DebugRegs::default();
        set(&mut s, &regs([0x1234, 0, 0, 0], 0xffff_0ff0, 0x401)).unwrap();
        let r = get(&s);
        assert_eq!((r.db[0], r.dr6, r.dr7), (0x1234, 0xffff_0ff0, 0x401));
    }

    #[test]
    fn any_db_value() {
        let db = [u64::MAX, 1 << 63, 0x8_0000_0000_0000, 0xffff_8000_0000_0000];
        let mut s = DebugRegs::default();
        set(&mut s, &regs(db, 0xffff_0ff0, 0x400)).unwrap();
        assert_eq!(get(&s).db, db);
    }

    #[test]
    fn flags_einval() {
        for flags in [1u64, 0x80, 1 << 63] {
            let mut s = DebugRegs::default();
            let mut d = regs([7; 4], 0, 0);
            d.flags = flags;
            assert_eq!(set(&mut s, &d), Err(Errno::EINVAL), "flags {flags:#x}");
            assert_eq!(s, DebugRegs::default(), "a failed set changes nothing");
        }
    }

    #[test]
    fn dr6_high_bits_einval() {
        for bit in [32, 40, 63] {
            let mut s = DebugRegs::default();
            assert_eq!(
                set(&mut s, &regs([0; 4], 1 << bit, 0x400)),
                Err(Errno::EINVAL)
            );
            assert_eq!(s, DebugRegs::default());
        }
    }

    #[test]
    fn dr7_high_bits_einval() {
        for bit in [32, 48, 63] {
            let mut s = DebugRegs::default();
            assert_eq!(
                set(&mut s, &regs([0; 4], 0xffff_0ff0, 1 << bit)),
                Err(Errno::EINVAL)
            );
        }
    }

    #[test]
    fn no_fixed_bits_forced() {
        // Device: dr6=0, dr7=0 read back 0; 0xffffffff reads back as is.
        let mut s = DebugRegs::default();
        set(&mut s, &regs([0; 4], 0, 0)).unwrap();
        assert_eq!((get(&s).dr6, get(&s).dr7), (0, 0));
        set(&mut s, &regs([0; 4], 0xffff_ffff, 0xffff_ffff)).unwrap();
        assert_eq!((get(&s).dr6, get(&s).dr7), (0xffff_ffff, 0xffff_ffff));
        set(&mut s, &regs([0; 4], 0x1234, 0xabcd)).unwrap();
        assert_eq!((get(&s).dr6, get(&s).dr7), (0x1234, 0xabcd));
    }

    #[test]
    fn reserved_ignored() {
        let mut s = DebugRegs::default();
        let mut d = regs([0; 4], 0xffff_0ff1, 0x400);
        d.reserved = [1, 2, 3, 4, 5, 6, 7, 8, 9];
        set(&mut s, &d).unwrap();
        let r = get(&s);
        assert_eq!((r.dr6, r.reserved), (0xffff_0ff1, [0; 9]));
    }

    #[test]
    fn dr_valid_edges() {
        assert!(dr_valid(0xffff_ffff));
        assert!(!dr_valid(0x1_0000_0000));
        assert!(dr_valid(0));
    }

    #[test]
    fn db_payload_into_dr6() {
        // Device: dr6 0xffff0ff0 + payload 0x4002 (BS, B1) -> 0xffff4ff2.
        assert_eq!(apply_db_payload(0xffff_0ff0, 0x4002), 0xffff_4ff2);
        // Device: dr6 0x1234f + payload 0x1f00f -> 0xfffeefff (RTM active-low cleared, bit 12
        // cleared, B0-B3 from the payload).
        assert_eq!(apply_db_payload(0x1_234f, 0x1_f00f), 0xfffe_efff);
        assert_eq!(apply_db_payload(0, 0), DR6_ACTIVE_LOW);
    }
}
