# The ordered trees of KSM: a treap over records in shared memory.
#
# mm/ksm.c keeps its stable and unstable trees as rbtrees ordered by page
# contents (memcmp). We keep the same order and the same walk (the caller compares
# page contents at every step, so a page that changed under the unstable tree can
# send a search down the wrong branch, exactly as in the kernel), but balance with
# treap priorities instead of red/black colours: like rbtree colours they do not
# depend on page contents, so a "corrupted" unstable tree stays balanced too.
# Priorities are a hash of the record handle, so a run is reproducible.
from __future__ import annotations

from shared_mem.arena import NULL, Arena

_MIX = 0x9E3779B97F4A7C15
_MASK = (1 << 63) - 1


def node_prio(h: int) -> int:
    x = (h * _MIX) & ((1 << 64) - 1)
    x ^= x >> 29
    return (x * 0xBF58476D1CE4E5B9) & _MASK


class RootRef:
    """Where a tree's root handle lives: element idx of an int64 array (e.g. root_stable[nid])."""

    __slots__ = ("arr", "i")

    def __init__(self, arr, i: int) -> None:
        self.arr = arr
        self.i = i

    def get(self) -> int:
        return int(self.arr[self.i])

    def set(self, h: int) -> None:
        self.arr[self.i] = h


def link_node(a: Arena, root: RootRef, parent: int, left: bool, node: int) -> None:
    """rb_link_node + rb_insert_color: hang node under parent, then restore heap order."""
    ni = a.idx(node, "rb_link_node")
    a.left[ni] = NULL
    a.right[ni] = NULL
    a.parent[ni] = parent
    a.prio[ni] = node_prio(node)
    if parent == NULL:
        root.set(node)
        return
    pi = a.idx(parent, "rb_link_node")
    if left:
        a.left[pi] = node
    else:
        a.right[pi] = node
    while True:
        p = int(a.parent[ni])
        if p == NULL:
            break
        pi = a.idx(p, "rb_insert_color")
        if a.prio[pi] >= a.prio[ni]:
            break
        _rotate_up(a, root, node)


def _replace_child(a: Arena, root: RootRef, parent: int, old: int, new: int) -> None:
    if parent == NULL:
        root.set(new)
        return
    pi = a.idx(parent, "rb_replace")
    if a.left[pi] == old:
        a.left[pi] = new
    elif a.right[pi] == old:
        a.right[pi] = new
    else:
        raise RuntimeError("BUG: tree corrupted: child not found under parent")


def _rotate_up(a: Arena, root: RootRef, x: int) -> None:
    xi = a.idx(x, "rotate")
    p = int(a.parent[xi])
    pi = a.idx(p, "rotate")
    g = int(a.parent[pi])
    if a.left[pi] == x:
        b = int(a.right[xi])
        a.left[pi] = b
        a.right[xi] = p
    else:
        b = int(a.left[xi])
        a.right[pi] = b
        a.left[xi] = p
    if b:
        a.parent[a.idx(b, "rotate")] = p
    a.parent[pi] = x
    a.parent[xi] = g
    _replace_child(a, root, g, p, x)


def erase(a: Arena, root: RootRef, node: int) -> None:
    """rb_erase(): rotate the node down to a leaf position, then unlink it."""
    ni = a.idx(node, "rb_erase")
    while a.left[ni] and a.right[ni]:
        li = a.idx(int(a.left[ni]), "rb_erase")
        ri = a.idx(int(a.right[ni]), "rb_erase")
        child = int(a.left[ni]) if a.prio[li] > a.prio[ri] else int(a.right[ni])
        _rotate_up(a, root, child)
    child = int(a.left[ni]) or int(a.right[ni])
    parent = int(a.parent[ni])
    if child:
        a.parent[a.idx(child, "rb_erase")] = parent
    _replace_child(a, root, parent, node, child)
    a.left[ni] = NULL
    a.right[ni] = NULL
    a.parent[ni] = NULL


def replace_node(a: Arena, root: RootRef, old: int, new: int) -> None:
    """rb_replace_node(): new takes old's place (links and priority) in the tree."""
    oi = a.idx(old, "rb_replace_node")
    ni = a.idx(new, "rb_replace_node")
    a.left[ni] = a.left[oi]
    a.right[ni] = a.right[oi]
    a.parent[ni] = a.parent[oi]
    a.prio[ni] = a.prio[oi]
    for c in (int(a.left[oi]), int(a.right[oi])):
        if c:
            a.parent[a.idx(c, "rb_replace_node")] = new
    _replace_child(a, root, int(a.parent[oi]), old, new)
    a.left[oi] = NULL
    a.right[oi] = NULL
    a.parent[oi] = NULL


def walk(a: Arena, root: RootRef) -> list[int]:
    """In-order handles (for checks and reports, not for hot paths)."""
    out: list[int] = []
    stack: list[int] = []
    cur = root.get()
    while stack or cur:
        while cur:
            stack.append(cur)
            cur = int(a.left[a.idx(cur, "tree_walk")])
        cur = stack.pop()
        out.append(cur)
        cur = int(a.right[a.idx(cur, "tree_walk")])
    return out
