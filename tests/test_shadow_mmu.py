"""The shadow MMU through the Python API, one test per behaviour of KVM's mmu.txt
("Reaction to events", "Shadow pages") and of the zap, page-limit and large-page
rules (reference/kvm-mmu-semantics.md sections 2-6), plus the CPL3 TLB behaviour the
device here shows (reference/real-kvm-here.md, "Shadow-MMU TLB behaviour").

Each test drives a small guest with guest-side events only: memory accesses at CPL 0
or 3, stores to its own page tables through an alias mapping, INVLPG, MOV CR3 and
the other control-register writes. It asserts what the guest sees (values, fault
error codes), KVM's counters by name, and the shadow pages from ``vm.mmu``, and
audits the MMU after every step.

The guest-visible parts are data (``Step`` lists run by :func:`run`) against a
:class:`Driver`, so the same scenarios can later be replayed on the device by a
driver that runs them as guest code through KVM_RUN.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import pytest

import kvmmmu
from kvmmmu import GuestMemory, GuestMmioAccess, GuestPageFault, uapi
from kvmmmu.guest.paging import NX, A, D, P, PageTables, U, W
from kvmmmu.mmu import ShadowPage

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PAGE = 4 * KiB
MEM = 16 * MiB
#: Data pages live at gpa DATA + i * PAGE and hold pattern(i) in their first 8 bytes.
DATA = 1 * MiB
#: The page-table pool and its alias: every pool page is mapped user-writable at
#: ALIAS + (gpa - POOL), so the guest can edit its tables. The guest's own tables are
#: allocated from its first half, other address spaces' from SPARE_POOL.
POOL, POOL_SIZE = 12 * MiB, 2 * MiB
SPARE_POOL = POOL + POOL_SIZE // 2
ALIAS = 0xC000_0000
#: The guest maps data page i at GVA + i * PAGE (user-writable unless a test says so).
GVA = 0x4000_0000
#: Guest physical addresses with no memslot.
HOLE = 0xE000_0000
#: A 1 GiB region (its own PDPT entry) where tests link a table as a directory.
DIR_ALIAS = 0x1_0000_0000

CR0_PE, CR0_WP, CR0_PG = 1, 1 << 16, 1 << 31
CR4_PSE, CR4_PAE, CR4_LA57, CR4_SMEP = 1 << 4, 1 << 5, 1 << 12, 1 << 20
EFER_LME, EFER_LMA, EFER_NXE = 1 << 8, 1 << 10, 1 << 11
PF_P, PF_W, PF_U, PF_I = 1, 2, 4, 16


def pattern(i: int) -> int:
    return 0x5A5A_0000_0000 + i


def gva(i: int) -> int:
    return GVA + i * PAGE


def data(i: int) -> int:
    return DATA + i * PAGE


def alias(gpa: int) -> int:
    assert POOL <= gpa < POOL + POOL_SIZE
    return ALIAS + gpa - POOL


# -- the guest ---------------------------------------------------------------------------


class SlotMemory:
    """Guest memory seen from gpa 0 of a slot that starts `offset` bytes into `mem`."""

    def __init__(self, mem: GuestMemory, offset: int) -> None:
        self.mem, self.offset = mem, offset

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.mem.read(self.offset + gpa, length))

    def write(self, gpa: int, data: bytes) -> None:
        self.mem.write(self.offset + gpa, data)


class Guest:
    """A VM with MEM bytes at gpa 0 (2 MiB-aligned in the host, or misaligned by 4 KiB
    on request), vCPUs in `mode` paging, `n` data pages mapped at GVA, and the alias of
    the page-table pool."""

    def __init__(
        self,
        mode: str = "4-level",
        n: int = 8,
        *,
        flags: int = P | W | U,
        hugepages: bool = False,
        misaligned: bool = False,
        vcpus: int = 1,
    ) -> None:
        self.kvm = kvmmmu.Kvm()
        self.vm = self.kvm.create_vm()
        self.host = GuestMemory(MEM + 4 * MiB, hugepages=hugepages)
        offset = -self.host.address % (2 * MiB) + (PAGE if misaligned else 0)
        self.mem = SlotMemory(self.host, offset)
        self.vm.set_user_memory_region(0, 0, MEM, self.host.address + offset)
        self.mode = mode
        # Without paging ("none") the tables are built but unused.
        table_mode = "4-level" if mode == "none" else mode
        self.pt = PageTables(self.mem, table_mode, pool=POOL, pool_size=SPARE_POOL - POOL)
        for i in range(n):
            self.map_data(i, flags)
        for gpa in range(POOL, POOL + POOL_SIZE, PAGE):
            self.pt.map(alias(gpa), gpa, flags=P | W | U)
        cpuid = self.kvm.get_supported_cpuid()
        self.vcpus = []
        for i in range(vcpus):
            v = self.vm.create_vcpu(i)
            v.set_cpuid2(cpuid)
            self.vcpus.append(v)
            self.enter(v)
        self.vcpu = self.vcpus[0]
        self.mmu = self.vm.mmu

    def map_data(self, i: int, flags: int = P | W | U) -> None:
        self.pt.map(gva(i), data(i), flags=flags)
        self.mem.write(data(i), pattern(i).to_bytes(8, "little"))

    def enter(self, vcpu: kvmmmu.Vcpu, cr3: int | None = None) -> None:
        """KVM_SET_SREGS into `mode` paging (flat segments, CR0.WP, EFER.NXE)."""
        s = vcpu.get_sregs()
        s.cr3 = self.pt.cr3 if cr3 is None else cr3
        s.cr0 = CR0_PE | CR0_WP | CR0_PG
        if self.mode == "none":
            s.cr0, s.cr4, s.efer = CR0_PE, 0, 0
        elif self.mode == "32-bit":
            s.cr4, s.efer = CR4_PSE, 0
        elif self.mode == "pae":
            s.cr4, s.efer = CR4_PAE, EFER_NXE
        else:
            s.cr4 = CR4_PAE | (CR4_LA57 if self.mode == "5-level" else 0)
            s.efer = EFER_LME | EFER_LMA | EFER_NXE
            s.cs.l = 1
        vcpu.set_sregs(s)

    def stat(self, name: str) -> int:
        v = self.vm.stats()[name]
        assert isinstance(v, int)
        return v

    def vstat(self, name: str, vcpu: int = 0) -> int:
        v = self.vcpus[vcpu].stats()[name]
        assert isinstance(v, int)
        return v

    def pages(self) -> list[ShadowPage]:
        return self.mmu.shadow_pages()

    def page_for(self, gfn: int, level: int) -> list[ShadowPage]:
        return [p for p in self.pages() if p.gfn == gfn and p.level == level]

    def root(self, vcpu: int = 0) -> kvmmmu.mmu.Root | None:
        return self.mmu.roots()[vcpu].current

    def leaf_of(self, gpa: int) -> tuple[ShadowPage, int] | None:
        """The (page, SPTE index) of the 4 KiB (or huge) leaf mapping `gpa`, if one."""
        entries = self.mmu.rmap(gpa >> 12)
        if not entries:
            return None
        e = entries[0]
        return self.mmu.shadow_page(e.sp), e.index

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vm.close()
        self.kvm.close()


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    yield g
    g.close()


@pytest.fixture
def no_mmio_caching() -> Iterator[None]:
    kvmmmu.set_mmio_caching(False)
    try:
        yield
    finally:
        kvmmmu.set_mmio_caching(True)


# -- scenarios: guest-visible steps and what the guest must see --------------------------


@dataclass(frozen=True)
class PF:
    """A #PF with this error code (CR2 = the access's address)."""

    error_code: int


