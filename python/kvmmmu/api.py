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
import signal
import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from . import cpuid as _cpuid
from . import dirty as _dirty
from . import exits as _exits
from . import uapi
from ._core import GuestMemory
from .mmu import VcpuMmu, VmMmu, _weak_stats
from .stats import StatsReader
from .transport import DevTransport, SimTransport, Transport

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, NDArray

_S = TypeVar("_S", bound=ctypes.Structure)


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
    transport: Transport

    def ioctl(self, request: int, arg: Any = 0) -> Any:
        """The raw ioctl on this descriptor (errors as OSError with the kernel's errno)."""
        return self.transport.ioctl(self.fd, request, arg)

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


class _VmOrVcpu(_Closable):
    """What VM and vCPU descriptors share: KVM_ENABLE_CAP and binary statistics."""

    _stats: _Stats | None

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP (api.txt 4.36): ``flags`` must be 0. On a vCPU x86 has only
        Hyper-V capabilities, so every cap is EINVAL there."""
        self.ioctl(uapi.KVM_ENABLE_CAP, _enable_cap(cap, args, flags))

    def get_stats_fd(self) -> int:
        """KVM_GET_STATS_FD: a new binary-statistics descriptor (the caller closes it
        with ``transport.close``)."""
        return int(self.ioctl(uapi.KVM_GET_STATS_FD, 0))

    def stats(self) -> dict[str, int | list[int]]:
        """KVM's counters by name: VM (remote_tlb_flush, mmu_unsync, pages_4k, ...) or
        vCPU (pf_fixed, pf_guest, exits, insn_emulation, ...)."""
        if self._stats is None:
            self._stats = _Stats(self, self.transport, self.get_stats_fd())
        return self._stats.read()


class Kvm(_Closable):
    """A KVM: ``Kvm()`` is the simulator, ``Kvm("/dev/kvm")`` the device."""

    def __init__(self, path: str | None = None, *, transport: Transport | None = None) -> None:
        if transport is None:
            transport = SimTransport() if path is None else DevTransport(path)
        self.transport = transport
        self._fd = _Fd(self, transport, transport.open())
        if isinstance(transport, DevTransport):
            _install_kick_handler()  # for Vcpu.kick, while (if) on the main thread

    @property
    def backend(self) -> str:
        """The transport's name: "sim" or "dev"."""
        return self.transport.name

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

    def get_supported_cpuid(self, nent: int = 256) -> list[uapi.kvm_cpuid_entry2]:
        """KVM_GET_SUPPORTED_CPUID: the CPUID entries the KVM can give a guest."""
        return _cpuid.get_supported_cpuid(self.transport, self.fd, nent)

    def create_vm(self, vm_type: int = 0, *, mmu: str = "shadow") -> Vm:
        """KVM_CREATE_VM. ``mmu="tdp"`` (simulator only) models a host with two-
        dimensional paging (NPT/EPT) instead of the shadow MMU the device here runs."""
        if mmu not in ("shadow", "tdp"):
            raise ValueError(f"mmu must be 'shadow' or 'tdp', not {mmu!r}")
        if mmu == "tdp" and not isinstance(self.transport, SimTransport):
            raise NotImplementedError("mmu='tdp' is simulator-only: the device here shadows")
        fd = int(self.ioctl(uapi.KVM_CREATE_VM, vm_type))
        vm = Vm(self, fd)
        if mmu == "tdp":
            vm.mmu._mmu.set_tdp(True)
        return vm

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd.fd}"
        return f"Kvm({self.backend}, {state})"


class _VmResources:
    """What must outlive every descriptor of a VM: the pins of its guest memory."""

    def __init__(self) -> None:
        self.open_fds: set[int] = set()
        self.pins: dict[int, Any] = {}
        self.retired: list[Any] = []
        #: The vCPUs' dirty rings: harvested through the VM after a vCPU closes,
        #: unmapped with the last descriptor.
        self.rings: list[_dirty.DirtyRing] = []

    def fd_closed(self, fd: int) -> None:
        self.open_fds.discard(fd)
        if not self.open_fds:
            self.pins.clear()
            self.retired.clear()
            for ring in self.rings:
                ring.close()
            self.rings.clear()


