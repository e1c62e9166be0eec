# The two content-ordered trees (actors/kernel/stable_tree.py, unstable_tree.py, tree.py).
#
# stable_tree_insert() / stable_tree_search() work on KSM pages: the tree is ordered by
# memcmp of page contents, insert links a new node and points the page at it
# (PageKsm, page->mapping); an insert of content that is already in the tree makes a
# chain with two dups in the old node's place, the new dup at the head. A node whose
# page is gone (freed: no longer PageKsm / pointing back) is stale: get_ksm_page()
# removes it when a search meets it, and the search goes on. The insert tests use bare
# frames from the allocator as the "KSM pages" (the tree only looks at contents and
# struct page) and tear the tree down with remove_all_stable_nodes().
# A search returns an identical KSM page that can take one more sharer, with a
# reference (the page itself when it is already KSM), -1 when there is none. In mm/ksm.c
# "can take one more" (__is_page_sharing_candidate) means 0 < rmap_hlist_len < max:
# a node whose rmap_items are all gone is no candidate, and a chain's dup with sharers
# is preferred to an empty one (the model missed the "0 <" part until these tests found
# it). The search tests use KSM pages merged by ksmd, whose nodes have rmap_items.
#
# unstable_tree_search_insert() works on rmap_items of mapped pages: each step takes the
# tree item's current page with get_mergeable_page(); no match inserts the item (flags
# UNSTABLE_FLAG | seqnr, pages_unshared + 1), a match returns the tree item and its page
# without inserting, and a tree page that has vanished aborts the walk without inserting.
# The unstable tree is never cleaned item by item: the start of every pass resets its
# root, and an item of the previous pass (age 1) is just unflagged when next visited.
from __future__ import annotations

import pytest

from actors.kernel import tree
from actors.kernel.ksm_scan import cmp_and_merge_page, scan_get_next_rmap_item
from actors.kernel.memory import put_page
from actors.kernel.rmap import Link, get_next_rmap_item, unstable_root
from actors.kernel.stable_tree import (
    dups_of,
    is_stable_node_chain,
    remove_all_stable_nodes,
    stable_root,
    stable_tree_insert,
    stable_tree_search,
)
from actors.kernel.unstable_tree import unstable_tree_search_insert
from protocol.abi import MADV_DONTNEED
from shared_mem.layout import NODE_CHAIN, NODE_DUP, PAGE_SIZE, PG_KSM, SEQNR_MASK, UNSTABLE_FLAG

pytestmark = [pytest.mark.timeout(30)]


def _frame(h, value: int) -> int:
    pfn = h.k.alloc_page()
    assert pfn is not None
    h.km.frames[pfn] = value
    return pfn


def _ref(h, pfn: int) -> int:
    return int(h.km.page["refcount"][pfn])


