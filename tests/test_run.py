"""KVM_RUN through ``vcpu.run()``: the exit records of ``kvmmmu.exits``, the completion
of MMIO reads and port INs, immediate_exit, ``kick()`` from another thread and
single-stepping, on the simulator and on the device (real-kvm-here.md sections 2
and 4: CPL0 code is emulated there; pm32 without paging and 4-level long mode run).

The guests are a few instructions assembled with iced-x86's BlockEncoder at
CODE in slot 0 (identity-mapped in long mode); MMIO is the gpa hole at MMIO_GPA.
"""

from __future__ import annotations

import errno
import random
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from iced_x86 import BlockEncoder, Code, Instruction, MemoryOperand, Register

import kvmmmu
from kvmmmu import GuestMemory, uapi
from kvmmmu.exits import (
    Exit,
    ExitDebug,
    ExitDirtyRingFull,
    ExitHlt,
    ExitInternalError,
    ExitIntr,
    ExitIo,
    ExitMmio,
    ExitShutdown,
)
from kvmmmu.guest.paging import P, PageTables, U, W

MiB = 1 << 20
RAM = 4 * MiB
CODE = 0x1000
STACK = 0x8000
DATA = 0x9000
TABLES = 2 * MiB  # the page-table pool (long mode)
ROM_GPA = 0x40_0000 + RAM  # a read-only slot above RAM
MMIO_GPA = 0xE000_0000
LOGGED_GPA = 0x100_0000  # a dirty-logged slot (16 MiB)

CR0_PE, CR0_ET, CR0_WP, CR0_PG = 1, 1 << 4, 1 << 16, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA, EFER_NXE = 1 << 8, 1 << 10, 1 << 11

MODES = ["pm32", "lm64"]

I = Instruction  # noqa: E741 - the assembler's one-letter idiom
R = Register
M = MemoryOperand


def asm(bitness: int, instrs: list[Instruction], rip: int = CODE) -> bytes:
    """Encode ``instrs`` at ``rip``. A branch's target is the ``ip`` given to the
    labelled instruction with :func:`label`."""
    enc = BlockEncoder(bitness)
    enc.add_many(instrs)
    return bytes(enc.encode(rip))


def label(instr: Instruction, ident: int) -> Instruction:
    instr.ip = ident
    return instr


def jmp_self(bitness: int, ident: int = 1) -> Instruction:
    code = Code.JMP_REL8_64 if bitness == 64 else Code.JMP_REL8_32
    return label(I.create_branch(code, ident), ident)


def hlt() -> Instruction:
    return I.create(Code.HLT)


def out_imm(port: int, size: int) -> Instruction:
    code = {1: Code.OUT_IMM8_AL, 2: Code.OUT_IMM8_AX, 4: Code.OUT_IMM8_EAX}[size]
    return I.create_u32_reg(code, port, {1: R.AL, 2: R.AX, 4: R.EAX}[size])


def in_imm(port: int, size: int) -> Instruction:
    code = {1: Code.IN_AL_IMM8, 2: Code.IN_AX_IMM8, 4: Code.IN_EAX_IMM8}[size]
    return I.create_reg_u32(code, {1: R.AL, 2: R.AX, 4: R.EAX}[size], port)


def mov_rbx(bitness: int, value: int) -> Instruction:
    if bitness == 64:
        return I.create_reg_u64(Code.MOV_R64_IMM64, R.RBX, value)
    return I.create_reg_u32(Code.MOV_R32_IMM32, R.EBX, value)


def base(bitness: int) -> Register:
    return R.RBX if bitness == 64 else R.EBX


class Guest:
    """One VM with one vCPU in ``mode`` ("pm32": flat 32-bit protected mode without
    paging; "lm64": 4-level long mode, the first RAM bytes, ROM_GPA and MMIO_GPA
    identity-mapped), CPL0, RIP at CODE."""

    def __init__(
        self,
        kvm: kvmmmu.Kvm,
        mode: str,
        code: bytes,
        *,
        rom: bytes = b"",
        logged: int = 0,
        ring: int = 0,
    ) -> None:
        self.mode = mode
        self.bits = 64 if mode == "lm64" else 32
        self.vm = kvm.create_vm()
        if ring:
            self.vm.enable_dirty_ring(ring)
        self.mem = GuestMemory(RAM)
        self.vm.set_user_memory_region(0, 0, RAM, self.mem)
        if logged:
            self.logged = GuestMemory(logged)
            flags = uapi.KVM_MEM_LOG_DIRTY_PAGES
            self.vm.set_user_memory_region(2, LOGGED_GPA, logged, self.logged, flags)
        if rom:
            self.rom = GuestMemory(4096)
            self.rom.write(0, rom)
            self.vm.set_user_memory_region(1, ROM_GPA, 4096, self.rom, uapi.KVM_MEM_READONLY)
        self.mem.write(CODE, code)
        self.vcpu = self.vm.create_vcpu(0)
        self.vcpu.set_cpuid2(kvm.get_supported_cpuid())
        s = self.vcpu.get_sregs()
        for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
            seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFF_FFFF, 0x10, 3
            seg.present, seg.dpl, seg.db, seg.s, seg.g, seg.l = 1, 0, 1, 1, 1, 0
        s.cs.base, s.cs.limit, s.cs.selector, s.cs.type = 0, 0xFFFF_FFFF, 0x8, 11
        s.cs.present, s.cs.dpl, s.cs.s, s.cs.g = 1, 0, 1, 1
        if mode == "lm64":
            pt = PageTables(self.mem, "4-level", pool=TABLES, pool_size=MiB)
            pt.map(0, 0, size=2 * MiB, flags=P | W)
            pt.map(ROM_GPA, ROM_GPA, flags=P | W)
            pt.map(MMIO_GPA, MMIO_GPA, flags=P | W)
            for offset in range(0, logged, 2 * MiB):
                pt.map(LOGGED_GPA + offset, LOGGED_GPA + offset, size=2 * MiB, flags=P | W)
            s.cr3 = pt.cr3
            s.cr0 = CR0_PE | CR0_ET | CR0_WP | CR0_PG
            s.cr4 = CR4_PAE
            s.efer = EFER_LME | EFER_LMA | EFER_NXE
            s.cs.l, s.cs.db = 1, 0
        else:
            s.cr0 = CR0_PE | CR0_ET
            s.cs.l, s.cs.db = 0, 1
        self.vcpu.set_sregs(s)
        r = self.vcpu.get_regs()
        r.rip, r.rsp, r.rflags = CODE, STACK, 2
        self.vcpu.set_regs(r)

    @property
    def rip(self) -> int:
        return int(self.vcpu.get_regs().rip)

    def run(self) -> Exit:
        return self.vcpu.run()

    def close(self) -> None:
        self.vcpu.close()
        self.vm.close()


