# ksmd's work: ksm_do_scan(), scan_get_next_rmap_item(), cmp_and_merge_page(),
# and run=2's unmerge_and_remove_all_rmap_items().
#
# Follows today's mm/ksm.c step by step, with the seed fixes in place and their
# reverts behind variant switches: ksm_test_exit() wherever an mm's mmap_lock is
# taken (seed 000), up_read(mmap_lock) before spin_unlock(ksm_mmlist_lock) when
# ksmd keeps a slot (seed 003), the re-check of an emptied list after the cursor
# leaves ksm_mm_head (CVE-2011-2183), remove_all_stable_nodes() after unmerge
# (seed 002). Named schedule points sit in the windows those commits describe.
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from actors.kernel import mm as mmops
from actors.kernel import mm_slot as slots
from actors.kernel.advisor import advisor_start_scan, advisor_stop_scan
from actors.kernel.context import Kernel
from actors.kernel.memory import follow_page, follow_pages, next_present, put_page
from actors.kernel.merge import (
    ERESTARTSYS,
    MERGE_RETRY,
    break_cow,
    get_mergeable_page,
    try_to_merge_two_pages,
    try_to_merge_with_ksm_page,
    try_to_merge_with_ksm_pages,
    try_to_merge_with_zero_page,
    unmerge_ksm_pages,
)
from actors.kernel.page import put_pages
from actors.kernel.rmap import (
    Link,
    cursor_link,
    get_next_rmap_item,
    get_next_rmap_items_new,
    remove_rmap_item_from_tree,
    remove_rmap_items_from_old_unstable_tree,
    remove_trailing_rmap_items,
    set_cursor_link,
    stable_tree_append,
    unstable_root,
)
from actors.kernel.stable_tree import (
    EBUSY,
    NODE_REGULAR,
    STABLE_MISS,
    is_page_sharing_candidate,
    remove_all_stable_nodes,
    stable_root,
    stable_tree_insert,
    stable_tree_search,
)
from actors.kernel.tree_walk import (
    MergeableAreas,
    descend,
    stable_page,
    stable_pages,
    unstable_page,
    unstable_pages,
    walk_end,
)
from actors.kernel.unstable_build import unstable_tree_build
from actors.kernel.unstable_tree import unstable_tree_insert_at, unstable_tree_search_insert
from shared_mem.arena import NULL, handle_id
from shared_mem.layout import (
    MMF_VM_MERGE_ANY,
    MMF_VM_MERGEABLE,
    PAGE_MASK,
    PAGE_SIZE,
    PG_KSM,
    STABLE_FLAG,
    UNSTABLE_FLAG,
    VM_MERGEABLE,
)

KSM_RUN_STOP, KSM_RUN_MERGE, KSM_RUN_UNMERGE = 0, 1, 2
U8_MAX = 255


# Smart scan's skips by age (mm/ksm.c skip_age()): up to age 3 one pass, up to 5 two, up to
# 8 four, beyond that eight. One table for the per-page and the array decisions.
SKIP_AGE_STEPS = ((3, 1), (5, 2), (8, 4))
SKIP_AGE_MAX = 8
_SKIP_AGE_ABOVE = np.array([a for a, _ in SKIP_AGE_STEPS])
_SKIP_AGES = np.array([s for _, s in SKIP_AGE_STEPS] + [SKIP_AGE_MAX])


def skip_age(age: int) -> int:
    for upto, skips in SKIP_AGE_STEPS:
        if age <= upto:
            return skips
    return SKIP_AGE_MAX


def should_skip_rmap_item(k: Kernel, pfn: int, item: int) -> bool:
    """Smart scan: pages that stayed unmergeable are visited less and less often."""
    if not k.ks.smart_scan:
        return False
    ri = k.km.rmap_item
    ii = ri.idx(item, "should_skip_rmap_item")
    # Only a KSM folio is spared (mm/ksm.c): an item still marked stable after its page
    # was COW-broken ages like any other, or its skips would come a pass late.
    if k.page_flags[pfn] & PG_KSM:
        return False
    age = int(ri.age[ii])
    if age != U8_MAX:
        ri.age[ii] = age + 1
    if age < 3:
        return False
    if not ri.remaining_skips[ii]:
        ri.remaining_skips[ii] = skip_age(age)
        return False
    k.ks.pages_skipped += 1
    ri.remaining_skips[ii] -= 1
    remove_rmap_item_from_tree(k, item)
    return True


def should_skip_rmap_items(k: Kernel, items: np.ndarray, pfns: np.ndarray) -> np.ndarray:
    """should_skip_rmap_item() of distinct items, as calls in their order would decide:
    each decision reads and writes only its own item's age and skips (and a page flag
    nothing here changes). The skipped items then leave their trees in order."""
    ri = k.km.rmap_item
    skip = np.zeros(len(items), dtype=bool)
    if not k.ks.smart_scan or not len(items):
        return skip
    ii = ri.idx_many(items, "should_skip_rmap_item")
    aging = (k.page_flags[pfns] & PG_KSM) == 0
    age = ri.age[ii].astype(np.int64)
    bump = aging & (age != U8_MAX)
    ri.age[ii[bump]] = age[bump] + 1
    rem = ri.remaining_skips[ii].astype(np.int64)
    old = aging & (age >= 3)
    start = old & (rem == 0)
    ri.remaining_skips[ii[start]] = _SKIP_AGES[np.searchsorted(_SKIP_AGE_ABOVE, age[start])]
    skip = old & (rem != 0)
    ri.remaining_skips[ii[skip]] = rem[skip] - 1
    k.ks.pages_skipped += int(skip.sum())
    for item in items[skip].tolist():
        remove_rmap_item_from_tree(k, item)
    return skip


