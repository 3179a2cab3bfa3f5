"""The shared case table: bad and edge inputs, with the kernel's answer.

Each case runs on a fresh VM (and, when it needs one, a fresh vCPU) of one
backend. Its outcome is ``(errno, value)``: the errno of the failing call
(0 when every call succeeded) and, for cases that read state back, that value.
``expect`` is what the real /dev/kvm on these machines gives (see
reference/real-kvm-here.md, section 6, and docs/device-sregs.md); a case the
simulator deliberately answers differently carries ``sim_expect`` and the
reason in ``why``.
"""

from __future__ import annotations

import errno as E
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .. import uapi
from .._core import GuestMemory
from ..api import Kvm, Vcpu, Vm

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40


class Env:
    """A fresh VM on one backend, with guest memory and a lazily made vCPU."""

    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        self.vm: Vm = kvm.create_vm()
        self.mem = GuestMemory(64 * MiB)
        self._vcpu: Vcpu | None = None
        self._extra: list[Any] = []

    @property
    def vcpu(self) -> Vcpu:
        if self._vcpu is None:
            self._vcpu = self.vm.create_vcpu(0)
        return self._vcpu

    def memory(self, size: int) -> GuestMemory:
        m = GuestMemory(size)
        self._extra.append(m)
        return m

    def slot(self, slot: int, gpa: int, size: int, offset: int = 0, flags: int = 0) -> None:
        """SET_USER_MEMORY_REGION over this env's memory at ``offset``."""
        self.vm.set_user_memory_region(slot, gpa, size, self.mem.address + offset, flags)

    def raw_slot(self, slot: int, gpa: int, size: int, hva: int, flags: int = 0) -> None:
        self.vm.set_user_memory_region(slot, gpa, size, hva, flags)

    def close(self) -> None:
        if self._vcpu is not None:
            self._vcpu.close()
        self.vm.close()


@dataclass(frozen=True)
class Outcome:
    """What a case did: the errno of the failing call (0: all succeeded) and the value read
    back, if the case reads one."""

    errno: int
    value: Any = None

    def __str__(self) -> str:
        name = E.errorcode.get(self.errno, str(self.errno)) if self.errno else "ok"
        return name if self.value is None else f"{name} -> {self.value!r}"


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[Env], Any] = field(repr=False)
    expect: Outcome
    sim_expect: Outcome | None = None
    why: str = ""

    def expected(self, backend: str) -> Outcome:
        if backend == "sim" and self.sim_expect is not None:
            return self.sim_expect
        return self.expect

    def holds(self, got: Outcome, backend: str) -> bool:
        """Does ``got`` match the expectation? An expected value of None checks the errno
        only (the value is then compared between backends by the parity test)."""
        want = self.expected(backend)
        return got.errno == want.errno and (want.value is None or got.value == want.value)


def run_case(kvm: Kvm, case: Case) -> Outcome:
    env = Env(kvm)
    try:
        value = case.run(env)
        return Outcome(0, value)
    except OSError as e:
        return Outcome(e.errno or -1)
    finally:
        env.close()


def compare(sim: Kvm, dev: Kvm, cases: Iterable[Case] = ()) -> list[tuple[Case, Outcome, Outcome]]:
    """Run cases on both backends; return those whose outcomes differ."""
    from . import CASES as ALL  # noqa: PLC0415 - the package assembles the full table

    out = []
    for case in cases or ALL:
        a, b = run_case(sim, case), run_case(dev, case)
        if a != b:
            out.append((case, a, b))
    return out


OK = Outcome(0)


def errno_(e: int) -> Outcome:
    return Outcome(e)


def value(v: Any) -> Outcome:
    return Outcome(0, v)


# ---- memory slots (api.txt 4.34; real-kvm-here.md section 6) ----


def _twice(env: Env, *args: Any) -> None:
    env.slot(*args)
    env.slot(*args)


def _create_then(first: tuple[Any, ...], then: Callable[[Env], Any]) -> Callable[[Env], Any]:
    def run(env: Env) -> Any:
        env.slot(*first)
        return then(env)

    return run


def _region_ptr(ptr: int) -> Callable[[Env], Any]:
    return lambda env: env.vm.ioctl(uapi.KVM_SET_USER_MEMORY_REGION, ptr)


def _region2(**kw: Any) -> Callable[[Env], Any]:
    def run(env: Env) -> Any:
        r = uapi.kvm_userspace_memory_region2(
            slot=0,
            guest_phys_addr=0,
            memory_size=MiB,
            userspace_addr=env.mem.address,
            **kw,
        )
        env.vm.ioctl(uapi.KVM_SET_USER_MEMORY_REGION2, r)

    return run


