"""Dirty logging: bitmap helpers, the per-vCPU dirty ring, and the VMM's own log.

KVM records the pages a *guest* writes, in one of two forms (api.txt 4.8, 4.117,
8.29; ``docs/api.md``, "Dirty logging"):

* a bitmap per memory slot with KVM_MEM_LOG_DIRTY_PAGES, read by KVM_GET_DIRTY_LOG
  (fetch-and-clear, or the live bitmap with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, which
  then needs KVM_CLEAR_DIRTY_LOG), bit ``i`` = page ``i`` of the slot, little-endian
  64-bit words;
* a ring per vCPU (KVM_CAP_DIRTY_LOG_RING), mmapped from the vCPU descriptor:
  :class:`DirtyRing`.

Writes the VMM makes through its own mapping of guest memory are not logged by KVM
(on either backend). :meth:`kvmmmu.Vm.write_guest` writes and records them in a
:class:`VmmDirtyLog`, and :meth:`kvmmmu.Vm.harvest_dirty` returns the union of both
logs, in whichever mode the VM uses.

Helpers: :func:`pages` (a bitmap's set bits), :func:`bitmap` (the reverse),
:func:`ranges` (runs of consecutive pages), :func:`nwords`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from . import uapi

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, NDArray

    from .api import Vm

PAGE_SIZE = 4096

#: One ``struct kvm_dirty_gfn`` (16 bytes): flags, slot (as_id << 16 | id), offset.
RING_DTYPE = np.dtype([("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")])
assert RING_DTYPE.itemsize == 16

DIRTY = uapi.KVM_DIRTY_GFN_F_DIRTY
RESET = uapi.KVM_DIRTY_GFN_F_RESET

#: KVM_DIRTY_LOG_PAGE_OFFSET in bytes: where a vCPU's ring starts in its mmap area.
RING_OFFSET = uapi.KVM_DIRTY_LOG_PAGE_OFFSET * 4096

_EMPTY = np.zeros(0, dtype=np.uint64)


def nwords(npages: int) -> int:
    """Words (u64) of a slot's dirty bitmap: ceil(npages / 64)."""
    return (npages + 63) // 64


def pages(bitmap: ArrayLike) -> NDArray[np.uint64]:
    """The indices of the set bits of a little-endian bitmap of u64 words (what
    KVM_GET_DIRTY_LOG writes), in increasing order: slot-relative page numbers.
    Costs what the non-zero words are, after one scan for them."""
    words = np.ascontiguousarray(bitmap, dtype=np.uint64).reshape(-1)
    nz = np.flatnonzero(words)
    if nz.size == 0:
        return _EMPTY.copy()
    bits = np.unpackbits(words[nz].view(np.uint8), bitorder="little").reshape(-1, 64)
    row, col = np.nonzero(bits)
    return (nz[row].astype(np.uint64) << np.uint64(6)) | col.astype(np.uint64)


def bitmap(page_numbers: ArrayLike, npages: int) -> NDArray[np.uint64]:
    """The bitmap of ``nwords(npages)`` words with the given pages set (the reverse of
    :func:`pages`); a page outside ``[0, npages)`` is a ValueError."""
    p = np.asarray(page_numbers, dtype=np.uint64).reshape(-1)
    if p.size and int(p.max()) >= npages:
        raise ValueError(f"page {int(p.max())} is outside a slot of {npages} pages")
    out = np.zeros(nwords(npages), dtype=np.uint64)
    np.bitwise_or.at(out, p >> np.uint64(6), np.uint64(1) << (p & np.uint64(63)))
    return out


