# The ordered trees of KSM: red-black trees over records in shared memory, lib/rbtree.c.
#
# mm/ksm.c keeps its stable and unstable trees as rbtrees ordered by page contents
# (memcmp). The order and the walk stay with the callers (stable_tree.py,
# unstable_tree.py): they compare page contents at every step and hang a new node
# under the last node passed (rb_link_node), so a page that changed under the
# unstable tree can send a search down the wrong branch, exactly as in the kernel.
# This module is the balancing, and it is a line-by-line port of lib/rbtree.c
# (with include/linux/rbtree_augmented.h for the erase), not some other balanced tree:
#
#   link_node     rb_link_node() + rb_insert_color(), i.e. __rb_insert(): the
#                 red-parent loop with its uncle-red colour flip (case 1), the rotate
#                 at parent (case 2) and the rotate at grandparent (case 3), in the
#                 kernel's order, on both sides;
#   erase         rb_erase(), i.e. __rb_erase_augmented() with the dummy callbacks:
#                 a node with at most one child is spliced out, a node with two is
#                 replaced by its successor exactly as the kernel moves it (its right
#                 child when that has no left child, else the leftmost node under the
#                 right child), then ____rb_erase_color() from the node the kernel
#                 names when a black node left a path;
#   replace_node  rb_replace_node(): new takes old's links and colour.
#
# Why exactly: KSM prunes a stale stable node only when a search passes it (and a
# chain only when a search reaches it), and the unstable tree's wrong turns depend on
# which nodes a search meets, so the tree's shape shows in the counters. The same
# inserts and erases in the same order give the kernel's shape here, and every search
# visits the nodes the kernel's would. Balancing looks at colours and links only, never
# at page contents: a "corrupted" unstable tree (contents changed after insertion) is
# still a valid rbtree, just not sorted, as in the kernel.
#
# The record's struct rb_node is four fields: left, right, parent and rb_color (the
# kernel packs parent and colour into __rb_parent_color; RB_RED 0, RB_BLACK 1 as
# there). rb_parent() is the parent field, rb_set_parent() leaves the colour alone,
# rb_set_parent_color() sets both. Every dereference goes through Arena.idx(h, site).
# Two things the kernel does not do: erase and replace_node clear the links of the
# record that left the tree (the kernel leaves them stale; nothing reads them), and
# __rb_change_child reports a parent that does not point at the child as a BUG
# instead of overwriting its right link (the tree was corrupted by the model itself).
from __future__ import annotations

from shared_mem.arena import NULL, Arena

RB_RED = 0
RB_BLACK = 1

# The link journal (Arena.journal, process-local, None when nobody listens): every node
# whose left or right link an insert, erase or replace writes, and JOURNAL_ROOT when the
# root changes. An optimistic walk (tree_walk.py) arms it after its descent: a path none
# of whose nodes is in the journal is still the path.
JOURNAL_ROOT = -1


def _changed(a: Arena, *nodes: int) -> None:
    j = a.journal
    if j is not None:
        j.update(nodes)


def relinked(a: Arena) -> None:
    """A whole tree was linked anew (unstable_build.py): no path survives."""
    _changed(a, JOURNAL_ROOT)


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


# -- the rbtree.h / rbtree_augmented.h helpers ------------------------------------------------
def _is_black(a: Arena, h: int, site: str) -> bool:
    return int(a.rb_color[a.idx(h, site)]) == RB_BLACK


def _set_parent(a: Arena, h: int, p: int, site: str) -> None:
    """rb_set_parent(): the parent, colour kept."""
    a.parent[a.idx(h, site)] = p


def _set_parent_color(a: Arena, h: int, p: int, color: int, site: str) -> None:
    """rb_set_parent_color()."""
    i = a.idx(h, site)
    a.parent[i] = p
    a.rb_color[i] = color


def _change_child(a: Arena, root: RootRef, old: int, new: int, parent: int, site: str) -> None:
    """__rb_change_child()."""
    if parent:
        pi = a.idx(parent, site)
        if int(a.left[pi]) == old:
            a.left[pi] = new
        elif int(a.right[pi]) == old:
            a.right[pi] = new
        else:
            raise RuntimeError("BUG: tree corrupted: child not found under parent")
        _changed(a, parent)
    else:
        root.set(new)
        _changed(a, JOURNAL_ROOT)


