"""Small guest programs for tests and benchmarks, each appended to a :class:`Guest`'s
program. At CPL0 they end in HLT (KVM_EXIT_HLT); at CPL3, where HLT is #GP, with an
8-byte MMIO write of 0 to :data:`DONE_GPA` (then a HLT that would fault).

* :func:`compute_loop`: ``n`` iterations of ALU work, 4 instructions each (guest
  instructions per second; no data access), 64- or 32-bit.
* :func:`touch_pages`: one write (or read) per 4 KiB page of a fresh mapping (first-
  touch page faults per second).
* :func:`exit_loop`: ``n`` MMIO writes to a gpa without a slot (exits per second),
  at CPL0 or CPL3.
"""

from __future__ import annotations

from . import asm as x
from .builder import REPORT, Guest
from .paging import P, U, W

PAGE = 0x1000
EXIT_GPA = REPORT + 0x3000  # inside the builder's identity-mapped MMIO window
DONE_GPA = EXIT_GPA + 8


def end(g: Guest, cpl: int = 0) -> None:
    """The end of a program at ``cpl``: HLT, or at CPL3 an MMIO write to DONE_GPA."""
    a = g.asm
    if cpl == 3:
        d = x.rdx if g.bitness == 64 else x.edx
        a.mov(d, DONE_GPA)
        a.mov(x.Mem(x.Addr(base=d), g.bitness // 8), 0)
    a.hlt()


def compute_loop(g: Guest, n: int, cpl: int = 0) -> None:
    """rax = the sum of 3*i for i in 1..n (lea, add, dec, jnz per iteration)."""
    a = g.asm
    acc, i, t = (x.rax, x.rcx, x.rdx) if g.bitness == 64 else (x.eax, x.ecx, x.edx)
    a.xor(acc, acc)
    a.mov(i, n)
    a.label("compute_loop")
    a.lea(t, x.mem[i + i * 2])
    a.add(acc, t)
    a.dec(i)
    a.jnz("compute_loop")
    end(g, cpl)


def compute_loop_result(n: int, bits: int = 64) -> int:
    """What :func:`compute_loop` leaves in rax."""
    return sum(3 * i for i in range(1, n + 1)) & ((1 << bits) - 1)


def touch_pages(
    g: Guest, va: int, gpa: int, pages: int, *, write: bool = True, value: int = 1, cpl: int = 0
) -> None:
    """Map ``pages`` pages at ``va`` -> ``gpa`` (P|W|U) and touch each once."""
    if g.bitness != 64:
        raise ValueError("touch_pages is a 64-bit program")
    for i in range(pages):
        g.map(va + i * PAGE, gpa + i * PAGE, flags=P | W | U)
    a = g.asm
    a.mov(x.rbx, va)
    a.mov(x.rcx, pages)
    a.label("touch_loop")
    if write:
        a.mov(x.qword[x.rbx], value)
    else:
        a.mov(x.rax, x.qword[x.rbx])
    a.add(x.rbx, PAGE)
    a.dec(x.rcx)
    a.jnz("touch_loop")
    end(g, cpl)


def exit_loop(g: Guest, n: int, cpl: int = 0) -> None:
    """``n`` 8-byte MMIO writes of the counter (n, n-1, ..., 1) to :data:`EXIT_GPA`."""
    if g.bitness != 64:
        raise ValueError("exit_loop is a 64-bit program")
    a = g.asm
    a.mov(x.rdx, EXIT_GPA)
    a.mov(x.rcx, n)
    a.label("exit_loop")
    a.mov(x.qword[x.rdx], x.rcx)
    a.dec(x.rcx)
    a.jnz("exit_loop")
    end(g, cpl)