def test_stable_tree_insert_orders_by_content(kern):
    h = kern
    k = h.k
    sn = h.km.stable_node
    values = [0x30, 0x10, 0x50, 0x20, 0x40]
    kpfns = {}
    for v in values:
        kpfns[v] = _frame(h, v)
        m = h.mark()
        node = stable_tree_insert(k, kpfns[v])
        assert node and k.page_flags[kpfns[v]] & PG_KSM
        assert int(h.km.page["mapping"][kpfns[v]]) == node
        assert h.node_field(node, "kpfn") == kpfns[v]
        assert h.node_field(node, "rmap_hlist_len") == 0
        assert h.fields("ksm_stable_tree_insert", m)[0]["chained"] is False
    order = [h.node_field(n, "kpfn") for n in tree.walk(sn, stable_root(k, 0))]
    assert order == [kpfns[v] for v in sorted(values)]
    assert stable_tree_search(k, _frame(h, 0x41)) == -1
    assert stable_tree_search(k, kpfns[0x10]) == kpfns[0x10], "a KSM page finds itself"
    put_page(k, kpfns[0x10])

    # Equal content again: a chain of two dups takes the node's place in the tree.
    again = _frame(h, 0x20)
    m = h.mark()
    new = stable_tree_insert(k, again)
    assert h.fields("ksm_stable_tree_insert", m)[0]["chained"] is True
    assert h.counters("stable_node_chains", "stable_node_dups") == \
        {"stable_node_chains": 1, "stable_node_dups": 2}
    nodes = tree.walk(sn, stable_root(k, 0))
    assert len(nodes) == 5
    chain = nodes[1]
    assert is_stable_node_chain(k, chain) and h.node_field(chain, "role") == NODE_CHAIN
    dups = dups_of(k, chain)
    assert dups[0] == new and len(dups) == 2, "the new dup is added at the head"
    assert {h.node_field(d, "kpfn") for d in dups} == {kpfns[0x20], again}
    assert all(h.node_field(d, "role") == NODE_DUP for d in dups)
    assert int(h.km.page["mapping"][again]) == new

    # The KSM page of 0x50 is freed: its node is stale, removed by the next search.
    put_page(k, kpfns[0x50])
    live, stale = sn.nr_live(), sn.idx(nodes[-1])
    m = h.mark()
    assert stable_tree_search(k, _frame(h, 0x50)) == -1
    assert h.fields("ksm_remove_ksm_page", m) == [
        {"stable_node": stale, "pfn": kpfns[0x50]}]
    assert not sn.valid(nodes[-1])
    assert sn.nr_live() == live - 1
    assert [h.node_field(n, "kpfn") for n in tree.walk(sn, stable_root(k, 0))][-1] == kpfns[0x40]

    # Tear-down: no page is mapped, so every node goes; then every frame.
    with k.ksm_thread_mutex:
        assert remove_all_stable_nodes(k) == 0
    assert h.stable_root() == 0 and sn.nr_live() == 0
    assert h.counters("stable_node_chains", "stable_node_dups") == \
        {"stable_node_chains": 0, "stable_node_dups": 0}
    _free_bare_frames(h)
    h.check()
    h.check_no_leaks()


def _free_bare_frames(h):
    """Drop the allocator's reference of every frame this test took and never mapped."""
    for pfn in range(1, h.geo.nr_frames):
        if int(h.km.page["refcount"][pfn]) == 1 and not int(h.km.page["mapcount"][pfn]):
            put_page(h.k, pfn)


def _merged_pairs(h, values):
    """Each value on two pages, merged by two passes: {value: its KSM page}."""
    mm, a = h.area([v for v in values for _ in range(2)])
    h.full_scan(2)
    kp = {v: h.pfn(mm, a + 2 * i * PAGE_SIZE) for i, v in enumerate(values)}
    for i, v in enumerate(values):
        assert h.pfn(mm, a + (2 * i + 1) * PAGE_SIZE) == kp[v] and h.k.page_flags[kp[v]] & PG_KSM
    return mm, a, kp


def test_stable_tree_search_returns_the_ksm_page_with_a_reference(kern):
    h = kern
    k = h.k
    values = [0x30, 0x10, 0x50, 0x20, 0x40]
    _mm, _a, kp = _merged_pairs(h, values)
    order = [h.node_field(n, "kpfn") for n in tree.walk(h.km.stable_node, stable_root(k, 0))]
    assert order == [kp[v] for v in sorted(values)]
    for v in values:
        probe = _frame(h, v)
        ref = _ref(h, kp[v])
        assert stable_tree_search(k, probe) == kp[v]
        assert _ref(h, kp[v]) == ref + 1
        put_page(k, kp[v])
        assert stable_tree_search(k, _frame(h, v + 1)) == -1
    _free_bare_frames(h)
    h.check()


def test_a_stable_node_without_rmap_items_is_not_a_sharing_candidate(kern):
    h = kern
    k = h.k
    _mm, _a, kp = _merged_pairs(h, [0x20])
    bare = _frame(h, 0x40)
    stable_tree_insert(k, bare)                     # a node with rmap_hlist_len 0
    dup = _frame(h, 0x20)
    stable_tree_insert(k, dup)                      # an empty dup next to the full one
    # The chain's dup that has sharers is chosen, not the empty one at the head.
    found = stable_tree_search(k, _frame(h, 0x20))
    if found >= 0:
        put_page(k, found)
    # And equal content with only an empty node is no match at all.
    got = stable_tree_search(k, _frame(h, 0x40))
    if got >= 0:
        put_page(k, got)
    assert (found, got) == (kp[0x20], -1)


