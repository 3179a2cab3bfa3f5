"""Snapshot a vCPU into a plain dict, restore it into a new VM, and show it equal.

    python examples/save_restore.py            # simulator -> simulator
    python examples/save_restore.py --device   # also device -> simulator and device -> device

The state of the source vCPU is made interesting first: 64-bit long mode, a
CPUID table, registers, a pending interrupt shadow, a pending NMI, debug
registers with a breakpoint.
"""

from __future__ import annotations

import argparse
import json
import sys

import kvmmmu
from kvmmmu import uapi
from kvmmmu.conformance.cases import lm64
from kvmmmu.snapshot import diff, restore_vcpu, save_vcpu


def prepare(vcpu: kvmmmu.Vcpu) -> None:
    kvm = vcpu.vm.kvm
    vcpu.set_cpuid2(kvm.get_supported_cpuid())
    vcpu.set_sregs(lm64(vcpu.get_sregs()))
    regs = vcpu.get_regs()
    regs.rip, regs.rsp, regs.rax, regs.rflags = 0x401000, 0x7FF000, 0xC0FFEE, 0x202
    vcpu.set_regs(regs)
    ev = vcpu.get_vcpu_events()
    ev.flags = uapi.KVM_VCPUEVENT_VALID_SHADOW | uapi.KVM_VCPUEVENT_VALID_NMI_PENDING
    ev.interrupt.shadow = uapi.KVM_X86_SHADOW_INT_STI
    ev.nmi.pending = 1
    vcpu.set_vcpu_events(ev)
    dr = vcpu.get_debugregs()
    dr.db[0], dr.dr7 = 0x401234, 0x401
    vcpu.set_debugregs(dr)


def round_trip(src_kvm: kvmmmu.Kvm, dst_kvm: kvmmmu.Kvm) -> list[str]:
    with src_kvm.create_vm() as vm_a, vm_a.create_vcpu(0) as a:
        prepare(a)
        saved = save_vcpu(a)
    saved = json.loads(json.dumps(saved))  # a plain dict survives serialisation
    with dst_kvm.create_vm() as vm_b, vm_b.create_vcpu(0) as b:
        restore_vcpu(b, saved)
        return diff(saved, save_vcpu(b))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", nargs="?", const="/dev/kvm", default=None)
    args = p.parse_args()
    pairs = [("simulator", kvmmmu.Kvm(), "simulator", kvmmmu.Kvm())]
    if args.device:
        problem = kvmmmu.device_available(args.device)
        if problem:
            print(f"device skipped: {problem}")
        else:
            dev = kvmmmu.Kvm(args.device)
            pairs += [("device", dev, "simulator", kvmmmu.Kvm()), ("device", dev, "device", dev)]
    bad = 0
    for a_name, a, b_name, b in pairs:
        d = round_trip(a, b)
        print(f"{a_name} -> {b_name}: {'equal' if not d else 'DIFFERENT'}")
        for line in d:
            print("   ", line)
        bad += bool(d)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
