//! KVM_GET/SET_VCPU_EVENTS (api.txt 4.29, 4.30): pending and injected exception,
//! interrupt (with its shadow), NMI, SIPI vector, and their flags.
//! (stub: being written)

use crate::errno::Result;
use crate::uaccess::UserAccess;

use super::Vcpu;

/// The event state of one vCPU.
#[derive(Clone, Debug, Default)]
pub struct EventsState {}

/// vCPU ioctls of this module; None if `request` is not one of them.
pub fn ioctl(
    _vcpu: &Vcpu,
    _request: u64,
    _arg: u64,
    _ua: &mut dyn UserAccess,
) -> Option<Result<i64>> {
    None
}