def _rotate_set_parents(a: Arena, root: RootRef, old: int, new: int, color: int, site: str) -> None:
    """__rb_rotate_set_parents(): old's parent and colour go to new; old gets new and color."""
    oi = a.idx(old, site)
    ni = a.idx(new, site)
    parent = int(a.parent[oi])
    a.parent[ni] = parent
    a.rb_color[ni] = a.rb_color[oi]
    a.parent[oi] = new
    a.rb_color[oi] = color
    _change_child(a, root, old, new, parent, site)


# -- insert -----------------------------------------------------------------------------------
def link_node(a: Arena, root: RootRef, parent: int, left: bool, node: int) -> None:
    """rb_link_node(node, parent, link) + rb_insert_color(node, root)."""
    ni = a.idx(node, "rb_link_node")
    a.parent[ni] = parent           # __rb_parent_color = parent: red
    a.rb_color[ni] = RB_RED
    a.left[ni] = NULL
    a.right[ni] = NULL
    if parent:
        pi = a.idx(parent, "rb_link_node")
        if left:
            a.left[pi] = node
        else:
            a.right[pi] = node
    else:
        root.set(node)
    _changed(a, parent or JOURNAL_ROOT)
    _insert_color(a, root, node)


def _insert_color(a: Arena, root: RootRef, node: int) -> None:
    """__rb_insert() without augmentation. Loop invariant: node is red."""
    s = "rb_insert_color"
    parent = int(a.parent[a.idx(node, s)])      # rb_red_parent(node)
    while True:
        if not parent:
            # node is the root: the first node, or case 1 recursed up to it.
            _set_parent_color(a, node, NULL, RB_BLACK, s)
            break
        pi = a.idx(parent, s)
        if int(a.rb_color[pi]) == RB_BLACK:
            break
        gparent = int(a.parent[pi])             # rb_red_parent(parent)
        gi = a.idx(gparent, s)
        tmp = int(a.right[gi])
        if parent != tmp:                       # parent == gparent->rb_left
            if tmp and not _is_black(a, tmp, s):
                # Case 1 - node's uncle is red (colour flips), then recurse at gparent.
                _set_parent_color(a, tmp, gparent, RB_BLACK, s)
                _set_parent_color(a, parent, gparent, RB_BLACK, s)
                node = gparent
                parent = int(a.parent[gi])
                _set_parent_color(a, node, parent, RB_RED, s)
                continue
            tmp = int(a.right[pi])
            if node == tmp:
                # Case 2 - uncle black, node is the right child: left rotate at parent.
                ni = a.idx(node, s)
                tmp = int(a.left[ni])
                a.right[pi] = tmp
                a.left[ni] = parent
                _changed(a, node, parent)
                if tmp:
                    _set_parent_color(a, tmp, parent, RB_BLACK, s)
                _set_parent_color(a, parent, node, RB_RED, s)
                parent = node
                pi = a.idx(parent, s)
                tmp = int(a.right[pi])
            # Case 3 - uncle black, node is the left child: right rotate at gparent.
            a.left[gi] = tmp                    # == parent->rb_right
            a.right[pi] = gparent
            _changed(a, gparent, parent)
            if tmp:
                _set_parent_color(a, tmp, gparent, RB_BLACK, s)
            _rotate_set_parents(a, root, gparent, parent, RB_RED, s)
            break
        else:
            tmp = int(a.left[gi])
            if tmp and not _is_black(a, tmp, s):
                # Case 1 - colour flips.
                _set_parent_color(a, tmp, gparent, RB_BLACK, s)
                _set_parent_color(a, parent, gparent, RB_BLACK, s)
                node = gparent
                parent = int(a.parent[gi])
                _set_parent_color(a, node, parent, RB_RED, s)
                continue
            tmp = int(a.left[pi])
            if node == tmp:
                # Case 2 - right rotate at parent.
                ni = a.idx(node, s)
                tmp = int(a.right[ni])
                a.left[pi] = tmp
                a.right[ni] = parent
                _changed(a, node, parent)
                if tmp:
                    _set_parent_color(a, tmp, parent, RB_BLACK, s)
                _set_parent_color(a, parent, node, RB_RED, s)
                parent = node
                pi = a.idx(parent, s)
                tmp = int(a.left[pi])
            # Case 3 - left rotate at gparent.
            a.right[gi] = tmp                   # == parent->rb_left
            a.left[pi] = gparent
            _changed(a, gparent, parent)
            if tmp:
                _set_parent_color(a, tmp, gparent, RB_BLACK, s)
            _rotate_set_parents(a, root, gparent, parent, RB_RED, s)
            break


