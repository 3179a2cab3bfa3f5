"""Descriptor tables: GDT segment and TSS descriptors, IDT gates, the TSS itself,
and the ``kvm_segment`` values KVM_SET_SREGS needs for the same segments.

Formats are the SDM's (vol. 3, 3.4.5 segment descriptors, 6.11/6.14.1 gates,
7.2.1/8.7 TSS). The builder's GDT has one fixed layout, the ``*_SEL`` constants:
flat 4 GiB code and data segments for CPL0 and CPL3 in 64-bit and 32-bit form, and
a TSS.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .. import uapi

# Descriptor type fields (S=1 code/data, S=0 system).
CODE_XR = 0xB  # execute/read, accessed
DATA_RW = 0x3  # read/write, accessed
TSS_AVAIL, TSS_BUSY = 0x9, 0xB  # 32-bit and 64-bit TSS share the numbers
INTERRUPT_GATE = 0xE  # IF cleared on delivery
TRAP_GATE = 0xF

# The builder's GDT (the TSS takes two slots in long mode).
KERNEL_CS64_SEL = 0x08
KERNEL_DS_SEL = 0x10
KERNEL_CS32_SEL = 0x18
USER_CS32_SEL = 0x20
USER_DS_SEL = 0x28
USER_CS64_SEL = 0x30
TSS_SEL = 0x38
GDT_ENTRIES = 9


@dataclass(frozen=True)
class Segment:
    """A segment as a descriptor and as ``kvm_segment`` describe it."""

    base: int = 0
    limit: int = 0xFFFFF  # in units of 4 KiB when g=1
    type: int = DATA_RW
    s: int = 1
    dpl: int = 0
    present: int = 1
    avl: int = 0
    l: int = 0  # noqa: E741 (the SDM's name)
    db: int = 1
    g: int = 1

    def descriptor(self) -> bytes:
        """The 8-byte GDT entry (16 bytes for a 64-bit system segment: TSS, LDT)."""
        lo = (
            (self.limit & 0xFFFF)
            | (self.base & 0xFFFFFF) << 16
            | (self.type & 0xF) << 40
            | (self.s & 1) << 44
            | (self.dpl & 3) << 45
            | (self.present & 1) << 47
            | (self.limit >> 16 & 0xF) << 48
            | (self.avl & 1) << 52
            | (self.l & 1) << 53
            | (self.db & 1) << 54
            | (self.g & 1) << 55
            | (self.base >> 24 & 0xFF) << 56
        )
        return struct.pack("<Q", lo)

    def kvm_segment(self, selector: int) -> uapi.kvm_segment:
        """What the CPU holds after loading ``selector`` (limit in bytes)."""
        limit = (self.limit << 12 | 0xFFF) if self.g else self.limit
        return uapi.kvm_segment(
            base=self.base,
            limit=limit,
            selector=selector,
            type=self.type,
            present=self.present,
            dpl=self.dpl,
            db=self.db,
            s=self.s,
            l=self.l,
            g=self.g,
            avl=self.avl,
            unusable=0,
        )


def system_descriptor64(base: int, limit: int, type_: int, dpl: int = 0) -> bytes:
    """A 16-byte long-mode TSS/LDT descriptor (the upper 8 bytes hold base[63:32])."""
    low = Segment(base=base & 0xFFFF_FFFF, limit=limit, type=type_, s=0, dpl=dpl, db=0, g=0)
    return low.descriptor() + struct.pack("<II", base >> 32, 0)


FLAT = {
    KERNEL_CS64_SEL: Segment(type=CODE_XR, l=1, db=0),
    KERNEL_DS_SEL: Segment(type=DATA_RW),
    KERNEL_CS32_SEL: Segment(type=CODE_XR),
    USER_CS32_SEL: Segment(type=CODE_XR, dpl=3),
    USER_DS_SEL: Segment(type=DATA_RW, dpl=3),
    USER_CS64_SEL: Segment(type=CODE_XR, dpl=3, l=1, db=0),
}


def gdt(tss_base: int, *, long_mode: bool, tss_limit: int = 0x67) -> bytes:
    """The builder's GDT (``GDT_ENTRIES`` * 8 bytes) with the TSS at ``tss_base``."""
    out = bytearray(GDT_ENTRIES * 8)
    for sel, seg in FLAT.items():
        out[sel : sel + 8] = seg.descriptor()
    if long_mode:
        out[TSS_SEL : TSS_SEL + 16] = system_descriptor64(tss_base, tss_limit, TSS_AVAIL)
    else:
        tss = Segment(base=tss_base, limit=tss_limit, type=TSS_AVAIL, s=0, db=0, g=0)
        out[TSS_SEL : TSS_SEL + 8] = tss.descriptor()
    return bytes(out)


