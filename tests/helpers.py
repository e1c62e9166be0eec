# Small helpers shared by the tests: waiting on a condition with a deadline (never a
# fixed sleep followed by an assertion), and the set-ups several test files share.
from __future__ import annotations

import argparse
import asyncio
import io
import time
from collections.abc import Callable
from contextlib import redirect_stdout
from typing import Any

from ksmlab import logview


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


def log_args(**kw: Any) -> argparse.Namespace:
    """The arguments of `ksmlab log`, with these set."""
    base = {"run": None, "event": None, "actor": None, "pid": None, "mm": None, "pfn": None, "lock": None,
            "since": None, "until": None, "around": None, "locks": False, "columns": False, "grep": None,
            "json": False, "summary": False, "limit": 0}
    base.update(kw)
    return argparse.Namespace(**base)


def around(run_dir: str, report: int = 1) -> tuple[str, list[str], set[str]]:
    """`ksmlab log RUN_DIR --around N` as a user reads it: its header, its lines, and the
    actors the lines come from ("ksmd", "exit", "task-100", ...)."""
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert logview.main(log_args(run=run_dir, around=report)) == 0
    head, *lines = buf.getvalue().splitlines()
    return head, lines, {ln.split()[0].rsplit("-", 1)[0] for ln in lines if ln.strip()}


def assert_around_shows(run_dir: str, title: str, *who: str) -> None:
    """--around 1 names the report and shows every context of the race (a name ending in
    "-" matches any task), the report itself last."""
    head, lines, actors = around(run_dir)
    assert title in head, head
    for w in who:
        assert any(a == w or (w.endswith("-") and a.startswith(w)) for a in actors), (w, sorted(actors))
    assert ": report: " in lines[-1], lines[-1]
