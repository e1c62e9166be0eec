# Seed 004 as a workload: forks of a merged task while kswapd reclaims KSM pages.
from __future__ import annotations

import pytest

from ksmlab.scenario import load_scenario, run_scenario
from tests.helpers import assert_around_shows

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(150)]


async def test_reclaim_during_forks_today_reports_nothing(tmp_path):
    """search_new_forks finds the children's ptes: every walk is complete, every read exact.

        parent            child                 kswapd
        fork() --------> maps kpage (no item)
                                                try_to_unmap_ksm(kpage): item's mm,
                                                then every vma on the anon_vma: child too
    """
    res = await run_scenario(load_scenario("rmap-no-anon-vma"), run_dir=str(tmp_path / "r"), seed=41,
                             args={"seconds": 8})
    assert res["ok"], (res.get("failed"), [r["title"] for r in res["reports"]])
    assert res["result"]["rounds"] >= 1


async def test_variant_walk_misses_the_forked_ptes_and_the_detector_says_so(tmp_path):
    """2009: the walk visits only (item->mm, item->address); the child's pte is left mapped."""
    res = await run_scenario(load_scenario("rmap-no-anon-vma"), run_dir=str(tmp_path / "r"), seed=42,
                             variants=("rmap-no-anon-vma",), stop_on_report=True, args={"seconds": 60})
    bad = [r for r in res["reports"] if r["kind"] == "bad_page"]
    assert bad, [r["title"] for r in res["reports"]]
    assert bad[0]["title"].startswith("BUG: Bad page map in process kswapd")
    assert "the rmap walk of this KSM page missed" in bad[0]["text"]
    assert_around_shows(res["run_dir"], "Bad page map in process kswapd", "kswapd", "task-")
