"""The exits of KVM_RUN as owned, immutable records.

:meth:`kvmmmu.Vcpu.run` makes the ioctl and decodes ``kvm_run`` into one of
these frozen dataclasses with :func:`decode`, the same code for the simulator
and the device. A record copies what it needs out of ``kvm_run`` (the OUT
bytes, the MMIO data) and holds no reference to the vCPU or its mmap, so a
handler can keep it, compare it, or call any vCPU method while holding it.

Reads complete on the next KVM_RUN, as in KVM: answer an :class:`ExitMmio`
read with ``vcpu.complete_mmio_read(data)`` and an :class:`ExitIo` IN with
``vcpu.complete_io_in(data)`` before calling ``run()`` again.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass, field

from . import uapi

__all__ = [
    "Exit",
    "ExitDebug",
    "ExitDirtyRingFull",
    "ExitFailEntry",
    "ExitHlt",
    "ExitInternalError",
    "ExitIntr",
    "ExitIo",
    "ExitMmio",
    "ExitOther",
    "ExitShutdown",
    "ExitSystemEvent",
    "ExitUnknown",
    "decode",
]

# The exit union starts at offset 32 and is 256 bytes long.
_UNION = uapi.kvm_run._exit.offset
_UNION_SIZE = ctypes.sizeof(uapi.kvm_run_exit)


def _name(reason: int) -> str:
    return uapi.EXIT_REASONS.get(reason, f"exit {reason}")


@dataclass(frozen=True, slots=True)
class Exit:
    """Any exit: ``reason`` is ``kvm_run.exit_reason`` (a ``KVM_EXIT_*`` number)."""

    reason: int

    @property
    def name(self) -> str:
        """The exit reason's name without the ``KVM_EXIT_`` prefix ("IO", "MMIO", ...)."""
        return _name(self.reason).removeprefix("KVM_EXIT_")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class ExitIo(Exit):
    """KVM_EXIT_IO: an IN or OUT (``count`` > 1 for ``rep ins``/``outs``). ``data`` is
    the ``size * count`` bytes written by an OUT, ``b""`` for an IN (answer it with
    ``vcpu.complete_io_in``)."""

    reason: int = field(default=uapi.KVM_EXIT_IO, init=False)
    port: int
    size: int
    count: int
    is_write: bool
    data: bytes = b""

    @property
    def value(self) -> int:
        """The first OUT element as a little-endian integer (0 for an IN)."""
        return int.from_bytes(self.data[: self.size], "little")

    def __str__(self) -> str:
        rep = f" x{self.count}" if self.count != 1 else ""
        if self.is_write:
            return f"IO out port={self.port:#x} size={self.size}{rep} data={self.data.hex()}"
        return f"IO in port={self.port:#x} size={self.size}{rep}"


@dataclass(frozen=True, slots=True)
class ExitMmio(Exit):
    """KVM_EXIT_MMIO: a guest access to a gpa with no slot, or a write to a read-only
    slot. ``data`` holds the ``len`` bytes written, or zeros for a read (answer it
    with ``vcpu.complete_mmio_read``)."""

    reason: int = field(default=uapi.KVM_EXIT_MMIO, init=False)
    phys_addr: int
    data: bytes
    is_write: bool

    @property
    def len(self) -> int:
        return len(self.data)

    @property
    def value(self) -> int:
        """The written bytes as a little-endian integer (0 for a read)."""
        return int.from_bytes(self.data, "little")

    def __str__(self) -> str:
        if self.is_write:
            return f"MMIO write gpa={self.phys_addr:#x} len={self.len} data={self.data.hex()}"
        return f"MMIO read gpa={self.phys_addr:#x} len={self.len}"


@dataclass(frozen=True, slots=True)
class ExitHlt(Exit):
    """KVM_EXIT_HLT: the guest executed HLT (without an in-kernel irqchip)."""

    reason: int = field(default=uapi.KVM_EXIT_HLT, init=False)


