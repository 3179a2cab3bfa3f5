"""KVM_GET_SUPPORTED_CPUID, KVM_SET_CPUID2, KVM_GET_CPUID2 on both backends, and the decoders
of kvmmmu.cpuid. Device facts: docs/device-cpuid.md (tools/probe_cpuid.py)."""

from __future__ import annotations

import ctypes
import errno as E
import mmap
from collections.abc import Iterator
from typing import Any

import pytest

import kvmmmu
from kvmmmu import cpuid, uapi
from kvmmmu.cpuid import entry

SIG = cpuid.KVM_SIGNATURE
SIG_REGS = (
    int.from_bytes(SIG[0:4], "little"),
    int.from_bytes(SIG[4:8], "little"),
    int.from_bytes(SIG[8:12], "little"),
)
CR4_PAE, CR4_OSXSAVE, CR4_PKE, CR4_SMEP = 1 << 5, 1 << 18, 1 << 22, 1 << 20


def kvm_leaves(features: int = cpuid.KVM_HOST_FEATURES) -> list[uapi.kvm_cpuid_entry2]:
    return [
        entry(cpuid.KVM_CPUID_SIGNATURE, eax=cpuid.KVM_CPUID_FEATURES, ebx=SIG_REGS[0],
              ecx=SIG_REGS[1], edx=SIG_REGS[2]),
        entry(cpuid.KVM_CPUID_FEATURES, eax=features),
    ]  # fmt: skip


def errno_of(call: Any, *args: Any) -> int:
    try:
        call(*args)
    except OSError as e:
        return e.errno or -1
    return 0


def raw(kvm_or_vcpu: Any, request: int, buf: Any) -> int:
    """The errno of one raw ioctl (0 on success)."""
    return errno_of(kvm_or_vcpu.ioctl, request, buf)


def header_buf(nent: int, room: int = 0, padding: int = 0) -> Any:
    buf: Any = uapi.make_cpuid2(room)
    buf.nent, buf.padding = nent, padding
    return buf


@pytest.fixture
def vcpu(kvm: kvmmmu.Kvm) -> Iterator[kvmmmu.Vcpu]:
    vm = kvm.create_vm()
    v = vm.create_vcpu(0)
    yield v
    v.close()
    vm.close()


