# Invariant checks at quiescent points (DESIGN.md "Detection and reports").
#
# Run with ksm_thread_mutex held and no task in the middle of a system call or
# fault. Each violated invariant is a report shaped like the kernel's own checks:
# "BUG: Bad page state" for refcount/mapcount conservation, "BUG: Bad page map" for
# a pte that maps a free frame, "ksm: counter mismatch" for /sys/kernel/mm/ksm
# counters that disagree with the objects they count, and so on.
from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from actors.kernel import mm_slot as slots
from actors.kernel.context import Kernel
from actors.kernel.debug import PAGE_DBG_LEAKED
from actors.kernel.swap import drain_unused_swap_cache
from actors.kernel.sysfs import counters
from actors.kernel.tree import RB_BLACK, RB_RED
from shared_mem.arena import Arena
from shared_mem.layout import (
    NODE_CHAIN,
    NODE_DUP,
    NODE_REGULAR,
    PG_FREE,
    PG_KSM,
    PG_RESERVED,
    PG_SWAPCACHE,
    PTE_DIRTY,
    PTE_PFN_MASK,
    PTE_PRESENT,
    PTE_SPECIAL,
    PTE_SWAP,
    PTE_WRITE,
    SEQNR_MASK,
    STABLE_FLAG,
    UNSTABLE_FLAG,
)

# The title of the per-mm ksm_zero_pages check (docs/bugs/zero-pages-fork.md).
ZERO_PAGES_MISMATCH = "ksm: ksm_zero_pages mismatch"

def _rep(title: str, lines: list[str], data: dict[str, Any]) -> dict:
    return {"kind": "invariant", "title": title, "text": "\n".join([title, *lines]) + "\n", "data": data}


