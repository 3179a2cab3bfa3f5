"""No dirty page is ever lost: the kernel's dirty_log_test, on the simulator.

vCPU threads write random pages of a logged slot through the shadow MMU (each write
stores the thread's next generation number at the thread's own offset in the page),
a VMM thread writes pages through ``vm.write_guest``, and the main thread harvests
with ``vm.harvest_dirty`` again and again, copying every reported page to a shadow
buffer as a migration would. After the writers stop, one final harvest and copy.
This runs in each of the three modes: the bitmap (fetch-and-clear GET_DIRTY_LOG),
manual protect (GET then CLEAR) and the dirty ring (harvest, then
KVM_RESET_DIRTY_RINGS; a vCPU whose ring is at its soft limit waits for the reset,
as KVM_RUN would exit with KVM_EXIT_DIRTY_RING_FULL).

The epochs. The main thread bumps ``epoch`` to h just before harvest h. A writer
reads ``epoch`` before each write (``lo``) and after it (``after``): the write began
after harvest ``lo`` started and ended before harvest ``after + 1`` started, so its
page must be reported by a harvest h with lo <= h <= after + 1: harvest k or k+1
when no harvest started during the write, whichever one the race went to.

What is checked, over every write and every report:

* no loss: each write's page is reported within its window;
* nothing invented: each report of page p by harvest h is explained by a write to p
  that began before harvest h ended (lo <= h) and ended after the previous report of
  p started (after + 1 > previous h), so it could not have been taken already;
* contents: the shadow equals guest memory on every page at the end, and each
  thread's offset in each page holds the generation of its last write there.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

import kvmmmu
from kvmmmu import uapi

from .test_dirty_log import GVA, LOG, PAGE, SLOT1_GPA, LogGuest

#: Writes per mode (vCPU and VMM writes together); the three modes take about 7 s
#: for 3,000,000 writes here (2 cores).
WRITES_PER_MODE = 1_000_000
#: Pages of the logged slot (16 MiB).
NPAGES = 4096
#: vCPU writer threads, and the share of the writes the VMM thread makes.
VCPUS = 2
VMM_SHARE = 0.05
#: The writes' working set: the copies of a harvest must cost less than the writes
#: they follow, or every harvest would be the whole slot (a page copy costs about
#: two writes here).
HOT_SHARE, HOT_PAGES, HOT_MOVE = 0.8, 256, 20_000
#: Writes a writer may make between two harvest starts (see ``pace``).
BURST = 1000
#: The harvester's mean pause, every 64th harvest (seconds).
PAUSE = 1e-3
#: A run that takes longer than this has a stuck writer (a ring never reset, say).
DEADLINE = 120.0
#: The smallest rings: 256 entries, full at 192, so the vCPUs do hit the soft limit.
RING_BYTES = 4096


def working_set(rng: np.random.Generator, n: int) -> list[int]:
    """`n` random pages: a share HOT_SHARE in a window of HOT_PAGES that moves every
    HOT_MOVE writes (a guest's working set), the rest anywhere in the slot."""
    pages = rng.integers(0, NPAGES, n)
    hot = rng.random(n) < HOT_SHARE
    base = (np.arange(n) // HOT_MOVE) * 1031 + int(rng.integers(0, NPAGES))
    pages[hot] = (base[hot] + rng.integers(0, HOT_PAGES, int(hot.sum()))) % NPAGES
    return pages.tolist()


@dataclass
class Writer:
    """One thread's writes: page, epoch before (lo) and epoch after (after)."""

    pages: list[int]
    lo: list[int] = field(default_factory=list)
    after: list[int] = field(default_factory=list)
    ring_full: int = 0
    throttled: int = 0
    seen: int = 0
    burst: int = 0
    error: BaseException | None = None


@dataclass
class Run:
    writes: int
    harvests: int
    reported: int
    ring_full: int
    throttled: int
    seconds: float


def run_mode(mode: str, seed: int) -> Run:
    g = LogGuest(
        NPAGES,
        vcpus=VCPUS,
        ring=RING_BYTES if mode == "ring" else 0,
        manual=uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE if mode == "manual" else 0,
    )
    assert g.vm.dirty_mode == mode
    g.set_flags(LOG)
    rng = np.random.default_rng(seed)
    n_vmm = int(WRITES_PER_MODE * VMM_SHARE)
    n_vcpu = (WRITES_PER_MODE - n_vmm) // VCPUS
    writers = [Writer(working_set(rng, n_vcpu)) for _ in range(VCPUS)]
    writers.append(Writer(working_set(rng, n_vmm)))
    epoch = [0]
    resets = [0]
    stop = [False]
    cond = threading.Condition()

    def pace(w: Writer, e: int) -> int:
        """Auto-converge: a writer makes at most BURST writes between two harvest
        starts, then waits for the next one (so the harvests keep racing the writes
        however the interpreter schedules its threads). Returns the epoch now."""
        if e != w.seen:
            w.seen, w.burst = e, 0
        elif w.burst >= BURST:
            w.throttled += 1
            with cond:
                cond.wait_for(lambda: epoch[0] != e or stop[0], timeout=0.05)
            e = w.seen = epoch[0]
            w.burst = 0
        w.burst += 1
        return e

    def vcpu_thread(t: int) -> None:
        w = writers[t]
        write = g.vcpus[t].mmu.access
        base = GVA + 8 * t
        lo, after = w.lo, w.after
        try:
            for k, p in enumerate(w.pages, 1):
                lo.append(pace(w, epoch[0]))
                while True:
                    try:
                        write(base + p * PAGE, 8, write=True, value=k, cpl=3)
                        break
                    except kvmmmu.DirtyRingFull:
                        # KVM_EXIT_DIRTY_RING_FULL: wait for the VMM's next reset.
                        w.ring_full += 1
                        if stop[0]:
                            raise
                        seen = resets[0]
                        with cond:
                            cond.wait_for(lambda s=seen: resets[0] != s, timeout=0.05)
                after.append(epoch[0])
        except BaseException as e:  # reported by the main thread
            w.error = e

    def vmm_thread() -> None:
        w = writers[VCPUS]
        base = SLOT1_GPA + 8 * VCPUS
        lo, after = w.lo, w.after
        try:
            for k, p in enumerate(w.pages, 1):
                lo.append(pace(w, epoch[0]))
                g.vm.write_guest(base + p * PAGE, k.to_bytes(8, "little"))
                after.append(epoch[0])
        except BaseException as e:
            w.error = e

    threads = [threading.Thread(target=vcpu_thread, args=(t,)) for t in range(VCPUS)]
    threads.append(threading.Thread(target=vmm_thread))
    shadow = np.zeros((NPAGES, PAGE), dtype=np.uint8)
    reports: list[np.ndarray] = []

    def harvest() -> None:
        epoch[0] += 1
        got = g.vm.harvest_dirty(1)
        with cond:  # for the vCPUs at the ring's soft limit, and the throttled ones
            resets[0] += 1
            cond.notify_all()
        reports.append(got)
        shadow[got] = g.mem[got]  # the copy, after the harvest returned

    start = time.perf_counter()
    for th in threads:
        th.start()
    try:
        harvest_while_writing(threads, harvest, rng)
    finally:
        stop[0] = True  # only matters when the harvest failed or timed out
    for th in threads:
        th.join()
    harvest()  # the final one
    seconds = time.perf_counter() - start
    for w in writers:
        if w.error is not None:
            raise w.error
    g.vm.mmu.audit()

    # -- the checks ----------------------------------------------------------------
    nharvests = len(reports)
    assert epoch[0] == nharvests
    K = nharvests + 2  # h, lo, after + 1 are all below K
    page = np.concatenate([np.asarray(w.pages, dtype=np.int64) for w in writers])
    lo = np.concatenate([np.asarray(w.lo, dtype=np.int64) for w in writers])
    hi = np.concatenate([np.asarray(w.after, dtype=np.int64) for w in writers]) + 1
    assert page.size == lo.size == hi.size == sum(len(w.pages) for w in writers)
    rep_page = np.concatenate(reports).astype(np.int64)
    rep_h = np.concatenate([np.full(r.size, h, dtype=np.int64) for h, r in enumerate(reports, 1)])
    order = np.argsort(rep_page * K + rep_h, kind="stable")
    rep_page, rep_h = rep_page[order], rep_h[order]
    rep_key = rep_page * K + rep_h
    assert np.all(np.diff(rep_key) > 0), "a harvest reported a page twice"

    # No loss: a report of the page within [lo, hi].
    i = np.searchsorted(rep_key, page * K + lo, side="left")
    found = i < rep_key.size
    found[found] &= rep_key[i[found]] <= page[found] * K + hi[found]
    lost = np.flatnonzero(~found)
    assert lost.size == 0, (
        f"{lost.size} of {page.size} writes lost, e.g. page {page[lost[0]]} written in "
        f"epochs [{lo[lost[0]]}, {hi[lost[0]]}], reported in "
        f"{rep_h[rep_page == page[lost[0]]].tolist()[:20]}"
    )

    # Nothing invented: for each report (p, h) with previous report h' of p, a write
    # to p with lo <= h and hi > h'.
    prev = np.where(
        np.concatenate(([False], rep_page[1:] == rep_page[:-1])),
        np.concatenate(([0], rep_h[:-1])),
        0,
    )
    worder = np.argsort(page * K + lo, kind="stable")
    wkey = (page * K + lo)[worder]
    best_hi = np.maximum.accumulate((page * K + hi)[worder])  # per page: pages dominate
    j = np.searchsorted(wkey, rep_key, side="right") - 1
    ok = j >= 0
    ok[ok] &= wkey[j[ok]] // K == rep_page[ok]
    ok[ok] &= best_hi[j[ok]] - rep_page[ok] * K > prev[ok]
    bad = np.flatnonzero(~ok)
    assert bad.size == 0, (
        f"{bad.size} reports without a write behind them, e.g. page {rep_page[bad[0]]} "
        f"in harvest {rep_h[bad[0]]} (previous report {prev[bad[0]]})"
    )

    # Contents: the migration's copy is guest memory, and the last writes are there.
    assert np.array_equal(shadow, g.mem), "the shadow copy differs from guest memory"
    words = g.mem.view(np.uint64)
    for t, w in enumerate(writers):
        last = np.zeros(NPAGES, dtype=np.uint64)
        last[np.asarray(w.pages)] = np.arange(1, len(w.pages) + 1, dtype=np.uint64)
        assert np.array_equal(words[:, t], last), f"writer {t}: wrong last generations"
    assert not words[:, len(writers) :].any()

    ring_full = sum(w.ring_full for w in writers)
    throttled = sum(w.throttled for w in writers)
    g.close()
    return Run(int(page.size), nharvests, int(rep_page.size), ring_full, throttled, seconds)


def harvest_while_writing(
    threads: list[threading.Thread], harvest: Callable[[], None], rng: np.random.Generator
) -> None:
    pause = rng.exponential(PAUSE, 4096)
    deadline = time.monotonic() + DEADLINE
    i = 0
    while any(th.is_alive() for th in threads):
        if time.monotonic() > deadline:
            raise AssertionError(f"the writers did not finish in {DEADLINE} s")
        harvest()
        if i % 64 == 63:  # now and then a pause, for a large harvest
            time.sleep(float(pause[i % pause.size]))
        i += 1


@pytest.mark.parametrize("mode", ["bitmap", "manual", "ring"])
def test_no_dirty_page_is_lost(mode: str, record_property: pytest.RecordProperty) -> None:
    r = run_mode(mode, seed=sum(map(ord, mode)))
    assert r.writes >= WRITES_PER_MODE - VCPUS
    assert r.harvests >= WRITES_PER_MODE // ((VCPUS + 1) * BURST), "throttling bounds this"
    if mode == "ring":
        assert r.ring_full > 0, "the vCPUs should have hit the ring's soft limit"
    for k, v in vars(r).items():
        record_property(k, v)
    print(
        f"\n{mode}: {r.writes} writes, {r.harvests} harvests, {r.reported} pages reported, "
        f"{r.ring_full} ring-full exits, {r.throttled} throttled, {r.seconds:.2f} s "
        f"({r.writes / r.seconds / 1e3:.0f}k writes/s)"
    )
