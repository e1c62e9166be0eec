# The hung-task watchdog ends a deadlocked run with a kernel-style report (seed 000).
from __future__ import annotations

import pytest

from ksmlab.scenario import load_scenario, run_scenario

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]


async def test_oom_during_run2_completes_today(tmp_path):
    """Seed 000 applied: the OOM victim's exit never waits for ksm_thread_mutex; run=2 completes."""
    res = await run_scenario(load_scenario("oom-deadlock"), run_dir=str(tmp_path / "r"), trace_locks=False)
    assert res["ok"], (res.get("failed"), [r["title"] for r in res["reports"]])


async def test_oom_deadlock_variant_is_reported_as_hung_task(tmp_path):
    """Seed 000 reverted: the victim's __ksm_exit blocks on ksm_thread_mutex held by run=2.

        CPU0 (ctl: echo 2 > run)            CPU1 (exit of the OOM victim)
        mutex_lock(ksm_thread_mutex)
        break_ksm -> alloc_page: no frame
        out_of_memory -> kill the hog
                                            __ksm_exit: mutex_lock(ksm_thread_mutex)
        alloc_page retries forever          ... blocked
    """
    res = await run_scenario(load_scenario("oom-deadlock"), run_dir=str(tmp_path / "r"),
                             variants=("oom-deadlock",), trace_locks=False)
    assert not res["ok"]
    hung = [r for r in res["reports"] if r["kind"] == "hung_task"]
    assert hung, [r["title"] for r in res["reports"]]
    text = hung[0]["text"]
    assert "blocked for more than" in text and "ksm_thread_mutex" in text
    assert hung[0]["title"].startswith("INFO: task exit")
