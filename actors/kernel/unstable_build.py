# The unstable tree built a run at a time (--scan vector).
#
# A steady pass over unique pages is, in mm/ksm.c, one unstable_tree_search_insert() per
# page: a walk of about log2(n) nodes and an rb_insert_color(). The vector scan already
# walks a run's candidates down the tree on arrays (tree_walk.py); what stayed page by
# page was the insert, and every insert rotates nodes that the next candidates' walks
# passed, so each of them had to take its walk up again by hand. This module takes that
# last step off the per-page path: the run's candidates that miss both trees (and have
# no twin in the run) are held back, and at the end of the run they join the tree all at
# once. Their places in the tree's order are where their walks ended (each walk ends at
# an empty link: the gap between two neighbours in order) and, for candidates that end in
# the same gap, the order of their contents (memcmp order: big-endian words, then bytes).
# The tree is then laid out again over the whole order, balanced: the middle item of
# every range is the root of that range, the deepest level red and the rest black, which
# is a valid red-black tree (every path from the root to an empty link passes the same
# number of black nodes, no red node has a red child).
#
# What it gives up, and why that is allowed (docs/DECISIONS.md, "The unstable tree a run
# at a time"): the tree holds the kernel's items in the kernel's order, but not in the
# kernel's shape. The unstable tree is ksmd's alone (only ksmd inserts, under
# ksm_thread_mutex, and it is thrown away at every pass), the shape decides only which
# nodes a walk meets, and a walk that meets a page changed since it was inserted can go
# either way in the kernel too. A page written while the run is under way is seen by the
# next run. The exact shape is the exact and batch scans' (the default).
#
# The order is kept between runs (UnstableOrder, in this process: the tree is ksmd's): a
# run's merges only take items out of the tree, which the next build sees as items no
# longer flagged unstable in this pass. An insert by the page-by-page path (a candidate
# whose walk stopped, a page a fork shares) puts an item in the tree that the kept order
# does not have: the build then reads the order from the tree itself.
from __future__ import annotations

import numpy as np

from actors.kernel import tree
from actors.kernel.context import Kernel
from actors.kernel.rmap import unstable_flags, unstable_root
from actors.kernel.tree_walk import Descent
from shared_mem.arena import NULL
from shared_mem.layout import SEQNR_MASK, STABLE_FLAG, UNSTABLE_FLAG

_FLAG_BITS = SEQNR_MASK | UNSTABLE_FLAG | STABLE_FLAG


class UnstableOrder:
    """The unstable tree's items in order, as this process last laid it out: valid for
    pass `seqnr` while k.unstable_inserts (inserts page by page) is still `inserts`."""

    __slots__ = ("inserts", "items", "seqnr")

    def __init__(self, seqnr: int, inserts: int, items: np.ndarray) -> None:
        self.seqnr, self.inserts, self.items = seqnr, inserts, items


def unstable_tree_order(k: Kernel) -> np.ndarray:
    """The items of the unstable tree (node 0's) in order, as int64 handles."""
    ri = k.km.rmap_item
    root = unstable_root(k, 0).get()
    kept = k.unstable_order
    if not root:
        return np.zeros(0, dtype=np.int64)
    if kept is not None and kept.seqnr == k.ks.seqnr and kept.inserts == k.unstable_inserts:
        items = kept.items
        live = ri.valid_many(items)
        ii = ri.idx_many(items[live], "unstable_tree_order")
        live[live] = (ri.address[ii] & _FLAG_BITS) == unstable_flags(k)
        return items[live]
    return np.array(tree.walk(ri, unstable_root(k, 0)), dtype=np.int64)


