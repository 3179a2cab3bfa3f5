#!/usr/bin/env python3
"""Probe what the real /dev/kvm does with the vCPU state ioctls
KVM_GET/SET_VCPU_EVENTS, KVM_GET/SET_DEBUGREGS and KVM_GET/SET_MP_STATE.

Standard library only (os, fcntl, struct).  Every case runs on a fresh VM with
fresh vCPUs.  The output is Markdown:

    python3 tools/probe_state.py > docs/device-state.md
    python3 tools/probe_state.py --json /tmp/state.json > docs/device-state.md

A case gives the errno of its last failing call (``0`` if every call was
accepted) and what the GET ioctls read back afterwards.  Read-backs list the
non-zero fields only (``exception.nr=0xe``); ``—`` means all zero.
"""

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
KVM_ENABLE_CAP = 0x4068AEA3
KVM_GET_REGS = 0x8090AE81
KVM_SET_REGS = 0x4090AE82
KVM_GET_SREGS = 0x8138AE83
KVM_SET_SREGS = 0x4138AE84
KVM_SET_CPUID2 = 0x4008AE90
KVM_GET_MP_STATE = 0x8004AE98
KVM_SET_MP_STATE = 0x4004AE99
KVM_GET_VCPU_EVENTS = 0x8040AE9F
KVM_SET_VCPU_EVENTS = 0x4040AEA0
KVM_GET_DEBUGREGS = 0x8080AEA1
KVM_SET_DEBUGREGS = 0x4080AEA2

CAP_EXCEPTION_PAYLOAD = 164
CAP_X86_TRIPLE_FAULT_EVENT = 218

NMI_PENDING, SIPI_VECTOR, SHADOW, SMM, PAYLOAD, TRIPLE_FAULT = 1, 2, 4, 8, 0x10, 0x20
MP_NAMES = {
    0: "RUNNABLE",
    1: "UNINITIALIZED",
    2: "INIT_RECEIVED",
    3: "HALTED",
    4: "SIPI_RECEIVED",
    5: "STOPPED",
    6: "CHECK_STOP",
    7: "OPERATING",
    8: "LOAD",
    9: "AP_RESET_HOLD",
    10: "SUSPENDED",
}

# ---------------------------------------------------------------- layouts
# kvm_vcpu_events (64 bytes): name, struct format, offset
EV_FIELDS = [
    ("exception.injected", "B", 0),
    ("exception.nr", "B", 1),
    ("exception.has_error_code", "B", 2),
    ("exception.pending", "B", 3),
    ("exception.error_code", "I", 4),
    ("interrupt.injected", "B", 8),
    ("interrupt.nr", "B", 9),
    ("interrupt.soft", "B", 10),
    ("interrupt.shadow", "B", 11),
    ("nmi.injected", "B", 12),
    ("nmi.pending", "B", 13),
    ("nmi.masked", "B", 14),
    ("nmi.pad", "B", 15),
    ("sipi_vector", "I", 16),
    ("flags", "I", 20),
    ("smi.smm", "B", 24),
    ("smi.pending", "B", 25),
    ("smi.smm_inside_nmi", "B", 26),
    ("smi.latched_init", "B", 27),
    ("triple_fault.pending", "B", 28),
    ("exception_has_payload", "B", 55),
    ("exception_payload", "Q", 56),
]
EV_SIZE = 64
RESERVED = range(29, 55)


def pack_events(d):
    buf = bytearray(EV_SIZE)
    for name, fmt, off in EV_FIELDS:
        struct.pack_into("<" + fmt, buf, off, d.get(name, 0))
    for i, b in enumerate(d.get("reserved", ())):
        buf[29 + i] = b
    return bytes(buf)


def unpack_events(buf):
    d = {name: struct.unpack_from("<" + fmt, buf, off)[0] for name, fmt, off in EV_FIELDS}
    res = [buf[i] for i in RESERVED]
    if any(res):
        d["reserved"] = res
    return d


def hx(v):
    if isinstance(v, int):
        return hex(v) if v >= 10 else str(v)
    return str(v)


def nz(d):
    """Non-zero fields as text, in field order."""
    parts = [f"{k}={hx(v)}" for k, v in d.items() if v]
    return ", ".join(parts) if parts else "—"


def inp(d):
    """A case's input as text."""
    if not d:
        return "(all zero)"
    return ", ".join(f"{k}={hx(v)}" for k, v in d.items())


def ename(e):
    return errno.errorcode.get(e, str(e)) if e else "0"


# ---------------------------------------------------------------- device access
class Dev:
    def __init__(self):
        self.kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        self.api = fcntl.ioctl(self.kvm, KVM_GET_API_VERSION, 0)
        self._cpuid = None

    def supported_cpuid(self):
        if self._cpuid is None:
            nent = 256
            buf = bytearray(8 + 40 * nent)
            struct.pack_into("<II", buf, 0, nent, 0)
            fcntl.ioctl(self.kvm, KVM_GET_SUPPORTED_CPUID, buf, True)
            n = struct.unpack_from("<I", buf, 0)[0]
            self._cpuid = bytes(buf[: 8 + 40 * n])
        return self._cpuid


def call(fd, req, arg):
    """ioctl; returns the errno (0 on success)."""
    try:
        fcntl.ioctl(fd, req, arg)
        return 0
    except OSError as e:
        return e.errno


