"""Regenerate alu_device.txt (the golden cases of rust/core/tests/run_alu.rs).

Each case runs on the device (KVM's emulator runs the host CPU's instruction, so the
flags are this machine's) and on the simulator; differences are printed, and the
device's results are written. Run from the repository root with the venv's python:
``python rust/core/tests/data/gen_alu_device.py [-v]``.
"""

import itertools
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT))

import kvmmmu  # noqa: E402
from tests.test_run import Code, Guest, I, R, asm, hlt  # noqa: E402

sim, dev = kvmmmu.Kvm(), kvmmmu.Kvm("/dev/kvm")
REGS = {
    8: (R.AL, R.BL, R.CL),
    16: (R.AX, R.BX, R.CX),
    32: (R.EAX, R.EBX, R.ECX),
    64: (R.RAX, R.RBX, R.RCX),
}


def C(name):
    return getattr(Code, name)


cases = []
vals = {
    8: [0, 1, 0x7F, 0x80, 0xFF, 0x0F],
    16: [0, 1, 0x7FFF, 0x8000, 0xFFFF, 0x0F0F],
    32: [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x0F0F0F0F],
    64: [0, 1, 0x7FFFFFFFFFFFFFFF, 0x8000000000000000, 0xFFFFFFFFFFFFFFFF, 0x0F0F0F0F0F0F0F0F],
}
for bits in (8, 16, 32, 64):
    a_, b_, c_ = REGS[bits]
    rm = f"RM{bits}"
    r = f"R{bits}"
    for op in ["ADD", "ADC", "SUB", "SBB", "AND", "OR", "XOR", "CMP"]:
        for x, y in itertools.product(vals[bits][:5], vals[bits][1:5]):
            for cf in (0, 1) if op in ("ADC", "SBB") else (0,):
                cases.append(
                    (f"{op}{bits}", I.create_reg_reg(C(f"{op}_{r}_{rm}"), a_, b_), x, y, 0, cf)
                )
    for op in ["TEST"]:
        for x, y in itertools.product(vals[bits][:5], vals[bits][1:5]):
            cases.append((f"{op}{bits}", I.create_reg_reg(C(f"{op}_{rm}_{r}"), a_, b_), x, y, 0, 0))
    for op in ["INC", "DEC", "NEG", "NOT"]:
        for x in vals[bits]:
            cases.append((f"{op}{bits}", I.create_reg(C(f"{op}_{rm}"), a_), x, 0, 0, 1))
    for op in ["SHL", "SHR", "SAR", "ROL", "ROR", "RCL", "RCR"]:
        for x in vals[bits][1:]:
            for cnt in (0, 1, 2, bits - 1, bits, bits + 1, 31, 63):
                for cf in (0, 1):
                    cases.append(
                        (
                            f"{op}{bits}",
                            I.create_reg_reg(C(f"{op}_{rm}_CL"), a_, R.CL),
                            x,
                            0,
                            cnt,
                            cf,
                        )
                    )
    if bits > 8:
        for op in ["SHLD", "SHRD"]:
            for x, y in itertools.product(vals[bits][1:4], vals[bits][3:6]):
                for cnt in (0, 1, 3, bits - 1, bits, bits + 1, 31):
                    cases.append(
                        (
                            f"{op}{bits}",
                            I.create_reg_reg_reg(C(f"{op}_{rm}_{r}_CL"), a_, b_, R.CL),
                            x,
                            y,
                            cnt,
                            0,
                        )
                    )
        for op in ["BT", "BTS", "BTR", "BTC"]:
            for x in vals[bits][1:]:
                for y in (0, 1, 7, bits - 1, bits + 3):
                    cases.append(
                        (f"{op}{bits}", I.create_reg_reg(C(f"{op}_{rm}_{r}"), a_, b_), x, y, 0, 0)
                    )
        for op in ["BSF", "BSR"]:
            for y in vals[bits][1:]:
                cases.append(
                    (f"{op}{bits}", I.create_reg_reg(C(f"{op}_{r}_{rm}"), a_, b_), 0x55, y, 0, 0)
                )
        for x, y in itertools.product(vals[bits][1:], vals[bits][1:5]):
            cases.append(
                (f"IMUL2_{bits}", I.create_reg_reg(C(f"IMUL_{r}_{rm}"), a_, b_), x, y, 0, 0)
            )
    for x, y in itertools.product(vals[bits][1:], vals[bits][1:5]):
        cases.append((f"MUL{bits}", I.create_reg(C(f"MUL_{rm}"), b_), x, y, 0, 0))
        cases.append((f"IMUL1_{bits}", I.create_reg(C(f"IMUL_{rm}"), b_), x, y, 0, 0))
    for x, y in itertools.product(vals[bits][1:], [3, 0x7F, vals[bits][4]]):
        cases.append((f"DIV{bits}", I.create_reg(C(f"DIV_{rm}"), b_), x, y, 0, 0))

gs = {}


def run(kvm, ins, *regs):
    a, b, c, cf = regs
    code = asm(64, [ins, I.create(Code.PUSHFQ), I.create_reg(Code.POP_R64, R.RSI), hlt()])
    key = kvm.backend
    g = gs.get(key)
    if g is None:
        g = gs[key] = Guest(kvm, "lm64", code)
    g.mem.write(0x1000, code)
    r = g.vcpu.get_regs()
    r.rip, r.rsp = 0x1000, 0x8000
    r.rax, r.rbx, r.rcx, r.rdx, r.rsi = a, b, c, 0, 0
    r.rflags = 2 | cf
    g.vcpu.set_regs(r)
    e = g.run()
    r = g.vcpu.get_regs()
    return (str(e), r.rax, r.rbx, r.rcx, r.rdx, r.rsi & 0xFFF)


diff = 0
golden = []
for name, ins, a, b, c, cf in cases:
    s = run(sim, ins, a, b, c, cf)
    d = run(dev, ins, a, b, c, cf)
    golden.append((name, a, b, c, cf, d))
    if s != d:
        diff += 1
        if diff <= 60 or "-v" in sys.argv:
            print(f"{name} a={a:#x} b={b:#x} c={c} cf={cf}: sim={s[1:]} dev={d[1:]} {s[0]} {d[0]}")
print(f"{len(cases)} cases, {diff} differ")

# The golden file for rust/core/tests/run_alu.rs: bytes, inputs, the device's outputs.
with open(pathlib.Path(__file__).with_name("alu_device.txt"), "w") as f:
    f.write("# insn-hex rax rbx rcx rflags-in | rax rbx rcx rdx flags-mask flags")
    f.write(" (device: kvm_pvm emulator on AMD EPYC)\n")
    for (name, ins, a, b, c, cf), (_, _, _, _, _, d) in zip(cases, golden, strict=True):
        code = asm(64, [ins]).hex()
        mask = 0x40 if name.startswith(("BSF", "BSR")) else 0xFFF
        outs = " ".join(f"{v:x}" for v in (*d[1:5], mask, d[5]))
        f.write(f"{code} {a:x} {b:x} {c:x} {2 | cf:x} | {outs}\n")
