"""The simulator-only MMU surfaces: ``vcpu.mmu`` and ``vm.mmu``.

``vcpu.mmu.walk(gva, write=, user=, fetch=, implicit=)`` translates through the
vCPU's current paging state (CR0/CR3/CR4/EFER from its sregs, the CPUID's
MAXPHYADDR and 1 GiB-page support, PKRU, RFLAGS.AC) exactly as KVM's walker
does, setting accessed/dirty bits in guest memory on success, and returns a
:class:`WalkResult` with every gpte it visited, or raises
:class:`GuestPageFault` with the vector, error code and faulting address the
guest would see. ``walk_many`` does the same for a numpy array of addresses.

``vcpu.mmu.access(gva, size, write=, fetch=, cpl=, value=)`` is a guest memory
access through the *shadow* MMU, whose SPTEs are the vCPU's TLB: a hit uses the
SPTE as the hardware would (so a guest that edits a gpte without INVLPG keeps the
old translation while its shadow page is unsync), a miss takes KVM's fault path
(fixed, reflected to the guest as :class:`GuestPageFault`, or emulated). An
access with no memory behind it raises :class:`GuestMmioAccess`. ``invlpg``,
``load_cr3``, ``set_cr0``/``set_cr4``/``set_efer`` and ``flush_tlb`` are the
guest's TLB maintenance, with KVM's reaction to each.

``vm.mmu`` shows the VM's shadow MMU: :class:`ShadowPage` objects, every vCPU's
roots, rmaps, the audit, KVM's counters and a Graphviz picture (``to_dot``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from . import _core

if TYPE_CHECKING:
    from numpy.typing import NDArray

#: Page-fault error-code bits.
PFERR_PRESENT, PFERR_WRITE, PFERR_USER, PFERR_RSVD, PFERR_FETCH, PFERR_PK = (
    1 << 0,
    1 << 1,
    1 << 2,
    1 << 3,
    1 << 4,
    1 << 5,
)
#: ACC_* rights of a translation.
ACC_EXEC, ACC_WRITE, ACC_USER = 1, 2, 4

_EC_NAMES = (
    (PFERR_PRESENT, "P"),
    (PFERR_WRITE, "W"),
    (PFERR_USER, "U"),
    (PFERR_RSVD, "RSVD"),
    (PFERR_FETCH, "I/D"),
    (PFERR_PK, "PK"),
)


def describe_error_code(error_code: int) -> str:
    """'P|W|U' style names of a page-fault error code."""
    return "|".join(n for bit, n in _EC_NAMES if error_code & bit) or "0"


class GuestPageFault(Exception):
    """The fault a guest access raises: #PF (14) or #GP (13, a non-canonical address)."""

    def __init__(self, vector: int, error_code: int, address: int) -> None:
        self.vector = vector
        self.error_code = error_code
        self.address = address
        name = "#PF" if vector == 14 else "#GP" if vector == 13 else f"vector {vector}"
        super().__init__(
            f"{name} error_code={error_code:#x} ({describe_error_code(error_code)}) "
            f"address={address:#x}"
        )


class DirtyRingFull(Exception):
    """The vCPU's dirty ring reached its soft limit: KVM_RUN exits with
    ``KVM_EXIT_DIRTY_RING_FULL`` and will not enter the guest until userspace harvests
    the ring and calls ``KVM_RESET_DIRTY_RINGS``. The access did not happen."""


class GuestMmioAccess(Exception):
    """A guest access with no memory behind it (no memslot, or a write to a read-only
    slot): what ``KVM_RUN`` reports as ``KVM_EXIT_MMIO`` (``run.mmio.phys_addr``,
    ``len``, ``is_write``, ``data``).

    ``size`` bytes at ``gpa`` are the part of the access on that page (``offset``
    bytes into the access; earlier parts on other pages completed). ``data`` is what
    a write stores, None for a read (userspace supplies the value). KVM_RUN splits a
    part longer than 8 bytes into several exits; an instruction fetch from MMIO is
    KVM_EXIT_INTERNAL_ERROR there.
    """

    def __init__(
        self,
        gpa: int,
        size: int,
        write: bool,
        data: bytes | None,
        *,
        gva: int | None = None,
        offset: int = 0,
    ) -> None:
        self.gpa = gpa
        self.size = size
        self.write = write
        self.data = data
        self.gva = gva
        self.offset = offset
        what = f"write {data.hex()}" if data is not None else "read"
        super().__init__(f"MMIO {what} of {size} bytes at gpa {gpa:#x}")


