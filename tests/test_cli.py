"""The kvmmmu command: the guided tour and the conformance run."""

from __future__ import annotations

import pytest

from kvmmmu.cli import main

from .conftest import DEVICE, DEVICE_PROBLEM


def test_tour_on_the_simulator(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--no-device"]) == 0
    out = capsys.readouterr().out
    assert "KVM_GET_API_VERSION = 12" in out
    assert "slot 2 overlapping slot 0: EEXIST" in out
    assert "close guest memory while a slot uses it: EBUSY" in out
    assert "SET_SREGS with EFER.LMA but no CR4.PAE: EINVAL" in out
    assert "skipped: --no-device given" in out


def test_caps_lists_the_simulator(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["caps"]) == 0
    out = capsys.readouterr().out
    assert "KVM_CAP_USER_MEMORY" in out and "KVM_CAP_NR_MEMSLOTS" in out


@pytest.mark.skipif(DEVICE_PROBLEM is not None, reason=f"no usable KVM device: {DEVICE_PROBLEM}")
def test_tour_and_conformance_on_the_device(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--device", DEVICE]) == 0
    out = capsys.readouterr().out
    assert "== The device (/dev/kvm) ==" in out
    assert "or differ exactly as documented" in out
    assert main(["conformance", "--device", DEVICE]) == 0
