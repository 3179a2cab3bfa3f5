//! Shadow-page roles: KVM's `union kvm_mmu_page_role` word, the vCPU's `kvm_cpu_role`,
//! and how roots and children get their roles (mmu.c kvm_calc_cpu_role,
//! kvm_init_shadow_mmu, mmu_alloc_root, kvm_mmu_child_role,
//! kvm_calc_tdp_mmu_root_page_role).
//!
//! A shadow page is reused only for the same gfn and an identical role word, so the
//! word holds every piece of guest state that changes what the page's SPTEs must say.

use std::fmt;

use crate::paging::{WalkCtx, ACC_ALL};

/// 2-level 32-bit guest tables (PT32_ROOT_LEVEL); also the level of each PAE root PD.
pub const PT32_ROOT_LEVEL: u8 = 2;
/// PAE (PT32E_ROOT_LEVEL): what KVM shadows every non-64-bit guest with.
pub const PT32E_ROOT_LEVEL: u8 = 3;
pub const PT64_ROOT_4LEVEL: u8 = 4;
pub const PT64_ROOT_5LEVEL: u8 = 5;

/// KVM's `union kvm_mmu_page_role`, bit-exact (LSB first): level 0-3,
/// has_4_byte_gpte 4, quadrant 5-6, direct 7, access 8-10, invalid 11, efer_nx 12,
/// cr0_wp 13, smep_andnot_wp 14, smap_andnot_wp 15, ad_disabled 16, guest_mode 17,
/// passthrough 18, is_mirror 19 (TDX, since v6.14), smm 24-31 (the address-space id).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Role(pub u32);

const LEVEL: (u32, u32) = (0, 4);
const QUADRANT: (u32, u32) = (5, 2);
const ACCESS: (u32, u32) = (8, 3);
const SMM: (u32, u32) = (24, 8);

impl Role {
    #[inline]
    const fn get(self, (shift, width): (u32, u32)) -> u32 {
        (self.0 >> shift) & ((1 << width) - 1)
    }

    #[inline]
    const fn set(self, (shift, width): (u32, u32), v: u32) -> Role {
        let mask = ((1 << width) - 1) << shift;
        Role((self.0 & !mask) | ((v << shift) & mask))
    }

    /// The raw word (what the hash lookup compares).
    #[inline]
    pub const fn word(self) -> u32 {
        self.0
    }

    /// 1 = the page holds 4 KiB SPTEs, 2 = 2 MiB, ... 5.
    #[inline]
    pub const fn level(self) -> u8 {
        self.get(LEVEL) as u8
    }

    /// Which part of a 4-byte-gpte guest table this page shadows (0-3).
    #[inline]
    pub const fn quadrant(self) -> u8 {
        self.get(QUADRANT) as u8
    }

    /// ACC_* bits inherited from the parent gptes.
    #[inline]
    pub const fn access(self) -> u8 {
        self.get(ACCESS) as u8
    }

    /// The address-space id (1 for SMM memslots).
    #[inline]
    pub const fn smm(self) -> u8 {
        self.get(SMM) as u8
    }

    #[inline]
    #[must_use]
    pub const fn with_level(self, level: u8) -> Role {
        self.set(LEVEL, level as u32)
    }

    #[inline]
    #[must_use]
    pub const fn with_quadrant(self, quadrant: u8) -> Role {
        self.set(QUADRANT, quadrant as u32)
    }

    #[inline]
    #[must_use]
    pub const fn with_access(self, access: u8) -> Role {
        self.set(ACCESS, access as u32)
    }

    #[inline]
    #[must_use]
    pub const fn with_smm(self, smm: u8) -> Role {
        self.set(SMM, smm as u32)
    }

    /// The page shadows a guest table (sp_has_gptes): it is write-tracked and its
    /// SPTEs are synced from gptes. Direct and passthrough pages have none.
    #[inline]
    pub const fn has_gptes(self) -> bool {
        !self.direct() && !self.passthrough()
    }
}

