"""Instruction counts of the simulator's KVM_RUN under callgrind: host instructions
(Ir) per guest instruction and per first-touch page fault, independent of the
machine's load.

    python benches/run_callgrind.py            # needs valgrind; about a minute
    python benches/run_callgrind.py --top 15   # and the functions the cost is in

Each case runs the same program (benches/run.py's guest programs) twice under
``valgrind --tool=callgrind --toggle-collect='*Vcpu*::run'``, which counts only
inside the core's KVM_RUN, at two sizes; the difference, divided by the difference
in guest instructions (or pages), is the steady-state cost: one-time costs (iced's
decoder tables, the first decodes, the VM's setup) cancel out. ``--top`` prints the
functions with the largest self cost per unit (from ``callgrind_annotate``).

(Internally: ``python benches/run_callgrind.py --child KIND N CPL`` is the program
valgrind runs.)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

import kvmmmu
from kvmmmu import exits
from kvmmmu.guest import programs
from kvmmmu.guest.builder import Guest

#: case -> (program, cpl, small n, large n, units per n (guest instructions or pages))
CASES: dict[str, tuple[str, int, int, int, int, str]] = {
    "compute_cpl0": ("compute", 0, 1000, 11000, 4, "Ir/insn"),
    "compute_cpl3": ("compute", 3, 1000, 11000, 4, "Ir/insn"),
    "first_touch_cpl3": ("touch", 3, 256, 2304, 1, "Ir/page"),
    "first_touch_cpl0": ("touch", 0, 256, 2304, 1, "Ir/page"),
}
TOGGLE = "*Vcpu*::run"


def child(kind: str, n: int, cpl: int) -> None:
    """One simulator run() of the program (what valgrind measures)."""
    g = Guest("lm64")
    if kind == "compute":
        programs.compute_loop(g, n, cpl=cpl)
    else:
        mem = g.add_slot(1, 0x100_0000, n * 4096)
        mem.write(0, bytes(n * 4096))
        programs.touch_pages(g, 0x4000_0000, 0x100_0000, n, cpl=cpl)
    with kvmmmu.Kvm() as kvm:
        m = g.boot(kvm, cpl=cpl)
        e = m.vcpu.run()
        assert isinstance(e, exits.ExitMmio if cpl else exits.ExitHlt), str(e)
        if kind == "touch":
            fixed = m.vcpu.stats()["pf_fixed"]
            assert isinstance(fixed, int) and fixed >= n, fixed
        m.vcpu.close()
        m.vm.close()


def _callgrind(out: str, kind: str, n: int, cpl: int) -> int:
    cmd = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        f"--toggle-collect={TOGGLE}",
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        kind,
        str(n),
        str(cpl),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    m = re.search(r"Collected : ([\d,]+)", r.stderr)
    if m is None:
        raise RuntimeError(f"no callgrind total in:\n{r.stderr[-2000:]}")
    return int(m.group(1).replace(",", ""))


def _self_costs(path: str) -> dict[str, int]:
    """Self cost per function (file:function, object stripped) of a callgrind file."""
    text = subprocess.run(
        ["callgrind_annotate", "--inclusive=no", "--auto=no", "--threshold=100", path],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    costs: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+) \([^)]*\)\s+(\S.*)$", line)
        if m is None or "PROGRAM TOTALS" in line:
            continue
        name = re.sub(r"\s*\[[^\]]*\]$", "", m.group(2)).split(":", 1)[-1]
        costs[name] = costs.get(name, 0) + int(m.group(1).replace(",", ""))
    return costs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--top", type=int, default=0, help="functions to list per case")
    ap.add_argument("--child", nargs=3, metavar=("KIND", "N", "CPL"), help=argparse.SUPPRESS)
    ap.add_argument("cases", nargs="*", default=list(CASES), help=f"of {list(CASES)}")
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            kind, cpl, small, large, per, unit = CASES[case]
            files = [os.path.join(tmp, f"{case}.{n}") for n in (small, large)]
            ir = [_callgrind(f, kind, n, cpl) for f, n in zip(files, (small, large), strict=True)]
            units = (large - small) * per
            print(f"{case:<18} {(ir[1] - ir[0]) / units:8.0f} {unit}")
            if args.top:
                a, b = (_self_costs(f) for f in files)
                rows = sorted(((b.get(k, 0) - a.get(k, 0)) / units, k) for k in set(a) | set(b))
                for cost, name in rows[::-1][: args.top]:
                    print(f"    {cost:8.1f}  {name[:150]}")


if __name__ == "__main__":
    main()
