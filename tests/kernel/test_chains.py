# max_page_sharing: stable node chains and dups (actors/kernel/stable_tree.py, sysfs.py).
#
# A KSM page takes at most max_page_sharing rmap_items. When the stable tree already
# holds the content but every KSM page of it is full, stable_tree_search() reports no
# match, the page goes through the unstable tree, and the new KSM page made there is
# inserted next to the full one: stable_tree_insert() turns the tree node into a chain
# whose dups are the KSM pages (stable_node_chains, stable_node_dups count them). For n
# identical pages the selftests' assert_ksm_pages_count() gives the counters: when
# n % max leaves 0 or 1, n // max full KSM pages (a lone leftover page has nobody to
# merge with and stays in the unstable tree); otherwise one more, partly filled, page.
# The knob is written through sysfs with the kernel's rules: < 2 is EINVAL, a change
# while pages are shared is EBUSY. A chain left with one live dup collapses back into
# a regular node the next time a search walks it (stable_node_dup()).
from __future__ import annotations

import pytest

from actors.kernel import tree
from actors.kernel.stable_tree import dups_of, is_stable_node_chain, stable_root
from actors.kernel.sysfs import SysfsError
from shared_mem.layout import NODE_REGULAR, PAGE_SIZE, PG_FREE

pytestmark = [pytest.mark.timeout(30)]


def pages_count(n: int, mps: int) -> tuple[int, int]:
    """tools/testing/selftests/mm/ksm_tests.c assert_ksm_pages_count()."""
    if n % mps in (0, 1):
        return n // mps, (n // mps) * (mps - 1)
    shared = n // mps + 1
    return shared, n - shared


@pytest.mark.parametrize("n, mps", [(5, 2), (8, 3), (6, 3), (4, 4), (7, 2)])
def test_identical_pages_beyond_max_page_sharing_make_a_chain(kern, n, mps):
    h = kern
    h.set("max_page_sharing", mps)
    assert int(h.k.ksm["max_page_sharing"]) == mps
    mm, a = h.area([0xC3] * n)
    h.full_scan(2)
    shared, sharing = pages_count(n, mps)
    dups = shared if shared > 1 else 0
    c = h.counters("pages_shared", "pages_sharing", "pages_unshared", "stable_node_chains",
                   "stable_node_dups")
    assert c == {"pages_shared": shared, "pages_sharing": sharing,
                 "pages_unshared": 1 if n % mps == 1 else 0,
                 "stable_node_chains": 1 if dups else 0, "stable_node_dups": dups}
    assert "warning" not in h.names(), "no KSM page went past max_page_sharing"
    # One tree node for the content; each dup's KSM page holds at most mps mappings.
    nodes = tree.walk(h.km.stable_node, stable_root(h.k, 0))
    assert len(nodes) == 1
    kpages = dups_of(h.k, nodes[0]) if dups else nodes
    assert is_stable_node_chain(h.k, nodes[0]) == bool(dups)
    lens = sorted(h.node_field(d, "rmap_hlist_len") for d in kpages)
    assert all(1 < x <= mps for x in lens) and sum(lens) == shared + sharing
    pfns = h.pfns(mm, a, n)
    kpfns = {h.node_field(d, "kpfn") for d in kpages}
    assert len(kpfns) == shared
    assert sum(p in kpfns for p in pfns) == shared + sharing
    for d in kpages:
        assert int(h.km.page["mapcount"][h.node_field(d, "kpfn")]) == h.node_field(d, "rmap_hlist_len")
    h.check()
    # A third pass keeps everything as it is.
    h.full_scan()
    assert h.counters(*c) == c
    h.check()
    # run=2 takes chains and dups down with everything else.
    h.set("run", 2)
    assert h.counters("pages_shared", "stable_node_chains", "stable_node_dups") == \
        {"pages_shared": 0, "stable_node_chains": 0, "stable_node_dups": 0}
    assert h.km.stable_node.nr_live() == 0
    h.check()


def test_max_page_sharing_store_rules(kern):
    h = kern
    for bad in ("1", "0", "-3", "x"):
        with pytest.raises(SysfsError) as e:
            h.set("max_page_sharing", bad)
        assert e.value.errno_name == "EINVAL"
    h.set("max_page_sharing", 2)
    h.area([0x11, 0x11])
    h.full_scan(2)
    assert h.counters("pages_shared")["pages_shared"] == 1
    h.set("max_page_sharing", 2)          # the same value: a no-op, even while shared
    with pytest.raises(SysfsError) as e:
        h.set("max_page_sharing", 3)
    assert e.value.errno_name == "EBUSY"
    assert int(h.k.ksm["max_page_sharing"]) == 2
    h.set("run", 2)
    h.set("max_page_sharing", 3)
    assert int(h.k.ksm["max_page_sharing"]) == 3
    h.check()


def test_chain_with_one_live_dup_collapses_into_a_regular_node(kern):
    h = kern
    k = h.k
    h.set("max_page_sharing", 2)
    mm, a = h.area([0xAB] * 4)
    addrs = [a + i * PAGE_SIZE for i in range(4)]
    h.full_scan(2)
    assert h.counters("pages_shared", "pages_sharing", "stable_node_chains", "stable_node_dups") == \
        {"pages_shared": 2, "pages_sharing": 2, "stable_node_chains": 1, "stable_node_dups": 2}
    k1, k2 = h.pfn(mm, addrs[0]), h.pfn(mm, addrs[2])
    assert k1 == h.pfn(mm, addrs[1]) and k2 == h.pfn(mm, addrs[3]) and k1 != k2
    node2 = int(h.km.page["mapping"][k2])

    # Both sharers of the first KSM page take a private copy of the same content: that
    # page is freed and its dup is stale.
    for addr in addrs[:2]:
        h.write_page(mm, addr, 0xAB)
    assert h.k.page_flags[k1] & PG_FREE

    # The first item visited meets its stale node (removed with both its items), then
    # searches the chain, which now has one dup left: the chain collapses.
    m = h.mark()
    assert h.scan(1) == 1
    assert h.fields("ksm_remove_ksm_page", m)[0]["pfn"] == k1
    assert h.counters("pages_shared", "pages_sharing", "pages_unshared", "stable_node_chains",
                      "stable_node_dups") == \
        {"pages_shared": 1, "pages_sharing": 1, "pages_unshared": 1, "stable_node_chains": 0,
         "stable_node_dups": 0}
    assert h.stable_root() == node2 and not is_stable_node_chain(k, node2)
    assert h.node_field(node2, "role") == NODE_REGULAR
    h.check()

    # The second private copy merges with the first through the unstable tree; its new
    # KSM page is equal to the full regular node, so a chain is made again.
    h.full_scan()
    assert h.counters("pages_shared", "pages_sharing", "pages_unshared", "stable_node_chains",
                      "stable_node_dups") == \
        {"pages_shared": 2, "pages_sharing": 2, "pages_unshared": 0, "stable_node_chains": 1,
         "stable_node_dups": 2}
    k3 = h.pfn(mm, addrs[0])
    assert k3 == h.pfn(mm, addrs[1]) and k3 not in (k1, k2)
    chain = h.stable_root()
    assert is_stable_node_chain(k, chain) and set(dups_of(k, chain)) == {node2, int(h.km.page["mapping"][k3])}
    h.check()
