"""Dirty logging through the Python API: KVM_GET/CLEAR_DIRTY_LOG, manual protect and
INITIALLY_SET, the dirty ring, the VMM's own log and ``vm.harvest_dirty``.

The argument and error rules run on both backends (they need no guest code), so the
simulator is compared with the device. The scenarios with guest writes are those of
reference/real-kvm-here.md section 3, run on the simulator through ``vcpu.mmu``
(the device API has no KVM_RUN yet): slot 1 is 64 pages at 16 MiB with logging, the
page tables live in slot 0, which is not logged, and the results are exact page lists.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
from collections.abc import Iterator

import numpy as np
import pytest

import kvmmmu
from kvmmmu import GuestMemory, dirty, uapi
from kvmmmu.guest.paging import P, PageTables, U, W

MiB = 1 << 20
PAGE = 4096
LOG = uapi.KVM_MEM_LOG_DIRTY_PAGES
#: The logged slot: NPAGES pages at SLOT1_GPA.
SLOT1_GPA = 16 * MiB
NPAGES = 64
#: Guest page i of slot 1 is mapped at GVA + i * PAGE.
GVA = 0x4000_0000
#: A second window whose page directory and last-level table live in slot 1 (pages
#: PD_PAGE and PT_PAGE): the walker's A/D updates then write logged pages.
GVA2 = 0x8000_0000
PT_PAGE, PD_PAGE = 40, 41
CR0_PE, CR0_WP, CR0_PG = 1, 1 << 16, 1 << 31
CR4_PAE, EFER_LME, EFER_LMA, EFER_NXE = 1 << 5, 1 << 8, 1 << 10, 1 << 11
ALL = np.iinfo(np.uint64).max


def errno_of(exc: pytest.ExceptionInfo[OSError]) -> int:
    return int(exc.value.errno or 0)


def raises_errno(code: int) -> pytest.RaisesContext[OSError]:
    return pytest.raises(OSError, match=rf"\[Errno {code}\]")


def listed(bitmap: np.ndarray) -> list[int]:
    return dirty.pages(bitmap).tolist()


# -- a VM with a logged slot (both backends) ------------------------------------------------


class Slots:
    """A VM of `kvm` with slot 1 = `npages` pages at SLOT1_GPA (flags `flags`)."""

    def __init__(self, kvm: kvmmmu.Kvm, npages: int = NPAGES, flags: int = LOG) -> None:
        self.kvm = kvm
        self.vm = kvm.create_vm()
        self.npages = npages
        self.mem = GuestMemory(npages * PAGE)
        self.flags = flags

    def add(self, flags: int | None = None) -> Slots:
        if flags is not None:
            self.flags = flags
        self.vm.set_user_memory_region(1, SLOT1_GPA, self.npages * PAGE, self.mem, self.flags)
        return self

    def close(self) -> None:
        self.vm.close()


@pytest.fixture
def slots(kvm: kvmmmu.Kvm) -> Iterator[Slots]:
    s = Slots(kvm)
    yield s
    s.close()


# -- helpers of kvmmmu.dirty -------------------------------------------------------------------


def test_pages_bitmap_ranges_helpers() -> None:
    bm = np.array([1 | 1 << 63, 0, 1 << 5], dtype=np.uint64)
    assert dirty.pages(bm).tolist() == [0, 63, 133]
    assert dirty.pages(bm).dtype == np.uint64
    assert dirty.pages(np.zeros(4, dtype=np.uint64)).tolist() == []
    assert dirty.bitmap([0, 63, 133], 134).tolist() == bm.tolist()
    with pytest.raises(ValueError, match="outside"):
        dirty.bitmap([134], 134)
    assert dirty.ranges([0, 1, 2, 7, 9, 10, 9]) == [(0, 3), (7, 1), (9, 2)]
    assert dirty.ranges([]) == []
    assert dirty.nwords(64) == 1 and dirty.nwords(65) == 2 and dirty.nwords(0) == 0
    rng = np.random.default_rng(1)
    p = np.unique(rng.integers(0, 100_000, 5000)).astype(np.uint64)
    assert np.array_equal(dirty.pages(dirty.bitmap(p, 100_000)), p)
    assert sum(c for _, c in dirty.ranges(p)) == p.size


# -- KVM_GET_DIRTY_LOG: shapes and errors, on both backends ------------------------------------


def test_fresh_log_is_empty_and_sized_by_the_slot(kvm: kvmmmu.Kvm) -> None:
    for npages, words in ((64, 1), (70, 2), (1, 1), (512, 8)):
        s = Slots(kvm, npages).add()
        bm = s.vm.get_dirty_log(1)
        assert bm.dtype == np.uint64 and bm.shape == (words,)
        assert listed(bm) == []
        s.close()


def test_host_writes_are_not_logged_but_write_guest_is(slots: Slots) -> None:
    slots.add()
    vm = slots.vm
    slots.mem.write(3 * PAGE, b"host")
    np.frombuffer(slots.mem, dtype=np.uint8)[5 * PAGE] = 7
    assert listed(vm.get_dirty_log(1)) == [], "host writes through the mapping: not logged"
    vm.write_guest(SLOT1_GPA + 9 * PAGE + 4094, b"abcd")  # crosses into page 10
    assert slots.mem.read(9 * PAGE + 4094, 4) == b"abcd"
    assert vm.read_guest(SLOT1_GPA + 9 * PAGE + 4094, 4) == b"abcd"
    assert listed(vm.get_dirty_log(1)) == [], "KVM does not see the VMM's writes either"
    assert vm.harvest_dirty(1).tolist() == [9, 10]
    assert vm.harvest_dirty(1).tolist() == []
    with raises_errno(errno.EFAULT):
        vm.write_guest(SLOT1_GPA + NPAGES * PAGE, b"x")
    with raises_errno(errno.EFAULT):
        vm.write_guest(SLOT1_GPA + NPAGES * PAGE - 1, b"xy")  # runs off the slot


def test_get_dirty_log_errors(slots: Slots) -> None:
    vm = slots.vm
    with raises_errno(errno.ENOENT):
        vm.get_dirty_log(1)  # no such slot
    slots.add(0)
    with raises_errno(errno.ENOENT):
        vm.get_dirty_log(1)  # a slot without logging
    with raises_errno(errno.ENOENT):
        vm.harvest_dirty(1)
    # id >= KVM_USER_MEM_SLOTS; address space 1 (one address space here: the device
    # reports KVM_CAP_MULTI_ADDRESS_SPACE 0) and 2.
    for bad in (0xFFFF, 1 << 16 | 1, 2 << 16 | 1):
        with raises_errno(errno.EINVAL):
            vm.get_dirty_log(bad)
    slots.add(LOG)
    assert listed(vm.get_dirty_log(1)) == []
    slots.add(0)  # a flags-only change turns logging off again
    with raises_errno(errno.ENOENT):
        vm.get_dirty_log(1)


# -- KVM_CLEAR_DIRTY_LOG's argument rules, on both backends ------------------------------------


@pytest.mark.parametrize("manual", [False, True], ids=["plain", "manual"])
def test_clear_dirty_log_argument_rules(kvm: kvmmmu.Kvm, manual: bool) -> None:
    s = Slots(kvm, 256)
    if manual:
        s.vm.enable_manual_dirty_log()
    vm = s.vm
    with raises_errno(errno.ENOENT):
        vm.clear_dirty_log(1, 0, 64)
    s.add(0)
    with raises_errno(errno.ENOENT):
        vm.clear_dirty_log(1, 0, 64)
    s.add(LOG)
    einval = [
        (1, 64),  # first_page not a multiple of 64
        (0, 1),  # num not a multiple of 64, not reaching the end
        (0, 65),
        (64, 65),
        (0, 257),  # past the end
        (192, 128),
        (320, 0),  # first_page > npages
    ]
    for first, num in einval:
        with raises_errno(errno.EINVAL):
            vm.clear_dirty_log(1, first, num)
    for first, num in ((0, 0), (256, 0), (0, 64), (64, 192), (0, 256), (192, 64)):
        vm.clear_dirty_log(1, first, num)  # returns 0
    with raises_errno(errno.EINVAL):
        vm.clear_dirty_log(0xFFFF, 0, 64)
    s.close()
    # A slot whose size is not a multiple of 64: the last partial word reaches the end.
    s = Slots(kvm, 70).add()
    s.vm.clear_dirty_log(1, 64, 6)
    s.vm.clear_dirty_log(1, 0, 70)
    for first, num in ((64, 5), (0, 69), (64, 7), (128, 0)):
        with raises_errno(errno.EINVAL):
            s.vm.clear_dirty_log(1, first, num)
    with raises_errno(errno.EINVAL):
        s.vm.clear_dirty_log(1, 70, 0)  # first_page = npages, but not a multiple of 64
    with pytest.raises(ValueError, match="bitmap words"):
        s.vm.clear_dirty_log(1, 0, 70, np.zeros(1, dtype=np.uint64))
    s.close()


def test_the_64_page_slot_of_the_reference(slots: Slots) -> None:
    """real-kvm-here.md 3: first_page=1 -> EINVAL, num=1 or 65 -> EINVAL, num=0 -> 0,
    first_page=64 (= npages) with num=0 -> 0."""
    slots.vm.enable_manual_dirty_log()
    slots.add()
    vm = slots.vm
    for first, num in ((1, 64), (0, 1), (0, 65)):
        with raises_errno(errno.EINVAL):
            vm.clear_dirty_log(1, first, num)
    vm.clear_dirty_log(1, 0, 0)
    vm.clear_dirty_log(1, 64, 0)


# -- KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 and INITIALLY_SET, on both backends ---------------------


def test_manual_protect_cap_arguments(kvm: kvmmmu.Kvm) -> None:
    cap = uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
    assert kvm.check_extension(cap) == 3
    vm = kvm.create_vm()
    assert vm.check_extension(cap) == 3
    for bad in (2, 4, 7, 1 << 63):  # INITIALLY_SET alone; unknown bits
        with raises_errno(errno.EINVAL):
            vm.enable_cap(cap, bad)
    with raises_errno(errno.EINVAL):
        vm.enable_cap(cap, 1, flags=1)
    for ok in (1, 3, 0):
        vm.enable_cap(cap, ok)
    assert vm.dirty_mode == "bitmap", "0 turns manual protect off again"
    vm.enable_manual_dirty_log(initially_set=True)
    assert vm.dirty_mode == "manual"
    vm.close()


def test_initially_set_reports_every_page_until_cleared(kvm: kvmmmu.Kvm) -> None:
    s = Slots(kvm, 70)
    s.vm.enable_manual_dirty_log(initially_set=True)
    s.add()
    vm = s.vm
    bm = vm.get_dirty_log(1)
    assert bm.tolist() == [int(ALL), (1 << 6) - 1], "every page, nothing past npages"
    assert listed(vm.get_dirty_log(1)) == list(range(70)), "GET does not clear"
    vm.clear_dirty_log(1, 0, 70, dirty.bitmap([2], 70))
    assert listed(vm.get_dirty_log(1)) == [p for p in range(70) if p != 2]
    vm.clear_dirty_log(1, 64, 6, np.array([0b101], dtype=np.uint64))
    assert listed(vm.get_dirty_log(1))[-4:] == [65, 67, 68, 69]
    vm.clear_dirty_log(1)
    assert listed(vm.get_dirty_log(1)) == []
    s.close()


def test_manual_without_initially_set_starts_empty(kvm: kvmmmu.Kvm) -> None:
    s = Slots(kvm)
    s.vm.enable_manual_dirty_log()
    s.add()
    assert listed(s.vm.get_dirty_log(1)) == []
    assert s.vm.harvest_dirty(1).tolist() == []
    s.close()


def test_initially_set_harvest_takes_everything_once(kvm: kvmmmu.Kvm) -> None:
    s = Slots(kvm)
    s.vm.enable_manual_dirty_log(initially_set=True)
    s.add()
    assert s.vm.harvest_dirty(1).tolist() == list(range(64))
    assert s.vm.harvest_dirty(1).tolist() == []
    s.close()


def test_plain_mode_get_clears(kvm: kvmmmu.Kvm) -> None:
    """Without manual protect, INITIALLY_SET does not apply (it needs bit 0), and
    CLEAR_DIRTY_LOG is accepted all the same (the kernel does not check the cap)."""
    s = Slots(kvm).add()
    assert s.vm.dirty_mode == "bitmap"
    s.vm.clear_dirty_log(1)
    assert listed(s.vm.get_dirty_log(1)) == []
    s.close()


# -- the dirty ring: caps, sizes, errors, the mapping; on both backends ------------------------

RING_CAPS = [uapi.KVM_CAP_DIRTY_LOG_RING, uapi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL]


@pytest.mark.parametrize("acq_rel", [False, True], ids=["ring", "acq_rel"])
def test_dirty_ring_sizes(kvm: kvmmmu.Kvm, acq_rel: bool) -> None:
    cap = RING_CAPS[acq_rel]
    assert kvm.check_extension(cap) == 1 << 20
    for size, code in ((0, errno.EINVAL), (1000, errno.EINVAL), (2048, errno.EINVAL)):
        with raises_errno(code):
            kvm.create_vm().enable_dirty_ring(size, acq_rel)
    for size, code in ((3 * 4096, errno.EINVAL), (2 << 20, errno.E2BIG), (1 << 31, errno.E2BIG)):
        with raises_errno(code):
            kvm.create_vm().enable_dirty_ring(size, acq_rel)
    for size in (4096, 8192, 65536, 1 << 20):
        vm = kvm.create_vm()
        vm.enable_dirty_ring(size, acq_rel)
        assert vm.dirty_mode == "ring"
        with raises_errno(errno.EINVAL):
            vm.enable_dirty_ring(size, acq_rel)  # only once
        vm.close()


def test_dirty_ring_size_is_a_u32(kvm: kvmmmu.Kvm) -> None:
    """kvm_vm_ioctl_enable_dirty_log_ring takes the size as a u32: args[0] is truncated,
    so 2**40 is a size of 0 (EINVAL) and 2**32 + 4096 a size of 4096 (accepted)."""
    with raises_errno(errno.EINVAL):
        kvm.create_vm().enable_cap(uapi.KVM_CAP_DIRTY_LOG_RING, 1 << 40)
    kvm.create_vm().enable_cap(uapi.KVM_CAP_DIRTY_LOG_RING, (1 << 32) + 4096)


@pytest.mark.parametrize("acq_rel", [False, True], ids=["ring", "acq_rel"])
def test_dirty_ring_mode_errors_and_mapping(kvm: kvmmmu.Kvm, acq_rel: bool) -> None:
    s = Slots(kvm)
    vm = s.vm
    with raises_errno(errno.EINVAL):
        vm.reset_dirty_rings()  # no ring
    vm.enable_dirty_ring(65536, acq_rel)
    s.add()
    with raises_errno(errno.ENXIO):
        vm.get_dirty_log(1)
    with raises_errno(errno.ENXIO):
        vm.clear_dirty_log(1, 0, 64)
    with raises_errno(errno.ENXIO):
        vm.get_dirty_log(5)  # ENXIO comes before the slot lookup
    vcpu = vm.create_vcpu(0)
    ring = vcpu.dirty_ring
    assert ring is not None and len(ring) == 4096 and ring.entries.dtype == dirty.RING_DTYPE
    assert not ring.entries["flags"].any(), "a new ring is empty"
    assert ring.harvest()[0].size == 0
    assert vm.reset_dirty_rings() == 0
    assert vm.harvest_dirty(1).tolist() == []
    with raises_errno(errno.ENOENT):
        vm.harvest_dirty(5)  # the API's answer for a slot that does not log
    with raises_errno(errno.EINVAL):
        vm.enable_dirty_ring(65536, acq_rel)  # after a vCPU
    # The VMM's writes still reach the harvest in ring mode.
    vm.write_guest(SLOT1_GPA + 7 * PAGE, b"x")
    assert vm.harvest_dirty(1).tolist() == [7]
    vcpu.close()
    s.close()


def test_rings_outlive_their_vcpu_descriptor_until_the_vm_closes(kvm: kvmmmu.Kvm) -> None:
    s = Slots(kvm)
    s.vm.enable_dirty_ring(4096)
    s.add()
    vcpu = s.vm.create_vcpu(0)
    ring = vcpu.dirty_ring
    assert ring is not None
    vcpu.close()
    assert not ring.closed and ring.harvest()[0].size == 0
    assert s.vm.harvest_dirty(1).tolist() == []
    s.vm.close()
    assert ring.closed
    with pytest.raises(ValueError, match="closed"):
        ring.harvest()


def test_ring_after_a_vcpu_and_other_caps_keep_ring_off(kvm: kvmmmu.Kvm) -> None:
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    with raises_errno(errno.EINVAL):
        vm.enable_dirty_ring(4096)
    assert vm.dirty_mode == "bitmap" and vcpu.dirty_ring is None
    vcpu.close()
    vm.close()


@pytest.mark.parametrize("mode", ["bitmap", "ring"])
def test_translate_a_bit_updates_are_logged(kvm: kvmmmu.Kvm, mode: str) -> None:
    """KVM_TRANSLATE walks the guest's tables and sets their A bits: KVM writes, logged
    in the bitmap or pushed to the vCPU's ring (the vCPU ioctl runs with the vCPU
    loaded). The tables (gfns 256..259) are in the logged slot 0."""
    vm = kvm.create_vm()
    if mode == "ring":
        vm.enable_dirty_ring(4096)
    mem = GuestMemory(8 * MiB)
    vm.set_user_memory_region(0, 0, 8 * MiB, mem, LOG)
    pt = PageTables(mem, "4-level", pool=1 * MiB, pool_size=1 * MiB)
    pt.map(GVA, 2 * MiB, flags=P | W | U)
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid2(kvm.get_supported_cpuid())
    s = vcpu.get_sregs()
    s.cr3, s.cr0, s.cr4, s.efer = pt.cr3, CR0_PE | CR0_WP | CR0_PG, CR4_PAE, EFER_LME | EFER_LMA
    s.cs.l = 1
    vcpu.set_sregs(s)
    assert vm.harvest_dirty(0).tolist() == []
    assert vcpu.translate(GVA + 0x123).physical_address == 2 * MiB + 0x123
    if mode == "ring":
        ring = vcpu.dirty_ring
        assert ring is not None
        slots_, offsets = ring.harvest()
        assert slots_.tolist() == [0] * 4 and offsets.tolist() == [256, 257, 258, 259]
        assert vm.reset_dirty_rings() == 4
    else:
        assert listed(vm.get_dirty_log(0)) == [256, 257, 258, 259]
    vcpu.translate(GVA + 0x123)  # the A bits are set already
    assert vm.harvest_dirty(0).tolist() == []
    vcpu.close()
    vm.close()


def test_dirty_ring_cap_ignores_flags(kvm: kvmmmu.Kvm) -> None:
    """The generic KVM_ENABLE_CAP path of the ring does not look at cap.flags, unlike
    MANUAL_DIRTY_LOG_PROTECT2 and the x86 caps."""
    vm = kvm.create_vm()
    vm.enable_cap(uapi.KVM_CAP_DIRTY_LOG_RING, 4096, flags=1)
    assert vm.dirty_mode == "ring"
    vm.close()


# -- guest writes on the simulator: real-kvm-here.md section 3 ---------------------------------


class LogGuest:
    """A simulated VM: slot 0 (8 MiB at 0, not logged) holds the page tables, slot 1
    (`npages` pages at SLOT1_GPA, from `mem`) is the logged one, mapped user-writable
    at GVA; `vcpus` vCPUs in 4-level paging. Page PT_PAGE of slot 1 is the last-level
    table of the GVA2 window (see :meth:`map_window`)."""

    def __init__(
        self,
        npages: int = NPAGES,
        *,
        vcpus: int = 1,
        ring: int = 0,
        ring_acq_rel: bool = False,
        manual: int = 0,
        hugepages: bool = False,
        map_pages: bool = True,
    ) -> None:
        self.kvm = kvmmmu.Kvm()
        self.vm = self.kvm.create_vm()
        self.npages = npages
        if manual:
            self.vm.enable_cap(uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, manual)
        if ring:
            self.vm.enable_dirty_ring(ring, ring_acq_rel)
        self.tables = GuestMemory(8 * MiB)
        self.vm.set_user_memory_region(0, 0, 8 * MiB, self.tables)
        # Slot 1's host address agrees with its gpa in the low 21 bits (huge pages).
        self.host = GuestMemory(npages * PAGE + 2 * MiB, hugepages=hugepages)
        self.offset = -self.host.address % (2 * MiB)
        self.mem = np.frombuffer(self.host, dtype=np.uint8)[
            self.offset : self.offset + npages * PAGE
        ].reshape(npages, PAGE)
        self.pt = PageTables(self.tables, "4-level", pool=1 * MiB, pool_size=4 * MiB)
        if map_pages:
            for i in range(npages):
                self.pt.map(GVA + i * PAGE, SLOT1_GPA + i * PAGE, flags=P | W | U)
        self.set_flags(0)
        cpuid = self.kvm.get_supported_cpuid()
        self.vcpus = []
        for i in range(vcpus):
            v = self.vm.create_vcpu(i)
            v.set_cpuid2(cpuid)
            s = v.get_sregs()
            s.cr3 = self.pt.cr3
            s.cr0 = CR0_PE | CR0_WP | CR0_PG
            s.cr4 = CR4_PAE
            s.efer = EFER_LME | EFER_LMA | EFER_NXE
            s.cs.l = 1
            v.set_sregs(s)
            self.vcpus.append(v)
        self.vcpu = self.vcpus[0]

    def set_flags(self, flags: int) -> None:
        self.vm.set_user_memory_region(
            1, SLOT1_GPA, self.npages * PAGE, self.host.address + self.offset, flags
        )

    def write(self, pages: list[int], *, cpl: int = 3, vcpu: int = 0, value: int = 1) -> None:
        for p in pages:
            self.vcpus[vcpu].mmu.write(GVA + p * PAGE + 8, value + p, cpl=cpl)
        self.vm.mmu.audit()

    def read(self, pages: list[int], *, cpl: int = 3) -> None:
        for p in pages:
            self.vcpu.mmu.read(GVA + p * PAGE, cpl=cpl)

    def log(self) -> list[int]:
        bm = self.vm.get_dirty_log(1)
        self.vm.mmu.audit()
        return listed(bm)

    def clear(self, pages: list[int] | None = None) -> None:
        bm = None if pages is None else dirty.bitmap(pages, self.npages)
        self.vm.clear_dirty_log(1, 0, self.npages, bm)
        self.vm.mmu.audit()

    def ring(self, vcpu: int = 0) -> dirty.DirtyRing:
        r = self.vcpus[vcpu].dirty_ring
        assert r is not None
        return r

    def map_window(self) -> None:
        """GVA2 + i * PAGE -> slot-1 page i, through a page directory in slot-1 page
        PD_PAGE and a last-level table in PT_PAGE (written by the host, so not logged),
        linked from slot 0's PDPT."""
        pd_gpa, pt_gpa = (SLOT1_GPA + p * PAGE for p in (PD_PAGE, PT_PAGE))
        ptes = np.zeros(512, dtype=np.uint64)
        ptes[: self.npages] = [(SLOT1_GPA + i * PAGE) | P | W | U for i in range(self.npages)]
        self.mem[PT_PAGE] = ptes.view(np.uint8)
        pdes = np.zeros(512, dtype=np.uint64)
        pdes[0] = pt_gpa | P | W | U
        self.mem[PD_PAGE] = pdes.view(np.uint8)
        self.pt.map(GVA2, SLOT1_GPA, flags=P | W | U)  # builds the PML4 entry and PDPT
        self.pt.set_entry(GVA2, 3, pd_gpa | P | W | U)

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vm.close()
        self.kvm.close()


