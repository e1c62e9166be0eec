"""What a stress campaign pays per run, with the fork servers and without them.

A campaign runs each seed as its own `ksmlab run`: a supervisor process, a cluster boot,
ksmd and the other kernel actors, the scenario's tasks. The scan is a small part of a
race run; start-up is most of the rest (docs/performance.md). This runs the same
campaign (`ksmlab stress --bug B --runs R --jobs J --seed S`) in three modes, in turn,
`--rounds` times each:
- "forked": the default, each run forked from the campaign's run fork server
  (ksmlab/runfork.py), and each run's actors from its cluster's (actors/zygote.py);
- "runs spawned": `--spawn-runs`, each run a new interpreter, its actors forked;
- "spawned": `--spawn-runs --no-fork-server`, every process a new interpreter.
It prints for each the campaign's seconds, runs per minute, CPU seconds per run (of every
process of its runs, from getrusage(RUSAGE_CHILDREN): each level reaps the one below) and
the median run's seconds by bug, and the ratios of the throughputs (>1: the first is faster). Every run must find
its bug in every mode, or the bench says which did not and exits 1: a faster campaign that
finds less is no gain.

    .venv/bin/python bench/bench_campaign.py [--bug all] [--runs 3] [--jobs 2] [--seed 7000]
        [--rounds 1] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ksmlab import stress

# mode -> (runs forked, actors forked)
MODES = {"forked": (True, True), "runs spawned": (False, True), "spawned": (False, False)}


def _children_cpu_s() -> float:
    """CPU seconds of this process's reaped descendants: each run, and what it reaped (its
    fork server, which reaped its actors), once the level above has waited for it."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def one_campaign(bugs: list[str], runs: int, jobs: int, seed: int, fork_runs: bool, fork_server: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="ksmlab-campaign-bench-") as root:
        spec = stress.RunSpec(runs_root=root, fork_server=fork_server, fork_runs=fork_runs)
        cpu = _children_cpu_s()
        t = time.monotonic()
        out = stress.campaign(bugs, spec, runs, jobs, seed)  # its run server is reaped before it returns
        wall = time.monotonic() - t
        cpu = _children_cpu_s() - cpu
    b = out["bugs"]
    n = sum(s["runs"] for s in b.values())
    return {
        "seconds": round(wall, 2),
        "runs": n,
        "detected": sum(s["detected"] for s in b.values()),
        "runs_per_min": round(60 * n / wall, 2),
        "cpu_s_per_run": round(cpu / n, 3),
        "median_run_s": {name: s["median_run_s"] for name, s in b.items()},
        "median_s_to_detect": {name: s["median_s_to_detect"] for name, s in b.items()},
        "not_ok": sorted({x for s in b.values() for x in s["not_ok"]}),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bug", default="all", help="a bug name or all")
    ap.add_argument("--runs", type=int, default=3, help="seeds per bug")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=7000)
    ap.add_argument("--rounds", type=int, default=1, help="campaigns per mode, alternating")
    ap.add_argument("--json", action="store_true", help="one JSON object at the end")
    a = ap.parse_args()
    bugs = list(stress.ALL) if a.bug == "all" else [a.bug]
    unknown = [b for b in bugs if b not in stress.BUGS]
    if unknown or a.runs < 1 or a.jobs < 1 or a.rounds < 1:
        print(f"bench_campaign: EINVAL: bug {unknown or a.bug}, runs/jobs/rounds must be positive", file=sys.stderr)
        return 2
    got: dict[str, list[dict]] = {m: [] for m in MODES}
    for _ in range(a.rounds):
        for mode, (fr, fs) in MODES.items():
            got[mode].append(one_campaign(bugs, a.runs, a.jobs, a.seed, fr, fs))
    rate = {m: statistics.median(c["runs_per_min"] for c in cs) for m, cs in got.items()}
    ratios = {"forked / runs spawned": round(rate["forked"] / rate["runs spawned"], 3),
              "runs spawned / spawned": round(rate["runs spawned"] / rate["spawned"], 3),
              "forked / spawned": round(rate["forked"] / rate["spawned"], 3)}
    res = {"bugs": bugs, "runs": a.runs, "jobs": a.jobs, "seed": a.seed, "rounds": a.rounds,
           "modes": got, "ratio": ratios}
    short = [f"{m}: {c['detected']}/{c['runs']}" for m, cs in got.items() for c in cs if c["detected"] < c["runs"]]
    if a.json:
        print(json.dumps(res))
    else:
        print(f"campaign: {', '.join(bugs)}; {a.runs} runs each from seed {a.seed}, {a.jobs} at a time")
        print(f"{'mode':12} {'seconds':>8} {'found':>7} {'runs/min':>9} {'CPU s/run':>9}  median run s: {' '.join(bugs)}")
        for m, cs in got.items():
            for c in cs:
                med = " ".join(f"{v}" for v in c["median_run_s"].values())
                print(f"{m:12} {c['seconds']:8.1f} {c['detected']:>3}/{c['runs']:<3} {c['runs_per_min']:9.1f} "
                      f"{c['cpu_s_per_run']:9.2f}  {med}")
        for what, r in ratios.items():
            print(f"ratio {what} (runs per minute): {r}")
    if short:
        print(f"bench_campaign: runs that did not find their bug: {'; '.join(short)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
