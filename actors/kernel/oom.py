# The OOM killer and the OOM reaper: mm/oom_kill.c, reduced to what KSM meets.
#
# out_of_memory() picks the task with the largest anonymous RSS that is not
# already dying (an oom_origin task, the run=2 writer, is picked first), marks it
# (fatal signal, TIF_MEMDIE, an mm_count reference like signal->oom_mm) and leaves
# it to die; while a marked victim's mm is not yet MMF_OOM_SKIP no second victim
# is chosen. The reaper frees the victim's anonymous memory under
# mmap_read_trylock (retrying, then giving up and setting MMF_OOM_SKIP, as
# oom_reap_task does), so memory comes back even if the victim's own exit is stuck
# - and once the victim is MMF_OOM_SKIP, a further shortage picks a second victim.
#
# The OOM origin. set_current_oom_origin() / clear_current_oom_origin() bracket work that
# allocates on behalf of everyone (run=2's unmerge, under ksm_thread_mutex): the task
# doing it gets PF_OOM_ORIGIN (the kernel's signal->oom_flag_origin), so a shortage it
# causes kills it first rather than an innocent task. They take the task explicitly
# (k.current_task, or 0 for a context that acts for no task) and tolerate a task that
# was already killed and released meanwhile; k.oom_origin mirrors the flag per context.
from __future__ import annotations

from actors.kernel import ksm_mm
from actors.kernel import mm as mmops
from actors.kernel.context import Kernel
from actors.kernel.memory import zap_page_range
from shared_mem.arena import NULL, handle_id
from shared_mem.layout import (
    MMF_OOM_SKIP,
    PF_EXITING,
    PF_OOM_ORIGIN,
    TASK_RUNNING,
    TIF_MEMDIE,
    TIF_SIGKILL,
    VM_HUGETLB,
    VM_PFNMAP,
    VM_SHARED,
)

MAX_OOM_REAP_RETRIES = 10


def set_current_oom_origin(k: Kernel, task: int) -> None:
    """Mark `task` (0: none) as the OOM origin: select_bad_process() picks it first."""
    k.oom_origin = True
    t = k.km.task
    if task and t.valid(task):
        t.atomic("flags").set_bits(t.idx(task, "set_current_oom_origin"), PF_OOM_ORIGIN)


def clear_current_oom_origin(k: Kernel, task: int) -> None:
    k.oom_origin = False
    t = k.km.task
    if task and t.valid(task):
        t.atomic("flags").clear_bits(t.idx(task, "clear_current_oom_origin"), PF_OOM_ORIGIN)


def oom_victim_pending(k: Kernel, oom_mms: list[int]) -> int:
    """An OOM victim's mm (signal->oom_mm, pinned by mmgrab) not yet MMF_OOM_SKIP, or NULL.

    While a victim is still releasing its memory no second victim is chosen; what
    counts is its oom_mm, not task->mm, which exit_mm() clears long before the memory
    is actually freed.
    """
    for mm in oom_mms:
        if not k.km.mm.flags[k.km.mm.idx(mm, "oom_victim_pending")] & MMF_OOM_SKIP:
            return mm
    return NULL


def select_bad_process(k: Kernel) -> tuple[int, int]:
    """(victim task handle, points) or (NULL, 0)."""
    t = k.km.task
    best, best_pts = NULL, -1
    for i in t.live_indices():
        i = int(i)
        h = t.handle_of(i)          # before the fields: a task released meanwhile fails idx()
        if not t.valid(h):
            continue
        if t.state[i] != TASK_RUNNING or t.flags[i] & (PF_EXITING | TIF_SIGKILL):
            continue
        mm = int(t.mm[i])
        if not mm or not k.km.mm.valid(mm):
            continue
        mi = k.km.mm.idx(mm, "oom_badness")
        if k.km.mm.flags[mi] & MMF_OOM_SKIP:
            continue
        if t.flags[i] & PF_OOM_ORIGIN:
            return h, 1 << 62
        pts = int(k.km.mm.rss_anon[mi]) + int(k.km.mm.pgtables[mi]) + int(t.oom_score_adj[i])
        if pts > best_pts:
            best, best_pts = h, pts
    return best, max(best_pts, 0)


