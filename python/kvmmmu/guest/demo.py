"""The bundled demo guest that ``kvmmmu run`` boots: long mode, 4-level paging, on
the simulator or on /dev/kvm, with the same exits on both.

It runs in phases, each announced with ``out 0x80, <phase>`` (port I/O works at CPL0
on the device):

1. port I/O;
2. writes four pages of a dirty-logged data slot and reads a fifth;
3. edits its own page table through an alias of the PT page (remaps a page), INVLPG,
   writes through the new mapping;
4. writes a not-present page: #PF, reported by the stub through MMIO; the host, acting
   as the IRET the device's emulator lacks, resumes the guest at its fault handler
   ``pf_fixup``, which maps the page (through the alias), INVLPGs and retries;
5. switches CR3 to a second address space where the data address maps elsewhere,
   writes, switches back and reports (MMIO write) the value it reads there;
6. an MMIO read the host completes, stored to the data slot and echoed;
7. asks the host (MMIO write to CTRL) to drop it to CPL3, where the device runs it
   natively on the shadow MMU: writes two pages; remaps one through the alias without
   INVLPG and reads it (the stale translation: ``mmu_unsync``); a write to a
   supervisor page (#PF 0x7 from CPL3, delivered through TSS.RSP0); back at CPL0 an
   INVLPG, at CPL3 again the new translation; then CPL0 and HLT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .. import dirty, exits, uapi
from .asm import Asm, al, cr3, qword, r12, rax, rbx, rdi, rdx, rsi
from .builder import KSTACK_TOP, REPORT, USTACK_TOP, Guest, Machine
from .paging import P, U, W
from .stubs import ExceptionReport, parse_report

if TYPE_CHECKING:
    from ..api import Kvm

DATA_SLOT, DATA_GPA, DATA_PAGES = 1, 0x100_0000, 64
DATA_VA = 0x4000_0000  # 2 MiB aligned: page i of the data slot has PTE index i
PT_ALIAS_VA = 0x5000_0000
DEV = REPORT + 0x1000  # +0 write: "show this value"; +8 read: answered by the host
CTRL = REPORT + 0x2000  # write 3: drop to CPL3; write 0: back to CPL0
POST_PORT = 0x80
DEV_READ_VALUE = 0x600D_F00D_CAFE_D00D
PAGE = 0x1000

#: faulting label -> the continuation the host resumes at (the guest's "handler")
CONTINUATIONS = {"pf_retry": "pf_fixup", "user_fault": "user_after"}

PHASES = {
    1: "port I/O",
    2: "wrote data pages 0, 1, 2, 5 and read page 3",
    3: "remapped data page 7 -> 8 through its own PT (alias), INVLPG, wrote",
    4: "took #PF on a not-present page, mapped it in the handler, retried",
    5: "switched CR3 to a second address space and back",
    6: "MMIO read completed by the host, stored to data page 4",
    7: "CPL3 work done (writes, stale read, user #PF), back at CPL0",
}


def build() -> Guest:
    """The demo guest (not booted): slots, address spaces, program."""
    g = Guest("lm64")
    g.add_slot(DATA_SLOT, DATA_GPA, DATA_PAGES * PAGE, uapi.KVM_MEM_LOG_DIRTY_PAGES)
    pt = g.pt
    assert pt is not None
    for i in range(16):
        if i == 10:
            continue  # phase 4 faults here
        flags = P | W if i == 13 else P | W | U  # page 13: supervisor-only (user #PF)
        g.map(DATA_VA + i * PAGE, DATA_GPA + i * PAGE, flags=flags)
    pte_page = pt.entry_gpa(DATA_VA, 1) & ~0xFFF
    g.map(PT_ALIAS_VA, pte_page)
    pt2 = g.new_address_space()
    pt2.map(DATA_VA, DATA_GPA + 20 * PAGE)

    a = g.asm
    a.label("start")
    _phase(a, 1)

    a.mov(rbx, DATA_VA)
    for page, value in ((0, 0x1111), (1, 0x2222), (2, 0x3333), (5, 0x5555)):
        a.mov(qword[rbx + page * PAGE], value)
    a.mov(rax, qword[rbx + 3 * PAGE])
    _phase(a, 2)

    a.mov(rsi, PT_ALIAS_VA + 8 * 7)
    a.mov(rax, DATA_GPA + 8 * PAGE | P | W | U)
    a.mov(qword[rsi], rax)
    a.invlpg(qword[rbx + 7 * PAGE])
    a.mov(qword[rbx + 7 * PAGE], 0x8888)
    _phase(a, 3)

    a.mov(rsi, PT_ALIAS_VA + 8 * 10)
    a.mov(rdi, DATA_GPA + 10 * PAGE | P | W | U)
    a.label("pf_retry")
    a.mov(qword[rbx + 10 * PAGE], 0xAAAA)
    _phase(a, 4)
    a.jmp("phase5")
    a.label("pf_fixup")  # reached through the host's IRET with the faulting state
    a.mov(qword[rsi], rdi)
    a.invlpg(qword[rbx + 10 * PAGE])
    a.jmp("pf_retry")

    a.label("phase5")
    a.mov(rdx, DEV)
    a.mov(r12, cr3)
    a.mov(rax, pt2.cr3)
    a.mov(cr3, rax)
    a.mov(qword[rbx], 0x2020)  # data page 20 in the second address space
    a.mov(cr3, r12)
    a.mov(rax, qword[rbx])  # 0x1111 again
    a.mov(qword[rdx], rax)
    _phase(a, 5)

    a.mov(rax, qword[rdx + 8])  # the host answers DEV_READ_VALUE
    a.mov(qword[rbx + 4 * PAGE], rax)
    a.mov(qword[rdx], rax)
    _phase(a, 6)

    a.mov(rdx, CTRL)
    a.mov(qword[rdx], 3)  # the host drops us to CPL3 (and RSP to the user stack)
    a.label("user")
    a.mov(qword[rbx + 11 * PAGE], 0xBBBB)
    a.mov(qword[rbx + 12 * PAGE], 0xCCCC)
    a.mov(rsi, PT_ALIAS_VA + 8 * 11)
    a.mov(rax, DATA_GPA + 14 * PAGE | P | W | U)
    a.mov(qword[rsi], rax)  # remap page 11 -> 14, no INVLPG
    a.mov(rax, qword[rbx + 11 * PAGE])  # still 0xBBBB through the stale translation
    a.mov(rdi, DEV)
    a.mov(qword[rdi], rax)
    a.label("user_fault")
    a.mov(qword[rbx + 13 * PAGE], 1)  # supervisor-only page: #PF 0x7
    a.label("user_after")
    a.mov(rdx, CTRL)
    a.mov(qword[rdx], 0)  # CPL0 for the INVLPG
    a.invlpg(qword[rbx + 11 * PAGE])
    a.mov(qword[rdx], 3)
    a.mov(rax, qword[rbx + 11 * PAGE])  # now page 14: 0
    a.mov(qword[rdi], rax)
    a.mov(qword[rdx], 0)
    _phase(a, 7)
    a.label("done")
    a.hlt()
    a.jmp("done")
    return g


def _phase(a: Asm, n: int) -> None:
    a.mov(al, n)
    a.out(POST_PORT, al)


@dataclass
class Event:
    """One exit and what the host made of it."""

    exit: exits.Exit
    note: str = ""

    def __str__(self) -> str:
        return f"{self.exit}" + (f"   ; {self.note}" if self.note else "")


@dataclass
class DemoResult:
    backend: str
    events: list[Event] = field(default_factory=list)
    reports: list[ExceptionReport] = field(default_factory=list)
    vm_stats: dict[str, int] = field(default_factory=dict)
    vcpu_stats: dict[str, int] = field(default_factory=dict)
    dirty_pages: list[int] = field(default_factory=list)
    data: dict[int, int] = field(default_factory=dict)  # data page -> first qword
    ad_bits: dict[int, str] = field(default_factory=dict)  # data page -> "A", "AD", ""
    machine: Machine | None = None

    @property
    def exits(self) -> list[str]:
        return [str(e.exit) for e in self.events]


COUNTERS_VM = ("pages_4k", "mmu_cache_miss", "mmu_unsync", "mmu_pte_write", "mmu_flooded",
               "mmu_shadow_zapped", "remote_tlb_flush")  # fmt: skip
COUNTERS_VCPU = ("exits", "io_exits", "mmio_exits", "halt_exits", "pf_taken", "pf_fixed",
                 "pf_guest", "pf_emulate", "invlpg", "tlb_flush", "insn_emulation")  # fmt: skip


def run(kvm: Kvm, *, max_exits: int = 200, keep: bool = False) -> DemoResult:
    """Boot the demo on ``kvm`` and drive it to its final HLT. With ``keep`` the
    machine stays open in the result (for ``--dot``); the caller closes it."""
    g = build()
    m = g.boot(kvm)
    res = DemoResult(kvm.backend)
    labels = g.labels
    where = {v: k for k, v in labels.items()}
    vcpu = m.vcpu
    report: dict[int, int] = {}
    try:
        for _ in range(max_exits):
            e = vcpu.run()
            ev = Event(e)
            res.events.append(ev)
            if isinstance(e, exits.ExitIo) and e.is_write and e.port == POST_PORT:
                ev.note = f"phase {e.value}: {PHASES.get(e.value, '?')}"
            elif isinstance(e, exits.ExitMmio) and REPORT <= e.phys_addr < REPORT + 32:
                report[e.phys_addr] = e.value
                ev.note = (
                    "stub: " + ("vector", "cr2", "error code", "rip")[(e.phys_addr - REPORT) // 8]
                )
            elif isinstance(e, exits.ExitMmio) and e.phys_addr == CTRL and e.is_write:
                cpl = e.value
                m.set_cpl(cpl, rsp=USTACK_TOP if cpl == 3 else KSTACK_TOP)
                ev.note = f"host: KVM_SET_SREGS to CPL{cpl}"
            elif isinstance(e, exits.ExitMmio) and e.phys_addr == DEV + 8 and not e.is_write:
                vcpu.complete_mmio_read(DEV_READ_VALUE.to_bytes(e.len, "little"))
                ev.note = f"host answers {DEV_READ_VALUE:#x}"
            elif isinstance(e, exits.ExitMmio) and e.phys_addr == DEV and e.is_write:
                ev.note = f"guest shows {e.value:#x}"
            elif isinstance(e, exits.ExitHlt) and report:
                rep = parse_report(report, REPORT)
                report.clear()
                res.reports.append(rep)
                cont = CONTINUATIONS.get(where.get(rep.rip, ""))
                if cont is None:
                    ev.note = f"unexpected exception {rep}"
                    break
                m.host_iret(rip=cont)
                ev.note = f"{rep} at {where[rep.rip]}; host IRET to {cont}"
            elif isinstance(e, exits.ExitHlt):
                ev.note = "the demo is done"
                break
            else:
                ev.note = "unexpected exit"
                break
        _collect(res, m, g)
    finally:
        if keep:
            res.machine = m
        else:
            m.vcpu.close()
            m.vm.close()
    return res


def _collect(res: DemoResult, m: Machine, g: Guest) -> None:
    vm_stats, vcpu_stats = m.vm.stats(), m.vcpu.stats()
    res.vm_stats = {k: int(v) for k in COUNTERS_VM if isinstance(v := vm_stats.get(k), int)}
    res.vcpu_stats = {k: int(v) for k in COUNTERS_VCPU if isinstance(v := vcpu_stats.get(k), int)}
    res.dirty_pages = [int(p) for p in dirty.pages(m.vm.get_dirty_log(DATA_SLOT))]
    for i in range(DATA_PAGES):
        v = int.from_bytes(g.read(DATA_GPA + i * PAGE, 8), "little")
        if v:
            res.data[i] = v
    pt = g.pt
    assert pt is not None
    for i in range(16):
        leaf = pt.leaf(DATA_VA + i * PAGE)
        if leaf is not None:
            e = pt.read(leaf[1])
            res.ad_bits[i] = ("A" if e & 0x20 else "") + ("D" if e & 0x40 else "")
