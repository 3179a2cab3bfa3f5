//! Binary statistics (KVM_GET_STATS_FD): KVM's counters by KVM's names.
//!
//! Each VM and vCPU owns a memfd laid out exactly as the kernel's stats file:
//! `struct kvm_stats_header`, the id string, the descriptors, then the u64 data.
//! The counters *are* the data words of that file (updated atomically through a
//! shared mapping), so userspace reads live values with pread on the descriptor
//! KVM_GET_STATS_FD returns, the same code as for the device.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;

use crate::errno::{Errno, Result};
use crate::hostmem::SharedMapping;

/// KVM_STATS_NAME_SIZE.
pub const NAME_SIZE: usize = 48;
const HEADER_SIZE: usize = 24;
const DESC_SIZE: usize = 16 + NAME_SIZE;

/// Descriptor flags (include/uapi/linux/kvm.h): type bits 0-3, unit 4-7, base 8-11.
pub const TYPE_CUMULATIVE: u32 = 0;
pub const TYPE_INSTANT: u32 = 1;
pub const TYPE_PEAK: u32 = 2;
pub const UNIT_BOOLEAN: u32 = 4 << 4;

macro_rules! stat_table {
    ($(#[$m:meta])* $enum:ident, $table:ident { $($variant:ident = ($name:literal, $flags:expr)),* $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(usize)]
        pub enum $enum { $($variant),* }
        /// (name, flags) per counter, in data order.
        pub const $table: &[(&str, u32)] = &[$(($name, $flags)),*];
    };
}

stat_table!(
    /// VM-wide counters (struct kvm_vm_stat's MMU part), by their KVM names.
    VmStat, VM_STATS {
        RemoteTlbFlush = ("remote_tlb_flush", TYPE_CUMULATIVE),
        RemoteTlbFlushRequests = ("remote_tlb_flush_requests", TYPE_CUMULATIVE),
        MmuShadowZapped = ("mmu_shadow_zapped", TYPE_CUMULATIVE),
        MmuPteWrite = ("mmu_pte_write", TYPE_CUMULATIVE),
        MmuPdeZapped = ("mmu_pde_zapped", TYPE_CUMULATIVE),
        MmuFlooded = ("mmu_flooded", TYPE_CUMULATIVE),
        MmuRecycled = ("mmu_recycled", TYPE_CUMULATIVE),
        MmuCacheMiss = ("mmu_cache_miss", TYPE_CUMULATIVE),
        MmuUnsync = ("mmu_unsync", TYPE_INSTANT),
        Pages4k = ("pages_4k", TYPE_INSTANT),
        Pages2m = ("pages_2m", TYPE_INSTANT),
        Pages1g = ("pages_1g", TYPE_INSTANT),
        NxLpageSplits = ("nx_lpage_splits", TYPE_INSTANT),
        MaxMmuPageHashCollisions = ("max_mmu_page_hash_collisions", TYPE_PEAK),
        MaxMmuRmapSize = ("max_mmu_rmap_size", TYPE_PEAK),
    }
);

stat_table!(
    /// Per-vCPU counters (struct kvm_vcpu_stat's fault, exit and emulation part).
    VcpuStat, VCPU_STATS {
        PfTaken = ("pf_taken", TYPE_CUMULATIVE),
        PfFixed = ("pf_fixed", TYPE_CUMULATIVE),
        PfEmulate = ("pf_emulate", TYPE_CUMULATIVE),
        PfSpurious = ("pf_spurious", TYPE_CUMULATIVE),
        PfFast = ("pf_fast", TYPE_CUMULATIVE),
        PfMmioSpteCreated = ("pf_mmio_spte_created", TYPE_CUMULATIVE),
        PfGuest = ("pf_guest", TYPE_CUMULATIVE),
        TlbFlush = ("tlb_flush", TYPE_CUMULATIVE),
        Invlpg = ("invlpg", TYPE_CUMULATIVE),
        Exits = ("exits", TYPE_CUMULATIVE),
        IoExits = ("io_exits", TYPE_CUMULATIVE),
        MmioExits = ("mmio_exits", TYPE_CUMULATIVE),
        SignalExits = ("signal_exits", TYPE_CUMULATIVE),
        HaltExits = ("halt_exits", TYPE_CUMULATIVE),
        InsnEmulation = ("insn_emulation", TYPE_CUMULATIVE),
        InsnEmulationFail = ("insn_emulation_fail", TYPE_CUMULATIVE),
        IrqInjections = ("irq_injections", TYPE_CUMULATIVE),
        NmiInjections = ("nmi_injections", TYPE_CUMULATIVE),
        Blocking = ("blocking", TYPE_INSTANT | UNIT_BOOLEAN),
        GuestMode = ("guest_mode", TYPE_INSTANT | UNIT_BOOLEAN),
    }
);

/// One stats file: its memfd and the live data words.
pub struct StatsFile {
    memfd: OwnedFd,
    map: SharedMapping,
    data_offset: usize,
    len: usize,
}

impl std::fmt::Debug for StatsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StatsFile({} counters)", self.len)
    }
}

