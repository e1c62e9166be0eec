# The deterministic scheduler: kernel contexts as cooperative threads, one CPU at a time.
#
# What it models. loom and shuttle run a Rust program's threads one at a time and decide,
# at every synchronisation operation, which thread goes next; a schedule is then just the
# sequence of those decisions, so a failing one can be printed, replayed exactly and
# shrunk. Here the threads are ksmlab's kernel contexts (ksmd, an exit path, a task's
# fault, the run=2 writer, ...), each a real Python thread running the same kernel
# functions the actor processes run, but only the thread that holds the baton runs. A
# thread gives the baton up only at a *schedule op*: a lock acquire (before the attempt)
# or release (after), a named schedule point (SCHED_POINTS), a sleep or cond_resched().
# Between two ops a context runs alone, so the interleavings explored are exactly the
# interleavings of its lock operations and named windows: the granularity the seed
# commits reason at ("spin_unlock before up_read").
#
# Why real threads and not generators: the kernel paths are plain functions (they must
# be, to run in the actor processes too), and a plain function can only be suspended in
# the middle by blocking its thread. The hand-over is direct (the running thread picks
# the next one and wakes it), and an op where the strategy keeps the same thread costs a
# function call, so most ops are cheap.
#
# Time is virtual: every op advances the clock by OP_NS; sleep(d) parks the thread until
# the clock passes now + d; when nothing is runnable, the clock jumps to the earliest
# sleeper. Nothing reads the wall clock, so a schedule replays to the same events.
#
# The end of a schedule: the run stops at the first report (a detector, a KASAN report,
# an oops, a deadlock: every context blocked with no sleeper, reported as a hung task
# with the wait-for cycle, or the hung-task watchdog on the virtual clock), or when every
# thread is done. Stopping unwinds each live thread with SimAbort (a BaseException, so
# kernel code's `except Exception` cannot swallow it).
from __future__ import annotations

import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from shared_mem.arena import BadFree, UseAfterFree

RUNNABLE, BLOCKED, SLEEPING, DONE = "runnable", "blocked", "sleeping", "done"
OP_NS = 1_000                  # virtual time one schedule op takes
HUNG_NS = 5_000_000_000        # the sim's khungtaskd timeout (virtual): 5 s
WALL_TIMEOUT_S = 120.0         # a schedule that does not end in this much real time is a sim bug


class SimAbort(BaseException):
    """Unwinds a context when its schedule has ended (not a kernel error)."""


class SimError(RuntimeError):
    """An error of the simulator itself (not a kernel report): run() re-raises it."""


@dataclass
class SimThread:
    tid: int
    name: str
    fn: Callable[[], None]
    service: bool = False                 # ksmd, kswapd: loop until the workload is done
    state: str = RUNNABLE
    wake_ns: int = 0
    blocked_on: Any = None                # the lock this context waits for
    blocked_mode: str = ""
    blocked_site: str = ""
    since_ns: int = 0
    no_progress: list | None = None       # [site, since_ns, retries] while cond_resched() loops
    held: list = field(default_factory=list)   # [(lock, mode, site)]
    event: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    k: Any = None                         # its Kernel


@dataclass
class Decision:
    """One op where more than one context could run."""

    step: int
    options: tuple[int, ...]      # runnable tids, ascending
    default: int                  # the tid that runs without a preemption or switch
    chosen: int
    cur_runnable: bool            # choosing anyone but `default` preempts the current context


class Strategy(Protocol):
    name: str

    def begin(self, sched: Scheduler) -> None: ...
    def choose(self, sched: Scheduler, step: int, cur: SimThread | None, runnable: list[SimThread],
               default: SimThread) -> SimThread: ...


