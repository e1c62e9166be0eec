# The page-fault path: mm/memory.c.
#
# handle_mm_fault() with do_anonymous_page(), do_wp_page()/wp_page_copy() (a write
# to a KSM page always copies: "do_wp_page() must COW them, unlike singly mapped
# PageAnons", seed 001), do_swap_page() over swap.py's swap cache, FAULT_FLAG_UNSHARE
# for break_ksm, the zero page, and zap_pte_range(); page references and mapcounts
# are page.py's. Like the kernel, new pages are allocated without the page
# table lock and installed under it only if the pte is still what the fault saw
# (pte_same), so a fault racing ksmd's write_protect_page/replace_page loses or
# wins cleanly. user_access() is the MMU: a task's load/store checks the pte and
# touches the frame atomically with respect to pte changes (under the ptl).
from __future__ import annotations

import numpy as np

from actors.kernel import debug, swap
from actors.kernel import mm as mmops
from actors.kernel.context import Kernel
from actors.kernel.page import (
    _node_for,
    get_page,
    page_add_anon_rmap,
    page_add_new_anon_rmap,
    page_remove_rmap,
    put_page,
)
from shared_mem.arena import handle_id
from shared_mem.layout import (
    PAGE_SHIFT,
    PAGE_SIZE,
    PG_ANON,
    PG_FREE,
    PG_KSM,
    PG_SWAPCACHE,
    PG_UPTODATE,
    PTE_ACCESSED,
    PTE_DIRTY,
    PTE_PFN_MASK,
    PTE_PRESENT,
    PTE_SPECIAL,
    PTE_SWAP,
    PTE_WRITE,
    PTRS_PER_PTE,
    VM_READ,
    VM_WRITE,
)

VM_FAULT_OOM = 0x001
VM_FAULT_SIGBUS = 0x002
VM_FAULT_WRITE = 0x008       # break_ksm: "we broke COW"
VM_FAULT_SIGSEGV = 0x040
VM_FAULT_RETRY = 0x400
VM_FAULT_ERROR = VM_FAULT_OOM | VM_FAULT_SIGBUS | VM_FAULT_SIGSEGV

FAULT_FLAG_WRITE = 0x01
FAULT_FLAG_UNSHARE = 0x02
FAULT_FLAG_REMOTE = 0x04
FAULT_FLAG_FORCE = 0x08      # FOLL_FORCE: /proc/PID/mem style access past protections

ZERO_PTE = PTE_PRESENT | PTE_SPECIAL            # read fault on an absent anon page
KSM_ZERO_PTE = PTE_PRESENT | PTE_SPECIAL | PTE_DIRTY   # is_ksm_zero_pte()


def is_ksm_zero_pte(pte: int) -> bool:
    return (pte & KSM_ZERO_PTE) == KSM_ZERO_PTE


def ksm_might_unmap_zero_page(k: Kernel, mm: int, pte: int) -> None:
    """A KSM-placed zero pte goes away: keep ksm_zero_pages (global and per mm) exact."""
    if is_ksm_zero_pte(pte):
        k.ksm_atomic["ksm_zero_pages"].dec_return(0)
        k.km.mm.atomic("ksm_zero_pages").dec_return(k.km.mm.idx(mm, "ksm_zero_pages"))


# -- zap ---------------------------------------------------------------------------------
def zap_pte(k: Kernel, mm: int, ptes: np.ndarray, j: int, addr: int | None = None) -> None:
    """Clear one pte and drop what it held (caller holds ptl)."""
    pte = int(ptes[j])
    if not pte:
        return
    ptes[j] = 0
    if pte & PTE_PRESENT:
        if pte & PTE_SPECIAL:
            ksm_might_unmap_zero_page(k, mm, pte)
            return
        pfn = pte & PTE_PFN_MASK
        if not debug.pte_page_ok(k, pfn):
            # print_bad_pte() in zap_pte_range(): report, drop the pte, touch no page.
            debug.bad_pte(k, mm, -1 if addr is None else addr, pte, "zap_pte_range")
            return
        page_remove_rmap(k, pfn)
        k.km.mm.atomic("rss_anon").dec_return(k.km.mm.idx(mm, "zap_pte_range"))
        if k.km.page["flags"][pfn] & PG_SWAPCACHE:
            swap.free_swap_cache(k, pfn)
        put_page(k, pfn)
    elif pte & PTE_SWAP:
        k.ev("zap_swap_entry", mm=handle_id(mm), slot=pte & PTE_PFN_MASK)
        swap.swap_free(k, pte & PTE_PFN_MASK)


