# `ksmlab stress`: campaigns of seeded runs against the historical KSM bugs.
#
# A campaign runs N seeds of each bug's scenario, with the bug's variant on (the
# historical kernel) or off (--fixed, today's kernel), J runs at a time, each as its
# own `ksmlab run ... --json --stop-on-report` process with its own run folder, so
# one run's crash or hang cannot touch another and every run can be replayed with
# `ksmlab replay RUN_DIR`. The run processes are forked from one that has imported
# ksmlab (ksmlab/runfork.py) unless --spawn-runs starts each as a new interpreter.
# A run ends at its first report or at its time bound; a run
# still alive a grace period after its bound is killed (its whole process group) and
# its segments swept. The bug scenarios are workloads, not windows: the seed's
# schedule plan (actors/kernel/schedule.py) is what opens the windows.
#
# What counts. A run *detects* its bug when a report of one of the bug's expected
# kinds is among its reports (the campaign kinds below, from the detectors' raw
# kinds). With --fixed any report at all is a finding: today's kernel must survive
# the same campaign with nothing to say, except what ksmlab has already found in it
# (docs/bugs/README.md, "Findings"). So that a known finding does not hide a new one,
# --fixed runs today's kernel with ksmlab's proposed fixes ("fix:" variants) unless
# --without-proposed-fixes, and a report of a known finding is counted apart (known).
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from actors import zygote
from actors.kernel.debug import UNMERGE_WARNING
from actors.kernel.invariants import ZERO_PAGES_MISMATCH
from actors.kernel.variants import proposed_fixes
from actors.pdeath import SUPERVISOR_PID_ENV
from ksmlab import kcov, live, picture
from shared_mem.segment import sweep_stale


@dataclass(frozen=True)
class Bug:
    scenario: str
    kinds: tuple[str, ...]            # report kinds that mean "found"
    time_limit: float = 20.0          # default seconds per run
    args: dict[str, str] = field(default_factory=dict)


# The historical bugs by variant name: the scenario that drives the workload, and the
# kind of report the bug produces in the kernel (KASAN, hung task, oops, bad page...).
BUGS: dict[str, Bug] = {
    "oom-deadlock": Bug("oom-deadlock", ("hung_task", "lockdep")),
    "munlock-exit-hang": Bug("munlock-exit-hang", ("hung_task",)),
    "stale-stable-nodes": Bug("stale-stable-nodes", ("bad_page", "integrity", "oops", "kasan_uaf")),
    "mmput-race": Bug("mmput-race", ("kasan_uaf",)),
    "rmap-no-anon-vma": Bug("rmap-no-anon-vma", ("bad_page", "integrity", "kasan_uaf"), 30.0),
    "cve-2011-2183": Bug("cve-2011-2183", ("oops",)),
    # Seed 002's causes one by one (`--bug all` runs the group above).
    "stale-stable-nodes:enter-behind-cursor": Bug("stale-stable-nodes", ("bad_page", "integrity", "oops")),
    "stale-stable-nodes:old-nodes": Bug("stale-stable-nodes-swap", ("bad_page", "integrity", "oops", "kasan_uaf"),
                                        30.0),
    "stale-stable-nodes:swapin-no-copy": Bug("stale-stable-nodes-swap", ("bad_page", "integrity", "oops"), 30.0),
}
ALL = ("oom-deadlock", "munlock-exit-hang", "stale-stable-nodes", "mmput-race", "rmap-no-anon-vma",
       "cve-2011-2183")

# Raw detector kinds -> the campaign's report kinds (one table, used by every view).
REPORT_KINDS: dict[str, str] = {
    "kasan": "kasan_uaf",
    "null-ptr-deref": "oops",
    "oops": "oops",
    "actor_died": "oops",
    "lockdep": "lockdep",
    "hung_task": "hung_task",
    "bad_page": "bad_page",
    "integrity": "integrity",
    "leak": "leak",
    "warning": "warning",          # a kernel WARN_ON: today's kernel reaches it too (docs/bugs)
}


