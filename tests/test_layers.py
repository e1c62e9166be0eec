# The module graph shows the layers.
#
# ksmlab is five layers, each importing only from itself and from the layers below it:
#
#   ksmlab         the command line, scenarios, races, workloads, stress campaigns, the
#                  real-kernel runner, coverage tables, and the one-process simulator
#                  (ksmlab/sim: it drives actors.kernel directly, with its own seams)
#   actors         one thin process shell per kernel thread, the supervisor (cluster.py),
#                  boot, the event log, the entry points (main.py, kcov.py)
#   actors.kernel  the kernel paths as plain functions over a Kernel context: mm/ksm.c and
#                  the parts of mm/ it touches; no process, socket or shell in sight
#   shared_mem     the simulated kernel memory: segments, arenas and handles, frames, the
#                  lock space with its OFD locks and lockdep, the numpy comparison core
#   protocol       message table, codec, endpoints, the user ABI constants (bottom)
#
# Why this order. DESIGN.md fixes the direction "front -> actors -> shared_mem -> protocol":
# protocol imports nothing of ours and shared_mem may import protocol (for shared
# constants), never the actors. Today neither of the two bottom layers imports the other,
# so the code would allow either order; the design's is kept, protocol at the very bottom,
# because its ABI constants are what both the kernel paths and a user of the machine
# speak. actors.kernel is its own layer below the shells because DESIGN.md's "one process,
# one scheduler" needs the kernel paths to run without any actor (ksmlab/sim does exactly
# that): a kernel path importing a shell would drag processes and sockets into the
# simulator. ksmlab is the front: it wires, holds no kernel logic, and may use everything.
#
# What the test checks, over every .py under protocol/, shared_mem/, actors/ and ksmlab/
# (parsed with ast, never imported):
#   (a) the import graph has no cycle. The graph has an edge for every import of one of our
#       modules, at module level or inside a function, except those under
#       `if TYPE_CHECKING:` (annotations only: they never run). A cycle is printed as its
#       modules with the file:line of each import that closes it;
#   (b) no import sits inside a function body: a lazy import was how the old cycles were
#       hidden, and it hides a module's real dependencies from its reader;
#   (c) no module imports from a layer above its own (TYPE_CHECKING imports included: a
#       lower layer does not even name an upper one's types; seams.py's Protocols exist so
#       that it need not).
# The checker is tested on synthetic sources first (a cycle, a lazy import, an upward
# import, a TYPE_CHECKING import that must not count), so a checker that found nothing
# because it looked at nothing would fail.
from __future__ import annotations

import ast
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("protocol", "shared_mem", "actors", "ksmlab")

# Bottom first. A module belongs to the layer of the longest prefix that names it.
LAYERS = ("protocol", "shared_mem", "actors.kernel", "actors", "ksmlab")

# Imports inside function bodies in files this change could not edit (each names its
# owner's reason). The test fails when an entry no longer matches: remove it then.
PENDING_FUNCTION_IMPORTS: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Import:
    module: str          # the importing module
    target: str          # the module of ours it imports
    file: str
    line: int
    text: str            # the import statement
    in_function: bool
    type_checking: bool  # under `if TYPE_CHECKING:`


