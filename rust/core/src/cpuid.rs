//! CPUID: KVM_GET_SUPPORTED_CPUID, KVM_SET_CPUID2, KVM_GET_CPUID2 and the KVM
//! leaves of cpuid.txt (KVM_CPUID_SIGNATURE, KVM_CPUID_FEATURES).
//! (stub: being written)

use crate::errno::Result;
use crate::uaccess::UserAccess;
use crate::vcpu::Vcpu;

/// System ioctls of this module; None if `request` is not one of them.
pub fn system_ioctl(_request: u64, _arg: u64, _ua: &mut dyn UserAccess) -> Option<Result<i64>> {
    None
}

/// vCPU ioctls of this module; None if `request` is not one of them.
pub fn vcpu_ioctl(
    _vcpu: &Vcpu,
    _request: u64,
    _arg: u64,
    _ua: &mut dyn UserAccess,
) -> Option<Result<i64>> {
    None
}