macro_rules! role_flags {
    ($($(#[$doc:meta])* $bit:literal $get:ident $with:ident;)*) => {
        impl Role {
            $(
                $(#[$doc])*
                #[inline]
                pub const fn $get(self) -> bool {
                    self.0 & (1 << $bit) != 0
                }

                #[inline]
                #[must_use]
                pub const fn $with(self, v: bool) -> Role {
                    Role((self.0 & !(1 << $bit)) | ((v as u32) << $bit))
                }
            )*
        }
    };
}

role_flags! {
    /// Shadows 32-bit (non-PAE) guest tables.
    4 has_4_byte_gpte with_has_4_byte_gpte;
    /// Maps a linear gfn range; no guest table behind it.
    7 direct with_direct;
    /// Zapped while still a root; freed when the last user drops it.
    11 invalid with_invalid;
    12 efer_nx with_efer_nx;
    13 cr0_wp with_cr0_wp;
    /// CR4.SMEP && !CR0.WP: supervisor writes to user pages need distinct SPTEs.
    14 smep_andnot_wp with_smep_andnot_wp;
    15 smap_andnot_wp with_smap_andnot_wp;
    16 ad_disabled with_ad_disabled;
    /// L2 (nested) page.
    17 guest_mode with_guest_mode;
    /// A 5-level root over a 4-level guest (nested NPT only).
    18 passthrough with_passthrough;
    /// TDX mirror page (TDP MMU only); always 0 here.
    19 is_mirror with_is_mirror;
}

impl fmt::Debug for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Role")
            .field("word", &format_args!("{:#x}", self.0))
            .field("level", &self.level())
            .field("has_4_byte_gpte", &self.has_4_byte_gpte())
            .field("quadrant", &self.quadrant())
            .field("direct", &self.direct())
            .field("access", &format_args!("{:#o}", self.access()))
            .field("invalid", &self.invalid())
            .field("efer_nx", &self.efer_nx())
            .field("cr0_wp", &self.cr0_wp())
            .field("smep_andnot_wp", &self.smep_andnot_wp())
            .field("smap_andnot_wp", &self.smap_andnot_wp())
            .field("ad_disabled", &self.ad_disabled())
            .field("guest_mode", &self.guest_mode())
            .field("passthrough", &self.passthrough())
            .field("is_mirror", &self.is_mirror())
            .field("smm", &self.smm())
            .finish()
    }
}

/// KVM's `union kvm_cpu_role`: the page-role view of the guest's paging state
/// (`base`, with level = guest root level, 0 without paging) plus the extended role,
/// which holds state that only the software walker needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CpuRole {
    pub base: Role,
    /// Set once computed, so an all-zero role never matches.
    pub valid: bool,
    /// Nested EPT only; always false here.
    pub execonly: bool,
    pub cr4_pse: bool,
    /// CR4.PKE, and only in long mode.
    pub cr4_pke: bool,
    pub cr4_smap: bool,
    pub cr4_smep: bool,
    /// CR4.LA57, and only in long mode.
    pub cr4_la57: bool,
    pub efer_lma: bool,
}

impl CpuRole {
    /// kvm_calc_cpu_role for the state in `ctx` (not nested: guest_mode = 0).
    /// Without paging only access, smm, direct and valid are set.
    pub fn calc(ctx: &WalkCtx, smm: bool) -> CpuRole {
        let mode = ctx.mode();
        let mut base = Role::default().with_access(ACC_ALL).with_smm(smm as u8);
        if mode.root_level() == 0 {
            return CpuRole {
                base: base.with_direct(true),
                valid: true,
                ..CpuRole::default()
            };
        }
        let lma = mode.is_long();
        base = base
            .with_level(mode.root_level())
            .with_efer_nx(ctx.nx())
            .with_cr0_wp(ctx.wp())
            .with_smep_andnot_wp(ctx.smep() && !ctx.wp())
            .with_smap_andnot_wp(ctx.smap() && !ctx.wp())
            .with_has_4_byte_gpte(mode.root_level() == PT32_ROOT_LEVEL);
        CpuRole {
            base,
            valid: true,
            execonly: false,
            cr4_pse: ctx.pse(),
            cr4_pke: ctx.pke(),
            cr4_smap: ctx.smap(),
            cr4_smep: ctx.smep(),
            cr4_la57: lma && mode.root_level() == PT64_ROOT_5LEVEL,
            efer_lma: lma,
        }
    }

