"""shared_mem.lockdep: lock-order validation shared by processes, and hung-task reports.

The cross-process tests run each actor's lock sequence in its own spawned process (a
"script"), one after the other, and look at the reports each process's report hook
received and at the one report the run keeps in shared memory.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from shared_mem.lockdep import find_hung
from shared_mem.locks import MAX_LOCK_DEPTH, LockSpace

pytestmark = pytest.mark.timeout(60)

CIRCULAR = "WARNING: possible circular locking dependency detected"


def _script(desc: dict, actor: str, ops: list, conn) -> None:
    """Child: run lock operations [(class, idx, method, kwargs)...] as `actor`, then send
    back (pid, reports received by this process's report hook)."""
    sp = LockSpace.attach(desc)
    reports: list = []
    sp.set_report_hook(lambda kind, title, text, data: reports.append([kind, title, text, data]))
    sp.bind_context(actor)
    for cls, idx, meth, kw in ops:
        getattr(sp.get(cls, idx), meth)(**kw)
    conn.send((os.getpid(), reports))
    sp.close()


def _run(procs, sp: LockSpace, actor: str, ops: list) -> tuple[int, list]:
    import multiprocessing as mp

    parent, child = mp.get_context("spawn").Pipe()
    p = procs.start(_script, sp.descriptor(), actor, ops, child)
    if not parent.poll(30):
        pytest.fail(f"{actor} script did not finish")
    out = parent.recv()
    p.join(10)
    return out


def _lk(cls: str, idx: int = 0, site: str | None = None) -> tuple:
    return (cls, idx, "lock", {"site": site} if site else {})


def _un(cls: str, idx: int = 0) -> tuple:
    return (cls, idx, "unlock", {})


# --- circular dependencies ------------------------------------------------------------


def test_abba_across_processes_gives_exactly_one_report(space: LockSpace, procs) -> None:
    """
    ksmd (first process)                exit (second process, later)
    ----                                ----
    mutex_lock(ksm_thread_mutex)
    mmap_read_lock(mmap_lock#3)
    ...unlock both...
                                        mmap_write_lock(mmap_lock#3)
                                        mutex_lock(ksm_thread_mutex)  <- splat
    """
    ksmd_pid, ksmd_reports = _run(
        procs,
        space,
        "ksmd",
        [
            _lk("ksm_thread_mutex", site="ksm_scan_thread"),
            ("mmap_lock", 3, "down_read", {"site": "scan_get_next_rmap_item"}),
            ("mmap_lock", 3, "up_read", {}),
            _un("ksm_thread_mutex"),
        ],
    )
    exit_pid, exit_reports = _run(
        procs,
        space,
        "exit",
        [
            ("mmap_lock", 3, "down_write", {"site": "exit_mmap"}),
            _lk("ksm_thread_mutex", site="__ksm_exit"),  # reported, not refused
            _un("ksm_thread_mutex"),
            ("mmap_lock", 3, "up_write", {}),
        ],
    )
    assert ksmd_reports == []
    assert len(exit_reports) == 1
    kind, title, text, data = exit_reports[0]
    assert (kind, title) == ("lockdep", CIRCULAR)
    assert text == "\n".join(
        [
            "======================================================",
            "WARNING: possible circular locking dependency detected",
            "------------------------------------------------------",
            f"exit/{exit_pid} is trying to acquire lock:",
            " (ksm_thread_mutex){+.+.}, at: __ksm_exit",
            "but task is already holding lock:",
            " (mmap_lock#3){++++}, at: exit_mmap",
            "which lock already depends on the new lock.",
            "the existing dependency chain (in reverse order) is:",
            f"-> #1 (mmap_lock){{++++}}: first taken by ksmd/{ksmd_pid} while holding "
            "ksm_thread_mutex, at: scan_get_next_rmap_item",
            f"-> #0 (ksm_thread_mutex){{+.+.}}: being taken by exit/{exit_pid} while holding "
            "mmap_lock#3, at: __ksm_exit",
            "other info that might help us debug this:",
            " Possible unsafe locking scenario:",
            "       CPU0                    CPU1",
            "       ----                    ----",
            "  lock(mmap_lock);",
            "                               lock(ksm_thread_mutex);",
            "                               lock(mmap_lock);",
            "  lock(ksm_thread_mutex);",
            " *** DEADLOCK ***",
            f"1 lock held by exit/{exit_pid}:",
            " #0: (mmap_lock#3){++++}, at: exit_mmap",
        ]
    )
    assert data["cycle"] == ["ksm_thread_mutex", "mmap_lock"]
    assert data["chain"][0]["actor"] == "ksmd"
    assert data["chain"][0]["pid"] == ksmd_pid
    assert data["acquiring"]["site"] == "__ksm_exit"

    # Another inversion, in yet other processes: lockdep is off now, no second splat.
    _, r1 = _run(
        procs,
        space,
        "a",
        [_lk("ksm_mmlist_lock"), _lk("zone_lock"), _un("zone_lock"), _un("ksm_mmlist_lock")],
    )
    _, r2 = _run(
        procs,
        space,
        "b",
        [_lk("zone_lock"), _lk("ksm_mmlist_lock"), _un("ksm_mmlist_lock"), _un("zone_lock")],
    )
    assert r1 == r2 == []
    stored = space.lockdep_report()
    assert stored is not None
    assert stored["text"] == text
    assert space.lockdep_edges() == [("ksm_thread_mutex", "mmap_lock")]


def test_consistent_orders_make_no_report(space: LockSpace, procs) -> None:
    order = [
        _lk("ksm_thread_mutex"),
        ("mmap_lock", 1, "down_read", {}),
        ("anon_vma_lock", 2, "down_write", {}),
        _lk("page_lock", 4),
        _lk("page_lock", 5),  # same class nested: no edge
        _lk("ptl", 1),
        _un("ptl", 1),
        _un("page_lock", 5),
        _un("page_lock", 4),
        ("anon_vma_lock", 2, "up_write", {}),
        ("mmap_lock", 1, "up_read", {}),
        _un("ksm_thread_mutex"),
    ]
    _, r1 = _run(procs, space, "ksmd", order)
    _, r2 = _run(
        procs,
        space,
        "fault",
        [
            ("mmap_lock", 6, "down_read", {}),
            _lk("page_lock", 9),
            _lk("page_lock", 8),  # same class, other order than ksmd's: still no edge
            _lk("ptl", 6),
            ("page_lock", 1, "trylock", {}),  # trylock under ptl: no ptl -> page_lock edge
            _lk("zone_lock", 1),
            _un("zone_lock", 1),
            _un("page_lock", 1),
            _un("ptl", 6),
            _un("page_lock", 8),
            _un("page_lock", 9),
            ("mmap_lock", 6, "up_read", {}),
        ],
    )
    assert r1 == r2 == []
    assert space.lockdep_report() is None
    edges = set(space.lockdep_edges())
    assert ("ptl", "page_lock") not in edges
    assert ("page_lock", "page_lock") not in edges
    assert {
        ("ksm_thread_mutex", "mmap_lock"),
        ("mmap_lock", "anon_vma_lock"),
        ("anon_vma_lock", "page_lock"),
        ("page_lock", "ptl"),
        ("ptl", "zone_lock"),
        ("page_lock", "zone_lock"),  # the trylocked page lock does get out-edges
    } <= edges


def test_three_class_cycle_spells_the_chain(space: LockSpace) -> None:
    reports = []
    space.set_report_hook(lambda *r: reports.append(r))
    space.bind_context("ksmd")
    a, b, c = space.get("ksm_thread_mutex"), space.get("mmap_lock", 0), space.get("page_lock", 3)
    with a, b.read():
        pass
    space.bind_context("fault")
    with b.read(), c:
        pass
    space.bind_context("migrate")
    assert reports == []
    with c, a:  # a -> b -> c exists: taking a under c closes the cycle
        pass
    ((kind, title, text, data),) = reports
    assert (kind, title) == ("lockdep", CIRCULAR)
    pid = os.getpid()
    assert data["cycle"] == ["ksm_thread_mutex", "mmap_lock", "page_lock"]
    assert (
        f"-> #2 (page_lock){{+.+.}}: first taken by fault/{pid} while holding mmap_lock#0" in text
    )
    assert (
        f"-> #1 (mmap_lock){{++++}}: first taken by ksmd/{pid} while holding ksm_thread_mutex"
        in text
    )
    assert "-> #0 (ksm_thread_mutex){+.+.}: being taken by migrate/" in text
    assert "Chain exists of:\n  ksm_thread_mutex --> mmap_lock --> page_lock\n" in text
    assert (
        "  lock(page_lock);\n"
        "                               lock(mmap_lock);\n"
        "                               lock(page_lock);\n"
        "  lock(ksm_thread_mutex);\n"
    ) in text


# --- other lockdep reports ------------------------------------------------------------


def test_max_lock_depth(space: LockSpace) -> None:
    reports = []
    space.set_report_hook(lambda *r: reports.append(r))
    space.bind_context("ksmd")
    pages = [space.get("page_lock", i) for i in range(MAX_LOCK_DEPTH + 2)]
    for p in pages:
        p.lock()
    ((kind, title, text, _),) = reports
    assert (kind, title) == ("lockdep", "BUG: MAX_LOCK_DEPTH too low!")
    assert f"{MAX_LOCK_DEPTH + 1} locks held by ksmd/{os.getpid()}:" in text
    assert len(space.held_locks()) == MAX_LOCK_DEPTH + 2
    (me,) = space.contexts_snapshot()
    assert len(me["held"]) == MAX_LOCK_DEPTH  # the shared table keeps the first 16
    pages[0].unlock()  # out of order: the shared table is rewritten from the stack
    assert [h["idx"] for h in space.contexts_snapshot()[0]["held"]] == list(range(1, 17))
    for p in pages[1:]:
        p.unlock()
    assert space.contexts_snapshot()[0]["held"] == []
    assert len(reports) == 1


def test_context_leaving_with_locks_held(space: LockSpace) -> None:
    reports = []
    space.set_report_hook(lambda *r: reports.append(r))
    m = space.get("ksm_thread_mutex")

    def leaver() -> None:
        space.bind_context("leaver")
        m.lock(site="run_store")
        space.release_context()

    t = threading.Thread(target=leaver)
    t.start()
    t.join(10)
    ((kind, title, text, data),) = reports
    assert kind == "lockdep"
    assert data["held"][0]["site"] == "run_store"
    assert title == f"WARNING: leaver/{os.getpid()} still has locks held!"
    assert " #0: (ksm_thread_mutex){+.+.}, at: run_store" in text
    space.bind_context("main")
    assert m.trylock()  # leaving released it
    m.unlock()


def test_report_without_hook_goes_to_stderr(space: LockSpace, capsys) -> None:
    space.bind_context("ksmd")
    with space.get("ptl", 0), space.get("zone_lock", 0):
        pass
    with space.get("zone_lock", 0), space.get("ptl", 0):
        pass
    assert CIRCULAR in capsys.readouterr().err


def test_lockdep_check_is_skipped_when_nothing_is_held(space: LockSpace) -> None:
    """The single-lock path never looks at the graph: a lone acquire adds no edge."""
    space.bind_context("ksmd")
    for cls in ("ksm_thread_mutex", "ksm_mmlist_lock", "ptl", "page_lock"):
        with space.get(cls):
            pass
    assert space.lockdep_edges() == []


# --- find_hung on constructed snapshots ----------------------------------------------

S = 1_000_000_000


def _ctx(ctx, actor, pid, held=(), waiting=None):
    def e(lock, idx, mode, since=0, site=None):
        return {"lock": lock, "idx": idx, "mode": mode, "since_ns": since, "site": site}

    return {
        "ctx": ctx,
        "actor": actor,
        "pid": pid,
        "tid": pid,
        "held": [e(*h) for h in held],
        "waiting": e(*waiting) if waiting else None,
    }


def test_find_hung_threshold_and_title() -> None:
    now = 100 * S
    snap = [
        _ctx(0, "ksmd", 1234, waiting=("ksm_thread_mutex", 0, "excl", now - 6 * S)),
        _ctx(1, "sysfs", 1300, held=[("ksm_thread_mutex", 0, "excl", 0, "run_store")]),
        _ctx(2, "fault", 1400, waiting=("ptl", 2, "excl", now - 2 * S)),
    ]
    (r,) = find_hung(snap, 5 * S, now)
    assert r["kind"] == "hung_task"
    assert r["title"] == "INFO: task ksmd:1234 blocked for more than 5 seconds."
    text = r["text"]
    assert "ksmd/1234 is waiting for lock:\n (ksm_thread_mutex){+.+.}" in text
    assert (
        "Showing all locks held in the system:\n"
        "1 lock held by sysfs/1300:\n"
        " #0: (ksm_thread_mutex){+.+.}, at: run_store\n"
    ) in text
    assert "Wait-for cycle" not in text
    assert r["data"]["cycle"] is None
    assert r["data"]["blocked_ns"] == 6 * S
    assert find_hung(snap, 7 * S, now) == []


def test_find_hung_sees_a_reader_stuck_behind_a_queued_writer() -> None:
    """The rwsem recursive-read deadlock: ksmd holds mmap_lock for read and wants the
    mutex; exit holds the mutex and wants mmap_lock for read, which would be granted,
    except that a writer is queued between them."""
    now = 50 * S
    snap = [
        _ctx(
            0,
            "ksmd",
            10,
            held=[("mmap_lock", 1, "read")],
            waiting=("ksm_thread_mutex", 0, "excl", 0),
        ),
        _ctx(
            1,
            "exit",
            11,
            held=[("ksm_thread_mutex", 0, "excl")],
            waiting=("mmap_lock", 1, "read", 0),
        ),
        _ctx(2, "munmap", 12, waiting=("mmap_lock", 1, "write", 0)),
        _ctx(3, "bystander", 13, waiting=("ksm_thread_mutex", 0, "excl", 0)),
    ]
    reports = {r["data"]["actor"]: r for r in find_hung(snap, S, now)}
    assert set(reports) == {"ksmd", "exit", "munmap", "bystander"}
    text = reports["exit"]["text"]
    assert (
        " exit/11 waits for (mmap_lock#1){++++} [read], queued behind waiting writer munmap/12"
        in text
    )
    assert " munmap/12 waits for (mmap_lock#1){++++} [write], held by ksmd/10" in text
    assert " ksmd/10 waits for (ksm_thread_mutex){+.+.} [excl], held by exit/11" in text
    assert reports["exit"]["data"]["in_cycle"]
    assert not reports["bystander"]["data"]["in_cycle"]
    assert reports["bystander"]["data"]["cycle"] is not None  # blocked behind the cycle


def test_find_hung_on_a_live_space_with_no_waiters(space: LockSpace) -> None:
    space.bind_context("idle")
    with space.get("ksm_thread_mutex"):
        assert find_hung(space.contexts_snapshot(), 0, time.monotonic_ns()) == []
