"""A guest in one object: memory slots, page tables, GDT/IDT/TSS, exception stubs,
a program, and the register state that starts it, for every x86 mode.

    g = Guest("lm64")
    a = g.asm                      # an Asm at g.code, in the mode's bitness
    a.mov(rax, 42)
    a.hlt()
    m = g.boot(Kvm())              # or Kvm("/dev/kvm"): a VM, slots, a vCPU, state set
    exit = m.vcpu.run()

Modes: ``real`` (16-bit, IVT), ``pm32`` (no paging), ``pg32`` (32-bit paging, CR4.PSE),
``pae``, ``lm64`` (4-level) and ``lm57`` (5-level, CR4.LA57). ``real``, ``pm32`` and
``lm64`` run on this machine's /dev/kvm (DEVICE_MODES); it drops CR0.PG without long
mode (the first KVM_RUN of ``pg32`` or ``pae`` is KVM_EXIT_SHUTDOWN) and lacks LA57,
so those are for the simulator.

The low memory slot (slot 0) holds everything at fixed gpas, identity-mapped in every
paging mode with P|W|U pages:

    0x1000 GDT   0x2000 IDT   0x3000 TSS   0x4000 exception stubs   0x8000 program
    stacks: kernel top 0x7f000, user top 0x6f000, IST1 top 0x5f000 (real mode: 0x7000)
    0x100000-0x200000 page-table pool, 0x200000- free pages (:meth:`Guest.alloc`)

Exceptions go to :mod:`kvmmmu.guest.stubs`, which report through MMIO at ``report``
(0xe0000000, no slot; real mode 0xb0000) and halt; :meth:`Machine.host_iret` resumes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .._core import GuestMemory
from . import layout as L
from . import stubs
from .asm import Asm
from .paging import P, PageTables, U, W

if TYPE_CHECKING:
    from ..api import Kvm, Vcpu, Vm
    from ..uapi import kvm_sregs

#: mode -> (bitness, paging mode of kvmmmu.guest.paging or None)
MODES: dict[str, tuple[int, str | None]] = {
    "real": (16, None),
    "pm32": (32, None),
    "pg32": (32, "32-bit"),
    "pae": (32, "pae"),
    "lm64": (64, "4-level"),
    "lm57": (64, "5-level"),
}
DEVICE_MODES = frozenset({"real", "pm32", "lm64"})

GDT, IDT, TSS, STUBS, CODE = 0x1000, 0x2000, 0x3000, 0x4000, 0x8000
KSTACK_TOP, USTACK_TOP, IST1_TOP = 0x7F000, 0x6F000, 0x5F000
REAL_STACK_TOP = 0x7000
PT_POOL, PT_POOL_END, FREE = 0x10_0000, 0x20_0000, 0x20_0000
PT_POOL_SLICE = 0x4_0000  # 64 pages per address space
REPORT = 0xE000_0000
REAL_REPORT = 0xB_0000
MMIO_PAGES = 16  # identity-mapped from report: the stubs' page and device registers

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_AM, CR0_PG = (
    1, 2, 0x10, 0x20, 0x1_0000, 0x4_0000, 0x8000_0000,
)  # fmt: skip
CR4_PSE, CR4_PAE, CR4_LA57 = 0x10, 0x20, 0x1000
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE = 1, 0x100, 0x400, 0x800


@dataclass
class Slot:
    slot: int
    gpa: int
    mem: GuestMemory
    flags: int = 0


@dataclass
class Guest:
    """Everything needed to boot a guest; see the module docstring."""

    mode: str = "lm64"
    low_size: int = 4 << 20
    slots: list[Slot] = field(default_factory=list)
    #: long mode: vectors whose gate switches to the IST1 stack (TSS.IST1 = IST1_TOP)
    ist_vectors: frozenset[int] = frozenset({8})

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; one of {sorted(MODES)}")
        self.bitness, paging = MODES[self.mode]
        if self.mode == "real":
            self.low_size = min(self.low_size, 0xA_0000)  # the hole above holds REAL_REPORT
        self.report = REAL_REPORT if self.mode == "real" else REPORT
        self.mem = GuestMemory(self.low_size)
        self.slots.insert(0, Slot(0, 0, self.mem))
        self.asm = Asm(self.bitness, CODE)
        self.stub_asm = Asm(self.bitness, STUBS)
        self.stub_entries = stubs.emit(self.stub_asm, self.report)
        self._free = FREE
        self._pools = PT_POOL
        self.address_spaces: list[PageTables] = []
        self.pt: PageTables | None = self.new_address_space() if paging else None
        self.code = CODE
        self._built = False

    # -- memory and mappings --------------------------------------------------------------

    @property
    def paging(self) -> str | None:
        return MODES[self.mode][1]

    def add_slot(self, slot: int, gpa: int, size: int, flags: int = 0) -> GuestMemory:
        """Another memory slot (e.g. a data slot with KVM_MEM_LOG_DIRTY_PAGES)."""
        mem = GuestMemory(size)
        self.slots.append(Slot(slot, gpa, mem, flags))
        return mem

    def alloc(self, pages: int = 1) -> int:
        """Zeroed free pages of the low slot (their gpa, identity-mapped)."""
        gpa = self._free
        if gpa + pages * 4096 > self.low_size:
            raise MemoryError("the low slot is full")
        self._free += pages * 4096
        self.mem.write(gpa, bytes(pages * 4096))
        return gpa

    def new_address_space(self) -> PageTables:
        """Page tables (a root for CR3) with the low slot and the MMIO window identity-
        mapped; the first one is :attr:`pt`, the one the guest boots with."""
        paging = self.paging
        if paging is None:
            raise ValueError(f"{self.mode} has no paging")
        if self._pools + PT_POOL_SLICE > PT_POOL_END:
            raise MemoryError("no room for another address space")
        pt = PageTables(self.mem, paging, pool=self._pools, pool_size=PT_POOL_SLICE)
        self._pools += PT_POOL_SLICE
        for gpa in range(0, self.low_size, 4096):
            pt.map(gpa, gpa, flags=P | W | U)
        for i in range(MMIO_PAGES):
            pt.map(self.report + i * 4096, self.report + i * 4096, flags=P | W | U)
        self.address_spaces.append(pt)
        return pt

    def map(self, gva: int, gpa: int, *, size: int = 4096, flags: int = P | W | U) -> int:
        """Map in every address space made so far; the gpa of the first leaf entry."""
        entries = [pt.map(gva, gpa, size=size, flags=flags) for pt in self.address_spaces]
        return entries[0]

    def read(self, gpa: int, n: int) -> bytes:
        for s in self.slots:
            if s.gpa <= gpa and gpa + n <= s.gpa + s.mem.size:
                return s.mem.read(gpa - s.gpa, n)
        raise ValueError(f"gpa {gpa:#x}+{n} is not in one slot")

    def write(self, gpa: int, data: bytes) -> None:
        for s in self.slots:
            if s.gpa <= gpa and gpa + len(data) <= s.gpa + s.mem.size:
                s.mem.write(gpa - s.gpa, data)
                return
        raise ValueError(f"gpa {gpa:#x}+{len(data)} is not in one slot")

    def translate(self, gva: int, cr3: int | None = None) -> int:
        """gva -> gpa through the address space whose root is ``cr3`` (identity without
        paging); what the guest's tables say, read by the host without touching A/D."""
        if self.paging is None:
            return gva
        for pt in self.address_spaces:
            if cr3 is None or pt.cr3 == cr3 & ~0xFFF:
                gpa = pt.translate(gva)
                if gpa is None:
                    raise LookupError(f"{gva:#x} is not mapped")
                return gpa
        raise LookupError(f"no address space with CR3 {cr3:#x}")

    # -- tables and code ------------------------------------------------------------------

    def build(self) -> None:
        """Assemble the program and stubs and write them and the tables into memory."""
        code = self.asm.assemble()
        stub_code = self.stub_asm.assemble()
        if STUBS + len(stub_code) > CODE:
            raise MemoryError("the exception stubs overflow into the program")
        if CODE + len(code) > IST1_TOP - 0x1_0000:
            raise MemoryError("the program overflows into the stacks")
        self.mem.write(STUBS, stub_code)
        self.mem.write(CODE, code)
        entry = {v: self.stub_asm.labels[label] for v, label in self.stub_entries.items()}
        if self.bitness == 16:
            ivt = b"".join(L.ivt_entry(entry[v]) for v in range(32))
            self.mem.write(0, ivt)
        else:
            long_mode = self.bitness == 64
            self.mem.write(GDT, L.gdt(TSS, long_mode=long_mode))
            if long_mode:
                idt = b"".join(
                    L.gate64(entry[v], ist=1 if v in self.ist_vectors else 0) for v in range(32)
                )
                self.mem.write(TSS, L.tss64(KSTACK_TOP, ist=(IST1_TOP,)))
            else:
                idt = b"".join(L.gate32(entry[v]) for v in range(32))
                self.mem.write(TSS, L.tss32(KSTACK_TOP))
            self.mem.write(IDT, idt)
        self._built = True

    @property
    def labels(self) -> dict[str, int]:
        return {**self.stub_asm.labels, **self.asm.labels}

    def sregs(self, s: kvm_sregs, cpl: int = 0) -> kvm_sregs:
        """Set ``s`` (from KVM_GET_SREGS) to this mode's state at ``cpl``."""
        if self.mode == "real":
            for seg in (s.cs, s.ds, s.es, s.fs, s.gs, s.ss):
                seg.update(dict(base=0, selector=0, limit=0xFFFF, present=1, s=1, dpl=0))
                seg.update(dict(db=0, l=0, g=0, unusable=0, type=3))
            s.cs.type = L.CODE_XR
            s.idt.base, s.idt.limit = 0, 0x3FF
            s.cr0 = CR0_ET
            s.cr4 = s.efer = 0
            return s
        long_mode = self.bitness == 64
        s.gdt.base, s.gdt.limit = GDT, L.GDT_ENTRIES * 8 - 1
        s.idt.base, s.idt.limit = IDT, 32 * (16 if long_mode else 8) - 1
        s.tr = L.tr_segment(TSS)
        s.ldt.update(dict(base=0, limit=0, selector=0, type=2, present=0, s=0, unusable=1))
        self.set_cpl(s, cpl)
        s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM
        s.cr4 = s.efer = s.cr3 = 0
        if self.pt is not None:
            s.cr0 |= CR0_PG
            s.cr3 = self.pt.cr3
            s.cr4 = {"32-bit": CR4_PSE, "pae": CR4_PAE, "4-level": CR4_PAE}.get(
                self.pt.mode, CR4_PAE | CR4_LA57
            )
            s.efer = EFER_NXE if self.mode == "pae" else 0
        if long_mode:
            s.efer = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE
        return s

    def set_cpl(self, s: kvm_sregs, cpl: int) -> kvm_sregs:
        """The flat code and data segments for ``cpl`` (0 or 3) in ``s``."""
        if cpl not in (0, 3):
            raise ValueError("cpl must be 0 or 3")
        long_mode = self.bitness == 64
        if cpl == 0:
            cs_sel = L.KERNEL_CS64_SEL if long_mode else L.KERNEL_CS32_SEL
            ds_sel = L.KERNEL_DS_SEL
        else:
            cs_sel = L.USER_CS64_SEL if long_mode else L.USER_CS32_SEL
            ds_sel = L.USER_DS_SEL
        s.cs = L.FLAT[cs_sel].kvm_segment(cs_sel | cpl)
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(s, name, L.FLAT[ds_sel].kvm_segment(ds_sel | cpl))
        return s

    def boot(
        self,
        kvm: Kvm,
        *,
        cpl: int = 0,
        entry: str | int | None = None,
        vm: Vm | None = None,
        rflags: int = 0x2,
    ) -> Machine:
        """A VM with the slots, one vCPU in this mode at ``cpl`` about to run ``entry``
        (a label or address; default the start of the program)."""
        if not self._built:
            self.build()
        if vm is None:
            vm = kvm.create_vm()
        for s in self.slots:
            vm.set_user_memory_region(s.slot, s.gpa, s.mem.size, s.mem, s.flags)
        vcpu = vm.create_vcpu(0)
        if self.mode == "lm57":
            # CR4.LA57 needs it in the guest CPUID (a fresh vCPU has an empty table)
            vcpu.set_cpuid2(kvm.get_supported_cpuid())
        vcpu.set_sregs(self.sregs(vcpu.get_sregs(), cpl))
        regs = vcpu.get_regs()
        rip = self.labels[entry] if isinstance(entry, str) else entry
        regs.rip = CODE if rip is None else rip
        if self.mode == "real":
            regs.rsp = REAL_STACK_TOP
        else:
            regs.rsp = USTACK_TOP if cpl == 3 else KSTACK_TOP
        regs.rflags = rflags
        vcpu.set_regs(regs)
        return Machine(self, vm, vcpu)


