"""The dirty-log cases of reference/real-kvm-here.md section 3, with the writes made by
guest code through KVM_RUN at CPL0 and CPL3, on the simulator and on /dev/kvm: the
fetch-and-clear bitmap, manual protect (with and without INITIALLY_SET) and the dirty
ring (plain and ACQ_REL). Slot 1 is 64 pages at 16 MiB with KVM_MEM_LOG_DIRTY_PAGES;
the page tables live in slot 0, which is not logged.
"""

from __future__ import annotations

import errno as errno_module
from collections.abc import Sequence

import numpy as np
import pytest

import kvmmmu
from kvmmmu import dirty, uapi
from kvmmmu import exits as ex
from kvmmmu.guest import asm as x
from kvmmmu.guest.builder import REPORT, Guest, Machine
from kvmmmu.guest.paging import P, U, W

PAGE = 0x1000
SLOT, SLOT_GPA, NPAGES, GVA = 1, 16 << 20, 64, 0x4000_0000
#: The list of pages to write (count, then indices) in the low slot.
LIST = 0x30_0000
DONE = REPORT + 0x1000
READ_PAGE = 10


class LogGuest:
    """A guest whose routine writes the pages the host lists, then reads READ_PAGE."""

    def __init__(self, kvm: kvmmmu.Kvm, cpl: int, setup: str = "") -> None:
        g = Guest("lm64")
        g.add_slot(SLOT, SLOT_GPA, NPAGES * PAGE, uapi.KVM_MEM_LOG_DIRTY_PAGES)
        for i in range(NPAGES):
            g.map(GVA + i * PAGE, SLOT_GPA + i * PAGE, flags=P | W | U)
        a = g.asm
        a.mov(x.rsi, LIST)
        a.mov(x.rcx, x.qword[x.rsi])
        a.label("next")
        a.test(x.rcx, x.rcx)
        a.jz("read")
        a.add(x.rsi, 8)
        a.mov(x.rax, x.qword[x.rsi])
        a.shl(x.rax, 12)
        a.mov(x.rbx, GVA)
        a.mov(x.qword[x.rax + x.rbx], x.rcx)
        a.dec(x.rcx)
        a.jmp("next")
        a.label("read")
        a.mov(x.rbx, GVA + READ_PAGE * PAGE)
        a.mov(x.rax, x.qword[x.rbx])
        a.mov(x.rdx, DONE)
        a.mov(x.qword[x.rdx], x.rax)
        a.hlt()
        self.guest, self.cpl = g, cpl
        self.vm = kvm.create_vm()
        if setup == "manual":
            self.vm.enable_manual_dirty_log()
        elif setup == "manual_initially_set":
            self.vm.enable_manual_dirty_log(initially_set=True)
        elif setup in ("ring", "ring_acq_rel"):
            self.vm.enable_dirty_ring(65536, acq_rel=setup == "ring_acq_rel")
        self.m: Machine = g.boot(kvm, cpl=cpl, vm=self.vm)

    def write_pages(self, pages: Sequence[int]) -> None:
        """The guest writes ``pages`` (and reads READ_PAGE), at its CPL."""
        self.guest.write(LIST, np.array([len(pages), *pages], dtype=np.uint64).tobytes())
        self.m.set_cpl(self.cpl)
        regs = self.m.vcpu.get_regs()
        regs.rip, regs.rflags = self.guest.code, 2
        regs.rsp = 0x6F000 if self.cpl == 3 else 0x7F000
        self.m.vcpu.set_regs(regs)
        e = self.m.vcpu.run()
        assert isinstance(e, ex.ExitMmio) and e.is_write and e.phys_addr == DONE, str(e)

    def log(self) -> list[int]:
        return [int(p) for p in dirty.pages(self.vm.get_dirty_log(SLOT))]

    def clear(self, first: int, num: int, pages: Sequence[int] | None = None) -> None:
        bits = dirty.bitmap(range(first, first + num) if pages is None else pages, NPAGES)
        words = bits[first // 64 : (first + num + 63) // 64]
        self.vm.clear_dirty_log(SLOT, first, num, words)


@pytest.fixture(params=[0, 3], ids=["cpl0", "cpl3"])
def cpl(request: pytest.FixtureRequest) -> int:
    return int(request.param)


def test_get_dirty_log_reports_guest_writes(kvm: kvmmmu.Kvm, cpl: int) -> None:
    g = LogGuest(kvm, cpl)
    assert g.log() == []
    g.write_pages([0, 3, 7, 8, 63])
    assert g.log() == [0, 3, 7, 8, 63]
    assert g.log() == []  # fetched and cleared, protection re-armed
    g.write_pages([1, 3])
    assert g.log() == [1, 3]
    g.vm.write_guest(SLOT_GPA + 5 * PAGE, b"host")  # the VMM's writes are not KVM's
    assert g.log() == []


@pytest.mark.parametrize("initially_set", [False, True])
def test_manual_protect_clear_dirty_log(kvm: kvmmmu.Kvm, cpl: int, initially_set: bool) -> None:
    g = LogGuest(kvm, cpl, "manual_initially_set" if initially_set else "manual")
    assert g.log() == (list(range(NPAGES)) if initially_set else [])
    g.clear(0, NPAGES)
    assert g.log() == []
    g.write_pages([2, 4, 40])
    assert g.log() == [2, 4, 40]
    assert g.log() == [2, 4, 40]  # GET does not clear in manual mode
    g.clear(0, NPAGES, [2])
    assert g.log() == [4, 40]
    g.clear(0, NPAGES)
    g.write_pages([2, 5])
    assert g.log() == [2, 5]


@pytest.mark.parametrize(
    ("first", "num", "errno"),
    [(1, 63, "EINVAL"), (0, 1, "EINVAL"), (0, 65, "EINVAL"), (0, 0, None), (64, 0, None)],
)
def test_clear_dirty_log_alignment(kvm: kvmmmu.Kvm, first: int, num: int, errno: str) -> None:
    g = LogGuest(kvm, 0, "manual")
    words = np.zeros(2, dtype=np.uint64)
    if errno is None:
        g.vm.clear_dirty_log(SLOT, first, num, words)
    else:
        with pytest.raises(OSError) as e:
            g.vm.clear_dirty_log(SLOT, first, num, words)
        assert e.value.errno == getattr(errno_module, errno)


@pytest.mark.parametrize("acq_rel", [False, True])
def test_dirty_ring_reports_guest_writes(kvm: kvmmmu.Kvm, cpl: int, acq_rel: bool) -> None:
    g = LogGuest(kvm, cpl, "ring_acq_rel" if acq_rel else "ring")
    ring = g.m.vcpu.dirty_ring
    assert ring is not None
    g.write_pages([0, 9, 33])
    slots, offsets = ring.harvest()
    assert list(zip(slots.tolist(), offsets.tolist(), strict=True)) == [(1, 0), (1, 9), (1, 33)]
    assert g.vm.reset_dirty_rings() == 3
    g.write_pages([9, 12])
    slots, offsets = ring.harvest()
    assert list(zip(slots.tolist(), offsets.tolist(), strict=True)) == [(1, 9), (1, 12)]
    assert g.vm.reset_dirty_rings() == 2
    with pytest.raises(OSError) as e:
        g.vm.get_dirty_log(SLOT)
    assert e.value.errno == errno_module.ENXIO