def layer_of(module: str) -> int:
    best, depth = -1, -1
    for i, name in enumerate(LAYERS):
        if (module == name or module.startswith(name + ".")) and name.count(".") > depth:
            best, depth = i, name.count(".")
    if best < 0:
        raise ValueError(f"{module}: in no layer of {LAYERS}")
    return best


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(name: str, modules: Iterable[str]) -> str | None:
    """The module of ours that `import name` loads (the longest known prefix), or None."""
    known = set(modules)
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, source: str, is_package: bool, modules: set[str],
               filename: str = "<string>") -> list[Import]:
    """Every import statement of one module that loads a module of ours (`modules`), and
    every import inside a function whatever it loads (target "" when not ours)."""
    tree = ast.parse(source, filename)
    package = module if is_package else module.rpartition(".")[0]
    out: list[Import] = []

    def targets(node: ast.Import | ast.ImportFrom) -> set[str]:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            # `from pkg import name`: name may be a submodule; else it is pkg's attribute.
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        found = {_resolve(n, modules) for n in names}
        return {t for t in found if t and t != module}

    def visit(node: ast.AST, in_function: bool, type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                text = ast.unparse(child)
                ts = targets(child)
                for t in sorted(ts):
                    out.append(Import(module, t, filename, child.lineno, text, in_function, type_checking))
                if in_function and not ts:
                    out.append(Import(module, "", filename, child.lineno, text, True, type_checking))
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for c in child.body:
                    visit(ast.Module(body=[c], type_ignores=[]), in_function, True)
                for c in child.orelse:
                    visit(ast.Module(body=[c], type_ignores=[]), in_function, type_checking)
            else:
                nested = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                visit(child, in_function or nested, type_checking)

    visit(tree, False, False)
    return out


def module_name(path: Path, root: Path = ROOT) -> tuple[str, bool]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def tree_sources(root: Path = ROOT, packages: Iterable[str] = PACKAGES) -> dict[str, tuple[str, bool, str]]:
    """module -> (source, is_package, file relative to root) for every .py of the packages."""
    out = {}
    for pkg in packages:
        for p in sorted((root / pkg).rglob("*.py")):
            name, is_package = module_name(p, root)
            out[name] = (p.read_text(encoding="utf-8"), is_package, str(p.relative_to(root)))
    return out


def all_imports(sources: Mapping[str, tuple[str, bool, str]]) -> list[Import]:
    modules = set(sources)
    out = []
    for name, (src, is_package, filename) in sources.items():
        out += imports_of(name, src, is_package, modules, filename)
    return out


def find_cycles(imports: Iterable[Import]) -> list[list[Import]]:
    """One cycle (as the imports that make it) per strongly connected component of the
    run-time import graph; [] when the graph is acyclic."""
    edges: dict[str, dict[str, Import]] = {}
    for imp in imports:
        if imp.target and not imp.type_checking:
            edges.setdefault(imp.module, {}).setdefault(imp.target, imp)
            edges.setdefault(imp.target, {})
    # Tarjan's strongly connected components, iteratively (no recursion limit to meet).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    sccs: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on_stack.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1 or v in edges[v]:
                    sccs.append(sorted(comp))
    cycles = []
    for comp in sccs:
        members = set(comp)
        head = comp[0]
        # Shortest way back to head inside the component (BFS), as the imports on it.
        prev: dict[str, str] = {}
        todo = [head]
        while todo and head not in prev:
            nxt = []
            for u in todo:
                for w in sorted(edges[u]):
                    if w in members and w not in prev:
                        prev[w] = u
                        nxt.append(w)
            todo = nxt
        path = [head]
        while True:
            u = prev[path[-1]]
            path.append(u)
            if u == head:
                break
        path.reverse()
        cycles.append([edges[a][b] for a, b in itertools.pairwise(path)])
    return cycles


def format_cycle(cycle: list[Import]) -> str:
    mods = " -> ".join([cycle[0].module, *(i.target for i in cycle)])
    lines = [f"cycle: {mods}"]
    lines += [f"  {i.file}:{i.line}: {i.text}" for i in cycle]
    return "\n".join(lines)


def function_imports(imports: Iterable[Import]) -> list[str]:
    seen = set()
    out = []
    for i in imports:
        if i.in_function and (i.file, i.line) not in seen:
            seen.add((i.file, i.line))
            out.append(f"{i.file}:{i.line}: {i.text}")
    return sorted(out)


def upward_imports(imports: Iterable[Import]) -> list[str]:
    out = set()
    for i in imports:
        if i.target and layer_of(i.target) > layer_of(i.module):
            out.add(f"{i.file}:{i.line}: {i.module} ({LAYERS[layer_of(i.module)]}) imports "
                    f"{i.target} ({LAYERS[layer_of(i.target)]}): {i.text}")
    return sorted(out)


def _pending(imports: Iterable[Import]) -> tuple[list[str], set[tuple[str, str]]]:
    """Function-level imports not excused by PENDING_FUNCTION_IMPORTS, and the entries
    of it that matched nothing."""
    left = []
    used = set()
    for i in function_imports(imports):
        file, _line, text = i.split(":", 2)
        key = (file, text.strip())
        if key in PENDING_FUNCTION_IMPORTS:
            used.add(key)
        else:
            left.append(i)
    return left, PENDING_FUNCTION_IMPORTS - used


# -- the tree -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return all_imports(tree_sources())


def test_every_package_is_parsed(imports):
    files = {i.file.split("/", 1)[0] for i in imports}
    assert set(PACKAGES) <= files, files


def test_no_import_cycles(imports):
    cycles = find_cycles(imports)
    assert not cycles, "import cycles:\n" + "\n".join(format_cycle(c) for c in cycles)


def test_no_import_inside_a_function(imports):
    left, stale = _pending(imports)
    assert not left, ("imports inside function bodies (move them to the top of the module; "
                      "a cycle they hid is test_no_import_cycles' to show):\n" + "\n".join(left))
    assert not stale, f"PENDING_FUNCTION_IMPORTS entries that match nothing any more (remove them): {stale}"


def test_no_upward_import(imports):
    up = upward_imports(imports)
    assert not up, f"imports from a higher layer (order, bottom first: {' < '.join(LAYERS)}):\n" + "\n".join(up)


# -- the checker itself ----------------------------------------------------------------------------
def _synthetic(files: dict[str, str]) -> list[Import]:
    """files: {"pkg/mod.py": source}; module names follow the paths."""
    sources = {}
    for path, src in files.items():
        name, is_package = module_name(ROOT / path)
        sources[name] = (src, is_package, path)
    return all_imports(sources)


def test_checker_finds_a_cycle_hidden_in_a_function():
    imps = _synthetic({
        "actors/kernel/a.py": "from actors.kernel import b\n",
        "actors/kernel/b.py": "def f():\n    from actors.kernel.c import g\n    return g\n",
        "actors/kernel/c.py": "import actors.kernel.a\n\ndef g():\n    pass\n",
    })
    cycles = find_cycles(imps)
    assert len(cycles) == 1
    text = format_cycle(cycles[0])
    assert "actors.kernel.a -> actors.kernel.b -> actors.kernel.c -> actors.kernel.a" in text, text
    assert "actors/kernel/b.py:2: from actors.kernel.c import g" in text, text
    assert function_imports(imps) == ["actors/kernel/b.py:2: from actors.kernel.c import g"]


def test_checker_finds_a_self_cycle_through_a_package():
    imps = _synthetic({
        "protocol/__init__.py": "from protocol import codec\n",
        "protocol/codec.py": "import protocol\n",
    })
    assert [len(c) for c in find_cycles(imps)] == [2]


def test_checker_ignores_type_checking_imports_for_cycles_only():
    imps = _synthetic({
        "actors/kernel/context.py": "from actors.kernel import mm\n",
        "actors/kernel/mm.py": ("from __future__ import annotations\nfrom typing import TYPE_CHECKING\n"
                                "if TYPE_CHECKING:\n    from actors.kernel.context import Kernel\n"
                                "else:\n    import numpy\n"),
        "shared_mem/x.py": "import typing\nif typing.TYPE_CHECKING:\n    from actors.kernel.context import Kernel\n",
    })
    assert find_cycles(imps) == []
    assert function_imports(imps) == []
    up = upward_imports(imps)
    assert len(up) == 1 and up[0].startswith("shared_mem/x.py:3: shared_mem.x (shared_mem) imports "
                                             "actors.kernel.context (actors.kernel)"), up


def test_checker_finds_upward_imports():
    imps = _synthetic({
        "protocol/abi.py": "from shared_mem import layout\n",
        "shared_mem/layout.py": "X = 1\n",
        "actors/kernel/mm.py": "from actors import base\nfrom . import tree\n",
        "actors/kernel/tree.py": "",
        "actors/base.py": "from ksmlab.kcov import start\nfrom actors.kernel import mm\n",
        "ksmlab/kcov.py": "def start():\n    import coverage\n",
    })
    up = upward_imports(imps)
    assert [u.split(":")[0] for u in up] == ["actors/base.py", "actors/kernel/mm.py", "protocol/abi.py"], up
    assert "actors.kernel.mm (actors.kernel) imports actors.base (actors)" in up[1]
    # a relative import inside the layer resolves, and is no offence
    assert any(i.target == "actors.kernel.tree" for i in imps)
    # an import of a library inside a function is still an import inside a function
    assert function_imports(imps) == ["ksmlab/kcov.py:2: import coverage"]


def test_checker_accepts_a_layered_tree():
    imps = _synthetic({
        "protocol/abi.py": "PAGE_SIZE = 4096\n",
        "shared_mem/layout.py": "from protocol.abi import PAGE_SIZE\n",
        "actors/kernel/mm.py": "import numpy as np\n\nfrom shared_mem import layout\n",
        "actors/cluster.py": "from actors.kernel import mm\nfrom protocol import abi\n",
        "ksmlab/cli.py": "from actors.cluster import *\n",
    })
    assert find_cycles(imps) == [] and function_imports(imps) == [] and upward_imports(imps) == []


def test_layer_of_prefers_the_longest_prefix():
    assert [layer_of(m) for m in ("protocol.abi", "shared_mem", "actors.kernel.mm", "actors.kernel",
                                  "actors.kernelx", "actors.cluster", "ksmlab.sim.world")] == [0, 1, 2, 2, 3, 3, 4]
    with pytest.raises(ValueError):
        layer_of("tests.helpers")