def _mm_flags_clear(k: Kernel, mm: int, bits: int) -> None:
    k.km.mm.atomic("flags").clear_bits(k.km.mm.idx(mm, "clear_bit"), bits)


def scan_get_next_rmap_item(k: Kernel) -> tuple[int, int]:
    """Advance the cursor to the next anonymous page of a mergeable vma.

    Returns (rmap_item, pfn with a reference), or (NULL, -1) at the end of a full scan,
    when the list is empty, or when no rmap_item could be allocated.
    """
    got, _ = scan_get_next_rmap_items(k, 1)
    return got[0] if got else (NULL, -1)


def scan_get_next_rmap_items(k: Kernel, want: int, vector: bool = False) -> tuple[list[tuple[int, int]], bool]:
    """scan_get_next_rmap_item() for a run of up to `want` pages of one mm.

    With want=1 this is the kernel's function, taking the mm's mmap_lock for each page.
    With more, the run stays under one down_read of that mmap_lock while the cursor
    moves over the mm's pages (the vectorized scan's "a lock for a run of pages",
    docs/DECISIONS.md), and ends at the mm's last page: the next call moves the cursor
    to the next mm, as the kernel's next call would. The cursor is where the kernel's
    would be after returning the run's last page. Returns the run and whether it ended
    because no rmap_item could be allocated (the batch ends there, as the kernel's does).
    An empty run: the end of a full scan, an empty list of mms, or no rmap_item.

    `vector` (--scan vector): the ptes are read a page table at a time under one hold of
    its ptl (follow_pages), and ksm_test_exit() is asked once per page table, not per page.
    """
    km = k.km
    ks = k.ks  # the ksm record: ks.scan_address is ksm_scan.address, and so on
    if slots.list_empty(k):
        return [], False
    head = slots.head(k)
    slot = ks.scan_slot
    if slot == head:
        advisor_start_scan(k)
        k.ev("ksm_start_scan", seqnr=ks.seqnr, rmap_entries=ks.rmap_items)
        for nid in range(km.geo.nr_nodes):
            ks.root_unstable[nid] = NULL
        # CVE-2011-2183's window: the list was not empty above, but a racing
        # __ksm_exit may take the last mm off it before the cursor moves.
        k.point("scan_get_next_rmap_item.before_cursor_advance")
        k.ksm_mmlist_lock.lock(site="scan_get_next_rmap_item")
        slot = slots.next_slot(k, head)
        ks.scan_slot = slot
        k.ksm_mmlist_lock.unlock()
        k.point("scan_get_next_rmap_item.after_cursor_advance")
        if slot == head and not k.variant("cve-2011-2183"):
            # A racing __ksm_exit removed the last mm since list_empty() above.
            k.ev("ksm_scan_list_emptied")
            return [], False
        ks.scan_address = 0
        set_cursor_link(k, Link(slot, True))

    vstart_of, vend_of, vflags_of, vanon_of = km.vma.start, km.vma.end, km.vma.flags, km.vma.anon_vma
    run: list[tuple[int, int]] = []
    while True:  # next_mm
        mm = int(km.mm_slot.mm[km.mm_slot.idx(slot, "scan_get_next_rmap_item")])
        lock = k.mmap_lock(mm, "scan_get_next_rmap_item")
        lock.down_read(site="scan_get_next_rmap_item")
        exiting = mmops.ksm_test_exit(k, mm)
        if not exiting:
            for vma in list(mmops.vmas(k, mm)):
                vi = km.vma.idx(vma, "scan_get_next_rmap_item")
                vstart, vend = int(vstart_of[vi]), int(vend_of[vi])
                if vend <= ks.scan_address:
                    continue
                if not vflags_of[vi] & VM_MERGEABLE:
                    continue
                if ks.scan_address < vstart:
                    ks.scan_address = vstart
                if not vanon_of[vi]:
                    ks.scan_address = vend
                while ks.scan_address < vend:
                    if mmops.ksm_test_exit(k, mm):
                        break
                    if vector:
                        if end := _collect_table(k, mm, slot, vend, want, run):
                            lock.up_read()
                            return run, end == STARVED
                        continue
                    addr = next_present(k, mm, ks.scan_address, vend)
                    ks.scan_address = addr
                    if addr >= vend:
                        break
                    pfn = follow_page(k, mm, addr)
                    if pfn >= 0:
                        link = cursor_link(k)
                        item = get_next_rmap_item(k, slot, link, addr)
                        if item:
                            set_cursor_link(k, Link(item, False))
                            if should_skip_rmap_item(k, pfn, item):
                                put_page(k, pfn)
                                ks.scan_address = addr + PAGE_SIZE
                                continue
                            ks.scan_address = addr + PAGE_SIZE
                        else:
                            put_page(k, pfn)
                            lock.up_read()
                            return run, True  # out of rmap_items: this batch ends here
                        run.append((item, pfn))
                        if len(run) >= want:
                            lock.up_read()
                            return run, False
                        continue
                    ks.scan_address = addr + PAGE_SIZE
            if run:
                # The mm's last page is in the run: the next call moves to the next mm.
                lock.up_read()
                return run, False
            exiting = mmops.ksm_test_exit(k, mm)
        if exiting:
            ks.scan_address = 0
            set_cursor_link(k, Link(slot, True))
        # Nuke the rmap_items above the cursor: no mergeable vma covers them now.
        remove_trailing_rmap_items(k, cursor_link(k))

        k.ksm_mmlist_lock.lock(site="scan_get_next_rmap_item")
        ks.scan_slot = slots.next_slot(k, slot)
        if ks.scan_address == 0:
            # No mergeable vma left (or the mm is exiting): unregister it, as
            # __ksm_exit would, and drop the slot's mm_count reference.
            slots.hash_del(k, slot)
            slots.list_del(k, slot)
            k.ksm_mmlist_lock.unlock()
            km.mm_slot.free(slot, site="scan_get_next_rmap_item")
            _mm_flags_clear(k, mm, MMF_VM_MERGEABLE)
            k.ev("ksm_remove_mm", mm=handle_id(mm), exiting=bool(exiting))
            lock.up_read()
            mmops.mmdrop(k, mm, site="ksmd:mmdrop")
        elif k.variant("mmput-race"):
            # The 2016 order: once the spinlock is dropped, __ksm_exit may free mm.
            k.ksm_mmlist_lock.unlock()
            k.point("scan_get_next_rmap_item.before_up_read")
            k.mmap_lock(mm, "up_read").up_read()
        else:
            lock.up_read()
            k.point("scan_get_next_rmap_item.before_spin_unlock")
            k.ksm_mmlist_lock.unlock()

        slot = ks.scan_slot
        if slot != head:
            ks.scan_address = 0
            set_cursor_link(k, Link(slot, True))
            continue
        advisor_stop_scan(k)
        k.ev("ksm_stop_scan", seqnr=ks.seqnr, rmap_entries=ks.rmap_items)
        ks.seqnr += 1
        return [], False