@pytest.fixture
def guest() -> Iterator[LogGuest]:
    g = LogGuest()
    yield g
    g.close()


@pytest.mark.parametrize("cpl", [0, 3])
def test_get_dirty_log_reports_exactly_the_written_pages(cpl: int) -> None:
    g = LogGuest()
    g.read([0, 3, 10], cpl=cpl)  # SPTEs exist before logging starts
    g.write([5], cpl=cpl)
    g.set_flags(LOG)
    g.vm.mmu.audit()
    assert g.log() == [], "turning logging on logs nothing"
    g.write([0, 3, 7, 8, 63], cpl=cpl)
    g.read([10], cpl=cpl)
    assert g.log() == [0, 3, 7, 8, 63]
    assert g.log() == [], "GET cleared the log"
    g.write([1, 3], cpl=cpl)
    assert g.log() == [1, 3], "write protection was re-armed"
    g.write([1, 3], cpl=cpl)
    g.write([1, 3], cpl=cpl)
    assert g.log() == [1, 3]
    g.host.write(g.offset + 20 * PAGE, b"host")
    g.mem[21, 0] = 9
    assert g.log() == [], "host writes are not logged"
    assert int.from_bytes(g.host.read(g.offset + 3 * PAGE + 8, 8), "little") == 1 + 3
    g.close()


