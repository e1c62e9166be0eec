# The mm interface to KSM: __ksm_enter, __ksm_exit, ksm_madvise, prctl's merge-any,
# and ksm_fork.
#
# Follows "ksm: the mm interface to ksm" (seed 001) and today's mm/ksm.c:
# __ksm_enter() takes an mm_count reference and puts the new slot just behind the
# scan cursor, or at the list tail while run=2 unmerges (seed 002); __ksm_exit()
# never takes ksm_thread_mutex (seed 000): its fast path frees a slot with no
# rmap_items that is not at the cursor, otherwise it moves the slot just after the
# cursor and uses mmap_write_lock/unlock as a barrier against ksmd.
from __future__ import annotations

from actors.kernel import mm as mmops
from actors.kernel import mm_slot as slots
from actors.kernel.context import Kernel
from actors.kernel.merge import ENOMEM, unmerge_ksm_pages
from actors.kernel.rmap import Link, remove_trailing_rmap_items
from protocol.abi import MADV_MERGEABLE, MADV_UNMERGEABLE
from shared_mem.arena import OutOfObjects, handle_id
from shared_mem.layout import (
    MMF_VM_MERGE_ANY,
    MMF_VM_MERGEABLE,
    VM_DONTEXPAND,
    VM_DROPPABLE,
    VM_HUGETLB,
    VM_IO,
    VM_MAYSHARE,
    VM_MERGEABLE,
    VM_MIXEDMAP,
    VM_PFNMAP,
    VM_SHARED,
)

KSM_RUN_UNMERGE = 2
_INCOMPATIBLE = (VM_SHARED | VM_MAYSHARE | VM_PFNMAP | VM_IO | VM_DONTEXPAND | VM_HUGETLB
                 | VM_MIXEDMAP | VM_DROPPABLE)


def mm_flags(k: Kernel, mm: int) -> int:
    return int(k.km.mm.flags[k.km.mm.idx(mm, "mm_flags")])


def set_mm_flag(k: Kernel, mm: int, bit: int) -> None:
    k.km.mm.atomic("flags").set_bits(k.km.mm.idx(mm, "set_bit"), bit)


def clear_mm_flag(k: Kernel, mm: int, bit: int) -> None:
    k.km.mm.atomic("flags").clear_bits(k.km.mm.idx(mm, "clear_bit"), bit)


def vma_ksm_compatible(k: Kernel, vma: int) -> bool:
    return not k.km.vma.flags[k.km.vma.idx(vma, "vma_ksm_compatible")] & _INCOMPATIBLE


def wake_ksmd(k: Kernel) -> None:
    k.ksm["wake_seq"] += 1
    k.ev("ksmd_wakeup")
    k.wakeups.wake_ksmd()


def __ksm_enter(k: Kernel, mm: int) -> int:
    """Register mm with KSM. Returns 0 or -ENOMEM."""
    km = k.km
    try:
        slot = km.mm_slot.alloc(site="__ksm_enter")
    except OutOfObjects:
        return ENOMEM
    needs_wakeup = slots.list_empty(k)
    k.ksm_mmlist_lock.lock(site="__ksm_enter")
    slots.hash_add(k, mm, slot)
    if k.ksm["run"] & KSM_RUN_UNMERGE and not k.variant("stale-stable-nodes:enter-behind-cursor"):
        # run=2 is unmerging: put the mm where the unmerger will still see it.
        slots.list_add_before(k, slot, slots.head(k))
    else:
        # Just behind the cursor: give the area a full scan to settle first.
        slots.list_add_before(k, slot, int(k.ksm["scan_slot"]))
    k.ksm_mmlist_lock.unlock()
    set_mm_flag(k, mm, MMF_VM_MERGEABLE)
    mmops.mmgrab(k, mm)
    k.ev("ksm_enter", mm=handle_id(mm), slot=handle_id(slot))
    if needs_wakeup:
        wake_ksmd(k)
    return 0


def __ksm_exit(k: Kernel, mm: int) -> None:
    """The exiting mm leaves KSM; never waits for ksm_thread_mutex (seed 000)."""
    km = k.km
    if k.variant("oom-deadlock"):
        return _ksm_exit_2009(k, mm)
    easy_to_free = False
    k.ksm_mmlist_lock.lock(site="__ksm_exit")
    slot = slots.get_mm_slot(k, mm)
    if slot and int(k.ksm["scan_slot"]) != slot:
        if not km.mm_slot.rmap_list[km.mm_slot.idx(slot, "__ksm_exit")]:
            slots.hash_del(k, slot)
            slots.list_del(k, slot)
            easy_to_free = True
        else:
            slots.list_del(k, slot)
            slots.list_add_after(k, slot, int(k.ksm["scan_slot"]))
    k.ksm_mmlist_lock.unlock()
    k.point("__ksm_exit.after_unlock")
    if easy_to_free:
        km.mm_slot.free(slot, site="__ksm_exit")
        clear_mm_flag(k, mm, MMF_VM_MERGE_ANY | MMF_VM_MERGEABLE)
        k.ev("ksm_exit", mm=handle_id(mm), path="fast")
        mmops.mmdrop(k, mm, site="__ksm_exit:mmdrop")
    elif slot:
        # Barrier: wait out any ksmd or break_cow holding mmap_lock for read
        # before exit_mmap tears down the page tables.
        lock = k.mmap_lock(mm, "__ksm_exit")
        lock.down_write(site="__ksm_exit")
        lock.up_write()
        k.ev("ksm_exit", mm=handle_id(mm), path="barrier")
    else:
        k.ev("ksm_exit", mm=handle_id(mm), path="already_reaped")


