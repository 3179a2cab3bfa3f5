//! Dirty logging's bitmap (kvm_main.c: memslot->dirty_bitmap, mark_page_dirty,
//! kvm_get_dirty_log_protect, kvm_clear_dirty_log_protect).
//!
//! The bitmap is sparse: chunks of 512 words (32768 pages, 128 MiB of guest memory)
//! are allocated on first use, and each chunk keeps a summary of its non-zero words,
//! so a harvest costs what is dirty, not what the slot spans, and an untouched 1 TiB
//! slot costs a table of chunk pointers (8192 of them). Bit `i` is page
//! `base_gfn + i`, as in KVM's little-endian bitmap.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Words per chunk.
const CHUNK_WORDS: usize = 512;
/// Pages per chunk.
pub const CHUNK_PAGES: u64 = (CHUNK_WORDS * 64) as u64;

struct Chunk {
    words: [AtomicU64; CHUNK_WORDS],
    /// Bit w: words[w] may be non-zero.
    summary: [AtomicU64; CHUNK_WORDS / 64],
}

impl Chunk {
    fn new() -> Box<Chunk> {
        Box::new(Chunk {
            words: std::array::from_fn(|_| AtomicU64::new(0)),
            summary: std::array::from_fn(|_| AtomicU64::new(0)),
        })
    }
}

/// One memslot's dirty bitmap.
pub struct DirtyBitmap {
    npages: u64,
    chunks: Box<[OnceLock<Box<Chunk>>]>,
}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DirtyBitmap({} pages, {} bytes)",
            self.npages,
            self.memory_bytes()
        )
    }
}

impl DirtyBitmap {
    pub fn new(npages: u64) -> DirtyBitmap {
        let n = npages.div_ceil(CHUNK_PAGES) as usize;
        DirtyBitmap {
            npages,
            chunks: (0..n).map(|_| OnceLock::new()).collect(),
        }
    }

    pub fn npages(&self) -> u64 {
        self.npages
    }

    /// Words of the user-visible bitmap (npages rounded up to 64 bits).
    pub fn nwords(&self) -> u64 {
        self.npages.div_ceil(64)
    }

    fn chunk(&self, c: usize) -> &Chunk {
        self.chunks[c].get_or_init(Chunk::new)
    }

    /// set_bit_le: page `rel` (slot-relative) is dirty.
    #[inline]
    pub fn set(&self, rel: u64) {
        debug_assert!(rel < self.npages);
        if rel >= self.npages {
            return;
        }
        let c = self.chunk((rel / CHUNK_PAGES) as usize);
        let w = ((rel % CHUNK_PAGES) / 64) as usize;
        let bit = 1u64 << (rel % 64);
        if c.words[w].load(Ordering::Relaxed) & bit == 0 {
            c.words[w].fetch_or(bit, Ordering::Release);
            c.summary[w / 64].fetch_or(1 << (w % 64), Ordering::Release);
        }
    }

    pub fn test(&self, rel: u64) -> bool {
        rel < self.npages
            && self.chunks[(rel / CHUNK_PAGES) as usize]
                .get()
                .is_some_and(|c| {
                    c.words[((rel % CHUNK_PAGES) / 64) as usize].load(Ordering::Acquire)
                        & (1 << (rel % 64))
                        != 0
                })
    }

    /// Every page dirty (KVM_DIRTY_LOG_INITIALLY_SET); bits past npages stay clear.
    pub fn set_all(&self) {
        for c in 0..self.chunks.len() {
            let chunk = self.chunk(c);
            let first = c as u64 * CHUNK_PAGES;
            for w in 0..CHUNK_WORDS {
                let start = first + 64 * w as u64;
                if start >= self.npages {
                    break;
                }
                let n = (self.npages - start).min(64);
                let mask = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
                chunk.words[w].store(mask, Ordering::Release);
                chunk.summary[w / 64].fetch_or(1 << (w % 64), Ordering::Release);
            }
        }
    }

