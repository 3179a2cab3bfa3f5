"""asv benchmarks: the ioctl path of the simulator next to the real /dev/kvm.

Every ``time_*`` benchmark is parametrized over the backend: ``sim`` is the
software /dev/kvm (``kvmmmu.Kvm()``), ``dev`` the machine's KVM
(``kvmmmu.Kvm("/dev/kvm")``); where the device is unusable, ``setup`` raises
``NotImplementedError``, which is asv's way of skipping a benchmark.

asv re-runs ``setup``/``teardown`` before every sample (and, in recent
versions, around every timed call), so the hot-path benchmarks keep one VM and
vCPU per process and backend, created on first use in the benchmark's own
process (a KVM VM belongs to the process that created it), and take many
one-call samples.

``track_*`` benchmarks measure both backends in one process, interleaved, and
report the simulator's time per call divided by the device's (``unit =
"ratio"``: below 1 the simulator is faster), and the absolute time per call.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import kvmmmu
from kvmmmu import uapi

BACKENDS = ["sim", "dev"]
DEVICE = os.environ.get("KVMMMU_DEVICE", "/dev/kvm")  # as in tests/conftest.py
SLOTS = 100

# ---------------------------------------------------------------- shared state

_DEVICE_PROBLEM: list[str | None] = []
_RIGS: dict[str, Rig] = {}


def device_problem() -> str | None:
    """None if /dev/kvm is usable here, else why not (probed once per process)."""
    if not _DEVICE_PROBLEM:
        _DEVICE_PROBLEM.append(kvmmmu.device_available(DEVICE))
    return _DEVICE_PROBLEM[0]


def make_kvm(backend: str) -> kvmmmu.Kvm:
    if backend == "sim":
        return kvmmmu.Kvm()
    problem = device_problem()
    if problem is not None:
        raise NotImplementedError(f"no usable KVM device: {problem}")
    return kvmmmu.Kvm(DEVICE)


class Rig:
    """One backend's objects for the hot-path benchmarks: a Kvm, a VM, vCPU 0,
    preallocated structs and guest memory for memory slots."""

    def __init__(self, backend: str) -> None:
        self.kvm = make_kvm(backend)
        self.transport = self.kvm.transport
        self.sys_fd = self.kvm.fd
        self.vm = self.kvm.create_vm()
        self.vcpu = self.vm.create_vcpu(0)
        self.vcpu_fd = self.vcpu.fd
        self.regs = uapi.kvm_regs()
        self.sregs = self.vcpu.get_sregs()
        self.memory = kvmmmu.GuestMemory(SLOTS * 4096)


def rig(backend: str) -> Rig:
    """The process's rig for ``backend`` (NotImplementedError: no usable device)."""
    if backend not in _RIGS:
        _RIGS[backend] = Rig(backend)
    return _RIGS[backend]


# ---------------------------------------------------------------- time_*


class IoctlRoundTrip:
    """One ioctl through the whole stack: Python API or raw transport, on each backend."""

    params = BACKENDS
    param_names = ["backend"]
    # One call per sample (setup runs before each sample and is a lookup), many samples.
    number = 1
    repeat = (200, 2000, 2.0)

    def setup(self, backend: str) -> None:
        self.rig = rig(backend)

    def teardown(self, backend: str) -> None:
        pass  # the rig lives for the whole process

    def time_get_regs(self, backend: str) -> None:
        """KVM_GET_REGS through ``vcpu.get_regs()`` (allocates the struct)."""
        self.rig.vcpu.get_regs()

    def time_get_regs_raw(self, backend: str) -> None:
        """KVM_GET_REGS through ``transport.ioctl`` into a preallocated ctypes struct."""
        r = self.rig
        r.transport.ioctl(r.vcpu_fd, uapi.KVM_GET_REGS, r.regs)

    def time_get_sregs(self, backend: str) -> None:
        self.rig.vcpu.get_sregs()

    def time_set_sregs(self, backend: str) -> None:
        """KVM_SET_SREGS of the vCPU's own state (preallocated)."""
        self.rig.vcpu.set_sregs(self.rig.sregs)

    def time_sregs_round_trip(self, backend: str) -> None:
        """KVM_GET_SREGS then KVM_SET_SREGS of the result."""
        vcpu = self.rig.vcpu
        vcpu.set_sregs(vcpu.get_sregs())

    def time_check_extension(self, backend: str) -> None:
        """KVM_CHECK_EXTENSION(KVM_CAP_USER_MEMORY) on the system fd."""
        self.rig.kvm.check_extension(uapi.KVM_CAP_USER_MEMORY)

    def time_check_extension_raw(self, backend: str) -> None:
        r = self.rig
        r.transport.ioctl(r.sys_fd, uapi.KVM_CHECK_EXTENSION, uapi.KVM_CAP_USER_MEMORY)


