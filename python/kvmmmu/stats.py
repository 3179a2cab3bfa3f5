"""Reading KVM's binary statistics (KVM_GET_STATS_FD), on either backend.

The file is ``struct kvm_stats_header``, an id string, ``num_desc`` descriptors
(``struct kvm_stats_desc`` followed by a ``name_size``-byte name) and the data
words. Values are read with ``pread`` at the offsets the header gives, so the
same code reads the kernel's file and the simulator's.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from . import uapi

_HEADER = struct.Struct("<6I")
_DESC = struct.Struct("<IhHII")


@dataclass(frozen=True)
class StatDesc:
    name: str
    flags: int
    exponent: int
    size: int
    offset: int
    bucket_size: int

    @property
    def type(self) -> int:
        return self.flags & uapi.KVM_STATS_TYPE_MASK

    @property
    def unit(self) -> int:
        return self.flags & uapi.KVM_STATS_UNIT_MASK

    @property
    def cumulative(self) -> bool:
        return self.type == uapi.KVM_STATS_TYPE_CUMULATIVE


class StatsReader:
    """Parses the header and descriptors once; :meth:`read` gives live values."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        flags, name_size, num_desc, id_offset, desc_offset, data_offset = _HEADER.unpack(
            os.pread(fd, _HEADER.size, 0)
        )
        self.flags = flags
        self.id = os.pread(fd, name_size, id_offset).split(b"\0", 1)[0].decode()
        self.data_offset = data_offset
        size = _DESC.size + name_size
        raw = os.pread(fd, size * num_desc, desc_offset)
        self.descs: list[StatDesc] = []
        for i in range(num_desc):
            d = raw[i * size : (i + 1) * size]
            fl, exp, sz, off, bucket = _DESC.unpack_from(d)
            name = d[_DESC.size :].split(b"\0", 1)[0].decode()
            self.descs.append(StatDesc(name, fl, exp, sz, off, bucket))
        self._span = max((d.offset + 8 * d.size for d in self.descs), default=0)

    def read(self) -> dict[str, int | list[int]]:
        """Every counter by name: an int, or a list for histograms (size > 1)."""
        data = os.pread(self.fd, self._span, self.data_offset)
        out: dict[str, int | list[int]] = {}
        for d in self.descs:
            words = struct.unpack_from(f"<{d.size}Q", data, d.offset)
            out[d.name] = words[0] if d.size == 1 else list(words)
        return out
