# Tree walks on arrays: the stable and unstable tree descents of a run of pages at once.
#
# In the exact and batch scans every page that is a merge candidate walks the stable tree
# and then the unstable tree node by node, and every node costs a ksm_get_folio() or a
# get_mergeable_page(): locks, a pte lookup and a page reference, about 10 µs of Python,
# against the kernel's tenth of a microsecond. A steady pass over unique pages is nothing
# but such walks. `--scan vector` descends both trees for a whole run of candidates
# together, one tree level per step, with every node's page looked up and compared on
# arrays (descend()). What it reads it reads as an observer, the way a seqlock reader
# does: a node's page comes from its pte (unstable) or its kpfn (stable) with the records'
# generations checked around the read and no lock or reference taken, so a node whose
# page is gone, or that the kernel's walk would act on (a stale stable node, a chain, a
# page the candidate itself maps), stops that candidate's descent and sends it down the
# exact path.
#
# What a descent decides is a miss (the candidate is in neither tree, and the unstable
# tree gets it under the node where its walk ended) or the node found identical, which
# cmp_and_merge_page() is given as a hint and checks with the kernel's locks; anything
# else (a stopped walk) is cmp_and_merge_page()'s from scratch. Between the descent and a
# candidate's turn the run's earlier pages change the trees: inserts, rotations, merges
# that erase. tree.py's link journal, armed by descend(), names every node whose links
# were written since; resume() trusts a path with no node in it, and otherwise checks
# every link the descent followed, and the walk goes on from the first link that changed
# (or from the root), page by page, so the tree the candidate joins is the tree the
# kernel's walk would have built. The one thing not re-read is the contents of the
# nodes the descent passed: a tree page a task writes while the run is under way is seen
# by the next run, not by the rest of this one (docs/DECISIONS.md).
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from actors.kernel.context import Kernel
from actors.kernel.tree import JOURNAL_ROOT
from shared_mem.arena import NULL, Arena
from shared_mem.layout import (
    PAGE_MASK,
    PAGE_SHIFT,
    PG_ANON,
    PG_KSM,
    PTE_PFN_MASK,
    PTE_PRESENT,
    PTE_SPECIAL,
    PTRS_PER_PTE,
    STABLE_NODE_CHAIN,
    VM_MERGEABLE,
)


class Descent:
    """Where the descents of a run's candidates went, one column per candidate.

    path[d, j] is the d-th node candidate j passed, dirs[d, j] whether it turned left
    there, depth[j] how many nodes it passed, stop[j] whether its walk met a node the
    arrays do not decide. root is the tree's root when the descent started."""

    __slots__ = ("_paths", "depth", "dirs", "found", "path", "root", "stop")

    def __init__(
        self, path: np.ndarray, dirs: np.ndarray, depth: np.ndarray, stop: np.ndarray, found: np.ndarray, root: int
    ) -> None:
        self.path, self.dirs, self.depth, self.stop, self.root = path, dirs, depth, stop, root
        self.found = found  # the node whose page was identical, where that stopped the walk
        self._paths: dict[int, list[int]] = {}

    def path_of(self, j: int) -> list[int]:
        """Candidate j's path as a Python list, for resume()'s check against the link
        journal. Made when first asked for: most candidates of a run (those held back,
        whose walks the run's end takes as a whole) never are."""
        p = self._paths.get(j)
        if p is None:
            p = self._paths[j] = self.path[: int(self.depth[j]), j].tolist()
        return p


def descend(k: Kernel, a: Arena, root: int, pfns: np.ndarray, pages_of: Callable[[np.ndarray], np.ndarray]) -> Descent:
    """Walk every candidate page pfns[j] down the tree at root, all of them a level at a
    time. pages_of(nodes) gives each node's page, or -1 for a node the walk must not
    pass on arrays. Arms the arena's link journal: the tree's changes from now on are
    what resume() checks the paths against (the caller disarms it, a.journal = None)."""
    a.journal = set()
    c = len(pfns)
    node = np.full(c, root, dtype=np.int64)
    depth = np.zeros(c, dtype=np.int64)
    stop = np.zeros(c, dtype=bool)
    found = np.zeros(c, dtype=np.int64)
    levels: list[np.ndarray] = []
    turns: list[np.ndarray] = []
    act = np.flatnonzero(node != NULL)
    while len(act):
        nh = node[act]
        tp = pages_of(nh)
        readable = tp >= 0
        ret = np.zeros(len(act), dtype=np.int8)
        ret[readable] = k.cmp.memcmp_batch(pfns[act[readable]], tp[readable])
        bad = ~readable | (tp == pfns[act]) | (ret == 0)
        stop[act[bad]] = True
        same = readable & (ret == 0) & (tp != pfns[act])
        found[act[same]] = nh[same]
        go = act[~bad]
        left = ret[~bad] < 0
        level = np.full(c, NULL, dtype=np.int64)
        level[go] = nh[~bad]
        turn = np.zeros(c, dtype=bool)
        turn[go] = left
        levels.append(level)
        turns.append(turn)
        depth[go] += 1
        ii = a.idx_many(nh[~bad], "tree_walk.descend")
        nxt = np.where(left, a.left[ii], a.right[ii])
        node[go] = nxt
        act = go[nxt != NULL]
    path = np.array(levels, dtype=np.int64).reshape(len(levels), c)
    dirs = np.array(turns, dtype=bool).reshape(len(turns), c)
    return Descent(path, dirs, depth, stop, found, root)