def test_manual_protect_get_keeps_clear_rearms(guest: LogGuest) -> None:
    g = guest
    g.vm.enable_manual_dirty_log()
    g.write([2, 4])  # before logging: writable SPTEs exist
    g.set_flags(LOG)
    assert g.log() == []
    g.clear()
    g.write([2, 4, 40])
    assert g.log() == [2, 4, 40]
    assert g.log() == [2, 4, 40], "GET does not clear in manual mode"
    g.clear([2])
    assert g.log() == [4, 40]
    g.write([4])  # still writable: no new information, nothing changes
    assert g.log() == [4, 40]
    g.write([2])  # re-protected by the CLEAR: logged again
    assert g.log() == [2, 4, 40]
    g.clear()
    g.write([2, 5])
    assert g.log() == [2, 5]
    assert g.vm.harvest_dirty(1).tolist() == [2, 5]
    assert g.log() == []


def test_initially_set_protects_nothing_until_clear(guest: LogGuest) -> None:
    g = guest
    g.vm.enable_manual_dirty_log(initially_set=True)
    g.write([1, 2])
    g.set_flags(LOG)
    assert g.log() == list(range(NPAGES))
    g.clear([p for p in range(NPAGES) if p != 1])
    assert g.log() == [1]
    g.write([2, 9])  # cleared words are write-protected now
    assert g.log() == [1, 2, 9]
    g.clear()
    assert g.log() == []
    g.write([1])
    assert g.log() == [1]


