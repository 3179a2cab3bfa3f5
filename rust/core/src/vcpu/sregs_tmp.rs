use crate::errno::Result;
use kvm_bindings::{kvm_regs, kvm_sregs};
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuFeatures {}
pub fn reset_regs() -> kvm_regs {
    kvm_regs {
        rflags: 2,
        rip: 0xfff0,
        ..Default::default()
    }
}
pub fn reset_sregs() -> kvm_sregs {
    kvm_sregs::default()
}
pub fn check_sregs(_f: &CpuFeatures, _n: &kvm_sregs) -> Result<()> {
    Ok(())
}
pub fn apply_sregs(_f: &CpuFeatures, s: &mut kvm_sregs, n: &kvm_sregs) {
    *s = *n;
}
pub fn apply_regs(s: &mut kvm_regs, n: &kvm_regs) {
    *s = *n;
}
