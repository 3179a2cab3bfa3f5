//! Small simulated guests for tests, benchmarks and fuzzing: one memslot of guest
//! memory at gpa 0, one vCPU in a chosen paging mode, and host-side page-table
//! building. Guest-side activity goes through [`TestGuest::access`] and the
//! guest-op methods of the vCPU, exactly as the Python API drives them.

use std::sync::Arc;

use crate::errno::Result;
use crate::hostmem::HostRegion;
use crate::memslot::RegionIoctl;
use crate::paging::pte::{
    PT32_BASE_ADDR_MASK, PT64_BASE_ADDR_MASK, PT_ACCESSED, PT_PAGE_SIZE, PT_PRESENT, PT_USER,
    PT_WRITABLE,
};
use crate::paging::PagingMode;
use crate::uapi::kvm_userspace_memory_region2;
use crate::vcpu::guest_ops::{AccessKind, AccessOutcome, ControlReg};
use crate::vcpu::sregs::{
    CR0_PE, CR0_PG, CR0_WP, CR4_LA57, CR4_PAE, CR4_PSE, EFER_LMA, EFER_LME, EFER_NXE,
};
use crate::vcpu::Vcpu;
use crate::vm::Vm;

/// Entry flags for intermediate tables the kit creates.
pub const TABLE_FLAGS: u64 = PT_PRESENT | PT_WRITABLE | PT_USER | PT_ACCESSED;

/// A VM with one slot and one vCPU, and a bump allocator for page tables that
/// hands out pages from the top of guest memory downwards.
pub struct TestGuest {
    pub vm: Arc<Vm>,
    pub vcpu: Arc<Vcpu>,
    pub host: Arc<HostRegion>,
    pub mode: PagingMode,
    pub mem_size: u64,
    next_table: u64,
}

impl TestGuest {
    /// `mem_size` bytes of guest memory at gpa 0 and a vCPU in `mode` with an empty
    /// root table (PAE: a PDPT with four empty page directories).
    pub fn new(mode: PagingMode, mem_size: u64) -> Result<TestGuest> {
        Self::new_with_ring(mode, mem_size, 0)
    }

    /// [`TestGuest::new`] on a VM that logs through dirty rings of `ring_size` bytes
    /// (KVM_CAP_DIRTY_LOG_RING, enabled before the vCPU is created; 0: no ring).
    pub fn new_with_ring(mode: PagingMode, mem_size: u64, ring_size: u64) -> Result<TestGuest> {
        Self::build(mode, mem_size, ring_size, false)
    }

    /// [`TestGuest::new`] with two-dimensional paging instead of the shadow MMU.
    pub fn new_tdp(mode: PagingMode, mem_size: u64) -> Result<TestGuest> {
        Self::build(mode, mem_size, 0, true)
    }

    /// The general form: a dirty ring of `ring_size` bytes (0: none), TDP or shadow.
    pub fn build(mode: PagingMode, mem_size: u64, ring_size: u64, tdp: bool) -> Result<TestGuest> {
        let host = HostRegion::new(mem_size)?;
        let vm = Vm::new(0)?;
        vm.set_tdp(tdp)?;
        if ring_size != 0 {
            let mut cap = crate::uapi::kvm_enable_cap {
                cap: crate::uapi::cap::DIRTY_LOG_RING as u32,
                ..Default::default()
            };
            cap.args[0] = ring_size;
            vm.enable_cap(&cap)?;
        }
        vm.set_user_memory_region(
            &kvm_userspace_memory_region2 {
                slot: 0,
                guest_phys_addr: 0,
                memory_size: mem_size,
                userspace_addr: host.addr(),
                ..Default::default()
            },
            RegionIoctl::V2,
        )?;
        let vcpu = vm.create_vcpu(0)?;
        let mut g = TestGuest {
            vm,
            vcpu,
            host,
            mode,
            mem_size,
            next_table: mem_size,
        };
        let cr3 = g.new_root();
        {
            let mut st = g.vcpu.state();
            let s = &mut st.sregs;
            s.cr0 = CR0_PE | 0x10;
            s.cr4 = 0;
            s.efer = 0;
            match mode {
                PagingMode::None => {}
                PagingMode::Bits32 => {
                    s.cr0 |= CR0_PG | CR0_WP;
                    s.cr4 = CR4_PSE;
                }
                PagingMode::Pae => {
                    s.cr0 |= CR0_PG | CR0_WP;
                    s.cr4 = CR4_PAE | CR4_PSE;
                    s.efer = EFER_NXE;
                }
                PagingMode::Long4 | PagingMode::Long5 => {
                    s.cr0 |= CR0_PG | CR0_WP;
                    s.cr4 = CR4_PAE
                        | if mode == PagingMode::Long5 {
                            CR4_LA57
                        } else {
                            0
                        };
                    s.efer = EFER_LME | EFER_LMA | EFER_NXE;
                    s.cs.l = 1;
                }
            }
            s.cr3 = cr3;
            st.features.pdpe1gb = true;
            st.mmu.reset_pending = true;
        }
        g.reload_pdptrs();
        Ok(g)
    }