class Vm:
    """A fresh VM: optional caps, optional irqchip, then vCPUs ``ids``."""

    def __init__(self, dev, irqchip=False, caps=(), ids=(0,)):
        self.dev = dev
        self.fd = fcntl.ioctl(dev.kvm, KVM_CREATE_VM, 0)
        for cap in caps:
            e = self.enable_cap(cap, 1)
            if e:
                raise RuntimeError(f"ENABLE_CAP {cap}: {ename(e)}")
        if irqchip:
            fcntl.ioctl(self.fd, KVM_CREATE_IRQCHIP, 0)
        self.vcpus = [fcntl.ioctl(self.fd, KVM_CREATE_VCPU, i) for i in ids]
        self.v = self.vcpus[0]

    def close(self):
        for f in self.vcpus:
            os.close(f)
        os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def enable_cap(self, cap, arg0):
        return call(self.fd, KVM_ENABLE_CAP, struct.pack("<II4Q64x", cap, 0, arg0, 0, 0, 0))

    # events
    def get_ev(self, v=None):
        buf = bytearray(EV_SIZE)
        fcntl.ioctl(self.v if v is None else v, KVM_GET_VCPU_EVENTS, buf, True)
        return unpack_events(buf)

    def set_ev(self, d, v=None):
        return call(self.v if v is None else v, KVM_SET_VCPU_EVENTS, pack_events(d))

    # debugregs
    def get_dr(self, v=None):
        buf = bytearray(128)
        fcntl.ioctl(self.v if v is None else v, KVM_GET_DEBUGREGS, buf, True)
        vals = struct.unpack("<16Q", buf)
        d = {f"db{i}": vals[i] for i in range(4)}
        d.update({"dr6": vals[4], "dr7": vals[5], "flags": vals[6]})
        if any(vals[7:]):
            d["reserved"] = list(vals[7:])
        return d

    def set_dr(self, db=(0, 0, 0, 0), dr6=0xFFFF0FF0, dr7=0x400, flags=0, reserved=(0,) * 9):
        return call(self.v, KVM_SET_DEBUGREGS, struct.pack("<16Q", *db, dr6, dr7, flags, *reserved))

    # mp_state
    def get_mp(self, v=None):
        buf = bytearray(4)
        fcntl.ioctl(self.v if v is None else v, KVM_GET_MP_STATE, buf, True)
        return struct.unpack("<I", buf)[0]

    def set_mp(self, state, v=None):
        return call(self.v if v is None else v, KVM_SET_MP_STATE, struct.pack("<I", state))

    # registers
    def get_sregs(self, v=None):
        buf = bytearray(312)
        fcntl.ioctl(self.v if v is None else v, KVM_GET_SREGS, buf, True)
        return buf

    def set_sregs(self, buf, v=None):
        return call(self.v if v is None else v, KVM_SET_SREGS, bytes(buf))

    def get_regs(self, v=None):
        buf = bytearray(144)
        fcntl.ioctl(self.v if v is None else v, KVM_GET_REGS, buf, True)
        return list(struct.unpack("<18Q", buf))

    def set_regs(self, regs, v=None):
        return call(self.v if v is None else v, KVM_SET_REGS, struct.pack("<18Q", *regs))


CRS = ["cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"]


def sregs_view(buf):
    base, limit, sel = struct.unpack_from("<QIH", buf, 0)
    d = {"cs.selector": sel, "cs.base": base, "cs.limit": limit}
    for i, n in enumerate(CRS):
        d[n] = struct.unpack_from("<Q", buf, 224 + 8 * i)[0]
    d["interrupt_bitmap"] = list(struct.unpack_from("<4Q", buf, 280))
    return d


def bitmap_text(bm):
    bits = [w * 64 + b for w in range(4) for b in range(64) if bm[w] >> b & 1]
    return "{" + ", ".join(hex(b) for b in bits) + "}"


# ---------------------------------------------------------------- case tables
RESULTS = []


def record(section, name, e, readback, **extra):
    r = {"section": section, "name": name, "errno": ename(e), "readback": readback, **extra}
    RESULTS.append(r)
    return r


def ev_case(dev, section, name, fields, irqchip=False, caps=()):
    """SET_VCPU_EVENTS(fields) on a fresh vCPU 0, then GET_VCPU_EVENTS."""
    with Vm(dev, irqchip=irqchip, caps=caps) as vm:
        e = vm.set_ev(fields)
        rb = vm.get_ev()
    return record(
        section,
        name,
        e,
        nz(rb),
        input=inp(fields),
        irqchip=irqchip,
        caps=[
            {CAP_EXCEPTION_PAYLOAD: "PAYLOAD", CAP_X86_TRIPLE_FAULT_EVENT: "TRIPLE"}[c]
            for c in caps
        ],
    )


def reset_values(dev):
    out = {}
    with Vm(dev) as vm:
        out["events"] = vm.get_ev()
        out["debugregs"] = vm.get_dr()
    with Vm(dev, caps=(CAP_EXCEPTION_PAYLOAD,)) as vm:
        out["events_payload_flags"] = vm.get_ev()["flags"]
    with Vm(dev, caps=(CAP_X86_TRIPLE_FAULT_EVENT,)) as vm:
        out["events_triple_flags"] = vm.get_ev()["flags"]
    for irq in (False, True):
        with Vm(dev, irqchip=irq, ids=(0, 1)) as vm:
            out[f"mp_irqchip={irq}"] = [vm.get_mp(v) for v in vm.vcpus]
            out[f"events_v1_irqchip={irq}"] = vm.get_ev(vm.vcpus[1])
            out[f"debugregs_v1_irqchip={irq}"] = vm.get_dr(vm.vcpus[1])
    return out


def flag_cases(dev):
    s = "flags"
    for bit in range(32):
        ev_case(dev, s, f"flag bit {bit} alone", {"flags": 1 << bit})
    ev_case(dev, s, "PAYLOAD with its cap", {"flags": PAYLOAD}, caps=(CAP_EXCEPTION_PAYLOAD,))
    ev_case(
        dev,
        s,
        "TRIPLE_FAULT with its cap",
        {"flags": TRIPLE_FAULT},
        caps=(CAP_X86_TRIPLE_FAULT_EVENT,),
    )
    ev_case(dev, s, "0xd (what GET gives)", {"flags": 0xD})
    ev_case(dev, s, "0xf", {"flags": 0xF})
    ev_case(
        dev,
        s,
        "0x3f, both caps",
        {"flags": 0x3F},
        caps=(CAP_EXCEPTION_PAYLOAD, CAP_X86_TRIPLE_FAULT_EVENT),
    )
    ev_case(
        dev,
        s,
        "0x37, both caps (no SMM)",
        {"flags": 0x37},
        caps=(CAP_EXCEPTION_PAYLOAD, CAP_X86_TRIPLE_FAULT_EVENT),
    )


EXCEPTION_INPUTS = [
    ("inject #UD", {"exception.injected": 1, "exception.nr": 6}),
    (
        "inject #GP(0x1234)",
        {
            "exception.injected": 1,
            "exception.nr": 13,
            "exception.has_error_code": 1,
            "exception.error_code": 0x1234,
        },
    ),
    ("inject vector 0", {"exception.injected": 1, "exception.nr": 0}),
    ("inject vector 31", {"exception.injected": 1, "exception.nr": 31}),
    ("inject vector 32", {"exception.injected": 1, "exception.nr": 32}),
    ("inject vector 255", {"exception.injected": 1, "exception.nr": 255}),
    ("inject vector 2 (NMI)", {"exception.injected": 1, "exception.nr": 2}),
    ("inject #BP (soft)", {"exception.injected": 1, "exception.nr": 3}),
    ("inject #OF (soft)", {"exception.injected": 1, "exception.nr": 4}),
    ("injected=2", {"exception.injected": 2, "exception.nr": 6}),
    (
        "has_error_code=3",
        {"exception.injected": 1, "exception.nr": 13, "exception.has_error_code": 3},
    ),
    (
        "not injected, vector 200, ec",
        {"exception.nr": 200, "exception.has_error_code": 1, "exception.error_code": 5},
    ),
    ("error_code only", {"exception.error_code": 0xDEAD}),
    (
        "pending #PF ec 7",
        {
            "exception.pending": 1,
            "exception.nr": 14,
            "exception.has_error_code": 1,
            "exception.error_code": 7,
        },
    ),
    ("pending vector 40", {"exception.pending": 1, "exception.nr": 40}),
    ("pending #BP", {"exception.pending": 1, "exception.nr": 3}),
    (
        "pending and injected #PF",
        {"exception.pending": 1, "exception.injected": 1, "exception.nr": 14},
    ),
    (
        "pending=2, has_payload=5",
        {
            "exception.pending": 2,
            "exception.nr": 6,
            "exception_has_payload": 5,
            "exception_payload": 1,
        },
    ),
    (
        "pending #PF with payload 0xdeadb000",
        {
            "exception.pending": 1,
            "exception.nr": 14,
            "exception.has_error_code": 1,
            "exception.error_code": 7,
            "exception_has_payload": 1,
            "exception_payload": 0xDEADB000,
        },
    ),
    (
        "pending and injected #PF with payload",
        {
            "exception.pending": 1,
            "exception.injected": 1,
            "exception.nr": 14,
            "exception_has_payload": 1,
            "exception_payload": 0xDEADB000,
        },
    ),
    (
        "injected #PF with payload",
        {
            "exception.injected": 1,
            "exception.nr": 14,
            "exception_has_payload": 1,
            "exception_payload": 0xDEADB000,
        },
    ),
    ("payload only, no has_payload", {"exception_payload": 0x1234}),
]


