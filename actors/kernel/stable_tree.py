# The stable tree: write-protected KSM pages ordered by content, with chains.
#
# Follows mm/ksm.c's stable_tree_search / stable_tree_insert / ksm_get_folio and the
# max_page_sharing machinery: a content with more sharers than max_page_sharing
# becomes a *chain* node in the tree holding *dups*, each dup a separate KSM page
# with at most max_page_sharing rmap_items. A KSM page's struct page points at its
# stable node (page->mapping), but the node holds no page reference (the
# "keyhole"): ksm_get_folio() checks the page still points back, and removes the
# node as stale when it does not. remove_all_stable_nodes() is seed 002's fix.
from __future__ import annotations

from actors.kernel import mm as mmops
from actors.kernel import tree
from actors.kernel.context import Kernel
from actors.kernel.page import get_page, put_page
from shared_mem.arena import NULL
from shared_mem.layout import (
    NODE_CHAIN,
    NODE_DUP,
    NODE_MIGRATE,
    NODE_REGULAR,
    PAGE_MASK,
    PG_KSM,
    STABLE_FLAG,
    STABLE_NODE_CHAIN,
)

EBUSY = -16


def stable_root(k: Kernel, nid: int) -> tree.RootRef:
    return tree.RootRef(k.km.ksm["root_stable"][0], nid)


def get_kpfn_nid(k: Kernel, pfn: int) -> int:
    return 0 if k.ks.merge_across_nodes else int(k.km.page["nid"][pfn])


def is_stable_node_chain(k: Kernel, node: int) -> bool:
    sn = k.km.stable_node
    return sn.rmap_hlist_len[sn.idx(node, "is_stable_node_chain")] == STABLE_NODE_CHAIN


# The old name, still used by tests/kernel/ (being written in parallel); remove with its last user.


def is_page_sharing_candidate(k: Kernel, node: int, offset: int = 0) -> bool:
    sn = k.km.stable_node
    n = int(sn.rmap_hlist_len[sn.idx(node, "sharing_candidate")])
    # A node nobody maps any more is no candidate: its page is about to go (mm/ksm.c).
    return n > 0 and n + offset < k.ks.max_page_sharing


def folio_set_stable_node(k: Kernel, pfn: int, node: int) -> None:
    """folio_set_stable_node(): the page becomes a KSM page pointing at node (or NULL)."""
    k.km.page["flags"][pfn] |= PG_KSM
    k.km.page["mapping"][pfn] = node


# -- lookup of the page behind a node -------------------------------------------------------
def ksm_get_folio(k: Kernel, node: int, lock: bool = False, trylock: bool = False) -> int:
    """The KSM page of node with a reference (and locked if asked), or -1 if stale.

    Returns EBUSY (negative, distinct from -1) when trylock fails.
    """
    sn = k.km.stable_node
    pfn = int(sn.kpfn[sn.idx(node, "ksm_get_folio")])
    flags, mapping = k.page_flags, k.page_mapping
    if not flags[pfn] & PG_KSM or mapping[pfn] != node:
        return _stale(k, node)
    if not k.page_ref.inc_not_zero(pfn):
        return _stale(k, node)
    if mapping[pfn] != node or not flags[pfn] & PG_KSM:
        put_page(k, pfn)
        return _stale(k, node)
    if trylock:
        if not k.page_lock(pfn).trylock():
            put_page(k, pfn)
            return EBUSY
        if mapping[pfn] != node:
            k.page_lock(pfn).unlock()
            put_page(k, pfn)
            return _stale(k, node)
    elif lock:
        k.page_lock(pfn).lock()
        if mapping[pfn] != node:
            k.page_lock(pfn).unlock()
            put_page(k, pfn)
            return _stale(k, node)
    return pfn


def _stale(k: Kernel, node: int) -> int:
    remove_node_from_stable_tree(k, node)
    return -1


# -- node lifetime ----------------------------------------------------------------------------
def alloc_stable_node(k: Kernel, role: int = NODE_REGULAR) -> int:
    sn = k.km.stable_node
    h = sn.alloc(site="alloc_stable_node")
    sn.role[sn.idx(h, "alloc_stable_node")] = role
    return h