def check_invariants(k: Kernel) -> list[dict]:
    km = k.km
    out: list[dict] = []
    # -- ptes of every live mm -------------------------------------------------------------------
    maps: Counter = Counter()
    swaprefs: Counter = Counter()
    kzero_by_mm: dict[int, int] = {}
    rss_by_mm: dict[int, int] = {}
    writable: set[int] = set()
    for mi in km.mm.live_indices():
        mi = int(mi)
        kz = rss = 0
        for pgi in np.flatnonzero(km.pgd[mi]):
            pt = int(km.pgd[mi, pgi])
            if not km.ptable.valid(pt):
                out.append(_rep("BUG: KASAN: use-after-free: pgd points to a freed page table",
                                [f"mm {mi} pgd[{int(pgi)}] = {pt:#x}"], {"mm": mi}))
                continue
            ptes = km.ptable.pte[km.ptable.idx(pt, "check_invariants")]
            for pte in ptes[ptes != 0]:
                pte = int(pte)
                if pte & PTE_PRESENT:
                    if pte & PTE_SPECIAL:
                        kz += (pte & PTE_DIRTY) != 0
                        continue
                    pfn = pte & PTE_PFN_MASK
                    maps[pfn] += 1
                    rss += 1
                    if pte & PTE_WRITE:
                        writable.add(pfn)
                elif pte & PTE_SWAP:
                    swaprefs[pte & PTE_PFN_MASK] += 1
        kzero_by_mm[mi] = kz
        rss_by_mm[mi] = rss
        if int(km.mm.rss_anon[mi]) != rss:
            out.append(_rep("BUG: Bad rss-counter state", [f"mm {mi}: rss_anon {int(km.mm.rss_anon[mi])}, ptes {rss}"],
                            {"mm": mi, "rss": int(km.mm.rss_anon[mi]), "ptes": rss}))
        if int(km.mm.ksm_zero_pages[mi]) != kz:
            out.append(_rep(ZERO_PAGES_MISMATCH, [f"mm {mi}: counter {int(km.mm.ksm_zero_pages[mi])}, ptes {kz}"],
                            {"mm": mi}))

    # -- struct page conservation ----------------------------------------------------------------
    flags = km.page["flags"]
    bad = []
    dbg = km.page["dbg"]
    for pfn in range(1, km.geo.nr_frames):
        if int(dbg[pfn]) & PAGE_DBG_LEAKED:
            continue    # reported as a Bad page state already, and kept off the free lists
        f = int(flags[pfn])
        ref, mapc = int(km.page["refcount"][pfn]), int(km.page["mapcount"][pfn])
        if f & PG_FREE:
            if maps[pfn]:
                bad.append(f"pfn {pfn}: free frame still mapped by {maps[pfn]} pte(s) (Bad page map)")
            continue
        if f & PG_RESERVED:
            continue
        want_ref = mapc + (1 if f & PG_SWAPCACHE else 0)
        if mapc != maps[pfn] or ref != want_ref:
            bad.append(f"pfn {pfn}: flags {f:#x} refcount {ref} mapcount {mapc}, mapped by {maps[pfn]} pte(s)")
        if ref == 0:
            bad.append(f"pfn {pfn}: leaked (refcount 0, not free)")
    if bad:
        out.append(_rep("BUG: Bad page state", bad[:32], {"count": len(bad)}))

    # -- KSM objects and counters ------------------------------------------------------------------
    sn, ri = km.stable_node, km.rmap_item
    c = counters(k)
    shared = sharing = chains = dups = 0
    node_lines = []
    for ni in sn.live_indices():
        ni = int(ni)
        role = int(sn.role[ni])
        if role == NODE_CHAIN:
            chains += 1
            continue
        if role == NODE_DUP:
            dups += 1
        h = sn.handle_of(ni)
        items = 0
        item = int(sn.hlist[ni])
        while item:
            items += 1
            item = int(ri.hnext[ri.idx(item, "check_invariants")])
        if items != int(sn.rmap_hlist_len[ni]):
            node_lines.append(f"stable node {ni}: rmap_hlist_len {int(sn.rmap_hlist_len[ni])}, items {items}")
        if items:
            shared += 1
            sharing += items - 1
        pfn = int(sn.kpfn[ni])
        alive = flags[pfn] & PG_KSM and int(km.page["mapping"][pfn]) == h
        if alive and pfn in writable:
            node_lines.append(f"stable node {ni}: KSM page {pfn} is mapped writable")
        if role not in (NODE_REGULAR, NODE_DUP):
            node_lines.append(f"stable node {ni}: unexpected role {role}")
    expect = {"pages_shared": shared, "pages_sharing": sharing, "stable_node_chains": chains,
              "stable_node_dups": dups}
    mism = [f"{n}: counter {c[n]}, objects {v}" for n, v in expect.items() if c[n] != v]
    live_items = ri.nr_live()
    if int(k.ksm["rmap_items"]) != live_items:
        mism.append(f"rmap_items: counter {int(k.ksm['rmap_items'])}, objects {live_items}")
    unstable = sum(1 for i in ri.live_indices() if ri.address[int(i)] & UNSTABLE_FLAG)
    if c["pages_unshared"] != unstable:
        mism.append(f"pages_unshared: counter {c['pages_unshared']}, unstable items {unstable}")
    stable_items = sum(1 for i in ri.live_indices() if ri.address[int(i)] & STABLE_FLAG)
    if stable_items != shared + sharing:
        mism.append(f"stable rmap_items {stable_items} != shared + sharing {shared + sharing}")
    if int(k.ksm["rmap_items"]) < c["pages_shared"] + c["pages_sharing"] + c["pages_unshared"]:
        mism.append("rmap_items < pages_shared + pages_sharing + pages_unshared")
    live_mms = [int(i) for i in km.mm.live_indices()]
    merging = sum(int(km.mm.ksm_merging_pages[i]) for i in live_mms)
    if merging != c["pages_shared"] + c["pages_sharing"]:
        mism.append(f"sum of ksm_merging_pages {merging} != pages_shared + pages_sharing")
    zero_ptes = sum(kzero_by_mm.values())
    if c["ksm_zero_pages"] != zero_ptes:
        mism.append(f"ksm_zero_pages: counter {c['ksm_zero_pages']}, KSM zero ptes {zero_ptes}")
    if mism or node_lines:
        out.append(_rep("ksm: counter mismatch", mism + node_lines, {"counters": c, "objects": expect}))

    # -- the trees: red-black, and the unstable tree holding just this pass's items ------------------
    lines = []
    # With the cursor at the list head a pass has ended and the unstable trees are the
    # last pass's, left to be reset when the next begins: in mm/ksm.c nothing walks them
    # any more, and their items may be freed, so there is nothing to hold them to.
    mid_pass = k.ks.scan_slot != slots.head(k)
    for nid in range(km.geo.nr_nodes):
        lines += rbtree_problems(sn, int(k.ksm["root_stable"][nid]), f"stable tree {nid}")
        root = int(k.ksm["root_unstable"][nid])
        if not mid_pass:
            continue
        lines += rbtree_problems(ri, root, f"unstable tree {nid}")
        stamp_now = UNSTABLE_FLAG | (int(k.ksm["seqnr"]) & SEQNR_MASK)
        if not root:
            live = ri.live_indices()
            stray = int((((ri.address[live] & (SEQNR_MASK | UNSTABLE_FLAG | STABLE_FLAG)) == stamp_now)
                         & (ri.nid[live] == nid)).sum())
            if stray:
                lines.append(f"unstable tree {nid} is empty, but {stray} items are flagged in it this pass")
        elif ri.valid(root):
            # Between passes the tree still holds the last pass's items until the next
            # pass resets the root: whichever pass its root is of, it holds all of that
            # pass's items of this node and nothing else.
            stamp = int(ri.address[ri.idx(root, "check_invariants")]) & (SEQNR_MASK | UNSTABLE_FLAG | STABLE_FLAG)
            live = ri.live_indices()
            ours = live[((ri.address[live] & (SEQNR_MASK | UNSTABLE_FLAG | STABLE_FLAG)) == stamp)
                        & (ri.nid[live] == nid)]
            nodes = tree_nodes(ri, root)
            if stamp & UNSTABLE_FLAG == 0 or stamp & STABLE_FLAG:
                lines.append(f"unstable tree {nid}: its root is not an unstable item")
            elif set(nodes) != {ri.handle_of(int(i)) for i in ours}:
                lines.append(f"unstable tree {nid}: {len(nodes)} nodes, but {len(ours)} items of its pass on "
                             "this node: an item is flagged unstable outside the tree, or in it unflagged")
    if lines:
        out.append(_rep("BUG: rbtree corrupted", lines[:32], {}))

    # -- mm lifetimes and slots ----------------------------------------------------------------------
    lines = []
    slot_of: dict[int, int] = {}
    for s in slots.slots(k):
        si = km.mm_slot.idx(s, "check_invariants")
        mm = int(km.mm_slot.mm[si])
        if not km.mm.valid(mm):
            lines.append(f"mm_slot {si} points to a freed mm {mm:#x}")
            continue
        smi = km.mm.idx(mm, "check_invariants")
        slot_of[smi] = si
        if int(km.mm.ksm_slot[smi]) != s:
            lines.append(f"mm_slot {si}: its mm does not point back")
    if km.mm_slot.nr_live() != len(slots.slots(k)) + 1:
        lines.append(f"{km.mm_slot.nr_live() - 1} mm_slots allocated, {len(slots.slots(k))} on the list (leak)")
    for mi in live_mms:
        users, count = int(km.mm.users[mi]), int(km.mm.count[mi])
        oom = int(km.mm.oom_refs[mi])
        need = (1 if users > 0 else 0) + (1 if mi in slot_of else 0) + oom
        if count < need:
            lines.append(f"mm {mi}: mm_count {count} < references {need} (users {users})")
        if users == 0 and count > need:
            lines.append(f"mm {mi}: exited, mm_count {count} but only {need} holder(s) "
                         f"(slot {mi in slot_of}, oom {oom}): an mmdrop is missing")
    if lines:
        out.append(_rep("BUG: mm lifetime", lines, {}))

    # -- swap ------------------------------------------------------------------------------------------
    if km.swap is not None:
        lines = []
        for slot in np.flatnonzero(km.swap_map | km.swap_cache):
            slot = int(slot)
            want = swaprefs[slot] + (1 if km.swap_cache[slot] else 0)
            if int(km.swap_map[slot]) & ((1 << 40) - 1) != want:
                lines.append(f"swap slot {slot}: swap_map {int(km.swap_map[slot])}, references {want}")
        if lines:
            out.append(_rep("BUG: swap accounting", lines[:32], {}))
    return out