def exception_cases(dev):
    """Each input three ways: no cap; EXCEPTION_PAYLOAD enabled but no PAYLOAD flag; cap + flag."""
    rows = []
    for name, fields in EXCEPTION_INPUTS:
        row = {"name": name, "input": inp(fields)}
        with Vm(dev) as vm:
            e = vm.set_ev(fields)
            row["nocap"] = (ename(e), nz(vm.get_ev()))
        with Vm(dev, caps=(CAP_EXCEPTION_PAYLOAD,)) as vm:
            e = vm.set_ev(fields)
            row["cap"] = (ename(e), nz(vm.get_ev()))
        with Vm(dev, caps=(CAP_EXCEPTION_PAYLOAD,)) as vm:
            e = vm.set_ev(dict(fields, flags=PAYLOAD))
            row["cap+flag"] = (ename(e), nz(vm.get_ev()))
        rows.append(row)
    return rows


def interrupt_nmi_cases(dev):
    s = "interrupt, shadow, NMI"
    c = lambda name, f, **kw: ev_case(dev, s, name, f, **kw)  # noqa: E731
    c("interrupt injected 0x20", {"interrupt.injected": 1, "interrupt.nr": 0x20})
    c("interrupt injected 0", {"interrupt.injected": 1, "interrupt.nr": 0})
    c("interrupt injected 0xff", {"interrupt.injected": 1, "interrupt.nr": 0xFF})
    c("interrupt injected=2", {"interrupt.injected": 2, "interrupt.nr": 0x41})
    c("interrupt not injected, nr 0x33", {"interrupt.nr": 0x33})
    c("soft interrupt 0x80", {"interrupt.injected": 1, "interrupt.nr": 0x80, "interrupt.soft": 1})
    c("soft=2", {"interrupt.injected": 1, "interrupt.nr": 0x80, "interrupt.soft": 2})
    c("soft, not injected", {"interrupt.nr": 0x33, "interrupt.soft": 1})
    c("shadow 1 without SHADOW", {"interrupt.shadow": 1})
    for sh in (0, 1, 2, 3, 4, 0x80, 0xFF):
        c(f"shadow {hx(sh)} with SHADOW", {"flags": SHADOW, "interrupt.shadow": sh})
    c("nmi injected", {"nmi.injected": 1})
    c("nmi injected=5", {"nmi.injected": 5})
    c("nmi masked", {"nmi.masked": 1})
    c("nmi masked=7", {"nmi.masked": 7})
    c("nmi pad=9", {"nmi.pad": 9})
    c("nmi pending 1 without NMI_PENDING", {"nmi.pending": 1})
    for p in (1, 2, 3, 5, 255):
        c(f"nmi pending {p}", {"flags": NMI_PENDING, "nmi.pending": p})
    c("nmi pending 2, masked", {"flags": NMI_PENDING, "nmi.pending": 2, "nmi.masked": 1})
    c("nmi pending 2, injected", {"flags": NMI_PENDING, "nmi.pending": 2, "nmi.injected": 1})
    c(
        "nmi pending 1, masked, injected",
        {"flags": NMI_PENDING, "nmi.pending": 1, "nmi.masked": 1, "nmi.injected": 1},
    )


def smm_sipi_tf_cases(dev):
    s = "SMM, SIPI, latched INIT, triple fault, reserved"
    c = lambda name, f, **kw: ev_case(dev, s, name, f, **kw)  # noqa: E731
    c("SMM smm=1", {"flags": SMM, "smi.smm": 1})
    c("SMM pending=1", {"flags": SMM, "smi.pending": 1})
    c("SMM smm_inside_nmi=1", {"flags": SMM, "smi.smm_inside_nmi": 1})
    c("smm=1 without SMM flag", {"smi.smm": 1})
    c("SMM latched_init=1", {"flags": SMM, "smi.latched_init": 1})
    c("SMM latched_init=1, irqchip", {"flags": SMM, "smi.latched_init": 1}, irqchip=True)
    c("SMM latched_init=2, irqchip", {"flags": SMM, "smi.latched_init": 2}, irqchip=True)
    c("latched_init=1 without SMM flag, irqchip", {"smi.latched_init": 1}, irqchip=True)
    c("sipi_vector 0x12 without flag", {"sipi_vector": 0x12})
    c("SIPI_VECTOR 0x12", {"flags": SIPI_VECTOR, "sipi_vector": 0x12})
    c("SIPI_VECTOR 0x12, irqchip", {"flags": SIPI_VECTOR, "sipi_vector": 0x12}, irqchip=True)
    c(
        "TRIPLE_FAULT pending",
        {"flags": TRIPLE_FAULT, "triple_fault.pending": 1},
        caps=(CAP_X86_TRIPLE_FAULT_EVENT,),
    )
    c("TRIPLE_FAULT pending=0", {"flags": TRIPLE_FAULT}, caps=(CAP_X86_TRIPLE_FAULT_EVENT,))
    c(
        "triple_fault.pending without flag",
        {"triple_fault.pending": 1},
        caps=(CAP_X86_TRIPLE_FAULT_EVENT,),
    )
    c("triple_fault.pending without flag or cap", {"triple_fault.pending": 1})
    c("reserved bytes all 0xff", {"reserved": [0xFF] * 26})


FULL = {
    "exception.injected": 1,
    "exception.nr": 6,
    "interrupt.injected": 1,
    "interrupt.nr": 0x20,
    "interrupt.shadow": 2,
    "nmi.injected": 1,
    "nmi.masked": 1,
    "nmi.pending": 1,
}