    /// The `kvm_mmu_extended_role` word: valid 0, execonly 1, cr4_pse 2, cr4_pke 3,
    /// cr4_smap 4, cr4_smep 5, cr4_la57 6, efer_lma 7.
    pub fn ext_word(&self) -> u32 {
        [
            self.valid,
            self.execonly,
            self.cr4_pse,
            self.cr4_pke,
            self.cr4_smap,
            self.cr4_smep,
            self.cr4_la57,
            self.efer_lma,
        ]
        .iter()
        .enumerate()
        .fold(0, |w, (i, &b)| w | (u32::from(b) << i))
    }

    /// `as_u64`: what decides whether the MMU context must be rebuilt.
    pub fn as_u64(&self) -> u64 {
        u64::from(self.base.word()) | (u64::from(self.ext_word()) << 32)
    }
}

/// The root role of the shadow MMU (kvm_init_shadow_mmu): the guest's base role with
/// PAE tables for every non-64-bit guest (so a 2-level guest and a guest without
/// paging get level 3), and EFER.NX forced on because KVM itself uses NX in SPTEs.
/// Without paging the role stays direct. Passthrough is never set (nested NPT only).
pub fn shadow_root_role(cpu: &CpuRole) -> Role {
    cpu.base
        .with_level(cpu.base.level().max(PT32E_ROOT_LEVEL))
        .with_efer_nx(true)
}

/// The role of PAE root PD `i` (of 4) under a level-3 root (mmu_alloc_root from
/// mmu_alloc_shadow_roots / mmu_alloc_direct_roots). A 2-level guest's single PD maps
/// 4 GiB with 4-byte entries, so root `i` shadows its quarter `i` (`VA[31:30]` = i);
/// a PAE guest's PDPTE `i` names a whole PD, so quadrant 0; direct roots use quadrant 0.
pub fn pae_root_role(root: Role, i: usize) -> Role {
    debug_assert!(i < 4);
    let quadrant = if root.has_4_byte_gpte() { i as u8 } else { 0 };
    root.with_level(PT32_ROOT_LEVEL).with_quadrant(quadrant)
}

/// Which PAE root PD translates `gva` (`VA[31:30]`).
#[inline]
pub fn pae_root_index(gva: u64) -> usize {
    ((gva >> 30) & 3) as usize
}

/// The quadrant of the 4-byte-gpte shadow page at `level` that translates `gva`:
/// a 10-bit guest index is wider than the 9-bit shadow index by one bit per level,
/// so level 1 takes `VA[21]` and level 2 takes `VA[31:30]`.
#[inline]
pub fn quadrant(gva: u64, level: u8) -> u8 {
    let level = u32::from(level);
    let q = gva >> (12 + 9 * level);
    (q & ((1 << level) - 1)) as u8
}

/// kvm_mmu_child_role: the role of the page linked from SPTE `parent_spte_index` of
/// a page with role `parent`. Only level, access and direct change (passthrough is
/// cleared). With 4-byte gptes the child is a level-1 page shadowing half of a 4 MiB
/// guest PT: the parent PDE's index bit 0 is `VA[21]`, which names that half.
pub fn child_role(parent: Role, parent_spte_index: usize, direct: bool, access: u8) -> Role {
    let mut role = parent
        .with_level(parent.level() - 1)
        .with_access(access)
        .with_direct(direct)
        .with_passthrough(false);
    if role.has_4_byte_gpte() {
        debug_assert_eq!(role.level(), 1);
        role = role.with_quadrant((parent_spte_index & 1) as u8);
    }
    role
}

/// kvm_calc_tdp_mmu_root_page_role (the direct, TDP MMU): full access, CR0.WP and
/// EFER.NX set, direct, 8-byte entries; smm and guest_mode are the caller's
/// (`with_smm`). `ad_disabled` is !kvm_ad_enabled (EPT without A/D bits).
pub fn tdp_root_role(level: u8, ad_disabled: bool) -> Role {
    Role::default()
        .with_access(ACC_ALL)
        .with_cr0_wp(true)
        .with_efer_nx(true)
        .with_ad_disabled(ad_disabled)
        .with_level(level)
        .with_direct(true)
}

