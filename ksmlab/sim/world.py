# One simulated machine: kernel memory, the simulator's seams, and the contexts of a scenario.
#
# What it models. The kernel memory is the very KernelMemory the actor processes share
# (shared_mem/layout.py), created in this process; the kernel paths run on it unchanged.
# What differs is the seams (actors/kernel/seams.py): SimLockSpace for locks, the
# scheduler's virtual clock, schedule points that are scheduling decisions, memory
# pressure handled in the allocating context (direct reclaim, then out_of_memory() and
# a SIGKILL, as __alloc_pages_slowpath does), and wakeups that need no socket.
#
# A scenario (ksmlab/sim/scenarios.py) builds its starting state once, single-threaded
# (set-up: tasks, mappings, pages merged by a few ksmd passes); the world then snapshots
# the three shared segments, and every schedule starts from a byte copy of them, so a
# search over ten thousand schedules boots once. Each schedule gets a fresh Scheduler, a
# fresh lock space and one Kernel per context; reports from any detector end it.
# After a schedule without a report the same invariant checks as the cluster's run
# (actors/kernel/invariants.py) look at what it left.
from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from actors.kernel import mm_slot, oom, sysfs
from actors.kernel.context import Kernel
from actors.kernel.exit import do_exit
from actors.kernel.fault import access_user, mm_populate
from actors.kernel.fork import copy_process, new_task
from actors.kernel.invariants import check_invariants
from actors.kernel.ksm_scan import ksm_do_scan, ksm_scan_thread_round, ksmd_should_run
from actors.kernel.syscalls import sys_madvise, sys_mmap
from actors.kernel.variants import Variants
from actors.kernel.vmscan import shrink_page, shrink_pages
from ksmlab.sim.locks import SimLockSpace
from ksmlab.sim.scheduler import Scheduler, SimThread, Strategy
from shared_mem.frames import boot_init as frames_boot
from shared_mem.layout import PAGE_SIZE, TIF_SIGKILL, Geometry, KernelMemory

FIRST_PID = 100
PARK_S = 0.01          # a parked task checks for its fatal signal this often (virtual)
OOM_REAPER_DELAY_S = 0.2


class SimClock:
    """seams.Clock over the scheduler's virtual time (set-up: time stands still)."""

    def __init__(self, sched: Scheduler | None) -> None:
        self.sched = sched

    def monotonic(self) -> float:
        return self.sched.now_ns / 1e9 if self.sched is not None else 0.0

    def monotonic_ns(self) -> int:
        return self.sched.now_ns if self.sched is not None else 0

    def cpu_time_ns(self) -> int:
        # Virtual time passes only while some context runs: all of it counts as CPU time.
        return self.monotonic_ns()

    def sleep(self, seconds: float) -> None:
        if self.sched is not None:
            self.sched.sleep(seconds)


class SimPoints:
    """seams.SchedPoint: a named point is a schedule op."""

    def __init__(self, sched: Scheduler | None) -> None:
        self.sched = sched

    def __call__(self, k: Kernel, name: str) -> None:
        if self.sched is not None:
            self.sched.op("point", name)


class SimPressure:
    """seams.MemoryPressure: direct reclaim and the OOM killer run in the allocating context."""

    def __init__(self, world: World) -> None:
        self.world = world

    def reclaim(self, k: Kernel, nid: int) -> int:
        w = self.world
        if k.km.swap is None:
            return 0
        freed, w.reclaim_hand = shrink_pages(k, 32, w.reclaim_hand, True)
        return freed

    def out_of_memory(self, k: Kernel, nid: int) -> None:
        w = self.world
        res = oom.out_of_memory(k, w.oom_mms)
        if res["action"] != "kill" or w.sched is None:
            return
        if k.variant("oom-deadlock"):
            k.ev("oom_reaper_absent", mm=res["mm"])      # 2009 had no OOM reaper
            return
        mm = res["mm"]

        def reaper(rk: Kernel) -> None:
            rk.clock.sleep(OOM_REAPER_DELAY_S)
            oom.oom_reap_task(rk, mm, w.oom_mms)

        w.spawn("oom_reaper", reaper)


