"""CPUID cases: KVM_GET_SUPPORTED_CPUID, KVM_SET_CPUID2, KVM_GET_CPUID2 (docs/device-cpuid.md).

Raw ioctls on ctypes buffers, so each case is what a VMM does. Values that depend on the
host CPU (the device's table) are kept out of the compared values; where the simulator
answers differently on purpose the case carries ``sim_expect`` and ``why``.
"""

from __future__ import annotations

import errno as E
from collections.abc import Callable, Sequence
from typing import Any

from .. import uapi
from .cases import OK, Case, Env, errno_, value

KVM_SIGNATURE = 0x40000000
KVM_FEATURES = 0x40000001
SIG_REGS = (0x4B4D564B, 0x564B4D56, 0x4D)  # "KVMKVMKVM\0\0\0"
KVM_HOST_FEATURES = 0x01007EFB
SIM_KVM_FEATURES = 1 << uapi.KVM_FEATURE_NOP_IO_DELAY
INDEXED = {4, 7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1D, 0x1E, 0x1F, 0x24, 0x8000001D}
CR4_PAE, CR4_OSXSAVE, CR4_SMEP = 1 << 5, 1 << 18, 1 << 20
APIC_BASE_EN = 1 << 11


def _e(function: int, index: int = 0, flags: int = 0, *regs: int) -> uapi.kvm_cpuid_entry2:
    eax, ebx, ecx, edx = (*regs, 0, 0, 0, 0)[:4]
    return uapi.kvm_cpuid_entry2(
        function=function, index=index, flags=flags, eax=eax, ebx=ebx, ecx=ecx, edx=edx
    )


def _kvm_leaves(features: int = KVM_HOST_FEATURES) -> list[uapi.kvm_cpuid_entry2]:
    return [_e(KVM_SIGNATURE, 0, 0, KVM_FEATURES, *SIG_REGS), _e(KVM_FEATURES, 0, 0, features)]


def _buf(nent: int, room: int | None = None, padding: int = 0) -> Any:
    buf: Any = uapi.make_cpuid2(nent if room is None else room)
    buf.nent, buf.padding = nent, padding
    return buf


def _entries(buf: Any) -> list[uapi.kvm_cpuid_entry2]:
    return [buf.entries[i] for i in range(buf.nent)]


def _row(e: uapi.kvm_cpuid_entry2) -> list[str]:
    return [hex(v) for v in (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)]


def _supported(env: Env, room: int = 256) -> list[uapi.kvm_cpuid_entry2]:
    buf = _buf(room)
    env.kvm.ioctl(uapi.KVM_GET_SUPPORTED_CPUID, buf)
    return _entries(buf)


def _leaf(entries: Sequence[uapi.kvm_cpuid_entry2], function: int) -> uapi.kvm_cpuid_entry2:
    return next(e for e in entries if e.function == function)


def _set(env: Env, entries: Sequence[uapi.kvm_cpuid_entry2]) -> None:
    env.vcpu.ioctl(uapi.KVM_SET_CPUID2, uapi.make_cpuid2(list(entries)))


def _get(env: Env, room: int = 64) -> list[uapi.kvm_cpuid_entry2]:
    buf = _buf(room)
    env.vcpu.ioctl(uapi.KVM_GET_CPUID2, buf)
    return _entries(buf)


def _errno_and_nent(call: Callable[[Any], Any], buf: Any) -> dict[str, Any]:
    """Run a call that should fail; report its errno name and the header's nent afterwards."""
    try:
        call(buf)
    except OSError as err:
        return {"errno": E.errorcode.get(err.errno or 0, str(err.errno)), "nent": int(buf.nent)}
    return {"errno": "ok", "nent": int(buf.nent)}


# ---- KVM_GET_SUPPORTED_CPUID ----


def _supported_nent(nent: int) -> Callable[[Env], Any]:
    return lambda env: env.kvm.ioctl(uapi.KVM_GET_SUPPORTED_CPUID, _buf(nent, max(nent, 1)))


def _supported_small_kept(env: Env) -> Any:
    return _errno_and_nent(
        lambda b: env.kvm.ioctl(uapi.KVM_GET_SUPPORTED_CPUID, b), _buf(1, padding=7)
    )


