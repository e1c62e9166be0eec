# Seeds 000 + 001: munlock in exit_mmap faults pages in, and seed 000's ksm_test_exit()
# in the fault path makes that fault back out for ever; the hung-task watchdog reports
# a retry loop without progress as it reports a lock wait. And the cost seed 001 names:
# the first OOM victim, being unmerged by run=2, is freed only after a second victim.
from __future__ import annotations

import secrets

import pytest

from actors.log import read_events
from ksmlab.scenario import load_scenario, run_scenario
from shared_mem.lockdep import find_hung
from shared_mem.locks import MUTEX, LockSpace
from tests.helpers import assert_around_shows

pytestmark = [pytest.mark.timeout(120)]


# --- the mechanism: a published no-progress wait, and the watchdog's report ------------------

def test_no_progress_is_published_in_the_context_table_and_cleared():
    sp = LockSpace.create(secrets.token_hex(4), [("m", MUTEX, 1)])
    try:
        sp.bind_context("exit:0")
        (me,) = sp.contexts_snapshot()
        assert me["kwait"] is None
        sp.no_progress("__get_user_pages<-munlock_vma_pages_all<-exit_mmap", 0)
        (me,) = sp.contexts_snapshot()
        first = me["kwait"]
        assert first["site"] == "__get_user_pages<-munlock_vma_pages_all<-exit_mmap"
        assert first["kind"] == "retry" and first["retries"] == 0 and first["since_ns"] > 0
        sp.no_progress("__get_user_pages<-munlock_vma_pages_all<-exit_mmap", 640)
        (me,) = sp.contexts_snapshot()
        assert me["kwait"]["retries"] == 640 and me["kwait"]["since_ns"] == first["since_ns"]
        sp.progress()
        (me,) = sp.contexts_snapshot()
        assert me["kwait"] is None
    finally:
        sp.release_context()
        sp.close()
        sp.unlink()


def _ctx(kwait=None, waiting=None, held=()):
    return {"ctx": 3, "actor": "exit:0", "pid": 4242, "tid": 4243, "waiting": waiting,
            "held": list(held), "kwait": kwait}


def test_find_hung_reports_a_retry_loop_in_the_hung_task_format():
    held = [{"lock": "mmap_lock", "idx": 2, "mode": "read", "since_ns": 5, "site": "exit_mmap",
             "name": "mmap_lock#2"}]
    kw = {"site": "__get_user_pages<-munlock_vma_pages_all<-exit_mmap", "since_ns": 1_000,
          "retries": 99, "kind": "retry"}
    snap = [_ctx(kw, held=held)]
    assert find_hung(snap, 3_000_000_000, 1_000 + 3_000_000_000) == []       # not yet
    (rep,) = find_hung(snap, 3_000_000_000, 1_000 + 3_500_000_000)
    assert rep["kind"] == "hung_task"
    assert rep["title"] == "INFO: task exit:0:4242 blocked for more than 3 seconds."
    lines = rep["text"].splitlines()
    assert "task:exit:0 state:R pid:4242 tid:4243 ctx:3" in lines
    assert " munlock_vma_pages_all" in lines and " exit_mmap" in lines
    assert "1 lock held by exit:0/4242:" in lines
    assert " #0: (mmap_lock#2){++++}, at: exit_mmap" in lines
    assert rep["data"]["site"] == "__get_user_pages" and rep["data"]["no_progress"]["retries"] == 99
    # A context without a published wait costs nothing and is never reported.
    assert find_hung([_ctx()], 3_000_000_000, 10**12) == []


# --- the variant: the exit loops in munlock and the watchdog ends the run ---------------------