@dataclass(frozen=True)
class MMIO:
    """A KVM_EXIT_MMIO at this gpa."""

    gpa: int


Expect = int | PF | MMIO | None


@dataclass(frozen=True)
class Read:
    gva: int
    expect: Expect
    cpl: int = 3


@dataclass(frozen=True)
class Write:
    gva: int
    value: int
    expect: Expect = None
    cpl: int = 3


@dataclass(frozen=True)
class Fetch:
    """An instruction fetch at `gva` (the first 8 bytes there)."""

    gva: int
    expect: Expect
    cpl: int = 3


@dataclass(frozen=True)
class SetPte:
    """The guest stores `value` into its own level-`level` entry for `gva`, through the
    alias mapping (a native store at `cpl`, as real guests edit their tables)."""

    gva: int
    level: int
    value: int
    cpl: int = 3


@dataclass(frozen=True)
class Invlpg:
    gva: int


@dataclass(frozen=True)
class MovCr3:
    """MOV CR3 with `cr3`, or the current CR3 again (a TLB flush)."""

    cr3: int | None = None


Step = Read | Write | Fetch | SetPte | Invlpg | MovCr3


class Driver(Protocol):
    """What a scenario needs from a backend: guest accesses and TLB maintenance."""

    def read(self, gva: int, cpl: int) -> int: ...
    def fetch(self, gva: int, cpl: int) -> int: ...
    def write(self, gva: int, value: int, cpl: int, size: int = 8) -> None: ...
    def invlpg(self, gva: int) -> None: ...
    def load_cr3(self, cr3: int | None) -> None: ...
    def check(self) -> None: ...


class SimDriver:
    """The simulator: vcpu.mmu's trace-driven accesses, and the audit after each step."""

    def __init__(self, g: Guest, vcpu: int = 0) -> None:
        self.g, self.mmu = g, g.vcpus[vcpu].mmu
        self.vcpu = g.vcpus[vcpu]

    def read(self, gva: int, cpl: int) -> int:
        return self.mmu.read(gva, cpl=cpl)

    def fetch(self, gva: int, cpl: int) -> int:
        return int.from_bytes(self.mmu.access(gva, fetch=True, cpl=cpl) or b"", "little")

    def write(self, gva: int, value: int, cpl: int, size: int = 8) -> None:
        self.mmu.write(gva, value, size, cpl=cpl)

    def invlpg(self, gva: int) -> None:
        self.mmu.invlpg(gva)

    def load_cr3(self, cr3: int | None) -> None:
        self.mmu.load_cr3(self.vcpu.get_sregs().cr3 if cr3 is None else cr3)

    def check(self) -> None:
        self.g.mmu.audit()


class PtDriver(SimDriver):
    """SetPte steps name entries of `pt` (another address space than the current)."""

    def __init__(self, g: Guest, pt: PageTables, vcpu: int = 0) -> None:
        super().__init__(g, vcpu)
        self.pt = pt


def other_address_space(g: Guest, n: int = 1) -> PageTables:
    """Address space B: data page n - 1 - i at gva(i), and the same alias of the
    page-table pool as A's (B's tables are in the spare half of the pool)."""
    pt = PageTables(g.mem, g.pt.mode, pool=SPARE_POOL, pool_size=POOL + POOL_SIZE - SPARE_POOL)
    for i in range(n):
        pt.map(gva(i), data(n - 1 - i))
    for gpa in range(POOL, POOL + POOL_SIZE, PAGE):
        pt.map(alias(gpa), gpa, flags=P | W | U)
    return pt


def outcome(f: Callable[[], int | None]) -> Expect:
    try:
        return f()
    except GuestPageFault as e:
        assert e.vector == 14
        return PF(e.error_code)
    except GuestMmioAccess as e:
        return MMIO(e.gpa)


def run(g: Guest, steps: Sequence[Step], driver: Driver | None = None) -> None:
    """Run `steps`, checking each outcome and auditing after each step."""
    d = driver if driver is not None else SimDriver(g)
    width = 4 if g.mode == "32-bit" else 8
    for n, step in enumerate(steps):
        match step:
            case Read(addr, expect, cpl):
                got = outcome(lambda: d.read(addr, cpl))
                assert got == expect, f"step {n} {step}: {got}"
            case Fetch(addr, expect, cpl):
                got = outcome(lambda: d.fetch(addr, cpl))
                assert got == expect, f"step {n} {step}: {got}"
            case Write(addr, value, expect, cpl):
                got = outcome(lambda: d.write(addr, value, cpl))
                assert got == expect, f"step {n} {step}: {got}"
            case SetPte(addr, level, value, cpl):
                pt = d.pt if isinstance(d, PtDriver) else g.pt
                d.write(alias(pt.entry_gpa(addr, level)), value, cpl, width)
            case Invlpg(addr):
                d.invlpg(addr)
            case MovCr3(cr3):
                d.load_cr3(cr3)
        d.check()


# Guest-visible TLB behaviour (real-kvm-here.md), as data: a scenario name, its steps.
CLEAR_P = [
    Read(gva(0), pattern(0)),
    SetPte(gva(0), 1, 0),  # the guest clears P in its own PTE ...
    Read(gva(0), pattern(0)),  # ... and the SPTE (its TLB) still maps the page
    Invlpg(gva(0)),
    Read(gva(0), PF(PF_U)),
]
REMAP = [
    Read(gva(0), pattern(0)),
    SetPte(gva(0), 1, data(1) | P | W | U),
    Read(gva(0), pattern(0)),  # stale: page 0
    Invlpg(gva(0)),
    Read(gva(0), pattern(1)),  # page 1 after INVLPG
]
CLEAR_RW = [
    Write(gva(0), 1),
    SetPte(gva(0), 1, data(0) | P | U | A | D),
    Write(gva(0), 2),  # the stale writable SPTE takes the write
    Invlpg(gva(0)),
    Write(gva(0), 3, PF(PF_P | PF_W | PF_U)),
    Read(gva(0), 2),
]
CLEAR_P_MOV_CR3 = [
    Read(gva(0), pattern(0)),
    SetPte(gva(0), 1, 0),
    Read(gva(0), pattern(0)),
    MovCr3(),
    Read(gva(0), PF(PF_U)),
]
REMAP_MOV_CR3 = [
    Read(gva(0), pattern(0)),
    SetPte(gva(0), 1, data(2) | P | W | U),
    Read(gva(0), pattern(0)),
    MovCr3(),
    Read(gva(0), pattern(2)),
]
#: The TLB scenarios by name, for a device driver to replay. Their accesses are at
#: CPL3: the device here runs CPL0 guest accesses through KVM's emulator, which walks
#: the guest tables and so never sees a stale translation (real-kvm-here.md).
TLB_SCENARIOS = {
    "clear_p": CLEAR_P,
    "remap": REMAP,
    "clear_rw": CLEAR_RW,
    "clear_p_mov_cr3": CLEAR_P_MOV_CR3,
    "remap_mov_cr3": REMAP_MOV_CR3,
}