def tr_segment(tss_base: int, tss_limit: int = 0x67) -> uapi.kvm_segment:
    """TR as KVM_SET_SREGS takes it: a busy TSS (the type `ltr` leaves behind)."""
    tss = Segment(base=tss_base, limit=tss_limit, type=TSS_BUSY, s=0, db=0, g=0)
    return tss.kvm_segment(TSS_SEL)


def gate64(
    offset: int, selector: int = KERNEL_CS64_SEL, *, ist: int = 0, dpl: int = 0, type_: int = 0xE
) -> bytes:
    """A 16-byte long-mode IDT gate."""
    attr = 0x80 | (dpl & 3) << 5 | (type_ & 0xF)
    return struct.pack(
        "<HHBBHII", offset & 0xFFFF, selector, ist & 7, attr, offset >> 16 & 0xFFFF, offset >> 32, 0
    )


def gate32(
    offset: int, selector: int = KERNEL_CS32_SEL, *, dpl: int = 0, type_: int = 0xE
) -> bytes:
    """An 8-byte 32-bit IDT gate (interrupt gate 0xE, trap gate 0xF)."""
    attr = 0x80 | (dpl & 3) << 5 | (type_ & 0xF)
    return struct.pack("<HHBBH", offset & 0xFFFF, selector, 0, attr, offset >> 16 & 0xFFFF)


def ivt_entry(offset: int, segment: int = 0) -> bytes:
    """A real-mode interrupt vector (offset, segment)."""
    return struct.pack("<HH", offset, segment)


def tss64(rsp0: int, *, ist: tuple[int, ...] = (), rsp1: int = 0, rsp2: int = 0) -> bytes:
    """The 104-byte 64-bit TSS: RSP0-2, IST1-7, and an I/O map base past the limit
    (no I/O bitmap)."""
    ists = list(ist) + [0] * (7 - len(ist))
    if len(ists) != 7:
        raise ValueError("at most seven IST stacks")
    return struct.pack("<IQQQQ7QQHH", 0, rsp0, rsp1, rsp2, 0, *ists, 0, 0, 104)


def tss32(esp0: int, ss0: int = KERNEL_DS_SEL) -> bytes:
    """The 104-byte 32-bit TSS: only ESP0/SS0 matter for CPL3 -> CPL0 delivery."""
    out = bytearray(104)
    struct.pack_into("<II", out, 4, esp0, ss0)
    struct.pack_into("<H", out, 102, 104)
    return bytes(out)


def parse_gate64(raw: bytes) -> dict[str, int]:
    """The fields of a 16-byte gate (for tests and inspection)."""
    lo, sel, ist, attr, mid, hi, _ = struct.unpack("<HHBBHII", raw)
    return dict(
        offset=lo | mid << 16 | hi << 32,
        selector=sel,
        ist=ist & 7,
        type=attr & 0xF,
        dpl=attr >> 5 & 3,
        present=attr >> 7,
    )


def parse_descriptor(raw: bytes) -> Segment:
    """The segment an 8-byte descriptor describes."""
    (d,) = struct.unpack("<Q", raw[:8])
    return Segment(
        base=(d >> 16 & 0xFFFFFF) | (d >> 56 & 0xFF) << 24,
        limit=(d & 0xFFFF) | (d >> 48 & 0xF) << 16,
        type=d >> 40 & 0xF,
        s=d >> 44 & 1,
        dpl=d >> 45 & 3,
        present=d >> 47 & 1,
        avl=d >> 52 & 1,
        l=d >> 53 & 1,
        db=d >> 54 & 1,
        g=d >> 55 & 1,
    )
