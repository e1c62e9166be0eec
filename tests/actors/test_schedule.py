# The seeded schedule plan (actors/kernel/schedule.py), called directly: no processes.
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

from actors.kernel.schedule import (
    SCHED_POINTS,
    ContextPlan,
    PlanSpec,
    SchedPlan,
    UnknownPoint,
    check_points,
    context_seed,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _ops(n: int) -> list[tuple[str, bool]]:
    """A ksmd-like op stream: lock ops with a named point every few ops."""
    out = []
    for i in range(n):
        if i % 7 == 6:
            out.append(("scan_get_next_rmap_item.before_up_read", True))
        else:
            out.append(("ksm_mmlist_lock" if i % 2 else "mmap_lock", False))
    return out


def _decisions(spec: PlanSpec, label: str, ops: list[tuple[str, bool]], dt: float = 0.001) -> list[float]:
    clock = FakeClock()
    cp = ContextPlan(spec, label, clock=clock)
    out = []
    for site, point in ops:
        clock.t += dt
        d = cp(site, point)
        clock.t += d
        out.append(d)
    return out


def test_every_point_in_the_code_is_declared_and_every_declared_point_is_used():
    used: set[str] = set()
    for path in (ROOT / "actors").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "point" and node.args
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                used.add(node.args[0].value)
    assert used - set(SCHED_POINTS) == set(), "k.point() names missing from SCHED_POINTS"
    assert set(SCHED_POINTS) - used == set(), "SCHED_POINTS entries no kernel path calls"


def test_same_seed_same_decisions_other_seed_other_decisions():
    ops = _ops(20000)
    a = _decisions(PlanSpec(seed=7), "ksmd", ops)
    b = _decisions(PlanSpec(seed=7), "ksmd", ops)
    c = _decisions(PlanSpec(seed=8), "ksmd", ops)
    assert a == b
    assert a != c
    assert any(a), "a PCT plan over 20000 ops delays somewhere"


def test_contexts_draw_independently_and_stably():
    assert context_seed(1, "ksmd") == context_seed(1, "ksmd")
    assert context_seed(1, "ksmd") != context_seed(1, "exit:0")
    # The decisions of one context do not depend on other contexts using the plan.
    frozen = FakeClock()   # the budget reads the clock; freeze it for both plans
    plan = SchedPlan(PlanSpec(seed=3), clock=frozen)
    for _ in range(500):
        plan.delay("exit:0", "ksm_mmlist_lock", False)
    alone = SchedPlan(PlanSpec(seed=3), clock=frozen)
    got = [plan.delay("ksmd", s, p) > 0 for s, p in _ops(3000)]
    ref = [alone.delay("ksmd", s, p) > 0 for s, p in _ops(3000)]
    assert got == ref


def test_pct_starves_at_change_points_and_they_favour_named_points():
    spec = PlanSpec(seed=5, depth=3)
    ops = _ops(50000)
    ds = _decisions(spec, "ksmd", ops)
    long_ = [ops[i][1] for i, d in enumerate(ds) if d >= spec.starve_min_s and d > spec.short_max_s]
    assert long_, "change points starve the context"
    # One op in 7 is a named point, but it weighs point_weight steps: most starvations land there.
    assert sum(long_) / len(long_) > 0.6


def test_depth_one_has_no_change_points():
    spec = PlanSpec(seed=5, depth=1)
    ds = _decisions(spec, "ksmd", _ops(30000))
    assert max(ds) <= spec.short_max_s


def test_delay_share_is_bounded():
    spec = PlanSpec(seed=9, share=0.2)
    clock = FakeClock()
    cp = ContextPlan(spec, "ksmd", clock=clock)
    for site, point in _ops(100000):
        clock.t += 0.0001
        clock.t += cp(site, point)
    assert cp.delayed <= spec.share * clock.t + spec.starve_max_s + 1e-9


def test_an_idle_context_cannot_spend_its_budget_in_one_burst():
    spec = PlanSpec(seed=9)
    clock = FakeClock()
    cp = ContextPlan(spec, "ctl:0", clock=clock)
    clock.t = 600.0                        # ten minutes idle, then a long critical section
    start = cp.delayed
    for site, point in _ops(200000):
        clock.t += 1e-6                    # the ops themselves take (nearly) no time
        clock.t += cp(site, point)
    span = clock.t - 600.0
    assert cp.delayed - start <= spec.burst_s + spec.share * span + 1e-9


def test_none_never_delays_and_random_has_no_starvation():
    assert not any(_decisions(PlanSpec(seed=1, strategy="none"), "ksmd", _ops(5000)))
    rnd = _decisions(PlanSpec(seed=1, strategy="random"), "ksmd", _ops(20000))
    assert any(rnd) and max(rnd) <= PlanSpec(seed=1).random_max_s


@pytest.mark.parametrize("bad", [{"strategy": "fifo"}, {"depth": 0}, {"share": 1.5}])
def test_bad_plan_options_are_refused(bad):
    with pytest.raises(ValueError):
        PlanSpec(seed=1, **bad)


def test_unknown_points_are_an_error_that_lists_the_points():
    check_points(["break_ksm"])
    with pytest.raises(UnknownPoint) as e:
        check_points(["break_ksm", "scan_get_next_rmap_item.befor_up_read"])
    assert "befor_up_read" in str(e.value)
    assert "scan_get_next_rmap_item.before_up_read" in str(e.value)


def test_cli_refuses_a_misspelt_point_with_exit_2():
    p = subprocess.run([sys.executable, "-m", "ksmlab.cli", "run", "idle", "--delay-at", "brek_ksm=10"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 2
    assert "unknown schedule point" in p.stderr and "break_ksm" in p.stderr
