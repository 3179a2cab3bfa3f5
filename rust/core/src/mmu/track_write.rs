//! Emulated writes to shadowed guest page tables (mmu.c kvm_mmu_track_write, once
//! kvm_mmu_pte_write): the SPTEs a written gpte fed are zapped, misaligned writes and
//! write flooding zap the whole shadow page, and a page table the emulator cannot
//! handle is unshadowed (kvm_mmu_unprotect_page).

use super::paging_tmpl::remote_flush_or_zap;
use super::rmap::spte_ptr;
use super::shadow::Mmu;
use crate::memslot::MemSlots;
use crate::paging::GuestMem;
use crate::stats::VmStat;

/// mmu_pte_write_fetch_gpte: the new gpte as the emulator left it (0 unless a whole
/// 4- or 8-byte entry was written); with CR4.PAE a 4-byte write is widened to the
/// aligned 8-byte gpte it is half of.
fn fetch_gpte(slots: &MemSlots, pae: bool, gpa: &mut u64, bytes: &mut usize) -> u64 {
    if pae && *bytes == 4 {
        *gpa &= !7;
        *bytes = 8;
    }
    if *bytes == 4 || *bytes == 8 {
        slots.read_gpte(*gpa, *bytes).unwrap_or(0)
    } else {
        0
    }
}

/// detect_write_misaligned: a write that is not one whole gpte (a 1-byte write at a
/// gpte's start is allowed: Linux updates status bits with `andb`).
fn write_misaligned(gpte_size: u64, gpa: u64, bytes: usize) -> bool {
    let offset = gpa & 0xfff;
    if offset & (gpte_size - 1) == 0 && bytes == 1 {
        return false;
    }
    let last = offset + bytes as u64 - 1;
    (offset ^ last) & !(gpte_size - 1) != 0 || bytes < 4
}

/// get_written_sptes: the first SPTE index a write at `gpa` hits and how many (a
/// 4-byte PDE feeds two PAE PDEs), or None if this quadrant's page is not concerned.
fn written_sptes(
    has_4_byte_gpte: bool,
    level: u8,
    quadrant: u8,
    gpa: u64,
) -> Option<(usize, usize)> {
    let mut page_offset = gpa & 0xfff;
    let mut n = 1;
    if has_4_byte_gpte {
        page_offset <<= 1;
        if level == 2 {
            page_offset &= !7;
            page_offset <<= 1;
            n = 2;
        }
        let q = page_offset >> 12;
        page_offset &= 0xfff;
        if q != u64::from(quadrant) {
            return None;
        }
    }
    Some(((page_offset / 8) as usize, n))
}

impl Mmu {
    /// kvm_mmu_track_write: the guest (through the emulator) wrote `bytes` bytes at
    /// `gpa`, already in memory. `pae` is the writing vCPU's CR4.PAE.
    pub fn track_write(&mut self, slots: &MemSlots, pae: bool, gpa: u64, bytes: usize) {
        if self.indirect_shadow_pages() == 0 || bytes == 0 {
            return;
        }
        let gfn = gpa >> 12;
        let (mut gpa, mut bytes) = (gpa, bytes);
        let gentry = fetch_gpte(slots, pae, &mut gpa, &mut bytes);
        self.stats().add(VmStat::MmuPteWrite as usize, 1);
        let mut invalid_list = Vec::new();
        let mut flush = false;
        for sp in self.gfn_sps_with_gptes(gfn) {
            // A zap earlier in this loop may have taken this page as an unsync child.
            if self.is_obsolete(sp) {
                continue;
            }
            let role = self.get(sp).role;
            let gpte_size = if role.has_4_byte_gpte() { 4 } else { 8 };
            // detect_write_flooding: only upper levels count (level 1 can go unsync).
            let flooded = role.level() > 1 && {
                let page = self.get_mut(sp);
                page.write_flooding_count = page.write_flooding_count.saturating_add(1);
                page.write_flooding_count >= 3
            };
            if write_misaligned(gpte_size, gpa, bytes) || flooded {
                self.prepare_zap(sp, &mut invalid_list);
                self.stats().add(VmStat::MmuFlooded as usize, 1);
                continue;
            }
            let Some((first, n)) =
                written_sptes(role.has_4_byte_gpte(), role.level(), role.quadrant(), gpa)
            else {
                continue;
            };
            for i in first..first + n {
                let p = spte_ptr(sp, i);
                let entry = self.spte(p);
                self.zap_spte(p);
                if gentry != 0 && role.level() != 1 {
                    self.stats().add(VmStat::MmuPdeZapped as usize, 1);
                }
                flush |= entry.is_shadow_present();
            }
        }
        remote_flush_or_zap(self, &mut invalid_list, flush);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misaligned_writes() {
        assert!(!write_misaligned(8, 0x1008, 8));
        assert!(
            !write_misaligned(8, 0x1008, 1),
            "andb on a gpte's first byte"
        );
        assert!(write_misaligned(8, 0x1009, 1));
        assert!(write_misaligned(8, 0x100c, 8), "crosses a gpte");
        assert!(write_misaligned(8, 0x1008, 2), "shorter than 4");
        assert!(!write_misaligned(8, 0x100c, 4), "half a gpte, inside it");
        assert!(!write_misaligned(4, 0x1004, 4));
        assert!(write_misaligned(4, 0x1006, 4));
    }

    #[test]
    fn written_sptes_of_4_byte_tables() {
        // 64-bit tables: one SPTE at the same index.
        assert_eq!(written_sptes(false, 1, 0, 0x1ff8), Some((511, 1)));
        // 32-bit PT: entry 600 is in the second half (quadrant 1), SPTE 600 - 512.
        assert_eq!(written_sptes(true, 1, 0, 0x1000 + 4 * 600), None);
        assert_eq!(written_sptes(true, 1, 1, 0x1000 + 4 * 600), Some((88, 1)));
        assert_eq!(written_sptes(true, 1, 0, 0x1000 + 4 * 300), Some((300, 1)));
        // 32-bit PD: entry 257 maps VA 0x40400000 (quadrant 1), SPTEs 2 and 3.
        assert_eq!(written_sptes(true, 2, 1, 4 * 257), Some((2, 2)));
        assert_eq!(written_sptes(true, 2, 0, 4 * 257), None);
    }
}
