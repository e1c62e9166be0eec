"""The simulator's table: schedules to the first failure per strategy, exhaustive counts.

    .venv/bin/python bench/sim_table.py [--seeds N] [--bound P]

For every simulator scenario: with its variant on, the index of the first failing
schedule for pct and random (median over N seeds, the first seed's value when N = 1)
and for dfs; with today's code, the number of schedules a dfs to P preemptions explores
(and whether that was exhaustive). Prints a markdown table (docs/sim.md quotes it) and
the schedules per second the simulator ran. Run alone: it is one heavy job.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.kernel.variants import Variants
from ksmlab.sim.scenarios import SCENARIOS
from ksmlab.sim.search import search
from ksmlab.sim.world import World


def dfs_today(sc, schedules: int, bound: int):
    """The depth-first search of today's code (for a race found in it: with its fix)."""
    w = World(sc, Variants(sc.clean()))
    try:
        return search(w, "dfs", schedules=schedules, bound=bound)
    finally:
        w.close()


def fixed_cell(f) -> str:
    return f"{f.schedules} ({'yes' if f.exhaustive else 'no'})" + (
        f", REPORT {f.first.report_kind}" if f.first else ", no report")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--bound", type=int, default=2)
    ap.add_argument("--schedules", type=int, default=20000)
    a = ap.parse_args()
    total_sched = 0
    t0 = time.monotonic()
    print(f"| scenario | `--variant` | report | pct | random | dfs | today: dfs P={a.bound} schedules (exhaustive) |")
    print("|---|---|---|---|---|---|---|")
    for name, sc in SCENARIOS.items():
        if sc.broken() is None:
            f = dfs_today(sc, a.schedules, a.bound)
            total_sched += f.schedules
            print(f"| {name} | (none) | | | | | {fixed_cell(f)} |")
            continue
        w = World(sc, Variants(sc.broken()))
        try:
            firsts: dict[str, list[int | None]] = {"pct": [], "random": []}
            kind = ""
            for st in ("pct", "random"):
                for seed in range(1, a.seeds + 1):
                    r = search(w, st, seed=seed, schedules=a.schedules)
                    total_sched += r.schedules
                    firsts[st].append(r.first.index if r.first else None)
            r = search(w, "dfs", schedules=a.schedules, bound=a.bound)
            total_sched += r.schedules
            dfs = r.first.index if r.first else None
            kind = r.first.report_kind if r.first else "none"
        finally:
            w.close()
        f = dfs_today(sc, a.schedules, a.bound)
        total_sched += f.schedules

        def cell(xs: list[int | None]) -> str:
            found = [x for x in xs if x is not None]
            if not found:
                return f"not found in {a.schedules}"
            med = statistics.median(found)
            miss = len(xs) - len(found)
            return f"{med:g}" + (f" ({miss} of {len(xs)} seeds: none)" if miss else "")

        fixed = fixed_cell(f)
        label = f"`{sc.bug}`" if sc.bug else f"(today; clean: `{sc.fix}`)"
        print(f"| {name} | {label} | {kind} | {cell(firsts['pct'])} | {cell(firsts['random'])} | "
              f"{dfs if dfs is not None else 'not found'} | {fixed} |")
    dt = time.monotonic() - t0
    print(f"\n{total_sched} schedules in {dt:.1f} s: {total_sched / dt:.0f} schedules/s "
          f"(pct and random: median over {a.seeds} seeds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
