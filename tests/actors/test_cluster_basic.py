# The main path end to end: real actor processes, sockets and shared memory.
from __future__ import annotations

import pytest

from actors.log import KSM_PAGE_TRACEPOINTS, read_events
from protocol.abi import MADV_MERGEABLE, PAGE_SIZE

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(90)]


@pytest.mark.parametrize("tracepoints", [True, False])
async def test_two_tasks_merge_cow_and_unmerge(cluster_factory, tracepoints):
    """Identical pages of two tasks merge into one KSM page; a write COWs; run=2 unmerges.
    With the per-page KSM tracepoints off, the same happens and only they are not logged."""
    c = await cluster_factory(frames=1024, ksm_tracepoints=tracepoints)
    a, b = await c.spawn_task(), await c.spawn_task()
    n = 10 * PAGE_SIZE
    pa, pb = await a.mmap(n), await b.mmap(n)
    await a.memset(pa, ord("*"), n)
    await b.memset(pb, ord("*"), n)
    await a.madvise(pa, n, MADV_MERGEABLE)
    await b.madvise(pb, n, MADV_MERGEABLE)
    await c.sysfs_write("sleep_millisecs", 0)
    await c.ksm_start()
    k = c.ksm_counters()
    assert (k["pages_shared"], k["pages_sharing"], k["pages_unshared"]) == (1, 19, 0)
    frames = set(await a.pagemap(pa, n)) | set(await b.pagemap(pb, n))
    assert len(frames) == 1, "all 20 ptes map the one KSM page"
    await a.write(pa + 5, b"cow")
    assert await a.read(pa, 8) == b"*****cow"
    assert await b.read(pb, 8) == b"********"
    assert (await a.verify())["bad"] == [] and (await b.verify())["bad"] == []
    await c.ksm_stop()
    k = c.ksm_counters()
    assert (k["pages_shared"], k["pages_sharing"], k["full_scans"]) == (0, 0, 0)
    assert len(set(await a.pagemap(pa, n)) | set(await b.pagemap(pb, n))) == 20
    assert (await a.verify())["bad"] == [] and (await b.verify())["bad"] == []
    await a.exit()
    await b.exit()
    assert c.reports == []
    logged = {e["event"] for e in read_events(c.run_dir, trace=False)}
    assert "ksm_start_scan" in logged and "ksm_stop_scan" in logged
    if tracepoints:
        assert {"ksm_merge_one_page", "ksm_merge_with_ksm_page", "ksm_stable_tree_insert"} <= logged
    else:
        assert not logged & KSM_PAGE_TRACEPOINTS