@pytest.fixture
def guests(kvm: kvmmmu.Kvm) -> Iterator[list[Guest]]:
    made: list[Guest] = []
    yield made
    for g in made:
        g.close()


def make(kvm: kvmmmu.Kvm, made: list[Guest], mode: str, code: bytes, **kw: Any) -> Guest:
    g = Guest(kvm, mode, code, **kw)
    made.append(g)
    return g


def insn_len(bits: int, instr: Instruction) -> int:
    return len(asm(bits, [instr]))


# -- port I/O ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_out(kvm: kvmmmu.Kvm, guests: list[Guest], mode: str) -> None:
    bits = 64 if mode == "lm64" else 32
    code = asm(
        bits,
        [
            I.create_reg_u32(Code.MOV_R32_IMM32, R.EAX, 0x44332211),
            out_imm(0x10, 1),
            out_imm(0x12, 2),
            out_imm(0x14, 4),
            hlt(),
        ],
    )
    g = make(kvm, guests, mode, code)
    records = []
    for port, data in ((0x10, b"\x11"), (0x12, b"\x11\x22"), (0x14, b"\x11\x22\x33\x44")):
        e = g.run()
        assert e == ExitIo(port=port, size=len(data), count=1, is_write=True, data=data)
        assert e.value == int.from_bytes(data, "little")
        records.append(e)
    assert isinstance(g.run(), ExitHlt)
    # Owned copies: later exits did not change them.
    assert [e.data for e in records] == [b"\x11", b"\x11\x22", b"\x11\x22\x33\x44"]


@pytest.mark.parametrize("mode", MODES)
def test_in_completes_on_reentry(kvm: kvmmmu.Kvm, guests: list[Guest], mode: str) -> None:
    """The IN's value is what userspace put at io.data_offset before the next KVM_RUN."""
    bits = 64 if mode == "lm64" else 32
    code = asm(
        bits,
        [
            in_imm(0x20, 1),
            out_imm(0x21, 1),
            in_imm(0x22, 4),
            out_imm(0x23, 4),
            hlt(),
        ],
    )
    g = make(kvm, guests, mode, code)
    e = g.run()
    assert e == ExitIo(port=0x20, size=1, count=1, is_write=False)
    with pytest.raises(ValueError):
        g.vcpu.complete_io_in(b"\x01\x02")
    with pytest.raises(RuntimeError):
        g.vcpu.complete_mmio_read(b"\x01")
    g.vcpu.complete_io_in(b"\x5a")
    assert g.run() == ExitIo(port=0x21, size=1, count=1, is_write=True, data=b"\x5a")
    with pytest.raises(RuntimeError):
        g.vcpu.complete_io_in(b"\x5a")  # an OUT is not a pending read
    assert g.run() == ExitIo(port=0x22, size=4, count=1, is_write=False)
    g.vcpu.complete_io_in(b"\xde\xad\xbe\xef")
    assert g.run() == ExitIo(port=0x23, size=4, count=1, is_write=True, data=b"\xde\xad\xbe\xef")
    assert isinstance(g.run(), ExitHlt)


@pytest.mark.parametrize("mode", MODES)
def test_string_io(kvm: kvmmmu.Kvm, guests: list[Guest], mode: str) -> None:
    """REP OUTSB exits once per element (count 1, RCX already counted down, RIP on the
    instruction at every exit, the last one with RCX 0 included); REP INSW reads ahead:
    one exit with count = RCX, and the ``size*count`` bytes given back land in memory
    in order."""
    bits = 64 if mode == "lm64" else 32
    code = asm(
        bits,
        [
            I.create_reg_u32(Code.MOV_R32_IMM32, R.ECX, 4),
            I.create_reg_u32(Code.MOV_R32_IMM32, R.EDX, 0x30),
            I.create_reg_u32(Code.MOV_R32_IMM32, R.ESI, DATA),
            outs := I.create_rep_outsb(bits),
            I.create_reg_u32(Code.MOV_R32_IMM32, R.ECX, 3),
            I.create_reg_u32(Code.MOV_R32_IMM32, R.EDI, DATA + 0x100),
            I.create_rep_insw(bits),
            hlt(),
        ],
    )
    outs_rip = CODE + 15
    assert asm(bits, [outs]) == code[15:17]
    g = make(kvm, guests, mode, code)
    g.mem.write(DATA, b"abcd")
    for i, byte in enumerate(b"abcd"):
        assert g.run() == ExitIo(port=0x30, size=1, count=1, is_write=True, data=bytes([byte]))
        r = g.vcpu.get_regs()
        assert (r.rip, r.rcx) == (outs_rip, 3 - i)
    e = g.run()
    assert e == ExitIo(port=0x30, size=2, count=3, is_write=False)
    with pytest.raises(ValueError):
        g.vcpu.complete_io_in(b"\x01\x02")
    g.vcpu.complete_io_in(b"\x01\x02\x03\x04\x05\x06")
    assert g.run() == ExitHlt()
    assert g.mem.read(DATA + 0x100, 8) == b"\x01\x02\x03\x04\x05\x06\x00\x00"
    assert g.vcpu.get_regs().rcx == 0


