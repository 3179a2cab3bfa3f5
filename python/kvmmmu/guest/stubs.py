"""Exception stubs that report to the host through MMIO, then halt.

On the device here CPL0 code is run by KVM's emulator, which cannot execute INT n
or IRET outside real mode, and a 64-bit CPL3 OUT takes #GP (reference
real-kvm-here.md, section 2). So a stub signals the one way that works at every
CPL: 8-byte stores to a gpa with no memory slot (``report``, mapped at the same
virtual address), each a KVM_EXIT_MMIO:

    report + 0   vector
    report + 8   CR2
    report + 16  error code (0 for vectors without one)
    report + 24  RIP of the interrupted instruction (from the frame)

then HLT (KVM_EXIT_HLT). The host plays IRET: :func:`frame_layout` says where the
saved registers are, and the builder's ``host_iret`` resumes the guest from the
frame (or at a continuation). 32-bit stubs store 4 bytes at the same offsets;
16-bit (real mode, IVT) stubs store 2 bytes, CR2 4 bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from . import asm as x
from .asm import Asm

#: Vectors for which the CPU pushes an error code.
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
NAMES = {
    0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM",
    8: "#DF", 10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF",
    17: "#AC", 18: "#MC", 19: "#XM", 20: "#VE", 21: "#CP", 28: "#HV", 29: "#VC", 30: "#SX",
}  # fmt: skip
REPORT_FIELDS = ("vector", "cr2", "error_code", "rip")


@dataclass(frozen=True)
class ExceptionReport:
    """What a stub told the host."""

    vector: int
    cr2: int
    error_code: int
    rip: int

    def __str__(self) -> str:
        name = NAMES.get(self.vector, f"vector {self.vector}")
        extra = f" cr2={self.cr2:#x}" if self.vector == 14 else ""
        return f"{name} error_code={self.error_code:#x}{extra} rip={self.rip:#x}"


def emit(a: Asm, report: int, vectors: Iterable[int] = range(32)) -> dict[int, str]:
    """Append the stubs to ``a``; returns vector -> label of its entry point."""
    w = a.bitness
    acc, dat = {64: (x.rax, x.rdx), 32: (x.eax, x.edx), 16: (x.ax, x.dx)}[w]
    entries = {}
    for v in vectors:
        entries[v] = a.label(f"__exc{v}")
        if v not in ERROR_CODE_VECTORS or w == 16:
            a.push(0)  # a uniform frame: every stub has an error-code slot
        a.push(acc)
        a.mov(acc, v)
        a.jmp("__exc_common")
    a.label("__exc_common")
    a.push(dat)
    sp = {64: x.rsp, 32: x.esp, 16: x.sp}[w]
    unit = w // 8
    if w == 16:
        # Real mode: es:0 addresses the report page (report must be below 1 MiB).
        a.push(x.es)
        a.push(report >> 4)
        a.pop(x.es)
        a.mov(x.Mem(x.Addr(disp=0), 2, x.es), x.ax)
        a.mov(x.eax, x.cr2)
        a.mov(x.Mem(x.Addr(disp=8), 4, x.es), x.eax)
        a.mov(x.bp, x.sp)
        a.mov(x.ax, x.Mem(x.Addr(base=x.bp, disp=6), 2, x.ss))
        a.mov(x.Mem(x.Addr(disp=16), 2, x.es), x.ax)
        a.mov(x.ax, x.Mem(x.Addr(base=x.bp, disp=8), 2, x.ss))
        a.mov(x.Mem(x.Addr(disp=24), 2, x.es), x.ax)
    else:
        a.mov(dat, report)
        a.mov(x.Mem(x.Addr(base=dat), unit), acc)
        a.mov(acc, x.cr2)
        a.mov(x.Mem(x.Addr(base=dat, disp=8), unit), acc)
        a.mov(acc, x.Mem(x.Addr(base=sp, disp=2 * unit), unit))
        a.mov(x.Mem(x.Addr(base=dat, disp=16), unit), acc)
        a.mov(acc, x.Mem(x.Addr(base=sp, disp=3 * unit), unit))
        a.mov(x.Mem(x.Addr(base=dat, disp=24), unit), acc)
    a.label("__exc_halt")
    a.hlt()
    a.jmp("__exc_halt")
    return entries


def frame_layout(bitness: int) -> tuple[str, ...]:
    """The stack from RSP upwards while a stub halts (one slot each, ``bitness/8``
    bytes; 16-bit stubs also saved ES first)."""
    if bitness == 16:
        return ("es", "dx", "ax", "error_code", "ip", "cs", "flags")
    tail = ("rip", "cs", "rflags", "rsp", "ss")
    return ("rdx", "rax", "error_code", *tail)


def parse_report(values: dict[int, int], report: int) -> ExceptionReport:
    """The report from the MMIO writes seen (offset from ``report`` -> value)."""
    return ExceptionReport(*(values[report + 8 * i] for i in range(4)))