def _path_unchanged(a: Arena, path: list[int]) -> bool:
    """No link of the path (nor the root) was written since the descent: the journal
    has none of its nodes."""
    journal = a.journal
    return journal is not None and JOURNAL_ROOT not in journal and journal.isdisjoint(path)


def resume(d: Descent, a: Arena, root_now: int, j: int) -> tuple[int, int, bool]:
    """(node, parent, left): where candidate j's walk stands in the tree as it is now.

    Every link the descent followed is checked; the walk stands at the first one that
    changed (node is what the link holds now), or past the last (node NULL: the insert
    goes under parent). A changed root starts the walk over. A path the link journal
    has no node of is still the path, and needs no look at the tree at all."""
    n = int(d.depth[j])
    if n and _path_unchanged(a, d.path_of(j)):
        return NULL, d.path_of(j)[-1], bool(d.dirs[n - 1, j])
    if root_now != d.root or n == 0:
        return root_now, NULL, False
    nodes = d.path[:n, j]
    dirs = d.dirs[:n, j]
    if not a.valid_many(nodes).all():  # a node of the path was freed since (a stale stable node)
        return root_now, NULL, False
    ii = a.idx_many(nodes, "tree_walk.resume")
    now = np.where(dirs, a.left[ii], a.right[ii])
    want = np.empty(n, dtype=np.int64)
    want[:-1] = nodes[1:]
    want[-1] = NULL
    changed = np.flatnonzero(now != want)
    q = int(changed[0]) if len(changed) else n - 1
    return int(now[q]), int(nodes[q]), bool(dirs[q])


# -- the pages behind nodes, read as an observer ----------------------------------------------
def stable_pages(k: Kernel, nodes: np.ndarray) -> np.ndarray:
    """The KSM page of each regular stable node, or -1: a chain (its dups are
    stable_node_dup()'s to choose and prune), a freed node, or a stale one whose page no
    longer points back (ksm_get_folio() would prune it)."""
    sn = k.km.stable_node
    kpfn, ok = sn.peek_many(nodes, "kpfn")
    n, ok2 = sn.peek_many(nodes, "rmap_hlist_len")
    ok &= ok2 & (n != STABLE_NODE_CHAIN)
    kpfn = np.where(ok, kpfn, 0)
    ok &= ((k.page_flags[kpfn] & PG_KSM) != 0) & (k.page_mapping[kpfn] == nodes)
    ok &= k.km.page["refcount"][kpfn] > 0
    return np.where(ok, kpfn, -1)


class MergeableAreas:
    """The mergeable anonymous areas of the mms a run's descents meet: find_mergeable_vma()
    for many addresses at once, each mm's vma list read once per run (as an observer:
    a vma freed while it is read ends that mm's list, and its items stop the walk).

    The areas of all mms read so far are one sorted array of keys (mm index, first page)
    with the matching ends, so a level of a descent is one searchsorted."""

    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.known = np.zeros(k.km.mm.capacity, dtype=bool)
        self.keys = np.zeros(0, dtype=np.int64)
        self.ends = np.zeros(0, dtype=np.int64)
        self.by_mm: dict[int, list[tuple[int, int]]] = {}

    def _read(self, mm: int) -> list[tuple[int, int]]:
        km = self.k.km
        out: list[tuple[int, int]] = []
        users = km.mm.peek(mm, "users")
        v = km.mm.peek(mm, "mmap") if users else None
        while v:
            f, s, e, av, nxt = (km.vma.peek(v, x) for x in ("flags", "start", "end", "anon_vma", "next"))
            if None in (f, s, e, av, nxt):
                break
            if f & VM_MERGEABLE and av:
                out.append((s, e))
            v = nxt
        return out

    def _learn(self, mms: np.ndarray, mi: np.ndarray) -> None:
        new = np.flatnonzero(~self.known[mi])
        if not len(new):
            return
        for mm, i in dict(zip(mms[new].tolist(), mi[new].tolist())).items():
            self.known[i] = True
            self.by_mm[mm] = self._read(mm)
            keys = [(i << 40) | (s >> PAGE_SHIFT) for s, _ in self.by_mm[mm]]
            ends = [e for _, e in self.by_mm[mm]]
            self.keys = np.concatenate([self.keys, np.array(keys, dtype=np.int64)])
            self.ends = np.concatenate([self.ends, np.array(ends, dtype=np.int64)])
        order = np.argsort(self.keys, kind="stable")
        self.keys, self.ends = self.keys[order], self.ends[order]

    def covers(self, mms: np.ndarray, mi: np.ndarray, addrs: np.ndarray) -> np.ndarray:
        """Whether each address is in a mergeable anonymous vma of its mm (mi: mm index)."""
        self._learn(mms, mi)
        if not len(self.keys):
            return np.zeros(len(mms), dtype=bool)
        pos = np.searchsorted(self.keys, (mi << 40) | (addrs >> PAGE_SHIFT), side="right") - 1
        at = np.maximum(pos, 0)
        return (pos >= 0) & ((self.keys[at] >> 40) == mi) & (addrs < self.ends[at])

    def covers_one(self, mm: int, addr: int) -> bool:
        if mm not in self.by_mm:
            self.by_mm[mm] = self._read(mm)
        return any(s <= addr < e for s, e in self.by_mm[mm])