def _slots_after(env: Env) -> list[tuple[int, int, int]]:
    return sorted((s, r.guest_phys_addr, r.memory_size) for s, r in env.vm.slots.items())


def _huge_slot(env: Env) -> None:
    m = env.memory(16 * TiB)
    env.raw_slot(0, 0, 16 * TiB, m.address)


def _move_onto(env: Env) -> None:
    env.slot(0, 0, MiB)
    env.slot(1, 4 * MiB, MiB, MiB)
    env.slot(1, MiB // 2, MiB, MiB)


def _delete_recreate(env: Env) -> None:
    env.slot(0, 0, MiB)
    env.slot(0, 0, 0)
    env.slot(0, 0, MiB, MiB)


def _toggle_logging(env: Env) -> None:
    env.slot(0, 0, MiB)
    env.slot(0, 0, MiB, 0, uapi.KVM_MEM_LOG_DIRTY_PAGES)
    env.slot(0, 0, MiB, 0, 0)


def _many_slots(env: Env) -> int:
    for i in range(512):
        env.slot(i, i * 2 * 4096, 4096, 4096 * i)
    return len(env.vm.slots)


MEMSLOT_CASES = [
    Case("slot create", lambda env: env.slot(0, 0, MiB), OK),
    Case("slot identical re-set", lambda env: _twice(env, 0, 0, MiB), OK),
    Case(
        "slot overlap partial",
        _create_then((0, 0, 2 * MiB), lambda env: env.slot(1, MiB, 2 * MiB, 2 * MiB)),
        errno_(E.EEXIST),
    ),
    Case(
        "slot overlap identical range",
        _create_then((0, 0, MiB), lambda env: env.slot(1, 0, MiB, MiB)),
        errno_(E.EEXIST),
    ),
    Case(
        "slot overlap contained",
        _create_then((0, 0, 4 * MiB), lambda env: env.slot(1, MiB, 4096, 8 * MiB)),
        errno_(E.EEXIST),
    ),
    Case(
        "slot adjacent",
        _create_then((0, 0, MiB), lambda env: env.slot(1, MiB, MiB, MiB)),
        OK,
    ),
    Case(
        "slot same hva in two slots",
        _create_then((0, 0, MiB), lambda env: env.slot(1, 8 * MiB, MiB, 0)),
        OK,
    ),
    Case("slot unaligned gpa", lambda env: env.slot(0, 0x800, MiB), errno_(E.EINVAL)),
    Case("slot unaligned size", lambda env: env.slot(0, 0, MiB + 1), errno_(E.EINVAL)),
    Case("slot unaligned hva", lambda env: env.slot(0, 0, MiB, 8), errno_(E.EINVAL)),
    Case(
        "slot kernel hva",
        lambda env: env.raw_slot(0, 0, MiB, 0xFFFF_8000_0000_0000),
        errno_(E.EINVAL),
    ),
    Case(
        "slot hva range wraps",
        lambda env: env.raw_slot(0, 0, 2 * MiB, (1 << 64) - MiB),
        errno_(E.EINVAL),
    ),
    Case("slot gpa at 2^52", lambda env: env.slot(0, 1 << 52, MiB), errno_(E.EINVAL)),
    Case(
        "slot gpa ending past 2^52",
        lambda env: env.slot(0, (1 << 52) - 4096, 8192),
        errno_(E.EINVAL),
    ),
    Case("slot gpa just below 2^52", lambda env: env.slot(0, (1 << 52) - 4096, 4096), OK),
    Case("slot gpa at 2^48", lambda env: env.slot(0, 1 << 48, MiB), OK),
    Case(
        "slot gpa+size overflows",
        lambda env: env.slot(0, (1 << 64) - 4096, 8192),
        errno_(E.EINVAL),
    ),
    Case("slot larger than KVM_MEM_MAX_NR_PAGES", _huge_slot, errno_(E.EINVAL)),
    Case(
        "slot grow",
        _create_then((0, 0, MiB), lambda env: env.slot(0, 0, 2 * MiB)),
        errno_(E.EINVAL),
    ),
    Case(
        "slot shrink",
        _create_then((0, 0, 2 * MiB), lambda env: env.slot(0, 0, MiB)),
        errno_(E.EINVAL),
    ),
    Case(
        "slot change hva",
        _create_then((0, 0, MiB), lambda env: env.slot(0, 0, MiB, MiB)),
        errno_(E.EINVAL),
    ),
    Case(
        "slot move",
        _create_then((0, 0, MiB), lambda env: (env.slot(0, 16 * MiB, MiB), _slots_after(env))[1]),
        value([(0, 16 * MiB, MiB)]),
    ),
    Case("slot move onto another slot", _move_onto, errno_(E.EEXIST)),
    Case("slot toggle LOG_DIRTY_PAGES", _toggle_logging, OK),
    Case(
        "slot set READONLY on existing",
        _create_then((0, 0, MiB), lambda env: env.slot(0, 0, MiB, 0, uapi.KVM_MEM_READONLY)),
        errno_(E.EINVAL),
    ),
    Case(
        "slot clear READONLY on existing",
        _create_then((0, 0, MiB, 0, uapi.KVM_MEM_READONLY), lambda env: env.slot(0, 0, MiB, 0, 0)),
        errno_(E.EINVAL),
    ),
    Case("slot id 32763", lambda env: env.slot(32763, 0, MiB), OK),
    Case("slot id 32764 (NR_MEMSLOTS)", lambda env: env.slot(32764, 0, MiB), errno_(E.EINVAL)),
    Case("slot address space 1", lambda env: env.slot(0x10000, 0, MiB), errno_(E.EINVAL)),
    Case(
        "slot flags GUEST_MEMFD via v1",
        lambda env: env.slot(0, 0, MiB, 0, 1 << 2),
        errno_(E.EINVAL),
    ),
    Case("slot flags 1<<3", lambda env: env.slot(0, 0, MiB, 0, 1 << 3), errno_(E.EINVAL)),
    Case("slot flags 1<<16", lambda env: env.slot(0, 0, MiB, 0, 1 << 16), errno_(E.EINVAL)),
    Case(
        "slot flags READONLY|LOG_DIRTY_PAGES",
        lambda env: env.slot(0, 0, MiB, 0, uapi.KVM_MEM_READONLY | uapi.KVM_MEM_LOG_DIRTY_PAGES),
        OK,
    ),
    Case(
        "slot delete existing (any gpa/hva)",
        _create_then((0, 0, MiB), lambda env: env.raw_slot(0, 0x1234000, 0, 0x5000)),
        OK,
    ),
    Case("slot delete never created", lambda env: env.slot(5, 0, 0), errno_(E.EINVAL)),
    Case("slot delete and recreate", _delete_recreate, OK),
    Case("slot 512 slots", _many_slots, value(512)),
    Case("slot NULL argument", _region_ptr(0), errno_(E.EFAULT)),
    Case("slot argument pointer 0x8", _region_ptr(8), errno_(E.EFAULT)),
    Case("slot region2 plain", _region2(), OK),
    Case("slot region2 pad2 != 0", _region2(pad2=(1,) * 14), OK),
    Case(
        "slot region2 GUEST_MEMFD fd 0",
        _region2(flags=uapi.KVM_MEM_GUEST_MEMFD, guest_memfd=0),
        errno_(E.EINVAL),
    ),
]


# ---- system, VM and vCPU file descriptors ----


def _vcpu_twice(env: Env) -> None:
    env.vm.create_vcpu(1)
    env.vm.create_vcpu(1)


def _closed_vcpu_id_reuse(env: Env) -> None:
    v = env.vm.create_vcpu(3)
    v.close()
    env.vm.create_vcpu(3)


FD_CASES = [
    Case("vcpu id 0", lambda env: env.vm.create_vcpu(0).id, value(0)),
    Case("vcpu duplicate id", _vcpu_twice, errno_(E.EEXIST)),
    Case("vcpu id reuse after close", _closed_vcpu_id_reuse, errno_(E.EEXIST)),
    Case("vcpu id 4095", lambda env: env.vm.create_vcpu(4095).id, value(4095)),
    Case("vcpu id 4096 (MAX_VCPU_ID)", lambda env: env.vm.create_vcpu(4096), errno_(E.EINVAL)),
    Case("vcpu id 2^32", lambda env: env.vm.create_vcpu(1 << 32), errno_(E.EINVAL)),
    Case("GET_REGS NULL", lambda env: env.vcpu.ioctl(uapi.KVM_GET_REGS, 0), errno_(E.EFAULT)),
    Case("SET_REGS NULL", lambda env: env.vcpu.ioctl(uapi.KVM_SET_REGS, 0), errno_(E.EFAULT)),
    Case("GET_SREGS 0x10", lambda env: env.vcpu.ioctl(uapi.KVM_GET_SREGS, 0x10), errno_(E.EFAULT)),
    Case("SET_SREGS 0x10", lambda env: env.vcpu.ioctl(uapi.KVM_SET_SREGS, 0x10), errno_(E.EFAULT)),
    Case(
        "SET_REGS kernel pointer",
        lambda env: env.vcpu.ioctl(uapi.KVM_SET_REGS, 0xFFFF_8000_0000_0000),
        errno_(E.EFAULT),
    ),
    Case(
        "unknown ioctl on vCPU",
        lambda env: env.vcpu.ioctl(uapi._IO(uapi.KVMIO, 0xFE), 0),
        errno_(E.EINVAL),
    ),
    Case(
        "unknown ioctl on VM",
        lambda env: env.vm.ioctl(uapi._IO(uapi.KVMIO, 0xFE), 0),
        errno_(E.ENOTTY),
    ),
    Case(
        "unknown ioctl on system",
        lambda env: env.kvm.ioctl(uapi._IO(uapi.KVMIO, 0xFE), 0),
        errno_(E.EINVAL),
    ),
    Case("foreign ioctl type on vCPU", lambda env: env.vcpu.ioctl(0x5401, 0), errno_(E.EINVAL)),
    Case(
        "CREATE_VCPU on system fd",
        lambda env: env.kvm.ioctl(uapi.KVM_CREATE_VCPU, 0),
        errno_(E.EINVAL),
    ),
    Case("GET_REGS on VM fd", lambda env: env.vm.ioctl(uapi.KVM_GET_REGS, 0), errno_(E.ENOTTY)),
    Case("CREATE_VM on VM fd", lambda env: env.vm.ioctl(uapi.KVM_CREATE_VM, 0), errno_(E.ENOTTY)),
    Case("CHECK_EXTENSION 99999", lambda env: env.kvm.check_extension(99999), value(0)),
    Case(
        "VM CHECK_EXTENSION USER_MEMORY",
        lambda env: env.vm.check_extension(uapi.KVM_CAP_USER_MEMORY),
        value(1),
    ),
    Case("CREATE_VM type 1", lambda env: env.kvm.create_vm(1), errno_(E.EINVAL)),
    Case("CREATE_VM type 99", lambda env: env.kvm.create_vm(99), errno_(E.EINVAL)),
    Case("GET_API_VERSION", lambda env: env.kvm.get_api_version(), value(12)),
    Case(
        "GET_API_VERSION arg 1",
        lambda env: env.kvm.ioctl(uapi.KVM_GET_API_VERSION, 1),
        errno_(E.EINVAL),
    ),
    Case("GET_VCPU_MMAP_SIZE", lambda env: env.kvm.get_vcpu_mmap_size(), value(12288)),
    Case(
        "GET_VCPU_MMAP_SIZE arg 1",
        lambda env: env.kvm.ioctl(uapi.KVM_GET_VCPU_MMAP_SIZE, 1),
        errno_(E.EINVAL),
    ),
]


# ---- KVM_SET_SREGS / KVM_SET_REGS validity and read-back (docs/device-sregs.md) ----

CR0_PE, CR0_PG, CR0_NW, CR0_CD = 1, 1 << 31, 1 << 29, 1 << 30
CR4_PAE, CR4_LA57, CR4_VMXE, CR4_PCIDE, CR4_PKE = 1 << 5, 1 << 12, 1 << 13, 1 << 17, 1 << 22
EFER_LME, EFER_LMA, EFER_NXE, EFER_SVME = 1 << 8, 1 << 10, 1 << 11, 1 << 12


def lm64(s: uapi.kvm_sregs) -> uapi.kvm_sregs:
    """A valid 64-bit long-mode state (flat segments, 4-level paging at CR3 0x1000)."""
    s.cs.update(dict(base=0, limit=0xFFFFFFFF, selector=8, type=11, present=1, s=1, l=1, g=1))
    for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
        seg.update(dict(base=0, limit=0xFFFFFFFF, selector=16, type=3, present=1, s=1, db=1, g=1))
    s.cr0, s.cr3, s.cr4, s.efer = 0x80050033, 0x1000, CR4_PAE, 0xD01
    return s


SREGS_READBACK = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")


def _sregs(
    change: Callable[[uapi.kvm_sregs], object], base: str = "reset", vcpu_id: int = 0
) -> Callable[[Env], Any]:
    """GET_SREGS, start from ``base``, apply ``change``, SET_SREGS, and read back."""

    def run(env: Env) -> Any:
        vcpu = env.vcpu if vcpu_id == 0 else env.vm.create_vcpu(vcpu_id)
        s = vcpu.get_sregs()
        if base == "lm64":
            lm64(s)
        change(s)
        vcpu.set_sregs(s)
        got = vcpu.get_sregs()
        return {f: hex(getattr(got, f)) for f in SREGS_READBACK} | {
            "cs.l": got.cs.l,
            "bitmap": [hex(w) for w in got.interrupt_bitmap],
        }

    return run


def _set(field: str, v: int) -> Callable[[uapi.kvm_sregs], None]:
    return lambda s: setattr(s, field, v)


def _or(field: str, v: int) -> Callable[[uapi.kvm_sregs], None]:
    return lambda s: setattr(s, field, getattr(s, field) | v)


def _andnot(field: str, v: int) -> Callable[[uapi.kvm_sregs], None]:
    return lambda s: setattr(s, field, getattr(s, field) & ~v)


def _reset_state(env: Env) -> Any:
    r, s = env.vcpu.get_regs(), env.vcpu.get_sregs()
    return (r.to_dict(), s.to_dict())


def _ap_apic_base(env: Env) -> int:
    return int(env.vm.create_vcpu(1).get_sregs().apic_base)


def _regs(change: Callable[[uapi.kvm_regs], object]) -> Callable[[Env], Any]:
    def run(env: Env) -> Any:
        r = env.vcpu.get_regs()
        change(r)
        env.vcpu.set_regs(r)
        return env.vcpu.get_regs().to_dict()

    return run


def _cr8_twice(s: uapi.kvm_sregs) -> None:
    s.cr8 = 5


def _pending_irq(s: uapi.kvm_sregs) -> None:
    s.interrupt_bitmap[1] = (1 << 3) | (1 << 9)  # vectors 67 and 73


def _cs_l(s: uapi.kvm_sregs) -> None:
    s.cs.l = 1


def _odd_segment(s: uapi.kvm_sregs) -> None:
    s.ds.type, s.ds.present, s.ds.dpl, s.ds.padding = 0x1F, 2, 4, 0xFF


def _sregs2_view(s2: uapi.kvm_sregs2) -> tuple[int, int]:
    return (int(s2.flags), int(s2.cr0))


def _sregs2_round_trip(env: Env) -> Any:
    s2 = env.vcpu.get_sregs2()
    lm = lm64(env.vcpu.get_sregs())
    for name in ("cs", "ds", "es", "fs", "gs", "ss"):
        setattr(s2, name, getattr(lm, name))
    s2.cr0, s2.cr3, s2.cr4, s2.efer = lm.cr0, lm.cr3, lm.cr4, lm.efer
    env.vcpu.set_sregs2(s2)
    got = env.vcpu.get_sregs2()
    assert got.to_bytes()[:280] == s2.to_bytes()[:280]
    return (int(got.flags), int(got.cr0), int(env.vcpu.get_sregs().efer))


def _sregs2_flags(flags: int, base: str) -> Callable[[Env], Any]:
    def run(env: Env) -> None:
        s2 = env.vcpu.get_sregs2()
        if base == "lm64":
            lm = lm64(env.vcpu.get_sregs())
            env.vcpu.set_sregs(lm)
            s2 = env.vcpu.get_sregs2()
        s2.flags = flags
        env.vcpu.set_sregs2(s2)

    return run


def _sregs2_pae(env: Env) -> Any:
    s2 = env.vcpu.get_sregs2()
    s2.cr0, s2.cr4, s2.cr3 = 0x80000011, CR4_PAE, 0x1000
    s2.flags = 1
    s2.pdptrs[0], s2.pdptrs[2] = 0x2001, 0x3001
    env.vcpu.set_sregs2(s2)
    got = env.vcpu.get_sregs2()
    return (int(got.flags), int(got.cr0), list(got.pdptrs))


def _cr8_ignored(env: Env) -> Any:
    _sregs(_cr8_twice)(env)
    return _sregs(_set("cr8", 0x17))(env)["cr8"]


def _legacy_paging(s: uapi.kvm_sregs) -> None:
    s.cr0 |= CR0_PG | CR0_PE
    s.cr3 = 0x1000


SREGS_CASES = [
    Case("vCPU reset state", _reset_state, OK),
    Case("AP apic_base", _ap_apic_base, value(0xFEE00800)),
    Case(
        "sregs long mode",
        _sregs(lambda s: None, "lm64"),
        value(
            {
                "cr0": "0x80050033",
                "cr2": "0x0",
                "cr3": "0x1000",
                "cr4": "0x20",
                "cr8": "0x0",
                "efer": "0xd01",
                "apic_base": "0xfee00900",
                "cs.l": 1,
                "bitmap": ["0x0"] * 4,
            }
        ),
    ),
    Case("sregs CS.L without LMA", _sregs(_cs_l), errno_(E.EINVAL)),
    Case("sregs LME+PG without LMA", _sregs(_andnot("efer", EFER_LMA), "lm64"), errno_(E.EINVAL)),
    Case("sregs LMA without PAE", _sregs(_andnot("cr4", CR4_PAE), "lm64"), errno_(E.EINVAL)),
    Case("sregs LMA without LME", _sregs(_andnot("efer", EFER_LME), "lm64"), errno_(E.EINVAL)),
    Case("sregs LMA without PG", _sregs(_andnot("cr0", CR0_PG), "lm64"), errno_(E.EINVAL)),
    Case("sregs PG without PE", _sregs(_set("cr0", CR0_PG | 0x10)), errno_(E.EINVAL)),
    Case("sregs CR0 bit 63", _sregs(_or("cr0", 1 << 63)), errno_(E.EINVAL)),
    Case("sregs CR0 bit 32", _sregs(_or("cr0", 1 << 32)), errno_(E.EINVAL)),
    Case("sregs CR0.NW without CD", _sregs(_set("cr0", CR0_NW | 0x11)), errno_(E.EINVAL)),
    Case("sregs CR0.NW with CD", _sregs(_set("cr0", CR0_NW | CR0_CD | 0x11)), OK),
    Case("sregs CR4 bit 31", _sregs(_or("cr4", 1 << 31)), errno_(E.EINVAL)),
    Case("sregs CR4.LA57", _sregs(_or("cr4", CR4_LA57)), errno_(E.EINVAL)),
    Case("sregs CR4.VMXE", _sregs(_or("cr4", CR4_VMXE)), errno_(E.EINVAL)),
    Case("sregs CR4.PCIDE", _sregs(_or("cr4", CR4_PCIDE), "lm64"), errno_(E.EINVAL)),
    Case("sregs CR4.PKE on a fresh vCPU", _sregs(_or("cr4", CR4_PKE), "lm64"), OK),
    Case("sregs CR3 bit 63 in long mode", _sregs(_or("cr3", 1 << 63), "lm64"), errno_(E.EINVAL)),
    Case("sregs CR3 bit 50 in long mode", _sregs(_or("cr3", 1 << 50), "lm64"), errno_(E.EINVAL)),
    Case(
        "sregs CR3 bit 36 in long mode (MAXPHYADDR 36 before SET_CPUID2)",
        _sregs(_or("cr3", 1 << 36), "lm64"),
        errno_(E.EINVAL),
    ),
    Case("sregs CR3 bit 35 in long mode", _sregs(_or("cr3", 1 << 35), "lm64"), OK),
    Case("sregs CR3 bit 63 without paging", _sregs(_or("cr3", 1 << 63)), OK),
    Case(
        "sregs EFER bit 20 kept",
        lambda env: _sregs(_or("efer", 1 << 20))(env)["efer"],
        value("0x100000"),
    ),
    Case(
        "sregs EFER.SVME kept",
        lambda env: _sregs(_or("efer", EFER_SVME))(env)["efer"],
        value("0x1000"),
    ),
    Case("sregs CR8 0x10 ignored", _cr8_ignored, value("0x5")),
    Case(
        "sregs apic_base 0x12345000 kept",
        lambda env: _sregs(_set("apic_base", 0x12345900))(env)["apic_base"],
        value("0x12345900"),
    ),
    Case("sregs apic_base reserved bit 0", _sregs(_or("apic_base", 1)), errno_(E.EINVAL)),
    Case(
        "sregs apic_base x2APIC before SET_CPUID2",
        _sregs(_or("apic_base", 1 << 10)),
        errno_(E.EINVAL),
    ),
    Case("sregs apic_base bit 36", _sregs(_or("apic_base", 1 << 36)), errno_(E.EINVAL)),
    Case(
        "sregs pending interrupt keeps lowest vector",
        lambda env: _sregs(_pending_irq)(env)["bitmap"],
        value(["0x0", "0x8", "0x0", "0x0"]),
    ),
    Case(
        "sregs raw segment bytes kept",
        lambda env: (_sregs(_odd_segment)(env), env.vcpu.get_sregs().ds.to_dict())[1],
        value(
            {
                "base": 0,
                "limit": 0xFFFF,
                "selector": 0,
                "type": 0x1F,
                "present": 2,
                "dpl": 4,
                "db": 0,
                "s": 1,
                "l": 0,
                "g": 0,
                "avl": 0,
                "unusable": 0,
                "padding": 0xFF,
            }
        ),
    ),
    Case(
        "sregs legacy 32-bit paging",
        lambda env: _sregs(_legacy_paging)(env)["cr0"],
        value("0x60000011"),
        sim_expect=value("0xe0000011"),
        why="the device's PVM module cannot run legacy paging and silently drops CR0.PG; the "
        "simulator keeps it, as KVM on hardware does (it implements 2-level and PAE paging)",
    ),
    Case(
        "sregs2 fresh vCPU", lambda env: _sregs2_view(env.vcpu.get_sregs2()), value((0, 0x60000010))
    ),
    Case("sregs2 long-mode round trip", _sregs2_round_trip, value((0, 0x80050033, 0xD01))),
    Case("sregs2 PDPTRS_VALID in long mode", _sregs2_flags(1, "lm64"), errno_(E.EINVAL)),
    Case("sregs2 unknown flag", _sregs2_flags(2, "reset"), errno_(E.EINVAL)),
    Case("sregs2 NULL", lambda env: env.vcpu.ioctl(uapi.KVM_SET_SREGS2, 0), errno_(E.EFAULT)),
    Case(
        "sregs2 PAE paging with PDPTRS_VALID",
        _sregs2_pae,
        value((0, 0x11, [0, 0, 0, 0])),
        sim_expect=value((1, 0x80000011, [0x2001, 0, 0x3001, 0])),
        why="the device's PVM module cannot run PAE paging: it drops CR0.PG and with it the "
        "PDPTEs; the simulator keeps PG and the given PDPTEs, as KVM on hardware",
    ),
    Case(
        "regs RFLAGS bit 1 forced, VM cleared",
        lambda env: _regs(lambda r: setattr(r, "rflags", 0x20000))(env)["rflags"],
        value(2),
    ),
    Case(
        "regs non-canonical RIP kept",
        lambda env: _regs(lambda r: setattr(r, "rip", 0x8000_0000_0000_0000))(env)["rip"],
        value(0x8000_0000_0000_0000),
    ),
]


# ---- VM-level state ioctls: ENABLE_CAP, TSS/identity map, NR_MMU_PAGES, stats ----


def _cap(target: str, cap: int, *args: int, flags: int = 0) -> Callable[[Env], Any]:
    def run(env: Env) -> None:
        obj = env.vm if target == "vm" else env.vcpu
        obj.enable_cap(cap, *args, flags=flags)

    return run


def _tss(addr: int) -> Callable[[Env], Any]:
    return lambda env: env.vm.set_tss_addr(addr)


def _tss_twice_after_vcpu(env: Env) -> None:
    env.vm.set_tss_addr(0xFFFBD000)
    _ = env.vcpu
    env.vm.set_tss_addr(0xFFFBD000)


def _tss_over_slot(env: Env) -> None:
    env.slot(0, 0xFFF00000, MiB)
    env.vm.set_tss_addr(0xFFFBD000)


def _idmap_after_vcpu(env: Env) -> None:
    _ = env.vcpu
    env.vm.set_identity_map_addr(0xFEFFC000)


def _stats_names(which: str, names: tuple[str, ...]) -> Callable[[Env], Any]:
    def run(env: Env) -> Any:
        stats = env.vm.stats() if which == "vm" else env.vcpu.stats()
        return {n: stats[n] for n in names}

    return run


def _stats_header(env: Env) -> Any:
    import os  # noqa: PLC0415 - only this case reads raw bytes
    import struct  # noqa: PLC0415

    fd = env.vcpu.get_stats_fd()
    try:
        flags, name_size, _, id_offset, desc_offset, _ = struct.unpack("<6I", os.pread(fd, 24, 0))
        ident = os.pread(fd, name_size, id_offset).split(b"\0")[0].decode()
        return (flags, name_size, id_offset, desc_offset, ident.endswith("/vcpu-0"))
    finally:
        env.kvm.transport.close(fd)


def _stats_fd_ioctl(env: Env) -> None:
    fd = env.vm.get_stats_fd()
    try:
        env.kvm.transport.ioctl(fd, uapi.KVM_GET_API_VERSION, 0)
    finally:
        env.kvm.transport.close(fd)


VM_STATE_CASES = [
    Case("ENABLE_CAP EXCEPTION_PAYLOAD", _cap("vm", uapi.KVM_CAP_EXCEPTION_PAYLOAD, 1), OK),
    Case("ENABLE_CAP EXCEPTION_PAYLOAD args 2", _cap("vm", uapi.KVM_CAP_EXCEPTION_PAYLOAD, 2), OK),
    Case("ENABLE_CAP EXCEPTION_PAYLOAD off", _cap("vm", uapi.KVM_CAP_EXCEPTION_PAYLOAD, 0), OK),
    Case(
        "ENABLE_CAP flags 1",
        _cap("vm", uapi.KVM_CAP_EXCEPTION_PAYLOAD, 1, flags=1),
        errno_(E.EINVAL),
    ),
    Case("ENABLE_CAP TRIPLE_FAULT_EVENT", _cap("vm", uapi.KVM_CAP_X86_TRIPLE_FAULT_EVENT, 1), OK),
    Case("ENABLE_CAP unknown cap", _cap("vm", 99999), errno_(E.EINVAL)),
    Case(
        "ENABLE_CAP not enableable (USER_MEMORY)",
        _cap("vm", uapi.KVM_CAP_USER_MEMORY, 1),
        errno_(E.EINVAL),
    ),
    Case("ENABLE_CAP NULL", lambda env: env.vm.ioctl(uapi.KVM_ENABLE_CAP, 0), errno_(E.EFAULT)),
    Case(
        "vCPU ENABLE_CAP EXCEPTION_PAYLOAD",
        _cap("vcpu", uapi.KVM_CAP_EXCEPTION_PAYLOAD, 1),
        errno_(E.EINVAL),
    ),
    Case("vCPU ENABLE_CAP flags 1", _cap("vcpu", 0, flags=1), errno_(E.EINVAL)),
    Case(
        "vCPU ENABLE_CAP NULL", lambda env: env.vcpu.ioctl(uapi.KVM_ENABLE_CAP, 0), errno_(E.EFAULT)
    ),
    Case("SET_TSS_ADDR 0xfffbd000", _tss(0xFFFBD000), OK),
    Case("SET_TSS_ADDR unaligned", _tss(0xFFFBD001), OK),
    Case("SET_TSS_ADDR 0", _tss(0), OK),
    Case("SET_TSS_ADDR 0xffffd000 (last)", _tss(0xFFFFD000), OK),
    Case("SET_TSS_ADDR 0xffffd001", _tss(0xFFFFD001), errno_(E.EINVAL)),
    Case("SET_TSS_ADDR 0xfffff000", _tss(0xFFFFF000), errno_(E.EINVAL)),
    Case("SET_TSS_ADDR 4 GiB", _tss(1 << 32), errno_(E.EINVAL)),
    Case("SET_TSS_ADDR twice, after a vCPU", _tss_twice_after_vcpu, OK),
    Case("SET_TSS_ADDR over a memory slot", _tss_over_slot, OK),
    Case("SET_IDENTITY_MAP_ADDR", lambda env: env.vm.set_identity_map_addr(0xFEFFC000), OK),
    Case(
        "SET_IDENTITY_MAP_ADDR NULL",
        lambda env: env.vm.ioctl(uapi.KVM_SET_IDENTITY_MAP_ADDR, 0),
        errno_(E.EFAULT),
    ),
    Case("SET_IDENTITY_MAP_ADDR after a vCPU", _idmap_after_vcpu, errno_(E.EINVAL)),
    Case("SET_NR_MMU_PAGES 63", lambda env: env.vm.set_nr_mmu_pages(63), errno_(E.EINVAL)),
    Case("SET_NR_MMU_PAGES 64", lambda env: env.vm.set_nr_mmu_pages(64), OK),
    Case("SET_NR_MMU_PAGES 2^40", lambda env: env.vm.set_nr_mmu_pages(1 << 40), OK),
    Case("GET_NR_MMU_PAGES (removed)", lambda env: env.vm.get_nr_mmu_pages(), errno_(E.ENOTTY)),
    Case(
        "GET_STATS_FD on system fd",
        lambda env: env.kvm.ioctl(uapi.KVM_GET_STATS_FD, 0),
        errno_(E.EINVAL),
    ),
    Case("stats fd takes no ioctls", _stats_fd_ioctl, errno_(E.ENOTTY)),
    Case("vCPU stats header", _stats_header, value((0, 48, 24, 72, True))),
    Case(
        "VM stats of a fresh VM",
        _stats_names(
            "vm",
            (
                "mmu_shadow_zapped",
                "mmu_unsync",
                "pages_4k",
                "pages_2m",
                "remote_tlb_flush",
                "max_mmu_rmap_size",
            ),
        ),
        value(
            dict.fromkeys(
                (
                    "mmu_shadow_zapped",
                    "mmu_unsync",
                    "pages_4k",
                    "pages_2m",
                    "remote_tlb_flush",
                    "max_mmu_rmap_size",
                ),
                0,
            )
        ),
    ),
    Case(
        "vCPU stats of a fresh vCPU",
        _stats_names(
            "vcpu",
            (
                "pf_taken",
                "pf_fixed",
                "pf_guest",
                "pf_emulate",
                "exits",
                "insn_emulation",
                "mmio_exits",
                "io_exits",
            ),
        ),
        value(
            dict.fromkeys(
                (
                    "pf_taken",
                    "pf_fixed",
                    "pf_guest",
                    "pf_emulate",
                    "exits",
                    "insn_emulation",
                    "mmio_exits",
                    "io_exits",
                ),
                0,
            )
        ),
    ),
]

CASES: list[Case] = MEMSLOT_CASES + FD_CASES + SREGS_CASES + VM_STATE_CASES
