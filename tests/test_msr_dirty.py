"""The dirty log's contents on both backends, without KVM_RUN: KVM's own writes to guest
memory through the paravirtual wall-clock MSRs, and the KVM_GET/SET_MSRS rules.

KVM_SET_MSRS of MSR_KVM_WALL_CLOCK_NEW (or the old MSR_KVM_WALL_CLOCK) with data = gpa
makes KVM run kvm_write_wall_clock at that gpa: read the u32 version; make it even and add
one; write it; write the whole {version, sec, nsec}; add one and write the version again.
Each of the three is a kvm_write_guest that logs every page it writes: three entries in the
ring of the vCPU whose ioctl it is, or the page's bit in the bitmap.

Observed on the device (kernel 6.18.44, PVM vendor module, Intel host) and required of the
simulator: a write inside page 5 of the logged slot gives ring entries (1, 5) x 3 and bitmap
[5]; a write straddling pages 7 and 8 gives (1, 7), (1, 8) three times; one straddling the
end of the logged slot into a slot without logging gives (1, 63) x 3; writes into a slot
without logging, a read-only slot, outside memory or at gpa 0 log nothing and still succeed;
a version found odd (5) ends at 8. The sec/nsec fields are the wall clock and differ.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Any

import pytest

import kvmmmu
from kvmmmu import GuestMemory, dirty, uapi

MiB = 1 << 20
PAGE = 4096
LOG = uapi.KVM_MEM_LOG_DIRTY_PAGES
MSR_EFER = 0xC000_0080
WALL_CLOCK = 0x11
WALL_CLOCK_NEW = 0x4B56_4D00
UNKNOWN = 0x1234_5678
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE = 1, 1 << 8, 1 << 10, 1 << 11

#: Slot 1: NPAGES logged pages at SLOT1; slot 2: 4 pages right after it, not logged;
#: slot 3: 4 read-only pages at RO.
SLOT1 = 16 * MiB
NPAGES = 64
SLOT2 = SLOT1 + NPAGES * PAGE
RO = 32 * MiB

#: (label, MSR, gpa) of the wall-clock writes, one at a time.
WRITES = [
    ("in page 5", WALL_CLOCK_NEW, SLOT1 + 5 * PAGE + 8),
    ("old MSR across pages 7-8", WALL_CLOCK, SLOT1 + 7 * PAGE + PAGE - 2),
    ("page 5 again", WALL_CLOCK_NEW, SLOT1 + 5 * PAGE + 8),
    ("odd version in page 3", WALL_CLOCK_NEW, SLOT1 + 3 * PAGE),
    ("across the end of slot 1", WALL_CLOCK_NEW, SLOT2 - 6),
    ("slot without logging", WALL_CLOCK_NEW, SLOT2 + PAGE),
    ("across the end of memory", WALL_CLOCK, SLOT2 + 4 * PAGE - 6),
    ("read-only slot", WALL_CLOCK_NEW, RO),
    ("outside memory", WALL_CLOCK_NEW, 1 << 30),
    ("gpa 0", WALL_CLOCK_NEW, 0),
    ("page 62, the last write", WALL_CLOCK, SLOT1 + 62 * PAGE + 100),
]


class Guest:
    """A VM with the three slots in dirty-log `mode` and vCPUs 0 and 1."""

    def __init__(self, kvm: kvmmmu.Kvm, mode: str) -> None:
        self.mode = mode
        self.vm = kvm.create_vm()
        if mode == "manual":
            self.vm.enable_manual_dirty_log()
        elif mode == "ring":
            self.vm.enable_dirty_ring(4096)
        self.mem1 = GuestMemory(NPAGES * PAGE)
        self.mem2 = GuestMemory(4 * PAGE)
        self.mem3 = GuestMemory(4 * PAGE)
        self.vm.set_user_memory_region(1, SLOT1, NPAGES * PAGE, self.mem1, LOG)
        self.vm.set_user_memory_region(2, SLOT2, 4 * PAGE, self.mem2, 0)
        self.vm.set_user_memory_region(3, RO, 4 * PAGE, self.mem3, uapi.KVM_MEM_READONLY)
        self.vcpus = [self.vm.create_vcpu(0), self.vm.create_vcpu(1)]
        # A version KVM finds odd: 5 becomes 6, written 7, then 8.
        self.mem1.write(3 * PAGE, (5).to_bytes(4, "little"))

    def close(self) -> None:
        self.vm.close()

    def read(self, gpa: int, n: int) -> bytes:
        for base, size, mem in (
            (SLOT1, NPAGES * PAGE, self.mem1),
            (SLOT2, 4 * PAGE, self.mem2),
            (RO, 4 * PAGE, self.mem3),
        ):
            if base <= gpa and gpa + n <= base + size:
                return mem.read(gpa - base, n)
        return b""

    def harvest(self) -> Any:
        """What KVM logged since the last harvest, in this mode: the page list of slot 1
        (bitmap, manual) or each vCPU's ring entries (slot, offset) in order."""
        if self.mode == "ring":
            out = []
            for v in self.vcpus:
                assert v.dirty_ring is not None
                slots, offsets = v.dirty_ring.harvest()
                out.append(list(zip(slots.tolist(), offsets.tolist(), strict=True)))
            reset = self.vm.reset_dirty_rings()
            assert reset == sum(len(e) for e in out)
            return out
        bitmap = self.vm.get_dirty_log(1)
        if self.mode == "manual":
            self.vm.clear_dirty_log(1, 0, NPAGES, bitmap)
        return dirty.pages(bitmap).tolist()


