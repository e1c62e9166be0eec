# oom-deadlock: seed 000's scenario, "ksm: fix oom deadlock" (2009).
#
# run=2 holds ksm_thread_mutex while it breaks COW on every KSM page, which needs a
# new page per mapping; memory is short, so the OOM killer kills the largest task,
# which uses KSM too. Today (seed 000 applied) the victim's exit never takes
# ksm_thread_mutex: it frees its memory, the unmerge completes. With the fix
# reverted (--variant oom-deadlock: __ksm_exit takes the mutex, and, as in 2009,
# no OOM reaper frees the victim's memory behind its back) the victim's exit waits
# for the mutex that the unmerger holds while it waits for memory only that exit
# would free: the hung-task watchdog reports it and ends the run.
#
#   ctl (echo 2 > run)                      exit path of the OOM victim
#   mutex_lock(ksm_thread_mutex)
#   unmerge: break_ksm -> alloc_page
#     no free frame -> out_of_memory
#       OOM kill: victim = hog ---------->  do_exit -> mmput -> __ksm_exit
#     retry alloc_page ...                    mutex_lock(ksm_thread_mutex)  (blocks)
#     retry alloc_page ...                  *** DEADLOCK ***
from __future__ import annotations

from typing import Any

from actors.cluster import Cluster
from ksmlab.races import mergeable_task
from ksmlab.scenario import ScenarioContext

NAME = "oom-deadlock"
DESCRIPTION = "seed 000: OOM kill during run=2; with --variant oom-deadlock the exit deadlocks on ksm_thread_mutex"
OPTIONS: dict[str, Any] = {"frames": 600, "hung_task_timeout": 3.0, "oom_reaper_delay": 0.05}


async def scenario(c: Cluster, ctx: ScenarioContext) -> dict:
    await c.sysfs_write("sleep_millisecs", 0)
    merger, _a, _n = await mergeable_task(c, "merger", 256, ord("k"))
    await c.ksm_start()
    await c.sysfs_write("run", 0)
    ctx.expect("merger's pages merged into one KSM page", c.ksm_counters()["pages_sharing"], 255)
    hog, _b, _nb = await mergeable_task(c, "hog", 500, 1)   # the victim is a KSM user too
    ctx.log(f"free frames before run=2: {c.nr_free_frames()} (run=2 needs 255)")
    await c.sysfs_write("run", 2)                 # the OOM killer must kill the hog
    ctx.expect("hog killed by the OOM killer", (await hog.wait_exit(20))["reason"], "killed")
    ctx.expect_counters("after run=2", pages_shared=0, pages_sharing=0)
    ctx.expect("merger reads back its pages", (await merger.verify())["bad"], [])
    return {"free_frames": c.nr_free_frames()}
