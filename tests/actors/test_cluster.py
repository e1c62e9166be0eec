# A running cluster end to end: isolation of concurrent tasks while ksmd merges, KASAN
# reports for a freed mm across processes, and mmap_lock exclusion between actors.
from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest

from actors.cluster import SyscallFailed
from actors.log import read_events
from protocol.abi import MADV_MERGEABLE, PAGE_SIZE
from shared_mem.arena import UseAfterFree, fmt_handle, h_gen, h_index
from tests.helpers import wait_for

pytestmark = pytest.mark.asyncio

N_TASKS = 5
PAGES = 48
COMMON = 12          # pages 0..11: the same contents in every task
DUP = 2              # pages 12..13: one content twice within a task (unique to the task)
UNIQUE = PAGES - COMMON - DUP




class Model:
    """What one task wrote: the expected contents of its whole mapping."""

    def __init__(self, task: Any, base: int) -> None:
        self.t = task
        self.base = base
        self.mem = bytearray(PAGES * PAGE_SIZE)

    async def write(self, off: int, data: bytes) -> None:
        await self.t.write(self.base + off, data)
        self.mem[off:off + len(data)] = data

    async def check_range(self, off: int, length: int) -> None:
        got = await self.t.read(self.base + off, length)
        assert got == bytes(self.mem[off:off + length]), (
            f"task {self.t.pid} reads foreign or stale data at +{off:#x}")

    async def check_all(self, when: str) -> None:
        got = await self.t.read(self.base, PAGES * PAGE_SIZE)
        if got != bytes(self.mem):
            bad = next(i for i in range(len(got)) if got[i] != self.mem[i])
            raise AssertionError(f"{when}: task {self.t.pid} page {bad // PAGE_SIZE} offset "
                                 f"{bad % PAGE_SIZE}: read {got[bad]:#x}, wrote {self.mem[bad]:#x}")
        v = await self.t.verify()
        assert v == {"checked": PAGES, "bad": []}, f"{when}: task {self.t.pid} verify {v}"


async def check_everyone(models: list[Model], when: str) -> None:
    await asyncio.gather(*(m.check_all(when) for m in models))


