# Seeded schedule plans: the run's seed decides where each kernel context is delayed.
#
# What it models. A race shows only when one CPU is slow at the wrong moment: ksmd
# preempted between spin_unlock(ksm_mmlist_lock) and up_read(mmap_lock) (seed 003), or
# between list_empty() and taking the first slot (CVE-2011-2183). The kernel gets that
# slowness from preemption, interrupts and cache misses; ksmlab gets it from a plan,
# so a campaign over seeds explores windows instead of waiting for the OS scheduler
# to open them, and a seed that found a bug opens the same windows again on replay.
#
# The plan is consulted at every *schedule op* of a context: each named schedule point
# (k.point(NAME), the places the seed commits talk about) and each lock acquire and
# release (the LockSpace sched hook). It answers with a delay, which the context
# sleeps before it goes on. Strategies:
#
#   pct     PCT as in shuttle/Burckhardt et al., adapted to contexts we cannot stop:
#           every context gets a random priority from the seed; a low priority means
#           frequent short delays (it loses most races for the CPU); and `depth - 1`
#           priority change points per epoch, at steps drawn uniformly over the epoch,
#           where the context drops to the lowest priority and is starved for a long,
#           log-uniform time (rr's chaos mode starves a low-priority thread the same
#           way). Epochs repeat with log-uniform lengths, so one run of a few seconds
#           is many PCT iterations. Named points weigh more steps than a lock op, so
#           change points land on them often: they are where the windows are.
#   random  every op is delayed with a small fixed probability, log-uniform length, no
#           priorities (a baseline with the same delay budget).
#   none    no plan delays (uniform timing, only forced --delay-at windows).
#
# Every context draws from its own RNG, seeded by (run seed, context label), so its
# decisions depend only on the seed and on its own sequence of ops, not on how other
# processes happened to interleave. Each context spends at most `share` of its wall
# time in plan delays, and at most `burst_s` in one burst, so a plan slows a run down
# by a bounded factor and a hung-task report is never the plan's doing. The budget may veto a delay
# (it reads the clock), but every decision draws from the RNG whether or not it is
# vetoed, so the sequence of draws stays a function of the seed alone.
#
# This module is pure: no processes, no sockets. The actor shells install it (base.py),
# the simulator of the next issue can reuse the same decisions.
from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

# The named schedule points, one definition: kernel paths call k.point(NAME) with
# exactly these names (tests/actors/test_schedule.py checks the code against this table).
SCHED_POINTS: dict[str, str] = {
    "scan_get_next_rmap_item.before_cursor_advance":
        "ksmd checked list_empty(ksm_mm_head), has not yet moved the cursor (CVE-2011-2183)",
    "scan_get_next_rmap_item.after_cursor_advance": "ksmd just moved the cursor to the first slot",
    "scan_get_next_rmap_item.before_up_read":
        "2016 order: ksm_mmlist_lock dropped, mmap_lock still held (seed 003)",
    "scan_get_next_rmap_item.before_spin_unlock": "today's order: mmap_lock dropped, ksm_mmlist_lock held",
    "__ksm_exit.after_unlock": "__ksm_exit chose its path, before it frees the slot or takes the barrier",
    "__mmput.after_ksm_exit": "between ksm_exit and exit_mmap",
    "exit_mmap.unmap_vma": "exit_mmap between unmapping two vmas",
    "exit_mmap.before_free_pgtables": "exit_mmap before freeing vmas and page tables",
    "break_ksm": "break_ksm after one unshare fault, before the next",
    "wp_page_copy": "COW: the copy made, the new pte not yet installed",
    "try_to_merge_one_page.write_protected": "between write_protect_page and replace_page",
    "shrink_page.added_to_swap_cache": "reclaim: page in the swap cache, not yet unmapped",
    "shrink_page.writeback": "reclaim: pages written to swap, still in the swap cache, unmapped (seed 002)",
}

STRATEGIES = ("pct", "random", "none")


class UnknownPoint(ValueError):
    """A --delay-at name that is no schedule point (the message lists the points)."""


def check_points(names: Iterable[str]) -> None:
    bad = sorted(n for n in names if n not in SCHED_POINTS)
    if bad:
        raise UnknownPoint(f"unknown schedule point(s) {', '.join(bad)}; the points are:\n  "
                           + "\n  ".join(sorted(SCHED_POINTS)))


