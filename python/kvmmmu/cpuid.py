"""CPUID tables: the three CPUID ioctls, and decoders for the leaves that matter here.

The ioctls take a transport and a descriptor, so they work on either backend and
from the :class:`~kvmmmu.api.Kvm` / :class:`~kvmmmu.api.Vcpu` methods alike::

    entries = get_supported_cpuid(kvm.transport, kvm.fd)
    set_cpuid2(vcpu.transport, vcpu.fd, entries)
    table = get_cpuid2(vcpu.transport, vcpu.fd)

A table is a list of :class:`~kvmmmu.uapi.kvm_cpuid_entry2`. The decoders read a
table the way KVM does (``kvm_find_cpuid_entry``): the first entry of a function
whose index is not significant (no ``KVM_CPUID_FLAG_SIGNIFCANT_INDEX``) or matches.

KVM leaves (``Documentation/virt/kvm/x86/cpuid.rst``; the original cpuid.txt):

* ``KVM_CPUID_SIGNATURE`` (0x40000000): EAX = the highest KVM leaf (0x40000001; cpuid.txt
  of 2010 said 0, which old kernels returned), EBX/ECX/EDX = ``"KVMKVMKVM\\0\\0\\0"``.
* ``KVM_CPUID_FEATURES`` (0x40000001): EAX = the ``KVM_FEATURE_*`` bits
  (:data:`KVM_FEATURE_NAMES`), EDX = the ``KVM_HINTS_*`` bits, EBX = ECX = 0.
  ``KVM_FEATURE_MMU_OP`` (bit 2) is deprecated: no KVM since 2.6.35 reports it and
  guests must ignore it. ``MSI_EXT_DEST_ID``, ``HC_MAP_GPA_RANGE`` and
  ``MIGRATION_CONTROL`` are set by the VMM, never by KVM_GET_SUPPORTED_CPUID.

What each backend reports in 0x40000001.EAX: the device (and KVM on hardware)
0x01007efb (:data:`KVM_HOST_FEATURES`); the simulator only NOP_IO_DELAY
(:data:`SIM_KVM_FEATURES`), because it has no kvmclock or other PV interface.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import uapi
from .transport import Transport

Entry = uapi.kvm_cpuid_entry2

KVM_MAX_CPUID_ENTRIES = 256
KVM_CPUID_SIGNATURE = uapi.KVM_CPUID_SIGNATURE
KVM_CPUID_FEATURES = uapi.KVM_CPUID_FEATURES
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"

#: bit number -> name of every KVM_FEATURE_* in 0x40000001.EAX.
KVM_FEATURE_NAMES: dict[int, str] = {
    value: name
    for name, value in sorted(vars(uapi).items(), key=lambda kv: str(kv[0]))
    if name.startswith("KVM_FEATURE_") and isinstance(value, int)
}
#: Features that exist only as history: no KVM reports them.
DEPRECATED_FEATURES = frozenset({"KVM_FEATURE_MMU_OP"})
#: bit number -> name of the KVM_HINTS_* bits in 0x40000001.EDX.
KVM_HINT_NAMES: dict[int, str] = {uapi.KVM_HINTS_REALTIME: "KVM_HINTS_REALTIME"}

#: What KVM on hardware (and the device) reports in 0x40000001.EAX.
KVM_HOST_FEATURES = sum(
    1 << getattr(uapi, f"KVM_FEATURE_{n}")
    for n in (
        "CLOCKSOURCE",
        "NOP_IO_DELAY",
        "CLOCKSOURCE2",
        "ASYNC_PF",
        "STEAL_TIME",
        "PV_EOI",
        "PV_UNHALT",
        "PV_TLB_FLUSH",
        "ASYNC_PF_VMEXIT",
        "PV_SEND_IPI",
        "POLL_CONTROL",
        "PV_SCHED_YIELD",
        "ASYNC_PF_INT",
        "CLOCKSOURCE_STABLE_BIT",
    )
)
#: What the simulator reports in 0x40000001.EAX (it has no PV features).
SIM_KVM_FEATURES = 1 << uapi.KVM_FEATURE_NOP_IO_DELAY

#: The features cpuid.txt (2010) documents, which every KVM since agrees on.
CPUID_TXT_FEATURES = (
    "KVM_FEATURE_CLOCKSOURCE",
    "KVM_FEATURE_NOP_IO_DELAY",
    "KVM_FEATURE_MMU_OP",
    "KVM_FEATURE_CLOCKSOURCE2",
    "KVM_FEATURE_CLOCKSOURCE_STABLE_BIT",
)

#: Leaves whose index is significant (the kernel's ``cpuid_function_is_indexed``).
INDEXED_LEAVES = frozenset(
    {4, 7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1D, 0x1E, 0x1F, 0x24, 0x8000001D}
)

#: Architectural feature flags: name -> (function, index, register, bit).
FEATURE_BITS: dict[str, tuple[int, int, str, int]] = {
    # paging
    "PSE": (1, 0, "edx", 3),
    "PAE": (1, 0, "edx", 6),
    "PGE": (1, 0, "edx", 13),
    "PAT": (1, 0, "edx", 16),
    "PSE36": (1, 0, "edx", 17),
    "PCID": (1, 0, "ecx", 17),
    "NX": (0x80000001, 0, "edx", 20),
    "PDPE1GB": (0x80000001, 0, "edx", 26),
    "LM": (0x80000001, 0, "edx", 29),
    "LA57": (7, 0, "ecx", 16),
    "SMEP": (7, 0, "ebx", 7),
    "SMAP": (7, 0, "ebx", 20),
    "PKU": (7, 0, "ecx", 3),
    "OSPKE": (7, 0, "ecx", 4),
    # other CR4-gating features
    "UMIP": (7, 0, "ecx", 2),
    "FSGSBASE": (7, 0, "ebx", 0),
    "XSAVE": (1, 0, "ecx", 26),
    "OSXSAVE": (1, 0, "ecx", 27),
    "VMX": (1, 0, "ecx", 5),
    "SVM": (0x80000001, 0, "ecx", 2),
    "X2APIC": (1, 0, "ecx", 21),
    "APIC": (1, 0, "edx", 9),
    "HYPERVISOR": (1, 0, "ecx", 31),
    "LAM": (7, 1, "eax", 26),
    "FRED": (7, 1, "eax", 17),
}

#: The default MAXPHYADDR when the table has no usable leaf 0x80000008 (cpuid_query_maxphyaddr).
DEFAULT_MAXPHYADDR = 36


# ---------------------------------------------------------------------------
# building and looking up entries
# ---------------------------------------------------------------------------


def entry(
    function: int,
    index: int = 0,
    *,
    eax: int = 0,
    ebx: int = 0,
    ecx: int = 0,
    edx: int = 0,
    flags: int | None = None,
) -> Entry:
    """One kvm_cpuid_entry2; ``flags`` defaults to SIGNIFCANT_INDEX for the indexed leaves."""
    if flags is None:
        flags = uapi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX if function in INDEXED_LEAVES else 0
    return Entry(function=function, index=index, flags=flags, eax=eax, ebx=ebx, ecx=ecx, edx=edx)


def copy_entry(e: Entry) -> Entry:
    return Entry.from_bytes(e.to_bytes())


def find(entries: Iterable[Entry], function: int, index: int | None = None) -> Entry | None:
    """The entry KVM uses for ``function``/``index``: the first of that function whose index
    is not significant or equals ``index``; with ``index=None``, the first of that function."""
    for e in entries:
        if e.function != function:
            continue
        if index is None or not e.flags & uapi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX:
            return e
        if e.index == index:
            return e
    return None


def by_key(entries: Iterable[Entry]) -> dict[tuple[int, int], Entry]:
    """The table as {(function, index): entry}; the first of duplicate keys wins."""
    out: dict[tuple[int, int], Entry] = {}
    for e in entries:
        out.setdefault((e.function, e.index), e)
    return out


def regs(e: Entry | None) -> tuple[int, int, int, int]:
    """(eax, ebx, ecx, edx) of an entry, zeros for a missing one."""
    if e is None:
        return (0, 0, 0, 0)
    return (e.eax, e.ebx, e.ecx, e.edx)


def _text(*words: int) -> bytes:
    return b"".join(w.to_bytes(4, "little") for w in words)


# ---------------------------------------------------------------------------
# KVM leaves
# ---------------------------------------------------------------------------


def kvm_signature(entries: Iterable[Entry], base: int = KVM_CPUID_SIGNATURE) -> bytes | None:
    """The 12 signature bytes of leaf ``base`` (b"KVMKVMKVM\\0\\0\\0" for KVM), or None."""
    e = find(entries, base)
    return None if e is None else _text(e.ebx, e.ecx, e.edx)


def is_kvm(entries: Iterable[Entry]) -> bool:
    return kvm_signature(entries) == KVM_SIGNATURE


def kvm_max_leaf(entries: Iterable[Entry]) -> int | None:
    """KVM_CPUID_SIGNATURE.EAX: the highest KVM leaf."""
    e = find(entries, KVM_CPUID_SIGNATURE)
    return None if e is None else int(e.eax)


def decode_kvm_features(eax: int) -> list[str]:
    """The KVM_FEATURE_* names of the bits set in ``eax`` (unknown bits as "bit N")."""
    return [KVM_FEATURE_NAMES.get(b, f"bit {b}") for b in range(32) if eax >> b & 1]


def decode_kvm_hints(edx: int) -> list[str]:
    return [KVM_HINT_NAMES.get(b, f"bit {b}") for b in range(32) if edx >> b & 1]


def kvm_features(entries: Iterable[Entry]) -> list[str]:
    """The KVM_FEATURE_* names that KVM_CPUID_FEATURES.EAX reports ([] if the leaf is absent)."""
    e = find(entries, KVM_CPUID_FEATURES)
    return [] if e is None else decode_kvm_features(e.eax)


def kvm_feature_bits(names: Iterable[str]) -> int:
    """The EAX value with the named KVM_FEATURE_* bits set (names with or without the prefix)."""
    value = 0
    for n in names:
        full = n if n.startswith("KVM_FEATURE_") else f"KVM_FEATURE_{n}"
        value |= 1 << getattr(uapi, full)
    return value


# ---------------------------------------------------------------------------
# architectural leaves
# ---------------------------------------------------------------------------


def vendor(entries: Iterable[Entry]) -> str | None:
    """Leaf 0's vendor string ("GenuineIntel", "AuthenticAMD", ...)."""
    e = find(entries, 0)
    return None if e is None else _text(e.ebx, e.edx, e.ecx).decode("latin-1")