# -- MMIO --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_mmio_writes(kvm: kvmmmu.Kvm, guests: list[Guest], mode: str) -> None:
    """Writes of 1/2/4(/8) bytes to a gpa without a slot: one exit each, the bytes as
    written, RIP already past the store (KVM completes writes before exiting)."""
    bits = 64 if mode == "lm64" else 32
    b = base(bits)
    instrs = [
        mov_rbx(bits, MMIO_GPA),
        I.create_mem_u32(Code.MOV_RM8_IMM8, M(b), 0x44),
        I.create_mem_u32(Code.MOV_RM16_IMM16, M(b, displ=2), 0x4433),
        I.create_mem_u32(Code.MOV_RM32_IMM32, M(b, displ=4), 0x44332211),
    ]
    expected = [(0, b"\x44"), (2, b"\x33\x44"), (4, b"\x11\x22\x33\x44")]
    if bits == 64:
        instrs += [
            I.create_reg_u64(Code.MOV_R64_IMM64, R.RAX, 0xCCBBAA9988776655),
            I.create_mem_reg(Code.MOV_RM64_R64, M(b, displ=8), R.RAX),
        ]
        expected.append((8, bytes.fromhex("5566778899aabbcc")))
    instrs.append(hlt())
    code = asm(bits, instrs)
    g = make(kvm, guests, mode, code)
    for offset, data in expected:
        e = g.run()
        assert e == ExitMmio(phys_addr=MMIO_GPA + offset, data=data, is_write=True)
        assert e.len == len(data)
    end = CODE + len(code) - 1
    assert g.rip == end  # past the last store, at the HLT
    assert g.run() == ExitHlt()
    assert g.rip == end + 1


@pytest.mark.parametrize("mode", MODES)
def test_mmio_read_completes_on_reentry(kvm: kvmmmu.Kvm, guests: list[Guest], mode: str) -> None:
    """A read exits with zeros and RIP still at the load; the value given to
    complete_mmio_read is what the load returns when run() re-enters (the guest then
    writes it back to MMIO and to RAM)."""
    bits = 64 if mode == "lm64" else 32
    b = base(bits)
    load = I.create_reg_mem(Code.MOV_R32_RM32, R.EAX, M(b))
    instrs = [
        mov_rbx(bits, MMIO_GPA),
        load,
        I.create_mem_reg(Code.MOV_RM32_R32, M(b, displ=0x10), R.EAX),
        I.create_mem_reg(Code.MOV_RM32_R32, M(displ=DATA, displ_size=4), R.EAX),
    ]
    if bits == 64:
        instrs += [
            I.create_reg_mem(Code.MOV_R64_RM64, R.RCX, M(b, displ=0x20)),
            I.create_mem_reg(Code.MOV_RM64_R64, M(b, displ=0x28), R.RCX),
        ]
    instrs.append(hlt())
    g = make(kvm, guests, mode, asm(bits, instrs))
    e = g.run()
    assert e == ExitMmio(phys_addr=MMIO_GPA, data=bytes(4), is_write=False)
    assert g.rip == CODE + insn_len(bits, instrs[0])  # the load has not completed
    with pytest.raises(ValueError):
        g.vcpu.complete_mmio_read(b"\x01\x02")
    g.vcpu.complete_mmio_read(b"\x78\x56\x34\x12")
    with pytest.raises(RuntimeError):
        g.vcpu.complete_io_in(b"\x01")
    assert g.run() == ExitMmio(phys_addr=MMIO_GPA + 0x10, data=b"\x78\x56\x34\x12", is_write=True)
    if bits == 64:
        assert g.run() == ExitMmio(phys_addr=MMIO_GPA + 0x20, data=bytes(8), is_write=False)
        g.vcpu.complete_mmio_read(bytes(range(1, 9)))
        assert g.run() == ExitMmio(
            phys_addr=MMIO_GPA + 0x28, data=bytes(range(1, 9)), is_write=True
        )
    assert g.run() == ExitHlt()
    assert g.mem.read(DATA, 4) == b"\x78\x56\x34\x12"
    assert g.vcpu.get_regs().rax & 0xFFFF_FFFF == 0x12345678


