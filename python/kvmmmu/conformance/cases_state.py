"""Cases for KVM_GET/SET_VCPU_EVENTS, KVM_GET/SET_DEBUGREGS and KVM_GET/SET_MP_STATE.

The expectations are what the real /dev/kvm gives (``tools/probe_state.py``,
``docs/device-state.md``). The cases use raw ioctls with the ctypes structs of
``kvmmmu.uapi``. A case that reads state back returns it in a compact form:
the non-zero fields of a struct as ``{"exception.nr": 14, ...}``.
"""

from __future__ import annotations

import errno as E
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .. import uapi
from ..api import Vcpu
from .cases import OK, Case, Env, errno_, value

PAYLOAD = uapi.KVM_VCPUEVENT_VALID_PAYLOAD
TRIPLE_FAULT = uapi.KVM_VCPUEVENT_VALID_TRIPLE_FAULT
SHADOW = uapi.KVM_VCPUEVENT_VALID_SHADOW
NMI_PENDING = uapi.KVM_VCPUEVENT_VALID_NMI_PENDING
SIPI_VECTOR = uapi.KVM_VCPUEVENT_VALID_SIPI_VECTOR
SMM = uapi.KVM_VCPUEVENT_VALID_SMM
CAP_PAYLOAD = uapi.KVM_CAP_EXCEPTION_PAYLOAD
CAP_TRIPLE = uapi.KVM_CAP_X86_TRIPLE_FAULT_EVENT
RUNNABLE = uapi.KVM_MP_STATE_RUNNABLE
UNINITIALIZED = uapi.KVM_MP_STATE_UNINITIALIZED
INIT_RECEIVED = uapi.KVM_MP_STATE_INIT_RECEIVED
HALTED = uapi.KVM_MP_STATE_HALTED
SIPI_RECEIVED = uapi.KVM_MP_STATE_SIPI_RECEIVED


# ---- helpers ----


