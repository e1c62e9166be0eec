# rmap_items: KSM's reverse map from (mm, address) to the trees.
#
# Follows mm/ksm.c: one rmap_item per scanned (mm, address), kept on its
# mm_slot's address-sorted singly linked list; the flags live in the low bits of
# the address (SEQNR_MASK, UNSTABLE_FLAG, STABLE_FLAG). A stable rmap_item holds
# a reference on the anon_vma it was merged under (seed 004, "hold anon_vma in
# rmap_item"), dropped when it leaves the stable tree. The scan cursor's
# "pointer to the next link" (struct rmap_item **rmap_list) is a Link here: the
# owner record and whether the link is the slot's head or an item's next field.
from __future__ import annotations

import numpy as np

from actors.kernel import mm as mmops
from actors.kernel import stable_tree, tree
from actors.kernel.context import Kernel
from actors.kernel.hlist import hlist_del_item
from actors.kernel.page import put_page
from shared_mem.arena import NULL, OutOfObjects
from shared_mem.layout import PAGE_MASK, SEQNR_MASK, STABLE_FLAG, UNSTABLE_FLAG


class Link:
    """struct rmap_item **: either &mm_slot->rmap_list or &rmap_item->rmap_list."""

    __slots__ = ("in_slot", "owner")

    def __init__(self, owner: int, in_slot: bool) -> None:
        self.owner = owner
        self.in_slot = in_slot

    def get(self, k: Kernel) -> int:
        if self.in_slot:
            return int(k.km.mm_slot.rmap_list[k.km.mm_slot.idx(self.owner, "rmap_list")])
        return int(k.km.rmap_item.rmap_next[k.km.rmap_item.idx(self.owner, "rmap_list")])

    def set(self, k: Kernel, h: int) -> None:
        if self.in_slot:
            k.km.mm_slot.rmap_list[k.km.mm_slot.idx(self.owner, "rmap_list")] = h
        else:
            k.km.rmap_item.rmap_next[k.km.rmap_item.idx(self.owner, "rmap_list")] = h


def cursor_link(k: Kernel) -> Link:
    ks = k.ks
    return Link(ks.scan_rmap_owner, bool(ks.scan_rmap_in_slot))


def set_cursor_link(k: Kernel, link: Link) -> None:
    ks = k.ks
    ks.scan_rmap_owner = link.owner
    ks.scan_rmap_in_slot = int(link.in_slot)


# -- allocation ----------------------------------------------------------------------------
def alloc_rmap_item(k: Kernel) -> int:
    """kmem_cache_zalloc(__GFP_NORETRY): NULL on failure, the page is just skipped."""
    try:
        h = k.km.rmap_item.alloc(site="alloc_rmap_item")
    except OutOfObjects:
        k.ev("rmap_item_alloc_fail")
        return NULL
    k.ks.rmap_items += 1
    return h


def free_rmap_item(k: Kernel, item: int) -> None:
    km = k.km
    ii = km.rmap_item.idx(item, "free_rmap_item")
    k.ks.rmap_items -= 1
    mm = int(km.rmap_item.mm[ii])
    km.mm.atomic("ksm_rmap_items").dec_return(km.mm.idx(mm, "free_rmap_item"))
    km.rmap_item.free(item, site="free_rmap_item")


# -- tree membership --------------------------------------------------------------------------
def unstable_root(k: Kernel, nid: int) -> tree.RootRef:
    return tree.RootRef(k.km.ksm["root_unstable"][0], nid)


def remove_rmap_item_from_tree(k: Kernel, item: int) -> None:
    km = k.km
    ri = km.rmap_item
    ii = ri.idx(item, "remove_rmap_item_from_tree")
    address = int(ri.address[ii])
    if address & STABLE_FLAG:
        node = int(ri.head[ii])
        pfn = stable_tree.ksm_get_folio(k, node, lock=True)
        if pfn < 0:
            # The node was stale and ksm_get_folio() removed it with all its items.
            return
        try:
            hlist_del_item(k, node, item)
        finally:
            k.page_lock(pfn).unlock()
            put_page(k, pfn)
        ni = km.stable_node.idx(node, "remove_rmap_item_from_tree")
        if km.stable_node.hlist[ni]:
            k.ks.pages_sharing -= 1
        else:
            k.ks.pages_shared -= 1
        mm = int(ri.mm[ii])
        km.mm.atomic("ksm_merging_pages").dec_return(km.mm.idx(mm, "ksm_merging_pages"))
        if km.stable_node.rmap_hlist_len[ni] <= 0:
            raise RuntimeError("BUG: stable node rmap_hlist_len underflow")
        km.stable_node.rmap_hlist_len[ni] -= 1
        av = int(ri.anon_vma[ii])
        if av:
            mmops.put_anon_vma(k, av)
        ri.anon_vma[ii] = NULL
        ri.head[ii] = NULL
        ri.address[ii] = address & PAGE_MASK
        k.ev("ksm_remove_rmap_item", rmap_item=ii, stable_node=ni, addr=address & PAGE_MASK)
    elif address & UNSTABLE_FLAG:
        ks = k.ks
        age = (ks.seqnr - address) & 0xFF
        if age > 1:
            raise RuntimeError(f"BUG: unstable rmap_item {ii} age {age} > 1")
        if age == 0:
            tree.erase(ri, unstable_root(k, int(ri.nid[ii])), item)
        ks.pages_unshared -= 1
        ri.address[ii] = address & PAGE_MASK