def test_walker_ad_updates_and_emulated_writes_are_logged(guest: LogGuest) -> None:
    """The walker's A/D updates mark the tables' pages, and so does a guest store to a
    shadowed page directory, which KVM write-protects and emulates (a last-level table
    may go unsync instead: then the store is an ordinary logged write)."""
    g = guest
    g.map_window()
    g.set_flags(LOG)
    g.vcpu.mmu.read(GVA2 + 3 * PAGE, cpl=3)
    assert g.log() == [PT_PAGE, PD_PAGE], "the walker set A in the PDE and the PTE"
    g.vcpu.mmu.write(GVA2 + 3 * PAGE, 5, cpl=3)
    assert g.log() == [3, PT_PAGE], "D in the PTE, and the data page"
    g.vcpu.mmu.read(GVA2 + 4 * PAGE, cpl=3)
    assert g.log() == [PT_PAGE], "A in the PTE of page 4"
    emulated = g.vcpu.stats()["pf_emulate"]
    pde0 = int(g.mem[PD_PAGE].view(np.uint64)[0])
    g.vcpu.mmu.write(GVA + PD_PAGE * PAGE, pde0, cpl=3)
    assert g.vcpu.stats()["pf_emulate"] == emulated + 1  # type: ignore[operator]
    assert g.vm.stats()["mmu_pte_write"] == 1
    assert g.log() == [PD_PAGE], "the emulated store"
    pte3 = int(g.mem[PT_PAGE].view(np.uint64)[3])
    g.vcpu.mmu.write(GVA + PT_PAGE * PAGE + 8 * 3, pte3, cpl=3)
    assert g.log() == [PT_PAGE]


