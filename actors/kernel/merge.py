# Merging one page into another, and undoing it: the page-table side of mm/ksm.c.
#
# write_protect_page() makes the pte read-only and clean under the ptl, refusing
# pages someone else holds a reference to (mapcount + 1 + swapcache == refcount,
# the kernel's GUP-pin check); replace_page() swaps the pte over to the KSM page
# only if it is still exactly the pte write_protect_page left (pte_same), so a
# racing COW fault makes the merge fail instead of losing a write. break_ksm()
# undoes a merge with an UNSHARE fault, and every path that takes an mm's
# mmap_lock backs out once the mm is exiting (ksm_test_exit, seed 000).
from __future__ import annotations

import numpy as np

from actors.kernel import mm as mmops
from actors.kernel.context import Kernel
from actors.kernel.memory import (
    FAULT_FLAG_REMOTE,
    FAULT_FLAG_UNSHARE,
    KSM_ZERO_PTE,
    VM_FAULT_OOM,
    VM_FAULT_SIGBUS,
    VM_FAULT_SIGSEGV,
    follow_page,
    get_page,
    handle_mm_fault,
    is_ksm_zero_pte,
    page_add_anon_rmap,
    page_remove_rmap,
    put_page,
)
from actors.kernel.rmap import PAGE_MASK, remove_rmap_item_from_tree, stable_tree_append
from actors.kernel.stable_tree import EBUSY, folio_set_stable_node, ksm_get_folio
from shared_mem.arena import NULL, handle_id
from shared_mem.layout import (
    PAGE_SHIFT,
    PAGE_SIZE,
    PG_ANON,
    PG_DIRTY,
    PG_KSM,
    PG_REFERENCED,
    PG_SWAPCACHE,
    PTE_ACCESSED,
    PTE_DIRTY,
    PTE_PFN_MASK,
    PTE_PRESENT,
    PTE_SPECIAL,
    PTE_WRITE,
    PTRS_PER_PTE,
    VM_MERGEABLE,
)

EFAULT = -14
ENOMEM = -12
ERESTARTSYS = -512


def find_mergeable_vma(k: Kernel, mm: int, addr: int) -> int:
    if mmops.ksm_test_exit(k, mm):
        return NULL
    # vma_lookup() written out, so that the vma is dereferenced (and checked) once
    vma = mmops.find_vma(k, mm, addr)
    if not vma:
        return NULL
    va = k.km.vma
    vi = va.idx(vma, "find_mergeable_vma")
    if va.start[vi] > addr or not va.flags[vi] & VM_MERGEABLE or not va.anon_vma[vi]:
        return NULL
    return vma


def write_protect_page(k: Kernel, mm: int, addr: int, pfn: int) -> int:
    """Returns the new (read-only, clean) pte, or 0 on failure."""
    with k.ptl(mm):
        ptes, j = mmops.pte_table(k, mm, addr)
        return 0 if ptes is None else _write_protect_pte(k, ptes, j, pfn)


def _write_protect_pte(k: Kernel, ptes: np.ndarray, j: int, pfn: int) -> int:
    """write_protect_page()'s work on pte j of ptes, under the ptl."""
    km = k.km
    pte = int(ptes[j])
    if not pte & PTE_PRESENT or pte & PTE_SPECIAL or pte & PTE_PFN_MASK != pfn:
        return 0
    if pte & (PTE_WRITE | PTE_DIRTY):
        swapped = 1 if km.page["flags"][pfn] & PG_SWAPCACHE else 0
        ptes[j] = 0  # ptep_clear_flush: no CPU can store through it now
        if km.page["mapcount"][pfn] + 1 + swapped != km.page["refcount"][pfn]:
            ptes[j] = pte
            k.ev("ksm_write_protect_fail", pfn=pfn, why="extra reference",
                 mapcount=int(km.page["mapcount"][pfn]), refcount=int(km.page["refcount"][pfn]))
            return 0
        if pte & PTE_DIRTY:
            km.page["flags"][pfn] |= PG_DIRTY
        pte &= ~(PTE_WRITE | PTE_DIRTY)
        ptes[j] = pte
    return pte


