# The workloads of the race scenarios, written the way the kernel's reproducers are.
#
# A race scenario sets up the conditions a bug needs and then keeps the racing
# operations going, as LTP's ksm05 loops exits against a scanning ksmd; it never
# holds a window open by hand. The seed's schedule plan decides when each context is
# slow, so a campaign over seeds is what finds the window. Each loop is bounded by
# the scenario's `seconds` argument and ends early once the run has a report.
#
# The workload's own choices (how long a task lives) come from a Random seeded by the
# run seed, so a replay repeats them too.
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from actors.cluster import Cluster, ClusterCrashed, SyscallFailed, Task
from ksmlab.scenario import ScenarioContext
from protocol.abi import MADV_MERGEABLE, PAGE_SIZE


@dataclass
class Bound:
    """The time bound and the seeded choices of one race loop."""

    deadline: float
    rng: random.Random

    @classmethod
    def of(cls, c: Cluster, ctx: ScenarioContext, default_s: float) -> Bound:
        seconds = float(ctx.args.get("seconds", default_s))
        if not 0 < seconds <= 3600:
            raise ValueError(f"seconds={seconds}: must be in (0, 3600]")
        return cls(time.monotonic() + seconds, random.Random(c.opts.seed))

    def going(self, c: Cluster) -> bool:
        return time.monotonic() < self.deadline and not c.reports and c.crashed is None


async def registered_task(c: Cluster, comm: str, pages: int) -> tuple[Task, int]:
    """A task with a MADV_MERGEABLE area of `pages` pages and no page in it yet:
    its mm is on ksm_mm_head, its slot has no rmap_items (the __ksm_exit fast path)."""
    t = await c.spawn_task(comm=comm)
    a = await t.mmap(pages * PAGE_SIZE)
    await t.madvise(a, pages * PAGE_SIZE, MADV_MERGEABLE)
    return t, a


async def mergeable_task(c: Cluster, comm: str, pages: int, fill: int) -> tuple[Task, int, int]:
    """A task with `pages` pages all holding byte `fill`, advised MADV_MERGEABLE:
    ksmd will merge them into one KSM page. Returns (task, address, length)."""
    t = await c.spawn_task(comm=comm)
    n = pages * PAGE_SIZE
    a = await t.mmap(n)
    await t.memset(a, fill, n)
    await t.madvise(a, n, MADV_MERGEABLE)
    return t, a, n


async def duplicated_task(c: Cluster, comm: str, contents: int, copies: int, first: int) -> tuple[Task, int, int]:
    """A task whose area holds `contents` distinct pages (bytes first, first+1, ...), each
    `copies` times in a row, advised MADV_MERGEABLE: ksmd makes `contents` KSM pages.
    Returns (task, address, length)."""
    t = await c.spawn_task(comm=comm)
    n = contents * copies * PAGE_SIZE
    a = await t.mmap(n)
    await t.write(a, b"".join(bytes([first + i]) * PAGE_SIZE for i in range(contents) for _ in range(copies)))
    await t.madvise(a, n, MADV_MERGEABLE)
    return t, a, n


async def exit_storm(c: Cluster, ctx: ScenarioContext, live: int, default_s: float = 20.0,
                     pages: int = 4, max_life_s: float = 0.05) -> int:
    """Keep `live` registered tasks alive, each exiting after a short seeded life,
    against a ksmd that scans with sleep_millisecs=0. Returns how many tasks exited."""
    b = Bound.of(c, ctx, default_s)
    await c.sysfs_write("sleep_millisecs", 0)
    await c.sysfs_write("run", 1)
    exited = 0
    serial = 0

    async def one() -> None:
        nonlocal exited, serial
        serial += 1
        t, _a = await registered_task(c, f"exiter{serial}", pages)
        await asyncio.sleep(b.rng.uniform(0, max_life_s))
        try:
            await t.exit()
            exited += 1
        except SyscallFailed:
            pass  # already gone (an OOM kill): nothing to race with

    running: set[asyncio.Task] = set()
    try:
        while b.going(c):
            while len(running) < live:
                running.add(asyncio.create_task(one()))
            done, running = await asyncio.wait(running, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
            for d in done:
                exc = d.exception()
                if exc is not None and not isinstance(exc, ClusterCrashed):
                    raise exc
    finally:
        for r in running:
            r.cancel()
        await asyncio.gather(*running, return_exceptions=True)
    ctx.log(f"{exited} tasks exited against a scanning ksmd")
    return exited
