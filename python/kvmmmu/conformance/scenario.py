"""Scenarios of guest memory operations, run as guest code through KVM_RUN: the
differential check between the simulator and /dev/kvm.

A scenario is a list of operations (:class:`Read`, :class:`Write`, :class:`SetPte`,
:class:`Invlpg`, :class:`MovCr3`, :class:`Harvest`). :func:`run_scenario` boots one
long-mode (4-level) guest on a backend and runs each operation as a short guest
routine at the operation's CPL: the host points RIP at the routine, sets the CPL
with KVM_SET_SREGS (the device's emulator cannot change privilege itself), and runs
until the routine reports. Its :class:`Trace` holds everything both backends must
agree on: each operation's outcome (the value read, a #PF with CR2 and error code
from the guest's own IDT stub, an MMIO exit), every exit, the final guest memory
with the A/D bits of every gpte the scenario touches, the dirty log of the data
slot at each harvest, and the counter deltas of operations whose code runs where
both backends count the same events.

Layout (on top of :class:`kvmmmu.guest.builder.Guest`'s): ``pages`` data pages in a
dirty-logged slot at :data:`DATA_GPA`; address space A maps data page i at
``gva(i)``, address space B maps page ``pages - 1 - i`` there. The page tables are
in the low slot, identity-mapped user-writable in both spaces, so the guest edits
its own gptes with ordinary stores (``SetPte``), as real guests do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .. import dirty, uapi
from .. import exits as ex
from ..guest import asm as x
from ..guest.builder import REPORT, Guest, Machine
from ..guest.paging import A, D, P, PageTables, U, W
from ..guest.stubs import ExceptionReport, parse_report

if TYPE_CHECKING:
    from ..api import Kvm

PAGE = 0x1000
#: The data slot (slot 1, dirty-logged) and where the guest maps it.
DATA_SLOT, DATA_GPA = 1, 0x1000_0000
GVA = 0x4000_0000
#: Routines report completion with an 8-byte MMIO write here (a page of the builder's
#: identity-mapped MMIO window, away from the stubs' report registers).
DONE = REPORT + 0x1000
#: A gpa with no memslot, for operations that reach MMIO through a remapped gpte.
HOLE = 0xD000_0000
#: What an MMIO read of the hole returns (the host completes it with this).
MMIO_VALUE = 0x0123_4567_89AB_CDEF
#: Counters compared between backends, for operations at CPL3 that do not fault
#: (on the device CPL0 code and fault delivery go through KVM's emulator, which
#: walks the guest tables without building SPTEs; hardware KVM and the simulator
#: run them natively).
VCPU_COUNTERS = ("pf_fixed", "pf_guest", "pf_emulate")
VM_COUNTERS = ("mmu_unsync", "pages_4k", "mmu_pte_write", "mmu_shadow_zapped")
MAX_EXITS_PER_OP = 16


def pattern(i: int) -> int:
    """What data page i holds in its first 8 bytes when the guest boots."""
    return 0x5A5A_0000_0000 + i


def gva(i: int) -> int:
    return GVA + i * PAGE


def data_gpa(i: int) -> int:
    return DATA_GPA + i * PAGE


# -- operations -------------------------------------------------------------------------


@dataclass(frozen=True)
class Read:
    """An 8-byte load from ``gva`` at ``cpl``."""

    gva: int
    cpl: int = 3


@dataclass(frozen=True)
class Write:
    """An 8-byte store of ``value`` to ``gva`` at ``cpl``."""

    gva: int
    value: int
    cpl: int = 3


@dataclass(frozen=True)
class SetPte:
    """The guest stores ``value`` (None: the entry's value at boot) into the
    level-``level`` entry for ``gva`` of address space ``space`` (0 = A, 1 = B), at
    ``cpl``."""

    gva: int
    level: int
    value: int | None
    space: int = 0
    cpl: int = 3


@dataclass(frozen=True)
class Invlpg:
    """INVLPG ``gva`` (at CPL0)."""

    gva: int


@dataclass(frozen=True)
class MovCr3:
    """MOV CR3 (at CPL0) to address space ``space`` (0 = A, 1 = B; None = reload)."""

    space: int | None = None


@dataclass(frozen=True)
class Harvest:
    """KVM_GET_DIRTY_LOG of the data slot (recorded in the trace)."""


Op = Read | Write | SetPte | Invlpg | MovCr3 | Harvest


# -- outcomes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """The guest took an exception; its stub reported it."""

    vector: int
    error_code: int
    cr2: int

    def __str__(self) -> str:
        return f"fault(vector={self.vector}, ec={self.error_code:#x}, cr2={self.cr2:#x})"


@dataclass(frozen=True)
class Mmio:
    """The access left guest memory: a KVM_EXIT_MMIO at ``gpa``."""

    gpa: int
    is_write: bool


Outcome = int | Fault | Mmio | str | tuple[int, ...] | None


@dataclass
class Trace:
    """What a backend did with a scenario (equal between faithful backends)."""

    outcomes: list[Outcome] = field(default_factory=list)
    exits: list[list[str]] = field(default_factory=list)
    counters: list[dict[str, int] | None] = field(default_factory=list)
    data: list[int] = field(default_factory=list)
    gptes: dict[tuple[int, int, int], int] = field(default_factory=dict)
    dirty: tuple[int, ...] = ()

    def differences(self, other: Trace, ops: Sequence[Op] = ()) -> list[str]:
        """Human-readable differences from ``other`` (empty when they agree)."""
        out = []
        for n, (a, b) in enumerate(zip(self.outcomes, other.outcomes, strict=False)):
            if a != b:
                op = ops[n] if n < len(ops) else "?"
                out.append(f"op {n} {op}: outcome {a} != {b}")
        if len(self.outcomes) != len(other.outcomes):
            out.append(f"{len(self.outcomes)} outcomes != {len(other.outcomes)}")
        for n, (a, b) in enumerate(zip(self.exits, other.exits, strict=False)):
            if a != b:
                out.append(f"op {n}: exits {a} != {b}")
        for n, (a, b) in enumerate(zip(self.counters, other.counters, strict=False)):
            if a is not None and b is not None and a != b:
                out.append(f"op {n}: counters {a} != {b}")
        if self.data != other.data:
            out.append(f"data {[hex(v) for v in self.data]} != {[hex(v) for v in other.data]}")
        for key in sorted(set(self.gptes) | set(other.gptes)):
            a, b = self.gptes.get(key), other.gptes.get(key)
            if a != b:
                out.append(f"gpte space {key[0]} gva {key[1]:#x} level {key[2]}: {a} != {b}")
        if self.dirty != other.dirty:
            out.append(f"final dirty log {self.dirty} != {other.dirty}")
        return out


# -- the guest --------------------------------------------------------------------------


class ScenarioGuest:
    """The guest that runs a scenario's operations, booted on one backend."""

    def __init__(self, kvm: Kvm, pages: int = 4) -> None:
        self.pages = pages
        g = Guest("lm64")
        mem = g.add_slot(DATA_SLOT, DATA_GPA, pages * PAGE, uapi.KVM_MEM_LOG_DIRTY_PAGES)
        for i in range(pages):
            mem.write(i * PAGE, pattern(i).to_bytes(8, "little"))
        assert g.pt is not None
        self.spaces: list[PageTables] = [g.pt, g.new_address_space()]
        for i in range(pages):
            self.spaces[0].map(gva(i), data_gpa(i), flags=P | W | U)
            self.spaces[1].map(gva(i), data_gpa(pages - 1 - i), flags=P | W | U)
        a = g.asm
        # Each routine takes its operands in rdi/rsi and reports with a store to DONE.
        a.label("op_nop")
        a.jmp("done")
        a.label("op_read")
        a.mov(x.rax, x.qword[x.rdi])
        a.jmp("done")
        a.label("op_write")
        a.mov(x.qword[x.rdi], x.rsi)
        a.jmp("done")
        a.label("op_invlpg")
        a.invlpg(x.byte[x.rdi])
        a.jmp("done")
        a.label("op_cr3")
        a.mov(x.cr3, x.rdi)
        a.label("done")
        a.mov(x.rdx, DONE)
        a.mov(x.qword[x.rdx], x.rax)
        a.hlt()
        self.guest = g
        self.machine: Machine = g.boot(kvm)
        # Where each gpte of the data mappings lives, and its value, at boot (the
        # guest may later unlink tables, so the host never walks them again).
        self.entry_gpas = {
            (s, gva(i), level): pt.entry_gpa(gva(i), level)
            for s, pt in enumerate(self.spaces)
            for i in range(pages)
            for level in range(1, 5)
        }
        self.boot_gptes = {gpa: self.spaces[0].read(gpa) for gpa in self.entry_gpas.values()}
        self.vm, self.vcpu = self.machine.vm, self.machine.vcpu
        self.space = 0
        self.vm_stats, self.vcpu_stats = self.vm.stats, self.vcpu.stats
        self.warm()

    def warm(self) -> None:
        """Run the routines' code once at CPL3 in the current address space, so its SPTE
        exists on both backends: on the device CPL0 code (INVLPG, MOV CR3) is emulated
        and builds no SPTEs, while hardware KVM and the simulator run it natively."""
        outcome, _ = self.call("op_nop", 3)
        if outcome != 0:
            raise RuntimeError(f"the scenario guest does not start: {outcome}")

    def entry_gpa(self, space: int, va: int, level: int) -> int:
        return self.entry_gpas[(space, va, level)]

    def counters(self) -> dict[str, int]:
        vc, vm = self.vcpu_stats(), self.vm_stats()
        out = {k: int(vc[k]) for k in VCPU_COUNTERS}  # type: ignore[arg-type]
        out.update({k: int(vm[k]) for k in VM_COUNTERS})  # type: ignore[arg-type]
        return out

    def call(self, routine: str, cpl: int, rdi: int = 0, rsi: int = 0) -> tuple[Outcome, list[str]]:
        """Run ``routine`` at ``cpl`` until it reports; its outcome and the exits seen."""
        m = self.machine
        m.set_cpl(cpl)
        regs = self.vcpu.get_regs()
        regs.rip = self.guest.labels[routine]
        regs.rdi, regs.rsi, regs.rax = rdi, rsi, 0
        regs.rsp = 0x6F000 if cpl == 3 else 0x7F000
        regs.rflags = 0x2
        self.vcpu.set_regs(regs)
        seen: list[str] = []
        report: dict[int, int] = {}
        mmio: Mmio | None = None
        for _ in range(MAX_EXITS_PER_OP):
            e = self.vcpu.run()
            seen.append(_describe(e))
            if isinstance(e, ex.ExitMmio):
                value = int.from_bytes(e.data, "little")
                if e.is_write and e.phys_addr == DONE:
                    return (mmio if mmio is not None else value), seen
                if e.is_write and REPORT <= e.phys_addr < REPORT + 32:
                    report[e.phys_addr] = value
                    continue
                mmio = Mmio(e.phys_addr, e.is_write)
                if not e.is_write:
                    self.vcpu.complete_mmio_read(MMIO_VALUE.to_bytes(8, "little")[: e.len])
                continue
            if isinstance(e, ex.ExitHlt) and len(report) == 4:
                r: ExceptionReport = parse_report(report, REPORT)
                return Fault(r.vector, r.error_code, r.cr2), seen
            return f"unexpected {_describe(e)}", seen
        return "runaway", seen

    def do(self, op: Op) -> tuple[Outcome, list[str]]:
        match op:
            case Read(va, cpl):
                return self.call("op_read", cpl, va)
            case Write(va, value, cpl):
                return self.call("op_write", cpl, va, value)
            case SetPte(va, level, value, space, cpl):
                gpa = self.entry_gpa(space, va, level)
                if value is None:
                    value = self.boot_gptes[gpa]
                return self.call("op_write", cpl, gpa, value)
            case Invlpg(va):
                return self.call("op_invlpg", 0, va)
            case MovCr3(space):
                if space is not None:
                    self.space = space
                result = self.call("op_cr3", 0, self.spaces[self.space].cr3)
                self.warm()
                return result
            case Harvest():
                return self.dirty_pages(), []
        raise TypeError(f"not an operation: {op!r}")

    def dirty_pages(self) -> tuple[int, ...]:
        bits = self.vm.get_dirty_log(DATA_SLOT)
        return tuple(int(p) for p in dirty.pages(bits))

    def close(self) -> None:
        self.vm.close()


def _describe(e: ex.Exit) -> str:
    """An exit as compared between backends."""
    if isinstance(e, ex.ExitMmio):
        kind = "w" if e.is_write else "r"
        data = e.data.hex() if e.is_write else ""
        return f"MMIO {kind} {e.phys_addr:#x}/{e.len} {data}".rstrip()
    if isinstance(e, ex.ExitIo):
        return f"IO {'out' if e.is_write else 'in'} {e.port:#x}/{e.size}x{e.count}"
    return str(e)


def run_scenario(kvm: Kvm, ops: Sequence[Op], pages: int = 4) -> Trace:
    """Boot the scenario guest on ``kvm`` and run ``ops``; see the module docstring."""
    sg = ScenarioGuest(kvm, pages)
    t = Trace()
    # Counters stop being comparable at the first CPL0 data access: the device's
    # emulator walks the guest tables for it without building an SPTE, where hardware
    # KVM and the simulator fault one in (so a later CPL3 access faults only on the device).
    comparable = True
    try:
        for op in ops:
            before = sg.counters()
            outcome, seen = sg.do(op)
            after = sg.counters()
            t.outcomes.append(outcome)
            t.exits.append(seen)
            data_op = isinstance(op, Read | Write | SetPte)
            if data_op and op.cpl == 0:
                comparable = False
            if comparable and data_op and not isinstance(outcome, Fault):
                t.counters.append({k: after[k] - before[k] for k in after})
            else:
                t.counters.append(None)
        t.data = [int.from_bytes(sg.guest.read(data_gpa(i), 8), "little") for i in range(pages)]
        for key, gpa in sg.entry_gpas.items():
            t.gptes[key] = int.from_bytes(sg.guest.read(gpa, 8), "little")
        t.dirty = sg.dirty_pages()
    finally:
        sg.close()
    return t


# -- named scenarios ----------------------------------------------------------------------

#: The CPL3 TLB behaviour of reference/real-kvm-here.md and the shadow MMU tests
#: (tests/test_shadow_mmu.py), as guest code.
NAMED: dict[str, list[Op]] = {
    "clear_p": [Read(gva(0)), SetPte(gva(0), 1, 0), Read(gva(0)), Invlpg(gva(0)), Read(gva(0))],
    "remap": [
        Read(gva(0)),
        SetPte(gva(0), 1, data_gpa(1) | P | W | U),
        Read(gva(0)),
        Invlpg(gva(0)),
        Read(gva(0)),
    ],
    "clear_rw": [
        Write(gva(0), 1),
        SetPte(gva(0), 1, data_gpa(0) | P | U | A | D),
        Write(gva(0), 2),
        Invlpg(gva(0)),
        Write(gva(0), 3),
        Read(gva(0)),
    ],
    "clear_ad": [
        Write(gva(0), 1),
        SetPte(gva(0), 1, data_gpa(0) | P | W | U),
        Write(gva(0), 2),
        Read(gva(0)),
    ],
    "clear_p_mov_cr3": [
        Read(gva(0)),
        SetPte(gva(0), 1, 0),
        Read(gva(0)),
        MovCr3(),
        Read(gva(0)),
    ],
    "remap_mov_cr3": [
        Read(gva(0)),
        SetPte(gva(0), 1, data_gpa(2) | P | W | U),
        Read(gva(0)),
        MovCr3(),
        Read(gva(0)),
    ],
    "switch_spaces": [
        Read(gva(0)),
        MovCr3(1),
        Read(gva(0)),
        Write(gva(1), 7),
        MovCr3(0),
        Read(gva(2)),
        Harvest(),
    ],
    "remap_to_hole": [
        Read(gva(1)),
        SetPte(gva(1), 1, HOLE | P | W | U),
        Invlpg(gva(1)),
        Read(gva(1)),
        Write(gva(1), 5),
    ],
    "user_faults": [
        SetPte(gva(2), 1, data_gpa(2) | P | W),
        Invlpg(gva(2)),
        Read(gva(2)),
        Read(gva(2), cpl=0),
        SetPte(gva(3), 1, data_gpa(3) | P | U, cpl=0),
        Invlpg(gva(3)),
        Write(gva(3), 9),
        Write(gva(3), 9, cpl=0),
    ],
    "dirty_harvests": [
        Harvest(),
        Write(gva(0), 1),
        Write(gva(3), 2),
        Read(gva(1)),
        Harvest(),
        Harvest(),
        Write(gva(3), 3, cpl=0),
        Write(gva(1), 4),
        Harvest(),
    ],
}