def partial_cases(dev):
    """A SET that fails: which of its fields were applied anyway?"""
    s = "failing SETs: what was applied"
    c = lambda name, f, **kw: ev_case(dev, s, name, f, **kw)  # noqa: E731
    c("flag 0x40", dict(FULL, flags=0x40 | SHADOW | NMI_PENDING))
    c("PAYLOAD without cap", dict(FULL, flags=PAYLOAD | SHADOW | NMI_PENDING))
    c("injected vector 40", dict(FULL, flags=SHADOW | NMI_PENDING, **{"exception.nr": 40}))
    c("SMM smm=1", dict(FULL, flags=SMM | SHADOW | NMI_PENDING, **{"smi.smm": 1}))
    c("TRIPLE_FAULT without cap", dict(FULL, flags=TRIPLE_FAULT | SHADOW | NMI_PENDING))
    c(
        "SMM smm=1, SIPI_VECTOR 5, irqchip",
        dict(
            FULL,
            flags=SMM | SIPI_VECTOR | SHADOW | NMI_PENDING,
            sipi_vector=5,
            **{"smi.pending": 1},
        ),
        irqchip=True,
    )
    c(
        "SMM smm=1 + latched_init, irqchip",
        {"flags": SMM, "smi.smm": 1, "smi.latched_init": 1},
        irqchip=True,
    )
    c(
        "TRIPLE_FAULT w/o cap + SMM latched_init, irqchip",
        {"flags": SMM | TRIPLE_FAULT, "smi.latched_init": 1},
        irqchip=True,
    )


# ---- sequences: several ioctls, one VM ----
SEQ = []


def seq(name, irqchip=False, caps=(), ids=(0,)):
    def deco(fn):
        SEQ.append((name, irqchip, caps, ids, fn))
        return fn

    return deco


def ev_nz(vm, v=None):
    return nz(vm.get_ev(v))


@seq("NMI: pending 2 while masked, then SET unmasked without NMI_PENDING")
def _s1(vm):
    return [
        vm.set_ev({"flags": NMI_PENDING, "nmi.masked": 1, "nmi.pending": 2}),
        vm.set_ev({}),
    ], ev_nz(vm)


@seq("NMI: pending 2 unmasked, SET masked, SET unmasked")
def _s2(vm):
    e = [vm.set_ev({"flags": NMI_PENDING, "nmi.pending": 2}), vm.set_ev({"nmi.masked": 1})]
    a = vm.get_ev()["nmi.pending"]
    e.append(vm.set_ev({}))
    return e, f"after mask: nmi.pending={a}; after unmask: {ev_nz(vm)}"


@seq("NMI: pending 2 masked, then NMI_PENDING with 0")
def _s3(vm):
    return [
        vm.set_ev({"flags": NMI_PENDING, "nmi.masked": 1, "nmi.pending": 2}),
        vm.set_ev({"flags": NMI_PENDING}),
    ], ev_nz(vm)


def _pf_payload():
    return {
        "flags": PAYLOAD,
        "exception.pending": 1,
        "exception.nr": 14,
        "exception.has_error_code": 1,
        "exception.error_code": 2,
        "exception_has_payload": 1,
        "exception_payload": 0xDEADB000,
    }


@seq(
    "pending #PF + payload with the cap, cap turned off (args[0]=0), GET, GET, cap on, GET",
    caps=(CAP_EXCEPTION_PAYLOAD,),
)
def _s4(vm):
    e = [vm.set_ev(_pf_payload()), vm.enable_cap(CAP_EXCEPTION_PAYLOAD, 0)]
    a = ev_nz(vm)
    cr2 = sregs_view(vm.get_sregs())["cr2"]
    b = ev_nz(vm)
    e.append(vm.enable_cap(CAP_EXCEPTION_PAYLOAD, 1))
    return e, f"1st GET: {a}; CR2={hx(cr2)}; 2nd GET: {b}; cap on again: {ev_nz(vm)}"


@seq(
    "pending #DB payload 0x4002, DR6 0xffff0ff0, cap turned off, GET", caps=(CAP_EXCEPTION_PAYLOAD,)
)
def _s5(vm):
    e = [
        vm.set_dr(dr6=0xFFFF0FF0),
        vm.set_ev(
            {
                "flags": PAYLOAD,
                "exception.pending": 1,
                "exception.nr": 1,
                "exception_has_payload": 1,
                "exception_payload": 0x4002,
            }
        ),
        vm.enable_cap(CAP_EXCEPTION_PAYLOAD, 0),
    ]
    a = ev_nz(vm)
    return e, f"{a}; DR6={hx(vm.get_dr()['dr6'])}"


@seq("pending #DB payload 0x1f00f, DR6 0x1234f, cap turned off, GET", caps=(CAP_EXCEPTION_PAYLOAD,))
def _s6(vm):
    e = [
        vm.set_dr(dr6=0x1234F),
        vm.set_ev(
            {
                "flags": PAYLOAD,
                "exception.pending": 1,
                "exception.nr": 1,
                "exception_has_payload": 1,
                "exception_payload": 0x1F00F,
            }
        ),
        vm.enable_cap(CAP_EXCEPTION_PAYLOAD, 0),
    ]
    a = ev_nz(vm)
    return e, f"{a}; DR6={hx(vm.get_dr()['dr6'])}"


@seq(
    "triple fault pending with the cap, cap turned off, GET, cap on, GET",
    caps=(CAP_X86_TRIPLE_FAULT_EVENT,),
)
def _s7(vm):
    e = [
        vm.set_ev({"flags": TRIPLE_FAULT, "triple_fault.pending": 1}),
        vm.enable_cap(CAP_X86_TRIPLE_FAULT_EVENT, 0),
    ]
    a = ev_nz(vm)
    e.append(vm.enable_cap(CAP_X86_TRIPLE_FAULT_EVENT, 1))
    return e, f"cap off: {a}; cap on: {ev_nz(vm)}"


def _bitmap(vm, words):
    s = vm.get_sregs()
    struct.pack_into("<4Q", s, 280, *words)
    return vm.set_sregs(s)


def _bm_and_ev(vm):
    return (
        f"bitmap {bitmap_text(sregs_view(vm.get_sregs())['interrupt_bitmap'])}; events {ev_nz(vm)}"
    )


@seq("SET_SREGS bitmap bits 0x44 and 0xff")
def _s8(vm):
    return [_bitmap(vm, (0, 0x30, 0, 1 << 63))], _bm_and_ev(vm)


@seq("SET_SREGS bit 0x44, then SET_SREGS with an empty bitmap")
def _s9(vm):
    return [_bitmap(vm, (0, 0x10, 0, 0)), _bitmap(vm, (0, 0, 0, 0))], _bm_and_ev(vm)


