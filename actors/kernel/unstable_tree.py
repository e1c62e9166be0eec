# The unstable tree: pages whose checksum held still for one full scan.
#
# mm/ksm.c's unstable_tree_search_insert(): walk the tree comparing the scanned
# page with each tree item's *current* page (taken under that mm's mmap_lock by
# get_mergeable_page), and either return an identical page to merge with or
# insert the scanned item. The tree is never cleaned item by item: ksmd just
# resets the roots at the start of every full scan (remove_rmap_item_from_tree
# erases an item only if it was inserted during the current scan).
from __future__ import annotations

from actors.kernel import tree
from actors.kernel.context import Kernel
from actors.kernel.memory import put_page
from actors.kernel.merge import get_mergeable_page
from actors.kernel.rmap import unstable_flags, unstable_root
from actors.kernel.stable_tree import get_kpfn_nid
from shared_mem.arena import NULL


def unstable_tree_search_insert(k: Kernel, item: int, pfn: int, hint: int = NULL) -> tuple[int, int]:
    """(tree item, its page with a reference) for an identical page, else (NULL, -1).

    `hint` (--scan vector): the tree item an optimistic walk over the tree as it is now
    found identical; its page is taken and compared as the walk's last step would, and
    the whole walk is taken if it no longer matches."""
    km = k.km
    ri = km.rmap_item
    nid = get_kpfn_nid(k, pfn)
    if hint and ri.valid(hint):
        tree_pfn = get_mergeable_page(k, hint)
        if tree_pfn >= 0:
            if tree_pfn != pfn and not k.cmp.memcmp(pfn, tree_pfn) and (
                k.ks.merge_across_nodes or int(km.page["nid"][tree_pfn]) == nid
            ):
                return hint, tree_pfn
            put_page(k, tree_pfn)
    root = unstable_root(k, nid)
    parent, left = NULL, False
    node = root.get()
    while node:
        tree_pfn = get_mergeable_page(k, node)
        if tree_pfn < 0:
            return NULL, -1
        if tree_pfn == pfn:  # the same page mapped twice: a fork
            put_page(k, tree_pfn)
            return NULL, -1
        ret = k.cmp.memcmp(pfn, tree_pfn)
        parent = node
        ni = ri.idx(node, "unstable_tree_search_insert")
        if ret < 0:
            put_page(k, tree_pfn)
            left, node = True, int(ri.left[ni])
        elif ret > 0:
            put_page(k, tree_pfn)
            left, node = False, int(ri.right[ni])
        elif not k.ks.merge_across_nodes and int(km.page["nid"][tree_pfn]) != nid:
            put_page(k, tree_pfn)
            return NULL, -1
        else:
            return node, tree_pfn
    unstable_tree_insert_at(k, item, nid, parent, left)
    return NULL, -1


def unstable_tree_insert_at(k: Kernel, item: int, nid: int, parent: int, left: bool) -> None:
    """The insert that ends a search which found no identical page: item hangs under
    parent (on its left if `left`), as unstable_tree_search_insert()'s rb_link_node."""
    ri = k.km.rmap_item
    ii = ri.idx(item, "unstable_tree_insert")
    ri.address[ii] = int(ri.address[ii]) | unstable_flags(k)
    ri.nid[ii] = nid
    tree.link_node(ri, unstable_root(k, nid), parent, left, item)
    k.ks.pages_unshared += 1
    k.unstable_inserts += 1
