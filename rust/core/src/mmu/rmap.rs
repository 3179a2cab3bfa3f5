//! The reverse map (mmu.c pte_list_add, pte_list_remove, gfn_to_rmap, rmap_add): per
//! memslot and leaf level, gfn -> the shadow-MMU leaf SPTEs that map it.
//!
//! KVM gives every memslot flat `rmap[level][gfn_to_index]` arrays of 8-byte heads,
//! allocated with the slot. Here the heads live in a `GfnArray`, a two-level radix
//! (64 chunk pointers -> 512 heads) allocated on first use and freed when it empties,
//! so cost follows what is mapped. A head is 48 bits: an [`SptePtr`] needs only 41
//! (a 32-bit sp index and a 9-bit SPTE index), and 6-byte heads keep a contiguous
//! mapping at ~6 bytes per 4 KiB page including the radix.
//!
//! Head encoding, KVM's rmap_head tagging: 0 = empty; even = one SPTE inline, stored as
//! `(sptep + 1) << 1` because sptep 0 (sp 0, entry 0) is a valid reference; odd =
//! `desc << 1 | 1`, an index into the rmap's descriptor lists.
//!
//! Descriptor lists: KVM chains pte_list_desc blocks of PTE_LIST_EXT entries, the newest
//! block (the only partial one) at the head, and fills a removed entry's hole with the
//! head block's last entry. Keeping the chain as one Vec in insertion order (block k =
//! entries 14k..14k+14) turns that into `push` and `swap_remove`, and KVM's walk order
//! (rmap_get_first/next: head block first, each block in slot order) into
//! `chunks(PTE_LIST_EXT).rev()`. Unlike KVM, a list that drops to one entry goes back to
//! the inline form; the walk order is the same either way.

/// A reference to one SPTE: (shadow-page index << 9) | index of the SPTE in that page.
pub type SptePtr = u64;

/// Entries per pte_list_desc (PTE_LIST_EXT: 14 today, 3 in old kernels).
pub const PTE_LIST_EXT: usize = 14;
/// Leaf levels with an rmap: 4K, 2M, 1G (KVM_NR_PAGE_SIZES).
pub const KVM_NR_PAGE_SIZES: usize = 3;
/// rmap_add zaps every SPTE of a gfn/level once the list held more than this many
/// entries *before* the add (KVM compares pte_list_add's pre-add count), i.e. when the
/// add makes it 1002. Left to the caller: this module only keeps the lists.
pub const RMAP_RECYCLE_THRESHOLD: usize = 1000;

const SPTE_PTR_BITS: u32 = 32 + 9;

#[inline]
pub fn spte_ptr(sp: u32, index: usize) -> SptePtr {
    debug_assert!(index < 512, "SPTE index {index} out of a 512-entry page");
    (u64::from(sp) << 9) | index as u64
}

#[inline]
pub fn sp_of(p: SptePtr) -> u32 {
    (p >> 9) as u32
}

#[inline]
pub fn index_of(p: SptePtr) -> usize {
    (p & 0x1ff) as usize
}

/// KVM_HPAGE_GFN_SHIFT: log2 of the 4 KiB pages a leaf at `level` covers.
#[inline]
pub fn kvm_hpage_gfn_shift(level: u8) -> u32 {
    9 * (u32::from(level) - 1)
}

/// KVM_PAGES_PER_HPAGE.
#[inline]
pub fn kvm_pages_per_hpage(level: u8) -> u64 {
    1 << kvm_hpage_gfn_shift(level)
}

/// KVM's gfn_to_index: the slot-relative frame of `gfn` at `level`. Frames are aligned in
/// gfn space, not slot space, so a slot not aligned to the level has a partial first
/// frame at index 0.
#[inline]
pub fn gfn_to_index(gfn: u64, base_gfn: u64, level: u8) -> u64 {
    let shift = kvm_hpage_gfn_shift(level);
    (gfn >> shift) - (base_gfn >> shift)
}

/// Frames a slot has at `level` (kvm_mmu_slot_lpages).
pub fn slot_lpages(base_gfn: u64, npages: u64, level: u8) -> u64 {
    if npages == 0 {
        0
    } else {
        gfn_to_index(base_gfn + npages - 1, base_gfn, level) + 1
    }
}

