"""kvmmmu: a faithful, fast, inspectable model of the x86 KVM MMU.

``kvmmmu.Kvm()`` is a software /dev/kvm (the simulator); ``kvmmmu.Kvm("/dev/kvm")``
is the machine's real KVM. Both speak the same ioctl API.
"""

from . import dot, exits, uapi
from ._core import GuestMemory, SimKvm, __version__
from .api import KICK_SIGNAL, Kvm, Vcpu, Vm
from .exits import (
    Exit,
    ExitDebug,
    ExitDirtyRingFull,
    ExitFailEntry,
    ExitHlt,
    ExitInternalError,
    ExitIntr,
    ExitIo,
    ExitMmio,
    ExitOther,
    ExitShutdown,
    ExitSystemEvent,
    ExitUnknown,
)
from .mmu import (
    DirtyRingFull,
    GuestMmioAccess,
    GuestPageFault,
    MmuAuditError,
    ShadowPage,
    WalkResult,
    mmio_caching,
    set_mmio_caching,
)
from .transport import DevTransport, SimTransport, Transport, device_available
from .uapi import (
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    kvm_regs,
    kvm_segment,
    kvm_sregs,
    kvm_userspace_memory_region,
)

__all__ = [
    "KICK_SIGNAL",
    "KVM_MEM_LOG_DIRTY_PAGES",
    "KVM_MEM_READONLY",
    "DevTransport",
    "DirtyRingFull",
    "Exit",
    "ExitDebug",
    "ExitDirtyRingFull",
    "ExitFailEntry",
    "ExitHlt",
    "ExitInternalError",
    "ExitIntr",
    "ExitIo",
    "ExitMmio",
    "ExitOther",
    "ExitShutdown",
    "ExitSystemEvent",
    "ExitUnknown",
    "GuestMemory",
    "GuestMmioAccess",
    "GuestPageFault",
    "Kvm",
    "MmuAuditError",
    "ShadowPage",
    "SimKvm",
    "SimTransport",
    "Transport",
    "Vcpu",
    "Vm",
    "WalkResult",
    "__version__",
    "device_available",
    "dot",
    "exits",
    "kvm_regs",
    "kvm_segment",
    "kvm_sregs",
    "kvm_userspace_memory_region",
    "mmio_caching",
    "set_mmio_caching",
    "uapi",
]
