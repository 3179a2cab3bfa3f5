"""Tests of kvmmmu.uapi: request numbers, struct layouts, constants, dict conversion.

The literal numbers below come from /work/shared/reference/real-kvm-here.md
(measured on a real kernel and checked against <linux/kvm.h> with gcc); the
Rust cross-check compares with the kvm-bindings types behind ``kvmmmu._core``.
"""

from __future__ import annotations

import ctypes
import importlib
from typing import Any

import pytest

from kvmmmu import uapi

# "ioctl numbers used" in real-kvm-here.md section 1, verbatim (kernel names).
REAL_KVM_IOCTL_NUMBERS: dict[str, int] = {
    "KVM_GET_API_VERSION": 0xAE00,
    "KVM_CREATE_VM": 0xAE01,
    "KVM_GET_MSR_INDEX_LIST": 0xC004AE02,
    "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0xAE04,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_CREATE_VCPU": 0xAE41,
    "KVM_GET_DIRTY_LOG": 0x4010AE42,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_SET_TSS_ADDR": 0xAE47,
    "KVM_SET_IDENTITY_MAP_ADDR": 0x4008AE48,
    "KVM_SET_USER_MEMORY_REGION2": 0x40A0AE49,
    "KVM_CREATE_IRQCHIP": 0xAE60,
    "KVM_ENABLE_CAP": 0x4068AEA3,
    "KVM_CLEAR_DIRTY_LOG": 0xC018AEC0,
    "KVM_RESET_DIRTY_RINGS": 0xAEC7,
    "KVM_GET_STATS_FD": 0xAECE,
    "KVM_RUN": 0xAE80,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_TRANSLATE": 0xC018AE85,
    "KVM_GET_MSRS": 0xC008AE88,
    "KVM_SET_CPUID2": 0x4008AE90,
    "KVM_GET_CPUID2": 0xC008AE91,
    "KVM_GET_MP_STATE": 0x8004AE98,
    "KVM_SET_MP_STATE": 0x4004AE99,
    "KVM_SET_GUEST_DEBUG": 0x4048AE9B,
    "KVM_GET_VCPU_EVENTS": 0x8040AE9F,
    "KVM_SET_VCPU_EVENTS": 0x4040AEA0,
    "KVM_GET_DEBUGREGS": 0x8080AEA1,
    "KVM_SET_DEBUGREGS": 0x4080AEA2,
    "KVM_GET_TSC_KHZ": 0xAEA3,
    "KVM_GET_SREGS2": 0x8140AECC,
    "KVM_SET_SREGS2": 0x4140AECD,
}

# Not in that list; values from gcc on <linux/kvm.h> (linux-libc-dev 6.1) on this machine.
OTHER_IOCTL_NUMBERS: dict[str, int] = {
    "KVM_SET_MSRS": 0x4008AE89,
    "KVM_SET_NR_MMU_PAGES": 0xAE44,
    "KVM_GET_NR_MMU_PAGES": 0xAE45,
}

# "Struct layouts (x86-64)" in real-kvm-here.md, plus kvm_run (32 + 256 + 8 + 8 + 2048).
STRUCT_SIZES: dict[str, int] = {
    "kvm_userspace_memory_region": 32,
    "kvm_regs": 144,
    "kvm_segment": 24,
    "kvm_dtable": 16,
    "kvm_sregs": 312,
    "kvm_sregs2": 320,
    "kvm_vcpu_events": 64,
    "kvm_debugregs": 128,
    "kvm_dirty_log": 16,
    "kvm_clear_dirty_log": 24,
    "kvm_enable_cap": 104,
    "kvm_cpuid_entry2": 40,
    "kvm_translation": 24,
    "kvm_dirty_gfn": 16,
    "kvm_run": 2352,
    # from <linux/kvm.h> with gcc
    "kvm_userspace_memory_region2": 160,
    "kvm_guest_debug": 72,
    "kvm_mp_state": 4,
    "kvm_msr_entry": 16,
    "kvm_cpuid2": 8,
    "kvm_msrs": 8,
    "kvm_msr_list": 4,
    "kvm_stats_header": 24,
    "kvm_stats_desc": 16,
    "kvm_sync_regs": 520,
}