# -- erase ------------------------------------------------------------------------------------
def erase(a: Arena, root: RootRef, node: int) -> None:
    """rb_erase(): __rb_erase_augmented(), then ____rb_erase_color() if a path lost a black."""
    s = "rb_erase"
    ni = a.idx(node, s)
    child = int(a.right[ni])
    tmp = int(a.left[ni])
    pc_parent, pc_color = int(a.parent[ni]), int(a.rb_color[ni])   # node->__rb_parent_color
    if not tmp:
        # Case 1: at most one child (the right one). A lone child is red and node
        # black (4, 5): the child takes node's parent and colour, no rebalance.
        parent = pc_parent
        _change_child(a, root, node, child, parent, s)
        if child:
            _set_parent_color(a, child, pc_parent, pc_color, s)
            rebalance = NULL
        else:
            rebalance = parent if pc_color == RB_BLACK else NULL
    elif not child:
        # Still case 1, but the child is node->rb_left.
        _set_parent_color(a, tmp, pc_parent, pc_color, s)
        parent = pc_parent
        _change_child(a, root, node, tmp, parent, s)
        rebalance = NULL
    else:
        successor = child
        tmp = int(a.left[a.idx(child, s)])
        if not tmp:
            # Case 2: node's successor is its right child.
            parent = successor
            child2 = int(a.right[a.idx(successor, s)])
        else:
            # Case 3: node's successor is the leftmost node under its right child.
            while True:
                parent = successor
                successor = tmp
                tmp = int(a.left[a.idx(tmp, s)])
                if not tmp:
                    break
            si = a.idx(successor, s)
            child2 = int(a.right[si])
            a.left[a.idx(parent, s)] = child2
            a.right[si] = child
            _changed(a, parent, successor)
            _set_parent(a, child, successor, s)
        si = a.idx(successor, s)
        tmp = int(a.left[ni])
        a.left[si] = tmp
        _changed(a, successor)
        _set_parent(a, tmp, successor, s)
        _change_child(a, root, node, successor, pc_parent, s)
        if child2:
            _set_parent_color(a, child2, parent, RB_BLACK, s)
            rebalance = NULL
        else:
            rebalance = parent if int(a.rb_color[si]) == RB_BLACK else NULL
        a.parent[si] = pc_parent                # successor->__rb_parent_color = pc
        a.rb_color[si] = pc_color
    a.left[ni] = NULL
    a.right[ni] = NULL
    a.parent[ni] = NULL
    _changed(a, node)
    if rebalance:
        _erase_color(a, root, rebalance)