class MmuAuditError(AssertionError):
    """The shadow MMU broke one of its invariants (``vm.mmu.audit()``)."""


def set_mmio_caching(on: bool) -> None:
    """KVM's ``mmio_caching`` module parameter for the simulator (process-wide, on by
    default): whether the shadow MMU caches MMIO translations in MMIO SPTEs, which
    answer later accesses without a walk. Off, every MMIO access takes the fault path
    (pf_taken and pf_emulate), as on a host loaded with ``kvm.mmio_caching=N``. The
    device's value is in /sys/module/kvm/parameters/mmio_caching."""
    _core.set_mmio_caching(bool(on))


def mmio_caching() -> bool:
    """The simulator's current ``mmio_caching``."""
    return bool(_core.mmio_caching())


class Gpte(NamedTuple):
    """A guest entry the walk read: its level, where it lives, and its value."""

    level: int
    gpa: int
    value: int

    def __repr__(self) -> str:
        return f"Gpte(level={self.level}, gpa={self.gpa:#x}, value={self.value:#x})"


class WalkResult(NamedTuple):
    """A successful translation (immutable; a NamedTuple so that building one is cheap)."""

    gpa: int
    #: Leaf level: 1 = 4 KiB, 2 = 2/4 MiB, 3 = 1 GiB; 0 without paging.
    level: int
    page_size: int
    #: Effective ACC bits (ACC_EXEC | ACC_WRITE | ACC_USER) the guest tables grant.
    access: int
    pkey: int
    dirty: bool
    gptes: tuple[Gpte, ...]

    @property
    def writable(self) -> bool:
        return bool(self.access & ACC_WRITE)

    @property
    def user(self) -> bool:
        return bool(self.access & ACC_USER)

    @property
    def executable(self) -> bool:
        return bool(self.access & ACC_EXEC)