def remove_rmap_items_from_old_unstable_tree(k: Kernel, items: np.ndarray) -> None:
    """remove_rmap_item_from_tree() of many items that are in no tree or in the previous
    pass's unstable tree (age 1: the tree itself is gone, so only the flag and the counter
    change), on arrays (--scan vector's held-back items)."""
    ri = k.km.rmap_item
    ii = ri.idx_many(items, "remove_rmap_item_from_tree")
    addr = ri.address[ii]
    old = (addr & UNSTABLE_FLAG) != 0
    if not old.any():
        return
    if (addr[old] & STABLE_FLAG).any() or (((k.ks.seqnr - addr[old]) & 0xFF) != 1).any():
        raise RuntimeError("BUG: an rmap_item taken for the previous pass's tree is in a tree of this one")
    ri.address[ii[old]] = addr[old] & PAGE_MASK
    k.ks.pages_unshared -= int(old.sum())


def unstable_flags(k: Kernel) -> int:
    return UNSTABLE_FLAG | (k.ks.seqnr & SEQNR_MASK)


def remove_trailing_rmap_items(k: Kernel, link: Link) -> None:
    """Free every rmap_item from *link on: no mergeable vma covers them any more."""
    item = link.get(k)
    link.set(k, NULL)
    ri = k.km.rmap_item
    while item:
        nxt = int(ri.rmap_next[ri.idx(item, "remove_trailing_rmap_items")])
        remove_rmap_item_from_tree(k, item)
        free_rmap_item(k, item)
        item = nxt


def get_next_rmap_item(k: Kernel, slot: int, link: Link, addr: int) -> int:
    """The rmap_item for addr at the cursor: reuse, or free stale ones below and allocate."""
    km = k.km
    ri = km.rmap_item
    while True:
        item = link.get(k)
        if not item:
            break
        ii = ri.idx(item, "get_next_rmap_item")
        a = int(ri.address[ii])
        if a & PAGE_MASK == addr:
            return item
        if a > addr:
            break
        link.set(k, int(ri.rmap_next[ii]))
        remove_rmap_item_from_tree(k, item)
        free_rmap_item(k, item)
    item = alloc_rmap_item(k)
    if item:
        ii = ri.idx(item, "get_next_rmap_item")
        mm = int(km.mm_slot.mm[km.mm_slot.idx(slot, "get_next_rmap_item")])
        ri.mm[ii] = mm
        km.mm.atomic("ksm_rmap_items").inc_return(km.mm.idx(mm, "ksm_rmap_items"))
        ri.address[ii] = addr
        ri.rmap_next[ii] = link.get(k)
        link.set(k, item)
    return item


def get_next_rmap_items_new(k: Kernel, slot: int, link: Link, addrs: list[int]) -> np.ndarray:
    """get_next_rmap_item() of ascending addresses none of which has an rmap_item yet,
    all below the item at the cursor (if any): their items are allocated at once and
    linked at the cursor in address order, as that many calls would leave the list.
    Fewer items than addresses when the cache runs out (the first page without one is
    where the kernel's allocation would have failed); the handles, as an int64 array."""
    km = k.km
    ri = km.rmap_item
    hs = ri.alloc_many(len(addrs), site="alloc_rmap_item")
    n = len(hs)
    if n < len(addrs):
        k.ev("rmap_item_alloc_fail")
    if not n:
        return hs
    ii = ri.idx_many(hs, "get_next_rmap_item")
    mm = int(km.mm_slot.mm[km.mm_slot.idx(slot, "get_next_rmap_item")])
    ri.mm[ii] = mm
    ri.address[ii] = addrs[:n]
    ri.rmap_next[ii[:-1]] = hs[1:]
    ri.rmap_next[ii[-1]] = link.get(k)
    link.set(k, int(hs[0]))
    k.ks.rmap_items += n
    km.mm.atomic("ksm_rmap_items").add_return(km.mm.idx(mm, "ksm_rmap_items"), n)
    return hs


def stable_tree_append(k: Kernel, item: int, node: int, bypass: bool) -> None:
    """Hang a merged rmap_item on its stable node (caller holds the KSM page lock)."""
    km = k.km
    ri = km.rmap_item
    sn = km.stable_node
    ii = ri.idx(item, "stable_tree_append")
    ni = sn.idx(node, "stable_tree_append")
    sn.rmap_hlist_len[ni] += 1
    if not bypass and sn.rmap_hlist_len[ni] > k.ks.max_page_sharing:
        k.ev("warning", what="rmap_hlist_len > max_page_sharing", stable_node=ni)
    ri.head[ii] = node
    ri.address[ii] = int(ri.address[ii]) | STABLE_FLAG
    first = int(sn.hlist[ni])
    ri.hnext[ii] = first
    ri.hprev[ii] = NULL
    if first:
        ri.hprev[ri.idx(first, "stable_tree_append")] = item
    sn.hlist[ni] = item
    if first:
        k.ks.pages_sharing += 1
    else:
        k.ks.pages_shared += 1
    mm = int(ri.mm[ii])
    km.mm.atomic("ksm_merging_pages").inc_return(km.mm.idx(mm, "ksm_merging_pages"))