@pytest.mark.timeout(90)
async def test_concurrent_tasks_never_see_each_others_data(cluster_factory):
    """Five tasks write and re-write their own pages concurrently while ksmd (run=1,
    sleep_millisecs=0, a large pages_to_scan) merges the pages they have in common; every
    task reads back exactly what it wrote (read and verify) before merging, during the
    re-writes, once merged (with the exact KSM counters), after COW writes into merged
    pages, and after run=2 unmerges everything."""
    rng = random.Random(20240601)
    c = await cluster_factory(frames=2048)
    await c.sysfs_write("pages_to_scan", 5000)
    await c.sysfs_write("sleep_millisecs", 0)
    await c.sysfs_write("smart_scan", 0)  # keep unique pages in the unstable tree: exact counters
    await c.sysfs_write("run", 1)
    tasks = await asyncio.gather(*(c.spawn_task(comm=f"iso{i}") for i in range(N_TASKS)))
    bases = await asyncio.gather(*(t.mmap(PAGES * PAGE_SIZE) for t in tasks))
    models = [Model(t, b) for t, b in zip(tasks, bases)]
    await asyncio.gather(*(t.madvise(b, PAGES * PAGE_SIZE, MADV_MERGEABLE)
                           for t, b in zip(tasks, bases)))
    common = [rng.randbytes(PAGE_SIZE) for _ in range(COMMON)]

    def initial(i: int) -> bytes:
        dup = rng.randbytes(PAGE_SIZE)
        return b"".join([*common, dup, dup, *(rng.randbytes(PAGE_SIZE) for _ in range(UNIQUE))])

    images = [initial(i) for i in range(N_TASKS)]

    async def first_fill(m: Model, image: bytes) -> None:
        # Chunks of 8 pages, each read back at once, while the other tasks do the same
        # and ksmd already scans what is there.
        for off in range(0, len(image), 8 * PAGE_SIZE):
            await m.write(off, image[off:off + 8 * PAGE_SIZE])
            await m.check_range(off, 8 * PAGE_SIZE)

    await asyncio.gather(*(first_fill(m, img) for m, img in zip(models, images)))
    await check_everyone(models, "after the first writes")

    async def rewrite_round(m: Model, r: random.Random) -> None:
        for _ in range(4):
            page = r.randrange(COMMON + DUP, PAGES)
            off = page * PAGE_SIZE + r.randrange(0, PAGE_SIZE - 64)
            data = r.randbytes(r.randrange(1, 64))
            await m.write(off, data)
            await m.check_range(page * PAGE_SIZE, PAGE_SIZE)
        # A store across a page boundary, between two unique pages.
        page = r.randrange(COMMON + DUP, PAGES - 1)
        await m.write(page * PAGE_SIZE + PAGE_SIZE - 5, r.randbytes(10))
        await m.check_range(page * PAGE_SIZE, 2 * PAGE_SIZE)
        # A whole unique page replaced.
        page = r.randrange(COMMON + DUP, PAGES)
        await m.write(page * PAGE_SIZE, r.randbytes(PAGE_SIZE))

    for rnd in range(5):  # interleaved with ksmd's scans and merges
        rngs = [random.Random(rng.random()) for _ in models]
        await asyncio.gather(*(rewrite_round(m, r) for m, r in zip(models, rngs)))
        await check_everyone(models, f"re-write round {rnd}")
        await c.wait_full_scans(1, timeout=30)

    # Quiescent: every page has kept its content for three full scans. Read the counters
    # with ksmd stopped, as LTP does: mid-visit, a unique page is out of the unstable tree
    # (pages_volatile) between remove_rmap_item_from_tree() and its re-insert.
    await c.wait_full_scans(3, timeout=30)
    await c.sysfs_write("run", 0)
    k = c.ksm_counters()
    await c.sysfs_write("run", 1)
    want = {"pages_shared": COMMON + N_TASKS, "pages_sharing": COMMON * (N_TASKS - 1) + N_TASKS,
            "pages_unshared": N_TASKS * UNIQUE, "pages_volatile": 0}
    assert {n: k[n] for n in want} == want
    maps = await asyncio.gather(*(t.pagemap(b, PAGES * PAGE_SIZE) for t, b in zip(tasks, bases)))
    for j in range(COMMON):
        assert len({pm[j] for pm in maps}) == 1, f"common page {j} is one KSM page in all tasks"
    assert len({pm[j] for pm in maps for j in range(COMMON)}) == COMMON
    for pm in maps:
        assert pm[COMMON] == pm[COMMON + 1], "the two equal pages of one task merged"
    await check_everyone(models, "merged")

    # COW: each task stores into a merged page (a common one and its own duplicate).
    async def cow(i: int, m: Model) -> None:
        await m.write((i % COMMON) * PAGE_SIZE + 100 * i, b"task %d was here" % i)
        await m.write(COMMON * PAGE_SIZE + 7, bytes([i]) * 9)
        await m.check_range(0, (COMMON + DUP) * PAGE_SIZE)

    await asyncio.gather(*(cow(i, m) for i, m in enumerate(models)))
    await check_everyone(models, "after COW writes into merged pages")
    after = await asyncio.gather(*(t.pagemap(b, PAGES * PAGE_SIZE) for t, b in zip(tasks, bases)))
    for i, pm in enumerate(after):
        j = i % COMMON
        assert pm[j] != maps[i][j], f"task {i} got a private copy of common page {j}"
        assert pm[COMMON] != pm[COMMON + 1]
    await c.wait_full_scans(1, timeout=30)
    await check_everyone(models, "a scan after COW")

    await c.ksm_stop()  # run=2
    k = c.ksm_counters()
    assert (k["pages_shared"], k["pages_sharing"], k["pages_unshared"]) == (0, 0, 0)
    frames = await asyncio.gather(*(t.pagemap(b, PAGES * PAGE_SIZE) for t, b in zip(tasks, bases)))
    flat = [f for pm in frames for f in pm]
    assert -1 not in flat and len(set(flat)) == len(flat), "after run=2 no frame is shared"
    await check_everyone(models, "after run=2")
    await asyncio.gather(*(t.exit() for t in tasks))
    assert c.reports == []


