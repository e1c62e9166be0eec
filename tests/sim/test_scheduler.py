# The deterministic scheduler and the simulator's locks, on small synthetic programs.
#
# These tests check the machinery every simulator result rests on: that the locks
# exclude as the kernel's do (a lost update is impossible under the mutex and found
# without it), that the depth-first search enumerates exactly the schedules within its
# preemption bound (counted against a brute-force enumeration), that an ABBA deadlock is
# reported with its wait-for cycle, that the hung-task watchdog runs on the virtual
# clock, that a replayed schedule repeats the same ops, and that lost determinism is
# caught instead of silently shrinking the search.
from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from ksmlab.sim.locks import SimLockSpace
from ksmlab.sim.scheduler import Scheduler
from ksmlab.sim.search import Nondeterminism, _next_prefix, _Prefix, parse_schedule, schedule_string
from ksmlab.sim.strategies import PCT, RandomWalk, Replay
from shared_mem.layout import Geometry

pytestmark = [pytest.mark.timeout(60)]

GEO = Geometry(nr_frames=16, max_mms=4, max_tasks=4, va_pages=8192)

Program = Callable[[Scheduler, SimLockSpace], list[tuple[str, Callable[[], None]]]]


def run_once(program: Program, strategy, lockdep: bool = True) -> tuple[Scheduler, dict | None]:
    sched = Scheduler(strategy, max_steps=20_000)
    locks = SimLockSpace(GEO, sched, lockdep)
    for name, fn in program(sched, locks):
        sched.spawn(name, fn)
    return sched, sched.run()


def dfs_all(program: Program, bound: int, limit: int = 20_000,
            lockdep: bool = True) -> tuple[int, list[dict], set[str]]:
    """Every schedule within `bound` preemptions: (count, failures, distinct op orders)."""
    prefix: list[int] = []
    n, fails, orders = 0, [], set()
    while n < limit:
        strat = _Prefix(prefix)
        sched, fail = run_once(program, strat, lockdep)
        strat.check()
        n += 1
        orders.add(" ".join(f"{t}:{w}" for _s, t, w, _d in sched.trace))
        if fail is not None:
            fails.append(fail)
        nxt = _next_prefix(sched.decisions, bound)
        if nxt is None:
            return n, fails, orders
        prefix = nxt
    raise AssertionError("search did not end")


# -- mutual exclusion ------------------------------------------------------------------------
def counter_program(locked: bool) -> Program:
    def program(sched: Scheduler, locks: SimLockSpace):
        box = {"n": 0}
        m = locks.get("ksm_thread_mutex")

        def incr() -> None:
            if locked:
                m.lock()
            v = box["n"]
            sched.op("point", "between load and store")
            box["n"] = v + 1
            if locked:
                m.unlock()

        def last() -> None:
            incr()
            # Whoever finishes second checks the count (both done: it must be 2).
            if all(t.state == "done" for t in sched.threads if t.name != sched.cur.name):
                assert box["n"] == 2, f"lost update: n = {box['n']}"
        return [("cpu0", last), ("cpu1", last)]
    return program


def test_unlocked_read_modify_write_loses_an_update_and_dfs_finds_it():
    _n, fails, _ = dfs_all(counter_program(False), bound=1)
    assert fails, "the lost update was not found within one preemption"
    assert fails[0]["kind"] == "oops" and "lost update" in fails[0]["title"]


def test_the_mutex_excludes_in_every_schedule():
    n, fails, orders = dfs_all(counter_program(True), bound=2)
    assert fails == []
    assert n == len(orders) > 4      # every schedule explored was a different interleaving


# -- the search enumerates exactly the bounded schedules ---------------------------------------
def points_program(k: int) -> Program:
    def program(sched: Scheduler, locks: SimLockSpace):
        def body() -> None:
            for i in range(k):
                sched.op("point", str(i))
        return [("a", body), ("b", body)]
    return program


def brute_force(k: int, bound: int) -> int:
    """Interleavings of two threads of k+1 segments each (start..op1, ..., opk..end) with
    at most `bound` preemptions: a switch away from a thread whose segment was not its last."""
    total = 0
    seg = k + 1
    for pos in itertools.combinations(range(2 * seg), seg):
        order = ["a" if i in pos else "b" for i in range(2 * seg)]
        done = {"a": 0, "b": 0}
        pre = 0
        for i, who in enumerate(order):
            done[who] += 1
            if i + 1 < len(order) and order[i + 1] != who and done[who] < seg:
                pre += 1
        total += pre <= bound
    return total


@pytest.mark.parametrize("k,bound", [(1, 0), (2, 1), (3, 1), (3, 2), (4, 2), (2, 5)])
def test_dfs_explores_exactly_the_schedules_within_the_bound(k, bound):
    n, fails, orders = dfs_all(points_program(k), bound)
    assert fails == []
    assert n == len(orders) == brute_force(k, bound)


# -- deadlock --------------------------------------------------------------------------------------
def abba(ordered: bool) -> Program:
    def program(sched: Scheduler, locks: SimLockSpace):
        a, b = locks.get("ksm_thread_mutex"), locks.get("ksm_mmlist_lock")

        def one(x, y) -> Callable[[], None]:
            def body() -> None:
                x.lock(site="first")
                y.lock(site="second")
                y.unlock()
                x.unlock()
            return body
        return [("cpu0", one(a, b)), ("cpu1", one(a, b) if ordered else one(b, a))]
    return program