# (struct, dotted field path) -> byte offset
FIELD_OFFSETS: dict[tuple[str, str], int] = {
    ("kvm_sregs", "cr0"): 224,
    ("kvm_sregs", "efer"): 264,
    ("kvm_sregs2", "pdptrs"): 288,
    ("kvm_vcpu_events", "flags"): 20,
    ("kvm_vcpu_events", "exception_payload"): 56,
    ("kvm_run", "exit_reason"): 8,
    ("kvm_run", "io.direction"): 32,
    ("kvm_run", "io.data_offset"): 40,
    ("kvm_run", "mmio.phys_addr"): 32,
    ("kvm_run", "mmio.data"): 40,
    ("kvm_run", "mmio.len"): 48,
    ("kvm_run", "mmio.is_write"): 52,
    # from <linux/kvm.h> with gcc
    ("kvm_run", "kvm_valid_regs"): 288,
    ("kvm_run", "s"): 304,
    ("kvm_run", "hypercall.longmode"): 96,
    ("kvm_run", "internal.data"): 40,
    ("kvm_run", "system_event.data"): 40,
    ("kvm_run", "emulation_failure.insn_bytes"): 49,
    ("kvm_run", "msr.data"): 48,
    ("kvm_run", "debug.arch.dr7"): 56,
    ("kvm_run", "fail_entry.cpu"): 40,
    ("kvm_run", "tpr_access.is_write"): 40,
    ("kvm_userspace_memory_region", "userspace_addr"): 24,
    ("kvm_clear_dirty_log", "dirty_bitmap"): 16,
    ("kvm_segment", "type"): 14,
    ("kvm_segment", "padding"): 23,
}

# Capability numbers named in the brief and in real-kvm-here.md (upstream kvm.h).
CAP_NUMBERS: dict[str, int] = {
    "KVM_CAP_IRQCHIP": 0,
    "KVM_CAP_MMU_SHADOW_CACHE_CONTROL": 2,
    "KVM_CAP_USER_MEMORY": 3,
    "KVM_CAP_SET_TSS_ADDR": 4,
    "KVM_CAP_VAPIC": 6,
    "KVM_CAP_EXT_CPUID": 7,
    "KVM_CAP_NR_VCPUS": 9,
    "KVM_CAP_NR_MEMSLOTS": 10,
    "KVM_CAP_MP_STATE": 14,
    "KVM_CAP_COALESCED_MMIO": 15,
    "KVM_CAP_SYNC_MMU": 16,
    "KVM_CAP_DESTROY_MEMORY_REGION_WORKS": 21,
    "KVM_CAP_USER_NMI": 22,
    "KVM_CAP_SET_GUEST_DEBUG": 23,
    "KVM_CAP_JOIN_MEMORY_REGIONS_WORKS": 30,
    "KVM_CAP_SET_IDENTITY_MAP_ADDR": 37,
    "KVM_CAP_VCPU_EVENTS": 41,
    "KVM_CAP_HYPERV": 44,
    "KVM_CAP_INTR_SHADOW": 49,
    "KVM_CAP_DEBUGREGS": 50,
    "KVM_CAP_X86_ROBUST_SINGLESTEP": 51,
    "KVM_CAP_ENABLE_CAP": 54,
    "KVM_CAP_TSC_CONTROL": 60,
    "KVM_CAP_GET_TSC_KHZ": 61,
    "KVM_CAP_MAX_VCPUS": 66,
    "KVM_CAP_SYNC_REGS": 74,
    "KVM_CAP_READONLY_MEM": 81,
    "KVM_CAP_ENABLE_CAP_VM": 98,
    "KVM_CAP_X86_SMM": 117,
    "KVM_CAP_MULTI_ADDRESS_SPACE": 118,
    "KVM_CAP_MAX_VCPU_ID": 128,
    "KVM_CAP_IMMEDIATE_EXIT": 136,
    "KVM_CAP_NESTED_STATE": 157,
    "KVM_CAP_COALESCED_PIO": 162,
    "KVM_CAP_EXCEPTION_PAYLOAD": 164,
    "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2": 168,
    "KVM_CAP_SMALLER_MAXPHYADDR": 185,
    "KVM_CAP_DIRTY_LOG_RING": 192,
    "KVM_CAP_SREGS2": 200,
    "KVM_CAP_BINARY_STATS_FD": 203,
    "KVM_CAP_EXIT_ON_EMULATION_FAILURE": 204,
    "KVM_CAP_XSAVE2": 208,
    "KVM_CAP_DISABLE_QUIRKS2": 213,
    "KVM_CAP_X86_TRIPLE_FAULT_EVENT": 218,
    "KVM_CAP_VM_DISABLE_NX_HUGE_PAGES": 220,
    "KVM_CAP_DIRTY_LOG_RING_ACQ_REL": 223,
    "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP": 225,
    "KVM_CAP_USER_MEMORY2": 231,
    "KVM_CAP_MEMORY_FAULT_INFO": 232,
    "KVM_CAP_MEMORY_ATTRIBUTES": 233,
    "KVM_CAP_GUEST_MEMFD": 234,
    "KVM_CAP_VM_TYPES": 235,
    "KVM_CAP_PRE_FAULT_MEMORY": 236,
    "KVM_CAP_X86_APIC_BUS_CYCLES_NS": 237,
    "KVM_CAP_X86_GUEST_MODE": 238,
}