def _supported_clamped(env: Env) -> Any:
    buf = _buf(100_000, room=256, padding=0xDEAD)
    env.kvm.ioctl(uapi.KVM_GET_SUPPORTED_CPUID, buf)
    last = buf.entries[buf.nent - 1]
    return {
        "nent <= 256": buf.nent <= 256,
        "last": hex(last.function),
        "padding": hex(buf.padding),
    }


def _supported_signature(env: Env) -> Any:
    return _row(_leaf(_supported(env), KVM_SIGNATURE))


def _supported_txt_bits(env: Env) -> Any:
    e = _leaf(_supported(env), KVM_FEATURES)
    bit = lambda name: e.eax >> getattr(uapi, f"KVM_FEATURE_{name}") & 1  # noqa: E731
    return {"NOP_IO_DELAY": bit("NOP_IO_DELAY"), "MMU_OP": bit("MMU_OP"), "ebx,ecx,edx": 0}


def _supported_features_eax(env: Env) -> Any:
    return hex(_leaf(_supported(env), KVM_FEATURES).eax)


def _supported_flags(env: Env) -> Any:
    bad = [
        hex(e.function)
        for e in _supported(env)
        if e.flags != (1 if e.function in INDEXED else 0) or list(e.padding) != [0, 0, 0]
    ]
    return bad


def _supported_order(env: Env) -> Any:
    t = _supported(env)
    return [hex(t[0].function)] + [hex(e.function) for e in t[-2:]]


SUPPORTED_CASES = [
    Case("cpuid supported nent 0", _supported_nent(0), errno_(E.E2BIG)),
    Case("cpuid supported nent 1", _supported_nent(1), errno_(E.E2BIG)),
    Case(
        "cpuid supported E2BIG leaves nent alone",
        _supported_small_kept,
        value({"errno": "E2BIG", "nent": 1}),
    ),
    Case(
        "cpuid supported nent 100000 clamped to 256",
        _supported_clamped,
        value({"nent <= 256": True, "last": "0x40000001", "padding": "0xdead"}),
    ),
    Case(
        "cpuid supported NULL pointer",
        lambda env: env.kvm.ioctl(uapi.KVM_GET_SUPPORTED_CPUID, 0),
        errno_(E.EFAULT),
    ),
    Case(
        "cpuid supported KVM_CPUID_SIGNATURE",
        _supported_signature,
        value(["0x40000000", "0x0", "0x0", "0x40000001", "0x4b4d564b", "0x564b4d56", "0x4d"]),
    ),
    Case(
        "cpuid supported cpuid.txt feature bits",
        _supported_txt_bits,
        value({"NOP_IO_DELAY": 1, "MMU_OP": 0, "ebx,ecx,edx": 0}),
    ),
    Case(
        "cpuid supported KVM_CPUID_FEATURES.EAX",
        _supported_features_eax,
        value(hex(KVM_HOST_FEATURES)),
        sim_expect=value(hex(SIM_KVM_FEATURES)),
        why="the simulator has no kvmclock, async PF, steal time, PV EOI/TLB flush/IPI or other "
        "PV interface, so it claims only NOP_IO_DELAY",
    ),
    Case("cpuid supported index flags", _supported_flags, value([])),
    Case(
        "cpuid supported order (leaf 0 first, KVM leaves last)",
        _supported_order,
        value(["0x0", "0x40000000", "0x40000001"]),
    ),
    Case(
        "cpuid supported on a vCPU fd",
        lambda env: env.vcpu.ioctl(uapi.KVM_GET_SUPPORTED_CPUID, _buf(256)),
        errno_(E.EINVAL),
    ),
]


# ---- KVM_SET_CPUID2 / KVM_GET_CPUID2 ----


def _set_nent(nent: int) -> Callable[[Env], Any]:
    return lambda env: env.vcpu.ioctl(uapi.KVM_SET_CPUID2, _buf(nent, room=0))


def _set_empty(env: Env) -> Any:
    _set(env, [])
    return len(_get(env))


def _l8(vaddr: int, phys: int = 40) -> uapi.kvm_cpuid_entry2:
    return _e(0x80000008, 0, 0, vaddr << 8 | phys)


