# The stable node's hlist of rmap_items: hlist_for_each_entry() and hlist_del().
#
# A stable node heads the list of the rmap_items merged into its KSM page
# (stable_node->hlist, rmap_item->hlist), a doubly linked list through the items'
# hnext/hprev handles. Walking and unlinking it need nothing but the two arenas, so they
# live below everything that uses them: the stable tree, the rmap_item code (rmap.py),
# reclaim's rmap_walk_ksm(), and the rmap-completeness detector in debug.py (which the
# page-freeing path itself depends on, and so cannot import the stable tree).
# rmap.stable_tree_append() is the matching hlist_add_head(), with its counters.
from __future__ import annotations

from typing import TYPE_CHECKING

from shared_mem.arena import NULL

if TYPE_CHECKING:
    from actors.kernel.context import Kernel


def items_of_node(k: Kernel, node: int) -> list[int]:
    """hlist_for_each_entry(rmap_item, &stable_node->hlist, hlist): the node's items."""
    ri = k.km.rmap_item
    out = []
    item = int(k.km.stable_node.hlist[k.km.stable_node.idx(node, "hlist")])
    while item:
        out.append(item)
        item = int(ri.hnext[ri.idx(item, "hlist")])
    return out


def hlist_del_item(k: Kernel, node: int, item: int) -> None:
    """hlist_del(&rmap_item->hlist): unlink item from node's list."""
    ri = k.km.rmap_item
    ii = ri.idx(item, "hlist_del")
    nxt, prv = int(ri.hnext[ii]), int(ri.hprev[ii])
    if prv:
        ri.hnext[ri.idx(prv, "hlist_del")] = nxt
    else:
        k.km.stable_node.hlist[k.km.stable_node.idx(node, "hlist_del")] = nxt
    if nxt:
        ri.hprev[ri.idx(nxt, "hlist_del")] = prv
    ri.hnext[ii] = NULL
    ri.hprev[ii] = NULL
