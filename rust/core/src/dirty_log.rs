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

    /// Visit the non-zero words, in order, as (word index, value).
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

    /// Copy words `[first, first + out.len())` into `out` (zeros where nothing is set).
    pub fn copy_words(&self, first: u64, out: &mut [u64]) {
        out.fill(0);
        let end = first + out.len() as u64;
        let mut w = first;
        while w < end {
            let c = (w as usize) / CHUNK_WORDS;
            let chunk_end = ((c + 1) * CHUNK_WORDS) as u64;
            let stop = chunk_end.min(end);
            if let Some(ch) = self.chunks.get(c).and_then(OnceLock::get) {
                for i in w..stop {
                    out[(i - first) as usize] =
                        ch.words[(i as usize) % CHUNK_WORDS].load(Ordering::Acquire);
                }
            }
            w = stop;
        }
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

/// Bytes written per copy when a bitmap goes out to user memory.
const COPY_BLOCK_WORDS: usize = 32 * 1024;

/// Write `nwords` bitmap words to user memory at `addr`, taking them from `fill`
/// (called in increasing order) through one reused block buffer.
fn copy_bitmap_out(
    ua: &mut dyn crate::uaccess::UserAccess,
    addr: u64,
    nwords: u64,
    mut fill: impl FnMut(u64, &mut [u64]),
) -> crate::errno::Result<()> {
    use zerocopy::IntoBytes;
    let mut buf = vec![0u64; (nwords as usize).min(COPY_BLOCK_WORDS)];
    let mut w = 0u64;
    while w < nwords {
        let n = ((nwords - w) as usize).min(buf.len());
        fill(w, &mut buf[..n]);
        // x86 is little-endian: the words' bytes are the kernel's bitmap layout.
        ua.copy_to_user(addr + 8 * w, buf[..n].as_bytes())?;
        w += n as u64;
    }
    Ok(())
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
            return copy_bitmap_out(ua, log.dirty_bitmap, nwords, |w, out| {
                bitmap.copy_words(w, out)
            });
        }
        let taken = Self::take_and_reprotect(st, &slot, &bitmap);
        drop(guard);
        let mut it = taken.iter().peekable();
        copy_bitmap_out(ua, log.dirty_bitmap, nwords, |first, out| {
            out.fill(0);
            while let Some(&&(w, v)) = it.peek() {
                if w >= first + out.len() as u64 {
                    break;
                }
                out[(w - first) as usize] = v;
                it.next();
            }
        })
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
        // The user's bitmap, in blocks through one buffer (it may span 32 MiB). KVM
        // copies it whole first; here a bad pointer past the first block (a slot over
        // 8 GiB) leaves the earlier blocks cleared before EFAULT.
        let mut buf = vec![0u64; (nwords as usize).min(COPY_BLOCK_WORDS)];
        let mut done = 0u64;
        while done < nwords {
            use zerocopy::IntoBytes;
            let n = ((nwords - done) as usize).min(buf.len());
            ua.copy_from_user(log.dirty_bitmap + 8 * done, buf[..n].as_mut_bytes())?;
            for (k, &mask) in buf[..n].iter().enumerate() {
                if mask == 0 {
                    continue;
                }
                let w = log.first_page / 64 + done + k as u64;
                let cleared = bitmap.clear_word(w, mask);
                if cleared != 0 {
                    flush = true;
                    st.mmu
                        .reprotect_masked(slot.base_gfn + 64 * w, cleared, init_set);
                }
            }
            done += n as u64;
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
        let mut out = [0u64; 3];
        b.copy_words(0, &mut out);
        assert_eq!(out, [1 | 1 << 63, 1, 0]);
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
}
