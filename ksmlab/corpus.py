# The recorded differential corpus: random workloads with what the real kernel made of them.
#
# The live differential test (tests/realkernel/test_differential.py) needs a writable
# /sys/kernel/mm/ksm, so CI, which has none, never compares the model with the kernel. This
# module closes that gap: random_run(seed) draws a workload (1 to 4 processes; duplicated
# contents with 2 to 17 copies, unique and zero pages, shuffled) and the knobs to run it with
# (max_page_sharing small enough for chains and dups, use_zero_pages, smart_scan), and
# `python -m ksmlab.corpus record` runs each on this machine's kernel with
# ksmlab.realkernel's convergence rule and writes the converged counters, every
# process's /proc/PID/ksm_stat and how many pages ksmd had scanned by then to
# tests/data/differential_corpus.json. It then runs the same workload again with a
# pass cut into about four batches (step_pages) and stops ksmd after every batch to read
# the counters: `steps` are the counters at every step, not only where they settled.
# The file is checked
# in; tests/kernel/test_corpus.py replays every entry on the model, in process, and
# requires the same numbers. A workload is stored by its seed only, so the generator must
# never change what a seed draws: a test pins the first draws.
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

from ksmlab.realkernel import run_workload_report
from ksmlab.workloads import Workload, mix

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "data" / "differential_corpus.json"
# What is compared: the counters a workload decides, and each process's own view.
KEYS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "ksm_zero_pages",
        "stable_node_chains", "stable_node_dups")
STAT_KEYS = ("ksm_rmap_items", "ksm_merging_pages", "ksm_zero_pages")
# How far the kernel's ksmd had scanned when its counters were read (this run's share of
# the cumulative counters): converged counters of a smart-scan run depend on the pass
# (pages in a skip streak count as volatile), so the model is stopped at the same page.
STEP_KEYS = ("pages_scanned", "full_scans")
STEPS_MAX = 120    # snapshots kept per stepped recording (a smart-scan run settles slowly)


def random_run(seed: int) -> tuple[Workload, dict[str, int]]:
    """The workload and knobs of corpus entry `seed` (the same for ever)."""
    rng = random.Random(seed ^ 0xC0FFEE)
    n_procs = rng.choice([1, 2, 2, 3, 4])
    w = mix(f"corpus-{seed}", n_procs, dup_contents=rng.randrange(0, 20),
            copies_per_content=rng.choice([2, 3, 5, 9, 17]), unique_per_proc=rng.randrange(1, 24),
            zero_per_proc=rng.randrange(0, 12), seed=seed)
    knobs = {"max_page_sharing": rng.choice([2, 3, 4, 8, 256]), "use_zero_pages": rng.choice([0, 1]),
             "smart_scan": rng.choice([0, 1])}
    return w, knobs


def step_pages(w: Workload) -> int:
    """pages_to_scan of the stepped recording: a pass takes about four batches."""
    return max(4, (w.total_pages + 3) // 4)


def record(seeds: list[int], out: Path = CORPUS, log: Any = print) -> dict[str, Any]:
    """Run every seed's workload on this machine's kernel and write the corpus file."""
    entries = []
    for seed in seeds:
        w, knobs = random_run(seed)
        t0 = time.monotonic()
        r = run_workload_report(w, **knobs, timeout=120)
        entries.append({"seed": seed, "knobs": knobs, "pages": w.total_pages,
                        "pages_to_scan": max(100, w.total_pages),
                        # where ksmd stood at the snapshot: the model scans to the same page
                        **{k: int(r.counters[k]) - int(r.start_counters.get(k, 0)) for k in STEP_KEYS},
                        "kernel": {k: int(r.counters.get(k, 0)) for k in KEYS},
                        "ksm_stat": [{k: int(s.get(k, 0)) for k in STAT_KEYS} for s in r.proc_stats]})
        # The same workload again in short batches, the counters read after every one.
        batch = step_pages(w)
        # ksmd sleeps between batches, so that run=0 is written before the next one.
        r = run_workload_report(w, **knobs, pages_to_scan=batch, sleep_millisecs=20, timeout=120,
                                steps=True, max_steps=STEPS_MAX)
        entries[-1]["steps"] = {"pages_to_scan": batch, "columns": list(STEP_KEYS + KEYS),
                                "at": [[s[k] for k in STEP_KEYS + KEYS] for s in r.steps]}
        log(f"seed {seed}: {w.n_procs} processes, {w.total_pages} pages, {knobs}: "
            f"{entries[-1]['kernel']}, {len(r.steps)} steps of {batch} ({time.monotonic() - t0:.1f} s)")
    doc = {"kernel": platform.release(), "recorded": time.strftime("%Y-%m-%d"),
           "generator": "ksmlab.corpus.random_run", "entries": entries}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(_dumps(doc) + "\n")
    os.replace(tmp, out)
    return doc


def _dumps(doc: dict[str, Any]) -> str:
    """Indented JSON with every list of numbers on one line (a step is one row)."""
    text = json.dumps(doc, indent=1)
    return re.sub(r"\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]",
                  lambda m: "[" + ",".join(x.strip() for x in m.group(1).split(",")) + "]", text)


def load(path: Path = CORPUS) -> dict[str, Any]:
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ksmlab.corpus",
                                 description="record the differential corpus on this machine's kernel")
    ap.add_argument("command", choices=["record"])
    ap.add_argument("--n", type=int, default=60, help="number of workloads (seeds FIRST..FIRST+N-1)")
    ap.add_argument("--first", type=int, default=1, help="first seed (default 1: the checked-in corpus)")
    ap.add_argument("--out", type=Path, default=CORPUS)
    a = ap.parse_args(argv)
    if a.n < 1:
        print("python -m ksmlab.corpus: --n must be at least 1", file=sys.stderr)
        return 2
    if a.first < 0:
        print("python -m ksmlab.corpus: --first must not be negative", file=sys.stderr)
        return 2
    record(list(range(a.first, a.first + a.n)), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