@seq("SET_SREGS bit 0x44, then SET_VCPU_EVENTS interrupt nr 0x77 not injected")
def _s10(vm):
    return [_bitmap(vm, (0, 0x10, 0, 0)), vm.set_ev({"interrupt.nr": 0x77})], _bm_and_ev(vm)


@seq("SET_VCPU_EVENTS injected 0xff, GET_SREGS")
def _s11(vm):
    return [vm.set_ev({"interrupt.injected": 1, "interrupt.nr": 0xFF})], _bm_and_ev(vm)


@seq("SET_VCPU_EVENTS soft 0x99, SET_SREGS(GET_SREGS), then SET_SREGS bit 0x99")
def _s12(vm):
    e = [vm.set_ev({"interrupt.injected": 1, "interrupt.nr": 0x99, "interrupt.soft": 1})]
    e.append(vm.set_sregs(vm.get_sregs()))
    a = _bm_and_ev(vm)
    e.append(_bitmap(vm, (0, 0, 1 << 0x19, 0)))
    return e, f"after the round trip: {a}; after the bit: {_bm_and_ev(vm)}"


@seq("SET_SREGS bit 0x20, then SET_VCPU_EVENTS soft 0x20")
def _s13(vm):
    return [
        _bitmap(vm, (1 << 0x20, 0, 0, 0)),
        vm.set_ev({"interrupt.injected": 1, "interrupt.nr": 0x20, "interrupt.soft": 1}),
    ], _bm_and_ev(vm)


def event_sequences(dev):
    rows = []
    for name, irqchip, caps, ids, fn in SEQ:
        with Vm(dev, irqchip=irqchip, caps=caps, ids=ids) as vm:
            es, rb = fn(vm)
        rows.append({"name": name, "errnos": ", ".join(ename(e) for e in es), "readback": rb})
    return rows


# ---------------------------------------------------------------- debugregs
def debugregs_cases(dev):
    s = "debugregs"
    rows = [
        ("reset values (no SET)", None),
        ("SET of the reset values", {}),
        ("flags=1", {"flags": 1}),
        ("flags=0x80", {"flags": 0x80}),
        ("flags=bit 63", {"flags": 1 << 63}),
        ("dr6 bit 32", {"dr6": 1 << 32}),
        ("dr6 bit 63", {"dr6": 1 << 63}),
        ("dr7 bit 32", {"dr7": 1 << 32}),
        ("dr7 bit 63", {"dr7": 1 << 63}),
        ("dr6=0, dr7=0", {"dr6": 0, "dr7": 0}),
        ("dr6=0xffffffff, dr7=0xffffffff", {"dr6": 0xFFFFFFFF, "dr7": 0xFFFFFFFF}),
        ("dr6=0x1234, dr7=0xabcd", {"dr6": 0x1234, "dr7": 0xABCD}),
        ("dr6=0xffff0ff1", {"dr6": 0xFFFF0FF1}),
        ("dr7=0xffff0000", {"dr7": 0xFFFF0000}),
        ("db0=0x1234, dr7=0x401", {"db": (0x1234, 0, 0, 0), "dr7": 0x401}),
        (
            "db = all ones, bit 63, non-canonical",
            {"db": ((1 << 64) - 1, 1 << 63, 0x8000000000000, 0xFFFF800000000000)},
        ),
        ("reserved[] = 1..9", {"reserved": tuple(range(1, 10))}),
        ("dr7 bit 32 with db set (failing SET)", {"db": (1, 2, 3, 4), "dr6": 0, "dr7": 1 << 32}),
    ]
    for name, kw in rows:
        with Vm(dev) as vm:
            e = 0 if kw is None else vm.set_dr(**kw)
            rb = vm.get_dr()
        text = ", ".join(
            f"{k}={hx(v)}" if not isinstance(v, list) else f"{k}={[hx(x) for x in v]}"
            for k, v in rb.items()
        )
        if kw is None:
            given = "(no SET)"
        elif not kw:
            given = "(reset values)"
        else:
            given = ", ".join(
                f"{k}={hx(v)}" if isinstance(v, int) else f"{k}={[hx(x) for x in v]}"
                for k, v in kw.items()
            )
        record(s, name, e, text, input=given)


# ---------------------------------------------------------------- mp_state
def mp_sweep(dev):
    rows = []
    for state in range(13):
        row = {"state": state, "name": MP_NAMES.get(state, "")}
        for irq in (False, True):
            for vid in (0, 1):
                with Vm(dev, irqchip=irq, ids=(0, 1)) as vm:
                    v = vm.vcpus[vid]
                    e = vm.set_mp(state, v)
                    row[(irq, vid)] = (ename(e), vm.get_mp(v))
        rows.append(row)
    return rows


MSEQ = []


def mseq(name, irqchip=True, vid=1, cpuid=False):
    def deco(fn):
        MSEQ.append((name, irqchip, vid, cpuid, fn))
        return fn

    return deco


def _cs_rip(vm, v):
    s = sregs_view(vm.get_sregs(v))
    return f"CS {hx(s['cs.selector'])}/{hx(s['cs.base'])}, RIP {hx(vm.get_regs(v)[16])}"


def _mp(vm, v):
    return MP_NAMES.get(vm.get_mp(v), "?")


@mseq("SIPI_RECEIVED, vector 0x12 (SIPI_VECTOR), GET_SREGS/REGS, GET_MP_STATE, GET_SREGS/REGS")
def _m1(vm, v):
    e = [vm.set_ev({"flags": SIPI_VECTOR, "sipi_vector": 0x12}, v), vm.set_mp(4, v)]
    a = _cs_rip(vm, v)
    return e, f"before GET: {a}; GET: {_mp(vm, v)}; after: {_cs_rip(vm, v)}"


@mseq("SIPI_RECEIVED on vCPU 0 (BSP), vector 0x12", vid=0)
def _m2(vm, v):
    e = [vm.set_ev({"flags": SIPI_VECTOR, "sipi_vector": 0x12}, v), vm.set_mp(4, v)]
    return e, f"GET: {_mp(vm, v)}; {_cs_rip(vm, v)}"


@mseq("SIPI_RECEIVED without a SIPI vector")
def _m3(vm, v):
    return [vm.set_mp(4, v)], f"GET: {_mp(vm, v)}; {_cs_rip(vm, v)}"


@mseq("SIPI vector 0x1ab, SIPI_RECEIVED")
def _m4(vm, v):
    e = [vm.set_ev({"flags": SIPI_VECTOR, "sipi_vector": 0x1AB}, v), vm.set_mp(4, v)]
    return e, f"GET: {_mp(vm, v)}; {_cs_rip(vm, v)}"


