# Every dereference of a record handle in actors/ goes through Arena.idx().
#
# A handle is (generation << 32) | index; Arena.idx(h, site) checks the generation and
# raises UseAfterFree with a KASAN-shaped report. Code that takes a handle apart itself
# (h & 0xFFFFFFFF, h_index(h), h >> 32) or indexes a record field with something that is
# not an index from idx() skips that check, and a use-after-free through it is silent.
#
# The static test parses every .py under actors/ and reports each such place as
# file:line. The runtime tests free a record on a booted KernelMemory and then call
# kernel paths with the stale handle: each must raise UseAfterFree naming its site.
from __future__ import annotations

import ast
import secrets
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared_mem.arena import UseAfterFree, handle_id
from shared_mem.layout import ARENAS, Geometry

ROOT = Path(__file__).resolve().parents[2]
ACTORS = ROOT / "actors"

ARENA_NAMES = frozenset(name for name, _dt, _cap in ARENAS)
# Record fields exposed as Arena attributes, plus the arrays an Arena keeps per record.
FIELD_NAMES = frozenset(f for _n, dt, _c in ARENAS for f in dt.names) | {"rec", "gen", "meta"}
# Other kernel tables indexed by a record's index: the pgd rows belong to the mm.
KM_TABLES = frozenset({"pgd"})
# Calls whose result is a checked index, or an array of live indices.
INDEX_CALLS = frozenset({"idx", "idx_many", "live_indices"})
TAKE_APART = frozenset({"h_index", "h_gen"})
HANDLE_MASK = 0xFFFFFFFF


class _Scope:
    """The names bound in one function (or module) body, each with every value it gets."""

    def __init__(self, node: ast.AST, parent: _Scope | None) -> None:
        self.parent = parent
        # name -> list of ("value", expr) | ("iter", expr) | ("param", annotation) | ("other", None)
        self.binds: dict[str, list[tuple[str, ast.AST | None]]] = {}
        self.node = node

    def add(self, name: str, kind: str, value: ast.AST | None) -> None:
        self.binds.setdefault(name, []).append((kind, value))

    def lookup(self, name: str) -> tuple[list[tuple[str, ast.AST | None]], _Scope] | None:
        s: _Scope | None = self
        while s is not None:
            if name in s.binds:
                return s.binds[name], s
            s = s.parent
        return None


def _bind_target(scope: _Scope, target: ast.AST, kind: str, value: ast.AST | None) -> None:
    if isinstance(target, ast.Name):
        scope.add(target.id, kind, value)
    elif isinstance(target, ast.Tuple | ast.List):
        vals = value.elts if kind == "value" and isinstance(value, ast.Tuple | ast.List) else None
        for j, t in enumerate(target.elts):
            if vals is not None and len(vals) == len(target.elts):
                _bind_target(scope, t, "value", vals[j])
            else:
                _bind_target(scope, t, "other", None)
    elif isinstance(target, ast.Starred):
        _bind_target(scope, target.value, "other", None)


class _Binder(ast.NodeVisitor):
    """Collects the bindings of every scope, without descending into nested scopes."""

    def __init__(self, scope: _Scope) -> None:
        self.scope = scope

    def visit_Assign(self, node: ast.Assign) -> None:
        for t in node.targets:
            _bind_target(self.scope, t, "value", node.value)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        _bind_target(self.scope, node.target, "value" if node.value else "other", node.value)
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        _bind_target(self.scope, node.target, "other", None)
        self.generic_visit(node)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        _bind_target(self.scope, node.target, "value", node.value)
        self.generic_visit(node)

    def visit_For(self, node: ast.For) -> None:
        _bind_target(self.scope, node.target, "iter", node.iter)
        self.generic_visit(node)

    visit_AsyncFor = visit_For

    def visit_comprehension(self, node: ast.comprehension) -> None:
        _bind_target(self.scope, node.target, "iter", node.iter)
        self.generic_visit(node)

    def visit_withitem(self, node: ast.withitem) -> None:
        if node.optional_vars is not None:
            _bind_target(self.scope, node.optional_vars, "other", None)
        self.generic_visit(node)

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.name:
            self.scope.add(node.name, "other", None)
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import | ast.ImportFrom) -> None:
        for a in node.names:
            self.scope.add((a.asname or a.name).split(".")[0], "other", None)

    visit_ImportFrom = visit_Import

    def _nested(self, node: ast.AST) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            self.scope.add(node.name, "other", None)
        # the nested scope is analysed on its own; default values belong to this one
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            for d in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
                self.visit(d)

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_Lambda = _nested