def test_mmio_at_cpl3(kvm: kvmmmu.Kvm, guests: list[Guest]) -> None:
    """64-bit CPL3 code (native on the device: #PF, then KVM emulates the access): the
    same exits and RIPs as at CPL0, counted in the vCPU's mmio_exits."""
    b = R.RBX
    instrs = [
        mov_rbx(64, MMIO_GPA),
        I.create_reg_mem(Code.MOV_R32_RM32, R.EAX, M(b)),
        I.create_mem_reg(Code.MOV_RM32_R32, M(b, displ=0x10), R.EAX),
        I.create_mem_reg(Code.MOV_RM32_R32, M(b, displ=0x14), R.EAX),
    ]
    g = make(kvm, guests, "lm64", asm(64, instrs))
    pt = PageTables(g.mem, "4-level", pool=TABLES + MiB, pool_size=MiB)
    pt.map(0, 0, size=2 * MiB, flags=P | W | U)
    pt.map(MMIO_GPA, MMIO_GPA, flags=P | W | U)
    s = g.vcpu.get_sregs()
    s.cr3 = pt.cr3
    s.cs.selector, s.cs.dpl = 0x1B, 3
    for seg in (s.ds, s.es, s.ss, s.fs, s.gs):
        seg.selector, seg.dpl = 0x23, 3
    g.vcpu.set_sregs(s)
    before = g.vcpu.stats()["mmio_exits"]
    assert g.run() == ExitMmio(phys_addr=MMIO_GPA, data=bytes(4), is_write=False)
    load = CODE + insn_len(64, instrs[0])
    assert g.rip == load
    g.vcpu.complete_mmio_read(b"\x01\x02\x03\x04")
    assert g.run() == ExitMmio(phys_addr=MMIO_GPA + 0x10, data=b"\x01\x02\x03\x04", is_write=True)
    assert g.rip == load + insn_len(64, instrs[1]) + insn_len(64, instrs[2])
    assert g.run() == ExitMmio(phys_addr=MMIO_GPA + 0x14, data=b"\x01\x02\x03\x04", is_write=True)
    assert g.vcpu.stats()["mmio_exits"] - before == 3


@pytest.mark.parametrize("mode", MODES)
def test_readonly_slot(kvm: kvmmmu.Kvm, guests: list[Guest], mode: str) -> None:
    """A KVM_MEM_READONLY slot reads as memory; a write exits as MMIO and leaves it."""
    bits = 64 if mode == "lm64" else 32
    b = base(bits)
    code = asm(
        bits,
        [
            mov_rbx(bits, ROM_GPA),
            I.create_reg_mem(Code.MOV_R32_RM32, R.EAX, M(b)),
            I.create_mem_reg(Code.MOV_RM32_R32, M(displ=DATA, displ_size=4), R.EAX),
            I.create_mem_u32(Code.MOV_RM32_IMM32, M(b), 0x11223344),
            hlt(),
        ],
    )
    g = make(kvm, guests, mode, code, rom=b"ROMDATA!")
    assert g.run() == ExitMmio(phys_addr=ROM_GPA, data=b"\x44\x33\x22\x11", is_write=True)
    assert g.run() == ExitHlt()
    assert g.mem.read(DATA, 4) == b"ROMD"
    assert g.rom.read(0, 8) == b"ROMDATA!"


# -- HLT, immediate_exit, kick -----------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_hlt_rip(kvm: kvmmmu.Kvm, guests: list[Guest], mode: str) -> None:
    g = make(kvm, guests, mode, asm(32, [I.create(Code.NOPD), hlt(), hlt()]))
    e = g.run()
    assert isinstance(e, ExitHlt) and e.reason == uapi.KVM_EXIT_HLT
    assert g.vcpu.last_exit == e
    assert g.vcpu.kvm_run.exit_reason == uapi.KVM_EXIT_HLT
    assert g.rip == CODE + 2  # after the HLT
    assert g.run() == ExitHlt()
    assert g.rip == CODE + 3


def test_immediate_exit(kvm: kvmmmu.Kvm, guests: list[Guest]) -> None:
    """EINTR comes back as ExitIntr, nothing runs, and the flag stays set until cleared."""
    g = make(kvm, guests, "lm64", asm(64, [out_imm(0x10, 1), hlt()]))
    assert not g.vcpu.immediate_exit
    g.vcpu.immediate_exit = True
    assert g.vcpu.kvm_run.immediate_exit == 1
    assert g.run() == ExitIntr()
    assert g.run() == ExitIntr()
    assert g.rip == CODE
    assert g.vcpu.immediate_exit
    g.vcpu.immediate_exit = False
    assert isinstance(g.run(), ExitIo)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["mmio", "io"])
def test_immediate_exit_completes_a_pending_read(
    kvm: kvmmmu.Kvm, guests: list[Guest], mode: str, kind: str
) -> None:
    """KVM_RUN with immediate_exit after a read exit first completes the read (the load
    or IN takes its data, RIP moves on), then returns EINTR without touching
    exit_reason; the read is no longer pending."""
    bits = 64 if mode == "lm64" else 32
    if kind == "mmio":
        instrs = [
            mov_rbx(bits, MMIO_GPA),
            I.create_reg_mem(Code.MOV_R32_RM32, R.EAX, M(base(bits))),
        ]
        reason, data, complete = uapi.KVM_EXIT_MMIO, b"\x11\x22\x33\x44", "complete_mmio_read"
    else:
        instrs = [in_imm(0x20, 4)]
        reason, data, complete = uapi.KVM_EXIT_IO, b"\x55\x66\x77\x88", "complete_io_in"
    instrs += [out_imm(0x10, 4), hlt()]
    g = make(kvm, guests, mode, asm(bits, instrs))
    e = g.run()
    assert isinstance(e, (ExitMmio, ExitIo)) and e.reason == reason and not e.is_write
    getattr(g.vcpu, complete)(data)
    g.vcpu.immediate_exit = True
    assert g.run() == ExitIntr()
    r = g.vcpu.get_regs()
    assert r.rax & 0xFFFF_FFFF == int.from_bytes(data, "little")
    assert r.rip == CODE + len(asm(bits, instrs[:-2]))
    assert g.vcpu.kvm_run.exit_reason == reason
    with pytest.raises(RuntimeError):
        getattr(g.vcpu, complete)(data)
    assert g.run() == ExitIntr()
    g.vcpu.immediate_exit = False
    assert g.run() == ExitIo(port=0x10, size=4, count=1, is_write=True, data=data)