def max_basic_leaf(entries: Iterable[Entry]) -> int | None:
    e = find(entries, 0)
    return None if e is None else int(e.eax)


def max_extended_leaf(entries: Iterable[Entry]) -> int | None:
    e = find(entries, 0x80000000)
    return None if e is None else int(e.eax)


def maxphyaddr(entries: Sequence[Entry]) -> int:
    """Guest MAXPHYADDR as KVM computes it: 0x80000008.EAX[7:0] when 0x80000000.EAX reaches
    0x80000008, else 36."""
    top = max_extended_leaf(entries)
    e = find(entries, 0x80000008)
    if top is None or top < 0x80000008 or e is None:
        return DEFAULT_MAXPHYADDR
    return int(e.eax & 0xFF)


def maxlinaddr(entries: Sequence[Entry]) -> int | None:
    """Linear-address width, 0x80000008.EAX[15:8] (48 or 57; KVM_SET_CPUID2 rejects other
    non-zero values), or None without that leaf."""
    e = find(entries, 0x80000008)
    return None if e is None else int(e.eax >> 8 & 0xFF)


def has(entries: Iterable[Entry], name: str) -> bool:
    """Whether the table sets the feature ``name`` (a key of :data:`FEATURE_BITS`)."""
    function, index, reg, bit = FEATURE_BITS[name]
    e = find(entries, function, index)
    return e is not None and bool(getattr(e, reg) >> bit & 1)