# How a page table's part of a run ends (_collect_table): the run goes on to the next
# table, it is full, or it ends because no rmap_item could be allocated (the batch ends
# there too, as ksm_do_scan() ends when scan_get_next_rmap_item() returns NULL).
GO_ON, FULL, STARVED = 0, 1, 2


def _collect_table(k: Kernel, mm: int, slot: int, vend: int, want: int, run: list[tuple[int, int]]) -> int:
    """One page table's part of scan_get_next_rmap_items(): the loop body of each page
    in it, from the cursor, with the ptes read by follow_pages(). GO_ON, FULL or STARVED;
    the cursor is where the per-page loop's would be. (The run can only fill at the
    table's last page, follow_pages() stopping there, so `stop` is then that page's end.)"""
    ks = k.ks
    got, stop = follow_pages(k, mm, ks.scan_address, vend, want - len(run))
    if got and _all_new(k, got[-1][0]):
        n = _collect_new(k, slot, got, run)
    else:
        n = _collect_each(k, slot, got, run)
    if n < len(got):  # out of rmap_items: the run ends at the first page without one
        for _, p in got[n:]:
            put_page(k, p)
        ks.scan_address = got[n][0]
        return STARVED
    ks.scan_address = stop
    return FULL if len(run) >= want else GO_ON


def _collect_each(k: Kernel, slot: int, got: list[tuple[int, int]], run: list[tuple[int, int]]) -> int:
    """The pages of `got` page by page: get_next_rmap_item(), should_skip_rmap_item(),
    into the run. Returns how many pages got an rmap_item.

    The pages whose items already follow the cursor in order (every page of a table
    on a steady pass) are taken first, by following the list: get_next_rmap_item()
    would return each of them at once, and the cursor would end on the last. Only the
    skip decisions remain to be made, in order; they touch no list link."""
    ks = k.ks
    ri = k.km.rmap_item
    address, rmap_next = ri.address, ri.rmap_next
    start = len(run)
    nxt = cursor_link(k).get(k)
    n = 0
    while nxt and n < len(got):
        ii = ri.idx(nxt, "get_next_rmap_item")
        if int(address[ii]) & PAGE_MASK != got[n][0]:
            break
        run.append((nxt, got[n][1]))
        nxt = int(rmap_next[ii])
        n += 1
    if n:
        set_cursor_link(k, Link(run[-1][0], False))
        ks.scan_address = got[n - 1][0] + PAGE_SIZE
        if ks.smart_scan:
            items = np.fromiter((it for it, _ in run[start:]), dtype=np.int64, count=n)
            pfns = np.fromiter((pf for _, pf in run[start:]), dtype=np.int64, count=n)
            skip = should_skip_rmap_items(k, items, pfns).tolist()
            for pfn, s in zip(pfns.tolist(), skip, strict=True):
                if s:
                    put_page(k, pfn)
            run[start:] = [p for p, s in zip(run[start:], skip, strict=True) if not s]
    for j in range(n, len(got)):
        addr, pfn = got[j]
        item = get_next_rmap_item(k, slot, cursor_link(k), addr)
        if not item:
            return j
        set_cursor_link(k, Link(item, False))
        ks.scan_address = addr + PAGE_SIZE
        if not _skipped(k, pfn, item):
            run.append((item, pfn))
    return len(got)


def _skipped(k: Kernel, pfn: int, item: int) -> bool:
    """should_skip_rmap_item(), letting go of the page's reference when it is skipped."""
    if should_skip_rmap_item(k, pfn, item):
        put_page(k, pfn)
        return True
    return False