@dataclass(frozen=True, slots=True)
class ExitShutdown(Exit):
    """KVM_EXIT_SHUTDOWN: a triple fault (or an unusable state at entry)."""

    reason: int = field(default=uapi.KVM_EXIT_SHUTDOWN, init=False)


@dataclass(frozen=True, slots=True)
class ExitInternalError(Exit):
    """KVM_EXIT_INTERNAL_ERROR. ``data`` is ``internal.data[:ndata]``. For suberror
    KVM_INTERNAL_ERROR_EMULATION, ``data[0]`` holds the flags and, with
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, ``data[1:3]`` the
    instruction bytes, decoded into ``insn_bytes`` (``insn_size`` of them)."""

    reason: int = field(default=uapi.KVM_EXIT_INTERNAL_ERROR, init=False)
    suberror: int
    data: tuple[int, ...] = ()
    insn_bytes: bytes = b""

    @property
    def flags(self) -> int:
        """The emulation-failure flags (0 for other suberrors)."""
        if self.suberror != uapi.KVM_INTERNAL_ERROR_EMULATION or not self.data:
            return 0
        return self.data[0]

    @property
    def info(self) -> tuple[int, ...]:
        """``data`` after the flags and instruction bytes (emulation failure), else all
        of it: the vendor's exit info and any extra words."""
        if self.suberror != uapi.KVM_INTERNAL_ERROR_EMULATION or not self.data:
            return self.data
        skip = 3 if self.flags & uapi.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES else 1
        return self.data[skip:]

    def __str__(self) -> str:
        sub = {
            uapi.KVM_INTERNAL_ERROR_EMULATION: "EMULATION",
            uapi.KVM_INTERNAL_ERROR_SIMUL_EX: "SIMUL_EX",
            uapi.KVM_INTERNAL_ERROR_DELIVERY_EV: "DELIVERY_EV",
            uapi.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "UNEXPECTED_EXIT_REASON",
        }.get(self.suberror, str(self.suberror))
        out = f"INTERNAL_ERROR {sub}"
        if self.insn_bytes:
            out += f" insn={self.insn_bytes.hex(' ')}"
        if self.info:
            out += " data=[" + ", ".join(f"{d:#x}" for d in self.info) + "]"
        return out


@dataclass(frozen=True, slots=True)
class ExitFailEntry(Exit):
    """KVM_EXIT_FAIL_ENTRY: the hardware refused to enter the guest."""

    reason: int = field(default=uapi.KVM_EXIT_FAIL_ENTRY, init=False)
    hardware_entry_failure_reason: int
    cpu: int = 0

    def __str__(self) -> str:
        return f"FAIL_ENTRY reason={self.hardware_entry_failure_reason:#x} cpu={self.cpu}"


@dataclass(frozen=True, slots=True)
class ExitDebug(Exit):
    """KVM_EXIT_DEBUG (KVM_SET_GUEST_DEBUG): #DB (1) or #BP (3) at ``pc``."""

    reason: int = field(default=uapi.KVM_EXIT_DEBUG, init=False)
    exception: int
    pc: int
    dr6: int = 0
    dr7: int = 0

    def __str__(self) -> str:
        return (
            f"DEBUG exception={self.exception} pc={self.pc:#x} dr6={self.dr6:#x} dr7={self.dr7:#x}"
        )


@dataclass(frozen=True, slots=True)
class ExitDirtyRingFull(Exit):
    """KVM_EXIT_DIRTY_RING_FULL: harvest and reset the dirty rings, then run again."""

    reason: int = field(default=uapi.KVM_EXIT_DIRTY_RING_FULL, init=False)


@dataclass(frozen=True, slots=True)
class ExitIntr(Exit):
    """KVM_RUN failed with EINTR: ``immediate_exit`` was set (``vcpu.kick()``) or a
    signal arrived. ``run()`` returns this record instead of raising; KVM leaves
    ``immediate_exit`` set, and so does ``run()``: clear it to run again."""

    reason: int = field(default=uapi.KVM_EXIT_INTR, init=False)

    def __str__(self) -> str:
        return "INTR (EINTR)"


