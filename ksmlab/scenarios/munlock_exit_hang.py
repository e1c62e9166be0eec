# munlock-exit-hang: seeds 000 + 001, "ksm: fix oom deadlock" and its partial revert
# "ksm: fix munlock during exit_mmap deadlock" (2009).
#
# Seed 000 moved ksm_exit() into the middle of exit_mmap() and made the fault paths
# back out when ksm_test_exit(mm) (mm_users == 0). But exit_mmap() first munlocks every
# VM_LOCKED area, and 2.6.31's munlock_vma_pages_all() faulted absent pages in through
# __get_user_pages: on a PROT_NONE area of a task that did mlockall(MCL_CURRENT |
# MCL_FUTURE) the fault now returns having done nothing, follow_page() still finds no
# page, and munlock retries for ever ("hang at startup when cryptsetup is run").
# Seed 001 put ksm_exit() back before exit_mmap() and removed the fault-path checks.
#
# Two workloads:
#   munlock-exit-hang      tasks mlockall() with PROT_NONE guard areas, merge some pages
#                          and exit, round after round. Today every exit completes and
#                          every mm is freed; --variant munlock-exit-hang (the kernel
#                          between the two commits) loops in munlock and the hung-task
#                          watchdog ends the run with its report.
#   munlock-exit-hang-oom  the cost seed 001 names: run=2 unmerges a task that becomes
#                          the first OOM victim; today its memory is freed only after a
#                          second victim is chosen (the unmerging fault holds its
#                          mmap_lock, its exit waits at __ksm_exit's barrier). With the
#                          variant, exit_mmap zaps before ksm_exit and no second victim
#                          is needed. The order is in the oom_kill and mm_free events.
#
#   exit path (2009, variant)                        nobody else
#   mmput: mm_users 1 -> 0
#   exit_mmap: munlock_vma_pages_all(guard area)
#     __get_user_pages: follow_page() -> NULL
#       handle_mm_fault -> do_anonymous_page:
#         ksm_test_exit(mm): back out, return 0
#       cond_resched(); follow_page() -> NULL
#       handle_mm_fault -> ... for ever
from __future__ import annotations

import sys
from typing import Any

from actors.cluster import Cluster
from ksmlab.races import mergeable_task
from ksmlab.scenario import ScenarioContext, ScenarioSpec
from protocol.abi import MADV_MERGEABLE, MCL_CURRENT, MCL_FUTURE, PAGE_SIZE, PROT_NONE

NAME = "munlock-exit-hang"
DESCRIPTION = ("seeds 000+001: mlockall tasks with PROT_NONE areas merge and exit; "
               "--variant munlock-exit-hang loops in munlock (hung-task report)")
OPTIONS: dict[str, Any] = {"frames": 1024, "hung_task_timeout": 3.0}

OOM_NAME = "munlock-exit-hang-oom"
OOM_DESCRIPTION = ("seed 001's cost: run=2 unmerges the first OOM victim; today its mm is "
                   "freed only after a second victim (oom_kill/mm_free events)")
OOM_OPTIONS: dict[str, Any] = {"frames": 600, "hung_task_timeout": 10.0, "oom_reaper_delay": 0.5}


def _mm_of(c: Cluster, t: Any) -> tuple[int, int]:
    """(mm handle, mm index) of a live task."""
    tk = c.km.task
    mm = int(tk.mm[tk.idx(t.handle, "scenario")])
    return mm, c.km.mm.idx(mm, "scenario")


async def scenario(c: Cluster, ctx: ScenarioContext) -> dict:
    rounds = int(ctx.args.get("rounds", 3))
    per_round = int(ctx.args.get("tasks", 2))
    npages = 16
    await c.sysfs_write("sleep_millisecs", 0)
    await c.sysfs_write("run", 1)
    exited = 0
    for r in range(rounds):
        tasks = []
        for i in range(per_round):
            t = await c.spawn_task(comm=f"locker{r}.{i}")
            n = npages * PAGE_SIZE
            a = await t.mmap(n)
            await t.memset(a, 0x5A, n // 2)                       # the same in every task
            await t.memset(a + n // 2, 0x10 + r * per_round + i, n // 2)   # this task's own
            await t.madvise(a, n, MADV_MERGEABLE)
            await t.mmap(4 * PAGE_SIZE, prot=PROT_NONE)           # guard area, never touched
            await t.mlockall(MCL_CURRENT | MCL_FUTURE)
            await t.mmap(4 * PAGE_SIZE, prot=PROT_NONE)           # born VM_LOCKED (MCL_FUTURE)
            tasks.append(t)
        await c.wait_full_scans(2)
        ctx.expect(f"round {r}: the tasks' common pages are merged",
                   c.ksm_counters()["pages_sharing"] > 0, True)
        for t in tasks:
            await t.exit()
        for t in tasks:
            ctx.expect(f"round {r}: {t.name} exited", (await t.wait_exit(20))["reason"], "exit")
            exited += 1
    # ksmd drops the exited mms' slots on its next pass; then nothing may be left.
    await c.wait_for(lambda: c.km.mm.nr_live() == 0, 30, "every mm to be freed")
    await c.sysfs_write("run", 2)
    ctx.expect("no leaks after every task exited", [r["title"] for r in c.check_leaks()], [])
    return {"exited": exited}


async def oom_scenario(c: Cluster, ctx: ScenarioContext) -> dict:
    await c.sysfs_write("sleep_millisecs", 0)
    await c.sysfs_write("max_page_sharing", 1024)        # one KSM page, no chain
    merger, _a, _n = await mergeable_task(c, "merger", 480, ord("k"))
    await c.ksm_start()
    await c.sysfs_write("run", 0)
    ctx.expect("merger's pages merged into one KSM page", c.ksm_counters()["pages_sharing"], 479)
    bystander = await c.spawn_task(comm="bystander")
    nb = 200 * PAGE_SIZE
    b = await bystander.mmap(nb)
    for off in range(0, nb, PAGE_SIZE):                   # unique pages, not mergeable
        await bystander.memset(b + off, off // PAGE_SIZE & 0xFF, PAGE_SIZE)
    (merger_h, merger_mm), (_bh, bystander_mm) = _mm_of(c, merger), _mm_of(c, bystander)
    ctx.log(f"free frames before run=2: {c.nr_free_frames()} (run=2 needs 479; merger is the "
            f"largest task, so the first OOM victim is the mm being unmerged)")
    await c.sysfs_write("run", 2)
    ctx.expect("merger (being unmerged) killed by the OOM killer",
               (await merger.wait_exit(30))["reason"], "killed")
    await c.wait_for(lambda: not c.km.mm.valid(merger_h), 30, "the merger's mm to be freed")
    ctx.expect_counters("after run=2", pages_shared=0, pages_sharing=0)
    return {"merger_mm": merger_mm, "bystander_mm": bystander_mm}


SCENARIOS = [
    ScenarioSpec(NAME, DESCRIPTION, OPTIONS, scenario, sys.modules[__name__]),
    ScenarioSpec(OOM_NAME, OOM_DESCRIPTION, OOM_OPTIONS, oom_scenario, sys.modules[__name__]),
]