# -- reaction to events: guest page faults --------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "step"),
    [
        (0, Read(gva(0), PF(PF_U))),  # not present
        (P | U, Write(gva(0), 1, PF(PF_P | PF_W | PF_U))),  # read-only
        (P | W, Read(gva(0), PF(PF_P | PF_U))),  # a supervisor page at CPL3
        (P | W | U | NX, Fetch(gva(0), PF(PF_P | PF_U | PF_I))),  # fetch from an NX page
    ],
    ids=["not_present", "read_only", "supervisor", "nx"],
)
def test_guest_page_fault_reflected(flags: int, step: Step) -> None:
    """A true guest fault (the guest's translation does not allow the access) is
    reflected to the guest with the walker's error code and CR2, counted in pf_guest,
    and creates no leaf SPTE."""
    g = Guest(n=0)
    g.map_data(0, flags)
    run(g, [step])
    assert g.vcpu.get_sregs().cr2 == gva(0)
    assert (g.vstat("pf_taken"), g.vstat("pf_guest"), g.vstat("pf_fixed")) == (1, 1, 0)
    assert g.mmu.rmap(data(0) >> 12) == []
    g.close()


def test_missing_translation_builds_shadow_path(guest: Guest) -> None:
    """An access to a missing translation walks the guest tables and instantiates the
    shadow pages on the path, one per guest table (gfn = the table's gfn, indirect),
    with a leaf SPTE for the data page; the next access hits the SPTE (no fault)."""
    g = guest
    run(g, [Read(gva(0), pattern(0))])
    assert (g.vstat("pf_taken"), g.vstat("pf_fixed")) == (1, 1)
    assert g.stat("mmu_cache_miss") == 4
    assert g.stat("pages_4k") == 1
    root = g.root()
    assert root is not None and root.kind == "page" and root.pgd == g.pt.cr3
    sp = g.mmu.shadow_page(root.page or 0)
    for level in (4, 3, 2, 1):
        table_gpa = g.pt.entry_gpa(gva(0), level) & ~0xFFF
        assert (sp.level, sp.gfn, sp.direct) == (level, table_gpa >> 12, False)
        assert sp.role.access == 7 and sp.role.cr0_wp and sp.role.efer_nx
        i = (gva(0) >> (12 + 9 * (level - 1))) & 511
        if level > 1:
            child = sp.child(i)
            assert child is not None
            assert g.mmu.shadow_page(child).parents == ((sp.index, i),)
            sp = g.mmu.shadow_page(child)
    assert list(sp.leaves()) == [0] and sp.gfns[0] == data(0) >> 12
    assert g.mmu.rmap(data(0) >> 12) == [kvmmmu.mmu.RmapEntry(1, sp.index, 0)]
    run(g, [Read(gva(0), pattern(0))] * 3)
    assert g.vstat("pf_taken") == 1, "later accesses hit the SPTE"


def test_prefetch_fills_accessed_neighbours() -> None:
    """After a fault at level 1, KVM prefetches the aligned block of 8 SPTEs from the
    gptes it read, for gptes with A set; prefetched SPTEs start with A clear."""
    g = Guest(n=8, flags=P | W | U | A)
    run(g, [Read(gva(3), pattern(3))])
    assert g.stat("pages_4k") == 8
    leaf = g.leaf_of(data(0))
    assert leaf is not None
    sp = leaf[0]
    assert list(sp.leaves()) == list(range(8))
    accessed = [bool(int(sp.sptes[i]) & A) for i in range(8)]
    assert accessed == [i == 3 for i in range(8)]
    run(g, [Read(gva(i), pattern(i)) for i in range(8)])
    assert g.vstat("pf_fixed") == 1
    g.close()


def test_write_to_page_table_unsyncs_it(guest: Guest) -> None:
    """A write to a shadowed level-1 guest table (a protected translation) unsyncs its
    shadow page instead of emulating: the write lands natively, mmu_unsync counts the
    page, and every ancestor records it in unsync_children."""
    g = guest
    run(g, [Read(gva(0), pattern(0)), SetPte(gva(1), 1, data(1) | P | W | U | A)])
    assert g.vstat("pf_emulate") == 0
    assert g.stat("mmu_unsync") == 1
    pt_gfn = g.pt.entry_gpa(gva(0), 1) >> 12
    (sp,) = g.page_for(pt_gfn, 1)
    assert sp.unsync and not sp.unsync_children
    parent = g.mmu.shadow_page(sp.parents[0][0])
    while True:
        assert parent.unsync_children == 1 and not parent.unsync
        assert parent.unsync_child_bitmap == (next(i for i, c in parent.children if c == sp.index),)
        if not parent.parents:
            break
        sp, parent = parent, g.mmu.shadow_page(parent.parents[0][0])
    # The alias now maps the table page writable (it is unsync, so not write-protected).
    leaf = g.leaf_of(pt_gfn << 12)
    assert leaf is not None and int(leaf[0].sptes[leaf[1]]) & W


@pytest.mark.parametrize("mode", ["4-level", "5-level", "pae", "32-bit"])
def test_unsync_page_keeps_stale_translation_until_invlpg(mode: str) -> None:
    """The SPTEs are the TLB: a guest that clears P in a gpte still reaches the page
    until INVLPG resyncs the SPTE (the device shows the same at CPL3)."""
    g = Guest(mode)
    run(g, CLEAR_P)
    assert g.stat("mmu_unsync") == 1, "INVLPG syncs the SPTE, not the whole page"
    assert g.vstat("invlpg") == 1
    g.close()


@pytest.mark.parametrize("mode", ["4-level", "5-level", "pae", "32-bit"])
@pytest.mark.parametrize("name", sorted(TLB_SCENARIOS))
def test_tlb_scenarios_in_every_paging_mode(name: str, mode: str) -> None:
    """The device's TLB table (real-kvm-here.md) holds in every paging mode."""
    g = Guest(mode)
    run(g, TLB_SCENARIOS[name])
    g.close()


def test_guest_remap_is_seen_after_invlpg(guest: Guest) -> None:
    """A gpte pointed at another page keeps translating to the old one until INVLPG."""
    run(guest, REMAP)


def test_stale_writable_spte_until_invlpg(guest: Guest) -> None:
    """Clearing R/W in a gpte leaves the writable SPTE (and the guest's writes) until
    INVLPG; then the write faults with P|W|U."""
    run(guest, CLEAR_RW)


def test_tlb_hit_leaves_cleared_accessed_and_dirty_bits(guest: Guest) -> None:
    """A write through a cached writable SPTE does not set the gpte's A and D again
    (the CPU only sets them on a TLB fill)."""
    g = guest
    run(g, [Write(gva(0), 1), SetPte(gva(0), 1, data(0) | P | W | U), Write(gva(0), 2)])
    assert g.pt.entry(gva(0), 1) == data(0) | P | W | U
    run(g, [Invlpg(gva(0)), Write(gva(0), 3)])
    assert g.pt.entry(gva(0), 1) == data(0) | P | W | U | A | D


