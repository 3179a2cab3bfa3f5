"""Run the programs of rust/core/tests/run_programs.rs (``programs.txt``, written by
its ignored ``dump_programs`` test) on the device from the recorded start state and
write what each left (``programs_device.txt``). Run from the repository root with the
venv's python: ``python rust/core/tests/data/gen_programs_device.py``.
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT))

import kvmmmu  # noqa: E402
from kvmmmu.exits import ExitHlt  # noqa: E402
from tests.test_run import Guest  # noqa: E402

HERE = pathlib.Path(__file__).parent
NAMES = "rax rcx rdx rbx rsp rbp rsi rdi r8 r9 r10 r11 r12 r13 r14 r15".split()


def outcome(g: Guest, bits: int) -> str:
    r = g.vcpu.get_regs()
    mask = (1 << bits) - 1
    names = NAMES if bits == 64 else NAMES[:8]
    regs = " ".join(f"{getattr(r, n) & mask:x}" for n in names)
    return f"{regs} {r.rflags & 0xFFF:x} {g.mem.read(0x8F00, 512).hex()}"


def main() -> None:
    kvm = kvmmmu.Kvm(sys.argv[1] if len(sys.argv) > 1 else "/dev/kvm")
    lines = (HERE / "programs.txt").read_text().splitlines()
    start = next(line for line in lines if line.startswith("start ")).split()[1:]
    out = [f"# what each program of programs.txt left on {kvm.backend} (gen_programs_device.py)"]
    for line in lines:
        if line.startswith(("#", "start ")):
            continue
        name, bits_s, code = line.split()
        bits = int(bits_s)
        g = Guest(kvm, "lm64" if bits == 64 else "pm32", bytes.fromhex(code))
        g.mem.write(0x8F00, bytes.fromhex(start[17]))
        r = g.vcpu.get_regs()
        for n, v in zip(NAMES, start[:16], strict=True):
            setattr(r, n, int(v, 16))
        r.rflags = int(start[16], 16)
        g.vcpu.set_regs(r)
        e = g.run()
        out.append(f"{name} {outcome(g, bits)}" if e == ExitHlt() else f"{name} skip {e}")
        g.close()
    (HERE / "programs_device.txt").write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