@mseq("SIPI vector 0x30, SIPI_RECEIVED, HALTED")
def _m5(vm, v):
    e = [
        vm.set_ev({"flags": SIPI_VECTOR, "sipi_vector": 0x30}, v),
        vm.set_mp(4, v),
        vm.set_mp(3, v),
    ]
    return e, f"GET: {_mp(vm, v)}; {_cs_rip(vm, v)}"


@mseq("SIPI vector 0x30, SIPI_RECEIVED, INIT_RECEIVED")
def _m6(vm, v):
    e = [
        vm.set_ev({"flags": SIPI_VECTOR, "sipi_vector": 0x30}, v),
        vm.set_mp(4, v),
        vm.set_mp(2, v),
    ]
    return e, f"GET: {_mp(vm, v)}; {_cs_rip(vm, v)}"


@mseq("INIT_RECEIVED, GET")
def _m7(vm, v):
    return [vm.set_mp(2, v)], f"GET: {_mp(vm, v)}; {_cs_rip(vm, v)}"


def _dirty(vm, v):
    s = vm.get_sregs(v)
    struct.pack_into("<QIH", s, 0, 0x1000, 0xFFFFF, 0x8)
    for i, val in ((0, 0x60000011), (1, 0x1234), (2, 0x5000), (3, 0x20), (4, 5), (5, 0x800)):
        struct.pack_into("<Q", s, 224 + 8 * i, val)
    e = [vm.set_sregs(s, v)]
    r = vm.get_regs(v)
    r[0], r[16], r[17] = 0x55, 0x1000, 0x202
    e.append(vm.set_regs(r, v))
    return e


def _after_init(vm, v):
    s = sregs_view(vm.get_sregs(v))
    r = vm.get_regs(v)
    regs = ", ".join(
        f"{n}={hx(x)}"
        for n, x in zip(("rax", "rdx", "rip", "rflags"), (r[0], r[3], r[16], r[17]), strict=True)
    )
    crs = ", ".join(f"{n}={hx(s[n])}" for n in CRS)
    return f"{crs}; CS {hx(s['cs.selector'])}/{hx(s['cs.base'])}; {regs}; events {ev_nz(vm, v)}"


FULL_EV = {
    "flags": SMM | SHADOW | NMI_PENDING,
    "exception.injected": 1,
    "exception.nr": 13,
    "exception.has_error_code": 1,
    "exception.error_code": 0x77,
    "exception_payload": 0x99,
    "interrupt.injected": 1,
    "interrupt.nr": 0x40,
    "interrupt.shadow": 1,
    "nmi.injected": 1,
    "nmi.masked": 1,
    "nmi.pending": 1,
    "smi.latched_init": 1,
}


@mseq("dirty state, latched INIT (SMM flag) with every event set, GET_MP_STATE (AP)")
def _m8(vm, v):
    e = [*_dirty(vm, v), vm.set_ev(FULL_EV, v)]
    a = ev_nz(vm, v)
    before = _mp(vm, v)
    return e, f"events before: {a}; GET: {before}; after: {_after_init(vm, v)}"


@mseq("dirty state + debug registers, latched INIT, GET_MP_STATE (BSP)", vid=0)
def _m9(vm, v):
    e = [
        *_dirty(vm, v),
        vm.set_dr(db=(1, 2, 3, 4), dr6=0xFFFF0FF1, dr7=0x401),
        vm.set_ev(FULL_EV, v),
    ]
    st = _mp(vm, v)
    dr = vm.get_dr()
    return (
        e,
        f"GET: {st}; {_after_init(vm, v)}; "
        f"DR6={hx(dr['dr6'])}, DR7={hx(dr['dr7'])}, DB0={hx(dr['db0'])}",
    )


@mseq("latched INIT on vCPU 0 whose apic_base has BSP cleared", vid=0)
def _m10(vm, v):
    s = vm.get_sregs(v)
    struct.pack_into("<Q", s, 272, 0xFEE00800)
    e = [vm.set_sregs(s, v), vm.set_ev({"flags": SMM, "smi.latched_init": 1}, v)]
    return e, f"GET: {_mp(vm, v)}; apic_base {hx(sregs_view(vm.get_sregs(v))['apic_base'])}"


@mseq("KVM_SET_CPUID2(supported), latched INIT (RDX)", cpuid=True)
def _m11(vm, v):
    before = vm.get_regs(v)[3]
    e = [vm.set_ev({"flags": SMM, "smi.latched_init": 1}, v)]
    return e, f"RDX before {hx(before)}; GET: {_mp(vm, v)}; RDX after {hx(vm.get_regs(v)[3])}"


@mseq("SIPI vector 0x20, SIPI_RECEIVED, latched INIT (AP)")
def _m12(vm, v):
    e = [
        vm.set_ev({"flags": SIPI_VECTOR, "sipi_vector": 0x20}, v),
        vm.set_mp(4, v),
        vm.set_ev({"flags": SMM, "smi.latched_init": 1}, v),
    ]
    return e, f"GET: {_mp(vm, v)}; {_cs_rip(vm, v)}"


@mseq("SIPI vector 0x20, SIPI_RECEIVED, latched INIT (BSP)", vid=0)
def _m13(vm, v):
    e = [
        vm.set_ev({"flags": SIPI_VECTOR, "sipi_vector": 0x20}, v),
        vm.set_mp(4, v),
        vm.set_ev({"flags": SMM, "smi.latched_init": 1}, v),
    ]
    return e, f"GET: {_mp(vm, v)}; {_cs_rip(vm, v)}"


@mseq("latched INIT, then SMM flag with latched_init=0, GET")
def _m14(vm, v):
    e = [vm.set_ev({"flags": SMM, "smi.latched_init": 1}, v)]
    a = vm.get_ev(v)["smi.latched_init"]
    e.append(vm.set_ev({"flags": SMM}, v))
    return (
        e,
        f"latched_init after 1st SET: {a}; "
        f"after 2nd: {vm.get_ev(v)['smi.latched_init']}; GET: {_mp(vm, v)}",
    )


@mseq("latched INIT, then SET_MP_STATE INIT_RECEIVED / SIPI_RECEIVED / RUNNABLE")
def _m15(vm, v):
    e = [
        vm.set_ev({"flags": SMM, "smi.latched_init": 1}, v),
        vm.set_mp(2, v),
        vm.set_mp(4, v),
        vm.set_mp(0, v),
    ]
    return e, f"GET: {_mp(vm, v)}; {_cs_rip(vm, v)}"


@mseq("HALTED, SET_SREGS(GET_SREGS) on the reset state (vCPU 0)", vid=0)
def _m16(vm, v):
    return [vm.set_mp(3, v), vm.set_sregs(vm.get_sregs(v), v)], f"GET: {_mp(vm, v)}"


@mseq("HALTED, SET_SREGS(GET_SREGS) on the reset state (vCPU 1)")
def _m17(vm, v):
    return [vm.set_mp(3, v), vm.set_sregs(vm.get_sregs(v), v)], f"GET: {_mp(vm, v)}"