class PageEnd:
    """A kvm_cpuid2 header in the last 8 bytes of a page whose next page is PROT_NONE: the
    header is readable and writable, the entries fault."""

    def __init__(self) -> None:
        self.map = mmap.mmap(-1, 2 * mmap.PAGESIZE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self._second = base + mmap.PAGESIZE
        assert self._libc.mprotect(self._second, mmap.PAGESIZE, 0) == 0
        self.addr = self._second - 8

    def set(self, nent: int, padding: int = 0x55) -> None:
        self.map[mmap.PAGESIZE - 8 : mmap.PAGESIZE] = nent.to_bytes(4, "little") + padding.to_bytes(
            4, "little"
        )

    def header(self) -> tuple[int, int]:
        b = self.map[mmap.PAGESIZE - 8 : mmap.PAGESIZE]
        return int.from_bytes(b[:4], "little"), int.from_bytes(b[4:], "little")

    def close(self) -> None:
        self._libc.mprotect(self._second, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_WRITE)
        self.map.close()


@pytest.fixture
def page_end() -> Iterator[PageEnd]:
    p = PageEnd()
    yield p
    p.close()


# ---------------------------------------------------------------- KVM_GET_SUPPORTED_CPUID


def test_supported_kvm_leaves(kvm: kvmmmu.Kvm) -> None:
    t = kvm.get_supported_cpuid()
    assert 1 < len(t) <= cpuid.KVM_MAX_CPUID_ENTRIES
    assert cpuid.kvm_signature(t) == b"KVMKVMKVM\0\0\0"
    assert cpuid.is_kvm(t)
    assert cpuid.kvm_max_leaf(t) == cpuid.KVM_CPUID_FEATURES
    feat = cpuid.find(t, cpuid.KVM_CPUID_FEATURES)
    assert feat is not None
    assert (feat.ebx, feat.ecx, feat.edx) == (0, 0, 0)
    names = cpuid.kvm_features(t)
    assert "KVM_FEATURE_NOP_IO_DELAY" in names
    assert "KVM_FEATURE_MMU_OP" not in names  # deprecated: never reported
    # KVM emits the basic leaves, the extended ones, then the KVM ones.
    assert t[0].function == 0
    assert [e.function for e in t[-2:]] == [cpuid.KVM_CPUID_SIGNATURE, cpuid.KVM_CPUID_FEATURES]
    top = cpuid.max_basic_leaf(t)
    assert top is not None
    assert {e.function for e in t if e.function < 0x40000000} == set(range(top + 1))


def test_kvm_leaves_agree_between_backends(sim_kvm: kvmmmu.Kvm, dev_kvm: kvmmmu.Kvm) -> None:
    sim, dev = sim_kvm.get_supported_cpuid(), dev_kvm.get_supported_cpuid()
    s_sig, d_sig = (cpuid.find(t, cpuid.KVM_CPUID_SIGNATURE) for t in (sim, dev))
    assert s_sig is not None and d_sig is not None
    assert s_sig == d_sig  # every byte: function, index, flags, registers, padding
    s_feat, d_feat = (cpuid.find(t, cpuid.KVM_CPUID_FEATURES) for t in (sim, dev))
    assert s_feat is not None and d_feat is not None
    assert (s_feat.ebx, s_feat.ecx, s_feat.edx) == (d_feat.ebx, d_feat.ecx, d_feat.edx)
    # Of the cpuid.txt bits, NOP_IO_DELAY and MMU_OP agree; the kvmclock ones are the
    # documented difference (the simulator has no kvmclock).
    for name in ("KVM_FEATURE_NOP_IO_DELAY", "KVM_FEATURE_MMU_OP"):
        bit = 1 << getattr(uapi, name)
        assert s_feat.eax & bit == d_feat.eax & bit, name
    assert d_feat.eax == cpuid.KVM_HOST_FEATURES
    assert s_feat.eax == cpuid.SIM_KVM_FEATURES
    assert s_feat.eax & ~d_feat.eax == 0, "the simulator claims a PV feature KVM lacks"


def test_supported_flags(kvm: kvmmmu.Kvm) -> None:
    for e in kvm.get_supported_cpuid():
        indexed = e.function in cpuid.INDEXED_LEAVES
        assert e.flags == (uapi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX if indexed else 0), hex(e.function)
        assert list(e.padding) == [0, 0, 0]
        assert indexed or e.index == 0


def test_supported_nent_rules(kvm: kvmmmu.Kvm) -> None:
    n = len(kvm.get_supported_cpuid())
    # Too small (0 included): E2BIG, and nent is not written back.
    for nent in (0, 1, 2, n - 1):
        buf = header_buf(nent, room=max(nent, 1), padding=0xDEAD)
        assert raw(kvm, uapi.KVM_GET_SUPPORTED_CPUID, buf) == E.E2BIG
        assert (buf.nent, buf.padding) == (nent, 0xDEAD)
    # Enough, more than enough, above KVM_MAX_CPUID_ENTRIES (clamped, not an error): nent is
    # written back; the header's padding word is left alone.
    for nent in (n, n + 1, 256, 257, 100_000):
        buf = header_buf(nent, room=n, padding=0xDEAD)
        assert raw(kvm, uapi.KVM_GET_SUPPORTED_CPUID, buf) == 0, nent
        assert (buf.nent, buf.padding) == (n, 0xDEAD)
    with pytest.raises(OSError) as ei:
        kvm.get_supported_cpuid(nent=n - 1)
    assert ei.value.errno == E.E2BIG
    assert len(kvm.get_supported_cpuid(nent=n)) == n


def test_supported_efault(kvm: kvmmmu.Kvm, page_end: PageEnd) -> None:
    for ptr in (0, 0x10, 0xFFFF_8000_0000_0000):
        assert raw(kvm, uapi.KVM_GET_SUPPORTED_CPUID, ptr) == E.EFAULT
    n = len(kvm.get_supported_cpuid())
    page_end.set(n)
    assert raw(kvm, uapi.KVM_GET_SUPPORTED_CPUID, page_end.addr) == E.EFAULT
    assert page_end.header() == (n, 0x55)  # not written back
    page_end.set(1)  # nent is checked before the entries are written
    assert raw(kvm, uapi.KVM_GET_SUPPORTED_CPUID, page_end.addr) == E.E2BIG
    page_end.set(0)
    assert raw(kvm, uapi.KVM_GET_SUPPORTED_CPUID, page_end.addr) == E.E2BIG


def test_supported_is_system_only(kvm: kvmmmu.Kvm, vcpu: kvmmmu.Vcpu) -> None:
    buf = header_buf(256, room=256)
    assert raw(vcpu, uapi.KVM_GET_SUPPORTED_CPUID, buf) == E.EINVAL
    assert raw(vcpu.vm, uapi.KVM_GET_SUPPORTED_CPUID, buf) == E.ENOTTY
    assert raw(kvm, uapi.KVM_SET_CPUID2, header_buf(0)) == E.EINVAL
    assert raw(kvm, uapi.KVM_GET_CPUID2, header_buf(0)) == E.EINVAL


def test_sim_supported_table(sim_kvm: kvmmmu.Kvm) -> None:
    t = sim_kvm.get_supported_cpuid()
    s = cpuid.summarize(t)
    assert s.vendor == "GenuineIntel"
    assert (s.maxphyaddr, s.maxlinaddr) == (48, 57 if s.features["LA57"] else 48)
    for name in ("PSE", "PAE", "PGE", "PSE36", "NX", "LM", "SMEP", "SMAP", "APIC", "HYPERVISOR"):
        assert s.features[name], name
    # Runtime bits are never advertised.
    assert not s.features["OSXSAVE"] and not s.features["OSPKE"]
    assert s.kvm_features == ["KVM_FEATURE_NOP_IO_DELAY"]
    assert len(t) == 26 + int(s.features["LAM"] or s.features["FRED"])
    assert t == sim_kvm.get_supported_cpuid()  # deterministic


# ---------------------------------------------------------------- KVM_SET_CPUID2 / GET_CPUID2


def test_get_on_fresh_vcpu(vcpu: kvmmmu.Vcpu) -> None:
    for room in (0, 1, 5):
        assert cpuid.cpuid2_nent(vcpu.transport, vcpu.fd, uapi.KVM_GET_CPUID2, room) == (0, 0)
    assert vcpu.get_cpuid2() == []


def test_kvm_leaves_round_trip(vcpu: kvmmmu.Vcpu) -> None:
    odd = entry(0x4FFF0000, index=3, flags=1, eax=5, ebx=6, ecx=7, edx=8)
    table = [*kvm_leaves(0x12345), odd]
    table[1].ebx, table[1].edx = 1, 3
    vcpu.set_cpuid2(table)
    assert vcpu.get_cpuid2() == table
    assert vcpu.get_cpuid2(nent=3) == table


def test_set_nent_limits(vcpu: kvmmmu.Vcpu) -> None:
    for nent in (257, 1000, 100_000, 0xFFFF_FFFF):
        assert raw(vcpu, uapi.KVM_SET_CPUID2, header_buf(nent)) == E.E2BIG
    assert raw(vcpu, uapi.KVM_SET_CPUID2, header_buf(0)) == 0
    assert vcpu.get_cpuid2() == []
    many = [entry(0x4F000000 + i, eax=i) for i in range(256)]
    vcpu.set_cpuid2(many)
    assert len(vcpu.get_cpuid2()) == 256


def test_set_get_efault(vcpu: kvmmmu.Vcpu, page_end: PageEnd) -> None:
    for request in (uapi.KVM_SET_CPUID2, uapi.KVM_GET_CPUID2):
        assert raw(vcpu, request, 0) == E.EFAULT
        assert raw(vcpu, request, 0x10) == E.EFAULT
    page_end.set(1)
    assert raw(vcpu, uapi.KVM_SET_CPUID2, page_end.addr) == E.EFAULT
    page_end.set(0)
    assert raw(vcpu, uapi.KVM_SET_CPUID2, page_end.addr) == 0
    page_end.set(300)
    assert raw(vcpu, uapi.KVM_SET_CPUID2, page_end.addr) == E.E2BIG
    vcpu.set_cpuid2(kvm_leaves())
    page_end.set(5)
    assert raw(vcpu, uapi.KVM_GET_CPUID2, page_end.addr) == E.EFAULT
    assert page_end.header() == (5, 0x55)
    page_end.set(1)
    assert raw(vcpu, uapi.KVM_GET_CPUID2, page_end.addr) == E.E2BIG
    assert page_end.header() == (1, 0x55)


def test_get_nent_rules(vcpu: kvmmmu.Vcpu) -> None:
    vcpu.set_cpuid2(kvm_leaves())
    t, req = vcpu.transport, uapi.KVM_GET_CPUID2
    # Too small: E2BIG and nent is NOT set to the needed count (it keeps the caller's value).
    assert cpuid.cpuid2_nent(t, vcpu.fd, req, 0) == (E.E2BIG, 0)
    assert cpuid.cpuid2_nent(t, vcpu.fd, req, 1) == (E.E2BIG, 1)
    # Enough: nent becomes the stored count; the padding word is kept.
    assert cpuid.cpuid2_nent(t, vcpu.fd, req, 2) == (0, 2)
    buf = header_buf(40, room=40, padding=0xABCD)
    assert raw(vcpu, req, buf) == 0
    assert (buf.nent, buf.padding) == (2, 0xABCD)


def test_vaddr_width_rule(vcpu: kvmmmu.Vcpu) -> None:
    def l8(vaddr: int, index: int = 0, flags: int = 0) -> uapi.kvm_cpuid_entry2:
        return entry(0x80000008, index=index, flags=flags, eax=vaddr << 8 | 40)

    for vaddr in (0, 48, 57):
        vcpu.set_cpuid2([l8(vaddr)])
    for vaddr in (1, 32, 39, 47, 49, 56, 58, 64, 255):
        assert errno_of(vcpu.set_cpuid2, [l8(vaddr)]) == E.EINVAL, vaddr
    # Only the first 0x80000008 entry is checked, whatever its index and flags.
    vcpu.set_cpuid2([l8(48), l8(40)])
    assert errno_of(vcpu.set_cpuid2, [l8(40), l8(48)]) == E.EINVAL
    assert errno_of(vcpu.set_cpuid2, [l8(40, index=3, flags=1)]) == E.EINVAL
    # MAXPHYADDR itself is not validated.
    for phys in (0, 20, 52, 64, 255):
        vcpu.set_cpuid2([entry(0x80000008, eax=48 << 8 | phys)])


def test_dynamic_xfeature_needs_permission(vcpu: kvmmmu.Vcpu) -> None:
    xtile = 0x60003  # x87 | SSE | XTILE_CFG | XTILE_DATA
    assert errno_of(vcpu.set_cpuid2, [entry(0xD, eax=xtile)]) == E.EPERM
    assert errno_of(vcpu.set_cpuid2, [entry(0xD, index=5, flags=0, eax=xtile)]) == E.EPERM
    vcpu.set_cpuid2([entry(0xD, index=5, eax=xtile)])  # not subleaf 0: not looked at
    vcpu.set_cpuid2([entry(0xD, eax=0x20003)])  # XTILE_CFG alone is not dynamic


def test_failed_set_keeps_table(vcpu: kvmmmu.Vcpu) -> None:
    table = kvm_leaves()
    vcpu.set_cpuid2(table)
    assert errno_of(vcpu.set_cpuid2, [entry(0x80000008, eax=40 << 8 | 40)]) == E.EINVAL
    assert errno_of(vcpu.set_cpuid2, [entry(0xD, eax=0x60003)]) == E.EPERM
    assert raw(vcpu, uapi.KVM_SET_CPUID2, header_buf(300)) == E.E2BIG
    assert vcpu.get_cpuid2() == table


def test_duplicates_and_padding_kept(vcpu: kvmmmu.Vcpu) -> None:
    odd = entry(0x4FFF0001, index=7, flags=0xFE, eax=1)
    odd.padding[:] = [9, 9, 9]
    table = [*kvm_leaves(), *kvm_leaves(0), odd]
    vcpu.set_cpuid2(table)
    assert vcpu.get_cpuid2() == table


def test_runtime_bits(vcpu: kvmmmu.Vcpu) -> None:
    xsave, osxsave, apic = 1 << 26, 1 << 27, 1 << 9
    leaf1 = entry(1, eax=0x806F8, ecx=xsave | osxsave, edx=0)
    leaf7 = entry(7, ecx=1 << 4 | 1 << 3)  # OSPKE | PKU
    vcpu.set_cpuid2([leaf1, leaf7])

    def bits() -> tuple[bool, bool, bool]:
        t = vcpu.get_cpuid2()
        return (cpuid.has(t, "OSXSAVE"), cpuid.has(t, "APIC"), cpuid.has(t, "OSPKE"))

    # A fresh vCPU: CR4 = 0 (OSXSAVE, OSPKE clear), APIC_BASE.EN set.
    assert bits() == (False, True, False)
    s = vcpu.get_sregs()
    s.cr4 |= CR4_OSXSAVE
    vcpu.set_sregs(s)
    assert bits() == (True, True, False)
    s = vcpu.get_sregs()
    s.apic_base &= ~(1 << 11)
    vcpu.set_sregs(s)
    assert bits() == (True, False, False)
    # CR4.PKE needs PKU in the guest CPUID and in the caps; when accepted, OSPKE follows it.
    s = vcpu.get_sregs()
    s.cr4 |= CR4_PKE
    if errno_of(vcpu.set_sregs, s) == 0:
        assert bits() == (True, False, True)
    t = vcpu.get_cpuid2()
    assert t[0].edx & apic == 0


def test_xsave_size_runtime(vcpu: kvmmmu.Vcpu) -> None:
    # 0xd.0 EBX is the size for the current XCR0 (x87 after reset: 576), whatever was set.
    vcpu.set_cpuid2([entry(0xD, eax=3, ebx=0x1234, ecx=0x240), entry(0xD, index=1, ebx=0x999)])
    t = vcpu.get_cpuid2()
    d0 = cpuid.find(t, 0xD, 0)
    assert d0 is not None and d0.ebx == 576


def test_maxphyaddr_gates_cr3(vcpu: kvmmmu.Vcpu) -> None:
    vcpu.set_cpuid2([entry(0x80000000, eax=0x80000008), entry(0x80000008, eax=48 << 8 | 40)])
    assert cpuid.maxphyaddr(vcpu.get_cpuid2()) == 40
    s = vcpu.get_sregs()
    s.cs.update(dict(base=0, limit=0xFFFFFFFF, selector=8, type=11, present=1, s=1, l=1, g=1))
    s.cr0, s.cr4, s.efer, s.cr3 = 0x80050033, CR4_PAE, 0xD01, 1 << 39
    vcpu.set_sregs(s)
    s.cr3 = 1 << 40
    assert errno_of(vcpu.set_sregs, s) == E.EINVAL


def test_x2apic_follows_table(vcpu: kvmmmu.Vcpu) -> None:
    vcpu.set_cpuid2(kvm_leaves())
    s = vcpu.get_sregs()
    s.apic_base = 0xFEE00D00
    assert errno_of(vcpu.set_sregs, s) == E.EINVAL


def test_sim_supported_table_drives_checks(sim_kvm: kvmmmu.Kvm) -> None:
    """On the simulator, the supported table and the SET_SREGS checks agree bit for bit."""
    t = sim_kvm.get_supported_cpuid()
    vm = sim_kvm.create_vm()
    v = vm.create_vcpu(0)
    v.set_cpuid2(t)
    assert v.get_cpuid2() == t  # only runtime bits could differ, and they already match
    cr4_bits = {
        "SMEP": CR4_SMEP, "SMAP": 1 << 21, "FSGSBASE": 1 << 16, "UMIP": 1 << 11,
        "XSAVE": CR4_OSXSAVE, "PKU": CR4_PKE, "LA57": 1 << 12, "PCID": 1 << 17,
    }  # fmt: skip
    for name, bit in cr4_bits.items():
        s = v.get_sregs()
        s.cr4 = bit
        want = 0 if cpuid.has(t, name) else E.EINVAL
        assert errno_of(v.set_sregs, s) == want, name
    # Without SMEP in the table, CR4.SMEP is refused (the device accepts it: a PVM quirk).
    v.set_cpuid2(cpuid.with_changes(t, {(7, 0): {"ebx": 0}}))
    s = v.get_sregs()
    s.cr4 = CR4_SMEP
    assert errno_of(v.set_sregs, s) == E.EINVAL
    v.close()
    vm.close()


def test_dev_accepts_smep_without_cpuid(dev_kvm: kvmmmu.Kvm) -> None:
    """The documented difference, seen from the device side."""
    vm = dev_kvm.create_vm()
    v = vm.create_vcpu(0)
    v.set_cpuid2(kvm_leaves())
    s = v.get_sregs()
    s.cr4 = CR4_SMEP
    v.set_sregs(s)
    v.close()
    vm.close()


# ---------------------------------------------------------------- decoders


def test_kvm_feature_names() -> None:
    assert cpuid.KVM_HOST_FEATURES == 0x01007EFB
    assert cpuid.SIM_KVM_FEATURES == 0x2
    expected = {
        0: "CLOCKSOURCE", 1: "NOP_IO_DELAY", 2: "MMU_OP", 3: "CLOCKSOURCE2", 4: "ASYNC_PF",
        5: "STEAL_TIME", 6: "PV_EOI", 7: "PV_UNHALT", 9: "PV_TLB_FLUSH", 10: "ASYNC_PF_VMEXIT",
        11: "PV_SEND_IPI", 12: "POLL_CONTROL", 13: "PV_SCHED_YIELD", 14: "ASYNC_PF_INT",
        15: "MSI_EXT_DEST_ID", 16: "HC_MAP_GPA_RANGE", 17: "MIGRATION_CONTROL",
        24: "CLOCKSOURCE_STABLE_BIT",
    }  # fmt: skip
    assert cpuid.KVM_FEATURE_NAMES == {b: f"KVM_FEATURE_{n}" for b, n in expected.items()}
    assert cpuid.DEPRECATED_FEATURES == {"KVM_FEATURE_MMU_OP"}
    names = cpuid.decode_kvm_features(0x01007EFB)
    assert (
        names[0] == "KVM_FEATURE_CLOCKSOURCE" and names[-1] == "KVM_FEATURE_CLOCKSOURCE_STABLE_BIT"
    )
    assert len(names) == 14 and "KVM_FEATURE_MMU_OP" not in names
    assert cpuid.decode_kvm_features(1 << 30 | 1 << 2) == ["KVM_FEATURE_MMU_OP", "bit 30"]
    assert cpuid.kvm_feature_bits(names) == 0x01007EFB
    assert cpuid.kvm_feature_bits(["NOP_IO_DELAY"]) == cpuid.SIM_KVM_FEATURES
    assert cpuid.decode_kvm_hints(1) == ["KVM_HINTS_REALTIME"]
    assert set(cpuid.CPUID_TXT_FEATURES) <= set(cpuid.KVM_FEATURE_NAMES.values())


def test_kvm_leaf_decoders() -> None:
    t = kvm_leaves()
    assert cpuid.kvm_signature(t) == b"KVMKVMKVM\0\0\0"
    assert cpuid.is_kvm(t) and not cpuid.is_kvm([])
    assert cpuid.kvm_max_leaf(t) == 0x40000001
    assert cpuid.kvm_signature([]) is None and cpuid.kvm_max_leaf([]) is None
    assert cpuid.kvm_features([]) == []
    assert len(cpuid.kvm_features(t)) == 14


def test_architectural_decoders() -> None:
    def vendor_leaf(text: bytes) -> uapi.kvm_cpuid_entry2:
        w = [int.from_bytes(text[i : i + 4], "little") for i in (0, 4, 8)]
        return entry(0, eax=0xD, ebx=w[0], edx=w[1], ecx=w[2])

    t = [
        vendor_leaf(b"AuthenticAMD"),
        entry(1, ecx=1 << 21, edx=1 << 3 | 1 << 6 | 1 << 13 | 1 << 17),
        entry(7, ebx=1 << 7 | 1 << 20, ecx=1 << 3 | 1 << 16),
        entry(0x80000000, eax=0x80000008),
        entry(0x80000001, edx=1 << 20 | 1 << 26 | 1 << 29),
        entry(0x80000008, eax=57 << 8 | 52),
    ]
    assert cpuid.vendor(t) == "AuthenticAMD"
    assert cpuid.vendor([vendor_leaf(b"GenuineIntel")]) == "GenuineIntel"
    assert cpuid.max_basic_leaf(t) == 0xD and cpuid.max_extended_leaf(t) == 0x80000008
    assert (cpuid.maxphyaddr(t), cpuid.maxlinaddr(t)) == (52, 57)
    for name in ("PSE", "PAE", "PGE", "PSE36", "X2APIC", "SMEP", "SMAP", "PKU", "LA57",
                 "NX", "PDPE1GB", "LM"):  # fmt: skip
        assert cpuid.has(t, name), name
    for name in ("OSPKE", "OSXSAVE", "PCID", "UMIP", "LAM", "SVM"):
        assert not cpuid.has(t, name), name
    # MAXPHYADDR: 36 unless 0x80000000 reaches 0x80000008 and the leaf exists.
    assert cpuid.maxphyaddr([]) == 36
    assert cpuid.maxphyaddr(t[-1:]) == 36
    assert cpuid.maxphyaddr([entry(0x80000000, eax=0x80000007), t[-1]]) == 36
    assert (
        cpuid.maxphyaddr([entry(0x80000000, eax=0x80000008), entry(0x80000008, eax=0x3030)]) == 48
    )
    assert cpuid.maxlinaddr([]) is None
    s = cpuid.summarize(t)
    assert s.features["LA57"] and s.features["PDPE1GB"] and not s.features["OSPKE"]
    assert s.to_dict()["maxphyaddr"] == 52


def test_lookup_semantics() -> None:
    t = [
        entry(7, index=1, eax=1),
        entry(7, index=0, eax=2),
        entry(0xD, index=9, flags=0, eax=3),
        entry(1, index=4, flags=1, eax=4),
    ]
    assert cpuid.find(t, 7, 0) is t[1]
    assert cpuid.find(t, 7, 1) is t[0]
    assert cpuid.find(t, 7, 2) is None
    assert cpuid.find(t, 0xD, 0) is t[2]  # index not significant
    assert cpuid.find(t, 1, 0) is None
    assert cpuid.find(t, 1) is t[3]  # no index: the first entry of the function
    assert entry(4).flags == 1 and entry(0x80000001).flags == 0
    assert cpuid.by_key(t)[(7, 0)] is t[1]
    assert cpuid.regs(None) == (0, 0, 0, 0)
    changed = cpuid.with_changes(t, {(7, 0): {"ebx": 5}})
    assert changed[1].ebx == 5 and t[1].ebx == 0
    assert list(cpuid.diff(t, changed)) == [(7, 0)]
    with pytest.raises(KeyError):
        cpuid.with_changes(t, {(0x99, 0): {"eax": 1}})
    assert "0x00000007.1" in cpuid.format_table(t)
