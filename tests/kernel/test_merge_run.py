# try_to_merge_with_ksm_pages() (actors/kernel/merge.py): a run's merges into the stable
# tree, made together with the locks for a run (--scan vector, docs/DECISIONS.md).
#
# The reference is the kernel's shape: the same merges made one cmp_and_merge_page() at
# a time, in scan order, on a twin kernel booted and fed the same way. Made together,
# they must leave the same frames under every pte, the same counters and ksm_stat, the
# same rmap_items on each stable node in the same hlist order, and the same merge
# events in the same order. Then each way a merge can fail on its own: the page changed
# since its walk (it goes page by page after all), the KSM page's lock is busy (the
# search's EBUSY), the page is locked or pinned (try_to_merge_one_page's EFAULT), the
# node went stale (page by page), the mm is exiting (EFAULT).
from __future__ import annotations

import contextlib
import threading

import pytest

from actors.kernel import syscalls, tree
from actors.kernel.ksm_scan import RunWalks, _flush_merges, cmp_and_merge_page
from actors.kernel.memory import follow_page, get_page, put_page
from actors.kernel.merge import MERGE_EBUSY, MERGE_RETRY
from actors.kernel.stable_tree import stable_root
from actors.kernel.sysfs import ksm_stat
from shared_mem.layout import PAGE_SIZE, PTE_PFN_MASK, PTE_WRITE

pytestmark = [pytest.mark.timeout(30)]

EFAULT = -14
B = [5, 7, 5, 9, 5, 7, 5]  # the second mm's pages: 5s and 7s go to the first mm's KSM pages
MERGE_EVENTS = ("ksm_merge_one_page", "ksm_merge_with_ksm_page", "ksm_write_protect_fail")


def _setup(h):
    """Two KSM pages (5 and 7, on stable nodes) in a first mm, then a second mm whose
    pages have been seen once (their checksums recorded, in no tree). Returns the second
    mm, its address, and {content: KSM pfn}."""
    mm_a, a = h.area([5, 5, 7, 7])
    h.first_area = (mm_a, a)
    h.full_scan(2)
    mm_b, b = h.area(B)
    h.full_scan(1)
    ksm = {5: h.pfn(mm_a, a), 7: h.pfn(mm_a, a + 2 * PAGE_SIZE)}
    assert h.counters()["pages_shared"] == 2 and h.pfn(mm_b, b) != ksm[5]
    return mm_b, b, ksm


def _merges(h, mm, b, ksm) -> list[tuple[int, int, int]]:
    """(item, page with a reference, stable node) of every 5 and 7 of the second mm."""
    out = []
    with h.k.mmap_lock(mm).read():
        for i, c in enumerate(B):
            if c in ksm:
                addr = b + i * PAGE_SIZE
                out.append((h.item_at(mm, addr), follow_page(h.k, mm, addr), int(h.k.page_mapping[ksm[c]])))
    return out


def _together(h, merges) -> list[int]:
    """The merges put off and made together, as the vector scan's _flush_merges makes a
    run's (those left to go page by page then go, each told its node)."""
    w = RunWalks(None, None, None, None, None)
    w.merges = [(item, pfn, node, h.item_field(item, "oldchecksum")) for item, pfn, node in merges]
    with h.k.ksm_thread_mutex:
        return _flush_merges(h.k, w)


def _one_by_one(h, merges) -> None:
    with h.k.ksm_thread_mutex:
        for item, pfn, _ in merges:
            try:
                cmp_and_merge_page(h.k, pfn, item)
            finally:
                put_page(h.k, pfn)


@contextlib.contextmanager
def _locked_elsewhere(h, pfn: int):
    """The page's lock held by another kernel context (a thread bound as one) until the
    block ends, as another CPU would hold it."""
    took, done = threading.Event(), threading.Event()

    def holder() -> None:
        h.locks.bind_context("holder")
        try:
            lock = h.k.page_lock(pfn)
            lock.lock()
            took.set()
            done.wait(10)
            lock.unlock()
        finally:
            h.locks.release_context()

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert took.wait(10)
        yield
    finally:
        done.set()
        t.join(10)


def _hlist(h, node) -> list[int]:
    ri, sn = h.km.rmap_item, h.km.stable_node
    out, item = [], int(sn.hlist[sn.idx(node)])
    while item:
        out.append(item & 0xFFFFFFFF)
        item = int(ri.hnext[ri.idx(item)])
    return out


def _picture(h, mm, b, ksm, since: int) -> tuple:
    ptes = tuple(h.pte(mm, b + i * PAGE_SIZE) for i in range(len(B)))
    av = h.km.anon_vma
    items = tuple((h.item_field(it, "address"), h.item_field(it, "head") & 0xFFFFFFFF,
                   h.item_field(it, "anon_vma") & 0xFFFFFFFF,
                   int(av.refcount[av.idx(h.item_field(it, "anon_vma"))]) if h.item_field(it, "anon_vma") else 0)
                  for it in h.rmap_items_of(mm))
    hlists = tuple((n & 0xFFFFFFFF, tuple(_hlist(h, n))) for n in tree.walk(h.km.stable_node, stable_root(h.k, 0)))
    events = [(e, f.get("pfn"), f.get("kpfn"), f.get("err")) for e, f in h.events[since:] if e in MERGE_EVENTS]
    return h.counters(), ksm_stat(h.k, mm), ptes, items, hlists, events


