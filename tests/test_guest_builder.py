"""The guest builder: the assembler (checked by decoding with iced's Decoder), the
descriptor/gate/TSS bytes, page tables (checked with KVM_TRANSLATE on the model's
and the device's walker), the per-mode register state, and the exception stubs'
report protocol on the device."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from iced_x86 import Decoder, Formatter, FormatterSyntax

import kvmmmu
from kvmmmu import exits
from kvmmmu.guest import asm as x
from kvmmmu.guest import layout as L
from kvmmmu.guest import programs
from kvmmmu.guest.asm import Asm, AsmError
from kvmmmu.guest.builder import (
    CODE,
    DEVICE_MODES,
    IST1_TOP,
    KSTACK_TOP,
    MODES,
    REPORT,
    USTACK_TOP,
    Guest,
    Machine,
)
from kvmmmu.guest.paging import NX, PS, A, D, P, U, W
from kvmmmu.guest.stubs import ExceptionReport, parse_report

from .conftest import DEVICE_PROBLEM, make_kvm

FMT = Formatter(FormatterSyntax.NASM)


def disasm(bitness: int, code: bytes, ip: int) -> list[str]:
    return [FMT.format(i) for i in Decoder(bitness, code, ip=ip)]


# -- the assembler ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bitness", "emit", "text"),
    [
        (64, lambda a: a.mov(x.rax, 5), "mov rax,5"),
        (64, lambda a: a.mov(x.rax, 0x1234_5678_9A), "mov rax,123456789Ah"),
        (64, lambda a: a.mov(x.eax, 0xFFFF_FFFF), "mov eax,0FFFFFFFFh"),
        (64, lambda a: a.mov(x.qword[x.rdx], -1), "mov qword [rdx],0FFFFFFFFFFFFFFFFh"),
        (64, lambda a: a.add(x.qword[x.rbx + x.rcx * 8 + 0x10], 1), "add qword [rbx+rcx*8+10h],1"),
        (64, lambda a: a.mov(x.r9, x.qword[x.rsp - 8]), "mov r9,[rsp-8]"),
        (64, lambda a: a.movzx(x.eax, x.byte[x.rbx]), "movzx eax,byte [rbx]"),
        (64, lambda a: a.lea(x.rsi, x.mem[x.rdi + x.rdi * 2]), "lea rsi,[rdi+rdi*2]"),
        (64, lambda a: a.mov(x.rax, x.cr2), "mov rax,cr2"),
        (64, lambda a: a.mov(x.cr3, x.rax), "mov cr3,rax"),
        (64, lambda a: a.invlpg(x.mem[x.rbx + 0x7000]), "invlpg [rbx+7000h]"),
        (64, lambda a: a.out(0x80, x.al), "out 80h,al"),
        (64, lambda a: a.in_(x.eax, x.dx), "in eax,dx"),
        (64, lambda a: a.push(x.r12), "push r12"),
        (64, lambda a: a.ret(), "ret"),
        (64, lambda a: a.rep_stosq(), "rep stosq"),
        (64, lambda a: a.wrmsr(), "wrmsr"),
        (64, lambda a: a.lgdt(x.mem[x.rax]), "lgdt [rax]"),
        (64, lambda a: a.ltr(x.eax), "ltr ax"),  # the no-prefix R32M16 form
        (64, lambda a: a.xchg(x.qword[x.rbx], x.rcx), "xchg rcx,[rbx]"),  # iced prints reg first
        (64, lambda a: a.cmpxchg(x.dword[x.rdi], x.ecx), "cmpxchg [rdi],ecx"),
        (64, lambda a: a.shl(x.rax, 1), "shl rax,1"),
        (64, lambda a: a.shr(x.rdx, x.cl), "shr rdx,cl"),
        (32, lambda a: a.mov(x.eax, x.cr0), "mov eax,cr0"),
        (32, lambda a: a.mov(x.dword[x.ebx + 4], x.eax), "mov [ebx+4],eax"),
        (32, lambda a: a.push(x.es), "push es"),
        (32, lambda a: a.ret(), "ret"),
        (16, lambda a: a.mov(x.ax, 0x1234), "mov ax,1234h"),
        (16, lambda a: a.mov(x.Mem(x.Addr(disp=8), 4, x.es), x.eax), "mov [es:8],eax"),
        (16, lambda a: a.iret(), "iret"),
    ],
)
def test_instructions_decode_back(bitness: int, emit: object, text: str) -> None:
    a = Asm(bitness, 0x1000)
    emit(a)  # type: ignore[operator]
    assert disasm(bitness, a.assemble(), 0x1000) == [text]


def test_labels_branches_and_data() -> None:
    a = Asm(64, 0x40_0000)
    a.label("top")
    a.dec(x.rcx)
    a.jnz("top")  # backward, short
    a.jmp("far")  # forward over 300 bytes: grows to near
    a.space(300)
    a.label("far")
    a.call("top")
    a.mov(x.rax, "table")  # a label as an immediate: its address
    a.mov(x.rbx, x.qword["table"])  # rip-relative
    a.label("table")
    a.dq(7, "top")
    code = a.assemble()
    top, far, table = (a.labels[k] for k in ("top", "far", "table"))
    assert top == 0x40_0000
    text = disasm(64, code[: far - top], top)
    assert text[:3] == ["dec rcx", "jne short 0000000000400000h", "jmp 0000000000400136h"]
    assert far == 0x40_0000 + 3 + 2 + 5 + 300  # dec, short jne, near jmp, the gap
    tail = disasm(64, code[far - top : table - top], far)
    assert tail == [
        "call 0000000000400000h",
        f"mov rax,{table:X}h",
        f"mov rbx,[rel {table:X}h]",
    ]
    assert struct.unpack_from("<QQ", code, table - top) == (7, top)


def test_assembler_errors() -> None:
    a = Asm(64, 0)
    with pytest.raises(AsmError, match="ambiguous"):
        a.mov(x.mem[x.rax], 1)
    with pytest.raises(AsmError, match="no 64-bit encoding"):
        a.mov(x.rax, x.ebx)
    with pytest.raises(AttributeError):
        a.frobnicate(x.rax)
    a.jmp("nowhere")
    with pytest.raises(AsmError, match="undefined label 'nowhere'"):
        a.assemble()
    b = Asm(64, 0)
    b.label("x")
    with pytest.raises(AsmError, match="defined twice"):
        b.label("x")
    c = Asm(64, 0)
    c.label("l")
    c.space(200)
    c.loop("l")  # LOOP has only rel8
    with pytest.raises(AsmError, match="loop"):
        c.assemble()


REGS64 = [x.rax, x.rbx, x.rcx, x.rdx, x.rsi, x.rdi, x.rbp, x.r8, x.r11, x.r15]


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["mov", "add", "sub", "and", "or", "xor", "cmp"]),
    st.sampled_from(REGS64),
    st.sampled_from(REGS64),
    st.integers(-(2**31), 2**31 - 1),
    st.integers(-(2**31), 2**31 - 1),
)
def test_random_alu_forms_round_trip(op: str, r1: x.Reg, r2: x.Reg, disp: int, imm: int) -> None:
    a = Asm(64, 0x1000)
    a.insn(op, r1, imm)
    a.insn(op, x.qword[r2 + disp], r1)
    a.insn(op, r1, x.qword[r2 + disp])
    instrs = list(Decoder(64, a.assemble(), ip=0x1000))
    assert len(instrs) == 3
    i0, i1, i2 = instrs
    assert FMT.format_mnemonic(i0) == op and i0.op0_register == r1.value
    assert i0.immediate(1) & (2**64 - 1) == imm & (2**64 - 1)
    for i in (i1, i2):
        assert FMT.format_mnemonic(i) == op
        assert i.memory_base == r2.value
        assert i.memory_displacement == disp & (2**64 - 1)
    assert i1.op1_register == r1.value and i2.op0_register == r1.value


# -- descriptors, gates, TSS ------------------------------------------------------------------


def test_flat_segment_descriptors() -> None:
    gdt = L.gdt(0x3000, long_mode=True)
    q = struct.unpack("<9Q", gdt)
    assert q[0] == 0
    assert q[L.KERNEL_CS64_SEL // 8] == 0x00AF_9B00_0000_FFFF
    assert q[L.KERNEL_DS_SEL // 8] == 0x00CF_9300_0000_FFFF
    assert q[L.KERNEL_CS32_SEL // 8] == 0x00CF_9B00_0000_FFFF
    assert q[L.USER_CS32_SEL // 8] == 0x00CF_FB00_0000_FFFF
    assert q[L.USER_DS_SEL // 8] == 0x00CF_F300_0000_FFFF
    assert q[L.USER_CS64_SEL // 8] == 0x00AF_FB00_0000_FFFF
    # 64-bit TSS: base 0x3000, limit 0x67, type 9 (available), P; upper half base[63:32]
    assert q[L.TSS_SEL // 8] == 0x0000_8900_3000_0067 and q[L.TSS_SEL // 8 + 1] == 0
    gdt32 = L.gdt(0x1234_5678, long_mode=False)
    (tss32,) = struct.unpack_from("<Q", gdt32, L.TSS_SEL)
    assert tss32 == 0x1200_8934_5678_0067
    seg = L.parse_descriptor(gdt[L.USER_CS64_SEL : L.USER_CS64_SEL + 8])
    assert seg == L.FLAT[L.USER_CS64_SEL]
    ks = seg.kvm_segment(L.USER_CS64_SEL | 3)
    assert (ks.limit, ks.dpl, ks.l, ks.db, ks.selector) == (0xFFFF_FFFF, 3, 1, 0, 0x33)
    tr = L.tr_segment(0x3000)
    assert (tr.type, tr.s, tr.limit, tr.base, tr.present) == (L.TSS_BUSY, 0, 0x67, 0x3000, 1)


def test_gates_and_tss() -> None:
    g = L.gate64(0x1234_5678_9ABC_DEF0, ist=1, dpl=3)
    assert len(g) == 16
    assert g.hex() == "f0de0800" + "01ee" + "bc9a" + "78563412" + "00000000"
    assert L.parse_gate64(g) == dict(
        offset=0x1234_5678_9ABC_DEF0, selector=8, ist=1, type=0xE, dpl=3, present=1
    )
    assert L.gate32(0x1234_5678).hex() == "7856" + "1800" + "00" + "8e" + "3412"
    assert L.ivt_entry(0x4000, 0x0).hex() == "00400000"
    t = L.tss64(0x7F000, ist=(0x5F000,))
    assert len(t) == 104
    assert struct.unpack_from("<Q", t, 4)[0] == 0x7F000  # RSP0
    assert struct.unpack_from("<Q", t, 36)[0] == 0x5F000  # IST1
    assert struct.unpack_from("<H", t, 102)[0] == 104  # no I/O bitmap
    t32 = L.tss32(0x7F000)
    assert struct.unpack_from("<II", t32, 4) == (0x7F000, L.KERNEL_DS_SEL)


# -- page tables and modes ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", [m for m in MODES if MODES[m][1]])
def test_page_tables_map_what_they_say(mode: str) -> None:
    g = Guest(mode)
    g.map(0x4000_0000, 0x20_5000)
    big = 4 << 20 if mode == "pg32" else 2 << 20
    g.map(0x8000_0000, 0x40_0000 if mode == "pg32" else 0x20_0000, size=big)
    assert g.translate(0x1234) == 0x1234
    assert g.translate(0x4000_0ABC) == 0x20_5ABC
    assert (
        g.translate(0x8000_0000 + 0x1_2345)
        == (0x40_0000 if mode == "pg32" else 0x20_0000) + 0x1_2345
    )
    assert g.translate(REPORT + 8) == REPORT + 8
    with pytest.raises(LookupError):
        g.translate(0x4000_1000)
    assert g.pt is not None
    leaf = g.pt.leaf(0x8000_0000)
    assert leaf is not None and leaf[0] == 2 and g.pt.read(leaf[1]) & PS


@pytest.mark.parametrize("backend", ["sim", "dev"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_modes_are_accepted_and_walk(backend: str, mode: str) -> None:
    """SET_SREGS takes each mode's state, and KVM's own walker (KVM_TRANSLATE) finds
    the builder's mappings, on the simulator in every mode and on the device in the
    modes it supports."""
    if backend == "dev" and mode not in DEVICE_MODES:
        pytest.skip(f"{mode} does not run on this device (reference section 2)")
    kvm = make_kvm(backend)
    with kvm:
        g = Guest(mode)
        if g.paging:
            g.map(0x4000_0000, 0x20_5000)
        m = g.boot(kvm)
        s = m.vcpu.get_sregs()
        want = g.sregs(m.vcpu.get_sregs())
        assert (s.cr0, s.cr3, s.cr4, s.efer) == (want.cr0, want.cr3, want.cr4, want.efer)
        assert (s.cs.selector, s.cs.l, s.cs.db) == (want.cs.selector, want.cs.l, want.cs.db)
        if g.paging:
            t = m.vcpu.translate(0x4000_0123)
            assert t.valid and t.physical_address == 0x20_5123
            assert not m.vcpu.translate(0x4000_1000).valid
        assert m.vcpu.get_regs().rip == CODE
        m.vcpu.close()
        m.vm.close()


def test_cpl3_state() -> None:
    g = Guest("lm64")
    with kvmmmu.Kvm() as kvm:
        m = g.boot(kvm, cpl=3)
        s = m.vcpu.get_sregs()
        assert (s.cs.selector, s.cs.dpl, s.ss.selector, s.ss.dpl) == (0x33, 3, 0x2B, 3)
        assert m.vcpu.get_regs().rsp == USTACK_TOP
        m.set_cpl(0, rsp=KSTACK_TOP)
        assert m.cpl() == 0 and m.vcpu.get_regs().rsp == KSTACK_TOP
        m.vcpu.close()
        m.vm.close()


def test_report_parsing() -> None:
    values = {REPORT: 14, REPORT + 8: 0xDEAD000, REPORT + 16: 7, REPORT + 24: 0x8010}
    r = parse_report(values, REPORT)
    assert r == ExceptionReport(14, 0xDEAD000, 7, 0x8010)
    assert str(r) == "#PF error_code=0x7 cr2=0xdead000 rip=0x8010"


# -- the stubs, run (device here; the simulator once its KVM_RUN exists) ------------------


def run_to_report(m: Machine) -> tuple[list[exits.Exit], ExceptionReport | None]:
    seen: list[exits.Exit] = []
    values: dict[int, int] = {}
    report = m.guest.report
    for _ in range(50):
        e = m.vcpu.run()
        seen.append(e)
        if isinstance(e, exits.ExitMmio) and report <= e.phys_addr < report + 32:
            values[e.phys_addr] = e.value
        elif isinstance(e, exits.ExitHlt):
            return seen, parse_report(values, report) if values else None
        elif not isinstance(e, exits.ExitIo | exits.ExitMmio):
            break
    return seen, None


FAULTS = {
    # name: (program, cpl, expected (vector, error code, cr2 or None), label of the fault)
    "pf-write-not-present": (lambda a: a.mov(x.qword[x.rbx], 1), 0, (14, 0x2, 0x4000_1000)),
    "pf-read-not-present-cpl3": (lambda a: a.mov(x.rax, x.qword[x.rbx]), 3, (14, 0x4, 0x4000_1000)),
    "pf-write-supervisor-cpl3": (lambda a: a.mov(x.qword[x.rcx], 1), 3, (14, 0x7, 0x4000_2000)),
    "pf-fetch-nx": (lambda a: a.jmp(x.rdx), 0, (14, 0x11, 0x4000_3000)),
    "gp-noncanonical": (lambda a: a.mov(x.rax, x.qword[x.rsi]), 0, (13, 0, None)),
    "ud": (lambda a: a.ud2(), 0, (6, 0, None)),
}


def fault_guest(name: str) -> tuple[Guest, int]:
    prog, cpl, _ = FAULTS[name]
    g = Guest("lm64")
    g.map(0x4000_2000, 0x20_6000, flags=P | W)  # supervisor only
    g.map(0x4000_3000, 0x20_7000, flags=P | W | U | NX)
    a = g.asm
    a.mov(x.rbx, 0x4000_1000)
    a.mov(x.rcx, 0x4000_2000)
    a.mov(x.rdx, 0x4000_3000)
    a.mov(x.rsi, 0x0000_8000_0000_0000)
    a.label("fault")
    prog(a)
    a.hlt()
    return g, cpl


def backend_kvm(backend: str) -> kvmmmu.Kvm:
    return make_kvm(backend)


@pytest.mark.parametrize("backend", ["sim", "dev"])
@pytest.mark.parametrize("name", sorted(FAULTS))
def test_stub_reports_fault(backend: str, name: str) -> None:
    g, cpl = fault_guest(name)
    vector, error_code, cr2 = FAULTS[name][2]
    with backend_kvm(backend) as kvm:
        m = g.boot(kvm, cpl=cpl, entry=CODE)
        seen, rep = run_to_report(m)
        assert rep is not None, [str(e) for e in seen]
        assert (rep.vector, rep.error_code) == (vector, error_code)
        if cr2 is not None:
            assert rep.cr2 == cr2
        if vector == 14 and error_code & 0x10:
            assert rep.rip == cr2  # a fetch fault reports the target
        else:
            assert rep.rip == g.labels["fault"]
        frame = m.stub_frame()
        assert frame["error_code"] == error_code and frame["cs"] & 3 == cpl
        # the host's IRET returns to the guest at the right privilege
        m.host_iret(rip=g.labels["fault"] + 0)
        assert m.cpl() == cpl and m.vcpu.get_regs().rip == g.labels["fault"]
        m.vcpu.close()
        m.vm.close()


@pytest.mark.skipif(DEVICE_PROBLEM is not None, reason=f"no usable KVM device: {DEVICE_PROBLEM}")
@pytest.mark.parametrize("name", sorted(FAULTS))
def test_stub_frames_are_the_same_on_both_backends(name: str) -> None:
    """The exits and the whole frame the stub halts on (saved registers, error code,
    RIP, CS, RFLAGS with RF set for faults, RSP, SS) agree between simulator and
    device."""
    got = {}
    for backend in ("sim", "dev"):
        g, cpl = fault_guest(name)
        with backend_kvm(backend) as kvm:
            m = g.boot(kvm, cpl=cpl, entry=CODE)
            seen, _ = run_to_report(m)
            frame = m.stub_frame()
            got[backend] = ([str(e) for e in seen], frame, m.vcpu.get_regs().rsp)
            m.vcpu.close()
            m.vm.close()
    assert got["sim"] == got["dev"]


@pytest.mark.parametrize("backend", ["sim", "dev"])
def test_page_fault_sets_no_ad_and_success_sets_them(backend: str) -> None:
    g = Guest("lm64")
    g.map(0x4000_0000, 0x20_5000)
    a = g.asm
    a.mov(x.rbx, 0x4000_0000)
    a.mov(x.qword[x.rbx], 5)
    a.hlt()
    with backend_kvm(backend) as kvm:
        m = g.boot(kvm)
        assert isinstance(m.vcpu.run(), exits.ExitHlt)
        assert g.pt is not None
        leaf = g.pt.leaf(0x4000_0000)
        assert leaf is not None
        assert g.pt.read(leaf[1]) & (A | D) == A | D
        assert g.read(0x20_5000, 8) == (5).to_bytes(8, "little")
        m.vcpu.close()
        m.vm.close()


@pytest.mark.parametrize("backend", ["sim", "dev"])
@pytest.mark.parametrize("mode", ["real", "pm32", "pg32", "pae", "lm57"])
def test_stub_reports_ud_in_other_modes(backend: str, mode: str) -> None:
    """The 16- and 32-bit stubs (IVT / 32-bit IDT) report like the 64-bit ones, with
    2- or 4-byte stores at the same offsets."""
    if backend == "dev" and mode not in DEVICE_MODES:
        pytest.skip(f"{mode} does not run on this device")
    g = Guest(mode)
    g.asm.mov(x.al, 0x42)
    g.asm.out(0x80, x.al)
    g.asm.label("fault")
    g.asm.ud2()
    with backend_kvm(backend) as kvm:
        m = g.boot(kvm)
        seen, rep = run_to_report(m)
        assert str(seen[0]) == "IO out port=0x80 size=1 data=42"
        width = {16: 2, 32: 4, 64: 8}[g.bitness]
        writes = [e for e in seen if isinstance(e, exits.ExitMmio)]
        assert [e.len for e in writes] == [width, 4 if width == 2 else width, width, width]
        assert rep == ExceptionReport(6, 0, 0, g.labels["fault"])
        m.host_iret(rip="fault")
        assert m.vcpu.get_regs().rip == g.labels["fault"]
        m.vcpu.close()
        m.vm.close()


@pytest.mark.parametrize("mode", ["pg32", "pae"])
def test_device_refuses_paging_without_long_mode(mode: str) -> None:
    """A device fact the builder documents: SET_SREGS takes CR0.PG without long mode,
    drops PG, and the first KVM_RUN shuts down (reference section 2)."""
    with make_kvm("dev") as kvm:
        m = Guest(mode).boot(kvm)
        assert not m.vcpu.get_sregs().cr0 & 0x8000_0000
        assert isinstance(m.vcpu.run(), exits.ExitShutdown)
        m.vcpu.close()
        m.vm.close()


# -- small programs -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sim", "dev"])
@pytest.mark.parametrize(("mode", "cpl"), [("lm64", 0), ("lm64", 3), ("pm32", 0)])
def test_compute_loop(backend: str, mode: str, cpl: int) -> None:
    g = Guest(mode)
    programs.compute_loop(g, 500, cpl=cpl)
    with backend_kvm(backend) as kvm:
        m = g.boot(kvm, cpl=cpl)
        e = m.vcpu.run()
        if cpl == 3:
            assert isinstance(e, exits.ExitMmio) and e.phys_addr == programs.DONE_GPA
        else:
            assert isinstance(e, exits.ExitHlt)
        assert m.vcpu.get_regs().rax == programs.compute_loop_result(500, g.bitness)
        m.vcpu.close()
        m.vm.close()


@pytest.mark.parametrize("backend", ["sim", "dev"])
@pytest.mark.parametrize("cpl", [0, 3])
def test_touch_pages_and_exit_loop(backend: str, cpl: int) -> None:
    g = Guest("lm64")
    g.add_slot(1, 0x100_0000, 64 * 4096, kvmmmu.KVM_MEM_LOG_DIRTY_PAGES)
    programs.touch_pages(g, 0x4000_0000, 0x100_0000 + 8 * 4096, 16, value=0x77, cpl=cpl)
    g2 = Guest("lm64")
    programs.exit_loop(g2, 5, cpl=cpl)
    with backend_kvm(backend) as kvm:
        m = g.boot(kvm, cpl=cpl)
        e = m.vcpu.run()
        assert isinstance(e, exits.ExitMmio if cpl else exits.ExitHlt), str(e)
        assert list(kvmmmu.dirty.pages(m.vm.get_dirty_log(1))) == list(range(8, 24))
        assert g.read(0x100_0000 + 23 * 4096, 8) == (0x77).to_bytes(8, "little")
        if cpl == 3:  # natively, through the shadow MMU: one fixed fault per page
            assert m.vcpu.stats()["pf_fixed"] >= 16
        m.vcpu.close()
        m.vm.close()
        m2 = g2.boot(kvm, cpl=cpl)
        values = []
        while isinstance(e := m2.vcpu.run(), exits.ExitMmio) and e.phys_addr == programs.EXIT_GPA:
            values.append(e.value)
        assert values == [5, 4, 3, 2, 1]
        assert isinstance(e, exits.ExitMmio if cpl else exits.ExitHlt), str(e)
        m2.vcpu.close()
        m2.vm.close()


@pytest.mark.parametrize("backend", ["sim", "dev"])
@pytest.mark.parametrize("cpl", [0, 3])
def test_ist_stack(backend: str, cpl: int) -> None:
    """A gate with IST1 switches to TSS.IST1 at any CPL (and without IST a CPL0
    fault stays on the current stack, a CPL3 one goes to TSS.RSP0)."""
    for ist in (True, False):
        g = Guest("lm64", ist_vectors=frozenset({6}) if ist else frozenset())
        g.asm.ud2()
        with backend_kvm(backend) as kvm:
            m = g.boot(kvm, cpl=cpl)
            _, rep = run_to_report(m)
            assert rep is not None and rep.vector == 6
            frame = m.stub_frame()
            top = IST1_TOP if ist else (KSTACK_TOP if cpl == 3 else frame["rsp"])
            # the CPU pushed 5 qwords, the stub 3 (error-code slot, rax, rdx)
            assert m.vcpu.get_regs().rsp == (top & ~0xF) - 8 * 8
            assert frame["rsp"] == (USTACK_TOP if cpl == 3 else KSTACK_TOP)
            m.vcpu.close()
            m.vm.close()