def test_kick_before_run(kvm: kvmmmu.Kvm, guests: list[Guest]) -> None:
    g = make(kvm, guests, "lm64", asm(64, [hlt()]))
    g.vcpu.kick()
    assert g.vcpu.immediate_exit
    assert g.run() == ExitIntr()
    g.vcpu.immediate_exit = False
    assert g.run() == ExitHlt()


@pytest.mark.parametrize("runner", ["worker", "main"])
def test_kick_interrupts_a_running_vcpu(kvm: kvmmmu.Kvm, guests: list[Guest], runner: str) -> None:
    """An endless loop is stopped by one kick from another thread: the vCPU running on
    a worker thread and kicked from the main thread, or the reverse."""
    g = make(kvm, guests, "lm64", asm(64, [jmp_self(64)]))
    result: list[Exit | BaseException] = []

    def run() -> None:
        try:
            result.append(g.run())
        except BaseException as e:  # reported to the main thread
            result.append(e)

    def kick_later() -> None:
        time.sleep(0.1)
        g.vcpu.kick()

    start = time.monotonic()
    if runner == "worker":
        t = threading.Thread(target=run, daemon=True)
        t.start()
        time.sleep(0.1)
        assert t.is_alive(), result  # the guest really loops
        g.vcpu.kick()
        t.join(10)
    else:
        t = threading.Thread(target=kick_later, daemon=True)
        t.start()
        run()
        t.join(10)
    assert result == [ExitIntr()]
    assert time.monotonic() - start < 10
    assert g.rip == CODE  # still in the loop
    g.vcpu.immediate_exit = False


def test_kick_reaches_only_its_vcpu(kvm: kvmmmu.Kvm, guests: list[Guest]) -> None:
    """Two vCPUs of one VM loop on two worker threads; a kick from a third thread
    stops the one kicked and leaves the other running."""
    g = make(kvm, guests, "lm64", asm(64, [jmp_self(64)]))
    vcpus = [g.vcpu, g.vm.create_vcpu(1)]
    vcpus[1].set_cpuid2(kvm.get_supported_cpuid())
    vcpus[1].set_sregs(g.vcpu.get_sregs())
    vcpus[1].set_regs(g.vcpu.get_regs())
    results: list[list[object]] = [[], []]

    def run(i: int) -> None:
        try:
            results[i].append(vcpus[i].run())
        except BaseException as e:  # reported to the main thread
            results[i].append(e)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    kicker = threading.Thread(target=vcpus[1].kick, daemon=True)
    kicker.start()
    kicker.join(10)
    threads[1].join(10)
    assert results[1] == [ExitIntr()]
    time.sleep(0.1)
    assert threads[0].is_alive() and results[0] == []
    assert not vcpus[0].immediate_exit
    vcpus[0].kick()
    threads[0].join(10)
    assert results[0] == [ExitIntr()]
    for v in vcpus:
        v.immediate_exit = False
    vcpus[1].close()


def test_kick_is_never_lost(kvm: kvmmmu.Kvm, guests: list[Guest]) -> None:
    """One kick at a random moment of a busy exit loop (OUT, run again) on a worker
    thread always ends that loop with ExitIntr, wherever it lands: inside KVM_RUN,
    between two runs, or while the exit is handled."""
    code = asm(64, [label(out_imm(0x10, 1), 1), I.create_branch(Code.JMP_REL8_64, 1)])
    g = make(kvm, guests, "lm64", code)
    rng = random.Random(7)
    for _ in range(30):
        outcome: list[object] = []

        def loop(outcome: list[object]) -> None:
            try:
                exits = 0
                while not isinstance(e := g.run(), ExitIntr):
                    assert isinstance(e, ExitIo), e
                    exits += 1
                outcome.append(exits)
            except BaseException as exc:  # reported to the main thread
                outcome.append(exc)

        t = threading.Thread(target=loop, args=(outcome,), daemon=True)
        t.start()
        time.sleep(rng.random() * 0.002)
        g.vcpu.kick()
        t.join(10)
        assert not t.is_alive(), "the kick was lost"
        assert len(outcome) == 1 and isinstance(outcome[0], int), outcome
        g.vcpu.immediate_exit = False


# -- debug, errors, shutdown -------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_single_step(kvm: kvmmmu.Kvm, guests: list[Guest], mode: str) -> None:
    """KVM_GUESTDBG_SINGLESTEP at CPL0: one #DB exit per instruction, pc = the next."""
    bits = 64 if mode == "lm64" else 32
    instrs = [
        I.create_reg_u32(Code.MOV_R32_IMM32, R.EAX, 1),
        I.create_reg_reg(Code.ADD_R32_RM32, R.EAX, R.EAX),
        I.create(Code.NOPD),
        hlt(),
    ]
    g = make(kvm, guests, mode, asm(bits, instrs))
    g.vcpu.set_guest_debug(single_step=True)
    pc = CODE
    for instr in instrs[:3]:
        pc += insn_len(bits, instr)
        e = g.run()
        assert isinstance(e, ExitDebug)
        assert (e.exception, e.pc) == (1, pc)
        assert g.rip == pc
    g.vcpu.set_guest_debug(enable=False)
    assert g.run() == ExitHlt()
    assert g.vcpu.get_regs().rax == 2