def nonzero(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The non-zero leaves of a ``to_dict()``, with dotted names (arrays kept whole)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(nonzero(v, name + "."))
        elif isinstance(v, list):
            if any(v):
                out[name] = v
        elif v:
            out[name] = v
    return out


def enable_cap(env: Env, cap: int, arg0: int = 1) -> None:
    c = uapi.kvm_enable_cap()
    c.cap = cap
    c.args[0] = arg0
    env.vm.ioctl(uapi.KVM_ENABLE_CAP, c)


def get_events(vcpu: Vcpu) -> uapi.kvm_vcpu_events:
    ev = uapi.kvm_vcpu_events()
    vcpu.ioctl(uapi.KVM_GET_VCPU_EVENTS, ev)
    return ev


def set_events(vcpu: Vcpu, fields: Mapping[str, Any]) -> None:
    vcpu.ioctl(uapi.KVM_SET_VCPU_EVENTS, uapi.kvm_vcpu_events.from_dict(fields))


def events_readback(vcpu: Vcpu) -> dict[str, Any]:
    return nonzero(get_events(vcpu).to_dict())


def get_debugregs(vcpu: Vcpu) -> dict[str, Any]:
    d = uapi.kvm_debugregs()
    vcpu.ioctl(uapi.KVM_GET_DEBUGREGS, d)
    return {"db": list(d.db), "dr6": d.dr6, "dr7": d.dr7, "flags": d.flags}


def set_debugregs(vcpu: Vcpu, **fields: Any) -> None:
    base = {"db": [0, 0, 0, 0], "dr6": 0xFFFF0FF0, "dr7": 0x400}
    base.update(fields)
    vcpu.ioctl(uapi.KVM_SET_DEBUGREGS, uapi.kvm_debugregs.from_dict(base))


def get_mp(vcpu: Vcpu) -> int:
    m = uapi.kvm_mp_state()
    vcpu.ioctl(uapi.KVM_GET_MP_STATE, m)
    return int(m.mp_state)


def set_mp(vcpu: Vcpu, state: int) -> None:
    vcpu.ioctl(uapi.KVM_SET_MP_STATE, uapi.kvm_mp_state(mp_state=state))


def errno_of(call: Callable[[], object]) -> int:
    """0 if ``call`` succeeds, else its errno."""
    try:
        call()
    except OSError as e:
        return e.errno or -1
    return 0


def cs_rip(vcpu: Vcpu) -> tuple[int, int, int]:
    s = vcpu.get_sregs()
    return (s.cs.selector, s.cs.base, vcpu.get_regs().rip)


def _vm(env: Env, caps: Iterable[int] = (), irqchip: bool = False) -> None:
    for cap in caps:
        enable_cap(env, cap)
    if irqchip:
        env.vm.ioctl(uapi.KVM_CREATE_IRQCHIP, 0)


def _events(
    fields: Mapping[str, Any], caps: Iterable[int] = (), irqchip: bool = False
) -> Callable[[Env], Any]:
    """SET_VCPU_EVENTS with ``fields`` on a fresh vCPU 0, then the GET read-back."""

    def run(env: Env) -> Any:
        _vm(env, caps, irqchip)
        set_events(env.vcpu, fields)
        return events_readback(env.vcpu)

    return run


def _on_ap(env: Env, body: Callable[[Vcpu], Any], irqchip: bool = True) -> Any:
    """Run ``body`` on vCPU 1 (vCPU 0 exists too), with an irqchip unless told otherwise."""
    _vm(env, irqchip=irqchip)
    env.vcpu  # noqa: B018 - vCPU 0 first
    ap = env.vm.create_vcpu(1)
    try:
        return body(ap)
    finally:
        ap.close()


# ---- KVM_GET/SET_VCPU_EVENTS ----


def _initial_both_caps(env: Env) -> Any:
    _vm(env, (CAP_PAYLOAD, CAP_TRIPLE))
    return events_readback(env.vcpu)


def _shadow_values(env: Env) -> list[int]:
    out = []
    for sh in (1, 2, 3, 4, 0xFF):
        set_events(env.vcpu, {"flags": SHADOW, "interrupt": {"shadow": sh}})
        out.append(get_events(env.vcpu).interrupt.shadow)
    return out


def _nmi_pending_limits(env: Env) -> list[int]:
    out = []
    for pending, masked, injected in ((1, 0, 0), (2, 0, 0), (5, 0, 0), (255, 0, 0), (2, 1, 0)):
        set_events(
            env.vcpu,
            {
                "flags": NMI_PENDING,
                "nmi": {"pending": pending, "masked": masked, "injected": injected},
            },
        )
        out.append(get_events(env.vcpu).nmi.pending)
    set_events(env.vcpu, {"flags": NMI_PENDING, "nmi": {"pending": 2, "injected": 1}})
    out.append(get_events(env.vcpu).nmi.pending)
    return out


def _nmi_limit_at_set(env: Env) -> int:
    set_events(env.vcpu, {"flags": NMI_PENDING, "nmi": {"pending": 2, "masked": 1}})
    set_events(env.vcpu, {})  # unmask, no NMI_PENDING: the queue was limited under the mask
    return get_events(env.vcpu).nmi.pending


def _payload_cap_turned_off(env: Env) -> Any:
    enable_cap(env, CAP_PAYLOAD)
    set_events(
        env.vcpu,
        {
            "flags": PAYLOAD,
            "exception": {"pending": 1, "nr": 14, "has_error_code": 1, "error_code": 2},
            "exception_has_payload": 1,
            "exception_payload": 0xDEADB000,
        },
    )
    enable_cap(env, CAP_PAYLOAD, 0)
    return events_readback(env.vcpu), env.vcpu.get_sregs().cr2


def _db_payload_to_dr6(env: Env) -> Any:
    enable_cap(env, CAP_PAYLOAD)
    set_events(
        env.vcpu,
        {
            "flags": PAYLOAD,
            "exception": {"pending": 1, "nr": 1},
            "exception_has_payload": 1,
            "exception_payload": 0x4002,
        },
    )
    enable_cap(env, CAP_PAYLOAD, 0)
    return events_readback(env.vcpu), get_debugregs(env.vcpu)["dr6"]


def _partial_apply(flags: int, extra: Mapping[str, Any]) -> Callable[[Env], Any]:
    """A SET that fails a late check (SMM, TRIPLE_FAULT): errno and what it still applied."""

    def run(env: Env) -> Any:
        fields = {
            "flags": flags | SHADOW | NMI_PENDING,
            "exception": {"injected": 1, "nr": 6},
            "interrupt": {"injected": 1, "nr": 0x20, "shadow": 2},
            "nmi": {"injected": 1, "pending": 1, "masked": 1},
            **extra,
        }
        e = errno_of(lambda: set_events(env.vcpu, fields))
        return E.errorcode.get(e, e), events_readback(env.vcpu)

    return run


def _bitmap_to_events(env: Env) -> Any:
    s = env.vcpu.get_sregs()
    s.interrupt_bitmap[1] = 0x30
    s.interrupt_bitmap[3] = 1 << 63
    env.vcpu.set_sregs(s)
    bitmap = list(env.vcpu.get_sregs().interrupt_bitmap)
    return bitmap, events_readback(env.vcpu)


def _events_to_bitmap(env: Env) -> Any:
    set_events(env.vcpu, {"interrupt": {"injected": 1, "nr": 0xFF}})
    first = list(env.vcpu.get_sregs().interrupt_bitmap)
    set_events(env.vcpu, {"interrupt": {"nr": 0x77}})
    second = list(env.vcpu.get_sregs().interrupt_bitmap)
    return first, second, events_readback(env.vcpu)


def _empty_bitmap_keeps(env: Env) -> Any:
    set_events(env.vcpu, {"interrupt": {"injected": 1, "nr": 0x44}})
    s = env.vcpu.get_sregs()
    s.interrupt_bitmap[:] = [0, 0, 0, 0]
    env.vcpu.set_sregs(s)
    return events_readback(env.vcpu)


def _soft_interrupt_and_sregs(env: Env) -> Any:
    set_events(env.vcpu, {"interrupt": {"injected": 1, "nr": 0x99, "soft": 1}})
    s = env.vcpu.get_sregs()
    before = list(s.interrupt_bitmap)
    env.vcpu.set_sregs(s)  # empty bitmap: the soft interrupt stays (invisible)
    s.interrupt_bitmap[2] = 1 << 0x19
    env.vcpu.set_sregs(s)  # a bit: a non-soft interrupt replaces it
    return before, events_readback(env.vcpu)


def _sregs_then_soft(env: Env) -> Any:
    s = env.vcpu.get_sregs()
    s.interrupt_bitmap[0] = 1 << 0x20
    env.vcpu.set_sregs(s)
    set_events(env.vcpu, {"interrupt": {"injected": 1, "nr": 0x20, "soft": 1}})
    return list(env.vcpu.get_sregs().interrupt_bitmap), events_readback(env.vcpu)


def _latched_init(irqchip: bool) -> Callable[[Env], Any]:
    def run(env: Env) -> Any:
        _vm(env, irqchip=irqchip)
        set_events(env.vcpu, {"flags": SMM, "smi": {"latched_init": 1}})
        return get_events(env.vcpu).smi.latched_init

    return run


def _sipi_vector_not_reported(env: Env) -> Any:
    _vm(env, irqchip=True)
    set_events(env.vcpu, {"flags": SIPI_VECTOR, "sipi_vector": 0x12})
    return events_readback(env.vcpu)


def _triple_fault_with_cap(env: Env) -> Any:
    enable_cap(env, CAP_TRIPLE)
    set_events(env.vcpu, {"flags": TRIPLE_FAULT, "triple_fault": {"pending": 1}})
    with_flag = events_readback(env.vcpu)
    set_events(env.vcpu, {"triple_fault": {"pending": 0}})  # no flag: left alone
    return with_flag, get_events(env.vcpu).triple_fault.pending


EVENTS_CASES = [
    Case("events initial", _events({}), value({"flags": 0xD})),
    Case("events initial with both caps", _initial_both_caps, value({"flags": 0x3D})),
    Case("events every valid flag", _events({"flags": 0xF}), value({"flags": 0xD})),
    Case("events flag 0x40", _events({"flags": 0x40}), errno_(E.EINVAL)),
    Case("events flag 0x80000000", _events({"flags": 0x8000_0000}), errno_(E.EINVAL)),
    Case("events PAYLOAD without cap", _events({"flags": PAYLOAD}), errno_(E.EINVAL)),
    Case("events TRIPLE_FAULT without cap", _events({"flags": TRIPLE_FAULT}), errno_(E.EINVAL)),
    Case("events SMM smm=1", _events({"flags": SMM, "smi": {"smm": 1}}), errno_(E.EINVAL)),
    Case("events SMM pending=1", _events({"flags": SMM, "smi": {"pending": 1}}), errno_(E.EINVAL)),
    Case(
        "events SMM flag alone",
        _events({"flags": SMM, "smi": {"smm_inside_nmi": 0}}),
        value({"flags": 0xD}),
    ),
    Case(
        "events inject #GP(0x1234), booleans 2/3",
        _events(
            {
                "exception": {"injected": 2, "nr": 13, "has_error_code": 3, "error_code": 0x1234},
            }
        ),
        value(
            {
                "exception.injected": 1,
                "exception.nr": 13,
                "exception.has_error_code": 1,
                "exception.error_code": 0x1234,
                "flags": 0xD,
            }
        ),
    ),
    Case(
        "events inject vector 31",
        _events({"exception": {"injected": 1, "nr": 31}}),
        value({"exception.injected": 1, "exception.nr": 31, "flags": 0xD}),
    ),
    Case(
        "events inject vector 32",
        _events({"exception": {"injected": 1, "nr": 32}}),
        errno_(E.EINVAL),
    ),
    Case(
        "events inject vector 2 (NMI)",
        _events({"exception": {"injected": 1, "nr": 2}}),
        errno_(E.EINVAL),
    ),
    Case(
        "events vector 200 not injected",
        _events({"exception": {"nr": 200, "has_error_code": 1, "error_code": 5}}),
        value(
            {
                "exception.nr": 200,
                "exception.has_error_code": 1,
                "exception.error_code": 5,
                "flags": 0xD,
            }
        ),
    ),
    Case(
        "events inject #BP (soft) hides injected",
        _events({"exception": {"injected": 1, "nr": 3}}),
        value({"exception.nr": 3, "flags": 0xD}),
    ),
    Case(
        "events pending #PF without PAYLOAD dropped",
        _events(
            {"exception": {"pending": 1, "nr": 14, "has_error_code": 1, "error_code": 7}},
            caps=(CAP_PAYLOAD,),
        ),
        value(
            {
                "exception.nr": 14,
                "exception.has_error_code": 1,
                "exception.error_code": 7,
                "flags": 0x1D,
            }
        ),
    ),
    Case(
        "events pending vector 40 without PAYLOAD",
        _events({"exception": {"pending": 1, "nr": 40}}),
        value({"exception.nr": 40, "flags": 0xD}),
    ),
    Case(
        "events pending #PF with PAYLOAD",
        _events(
            {
                "flags": PAYLOAD,
                "exception": {"pending": 1, "injected": 1, "nr": 14, "has_error_code": 1},
                "exception_has_payload": 1,
                "exception_payload": 0xDEADB000,
            },
            caps=(CAP_PAYLOAD,),
        ),
        value(
            {
                "exception.nr": 14,
                "exception.has_error_code": 1,
                "exception.pending": 1,
                "flags": 0x1D,
                "exception_has_payload": 1,
                "exception_payload": 0xDEADB000,
            }
        ),
    ),
    Case(
        "events injected with PAYLOAD drops has_payload",
        _events(
            {
                "flags": PAYLOAD,
                "exception": {"injected": 1, "nr": 14},
                "exception_has_payload": 1,
                "exception_payload": 0x1000,
            },
            caps=(CAP_PAYLOAD,),
        ),
        value(
            {
                "exception.injected": 1,
                "exception.nr": 14,
                "flags": 0x1D,
                "exception_payload": 0x1000,
            }
        ),
    ),
    Case(
        "events pending vector 40 with PAYLOAD",
        _events({"flags": PAYLOAD, "exception": {"pending": 1, "nr": 40}}, caps=(CAP_PAYLOAD,)),
        errno_(E.EINVAL),
    ),
    Case(
        "events #PF payload delivered to CR2 when the cap is turned off",
        _payload_cap_turned_off,
        value(
            (
                {
                    "exception.injected": 1,
                    "exception.nr": 14,
                    "exception.has_error_code": 1,
                    "exception.pending": 1,
                    "exception.error_code": 2,
                    "flags": 0xD,
                },
                0xDEADB000,
            )
        ),
    ),
    Case(
        "events #DB payload delivered to DR6 when the cap is turned off",
        _db_payload_to_dr6,
        value(
            (
                {
                    "exception.injected": 1,
                    "exception.nr": 1,
                    "exception.pending": 1,
                    "flags": 0xD,
                },
                0xFFFF4FF2,
            )
        ),
    ),
    Case(
        "events interrupt injected 0x41",
        _events({"interrupt": {"injected": 2, "nr": 0x41}}),
        value({"interrupt.injected": 1, "interrupt.nr": 0x41, "flags": 0xD}),
    ),
    Case(
        "events soft interrupt hides injected",
        _events({"interrupt": {"injected": 1, "nr": 0x80, "soft": 1}}),
        value({"interrupt.nr": 0x80, "flags": 0xD}),
    ),
    Case(
        "events shadow ignored without SHADOW",
        _events({"interrupt": {"shadow": 1}}),
        value({"flags": 0xD}),
    ),
    Case(
        "events shadow values 1, 2, 3, 4, 0xff",
        _shadow_values,
        value([1, 2, 3, 4, 0xFF]),
    ),
    Case(
        "events NMI booleans",
        _events({"nmi": {"injected": 5, "masked": 7, "pad": 9}}),
        value({"nmi.injected": 1, "nmi.masked": 1, "flags": 0xD}),
    ),
    Case(
        "events NMI pending without NMI_PENDING ignored",
        _events({"nmi": {"pending": 1}}),
        value({"flags": 0xD}),
    ),
    Case("events NMI pending limits", _nmi_pending_limits, value([1, 2, 2, 2, 1, 1])),
    Case("events NMI limit applied at SET", _nmi_limit_at_set, value(1)),
    Case(
        "events SMM failure applies earlier fields",
        _partial_apply(SMM, {"smi": {"smm": 1}}),
        value(
            (
                "EINVAL",
                {
                    "exception.injected": 1,
                    "exception.nr": 6,
                    "interrupt.injected": 1,
                    "interrupt.nr": 0x20,
                    "interrupt.shadow": 2,
                    "nmi.injected": 1,
                    "nmi.pending": 1,
                    "nmi.masked": 1,
                    "flags": 0xD,
                },
            )
        ),
    ),
    Case(
        "events TRIPLE_FAULT failure applies earlier fields",
        _partial_apply(TRIPLE_FAULT, {}),
        value(
            (
                "EINVAL",
                {
                    "exception.injected": 1,
                    "exception.nr": 6,
                    "interrupt.injected": 1,
                    "interrupt.nr": 0x20,
                    "interrupt.shadow": 2,
                    "nmi.injected": 1,
                    "nmi.pending": 1,
                    "nmi.masked": 1,
                    "flags": 0xD,
                },
            )
        ),
    ),
    Case(
        "events PAYLOAD failure changes nothing",
        _partial_apply(PAYLOAD, {}),
        value(("EINVAL", {"flags": 0xD})),
    ),
    Case(
        "events triple fault with cap",
        _triple_fault_with_cap,
        value(({"flags": 0x2D, "triple_fault.pending": 1}, 1)),
    ),
    Case(
        "events SET_SREGS bitmap shows as injected interrupt",
        _bitmap_to_events,
        value(([0, 0x10, 0, 0], {"interrupt.injected": 1, "interrupt.nr": 0x44, "flags": 0xD})),
    ),
    Case(
        "events injected interrupt shows in GET_SREGS bitmap",
        _events_to_bitmap,
        value(([0, 0, 0, 1 << 63], [0, 0, 0, 0], {"interrupt.nr": 0x77, "flags": 0xD})),
    ),
    Case(
        "events empty SET_SREGS bitmap keeps the interrupt",
        _empty_bitmap_keeps,
        value({"interrupt.injected": 1, "interrupt.nr": 0x44, "flags": 0xD}),
    ),
    Case(
        "events soft interrupt vs SET_SREGS",
        _soft_interrupt_and_sregs,
        value(([0, 0, 0, 0], {"interrupt.injected": 1, "interrupt.nr": 0x99, "flags": 0xD})),
    ),
    Case(
        "events soft interrupt replaces a SET_SREGS one",
        _sregs_then_soft,
        value(([0, 0, 0, 0], {"interrupt.nr": 0x20, "flags": 0xD})),
    ),
    Case("events latched INIT without irqchip", _latched_init(False), value(0)),
    Case("events latched INIT with irqchip", _latched_init(True), value(1)),
    Case("events SIPI vector never reported", _sipi_vector_not_reported, value({"flags": 0xD})),
    Case(
        "events GET NULL",
        lambda env: env.vcpu.ioctl(uapi.KVM_GET_VCPU_EVENTS, 0),
        errno_(E.EFAULT),
    ),
    Case(
        "events SET NULL",
        lambda env: env.vcpu.ioctl(uapi.KVM_SET_VCPU_EVENTS, 0),
        errno_(E.EFAULT),
    ),
]


# ---- KVM_GET/SET_DEBUGREGS ----


def _debugregs(**fields: Any) -> Callable[[Env], Any]:
    def run(env: Env) -> Any:
        set_debugregs(env.vcpu, **fields)
        return get_debugregs(env.vcpu)

    return run


def _debugregs_failed_set(env: Env) -> Any:
    e = errno_of(lambda: set_debugregs(env.vcpu, db=[1, 2, 3, 4], dr6=0, dr7=1 << 32))
    return E.errorcode.get(e, e), get_debugregs(env.vcpu)


RESET_DR = {"db": [0, 0, 0, 0], "dr6": 0xFFFF0FF0, "dr7": 0x400, "flags": 0}

DEBUGREGS_CASES = [
    Case("debugregs reset", lambda env: get_debugregs(env.vcpu), value(RESET_DR)),
    Case("debugregs flags=1", _debugregs(flags=1), errno_(E.EINVAL)),
    Case("debugregs flags=0x80", _debugregs(flags=0x80), errno_(E.EINVAL)),
    Case("debugregs dr6 bit 32", _debugregs(dr6=1 << 32), errno_(E.EINVAL)),
    Case("debugregs dr7 bit 32", _debugregs(dr7=1 << 32), errno_(E.EINVAL)),
    Case("debugregs dr7 bit 63", _debugregs(dr7=1 << 63), errno_(E.EINVAL)),
    Case(
        "debugregs dr6=0 dr7=0 read back raw",
        _debugregs(dr6=0, dr7=0),
        value({"db": [0, 0, 0, 0], "dr6": 0, "dr7": 0, "flags": 0}),
    ),
    Case(
        "debugregs dr6/dr7 all low bits",
        _debugregs(dr6=0xFFFF_FFFF, dr7=0xFFFF_FFFF),
        value({"db": [0, 0, 0, 0], "dr6": 0xFFFF_FFFF, "dr7": 0xFFFF_FFFF, "flags": 0}),
    ),
    Case(
        "debugregs breakpoint, any db value, reserved ignored",
        _debugregs(
            db=[0x1234, (1 << 64) - 1, 1 << 63, 0x8_0000_0000_0000],
            dr7=0x401,
            reserved=list(range(1, 10)),
        ),
        value(
            {
                "db": [0x1234, (1 << 64) - 1, 1 << 63, 0x8_0000_0000_0000],
                "dr6": 0xFFFF0FF0,
                "dr7": 0x401,
                "flags": 0,
            }
        ),
    ),
    Case(
        "debugregs failed set changes nothing",
        _debugregs_failed_set,
        value(("EINVAL", RESET_DR)),
    ),
    Case(
        "debugregs GET NULL",
        lambda env: env.vcpu.ioctl(uapi.KVM_GET_DEBUGREGS, 0),
        errno_(E.EFAULT),
    ),
]


# ---- KVM_GET/SET_MP_STATE ----


def _mp_initial(irqchip: bool) -> Callable[[Env], Any]:
    def run(env: Env) -> Any:
        return _on_ap(env, lambda ap: [get_mp(env.vcpu), get_mp(ap)], irqchip=irqchip)

    return run


def _mp_sweep(irqchip: bool) -> Callable[[Env], Any]:
    """Every state 0..12 on vCPU 1 (each on its own VM): errno name and read-back."""

    def run(env: Env) -> Any:
        out = []
        for state in range(13):
            sub = Env(env.kvm)
            try:

                def one(ap: Vcpu, state: int = state) -> tuple[str, int]:
                    e = errno_of(lambda: set_mp(ap, state))
                    return E.errorcode.get(e, "0"), get_mp(ap)

                out.append(_on_ap(sub, one, irqchip=irqchip))
            finally:
                sub.close()
        return out

    return run


def _sipi(vector: int) -> Callable[[Env], Any]:
    def body(ap: Vcpu) -> Any:
        set_events(ap, {"flags": SIPI_VECTOR, "sipi_vector": vector})
        set_mp(ap, SIPI_RECEIVED)
        before = cs_rip(ap)  # nothing happens until the state is read
        return before, get_mp(ap), cs_rip(ap)

    return lambda env: _on_ap(env, body)


def _dirty(vcpu: Vcpu) -> None:
    s = vcpu.get_sregs()
    s.cr0, s.cr2, s.cr3, s.cr8 = 0x6000_0011, 0x1234, 0x5000, 5
    s.cs.selector, s.cs.base = 8, 0x1000
    vcpu.set_sregs(s)
    r = vcpu.get_regs()
    r.rax, r.rip = 0x55, 0x1000
    vcpu.set_regs(r)


def _init_state(vcpu: Vcpu) -> Any:
    s, r = vcpu.get_sregs(), vcpu.get_regs()
    return {
        "cr0": s.cr0,
        "cr2": s.cr2,
        "cr3": s.cr3,
        "cr8": s.cr8,
        "cs": (s.cs.selector, s.cs.base),
        "apic_base": s.apic_base,
        "rax": r.rax,
        "rdx": r.rdx,
        "rip": r.rip,
        "events": events_readback(vcpu),
    }


def _latched_init_ap(env: Env) -> Any:
    def body(ap: Vcpu) -> Any:
        _dirty(ap)
        set_events(
            ap,
            {
                "flags": SMM | SHADOW,
                "exception": {"injected": 1, "nr": 13, "error_code": 0x77},
                "interrupt": {"injected": 1, "nr": 0x40, "shadow": 1},
                "nmi": {"injected": 1, "masked": 1},
                "smi": {"latched_init": 1},
            },
        )
        return get_mp(ap), _init_state(ap)

    return _on_ap(env, body)


def _latched_init_bsp(env: Env) -> Any:
    _vm(env, irqchip=True)
    _dirty(env.vcpu)
    set_debugregs(env.vcpu, db=[1, 2, 3, 4], dr7=0x401)
    set_events(env.vcpu, {"flags": SMM, "smi": {"latched_init": 1}})
    return get_mp(env.vcpu), _init_state(env.vcpu), get_debugregs(env.vcpu)


def _init_then_sipi(env: Env) -> Any:
    def body(ap: Vcpu) -> Any:
        set_events(ap, {"flags": SIPI_VECTOR, "sipi_vector": 0x20})
        set_mp(ap, SIPI_RECEIVED)
        set_events(ap, {"flags": SMM, "smi": {"latched_init": 1}})
        return get_mp(ap), cs_rip(ap)

    return _on_ap(env, body)


def _sipi_dropped(env: Env) -> Any:
    def body(ap: Vcpu) -> Any:
        set_events(ap, {"flags": SIPI_VECTOR, "sipi_vector": 0x30})
        set_mp(ap, SIPI_RECEIVED)
        set_mp(ap, HALTED)
        return get_mp(ap), cs_rip(ap)

    return _on_ap(env, body)


def _set_sregs_unhalts(env: Env) -> Any:
    def body(ap: Vcpu) -> Any:
        out = []
        for v in (env.vcpu, ap):
            set_mp(v, HALTED)
            v.set_sregs(v.get_sregs())
            out.append(get_mp(v))
        return out

    return _on_ap(env, body)


def _sipi_kept_across_init_received(env: Env) -> Any:
    def body(ap: Vcpu) -> Any:
        set_events(ap, {"flags": SIPI_VECTOR, "sipi_vector": 0x30})
        set_mp(ap, SIPI_RECEIVED)
        set_mp(ap, INIT_RECEIVED)
        return get_mp(ap), cs_rip(ap)

    return _on_ap(env, body)


def _latched_init_then_states(env: Env) -> Any:
    def body(ap: Vcpu) -> Any:
        set_events(ap, {"flags": SMM, "smi": {"latched_init": 1}})
        for state in (INIT_RECEIVED, SIPI_RECEIVED, RUNNABLE):
            set_mp(ap, state)
        return get_mp(ap), cs_rip(ap)

    return _on_ap(env, body)


def _init_rdx_after_cpuid(env: Env) -> Any:
    def body(ap: Vcpu) -> Any:
        ap.set_cpuid2(env.kvm.get_supported_cpuid())
        leaf1 = next(e.eax for e in ap.get_cpuid2() if e.function == 1)
        before = ap.get_regs().rdx
        set_events(ap, {"flags": SMM, "smi": {"latched_init": 1}})
        return before, get_mp(ap), ap.get_regs().rdx == leaf1

    return _on_ap(env, body)


MP_STATE_CASES = [
    Case("mp_state initial without irqchip", _mp_initial(False), value([RUNNABLE, RUNNABLE])),
    Case("mp_state initial with irqchip", _mp_initial(True), value([RUNNABLE, UNINITIALIZED])),
    Case(
        "mp_state every state without irqchip",
        _mp_sweep(False),
        value([("0", 0)] + [("EINVAL", 0)] * 12),
    ),
    Case(
        "mp_state every state with irqchip",
        _mp_sweep(True),
        value(
            [("0", 0), ("0", 1), ("0", 2), ("0", 3), ("0", 0)]
            + [("EINVAL", 1)] * 4
            + [("0", 9)]
            + [("EINVAL", 1)] * 3
        ),
    ),
    Case(
        "mp_state SIPI_RECEIVED reads back RUNNABLE and starts at the vector",
        _sipi(0x12),
        value(((0xF000, 0xFFFF0000, 0xFFF0), RUNNABLE, (0x1200, 0x12000, 0))),
    ),
    Case(
        "mp_state SIPI vector cut to 8 bits",
        _sipi(0x1AB),
        value(((0xF000, 0xFFFF0000, 0xFFF0), RUNNABLE, (0xAB00, 0xAB000, 0))),
    ),
    Case(
        "mp_state latched INIT on an AP",
        _latched_init_ap,
        value(
            (
                INIT_RECEIVED,
                {
                    "cr0": 0x6000_0010,
                    "cr2": 0,
                    "cr3": 0,
                    "cr8": 0,
                    "cs": (0xF000, 0xFFFF0000),
                    "apic_base": 0xFEE00800,
                    "rax": 0,
                    "rdx": 0x600,
                    "rip": 0xFFF0,
                    "events": {
                        "exception.nr": 13,
                        "exception.error_code": 0x77,
                        "interrupt.nr": 0x40,
                        "flags": 0xD,
                    },
                },
            )
        ),
    ),
    Case(
        "mp_state latched INIT on the BSP",
        _latched_init_bsp,
        value(
            (
                RUNNABLE,
                {
                    "cr0": 0x6000_0010,
                    "cr2": 0,
                    "cr3": 0,
                    "cr8": 0,
                    "cs": (0xF000, 0xFFFF0000),
                    "apic_base": 0xFEE00900,
                    "rax": 0,
                    "rdx": 0x600,
                    "rip": 0xFFF0,
                    "events": {"flags": 0xD},
                },
                RESET_DR,
            )
        ),
    ),
    Case(
        "mp_state INIT then SIPI on an AP",
        _init_then_sipi,
        value((RUNNABLE, (0x2000, 0x20000, 0))),
    ),
    Case(
        "mp_state SIPI dropped outside wait-for-SIPI",
        _sipi_dropped,
        value((HALTED, (0xF000, 0xFFFF0000, 0xFFF0))),
    ),
    Case(
        "mp_state pending SIPI survives SET INIT_RECEIVED",
        _sipi_kept_across_init_received,
        value((RUNNABLE, (0x3000, 0x30000, 0))),
    ),
    Case(
        "mp_state latched INIT, then INIT_RECEIVED, SIPI_RECEIVED, RUNNABLE",
        _latched_init_then_states,
        value((RUNNABLE, (0, 0, 0))),
    ),
    Case(
        "mp_state INIT loads RDX from CPUID.1.EAX",
        _init_rdx_after_cpuid,
        value((0x600, INIT_RECEIVED, True)),
    ),
    Case(
        "mp_state SET_SREGS at the reset vector unhalts the BSP",
        _set_sregs_unhalts,
        value([RUNNABLE, HALTED]),
    ),
    Case(
        "mp_state RUNNABLE without irqchip",
        lambda env: set_mp(env.vcpu, RUNNABLE),
        OK,
    ),
    Case(
        "mp_state GET NULL",
        lambda env: env.vcpu.ioctl(uapi.KVM_GET_MP_STATE, 0),
        errno_(E.EFAULT),
    ),
    Case(
        "mp_state SET NULL",
        lambda env: env.vcpu.ioctl(uapi.KVM_SET_MP_STATE, 0),
        errno_(E.EFAULT),
    ),
]


STATE_CASES: list[Case] = EVENTS_CASES + DEBUGREGS_CASES + MP_STATE_CASES
