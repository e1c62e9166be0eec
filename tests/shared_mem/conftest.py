# Fixtures for the lock tests. Everything a test creates is torn down in finalizers,
# whether the test passed or not: processes are SIGKILLed and reaped, lock spaces and
# segments are closed and unlinked, and teardown checks /dev/shm holds nothing of the run.
#
# Child processes are started with the 'spawn' method and run a function defined in the
# test module itself (a child imports that module by name, so the function must live
# there, not here). `Remote` is the parent's side of the usual child: a kernel context
# in another process that runs lock operations on command and answers with results and
# monotonic timestamps taken just before and just after each operation.
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from shared_mem.locks import BIT, MUTEX, RWSEM, SPIN, LockSpace
from shared_mem.segment import Segment, list_segments, segment_name

CLASSES = [
    ("ksm_thread_mutex", MUTEX, 1),
    ("ksm_mmlist_lock", SPIN, 1),
    ("zone_lock", SPIN, 2),
    ("mmap_lock", RWSEM, 8),
    ("ptl", SPIN, 8),
    ("page_lock", BIT, 64),
    ("anon_vma_lock", RWSEM, 8),
]

SPAWN = mp.get_context("spawn")


def wait_until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `cond` until it returns something truthy (coordination, not an assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


class RemoteError(Exception):
    pass


class Remote:
    """Parent side of a child kernel context (see the module comment)."""

    def __init__(self, proc: mp.process.BaseProcess, conn: Any) -> None:
        self.proc = proc
        self.conn = conn
        self.pid = -1
        self.ctx = -1

    def ready(self, timeout: float = 30.0) -> Remote:
        if not self.conn.poll(timeout):
            raise AssertionError("child did not start")
        tag, self.pid, self.ctx = self.conn.recv()
        assert tag == "ready"
        return self

    def send(self, *msg: Any) -> None:
        self.conn.send(msg)

    def done(self) -> bool:
        return self.conn.poll(0)

    def result(self, timeout: float = 10.0) -> tuple[Any, int, int]:
        """(value, t_before_ns, t_after_ns) of the oldest outstanding command."""
        if not self.conn.poll(timeout):
            raise AssertionError(f"child {self.pid} did not answer within {timeout}s")
        tag, value, t0, t1 = self.conn.recv()
        if tag == "err":
            raise RemoteError(value)
        return value, t0, t1

    def op(self, cls: str, idx: int, meth: str, **kw: Any) -> None:
        self.send("call", cls, idx, meth, kw)

    def call(self, cls: str, idx: int, meth: str, timeout: float = 10.0, **kw: Any) -> Any:
        self.op(cls, idx, meth, **kw)
        return self.result(timeout)

    def ask(self, what: str, timeout: float = 10.0) -> Any:
        self.send(what)
        return self.result(timeout)[0]


class Procs:
    """Processes started by one test; all SIGKILLed and reaped at teardown."""

    def __init__(self) -> None:
        self.started: list[mp.process.BaseProcess] = []

    def start(self, target: Callable, *args: Any, ctx: Any = SPAWN) -> mp.process.BaseProcess:
        p = ctx.Process(target=target, args=args, daemon=True)
        p.start()
        self.started.append(p)
        return p

    def remote(self, serve: Callable, desc: dict, actor: str) -> Remote:
        """Start a child running serve(desc, actor, conn); call .ready() on the result."""
        parent, child = SPAWN.Pipe()
        p = self.start(serve, desc, actor, child)
        child.close()
        return Remote(p, parent)

    def kill(self, p: mp.process.BaseProcess) -> None:
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.kill(p.pid, signal.SIGKILL)  # type: ignore[arg-type]
        p.join(10)

    def reap(self) -> None:
        for p in self.started:
            if p.is_alive():
                self.kill(p)
            p.join(5)


@pytest.fixture
def run_id() -> str:
    return "t" + secrets.token_hex(5)


@pytest.fixture
def procs(make_space: Callable[..., LockSpace], make_segment: Callable) -> Iterator[Procs]:
    """Depends on the file fixtures so that it is torn down first: children are dead
    before the files they use are removed."""
    ps = Procs()
    yield ps
    ps.reap()


@pytest.fixture(params=["word", "ofd"])
def lock_impl(request: pytest.FixtureRequest) -> str:
    """Every lock test runs on both lock implementations (shared_mem.locks)."""
    return request.param


@pytest.fixture
def make_space(run_id: str, lock_impl: str) -> Iterator[Callable[..., LockSpace]]:
    """Factory for LockSpaces of this test (closed and unlinked at teardown)."""
    made: list[LockSpace] = []

    def make(classes: list | None = None, max_contexts: int = 64) -> LockSpace:
        sp = LockSpace.create(
            f"{run_id}x{len(made)}", classes or CLASSES, max_contexts, impl=lock_impl
        )
        made.append(sp)
        return sp

    yield make
    for sp in made:
        sp.close()
        sp.unlink()
    left = [n for n in list_segments() if f"_{run_id}x" in n]
    assert not left, f"left behind in /dev/shm: {left}"


@pytest.fixture
def space(make_space: Callable[..., LockSpace]) -> LockSpace:
    return make_space()


@pytest.fixture
def make_segment(run_id: str) -> Iterator[Callable[[str, int], Segment]]:
    """Scratch shared segments (counters, flags) for a test, unlinked at teardown."""
    made: list[Segment] = []

    def make(what: str, size: int = 4096) -> Segment:
        seg = Segment.create(segment_name(run_id + "s", what), size)
        made.append(seg)
        return seg

    yield make
    for seg in made:
        seg.close()
        seg.unlink()
    left = [n for n in list_segments() if f"_{run_id}s_" in n]
    assert not left, f"left behind in /dev/shm: {left}"