def zap_page_range(k: Kernel, mm: int, start: int, end: int) -> int:
    """zap_page_range_single()/unmap_vmas(): returns the number of ptes cleared."""
    n = 0
    ptl = k.ptl(mm)
    for base, ptes, _cnt in mmops.pte_ranges(k, mm, start, end):
        if ptes is None:
            continue
        with ptl:
            for j in np.flatnonzero(ptes):
                zap_pte(k, mm, ptes, int(j), base + (int(j) << PAGE_SHIFT))
                n += 1
    return n


# -- the fault handler ---------------------------------------------------------------------
def handle_mm_fault(k: Kernel, vma: int, addr: int, flags: int) -> int:
    """Resolve one fault at addr in vma; caller holds mmap_read_lock. Returns VM_FAULT_* bits."""
    km = k.km
    vi = km.vma.idx(vma, "handle_mm_fault")
    mm = int(km.vma.mm[vi])
    vflags = int(km.vma.flags[vi])
    write = flags & FAULT_FLAG_WRITE
    # The vma access check is the user fault's (access_error()/GUP's check_vma_flags());
    # handle_mm_fault() itself has none, so break_ksm()'s remote unshare fault also
    # works on a PROT_NONE vma (ksm_functional_tests' test_prot_none).
    if not flags & (FAULT_FLAG_FORCE | FAULT_FLAG_REMOTE):
        if write and not vflags & VM_WRITE:
            return VM_FAULT_SIGSEGV
        if not vflags & (VM_READ | VM_WRITE):
            return VM_FAULT_SIGSEGV
    addr &= ~(PAGE_SIZE - 1)
    ptl = k.ptl(mm)
    with ptl:
        ptes, j = mmops.pte_table(k, mm, addr, alloc=True)
        pte = int(ptes[j])
    if pte == 0:
        return do_anonymous_page(k, mm, vma, addr, flags)
    if not pte & PTE_PRESENT:
        if pte & PTE_SWAP:
            return do_swap_page(k, mm, vma, addr, pte, flags)
        return VM_FAULT_SIGBUS
    if flags & (FAULT_FLAG_WRITE | FAULT_FLAG_UNSHARE) and not pte & PTE_WRITE:
        return do_wp_page(k, mm, vma, addr, pte, flags)
    if write:
        with ptl:
            if int(ptes[j]) == pte:
                ptes[j] = pte | PTE_DIRTY | PTE_ACCESSED
    return 0


def _exiting_2009(k: Kernel, mm: int) -> bool:
    """Seed 000's check in the fault paths (reverted by seed 001): a fault on an mm whose
    mm_users is 0 backs out doing nothing, so break_ksm cannot reinstate a pte after
    exit_mmap zapped the range. It also stops munlock's fault-in during exit_mmap."""
    return k.variant("munlock-exit-hang") and mmops.ksm_test_exit(k, mm)


def do_anonymous_page(k: Kernel, mm: int, vma: int, addr: int, flags: int) -> int:
    km = k.km
    ptl = k.ptl(mm)
    if not flags & (FAULT_FLAG_WRITE | FAULT_FLAG_FORCE):
        with ptl:
            ptes, j = mmops.pte_table(k, mm, addr, alloc=True)
            # 2.6.31 had no zero-page branch: every anonymous fault went through the
            # allocating path and its "|| ksm_test_exit(mm)"; the variant keeps that here.
            if int(ptes[j]) == 0 and not _exiting_2009(k, mm):
                ptes[j] = ZERO_PTE | int(k.ks.zero_pfn)
        return 0
    mmops.anon_vma_prepare(k, vma)
    pfn = k.alloc_page(_node_for(k, mm, vma), site="do_anonymous_page")
    if pfn is None:
        return VM_FAULT_OOM
    km.frames[pfn] = 0
    with ptl:
        ptes, j = mmops.pte_table(k, mm, addr, alloc=True)
        if int(ptes[j]) != 0 or _exiting_2009(k, mm):
            put_page(k, pfn)  # somebody else faulted it in (or, 2009, the mm is exiting)
            return 0
        page_add_new_anon_rmap(k, pfn, vma, addr)
        entry = pfn | PTE_PRESENT | PTE_DIRTY | PTE_ACCESSED
        if km.vma.flags[km.vma.idx(vma, "do_anonymous_page")] & VM_WRITE:
            entry |= PTE_WRITE
        ptes[j] = entry
        km.mm.atomic("rss_anon").inc_return(km.mm.idx(mm, "do_anonymous_page"))
    return 0


