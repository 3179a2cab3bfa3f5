#!/usr/bin/env python3
"""Probe what the real /dev/kvm does with KVM_SET_SREGS / KVM_SET_REGS.

Standard library only (os, fcntl, ctypes, mmap, struct).  Every case runs on a
fresh VM + vCPU.  The output is Markdown:

    python3 tools/probe_sregs.py > docs/device-sregs.md
    python3 tools/probe_sregs.py --json /tmp/sregs.json > docs/device-sregs.md

For each case the script builds the input as "read the current sregs, change
some fields", calls KVM_SET_SREGS, and records the errno (0 if accepted) and
what KVM_GET_SREGS reads back afterwards: on success, the fields whose read-back
differs from what was set; on failure, the fields that differ from the state
before the call (normally none).
"""

import ctypes  # noqa: F401  (kept to document the allowed toolbox; struct does the packing)
import errno
import fcntl
import json
import os
import struct
import sys
import time

# ---------------------------------------------------------------- ioctl numbers
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_GET_SUPPORTED_CPUID = 0xC008AE05
KVM_CREATE_VCPU = 0xAE41
KVM_CREATE_IRQCHIP = 0xAE60
KVM_GET_REGS = 0x8090AE81
KVM_SET_REGS = 0x4090AE82
KVM_GET_SREGS = 0x8138AE83
KVM_SET_SREGS = 0x4138AE84
KVM_SET_CPUID2 = 0x4008AE90
KVM_GET_CPUID2 = 0xC008AE91
KVM_GET_SREGS2 = 0x8140AECC
KVM_SET_SREGS2 = 0x4140AECD

# ---------------------------------------------------------------- layouts
SEGS = ["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"]
SEG_FIELDS = [
    "base",
    "limit",
    "selector",
    "type",
    "present",
    "dpl",
    "db",
    "s",
    "l",
    "g",
    "avl",
    "unusable",
    "padding",
]
SEG_FMT = "<QIH10B"  # 24 bytes
DT_FMT = "<QH3H"  # 16 bytes
CRS = ["cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"]
SREGS_SIZE = 312
SREGS2_SIZE = 320
REGS = [
    "rax",
    "rbx",
    "rcx",
    "rdx",
    "rsi",
    "rdi",
    "rsp",
    "rbp",
    "r8",
    "r9",
    "r10",
    "r11",
    "r12",
    "r13",
    "r14",
    "r15",
    "rip",
    "rflags",
]
assert struct.calcsize(SEG_FMT) == 24 and struct.calcsize(DT_FMT) == 16

SREG_ORDER = (
    [f"{s}.{f}" for s in SEGS for f in SEG_FIELDS]
    + [f"{d}.{f}" for d in ("gdt", "idt") for f in ("base", "limit", "pad0", "pad1", "pad2")]
    + CRS
    + [f"interrupt_bitmap[{i}]" for i in range(4)]
)


def unpack_sregs(buf, v2=False):
    d = {}
    off = 0
    for s in SEGS:
        vals = struct.unpack_from(SEG_FMT, buf, off)
        for f, v in zip(SEG_FIELDS, vals, strict=False):
            d[f"{s}.{f}"] = v
        off += 24
    for t in ("gdt", "idt"):
        base, limit, p0, p1, p2 = struct.unpack_from(DT_FMT, buf, off)
        d.update(
            {
                f"{t}.base": base,
                f"{t}.limit": limit,
                f"{t}.pad0": p0,
                f"{t}.pad1": p1,
                f"{t}.pad2": p2,
            }
        )
        off += 16
    assert off == 224
    for i, name in enumerate(CRS):
        d[name] = struct.unpack_from("<Q", buf, 224 + 8 * i)[0]
    if v2:
        d["flags"] = struct.unpack_from("<Q", buf, 280)[0]
        for i in range(4):
            d[f"pdptrs[{i}]"] = struct.unpack_from("<Q", buf, 288 + 8 * i)[0]
    else:
        for i in range(4):
            d[f"interrupt_bitmap[{i}]"] = struct.unpack_from("<Q", buf, 280 + 8 * i)[0]
    return d


def pack_sregs(d, v2=False):
    buf = bytearray(SREGS2_SIZE if v2 else SREGS_SIZE)
    off = 0
    for s in SEGS:
        struct.pack_into(
            SEG_FMT,
            buf,
            off,
            *[d[f"{s}.{f}"] & _mask(SEG_FMT, i) for i, f in enumerate(SEG_FIELDS)],
        )
        off += 24
    for t in ("gdt", "idt"):
        struct.pack_into(
            DT_FMT,
            buf,
            off,
            d[f"{t}.base"],
            d[f"{t}.limit"],
            d[f"{t}.pad0"],
            d[f"{t}.pad1"],
            d[f"{t}.pad2"],
        )
        off += 16
    for i, name in enumerate(CRS):
        struct.pack_into("<Q", buf, 224 + 8 * i, d[name] & (2**64 - 1))
    if v2:
        struct.pack_into("<Q", buf, 280, d.get("flags", 0))
        for i in range(4):
            struct.pack_into("<Q", buf, 288 + 8 * i, d.get(f"pdptrs[{i}]", 0))
    else:
        for i in range(4):
            struct.pack_into("<Q", buf, 280 + 8 * i, d[f"interrupt_bitmap[{i}]"])
    return bytes(buf)


def _mask(fmt, i):
    sizes = {"Q": 64, "I": 32, "H": 16, "B": 8}
    codes = "QIH" + "B" * 10
    return (1 << sizes[codes[i]]) - 1


def unpack_regs(buf):
    return dict(zip(REGS, struct.unpack("<18Q", buf), strict=False))


def pack_regs(d):
    return struct.pack("<18Q", *[d[r] & (2**64 - 1) for r in REGS])


# ---------------------------------------------------------------- device access
class Dev:
    def __init__(self):
        self.kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        self.api = fcntl.ioctl(self.kvm, KVM_GET_API_VERSION, 0)
        self._supported = None

    def supported_cpuid(self):
        if self._supported is None:
            nent = 256
            buf = bytearray(8 + 40 * nent)
            struct.pack_into("<II", buf, 0, nent, 0)
            fcntl.ioctl(self.kvm, KVM_GET_SUPPORTED_CPUID, buf, True)
            n = struct.unpack_from("<I", buf, 0)[0]
            self._supported = bytes(buf[: 8 + 40 * n])
        return self._supported


