"""Differential conformance: the same cases on the simulator and on /dev/kvm.

``CASES`` (in :mod:`.cases`) is one table of edge and bad inputs with the
result the real kernel gives; :func:`run_case` runs one on a fresh VM of a
backend and returns what happened, and :func:`compare` runs the table on both
backends and lists the disagreements.
"""

from .cases import CASES as FOUNDATION_CASES
from .cases import Case, Env, Outcome, compare, run_case
from .cases_cpuid import CPUID_CASES
from .cases_state import STATE_CASES

#: Every case: memory slots, descriptors, sregs, VM state, CPUID, vCPU state.
CASES: list[Case] = [*FOUNDATION_CASES, *STATE_CASES, *CPUID_CASES]

__all__ = [
    "CASES",
    "CPUID_CASES",
    "FOUNDATION_CASES",
    "STATE_CASES",
    "Case",
    "Env",
    "Outcome",
    "compare",
    "run_case",
]