def _all_new(k: Kernel, last: int) -> bool:
    """No rmap_item at the cursor up to address `last`: the list ends at the cursor, or
    its next item is above. (A new mm's first pass, a new area: every page of the table
    gets a new item, and get_next_rmap_item() would free none.)"""
    nxt = cursor_link(k).get(k)
    ri = k.km.rmap_item
    return not nxt or int(ri.address[ri.idx(nxt, "get_next_rmap_item")]) & PAGE_MASK > last


def _collect_new(k: Kernel, slot: int, got: list[tuple[int, int]], run: list[tuple[int, int]]) -> int:
    """_collect_each() of pages that all get new rmap_items: allocated and linked at once
    (get_next_rmap_items_new). A new item is never skipped: should_skip_rmap_item() only
    ages it from 0 to 1, and not when its page is already a KSM page (a KSM fork)."""
    items = get_next_rmap_items_new(k, slot, cursor_link(k), [a for a, _ in got])
    n = len(items)
    if not n:
        return 0
    pfns = [p for _, p in got[:n]]
    if k.ks.smart_scan:
        ri = k.km.rmap_item
        fresh = (k.page_flags[pfns] & PG_KSM) == 0
        ri.age[ri.idx_many(items[fresh], "should_skip_rmap_item")] = 1
    set_cursor_link(k, Link(int(items[-1]), False))
    run.extend(zip(items.tolist(), pfns))
    return n


def cmp_and_merge_page(
    k: Kernel, pfn: int, item: int, checksum: int | None = None, stable_hint: int = NULL, unstable_hint: int = NULL,
    stable_end: Callable[[], tuple[int, int, bool] | None] | None = None,
) -> None:
    """Try to merge the page at item with an identical one, in the stable tree first.

    `checksum`: calc_checksum(pfn) already taken by the vectorized scan (None: take it).
    The hints are what the vector scan's optimistic walks found (stable_tree_search(),
    unstable_tree_search_insert()); `stable_end`, where the page's stable walk ends in
    the tree as it is when asked (tree_walk.walk_end), for stable_tree_insert() once the
    page became a KSM page."""
    km = k.km
    ri = km.rmap_item
    ii = ri.idx(item, "cmp_and_merge_page")
    bypass = False
    pflags = int(k.page_flags[pfn])
    node = int(k.page_mapping[pfn]) if pflags & PG_KSM else NULL
    if node and km.stable_node.valid(node):
        if int(ri.head[ii]) == node:
            return
        # A KSM fork: the page may go past max_page_sharing without a warning.
        if not is_page_sharing_candidate(k, node):
            bypass = True
    else:
        remove_rmap_item_from_tree(k, item)
        if checksum is None:
            checksum = k.cmp.checksum(pfn)
        if int(ri.oldchecksum[ii]) != checksum:
            ri.oldchecksum[ii] = checksum
            return
        if not try_to_merge_with_zero_page(k, item, pfn):
            return

    kpfn = stable_tree_search(k, pfn, stable_hint)
    if kpfn == pfn and node and int(ri.head[ii]) == node:
        put_page(k, kpfn)
        return
    remove_rmap_item_from_tree(k, item)
    if kpfn == EBUSY:
        return
    if kpfn >= 0:
        err = try_to_merge_with_ksm_page(k, item, pfn, kpfn)
        if not err:
            lock = k.page_lock(kpfn)
            lock.lock(site="cmp_and_merge_page")
            try:
                knode = int(k.page_mapping[kpfn])
                if knode:
                    stable_tree_append(k, item, knode, bypass)
            finally:
                lock.unlock()
        put_page(k, kpfn)
        return

    tree_item, tree_pfn = unstable_tree_search_insert(k, item, pfn, unstable_hint)
    if tree_item:
        kpage = try_to_merge_two_pages(k, item, pfn, tree_item, tree_pfn)
        put_page(k, tree_pfn)
        if kpage >= 0:
            lock = k.page_lock(kpage)
            lock.lock(site="cmp_and_merge_page")
            try:
                end = stable_end() if stable_end is not None else None
                snode = stable_tree_insert(k, kpage, (end[1], end[2]) if end and not end[0] else None)
                if snode:
                    stable_tree_append(k, tree_item, snode, False)
                    stable_tree_append(k, item, snode, False)
            finally:
                lock.unlock()
            if not snode:
                break_cow(k, tree_item)
                break_cow(k, item)


def ksm_do_scan(k: Kernel, scan_npages: int) -> int:
    """One batch of ksmd work; returns the number of pages scanned."""
    ks = k.ks
    n = 0
    while n < scan_npages:
        item, pfn = scan_get_next_rmap_item(k)
        if not item:
            break
        try:
            cmp_and_merge_page(k, pfn, item)
        finally:
            put_page(k, pfn)
        ks.pages_scanned += 1
        n += 1
    return n


