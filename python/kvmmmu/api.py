"""The KVM API over a transport: Kvm, Vm and Vcpu, one method per ioctl.

The same objects work on the simulator (``Kvm()``) and on a real device
(``Kvm("/dev/kvm")``). Every call packs the uapi struct, makes the ioctl
through the transport and unpacks the answer; errors are the kernel's errnos
as :class:`OSError` subclasses (``FileExistsError`` for EEXIST, ...).

File descriptors are closed by ``close()``, by ``with`` blocks, and when the
object is garbage collected. Guest memory given to a memory slot as a
:class:`GuestMemory` is pinned until the slot is deleted and every descriptor
of the VM (the VM's and its vCPUs') is closed, so it can never be unmapped
under a slot, on either backend.
"""

from __future__ import annotations

import ctypes
import weakref
from typing import Any

from . import uapi
from ._core import GuestMemory
from .transport import DevTransport, SimTransport, Transport


class _Fd:
    """One open descriptor, closed exactly once (explicitly or at GC)."""

    def __init__(self, owner: object, transport: Transport, fd: int, on_close: Any = None) -> None:
        self.fd = fd
        self._finalizer = weakref.finalize(owner, _close_fd, transport, fd, on_close)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        self._finalizer()


def _close_fd(transport: Transport, fd: int, on_close: Any) -> None:
    try:
        transport.close(fd)
    finally:
        if on_close is not None:
            on_close(fd)


class _Closable:
    _fd: _Fd

    @property
    def fd(self) -> int:
        if self._fd.closed:
            raise ValueError(f"{type(self).__name__} is closed")
        return self._fd.fd

    @property
    def closed(self) -> bool:
        return self._fd.closed

    def close(self) -> None:
        self._fd.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Kvm(_Closable):
    """A KVM: ``Kvm()`` is the simulator, ``Kvm("/dev/kvm")`` the device."""

    def __init__(self, path: str | None = None, *, transport: Transport | None = None) -> None:
        if transport is None:
            transport = SimTransport() if path is None else DevTransport(path)
        self.transport = transport
        self._fd = _Fd(self, transport, transport.open())

    @property
    def backend(self) -> str:
        """The transport's name: "sim" or "dev"."""
        return self.transport.name

    def ioctl(self, request: int, arg: Any = 0) -> Any:
        return self.transport.ioctl(self.fd, request, arg)

    def get_api_version(self) -> int:
        return int(self.ioctl(uapi.KVM_GET_API_VERSION, 0))

    def check_extension(self, cap: int) -> int:
        return int(self.ioctl(uapi.KVM_CHECK_EXTENSION, cap))

    def get_vcpu_mmap_size(self) -> int:
        return int(self.ioctl(uapi.KVM_GET_VCPU_MMAP_SIZE, 0))

    def capabilities(self) -> dict[str, int]:
        """Every capability the kernel (or simulator) reports as non-zero, by name."""
        out = {}
        for number, name in sorted(uapi.CAPS.items()):
            value = self.check_extension(number)
            if value:
                out[name] = value
        return out

    def create_vm(self, vm_type: int = 0) -> Vm:
        fd = int(self.ioctl(uapi.KVM_CREATE_VM, vm_type))
        return Vm(self, fd)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd.fd}"
        return f"Kvm({self.backend}, {state})"


class _VmResources:
    """What must outlive every descriptor of a VM: the pins of its guest memory."""

    def __init__(self) -> None:
        self.open_fds: set[int] = set()
        self.pins: dict[int, Any] = {}
        self.retired: list[Any] = []

    def fd_closed(self, fd: int) -> None:
        self.open_fds.discard(fd)
        if not self.open_fds:
            self.pins.clear()
            self.retired.clear()


