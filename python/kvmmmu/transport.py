"""Transports: how the KVM API reaches a KVM.

A transport has four calls, the ones a raw KVM program makes: ``open``,
``ioctl``, ``mmap`` and ``close``. :class:`DevTransport` makes them on a real
``/dev/kvm``; :class:`SimTransport` makes them on the software ``/dev/kvm``
in ``kvmmmu._core``, which answers the same request numbers with the same
struct bytes and errnos. A program written against raw KVM ioctls runs on the
simulator by swapping ``os.open``/``fcntl.ioctl``/``mmap.mmap``/``os.close``
for a :class:`SimTransport`'s methods.

``ioctl`` follows :func:`fcntl.ioctl`'s argument rules: an ``int`` is passed
as is (a value, or a pointer into this process that the kernel reads with
copy_from_user), a mutable buffer is passed by address and changed in place
(the call returns the ioctl's result), an immutable buffer is copied and the
copy is returned as ``bytes``. Unlike Python 3.11's fcntl.ioctl, integer
arguments may be full 64-bit pointers on both transports.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import mmap as _mmap
import os
from typing import Any, Protocol, runtime_checkable

from . import _core

Arg = int | bytes | bytearray | memoryview | Any

DEFAULT_PATH = "/dev/kvm"


@runtime_checkable
class Transport(Protocol):
    """The four system calls of a KVM program."""

    name: str

    def open(self, path: str = DEFAULT_PATH, flags: int = ..., mode: int = ...) -> int: ...

    def ioctl(self, fd: int, request: int, arg: Arg = 0, mutate_flag: bool = True) -> Any: ...

    def mmap(
        self, fd: int, length: int, flags: int = ..., prot: int = ..., offset: int = 0
    ) -> Any: ...

    def close(self, fd: int) -> None: ...


def _flat(arg: Any) -> memoryview:
    mv = memoryview(arg)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


def _map(fd: int, length: int, flags: int, prot: int, offset: int) -> Any:
    """fd -1: new anonymous guest memory owned by the core (usable as a slot's
    userspace_addr on both backends); otherwise mmap(2) of the descriptor."""
    if fd == -1:
        return _core.GuestMemory(length)
    return _mmap.mmap(fd, length, flags, prot, offset=offset)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_libc.ioctl.restype = ctypes.c_int


class DevTransport:
    """The real device: os.open, ioctl(2), mmap(2) and os.close."""

    name = "dev"

    def __init__(self, path: str = DEFAULT_PATH) -> None:
        self.path = path

    def open(
        self, path: str | None = None, flags: int = os.O_RDWR | os.O_CLOEXEC, mode: int = 0o777
    ) -> int:
        return os.open(path or self.path, flags, mode)

    def ioctl(self, fd: int, request: int, arg: Arg = 0, mutate_flag: bool = True) -> Any:
        if isinstance(arg, int):
            # libc's ioctl takes a full unsigned long, so any pointer can be passed.
            r = _libc.ioctl(fd, request, arg & 0xFFFF_FFFF_FFFF_FFFF)
            if r < 0:
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e))
            return r
        return fcntl.ioctl(fd, request, arg, mutate_flag)

    def mmap(
        self,
        fd: int,
        length: int,
        flags: int = _mmap.MAP_SHARED,
        prot: int = _mmap.PROT_READ | _mmap.PROT_WRITE,
        offset: int = 0,
    ) -> Any:
        return _map(fd, length, flags, prot, offset)

    def close(self, fd: int) -> None:
        os.close(fd)

    def __repr__(self) -> str:
        return f"DevTransport({self.path!r})"


class SimTransport:
    """The software /dev/kvm of kvmmmu._core.

    Its descriptors are real descriptors of this process (memfds), so their
    numbers never collide with other files and a vCPU descriptor can be
    mmap'ed for ``kvm_run`` like the device's. Close them with :meth:`close`.
    """

    name = "sim"

    def __init__(self, core: _core.SimKvm | None = None) -> None:
        self.core = core if core is not None else _default_core()

    def open(
        self, path: str = DEFAULT_PATH, flags: int = os.O_RDWR | os.O_CLOEXEC, mode: int = 0o777
    ) -> int:
        del path, flags, mode  # there is one software /dev/kvm
        return self.core.open()

    def ioctl(self, fd: int, request: int, arg: Arg = 0, mutate_flag: bool = True) -> Any:
        # The kernel takes the request as an unsigned int (libc passes an unsigned long).
        request &= 0xFFFF_FFFF_FFFF_FFFF
        if isinstance(arg, int):
            return self.core.ioctl(fd, request, arg & 0xFFFF_FFFF_FFFF_FFFF)
        if isinstance(arg, str):
            arg = arg.encode()
        mv = _flat(arg)
        if mv.readonly or not mutate_flag:
            buf = bytearray(mv)
            self.core.ioctl(fd, request, buf)
            return bytes(buf)
        return self.core.ioctl(fd, request, mv)

    def mmap(
        self,
        fd: int,
        length: int,
        flags: int = _mmap.MAP_SHARED,
        prot: int = _mmap.PROT_READ | _mmap.PROT_WRITE,
        offset: int = 0,
    ) -> Any:
        """fd -1: new anonymous guest memory owned by the core (a GuestMemory);
        a vCPU descriptor: its mmap area (kvm_run), shared with the core."""
        if fd != -1 and self.core.kind(fd) != "vcpu":
            raise OSError(19, os.strerror(19))  # ENODEV: system and VM files have no mmap
        return _map(fd, length, flags, prot, offset)

    def close(self, fd: int) -> None:
        self.core.close(fd)

    def __repr__(self) -> str:
        return "SimTransport()"


_CORE: _core.SimKvm | None = None


def _default_core() -> _core.SimKvm:
    global _CORE  # noqa: PLW0603 - one software /dev/kvm per process, like the device
    if _CORE is None:
        _CORE = _core.SimKvm()
    return _CORE


def sim() -> SimTransport:
    """The process's software /dev/kvm."""
    return SimTransport()


def dev(path: str = DEFAULT_PATH) -> DevTransport:
    return DevTransport(path)


def device_available(path: str = DEFAULT_PATH) -> str | None:
    """None if ``path`` is a usable KVM device, else the reason it is not."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"{path}: {e.strerror}"
    try:
        t = DevTransport(path)
        version = t.ioctl(fd, 0xAE00, 0)
        if version != 12:
            return f"{path}: KVM API version {version}, expected 12"
        vm = t.ioctl(fd, 0xAE01, 0)
        os.close(vm)
    except OSError as e:
        return f"{path}: KVM_CREATE_VM failed: {e.strerror}"
    finally:
        os.close(fd)
    return None
