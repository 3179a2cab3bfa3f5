"""asv benchmarks of the shadow MMU through the Python API (simulator only: the
device's MMU is reached through KVM_RUN, which comes with the guest-code issue).

A 4-level guest maps NPAGES data pages; its leaf gptes have the Accessed bit
clear, so KVM's prefetch (which only prefetches accessed gptes) skips them and
every first touch is one shadow page fault. The ``track_*`` figures are computed
inside one call over many accesses (interleaved with nothing else), and reported
per second or per page; asv repeats them for a distribution.

* cold faults/s: touch each fresh page once (``vcpu.mmu.access``, CPL3 reads).
* first-touch pages/s with prefetch: the same with Accessed set (8 pages per fault).
* warm accesses/s: re-read mapped pages (the SPTEs hit, no fault).
* CR3 switches/s between N address spaces sharing their lower tables, touching
  one page after each switch: N <= 4 fits KVM's current + 3 cached roots.
* model bytes per mapped 4 KiB page (``vm.mmu.memory_bytes()`` / pages_4k).

The Rust core's own figures (criterion, no Python in the loop) are in
rust/core/benches/shadow.rs.
"""

from __future__ import annotations

import time

import kvmmmu
from kvmmmu import GuestMemory
from kvmmmu.guest.paging import A, P, PageTables, U, W

MiB = 1 << 20
PAGE = 4096
NPAGES = 8192
DATA = 1 * MiB
GVA = 0x4000_0000
CR0_PE, CR0_WP, CR0_PG = 1, 1 << 16, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA, EFER_NXE = 1 << 8, 1 << 10, 1 << 11


class _Mem:
    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.mem.read(gpa, length))

    def write(self, gpa: int, data: bytes) -> None:
        self.mem.write(gpa, data)


class Guest:
    """A simulator VM: 64 MiB at gpa 0, one vCPU in 4-level paging, `n` pages mapped
    at GVA (user-writable; `accessed` sets the leaves' A bit), `spaces` address spaces
    that share every table below their PML4."""

    def __init__(self, n: int = NPAGES, *, accessed: bool = False, spaces: int = 1) -> None:
        size = 64 * MiB
        self.kvm = kvmmmu.Kvm()
        self.vm = self.kvm.create_vm()
        self.host = GuestMemory(size)
        self.vm.set_user_memory_region(0, 0, size, self.host.address)
        mem = _Mem(self.host)
        self.pt = PageTables(mem, "4-level", pool=48 * MiB, pool_size=16 * MiB)
        flags = P | W | U | (A if accessed else 0)
        for i in range(n):
            self.pt.map(GVA + i * PAGE, DATA + i * PAGE, flags=flags)
            # Host memory is populated up front, as a VMM's usually is: the figures
            # are the MMU's, not the host kernel's first-touch page faults.
            mem.write(DATA + i * PAGE, i.to_bytes(8, "little"))
        self.cr3s = [self.pt.cr3]
        for _ in range(spaces - 1):
            root = self.pt.alloc()
            mem.write(root, mem.read(self.pt.cr3, PAGE))
            self.cr3s.append(root)
        self.vcpu = self.vm.create_vcpu(0)
        s = self.vcpu.get_sregs()
        s.cr3 = self.pt.cr3
        s.cr0 = CR0_PE | CR0_WP | CR0_PG
        s.cr4 = CR4_PAE
        s.efer = EFER_LME | EFER_LMA | EFER_NXE
        s.cs.l = 1
        self.vcpu.set_sregs(s)
        self.mmu = self.vcpu.mmu

    def touch_all(self, n: int = NPAGES) -> float:
        """Seconds to read each of the first `n` pages once at CPL3."""
        access = self.mmu.access
        t = time.perf_counter()
        for i in range(n):
            access(GVA + i * PAGE, 8, cpl=3)
        return time.perf_counter() - t

    def close(self) -> None:
        # The memory goes with the last reference (vm.mmu views may still hold the VM).
        self.vcpu.close()
        self.vm.close()
        self.kvm.close()


class ColdFaults:
    """First touch of fresh pages: one shadow fault per page."""

    unit = "faults/s"
    timeout = 300

    def setup(self) -> None:
        self.g = Guest()

    def teardown(self) -> None:
        self.g.close()

    def track_cold_faults_per_s(self) -> float:
        dt = self.g.touch_all()
        faults = self.g.vcpu.stats()["pf_fixed"]
        assert faults == NPAGES, faults
        return NPAGES / dt


class FirstTouchWithPrefetch:
    """Fresh pages whose gptes are accessed: the fault path prefetches 8 at a time."""

    unit = "pages/s"
    timeout = 300

    def setup(self) -> None:
        self.g = Guest(accessed=True)

    def teardown(self) -> None:
        self.g.close()

    def track_first_touch_pages_per_s(self) -> float:
        return NPAGES / self.g.touch_all()


class WarmAccesses:
    """Reads that hit present SPTEs (the simulated TLB): no fault."""

    unit = "accesses/s"
    timeout = 300

    def setup(self) -> None:
        self.g = Guest(n=1024)
        self.g.touch_all(1024)

    def teardown(self) -> None:
        self.g.close()

    def track_warm_accesses_per_s(self) -> float:
        dt = sum(self.g.touch_all(1024) for _ in range(8))
        return 8 * 1024 / dt


class Cr3Switch:
    """MOV CR3 among N address spaces, touching one page after each switch."""

    params = [2, 4, 16]
    param_names = ["spaces"]
    unit = "switches/s"
    timeout = 300

    def setup(self, spaces: int) -> None:
        self.g = Guest(n=64, spaces=spaces)

    def teardown(self, spaces: int) -> None:
        self.g.close()

    def track_cr3_switches_per_s(self, spaces: int) -> float:
        mmu, cr3s = self.g.mmu, self.g.cr3s
        rounds = 256
        t = time.perf_counter()
        for r in range(rounds):
            for k, cr3 in enumerate(cr3s):
                mmu.load_cr3(cr3)
                mmu.access(GVA + ((r + k) % 64) * PAGE, 8, cpl=3)
        return rounds * len(cr3s) / (time.perf_counter() - t)


class ModelMemory:
    """Model metadata per mapped 4 KiB page (target: at most 24 bytes)."""

    unit = "bytes"
    timeout = 300

    def setup(self) -> None:
        self.g = Guest(n=NPAGES)
        self.g.touch_all()

    def teardown(self) -> None:
        self.g.close()

    def track_bytes_per_mapped_page(self) -> float:
        pages = self.g.vm.stats()["pages_4k"]
        assert isinstance(pages, int) and pages >= NPAGES
        return self.g.vm.mmu.memory_bytes() / pages
