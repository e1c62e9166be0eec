# Small helpers shared by the tests: waiting on a condition with a deadline (never a
# fixed sleep followed by an assertion).
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
