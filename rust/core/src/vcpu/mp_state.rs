//! KVM_GET/SET_MP_STATE (api.txt 4.37, 4.38).
//! (stub: being written)

use crate::errno::Result;
use crate::uaccess::UserAccess;

use super::Vcpu;

/// vCPU ioctls of this module; None if `request` is not one of them.
pub fn ioctl(
    _vcpu: &Vcpu,
    _request: u64,
    _arg: u64,
    _ua: &mut dyn UserAccess,
) -> Option<Result<i64>> {
    None
}
