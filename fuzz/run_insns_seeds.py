"""Write the seeds of the `run_insns` fuzz target (fuzz/corpus/run_insns/seed-*).

Each seed is the target's 72-byte header, code assembled with kvmmmu's assembler
(iced-x86), and a tail of deterministic bytes that `arbitrary` turns into setup
details and the host events between runs. Run from the repository root:
``python fuzz/run_insns_seeds.py``.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from pathlib import Path

from kvmmmu.guest.asm import (
    Asm,
    al,
    ax,
    byte,
    cr0,
    cr3,
    dword,
    dx,
    eax,
    ebx,
    ecx,
    edi,
    esi,
    mem,
    qword,
    r13,
    r14,
    r15,
    rax,
    rcx,
    rdi,
    rsi,
)

OUT = Path(__file__).parent / "corpus" / "run_insns"

# Mode numbers of the header (byte 0 modulo 11).
REAL, PM32, PM32_U, PG32, PG32_U, PAE, PAE_U, LONG4, LONG4_U, LONG5, LONG5_U = range(11)
BITNESS = {REAL: 16, PM32: 32, PM32_U: 32, PG32: 32, PG32_U: 32, PAE: 32, PAE_U: 32}
TDP, LARGE, TRAP, DPL3, TF, IF, AC, LOG0 = (1 << i for i in range(8))
NO_WP, NO_NX, IOMAP, STEP, IOPL3, DF, FEATURES = (1 << i for i in range(7))
CODE = 0x1000
HOLE, RO, LOG, MMIO_GVA = 0x11_0000, 0x10_0000, 0x12_0000, 0xE000_0000


def seed(
    mode: int,
    code: Callable[[Asm], None],
    *,
    flags: int = 0,
    flags2: int = 0,
    budget: int = 2000,
    regs: tuple[int, ...] = (0,) * 8,
    quiet: int = 48,
    tail: int = 64,
    rng: int = 0,
) -> bytes:
    a = Asm(BITNESS.get(mode, 64), CODE)
    code(a)
    body = a.assemble()
    assert len(body) < 256, len(body)
    # Byte 7 bit 0: also run on the other MMU and compare (the differential check).
    header = struct.pack("<BBHBBBB8Q", mode, flags, budget, len(body), 0, flags2, 1, *regs)
    r = random.Random(rng)
    # Zeros first (no gpte edits, no extra mappings, no host event for the first
    # runs), then random bytes for later events and read data (none: no host event,
    # so the differential check runs).
    return header + body + bytes(quiet) + bytes(r.randrange(256) for _ in range(tail))


def long_mmio(a: Asm) -> None:
    a.mov(dword[r14], eax)  # MMIO write to the hole
    a.mov(eax, dword[r14 + 8])  # MMIO read
    a.mov(dword[RO], eax)  # a write to the read-only slot: MMIO
    a.mov(ebx, dword[RO])  # a read of it: memory
    a.mov(qword[r15 + 0x10], rax)  # the logged slot
    a.mov(dx, 0x3F8)
    a.out(dx, al)
    a.in_(al, dx)
    a.mov(rsi, r15)
    a.mov(rdi, r15)
    a.add(rdi, 0x2000)
    a.mov(rcx, 64)
    a.rep_movsb()
    a.mov(rcx, 3)
    a.rep_outsb()
    a.int3()
    a.ud2()


def long_user(a: Asm) -> None:
    a.mov(qword[r15], rax)
    a.cpuid()
    a.push(rax)
    a.pop(rcx)
    a.mov(eax, dword[r13])  # MMIO read at CPL3
    a.mov(rax, cr3)  # #GP at CPL3: delivered through the TSS's RSP0
    a.hlt()


def real_mode(a: Asm) -> None:
    a.mov(ax, 0x1234)
    a.out(0x80, al)
    a.in_(al, 0x71)
    a.int(0x10)
    a.xor(ecx, ecx)
    a.div(ecx)  # #DE through the IVT
    a.hlt()


def pg32(a: Asm) -> None:
    a.mov(eax, cr3)
    a.mov(cr3, eax)
    a.invlpg(mem[0x3_0000])
    a.mov(dword[0x3_0000], 0x55AA)
    a.mov(eax, dword[0x4000_0000])  # #PF: not mapped
    a.hlt()


def pae_user(a: Asm) -> None:
    a.mov(dword[LOG + 0x100], eax)
    a.mov(ecx, 0xC000_0080)
    a.rdmsr()  # #GP at CPL3
    a.hlt()


def long5(a: Asm) -> None:
    a.mov(rax, cr0)
    a.and_(eax, 0xFFFE_FFFF)  # CR0.WP off
    a.mov(cr0, rax)
    a.mov(byte[MMIO_GVA + 0x1000], al)  # the APIC page: no memory
    a.mov(rax, 0x8000_0000_0000)
    a.jmp(rax)  # non-canonical: #GP


def pm32_string(a: Asm) -> None:
    a.mov(dx, 0x60)
    a.mov(esi, 0x3_0000)
    a.mov(edi, LOG)
    a.mov(ecx, 8)
    a.rep_outsb()
    a.mov(ecx, 4)
    a.rep_insw()
    a.mov(edi, HOLE)
    a.mov(ecx, 2)
    a.rep_stosd()
    a.hlt()


SEEDS = {
    "long4-mmio-io-string": seed(LONG4, long_mmio, flags=IF, regs=(7,) * 8, tail=0),
    "long4-user-tdp-gp": seed(LONG4_U, long_user, flags=TDP | LOG0, rng=2),
    "real-ivt-de": seed(REAL, real_mode, rng=3),
    "pg32-invlpg-pf": seed(PG32, pg32, flags=LARGE | TRAP, tail=0),
    "pae-user-msr": seed(PAE_U, pae_user, flags=TDP | DPL3, flags2=IOMAP, tail=0),
    "long5-wp-noncanonical": seed(LONG5, long5, flags=LOG0, flags2=STEP | FEATURES, rng=6),
    "pm32-string-io": seed(PM32, pm32_string, flags=TF, flags2=DF | IOPL3, rng=7),
}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, data in SEEDS.items():
        (OUT / f"seed-{name}").write_bytes(data)
        print(f"seed-{name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