def unstable_pages(k: Kernel, items: np.ndarray, areas: MergeableAreas) -> np.ndarray:
    """get_mergeable_page() of many unstable-tree items, without its locks or references:
    the anon page each item's address maps in a mergeable vma, or -1."""
    km = k.km
    ri = km.rmap_item
    ii = ri.idx_many(items, "tree_walk.unstable_pages")
    mms = ri.mm[ii].astype(np.int64)
    addrs = ri.address[ii] & PAGE_MASK
    mi = km.mm.idx_many(mms, "tree_walk.unstable_pages")  # an item's mm_slot pins its mm
    ok = areas.covers(mms, mi, addrs)
    pgi = (addrs >> PAGE_SHIFT) // PTRS_PER_PTE
    ok &= pgi < km.pgd.shape[1]
    pt = np.where(ok, km.pgd[mi, np.where(ok, pgi, 0)], NULL)
    pte, live = km.ptable.peek_many(pt, "pte", (addrs >> PAGE_SHIFT) % PTRS_PER_PTE)
    ok &= live & ((pte & (PTE_PRESENT | PTE_SPECIAL)) == PTE_PRESENT)
    pfn = np.where(ok, pte & PTE_PFN_MASK, 0)
    ok &= (k.page_flags[pfn] & (PG_ANON | PG_KSM)) != 0
    return np.where(ok, pfn, -1)


def unstable_page(k: Kernel, item: int, areas: MergeableAreas) -> int:
    """unstable_pages() of one item, in plain Python (a page-by-page walk's step)."""
    km = k.km
    ri = km.rmap_item
    ii = ri.idx(item, "tree_walk.unstable_page")
    mm = int(ri.mm[ii])
    addr = int(ri.address[ii]) & PAGE_MASK
    if not areas.covers_one(mm, addr):
        return -1
    vpn = addr >> PAGE_SHIFT
    pgi = vpn // PTRS_PER_PTE
    if pgi >= km.pgd.shape[1]:
        return -1
    pt = int(km.pgd[km.mm.idx(mm, "tree_walk.unstable_page"), pgi])
    pte = km.ptable.peek(pt, "pte", vpn % PTRS_PER_PTE) if pt else None
    if pte is None or pte & (PTE_PRESENT | PTE_SPECIAL) != PTE_PRESENT:
        return -1
    pfn = pte & PTE_PFN_MASK
    return pfn if k.page_flags[pfn] & (PG_ANON | PG_KSM) else -1


def stable_page(k: Kernel, node: int) -> int:
    """stable_pages() of one node, in plain Python."""
    sn = k.km.stable_node
    kpfn = sn.peek(node, "kpfn")
    n = sn.peek(node, "rmap_hlist_len")
    if kpfn is None or n is None or n == STABLE_NODE_CHAIN:
        return -1
    if not k.page_flags[kpfn] & PG_KSM or k.page_mapping[kpfn] != node or k.km.page["refcount"][kpfn] <= 0:
        return -1
    return kpfn


def walk_on(
    k: Kernel, a: Arena, node: int, parent: int, left: bool, pfn: int, page_of: Callable[[int], int]
) -> tuple[int, int, bool] | None:
    """The rest of one walk, page by page, from where resume() stands: (NULL, parent,
    left) of the empty link it ends at, (node, NULL, False) for a node whose page is
    identical, or None where the arrays do not decide (as descend())."""
    while node:
        tp = page_of(node)
        if tp < 0 or tp == pfn:
            return None
        ret = k.cmp.memcmp(pfn, tp)
        if ret == 0:
            return node, NULL, False
        ni = a.idx(node, "tree_walk.walk_on")
        parent, left = node, ret < 0
        node = int(a.left[ni] if left else a.right[ni])
    return NULL, parent, left


def walk_end(
    k: Kernel, a: Arena, d: Descent, c: int, root_now: int, pfn: int, page_of: Callable[[int], int]
) -> tuple[int, int, bool] | None:
    """Where candidate c's walk ends in the tree as it is now, as walk_on() says it.
    A descent that stopped at an identical node still names it if no link on the way
    to it changed since (the link journal); if one did, the walk goes on from there, as
    a miss's does. Any other stop is undecided."""
    if d.stop[c]:
        f = int(d.found[c])
        if not f:
            return None
        if _path_unchanged(a, d.path_of(c)):
            return f, NULL, False
    # resume() stands past the path's last node: for a descent that found a node there,
    # at that node (its link is the last the path checks), which walk_on() meets again.
    node, parent, left = resume(d, a, root_now, c)
    return walk_on(k, a, node, parent, left, pfn, page_of)