@pytest.mark.parametrize("mode", MODES)
def test_single_step_over_exits(kvm: kvmmmu.Kvm, guests: list[Guest], mode: str) -> None:
    """Single-stepping instructions that exit: the OUT and the MMIO store give their own
    exit and no #DB for themselves. A single-stepped HLT differs, by design: on the
    device (CPL0 code emulated) it does not halt but exits with #DB after it, as if it
    were a NOP; the simulator runs CPL0 code as hardware KVM does, whose HLT intercept
    (kvm_emulate_halt, no in-kernel APIC) overwrites the step's KVM_EXIT_DEBUG with
    KVM_EXIT_HLT (the kernel's "squashing" TODO), RIP after the HLT."""
    bits = 64 if mode == "lm64" else 32
    instrs = [
        out_imm(0x10, 1),
        mov_rbx(bits, MMIO_GPA),
        I.create_mem_u32(Code.MOV_RM8_IMM8, M(base(bits)), 0x44),
        hlt(),
        I.create(Code.NOPD),
    ]
    ends = [CODE + len(asm(bits, instrs[: i + 1])) for i in range(len(instrs))]
    g = make(kvm, guests, mode, asm(bits, instrs))
    g.vcpu.set_guest_debug(single_step=True)
    assert g.run() == ExitIo(port=0x10, size=1, count=1, is_write=True, data=b"\x00")
    assert g.rip == ends[0]
    e = g.run()
    assert isinstance(e, ExitDebug) and (e.exception, e.pc) == (1, ends[1])
    assert g.run() == ExitMmio(phys_addr=MMIO_GPA, data=b"\x44", is_write=True)
    assert g.rip == ends[2]
    e = g.run()
    if kvm.backend == "sim":
        assert e == ExitHlt()
        assert g.rip == ends[3]
    else:
        assert isinstance(e, ExitDebug) and (e.exception, e.pc) == (1, ends[3])
    e = g.run()
    assert isinstance(e, ExitDebug) and (e.exception, e.pc) == (1, ends[4])


@pytest.mark.parametrize("mode", MODES)
def test_hw_breakpoint(kvm: kvmmmu.Kvm, guests: list[Guest], mode: str) -> None:
    """KVM_GUESTDBG_USE_HW_BP with DR0 on an instruction: #DB exit before it, pc = DR0,
    DR6.B0. KVM's check of userspace breakpoints before an emulated instruction ignores
    RFLAGS.RF (only the guest's own DR7 honours it), so running again hits it again
    until userspace removes the breakpoint."""
    bits = 64 if mode == "lm64" else 32
    g = make(kvm, guests, mode, asm(bits, [I.create(Code.NOPD)] * 3 + [hlt()]))
    dr7 = 1 | 0x400  # L0, bit 10 (reserved, set)
    g.vcpu.set_guest_debug(hw_bp=True, debugreg=[CODE + 2, 0, 0, 0, 0, 0, 0, dr7])
    for _ in range(2):
        e = g.run()
        assert isinstance(e, ExitDebug)
        assert (e.exception, e.pc, e.dr6 & 0xF) == (1, CODE + 2, 1)
        assert g.rip == CODE + 2
    r = g.vcpu.get_regs()
    r.rflags |= 1 << 16  # RF
    g.vcpu.set_regs(r)
    assert isinstance(g.run(), ExitDebug)
    g.vcpu.set_guest_debug(enable=False)
    assert g.run() == ExitHlt()
    assert g.rip == CODE + 4


def test_run_errno(kvm: kvmmmu.Kvm, guests: list[Guest]) -> None:
    """Errnos other than EINTR raise: a vCPU in a VM without memory slots is ENOSPC
    (exit_reason left at 0); a closed vCPU cannot run."""
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    with pytest.raises(OSError) as err:
        vcpu.run()
    assert err.value.errno == errno.ENOSPC
    assert vcpu.kvm_run.exit_reason == 0
    vcpu.close()
    with pytest.raises(ValueError):
        vcpu.run()
    vcpu.kick()  # harmless once closed
    vm.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sw_bp", [False, True])
def test_emulation_failure_int3(
    kvm: kvmmmu.Kvm, guests: list[Guest], mode: str, sw_bp: bool
) -> None:
    """An INT3 at CPL0 in protected or long mode. On the device (CPL0 code emulated):
    KVM's emulator does INT only in real mode, so KVM_EXIT_INTERNAL_ERROR / EMULATION
    with the instruction bytes, RIP on the INT3; KVM_GUESTDBG_USE_SW_BP does not turn it
    into a #BP exit (that takes a hardware #BP intercept, and the emulator never raises
    one). The simulator runs CPL0 code as hardware KVM does, by design: the #BP goes
    through the IDT (none here: a triple fault), or with sw_bp KVM's #BP intercept exits
    with exception 3, RIP on the INT3."""
    bits = 64 if mode == "lm64" else 32
    code = asm(bits, [I.create(Code.NOPD), I.create(Code.INT3), hlt()])
    g = make(kvm, guests, mode, code)
    if sw_bp:
        g.vcpu.set_guest_debug(sw_bp=True)
    e = g.run()
    if kvm.backend == "sim":
        if sw_bp:
            assert isinstance(e, ExitDebug) and (e.exception, e.pc) == (3, CODE + 1)
            assert g.rip == CODE + 1
        else:
            assert e == ExitShutdown()
        return
    assert isinstance(e, ExitInternalError), e
    assert e.suberror == uapi.KVM_INTERNAL_ERROR_EMULATION
    assert e.insn_bytes == g.mem.read(CODE + 1, 15)
    assert g.rip == CODE + 1