@pytest.mark.parametrize("steps", [CLEAR_P_MOV_CR3, REMAP_MOV_CR3], ids=["clear_p", "remap"])
def test_cr3_reload_syncs_unsync_pages(steps: list[Step]) -> None:
    """MOV CR3 (same value) flushes the guest TLB: every unsync page of the root is
    synced and write-protected again."""
    g = Guest()
    run(g, steps)
    assert g.stat("mmu_unsync") == 0
    assert not any(p.unsync or p.unsync_children for p in g.pages())
    g.close()


def test_flush_tlb_syncs_every_unsync_page() -> None:
    """A guest TLB flush (INVPCID all-context, CR4.PGE toggle) syncs every unsync page
    reachable from the roots."""
    g = Guest(n=0)
    far = 0x4020_0000  # in another 2 MiB region: another guest page table
    g.map_data(0)
    g.pt.map(far, data(1))
    g.mem.write(data(1), pattern(1).to_bytes(8, "little"))
    run(g, [Read(gva(0), pattern(0)), Read(far, pattern(1))])
    run(g, [SetPte(gva(0), 1, 0), SetPte(far, 1, 0)])
    assert g.stat("mmu_unsync") == 2
    run(g, [Read(gva(0), pattern(0)), Read(far, pattern(1))])
    flushes = g.vstat("tlb_flush")
    g.vcpu.mmu.flush_tlb()
    g.mmu.audit()
    assert g.vstat("tlb_flush") == flushes + 1
    assert g.stat("mmu_unsync") == 0
    run(g, [Read(gva(0), PF(PF_U)), Read(far, PF(PF_U))])
    g.close()


def test_invlpg_resyncs_only_the_given_address(guest: Guest) -> None:
    """INVLPG syncs the one SPTE on the path of its address: a second stale entry of
    the same unsync page keeps its old translation."""
    run(
        guest,
        [
            Read(gva(0), pattern(0)),
            Read(gva(1), pattern(1)),
            SetPte(gva(0), 1, 0),
            SetPte(gva(1), 1, 0),
            Invlpg(gva(0)),
            Read(gva(0), PF(PF_U)),
            Read(gva(1), pattern(1)),
            Invlpg(gva(1)),
            Read(gva(1), PF(PF_U)),
        ],
    )


def test_invlpg_syncs_cached_roots_too() -> None:
    """INVLPG resyncs the address in the cached previous roots as well as the current
    one: an unsync page reachable only from a cached root loses its stale SPTE."""
    g = Guest(n=2)
    pt_b = other_address_space(g, 2)
    run(g, [Read(gva(0), pattern(0)), MovCr3(pt_b.cr3)])
    run(g, [SetPte(gva(0), 1, 0)], PtDriver(g, g.pt))  # A's PTE, edited while in B
    (sp,) = (p for p in g.pages() if p.unsync)
    assert list(sp.leaves()) == [0]
    run(g, [Invlpg(gva(0))])
    assert list(g.mmu.shadow_page(sp.index).leaves()) == []


def test_table_used_at_two_levels_is_write_protected() -> None:
    """A guest table that is also used as a directory is write-tracked: writes to it
    are emulated (pf_emulate, mmu_pte_write), never unsynced."""
    g = Guest(n=3)
    pt_gpa = g.pt.entry_gpa(gva(0), 1) & ~0xFFF
    g.pt.set_entry(DIR_ALIAS, 3, pt_gpa | P | W | U)  # the PT is also a PD there
    g.mem.write(data(1) + 8, (data(2) | P | W | U).to_bytes(8, "little"))
    run(g, [Read(gva(0), pattern(0)), Read(DIR_ALIAS + 2 * MiB + PAGE, pattern(2))])
    assert sorted(p.level for p in g.pages() if p.gfn == pt_gpa >> 12) == [1, 2]
    run(g, [SetPte(gva(5), 1, 0)])
    assert g.stat("mmu_unsync") == 0
    assert (g.vstat("pf_emulate"), g.stat("mmu_pte_write")) == (1, 1)
    g.close()


def test_unsync_page_reused_as_directory_is_zapped() -> None:
    """When a fault needs a directory shadow page for a gfn that has an unsync level-1
    shadow page, the guest reuses that page as a directory: the unsync page is zapped
    (mmu_shadow_zapped, mmu_unsync back to 0)."""
    g = Guest(n=3)
    pt_gpa = g.pt.entry_gpa(gva(0), 1) & ~0xFFF
    g.mem.write(data(1) + 8, (data(2) | P | W | U).to_bytes(8, "little"))
    run(g, [Read(gva(0), pattern(0)), SetPte(gva(5), 1, 0)])
    (unsync,) = g.page_for(pt_gpa >> 12, 1)
    assert unsync.unsync
    zapped = g.stat("mmu_shadow_zapped")
    run(g, [SetPte(DIR_ALIAS, 3, pt_gpa | P | W | U), Read(DIR_ALIAS + 2 * MiB + PAGE, pattern(2))])
    assert g.stat("mmu_shadow_zapped") == zapped + 1
    assert g.stat("mmu_unsync") == 0
    assert [p.level for p in g.pages() if p.gfn == pt_gpa >> 12] == [2]
    run(g, [Read(gva(0), pattern(0))])
    g.close()


# -- reaction to events: emulated writes to write-protected tables -------------------------


def test_write_to_upper_level_table_is_emulated(guest: Guest) -> None:
    """Upper-level guest tables are write-tracked and never unsync: a write to a PDE is
    emulated (pf_emulate, mmu_pte_write) and zaps the SPTE it fed, so there is no stale
    translation; a non-zero new PDE counts mmu_pde_zapped."""
    g = guest
    run(g, [Read(gva(0), pattern(0))])
    pde = g.pt.entry(gva(0), 2)
    run(g, [SetPte(gva(0), 2, 0)])
    assert g.vstat("pf_emulate") >= 1
    assert g.stat("mmu_pte_write") == 1
    assert g.stat("mmu_unsync") == 0
    assert g.stat("mmu_pde_zapped") == 0, "the new PDE is zero"
    run(g, [Read(gva(0), PF(PF_U)), SetPte(gva(0), 2, pde)])
    assert g.stat("mmu_pde_zapped") == 1
    run(g, [Read(gva(0), pattern(0))])


def test_write_flooding_unshadows(guest: Guest) -> None:
    """Three emulated writes to an upper-level table without the page being used in
    between zap its shadow page (mmu_flooded): the guest probably reuses it as data."""
    g = guest
    run(g, [Read(gva(0), pattern(0))])
    pd_gfn = g.pt.entry_gpa(gva(0), 2) >> 12
    spare = 0x7FE0_0000  # same PD, an entry the guest does not use
    for n in (1, 2):
        run(g, [SetPte(spare, 2, n)])
        (pd,) = g.page_for(pd_gfn, 2)
        assert pd.write_flooding_count == n
    run(g, [SetPte(spare, 2, 3)])
    assert g.stat("mmu_flooded") == 1
    assert g.page_for(pd_gfn, 2) == []
    assert g.stat("mmu_shadow_zapped") >= 1


def test_use_of_a_table_resets_write_flooding(guest: Guest) -> None:
    """A fault that walks through the shadow page resets its flooding count."""
    g = guest
    run(g, [Read(gva(0), pattern(0))])
    pd_gfn = g.pt.entry_gpa(gva(0), 2) >> 12
    spare = 0x7FE0_0000
    for n in range(6):
        run(g, [SetPte(spare, 2, n), Read(gva(n % 8 + 1), pattern(n % 8 + 1))])
    (pd,) = g.page_for(pd_gfn, 2)
    assert pd.write_flooding_count == 0
    assert g.stat("mmu_flooded") == 0


