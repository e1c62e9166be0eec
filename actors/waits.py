# Waiting with a deadline without losing a cancellation.
#
# asyncio.wait_for() of Python 3.11 returns the awaited result when that finished in the
# same step of the loop as the waiting task was cancelled: the cancellation is dropped
# (CPython gh-86296, fixed in 3.12 by rebuilding wait_for() on asyncio.timeout()). The
# supervisor meets exactly that step: SIGTERM or SIGHUP cancels the scenario while it
# waits for a task that the fork server has just started, and the task's "ready" comes
# in a few milliseconds, so the signal and the ready can arrive together. The scenario
# then went on as if no signal had come (an idle run ran its full two minutes). within()
# is wait_for() written on asyncio.timeout(), as 3.12's is: a cancellation always
# propagates, and a timeout is TimeoutError as before.
from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(aw: Awaitable[T], timeout: float | None) -> T:
    """await aw, raising TimeoutError after `timeout` seconds (None: no limit); a
    cancellation of the caller is never swallowed."""
    async with asyncio.timeout(timeout):
        return await aw
