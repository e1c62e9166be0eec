# Reclaim: page_referenced, try_to_unmap and pageout, with KSM's rmap walk.
#
# mm/vmscan.c reduced to anonymous memory: a page is aged with page_referenced()
# (test-and-clear the accessed bit of every pte mapping it), added to the swap
# cache, unmapped everywhere with try_to_unmap() (each pte becomes a swap entry),
# written to its slot and finally dropped from the swap cache. Anonymous pages are
# found through their anon_vma (the 2009 layout: one anon_vma per vma family, its
# list of vmas). KSM pages are found through their stable node: rmap_walk_ksm()
# visits each rmap_item's anon_vma, first only the vma of the item's own mm, then
# - search_new_forks - the other mms' vmas on the same anon_vma, which is how a
# child forked after ksmd merged the page is found (seed 004). Reverting seed 004
# (variant rmap-no-anon-vma) walks only (item->mm, item->address), the 2009 stopgap
# that misses the forked child's pte.
#
# Who reclaims. kswapd_balance() is one kswapd wakeup (balance_pgdat): the first zone
# whose free frames are under its low watermark is shrunk towards its high watermark.
# try_to_free_pages() is direct reclaim for an allocation that found nothing: one lap of
# the clock hand honouring the accessed bits and, if that freed nothing, a second lap
# that ignores them (better swap a young page than call the OOM killer). Both take and
# return the clock hand, which their caller (kswapd) keeps between calls, and neither
# sleeps: when to run them is the caller's. reclaim_parked() is the invariant checker's
# handshake: while it asks, reclaim stands still between pages.
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from actors.kernel import debug, swap
from actors.kernel import mm as mmops
from actors.kernel.context import Kernel
from actors.kernel.hlist import items_of_node
from actors.kernel.memory import put_page
from shared_mem.arena import NULL
from shared_mem.layout import (
    PAGE_MASK,
    PAGE_SHIFT,
    PG_ANON,
    PG_DIRTY,
    PG_FREE,
    PG_KSM,
    PG_MLOCKED,
    PG_RESERVED,
    PG_SWAPCACHE,
    PTE_ACCESSED,
    PTE_DIRTY,
    PTE_PFN_MASK,
    PTE_PRESENT,
    PTE_SPECIAL,
    PTE_SWAP,
    VM_LOCKED,
)

# A visitor returns True to go on walking, False to stop.
Visitor = Callable[[int, int, int], bool]   # (vma, mm, addr)


def _vmas_of_anon_vma(k: Kernel, av: int) -> list[int]:
    km = k.km
    out = []
    v = int(km.anon_vma.head[km.anon_vma.idx(av, "anon_vma_walk")])
    while v:
        out.append(v)
        v = int(km.vma.anon_next[km.vma.idx(v, "anon_vma_walk")])
    # anon_vma_link() pushes at the head; walk oldest first, the kernel's list_add_tail
    # order. That order is what makes a walk racing fork() complete: the parent's pte is
    # visited before the child's, so a pte copied to the child before the walk reached
    # the parent is found in the child, and one copied after is already a swap entry.
    out.reverse()
    return out


def folio_lock_anon_vma_read(k: Kernel, pfn: int) -> int:
    """The anon_vma of a mapped anonymous page, read-locked; NULL if it has none.

    Reclaim holds a reference to the page, not to its anon_vma: the page's last mapper
    may exit meanwhile, zap its pte and free the anon_vma (the page keeps a stale
    ->mapping until it is freed). As mm/rmap.c does, read ->mapping only while the page
    is mapped, take the lock of whatever anon_vma that slot holds now (typesafe by RCU),
    and check again under the lock: a page still mapped with the same ->mapping has a
    vma on that anon_vma's list, and unlinking the last vma needs the write lock we now
    keep out, so the anon_vma lives until we unlock. Found as a KASAN report in a soak
    (kswapd against exits); `ksmlab sim reclaim-exit` is its interleaving."""
    km = k.km
    av = int(km.page["mapping"][pfn])
    if not av or not km.page["mapcount"][pfn]:
        return NULL
    lock = k.anon_vma_lock_typesafe(av)
    lock.down_read(site="folio_lock_anon_vma_read")
    if km.page["mapcount"][pfn] and int(km.page["mapping"][pfn]) == av and km.anon_vma.valid(av):
        return av
    lock.up_read()
    return NULL