@pytest.mark.parametrize(("offset", "size"), [(0, 2), (4, 8)], ids=["short", "crossing"])
def test_misaligned_write_zaps(guest: Guest, offset: int, size: int) -> None:
    """An emulated write shorter than 4 bytes, or crossing a gpte boundary, zaps the
    shadow page at once (mmu_flooded)."""
    g = guest
    run(g, [Read(gva(0), pattern(0))])
    pd_gfn = g.pt.entry_gpa(gva(0), 2) >> 12
    spare = g.pt.entry_gpa(0x7FE0_0000, 2)
    g.vcpu.mmu.write(alias(spare) - 8 + offset, 0, size)
    g.mmu.audit()
    assert g.stat("mmu_flooded") == 1
    assert g.page_for(pd_gfn, 2) == []
    run(g, [Read(gva(0), pattern(0))])


# -- reaction to events: MMIO ----------------------------------------------------------------


def test_mmio_access_exits() -> None:
    """An access whose gpa has no memslot is MMIO (KVM_EXIT_MMIO): the exception names
    the gpa, the size of the part on that page, the direction and the written bytes;
    a page-crossing access reports the part that hit MMIO after the first completed."""
    g = Guest(n=1)
    g.pt.map(gva(1), HOLE, flags=P | W | U)
    with pytest.raises(GuestMmioAccess) as e:
        g.vcpu.mmu.access(gva(1) + 8, 4, write=True, value=0x44332211, cpl=3)
    assert (e.value.gpa, e.value.size, e.value.write, e.value.data) == (
        HOLE + 8,
        4,
        True,
        bytes.fromhex("11223344"),
    )
    with pytest.raises(GuestMmioAccess) as e:
        g.vcpu.mmu.access(gva(1), 2, cpl=3)
    assert (e.value.gpa, e.value.size, e.value.write, e.value.data) == (HOLE, 2, False, None)
    with pytest.raises(GuestMmioAccess) as e:
        g.vcpu.mmu.access(gva(1) - 4, 8, write=True, value=b"ABCDEFGH", cpl=3)
    assert (e.value.gpa, e.value.size, e.value.offset, e.value.data) == (HOLE, 4, 4, b"EFGH")
    assert g.mem.read(data(0) + PAGE - 4, 4) == b"ABCD", "the first part completed"
    assert g.vstat("pf_mmio_spte_created") == 1
    g.mmu.audit()
    g.close()


def test_write_to_readonly_slot_is_mmio() -> None:
    """A write to a KVM_MEM_READONLY slot exits as MMIO and leaves memory unchanged;
    reads return the slot's contents."""
    g = Guest(n=0)
    rom = GuestMemory(2 * MiB)
    rom.write(0, b"ROMDATA!")
    g.vm.set_user_memory_region(1, 64 * MiB, 2 * MiB, rom, flags=uapi.KVM_MEM_READONLY)
    g.pt.map(gva(0), 64 * MiB, flags=P | W | U)
    assert g.vcpu.mmu.access(gva(0), 8, cpl=3) == b"ROMDATA!"
    with pytest.raises(GuestMmioAccess) as e:
        g.vcpu.mmu.write(gva(0), 0x1122, cpl=3)
    assert (e.value.gpa, e.value.write) == (64 * MiB, True)
    assert rom.read(0, 8) == b"ROMDATA!"
    g.mmu.audit()
    g.close()


def test_mmio_spte_cached_with_generation() -> None:
    """The first MMIO access installs an MMIO SPTE (pf_mmio_spte_created) holding the
    gfn and the memslot generation; later accesses are answered from it without a
    page fault (pf_taken unchanged). A memslot change makes it stale: the next access
    takes the fault path again, and once memory backs the gpa it is memory."""
    g = Guest(n=1)
    g.pt.map(gva(1), HOLE, flags=P | W | U)
    run(g, [Read(gva(1), MMIO(HOLE))])
    assert (g.vstat("pf_taken"), g.vstat("pf_mmio_spte_created")) == (1, 1)
    (sp,) = [p for p in g.pages() if len(p.mmio())]
    i = int(sp.mmio()[0])
    assert (i, sp.gfns[i]) == (1, HOLE >> 12)
    run(g, [Read(gva(1), MMIO(HOLE))] * 3)
    assert g.vstat("pf_taken") == 1, "the MMIO SPTE answers"
    assert g.vstat("pf_emulate") == 1, "only the first access went through the fault path"
    extra = GuestMemory(2 * MiB)
    g.vm.set_user_memory_region(1, 64 * MiB, 2 * MiB, extra)  # new generation
    run(g, [Read(gva(1), MMIO(HOLE))])
    assert (g.vstat("pf_taken"), g.vstat("pf_mmio_spte_created")) == (2, 2)
    hole = GuestMemory(2 * MiB)
    hole.write(0, (0x1234).to_bytes(8, "little"))
    g.vm.set_user_memory_region(2, HOLE, 2 * MiB, hole)
    run(g, [Read(gva(1), 0x1234)])
    g.close()


def test_mmio_without_caching_faults_every_time(no_mmio_caching: None) -> None:
    """With mmio_caching off (the device here), no MMIO SPTE is made: every MMIO access
    takes the fault path and is emulated (pf_taken and pf_emulate)."""
    g = Guest(n=1)
    g.pt.map(gva(1), HOLE, flags=P | W | U)
    run(g, [Read(gva(1), MMIO(HOLE))] * 3)
    assert g.vstat("pf_mmio_spte_created") == 0
    assert (g.vstat("pf_taken"), g.vstat("pf_emulate")) == (3, 3)
    assert not any(len(p.mmio()) for p in g.pages())
    g.close()


# -- reaction to events: control registers -------------------------------------------------


def test_mov_cr3_counts_a_tlb_flush(guest: Guest) -> None:
    """MOV CR3 without the PCID no-flush bit flushes the current context: KVM's
    kvm_invalidate_pcid requests KVM_REQ_MMU_SYNC and KVM_REQ_TLB_FLUSH_CURRENT, and
    kvm_vcpu_flush_tlb_current counts tlb_flush on the next entry."""
    g = guest
    run(g, [Read(gva(0), pattern(0))])
    flushes = g.vstat("tlb_flush")
    run(g, [MovCr3(), Read(gva(0), pattern(0))])
    assert g.vstat("tlb_flush") == flushes + 1


def test_cr3_switch_reuses_cached_root() -> None:
    """MOV CR3 to another address space and back reuses the cached previous root
    (same shadow page, no mmu_cache_miss): the current root becomes prev_roots[0]."""
    g = Guest(n=2)
    cr3_a = g.pt.cr3
    pt_b = other_address_space(g, 2)
    run(g, [Read(gva(0), pattern(0))])
    root_a = g.root()
    assert root_a is not None
    run(g, [MovCr3(pt_b.cr3), Read(gva(0), pattern(1))])
    roots = g.mmu.roots()[0]
    assert roots.current is not None and roots.current.pgd == pt_b.cr3
    assert roots.prev[0] == root_a
    misses = g.stat("mmu_cache_miss")
    run(g, [MovCr3(cr3_a), Read(gva(0), pattern(0))])
    roots = g.mmu.roots()[0]
    assert roots.current == root_a
    assert roots.prev[0] is not None and roots.prev[0].pgd == pt_b.cr3
    assert g.stat("mmu_cache_miss") == misses
    assert g.mmu.shadow_page(root_a.page or 0).root_count == 1
    g.close()