def free_stable_node(k: Kernel, node: int) -> None:
    sn = k.km.stable_node
    ni = sn.idx(node, "free_stable_node")
    if sn.rmap_hlist_len[ni] and sn.rmap_hlist_len[ni] != STABLE_NODE_CHAIN:
        raise RuntimeError(f"BUG: freeing stable node {ni} with {int(sn.rmap_hlist_len[ni])} rmap_items")
    sn.free(node, site="free_stable_node")


def dups_of(k: Kernel, chain: int) -> list[int]:
    sn = k.km.stable_node
    out = []
    d = int(sn.hlist[sn.idx(chain, "chain_dups")])
    while d:
        out.append(d)
        d = int(sn.dup_next[sn.idx(d, "chain_dups")])
    return out


def stable_node_chain_add_dup(k: Kernel, dup: int, chain: int) -> None:
    sn = k.km.stable_node
    di = sn.idx(dup, "stable_node_chain_add_dup")
    ci = sn.idx(chain, "stable_node_chain_add_dup")
    sn.role[di] = NODE_DUP
    sn.chain[di] = chain
    first = int(sn.hlist[ci])
    sn.dup_next[di] = first
    sn.dup_prev[di] = NULL
    if first:
        sn.dup_prev[sn.idx(first, "chain_add_dup")] = dup
    sn.hlist[ci] = dup
    k.ks.stable_node_dups += 1


def _chain_unlink_dup(k: Kernel, dup: int) -> None:
    sn = k.km.stable_node
    di = sn.idx(dup, "stable_node_dup_del")
    chain = int(sn.chain[di])
    nxt, prv = int(sn.dup_next[di]), int(sn.dup_prev[di])
    if prv:
        sn.dup_next[sn.idx(prv, "dup_del")] = nxt
    else:
        sn.hlist[sn.idx(chain, "dup_del")] = nxt
    if nxt:
        sn.dup_prev[sn.idx(nxt, "dup_del")] = prv
    sn.dup_next[di] = NULL
    sn.dup_prev[di] = NULL
    sn.chain[di] = NULL


def stable_node_dup_del(k: Kernel, node: int) -> None:
    sn = k.km.stable_node
    ni = sn.idx(node, "stable_node_dup_del")
    role = int(sn.role[ni])
    if role == NODE_DUP:
        _chain_unlink_dup(k, node)
        k.ks.stable_node_dups -= 1
    elif role == NODE_REGULAR:
        tree.erase(sn, stable_root(k, int(sn.nid[ni])), node)
    elif role == NODE_MIGRATE:
        pass
    else:
        raise RuntimeError("BUG: stable_node_dup_del on a chain")


def remove_node_from_stable_tree(k: Kernel, node: int) -> None:
    """Unhook every rmap_item of a stale node, then free the node."""
    km = k.km
    ri = km.rmap_item
    sn = km.stable_node
    ni = sn.idx(node, "remove_node_from_stable_tree")
    item = int(sn.hlist[ni])
    while item:
        ii = ri.idx(item, "remove_node_from_stable_tree")
        nxt = int(ri.hnext[ii])
        if nxt:
            k.ks.pages_sharing -= 1
        else:
            k.ks.pages_shared -= 1
        mm = int(ri.mm[ii])
        km.mm.atomic("ksm_merging_pages").dec_return(km.mm.idx(mm, "ksm_merging_pages"))
        av = int(ri.anon_vma[ii])
        if av:
            mmops.put_anon_vma(k, av)
        ri.anon_vma[ii] = NULL
        ri.head[ii] = NULL
        ri.hnext[ii] = NULL
        ri.hprev[ii] = NULL
        ri.address[ii] = int(ri.address[ii]) & PAGE_MASK
        sn.rmap_hlist_len[ni] -= 1
        item = nxt
    sn.hlist[ni] = NULL
    stable_node_dup_del(k, node)
    k.ev("ksm_remove_ksm_page", stable_node=ni, pfn=int(sn.kpfn[ni]))
    free_stable_node(k, node)


