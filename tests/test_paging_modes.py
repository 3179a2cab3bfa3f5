"""Per-mode walker tests through the public API: 32-bit with PSE and PSE-36, PAE
with its PDPTE registers, 4- and 5-level, large pages, canonical addresses,
MAXPHYADDR, global pages, A/D bits, and tables outside every memslot."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import kvmmmu
from kvmmmu import GuestMemory, GuestPageFault, uapi
from kvmmmu.cpuid import with_changes
from kvmmmu.guest.paging import NX, PS, A, D, G, P, PageTables, U, W

MiB = 1 << 20
CR0_PE, CR0_WP, CR0_PG = 1, 1 << 16, 1 << 31
CR4_PSE, CR4_PAE, CR4_LA57 = 1 << 4, 1 << 5, 1 << 12
EFER_LME, EFER_LMA, EFER_NXE = 1 << 8, 1 << 10, 1 << 11


class Guest:
    def __init__(self, mode: str, mem_size: int = 16 * MiB) -> None:
        self.kvm = kvmmmu.Kvm()
        self.vm = self.kvm.create_vm()
        self.mem = GuestMemory(mem_size)
        self.vm.set_user_memory_region(0, 0, mem_size, self.mem)
        self.vcpu = self.vm.create_vcpu(0)
        self.pt = PageTables(self.mem, mode)
        self.mode = mode

    def enter(self, *, cr4: int = 0, efer: int = 0, cr0: int = CR0_PE | CR0_WP | CR0_PG) -> None:
        s = self.vcpu.get_sregs()
        s.cr3 = self.pt.cr3
        if self.mode == "32-bit":
            s.cr4, s.efer = cr4, efer
        elif self.mode == "pae":
            s.cr4, s.efer = cr4 | CR4_PAE, efer
        else:
            if self.mode == "5-level" and not self.vcpu.get_cpuid2():
                # LA57 needs the guest CPUID (a fresh vCPU, like the device's, refuses it)
                self.vcpu.set_cpuid2(self.kvm.get_supported_cpuid())
            s.cr4 = cr4 | CR4_PAE | (CR4_LA57 if self.mode == "5-level" else 0)
            s.efer = efer | EFER_LME | EFER_LMA
            s.cs.l = 1
        s.cr0 = cr0
        self.vcpu.set_sregs(s)

    def walk(self, gva: int, **kw: bool) -> kvmmmu.WalkResult:
        return self.vcpu.mmu.walk(gva, **kw)

    def fault(self, gva: int, **kw: bool) -> tuple[int, int, int]:
        with pytest.raises(GuestPageFault) as e:
            self.vcpu.mmu.walk(gva, **kw)
        return e.value.vector, e.value.error_code, e.value.address

    def close(self) -> None:
        self.vcpu.close()
        self.vm.close()


@pytest.fixture
def guest(request: pytest.FixtureRequest) -> Iterator[Guest]:
    g = Guest(request.param)
    yield g
    g.close()


def test_32bit_4k_and_pse_pages() -> None:
    g = Guest("32-bit")
    g.pt.map(0x0040_0000, 0x0020_0000)
    g.pt.map(0x0080_0000, 0x0080_0000, size=4 * MiB)
    g.enter(cr4=CR4_PSE)
    assert g.vcpu.mmu.mode == "32-bit"
    r = g.walk(0x0040_0123)
    assert (r.gpa, r.level, len(r.gptes)) == (0x0020_0123, 1, 2)
    r = g.walk(0x00A1_2345)
    assert (r.gpa, r.level, r.page_size) == (0x00A1_2345, 2, 4 * MiB)
    # Without CR4.PSE the PDE's PS bit is ignored: the 4 MiB "page" frame is read as a
    # page table (all zeros here, so not present) ...
    g.enter(cr4=0)
    assert g.fault(0x0080_0000) == (14, 0x0, 0x0080_0000)
    # ... and an entry written there is used as a PTE.
    g.mem.write(0x0080_0000, (0x7000 | P).to_bytes(4, "little"))
    r = g.walk(0x0080_0123)
    assert (r.gpa, r.level) == (0x7123, 1)
    g.close()


def test_32bit_pse36_high_physical_bits() -> None:
    g = Guest("32-bit")
    e = g.pt.map(0x0080_0000, 0x3_0040_0000, size=4 * MiB)
    assert g.pt.read(e) == 0x0040_0000 | 3 << 13 | P | W | U | PS
    g.enter(cr4=CR4_PSE)
    assert g.walk(0x0080_1234).gpa == 0x3_0040_1234
    # PDE bits 21:17 are reserved in a 4 MiB PDE (bits 16:13 are PA[35:32])
    g.pt.write(e, g.pt.read(e) | 1 << 17)
    assert g.fault(0x0080_1234) == (14, 0x9, 0x0080_1234)
    g.close()


def test_32bit_has_no_nx_and_ignores_high_gva_bits() -> None:
    g = Guest("32-bit")
    g.pt.map(0x1000, 0x5000)
    g.enter()
    assert g.walk(0x1_0000_1000).gpa == 0x5000
    # fetch from a page: no NX in 4-byte entries, and no I/D bit in the error code without
    # EFER.NX or SMEP
    assert g.fault(0x2000, fetch=True) == (14, 0x0, 0x2000)
    g.close()


def test_pae_pdptes_are_registers() -> None:
    g = Guest("pae")
    g.pt.map(0x4000_1000, 0x3000, flags=P | W)
    g.enter(efer=EFER_NXE)
    assert g.vcpu.mmu.mode == "pae"
    pdpte = g.pt.entry(0x4000_0000, 3)
    assert g.vcpu.mmu.pdptrs[1] == pdpte
    r = g.walk(0x4000_1008)
    assert r.gpa == 0x3008
    assert [x.level for x in r.gptes] == [3, 2, 1]
    # no A bit is ever written to a PDPTE
    assert g.pt.entry(0x4000_0000, 3) == pdpte
    assert g.pt.entry(0x4000_0000, 2) & A
    # a guest write to the PDPT is not seen until the PDPTEs are reloaded
    g.pt.set_entry(0x4000_0000, 3, 0)
    assert g.walk(0x4000_1008).gpa == 0x3008
    g.vcpu.mmu.load_cr3(g.pt.cr3)
    assert g.fault(0x4000_1008) == (14, 0x0, 0x4000_1008)
    g.close()


def test_pae_reserved_pdpte_is_gp_on_load() -> None:
    g = Guest("pae")
    g.pt.map(0x1000, 0x3000)
    g.enter()
    old = g.vcpu.mmu.pdptrs
    good = g.pt.entry(0, 3)
    g.pt.set_entry(0, 3, good | W)  # bit 1 is reserved in a present PDPTE
    with pytest.raises(GuestPageFault) as e:
        g.vcpu.mmu.load_cr3(g.pt.cr3)
    assert (e.value.vector, e.value.error_code) == (13, 0)
    assert g.vcpu.mmu.pdptrs == old  # the old PDPTEs stay
    # re-entering PAE paging through MOV CR0 loads them too
    g.pt.set_entry(0, 3, good)
    s = g.vcpu.get_sregs()
    g.vcpu.mmu.set_cr0(s.cr0 & ~CR0_PG)
    g.pt.set_entry(0, 3, good | 1 << 63)
    with pytest.raises(GuestPageFault):
        g.vcpu.mmu.set_cr0(s.cr0)
    assert g.vcpu.get_sregs().cr0 & CR0_PG == 0
    g.close()


def test_pae_reserved_high_bits_in_ptes() -> None:
    g = Guest("pae")
    e = g.pt.map(0x1000, 0x3000)
    g.enter(efer=EFER_NXE)
    g.pt.write(e, g.pt.read(e) | 1 << 52)  # PAE reserves 52..62; 4-level ignores them
    assert g.fault(0x1000) == (14, 0x9, 0x1000)
    g.close()


@pytest.mark.parametrize("guest", ["4-level", "5-level"], indirect=True)
def test_long_mode_large_pages(guest: Guest) -> None:
    guest.pt.map(0x20_0000, 0x40_0000, size=2 * MiB)
    guest.pt.map(0x4000_0000, 0x0, size=1 << 30)
    supported = guest.kvm.get_supported_cpuid()
    edx = next(e.edx for e in supported if e.function == 0x8000_0001)
    assert edx & 1 << 26, "the simulator supports 1 GiB pages"
    guest.vcpu.set_cpuid2(with_changes(supported, {(0x8000_0001, 0): {"edx": edx & ~(1 << 26)}}))
    guest.enter(efer=EFER_NXE)
    r = guest.walk(0x21_2345, write=True)
    assert (r.gpa, r.level, r.dirty) == (0x41_2345, 2, True)
    assert guest.pt.entry(0x20_0000, 2) & (A | D) == A | D
    # 1 GiB pages need PDPE1GB in the guest CPUID: without it PDPTE.PS is reserved
    assert guest.fault(0x4000_1000) == (14, 0x9, 0x4000_1000)
    guest.vcpu.set_cpuid2(supported)
    r = guest.walk(0x4000_1000)
    assert (r.gpa, r.level, r.page_size) == (0x1000, 3, 1 << 30)
    # bit 13 of a 2 MiB PDE is reserved
    e = guest.pt.entry_gpa(0x20_0000, 2)
    guest.pt.write(e, guest.pt.read(e) | 1 << 13)
    assert guest.fault(0x20_0000)[1] == 0x9


def test_canonical_boundaries() -> None:
    for mode, bits in (("4-level", 48), ("5-level", 57)):
        g = Guest(mode)
        top = (1 << (bits - 1)) - 4096
        g.pt.map(top, 0x5000)
        g.pt.map((1 << 64) - 4096, 0x6000)
        g.enter()
        assert g.walk(top).gpa == 0x5000
        assert g.walk((1 << 64) - 4096).gpa == 0x6000
        assert g.fault(top + 4096) == (13, 0, top + 4096)
        assert g.fault((1 << 64) - (1 << (bits - 1)) - 4096)[0] == 13
        g.close()


def test_maxphyaddr_reserved_bits_follow_cpuid() -> None:
    g = Guest("4-level")
    e = g.pt.map(0x1000, 0x2000)
    g.enter()
    g.pt.write(e, g.pt.read(e) | 1 << 40)
    # before KVM_SET_CPUID2 MAXPHYADDR is 36: bit 40 is reserved
    assert g.fault(0x1000) == (14, 0x9, 0x1000)
    g.vcpu.set_cpuid2(g.kvm.get_supported_cpuid())  # MAXPHYADDR 48
    assert g.walk(0x1000).gpa == (1 << 40) | 0x2000
    g.pt.write(e, g.pt.read(e) | 1 << 51)
    assert g.fault(0x1000)[1] == 0x9
    g.close()


def test_global_bit_does_not_change_the_walk() -> None:
    g = Guest("4-level")
    g.pt.map(0x1000, 0x2000, flags=P | W | G)
    g.enter()
    assert g.walk(0x1000).gpa == 0x2000
    g.close()


def test_ad_bits_top_down_and_not_on_fault() -> None:
    g = Guest("4-level")
    g.pt.map(0x1000, 0x2000, flags=P | U)  # read-only user page
    g.enter(efer=EFER_NXE)
    levels = [g.pt.entry_gpa(0x1000, lvl) for lvl in (4, 3, 2, 1)]
    assert g.fault(0x1000, write=True, user=True) == (14, 0x7, 0x1000)
    assert all(not g.pt.read(x) & A for x in levels), "a faulting walk writes nothing"
    r = g.walk(0x1000, user=True)
    assert not r.dirty
    assert all(g.pt.read(x) & A for x in levels)
    assert not any(g.pt.read(x) & D for x in levels)
    g.close()


def test_table_outside_every_memslot_is_not_present() -> None:
    g = Guest("4-level")
    g.pt.set_entry(0x1000, 2, 0x4000_0000 | P | W | U)  # the PT would live at 1 GiB: no slot
    g.enter()
    assert g.fault(0x1000, write=True) == (14, 0x2, 0x1000)
    g.close()


def test_readonly_slot_tables_get_no_ad_bits() -> None:
    kvm = kvmmmu.Kvm()
    vm = kvm.create_vm()
    mem = GuestMemory(4 * MiB)
    pt = PageTables(mem, "4-level")
    pt.map(0x1000, 0x2000)
    vm.set_user_memory_region(0, 0, 4 * MiB, mem, uapi.KVM_MEM_READONLY)
    vcpu = vm.create_vcpu(0)
    s = vcpu.get_sregs()
    s.cr3, s.cr4, s.efer, s.cr0, s.cs.l = pt.cr3, CR4_PAE, EFER_LME | EFER_LMA, 0x80000011, 1
    vcpu.set_sregs(s)
    assert vcpu.mmu.walk(0x1000, write=True).gpa == 0x2000
    assert not pt.entry(0x1000, 1) & A
    vcpu.close()
    vm.close()


def test_nx_needs_efer_nxe() -> None:
    g = Guest("4-level")
    e = g.pt.map(0x1000, 0x2000, flags=P | W | NX)
    g.enter(efer=EFER_NXE)
    assert g.fault(0x1000, fetch=True) == (14, 0x11, 0x1000)
    g.enter()  # NXE=0: bit 63 is reserved
    assert g.fault(0x1000) == (14, 0x9, 0x1000)
    g.pt.write(e, 0x2000 | P | W)
    assert g.walk(0x1000, fetch=True).gpa == 0x2000
    g.close()
