# cve-2011-2183: "ksm: fix NULL pointer dereference in scan_get_next_rmap_item()" (LTP ksm05).
#
# ksmd, at the start of a full scan, checks that the mm list is not empty, then
# takes ksm_mmlist_lock and moves the cursor from ksm_mm_head to the first slot.
# If the last mm's __ksm_exit removed its slot in between (fast path: the slot has
# no rmap_items and is not at the cursor), the cursor lands back on ksm_mm_head,
# and without the re-check ksmd treats the list head as an mm_slot: its mm is NULL.
# A schedule-point delay holds the window open; the only task exits inside it.
#
#   ksmd                                     exit path
#   list_empty(&ksm_mm_head)? no
#       ... window ...                       __ksm_exit: last slot, no rmap_items:
#                                            unhash, list_del, free slot
#   spin_lock(ksm_mmlist_lock)
#   slot = ksm_mm_head.next   (== head)
#   spin_unlock(ksm_mmlist_lock)
#   mm = slot->mm (NULL) -> mmap_read_lock(mm): NULL pointer dereference
from __future__ import annotations

from typing import Any

from actors.cluster import Cluster
from ksmlab.scenario import ScenarioContext
from protocol.abi import MADV_MERGEABLE, PAGE_SIZE

NAME = "cve-2011-2183"
DESCRIPTION = "LTP ksm05: the last mm exits as ksmd starts a scan; --variant cve-2011-2183 dereferences the list head"
OPTIONS: dict[str, Any] = {"frames": 256, "delays": {"scan_get_next_rmap_item.before_cursor_advance": 0.3}}


async def scenario(c: Cluster, ctx: ScenarioContext) -> dict:
    await c.sysfs_write("sleep_millisecs", 0)
    t = await c.spawn_task(comm="ksm05")
    a = await t.mmap(4 * PAGE_SIZE)
    await t.madvise(a, 4 * PAGE_SIZE, MADV_MERGEABLE)   # registered, no page: no rmap_item
    await c.sysfs_write("run", 1)
    await c.wait_full_scans(1)         # ksmd now waits in the window at every pass start
    await t.exit()
    from actors.kernel import mm_slot

    await c.wait_for(lambda: mm_slot.list_empty(c.k), 10, "the last slot to go")
    # Give ksmd its next pass start: it must survive an empty list.
    await c.wait_for(lambda: bool(c.reports) or c.k.ksm["scan_slot"] == c.k.ksm["mm_head"], 10,
                     "ksmd to leave the window")
    await c.sysfs_write("run", 0)
    ctx.expect("reports", [r["title"] for r in c.reports], [])
    return {}
