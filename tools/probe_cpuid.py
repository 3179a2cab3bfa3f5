#!/usr/bin/env python3
"""Probe what the real /dev/kvm does with KVM_GET_SUPPORTED_CPUID, KVM_SET_CPUID2 and
KVM_GET_CPUID2.

Standard library only (os, fcntl, ctypes, mmap, struct).  Every vCPU case runs on a fresh
VM + vCPU.  The output is Markdown:

    python3 tools/probe_cpuid.py > docs/device-cpuid.md
    python3 tools/probe_cpuid.py --json /tmp/cpuid.json > docs/device-cpuid.md

Each case records the errno (0 if accepted) and what the header / table reads back, so the
E2BIG, EFAULT and nent write-back rules, the SET_CPUID2 checks, what the device stores,
the runtime CPUID bits and the effect on KVM_SET_SREGS can be compared with the simulator.
"""

import ctypes
import errno
import fcntl
import json
import mmap
import os
import struct
import sys
import time

# ---------------------------------------------------------------- ioctl numbers
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_GET_SUPPORTED_CPUID = 0xC008AE05
KVM_CREATE_VCPU = 0xAE41
KVM_GET_SREGS = 0x8138AE83
KVM_SET_SREGS = 0x4138AE84
KVM_SET_CPUID2 = 0x4008AE90
KVM_GET_CPUID2 = 0xC008AE91

ENTRY_FMT = "<7I3I"  # function, index, flags, eax, ebx, ecx, edx, padding[3]
ENTRY_SIZE = 40
assert struct.calcsize(ENTRY_FMT) == ENTRY_SIZE
FLAG_SIGNIFCANT_INDEX = 1
KVM_SIGNATURE_LEAF = 0x40000000
KVM_FEATURES_LEAF = 0x40000001

KVM_FEATURE_NAMES = {
    0: "CLOCKSOURCE",
    1: "NOP_IO_DELAY",
    2: "MMU_OP (deprecated)",
    3: "CLOCKSOURCE2",
    4: "ASYNC_PF",
    5: "STEAL_TIME",
    6: "PV_EOI",
    7: "PV_UNHALT",
    9: "PV_TLB_FLUSH",
    10: "ASYNC_PF_VMEXIT",
    11: "PV_SEND_IPI",
    12: "POLL_CONTROL",
    13: "PV_SCHED_YIELD",
    14: "ASYNC_PF_INT",
    15: "MSI_EXT_DEST_ID",
    16: "HC_MAP_GPA_RANGE",
    17: "MIGRATION_CONTROL",
    24: "CLOCKSOURCE_STABLE_BIT",
}

# name -> (function, index, register, bit)
FEATURES = {
    "PSE": (1, 0, "edx", 3),
    "PAE": (1, 0, "edx", 6),
    "APIC": (1, 0, "edx", 9),
    "PGE": (1, 0, "edx", 13),
    "PAT": (1, 0, "edx", 16),
    "PSE36": (1, 0, "edx", 17),
    "VMX": (1, 0, "ecx", 5),
    "PCID": (1, 0, "ecx", 17),
    "X2APIC": (1, 0, "ecx", 21),
    "XSAVE": (1, 0, "ecx", 26),
    "OSXSAVE": (1, 0, "ecx", 27),
    "HYPERVISOR": (1, 0, "ecx", 31),
    "FSGSBASE": (7, 0, "ebx", 0),
    "SMEP": (7, 0, "ebx", 7),
    "SMAP": (7, 0, "ebx", 20),
    "UMIP": (7, 0, "ecx", 2),
    "PKU": (7, 0, "ecx", 3),
    "OSPKE": (7, 0, "ecx", 4),
    "LA57": (7, 0, "ecx", 16),
    "SVM": (0x80000001, 0, "ecx", 2),
    "NX": (0x80000001, 0, "edx", 20),
    "PDPE1GB": (0x80000001, 0, "edx", 26),
    "LM": (0x80000001, 0, "edx", 29),
}
REGS = ("eax", "ebx", "ecx", "edx")