def tree_nodes(a: Arena, root: int) -> list[int]:
    """The handles of a tree's nodes, in order (a cycle or a stale link ends the walk)."""
    out: list[int] = []
    stack: list[int] = []
    cur = root
    while (stack or cur) and len(out) <= a.capacity:
        while cur and a.valid(cur) and len(stack) <= a.capacity:
            stack.append(cur)
            cur = int(a.left[a.idx(cur, "tree_nodes")])
        if not stack:
            break
        cur = stack.pop()
        out.append(cur)
        cur = int(a.right[a.idx(cur, "tree_nodes")])
    return out


def rbtree_problems(a: Arena, root: int, name: str) -> list[str]:
    """What breaks the red-black properties of the tree at root (lib/rbtree.c's): the
    root black and parentless, every child pointing back at its parent, no red node
    with a red child, the same number of black nodes on every path, no freed node, no
    node twice."""
    if not root:
        return []
    if not a.valid(root):
        return [f"{name}: the root is a freed record {root:#x}"]
    ri = a.idx(root, "rbtree_problems")
    out = []
    if int(a.parent[ri]) != 0:
        out.append(f"{name}: the root has a parent")
    if int(a.rb_color[ri]) != RB_BLACK:
        out.append(f"{name}: the root is red")
    heights: dict[int, int] = {}
    seen: set[int] = set()
    stack: list[tuple[int, bool]] = [(root, False)]
    while stack and not out:
        h, done = stack.pop()
        i = a.idx(h, "rbtree_problems")
        kids = (int(a.left[i]), int(a.right[i]))
        if not done:
            if h in seen:
                out.append(f"{name}: node {h:#x} is reached twice")
                break
            seen.add(h)
            stack.append((h, True))
            for c in kids:
                if not c:
                    continue
                if not a.valid(c):
                    out.append(f"{name}: node {h:#x} links a freed record {c:#x}")
                elif int(a.parent[a.idx(c, "rbtree_problems")]) != h:
                    out.append(f"{name}: node {h:#x}: its child {c:#x} does not point back")
                elif int(a.rb_color[i]) == RB_RED and int(a.rb_color[a.idx(c, "rbtree_problems")]) == RB_RED:
                    out.append(f"{name}: red node {h:#x} has a red child {c:#x}")
                else:
                    stack.append((c, False))
            continue
        lh, rh = (heights.pop(c) if c else 1 for c in kids)
        if lh != rh:
            out.append(f"{name}: node {h:#x}: black heights {lh} and {rh} below it")
        heights[h] = lh + (int(a.rb_color[i]) == RB_BLACK)
    return out


