# KSM's trees are lib/rbtree.c red-black trees (actors/kernel/tree.py).
#
# The shared-memory tree must give the kernel's shape: the same inserts (at the same
# leaf positions) and erases in the same order must leave every node with the same
# left, right, parent and colour as the kernel's rb_insert_color() / rb_erase() would.
# The reference here is a second, independent port of lib/rbtree.c (__rb_insert,
# __rb_erase_augmented with the dummy callbacks, ____rb_erase_color, rb_replace_node)
# over plain Python objects, written from the C and sharing nothing with tree.py.
# Random sequences of inserts (positions found by walking with a key order, as KSM's
# searches walk with memcmp), erases and replaces drive both trees, and the shapes
# are compared after every operation, together with the red-black properties: the
# root is black, no red node has a red child, every root-to-leaf path has the same
# number of black nodes, and the in-order walk is sorted.
#
# Balancing never looks at the keys: when keys change under the tree (a page that
# changed after it went into the unstable tree), the trees stay identical valid
# rbtrees that are no longer sorted, and searches go the wrong way, as in the kernel.
# A few shapes are written down by hand from the algorithm (keys 1..10 inserted in
# ascending and in descending order, then erases), and the trees ksmd builds from pages
# merged in a known order are the reference's trees for that order.
from __future__ import annotations

import random

import numpy as np
import pytest

from actors.kernel import tree
from actors.kernel.rmap import unstable_root
from actors.kernel.stable_tree import stable_root
from shared_mem.arena import NULL

pytestmark = [pytest.mark.timeout(120)]

RED, BLACK = 0, 1


# -- the reference: lib/rbtree.c over plain objects ----------------------------------------------
class RbNode:
    __slots__ = ("color", "key", "label", "left", "parent", "right")

    def __init__(self, key: int, label: int) -> None:
        self.key = key
        self.label = label
        self.parent: RbNode | None = None
        self.color = RED
        self.left: RbNode | None = None
        self.right: RbNode | None = None


class RbRoot:
    def __init__(self) -> None:
        self.rb_node: RbNode | None = None


def _is_red(n: RbNode | None) -> bool:
    return n is not None and n.color == RED


def _change_child(old: RbNode, new: RbNode | None, parent: RbNode | None, root: RbRoot) -> None:
    if parent is not None:
        if parent.left is old:
            parent.left = new
        else:
            parent.right = new
    else:
        root.rb_node = new


def _rotate_set_parents(old: RbNode, new: RbNode, root: RbRoot, color: int) -> None:
    parent = old.parent
    new.parent, new.color = old.parent, old.color
    old.parent, old.color = new, color
    _change_child(old, new, parent, root)


def rb_link_node(node: RbNode, parent: RbNode | None, left: bool, root: RbRoot) -> None:
    node.parent, node.color = parent, RED
    node.left = node.right = None
    if parent is None:
        root.rb_node = node
    elif left:
        parent.left = node
    else:
        parent.right = node


def rb_insert_color(node: RbNode, root: RbRoot) -> None:
    parent = node.parent
    while True:
        if parent is None:
            node.parent, node.color = None, BLACK
            break
        if parent.color == BLACK:
            break
        gparent = parent.parent
        assert gparent is not None
        tmp = gparent.right
        if parent is not tmp:
            if _is_red(tmp):
                tmp.parent, tmp.color = gparent, BLACK
                parent.parent, parent.color = gparent, BLACK
                node = gparent
                parent = node.parent
                node.parent, node.color = parent, RED
                continue
            tmp = parent.right
            if node is tmp:
                tmp = node.left
                parent.right = tmp
                node.left = parent
                if tmp is not None:
                    tmp.parent, tmp.color = parent, BLACK
                parent.parent, parent.color = node, RED
                parent = node
                tmp = node.right
            gparent.left = tmp
            parent.right = gparent
            if tmp is not None:
                tmp.parent, tmp.color = gparent, BLACK
            _rotate_set_parents(gparent, parent, root, RED)
            break
        else:
            tmp = gparent.left
            if _is_red(tmp):
                tmp.parent, tmp.color = gparent, BLACK
                parent.parent, parent.color = gparent, BLACK
                node = gparent
                parent = node.parent
                node.parent, node.color = parent, RED
                continue
            tmp = parent.left
            if node is tmp:
                tmp = node.right
                parent.left = tmp
                node.right = parent
                if tmp is not None:
                    tmp.parent, tmp.color = parent, BLACK
                parent.parent, parent.color = node, RED
                parent = node
                tmp = node.left
            gparent.right = tmp
            parent.left = gparent
            if tmp is not None:
                tmp.parent, tmp.color = gparent, BLACK
            _rotate_set_parents(gparent, parent, root, RED)
            break