const CHUNK_SHIFT: u32 = 9;
const CHUNK_LEN: usize = 1 << CHUNK_SHIFT;
const DIR_SHIFT: u32 = 6;
const DIR_LEN: usize = 1 << DIR_SHIFT;

struct Chunk<T> {
    vals: [T; CHUNK_LEN],
    /// Non-default entries, so an emptied chunk can be freed without a scan.
    used: u16,
    /// Which entries are non-default, so iteration costs what is set.
    occupied: [u64; CHUNK_LEN / 64],
}

struct Dir<T> {
    chunks: [Option<Box<Chunk<T>>>; DIR_LEN],
    used: u8,
}

/// A gfn-indexed array of `len` entries that reads as all `T::default()` and holds
/// memory only for 512-entry chunks with a non-default entry (plus one pointer per 64
/// chunks). The per-gfn metadata of a memslot (rmap heads, write-track counts,
/// lpage_info) lives in these.
pub(crate) struct GfnArray<T> {
    len: u64,
    /// Grown on demand up to the highest directory touched.
    top: Vec<Option<Box<Dir<T>>>>,
}

impl<T: Copy + Default + PartialEq> GfnArray<T> {
    pub(crate) fn new(len: u64) -> Self {
        GfnArray {
            len,
            top: Vec::new(),
        }
    }

    #[inline]
    fn split(i: u64) -> (usize, usize, usize) {
        (
            (i >> (CHUNK_SHIFT + DIR_SHIFT)) as usize,
            ((i >> CHUNK_SHIFT) as usize) & (DIR_LEN - 1),
            (i as usize) & (CHUNK_LEN - 1),
        )
    }

    #[inline]
    pub(crate) fn get(&self, i: u64) -> T {
        debug_assert!(i < self.len);
        let (t, d, c) = Self::split(i);
        match self.top.get(t) {
            Some(Some(dir)) => match &dir.chunks[d] {
                Some(chunk) => chunk.vals[c],
                None => T::default(),
            },
            _ => T::default(),
        }
    }

    /// Apply `f` to entry `i`, allocating its chunk if needed and freeing it if it ends
    /// up all default. One radix walk for read-modify-write.
    #[inline]
    pub(crate) fn update<R>(&mut self, i: u64, f: impl FnOnce(&mut T) -> R) -> R {
        debug_assert!(i < self.len);
        let (t, d, c) = Self::split(i);
        if t >= self.top.len() {
            self.top.resize_with(t + 1, || None);
        }
        let dir = self.top[t].get_or_insert_with(|| {
            Box::new(Dir {
                chunks: [const { None }; DIR_LEN],
                used: 0,
            })
        });
        if dir.chunks[d].is_none() {
            dir.used += 1;
        }
        let chunk = dir.chunks[d].get_or_insert_with(|| {
            Box::new(Chunk {
                vals: [T::default(); CHUNK_LEN],
                used: 0,
                occupied: [0; CHUNK_LEN / 64],
            })
        });
        let v = &mut chunk.vals[c];
        let was = *v != T::default();
        let r = f(v);
        let is = *v != T::default();
        match (was, is) {
            (false, true) => {
                chunk.used += 1;
                chunk.occupied[c / 64] |= 1 << (c % 64);
            }
            (true, false) => {
                chunk.used -= 1;
                chunk.occupied[c / 64] &= !(1 << (c % 64));
            }
            _ => {}
        }
        if chunk.used == 0 {
            dir.chunks[d] = None;
            dir.used -= 1;
            if dir.used == 0 {
                self.top[t] = None;
            }
        }
        r
    }

    /// No entry is non-default (so no chunk is held).
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.top.iter().all(Option::is_none)
    }

    /// Every non-default entry, by index.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, T)> + '_ {
        self.top
            .iter()
            .enumerate()
            .filter_map(|(t, dir)| dir.as_deref().map(|dir| (t, dir)))
            .flat_map(|(t, dir)| {
                dir.chunks.iter().enumerate().filter_map(move |(d, chunk)| {
                    chunk
                        .as_deref()
                        .map(|chunk| (((t << DIR_SHIFT) | d) << CHUNK_SHIFT, chunk))
                })
            })
            .flat_map(|(first, chunk)| {
                chunk
                    .occupied
                    .iter()
                    .enumerate()
                    .flat_map(move |(w, &bits)| {
                        let mut bits = bits;
                        std::iter::from_fn(move || {
                            (bits != 0).then(|| {
                                let c = w * 64 + bits.trailing_zeros() as usize;
                                bits &= bits - 1;
                                ((first | c) as u64, chunk.vals[c])
                            })
                        })
                    })
            })
    }

    /// Heap bytes held (the owner counts its own struct).
    pub(crate) fn memory_bytes(&self) -> usize {
        let dirs = self.top.iter().flatten();
        let chunks: usize = dirs.clone().map(|dir| usize::from(dir.used)).sum();
        self.top.capacity() * std::mem::size_of::<Option<Box<Dir<T>>>>()
            + dirs.count() * std::mem::size_of::<Dir<T>>()
            + chunks * std::mem::size_of::<Chunk<T>>()
    }
}

