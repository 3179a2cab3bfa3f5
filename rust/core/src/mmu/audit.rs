//! The MMU audit (mmu_audit.c's successor): every invariant of
//! reference/kvm-mmu-semantics.md that applies to the shadow MMU, over the VM's shadow
//! pages and the vCPUs' roots, plus the one that matters most: no leaf SPTE grants
//! more than the guest's gptes, the memslot and the host page allow.
//!
//! The gpte check assumes the guest's page tables change only through the guest
//! (writes that go through the MMU): like KVM, the model never resyncs a table the
//! host edits behind its back, so such an edit is not an MMU bug but shows here.

use super::context::{KvmMmu, RootHpa};
use super::page_track::PG_LEVEL_4K;
use super::rmap::kvm_pages_per_hpage;
use super::shadow::{Mmu, PageState, ShadowPage, SpIndex, NIL};
use super::spte::{check_mmio_generation, Spte, SPTE_ENT_PER_PAGE};
use crate::memslot::MemSlots;
use crate::paging::pte::{
    PT32_BASE_ADDR_MASK, PT64_BASE_ADDR_MASK, PT_ACCESSED, PT_DIRTY, PT_PAGE_SIZE, PT_PRESENT,
};
use crate::paging::walker::gpte_access;
use crate::paging::{GuestMem, ACC_EXEC, ACC_USER, ACC_WRITE};
use crate::stats::VmStat;

/// Audit the shadow MMU of a VM whose vCPU contexts are `vcpus`.
pub fn audit(mmu: &Mmu, slots: &MemSlots, vcpus: &[&KvmMmu]) -> Result<(), String> {
    mmu.check_invariants(slots)?;
    check_roots(mmu, vcpus)?;
    check_page_stats(mmu)?;
    for (idx, sp) in mmu.iter() {
        if sp.state() != PageState::Active && sp.state() != PageState::InvalidRoot {
            continue;
        }
        for i in 0..SPTE_ENT_PER_PAGE {
            let s = sp.spt[i];
            if s.is_mmio() {
                check_mmio(sp, s, slots).map_err(|e| format!("page {idx} SPTE {i}: {e}"))?;
                continue;
            }
            if !s.is_shadow_present() {
                continue;
            }
            let level = sp.role.level();
            if s.is_leaf(level) {
                check_leaf(mmu, sp, i, s, slots)
                    .map_err(|e| format!("page {idx} ({:#x}) leaf {i}: {e}", sp.gfn))?;
            }
            if sp.role.has_gptes() && !sp.role.invalid() && !(level == 1 && sp.unsync) {
                check_against_gpte(mmu, sp, i, s, slots).map_err(|e| {
                    format!("page {idx} ({:#x}, level {level}) SPTE {i}: {e}", sp.gfn)
                })?;
            }
        }
    }
    Ok(())
}

/// Invariant 14 and the root bookkeeping: every root reference a vCPU holds is
/// counted in its page's root_count, and nothing else is.
fn check_roots(mmu: &Mmu, vcpus: &[&KvmMmu]) -> Result<(), String> {
    let mut counts = std::collections::HashMap::<SpIndex, u32>::new();
    for ctx in vcpus {
        for (_, r) in ctx.roots() {
            let pages: Vec<SpIndex> = match r.hpa {
                RootHpa::Page(sp) => vec![sp],
                RootHpa::Pae(p) => p.into_iter().filter(|&s| s != NIL).collect(),
                _ => vec![],
            };
            for sp in pages {
                let page = mmu.get(sp);
                if !matches!(page.state(), PageState::Active | PageState::InvalidRoot) {
                    return Err(format!("a vCPU root names {:?} page {sp}", page.state()));
                }
                *counts.entry(sp).or_default() += 1;
            }
        }
    }
    for (idx, sp) in mmu.iter() {
        let held = counts.get(&idx).copied().unwrap_or(0);
        if sp.root_count != held {
            return Err(format!(
                "page {idx}: root_count {} but {held} vCPU references",
                sp.root_count
            ));
        }
    }
    Ok(())
}

/// Invariant 17: pages_4k/2m/1g count the present leaves of each size.
fn check_page_stats(mmu: &Mmu) -> Result<(), String> {
    let mut n = [0u64; 3];
    for (_, sp) in mmu.iter() {
        let level = sp.role.level();
        if level > 3 {
            continue;
        }
        n[usize::from(level) - 1] += sp
            .spt
            .iter()
            .filter(|s| s.is_shadow_present() && s.is_leaf(level))
            .count() as u64;
    }
    let stats = mmu.stats();
    for (k, stat) in [VmStat::Pages4k, VmStat::Pages2m, VmStat::Pages1g]
        .into_iter()
        .enumerate()
    {
        if stats.get(stat as usize) != n[k] {
            return Err(format!(
                "{stat:?} is {} but {} leaves exist",
                stats.get(stat as usize),
                n[k]
            ));
        }
    }
    Ok(())
}