class VcpuMmu:
    """``vcpu.mmu`` on the simulator."""

    def __init__(self, core_mmu: _core.VcpuMmu) -> None:
        self._mmu = core_mmu

    def walk(
        self,
        gva: int,
        *,
        write: bool = False,
        user: bool = False,
        fetch: bool = False,
        implicit: bool = False,
    ) -> WalkResult:
        r: Any = self._mmu.walk(gva, write, user, fetch, implicit)
        if not r[0]:
            raise GuestPageFault(r[1], r[2], r[3])
        _, gpa, level, size, access, pkey, dirty, gptes = r
        return WalkResult(gpa, level, size, access, pkey, dirty, tuple(map(Gpte._make, gptes)))

    def walk_many(
        self,
        gvas: NDArray[np.uint64] | list[int],
        *,
        write: bool = False,
        user: bool = False,
        fetch: bool = False,
        implicit: bool = False,
    ) -> tuple[NDArray[np.uint64], NDArray[np.uint8], NDArray[np.uint32]]:
        """(gpas, vectors, error_codes) for every address; faults have gpa 2**64-1."""
        arr = np.ascontiguousarray(gvas, dtype=np.uint64)
        return self._mmu.walk_many(arr, write, user, fetch, implicit)

    def access(
        self,
        gva: int,
        size: int = 8,
        *,
        write: bool = False,
        fetch: bool = False,
        cpl: int = 0,
        value: int | bytes | bytearray | memoryview | None = None,
        implicit: bool = False,
    ) -> bytes | None:
        """A guest access through the shadow MMU: the bytes read (a read or a fetch) or
        None (a write of ``value``: an int, stored little-endian in ``size`` bytes, or
        bytes, whose length is the size). ``cpl`` 3 is a user access; ``implicit`` is
        a supervisor access the CPU makes itself (descriptor tables).

        Raises :class:`GuestPageFault` for the #PF (CR2 = its address) or #GP the guest
        takes, and :class:`GuestMmioAccess` when there is no memory behind the access.
        Page-crossing accesses are split as the CPU splits them; parts before a fault
        or MMIO part have completed."""
        if not 0 <= cpl <= 3:
            raise ValueError(f"cpl must be 0..3, not {cpl}")
        if write and fetch:
            raise ValueError("an access is a write or a fetch, not both")
        data: bytes | None = None
        if write:
            if value is None:
                raise ValueError("a write needs a value")
            if isinstance(value, int):
                if value < 0:
                    value &= (1 << (8 * size)) - 1
                data = value.to_bytes(size, "little")
            else:
                data = bytes(value)
                size = len(data)
        elif value is not None:
            raise ValueError("value is for writes")
        if size < 0:
            raise ValueError("size must not be negative")
        r: Any = self._mmu.access(gva, size, data, write, fetch, cpl == 3, implicit)
        if r[0] == 0:
            return r[1]
        if r[0] == 1:
            _, gpa, offset, length = r
            part = data[offset : offset + length] if data is not None else None
            raise GuestMmioAccess(gpa, length, write, part, gva=gva + offset, offset=offset)
        if r[0] == 3:
            raise DirtyRingFull("dirty ring full: harvest and KVM_RESET_DIRTY_RINGS")
        raise GuestPageFault(r[1], r[2], r[3])

    def read(self, gva: int, size: int = 8, *, cpl: int = 0) -> int:
        """A guest read of ``size`` bytes as a little-endian int (see :meth:`access`)."""
        return int.from_bytes(self.access(gva, size, cpl=cpl) or b"", "little")

    def write(self, gva: int, value: int | bytes, size: int = 8, *, cpl: int = 0) -> None:
        """A guest write (see :meth:`access`)."""
        self.access(gva, size, write=True, value=value, cpl=cpl)

    def invlpg(self, gva: int) -> None:
        """INVLPG: KVM resyncs the SPTEs on the path of ``gva`` that belong to unsync
        shadow pages, in the current and the cached previous roots (``invlpg`` counter)."""
        self._mmu.invlpg(gva)

    def flush_tlb(self) -> None:
        """A guest TLB flush not tied to an address or CR3 (INVPCID all-context, a
        CR4.PGE toggle): KVM syncs every unsync shadow page of its roots (``tlb_flush``)."""
        self._mmu.flush_tlb()

    def _write(self, reg: str, value: int) -> None:
        fault = self._mmu.write_control(reg, value)
        if fault is not None:
            raise GuestPageFault(fault[0], fault[1], 0)

    def write_control(self, reg: str, value: int) -> None:
        """A guest write to "cr0", "cr3", "cr4" or "efer" (see the named methods)."""
        self._write(reg, value)

    def load_cr3(self, cr3: int) -> None:
        """MOV to CR3: #GP (GuestPageFault vector 13) for bits above MAXPHYADDR or, in
        PAE paging, a PDPTE with reserved bits; reloads the PDPTEs in PAE paging. The
        shadow MMU switches to the root for the new CR3 (reusing a cached one with the
        same CR3 and role) and, unless PCID's no-flush bit is set, syncs its unsync
        pages."""
        self._write("cr3", cr3)

    def set_cr0(self, cr0: int) -> None:
        """MOV to CR0, with the architectural #GP checks; EFER.LMA follows PG with LME.
        A change of PG or WP resets the MMU context (new role, new roots)."""
        self._write("cr0", cr0)

    def set_cr4(self, cr4: int) -> None:
        """MOV to CR4, with the architectural #GP checks and the PAE PDPTE reload. A
        change of PSE, PAE, SMEP, SMAP, PKE or LA57 resets the MMU context."""
        self._write("cr4", cr4)

    def set_efer(self, efer: int) -> None:
        """WRMSR IA32_EFER: reserved bits and LME changes while paging are #GP. A change
        of LME, LMA or NXE resets the MMU context."""
        self._write("efer", efer)

    @property
    def pkru(self) -> int:
        return int(self._mmu.pkru)

    @pkru.setter
    def pkru(self, value: int) -> None:
        self._mmu.pkru = value

    @property
    def pdptrs(self) -> list[int]:
        return list(self._mmu.pdptrs)

    @property
    def mode(self) -> str:
        return str(self._mmu.mode)


# -- vm.mmu: the VM's shadow MMU -------------------------------------------------------

#: ShadowPage.kinds values: what each SPTE is.
SPTE_NONE, SPTE_NONLEAF, SPTE_LEAF, SPTE_MMIO = 0, 1, 2, 3