/// A 48-bit rmap head (see the module comment for the encoding).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct Head([u16; 3]);

enum HeadKind {
    Empty,
    One(SptePtr),
    Desc(usize),
}

impl Head {
    #[inline]
    fn from_val(v: u64) -> Head {
        debug_assert!(v >> 48 == 0);
        Head([v as u16, (v >> 16) as u16, (v >> 32) as u16])
    }

    #[inline]
    fn val(self) -> u64 {
        u64::from(self.0[0]) | (u64::from(self.0[1]) << 16) | (u64::from(self.0[2]) << 32)
    }

    #[inline]
    fn one(p: SptePtr) -> Head {
        Head::from_val((p + 1) << 1)
    }

    #[inline]
    fn desc(d: usize) -> Head {
        Head::from_val(((d as u64) << 1) | 1)
    }

    #[inline]
    fn kind(self) -> HeadKind {
        let v = self.val();
        if v == 0 {
            HeadKind::Empty
        } else if v & 1 == 0 {
            HeadKind::One((v >> 1) - 1)
        } else {
            HeadKind::Desc((v >> 1) as usize)
        }
    }
}

/// The reverse map of one memslot: gfn -> the leaf SPTEs that map it, per level
/// (1 = 4K, 2 = 2M, 3 = 1G). Large-level heads are per frame (gfn_to_index), shared by
/// every gfn of the frame.
pub struct Rmap {
    base_gfn: u64,
    npages: u64,
    heads: [GfnArray<Head>; KVM_NR_PAGE_SIZES],
    /// The descriptor lists of gfns mapped by more than one SPTE, in insertion order.
    descs: Vec<Vec<SptePtr>>,
    free_descs: Vec<usize>,
    count: usize,
}

impl Rmap {
    /// Allocates nothing per gfn yet.
    pub fn new(base_gfn: u64, npages: u64) -> Rmap {
        let heads = [1u8, 2, 3].map(|level| GfnArray::new(slot_lpages(base_gfn, npages, level)));
        Rmap {
            base_gfn,
            npages,
            heads,
            descs: Vec::new(),
            free_descs: Vec::new(),
            count: 0,
        }
    }

    pub fn base_gfn(&self) -> u64 {
        self.base_gfn
    }

    pub fn npages(&self) -> u64 {
        self.npages
    }

    /// (level slot, head index); a gfn outside the slot or a bad level is a caller bug.
    #[inline]
    fn locate(&self, gfn: u64, level: u8) -> (usize, u64) {
        assert!(
            (1..=KVM_NR_PAGE_SIZES as u8).contains(&level),
            "rmap level {level} is not 1..=3"
        );
        assert!(
            gfn >= self.base_gfn && gfn - self.base_gfn < self.npages,
            "gfn {gfn:#x} outside memslot [{:#x}, {:#x})",
            self.base_gfn,
            self.base_gfn + self.npages
        );
        (
            usize::from(level - 1),
            gfn_to_index(gfn, self.base_gfn, level),
        )
    }

    fn alloc_desc(descs: &mut Vec<Vec<SptePtr>>, free: &mut Vec<usize>, v: Vec<SptePtr>) -> usize {
        match free.pop() {
            Some(d) => {
                descs[d] = v;
                d
            }
            None => {
                descs.push(v);
                descs.len() - 1
            }
        }
    }

    fn free_desc(&mut self, d: usize) -> Vec<SptePtr> {
        self.free_descs.push(d);
        std::mem::take(&mut self.descs[d])
    }