def mark_oom_victim(k: Kernel, victim: int) -> int:
    """Send the fatal signal and pin the victim's mm for the reaper; returns the mm."""
    t = k.km.task
    vi = t.idx(victim, "mark_oom_victim")
    t.atomic("flags").set_bits(vi, TIF_SIGKILL | TIF_MEMDIE)
    mm = int(t.mm[vi])
    if mm:
        mmops.mmgrab(k, mm)
        k.km.mm.atomic("oom_refs").inc_return(k.km.mm.idx(mm, "mark_oom_victim"))
    return mm


def out_of_memory(k: Kernel, oom_mms: list[int]) -> dict:
    """One OOM decision. Returns what was done: waited, killed, or nothing to kill.

    oom_mms: the mms of victims still being torn down (the caller keeps this list;
    an mm is appended on a kill and removed by the reaper when it is done).
    """
    pending = oom_victim_pending(k, oom_mms)
    if pending:
        return {"action": "wait", "mm": handle_id(pending)}
    victim, pts = select_bad_process(k)
    if not victim:
        k.ev("oom_no_victim")
        return {"action": "none"}
    t = k.km.task
    vi = t.idx(victim, "oom_kill_process")
    mm = mark_oom_victim(k, victim)
    if mm:
        oom_mms.append(mm)
    rss = int(k.km.mm.rss_anon[k.km.mm.idx(mm, "oom_kill_process")]) if mm else 0
    k.ev("oom_kill", victim=vi, pid=int(t.pid[vi]), comm=t.comm[vi].decode(), points=pts,
         anon_rss_kb=rss * 4, mm=k.km.mm.idx(mm, "oom_kill") if mm else -1)
    return {"action": "kill", "victim": victim, "mm": mm, "pid": int(t.pid[vi]),
            "comm": t.comm[vi].decode(), "rss_pages": rss}


def __oom_reap_task_mm(k: Kernel, mm: int) -> int:
    km = k.km
    freed = 0
    for vma in list(mmops.vmas(k, mm)):
        vi = km.vma.idx(vma, "__oom_reap_task_mm")
        f = int(km.vma.flags[vi])
        if f & (VM_HUGETLB | VM_PFNMAP) or f & VM_SHARED:
            continue
        freed += zap_page_range(k, mm, int(km.vma.start[vi]), int(km.vma.end[vi]))
    return freed


def oom_reap_task(k: Kernel, mm: int, oom_mms: list[int], retry_interval: float = 0.1) -> dict:
    """Free the victim's anonymous memory; always ends with MMF_OOM_SKIP set and mm dropped."""
    km = k.km
    mi = km.mm.idx(mm, "oom_reap_task")
    result = {"mm": mi, "reaped": 0, "attempts": 0}
    try:
        for attempt in range(1, MAX_OOM_REAP_RETRIES + 1):
            result["attempts"] = attempt
            if km.mm.flags[mi] & MMF_OOM_SKIP:
                result["skipped"] = True
                break
            lock = k.mmap_lock(mm, "oom_reap_task")
            if lock.down_read_trylock():
                try:
                    result["reaped"] = __oom_reap_task_mm(k, mm)
                finally:
                    lock.up_read()
                break
            k.clock.sleep(retry_interval)
        else:
            k.ev("oom_reaper_gave_up", mm=mi)
        ksm_mm.set_mm_flag(k, mm, MMF_OOM_SKIP)
        k.ev("oom_reaper", **result)
    finally:
        if mm in oom_mms:
            oom_mms.remove(mm)
        km.mm.atomic("oom_refs").dec_return(mi)
        mmops.mmdrop(k, mm, site="oom_reaper:mmdrop")
    return result