def features(entries: Sequence[Entry], names: Iterable[str] | None = None) -> dict[str, bool]:
    """{name: present} for the given feature names (default: all of :data:`FEATURE_BITS`)."""
    return {n: has(entries, n) for n in (FEATURE_BITS if names is None else names)}


@dataclass
class Summary:
    """What a table says about the things this project models."""

    vendor: str | None
    maxphyaddr: int
    maxlinaddr: int | None
    features: dict[str, bool]
    kvm_signature: bytes | None
    kvm_max_leaf: int | None
    kvm_features: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "vendor": self.vendor,
            "maxphyaddr": self.maxphyaddr,
            "maxlinaddr": self.maxlinaddr,
            "features": dict(self.features),
            "kvm_signature": self.kvm_signature,
            "kvm_max_leaf": self.kvm_max_leaf,
            "kvm_features": list(self.kvm_features),
        }


def summarize(entries: Sequence[Entry]) -> Summary:
    return Summary(
        vendor=vendor(entries),
        maxphyaddr=maxphyaddr(entries),
        maxlinaddr=maxlinaddr(entries),
        features=features(entries),
        kvm_signature=kvm_signature(entries),
        kvm_max_leaf=kvm_max_leaf(entries),
        kvm_features=kvm_features(entries),
    )


