"""The KVM_RUN figures of issue 7, simulator next to /dev/kvm, measured in this process.

    python benches/run_figures.py                  # 5 interleaved rounds, medians (~1 min)
    KVMMMU_RUN_ROUNDS=9 python benches/run_figures.py

Prints, per figure: the time per unit and the rate per second on each backend, the
median of the paired ratios sim/dev (below 1: the simulator is faster) and its
inverse, the speedup dev/sim; then the issue's two targets, checked against the
device of the same run and against the device's figures in
reference/real-kvm-here.md (a quiet machine). What each figure is, and how it is
measured, is in benches/run.py (its asv benchmarks).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run as bench  # benches/run.py, next to this file

#: figure -> (minimum speedup dev/sim, the device's figure in
#: reference/real-kvm-here.md (seconds, quiet machine), what the issue says)
TARGETS: dict[str, tuple[float, float, str]] = {
    "compute_cpl0": (20.0, 0.6e-6, "CPL0 code >= 20x faster than the device's emulation"),
    "first_touch_cpl3": (10.0, 2.9e-6, "first-touch fault >= 10x faster than the device"),
    "fault_cpl3": (10.0, 2.9e-6, "the same, the fault alone (first - second pass)"),
}


def _rate(seconds: float) -> str:
    per_s = 1 / seconds
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if per_s >= scale:
            return f"{per_s / scale:.3g}{suffix}/s"
    return f"{per_s:.3g}/s"


def table(m: dict[str, float], clock: str) -> list[str]:
    """Print the figures on one clock; the target verdicts as lines."""
    head = (
        f"{'figure':<18}{'unit':>9}{'sim':>10}{'dev':>10}{'sim/s':>10}{'dev/s':>10}"
        f"{'sim/dev':>9}{'dev/sim':>9}  target"
    )
    print(head)
    print("-" * len(head))
    verdicts = []
    for fig, (unit, scale, _what) in bench.FIGURES.items():
        sim, dev = m.get(f"{clock}|sim|{fig}"), m.get(f"{clock}|dev|{fig}")
        ratio = m.get(f"{clock}|ratio|{fig}")
        row = f"{fig:<18}{unit:>9}"
        row += f"{sim * scale:>10.3g}" if sim is not None else f"{'-':>10}"
        row += f"{dev * scale:>10.3g}" if dev is not None else f"{'-':>10}"
        row += f"{_rate(sim):>10}" if sim is not None and sim > 0 else f"{'-':>10}"
        row += f"{_rate(dev):>10}" if dev is not None and dev > 0 else f"{'-':>10}"
        if ratio:
            row += f"{ratio:>9.3g}{1 / ratio:>9.3g}"
        else:
            row += f"{'-':>9}{'-':>9}"
        if fig in TARGETS:
            need, anchor, text = TARGETS[fig]
            if ratio:
                ok = 1 / ratio >= need
                row += f"  >= {need:g}x: {'met' if ok else 'MISSED'}"
                verdicts.append(
                    f"{clock}: {text}: {1 / ratio:.1f}x in this run, {'met' if ok else 'MISSED'}"
                )
            else:
                row += f"  >= {need:g}x (no device)"
            if sim:
                ok = anchor / sim >= need
                verdicts.append(
                    f"{clock}:   against the reference's {anchor * scale:g} {unit} (quiet "
                    f"machine): {anchor / sim:.1f}x, {'met' if ok else 'MISSED'} "
                    f"(needs sim <= {anchor / need * scale:.3g} {unit}, has {sim * scale:.3g})"
                )
        print(row)
    return verdicts


def main() -> None:
    problem = bench.device_problem()
    if problem is not None:
        print(f"device {bench.DEVICE}: {problem} (simulator only)")
    load = os.getloadavg()[0]
    m = bench.measure()
    print(
        f"{bench.ROUNDS} rounds of back-to-back sim/dev pairs, medians; "
        "timed region: vcpu.run() from Python"
    )
    print(
        f"load average (1 min) before/after: {load:.2f}/{os.getloadavg()[0]:.2f} "
        f"on {os.cpu_count()} CPUs (wall figures grow with the load)"
    )
    verdicts = []
    for clock, what in (
        ("wall", "wall clock (perf_counter)"),
        ("cpu", "the thread's CPU time (thread_time: excludes waiting for a CPU)"),
    ):
        print(f"\n{clock}: {what}")
        verdicts += table(m, clock)
    print()
    for fig, (_unit, _scale, what) in bench.FIGURES.items():
        print(f"  {fig:<18} {what}")
    if verdicts:
        print()
        for v in verdicts:
            print(v)


if __name__ == "__main__":
    main()
