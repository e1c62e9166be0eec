# The interfaces every kernel path is written against.
#
# A Kernel is "the kernel as seen from one context" (one actor thread): the shared
# kernel memory, the lock space, the frame allocator, the comparison core, the
# event log, schedule points, the variant switches, and how to call the OOM killer.
# Kernel paths (ksm_scan, do_wp_page, __ksm_exit, ...) are plain functions taking a
# Kernel, so the same code runs in real actor processes and can run under a
# deterministic scheduler that supplies its own locks, clock and schedule points.
from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from actors.kernel import debug
from actors.kernel.schedule import SchedPlan, check_points
from actors.kernel.seams import (
    NO_WAKEUPS,
    SYSTEM_CLOCK,
    Clock,
    EventLog,
    ExclusiveLock,
    LockSpace,
    MemoryPressure,
    RWSemaphore,
    Wakeups,
)
from actors.kernel.variants import Variants
from shared_mem.atomic import AtomicField
from shared_mem.frames import FrameAllocator
from shared_mem.layout import TIF_SIGKILL, KernelMemory
from shared_mem.pagecmp import PageCmp


class SchedPoints:
    """Named places in kernel paths where a run widens race windows, and lock ops.

    delays: {point name: seconds} forced at every hit (--delay-at, demonstrations);
    plan: the run's seeded SchedPlan (actors/kernel/schedule.py), consulted at every
    named point and, through lock_op() installed as the LockSpace sched hook, at every
    lock acquire and release. A delay is an event ("sched_point" / "sched_lock") with
    the site and its length, so a run's windows can be read back from its timeline.
    """

    def __init__(self, delays: dict[str, float] | None = None, plan: SchedPlan | None = None,
                 ev: Callable[..., None] | None = None) -> None:
        check_points(delays or {})
        self.delays = dict(delays or {})
        self.plan = plan
        self.ev = ev or _no_event
        self.hits: dict[str, int] = {}

    def __call__(self, k: Kernel, name: str) -> None:
        d = self.delays.get(name, 0.0)
        forced = d > 0
        if self.plan is not None:
            d = max(d, self.plan.delay(k.actor, name, True))
        self.hits[name] = self.hits.get(name, 0) + 1
        if d > 0:
            k.ev("sched_point", point=name, delay_ms=round(d * 1000, 3), forced=forced, ctx=k.actor)
            k.clock.sleep(d)

    def lock_op(self, ctx: str, lock: str, op: str) -> None:
        d = self.plan.delay(ctx, lock, False) if self.plan is not None else 0.0
        if d > 0:
            self.ev("sched_lock", lock=lock, op=op, delay_ms=round(d * 1000, 3), ctx=ctx)
            time.sleep(d)


def _no_event(event: str, **kw: Any) -> None:
    return None


def ksm_struct(km: KernelMemory) -> ctypes.Structure:
    """The single ksm record (km.ksm[0]) as a ctypes Structure over the same shared memory.

    Same fields, same bytes as the numpy record; reading k.ks.scan_address gives a plain
    int and assigning it stores straight into the record, several times cheaper than the
    numpy record's k.ksm["scan_address"] on the scan's per-page path.
    """
    dt = km.ksm.dtype
    fields = []
    for name in dt.names:
        sub, off = dt.fields[name][:2]
        if sub.base.itemsize != 8 or sub.base.kind not in "iu" or off % 8:
            raise TypeError(f"ksm field {name}: {sub} is not an aligned 64-bit integer")
        ct = ctypes.c_int64 if sub.base.kind == "i" else ctypes.c_uint64
        n = int(np.prod(sub.shape)) if sub.shape else 0
        fields.append((name, ct * n if n else ct, off))
    fields.sort(key=lambda f: f[2])
    cls = type("ksm_struct", (ctypes.Structure,), {"_fields_": [(n, t) for n, t, _ in fields]})
    for name, _t, off in fields:
        if getattr(cls, name).offset != off:
            raise TypeError(f"ksm field {name}: ctypes offset differs from the numpy record")
    if ctypes.sizeof(cls) != dt.itemsize:
        raise TypeError("ksm record size differs between ctypes and numpy")
    return cls.from_buffer(km.ksm)


