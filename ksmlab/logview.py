# `ksmlab log`: query a run's merged timeline.
#
# The per-process JSON-lines files are the source of truth; this merges them by
# (monotonic ns, pid, seq) and filters by event name, actor or text, printing a
# compact table (time since boot, actor, event, fields) or JSON lines.
from __future__ import annotations

import argparse
import fnmatch
import glob
import json
import os
import sys
from collections import Counter

from actors.log import read_events

_STAMP = {"run_id", "seed", "actor", "pid", "ts_ns", "seq", "event", "tid"}


def _newest_run(root: str = "runs") -> str | None:
    runs = [d for d in glob.glob(os.path.join(root, "*")) if os.path.isdir(os.path.join(d, "logs"))]
    return max(runs, key=os.path.getmtime) if runs else None


def _match(value: str, patterns: list[str] | None) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(value, p) for p in patterns)


def main(a: argparse.Namespace) -> int:
    run = a.run or _newest_run()
    if not run or not os.path.isdir(os.path.join(run, "logs")):
        print("ksmlab: no run folder with logs found", file=sys.stderr)
        return 2
    events = read_events(run)
    t0 = events[0]["ts_ns"] if events else 0
    shown = 0
    counts: Counter = Counter()
    for e in events:
        name = e.get("event", "")
        if a.no_locks and name.startswith("lock_"):
            continue
        if not _match(name, a.event) or not _match(e.get("actor", ""), a.actor):
            continue
        line = json.dumps(e, separators=(",", ":"))
        if a.grep and a.grep not in line:
            continue
        if a.summary:
            counts[(e.get("actor", "?"), name)] += 1
            continue
        if a.json:
            print(line)
        else:
            fields = " ".join(f"{k}={v}" for k, v in e.items() if k not in _STAMP)
            print(f"{(e['ts_ns'] - t0) / 1e9:12.6f} {e.get('actor', '?'):>14}/{e.get('pid', 0):<7} "
                  f"{name:26} {fields}")
        shown += 1
        if a.limit and shown >= a.limit:
            break
    if a.summary:
        for (actor, name), n in sorted(counts.items()):
            print(f"{n:9} {actor:16} {name}")
    return 0
