# The soak scenario in its short form: bounded in time and operations.
from __future__ import annotations

import os

import pytest

from ksmlab.scenario import load_scenario, run_scenario

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(240)]

SECONDS = float(os.environ.get("KSMLAB_SOAK_SECONDS_TEST", 12))


@pytest.mark.parametrize("seed", [11, 12])
async def test_soak_short(tmp_path, seed):
    """Fork/write/exit/swap/OOM under a running ksmd: every check and invariant holds, no leak."""
    res = await run_scenario(load_scenario("soak"), args={"seconds": SECONDS, "ops": 600},
                             seed=seed, run_dir=str(tmp_path / "soak"))
    assert res["ok"], (res.get("failed"), [r["text"] for r in res["reports"]])
    assert res["result"]["ops"] > 20
    whats = {c["what"] for c in res["checks"]}
    assert "leaks after teardown" in whats and any("invariants" in w for w in whats)
