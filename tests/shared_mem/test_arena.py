# shared_mem.arena: slab caches of kernel objects with (index, generation) handles and
# KASAN-style use-after-free / double-free detection, in one process and across processes.
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest

from shared_mem.arena import (
    NULL,
    POISON_FREE,
    BadFree,
    OutOfObjects,
    UseAfterFree,
    fmt_handle,
    h_gen,
    h_index,
    pack,
)
from shared_mem.layout import Geometry, KernelMemory
from shared_mem.segment import list_segments

pytestmark = pytest.mark.timeout(30)

GEO = Geometry(nr_frames=16, max_tasks=4, max_mms=4, max_vmas=16, max_anon_vmas=16, va_pages=512)


@pytest.fixture
def km() -> Iterator[KernelMemory]:
    """A fresh run's kernel memory in this process; closed and unlinked at teardown, with
    nothing of the run left in /dev/shm."""
    run_id = "t" + secrets.token_hex(5)
    km = KernelMemory.create(GEO, run_id)
    yield km
    km.close()
    km.unlink()
    assert list_segments(run_id) == []


def _record_bytes(arena, i: int) -> bytes:
    return arena.rec[i : i + 1].view(np.uint8).tobytes()


def test_handles_pack_index_and_generation():
    """A handle is (generation << 32) | index; NULL is 0 and prints as NULL."""
    h = pack(7, 3)
    assert (h_index(h), h_gen(h)) == (3, 7)
    assert fmt_handle(h) == "3#7"
    assert fmt_handle(NULL) == "NULL"


def test_alloc_gives_live_zeroed_record_with_provenance(km):
    """alloc() returns a handle with an odd (live) generation to a zeroed record and records
    who allocated it (actor, pid, call site)."""
    mm = km.mm
    assert mm.nr_live() == 0
    assert _record_bytes(mm, 0) == bytes([POISON_FREE]) * mm.rec.dtype.itemsize  # formatted free
    km.set_actor("allocator")
    h = mm.alloc(site="mm_alloc")
    i = h_index(h)
    assert h_gen(h) % 2 == 1
    assert mm.idx(h) == i and mm.valid(h)
    assert mm.nr_live() == 1 and list(mm.live_indices()) == [i]
    assert mm.handle_of(i) == h
    assert _record_bytes(mm, i) == bytes(mm.rec.dtype.itemsize)
    m = mm.meta[i]
    assert (m["alloc_actor"], m["alloc_site"], int(m["alloc_pid"])) == (b"allocator", b"mm_alloc",
                                                                         os.getpid())


def test_a_record_is_zeroed_before_it_becomes_live(km):
    """Another process walking the live records (an invariant check) must never see a
    record that is live but still holds the free poison of its last life: alloc() zeroes
    the record and writes its provenance before it publishes the generation. A stress
    campaign's run=2 check once read ksm_zero_pages 0x6b6b6b6b6b6b6b6b of an mm that a
    fork was allocating."""
    mm = km.mm
    old = mm.alloc(site="first")
    mm.free(old, site="first")                 # its slot is poisoned and back on the free stack
    seen: list[tuple[list[int], bytes]] = []
    real = mm.pid_of

    def pid_of() -> int:                        # called while the new record is being made
        seen.append((list(mm.live_indices()), _record_bytes(mm, h_index(old))))
        return real()

    mm.pid_of = pid_of
    h = mm.alloc(site="second")
    mm.pid_of = real
    assert h_index(h) == h_index(old)
    live_then, bytes_then = seen[0]
    assert h_index(h) not in live_then, "the record was live before it was made"
    assert bytes_then == bytes(mm.rec.dtype.itemsize)
    assert mm.valid(h) and list(mm.live_indices()) == [h_index(h)]