@pytest.mark.parametrize("acq_rel", [False, True], ids=["ring", "acq_rel"])
def test_dirty_ring_entries_and_reset(acq_rel: bool) -> None:
    g = LogGuest(ring=65536, ring_acq_rel=acq_rel)
    assert g.vm.dirty_mode == "ring"
    g.set_flags(LOG)
    ring = g.ring()
    g.write([0, 9, 33])
    e = ring.entries
    assert e[:4].tolist() == [(1, 1, 0), (1, 1, 9), (1, 1, 33), (0, 0, 0)]
    assert ring.pending() == 3
    slots_, offsets = ring.harvest()
    assert slots_.tolist() == [1, 1, 1] and offsets.tolist() == [0, 9, 33]
    assert e["flags"][:3].tolist() == [dirty.RESET] * 3
    assert g.vm.reset_dirty_rings() == 3
    assert e["flags"][:3].tolist() == [0, 0, 0]
    g.write([9, 12])
    assert e[3:6].tolist() == [(1, 1, 9), (1, 1, 12), (0, 0, 0)]
    assert ring.harvest()[1].tolist() == [9, 12]
    assert g.vm.reset_dirty_rings() == 2
    g.write([9, 12, 9])
    assert ring.harvest()[1].tolist() == [9, 12], "one entry per page made writable"
    assert g.vm.reset_dirty_rings() == 2
    assert g.vm.reset_dirty_rings() == 0
    with raises_errno(errno.ENXIO):
        g.vm.get_dirty_log(1)
    g.close()