class Scheduler:
    """Runs SimThreads one at a time; each op asks the strategy who goes next."""

    def __init__(self, strategy: Strategy, max_steps: int = 400_000, hung_ns: int = HUNG_NS,
                 on_switch: Callable[[SimThread], None] | None = None) -> None:
        self.strategy = strategy
        self.max_steps = max_steps
        self.hung_ns = hung_ns
        self.on_switch = on_switch
        self.threads: list[SimThread] = []
        self.cur: SimThread | None = None
        self.step = 0
        self.now_ns = 0
        self.trace: list[tuple[int, int, str, str]] = []    # (step, tid, op, what)
        self.decisions: list[Decision] = []
        self.failure: dict | None = None
        self.error: SimError | None = None
        self.aborting = False
        self.stopping = False         # the workload is done: services finish their round
        self._done = threading.Event()
        self._mu = threading.RLock()  # only for the end of a schedule (several threads unwind)

    # -- threads ---------------------------------------------------------------------------
    def spawn(self, name: str, fn: Callable[[], None], service: bool = False) -> SimThread:
        t = SimThread(len(self.threads), name, fn, service)
        t.since_ns = self.now_ns
        self.threads.append(t)
        t.thread = threading.Thread(target=self._body, args=(t,), name=f"sim:{name}", daemon=True)
        t.thread.start()
        return t

    def _body(self, t: SimThread) -> None:
        t.event.wait()
        t.event.clear()
        try:
            if not self.aborting:
                t.fn()
        except SimAbort:
            pass
        except SimError as e:
            self.error = e
            self.fail({"kind": "sim_error", "title": f"simulator: {e}", "text": "", "data": {}}, t)
        except (UseAfterFree, BadFree) as e:
            self.fail(dict(e.report), t)
        except Exception as e:
            title = f"Oops: {type(e).__name__}: {e} in {t.name}"
            self.fail({"kind": "oops", "title": title, "text": f"{title}\n{traceback.format_exc()}",
                       "data": {"ctx": t.name}}, t)
        finally:
            t.state = DONE
            t.held.clear()
            if not self.aborting and t.service is False and not self._workload_left():
                self.stopping = True
            self._leave(t)

    def _workload_left(self) -> bool:
        return any(x.state != DONE and not x.service for x in self.threads)

    def run(self) -> dict | None:
        """Run every spawned thread to the end of the schedule; returns the failure or None."""
        self.strategy.begin(self)
        first = self._pick(None)
        if first is None:
            return None
        self._switch_to(first)
        if not self._done.wait(WALL_TIMEOUT_S):
            self.fail({"kind": "sim_timeout", "title": "sim: schedule did not end in time",
                       "text": "", "data": {"step": self.step}}, None)
        for t in self.threads:
            if t.thread is not None:
                t.thread.join(10)
        if self.error is not None:
            raise self.error
        return self.failure

    # -- the yield point --------------------------------------------------------------------
    def op(self, what: str, detail: str = "") -> None:
        """A schedule op of the current context: maybe let another run."""
        t = self.cur
        if self.aborting:
            raise SimAbort()
        self.step += 1
        self.now_ns += OP_NS
        self.trace.append((self.step, t.tid, what, detail))
        if self.step > self.max_steps:
            self._hung_check(force_steps=True)
        elif not self.step & 255:
            self._hung_check()
        nxt = self._pick(t)
        if nxt is not t:
            self._handoff(t, nxt)

    def block(self, lock: Any, mode: str, site: str) -> None:
        """The current context waits for `lock` (it retries when the lock is released)."""
        t = self.cur
        if self.aborting:
            raise SimAbort()
        if t.blocked_on is not lock:
            t.since_ns = self.now_ns
        self.step += 1
        self.trace.append((self.step, t.tid, "wait", lock.name))
        t.state, t.blocked_on, t.blocked_mode, t.blocked_site = BLOCKED, lock, mode, site
        nxt = self._pick(t)
        if nxt is None:
            if not self.aborting:
                self._deadlock()
            raise SimAbort()
        self._handoff(t, nxt)

    def acquired(self) -> None:
        """The current context got the lock it waited for."""
        self.cur.blocked_on = None

    def wake_waiters(self, lock: Any) -> None:
        for x in self.threads:
            if x.state == BLOCKED and x.blocked_on is lock:
                x.state = RUNNABLE

    def sleep(self, seconds: float, what: str = "sleep") -> None:
        t = self.cur
        if self.aborting:
            raise SimAbort()
        if seconds <= 0:
            self.op(what)
            return
        self.step += 1
        self.trace.append((self.step, t.tid, what, f"{seconds * 1000:g}ms"))
        t.state, t.wake_ns = SLEEPING, self.now_ns + int(seconds * 1e9)
        nxt = self._pick(t)
        if nxt is None:       # the watchdog fired while the clock advanced
            raise SimAbort()
        if nxt is not t:
            self._handoff(t, nxt)

    # -- choosing ---------------------------------------------------------------------------
    def _pick(self, cur: SimThread | None) -> SimThread | None:
        runnable = [x for x in self.threads if x.state == RUNNABLE]
        if not runnable:
            sleepers = [x for x in self.threads if x.state == SLEEPING]
            if not sleepers:
                return None
            self.now_ns = max(self.now_ns, min(x.wake_ns for x in sleepers))
            for x in sleepers:
                if x.wake_ns <= self.now_ns:
                    x.state = RUNNABLE
            self._hung_check()
            if self.aborting:
                return None
            runnable = [x for x in self.threads if x.state == RUNNABLE]
        else:
            for x in self.threads:
                if x.state == SLEEPING and x.wake_ns <= self.now_ns:
                    x.state = RUNNABLE
                    runnable.append(x)
            runnable.sort(key=lambda x: x.tid)
        if len(runnable) == 1:
            return runnable[0]
        default = cur if cur is not None and cur.state == RUNNABLE else runnable[0]
        chosen = self.strategy.choose(self, self.step, cur, runnable, default)
        self.decisions.append(Decision(self.step, tuple(x.tid for x in runnable), default.tid, chosen.tid,
                                       default is cur))
        return chosen

    def _handoff(self, t: SimThread, nxt: SimThread) -> None:
        self._switch_to(nxt)
        t.event.wait()
        t.event.clear()
        if self.aborting:
            raise SimAbort()

    def _switch_to(self, nxt: SimThread) -> None:
        self.cur = nxt
        if self.on_switch is not None:
            self.on_switch(nxt)
        nxt.event.set()

    def _leave(self, t: SimThread) -> None:
        """A thread ends: hand the CPU on, or end the schedule."""
        with self._mu:
            if self.aborting:
                if all(x.state == DONE for x in self.threads):
                    self._done.set()
                return
            self.step += 1
            self.trace.append((self.step, t.tid, "end", ""))
            nxt = self._pick(None)
            if nxt is None:
                if self.aborting:
                    return
                if any(x.state == BLOCKED for x in self.threads):
                    self._deadlock()
                    if all(x.state == DONE for x in self.threads):
                        self._done.set()
                    return
                self._done.set()
                return
            self._switch_to(nxt)

    # -- the end ------------------------------------------------------------------------------
    def fail(self, report: dict, t: SimThread | None) -> None:
        """First report ends the schedule: every live context unwinds."""
        with self._mu:
            if self.failure is None:
                report = dict(report)
                report.setdefault("data", {})
                report["ctx"] = t.name if t is not None else "sim"
                report["step"] = self.step
                report["t_ns"] = self.now_ns
                self.failure = report
            if self.aborting:
                return
            self.aborting = True
        # Everyone but the calling thread (it unwinds by itself) wakes up to unwind; the
        # report may name another context than the caller (the watchdog's victim).
        me = threading.current_thread()
        for x in self.threads:
            if x.thread is not me:
                x.event.set()
        if all(x.state == DONE or x.thread is me for x in self.threads):
            self._done.set()

    def _deadlock(self) -> None:
        blocked = [x for x in self.threads if x.state == BLOCKED]
        cycle = wait_for_cycle(blocked)
        who = blocked[0] if blocked else None
        lines = []
        for x in (cycle or blocked):
            holders = ", ".join(h.name for h in lock_holders(x.blocked_on, self.threads)) or "nobody"
            lines.append(f"  {x.name} waits for {x.blocked_on.name} ({x.blocked_mode}) at "
                         f"{x.blocked_site or '?'}, held by {holders}")
        title = (f"INFO: task {who.name} blocked for more than {self.hung_ns // 10**9} seconds."
                 if who else "INFO: every context blocked")
        text = "\n".join([title, "every context is blocked: deadlock", "wait-for cycle:" if cycle else
                          "blocked contexts:", *lines, *show_all_locks(self.threads)]) + "\n"
        self.fail({"kind": "hung_task", "title": title, "text": text,
                   "data": {"deadlock": True, "cycle": [x.name for x in cycle or []]}}, who)

    def _hung_check(self, force_steps: bool = False) -> None:
        now = self.now_ns
        for x in self.threads:
            if x.state == BLOCKED and now - x.since_ns > self.hung_ns:
                secs = self.hung_ns // 10**9
                title = f"INFO: task {x.name} blocked for more than {secs} seconds."
                holders = ", ".join(h.name for h in lock_holders(x.blocked_on, self.threads)) or "nobody"
                text = "\n".join([title, f"{x.name} is waiting for lock:",
                                  f" ({x.blocked_on.name}), at: {x.blocked_site or '?'}, mode: {x.blocked_mode}"
                                  f", held by {holders}", *show_all_locks(self.threads)]) + "\n"
                self.fail({"kind": "hung_task", "title": title, "text": text,
                           "data": {"waiting": x.name, "lock": x.blocked_on.name}}, x)
                return
            np_ = x.no_progress
            if np_ is not None and x.state != DONE and now - np_[1] > self.hung_ns:
                secs = self.hung_ns // 10**9
                title = f"INFO: task {x.name} blocked for more than {secs} seconds."
                text = "\n".join([title, f"{x.name} made no progress in {np_[0]} ({np_[2]} retries)",
                                  *show_all_locks(self.threads)]) + "\n"
                self.fail({"kind": "hung_task", "title": title, "text": text,
                           "data": {"no_progress": np_[0], "retries": np_[2]}}, x)
                return
        if force_steps:
            title = f"sim: no end after {self.max_steps} schedule ops (livelock?)"
            self.fail({"kind": "hung_task", "title": title, "text": title + "\n" +
                       "\n".join(show_all_locks(self.threads)) + "\n", "data": {"steps": self.step}}, self.cur)


def lock_holders(lock: Any, threads: list[SimThread]) -> list[SimThread]:
    return [x for x in threads if any(h[0] is lock for h in x.held)]


def wait_for_cycle(blocked: list[SimThread]) -> list[SimThread]:
    """A cycle in the wait-for graph (context -> a blocked holder of the lock it waits
    for), or [] when the blocked contexts wait for no one blocked (a lost wakeup)."""
    for start in blocked:
        path, x = [start], start
        while True:
            holders = lock_holders(x.blocked_on, blocked)
            if not holders:
                break
            x = holders[0]
            if x in path:
                return path[path.index(x):]
            path.append(x)
    return []


def show_all_locks(threads: list[SimThread]) -> list[str]:
    out = ["Showing all locks held in the system:"]
    for x in threads:
        if x.held:
            out.append(f"{len(x.held)} lock(s) held by {x.name}:")
            out.extend(f" #{i}: ({h[0].name}){{{h[1]}}}, at: {h[2] or '?'}" for i, h in enumerate(x.held))
    return out