    /// Add; returns the number of SPTEs in this gfn's list afterwards. KVM's
    /// pte_list_add returns the count *before* the add, and that is what
    /// max_mmu_rmap_size and RMAP_RECYCLE_THRESHOLD see: use `add(..) - 1` for them.
    pub fn add(&mut self, gfn: u64, level: u8, sptep: SptePtr) -> usize {
        debug_assert!(sptep >> SPTE_PTR_BITS == 0, "not an SptePtr: {sptep:#x}");
        debug_assert!(
            !self.iter(gfn, level).any(|p| p == sptep),
            "SPTE {sptep:#x} already in the rmap of gfn {gfn:#x} level {level}"
        );
        let (l, i) = self.locate(gfn, level);
        let (descs, free) = (&mut self.descs, &mut self.free_descs);
        let n = self.heads[l].update(i, |h| match h.kind() {
            HeadKind::Empty => {
                *h = Head::one(sptep);
                1
            }
            HeadKind::One(q) => {
                let mut v = Vec::with_capacity(4);
                v.extend([q, sptep]);
                *h = Head::desc(Self::alloc_desc(descs, free, v));
                2
            }
            HeadKind::Desc(d) => {
                descs[d].push(sptep);
                descs[d].len()
            }
        });
        self.count += 1;
        n
    }

    /// Remove one entry; false if it was not there (the caller treats that as a bug, as
    /// KVM's pte_list_remove does with KVM_BUG_ON_DATA_CORRUPTION).
    pub fn remove(&mut self, gfn: u64, level: u8, sptep: SptePtr) -> bool {
        let (l, i) = self.locate(gfn, level);
        let new = match self.heads[l].get(i).kind() {
            HeadKind::Empty => return false,
            HeadKind::One(q) if q == sptep => Head::default(),
            HeadKind::One(_) => return false,
            HeadKind::Desc(d) => {
                let v = &mut self.descs[d];
                let Some(pos) = v.iter().position(|&p| p == sptep) else {
                    return false;
                };
                // KVM's hole filling: the head block's last entry moves into the hole.
                v.swap_remove(pos);
                if v.len() > 1 {
                    self.count -= 1;
                    return true;
                }
                let last = self.free_desc(d)[0];
                Head::one(last)
            }
        };
        self.heads[l].update(i, |h| *h = new);
        self.count -= 1;
        true
    }

    pub fn len(&self, gfn: u64, level: u8) -> usize {
        let (l, i) = self.locate(gfn, level);
        match self.heads[l].get(i).kind() {
            HeadKind::Empty => 0,
            HeadKind::One(_) => 1,
            HeadKind::Desc(d) => self.descs[d].len(),
        }
    }

