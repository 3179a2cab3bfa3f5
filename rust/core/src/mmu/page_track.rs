//! Per-memslot write tracking and large-page disallow counts: page_track.c's
//! gfn_write_track, mmu.c's lpage_info.disallow_lpage (kvm_mmu_gfn_disallow_lpage,
//! kvm_mmu_max_slot_mapping_level) and the slot-geometry rules of x86.c
//! kvm_alloc_memslot_metadata.
//!
//! KVM allocates both arrays with the slot. Here they are `GfnArray`s: nothing per gfn
//! until a gfn is tracked. The slot-geometry part of disallow_lpage (a frame not
//! entirely inside the slot, or gpa and hva disagreeing in a level's low bits) is not
//! stored per frame but computed from the slot, and added to the stored refcount.

use super::rmap::{gfn_to_index, kvm_pages_per_hpage, slot_lpages, GfnArray};

pub const PG_LEVEL_4K: u8 = 1;
pub const PG_LEVEL_2M: u8 = 2;
/// KVM_MAX_HUGEPAGE_LEVEL: the largest level with an lpage_info array.
pub const PG_LEVEL_1G: u8 = 3;

/// The initial disallow_lpage of one large level, as kvm_alloc_memslot_metadata sets it.
#[derive(Clone, Copy, Debug)]
struct LpageGeom {
    last: u64,
    /// base_gfn is not aligned to the level: the first frame sticks out of the slot.
    head: bool,
    /// base_gfn + npages is not aligned: the last frame sticks out.
    tail: bool,
    /// (base_gfn ^ hva >> 12) has low bits set: no frame can be one host huge page.
    misaligned: bool,
}

impl LpageGeom {
    fn new(base_gfn: u64, npages: u64, userspace_addr: u64, level: u8) -> LpageGeom {
        let mask = kvm_pages_per_hpage(level) - 1;
        LpageGeom {
            last: slot_lpages(base_gfn, npages, level).saturating_sub(1),
            head: base_gfn & mask != 0,
            tail: (base_gfn + npages) & mask != 0,
            misaligned: (base_gfn ^ (userspace_addr >> 12)) & mask != 0,
        }
    }

    /// KVM *assigns* 1 (never 2) however many of the rules hit a frame.
    fn base(&self, idx: u64) -> i32 {
        i32::from(self.misaligned || (self.head && idx == 0) || (self.tail && idx == self.last))
    }
}

/// Per-memslot write tracking (gfn_write_track) and large-page disallow counts
/// (lpage_info.disallow_lpage).
pub struct SlotTrack {
    base_gfn: u64,
    npages: u64,
    userspace_addr: u64,
    write_track: GfnArray<u16>,
    /// The refcounted part of disallow_lpage for 2M and 1G frames. i32 like KVM's int,
    /// so an unbalanced allow in a release build ends up where KVM's would.
    disallow: [GfnArray<i32>; 2],
    geom: [LpageGeom; 2],
}

impl SlotTrack {
    pub fn new(base_gfn: u64, npages: u64, userspace_addr: u64) -> SlotTrack {
        let lvl = |level| {
            (
                GfnArray::new(slot_lpages(base_gfn, npages, level)),
                LpageGeom::new(base_gfn, npages, userspace_addr, level),
            )
        };
        let ((d2, g2), (d3, g3)) = (lvl(PG_LEVEL_2M), lvl(PG_LEVEL_1G));
        SlotTrack {
            base_gfn,
            npages,
            userspace_addr,
            write_track: GfnArray::new(npages),
            disallow: [d2, d3],
            geom: [g2, g3],
        }
    }

    pub fn base_gfn(&self) -> u64 {
        self.base_gfn
    }

    pub fn npages(&self) -> u64 {
        self.npages
    }

    pub fn userspace_addr(&self) -> u64 {
        self.userspace_addr
    }

