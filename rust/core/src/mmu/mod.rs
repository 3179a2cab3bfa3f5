//! The shadow MMU's encodings: shadow-page roles and SPTEs (KVM's kvm_mmu_page_role and spte.h).

pub mod page_track;
pub mod rmap;
pub mod role;
pub mod shadow;
pub mod spte;
