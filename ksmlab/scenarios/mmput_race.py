# mmput-race: seed 003, "ksm: fix conflict between mmput and scan_get_next_rmap_item" (2016).
#
# ksmd has scanned an mm whose mergeable area has no pages yet (so its slot has no
# rmap_items) and moves the cursor on. In the 2016 code it dropped ksm_mmlist_lock
# *before* up_read(mmap_lock); the task's exit, in that window, takes the
# __ksm_exit fast path (slot not at the cursor, no rmap_items), mmdrops, and - in
# 2016 exit_mmap took no mmap_lock - the last mmdrop frees the mm; ksmd's up_read
# then touches freed memory. Today up_read comes first. A schedule-point delay
# holds each order's window open for `window_ms`, and the task exits inside it.
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
from ksmlab.scenario import ScenarioContext
from protocol.abi import MADV_MERGEABLE, PAGE_SIZE

NAME = "mmput-race"
DESCRIPTION = "seed 003: exit while ksmd is between its two unlocks; --variant mmput-race gives KASAN use-after-free"
WINDOW = 0.3
OPTIONS: dict[str, Any] = {
    "frames": 256,
    "delays": {"scan_get_next_rmap_item.before_up_read": WINDOW,
               "scan_get_next_rmap_item.before_spin_unlock": WINDOW},
}


async def scenario(c: Cluster, ctx: ScenarioContext) -> dict:
    await c.sysfs_write("sleep_millisecs", 0)
    t = await c.spawn_task(comm="exiter")
    a = await t.mmap(16 * PAGE_SIZE)
    await t.madvise(a, 16 * PAGE_SIZE, MADV_MERGEABLE)   # mergeable, but no page yet
    await c.sysfs_write("run", 1)
    await c.wait_full_scans(1)        # ksmd now spends nearly all its time in the window
    await t.exit()
    from actors.kernel import mm_slot

    await c.wait_for(lambda: mm_slot.list_empty(c.k) or bool(c.reports), 10, "the slot to go")
    await c.sysfs_write("run", 0)
    ctx.expect("reports", [r["title"] for r in c.reports], [])
    return {}