impl StatsFile {
    /// Lay out header, id, descriptors and zeroed data in a new memfd.
    pub fn new(memfd_name: &str, id: &str, table: &[(&str, u32)]) -> Result<StatsFile> {
        let name = std::ffi::CString::new(memfd_name).map_err(|_| Errno::EINVAL)?;
        let memfd = nix::sys::memfd::memfd_create(
            name.as_c_str(),
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .map_err(Errno::from)?;
        let id_offset = HEADER_SIZE;
        let desc_offset = id_offset + NAME_SIZE;
        let data_offset = desc_offset + DESC_SIZE * table.len();
        let size = data_offset + 8 * table.len();
        nix::unistd::ftruncate(&memfd, size as i64).map_err(Errno::from)?;
        let map = SharedMapping::new(memfd.as_fd(), size)?;
        let mut header = Vec::with_capacity(data_offset);
        for v in [
            0u32,
            NAME_SIZE as u32,
            table.len() as u32,
            id_offset as u32,
            desc_offset as u32,
            data_offset as u32,
        ] {
            header.extend_from_slice(&v.to_le_bytes());
        }
        let mut idb = [0u8; NAME_SIZE];
        let n = id.len().min(NAME_SIZE - 1);
        idb[..n].copy_from_slice(&id.as_bytes()[..n]);
        header.extend_from_slice(&idb);
        for (i, (name, flags)) in table.iter().enumerate() {
            header.extend_from_slice(&flags.to_le_bytes());
            header.extend_from_slice(&0i16.to_le_bytes()); // exponent
            header.extend_from_slice(&1u16.to_le_bytes()); // size: one u64
            header.extend_from_slice(&((8 * i) as u32).to_le_bytes()); // offset in data
            header.extend_from_slice(&0u32.to_le_bytes()); // bucket_size
            let mut nb = [0u8; NAME_SIZE];
            nb[..name.len()].copy_from_slice(name.as_bytes());
            header.extend_from_slice(&nb);
        }
        map.write(0, &header)?;
        Ok(StatsFile {
            memfd,
            map,
            data_offset,
            len: table.len(),
        })
    }

    #[inline]
    fn word(&self, i: usize) -> &std::sync::atomic::AtomicU64 {
        &self
            .map
            .atomic_u64s(self.data_offset, self.len)
            .expect("stats words inside the mapping")[i]
    }

    // Writers are serialized by their owner's lock (the VM lock for VM counters, the
    // vCPU's state lock for its counters), like KVM's per-vCPU and mmu_lock-protected
    // stats, so an update is a plain load and store: no locked instruction on the
    // fault path. Readers (pread of the stats fd) see whole 8-byte words.

    pub fn add(&self, i: usize, n: u64) {
        let w = self.word(i);
        w.store(w.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }
    pub fn sub(&self, i: usize, n: u64) {
        let w = self.word(i);
        w.store(w.load(Ordering::Relaxed).wrapping_sub(n), Ordering::Relaxed);
    }
    pub fn set(&self, i: usize, v: u64) {
        self.word(i).store(v, Ordering::Relaxed);
    }
    pub fn max(&self, i: usize, v: u64) {
        let w = self.word(i);
        if v > w.load(Ordering::Relaxed) {
            w.store(v, Ordering::Relaxed);
        }
    }
    pub fn get(&self, i: usize) -> u64 {
        self.word(i).load(Ordering::Relaxed)
    }

    /// A new read-only descriptor of the file, with its own file offset, as each
    /// KVM_GET_STATS_FD call gives.
    pub fn open_fd(&self) -> Result<OwnedFd> {
        let path = format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&self.memfd)
        );
        let f = std::fs::OpenOptions::new()
            .read(true)
            .open(path)
            .map_err(Errno::from)?;
        Ok(OwnedFd::from(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn layout_matches_the_kernel_format() {
        let s = StatsFile::new("t", "kvm-1", VM_STATS).unwrap();
        s.add(VmStat::Pages4k as usize, 3);
        s.max(VmStat::MaxMmuRmapSize as usize, 7);
        s.max(VmStat::MaxMmuRmapSize as usize, 5);
        let f = std::fs::File::from(s.open_fd().unwrap());
        let mut h = [0u8; 24];
        f.read_exact_at(&mut h, 0).unwrap();
        let w = |i: usize| u32::from_le_bytes(h[4 * i..4 * i + 4].try_into().unwrap());
        assert_eq!(
            (w(0), w(1), w(2), w(3), w(4)),
            (0, 48, VM_STATS.len() as u32, 24, 72)
        );
        let data = w(5) as u64;
        let mut v = [0u8; 8];
        f.read_exact_at(&mut v, data + 8 * VmStat::Pages4k as u64)
            .unwrap();
        assert_eq!(u64::from_le_bytes(v), 3);
        f.read_exact_at(&mut v, data + 8 * VmStat::MaxMmuRmapSize as u64)
            .unwrap();
        assert_eq!(u64::from_le_bytes(v), 7);
        let mut d = [0u8; DESC_SIZE];
        f.read_exact_at(&mut d, 72 + DESC_SIZE as u64 * VmStat::MmuUnsync as u64)
            .unwrap();
        assert_eq!(&d[16..26], b"mmu_unsync");
        assert_eq!(
            u32::from_le_bytes(d[0..4].try_into().unwrap()),
            TYPE_INSTANT
        );
        // read-only
        assert!(f.write_at(b"x", 0).is_err());
    }
}
