# Kernel-path coverage of runs and campaigns, across every actor process (our kcov).
#
# A run started with a coverage folder (`ksmlab run/stress --coverage DIR`) has every
# actor process trace itself with coverage.py in parallel mode, branch coverage on,
# restricted to the kernel paths (actors/kernel); each process writes its own data
# file when it ends, and all runs of a campaign write into the same folder (the
# recording half is actors/kcov.py, the actors' entry point in such a run). `ksmlab
# cover DIR` combines them and maps lines and branch arcs back to the kernel
# functions (by their def ranges), so a campaign can say which functions of our
# mm/ksm.c model it reached, how much of each, and name the ones it never reached.
# coverage.py counts no hits, only reached or not; a count of runs that reached a
# function comes from the per-run data files instead. The second table reads the
# same data through docs/ksm-functions.md: which functions of the kernel's mm/ksm.c
# (by the kernel's names) the campaign ran, and which it never reached.
from __future__ import annotations

import ast
import glob
import os
from dataclasses import dataclass
from typing import Any

import coverage
from coverage.data import CoverageData
from coverage.python import PythonFileReporter

from actors.kcov import KERNEL_DIR
from ksmlab import ksm_functions


@dataclass
class FuncCov:
    module: str
    name: str
    first: int
    lines: int
    lines_hit: int
    arcs: int
    arcs_hit: int
    files_hit: int          # how many process data files reached it (runs x actors)

    @property
    def reached(self) -> bool:
        return self.lines_hit > 0


def _functions(path: str) -> list[tuple[str, int, int]]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body_first = node.body[0].lineno
            if isinstance(node.body[0], ast.Expr) and isinstance(getattr(node.body[0], "value", None),
                                                                 ast.Constant) and len(node.body) > 1:
                body_first = node.body[1].lineno   # the docstring is no code to reach
            out.append((node.name, body_first, node.end_lineno or node.lineno))
    return out


def _data_files(data_dir: str) -> list[str]:
    """Every process data file under data_dir (a guided campaign keeps one folder per run)."""
    return sorted(f for f in glob.glob(os.path.join(data_dir, "**", ".coverage.*"), recursive=True)
                  if not f.endswith(".lock"))


def arcs_reached(data_dir: str) -> set[tuple[str, int, int]]:
    """(module, from line, to line) of every kernel-path arc the data files under data_dir hold."""
    out: set[tuple[str, int, int]] = set()
    for f in _data_files(data_dir):
        d = CoverageData(basename=f)
        d.read()
        for path in d.measured_files():
            mod = os.path.basename(path)[:-3]
            out |= {(mod, a, b) for a, b in (d.arcs(path) or ())}
    return out


def table(data_dir: str) -> list[FuncCov]:
    """Per kernel function: lines and arcs reached over every data file in data_dir."""
    files = _data_files(data_dir)
    if not files:
        raise FileNotFoundError(f"{data_dir}: no coverage data (run with --coverage {data_dir})")
    per_file: list[CoverageData] = []
    for f in files:
        d = CoverageData(basename=f)
        d.read()
        per_file.append(d)
    cov = coverage.Coverage(data_file=None, branch=True, source=[KERNEL_DIR])
    out: list[FuncCov] = []
    for path in sorted(glob.glob(os.path.join(KERNEL_DIR, "*.py"))):
        if os.path.basename(path) == "__init__.py":
            continue
        _f, statements, _excl, _missing, _fmt = cov.analysis2(path)
        stmts = set(statements)
        hit_lines: set[int] = set()
        hit_arcs: set[tuple[int, int]] = set()
        per_run: list[set[int]] = []
        for d in per_file:
            ls = set(d.lines(path) or ())
            per_run.append(ls)
            hit_lines |= ls
            hit_arcs |= set(d.arcs(path) or ())
        possible = _possible_arcs(cov, path)
        mod = os.path.basename(path)[:-3]
        for name, lo, hi in _functions(path):
            fl = {n for n in stmts if lo <= n <= hi}
            if not fl:
                continue
            fa = {a for a in possible if lo <= a[0] <= hi and a[0] != a[1]}
            out.append(FuncCov(mod, name, lo, len(fl), len(fl & hit_lines), len(fa), len(fa & hit_arcs),
                               sum(1 for ls in per_run if ls & fl)))
    return out