class Vm(_Closable):
    """A VM file descriptor."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.transport = kvm.transport
        self._res = _VmResources()
        self._res.open_fds.add(fd)
        self._fd = _Fd(self, self.transport, fd, self._res.fd_closed)
        self.slots: dict[int, uapi.kvm_userspace_memory_region] = {}

    def ioctl(self, request: int, arg: Any = 0) -> Any:
        return self.transport.ioctl(self.fd, request, arg)

    def check_extension(self, cap: int) -> int:
        return int(self.ioctl(uapi.KVM_CHECK_EXTENSION, cap))

    def set_user_memory_region(
        self,
        slot: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int | GuestMemory,
        flags: int = 0,
    ) -> None:
        """KVM_SET_USER_MEMORY_REGION. ``userspace_addr`` may be a GuestMemory
        (its address is used and it stays pinned while the slot exists)."""
        pin = None
        if isinstance(userspace_addr, GuestMemory):
            pin = userspace_addr._pin()
            userspace_addr = userspace_addr.address
        region = uapi.kvm_userspace_memory_region(
            slot=slot,
            flags=flags,
            guest_phys_addr=guest_phys_addr,
            memory_size=memory_size,
            userspace_addr=userspace_addr,
        )
        self.ioctl(uapi.KVM_SET_USER_MEMORY_REGION, region)
        self._slot_changed(slot, region, pin)

    def set_user_memory_region2(
        self,
        slot: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int | GuestMemory,
        flags: int = 0,
        *,
        guest_memfd: int = 0,
        guest_memfd_offset: int = 0,
    ) -> None:
        """KVM_SET_USER_MEMORY_REGION2 (no guest_memfd on the default VM type)."""
        pin = None
        if isinstance(userspace_addr, GuestMemory):
            pin = userspace_addr._pin()
            userspace_addr = userspace_addr.address
        region = uapi.kvm_userspace_memory_region2(
            slot=slot,
            flags=flags,
            guest_phys_addr=guest_phys_addr,
            memory_size=memory_size,
            userspace_addr=userspace_addr,
            guest_memfd=guest_memfd,
            guest_memfd_offset=guest_memfd_offset,
        )
        self.ioctl(uapi.KVM_SET_USER_MEMORY_REGION2, region)
        v1 = uapi.kvm_userspace_memory_region(
            slot=slot,
            flags=flags,
            guest_phys_addr=guest_phys_addr,
            memory_size=memory_size,
            userspace_addr=userspace_addr,
        )
        self._slot_changed(slot, v1, pin)

    def _slot_changed(self, slot: int, region: uapi.kvm_userspace_memory_region, pin: Any) -> None:
        if region.memory_size == 0:
            self.slots.pop(slot, None)
            old = self._res.pins.pop(slot, None)
            if old is not None:
                # The kernel may still be using it from a running vCPU until
                # every descriptor is closed; keep it until then.
                self._res.retired.append(old)
            return
        self.slots[slot] = region
        if pin is not None and slot not in self._res.pins:
            self._res.pins[slot] = pin

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        fd = int(self.ioctl(uapi.KVM_CREATE_VCPU, vcpu_id))
        return Vcpu(self, fd, vcpu_id)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd.fd}"
        return f"Vm({self.kvm.backend}, {state}, slots={sorted(self.slots)})"


class Vcpu(_Closable):
    """A vCPU file descriptor and its mmap'ed ``kvm_run`` area."""

    def __init__(self, vm: Vm, fd: int, vcpu_id: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.transport = vm.transport
        res = vm._res
        res.open_fds.add(fd)
        size = vm.kvm.get_vcpu_mmap_size()
        self._mmap = self.transport.mmap(fd, size)
        self.run: uapi.kvm_run = uapi.kvm_run.from_buffer(self._mmap)
        self._fd = _Fd(self, self.transport, fd, _VcpuCloser(self._mmap, res))

    def close(self) -> None:
        if not self._fd.closed:
            del self.run
        self._fd.close()

    def ioctl(self, request: int, arg: Any = 0) -> Any:
        return self.transport.ioctl(self.fd, request, arg)

    def get_regs(self) -> uapi.kvm_regs:
        regs = uapi.kvm_regs()
        self.ioctl(uapi.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: uapi.kvm_regs) -> None:
        self.ioctl(uapi.KVM_SET_REGS, regs)

    def get_sregs(self) -> uapi.kvm_sregs:
        sregs = uapi.kvm_sregs()
        self.ioctl(uapi.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: uapi.kvm_sregs) -> None:
        self.ioctl(uapi.KVM_SET_SREGS, sregs)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd.fd}"
        return f"Vcpu({self.vm.kvm.backend}, id={self.id}, {state})"


class _VcpuCloser:
    """Unmaps kvm_run after the descriptor closes (no reference to the Vcpu)."""

    def __init__(self, area: Any, res: _VmResources) -> None:
        self.area = area
        self.res = res

    def __call__(self, fd: int) -> None:
        try:
            self.area.close()
        except BufferError:
            pass  # a kvm_run view is still alive; the mapping goes with it
        self.res.fd_closed(fd)


def sizeof(struct: type[ctypes.Structure]) -> int:
    return ctypes.sizeof(struct)
