"""Differential conformance: the same cases on the simulator and on /dev/kvm.

``CASES`` (in :mod:`.cases`) is one table of edge and bad inputs with the
result the real kernel gives; :func:`run_case` runs one on a fresh VM of a
backend and returns what happened, and :func:`compare` runs the table on both
backends and lists the disagreements.
"""

from .cases import CASES, Case, Env, Outcome, compare, run_case

__all__ = ["CASES", "Case", "Env", "Outcome", "compare", "run_case"]