def replace_page(k: Kernel, mm: int, addr: int, pfn: int, kpfn: int, orig_pte: int) -> int:
    with k.ptl(mm):
        ptes, j = mmops.pte_table(k, mm, addr)
        if ptes is None or int(ptes[j]) != orig_pte:
            return EFAULT
        _replace_pte(k, mm, ptes, j, pfn, kpfn)
    return 0


def _replace_pte(k: Kernel, mm: int, ptes: np.ndarray, j: int, pfn: int, kpfn: int) -> None:
    """replace_page()'s work once pte_same() held: pte j maps kpfn instead of pfn."""
    km = k.km
    if kpfn != int(k.ks.zero_pfn):
        get_page(k, kpfn)
        page_add_anon_rmap(k, kpfn)
        newpte = kpfn | PTE_PRESENT | PTE_ACCESSED
    else:
        newpte = KSM_ZERO_PTE | kpfn
        k.ksm_atomic["ksm_zero_pages"].inc_return(0)
        mi = km.mm.idx(mm, "replace_page")
        km.mm.atomic("ksm_zero_pages").inc_return(mi)
        km.mm.atomic("rss_anon").dec_return(mi)
    ptes[j] = newpte
    page_remove_rmap(k, pfn)
    put_page(k, pfn)


def try_to_merge_one_page(k: Kernel, vma: int, addr: int, pfn: int, kpfn: int) -> int:
    """Merge the page at addr into kpfn; kpfn < 0 makes pfn itself a KSM page."""
    km = k.km
    if pfn == kpfn:  # a KSM page forked
        return 0
    if not km.page["flags"][pfn] & PG_ANON:
        return EFAULT
    lock = k.page_lock(pfn)
    if not lock.trylock():
        k.ev("ksm_merge_one_page", pfn=pfn, kpfn=kpfn, err=EFAULT, why="page locked")
        return EFAULT
    err = EFAULT
    try:
        mm = int(km.vma.mm[km.vma.idx(vma, "try_to_merge_one_page")])
        orig = write_protect_page(k, mm, addr, pfn)
        k.point("try_to_merge_one_page.write_protected")
        if orig:
            if kpfn < 0:
                folio_set_stable_node(k, pfn, NULL)
                km.page["flags"][pfn] |= PG_REFERENCED | PG_DIRTY
                err = 0
            elif k.cmp.identical(pfn, kpfn):
                err = replace_page(k, mm, addr, pfn, kpfn, orig)
    finally:
        lock.unlock()
    k.ev("ksm_merge_one_page", pfn=pfn, kpfn=kpfn, mm=handle_id(mm), addr=addr, err=err)
    return err


def try_to_merge_with_ksm_page(k: Kernel, item: int, pfn: int, kpfn: int) -> int:
    km = k.km
    ii = km.rmap_item.idx(item, "try_to_merge_with_ksm_page")
    mm = int(km.rmap_item.mm[ii])
    addr = int(km.rmap_item.address[ii]) & PAGE_MASK
    err = EFAULT
    lock = k.mmap_lock(mm, "try_to_merge_with_ksm_page")
    lock.down_read(site="try_to_merge_with_ksm_page")
    try:
        vma = find_mergeable_vma(k, mm, addr)
        if not vma:
            return EFAULT
        err = try_to_merge_one_page(k, vma, addr, pfn, kpfn)
        if err:
            return err
        # Unstable tree membership ends here; the anon_vma reference is taken while
        # mmap_lock still pins the vma (seed 004).
        remove_rmap_item_from_tree(k, item)
        av = int(km.vma.anon_vma[km.vma.idx(vma, "try_to_merge_with_ksm_page")])
        if not k.variant("rmap-no-anon-vma"):
            mmops.get_anon_vma(k, av)
            km.rmap_item.anon_vma[ii] = av
        if kpfn >= 0:
            k.ev("ksm_merge_with_ksm_page", kpfn=kpfn, pfn=pfn, rmap_item=ii,
                 mm=handle_id(mm), addr=addr)
    finally:
        lock.up_read()
    return err