def ranges(page_numbers: ArrayLike) -> list[tuple[int, int]]:
    """Runs of consecutive pages as ``(start, count)``, in order (duplicates merge):
    ``ranges([0, 1, 2, 7, 9, 10]) == [(0, 3), (7, 1), (9, 2)]``."""
    p = np.unique(np.asarray(page_numbers, dtype=np.uint64).reshape(-1))
    if p.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(p) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [p.size]))
    return [(int(p[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]


class DirtyRing:
    """One vCPU's dirty ring: ``struct kvm_dirty_gfn`` entries mmapped from the vCPU
    descriptor at page KVM_DIRTY_LOG_PAGE_OFFSET (on both backends).

    ``entries`` is a numpy structured array (``RING_DTYPE``: ``flags``, ``slot``,
    ``offset``) over the shared mapping: KVM pushes entries in order (slot and offset
    first, then ``flags = DIRTY``); the VMM harvests them in order from where it
    stopped, sets ``flags = RESET`` on each, and gives them back with
    KVM_RESET_DIRTY_RINGS (``vm.reset_dirty_rings()``), which re-protects the pages.

    Ordering: ``harvest`` reads the flags first and the slot/offset of the entries
    found DIRTY afterwards, then stores RESET. x86 keeps loads in order and stores in
    order (TSO), so the entry read is the one KVM wrote before its release store of
    DIRTY, and RESET is seen after our reads, as the ACQ_REL protocol asks.

    One thread harvests a ring at a time.
    """

    def __init__(self, area: Any, size: int) -> None:
        self.size = size
        self.n = size // RING_DTYPE.itemsize
        self._area = area
        self.entries: NDArray[Any] = np.frombuffer(area, dtype=RING_DTYPE, count=self.n)
        self._flags: NDArray[np.uint32] = self.entries["flags"]
        #: Entries harvested so far (the ring index of the next one is this mod n).
        self.fetch_index = 0
        self._closed = False

    def __len__(self) -> int:
        return self.n

    def pending(self) -> int:
        """Entries from ``fetch_index`` on that are DIRTY now (not yet harvested)."""
        return self._scan()

    def _scan(self) -> int:
        if self._closed:
            raise ValueError("the dirty ring is closed (every descriptor of its VM is)")
        i0 = self.fetch_index & (self.n - 1)
        f = np.concatenate((self._flags[i0:], self._flags[:i0]))
        dirty = (f & DIRTY) != 0
        return self.n if dirty.all() else int(np.argmin(dirty))

    def harvest(self, limit: int | None = None) -> tuple[NDArray[np.uint32], NDArray[np.uint64]]:
        """Collect the DIRTY entries in order from the last harvested one (at most
        ``limit``), mark them RESET and return ``(slots, offsets)`` (copies). The pages
        are re-protected, and the entries reusable, after ``vm.reset_dirty_rings()``;
        read page contents only after that."""
        k = self._scan()
        if limit is not None:
            k = min(k, limit)
        if k == 0:
            return np.zeros(0, dtype=np.uint32), _EMPTY.copy()
        idx = (self.fetch_index + np.arange(k)) & (self.n - 1)
        got = self.entries[idx]  # after the flags: the entries KVM completed
        self._flags[idx] = RESET
        self.fetch_index += k
        return got["slot"].copy(), got["offset"].copy()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Drop the view and unmap (the mapping goes with the last view of it that
        the caller still holds)."""
        self._closed = True
        self.entries = np.zeros(0, dtype=RING_DTYPE)
        self._flags = self.entries["flags"]
        try:
            self._area.close()
        except BufferError:
            pass

    def __repr__(self) -> str:
        return f"DirtyRing({self.n} entries, fetch_index={self.fetch_index})"


class VmmDirtyLog:
    """Pages the VMM wrote through its own mapping, per slot (KVM does not see those).

    :meth:`mark` is called *after* the bytes are in guest memory, and :meth:`take`
    swaps a slot's set for an empty one under the lock, so a mark racing a take lands
    in this take or the next one, never in neither. Sparse: costs what was written.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pages: dict[int, set[int]] = {}

    def mark(self, slot: int, first: int, count: int = 1) -> None:
        with self._lock:
            s = self._pages.setdefault(slot, set())
            s.update(range(first, first + count))

    def take(self, slot: int) -> set[int]:
        with self._lock:
            return self._pages.pop(slot, set())

    def peek(self, slot: int) -> set[int]:
        with self._lock:
            return set(self._pages.get(slot, ()))

    def forget(self, slot: int) -> None:
        with self._lock:
            self._pages.pop(slot, None)


def union(*parts: ArrayLike | set[int]) -> NDArray[np.uint64]:
    """Sorted unique uint64 page numbers of every part (arrays or sets)."""
    arrays = [
        np.fromiter(p, dtype=np.uint64, count=len(p))
        if isinstance(p, set)
        else np.asarray(p, dtype=np.uint64).reshape(-1)
        for p in parts
    ]
    arrays = [a for a in arrays if a.size]
    if not arrays:
        return _EMPTY.copy()
    return np.unique(np.concatenate(arrays))


class _Iovec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
for _name in ("process_vm_readv", "process_vm_writev"):
    _fn = getattr(_libc, _name)
    _fn.argtypes = [
        ctypes.c_int,
        ctypes.POINTER(_Iovec),
        ctypes.c_ulong,
        ctypes.POINTER(_Iovec),
        ctypes.c_ulong,
        ctypes.c_ulong,
    ]
    _fn.restype = ctypes.c_ssize_t


def _copy(fn: Any, remote: int, local: int, n: int) -> None:
    """One process_vm_readv/writev on this process: a bad address is EFAULT, never a
    crash (as the kernel's copy_to_user/copy_from_user)."""
    if n == 0:
        return
    lio = _Iovec(local, n)
    rio = _Iovec(remote, n)
    r = fn(os.getpid(), ctypes.byref(lio), 1, ctypes.byref(rio), 1, 0)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    if r != n:
        raise OSError(errno.EFAULT, os.strerror(errno.EFAULT))


def write_user(addr: int, data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` at address ``addr`` of this process (EFAULT if unmapped)."""
    buf = (ctypes.c_char * len(data)).from_buffer_copy(data)
    _copy(_libc.process_vm_writev, addr, ctypes.addressof(buf), len(data))


def read_user(addr: int, length: int) -> bytes:
    """Read ``length`` bytes at address ``addr`` of this process (EFAULT if unmapped)."""
    buf = ctypes.create_string_buffer(length)
    _copy(_libc.process_vm_readv, addr, ctypes.addressof(buf), length)
    return buf.raw


# -- the VM's side: modes, the VMM's writes, the harvest -----------------------------


class VmDirtyState:
    """What a :class:`kvmmmu.Vm` knows of its dirty logging: the caps enabled through
    it, each vCPU's ring, the VMM's own log, and ring entries harvested for slots
    that were not the one asked for (kept for their own harvest)."""

    def __init__(self) -> None:
        self.manual = 0
        self.ring_size = 0
        self.acq_rel = False
        self.rings: dict[int, DirtyRing] = {}
        self.vmm = VmmDirtyLog()
        self.pending: dict[int, set[int]] = {}
        self.harvest_lock = threading.Lock()

    @property
    def mode(self) -> str:
        if self.ring_size:
            return "ring"
        return "manual" if self.manual & uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE else "bitmap"

    def cap_enabled(self, cap: int, args: tuple[int, ...]) -> None:
        arg0 = args[0] if args else 0
        if cap == uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
            self.manual = arg0
        elif cap in (uapi.KVM_CAP_DIRTY_LOG_RING, uapi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL):
            self.ring_size = arg0
            self.acq_rel = cap == uapi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL

    def forget(self, slot: int) -> None:
        """The slot went away or stopped logging: its pending pages go too."""
        self.vmm.forget(slot)
        with self.harvest_lock:
            self.pending.pop(slot, None)


def _slot_at(vm: Vm, gpa: int) -> tuple[int, Any]:
    for slot, r in vm.slots.items():
        if slot >> 16 == 0 and r.guest_phys_addr <= gpa < r.guest_phys_addr + r.memory_size:
            return slot, r
    raise OSError(errno.EFAULT, f"{os.strerror(errno.EFAULT)}: no memory slot at gpa {gpa:#x}")


def write_guest(vm: Vm, gpa: int, data: bytes | bytearray | memoryview) -> None:
    """See :meth:`kvmmmu.Vm.write_guest`: per slot crossed, the bytes first, then the
    mark in the VMM's log (when the slot logs)."""
    view = memoryview(data).cast("B")
    pos = 0
    while pos < len(view):
        slot, r = _slot_at(vm, gpa + pos)
        off = gpa + pos - r.guest_phys_addr
        n = min(len(view) - pos, r.memory_size - off)
        write_user(r.userspace_addr + off, view[pos : pos + n])
        if r.flags & uapi.KVM_MEM_LOG_DIRTY_PAGES:
            first = off // PAGE_SIZE
            vm._dirty.vmm.mark(slot, first, (off + n - 1) // PAGE_SIZE - first + 1)
        pos += n


def read_guest(vm: Vm, gpa: int, length: int) -> bytes:
    """See :meth:`kvmmmu.Vm.read_guest`."""
    out = bytearray()
    while len(out) < length:
        _, r = _slot_at(vm, gpa + len(out))
        off = gpa + len(out) - r.guest_phys_addr
        n = min(length - len(out), r.memory_size - off)
        out += read_user(r.userspace_addr + off, n)
    return bytes(out)


def harvest(vm: Vm, slot: int) -> NDArray[np.uint64]:
    """:meth:`kvmmmu.Vm.harvest_dirty`: KVM's log of ``slot`` in the VM's mode, united
    with the VMM's, as sorted slot-relative page numbers.

    Why no write is lost (a write racing a harvest is in this one or the next):

    * Guest writes: KVM logs a page when it makes its SPTE writable, and the harvest
      takes the log *then* re-protects (fetch-and-clear GET; GET then CLEAR of exactly
      the bits GET returned, so bits set after the GET stay for the next harvest; ring
      entries marked RESET then KVM_RESET_DIRTY_RINGS) and flushes the TLBs before the
      ioctl returns. A write after the take either finds the SPTE still writable (its
      page is in this harvest, and the copy made after we return sees the bytes) or
      faults on the re-protected page and is logged again for the next harvest.
    * VMM writes (:meth:`kvmmmu.Vm.write_guest`): the bytes are stored *before* the
      page is marked, and the marks are taken by swapping the slot's set for an empty
      one under the log's lock. A mark taken here belongs to bytes already in memory,
      which the caller's copy (made after we return) reads; a mark made after the swap
      stays for the next harvest. Marking first would let a harvest take the mark and
      copy the page before the bytes arrived, and lose them.

    Call it from one thread at a time per VM (it holds a lock for that): the rings
    are consumed in order by one reader.
    """
    st = vm._dirty
    with st.harvest_lock:
        if st.ring_size:
            region = vm.slots.get(slot)
            if region is None or not region.flags & uapi.KVM_MEM_LOG_DIRTY_PAGES:
                raise OSError(errno.ENOENT, f"{os.strerror(errno.ENOENT)}: slot {slot} not logging")
            kvm_pages: Any = _harvest_rings(vm, st, slot)
        else:
            bm = vm.get_dirty_log(slot)
            if st.manual & uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
                nz = np.flatnonzero(bm)
                if nz.size:
                    w0, w1 = int(nz[0]), int(nz[-1]) + 1
                    first = 64 * w0
                    num = min(64 * w1, vm._npages(slot)) - first
                    vm.clear_dirty_log(slot, first, num, bm[w0:w1])
            kvm_pages = pages(bm)
        return union(kvm_pages, st.vmm.take(slot))


def _harvest_rings(vm: Vm, st: VmDirtyState, slot: int) -> set[int]:
    slots, offsets = [], []
    for ring in st.rings.values():
        s, o = ring.harvest()
        if s.size:
            slots.append(s)
            offsets.append(o)
    if slots:
        vm.reset_dirty_rings()
        all_s, all_o = np.concatenate(slots), np.concatenate(offsets)
        for other in np.unique(all_s).tolist():
            st.pending.setdefault(other, set()).update(all_o[all_s == other].tolist())
    return st.pending.pop(slot, set())