/// kvm_mmu_get_tdp_level without a forced root level: 5-level TDP only when the host
/// has it and the guest can address more than 48 bits.
pub fn tdp_level(max_tdp_level: u8, guest_maxphyaddr: u8) -> u8 {
    if max_tdp_level == PT64_ROOT_5LEVEL && guest_maxphyaddr <= 48 {
        PT64_ROOT_4LEVEL
    } else {
        max_tdp_level
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paging::{ACC_EXEC, ACC_USER, ACC_WRITE};
    use crate::vcpu::sregs::{
        CR0_PE, CR0_PG, CR0_WP, CR4_LA57, CR4_PAE, CR4_PKE, CR4_PSE, CR4_SMAP, CR4_SMEP, EFER_LMA,
        EFER_LME, EFER_NXE,
    };

    fn ctx(cr0: u64, cr4: u64, efer: u64) -> WalkCtx {
        WalkCtx {
            cr0: CR0_PE | cr0,
            cr4,
            efer,
            ..WalkCtx::default()
        }
    }

    fn long4(wp: bool) -> WalkCtx {
        let wp = if wp { CR0_WP } else { 0 };
        ctx(CR0_PG | wp, CR4_PAE, EFER_LME | EFER_LMA | EFER_NXE)
    }

    fn bits32() -> WalkCtx {
        ctx(CR0_PG | CR0_WP, CR4_PSE, 0)
    }

    #[test]
    fn every_field_round_trips_at_its_bit() {
        type Flag = (fn(Role) -> bool, fn(Role, bool) -> Role, u32);
        let flags: [Flag; 11] = [
            (Role::has_4_byte_gpte, Role::with_has_4_byte_gpte, 4),
            (Role::direct, Role::with_direct, 7),
            (Role::invalid, Role::with_invalid, 11),
            (Role::efer_nx, Role::with_efer_nx, 12),
            (Role::cr0_wp, Role::with_cr0_wp, 13),
            (Role::smep_andnot_wp, Role::with_smep_andnot_wp, 14),
            (Role::smap_andnot_wp, Role::with_smap_andnot_wp, 15),
            (Role::ad_disabled, Role::with_ad_disabled, 16),
            (Role::guest_mode, Role::with_guest_mode, 17),
            (Role::passthrough, Role::with_passthrough, 18),
            (Role::is_mirror, Role::with_is_mirror, 19),
        ];
        for (get, with, bit) in flags {
            let r = with(Role::default(), true);
            assert_eq!(r.word(), 1 << bit);
            assert!(get(r));
            // Clearing leaves every other bit alone.
            assert_eq!(with(Role(u32::MAX), false).word(), !(1 << bit));
            assert!(!get(with(Role(u32::MAX), false)));
        }
        for level in 0..16 {
            let r = Role::default().with_level(level);
            assert_eq!((r.level(), r.word()), (level, u32::from(level)));
        }
        for q in 0..4 {
            let r = Role(u32::MAX).with_quadrant(q);
            assert_eq!(r.quadrant(), q);
            assert_eq!(r.word(), !(3 << 5) | (u32::from(q) << 5));
        }
        for a in 0..8 {
            assert_eq!(Role::default().with_access(a).word(), u32::from(a) << 8);
            assert_eq!(Role(u32::MAX).with_access(a).access(), a);
        }
        for s in [0u8, 1, 0xff] {
            assert_eq!(Role::default().with_smm(s).word(), u32::from(s) << 24);
            assert_eq!(Role(u32::MAX).with_smm(s).smm(), s);
        }
        // Out-of-range values are truncated to the field, never spill over.
        assert_eq!(Role::default().with_quadrant(7).word(), 3 << 5);
    }

    #[test]
    fn debug_names_the_fields() {
        let s = format!("{:?}", Role::default().with_level(4).with_cr0_wp(true));
        assert!(s.contains("level: 4"), "{s}");
        assert!(s.contains("cr0_wp: true"), "{s}");
        assert!(s.contains("word: 0x2004"), "{s}");
    }

    #[test]
    fn four_level_guest_root_and_children() {
        let cpu = CpuRole::calc(&long4(true), false);
        assert_eq!(cpu.base.level(), 4);
        assert!(!cpu.base.has_4_byte_gpte() && !cpu.base.direct());
        assert!(cpu.efer_lma && cpu.valid && !cpu.cr4_la57);

        let root = shadow_root_role(&cpu);
        assert_eq!(root.level(), 4);
        assert!(root.efer_nx() && root.cr0_wp() && root.has_gptes());
        assert_eq!(root.access(), ACC_ALL);
        // level 4 | access 7 | efer_nx | cr0_wp
        assert_eq!(root.word(), 0x3704);

        let pdpt = child_role(root, 17, false, ACC_WRITE | ACC_USER);
        assert_eq!(pdpt.level(), 3);
        assert_eq!(pdpt.access(), ACC_WRITE | ACC_USER);
        assert_eq!(pdpt.quadrant(), 0, "8-byte gptes never use quadrants");
        let pd = child_role(pdpt, 1, false, ACC_ALL);
        // A 2 MiB guest page is shadowed by a direct level-1 page.
        let pt = child_role(pd, 3, true, ACC_EXEC);
        assert_eq!((pt.level(), pt.direct(), pt.has_gptes()), (1, true, false));
        assert_eq!(
            pt.word() & !0x7ff,
            root.word() & !0x7ff,
            "mode bits are inherited"
        );
    }

    #[test]
    fn child_role_clears_passthrough() {
        let root = Role::default().with_level(5).with_passthrough(true);
        let child = child_role(root, 0, false, ACC_ALL);
        assert!(!child.passthrough());
        assert_eq!(child.level(), 4);
    }

    #[test]
    fn five_level_and_pae_guests() {
        let la57 = ctx(CR0_PG | CR0_WP, CR4_PAE | CR4_LA57, EFER_LME | EFER_LMA);
        let cpu = CpuRole::calc(&la57, false);
        assert_eq!(shadow_root_role(&cpu).level(), 5);
        assert!(cpu.cr4_la57);

        let pae = ctx(CR0_PG | CR0_WP, CR4_PAE | CR4_LA57 | CR4_PKE, 0);
        let cpu = CpuRole::calc(&pae, false);
        assert_eq!(cpu.base.level(), 3);
        // LA57 and PKE count only in long mode.
        assert!(!cpu.cr4_la57 && !cpu.cr4_pke && !cpu.efer_lma);
        let root = shadow_root_role(&cpu);
        assert_eq!(root.level(), 3);
        for i in 0..4 {
            let r = pae_root_role(root, i);
            assert_eq!((r.level(), r.quadrant()), (2, 0), "one guest PD per PDPTE");
        }
    }

    #[test]
    fn thirty_two_bit_guest_roots_have_quadrants() {
        let cpu = CpuRole::calc(&bits32(), false);
        assert_eq!(cpu.base.level(), 2);
        assert!(cpu.base.has_4_byte_gpte() && cpu.cr4_pse);
        assert!(!cpu.base.efer_nx());

        let root = shadow_root_role(&cpu);
        assert_eq!(root.level(), PT32E_ROOT_LEVEL, "shadowed with PAE tables");
        assert!(root.efer_nx(), "KVM forces NX in the shadow root role");

        let gvas = [0x0000_1000u64, 0x4000_0000, 0x8000_0000, 0xc012_3000];
        for (i, gva) in gvas.into_iter().enumerate() {
            assert_eq!(pae_root_index(gva), i);
            let r = pae_root_role(root, pae_root_index(gva));
            assert_eq!((r.level(), r.quadrant()), (2, i as u8));
            assert_eq!(quadrant(gva, 2), i as u8);
        }
        // Four roots of one guest PD: same gfn, four distinct role words.
        let words: std::collections::HashSet<u32> =
            (0..4).map(|i| pae_root_role(root, i).word()).collect();
        assert_eq!(words.len(), 4);
    }

    #[test]
    fn thirty_two_bit_level1_children_take_va_bit_21() {
        let root = shadow_root_role(&CpuRole::calc(&bits32(), false));
        for gva in [0u64, 0x20_0000, 0x40_0000, 0x7fe0_0000, 0xffff_f000] {
            let pd = pae_root_role(root, pae_root_index(gva));
            // The shadow PDE index within the PAE PD: VA[29:21].
            let index = ((gva >> 21) & 0x1ff) as usize;
            let pt = child_role(pd, index, false, ACC_ALL);
            assert_eq!(pt.level(), 1);
            assert_eq!(pt.quadrant(), (index & 1) as u8);
            assert_eq!(pt.quadrant(), quadrant(gva, 1));
            assert_eq!(pt.quadrant(), ((gva >> 21) & 1) as u8);
        }
        // A 4 MiB guest page is two direct 2 MiB halves, still told apart by quadrant.
        let pd = pae_root_role(root, 0);
        let lo = child_role(pd, 4, true, ACC_ALL);
        let hi = child_role(pd, 5, true, ACC_ALL);
        assert_ne!(lo.word(), hi.word());
    }

    #[test]
    fn cr0_wp_smep_smap_shape_the_role() {
        let wp1 = CpuRole::calc(&long4(true), false).base;
        let wp0 = CpuRole::calc(&long4(false), false).base;
        assert!(wp1.cr0_wp() && !wp0.cr0_wp());
        assert_eq!(wp1.word() ^ wp0.word(), 1 << 13);

        let mut c = long4(false);
        c.cr4 |= CR4_SMEP | CR4_SMAP;
        let r = CpuRole::calc(&c, false);
        assert!(r.base.smep_andnot_wp() && r.base.smap_andnot_wp());
        assert!(r.cr4_smep && r.cr4_smap);

        // With CR0.WP=1 SMEP/SMAP leave the page role alone (only the ext role differs).
        c.cr0 |= CR0_WP;
        let r = CpuRole::calc(&c, false);
        assert_eq!(r.base, wp1);
        assert!(r.cr4_smep && r.cr4_smap);
        assert_ne!(r.as_u64(), CpuRole::calc(&long4(true), false).as_u64());
    }

    #[test]
    fn efer_nx_is_in_the_cpu_role_but_forced_in_the_root() {
        let mut c = long4(true);
        c.efer &= !EFER_NXE;
        let cpu = CpuRole::calc(&c, false);
        assert!(!cpu.base.efer_nx());
        assert!(shadow_root_role(&cpu).efer_nx());
        assert_eq!(
            shadow_root_role(&cpu),
            shadow_root_role(&CpuRole::calc(&long4(true), false))
        );
    }

    #[test]
    fn paging_off_is_direct() {
        let cpu = CpuRole::calc(&ctx(0, CR4_PAE | CR4_SMEP, EFER_NXE), true);
        assert!(cpu.base.direct() && cpu.valid);
        assert_eq!(cpu.base.level(), 0);
        // Nothing else of CR0/CR4/EFER reaches the role.
        assert!(!cpu.base.efer_nx() && !cpu.base.cr0_wp() && !cpu.cr4_smep);
        assert_eq!(cpu.base.smm(), 1);
        assert_eq!(cpu.ext_word(), 1);

        let root = shadow_root_role(&cpu);
        assert_eq!((root.level(), root.direct()), (3, true));
        assert!(!root.has_gptes() && !root.has_4_byte_gpte());
        for i in 0..4 {
            assert_eq!(pae_root_role(root, i).quadrant(), 0);
        }
    }

    #[test]
    fn ext_word_layout() {
        let mut c = long4(true);
        c.cr4 |= CR4_PSE | CR4_PKE | CR4_SMAP | CR4_SMEP;
        let cpu = CpuRole::calc(&c, false);
        // valid, cr4_pse, cr4_pke, cr4_smap, cr4_smep, efer_lma (no execonly, no la57)
        assert_eq!(cpu.ext_word(), 0b1011_1101);
        assert_eq!(cpu.as_u64() >> 32, 0b1011_1101);
        assert_eq!(cpu.as_u64() as u32, cpu.base.word());
    }

    #[test]
    fn tdp_root() {
        let r = tdp_root_role(4, false);
        assert_eq!(r.word(), 0x3784);
        assert!(r.direct() && !r.has_gptes());
        assert!(tdp_root_role(5, true).ad_disabled());
        assert_eq!(tdp_level(5, 48), 4);
        assert_eq!(tdp_level(5, 52), 5);
        assert_eq!(tdp_level(4, 52), 4);
    }
}