def test_prev_root_cache_keeps_three_roots() -> None:
    """KVM caches three previous roots: switching through five address spaces frees
    the least recently used ones (their pages stay until zapped, but are no root)."""
    g = Guest(n=1)
    cr3s = [g.pt.cr3]
    for k in range(4):
        pt = PageTables(g.mem, "4-level", pool=POOL + POOL_SIZE + k * 64 * KiB, pool_size=64 * KiB)
        pt.map(gva(0), data(0))
        cr3s.append(pt.cr3)
    for cr3 in cr3s[1:]:
        run(g, [MovCr3(cr3), Read(gva(0), pattern(0))])
    roots = g.mmu.roots()[0]
    assert roots.current is not None and roots.current.pgd == cr3s[4]
    assert [r.pgd if r else None for r in roots.prev] == cr3s[3:0:-1]
    held = {r.page for r in (roots.current, *roots.prev) if r}
    for p in g.pages():
        assert p.root_count == (1 if p.index in held else 0)
    g.close()


def test_cr3_switch_syncs_newly_reachable_pages() -> None:
    """mmu.txt, mov to cr3: "synchronize newly reachable shadow pages". A table of the
    cached address space A, edited while B runs, goes unsync (it is not write-tracked);
    switching back to A syncs it, so A sees the edit at once."""
    g = Guest(n=2)
    pt_b = other_address_space(g, 2)
    run(g, [Read(gva(0), pattern(0)), MovCr3(pt_b.cr3)])
    run(g, [SetPte(gva(0), 1, data(1) | P | W | U)], PtDriver(g, g.pt))
    assert g.stat("mmu_unsync") == 1 and g.vstat("pf_emulate") == 0
    run(g, [MovCr3(g.pt.cr3), Read(gva(0), pattern(1))])
    assert g.stat("mmu_unsync") == 0


def test_cr0_wp_change_resets_context() -> None:
    """MOV CR0 that clears WP sets up a new MMU context: new roots with role cr0_wp=0,
    in which a supervisor write to a read-only user page is allowed (KVM makes the SPTE
    writable and supervisor-only); a user read afterwards is fixed by a new fault."""
    g = Guest(n=0)
    g.map_data(0, P | U)
    run(g, [Write(gva(0), 1, PF(PF_P | PF_W), cpl=0)])
    old = g.root()
    cr0 = g.vcpu.get_sregs().cr0
    g.vcpu.mmu.set_cr0(cr0 & ~CR0_WP)
    g.mmu.audit()
    root = g.root()
    assert root != old
    roots = g.mmu.roots()[0]
    assert not roots.root_role.cr0_wp
    run(g, [Write(gva(0), 7, cpl=0)])
    leaf = g.leaf_of(data(0))
    assert leaf is not None
    spte = int(leaf[0].sptes[leaf[1]])
    assert spte & W and not spte & U
    assert not leaf[0].role.cr0_wp
    run(g, [Read(gva(0), 7, cpl=3)])
    run(g, [Write(gva(0), 8, PF(PF_P | PF_W | PF_U), cpl=3)])
    g.close()


def test_smep_with_wp_clear_is_part_of_the_role() -> None:
    """CR4.SMEP with CR0.WP=0 is its own role (smep_andnot_wp): the pages made before
    are not reused after the change."""
    g = Guest(n=1)
    run(g, [Read(gva(0), pattern(0))])
    g.vcpu.mmu.set_cr0(g.vcpu.get_sregs().cr0 & ~CR0_WP)
    run(g, [Read(gva(0), pattern(0))])
    g.vcpu.mmu.set_cr4(g.vcpu.get_sregs().cr4 | CR4_SMEP)
    run(g, [Read(gva(0), pattern(0))])
    roots = g.mmu.roots()[0]
    assert roots.root_role.smep_andnot_wp
    assert roots.current is not None
    assert g.mmu.shadow_page(roots.current.page or 0).role.smep_andnot_wp
    words = {p.role.word & ~0xF for p in g.pages()}
    assert len(words) >= 3, "three contexts, three role families"
    g.close()


def test_control_register_checks_raise_gp(guest: Guest) -> None:
    """A MOV to CR3 with bits above MAXPHYADDR, or a reserved EFER bit, is #GP (vector
    13) and changes nothing."""
    g = guest
    root = g.root()
    with pytest.raises(GuestPageFault) as e:
        g.vcpu.mmu.load_cr3(1 << 62)
    assert e.value.vector == 13
    with pytest.raises(GuestPageFault) as e:
        g.vcpu.mmu.set_efer(1 << 40)
    assert e.value.vector == 13
    assert g.vcpu.get_sregs().cr3 == g.pt.cr3
    assert g.root() == root
    g.mmu.audit()


def test_non_canonical_access_is_gp(guest: Guest) -> None:
    with pytest.raises(GuestPageFault) as e:
        guest.vcpu.mmu.access(0x0000_8000_0000_0000)
    assert (e.value.vector, e.value.error_code) == (13, 0)
    assert guest.vstat("pf_taken") == 0


def test_dummy_root_when_cr3_outside_memslots() -> None:
    """A CR3 outside every memslot gets KVM's dummy root (no shadow page)."""
    g = Guest(n=1)
    g.vcpu.mmu.load_cr3(HOLE)
    # The walker cannot read the table either: a not-present #PF.
    run(g, [Read(gva(0), PF(PF_U))])
    root = g.root()
    assert root is not None and (root.kind, root.pgd, root.pages) == ("dummy", HOLE, ())
    g.mmu.audit()
    g.close()


# -- shadow pages ------------------------------------------------------------------------------


def test_same_table_with_other_access_gets_its_own_shadow_page() -> None:
    """A shadow page is reused only for the same gfn and role word: one guest page
    table reached through a user PDE and a supervisor PDE is shadowed twice, with
    role.access uwx and -wx, and rmap lists both leaves of its data page."""
    g = Guest(n=1)
    pte_table = g.pt.entry_gpa(gva(0), 1) & ~0xFFF
    other = 0x4060_0000  # another PD entry, pointing at the same page table, supervisor
    g.pt.set_entry(other, 2, pte_table | P | W)
    run(g, [Read(gva(0), pattern(0)), Read(other, pattern(0), cpl=0)])
    sps = g.page_for(pte_table >> 12, 1)
    assert sorted(p.role.access_str for p in sps) == ["-wx", "uwx"]
    assert len({p.role.word for p in sps}) == 2
    rmap = g.mmu.rmap(data(0) >> 12)
    assert sorted(e.sp for e in rmap) == sorted(p.index for p in sps)
    run(g, [Read(other, PF(PF_P | PF_U), cpl=3)])
    g.close()