@dataclass(frozen=True, slots=True)
class ExitSystemEvent(Exit):
    """KVM_EXIT_SYSTEM_EVENT: ``type`` is a KVM_SYSTEM_EVENT_* (SHUTDOWN, RESET, ...)."""

    reason: int = field(default=uapi.KVM_EXIT_SYSTEM_EVENT, init=False)
    type: int
    data: tuple[int, ...] = ()

    def __str__(self) -> str:
        names = {
            uapi.KVM_SYSTEM_EVENT_SHUTDOWN: "SHUTDOWN",
            uapi.KVM_SYSTEM_EVENT_RESET: "RESET",
            uapi.KVM_SYSTEM_EVENT_CRASH: "CRASH",
            uapi.KVM_SYSTEM_EVENT_WAKEUP: "WAKEUP",
            uapi.KVM_SYSTEM_EVENT_SUSPEND: "SUSPEND",
            uapi.KVM_SYSTEM_EVENT_SEV_TERM: "SEV_TERM",
        }
        out = f"SYSTEM_EVENT {names.get(self.type, str(self.type))}"
        if self.data:
            out += " data=[" + ", ".join(f"{d:#x}" for d in self.data) + "]"
        return out


@dataclass(frozen=True, slots=True)
class ExitUnknown(Exit):
    """KVM_EXIT_UNKNOWN: ``hardware_exit_reason`` is the vendor's exit code."""

    hardware_exit_reason: int = 0

    def __str__(self) -> str:
        return f"UNKNOWN hardware_exit_reason={self.hardware_exit_reason:#x}"


@dataclass(frozen=True, slots=True)
class ExitOther(Exit):
    """Any other exit: ``raw`` is a copy of the 256-byte exit union."""

    raw: bytes = b""

    def __str__(self) -> str:
        return f"{self.name} raw={self.raw.rstrip(bytes(1)).hex()}"


# The fields decoded, as offsets into kvm_run (checked against uapi in the tests).
_EXIT_REASON = struct.Struct("<I")  # at 8
_IO = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
_MMIO = struct.Struct("<Q8sIB")  # phys_addr, data, len, is_write
_FAIL_ENTRY = struct.Struct("<QI")
_DEBUG = struct.Struct("<IxxxxQQQ")  # exception, pc, dr6, dr7
_INTERNAL = struct.Struct("<II16Q")  # suberror, ndata, data[16]
_SYSTEM_EVENT = struct.Struct("<II16Q")  # type, ndata, data[16] (data[0] = flags)
_U64 = struct.Struct("<Q")
_INSN_BYTES = 1 + 15  # insn_size, insn_bytes[15], at data[1]


# The hot records are built through their slots: a frozen dataclass's __init__ costs
# a generic object.__setattr__ per field, about half of run()'s own time.
_new = object.__new__
_set_reason = Exit.reason.__set__  # type: ignore[attr-defined]
_IO_SETTERS = tuple(
    getattr(ExitIo, name).__set__ for name in ("port", "size", "count", "is_write", "data")
)
_MMIO_SETTERS = tuple(getattr(ExitMmio, name).__set__ for name in ("phys_addr", "data", "is_write"))


def _make_io(port: int, size: int, count: int, is_write: bool, data: bytes) -> ExitIo:
    e: ExitIo = _new(ExitIo)
    _set_reason(e, uapi.KVM_EXIT_IO)
    set_port, set_size, set_count, set_is_write, set_data = _IO_SETTERS
    set_port(e, port)
    set_size(e, size)
    set_count(e, count)
    set_is_write(e, is_write)
    set_data(e, data)
    return e


def _io(buf: memoryview | bytes) -> ExitIo:
    direction, size, port, count, start = _IO.unpack_from(buf, _UNION)
    if direction != uapi.KVM_EXIT_IO_OUT:
        return _make_io(port, size, count, False, b"")
    n = size * count
    if start + n > len(buf):
        raise ValueError(f"kvm_run.io data at {start:#x}+{n} is outside the vCPU mmap")
    return _make_io(port, size, count, True, bytes(buf[start : start + n]))