class Vcpu:
    """One fresh VM with one vCPU (id 0)."""

    def __init__(self, dev, irqchip=False, cpuid=False):
        self.vm = fcntl.ioctl(dev.kvm, KVM_CREATE_VM, 0)
        if irqchip:
            fcntl.ioctl(self.vm, KVM_CREATE_IRQCHIP, 0)
        self.fd = fcntl.ioctl(self.vm, KVM_CREATE_VCPU, 0)
        if cpuid:
            fcntl.ioctl(self.fd, KVM_SET_CPUID2, bytearray(dev.supported_cpuid()), True)

    def close(self):
        os.close(self.fd)
        os.close(self.vm)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def get_sregs(self):
        buf = bytearray(SREGS_SIZE)
        fcntl.ioctl(self.fd, KVM_GET_SREGS, buf, True)
        return unpack_sregs(buf)

    def set_sregs(self, d):
        try:
            fcntl.ioctl(self.fd, KVM_SET_SREGS, pack_sregs(d))
            return 0
        except OSError as e:
            return e.errno

    def get_sregs2(self):
        buf = bytearray(SREGS2_SIZE)
        fcntl.ioctl(self.fd, KVM_GET_SREGS2, buf, True)
        return unpack_sregs(buf, v2=True)

    def set_sregs2(self, d):
        try:
            fcntl.ioctl(self.fd, KVM_SET_SREGS2, pack_sregs(d, v2=True))
            return 0
        except OSError as e:
            return e.errno

    def get_regs(self):
        buf = bytearray(144)
        fcntl.ioctl(self.fd, KVM_GET_REGS, buf, True)
        return unpack_regs(buf)

    def set_regs(self, d):
        try:
            fcntl.ioctl(self.fd, KVM_SET_REGS, pack_regs(d))
            return 0
        except OSError as e:
            return e.errno


# ---------------------------------------------------------------- states
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_AM, CR0_NW, CR0_CD, CR0_PG = (
    1,
    2,
    0x10,
    0x20,
    1 << 16,
    1 << 18,
    1 << 29,
    1 << 30,
    1 << 31,
)
CR4_PAE = 1 << 5
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE = 1, 1 << 8, 1 << 10, 1 << 11

LM64_CR0 = 0x80050033  # PG|AM|WP|NE|ET|MP|PE
LM64_CR4 = CR4_PAE
LM64_EFER = 0xD01  # NXE|LMA|LME|SCE


def flat(sel, typ, s=1, l=0, db=1, limit=0xFFFFFFFF, g=1, dpl=0):
    return {
        "base": 0,
        "limit": limit,
        "selector": sel,
        "type": typ,
        "present": 1,
        "dpl": dpl,
        "db": db,
        "s": s,
        "l": l,
        "g": g,
        "avl": 0,
        "unusable": 0,
        "padding": 0,
    }


def seg_mods(name, seg):
    return {f"{name}.{k}": v for k, v in seg.items()}


def lm64_mods():
    m = {"cr0": LM64_CR0, "cr4": LM64_CR4, "efer": LM64_EFER, "cr3": 0x1000}
    m.update(seg_mods("cs", flat(0x8, 0xB, l=1, db=0)))
    for s in ("ds", "es", "fs", "gs", "ss"):
        m.update(seg_mods(s, flat(0x10, 0x3)))
    m.update(seg_mods("tr", flat(0x18, 0xB, s=0, db=0, g=0, limit=0x67)))
    m.update({"gdt.base": 0x500, "gdt.limit": 0x1F, "idt.base": 0x1000, "idt.limit": 0xFFF})
    return m


def pm32_mods():
    m = {"cr0": CR0_PE | CR0_ET | CR0_WP, "cr4": 0, "efer": 0, "cr3": 0}
    m.update(seg_mods("cs", flat(0x8, 0xB, db=1)))
    for s in ("ds", "es", "fs", "gs", "ss"):
        m.update(seg_mods(s, flat(0x10, 0x3)))
    m.update(seg_mods("tr", flat(0x18, 0xB, s=0, db=0, g=0, limit=0x67)))
    m.update({"gdt.base": 0x500, "gdt.limit": 0x1F, "idt.base": 0x1000, "idt.limit": 0xFFF})
    return m


BASES = {"reset": {}, "lm64": lm64_mods(), "pm32": pm32_mods()}


def hx(v):
    return hex(v) if isinstance(v, int) else str(v)


def apply_mods(d, mods):
    d = dict(d)
    if callable(mods):
        mods(d)
        return d
    for k, v in mods.items():
        if k.startswith("^"):  # xor
            d[k[1:]] ^= v
        elif k.startswith("|"):
            d[k[1:]] |= v
        elif k.startswith("&~"):
            d[k[2:]] &= ~v & (2**64 - 1)
        else:
            d[k] = v
    return d


def mods_text(mods):
    if callable(mods):
        return getattr(mods, "__doc__", None) or mods.__name__
    parts = []
    for k, v in mods.items():
        if k.startswith("^"):
            parts.append(f"{k[1:]} ^= {hx(v)}")
        elif k.startswith("|"):
            parts.append(f"{k[1:]} |= {hx(v)}")
        elif k.startswith("&~"):
            parts.append(f"{k[2:]} &= ~{hx(v)}")
        else:
            parts.append(f"{k}={hx(v)}")
    return ", ".join(parts) if parts else "(no change)"


def diff(a, b, order=SREG_ORDER):
    out = []
    for k in order:
        if k in a and a.get(k) != b.get(k):
            out.append(f"{k}: {hx(a[k])}→{hx(b[k])}")
    return out


# ---------------------------------------------------------------- case runner
RESULTS = []


def run_case(dev, name, base, mods, pre=(), irqchip=False, cpuid=False, group=""):
    with Vcpu(dev, irqchip=irqchip, cpuid=cpuid) as v:
        s = v.get_sregs()
        if BASES[base]:
            e = v.set_sregs(apply_mods(s, BASES[base]))
            if e:
                raise RuntimeError(f"base {base} rejected: {errno.errorcode[e]}")
        for p in pre:
            e = v.set_sregs(apply_mods(v.get_sregs(), p))
            if e:
                raise RuntimeError(f"pre-step of {name} rejected: {errno.errorcode[e]}")
        before = v.get_sregs()
        new = apply_mods(before, mods)
        e = v.set_sregs(new)
        after = v.get_sregs()
        if e == 0:
            d = diff(new, after)
        else:
            d = diff(before, after)
    r = {
        "group": group,
        "name": name,
        "base": base,
        "input": mods_text(mods),
        "pre": "; ".join(mods_text(p) for p in pre),
        "errno": errno.errorcode.get(e, e) if e else "0",
        "readback": d,
        "cpuid": cpuid,
        "irqchip": irqchip,
    }
    RESULTS.append(r)
    return r