def _erase_color(a: Arena, root: RootRef, parent: int) -> None:
    """____rb_erase_color() without augmentation.

    Loop invariants: node is black (or NULL on the first iteration), node is not the
    root (parent is not NULL), and every leaf path through parent and node has one
    black node fewer than the other leaf paths.
    """
    s = "rb_erase_color"
    node = NULL
    while True:
        pi = a.idx(parent, s)
        sibling = int(a.right[pi])
        if node != sibling:                     # node == parent->rb_left
            if not _is_black(a, sibling, s):
                # Case 1 - left rotate at parent.
                tmp1 = int(a.left[a.idx(sibling, s)])
                a.right[pi] = tmp1
                a.left[a.idx(sibling, s)] = parent
                _changed(a, parent, sibling)
                _set_parent_color(a, tmp1, parent, RB_BLACK, s)
                _rotate_set_parents(a, root, parent, sibling, RB_RED, s)
                sibling = tmp1
            si = a.idx(sibling, s)
            tmp1 = int(a.right[si])
            if not tmp1 or _is_black(a, tmp1, s):
                tmp2 = int(a.left[si])
                if not tmp2 or _is_black(a, tmp2, s):
                    # Case 2 - sibling colour flip (p could be either colour here).
                    _set_parent_color(a, sibling, parent, RB_RED, s)
                    if not _is_black(a, parent, s):
                        a.rb_color[a.idx(parent, s)] = RB_BLACK   # rb_set_black()
                    else:
                        node = parent
                        parent = int(a.parent[a.idx(node, s)])
                        if parent:
                            continue
                    break
                # Case 3 - right rotate at sibling (p could be either colour here).
                t2 = a.idx(tmp2, s)
                tmp1 = int(a.right[t2])
                a.left[si] = tmp1
                a.right[t2] = sibling
                a.right[a.idx(parent, s)] = tmp2
                _changed(a, sibling, tmp2, parent)
                if tmp1:
                    _set_parent_color(a, tmp1, sibling, RB_BLACK, s)
                tmp1 = sibling
                sibling = tmp2
            # Case 4 - left rotate at parent + colour flips (p and sl could be either
            # colour here; after the rotation p is black, s has p's colour, sl keeps its own).
            si = a.idx(sibling, s)
            tmp2 = int(a.left[si])
            a.right[a.idx(parent, s)] = tmp2
            a.left[si] = parent
            _changed(a, parent, sibling)
            _set_parent_color(a, tmp1, sibling, RB_BLACK, s)
            if tmp2:
                _set_parent(a, tmp2, parent, s)
            _rotate_set_parents(a, root, parent, sibling, RB_BLACK, s)
            break
        else:
            sibling = int(a.left[pi])
            if not _is_black(a, sibling, s):
                # Case 1 - right rotate at parent.
                tmp1 = int(a.right[a.idx(sibling, s)])
                a.left[pi] = tmp1
                a.right[a.idx(sibling, s)] = parent
                _changed(a, parent, sibling)
                _set_parent_color(a, tmp1, parent, RB_BLACK, s)
                _rotate_set_parents(a, root, parent, sibling, RB_RED, s)
                sibling = tmp1
            si = a.idx(sibling, s)
            tmp1 = int(a.left[si])
            if not tmp1 or _is_black(a, tmp1, s):
                tmp2 = int(a.right[si])
                if not tmp2 or _is_black(a, tmp2, s):
                    # Case 2 - sibling colour flip.
                    _set_parent_color(a, sibling, parent, RB_RED, s)
                    if not _is_black(a, parent, s):
                        a.rb_color[a.idx(parent, s)] = RB_BLACK   # rb_set_black()
                    else:
                        node = parent
                        parent = int(a.parent[a.idx(node, s)])
                        if parent:
                            continue
                    break
                # Case 3 - left rotate at sibling.
                t2 = a.idx(tmp2, s)
                tmp1 = int(a.left[t2])
                a.right[si] = tmp1
                a.left[t2] = sibling
                a.left[a.idx(parent, s)] = tmp2
                _changed(a, sibling, tmp2, parent)
                if tmp1:
                    _set_parent_color(a, tmp1, sibling, RB_BLACK, s)
                tmp1 = sibling
                sibling = tmp2
            # Case 4 - right rotate at parent + colour flips.
            si = a.idx(sibling, s)
            tmp2 = int(a.right[si])
            a.left[a.idx(parent, s)] = tmp2
            a.right[si] = parent
            _changed(a, parent, sibling)
            _set_parent_color(a, tmp1, sibling, RB_BLACK, s)
            if tmp2:
                _set_parent(a, tmp2, parent, s)
            _rotate_set_parents(a, root, parent, sibling, RB_BLACK, s)
            break


# -- replace ----------------------------------------------------------------------------------
def replace_node(a: Arena, root: RootRef, old: int, new: int) -> None:
    """rb_replace_node(victim=old, new): new takes old's links and colour in the tree."""
    s = "rb_replace_node"
    _changed(a, old, new)
    oi = a.idx(old, s)
    ni = a.idx(new, s)
    parent = int(a.parent[oi])
    a.left[ni] = a.left[oi]                     # *new = *victim
    a.right[ni] = a.right[oi]
    a.parent[ni] = parent
    a.rb_color[ni] = a.rb_color[oi]
    left, right = int(a.left[oi]), int(a.right[oi])
    if left:
        _set_parent(a, left, new, s)
    if right:
        _set_parent(a, right, new, s)
    _change_child(a, root, old, new, parent, s)
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