    /// The slot-relative 4K index; a gfn outside the slot is a caller bug.
    #[inline]
    fn index(&self, gfn: u64) -> u64 {
        assert!(
            gfn >= self.base_gfn && gfn - self.base_gfn < self.npages,
            "gfn {gfn:#x} outside memslot [{:#x}, {:#x})",
            self.base_gfn,
            self.base_gfn + self.npages
        );
        gfn - self.base_gfn
    }

    /// Write-track a gfn (an upper-level shadow page shadows it): counter++ and disallow
    /// large pages over it. Like update_gfn_write_track, an overflow past 65535 leaves the
    /// counter alone (a WARN in KVM, a debug assert here) while the lpage count still
    /// goes up. Write-protecting the gfn's SPTEs is the caller's job.
    pub fn add_write_track(&mut self, gfn: u64) {
        let i = self.index(gfn);
        let ok = self.write_track.update(i, |c| match c.checked_add(1) {
            Some(n) => {
                *c = n;
                true
            }
            None => false,
        });
        debug_assert!(ok, "gfn_write_track overflow at gfn {gfn:#x}");
        self.disallow_lpage(gfn);
    }

    /// The inverse of [`SlotTrack::add_write_track`]; an underflow leaves the counter
    /// alone and still re-allows large pages, as in KVM.
    pub fn remove_write_track(&mut self, gfn: u64) {
        let i = self.index(gfn);
        let c = self.write_track.get(i);
        debug_assert!(c > 0, "gfn_write_track underflow at gfn {gfn:#x}");
        if c > 0 {
            self.write_track.update(i, |c| *c -= 1);
        }
        self.allow_lpage(gfn);
    }

    pub fn is_write_tracked(&self, gfn: u64) -> bool {
        self.write_track_count(gfn) != 0
    }

    pub fn write_track_count(&self, gfn: u64) -> u16 {
        self.write_track.get(self.index(gfn))
    }

    fn update_disallow(&mut self, gfn: u64, delta: i32) {
        self.index(gfn);
        for (k, level) in [PG_LEVEL_2M, PG_LEVEL_1G].into_iter().enumerate() {
            let idx = gfn_to_index(gfn, self.base_gfn, level);
            self.disallow[k].update(idx, |c| {
                *c += delta;
                debug_assert!(
                    *c >= 0,
                    "disallow_lpage underflow at gfn {gfn:#x} level {level}"
                );
            });
        }
    }

    /// account_shadowed for level-1 pages: large pages disallowed at every large level
    /// containing gfn (no write track).
    pub fn disallow_lpage(&mut self, gfn: u64) {
        self.update_disallow(gfn, 1);
    }

    pub fn allow_lpage(&mut self, gfn: u64) {
        self.update_disallow(gfn, -1);
    }

    /// disallow_lpage of the frame holding gfn at `level` (2 or 3) as KVM would hold it:
    /// 1 from the slot geometry if any rule hits the frame, plus the refcount.
    pub fn lpage_disallow_count(&self, gfn: u64, level: u8) -> i32 {
        assert!(
            (PG_LEVEL_2M..=PG_LEVEL_1G).contains(&level),
            "no lpage_info at level {level}"
        );
        self.index(gfn);
        let k = usize::from(level - PG_LEVEL_2M);
        let idx = gfn_to_index(gfn, self.base_gfn, level);
        self.geom[k].base(idx) + self.disallow[k].get(idx)
    }

    /// Largest level (1..=3, at most `max`) at which a leaf may map gfn, as far as the
    /// slot can tell (kvm_mmu_max_slot_mapping_level: from the top, the first level
    /// whose frame has disallow_lpage == 0). The host mapping level, dirty logging and
    /// the guest's own page size are the caller's.
    pub fn max_level(&self, gfn: u64, max: u8) -> u8 {
        debug_assert!(max >= PG_LEVEL_4K);
        let mut level = max.min(PG_LEVEL_1G);
        while level > PG_LEVEL_4K && self.lpage_disallow_count(gfn, level) != 0 {
            level -= 1;
        }
        level
    }

    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.write_track.memory_bytes()
            + self
                .disallow
                .iter()
                .map(GfnArray::memory_bytes)
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const G: u64 = 1 << 18; // 4K pages per 1G
    const M: u64 = 512; // 4K pages per 2M

