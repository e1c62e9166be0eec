"""shared_mem.locks: kernel lock semantics across real processes, on real OFD locks.

Nothing is mocked and nothing sleeps and then asserts: children are spawned, driven
over pipes and events, and the tests assert on what was observed (the contexts table,
results, and monotonic timestamps taken just before or just after each operation;
CLOCK_MONOTONIC is system-wide, so stamps from different processes compare).
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import threading
import time

import msgpack
import pytest

from shared_mem.locks import (
    BIT,
    IMPLS,
    MUTEX,
    RWSEM,
    SPIN,
    BitLock,
    LockSpace,
    Mutex,
    RWSem,
    SpinLock,
    find_hung,
)
from shared_mem.segment import Segment

pytestmark = pytest.mark.timeout(60)

# Spawned children import this module to find their target, so it imports nothing from
# conftest (another directory's conftest may come first on a child's sys.path).
SPAWN = mp.get_context("spawn")


def wait_until(cond, timeout: float = 10.0, what: str = "condition"):
    """Poll `cond` until it returns something truthy (coordination, not an assertion)."""
    deadline = time.monotonic() + timeout
    while not (v := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)
    return v


# --- child-side code (spawned children import this module to find it) --------------


def _serve(desc: dict, actor: str, conn) -> None:
    """A kernel context in its own process, running lock operations on command."""
    sp = LockSpace.attach(desc)
    try:
        ctx = sp.bind_context(actor)
        events: list = []
        reports: list = []
        sp.set_event_hook(lambda *e: events.append((*e, time.monotonic_ns())))
        sp.set_report_hook(lambda *r: reports.append(r))
        conn.send(("ready", os.getpid(), ctx))
        while True:
            msg = conn.recv()
            t0 = time.monotonic_ns()
            try:
                if msg[0] == "call":
                    _, cls, idx, meth, kw = msg
                    value = getattr(sp.get(cls, idx), meth)(**kw)
                elif msg[0] == "held":
                    value = sp.held_locks()
                elif msg[0] == "events":
                    value, events[:] = list(events), []
                elif msg[0] == "reports":
                    value = list(reports)
                elif msg[0] == "exit":
                    conn.send(("ok", None, t0, t0))
                    return
                else:
                    raise ValueError(msg[0])
            except Exception as e:
                conn.send(("err", f"{type(e).__name__}: {e}", t0, time.monotonic_ns()))
            else:
                conn.send(("ok", value, t0, time.monotonic_ns()))
    finally:
        sp.close()


def _count_worker(desc, cls, idx, seg_name, who, iters, go, conn) -> None:
    """Increment a shared counter under the lock; the read-yield-write would lose
    updates without it."""
    sp = LockSpace.attach(desc)
    sp.bind_context(f"counter{who}")
    contended = []
    sp.set_event_hook(lambda ev, *_: ev == "lock_contended" and contended.append(1))
    seg = Segment.attach(seg_name)
    q = memoryview(seg.buf).cast("q")
    lk = sp.get(cls, idx)
    conn.send("ready")
    go.wait()
    for i in range(iters):
        lk.lock()
        v = q[0]
        if i % 4 == 0:
            os.sched_yield()
        q[0] = v + 1
        lk.unlock()
    conn.send(len(contended))
    q.release()
    seg.close()
    sp.close()


def _reader_worker(desc, who, k, seg_name, release, conn) -> None:
    """Hold mmap_lock#2 for read and record how many readers are inside meanwhile."""
    sp = LockSpace.attach(desc)
    sp.bind_context(f"reader{who}")
    seg = Segment.attach(seg_name)
    inside = memoryview(seg.buf)
    sem = sp.get("mmap_lock", 2)
    sem.down_read()
    inside[who] = 1
    deadline = time.monotonic() + 15
    seen = 0
    while time.monotonic() < deadline:
        seen = sum(inside[:k])
        if seen == k:
            break
        time.sleep(0.001)
    release.wait(30)
    inside[who] = 0
    t_before_up = time.monotonic_ns()
    sem.up_read()
    conn.send((seen, t_before_up))
    inside.release()
    seg.close()
    sp.close()


