# Searching schedules: PCT and random sampling, bounded-preemption depth-first search,
# exact replay, a minimizer, and how a schedule is printed.
#
# A schedule is the list of ops where it departs from the default (the current context
# goes on; when it cannot, the lowest-numbered runnable one goes), written
# "v1:STEP>TID,STEP>TID,..." (ops are numbered from 1; TIDs are the scenario's contexts
# in order, the CPU0/CPU1 columns of the table). The empty schedule "v1:" is the
# non-preemptive run. Whatever strategy found a failure, its schedule string replays it
# exactly, because nothing else decides anything (ksmlab/sim/scheduler.py).
#
# The depth-first search is loom's: each run records its decisions (ops where more than
# one context could go); the next run replays the longest prefix that still has an
# untried alternative, takes that alternative, and then runs on defaults. Choosing
# another context while the current one could go on costs one preemption; choosing
# among the runnable ones when the current one blocked, slept or ended is free. Every
# schedule within P preemptions is explored exactly once; with P = 2 most bugs that
# depend on one unlucky preemption (all the seeds' races) are inside the bound (Musuvathi
# and Qadeer, "Iterative context bounding", PLDI 2007). A replayed prefix that does not
# lead to the same decisions means the program is not deterministic: that is a bug of
# the simulator, and the search stops with an error rather than lie about coverage.
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ksmlab.sim.scheduler import Decision, Scheduler, SimError, SimThread
from ksmlab.sim.strategies import PCT, RandomWalk, Replay
from ksmlab.sim.world import ScheduleResult, World
from ksmlab.stress import report_kind

STRATEGIES = ("pct", "random", "dfs")
VERSION = "v1"


class Nondeterminism(SimError):
    """A replayed prefix took another path: the simulator lost determinism."""


class BadSchedule(ValueError):
    """A schedule string that does not parse (EINVAL at the CLI)."""


def schedule_string(decisions: list[Decision]) -> str:
    return f"{VERSION}:" + ",".join(f"{d.step}>{d.chosen}" for d in decisions if d.chosen != d.default)


def parse_schedule(s: str) -> dict[int, int]:
    head, _, body = s.strip().partition(":")
    if head != VERSION or not _:
        raise BadSchedule(f"schedule {s!r}: must start with {VERSION}:")
    out: dict[int, int] = {}
    for part in filter(None, body.split(",")):
        step, sep, tid = part.partition(">")
        if not sep or not step.isdigit() or not tid.isdigit():
            raise BadSchedule(f"schedule {s!r}: {part!r} is not STEP>TID")
        if int(step) in out:
            raise BadSchedule(f"schedule {s!r}: step {step} given twice")
        out[int(step)] = int(tid)
    return out


def preemptions(decisions: list[Decision]) -> int:
    return sum(1 for d in decisions if d.cur_runnable and d.chosen != d.default)


class _Prefix:
    """dfs: follow `prefix` (a tid per decision), then defaults."""

    name = "dfs"

    def __init__(self, prefix: list[int]) -> None:
        self.prefix = prefix
        self.i = 0

    def begin(self, sched: Scheduler) -> None:
        self.i = 0

    def choose(self, sched: Scheduler, step: int, cur: SimThread | None, runnable: list[SimThread],
               default: SimThread) -> SimThread:
        i = self.i
        self.i += 1
        if i < len(self.prefix):
            want = self.prefix[i]
            for x in runnable:
                if x.tid == want:
                    return x
            raise Nondeterminism(f"decision {i} at op {step}: context {want} is not runnable on replay")
        return default

    def check(self) -> None:
        """After the run: the whole prefix must have been replayed."""
        if self.i < len(self.prefix):
            raise Nondeterminism(f"the run made {self.i} decisions, the replayed prefix has {len(self.prefix)}")


@dataclass
class Failure:
    schedule: str
    report_kind: str
    title: str
    ctx: str
    step: int
    preemptions: int
    index: int                      # the schedule's number in the search, from 1

    def brief(self) -> dict:
        return {"schedule": self.schedule, "report_kind": self.report_kind}


@dataclass
class SearchResult:
    scenario: str
    variants: list[str]
    strategy: str
    preemptions: int | None
    schedules: int
    exhaustive: bool
    failures: int
    first: Failure | None
    seconds: float
    max_steps_seen: int = 0
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "variants": self.variants, "strategy": self.strategy,
                "preemptions": self.preemptions, "schedules": self.schedules, "exhaustive": self.exhaustive,
                "failures": self.failures, "first_failure": self.first.brief() if self.first else None,
                "first_failure_detail": asdict(self.first) if self.first else None,
                "seconds": round(self.seconds, 3), **self.extra}


def _failure(res: ScheduleResult, index: int) -> Failure:
    rep = res.failure or {}
    return Failure(schedule_string(res.decisions), report_kind(rep), rep.get("title", ""), rep.get("ctx", ""),
                   int(rep.get("step", res.steps)), preemptions(res.decisions), index)