def format_table(entries: Iterable[Entry]) -> str:
    """One line per entry: function, index, flags, eax..edx in hex."""
    lines = []
    for e in entries:
        lines.append(
            f"{e.function:#010x}.{e.index:<2} flags={e.flags} "
            f"eax={e.eax:#010x} ebx={e.ebx:#010x} ecx={e.ecx:#010x} edx={e.edx:#010x}"
        )
    return "\n".join(lines)


def diff(
    a: Iterable[Entry], b: Iterable[Entry]
) -> dict[tuple[int, int], tuple[Entry | None, Entry | None]]:
    """Entries that differ between two tables, by (function, index): {key: (in a, in b)}."""
    ka, kb = by_key(a), by_key(b)
    out: dict[tuple[int, int], tuple[Entry | None, Entry | None]] = {}
    for key in sorted(set(ka) | set(kb)):
        x, y = ka.get(key), kb.get(key)
        if x is None or y is None or x != y:
            out[key] = (x, y)
    return out


def with_changes(
    entries: Iterable[Entry], changes: Mapping[tuple[int, int], Mapping[str, int]]
) -> list[Entry]:
    """A copy of the table with register values replaced, e.g. ``{(7, 0): {"ebx": 0}}``."""
    out = [copy_entry(e) for e in entries]
    for (function, index), values in changes.items():
        e = find(out, function, index)
        if e is None:
            raise KeyError(f"no CPUID entry {function:#x}.{index}")
        e.update(dict(values))
    return out


# ---------------------------------------------------------------------------
# ioctls
# ---------------------------------------------------------------------------


def _entries_of(buf: Any, n: int) -> list[Entry]:
    return [copy_entry(buf.entries[i]) for i in range(n)]


def get_supported_cpuid(
    transport: Transport, kvm_fd: int, nent: int = KVM_MAX_CPUID_ENTRIES
) -> list[Entry]:
    """KVM_GET_SUPPORTED_CPUID on the system descriptor, with room for ``nent`` entries
    (E2BIG if the table does not fit; nent above 256 is clamped by KVM)."""
    buf: Any = uapi.make_cpuid2(nent)
    transport.ioctl(kvm_fd, uapi.KVM_GET_SUPPORTED_CPUID, buf)
    return _entries_of(buf, min(int(buf.nent), nent))


def set_cpuid2(transport: Transport, vcpu_fd: int, entries: Sequence[Entry]) -> None:
    """KVM_SET_CPUID2: install ``entries`` as the vCPU's CPUID table."""
    transport.ioctl(vcpu_fd, uapi.KVM_SET_CPUID2, uapi.make_cpuid2(list(entries)))


def get_cpuid2(
    transport: Transport, vcpu_fd: int, nent: int = KVM_MAX_CPUID_ENTRIES
) -> list[Entry]:
    """KVM_GET_CPUID2: the vCPU's table (E2BIG if it has more than ``nent`` entries)."""
    buf: Any = uapi.make_cpuid2(nent)
    transport.ioctl(vcpu_fd, uapi.KVM_GET_CPUID2, buf)
    return _entries_of(buf, min(int(buf.nent), nent))


def cpuid2_nent(transport: Transport, fd: int, request: int, nent: int) -> tuple[int, int]:
    """Call a kvm_cpuid2 ioctl with room for ``nent`` entries; return (errno or 0, the header's
    nent afterwards). For probing the E2BIG and write-back rules."""
    buf: Any = uapi.make_cpuid2(nent)
    try:
        transport.ioctl(fd, request, buf)
    except OSError as e:
        return (e.errno or -1, int(buf.nent))
    return (0, int(buf.nent))
