"""An x86 assembler for guest programs, over the iced-x86 Python package.

``Asm(bitness, base)`` collects instructions written as method calls named after
the mnemonic, with operands built from the register constants of this module,
sized memory references and labels::

    from kvmmmu.guest.asm import Asm, rax, rbx, cr3, qword

    a = Asm(64, 0x1000)
    a.mov(rax, 5)
    a.label("loop")
    a.add(qword[rbx + rax * 8 + 0x10], 1)
    a.dec(rax)
    a.jnz("loop")
    a.mov(rax, "table")          # a label as an immediate: its address
    a.mov(rbx, qword["table"])   # a label in brackets: [rip + ...] in 64-bit code
    a.hlt()
    a.label("table")
    a.dq(1, 2, "loop")
    code = a.assemble()          # bytes, position-dependent at 0x1000
    a.labels["table"]            # its address

The mnemonic and operands select an iced ``Code`` from iced's own opcode tables
(``OpCodeInfo``): every legacy encoding of that mnemonic available in the mode whose
operand kinds accept the operands, the shortest encoding winning. Iced's ``Encoder``
produces the bytes; branches to labels start short and grow to near until every
target is in range. String instructions take a ``rep_``/``repe_``/``repne_`` prefix in
their name (``a.rep_stosq()``); Python keywords take a trailing underscore
(``a.in_(al, dx)``, ``a.and_(...)``). Nothing here is hand-encoded.

Details: a label used as an immediate selects the widest immediate form (its
address is not known until layout); ``[label]`` is RIP-relative in 64-bit code and an
absolute disp32/disp16 otherwise; a memory operand's size may be left out
(``mem[...]``) only where the other operands or the instruction decide it; where a
16-bit register has both an o16 and a prefix-free 32-bit form (``ltr``, ``mov sreg``)
the 32-bit register gives the shorter one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any

from iced_x86 import (
    Code,
    Encoder,
    EncodingKind,
    Instruction,
    MemoryOperand,
    MemorySizeInfo,
    Mnemonic,
    OpCodeInfo,
    OpCodeOperandKind,
    Register,
    RegisterInfo,
)

# -- operands -------------------------------------------------------------------------


@dataclass(frozen=True)
class Reg:
    """A register (``rax``, ``cr3``, ``cs``, ...) of this module."""

    value: int  # iced Register
    name: str

    @property
    def size(self) -> int:
        return int(RegisterInfo(self.value).size)

    def __add__(self, other: object) -> Addr:
        return Addr.of(self) + other

    __radd__ = __add__

    def __sub__(self, other: int) -> Addr:
        return Addr.of(self) + (-other)

    def __mul__(self, scale: int) -> Addr:
        return Addr(index=self, scale=scale)

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Addr:
    """An address expression inside brackets: base + index*scale + disp, or a label."""

    base: Reg | None = None
    index: Reg | None = None
    scale: int = 1
    disp: int = 0
    label: str | None = None

    @staticmethod
    def of(x: object) -> Addr:
        if isinstance(x, Addr):
            return x
        if isinstance(x, Reg):
            return Addr(base=x)
        if isinstance(x, int):
            return Addr(disp=x)
        if isinstance(x, str):
            return Addr(label=x)
        raise TypeError(f"not an address: {x!r}")

    def __add__(self, other: object) -> Addr:
        if isinstance(other, int):
            return Addr(self.base, self.index, self.scale, self.disp + other, self.label)
        o = Addr.of(other)
        if o.label and self.label:
            raise ValueError("two labels in one address")
        regs = [r for r in (self.base, o.base) if r is not None]
        index = self.index or o.index
        if self.index and o.index:
            raise ValueError("two index registers in one address")
        scale = self.scale if self.index else o.scale
        if len(regs) == 2:
            if index is not None:
                raise ValueError("too many registers in one address")
            regs, index, scale = regs[:1], regs[1], 1
        return Addr(
            regs[0] if regs else None, index, scale, self.disp + o.disp, self.label or o.label
        )

    __radd__ = __add__

    def __sub__(self, other: int) -> Addr:
        return self + (-other)


@dataclass(frozen=True)
class Mem:
    """A memory operand: ``qword[rbx + 8]``; ``size`` 0 when the instruction implies it."""

    addr: Addr
    size: int = 0
    seg: Reg | None = None


class _Sized:
    def __init__(self, size: int) -> None:
        self.size = size

    def __getitem__(self, addr: object) -> Mem:
        return Mem(Addr.of(addr), self.size)


byte, word, dword, qword, fword, tbyte = (_Sized(n) for n in (1, 2, 4, 8, 6, 10))
#: Memory whose size the instruction decides (lea, invlpg, lgdt, ...).
mem = _Sized(0)

Operand = Reg | Mem | int | str


def _reg(name: str) -> Reg:
    return Reg(int(getattr(Register, name.upper())), name)


# fmt: off
rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp = map(_reg, "rax rbx rcx rdx rsi rdi rsp rbp".split())
r8, r9, r10, r11, r12, r13, r14, r15 = map(_reg, "r8 r9 r10 r11 r12 r13 r14 r15".split())
eax, ebx, ecx, edx, esi, edi, esp, ebp = map(_reg, "eax ebx ecx edx esi edi esp ebp".split())
r8d, r9d, r10d, r11d = map(_reg, "r8d r9d r10d r11d".split())
r12d, r13d, r14d, r15d = map(_reg, "r12d r13d r14d r15d".split())
ax, bx, cx, dx, si, di, sp, bp = map(_reg, "ax bx cx dx si di sp bp".split())
al, bl, cl, dl, ah, bh, ch, dh = map(_reg, "al bl cl dl ah bh ch dh".split())
cr0, cr2, cr3, cr4, cr8 = map(_reg, "cr0 cr2 cr3 cr4 cr8".split())
dr0, dr1, dr2, dr3, dr6, dr7 = map(_reg, "dr0 dr1 dr2 dr3 dr6 dr7".split())
es, cs, ss, ds, fs, gs = map(_reg, "es cs ss ds fs gs".split())
rip, eip = _reg("rip"), _reg("eip")
# fmt: on

# -- iced's opcode tables ---------------------------------------------------------------

_K = OpCodeOperandKind
_GPR = {
    1: (_K.R8_REG, _K.R8_OR_MEM, _K.R8_OPCODE),
    2: (_K.R16_REG, _K.R16_OR_MEM, _K.R16_OPCODE, _K.R16_RM),
    4: (_K.R32_REG, _K.R32_OR_MEM, _K.R32_OPCODE, _K.R32_RM),
    8: (_K.R64_REG, _K.R64_OR_MEM, _K.R64_OPCODE, _K.R64_RM),
}
_MEM_KINDS = {_K.R8_OR_MEM, _K.R16_OR_MEM, _K.R32_OR_MEM, _K.R64_OR_MEM, _K.MEM}
_FIXED = {_K.AL: "al", _K.AX: "ax", _K.EAX: "eax", _K.RAX: "rax", _K.CL: "cl", _K.DX: "dx"}
_FIXED.update({_K.CS: "cs", _K.DS: "ds", _K.ES: "es", _K.SS: "ss", _K.FS: "fs", _K.GS: "gs"})
#: immediate kind -> (lowest, highest) value accepted
_IMM = {
    _K.IMM8: (-0x80, 0xFF),
    _K.IMM8SEX16: (-0x80, 0x7F),
    _K.IMM8SEX32: (-0x80, 0x7F),
    _K.IMM8SEX64: (-0x80, 0x7F),
    _K.IMM16: (-0x8000, 0xFFFF),
    _K.IMM32: (-0x8000_0000, 0xFFFF_FFFF),
    _K.IMM32SEX64: (-0x8000_0000, 0x7FFF_FFFF),
    _K.IMM64: (-(1 << 63), (1 << 64) - 1),
    _K.IMM8_CONST_1: (1, 1),
}
#: the immediate kinds wide enough for a label's address, by bitness
_LABEL_IMM = {16: {_K.IMM16}, 32: {_K.IMM32}, 64: {_K.IMM64}}
_BRANCH = {
    16: (_K.BR16_1, _K.BR16_2),
    32: (_K.BR32_1, _K.BR32_4),
    64: (_K.BR64_1, _K.BR64_4),
}
_ALIASES = {
    "jz": "je", "jnz": "jne", "jc": "jb", "jnc": "jae", "jnae": "jb", "jnb": "jae",
    "jna": "jbe", "jnbe": "ja", "jnge": "jl", "jnl": "jge", "jng": "jle", "jnle": "jg",
    "jpe": "jp", "jpo": "jnp", "sal": "shl", "retn": "ret",
}  # fmt: skip
_STRING = {
    f"{op}{s}" for op in ("movs", "stos", "lods", "cmps", "scas", "ins", "outs") for s in "bwdq"
} - {"insq", "outsq"}


@cache
def _codes_by_mnemonic() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for name, code in vars(Code).items():
        if not isinstance(code, int) or name.startswith("_") or name == "INVALID":
            continue
        info = OpCodeInfo(code)
        if info.encoding != EncodingKind.LEGACY or not info.is_instruction:
            continue
        out.setdefault(int(info.mnemonic), []).append(code)
    for codes in out.values():
        codes.sort()
    return out


@cache
def _mnemonic(name: str) -> int:
    value = getattr(Mnemonic, name.upper(), None)
    if not isinstance(value, int):
        raise AttributeError(f"no x86 mnemonic {name!r}")
    return value


# -- items ------------------------------------------------------------------------------


@dataclass
class _Insn:
    name: str
    ops: tuple[Operand, ...]
    candidates: list[int]  # iced Codes, preferred first
    rep: str = ""
    choice: int = 0
    size: int = 0


@dataclass
class _Data:
    unit: int  # 1, 2, 4 or 8
    values: list[int | str]
    size: int = 0


@dataclass
class _Align:
    to: int
    fill: int
    size: int = 0


class AsmError(ValueError):
    pass


class Asm:
    """Instructions and data for ``bitness`` (16, 32 or 64) code placed at ``base``.

    Any x86 mnemonic is a method (``a.mov(rax, 1)``, ``a.invlpg(mem[rbx])``); see the
    module docstring. :meth:`assemble` returns the bytes, after which :attr:`labels`
    holds every label's address.
    """

    def __init__(self, bitness: int, base: int = 0) -> None:
        if bitness not in (16, 32, 64):
            raise ValueError(f"bitness must be 16, 32 or 64, not {bitness}")
        self.bitness, self.base = bitness, base
        self.items: list[_Insn | _Data | _Align] = []
        self._at: dict[str, int] = {}  # label -> item index
        self.labels: dict[str, int] = {}
        self._enc = Encoder(bitness)

    # -- writing -------------------------------------------------------------------------

    def label(self, name: str) -> str:
        """Name the address of whatever is emitted next."""
        if name in self._at:
            raise AsmError(f"label {name!r} defined twice")
        self._at[name] = len(self.items)
        return name

    def db(self, *values: int | bytes | str) -> None:
        """Bytes (ints, bytes objects, or str encoded as ASCII)."""
        out: list[int | str] = []
        for v in values:
            out.extend(v.encode() if isinstance(v, str) else (v if isinstance(v, bytes) else [v]))
        self.items.append(_Data(1, out))

    def dw(self, *values: int | str) -> None:
        self.items.append(_Data(2, list(values)))

    def dd(self, *values: int | str) -> None:
        self.items.append(_Data(4, list(values)))

    def dq(self, *values: int | str) -> None:
        """Quadwords; a str is a label's address."""
        self.items.append(_Data(8, list(values)))

    def space(self, n: int, fill: int = 0) -> None:
        self.items.append(_Data(1, [fill] * n))

    def align(self, to: int, fill: int = 0) -> None:
        if to <= 0 or to & (to - 1):
            raise ValueError("alignment must be a power of two")
        self.items.append(_Align(to, fill))

    def insn(self, name: str, *ops: Operand) -> None:
        """Emit instruction ``name`` (the method-call form calls this)."""
        name = name.lower().rstrip("_")  # a.in_(), a.and_(), a.or_()
        rep = ""
        for p in ("repne_", "repe_", "rep_"):
            if name.startswith(p) and name[len(p) :] in _STRING:
                rep, name = p[:-1], name[len(p) :]
        if name in _STRING:
            if ops:
                raise AsmError(f"{name} takes no operands (use rsi/rdi/rcx)")
            self.items.append(_Insn(name, (), [], rep))
            return
        if rep:
            raise AsmError(f"{rep} is only for string instructions")
        self.items.append(_Insn(name, ops, self._select(name, ops)))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)

        def emit(*ops: Operand) -> None:
            self.insn(name, *ops)

        return emit

    # -- operand matching ------------------------------------------------------------------

    def _select(self, name: str, ops: tuple[Operand, ...]) -> list[int]:
        mnemonic = _mnemonic(_ALIASES.get(name, name))
        found = []
        for code in _codes_by_mnemonic().get(mnemonic, []):
            info = OpCodeInfo(code)
            if not info.is_available_in_mode(self.bitness) or info.op_count != len(ops):
                continue
            if all(self._accepts(k, op, info) for k, op in zip(info.op_kinds(), ops, strict=True)):
                found.append(code)
        if not found:
            raise AsmError(f"no {self.bitness}-bit encoding of {name} {ops}")
        mem_sizes = {
            _mem_size(OpCodeInfo(c)) for c in found if any(isinstance(o, Mem) for o in ops)
        }
        if any(isinstance(o, Mem) and o.size == 0 for o in ops) and len(mem_sizes) > 1:
            raise AsmError(f"{name} {ops}: operand size is ambiguous (use byte/word/...[])")
        if any(isinstance(o, str) for o in ops):
            return self._by_branch_size(found)
        sized = []
        for code in found:
            try:
                sized.append((len(self._encode_at(code, ops, self.base, None)), code))
            except ValueError:
                continue
        if not sized:
            raise AsmError(f"{name} {ops} cannot be encoded in {self.bitness}-bit code")
        return [code for _, code in sorted(sized)]

    def _by_branch_size(self, codes: list[int]) -> list[int]:
        short = _BRANCH[self.bitness][0]
        return sorted(codes, key=lambda c: 0 if short in OpCodeInfo(c).op_kinds() else 1)

    def _accepts(self, kind: int, op: Operand, info: OpCodeInfo) -> bool:
        if isinstance(op, Reg):
            if kind in _FIXED:
                return op.name == _FIXED[kind]
            if kind == _K.SEG_REG:
                return op.name in ("es", "cs", "ss", "ds", "fs", "gs")
            if kind == _K.CR_REG:
                return op.name.startswith("cr")
            if kind == _K.DR_REG:
                return op.name.startswith("dr")
            return (
                kind in _GPR.get(op.size, ())
                and op.name[:2] not in ("cr", "dr")
                and (op.name not in ("es", "cs", "ss", "ds", "fs", "gs", "rip", "eip"))
            )
        if isinstance(op, Mem):
            if kind not in _MEM_KINDS:
                return False
            return op.size == 0 or _mem_size(info) in (op.size, 0)
        if isinstance(op, str):  # a label: branch target or address immediate
            if kind in _BRANCH[self.bitness]:
                return True
            return kind in _LABEL_IMM[self.bitness]
        if isinstance(op, int):
            if kind in _BRANCH[self.bitness]:
                return True
            lo, hi = _IMM.get(kind, (1, 0))
            return lo <= op <= hi
        return False

    # -- encoding ---------------------------------------------------------------------------

    def _encode_at(
        self, code: int, ops: tuple[Operand, ...], ip: int, labels: dict[str, int] | None
    ) -> bytes:
        instr = self._instruction(code, ops, labels, ip)
        self._enc.encode(instr, ip)
        return bytes(self._enc.take_buffer())

    def _value(self, v: int | str, labels: dict[str, int] | None) -> int:
        if isinstance(v, str):
            if labels is None:
                return self.base  # the first pass: forward references are fine
            if v not in labels:
                raise AsmError(f"undefined label {v!r}")
            return labels[v]
        return v

    def _memop(self, m: Mem, labels: dict[str, int] | None) -> MemoryOperand:
        a = m.addr
        base = a.base.value if a.base else Register.NONE
        index = a.index.value if a.index else Register.NONE
        disp = a.disp + (self._value(a.label, labels) if a.label else 0)
        seg = m.seg.value if m.seg else Register.NONE
        if a.label and a.base is None and a.index is None and self.bitness == 64:
            base = Register.RIP  # the displacement is the target; iced makes it relative
            return MemoryOperand.ctor_u64(base, displ=disp & (2**64 - 1), displ_size=8, seg=seg)
        size = 0 if disp == 0 and a.base is not None else 1
        if a.label or a.base is None:
            size = {16: 2, 32: 4, 64: 4}[self.bitness]
        if disp < 0:
            return MemoryOperand(base, index, a.scale, disp, size, seg=seg)
        return MemoryOperand.ctor_u64(base, index, a.scale, disp, size, seg=seg)

    def _instruction(
        self, code: int, ops: tuple[Operand, ...], labels: dict[str, int] | None, ip: int
    ) -> Instruction:
        info = OpCodeInfo(code)
        kinds = info.op_kinds()
        if any(k in _BRANCH[self.bitness] for k in kinds):
            target = ops[0]
            value = self._value(target, labels) if isinstance(target, str) else target
            if isinstance(target, str) and labels is None:
                value = ip  # first pass: pretend every label is in reach
            return Instruction.create_branch(code, value)
        shape = "".join(
            "r" if isinstance(o, Reg) else "m" if isinstance(o, Mem) else "i" for o in ops
        )
        args: list[Any] = []
        for o in ops:
            if isinstance(o, Reg):
                args.append(o.value)
            elif isinstance(o, Mem):
                args.append(self._memop(o, labels))
            else:
                args.append(self._value(o, labels))
        imm = [a for a, o in zip(args, ops, strict=True) if not isinstance(o, Reg | Mem)]
        if any(k == _K.IMM64 for k in kinds):
            suffix = "i64" if imm[0] < 0 else "u64"
        else:
            suffix = "i32" if imm and imm[0] < 0x8000_0000 else "u32"
        names = {
            "": "create",
            "r": "create_reg",
            "m": "create_mem",
            "i": f"create_{suffix}",
            "rr": "create_reg_reg",
            "rm": "create_reg_mem",
            "mr": "create_mem_reg",
            "ri": f"create_reg_{suffix}",
            "mi": f"create_mem_{suffix}",
            "ir": f"create_{suffix}_reg",
            "rri": f"create_reg_reg_{suffix}",
            "rmi": f"create_reg_mem_{suffix}",
            "mri": f"create_mem_reg_{suffix}",
        }
        fn = getattr(Instruction, names[shape])
        return fn(code, *args) if args else fn(code)

    def _string(self, item: _Insn) -> Instruction:
        fn = getattr(Instruction, f"create_{item.rep + '_' if item.rep else ''}{item.name}")
        return fn(self.bitness)

    def assemble(self) -> bytes:
        """Lay the items out at ``base`` (growing short branches until every target is in
        range) and return the bytes; fills :attr:`labels`."""
        for ref in self._refs():
            if ref not in self._at:
                raise AsmError(f"undefined label {ref!r}")
        labels: dict[str, int] | None = None  # None: the first pass, no address known yet
        for _ in range(64):
            addrs, changed, out = self._pass(labels)
            new = {name: addrs[i] for name, i in self._at.items()}
            if labels is not None and new == labels and not changed:
                self.labels = new
                return b"".join(out)
            labels = new
        raise AsmError("layout did not converge")

    def _refs(self) -> Iterable[str]:
        for item in self.items:
            if isinstance(item, _Data):
                yield from (v for v in item.values if isinstance(v, str))
            elif isinstance(item, _Insn):
                for o in item.ops:
                    if isinstance(o, str):
                        yield o
                    elif isinstance(o, Mem) and o.addr.label:
                        yield o.addr.label

    def _pass(self, labels: dict[str, int] | None) -> tuple[list[int], bool, list[bytes]]:
        ip = self.base
        addrs: list[int] = []
        out: list[bytes] = []
        changed = False
        for item in self.items:
            addrs.append(ip)
            if isinstance(item, _Align):
                b = bytes([item.fill]) * (-ip % item.to)
            elif isinstance(item, _Data):
                mask = (1 << 8 * item.unit) - 1
                b = b"".join(
                    (self._value(v, labels) & mask).to_bytes(item.unit, "little")
                    for v in item.values
                )
            elif not item.candidates:
                self._enc.encode(self._string(item), ip)
                b = bytes(self._enc.take_buffer())
            else:
                b = self._encode_item(item, ip, labels)
            changed |= item.size != len(b)
            item.size = len(b)
            out.append(b)
            ip += len(b)
        addrs.append(ip)
        return addrs, changed, out

    def _encode_item(self, item: _Insn, ip: int, labels: dict[str, int] | None) -> bytes:
        while True:
            code = item.candidates[item.choice]
            try:
                return self._encode_at(code, item.ops, ip, labels)
            except ValueError as e:
                if item.choice + 1 >= len(item.candidates):
                    raise AsmError(f"{item.name} {item.ops} at {ip:#x}: {e}") from e
                item.choice += 1  # a short branch out of range: take the near form


def _mem_size(info: OpCodeInfo) -> int:
    return int(MemorySizeInfo(info.memory_size).size)


def assemble(bitness: int, base: int, lines: Iterable[tuple[str, tuple[Operand, ...]]]) -> bytes:
    """Assemble ``(mnemonic, operands)`` pairs (a convenience for tables of code)."""
    a = Asm(bitness, base)
    for name, ops in lines:
        a.insn(name, *ops)
    return a.assemble()
