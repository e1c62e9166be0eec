# Swap: the swap area, the swap cache, and reading a page back in.
#
# A swap slot is one page of the run's swap segment; swap_map[slot] counts the
# swap ptes that refer to it plus one while a page is in the swap cache
# (swap_cache[slot] = pfn + 1, PG_SWAPCACHE, page->private = slot). Swap-in (the
# fault, do_swap_page(), is memory.py's as it is mm/memory.c's) looks the slot up in
# the swap cache first, so a page faulted back soon after reclaim is the very same
# page - a KSM page too. ksm_might_need_to_copy() decides whether
# that page may be mapped here or must be copied (seed 002: copy while run=2 is
# unmerging, so a KSM page cannot slip back in behind the unmerger; never copy
# from a !Uptodate page, let the fault report the I/O error).
from __future__ import annotations

import numpy as np

from actors.kernel import mm as mmops
from actors.kernel.context import Kernel
from actors.kernel.page import _node_for, put_page
from shared_mem.layout import (
    PG_ANON,
    PG_KSM,
    PG_SWAPCACHE,
    PG_UPTODATE,
)

KSM_RUN_UNMERGE = 2
SWAP_BAD = 1 << 40    # a slot whose reads fail (I/O error injection)


# -- slots --------------------------------------------------------------------------------
def get_swap_page(k: Kernel) -> int:
    """A free swap slot with one reference (the swap cache's), or -1."""
    km = k.km
    if km.swap is None:
        return -1
    with k.swap_lock:
        free = np.flatnonzero(km.swap_map == 0)
        if not len(free):
            return -1
        slot = int(free[0])
        km.swap_map[slot] = 1
    return slot


def swap_duplicate(k: Kernel, slot: int, why: str = "") -> None:
    with k.swap_lock:
        if (k.km.swap_map[slot] & ~SWAP_BAD) <= 0:
            raise RuntimeError(f"BUG: swap_duplicate of free swap entry {slot} ({why}), "
                               f"swap_cache {int(k.km.swap_cache[slot]) - 1}")
        k.km.swap_map[slot] += 1


def swap_free(k: Kernel, slot: int) -> None:
    """Drop one pte's reference; an unreferenced slot becomes free (its cache page too)."""
    km = k.km
    with k.swap_lock:
        cnt = int(km.swap_map[slot] & ~SWAP_BAD) - 1
        if cnt < 0:
            raise RuntimeError(f"BUG: swap_free of free swap entry {slot}")
        if cnt == 0 and km.swap_cache[slot]:
            raise RuntimeError(f"BUG: swap_free dropped the swap cache's reference of entry {slot}")
        km.swap_map[slot] = cnt | (int(km.swap_map[slot]) & SWAP_BAD)
        cached = int(km.swap_cache[slot]) - 1
    if cnt == 1 and cached >= 0:
        # Only the swap cache still holds it: try_to_free_swap().
        try_to_free_swap(k, cached, slot)


def add_to_swap_cache(k: Kernel, pfn: int, slot: int) -> None:
    km = k.km
    with k.swap_lock:
        km.swap_cache[slot] = pfn + 1
    km.page["flags"][pfn] |= PG_SWAPCACHE
    km.page["private"][pfn] = slot
    k.page_ref.inc_return(pfn)  # the swap cache's reference


def delete_from_swap_cache(k: Kernel, pfn: int) -> None:
    """The page leaves the swap cache and drops the cache's slot and page references."""
    km = k.km
    slot = int(km.page["private"][pfn])
    with k.swap_lock:
        if int(km.swap_cache[slot]) != pfn + 1:
            return
        km.swap_cache[slot] = 0
        cnt = int(km.swap_map[slot] & ~SWAP_BAD) - 1
        km.swap_map[slot] = cnt if cnt > 0 else 0
    km.page["flags"][pfn] &= ~PG_SWAPCACHE
    km.page["private"][pfn] = 0
    put_page(k, pfn)


def try_to_free_swap(k: Kernel, pfn: int, slot: int) -> bool:
    """Free the slot of a swap-cache page nobody maps through a swap pte any more."""
    km = k.km
    lock = k.page_lock(pfn)
    if not lock.trylock():
        return False
    try:
        if not km.page["flags"][pfn] & PG_SWAPCACHE or int(km.page["private"][pfn]) != slot:
            return False
        if int(km.swap_map[slot] & ~SWAP_BAD) != 1:
            return False
        delete_from_swap_cache(k, pfn)
        return True
    finally:
        lock.unlock()