def cmp_and_merge_batch(k: Kernel, run: list[tuple[int, int]], vector: bool = False) -> None:
    """cmp_and_merge_page() for a run of scanned pages, the work done on arrays first.

    One numpy pass checksums every page that is not KSM's; then the run is split three
    ways on arrays. Pages that need nothing are done at once: a KSM page already on the
    stable node its rmap_item names (cmp_and_merge_page returns at once), and a page in
    no tree whose checksum changed (only oldchecksum is updated). Every other page goes
    through cmp_and_merge_page() in scan order, with the kernel's locks and trees, as the
    exact scan would, with its checksum precomputed.

    A page reference held across another page's merge would change that merge: a page
    shared by a fork (mapcount > 1) may be the tree page or the merged page of an
    earlier item, and write_protect_page() counts references. So the run keeps its
    references only on the pages only one pte maps (no other item can meet them), and
    the rest are let go now and looked up again when their turn comes, as
    get_mergeable_page() does for a tree item. A page whose pte changed meanwhile is
    simply checksummed again then.

    `vector` (--scan vector): the pages that would walk the trees are descended through
    them together first (tree_walk.py); at its turn a page whose walks miss both trees
    joins the unstable tree without a page-by-page walk, and any other goes through
    cmp_and_merge_page() with what its walks found (_cmp_and_merge_walked).
    """
    km = k.km
    ri = km.rmap_item
    pg = km.page
    items = np.fromiter((it for it, _ in run), dtype=np.int64, count=len(run))
    pfns = np.fromiter((pf for _, pf in run), dtype=np.int64, count=len(run))
    ii = ri.idx_many(items, "cmp_and_merge_batch")
    flags = k.page_flags[pfns]
    is_ksm = (flags & PG_KSM) != 0
    node = np.where(is_ksm, pg["mapping"][pfns], 0)
    on_node = is_ksm & (ri.head[ii] == node) & km.stable_node.valid_many(node)
    plain = ~is_ksm
    cks = np.zeros(len(run), dtype=np.int64)
    cks[plain] = k.cmp.checksum_batch(pfns[plain])
    in_tree = (ri.address[ii] & (STABLE_FLAG | UNSTABLE_FLAG)) != 0
    changed = plain & ~in_tree & (cks != ri.oldchecksum[ii])
    ri.oldchecksum[ii[changed]] = cks[changed]
    todo = ~(on_node | changed)
    _, first, counts = np.unique(pfns, return_index=True, return_counts=True)
    once = np.zeros(len(run), dtype=bool)
    once[first[counts == 1]] = True
    keep = todo & plain & once & (pg["mapcount"][pfns] == 1)
    for j in np.flatnonzero(~keep):
        put_page(k, int(pfns[j]))
    at = -1
    walks = None
    try:
        walks = _descend_run(k, items, pfns, cks, todo & keep, todo & ~plain) if vector else None
        if walks is not None:
            todo = todo & ~_hold_misses(walks, items, pfns)
        for j in np.flatnonzero(todo).tolist():
            at = j
            item = int(items[j])
            if keep[j]:
                pfn = int(pfns[j])
                held = False
                try:
                    if walks is None:
                        cmp_and_merge_page(k, pfn, item, int(cks[j]))
                    else:
                        held = _cmp_and_merge_walked(k, pfn, item, int(cks[j]), walks, j)
                finally:
                    if not held:
                        put_page(k, pfn)
                continue
            _flush_merges(k, walks)
            pfn = get_mergeable_page(k, item)
            if pfn < 0:
                # Unmapped since the run was collected. The kernel's cmp_and_merge_page()
                # would have had the page (ksmd held it) and taken the item out of its tree
                # on every path that goes on; so does this, or an unstable item would miss
                # its pass and be two passes old at the next.
                remove_rmap_item_from_tree(k, item)
                continue
            try:
                # The run's checksum stands only for the frame it was taken of, and only
                # non-KSM frames were checksummed: anything else is checksummed again.
                same = plain[j] and pfn == pfns[j] and not k.page_flags[pfn] & PG_KSM
                cmp_and_merge_page(k, pfn, item, int(cks[j]) if same else None)
            finally:
                put_page(k, pfn)
        _flush_merges(k, walks)
        if walks is not None and walks.held:
            _insert_held(k, walks, cks)
        at = len(run)
    finally:
        # A report raised out of page `at` (an oops of a reverted fix) ends the batch as it
        # ends ksm_do_scan: the pages before it count as scanned, and the run's pages after
        # it give back the references it still holds (the held-back ones too: they stay
        # out of the tree, as if the report had come before their turn).
        for j in np.flatnonzero((keep & todo)[at + 1 :]).tolist():
            put_page(k, int(pfns[at + 1 + j]))
        if walks is not None:
            for pfn, _ in walks.held.values():
                put_page(k, pfn)
            walks.held.clear()
            for _, pfn, _, _ in walks.merges:
                put_page(k, pfn)
            walks.merges.clear()
        k.ks.pages_scanned += max(at, 0)


class RunWalks:
    """The tree descents of one run's candidates (--scan vector): col[j] is page j's
    column in both descents, -1 for a page that takes cmp_and_merge_page().

    group[j] is page j's twin group (the run's candidates with its contents), -1 for a
    page whose walks go page by page all the way; made[g] is the stable node group g's
    merges made in this run, pending[g] its item held back from the unstable tree, and
    held maps each held-back item to (its page, with the run's reference; j).

    merges are the stable-tree merges put off to be made together (_defer_merge), each
    (item, page with the run's reference, stable node, checksum), and room[node] how
    many of them go to each node."""

    __slots__ = ("areas", "col", "group", "held", "made", "merges", "pending", "room", "stable", "unstable")

    def __init__(self, col: np.ndarray, group: np.ndarray, stable, unstable, areas: MergeableAreas) -> None:
        self.col, self.group, self.stable, self.unstable, self.areas = col, group, stable, unstable, areas
        self.made: dict[int, int] = {}
        self.pending: dict[int, int] = {}
        self.held: dict[int, tuple[int, int]] = {}
        self.merges: list[tuple[int, int, int, int]] = []
        self.room: dict[int, int] = {}


