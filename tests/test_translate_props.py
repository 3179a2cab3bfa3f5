"""KVM_TRANSLATE over random 4-level page tables: the simulator and the device
return the same translation and leave the same accessed bits in guest memory."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvmmmu
from kvmmmu import GuestMemory
from kvmmmu.conformance.cases import lm64

from .conftest import DEVICE, DEVICE_PROBLEM

MiB = 1 << 20
P, W, U, A, D, PS = 1, 2, 4, 1 << 5, 1 << 6, 1 << 7
NX = 1 << 63
TABLES = {4: 0x1000, 3: 0x2000, 2: 0x3000, 1: 0x4000}
NEXT = {4: 0x2000, 3: 0x3000, 2: 0x4000}

flag_bits = st.sampled_from([P, P | W, P | U, P | W | U, 0, W | U]).flatmap(
    lambda base: st.tuples(
        st.just(base),
        st.sampled_from([0, A, A | D, D]),
        st.sampled_from([0, 0, 0, NX, 1 << 51, 1 << 40, 1 << 35, 1 << 52]),
    )
)
pde_kind = st.sampled_from(["table", "2m", "2m-bit13"])
cpu = st.fixed_dictionaries(
    {"nxe": st.booleans(), "smep": st.booleans(), "smap": st.booleans(), "wp": st.booleans()}
)
offsets = st.lists(st.integers(0, 2 * MiB - 1), min_size=1, max_size=4)


def _entry(flags: tuple[int, int, int], frame: int) -> int:
    base, ad, extra = flags
    return frame | base | ad | extra


def _run(
    kvm: kvmmmu.Kvm,
    levels: list[tuple[int, int, int]],
    kind: str,
    c: dict[str, bool],
    offs: list[int],
) -> tuple[list[tuple[int, int]], list[int]]:
    with kvm.create_vm() as vm:
        mem = GuestMemory(8 * MiB)
        vm.set_user_memory_region(0, 0, 8 * MiB, mem)
        gva = 0x80_0000_0000  # PML4 index 1, PDPT 0, PD 0
        e = {
            4: TABLES[4] + 8,
            3: TABLES[3],
            2: TABLES[2],
            1: TABLES[1],
        }
        mem.write(e[4], struct.pack("<Q", _entry(levels[0], NEXT[4])))
        mem.write(e[3], struct.pack("<Q", _entry(levels[1], NEXT[3])))
        if kind == "table":
            mem.write(e[2], struct.pack("<Q", _entry(levels[2], NEXT[2])))
        else:
            extra = 1 << 13 if kind == "2m-bit13" else 0
            mem.write(e[2], struct.pack("<Q", _entry(levels[2], 0x60_0000) | PS | extra))
        mem.write(e[1], struct.pack("<Q", _entry(levels[3], 0x70_0000)))
        with vm.create_vcpu(0) as vcpu:
            s = lm64(vcpu.get_sregs())
            s.cr3 = TABLES[4]
            s.efer = 0x500 | (0x800 if c["nxe"] else 0)
            s.cr4 = 0x20 | (1 << 20 if c["smep"] else 0) | (1 << 21 if c["smap"] else 0)
            s.cr0 = 0x80000011 | (1 << 16 if c["wp"] else 0)
            vcpu.set_sregs(s)
            out = []
            for off in offs:
                t = vcpu.translate(gva + off)
                out.append((t.physical_address, t.valid))
        after = [int(struct.unpack("<Q", mem.read(e[lvl], 8))[0]) for lvl in (4, 3, 2, 1)]
    return out, after


@pytest.mark.skipif(DEVICE_PROBLEM is not None, reason=f"no usable KVM device: {DEVICE_PROBLEM}")
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(flag_bits, min_size=4, max_size=4), pde_kind, cpu, offsets)
def test_translate_agrees_with_device(
    levels: list[tuple[int, int, int]], kind: str, c: dict[str, bool], offs: list[int]
) -> None:
    sim = _run(kvmmmu.Kvm(), levels, kind, c, offs)
    dev = _run(kvmmmu.Kvm(DEVICE), levels, kind, c, offs)
    assert sim == dev