def test_dirty_ring_harvest_is_in_order_and_may_stop_early() -> None:
    g = LogGuest(ring=4096)
    g.set_flags(LOG)
    ring = g.ring()
    g.write(list(range(10)))
    assert ring.harvest(limit=4)[1].tolist() == [0, 1, 2, 3]
    assert g.vm.reset_dirty_rings() == 4
    assert ring.harvest()[1].tolist() == list(range(4, 10))
    assert g.vm.reset_dirty_rings() == 6
    g.close()


def test_dirty_ring_soft_limit_stops_the_vcpu_until_reset() -> None:
    """4096 bytes = 256 entries, 64 reserved: the vCPU stops after 192 entries
    (KVM_RUN would exit with KVM_EXIT_DIRTY_RING_FULL); the access did not happen."""
    g = LogGuest(256, ring=4096)
    g.set_flags(LOG)
    g.write(list(range(192)))
    with pytest.raises(kvmmmu.DirtyRingFull):
        g.vcpu.mmu.write(GVA + 200 * PAGE, 0xAB, cpl=3)
    assert g.mem[200, 0] == 0
    assert g.vm.harvest_dirty(1).tolist() == list(range(192))
    g.vcpu.mmu.write(GVA + 200 * PAGE, 0xAB, cpl=3)
    assert g.vm.harvest_dirty(1).tolist() == [200]
    g.close()


