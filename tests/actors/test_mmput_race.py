# Seed 003: ksmd's up_read(mmap_lock) after spin_unlock(ksm_mmlist_lock) races with exit.
from __future__ import annotations

import pytest

from actors.log import read_events
from ksmlab.scenario import load_scenario, run_scenario
from tests.helpers import assert_around_shows

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]


def _exit_contended_on_mmlist_lock(run_dir: str) -> bool:
    return any(e["event"] == "lock_contended" and e.get("lock") == "ksm_mmlist_lock"
               and e["actor"] == "exit" for e in read_events(run_dir))


async def test_mmput_race_fixed_order_is_safe(tmp_path):
    """Today: ksmd does up_read before spin_unlock, so the exiting task waits, then frees.

        ksmd                                   exit path
        up_read(mmap_lock)
        [window: ksm_mmlist_lock still held]   __ksm_exit: spin_lock(ksm_mmlist_lock) waits
        spin_unlock(ksm_mmlist_lock)           fast path: free slot, mmdrop, exit_mmap, mmdrop
    """
    res = await run_scenario(load_scenario("mmput-race"), run_dir=str(tmp_path / "r"), seed=11,
                             args={"seconds": 8})
    assert res["ok"], (res.get("failed"), [r["title"] for r in res["reports"]])
    # The race window was really hit: the exit path waited for ksmd's spinlock.
    assert _exit_contended_on_mmlist_lock(res["run_dir"])


async def test_mmput_race_variant_is_a_use_after_free(tmp_path):
    """2016 order: spin_unlock first; the exit frees the mm; ksmd's up_read is a KASAN report.

        ksmd                                   exit path
        spin_unlock(ksm_mmlist_lock)
        [window]                               __ksm_exit fast path: free slot, mmdrop
                                               exit_mmap (no mmap_lock in 2016), mmdrop: freed
        up_read(&mm->mmap_lock)  -> BUG: KASAN: use-after-free in up_read
    """
    res = await run_scenario(load_scenario("mmput-race"), run_dir=str(tmp_path / "r"), seed=12,
                             variants=("mmput-race",), stop_on_report=True, args={"seconds": 30})
    kasan = [r for r in res["reports"] if r["kind"] == "kasan"]
    assert kasan, [r["title"] for r in res["reports"]]
    rep = kasan[0]
    assert rep["title"] == "BUG: KASAN: use-after-free in up_read"
    assert rep["data"]["cache"] == "mm" and rep["data"]["actor"] == "ksmd"
    assert rep["data"]["free"]["actor"].startswith("exit")
    assert_around_shows(res["run_dir"], "KASAN: use-after-free in up_read", "ksmd", "exit")
