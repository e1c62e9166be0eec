# stale-stable-nodes: seed 002 cause 2, "ksm: remove old stable nodes more thoroughly" (2013).
#
# run=2 unmerges mm after mm, following the cursor. A task that forks meanwhile
# registers its child with __ksm_enter, which puts the new slot just behind the
# cursor - fine for ksmd, but behind the *unmerge* cursor the child is never
# visited: its KSM pages survive run=2. Since the fix, a slot entered during
# KSM_RUN_UNMERGE goes to the tail of the list, ahead of the unmerger.
#
# The workload repeats merge, run=2 and a fork of the second task as soon as the
# unmerger is at work, for `--arg seconds=N`. Nothing holds the unmerge open: the
# seed's plan stretches it (break_ksm is a schedule point), and whether the fork lands
# inside it is the race. The run=2 completion check (actors/kernel/debug.py) reports a
# KSM page that survives. `--delay-at break_ksm=10` forces the window.
#
#   run=2 (ctl)                               task R (after Q on the list)
#   unmerge Q: break_ksm page 1, 2, ...
#                                             fork(): ksm_fork -> __ksm_enter(child)
#                                               2013: list_add_tail(slot, cursor) -> behind Q
#                                               today: at the list tail -> after R
#   unmerge R
#   (2013: the child is never visited: it still maps the KSM pages)
from __future__ import annotations

import asyncio
from typing import Any

from actors.cluster import Cluster
from ksmlab.races import Bound
from ksmlab.scenario import ScenarioContext
from protocol.abi import MADV_MERGEABLE, PAGE_SIZE
from shared_mem.layout import PG_KSM

NAME = "stale-stable-nodes"
DESCRIPTION = "seed 002: fork during run=2; with --variant stale-stable-nodes the child's KSM pages survive unmerge"
OPTIONS: dict[str, Any] = {"frames": 1024}
NPAGES = 48


def ksm_frames(c: Cluster, frames: list[int]) -> int:
    return sum(1 for f in frames if f >= 0 and c.km.page["flags"][f] & PG_KSM)


async def scenario(c: Cluster, ctx: ScenarioContext) -> dict:
    b = Bound.of(c, ctx, 20.0)
    await c.sysfs_write("sleep_millisecs", 0)
    q = await c.spawn_task(comm="q")
    r = await c.spawn_task(comm="r")
    n = NPAGES * PAGE_SIZE
    qa, ra = await q.mmap(n), await r.mmap(n)
    for t, a in ((q, qa), (r, ra)):
        await t.memset(a, ord("s"), n)
        await t.madvise(a, n, MADV_MERGEABLE)       # q registers first: q, then r on the list
    rounds = inside = survivors = 0
    while b.going(c):
        await c.ksm_start()
        ctx.expect("all pages merged", c.ksm_counters()["pages_sharing"], 2 * NPAGES - 1)
        free = c.nr_free_frames()
        unmerge = asyncio.create_task(c.sysfs_write("run", 2))
        # Fork as soon as the unmerger is at work on q (its first private copies took frames).
        await c.wait_for(lambda u=unmerge, f=free: u.done() or c.nr_free_frames() < f - 4, 10,
                         "the unmerge of q")
        child = await r.fork()                      # r may still be merged: the child maps KSM pages
        inside += not unmerge.done()
        await unmerge
        survivors = ksm_frames(c, await child.pagemap(ra, n))
        ctx.expect(f"round {rounds}: KSM pages mapped after run=2", survivors + ksm_frames(c, await r.pagemap(ra, n))
                   + ksm_frames(c, await q.pagemap(qa, n)), 0)
        ctx.expect(f"round {rounds}: the child reads back its pages", (await child.verify())["bad"], [])
        await child.exit()
        rounds += 1
    ctx.log(f"{rounds} rounds, {inside} forks landed inside run=2")
    return {"rounds": rounds, "forked_inside": inside}