def free_stable_node_chain(k: Kernel, chain: int) -> None:
    sn = k.km.stable_node
    ci = sn.idx(chain, "free_stable_node_chain")
    tree.erase(sn, stable_root(k, int(sn.nid[ci])), chain)
    sn.free(chain, site="free_stable_node_chain")
    k.ks.stable_node_chains -= 1


def alloc_stable_node_chain(k: Kernel, dup: int) -> int:
    """The regular node dup becomes the first dup of a new chain that takes its tree place."""
    sn = k.km.stable_node
    chain = alloc_stable_node(k, NODE_CHAIN)
    ci = sn.idx(chain, "alloc_stable_node_chain")
    di = sn.idx(dup, "alloc_stable_node_chain")
    sn.rmap_hlist_len[ci] = STABLE_NODE_CHAIN
    sn.nid[ci] = sn.nid[di]
    sn.chain_prune_time[ci] = k.clock.monotonic_ns()
    tree.replace_node(sn, stable_root(k, int(sn.nid[di])), dup, chain)
    stable_node_chain_add_dup(k, dup, chain)
    k.ks.stable_node_chains += 1
    return chain


# -- chains: choosing a dup -----------------------------------------------------------------
def stable_node_dup(k: Kernel, chain: int, prune: bool) -> tuple[int, int, int]:
    """stable_node_dup(): (dup with room or NULL, its page or -1, the node now in the tree)."""
    sn = k.km.stable_node
    ci = sn.idx(chain, "stable_node_dup")
    now = k.clock.monotonic_ns()
    if prune and now < int(sn.chain_prune_time[ci]) + int(k.ks.stable_node_chains_prune_millisecs) * 1_000_000:
        prune = False
    elif prune:
        sn.chain_prune_time[ci] = now
    found, found_pfn, found_len = NULL, -1, -1
    for dup in dups_of(k, chain):
        pfn = ksm_get_folio(k, dup)
        if pfn < 0:
            continue
        di = sn.idx(dup, "stable_node_dup")
        cand = is_page_sharing_candidate(k, dup)
        if not found or (cand and (not is_page_sharing_candidate(k, found)
                                   or sn.rmap_hlist_len[di] > found_len)):
            if found:
                put_page(k, found_pfn)
            found, found_pfn, found_len = dup, pfn, int(sn.rmap_hlist_len[di])
            if not prune and cand:
                break
            continue
        put_page(k, pfn)
    node = chain
    if found:
        if len(dups_of(k, chain)) == 1:
            # One dup left: collapse the chain back into a regular node.
            fi = sn.idx(found, "stable_node_dup")
            _chain_unlink_dup(k, found)
            sn.role[fi] = NODE_REGULAR
            tree.replace_node(sn, stable_root(k, int(sn.nid[ci])), chain, found)
            sn.free(chain, site="stable_node_dup")
            k.ks.stable_node_chains -= 1
            k.ks.stable_node_dups -= 1
            node = found
        elif int(sn.hlist[ci]) != found and is_page_sharing_candidate(k, found, 1):
            _chain_unlink_dup(k, found)
            stable_node_chain_add_dup(k, found, chain)
            k.ks.stable_node_dups -= 1  # stable_node_chain_add_dup counted it again
    else:
        free_stable_node_chain(k, chain)
        node = NULL
    if found and is_page_sharing_candidate(k, found):
        return found, found_pfn, node
    if found_pfn >= 0:
        put_page(k, found_pfn)
    return NULL, -1, node


def __stable_node_chain(k: Kernel, node: int, prune: bool) -> tuple[int, int, int]:
    """__stable_node_chain(): (dup with room or NULL, a page ref or -1, node in the tree)."""
    sn = k.km.stable_node
    n = int(sn.rmap_hlist_len[sn.idx(node, "__stable_node_chain")])
    if n != STABLE_NODE_CHAIN:  # not a chain: is_page_sharing_candidate() on the same read
        if 0 < n < k.ks.max_page_sharing:
            return node, ksm_get_folio(k, node), node
        return NULL, -1, node
    return stable_node_dup(k, node, prune)