def _round_trip(env: Env) -> Any:
    table = [*_kvm_leaves(0x12345), _e(0x4FFF0000, 3, 1, 5, 6, 7, 8)]
    _set(env, table)
    return [_row(e) for e in _get(env)]


def _duplicates(env: Env) -> Any:
    _set(env, [*_kvm_leaves(), *_kvm_leaves(0)])
    return [hex(e.eax) for e in _get(env)]


def _failed_set_keeps(env: Env) -> Any:
    _set(env, _kvm_leaves())
    try:
        _set(env, [_l8(40)])
    except OSError:
        pass
    return [_row(e) for e in _get(env)]


def _get_fresh(env: Env) -> Any:
    buf = _buf(4)
    env.vcpu.ioctl(uapi.KVM_GET_CPUID2, buf)
    return int(buf.nent)


def _get_small(env: Env) -> Any:
    _set(env, _kvm_leaves())
    return _errno_and_nent(lambda b: env.vcpu.ioctl(uapi.KVM_GET_CPUID2, b), _buf(1))


def _get_written_back(env: Env) -> Any:
    _set(env, _kvm_leaves())
    buf = _buf(40, padding=0xABCD)
    env.vcpu.ioctl(uapi.KVM_GET_CPUID2, buf)
    return [int(buf.nent), hex(buf.padding)]


def _leaf1_bits(env: Env) -> tuple[int, int]:
    e = next(e for e in _get(env) if e.function == 1)
    return (e.ecx >> 27 & 1, e.edx >> 9 & 1)  # OSXSAVE, APIC


def _osxsave_follows_cr4(env: Env) -> Any:
    _set(env, [_e(1, 0, 0, 0x806F8, 0, 1 << 26 | 1 << 27, 0)])  # XSAVE | OSXSAVE
    before = _leaf1_bits(env)[0]
    s = env.vcpu.get_sregs()
    s.cr4 |= CR4_OSXSAVE
    env.vcpu.set_sregs(s)
    return [before, _leaf1_bits(env)[0]]


def _apic_follows_apic_base(env: Env) -> Any:
    _set(env, [_e(1, 0, 0, 0x806F8)])
    before = _leaf1_bits(env)[1]
    s = env.vcpu.get_sregs()
    s.apic_base &= ~APIC_BASE_EN
    env.vcpu.set_sregs(s)
    return [before, _leaf1_bits(env)[1]]


def _maxphyaddr_gates_cr3(env: Env) -> Any:
    _set(env, [_e(0x80000000, 0, 0, 0x80000008), _l8(48, 40)])
    s = env.vcpu.get_sregs()
    s.cs.update(dict(base=0, limit=0xFFFFFFFF, selector=8, type=11, present=1, s=1, l=1, g=1))
    s.cr0, s.cr4, s.efer = 0x80050033, CR4_PAE, 0xD01
    out = {}
    for bit in (39, 40):
        s.cr3 = 1 << bit
        try:
            env.vcpu.set_sregs(s)
            out[f"cr3 bit {bit}"] = "ok"
        except OSError as err:
            out[f"cr3 bit {bit}"] = E.errorcode.get(err.errno or 0, "?")
    return out


def _x2apic_without_cpuid(env: Env) -> Any:
    _set(env, _kvm_leaves())
    s = env.vcpu.get_sregs()
    s.apic_base = 0xFEE00D00
    env.vcpu.set_sregs(s)


def _leaf1_read_back(env: Env) -> Any:
    _set(env, [_e(0, 0, 0, 1, 0x756E6547, 0x6C65746E, 0x49656E69), _e(1, 0, 0, 0x806F8)])
    return [_row(e) for e in _get(env) if e.function == 1]


def _smep_without_cpuid(env: Env) -> Any:
    _set(env, _kvm_leaves())
    s = env.vcpu.get_sregs()
    s.cr4 = CR4_SMEP
    env.vcpu.set_sregs(s)