def free_swap_cache(k: Kernel, pfn: int) -> None:
    """After an unmap: a swap-cache page nobody maps any more gives its slot back when no
    swap pte refers to it either (free_swap_cache() in the kernel's unmap path)."""
    km = k.km
    if km.page["flags"][pfn] & PG_SWAPCACHE and not km.page["mapcount"][pfn]:
        try_to_free_swap(k, pfn, int(km.page["private"][pfn]))


def drain_unused_swap_cache(k: Kernel) -> int:
    """Free every swap-cache page that nothing maps or references (reclaim's work on a
    quiet system); returns how many. For quiescent checks only."""
    km = k.km
    cand = np.flatnonzero((km.page["flags"] & PG_SWAPCACHE) != 0)
    return sum(1 for pfn in cand if not km.page["mapcount"][int(pfn)] and int(km.page["refcount"][int(pfn)]) == 1
               and try_to_free_swap(k, int(pfn), int(km.page["private"][int(pfn)])))


def swap_writepage(k: Kernel, pfn: int) -> None:
    slot = int(k.km.page["private"][pfn])
    k.km.swap[slot] = k.km.frames[pfn]


# -- swap-in ----------------------------------------------------------------------------------
def swap_cache_get(k: Kernel, slot: int) -> int:
    """lookup_swap_cache(): the cached page with a reference, or -1."""
    km = k.km
    with k.swap_lock:
        pfn = int(km.swap_cache[slot]) - 1
        if pfn >= 0:
            k.page_ref.inc_return(pfn)
    return pfn


def swapin_readpage(k: Kernel, mm: int, vma: int, slot: int) -> int:
    """Read a slot into a new swap-cache page (with our reference), or -1 on OOM."""
    km = k.km
    pfn = k.alloc_page(_node_for(k, mm, vma), site="swapin_readahead")
    if pfn is None:
        return -1
    km.frames[pfn] = km.swap[slot]
    bad = bool(km.swap_map[slot] & SWAP_BAD)
    km.page["flags"][pfn] = PG_ANON | (0 if bad else PG_UPTODATE)
    with k.swap_lock:
        cur = int(km.swap_cache[slot]) - 1
        if cur >= 0:  # somebody else read it in meanwhile: use theirs
            k.page_ref.inc_return(cur)
            racing = cur
        else:
            km.swap_cache[slot] = pfn + 1
            km.swap_map[slot] += 1
            racing = -1
    if racing >= 0:
        put_page(k, pfn)
        return racing
    km.page["flags"][pfn] |= PG_SWAPCACHE
    km.page["private"][pfn] = slot
    k.page_ref.inc_return(pfn)  # cache reference + ours
    return pfn


def ksm_might_need_to_copy(k: Kernel, pfn: int, vma: int, addr: int) -> int:
    """The page to map at addr: pfn itself, a private copy, or -1 (out of memory)."""
    km = k.km
    flags = int(km.page["flags"][pfn])
    vi = km.vma.idx(vma, "ksm_might_need_to_copy")
    if flags & PG_KSM:
        unmerging = k.ksm["run"] & KSM_RUN_UNMERGE and not k.variant("stale-stable-nodes:swapin-no-copy")
        if km.page["mapping"][pfn] and not unmerging:
            # When this decision (taken after reading run) was made: run=2's completion
            # check excuses a survivor mapped by a swap-in that read run just before
            # run=2 was stored (debug.check_unmerged).
            km.page["ksm_swpin_ns"][pfn] = k.clock.monotonic_ns()
            return pfn
    else:
        av = int(km.page["mapping"][pfn])
        if not av:
            return pfn
        vav = int(km.vma.anon_vma[vi])
        avs = km.anon_vma
        if (avs.valid(av) and vav and avs.root[avs.idx(av, "ksm_might_need_to_copy")]
                == avs.root[avs.idx(vav, "ksm_might_need_to_copy")]
                and int(km.page["index"][pfn]) == mmops.linear_page_index(k, vma, addr)):
            return pfn
    if not flags & PG_UPTODATE and not k.variant("stale-stable-nodes:copy-not-uptodate"):
        return pfn  # let do_swap_page report the read error
    mm = int(km.vma.mm[vi])
    new = k.alloc_page(_node_for(k, mm, vma), site="ksm_might_need_to_copy")
    if new is None:
        return -1
    km.frames[new] = km.frames[pfn]
    km.page["flags"][new] = PG_ANON | (flags & PG_UPTODATE) | PG_UPTODATE
    k.ksm_atomic["ksm_swpin_copy"].inc_return(0)
    k.ev("ksm_swpin_copy", pfn=pfn, new=new, ksm=bool(flags & PG_KSM))
    return new