def do_wp_page(k: Kernel, mm: int, vma: int, addr: int, orig: int, flags: int) -> int:
    km = k.km
    unshare = flags & FAULT_FLAG_UNSHARE
    if orig & PTE_SPECIAL:
        if unshare and not is_ksm_zero_pte(orig):
            return 0
        return wp_page_copy(k, mm, vma, addr, orig, -1, flags)
    pfn = orig & PTE_PFN_MASK
    pflags = int(km.page["flags"][pfn])
    if pflags & PG_KSM:
        k.ksm_atomic["cow_ksm"].inc_return(0)
        return wp_page_copy(k, mm, vma, addr, orig, pfn, flags)
    if unshare:
        return 0
    ptl = k.ptl(mm)
    with ptl:
        ptes, j = mmops.pte_table(k, mm, addr)
        if ptes is None or int(ptes[j]) != orig:
            return 0
        # wp_can_reuse_anon_folio(): exclusively ours, nobody else holds a reference.
        if (not km.page["flags"][pfn] & (PG_KSM | PG_SWAPCACHE)
                and km.page["mapcount"][pfn] == 1 and km.page["refcount"][pfn] == 1):
            entry = orig | PTE_DIRTY | PTE_ACCESSED
            if km.vma.flags[km.vma.idx(vma, "do_wp_page")] & VM_WRITE:
                entry |= PTE_WRITE
            ptes[j] = entry
            return 0
        get_page(k, pfn)  # hold the old page while we copy it
    try:
        return wp_page_copy(k, mm, vma, addr, orig, pfn, flags)
    finally:
        put_page(k, pfn)


def wp_page_copy(k: Kernel, mm: int, vma: int, addr: int, orig: int, old: int, flags: int) -> int:
    """Copy-on-write: a private copy of old (or of the zero page when old < 0)."""
    km = k.km
    mmops.anon_vma_prepare(k, vma)
    new = k.alloc_page(_node_for(k, mm, vma), site="wp_page_copy")
    if new is None:
        return VM_FAULT_OOM
    if old < 0:
        km.frames[new] = 0
    else:
        km.frames[new] = km.frames[old]
    k.point("wp_page_copy")
    ptl = k.ptl(mm)
    with ptl:
        ptes, j = mmops.pte_table(k, mm, addr)
        if ptes is None or int(ptes[j]) != orig:
            put_page(k, new)  # the pte changed under us: let the access retry
            return 0
        page_add_new_anon_rmap(k, new, vma, addr)
        entry = new | PTE_PRESENT | PTE_DIRTY | PTE_ACCESSED
        if not flags & FAULT_FLAG_UNSHARE and km.vma.flags[km.vma.idx(vma, "wp_page_copy")] & VM_WRITE:
            entry |= PTE_WRITE
        ptes[j] = entry
        if old < 0:
            ksm_might_unmap_zero_page(k, mm, orig)
            km.mm.atomic("rss_anon").inc_return(km.mm.idx(mm, "wp_page_copy"))
        else:
            page_remove_rmap(k, old)
            put_page(k, old)
    k.ev("wp_page_copy", mm=handle_id(mm), addr=addr, old=old, new=new,
         ksm=bool(old >= 0 and km.page["flags"][old] & PG_KSM) or is_ksm_zero_pte(orig))
    return VM_FAULT_WRITE