@dataclass
class Machine:
    """A booted guest: its VM and vCPU, and the host's side of the stub protocol."""

    guest: Guest
    vm: Vm
    vcpu: Vcpu

    def cpl(self) -> int:
        return int(self.vcpu.get_sregs().cs.selector & 3)

    def set_cpl(self, cpl: int, rsp: int | None = None) -> None:
        """Change privilege from the host (KVM_SET_SREGS), as a guest cannot here: the
        device's emulator has no protected-mode IRET."""
        self.vcpu.set_sregs(self.guest.set_cpl(self.vcpu.get_sregs(), cpl))
        if rsp is not None:
            regs = self.vcpu.get_regs()
            regs.rsp = rsp
            self.vcpu.set_regs(regs)

    def read_virt(self, gva: int, n: int) -> bytes:
        """Guest-virtual memory through the current CR3 (page by page)."""
        cr3 = self.vcpu.get_sregs().cr3
        out = b""
        while n:
            chunk = min(n, 4096 - gva % 4096)
            out += self.guest.read(self.guest.translate(gva, cr3), chunk)
            gva, n = gva + chunk, n - chunk
        return out

    def stub_frame(self) -> dict[str, int]:
        """The frame of the stub that halted (see :func:`stubs.frame_layout`)."""
        names = stubs.frame_layout(self.guest.bitness)
        unit = self.guest.bitness // 8
        regs = self.vcpu.get_regs()
        raw = self.read_virt(regs.rsp, unit * len(names))
        fmt = {2: "H", 4: "I", 8: "Q"}[unit]
        return dict(zip(names, struct.unpack(f"<{len(names)}{fmt}", raw), strict=True))

    def host_iret(self, rip: int | str | None = None) -> None:
        """Do what the stub's IRET would: restore the registers it saved and return to
        the interrupted code (at ``rip`` instead, a continuation, when given)."""
        g = self.guest
        f = self.stub_frame()
        regs = self.vcpu.get_regs()
        target = g.labels[rip] if isinstance(rip, str) else rip
        if g.bitness == 16:
            regs.rdx = regs.rdx & ~0xFFFF | f["dx"]
            regs.rax = regs.rax & ~0xFFFF | f["ax"]
            regs.rip = f["ip"] if target is None else target
            regs.rflags = f["flags"]
            regs.rsp += 2 * 7
            s = self.vcpu.get_sregs()
            s.es.selector, s.es.base = f["es"], f["es"] << 4
            self.vcpu.set_sregs(s)
            self.vcpu.set_regs(regs)
            return
        unit = g.bitness // 8
        regs.rdx, regs.rax = f["rdx"], f["rax"]
        regs.rip = f["rip"] if target is None else target
        regs.rflags = f["rflags"]
        to_cpl = f["cs"] & 3
        if g.bitness == 64 or to_cpl != self.cpl():
            regs.rsp = f["rsp"]
        else:
            regs.rsp += unit * 6  # no RSP/SS in a same-privilege 32-bit frame
        if to_cpl != self.cpl():
            self.set_cpl(to_cpl)
        self.vcpu.set_regs(regs)