@mseq("HALTED, SET_SREGS with CR0.PE (vCPU 0)", vid=0)
def _m18(vm, v):
    s = vm.get_sregs(v)
    struct.pack_into("<Q", s, 224, 0x60000011)
    return [vm.set_mp(3, v), vm.set_sregs(s, v)], f"GET: {_mp(vm, v)}"


def mp_sequences(dev):
    rows = []
    for name, irqchip, vid, cpuid, fn in MSEQ:
        with Vm(dev, irqchip=irqchip, ids=(0, 1)) as vm:
            v = vm.vcpus[vid]
            if cpuid:
                fcntl.ioctl(v, KVM_SET_CPUID2, bytearray(dev.supported_cpuid()), True)
            es, rb = fn(vm, v)
        rows.append({"name": name, "errnos": ", ".join(ename(e) for e in es), "readback": rb})
    return rows


# ---------------------------------------------------------------- bad pointers
def pointer_cases(dev):
    s = "bad pointers"
    for name, req in (
        ("GET_VCPU_EVENTS", KVM_GET_VCPU_EVENTS),
        ("SET_VCPU_EVENTS", KVM_SET_VCPU_EVENTS),
        ("GET_DEBUGREGS", KVM_GET_DEBUGREGS),
        ("SET_DEBUGREGS", KVM_SET_DEBUGREGS),
        ("GET_MP_STATE", KVM_GET_MP_STATE),
        ("SET_MP_STATE", KVM_SET_MP_STATE),
    ):
        for ptr in (0, 0x10):
            with Vm(dev) as vm:
                e = call(vm.v, req, ptr)
            record(s, f"{name} pointer {hx(ptr)}", e, "", input=hx(ptr))


# ---------------------------------------------------------------- output
SUMMARY = [
    "**VCPU_EVENTS flags:** SET accepts NMI_PENDING (1), SIPI_VECTOR (2), SHADOW (4), SMM (8), "
    "PAYLOAD (0x10) and TRIPLE_FAULT (0x20); any other bit is EINVAL. PAYLOAD needs "
    "KVM_CAP_EXCEPTION_PAYLOAD (164) and TRIPLE_FAULT needs KVM_CAP_X86_TRIPLE_FAULT_EVENT (218) "
    "enabled on the VM, else EINVAL. GET gives 0xd, plus 0x10 / 0x20 while the caps are on.",
    "**Exceptions:** an injected (or, with PAYLOAD, pending) exception with nr > 31 or nr = 2 is "
    "EINVAL. Without the PAYLOAD flag, `pending` and `exception_has_payload` are ignored: a "
    "pending exception is accepted and dropped (only nr / has_error_code / error_code read "
    "back). With PAYLOAD, pending clears injected, and a non-pending exception loses "
    "has_payload. The payload value itself is always stored. #BP and #OF never read back as "
    "injected or pending. Booleans read back as 0/1.",
    "**Payload delivery:** if the cap is turned off (args[0]=0) while a pending exception has a "
    "payload, the next GET delivers it (CR2 for #PF, DR6 for #DB) and reports the exception as "
    "injected and pending.",
    "**Interrupt:** injected/nr/soft; a soft interrupt reads back not injected (soft always "
    "reads 0). It is the same interrupt as KVM_GET/SET_SREGS.interrupt_bitmap: an injected "
    "non-soft interrupt shows as its bit; SET_SREGS with bits injects the lowest one; an empty "
    "bitmap changes nothing.",
    "**Shadow:** only with SHADOW; the byte is stored raw (3, 4, 0x80, 0xff read back as set) — "
    "a PVM artifact: KVM on Intel keeps MOV-SS (1) or STI (2) only, KVM on AMD reads any "
    "non-zero value back as 3.",
    "**NMI:** injected/masked are booleans; pending needs NMI_PENDING and is limited to 2, or 1 "
    "while masked or injected, applied at every GET and at the start of every SET.",
    "**SMM:** the SMM flag alone is fine, but smi.smm / pending / smm_inside_nmi non-zero is "
    "EINVAL (no SMM here); that check comes *after* the exception, interrupt, shadow, NMI and "
    "SIPI vector were written, and so does the TRIPLE_FAULT cap check: those failing SETs still "
    "change the state. smi.latched_init (with the SMM flag and an irqchip) latches an INIT that "
    "GET reports and GET_MP_STATE processes.",
    "**DEBUGREGS:** flags ≠ 0, DR6 or DR7 bits 63:32 → EINVAL (nothing changed). Everything "
    "else is stored raw: DR6=0 and DR7=0 read back 0; db[] any 64-bit value; reserved[] "
    "ignored. Reset: db = 0, DR6 = 0xffff0ff0, DR7 = 0x400.",
    "**MP_STATE:** without irqchip only RUNNABLE (others EINVAL); with irqchip UNINITIALIZED, "
    "INIT_RECEIVED, HALTED, AP_RESET_HOLD read back; SIPI_RECEIVED is stored as INIT_RECEIVED "
    "plus a pending SIPI that GET_MP_STATE delivers (CS = vector<<8 / vector<<12, RIP 0, "
    "RUNNABLE) — upstream KVM does exactly this, it is not a PVM artifact. STOPPED, "
    "CHECK_STOP, OPERATING, LOAD, SUSPENDED and 11+ → EINVAL. Initial: RUNNABLE, except "
    "UNINITIALIZED for vCPU 1 with an irqchip.",
    "**INIT:** a latched INIT resets registers, segments, CR0 (keeping CD/NW), CR2-CR4, CR8, "
    "EFER, debug registers and the event queues (exception nr/ec/payload and interrupt nr "
    "stay), keeps apic_base, and leaves a BSP (apic_base.BSP) RUNNABLE and an AP INIT_RECEIVED; "
    "RDX becomes CPUID.1.EAX after KVM_SET_CPUID2.",
    "**SET_SREGS unhalts the BSP** when it sets the reset entry point (RIP 0xfff0, CS "
    "0xf000/0xffff0000, CR0.PE clear).",
]


def esc(s):
    return str(s).replace("|", "\\|")