def _erase_color(parent: RbNode, root: RbRoot) -> None:
    node = None
    while True:
        sibling = parent.right
        if node is not sibling:
            if _is_red(sibling):
                tmp1 = sibling.left
                parent.right = tmp1
                sibling.left = parent
                tmp1.parent, tmp1.color = parent, BLACK
                _rotate_set_parents(parent, sibling, root, RED)
                sibling = tmp1
            tmp1 = sibling.right
            if not _is_red(tmp1):
                tmp2 = sibling.left
                if not _is_red(tmp2):
                    sibling.parent, sibling.color = parent, RED
                    if parent.color == RED:
                        parent.color = BLACK
                    else:
                        node = parent
                        parent = node.parent
                        if parent is not None:
                            continue
                    break
                tmp1 = tmp2.right
                sibling.left = tmp1
                tmp2.right = sibling
                parent.right = tmp2
                if tmp1 is not None:
                    tmp1.parent, tmp1.color = sibling, BLACK
                tmp1 = sibling
                sibling = tmp2
            tmp2 = sibling.left
            parent.right = tmp2
            sibling.left = parent
            tmp1.parent, tmp1.color = sibling, BLACK
            if tmp2 is not None:
                tmp2.parent = parent
            _rotate_set_parents(parent, sibling, root, BLACK)
            break
        else:
            sibling = parent.left
            if _is_red(sibling):
                tmp1 = sibling.right
                parent.left = tmp1
                sibling.right = parent
                tmp1.parent, tmp1.color = parent, BLACK
                _rotate_set_parents(parent, sibling, root, RED)
                sibling = tmp1
            tmp1 = sibling.left
            if not _is_red(tmp1):
                tmp2 = sibling.right
                if not _is_red(tmp2):
                    sibling.parent, sibling.color = parent, RED
                    if parent.color == RED:
                        parent.color = BLACK
                    else:
                        node = parent
                        parent = node.parent
                        if parent is not None:
                            continue
                    break
                tmp1 = tmp2.left
                sibling.right = tmp1
                tmp2.left = sibling
                parent.left = tmp2
                if tmp1 is not None:
                    tmp1.parent, tmp1.color = sibling, BLACK
                tmp1 = sibling
                sibling = tmp2
            tmp2 = sibling.right
            parent.left = tmp2
            sibling.right = parent
            tmp1.parent, tmp1.color = sibling, BLACK
            if tmp2 is not None:
                tmp2.parent = parent
            _rotate_set_parents(parent, sibling, root, BLACK)
            break


def rb_erase(node: RbNode, root: RbRoot) -> None:
    child, tmp = node.right, node.left
    if tmp is None:
        pc = (node.parent, node.color)
        parent = pc[0]
        _change_child(node, child, parent, root)
        if child is not None:
            child.parent, child.color = pc
            rebalance = None
        else:
            rebalance = parent if pc[1] == BLACK else None
    elif child is None:
        pc = (node.parent, node.color)
        tmp.parent, tmp.color = pc
        parent = pc[0]
        _change_child(node, tmp, parent, root)
        rebalance = None
    else:
        successor = child
        tmp = child.left
        if tmp is None:
            parent = successor
            child2 = successor.right
        else:
            while True:
                parent = successor
                successor = tmp
                tmp = tmp.left
                if tmp is None:
                    break
            child2 = successor.right
            parent.left = child2
            successor.right = child
            child.parent = successor
        tmp = node.left
        successor.left = tmp
        tmp.parent = successor
        pc = (node.parent, node.color)
        _change_child(node, successor, pc[0], root)
        if child2 is not None:
            child2.parent, child2.color = parent, BLACK
            rebalance = None
        else:
            rebalance = parent if successor.color == BLACK else None
        successor.parent, successor.color = pc
    if rebalance is not None:
        _erase_color(rebalance, root)