@dataclass(frozen=True)
class PlanSpec:
    """Everything a plan is derived from; written to cluster.json and printed."""

    seed: int
    strategy: str = "pct"
    depth: int = 3                    # PCT d: d - 1 priority change points per epoch
    epoch_min: int = 200              # epoch length in weighted steps, log-uniform
    epoch_max: int = 20000
    point_weight: int = 64            # a named point counts as this many steps
    short_min_s: float = 20e-6        # the frequent short delays of a low priority
    short_max_s: float = 0.004
    p_short_lock: float = 0.01        # at priority 0 (scaled by 1 - priority)
    p_short_point: float = 0.25
    starve_min_s: float = 0.005       # the long starvation at a change point
    starve_max_s: float = 0.35
    p_random_lock: float = 0.004      # strategy random
    p_random_point: float = 0.08
    random_max_s: float = 0.05
    share: float = 0.25               # at most this part of a context's time is delay
    burst_s: float = 0.5              # ... and at most this much of it in one burst

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown schedule strategy {self.strategy!r}; known: {', '.join(STRATEGIES)}")
        if not 1 <= self.depth <= 64:
            raise ValueError(f"depth {self.depth}: must be 1..64")
        if not 0 < self.share < 1:
            raise ValueError(f"share {self.share}: must be in (0, 1)")
        if self.burst_s < self.starve_max_s:
            raise ValueError(f"burst_s {self.burst_s}: must be at least starve_max_s {self.starve_max_s}")

    def describe(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PlanSpec:
        return cls(**d)


def context_seed(seed: int, label: str) -> int:
    """A stable 64-bit seed for one context (Python's hash() of a str is salted per process)."""
    h = hashlib.blake2b(f"{seed}/{label}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def _loguniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


class ContextPlan:
    """The decisions of one kernel context: call it at each op, sleep what it returns."""

    def __init__(self, spec: PlanSpec, label: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self.label = label
        self.rng = random.Random(context_seed(spec.seed, label))
        self.clock = clock
        self.t0 = clock()
        self.delayed = 0.0            # seconds of plan delay so far
        self.credit = spec.starve_max_s   # the budget's bucket (see __call__)
        self.last = self.t0
        self.ops = 0
        self.base_prio = self.rng.random()
        self.prio = self.base_prio
        self.epoch = 0
        self._new_epoch()

    def _new_epoch(self) -> None:
        s, rng = self.spec, self.rng
        self.epoch += 1
        self.step = 0
        self.epoch_len = int(_loguniform(rng, s.epoch_min, s.epoch_max))
        self.changes = sorted(rng.uniform(0, self.epoch_len) for _ in range(s.depth - 1))
        if self.epoch > 1:            # rr chaos: priorities are re-drawn from time to time
            self.base_prio = rng.random()
        self.prio = self.base_prio

    def __call__(self, site: str, point: bool) -> float:
        """The delay (seconds) before this context goes on past `site`."""
        s, rng = self.spec, self.rng
        self.ops += 1
        if s.strategy == "none":
            return 0.0
        d = 0.0
        if s.strategy == "random":
            if rng.random() < (s.p_random_point if point else s.p_random_lock):
                d = _loguniform(rng, s.short_min_s, s.random_max_s)
        else:
            self.step += s.point_weight if point else 1
            if self.changes and self.step >= self.changes[0]:
                self.changes.pop(0)
                self.prio = 0.0       # lowered below every other context: starve here
                d = _loguniform(rng, s.starve_min_s, s.starve_max_s)
            elif rng.random() < (1.0 - self.prio) * (s.p_short_point if point else s.p_short_lock):
                d = _loguniform(rng, s.short_min_s, s.short_max_s)
            if self.step >= self.epoch_len:
                self._new_epoch()
        if d <= 0.0:
            return 0.0
        # The budget, a leaky bucket: credit accrues at `share` seconds per second of the
        # context's life and is capped at `burst`, so a context that idled for a minute
        # cannot then spend twenty seconds of delay in one critical section.
        now = self.clock()
        self.credit = min(s.burst_s, self.credit + s.share * (now - self.last))
        self.last = now
        if d > self.credit:
            return 0.0
        self.credit -= d
        self.delayed += d
        return d


class SchedPlan:
    """One process's plan: a ContextPlan per kernel context label, made on first use."""

    def __init__(self, spec: PlanSpec, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self.clock = clock
        self._ctx: dict[str, ContextPlan] = {}

    def context(self, label: str) -> ContextPlan:
        cp = self._ctx.get(label)
        if cp is None:
            cp = self._ctx[label] = ContextPlan(self.spec, label, self.clock)
        return cp

    def delay(self, label: str, site: str, point: bool) -> float:
        return self.context(label)(site, point)
