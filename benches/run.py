"""asv benchmarks of KVM_RUN (issue 7), simulator next to /dev/kvm in one process.

Guest code built by :mod:`kvmmmu.guest.builder` and :mod:`kvmmmu.guest.programs`
(long mode, 4-level paging), run with ``vcpu.run()`` on both backends:

* ``compute_cpl0`` / ``compute_cpl3``: seconds per guest instruction of
  :func:`~kvmmmu.guest.programs.compute_loop` (lea, add, dec, jnz per iteration),
  one ``run()`` of n iterations (about 40 ms: the call overhead is amortized). The
  device emulates CPL0 code (about 0.6 us per instruction) and runs 64-bit CPL3 code
  natively.
* ``first_touch_cpl3`` / ``first_touch_cpl0``: seconds per page of
  :func:`~kvmmmu.guest.programs.touch_pages` (an 8-byte write to each of 4096 fresh
  pages of slot 1; gptes P|W|U with A clear, so no prefetch: one shadow fault per
  page), the whole first pass over the loop's 4 instructions. Host memory is
  populated from Python before the VM exists (one write over the slot), as for the
  device's 2.9 us in reference/real-kvm-here.md, so the figure is the MMU's, not the
  host kernel's. ``second_pass_*``: the same loop again over the mapped pages (the
  vCPU is stopped with immediate_exit after the first pass's exit, RIP reset);
  ``fault_*`` = first_touch - second_pass, the fault alone. At CPL3 both backends
  count ``pf_fixed`` >= pages (checked); the device's CPL0 accesses go through its
  emulator's walker with no SPTE (no pf_fixed), the simulator's through its MMU.
* ``mmio_exit_cpl0`` / ``mmio_exit_cpl3``: seconds per exit of
  :func:`~kvmmmu.guest.programs.exit_loop` (an 8-byte MMIO write to a gpa without a
  slot, one ``run()`` per exit, the Python loop and exit decoding included);
  ``out_exit_cpl0``: the same with ``out 0x10, al`` (KVM_EXIT_IO);
  ``out_exit_raw_cpl0``: that loop driven by the bare ioctl
  (``transport.ioctl(fd, KVM_RUN, 0)``, no exit record): the run loop's own cost is
  the difference.

Both backends are measured in one process by :func:`measure`, once for all the classes
here (``setup_cache``): ``KVMMMU_RUN_ROUNDS`` rounds (default 5), each taking one
sample of every figure on both backends back to back (which goes first alternates), so
a pair sees the same machine load; figures are medians, and ratios sim/dev are the
medians of the paired ratios. Every sample is timed on two clocks: ``wall``
(perf_counter) and ``cpu``, the thread's CPU time (thread_time; on the device it
includes the time spent in KVM and in the guest). On a shared machine (two CPUs here,
with builds and fuzzers) the wall figures include the time the thread waited for a
CPU; the cpu figures do not, and match reference/real-kvm-here.md's quiet-machine
anchors far better. Each sample is a freshly built and booted
guest; the timed region is ``run()`` alone. Every sample is checked (the loop's
result, the exit sequence, the written memory, ``pf_fixed``).

``python benches/run_figures.py`` prints the table with the targets. The Rust core
without Python: ``cargo bench -p kvmmmu-core --bench run`` (rust/core/benches/run.rs).
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable

import kvmmmu
from kvmmmu import exits, uapi
from kvmmmu.guest import asm as x
from kvmmmu.guest import programs
from kvmmmu.guest.builder import CODE, Guest, Machine

DEVICE = os.environ.get("KVMMMU_DEVICE", "/dev/kvm")
ROUNDS = int(os.environ.get("KVMMMU_RUN_ROUNDS", "5"))
PAGE = 4096
PAGES = 4096
DATA_GPA = 0x100_0000  # slot 1
DATA_VA = 0x4000_0000
OUT_PORT = 0x10
KVM_RUN = uapi.KVM_RUN
#: A sample's two clocks: wall time (perf_counter) and the thread's CPU time
#: (thread_time; on the device it includes the time in KVM and in the guest).
CLOCKS = ("wall", "cpu")
Span = tuple[float, float]

#: figure -> (unit shown, scale from seconds, what it is)
FIGURES: dict[str, tuple[str, float, str]] = {
    "compute_cpl0": ("ns/insn", 1e9, "compute loop, CPL0"),
    "compute_cpl3": ("ns/insn", 1e9, "compute loop, CPL3"),
    "first_touch_cpl3": ("us/page", 1e6, "first touch, CPL3 (fault + 4 insns)"),
    "second_pass_cpl3": ("us/page", 1e6, "second pass, CPL3 (mapped)"),
    "fault_cpl3": ("us/page", 1e6, "fault alone, CPL3 (first - second)"),
    "first_touch_cpl0": ("us/page", 1e6, "first touch, CPL0 (fault + 4 insns)"),
    "second_pass_cpl0": ("us/page", 1e6, "second pass, CPL0 (mapped)"),
    "fault_cpl0": ("us/page", 1e6, "fault alone, CPL0 (first - second)"),
    "mmio_exit_cpl0": ("us/exit", 1e6, "MMIO write exit round trip, CPL0"),
    "mmio_exit_cpl3": ("us/exit", 1e6, "MMIO write exit round trip, CPL3"),
    "out_exit_cpl0": ("us/exit", 1e6, "OUT exit round trip, CPL0"),
    "out_exit_raw_cpl0": ("us/exit", 1e6, "OUT exit, bare KVM_RUN ioctl (no decoding)"),
}


def device_problem() -> str | None:
    return kvmmmu.device_available(DEVICE)


def make_kvm(backend: str) -> kvmmmu.Kvm:
    return kvmmmu.Kvm() if backend == "sim" else kvmmmu.Kvm(DEVICE)


def _close(m: Machine) -> None:
    m.vcpu.close()
    m.vm.close()


# ---------------------------------------------------------------- one sample each


def _now() -> Span:
    return time.perf_counter(), time.thread_time()


def _since(t0: Span, per: int) -> Span:
    """Seconds per unit since ``t0`` on both clocks, over ``per`` units."""
    return (time.perf_counter() - t0[0]) / per, (time.thread_time() - t0[1]) / per


def compute_iterations(backend: str, cpl: int) -> int:
    """Loop iterations for about 40 ms of guest time on this backend."""
    if backend == "sim":
        return 250_000  # about 1M instructions at 40 ns
    return 25_000 if cpl == 0 else 100_000_000  # emulated ~0.8 us / native ~0.1 ns


def sample_compute(kvm: kvmmmu.Kvm, backend: str, cpl: int) -> Span:
    """Seconds per guest instruction of one run() of the compute loop."""
    n = compute_iterations(backend, cpl)
    g = Guest("lm64")
    programs.compute_loop(g, n, cpl=cpl)
    m = g.boot(kvm, cpl=cpl)
    try:
        t0 = _now()
        e = m.vcpu.run()
        dt = _since(t0, 4 * n)
        assert isinstance(e, exits.ExitMmio if cpl else exits.ExitHlt), (backend, str(e))
        assert m.vcpu.get_regs().rax == programs.compute_loop_result(n), backend
    finally:
        _close(m)
    return dt


def sample_touch(kvm: kvmmmu.Kvm, backend: str, cpl: int) -> tuple[Span, Span]:
    """Seconds per page of the first pass (one fault each) and of a second pass."""
    g = Guest("lm64")
    mem = g.add_slot(1, DATA_GPA, PAGES * PAGE)
    mem.write(0, bytes(PAGES * PAGE))  # populate the host memory first
    programs.touch_pages(g, DATA_VA, DATA_GPA, PAGES, value=0x5A, cpl=cpl)
    m = g.boot(kvm, cpl=cpl)
    ended = exits.ExitMmio if cpl else exits.ExitHlt
    try:
        v = m.vcpu
        before = v.stats()["pf_fixed"]
        t0 = _now()
        e = v.run()
        first = _since(t0, PAGES)
        assert isinstance(e, ended), (backend, str(e))
        fixed = v.stats()["pf_fixed"]
        assert isinstance(fixed, int) and isinstance(before, int)
        if cpl == 3 or backend == "sim":
            assert fixed - before >= PAGES, (backend, cpl, fixed - before)
        assert mem.read((PAGES - 1) * PAGE, 8) == (0x5A).to_bytes(8, "little")
        # Finish the exit (a pending MMIO write completes on entry), then run again.
        v.immediate_exit = True
        assert isinstance(v.run(), exits.ExitIntr)
        v.immediate_exit = False
        regs = v.get_regs()
        regs.rip = CODE
        v.set_regs(regs)
        t0 = _now()
        e = v.run()
        second = _since(t0, PAGES)
        assert isinstance(e, ended), (backend, str(e))
    finally:
        _close(m)
    return first, second


def exit_count(backend: str, cpl: int) -> int:
    return 2000 if backend == "dev" else 10_000


def _count_exits(m: Machine, kind: type, match: Callable[[exits.Exit], bool]) -> tuple[int, Span]:
    run = m.vcpu.run
    n = 0
    t0 = _now()
    while isinstance(e := run(), kind) and match(e):
        n += 1
    return n, _since(t0, max(n, 1))


def sample_mmio_exits(kvm: kvmmmu.Kvm, backend: str, cpl: int) -> Span:
    """Seconds per MMIO write exit (run() to run())."""
    n = exit_count(backend, cpl)
    g = Guest("lm64")
    programs.exit_loop(g, n, cpl=cpl)
    m = g.boot(kvm, cpl=cpl)
    try:
        got, dt = _count_exits(
            m, exits.ExitMmio, lambda e: getattr(e, "phys_addr", None) == programs.EXIT_GPA
        )
        assert got == n, (backend, got, n)
    finally:
        _close(m)
    return dt


def sample_out_exits(kvm: kvmmmu.Kvm, backend: str, raw: bool = False) -> Span:
    """Seconds per OUT exit at CPL0 (out, dec, jnz loop), through ``vcpu.run()`` or
    (``raw``) the bare KVM_RUN ioctl."""
    n = exit_count(backend, 0)
    g = Guest("lm64")
    a = g.asm
    a.mov(x.rcx, n)
    a.label("out_loop")
    a.out(OUT_PORT, x.al)
    a.dec(x.rcx)
    a.jnz("out_loop")
    a.hlt()
    m = g.boot(kvm)
    try:
        if raw:
            ioctl, fd, run = m.vcpu.transport.ioctl, m.vcpu.fd, m.vcpu.kvm_run
            t0 = _now()
            for _ in range(n):
                ioctl(fd, KVM_RUN, 0)
            dt = _since(t0, n)
            assert run.exit_reason == uapi.KVM_EXIT_IO and run.io.port == OUT_PORT, backend
            assert isinstance(m.vcpu.run(), exits.ExitHlt), backend
        else:
            got, dt = _count_exits(m, exits.ExitIo, lambda e: getattr(e, "port", None) == OUT_PORT)
            assert got == n, (backend, got, n)
    finally:
        _close(m)
    return dt


def _touch(kvm: kvmmmu.Kvm, backend: str, cpl: int) -> dict[str, Span]:
    first, second = sample_touch(kvm, backend, cpl)
    return {
        f"first_touch_cpl{cpl}": first,
        f"second_pass_cpl{cpl}": second,
        f"fault_cpl{cpl}": (first[0] - second[0], first[1] - second[1]),
    }


#: One sample of some figures on one backend each; measure() runs each on both
#: backends back to back, so the two samples of a pair see the same machine load.
SAMPLERS: tuple[Callable[[kvmmmu.Kvm, str], dict[str, Span]], ...] = (
    lambda k, b: {"compute_cpl0": sample_compute(k, b, 0)},
    lambda k, b: {"compute_cpl3": sample_compute(k, b, 3)},
    lambda k, b: _touch(k, b, 3),
    lambda k, b: _touch(k, b, 0),
    lambda k, b: {"mmio_exit_cpl0": sample_mmio_exits(k, b, 0)},
    lambda k, b: {"mmio_exit_cpl3": sample_mmio_exits(k, b, 3)},
    lambda k, b: {"out_exit_cpl0": sample_out_exits(k, b)},
    lambda k, b: {"out_exit_raw_cpl0": sample_out_exits(k, b, raw=True)},
)

_MEASURED: list[dict[str, float]] = []


def measure(rounds: int = ROUNDS) -> dict[str, float]:
    """Medians, keyed "clock|backend|figure" (seconds per unit) and "clock|ratio|figure"
    (the median over rounds of the paired sim/dev ratio), clock "wall" or "cpu"; once
    per process."""
    if _MEASURED:
        return _MEASURED[0]
    backends = ["sim", "dev"] if device_problem() is None else ["sim"]
    kvms = {b: make_kvm(b) for b in backends}
    samples: dict[str, list[float]] = {}
    try:
        for sampler in SAMPLERS:  # warm-up, not recorded (imports, first builds)
            for b in backends:
                sampler(kvms[b], b)
        for i in range(rounds):
            for sampler in SAMPLERS:
                pair: dict[str, dict[str, Span]] = {}
                for b in backends if i % 2 == 0 else backends[::-1]:
                    pair[b] = sampler(kvms[b], b)
                for fig, sim_span in pair["sim"].items():
                    for c, clock in enumerate(CLOCKS):
                        sim = sim_span[c]
                        samples.setdefault(f"{clock}|sim|{fig}", []).append(sim)
                        if "dev" in pair:
                            dev = pair["dev"][fig][c]
                            samples.setdefault(f"{clock}|dev|{fig}", []).append(dev)
                            samples.setdefault(f"{clock}|ratio|{fig}", []).append(sim / dev)
            gc.collect()
    finally:
        for k in kvms.values():
            k.close()
    result = {key: statistics.median(v) for key, v in samples.items()}
    _MEASURED.append(result)
    return result


def _setup_cache(*_: object) -> dict[str, float]:
    """Shared by the classes below: asv keys the cache on this function, so it runs once."""
    return measure()


# ---------------------------------------------------------------- asv classes


class RunFigures:
    """Each figure on each backend, in its unit (ns per instruction, us per page or
    per exit), on each clock (wall, or the thread's CPU time): medians of the rounds."""

    params = (list(FIGURES), ["sim", "dev"], list(CLOCKS))
    param_names = ["figure", "backend", "clock"]
    unit = "ns or us (see figure)"
    timeout = 1800
    setup_cache = _setup_cache

    def setup(self, m: dict[str, float], figure: str, backend: str, clock: str) -> None:
        if f"{clock}|{backend}|{figure}" not in m:
            raise NotImplementedError(f"not measured: {backend} {figure}")

    def track_time(self, m: dict[str, float], figure: str, backend: str, clock: str) -> float:
        return m[f"{clock}|{backend}|{figure}"] * FIGURES[figure][1]


class RunSimOverDev:
    """The simulator's time over the device's for each figure and clock: the median of
    the ratios of samples taken back to back (below 1: the simulator is faster)."""

    params = (list(FIGURES), list(CLOCKS))
    param_names = ["figure", "clock"]
    unit = "ratio"
    timeout = 1800
    setup_cache = _setup_cache

    def setup(self, m: dict[str, float], figure: str, clock: str) -> None:
        if f"{clock}|ratio|{figure}" not in m:
            raise NotImplementedError(f"no device figure for {figure}")

    def track_ratio(self, m: dict[str, float], figure: str, clock: str) -> float:
        return m[f"{clock}|ratio|{figure}"]
