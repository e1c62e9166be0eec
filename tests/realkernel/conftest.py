# Fixtures for the real-kernel KSM tests: every realkernel-marked test must leave every
# /sys/kernel/mm/ksm knob exactly as it found it, and must leave no child process behind.
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ksmlab.realkernel import KSM_SYSFS, read_knobs


def child_pids() -> set[int]:
    """Pids of this process's live children (all threads), from /proc/self/task/*/children."""
    pids: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            pids.update(int(x) for x in (task / "children").read_text().split())
        except OSError:
            continue
    return pids


@pytest.fixture(autouse=True)
def ksm_knobs_unchanged(request: pytest.FixtureRequest) -> Iterator[dict[str, str] | None]:
    """Snapshot every writable KSM knob before a realkernel test and require it unchanged after."""
    if request.node.get_closest_marker("realkernel") is None:
        yield None
        return
    before = read_knobs(KSM_SYSFS)
    yield before
    after = read_knobs(KSM_SYSFS)
    changed = {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys()}
    changed = {k: v for k, v in changed.items() if v[0] != v[1]}
    assert not changed, f"KSM knobs not restored (before, after): {changed}"


@pytest.fixture(autouse=True)
def no_leftover_children(request: pytest.FixtureRequest) -> Iterator[None]:
    """A realkernel test must reap every worker it forked."""
    if request.node.get_closest_marker("realkernel") is None:
        yield
        return
    before = child_pids()
    yield
    left = child_pids() - before
    for pid in left:  # clean up so one failure does not cascade, then fail
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    assert not left, f"worker processes left behind: {sorted(left)}"