def rmap_walk_anon(k: Kernel, pfn: int, visit: Visitor) -> None:
    km = k.km
    av = folio_lock_anon_vma_read(k, pfn)
    if not av:
        return
    try:
        index = int(km.page["index"][pfn])
        for vma in _vmas_of_anon_vma(k, av):
            vi = km.vma.idx(vma, "rmap_walk_anon")
            addr = int(km.vma.start[vi]) + ((index - int(km.vma.pgoff[vi])) << PAGE_SHIFT)
            if not int(km.vma.start[vi]) <= addr < int(km.vma.end[vi]):
                continue
            if not visit(vma, int(km.vma.mm[vi]), addr):
                return
    finally:
        k.anon_vma_lock(av).up_read()


def rmap_walk_ksm(k: Kernel, pfn: int, visit: Visitor) -> None:
    """Visit every pte that may map a KSM page (the page must be locked)."""
    km = k.km
    node = int(km.page["mapping"][pfn])
    if not node or not km.stable_node.valid(node):
        return
    ri = km.rmap_item
    if k.variant("rmap-no-anon-vma"):
        # Before seed 004: only the (mm, address) each rmap_item records.
        for item in items_of_node(k, node):
            ii = ri.idx(item, "rmap_walk_ksm")
            mm = int(ri.mm[ii])
            addr = int(ri.address[ii]) & PAGE_MASK
            vma = mmops.vma_lookup(k, mm, addr) if km.mm.valid(mm) else 0
            if vma and not visit(vma, mm, addr):
                return
        return
    for search_new_forks in (False, True):
        for item in items_of_node(k, node):
            ii = ri.idx(item, "rmap_walk_ksm")
            av = int(ri.anon_vma[ii])
            if not av:
                continue
            addr = int(ri.address[ii]) & PAGE_MASK
            item_mm = int(ri.mm[ii])
            with k.anon_vma_lock(av).read():
                for vma in _vmas_of_anon_vma(k, av):
                    vi = km.vma.idx(vma, "rmap_walk_ksm")
                    if not int(km.vma.start[vi]) <= addr < int(km.vma.end[vi]):
                        continue
                    vmm = int(km.vma.mm[vi])
                    # First pass: the vma of the item's own mm; then the others (forks).
                    if (vmm == item_mm) == search_new_forks:
                        continue
                    if not visit(vma, vmm, addr):
                        return
        if not km.page["mapcount"][pfn]:
            return


def rmap_walk(k: Kernel, pfn: int, visit: Visitor) -> None:
    if k.km.page["flags"][pfn] & PG_KSM:
        rmap_walk_ksm(k, pfn, visit)
    else:
        rmap_walk_anon(k, pfn, visit)


def _pte_of(k: Kernel, mm: int, addr: int):
    ptes, j = mmops.pte_table(k, mm, addr)
    return ptes, j


def page_referenced(k: Kernel, pfn: int) -> int:
    """page_referenced() / page_referenced_ksm(): count and clear young ptes."""
    n = 0
    mapcount = int(k.km.page["mapcount"][pfn])

    def visit(vma: int, mm: int, addr: int) -> bool:
        nonlocal n, mapcount
        with k.ptl(mm):
            ptes, j = _pte_of(k, mm, addr)
            if ptes is None:
                return True
            pte = int(ptes[j])
            if pte & PTE_PRESENT and not pte & PTE_SPECIAL and pte & PTE_PFN_MASK == pfn:
                mapcount -= 1
                if pte & PTE_ACCESSED:
                    ptes[j] = pte & ~PTE_ACCESSED
                    n += 1
        return mapcount > 0

    rmap_walk(k, pfn, visit)
    return n