def do_swap_page(k: Kernel, mm: int, vma: int, addr: int, orig: int, flags: int) -> int:
    """A fault on a swap pte: the page from the swap cache or read in, copied when
    ksm_might_need_to_copy() says so, mapped if the pte is still the one we saw."""
    km = k.km
    if km.swap is None:
        return VM_FAULT_SIGBUS
    slot = orig & PTE_PFN_MASK
    mmops.anon_vma_prepare(k, vma)
    page = swap.swap_cache_get(k, slot)
    if page < 0:
        page = swap.swapin_readpage(k, mm, vma, slot)
        if page < 0:
            return VM_FAULT_OOM
    lock = k.page_lock(page)
    lock.lock(site="do_swap_page")
    try:
        swapcache = page
        page = swap.ksm_might_need_to_copy(k, swapcache, vma, addr)
        if page < 0:
            put_page(k, swapcache)
            return VM_FAULT_OOM
        if not km.page["flags"][page] & PG_UPTODATE:
            put_page(k, swapcache)
            k.ev("swap_read_error", slot=slot, addr=addr)
            return VM_FAULT_SIGBUS
        ptl = k.ptl(mm)
        with ptl:
            ptes, j = mmops.pte_table(k, mm, addr)
            if ptes is None or int(ptes[j]) != orig:
                if page != swapcache:
                    put_page(k, page)
                put_page(k, swapcache)
                return 0
            pflags = int(km.page["flags"][page])
            if page == swapcache and (pflags & PG_KSM or km.page["mapping"][page]):
                page_add_anon_rmap(k, page)
            else:
                page_add_new_anon_rmap(k, page, vma, addr)
                if page == swapcache:
                    km.page["flags"][page] |= PG_SWAPCACHE
            entry = page | PTE_PRESENT | PTE_ACCESSED
            # Writable only if nobody else can reach this page: not KSM, mapped once, and
            # (for the swap-cache page) this pte was the slot's only swap reference -
            # a forked sibling still holding the entry must not see our stores.
            swap_refs = int(km.swap_map[slot] & ~swap.SWAP_BAD) - (1 if km.swap_cache[slot] else 0)
            exclusive = (not pflags & PG_KSM and km.page["mapcount"][page] == 1
                         and (page != swapcache or swap_refs == 1))
            if (flags & FAULT_FLAG_WRITE and not flags & FAULT_FLAG_UNSHARE and exclusive
                    and km.vma.flags[km.vma.idx(vma, "do_swap_page")] & VM_WRITE):
                entry |= PTE_WRITE | PTE_DIRTY
            ptes[j] = entry
            km.mm.atomic("rss_anon").inc_return(km.mm.idx(mm, "do_swap_page"))
        if page != swapcache:
            put_page(k, swapcache)  # we mapped a copy; the cached page keeps only its cache ref
        k.ev("do_swap_page", mm=handle_id(mm), addr=addr, slot=slot, pfn=page, copied=page != swapcache)
    finally:
        lock.unlock()
    swap.swap_free(k, slot)
    return 0


# -- ksmd's and GUP's view of a pte ------------------------------------------------------
def follow_page(k: Kernel, mm: int, addr: int) -> int:
    """The anon (or KSM) page mapped at addr with a reference taken, or -1."""
    ptl = k.ptl(mm)
    ptl.lock()
    try:
        pte = mmops.read_pte(k, mm, addr)
        if pte & (PTE_PRESENT | PTE_SPECIAL) != PTE_PRESENT:
            return -1
        pfn = pte & PTE_PFN_MASK
        if not k.page_flags[pfn] & (PG_ANON | PG_KSM):
            # A present pte of a free or reused frame (the hot path pays nothing for this).
            debug.bad_pte(k, mm, addr, pte, "follow_page")
            return -1
        get_page(k, pfn)
        return pfn
    finally:
        ptl.unlock()


