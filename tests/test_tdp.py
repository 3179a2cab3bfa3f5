"""Two-dimensional paging on the simulator (``create_vm(mmu="tdp")``): direct
gpa -> hpa tables, the guest's own tables walked by the CPU, the same audit."""

from __future__ import annotations

import pytest

import kvmmmu
from kvmmmu import GuestMemory, GuestPageFault
from kvmmmu.guest.paging import P, PageTables, U, W

MiB = 1 << 20
GVA = 0x4000_0000


class _Mem:
    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.mem.read(gpa, length))

    def write(self, gpa: int, data: bytes) -> None:
        self.mem.write(gpa, data)


def _guest(mode: str) -> tuple[kvmmmu.Vm, kvmmmu.Vcpu, PageTables]:
    kvm = kvmmmu.Kvm()
    vm = kvm.create_vm(mmu=mode)
    mem = GuestMemory(16 * MiB)
    vm.set_user_memory_region(0, 0, 16 * MiB, mem.address)
    pt = PageTables(_Mem(mem), "4-level", pool=8 * MiB)
    for i in range(4):
        pt.map(GVA + i * 4096, MiB + i * 4096, flags=P | W | U)
    vcpu = vm.create_vcpu(0)
    s = vcpu.get_sregs()
    s.cr3, s.cr0, s.cr4, s.efer = pt.cr3, 0x8001_0011, 0x20, 0xD00
    s.cs.l = 1
    vcpu.set_sregs(s)
    return vm, vcpu, pt


def test_tdp_mode_maps_guest_physical_memory_directly() -> None:
    vm, vcpu, _ = _guest("tdp")
    assert vm.mmu.mode == "tdp"
    vcpu.mmu.write(GVA, 0x1234, cpl=3)
    assert vcpu.mmu.read(GVA, cpl=3) == 0x1234
    vm.mmu.audit()
    pages = vm.mmu.shadow_pages()
    assert pages and all(p.direct for p in pages)
    assert vm.mmu.indirect_shadow_pages == 0


def test_tdp_guest_faults_do_not_reach_kvm() -> None:
    vm, vcpu, _ = _guest("tdp")
    with pytest.raises(GuestPageFault) as e:
        vcpu.mmu.read(GVA + 0x20_0000, cpl=3)
    assert e.value.error_code == 0x4
    assert vcpu.stats()["pf_guest"] == 0
    vcpu.mmu.invlpg(GVA)
    assert vcpu.stats()["invlpg"] == 0
    vm.mmu.audit()


def test_tdp_guest_sees_its_table_edits_without_tlb_maintenance() -> None:
    vm, vcpu, pt = _guest("tdp")
    assert vcpu.mmu.read(GVA) == 0
    pt.map(GVA, MiB + 4096, flags=P | W | U)
    vcpu.mmu.write(GVA + 4096, 99)
    assert vcpu.mmu.read(GVA) == 99
    vm.mmu.audit()


def test_shadow_is_the_default_and_tdp_is_simulator_only(backend: str) -> None:
    kvm = kvmmmu.Kvm() if backend == "sim" else kvmmmu.Kvm("/dev/kvm")
    if backend == "sim":
        assert kvm.create_vm().mmu.mode == "shadow"
    else:
        with pytest.raises(NotImplementedError):
            kvm.create_vm(mmu="tdp")
    with pytest.raises(ValueError):
        kvm.create_vm(mmu="npt")