EXIT_NUMBERS: dict[str, int] = {
    "KVM_EXIT_UNKNOWN": 0,
    "KVM_EXIT_EXCEPTION": 1,
    "KVM_EXIT_IO": 2,
    "KVM_EXIT_HYPERCALL": 3,
    "KVM_EXIT_DEBUG": 4,
    "KVM_EXIT_HLT": 5,
    "KVM_EXIT_MMIO": 6,
    "KVM_EXIT_IRQ_WINDOW_OPEN": 7,
    "KVM_EXIT_SHUTDOWN": 8,
    "KVM_EXIT_FAIL_ENTRY": 9,
    "KVM_EXIT_INTR": 10,
    "KVM_EXIT_SET_TPR": 11,
    "KVM_EXIT_TPR_ACCESS": 12,
    "KVM_EXIT_NMI": 16,
    "KVM_EXIT_INTERNAL_ERROR": 17,
    "KVM_EXIT_SYSTEM_EVENT": 24,
    "KVM_EXIT_IOAPIC_EOI": 26,
    "KVM_EXIT_HYPERV": 27,
    "KVM_EXIT_X86_RDMSR": 29,
    "KVM_EXIT_X86_WRMSR": 30,
    "KVM_EXIT_DIRTY_RING_FULL": 31,
    "KVM_EXIT_AP_RESET_HOLD": 32,
    "KVM_EXIT_X86_BUS_LOCK": 33,
    "KVM_EXIT_NOTIFY": 37,
    "KVM_EXIT_MEMORY_FAULT": 39,
}

