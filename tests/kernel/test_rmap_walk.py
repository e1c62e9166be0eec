# Reclaim's walk over the ptes of a KSM page (actors/kernel/vmscan.py, fork.py).
#
# A KSM page has no anon_vma of its own: rmap_walk_ksm() goes through its stable node's
# rmap_items. Each stable item holds a reference on the anon_vma it was merged under
# (seed 004); the walk visits, for every item, first the vma of the item's own mm that
# covers the item's address, then (search_new_forks) the other mms' vmas on the same
# anon_vma at that address - how a child forked after ksmd merged the page is found
# before ksmd has given it any rmap_item. dup_mmap() copies the KSM ptes into the child
# and links its vma to the parent's anon_vma.
# page_referenced() (page_referenced_ksm) counts and clears the accessed bit of every pte
# it reaches; shrink_page() ages a referenced page once, then puts it in the swap cache
# and try_to_unmap() turns every pte into a swap entry, so the page is freed and each
# task faults its bytes back from swap. With seed 004 reverted (rmap-no-anon-vma) the
# walk reaches only (item->mm, item->address): the child's ptes are missed, the page
# stays mapped and the debug check reports "Bad page map" - the negative control that
# shows these tests see the walk.
from __future__ import annotations

import pytest

from actors.kernel.vmscan import page_referenced, rmap_walk_ksm, shrink_page
from shared_mem.layout import (
    PAGE_SIZE,
    PG_FREE,
    PG_KSM,
    PTE_ACCESSED,
    PTE_PFN_MASK,
    PTE_PRESENT,
    PTE_SWAP,
)
from tests.kernel.conftest import page_of

pytestmark = [pytest.mark.timeout(30)]


def _merged_then_forked(h):
    """Two equal pages merged in the parent, then a fork ksmd has not scanned."""
    parent, a = h.area([0x5C, 0x5C])
    h.full_scan(2)
    kpfn = h.pfn(parent, a)
    assert h.pfns(parent, a, 2) == [kpfn, kpfn] and h.k.page_flags[kpfn] & PG_KSM
    child = h.fork(parent)
    assert h.pfns(child, a, 2) == [kpfn, kpfn]
    assert h.rmap_items_of(child) == [], "ksmd has not seen the child"
    assert int(h.km.page["mapcount"][kpfn]) == 4
    return parent, child, a, kpfn


def _walk(h, kpfn):
    seen = []
    lock = h.k.page_lock(kpfn)
    with lock:
        rmap_walk_ksm(h.k, kpfn, lambda vma, mm, addr: seen.append((mm, addr)) or True)
    return seen


def test_rmap_walk_ksm_finds_the_forked_childs_ptes_through_the_anon_vma(kern):
    h = kern
    parent, child, a, kpfn = _merged_then_forked(h)
    both = {(parent, a), (parent, a + PAGE_SIZE)}
    seen = _walk(h, kpfn)
    assert len(seen) == 4
    assert set(seen[:2]) == both, "first pass: the vma of each item's own mm"
    assert set(seen[2:]) == {(child, a), (child, a + PAGE_SIZE)}, "search_new_forks"
    with h.k.page_lock(kpfn):
        assert page_referenced(h.k, kpfn) == 4
        assert page_referenced(h.k, kpfn) == 0, "the accessed bits were cleared"
    for mm in (parent, child):
        for i in range(2):
            assert not h.pte(mm, a + i * PAGE_SIZE) & PTE_ACCESSED
    h.check()


def test_reclaim_of_a_forked_ksm_page_unmaps_every_pte(kern):
    h = kern
    parent, child, a, kpfn = _merged_then_forked(h)
    assert shrink_page(h.k, kpfn) == "referenced"    # young ptes: aged, kept
    m = h.mark()
    assert shrink_page(h.k, kpfn) == "freed"
    unmapped = {(f["mm"], f["addr"]) for f in h.fields("try_to_unmap_one", m)}
    pi, ci = h.km.mm.idx(parent), h.km.mm.idx(child)
    assert unmapped == {(pi, a), (pi, a + PAGE_SIZE), (ci, a), (ci, a + PAGE_SIZE)}
    assert h.k.page_flags[kpfn] & PG_FREE
    slots = set()
    for mm in (parent, child):
        for i in range(2):
            pte = h.pte(mm, a + i * PAGE_SIZE)
            assert pte & PTE_SWAP and not pte & PTE_PRESENT
            slots.add(pte & PTE_PFN_MASK)
    assert len(slots) == 1 and int(h.km.swap_map[slots.pop()]) == 4
    h.check()
    # Every task reads its bytes back from swap; ksmd cleans up the stale node.
    want = bytes(page_of(0x5C)) * 2
    assert h.read(child, a, 2 * PAGE_SIZE) == want
    assert h.read(parent, a, 2 * PAGE_SIZE) == want
    h.check()
    # ksmd meets the stale node, merges the parent's copies again, then (the pass after
    # it made the child's rmap_items) the child's: one KSM page for all four ptes.
    m = h.mark()
    h.full_scan(2)
    assert [f["pfn"] for f in h.fields("ksm_remove_ksm_page", m)] == [kpfn]
    assert h.counters("pages_shared", "pages_sharing", "rmap_items") == \
        {"pages_shared": 1, "pages_sharing": 3, "rmap_items": 4}
    new = h.pfn(parent, a)
    assert h.pfns(parent, a, 2) + h.pfns(child, a, 2) == [new] * 4
    assert h.k.page_flags[new] & PG_KSM
    h.check()


def test_without_seed_004_the_walk_misses_the_child(kernel_factory):
    h = kernel_factory(variants=("rmap-no-anon-vma",))
    h.allow_reports = True
    parent, child, a, kpfn = _merged_then_forked(h)
    seen = _walk(h, kpfn)
    assert set(seen) == {(parent, a), (parent, a + PAGE_SIZE)}
    with h.k.page_lock(kpfn):
        assert page_referenced(h.k, kpfn) == 2
    assert shrink_page(h.k, kpfn, force=True) == "still_mapped"
    assert int(h.km.page["mapcount"][kpfn]) == 2
    assert h.pfns(child, a, 2) == [kpfn, kpfn], "the child's ptes still map the page"
    rep = [r for r in h.reports if r["kind"] == "bad_page"]
    assert rep and "missed 2 of 2 pte(s)" in rep[0]["text"]