def search(world: World, strategy: str, seed: int = 0, schedules: int = 1000, bound: int = 2,
           depth: int = 3, keep_going: bool = False, deadline_s: float | None = None) -> SearchResult:
    """Run up to `schedules` schedules of the world's scenario with one strategy."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    if schedules < 1:
        raise ValueError(f"schedules {schedules}: must be at least 1")
    if bound < 0:
        raise ValueError(f"preemptions {bound}: must be at least 0")
    t0 = time.monotonic()
    n = failures = 0
    first: Failure | None = None
    exhaustive = False
    longest = 0

    def done(res: ScheduleResult) -> bool:
        nonlocal n, failures, first, longest
        n += 1
        longest = max(longest, res.steps)
        if res.failure is not None:
            failures += 1
            if first is None:
                first = _failure(res, n)
            if not keep_going:
                return True
        return deadline_s is not None and time.monotonic() - t0 > deadline_s

    if strategy == "dfs":
        prefix: list[int] = []
        while n < schedules:
            strat = _Prefix(prefix)
            res = world.run(strat)
            strat.check()
            if done(res):
                break
            nxt = _next_prefix(res.decisions, bound)
            if nxt is None:
                exhaustive = True
                break
            prefix = nxt
    else:
        base = world.run(Replay())          # the non-preemptive run: its length sizes PCT's k
        if not done(base):
            while n < schedules:
                s = seed * 1_000_003 + n
                strat = (PCT(s, depth, max(base.steps, longest)) if strategy == "pct" else RandomWalk(s))
                if done(world.run(strat)):
                    break
    return SearchResult(world.scenario.name, world.variants.names(), strategy,
                        bound if strategy == "dfs" else None, n, exhaustive, failures, first,
                        time.monotonic() - t0, longest)


def _next_prefix(decisions: list[Decision], bound: int) -> list[int] | None:
    before = []
    p = 0
    for d in decisions:
        before.append(p)
        p += d.cur_runnable and d.chosen != d.default
    for i in range(len(decisions) - 1, -1, -1):
        d = decisions[i]
        order = [d.default, *(t for t in d.options if t != d.default)]
        for alt in order[order.index(d.chosen) + 1:]:
            if before[i] + (d.cur_runnable and alt != d.default) <= bound:
                return [x.chosen for x in decisions[:i]] + [alt]
    return None


def replay(world: World, schedule: str, record: bool = True) -> ScheduleResult:
    return world.run(Replay(parse_schedule(schedule)), record=record)


def minimize(world: World, schedule: str) -> str:
    """Drop deviations one at a time while the schedule still fails with the same kind."""
    res = replay(world, schedule, record=False)
    if res.failure is None:
        raise ValueError(f"schedule {schedule} does not fail")
    kind = report_kind(res.failure)
    dev = parse_schedule(schedule)
    changed = True
    while changed:
        changed = False
        for step in sorted(dev):
            trial = {s: t for s, t in dev.items() if s != step}
            r = world.run(Replay(trial))
            if r.failure is not None and report_kind(r.failure) == kind:
                # Keep the deviations the shorter run actually took, renumbered as it ran.
                dev = {d.step: d.chosen for d in r.decisions if d.chosen != d.default}
                changed = True
                break
    return f"{VERSION}:" + ",".join(f"{s}>{t}" for s, t in sorted(dev.items()))


def cpu_table(res: ScheduleResult, max_rows: int = 48) -> str:
    """The interleaving as a CPU0/CPU1 table: each context a column, each row an op; long
    runs of one context are folded, and preemptions are marked."""
    names = res.names
    preempt = {d.step for d in res.decisions if d.cur_runnable and d.chosen != d.default}
    rows: list[tuple[str, int, str]] = []
    segs: list[list[tuple[int, int, str, str]]] = []
    for op in res.trace:
        if segs and segs[-1][-1][1] == op[1]:
            segs[-1].append(op)
        else:
            segs.append([op])
    for seg in segs:
        tid = seg[0][1]
        show = seg if len(seg) <= 8 else [*seg[:3], None, *seg[-3:]]
        for op in show:
            if op is None:
                rows.append(("", tid, f"... {len(seg) - 6} ops ..."))
                continue
            step, _t, what, detail = op
            text = f"{what}({detail})" if detail else what
            rows.append((str(step), tid, text + ("  <- preempted" if step in preempt else "")))
    if res.failure is not None:
        ctx = res.failure.get("ctx", "")
        tid = names.index(ctx) if ctx in names else 0
        rows.append(("", tid, f"**{res.failure.get('title', '')}**"))
    if len(rows) > max_rows:
        cut = len(rows) - max_rows + 6
        rows = [*rows[:6], ("", -1, f"... {cut} rows ..."), *rows[6 + cut:]]
    head = "| op | " + " | ".join(f"CPU{i}: {n}" for i, n in enumerate(names)) + " |"
    sep = "|---|" + "---|" * len(names)
    lines = [head, sep]
    for step, tid, text in rows:
        cells = [""] * len(names)
        if tid < 0:
            cells = [text] + [""] * (len(names) - 1)
        else:
            cells[tid] = text.replace("|", "\\|")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