# What ksmlab found in today's kernel (docs/bugs/README.md, "Findings"), by the start
# of the report titles the detectors give it; the finding's page says more.
KNOWN_FINDINGS: dict[str, str] = {
    UNMERGE_WARNING: "docs/bugs/README.md (a KSM page survives run=2 in a vma that is no longer VM_MERGEABLE)",
    ZERO_PAGES_MISMATCH: "docs/bugs/zero-pages-fork.md",
}


def known_finding(title: str) -> str | None:
    return next((doc for prefix, doc in KNOWN_FINDINGS.items() if title.startswith(prefix)), None)


def bug_kinds(variant: str) -> tuple[str, ...]:
    """The report kinds that mean a run with this variant found its bug ((): unknown)."""
    b = BUGS.get(variant) or BUGS.get(variant.split(":")[0])
    return b.kinds if b is not None else ()


def report_kind(rep: dict) -> str:
    """The campaign kind of one report; invariant reports are sorted by their title."""
    raw = rep.get("kind", "")
    if raw in REPORT_KINDS:
        return REPORT_KINDS[raw]
    if raw == "invariant":
        title = rep.get("title", "")
        if "KASAN" in title:
            return "kasan_uaf"
        if "Bad page" in title:
            return "bad_page"
        if "leak" in title.lower():
            return "leak"
        return "integrity"
    return raw or "oops"


@dataclass
class RunResult:
    bug: str
    seed: int
    run_dir: str
    seconds: float
    kinds: list[str]
    titles: list[str]
    t_first: float | None            # seconds from boot to the first report
    status: str                      # ok | reports | failed | timeout | crashed
    detail: str = ""
    chaos: dict[str, int] = field(default_factory=dict)   # stops and kills the run survived

    @property
    def known(self) -> list[str]:
        """Titles of reports that are ksmlab's known findings in today's kernel."""
        return [t for t in self.titles if known_finding(t)]

    def detected(self, bug: Bug, fixed: bool) -> bool:
        if fixed:
            new = [t for t in self.titles if not known_finding(t)]
            return bool(new) or self.status in ("timeout", "crashed")
        return any(k in bug.kinds for k in self.kinds)


RUN_MODULE = ("-m", "ksmlab.cli")  # a spawned run is `python -m ksmlab.cli run ...`
RUN_GRACE_S = 30.0  # a SIGTERMed run's cluster stop takes well under a second
TITLE_ROOM = "=" * 4096  # the run server's argument area, for its children's command lines


@dataclass(frozen=True)
class RunSpec:
    """What every run of a campaign shares: the options of its `ksmlab run` command."""

    fixed: bool = False
    time_limit: float | None = None     # None: the bug's own
    runs_root: str = "runs/stress"
    sched: str | None = None
    depth: int | None = None
    coverage: str | None = None         # a folder: each run records into it
    scenario: str | None = None         # None: the bug's own (soak: blind discovery)
    proposed: bool = True               # with --fixed: ksmlab's proposed fixes too
    chaos: float = 0.0                  # chaos events per second (run --chaos)
    scan: str | None = None             # run --scan (None: the default, batch)
    locks: str | None = None            # run --locks (None: the default, word)
    fork_server: bool = True            # False: run --no-fork-server
    fork_runs: bool = True              # False: --spawn-runs (each run a new interpreter)
    python: str = sys.executable

    def limit(self, bug_name: str) -> float:
        return self.time_limit or BUGS[bug_name].time_limit