# What became of one of try_to_merge_with_ksm_pages()'s merges besides 0 (merged) and
# the errors try_to_merge_with_ksm_page() returns: the KSM page's lock was busy (the
# search's EBUSY: the page is left for the next pass), or the page must take the
# page-by-page path after all (it no longer matches its KSM page, which may be gone).
MERGE_EBUSY, MERGE_RETRY = 1, 2


def try_to_merge_with_ksm_pages(k: Kernel, merges: list[tuple[int, int, int]]) -> list[int]:
    """cmp_and_merge_page()'s stable-tree merges for a run of one mm's pages (--scan
    vector), each (rmap_item, page, stable node) found identical to a regular node with
    room for all of the run's merges into it, in scan order; the caller holds each page's
    reference. Returns each merge's result: 0, MERGE_EBUSY, MERGE_RETRY or an error.

    Per page it does what stable_tree_search()'s last step, try_to_merge_with_ksm_page()
    and stable_tree_append() do, with the locks for a run instead of for each page
    (docs/DECISIONS.md, "Merges into the stable tree a run at a time"):
    - each KSM page is looked up and found unlocked (ksm_get_folio, trylock) once, and
      its reference held across all its merges;
    - one down_read of the mmap_lock covers the run, one hold of the ptl each page
      table's merges, and within it each page is write-protected, compared and replaced
      under its own folio trylock, as try_to_merge_one_page() does;
    - after the mmap_lock is dropped, each KSM page is locked once to hang all its new
      rmap_items on its node, in scan order (hlist_add_head, as one call each would).
    A page whose bytes no longer match its KSM page's before anything is locked (it
    changed since its checksum), or whose node went stale, is MERGE_RETRY."""
    km = k.km
    ri, sn = km.rmap_item, km.stable_node
    out = [MERGE_RETRY] * len(merges)
    if not merges:
        return out
    items = np.array([m[0] for m in merges], dtype=np.int64)
    pfns = np.array([m[1] for m in merges], dtype=np.int64)
    nodes = np.array([m[2] for m in merges], dtype=np.int64)
    kp, live = sn.peek_many(nodes, "kpfn")
    ok = live & ((k.page_flags[kp] & PG_KSM) != 0) & (k.page_mapping[kp] == nodes)
    ok[ok] = k.cmp.memcmp_batch(pfns[ok], kp[ok]) == 0
    kpfn_of: dict[int, int] = {}
    for node in dict.fromkeys(nodes[ok].tolist()):
        kpfn = ksm_get_folio(k, node, trylock=True)  # _stable_match(): busy or stale
        if kpfn >= 0:
            k.page_lock(kpfn).unlock()
        kpfn_of[node] = kpfn
    todo = []
    for n in np.flatnonzero(ok).tolist():
        kpfn = kpfn_of[int(nodes[n])]
        if kpfn == EBUSY:
            out[n] = MERGE_EBUSY
        elif kpfn >= 0:
            todo.append(n)
    ii = ri.idx_many(items, "try_to_merge_with_ksm_page")
    mms = ri.mm[ii]
    addrs = ri.address[ii] & PAGE_MASK
    done: list[int] = []
    s = 0
    while s < len(todo):  # one mm at a time (a run is one mm's pages)
        mm = int(mms[todo[s]])
        e = s
        while e < len(todo) and int(mms[todo[e]]) == mm:
            e += 1
        done += _merge_into_ksm_pages(k, mm, todo[s:e], items, pfns, addrs, nodes, kpfn_of, out)
        s = e
    by_kpfn: dict[int, list[int]] = {}
    for n in done:
        by_kpfn.setdefault(kpfn_of[int(nodes[n])], []).append(n)
    for kpfn, ns in by_kpfn.items():
        lock = k.page_lock(kpfn)
        lock.lock(site="cmp_and_merge_page")
        try:
            knode = int(k.page_mapping[kpfn])
            if knode:
                for n in ns:
                    stable_tree_append(k, int(items[n]), knode, False)
        finally:
            lock.unlock()
    for kpfn in kpfn_of.values():
        if kpfn >= 0:
            put_page(k, kpfn)
    return out


