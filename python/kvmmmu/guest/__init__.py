"""Builders for guest state and guest programs: an assembler over iced-x86
(:mod:`.asm`), page tables for every paging mode (:mod:`.paging`), GDT/IDT/TSS
(:mod:`.layout`), exception stubs that report through MMIO (:mod:`.stubs`), a
whole bootable guest (:mod:`.builder`), small programs for tests and benchmarks
(:mod:`.programs`) and the bundled demo (:mod:`.demo`)."""

from .asm import Asm, AsmError
from .builder import DEVICE_MODES, Guest, Machine
from .paging import MODES, PageTables
from .stubs import ExceptionReport

__all__ = [
    "DEVICE_MODES",
    "MODES",
    "Asm",
    "AsmError",
    "ExceptionReport",
    "Guest",
    "Machine",
    "PageTables",
]
