//! kvmmmu-core: a faithful, inspectable model of the x86 KVM MMU, behind a
//! software /dev/kvm that answers the real ioctl numbers with the real struct
//! layouts and errnos. Pure Rust, no Python.

pub mod cpuid;
pub mod dirty_log;
pub mod dirty_ring;
pub mod errno;
pub mod hostmem;
pub mod kvm;
pub mod memslot;
pub mod mmu;
pub mod paging;
pub mod stats;
pub mod testkit;
pub mod uaccess;
pub mod uapi;
pub mod vcpu;
pub mod vm;

pub use errno::{Errno, Result};
