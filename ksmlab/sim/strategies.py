# Scheduling strategies: who runs at each op where more than one context could.
#
#   pct     Probabilistic Concurrency Testing (Burckhardt et al. 2010, as shuttle's
#           PctScheduler does it): each context gets a distinct random priority of at
#           least `depth`; the highest-priority runnable context always runs; at d - 1
#           change points, steps drawn uniformly over the expected length of the run,
#           the running context drops to priority d - 1 - i. A bug of depth d is found
#           with probability at least 1 / (n * k^(d-1)) per schedule.
#   random  a uniformly random runnable context at every op (shuttle's RandomScheduler).
#   replay  the given deviations {step: tid}, and the default everywhere else: how a
#           printed schedule (any strategy's) is re-run exactly, and what the minimizer
#           and the depth-first search drive.
#
# The *default* at an op is the current context if it can go on, else the runnable
# context with the lowest id: a run of defaults is the non-preemptive schedule, and a
# schedule is fully described by the ops where it differs from the default. That list
# of deviations is the schedule string (ksmlab/sim/schedule_string.py).
from __future__ import annotations

import random

from ksmlab.sim.scheduler import Scheduler, SimThread


class Replay:
    name = "replay"

    def __init__(self, deviations: dict[int, int] | None = None) -> None:
        self.deviations = dict(deviations or {})

    def begin(self, sched: Scheduler) -> None:
        return None

    def choose(self, sched: Scheduler, step: int, cur: SimThread | None, runnable: list[SimThread],
               default: SimThread) -> SimThread:
        tid = self.deviations.get(step)
        if tid is not None:
            for x in runnable:
                if x.tid == tid:
                    return x
        return default


class RandomWalk:
    name = "random"

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def begin(self, sched: Scheduler) -> None:
        return None

    def choose(self, sched: Scheduler, step: int, cur: SimThread | None, runnable: list[SimThread],
               default: SimThread) -> SimThread:
        return runnable[self.rng.randrange(len(runnable))]


class PCT:
    name = "pct"

    def __init__(self, seed: int, depth: int = 3, expected_steps: int = 1000) -> None:
        if depth < 1:
            raise ValueError(f"depth {depth}: must be at least 1")
        self.rng = random.Random(seed)
        self.depth = depth
        self.expected_steps = max(1, expected_steps)
        self.prio: dict[int, int] = {}
        self.change: list[int] = []
        self.applied = 0

    def begin(self, sched: Scheduler) -> None:
        k = self.expected_steps
        self.change = sorted(self.rng.randint(1, k) for _ in range(self.depth - 1))
        self.applied = 0

    def _priority(self, t: SimThread) -> int:
        p = self.prio.get(t.tid)
        if p is None:   # a context spawned during the run gets a fresh random priority
            p = self.prio[t.tid] = self.depth + self.rng.randrange(1 << 20)
        return p

    def choose(self, sched: Scheduler, step: int, cur: SimThread | None, runnable: list[SimThread],
               default: SimThread) -> SimThread:
        while self.applied < len(self.change) and self.change[self.applied] <= step:
            if cur is not None:
                self._priority(cur)
                self.prio[cur.tid] = self.depth - 1 - self.applied
            self.applied += 1
        return max(runnable, key=lambda x: (self._priority(x), -x.tid))