def _dup_any(k: Kernel, node: int) -> int:
    """stable_node_dup_any(): any dup to compare contents with (NULL frees an empty chain)."""
    if not is_stable_node_chain(k, node):
        return node
    dups = dups_of(k, node)
    if not dups:
        free_stable_node_chain(k, node)
        return NULL
    return dups[0]


# -- search and insert ------------------------------------------------------------------------
# stable_tree_search()'s hint from an optimistic walk (--scan vector): no node is
# identical (the walk's path is unchanged and ends at an empty link).
STABLE_MISS = -1
_RESTART = -(1 << 40)


def _stable_match(k: Kernel, dup: int) -> int:
    """The end of a search at a node identical to the page: dup is the node (or the
    chain's dup) with room, NULL when every dup is full."""
    if not dup:
        # Every dup of this content is full: wait for an unstable-tree match to make a
        # new KSM page, which joins the chain.
        return -1
    tree_pfn = ksm_get_folio(k, dup, trylock=True)
    if tree_pfn == EBUSY:
        return EBUSY
    if tree_pfn < 0:
        return _RESTART
    k.page_lock(tree_pfn).unlock()
    return tree_pfn


def stable_tree_search(k: Kernel, pfn: int, hint: int = NULL) -> int:
    """Find a KSM page with pfn's content that can take one more sharer.

    Returns its pfn with a reference, -1 for none, or EBUSY if its page lock was busy.
    `hint` (--scan vector, tree_walk.py): STABLE_MISS when an optimistic walk over the
    tree as it is now found nothing identical, or the regular node it found identical:
    the search is then only its last step, taken as the kernel takes it (and the whole
    walk if that node no longer matches).
    """
    km = k.km
    sn = km.stable_node
    page_node = int(k.page_mapping[pfn]) if k.page_flags[pfn] & PG_KSM else NULL
    if page_node and sn.valid(page_node) and sn.role[sn.idx(page_node, "stable_tree_search")] != NODE_MIGRATE:
        get_page(k, pfn)
        return pfn
    if hint == STABLE_MISS:
        return -1
    if hint and sn.valid(hint) and int(sn.role[sn.idx(hint, "stable_tree_search")]) == NODE_REGULAR:
        dup, tree_pfn, node = __stable_node_chain(k, hint, prune=True)
        if node and not dup:
            tree_pfn = ksm_get_folio(k, node)
        if node and tree_pfn >= 0:
            ret = k.cmp.memcmp(pfn, tree_pfn)
            put_page(k, tree_pfn)
            if ret == 0:
                got = _stable_match(k, dup)
                if got != _RESTART:
                    return got
    nid = get_kpfn_nid(k, pfn)
    root = stable_root(k, nid)
    while True:  # "again": restart after the tree changed under the walk
        node = root.get()
        restart = False
        while node:
            dup, tree_pfn, node = __stable_node_chain(k, node, prune=True)
            if not node:
                restart = True
                break
            if not dup:
                anyn = _dup_any(k, node)
                if not anyn:
                    restart = True
                    break
                tree_pfn = ksm_get_folio(k, anyn)
            if tree_pfn < 0:
                restart = True
                break
            ret = k.cmp.memcmp(pfn, tree_pfn)
            put_page(k, tree_pfn)
            ni = sn.idx(node, "stable_tree_search")
            if ret < 0:
                node = int(sn.left[ni])
            elif ret > 0:
                node = int(sn.right[ni])
            else:
                got = _stable_match(k, dup)
                if got == _RESTART:
                    restart = True
                    break
                return got
        if not restart:
            return -1