def acc_str(access: int) -> str:
    """ "uwx" style names of ACC_* rights (ACC_USER, ACC_WRITE, ACC_EXEC)."""
    names = ((ACC_USER, "u"), (ACC_WRITE, "w"), (ACC_EXEC, "x"))
    return "".join(c if access & bit else "-" for bit, c in names)


class Role(NamedTuple):
    """A shadow page's ``union kvm_mmu_page_role``, every field by its KVM name, and the
    raw ``word`` (a page is reused only for the same gfn and an identical word)."""

    level: int
    has_4_byte_gpte: bool
    quadrant: int
    direct: bool
    #: ACC_* rights inherited from the parent gptes (ACC_EXEC 1, ACC_WRITE 2, ACC_USER 4).
    access: int
    invalid: bool
    efer_nx: bool
    cr0_wp: bool
    smep_andnot_wp: bool
    smap_andnot_wp: bool
    ad_disabled: bool
    guest_mode: bool
    passthrough: bool
    is_mirror: bool
    smm: int
    word: int

    @classmethod
    def from_word(cls, word: int) -> Role:
        return cls(**_core.decode_role(word))

    @property
    def access_str(self) -> str:
        return acc_str(self.access)

    def __repr__(self) -> str:
        flags = [
            name
            for name in (
                "has_4_byte_gpte",
                "direct",
                "invalid",
                "efer_nx",
                "cr0_wp",
                "smep_andnot_wp",
                "smap_andnot_wp",
                "ad_disabled",
                "guest_mode",
                "passthrough",
                "is_mirror",
            )
            if getattr(self, name)
        ]
        q = f" quadrant={self.quadrant}" if self.has_4_byte_gpte else ""
        smm = f" smm={self.smm}" if self.smm else ""
        return (
            f"Role({self.word:#x}: level={self.level}{q} access={self.access_str}"
            f" {' '.join(flags)}{smm})"
        )


@dataclass(frozen=True, slots=True, eq=False)
class ShadowPage:
    """A copy of one shadow page (``struct kvm_mmu_page``) at the time it was read."""

    #: The page's index in the arena: non-leaf SPTEs and roots name pages by it.
    index: int
    #: The guest table's gfn, or the first gfn of a direct page's linear range.
    gfn: int
    role: Role
    #: "active", or "invalid_root" (zapped while a root: freed when the last vCPU drops it).
    state: str
    #: Invalid, or from before the last fast zap-all (memslot delete or move).
    obsolete: bool
    unsync: bool
    unsync_children: int
    #: SPTE indices whose unsync_child_bitmap bit is set.
    unsync_child_bitmap: tuple[int, ...]
    root_count: int
    write_flooding_count: int
    mmu_valid_gen: int
    #: (parent page index, SPTE index in it) for every parent SPTE linking here.
    parents: tuple[tuple[int, int], ...]
    #: (SPTE index, child page index) for every non-leaf SPTE.
    children: tuple[tuple[int, int], ...]
    #: The 512 SPTE values (read-only uint64 view).
    sptes: NDArray[np.uint64]
    #: Per SPTE: SPTE_NONE, SPTE_NONLEAF, SPTE_LEAF or SPTE_MMIO.
    kinds: NDArray[np.uint8]
    #: Per SPTE: the gfn a leaf maps, the table gfn a non-leaf links to, the gfn an MMIO
    #: SPTE caches; 0 when empty.
    gfns: NDArray[np.uint64]

    @property
    def level(self) -> int:
        return self.role.level

    @property
    def direct(self) -> bool:
        return self.role.direct

    @property
    def invalid(self) -> bool:
        return self.role.invalid

    @property
    def access(self) -> int:
        return self.role.access

    def present(self) -> NDArray[np.intp]:
        """Indices of the shadow-present SPTEs (leaves and links)."""
        return np.flatnonzero((self.kinds == SPTE_LEAF) | (self.kinds == SPTE_NONLEAF))

    def leaves(self) -> NDArray[np.intp]:
        """Indices of the present leaf SPTEs."""
        return np.flatnonzero(self.kinds == SPTE_LEAF)

    def mmio(self) -> NDArray[np.intp]:
        """Indices of the MMIO SPTEs."""
        return np.flatnonzero(self.kinds == SPTE_MMIO)

    def child(self, spte_index: int) -> int | None:
        """The page SPTE ``spte_index`` links to, if it is a non-leaf SPTE."""
        return next((c for i, c in self.children if i == spte_index), None)

    def __repr__(self) -> str:
        marks = [
            m
            for m, on in (
                ("unsync", self.unsync),
                (f"unsync_children={self.unsync_children}", self.unsync_children),
                (f"root_count={self.root_count}", self.root_count),
                ("obsolete", self.obsolete),
            )
            if on
        ]
        return (
            f"ShadowPage(index={self.index}, level={self.level}, gfn={self.gfn:#x}, "
            f"{'direct' if self.direct else 'indirect'}, access={self.role.access_str}, "
            f"present={len(self.present())}{''.join(', ' + m for m in marks)})"
        )