OTHER_CONSTANTS: dict[str, int] = {
    "KVMIO": 0xAE,
    "KVM_API_VERSION": 12,
    "KVM_DIRTY_LOG_PAGE_OFFSET": 64,
    "KVM_MEM_LOG_DIRTY_PAGES": 1,
    "KVM_MEM_READONLY": 2,
    "KVM_MEM_GUEST_MEMFD": 4,
    "KVM_EXIT_IO_IN": 0,
    "KVM_EXIT_IO_OUT": 1,
    "KVM_INTERNAL_ERROR_EMULATION": 1,
    "KVM_INTERNAL_ERROR_SIMUL_EX": 2,
    "KVM_INTERNAL_ERROR_DELIVERY_EV": 3,
    "KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON": 4,
    "KVM_MP_STATE_RUNNABLE": 0,
    "KVM_MP_STATE_UNINITIALIZED": 1,
    "KVM_MP_STATE_INIT_RECEIVED": 2,
    "KVM_MP_STATE_HALTED": 3,
    "KVM_MP_STATE_SIPI_RECEIVED": 4,
    "KVM_MP_STATE_STOPPED": 5,
    "KVM_MP_STATE_CHECK_STOP": 6,
    "KVM_MP_STATE_OPERATING": 7,
    "KVM_MP_STATE_LOAD": 8,
    "KVM_MP_STATE_AP_RESET_HOLD": 9,
    "KVM_MP_STATE_SUSPENDED": 10,
    "KVM_VCPUEVENT_VALID_NMI_PENDING": 1,
    "KVM_VCPUEVENT_VALID_SIPI_VECTOR": 2,
    "KVM_VCPUEVENT_VALID_SHADOW": 4,
    "KVM_VCPUEVENT_VALID_SMM": 8,
    "KVM_VCPUEVENT_VALID_PAYLOAD": 0x10,
    "KVM_VCPUEVENT_VALID_TRIPLE_FAULT": 0x20,
    "KVM_X86_SHADOW_INT_MOV_SS": 1,
    "KVM_X86_SHADOW_INT_STI": 2,
    "KVM_GUESTDBG_ENABLE": 0x1,
    "KVM_GUESTDBG_SINGLESTEP": 0x2,
    "KVM_GUESTDBG_USE_SW_BP": 0x10000,
    "KVM_GUESTDBG_USE_HW_BP": 0x20000,
    "KVM_GUESTDBG_INJECT_DB": 0x40000,
    "KVM_GUESTDBG_INJECT_BP": 0x80000,
    "KVM_GUESTDBG_BLOCKIRQ": 0x100000,
    "KVM_SREGS2_FLAGS_PDPTRS_VALID": 1,
    "KVM_DIRTY_GFN_F_DIRTY": 1,
    "KVM_DIRTY_GFN_F_RESET": 2,
    "KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE": 1,
    "KVM_DIRTY_LOG_INITIALLY_SET": 2,
    "KVM_CPUID_SIGNATURE": 0x40000000,
    "KVM_CPUID_FEATURES": 0x40000001,
    "KVM_CPUID_FLAG_SIGNIFCANT_INDEX": 1,
    "KVM_FEATURE_CLOCKSOURCE": 0,
    "KVM_FEATURE_NOP_IO_DELAY": 1,
    "KVM_FEATURE_MMU_OP": 2,
    "KVM_FEATURE_CLOCKSOURCE2": 3,
    "KVM_FEATURE_ASYNC_PF": 4,
    "KVM_FEATURE_STEAL_TIME": 5,
    "KVM_FEATURE_PV_EOI": 6,
    "KVM_FEATURE_PV_UNHALT": 7,
    "KVM_FEATURE_PV_TLB_FLUSH": 9,
    "KVM_FEATURE_ASYNC_PF_VMEXIT": 10,
    "KVM_FEATURE_PV_SEND_IPI": 11,
    "KVM_FEATURE_POLL_CONTROL": 12,
    "KVM_FEATURE_PV_SCHED_YIELD": 13,
    "KVM_FEATURE_ASYNC_PF_INT": 14,
    "KVM_FEATURE_MSI_EXT_DEST_ID": 15,
    "KVM_FEATURE_HC_MAP_GPA_RANGE": 16,
    "KVM_FEATURE_MIGRATION_CONTROL": 17,
    "KVM_FEATURE_CLOCKSOURCE_STABLE_BIT": 24,
    "KVM_STATS_TYPE_MASK": 0xF,
    "KVM_STATS_TYPE_CUMULATIVE": 0x0,
    "KVM_STATS_TYPE_INSTANT": 0x1,
    "KVM_STATS_TYPE_PEAK": 0x2,
    "KVM_STATS_TYPE_LINEAR_HIST": 0x3,
    "KVM_STATS_TYPE_LOG_HIST": 0x4,
    "KVM_STATS_UNIT_MASK": 0xF0,
    "KVM_STATS_UNIT_NONE": 0x00,
    "KVM_STATS_UNIT_BYTES": 0x10,
    "KVM_STATS_UNIT_SECONDS": 0x20,
    "KVM_STATS_UNIT_CYCLES": 0x30,
    "KVM_STATS_UNIT_BOOLEAN": 0x40,
    "KVM_STATS_BASE_MASK": 0xF00,
    "KVM_STATS_BASE_POW10": 0x000,
    "KVM_STATS_BASE_POW2": 0x100,
}