def _stable_insert_walk(k: Kernel, root: tree.RootRef, kpfn: int) -> tuple[int, bool, bool]:
    """stable_tree_insert()'s walk: (parent, left, need_chain), need_chain when it met a
    node identical to kpfn (parent is then that node)."""
    sn = k.km.stable_node
    while True:
        parent, left, node = NULL, False, root.get()
        restart = False
        while node:
            dup, tree_pfn, node = __stable_node_chain(k, node, prune=False)
            if not node:
                restart = True
                break
            if not dup:
                anyn = _dup_any(k, node)
                if not anyn:
                    restart = True
                    break
                tree_pfn = ksm_get_folio(k, anyn)
            if tree_pfn < 0:
                restart = True
                break
            ret = k.cmp.memcmp(kpfn, tree_pfn)
            put_page(k, tree_pfn)
            parent = node
            ni = sn.idx(node, "stable_tree_insert")
            if ret < 0:
                left, node = True, int(sn.left[ni])
            elif ret > 0:
                left, node = False, int(sn.right[ni])
            else:
                return parent, left, True
        if not restart:
            return parent, left, False


def stable_tree_insert(k: Kernel, kpfn: int, at: tuple[int, bool] | None = None) -> int:
    """Put a freshly merged KSM page into the stable tree; returns its node (dup) or NULL.

    `at` (--scan vector): (parent, left), the empty link where a walk over the tree as it
    is now ended without meeting an identical node (tree_walk.walk_end); the insert is
    then only its last step."""
    km = k.km
    sn = km.stable_node
    nid = get_kpfn_nid(k, kpfn)
    root = stable_root(k, nid)
    if at is None:
        parent, left, need_chain = _stable_insert_walk(k, root, kpfn)
    else:
        (parent, left), need_chain = at, False
    try:
        new = alloc_stable_node(k, NODE_REGULAR)
    except MemoryError:
        return NULL
    ni = sn.idx(new, "stable_tree_insert")
    sn.kpfn[ni] = kpfn
    sn.nid[ni] = nid
    sn.rmap_hlist_len[ni] = 0
    sn.key[ni] = k.cmp.key(kpfn)
    folio_set_stable_node(k, kpfn, new)
    if not need_chain:
        tree.link_node(sn, root, parent, left, new)
    else:
        chain = parent
        if not is_stable_node_chain(k, chain):
            chain = alloc_stable_node_chain(k, chain)
        stable_node_chain_add_dup(k, new, chain)
    k.ev("ksm_stable_tree_insert", stable_node=ni, pfn=kpfn, nid=nid, chained=need_chain)
    return new


# -- teardown (seed 002) -------------------------------------------------------------------------
def remove_stable_node(k: Kernel, node: int) -> int:
    """0 when the node is gone, EBUSY if its page is still mapped."""
    pfn = ksm_get_folio(k, node, lock=True)
    if pfn < 0:
        return 0
    try:
        if k.km.page["mapcount"][pfn] > 0:
            k.ev("warning", what="remove_stable_node: page still mapped", pfn=pfn)
            return EBUSY
        # Maybe in swapcache or still referenced: unhook it, it stays PageKsm with no node.
        k.km.page["mapping"][pfn] = NULL
        remove_node_from_stable_tree(k, node)
        return 0
    finally:
        k.page_lock(pfn).unlock()
        put_page(k, pfn)


def remove_stable_node_chain(k: Kernel, chain: int) -> bool:
    for dup in dups_of(k, chain):
        if remove_stable_node(k, dup):
            return True
    free_stable_node_chain(k, chain)
    return False


def remove_all_stable_nodes(k: Kernel) -> int:
    """Empty every stable tree; EBUSY if some KSM page is still mapped (caller holds the mutex)."""
    err = 0
    sn = k.km.stable_node
    for nid in range(k.km.geo.nr_nodes):
        root = stable_root(k, nid)
        while root.get():
            node = root.get()
            busy = (remove_stable_node_chain(k, node) if is_stable_node_chain(k, node)
                    else remove_stable_node(k, node))
            if busy:
                err = EBUSY
                break
    for i in sn.live_indices():
        if sn.role[i] == NODE_MIGRATE and remove_stable_node(k, sn.handle_of(int(i))):
            err = EBUSY
    return err


def stable_item_check(k: Kernel, item: int) -> bool:
    ri = k.km.rmap_item
    return bool(ri.address[ri.idx(item, "stable_item_check")] & STABLE_FLAG)
