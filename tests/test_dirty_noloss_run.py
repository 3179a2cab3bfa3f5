"""No dirty page is ever lost, with guest code: the kernel's dirty_log_test through
KVM_RUN, on the simulator and on /dev/kvm, in the three harvest modes.

A 64-bit CPL3 guest loop (native on the device) writes random pages of a logged slot
(an xorshift generator picks the page) with values that are unique and increasing:
the iteration number the host last published, and the write's sequence number. The
vCPU runs on its own thread while the main thread harvests again and again with
``vm.harvest_dirty`` (fetch-and-clear GET; manual GET + CLEAR; the dirty ring and
KVM_RESET_DIRTY_RINGS, the vCPU waiting at KVM_EXIT_DIRTY_RING_FULL), and after each
harvest takes a snapshot of every page's value.

A write lands after harvest k-1 took its log, so it is reported by harvest k or k+1
(a write racing harvest k, whose SPTE was still writable, lands in k's copy window and
is in k's report through the earlier write that made the SPTE writable). So with
S_k the snapshot taken after harvest k and D_k its report:

* no loss: every page whose value changed between S_(k-1) and S_k is in D_k or D_(k+1);
* nothing invented: every page in D_k changed after S_(k-2): the write that made its
  SPTE writable landed after harvest k-1 took its log. It may land after S_k (the vCPU
  thread can be preempted between KVM's fault and the store it retries), so it is
  checked against the final snapshot.

After the guest stops, two more harvests report the rest and then nothing.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import kvmmmu
from kvmmmu import exits as ex
from kvmmmu import uapi
from kvmmmu.guest import asm as x
from kvmmmu.guest.builder import REPORT, Guest
from kvmmmu.guest.paging import P, U, W

from .conftest import make_kvm

PAGE = 0x1000
SLOT, SLOT_GPA, GVA = 1, 0x1000_0000, 0x4000_0000
NPAGES = 1024
#: The control block in the low slot (not logged): the published iteration, the stop
#: flag, and the guest's count of writes so far.
CTRL = 0x30_0000
ITER, STOP, COUNT = CTRL, CTRL + 8, CTRL + 16
DONE = REPORT + 0x1000
#: Writes per mode: enough that, over the three modes and both backends, well over a
#: million writes are checked.
WRITES = 400_000
TIMEOUT = 60.0
#: Harvests at least (each races the writes).
HARVESTS = 20
SEEDS = {"bitmap": 0x9E3779B97F4A7C15, "manual": 0x2545F4914F6CDD1D, "ring": 0xD1B54A32D192ED03}


def build_guest(seed: int) -> Guest:
    g = Guest("lm64")
    g.add_slot(SLOT, SLOT_GPA, NPAGES * PAGE, uapi.KVM_MEM_LOG_DIRTY_PAGES)
    for i in range(NPAGES):
        g.map(GVA + i * PAGE, SLOT_GPA + i * PAGE, flags=P | W | U)
    a = g.asm
    a.mov(x.r8, seed)
    a.xor(x.r9, x.r9)
    a.label("loop")
    for shift, op in ((13, a.shl), (7, a.shr), (17, a.shl)):  # xorshift64
        a.mov(x.rax, x.r8)
        op(x.rax, shift)
        a.xor(x.r8, x.rax)
    a.mov(x.rax, x.r8)
    a.and_(x.rax, NPAGES - 1)
    a.shl(x.rax, 12)
    a.mov(x.rbx, GVA)
    a.add(x.rax, x.rbx)
    a.inc(x.r9)
    a.mov(x.rcx, x.qword[ITER])
    a.shl(x.rcx, 40)
    a.or_(x.rcx, x.r9)
    a.mov(x.qword[x.rax], x.rcx)
    a.mov(x.qword[COUNT], x.r9)
    a.cmp(x.qword[STOP], 0)
    a.je("loop")
    a.mov(x.rdx, DONE)
    a.mov(x.qword[x.rdx], x.r9)
    a.hlt()
    return g


class Runner(threading.Thread):
    """The vCPU thread: KVM_RUN until the guest reports it stopped."""

    def __init__(self, vcpu: kvmmmu.Vcpu) -> None:
        super().__init__(daemon=True)
        self.vcpu = vcpu
        self.exits: list[str] = []
        self.error: BaseException | None = None
        self.done = False

    def run(self) -> None:
        try:
            while True:
                e = self.vcpu.run()
                if isinstance(e, ex.ExitDirtyRingFull):
                    time.sleep(1e-4)  # the harvester resets the ring
                    continue
                if isinstance(e, ex.ExitMmio) and e.is_write and e.phys_addr == DONE:
                    self.done = True
                    return
                if isinstance(e, ex.ExitIntr):
                    continue
                self.exits.append(str(e))
                return
        except BaseException as err:  # reported by the main thread
            self.error = err


@pytest.mark.parametrize("mode", ["bitmap", "manual", "ring"])
def test_no_dirty_page_lost_with_guest_code(backend: str, mode: str) -> None:
    kvm = make_kvm(backend)
    vm = kvm.create_vm()
    if mode == "manual":
        vm.enable_manual_dirty_log()
    elif mode == "ring":
        vm.enable_dirty_ring(1 << 16)
    g = build_guest(seed=SEEDS[mode])
    m = g.boot(kvm, cpl=3, vm=vm)
    data = np.frombuffer(g.slots[1].mem, dtype=np.uint64).reshape(NPAGES, PAGE // 8)[:, 0]
    ctrl = np.frombuffer(g.mem, dtype=np.uint64)[CTRL // 8 : CTRL // 8 + 3]

    def harvest() -> set[int]:
        return set(vm.harvest_dirty(SLOT).tolist())

    runner = Runner(m.vcpu)
    snapshots = [data.copy()]
    reports: list[set[int]] = [harvest()]
    iteration = 1
    ctrl[0] = iteration
    runner.start()
    deadline = time.monotonic() + TIMEOUT
    lost: list[str] = []
    invented: list[str] = []

    def check(k: int) -> None:
        """Harvest k+1 just ran: check the writes S_k saw against D_k and D_(k+1)."""
        changed = set(np.flatnonzero(snapshots[k] != snapshots[k - 1]).tolist())
        missing = changed - reports[k] - reports[k + 1]
        if missing:
            lost.append(f"harvest {k}: {sorted(missing)[:8]}")

    def check_invented(final: np.ndarray) -> None:
        for k in range(1, len(reports)):
            wrote = set(np.flatnonzero(final != snapshots[max(k - 2, 0)]).tolist())
            extra = reports[k] - wrote
            if extra:
                invented.append(f"harvest {k}: {sorted(extra)[:8]}")

    while (
        (int(ctrl[2]) < WRITES or len(reports) < HARVESTS)
        and runner.is_alive()
        and time.monotonic() < deadline
    ):
        time.sleep(0.002)
        iteration += 1
        ctrl[0] = iteration
        reports.append(harvest())
        snapshots.append(data.copy())
        if len(reports) >= 3:
            check(len(reports) - 2)
    ctrl[1] = 1  # stop
    runner.join(TIMEOUT)
    assert runner.error is None, runner.error
    assert runner.done, f"the guest did not finish: exits {runner.exits}"
    for _ in range(2):
        reports.append(harvest())
        snapshots.append(data.copy())
        check(len(reports) - 2)
    check_invented(snapshots[-1])
    assert reports[-1] == set(), "a harvest after the guest stopped still reported pages"
    assert not lost, f"{len(lost)} harvests lost writes: {lost[:4]}"
    assert not invented, f"{len(invented)} harvests reported unwritten pages: {invented[:4]}"
    writes = int(ctrl[2])
    assert writes >= WRITES, f"only {writes} writes in {TIMEOUT} s"
    assert len(reports) > HARVESTS, "too few harvests to race the writes"
    vm.close()
    kvm.close()
