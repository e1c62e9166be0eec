# Seed 002, cause 2: an mm forked during run=2 must be inserted ahead of the unmerger.
from __future__ import annotations

import pytest

from actors.log import read_events
from ksmlab.scenario import load_scenario, run_scenario
from tests.helpers import assert_around_shows

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]


def _forked_during_unmerge(run_dir: str) -> bool:
    """From the recorded events: some fork's __ksm_enter came while a run=2 store ran."""
    ev = read_events(run_dir)
    enter = [e["ts_ns"] for e in ev if e["event"] == "ksm_enter" and e["actor"].startswith("task")]
    done = [e["ts_ns"] for e in ev if e["event"] == "sysfs_store" and e.get("knob") == "run"
            and e.get("value") == "2"]
    begun = [e["ts_ns"] for e in ev if e["event"] == "lock_acquired" and e.get("lock") == "ksm_thread_mutex"
             and e["actor"].startswith("ctl")]
    return any(any(b < t < d for b in begun) for t in enter for d in done)


async def test_fork_during_unmerge_is_unmerged_too(tmp_path):
    """Today the child's slot goes to the list tail during run=2: its KSM pages are broken too.

        run=2 (ctl)                         task r
        unmerge q ...                       fork(): __ksm_enter(child) -> list tail
        unmerge r, then the child
    """
    res = await run_scenario(load_scenario("stale-stable-nodes"), run_dir=str(tmp_path / "r"), seed=31,
                             args={"seconds": 10})
    assert res["ok"], (res.get("failed"), [r["title"] for r in res["reports"]])
    assert res["result"]["forked_inside"] >= 1, "no fork landed inside run=2"
    assert _forked_during_unmerge(res["run_dir"])


async def test_variant_child_keeps_ksm_pages_after_unmerge(tmp_path):
    """2013 before the fix: the child is inserted behind the unmerge cursor and missed."""
    res = await run_scenario(load_scenario("stale-stable-nodes"), run_dir=str(tmp_path / "r"), seed=32,
                             variants=("stale-stable-nodes",), stop_on_report=True, args={"seconds": 40})
    assert not res["ok"]
    # The run=2 completion check (actors/kernel/debug.py) reports it by itself.
    titles = [r["title"] for r in res["reports"] if r["kind"] == "bad_page"]
    assert titles and "survives KSM_RUN_UNMERGE (mapped by task-" in titles[0], titles
    assert_around_shows(res["run_dir"], "survives KSM_RUN_UNMERGE", "ctl", "task-")


# -- causes 1 and 3: KSM pages in the swap cache under run=2 ------------------------------------------
async def test_swap_cached_ksm_pages_are_unmerged_today(tmp_path):
    """remove_all_stable_nodes sweeps the nodes of swap-cached KSM pages, and a swap-in
    during run=2 copies: nothing survives the unmerge, every byte reads back."""
    res = await run_scenario(load_scenario("stale-stable-nodes-swap"), run_dir=str(tmp_path / "r"), seed=33,
                             args={"seconds": 10})
    assert res["ok"], (res.get("failed"), [r["title"] for r in res["reports"]])
    assert res["result"]["rounds"] >= 1


# Cause 3 reverted (stale-stable-nodes:swapin-no-copy) is found by the campaign in about half
# the runs of 30 s (docs/bugs/stale-stable-nodes.md), too seldom for a bounded CI test:
# `./run.sh stress --bug stale-stable-nodes:swapin-no-copy --runs 10` measures it.