@pytest.mark.asyncio
async def test_munlock_exit_hang_variant_is_a_hung_task_report(tmp_path):
    """Seeds 000 applied, 001 not: exit_mmap's munlock faults the PROT_NONE guard area in,
    do_anonymous_page backs out (mm_users == 0), __get_user_pages retries for ever.

        exit path (2009)
        mmput: mm_users 1 -> 0; exit_mmap: munlock_vma_pages_all(guard)
          follow_page() -> NULL; handle_mm_fault: ksm_test_exit -> back out; cond_resched()
          follow_page() -> NULL; handle_mm_fault: ... (no progress, ever)
    """
    spec = load_scenario("munlock-exit-hang")
    res = await run_scenario(spec, run_dir=str(tmp_path / "r"), variants=("munlock-exit-hang",),
                             trace_locks=False)
    assert not res["ok"]
    hung = [r for r in res["reports"] if r["kind"] == "hung_task"]
    assert hung, [r["title"] for r in res["reports"]]
    rep = hung[0]
    assert rep["title"].startswith("INFO: task exit") and "blocked for more than 3 seconds" in rep["title"]
    assert "munlock_vma_pages_all" in rep["text"] and "exit_mmap" in rep["text"]
    assert "(mmap_lock#" in rep["text"]                       # the lock it holds is shown
    assert rep["data"]["trace"][:3] == ["__get_user_pages", "__mlock_vma_pages_range",
                                        "munlock_vma_pages_all"]
    assert rep["data"]["no_progress"]["retries"] > 0
    assert_around_shows(res["run_dir"], "INFO: task exit", "exit")
    # Bounded: reported soon after the threshold, not at some far-off deadline.
    threshold = spec.options["hung_task_timeout"]
    assert rep["data"]["blocked_ns"] < (threshold + 3) * 1e9
    assert res["seconds"] < 60
    # The recorded timeline agrees: the exit context published the loop, never left it.
    ev = read_events(res["run_dir"])
    starts = [e for e in ev if e["event"] == "no_progress" and e["actor"].startswith("exit")]
    assert starts and "munlock_vma_pages_all" in starts[0]["site"]
    assert not [e for e in ev if e["event"] == "progress" and e["actor"].startswith("exit")
                and e["retries"] > 0]


@pytest.mark.asyncio
async def test_munlock_exit_today_exits_cleanly(tmp_path):
    """Today (seed 001 applied, munlock faults nothing in): every exit completes, every
    mm is freed, no reports, no leaks."""
    res = await run_scenario(load_scenario("munlock-exit-hang"), run_dir=str(tmp_path / "r"),
                             trace_locks=False)
    assert res["ok"], (res.get("failed"), [r["title"] for r in res["reports"]])
    assert res["reports"] == []
    assert res["result"]["exited"] == 6
    checks = {c["what"]: c for c in res["checks"]}
    assert checks["no leaks after every task exited"]["ok"]
    ev = read_events(res["run_dir"])
    assert not [e for e in ev if e["event"] == "no_progress"]


# --- the cost seed 001 names: a second OOM victim before the first is freed -----------------

def _oom_order(run_dir: str) -> list[tuple[str, int]]:
    return [("kill", e["mm"]) if e["event"] == "oom_kill" else ("free", e["mm"])
            for e in read_events(run_dir) if e["event"] in ("oom_kill", "mm_free")]


@pytest.mark.asyncio
async def test_oom_victim_being_unmerged_is_freed_after_a_second_victim_today(tmp_path):
    """Today: run=2 holds the victim's mmap_lock for read in its unmerging fault, which
    waits for memory; the victim's exit queues at __ksm_exit's down_write barrier, so the
    reaper's trylock fails and it gives up; only a second victim's memory lets the fault
    complete, unmerge back out, and the first victim's exit go on.

        ctl (echo 2 > run)                    exit of victim 1 (merger)
        down_read(merger mmap_lock)
        break_ksm -> alloc_page: no frame
        OOM: kill merger ------------------>  __ksm_exit: down_write(mmap_lock) waits
        OOM: wait (reaper trylock fails, gives up: MMF_OOM_SKIP)
        OOM: kill bystander (victim 2); its exit frees memory
        fault completes; ksm_test_exit: stop
        up_read ----------------------------> exit_mmap, mmdrop: merger's mm freed
    """
    res = await run_scenario(load_scenario("munlock-exit-hang-oom"), run_dir=str(tmp_path / "r"),
                             trace_locks=False)
    assert res["ok"], (res.get("failed"), [r["title"] for r in res["reports"]])
    merger, bystander = res["result"]["merger_mm"], res["result"]["bystander_mm"]
    order = _oom_order(res["run_dir"])
    assert ("kill", merger) in order and ("kill", bystander) in order and ("free", merger) in order
    assert order.index(("kill", merger)) < order.index(("kill", bystander)) \
        < order.index(("free", merger)), order


@pytest.mark.asyncio
async def test_oom_victim_being_unmerged_is_freed_first_with_ksm_exit_in_exit_mmap(tmp_path):
    """Seed 000's placement (the variant): exit_mmap zaps the victim's pages before
    ksm_exit's barrier, the unmerging fault gets memory, and no second victim is chosen."""
    res = await run_scenario(load_scenario("munlock-exit-hang-oom"), run_dir=str(tmp_path / "r"),
                             variants=("munlock-exit-hang",), trace_locks=False)
    assert res["ok"], (res.get("failed"), [r["title"] for r in res["reports"]])
    merger, bystander = res["result"]["merger_mm"], res["result"]["bystander_mm"]
    order = _oom_order(res["run_dir"])
    assert ("kill", bystander) not in order, order
    assert order.index(("kill", merger)) < order.index(("free", merger)), order