def _descend_run(
    k: Kernel, items: np.ndarray, pfns: np.ndarray, cks: np.ndarray, cand: np.ndarray, ksm_todo: np.ndarray
) -> RunWalks:
    """Descend both trees with every page of the run that cmp_and_merge_page() would send
    down them: a page no other pte maps, its checksum unchanged, in no tree or in the
    unstable tree of the previous pass (which remove_rmap_item_from_tree() just lets go).
    Zero pages with use_zero_pages, and one tree per node (merge_across_nodes=0 on a
    NUMA geometry), stay with the exact path.

    The candidates are also put in twin groups (same checksum, same bytes), which lets
    a group's walks be decided without the trees once one of them merged or was held
    back. A group whose checksum another page of the run that goes page by page also
    has (ksm_todo: KSM pages the run still has work for) is left page by page: that page
    may put its contents in a tree before the group's turn."""
    km, ks = k.km, k.ks
    ri = km.rmap_item
    ii = ri.idx_many(items, "cmp_and_merge_batch")
    addr = ri.address[ii]
    age = (ks.seqnr - addr) & 0xFF
    left_over = ((addr & STABLE_FLAG) == 0) & (((addr & UNSTABLE_FLAG) == 0) | (age == 1))
    todo = cand | ksm_todo
    cand = cand & left_over & (cks == ri.oldchecksum[ii])
    if ks.use_zero_pages:
        cand &= cks != int(ks.zero_checksum)
    if not ks.merge_across_nodes and km.geo.nr_nodes > 1:
        cand[:] = False
    fj = np.flatnonzero(cand)
    col = np.full(len(pfns), -1, dtype=np.int64)
    col[fj] = np.arange(len(fj))
    group = np.full(len(pfns), -1, dtype=np.int64)
    if len(fj):
        _, first, inv, counts = np.unique(cks[fj], return_index=True, return_inverse=True, return_counts=True)
        alike = np.ones(len(fj), dtype=bool)
        twins = np.flatnonzero(counts[inv] > 1)
        if len(twins):
            frames = km.frames
            alike[twins] = (frames[pfns[fj[twins]]] == frames[pfns[fj[first[inv[twins]]]]]).all(axis=1)
        others = todo & ~cand
        ock = cks[others].copy()
        ksm_others = ksm_todo[others]
        ock[ksm_others] = k.cmp.checksum_batch(pfns[others][ksm_others])
        alike &= ~np.isin(cks[fj], ock)
        group[fj[alike]] = inv[alike]
    areas = MergeableAreas(k)
    sd = descend(k, km.stable_node, stable_root(k, 0).get(), pfns[fj], lambda n: stable_pages(k, n))
    ud = descend(k, ri, unstable_root(k, 0).get(), pfns[fj], lambda n: unstable_pages(k, n, areas))
    return RunWalks(col, group, sd, ud, areas)


def _hold_misses(w: RunWalks, items: np.ndarray, pfns: np.ndarray) -> np.ndarray:
    """Hold back at once every candidate that is alone in its twin group and whose walks
    missed both trees: what _cmp_and_merge_walked() would do at its turn, decided here
    for all of them because nothing before that turn can change it. No other page of the
    run has its contents (a group is the run's pages with them), so none can merge with
    it or put them in a tree, and a held-back item joins the tree only at the run's end.
    Returns which pages were held; their items leave the previous pass's tree then too
    (_insert_held), so a report before that leaves them as they were."""
    c, g = w.col, w.group
    hold = np.zeros(len(g), dtype=bool)
    grouped = np.flatnonzero(g >= 0)  # every grouped page is a candidate, with a column
    if not len(grouped):
        return hold
    gg, cc = g[grouped], c[grouped]
    hold[grouped] = (np.bincount(gg)[gg] == 1) & ~w.stable.stop[cc] & ~w.unstable.stop[cc]
    for j in np.flatnonzero(hold).tolist():
        item = int(items[j])
        w.pending[int(g[j])] = item
        w.held[item] = (int(pfns[j]), j)
    return hold


def _cmp_and_merge_walked(k: Kernel, pfn: int, item: int, checksum: int, w: RunWalks, j: int) -> bool:
    """cmp_and_merge_page() of page j of a run the vector scan descended. True when the
    page is held back (its item joins the unstable tree at the end of the run, with the
    run's reference on its page kept until then).

    A page of a twin group whose stable walk missed: if a twin merged in this run, it
    goes to that stable node; if a twin is held back, the two merge as the unstable tree
    would have them; if its unstable walk missed too, it is held back. Any other page
    whose walks miss both trees joins the unstable tree where its walk ended; the rest
    take cmp_and_merge_page(), told what the walks found (a miss in the stable tree, an
    identical node) so that its own searches are only their last step."""
    c = int(w.col[j])
    if c < 0:
        _flush_merges(k, w)
        cmp_and_merge_page(k, pfn, item, checksum)
        return False
    sn, ri = k.km.stable_node, k.km.rmap_item

    def stable_end() -> tuple[int, int, bool] | None:
        return walk_end(k, sn, w.stable, c, stable_root(k, 0).get(), pfn, lambda n: stable_page(k, n))

    g = int(w.group[j])
    if g >= 0:
        made = w.made.get(g)
        if made:
            remove_rmap_item_from_tree(k, item)
            if _defer_merge(k, w, pfn, item, made, checksum):
                return True
            cmp_and_merge_page(k, pfn, item, checksum, made)
            _learn(k, w, g, item)
            return False
        if not w.stable.stop[c]:
            partner = w.pending.pop(g, NULL)
            if partner:
                put_page(k, w.held.pop(partner)[0])  # write_protect_page() counts references
                cmp_and_merge_page(k, pfn, item, checksum, STABLE_MISS, partner, stable_end)
                _learn(k, w, g, item, partner)
                return False
            if not w.unstable.stop[c]:
                remove_rmap_item_from_tree(k, item)
                w.pending[g] = item
                w.held[item] = (pfn, j)
                return True
    remove_rmap_item_from_tree(k, item)
    end = stable_end()
    if end is not None and end[0] and _defer_merge(k, w, pfn, item, end[0], checksum):
        if g >= 0:
            w.made[g] = end[0]  # what _learn() will find once the merge is made
        return True
    if end is None or end[0]:
        _flush_merges(k, w)  # an undecided walk may end at a node a put-off merge goes to
        cmp_and_merge_page(k, pfn, item, checksum, end[0] if end else NULL)
    else:
        end = walk_end(k, ri, w.unstable, c, unstable_root(k, 0).get(), pfn, lambda n: unstable_page(k, n, w.areas))
        if end is None or end[0]:
            cmp_and_merge_page(k, pfn, item, checksum, STABLE_MISS, end[0] if end else NULL, stable_end)
        else:
            unstable_tree_insert_at(k, item, 0, end[1], end[2])
    if g >= 0:
        _learn(k, w, g, item)
    return False


