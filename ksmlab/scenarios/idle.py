# The "idle" scenario: a small merged cluster that keeps ksmd scanning for a while.
#
# Two tasks map 24 pages each: 16 pages with the same content in both tasks (they
# merge into one KSM page) and 8 pages unique to each task. After ksm_start() the
# scenario just lets ksmd keep scanning until its time limit, so a run stays up as a
# target for `ksmlab stat`, `ksmlab ctl` and kill tests; then every task checks that
# it reads back what it wrote and exits. The limit (how long it idles once merged)
# comes from ctx.args["seconds"], else $KSMLAB_IDLE_SECONDS, else 30 s, and is capped,
# so the run is always bounded: boot + merge + the limit.
from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from actors.cluster import Cluster
from ksmlab.scenario import ScenarioContext
from protocol.abi import MADV_MERGEABLE, PAGE_SIZE

NAME = "idle"
DESCRIPTION = "two tasks merge 16 pages, then ksmd keeps scanning until a time limit " \
              "($KSMLAB_IDLE_SECONDS, default 30 s)"
OPTIONS: dict[str, Any] = {"frames": 512}

ENV = "KSMLAB_IDLE_SECONDS"
DEFAULT_SECONDS = 30.0
MAX_SECONDS = 24 * 3600.0
SAME = 16      # pages per task with content shared by both tasks
UNIQUE = 8     # pages per task with content of their own
POLL = 0.05


def idle_seconds(args: dict[str, Any]) -> float:
    """The time limit: args["seconds"], else $KSMLAB_IDLE_SECONDS, else 30 s."""
    raw = args.get("seconds")
    if raw is None:
        raw = os.environ.get(ENV) or DEFAULT_SECONDS
    try:
        seconds = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"idle: bad time limit {raw!r} (seconds, from ctx.args or ${ENV})") from None
    if not 0 <= seconds <= MAX_SECONDS:
        raise ValueError(f"idle: time limit {seconds} s is outside 0..{MAX_SECONDS:.0f} s")
    return seconds


def time_limit(args: dict[str, Any]) -> float:
    return idle_seconds(args) + 120


def _unique_page(task: int, n: int) -> bytes:
    return (b"idle-%d-%d|" % (task, n)).ljust(PAGE_SIZE, b"\xa5")


async def scenario(c: Cluster, ctx: ScenarioContext) -> dict:
    seconds = idle_seconds(ctx.args)
    tasks = [await c.spawn_task(comm=f"idle{i}") for i in range(2)]
    for i, t in enumerate(tasks):
        base = await t.mmap((SAME + UNIQUE) * PAGE_SIZE)
        await t.memset(base, 0x5A, SAME * PAGE_SIZE)
        await t.write(base + SAME * PAGE_SIZE, b"".join(_unique_page(i, n) for n in range(UNIQUE)))
        await t.madvise(base, (SAME + UNIQUE) * PAGE_SIZE, MADV_MERGEABLE)
    await c.ksm_start()
    ctx.expect_counters("merged", pages_shared=1, pages_sharing=2 * SAME - 1,
                        pages_unshared=2 * UNIQUE)
    ctx.log(f"idle: ksmd keeps scanning for {seconds:g} s (run folder {c.run_dir})")
    deadline = time.monotonic() + seconds
    start_scans = c.full_scans()
    while time.monotonic() < deadline:
        if c.crashed is not None:
            raise c.crashed
        await asyncio.sleep(min(POLL, max(0.0, deadline - time.monotonic())))
    scans = max(0, c.full_scans() - start_scans)  # run=2 resets full_scans
    for t in tasks:
        v = await t.verify()
        ctx.expect(f"task {t.pid} reads back what it wrote", v["bad"], [])
    for t in tasks:
        await t.exit()
    return {"seconds": seconds, "full_scans_while_idle": scans}
