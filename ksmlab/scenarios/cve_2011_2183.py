# cve-2011-2183: "ksm: fix NULL pointer dereference in scan_get_next_rmap_item()" (LTP ksm05).
#
# ksmd, at the start of a full scan, checks that the mm list is not empty, then
# takes ksm_mmlist_lock and moves the cursor from ksm_mm_head to the first slot.
# If the last mm's __ksm_exit removed its slot in between (fast path: the slot has
# no rmap_items and is not at the cursor), the cursor lands back on ksm_mm_head,
# and without the re-check ksmd treats the list head as an mm_slot: its mm is NULL.
# The workload is LTP ksm05's: one registered task at a time exits while ksmd scans
# with sleep_millisecs=0, so the list keeps going empty under ksmd. No window is held
# open: the seed's schedule plan starves ksmd between the check and the cursor move.
# `--delay-at scan_get_next_rmap_item.before_cursor_advance=300` forces the window.
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
from ksmlab.races import exit_storm
from ksmlab.scenario import ScenarioContext

NAME = "cve-2011-2183"
DESCRIPTION = "LTP ksm05: the last mm exits as ksmd starts a scan; --variant cve-2011-2183 dereferences the list head"
OPTIONS: dict[str, Any] = {"frames": 256}


async def scenario(c: Cluster, ctx: ScenarioContext) -> dict:
    exited = await exit_storm(c, ctx, live=1, default_s=20.0)
    await c.sysfs_write("run", 0)
    ctx.expect("reports", [r["title"] for r in c.reports], [])
    return {"exited": exited}
