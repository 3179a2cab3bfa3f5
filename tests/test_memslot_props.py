"""Property tests: random memory-slot sequences give the same errnos on the
simulator as on the device, and the simulator's slot table stays consistent."""

from __future__ import annotations

import errno

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvmmmu
from kvmmmu import GuestMemory

from .conftest import DEVICE, DEVICE_PROBLEM

MiB = 1 << 20
PAGE = 4096

slot_ids = st.sampled_from([0, 1, 2, 3, 32763, 32764, 0x10000])
gpas = st.sampled_from([0, PAGE, MiB, 2 * MiB, 3 * MiB + PAGE, 1 << 32, (1 << 52) - MiB, 0x800])
sizes = st.sampled_from([0, PAGE, 2 * PAGE, MiB, 2 * MiB, 100])
offsets = st.sampled_from([0, PAGE, MiB, 3 * MiB, 8])
flags = st.sampled_from([0, 1, 2, 3, 4, 8])
ops = st.lists(st.tuples(slot_ids, gpas, sizes, offsets, flags), min_size=1, max_size=12)


def _apply(vm: kvmmmu.Vm, mem: GuestMemory, op: tuple[int, int, int, int, int]) -> int:
    slot, gpa, size, off, fl = op
    try:
        vm.set_user_memory_region(slot, gpa, size, mem.address + off, fl)
        return 0
    except OSError as e:
        return e.errno or -1


class SlotModel:
    """api.txt 4.34 as a few lines of Python: the oracle for the simulator alone."""

    def __init__(self) -> None:
        self.slots: dict[int, tuple[int, int, int, int]] = {}  # id -> (gpa, size, off, flags)

    def apply(self, op: tuple[int, int, int, int, int]) -> int:
        slot, gpa, size, off, fl = op
        if fl & ~3 or (slot & 0xFFFF) >= 32764 or slot >> 16:
            return errno.EINVAL
        if size % PAGE or gpa % PAGE or off % PAGE:
            return errno.EINVAL
        old = self.slots.get(slot)
        if size == 0:
            if old is None:
                return errno.EINVAL
            del self.slots[slot]
            return 0
        if old is not None:
            if off != old[2] or size != old[1] or (fl ^ old[3]) & 2:
                return errno.EINVAL
            if gpa == old[0]:
                self.slots[slot] = (gpa, size, off, fl)
                return 0
        for other, (g, s, _, _) in self.slots.items():
            if other != slot and gpa < g + s and g < gpa + size:
                return errno.EEXIST
        if gpa + size > 1 << 52:
            return errno.EINVAL
        if off + size > 4 * MiB:
            return errno.EFAULT  # simulator only: outside the GuestMemory
        self.slots[slot] = (gpa, size, off, fl)
        return 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_simulator_follows_the_slot_rules(seq: list[tuple[int, int, int, int, int]]) -> None:
    model = SlotModel()
    with kvmmmu.Kvm() as kvm, kvm.create_vm() as vm:
        mem = GuestMemory(4 * MiB)
        for op in seq:
            assert _apply(vm, mem, op) == model.apply(op), op
        assert {s: (r.guest_phys_addr, r.memory_size) for s, r in vm.slots.items()} == {
            s: (g, sz) for s, (g, sz, _, _) in model.slots.items()
        }


@pytest.mark.skipif(DEVICE_PROBLEM is not None, reason=f"no usable KVM device: {DEVICE_PROBLEM}")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_simulator_and_device_agree(seq: list[tuple[int, int, int, int, int]]) -> None:
    # The memory covers every offset + size used, so the simulator's EFAULT rule never fires.
    with kvmmmu.Kvm() as sim, kvmmmu.Kvm(DEVICE) as dev:
        with sim.create_vm() as a, dev.create_vm() as b:
            mem_a, mem_b = GuestMemory(8 * MiB), GuestMemory(8 * MiB)
            for op in seq:
                assert _apply(a, mem_a, op) == _apply(b, mem_b, op), op