def run_command(bug_name: str, seed: int, spec: RunSpec, run_dir: str,
                extra_args: dict[str, str] | None = None, coverage: str | None = None) -> list[str]:
    """The `ksmlab run` command line of one campaign run (coverage: this run's folder,
    instead of spec.coverage)."""
    bug = BUGS[bug_name]
    cmd = [spec.python, *RUN_MODULE, "run", spec.scenario or bug.scenario, "--json", "--stop-on-report",
           "--seed", str(seed), "--run-dir", run_dir, "--arg", f"seconds={spec.limit(bug_name)}"]
    for k, v in {**bug.args, **(extra_args or {})}.items():
        cmd += ["--arg", f"{k}={v}"]
    for v in [bug_name] if not spec.fixed else proposed_fixes() if spec.proposed else []:
        cmd += ["--variant", v]
    if spec.sched:
        cmd += ["--sched", spec.sched]
    if spec.depth:
        cmd += ["--depth", str(spec.depth)]
    if coverage or spec.coverage:
        cmd += ["--coverage", os.path.abspath(coverage or spec.coverage or "")]
    if spec.chaos:
        cmd += ["--chaos", str(spec.chaos)]
    for name in ("scan", "locks"):
        if getattr(spec, name):
            cmd += [f"--{name}", getattr(spec, name)]
    if not spec.fork_server:
        cmd += ["--no-fork-server"]
    return cmd


class RunForker:
    """The campaign's run fork server (ksmlab/runfork.py): fork() gives a run whose
    wait(), poll() and pid are Popen's, in a process group of its own."""

    def __init__(self, runs_root: str) -> None:
        env = {**os.environ, SUPERVISOR_PID_ENV: str(os.getpid())}
        self.server = zygote.ForkServer("", env, os.path.join(runs_root, "runfork.stderr"),
                                        cmd=[sys.executable, "-m", "ksmlab.runfork", str(RUN_GRACE_S), TITLE_ROOM])
        self._n = 0
        self._lock = threading.Lock()

    def fork(self, argv: list[str], out: str, err: str) -> zygote.ForkedProcess:
        with self._lock:
            self._n += 1
            name = f"ksmlab-run-{self._n}"  # the server answers by name: one per run
        return self.server.fork(name, argv, out, err, session=True)

    def close(self) -> None:
        self.server.close(timeout=RUN_GRACE_S + 5)


@contextlib.contextmanager
def run_pool(spec: RunSpec, jobs: int) -> Iterator[tuple[ThreadPoolExecutor, RunForker | None]]:
    """A campaign's `jobs` run threads and its RunForker (None where its runs must each
    start a new interpreter: --spawn-runs, or another Python than this one's). A campaign
    interrupted (Ctrl-C) starts no more runs, and the server's close SIGTERMs the ones
    still going: each stops its cluster and leaves nothing behind."""
    forker = None
    if spec.fork_runs and os.path.realpath(spec.python) == os.path.realpath(sys.executable):
        os.makedirs(spec.runs_root, mode=0o700, exist_ok=True)
        forker = RunForker(spec.runs_root)
    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        yield pool, forker
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        if forker is not None:
            forker.close()
        pool.shutdown()