def rb_replace_node(victim: RbNode, new: RbNode, root: RbRoot) -> None:
    parent = victim.parent
    new.left, new.right, new.parent, new.color = victim.left, victim.right, victim.parent, victim.color
    if victim.left is not None:
        victim.left.parent = new
    if victim.right is not None:
        victim.right.parent = new
    _change_child(victim, new, parent, root)


# -- the two trees side by side ---------------------------------------------------------------
class Pair:
    """The shared-memory tree (records of one arena) and the reference, one label per node."""

    def __init__(self, a) -> None:
        self.a = a
        self.roots = np.zeros(1, dtype=np.int64)
        self.root = tree.RootRef(self.roots, 0)
        self.ref = RbRoot()
        self.key: dict[int, int] = {}          # handle -> key
        self.label: dict[int, int] = {}        # handle -> label
        self.node: dict[int, RbNode] = {}      # label -> reference node
        self.handle: dict[int, int] = {}       # label -> handle
        self.next_label = 1
        self.unsorted_seen = False

    # operations
    def insert(self, key: int) -> int:
        a = self.a
        h = a.alloc(site="test_rbtree")
        parent, left, cur = NULL, False, self.root.get()
        while cur:                             # the callers' search loop
            parent = cur
            ci = a.idx(cur, "test_search")
            left = key < self.key[cur]
            cur = int(a.left[ci]) if left else int(a.right[ci])
        rparent, rleft, rcur = None, False, self.ref.rb_node
        while rcur is not None:
            rparent = rcur
            rleft = key < rcur.key
            rcur = rcur.left if rleft else rcur.right
        label = self.next_label
        self.next_label += 1
        self.key[h], self.label[h], self.handle[label] = key, label, h
        tree.link_node(a, self.root, parent, left, h)
        n = self.node[label] = RbNode(key, label)
        rb_link_node(n, rparent, rleft, self.ref)
        rb_insert_color(n, self.ref)
        return label

    def erase(self, label: int) -> None:
        h = self.handle.pop(label)
        tree.erase(self.a, self.root, h)
        rb_erase(self.node.pop(label), self.ref)
        del self.key[h], self.label[h]
        self.a.free(h, site="test_rbtree")

    def replace(self, label: int) -> int:
        """rb_replace_node() with a fresh record; the reference moves the label over."""
        a = self.a
        old = self.handle[label]
        new = a.alloc(site="test_rbtree")
        tree.replace_node(a, self.root, old, new)
        self.key[new], self.label[new], self.handle[label] = self.key.pop(old), label, new
        del self.label[old]
        n = RbNode(self.node[label].key, label)
        rb_replace_node(self.node[label], n, self.ref)
        self.node[label] = n
        a.free(old, site="test_rbtree")
        return new

    def set_key(self, label: int, key: int) -> None:
        """The content of a node changes under the tree (only searches see it)."""
        self.key[self.handle[label]] = key
        self.node[label].key = key

    def clear(self) -> None:
        for label in list(self.handle):
            self.erase(label)
        assert self.root.get() == NULL and self.ref.rb_node is None

    # shapes
    def shape(self) -> dict:
        """label -> (left, right, parent, colour) of the shared tree, plus its root."""
        a, lab = self.a, self.label
        out: dict = {}
        root = self.root.get()
        out["root"] = lab[root] if root else 0
        todo = [root] if root else []
        while todo:
            h = todo.pop()
            i = a.idx(h, "test_shape")
            lt, rt, pt = int(a.left[i]), int(a.right[i]), int(a.parent[i])
            out[lab[h]] = (lab[lt] if lt else 0, lab[rt] if rt else 0, lab[pt] if pt else 0,
                           int(a.rb_color[i]))
            todo += [c for c in (lt, rt) if c]
        return out

    def ref_shape(self) -> dict:
        out: dict = {"root": self.ref.rb_node.label if self.ref.rb_node else 0}
        todo = [self.ref.rb_node] if self.ref.rb_node else []
        while todo:
            n = todo.pop()
            out[n.label] = (*(x.label if x else 0 for x in (n.left, n.right, n.parent)), n.color)
            todo += [c for c in (n.left, n.right) if c]
        return out

    def check(self, sorted_keys: bool = True) -> None:
        got = self.shape()
        assert len(got) - 1 == len(self.handle), "a live node is not reachable from the root"
        assert got == self.ref_shape()
        check_rbtree(self.a, self.root, self.key if sorted_keys else None)
        keys = [self.key[h] for h in tree.walk(self.a, self.root)]
        if keys != sorted(keys):
            self.unsorted_seen = True


