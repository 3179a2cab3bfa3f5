//! The shadow MMU, split as Linux's arch/x86/kvm/mmu/: page roles (role), SPTEs
//! (spte), the reverse map (rmap), write tracking and huge-page permission
//! (page_track), shadow-page bookkeeping (shadow), the per-vCPU context and roots
//! (context), the fault path (fault, paging_tmpl), emulated page-table writes
//! (track_write) and the invariant audit (audit).

pub mod audit;
pub mod context;
pub mod dirty_log;
pub mod fault;
pub mod inspect;
pub mod notifier;
pub mod page_track;
pub mod paging_tmpl;
pub mod rmap;
pub mod role;
pub mod shadow;
pub mod spte;
pub mod track_write;