def test_32bit_guest_uses_pae_roots_and_quadrants() -> None:
    """32-bit guests are shadowed with PAE tables: four root PDs (quadrants 0-3 of the
    guest PD), and a guest page table becomes two level-1 pages, quadrant = VA bit 21."""
    g = Guest("32-bit", n=0)
    lo, hi = 0x0040_0000, 0x0060_0000  # same guest PT (4 MiB), VA bit 21 = 0 and 1
    g.pt.map(lo, data(0))
    g.pt.map(hi, data(1))
    for i in (0, 1):
        g.mem.write(data(i), pattern(i).to_bytes(8, "little"))
    run(g, [Read(lo, pattern(0)), Read(hi, pattern(1))])
    root = g.root()
    assert root is not None and root.kind == "pae" and len(root.pages) == 4
    pd_gfn = g.pt.cr3 >> 12
    quads = [g.mmu.shadow_page(sp).role for sp in root.pages if sp is not None]
    assert [(r.level, r.quadrant, r.has_4_byte_gpte) for r in quads] == [
        (2, q, True) for q in range(4)
    ]
    assert {g.mmu.shadow_page(sp).gfn for sp in root.pages if sp is not None} == {pd_gfn}
    pt_gfn = g.pt.entry_gpa(lo, 1) >> 12
    assert sorted(p.role.quadrant for p in g.page_for(pt_gfn, 1)) == [0, 1]
    g.close()


def test_pae_guest_root_per_pdpte() -> None:
    """A PAE guest's root is the vCPU's pae_root: one level-2 page per present PDPTE,
    none for a not-present one."""
    g = Guest("pae", n=1)
    run(g, [Read(gva(0), pattern(0))])
    root = g.root()
    assert root is not None and root.kind == "pae"
    present = [i for i in range(4) if g.pt.read(g.pt.cr3 + 8 * i) & P]
    assert [i for i, sp in enumerate(root.pages) if sp is not None] == present
    g.close()


def test_nonpaging_guest_uses_direct_pages() -> None:
    """Without guest paging KVM maps gpa->hpa with direct pages: linear gfn ranges, no
    guest table behind them (role.direct), four PAE roots covering 4 GiB."""
    g = Guest("none", n=2)
    assert g.vcpu.mmu.access(data(1), 8) == pattern(1).to_bytes(8, "little")
    g.mmu.audit()
    root = g.root()
    assert root is not None and root.kind == "pae"
    assert all(p.direct for p in g.pages())
    leaf = g.leaf_of(data(1))
    assert leaf is not None
    sp, i = leaf
    assert sp.direct and sp.level == 1 and sp.gfn + i == data(1) >> 12
    assert g.mmu.indirect_shadow_pages == 0
    g.close()


def test_shadow_pages_shared_by_vcpus() -> None:
    """vCPUs with the same CR3 and role share the root page (root_count 2); a gpte
    edit made through one vCPU is stale for both until each flushes."""
    g = Guest(n=1, vcpus=2)
    d0, d1 = SimDriver(g, 0), SimDriver(g, 1)
    run(g, [Read(gva(0), pattern(0))], d0)
    run(g, [Read(gva(0), pattern(0))], d1)
    r0, r1 = g.root(0), g.root(1)
    assert r0 is not None and r0 == r1
    assert g.mmu.shadow_page(r0.page or 0).root_count == 2
    run(g, [SetPte(gva(0), 1, 0)], d1)
    run(g, [Read(gva(0), pattern(0))], d0)
    run(g, [Invlpg(gva(0)), Read(gva(0), PF(PF_U))], d1)
    run(g, [Read(gva(0), PF(PF_U))], d0)
    g.close()


def test_accesses_from_threads() -> None:
    """vcpu.mmu calls release the GIL: two vCPU threads access concurrently and every
    value is right."""
    g = Guest(n=64, vcpus=2)
    errors: list[BaseException] = []

    def work(v: int) -> None:
        try:
            mmu = g.vcpus[v].mmu
            for r in range(20):
                for i in range(v, 64, 2):
                    assert mmu.read(gva(i), cpl=3) == pattern(i)
                    mmu.write(gva(i) + 8, r, cpl=3)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(v,)) for v in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    g.mmu.audit()
    g.close()


# -- zapping -----------------------------------------------------------------------------------


def test_memslot_delete_zaps_all() -> None:
    """Deleting a memslot zaps every shadow page (fast zap-all: the generation flips,
    everything is obsolete); a root still in use stays as an invalid root until the
    vCPU drops it on its next entry. The deleted gpa is then MMIO."""
    g = Guest(n=1)
    extra = GuestMemory(2 * MiB)
    extra.write(0, (0xABCD).to_bytes(8, "little"))
    g.vm.set_user_memory_region(1, 64 * MiB, 2 * MiB, extra)
    g.pt.map(gva(1), 64 * MiB)
    run(g, [Read(gva(0), pattern(0)), Read(gva(1), 0xABCD)])
    gen = g.mmu.mmu_valid_gen
    old_root = g.root()
    assert old_root is not None
    g.vm.set_user_memory_region(1, 64 * MiB, 0, 0)
    g.mmu.audit()
    assert g.mmu.mmu_valid_gen != gen
    assert g.stat("mmu_shadow_zapped") >= 1
    assert g.stat("pages_4k") == 0
    (left,) = g.pages()
    assert (left.index, left.obsolete, left.invalid, left.state) == (
        old_root.page,
        True,
        True,
        "invalid_root",
    )
    assert left.root_count == 1
    assert "OBSOLETE" in g.mmu.to_dot()
    run(g, [Read(gva(0), pattern(0)), Read(gva(1), MMIO(64 * MiB))])
    assert all(not p.obsolete for p in g.pages())
    g.close()


def test_memslot_move_zaps_all() -> None:
    """Moving a memslot zaps everything too; the guest then reaches the memory at its
    new gpa."""
    g = Guest(n=1)
    extra = GuestMemory(2 * MiB)
    extra.write(0, (0xABCD).to_bytes(8, "little"))
    g.vm.set_user_memory_region(1, 64 * MiB, 2 * MiB, extra)
    g.pt.map(gva(1), 64 * MiB)
    g.pt.map(gva(2), 96 * MiB)
    run(g, [Read(gva(0), pattern(0)), Read(gva(1), 0xABCD)])
    zapped = g.stat("mmu_shadow_zapped")
    g.vm.set_user_memory_region(1, 96 * MiB, 2 * MiB, extra)
    g.mmu.audit()
    assert g.stat("mmu_shadow_zapped") > zapped
    run(g, [Read(gva(1), MMIO(64 * MiB)), Read(gva(2), 0xABCD)])
    g.close()


def test_page_limit_reclaims_oldest() -> None:
    """With KVM_SET_NR_MMU_PAGES at 64, faults reclaim the oldest shadow pages first
    (creation order), never a root; mmu_recycled counts them."""
    g = Guest(n=0)
    g.vm.set_nr_mmu_pages(64)
    n = 80  # each in its own 2 MiB region: a guest page table (and shadow page) each
    addrs = [0x1_0000_0000 + k * 2 * MiB for k in range(n)]
    for a in addrs:
        g.pt.map(a, data(0))
    g.mem.write(data(0), pattern(0).to_bytes(8, "little"))
    order = []
    for a in addrs:
        run(g, [Read(a, pattern(0))])
        leaf = g.leaf_of(data(0))
        order.append(g.pt.entry_gpa(a, 1) >> 12)
        assert leaf is not None
        assert g.mmu.n_used <= g.mmu.n_max + 5
    assert g.mmu.n_max == 64
    assert g.stat("mmu_recycled") > 0
    level1 = {p.gfn for p in g.pages() if p.level == 1}
    assert order[-1] in level1
    assert order[0] not in level1, "the oldest page table went first"
    root = g.root()
    assert root is not None and root.page in {p.index for p in g.pages()}
    run(g, [Read(addrs[0], pattern(0))])
    g.close()


