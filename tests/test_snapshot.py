"""Save/restore of a vCPU's state as a plain dict, within and across backends."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

import kvmmmu
from kvmmmu.snapshot import PARTS, diff, restore_vcpu, save_vcpu

from .conftest import DEVICE, DEVICE_PROBLEM, make_kvm

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "save_restore.py"
example = runpy.run_path(str(EXAMPLE))


def _round_trip(src: str, dst: str) -> tuple[dict, dict]:
    a_kvm, b_kvm = make_kvm(src), make_kvm(dst)
    with a_kvm.create_vm() as vm_a, vm_a.create_vcpu(0) as a:
        example["prepare"](a)
        saved = json.loads(json.dumps(save_vcpu(a)))
    with b_kvm.create_vm() as vm_b, vm_b.create_vcpu(0) as b:
        restore_vcpu(b, saved)
        return saved, save_vcpu(b)


def test_snapshot_is_plain_data() -> None:
    with kvmmmu.Kvm() as kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        state = save_vcpu(vcpu)
    assert tuple(state) == PARTS
    assert json.loads(json.dumps(state)) == state
    assert state["regs"]["rip"] == 0xFFF0 and state["mp_state"] == 0


@pytest.mark.parametrize(("src", "dst"), [("sim", "sim"), ("dev", "sim"), ("dev", "dev")])
def test_restore_gives_the_same_state(src: str, dst: str) -> None:
    saved, restored = _round_trip(src, dst)
    assert diff(saved, restored) == []
    assert saved["sregs"]["efer"] == 0xD01  # the prepared long-mode state really travelled
    assert saved["events"]["nmi"]["pending"] == 1


@pytest.mark.skipif(DEVICE_PROBLEM is not None, reason=f"no usable KVM device: {DEVICE_PROBLEM}")
def test_simulator_state_restored_on_the_device() -> None:
    """Only the CPUID table differs: the device's PVM module rewrites it on KVM_SET_CPUID2
    (docs/device-cpuid.md); every other part arrives unchanged."""
    saved, restored = _round_trip("sim", "dev")
    differences = diff(saved, restored)
    assert differences, "the device is expected to rewrite the CPUID table"
    assert all(line.startswith("cpuid") for line in differences), differences


def test_example_script_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(EXAMPLE)] + (["--device", DEVICE] if DEVICE_PROBLEM is None else [])
    monkeypatch.setattr(sys, "argv", argv)
    assert example["main"]() == 0
    out = capsys.readouterr().out
    assert "simulator -> simulator: equal" in out
    if DEVICE_PROBLEM is None:
        assert "device -> simulator: equal" in out