    /// A slot whose hva agrees with its gpa in every low bit.
    fn slot(base: u64, npages: u64) -> SlotTrack {
        SlotTrack::new(base, npages, (base + 7 * G) << 12)
    }

    #[test]
    fn aligned_slot_allows_1g() {
        let t = slot(G, 2 * G);
        for gfn in [G, G + 1, G + M, 2 * G - 1, 2 * G, 3 * G - 1] {
            assert_eq!(t.max_level(gfn, 3), 3, "{gfn:#x}");
            assert_eq!(t.max_level(gfn, 2), 2);
            assert_eq!(t.max_level(gfn, 1), 1);
            assert_eq!(t.lpage_disallow_count(gfn, 2), 0);
        }
        assert_eq!(t.max_level(G, 5), 3, "capped at KVM_MAX_HUGEPAGE_LEVEL");
    }

    #[test]
    fn partial_first_and_last_frames() {
        // [0x100, 0x700): 2M frames 0x0 (partial), 0x200, 0x400, 0x600 (partial).
        let t = slot(0x100, 0x600);
        for gfn in [0x100, 0x1ff, 0x600, 0x6ff] {
            assert_eq!(t.max_level(gfn, 3), 1, "{gfn:#x}");
            assert_eq!(t.lpage_disallow_count(gfn, 2), 1);
        }
        for gfn in [0x200, 0x3ff, 0x400, 0x5ff] {
            // the only 1G frame sticks out of the slot
            assert_eq!(t.max_level(gfn, 3), 2, "{gfn:#x}");
            assert_eq!(t.lpage_disallow_count(gfn, 3), 1);
        }
    }

    #[test]
    fn aligned_start_partial_end() {
        let t = slot(2 * G, G + 3 * M + 5);
        assert_eq!(t.max_level(2 * G, 3), 3);
        assert_eq!(t.max_level(3 * G - 1, 3), 3);
        assert_eq!(t.max_level(3 * G, 3), 2, "last 1G frame is partial");
        assert_eq!(t.max_level(3 * G + 3 * M - 1, 3), 2);
        assert_eq!(t.max_level(3 * G + 3 * M, 3), 1, "last 2M frame is partial");
        assert_eq!(t.max_level(3 * G + 3 * M + 4, 3), 1);
    }

    #[test]
    fn one_frame_partial_at_both_ends_counts_once() {
        let t = slot(1, M - 2);
        assert_eq!(t.lpage_disallow_count(1, 2), 1);
        assert_eq!(t.lpage_disallow_count(M - 2, 3), 1);
        assert_eq!(t.max_level(100, 3), 1);
    }

    #[test]
    fn exact_2m_slot() {
        let t = slot(M, M);
        assert_eq!(t.max_level(M, 3), 2);
        assert_eq!(t.max_level(2 * M - 1, 3), 2);
    }

    #[test]
    fn hva_misaligned_within_2m_disallows_all_large_pages() {
        let t = SlotTrack::new(0, 4 * G, (7 * G + 1) << 12);
        for gfn in [0, M, G, 4 * G - 1] {
            assert_eq!(t.max_level(gfn, 3), 1, "{gfn:#x}");
            assert_eq!(t.lpage_disallow_count(gfn, 2), 1);
        }
    }

    #[test]
    fn hva_misaligned_only_at_1g() {
        // Low 21 bits of gpa and hva agree, bits 21..29 do not.
        let t = SlotTrack::new(0, 4 * G, (7 * G + 3 * M) << 12);
        for gfn in [0, M, G, 4 * G - 1] {
            assert_eq!(t.max_level(gfn, 3), 2, "{gfn:#x}");
        }
    }

