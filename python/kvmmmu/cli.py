"""The ``kvmmmu`` command: ``run`` boots the bundled demo guest (the default), ``tour``
walks through the API, ``caps`` lists capabilities, ``conformance`` compares backends."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Sequence

from . import dot, uapi
from ._core import GuestMemory
from .api import Kvm
from .conformance import CASES, run_case
from .conformance.cases import lm64
from .guest import demo as guest_demo
from .transport import DEFAULT_PATH, device_available

GiB = 1 << 30
TiB = 1 << 40


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def _try(what: str, fn: object) -> None:
    try:
        fn()  # type: ignore[operator]
        print(f"    {what}: ok")
    except OSError as e:
        print(f"    {what}: {errno.errorcode.get(e.errno or 0, e.errno)} ({type(e).__name__})")


def tour(kvm: Kvm, list_caps: bool = True) -> None:
    print(
        f"  {kvm!r}: KVM_GET_API_VERSION = {kvm.get_api_version()}, "
        f"KVM_GET_VCPU_MMAP_SIZE = {kvm.get_vcpu_mmap_size()}"
    )
    caps = kvm.capabilities()
    if not list_caps:
        print(f"  {len(caps)} capabilities are non-zero (`kvmmmu caps --device` lists them)")
    else:
        print(
            f"  {len(caps)} capabilities are non-zero (the simulator reports what it implements):"
        )
        for name, v in caps.items():
            print(f"    {name.removeprefix('KVM_CAP_'):32} {v}")

    with kvm.create_vm() as vm:
        mem = GuestMemory(1 * GiB)
        rom = GuestMemory(64 << 10)
        print(f"\n  memory slots on {vm!r}")
        vm.set_user_memory_region(0, 0, mem.size, mem)
        print(f"    slot 0: gpa 0..1 GiB -> {mem!r}")
        vm.set_user_memory_region(1, 0xFFFF0000, rom.size, rom, uapi.KVM_MEM_READONLY)
        print("    slot 1: gpa 0xffff0000, 64 KiB, KVM_MEM_READONLY")
        _try("slot 2 overlapping slot 0", lambda: vm.set_user_memory_region(2, GiB // 2, 4096, mem))
        _try(
            "slot 2 with an unaligned gpa",
            lambda: vm.set_user_memory_region(2, 4 * GiB + 1, 4096, mem),
        )
        _try("resize slot 0", lambda: vm.set_user_memory_region(0, 0, 2 * GiB, mem))
        _try(
            "turn on dirty logging for slot 0",
            lambda: vm.set_user_memory_region(0, 0, mem.size, mem, uapi.KVM_MEM_LOG_DIRTY_PAGES),
        )
        _try(
            "move slot 1 to 4 GiB",
            lambda: vm.set_user_memory_region(1, 4 * GiB, rom.size, rom, uapi.KVM_MEM_READONLY),
        )
        _try("close guest memory while a slot uses it", mem.close)

        with vm.create_vcpu(0) as vcpu:
            regs = vcpu.get_regs()
            sregs = vcpu.get_sregs()
            print(
                f"\n  {vcpu!r} after reset: rip={regs.rip:#x} rflags={regs.rflags:#x} "
                f"cs.selector={sregs.cs.selector:#x} cs.base={sregs.cs.base:#x} "
                f"cr0={sregs.cr0:#x}"
            )
            regs.rip, regs.rsp = 0x1000, 0x8000
            vcpu.set_regs(regs)
            vcpu.set_sregs(lm64(sregs))
            s = vcpu.get_sregs()
            print(
                f"    long mode set: cr0={s.cr0:#x} cr4={s.cr4:#x} efer={s.efer:#x} cs.l={s.cs.l}"
            )
            bad = lm64(vcpu.get_sregs())
            bad.cr4 &= ~0x20
            _try("SET_SREGS with EFER.LMA but no CR4.PAE", lambda: vcpu.set_sregs(bad))
            _try("KVM_GET_REGS with a NULL pointer", lambda: vcpu.ioctl(uapi.KVM_GET_REGS, 0))
            print(
                f"    kvm_run is mapped: exit_reason={vcpu.kvm_run.exit_reason}, "
                f"immediate_exit={vcpu.kvm_run.immediate_exit}"
            )
        # the memory stays pinned until every descriptor of the VM is closed
    mem.close()
    rom.close()


def demo(args: argparse.Namespace) -> int:
    print("kvmmmu: a model of the x86 KVM MMU behind a software /dev/kvm\n")
    print("== The simulator (kvmmmu.Kvm()) ==")
    rss = _rss_kib()
    big = GuestMemory(16 * TiB)
    big.write(8 * TiB, b"touched")
    print(
        f"  GuestMemory(16 TiB) at {big.address:#x}: RSS grew by {_rss_kib() - rss} KiB "
        "(MAP_NORESERVE: cost follows what is touched)"
    )
    big.close()
    with Kvm() as kvm:
        tour(kvm)

    path = args.device
    problem = None if path else "--no-device given"
    if path:
        problem = device_available(path)
    print(f"\n== The device ({path or 'none'}) ==")
    if problem:
        print(f"  skipped: {problem}")
        return 0
    with Kvm(path) as dev:
        tour(dev, list_caps=False)
    print("\n== Conformance: the shared case table on both backends ==")
    with Kvm() as sim, Kvm(path) as dev:
        agree = 0
        for case in CASES:
            a, b = run_case(sim, case), run_case(dev, case)
            if a == b or case.sim_expect is not None:
                agree += a == b or (case.holds(a, "sim") and case.holds(b, "dev"))
            else:
                note = f" (documented: {case.why})" if case.sim_expect else ""
                print(f"  differs: {case.name}: simulator {a}, device {b}{note}")
        print(
            f"  {agree} of {len(CASES)} cases give the same errno and value on both backends, "
            "or differ exactly as documented"
        )
    return 0


def caps(args: argparse.Namespace) -> int:
    with Kvm(args.device) if args.device else Kvm() as kvm:
        for name, v in kvm.capabilities().items():
            print(f"{name:40} {v}")
    return 0


def conformance(args: argparse.Namespace) -> int:
    problem = device_available(args.device)
    if problem:
        print(f"no device to compare with: {problem}", file=sys.stderr)
        return 2
    bad = 0
    with Kvm() as sim, Kvm(args.device) as dev:
        for case in CASES:
            a, b = run_case(sim, case), run_case(dev, case)
            status = "same" if a == b else ("documented" if case.sim_expect else "DIFFERS")
            bad += status == "DIFFERS"
            if args.verbose or status != "same":
                print(f"{status:10} {case.name:50} sim={a} dev={b}")
    print(f"{len(CASES) - bad} of {len(CASES)} cases agree or differ as documented")
    return 1 if bad else 0


def run(args: argparse.Namespace) -> int:
    """Boot the demo guest (kvmmmu.guest.demo) and print its exits, the MMU counters
    and the dirty pages."""
    if args.backend == "dev":
        problem = device_available(args.device)
        if problem:
            print(f"kvmmmu run: no device to run on: {problem}", file=sys.stderr)
            return 2
        kvm = Kvm(args.device)
        where = f"the device ({args.device})"
    else:
        kvm = Kvm()
        where = "the simulator (kvmmmu.Kvm())"
    if args.dot and args.backend == "dev":
        print("kvmmmu run: --dot needs the simulator (the device hides its MMU)", file=sys.stderr)
        return 2
    with kvm:
        try:
            res = guest_demo.run(kvm, keep=bool(args.dot))
        except OSError as e:
            name = errno.errorcode.get(e.errno or 0, str(e.errno))
            print(f"kvmmmu run: KVM_RUN failed on {where}: {name} ({e})", file=sys.stderr)
            if args.backend == "sim" and device_available(args.device) is None:
                print("  (the device runs it: kvmmmu run --backend dev)", file=sys.stderr)
            return 1
        try:
            if args.dot and res.machine is not None:
                path = dot.save(res.machine.vm.mmu.to_dot(), args.dot)
                dot_note = f"shadow pages written to {path}"
            else:
                dot_note = ""
        finally:
            if res.machine is not None:
                res.machine.vcpu.close()
                res.machine.vm.close()
    ok = bool(res.events) and res.events[-1].note == "the demo is done"
    if not args.quiet:
        print(f"kvmmmu run: the demo guest (long mode, 4-level paging) on {where}\n")
        print("exits:")
        for i, ev in enumerate(res.events, 1):
            print(f"  {i:3} {ev}")
        print()
    print(
        f"{len(res.events)} exits; guest exceptions: "
        + (", ".join(map(str, res.reports)) or "none")
    )
    print("vCPU counters: " + " ".join(f"{k}={v}" for k, v in res.vcpu_stats.items()))
    print("VM counters:   " + " ".join(f"{k}={v}" for k, v in res.vm_stats.items()))
    print(
        f"dirty pages of the data slot (slot {guest_demo.DATA_SLOT}, "
        f"gpa {guest_demo.DATA_GPA:#x}): {res.dirty_pages}"
    )
    if not args.quiet:
        ad = " ".join(f"{p}:{f or '-'}" for p, f in res.ad_bits.items())
        print(f"A/D bits in the guest's PTEs of the data pages: {ad}")
    if dot_note:
        print(dot_note)
    if not ok:
        print("kvmmmu run: the demo did not finish as expected", file=sys.stderr)
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvmmmu", description=__doc__)
    sub = p.add_subparsers(dest="cmd")
    r = sub.add_parser("run", help="boot the demo guest and show its exits (the default)")
    r.add_argument("--backend", choices=("sim", "dev"), default="sim")
    r.add_argument("--device", default=DEFAULT_PATH, help="the device for --backend dev")
    r.add_argument("--dot", default="", help="write the shadow pages (simulator): .dot/.svg/...")
    r.add_argument("-q", "--quiet", action="store_true", help="only the summary")
    d = sub.add_parser(
        "demo", aliases=["tour"], help="a guided tour of the API on the simulator and the device"
    )
    d.add_argument("--device", default=DEFAULT_PATH if os.path.exists(DEFAULT_PATH) else "")
    d.add_argument("--no-device", dest="device", action="store_const", const="")
    c = sub.add_parser("caps", help="the capability list (simulator, or --device PATH)")
    c.add_argument("--device", default="")
    k = sub.add_parser("conformance", help="run the case table on both backends")
    k.add_argument("--device", default=DEFAULT_PATH)
    k.add_argument("-v", "--verbose", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["run"]  # the demo guest is the main job
    elif argv[0] in {"--device", "--no-device"}:
        argv = ["demo", *argv]  # the tour's options alone: the tour, as before `run`
    args = p.parse_args(argv)
    commands = {"run": run, "demo": demo, "tour": demo, "caps": caps, "conformance": conformance}
    return commands[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
