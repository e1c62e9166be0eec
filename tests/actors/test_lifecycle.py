# Lifecycles under pressure: fork, exit during scans, mlock, OOM during run=2, swap.
from __future__ import annotations

import asyncio
import errno

import pytest

from actors.kernel import mm_slot
from ksmlab.races import mergeable_task
from protocol.abi import (
    MCL_CURRENT,
    MCL_FUTURE,
    PAGE_SIZE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
)
from shared_mem.layout import PG_FREE
from tests.helpers import ksm_page_then_fork

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]


async def _merged_task(c, npages: int, byte: int = ord("x")):
    return await mergeable_task(c, "task", npages, byte)


async def test_fork_then_write_keeps_both_views(cluster_factory):
    """After fork, parent and child share pages copy-on-write; each sees only its own stores."""
    c = await cluster_factory(frames=512)
    p = await c.spawn_task()
    n = 8 * PAGE_SIZE
    a = await p.mmap(n)
    await p.write(a, bytes(range(256)) * (n // 256))
    child = await p.fork()
    assert await child.pagemap(a, n) == await p.pagemap(a, n), "the child maps the parent's frames"
    await p.write(a + 10, b"parent")
    await child.write(a + 10, b"child!")
    await child.write(a + 5 * PAGE_SIZE, b"only the child")
    assert await p.read(a + 10, 6) == b"parent"
    assert await child.read(a + 10, 6) == b"child!"
    assert await p.read(a + 5 * PAGE_SIZE, 4) == bytes(range(4))
    assert (await p.verify())["bad"] == [] and (await child.verify())["bad"] == []
    shared = sum(x == y for x, y in zip(await p.pagemap(a, n), await child.pagemap(a, n)))
    assert shared == 6, "the two pages written after fork were copied, the other six still shared"
    assert c.check_invariants() == []


async def test_forked_child_maps_ksm_page_and_counters_start_at_zero(cluster_factory):
    """A child forked after merging maps the KSM page but its ksm_merging_pages is 0."""
    c = await cluster_factory(frames=512)
    await c.sysfs_write("sleep_millisecs", 0)
    t, a, n = await _merged_task(c, 16)
    await c.ksm_start()
    await c.sysfs_write("run", 0)
    assert await t.ksm_merging_pages() == 16   # every rmap_item on a stable node counts
    child = await t.fork()
    assert set(await child.pagemap(a, n)) == set(await t.pagemap(a, n)) and len(set(await t.pagemap(a, n))) == 1
    assert await child.ksm_merging_pages() == 0
    assert (await child.ksm_stat())["ksm_rmap_items"] == 0
    await c.sysfs_write("run", 1)
    await c.wait_full_scans(2)
    # ksmd visited the child: its ptes are appended to the same KSM page (fork bypass).
    assert await child.ksm_merging_pages() == 16
    assert c.check_invariants() == []


async def test_try_to_unmap_ksm_finds_forked_child_and_swapin_gives_same_bytes(cluster_factory):
    """Seed 004: reclaiming a KSM page unmaps the forked child's pte too (search_new_forks).

        ksmd                         parent                   child            kswapd
        merge 4 pages -> kpage
                                     fork() (run=0: ksmd has
                                     not seen the child)      maps kpage x4
                                                                               try_to_unmap_ksm(kpage):
                                                                                 own mm: 4 ptes
                                                                                 new forks: 4 ptes
                                                                               page freed to swap
        both read their 4 pages back from swap: same bytes
    """
    c = await cluster_factory(frames=256, swap_slots=64)
    t, child, a, n, kpfn = await ksm_page_then_fork(c)
    assert await child.pagemap(a, n) == [kpfn] * 4
    r = await c.reclaim(pfns=[kpfn], force=True)
    assert r["results"][str(kpfn)] == "freed"
    assert await t.pagemap(a, n) == [-1] * 4 and await child.pagemap(a, n) == [-1] * 4
    assert c.km.page["flags"][kpfn] & PG_FREE or c.km.page["mapcount"][kpfn] == 0
    assert await child.read(a, n) == b"x" * n
    assert await t.read(a, n) == b"x" * n
    assert (await t.verify())["bad"] == [] and (await child.verify())["bad"] == []
    assert c.check_invariants() == []


async def test_rmap_no_anon_vma_variant_leaves_forked_child_mapped(cluster_factory):
    """With seed 004 reverted the walk only visits item->mm: the child's ptes stay mapped."""
    c = await cluster_factory(frames=256, swap_slots=64, variants=("rmap-no-anon-vma",))
    t, child, a, n, kpfn = await ksm_page_then_fork(c)
    r = await c.reclaim(pfns=[kpfn], force=True)
    assert r["results"][str(kpfn)] == "still_mapped"
    assert await child.pagemap(a, n) == [kpfn] * 4, "the forked child's ptes were missed"
    assert await t.read(a, n) == b"x" * n and await child.read(a, n) == b"x" * n
    assert (await t.verify())["bad"] == [] and (await child.verify())["bad"] == []


async def test_exits_during_scans_free_every_mm_exactly_once(cluster_factory):
    """Tasks exit while ksmd scans at full speed: every mm, slot, rmap_item and frame is freed."""
    c = await cluster_factory(frames=2048, trace_locks=False)
    await c.sysfs_write("sleep_millisecs", 0)
    await c.sysfs_write("pages_to_scan", 7)   # small batches: exits land mid-scan
    tasks = []
    for i in range(6):
        t, _a, _n = await _merged_task(c, 48, byte=i % 3)
        tasks.append(t)
    await c.sysfs_write("run", 1)
    await c.wait_full_scans(2)
    await asyncio.gather(*(t.exit() for t in tasks))
    await c.wait_for(lambda: mm_slot.list_empty(c.k), 30, "ksmd to reap the exiting mms")
    await c.wait_for(lambda: c.km.mm.nr_live() == 0, 30, "every mm freed")
    assert c.check_leaks() == []
    assert c.ksm_counters()["pages_shared"] == 0 and c.k.ksm["rmap_items"] == 0
    assert c.reports == [], [r["title"] for r in c.reports]


@pytest.mark.parametrize("writer_is_task", [True, False])
async def test_oom_kill_during_run2_completes_and_frees_the_victim(cluster_factory, writer_is_task):
    """run=2 needs more frames than are free; the OOM killer kills and the run goes on.

    With the writer as a task it is the OOM origin and dies itself (run=2 then fails
    with ENOMEM and run is 0); otherwise the largest task (the hog) dies and run=2
    completes. No deadlock either way, and the victim's frames return to the pool.
    """
    c = await cluster_factory(frames=600, oom_reaper_delay=0.05)
    await c.sysfs_write("sleep_millisecs", 0)
    merger, _a, _n = await _merged_task(c, 256)
    await c.ksm_start()
    await c.sysfs_write("run", 0)
    hog = await c.spawn_task(comm="hog")
    nb = 500 * PAGE_SIZE
    b = await hog.mmap(nb)
    await hog.memset(b, 1, nb)
    victim, other = (merger, hog) if writer_is_task else (hog, merger)
    vmm = int(c.km.task.mm[victim.handle & 0xFFFFFFFF])
    free_before = c.nr_free_frames()
    if writer_is_task:
        with pytest.raises(OSError) as e:
            await c.sysfs_write("run", 2, task=merger)
        assert e.value.errno == errno.ENOMEM
        assert c.sysfs_read("run") == "0"
    else:
        await c.sysfs_write("run", 2)
        assert c.ksm_counters()["pages_shared"] == 0
    assert (await victim.wait_exit(20))["reason"] == "killed"
    mmi = vmm & 0xFFFFFFFF
    await c.wait_for(lambda: not c.km.mm.valid(vmm) or (c.km.mm.users[mmi] == 0 and c.km.mm.rss_anon[mmi] == 0
                                                        and c.km.mm.pgtables[mmi] == 0),
                     20, "the victim's address space torn down")
    assert (await other.verify())["bad"] == []
    # Every frame in use is mapped by a live task (no page of the victim is left over).
    assert c.check_invariants() == []
    if writer_is_task:
        assert c.nr_free_frames() >= free_before, "the victim's frames are back"
    await other.exit()
    assert [r["kind"] for r in c.reports] == []


async def test_mlockall_with_prot_none_area_exits(cluster_factory):
    """mlockall(MCL_CURRENT|MCL_FUTURE) with a PROT_NONE area: exit munlocks without hanging."""
    c = await cluster_factory(frames=512)
    t = await c.spawn_task()
    a = await t.mmap(8 * PAGE_SIZE)
    b = await t.mmap(8 * PAGE_SIZE, PROT_NONE)
    await t.memset(a, 7, 8 * PAGE_SIZE)
    await t.mlockall(MCL_CURRENT | MCL_FUTURE)
    m = await t.mmap(4 * PAGE_SIZE, PROT_READ | PROT_WRITE)   # MCL_FUTURE: populated at mmap
    assert -1 not in await t.pagemap(m, 4 * PAGE_SIZE)
    assert await t.pagemap(b, 8 * PAGE_SIZE) == [-1] * 8
    await asyncio.wait_for(t.exit(), 10)
    await c.wait_for(lambda: c.km.mm.nr_live() == 0, 10, "the mm freed")
    assert c.check_leaks() == []


async def test_swap_under_pressure_keeps_contents(cluster_factory):
    """More anonymous memory than frames: kswapd and direct reclaim swap, faults swap back in."""
    c = await cluster_factory(frames=160, swap_slots=512, trace_locks=False)
    tasks = [await c.spawn_task() for _ in range(3)]
    n = 96 * PAGE_SIZE
    addrs = []
    for i, t in enumerate(tasks):
        a = await t.mmap(n)
        await t.write(a, bytes((i * 7 + j) & 0xFF for j in range(256)) * (n // 256))
        addrs.append(a)
    for t, a in zip(tasks, addrs):
        assert (await t.verify())["bad"] == []
        await t.read(a, n)
    swapped = int((c.km.swap_map != 0).sum())
    assert swapped > 0, "nothing was swapped out"
    assert c.check_invariants() == []
    for t in tasks:
        await t.exit()
    assert c.check_leaks() == []
    assert int((c.km.swap_map != 0).sum()) == 0, "every swap slot freed"