    #[test]
    fn write_track_counts_and_restores_large_pages() {
        let mut t = slot(0, 2 * G);
        let gfn = G + 5 * M + 17;
        assert!(!t.is_write_tracked(gfn));
        t.add_write_track(gfn);
        t.add_write_track(gfn);
        assert!(t.is_write_tracked(gfn));
        assert_eq!(t.write_track_count(gfn), 2);
        assert!(!t.is_write_tracked(gfn + 1));
        assert_eq!(t.max_level(gfn, 3), 1);
        assert_eq!(t.max_level(G + 5 * M, 3), 1, "same 2M frame");
        assert_eq!(
            t.max_level(G + 6 * M, 3),
            2,
            "same 1G frame, other 2M frame"
        );
        assert_eq!(t.max_level(0, 3), 3, "other 1G frame");
        assert_eq!(t.lpage_disallow_count(gfn, 2), 2);
        t.remove_write_track(gfn);
        assert!(t.is_write_tracked(gfn));
        assert_eq!(t.max_level(gfn, 3), 1);
        t.remove_write_track(gfn);
        assert!(!t.is_write_tracked(gfn));
        assert_eq!(t.max_level(gfn, 3), 3);
        assert_eq!(t.lpage_disallow_count(gfn, 3), 0);
    }

    #[test]
    fn disallow_lpage_without_write_track() {
        let mut t = slot(0, G);
        t.disallow_lpage(3 * M + 1);
        t.disallow_lpage(3 * M + 2);
        assert!(!t.is_write_tracked(3 * M + 1));
        assert_eq!(t.max_level(3 * M, 3), 1);
        assert_eq!(t.max_level(4 * M, 2), 2);
        t.allow_lpage(3 * M + 1);
        assert_eq!(t.max_level(3 * M, 3), 1);
        t.allow_lpage(3 * M + 2);
        assert_eq!(t.max_level(3 * M, 3), 3);
    }

    #[test]
    fn counts_stack_on_a_partial_edge_frame() {
        let mut t = slot(0x100, 0x600);
        t.add_write_track(0x150);
        assert_eq!(t.lpage_disallow_count(0x150, 2), 2);
        t.remove_write_track(0x150);
        assert_eq!(t.lpage_disallow_count(0x150, 2), 1);
        assert_eq!(t.max_level(0x150, 3), 1, "the edge rule stays");
    }

    #[test]
    #[cfg_attr(debug_assertions, should_panic(expected = "gfn_write_track overflow"))]
    fn write_track_saturates_at_u16_max() {
        let mut t = slot(0, 16);
        for _ in 0..u16::MAX {
            t.add_write_track(3);
        }
        assert_eq!(t.write_track_count(3), u16::MAX);
        t.add_write_track(3);
        // release builds: the counter holds, the lpage count still went up (as in KVM)
        assert_eq!(t.write_track_count(3), u16::MAX);
        assert_eq!(t.lpage_disallow_count(3, 2), 1 + i32::from(u16::MAX) + 1);
    }

    #[test]
    #[should_panic(expected = "outside memslot")]
    fn gfn_outside_slot_panics() {
        slot(0x100, 0x600).add_write_track(0x700);
    }

    #[test]
    fn memory_follows_tracked_gfns() {
        let npages = (1 << 31) - 1;
        let mut t = slot(0, npages);
        let empty = t.memory_bytes();
        assert!(empty < 512, "{empty}");
        for gfn in [0, 1, 2, npages - 1] {
            t.add_write_track(gfn);
        }
        let used = t.memory_bytes();
        assert!(used < 600 << 10, "{used}");
        for gfn in [0, 1, 2, npages - 1] {
            t.remove_write_track(gfn);
        }
        let tops: usize = t.write_track.memory_bytes()
            + t.disallow.iter().map(GfnArray::memory_bytes).sum::<usize>();
        // only the (empty) top-level vectors remain
        assert_eq!(t.memory_bytes(), empty + tops);
        assert!(t.write_track.is_empty());
    }

