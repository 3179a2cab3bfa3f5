"""Save and restore a vCPU's architectural state as a plain dict.

``save_vcpu`` reads regs, sregs, vCPU events, debug registers, the MP state
and the CPUID table; ``restore_vcpu`` writes them into another vCPU, of the
same backend or the other one, in the order the kernel needs:

1. CPUID first: it decides what SET_SREGS accepts (MAXPHYADDR, CR4 features).
2. sregs, then regs.
3. vCPU events after sregs: SET_SREGS's interrupt_bitmap and the events'
   interrupt are the same state, and the events are the complete record.
4. debug registers, then the MP state last.

The dict holds only ints, lists and dicts (JSON-ready).
"""

from __future__ import annotations

from typing import Any

from . import uapi
from .api import Vcpu

#: The parts of a snapshot, in restore order.
PARTS = ("cpuid", "sregs", "regs", "events", "debugregs", "mp_state")


def save_vcpu(vcpu: Vcpu) -> dict[str, Any]:
    """The vCPU's state as a plain dict."""
    return {
        "cpuid": [e.to_dict() for e in vcpu.get_cpuid2()],
        "sregs": vcpu.get_sregs().to_dict(),
        "regs": vcpu.get_regs().to_dict(),
        "events": vcpu.get_vcpu_events().to_dict(),
        "debugregs": vcpu.get_debugregs().to_dict(),
        "mp_state": vcpu.get_mp_state(),
    }


def restore_vcpu(vcpu: Vcpu, state: dict[str, Any]) -> None:
    """Write a :func:`save_vcpu` dict into ``vcpu``."""
    vcpu.set_cpuid2([uapi.kvm_cpuid_entry2.from_dict(e) for e in state["cpuid"]])
    vcpu.set_sregs(uapi.kvm_sregs.from_dict(state["sregs"]))
    vcpu.set_regs(uapi.kvm_regs.from_dict(state["regs"]))
    events = uapi.kvm_vcpu_events.from_dict(state["events"])
    kvm = vcpu.vm.kvm
    if not kvm.check_extension(uapi.KVM_CAP_X86_SMM):
        # GET reports the SMM state as valid even without SMM; SET refuses it then.
        events.flags &= ~uapi.KVM_VCPUEVENT_VALID_SMM
    vcpu.set_vcpu_events(events)
    vcpu.set_debugregs(uapi.kvm_debugregs.from_dict(state["debugregs"]))
    vcpu.set_mp_state(state["mp_state"])


def diff(a: dict[str, Any], b: dict[str, Any], path: str = "") -> list[str]:
    """Human-readable differences between two snapshots (empty when equal)."""
    out: list[str] = []
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            out += diff(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            out += diff(x, y, f"{path}[{i}]")
    elif a != b:
        out.append(f"{path}: {a!r} != {b!r}")
    return out