    /// PAE: load the PDPTE registers from CR3, as a MOV to CR3 does.
    pub fn reload_pdptrs(&self) {
        if self.mode != PagingMode::Pae {
            return;
        }
        let mut st = self.vcpu.state();
        let base = st.sregs.cr3 & 0xffff_ffe0;
        for i in 0..4 {
            st.pdptrs[i] = self.read_u64(base + 8 * i as u64);
        }
    }

    /// A zeroed page taken from the top of guest memory.
    pub fn alloc_page(&mut self) -> u64 {
        assert!(
            self.next_table >= 0x2000,
            "guest memory exhausted by tables"
        );
        self.next_table -= 0x1000;
        let gpa = self.next_table;
        self.host
            .write(gpa as usize, &[0u8; 4096])
            .expect("inside the region");
        gpa
    }

    /// A new, empty address space; returns its CR3.
    pub fn new_root(&mut self) -> u64 {
        let root = self.alloc_page();
        if self.mode == PagingMode::Pae {
            for i in 0..4 {
                let pd = self.alloc_page();
                self.write_u64(root + 8 * i, pd | PT_PRESENT);
            }
        }
        root
    }

    /// The lowest gpa the table allocator has used (test data should stay below).
    pub fn tables_start(&self) -> u64 {
        self.next_table
    }

    fn wide(&self) -> bool {
        self.mode != PagingMode::Bits32
    }

    /// Read a gpte-sized value at `gpa` (host side).
    pub fn read_gpte(&self, gpa: u64) -> u64 {
        if self.wide() {
            self.read_u64(gpa)
        } else {
            self.host.load(gpa as usize, 4).expect("inside the region")
        }
    }

    /// Write a gpte-sized value at `gpa` (host side: the MMU does not see it).
    pub fn write_gpte(&self, gpa: u64, v: u64) {
        if self.wide() {
            self.write_u64(gpa, v);
        } else {
            self.host
                .write(gpa as usize, &(v as u32).to_le_bytes())
                .expect("inside the region");
        }
    }

    pub fn read_u64(&self, gpa: u64) -> u64 {
        self.host.load(gpa as usize, 8).expect("inside the region")
    }

    pub fn write_u64(&self, gpa: u64, v: u64) {
        self.host
            .write(gpa as usize, &v.to_le_bytes())
            .expect("inside the region");
    }

    /// The gpa of the entry for `gva` at `level` under `cr3`, creating missing
    /// intermediate tables (host side). Level = the table level of the entry.
    pub fn entry_gpa(&mut self, cr3: u64, gva: u64, level: u8) -> u64 {
        let (root_level, bits, size) = match self.mode {
            PagingMode::None => panic!("no page tables without paging"),
            PagingMode::Bits32 => (2u8, 10u32, 4u64),
            PagingMode::Pae => (3, 9, 8),
            PagingMode::Long4 => (4, 9, 8),
            PagingMode::Long5 => (5, 9, 8),
        };
        let mask = if self.wide() {
            PT64_BASE_ADDR_MASK
        } else {
            PT32_BASE_ADDR_MASK
        };
        let mut table = if self.mode == PagingMode::Pae {
            cr3 & 0xffff_ffe0
        } else {
            cr3 & mask
        };
        let mut l = root_level;
        loop {
            let index = (gva >> (12 + bits * u32::from(l - 1))) & ((1 << bits) - 1);
            let e = table + index * size;
            if l == level {
                return e;
            }
            let v = self.read_gpte(e);
            if v & PT_PRESENT == 0 || v & PT_PAGE_SIZE != 0 {
                let t = self.alloc_page();
                let flags = if self.mode == PagingMode::Pae && l == 3 {
                    PT_PRESENT
                } else {
                    TABLE_FLAGS
                };
                self.write_gpte(e, t | flags);
                table = t;
            } else {
                table = v & mask;
            }
            l -= 1;
        }
    }