def _merge_into_ksm_pages(
    k: Kernel, mm: int, todo: list[int], items: np.ndarray, pfns: np.ndarray, addrs: np.ndarray,
    nodes: np.ndarray, kpfn_of: dict[int, int], out: list[int],
) -> list[int]:
    """try_to_merge_with_ksm_pages()'s merges of one mm under one down_read; returns
    the ones made."""
    km = k.km
    ri, va = km.rmap_item, km.vma
    flags = km.page["flags"]
    made: list[int] = []
    lock = k.mmap_lock(mm, "try_to_merge_with_ksm_page")
    lock.down_read(site="try_to_merge_with_ksm_page")
    try:
        t = 0
        while t < len(todo):
            table = (int(addrs[todo[t]]) >> PAGE_SHIFT) // PTRS_PER_PTE
            u = t
            while u < len(todo) and (int(addrs[todo[u]]) >> PAGE_SHIFT) // PTRS_PER_PTE == table:
                u += 1
            # find_mergeable_vma() once a table and vma: ksm_test_exit() is asked again
            # for every page table, as it is for every page table of the scan
            vma, vstart, vend = NULL, 0, 0
            with k.ptl(mm):
                for n in todo[t:u]:
                    addr, pfn, kpfn = int(addrs[n]), int(pfns[n]), kpfn_of[int(nodes[n])]
                    if not vstart <= addr < vend:
                        vma = find_mergeable_vma(k, mm, addr)
                        vstart = vend = 0
                        if vma:
                            vi = va.idx(vma, "find_mergeable_vma")
                            vstart, vend = int(va.start[vi]), int(va.end[vi])
                    out[n] = err = EFAULT
                    if not vma or not flags[pfn] & PG_ANON:
                        continue
                    plock = k.page_lock(pfn)
                    if not plock.trylock():
                        k.ev("ksm_merge_one_page", pfn=pfn, kpfn=kpfn, err=EFAULT, why="page locked")
                        continue
                    try:
                        ptes, j = mmops.pte_table(k, mm, addr)
                        if ptes is not None and _write_protect_pte(k, ptes, j, pfn) and k.cmp.identical(pfn, kpfn):
                            _replace_pte(k, mm, ptes, j, pfn, kpfn)
                            err = 0
                    finally:
                        plock.unlock()
                    k.ev("ksm_merge_one_page", pfn=pfn, kpfn=kpfn, mm=handle_id(mm), addr=addr, err=err)
                    out[n] = err
                    if err:
                        continue
                    av = int(va.anon_vma[va.idx(vma, "try_to_merge_with_ksm_page")])
                    ii = ri.idx(int(items[n]), "try_to_merge_with_ksm_page")
                    if not k.variant("rmap-no-anon-vma"):
                        mmops.get_anon_vma(k, av)
                        ri.anon_vma[ii] = av
                    k.ev("ksm_merge_with_ksm_page", kpfn=kpfn, pfn=pfn, rmap_item=ii, mm=handle_id(mm), addr=addr)
                    made.append(n)
            t = u
    finally:
        lock.up_read()
    return made


def try_to_merge_two_pages(k: Kernel, item: int, pfn: int, tree_item: int, tree_pfn: int) -> int:
    """Returns the new KSM page (pfn) or -1."""
    err = try_to_merge_with_ksm_page(k, item, pfn, -1)
    if not err:
        err = try_to_merge_with_ksm_page(k, tree_item, tree_pfn, pfn)
        if err:
            break_cow(k, item)
    return -1 if err else pfn


def try_to_merge_with_zero_page(k: Kernel, item: int, pfn: int) -> int:
    """0 when the page was replaced by the zero page (or its vma is gone)."""
    km = k.km
    ii = km.rmap_item.idx(item, "try_to_merge_with_zero_page")
    if not k.ks.use_zero_pages or int(km.rmap_item.oldchecksum[ii]) != int(k.ks.zero_checksum):
        return EFAULT
    mm = int(km.rmap_item.mm[ii])
    addr = int(km.rmap_item.address[ii]) & PAGE_MASK
    lock = k.mmap_lock(mm, "try_to_merge_with_zero_page")
    lock.down_read(site="try_to_merge_with_zero_page")
    try:
        vma = find_mergeable_vma(k, mm, addr)
        if not vma:
            return 0
        return try_to_merge_one_page(k, vma, addr, pfn, int(k.ks.zero_pfn))
    finally:
        lock.up_read()