    /// The entries of a head in KVM's walk order.
    fn walk(&self, h: Head) -> impl Iterator<Item = SptePtr> + '_ {
        let (one, list): (Option<SptePtr>, &[SptePtr]) = match h.kind() {
            HeadKind::Empty => (None, &[]),
            HeadKind::One(p) => (Some(p), &[]),
            HeadKind::Desc(d) => (None, &self.descs[d]),
        };
        one.into_iter()
            .chain(list.chunks(PTE_LIST_EXT).rev().flatten().copied())
    }

    /// The SPTEs of a gfn at a level, in KVM's for_each_rmap_spte order.
    pub fn iter(&self, gfn: u64, level: u8) -> impl Iterator<Item = SptePtr> + '_ {
        let (l, i) = self.locate(gfn, level);
        self.walk(self.heads[l].get(i))
    }

    /// Take (and clear) every entry of a gfn at a level (zapping a gfn), in walk order.
    pub fn take(&mut self, gfn: u64, level: u8) -> Vec<SptePtr> {
        let (l, i) = self.locate(gfn, level);
        let h = self.heads[l].get(i);
        let v = match h.kind() {
            HeadKind::Empty => return Vec::new(),
            HeadKind::One(p) => vec![p],
            HeadKind::Desc(d) => {
                let v = self.free_desc(d);
                if v.len() > PTE_LIST_EXT {
                    v.chunks(PTE_LIST_EXT).rev().flatten().copied().collect()
                } else {
                    v
                }
            }
        };
        self.heads[l].update(i, |h| *h = Head::default());
        self.count -= v.len();
        v
    }

    /// Every (gfn, level, sptep) for the audit; a large level reports its frame's first
    /// gfn, which lies below base_gfn for the partial first frame of an unaligned slot.
    pub fn iter_all(&self) -> impl Iterator<Item = (u64, u8, SptePtr)> + '_ {
        (1..=KVM_NR_PAGE_SIZES as u8).flat_map(move |level| {
            let shift = kvm_hpage_gfn_shift(level);
            let first = self.base_gfn >> shift;
            self.heads[usize::from(level - 1)]
                .iter()
                .flat_map(move |(i, h)| {
                    let gfn = (first + i) << shift;
                    self.walk(h).map(move |p| (gfn, level, p))
                })
        })
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// SPTEs in the rmap, all gfns and levels.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Bytes of metadata this rmap holds now.
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.heads.iter().map(GfnArray::memory_bytes).sum::<usize>()
            + self.descs.capacity() * std::mem::size_of::<Vec<SptePtr>>()
            + self
                .descs
                .iter()
                .map(|v| v.capacity() * std::mem::size_of::<SptePtr>())
                .sum::<usize>()
            + self.free_descs.capacity() * std::mem::size_of::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn p(n: u64) -> SptePtr {
        spte_ptr((n >> 9) as u32, (n & 0x1ff) as usize)
    }

    #[test]
    fn spte_ptr_round_trip() {
        let x = spte_ptr(0xdead_beef, 0x1ab);
        assert_eq!(x, (0xdead_beef << 9) | 0x1ab);
        assert_eq!((sp_of(x), index_of(x)), (0xdead_beef, 0x1ab));
        let max = spte_ptr(u32::MAX, 511);
        assert_eq!(max, (1 << 41) - 1);
        assert!(matches!(Head::one(max).kind(), HeadKind::One(q) if q == max));
        assert!(matches!(Head::one(0).kind(), HeadKind::One(0)));
    }

    #[test]
    fn gfn_to_index_and_lpages() {
        assert_eq!(gfn_to_index(0x1234, 0x1000, 1), 0x234);
        assert_eq!(gfn_to_index(0x1234, 0x1000, 2), 1);
        assert_eq!(gfn_to_index(0x1ff, 0x100, 2), 0);
        assert_eq!(gfn_to_index(0x200, 0x100, 2), 1);
        // 0x100..0x700: frames 0x0, 0x200, 0x400, 0x600.
        assert_eq!(slot_lpages(0x100, 0x600, 2), 4);
        assert_eq!(slot_lpages(0, 0x600, 2), 3);
        assert_eq!(slot_lpages(0x100, 0x600, 3), 1);
        assert_eq!(slot_lpages(5, 0, 1), 0);
    }

    #[test]
    fn add_remove_iter_take_each_level() {
        for level in 1..=3u8 {
            let mut r = Rmap::new(0x4_0000, 0x10_0000);
            let gfn = 0x4_0000 + 0x1234;
            assert!(r.is_empty());
            assert_eq!(r.len(gfn, level), 0);
            assert_eq!(r.iter(gfn, level).count(), 0);
            assert_eq!(r.add(gfn, level, p(7)), 1);
            assert_eq!(r.len(gfn, level), 1);
            assert_eq!(r.iter(gfn, level).collect::<Vec<_>>(), [p(7)]);
            // other levels are separate lists
            for other in (1..=3).filter(|&l| l != level) {
                assert_eq!(r.len(gfn, other), 0);
            }
            assert!(r.remove(gfn, level, p(7)));
            assert!(r.is_empty());
            assert_eq!(r.len(gfn, level), 0);
            assert_eq!(r.add(gfn, level, p(8)), 1);
            assert_eq!(r.add(gfn, level, p(9)), 2);
            assert_eq!(r.count(), 2);
            assert_eq!(r.take(gfn, level), [p(8), p(9)]);
            assert!(r.is_empty());
            assert_eq!(r.take(gfn, level), []);
        }
    }

    #[test]
    fn sptep_zero_is_a_valid_entry() {
        let mut r = Rmap::new(0, 16);
        assert_eq!(r.add(3, 1, 0), 1);
        assert_eq!(r.iter(3, 1).collect::<Vec<_>>(), [0]);
        assert!(r.remove(3, 1, 0));
        assert!(r.is_empty());
    }

    fn desc_of(r: &Rmap, gfn: u64, level: u8) -> Option<usize> {
        let (l, i) = r.locate(gfn, level);
        match r.heads[l].get(i).kind() {
            HeadKind::Desc(d) => Some(d),
            _ => None,
        }
    }

    #[test]
    fn aliases_grow_into_descriptors_and_shrink_back_inline() {
        let mut r = Rmap::new(0, 1024);
        let ps: Vec<_> = (0..30).map(|n| p(100 + n)).collect();
        for (n, &x) in ps.iter().enumerate() {
            assert_eq!(r.add(5, 1, x), n + 1);
        }
        assert!(desc_of(&r, 5, 1).is_some());
        // KVM walks the newest (partial) block first: [28, 29], then [14..28], [0..14].
        let want: Vec<_> = ps[28..]
            .iter()
            .chain(&ps[14..28])
            .chain(&ps[..14])
            .copied()
            .collect();
        assert_eq!(r.iter(5, 1).collect::<Vec<_>>(), want);

        // Remove from the oldest block: the head block's last entry fills the hole.
        assert!(r.remove(5, 1, ps[3]));
        let got: Vec<_> = r.iter(5, 1).collect();
        assert_eq!(got[0], ps[28]);
        assert_eq!(got[1 + 14 + 3], ps[29]);
        assert_eq!(r.len(5, 1), 29);

        for &x in ps.iter().filter(|&&x| x != ps[3] && x != ps[17]) {
            assert!(r.remove(5, 1, x));
        }
        assert_eq!(r.len(5, 1), 1);
        assert_eq!(desc_of(&r, 5, 1), None, "one entry left is inline again");
        assert_eq!(r.iter(5, 1).collect::<Vec<_>>(), [ps[17]]);
        // The freed descriptor is reused by the next alias.
        r.add(6, 1, p(1));
        r.add(6, 1, p(2));
        assert_eq!(desc_of(&r, 6, 1), Some(0));
        assert_eq!(r.descs.len(), 1);
    }

    #[test]
    fn large_levels_at_unaligned_slot_edges() {
        // Slot [0x1_0123, 0x1_0123 + 0x1000): 2M frames 0x1_0000 (partial) .. 0x1_1000 (partial).
        let base = 0x1_0123;
        let npages = 0x1000;
        let mut r = Rmap::new(base, npages);
        let last = base + npages - 1;
        assert_eq!(gfn_to_index(last, base, 2), 8);
        // Every gfn of a frame shares its head.
        r.add(base, 2, p(1));
        r.add(0x1_01ff, 2, p(2));
        assert_eq!(r.len(base + 0x10, 2), 2);
        assert_eq!(r.len(0x1_0200, 2), 0);
        r.add(0x1_0200, 2, p(3));
        r.add(last, 2, p(4));
        assert_eq!(r.iter(0x1_1000, 2).collect::<Vec<_>>(), [p(4)]);
        // One 1G frame holds the whole slot.
        r.add(base, 3, p(5));
        r.add(last, 3, p(6));
        assert_eq!(r.len(0x1_0800, 3), 2);
        let mut all: Vec<_> = r.iter_all().collect();
        all.sort();
        assert_eq!(
            all,
            [
                (0, 3, p(5)),
                (0, 3, p(6)),
                (0x1_0000, 2, p(1)),
                (0x1_0000, 2, p(2)),
                (0x1_0200, 2, p(3)),
                (0x1_1000, 2, p(4)),
            ]
        );
        assert!(r.remove(0x1_1122, 2, p(4)));
        assert!(!r.remove(0x1_1122, 2, p(4)));
    }

    #[test]
    #[should_panic(expected = "outside memslot")]
    fn gfn_below_slot_panics() {
        Rmap::new(0x1_0123, 0x1000).add(0x1_0122, 2, p(1));
    }

    #[test]
    #[should_panic(expected = "outside memslot")]
    fn gfn_past_slot_panics() {
        Rmap::new(0x1_0123, 0x1000).len(0x1_1123, 1);
    }

    #[test]
    fn removing_a_missing_entry_is_reported() {
        let mut r = Rmap::new(0, 64);
        assert!(!r.remove(1, 1, p(1)), "empty head");
        r.add(1, 1, p(1));
        assert!(!r.remove(1, 1, p(2)), "single, other entry");
        r.add(1, 1, p(3));
        assert!(!r.remove(1, 1, p(2)), "list, other entry");
        assert!(!r.remove(1, 2, p(1)), "same gfn, other level");
        assert_eq!(r.count(), 2);
        assert_eq!(r.len(1, 1), 2);
    }

    #[test]
    fn iter_all_lists_everything() {
        let mut r = Rmap::new(0x800, 0x4_0000);
        let mut want = Vec::new();
        for n in 0..2000u64 {
            let gfn = 0x800 + (n * 97) % 0x4_0000;
            let level = (n % 3) as u8 + 1;
            r.add(gfn, level, p(n));
            let shift = kvm_hpage_gfn_shift(level);
            want.push((gfn >> shift << shift, level, p(n)));
        }
        let mut got: Vec<_> = r.iter_all().collect();
        got.sort();
        want.sort();
        assert_eq!(got, want);
    }

    /// Heap bytes per mapped 4 KiB page for N contiguous 4K mappings from `base`.
    fn contiguous_bytes_per_page(base: u64, npages: u64, n: u64) -> f64 {
        let mut r = Rmap::new(base, npages);
        for g in 0..n {
            r.add(base + g, 1, p(g));
        }
        r.memory_bytes() as f64 / n as f64
    }

    #[test]
    fn memory_contiguous_at_most_8_bytes_per_page() {
        let slot = 1 << 21; // 8 GiB
        for (base, n) in [(0, 512), (0, 262_144), (0x123, 262_144), (0, 1 << 21)] {
            let b = contiguous_bytes_per_page(base, slot, n);
            assert!(
                b <= 8.0,
                "{b:.2} bytes per page for {n} pages from {base:#x}"
            );
        }
    }

    #[test]
    fn memory_sparse_does_not_scale_with_the_slot() {
        let npages = (1 << 31) - 1; // KVM_MEM_MAX_NR_PAGES: 8 TiB
        let mut r = Rmap::new(0, npages);
        let empty = r.memory_bytes();
        assert!(empty < 256, "{empty}");
        for (n, gfn) in [0, 1 << 20, 1 << 30, npages - 1].into_iter().enumerate() {
            r.add(gfn, 1, p(n as u64));
            r.add(gfn, 2, p(100 + n as u64));
        }
        let used = r.memory_bytes();
        // Chunks and directories for 8 heads, plus the top level up to the last gfn:
        // a pointer per 128 MiB, well under the 16 GiB of a flat 4K head array.
        assert!(used < 600 << 10, "{used}");
        for (n, gfn) in [0, 1 << 20, 1 << 30, npages - 1].into_iter().enumerate() {
            assert!(r.remove(gfn, 1, p(n as u64)));
            assert_eq!(r.take(gfn, 2), [p(100 + n as u64)]);
        }
        assert!(r.is_empty());
        assert!(r.heads.iter().all(GfnArray::is_empty));
    }

    #[test]
    fn chunks_are_freed_when_emptied() {
        let mut r = Rmap::new(0, 1 << 16);
        let empty = r.memory_bytes();
        for g in 0..5000 {
            r.add(g, 1, p(g));
        }
        assert!(r.memory_bytes() > empty + 5000 * 6);
        for g in 0..5000 {
            assert!(r.remove(g, 1, p(g)));
        }
        let top = r.heads[0].top.capacity() * 8;
        assert_eq!(r.memory_bytes(), empty + top);
    }

    /// KVM's pte_list as mmu.c keeps it: one pointer, or descriptor blocks newest
    /// first where only the head block may be partial.
    #[derive(Clone, Debug, Default)]
    enum KvmList {
        #[default]
        Empty,
        One(u64),
        Descs(Vec<Vec<u64>>),
    }

    impl KvmList {
        /// pte_list_add: returns the count before the add.
        fn add(&mut self, x: u64) -> usize {
            match self {
                KvmList::Empty => {
                    *self = KvmList::One(x);
                    0
                }
                KvmList::One(q) => {
                    *self = KvmList::Descs(vec![vec![*q, x]]);
                    1
                }
                KvmList::Descs(ds) => {
                    let count = ds.iter().map(Vec::len).sum();
                    if ds[0].len() == PTE_LIST_EXT {
                        ds.insert(0, Vec::new());
                    }
                    ds[0].push(x);
                    count
                }
            }
        }

        /// pte_list_remove / pte_list_desc_remove_entry.
        fn remove(&mut self, x: u64) -> bool {
            match self {
                KvmList::Empty => false,
                KvmList::One(q) => {
                    let hit = *q == x;
                    if hit {
                        *self = KvmList::Empty;
                    }
                    hit
                }
                KvmList::Descs(ds) => {
                    for k in 0..ds.len() {
                        if let Some(i) = ds[k].iter().position(|&y| y == x) {
                            let last = ds[0].pop().unwrap();
                            if !(k == 0 && i == ds[0].len()) {
                                ds[k][i] = last;
                            }
                            if ds[0].is_empty() {
                                ds.remove(0);
                                if ds.is_empty() {
                                    *self = KvmList::Empty;
                                }
                            }
                            return true;
                        }
                    }
                    false
                }
            }
        }

        fn walk(&self) -> Vec<u64> {
            match self {
                KvmList::Empty => vec![],
                KvmList::One(q) => vec![*q],
                KvmList::Descs(ds) => ds.concat(),
            }
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Add(u64, u8),
        Remove(usize),
        RemoveMissing(u64, u8),
        Take(u64, u8),
    }

    fn op(npages: u64) -> impl Strategy<Value = Op> {
        // A few hot gfns so lists grow past several descriptor blocks.
        let gfn = prop_oneof![3 => 0..4u64, 1 => 0..npages];
        let level = 1..=3u8;
        prop_oneof![
            6 => (gfn.clone(), level.clone()).prop_map(|(g, l)| Op::Add(g, l)),
            3 => any::<usize>().prop_map(Op::Remove),
            1 => (gfn.clone(), level.clone()).prop_map(|(g, l)| Op::RemoveMissing(g, l)),
            1 => (gfn, level).prop_map(|(g, l)| Op::Take(g, l)),
        ]
    }

    proptest! {
        #[test]
        fn matches_kvm_pte_list_model(
            base in prop_oneof![Just(0u64), 0..0x10_0000u64],
            ops in prop::collection::vec(op(0x900), 1..400),
        ) {
            let npages = 0x900;
            let mut r = Rmap::new(base, npages);
            // (level, frame index) -> the list KVM would hold, and the gfn last used for it.
            let mut model: BTreeMap<(u8, u64), (u64, KvmList)> = BTreeMap::new();
            let mut next = 0u64;
            for op in ops {
                let (gfn, level) = match op {
                    Op::Add(off, level) => {
                        let gfn = base + off;
                        let e = model
                            .entry((level, gfn_to_index(gfn, base, level)))
                            .or_insert((gfn, KvmList::Empty));
                        e.0 = gfn;
                        let before = e.1.add(p(next));
                        prop_assert_eq!(r.add(gfn, level, p(next)), before + 1);
                        next += 1;
                        (gfn, level)
                    }
                    Op::Remove(pick) => {
                        let all: Vec<_> = model
                            .iter()
                            .flat_map(|(&(l, _), (g, list))| list.walk().into_iter().map(move |x| (*g, l, x)))
                            .collect();
                        if all.is_empty() {
                            continue;
                        }
                        let (gfn, level, x) = all[pick % all.len()];
                        model.get_mut(&(level, gfn_to_index(gfn, base, level))).unwrap().1.remove(x);
                        prop_assert!(r.remove(gfn, level, x));
                        (gfn, level)
                    }
                    Op::RemoveMissing(off, level) => {
                        prop_assert!(!r.remove(base + off, level, p(1 << 40)));
                        (base + off, level)
                    }
                    Op::Take(off, level) => {
                        let gfn = base + off;
                        let want = model
                            .remove(&(level, gfn_to_index(gfn, base, level)))
                            .map(|(_, l)| l.walk())
                            .unwrap_or_default();
                        prop_assert_eq!(r.take(gfn, level), want);
                        (gfn, level)
                    }
                };
                let want = model
                    .get(&(level, gfn_to_index(gfn, base, level)))
                    .map(|(_, l)| l.walk())
                    .unwrap_or_default();
                prop_assert_eq!(r.iter(gfn, level).collect::<Vec<_>>(), want.clone());
                prop_assert_eq!(r.len(gfn, level), want.len());
            }
            let mut want: Vec<_> = model
                .iter()
                .flat_map(|(&(l, _), (g, list))| {
                    let shift = kvm_hpage_gfn_shift(l);
                    list.walk().into_iter().map(move |x| (g >> shift << shift, l, x))
                })
                .collect();
            let mut got: Vec<_> = r.iter_all().collect();
            want.sort();
            got.sort();
            prop_assert_eq!(r.count(), want.len());
            prop_assert_eq!(r.is_empty(), want.is_empty());
            prop_assert_eq!(got, want);
        }
    }
}