    /// Visit the non-zero words, in order, as (word index, value): only the words
    /// the chunks' summaries mark are read.
    pub fn for_each_word(&self, mut f: impl FnMut(u64, u64)) {
        for (c, slot) in self.chunks.iter().enumerate() {
            let Some(chunk) = slot.get() else { continue };
            for (s, sw) in chunk.summary.iter().enumerate() {
                let mut bits = sw.load(Ordering::Acquire);
                while bits != 0 {
                    let w = s * 64 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    let v = chunk.words[w].load(Ordering::Acquire);
                    if v != 0 {
                        f((c * CHUNK_WORDS + w) as u64, v);
                    }
                }
            }
        }
    }

    /// xchg every non-zero word with 0 (GET_DIRTY_LOG without manual protect),
    /// calling `f(word index, old value)` for each.
    pub fn take_words(&self, mut f: impl FnMut(u64, u64)) {
        for (c, slot) in self.chunks.iter().enumerate() {
            let Some(chunk) = slot.get() else { continue };
            for (s, sw) in chunk.summary.iter().enumerate() {
                let mut bits = sw.swap(0, Ordering::AcqRel);
                while bits != 0 {
                    let w = s * 64 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    let v = chunk.words[w].swap(0, Ordering::AcqRel);
                    if v != 0 {
                        f((c * CHUNK_WORDS + w) as u64, v);
                    }
                }
            }
        }
    }

    /// Word `w` now (0 for an unallocated chunk).
    pub fn word(&self, w: u64) -> u64 {
        let c = (w as usize) / CHUNK_WORDS;
        self.chunks.get(c).and_then(OnceLock::get).map_or(0, |ch| {
            ch.words[(w as usize) % CHUNK_WORDS].load(Ordering::Acquire)
        })
    }

    /// atomic fetch-and-not of `mask` into word `w`: the bits actually cleared.
    pub fn clear_word(&self, w: u64, mask: u64) -> u64 {
        let c = (w as usize) / CHUNK_WORDS;
        let Some(ch) = self.chunks.get(c).and_then(OnceLock::get) else {
            return 0;
        };
        ch.words[(w as usize) % CHUNK_WORDS].fetch_and(!mask, Ordering::AcqRel) & mask
    }

    /// Model bytes held now.
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.chunks.len() * std::mem::size_of::<OnceLock<Box<Chunk>>>()
            + self.chunks.iter().filter(|c| c.get().is_some()).count()
                * std::mem::size_of::<Chunk>()
    }
}

/// KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE and KVM_DIRTY_LOG_INITIALLY_SET.
pub const MANUAL_PROTECT_ENABLE: u64 = 1;
pub const INITIALLY_SET: u64 = 2;

/// Words per tile of the copy-out: one 4 KiB page of the user's bitmap.
const TILE_WORDS: u64 = CHUNK_WORDS as u64;
/// Tiles staged per batch of writes (one process_vm_writev, one readv of /dev/zero).
const BATCH_TILES: usize = 128;

thread_local! {
    /// The copy-out's staging buffer, reused: a fresh one each GET would be mapped
    /// and faulted in every time.
    static STAGING: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A bitmap image on its way to user memory at `addr`: ranges of words are staged
/// (in increasing order), the gaps between them are zeroed (clear_user), in batches.
struct CopyOut<'a> {
    ua: &'a mut dyn crate::uaccess::UserAccess,
    addr: u64,
    nwords: u64,
    stage: &'a mut Vec<u64>,
    /// (first word, index in stage, words) per staged run.
    runs: Vec<(u64, usize, usize)>,
    /// (address, bytes) of the zero runs.
    zeros: Vec<(u64, usize)>,
    /// Words before this are staged or queued as zeros.
    done: u64,
    staged: usize,
}

