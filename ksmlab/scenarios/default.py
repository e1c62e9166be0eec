# The default scenario of ./run.sh: a small tour of KSM in the model.
#
# Four tasks map memory with duplicated, unique and zero pages and advise it
# MADV_MERGEABLE; ksmd merges by content; a write to a merged page takes a COW
# fault; a task forks and the child shares its parent's KSM pages; a task exits;
# run=2 unmerges everything. Every task checks that it reads back exactly what it
# wrote at each step: merging must be invisible.
from __future__ import annotations

from typing import Any

from actors.cluster import Cluster
from ksmlab.scenario import ScenarioContext
from ksmlab.workloads import content_counters
from protocol.abi import MADV_MERGEABLE, PAGE_SIZE

NAME = "default"
DESCRIPTION = "four tasks: merge duplicates, COW on write, fork, exit, run=2 unmerge"
OPTIONS: dict[str, Any] = {"frames": 4096}

PAGES = 256          # per task
DISTINCT = 32        # duplicated contents, present in every task
UNIQUE = 64          # per task
ZERO = PAGES - 2 * DISTINCT - UNIQUE


def page(content: int) -> bytes:
    return bytes([content & 0xFF]) * 8 + content.to_bytes(8, "little") * (PAGE_SIZE // 8 - 1)


async def _verify(tasks: list, ctx: ScenarioContext, when: str) -> None:
    for t in tasks:
        v = await t.verify()
        ctx.expect(f"{when}: task {t.pid} reads back what it wrote", v["bad"], [])


async def scenario(c: Cluster, ctx: ScenarioContext) -> dict:
    await c.sysfs_write("pages_to_scan", 1000)
    await c.sysfs_write("sleep_millisecs", 0)
    tasks = [await c.spawn_task(comm=f"demo{i}") for i in range(4)]
    bases = []
    for i, t in enumerate(tasks):
        base = await t.mmap(PAGES * PAGE_SIZE)
        data = b"".join(
            [page(1000 + d) * 2 for d in range(DISTINCT)]            # 2 copies of each, per task
            + [page(10_000 * (i + 1) + u) for u in range(UNIQUE)]   # unique to this task
        )
        await t.write(base, data)
        await t.memset(base + len(data), 0, ZERO * PAGE_SIZE)        # zero pages, really written
        await t.madvise(base, PAGES * PAGE_SIZE, MADV_MERGEABLE)
        bases.append(base)
    await c.ksm_start()
    # Read the counters with ksmd stopped, as LTP does: a unique page in the middle of
    # its visit is briefly out of the unstable tree (pages_volatile, not unshared).
    await c.sysfs_write("run", 0)
    merged = ctx.snapshot()
    ctx.log(f"merged: shared {merged['pages_shared']} sharing {merged['pages_sharing']} "
            f"unshared {merged['pages_unshared']}")
    # 32 contents x 8 copies merge; the 512 zero pages need two KSM pages (a chain of
    # two dups) because max_page_sharing is 256; unique pages stay unshared.
    dup_sh, dup_shg, _ = content_counters(8, 256)
    z_sh, z_shg, _ = content_counters(4 * ZERO, 256)
    ctx.expect_counters("after two full scans", pages_shared=DISTINCT * dup_sh + z_sh,
                        pages_sharing=DISTINCT * dup_shg + z_shg, pages_unshared=4 * UNIQUE,
                        stable_node_chains=1, stable_node_dups=2)
    await c.sysfs_write("run", 1)
    await _verify(tasks, ctx, "merged")

    # A store into a merged page: do_wp_page copies it for the writer only.
    await tasks[0].write(bases[0], b"written after merge")
    await _verify(tasks, ctx, "after COW")

    # fork (ksmd paused, so it cannot visit the child yet): the child maps the same
    # KSM pages, but its KSM counters start at zero.
    await c.sysfs_write("run", 0)
    child = await tasks[1].fork()
    ctx.expect("child ksm_merging_pages after fork", await child.ksm_merging_pages(), 0)
    await c.sysfs_write("run", 1)
    await child.write(bases[1] + PAGE_SIZE, b"child")
    await _verify([*tasks, child], ctx, "after fork")

    await tasks[3].exit()
    await c.wait_full_scans(2)
    await _verify([*tasks[:3], child], ctx, "after exit")
    before_unmerge = ctx.snapshot()

    await c.ksm_stop()
    ctx.expect_counters("after run=2", pages_shared=0, pages_sharing=0, pages_unshared=0, full_scans=0)
    await _verify([*tasks[:3], child], ctx, "after unmerge")
    return {"merged": merged, "before_unmerge": before_unmerge}