class Vm(_VmOrVcpu):
    """A VM file descriptor."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.transport = kvm.transport
        self._res = _VmResources()
        self._res.open_fds.add(fd)
        self._fd = _Fd(self, self.transport, fd, self._res.fd_closed)
        self.slots: dict[int, uapi.kvm_userspace_memory_region] = {}
        self._stats: _Stats | None = None
        self._mmu: VmMmu | None = None
        self._dirty = _dirty.VmDirtyState()

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
        self._set_region(
            uapi.KVM_SET_USER_MEMORY_REGION,
            uapi.kvm_userspace_memory_region,
            dict(slot=slot, flags=flags, guest_phys_addr=guest_phys_addr, memory_size=memory_size),
            userspace_addr,
        )

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
        self._set_region(
            uapi.KVM_SET_USER_MEMORY_REGION2,
            uapi.kvm_userspace_memory_region2,
            dict(slot=slot, flags=flags, guest_phys_addr=guest_phys_addr, memory_size=memory_size),
            userspace_addr,
            guest_memfd=guest_memfd,
            guest_memfd_offset=guest_memfd_offset,
        )

    def _set_region(
        self,
        request: int,
        struct: type[ctypes.Structure],
        fields: dict[str, int],
        userspace_addr: int | GuestMemory,
        **extra: int,
    ) -> None:
        pin = None
        if isinstance(userspace_addr, GuestMemory):
            pin = userspace_addr._pin()
            userspace_addr = userspace_addr.address
        self.ioctl(request, struct(**fields, userspace_addr=userspace_addr, **extra))
        v1 = uapi.kvm_userspace_memory_region(**fields, userspace_addr=userspace_addr)
        self._slot_changed(fields["slot"], v1, pin)

    def _slot_changed(self, slot: int, region: uapi.kvm_userspace_memory_region, pin: Any) -> None:
        if region.memory_size == 0:
            self.slots.pop(slot, None)
            self._dirty.forget(slot)
            old = self._res.pins.pop(slot, None)
            if old is not None:
                # The kernel may still be using it from a running vCPU until
                # every descriptor is closed; keep it until then.
                self._res.retired.append(old)
            return
        old = self.slots.get(slot)
        if (
            old is not None
            and old.flags & uapi.KVM_MEM_LOG_DIRTY_PAGES
            and not (region.flags & uapi.KVM_MEM_LOG_DIRTY_PAGES)
        ):
            self._dirty.forget(slot)
        self.slots[slot] = region
        if pin is not None and slot not in self._res.pins:
            self._res.pins[slot] = pin

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        fd = int(self.ioctl(uapi.KVM_CREATE_VCPU, vcpu_id))
        vcpu = Vcpu(self, fd, vcpu_id)
        size = self._dirty.ring_size
        if size:
            area = self.transport.mmap(fd, size, offset=_dirty.RING_OFFSET)
            vcpu.dirty_ring = self._dirty.rings[vcpu_id] = _dirty.DirtyRing(area, size)
            self._res.rings.append(vcpu.dirty_ring)
        return vcpu

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: before any vCPU (EINVAL after), once (EEXIST)."""
        self.ioctl(uapi.KVM_CREATE_IRQCHIP, 0)

    def set_tss_addr(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR (api.txt 4.35): a three-page region below 4 GiB."""
        self.ioctl(uapi.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR: before any vCPU (EINVAL after)."""
        self.ioctl(uapi.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr))

    def set_nr_mmu_pages(self, n: int) -> None:
        """KVM_SET_NR_MMU_PAGES: the shadow-page limit (at least 64, else EINVAL)."""
        self.ioctl(uapi.KVM_SET_NR_MMU_PAGES, n)

    def get_nr_mmu_pages(self) -> int:
        """KVM_GET_NR_MMU_PAGES. Today's kernels removed it: ENOTTY on both backends."""
        return int(self.ioctl(uapi.KVM_GET_NR_MMU_PAGES, 0))

    # -- dirty logging (docs/api.md, "Dirty logging"; kvmmmu.dirty) ----------------

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP (api.txt 4.36): ``flags`` must be 0. The VM caps: the
        exception-payload and triple-fault events, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
        and KVM_CAP_DIRTY_LOG_RING(_ACQ_REL), whose use this object remembers for
        :meth:`harvest_dirty` and for mapping each new vCPU's ring."""
        super().enable_cap(cap, *args, flags=flags)
        self._dirty.cap_enabled(cap, args)

    def enable_manual_dirty_log(self, initially_set: bool = False) -> None:
        """KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): GET_DIRTY_LOG returns the
        live bitmap without clearing it, and CLEAR_DIRTY_LOG re-protects; with
        ``initially_set``, a slot starts with every page dirty and nothing is
        write-protected when logging is turned on."""
        arg = uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
        if initially_set:
            arg |= uapi.KVM_DIRTY_LOG_INITIALLY_SET
        self.enable_cap(uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, arg)

    def enable_dirty_ring(self, size: int, acq_rel: bool = False) -> None:
        """KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING or _ACQ_REL): each vCPU gets a ring of
        ``size`` bytes (a power of two, 4096 to 1 MiB: EINVAL / E2BIG otherwise),
        before any vCPU exists (EINVAL after), once. GET/CLEAR_DIRTY_LOG are then
        ENXIO. Every vCPU created afterwards maps its ring as ``vcpu.dirty_ring``."""
        cap = uapi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL if acq_rel else uapi.KVM_CAP_DIRTY_LOG_RING
        self.enable_cap(cap, size)

    @property
    def dirty_mode(self) -> str:
        """How KVM logs for this VM, as enabled through this object: "bitmap"
        (GET_DIRTY_LOG fetch-and-clear), "manual" (GET + CLEAR_DIRTY_LOG) or "ring"."""
        return self._dirty.mode

    def _npages(self, slot: int) -> int:
        region = self.slots.get(slot)
        return 0 if region is None else int(region.memory_size) // _dirty.PAGE_SIZE

    def get_dirty_log(self, slot: int, *, npages: int | None = None) -> NDArray[np.uint64]:
        """KVM_GET_DIRTY_LOG: the slot's bitmap as ceil(npages/64) uint64 words (bit i =
        page i of the slot; :func:`kvmmmu.dirty.pages` lists them). Without manual
        protect the kernel takes the bits (fetch-and-clear) and re-protects those
        pages; with it, this is the live bitmap and nothing changes. ENOENT for a slot
        without logging (or none), EINVAL for a bad slot id, ENXIO in ring mode.
        ``npages`` defaults to the size set through this object."""
        if npages is None:
            npages = self._npages(slot)
        out = np.zeros(_dirty.nwords(npages), dtype=np.uint64)
        addr = out.ctypes.data if out.size else 0
        self.ioctl(uapi.KVM_GET_DIRTY_LOG, uapi.kvm_dirty_log(slot=slot, dirty_bitmap=addr))
        return out

    def clear_dirty_log(
        self,
        slot: int,
        first_page: int = 0,
        num_pages: int | None = None,
        bitmap: ArrayLike | None = None,
    ) -> None:
        """KVM_CLEAR_DIRTY_LOG: clear the pages ``first_page + i`` whose bit ``i`` is set
        in ``bitmap`` (uint64 words; default all ones) and dirty in KVM's log, and
        re-protect them. ``num_pages`` defaults to the rest of the slot. The kernel's
        rules: ``first_page`` a multiple of 64, ``num_pages`` too unless the range
        reaches the end of the slot, the range inside the slot (else EINVAL)."""
        if num_pages is None:
            num_pages = max(self._npages(slot) - first_page, 0)
        if not 0 <= num_pages <= 0xFFFF_FFFF:
            raise ValueError(f"num_pages {num_pages} does not fit the u32 field")
        n = _dirty.nwords(num_pages)
        if bitmap is None:
            words = np.full(n, np.iinfo(np.uint64).max, dtype=np.uint64)
        else:
            words = np.ascontiguousarray(bitmap, dtype=np.uint64).reshape(-1)
            if words.size < n:
                raise ValueError(f"{num_pages} pages need {n} bitmap words, not {words.size}")
        addr = words.ctypes.data if words.size else 0
        log = uapi.kvm_clear_dirty_log(
            slot=slot, num_pages=num_pages, first_page=first_page, dirty_bitmap=addr
        )
        self.ioctl(uapi.KVM_CLEAR_DIRTY_LOG, log)

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: give back every ring entry marked RESET (by
        ``vcpu.dirty_ring.harvest()``) and re-protect their pages; the number reset.
        EINVAL without a ring."""
        return int(self.ioctl(uapi.KVM_RESET_DIRTY_RINGS, 0))

    def write_guest(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """A write by the VMM (a device model, a loader) into guest memory through its
        own mapping of the slots, which KVM does not log, recorded in the VMM's dirty
        log for :meth:`harvest_dirty` *after* the bytes are in memory (so a harvest
        that sees the mark copies the new bytes). EFAULT where no slot is."""
        _dirty.write_guest(self, gpa, data)

    def read_guest(self, gpa: int, length: int) -> bytes:
        """Read guest memory through the VMM's mapping of the slots (EFAULT where no
        slot is)."""
        return _dirty.read_guest(self, gpa, length)

    def harvest_dirty(self, slot: int) -> NDArray[np.uint64]:
        """The pages of ``slot`` written since the last harvest, sorted, slot-relative:
        KVM's log in this VM's mode (fetch-and-clear GET_DIRTY_LOG; GET then CLEAR of
        exactly what GET returned; or every vCPU ring harvested then
        KVM_RESET_DIRTY_RINGS, entries of other slots kept for their harvest) united
        with the pages written by :meth:`write_guest`. Read the pages' contents after
        it returns. See :func:`kvmmmu.dirty.harvest` for why nothing is lost."""
        return _dirty.harvest(self, slot)

    @property
    def mmu(self) -> VmMmu:
        """The simulator-only view of the shadow MMU (shadow pages, roots, rmaps,
        audit, DOT pictures); not available on a device."""
        if not isinstance(self.transport, SimTransport):
            raise NotImplementedError("vm.mmu is simulator-only: the device hides its MMU")
        if self._mmu is None:
            self._mmu = VmMmu(self.transport.core.vm_mmu(self.fd), _weak_stats(self))
        return self._mmu

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd.fd}"
        return f"Vm({self.kvm.backend}, {state}, slots={sorted(self.slots)})"


class Vcpu(_VmOrVcpu):
    """A vCPU file descriptor and its mmap'ed ``kvm_run`` area."""

    def __init__(self, vm: Vm, fd: int, vcpu_id: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.transport = vm.transport
        res = vm._res
        res.open_fds.add(fd)
        size = vm.kvm.get_vcpu_mmap_size()
        self._mmap = self.transport.mmap(fd, size)
        #: The whole vCPU mmap (kvm_run, then the PIO data page).
        self._area = memoryview(self._mmap)
        #: The ``kvm_run`` struct shared with the kernel / the core.
        self.kvm_run: uapi.kvm_run = _KvmRunView.from_buffer(self._mmap)
        self.kvm_run._vcpu = weakref.ref(self)
        self._fd = _Fd(self, self.transport, fd, _VcpuCloser(self._mmap, res))
        self._runner = _Runner()
        self._last_exit: _exits.Exit | None = None
        if isinstance(self.transport, DevTransport):
            _install_kick_handler()
        self._stats: _Stats | None = None
        self._mmu: VcpuMmu | None = None
        #: The vCPU's dirty ring (a :class:`kvmmmu.dirty.DirtyRing`) when the VM enabled
        #: one through ``vm.enable_dirty_ring``; None otherwise. It stays mapped, and
        #: harvested by ``vm.harvest_dirty``, after the vCPU is closed.
        self.dirty_ring: _dirty.DirtyRing | None = None

    @property
    def run(self) -> _KvmRunView:
        """Call it: ``vcpu.run()`` is KVM_RUN (:meth:`run_vcpu`). As an attribute it is
        still the ``kvm_run`` struct (``vcpu.run.exit_reason``), as before
        ``run()`` existed; new code uses :attr:`kvm_run`."""
        try:
            return self.kvm_run  # type: ignore[return-value]
        except AttributeError:
            raise ValueError("Vcpu is closed") from None

    def close(self) -> None:
        if not self._fd.closed:
            del self.kvm_run
            self._area.release()
        self._fd.close()

    def _get(self, struct: type[_S], request: int) -> _S:
        """A GET ioctl that fills a fresh struct."""
        out = struct()
        self.ioctl(request, out)
        return out

    def get_regs(self) -> uapi.kvm_regs:
        return self._get(uapi.kvm_regs, uapi.KVM_GET_REGS)

    def set_regs(self, regs: uapi.kvm_regs) -> None:
        self.ioctl(uapi.KVM_SET_REGS, regs)

    def get_sregs(self) -> uapi.kvm_sregs:
        return self._get(uapi.kvm_sregs, uapi.KVM_GET_SREGS)

    def set_sregs(self, sregs: uapi.kvm_sregs) -> None:
        self.ioctl(uapi.KVM_SET_SREGS, sregs)

    def get_sregs2(self) -> uapi.kvm_sregs2:
        """KVM_GET_SREGS2: sregs without interrupt_bitmap, plus the PAE PDPTEs (flags
        KVM_SREGS2_FLAGS_PDPTRS_VALID in PAE paging)."""
        return self._get(uapi.kvm_sregs2, uapi.KVM_GET_SREGS2)

    def set_sregs2(self, sregs2: uapi.kvm_sregs2) -> None:
        self.ioctl(uapi.KVM_SET_SREGS2, sregs2)

    def translate(self, gva: int) -> uapi.kvm_translation:
        """KVM_TRANSLATE: a supervisor read walk that sets A bits on the way; the kernel
        always reports writeable=1 and usermode=0, and physical_address 2**64-1 with
        valid=0 when the walk faults."""
        t = uapi.kvm_translation(linear_address=gva)
        self.ioctl(uapi.KVM_TRANSLATE, t)
        return t

    @property
    def mmu(self) -> VcpuMmu:
        """The simulator-only MMU surface (walks, guest accesses through the shadow MMU,
        TLB maintenance); not available on a device."""
        if not isinstance(self.transport, SimTransport):
            raise NotImplementedError("vcpu.mmu is simulator-only: the device hides its MMU")
        if self._mmu is None:
            self._mmu = VcpuMmu(self.transport.core.vcpu_mmu(self.fd))
        return self._mmu

    def get_vcpu_events(self) -> uapi.kvm_vcpu_events:
        return self._get(uapi.kvm_vcpu_events, uapi.KVM_GET_VCPU_EVENTS)

    def set_vcpu_events(self, events: uapi.kvm_vcpu_events) -> None:
        self.ioctl(uapi.KVM_SET_VCPU_EVENTS, events)

    def get_debugregs(self) -> uapi.kvm_debugregs:
        return self._get(uapi.kvm_debugregs, uapi.KVM_GET_DEBUGREGS)

    def set_debugregs(self, debugregs: uapi.kvm_debugregs) -> None:
        self.ioctl(uapi.KVM_SET_DEBUGREGS, debugregs)

    def get_mp_state(self) -> int:
        m = uapi.kvm_mp_state()
        self.ioctl(uapi.KVM_GET_MP_STATE, m)
        return int(m.mp_state)

    def set_mp_state(self, mp_state: int) -> None:
        self.ioctl(uapi.KVM_SET_MP_STATE, uapi.kvm_mp_state(mp_state=mp_state))

    def get_msrs(self, indices: Sequence[int]) -> list[int]:
        """KVM_GET_MSRS: the values of the MSRs ``indices``, in order, up to (not
        including) the first one KVM cannot read (so the list may be shorter). E2BIG for
        256 or more indices."""
        m: Any = uapi.make_msrs(list(indices))
        n = int(self.ioctl(uapi.KVM_GET_MSRS, m))
        return [int(m.entries[i].data) for i in range(n)]

    def set_msrs(self, entries: Sequence[tuple[int, int]]) -> int:
        """KVM_SET_MSRS of ``(index, data)`` pairs, host-initiated: the number written,
        which stops at the first MSR that fails. E2BIG for 256 or more entries. Writing
        MSR_KVM_WALL_CLOCK(_NEW) makes KVM write the wall clock at that gpa (logged as
        dirty, to this vCPU's ring in ring mode)."""
        m = uapi.make_msrs([uapi.kvm_msr_entry(index=i, data=d) for i, d in entries])
        return int(self.ioctl(uapi.KVM_SET_MSRS, m))

    def set_cpuid2(self, entries: Sequence[uapi.kvm_cpuid_entry2]) -> None:
        """KVM_SET_CPUID2: the guest's CPUID table."""
        _cpuid.set_cpuid2(self.transport, self.fd, entries)

    def get_cpuid2(self, nent: int = 256) -> list[uapi.kvm_cpuid_entry2]:
        """KVM_GET_CPUID2: the table last set (E2BIG if ``nent`` is too small)."""
        return _cpuid.get_cpuid2(self.transport, self.fd, nent)

    # -- running (docs/api.md, "Running a vCPU"; kvmmmu.exits) ---------------------

    def run_vcpu(self) -> _exits.Exit:
        """KVM_RUN, then the exit decoded from ``kvm_run`` (the same decoding for both
        backends). EINTR (``immediate_exit`` set, :meth:`kick`, or a signal) is
        returned as :class:`~kvmmmu.exits.ExitIntr`; other errnos raise the OSError
        subclass. A pending MMIO read or port IN must be completed (with
        :meth:`complete_mmio_read` / :meth:`complete_io_in`) before this call: the
        guest instruction finishes inside it with the data then in ``kvm_run``."""
        fd = self.fd
        runner = self._runner
        runner.thread = threading.get_ident()
        try:
            self.transport.ioctl(fd, uapi.KVM_RUN, 0)
        except InterruptedError:
            self._last_exit = _exits._INTR
            return self._last_exit
        finally:
            runner.leave()
        self._last_exit = _exits.decode(self._area)
        return self._last_exit

    @property
    def last_exit(self) -> _exits.Exit | None:
        """The record the last :meth:`run` returned (None before the first)."""
        return self._last_exit

    def complete_mmio_read(self, data: bytes | bytearray | memoryview) -> None:
        """Answer the pending KVM_EXIT_MMIO read: ``data`` (exactly ``len`` bytes) goes
        to ``kvm_run.mmio.data`` and the guest loads it when :meth:`run` re-enters."""
        last = self._last_exit
        if not isinstance(last, _exits.ExitMmio) or last.is_write:
            raise RuntimeError(f"no pending MMIO read to complete (last exit: {last})")
        data = bytes(data)
        if len(data) != last.len:
            raise ValueError(f"MMIO read of {last.len} bytes completed with {len(data)}")
        ctypes.memmove(self.kvm_run.mmio.data, data, len(data))

    def complete_io_in(self, data: bytes | bytearray | memoryview) -> None:
        """Answer the pending KVM_EXIT_IO IN: ``data`` (exactly ``size * count`` bytes)
        goes to the I/O data at ``kvm_run.io.data_offset``; the guest's IN (or INS)
        finishes when :meth:`run` re-enters."""
        last = self._last_exit
        if not isinstance(last, _exits.ExitIo) or last.is_write:
            raise RuntimeError(f"no pending port IN to complete (last exit: {last})")
        data = bytes(data)
        n = last.size * last.count
        if len(data) != n:
            raise ValueError(f"IN of {last.size}x{last.count} bytes completed with {len(data)}")
        start = int(self.kvm_run.io.data_offset)
        if start + n > len(self._area):
            raise ValueError(f"kvm_run.io data at {start:#x}+{n} is outside the vCPU mmap")
        self._area[start : start + n] = data

    @property
    def immediate_exit(self) -> bool:
        """``kvm_run.immediate_exit``: while set, KVM_RUN returns EINTR at once
        (:class:`~kvmmmu.exits.ExitIntr`). KVM never clears it, nor does ``run()``."""
        return bool(self.kvm_run.immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self.kvm_run.immediate_exit = 1 if value else 0

    def kick(self) -> None:
        """Make a running or about-to-run :meth:`run` return
        :class:`~kvmmmu.exits.ExitIntr`: safe from any thread at any time. Sets
        ``immediate_exit`` (for the next entry) and interrupts a KVM_RUN in progress:
        on the device with :data:`KICK_SIGNAL` sent to the thread inside ``run()``
        (as QEMU's SIG_IPI), on the simulator through the core. Clear
        ``immediate_exit`` afterwards to run again."""
        try:
            self.kvm_run.immediate_exit = 1
        except AttributeError:
            return  # closed: nothing runs
        self._runner.kick(self.transport, self._fd.fd)

    def set_guest_debug(
        self,
        enable: bool = True,
        *,
        single_step: bool = False,
        sw_bp: bool = False,
        hw_bp: bool = False,
        inject_db: bool = False,
        inject_bp: bool = False,
        blockirq: bool = False,
        debugreg: Sequence[int] = (),
    ) -> None:
        """KVM_SET_GUEST_DEBUG: with ``single_step`` every guest instruction ends in
        :class:`~kvmmmu.exits.ExitDebug` (#DB, ``pc`` the next instruction); with
        ``sw_bp`` an INT3 exits as #BP instead of reaching the guest; with ``hw_bp``
        ``debugreg`` (DR0-DR3, -, -, DR6, DR7) is used. ``enable=False`` turns it off."""
        control = 0
        if enable:
            control = uapi.KVM_GUESTDBG_ENABLE
            for on, bit in (
                (single_step, uapi.KVM_GUESTDBG_SINGLESTEP),
                (sw_bp, uapi.KVM_GUESTDBG_USE_SW_BP),
                (hw_bp, uapi.KVM_GUESTDBG_USE_HW_BP),
                (inject_db, uapi.KVM_GUESTDBG_INJECT_DB),
                (inject_bp, uapi.KVM_GUESTDBG_INJECT_BP),
                (blockirq, uapi.KVM_GUESTDBG_BLOCKIRQ),
            ):
                if on:
                    control |= bit
        dbg = uapi.kvm_guest_debug(control=control)
        if len(debugreg) > 8:
            raise ValueError("kvm_guest_debug has eight debugreg slots")
        for i, value in enumerate(debugreg):
            dbg.arch.debugreg[i] = value
        self.ioctl(uapi.KVM_SET_GUEST_DEBUG, dbg)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd.fd}"
        return f"Vcpu({self.vm.kvm.backend}, id={self.id}, {state})"


class _KvmRunView(uapi.kvm_run):
    """``vcpu.run``: the kvm_run struct, which when called runs the vCPU (so that both
    ``vcpu.run()`` and the older ``vcpu.run.exit_reason`` work). It holds the vCPU
    only weakly."""

    _vcpu: Any

    def __call__(self) -> _exits.Exit:
        vcpu = self._vcpu()
        if vcpu is None:
            raise ValueError("Vcpu is closed")
        result: _exits.Exit = vcpu.run_vcpu()
        return result


#: The signal :meth:`Vcpu.kick` sends to a thread inside KVM_RUN on the device (as
#: QEMU's SIG_IPI): its handler does nothing; the signal only makes KVM_RUN
#: return EINTR. A real-time signal nobody else uses.
KICK_SIGNAL = signal.SIGRTMIN + 2


def _kick_handler(signum: int, frame: object) -> None:
    del signum, frame  # the interruption of KVM_RUN is the whole point


def _install_kick_handler() -> bool:
    """Install the no-op KICK_SIGNAL handler (only the main thread can); True when a
    Python handler is in place, so the signal interrupts instead of killing."""
    current = signal.getsignal(KICK_SIGNAL)
    if callable(current):
        return True
    if current == signal.SIG_IGN:
        return False  # the program ignores it: an ignored signal interrupts nothing
    if threading.current_thread() is not threading.main_thread():
        return False
    # CPython installs it without SA_RESTART; KVM returns EINTR either way.
    signal.signal(KICK_SIGNAL, _kick_handler)
    return True


class _Runner:
    """Which thread is inside KVM_RUN, so a kick can reach it while it is alive."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        #: Set by the thread entering KVM_RUN (a plain store: kick reads it under the
        #: lock, and the thread cannot leave run() without taking the lock).
        self.thread: int | None = None

    def leave(self) -> None:
        with self._lock:
            self.thread = None

    def kick(self, transport: Transport, fd: int) -> None:
        with self._lock:
            # Held across the send: the thread cannot finish leave() and exit before.
            if self.thread is None:
                return  # immediate_exit alone stops the next run
            if isinstance(transport, SimTransport):
                # The core's stand-in for the signal, checked (with immediate_exit)
                # between batches of instructions.
                try:
                    transport.core.kick(fd)
                except OSError:
                    pass  # closed meanwhile: nothing runs
            elif _install_kick_handler():
                signal.pthread_kill(self.thread, KICK_SIGNAL)


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


def _enable_cap(cap: int, args: Sequence[int], flags: int) -> uapi.kvm_enable_cap:
    if len(args) > 4:
        raise ValueError("kvm_enable_cap has four args")
    s = uapi.kvm_enable_cap(cap=cap, flags=flags)
    for i, a in enumerate(args):
        s.args[i] = a
    return s


class _Stats:
    """A stats descriptor owned by a Vm or Vcpu, closed with it."""

    def __init__(self, owner: object, transport: Transport, fd: int) -> None:
        self._fd = _Fd(owner, transport, fd)
        self.reader = StatsReader(fd)

    def read(self) -> dict[str, int | list[int]]:
        return self.reader.read()
