"""Pictures of the shadow MMU: render ``vm.mmu.to_dot()`` with Graphviz.

::

    from kvmmmu import dot
    dot.save(vm.mmu.to_dot(), "mmu.svg")        # needs Graphviz's `dot` on PATH
    svg = dot.render(vm.mmu.to_dot(), "svg")    # bytes

Graphviz is not a dependency: :func:`available` says whether it is installed, and
the DOT text itself can be pasted into any Graphviz viewer.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

PROGRAM = "dot"


def available(program: str = PROGRAM) -> bool:
    """Whether Graphviz's `program` is on PATH."""
    return shutil.which(program) is not None


def render(source: str, fmt: str = "svg", *, program: str = PROGRAM) -> bytes:
    """Run ``dot -T<fmt>`` on `source`; FileNotFoundError without Graphviz,
    CalledProcessError (with Graphviz's message) if it rejects the input."""
    exe = shutil.which(program)
    if exe is None:
        raise FileNotFoundError(f"Graphviz's {program!r} is not installed")
    r = subprocess.run([exe, f"-T{fmt}"], input=source.encode(), capture_output=True, check=False)
    if r.returncode != 0:
        raise subprocess.CalledProcessError(r.returncode, r.args, r.stdout, r.stderr)
    return r.stdout


def save(source: str, path: str | Path, *, program: str = PROGRAM) -> Path:
    """Write `source` rendered in the format of `path`'s suffix (".svg", ".png",
    ".pdf", ...); a ".dot" or ".gv" path gets the DOT text itself."""
    p = Path(path)
    fmt = p.suffix.lstrip(".") or "svg"
    if fmt in ("dot", "gv"):
        p.write_text(source)
    else:
        p.write_bytes(render(source, fmt, program=program))
    return p