def _struct(name: str) -> Any:
    cls = getattr(uapi, name)
    assert isinstance(cls, type)
    return cls


def _offset_of(cls: Any, path: str) -> int:
    """Byte offset of a dotted field path (through nested and anonymous members)."""
    obj = cls()
    base = ctypes.addressof(obj)
    *parents, leaf = path.split(".")
    for part in parents:
        obj = getattr(obj, part)
    return ctypes.addressof(obj) - base + int(getattr(type(obj), leaf).offset)


def _patterned(cls: Any, seed: int) -> Any:
    """An instance whose every byte is non-trivial, including padding."""
    size = ctypes.sizeof(cls)
    return cls.from_buffer_copy(bytes((seed + 7 * i) % 251 + 1 for i in range(size)))


def _all_struct_classes() -> list[Any]:
    return [
        obj
        for name, obj in vars(uapi).items()
        if isinstance(obj, type)
        and issubclass(obj, ctypes.Structure | ctypes.Union)
        and obj.__module__ == uapi.__name__
        and not name.startswith("_")
    ]


# ---------------------------------------------------------------------------
# ioctl numbers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REAL_KVM_IOCTL_NUMBERS))
def test_ioctl_number_matches_real_kvm(name: str) -> None:
    assert uapi.IOCTLS[name] == REAL_KVM_IOCTL_NUMBERS[name], hex(uapi.IOCTLS[name])
    assert getattr(uapi, name) == REAL_KVM_IOCTL_NUMBERS[name]


@pytest.mark.parametrize("name", sorted(OTHER_IOCTL_NUMBERS))
def test_ioctl_number_matches_header(name: str) -> None:
    assert uapi.IOCTLS[name] == OTHER_IOCTL_NUMBERS[name], hex(uapi.IOCTLS[name])


def test_ioctl_tables_are_consistent() -> None:
    assert set(uapi.IOCTLS) == set(uapi.IOCTL_STRUCTS)
    assert set(REAL_KVM_IOCTL_NUMBERS) | set(OTHER_IOCTL_NUMBERS) <= set(uapi.IOCTLS)
    for name, number in uapi.IOCTLS.items():
        assert getattr(uapi, name) == number, name
        assert uapi.ioc_type(number) == uapi.KVMIO, name
    assert len(set(uapi.IOCTLS.values())) == len(uapi.IOCTLS), "duplicate request numbers"


@pytest.mark.parametrize("name", sorted(uapi.IOCTL_STRUCTS))
def test_ioctl_size_is_sizeof_struct(name: str) -> None:
    number = uapi.IOCTLS[name]
    struct = uapi.IOCTL_STRUCTS[name]
    if struct is None:
        assert uapi.ioc_size(number) == 0
        assert uapi.ioc_dir(number) == uapi._IOC_NONE
    else:
        assert uapi.ioc_size(number) == ctypes.sizeof(struct)
        assert uapi.ioc_dir(number) != uapi._IOC_NONE


def test_flexible_array_requests_encode_the_header() -> None:
    assert uapi.IOCTL_STRUCTS["KVM_GET_SUPPORTED_CPUID"] is uapi.kvm_cpuid2
    assert uapi.IOCTL_STRUCTS["KVM_SET_CPUID2"] is uapi.kvm_cpuid2
    assert uapi.IOCTL_STRUCTS["KVM_GET_CPUID2"] is uapi.kvm_cpuid2
    assert uapi.IOCTL_STRUCTS["KVM_GET_MSRS"] is uapi.kvm_msrs
    assert uapi.IOCTL_STRUCTS["KVM_SET_MSRS"] is uapi.kvm_msrs
    assert uapi.IOCTL_STRUCTS["KVM_GET_MSR_INDEX_LIST"] is uapi.kvm_msr_list
    assert uapi.ioc_size(uapi.KVM_GET_MSR_INDEX_LIST) == 4