def balanced_layout(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """(parent, left, right, colour, root) of a balanced tree over positions 0..n-1 in
    order: positions, -1 for none. The middle of every range is its root."""
    parent = np.full(n, -1, dtype=np.int64)
    left = np.full(n, -1, dtype=np.int64)
    right = np.full(n, -1, dtype=np.int64)
    depth = np.zeros(n, dtype=np.int64)
    lo, hi = np.zeros(min(n, 1), dtype=np.int64), np.full(min(n, 1), n, dtype=np.int64)
    par, is_left = np.full(min(n, 1), -1, dtype=np.int64), np.zeros(min(n, 1), dtype=bool)
    d = 0
    while len(lo):
        mid = (lo + hi) // 2
        parent[mid] = par
        depth[mid] = d
        has = par >= 0
        left[par[has & is_left]] = mid[has & is_left]
        right[par[has & ~is_left]] = mid[has & ~is_left]
        lo, hi = np.concatenate([lo, mid + 1]), np.concatenate([mid, hi])
        par = np.concatenate([mid, mid])
        is_left = np.concatenate([np.ones(len(mid), dtype=bool), np.zeros(len(mid), dtype=bool)])
        keep = lo < hi
        lo, hi, par, is_left = lo[keep], hi[keep], par[keep], is_left[keep]
        d += 1
    color = np.full(n, tree.RB_BLACK, dtype=np.int64)
    if n > 1:
        color[depth == depth.max()] = tree.RB_RED
    return parent, left, right, color, n // 2 if n else -1


def _content_order(k: Kernel, gaps: np.ndarray, pfns: np.ndarray) -> np.ndarray:
    """The order of the new items: by gap, then by page contents (memcmp order)."""
    be = k.cmp.be
    w0, w1 = be[pfns, 0], be[pfns, 1]
    order = np.lexsort((w1, w0, gaps))
    g, a, b = gaps[order], w0[order], w1[order]
    tie = (g[1:] == g[:-1]) & (a[1:] == a[:-1]) & (b[1:] == b[:-1])
    if tie.any():
        # Rows alike in their first 16 bytes: the rest of the page decides, in bytes.
        frames = k.km.frames
        starts = np.flatnonzero(tie & ~np.concatenate([[False], tie[:-1]]))
        for s in starts.tolist():
            e = s + 1
            while e < len(tie) and tie[e]:
                e += 1
            seg = order[s : e + 1].tolist()
            order[s : e + 1] = sorted(seg, key=lambda j: frames[int(pfns[j])].tobytes())
    return order


def unstable_tree_build(k: Kernel, items: np.ndarray, pfns: np.ndarray, d: Descent, cols: np.ndarray) -> np.ndarray:
    """Insert the run's held-back items (their pages pfns, referenced by the caller) into
    the unstable tree at once; d[cols] are their walks over the tree as it is now.
    Returns the indices (into items) of those whose walk did not end at an empty link:
    they take unstable_tree_search_insert() page by page."""
    ri = k.km.rmap_item
    order = unstable_tree_order(k)
    ok = ~d.stop[cols]
    new = np.flatnonzero(ok)
    depth = d.depth[cols[new]]
    gaps = np.zeros(len(new), dtype=np.int64)
    if len(order):
        where = np.full(ri.capacity, -1, dtype=np.int64)
        where[ri.idx_many(order, "unstable_tree_build")] = np.arange(len(order))
        last = np.maximum(depth - 1, 0)
        par = d.path[last, cols[new]]
        turned_left = d.dirs[last, cols[new]]
        pos = where[ri.idx_many(par, "unstable_tree_build")]
        if (depth == 0).any() or (pos < 0).any() or (order[np.maximum(pos, 0)] != par).any():
            raise RuntimeError("BUG: a held-back item's walk ended outside the unstable tree")
        gaps = pos + ~turned_left
    o = _content_order(k, gaps, pfns[new])
    merged = np.insert(order, gaps[o], items[new][o]) if len(order) else items[new][o]
    _lay_out(k, merged)
    ii = ri.idx_many(items[new], "unstable_tree_build")
    ri.address[ii] = ri.address[ii] | unstable_flags(k)
    ri.nid[ii] = 0
    k.ks.pages_unshared += len(new)
    k.unstable_order = UnstableOrder(k.ks.seqnr, k.unstable_inserts, merged)
    return np.flatnonzero(~ok)


def _lay_out(k: Kernel, order: np.ndarray) -> None:
    """Link the items of `order` as a balanced red-black tree, in that order."""
    ri = k.km.rmap_item
    n = len(order)
    root = unstable_root(k, 0)
    if not n:
        root.set(NULL)
        return
    parent, left, right, color, top = balanced_layout(n)
    ext = np.concatenate([order, [NULL]])  # position -1 is NULL
    ii = ri.idx_many(order, "unstable_tree_build")
    ri.parent[ii] = ext[parent]
    ri.left[ii] = ext[left]
    ri.right[ii] = ext[right]
    ri.rb_color[ii] = color
    root.set(int(order[top]))
    tree.relinked(ri)  # every link moved: no walk taken before stands
