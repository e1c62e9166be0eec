# Differential check (issue 3, item 7): every standard workload mix runs on this machine's real
# KSM (ksmlab.realkernel.run_workload) and on ksmlab (ksmlab.workloads.run_on_ksmlab) under the
# same knobs and the same convergence rule, and the converged counters must be identical.
#
# The real-kernel half is opt-in (--realkernel / KSMLAB_REALKERNEL=1). The ksmlab half alone -
# the model converges to Workload.expected() for every mix - always runs.
from __future__ import annotations

import time

import pytest

from ksmlab.realkernel import ForeignMergeableMemory, run_workload
from ksmlab.workloads import (
    Workload,
    run_label,
    run_on_ksmlab,
    standard_runs,
)

#: Compared on every run (equal on both sides even where a mix leaves them at 0).
KEYS = (
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "ksm_zero_pages",
    "stable_node_chains",
    "stable_node_dups",
)




def exercised(w: Workload, knobs: dict[str, int]) -> tuple[str, ...]:
    """The counters this mix drives away from 0 (the ones the comparison is really about)."""
    want = w.expected(**knobs)
    return tuple(k for k in KEYS if want[k])


def test_every_standard_mix_exercises_the_basic_counters() -> None:
    for w, knobs in standard_runs():
        assert {"pages_shared", "pages_sharing"} <= set(exercised(w, knobs)), w.name
    seen = {k for w, knobs in standard_runs() for k in exercised(w, knobs)}
    assert set(KEYS) <= seen, f"no standard mix exercises {set(KEYS) - seen}"


@pytest.mark.asyncio
@pytest.mark.timeout(120)
@pytest.mark.parametrize("run", standard_runs(), ids=run_label)
async def test_ksmlab_matches_expected(run, tmp_path) -> None:
    """The model alone: converged counters equal Workload.expected() (always runs)."""
    w, knobs = run
    got = await run_on_ksmlab(w, run_dir=str(tmp_path / "run"), timeout=90, **knobs)
    want = w.expected(**knobs)
    assert {k: got[k] for k in KEYS} == want
    assert got["pages_volatile"] == 0


@pytest.mark.realkernel
@pytest.mark.asyncio
@pytest.mark.timeout(180)
@pytest.mark.parametrize("run", standard_runs(), ids=run_label)
async def test_ksmlab_matches_real_kernel(run, tmp_path, record_property) -> None:
    w, knobs = run
    t0 = time.monotonic()
    try:
        real = run_workload(w, timeout=60, **knobs)
    except ForeignMergeableMemory as e:
        pytest.skip(f"cannot measure the real kernel: {e}")
    t1 = time.monotonic()
    model = await run_on_ksmlab(w, run_dir=str(tmp_path / "run"), timeout=90, **knobs)
    t2 = time.monotonic()
    got_real = {k: real[k] for k in KEYS}
    got_model = {k: model[k] for k in KEYS}
    record_property("real", got_real)
    record_property("ksmlab", got_model)
    print(
        f"\n{run_label(run)}: pages={w.total_pages} exercises={','.join(exercised(w, knobs))}\n"
        f"  real   {got_real} volatile={real['pages_volatile']} "
        f"full_scans={real['full_scans']} ({t1 - t0:.2f}s)\n"
        f"  ksmlab {got_model} volatile={model['pages_volatile']} "
        f"full_scans={model['full_scans']} ({t2 - t1:.2f}s)"
    )
    for k in ("pages_shared", "pages_sharing", "pages_unshared"):
        assert got_model[k] == got_real[k], f"{k}: ksmlab {got_model[k]} != kernel {got_real[k]}"
    for k in exercised(w, knobs):
        assert got_model[k] == got_real[k], f"{k}: ksmlab {got_model[k]} != kernel {got_real[k]}"
    assert got_model == got_real
    assert model["pages_volatile"] == real["pages_volatile"] == 0