def test_a_runs_merges_made_together_leave_what_one_by_one_leaves(kernel_factory):
    pair = [kernel_factory(scan="exact"), kernel_factory(scan="exact")]
    setups = [_setup(h) for h in pair]
    marks = [h.mark() for h in pair]
    _one_by_one(pair[0], _merges(pair[0], *setups[0]))
    got = _together(pair[1], _merges(pair[1], *setups[1]))
    assert got == [0] * 6
    ref, new = (_picture(h, *s, m) for h, s, m in zip(pair, setups, marks))
    for what, x, y in zip(("counters", "ksm_stat", "ptes", "rmap_items", "hlists", "events"), ref, new):
        assert y == x, f"{what} differ"
    assert new[0]["pages_sharing"] == 2 + 6 and len(new[5]) == 12
    for h in pair:
        h.check()


def test_a_page_that_changed_since_its_walk_is_left_to_go_page_by_page(kern):
    h = kern
    mm, b, ksm = _setup(h)
    merges = _merges(h, mm, b, ksm)
    h.write_page(mm, b, 0x33)  # the first 5 is not a 5 any more
    pte = h.pte(mm, b)
    got = _together(h, merges)
    assert got == [MERGE_RETRY] + [0] * 5
    assert h.pte(mm, b) == pte and pte & PTE_WRITE, "nothing was locked or write-protected for it"
    h.check()


def test_a_busy_ksm_page_makes_none_of_its_merges(kern):
    """_stable_match()'s trylock fails: the search's EBUSY, for every merge into that
    page (the kernel leaves each for the next pass); the other page's merges are made."""
    h = kern
    mm, b, ksm = _setup(h)
    merges = _merges(h, mm, b, ksm)
    before = [h.pte(mm, b + i * PAGE_SIZE) for i in range(len(B))]
    with _locked_elsewhere(h, ksm[5]):
        got = _together(h, merges)
    assert got == [MERGE_EBUSY, 0, MERGE_EBUSY, MERGE_EBUSY, 0, MERGE_EBUSY]
    for i, c in enumerate(B):
        now = h.pte(mm, b + i * PAGE_SIZE)
        assert (now & PTE_PFN_MASK == ksm[7]) if c == 7 else now == before[i]
    assert h.counters()["pages_sharing"] == 2 + 2
    h.check()


def test_a_locked_page_and_a_pinned_page_are_not_merged(kern):
    """try_to_merge_one_page(): a page whose lock is taken fails its trylock, a page with
    a reference besides its mapping and ksmd's fails write_protect_page(); both keep
    their writable pte, and the run's other merges are made."""
    h = kern
    mm, b, ksm = _setup(h)
    merges = _merges(h, mm, b, ksm)
    locked, pinned = merges[0][1], merges[1][1]
    get_page(h.k, pinned)  # a GUP pin
    mark = h.mark()
    with _locked_elsewhere(h, locked):
        got = _together(h, merges)
    put_page(h.k, pinned)
    assert got == [EFAULT, EFAULT, 0, 0, 0, 0]
    assert [f["why"] for f in h.fields("ksm_merge_one_page", mark) if f.get("why")] == ["page locked"]
    assert [f["pfn"] for f in h.fields("ksm_write_protect_fail", mark)] == [pinned]
    for i in (0, 1):
        pte = h.pte(mm, b + i * PAGE_SIZE)
        assert pte & PTE_PFN_MASK == merges[i][1] and pte & PTE_WRITE
    h.check()


def test_a_stale_node_leaves_its_merges_to_go_page_by_page(kernel_factory):
    """The 7s' KSM page is freed (both its sharers unmapped) before the merges are made:
    its node is stale, and each of its merges goes page by page (which prunes the node,
    and pairs the two 7s in the unstable tree), after the 5s merged. The pages, counters
    and lists end as one cmp_and_merge_page() at a time leaves them."""
    pair = [kernel_factory(scan="exact"), kernel_factory(scan="exact")]
    setups = [_setup(h) for h in pair]
    for h in pair:
        mm_a, a = h.first_area
        syscalls.sys_munmap(h.k, mm_a, a + 2 * PAGE_SIZE, 2 * PAGE_SIZE)
    _one_by_one(pair[0], _merges(pair[0], *setups[0]))
    got = _together(pair[1], _merges(pair[1], *setups[1]))
    assert got == [0, MERGE_RETRY, 0, 0, MERGE_RETRY, 0]
    ref, new = (_picture(h, *s, 0)[:5] for h, s in zip(pair, setups))
    for what, x, y in zip(("counters", "ksm_stat", "ptes", "rmap_items", "hlists"), ref, new):
        assert y == x, f"{what} differ"
    for h in pair:
        h.check()


def test_an_exiting_mm_has_none_of_its_pages_merged(kern):
    """ksm_test_exit(): once the mm's users are gone, find_mergeable_vma() finds nothing,
    and every merge is try_to_merge_with_ksm_page()'s EFAULT."""
    h = kern
    mm, b, ksm = _setup(h)
    merges = _merges(h, mm, b, ksm)
    h.mmput(mm)
    got = _together(h, merges)
    assert got == [EFAULT] * 6
    assert h.counters()["pages_sharing"] == 2
