//! Permission faults of a completed walk (mmu.c update_permission_bitmask and
//! update_pkru_bitmask, mmu.h permission_fault), written out rule by rule.

use super::{Access, WalkCtx, ACC_EXEC, ACC_USER, ACC_WRITE, PFERR_PK, PFERR_PRESENT};

/// The error code (P, maybe PK) if `access` may not use a translation with the
/// effective rights `pte_access` and protection key `pkey`; 0 if it may.
#[inline]
pub fn permission_fault(ctx: &WalkCtx, pte_access: u8, pkey: u8, access: Access) -> u32 {
    let user_access = access.user && !access.implicit;
    let w = pte_access & ACC_WRITE != 0;
    let u = pte_access & ACC_USER != 0;
    let x = pte_access & ACC_EXEC != 0;

    // Writes to read-only pages, except supervisor writes with CR0.WP=0.
    let mut fault = access.write && !w && (user_access || ctx.wp());
    // User accesses to supervisor pages.
    fault |= user_access && !u;
    // Fetches from no-execute pages (NX only exists with EFER.NXE).
    fault |= access.fetch && !x && ctx.nx();
    if !user_access && u {
        // SMEP: supervisor fetches from user pages, whatever CR0.WP says.
        fault |= ctx.smep() && access.fetch;
        // SMAP: supervisor data accesses to user pages, unless the access is explicit
        // and EFLAGS.AC=1.
        let smap_override = ctx.rflags_ac && !access.implicit;
        fault |= ctx.smap() && !access.fetch && !smap_override;
    }

    let mut errcode = PFERR_PRESENT;
    // Protection keys: data accesses to user pages, with CR4.PKE in long mode.
    if ctx.pke() && u && !access.fetch {
        let bits = (ctx.pkru >> (u32::from(pkey) * 2)) & 3;
        let access_disabled = bits & 1 != 0;
        let write_disabled = bits & 2 != 0;
        // PKRU.WD stops writes that are user accesses, or any write with CR0.WP=1.
        let write_checked = access.write && (user_access || ctx.wp());
        if access_disabled || (write_disabled && write_checked) {
            errcode |= PFERR_PK;
            fault = true;
        }
    }
    if fault {
        errcode
    } else {
        0
    }
}