MODES = ["bitmap", "manual", "ring"]


def scenario(kvm: kvmmmu.Kvm, mode: str) -> list[tuple[str, Any]]:
    """Every observation of the wall-clock writes: return counts, the log after each
    write and once more (empty), the versions left in memory, the MSR read back."""
    g = Guest(kvm, mode)
    try:
        seen: list[tuple[str, Any]] = [("initial log", g.harvest())]
        for i, (label, msr, gpa) in enumerate(WRITES):
            vcpu = g.vcpus[i % 2]  # the ring is the writing vCPU's
            seen.append((label + ": set", vcpu.set_msrs([(msr, gpa)])))
            seen.append((label + ": log", g.harvest()))
            seen.append((label + ": log again", g.harvest()))
            seen.append((label + ": version", g.read(gpa, 4)))
            seen.append((label + ": get", vcpu.get_msrs([WALL_CLOCK, WALL_CLOCK_NEW])))
        # Several writes in one ioctl, one failing MSR stopping the batch.
        batch = [
            (WALL_CLOCK_NEW, SLOT1 + 10 * PAGE),
            (WALL_CLOCK, SLOT1 + 11 * PAGE + 40),
            (WALL_CLOCK_NEW, SLOT1 + 10 * PAGE),
            (UNKNOWN, 0),
            (WALL_CLOCK_NEW, SLOT1 + 12 * PAGE),
        ]
        seen.append(("batch: set", g.vcpus[0].set_msrs(batch)))
        seen.append(("batch: log", g.harvest()))
        seen.append(("batch: log again", g.harvest()))
        seen.append(("batch: versions", [g.read(gpa, 4) for _, gpa in batch[:3] + batch[4:]]))
        seen.append(("batch: get", g.vcpus[1].get_msrs([WALL_CLOCK_NEW])))
        return seen
    finally:
        g.close()


@pytest.fixture
def both(sim_kvm: kvmmmu.Kvm, dev_kvm: kvmmmu.Kvm) -> Iterator[tuple[kvmmmu.Kvm, kvmmmu.Kvm]]:
    yield sim_kvm, dev_kvm


@pytest.mark.parametrize("mode", MODES)
def test_wall_clock_log_matches_the_device(both: tuple[kvmmmu.Kvm, kvmmmu.Kvm], mode: str) -> None:
    sim, dev = (scenario(k, mode) for k in both)
    assert [label for label, _ in sim] == [label for label, _ in dev]
    for (label, s), (_, d) in zip(sim, dev, strict=True):
        assert s == d, f"{mode}, {label}: simulator {s!r}, device {d!r}"