/// Invariant 20: an MMIO SPTE of the current generation names a gfn without memory.
fn check_mmio(sp: &ShadowPage, s: Spte, slots: &MemSlots) -> Result<(), String> {
    if sp.role.level() != PG_LEVEL_4K {
        return Err("MMIO SPTE above level 1".into());
    }
    if check_mmio_generation(s, slots.generation()) && slots.lookup(s.mmio_gfn()).is_some() {
        return Err(format!(
            "current MMIO SPTE for gfn {:#x}, which has memory",
            s.mmio_gfn()
        ));
    }
    Ok(())
}

/// The host side of a leaf: its gfn is in a slot, its frame is that slot's host page
/// (huge: aligned, inside the slot, gpa and hva agree, no logging, allowed level),
/// and it is writable only if the slot is.
fn check_leaf(
    mmu: &Mmu,
    sp: &ShadowPage,
    i: usize,
    s: Spte,
    slots: &MemSlots,
) -> Result<(), String> {
    let level = sp.role.level();
    let gfn = sp.get_gfn(i);
    // Invariant 30: nothing maps a gfn whose host page is being invalidated (the
    // ranges themselves; their hull only blocks faults).
    let pages0 = kvm_pages_per_hpage(level);
    if mmu.invalidation_overlaps(gfn, gfn + pages0) {
        return Err(format!(
            "leaf over gfn {gfn:#x} during an invalidation of it"
        ));
    }
    let slot = slots
        .lookup(gfn)
        .ok_or_else(|| format!("maps gfn {gfn:#x} outside every memslot"))?;
    let pages = kvm_pages_per_hpage(level);
    if gfn & (pages - 1) != 0 {
        return Err(format!("level-{level} leaf for unaligned gfn {gfn:#x}"));
    }
    if level > 1 {
        if gfn + pages > slot.end_gfn() || gfn < slot.base_gfn {
            return Err("huge leaf sticks out of its memslot".into());
        }
        // Invariant 26: logging maps new leaves 4 KiB; huge ones from before it
        // started stay, write-protected, until a write splits them.
        if slot.dirty_logging() && s.is_writable() && !slots.dirty_policy.initially_set {
            return Err("writable huge leaf in a dirty-logged memslot".into());
        }
        if (gfn ^ (slot.gfn_to_hva(gfn) >> 12)) & (pages - 1) != 0 {
            return Err("huge leaf whose gpa and hva disagree in their low bits".into());
        }
        if mmu.slot_meta_for_gfn(gfn).is_some_and(|m| {
            (gfn..gfn + pages).any(|g| m.track.is_write_tracked(g)) && s.is_writable()
        }) {
            return Err("writable huge leaf over a write-tracked gfn".into());
        }
    }
    let (frame, host_writable) = slot.host.frame(slot.gfn_to_hva(gfn));
    if s.pfn() != frame {
        return Err(format!(
            "frame {:#x} is not the host page of gfn {gfn:#x} ({frame:#x})",
            s.pfn()
        ));
    }
    if s.is_host_writable() && !host_writable {
        return Err(format!(
            "host-writable leaf over gfn {gfn:#x}, which the host maps read-only"
        ));
    }
    if s.is_host_writable() && slot.readonly() {
        return Err("host-writable leaf in a read-only memslot".into());
    }
    // The no-loss rule of dirty logging (invariants 21-22): a page the guest can
    // write without a fault is already marked dirty, so its next harvest reports it.
    if let (true, Some(b)) = (s.is_writable(), &slot.dirty_bitmap) {
        if let Some(g) = (gfn..gfn + pages).find(|&g| !b.test(g - slot.base_gfn)) {
            return Err(format!(
                "writable leaf over gfn {g:#x}, which the dirty log does not show"
            ));
        }
    }
    Ok(())
}

/// The gpte behind SPTE `i` of a page with gptes: its gpa and whether it is 8 bytes.
fn gpte_of(sp: &ShadowPage, i: usize) -> (u64, usize) {
    let base = sp.gfn << 12;
    if !sp.role.has_4_byte_gpte() {
        return (base + 8 * i as u64, 8);
    }
    let q = u64::from(sp.role.quadrant());
    let index = match sp.role.level() {
        // Half `q` of a 1024-entry page table.
        1 => q * 512 + i as u64,
        // Quarter `q` of the page directory; two PAE PDEs per 4 MiB guest PDE.
        _ => q * 256 + (i as u64) / 2,
    };
    (base + 4 * index, 4)
}

/// The rights a SPTE may grant for this gpte below a page with `sp`'s role (the
/// accumulated rights, W only once dirty for a leaf; CR0.WP=0 lets supervisor-only
/// SPTEs be writable).
fn allowed(sp: &ShadowPage, gpte: u64, leaf: bool, spte: Spte) -> u8 {
    let wide = !sp.role.has_4_byte_gpte();
    let mut acc = sp.role.access() & gpte_access(gpte, wide);
    if leaf && gpte & PT_DIRTY == 0 {
        acc &= !ACC_WRITE;
    }
    if leaf && !sp.role.cr0_wp() && !spte.is_user() {
        acc |= ACC_WRITE;
    }
    acc
}