def try_to_unmap(k: Kernel, pfn: int) -> bool:
    """Replace every pte of a swap-cache page with its swap entry; True if none is left."""
    km = k.km
    slot = int(km.page["private"][pfn])

    visited: set[tuple[int, int]] = set()
    stopped = False

    def visit(vma: int, mm: int, addr: int) -> bool:
        nonlocal stopped
        vi = km.vma.idx(vma, "try_to_unmap_one")
        mi = km.mm.idx(mm, "try_to_unmap_one")
        if km.vma.flags[vi] & VM_LOCKED:
            stopped = True
            return False  # mlocked: it stays
        visited.add((mm, addr))
        with k.ptl(mm):
            ptes, j = _pte_of(k, mm, addr)
            if ptes is None:
                return True
            pte = int(ptes[j])
            if not pte & PTE_PRESENT or pte & PTE_SPECIAL or pte & PTE_PFN_MASK != pfn:
                return True
            if pte & PTE_DIRTY:
                km.page["flags"][pfn] |= PG_DIRTY
            swap.swap_duplicate(k, slot, f"try_to_unmap pfn {pfn} mm {mi} addr {addr:#x}")
            ptes[j] = slot | PTE_SWAP
            k.page_map.dec_return(pfn)
            km.mm.atomic("rss_anon").dec_return(mi)
            put_page(k, pfn)
        k.ev("try_to_unmap_one", pfn=pfn, mm=mi, addr=addr, slot=slot)
        return km.page["mapcount"][pfn] > 0

    rmap_walk(k, pfn, visit)
    if km.page["mapcount"][pfn] and not stopped:
        # A complete walk that left the page mapped: was every pte reachable? (debug.py;
        # our caller, shrink_page, holds one reference besides the mappings and the cache.)
        debug.check_rmap_walk(k, pfn, visited, "try_to_unmap")
    return km.page["mapcount"][pfn] == 0


def shrink_page(k: Kernel, pfn: int, force: bool = False, async_write: bool = False) -> str:
    """Try to reclaim one page frame. Returns what happened (for events and tests).

    async_write: the write to swap is asynchronous, as to a disk: the page is left in
    the swap cache, unmapped and unlocked, and "writeback" is returned; the caller frees
    it later (free_written_page). In between a fault finds it in the swap cache and maps
    it again - for a KSM page, the very page with its stable node (seed 002)."""
    km = k.km
    flags = int(km.page["flags"][pfn])
    if flags & (PG_FREE | PG_RESERVED) or not flags & (PG_ANON | PG_KSM):
        return "skip"
    why = _pin_and_trylock(k, pfn)
    if why:
        return why
    lock = k.page_lock(pfn)
    try:
        flags = int(km.page["flags"][pfn])
        if flags & PG_FREE or not flags & (PG_ANON | PG_KSM):
            return "skip"
        if flags & PG_MLOCKED:
            return "mlocked"
        if not flags & PG_SWAPCACHE:
            if km.page["mapcount"][pfn] == 0:
                return "unmapped"
            if not force and page_referenced(k, pfn):
                return "referenced"
            slot = swap.get_swap_page(k)
            if slot < 0:
                return "no_swap"
            swap.add_to_swap_cache(k, pfn, slot)
            k.point("shrink_page.added_to_swap_cache")
        if km.page["mapcount"][pfn] and not try_to_unmap(k, pfn):
            k.ev("shrink_page", pfn=pfn, result="still_mapped", ksm=bool(flags & PG_KSM),
                 mapcount=int(km.page["mapcount"][pfn]))
            return "still_mapped"
        swap.swap_writepage(k, pfn)
        if async_write:
            k.ev("shrink_page", pfn=pfn, result="writeback", ksm=bool(flags & PG_KSM))
            return "writeback"
        return _free_if_unused(k, pfn, flags)
    finally:
        lock.unlock()
        put_page(k, pfn)


