# mmput-race: seed 003, "ksm: fix conflict between mmput and scan_get_next_rmap_item" (2016).
#
# ksmd has scanned an mm whose mergeable area has no pages yet (so its slot has no
# rmap_items) and moves the cursor on. In the 2016 code it dropped ksm_mmlist_lock
# *before* up_read(mmap_lock); the task's exit, in that window, takes the
# __ksm_exit fast path (slot not at the cursor, no rmap_items), mmdrops, and - in
# 2016 exit_mmap took no mmap_lock - the last mmdrop frees the mm; ksmd's up_read
# then touches freed memory. Today up_read comes first.
#
# The workload is LTP ksm05's: tasks that register an empty mergeable area keep
# exiting while ksmd scans with sleep_millisecs=0. No window is held open: the
# seed's schedule plan starves ksmd at its lock releases and schedule points, and
# when that happens between the two unlocks while the mm's owner exits, KASAN
# reports the use-after-free. `--delay-at scan_get_next_rmap_item.before_up_read=300`
# forces the window for a demonstration.
#
#   ksmd                                       exit path
#   spin_lock(ksm_mmlist_lock)
#   ksm_scan.mm_slot = next slot
#   spin_unlock(ksm_mmlist_lock)     (2016)
#       ... window ...                         __ksm_exit: slot not at cursor, no
#                                              rmap_items: free slot, mmdrop
#                                              exit_mmap; mmdrop -> mm freed
#   up_read(&mm->mmap_lock)      <- use-after-free
from __future__ import annotations

from typing import Any

from actors.cluster import Cluster
from ksmlab.races import exit_storm
from ksmlab.scenario import ScenarioContext

NAME = "mmput-race"
DESCRIPTION = "seed 003: exits against a scanning ksmd; --variant mmput-race gives KASAN use-after-free in up_read"
OPTIONS: dict[str, Any] = {"frames": 256}


async def scenario(c: Cluster, ctx: ScenarioContext) -> dict:
    exited = await exit_storm(c, ctx, live=3, default_s=20.0)
    await c.sysfs_write("run", 0)
    ctx.expect("reports", [r["title"] for r in c.reports], [])
    return {"exited": exited}