def bit_name(reg, i):
    names = {
        "cr0": {
            0: "PE",
            1: "MP",
            2: "EM",
            3: "TS",
            4: "ET",
            5: "NE",
            16: "WP",
            18: "AM",
            29: "NW",
            30: "CD",
            31: "PG",
        },
        "cr4": {
            0: "VME",
            1: "PVI",
            2: "TSD",
            3: "DE",
            4: "PSE",
            5: "PAE",
            6: "MCE",
            7: "PGE",
            8: "PCE",
            9: "OSFXSR",
            10: "OSXMMEXCPT",
            11: "UMIP",
            12: "LA57",
            13: "VMXE",
            14: "SMXE",
            15: "(15)",
            16: "FSGSBASE",
            17: "PCIDE",
            18: "OSXSAVE",
            19: "KL",
            20: "SMEP",
            21: "SMAP",
            22: "PKE",
            23: "CET",
            24: "PKS",
            25: "UINTR",
            27: "LASS",
            28: "LAM_SUP",
            32: "FRED",
        },
        "efer": {
            0: "SCE",
            8: "LME",
            10: "LMA",
            11: "NXE",
            12: "SVME",
            13: "LMSLE",
            14: "FFXSR",
            15: "TCE",
            17: "MCOMMIT",
            18: "INTWB",
            20: "AUTOIBRS",
        },
    }
    return names.get(reg, {}).get(i, "")


# ---------------------------------------------------------------- the cases
def sweep(dev, reg, cpuid=False, bases=("lm64", "reset")):
    rows = []
    for i in range(64):
        row = {"bit": i, "name": bit_name(reg, i)}
        for b in bases:
            r = run_case(
                dev,
                f"{reg} ^ bit {i}",
                b,
                {f"^{reg}": 1 << i},
                cpuid=cpuid,
                group=f"sweep-{reg}{'-cpuid' if cpuid else ''}",
            )
            row[b] = r
        rows.append(row)
    return rows