def test_ioc_helpers() -> None:
    assert uapi._IOC(0, 0xAE, 0, 0) == 0xAE00
    assert uapi._IO(0xAE, 0x80) == 0xAE80
    assert uapi._IOR(0xAE, 0x81, uapi.kvm_regs) == 0x8090AE81
    assert uapi._IOR(0xAE, 0x81, 144) == 0x8090AE81
    assert uapi._IOW(0xAE, 0x48, ctypes.c_uint64) == 0x4008AE48
    assert uapi._IOWR(0xAE, 0x85, uapi.kvm_translation) == 0xC018AE85
    number = uapi._IOC(3, 0x12, 0x34, 0x3FFF)
    assert (uapi.ioc_dir(number), uapi.ioc_type(number)) == (3, 0x12)
    assert (uapi.ioc_nr(number), uapi.ioc_size(number)) == (0x34, 0x3FFF)
    assert uapi.ioc_nr(uapi.KVM_SET_SREGS2) == 0xCD
    assert uapi.ioc_dir(uapi.KVM_CLEAR_DIRTY_LOG) == uapi._IOC_READ | uapi._IOC_WRITE
    for bad in ((4, 0, 0, 0), (0, 0x100, 0, 0), (0, 0, 0x100, 0), (0, 0, 0, 0x4000)):
        with pytest.raises(ValueError):
            uapi._IOC(*bad)


# ---------------------------------------------------------------------------
# struct layouts
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(STRUCT_SIZES))
def test_struct_size(name: str) -> None:
    assert ctypes.sizeof(_struct(name)) == STRUCT_SIZES[name]


@pytest.mark.parametrize(("name", "path"), sorted(FIELD_OFFSETS))
def test_field_offset(name: str, path: str) -> None:
    assert _offset_of(_struct(name), path) == FIELD_OFFSETS[name, path]


def test_kvm_run_layout() -> None:
    run = uapi.kvm_run
    assert ctypes.sizeof(run) == 32 + 256 + 8 + 8 + 2048
    assert ctypes.sizeof(uapi.kvm_run_exit) == 256
    assert ctypes.sizeof(uapi.kvm_run_s) == 2048
    assert ctypes.sizeof(uapi.kvm_debug_exit_arch) == 32
    assert _offset_of(run, "immediate_exit") == 1
    assert _offset_of(run, "if_flag") == 13
    assert _offset_of(run, "cr8") == 16
    assert _offset_of(run, "apic_base") == 24
    assert _offset_of(run, "kvm_dirty_regs") == 296
    assert _offset_of(run, "memory_fault.gpa") == 40
    assert _offset_of(run, "s.regs.sregs.cr0") == 304 + 144 + 224
    # every exit member lies inside the 256-byte union
    for member, ctype in uapi.kvm_run_exit._fields_:
        assert ctypes.sizeof(ctype) <= 256, member


def test_all_structs_have_natural_alignment() -> None:
    for cls in _all_struct_classes():
        assert "_pack_" not in vars(cls), cls.__name__
        assert ctypes.sizeof(cls) % ctypes.alignment(cls) == 0, cls.__name__


# ---------------------------------------------------------------------------
# constants
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"), sorted({**CAP_NUMBERS, **EXIT_NUMBERS, **OTHER_CONSTANTS}.items())
)
def test_constant(name: str, value: int) -> None:
    assert getattr(uapi, name) == value


def test_name_tables() -> None:
    for name, number in CAP_NUMBERS.items():
        assert uapi.CAPS[number] == name
    for name, number in EXIT_NUMBERS.items():
        assert uapi.EXIT_REASONS[number] == name
    for number, name in uapi.CAPS.items():
        assert name.startswith("KVM_CAP_")
        assert getattr(uapi, name) == number
    for number, name in uapi.EXIT_REASONS.items():
        assert getattr(uapi, name) == number
    assert set(uapi.EXIT_REASONS) == set(range(40))
    assert uapi.MP_STATES[uapi.KVM_MP_STATE_HALTED] == "KVM_MP_STATE_HALTED"
    assert uapi.INTERNAL_ERRORS[1] == "KVM_INTERNAL_ERROR_EMULATION"
    for reason, member in uapi.KVM_RUN_EXIT_MEMBER.items():
        assert reason in uapi.EXIT_REASONS
        assert member in dict(uapi.kvm_run_exit._fields_)