def check_rbtree(a, root: tree.RootRef, key: dict | None = None) -> int:
    """The red-black properties of a shared-memory tree; returns its black height."""
    r = root.get()
    if not r:
        return 0
    ri = a.idx(r, "check_rbtree")
    assert int(a.parent[ri]) == NULL, "the root has a parent"
    assert int(a.rb_color[ri]) == tree.RB_BLACK, "the root is red"

    def black_height(h: int) -> int:
        if not h:
            return 1
        i = a.idx(h, "check_rbtree")
        color = int(a.rb_color[i])
        assert color in (tree.RB_RED, tree.RB_BLACK)
        hs = []
        for c in (int(a.left[i]), int(a.right[i])):
            if c:
                ci = a.idx(c, "check_rbtree")
                assert int(a.parent[ci]) == h, "a child does not point back at its parent"
                assert not (color == tree.RB_RED and int(a.rb_color[ci]) == tree.RB_RED), "red-red"
            hs.append(black_height(c))
        assert hs[0] == hs[1], "unequal black heights"
        return hs[0] + (color == tree.RB_BLACK)

    bh = black_height(r)
    if key is not None:
        keys = [key[h] for h in tree.walk(a, root)]
        assert keys == sorted(keys), "in-order walk not sorted"
    return bh


def fmt(a, root: tree.RootRef, key: dict) -> str:
    """'4B(2B(1B,3B),6r(.,7B))': key and colour, children in parentheses, '.' for none."""
    def f(h: int) -> str:
        if not h:
            return "."
        i = a.idx(h, "test_fmt")
        s = f"{key[h]}{'B' if int(a.rb_color[i]) == tree.RB_BLACK else 'r'}"
        lt, rt = int(a.left[i]), int(a.right[i])
        return f"{s}({f(lt)},{f(rt)})" if lt or rt else s
    return f(root.get())


def ref_fmt(root: RbRoot) -> str:
    """fmt() of the reference tree."""
    def f(n: RbNode | None) -> str:
        if n is None:
            return "."
        s = f"{n.key}{'B' if n.color == BLACK else 'r'}"
        return f"{s}({f(n.left)},{f(n.right)})" if n.left or n.right else s
    return f(root.rb_node)


def ref_tree(ops: list[tuple[str, int]]) -> RbRoot:
    """A reference tree after ("insert", key) / ("erase", key) operations, distinct keys."""
    root, nodes = RbRoot(), {}
    for op, key in ops:
        if op == "erase":
            rb_erase(nodes.pop(key), root)
            continue
        parent, left, cur = None, False, root.rb_node
        while cur is not None:
            parent, left = cur, key < cur.key
            cur = cur.left if left else cur.right
        n = nodes[key] = RbNode(key, key)
        rb_link_node(n, parent, left, root)
        rb_insert_color(n, root)
    return root


