"""KVM_TRANSLATE on both backends (4-level long mode, the device's only paging
mode), and the simulator's detailed walk over the same tables."""

from __future__ import annotations

import struct

import numpy as np
import pytest

import kvmmmu
from kvmmmu import GuestMemory, GuestPageFault
from kvmmmu.conformance.cases import lm64

INVALID = (1 << 64) - 1
BASE = 0x80_0000_0000  # PML4 index 1


def _guest(kvm: kvmmmu.Kvm) -> tuple[kvmmmu.Vm, GuestMemory, kvmmmu.Vcpu]:
    vm = kvm.create_vm()
    mem = GuestMemory(4 << 20)
    vm.set_user_memory_region(0, 0, 4 << 20, mem)

    def w(gpa: int, v: int) -> None:
        mem.write(gpa, struct.pack("<Q", v))

    w(0x1008, 0x2007)  # PML4[1] -> PDPT
    w(0x2000, 0x3007)  # PDPT[0] -> PD
    w(0x3000, 0x4007)  # PD[0] -> PT
    w(0x3008, 0x200000 | 0x87)  # PD[1]: 2 MiB page
    w(0x4000, 0x100000 | 0x7)  # user, writable
    w(0x4008, 0x101000 | 0x5)  # user, read-only
    w(0x4010, 0x102000)  # not present
    w(0x4018, 0x103000 | 0x3 | 1 << 51)  # reserved bit 51
    w(0x4020, 0x104000 | 0x3)  # supervisor
    w(0x4028, 0x3F0000 | 0x3)  # maps gpa inside the slot
    vcpu = vm.create_vcpu(0)
    s = lm64(vcpu.get_sregs())
    s.cr3 = 0x1000
    vcpu.set_sregs(s)
    return vm, mem, vcpu


def _q(mem: GuestMemory, gpa: int) -> int:
    return int(struct.unpack("<Q", mem.read(gpa, 8))[0])


TRANSLATIONS = [
    (BASE, 0x100000),
    (BASE + 0x123, 0x100123),
    (BASE + 0x1000, 0x101000),
    (BASE + 0x2000, INVALID),  # not present
    (BASE + 0x3000, INVALID),  # reserved bit
    (BASE + 0x4000, 0x104000),  # supervisor page: KVM_TRANSLATE is a supervisor read
    (BASE + 0x20_1234, 0x201234),  # inside the 2 MiB page
    (0, INVALID),
    (0xFFFF_8080_0000_0000, INVALID),
    (0x8000_0080_0000_0000, 0x100000),  # non-canonical: KVM_TRANSLATE does not check
]


@pytest.mark.parametrize(("gva", "gpa"), TRANSLATIONS, ids=[hex(g) for g, _ in TRANSLATIONS])
def test_translate(kvm: kvmmmu.Kvm, gva: int, gpa: int) -> None:
    vm, _, vcpu = _guest(kvm)
    t = vcpu.translate(gva)
    assert (t.physical_address, t.valid, t.writeable, t.usermode) == (
        gpa,
        int(gpa != INVALID),
        1,
        0,
    )
    vcpu.close()
    vm.close()


def test_translate_sets_accessed_bits(kvm: kvmmmu.Kvm) -> None:
    vm, mem, vcpu = _guest(kvm)
    for gva in (BASE, BASE + 0x1000, BASE + 0x20_0000):
        vcpu.translate(gva)
    assert [_q(mem, a) for a in (0x1008, 0x2000, 0x3000, 0x4000, 0x4008, 0x3008)] == [
        0x2027,
        0x3027,
        0x4027,
        0x100027,
        0x101025,
        0x2000A7,
    ]
    vcpu.close()
    vm.close()


def test_translate_with_smap_is_a_supervisor_access(kvm: kvmmmu.Kvm) -> None:
    vm, _, vcpu = _guest(kvm)
    s = vcpu.get_sregs()
    s.cr4 |= 1 << 21  # SMAP
    vcpu.set_sregs(s)
    assert vcpu.translate(BASE).valid == 0
    s.cr4 = (s.cr4 & ~(1 << 21)) | 1 << 20  # SMEP only: reads are fine
    vcpu.set_sregs(s)
    assert vcpu.translate(BASE).valid == 1
    vcpu.close()
    vm.close()


def test_translate_without_paging(kvm: kvmmmu.Kvm) -> None:
    with kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        for gva in (0x1234_5678_9ABC, 0xFFFF_FFFF_1234_5678):
            t = vcpu.translate(gva)
            assert (t.physical_address, t.valid) == (gva, 1)


def test_detailed_walk(sim_kvm: kvmmmu.Kvm) -> None:
    vm, mem, vcpu = _guest(sim_kvm)
    mmu = vcpu.mmu
    assert mmu.mode == "4-level"
    r = mmu.walk(BASE + 0x10, write=True, user=True)
    assert (r.gpa, r.level, r.page_size, r.access, r.dirty) == (0x100010, 1, 4096, 7, True)
    assert [(g.level, g.gpa) for g in r.gptes] == [
        (4, 0x1008),
        (3, 0x2000),
        (2, 0x3000),
        (1, 0x4000),
    ]
    assert r.gptes[-1].value == 0x100007  # as read, before the walk set A and D
    assert _q(mem, 0x4000) == 0x100067
    with pytest.raises(GuestPageFault) as e:
        mmu.walk(BASE + 0x1000, write=True, user=True)
    assert (e.value.vector, e.value.error_code, e.value.address) == (14, 0x7, BASE + 0x1000)
    with pytest.raises(GuestPageFault) as e:
        mmu.walk(BASE + 0x4000, user=True)
    assert e.value.error_code == 0x5
    with pytest.raises(GuestPageFault) as e:
        mmu.walk(BASE + 0x3000)
    assert e.value.error_code == 0x9  # P|RSVD
    with pytest.raises(GuestPageFault) as e:
        mmu.walk(0x8000_0080_0000_0000)
    assert (e.value.vector, e.value.error_code) == (13, 0)
    r = mmu.walk(BASE + 0x20_0000 + 0x1234)
    assert (r.gpa, r.level, r.page_size) == (0x201234, 2, 2 << 20)
    vcpu.close()
    vm.close()


def test_walk_many_matches_walk(sim_kvm: kvmmmu.Kvm) -> None:
    vm, _, vcpu = _guest(sim_kvm)
    gvas = np.array([g for g, _ in TRANSLATIONS] + [BASE + 0x5000], dtype=np.uint64)
    gpas, vectors, codes = vcpu.mmu.walk_many(gvas)
    for i, gva in enumerate(gvas.tolist()):
        try:
            r = vcpu.mmu.walk(gva)
            assert (gpas[i], vectors[i], codes[i]) == (r.gpa, 0, 0)
        except GuestPageFault as e:
            assert (gpas[i], vectors[i], codes[i]) == (INVALID, e.vector, e.error_code)
    vcpu.close()
    vm.close()


def test_mmu_is_simulator_only(dev_kvm: kvmmmu.Kvm) -> None:
    with dev_kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu, pytest.raises(NotImplementedError):
        _ = vcpu.mmu
