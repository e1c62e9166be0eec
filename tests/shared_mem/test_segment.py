# shared_mem.segment: named /dev/shm segments, their sweeping and listing.
from __future__ import annotations

import mmap
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from shared_mem.segment import (
    SHM_DIR,
    Segment,
    list_segments,
    pid_alive,
    segment_name,
    sweep_stale,
)

pytestmark = pytest.mark.timeout(30)


def _new_run_id() -> str:
    return "t" + secrets.token_hex(5)


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(timeout=20)
    assert not pid_alive(p.pid)
    return p.pid


@pytest.fixture
def segs() -> Iterator[Callable[..., Segment]]:
    """Factory of segments for one test; all closed and unlinked at teardown, and the
    test's run ids must have nothing left in /dev/shm afterwards."""
    made: list[Segment] = []
    run_ids: set[str] = set()

    def make(run_id: str, what: str, size: int = 4096, owner_pid: int | None = None) -> Segment:
        run_ids.add(run_id)
        seg = Segment.create(segment_name(run_id, what, owner_pid), size)
        made.append(seg)
        return seg

    yield make
    for seg in made:
        seg.close()
        seg.unlink()
    for rid in run_ids:
        assert list_segments(rid) == [], f"left behind in /dev/shm for run {rid}"


def test_create_attach_share_and_unlink(segs):
    """A created segment is a /dev/shm file of at least one page; an attach maps the same
    bytes (a store through one mapping is seen through the other); unlink removes it."""
    rid = _new_run_id()
    seg = segs(rid, "data", 100)
    assert seg.owner and seg.size == mmap.PAGESIZE  # rounded up to a page
    assert seg.name == f"ksmlab_{os.getpid()}_{rid}_data"
    assert os.path.exists(seg.path) and seg.path == os.path.join(SHM_DIR, seg.name)
    assert oct(os.stat(seg.path).st_mode & 0o777) == oct(0o600)

    other = Segment.attach(seg.name)
    try:
        assert not other.owner and other.size == seg.size
        seg.buf[0:5] = b"hello"
        assert bytes(other.buf[0:5]) == b"hello"
        other.buf[100] = 0x7F
        assert seg.buf[100] == 0x7F
    finally:
        other.close()
    seg.unlink()
    assert not os.path.exists(seg.path)
    with pytest.raises(FileNotFoundError):
        Segment.attach(seg.name)
    seg.unlink()  # unlinking twice is harmless


def test_create_is_exclusive_and_attach_needs_existing(segs):
    """Creating a name that exists fails (O_EXCL), so two runs never share a segment by
    accident; attaching to a name that does not exist fails with FileNotFoundError."""
    rid = _new_run_id()
    seg = segs(rid, "excl")
    with pytest.raises(FileExistsError):
        Segment.create(seg.name, 4096)
    with pytest.raises(FileNotFoundError):
        Segment.attach(segment_name(rid, "missing"))
    assert list_segments(rid) == [seg.name]


def test_close_with_live_numpy_view_does_not_raise(segs):
    """close() while a numpy view still exports the buffer keeps the mapping instead of
    raising BufferError (it goes away with the process)."""
    seg = segs(_new_run_id(), "view")
    view = np.frombuffer(seg.buf, dtype=np.uint8)
    view[0] = 42
    seg.close()
    assert view[0] == 42
    del view


def test_list_segments_by_run_id(segs):
    """list_segments(run_id) returns exactly that run's segments, sorted; without a run id
    it includes every run's; files not named like ours are ignored."""
    a, b = _new_run_id(), _new_run_id()
    sa = [segs(a, w) for w in ("kernel", "frames")]
    sb = segs(b, "kernel")
    assert list_segments(a) == sorted(s.name for s in sa)
    assert list_segments(b) == [sb.name]
    everything = list_segments()
    assert {s.name for s in [*sa, sb]} <= set(everything)
    assert list_segments(_new_run_id()) == []
    stray = os.path.join(SHM_DIR, f"ksmlabX_{a}_not_ours")
    with open(stray, "wb"):
        pass
    try:
        assert list_segments(a) == sorted(s.name for s in sa)
    finally:
        os.unlink(stray)


def test_sweep_stale_removes_only_dead_owners(segs, dead_pid):
    """sweep_stale() removes the segments whose owner (supervisor) pid is dead and leaves
    those of live owners alone; dry_run only reports."""
    live_run, dead_run = _new_run_id(), _new_run_id()
    live = [segs(live_run, w) for w in ("kernel", "frames")]
    dead = [segs(dead_run, w, owner_pid=dead_pid) for w in ("kernel", "frames")]
    dead_names = sorted(s.name for s in dead)
    for s in dead:
        assert s.name.startswith(f"ksmlab_{dead_pid}_{dead_run}_")

    would = sweep_stale(dry_run=True)
    assert set(dead_names) <= set(would)
    assert not {s.name for s in live} & set(would)
    assert list_segments(dead_run) == dead_names  # dry run removed nothing

    removed = sweep_stale()
    assert set(dead_names) <= set(removed)
    assert not {s.name for s in live} & set(removed)
    assert list_segments(dead_run) == []
    assert list_segments(live_run) == sorted(s.name for s in live)
    for s in live:  # still usable
        s.buf[0] = 1


def test_sweep_stale_by_run_id_removes_that_run_even_if_owner_alive(segs):
    """sweep_stale(run_id) removes every segment of that run (the supervisor's own clean-up
    at stop) and nothing of any other run."""
    mine, other = _new_run_id(), _new_run_id()
    names = sorted(segs(mine, w).name for w in ("kernel", "frames", "lockstate"))
    keep = segs(other, "kernel")
    assert sorted(sweep_stale(mine, dry_run=True)) == names
    assert list_segments(mine) == names
    assert sorted(sweep_stale(mine)) == names
    assert list_segments(mine) == []
    assert list_segments(other) == [keep.name]
    assert sweep_stale(mine) == []


def test_pid_alive():
    """pid_alive: our own pid is alive; a reaped child's pid is not."""
    assert pid_alive(os.getpid())
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(timeout=20)
    assert not pid_alive(p.pid)