def test_use_after_free_is_reported_like_kasan(km):
    """Dereferencing a freed handle raises UseAfterFree with a KASAN-shaped report naming the
    cache, the handle as index#generation, and who allocated and who freed the object; the
    freed record is poisoned with 0x6b and the report also goes to the on_report hook."""
    seen: list[dict] = []
    mm = km.mm
    km.set_actor("task-100")
    h = mm.alloc(site="mm_alloc")
    i = h_index(h)
    mm.users[i] = 1
    mm.flags[i] = 0x1234
    km.set_actor("exit", on_report=seen.append)
    mm.free(h, site="__mmdrop")
    assert _record_bytes(mm, i) == bytes([POISON_FREE]) * mm.rec.dtype.itemsize
    assert int(mm.users[i]) == int.from_bytes(bytes([POISON_FREE]) * 8, "little", signed=True)
    assert not mm.valid(h) and h_gen(mm.handle_of(i)) == h_gen(h) + 1  # even: free
    assert mm.nr_live() == 0

    km.set_actor("ksmd", on_report=seen.append)
    with pytest.raises(UseAfterFree) as ei:
        mm.idx(h, "scan_get_next_rmap_item")
    rep = ei.value.report
    assert rep["kind"] == "kasan"
    assert rep["title"] == "BUG: KASAN: use-after-free in scan_get_next_rmap_item"
    assert str(ei.value) == rep["title"]
    text = rep["text"]
    pid = os.getpid()
    assert f"Access to mm {i}#{h_gen(h)} by task ksmd/{pid}" in text
    assert f"Allocated by task task-100/{pid}:\n mm_alloc at " in text
    assert f"Freed by task exit/{pid}:\n __mmdrop at " in text
    assert f"now generation {h_gen(h) + 1} (free)" in text
    d = rep["data"]
    assert d["cache"] == "mm" and d["handle"] == [i, h_gen(h)] and d["actor"] == "ksmd"
    assert (d["alloc"]["actor"], d["alloc"]["pid"], d["alloc"]["site"]) == ("task-100", pid, "mm_alloc")
    assert (d["free"]["actor"], d["free"]["pid"], d["free"]["site"]) == ("exit", pid, "__mmdrop")
    assert d["alloc"]["ns"] <= d["free"]["ns"]
    assert seen == [rep]


def test_double_and_invalid_free_raise_bad_free(km):
    """Freeing a handle twice raises BadFree (double-free, naming who freed it first); a
    handle whose index is outside the cache is an invalid-free; the cache is unharmed."""
    va = km.vma
    km.set_actor("task-1")
    h = va.alloc(site="vma_new")
    va.free(h, site="vma_remove")
    live_before = va.nr_live()
    with pytest.raises(BadFree) as ei:
        va.free(h, site="remove_vma_again")
    rep = ei.value.report
    assert rep["title"] == "BUG: KASAN: double-free in remove_vma_again"
    assert rep["data"]["free"]["site"] == "vma_remove"
    assert f"Access to vma {fmt_handle(h)}" in rep["text"]
    assert va.nr_live() == live_before
    with pytest.raises(BadFree) as ei:
        va.free(pack(1, va.capacity + 5), site="bogus")
    assert ei.value.report["title"] == "BUG: KASAN: invalid-free in bogus"
    # The free list is intact: every object can still be allocated exactly once.
    hs = [va.alloc() for _ in range(va.capacity)]
    assert len({h_index(x) for x in hs}) == va.capacity
    with pytest.raises(OutOfObjects):
        va.alloc()


def test_null_dereference_is_reported(km):
    """idx(NULL) is a NULL pointer dereference report, not a use-after-free."""
    with pytest.raises(UseAfterFree) as ei:
        km.task.idx(NULL, "do_exit")
    assert ei.value.report["kind"] == "null-ptr-deref"
    assert ei.value.report["title"] == "BUG: kernel NULL pointer dereference, task in do_exit"


def test_handle_made_from_a_freed_slot_names_nothing(km):
    """An observer that took a slot from live_indices() and made its handle after the
    record was freed (handle_of() racing free) holds the freed, even generation: such a
    handle is never valid, peek() gives None rather than the free poison, idx() reports a
    use-after-free and free() an invalid free. CI met the poison as an mm's mm_users when
    run=2's completion check raced the exit that freed the mm."""
    mm = km.mm
    h = mm.alloc(site="mm_alloc")
    i = h_index(h)
    assert int(i) in {int(x) for x in mm.live_indices()}
    mm.free(h, site="__mmdrop")
    late = mm.handle_of(i)
    assert h_gen(late) % 2 == 0 and late != h
    assert not mm.valid(late)
    assert not mm.valid_many(np.array([late, h], dtype=np.int64)).any()
    assert mm.peek(late, "users") is None
    with pytest.raises(UseAfterFree) as ei:
        mm.idx(late, "check_unmerged")
    assert ei.value.report["title"].startswith("BUG: KASAN: use-after-free in check_unmerged")
    with pytest.raises(BadFree):
        mm.free(late, site="again")
    assert int(mm.rec["users"][i]) != 0            # what peek() would have returned: poison