def run_one(bug_name: str, seed: int, spec: RunSpec, extra_args: dict[str, str] | None = None,
            coverage: str | None = None, forker: RunForker | None = None) -> RunResult:
    """One seeded run of a bug's scenario (or spec.scenario: blind discovery by the soak)
    in its own process group, bounded in time: forked by `forker`, else spawned."""
    tag = "fixed" if spec.fixed else "variant"
    scen = spec.scenario or BUGS[bug_name].scenario
    label = bug_name if spec.scenario is None else f"{bug_name}-{os.path.basename(scen).removesuffix('.py')}"
    run_dir = os.path.abspath(os.path.join(spec.runs_root, f"{label.replace(':', '_')}-{tag}-{seed}"))
    cmd = run_command(bug_name, seed, spec, run_dir, extra_args, coverage)
    time_limit = spec.limit(bug_name)
    t0 = time.monotonic()
    # The run's stderr and its result line stay in its folder: a run that failed a check
    # or died without a result can be read afterwards, not only replayed.
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    err_path, out_path = os.path.join(run_dir, "run.stderr"), os.path.join(run_dir, "run.stdout")
    if forker is not None:
        for path in (out_path, err_path):  # a folder used again: only this run's output counts
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # (the child appends; a spawned run's files are opened "wb")
        p: subprocess.Popen | zygote.ForkedProcess = forker.fork(cmd[1 + len(RUN_MODULE):], out_path, err_path)
    else:
        with open(err_path, "wb") as err, open(out_path, "wb") as out:
            p = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        p.wait(timeout=time_limit + 60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        sweep_stale()
        live.sweep_socket_dirs()
        return RunResult(bug_name, seed, run_dir, round(time.monotonic() - t0, 2), [], [], None,
                         "timeout", f"killed after {time_limit + 60:.0f} s")
    secs = round(time.monotonic() - t0, 2)
    try:
        with open(out_path, encoding="utf-8", errors="replace") as f:
            last = f.read().strip().splitlines()[-1]
        res = json.loads(last)
    except (OSError, ValueError, IndexError):
        return RunResult(bug_name, seed, run_dir, secs, [], [], None, "crashed",
                         f"exit {p.returncode}, no JSON result (see {run_dir}/run.stderr)")
    with contextlib.suppress(OSError), open(os.path.join(run_dir, "result.json"), "w") as f:
        f.write(last + "\n")
    reps = res.get("reports") or []
    kinds = [report_kind(r) for r in reps]
    t_first = min((r.get("t_s") for r in reps if r.get("t_s") is not None), default=None)
    status = "reports" if reps else ("ok" if res.get("ok") else "failed")
    return RunResult(bug_name, seed, run_dir, secs, kinds, [r.get("title", "") for r in reps], t_first,
                     status, res.get("failed") or "", dict(res.get("chaos") or {}))


def summarize(bug_name: str, fixed: bool, results: list[RunResult]) -> dict[str, Any]:
    bug = BUGS[bug_name]
    hits = sorted((r for r in results if r.detected(bug, fixed)), key=lambda r: r.seed)
    times = [r.t_first for r in hits if r.t_first is not None]
    kinds = sorted({k for r in results for k in r.kinds})
    return {
        "fixed": fixed,
        "runs": len(results),
        "detected": len(hits),
        "first_seed": hits[0].seed if hits else None,
        "median_s_to_detect": round(statistics.median(times), 2) if times else None,
        "median_run_s": round(statistics.median(r.seconds for r in results), 2) if results else None,
        "report_kinds": kinds,
        "run_dirs": [r.run_dir for r in sorted(results, key=lambda r: r.seed)],
        "failing_runs": [r.run_dir for r in hits],
        "not_ok": sorted({r.status for r in results if r.status not in ("ok", "reports")}),
        "known_findings": sum(1 for r in results if r.known),
        **({"chaos": {k: sum(r.chaos.get(k, 0) for r in results) for k in ("stops", "kills")}}
           if any(r.chaos for r in results) else {}),
    }


class _Progress:
    """A progress bar and a live per-bug tally on stderr."""

    def __init__(self, total: int, fixed: bool) -> None:
        self.total, self.done, self.fixed = total, 0, fixed
        self.tally: dict[str, list[int]] = {}
        self.lock = threading.Lock()
        self.tty = sys.stderr.isatty()

    def update(self, r: RunResult, hit: bool) -> None:
        with self.lock:
            self.done += 1
            t = self.tally.setdefault(r.bug, [0, 0])
            t[0] += hit
            t[1] += 1
            width = 24
            filled = width * self.done // self.total
            bar = "#" * filled + "." * (width - filled)
            tally = "  ".join(f"{b} {h}/{n}" for b, (h, n) in self.tally.items())
            what = ",".join(sorted(set(r.kinds))) or r.status
            when = f" at {r.t_first:.1f} s" if r.t_first is not None else ""
            why = f" [{r.detail[:80]}]" if r.status in ("failed", "crashed", "timeout") and r.detail else ""
            line = (f"[{bar}] {self.done}/{self.total}  {r.bug} seed {r.seed}: {what}{when}{why} "
                    f"({r.seconds:.1f} s)  | {tally}")
            sys.stderr.write(line + "\n")
            sys.stderr.flush()


def campaign(bugs: list[str], spec: RunSpec, runs: int, jobs: int, seed: int) -> dict[str, Any]:
    os.makedirs(spec.runs_root, mode=0o700, exist_ok=True)
    work = [(b, seed + i) for b in bugs for i in range(runs)]
    prog = _Progress(len(work), spec.fixed)
    results: dict[str, list[RunResult]] = {b: [] for b in bugs}
    t0 = time.monotonic()
    with run_pool(spec, jobs) as (pool, forker):
        futs = {pool.submit(run_one, b, s, spec, None, None, forker): b for b, s in work}
        for f in as_completed(futs):
            r = f.result()
            results[r.bug].append(r)
            prog.update(r, r.detected(BUGS[r.bug], spec.fixed))
    return {"bugs": {b: summarize(b, spec.fixed, rs) for b, rs in results.items()}, "scenario": spec.scenario,
            "proposed_fixes": proposed_fixes() if spec.fixed and spec.proposed else [], "seed": seed,
            "sched": spec.sched or "pct", "depth": spec.depth or 3, "chaos": spec.chaos,
            "scan": spec.scan or "batch", "locks": spec.locks or "word",
            "seconds": round(time.monotonic() - t0, 1)}


def guided(bug_name: str, spec: RunSpec, runs: int, jobs: int, seed: int,
           p_mutate: float = 0.5) -> dict[str, Any]:
    """A coverage-guided campaign, syzkaller's way: a seed whose run reached a kernel-path
    arc no earlier run reached joins the corpus, and later runs mutate a corpus entry
    (same configuration, drawn from the parent's seed through `knob_seed`; new workload
    and schedule from their own seed) instead of drawing a fresh one. Runs go in waves
    of `jobs`, since the next wave's choices depend on what this one reached."""
    rng = random.Random(seed ^ 0x5359)
    corpus: list[int] = []
    seen: set[tuple[str, int, int]] = set()
    growth: list[dict[str, Any]] = []
    results: list[RunResult] = []
    assert spec.coverage, "a guided campaign needs a coverage folder"
    coverage = spec.coverage
    prog = _Progress(runs, spec.fixed)
    i = 0
    with run_pool(spec, jobs) as (pool, forker):
        while i < runs:
            wave = []
            for _ in range(min(jobs, runs - i)):
                s = seed + i
                parent = rng.choice(corpus) if corpus and rng.random() < p_mutate else None
                extra = {"knob_seed": str(parent)} if parent is not None else {}
                cdir = os.path.join(coverage, f"run-{s}")
                wave.append((s, parent, cdir, pool.submit(run_one, bug_name, s, spec, extra, cdir, forker)))
                i += 1
            for s, parent, cdir, fut in wave:
                r = fut.result()
                results.append(r)
                prog.update(r, r.detected(BUGS[bug_name], spec.fixed))
                arcs = kcov.arcs_reached(cdir) if os.path.isdir(cdir) else set()
                new = arcs - seen
                seen |= arcs
                if new:
                    corpus.append(parent if parent is not None else s)
                growth.append({"seed": s, "parent": parent, "new_arcs": len(new), "total_arcs": len(seen)})
    return {"summary": summarize(bug_name, spec.fixed, results), "corpus": corpus, "growth": growth}


def main(a: argparse.Namespace) -> int:
    if a.bug == "all":
        bugs = list(ALL)
    elif a.bug in BUGS:
        bugs = [a.bug]
    else:
        print(f"ksmlab: no bug {a.bug!r}; known: {', '.join(BUGS)}, all", file=sys.stderr)
        return 2
    if a.runs < 1 or a.jobs < 1 or (a.time_limit is not None and a.time_limit <= 0):
        print("ksmlab: --runs, --jobs and --time-limit must be positive", file=sys.stderr)
        return 2
    if a.chaos is not None and not 0 < a.chaos <= 100:
        print(f"ksmlab: EINVAL: --chaos {a.chaos}: a rate in events per second, above 0 and at most 100",
              file=sys.stderr)
        return 2
    spec = RunSpec(fixed=a.fixed, time_limit=a.time_limit, runs_root=a.runs_root, sched=a.sched,
                   depth=a.depth, coverage=a.coverage, scenario=a.scenario,
                   proposed=not a.without_proposed_fixes, chaos=a.chaos or 0.0,
                   scan=a.scan, locks=a.locks, fork_server=not a.no_fork_server,
                   fork_runs=not a.spawn_runs)
    seed = a.seed if a.seed is not None else secrets.randbelow(1 << 30)
    fixes = proposed_fixes() if a.fixed and not a.without_proposed_fixes else []
    what = "variant" if not a.fixed else "fixed" + (f" + proposed {', '.join(fixes)}" if fixes else "")
    sys.stderr.write(f"ksmlab stress: bugs {', '.join(bugs)}; {what}; "
                     f"{a.runs} runs each from seed {seed}; sched {a.sched or 'pct'}/{a.depth or 3}; "
                     + (f"chaos {spec.chaos:g}/s; " if spec.chaos else "")
                     + f"{a.jobs} at a time\n")
    if a.guided:
        if not a.coverage or len(bugs) != 1:
            print("ksmlab: --guided needs --coverage DIR and one --bug", file=sys.stderr)
            return 2
        t0 = time.monotonic()
        os.makedirs(a.runs_root, mode=0o700, exist_ok=True)
        g = guided(bugs[0], spec, a.runs, a.jobs, seed)
        out = {"bugs": {bugs[0]: g["summary"]}, "scenario": a.scenario, "seed": seed,
               "sched": a.sched or "pct", "depth": a.depth or 3, "corpus": g["corpus"], "growth": g["growth"],
               "seconds": round(time.monotonic() - t0, 1)}
        if not a.json:
            for row in g["growth"]:
                print(f"seed {row['seed']}" + (f" (mutant of {row['parent']})" if row["parent"] is not None else "")
                      + f": {row['new_arcs']} new arcs, {row['total_arcs']} in all")
            print(f"corpus: {g['corpus']}")
    else:
        out = campaign(bugs, spec, a.runs, a.jobs, seed)
    if a.coverage:
        rows = kcov.table(a.coverage)
        ksm_c = kcov.ksm_c_table(rows)
        out["coverage"] = {"reached": sum(r.reached for r in rows), "functions": len(rows),
                           "never_reached": [f"{r.module}.{r.name}" for r in rows if not r.reached],
                           "mm_ksm_c_never_reached": [r.kernel for r in ksm_c if r.status == "never reached"]}
        if not a.json:
            print(kcov.format_table(rows))
            print()
            print(kcov.format_ksm_c_table(ksm_c))
    # One page for the campaign: per bug the tally and its first failing run's picture.
    index = picture.write_campaign_index(out, a.runs_root)
    if index:
        out["index"] = index
    if a.json:
        print(json.dumps(out))
    else:
        print()
        print(f"{'bug':22} {'fixed':5} {'detected':>9} {'median s':>9}  first seed  kinds")
        for b, s in out["bugs"].items():
            med = "-" if s["median_s_to_detect"] is None else f"{s['median_s_to_detect']:.1f}"
            print(f"{b:22} {s['fixed']!s:5} {s['detected']:>4}/{s['runs']:<4} {med:>9}  "
                  f"{s['first_seed'] if s['first_seed'] is not None else '-':>10}  {','.join(s['report_kinds'])}")
            if s["failing_runs"]:
                print(f"    replay: ksmlab replay {s['failing_runs'][0]}")
            if s.get("chaos"):
                print(f"    chaos: {s['chaos']['stops']} actor stops, {s['chaos']['kills']} task kills")
            if s.get("known_findings"):
                print(f"    {s['known_findings']} run(s) reported a known finding of today's kernel "
                      "(docs/bugs/README.md), not counted")
        print(f"campaign: {out['seconds']} s")
        if index:
            print(f"index: {index}")
    if a.fixed:
        return 1 if any(s["detected"] for s in out["bugs"].values()) else 0
    return 0
