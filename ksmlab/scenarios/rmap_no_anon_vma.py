# rmap-no-anon-vma: seed 004, "ksm: hold anon_vma in rmap_item" (2009).
#
# Reclaim of a KSM page must unmap every pte that maps it. ksmd knows the ptes it
# merged (one rmap_item each), but fork copies a KSM pte into the child before ksmd
# has come round to give the child's page an rmap_item. Since seed 004 the rmap_item
# holds the anon_vma, and try_to_unmap_ksm walks every vma on it (search_new_forks),
# so the forked ptes are found; before it (--variant rmap-no-anon-vma) the walk only
# visits (item->mm, item->address) and the child's pte is left mapped.
#
# The workload: a parent whose pages are merged keeps forking children while a hog
# drives kswapd through the KSM pages, and ksmd scans slowly, so children live for a
# while with KSM ptes that have no rmap_item. Nothing targets a page or a moment: the
# rmap walk's completeness check (actors/kernel/debug.py) reports any pte a walk
# failed to visit, and the tasks' reads check every byte they get back.
#
#   ksmd                  parent                 child               kswapd
#   merge -> kpage
#                         fork()  -------------> maps kpage (no rmap_item yet)
#                                                                    try_to_unmap_ksm(kpage):
#                                                                      item->mm: unmapped
#                                                                      2009: child's pte missed
#                                                                      -> BUG: Bad page map
from __future__ import annotations

from typing import Any

from actors.cluster import Cluster, SyscallFailed
from ksmlab.races import Bound, duplicated_task
from ksmlab.scenario import ScenarioContext
from protocol.abi import PAGE_SIZE

NAME = "rmap-no-anon-vma"
DESCRIPTION = "seed 004: forks of a merged task while kswapd reclaims KSM pages; the variant misses forked ptes"
OPTIONS: dict[str, Any] = {"frames": 320, "swap_slots": 1024}
CONTENTS = 8        # distinct contents in the parent: that many KSM pages
COPIES = 8          # pages of each content


async def scenario(c: Cluster, ctx: ScenarioContext) -> dict:
    b = Bound.of(c, ctx, 30.0)
    await c.sysfs_write("sleep_millisecs", 0)
    parent, a, n = await duplicated_task(c, "parent", CONTENTS, COPIES, 0x40)
    await c.ksm_start()
    ctx.expect_counters("the parent's pages merged", pages_shared=CONTENTS, pages_sharing=CONTENTS * (COPIES - 1))
    # A slow ksmd: children keep their KSM ptes without rmap_items for a while.
    await c.sysfs_write("pages_to_scan", 16)
    await c.sysfs_write("sleep_millisecs", 200)
    rounds = 0
    hog_pages = c.opts.frames + 64
    while b.going(c):
        child = await parent.fork()
        hog = await c.spawn_task(comm="hog")
        try:
            h = await hog.mmap(hog_pages * PAGE_SIZE)
            await hog.memset(h, 1 + rounds % 250, hog_pages * PAGE_SIZE)   # kswapd reclaims
            await child.read(a, n)                                          # swap-ins, checked
            await parent.read(a, n)
        except SyscallFailed as e:
            ctx.log(f"round {rounds}: {e}")                                 # an OOM kill: go on
        for t in (hog, child):
            try:
                await t.exit()
            except SyscallFailed:
                pass
        rounds += 1
    ctx.log(f"{rounds} rounds of fork + reclaim")
    ctx.expect("reports", [r["title"] for r in c.reports], [])
    return {"rounds": rounds}