def test_dirty_ring_wraps_around() -> None:
    g = LogGuest(256, ring=4096)
    g.set_flags(LOG)
    seen = []
    for round_ in range(6):  # 6 x 150 entries through a 256-entry ring
        pages = [(round_ * 37 + k) % 256 for k in range(150)]
        g.write(pages)
        seen.append(g.vm.harvest_dirty(1).tolist())
        assert seen[-1] == sorted(pages)
    assert g.ring().fetch_index == 900
    g.close()


def test_ring_entries_of_other_slots_wait_for_their_harvest() -> None:
    g = LogGuest(ring=65536)
    g.set_flags(LOG)
    extra = GuestMemory(16 * PAGE)
    g.vm.set_user_memory_region(2, 32 * MiB, 16 * PAGE, extra, LOG)
    for i in range(16):
        g.pt.map(GVA2 + i * PAGE, 32 * MiB + i * PAGE, flags=P | W | U)
    g.write([4, 6])
    for i in (3, 1):
        g.vcpu.mmu.write(GVA2 + i * PAGE, 1, cpl=3)
    assert g.vm.harvest_dirty(1).tolist() == [4, 6]
    g.vcpu.mmu.write(GVA2 + 5 * PAGE, 1, cpl=3)
    assert g.vm.harvest_dirty(2).tolist() == [1, 3, 5]
    assert g.vm.harvest_dirty(2).tolist() == []
    g.close()


