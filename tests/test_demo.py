"""The bundled demo guest (``kvmmmu run``): what it does on the device here, and the
same exit sequence, guest-reported faults, memory, A/D bits, dirty pages and
counters on the simulator."""

from __future__ import annotations

import pytest

import kvmmmu
from kvmmmu.cli import main
from kvmmmu.guest import demo
from kvmmmu.guest.stubs import ExceptionReport

from .conftest import DEVICE, DEVICE_PROBLEM, make_kvm

needs_device = pytest.mark.skipif(
    DEVICE_PROBLEM is not None, reason=f"no usable KVM device: {DEVICE_PROBLEM}"
)

EXPECTED_DIRTY = [0, 1, 2, 4, 5, 8, 10, 11, 12, 20]
EXPECTED_DATA = {
    0: 0x1111, 1: 0x2222, 2: 0x3333, 4: demo.DEV_READ_VALUE, 5: 0x5555, 8: 0x8888,
    10: 0xAAAA, 11: 0xBBBB, 12: 0xCCCC, 20: 0x2020,
}  # fmt: skip


def run_demo(backend: str) -> demo.DemoResult:
    with make_kvm(backend) as kvm:
        return demo.run(kvm)


def check_demo(res: demo.DemoResult) -> None:
    assert res.events[-1].note == "the demo is done", [str(e) for e in res.events]
    posts = [e.exit.value for e in res.events if e.note.startswith("phase")]  # type: ignore[attr-defined]
    assert posts == [1, 2, 3, 4, 5, 6, 7]
    g = demo.build()
    g.build()
    labels = g.labels
    assert res.reports == [
        ExceptionReport(14, demo.DATA_VA + 10 * demo.PAGE, 0x2, labels["pf_retry"]),
        ExceptionReport(14, demo.DATA_VA + 13 * demo.PAGE, 0x7, labels["user_fault"]),
    ]
    shown = [e.exit.value for e in res.events if e.note.startswith("guest shows")]  # type: ignore[attr-defined]
    # CR3 switched back; the MMIO read's answer; the stale CPL3 read; after INVLPG
    assert shown == [0x1111, demo.DEV_READ_VALUE, 0xBBBB, 0]
    assert res.dirty_pages == EXPECTED_DIRTY
    assert res.data == EXPECTED_DATA
    # A on every PTE used, D where written; the remapped page-11 PTE only read since
    assert res.ad_bits[3] == "A" and res.ad_bits[11] == "A" and res.ad_bits[13] == ""
    assert all(res.ad_bits[p] == "AD" for p in (0, 1, 2, 4, 5, 7, 10, 12))
    assert res.vm_stats["mmu_unsync"] >= 1  # the CPL3 stale read went through an unsync SP
    assert res.vcpu_stats["pf_guest"] == 2


@needs_device
def test_demo_on_the_device() -> None:
    res = run_demo("dev")
    check_demo(res)
    assert len(res.events) == 27


def test_demo_on_the_simulator() -> None:
    check_demo(run_demo("sim"))


@needs_device
def test_demo_is_the_same_on_both_backends() -> None:
    dev, sim = run_demo("dev"), run_demo("sim")
    assert sim.exits == dev.exits
    assert sim.reports == dev.reports
    assert sim.data == dev.data
    assert sim.ad_bits == dev.ad_bits
    assert sim.dirty_pages == dev.dirty_pages
    # CPL3 ran natively on the device's shadow MMU: the counters both count the same way
    for k in ("pf_guest", "invlpg"):
        assert sim.vcpu_stats[k] == dev.vcpu_stats[k], k
    assert sim.vm_stats["mmu_unsync"] == dev.vm_stats["mmu_unsync"]


def test_the_demo_is_in_the_package() -> None:
    g = demo.build()
    g.build()
    assert {"start", "pf_retry", "pf_fixup", "user_fault", "user_after", "done"} <= set(g.labels)
    assert len(g.slots) == 2 and g.slots[1].flags == kvmmmu.KVM_MEM_LOG_DIRTY_PAGES


@needs_device
def test_cli_run_on_the_device(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--backend", "dev", "--device", DEVICE]) == 0
    out = capsys.readouterr().out
    assert "27 exits; guest exceptions: #PF error_code=0x2" in out
    assert "host IRET to pf_fixup" in out
    assert f"dirty pages of the data slot (slot 1, gpa 0x1000000): {EXPECTED_DIRTY}" in out
    assert "mmu_unsync=1" in out and "pf_fixed=" in out
    assert main(["run", "--backend", "dev", "--device", DEVICE, "--quiet"]) == 0
    quiet = capsys.readouterr().out
    assert "exits:" not in quiet and "27 exits" in quiet


def test_cli_run_dot_needs_the_simulator(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--backend", "dev", "--dot", "x.dot"]) == 2


def test_cli_run_default_is_the_simulator(
    capsys: pytest.CaptureFixture[str], tmp_path: object
) -> None:
    path = f"{tmp_path}/mmu.dot"
    rc = main(["run", "--dot", path])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert main([]) == 0  # no arguments: the same run
    assert "27 exits" in capsys.readouterr().out
    assert "on the simulator" in out and "shadow pages written to" in out
    with open(path) as f:
        assert f.read().startswith("digraph")
