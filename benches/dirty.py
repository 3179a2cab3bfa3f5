"""asv benchmarks of dirty logging, phase by phase, simulator next to /dev/kvm.

Slots of 1 GiB, 64 GiB and 1 TiB (slot 1 at gpa 1 GiB; a 2 MiB slot 0 holds the
simulator guest's page tables), driven by raw ioctls through each backend's
transport (``vm.ioctl(uapi.KVM_GET_DIRTY_LOG, struct)``), so the figures do not
depend on the Python dirty-log API.

The phases:

* ``enable`` / ``disable``: flags-only KVM_SET_USER_MEMORY_REGION setting / clearing
  KVM_MEM_LOG_DIRTY_PAGES on an untouched slot (no SPTE on either backend);
* ``get_dirty_log(D)``: KVM_GET_DIRTY_LOG (no manual protect) with D dirty pages;
* ``manual_get(D)``, ``manual_clear(D)``, ``manual_get+clear(D)``: with
  KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, GET_DIRTY_LOG, then KVM_CLEAR_DIRTY_LOG of the
  whole slot with the bitmap GET returned, and their sum (a harvest);
* ``reset_dirty_rings(D)``: with KVM_CAP_DIRTY_LOG_RING (65536 entries), after
  userspace marked every entry collected: KVM_RESET_DIRTY_RINGS alone;
  ``ring_collect(D)`` is that userspace step (numpy, the same code on both
  backends: not a backend figure) and ``ring_entries(D)`` the entry count;
* ``dirty_pass(D)``, simulator only: per page, the guest write that dirties a page
  after enable (8 bytes through ``vcpu.mmu.access``, Python call included; the
  rounds after the first fault on write-protected SPTEs or, after the zap, on none).

D is ``clean`` (0), 1000 or 16384 pages, spread evenly over the slot
(page k * npages / D). Without KVM_RUN the device's guest cannot write, so the
device's pages are dirtied by KVM itself: KVM_SET_MSRS of MSR_KVM_WALL_CLOCK_NEW
(KVM writes the wall clock at that gpa through kvm_write_guest, which marks the page
dirty: three writes, so three ring entries per page in ring mode, against one for
the simulator). The device then has no SPTE to re-protect; the simulator's guest
writes leave one per dirty page, so before the compared harvest the simulator zaps
the slot's SPTEs (an MMU-notifier invalidation of its range, untimed; the log is
kept) and both backends harvest the same state. ``get_dirty_log(D)+sptes`` is the
simulator's GET_DIRTY_LOG with the guest's SPTEs in place (simulator only: it
re-protects them). Every harvest is checked to report exactly the D pages.

Both backends are measured in one process, interleaved (the order alternates every
round), by :func:`measure` from ``setup_cache``, once for all the classes here;
figures are medians over the rounds (``KVMMMU_DIRTY_ROUNDS``, default 7 for clean
phases and 5 for dirty ones). ``KVMMMU_DIRTY_SIZES=1GiB,64GiB`` limits the slot
sizes (a 1 TiB slot on the device costs about 2 GiB of kernel rmaps and seconds to
create). Without a usable device the ``dev`` figures and ratios are skipped.

The user's bitmap (the ``dirty_bitmap`` both backends write, one per rig) lives in a
``kvmmmu.GuestMemory`` by default (``KVMMMU_DIRTY_BITMAP=guest``): memory the core
owns, which the simulator's copy_to_user writes directly, as the kernel's does;
``KVMMMU_DIRTY_BITMAP=heap`` puts it in a numpy heap array, which the simulator
can only reach through process_vm_writev (and /dev/zero reads for zero runs).

``python benches/dirty.py`` prints the whole table without asv. The Rust core's
own figures, with 0.1 % and 10 % of the pages dirty, are in rust/core/benches/dirty.rs.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from typing import Any

import numpy as np

import kvmmmu
from kvmmmu import uapi

GIB = 1 << 30
ALL_SIZES = {"1GiB": GIB, "64GiB": 64 * GIB, "1TiB": 1024 * GIB}
SIZES = {
    k: v
    for k, v in ALL_SIZES.items()
    if k in os.environ.get("KVMMMU_DIRTY_SIZES", ",".join(ALL_SIZES)).split(",")
}
DIRTY = (1000, 16384)
DEVICE = os.environ.get("KVMMMU_DEVICE", "/dev/kvm")
SLOT = 1
SLOT_GPA = GIB
TABLES = 2 << 20
PML4 = 0x1000
RING_BYTES = 1 << 20  # 65536 entries: the largest ring
MSR_KVM_WALL_CLOCK_NEW = 0x4B56_4D00
MAX_IO_MSRS = 255  # entries per KVM_SET_MSRS (the kernel refuses 256 and more)
BITMAP = os.environ.get("KVMMMU_DIRTY_BITMAP", "guest")
_rounds = os.environ.get("KVMMMU_DIRTY_ROUNDS")
ROUNDS_CLEAN = int(_rounds) if _rounds else 7
ROUNDS_DIRTY = int(_rounds) if _rounds else 5

PHASES = (
    "enable",
    "disable",
    "get_dirty_log(clean)",
    *(f"get_dirty_log({d})" for d in DIRTY),
    "manual_get(clean)",
    "manual_clear(clean)",
    *(f"manual_{p}({d})" for d in DIRTY for p in ("get", "clear", "get+clear")),
    *(f"reset_dirty_rings({d})" for d in DIRTY),
)
SIM_ONLY = (
    *(f"get_dirty_log({d})+sptes" for d in DIRTY),
    *(f"dirty_pass({d})" for d in DIRTY),
    *(f"ring_collect({d})" for d in DIRTY),
)
RING_DTYPE = np.dtype([("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")])


def device_problem() -> str | None:
    return kvmmmu.device_available(DEVICE)


def spread(npages: int, d: int) -> np.ndarray:
    """The d pages of the dirty set: k * npages // d."""
    return (np.arange(d, dtype=np.uint64) * np.uint64(npages)) // np.uint64(d)