class Kernel:
    """One kernel context's view of the machine.

    Everything a kernel path uses besides kernel memory comes through a declared seam
    (actors/kernel/seams.py): locks, clock, sched (schedule points), pressure (direct
    reclaim and the OOM killer; None: an allocation that finds no frame fails), wakeups,
    ev (the event log). The actors and the simulator each supply their own.
    """

    def __init__(
        self,
        km: KernelMemory,
        locks: LockSpace,
        actor: str,
        ev: EventLog | None = None,
        variants: Variants | None = None,
        sched: SchedPoints | None = None,
        pressure: MemoryPressure | None = None,
        clock: Clock = SYSTEM_CLOCK,
        wakeups: Wakeups = NO_WAKEUPS,
        pid: int | None = None,
    ) -> None:
        self.km = km
        self.locks = locks
        self.actor = actor
        self.pid = os.getpid() if pid is None else pid
        self.ev = ev or _no_event
        self.variants = variants or Variants()
        self.sched = sched or SchedPoints()
        self.pressure = pressure
        self.clock = clock
        self.wakeups = wakeups
        self.alloc = FrameAllocator(km, locks)
        self.alloc.on_bad_page = self._bad_new_page
        self.cmp = PageCmp(km.frames)
        self.ksm = km.ksm[0]
        self.ks = ksm_struct(km)       # the same record, fast plain-int field access
        self.page_flags = km.page["flags"]      # struct page fields, looked up once
        self.page_mapping = km.page["mapping"]
        self.page_ref = AtomicField(km.page["refcount"])
        self.page_map = AtomicField(km.page["mapcount"])
        self.ksm_atomic = {f: AtomicField(km.ksm[f]) for f in ("ksm_zero_pages", "cow_ksm", "ksm_swpin_copy", "last_pid",
                                                              "mmput_in_flight")}
        self.current_task = 0          # task handle this context acts for (faults, syscalls)
        self.oom_origin = False        # set_current_oom_origin() (run=2 writer)
        self.alloc_retry_s = 30.0      # how long an order-0 allocation keeps retrying
        self._no_progress: list | None = None  # [site, retries] while cond_resched() loops
        # ksmd's unstable tree order as unstable_build.py last laid it out (an UnstableOrder),
        # and how many items joined the tree page by page since this context began.
        self.unstable_order: Any = None
        self.unstable_inserts = 0
        self.ksm_thread_mutex = locks.get("ksm_thread_mutex")
        self.ksm_mmlist_lock = locks.get("ksm_mmlist_lock")
        self.swap_lock = locks.get("swap_lock")
        self._mmap_locks = [locks.get("mmap_lock", i) for i in range(km.geo.max_mms)]
        self._ptls = [locks.get("ptl", i) for i in range(km.geo.max_mms)]
        self.ksm["zero_checksum"] = self.cmp.zero_checksum

    def _bad_new_page(self, pfn: int, flags: int, ref: int, mapc: int) -> None:
        debug.check_new_page(self, pfn, flags, ref, mapc)

    def alloc_pid(self) -> int:
        return self.ksm_atomic["last_pid"].inc_return(0)

    # -- schedule points and variants ----------------------------------------------
    def point(self, name: str) -> None:
        self.sched(self, name)

    def variant(self, name: str) -> bool:
        return self.variants.reverted(name)

    # -- waits without progress: what the hung-task watchdog sees besides lock waits ------
    def cond_resched(self, site: str, pause: float = 0.001) -> None:
        """One more pass of a retry loop that made no progress (the cond_resched() of
        `while (!follow_page(...)) { handle_mm_fault(...); cond_resched(); }`).

        The first pass publishes "in `site` since now" in this context's row of the shared
        context table (site: a call chain "inner<-caller<-..."); later passes bump the
        retry count. progress() ends it. Only retry loops call this: other paths pay
        nothing. `pause` lets the other contexts run, as the scheduler would.
        """
        st = self._no_progress
        if st is None or st[0] != site:
            st = self._no_progress = [site, 0]
            self.locks.no_progress(site, 0)
            self.ev("no_progress", site=site)
        else:
            st[1] += 1
            if not st[1] & 63:
                self.locks.no_progress(site, st[1])
        if pause > 0:
            self.clock.sleep(pause)

    @property
    def no_progress_site(self) -> str | None:
        """The retry loop this context is in without progress, if any."""
        return self._no_progress[0] if self._no_progress is not None else None

    def progress(self) -> None:
        """The retry loop got what it waited for (or gave up): clear the published wait."""
        st = self._no_progress
        if st is not None:
            self._no_progress = None
            self.locks.progress()
            self.ev("progress", site=st[0], retries=st[1])

    # -- locks by object ---------------------------------------------------------------
    def mmap_lock(self, mm: int, site: str = "mmap_lock") -> RWSemaphore:
        return self._mmap_locks[self.km.mm.idx(mm, site)]

    def ptl(self, mm: int, site: str = "ptl") -> ExclusiveLock:
        return self._ptls[self.km.mm.idx(mm, site)]

    def page_lock(self, pfn: int) -> ExclusiveLock:
        return self.locks.get("page_lock", pfn)

    def anon_vma_lock(self, av: int) -> RWSemaphore:
        return self.locks.get("anon_vma_lock", self.km.anon_vma.idx(av, "anon_vma_lock"))

    def anon_vma_lock_typesafe(self, av: int) -> RWSemaphore:
        """The lock of the anon_vma slot av names, even if that anon_vma was freed: the
        kernel's anon_vma cache is SLAB_TYPESAFE_BY_RCU, so a page's stale ->mapping still
        leads to an anon_vma's lock. Whoever takes it rechecks (folio_lock_anon_vma_read)."""
        return self.locks.get("anon_vma_lock", self.km.anon_vma.typesafe_idx(av))

    # -- signals -------------------------------------------------------------------------
    def fatal_signal_pending(self) -> bool:
        t = self.current_task
        if not t or not self.km.task.valid(t):
            return False
        return bool(self.km.task.flags[self.km.task.idx(t, "fatal_signal_pending")] & TIF_SIGKILL)

    # -- page allocation with the OOM killer behind it ------------------------------------
    def alloc_page(self, nid: int = -1, site: str = "", strict: bool = False) -> int | None:
        """alloc_pages(GFP_HIGHUSER_MOVABLE): retries through the OOM killer.

        Returns None (the caller's VM_FAULT_OOM / -ENOMEM) when this context has a
        fatal signal pending, or no OOM killer is wired, or after alloc_retry_s.
        """
        pfn = self.alloc.alloc(nid, strict)
        if pfn is not None:
            return pfn
        clock = self.clock
        deadline = clock.monotonic() + self.alloc_retry_s
        backoff = 0.001
        while True:
            if self.fatal_signal_pending():
                self.ev("mm_page_alloc_fail", site=site, why="fatal_signal")
                return None
            # Slow path: direct reclaim first, the OOM killer only when that frees nothing.
            pressure = self.pressure
            if pressure is None:
                self.ev("mm_page_alloc_fail", site=site, why="no_oom_killer")
                return None
            if not pressure.reclaim(self, nid):
                self.ev("mm_page_alloc_oom", site=site, nid=nid)
                pressure.out_of_memory(self, nid)
            pfn = self.alloc.alloc(nid, strict)
            if pfn is not None:
                return pfn
            if clock.monotonic() > deadline:
                self.ev("mm_page_alloc_fail", site=site, why="timeout")
                return None
            clock.sleep(backoff)
            backoff = min(backoff * 2, 0.05)
            # get_page_from_freelist() again before reclaim and the OOM killer: memory a
            # victim freed while we slept must not make the OOM killer look for another.
            pfn = self.alloc.alloc(nid, strict)
            if pfn is not None:
                return pfn