class HandleChecker:
    """Finds every place in one module that takes a handle apart without Arena.idx()."""

    def __init__(self, source: str, filename: str = "<string>") -> None:
        self.filename = filename
        self.tree = ast.parse(source, filename)
        self.offences: list[tuple[int, str]] = []
        self.scopes: dict[ast.AST, _Scope] = {}
        self._build(self.tree, None)

    # -- scopes ---------------------------------------------------------------------------
    def _build(self, node: ast.AST, parent: _Scope | None) -> None:
        scope = _Scope(node, parent)
        self.scopes[node] = scope
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            a = node.args
            for arg in a.posonlyargs + a.args + a.kwonlyargs + [x for x in (a.vararg, a.kwarg) if x]:
                scope.add(arg.arg, "param", arg.annotation)
            body = node.body if isinstance(node.body, list) else [node.body]
        else:
            body = node.body  # type: ignore[attr-defined]
        binder = _Binder(scope)
        for stmt in body:
            binder.visit(stmt)
        for child in self._nested_scopes(body):
            self._build(child, scope)

    @staticmethod
    def _nested_scopes(body: list[ast.AST]) -> Iterator[ast.AST]:
        todo = list(body)
        while todo:
            n = todo.pop()
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
                yield n
                if isinstance(n, ast.ClassDef):
                    continue
                a = n.args
                todo.extend(a.defaults + [d for d in a.kw_defaults if d is not None])
                continue
            todo.extend(ast.iter_child_nodes(n))

    # -- what an expression is ---------------------------------------------------------------
    def _all(self, scope: _Scope, name: str, pred, seen: frozenset[str]) -> bool:
        """Every binding of name satisfies pred. A binding that refers back to the name
        itself (i = int(i)) is left to the others to decide."""
        if name in seen:
            return True
        found = scope.lookup(name)
        if found is None:
            return False
        binds, where = found
        seen = seen | {name}
        return all(pred(where, kind, v, seen) for kind, v in binds)

    def is_km(self, scope: _Scope, e: ast.AST, seen: frozenset[str] = frozenset()) -> bool:
        if isinstance(e, ast.Attribute):
            return e.attr == "km"
        if isinstance(e, ast.Name):
            if e.id == "km":
                return True
            return self._all(scope, e.id, lambda s, kind, v, sn: kind == "value"
                             and self.is_km(s, v, sn), seen)
        return False

    def is_arena(self, scope: _Scope, e: ast.AST, seen: frozenset[str] = frozenset()) -> bool:
        if isinstance(e, ast.Attribute):
            return e.attr in ARENA_NAMES and self.is_km(scope, e.value, seen)
        if isinstance(e, ast.Subscript):  # km.arenas[name]
            return (isinstance(e.value, ast.Attribute) and e.value.attr == "arenas"
                    and self.is_km(scope, e.value.value, seen))
        if isinstance(e, ast.Name):
            def pred(s: _Scope, kind: str, v: ast.AST | None, sn: frozenset[str]) -> bool:
                if kind == "param":
                    return isinstance(v, ast.Name | ast.Constant) and (
                        getattr(v, "id", None) == "Arena" or getattr(v, "value", None) == "Arena")
                return kind == "value" and v is not None and self.is_arena(s, v, sn)
            return self._all(scope, e.id, pred, seen)
        return False

    def field_of(self, scope: _Scope, e: ast.AST, seen: frozenset[str] = frozenset()) -> str | None:
        """'arena.field' when e is a per-record array of an arena (or a km table), else None."""
        if isinstance(e, ast.Attribute):
            if e.attr in FIELD_NAMES and self.is_arena(scope, e.value, seen):
                return f"{self._arena_name(scope, e.value)}.{e.attr}"
            if e.attr in KM_TABLES and self.is_km(scope, e.value, seen):
                return f"km.{e.attr}"
            return None
        if isinstance(e, ast.Subscript) and isinstance(e.slice, ast.Constant) \
                and isinstance(e.slice.value, str):  # arena.rec["users"]
            inner = self.field_of(scope, e.value, seen)
            return f"{inner}[{e.slice.value!r}]" if inner else None
        if isinstance(e, ast.Name):
            found = scope.lookup(e.id)
            if found is None or e.id in seen:
                return None
            binds, where = found
            names = [self.field_of(where, v, seen | {e.id}) if kind == "value" and v else None
                     for kind, v in binds]
            return names[0] if names and all(names) else None
        return None

    def _arena_name(self, scope: _Scope, e: ast.AST) -> str:
        if isinstance(e, ast.Attribute):
            return e.attr
        if isinstance(e, ast.Name):
            found = scope.lookup(e.id)
            if found:
                for kind, v in found[0]:
                    if kind == "value" and v is not None:
                        return self._arena_name(found[1], v)
        return "arena"

    def is_atomic(self, scope: _Scope, e: ast.AST, seen: frozenset[str] = frozenset()) -> bool:
        if isinstance(e, ast.Call):
            f = e.func
            return isinstance(f, ast.Attribute) and f.attr == "atomic" and self.is_arena(scope, f.value, seen)
        if isinstance(e, ast.Name):
            return self._all(scope, e.id, lambda s, kind, v, sn: kind == "value" and v is not None
                             and self.is_atomic(s, v, sn), seen)
        return False

    def is_index(self, scope: _Scope, e: ast.AST, seen: frozenset[str] = frozenset()) -> bool:
        """e is a checked record index (or an array of them, or a slice)."""
        if isinstance(e, ast.Slice):
            return True
        if isinstance(e, ast.Call):
            f = e.func
            if isinstance(f, ast.Attribute) and f.attr in INDEX_CALLS:
                return True
            if isinstance(f, ast.Name) and f.id == "int" and len(e.args) == 1:
                return self.is_index(scope, e.args[0], seen)
            return False
        if isinstance(e, ast.Subscript):  # one element of an array of live indices
            return self.is_index(scope, e.value, seen) and not isinstance(e.value, ast.Slice)
        if isinstance(e, ast.ListComp | ast.GeneratorExp | ast.SetComp):  # [int(i) for i in live]
            return self.is_index(scope, e.elt, seen)
        if isinstance(e, ast.Name):
            def pred(s: _Scope, kind: str, v: ast.AST | None, sn: frozenset[str]) -> bool:
                if kind == "value":
                    return v is not None and self.is_index(s, v, sn)
                if kind == "iter":
                    return v is not None and self._index_iter(s, v, sn)
                return False
            return self._all(scope, e.id, pred, seen)
        return False

    def _index_iter(self, scope: _Scope, it: ast.AST, seen: frozenset[str]) -> bool:
        if isinstance(it, ast.Call):
            f = it.func
            if isinstance(f, ast.Name) and f.id in ("range", "list", "sorted", "reversed") and it.args:
                return f.id == "range" or self._index_iter(scope, it.args[0], seen)
            if isinstance(f, ast.Attribute) and f.attr == "tolist":
                return self._index_iter(scope, f.value, seen)
        return self.is_index(scope, it, seen)

    # -- the walk ------------------------------------------------------------------------------
    def check(self) -> list[tuple[int, str]]:
        for node, scope in self.scopes.items():
            body = node.body if isinstance(getattr(node, "body", None), list) else [node.body]
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                a = node.args
                extra = [x.annotation for x in a.posonlyargs + a.args + a.kwonlyargs if x.annotation]
            else:
                extra = []
            todo = list(body) + extra
            while todo:
                n = todo.pop()
                if n in self.scopes and n is not node:
                    continue
                self._visit(scope, n)
                todo.extend(ast.iter_child_nodes(n))
        return sorted(set(self.offences))

    def _off(self, node: ast.AST, msg: str) -> None:
        self.offences.append((node.lineno, msg))

    def _visit(self, scope: _Scope, n: ast.AST) -> None:
        if isinstance(n, ast.BinOp):
            consts = [x.value for x in (n.left, n.right) if isinstance(x, ast.Constant)]
            if isinstance(n.op, ast.BitAnd) and HANDLE_MASK in consts:
                self._off(n, "handle taken apart with & 0xFFFFFFFF (use arena.idx(h, site))")
            if isinstance(n.op, ast.RShift) and isinstance(n.right, ast.Constant) and n.right.value == 32:
                self._off(n, "handle generation taken with >> 32")
        elif isinstance(n, ast.Call):
            f = n.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if name in TAKE_APART:
                self._off(n, f"{name}() takes a handle apart without the generation check")
            if isinstance(f, ast.Attribute) and self.is_atomic(scope, f.value) and n.args \
                    and not self.is_index(scope, n.args[0]):
                self._off(n, f"atomic {f.attr}() on an index not from idx(): {ast.unparse(n.args[0])}")
        elif isinstance(n, ast.ImportFrom):
            for a in n.names:
                if a.name in TAKE_APART:
                    self._off(n, f"imports {a.name} (only shared_mem/arena.py takes handles apart)")
        elif isinstance(n, ast.Subscript):
            fld = self.field_of(scope, n.value)
            if fld is None:
                return
            ix = n.slice.elts[0] if isinstance(n.slice, ast.Tuple) and n.slice.elts else n.slice
            if isinstance(ix, ast.Constant) and isinstance(ix.value, str):
                return  # a field of the structured array, not a record
            if not self.is_index(scope, ix):
                self._off(n, f"{fld}[{ast.unparse(ix)}]: index not from idx()/live_indices()/range()")