def _defer_merge(k: Kernel, w: RunWalks, pfn: int, item: int, node: int, checksum: int) -> bool:
    """Put off the merge of a page its walk found identical to a regular stable node, to
    be made with the run's others (try_to_merge_with_ksm_pages), if the node has room for
    it after them. Otherwise the put-off merges are made now (the page goes page by page
    and may go to the same node: they come first, as in scan order) and False.

    Until they are made, the run only holds back unstable-tree pages and merges pages
    whose walks missed the stable tree (a new node of other contents): nothing a put-off
    merge reads or writes."""
    sn = k.km.stable_node
    if sn.valid(node):
        ni = sn.idx(node, "stable_tree_search")
        n = int(sn.rmap_hlist_len[ni]) + w.room.get(node, 0)
        if int(sn.role[ni]) == NODE_REGULAR and 0 < n < k.ks.max_page_sharing:
            w.merges.append((item, pfn, node, checksum))
            w.room[node] = w.room.get(node, 0) + 1
            return True
    _flush_merges(k, w)
    return False


def _flush_merges(k: Kernel, w: RunWalks | None) -> list[int]:
    """Make the run's put-off merges (try_to_merge_with_ksm_pages) and give back their
    pages' references; returns each one's result. A merge that must go page by page
    after all (MERGE_RETRY) then takes cmp_and_merge_page(), in scan order, with only
    its own reference still held: the reference of an earlier one would fail
    write_protect_page() for a page that meets it in the unstable tree."""
    if w is None or not w.merges:
        return []
    merges, w.merges = w.merges, []
    w.room.clear()
    held = list(range(len(merges)))
    try:
        res = try_to_merge_with_ksm_pages(k, [(it, pf, nd) for it, pf, nd, _ in merges])
        retry = [n for n, r in enumerate(res) if r == MERGE_RETRY]
        done, held = [merges[n][1] for n in held if res[n] != MERGE_RETRY], retry
        put_pages(k, done)
        while held:
            item, pfn, node, ck = merges[held[0]]
            try:
                cmp_and_merge_page(k, pfn, item, ck, node)
            finally:
                held.pop(0)
                put_page(k, pfn)
        return res
    finally:
        for n in held:
            put_page(k, merges[n][1])


def _learn(k: Kernel, w: RunWalks, g: int, item: int, partner: int = NULL) -> None:
    """After a twin's turn: the stable node it merged into is the group's; a held-back
    twin it did not merge with stays held back (it is in the unstable tree, as far as
    the rest of the run is concerned), with a reference taken again."""
    ri = k.km.rmap_item
    ii = ri.idx(item, "cmp_and_merge_batch")
    if int(ri.address[ii]) & STABLE_FLAG:
        w.made[g] = int(ri.head[ii])
    elif partner and ri.valid(partner) and not int(ri.address[ri.idx(partner, "cmp_and_merge_batch")]) & STABLE_FLAG:
        ppfn = get_mergeable_page(k, partner)
        if ppfn >= 0:
            w.pending[g] = partner
            w.held[partner] = (ppfn, -1)


def _insert_held(k: Kernel, w: RunWalks, cks: np.ndarray) -> None:
    """The end of a run: its held-back items join the unstable tree at once
    (unstable_build.py). Their walks over the tree at the run's start still stand if no
    link changed since (the link journal is empty); otherwise they walk it again. An item
    whose walk now meets an identical page (or a node the arrays do not decide) takes
    cmp_and_merge_page() as it stands. The references are the caller's to give back."""
    ri = k.km.rmap_item
    its = np.fromiter(w.held.keys(), dtype=np.int64, count=len(w.held))
    pf = np.fromiter((p for p, _ in w.held.values()), dtype=np.int64, count=len(w.held))
    js = [j for _, j in w.held.values()]
    remove_rmap_items_from_old_unstable_tree(k, its)  # those _hold_misses() held
    if ri.journal is not None and not ri.journal and min(js) >= 0:
        d, cols = w.unstable, w.col[js]
    else:
        d = descend(k, ri, unstable_root(k, 0).get(), pf, lambda n: unstable_pages(k, n, w.areas))
        cols = np.arange(len(its))
    for s in unstable_tree_build(k, its, pf, d, cols).tolist():
        j = js[s]
        cmp_and_merge_page(k, int(pf[s]), int(its[s]), int(cks[j]) if j >= 0 else None)