class Rig:
    """One backend's VM with slot 1 of ``size`` bytes (logging off) and vCPU 0, in
    ``mode`` plain, manual (MANUAL_DIRTY_LOG_PROTECT2) or ring (65536 entries)."""

    def __init__(self, backend: str, size: int, mode: str) -> None:
        self.backend, self.size, self.mode = backend, size, mode
        self.npages = size >> 12
        self.kvm = kvmmmu.Kvm() if backend == "sim" else kvmmmu.Kvm(DEVICE)
        self.vm = self.kvm.create_vm()
        if mode == "manual":
            self._enable_cap(uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 1)
        elif mode == "ring":
            self._enable_cap(uapi.KVM_CAP_DIRTY_LOG_RING, RING_BYTES)
        self.tables = kvmmmu.GuestMemory(TABLES)
        self.mem = kvmmmu.GuestMemory(size)
        self._region(0, 0, TABLES, self.tables.address, 0)
        self.off = self._region(SLOT, SLOT_GPA, size, self.mem.address, 0)
        self.on = uapi.kvm_userspace_memory_region(
            slot=SLOT,
            flags=uapi.KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr=SLOT_GPA,
            memory_size=size,
            userspace_addr=self.mem.address,
        )
        self.vcpu = self.vm.create_vcpu(0)
        if backend == "sim":
            self._guest_paging()
        nwords = -(-self.npages // 64)
        self._bitmap_mem: Any = None
        if BITMAP == "heap":
            self.bitmap = np.empty(nwords, dtype=np.uint64)
        else:
            self._bitmap_mem = kvmmmu.GuestMemory(8 * nwords)
            self.bitmap = np.frombuffer(self._bitmap_mem, dtype=np.uint64, count=nwords)
        self.bitmap.fill(0)  # faulted in: GET measures KVM, not first-touch faults
        self.log = uapi.kvm_dirty_log(slot=SLOT, dirty_bitmap=self.bitmap.ctypes.data)
        self.clr = uapi.kvm_clear_dirty_log(
            slot=SLOT, num_pages=self.npages, first_page=0, dirty_bitmap=self.bitmap.ctypes.data
        )
        self.ring: np.ndarray | None = None
        self.fetch = 0
        if mode == "ring":
            self._ring_map = self.kvm.transport.mmap(
                self.vcpu.fd, RING_BYTES, offset=uapi.KVM_DIRTY_LOG_PAGE_OFFSET * 4096
            )
            self.ring = np.frombuffer(self._ring_map, dtype=RING_DTYPE)
        self._dirty_sets: dict[int, Any] = {}

    def _enable_cap(self, cap: int, arg: int) -> None:
        c = uapi.kvm_enable_cap(cap=cap)
        c.args[0] = arg
        self.vm.ioctl(uapi.KVM_ENABLE_CAP, c)

    def _region(self, slot: int, gpa: int, size: int, hva: int, flags: int) -> Any:
        r = uapi.kvm_userspace_memory_region(
            slot=slot, flags=flags, guest_phys_addr=gpa, memory_size=size, userspace_addr=hva
        )
        self.vm.ioctl(uapi.KVM_SET_USER_MEMORY_REGION, r)
        return r

    def _guest_paging(self) -> None:
        """4-level paging, slot 1 identity-mapped with 1 GiB pages (A and D set)."""
        for e in self.kvm.get_supported_cpuid():
            if e.function == 0x8000_0008:
                assert e.eax & 0xFF >= 41, "MAXPHYADDR too small for a 1 TiB slot at 1 GiB"
            if e.function == 0x8000_0001:
                assert e.edx & (1 << 26), "no 1 GiB pages"
        self.vcpu.set_cpuid2(self.kvm.get_supported_cpuid())
        q = np.frombuffer(self.tables, dtype=np.uint64)
        gb = np.arange(SLOT_GPA >> 30, (SLOT_GPA + self.size) >> 30, dtype=np.uint64)
        pml4i = gb >> np.uint64(9)
        for i in np.unique(pml4i):
            q[PML4 // 8 + int(i)] = (PML4 + 0x1000 * (1 + int(i))) | 0x27  # P|W|U|A
        pdpt = (np.uint64(PML4 + 0x1000) + pml4i * np.uint64(0x1000)) // np.uint64(8)
        q[(pdpt + (gb & np.uint64(511))).astype(np.intp)] = (gb << np.uint64(30)) | np.uint64(
            0xE7
        )  # P|W|U|A|D|PS
        del q
        s = self.vcpu.get_sregs()
        s.cr3, s.cr4, s.efer, s.cr0, s.cs.l = PML4, 0x20, 0xD00, 0x80010011, 1
        self.vcpu.set_sregs(s)

    # -- the phases (one ioctl each) ---------------------------------------------

    def enable(self) -> None:
        self.vm.ioctl(uapi.KVM_SET_USER_MEMORY_REGION, self.on)

    def disable(self) -> None:
        self.vm.ioctl(uapi.KVM_SET_USER_MEMORY_REGION, self.off)

    def get(self) -> None:
        self.vm.ioctl(uapi.KVM_GET_DIRTY_LOG, self.log)

    def clear(self) -> None:
        self.vm.ioctl(uapi.KVM_CLEAR_DIRTY_LOG, self.clr)

    def reset(self) -> int:
        return int(self.vm.ioctl(uapi.KVM_RESET_DIRTY_RINGS, 0))

    # -- dirtying -------------------------------------------------------------------

    def dirty(self, d: int) -> float:
        """Dirty the d pages of the dirty set; seconds taken."""
        pages = spread(self.npages, d)
        gpas = [SLOT_GPA + 4096 * int(p) + 0x100 for p in pages]
        if self.backend == "sim":
            access = self.vcpu.mmu.access
            value = b"\x5a" * 8
            t0 = time.perf_counter()
            for gpa in gpas:  # identity-mapped: gva = gpa
                access(gpa, 8, write=True, value=value)
            return time.perf_counter() - t0
        if d not in self._dirty_sets:
            bufs = []
            for i in range(0, d, MAX_IO_MSRS):
                chunk = gpas[i : i + MAX_IO_MSRS]
                bufs.append(
                    uapi.make_msrs(
                        [uapi.kvm_msr_entry(index=MSR_KVM_WALL_CLOCK_NEW, data=g) for g in chunk]
                    )
                )
            self._dirty_sets[d] = bufs
        t0 = time.perf_counter()
        for buf in self._dirty_sets[d]:
            n = self.vcpu.ioctl(uapi.KVM_SET_MSRS, buf)
            assert n == buf.nmsrs, (n, buf.nmsrs)
        return time.perf_counter() - t0

    def drop_sptes(self) -> None:
        """Simulator: zap the slot's SPTEs (an MMU-notifier invalidation of its whole
        range) and keep the dirty log, so the harvest finds what the device's does."""
        self.vm.mmu.host_invalidate_start(self.mem.address, self.size)
        self.vm.mmu.host_invalidate_end()

    def bitmap_pages(self) -> int:
        return int(np.unpackbits(self.bitmap.view(np.uint8)).sum())

    def ring_collect(self) -> tuple[int, np.ndarray]:
        """Userspace's harvest: the DIRTY entries from the fetch index, marked RESET."""
        e = self.ring
        assert e is not None
        total, offsets = 0, []
        while True:
            i = self.fetch % len(e)
            seg = e[i : i + 4096]  # blocks: the cost follows the entries, not the ring
            clean = np.flatnonzero((seg["flags"] & uapi.KVM_DIRTY_GFN_F_DIRTY) == 0)
            k = int(clean[0]) if len(clean) else len(seg)
            if k == 0:
                break
            offsets.append(seg["offset"][:k].copy())
            seg["flags"][:k] = uapi.KVM_DIRTY_GFN_F_RESET
            self.fetch += k
            total += k
            if k < len(seg):
                break
        return total, np.concatenate(offsets) if offsets else np.zeros(0, np.uint64)

    def close(self) -> None:
        self.ring = None
        if self.mode == "ring":
            self._ring_map.close()
        self.vcpu.close()
        self.vm.close()
        self.kvm.close()


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _measure_size(size: int, backends: list[str], out: dict[str, list[float]]) -> None:
    """Every phase on slots of ``size`` bytes, into out["backend|phase"]."""

    def rec(b: str, phase: str, seconds: float) -> None:
        out.setdefault(f"{b}|{phase}", []).append(seconds)

    def orders(n: int) -> list[list[str]]:
        return [backends if i % 2 == 0 else backends[::-1] for i in range(n)]

    for mode in ("plain", "manual", "ring"):
        rigs = {b: Rig(b, size, mode) for b in backends}
        try:
            if mode != "ring":
                # Clean slots: enable, GET (and CLEAR), disable.
                for order in orders(ROUNDS_CLEAN):
                    for b in order:
                        r = rigs[b]
                        t = _timed(r.enable)
                        if mode == "plain":
                            rec(b, "enable", t)
                            rec(b, "get_dirty_log(clean)", _timed(r.get))
                        else:
                            rec(b, "manual_get(clean)", _timed(r.get))
                            rec(b, "manual_clear(clean)", _timed(r.clear))
                        assert not r.bitmap.any()
                        t = _timed(r.disable)
                        if mode == "plain":
                            rec(b, "disable", t)
            for d in DIRTY:
                for order in orders(ROUNDS_DIRTY):
                    for b in order:
                        r = rigs[b]
                        if b == "sim" and mode == "plain":
                            # The simulator's harvest with the guest's SPTEs in place.
                            r.enable()
                            r.dirty(d)
                            rec(b, f"get_dirty_log({d})+sptes", _timed(r.get))
                            assert r.bitmap_pages() == d
                            r.disable()
                        r.enable()
                        dt = r.dirty(d)
                        if b == "sim":
                            rec(b, f"dirty_pass({d})", dt / d)
                            r.drop_sptes()
                        if mode == "plain":
                            rec(b, f"get_dirty_log({d})", _timed(r.get))
                            assert r.bitmap_pages() == d, (b, r.bitmap_pages(), d)
                        elif mode == "manual":
                            g = _timed(r.get)
                            assert r.bitmap_pages() == d, (b, r.bitmap_pages(), d)
                            c = _timed(r.clear)
                            rec(b, f"manual_get({d})", g)
                            rec(b, f"manual_clear({d})", c)
                            rec(b, f"manual_get+clear({d})", g + c)
                        else:
                            t0 = time.perf_counter()
                            n, offsets = r.ring_collect()
                            rec(b, f"ring_collect({d})", time.perf_counter() - t0)
                            t = _timed(lambda r=r, n=n: r.reset() == n or _fail(r, n))
                            rec(b, f"reset_dirty_rings({d})", t)
                            rec(b, f"ring_entries({d})", n)
                            got = np.unique(offsets)
                            assert np.array_equal(got, spread(r.npages, d)), (b, len(got), d)
                        r.disable()
                if mode == "manual":
                    for r in rigs.values():  # CLEAR left nothing behind
                        r.enable()
                        r.get()
                        assert not r.bitmap.any()
                        r.disable()
        finally:
            for r in rigs.values():
                r.close()
            del rigs
            gc.collect()


def _fail(r: Rig, n: int) -> bool:
    raise AssertionError(f"{r.backend}: KVM_RESET_DIRTY_RINGS did not reset {n} entries")


_MEASURED: list[dict[str, float]] = []


def measure() -> dict[str, float]:
    """Medians in seconds, keyed "backend|slot|phase" (entries: a count), once per process."""
    if _MEASURED:
        return _MEASURED[0]
    backends = ["sim", "dev"] if device_problem() is None else ["sim"]
    result: dict[str, float] = {}
    for slot, size in SIZES.items():
        samples: dict[str, list[float]] = {}
        _measure_size(size, backends, samples)
        for key, v in samples.items():
            b, phase = key.split("|", 1)
            result[f"{b}|{slot}|{phase}"] = statistics.median(v)
    _MEASURED.append(result)
    return result


def _setup_cache(*_: object) -> dict[str, float]:
    """Shared by the classes below: asv keys the cache on this function, so it runs once."""
    return measure()


# ---------------------------------------------------------------- asv classes


class DirtyLogPhases:
    """Microseconds per phase on each backend (medians, measured interleaved)."""

    params = (list(SIZES), list(PHASES), ["sim", "dev"])
    param_names = ["slot", "phase", "backend"]
    unit = "us"
    timeout = 3600
    setup_cache = _setup_cache

    def setup(self, m: dict[str, float], slot: str, phase: str, backend: str) -> None:
        if f"{backend}|{slot}|{phase}" not in m:
            raise NotImplementedError(f"not measured: {backend} {slot} {phase}")

    def track_us(self, m: dict[str, float], slot: str, phase: str, backend: str) -> float:
        return m[f"{backend}|{slot}|{phase}"] * 1e6


class DirtyLogSimOverDev:
    """The simulator's time over the device's for each phase (below 1: the simulator
    is faster), from the same interleaved measurement."""

    params = (list(SIZES), list(PHASES))
    param_names = ["slot", "phase"]
    unit = "ratio"
    timeout = 3600
    setup_cache = _setup_cache

    def setup(self, m: dict[str, float], slot: str, phase: str) -> None:
        if f"dev|{slot}|{phase}" not in m:
            raise NotImplementedError(f"no device figure for {slot} {phase}")

    def track_ratio(self, m: dict[str, float], slot: str, phase: str) -> float:
        return m[f"sim|{slot}|{phase}"] / m[f"dev|{slot}|{phase}"]


class DirtyLogSimOnly:
    """Simulator-only figures: the guest write that dirties a page after enable
    (us per page, Python call included), and the userspace ring collection (us)."""

    params = (list(SIZES), list(SIM_ONLY))
    param_names = ["slot", "phase"]
    unit = "us"
    timeout = 3600
    setup_cache = _setup_cache

    def setup(self, m: dict[str, float], slot: str, phase: str) -> None:
        if f"sim|{slot}|{phase}" not in m:
            raise NotImplementedError(f"not measured: {slot} {phase}")

    def track_sim_us(self, m: dict[str, float], slot: str, phase: str) -> float:
        return m[f"sim|{slot}|{phase}"] * 1e6


class UntouchedTerabyteSlot:
    """A simulated VM with one untouched 1 TiB slot, logging on: the MMU's model
    metadata (``vm.mmu.memory_bytes()``; the sparse dirty bitmap's 128 KiB table of
    chunk pointers is not in it: rust/core/benches/dirty.rs prints both)."""

    def track_mmu_bytes(self) -> int:
        mem = kvmmmu.GuestMemory(1 << 40)
        with kvmmmu.Kvm() as kvm, kvm.create_vm() as vm:
            r = uapi.kvm_userspace_memory_region(
                slot=0,
                flags=uapi.KVM_MEM_LOG_DIRTY_PAGES,
                memory_size=1 << 40,
                userspace_addr=mem.address,
            )
            vm.ioctl(uapi.KVM_SET_USER_MEMORY_REGION, r)
            n = vm.mmu.memory_bytes()
        return n

    track_mmu_bytes.unit = "bytes"  # type: ignore[attr-defined]


# ---------------------------------------------------------------- without asv


def _fmt(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def main() -> None:
    problem = device_problem()
    if problem is not None:
        print(f"device: {problem} (simulator only)")
    m = measure()
    print(f"rounds: {ROUNDS_CLEAN} clean, {ROUNDS_DIRTY} dirty; medians; bitmap: {BITMAP}")
    head = f"{'phase':<24}" + "".join(f"{s + ' sim':>12}{'dev':>11}{'sim/dev':>9}" for s in SIZES)
    print(head)
    for phase in (*PHASES, *SIM_ONLY, *(f"ring_entries({d})" for d in DIRTY)):
        row = f"{phase:<24}"
        for slot in SIZES:
            sim, dev = m.get(f"sim|{slot}|{phase}"), m.get(f"dev|{slot}|{phase}")
            if phase.startswith("ring_entries"):
                row += f"{sim or 0:>12.0f}{dev or 0:>11.0f}{'':>9}"
                continue
            ratio = f"{sim / dev:.2f}" if sim is not None and dev else "-"
            row += f"{_fmt(sim):>12}{_fmt(dev):>11}{ratio:>9}"
        print(row)
    print(
        "untouched 1 TiB logging slot (sim): vm.mmu.memory_bytes() = "
        f"{UntouchedTerabyteSlot().track_mmu_bytes()} B"
    )


if __name__ == "__main__":
    main()
