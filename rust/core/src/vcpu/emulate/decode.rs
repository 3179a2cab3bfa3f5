//! Instruction fetch and the decoded-instruction cache.
//!
//! A fetch translates the code page through the MMU (kind.fetch) and reads the
//! bytes from the memslot's host memory. The translation of the current code page
//! is cached until anything could change it: a page fault handled by KVM (pf_taken
//! moves), any instruction that touches control state, or a new batch (the VM lock
//! was dropped). Decoded instructions are cached by RIP and checked against the
//! code's gpa, the code size and the bytes now in memory, so self-modifying code,
//! host writes and remapped pages are always seen.

use std::sync::Arc;

use iced_x86::{Decoder, DecoderError, DecoderOptions, Instruction};

use super::{exc_ec, gp0, vector, Cpu, Exit, Stop, R};
use crate::hostmem::HostRegion;
use crate::stats::VcpuStat;
use crate::vcpu::guest_ops::{AccessKind, AccessOutcome};

const CACHE_SLOTS: usize = 4096;

#[derive(Clone, Copy, Debug)]
struct Entry {
    rip: u64,
    gpa: u64,
    bits: u32,
    /// The instruction's bytes and a mask of its length, compared as one word.
    word: u128,
    mask: u128,
    ins: Instruction,
}

/// The translation of the code page last fetched from.
#[derive(Clone, Debug)]
struct CodePage {
    lin_page: u64,
    gpa_page: u64,
    user: bool,
    pf_taken: u64,
    host: Arc<HostRegion>,
    host_off: usize,
}

#[derive(Debug, Default)]
pub struct DecodeCache {
    slots: Vec<Option<Entry>>,
    code: Option<CodePage>,
}

impl DecodeCache {
    /// Forget the cached code translation (not the decoded instructions, which
    /// are checked against memory on every use).
    pub fn invalidate_code(&mut self) {
        self.code = None;
    }

    fn slot(rip: u64) -> usize {
        ((rip ^ (rip >> 12)) as usize) & (CACHE_SLOTS - 1)
    }
}