@pytest.mark.parametrize("mode", ["bitmap", "manual", "ring"])
def test_harvest_dirty_unites_guest_and_vmm_writes(mode: str) -> None:
    g = LogGuest(
        vcpus=2,
        ring=65536 if mode == "ring" else 0,
        manual=1 if mode == "manual" else 0,
    )
    assert g.vm.dirty_mode == mode
    g.set_flags(LOG)
    g.write([1, 2], vcpu=0)
    g.write([2, 50], vcpu=1)
    g.vm.write_guest(SLOT1_GPA + 30 * PAGE, b"dev")
    g.vm.write_guest(SLOT1_GPA + 2 * PAGE, b"dev")
    assert g.vm.harvest_dirty(1).tolist() == [1, 2, 30, 50]
    assert g.vm.harvest_dirty(1).tolist() == []
    g.write([50], vcpu=0)
    g.write([1], vcpu=1)
    assert g.vm.harvest_dirty(1).tolist() == [1, 50]
    if mode == "manual":
        assert g.log() == [], "the harvest cleared what it returned"
    g.close()


def test_huge_pages_split_while_logging_and_recover_after() -> None:
    """kvm-mmu-semantics.md 8.2: turning logging on write-protects the 2 MiB SPTE and
    later faults map 4 KiB; turning it off zaps the small SPTEs so that huge mappings
    come back."""
    g = LogGuest(512, hugepages=True, map_pages=False)
    g.pt.map(GVA, SLOT1_GPA, size=2 * MiB, flags=P | W | U)

    def stat(name: str) -> int:
        v = g.vm.stats()[name]
        assert isinstance(v, int)
        return v

    def level(page: int) -> int:
        return g.vm.mmu.rmap((SLOT1_GPA >> 12) + page)[0].level

    g.write([0])
    assert stat("pages_2m") == 1 and level(0) == 2
    g.set_flags(LOG)
    g.vm.mmu.audit()
    g.read([3])  # reads may keep using the write-protected huge SPTE
    assert g.log() == []
    g.write([5])
    assert stat("pages_2m") == 0, "the write split the huge page"
    assert level(5) == 1
    assert g.log() == [5]
    g.write([6, 7])
    assert g.log() == [6, 7]
    g.set_flags(0)
    g.vm.mmu.audit()
    g.write([6])
    assert stat("pages_2m") == 1, "logging off: huge again"
    assert level(6) == 2
    with raises_errno(errno.ENOENT):
        g.vm.get_dirty_log(1)
    g.close()


def test_clear_dirty_log_with_a_bad_bitmap_tail_clears_nothing(kvm: kvmmmu.Kvm) -> None:
    """KVM copies the whole user bitmap before clearing: a bitmap whose last page is
    unreadable is EFAULT with the log untouched (here past 256 KiB of bitmap, a slot
    over 8 GiB)."""
    npages = (1 << 21) + 64 * 512
    nbytes = npages // 8
    s = Slots(kvm, npages)
    s.vm.enable_manual_dirty_log(initially_set=True)
    s.add()
    area = mmap.mmap(-1, nbytes)
    area.write(b"\xff" * nbytes)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(area))
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mprotect(ctypes.c_void_p(addr + nbytes - PAGE), PAGE, 0) == 0  # PROT_NONE
    log = uapi.kvm_clear_dirty_log(slot=1, num_pages=npages, first_page=0, dirty_bitmap=addr)
    with raises_errno(errno.EFAULT):
        s.vm.ioctl(uapi.KVM_CLEAR_DIRTY_LOG, log)
    bits = np.unpackbits(s.vm.get_dirty_log(1).view(np.uint8)).sum()
    assert int(bits) == npages, "no page was cleared"
    libc.mprotect(ctypes.c_void_p(addr + nbytes - PAGE), PAGE, 3)
    s.close()