def leaks_after_teardown(k: Kernel) -> list[dict]:
    """After every task exited and ksmd reaped: nothing of any mm may remain."""
    km = k.km
    lines = []
    if km.mm.nr_live():
        lines.append(f"{km.mm.nr_live()} mm_struct(s) never freed: {[int(i) for i in km.mm.live_indices()]}")
    for name in ("vma", "anon_vma", "ptable", "rmap_item"):
        if km.arenas[name].nr_live():
            lines.append(f"{km.arenas[name].nr_live()} {name} object(s) leaked")
    if km.mm_slot.nr_live() != 1:
        lines.append(f"{km.mm_slot.nr_live() - 1} mm_slot(s) leaked")
    # Clean swap-cache pages nobody maps or references through a swap pte are reclaimable,
    # not leaked: the kernel's next reclaim pass frees them (an unmap whose try_to_free_swap
    # lost the page-lock trylock to kswapd leaves one). Drain them as that pass would.
    drain_unused_swap_cache(k)
    # Frames a Bad page state report kept off the free lists were reported already.
    used = km.geo.nr_frames - 1 - k.alloc.nr_free() - int(((km.page["dbg"] & PAGE_DBG_LEAKED) != 0).sum())
    if used:
        lines.append(f"{used} page frame(s) not returned to the free lists")
    return [_rep("BUG: leak after teardown", lines, {})] if lines else []