class VmLifecycle:
    """KVM_CREATE_VM and closing the VM fd."""

    params = BACKENDS
    param_names = ["backend"]
    repeat = (10, 200, 5.0)

    def setup(self, backend: str) -> None:
        self.kvm = rig(backend).kvm

    def teardown(self, backend: str) -> None:
        pass

    def time_create_destroy_vm(self, backend: str) -> None:
        self.kvm.create_vm().close()


class MemslotCreate:
    """100 KVM_SET_USER_MEMORY_REGION calls creating one-page slots in a fresh VM."""

    params = BACKENDS
    param_names = ["backend"]
    repeat = (10, 100, 10.0)

    def setup(self, backend: str) -> None:
        self.vm: kvmmmu.Vm | None = None  # teardown runs even when setup skips
        r = rig(backend)
        self.vm = r.kvm.create_vm()
        self.base = r.memory.address

    def teardown(self, backend: str) -> None:
        if self.vm is not None:
            self.vm.close()

    def time_create_100_slots(self, backend: str) -> None:
        vm, base = self.vm, self.base
        assert vm is not None
        for i in range(SLOTS):
            vm.set_user_memory_region(i, i * 0x10000, 4096, base + i * 4096)


# ---------------------------------------------------------------- track_*


def _per_call_s(fn: Callable[[], Any], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


_MEASURED: dict[str, dict[str, float]] = {}


def measure(kind: str, rounds: int = 31, calls: int = 2000) -> dict[str, float]:
    """Seconds per KVM_GET_REGS on each backend: ``rounds`` interleaved batches of
    ``calls`` calls per backend, median per backend (once per process and kind)."""
    if kind in _MEASURED:
        return _MEASURED[kind]
    rigs = {b: rig(b) for b in BACKENDS}
    if kind == "api":
        fns = {b: r.vcpu.get_regs for b, r in rigs.items()}
    else:
        fns = {
            b: (lambda r=r: r.transport.ioctl(r.vcpu_fd, uapi.KVM_GET_REGS, r.regs))
            for b, r in rigs.items()
        }
    for fn in fns.values():
        _per_call_s(fn, calls // 10)  # warm up
    samples: dict[str, list[float]] = {b: [] for b in BACKENDS}
    for i in range(rounds):
        order = BACKENDS if i % 2 == 0 else BACKENDS[::-1]
        for b in order:
            samples[b].append(_per_call_s(fns[b], calls))
    _MEASURED[kind] = {b: statistics.median(s) for b, s in samples.items()}
    return _MEASURED[kind]


class GetRegsSimOverDev:
    """KVM_GET_REGS: the simulator's time per call over the device's, measured in
    the same process, interleaved (medians of 31 batches of 2000 calls)."""

    unit = "ratio"
    timeout = 120

    def setup(self) -> None:
        for b in BACKENDS:
            rig(b)

    def track_get_regs_ratio(self) -> float:
        """Through ``vcpu.get_regs()``."""
        m = measure("api")
        return m["sim"] / m["dev"]

    def track_get_regs_raw_ratio(self) -> float:
        """Through ``transport.ioctl`` into a preallocated struct."""
        m = measure("raw")
        return m["sim"] / m["dev"]

    def track_get_regs_sim_us(self) -> float:
        return measure("api")["sim"] * 1e6

    track_get_regs_sim_us.unit = "us"  # type: ignore[attr-defined]

    def track_get_regs_dev_us(self) -> float:
        return measure("api")["dev"] * 1e6

    track_get_regs_dev_us.unit = "us"  # type: ignore[attr-defined]

    def track_get_regs_raw_sim_us(self) -> float:
        return measure("raw")["sim"] * 1e6

    track_get_regs_raw_sim_us.unit = "us"  # type: ignore[attr-defined]

    def track_get_regs_raw_dev_us(self) -> float:
        return measure("raw")["dev"] * 1e6

    track_get_regs_raw_dev_us.unit = "us"  # type: ignore[attr-defined]


# ---------------------------------------------------------------- memory


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * 4


class HugeGuestMemory:
    """16 TiB of guest memory is a MAP_NORESERVE mapping: it costs nothing until touched."""

    SIZE = 16 << 40

    def peakmem_guest_memory_16tib(self) -> None:
        mem = kvmmmu.GuestMemory(self.SIZE)
        mem.write(self.SIZE // 2, b"x")  # one touched page
        mem.close()

    def peakmem_guest_memory_16tib_sim_slot(self) -> None:
        """The same memory behind the largest slot (2**31 - 1 pages) of a simulated VM."""
        mem = kvmmmu.GuestMemory(self.SIZE)
        with kvmmmu.Kvm() as kvm, kvm.create_vm() as vm:
            vm.set_user_memory_region(0, 0, ((1 << 31) - 1) * 4096, mem)
        mem.close()

    def track_guest_memory_16tib_rss_delta(self) -> int:
        """Resident memory added by creating 16 TiB of guest memory and touching a page."""
        before = _rss_kib()
        mem = kvmmmu.GuestMemory(self.SIZE)
        mem.write(self.SIZE // 2, b"x")
        delta = _rss_kib() - before
        mem.close()
        return delta

    track_guest_memory_16tib_rss_delta.unit = "KiB"  # type: ignore[attr-defined]


# ---------------------------------------------------------------- guest page-table walks


class WalkRig:
    """A simulated 4-level guest mapping PAGES distinct 4 KiB pages (tables built with
    numpy straight into guest memory), and a pseudo-random order over them."""

    PAGES = 1 << 16

    def __init__(self) -> None:
        import numpy as np  # noqa: PLC0415 - only the walk benchmarks need it

        self.kvm = kvmmmu.Kvm()
        self.vm = self.kvm.create_vm()
        self.mem = kvmmmu.GuestMemory(512 << 20)
        self.vm.set_user_memory_region(0, 0, self.mem.size, self.mem)
        q = np.frombuffer(self.mem, dtype=np.uint64)
        pml4, pdpt, pd, pt0 = 0x10_0000, 0x10_1000, 0x10_2000, 0x20_0000
        flags = 0x7 | 0x20  # P|W|U|A: later walks write nothing
        q[pml4 // 8] = pdpt | flags
        q[pdpt // 8] = pd | flags
        n_pt = self.PAGES // 512
        q[pd // 8 : pd // 8 + n_pt] = pt0 + 4096 * np.arange(n_pt, dtype=np.uint64) | flags
        pages = np.arange(self.PAGES, dtype=np.uint64)
        q[pt0 // 8 : pt0 // 8 + self.PAGES] = (0x400_0000 + pages * 4096) | flags
        del q
        self.vcpu = self.vm.create_vcpu(0)
        s = self.vcpu.get_sregs()
        s.cr3, s.cr4, s.efer, s.cr0, s.cs.l = pml4, 0x20, 0xD00, 0x80010011, 1
        self.vcpu.set_sregs(s)
        order = (np.arange(self.PAGES, dtype=np.uint64) * np.uint64(40503)) % np.uint64(self.PAGES)
        self.gvas = order * np.uint64(4096) + np.uint64(0x18)
        self.mmu = self.vcpu.mmu


_WALK: list[WalkRig] = []


def walk_rig() -> WalkRig:
    if not _WALK:
        _WALK.append(WalkRig())
    return _WALK[0]


class GuestWalk:
    """The simulator-only walker from Python: one detailed walk, and the batch form."""

    def setup(self) -> None:
        self.rig = walk_rig()

    def time_walk_single(self) -> None:
        self.rig.mmu.walk(0x18)

    def time_walk_many_65536(self) -> None:
        self.rig.mmu.walk_many(self.rig.gvas)

    def track_walk_many_mwalks_per_s(self) -> float:
        """Cold 4-level walks per second through walk_many (median of 15 batches)."""
        times = []
        for _ in range(15):
            t0 = time.perf_counter()
            self.rig.mmu.walk_many(self.rig.gvas)
            times.append(time.perf_counter() - t0)
        return len(self.rig.gvas) / statistics.median(times) / 1e6

    track_walk_many_mwalks_per_s.unit = "Mwalks/s"  # type: ignore[attr-defined]

    def track_walk_single_us(self) -> float:
        """Python-to-Rust overhead of one detailed walk (median of 15 x 2000 calls)."""
        return _per_call_s(lambda: self.rig.mmu.walk(0x18), 2000) * 1e6

    track_walk_single_us.unit = "us"  # type: ignore[attr-defined]
