"""Guest page tables in guest memory, for every x86 paging mode.

``PageTables(mem, mode)`` allocates tables from a pool inside a
:class:`~kvmmmu.GuestMemory` (mapped at ``gpa_base``) and maps pages::

    pt = PageTables(mem, "4-level", pool=0x10_0000)
    pt.map(0x40_0000, 0x20_0000, flags=P | W | U)          # a 4 KiB page
    pt.map(0x4000_0000, 0x4000_0000, size=2 << 20)          # a 2 MiB page
    sregs.cr3 = pt.cr3

Modes: "32-bit" (4-byte entries, 4 MiB pages with PSE-36), "pae" (the 4
PDPTEs live at ``pt.cr3`` and are loaded by the CPU), "4-level", "5-level".
Upper-level entries get ``upper_flags`` (P|W|U by default) so a leaf's own
flags decide the rights unless a test sets upper levels explicitly with
:meth:`set_entry`.
"""

from __future__ import annotations

import struct
from typing import Protocol

P, W, U, PWT, PCD, A, D, PS, G = (1 << i for i in range(9))
NX = 1 << 63

#: mode -> (entry size, index bits per level, root level)
MODES: dict[str, tuple[int, int, int]] = {
    "32-bit": (4, 10, 2),
    "pae": (8, 9, 3),
    "4-level": (8, 9, 4),
    "5-level": (8, 9, 5),
}


class Memory(Protocol):
    def read(self, offset: int, length: int) -> bytes: ...
    def write(self, offset: int, data: bytes) -> None: ...


class PageTables:
    def __init__(
        self,
        mem: Memory,
        mode: str,
        *,
        pool: int = 0x10_0000,
        pool_size: int = 0x10_0000,
        gpa_base: int = 0,
        upper_flags: int = P | W | U,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown paging mode {mode!r}; one of {sorted(MODES)}")
        self.mem, self.mode, self.gpa_base = mem, mode, gpa_base
        self.size, self.bits, self.root_level = MODES[mode]
        self.upper_flags = upper_flags
        self._next, self._end = pool, pool + pool_size
        # The root table (for PAE the 32-byte PDPT, given a page of its own).
        self.cr3 = self.alloc()

    # -- memory -----------------------------------------------------------------

    def alloc(self) -> int:
        """A zeroed page from the pool (its gpa)."""
        if self._next + 4096 > self._end:
            raise MemoryError("page-table pool exhausted")
        gpa = self._next
        self._next += 4096
        self.mem.write(gpa - self.gpa_base, bytes(4096))
        return gpa

    def read(self, gpa: int) -> int:
        fmt = "<I" if self.size == 4 else "<Q"
        return int(struct.unpack(fmt, self.mem.read(gpa - self.gpa_base, self.size))[0])

    def write(self, gpa: int, value: int) -> None:
        fmt = "<I" if self.size == 4 else "<Q"
        self.mem.write(gpa - self.gpa_base, struct.pack(fmt, value))

    # -- structure ---------------------------------------------------------------

    def index(self, gva: int, level: int) -> int:
        if self.mode == "pae" and level == 3:
            return (gva >> 30) & 3
        return (gva >> (12 + self.bits * (level - 1))) & ((1 << self.bits) - 1)

    def _frame(self, entry: int) -> int:
        return entry & (0xFFFF_F000 if self.size == 4 else 0x000F_FFFF_FFFF_F000)

    def entry_gpa(self, gva: int, level: int, *, create: bool = False) -> int:
        """The gpa of ``gva``'s entry at ``level``, creating the tables above it."""
        table = self.cr3
        for lvl in range(self.root_level, level, -1):
            e_gpa = table + self.index(gva, lvl) * self.size
            e = self.read(e_gpa)
            if not e & P:
                if not create:
                    raise LookupError(f"no level-{lvl} entry for {gva:#x}")
                new = self.alloc()
                # PAE PDPTEs carry no R/W or U/S bits (they are reserved there).
                flags = P if (self.mode == "pae" and lvl == 3) else self.upper_flags
                self.write(e_gpa, new | flags)
                e = new | flags
            elif e & PS and lvl > 1:
                raise LookupError(f"{gva:#x} is inside a large page at level {lvl}")
            table = self._frame(e)
        return table + self.index(gva, level) * self.size

    def map(
        self, gva: int, gpa: int, *, size: int = 4096, flags: int = P | W | U, pkey: int = 0
    ) -> int:
        """Map ``size`` bytes (4 KiB, 2/4 MiB or 1 GiB) at ``gva`` to ``gpa``; returns the
        gpa of the leaf entry."""
        level = {4096: 1, 2 << 20: 2, 4 << 20: 2, 1 << 30: 3}.get(size)
        if level is None or (size == 4 << 20) != (self.mode == "32-bit" and level == 2):
            raise ValueError(f"no {size:#x}-byte pages in {self.mode} paging")
        value = gpa | flags | (PS if level > 1 else 0)
        if self.size == 4 and level == 2:
            # 4 MiB page: PA[35:32] goes to PDE[16:13] (PSE-36).
            value = (gpa & 0xFFC0_0000) | ((gpa >> 32) & 0xF) << 13 | flags | PS
        if pkey:
            value |= pkey << 59
        e = self.entry_gpa(gva, level, create=True)
        self.write(e, value)
        return e

    def set_entry(self, gva: int, level: int, value: int) -> int:
        """Overwrite ``gva``'s entry at ``level`` (creating the tables above it)."""
        e = self.entry_gpa(gva, level, create=True)
        self.write(e, value)
        return e

    def entry(self, gva: int, level: int) -> int:
        return self.read(self.entry_gpa(gva, level))

    # -- walking (the host reading the guest's tables; no A/D bits are set) -------------

    def leaf(self, gva: int) -> tuple[int, int] | None:
        """``(level, gpa of the entry)`` of the entry that maps ``gva`` (a PTE, or a
        PDE/PDPTE with PS), or None where the walk meets a not-present entry."""
        table = self.cr3
        for lvl in range(self.root_level, 0, -1):
            e_gpa = table + self.index(gva, lvl) * self.size
            e = self.read(e_gpa)
            if not e & P:
                return None
            if lvl == 1 or (e & PS and lvl in (2, 3) and not (self.mode == "pae" and lvl == 3)):
                return lvl, e_gpa
            table = self._frame(e)
        return None

    def translate(self, gva: int) -> int | None:
        """The gpa ``gva`` maps to (None if not present; permissions not checked)."""
        found = self.leaf(gva)
        if found is None:
            return None
        lvl, e_gpa = found
        e = self.read(e_gpa)
        if lvl == 1:
            return self._frame(e) | gva & 0xFFF
        if self.size == 4:  # 4 MiB page, PA[35:32] in PDE[16:13]
            return (e & 0xFFC0_0000) | ((e >> 13) & 0xF) << 32 | gva & 0x3F_FFFF
        page = 1 << (12 + self.bits * (lvl - 1))
        return self._frame(e) & ~(page - 1) | gva & (page - 1)