# ---------------------------------------------------------------------------
# dict conversion, equality, repr
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["kvm_sregs", "kvm_vcpu_events"])
def test_to_dict_from_dict_round_trip(name: str) -> None:
    cls = _struct(name)
    original = _patterned(cls, seed=3)
    data = original.to_dict()
    copy = cls.from_dict(data)
    assert bytes(copy) == bytes(original)
    assert copy == original
    assert copy.to_dict() == data


def test_round_trip_every_struct() -> None:
    for cls in _all_struct_classes():
        original = _patterned(cls, seed=ctypes.sizeof(cls))
        data = original.to_dict()
        assert cls.from_dict(data).to_dict() == data, cls.__name__
        assert cls.from_bytes(original.to_bytes()) == original, cls.__name__
        # The kernel's structs spell out their padding, so every byte survives the
        # dicts (some anonymous kvm_run members have tail padding the compiler adds).
        if cls.__name__ in STRUCT_SIZES:
            assert bytes(cls.from_dict(data)) == bytes(original), cls.__name__


def test_to_dict_shapes() -> None:
    sregs = uapi.kvm_sregs()
    sregs.cs.selector = 0x10
    sregs.cs.l = 1
    sregs.interrupt_bitmap[1] = 5
    data = sregs.to_dict()
    assert data["cs"]["selector"] == 0x10
    assert data["cs"]["type"] == 0
    assert data["gdt"]["padding"] == [0, 0, 0]
    assert data["interrupt_bitmap"] == [0, 5, 0, 0]
    events = uapi.kvm_vcpu_events.from_dict(
        {"exception": {"nr": 14, "error_code": 7}, "flags": 0x10, "exception_payload": 0xDEAD}
    )
    assert (events.exception.nr, events.exception.error_code) == (14, 7)
    assert events.flags == uapi.KVM_VCPUEVENT_VALID_PAYLOAD
    assert events.exception_payload == 0xDEAD
    assert events.to_dict()["triple_fault"] == {"pending": 0}
    # members of anonymous unions appear at their parent's level, as in C
    run = uapi.kvm_run()
    run.exit_reason = uapi.KVM_EXIT_IO
    run.io.port = 0x3F8
    assert run.to_dict()["io"]["port"] == 0x3F8
    assert run.to_dict()["exit_reason"] == uapi.KVM_EXIT_IO


def test_from_dict_errors() -> None:
    with pytest.raises(KeyError):
        uapi.kvm_regs.from_dict({"nope": 1})
    with pytest.raises(ValueError):
        uapi.kvm_segment.from_dict({"type": 256})  # does not fit in __u8
    with pytest.raises(ValueError):
        uapi.kvm_sregs.from_dict({"interrupt_bitmap": [0] * 5})
    # two union members that disagree
    run = uapi.kvm_run()
    run.io.port = 0x10
    data = run.to_dict()
    data["io"]["port"] = 0x20
    with pytest.raises(ValueError):
        uapi.kvm_run.from_dict(data)
    assert uapi.kvm_run.from_dict({"io": data["io"]}).io.port == 0x20


def test_equality_and_repr() -> None:
    a = uapi.kvm_regs(rip=0xFFF0, rflags=2)
    b = uapi.kvm_regs.from_dict(a.to_dict())
    assert a == b
    b.rax = 1
    assert a != b
    assert a != uapi.kvm_sregs()
    assert "rip=0xfff0" in repr(a)
    assert "rflags=2" in repr(a)
    assert repr(uapi.kvm_dtable(base=0x1000, limit=0xFFF)) == "kvm_dtable(base=0x1000, limit=0xfff)"
    events = uapi.kvm_vcpu_events()
    events.interrupt.shadow = uapi.KVM_X86_SHADOW_INT_STI
    assert "interrupt={injected=0, nr=0, soft=0, shadow=2}" in repr(events)
    with pytest.raises(TypeError):
        hash(a)


