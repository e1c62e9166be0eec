# `ksmlab sim`: search, replay and shrink schedules of a scenario in one process.
#
#   ksmlab sim list
#   ksmlab sim SCENARIO [--variant V]... [--strategy pct|random|dfs] [--preemptions P]
#              [--schedules N] [--seed S] [--depth D] [--keep-going] [--json]
#   ksmlab sim SCENARIO [--variant V]... --replay SCHEDULE [--events] [--json]
#
# SCENARIO is a simulator scenario (ksmlab/sim/scenarios.py) or a race-lab bug name,
# which selects that bug's scenario. --variant reverts a fix (actors/kernel/variants.py);
# without it the scenario runs today's kernel. A search stops at its first failure
# (unless --keep-going), minimizes it, and prints the schedule string, the command that
# replays it, the CPU table of the interleaving and the report. Exit status: 0 when no
# schedule reported anything, 1 when one did, 2 on bad input (message on stderr).
from __future__ import annotations

import argparse
import json
import sys

from actors.kernel.variants import Variants
from ksmlab import trace
from ksmlab.sim.scenarios import BUG_SCENARIO, SCENARIOS, SimScenario
from ksmlab.sim.search import (
    STRATEGIES,
    BadSchedule,
    SearchResult,
    cpu_table,
    minimize,
    parse_schedule,
    preemptions,
    replay,
    search,
)
from ksmlab.sim.world import ScheduleResult, World
from ksmlab.stress import report_kind


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", help="a simulator scenario or race-lab bug name, or `list`")
    p.add_argument("--variant", action="append", default=[], help="revert this fix (repeatable)")
    p.add_argument("--strategy", default="dfs", choices=STRATEGIES)
    p.add_argument("--preemptions", type=int, default=2, help="dfs: the preemption bound P")
    p.add_argument("--schedules", type=int, default=10000, help="at most this many schedules")
    p.add_argument("--seed", type=int, default=1, help="pct/random: the seed of the first schedule")
    p.add_argument("--depth", type=int, default=3, help="pct: the bug depth d")
    p.add_argument("--keep-going", action="store_true", help="count every failing schedule")
    p.add_argument("--replay", metavar="SCHEDULE", help="run this schedule string exactly")
    p.add_argument("--no-minimize", action="store_true", help="print the failing schedule as found")
    p.add_argument("--events", action="store_true", help="with --replay: print every kernel event")
    p.add_argument("--trace", metavar="FILE", help="write the (failing or replayed) schedule as a "
                   "Trace Event Format file for ui.perfetto.dev")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def scenario_of(name: str) -> SimScenario:
    sc = SCENARIOS.get(name) or SCENARIOS.get(BUG_SCENARIO.get(name, ""))
    if sc is None:
        raise ValueError(f"unknown sim scenario {name!r}; known: {', '.join(SCENARIOS)} "
                         f"(or a bug name: {', '.join(sorted(BUG_SCENARIO))})")
    return sc


def _replay_cmd(sc: SimScenario, variants: Variants, schedule: str) -> str:
    vs = "".join(f" --variant {v}" for v in variants.names())
    return f"./run.sh sim {sc.name}{vs} --replay '{schedule}'"


def main(a: argparse.Namespace) -> int:
    if a.scenario == "list":
        for s in SCENARIOS.values():
            bug = (f"--variant {s.bug}" if s.bug else
                   f"today's kernel breaks it; --variant {s.fix} fixes it" if s.fix else "(no variant breaks it)")
            print(f"{s.name:30} {bug:50} {s.description}")
        return 0
    try:
        sc = scenario_of(a.scenario)
        variants = Variants(a.variant)
        if a.replay is not None:
            parse_schedule(a.replay)
        if a.schedules < 1 or a.preemptions < 0 or a.depth < 1:
            raise ValueError("--schedules and --depth must be at least 1, --preemptions at least 0")
    except (ValueError, BadSchedule) as e:
        print(f"ksmlab sim: EINVAL: {e}", file=sys.stderr)
        return 2
    world = World(sc, variants)
    try:
        if a.replay is not None:
            return _replay(a, world, sc, variants)
        return _search(a, world, sc, variants)
    finally:
        world.close()