/// The core invariant for pages with gptes that are in sync with the guest: each
/// SPTE follows from the current gpte (present, accessed, same frame or table) and
/// grants no more than it (and the rights above it) allow.
fn check_against_gpte(
    mmu: &Mmu,
    sp: &ShadowPage,
    i: usize,
    s: Spte,
    slots: &MemSlots,
) -> Result<(), String> {
    let (gpa, size) = gpte_of(sp, i);
    let gpte = slots
        .read_gpte(gpa, size)
        .ok_or_else(|| format!("gpte at {gpa:#x} unreadable"))?;
    if gpte & PT_PRESENT == 0 {
        return Err(format!("gpte {gpte:#x} at {gpa:#x} is not present"));
    }
    let wide = size == 8;
    let frame = |v: u64| {
        if wide {
            (v & PT64_BASE_ADDR_MASK) >> 12
        } else {
            (v & PT32_BASE_ADDR_MASK) >> 12
        }
    };
    let level = sp.role.level();
    let mut big = level > 1 && gpte & PT_PAGE_SIZE != 0;
    // In 32-bit paging PDE.PS means a 4 MiB page only with CR4.PSE, which the page
    // role does not carry (KVM shares the page either way): the shadow structure
    // tells which reading built this SPTE.
    if big && !wide && !s.is_leaf(level) && !mmu.get(s.child_index()).role.direct() {
        big = false;
    }
    if s.is_leaf(level) || (big && s.is_shadow_present()) {
        if level > 1 && !big {
            return Err(format!(
                "huge SPTE for a gpte {gpte:#x} that is not a large page"
            ));
        }
        let gfn = if s.is_leaf(level) {
            sp.get_gfn(i)
        } else {
            mmu.get(s.child_index()).gfn
        };
        let guest_gfn = if level == 1 {
            frame(gpte)
        } else {
            // The guest's large page (4 MiB with 4-byte gptes, split in two 2 MiB halves).
            let size_gfns = if wide {
                kvm_pages_per_hpage(level)
            } else {
                1024
            };
            let base = if wide {
                frame(gpte)
            } else {
                guest_4m_base(gpte)
            };
            let base = base & !(size_gfns - 1);
            if gfn < base || gfn >= base + size_gfns {
                return Err(format!(
                    "maps gfn {gfn:#x} outside the guest's large page at {base:#x}"
                ));
            }
            gfn
        };
        if level == 1 && gfn != guest_gfn {
            return Err(format!(
                "maps gfn {gfn:#x} but the gpte {gpte:#x} says {guest_gfn:#x}"
            ));
        }
        // The walker cannot set A in a read-only slot (KVM skips entries that are not
        // pte_writable), so there the page is mapped with A still clear.
        if gpte & PT_ACCESSED == 0 && !slots.lookup(gpa >> 12).is_some_and(|s| s.readonly()) {
            return Err(format!("mapped although gpte {gpte:#x} has A=0"));
        }
        if s.is_leaf(level) {
            let grant = s.access();
            let may = allowed(sp, gpte, true, s);
            let extra = grant & !may;
            if extra & (ACC_WRITE | ACC_USER | ACC_EXEC) != 0 {
                return Err(format!(
                    "leaf grants {grant:#o} but gpte {gpte:#x} under access {:#o} allows {may:#o}",
                    sp.role.access()
                ));
            }
        } else {
            let child = mmu.get(s.child_index());
            if !child.role.direct() {
                return Err("a guest large page shadowed by an indirect page".into());
            }
            let may = allowed(sp, gpte, true, s);
            if child.role.access() & !may & (ACC_USER | ACC_EXEC) != 0 {
                return Err(format!(
                    "direct page access {:#o} exceeds {may:#o}",
                    child.role.access()
                ));
            }
        }
        return Ok(());
    }
    // A link to the shadow page of the next guest table.
    let child = mmu.get(s.child_index());
    if child.role.direct() {
        return Err(format!(
            "direct child under gpte {gpte:#x} that is not a large page"
        ));
    }
    if child.gfn != frame(gpte) {
        return Err(format!(
            "links table {:#x} but gpte {gpte:#x} names {:#x}",
            child.gfn,
            frame(gpte)
        ));
    }
    let want = sp.role.access() & gpte_access(gpte, wide);
    if child.role.access() != want {
        return Err(format!(
            "child access {:#o}, gpte gives {want:#o}",
            child.role.access()
        ));
    }
    Ok(())
}

/// The first gfn of a 4 MiB page from a 32-bit PDE (PSE-36 bits 13-16 are gpa 32-35).
fn guest_4m_base(pde: u64) -> u64 {
    ((pde & 0xffc0_0000) | (((pde >> 13) & 0xf) << 32)) >> 12
}