@pytest.mark.parametrize("mode", MODES)
def test_wall_clock_log_contents(kvm: kvmmmu.Kvm, mode: str) -> None:
    """The device's observations, written out (the simulator must give the same)."""
    seen = dict(scenario(kvm, mode))

    def v(n: int) -> bytes:
        return n.to_bytes(4, "little")

    if mode == "ring":
        assert seen["in page 5: log"] == [[(1, 5)] * 3, []]
        assert seen["old MSR across pages 7-8: log"] == [[], [(1, 7), (1, 8)] * 3]
        assert seen["across the end of slot 1: log"] == [[(1, 63)] * 3, []]
        assert seen["batch: log"] == [[(1, 10)] * 3 + [(1, 11)] * 3 + [(1, 10)] * 3, []]
        nothing: Any = [[], []]
    else:
        assert seen["in page 5: log"] == [5]
        assert seen["old MSR across pages 7-8: log"] == [7, 8]
        assert seen["across the end of slot 1: log"] == [63]
        assert seen["batch: log"] == [10, 11]
        nothing = []
    assert seen["initial log"] == nothing
    for label, _, _ in WRITES:
        assert seen[label + ": set"] == 1
        assert seen[label + ": log again"] == nothing
    for label in (
        "slot without logging",
        "across the end of memory",
        "read-only slot",
        "outside memory",
        "gpa 0",
    ):
        assert seen[label + ": log"] == nothing, label
    assert seen["in page 5: version"] == v(2)
    assert seen["page 5 again: version"] == v(4)
    assert seen["odd version in page 3: version"] == v(8)
    assert seen["across the end of slot 1: version"] == v(2)
    assert seen["slot without logging: version"] == v(2)
    assert seen["across the end of memory: version"] == v(2)
    assert seen["read-only slot: version"] == v(0)
    assert seen["outside memory: get"] == [1 << 30] * 2
    assert seen["gpa 0: get"] == [0, 0]
    assert seen["batch: set"] == 3
    assert seen["batch: versions"] == [v(4), v(2), v(4), v(0)]
    assert seen["batch: get"] == [SLOT1 + 10 * PAGE]


# -- KVM_GET/SET_MSRS rules (both backends) -------------------------------------------------


@pytest.fixture
def vcpu(kvm: kvmmmu.Kvm) -> Iterator[kvmmmu.Vcpu]:
    vm = kvm.create_vm()
    yield vm.create_vcpu(0)
    vm.close()


def test_msr_counts(vcpu: kvmmmu.Vcpu) -> None:
    assert vcpu.get_msrs([]) == []
    assert vcpu.set_msrs([]) == 0
    assert vcpu.get_msrs([WALL_CLOCK, WALL_CLOCK_NEW, MSR_EFER]) == [0, 0, 0]
    # An unknown MSR stops the batch: nothing after it is done.
    assert vcpu.set_msrs([(UNKNOWN, 0), (MSR_EFER, EFER_SCE)]) == 0
    assert vcpu.set_msrs([(MSR_EFER, EFER_NXE), (UNKNOWN, 0), (MSR_EFER, EFER_SCE)]) == 1
    assert vcpu.get_sregs().efer == EFER_NXE
    assert vcpu.get_msrs([MSR_EFER, WALL_CLOCK, UNKNOWN, MSR_EFER]) == [EFER_NXE, 0]
    # MAX_IO_MSRS: 255 entries pass, 256 are E2BIG.
    assert vcpu.set_msrs([(MSR_EFER, 0)] * 255) == 255
    assert len(vcpu.get_msrs([MSR_EFER] * 255)) == 255
    for call in (
        lambda: vcpu.set_msrs([(MSR_EFER, 0)] * 256),
        lambda: vcpu.get_msrs([MSR_EFER] * 256),
    ):
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno == errno.E2BIG


def test_efer_host_writes(vcpu: kvmmmu.Vcpu) -> None:
    # Host-initiated: only SCE, LME, LMA and NXE may be set; LMA is kept as it was.
    for bad in (1 << 1, 1 << 12, 1 << 13, 1 << 14, 1 << 15, 1 << 21, 1 << 63):
        assert vcpu.set_msrs([(MSR_EFER, bad)]) == 0, hex(bad)
    assert vcpu.set_msrs([(MSR_EFER, EFER_LMA)]) == 1
    assert vcpu.get_msrs([MSR_EFER]) == [0]
    assert vcpu.set_msrs([(MSR_EFER, EFER_SCE | EFER_LME | EFER_NXE | EFER_LMA)]) == 1
    assert vcpu.get_msrs([MSR_EFER]) == [EFER_SCE | EFER_LME | EFER_NXE]
    # With long mode on, clearing LME is not refused for the host (LMA stays).
    s = vcpu.get_sregs()
    s.cr0 |= 0x8000_0001
    s.cr4 |= 1 << 5
    s.cr3 = 0x1000
    s.efer = EFER_LME | EFER_LMA
    vcpu.set_sregs(s)
    assert vcpu.set_msrs([(MSR_EFER, 0)]) == 1
    assert vcpu.get_sregs().efer == EFER_LMA
