"""The shared errno case table, on both backends, and their parity."""

from __future__ import annotations

import pytest

import kvmmmu
from kvmmmu.conformance import CASES, Case, run_case


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES), "case names must be unique"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_case(kvm: kvmmmu.Kvm, case: Case) -> None:
    got = run_case(kvm, case)
    assert case.holds(got, kvm.backend), (
        f"{case.name}: got {got}, want {case.expected(kvm.backend)}"
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_parity(sim_kvm: kvmmmu.Kvm, dev_kvm: kvmmmu.Kvm, case: Case) -> None:
    """The simulator answers as the device does, except where documented."""
    a, b = run_case(sim_kvm, case), run_case(dev_kvm, case)
    if case.sim_expect is not None:
        assert case.why, "a deliberate difference needs a reason"
        assert case.holds(a, "sim") and case.holds(b, "dev")
        assert a != b, "a documented difference that no longer differs: drop sim_expect"
    else:
        assert a == b, f"{case.name}: sim {a} != dev {b}"
