"""The KVM_RUN figures of issue 7, simulator next to /dev/kvm, measured in this process.

    python benches/run_figures.py                  # 5 interleaved rounds, medians (~1 min)
    KVMMMU_RUN_ROUNDS=9 python benches/run_figures.py

Prints, per figure: the time per unit and the rate per second on each backend, the
ratio sim/dev (below 1: the simulator is faster) and the speedup dev/sim, with the
issue's targets checked against the device figure of the same run. What each figure
is, and how it is measured, is in benches/run.py (its asv benchmarks).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run as bench  # benches/run.py, next to this file

#: figure -> (minimum speedup dev/sim, what the issue says)
TARGETS: dict[str, tuple[float, str]] = {
    "compute_cpl0": (20.0, "CPL0 code >= 20x faster than the device's emulation"),
    "first_touch_cpl3": (10.0, "first-touch fault >= 10x faster than the device (2.9 us)"),
}


def _rate(seconds: float) -> str:
    per_s = 1 / seconds
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if per_s >= scale:
            return f"{per_s / scale:.3g}{suffix}/s"
    return f"{per_s:.3g}/s"


def main() -> None:
    problem = bench.device_problem()
    if problem is not None:
        print(f"device {bench.DEVICE}: {problem} (simulator only)")
    m = bench.measure()
    print(f"{bench.ROUNDS} interleaved rounds, medians; timed region: vcpu.run() from Python")
    head = (
        f"{'figure':<18}{'unit':>9}{'sim':>10}{'dev':>10}{'sim/s':>10}{'dev/s':>10}"
        f"{'sim/dev':>9}{'dev/sim':>9}  target"
    )
    print(head)
    print("-" * len(head))
    verdicts = []
    for fig, (unit, scale, _what) in bench.FIGURES.items():
        sim, dev = m.get(f"sim|{fig}"), m.get(f"dev|{fig}")
        row = f"{fig:<18}{unit:>9}"
        row += f"{sim * scale:>10.3g}" if sim is not None else f"{'-':>10}"
        row += f"{dev * scale:>10.3g}" if dev is not None else f"{'-':>10}"
        row += f"{_rate(sim):>10}" if sim is not None and sim > 0 else f"{'-':>10}"
        row += f"{_rate(dev):>10}" if dev is not None and dev > 0 else f"{'-':>10}"
        if sim and dev:
            row += f"{sim / dev:>9.3g}{dev / sim:>9.3g}"
        else:
            row += f"{'-':>9}{'-':>9}"
        if fig in TARGETS:
            need, text = TARGETS[fig]
            if sim and dev:
                ok = dev / sim >= need
                row += f"  >= {need:g}x: {'met' if ok else 'MISSED'}"
                verdicts.append(f"{text}: {dev / sim:.1f}x, {'met' if ok else 'MISSED'}")
            else:
                row += f"  >= {need:g}x (no device)"
        print(row)
    print()
    for fig, (_unit, _scale, what) in bench.FIGURES.items():
        print(f"  {fig:<18} {what}")
    if verdicts:
        print()
        for v in verdicts:
            print(v)


if __name__ == "__main__":
    main()