def test_reused_slot_gets_new_generation_and_old_handle_stays_invalid(km):
    """When a freed slot is allocated again the new object has a new (higher, odd)
    generation: the new handle is valid, the old one still faults, and the report says
    the slot is live again (reused)."""
    t = km.task
    km.set_actor("supervisor")
    old = t.alloc(site="spawn_task")
    t.free(old, site="release_task")
    new = t.alloc(site="copy_process")
    assert h_index(new) == h_index(old)  # the slab hands back the slot just freed
    assert h_gen(new) == h_gen(old) + 2 and h_gen(new) % 2 == 1
    assert t.valid(new) and not t.valid(old)
    assert t.idx(new) == h_index(new)
    t.pid[h_index(new)] = 4242
    with pytest.raises(UseAfterFree) as ei:
        t.idx(old, "find_task_by_vpid")
    rep = ei.value.report
    assert f"now generation {h_gen(new)} (live, reused)" in rep["text"]
    assert rep["data"]["gen_now"] == h_gen(new)
    assert rep["data"]["alloc"]["site"] == "copy_process"  # the slot's current owner
    assert rep["data"]["free"]["site"] == "release_task"
    # Several rounds: every generation is distinct and only the newest handle is valid.
    handles = [new]
    for _ in range(3):
        t.free(handles[-1])
        handles.append(t.alloc())
    assert len({h_gen(x) for x in handles}) == len(handles)
    assert [t.valid(x) for x in handles] == [False] * 3 + [True]


def test_alloc_many_gives_what_as_many_allocs_would_and_stops_where_they_would_fail(km):
    """alloc_many(n) under one lock: the records n alloc() calls would pop, in the order
    they would pop them (the free stack from its top), each live, zeroed and with its
    provenance; when the cache holds fewer, exactly those, and the arena is then empty as
    after alloc()'s OutOfObjects."""
    a = km.vma
    free = [a.alloc() for _ in range(5)]
    for h in free[::2]:
        a.free(h)                        # a free stack with holes: the order matters
    top, live, total = (int(x) for x in a.hdr[:3])
    stack = a.free_stack.copy()
    km.set_actor("ksmd")
    hs = a.alloc_many(4, site="alloc_rmap_item")
    assert hs.dtype == np.int64 and len(hs) == 4
    want = [int(i) for i in stack[top - 4:top][::-1]]
    assert [h_index(int(h)) for h in hs] == want
    assert all(a.valid(int(h)) and h_gen(int(h)) % 2 == 1 for h in hs)
    assert [int(x) for x in a.hdr[:3]] == [top - 4, live + 4, total + 4]
    for h in hs:
        i = h_index(int(h))
        assert _record_bytes(a, i) == bytes(a.rec.dtype.itemsize)
        assert (a.meta[i]["alloc_actor"], a.meta[i]["alloc_site"]) == (b"ksmd", b"alloc_rmap_item")
    assert len(a.alloc_many(0)) == 0 and int(a.hdr[0]) == top - 4
    rest = a.alloc_many(a.capacity)      # more than there is: what is left, no exception
    assert len(rest) == top - 4 and int(a.hdr[0]) == 0
    assert len(a.alloc_many(3)) == 0
    with pytest.raises(OutOfObjects):
        a.alloc()
    a.free(int(rest[0]))
    assert a.alloc_many(2).tolist() == [pack(h_gen(int(rest[0])) + 2, h_index(int(rest[0])))]


_CHILD = """
import json, os, sys
from shared_mem.layout import KernelMemory
desc, handle = json.loads(sys.argv[1]), int(sys.argv[2])
km = KernelMemory.attach(desc)
km.set_actor("oom_reaper")
km.mm.free(handle, site="oom_reap_task:mmdrop")
print(os.getpid(), flush=True)
km.close()
"""


def test_use_after_free_across_processes_names_the_freeing_process(km):
    """A handle freed by another process (attached to the same shared memory) is caught at
    this process's dereference, and the report names the freeing process's actor and pid
    and this process as the one that allocated and now used it."""
    km.set_actor("task-7")
    h = km.mm.alloc(site="mm_alloc")
    r = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(km.descriptor()), str(h)],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    child_pid = int(r.stdout.strip())
    assert child_pid != os.getpid()
    assert not km.mm.valid(h)
    assert _record_bytes(km.mm, h_index(h)) == bytes([POISON_FREE]) * km.mm.rec.dtype.itemsize
    km.set_actor("ksmd")
    with pytest.raises(UseAfterFree) as ei:
        km.mm.idx(h, "ksm_test_exit")
    rep = ei.value.report
    assert f"Freed by task oom_reaper/{child_pid}:\n oom_reap_task:mmdrop" in rep["text"]
    assert f"Allocated by task task-7/{os.getpid()}:" in rep["text"]
    assert f"by task ksmd/{os.getpid()}" in rep["text"]
    assert rep["data"]["free"] == {**rep["data"]["free"], "actor": "oom_reaper", "pid": child_pid}
    # ... and a double free from this side names the other process too.
    with pytest.raises(BadFree) as ei:
        km.mm.free(h, site="__mmdrop")
    assert ei.value.report["data"]["free"]["pid"] == child_pid