def follow_pages(k: Kernel, mm: int, start: int, end: int, limit: int) -> tuple[list[tuple[int, int]], int]:
    """follow_page() of the present ptes in [start, end) up to the end of start's page
    table, under one hold of the ptl: ([(address, pfn with a reference)], the address
    after the last pte looked at). At most `limit` pages; a present pte of a frame that
    is not anon is reported and skipped, as follow_page() does (--scan vector)."""
    span_end = min(end, ((start >> PAGE_SHIFT) // PTRS_PER_PTE + 1) * PTRS_PER_PTE * PAGE_SIZE)
    ptl = k.ptl(mm)
    ptl.lock()
    try:
        ptes, i = mmops.pte_table(k, mm, start)
        if ptes is None:
            return [], span_end
        row = ptes[i : i + ((span_end - start) >> PAGE_SHIFT)]
        hit = np.flatnonzero((row & (PTE_PRESENT | PTE_SPECIAL)) == PTE_PRESENT)
        out: list[tuple[int, int]] = []
        stop = span_end
        for j, pte in zip(hit.tolist(), row[hit].tolist()):
            addr = start + (j << PAGE_SHIFT)
            pfn = pte & PTE_PFN_MASK
            if not k.page_flags[pfn] & (PG_ANON | PG_KSM):
                debug.bad_pte(k, mm, addr, pte, "follow_page")
                continue
            get_page(k, pfn)
            out.append((addr, pfn))
            if len(out) >= limit:
                stop = addr + PAGE_SIZE
                break
        return out, stop
    finally:
        ptl.unlock()


def next_present(k: Kernel, mm: int, start: int, end: int) -> int:
    """Address of the first present, non-special pte in [start, end), or end.

    A vectorized walk: ksmd skips holes a page table at a time, as the kernel's
    page walk skips empty pmds. The pte at start is looked at first on its own:
    in a populated area that is the answer, and one read is cheaper than a scan.
    """
    if start < end and mmops.read_pte(k, mm, start) & (PTE_PRESENT | PTE_SPECIAL) == PTE_PRESENT:
        return start
    for addr, ptes, _n in mmops.pte_ranges(k, mm, start, end):
        if ptes is None:
            continue
        hit = np.flatnonzero((ptes & (PTE_PRESENT | PTE_SPECIAL)) == PTE_PRESENT)
        if len(hit):
            return addr + (int(hit[0]) << PAGE_SHIFT)
    return end


# -- the MMU: user loads and stores ----------------------------------------------------------
def user_access(
    k: Kernel,
    mm: int,
    addr: int,
    length: int,
    write: bool,
    src: np.ndarray | int | None = None,
    dst: np.ndarray | None = None,
    force: bool = False,
    max_pages: int = 512,
) -> tuple[int, int]:
    """Perform as much of a user access as the ptes allow, atomically per page table.

    src: bytes to store (uint8 array) or an int fill value (memset); dst: buffer for loads.
    Returns (bytes done, fault address or -1). The caller faults the page at the fault
    address (through the fault handler) and calls again with the rest.
    """
    km = k.km
    done = 0
    end = addr + length
    ptl = k.ptl(mm)
    frames = km.frames
    pflags = km.page["flags"]
    pmap = km.page["mapcount"]
    while addr + done < end:
        cur = addr + done
        with ptl:
            ptes, j = mmops.pte_table(k, mm, cur)
            if ptes is None:
                return done, cur
            pages = 0
            while cur < end and j < len(ptes) and pages < max_pages:
                pte = int(ptes[j])
                if not pte & PTE_PRESENT:
                    return done, cur
                pfn = pte & PTE_PFN_MASK
                pf = int(pflags[pfn])
                if not pte & PTE_SPECIAL and (pf & PG_FREE or not pf & (PG_ANON | PG_KSM) or pmap[pfn] <= 0):
                    # The CPU would load/store the frame anyway: report, then do it.
                    debug.bad_pte(k, mm, cur, pte, "user_access")
                if write:
                    if force and not pte & PTE_WRITE:
                        # FOLL_FORCE store: only into an exclusive anonymous page.
                        if pte & PTE_SPECIAL or pflags[pfn] & PG_KSM or pmap[pfn] != 1:
                            return done, cur
                    elif not pte & PTE_WRITE:
                        return done, cur
                off = cur & (PAGE_SIZE - 1)
                n = min(PAGE_SIZE - off, end - cur)
                if write:
                    if isinstance(src, int):
                        frames[pfn, off:off + n] = src
                    else:
                        frames[pfn, off:off + n] = src[done:done + n]
                    ptes[j] = pte | PTE_DIRTY | PTE_ACCESSED
                else:
                    dst[done:done + n] = frames[pfn, off:off + n]
                    if not pte & PTE_ACCESSED:
                        ptes[j] = pte | PTE_ACCESSED
                done += n
                cur += n
                j += 1
                pages += 1
    return done, -1