impl Cpu<'_> {
    fn fetch_kind(&self) -> AccessKind {
        AccessKind {
            write: false,
            fetch: true,
            user: self.cpl() == 3,
            implicit: false,
        }
    }

    /// Translate the code page holding `lin` and cache it; the fetch goes through
    /// the MMU (faults, A bits, the SPTE as TLB). A fetch from no memory is an
    /// emulation failure, as on KVM.
    fn code_page(&mut self, lin: u64) -> R<()> {
        let kind = self.fetch_kind();
        let lin_page = lin & !0xfff;
        let pf_taken = self.vcpu.stats.get(VcpuStat::PfTaken as usize);
        if let Some(c) = &self.emu.decode.code {
            if c.lin_page == lin_page && c.user == kind.user {
                if c.pf_taken == pf_taken {
                    return Ok(());
                }
                // KVM handled a fault since: the code page's SPTE may have changed;
                // still the same translation through the TLB, the cache stays.
                let gpa_page = c.gpa_page;
                if let Some(gpa) = self.vcpu.tlb_probe_locked(self.st, self.vm, lin, kind)? {
                    if gpa & !0xfff == gpa_page {
                        if let Some(c) = self.emu.decode.code.as_mut() {
                            c.pf_taken = pf_taken;
                        }
                        return Ok(());
                    }
                }
            }
        }
        let mut b = [0u8; 1];
        let mut gpa = 0;
        let out = self
            .vcpu
            .access_locked_gpa(self.st, self.vm, lin, &mut b, kind, true, &mut gpa)?;
        match out {
            AccessOutcome::Done => {}
            AccessOutcome::Mmio { .. } => return Err(self.emulation_failure()),
            AccessOutcome::Fault(e) => return Err(super::walk_fault(e)),
            AccessOutcome::DirtyRingFull => return Err(Stop::Exit(Exit::DirtyRingFull)),
        }
        let gfn = gpa >> 12;
        let Some(slot) = self.vm.memslots.lookup(gfn) else {
            return Err(self.emulation_failure());
        };
        let host_off = slot.host_offset + ((gfn - slot.base_gfn) << 12) as usize;
        let host = slot.host.clone();
        // The translation may have taken a fault: read the counter again.
        let pf_taken = self.vcpu.stats.get(VcpuStat::PfTaken as usize);
        self.emu.decode.code = Some(CodePage {
            lin_page,
            gpa_page: gpa & !0xfff,
            user: kind.user,
            pf_taken,
            host,
            host_off,
        });
        Ok(())
    }

    pub fn emulation_failure(&self) -> Stop {
        Stop::Exit(Exit::Emulation {
            bytes: self.fetched_bytes(),
            len: self.insn_fetched,
        })
    }

    /// Read up to the end of the code page at `lin` into `out`; returns the count.
    fn read_code(&mut self, lin: u64, out: &mut [u8]) -> R<(usize, u64)> {
        self.code_page(lin)?;
        let Some(c) = &self.emu.decode.code else {
            return Err(Stop::Err(crate::errno::Errno::EFAULT));
        };
        let off = (lin & 0xfff) as usize;
        let n = out.len().min(4096 - off);
        let ok = if n == 15 {
            // A fixed-size copy (the common case, away from the page end).
            let mut b = [0u8; 15];
            let r = c.host.read(c.host_off + off, &mut b).is_ok();
            out[..15].copy_from_slice(&b);
            r
        } else {
            c.host.read(c.host_off + off, &mut out[..n]).is_ok()
        };
        if !ok {
            return Err(Stop::Err(crate::errno::Errno::EFAULT));
        }
        Ok((n, c.gpa_page | off as u64))
    }

    /// The bytes of the last fetch (up to 15).
    pub fn fetched_bytes(&self) -> [u8; 15] {
        let mut b = [0u8; 15];
        b.copy_from_slice(&self.insn_bytes[..15]);
        b
    }

    /// Fetch and decode the instruction at CS:RIP: the cached fast path, else
    /// [`Cpu::fetch_decode`].
    #[inline]
    pub fn fetch(&mut self) -> R<Instruction> {
        let rip = self.st.regs.rip;
        if self.mode64() {
            if let Some(ins) = self.fetch_cached(rip, rip, 64) {
                return Ok(ins);
            }
        } else {
            let cs = &self.st.sregs.cs;
            // Away from the CS limit (the slow path checks it).
            if rip.wrapping_add(15) <= u64::from(cs.limit) {
                let lin = cs.base.wrapping_add(rip) & 0xffff_ffff;
                let bits = if cs.db != 0 { 32 } else { 16 };
                if let Some(ins) = self.fetch_cached(lin, rip, bits) {
                    return Ok(ins);
                }
            }
        }
        self.fetch_decode()
    }

    /// The fast path: the code page's cached translation is current, the 16 bytes at
    /// `lin` lie in it, and the decoded-instruction cache holds these bytes at this
    /// gpa and code size.
    #[inline]
    fn fetch_cached(&mut self, lin: u64, rip: u64, bits: u32) -> Option<Instruction> {
        let off = (lin & 0xfff) as usize;
        if off > 4096 - 16 {
            return None;
        }
        let user = self.cpl() == 3;
        let c = self.emu.decode.code.as_ref()?;
        if c.lin_page != lin & !0xfff
            || c.user != user
            || c.pf_taken != self.vcpu.stats.get(VcpuStat::PfTaken as usize)
        {
            return None;
        }
        let mut w = [0u8; 16];
        c.host.read(c.host_off + off, &mut w).ok()?;
        let gpa = c.gpa_page | off as u64;
        let e = self
            .emu
            .decode
            .slots
            .get(DecodeCache::slot(rip))?
            .as_ref()?;
        let word = u128::from_le_bytes(w);
        if e.rip != rip || e.gpa != gpa || e.bits != bits || (word ^ e.word) & e.mask != 0 {
            return None;
        }
        self.insn_bytes = w;
        self.insn_fetched = 15;
        Some(e.ins)
    }

    /// Fetch and decode the instruction at CS:RIP through the MMU.
    #[inline(never)]
    pub fn fetch_decode(&mut self) -> R<Instruction> {
        let bits = self.bitness();
        let rip = self.st.regs.rip;
        self.insn_fetched = 0;
        // The CS limit outside 64-bit mode.
        let lin = if bits == 64 {
            if !crate::paging::is_canonical(rip, false) {
                return Err(gp0());
            }
            rip
        } else {
            let cs = &self.st.sregs.cs;
            if rip > u64::from(cs.limit) {
                return Err(gp0());
            }
            cs.base.wrapping_add(rip) & 0xffff_ffff
        };
        let mut bytes = [0u8; 15];
        let (n, gpa) = self.read_code(lin, &mut bytes)?;
        self.insn_bytes[..15].copy_from_slice(&bytes);
        self.insn_fetched = n as u8;
        let slot = DecodeCache::slot(rip);
        if let Some(Some(e)) = self.emu.decode.slots.get(slot) {
            let mut w = [0u8; 16];
            w[..15].copy_from_slice(&bytes);
            let word = u128::from_le_bytes(w);
            let len_ok = e.mask >> (8 * n.min(15)) == 0;
            if e.rip == rip
                && e.gpa == gpa
                && e.bits == bits
                && len_ok
                && (word ^ e.word) & e.mask == 0
            {
                return Ok(e.ins);
            }
        }
        let mut ins = Instruction::default();
        let mut total = n;
        let err = {
            let mut d = Decoder::with_ip(bits, &bytes[..n], rip, DecoderOptions::NONE);
            d.decode_out(&mut ins);
            d.last_error()
        };
        let err = if err == DecoderError::NoMoreBytes && n < 15 {
            // The instruction continues on the next page: fetch it only now (a
            // fault there is the instruction's fault, with that page's address).
            let next = (lin | 0xfff).wrapping_add(1);
            let next = if bits == 64 { next } else { next & 0xffff_ffff };
            let mut more = [0u8; 15];
            let (m, _) = self.read_code(next, &mut more[..15 - n])?;
            bytes[n..n + m].copy_from_slice(&more[..m]);
            total = n + m;
            self.insn_bytes[..15].copy_from_slice(&bytes);
            self.insn_fetched = total as u8;
            let mut d = Decoder::with_ip(bits, &bytes[..total], rip, DecoderOptions::NONE);
            d.decode_out(&mut ins);
            d.last_error()
        } else {
            err
        };
        match err {
            DecoderError::None => {}
            // Longer than 15 bytes: #GP(0); anything undecodable: #UD.
            DecoderError::NoMoreBytes if total >= 15 => return Err(gp0()),
            _ => return Err(super::exc(vector::UD)),
        }
        if bits != 64 && rip + ins.len() as u64 - 1 > u64::from(self.st.sregs.cs.limit) {
            return Err(exc_ec(vector::GP, 0));
        }
        if total == n {
            if self.emu.decode.slots.is_empty() {
                self.emu.decode.slots = vec![None; CACHE_SLOTS];
            }
            let mut w = [0u8; 16];
            w[..ins.len()].copy_from_slice(&bytes[..ins.len()]);
            let mask = (1u128 << (8 * ins.len())) - 1;
            self.emu.decode.slots[slot] = Some(Entry {
                rip,
                gpa,
                bits,
                word: u128::from_le_bytes(w),
                mask,
                ins,
            });
        }
        Ok(ins)
    }
}