CR4_BITS = {
    "UMIP": 11,
    "LA57": 12,
    "VMXE": 13,
    "FSGSBASE": 16,
    "PCIDE": 17,
    "OSXSAVE": 18,
    "SMEP": 20,
    "SMAP": 21,
    "PKE": 22,
}
CR4_OFF, CR3_OFF, CR0_OFF, EFER_OFF, APIC_BASE_OFF = 248, 240, 224, 264, 272
SREGS_SIZE = 312

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_libc.ioctl.restype = ctypes.c_int
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


# ---------------------------------------------------------------- buffers
def pack_table(entries, nent=None, padding=0, room=None):
    """A kvm_cpuid2 buffer: header (nent, padding), then the entries, then zeroed room."""
    n = len(entries) if room is None else max(room, len(entries))
    buf = bytearray(8 + ENTRY_SIZE * n)
    struct.pack_into("<II", buf, 0, len(entries) if nent is None else nent, padding)
    for i, e in enumerate(entries):
        vals = [*list(e), *[0] * 10][:10]
        struct.pack_into(ENTRY_FMT, buf, 8 + ENTRY_SIZE * i, *vals)
    return buf


def header(buf):
    return struct.unpack_from("<II", buf, 0)


def unpack_entries(buf, n):
    n = min(n, (len(buf) - 8) // ENTRY_SIZE)
    return [struct.unpack_from(ENTRY_FMT, buf, 8 + ENTRY_SIZE * i) for i in range(n)]


def E(function, index=0, flags=0, eax=0, ebx=0, ecx=0, edx=0, padding=(0, 0, 0)):
    return (function, index, flags, eax, ebx, ecx, edx, *padding)


def ioctl_buf(fd, req, buf):
    try:
        fcntl.ioctl(fd, req, buf, True)
        return 0
    except OSError as e:
        return e.errno


def ioctl_ptr(fd, req, ptr):
    r = _libc.ioctl(fd, req, ptr)
    return 0 if r >= 0 else ctypes.get_errno()


def en(e):
    return "0" if e == 0 else errno.errorcode.get(e, str(e))


def hx(v):
    return hex(v) if isinstance(v, int) else str(v)


def find(entries, function, index=None):
    for e in entries:
        if e[0] != function:
            continue
        if index is None or not e[2] & FLAG_SIGNIFCANT_INDEX or e[1] == index:
            return e
    return None


def has(entries, name):
    function, index, reg, bit = FEATURES[name]
    e = find(entries, function, index)
    return e is not None and bool(e[3 + REGS.index(reg)] >> bit & 1)


def text(*words):
    return b"".join(w.to_bytes(4, "little") for w in words)


class PageEnd:
    """A header in the last 8 bytes of a page whose next page is PROT_NONE."""

    def __init__(self):
        self.map = mmap.mmap(-1, 2 * mmap.PAGESIZE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self.second = base + mmap.PAGESIZE
        assert _libc.mprotect(self.second, mmap.PAGESIZE, 0) == 0
        self.addr = self.second - 8

    def set(self, nent, padding=0x55):
        self.map[mmap.PAGESIZE - 8 : mmap.PAGESIZE] = struct.pack("<II", nent, padding)

    def header(self):
        return struct.unpack("<II", self.map[mmap.PAGESIZE - 8 : mmap.PAGESIZE])

    def close(self):
        _libc.mprotect(self.second, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_WRITE)
        self.map.close()


# ---------------------------------------------------------------- device access
class Dev:
    def __init__(self):
        self.kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        self.api = fcntl.ioctl(self.kvm, KVM_GET_API_VERSION, 0)
        buf = pack_table([], nent=256, room=256)
        e = ioctl_buf(self.kvm, KVM_GET_SUPPORTED_CPUID, buf)
        if e:
            raise OSError(e, "KVM_GET_SUPPORTED_CPUID")
        self.supported = unpack_entries(buf, header(buf)[0])


class Vcpu:
    """One fresh VM with one vCPU (id 0)."""

    def __init__(self, dev):
        self.vm = fcntl.ioctl(dev.kvm, KVM_CREATE_VM, 0)
        self.fd = fcntl.ioctl(self.vm, KVM_CREATE_VCPU, 0)

    def close(self):
        os.close(self.fd)
        os.close(self.vm)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def set_cpuid(self, entries, nent=None):
        return ioctl_buf(self.fd, KVM_SET_CPUID2, pack_table(entries, nent=nent))

    def get_cpuid(self, room=256, padding=0x77):
        buf = pack_table([], nent=room, room=room, padding=padding)
        e = ioctl_buf(self.fd, KVM_GET_CPUID2, buf)
        n, pad = header(buf)
        return e, n, pad, unpack_entries(buf, n) if e == 0 else []

    def get_sregs(self):
        b = bytearray(SREGS_SIZE)
        fcntl.ioctl(self.fd, KVM_GET_SREGS, b, True)
        return b

    def set_sregs(self, b):
        return ioctl_buf(self.fd, KVM_SET_SREGS, bytes(b))

    def change_sregs(self, **fields):
        s = self.get_sregs()
        offs = {"cr0": CR0_OFF, "cr3": CR3_OFF, "cr4": CR4_OFF, "efer": EFER_OFF}
        offs["apic_base"] = APIC_BASE_OFF
        for k, v in fields.items():
            if k == "lm64":
                # CS: base 0, limit 4G, selector 8, type 11, present, dpl 0, db 0, s, l, g
                struct.pack_into("<QIH10B", s, 0, 0, 0xFFFFFFFF, 8, 11, 1, 0, 0, 1, 1, 1, 0, 0, 0)
                struct.pack_into("<Q", s, CR0_OFF, 0x80050033)
                struct.pack_into("<Q", s, CR4_OFF, 0x20)
                struct.pack_into("<Q", s, EFER_OFF, 0xD01)
                struct.pack_into("<Q", s, CR3_OFF, 0x1000)
            else:
                struct.pack_into("<Q", s, offs[k], v)
        return self.set_sregs(s)


# ---------------------------------------------------------------- the cases
def kvm_leaves(features=0x01007EFB):
    sig = struct.unpack("<3I", b"KVMKVMKVM\0\0\0")
    return [
        E(KVM_SIGNATURE_LEAF, eax=KVM_FEATURES_LEAF, ebx=sig[0], ecx=sig[1], edx=sig[2]),
        E(KVM_FEATURES_LEAF, eax=features),
    ]


def probe_supported(dev):
    n = len(dev.supported)
    rows = []
    for nent in (0, 1, 2, n - 1, n, n + 1, 256, 257, 100000, 0xFFFFFFFF):
        room = min(max(nent, 1), 256)
        buf = pack_table([], nent=nent, room=room, padding=0xDEAD)
        e = ioctl_buf(dev.kvm, KVM_GET_SUPPORTED_CPUID, buf)
        nn, pad = header(buf)
        rows.append((f"nent={nent} (room for {room})", en(e), nn, hx(pad)))
    for ptr in (0, 0x10, 0xFFFF800000000000):
        rows.append(
            (f"pointer {hx(ptr)}", en(ioctl_ptr(dev.kvm, KVM_GET_SUPPORTED_CPUID, ptr)), "", "")
        )
    pe = PageEnd()
    try:
        for nent in (n, 1, 0):
            pe.set(nent)
            e = ioctl_ptr(dev.kvm, KVM_GET_SUPPORTED_CPUID, pe.addr)
            nn, pad = pe.header()
            rows.append(
                (f"header at a page end, entries unmapped, nent={nent}", en(e), nn, hx(pad))
            )
    finally:
        pe.close()
    with Vcpu(dev) as v:
        buf = pack_table([], nent=256, room=256)
        rows.append(("on a VM fd", en(ioctl_buf(v.vm, KVM_GET_SUPPORTED_CPUID, buf)), "", ""))
        buf = pack_table([], nent=256, room=256)
        rows.append(("on a vCPU fd", en(ioctl_buf(v.fd, KVM_GET_SUPPORTED_CPUID, buf)), "", ""))
        rows.append(
            (
                "KVM_SET_CPUID2 on the system fd",
                en(ioctl_buf(dev.kvm, KVM_SET_CPUID2, pack_table([]))),
                "",
                "",
            )
        )
        rows.append(
            (
                "KVM_GET_CPUID2 on the system fd",
                en(ioctl_buf(dev.kvm, KVM_GET_CPUID2, pack_table([]))),
                "",
                "",
            )
        )
        rows.append(
            (
                "KVM_SET_CPUID2 on a VM fd",
                en(ioctl_buf(v.vm, KVM_SET_CPUID2, pack_table([]))),
                "",
                "",
            )
        )
    return rows


def probe_set(dev):
    rows = []

    def case(name, entries=None, nent=None, check_get=True, ptr=None, pre=None):
        with Vcpu(dev) as v:
            if pre is not None:
                v.set_cpuid(pre)
            if ptr is not None:
                e = ioctl_ptr(v.fd, KVM_SET_CPUID2, ptr)
            else:
                e = v.set_cpuid(entries, nent=nent)
            after = ""
            if check_get:
                ge, n, _, got = v.get_cpuid()
                after = f"GET: {en(ge)}, nent {n}"
                if pre is not None and e:
                    after += ", table kept" if got == [tuple(x) for x in pre] else ", CHANGED"
        rows.append((name, en(e), after))

    case("nent=0", [])
    case("nent=1 (a KVM leaf)", kvm_leaves()[:1])
    case("nent=256 (distinct leaves 0x4f000000+i)", [E(0x4F000000 + i) for i in range(256)])
    for nent in (257, 1000, 100000, 0xFFFFFFFF):
        case(f"nent={nent}, no entries behind the header", [], nent=nent)
    case("pointer 0", ptr=0, check_get=False)
    case("pointer 0x10", ptr=0x10, check_get=False)
    pe = PageEnd()
    try:
        for nent in (1, 0, 300):
            pe.set(nent)
            with Vcpu(dev) as v:
                e = ioctl_ptr(v.fd, KVM_SET_CPUID2, pe.addr)
            rows.append((f"header at a page end, entries unmapped, nent={nent}", en(e), ""))
    finally:
        pe.close()

    accepted = []
    for vaddr in range(256):
        with Vcpu(dev) as v:
            if v.set_cpuid([E(0x80000008, eax=vaddr << 8 | 40)]) == 0:
                accepted.append(vaddr)
    rows.append(
        (
            "0x80000008.EAX[15:8] (linear width) = 0..255",
            "see right",
            f"accepted only: {accepted}; every other value EINVAL",
        )
    )
    case(
        "0x80000008 width 48 then a second 0x80000008 with width 40",
        [E(0x80000008, eax=48 << 8 | 40), E(0x80000008, eax=40 << 8 | 40)],
    )
    case(
        "0x80000008 width 40 then a second with width 48",
        [E(0x80000008, eax=40 << 8 | 40), E(0x80000008, eax=48 << 8 | 40)],
    )
    case(
        "0x80000008 width 40 with index 3 and SIGNIFCANT_INDEX",
        [E(0x80000008, 3, 1, eax=40 << 8 | 40)],
    )
    for phys in (0, 20, 52, 64, 255):
        case(f"0x80000008 MAXPHYADDR {phys} (width 48)", [E(0x80000008, eax=48 << 8 | phys)])
    case("0xd.0 EAX=0x60003 (XTILE_CFG|XTILE_DATA), no permission", [E(0xD, 0, 1, 0x60003)])
    case("0xd.0 EAX=0x20003 (XTILE_CFG only)", [E(0xD, 0, 1, 0x20003)])
    case("0xd.0 EDX=0xffffffff", [E(0xD, 0, 1, 3, 0, 0, 0xFFFFFFFF)])
    case("0xd index 5 without SIGNIFCANT_INDEX, EAX=0x60003", [E(0xD, 5, 0, 0x60003)])
    case("0xd.5 with SIGNIFCANT_INDEX, EAX=0x60003", [E(0xD, 5, 1, 0x60003)])
    case("duplicate entries (the KVM leaves twice)", kvm_leaves() + kvm_leaves(0))
    case("invalid width after a valid table", [E(0x80000008, eax=40 << 8 | 40)], pre=kvm_leaves())
    case("XTILE_DATA after a valid table", [E(0xD, 0, 1, 0x60003)], pre=kvm_leaves())
    return rows


def probe_storage(dev):
    """What the device stores: GET after SET, compared by (function, index)."""
    out = []

    def keyed(t):
        d = {}
        for e in t:
            d.setdefault((e[0], e[1]), e)
        return d

    def compare(name, table):
        with Vcpu(dev) as v:
            e = v.set_cpuid(table)
            ge, n, _, got = v.get_cpuid()
        a, b = keyed([tuple(x) for x in table]), keyed(got)
        added = sorted(set(b) - set(a))
        removed = sorted(set(a) - set(b))
        changed = sorted(k for k in set(a) & set(b) if a[k] != b[k])
        details = [
            f"{k[0]:#x}.{k[1]}: "
            + ", ".join(
                f"{r} {a[k][3 + i]:#x}→{b[k][3 + i]:#x}"
                for i, r in enumerate(REGS)
                if a[k][3 + i] != b[k][3 + i]
            )
            + (f", flags {a[k][2]}→{b[k][2]}" if a[k][2] != b[k][2] else "")
            + (f", padding {a[k][7:]}→{b[k][7:]}" if a[k][7:] != b[k][7:] else "")
            for k in changed
        ]
        out.append(
            {
                "name": name,
                "set": en(e),
                "get": en(ge),
                "nent": f"{len(table)}→{n}",
                "identical": got == [tuple(x) for x in table],
                "added": [f"{k[0]:#x}.{k[1]}" for k in added],
                "removed": [f"{k[0]:#x}.{k[1]}" for k in removed],
                "changed": details,
            }
        )

    compare("KVM_GET_SUPPORTED_CPUID as is", dev.supported)
    compare("the KVM leaves only", kvm_leaves())
    odd = E(0x4FFF0000, 3, 0xFE, 5, 6, 7, 8, padding=(9, 9, 9))
    compare("an unknown leaf with index 3, flags 0xfe, padding 9,9,9", [odd])
    compare(
        "leaf 0 (GenuineIntel, max 1) and leaf 1 = (0x806f8, 0, 0, 0)",
        [E(0, eax=1, ebx=0x756E6547, ecx=0x6C65746E, edx=0x49656E69), E(1, eax=0x806F8)],
    )
    compare("leaf 1 alone", [E(1, eax=0x806F8)])
    compare("leaf 7.0 alone (all zero)", [E(7, 0, 1)])
    compare(
        "0x80000000 + 0x80000008 (MAXPHYADDR 40)",
        [E(0x80000000, eax=0x80000008), E(0x80000008, eax=48 << 8 | 40)],
    )
    compare(
        "0xd.0 (EAX 3, EBX 0x1234) and 0xd.1 (XSAVEC, EBX 0x999)",
        [E(0xD, 0, 1, 3, 0x1234, 0x240), E(0xD, 1, 1, 2, 0x999)],
    )
    return out


def probe_runtime(dev):
    rows = []
    table = [E(1, eax=0x806F8, ecx=1 << 26 | 1 << 27), E(7, 0, 1, ecx=1 << 3 | 1 << 4)]
    with Vcpu(dev) as v:
        v.set_cpuid(table)

        def bits():
            _, _, _, got = v.get_cpuid()
            return {n: int(has(got, n)) for n in ("OSXSAVE", "APIC", "OSPKE")}

        rows.append(
            ("after SET (CR4=0, APIC_BASE=0xfee00900); table had OSXSAVE, OSPKE set", "0", bits())
        )
        e = v.change_sregs(cr4=1 << 18)
        rows.append(("SET_SREGS CR4.OSXSAVE", en(e), bits()))
        e = v.change_sregs(cr4=1 << 18 | 1 << 22)
        rows.append(("SET_SREGS CR4.OSXSAVE|PKE", en(e), bits()))
        e = v.change_sregs(apic_base=0xFEE00100)
        rows.append(("SET_SREGS APIC_BASE=0xfee00100 (EN clear)", en(e), bits()))
        e = v.change_sregs(cr4=0, apic_base=0xFEE00900)
        rows.append(("SET_SREGS CR4=0, APIC_BASE=0xfee00900", en(e), bits()))
    with Vcpu(dev) as v:
        v.set_cpuid([E(0xD, 0, 1, 3, 0x1234, 0x240), E(0xD, 1, 1, 2, 0x999)])
        _, _, _, got = v.get_cpuid()
        d0, d1 = find(got, 0xD, 0), find(got, 0xD, 1)
        rows.append(
            (
                "0xd.0 EBX / 0xd.1 EBX after SET (0x1234 / 0x999 given, XSAVEC set)",
                "0",
                {"0xd.0 ebx": hx(d0[4]) if d0 else None, "0xd.1 ebx": hx(d1[4]) if d1 else None},
            )
        )
    return rows


def probe_get(dev):
    rows = []
    with Vcpu(dev) as v:
        for room in (0, 1, 5):
            e, n, pad, _ = v.get_cpuid(room)
            rows.append((f"fresh vCPU, nent={room}", en(e), n, hx(pad)))
        v.set_cpuid(kvm_leaves())
        for room in (0, 1, 2, 40):
            e, n, pad, _ = v.get_cpuid(room, padding=0xABCD)
            rows.append((f"2 entries stored, nent={room}", en(e), n, hx(pad)))
        for ptr in (0, 0x10):
            rows.append((f"pointer {hx(ptr)}", en(ioctl_ptr(v.fd, KVM_GET_CPUID2, ptr)), "", ""))
        pe = PageEnd()
        try:
            for nent in (5, 1):
                pe.set(nent)
                e = ioctl_ptr(v.fd, KVM_GET_CPUID2, pe.addr)
                n, pad = pe.header()
                rows.append(
                    (
                        f"2 stored, header at a page end, entries unmapped, nent={nent}",
                        en(e),
                        n,
                        hx(pad),
                    )
                )
        finally:
            pe.close()
    return rows


def probe_sregs(dev):
    tables = {
        "no SET_CPUID2": None,
        "SET_CPUID2 nent=0": [],
        "SET_CPUID2 KVM leaves only": kvm_leaves(),
        "SET_CPUID2 supported": dev.supported,
    }
    rows = []
    for tname, table in tables.items():
        row = {"table": tname}
        for name, bit in CR4_BITS.items():
            with Vcpu(dev) as v:
                if table is not None:
                    v.set_cpuid(table)
                row[name] = en(v.change_sregs(cr4=1 << bit))
        with Vcpu(dev) as v:
            if table is not None:
                v.set_cpuid(table)
            row["x2APIC (apic_base 0xfee00d00)"] = en(v.change_sregs(apic_base=0xFEE00D00))
        rows.append(row)
    cr3 = []
    for phys in (36, 40, 46, 48):
        with Vcpu(dev) as v:
            v.set_cpuid([E(0x80000000, eax=0x80000008), E(0x80000008, eax=48 << 8 | phys)])
            v.change_sregs(lm64=1)
            ok = en(v.change_sregs(cr3=1 << (phys - 1)))
            bad = en(v.change_sregs(cr3=1 << phys))
        cr3.append((phys, ok, bad))
    return rows, cr3


# ---------------------------------------------------------------- report
SUMMARY = [
    "**KVM_GET_SUPPORTED_CPUID:** header unreadable → EFAULT; nent 0 or smaller than the "
    "table → E2BIG with nothing written and nent left as given; nent above 256 "
    "(KVM_MAX_CPUID_ENTRIES) is clamped, not an error; entries unwritable → EFAULT (nent not "
    "written back); success writes the entries and nent = their number, the header's padding "
    "word untouched. On a VM fd ENOTTY, on a vCPU fd EINVAL.",
    "**Table shape:** every basic leaf 0..max, the extended leaves 0x80000000..max, then "
    "0x40000000 (EAX 0x40000001, `KVMKVMKVM\\0\\0\\0`) and 0x40000001 (EAX 0x01007efb, EBX = "
    "ECX = EDX = 0). Indexed leaves (4, 7, 0xb, 0xd, 0xf, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1d, "
    "0x1e, 0x1f, 0x24) carry KVM_CPUID_FLAG_SIGNIFCANT_INDEX, every other entry flags 0.",
    "**KVM_SET_CPUID2:** nent > 256 → E2BIG (before reading entries); entries unreadable → "
    "EFAULT; the first 0x80000008 entry (any index) with a linear width other than 0, 48 or 57 "
    "→ EINVAL; 0xd.0 with XTILE_DATA (XCR0 bit 18) → EPERM (no ARCH_REQ_XCOMP_GUEST_PERM); "
    "nent 0, duplicates, any MAXPHYADDR are accepted; a failed set keeps the previous table.",
    "**What is stored:** PVM rewrites leaves 1, 7.x and 0xd.x into host-like values (and adds "
    "0xd subleaves) when the table has them; KVM leaves and unknown leaves are stored verbatim "
    "(index, flags and padding included). Upstream KVM stores every entry verbatim.",
    "**Runtime bits (kvm_update_cpuid_runtime):** 1.ECX.OSXSAVE follows CR4.OSXSAVE, "
    "1.EDX.APIC follows APIC_BASE.EN, 7.0.ECX.OSPKE follows CR4.PKE, 0xd.0.EBX is the XSAVE "
    "size for the current XCR0 (0x240 after reset), at KVM_SET_CPUID2 and at every "
    "KVM_GET_CPUID2.",
    "**KVM_GET_CPUID2:** a fresh vCPU has 0 entries (any nent succeeds, nent reads back 0); "
    "nent smaller than the table → E2BIG and nent is NOT written back (not the needed count); "
    "entries unwritable → EFAULT; success writes nent = the stored count, padding untouched.",
    "**SET_SREGS after SET_CPUID2:** MAXPHYADDR from 0x80000008 gates long-mode CR3 and "
    "x2APIC needs X2APIC in the table, as upstream; but CR4.SMEP/SMAP/FSGSBASE/UMIP/OSXSAVE/"
    "PKE are accepted whatever the table says (upstream rejects a feature bit the guest CPUID "
    "lacks).",
    "**The simulator** (`rust/core/src/cpuid.rs`) follows every rule above except the two PVM "
    "quirks: it stores a KVM_SET_CPUID2 table verbatim (only the runtime bits change), and it "
    "rejects a CR4 feature bit whose feature the guest table lacks (EINVAL), like upstream KVM. "
    "Its KVM_GET_SUPPORTED_CPUID table is its own: 26 entries, GenuineIntel, MAXPHYADDR 48, "
    "0x40000001.EAX = 0x2 (NOP_IO_DELAY only: it has no kvmclock or other PV interface).",
]


def esc(s):
    return str(s).replace("|", "\\|")


def main():
    jpath = None
    if len(sys.argv) > 2 and sys.argv[1] == "--json":
        jpath = sys.argv[2]
    t0 = time.time()
    dev = Dev()
    supported_rows = probe_supported(dev)
    set_rows = probe_set(dev)
    storage = probe_storage(dev)
    runtime = probe_runtime(dev)
    get_rows = probe_get(dev)
    sregs_rows, cr3_rows = probe_sregs(dev)
    dt = time.time() - t0
    uname = os.uname()
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass

    out = []
    p = out.append
    p("# The real /dev/kvm: KVM_GET_SUPPORTED_CPUID, KVM_SET_CPUID2, KVM_GET_CPUID2")
    p("")
    p(f"* kernel: `{uname.release}` ({uname.machine}), KVM API {dev.api}; host CPU: {cpu}")
    p(f"* date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; {dt:.1f} s")
    p(
        "* generated by `python3 tools/probe_cpuid.py > docs/device-cpuid.md` (standard library "
        "only; needs read/write access to /dev/kvm)."
    )
    p("")
    p(
        "Every vCPU case uses a fresh VM and vCPU. `errno` 0 means the call succeeded. "
        '"Header at a page end" puts the 8-byte `kvm_cpuid2` header in the last bytes of a page '
        "whose next page is PROT_NONE, so the header is accessible and the entries are not."
    )
    p("")
    p("## Summary")
    p("")
    p(
        "Written by hand from a run on kernel `6.18.44` (PVM host); the tables below are what this "
        "run measured. The simulator's side is in `rust/core/src/cpuid.rs` (module docs)."
    )
    p("")
    for line in SUMMARY:
        p(f"* {line}")
    p("")

    sup = dev.supported
    p(f"## 1. KVM_GET_SUPPORTED_CPUID: the table ({len(sup)} entries, host-dependent)")
    p("")
    v0 = find(sup, 0)
    vendor = text(v0[4], v0[6], v0[5]).decode("latin-1") if v0 else None
    e8 = find(sup, 0x80000008)
    feats = find(sup, KVM_FEATURES_LEAF)
    sig = find(sup, KVM_SIGNATURE_LEAF)
    p(
        f"* vendor {vendor!r}; max basic leaf {hx(v0[3]) if v0 else None}; 0x80000008.EAX "
        f"{hx(e8[3]) if e8 else None} (MAXPHYADDR {e8[3] & 0xFF if e8 else None}, linear "
        f"{e8[3] >> 8 & 0xFF if e8 else None})"
    )
    p("* features: " + ", ".join(f"{n} {int(has(sup, n))}" for n in FEATURES))
    if sig:
        p(f"* 0x40000000: EAX {hx(sig[3])}, signature {text(sig[4], sig[5], sig[6])!r}")
    if feats:
        names = [KVM_FEATURE_NAMES.get(b, f"bit {b}") for b in range(32) if feats[3] >> b & 1]
        p(
            f"* 0x40000001: EAX {hx(feats[3])} = {', '.join(names)}; EBX {hx(feats[4])}, "
            f"ECX {hx(feats[5])}, EDX {hx(feats[6])}"
        )
    p("")
    p("| function | index | flags | eax | ebx | ecx | edx | padding |")
    p("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for e in sup:
        p("| " + " | ".join(hx(x) for x in e[:7]) + f" | {list(e[7:])} |")
    p("")
    p("## 2. KVM_GET_SUPPORTED_CPUID: nent, pointers, descriptors")
    p("")
    p("The buffer's header padding word is 0xdead (0x55 for the page-end cases) before the call.")
    p("")
    p("| case | errno | nent after | padding after |")
    p("| --- | --- | --- | --- |")
    for r in supported_rows:
        p("| " + " | ".join(esc(x) for x in r) + " |")
    p("")
    p("## 3. KVM_SET_CPUID2: rules")
    p("")
    p("| case | errno | KVM_GET_CPUID2 afterwards |")
    p("| --- | --- | --- |")
    for r in set_rows:
        p("| " + " | ".join(esc(x) for x in r) + " |")
    p("")
    p("## 4. KVM_SET_CPUID2: what the device stores (KVM_GET_CPUID2 right after)")
    p("")
    p("Compared by (function, index), first entry of each key.")
    p("")
    p("| table set | SET | GET | nent | identical | added | removed | changed |")
    p("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in storage:
        p(
            f"| {esc(r['name'])} | {r['set']} | {r['get']} | {r['nent']} | {r['identical']} | "
            f"{esc(', '.join(r['added']) or '—')} | {esc(', '.join(r['removed']) or '—')} | "
            f"{esc('; '.join(r['changed']) or '—')} |"
        )
    p("")
    p("## 5. Runtime CPUID bits")
    p("")
    p("| step | errno | read back |")
    p("| --- | --- | --- |")
    for name, e, bits in runtime:
        p(f"| {esc(name)} | {e} | {esc(bits)} |")
    p("")
    p("## 6. KVM_GET_CPUID2: nent, pointers")
    p("")
    p("Header padding 0x77 (0xabcd for the stored-table rows, 0x55 at a page end) before the call.")
    p("")
    p("| case | errno | nent after | padding after |")
    p("| --- | --- | --- | --- |")
    for r in get_rows:
        p("| " + " | ".join(esc(x) for x in r) + " |")
    p("")
    p("## 7. KVM_SET_SREGS after KVM_SET_CPUID2")
    p("")
    p("A fresh vCPU, the table, then SET_SREGS from the reset state with CR4 = the one bit.")
    p("")
    cols = [*list(CR4_BITS), "x2APIC (apic_base 0xfee00d00)"]
    p("| table | " + " | ".join(f"CR4.{c}" if c in CR4_BITS else c for c in cols) + " |")
    p("| --- | " + " | ".join("---" for _ in cols) + " |")
    for r in sregs_rows:
        p(f"| {r['table']} | " + " | ".join(r[c] for c in cols) + " |")
    p("")
    p(
        "Long mode (CR0 0x80050033, CR4.PAE, EFER 0xd01, CS.L) after SET_CPUID2 with 0x80000000 "
        "(EAX 0x80000008) and 0x80000008 (MAXPHYADDR m, width 48): CR3 with bit m-1, and bit m."
    )
    p("")
    p("| MAXPHYADDR m | CR3 bit m-1 | CR3 bit m |")
    p("| --- | --- | --- |")
    for phys, ok, bad in cr3_rows:
        p(f"| {phys} | {ok} | {bad} |")
    p("")
    print("\n".join(out))

    if jpath:
        with open(jpath, "w") as f:
            json.dump(
                {
                    "kernel": uname.release,
                    "supported": sup,
                    "supported_rules": supported_rows,
                    "set_rules": set_rows,
                    "storage": storage,
                    "runtime": runtime,
                    "get_rules": get_rows,
                    "sregs": sregs_rows,
                    "cr3": cr3_rows,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
