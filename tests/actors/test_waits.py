# actors/waits.py: a wait with a deadline that never drops a cancellation.
#
# The interleaving that lost a SIGHUP (tests/test_cli.py's teardown test, about one run
# in thirty once the fork server made a task ready within milliseconds):
#
#   loop step N                                   | the scenario task
#   ----------------------------------------------+-----------------------------------
#                                                 | await wait(shield(ready), 30)
#   the task's "ready" arrives: ready.set_result  |
#   SIGHUP: the handler calls task.cancel()       |
#   step N+1                                      | wakes with CancelledError
#                                                 | 3.11 wait_for: ready is done, so it
#                                                 |   returns the result: cancel lost
#                                                 | within(): CancelledError goes on
from __future__ import annotations

import asyncio
import sys

import pytest

from actors.waits import within

pytestmark = [pytest.mark.timeout(10)]


async def _cancel_as_it_completes(wait) -> asyncio.Task:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    t = asyncio.create_task(wait(asyncio.shield(ready), 30))
    await asyncio.sleep(0)  # t is waiting
    ready.set_result("ready")
    t.cancel()
    return t


@pytest.mark.asyncio
async def test_a_cancel_that_comes_with_the_result_is_not_lost():
    t = await _cancel_as_it_completes(within)
    with pytest.raises(asyncio.CancelledError):
        await t


@pytest.mark.asyncio
@pytest.mark.skipif(sys.version_info >= (3, 12), reason="3.12's wait_for is built on asyncio.timeout")
async def test_python_3_11s_wait_for_drops_that_cancel():
    """Why within() exists: the same interleaving through asyncio.wait_for."""
    t = await _cancel_as_it_completes(asyncio.wait_for)
    assert await t == "ready"


@pytest.mark.asyncio
async def test_a_timeout_is_timeout_error_and_none_waits_as_long_as_it_takes():
    loop = asyncio.get_running_loop()
    never = loop.create_future()
    with pytest.raises(TimeoutError):
        await within(never, 0.01)
    assert never.cancelled()  # as wait_for(), the awaited future is cancelled
    later = loop.create_future()
    loop.call_later(0.02, later.set_result, 7)
    assert await within(later, None) == 7