    /// Map `gva` to `gpa` with a leaf at `level` and `flags` (host side, before the
    /// guest uses it, or followed by the TLB maintenance a guest would do).
    pub fn map(&mut self, cr3: u64, gva: u64, gpa: u64, level: u8, flags: u64) {
        let e = self.entry_gpa(cr3, gva, level);
        let ps = if level > 1 { PT_PAGE_SIZE } else { 0 };
        self.write_gpte(e, gpa | flags | ps);
    }

    /// The current CR3.
    pub fn cr3(&self) -> u64 {
        self.vcpu.state().sregs.cr3
    }

    /// A guest access (see Vcpu::guest_access).
    pub fn access(&self, gva: u64, buf: &mut [u8], kind: AccessKind) -> Result<AccessOutcome> {
        self.vcpu.guest_access(gva, buf, kind)
    }

    /// A guest 8-byte read; None unless it completed.
    pub fn read(&self, gva: u64, user: bool) -> Result<AccessOutcome> {
        let mut b = [0u8; 8];
        self.access(
            gva,
            &mut b,
            AccessKind {
                user,
                ..Default::default()
            },
        )
    }

    /// A guest 8-byte write of `v`.
    pub fn write(&self, gva: u64, v: u64, user: bool) -> Result<AccessOutcome> {
        let mut b = v.to_le_bytes();
        self.access(
            gva,
            &mut b,
            AccessKind {
                write: true,
                user,
                ..Default::default()
            },
        )
    }

    /// MOV to CR3 by the guest.
    pub fn mov_cr3(&self, cr3: u64) -> Result<()> {
        self.vcpu
            .guest_write_control(ControlReg::Cr3, cr3)?
            .map_err(|_| crate::errno::Errno::EINVAL)
    }

    /// Flat 4 GiB segments at privilege `cpl` for the vCPU's mode (64-bit code in
    /// long mode), with a GDT-less selector layout: CS 0x08/0x1b, data 0x10/0x23.
    pub fn flat_segments(&self, cpl: u8) {
        let long = self.mode.is_long();
        let mut st = self.vcpu.state();
        let (cs_sel, ds_sel) = if cpl == 3 { (0x1b, 0x23) } else { (0x08, 0x10) };
        let data = crate::vcpu::emulate::flat_segment(ds_sel, 3, cpl);
        let s = &mut st.sregs;
        s.cs = crate::uapi::kvm_segment {
            selector: cs_sel,
            type_: 11,
            db: u8::from(!long),
            l: u8::from(long),
            ..data
        };
        (s.ds, s.es, s.ss, s.fs, s.gs) = (data, data, data, data, data);
    }

    /// Copy `bytes` into guest memory at `gpa` (host side).
    pub fn write_bytes(&self, gpa: u64, bytes: &[u8]) {
        self.host
            .write(gpa as usize, bytes)
            .expect("inside guest memory");
    }

    /// Read `n` bytes of guest memory at `gpa` (host side).
    pub fn read_bytes(&self, gpa: u64, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.host
            .read(gpa as usize, &mut b)
            .expect("inside guest memory");
        b
    }

    /// Assemble with iced-x86's CodeAssembler for `bitness` at `ip`.
    pub fn assemble(
        bitness: u32,
        ip: u64,
        f: impl FnOnce(
            &mut iced_x86::code_asm::CodeAssembler,
        ) -> std::result::Result<(), iced_x86::IcedError>,
    ) -> Vec<u8> {
        let mut a = iced_x86::code_asm::CodeAssembler::new(bitness).expect("bitness");
        f(&mut a).expect("assembles");
        a.assemble(ip).expect("assembles")
    }

    /// KVM_RUN: the ioctl's result and kvm_run's exit_reason.
    pub fn run(&self) -> (Result<i64>, u32) {
        let r = self.vcpu.run();
        let mut b = [0u8; 4];
        let _ = self
            .vcpu
            .run_area()
            .read(crate::uapi::run_off::EXIT_REASON, &mut b);
        (r, u32::from_le_bytes(b))
    }

    /// Bytes of the kvm_run area (the exit union starts at 32).
    pub fn run_bytes(&self, off: usize, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        let _ = self.vcpu.run_area().read(off, &mut b);
        b
    }

    /// Write bytes into the kvm_run area (userspace's side of an exit).
    pub fn put_run_bytes(&self, off: usize, b: &[u8]) {
        let _ = self.vcpu.run_area().write(off, b);
    }

    pub fn audit(&self) -> std::result::Result<(), String> {
        self.vm.audit()
    }
}