def _reader_loop(desc, who, started, stop, conn) -> None:
    """Re-enter mmap_lock#5 for read back to back, 0.5 ms per hold, until stopped."""
    sp = LockSpace.attach(desc)
    sp.bind_context(f"rloop{who}")
    sem = sp.get("mmap_lock", 5)
    recs = []
    while not stop.is_set():
        t_arrive = time.monotonic_ns()
        sem.down_read()
        t_in = time.monotonic_ns()
        time.sleep(0.0005)
        t_out = time.monotonic_ns()
        sem.up_read()
        recs.append((t_arrive, t_in, t_out))
        if len(recs) == 1:
            started.set()
    conn.send(recs)
    sp.close()


def _forked_child(sp: LockSpace, conn) -> None:
    inherited = sp.held_locks()
    sp.bind_context("forked")
    conn.send((inherited, sp.get("ksm_thread_mutex").trylock()))


# --- helpers --------------------------------------------------------------------------


def _ctx_of(sp: LockSpace, ctx: int) -> dict | None:
    return next((c for c in sp.contexts_snapshot() if c["ctx"] == ctx), None)


def _waiting_on(sp: LockSpace, ctx: int, lock: str, idx: int, mode: str) -> dict | None:
    c = _ctx_of(sp, ctx)
    w = c and c["waiting"]
    return c if w and (w["lock"], w["idx"], w["mode"]) == (lock, idx, mode) else None


def _remotes(procs, sp: LockSpace, *actors: str) -> list:
    rs = [procs.remote(_serve, sp.descriptor(), a) for a in actors]
    return [r.ready() for r in rs]


# --- setup and API --------------------------------------------------------------------


def test_descriptor_is_msgpack_and_attach_shares_state(space: LockSpace) -> None:
    desc = msgpack.unpackb(msgpack.packb(space.descriptor()))
    other = LockSpace.attach(desc)
    try:
        space.bind_context("owner")
        space.get("mmap_lock", 3).down_read()
        snap = other.contexts_snapshot()
        assert [(c["actor"], c["pid"]) for c in snap] == [("owner", os.getpid())]
        assert snap[0]["tid"] == threading.get_native_id()
        assert snap[0]["held"][0]["lock"] == "mmap_lock"
        assert snap[0]["held"][0]["idx"] == 3
        assert snap[0]["held"][0]["mode"] == "read"
        other.unlink()  # not the owner: a no-op
        assert os.path.exists(desc["lock_path"])
        space.get("mmap_lock", 3).up_read()
    finally:
        other.close()


def test_get_returns_cached_typed_instances(space: LockSpace) -> None:
    kinds = IMPLS[space.impl]
    assert isinstance(space.get("ksm_thread_mutex"), kinds[MUTEX])
    assert isinstance(space.get("ptl", 7), kinds[SPIN])
    assert isinstance(space.get("page_lock", 63), kinds[BIT])
    assert isinstance(space.get("anon_vma_lock", 1), kinds[RWSEM])
    if space.impl == "word":
        assert (Mutex, SpinLock, BitLock, RWSem) == (kinds[MUTEX], kinds[SPIN], kinds[BIT], kinds[RWSEM])
    assert space.get("ptl", 2) is space.get("ptl", 2)
    with pytest.raises(KeyError):
        space.get("no_such_lock")
    with pytest.raises(IndexError):
        space.get("ptl", 8)
    with pytest.raises(IndexError):
        space.get("ptl", -1)
    with pytest.raises(ValueError):
        LockSpace.create("bad", [("x", "semaphore", 1)])
    with pytest.raises(ValueError, match="lock impl"):
        LockSpace.create("bad", [("x", MUTEX, 1)], impl="sysv")


def test_locking_needs_a_bound_context(space: LockSpace) -> None:
    with pytest.raises(RuntimeError, match="bind_context"):
        space.get("ksm_thread_mutex").lock()
    assert space.held_locks() == []