def _mmio(buf: memoryview | bytes) -> ExitMmio:
    phys_addr, data, length, is_write = _MMIO.unpack_from(buf, _UNION)
    n = min(length, 8)
    e: ExitMmio = _new(ExitMmio)
    _set_reason(e, uapi.KVM_EXIT_MMIO)
    set_phys_addr, set_data, set_is_write = _MMIO_SETTERS
    set_phys_addr(e, phys_addr)
    set_data(e, data[:n] if is_write else bytes(n))
    set_is_write(e, bool(is_write))
    return e


# Records without fields are shared.
_HLT = ExitHlt()
_SHUTDOWN = ExitShutdown()
_DIRTY_RING_FULL = ExitDirtyRingFull()
_INTR = ExitIntr()


def _internal(buf: memoryview | bytes) -> ExitInternalError:
    suberror, ndata, *words = _INTERNAL.unpack_from(buf, _UNION)
    data = tuple(words[: min(ndata, len(words))])
    insn = b""
    if (
        suberror == uapi.KVM_INTERNAL_ERROR_EMULATION
        and len(data) >= 3
        and data[0] & uapi.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
    ):
        raw = bytes(buf[_UNION + 16 : _UNION + 16 + _INSN_BYTES])
        insn = raw[1 : 1 + min(raw[0], 15)]
    return ExitInternalError(suberror=suberror, data=data, insn_bytes=insn)


def _system_event(buf: memoryview | bytes) -> ExitSystemEvent:
    type_, ndata, *words = _SYSTEM_EVENT.unpack_from(buf, _UNION)
    return ExitSystemEvent(type=type_, data=tuple(words[: min(ndata, len(words))]))


def _run_bytes(run: uapi.kvm_run) -> bytes:
    return ctypes.string_at(ctypes.addressof(run), ctypes.sizeof(run))


def decode(run: uapi.kvm_run | memoryview | bytes) -> Exit:
    """The record for the exit described by ``kvm_run`` (after a successful KVM_RUN):
    ``run`` is the vCPU's mmap (a buffer starting with kvm_run; KVM_EXIT_IO keeps the
    OUT data further in, at ``io.data_offset``) or a :class:`uapi.kvm_run`."""
    buf = run if isinstance(run, (memoryview, bytes)) else _run_bytes(run)
    (reason,) = _EXIT_REASON.unpack_from(buf, 8)
    if reason == uapi.KVM_EXIT_IO:
        return _io(buf)
    if reason == uapi.KVM_EXIT_MMIO:
        return _mmio(buf)
    if reason == uapi.KVM_EXIT_HLT:
        return _HLT
    if reason == uapi.KVM_EXIT_SHUTDOWN:
        return _SHUTDOWN
    if reason == uapi.KVM_EXIT_INTERNAL_ERROR:
        return _internal(buf)
    if reason == uapi.KVM_EXIT_FAIL_ENTRY:
        failure, cpu = _FAIL_ENTRY.unpack_from(buf, _UNION)
        return ExitFailEntry(hardware_entry_failure_reason=failure, cpu=cpu)
    if reason == uapi.KVM_EXIT_DEBUG:
        exception, pc, dr6, dr7 = _DEBUG.unpack_from(buf, _UNION)
        return ExitDebug(exception=exception, pc=pc, dr6=dr6, dr7=dr7)
    if reason == uapi.KVM_EXIT_DIRTY_RING_FULL:
        return _DIRTY_RING_FULL
    if reason == uapi.KVM_EXIT_INTR:
        return _INTR
    if reason == uapi.KVM_EXIT_SYSTEM_EVENT:
        return _system_event(buf)
    if reason == uapi.KVM_EXIT_UNKNOWN:
        return ExitUnknown(reason, _U64.unpack_from(buf, _UNION)[0])
    return ExitOther(reason, bytes(buf[_UNION : _UNION + _UNION_SIZE]))
