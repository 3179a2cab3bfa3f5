//! Reserved bits of guest entries by mode, level and MAXPHYADDR
//! (mmu.c __reset_rsvds_bits_mask for the guest; kvm-mmu-semantics.md 1.3).

use super::{PagingMode, WalkCtx};

/// Bits lo..=hi.
pub const fn rsvd_bits(lo: u32, hi: u32) -> u64 {
    if hi < lo {
        0
    } else {
        (u64::MAX >> (63 - hi)) & !((1u64 << lo) - 1)
    }
}

/// `masks[bit7][level - 1]`: the reserved bits of an entry at `level`, by its bit 7.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RsvdMasks {
    pub masks: [[u64; 5]; 2],
}

impl RsvdMasks {
    pub fn new(ctx: &WalkCtx, mode: PagingMode) -> RsvdMasks {
        let mut m = [[0u64; 5]; 2];
        let maxphy = u32::from(ctx.maxphyaddr.clamp(12, 64));
        let pa_bits_rsvd = if maxphy >= 64 {
            0
        } else {
            rsvd_bits(maxphy, 63)
        };
        // Without EFER.NX, bit 63 (XD) is reserved in every 8-byte entry.
        let exb = if ctx.nx() { 0 } else { rsvd_bits(63, 63) };
        let gbpages_bit = if ctx.gbpages { 0 } else { rsvd_bits(7, 7) };
        match mode {
            PagingMode::None => {}
            PagingMode::Bits32 => {
                // No reserved bits in 4 KiB entries; with CR4.PSE, a 4 MiB PDE reserves
                // bits 21:17 (PSE-36: bits 16:13 are PA[35:32]).
                if ctx.pse() {
                    m[1][1] = rsvd_bits(17, 21);
                }
            }
            PagingMode::Pae => {
                let high = pa_bits_rsvd & rsvd_bits(0, 62);
                m[0][2] = rsvd_bits(63, 63) | high | rsvd_bits(5, 8) | rsvd_bits(1, 2);
                m[0][1] = exb | high;
                m[0][0] = exb | high;
                m[1][1] = exb | high | rsvd_bits(13, 20);
                m[1][0] = m[0][0];
                m[1][2] = m[0][2];
            }
            PagingMode::Long4 | PagingMode::Long5 => {
                let high = pa_bits_rsvd & rsvd_bits(0, 51);
                if mode == PagingMode::Long5 {
                    m[0][4] = exb | rsvd_bits(7, 7) | high;
                    m[1][4] = m[0][4];
                }
                m[0][3] = exb | rsvd_bits(7, 7) | high;
                m[0][2] = exb | gbpages_bit | high;
                m[0][1] = exb | high;
                m[0][0] = exb | high;
                m[1][3] = m[0][3];
                m[1][2] = exb | gbpages_bit | high | rsvd_bits(13, 29);
                m[1][1] = exb | high | rsvd_bits(13, 20);
                m[1][0] = m[0][0];
            }
        }
        RsvdMasks { masks: m }
    }

    /// Reserved bits set in `gpte` at `level`?
    #[inline]
    pub fn is_set(&self, gpte: u64, level: u8) -> bool {
        let bit7 = ((gpte >> 7) & 1) as usize;
        gpte & self.masks[bit7][usize::from(level) - 1] != 0
    }
}

/// PAE PDPTE validity at load time (load_pdptrs): P=1 entries must not set bits 1-2,
/// 5-8 or bits at or above MAXPHYADDR (bit 63 included).
pub fn pdpte_valid(pdpte: u64, maxphyaddr: u8) -> bool {
    let maxphy = u32::from(maxphyaddr.clamp(12, 64));
    let high = if maxphy >= 64 {
        0
    } else {
        rsvd_bits(maxphy, 63)
    };
    pdpte & 1 == 0 || pdpte & (high | rsvd_bits(5, 8) | rsvd_bits(1, 2)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_follow_the_table() {
        assert_eq!(rsvd_bits(13, 20), 0x1f_e000);
        assert_eq!(rsvd_bits(63, 63), 1 << 63);
        let lm = WalkCtx {
            cr0: 1 << 31,
            cr4: 1 << 5,
            efer: 0xd00,
            maxphyaddr: 48,
            ..Default::default()
        };
        let r = RsvdMasks::new(&lm, PagingMode::Long4);
        assert!(r.is_set(1 << 51, 1));
        assert!(
            !r.is_set(1 << 52, 1),
            "bits 52-62 are ignored in 4-level paging"
        );
        assert!(!r.is_set(1 << 63, 1), "NX with EFER.NXE");
        assert!(r.is_set(0x80, 4), "PML4E.PS");
        assert!(r.is_set(0x80, 3), "1 GiB without gbpages");
        assert!(r.is_set(0x80 | 1 << 13, 2));
        assert!(!r.is_set(0x80 | 1 << 21, 2));
        let nonx = WalkCtx { efer: 0x500, ..lm };
        assert!(RsvdMasks::new(&nonx, PagingMode::Long4).is_set(1 << 63, 1));
        let pae = WalkCtx { efer: 0x800, ..lm };
        assert!(
            RsvdMasks::new(&pae, PagingMode::Pae).is_set(1 << 52, 1),
            "PAE reserves 52-62"
        );
        assert!(pdpte_valid(0x1001, 48));
        assert!(!pdpte_valid(0x1003, 48));
        assert!(
            !pdpte_valid(0x1003, 48),
            "bit 1 is reserved in a present PDPTE"
        );
        assert!(
            pdpte_valid(0x1002, 48),
            "a non-present PDPTE is not checked"
        );
    }
}