def _keys(rng: random.Random, n: int) -> list[int]:
    mode = rng.randrange(5)
    if mode == 0:
        return list(range(n))
    if mode == 1:
        return list(range(n, 0, -1))
    if mode == 2:                              # few distinct keys: many equal ones
        return [rng.randrange(max(2, n // 4)) for _ in range(n)]
    if mode == 3:                              # zig-zag
        return [i if i % 2 else 10 * n - i for i in range(n)]
    return [rng.randrange(1 << 30) for _ in range(n)]


def _run_sequence(p: Pair, seed: int, corrupt: bool = False) -> None:
    rng = random.Random(seed)
    nops = rng.randrange(20, 110)
    keys = iter(_keys(rng, nops + 1))
    p_insert = rng.uniform(0.45, 0.85)
    for _ in range(nops):
        x = rng.random()
        live = list(p.handle)
        if not live or x < p_insert:
            p.insert(next(keys))
        elif x < p_insert + 0.05:
            p.replace(rng.choice(live))
        else:
            p.erase(rng.choice(live))
        if corrupt and p.handle and rng.random() < 0.2:
            p.set_key(rng.choice(list(p.handle)), rng.randrange(1 << 30))
        p.check(sorted_keys=not corrupt)
    while p.handle:                            # and erase everything, in random order
        p.erase(rng.choice(list(p.handle)))
        p.check(sorted_keys=not corrupt)


# -- tests ----------------------------------------------------------------------------------------
ARENA_SEEDS = [("stable_node", range(0, 150)), ("rmap_item", range(150, 300))]


@pytest.mark.parametrize("arena, seeds", ARENA_SEEDS, ids=[a for a, _ in ARENA_SEEDS])
def test_same_shape_as_lib_rbtree_for_random_sequences(kern, arena, seeds):
    """300 fixed-seed sequences of inserts, erases and replaces over both record types:
    the same shape as the reference port after every operation, and a valid rbtree."""
    p = Pair(getattr(kern.km, arena))
    live = p.a.nr_live()
    for seed in seeds:
        _run_sequence(p, seed)
        p.clear()
    assert p.a.nr_live() == live


def test_changed_keys_leave_a_valid_unsorted_rbtree(kern):
    """Keys that change under the tree send inserts the wrong way: both trees stay the
    same valid rbtree (balancing never looks at keys), just not sorted any more."""
    p = Pair(kern.km.rmap_item)
    for seed in range(1000, 1040):
        _run_sequence(p, seed, corrupt=True)
        p.clear()
    assert p.unsorted_seen, "no sequence went wrong: the test would prove nothing"


def test_ascending_and_descending_inserts_give_the_kernels_shapes(kern):
    """Derived by hand from __rb_insert (uppercase B black, r red):

    1..10 ascending: 3 rotates the root left (case 3); 4 flips 1 and 3 black (case 1,
    recursing to the root); 5 and 7 rotate at their grandparent; 6 flips; 8 flips 5 and
    7, then recursing at 6 (red under red 4) rotates the root 2 left: 4 is the root; 9
    rotates at 7; 10 flips 7 and 9, recurses at 8 (red parent 6, red uncle 2) and flips
    2 and 6, and 4 turns red then back black as the root. Descending is the mirror.
    Then rb_erase(4): its successor 5 is the leftmost under its right child 6 (erase
    case 3), takes 4's place and colour; 5 was black with no child, so
    ____rb_erase_color(6): the sibling 8 is red (case 1, rotate left at 6), then the
    new sibling 7 has no red child (case 2: 7 red, red parent 6 turns black). Then
    rb_erase(1), a black leaf: sibling 3 has no red child, 3 turns red and the
    rebalance recurses at 2, whose sibling 8 turns red at the root.
    """
    p = Pair(kern.km.stable_node)
    labels = {k: p.insert(k) for k in range(1, 11)}
    p.check()
    assert fmt(p.a, p.root, p.key) == "4B(2B(1B,3B),6B(5B,8r(7B,9B(.,10r))))"
    p.erase(labels[4])
    p.check()
    assert fmt(p.a, p.root, p.key) == "5B(2B(1B,3B),8B(6B(.,7r),9B(.,10r)))"
    p.erase(labels[1])
    p.check()
    assert fmt(p.a, p.root, p.key) == "5B(2B(.,3r),8r(6B(.,7r),9B(.,10r)))"
    p.clear()

    for k in range(10, 0, -1):
        p.insert(k)
    p.check()
    assert fmt(p.a, p.root, p.key) == "7B(5B(3r(2B(1r,.),4B),6B),9B(8B,10B))"
    p.clear()


def test_replace_node_keeps_shape_and_colour(kern):
    p = Pair(kern.km.stable_node)
    rng = random.Random(7)
    for k in rng.sample(range(1000), 40):
        p.insert(k)
    p.check()
    a = p.a
    before = fmt(a, p.root, p.key)
    root_label = p.label[p.root.get()]
    leaf = next(lab for lab, h in p.handle.items()
                if not a.left[a.idx(h)] and not a.right[a.idx(h)])
    inner = next(lab for lab, h in p.handle.items()
                 if a.left[a.idx(h)] and a.right[a.idx(h)] and lab != root_label)
    red = next(lab for lab, h in p.handle.items() if a.rb_color[a.idx(h)] == tree.RB_RED)
    for label in (root_label, leaf, inner, red):
        old = p.handle[label]
        oi = a.idx(old)
        links = (int(a.left[oi]), int(a.right[oi]), int(a.parent[oi]), int(a.rb_color[oi]))
        new = p.replace(label)
        ni = a.idx(new)
        assert (int(a.left[ni]), int(a.right[ni]), int(a.parent[ni]), int(a.rb_color[ni])) == links
        for c in links[:2]:
            if c:
                assert int(a.parent[a.idx(c)]) == new
        if label == root_label:
            assert p.root.get() == new
        else:
            pi = a.idx(links[2])
            assert new in (int(a.left[pi]), int(a.right[pi]))
        assert fmt(a, p.root, p.key) == before
        p.check()
    p.clear()


@pytest.mark.parametrize("scan", ["exact", "batch"])
def test_trees_built_by_ksmd_have_the_kernels_shapes(kernel_factory, scan):
    """Stable and unstable trees after real scans are the rbtrees the kernel would build.
    (The vector scan lays each run's unstable tree out anew: test_scan_batch.py holds it
    to the kernel's order and the stable tree's shape.)

    Pass 2 scans 40 distinct pages (ranks 0..39 in memcmp order) into the unstable
    tree in ascending order; the copies of the first 30 then each meet their page in
    the unstable tree, which erases it there and inserts a new KSM page into the
    stable tree, again in ascending order; the last 12 pages (ranks 40..51) go into
    the unstable tree last.
    """
    h = kernel_factory(scan=scan)
    h.set("smart_scan", 0)
    contents = [0x10 + i for i in range(40)]
    _mm, _a = h.area(contents + contents[:30] + [0xF0 + i for i in range(12)])
    h.full_scan(2)
    sn, ri = h.km.stable_node, h.km.rmap_item
    sroot, uroot = stable_root(h.k, 0), unstable_root(h.k, 0)
    assert check_rbtree(sn, sroot) >= 3
    assert check_rbtree(ri, uroot) >= 2
    # Name the nodes by their rank in the in-order walk (the trees are sorted by content).
    srank = {n: i for i, n in enumerate(tree.walk(sn, sroot))}
    urank = {n: 30 + i for i, n in enumerate(tree.walk(ri, uroot))}
    assert len(srank) == 30 and len(urank) == 22
    assert fmt(sn, sroot, srank) == ref_fmt(ref_tree([("insert", i) for i in range(30)]))
    unstable_ops = ([("insert", i) for i in range(40)] + [("erase", i) for i in range(30)]
                    + [("insert", i) for i in range(40, 52)])
    assert fmt(ri, uroot, urank) == ref_fmt(ref_tree(unstable_ops))
    h.check()


def test_the_link_journal_names_every_node_whose_links_changed(kern):
    """The optimistic walks of --scan vector trust a path none of whose nodes is in the
    arena's link journal (tree.py). So after every insert, erase and replace each node
    whose left or right link differs from before is in the journal (and JOURNAL_ROOT
    when the root moved). 40 sequences of all the key orders _keys() makes: every
    rotation case of insert and erase on both sides."""
    p = Pair(kern.km.rmap_item)
    a = p.a

    def links() -> dict[int, tuple[int, int]]:
        return {h: (int(a.left[a.idx(h)]), int(a.right[a.idx(h)])) for h in p.handle.values()}

    rotated = {"insert": 0, "erase": 0, "replace": 0}
    for seed in range(300, 340):
        rng = random.Random(seed)
        for key in _keys(rng, rng.randrange(20, 90)):
            before, root0 = links(), p.root.get()
            a.journal = set()
            try:
                if p.handle and rng.random() < 0.25:
                    op = rng.choice(["erase", "replace"])
                    getattr(p, op)(rng.choice(list(p.handle)))
                else:
                    op = "insert"
                    p.insert(key)
                journal = a.journal
            finally:
                a.journal = None
            after = links()
            changed = {h for h, ln in before.items() if h in after and after[h] != ln}
            assert changed <= journal, f"seed {seed}: links changed unjournaled: {changed - journal}"
            assert p.root.get() == root0 or tree.JOURNAL_ROOT in journal
            rotated[op] += len(changed) > 1
        p.clear()
    assert rotated["insert"] > 50 and rotated["erase"] > 20, f"too few rotations to mean anything: {rotated}"