@pytest.mark.timeout(60)
async def test_freed_mm_used_by_another_process_is_a_kasan_report(cluster_factory):
    """An mm freed by the exit actor's process (task exit -> mmput -> __mmdrop) and then
    dereferenced by another process - the fault handler, and the supervisor - is reported
    as a KASAN use-after-free naming the freeing actor and its pid; the fault request
    fails with EFAULT and the fault handler keeps serving."""
    c = await cluster_factory(frames=256)
    t = await c.spawn_task()
    addr = await t.mmap(4 * PAGE_SIZE)
    await t.write(addr, b"soon gone")
    mm = int(c.km.task.mm[h_index(t.handle)])
    assert c.km.mm.valid(mm)
    await t.exit()
    assert not c.km.mm.valid(mm)
    exit_pid, fault_pid = c.procs["exit"].pid, c.procs["fault"].pid

    # Another actor process dereferences the stale handle.
    with pytest.raises(SyscallFailed) as ei:
        await c.request("fault", "fault", timeout=10, task=0, mm=mm, addr=addr, npages=1,
                        write=False)
    assert ei.value.errno == 14  # EFAULT
    assert "use-after-free" in str(ei.value)
    rep = await wait_for(lambda: next((r for r in c.reports_of("kasan")
                                       if r["data"]["actor"] == "fault"), None), 10,
                         "the fault handler's KASAN report")
    d = rep["data"]
    assert rep["title"] == "BUG: KASAN: use-after-free in do_user_addr_fault"
    assert d["cache"] == "mm" and d["handle"] == [h_index(mm), h_gen(mm)]
    assert d["pid"] == fault_pid
    assert (d["free"]["actor"], d["free"]["pid"], d["free"]["site"]) == ("exit", exit_pid, "__mmdrop")
    assert d["alloc"]["actor"] == "supervisor"  # spawn_task's mm_alloc
    assert f"Access to mm {fmt_handle(mm)} by task fault/{fault_pid}" in rep["text"]
    assert f"Freed by task exit/{exit_pid}:" in rep["text"]

    # The supervisor's own dereference is caught the same way.
    with pytest.raises(UseAfterFree) as ei2:
        c.km.mm.idx(mm, "test_deref")
    assert ei2.value.report["data"]["free"]["pid"] == exit_pid
    assert ei2.value.report in c.reports

    # The fault handler is still serving: a new task faults its pages in.
    t2 = await c.spawn_task()
    a2 = await t2.mmap(PAGE_SIZE)
    await t2.write(a2, b"still works")
    assert await t2.read(a2, 11) == b"still works"
    assert {r["kind"] for r in c.reports} == {"kasan"}
    await t2.exit()


def _fault_waiting_on(snap: list[dict], lock_idx: int) -> dict | None:
    for ctx in snap:
        w = ctx["waiting"]
        if (ctx["actor"].startswith("fault") and w and w["lock"] == "mmap_lock"
                and w["idx"] == lock_idx and w["mode"] == "read"):
            return ctx
    return None


@pytest.mark.timeout(60)
async def test_mmap_lock_held_for_write_excludes_a_fault_in_another_actor(cluster_factory):
    """While one actor (the supervisor's kernel context) holds a task's mmap_lock for write,
    the fault handler's mmap_read_lock for that task's page fault waits (lockdep's context
    table shows it waiting, the store does not complete) and proceeds only after up_write,
    as the merged event log shows; a read hold does not keep a fault out."""
    c = await cluster_factory(frames=256)
    t = await c.spawn_task()
    addr = await t.mmap(4 * PAGE_SIZE)
    mm = int(c.km.task.mm[h_index(t.handle)])
    lock_idx = h_index(mm)
    lock = c.k.mmap_lock(mm, "test")

    lock.down_write(site="test_holds_mmap_lock")
    released = None
    try:
        store = asyncio.ensure_future(t.write(addr, b"after up_write"))
        def fault_waiting() -> list[dict] | None:
            snap = c.locks.contexts_snapshot()
            return snap if _fault_waiting_on(snap, lock_idx) else None

        snap = await wait_for(fault_waiting, 15, "a fault waiting for mmap_lock")
        holder = [x for x in snap if any(h["lock"] == "mmap_lock" and h["idx"] == lock_idx
                                         for h in x["held"])]
        assert [(x["actor"], x["held"][0]["mode"], x["held"][0]["site"]) for x in holder] == [
            ("supervisor", "write", "test_holds_mmap_lock")]
        assert not store.done(), "the store completed while mmap_lock was held for write"
        released = time.monotonic_ns()
    finally:
        lock.up_write()
    await asyncio.wait_for(store, 15)
    assert await t.read(addr, 14) == b"after up_write"

    events = [e for e in read_events(c.run_dir)
              if e.get("actor") == "fault" and e.get("lock") == "mmap_lock"
              and e.get("idx") == lock_idx]
    contended = [e for e in events if e["event"] == "lock_contended"]
    acquired = [e for e in events if e["event"] == "lock_acquired"]
    assert contended and contended[0]["mode"] == "read" and contended[0]["ts_ns"] < released
    first = acquired[0]
    assert first["mode"] == "read" and first["wait_ns"] > 0
    assert first["ts_ns"] > released, "the fault got mmap_lock before up_write"

    # Readers share: a fault goes through while another context holds the lock for read.
    lock.down_read(site="test_reads")
    try:
        await asyncio.wait_for(t.write(addr + PAGE_SIZE, b"reader ok"), 15)
    finally:
        lock.up_read()
    assert await t.read(addr + PAGE_SIZE, 9) == b"reader ok"
    assert c.reports == []
    await t.exit()
