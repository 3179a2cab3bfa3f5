"""Random guest activity against the shadow MMU: a hypothesis state machine whose
rules are guest and host events (accesses at CPL 0/3, gpte edits through the alias,
INVLPG, MOV CR3 between two address spaces, guest TLB flushes, CR0.WP toggles,
memslot churn, page-limit changes) and whose invariants are the audit after every
step and, after a guest TLB flush, agreement of every access with KVM's walker: once
the guest has flushed, the shadow MMU must translate exactly as the guest tables say.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvmmmu import GuestMemory, GuestMmioAccess, GuestPageFault
from kvmmmu.guest.paging import NX, A, D, P, U, W

from .test_shadow_mmu import (
    CR0_WP,
    HOLE,
    Guest,
    MiB,
    alias,
    data,
    gva,
    other_address_space,
)

N = 16
FLAGS = st.sampled_from(
    [0, P, P | W, P | U, P | W | U, P | W | U | A, P | W | U | A | D, P | U | NX]
)
TARGETS = st.one_of(st.integers(0, N - 1).map(data), st.just(HOLE))


def outcome(f):  # type: ignore[no-untyped-def]
    try:
        return ("ok", f())
    except GuestPageFault as e:
        return ("fault", e.vector, e.error_code, e.address)
    except GuestMmioAccess as e:
        return ("mmio", e.gpa)


class ShadowMachine(RuleBasedStateMachine):
    """4-level paging; the subclasses below run the same rules in other modes."""

    MODE = "4-level"

    def __init__(self) -> None:
        super().__init__()
        self.g = Guest(self.MODE, n=N)
        g = self.g
        self.width = 4 if self.MODE == "32-bit" else 8
        self.spaces = [g.pt]
        self.spaces.append(other_address_space(g, N))
        self.space = 0
        self.extra: GuestMemory | None = None

    def teardown(self) -> None:
        self.g.close()

    @property
    def mmu(self):  # type: ignore[no-untyped-def]
        return self.g.vcpu.mmu

    # -- guest events --------------------------------------------------------------------

    @rule(i=st.integers(0, N - 1), cpl=st.sampled_from([0, 3]), fetch=st.booleans())
    def read(self, i: int, cpl: int, fetch: bool) -> None:
        outcome(lambda: self.mmu.access(gva(i) + 8 * i, 8, cpl=cpl, fetch=fetch))

    @rule(i=st.integers(0, N - 1), cpl=st.sampled_from([0, 3]), v=st.integers(0, 2**64 - 1))
    def write(self, i: int, cpl: int, v: int) -> None:
        outcome(lambda: self.mmu.write(gva(i) + 16, v, cpl=cpl))

    @rule(
        space=st.integers(0, 1),
        i=st.integers(0, N - 1),
        dest=TARGETS,
        flags=FLAGS,
        cpl=st.sampled_from([0, 3]),
    )
    def set_pte(self, space: int, i: int, dest: int, flags: int, cpl: int) -> None:
        """The guest rewrites a PTE of either address space through the alias."""
        e = self.spaces[space].entry_gpa(gva(i), 1)
        v = (dest | flags) & ((1 << (8 * self.width)) - 1)
        outcome(lambda: self.mmu.write(alias(e), v, self.width, cpl=cpl))

    @rule(bit=st.sampled_from([W, U]), cpl=st.sampled_from([0, 3]))
    def toggle_pde(self, bit: int, cpl: int) -> None:
        """An upper-level edit (write-tracked: emulated) of the data pages' PDE."""
        pt = self.spaces[self.space]
        e = pt.entry_gpa(gva(0), 2)
        outcome(lambda: self.mmu.write(alias(e), pt.read(e) ^ bit, self.width, cpl=cpl))

    @rule(i=st.integers(0, N - 1))
    def invlpg(self, i: int) -> None:
        self.mmu.invlpg(gva(i))

    @rule(switch=st.booleans())
    def mov_cr3(self, switch: bool) -> None:
        if switch:
            self.space ^= 1
        self.mmu.load_cr3(self.spaces[self.space].cr3)

    @rule()
    def toggle_wp(self) -> None:
        self.mmu.set_cr0(self.g.vcpu.get_sregs().cr0 ^ CR0_WP)

    # -- host events ---------------------------------------------------------------------

    @rule()
    def memslot_churn(self) -> None:
        """Create or delete a second slot (delete: fast zap-all)."""
        if self.extra is None:
            self.extra = GuestMemory(2 * MiB)
            self.g.vm.set_user_memory_region(1, 64 * MiB, 2 * MiB, self.extra)
        else:
            self.g.vm.set_user_memory_region(1, 64 * MiB, 0, 0)
            self.extra = None

    @rule(n=st.sampled_from([64, 100, 1000]))
    def page_limit(self, n: int) -> None:
        self.g.vm.set_nr_mmu_pages(n)

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def audit(self) -> None:
        self.g.mmu.audit()

    @rule(
        i=st.integers(0, N - 1),
        cpl=st.sampled_from([0, 3]),
        kind=st.sampled_from(["read", "write", "fetch"]),
    )
    def flushed_access_agrees_with_walker(self, i: int, cpl: int, kind: str) -> None:
        """After a guest TLB flush (MOV CR3 to itself), an access translates exactly as
        the guest walker does (same gpa, same fault), and reads see that gpa's bytes."""
        self.mmu.load_cr3(self.spaces[self.space].cr3)
        addr = gva(i) + 24
        write, fetch = kind == "write", kind == "fetch"
        want = outcome(lambda: self.mmu.walk(addr, write=write, fetch=fetch, user=cpl == 3))
        if kind == "write":
            got = outcome(lambda: self.mmu.write(addr, 0x1234, cpl=cpl))
        else:
            got = outcome(lambda: self.mmu.access(addr, 8, fetch=fetch, cpl=cpl))
        if want[0] == "fault":
            assert got == want
            return
        gpa = want[1].gpa
        if gpa >= 16 * MiB and not (self.extra is not None and 64 * MiB <= gpa < 66 * MiB):
            assert got == ("mmio", gpa)
            return
        assert got[0] == "ok", got
        if kind == "write":
            assert self.g.mem.read(gpa, 8) == (0x1234).to_bytes(8, "little") or gpa >= 16 * MiB
        elif gpa < 16 * MiB:
            assert got[1] == self.g.mem.read(gpa, 8)


class PaeMachine(ShadowMachine):
    MODE = "pae"


class Bits32Machine(ShadowMachine):
    MODE = "32-bit"


class Level5Machine(ShadowMachine):
    MODE = "5-level"


SETTINGS = settings(
    max_examples=int(os.environ.get("SHADOW_EXAMPLES", "40")),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestShadowMachine = ShadowMachine.TestCase
TestPaeMachine = PaeMachine.TestCase
TestBits32Machine = Bits32Machine.TestCase
TestLevel5Machine = Level5Machine.TestCase
for _t in (TestShadowMachine, TestPaeMachine, TestBits32Machine, TestLevel5Machine):
    _t.settings = SETTINGS
