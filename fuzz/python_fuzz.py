"""Hypothesis fuzzing of the simulator's transport (``kvmmmu.SimTransport``).

Random request numbers with random arguments (integers, pointers, mutable and
immutable buffers of random bytes) go to the system, VM and vCPU descriptors of
a fresh software /dev/kvm, to the stats descriptors KVM_GET_STATS_FD creates,
and to closed and foreign descriptors. The only acceptable outcomes are success
or an ``OSError`` whose errno is one the kernel's KVM can return; any other
exception (or a crash of the interpreter) is a bug.
Requests the core does not know must fail with each file kind's default errno
(EINVAL for system and vCPU files, ENOTTY for VM and stats files, EBADF for
closed ones).

Run it::

    python fuzz/python_fuzz.py --examples 2000        # the main property
    python fuzz/python_fuzz.py --examples 500 --all   # and the known-bug checks
    pytest fuzz/python_fuzz.py                        # 300 examples per test

No argument can make the simulator write to memory the fuzzer does not own:
integer pointers are below mmap_min_addr or past the user address limit, or
point into a scratch buffer followed by 64 KiB of slack; mutable buffers are
followed by the same slack; embedded pointers (dirty-log bitmaps) are replaced
by bad ones. ``test_short_buffers_not_overrun`` checks that the slack stays
untouched for buffers of up to 1024 bytes, which ``fcntl.ioctl`` protects on
the device (it copies them into a 1024-byte buffer of its own).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import hypothesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvmmmu
from kvmmmu import _core, uapi

# Every errno the kernel's KVM ioctls (and the simulator) may return.
KNOWN_ERRNOS = frozenset(
    {
        errno.EPERM,
        errno.ENOENT,
        errno.EINTR,
        errno.EIO,
        errno.ENXIO,
        errno.E2BIG,
        errno.EBADF,
        errno.EAGAIN,
        errno.ENOMEM,
        errno.EFAULT,
        errno.EBUSY,
        errno.EEXIST,
        errno.ENODEV,
        errno.EINVAL,
        errno.ENFILE,
        errno.EMFILE,
        errno.ENOTTY,
        errno.ENOSPC,
        errno.ERANGE,
        errno.ENOSYS,
        errno.EOPNOTSUPP,
    }
)

# Request numbers the core implements or knows (low 32 bits: the kernel's unsigned int).
KNOWN_REQUESTS = frozenset(n & 0xFFFF_FFFF for n in _core.ioctl_numbers().values())
KNOWN_LIST = sorted(KNOWN_REQUESTS)

# Requests whose struct holds a user pointer the kernel writes through, and its offset.
EMBEDDED_POINTERS = {uapi.KVM_GET_DIRTY_LOG: 8, uapi.KVM_CLEAR_DIRTY_LOG: 16}
# Requests whose struct is a header (nent) followed by a caller-sized array.
VARIABLE_SIZE = frozenset(
    {
        uapi.KVM_GET_MSR_INDEX_LIST,
        uapi.KVM_GET_SUPPORTED_CPUID,
        uapi.KVM_GET_MSRS,
        uapi.KVM_SET_MSRS,
        uapi.KVM_SET_CPUID2,
        uapi.KVM_GET_CPUID2,
    }
)

SLACK = 64 * 1024  # bytes after every buffer the simulator may write: overruns land here
FCNTL_INLINE = 1024  # fcntl.ioctl copies buffers up to this size into its own buffer
MAX_U64 = (1 << 64) - 1
TASK_SIZE_MAX = 0x7FFF_FFFF_F000
# "any": any open simulated fd (stats fds included); "closed": a number no longer
# open; "foreign": stdio and numbers that were never simulated files.
FD_KINDS = ("system", "vm", "vcpu", "stats", "any", "closed", "foreign")


# ---------------------------------------------------------------- strategies


def bad_pointers() -> st.SearchStrategy[int]:
    """Addresses that cannot hold a mapping of this process for structs up to 1 KiB."""
    return st.one_of(
        st.sampled_from([0, 8, 0x100, 0xBFF, TASK_SIZE_MAX - 8, TASK_SIZE_MAX, MAX_U64]),
        st.integers(0, 0xBFF),
        st.integers(1 << 47, MAX_U64),
        st.integers(-(1 << 63), -1),  # two's complement: the kernel half
    )


def requests() -> st.SearchStrategy[int]:
    """Request numbers in [0, 2**64): known ones, with garbage high bits, KVMIO, any."""
    kvmio = st.builds(
        lambda d, size, nr: (d << 30) | (size << 16) | (uapi.KVMIO << 8) | nr,
        st.integers(0, 3),
        st.integers(0, (1 << 14) - 1),
        st.integers(0, 255),
    )
    return st.one_of(
        st.sampled_from(KNOWN_LIST),
        st.builds(
            lambda r, hi: r | (hi << 32), st.sampled_from(KNOWN_LIST), st.integers(1, 2**32 - 1)
        ),
        kvmio,
        st.integers(0, 2**32 - 1),
        st.integers(0, MAX_U64),
    )


@dataclass(frozen=True)
class Arg:
    """How one ioctl argument is passed."""

    kind: str  # "int", "scratch", "mutable", "immutable", "none"
    value: int = 0
    data: bytes = b""


def args() -> st.SearchStrategy[Arg]:
    return st.one_of(
        st.builds(Arg, st.just("int"), st.integers(-(1 << 63), MAX_U64)),
        st.builds(Arg, st.just("int"), bad_pointers()),
        st.builds(Arg, st.just("scratch"), st.integers(0, 512), st.binary(max_size=2048)),
        st.builds(Arg, st.just("mutable"), st.just(0), st.binary(max_size=2048)),
        st.builds(Arg, st.just("immutable"), st.just(0), st.binary(max_size=2048)),
        st.just(Arg("none")),
    )


@dataclass(frozen=True)
class Call:
    fd_kind: str
    fd_index: int
    request: int
    arg: Arg


def calls(request_strategy: st.SearchStrategy[int] | None = None) -> st.SearchStrategy[Call]:
    return st.builds(
        Call,
        st.sampled_from(FD_KINDS),
        st.integers(0, 7),
        request_strategy if request_strategy is not None else requests(),
        args(),
    )


# ---------------------------------------------------------------- the harness


class Session:
    """A fresh software /dev/kvm with a system fd, a VM, two vCPUs and a closed fd."""

    def __init__(self) -> None:
        self.core = kvmmmu.SimKvm()
        self.t = kvmmmu.SimTransport(self.core)
        sys_fd = self.t.open()
        vm = self.t.ioctl(sys_fd, uapi.KVM_CREATE_VM, 0)
        for vcpu_id in (0, 1):
            self.t.ioctl(vm, uapi.KVM_CREATE_VCPU, vcpu_id)
        gone = self.t.open()
        self.t.close(gone)
        self.closed = [gone]
        # Descriptors that are not simulated files: stdio, and numbers no file has.
        self.foreign = [0, 1, 2, -1, 2**31 - 1]
        self.buffers: list[bytearray] = []  # kept alive until the session ends

    def kind(self, fd: int) -> str | None:
        try:
            return str(self.core.kind(fd))
        except OSError:
            return None

    def pick_fd(self, call: Call) -> int:
        if call.fd_kind == "closed":
            pool = self.closed
        elif call.fd_kind == "foreign":
            pool = self.foreign
        elif call.fd_kind == "any":
            pool = self.core.fds() or self.closed
        else:
            pool = [fd for fd in self.core.fds() if self.kind(fd) == call.fd_kind]
            pool = pool or self.closed
        return pool[call.fd_index % len(pool)]

    def padded(self, data: bytes, size: int) -> tuple[bytearray, memoryview]:
        """A buffer of ``size`` bytes (``data``, zero-filled) followed by SLACK zero bytes."""
        backing = bytearray(size + SLACK)
        backing[: min(size, len(data))] = data[:size]
        self.buffers.append(backing)
        return backing, memoryview(backing)[:size]

    def close(self) -> None:
        for fd in self.core.fds():
            self.t.close(fd)
        assert not self.core.fds()


def sanitize(request: int, buf: bytearray, start: int, end: int) -> None:
    """Replace a pointer the kernel would write through by one that faults (past
    ``end``, the argument's bytes, the slack is zero: a NULL pointer)."""
    off = EMBEDDED_POINTERS.get(request & 0xFFFF_FFFF)
    if off is not None and start + off + 8 <= end:
        buf[start + off : start + off + 8] = struct.pack("<Q", 0x100)


def default_errno(kind: str | None) -> int:
    """What each file kind answers to a request it does not know (stats files have
    no ioctls at all)."""
    if kind is None:
        return errno.EBADF
    return errno.ENOTTY if kind in ("vm", "stats") else errno.EINVAL


def run_call(s: Session, call: Call, check_overrun: bool) -> None:
    fd = s.pick_fd(call)
    kind = s.kind(fd)
    request = call.request
    low = request & 0xFFFF_FFFF
    known = low in KNOWN_REQUESTS
    size = uapi.ioc_size(low)
    a = call.arg
    backing: bytearray | None = None
    used = 0

    if a.kind == "none":
        arg: Any = 0
    elif a.kind == "int":
        # Known requests may take the integer as a pointer: only pass ones that fault.
        # (_IO requests take a value, never a pointer.)
        value = a.value
        takes_value = uapi.ioc_dir(low) == uapi._IOC_NONE and size == 0
        if known and not takes_value and 0xC00 <= value < 1 << 47:
            value = value % 0xC00
        arg = value
    elif a.kind == "scratch":
        backing, _ = s.padded(a.data, max(len(a.data), 4096))
        sanitize(request, backing, a.value, len(backing) - SLACK)
        addr = ctypes.addressof((ctypes.c_char * len(backing)).from_buffer(backing))
        arg = addr + a.value
    else:
        mutable = a.kind == "mutable"
        # An immutable buffer is copied by the transport with no slack after it: use one
        # only where the simulator cannot write past it, else pass the bytes mutably.
        if not mutable and known:
            reads_back = uapi.ioc_dir(low) & uapi._IOC_READ
            if (
                low in VARIABLE_SIZE
                or low in EMBEDDED_POINTERS
                or (reads_back and len(a.data) < max(size, 1))
            ):
                mutable = True
        if mutable:
            used = len(a.data)
            backing, view = s.padded(a.data, used)
            sanitize(request, backing, 0, used)
            arg = view
        else:
            arg = a.data

    try:
        result = s.t.ioctl(fd, request, arg)
    except OSError as e:
        assert e.errno in KNOWN_ERRNOS, f"{call}: unknown errno {e.errno} ({e})"
        if not known:
            want = default_errno(kind)
            assert e.errno == want, f"{call} on {kind}: errno {e.errno}, wanted {want}"
    else:
        assert known, f"{call} on {kind}: an unknown request succeeded"
        assert isinstance(result, int | bytes), f"{call}: returned {type(result)}"
        if isinstance(result, int):
            assert result >= 0, f"{call}: negative result {result}"
        if isinstance(arg, bytes):
            assert isinstance(result, bytes) and len(result) == len(arg), f"{call}: {result!r}"

    if check_overrun and backing is not None and a.kind == "mutable" and used <= FCNTL_INLINE:
        tail = backing[used:]
        assert not any(tail), (
            f"{call} on {kind}: the simulator wrote past the end of a {used}-byte buffer "
            f"(first stray byte at +{next(i for i, b in enumerate(tail) if b)})"
        )


def run_calls(call_list: list[Call], check_overrun: bool = False) -> None:
    s = Session()
    try:
        for call in call_list:
            run_call(s, call, check_overrun)
    finally:
        s.close()


# ---------------------------------------------------------------- the tests


def fuzz_settings(examples: int = 300) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def short_buffer_calls() -> st.SearchStrategy[Call]:
    """Mutable buffers shorter than the struct of a known request that writes back."""
    readers = [n for n in KNOWN_LIST if uapi.ioc_dir(n) & uapi._IOC_READ and n not in VARIABLE_SIZE]
    return st.sampled_from(readers).flatmap(
        lambda req: st.builds(
            Call,
            st.sampled_from(FD_KINDS),
            st.integers(0, 7),
            st.just(req),
            st.builds(
                Arg,
                st.just("mutable"),
                st.just(0),
                st.binary(max_size=max(uapi.ioc_size(req) - 1, 0)),
            ),
        )
    )


# name: (strategy of call lists, check_overrun)
PROPERTIES: dict[str, tuple[Callable[[], st.SearchStrategy[list[Call]]], bool]] = {
    # Any request in [0, 2**64), any argument, any descriptor: success or a known OSError.
    "transport": (lambda: st.lists(calls(), min_size=1, max_size=20), False),
    # Known bug: short mutable buffers are written past their end.
    "short-buffers": (lambda: st.lists(short_buffer_calls(), min_size=1, max_size=5), True),
    # Known bug: request numbers outside [0, 2**64) raise OverflowError.
    "any-int-request": (
        lambda: st.lists(
            calls(st.one_of(st.integers(-(1 << 63), -1), st.integers(1 << 64, 1 << 80))),
            min_size=1,
            max_size=5,
        ),
        False,
    ),
}


def make_test(name: str, examples: int = 300, seed: int | None = None) -> Callable[[], None]:
    """The hypothesis test of one property, with its number of examples."""
    strategy, check_overrun = PROPERTIES[name]
    # The known-bug properties report one falsifying example, as a plain exception.
    single = name != "transport"

    @settings(fuzz_settings(examples), report_multiple_bugs=not single)
    @given(strategy())
    def test(call_list: list[Call]) -> None:
        run_calls(call_list, check_overrun)

    if seed is not None:
        test = hypothesis.seed(seed)(test)
    return test


test_transport_fuzz = make_test("transport")

# A mutable buffer shorter than the struct is copied into a 1024-byte buffer, as
# fcntl.ioctl does, so the request never writes past its end.
test_short_buffers_not_overrun = make_test("short-buffers")
# Any int request number is truncated as libc and the kernel do.
test_any_int_request = make_test("any-int-request")


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--examples", type=int, default=1000, help="examples per property")
    p.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    p.add_argument(
        "--all", action="store_true", help="also check the known bugs (expected to fail)"
    )
    ns = p.parse_args(argv)
    names = list(PROPERTIES) if ns.all else ["transport"]
    failed = 0
    for name in names:
        print(f"== {name}: {ns.examples} examples", flush=True)
        try:
            make_test(name, ns.examples, ns.seed)()
        except Exception as e:  # a falsifying example: report it, go on with the next
            failed += 1
            print(f"FAILED {name}: {type(e).__name__}: {e}", flush=True)
        else:
            print(f"passed {name}", flush=True)
    print(f"{len(names) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