    /// The rules restated per frame: a level is allowed iff its frame is inside the
    /// slot, gpa and hva agree in the level's low bits, and no gfn of the frame is
    /// tracked or disallowed.
    fn model_max_level(
        base: u64,
        npages: u64,
        hva: u64,
        marks: &BTreeMap<u64, (u16, i32)>,
        gfn: u64,
        max: u8,
    ) -> u8 {
        for level in (2..=max.min(3)).rev() {
            let n = kvm_pages_per_hpage(level);
            let start = gfn / n * n;
            let inside = start >= base && start + n <= base + npages;
            let aligned = (base ^ (hva >> 12)) % n == 0;
            let marked = marks
                .range(start..start + n)
                .any(|(_, &(w, d))| w != 0 || d != 0);
            if inside && aligned && !marked {
                return level;
            }
        }
        1
    }

    #[derive(Clone, Debug)]
    enum Op {
        Track(u64),
        Untrack(usize),
        Disallow(u64),
        Allow(usize),
    }

    proptest! {
        #[test]
        fn matches_model(
            base in prop_oneof![Just(0u64), Just(G), 0..4 * G],
            npages in prop_oneof![1..4 * M, 1..3 * G],
            hva_off in prop_oneof![Just(0u64), Just(3 * M), 0..G],
            ops in prop::collection::vec(
                prop_oneof![
                    (0..1u64 << 32).prop_map(Op::Track),
                    any::<usize>().prop_map(Op::Untrack),
                    (0..1u64 << 32).prop_map(Op::Disallow),
                    any::<usize>().prop_map(Op::Allow),
                ],
                0..60,
            ),
            probes in prop::collection::vec((0..1u64 << 32, 1..=3u8), 1..40),
        ) {
            let hva = (base + 5 * G + hva_off) << 12;
            let mut t = SlotTrack::new(base, npages, hva);
            // gfn -> (write-track count, extra disallow count)
            let mut marks: BTreeMap<u64, (u16, i32)> = BTreeMap::new();
            for op in ops {
                let nonzero = |f: fn(&(u16, i32)) -> bool| -> Vec<u64> {
                    marks.iter().filter(|(_, m)| f(m)).map(|(&g, _)| g).collect()
                };
                match op {
                    Op::Track(x) => {
                        let gfn = base + x % npages;
                        t.add_write_track(gfn);
                        marks.entry(gfn).or_default().0 += 1;
                    }
                    Op::Untrack(pick) => {
                        let c = nonzero(|m| m.0 != 0);
                        if let Some(&gfn) = c.get(pick % c.len().max(1)) {
                            t.remove_write_track(gfn);
                            marks.get_mut(&gfn).unwrap().0 -= 1;
                        }
                    }
                    Op::Disallow(x) => {
                        let gfn = base + x % npages;
                        t.disallow_lpage(gfn);
                        marks.entry(gfn).or_default().1 += 1;
                    }
                    Op::Allow(pick) => {
                        let c = nonzero(|m| m.1 != 0);
                        if let Some(&gfn) = c.get(pick % c.len().max(1)) {
                            t.allow_lpage(gfn);
                            marks.get_mut(&gfn).unwrap().1 -= 1;
                        }
                    }
                }
            }
            for (&gfn, &(w, _)) in &marks {
                prop_assert_eq!(t.write_track_count(gfn), w);
            }
            let probe_gfns = probes
                .iter()
                .map(|&(x, max)| (base + x % npages, max))
                .chain(marks.keys().map(|&g| (g, 3)));
            for (gfn, max) in probe_gfns {
                prop_assert_eq!(
                    t.max_level(gfn, max),
                    model_max_level(base, npages, hva, &marks, gfn, max),
                    "gfn {:#x} max {}", gfn, max
                );
                let w = marks.get(&gfn).map_or(0, |m| m.0);
                prop_assert_eq!(t.is_write_tracked(gfn), w != 0);
            }
        }
    }
}