def _ksm_exit_2009(k: Kernel, mm: int) -> None:
    """Before seed 000: the exiting task takes ksm_thread_mutex and cleans up itself."""
    km = k.km
    k.ksm_thread_mutex.lock(site="__ksm_exit")
    try:
        k.ksm_mmlist_lock.lock(site="__ksm_exit")
        slot = slots.get_mm_slot(k, mm)
        k.ksm_mmlist_lock.unlock()
        if not slot:
            return
        remove_trailing_rmap_items(k, Link(slot, True))
        k.ksm_mmlist_lock.lock(site="__ksm_exit")
        if int(k.ksm["scan_slot"]) == slot:
            nxt = slots.next_slot(k, slot)
            k.ksm["scan_slot"] = nxt
            k.ksm["scan_address"] = 0
            k.ksm["scan_rmap_owner"] = nxt
            k.ksm["scan_rmap_in_slot"] = 1
            if nxt == slots.head(k):
                k.ksm["seqnr"] += 1
        slots.hash_del(k, slot)
        slots.list_del(k, slot)
        k.ksm_mmlist_lock.unlock()
        km.mm_slot.free(slot, site="__ksm_exit(2009)")
        clear_mm_flag(k, mm, MMF_VM_MERGEABLE | MMF_VM_MERGE_ANY)
        k.ev("ksm_exit", mm=handle_id(mm), path="2009-mutex")
        mmops.mmdrop(k, mm, site="__ksm_exit(2009):mmdrop")
    finally:
        k.ksm_thread_mutex.unlock()


def ksm_exit(k: Kernel, mm: int) -> None:
    if mm_flags(k, mm) & MMF_VM_MERGEABLE:
        __ksm_exit(k, mm)


def ksm_madvise(k: Kernel, vma: int, start: int, end: int, advice: int) -> int:
    """Apply MADV_(UN)MERGEABLE to one vma (already split to [start, end)). 0 or -errno."""
    km = k.km
    vi = km.vma.idx(vma, "ksm_madvise")
    mm = int(km.vma.mm[vi])
    if advice == MADV_MERGEABLE:
        if km.vma.flags[vi] & VM_MERGEABLE or not vma_ksm_compatible(k, vma):
            return 0
        if not mm_flags(k, mm) & MMF_VM_MERGEABLE:
            err = __ksm_enter(k, mm)
            if err:
                return err
        km.vma.flags[vi] |= VM_MERGEABLE
    elif advice == MADV_UNMERGEABLE:
        if not km.vma.flags[vi] & VM_MERGEABLE:
            return 0
        if km.vma.anon_vma[vi]:
            err = unmerge_ksm_pages(k, vma, start, end)
            if err:
                return err
        km.vma.flags[vi] &= ~VM_MERGEABLE
    return 0


def ksm_add_vmas(k: Kernel, mm: int) -> None:
    for vma in mmops.vmas(k, mm):
        if vma_ksm_compatible(k, vma):
            k.km.vma.flags[k.km.vma.idx(vma, "ksm_add_vmas")] |= VM_MERGEABLE


def ksm_del_vmas(k: Kernel, mm: int) -> int:
    km = k.km
    for vma in list(mmops.vmas(k, mm)):
        vi = km.vma.idx(vma, "ksm_del_vmas")
        if not km.vma.flags[vi] & VM_MERGEABLE:
            continue
        if km.vma.anon_vma[vi]:
            err = unmerge_ksm_pages(k, vma, int(km.vma.start[vi]), int(km.vma.end[vi]))
            if err:
                return err
        km.vma.flags[vi] &= ~VM_MERGEABLE
    return 0


def ksm_enable_merge_any(k: Kernel, mm: int) -> int:
    if mm_flags(k, mm) & MMF_VM_MERGE_ANY:
        return 0
    if not mm_flags(k, mm) & MMF_VM_MERGEABLE:
        err = __ksm_enter(k, mm)
        if err:
            return err
    set_mm_flag(k, mm, MMF_VM_MERGE_ANY)
    ksm_add_vmas(k, mm)
    return 0


def ksm_disable_merge_any(k: Kernel, mm: int) -> int:
    if not mm_flags(k, mm) & MMF_VM_MERGE_ANY:
        return 0
    err = ksm_del_vmas(k, mm)
    if err:
        ksm_add_vmas(k, mm)
        return err
    clear_mm_flag(k, mm, MMF_VM_MERGE_ANY)
    return 0


def ksm_vma_flags(k: Kernel, mm: int, flags: int) -> int:
    """A new mapping of a merge-any mm is born mergeable (and re-enters the mm if ksmd dropped it)."""
    if mm_flags(k, mm) & MMF_VM_MERGE_ANY and not flags & _INCOMPATIBLE:
        if not mm_flags(k, mm) & MMF_VM_MERGEABLE:
            __ksm_enter(k, mm)
        return flags | VM_MERGEABLE
    return flags


def ksm_fork(k: Kernel, mm: int, oldmm: int) -> int:
    """The child of a mergeable mm starts with zero KSM counters and its own slot."""
    km = k.km
    if not mm_flags(k, oldmm) & MMF_VM_MERGEABLE:
        return 0
    mi = km.mm.idx(mm, "ksm_fork")
    km.mm.ksm_merging_pages[mi] = 0
    km.mm.ksm_rmap_items[mi] = 0
    # Inherited KSM zero ptes are counted globally too.
    k.ksm_atomic["ksm_zero_pages"].add_return(0, int(km.mm.ksm_zero_pages[mi]))
    return __ksm_enter(k, mm)