def _items(h, mm, a, n):
    slot = h.slot_of(mm)
    link, items = Link(slot, True), []
    for i in range(n):
        items.append(get_next_rmap_item(h.k, slot, link, a + i * PAGE_SIZE))
        link = Link(items[-1], False)
    return items


def test_unstable_tree_search_insert(kern):
    h = kern
    k = h.k
    ri = h.km.rmap_item
    mm, a = h.area([5, 1, 9, 5])
    pfns = h.pfns(mm, a, 4)
    items = _items(h, mm, a, 4)
    with k.ksm_thread_mutex:
        for item, pfn in zip(items[:3], pfns[:3]):
            assert unstable_tree_search_insert(k, item, pfn) == (0, -1)
            assert h.item_field(item, "address") & (UNSTABLE_FLAG | SEQNR_MASK) == UNSTABLE_FLAG | h.seqnr
    assert h.counters("pages_unshared")["pages_unshared"] == 3
    assert tree.walk(ri, unstable_root(k, 0)) == [items[1], items[0], items[2]]

    # The identical page: the tree item and its page (with a reference), no insert.
    ref = _ref(h, pfns[0])
    with k.ksm_thread_mutex:
        assert unstable_tree_search_insert(k, items[3], pfns[3]) == (items[0], pfns[0])
    assert _ref(h, pfns[0]) == ref + 1
    put_page(k, pfns[0])
    assert not h.item_field(items[3], "address") & UNSTABLE_FLAG
    assert h.counters("pages_unshared")["pages_unshared"] == 3

    # The tree page went away (MADV_DONTNEED): the walk gives up and inserts nothing.
    h.madvise(mm, a, 1, MADV_DONTNEED)
    with k.ksm_thread_mutex:
        assert unstable_tree_search_insert(k, items[3], pfns[3]) == (0, -1)
    assert not h.item_field(items[3], "address") & UNSTABLE_FLAG
    assert len(tree.walk(ri, unstable_root(k, 0))) == 3
    assert h.counters("pages_unshared")["pages_unshared"] == 3
    h.check()


def test_unstable_tree_is_reset_at_each_pass_start(kern):
    h = kern
    k = h.k
    ri = h.km.rmap_item
    h.set("smart_scan", 0)
    mm, _a = h.area([1, 2, 3])
    h.full_scan(2)
    items = h.rmap_items_of(mm)
    assert h.counters("pages_unshared")["pages_unshared"] == 3
    assert sorted(tree.walk(ri, unstable_root(k, 0))) == sorted(items)
    assert all(h.item_field(i, "address") & 0x1FF == UNSTABLE_FLAG | 1 for i in items)

    with k.ksm_thread_mutex:
        item, pfn = scan_get_next_rmap_item(k)      # the start of pass 3
        try:
            assert item == items[0]
            assert h.unstable_root() == 0, "the root is reset, the items are not"
            assert h.counters("pages_unshared")["pages_unshared"] == 3
            assert h.item_field(items[1], "address") & UNSTABLE_FLAG
            cmp_and_merge_page(k, pfn, item)
        finally:
            put_page(k, pfn)
    # The stale item (age 1) was unflagged without an rb_erase, then inserted afresh.
    assert h.unstable_root() == items[0]
    assert h.item_field(items[0], "address") & 0x1FF == UNSTABLE_FLAG | 2
    assert tree.walk(ri, unstable_root(k, 0)) == [items[0]]
    assert h.counters("pages_unshared")["pages_unshared"] == 3
    h.full_scan()
    assert tree.walk(ri, unstable_root(k, 0)) == items
    assert all(h.item_field(i, "address") & 0x1FF == UNSTABLE_FLAG | 2 for i in items)
    h.check()
