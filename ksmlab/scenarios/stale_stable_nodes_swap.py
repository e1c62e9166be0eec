# stale-stable-nodes-swap: seed 002 causes 1 and 3, the swap cache under run=2 (2013).
#
# A stable node lingers until ksm_get_folio() finds that its page no longer points
# back to it, but a KSM page in the swap cache still does: while some of its ptes are
# swap entries, the page stays in the cache, PageKsm, with its stable node. So:
#
#   cause 1: run=2 removes every rmap_item, yet the node of a swap-cached KSM page
#            survives in the stable tree unless remove_all_stable_nodes() sweeps it
#            (--variant stale-stable-nodes:old-nodes); a merge_across_nodes switch
#            then looks it up in a tree built the other way;
#   cause 3: a swap-in fault just after the unmerger passed the mm maps the KSM page
#            again, unless ksm_might_need_to_copy() copies while run is
#            KSM_RUN_UNMERGE (--variant stale-stable-nodes:swapin-no-copy).
#
# The workload: a task's pages merge; a hog drives kswapd to swap the KSM pages out
# while the task keeps touching its pages (a fault that comes while a written KSM page
# still sits in the swap cache maps that page again, its other ptes still swap
# entries); then run=2, while the task reads its whole area back.
# Round after round for `--arg seconds=N`; the seed's plan decides how the swap-ins and
# the unmerger interleave. The run=2 completion check reports what survived.
#
#   kswapd             task q                         run=2 (ctl)
#   swap out kpage
#                      read copy 1: swap-in, kpage
#                      in the swap cache, PageKsm
#                                                     unmerge q: items removed (swap ptes
#                                                     have nothing to break)
#                      read copy 2: swap-in ->
#                        2013: maps kpage (cause 3)
#                                                     2013: no remove_all_stable_nodes:
#                                                     the node stays in the tree (cause 1)
from __future__ import annotations

import asyncio
from typing import Any

from actors.cluster import Cluster, SyscallFailed
from ksmlab.races import Bound, duplicated_task
from ksmlab.scenario import ScenarioContext
from protocol.abi import PAGE_SIZE

NAME = "stale-stable-nodes-swap"
DESCRIPTION = ("seed 002 causes 1 and 3: KSM pages in the swap cache under run=2; "
               "--variant stale-stable-nodes:old-nodes or :swapin-no-copy leave them behind")
OPTIONS: dict[str, Any] = {"frames": 320, "swap_slots": 1024}
CONTENTS = 16
COPIES = 4


async def scenario(c: Cluster, ctx: ScenarioContext) -> dict:
    b = Bound.of(c, ctx, 30.0)
    await c.sysfs_write("sleep_millisecs", 0)
    q, a, n = await duplicated_task(c, "q", CONTENTS, COPIES, 0x60)
    rounds = 0
    hog_pages = 2 * c.opts.frames         # kswapd must come round to the KSM pages
    while b.going(c):
        await c.ksm_start()
        await c.sysfs_write("run", 0)
        hog = await c.spawn_task(comm="hog")
        h = await hog.mmap(hog_pages * PAGE_SIZE)
        fill = asyncio.create_task(hog.memset(h, 1 + rounds % 250, hog_pages * PAGE_SIZE))
        while not fill.done():                  # q's faults race with kswapd's writeback,
            i, j = b.rng.randrange(CONTENTS), b.rng.randrange(COPIES)
            await q.read(a + (i * COPIES + j) * PAGE_SIZE, 8)
            await asyncio.sleep(b.rng.uniform(0.01, 0.05))   # sparse enough to let pages age
        try:
            await fill
        except SyscallFailed as e:
            ctx.log(f"round {rounds}: hog: {e}")
        try:
            await hog.exit()
        except SyscallFailed:
            pass
        # Half the rounds fault the rest back in during run=2 (cause 3); the others leave
        # the swap ptes alone, so the swap-cached KSM pages outlive the unmerge (cause 1).
        unmerge = asyncio.create_task(c.sysfs_write("run", 2))
        if b.rng.random() < 0.5:
            await q.read(a, n)
        await unmerge
        await q.read(a, n)
        ctx.expect(f"round {rounds}: q reads back its pages", (await q.verify())["bad"], [])
        rounds += 1
    ctx.log(f"{rounds} rounds of swap-out, swap-in and run=2")
    ctx.expect("reports", [r["title"] for r in c.reports], [])
    return {"rounds": rounds}
