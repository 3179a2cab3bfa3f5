"""Backends for the tests: every behaviour test runs on the simulator and, when
/dev/kvm is usable here, on the device; the device half skips with the reason."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import kvmmmu

DEVICE = os.environ.get("KVMMMU_DEVICE", "/dev/kvm")
DEVICE_PROBLEM = kvmmmu.device_available(DEVICE)


def make_kvm(backend: str) -> kvmmmu.Kvm:
    if backend == "sim":
        return kvmmmu.Kvm()
    if DEVICE_PROBLEM is not None:
        pytest.skip(f"no usable KVM device: {DEVICE_PROBLEM}")
    return kvmmmu.Kvm(DEVICE)


@pytest.fixture(params=["sim", "dev"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def kvm(backend: str) -> Iterator[kvmmmu.Kvm]:
    k = make_kvm(backend)
    yield k
    k.close()


@pytest.fixture
def sim_kvm() -> Iterator[kvmmmu.Kvm]:
    k = kvmmmu.Kvm()
    yield k
    k.close()


@pytest.fixture
def dev_kvm() -> Iterator[kvmmmu.Kvm]:
    k = make_kvm("dev")
    yield k
    k.close()