class Root(NamedTuple):
    """A loaded root (``struct kvm_mmu_root_info``)."""

    pgd: int
    #: "page" (one shadow page: 4/5-level guests), "pae" (four level-2 pages: 32-bit,
    #: PAE and non-paging guests) or "dummy" (CR3 outside every memslot: no page).
    kind: str
    #: The shadow pages: one for "page", four for "pae" (None for an invalid PAE root).
    pages: tuple[int | None, ...]

    @property
    def page(self) -> int | None:
        """The root page of a "page" root."""
        return self.pages[0] if self.kind == "page" else None


class VcpuRoots(NamedTuple):
    """A vCPU's roots: the current one and the three cached previous ones (MRU
    first); None where no root is loaded."""

    vcpu_id: int
    #: The role a new root gets.
    root_role: Role
    current: Root | None
    prev: tuple[Root | None, ...]


class RmapEntry(NamedTuple):
    """A leaf SPTE mapping a gfn: level 1 = 4 KiB, 2 = 2 MiB, 3 = 1 GiB."""

    level: int
    sp: int
    index: int


def _root(r: Any) -> Root | None:
    return None if r is None else Root(r[0], r[1], tuple(r[2]))


class VmMmu:
    """``vm.mmu`` on the simulator: the VM's shadow MMU, read-only."""

    def __init__(
        self, core_mmu: _core.VmMmu, stats: Callable[[], dict[str, int | list[int]]]
    ) -> None:
        self._mmu = core_mmu
        self._stats = stats

    def shadow_pages(self) -> list[ShadowPage]:
        """Every shadow page that is not free, by index."""
        return self._pages(None)

    def shadow_page(self, index: int) -> ShadowPage:
        """The page with this index (KeyError if it is free)."""
        pages = self._pages(index)
        if not pages:
            raise KeyError(index)
        return pages[0]

    def _pages(self, index: int | None) -> list[ShadowPage]:
        metas, sptes, kinds, gfns = self._mmu.shadow_pages(index)
        for a in (sptes, kinds, gfns):
            a.flags.writeable = False
        out = []
        for i, m in enumerate(metas):
            out.append(
                ShadowPage(
                    index=m["index"],
                    gfn=m["gfn"],
                    role=Role(**m["role"]),
                    state=m["state"],
                    obsolete=m["obsolete"],
                    unsync=m["unsync"],
                    unsync_children=m["unsync_children"],
                    unsync_child_bitmap=tuple(m["unsync_child_bitmap"]),
                    root_count=m["root_count"],
                    write_flooding_count=m["write_flooding_count"],
                    mmu_valid_gen=m["mmu_valid_gen"],
                    parents=tuple(m["parents"]),
                    children=tuple(m["children"]),
                    sptes=sptes[i],
                    kinds=kinds[i],
                    gfns=gfns[i],
                )
            )
        return out

    def roots(self) -> dict[int, VcpuRoots]:
        """Every vCPU's roots, by vCPU id."""
        return {
            vid: VcpuRoots(vid, Role.from_word(word), _root(cur), tuple(_root(p) for p in prev))
            for vid, word, cur, prev in self._mmu.roots()
        }

    def rmap(self, gfn: int) -> list[RmapEntry]:
        """The leaf SPTEs that map ``gfn`` (at 4 KiB, and huge SPTEs covering it)."""
        return [RmapEntry(*e) for e in self._mmu.rmap(gfn)]

    def stats(self) -> dict[str, int | list[int]]:
        """KVM's VM-wide MMU counters by name (the VM's KVM_GET_STATS_FD)."""
        return self._stats()

    # -- host memory events (MMU notifiers), on guest memory the simulator owns --------

    def host_discard(self, hva: int, size: int) -> None:
        """The host discards [hva, hva + size) (MADV_DONTNEED): KVM zaps the SPTEs
        over it and the guest then reads zero pages, new frames."""
        self._mmu.host_discard(hva, size)

    def host_migrate(self, hva: int) -> int:
        """The host migrates the page at ``hva`` to a new frame (contents kept): its
        SPTEs are zapped and the next fault maps the new frame, which is returned."""
        return int(self._mmu.host_migrate(hva))

    def host_write_protect(self, hva: int, size: int) -> None:
        """The host maps [hva, hva + size) read-only (KSM merging, fork): KVM maps it
        read-only, and a guest write breaks the COW (a new frame)."""
        self._mmu.host_write_protect(hva, size)

    def host_age(self, hva: int, size: int, *, clear: bool = True, flush: bool = True) -> bool:
        """Page aging: whether an SPTE over [hva, hva + size) was accessed;
        ``clear`` takes the Accessed bits away (clear_young, with a TLB flush if
        ``flush``: clear_flush_young), otherwise nothing changes (test_young)."""
        return bool(self._mmu.host_age(hva, size, clear, flush))

    def host_invalidate_start(self, hva: int, size: int) -> None:
        """invalidate_range_start: zap [hva, hva + size); until
        :meth:`host_invalidate_end`, a guest access to it raises BlockingIOError
        (EAGAIN: the vCPU would keep retrying its fault)."""
        self._mmu.host_invalidate_start(hva, size)

    def host_invalidate_end(self) -> None:
        """invalidate_range_end (EINVAL without a start)."""
        self._mmu.host_invalidate_end()

    @property
    def mode(self) -> str:
        """``"shadow"`` (the default, as on the device here) or ``"tdp"``."""
        return str(self._mmu.mode)

    def audit(self) -> None:
        """Check every invariant of the shadow MMU and every vCPU's roots; raises
        :class:`MmuAuditError` (an AssertionError) saying what is wrong."""
        problem = self._mmu.audit()
        if problem is not None:
            raise MmuAuditError(problem)

    def memory_bytes(self) -> int:
        """Bytes of model metadata the shadow MMU holds (pages, rmaps, tracking)."""
        return int(self._mmu.summary()["memory_bytes"])

    @property
    def n_used(self) -> int:
        """n_used_mmu_pages: shadow pages counted against the limit."""
        return int(self._mmu.summary()["n_used"])

    @property
    def n_max(self) -> int:
        """n_max_mmu_pages: the limit (KVM_SET_NR_MMU_PAGES, or memslot pages / 50)."""
        return int(self._mmu.summary()["n_max"])

    @property
    def n_requested(self) -> int:
        return int(self._mmu.summary()["n_requested"])

    @property
    def mmu_valid_gen(self) -> int:
        """The generation fast zap-all toggles; older pages are obsolete."""
        return int(self._mmu.summary()["mmu_valid_gen"])

    @property
    def indirect_shadow_pages(self) -> int:
        """Pages that shadow guest tables."""
        return int(self._mmu.summary()["indirect_shadow_pages"])

    def to_dot(self, *, leaves: bool = True, prev_roots: bool = True) -> str:
        """The shadow page graph in Graphviz DOT (``dot -Tsvg``): roots on top per vCPU
        (cached previous roots dotted), a node per shadow page (index, level, gfn, role
        access, direct/indirect, root_count; unsync pages filled red, pages with unsync
        children outlined red, direct pages blue and rounded, invalid or obsolete pages
        grey and dashed), an edge per non-leaf SPTE labelled with its index, and with
        ``leaves`` each page's count of present leaves and MMIO SPTEs."""
        return str(self._mmu.to_dot(leaves, prev_roots))


def _weak_stats(owner: Any) -> Callable[[], dict[str, int | list[int]]]:
    ref = weakref.ref(owner)

    def stats() -> dict[str, int | list[int]]:
        o = ref()
        if o is None:
            raise ValueError("the Vm is gone")
        return o.stats()

    return stats
