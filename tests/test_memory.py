"""GuestMemory: lazily backed, viewable, and never freed under a memory slot."""

from __future__ import annotations

import ctypes
import gc

import numpy as np
import pytest

import kvmmmu
from kvmmmu import GuestMemory, uapi

TiB = 1 << 40


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_16_tib_costs_nothing_until_touched() -> None:
    before = _rss_kib()
    mem = GuestMemory(16 * TiB)
    assert mem.size == 16 * TiB
    for i in range(16):
        mem.write(i * TiB, b"x")
    assert _rss_kib() - before < 16 * 1024, "16 touched pages must not cost megabytes"
    assert mem.read(5 * TiB, 2) == b"x\0"
    mem.close()


def test_size_rounds_up_and_zero_is_refused() -> None:
    with GuestMemory(1) as m:
        assert m.size == 4096
    with pytest.raises(OSError):
        GuestMemory(0)


def test_buffer_and_numpy_views_share_memory() -> None:
    mem = GuestMemory(1 << 20)
    view = memoryview(mem)
    assert view.nbytes == 1 << 20 and not view.readonly
    view[100] = 7
    arr = np.frombuffer(mem, dtype=np.uint64)
    arr[1] = 0x1122334455667788
    assert mem.read(8, 8) == bytes.fromhex("8877665544332211")
    assert mem.read(100, 1) == b"\x07"
    # a view pins the mapping: closing now would leave it dangling
    with pytest.raises(BufferError):
        mem.close()
    del view, arr
    gc.collect()
    mem.close()
    assert mem.closed
    with pytest.raises(ValueError):
        memoryview(mem)
    with pytest.raises(ValueError):
        mem.read(0, 1)


def test_out_of_range_access_is_refused() -> None:
    with GuestMemory(8192) as m:
        with pytest.raises(ValueError):
            m.read(8190, 4)
        with pytest.raises(ValueError):
            m.write(8192, b"x")


def test_slot_pins_memory_until_vm_closes(kvm: kvmmmu.Kvm) -> None:
    mem = GuestMemory(1 << 20)
    vm = kvm.create_vm()
    vm.set_user_memory_region(0, 0, mem.size, mem)
    vcpu = vm.create_vcpu(0)
    with pytest.raises(OSError) as e:
        mem.close()
    assert e.value.errno == 16  # EBUSY
    # deleting the slot is not enough while the VM's files are open
    vm.set_user_memory_region(0, 0, 0, 0)
    with pytest.raises(OSError):
        mem.close()
    vm.close()
    with pytest.raises(OSError):
        mem.close()  # the vCPU file still holds the VM
    vcpu.close()
    mem.close()


def test_slot_memory_survives_losing_the_python_object(kvm: kvmmmu.Kvm) -> None:
    vm = kvm.create_vm()
    mem = GuestMemory(1 << 20)
    addr = mem.address
    vm.set_user_memory_region(0, 0, 1 << 20, mem)
    mem.write(0, b"kept")
    del mem
    gc.collect()
    # the mapping is still there (pinned by the slot): reading it must not crash
    buf = (ctypes.c_char * 4).from_address(addr)
    assert bytes(buf) == b"kept"
    vm.close()


def test_simulator_refuses_memory_it_does_not_own(sim_kvm: kvmmmu.Kvm) -> None:
    vm = sim_kvm.create_vm()
    foreign = ctypes.create_string_buffer(3 * 4096)
    hva = (ctypes.addressof(foreign) + 4095) & ~4095
    with pytest.raises(OSError) as e:
        vm.set_user_memory_region(0, 0, 4096, hva)
    assert e.value.errno == 14  # EFAULT: not host memory the core owns or pins
    # memory from the transport's anonymous mmap is the core's
    mem = sim_kvm.transport.mmap(-1, 1 << 20)
    vm.set_user_memory_region(0, 0, 1 << 20, mem.address)
    vm.close()


def test_slot_region_must_lie_inside_one_mapping(sim_kvm: kvmmmu.Kvm) -> None:
    vm = sim_kvm.create_vm()
    mem = GuestMemory(1 << 20)
    with pytest.raises(OSError) as e:
        vm.set_user_memory_region(0, 0, 2 << 20, mem.address)
    assert e.value.errno == 14
    vm.set_user_memory_region(0, 0, 1 << 19, mem.address + (1 << 19))
    region = vm.slots[0]
    assert isinstance(region, uapi.kvm_userspace_memory_region)
    vm.close()