def _ksm_mapping_at(k: Kernel, mm: int, addr: int) -> bool:
    with k.ptl(mm):
        pte = mmops.read_pte(k, mm, addr)
    if not pte & PTE_PRESENT:
        return False
    if pte & PTE_SPECIAL:
        return is_ksm_zero_pte(pte)
    return bool(k.km.page["flags"][pte & PTE_PFN_MASK] & PG_KSM)


def break_ksm(k: Kernel, vma: int, addr: int) -> int:
    """Fault in a private copy of the KSM page at addr, if there is one. -ENOMEM on OOM."""
    mm = int(k.km.vma.mm[k.km.vma.idx(vma, "break_ksm")])
    while True:
        if not _ksm_mapping_at(k, mm, addr):
            return 0
        k.point("break_ksm")
        ret = handle_mm_fault(k, vma, addr, FAULT_FLAG_UNSHARE | FAULT_FLAG_REMOTE)
        if ret & (VM_FAULT_SIGBUS | VM_FAULT_SIGSEGV | VM_FAULT_OOM):
            return ENOMEM if ret & VM_FAULT_OOM else 0


def break_cow(k: Kernel, item: int) -> None:
    """Undo a merge that could not be completed (drops the item's anon_vma reference)."""
    km = k.km
    ii = km.rmap_item.idx(item, "break_cow")
    av = int(km.rmap_item.anon_vma[ii])
    if av:
        mmops.put_anon_vma(k, av)
        km.rmap_item.anon_vma[ii] = NULL
    mm = int(km.rmap_item.mm[ii])
    addr = int(km.rmap_item.address[ii]) & PAGE_MASK
    lock = k.mmap_lock(mm, "break_cow")
    lock.down_read(site="break_cow")
    try:
        vma = find_mergeable_vma(k, mm, addr)
        if vma:
            break_ksm(k, vma, addr)
    finally:
        lock.up_read()


def ksm_addresses(k: Kernel, mm: int, start: int, end: int) -> list[int]:
    """Addresses in [start, end) mapping a KSM page or the KSM zero page (vectorized)."""
    km = k.km
    out: list[int] = []
    for a, ptes, _n in mmops.pte_ranges(k, mm, start, end):
        if ptes is None:
            continue
        present = (ptes & PTE_PRESENT) != 0
        special = (ptes & PTE_SPECIAL) != 0
        pfns = ptes & PTE_PFN_MASK
        ksm = present & ~special & ((km.page["flags"][np.where(present & ~special, pfns, 0)] & PG_KSM) != 0)
        kzero = (ptes & KSM_ZERO_PTE) == KSM_ZERO_PTE
        for j in np.flatnonzero(ksm | kzero):
            out.append(a + int(j) * PAGE_SIZE)
    return out


def unmerge_ksm_pages(k: Kernel, vma: int, start: int, end: int) -> int:
    """Break every KSM mapping in [start, end) of vma (caller holds mmap_lock)."""
    mm = int(k.km.vma.mm[k.km.vma.idx(vma, "unmerge_ksm_pages")])
    for addr in ksm_addresses(k, mm, start, end):
        if mmops.ksm_test_exit(k, mm):
            break
        if k.fatal_signal_pending():
            return ERESTARTSYS
        err = break_ksm(k, vma, addr)
        if err:
            return err
    return 0


def get_mergeable_page(k: Kernel, item: int) -> int:
    """The anon page an unstable-tree item still maps (with a reference), or -1."""
    km = k.km
    ii = km.rmap_item.idx(item, "get_mergeable_page")
    mm = int(km.rmap_item.mm[ii])
    addr = int(km.rmap_item.address[ii]) & PAGE_MASK
    lock = k.mmap_lock(mm, "get_mergeable_page")
    lock.down_read(site="get_mergeable_page")
    try:
        vma = find_mergeable_vma(k, mm, addr)
        if not vma:
            return -1
        return follow_page(k, mm, addr)
    finally:
        lock.up_read()