def _possible_arcs(cov: Any, path: str) -> set[tuple[int, int]]:
    try:
        fr = PythonFileReporter(path, cov)
        return {a for a in fr.arcs() if a[0] > 0 and a[1] > 0}
    except Exception:
        return set()


def format_table(rows: list[FuncCov], only_missing: bool = False) -> str:
    lines = [f"{'kernel function':52} {'lines':>11} {'branches':>11} {'procs':>6}"]
    reached = sum(r.reached for r in rows)
    for r in rows:
        if only_missing and r.reached:
            continue
        br = f"{r.arcs_hit}/{r.arcs}" if r.arcs else "-"
        lines.append(f"{r.module + '.' + r.name:52} {r.lines_hit:>5}/{r.lines:<5} {br:>11} {r.files_hit:>6}")
    lines.append(f"reached {reached} of {len(rows)} kernel functions; "
                 f"lines {sum(r.lines_hit for r in rows)}/{sum(r.lines for r in rows)}, "
                 f"branches {sum(r.arcs_hit for r in rows)}/{sum(r.arcs for r in rows)}")
    never = [f"{r.module}.{r.name}" for r in rows if not r.reached]
    if never:
        lines.append("never reached: " + ", ".join(never))
    return "\n".join(lines)


@dataclass
class KsmCov:
    kernel: str                 # the mm/ksm.c function(s) of the table's row
    ours: str                   # the kernel-path functions that do its work
    status: str                 # "reached", "never reached", "not traced" (outside actors/kernel)
    files_hit: int


def ksm_c_table(funcs: list[FuncCov], table: list[ksm_functions.Row] | None = None) -> list[KsmCov]:
    """Per modelled row of docs/ksm-functions.md: did the data reach any of our functions
    that do that mm/ksm.c function's work? A row whose functions all live outside the
    kernel paths (the ksmd actor's loop, the arenas), or that is partly outside and was
    not reached inside (ksm_init: the supervisor boots the kernel), is "not traced":
    coverage records the actor processes' actors/kernel only."""
    by_name: dict[tuple[str, str], list[FuncCov]] = {}
    for f in funcs:
        by_name.setdefault((f.module, f.name), []).append(f)
    out = []
    for row in ksm_functions.load() if table is None else table:
        if not row.modelled:
            continue
        traced = [(m, a) for m, a in row.refs if "." not in m]
        hits = [f for m, a in traced for f in by_name.get((m, a.split(".")[-1]), [])]
        reached = any(f.reached for f in hits)
        # Work done outside the kernel paths (ksm_init is the supervisor's boot) is not
        # traced: such a row is never "never reached" on the kernel paths' evidence alone.
        outside = len(traced) < len(row.refs)
        status = "reached" if reached else "not traced" if outside or not traced else "never reached"
        out.append(KsmCov(", ".join(row.kernel), ", ".join(f"{m}.{a}" for m, a in traced) or "-", status,
                          max((f.files_hit for f in hits), default=0)))
    return out


def format_ksm_c_table(rows: list[KsmCov], only_missing: bool = False) -> str:
    lines = [f"{'mm/ksm.c function':40} {'ksmlab (actors/kernel)':52} {'':13} {'procs':>6}"]
    for r in rows:
        if only_missing and r.status != "never reached":
            continue
        lines.append(f"{r.kernel[:40]:40} {r.ours[:52]:52} {r.status:13} {r.files_hit:>6}")
    traced = [r for r in rows if r.status != "not traced"]
    reached = [r for r in traced if r.status == "reached"]
    lines.append(f"mm/ksm.c: reached {len(reached)} of the {len(traced)} functions modelled in the kernel "
                 f"paths ({len(rows) - len(traced)} more are modelled outside them and not traced)")
    never = [r.kernel for r in traced if r.status == "never reached"]
    lines.append("mm/ksm.c never reached: " + (", ".join(never) if never else "none"))
    return "\n".join(lines)