impl CopyOut<'_> {
    fn flush(&mut self) -> crate::errno::Result<()> {
        use zerocopy::IntoBytes;
        self.ua.clear_user(&self.zeros)?;
        let stage = &*self.stage;
        let segs: Vec<(u64, &[u8])> = self
            .runs
            .iter()
            .map(|&(w, i, n)| (self.addr + 8 * w, stage[i..i + n].as_bytes()))
            .collect();
        self.ua.copy_to_user_segs(&segs)?;
        self.stage.clear();
        self.runs.clear();
        self.zeros.clear();
        self.staged = 0;
        Ok(())
    }

    /// Stage words `[start, end)` (zeroed; `start >= done`), for the caller to fill:
    /// their index in `stage`.
    fn stage(&mut self, start: u64, end: u64) -> crate::errno::Result<usize> {
        debug_assert!(self.done <= start && start < end && end <= self.nwords);
        if self.staged >= BATCH_TILES * TILE_WORDS as usize {
            self.flush()?;
        }
        if start > self.done {
            self.zeros
                .push((self.addr + 8 * self.done, 8 * (start - self.done) as usize));
        }
        let i = self.stage.len();
        let n = (end - start) as usize;
        self.stage.resize(i + n, 0);
        match self.runs.last_mut() {
            Some((rw, _, rn)) if *rw + *rn as u64 == start => *rn += n,
            _ => self.runs.push((start, i, n)),
        }
        self.done = end;
        self.staged += n;
        Ok(i)
    }

    fn finish(mut self) -> crate::errno::Result<()> {
        if self.done < self.nwords {
            self.zeros.push((
                self.addr + 8 * self.done,
                8 * (self.nwords - self.done) as usize,
            ));
        }
        self.flush()
    }
}

/// Marked words above which a chunk is copied whole.
const BULK_MARKED: u32 = 128;
/// Words per block of a direct copy-out (64 KiB: 16 chunks).
const DIRECT_BLOCK_WORDS: usize = 16 * CHUNK_WORDS;

/// The copy-out into core-owned memory (the user's bitmap in a GuestMemory): block
/// by block, zero the block, then `fill(first word, the block's words)` stores the
/// non-zero words while the block is in cache; no staging, no system call.
fn copy_out_direct(
    region: &crate::hostmem::HostRegion,
    off: usize,
    nwords: u64,
    mut fill: impl FnMut(u64, &[AtomicU64]),
) -> crate::errno::Result<()> {
    let mut first = 0u64;
    while first < nwords {
        let n = ((nwords - first) as usize).min(DIRECT_BLOCK_WORDS);
        let at = off + 8 * first as usize;
        crate::uaccess::clear_region(region, at, 8 * n)?;
        fill(first, region.atomic_u64s(at, n)?);
        first += n as u64;
    }
    Ok(())
}

/// The user's bitmap at `addr` as core-owned memory the copy-out may write directly.
fn direct_target(
    ua: &mut dyn crate::uaccess::UserAccess,
    addr: u64,
    nwords: u64,
) -> Option<(std::sync::Arc<crate::hostmem::HostRegion>, usize)> {
    (addr % 8 == 0)
        .then(|| ua.owned_region(addr, 8 * nwords as usize))
        .flatten()
}