def _pin_and_trylock(k: Kernel, pfn: int) -> str:
    """Reclaim's grip on a frame: a reference, then the page lock without waiting.
    "" when both are held; otherwise why not ("skip": being freed, "busy": locked)."""
    if not k.page_ref.inc_not_zero(pfn):
        return "skip"
    if not k.page_lock(pfn).trylock():
        put_page(k, pfn)
        return "busy"
    return ""


def _free_if_unused(k: Kernel, pfn: int, flags: int) -> str:
    # Only the swap cache and our reference are left: the page can go.
    if k.km.page["refcount"][pfn] != 2 or k.km.page["mapcount"][pfn]:
        return "busy_ref"
    swap.delete_from_swap_cache(k, pfn)
    k.ev("shrink_page", pfn=pfn, result="freed", ksm=bool(flags & PG_KSM))
    return "freed"


def free_written_page(k: Kernel, pfn: int) -> str:
    """The end of an asynchronous write: free the page if it is still in the swap cache
    and nobody mapped or took it meanwhile (a fault that mapped it back keeps it)."""
    km = k.km
    why = _pin_and_trylock(k, pfn)
    if why:
        return why
    lock = k.page_lock(pfn)
    try:
        flags = int(km.page["flags"][pfn])
        if not flags & PG_SWAPCACHE:
            return "skip"
        return _free_if_unused(k, pfn, flags)
    finally:
        lock.unlock()
        put_page(k, pfn)


def shrink_pages(k: Kernel, nr: int, start: int = 1, force: bool = False) -> tuple[int, int]:
    """kswapd's pass: scan frames like a clock hand from `start`; returns (freed, next hand)."""
    km = k.km
    n = km.geo.nr_frames
    freed = 0
    order = np.concatenate([np.arange(start, n), np.arange(1, start)])
    flags = km.page["flags"][order]
    cands = order[((flags & (PG_ANON | PG_KSM)) != 0) & ((flags & (PG_FREE | PG_RESERVED)) == 0)]
    hand = start
    written: list[int] = []
    for pfn in cands:
        pfn = int(pfn)
        hand = pfn + 1 if pfn + 1 < n else 1
        r = shrink_page(k, pfn, force, async_write=True)
        if r == "freed":
            freed += 1
        elif r == "writeback":
            written.append(pfn)
        if freed + len(written) >= nr:
            break
    if written:
        # The writes complete; until then the pages sit in the swap cache, unmapped.
        k.point("shrink_page.writeback")
        freed += sum(free_written_page(k, pfn) == "freed" for pfn in written)
    return freed, hand


def kswapd_balance(k: Kernel, hand: int) -> int:
    """One kswapd wakeup: shrink the first zone under its low watermark up to its high
    watermark. Returns the new clock hand."""
    for z in k.km.zones:
        if int(z["nr_free"]) < int(z["low_watermark"]):
            want = int(z["high_watermark"]) - int(z["nr_free"])
            freed, hand = shrink_pages(k, want, hand)
            k.ev("kswapd_balance", want=want, freed=freed)
            break
    return hand


def try_to_free_pages(k: Kernel, nr: int, hand: int, force: bool = False) -> tuple[int, int]:
    """Direct reclaim of up to nr frames; returns (freed, new clock hand)."""
    freed, hand = shrink_pages(k, nr, hand, force)
    if not freed:  # a second lap ignores the accessed bits: better swap than OOM
        freed, hand = shrink_pages(k, nr, hand, True)
    return freed, hand


def reclaim_parked(k: Kernel) -> bool:
    """The invariant checker asked reclaim to stand still (between pages): say so."""
    ksm = k.ksm
    if ksm["reclaim_paused"]:
        ksm["reclaim_paused"] = 2
        return True
    return False
