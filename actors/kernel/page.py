# struct page: references, mapcounts and the anonymous rmap of one frame.
#
# The few operations every path that holds or maps a page shares, below both the fault
# path (memory.py) and the swap cache (swap.py), which is why they sit in a module of
# their own: get_page()/put_page() (include/linux/mm.h; the last put frees the frame
# through free_pages_prepare(), whose bad-page check is debug.py's),
# page_add_new_anon_rmap()/page_add_anon_rmap()/page_remove_rmap() (mm/rmap.c: a new
# anonymous page gets its anon_vma, index and first mapping; later mappings and unmaps
# count in page->_mapcount), and the node a new page for a vma comes from
# (get_vma_policy(): the vma's mbind node, else the task's).
from __future__ import annotations

from typing import TYPE_CHECKING

from actors.kernel import debug
from actors.kernel import mm as mmops
from shared_mem.layout import PG_ANON, PG_DIRTY, PG_MLOCKED, PG_UPTODATE, VM_LOCKED

if TYPE_CHECKING:
    from actors.kernel.context import Kernel


# -- struct page reference counting ------------------------------------------------------
def get_page(k: Kernel, pfn: int) -> None:
    k.page_ref.inc_return(pfn)


def put_page(k: Kernel, pfn: int) -> None:
    c = k.page_ref.dec_return(pfn)
    if c <= 0 and _last_put(k, pfn, c):
        k.alloc.free(pfn)


def put_pages(k: Kernel, pfns: list[int]) -> None:
    """put_page() of each page in turn; the frames whose last reference went are freed
    together, in the same order, under one hold of each zone's lock (free_pages_bulk)."""
    freed: list[int] = []
    try:
        for pfn in pfns:
            c = k.page_ref.dec_return(pfn)
            if c <= 0 and _last_put(k, pfn, c):
                freed.append(pfn)
    finally:
        if freed:
            k.alloc.free_many(freed)


def _last_put(k: Kernel, pfn: int, c: int) -> bool:
    """After the reference count of pfn fell to c <= 0: whether to free the frame."""
    if c == 0:
        # free_pages_prepare(): a frame still mapped, in the swap cache, ... is reported
        # and kept off the free lists (debug.py), as the kernel leaks a bad page.
        return debug.free_page_prepare(k, pfn)
    debug.bad_page(k, pfn, "page_ref_dec underflow: put_page on a page with refcount 0", "put_page")
    raise RuntimeError(f"BUG: Bad page state in process {k.actor}  pfn:{pfn} refcount:{c}")


# -- the anonymous rmap counters -----------------------------------------------------------
def page_add_new_anon_rmap(k: Kernel, pfn: int, vma: int, addr: int) -> None:
    km = k.km
    vi = km.vma.idx(vma, "page_add_new_anon_rmap")
    flags = PG_ANON | PG_UPTODATE | PG_DIRTY
    if km.vma.flags[vi] & VM_LOCKED:
        flags |= PG_MLOCKED
    km.page["flags"][pfn] = flags
    km.page["mapping"][pfn] = km.vma.anon_vma[vi]
    km.page["index"][pfn] = mmops.linear_page_index(k, vma, addr)
    km.page["mapcount"][pfn] = 1


def page_add_anon_rmap(k: Kernel, pfn: int) -> None:
    k.page_map.inc_return(pfn)


def page_remove_rmap(k: Kernel, pfn: int) -> None:
    c = k.page_map.dec_return(pfn)
    if c < 0:
        debug.bad_page(k, pfn, "page_remove_rmap: mapcount underflow", "page_remove_rmap")
        raise RuntimeError(f"BUG: Bad page state in process {k.actor}  pfn:{pfn} mapcount:{c}")
    if c == 0:
        k.km.page["flags"][pfn] &= ~PG_MLOCKED


# -- where a new page comes from --------------------------------------------------------------
def _node_for(k: Kernel, mm: int, vma: int) -> int:
    """The vma's memory policy node (mbind/numa_alloc_onnode), else the task's."""
    nid = int(k.km.vma.nid[k.km.vma.idx(vma, "get_vma_policy")])
    return nid if nid >= 0 else int(k.km.mm.nid[k.km.mm.idx(mm, "get_vma_policy")])