/// Run `f` on a CopyOut of an `nwords`-word image at `addr`, after access_ok.
fn with_copy_out(
    ua: &mut dyn crate::uaccess::UserAccess,
    addr: u64,
    nwords: u64,
    f: impl FnOnce(&mut CopyOut<'_>) -> crate::errno::Result<()>,
) -> crate::errno::Result<()> {
    if nwords == 0 {
        return Ok(());
    }
    // access_ok on the whole image first, as copy_to_user does.
    addr.checked_add(8 * nwords)
        .filter(|&end| end <= crate::uaccess::TASK_SIZE_MAX)
        .ok_or(crate::errno::Errno::EFAULT)?;
    STAGING.with_borrow_mut(|stage| {
        stage.clear();
        let mut out = CopyOut {
            ua,
            addr,
            nwords,
            stage,
            runs: Vec::new(),
            zeros: Vec::new(),
            done: 0,
            staged: 0,
        };
        let r = f(&mut out).and_then(|()| out.finish());
        stage.clear();
        r
    })
}

/// Write the `nwords`-word bitmap whose non-zero words are `words` (in increasing
/// order) to user memory at `addr`, as copy_to_user of the whole image would: the
/// user's pages that hold a non-zero word are staged and written, the runs between
/// them are zeroed, so the cost follows the dirty pages and a zero run costs a
/// memset, not a copy.
fn copy_bitmap_out(
    ua: &mut dyn crate::uaccess::UserAccess,
    addr: u64,
    nwords: u64,
    words: impl IntoIterator<Item = (u64, u64)>,
) -> crate::errno::Result<()> {
    if let Some((r, off)) = direct_target(ua, addr, nwords) {
        let mut it = words.into_iter().peekable();
        return copy_out_direct(&r, off, nwords, |first, dst| {
            while let Some(&(w, v)) = it.peek() {
                let Some(d) = w.checked_sub(first).and_then(|i| dst.get(i as usize)) else {
                    break;
                };
                d.store(v, Ordering::Relaxed);
                it.next();
            }
        });
    }
    // Tiles follow the user's pages, so a written tile pins one page.
    let skew = (addr % 4096) / 8;
    with_copy_out(ua, addr, nwords, |out| {
        // (first word, index in stage) of the tile being filled.
        let mut tile = (0u64, 0usize);
        for (w, v) in words {
            if w >= nwords || v == 0 {
                continue;
            }
            if w >= out.done {
                let k = (w + skew) / TILE_WORDS;
                let start = (k * TILE_WORDS).saturating_sub(skew);
                let end = ((k + 1) * TILE_WORDS - skew).min(nwords);
                tile = (start, out.stage(start, end)?);
            }
            out.stage[tile.1 + (w - tile.0) as usize] = v;
        }
        Ok(())
    })
}

impl Chunk {
    /// The summary now and how many words it marks.
    fn marks(&self) -> ([u64; CHUNK_WORDS / 64], u32) {
        let summary: [u64; CHUNK_WORDS / 64] =
            std::array::from_fn(|i| self.summary[i].load(Ordering::Acquire));
        let marked = summary.iter().map(|s| s.count_ones()).sum();
        (summary, marked)
    }

    /// `put(word index in the chunk, value)` for the words of the copy-out, the
    /// indices below `len`: every word when many are marked (a bulk copy), the marked
    /// words alone otherwise (a cold chunk's other cache lines are never read).
    fn copy_out(
        &self,
        (summary, marked): ([u64; CHUNK_WORDS / 64], u32),
        len: usize,
        mut put: impl FnMut(usize, u64),
    ) {
        if marked > BULK_MARKED {
            for (w, v) in self.words[..len].iter().enumerate() {
                put(w, v.load(Ordering::Acquire));
            }
            return;
        }
        for (k, mut bits) in summary.into_iter().enumerate() {
            while bits != 0 {
                let w = k * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if w < len {
                    put(w, self.words[w].load(Ordering::Acquire));
                }
            }
        }
    }
}

/// Write a live bitmap (manual protect's GET) to user memory at `addr`: the chunks
/// whose summary marks no word are zeroed; the others are staged whole (a chunk is
/// one 4 KiB tile) by Chunk::copy_out.
fn copy_live_bitmap_out(
    ua: &mut dyn crate::uaccess::UserAccess,
    addr: u64,
    bitmap: &DirtyBitmap,
) -> crate::errno::Result<()> {
    let nwords = bitmap.nwords();
    if let Some((r, off)) = direct_target(ua, addr, nwords) {
        return copy_out_direct(&r, off, nwords, |first, dst| {
            let c0 = first as usize / CHUNK_WORDS;
            for (k, d) in dst.chunks(CHUNK_WORDS).enumerate() {
                let Some(chunk) = bitmap.chunks.get(c0 + k).and_then(OnceLock::get) else {
                    continue;
                };
                chunk.copy_out(chunk.marks(), d.len(), |w, v| {
                    d[w].store(v, Ordering::Relaxed);
                });
            }
        });
    }
    with_copy_out(ua, addr, nwords, |out| {
        for (c, slot) in bitmap.chunks.iter().enumerate() {
            let Some(chunk) = slot.get() else { continue };
            let marks = chunk.marks();
            if marks.1 == 0 {
                continue;
            }
            let start = (c * CHUNK_WORDS) as u64;
            let end = (start + CHUNK_WORDS as u64).min(nwords);
            let i = out.stage(start, end)?;
            let dst = &mut out.stage[i..i + (end - start) as usize];
            chunk.copy_out(marks, dst.len(), |w, v| dst[w] = v);
        }
        Ok(())
    })
}

impl crate::vm::Vm {
    /// The logging slot `slot` (as_id << 16 | id) and its bitmap, with KVM's errors.
    fn dirty_slot(
        st: &crate::vm::VmState,
        slot: u32,
    ) -> crate::errno::Result<(crate::memslot::MemSlot, std::sync::Arc<DirtyBitmap>)> {
        use crate::errno::Errno;
        if !st.memslots.dirty_policy.use_bitmap {
            return Err(Errno::ENXIO);
        }
        let (as_id, id) = (slot >> 16, slot & 0xffff);
        if as_id >= crate::memslot::KVM_ADDRESS_SPACE_NUM
            || id >= crate::memslot::KVM_USER_MEM_SLOTS
        {
            return Err(Errno::EINVAL);
        }
        // Only address space 0 holds slots here (no SMM).
        let s = (as_id == 0)
            .then(|| st.memslots.get(id as u16))
            .flatten()
            .ok_or(Errno::ENOENT)?;
        let b = s.dirty_bitmap.clone().ok_or(Errno::ENOENT)?;
        Ok((s.clone(), b))
    }

    /// KVM_GET_DIRTY_LOG (kvm_get_dirty_log_protect): without manual protect, take
    /// the dirty words (xchg with 0), re-protect those pages, flush, then copy the
    /// snapshot out; with it, copy the live bitmap and change nothing.
    pub fn get_dirty_log(
        &self,
        log: &crate::uapi::kvm_dirty_log,
        ua: &mut dyn crate::uaccess::UserAccess,
    ) -> crate::errno::Result<()> {
        let mut guard = self.state();
        let st = &mut *guard;
        let (slot, bitmap) = Self::dirty_slot(st, log.slot)?;
        let nwords = bitmap.nwords();
        if st.caps.manual_dirty_log & MANUAL_PROTECT_ENABLE != 0 {
            drop(guard);
            return copy_live_bitmap_out(ua, log.dirty_bitmap, &bitmap);
        }
        let taken = Self::take_and_reprotect(st, &slot, &bitmap);
        drop(guard);
        copy_bitmap_out(ua, log.dirty_bitmap, nwords, taken)
    }

    /// The harvest of GET_DIRTY_LOG without manual protect: the dirty words, taken
    /// and re-protected, then one flush if any.
    fn take_and_reprotect(
        st: &mut crate::vm::VmState,
        slot: &crate::memslot::MemSlot,
        bitmap: &DirtyBitmap,
    ) -> Vec<(u64, u64)> {
        let mut taken = Vec::new();
        bitmap.take_words(|w, v| taken.push((w, v)));
        let init_set = st.caps.manual_dirty_log & INITIALLY_SET != 0;
        for &(w, v) in &taken {
            st.mmu.reprotect_masked(slot.base_gfn + 64 * w, v, init_set);
        }
        if !taken.is_empty() {
            st.mmu.flush_remote_tlbs();
        }
        taken
    }

    /// KVM_CLEAR_DIRTY_LOG (kvm_clear_dirty_log_protect): clear the bits set both in
    /// the user's bitmap and KVM's, re-protect exactly those pages, flush if any.
    pub fn clear_dirty_log(
        &self,
        log: &crate::uapi::kvm_clear_dirty_log,
        ua: &mut dyn crate::uaccess::UserAccess,
    ) -> crate::errno::Result<()> {
        use crate::errno::Errno;
        let mut guard = self.state();
        let st = &mut *guard;
        if !st.memslots.dirty_policy.use_bitmap {
            return Err(Errno::ENXIO);
        }
        let (as_id, id) = (log.slot >> 16, log.slot & 0xffff);
        if as_id >= crate::memslot::KVM_ADDRESS_SPACE_NUM
            || id >= crate::memslot::KVM_USER_MEM_SLOTS
        {
            return Err(Errno::EINVAL);
        }
        if log.first_page & 63 != 0 {
            return Err(Errno::EINVAL);
        }
        let (slot, bitmap) = Self::dirty_slot(st, log.slot)?;
        let npages = slot.npages;
        let num = u64::from(log.num_pages);
        if log.first_page > npages
            || num > npages - log.first_page
            || (num < npages - log.first_page && num & 63 != 0)
        {
            return Err(Errno::EINVAL);
        }
        let nwords = num.div_ceil(64);
        let init_set = st.caps.manual_dirty_log & INITIALLY_SET != 0;
        let mut flush = false;
        // The user's bitmap is copied whole before anything is cleared, as KVM copies
        // it into the slot's second bitmap: a bad pointer anywhere is EFAULT with the
        // log untouched.
        let mut buf = vec![0u64; nwords as usize];
        {
            use zerocopy::IntoBytes;
            ua.copy_from_user(log.dirty_bitmap, buf.as_mut_bytes())?;
        }
        for (k, &mask) in buf.iter().enumerate() {
            if mask == 0 {
                continue;
            }
            let w = log.first_page / 64 + k as u64;
            let cleared = bitmap.clear_word(w, mask);
            if cleared != 0 {
                flush = true;
                st.mmu
                    .reprotect_masked(slot.base_gfn + 64 * w, cleared, init_set);
            }
        }
        if flush {
            st.mmu.flush_remote_tlbs();
        }
        Ok(())
    }

    /// A harvest for the model's own API: what KVM_GET_DIRTY_LOG (or, with manual
    /// protect, GET then CLEAR of everything) reports, as slot-relative page numbers,
    /// at a cost that follows the dirty pages, not the slot size.
    pub fn harvest_dirty_pages(&self, slot: u32) -> crate::errno::Result<Vec<u64>> {
        let mut guard = self.state();
        let st = &mut *guard;
        let (slot, bitmap) = Self::dirty_slot(st, slot)?;
        let taken = if st.caps.manual_dirty_log & MANUAL_PROTECT_ENABLE != 0 {
            let mut words = Vec::new();
            bitmap.for_each_word(|w, v| words.push((w, v)));
            let init_set = st.caps.manual_dirty_log & INITIALLY_SET != 0;
            let mut out = Vec::new();
            for (w, v) in words {
                let cleared = bitmap.clear_word(w, v);
                if cleared != 0 {
                    st.mmu
                        .reprotect_masked(slot.base_gfn + 64 * w, cleared, init_set);
                    out.push((w, cleared));
                }
            }
            if !out.is_empty() {
                st.mmu.flush_remote_tlbs();
            }
            out
        } else {
            Self::take_and_reprotect(st, &slot, &bitmap)
        };
        let mut pages = Vec::new();
        for (w, mut v) in taken {
            while v != 0 {
                pages.push(64 * w + u64::from(v.trailing_zeros()));
                v &= v - 1;
            }
        }
        Ok(pages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_set_take_and_copy() {
        let b = DirtyBitmap::new(1 << 28); // 1 TiB of 4 KiB pages
        assert!(b.memory_bytes() < 1 << 20, "{}", b.memory_bytes());
        for p in [0u64, 63, 64, 1 << 20, (1 << 28) - 1] {
            b.set(p);
            assert!(b.test(p));
        }
        assert!(!b.test(1));
        let mut seen = vec![];
        b.for_each_word(|w, v| seen.push((w, v)));
        assert_eq!(
            seen,
            vec![
                (0, 1 | 1 << 63),
                (1, 1),
                (1 << 14, 1),
                ((1 << 22) - 1, 1 << 63)
            ]
        );
        let mut taken = vec![];
        b.take_words(|w, v| taken.push((w, v)));
        assert_eq!(taken, seen);
        let mut after = vec![];
        b.for_each_word(|w, v| after.push((w, v)));
        assert!(after.is_empty());
    }

    #[test]
    fn set_all_stops_at_npages_and_clear_reports_cleared_bits() {
        let b = DirtyBitmap::new(70);
        b.set_all();
        assert_eq!(b.word(0), u64::MAX);
        assert_eq!(b.word(1), (1 << 6) - 1);
        assert_eq!(b.clear_word(1, 0b1100_0000_0011), 0b11);
        assert_eq!(b.word(1), (1 << 6) - 1 - 0b11);
    }

    fn region_with(nwords: usize, byte: u8) -> std::sync::Arc<crate::hostmem::HostRegion> {
        let r = crate::hostmem::HostRegion::new(8 * nwords as u64).unwrap();
        r.write(0, &vec![byte; 8 * nwords]).unwrap();
        r
    }

    fn region_words(r: &crate::hostmem::HostRegion, first: usize, n: u64) -> Vec<u64> {
        let mut b = vec![0u8; 8 * n as usize];
        r.read(8 * first, &mut b).unwrap();
        b.chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    /// The image copy_bitmap_out must leave: the words where given, zeros elsewhere.
    fn image(nwords: u64, words: &[(u64, u64)]) -> Vec<u64> {
        let mut v = vec![0u64; nwords as usize];
        for &(w, x) in words {
            v[w as usize] = x;
        }
        v
    }

    #[test]
    fn copy_out_matches_the_whole_image() {
        use crate::uaccess::ProcessVm;
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for &(nwords, ndirty) in &[
            (1u64, 1usize),
            (70, 3),
            (4096, 1000),
            (300_000, 40),
            (300_000, 20_000),
        ] {
            for skew in [0usize, 1, 5, 511] {
                let mut words: Vec<(u64, u64)> =
                    (0..ndirty).map(|_| (rnd() % nwords, rnd() | 1)).collect();
                words.sort_unstable();
                words.dedup_by_key(|e| e.0);
                // Garbage first, so every word must be written.
                let mut user = vec![0xa5a5_a5a5_a5a5_a5a5u64; nwords as usize + skew];
                let addr = user[skew..].as_mut_ptr() as u64;
                copy_bitmap_out(&mut ProcessVm, addr, nwords, words.iter().copied()).unwrap();
                assert!(
                    user[skew..] == image(nwords, &words)[..],
                    "{nwords} {ndirty} {skew}"
                );
                assert!(user[..skew].iter().all(|&x| x == 0xa5a5_a5a5_a5a5_a5a5));
                // Core-owned memory: the direct path.
                let r = region_with(nwords as usize + skew, 0xa5);
                let addr = r.addr() + 8 * skew as u64;
                copy_bitmap_out(&mut ProcessVm, addr, nwords, words.iter().copied()).unwrap();
                assert!(region_words(&r, skew, nwords) == image(nwords, &words));
                assert!(region_words(&r, 0, skew as u64)
                    .iter()
                    .all(|&x| x == 0xa5a5_a5a5_a5a5_a5a5));
            }
        }
    }

    #[test]
    fn copy_out_to_a_bad_pointer_faults() {
        use crate::errno::Errno;
        use crate::uaccess::ProcessVm;
        for words in [vec![], vec![(3u64, 1u64)], vec![(0, 1), (5000, 2)]] {
            for addr in [0u64, 0x10, crate::uaccess::TASK_SIZE_MAX - 8, u64::MAX - 7] {
                assert_eq!(
                    copy_bitmap_out(&mut ProcessVm, addr, 8192, words.iter().copied()),
                    Err(Errno::EFAULT)
                );
            }
        }
        // Read-only memory: the page of a string literal.
        static RO: [u64; 1024] = [0; 1024];
        assert_eq!(
            copy_bitmap_out(&mut ProcessVm, RO.as_ptr() as u64, 1024, [(2u64, 1u64)]),
            Err(Errno::EFAULT)
        );
        assert_eq!(
            copy_bitmap_out(&mut ProcessVm, RO.as_ptr() as u64, 1024, []),
            Err(Errno::EFAULT)
        );
        assert!(RO.iter().all(|&x| x == 0));
    }

    #[test]
    fn live_copy_out_matches_the_bitmap() {
        use crate::uaccess::ProcessVm;
        for npages in [1u64, 70, CHUNK_PAGES * 3 + 100, 1 << 22] {
            let b = DirtyBitmap::new(npages);
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            for _ in 0..200 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.set(x % npages);
            }
            // A dense first chunk: more than BULK_MARKED words, copied whole.
            for p in (0..npages.min(CHUNK_PAGES)).step_by(7) {
                b.set(p);
            }
            // A chunk whose summary marks a word that is zero again.
            b.clear_word(0, u64::MAX);
            let nwords = b.nwords();
            let mut words = vec![];
            b.for_each_word(|w, v| words.push((w, v)));
            for skew in [0usize, 3] {
                let mut user = vec![u64::MAX; nwords as usize + skew];
                let addr = user[skew..].as_mut_ptr() as u64;
                copy_live_bitmap_out(&mut ProcessVm, addr, &b).unwrap();
                assert!(user[skew..] == image(nwords, &words)[..], "{npages} {skew}");
                let r = region_with(nwords as usize + skew, 0xff);
                copy_live_bitmap_out(&mut ProcessVm, r.addr() + 8 * skew as u64, &b).unwrap();
                assert!(
                    region_words(&r, skew, nwords) == image(nwords, &words),
                    "{npages}"
                );
                assert!(region_words(&r, 0, skew as u64)
                    .iter()
                    .all(|&x| x == u64::MAX));
            }
        }
    }
}
