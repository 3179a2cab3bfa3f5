"""Host translation updates through the Python API (simulator): the host discards,
migrates, write-protects or ages guest memory, and the shadow MMU follows."""

from __future__ import annotations

import pytest

import kvmmmu
from kvmmmu import GuestMemory
from kvmmmu.guest.paging import P, PageTables, U, W

MiB = 1 << 20
GVA = 0x4000_0000
DATA = MiB


class _Mem:
    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.mem.read(gpa, length))

    def write(self, gpa: int, data: bytes) -> None:
        self.mem.write(gpa, data)


@pytest.fixture
def guest() -> tuple[kvmmmu.Vm, kvmmmu.Vcpu, GuestMemory]:
    kvm = kvmmmu.Kvm()
    vm = kvm.create_vm()
    mem = GuestMemory(16 * MiB)
    vm.set_user_memory_region(0, 0, 16 * MiB, mem.address)
    pt = PageTables(_Mem(mem), "4-level", pool=8 * MiB)
    for i in range(4):
        pt.map(GVA + i * 4096, DATA + i * 4096, flags=P | W | U)
    vcpu = vm.create_vcpu(0)
    s = vcpu.get_sregs()
    s.cr3, s.cr0, s.cr4, s.efer = pt.cr3, 0x8001_0011, 0x20, 0xD00
    s.cs.l = 1
    vcpu.set_sregs(s)
    return vm, vcpu, mem


def test_discard_zaps_and_the_guest_reads_zero(guest) -> None:  # type: ignore[no-untyped-def]
    vm, vcpu, mem = guest
    vcpu.mmu.write(GVA, 0x1234, cpl=3)
    vm.mmu.host_discard(mem.address + DATA, 4096)
    vm.mmu.audit()
    assert vcpu.mmu.read(GVA, cpl=3) == 0
    vm.mmu.audit()


def test_migrated_page_keeps_its_contents_under_a_new_frame(guest) -> None:  # type: ignore[no-untyped-def]
    vm, vcpu, mem = guest
    vcpu.mmu.write(GVA, 7, cpl=3)
    fixed = vcpu.stats()["pf_fixed"]
    frame = vm.mmu.host_migrate(mem.address + DATA)
    assert vcpu.mmu.read(GVA, cpl=3) == 7
    assert vcpu.stats()["pf_fixed"] == fixed + 1, "the old SPTE was zapped"
    leaf = vm.mmu.rmap(DATA >> 12)[0]
    page = vm.mmu.shadow_page(leaf.sp)
    assert (int(page.sptes[leaf.index]) >> 12) & ((1 << 40) - 1) == frame
    vm.mmu.audit()


def test_write_protected_host_page_breaks_cow_on_a_guest_write(guest) -> None:  # type: ignore[no-untyped-def]
    vm, vcpu, mem = guest
    vcpu.mmu.write(GVA, 9, cpl=3)
    vm.mmu.host_write_protect(mem.address + DATA, 4096)
    assert vcpu.mmu.read(GVA, cpl=3) == 9
    vcpu.mmu.write(GVA, 10, cpl=3)
    assert int.from_bytes(mem.read(DATA, 8), "little") == 10
    vm.mmu.audit()


def test_aging_clears_and_tests_accessed_bits(guest) -> None:  # type: ignore[no-untyped-def]
    vm, vcpu, mem = guest
    vcpu.mmu.read(GVA, cpl=3)
    hva = mem.address + DATA
    assert vm.mmu.host_age(hva, 4096, clear=False)
    assert vm.mmu.host_age(hva, 4096)
    assert not vm.mmu.host_age(hva, 4096, clear=False)
    vcpu.mmu.read(GVA, cpl=3)
    assert vm.mmu.host_age(hva, 4096, clear=False)


def test_no_access_maps_a_page_under_invalidation(guest) -> None:  # type: ignore[no-untyped-def]
    vm, vcpu, mem = guest
    vm.mmu.host_invalidate_start(mem.address + DATA, 4096)
    with pytest.raises(BlockingIOError):
        vcpu.mmu.read(GVA, cpl=3)
    assert vcpu.mmu.read(GVA + 4096, cpl=3) == 0
    vm.mmu.audit()
    vm.mmu.host_invalidate_end()
    assert vcpu.mmu.read(GVA, cpl=3) == 0
    with pytest.raises(OSError):
        vm.mmu.host_invalidate_end()
