# Small helpers shared by the tests: waiting on a condition with a deadline (never a
# fixed sleep followed by an assertion), and the set-ups several test files share.
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


async def wait_for(cond: Callable[[], Any], timeout: float, what: str, every: float = 0.005) -> Any:
    """Poll cond() until truthy; fail with `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(every)


async def ksm_page_then_fork(c: Any) -> tuple[Any, Any, int, int, int]:
    """Four pages merged into one KSM page, then a fork ksmd has not seen (run=0):
    (parent, child, address, length, the KSM page's pfn)."""
    from ksmlab.races import mergeable_task

    await c.sysfs_write("sleep_millisecs", 0)
    t, a, n = await mergeable_task(c, "task", 4, ord("x"))
    await c.ksm_start()
    await c.sysfs_write("run", 0)
    child = await t.fork()
    return t, child, a, n, (await t.pagemap(a, n))[0]