class SimWakeups:
    """seams.Wakeups: ksmd polls in the simulator (sleep_millisecs), populate faults in place."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.k: Kernel | None = None

    def wake_ksmd(self) -> None:
        return None

    def populate(self, start: int, length: int, write: bool) -> None:
        k = self.k
        if k is not None and k.current_task:
            mm_populate(k, self.world.task_mm(k.current_task), start, length, write)


@dataclass
class Context:
    """One kernel context of a scenario: a name, a body taking its Kernel, and whether
    it is a service (ksmd, kswapd) that runs until the workload is done."""

    name: str
    body: Callable[[Kernel], None]
    service: bool = False
    task: int = 0


@dataclass
class ScheduleResult:
    failure: dict | None
    steps: int
    decisions: list
    trace: list
    events: list = field(default_factory=list)
    names: list[str] = field(default_factory=list)


class World:
    """Kernel memory booted once for a scenario, reset to the set-up snapshot per schedule."""

    def __init__(self, scenario: Any, variants: Variants) -> None:
        self.scenario = scenario
        self.variants = variants
        self.geo: Geometry = scenario.geometry()
        self.run_id = "sim" + secrets.token_hex(4)
        self.km = KernelMemory.create(self.geo, self.run_id)
        self.sched: Scheduler | None = None
        self.events: list | None = None
        self.oom_mms: list[int] = []
        self.reclaim_hand = 1
        self.tasks: dict[str, int] = {}       # set-up's tasks by comm
        self.addrs: dict[str, int] = {}       # ... and the address of each one's main area
        self.setup_reports: list[dict] = []
        try:
            self._boot()
        except BaseException:
            self.close()
            raise

    # -- boot and snapshot -------------------------------------------------------------------
    def _boot(self) -> None:
        km = self.km
        self.locks = SimLockSpace(self.geo, None)
        km.set_locks(self.locks)
        km.set_actor("swapper", on_report=self.setup_reports.append)
        km.set_identity(lambda: 1, lambda: 0)
        frames_boot(km)
        k = self.kernel("swapper")
        sysfs.boot_init(k)
        mm_slot.boot_init(k)
        k.ksm["variants"] = self.variants.mask
        k.ksm["last_pid"] = FIRST_PID - 1
        self.scenario.setup(self, k)
        if self.setup_reports:
            raise RuntimeError(f"scenario set-up reported: {self.setup_reports[0]['title']}")
        self._snap = {name: bytes(seg.buf) for name, seg in km.segs.items()}
        self._snap_py = (list(self.oom_mms), self.reclaim_hand)

    def _restore(self) -> None:
        for name, seg in self.km.segs.items():
            seg.buf[:] = self._snap[name]
        self.oom_mms, self.reclaim_hand = list(self._snap_py[0]), self._snap_py[1]

    def kernel(self, name: str, sched: Scheduler | None = None, pid: int = 0) -> Kernel:
        wk = SimWakeups(self)
        k = Kernel(self.km, self.locks, name, ev=self._ev(name), variants=self.variants,
                   sched=SimPoints(sched), pressure=SimPressure(self), clock=SimClock(sched),
                   wakeups=wk, pid=pid or 1)
        wk.k = k
        return k

    def _ev(self, ctx: str) -> Callable[..., None]:
        def ev(event: str, **fields: Any) -> None:
            out = self.events
            if out is not None:
                s = self.sched
                out.append((s.step if s else 0, s.now_ns if s else 0, ctx, event, fields))
        return ev

    # -- one schedule ------------------------------------------------------------------------
    def run(self, strategy: Strategy, record: bool = False, max_steps: int = 400_000) -> ScheduleResult:
        self._restore()
        sched = self.sched = Scheduler(strategy, max_steps=max_steps, on_switch=self._switched)
        self.events = [] if record else None
        self.locks = SimLockSpace(self.geo, sched)
        self.km.set_locks(self.locks)
        self.km.set_actor("sim", on_report=lambda rep: sched.fail(rep, sched.cur))
        self.km.set_identity(lambda: sched.cur.k.pid if sched.cur is not None and sched.cur.k else 1,
                             lambda: sched.now_ns)
        try:
            for c in self.scenario.contexts(self):
                self.spawn(c.name, c.body, c.service, c.task)
            failure = sched.run()
            if failure is None:
                failure = self._final_checks()
        finally:
            self.sched = None
            self.locks = SimLockSpace(self.geo, None)
            self.km.set_locks(self.locks)
            self.km.set_actor("swapper", on_report=self.setup_reports.append)
            self.km.set_identity(lambda: 1, lambda: 0)
        return ScheduleResult(failure, sched.step, sched.decisions, sched.trace, self.events or [],
                              [t.name for t in sched.threads])

    def spawn(self, name: str, body: Callable[[Kernel], None], service: bool = False, task: int = 0) -> SimThread:
        sched = self.sched
        assert sched is not None
        tid = len(sched.threads)
        k = self.kernel(name, sched, pid=FIRST_PID * 10 + tid)
        k.current_task = task
        t = sched.spawn(name, lambda: body(k), service)
        t.k = k
        return t

    def _switched(self, t: SimThread) -> None:
        self.km.set_actor(t.name, on_report=self.km.on_report)

    def _final_checks(self) -> dict | None:
        k = self.kernel("invariants")
        reps = check_invariants(k)
        if reps:
            rep = dict(reps[0])
            rep["ctx"] = "invariants"
            return rep
        return None

    def close(self) -> None:
        km = self.km
        km.close()
        km.unlink()

    # -- what scenarios build with -------------------------------------------------------------
    def new_task(self, k: Kernel, comm: str) -> int:
        task = new_task(k, comm)
        self.tasks[comm] = task
        return task

    def task_mm(self, task: int) -> int:
        t = self.km.task
        return int(t.mm[t.idx(task, "sim:task_mm")])

    def mmap(self, k: Kernel, task: int, npages: int, prot: int, flags: int) -> int:
        k.current_task = task
        return sys_mmap(k, self.task_mm(task), npages * PAGE_SIZE, prot, flags)

    def madvise(self, k: Kernel, task: int, addr: int, npages: int, advice: int) -> int:
        k.current_task = task
        return sys_madvise(k, self.task_mm(task), addr, npages * PAGE_SIZE, advice)

    def access(self, k: Kernel, mm: int, addr: int, length: int, write: bool, src: Any = None) -> Any:
        """A user load or store by k.current_task, its faults served in this context."""
        return access_user(k, mm, addr, length, write, src)

    def write_pages(self, k: Kernel, task: int, addr: int, fills: list[int]) -> None:
        """Each page i of the range is filled with byte fills[i]."""
        k.current_task = task
        mm = self.task_mm(task)
        for i, f in enumerate(fills):
            self.access(k, mm, addr + i * PAGE_SIZE, PAGE_SIZE, True, f)

    def ksmd_passes(self, k: Kernel, n: int) -> None:
        """Set-up: n full scans by ksmd (run=1 must be set)."""
        start = int(k.ksm["seqnr"])
        guard = 0
        while int(k.ksm["seqnr"]) < start + n:
            if not ksmd_should_run(k):
                raise RuntimeError("set-up asked for ksmd passes with ksmd not runnable")
            ksm_do_scan(k, 64)
            guard += 1
            if guard > 10_000:
                raise RuntimeError("set-up: ksmd passes do not complete")

    def fork(self, k: Kernel, task: int) -> int:
        k.current_task = task
        return copy_process(k, task)

    def exit(self, k: Kernel, task: int, code: int = 0, reason: str = "exit") -> None:
        k.current_task = task
        do_exit(k, task, code, reason)

    def killed(self, task: int) -> bool:
        t = self.km.task
        return t.valid(task) and bool(t.flags[t.idx(task, "sim:killed")] & TIF_SIGKILL)

    def park(self, k: Kernel, task: int) -> None:
        """A task that has done its work and stays alive until it is killed (then exits) or
        the workload ends (then it just stays)."""
        while not self.killed(task):
            if self.sched is None or self.sched.stopping:
                return
            k.clock.sleep(PARK_S)
        self.exit(k, task, 128 + 9, "killed")

    def reclaim_pfn(self, k: Kernel, pfn: int) -> str:
        return shrink_page(k, pfn, True)


def ksmd_body(world: World, rounds: int) -> Callable[[Kernel], None]:
    """ksm_scan_thread(): up to `rounds` rounds, sleeping sleep_millisecs (at least 1 ms
    of virtual time) between them, until the workload is done."""

    def body(k: Kernel) -> None:
        sched = world.sched
        for _ in range(rounds):
            if sched.stopping:
                return
            ksm_scan_thread_round(k)
            k.clock.sleep(max(0.001, int(k.ksm["sleep_millisecs"]) / 1000))
    return body