# --- exclusion ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "idx"), [("ksm_thread_mutex", 0), ("ksm_mmlist_lock", 0), ("page_lock", 7)]
)
def test_exclusion_across_processes(space, procs, make_segment, cls: str, idx: int) -> None:
    """N processes x M read-yield-write increments under the lock: no update is lost,
    and the processes really did collide on the lock."""
    n, iters = 3, 1500
    counter = make_segment("counter")
    go = SPAWN.Event()
    conns = []
    for who in range(n):
        parent, child = SPAWN.Pipe()
        procs.start(
            _count_worker, space.descriptor(), cls, idx, counter.name, who, iters, go, child
        )
        conns.append(parent)
    for c in conns:
        assert c.poll(30) and c.recv() == "ready"
    go.set()
    contended = [c.recv() if c.poll(40) else pytest.fail("counter worker hung") for c in conns]
    q = memoryview(counter.buf).cast("q")
    try:
        assert q[0] == n * iters
    finally:
        q.release()
    assert sum(contended) > 0, "the workers never contended: the test proved nothing"


def test_threads_of_one_process_exclude_each_other(space: LockSpace) -> None:
    """OFD locks belong to the open file description: each bound thread has its own fd,
    so two threads of one process exclude each other like two processes."""
    lk = space.get("ptl", 3)
    box = [0]
    contended = []
    space.set_event_hook(lambda ev, *_: ev == "lock_contended" and contended.append(1))

    def run(name: str) -> None:
        space.bind_context(name)
        for i in range(2000):
            lk.lock()
            v = box[0]
            if i % 4 == 0:
                time.sleep(0)
            box[0] = v + 1
            lk.unlock()
        space.release_context()

    ts = [threading.Thread(target=run, args=(f"t{i}",)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert box[0] == 4000
    assert contended


def test_waiter_is_visible_and_proceeds_only_after_release(space, procs) -> None:
    space.bind_context("holder")
    m = space.get("ksm_thread_mutex")
    m.lock(site="ksm_scan_thread")
    (w,) = _remotes(procs, space, "waiter")
    w.op("ksm_thread_mutex", 0, "lock", site="__ksm_exit")
    snap_w = wait_until(
        lambda: _waiting_on(space, w.ctx, "ksm_thread_mutex", 0, "excl"), what="waiter blocked"
    )
    assert snap_w["actor"] == "waiter"
    assert snap_w["pid"] == w.pid
    assert snap_w["waiting"]["site"] == "__ksm_exit"
    assert snap_w["held"] == []
    me = next(c for c in space.contexts_snapshot() if c["actor"] == "holder")
    assert [(h["lock"], h["mode"], h["site"]) for h in me["held"]] == [
        ("ksm_thread_mutex", "excl", "ksm_scan_thread")
    ]
    assert space.held_locks() == [("ksm_thread_mutex", 0, "excl")]
    t_release = time.monotonic_ns()
    m.unlock()
    _, _, t_acquired = w.result()
    assert t_acquired > t_release
    assert w.ask("held") == [("ksm_thread_mutex", 0, "excl")]
    events = [e[0] for e in w.ask("events")]
    assert events == ["lock_acquire", "lock_contended", "lock_acquired"]
    after = _ctx_of(space, w.ctx)
    assert after["waiting"] is None
    assert [h["lock"] for h in after["held"]] == ["ksm_thread_mutex"]
    w.call("ksm_thread_mutex", 0, "unlock")
    assert _ctx_of(space, w.ctx)["held"] == []


def test_event_hook_sequence_uncontended(space: LockSpace) -> None:
    space.bind_context("ksmd")
    seen = []
    space.set_event_hook(lambda *e: seen.append(e))
    with space.get("anon_vma_lock", 4).write(site="rmap_walk"):
        pass
    assert space.get("page_lock", 1).trylock()
    space.get("page_lock", 1).unlock()
    space.set_event_hook(None)
    space.get("ptl", 0).lock()
    space.get("ptl", 0).unlock()
    assert seen == [
        ("lock_acquire", "anon_vma_lock", 4, "write", 0, "rmap_walk"),
        ("lock_acquired", "anon_vma_lock", 4, "write", 0, "rmap_walk"),
        ("lock_release", "anon_vma_lock", 4, "write", 0, "rmap_walk"),
        ("lock_acquire", "page_lock", 1, "excl", 0, None),
        ("lock_acquired", "page_lock", 1, "excl", 0, None),
        ("lock_release", "page_lock", 1, "excl", 0, None),
    ]


# --- trylock and misuse ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "idx"), [("ksm_thread_mutex", 0), ("zone_lock", 1), ("page_lock", 5)]
)
def test_trylock_never_blocks(space, procs, cls: str, idx: int) -> None:
    space.bind_context("parent")
    lk = space.get(cls, idx)
    (r,) = _remotes(procs, space, "child")
    assert lk.trylock()
    assert not lk.trylock()  # held by this very context: fails, as mutex_trylock() does
    assert r.call(cls, idx, "trylock")[0] is False
    lk.unlock()
    assert r.call(cls, idx, "trylock")[0] is True
    assert not lk.trylock()
    r.call(cls, idx, "unlock")
    assert lk.trylock()
    lk.unlock()


def test_rwsem_trylocks(space, procs) -> None:
    space.bind_context("parent")
    sem = space.get("mmap_lock", 4)
    (r,) = _remotes(procs, space, "child")
    sem.down_read()
    assert r.call("mmap_lock", 4, "down_read_trylock")[0] is True
    r.call("mmap_lock", 4, "up_read")
    assert r.call("mmap_lock", 4, "down_write_trylock")[0] is False
    sem.up_read()
    r.call("mmap_lock", 4, "down_write")
    assert not sem.down_read_trylock()
    assert not sem.down_write_trylock()
    r.call("mmap_lock", 4, "up_write")
    assert sem.down_write_trylock()
    assert r.call("mmap_lock", 4, "down_read_trylock")[0] is False
    sem.up_write()


def test_unlock_of_a_lock_not_held_raises(space: LockSpace) -> None:
    space.bind_context("main")
    m = space.get("ksm_thread_mutex")
    with pytest.raises(RuntimeError, match="bad unlock balance"):
        m.unlock()
    with pytest.raises(RuntimeError, match="bad unlock balance"):
        space.get("mmap_lock", 0).up_write()
    got, go_on = threading.Event(), threading.Event()

    def other() -> None:
        space.bind_context("other")
        m.lock()
        got.set()
        go_on.wait(10)
        m.unlock()
        space.release_context()

    t = threading.Thread(target=other)
    t.start()
    try:
        assert got.wait(10)
        with pytest.raises(RuntimeError, match="bad unlock balance"):
            m.unlock()  # held by the other thread's context, not ours
        assert not m.trylock()  # and it is still held
    finally:
        go_on.set()
        t.join(10)
    sem = space.get("mmap_lock", 1)
    sem.down_write()
    with pytest.raises(RuntimeError, match="held for write"):
        sem.up_read()
    sem.up_write()
    assert space.held_locks() == []


def test_recursive_acquire_raises_instead_of_silently_succeeding(space: LockSpace) -> None:
    """The same fd re-locking a byte it holds is a no-op for OFD locks; in the kernel it
    is a self-deadlock. The model refuses it."""
    space.bind_context("main")
    m = space.get("ksm_thread_mutex")
    space.get("ksm_mmlist_lock").lock()
    m.lock()
    with pytest.raises(RuntimeError, match="recursive locking"):
        m.lock()
    m.unlock()
    space.get("ksm_mmlist_lock").unlock()


def test_out_of_order_release_keeps_the_shared_table_right(space: LockSpace) -> None:
    space.bind_context("main")
    a, b, c = (space.get("page_lock", i) for i in (1, 2, 3))
    a.lock()
    b.lock()
    c.lock(site="late")
    a.unlock()
    assert space.held_locks() == [("page_lock", 2, "excl"), ("page_lock", 3, "excl")]
    (me,) = space.contexts_snapshot()
    assert [(h["idx"], h["site"]) for h in me["held"]] == [(2, None), (3, "late")]
    c.unlock()
    b.unlock()
    assert space.contexts_snapshot()[0]["held"] == []


# --- contexts -------------------------------------------------------------------------


def test_context_slots_are_reused(make_space) -> None:
    sp = make_space(max_contexts=2)
    a = sp.bind_context("a")
    assert sp.bind_context("renamed") == a
    done = threading.Event()
    errors = []

    def fill() -> None:
        sp.bind_context("b")
        try:
            sp.bind_context("never")  # same thread: rebinding keeps the slot
            t2 = threading.Thread(target=lambda: errors.append(_try_bind(sp, "c")))
            t2.start()
            t2.join(10)
        finally:
            done.set()
        # leave without release_context(): the slot is freed when the thread ends

    t = threading.Thread(target=fill)
    t.start()
    t.join(10)
    assert done.is_set()
    assert errors == ["all 2 context slots are in use"]
    wait_until(lambda: len(sp.contexts_snapshot()) == 1, what="dead thread's slot freed")
    assert [c["actor"] for c in sp.contexts_snapshot()] == ["renamed"]
    t3 = threading.Thread(target=lambda: errors.append(_try_bind(sp, "d")))
    t3.start()
    t3.join(10)
    assert errors[-1] is None


def _try_bind(sp: LockSpace, name: str) -> str | None:
    try:
        sp.bind_context(name)
    except RuntimeError as e:
        return str(e).split(": ", 1)[1]
    sp.release_context()
    return None


def test_forked_child_must_bind_its_own_context(space, procs) -> None:
    """A fork shares the parent's open file descriptions; the child drops them, so it
    cannot accidentally own the parent's locks."""
    space.bind_context("parent")
    m = space.get("ksm_thread_mutex")
    m.lock()
    parent, child = mp.Pipe()
    p = procs.start(_forked_child, space, child, ctx=mp.get_context("fork"))
    assert parent.poll(20)
    inherited, got = parent.recv()
    p.join(10)
    assert inherited == []
    assert got is False
    probe: list[bool] = []
    t = threading.Thread(target=lambda: probe.append(_probe_trylock(space, m)))
    t.start()
    t.join(10)
    assert probe == [False]  # the child's exit did not release our lock
    m.unlock()
    assert [c["actor"] for c in space.contexts_snapshot()] == ["parent"]


def _probe_trylock(sp: LockSpace, lk) -> bool:
    sp.bind_context("probe")
    try:
        got = lk.trylock()
        if got:
            lk.unlock()
        return got
    finally:
        sp.release_context()


# --- rwsem ----------------------------------------------------------------------------


def test_rwsem_readers_share_and_a_writer_excludes_everyone(space, procs, make_segment) -> None:
    k = 3
    inside = make_segment("inside")
    release = SPAWN.Event()
    conns = []
    for who in range(k):
        parent, child = SPAWN.Pipe()
        procs.start(_reader_worker, space.descriptor(), who, k, inside.name, release, child)
        conns.append(parent)
    flags = memoryview(inside.buf)
    try:
        wait_until(lambda: sum(flags[:k]) == k, timeout=20, what="all readers inside")
    finally:
        flags.release()
    writer, late, other = _remotes(procs, space, "writer", "late_reader", "other")
    writer.op("mmap_lock", 2, "down_write")
    wait_until(lambda: _waiting_on(space, writer.ctx, "mmap_lock", 2, "write"), what="writer waits")
    # A reader arriving now queues behind the waiting writer.
    late.op("mmap_lock", 2, "down_read")
    wait_until(lambda: _waiting_on(space, late.ctx, "mmap_lock", 2, "read"), what="late reader")
    assert other.call("mmap_lock", 2, "down_read_trylock")[0] is False
    release.set()
    results = [c.recv() if c.poll(20) else pytest.fail("reader hung") for c in conns]
    assert [seen for seen, _ in results] == [k] * k, "readers were not all inside at once"
    _, _, t_writer_in = writer.result()
    assert t_writer_in > max(t for _, t in results)
    assert other.call("mmap_lock", 2, "down_write_trylock")[0] is False
    assert other.call("mmap_lock", 2, "down_read_trylock")[0] is False
    _, t_writer_out, _ = writer.call("mmap_lock", 2, "up_write")
    _, _, t_late_in = late.result()
    assert t_late_in > t_writer_out
    late.call("mmap_lock", 2, "up_read")


def test_rwsem_waiting_writer_is_not_starved(space, procs) -> None:
    """Readers re-enter back to back from three processes. The test itself holds a read
    lock so the writer must wait; once it waits, the test lets go. The writer gets in,
    and every reader that arrived after the writer started waiting entered only after
    the writer released. (Without the writer-waiting handoff, overlapping readers
    would keep the rw byte shared for ever.)"""
    space.bind_context("test")
    sem = space.get("mmap_lock", 5)
    sem.down_read()
    stop = SPAWN.Event()
    starteds, conns = [], []
    for who in range(3):
        started = SPAWN.Event()
        parent, child = SPAWN.Pipe()
        procs.start(_reader_loop, space.descriptor(), who, started, stop, child)
        starteds.append(started)
        conns.append(parent)
    (writer,) = _remotes(procs, space, "writer")
    for s in starteds:
        assert s.wait(20)
    writer.op("mmap_lock", 5, "down_write")
    wait_until(lambda: _waiting_on(space, writer.ctx, "mmap_lock", 5, "write"), what="writer waits")
    sem.up_read()
    _, _, t_w_in = writer.result(15)
    # Every reader process is now parked behind the writer.
    wait_until(
        lambda: (
            sum(
                1
                for c in space.contexts_snapshot()
                if c["actor"].startswith("rloop") and c["waiting"]
            )
            == 3
        ),
        what="readers queued behind the writer",
    )
    _, t_w_out, _ = writer.call("mmap_lock", 5, "up_write")
    wait_until(
        lambda: not any(c["waiting"] for c in space.contexts_snapshot()), what="readers back in"
    )
    stop.set()
    per_reader = [c.recv() if c.poll(20) else pytest.fail("reader hung") for c in conns]
    recs = [r for rs in per_reader for r in rs]
    (t_wait,) = [e[-1] for e in writer.ask("events") if e[0] == "lock_contended"]
    # Readers overlapped each other before the writer came (continuous re-entry).
    early = sorted((t_in, t_out) for _, t_in, t_out in recs if t_out < t_wait)
    assert any(b_in < a_out for (_, a_out), (b_in, _) in itertools.pairwise(early))
    # The writer excluded every reader.
    for _, t_in, t_out in recs:
        assert t_out < t_w_in or t_in > t_w_out
    # Readers that arrived after the writer began to wait entered after it left.
    late = [(t_arrive, t_in) for t_arrive, t_in, _ in recs if t_arrive > t_wait]
    assert late
    assert all(t_in > t_w_out for _, t_in in late)
    # All three were parked behind the writer (the wait_until above) and got in after it.
    # Not all three need a late arrival: a reader that came between the writer queueing
    # and the writer's lock_contended timestamp waited too, arriving "before" t_wait
    # (CI met that once).
    for rs in per_reader:
        assert any(t_arrive < t_w_out < t_in for t_arrive, t_in, _ in rs)


# --- death and hangs ------------------------------------------------------------------


def test_sigkilled_holder_releases_its_locks(space, procs) -> None:
    """OFD locks die with their holder. In the model a killed actor's locks simply
    vanish (the supervisor tears the run down when an actor dies unexpectedly)."""
    holder, waiter = _remotes(procs, space, "victim", "waiter")
    holder.call("ksm_thread_mutex", 0, "lock")
    holder.call("mmap_lock", 1, "down_write")
    holder.call("page_lock", 9, "lock")
    holder.call("anon_vma_lock", 2, "down_read")
    waiter.op("ksm_thread_mutex", 0, "lock")
    wait_until(lambda: _waiting_on(space, waiter.ctx, "ksm_thread_mutex", 0, "excl"), what="wait")
    procs.kill(holder.proc)
    waiter.result()  # the blocked waiter got the mutex
    space.bind_context("test")
    assert space.get("page_lock", 9).trylock()
    assert space.get("mmap_lock", 1).down_write_trylock()
    assert space.get("anon_vma_lock", 2).down_write_trylock()
    assert {c["actor"] for c in space.contexts_snapshot()} == {"waiter", "test"}


def test_waiters_blocked_on_a_killed_holders_rwsems_get_them(space, procs) -> None:
    """A reader that dies holding an rwsem leaves a count, not an owner: a writer asleep
    on it must still get in (the word locks' census), as must a reader asleep behind a
    writer that died."""
    holder, writer, reader = _remotes(procs, space, "victim", "writer", "reader")
    holder.call("mmap_lock", 4, "down_read", site="victim_read")
    holder.call("anon_vma_lock", 5, "down_write", site="victim_write")
    writer.op("mmap_lock", 4, "down_write")
    reader.op("anon_vma_lock", 5, "down_read")
    wait_until(lambda: _waiting_on(space, writer.ctx, "mmap_lock", 4, "write"), what="writer waits")
    wait_until(lambda: _waiting_on(space, reader.ctx, "anon_vma_lock", 5, "read"), what="reader waits")
    assert not writer.done() and not reader.done()
    procs.kill(holder.proc)
    writer.result()
    reader.result()
    writer.send("held")
    assert writer.result()[0] == [("mmap_lock", 4, "write")]
    space.bind_context("test")
    assert not space.get("mmap_lock", 4).down_read_trylock()  # the writer really has it
    assert space.get("anon_vma_lock", 5).down_read_trylock()  # shared with the reader


def test_find_hung_on_a_real_abba_deadlock(space, procs) -> None:
    """
    ksmd                                exit
    ----                                ----
    mutex_lock(ksm_thread_mutex)
                                        mmap_write_lock(mmap_lock#3)
    mmap_read_lock(mmap_lock#3)  ...
                                        mutex_lock(ksm_thread_mutex)  ...
    """
    ksmd, exiting = _remotes(procs, space, "ksmd", "exit")
    ksmd.call("ksm_thread_mutex", 0, "lock", site="ksm_scan_thread")
    exiting.call("mmap_lock", 3, "down_write", site="exit_mmap")
    ksmd.op("mmap_lock", 3, "down_read", site="scan_get_next_rmap_item")
    exiting.op("ksm_thread_mutex", 0, "lock", site="__ksm_exit")
    threshold = 1_000_000
    reports = wait_until(
        lambda: (
            (r := find_hung(space.contexts_snapshot(), threshold, time.monotonic_ns()))
            and len(r) == 2
            and r
        ),
        what="both contexts hung",
    )
    by_actor = {r["data"]["actor"]: r for r in reports}
    assert set(by_actor) == {"ksmd", "exit"}
    k = by_actor["ksmd"]
    assert k["kind"] == "hung_task"
    assert k["title"] == f"INFO: task ksmd:{ksmd.pid} blocked for more than 0.001 seconds."
    text = k["text"]
    assert text.startswith(k["title"])
    assert f"ksmd/{ksmd.pid} is waiting for lock:" in text
    assert " (mmap_lock#3){++++}, at: scan_get_next_rmap_item, mode: read" in text
    all_locks = text.split("Showing all locks held in the system:\n", 1)[1]
    assert f"1 lock held by ksmd/{ksmd.pid}:\n #0: (ksm_thread_mutex){{+.+.}}" in all_locks
    assert (
        f"1 lock held by exit/{exiting.pid}:\n #0: (mmap_lock#3){{++++}}, at: exit_mmap"
        in all_locks
    )
    assert "Wait-for cycle (deadlock):" in text
    assert (
        f" ksmd/{ksmd.pid} waits for (mmap_lock#3){{++++}} [read], held by exit/{exiting.pid}"
        in text
    )
    assert (
        f" exit/{exiting.pid} waits for (ksm_thread_mutex){{+.+.}} [excl], held by ksmd/{ksmd.pid}"
        in text
    )
    for r in reports:
        assert r["data"]["in_cycle"]
        assert {s["ctx"] for s in r["data"]["cycle"]} == {ksmd.ctx, exiting.ctx}
        assert r["data"]["blocked_ns"] > threshold
    # lockdep saw the inversion coming, in the exit process, before it hung.
    assert (
        space.lockdep_report()["title"] == "WARNING: possible circular locking dependency detected"
    )
    procs.kill(ksmd.proc)
    procs.kill(exiting.proc)
    assert space.contexts_snapshot() == []
    assert find_hung(space.contexts_snapshot(), 0, time.monotonic_ns()) == []
    space.bind_context("test")
    assert space.get("ksm_thread_mutex").trylock()
    assert space.get("mmap_lock", 3).down_write_trylock()


def test_remote_errors_come_back(space, procs) -> None:
    (r,) = _remotes(procs, space, "child")
    with pytest.raises(Exception, match="RuntimeError: bad unlock balance"):
        r.call("ptl", 0, "unlock")
    assert r.ask("held") == []
    assert r.ask("exit") is None


def test_kinds_are_the_api_names() -> None:
    assert (MUTEX, SPIN, RWSEM) == ("mutex", "spin", "rwsem")