def ksm_do_scan_batch(k: Kernel, scan_npages: int, vector: bool = False) -> int:
    """ksm_do_scan() on runs of pages (--scan batch, the default): the same pages in the
    same order, each run collected under one mmap_lock and merged by cmp_and_merge_batch
    (with `vector`, --scan vector's collection and tree walks)."""
    n = 0
    while n < scan_npages:
        run, starved = scan_get_next_rmap_items(k, scan_npages - n, vector)
        if run:
            cmp_and_merge_batch(k, run, vector)
            n += len(run)
        if starved or not run:
            break
    return n


def ksm_do_scan_vector(k: Kernel, scan_npages: int) -> int:
    """ksm_do_scan_batch() with each run's tree walks descended on arrays (--scan vector)."""
    return ksm_do_scan_batch(k, scan_npages, vector=True)


SCAN_EXACT, SCAN_BATCH, SCAN_VECTOR = 0, 1, 2
SCAN_MODES = {"exact": SCAN_EXACT, "batch": SCAN_BATCH, "vector": SCAN_VECTOR}
SCAN_FUNCS = {SCAN_EXACT: ksm_do_scan, SCAN_BATCH: ksm_do_scan_batch, SCAN_VECTOR: ksm_do_scan_vector}


def ksmd_should_run(k: Kernel) -> bool:
    return bool(k.ksm["run"] & KSM_RUN_MERGE) and not slots.list_empty(k)


def ksm_scan_thread_round(k: Kernel, scan: Callable[[Kernel, int], None] | None = None) -> bool:
    """One turn of ksm_scan_thread()'s loop, without the sleep: under ksm_thread_mutex,
    if ksmd should run, scan pages_to_scan pages. Returns whether it scanned. The ksmd
    actor and the simulator both run ksmd as these rounds and their own sleep (`scan`
    lets the actor profile the batch)."""
    if not ksmd_should_run(k):
        return False
    k.ksm_thread_mutex.lock(site="ksm_scan_thread")
    try:
        ran = ksmd_should_run(k)
        if ran:
            (scan or SCAN_FUNCS[int(k.ksm["scan_mode"])])(k, int(k.ksm["pages_to_scan"]))
    finally:
        k.ksm_thread_mutex.unlock()
    return ran


def unmerge_and_remove_all_rmap_items(k: Kernel) -> int:
    """run=2: break every merge, free every rmap_item and stable node (mutex held)."""
    km = k.km
    ksm = k.ksm
    head = slots.head(k)
    k.ksm_mmlist_lock.lock(site="unmerge_and_remove_all_rmap_items")
    ksm["scan_slot"] = slots.next_slot(k, head)
    k.ksm_mmlist_lock.unlock()
    while int(ksm["scan_slot"]) != head:
        slot = int(ksm["scan_slot"])
        mm = int(km.mm_slot.mm[km.mm_slot.idx(slot, "unmerge_and_remove_all_rmap_items")])
        lock = k.mmap_lock(mm, "unmerge_and_remove_all_rmap_items")
        lock.down_read(site="unmerge_and_remove_all_rmap_items")
        err = 0
        if not mmops.ksm_test_exit(k, mm):
            for vma in list(mmops.vmas(k, mm)):
                vi = km.vma.idx(vma, "unmerge_and_remove_all_rmap_items")
                if not km.vma.flags[vi] & VM_MERGEABLE or not km.vma.anon_vma[vi]:
                    continue
                err = unmerge_ksm_pages(k, vma, int(km.vma.start[vi]), int(km.vma.end[vi]))
                if err:
                    break
        if err:
            lock.up_read()
            k.ksm_mmlist_lock.lock(site="unmerge_and_remove_all_rmap_items")
            ksm["scan_slot"] = head
            k.ksm_mmlist_lock.unlock()
            return err
        remove_trailing_rmap_items(k, Link(slot, True))
        lock.up_read()
        k.ksm_mmlist_lock.lock(site="unmerge_and_remove_all_rmap_items")
        ksm["scan_slot"] = slots.next_slot(k, slot)
        if mmops.ksm_test_exit(k, mm):
            slots.hash_del(k, slot)
            slots.list_del(k, slot)
            k.ksm_mmlist_lock.unlock()
            km.mm_slot.free(slot, site="unmerge_and_remove_all_rmap_items")
            _mm_flags_clear(k, mm, MMF_VM_MERGEABLE | MMF_VM_MERGE_ANY)
            mmops.mmdrop(k, mm, site="run=2:mmdrop")
        else:
            k.ksm_mmlist_lock.unlock()
    if not k.variant("stale-stable-nodes:old-nodes"):
        remove_all_stable_nodes(k)
    ksm["seqnr"] = 0
    ksm["scan_address"] = 0
    set_cursor_link(k, Link(head, True))
    return 0


__all__ = [
    "ERESTARTSYS",
    "KSM_RUN_MERGE",
    "KSM_RUN_STOP",
    "KSM_RUN_UNMERGE",
    "SCAN_MODES",
    "cmp_and_merge_batch",
    "cmp_and_merge_page",
    "ksm_do_scan",
    "ksm_do_scan_batch",
    "ksmd_should_run",
    "scan_get_next_rmap_item",
    "unmerge_and_remove_all_rmap_items",
]
