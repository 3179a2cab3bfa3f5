"""The Linux KVM userspace API for x86-64, in ctypes.

This module mirrors ``include/uapi/linux/kvm.h`` together with the x86 parts it
includes (``arch/x86/include/uapi/asm/kvm.h`` and ``asm/kvm_para.h``), as seen
by a 64-bit x86 process:

* the ``_IOC`` family from ``asm-generic/ioctl.h`` and decoders for request numbers;
* ``ctypes.Structure`` classes named like the C structs, with the same fields,
  types, order and natural (kernel) alignment, so ``bytes(struct)`` is exactly
  what the kernel reads and writes;
* the request numbers (``KVM_GET_REGS`` ...) computed from those classes, so a
  struct size lives in one place, plus ``IOCTLS`` and ``IOCTL_STRUCTS``;
* the constants: ``KVM_CAP_*`` (with ``CAPS``), ``KVM_EXIT_*`` (with
  ``EXIT_REASONS``), memory-slot flags, vCPU event flags, MP states, dirty-log
  and dirty-ring flags, binary-stats encodings, KVM CPUID leaves and PV features.

Both backends use these definitions: the device transport hands the bytes to
``fcntl.ioctl`` on ``/dev/kvm``, and the simulator (``kvmmmu._core``, built on the
Rust kvm-bindings types in ``rust/core/src/uapi.rs``) parses the same bytes.
``tests/test_uapi.py`` checks that the Rust side reports the same struct sizes
and request numbers as this module, and checks both against the numbers
observed on a real kernel.

Only the standard library is used. Nested structs convert to nested dicts and
arrays to lists (``to_dict`` / ``from_dict``); two structs compare equal when
their bytes are equal.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Self, TypeAlias, cast

# ---------------------------------------------------------------------------
# asm-generic/ioctl.h
# ---------------------------------------------------------------------------

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_DIRBITS = 2

_IOC_NRMASK = (1 << _IOC_NRBITS) - 1
_IOC_TYPEMASK = (1 << _IOC_TYPEBITS) - 1
_IOC_SIZEMASK = (1 << _IOC_SIZEBITS) - 1
_IOC_DIRMASK = (1 << _IOC_DIRBITS) - 1

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2

#: What the ``size`` argument of ``_IOR``/``_IOW``/``_IOWR`` may be: a ctypes
#: type (its ``ctypes.sizeof`` is encoded, like C's ``sizeof(type)``) or a byte count.
SizeArg: TypeAlias = int | type[Any]


def _IOC(dir: int, type: int, nr: int, size: int) -> int:
    """Encode a request number: dir in bits 30-31, size 16-29, type 8-15, nr 0-7."""
    for what, value, mask in (
        ("dir", dir, _IOC_DIRMASK),
        ("type", type, _IOC_TYPEMASK),
        ("nr", nr, _IOC_NRMASK),
        ("size", size, _IOC_SIZEMASK),
    ):
        if not 0 <= value <= mask:
            raise ValueError(f"_IOC {what}={value:#x} does not fit in its field")
    return (
        (dir << _IOC_DIRSHIFT)
        | (type << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _sizeof(size: SizeArg) -> int:
    return size if isinstance(size, int) else ctypes.sizeof(size)


def _IO(type: int, nr: int) -> int:
    """A request with no argument struct (``_IOC_NONE``, size 0)."""
    return _IOC(_IOC_NONE, type, nr, 0)


def _IOR(type: int, nr: int, size: SizeArg) -> int:
    """A request whose struct the kernel writes (userspace reads)."""
    return _IOC(_IOC_READ, type, nr, _sizeof(size))


def _IOW(type: int, nr: int, size: SizeArg) -> int:
    """A request whose struct the kernel reads (userspace writes)."""
    return _IOC(_IOC_WRITE, type, nr, _sizeof(size))


def _IOWR(type: int, nr: int, size: SizeArg) -> int:
    """A request whose struct goes both ways."""
    return _IOC(_IOC_READ | _IOC_WRITE, type, nr, _sizeof(size))


def ioc_dir(request: int) -> int:
    """The direction bits of a request (``_IOC_NONE``/``_IOC_WRITE``/``_IOC_READ``, or'ed)."""
    return (request >> _IOC_DIRSHIFT) & _IOC_DIRMASK


def ioc_type(request: int) -> int:
    """The type (magic) byte of a request; ``KVMIO`` for KVM."""
    return (request >> _IOC_TYPESHIFT) & _IOC_TYPEMASK


def ioc_nr(request: int) -> int:
    """The command number of a request."""
    return (request >> _IOC_NRSHIFT) & _IOC_NRMASK


def ioc_size(request: int) -> int:
    """The argument size encoded in a request (0 for ``_IO`` requests)."""
    return (request >> _IOC_SIZESHIFT) & _IOC_SIZEMASK


# ---------------------------------------------------------------------------
# struct helpers: dict conversion, byte equality, readable repr
# ---------------------------------------------------------------------------

_u8 = ctypes.c_uint8
_u16 = ctypes.c_uint16
_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64
_s16 = ctypes.c_int16

_HIDDEN_IF_ZERO = ("pad", "reserved")


def _fields_of(cls: type) -> Iterator[tuple[str, Any]]:
    """(name, ctype) of every field, base classes first (ctypes appends subclass fields)."""
    for klass in reversed(cls.__mro__):
        yield from ((f[0], f[1]) for f in vars(klass).get("_fields_", ()))


def _anonymous_of(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        names.update(vars(klass).get("_anonymous_", ()))
    return names


def _to_py(value: Any) -> Any:
    if isinstance(value, _Convert):
        return value.to_dict()
    if isinstance(value, ctypes.Array):
        return [_to_py(v) for v in value]
    return value


def _fill_array(array: Any, values: Sequence[Any] | bytes | bytearray) -> None:
    if len(values) > len(array):
        raise ValueError(f"{len(values)} values for an array of {len(array)}")
    elem = array._type_
    for i, v in enumerate(values):
        if isinstance(elem, type) and issubclass(elem, _Convert) and not isinstance(v, elem):
            array[i].update(v)
        elif isinstance(elem, type) and issubclass(elem, ctypes.Array):
            _fill_array(array[i], v)
        else:
            array[i] = v


def _is_zero(value: Any) -> bool:
    if isinstance(value, dict):
        return all(_is_zero(v) for v in value.values())
    if isinstance(value, list):
        return all(_is_zero(v) for v in value)
    return bool(value == 0)


def _matches(current: Any, given: Any) -> bool:
    """Whether a field read back (``current``, from ``_to_py``) holds what was given."""
    if isinstance(given, _Convert):
        given = given.to_dict()
    elif isinstance(given, ctypes.Array):
        given = _to_py(given)
    if isinstance(given, Mapping):
        return isinstance(current, dict) and all(
            k in current and _matches(current[k], v) for k, v in given.items()
        )
    if isinstance(given, Sequence | bytes | bytearray) and not isinstance(given, str):
        return (
            isinstance(current, list)
            and len(given) <= len(current)
            and all(_matches(c, g) for c, g in zip(current, given, strict=False))
        )
    return bool(current == given)


def _fmt_items(fields: Mapping[str, Any]) -> str:
    """``k=v, ...`` for repr, leaving out pad/reserved fields that are all zero."""
    return ", ".join(
        f"{k}={_fmt(v)}"
        for k, v in fields.items()
        if not (k.startswith(_HIDDEN_IF_ZERO) and _is_zero(v))
    )


def _fmt(value: Any) -> str:
    """Compact text for repr: ints >= 10 in hex, nested structs in braces."""
    if isinstance(value, Mapping):
        return "{" + _fmt_items(value) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, int) and not isinstance(value, bool):
        return hex(value) if value >= 10 else str(value)
    return repr(value)


class _Convert:
    """Methods shared by the Structure and Union classes of this module.

    ``to_dict()`` gives nested dicts (arrays become lists; members of anonymous
    unions/structs appear at the level of their parent, as in C);
    ``from_dict()``/``update()`` accept the same shape, possibly partial (missing
    fields stay zero / unchanged). ``==`` compares the raw bytes.
    """

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict (nested structs as dicts, arrays as lists)."""
        out: dict[str, Any] = {}
        anonymous = _anonymous_of(type(self))
        for name, _ctype in _fields_of(type(self)):
            value = _to_py(getattr(self, name))
            if name in anonymous:
                out.update(value)
            else:
                out[name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """A new zeroed instance with the fields given in ``data`` set."""
        obj = cls()
        obj.update(data)
        return obj

    def update(self, data: Mapping[str, Any]) -> None:
        """Set the fields named in ``data`` (nested dicts and lists are applied in place).

        Raises KeyError for an unknown field, and ValueError when a field does not
        hold the given value afterwards: the value is out of range for its C type,
        or another member of the same union given later overwrote it (give one
        member per union, or values that agree, as ``to_dict()`` does).
        """
        for key, value in data.items():
            if not self._set(key, value):
                raise KeyError(f"{type(self).__name__} has no field {key!r}")
        for key, value in data.items():
            if not _matches(_to_py(getattr(self, key)), value):
                raise ValueError(
                    f"{type(self).__name__}.{key} does not hold the given value (out of "
                    "range for its type, or overwritten by another member of its union)"
                )

    def _set(self, key: str, value: Any) -> bool:
        fields = dict(_fields_of(type(self)))
        if key in fields:
            ctype = fields[key]
            if issubclass(ctype, _Convert) and not isinstance(value, ctype):
                getattr(self, key).update(value)
            elif issubclass(ctype, ctypes.Array):
                _fill_array(getattr(self, key), value)
            else:
                setattr(self, key, value)
            return True
        return any(getattr(self, anon)._set(key, value) for anon in _anonymous_of(type(self)))

    def to_bytes(self) -> bytes:
        """The raw bytes, as the kernel sees them."""
        return bytes(memoryview(self))  # type: ignore[arg-type]

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Self:
        """A copy of the struct stored in ``data`` (which must be at least sizeof long)."""
        size = ctypes.sizeof(cls)  # type: ignore[arg-type]
        if len(data) < size:
            raise ValueError(f"{cls.__name__} needs {size} bytes, got {len(data)}")
        obj: Self = cls.from_buffer_copy(bytes(data[:size]))  # type: ignore[attr-defined]
        return obj

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, _Convert)
        return self.to_bytes() == other.to_bytes()

    # mutable, like the C struct: not hashable
    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({_fmt_items(self.to_dict())})"


class _Struct(_Convert, ctypes.Structure):
    """Base of the structs below (no fields of its own)."""


class _Union(_Convert, ctypes.Union):
    """Base of the unions below (no fields of its own)."""


# ---------------------------------------------------------------------------
# memory slots
# ---------------------------------------------------------------------------


class kvm_userspace_memory_region(_Struct):
    """For KVM_SET_USER_MEMORY_REGION (32 bytes)."""

    _fields_ = (
        ("slot", _u32),
        ("flags", _u32),
        ("guest_phys_addr", _u64),
        ("memory_size", _u64),  # bytes
        ("userspace_addr", _u64),  # start of the userspace allocated memory
    )


class kvm_userspace_memory_region2(_Struct):
    """For KVM_SET_USER_MEMORY_REGION2 (160 bytes)."""

    _fields_ = (
        ("slot", _u32),
        ("flags", _u32),
        ("guest_phys_addr", _u64),
        ("memory_size", _u64),
        ("userspace_addr", _u64),
        ("guest_memfd_offset", _u64),
        ("guest_memfd", _u32),
        ("pad1", _u32),
        ("pad2", _u64 * 14),
    )


# ---------------------------------------------------------------------------
# registers (asm/kvm.h)
# ---------------------------------------------------------------------------


class kvm_regs(_Struct):
    """For KVM_GET_REGS / KVM_SET_REGS (144 bytes)."""

    _fields_ = (
        ("rax", _u64),
        ("rbx", _u64),
        ("rcx", _u64),
        ("rdx", _u64),
        ("rsi", _u64),
        ("rdi", _u64),
        ("rsp", _u64),
        ("rbp", _u64),
        ("r8", _u64),
        ("r9", _u64),
        ("r10", _u64),
        ("r11", _u64),
        ("r12", _u64),
        ("r13", _u64),
        ("r14", _u64),
        ("r15", _u64),
        ("rip", _u64),
        ("rflags", _u64),
    )


class kvm_segment(_Struct):
    """A segment register, unpacked (24 bytes)."""

    _fields_ = (
        ("base", _u64),
        ("limit", _u32),
        ("selector", _u16),
        ("type", _u8),
        ("present", _u8),
        ("dpl", _u8),
        ("db", _u8),
        ("s", _u8),
        ("l", _u8),
        ("g", _u8),
        ("avl", _u8),
        ("unusable", _u8),
        ("padding", _u8),
    )


class kvm_dtable(_Struct):
    """GDTR / IDTR (16 bytes)."""

    _fields_ = (
        ("base", _u64),
        ("limit", _u16),
        ("padding", _u16 * 3),
    )


KVM_NR_INTERRUPTS = 256

_SREGS_COMMON = (
    ("cs", kvm_segment),
    ("ds", kvm_segment),
    ("es", kvm_segment),
    ("fs", kvm_segment),
    ("gs", kvm_segment),
    ("ss", kvm_segment),
    ("tr", kvm_segment),
    ("ldt", kvm_segment),
    ("gdt", kvm_dtable),
    ("idt", kvm_dtable),
    ("cr0", _u64),
    ("cr2", _u64),
    ("cr3", _u64),
    ("cr4", _u64),
    ("cr8", _u64),
    ("efer", _u64),
    ("apic_base", _u64),
)


class kvm_sregs(_Struct):
    """For KVM_GET_SREGS / KVM_SET_SREGS (312 bytes; cr0 at 224, efer at 264)."""

    _fields_ = (
        *_SREGS_COMMON,
        ("interrupt_bitmap", _u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    )


class kvm_sregs2(_Struct):
    """For KVM_GET_SREGS2 / KVM_SET_SREGS2 (320 bytes; pdptrs at 288)."""

    _fields_ = (
        *_SREGS_COMMON,
        ("flags", _u64),
        ("pdptrs", _u64 * 4),
    )


class kvm_msr_entry(_Struct):
    """One MSR for KVM_GET_MSRS / KVM_SET_MSRS (16 bytes)."""

    _fields_ = (
        ("index", _u32),
        ("reserved", _u32),
        ("data", _u64),
    )


class kvm_msrs(_Struct):
    """Header of ``struct kvm_msrs`` (8 bytes); ``entries[nmsrs]`` follow.

    Build a complete buffer with :func:`make_msrs`.
    """

    _fields_ = (
        ("nmsrs", _u32),  # number of msrs in entries
        ("pad", _u32),
    )


class kvm_msr_list(_Struct):
    """Header of ``struct kvm_msr_list`` (4 bytes); ``indices[nmsrs]`` (u32) follow.

    For KVM_GET_MSR_INDEX_LIST; build a complete buffer with :func:`make_msr_list`.
    """

    _fields_ = (("nmsrs", _u32),)


class kvm_cpuid_entry2(_Struct):
    """One CPUID leaf/subleaf for KVM_{GET_SUPPORTED,SET,GET}_CPUID2 (40 bytes)."""

    _fields_ = (
        ("function", _u32),
        ("index", _u32),
        ("flags", _u32),
        ("eax", _u32),
        ("ebx", _u32),
        ("ecx", _u32),
        ("edx", _u32),
        ("padding", _u32 * 3),
    )


class kvm_cpuid2(_Struct):
    """Header of ``struct kvm_cpuid2`` (8 bytes); ``entries[nent]`` follow.

    Build a complete buffer with :func:`make_cpuid2`.
    """

    _fields_ = (
        ("nent", _u32),
        ("padding", _u32),
    )


class kvm_debug_exit_arch(_Struct):
    """``kvm_run.debug.arch`` on x86 (32 bytes)."""

    _fields_ = (
        ("exception", _u32),
        ("pad", _u32),
        ("pc", _u64),
        ("dr6", _u64),
        ("dr7", _u64),
    )


class kvm_guest_debug_arch(_Struct):
    """The x86 part of ``struct kvm_guest_debug`` (64 bytes)."""

    _fields_ = (("debugreg", _u64 * 8),)


class kvm_guest_debug(_Struct):
    """For KVM_SET_GUEST_DEBUG (72 bytes)."""

    _fields_ = (
        ("control", _u32),
        ("pad", _u32),
        ("arch", kvm_guest_debug_arch),
    )


class kvm_vcpu_events_exception(_Struct):
    """``kvm_vcpu_events.exception``."""

    _fields_ = (
        ("injected", _u8),
        ("nr", _u8),
        ("has_error_code", _u8),
        ("pending", _u8),
        ("error_code", _u32),
    )


class kvm_vcpu_events_interrupt(_Struct):
    """``kvm_vcpu_events.interrupt``."""

    _fields_ = (
        ("injected", _u8),
        ("nr", _u8),
        ("soft", _u8),
        ("shadow", _u8),
    )


class kvm_vcpu_events_nmi(_Struct):
    """``kvm_vcpu_events.nmi``."""

    _fields_ = (
        ("injected", _u8),
        ("pending", _u8),
        ("masked", _u8),
        ("pad", _u8),
    )


class kvm_vcpu_events_smi(_Struct):
    """``kvm_vcpu_events.smi``."""

    _fields_ = (
        ("smm", _u8),
        ("pending", _u8),
        ("smm_inside_nmi", _u8),
        ("latched_init", _u8),
    )


class kvm_vcpu_events_triple_fault(_Struct):
    """``kvm_vcpu_events.triple_fault``."""

    _fields_ = (("pending", _u8),)


class kvm_vcpu_events(_Struct):
    """For KVM_GET_VCPU_EVENTS / KVM_SET_VCPU_EVENTS (64 bytes; flags at 20, payload at 56)."""

    _fields_ = (
        ("exception", kvm_vcpu_events_exception),
        ("interrupt", kvm_vcpu_events_interrupt),
        ("nmi", kvm_vcpu_events_nmi),
        ("sipi_vector", _u32),
        ("flags", _u32),
        ("smi", kvm_vcpu_events_smi),
        ("triple_fault", kvm_vcpu_events_triple_fault),
        ("reserved", _u8 * 26),
        ("exception_has_payload", _u8),
        ("exception_payload", _u64),
    )


class kvm_debugregs(_Struct):
    """For KVM_GET_DEBUGREGS / KVM_SET_DEBUGREGS (128 bytes)."""

    _fields_ = (
        ("db", _u64 * 4),
        ("dr6", _u64),
        ("dr7", _u64),
        ("flags", _u64),
        ("reserved", _u64 * 9),
    )


class kvm_sync_regs(_Struct):
    """``kvm_run.s.regs`` on x86 (KVM_CAP_SYNC_REGS; 520 bytes)."""

    _fields_ = (
        ("regs", kvm_regs),
        ("sregs", kvm_sregs),
        ("events", kvm_vcpu_events),
    )


# ---------------------------------------------------------------------------
# VM / vCPU argument structs (linux/kvm.h)
# ---------------------------------------------------------------------------


class kvm_translation(_Struct):
    """For KVM_TRANSLATE (24 bytes)."""

    _fields_ = (
        ("linear_address", _u64),  # in
        ("physical_address", _u64),  # out
        ("valid", _u8),
        ("writeable", _u8),
        ("usermode", _u8),
        ("pad", _u8 * 5),
    )


class kvm_mp_state(_Struct):
    """For KVM_GET_MP_STATE / KVM_SET_MP_STATE (4 bytes)."""

    _fields_ = (("mp_state", _u32),)


class kvm_enable_cap(_Struct):
    """For KVM_ENABLE_CAP (104 bytes)."""

    _fields_ = (
        ("cap", _u32),
        ("flags", _u32),
        ("args", _u64 * 4),
        ("pad", _u8 * 64),
    )


class kvm_dirty_log(_Struct):
    """For KVM_GET_DIRTY_LOG (16 bytes).

    ``dirty_bitmap`` is the C union ``{ void __user *dirty_bitmap; __u64 padding2; }``:
    the user address of a bitmap with one bit per page of the slot.
    """

    _fields_ = (
        ("slot", _u32),
        ("padding1", _u32),
        ("dirty_bitmap", _u64),
    )


class kvm_clear_dirty_log(_Struct):
    """For KVM_CLEAR_DIRTY_LOG (24 bytes); ``dirty_bitmap`` is a user address."""

    _fields_ = (
        ("slot", _u32),
        ("num_pages", _u32),
        ("first_page", _u64),
        ("dirty_bitmap", _u64),
    )


class kvm_dirty_gfn(_Struct):
    """One dirty-ring entry (16 bytes); the ring is mmapped at KVM_DIRTY_LOG_PAGE_OFFSET."""

    _fields_ = (
        ("flags", _u32),
        ("slot", _u32),  # as_id << 16 | slot_id
        ("offset", _u64),  # gfn offset within the slot
    )


class kvm_stats_header(_Struct):
    """At offset 0 of the file from KVM_GET_STATS_FD (24 bytes)."""

    _fields_ = (
        ("flags", _u32),
        ("name_size", _u32),
        ("num_desc", _u32),
        ("id_offset", _u32),
        ("desc_offset", _u32),
        ("data_offset", _u32),
    )


class kvm_stats_desc(_Struct):
    """Header of one stats descriptor (16 bytes); ``char name[name_size]`` follows.

    Use :func:`stats_desc_type` for the full descriptor of a given ``name_size``.
    """

    _fields_ = (
        ("flags", _u32),
        ("exponent", _s16),
        ("size", _u16),
        ("offset", _u32),
        ("bucket_size", _u32),
    )


# ---------------------------------------------------------------------------
# struct kvm_run (mmap of the vCPU fd, offset 0)
# ---------------------------------------------------------------------------


class kvm_run_hw(_Struct):
    """``kvm_run.hw`` (KVM_EXIT_UNKNOWN)."""

    _fields_ = (("hardware_exit_reason", _u64),)


class kvm_run_fail_entry(_Struct):
    """``kvm_run.fail_entry`` (KVM_EXIT_FAIL_ENTRY)."""

    _fields_ = (
        ("hardware_entry_failure_reason", _u64),
        ("cpu", _u32),
    )


class kvm_run_ex(_Struct):
    """``kvm_run.ex`` (KVM_EXIT_EXCEPTION)."""

    _fields_ = (
        ("exception", _u32),
        ("error_code", _u32),
    )


class kvm_run_io(_Struct):
    """``kvm_run.io`` (KVM_EXIT_IO); the data is at ``data_offset`` from the start of kvm_run."""

    _fields_ = (
        ("direction", _u8),  # KVM_EXIT_IO_IN / KVM_EXIT_IO_OUT
        ("size", _u8),  # bytes
        ("port", _u16),
        ("count", _u32),
        ("data_offset", _u64),  # relative to kvm_run start
    )


class kvm_run_debug(_Struct):
    """``kvm_run.debug`` (KVM_EXIT_DEBUG)."""

    _fields_ = (("arch", kvm_debug_exit_arch),)


class kvm_run_mmio(_Struct):
    """``kvm_run.mmio`` (KVM_EXIT_MMIO)."""

    _fields_ = (
        ("phys_addr", _u64),
        ("data", _u8 * 8),
        ("len", _u32),
        ("is_write", _u8),
    )


class _kvm_run_hypercall_u(_Union):
    _fields_ = (
        ("longmode", _u32),
        ("flags", _u64),
    )


class kvm_run_hypercall(_Struct):
    """``kvm_run.hypercall`` (KVM_EXIT_HYPERCALL)."""

    _anonymous_ = ("_u",)
    _fields_ = (
        ("nr", _u64),
        ("args", _u64 * 6),
        ("ret", _u64),
        ("_u", _kvm_run_hypercall_u),
    )


class kvm_run_tpr_access(_Struct):
    """``kvm_run.tpr_access`` (KVM_EXIT_TPR_ACCESS)."""

    _fields_ = (
        ("rip", _u64),
        ("is_write", _u32),
        ("pad", _u32),
    )


class kvm_run_internal(_Struct):
    """``kvm_run.internal`` (KVM_EXIT_INTERNAL_ERROR)."""

    _fields_ = (
        ("suberror", _u32),
        ("ndata", _u32),  # available with KVM_CAP_INTERNAL_ERROR_DATA
        ("data", _u64 * 16),
    )


class kvm_run_emulation_failure(_Struct):
    """``kvm_run.emulation_failure`` (KVM_EXIT_INTERNAL_ERROR, suberror EMULATION).

    ``insn_size``/``insn_bytes`` are valid with
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES in ``flags``.
    """

    _fields_ = (
        ("suberror", _u32),
        ("ndata", _u32),
        ("flags", _u64),
        ("insn_size", _u8),
        ("insn_bytes", _u8 * 15),
    )


class _kvm_run_system_event_u(_Union):
    _fields_ = (
        ("flags", _u64),
        ("data", _u64 * 16),
    )


class kvm_run_system_event(_Struct):
    """``kvm_run.system_event`` (KVM_EXIT_SYSTEM_EVENT)."""

    _anonymous_ = ("_u",)
    _fields_ = (
        ("type", _u32),
        ("ndata", _u32),
        ("_u", _kvm_run_system_event_u),
    )


class kvm_run_eoi(_Struct):
    """``kvm_run.eoi`` (KVM_EXIT_IOAPIC_EOI)."""

    _fields_ = (("vector", _u8),)


class kvm_run_msr(_Struct):
    """``kvm_run.msr`` (KVM_EXIT_X86_RDMSR / KVM_EXIT_X86_WRMSR)."""

    _fields_ = (
        ("error", _u8),  # user -> kernel
        ("pad", _u8 * 7),
        ("reason", _u32),  # kernel -> user
        ("index", _u32),  # kernel -> user
        ("data", _u64),  # kernel <-> user
    )


class kvm_run_notify(_Struct):
    """``kvm_run.notify`` (KVM_EXIT_NOTIFY)."""

    _fields_ = (("flags", _u32),)


class kvm_run_memory_fault(_Struct):
    """``kvm_run.memory_fault`` (KVM_EXIT_MEMORY_FAULT)."""

    _fields_ = (
        ("flags", _u64),
        ("gpa", _u64),
        ("size", _u64),
    )


class kvm_run_exit(_Union):
    """The anonymous 256-byte exit union of ``struct kvm_run`` (at offset 32)."""

    _fields_ = (
        ("hw", kvm_run_hw),
        ("fail_entry", kvm_run_fail_entry),
        ("ex", kvm_run_ex),
        ("io", kvm_run_io),
        ("debug", kvm_run_debug),
        ("mmio", kvm_run_mmio),
        ("hypercall", kvm_run_hypercall),
        ("tpr_access", kvm_run_tpr_access),
        ("internal", kvm_run_internal),
        ("emulation_failure", kvm_run_emulation_failure),
        ("system_event", kvm_run_system_event),
        ("eoi", kvm_run_eoi),
        ("msr", kvm_run_msr),
        ("notify", kvm_run_notify),
        ("memory_fault", kvm_run_memory_fault),
        ("padding", _u8 * 256),  # fixes the size of the union
    )


class kvm_run_s(_Union):
    """``kvm_run.s``: the shared registers (KVM_CAP_SYNC_REGS), 2048 bytes."""

    _fields_ = (
        ("regs", kvm_sync_regs),
        ("padding", _u8 * 2048),
    )


class kvm_run(_Struct):
    """The first page of the vCPU mmap area (2352 bytes on x86-64).

    The exit union is anonymous, as in C: ``run.io``, ``run.mmio`` ... are
    attributes of the run struct itself. ``exit_info()`` returns the member that
    goes with ``exit_reason``.
    """

    _anonymous_ = ("_exit",)
    _fields_ = (
        # in
        ("request_interrupt_window", _u8),
        ("immediate_exit", _u8),
        ("padding1", _u8 * 6),
        # out
        ("exit_reason", _u32),
        ("ready_for_interrupt_injection", _u8),
        ("if_flag", _u8),
        ("flags", _u16),
        # in (pre_kvm_run), out (post_kvm_run)
        ("cr8", _u64),
        ("apic_base", _u64),
        ("_exit", kvm_run_exit),
        ("kvm_valid_regs", _u64),
        ("kvm_dirty_regs", _u64),
        ("s", kvm_run_s),
    )

    def exit_info(self) -> _Struct | None:
        """The union member for this exit reason (``run.io`` for KVM_EXIT_IO ...), or None."""
        member = KVM_RUN_EXIT_MEMBER.get(self.exit_reason)
        if member is None:
            return None
        info: _Struct = getattr(self, member)
        return info

    def __repr__(self) -> str:
        reason = EXIT_REASONS.get(self.exit_reason, str(self.exit_reason))
        parts = [f"exit_reason={reason}"]
        for name in ("request_interrupt_window", "immediate_exit", "if_flag", "flags", "cr8"):
            value = getattr(self, name)
            if value:
                parts.append(f"{name}={_fmt(value)}")
        member = KVM_RUN_EXIT_MEMBER.get(self.exit_reason)
        info = self.exit_info()
        if member is not None and info is not None:
            parts.append(f"{member}={_fmt(info.to_dict())}")
        return f"kvm_run({', '.join(parts)})"


# ---------------------------------------------------------------------------
# flexible-array structs: header + entries[n]
# ---------------------------------------------------------------------------

_FLEX_CACHE: dict[tuple[type, str, Any, int], type[_Struct]] = {}


def _flex_type(header: type[_Struct], name: str, elem: Any, n: int) -> type[_Struct]:
    """A subclass of ``header`` with ``name: elem * n`` appended (cached per n)."""
    if n < 0:
        raise ValueError(f"negative entry count {n}")
    key = (header, name, elem, n)
    cls = _FLEX_CACHE.get(key)
    if cls is None:
        # type() hands the creation to the ctypes metaclass of header
        namespace = {"_fields_": ((name, elem * n),), "__module__": __name__}
        cls = cast("type[_Struct]", type(f"{header.__name__}_{n}", (header,), namespace))
        _FLEX_CACHE[key] = cls
    return cls


def cpuid2_type(n: int) -> type[_Struct]:
    """``struct kvm_cpuid2`` with room for ``n`` entries (a subclass of kvm_cpuid2)."""
    return _flex_type(kvm_cpuid2, "entries", kvm_cpuid_entry2, n)


def make_cpuid2(entries: Sequence[kvm_cpuid_entry2] | int) -> kvm_cpuid2:
    """A kvm_cpuid2 buffer: ``nent`` set, followed by the given entries (or n zeroed ones)."""
    n = entries if isinstance(entries, int) else len(entries)
    obj = cpuid2_type(n)()
    obj.nent = n
    if not isinstance(entries, int):
        for i, entry in enumerate(entries):
            obj.entries[i] = entry
    assert isinstance(obj, kvm_cpuid2)
    return obj


def msrs_type(n: int) -> type[_Struct]:
    """``struct kvm_msrs`` with room for ``n`` entries (a subclass of kvm_msrs)."""
    return _flex_type(kvm_msrs, "entries", kvm_msr_entry, n)


def make_msrs(entries: Sequence[kvm_msr_entry | int] | int) -> kvm_msrs:
    """A kvm_msrs buffer with ``nmsrs`` set.

    ``entries`` is a count (zeroed entries), or a sequence of kvm_msr_entry or of
    MSR indices (as for KVM_GET_MSRS).
    """
    n = entries if isinstance(entries, int) else len(entries)
    obj = msrs_type(n)()
    obj.nmsrs = n
    if not isinstance(entries, int):
        for i, entry in enumerate(entries):
            if isinstance(entry, int):
                obj.entries[i].index = entry
            else:
                obj.entries[i] = entry
    assert isinstance(obj, kvm_msrs)
    return obj


def msr_list_type(n: int) -> type[_Struct]:
    """``struct kvm_msr_list`` with room for ``n`` indices (a subclass of kvm_msr_list)."""
    return _flex_type(kvm_msr_list, "indices", _u32, n)


def make_msr_list(n: int) -> kvm_msr_list:
    """A kvm_msr_list buffer for KVM_GET_MSR_INDEX_LIST with room for ``n`` indices."""
    obj = msr_list_type(n)()
    obj.nmsrs = n
    assert isinstance(obj, kvm_msr_list)
    return obj


def stats_desc_type(name_size: int) -> type[_Struct]:
    """``struct kvm_stats_desc`` followed by ``char name[name_size]`` (from the stats header)."""
    return _flex_type(kvm_stats_desc, "name", _u8, name_size)


# ---------------------------------------------------------------------------
# request numbers
# ---------------------------------------------------------------------------

KVMIO = 0xAE

#: Request number by kernel name.
IOCTLS: dict[str, int] = {}
#: The ctypes type whose size is encoded in each request (None for ``_IO`` requests).
IOCTL_STRUCTS: dict[str, type[Any] | None] = {}


def _io(name: str, nr: int) -> int:
    IOCTLS[name] = number = _IO(KVMIO, nr)
    IOCTL_STRUCTS[name] = None
    return number


def _ior(name: str, nr: int, struct: type[Any]) -> int:
    IOCTLS[name] = number = _IOR(KVMIO, nr, struct)
    IOCTL_STRUCTS[name] = struct
    return number


def _iow(name: str, nr: int, struct: type[Any]) -> int:
    IOCTLS[name] = number = _IOW(KVMIO, nr, struct)
    IOCTL_STRUCTS[name] = struct
    return number


def _iowr(name: str, nr: int, struct: type[Any]) -> int:
    IOCTLS[name] = number = _IOWR(KVMIO, nr, struct)
    IOCTL_STRUCTS[name] = struct
    return number


# ioctls for /dev/kvm fds
KVM_GET_API_VERSION = _io("KVM_GET_API_VERSION", 0x00)
KVM_CREATE_VM = _io("KVM_CREATE_VM", 0x01)  # returns a VM fd
KVM_GET_MSR_INDEX_LIST = _iowr("KVM_GET_MSR_INDEX_LIST", 0x02, kvm_msr_list)
KVM_CHECK_EXTENSION = _io("KVM_CHECK_EXTENSION", 0x03)
KVM_GET_VCPU_MMAP_SIZE = _io("KVM_GET_VCPU_MMAP_SIZE", 0x04)  # in bytes
KVM_GET_SUPPORTED_CPUID = _iowr("KVM_GET_SUPPORTED_CPUID", 0x05, kvm_cpuid2)

# ioctls for VM fds
KVM_CREATE_VCPU = _io("KVM_CREATE_VCPU", 0x41)
KVM_GET_DIRTY_LOG = _iow("KVM_GET_DIRTY_LOG", 0x42, kvm_dirty_log)
KVM_SET_NR_MMU_PAGES = _io("KVM_SET_NR_MMU_PAGES", 0x44)
KVM_GET_NR_MMU_PAGES = _io("KVM_GET_NR_MMU_PAGES", 0x45)  # deprecated
KVM_SET_USER_MEMORY_REGION = _iow("KVM_SET_USER_MEMORY_REGION", 0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _io("KVM_SET_TSS_ADDR", 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow("KVM_SET_IDENTITY_MAP_ADDR", 0x48, _u64)
KVM_SET_USER_MEMORY_REGION2 = _iow(
    "KVM_SET_USER_MEMORY_REGION2", 0x49, kvm_userspace_memory_region2
)
KVM_CREATE_IRQCHIP = _io("KVM_CREATE_IRQCHIP", 0x60)
KVM_ENABLE_CAP = _iow("KVM_ENABLE_CAP", 0xA3, kvm_enable_cap)  # also on vCPU fds
KVM_CLEAR_DIRTY_LOG = _iowr("KVM_CLEAR_DIRTY_LOG", 0xC0, kvm_clear_dirty_log)
KVM_RESET_DIRTY_RINGS = _io("KVM_RESET_DIRTY_RINGS", 0xC7)
KVM_GET_STATS_FD = _io("KVM_GET_STATS_FD", 0xCE)  # also on vCPU fds

# ioctls for vCPU fds
KVM_RUN = _io("KVM_RUN", 0x80)
KVM_GET_REGS = _ior("KVM_GET_REGS", 0x81, kvm_regs)
KVM_SET_REGS = _iow("KVM_SET_REGS", 0x82, kvm_regs)
KVM_GET_SREGS = _ior("KVM_GET_SREGS", 0x83, kvm_sregs)
KVM_SET_SREGS = _iow("KVM_SET_SREGS", 0x84, kvm_sregs)
KVM_TRANSLATE = _iowr("KVM_TRANSLATE", 0x85, kvm_translation)
KVM_GET_MSRS = _iowr("KVM_GET_MSRS", 0x88, kvm_msrs)
KVM_SET_MSRS = _iow("KVM_SET_MSRS", 0x89, kvm_msrs)
KVM_SET_CPUID2 = _iow("KVM_SET_CPUID2", 0x90, kvm_cpuid2)
KVM_GET_CPUID2 = _iowr("KVM_GET_CPUID2", 0x91, kvm_cpuid2)
KVM_GET_MP_STATE = _ior("KVM_GET_MP_STATE", 0x98, kvm_mp_state)
KVM_SET_MP_STATE = _iow("KVM_SET_MP_STATE", 0x99, kvm_mp_state)
KVM_SET_GUEST_DEBUG = _iow("KVM_SET_GUEST_DEBUG", 0x9B, kvm_guest_debug)
KVM_GET_VCPU_EVENTS = _ior("KVM_GET_VCPU_EVENTS", 0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _iow("KVM_SET_VCPU_EVENTS", 0xA0, kvm_vcpu_events)
KVM_GET_DEBUGREGS = _ior("KVM_GET_DEBUGREGS", 0xA1, kvm_debugregs)
KVM_SET_DEBUGREGS = _iow("KVM_SET_DEBUGREGS", 0xA2, kvm_debugregs)
KVM_GET_TSC_KHZ = _io("KVM_GET_TSC_KHZ", 0xA3)
KVM_GET_SREGS2 = _ior("KVM_GET_SREGS2", 0xCC, kvm_sregs2)
KVM_SET_SREGS2 = _iow("KVM_SET_SREGS2", 0xCD, kvm_sregs2)

# ---------------------------------------------------------------------------
# constants
# ---------------------------------------------------------------------------

KVM_API_VERSION = 12

# mmap offsets of the vCPU fd, in pages
KVM_PIO_PAGE_OFFSET = 1
KVM_COALESCED_MMIO_PAGE_OFFSET = 2
KVM_DIRTY_LOG_PAGE_OFFSET = 64

# kvm_userspace_memory_region{,2}.flags
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2

# KVM_CREATE_VM machine types on x86 (KVM_CAP_VM_TYPES is a bitmask of 1 << type)
KVM_X86_DEFAULT_VM = 0
KVM_X86_SW_PROTECTED_VM = 1
KVM_X86_SEV_VM = 2
KVM_X86_SEV_ES_VM = 3
KVM_X86_SNP_VM = 4
KVM_X86_TDX_VM = 5

# KVM_CHECK_EXTENSION / KVM_ENABLE_CAP capability numbers (include/uapi/linux/kvm.h;
# numbers 5, 17, 19, 20, 27 and 28 are unused upstream).
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_MMU_SHADOW_CACHE_CONTROL = 2
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_VAPIC = 6
KVM_CAP_EXT_CPUID = 7
KVM_CAP_CLOCKSOURCE = 8
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_PIT = 11
KVM_CAP_NOP_IO_DELAY = 12
KVM_CAP_PV_MMU = 13
KVM_CAP_MP_STATE = 14
KVM_CAP_COALESCED_MMIO = 15
KVM_CAP_SYNC_MMU = 16
KVM_CAP_IOMMU = 18
KVM_CAP_DESTROY_MEMORY_REGION_WORKS = 21
KVM_CAP_USER_NMI = 22
KVM_CAP_SET_GUEST_DEBUG = 23
KVM_CAP_REINJECT_CONTROL = 24
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQ_INJECT_STATUS = 26
KVM_CAP_ASSIGN_DEV_IRQ = 29
KVM_CAP_JOIN_MEMORY_REGIONS_WORKS = 30
KVM_CAP_MCE = 31
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_SET_BOOT_CPU_ID = 34
KVM_CAP_PIT_STATE2 = 35
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_XEN_HVM = 38
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_INTERNAL_ERROR_DATA = 40
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_S390_PSW = 42
KVM_CAP_PPC_SEGSTATE = 43
KVM_CAP_HYPERV = 44
KVM_CAP_HYPERV_VAPIC = 45
KVM_CAP_HYPERV_SPIN = 46
KVM_CAP_PCI_SEGMENT = 47
KVM_CAP_PPC_PAIRED_SINGLES = 48
KVM_CAP_INTR_SHADOW = 49
KVM_CAP_DEBUGREGS = 50
KVM_CAP_X86_ROBUST_SINGLESTEP = 51
KVM_CAP_PPC_OSI = 52
KVM_CAP_PPC_UNSET_IRQ = 53
KVM_CAP_ENABLE_CAP = 54
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_PPC_GET_PVINFO = 57
KVM_CAP_PPC_IRQ_LEVEL = 58
KVM_CAP_ASYNC_PF = 59
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_PPC_BOOKE_SREGS = 62
KVM_CAP_SPAPR_TCE = 63
KVM_CAP_PPC_SMT = 64
KVM_CAP_PPC_RMA = 65
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_PPC_HIOR = 67
KVM_CAP_PPC_PAPR = 68
KVM_CAP_SW_TLB = 69
KVM_CAP_ONE_REG = 70
KVM_CAP_S390_GMAP = 71
KVM_CAP_TSC_DEADLINE_TIMER = 72
KVM_CAP_S390_UCONTROL = 73
KVM_CAP_SYNC_REGS = 74
KVM_CAP_PCI_2_3 = 75
KVM_CAP_KVMCLOCK_CTRL = 76
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_PPC_GET_SMMU_INFO = 78
KVM_CAP_S390_COW = 79
KVM_CAP_PPC_ALLOC_HTAB = 80
KVM_CAP_READONLY_MEM = 81
KVM_CAP_IRQFD_RESAMPLE = 82
KVM_CAP_PPC_BOOKE_WATCHDOG = 83
KVM_CAP_PPC_HTAB_FD = 84
KVM_CAP_S390_CSS_SUPPORT = 85
KVM_CAP_PPC_EPR = 86
KVM_CAP_ARM_PSCI = 87
KVM_CAP_ARM_SET_DEVICE_ADDR = 88
KVM_CAP_DEVICE_CTRL = 89
KVM_CAP_IRQ_MPIC = 90
KVM_CAP_PPC_RTAS = 91
KVM_CAP_IRQ_XICS = 92
KVM_CAP_ARM_EL1_32BIT = 93
KVM_CAP_SPAPR_MULTITCE = 94
KVM_CAP_EXT_EMUL_CPUID = 95
KVM_CAP_HYPERV_TIME = 96
KVM_CAP_IOAPIC_POLARITY_IGNORED = 97
KVM_CAP_ENABLE_CAP_VM = 98
KVM_CAP_S390_IRQCHIP = 99
KVM_CAP_IOEVENTFD_NO_LENGTH = 100
KVM_CAP_VM_ATTRIBUTES = 101
KVM_CAP_ARM_PSCI_0_2 = 102
KVM_CAP_PPC_FIXUP_HCALL = 103
KVM_CAP_PPC_ENABLE_HCALL = 104
KVM_CAP_CHECK_EXTENSION_VM = 105
KVM_CAP_S390_USER_SIGP = 106
KVM_CAP_S390_VECTOR_REGISTERS = 107
KVM_CAP_S390_MEM_OP = 108
KVM_CAP_S390_USER_STSI = 109
KVM_CAP_S390_SKEYS = 110
KVM_CAP_MIPS_FPU = 111
KVM_CAP_MIPS_MSA = 112
KVM_CAP_S390_INJECT_IRQ = 113
KVM_CAP_S390_IRQ_STATE = 114
KVM_CAP_PPC_HWRNG = 115
KVM_CAP_DISABLE_QUIRKS = 116
KVM_CAP_X86_SMM = 117
KVM_CAP_MULTI_ADDRESS_SPACE = 118
KVM_CAP_GUEST_DEBUG_HW_BPS = 119
KVM_CAP_GUEST_DEBUG_HW_WPS = 120
KVM_CAP_SPLIT_IRQCHIP = 121
KVM_CAP_IOEVENTFD_ANY_LENGTH = 122
KVM_CAP_HYPERV_SYNIC = 123
KVM_CAP_S390_RI = 124
KVM_CAP_SPAPR_TCE_64 = 125
KVM_CAP_ARM_PMU_V3 = 126
KVM_CAP_VCPU_ATTRIBUTES = 127
KVM_CAP_MAX_VCPU_ID = 128
KVM_CAP_X2APIC_API = 129
KVM_CAP_S390_USER_INSTR0 = 130
KVM_CAP_MSI_DEVID = 131
KVM_CAP_PPC_HTM = 132
KVM_CAP_SPAPR_RESIZE_HPT = 133
KVM_CAP_PPC_MMU_RADIX = 134
KVM_CAP_PPC_MMU_HASH_V3 = 135
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MIPS_VZ = 137
KVM_CAP_MIPS_TE = 138
KVM_CAP_MIPS_64BIT = 139
KVM_CAP_S390_GS = 140
KVM_CAP_S390_AIS = 141
KVM_CAP_SPAPR_TCE_VFIO = 142
KVM_CAP_X86_DISABLE_EXITS = 143
KVM_CAP_ARM_USER_IRQ = 144
KVM_CAP_S390_CMMA_MIGRATION = 145
KVM_CAP_PPC_FWNMI = 146
KVM_CAP_PPC_SMT_POSSIBLE = 147
KVM_CAP_HYPERV_SYNIC2 = 148
KVM_CAP_HYPERV_VP_INDEX = 149
KVM_CAP_S390_AIS_MIGRATION = 150
KVM_CAP_PPC_GET_CPU_CHAR = 151
KVM_CAP_S390_BPB = 152
KVM_CAP_GET_MSR_FEATURES = 153
KVM_CAP_HYPERV_EVENTFD = 154
KVM_CAP_HYPERV_TLBFLUSH = 155
KVM_CAP_S390_HPAGE_1M = 156
KVM_CAP_NESTED_STATE = 157
KVM_CAP_ARM_INJECT_SERROR_ESR = 158
KVM_CAP_MSR_PLATFORM_INFO = 159
KVM_CAP_PPC_NESTED_HV = 160
KVM_CAP_HYPERV_SEND_IPI = 161
KVM_CAP_COALESCED_PIO = 162
KVM_CAP_HYPERV_ENLIGHTENED_VMCS = 163
KVM_CAP_EXCEPTION_PAYLOAD = 164
KVM_CAP_ARM_VM_IPA_SIZE = 165
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT = 166
KVM_CAP_HYPERV_CPUID = 167
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_PPC_IRQ_XIVE = 169
KVM_CAP_ARM_SVE = 170
KVM_CAP_ARM_PTRAUTH_ADDRESS = 171
KVM_CAP_ARM_PTRAUTH_GENERIC = 172
KVM_CAP_PMU_EVENT_FILTER = 173
KVM_CAP_ARM_IRQ_LINE_LAYOUT_2 = 174
KVM_CAP_HYPERV_DIRECT_TLBFLUSH = 175
KVM_CAP_PPC_GUEST_DEBUG_SSTEP = 176
KVM_CAP_ARM_NISV_TO_USER = 177
KVM_CAP_ARM_INJECT_EXT_DABT = 178
KVM_CAP_S390_VCPU_RESETS = 179
KVM_CAP_S390_PROTECTED = 180
KVM_CAP_PPC_SECURE_GUEST = 181
KVM_CAP_HALT_POLL = 182
KVM_CAP_ASYNC_PF_INT = 183
KVM_CAP_LAST_CPU = 184
KVM_CAP_SMALLER_MAXPHYADDR = 185
KVM_CAP_S390_DIAG318 = 186
KVM_CAP_STEAL_TIME = 187
KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_CAP_X86_MSR_FILTER = 189
KVM_CAP_ENFORCE_PV_FEATURE_CPUID = 190
KVM_CAP_SYS_HYPERV_CPUID = 191
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_X86_BUS_LOCK_EXIT = 193
KVM_CAP_PPC_DAWR1 = 194
KVM_CAP_SET_GUEST_DEBUG2 = 195
KVM_CAP_SGX_ATTRIBUTE = 196
KVM_CAP_VM_COPY_ENC_CONTEXT_FROM = 197
KVM_CAP_PTP_KVM = 198
KVM_CAP_HYPERV_ENFORCE_CPUID = 199
KVM_CAP_SREGS2 = 200
KVM_CAP_EXIT_HYPERCALL = 201
KVM_CAP_PPC_RPT_INVALIDATE = 202
KVM_CAP_BINARY_STATS_FD = 203
KVM_CAP_EXIT_ON_EMULATION_FAILURE = 204
KVM_CAP_ARM_MTE = 205
KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM = 206
KVM_CAP_VM_GPA_BITS = 207
KVM_CAP_XSAVE2 = 208
KVM_CAP_SYS_ATTRIBUTES = 209
KVM_CAP_PPC_AIL_MODE_3 = 210
KVM_CAP_S390_MEM_OP_EXTENSION = 211
KVM_CAP_PMU_CAPABILITY = 212
KVM_CAP_DISABLE_QUIRKS2 = 213
KVM_CAP_VM_TSC_CONTROL = 214
KVM_CAP_SYSTEM_EVENT_DATA = 215
KVM_CAP_ARM_SYSTEM_SUSPEND = 216
KVM_CAP_S390_PROTECTED_DUMP = 217
KVM_CAP_X86_TRIPLE_FAULT_EVENT = 218
KVM_CAP_X86_NOTIFY_VMEXIT = 219
KVM_CAP_VM_DISABLE_NX_HUGE_PAGES = 220
KVM_CAP_S390_ZPCI_OP = 221
KVM_CAP_S390_CPU_TOPOLOGY = 222
KVM_CAP_DIRTY_LOG_RING_ACQ_REL = 223
KVM_CAP_S390_PROTECTED_ASYNC_DISABLE = 224
KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP = 225
KVM_CAP_PMU_EVENT_MASKED_EVENTS = 226
KVM_CAP_COUNTER_OFFSET = 227
KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE = 228
KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES = 229
KVM_CAP_ARM_SUPPORTED_REG_MASK_RANGES = 230
KVM_CAP_USER_MEMORY2 = 231
KVM_CAP_MEMORY_FAULT_INFO = 232
KVM_CAP_MEMORY_ATTRIBUTES = 233
KVM_CAP_GUEST_MEMFD = 234
KVM_CAP_VM_TYPES = 235
KVM_CAP_PRE_FAULT_MEMORY = 236
KVM_CAP_X86_APIC_BUS_CYCLES_NS = 237
KVM_CAP_X86_GUEST_MODE = 238
KVM_CAP_ARM_WRITABLE_IMP_ID_REGS = 239
KVM_CAP_ARM_EL2 = 240
KVM_CAP_ARM_EL2_E2H0 = 241
KVM_CAP_RISCV_MP_STATE_RESET = 242
KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED = 243
KVM_CAP_GUEST_MEMFD_FLAGS = 244
KVM_CAP_ARM_SEA_TO_USER = 245
KVM_CAP_S390_USER_OPEREXEC = 246

# kvm_run.exit_reason
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_S390_SIEIC = 13
KVM_EXIT_S390_RESET = 14
KVM_EXIT_DCR = 15  # deprecated
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_OSI = 18
KVM_EXIT_PAPR_HCALL = 19
KVM_EXIT_S390_UCONTROL = 20
KVM_EXIT_WATCHDOG = 21
KVM_EXIT_S390_TSCH = 22
KVM_EXIT_EPR = 23
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_S390_STSI = 25
KVM_EXIT_IOAPIC_EOI = 26
KVM_EXIT_HYPERV = 27
KVM_EXIT_ARM_NISV = 28
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_DIRTY_RING_FULL = 31
KVM_EXIT_AP_RESET_HOLD = 32
KVM_EXIT_X86_BUS_LOCK = 33
KVM_EXIT_XEN = 34
KVM_EXIT_RISCV_SBI = 35
KVM_EXIT_RISCV_CSR = 36
KVM_EXIT_NOTIFY = 37
KVM_EXIT_LOONGARCH_IOCSR = 38
KVM_EXIT_MEMORY_FAULT = 39

# kvm_run.io.direction
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

# kvm_run.internal.suberror (KVM_EXIT_INTERNAL_ERROR)
KVM_INTERNAL_ERROR_EMULATION = 1  # emulate instruction failed
KVM_INTERNAL_ERROR_SIMUL_EX = 2  # unexpected simultaneous exceptions
KVM_INTERNAL_ERROR_DELIVERY_EV = 3  # unexpected vm-exit due to delivery event
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4  # unexpected vm-exit reason
# kvm_run.emulation_failure.flags
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0

# kvm_run.system_event.type
KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3
KVM_SYSTEM_EVENT_WAKEUP = 4
KVM_SYSTEM_EVENT_SUSPEND = 5
KVM_SYSTEM_EVENT_SEV_TERM = 6

# kvm_run.msr.reason
KVM_MSR_EXIT_REASON_INVAL = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN = 1 << 1
KVM_MSR_EXIT_REASON_FILTER = 1 << 2
KVM_MSR_EXIT_REASON_VALID_MASK = 0x7

# kvm_run.notify.flags
KVM_NOTIFY_CONTEXT_INVALID = 1 << 0

# kvm_run.memory_fault.flags
KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3

# kvm_run.flags (x86)
KVM_RUN_X86_SMM = 1 << 0
KVM_RUN_X86_BUS_LOCK = 1 << 1
KVM_RUN_X86_GUEST_MODE = 1 << 2

# kvm_run.kvm_valid_regs / kvm_dirty_regs (x86)
KVM_SYNC_X86_REGS = 1 << 0
KVM_SYNC_X86_SREGS = 1 << 1
KVM_SYNC_X86_EVENTS = 1 << 2
KVM_SYNC_X86_VALID_FIELDS = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS

# kvm_mp_state.mp_state (not all states are valid on all architectures)
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4
KVM_MP_STATE_STOPPED = 5
KVM_MP_STATE_CHECK_STOP = 6
KVM_MP_STATE_OPERATING = 7
KVM_MP_STATE_LOAD = 8
KVM_MP_STATE_AP_RESET_HOLD = 9
KVM_MP_STATE_SUSPENDED = 10

# kvm_vcpu_events.flags
KVM_VCPUEVENT_VALID_NMI_PENDING = 0x00000001
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x00000002
KVM_VCPUEVENT_VALID_SHADOW = 0x00000004
KVM_VCPUEVENT_VALID_SMM = 0x00000008
KVM_VCPUEVENT_VALID_PAYLOAD = 0x00000010
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x00000020

# kvm_vcpu_events.interrupt.shadow
KVM_X86_SHADOW_INT_MOV_SS = 0x01
KVM_X86_SHADOW_INT_STI = 0x02

# kvm_guest_debug.control
KVM_GUESTDBG_ENABLE = 0x00000001
KVM_GUESTDBG_SINGLESTEP = 0x00000002
KVM_GUESTDBG_USE_SW_BP = 0x00010000
KVM_GUESTDBG_USE_HW_BP = 0x00020000
KVM_GUESTDBG_INJECT_DB = 0x00040000
KVM_GUESTDBG_INJECT_BP = 0x00080000
KVM_GUESTDBG_BLOCKIRQ = 0x00100000

# kvm_sregs2.flags
KVM_SREGS2_FLAGS_PDPTRS_VALID = 1

# kvm_cpuid_entry2.flags (the kernel spells SIGNIFCANT this way)
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0
KVM_CPUID_FLAG_STATEFUL_FUNC = 1 << 1
KVM_CPUID_FLAG_STATE_READ_NEXT = 1 << 2

# kvm_dirty_gfn.flags (dirty ring)
KVM_DIRTY_GFN_F_DIRTY = 1 << 0
KVM_DIRTY_GFN_F_RESET = 1 << 1
KVM_DIRTY_GFN_F_MASK = 0x3

# KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) args[0]
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1

# kvm_stats_desc.flags
KVM_STATS_TYPE_SHIFT = 0
KVM_STATS_TYPE_MASK = 0xF << KVM_STATS_TYPE_SHIFT
KVM_STATS_TYPE_CUMULATIVE = 0x0 << KVM_STATS_TYPE_SHIFT
KVM_STATS_TYPE_INSTANT = 0x1 << KVM_STATS_TYPE_SHIFT
KVM_STATS_TYPE_PEAK = 0x2 << KVM_STATS_TYPE_SHIFT
KVM_STATS_TYPE_LINEAR_HIST = 0x3 << KVM_STATS_TYPE_SHIFT
KVM_STATS_TYPE_LOG_HIST = 0x4 << KVM_STATS_TYPE_SHIFT
KVM_STATS_TYPE_MAX = KVM_STATS_TYPE_LOG_HIST

KVM_STATS_UNIT_SHIFT = 4
KVM_STATS_UNIT_MASK = 0xF << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_NONE = 0x0 << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_BYTES = 0x1 << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_SECONDS = 0x2 << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_CYCLES = 0x3 << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_BOOLEAN = 0x4 << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_MAX = KVM_STATS_UNIT_BOOLEAN

KVM_STATS_BASE_SHIFT = 8
KVM_STATS_BASE_MASK = 0xF << KVM_STATS_BASE_SHIFT
KVM_STATS_BASE_POW10 = 0x0 << KVM_STATS_BASE_SHIFT
KVM_STATS_BASE_POW2 = 0x1 << KVM_STATS_BASE_SHIFT
KVM_STATS_BASE_MAX = KVM_STATS_BASE_POW2

# KVM paravirt CPUID leaves and features (asm/kvm_para.h)
KVM_CPUID_SIGNATURE = 0x40000000  # ebx, ecx, edx = "KVMKVMKVM\0\0\0"
KVM_CPUID_FEATURES = 0x40000001
# bit numbers in KVM_CPUID_FEATURES.eax
KVM_FEATURE_CLOCKSOURCE = 0
KVM_FEATURE_NOP_IO_DELAY = 1
KVM_FEATURE_MMU_OP = 2
KVM_FEATURE_CLOCKSOURCE2 = 3
KVM_FEATURE_ASYNC_PF = 4
KVM_FEATURE_STEAL_TIME = 5
KVM_FEATURE_PV_EOI = 6
KVM_FEATURE_PV_UNHALT = 7
KVM_FEATURE_PV_TLB_FLUSH = 9
KVM_FEATURE_ASYNC_PF_VMEXIT = 10
KVM_FEATURE_PV_SEND_IPI = 11
KVM_FEATURE_POLL_CONTROL = 12
KVM_FEATURE_PV_SCHED_YIELD = 13
KVM_FEATURE_ASYNC_PF_INT = 14
KVM_FEATURE_MSI_EXT_DEST_ID = 15
KVM_FEATURE_HC_MAP_GPA_RANGE = 16
KVM_FEATURE_MIGRATION_CONTROL = 17
KVM_FEATURE_CLOCKSOURCE_STABLE_BIT = 24
# bit numbers in KVM_CPUID_FEATURES.edx
KVM_HINTS_REALTIME = 0

# ---------------------------------------------------------------------------
# number -> name tables
# ---------------------------------------------------------------------------


def _names(prefix: str, exclude: frozenset[str] = frozenset()) -> dict[int, str]:
    """value -> name of this module's ``prefix*`` integer constants (values must be unique)."""
    table: dict[int, str] = {}
    for name, value in list(globals().items()):
        if name.startswith(prefix) and name not in exclude and isinstance(value, int):
            if value in table:
                raise AssertionError(f"{name} and {table[value]} are both {value}")
            table[value] = name
    return dict(sorted(table.items()))


#: capability number -> KVM_CAP_* name
CAPS: dict[int, str] = _names("KVM_CAP_")
#: kvm_run.exit_reason -> KVM_EXIT_* name
EXIT_REASONS: dict[int, str] = _names("KVM_EXIT_", frozenset({"KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT"}))
#: kvm_run.internal.suberror -> KVM_INTERNAL_ERROR_* name
INTERNAL_ERRORS: dict[int, str] = _names(
    "KVM_INTERNAL_ERROR_", frozenset({"KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES"})
)
#: kvm_mp_state.mp_state -> KVM_MP_STATE_* name
MP_STATES: dict[int, str] = _names("KVM_MP_STATE_")

#: exit reason -> the member of the kvm_run exit union that describes it
KVM_RUN_EXIT_MEMBER: dict[int, str] = {
    KVM_EXIT_UNKNOWN: "hw",
    KVM_EXIT_EXCEPTION: "ex",
    KVM_EXIT_IO: "io",
    KVM_EXIT_HYPERCALL: "hypercall",
    KVM_EXIT_DEBUG: "debug",
    KVM_EXIT_MMIO: "mmio",
    KVM_EXIT_FAIL_ENTRY: "fail_entry",
    KVM_EXIT_TPR_ACCESS: "tpr_access",
    KVM_EXIT_INTERNAL_ERROR: "internal",
    KVM_EXIT_SYSTEM_EVENT: "system_event",
    KVM_EXIT_IOAPIC_EOI: "eoi",
    KVM_EXIT_X86_RDMSR: "msr",
    KVM_EXIT_X86_WRMSR: "msr",
    KVM_EXIT_NOTIFY: "notify",
    KVM_EXIT_MEMORY_FAULT: "memory_fault",
}


def _check_layout() -> None:
    """Sizes the kernel's x86-64 ABI fixes; a mistake here must fail at import."""
    expected: dict[type[ctypes.Structure | ctypes.Union], int] = {
        kvm_userspace_memory_region: 32,
        kvm_userspace_memory_region2: 160,
        kvm_regs: 144,
        kvm_segment: 24,
        kvm_dtable: 16,
        kvm_sregs: 312,
        kvm_sregs2: 320,
        kvm_vcpu_events: 64,
        kvm_debugregs: 128,
        kvm_sync_regs: 520,
        kvm_run_exit: 256,
        kvm_run_s: 2048,
        kvm_run: 32 + 256 + 8 + 8 + 2048,
    }
    for struct, size in expected.items():
        if ctypes.sizeof(struct) != size:
            raise AssertionError(f"sizeof({struct.__name__}) = {ctypes.sizeof(struct)} != {size}")


_check_layout()
