//! Guest PTE formats: 4-byte (32-bit paging) and 8-byte (PAE, 4- and 5-level).
//! The walker is generic over them, as paging_tmpl.h is one template.

pub const PT_PRESENT: u64 = 1 << 0;
pub const PT_WRITABLE: u64 = 1 << 1;
pub const PT_USER: u64 = 1 << 2;
pub const PT_ACCESSED: u64 = 1 << 5;
pub const PT_DIRTY: u64 = 1 << 6;
pub const PT_PAGE_SIZE: u64 = 1 << 7;
pub const PT_GLOBAL: u64 = 1 << 8;
pub const PT64_NX: u64 = 1 << 63;
/// Bits 51:12 of an 8-byte entry: the frame.
pub const PT64_BASE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Bits 31:12 of a 4-byte entry.
pub const PT32_BASE_ADDR_MASK: u64 = 0xffff_f000;
/// Protection key of a leaf: bits 62:59.
pub const PT64_PKEY_SHIFT: u32 = 59;

/// One gpte format.
pub trait PteFormat {
    /// Entry size in bytes.
    const SIZE: usize;
    /// Index bits per level.
    const LEVEL_BITS: u32;
    /// The format has an NX bit (bit 63) and protection keys.
    const WIDE: bool;

    /// Index of `gva`'s entry in a table of `level`.
    #[inline]
    fn index(gva: u64, level: u8) -> u64 {
        (gva >> (12 + Self::LEVEL_BITS * (u32::from(level) - 1))) & ((1 << Self::LEVEL_BITS) - 1)
    }

    /// The guest-physical address of the table a non-leaf entry points to.
    fn table_gpa(pte: u64) -> u64;

    /// The guest-physical address `gva` translates to through leaf `pte` at `level`.
    fn leaf_gpa(pte: u64, level: u8, gva: u64) -> u64;

    /// Bytes mapped by a leaf at `level`.
    #[inline]
    fn page_size(level: u8) -> u64 {
        1 << (12 + Self::LEVEL_BITS * (u32::from(level) - 1))
    }
}

/// 8-byte entries (PTTYPE 64).
pub struct Pt64;

impl PteFormat for Pt64 {
    const SIZE: usize = 8;
    const LEVEL_BITS: u32 = 9;
    const WIDE: bool = true;

    #[inline]
    fn table_gpa(pte: u64) -> u64 {
        pte & PT64_BASE_ADDR_MASK
    }

    #[inline]
    fn leaf_gpa(pte: u64, level: u8, gva: u64) -> u64 {
        let offset = Self::page_size(level) - 1;
        (pte & PT64_BASE_ADDR_MASK & !offset) | (gva & offset)
    }
}

/// 4-byte entries (PTTYPE 32), with PSE-36 for 4 MiB pages (KVM always has it).
pub struct Pt32;

impl PteFormat for Pt32 {
    const SIZE: usize = 4;
    const LEVEL_BITS: u32 = 10;
    const WIDE: bool = false;

    #[inline]
    fn table_gpa(pte: u64) -> u64 {
        pte & PT32_BASE_ADDR_MASK
    }

    #[inline]
    fn leaf_gpa(pte: u64, level: u8, gva: u64) -> u64 {
        if level == 1 {
            (pte & PT32_BASE_ADDR_MASK) | (gva & 0xfff)
        } else {
            // 4 MiB page: PA[31:22] from PDE[31:22], PA[35:32] from PDE[16:13] (PSE-36).
            let pse36 = ((pte >> 13) & 0xf) << 32;
            (pte & 0xffc0_0000) | pse36 | (gva & 0x3f_ffff)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_and_frames() {
        let gva = 0x0000_7f12_3456_7abc_u64;
        assert_eq!(Pt64::index(gva, 1), (gva >> 12) & 511);
        assert_eq!(Pt64::index(gva, 4), (gva >> 39) & 511);
        assert_eq!(Pt64::leaf_gpa(0x8000_0000_1234_5067, 1, gva), 0x1234_5abc);
        assert_eq!(
            Pt64::leaf_gpa(0x0000_0000_4060_00e7, 2, gva),
            0x4060_0000 | (gva & 0x1f_ffff)
        );
        assert_eq!(Pt64::page_size(3), 1 << 30);
        assert_eq!(Pt32::index(0xc030_1234, 2), 0x300);
        assert_eq!(Pt32::index(0xc030_1234, 1), 0x301);
        // 4 MiB page at 0x1_c040_0000 via PSE-36 bit 13 (PA bit 32)
        assert_eq!(Pt32::leaf_gpa(0xc040_2083, 2, 0x0012_3456), 0x1_c052_3456);
        assert_eq!(Pt32::page_size(2), 4 << 20);
    }
}