def _write_trace(path: str, res: ScheduleResult, sc: SimScenario, schedule: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(trace.from_schedule(res, sc.name, schedule), f, separators=(",", ":"), default=str)


def _replay(a: argparse.Namespace, world: World, sc: SimScenario, variants: Variants) -> int:
    res = replay(world, a.replay, record=True)
    if a.trace:
        _write_trace(a.trace, res, sc, a.replay)
    fail = res.failure
    if a.json:
        print(json.dumps({"scenario": sc.name, "variants": variants.names(), "schedule": a.replay,
                          "steps": res.steps, "preemptions": preemptions(res.decisions),
                          "failure": None if fail is None else
                          {"report_kind": report_kind(fail), "title": fail.get("title"), "ctx": fail.get("ctx"),
                           "step": fail.get("step")},
                          "events": [[s, t, c, e, f] for s, t, c, e, f in res.events] if a.events else None},
                         default=str))
    else:
        print(f"sim {sc.name}  variants: {', '.join(variants.names()) or 'none (today)'}  replay {a.replay}")
        print(f"{res.steps} ops, {len(res.decisions)} decisions, {preemptions(res.decisions)} preemption(s)")
        if a.events:
            for step, t_ns, ctx, ev, fields in res.events:
                kv = " ".join(f"{k}={v}" for k, v in fields.items())
                print(f"  {t_ns / 1e6:10.3f} ms  op {step:6}  {ctx:>14}: {ev} {kv}")
        print(cpu_table(res))
        if fail is not None:
            print(f"\nFAIL: {report_kind(fail)}: {fail.get('title')}  (ctx {fail.get('ctx')}, op {fail.get('step')})")
            print(fail.get("text", ""))
        else:
            print("\nno report")
    return 1 if fail is not None else 0


def _search(a: argparse.Namespace, world: World, sc: SimScenario, variants: Variants) -> int:
    r: SearchResult = search(world, a.strategy, seed=a.seed, schedules=a.schedules, bound=a.preemptions,
                             depth=a.depth, keep_going=a.keep_going)
    minimized = None
    if r.first is not None and not a.no_minimize:
        minimized = minimize(world, r.first.schedule)
        r.extra["minimized"] = minimized
    if a.json:
        print(json.dumps(r.to_json()))
        return 1 if r.failures else 0
    what = f"P <= {a.preemptions}" if a.strategy == "dfs" else f"seed {a.seed}" + (
        f", depth {a.depth}" if a.strategy == "pct" else "")
    print(f"sim {sc.name}  variants: {', '.join(variants.names()) or 'none (today)'}  strategy: {a.strategy} ({what})")
    if r.first is None:
        if r.exhaustive:
            print(f"no report in {r.schedules} schedules: every schedule within {a.preemptions} preemption(s) "
                  f"explored (exhaustive), {r.seconds:.2f} s")
        else:
            print(f"no report in {r.schedules} schedules ({r.seconds:.2f} s; not exhaustive)")
        return 0
    f = r.first
    print(f"FAIL at schedule {f.index} of {r.schedules} ({r.seconds:.2f} s): {f.report_kind}: {f.title}")
    print(f"  in {f.ctx} at op {f.step}, {f.preemptions} preemption(s)")
    sched = minimized or f.schedule
    print(f"schedule: {f.schedule}" + (f"   minimized: {minimized}" if minimized and minimized != f.schedule else ""))
    print(f"replay:   {_replay_cmd(sc, variants, sched)}")
    res = replay(world, sched, record=bool(a.trace))
    if a.trace:
        _write_trace(a.trace, res, sc, sched)
        print(f"trace:    {a.trace} (open in https://ui.perfetto.dev)")
    print()
    print(cpu_table(res))
    if res.failure is not None:
        print()
        print(res.failure.get("text", ""))
    return 1