def check_source(source: str, filename: str = "<string>") -> list[str]:
    """'file:line: what' for every unchecked handle dereference in one module's source."""
    return [f"{filename}:{line}: {msg}" for line, msg in HandleChecker(source, filename).check()]


def check_tree(root: Path = ACTORS) -> list[str]:
    out = []
    for p in sorted(root.rglob("*.py")):
        out += check_source(p.read_text(), str(p.relative_to(ROOT)))
    return out


# -- static ---------------------------------------------------------------------------------
def test_no_unchecked_handle_dereference_in_actors():
    offences = check_tree()
    assert not offences, "handles taken apart without Arena.idx():\n" + "\n".join(offences)


# The one way around the generation check the kernel itself has: a SLAB_TYPESAFE_BY_RCU
# cache, whose freed slot may still be locked through a stale pointer and is checked
# again under the lock. Only the anon_vma lock of folio_lock_anon_vma_read() does that.
TYPESAFE_USERS = {"typesafe_idx": {"actors/kernel/context.py:anon_vma_lock_typesafe"},
                  "anon_vma_lock_typesafe": {"actors/kernel/vmscan.py:folio_lock_anon_vma_read"}}


def typesafe_callers(root: Path = ACTORS) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {name: set() for name in TYPESAFE_USERS}
    for p in sorted(root.rglob("*.py")):
        tree = ast.parse(p.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for n in ast.walk(fn):
                if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in out:
                    out[n.func.attr].add(f"{p.relative_to(ROOT)}:{fn.name}")
    return out


def test_only_folio_lock_anon_vma_read_takes_a_typesafe_lock():
    assert typesafe_callers() == TYPESAFE_USERS


@pytest.mark.parametrize("src, what", [
    ("def f(k, vma):\n    return k.km.vma.start[vma & 0xFFFFFFFF]\n", "& 0xFFFFFFFF"),
    ("def f(k, h):\n    return k.km.vma.start[k.km.vma.typesafe_idx(h)]\n", "vma.start["),
    ("def f(k, h):\n    return k.km.vma.flags[h]\n", "vma.flags[h]"),
    ("def f(km, h):\n    vi = h & 0xFFFFFFFF\n    return km.vma.end[vi]\n", "vma.end[vi]"),
    ("from shared_mem.arena import h_index\n", "imports h_index"),
    ("def f(h):\n    return h_index(h)\n", "h_index()"),
    ("def f(h):\n    return h >> 32\n", ">> 32"),
    ("def f(km, h):\n    vend = km.vma.end\n    return vend[h]\n", "vma.end[h]"),
    ("def f(km, h):\n    vma = km.vma\n    vend, vnext = vma.end, vma.next\n    return vnext[h]\n",
     "vma.next[h]"),
    ("def f(k, mm):\n    k.km.mm.atomic('rss_anon').dec_return(mm)\n", "atomic dec_return()"),
    ("def f(km, t):\n    if km.task.valid(t):\n        return km.task.flags[t]\n", "task.flags[t]"),
    ("def f(km, mm, i):\n    return km.pgd[mm, i]\n", "km.pgd[mm]"),
    ("def f(k, v):\n    while v:\n        v = k.km.vma.next[v]\n", "vma.next[v]"),
    ("def f(a: Arena, h):\n    return a.left[h]\n", "arena.left[h]"),
    ("def f(km, h):\n    i = km.vma.idx(h, 'f')\n    i = h\n    return km.vma.end[i]\n", "vma.end[i]"),
    ("def f(k, h):\n    return k.km.vma.end[handle_id(h)]\n", "vma.end[handle_id(h)]"),
    ("def f(k, hs):\n    return [k.km.vma.end[v] for v in hs]\n", "vma.end[v]"),
])
def test_checker_finds_each_kind_of_bypass(src, what):
    offences = check_source(src, "snippet.py")
    assert offences and all(o.startswith("snippet.py:") for o in offences), offences
    assert any(what in o for o in offences), offences


def test_checker_accepts_checked_dereferences():
    src = textwrap.dedent("""
        def walk(k, mm):
            km = k.km
            vma = km.vma
            vend, vnext = vma.end, vma.next
            v = int(km.mm.mmap[km.mm.idx(mm, "vma_iter")])
            while v:
                vi = vma.idx(v, "vma_iter")
                if vend[vi] > 0:
                    return v
                v = int(vnext[vi])
            for i in km.vma.live_indices():
                km.vma.flags[i] = 0
            live = km.mm.live_indices()
            km.mm.users[live] += 0
            for j in range(km.vma.capacity):
                km.vma.nid[j] = -1
            km.pgd[km.mm.idx(mm, "pgd"), :] = 0
            km.mm.atomic("users").inc_return(km.mm.idx(mm, "mmget"))
            return km.mm.rec["users"][km.mm.idx(mm, "x")]
    """)
    assert check_source(src, "ok.py") == []


# -- runtime --------------------------------------------------------------------------------
@pytest.fixture
def kernel():
    """A booted KernelMemory with its lock space and a swapper Kernel, no cluster."""
    from actors.boot import boot_kernel
    from actors.kernel.context import Kernel
    from actors.kernel.variants import Variants
    from shared_mem.segment import list_segments

    run_id = "t" + secrets.token_hex(5)
    geo = Geometry(nr_frames=256, max_mms=8, max_vmas=64, max_anon_vmas=64, max_tasks=8,
                   va_pages=1024)
    km, locks = boot_kernel(geo, run_id, Variants())
    k = Kernel(km, locks, "swapper", variants=Variants())
    try:
        yield k
    finally:
        del k
        km.close()
        km.unlink()
        locks.close()
        locks.unlink()
    assert not list_segments(run_id), "segments left behind"


START = 0x100000
LEN = 16 * 4096


def _mm_with_vma(k):
    from actors.kernel import mm as mmops

    mm = mmops.mm_alloc(k)
    with k.mmap_lock(mm).write():
        vma = mmops.vma_new(k, mm, START, START + LEN, 0, 0)
    return mm, vma


def _expect_uaf(cases, cache: str, freed_at: str) -> None:
    """Each (callable, args, site) must raise UseAfterFree reported at site."""
    for fn, args, site in cases:
        what = getattr(fn, "__name__", repr(fn))
        try:
            fn(*args)
        except UseAfterFree as e:
            rep = e.report
        else:
            pytest.fail(f"{what}() used a stale {cache} handle without a report (expected one in {site})")
        assert rep["kind"] == "kasan", (what, rep["title"])
        assert rep["title"] == f"BUG: KASAN: use-after-free in {site}", (what, rep["title"])
        assert rep["data"]["site"] == site
        assert rep["data"]["cache"] == cache, (what, rep["data"])
        assert rep["data"]["free"]["site"] == freed_at, (what, rep["data"]["free"])


def test_stale_vma_is_caught_on_every_path(kernel):
    """A vma freed behind the mm's back (still linked from mm->mmap): each walk step and
    each path handed the stale handle is a checked dereference."""
    from actors.kernel import ksm_mm, memory, merge
    from actors.kernel import mm as mmops
    from protocol.abi import MADV_MERGEABLE

    k = kernel
    mm, vma = _mm_with_vma(k)
    k.km.vma.free(vma, site="test_free")
    _expect_uaf([
        (mmops.find_vma, (k, mm, START), "find_vma"),
        (mmops.vma_lookup, (k, mm, START), "find_vma"),
        (merge.find_mergeable_vma, (k, mm, START), "find_vma"),
        (lambda k, mm: list(mmops.vmas(k, mm)), (k, mm), "vma_iter"),
        (mmops.range_has_gaps, (k, mm, START, START + 4096), "range_has_gaps"),
        (mmops.get_unmapped_area, (k, mm, 4096), "get_unmapped_area"),
        (mmops.split_range, (k, mm, START, START + 4096), "vma_iter"),  # list(vmas())
        (mmops.linear_page_index, (k, vma, START), "linear_page_index"),
        (mmops.vma_is_locked, (k, vma), "vma_is_locked"),
        (mmops.anon_vma_unlink, (k, vma), "anon_vma_unlink"),
        (memory._node_for, (k, mm, vma), "get_vma_policy"),
        (memory.page_add_new_anon_rmap, (k, 1, vma, START), "page_add_new_anon_rmap"),
        (ksm_mm.ksm_madvise, (k, vma, START, START + LEN, MADV_MERGEABLE), "ksm_madvise"),
        (ksm_mm.ksm_add_vmas, (k, mm), "vma_ksm_compatible"),
    ], cache="vma", freed_at="test_free")


def test_stale_mm_is_caught_in_page_table_and_ksm_paths(kernel):
    """The mm freed by its last mmdrop: page-table lookups and mm flag helpers raise."""
    from actors.kernel import ksm_mm, memory
    from actors.kernel import mm as mmops

    k = kernel
    mm, vma = _mm_with_vma(k)
    with k.mmap_lock(mm).write():
        mmops.vma_remove(k, mm, vma)
    mmops.mmdrop(k, mm)
    assert not k.km.mm.valid(mm)
    _expect_uaf([
        (mmops.read_pte, (k, mm, START), "pte_offset"),
        (mmops.pte_table, (k, mm, START), "pte_offset"),
        (mmops.mmdrop, (k, mm), "mmdrop"),
        (memory.follow_page, (k, mm, START), "ptl"),
        (memory.next_present, (k, mm, START, START + LEN), "pte_offset"),
        (ksm_mm.mm_flags, (k, mm), "mm_flags"),
    ], cache="mm", freed_at="__mmdrop")


def test_stale_rmap_item_and_stable_node(kernel):
    """ksmd's per-page helpers check the rmap_item and stable node they are handed."""
    from actors.kernel import ksm_scan, stable_tree

    k = kernel
    k.ks.smart_scan = 1
    item = k.km.rmap_item.alloc(site="alloc_rmap_item")
    k.km.rmap_item.free(item, site="free_rmap_item")
    _expect_uaf([
        (ksm_scan.should_skip_rmap_item, (k, 1, item), "should_skip_rmap_item"),
        (stable_tree.stable_item_check, (k, item), "stable_item_check"),
    ], cache="rmap_item", freed_at="free_rmap_item")
    node = stable_tree.alloc_stable_node(k)
    stable_tree.free_stable_node(k, node)
    _expect_uaf([
        (stable_tree.is_stable_node_chain, (k, node), "is_stable_node_chain"),
        (stable_tree.__stable_node_chain, (k, node, False), "__stable_node_chain"),
        (stable_tree.ksm_get_folio, (k, node), "ksm_get_folio"),
    ], cache="stable_node", freed_at="free_stable_node")


def test_handle_id_is_only_a_number_for_logs():
    from shared_mem.arena import pack

    assert handle_id(pack(3, 17)) == 17
    assert handle_id(0) == 0
