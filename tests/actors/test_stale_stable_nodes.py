# Seed 002, cause 2: an mm forked during run=2 must be inserted ahead of the unmerger.
from __future__ import annotations

import pytest

from actors.log import read_events
from ksmlab.scenario import load_scenario, run_scenario

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]


def _forked_during_unmerge(run_dir: str) -> bool:
    ev = read_events(run_dir)
    enter = [e["ts_ns"] for e in ev if e["event"] == "ksm_enter" and e["actor"].startswith("task")]
    done = [e["ts_ns"] for e in ev if e["event"] == "sysfs_store" and e.get("knob") == "run"
            and e.get("value") == "2"]
    return len(enter) == 3 and bool(done) and enter[-1] < done[-1]


async def test_fork_during_unmerge_is_unmerged_too(tmp_path):
    """Today the child's slot goes to the list tail during run=2: its KSM pages are broken too.

        run=2 (ctl)                         task r
        unmerge q ...                       fork(): __ksm_enter(child) -> list tail
        unmerge r, then the child
    """
    res = await run_scenario(load_scenario("stale-stable-nodes"), run_dir=str(tmp_path / "r"))
    assert res["ok"], (res.get("failed"), [r["title"] for r in res["reports"]])
    assert _forked_during_unmerge(res["run_dir"]), "the fork did not land inside run=2"


async def test_variant_child_keeps_ksm_pages_after_unmerge(tmp_path):
    """2013 before the fix: the child is inserted behind the unmerge cursor and missed."""
    res = await run_scenario(load_scenario("stale-stable-nodes"), run_dir=str(tmp_path / "r"),
                             variants=("stale-stable-nodes",))
    assert not res["ok"]
    assert res["failed"].startswith("KSM pages mapped after run=2: got ")
    assert _forked_during_unmerge(res["run_dir"])