# FSIN (x87) is beyond KVM's emulator and the simulator's: the instruction sits at
# `at`, the HLT after it, a HLT and NOPs at the start of the next page.
FETCH_CASES = [(0x1FF0, 15), (0x1FFB, 5), (0x1FFD, 3), (0x1FFF, 15)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("at", "fetched"), FETCH_CASES)
def test_emulation_failure_insn_bytes(
    kvm: kvmmmu.Kvm, guests: list[Guest], mode: str, at: int, fetched: int
) -> None:
    """KVM_INTERNAL_ERROR_EMULATION reports what the emulator fetched: 15 bytes from RIP,
    cut at the end of the page unless the instruction itself crosses it (then the
    fetch goes on into the next page); RIP stays on the instruction."""
    bits = 64 if mode == "lm64" else 32
    g = make(kvm, guests, mode, asm(bits, [hlt()]))
    g.mem.write(at, asm(bits, [I.create(Code.FSIN), hlt()], rip=at))
    g.mem.write(0x2000, b"\xf4\x90\x90")
    r = g.vcpu.get_regs()
    r.rip = at
    g.vcpu.set_regs(r)
    e = g.run()
    assert isinstance(e, ExitInternalError), e
    assert e.suberror == uapi.KVM_INTERNAL_ERROR_EMULATION
    assert e.flags == uapi.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
    assert e.insn_bytes == g.mem.read(at, fetched)
    assert len(e.data) == 8  # flags, 2 words of bytes, 5 of exit info
    assert e.data[0] == e.flags
    assert str(e).startswith("INTERNAL_ERROR EMULATION insn=d9 f")
    assert g.rip == at


@pytest.mark.parametrize("mode", MODES)
def test_emulation_failure_raw_words(kvm: kvmmmu.Kvm, guests: list[Guest], mode: str) -> None:
    """The rest of the emulation_failure words as the device fills them: insn_bytes past
    insn_size padded with 0x90 (KVM's memset), and the vendor exit info (kvm_pvm's)
    0x1000, 0, 0, 0, 0 whatever the RIP."""
    bits = 64 if mode == "lm64" else 32
    at = 0x1FFD
    g = make(kvm, guests, mode, asm(bits, [hlt()]))
    g.mem.write(at, asm(bits, [I.create(Code.FSIN), hlt()], rip=at))
    r = g.vcpu.get_regs()
    r.rip = at
    g.vcpu.set_regs(r)
    e = g.run()
    assert isinstance(e, ExitInternalError), e
    raw = struct.pack("<2Q", e.data[1], e.data[2])
    assert raw == b"\x03\xd9\xfe\xf4" + b"\x90" * 12
    assert e.info == (0x1000, 0, 0, 0, 0)


@pytest.mark.parametrize("mode", MODES)
def test_triple_fault_is_shutdown(kvm: kvmmmu.Kvm, guests: list[Guest], mode: str) -> None:
    """UD2 with an empty IDT: #UD, #GP for the vector beyond the limit, #DF, then a
    triple fault: KVM_EXIT_SHUTDOWN."""
    bits = 64 if mode == "lm64" else 32
    g = make(kvm, guests, mode, asm(bits, [I.create(Code.UD2), hlt()]))
    s = g.vcpu.get_sregs()
    s.idt.base, s.idt.limit = 0, 0
    g.vcpu.set_sregs(s)
    assert g.run() == ExitShutdown()


@pytest.mark.parametrize("mode", MODES)
def test_dirty_ring_full(kvm: kvmmmu.Kvm, guests: list[Guest], mode: str) -> None:
    """A guest writing 300 pages with a 256-entry ring (soft limit 192): KVM_RUN exits
    with KVM_EXIT_DIRTY_RING_FULL before the ring overflows (on the device at the end
    of an emulation batch, so the loop is padded with NOPs to stay in the 64 reserved
    entries), and after harvest + reset the guest goes on; no page is lost."""
    bits = 64 if mode == "lm64" else 32
    n = 300
    loop = {32: Code.LOOP_REL8_32_ECX, 64: Code.LOOP_REL8_64_RCX}[bits]
    code = asm(
        bits,
        [
            I.create_reg_u32(Code.MOV_R32_IMM32, R.ECX, n),
            mov_rbx(bits, LOGGED_GPA),
            label(I.create_mem_reg(Code.MOV_RM8_R8, M(base(bits)), R.CL), 1),
            *[I.create(Code.NOPD) for _ in range(16)],
            I.create_reg_i32(
                Code.ADD_RM32_IMM32 if bits == 32 else Code.ADD_RM64_IMM32, base(bits), 4096
            ),
            I.create_branch(loop, 1),
            hlt(),
        ],
    )
    g = make(kvm, guests, mode, code, logged=2 * MiB, ring=4096)
    ring = g.vcpu.dirty_ring
    assert ring is not None
    seen: list[int] = []
    fulls = 0
    while True:
        e = g.run()
        slots, offsets = ring.harvest()
        assert set(slots.tolist()) <= {2}
        seen += offsets.tolist()
        g.vm.reset_dirty_rings()
        if e == ExitHlt():
            break
        assert isinstance(e, ExitDirtyRingFull), e
        assert 192 <= len(offsets) <= 256
        fulls += 1
    assert fulls >= 1
    assert sorted(seen) == list(range(n))


# -- the records -------------------------------------------------------------------