def test_set_nr_mmu_pages_below_use_zaps_down_to_the_limit() -> None:
    """Lowering the limit below the pages in use zaps the oldest down to it."""
    g = Guest(n=0)
    g.vm.set_nr_mmu_pages(1000)
    for k in range(100):
        g.pt.map(0x1_0000_0000 + k * 2 * MiB, data(0))
        run(g, [Read(0x1_0000_0000 + k * 2 * MiB, 0)])
    used = g.mmu.n_used
    assert used > 100
    g.vm.set_nr_mmu_pages(64)
    g.mmu.audit()
    assert g.mmu.n_used <= 64
    assert g.mmu.n_max == 64
    assert g.stat("mmu_recycled") == used - g.mmu.n_used
    g.close()


# -- large pages -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hugepages", "misaligned", "level"),
    [(True, False, 2), (False, False, 1), (True, True, 1)],
    ids=["thp_aligned", "no_thp", "thp_misaligned"],
)
def test_large_page_needs_thp_and_alignment(hugepages: bool, misaligned: bool, level: int) -> None:
    """A 2 MiB guest page gets a 2 MiB SPTE only if the host backs it with a huge page
    (GuestMemory(hugepages=True)) and the slot's gpa and hva agree in their low 21
    bits; otherwise it is shadowed by a direct level-1 page of 4 KiB SPTEs (mmu.txt:
    "large guest pages backed by small host pages")."""
    g = Guest(n=0, hugepages=hugepages, misaligned=misaligned)
    big = 0x8000_0000
    g.pt.map(big, 2 * MiB, size=2 * MiB)
    g.mem.write(2 * MiB + 0x1238, (0x77).to_bytes(8, "little"))
    run(g, [Read(big + 0x1238, 0x77)])
    leaf = g.leaf_of(2 * MiB + 0x1000)
    assert leaf is not None
    sp, i = leaf
    assert sp.level == level
    if level == 2:
        assert g.stat("pages_2m") == 1 and not sp.direct
        assert g.mmu.rmap((2 * MiB + 0x1000) >> 12) == [kvmmmu.mmu.RmapEntry(2, sp.index, i)]
    else:
        assert g.stat("pages_2m") == 0
        assert sp.direct and sp.gfn == (2 * MiB) >> 12 and i == 1
        # A read through a clean (D=0) guest page: W is withheld until a write sets D;
        # the write then needs a direct page with other rights: the old one is
        # unlinked (kept, parentless, with its leaves) and a new one linked instead.
        assert sp.role.access_str == "u-x"
        parent = sp.parents
        run(g, [Write(big + 0x1238, 0x78)])
        assert g.pt.entry(big, 2) & D
        old, new = (g.mmu.shadow_page(e.sp) for e in g.mmu.rmap((2 * MiB + 0x1000) >> 12))
        assert (old.index, old.parents) == (sp.index, ())
        assert (new.role.access_str, new.parents, new.gfn) == ("uwx", parent, sp.gfn)
    g.close()


def test_large_page_over_a_page_table_is_split() -> None:
    """A 2 MiB guest page that contains one of the guest's own page tables is mapped
    with 4 KiB SPTEs: the shadowed (write-tracked) table disallows the huge page."""
    g = Guest(n=1, hugepages=True)
    big = 0x8000_0000
    g.pt.map(big, POOL, size=2 * MiB)  # the 2 MiB frame of the page-table pool
    run(g, [Read(gva(0), pattern(0)), Read(big + 0x10, g.pt.read(POOL + 0x10))])
    assert g.stat("pages_2m") == 0
    leaf = g.leaf_of(POOL)
    assert leaf is not None and leaf[0].level == 1
    g.close()


def test_1g_guest_page_uses_2m_sptes() -> None:
    """The host maps guest memory with at most 2 MiB pages here, so a 1 GiB guest page
    is shadowed by a direct level-2 page of 2 MiB SPTEs."""
    g = Guest(n=0, hugepages=True)
    huge = 0x80_0000_0000
    g.pt.map(huge, 0, size=GiB)
    g.mem.write(4 * MiB + 8, (0x99).to_bytes(8, "little"))
    run(g, [Read(huge + 4 * MiB + 8, 0x99)])
    assert (g.stat("pages_1g"), g.stat("pages_2m")) == (0, 1)
    leaf = g.leaf_of(4 * MiB)
    assert leaf is not None
    sp, i = leaf
    assert (sp.level, sp.direct, sp.gfn, i) == (2, True, 0, 2)
    g.close()


# -- API surface -------------------------------------------------------------------------------


def test_access_arguments(guest: Guest) -> None:
    mmu = guest.vcpu.mmu
    mmu.access(gva(0), 4, write=True, value=-1, cpl=3)
    assert mmu.access(gva(0), 8, cpl=3) == b"\xff\xff\xff\xff\x5a\x5a\x00\x00"
    mmu.access(gva(0), write=True, value=b"\x01\x02\x03")
    assert mmu.read(gva(0), 4) == 0xFF030201
    assert mmu.access(gva(0), 0) == b""
    for bad in (
        dict(write=True),
        dict(value=1),
        dict(write=True, fetch=True, value=1),
        dict(cpl=4),
    ):
        with pytest.raises(ValueError):
            mmu.access(gva(0), **bad)  # type: ignore[arg-type]
    with pytest.raises(OverflowError):
        mmu.access(gva(0), 1, write=True, value=256)


def test_guest_memory_hugepages_option() -> None:
    with GuestMemory(4 * MiB, hugepages=True) as m:
        assert m.hugepages and "hugepages=True" in repr(m)
    with GuestMemory(4 * MiB) as m:
        assert not m.hugepages


def test_mmio_caching_option(no_mmio_caching: None) -> None:
    assert not kvmmmu.mmio_caching()
    kvmmmu.set_mmio_caching(True)
    assert kvmmmu.mmio_caching()
    kvmmmu.set_mmio_caching(False)


def test_role_decoding() -> None:
    r = kvmmmu.mmu.Role.from_word(0x3704)
    assert (r.level, r.access, r.cr0_wp, r.efer_nx, r.direct) == (4, 7, True, True, False)
    assert r.word == 0x3704
    assert r.access_str == "uwx"


def test_mmu_views_are_simulator_only(kvm: kvmmmu.Kvm) -> None:
    with kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        if kvm.backend == "dev":
            with pytest.raises(NotImplementedError, match="simulator-only"):
                _ = vm.mmu
            with pytest.raises(NotImplementedError, match="simulator-only"):
                _ = vcpu.mmu
        else:
            assert vm.mmu.shadow_pages() == []
            assert vm.mmu.roots()[0].current is None
            vm.mmu.audit()
            assert vm.mmu.n_used == 0 and vm.mmu.memory_bytes() > 0
            assert vm.mmu.stats()["mmu_shadow_zapped"] == 0
