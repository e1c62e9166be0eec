# The unstable tree built a run at a time (actors/kernel/unstable_build.py, --scan vector).
#
# The vector scan holds back a run's candidates that miss both trees and links them into
# the unstable tree at the run's end, laid out anew as a balanced red-black tree. What
# must hold, and what these tests pin down one piece at a time:
#   - the layout is a red-black tree for every size (checked here by a checker of its
#     own, not by the code under test);
#   - the order is memcmp order even where pages agree in the words the arrays sort by
#     (the first 16 bytes), so that a later walk finds what the exact scan's would;
#   - the kept order is used only while it is the tree's: an insert page by page makes
#     the next build read the tree;
#   - check_invariants sees a tree that is not red-black, or that holds items of another
#     pass, whoever broke it.
from __future__ import annotations

import numpy as np
import pytest

from actors.kernel import tree, unstable_build
from actors.kernel.invariants import check_invariants
from actors.kernel.rmap import unstable_root
from shared_mem.layout import PAGE_SIZE, Geometry
from tests.kernel.conftest import SMALL

pytestmark = [pytest.mark.timeout(60)]


def _rb_ok(parent, left, right, color, root) -> tuple[list[int], int]:
    """(in-order positions, black height) of the layout; asserts every red-black rule."""
    n = len(parent)
    if n == 0:
        assert root == -1
        return [], 0
    assert parent[root] == -1 and color[root] == tree.RB_BLACK
    order: list[int] = []

    def visit(p: int) -> int:
        if p < 0:
            return 1
        for c in (left[p], right[p]):
            if c >= 0:
                assert parent[c] == p, f"{c} does not point back at {p}"
                assert not (color[p] == tree.RB_RED and color[c] == tree.RB_RED), f"red {p} has red child {c}"
        hl = visit(int(left[p]))
        order.append(p)
        hr = visit(int(right[p]))
        assert hl == hr, f"black heights differ under {p}"
        return hl + (color[p] == tree.RB_BLACK)

    height = visit(root)
    return order, height


@pytest.mark.parametrize("n", list(range(0, 301)))
def test_the_balanced_layout_is_a_red_black_tree_of_positions_in_order(n):
    parent, left, right, color, root = unstable_build.balanced_layout(n)
    order, height = _rb_ok(parent, left, right, color, root)
    assert order == list(range(n))
    if n:
        # balanced: no path longer than ceil(log2(n + 1)) nodes
        assert height <= int(np.ceil(np.log2(n + 1))) + 1


def _page(head: bytes, at: int, byte: int) -> bytes:
    buf = bytearray(PAGE_SIZE)
    buf[: len(head)] = head
    buf[at] = byte
    return bytes(buf)


def test_pages_alike_in_their_first_16_bytes_are_ordered_by_the_rest(kernel_factory):
    """Unique pages that share their first 16 bytes and differ only at bytes 16, 100 or
    4095 (and one pair only at 4095): the vector scan puts them in the unstable tree in
    the order the exact scan's memcmp walks do, and the next pass, which walks that
    tree, merges the copies written after it exactly as the exact scan does."""
    head = bytes(range(1, 17))
    contents = [_page(head, at, b) for at in (16, 100, 4095) for b in (9, 3, 200, 7, 1)]
    pair = [kernel_factory(scan="exact"), kernel_factory(scan="vector")]
    mms = []
    for h in pair:
        mms.append(h.area(contents)[0])
        h.full_scan(2)  # pass 1 checksums, pass 2 inserts all 15 into the unstable tree
        assert h.counters()["pages_unshared"] == len(contents)
    orders = [tuple(tree.walk(h.km.rmap_item, unstable_root(h.k, 0))) for h in pair]
    assert len(orders[0]) == len(contents) and orders[1] == orders[0]
    h = pair[1]
    ri = h.km.rmap_item
    in_order = [h.read(mms[1], int(ri.address[ri.idx(it)]) & ~(PAGE_SIZE - 1)) for it in orders[1]]
    assert in_order == sorted(in_order)
    for h in pair:
        h.check()


def _mid_pass_tree(h, npages: int = 64) -> None:
    """npages unique pages, two passes done, then part of pass 3: the unstable tree holds
    the pages pass 3 has seen so far."""
    h.area([bytes([1 + i % 250, 1 + i // 250, 7]) for i in range(npages)])
    h.full_scan(2)
    h.scan(npages // 2)
    assert unstable_root(h.k, 0).get() and h.counters()["full_scans"] == 2


def test_the_kept_order_stands_only_until_an_insert_page_by_page(kernel_factory):
    h = kernel_factory(scan="vector")
    _mid_pass_tree(h)
    k = h.k
    in_tree = np.array(tree.walk(h.km.rmap_item, unstable_root(k, 0)), dtype=np.int64)
    kept = k.unstable_order
    assert kept is not None and kept.seqnr == k.ks.seqnr
    assert unstable_build.unstable_tree_order(k).tolist() == in_tree.tolist()
    # A kept order that differs from the tree's is believed while it is current (the
    # reversal stands in for a layout the tree no longer has)...
    kept.items = in_tree[::-1].copy()
    assert unstable_build.unstable_tree_order(k).tolist() == in_tree[::-1].tolist()
    # ...and not once an insert page by page has put an item the kept order lacks.
    k.unstable_inserts += 1
    assert unstable_build.unstable_tree_order(k).tolist() == in_tree.tolist()
    kept.items = in_tree.copy()
    k.unstable_inserts -= 1


def _root_red(h, root: int) -> None:
    ri = h.km.rmap_item
    ri.rb_color[ri.idx(root)] = tree.RB_RED


def _child_points_elsewhere(h, root: int) -> None:
    ri = h.km.rmap_item
    child = int(ri.left[ri.idx(root)])
    ri.parent[ri.idx(child)] = int(ri.right[ri.idx(root)])


def _all_black(h, root: int) -> None:
    ri = h.km.rmap_item
    for n in tree.walk(ri, unstable_root(h.k, 0)):
        ri.rb_color[ri.idx(n)] = tree.RB_BLACK


def _unflagged(h, root: int) -> None:
    ri = h.km.rmap_item
    ri.address[ri.idx(root)] &= ~(PAGE_SIZE - 1)


@pytest.mark.parametrize("scan", ["exact", "vector"])
@pytest.mark.parametrize("damage, says", [
    (_root_red, "the root is red"),
    (_child_points_elsewhere, "point"),
    (_all_black, "black"),
    (_unflagged, "unstable"),
])
def test_check_invariants_reports_an_unstable_tree_that_is_not_its_pass_s_red_black_tree(
    kernel_factory, scan, damage, says
):
    h = kernel_factory(scan=scan, geo=Geometry(**{**SMALL, "nr_frames": 512}))
    _mid_pass_tree(h, 48)  # 24 nodes: not a perfect tree, so all-black breaks the heights
    h.check()
    damage(h, unstable_root(h.k, 0).get())
    with h.k.ksm_thread_mutex:
        bad = check_invariants(h.k)
    titles = [r["title"] for r in bad]
    assert "BUG: rbtree corrupted" in titles, titles
    text = next(r["text"] for r in bad if r["title"] == "BUG: rbtree corrupted")
    assert says in text, text
    h.allow_reports = True