def test_records_are_immutable_and_readable() -> None:
    e = ExitMmio(phys_addr=MMIO_GPA, data=b"\x01\x02", is_write=True)
    with pytest.raises(AttributeError):
        e.phys_addr = 0  # type: ignore[misc]
    assert not hasattr(e, "__dict__")
    assert str(e) == "MMIO write gpa=0xe0000000 len=2 data=0102"
    assert str(ExitIo(port=0x3F8, size=1, count=1, is_write=False)) == "IO in port=0x3f8 size=1"
    assert str(ExitHlt()) == "HLT"
    assert e.reason == uapi.KVM_EXIT_MMIO and e.name == "MMIO"


def test_decode_internal_error_layout() -> None:
    """kvm_run.emulation_failure as the kernel fills it: data[0] the flags, data[1:3] the
    size and 15 bytes (padded with 0x90), then the vendor's exit info."""
    run = uapi.kvm_run()
    run.exit_reason = uapi.KVM_EXIT_INTERNAL_ERROR
    run.internal.suberror = uapi.KVM_INTERNAL_ERROR_EMULATION
    run.internal.ndata = 5
    run.emulation_failure.flags = uapi.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
    run.emulation_failure.insn_size = 2
    raw = b"\x0f\x0b" + b"\x90" * 13
    for i, byte in enumerate(raw):
        run.emulation_failure.insn_bytes[i] = byte
    run.internal.data[3] = 0x7B
    run.internal.data[4] = 0x1234
    e = kvmmmu.exits.decode(run)
    assert isinstance(e, ExitInternalError)
    assert e.insn_bytes == b"\x0f\x0b"
    assert e.data[0] == 1 and e.data[1] == struct.unpack_from("<Q", b"\x02" + raw)[0]
    assert e.info == (0x7B, 0x1234)
    assert str(e) == "INTERNAL_ERROR EMULATION insn=0f 0b data=[0x7b, 0x1234]"


@settings(max_examples=300, deadline=None)
@given(
    reason=st.sampled_from(
        [
            uapi.KVM_EXIT_IO,
            uapi.KVM_EXIT_MMIO,
            uapi.KVM_EXIT_DEBUG,
            uapi.KVM_EXIT_FAIL_ENTRY,
            uapi.KVM_EXIT_INTERNAL_ERROR,
            uapi.KVM_EXIT_SYSTEM_EVENT,
            uapi.KVM_EXIT_UNKNOWN,
            uapi.KVM_EXIT_X86_RDMSR,
        ]
    ),
    union=st.binary(min_size=256, max_size=256),
    pio=st.binary(min_size=64, max_size=64),
    plausible=st.booleans(),
)
def test_decode_agrees_with_the_uapi_structs(
    reason: int, union: bytes, pio: bytes, plausible: bool
) -> None:
    """The struct-based decoder reads the fields where uapi's ctypes kvm_run has them.
    ``plausible`` keeps lengths and counts small and the suberror EMULATION, so every
    branch is taken."""
    area = bytearray(12288)
    run = uapi.kvm_run.from_buffer(area)
    run.exit_reason = reason
    offset = uapi.kvm_run._exit.offset
    area[offset : offset + 256] = union
    if plausible:
        run.mmio.len %= 9
        if reason == uapi.KVM_EXIT_INTERNAL_ERROR:
            run.internal.suberror = uapi.KVM_INTERNAL_ERROR_EMULATION
            run.internal.ndata %= 18
        if reason == uapi.KVM_EXIT_SYSTEM_EVENT:
            run.system_event.ndata %= 18
    if reason == uapi.KVM_EXIT_IO:
        run.io.data_offset = 0x1000
        run.io.count %= 8
        area[0x1000 : 0x1000 + 64] = pio
    e = kvmmmu.exits.decode(memoryview(area))
    assert e.reason == reason
    if isinstance(e, ExitIo):
        io = run.io
        assert (e.port, e.size, e.count) == (io.port, io.size, io.count)
        assert e.is_write == (io.direction == uapi.KVM_EXIT_IO_OUT)
        n = io.size * io.count if e.is_write else 0
        assert e.data == bytes(area[0x1000 : 0x1000 + n])
    elif isinstance(e, ExitMmio):
        m = run.mmio
        assert (e.phys_addr, e.is_write) == (m.phys_addr, bool(m.is_write))
        n = min(m.len, 8)
        assert e.data == (bytes(m.data)[:n] if m.is_write else bytes(n))
    elif isinstance(e, ExitDebug):
        a = run.debug.arch
        assert (e.exception, e.pc, e.dr6, e.dr7) == (a.exception, a.pc, a.dr6, a.dr7)
    elif isinstance(e, kvmmmu.ExitFailEntry):
        f = run.fail_entry
        assert (e.hardware_entry_failure_reason, e.cpu) == (f.hardware_entry_failure_reason, f.cpu)
    elif isinstance(e, ExitInternalError):
        i = run.internal
        assert e.suberror == i.suberror
        assert e.data == tuple(i.data[: min(i.ndata, 16)])
        ef = run.emulation_failure
        if i.suberror == 1 and len(e.data) >= 3 and ef.flags & 1:
            assert e.insn_bytes == bytes(ef.insn_bytes)[: min(ef.insn_size, 15)]
        else:
            assert e.insn_bytes == b""
    elif isinstance(e, kvmmmu.ExitSystemEvent):
        ev = run.system_event
        assert e.type == ev.type and e.data == tuple(ev.data[: min(ev.ndata, 16)])
    elif isinstance(e, kvmmmu.ExitUnknown):
        assert e.hardware_exit_reason == run.hw.hardware_exit_reason
    else:
        assert isinstance(e, kvmmmu.ExitOther) and e.raw == bytes(area[offset : offset + 256])
    del run