def all_cases(dev):
    out = {}
    out["sweep_cr0"] = sweep(dev, "cr0")
    out["sweep_cr4"] = sweep(dev, "cr4")
    out["sweep_cr4_cpuid"] = sweep(dev, "cr4", cpuid=True)
    out["sweep_efer"] = sweep(dev, "efer")
    out["sweep_cr3"] = [
        {
            "bit": i,
            "name": "",
            **{
                b: run_case(dev, f"cr3 ^ bit {i}", b, {"^cr3": 1 << i}, group="sweep-cr3")
                for b in ("lm64", "pm32")
            },
        }
        for i in list(range(0, 12)) + list(range(32, 64))
    ]
    out["sweep_cr3_cpuid"] = [
        {
            "bit": i,
            "name": "",
            **{
                b: run_case(
                    dev, f"cr3 ^ bit {i}", b, {"^cr3": 1 << i}, cpuid=True, group="sweep-cr3-cpuid"
                )
                for b in ("lm64", "pm32")
            },
        }
        for i in range(32, 64)
    ]

    C = []  # (group, name, base, mods, pre, kwargs)

    def c(group, name, base, mods, pre=(), **kw):
        C.append((group, name, base, mods, pre, kw))

    g = "modes"
    c(g, "no change (reset round trip)", "reset", {})
    c(g, "no change (lm64 round trip)", "lm64", {})
    c(g, "pm32 from reset", "reset", BASES["pm32"])
    c(g, "lm64 from reset", "reset", BASES["lm64"])
    c(g, "PG without PE", "reset", {"cr0": CR0_PG | CR0_ET})
    c(g, "PG without PE (lm64 minus PE)", "lm64", {"&~cr0": CR0_PE})
    c(g, "NW without CD", "reset", {"cr0": CR0_ET | CR0_NW})
    c(g, "NW without CD, PE", "pm32", {"|cr0": CR0_NW})
    c(g, "CD without NW", "pm32", {"|cr0": CR0_CD})
    c(g, "CD|NW", "pm32", {"|cr0": CR0_CD | CR0_NW})
    c(g, "CR0 = 0 (ET cleared)", "reset", {"cr0": 0})
    c(g, "CR0 = 0x7fffffff (all low bits but PG)", "reset", {"cr0": 0x7FFFFFFF})
    c(g, "CR0 = 0xffffffff", "lm64", {"cr0": 0xFFFFFFFF})
    c(g, "CR0 reserved bit 6", "pm32", {"|cr0": 1 << 6})
    c(g, "CR0 reserved bits 6-15,17,19-28", "pm32", {"|cr0": 0x1FFAFFC0})
    c(g, "legacy 32-bit paging (PG, no PAE, no LME)", "pm32", {"|cr0": CR0_PG, "cr3": 0x2000})
    c(g, "legacy 32-bit paging + PSE", "pm32", {"|cr0": CR0_PG, "cr4": 0x10, "cr3": 0x2000})
    c(g, "PAE paging (PG, PAE, no LME)", "pm32", {"|cr0": CR0_PG, "cr4": CR4_PAE, "cr3": 0x2000})
    c(
        g,
        "PAE paging + NXE",
        "pm32",
        {"|cr0": CR0_PG, "cr4": CR4_PAE, "efer": EFER_NXE, "cr3": 0x2000},
    )
    c(g, "LME+PG without LMA", "lm64", {"&~efer": EFER_LMA})
    c(g, "LME+PG+LMA without PAE", "lm64", {"&~cr4": CR4_PAE})
    c(g, "LME+PG without LMA and PAE", "lm64", {"&~efer": EFER_LMA, "&~cr4": CR4_PAE})
    c(g, "LMA without PG (LME set)", "lm64", {"&~cr0": CR0_PG})
    c(g, "LMA without PG, CS.L=0", "lm64", {"&~cr0": CR0_PG, "cs.l": 0})
    c(g, "LMA without LME", "lm64", {"&~efer": EFER_LME})
    c(g, "LMA alone from reset", "reset", {"efer": EFER_LMA})
    c(g, "LME alone from reset", "reset", {"efer": EFER_LME})
    c(g, "LME|LMA from reset (PG=0)", "reset", {"efer": EFER_LME | EFER_LMA})
    c(g, "LME, PE, PAE, no PG (pre-long-mode)", "pm32", {"efer": EFER_LME, "cr4": CR4_PAE})
    c(g, "lm64 with CS.L=0 (compat mode)", "lm64", {"cs.l": 0, "cs.db": 1})
    c(g, "lm64 with CS.L=1, CS.DB=1", "lm64", {"cs.db": 1})
    c(g, "CS.L without LMA (pm32)", "pm32", {"cs.l": 1, "cs.db": 0})
    c(g, "CS.L without LMA (reset)", "reset", {"cs.l": 1})
    c(g, "CS.L=1 DB=1 without LMA", "pm32", {"cs.l": 1})
    c(g, "CS.L with legacy paging (PG, LME=0)", "pm32", {"|cr0": CR0_PG, "cs.l": 1, "cs.db": 0})
    c(
        g,
        "CS.L with LME but PG=0",
        "pm32",
        {"efer": EFER_LME, "cr4": CR4_PAE, "cs.l": 1, "cs.db": 0},
    )
    c(g, "lm64 without NXE", "lm64", {"&~efer": EFER_NXE})
    c(g, "lm64 without WP", "lm64", {"&~cr0": CR0_WP})
    c(g, "lm64 CR4.PAE cleared while LMA=1 (PG=1)", "lm64", {"cr4": 0})
    c(g, "CR4.PAE set in reset (real mode)", "reset", {"cr4": CR4_PAE})
    c(g, "CR4.LA57 in lm64", "lm64", {"|cr4": 1 << 12})
    c(g, "CR4.PCIDE in lm64, CR3[11:0]=0", "lm64", {"|cr4": 1 << 17})
    c(g, "CR4.PCIDE in lm64, CR3[11:0]=0x5", "lm64", {"|cr4": 1 << 17, "cr3": 0x1005})
    c(g, "CR4.PCIDE without LMA (pm32)", "pm32", {"|cr4": 1 << 17})
    c(g, "CR4.PCIDE without LMA, CR3 low bits", "pm32", {"|cr4": 1 << 17, "cr3": 0x1005})
    c(g, "CR4.PCIDE in lm64 (after SET_CPUID2)", "lm64", {"|cr4": 1 << 17}, cpuid=True)
    c(
        g,
        "CR4.PCIDE lm64 CR3=0x1005 (after SET_CPUID2)",
        "lm64",
        {"|cr4": 1 << 17, "cr3": 0x1005},
        cpuid=True,
    )
    c(g, "CR4.PCIDE pm32 (after SET_CPUID2)", "pm32", {"|cr4": 1 << 17}, cpuid=True)
    c(g, "CR4.PKE in pm32 (no LMA)", "pm32", {"|cr4": 1 << 22})
    c(g, "CR4.SMEP|SMAP|PKE|UMIP|FSGSBASE|OSXSAVE lm64", "lm64", {"|cr4": 0x750800})
    c(g, "CR4.OSFXSR|OSXMMEXCPT|PGE|PSE lm64", "lm64", {"|cr4": 0x690})
    c(
        g,
        "CR4.SMEP|SMAP|PKE|UMIP|FSGSBASE|OSXSAVE lm64 (after SET_CPUID2)",
        "lm64",
        {"|cr4": 0x750800},
        cpuid=True,
    )
    c(g, "CR4.PSE in lm64", "lm64", {"|cr4": 0x10})

    g = "cr3"
    for v in (
        0x1000,
        0x1FFF,
        0xFFF,
        0x7FFFFFFFF000,
        0xFFFFFFFFF000,
        0x0000FFFFFFFFF000,
        0x0FFFFFFFFFFFF000,
        1 << 36,
        (1 << 36) - 0x1000,
        1 << 47,
        1 << 48,
        1 << 50,
        1 << 52,
        1 << 62,
        1 << 63,
        0xFFFFFFFFFFFFFFFF,
    ):
        c(g, f"cr3={hx(v)} in lm64", "lm64", {"cr3": v})
        c(g, f"cr3={hx(v)} in pm32 (no paging)", "pm32", {"cr3": v})
    for v in (1 << 47, 1 << 48, 1 << 62, 1 << 63):
        c(g, f"cr3={hx(v)} in lm64 (after SET_CPUID2)", "lm64", {"cr3": v}, cpuid=True)

    g = "cr2"
    for v in (0, 0x1234, 0xDEADBEEF, 0x800000000000, 0xFFFF800000000000, 0xFFFFFFFFFFFFFFFF):
        c(g, f"cr2={hx(v)}", "reset", {"cr2": v})
        c(g, f"cr2={hx(v)} lm64", "lm64", {"cr2": v})

    g = "cr8"
    for v in [*list(range(0, 17)), 23, 31, 255, 1 << 32, 1 << 63]:
        c(g, f"cr8={hx(v)}", "reset", {"cr8": v})
    for v in (0x10, 0x17, 0xFF, 1 << 63, 0):
        c(g, f"cr8=5 then cr8={hx(v)}", "reset", {"cr8": v}, pre=({"cr8": 5},))
    c(g, "cr8=0x17 lm64", "lm64", {"cr8": 0x17})
    c(g, "cr8=9 with irqchip", "reset", {"cr8": 9}, irqchip=True)
    c(g, "cr8=5 then 0x17 with irqchip", "reset", {"cr8": 0x17}, pre=({"cr8": 5},), irqchip=True)

    g = "apic_base"
    for v in (
        0,
        0xFEE00000,
        0xFEE00100,
        0xFEE00800,
        0xFEE00900,
        0xFEE00C00,
        0xFEE00D00,
        0xFEE00400,
        0xFEE00500,
        0x12345000,
        0x12345900,
        0xFEE00001,
        0xFEE00080,
        0xFEE00200,
        0xFEE00A00,
        0xFFFFF000,
        0xF00000000,
        0x1000000000,
        0xFFFFFFFFF000,
        0x1000000000000,
        0x8000000000000000,
    ):
        c(g, f"apic_base={hx(v)}", "reset", {"apic_base": v})
    c(
        g,
        "apic_base=0xfee00900 then 0xfee00800 (BSP cleared)",
        "reset",
        {"apic_base": 0xFEE00800},
        pre=({"apic_base": 0xFEE00900},),
    )
    c(g, "apic_base ^ BSP", "reset", {"^apic_base": 0x100})
    c(g, "apic_base=0x1000000000 (after SET_CPUID2)", "reset", {"apic_base": 1 << 36}, cpuid=True)
    c(
        g,
        "apic_base=0x1000000000000 (after SET_CPUID2)",
        "reset",
        {"apic_base": 1 << 48},
        cpuid=True,
    )
    c(
        g,
        "apic_base=0xfee00d00 x2apic (after SET_CPUID2)",
        "reset",
        {"apic_base": 0xFEE00D00},
        cpuid=True,
    )
    c(
        g,
        "apic_base=0xfee00400 EXTD only (after SET_CPUID2)",
        "reset",
        {"apic_base": 0xFEE00400},
        cpuid=True,
    )
    c(
        g,
        "apic_base=0x400000000000 bit 46 (after SET_CPUID2)",
        "reset",
        {"apic_base": 1 << 46},
        cpuid=True,
    )
    c(
        g,
        "apic_base=0x200000000000 bit 45 (after SET_CPUID2)",
        "reset",
        {"apic_base": 1 << 45},
        cpuid=True,
    )
    c(g, "apic_base=0xfee00900 with irqchip", "reset", {"apic_base": 0xFEE00900}, irqchip=True)
    c(g, "apic_base=0xfee00000 with irqchip", "reset", {"apic_base": 0xFEE00000}, irqchip=True)
    c(g, "apic_base=0x12345900 with irqchip", "reset", {"apic_base": 0x12345900}, irqchip=True)
    c(g, "apic_base=0xfee00d00 with irqchip", "reset", {"apic_base": 0xFEE00D00}, irqchip=True)

    g = "interrupt_bitmap"
    for bits in ((0,), (32,), (255,), (3, 200), (64,)):
        m = {}
        words = [0, 0, 0, 0]
        for b in bits:
            words[b // 64] |= 1 << (b % 64)
        for i in range(4):
            m[f"interrupt_bitmap[{i}]"] = words[i]
        c(g, f"vector(s) {bits} (reset)", "reset", m)
        c(g, f"vector(s) {bits} (lm64)", "lm64", m)
    c(
        g,
        "vector 33 then all clear",
        "reset",
        {f"interrupt_bitmap[{i}]": 0 for i in range(4)},
        pre=({"interrupt_bitmap[0]": 1 << 33},),
    )

    g = "segments"
    for s in ("cs", "ds", "ss", "es", "fs", "gs", "tr", "ldt"):
        c(g, f"{s}.present=0 (lm64)", "lm64", {f"{s}.present": 0})
        c(g, f"{s}.unusable=1 (lm64)", "lm64", {f"{s}.unusable": 1})
    for s in ("cs", "ds", "ss", "tr", "ldt"):
        c(g, f"{s}.present=0 (reset)", "reset", {f"{s}.present": 0})
        c(g, f"{s}.unusable=1 (reset)", "reset", {f"{s}.unusable": 1})
    for t in range(16):
        c(g, f"cs.type={t} (lm64)", "lm64", {"cs.type": t})
    for t in (0, 1, 2, 7, 0xB):
        c(g, f"ss.type={t} (lm64)", "lm64", {"ss.type": t})
        c(g, f"tr.type={t} (lm64)", "lm64", {"tr.type": t})
    c(g, "ds.type=0x1f (>15)", "lm64", {"ds.type": 0x1F})
    c(g, "ds.present=2", "lm64", {"ds.present": 2})
    c(g, "ds.dpl=4", "lm64", {"ds.dpl": 4})
    c(g, "ds.dpl=3", "lm64", {"ds.dpl": 3})
    c(
        g,
        "ds.s=2, db=2, l=2, g=2, avl=2",
        "lm64",
        {"ds.s": 2, "ds.db": 2, "ds.l": 2, "ds.g": 2, "ds.avl": 2},
    )
    c(g, "ds.avl=1", "lm64", {"ds.avl": 1})
    c(g, "ds.padding=0xff", "lm64", {"ds.padding": 0xFF})
    c(g, "ds.unusable=2", "lm64", {"ds.unusable": 2})
    c(g, "cs.dpl=3, ss.dpl=0 (mismatch)", "lm64", {"cs.dpl": 3})
    c(g, "cs.dpl=3, ss.dpl=3", "lm64", {"cs.dpl": 3, "ss.dpl": 3})
    c(g, "cs.dpl=0, ss.dpl=3", "lm64", {"ss.dpl": 3})
    c(
        g,
        "cs.dpl=3 ss.dpl=3, selectors RPL 3",
        "lm64",
        {"cs.dpl": 3, "ss.dpl": 3, "cs.selector": 0x2B, "ss.selector": 0x23},
    )
    c(g, "cs.dpl=2 (pm32)", "pm32", {"cs.dpl": 2})
    c(g, "ss.dpl=1 (pm32)", "pm32", {"ss.dpl": 1})
    c(g, "cs.l=1 cs.db=0 (lm64, normal)", "lm64", {"cs.l": 1, "cs.db": 0})
    c(g, "cs.l=0 cs.db=0 (lm64, 16-bit compat)", "lm64", {"cs.l": 0, "cs.db": 0})
    c(g, "cs.s=0 (system)", "lm64", {"cs.s": 0})
    c(g, "cs.base=0x1234 (lm64)", "lm64", {"cs.base": 0x1234})
    c(g, "fs.base non-canonical 0x800000000000 (lm64)", "lm64", {"fs.base": 0x800000000000})
    c(g, "fs.base 0xffffffff00000000 (pm32)", "pm32", {"fs.base": 0xFFFFFFFF00000000})
    c(g, "ds.limit=0xfff g=1", "lm64", {"ds.limit": 0xFFF, "ds.g": 1})
    c(g, "ds.limit=0xfffff g=0", "lm64", {"ds.limit": 0xFFFFF, "ds.g": 0})
    c(g, "ds.limit=0xfffff g=1", "lm64", {"ds.limit": 0xFFFFF, "ds.g": 1})
    c(g, "ds.limit=0xffffffff g=0", "lm64", {"ds.limit": 0xFFFFFFFF, "ds.g": 0})
    c(g, "ds.limit=0x1234 g=1", "lm64", {"ds.limit": 0x1234, "ds.g": 1})
    c(g, "tr.s=1", "lm64", {"tr.s": 1})
    c(
        g,
        "ldt selector 0x28 present type 2",
        "lm64",
        {
            "ldt.selector": 0x28,
            "ldt.present": 1,
            "ldt.type": 2,
            "ldt.unusable": 0,
            "ldt.limit": 0xFF,
        },
    )
    c(g, "cs.selector=0xffff", "lm64", {"cs.selector": 0xFFFF})
    c(g, "ss.selector=0 (null SS in lm64)", "lm64", {"ss.selector": 0})
    c(g, "real mode cs.selector=0x1000 base mismatch", "reset", {"cs.selector": 0x1000})
    c(g, "reset ds.type=0x13 (accessed)", "reset", {"ds.type": 0x3})

    g = "dtables"
    c(g, "gdt.limit=0xffff", "lm64", {"gdt.limit": 0xFFFF})
    c(g, "idt.limit=0xffff", "lm64", {"idt.limit": 0xFFFF})
    c(g, "gdt.padding nonzero", "lm64", {"gdt.pad0": 0x1234, "gdt.pad1": 0xFFFF, "gdt.pad2": 1})
    c(g, "idt.padding nonzero", "lm64", {"idt.pad0": 0x1234, "idt.pad2": 1})
    c(g, "gdt.base non-canonical", "lm64", {"gdt.base": 0x800000000000})
    c(g, "idt.base 0xffffffffffffffff", "lm64", {"idt.base": 0xFFFFFFFFFFFFFFFF})
    c(g, "gdt.base high bits in reset", "reset", {"gdt.base": 0x123456789000})
    c(g, "gdt.limit=0", "reset", {"gdt.limit": 0, "idt.limit": 0})

    g = "efer"
    c(g, "EFER=0xd01 alone from reset (no PG)", "reset", {"efer": 0xD01})
    c(g, "EFER.SVME lm64", "lm64", {"|efer": 1 << 12})
    c(g, "EFER bit 20 lm64", "lm64", {"|efer": 1 << 20})
    c(g, "EFER all ones lm64", "lm64", {"efer": 0xFFFFFFFFFFFFFFFF})
    c(
        g,
        "EFER all ones except LMA/LME from reset",
        "reset",
        {"efer": 0xFFFFFFFFFFFFFFFF & ~(EFER_LMA | EFER_LME)},
    )
    c(g, "EFER.NXE only (pm32)", "pm32", {"efer": EFER_NXE})
    c(g, "EFER bit 63 (pm32)", "pm32", {"efer": 1 << 63})
    c(g, "EFER.LME|NXE|SCE from reset (after SET_CPUID2)", "reset", {"efer": 0x901}, cpuid=True)
    c(g, "EFER.SVME (after SET_CPUID2)", "reset", {"efer": 1 << 12}, cpuid=True)
    c(g, "EFER bit 20 (after SET_CPUID2)", "reset", {"efer": 1 << 20}, cpuid=True)
    c(g, "EFER bit 63 (after SET_CPUID2)", "reset", {"efer": 1 << 63}, cpuid=True)

    g = "irqchip"
    c(g, "lm64 with irqchip", "reset", BASES["lm64"], irqchip=True)

    for group, name, base, mods, pre, kw in C:
        run_case(dev, name, base, mods, pre=pre, group=group, **kw)
    return out


def regs_cases(dev):
    rows = []

    def one(name, mods, base_sregs=None):
        with Vcpu(dev) as v:
            if base_sregs:
                e = v.set_sregs(apply_mods(v.get_sregs(), BASES[base_sregs]))
                assert e == 0
            before = v.get_regs()
            new = dict(before)
            new.update(mods)
            e = v.set_regs(new)
            after = v.get_regs()
            d = diff(new, after, REGS) if e == 0 else diff(before, after, REGS)
        rows.append(
            {
                "name": name,
                "input": ", ".join(f"{k}={hx(x)}" for k, x in mods.items()),
                "errno": errno.errorcode.get(e, e) if e else "0",
                "readback": d,
            }
        )

    one("no change", {})
    one("rflags=0 (bit 1 cleared)", {"rflags": 0})
    one("rflags=0x202", {"rflags": 0x202})
    one("rflags all ones", {"rflags": 0xFFFFFFFFFFFFFFFF})
    one("rflags reserved bit 3", {"rflags": 0x2 | 1 << 3})
    one("rflags reserved bits 5, 15", {"rflags": 0x2 | 1 << 5 | 1 << 15})
    one("rflags bits 22..31", {"rflags": 0x2 | 0xFFC00000})
    one("rflags bit 32", {"rflags": 0x2 | 1 << 32})
    one("rflags TF (bit 8)", {"rflags": 0x102})
    one("rflags VM (bit 17)", {"rflags": 0x20002})
    one("rflags VM (bit 17), lm64", {"rflags": 0x20002}, "lm64")
    one("rflags IOPL=3, AC, ID", {"rflags": 0x2 | 0x3000 | 1 << 18 | 1 << 21})
    one("rflags VM (bit 17), pm32", {"rflags": 0x20002}, "pm32")
    one("rip non-canonical 0x800000000000", {"rip": 0x800000000000})
    one("rip non-canonical, lm64", {"rip": 0x800000000000}, "lm64")
    one("rip 0xffffffffffffffff, real mode", {"rip": 0xFFFFFFFFFFFFFFFF})
    one("rax high bits in real mode", {"rax": 0xDEADBEEF12345678})
    one("all GPRs set", {r: 0x1111111111111111 * (i % 15 + 1) for i, r in enumerate(REGS[:16])})
    one("rsp odd", {"rsp": 0x1001})
    return rows


def sregs2_cases(dev):
    rows = []
    with Vcpu(dev) as v:
        d = v.get_sregs2()
        rows.append(
            (
                "GET_SREGS2 on fresh vCPU",
                "0",
                f"flags={hx(d['flags'])}, pdptrs={[hx(d[f'pdptrs[{i}]']) for i in range(4)]}",
            )
        )

    def one(name, mods, base="reset", base2=None):
        with Vcpu(dev) as v:
            if BASES[base]:
                assert v.set_sregs(apply_mods(v.get_sregs(), BASES[base])) == 0
            if base2:
                e0 = v.set_sregs(apply_mods(v.get_sregs(), base2))
                assert e0 == 0, e0
            before = v.get_sregs2()
            new = apply_mods(before, mods)
            e = v.set_sregs2(new)
            after = v.get_sregs2()
            order = SREG_ORDER[:-4] + ["flags"] + [f"pdptrs[{i}]" for i in range(4)]
            dd = diff(new, after, order) if e == 0 else diff(before, after, order)
        rows.append(
            (name + f" [{base}]", errno.errorcode.get(e, e) if e else "0", "; ".join(dd) or "—")
        )

    one("flags=0 round trip", {})
    one("flags=1 (PDPTRS_VALID) not in PAE", {"flags": 1, "pdptrs[0]": 0x1001})
    one("flags=2 (unknown)", {"flags": 2})
    one("flags=1<<63", {"flags": 1 << 63})
    one("flags=1 in lm64", {"flags": 1, "pdptrs[0]": 0x1001}, base="lm64")
    one("flags=0 pdptrs nonzero", {"pdptrs[0]": 0x1001, "pdptrs[3]": 0x5001})
    pae = {"|cr0": CR0_PG, "cr4": CR4_PAE, "cr3": 0x2000}
    one(
        "PAE paging flags=1 pdptrs",
        dict(pae, flags=1, **{"pdptrs[0]": 0x3001, "pdptrs[1]": 0x4001}),
        base="pm32",
    )
    one("PAE paging flags=0", dict(pae), base="pm32")
    one("CR8=0x17 via SREGS2", {"cr8": 0x17})
    return rows


def patched_cpuid(dev, leaf1_ecx_clear=0, maxphyaddr=None):
    b = bytearray(dev.supported_cpuid())
    n = struct.unpack_from("<I", b, 0)[0]
    for i in range(n):
        off = 8 + 40 * i
        f, idx, fl, a, bb, c, d = struct.unpack_from("<7I", b, off)
        if f == 1:
            c &= ~leaf1_ecx_clear
        if f == 0x80000008 and maxphyaddr is not None:
            a = (a & ~0xFF) | maxphyaddr
        struct.pack_into("<7I", b, off, f, idx, fl, a, bb, c, d)
    return b


def special_cases(dev):
    """Cases where the vCPU's CPUID changes between two KVM_SET_SREGS."""
    rows = []

    def one(name, first, cpuid2, second):
        with Vcpu(dev, cpuid=True) as v:
            e1 = v.set_sregs(apply_mods(v.get_sregs(), first))
            fcntl.ioctl(v.fd, KVM_SET_CPUID2, cpuid2, True)
            before = v.get_sregs()
            new = apply_mods(before, second)
            e = v.set_sregs(new)
            after = v.get_sregs()
            d = diff(new, after) if e == 0 else diff(before, after)
        rows.append(
            (
                name,
                errno.errorcode.get(e1, e1) if e1 else "0",
                errno.errorcode.get(e, e) if e else "0",
                "; ".join(d) or "—",
            )
        )

    no_x2 = patched_cpuid(dev, leaf1_ecx_clear=1 << 21)
    one(
        "apic_base=0xfee00d00, CPUID loses X2APIC, SET_SREGS same apic_base",
        {"apic_base": 0xFEE00D00},
        no_x2,
        {},
    )
    one(
        "apic_base=0xfee00d00, CPUID loses X2APIC, SET_SREGS apic_base=0xfee00c00",
        {"apic_base": 0xFEE00D00},
        no_x2,
        {"apic_base": 0xFEE00C00},
    )
    m36 = patched_cpuid(dev, maxphyaddr=36)
    one(
        "apic_base=1<<40, CPUID MAXPHYADDR 36, SET_SREGS same apic_base",
        {"apic_base": 1 << 40 | 0x900},
        m36,
        {},
    )
    one(
        "lm64 CR3=1<<40, CPUID MAXPHYADDR 36, SET_SREGS same CR3",
        lm64_mods() | {"cr3": 1 << 40},
        m36,
        {},
    )
    return rows


# ---------------------------------------------------------------- report
SUMMARY = [
    "**Checks (all EINVAL, nothing changed on failure):** CR0 bits 63:32; CR0.NW without CD; "
    "CR0.PG without PE; EFER.LME&CR0.PG without EFER.LMA or without CR4.PAE; EFER.LMA "
    "without (LME and PG); CS.L=1 outside long mode (LME&PG); in long mode CR3 bits at or "
    "above the guest MAXPHYADDR (no PCID/LAM masking: CR3 bit 63 and 62 are rejected); CR4 bits "
    "outside the allowed set; apic_base bits 0-7, 9, bits at or above MAXPHYADDR, "
    "EXTD (bit 10) without X2APIC in the guest CPUID, EXTD without EN. An apic_base equal to "
    "the current one is accepted without checks.",
    "**Guest MAXPHYADDR is 36 before KVM_SET_CPUID2** (empty CPUID, the kernel's default): "
    "CR3 bits 36-63 in long mode and apic_base bits 36-63 give EINVAL on a fresh vCPU. After "
    "KVM_SET_CPUID2 it is CPUID 0x80000008.EAX[7:0] (46 on this host).",
    "**CR4 allowed set (fresh vCPU and after SET_CPUID2 alike):** bits 0-11 (VME..UMIP), 16 "
    "FSGSBASE, 18 OSXSAVE, 20 SMEP, 21 SMAP, 22 PKE. Rejected: 12 LA57, 13 VMXE, 14 SMXE, 17 "
    "PCIDE (PCID absent from the guest CPUID), 19, 23 CET, 24-63 (LAM_SUP, FRED...). PKE is "
    "accepted although PKU is absent from the guest CPUID (a PVM quirk), and on a fresh vCPU "
    "SMEP/SMAP/FSGSBASE/UMIP/OSXSAVE are accepted although its CPUID is empty.",
    "**No EFER check at all:** every EFER bit (SVME, LMSLE, FFXSR, TCE, bit 20, bit 63...) is "
    "accepted and read back, except the LMA/LME/PG consistency rules above.",
    "**Read-back is raw** for CR0 (no ET forcing, reserved bits 6-28 kept), CR2, CR3, CR4, EFER, "
    "apic_base and every byte of every kvm_segment (type 0x1f, present=2, dpl=4, "
    "padding=0xff are all read back as written). kvm_dtable padding reads back 0.",
    "**CR0.PG with EFER.LME=0** (legacy 32-bit or PAE paging) is accepted but PG is dropped: "
    "CR0 reads back without PG (PVM supports only 4-level long mode).",
    "**CR8:** a value with bits above 3 set is ignored (errno 0, CR8 keeps its old value); "
    "0-15 are stored. Same with an in-kernel irqchip.",
    "**interrupt_bitmap:** the lowest set bit becomes the pending interrupt and is the only bit "
    "read back; an all-zero bitmap leaves an earlier pending interrupt in place.",
    "**KVM_SET_REGS** never fails; RFLAGS bit 1 is forced to 1 and RFLAGS.VM (bit 17) is "
    "cleared; all other values (reserved RFLAGS bits, non-canonical RIP, 64-bit GPRs in real "
    "mode) are read back as written.",
    "**Reset:** RIP 0xfff0, RFLAGS 0x2, RDX 0x600, CR0 0x60000010, CS 0xf000/base 0xffff0000, "
    "apic_base 0xfee00900 for vCPU 0 and 0xfee00800 for others (with or without irqchip).",
]


def cell(r):
    rb = "; ".join(r["readback"]) if r["readback"] else "—"
    return f"{r['errno']} / {rb}"


def esc(s):
    return str(s).replace("|", "\\|")


def main():
    jpath = None
    if "--json" in sys.argv:
        jpath = sys.argv[sys.argv.index("--json") + 1]
    dev = Dev()
    uname = os.uname()
    t0 = time.time()

    # reset values
    with Vcpu(dev) as v:
        reset_regs = v.get_regs()
        reset_sregs = v.get_sregs()
        reset_sregs2 = v.get_sregs2()
    with Vcpu(dev, irqchip=True) as v:
        reset_sregs_irq = v.get_sregs()
        reset_regs_irq = v.get_regs()
    with Vcpu(dev, cpuid=True) as v:
        reset_sregs_cpuid = v.get_sregs()
        reset_regs_cpuid = v.get_regs()
    # second vCPU (id 1) of one VM: BSP bit?
    vm = fcntl.ioctl(dev.kvm, KVM_CREATE_VM, 0)
    fd0 = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
    fd1 = fcntl.ioctl(vm, KVM_CREATE_VCPU, 1)
    buf = bytearray(SREGS_SIZE)
    fcntl.ioctl(fd1, KVM_GET_SREGS, buf, True)
    reset_sregs_v1 = unpack_sregs(buf)
    os.close(fd1)
    os.close(fd0)
    os.close(vm)

    out = all_cases(dev)
    regs = regs_cases(dev)
    s2 = sregs2_cases(dev)
    sp = special_cases(dev)
    elapsed = time.time() - t0

    p = print
    p("# The real /dev/kvm: KVM_SET_SREGS / KVM_SET_REGS validity and read-back")
    p()
    p(f"* kernel: `{uname.release}` ({uname.machine}), KVM API {dev.api}")
    p(f"* date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    p(f"* cases: {len(RESULTS)} SET_SREGS, {len(regs)} SET_REGS, {len(s2)} SREGS2; {elapsed:.1f} s")
    p(
        "* generated by `python3 tools/probe_sregs.py > docs/device-sregs.md` (standard library "
        "only; needs read/write access to /dev/kvm)."
    )
    p()
    p(
        "Every case uses a fresh VM and vCPU (no KVM_CREATE_IRQCHIP and no KVM_SET_CPUID2 unless "
        "the case says so). The input is built the way userspace does it: KVM_GET_SREGS, change "
        "the named fields, KVM_SET_SREGS. The result is the errno (`0` = accepted) and the "
        "read-back differences: after a successful set, every field whose KVM_GET_SREGS value "
        "differs from what was set (`field: set→read`); after a failed set, every field that "
        "differs from the state before the call (`—` = none, so a failed set changed nothing)."
    )
    p()
    p(
        "Bases: **reset** = the fresh vCPU's state; **lm64** = reset plus "
        f"CR0={hx(LM64_CR0)} (PG|AM|WP|NE|ET|MP|PE), CR4={hx(LM64_CR4)} (PAE), "
        f"EFER={hx(LM64_EFER)} (NXE|LMA|LME|SCE), CR3=0x1000, CS=0x8 type 0xb L=1 DB=0, "
        "data segments 0x10 type 3 flat, TR 0x18 type 0xb limit 0x67, GDT 0x500/0x1f, "
        "IDT 0x1000/0xfff; **pm32** = the same without paging (CR0=0x10011, CR4=0, EFER=0, CS "
        "DB=1). `x ^= b` toggles bits, `x \\|= b` sets them, `x &= ~b` clears them."
    )
    p()

    p("## Summary")
    p()
    p(
        "Written by hand from the run on kernel `6.18.44-fc-v782` (PVM host, AMD EPYC); the "
        "tables below are what this run measured, so compare them with it after a re-run."
    )
    p()
    for line in SUMMARY:
        p(f"* {line}")
    p()
    p("## 1. Reset values of a fresh vCPU")
    p()
    p("### kvm_regs")
    p()
    p("| reg | value | with irqchip | after SET_CPUID2 |")
    p("| --- | --- | --- | --- |")
    for r in REGS:
        p(f"| {r} | {hx(reset_regs[r])} | {hx(reset_regs_irq[r])} | {hx(reset_regs_cpuid[r])} |")
    p()
    p("### kvm_sregs")
    p()
    p("| field | value | with irqchip | after SET_CPUID2 | vCPU id 1 |")
    p("| --- | --- | --- | --- | --- |")
    for k in SREG_ORDER:
        p(
            f"| {k} | {hx(reset_sregs[k])} | {hx(reset_sregs_irq[k])} | "
            f"{hx(reset_sregs_cpuid[k])} | {hx(reset_sregs_v1[k])} |"
        )
    p()
    p(
        f"KVM_GET_SREGS2 on a fresh vCPU: flags={hx(reset_sregs2['flags'])}, pdptrs="
        f"{[hx(reset_sregs2[f'pdptrs[{i}]']) for i in range(4)]}"
    )
    p()

    def sweep_table(title, rows, bases, note=""):
        p(f"## {title}")
        p()
        if note:
            p(note)
            p()
        p("| bit | name | " + " | ".join(f"toggle in {b}: errno / read-back" for b in bases) + " |")
        p("| --- | --- | " + " | ".join("---" for _ in bases) + " |")
        for row in rows:
            p(
                f"| {row['bit']} | {row['name']} | "
                + " | ".join(esc(cell(row[b])) for b in bases)
                + " |"
            )
        p()

    sweep_table(
        "2. CR0: every bit toggled",
        out["sweep_cr0"],
        ("lm64", "reset"),
        f"lm64 CR0 = {hx(LM64_CR0)}; reset CR0 = {hx(reset_sregs['cr0'])}.",
    )
    sweep_table("3. CR4: every bit toggled (no SET_CPUID2)", out["sweep_cr4"], ("lm64", "reset"))
    sweep_table(
        "4. CR4: every bit toggled, after KVM_SET_CPUID2(KVM_GET_SUPPORTED_CPUID)",
        out["sweep_cr4_cpuid"],
        ("lm64", "reset"),
    )
    sweep_table(
        "5. EFER: every bit toggled",
        out["sweep_efer"],
        ("lm64", "reset"),
        f"lm64 EFER = {hx(LM64_EFER)}; reset EFER = {hx(reset_sregs['efer'])}.",
    )
    sweep_table(
        "6. CR3: bits toggled (no SET_CPUID2)",
        out["sweep_cr3"],
        ("lm64", "pm32"),
        "lm64 CR3 = 0x1000; pm32 CR3 = 0.",
    )
    sweep_table(
        "7. CR3: high bits toggled after KVM_SET_CPUID2", out["sweep_cr3_cpuid"], ("lm64", "pm32")
    )

    p("## 8. Other SET_SREGS cases")
    p()
    groups = []
    for r in RESULTS:
        if r["group"].startswith("sweep"):
            continue
        if r["group"] not in groups:
            groups.append(r["group"])
    for gname in groups:
        p(f"### {gname}")
        p()
        p("| case | base | input | errno | read-back differences |")
        p("| --- | --- | --- | --- | --- |")
        for r in RESULTS:
            if r["group"] != gname:
                continue
            extra = []
            if r["pre"]:
                extra.append(f"first set {r['pre']}")
            if r["cpuid"]:
                extra.append("after SET_CPUID2")
            if r["irqchip"]:
                extra.append("with irqchip")
            inp = r["input"] + (f" ({'; '.join(extra)})" if extra else "")
            rb = "; ".join(r["readback"]) if r["readback"] else "—"
            p(f"| {esc(r['name'])} | {r['base']} | {esc(inp)} | {r['errno']} | {esc(rb)} |")
        p()

    p("## 9. KVM_SET_REGS")
    p()
    p("| case | input | errno | read-back differences |")
    p("| --- | --- | --- | --- |")
    for r in regs:
        rb = "; ".join(r["readback"]) if r["readback"] else "—"
        p(f"| {esc(r['name'])} | {esc(r['input'])} | {r['errno']} | {esc(rb)} |")
    p()
    p("## 10. KVM_GET_SREGS2 / KVM_SET_SREGS2")
    p()
    p("| case | errno | read-back differences |")
    p("| --- | --- | --- |")
    for name, e, rb in s2:
        p(f"| {esc(name)} | {e} | {esc(rb)} |")
    p()

    p("## 11. CPUID changed between two KVM_SET_SREGS")
    p()
    p(
        "Each case: fresh vCPU, KVM_SET_CPUID2(supported), first SET_SREGS, then KVM_SET_CPUID2 "
        "with a patched table, then a second SET_SREGS (get, change, set)."
    )
    p()
    p("| case | first set | second set | read-back differences |")
    p("| --- | --- | --- | --- |")
    for name, e1, e2, rb in sp:
        p(f"| {esc(name)} | {e1} | {e2} | {esc(rb)} |")
    p()

    if jpath:
        with open(jpath, "w") as f:
            json.dump(
                {
                    "kernel": uname.release,
                    "reset_regs": reset_regs,
                    "reset_sregs": reset_sregs,
                    "cases": RESULTS,
                    "regs": regs,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