def main():
    jpath = None
    if "--json" in sys.argv:
        jpath = sys.argv[sys.argv.index("--json") + 1]
    dev = Dev()
    uname = os.uname()
    t0 = time.time()

    reset = reset_values(dev)
    flag_cases(dev)
    exc = exception_cases(dev)
    interrupt_nmi_cases(dev)
    smm_sipi_tf_cases(dev)
    partial_cases(dev)
    evseq = event_sequences(dev)
    debugregs_cases(dev)
    mps = mp_sweep(dev)
    mpseq = mp_sequences(dev)
    pointer_cases(dev)
    elapsed = time.time() - t0

    p = print
    p("# The real /dev/kvm: KVM_GET/SET_VCPU_EVENTS, KVM_GET/SET_DEBUGREGS, KVM_GET/SET_MP_STATE")
    p()
    p(f"* kernel: `{uname.release}` ({uname.machine}), KVM API {dev.api}")
    p(f"* date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    n = len(RESULTS) + 3 * len(exc) + len(evseq) + 4 * len(mps) + len(mpseq)
    p(f"* cases: {n}; {elapsed:.1f} s")
    p(
        "* generated by `python3 tools/probe_state.py > docs/device-state.md` (standard library "
        "only; needs read/write access to /dev/kvm)."
    )
    p()
    p(
        "Every case uses a fresh VM (KVM_ENABLE_CAP and KVM_CREATE_IRQCHIP first when the case "
        "says so) and fresh vCPUs. The result is the errno of the call (`0` = accepted; for "
        "sequences, one errno per SET in order) and what the GET ioctls read back afterwards: "
        "the non-zero fields only (`—` = all zero). Struct fields are named as in "
        "`<linux/kvm.h>`."
    )
    p()
    p("## Summary")
    p()
    p(
        "Written by hand from the run on kernel `6.18.44` (PVM host, AMD EPYC); the tables "
        "below are what this run measured, so compare them with it after a re-run. The "
        "simulator (`rust/core/src/vcpu/{events,debugregs,mp_state}.rs`) follows every row; the "
        "one rule it cannot show yet is the SET_SREGS unhalt (the hook is not called by "
        "`Vcpu::set_sregs`)."
    )
    p()
    for line in SUMMARY:
        p(f"* {line}")
    p()

    p("## 1. Reset values")
    p()
    p(f"* KVM_GET_VCPU_EVENTS, vCPU 0: {nz(reset['events'])}")
    p(f"* with KVM_CAP_EXCEPTION_PAYLOAD: flags={hx(reset['events_payload_flags'])}")
    p(f"* with KVM_CAP_X86_TRIPLE_FAULT_EVENT: flags={hx(reset['events_triple_flags'])}")
    for irq in (False, True):
        p(f"* vCPU 1, irqchip={irq}: events {nz(reset[f'events_v1_irqchip={irq}'])}")
    dr = reset["debugregs"]
    p(
        f"* KVM_GET_DEBUGREGS: {', '.join(f'{k}={hx(v)}' for k, v in dr.items())} "
        f"(vCPU 1 the same: {reset['debugregs_v1_irqchip=False'] == dr})"
    )
    for irq in (False, True):
        names = [MP_NAMES[s] for s in reset[f"mp_irqchip={irq}"]]
        p(f"* KVM_GET_MP_STATE, irqchip={irq}: vCPU 0 {names[0]}, vCPU 1 {names[1]}")
    p()

    def table(section, title, note=""):
        p(f"## {title}")
        p()
        if note:
            p(note)
            p()
        p("| case | input | irqchip / caps | errno | read-back |")
        p("| --- | --- | --- | --- | --- |")
        for r in RESULTS:
            if r["section"] != section:
                continue
            ctx = ", ".join((["irqchip"] if r.get("irqchip") else []) + r.get("caps", [])) or "—"
            p(
                f"| {esc(r['name'])} | {esc(r.get('input', ''))} | {ctx} | "
                f"{r['errno']} | {esc(r['readback'])} |"
            )
        p()

    table(
        "flags",
        "2. KVM_SET_VCPU_EVENTS flags",
        "Every flag bit alone (no caps unless said), then combinations.",
    )

    p("## 3. Exceptions")
    p()
    p(
        "Each input three ways: **no cap**; **cap** = KVM_CAP_EXCEPTION_PAYLOAD enabled but the "
        "PAYLOAD flag not given; **cap+flag** = enabled and flags=PAYLOAD. Each cell: errno; "
        "read-back."
    )
    p()
    p("| case | input | no cap | cap | cap+flag |")
    p("| --- | --- | --- | --- | --- |")
    for r in exc:
        cells = " | ".join(f"{r[k][0]}; {esc(r[k][1])}" for k in ("nocap", "cap", "cap+flag"))
        p(f"| {esc(r['name'])} | {esc(r['input'])} | {cells} |")
    p()
    table("interrupt, shadow, NMI", "4. Interrupt, shadow, NMI")
    table(
        "SMM, SIPI, latched INIT, triple fault, reserved",
        "5. SMM, SIPI vector, latched INIT, triple fault, reserved bytes",
    )
    table(
        "failing SETs: what was applied",
        "6. Failing SETs: what they applied anyway",
        f"The base input is {inp(FULL)} with SHADOW|NMI_PENDING, plus what the case says.",
    )
    p("## 7. Event sequences (one VM each)")
    p()
    p("| sequence | errnos | read-back |")
    p("| --- | --- | --- |")
    for r in evseq:
        p(f"| {esc(r['name'])} | {r['errnos']} | {esc(r['readback'])} |")
    p()
    table(
        "debugregs",
        "8. KVM_SET_DEBUGREGS",
        "Unnamed fields keep the reset values (db 0, dr6 0xffff0ff0, dr7 0x400).",
    )

    p("## 9. KVM_SET_MP_STATE: every state")
    p()
    p("Each cell: errno of SET; what GET_MP_STATE reads back.")
    p()
    p(
        "| state | name | vCPU 0, no irqchip | vCPU 1, no irqchip "
        "| vCPU 0, irqchip | vCPU 1, irqchip |"
    )
    p("| --- | --- | --- | --- | --- | --- |")
    for r in mps:
        cells = " | ".join(
            f"{r[k][0]}; {MP_NAMES.get(r[k][1], r[k][1])}"
            for k in ((False, 0), (False, 1), (True, 0), (True, 1))
        )
        p(f"| {r['state']} | {r['name']} | {cells} |")
    p()
    p("## 10. MP_STATE, SIPI and INIT sequences (irqchip, vCPUs 0 and 1; vCPU 1 unless said)")
    p()
    p("| sequence | errnos | read-back |")
    p("| --- | --- | --- |")
    for r in mpseq:
        p(f"| {esc(r['name'])} | {r['errnos']} | {esc(r['readback'])} |")
    p()
    table("bad pointers", "11. Bad argument pointers")

    if jpath:
        with open(jpath, "w") as f:
            json.dump(
                {
                    "kernel": uname.release,
                    "reset": {k: v for k, v in reset.items()},
                    "cases": RESULTS,
                    "exceptions": exc,
                    "event_sequences": evseq,
                    "mp_sweep": [
                        {
                            **{
                                f"{k[0]}-{k[1]}" if isinstance(k, tuple) else k: v
                                for k, v in r.items()
                            }
                        }
                        for r in mps
                    ],
                    "mp_sequences": mpseq,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
