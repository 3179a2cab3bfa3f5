"""The simulator-only MMU surface of a vCPU: detailed guest page-table walks.

``vcpu.mmu.walk(gva, write=, user=, fetch=, implicit=)`` translates through the
vCPU's current paging state (CR0/CR3/CR4/EFER from its sregs, the CPUID's
MAXPHYADDR and 1 GiB-page support, PKRU, RFLAGS.AC) exactly as KVM's walker
does, setting accessed/dirty bits in guest memory on success, and returns a
:class:`WalkResult` with every gpte it visited, or raises
:class:`GuestPageFault` with the vector, error code and faulting address the
guest would see. ``walk_many`` does the same for a numpy array of addresses.
"""

from __future__ import annotations

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

    def _write(self, reg: str, value: int) -> None:
        fault = self._mmu.write_control(reg, value)
        if fault is not None:
            raise GuestPageFault(fault[0], fault[1], 0)

    def load_cr3(self, cr3: int) -> None:
        """MOV to CR3: #GP (GuestPageFault vector 13) for bits above MAXPHYADDR or, in
        PAE paging, a PDPTE with reserved bits; reloads the PDPTEs in PAE paging."""
        self._write("cr3", cr3)

    def set_cr0(self, cr0: int) -> None:
        """MOV to CR0, with the architectural #GP checks; EFER.LMA follows PG with LME."""
        self._write("cr0", cr0)

    def set_cr4(self, cr4: int) -> None:
        """MOV to CR4, with the architectural #GP checks and the PAE PDPTE reload."""
        self._write("cr4", cr4)

    def set_efer(self, efer: int) -> None:
        """WRMSR IA32_EFER: reserved bits and LME changes while paging are #GP."""
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