def test_kvm_run_exit_info() -> None:
    run = uapi.kvm_run()
    run.exit_reason = uapi.KVM_EXIT_MMIO
    run.mmio.phys_addr = 0xE0000000
    run.mmio.len = 4
    run.mmio.is_write = 1
    info = run.exit_info()
    assert isinstance(info, uapi.kvm_run_mmio)
    assert info.phys_addr == 0xE0000000
    assert "KVM_EXIT_MMIO" in repr(run)
    assert "phys_addr=0xe0000000" in repr(run)
    run.exit_reason = uapi.KVM_EXIT_HLT
    assert run.exit_info() is None
    assert repr(run) == "kvm_run(exit_reason=KVM_EXIT_HLT)"


# ---------------------------------------------------------------------------
# flexible arrays
# ---------------------------------------------------------------------------


def test_make_cpuid2() -> None:
    entries = [
        uapi.kvm_cpuid_entry2(function=uapi.KVM_CPUID_SIGNATURE, eax=0x40000001),
        uapi.kvm_cpuid_entry2(function=1, index=0, ecx=0x80000000),
    ]
    cpuid = uapi.make_cpuid2(entries)
    assert isinstance(cpuid, uapi.kvm_cpuid2)
    assert cpuid.nent == 2
    assert ctypes.sizeof(cpuid) == 8 + 2 * 40
    assert _offset_of(type(cpuid), "entries") == 8
    assert cpuid.entries[0].eax == 0x40000001
    assert cpuid.entries[1] == entries[1]
    assert bytes(cpuid)[8:48] == bytes(entries[0])
    empty = uapi.make_cpuid2(100)
    assert (empty.nent, ctypes.sizeof(empty)) == (100, 8 + 100 * 40)
    assert type(uapi.make_cpuid2(3)) is type(uapi.make_cpuid2(3))
    with pytest.raises(ValueError):
        uapi.make_cpuid2(-1)


def test_make_msrs_and_msr_list() -> None:
    msrs = uapi.make_msrs([0xC0000080, uapi.kvm_msr_entry(index=0x277, data=5)])
    assert isinstance(msrs, uapi.kvm_msrs)
    assert msrs.nmsrs == 2
    assert ctypes.sizeof(msrs) == 8 + 2 * 16
    assert (msrs.entries[0].index, msrs.entries[1].data) == (0xC0000080, 5)
    assert uapi.make_msrs(3).nmsrs == 3
    msr_list = uapi.make_msr_list(40)
    assert isinstance(msr_list, uapi.kvm_msr_list)
    assert (msr_list.nmsrs, ctypes.sizeof(msr_list)) == (40, 4 + 40 * 4)
    assert _offset_of(type(msr_list), "indices") == 4
    desc = uapi.stats_desc_type(48)
    assert ctypes.sizeof(desc) == 16 + 48
    assert _offset_of(desc, "name") == 16


# ---------------------------------------------------------------------------
# the Rust side (kvmmmu._core, from kvm-bindings) must agree
# ---------------------------------------------------------------------------


def test_rust_struct_sizes_and_ioctl_numbers_agree() -> None:
    core = importlib.import_module("kvmmmu._core")
    rust_sizes: dict[str, int] = dict(core.struct_sizes())
    rust_numbers: dict[str, int] = dict(core.ioctl_numbers())
    assert rust_sizes, "kvmmmu._core.struct_sizes() is empty"
    assert rust_numbers, "kvmmmu._core.ioctl_numbers() is empty"

    size_errors = {
        name: (size, ctypes.sizeof(getattr(uapi, name)) if hasattr(uapi, name) else None)
        for name, size in rust_sizes.items()
        if not hasattr(uapi, name) or ctypes.sizeof(getattr(uapi, name)) != size
    }
    assert not size_errors, f"struct name: (rust size, python size): {size_errors}"

    number_errors = {
        name: (hex(number), hex(uapi.IOCTLS[name]) if name in uapi.IOCTLS else None)
        for name, number in rust_numbers.items()
        if uapi.IOCTLS.get(name) != number
    }
    assert not number_errors, f"ioctl: (rust number, python number): {number_errors}"

    # and from the Python side: everything both know agrees
    for name, number in uapi.IOCTLS.items():
        if name in rust_numbers:
            assert rust_numbers[name] == number, name