VCPU_CASES = [
    Case("cpuid SET nent 257", _set_nent(257), errno_(E.E2BIG)),
    Case("cpuid SET nent 100000", _set_nent(100_000), errno_(E.E2BIG)),
    Case(
        "cpuid SET NULL pointer",
        lambda env: env.vcpu.ioctl(uapi.KVM_SET_CPUID2, 0),
        errno_(E.EFAULT),
    ),
    Case("cpuid SET empty table", _set_empty, value(0)),
    Case("cpuid SET linear width 40", lambda env: _set(env, [_l8(40)]), errno_(E.EINVAL)),
    Case("cpuid SET linear width 57", lambda env: _set(env, [_l8(57)]), OK),
    Case("cpuid SET linear width 0", lambda env: _set(env, [_l8(0)]), OK),
    Case(
        "cpuid SET only the first 0x80000008 is checked",
        lambda env: _set(env, [_l8(48), _l8(40)]),
        OK,
    ),
    Case(
        "cpuid SET MAXPHYADDR 255 not validated",
        lambda env: _set(env, [_l8(48, 255)]),
        OK,
    ),
    Case(
        "cpuid SET XTILE_DATA without permission",
        lambda env: _set(env, [_e(0xD, 0, 1, 0x60003)]),
        errno_(E.EPERM),
    ),
    Case(
        "cpuid SET duplicates kept",
        _duplicates,
        value(["0x40000001", "0x1007efb", "0x40000001", "0x0"]),
    ),
    Case(
        "cpuid SET/GET KVM leaves round trip",
        _round_trip,
        value(
            [
                ["0x40000000", "0x0", "0x0", "0x40000001", "0x4b4d564b", "0x564b4d56", "0x4d"],
                ["0x40000001", "0x0", "0x0", "0x12345", "0x0", "0x0", "0x0"],
                ["0x4fff0000", "0x3", "0x1", "0x5", "0x6", "0x7", "0x8"],
            ]
        ),
    ),
    Case(
        "cpuid failed SET keeps the table",
        _failed_set_keeps,
        value(
            [
                ["0x40000000", "0x0", "0x0", "0x40000001", "0x4b4d564b", "0x564b4d56", "0x4d"],
                ["0x40000001", "0x0", "0x0", "0x1007efb", "0x0", "0x0", "0x0"],
            ]
        ),
    ),
    Case("cpuid GET on a fresh vCPU", _get_fresh, value(0)),
    Case(
        "cpuid GET too small: E2BIG, nent not written back",
        _get_small,
        value({"errno": "E2BIG", "nent": 1}),
    ),
    Case("cpuid GET writes nent back", _get_written_back, value([2, "0xabcd"])),
    Case(
        "cpuid GET NULL pointer",
        lambda env: env.vcpu.ioctl(uapi.KVM_GET_CPUID2, 0),
        errno_(E.EFAULT),
    ),
    Case("cpuid GET OSXSAVE follows CR4", _osxsave_follows_cr4, value([0, 1])),
    Case("cpuid GET APIC follows APIC_BASE.EN", _apic_follows_apic_base, value([1, 0])),
    Case(
        "cpuid MAXPHYADDR from SET_CPUID2 gates CR3",
        _maxphyaddr_gates_cr3,
        value({"cr3 bit 39": "ok", "cr3 bit 40": "EINVAL"}),
    ),
    Case("cpuid x2APIC refused without X2APIC", _x2apic_without_cpuid, errno_(E.EINVAL)),
    Case(
        "cpuid SET leaf 1 read back",
        _leaf1_read_back,
        OK,
        sim_expect=value([["0x1", "0x0", "0x0", "0x806f8", "0x0", "0x0", "0x200"]]),
        why="the device's PVM module rewrites the table given to KVM_SET_CPUID2 into host-like "
        "values; the simulator stores it as KVM on hardware does (only the runtime APIC bit, "
        "from APIC_BASE.EN, changes)",
    ),
    Case(
        "cpuid CR4.SMEP after SET_CPUID2 without SMEP",
        _smep_without_cpuid,
        OK,
        sim_expect=errno_(E.EINVAL),
        why="the device accepts CR4.SMEP whatever the guest CPUID says (PVM); the kernel, and the "
        "simulator, reject a CR4 feature bit the guest CPUID lacks",
    ),
]

CPUID_CASES: list[Case] = SUPPORTED_CASES + VCPU_CASES
