"""The transport is public: a raw KVM program runs on the simulator by swapping
os.open / fcntl.ioctl / mmap.mmap / os.close for the simulator transport's calls."""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import threading
from typing import Any

import pytest

import kvmmmu
from kvmmmu import _core, uapi
from kvmmmu.transport import DevTransport, SimTransport

from .conftest import DEVICE, DEVICE_PROBLEM


class RawProgram:
    """A VMM written the way raw-KVM Python programs are: file descriptors, request
    numbers, ctypes structs (passed by buffer and by address), mmap'ed kvm_run."""

    def __init__(self, open_: Any, ioctl: Any, mmap_: Any, close: Any) -> None:
        self.open, self.ioctl, self.mmap, self.close = open_, ioctl, mmap_, close

    def run(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        kvm = self.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        out["api"] = self.ioctl(kvm, uapi.KVM_GET_API_VERSION, 0)
        out["user_memory"] = self.ioctl(kvm, uapi.KVM_CHECK_EXTENSION, uapi.KVM_CAP_USER_MEMORY)
        size = self.ioctl(kvm, uapi.KVM_GET_VCPU_MMAP_SIZE, 0)
        vm = self.ioctl(kvm, uapi.KVM_CREATE_VM, 0)
        mem = self.mmap(-1, 1 << 21, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        hva = ctypes.addressof(ctypes.c_char.from_buffer(mem))
        region = uapi.kvm_userspace_memory_region(
            slot=0, guest_phys_addr=0, memory_size=1 << 21, userspace_addr=hva
        )
        # by address (an int pointer), the way a C program passes &region
        self.ioctl(vm, uapi.KVM_SET_USER_MEMORY_REGION, ctypes.addressof(region))
        try:
            self.ioctl(vm, uapi.KVM_SET_USER_MEMORY_REGION, bytes(region).replace(b"\0", b"\0"))
            out["same region again"] = 0
        except OSError as e:
            out["same region again"] = e.errno
        region.slot = 1
        try:
            self.ioctl(vm, uapi.KVM_SET_USER_MEMORY_REGION, region)
        except OSError as e:
            out["overlap"] = e.errno
        vcpu = self.ioctl(vm, uapi.KVM_CREATE_VCPU, 0)
        run_area = self.mmap(vcpu, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        run = uapi.kvm_run.from_buffer(run_area)
        out["exit_reason"] = run.exit_reason
        regs = uapi.kvm_regs()
        self.ioctl(vcpu, uapi.KVM_GET_REGS, regs)  # mutable buffer, filled in place
        out["rip"] = regs.rip
        regs.rip, regs.rax = 0x1000, 42
        self.ioctl(vcpu, uapi.KVM_SET_REGS, regs)
        raw = self.ioctl(vcpu, uapi.KVM_GET_REGS, bytes(ctypes.sizeof(uapi.kvm_regs)))
        out["regs via bytes"] = uapi.kvm_regs.from_buffer_copy(raw).rax
        try:
            self.ioctl(vcpu, uapi.KVM_GET_REGS, 0)
        except OSError as e:
            out["NULL"] = e.errno
        del run
        run_area.close()
        for fd in (vcpu, vm, kvm):
            self.close(fd)
        del mem
        return out


EXPECTED = {
    "api": 12,
    "user_memory": 1,
    "same region again": 0,
    "overlap": 17,
    "exit_reason": 0,
    "rip": 0xFFF0,
    "regs via bytes": 42,
    "NULL": 14,
}


def test_raw_program_on_the_simulator() -> None:
    # A core of its own: the shared one may hold descriptors of objects other tests
    # left to the garbage collector.
    sim = SimTransport(_core.SimKvm())

    def mmap_(fd: int, length: int, flags: int = mmap.MAP_SHARED, prot: int = 3) -> Any:
        return sim.mmap(fd, length, flags, prot)

    assert RawProgram(sim.open, sim.ioctl, mmap_, sim.close).run() == EXPECTED
    assert sim.core.fds() == []


@pytest.mark.skipif(DEVICE_PROBLEM is not None, reason=f"no usable KVM device: {DEVICE_PROBLEM}")
def test_raw_program_on_the_device() -> None:
    dev = DevTransport(DEVICE)

    def dev_mmap(fd: int, length: int, flags: int, prot: int = 3) -> Any:
        if fd == -1:
            return mmap.mmap(-1, length, flags, prot)
        return mmap.mmap(fd, length, flags, prot)

    assert RawProgram(os.open, dev.ioctl, dev_mmap, os.close).run() == EXPECTED


def test_sim_fds_are_real_process_fds() -> None:
    sim = SimTransport()
    fd = sim.open()
    assert os.fstat(fd)  # a real descriptor: its number cannot collide with another file
    assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:kvmmmu-kvm")
    sim.close(fd)
    with pytest.raises(OSError) as e:
        sim.ioctl(fd, uapi.KVM_GET_API_VERSION, 0)
    assert e.value.errno == 9  # EBADF
    with pytest.raises(OSError) as e:
        sim.close(fd)
    assert e.value.errno == 9


def test_sim_mmap_of_system_or_vm_fd_is_refused() -> None:
    sim = SimTransport()
    kvm = sim.open()
    vm = sim.ioctl(kvm, uapi.KVM_CREATE_VM, 0)
    for fd in (kvm, vm):
        with pytest.raises(OSError) as e:
            sim.mmap(fd, 4096)
        assert e.value.errno == 19  # ENODEV
    sim.close(vm)
    sim.close(kvm)


def test_kvm_run_is_shared_with_the_core(kvm: kvmmmu.Kvm) -> None:
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    assert ctypes.sizeof(vcpu.kvm_run) == 2352
    # ``vcpu.run`` not called is the same struct, for older code
    assert vcpu.run is vcpu.kvm_run
    vcpu.kvm_run.immediate_exit = 1
    # a second mapping of the same vCPU file sees the same page
    other = kvm.transport.mmap(vcpu.fd, kvm.get_vcpu_mmap_size())
    assert uapi.kvm_run.from_buffer(other).immediate_exit == 1
    vcpu.close()
    vm.close()


def test_objects_close_their_fds(kvm: kvmmmu.Kvm) -> None:
    before = set(os.listdir("/proc/self/fd"))
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        assert vcpu.fd > 2
    assert vm.closed
    with pytest.raises(ValueError):
        _ = vm.fd
    vcpu.close()
    vcpu.close()  # idempotent
    # garbage collection closes too
    vm2 = kvm.create_vm()
    vm2.create_vcpu(0)
    del vm2
    gc.collect()
    assert set(os.listdir("/proc/self/fd")) <= before


def test_errors_are_oserror_subclasses(kvm: kvmmmu.Kvm) -> None:
    vm = kvm.create_vm()
    vm.create_vcpu(0)
    with pytest.raises(FileExistsError):
        vm.create_vcpu(0)
    with pytest.raises(OSError) as e:
        vm.ioctl(uapi.KVM_GET_REGS, 0)
    assert e.value.errno == 25  # ENOTTY
    vm.close()


def test_capabilities_report_what_the_simulator_implements(sim_kvm: kvmmmu.Kvm) -> None:
    caps = sim_kvm.capabilities()
    assert caps["KVM_CAP_USER_MEMORY"] == 1
    assert caps["KVM_CAP_NR_MEMSLOTS"] == 32764
    assert caps["KVM_CAP_MAX_VCPU_ID"] == 4096
    assert caps["KVM_CAP_READONLY_MEM"] == 1
    # MANUAL_PROTECT_ENABLE | INITIALLY_SET, as the device reports
    assert caps["KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"] == 3
    # not implemented yet: must not be claimed
    assert caps["KVM_CAP_DIRTY_LOG_RING"] == caps["KVM_CAP_DIRTY_LOG_RING_ACQ_REL"] == 1 << 20
    for name in ("KVM_CAP_X86_SMM",):
        assert name not in caps
    # the Rust-side listing and KVM_CHECK_EXTENSION agree
    listed = kvmmmu._core.supported_capabilities()
    assert {uapi.CAPS[n]: v for n, v in listed.items()} == caps


@pytest.mark.skipif(DEVICE_PROBLEM is not None, reason=f"no usable KVM device: {DEVICE_PROBLEM}")
def test_simulator_caps_are_a_subset_of_the_device(sim_kvm: kvmmmu.Kvm) -> None:
    """What the simulator claims, the device has too, with the same value."""
    with kvmmmu.Kvm(DEVICE) as dev:
        theirs = dev.capabilities()
    ours = sim_kvm.capabilities()
    assert {k: theirs.get(k) for k in ours} == ours


def test_threads_can_share_a_vcpu(sim_kvm: kvmmmu.Kvm) -> None:
    vm = sim_kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            for _ in range(2000):
                r = vcpu.get_regs()
                vcpu.set_regs(r)
        except BaseException as e:
            errors.append(e)

    ts = [threading.Thread(target=hammer) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    vm.close()
    vcpu.close()