def test_abba_is_a_lockdep_report_even_in_a_schedule_that_does_not_deadlock():
    sched, fail = run_once(abba(False), Replay())      # cpu0 takes both, then cpu1: no deadlock
    assert not any(w == "wait" for _s, _t, w, _d in sched.trace)
    assert fail["kind"] == "lockdep" and fail["title"] == "WARNING: possible circular locking dependency detected"
    assert fail["data"]["cycle"] == ["ksm_thread_mutex", "ksm_mmlist_lock"]
    assert "ksm_mmlist_lock" in fail["text"] and "*** DEADLOCK ***" in fail["text"]


def test_abba_is_a_hung_task_with_its_wait_for_cycle():
    _n, fails, _ = dfs_all(abba(False), bound=1, lockdep=False)
    assert fails
    rep = fails[0]
    assert rep["kind"] == "hung_task" and rep["data"]["deadlock"] is True
    assert sorted(rep["data"]["cycle"]) == ["cpu0", "cpu1"]
    assert "wait-for cycle" in rep["text"] and "held by" in rep["text"]


def test_one_lock_order_never_deadlocks():
    _n, fails, _ = dfs_all(abba(True), bound=2)
    assert fails == []


# -- rwsem: a waiting writer holds back later readers ------------------------------------------------
def test_a_waiting_writer_blocks_a_later_reader():
    log: list[str] = []

    def program(sched: Scheduler, locks: SimLockSpace):
        sem = locks.get("mmap_lock", 0)

        def reader1() -> None:
            sem.down_read()
            sched.op("point", "holding")
            sched.op("point", "still holding")
            log.append("r1 up")
            sem.up_read()

        def writer() -> None:
            sem.down_write()
            log.append("w in")
            sem.up_write()

        def reader2() -> None:
            sem.down_read()
            log.append("r2 in")
            sem.up_read()
        return [("r1", reader1), ("w", writer), ("r2", reader2)]

    # r1 takes the lock and is preempted; the writer queues; r2 comes after it.
    sched, fail = run_once(program, Script(["r1", "r1", "w", "w", "r2", "r2"]))
    assert fail is None
    assert log == ["r1 up", "w in", "r2 in"], log
    assert [w for _s, t, w, d in sched.trace if w == "wait"] == ["wait", "wait"]   # w, then r2


class Script:
    """Decision i picks the context named names[i] (if it can run), then defaults."""

    name = "script"

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.i = 0

    def begin(self, sched: Scheduler) -> None:
        self.i = 0

    def choose(self, sched, step, cur, runnable, default):
        i = self.i
        self.i += 1
        for t in runnable:
            if i < len(self.names) and t.name == self.names[i]:
                return t
        return default


# -- lock misuse -------------------------------------------------------------------------------------
def test_bad_unlock_and_recursive_locking_are_reported():
    def bad_unlock(sched, locks):
        return [("cpu0", lambda: locks.get("ksm_thread_mutex").unlock())]

    def recursive(sched, locks):
        m = locks.get("ksm_thread_mutex")

        def body() -> None:
            m.lock()
            m.lock()
        return [("cpu0", body)]

    _s, fail = run_once(bad_unlock, Replay())
    assert fail["kind"] == "oops" and "bad unlock balance" in fail["title"]
    _s, fail = run_once(recursive, Replay())
    assert fail["kind"] == "oops" and "recursive locking" in fail["title"]


# -- the watchdog on the virtual clock -----------------------------------------------------------------
def test_a_retry_loop_without_progress_is_a_hung_task_in_virtual_time():
    def program(sched, locks):
        def spin() -> None:
            locks.no_progress("__get_user_pages<-exit_mmap", 0)
            while True:
                sched.sleep(0.001)
        return [("exit", spin)]

    _sched, fail = run_once(program, Replay())
    assert fail["kind"] == "hung_task" and fail["data"]["no_progress"] == "__get_user_pages<-exit_mmap"
    assert 5e9 < fail["t_ns"] < 5.1e9          # five virtual seconds, whatever the wall clock did


# -- replay and determinism --------------------------------------------------------------------------------
def test_a_failing_schedule_replays_to_the_same_ops_twice():
    found = None
    for seed in range(50):
        sched, fail = run_once(counter_program(False), RandomWalk(seed))
        if fail is not None:
            found = schedule_string(sched.decisions)
            break
    assert found is not None
    runs = [run_once(counter_program(False), Replay(parse_schedule(found))) for _ in range(2)]
    assert all(f is not None and "lost update" in f["title"] for _s, f in runs)
    assert runs[0][0].trace == runs[1][0].trace


def test_pct_with_the_same_seed_makes_the_same_choices():
    a = run_once(points_program(6), PCT(7, depth=3, expected_steps=20))[0]
    b = run_once(points_program(6), PCT(7, depth=3, expected_steps=20))[0]
    assert a.trace == b.trace and schedule_string(a.decisions) == schedule_string(b.decisions)


def test_lost_determinism_stops_the_search():
    calls = {"n": 0}

    def program(sched, locks):
        calls["n"] += 1
        flaky = calls["n"] > 1          # the second run spawns a different program

        def body() -> None:
            sched.op("point", "x")
        return [("a", body)] if flaky else [("a", body), ("b", body)]

    sched, _ = run_once(program, _Prefix([]))
    nxt = _next_prefix(sched.decisions, 2)
    strat = _Prefix(nxt)
    with pytest.raises(Nondeterminism):
        run_once(program, strat)
        strat.check()
