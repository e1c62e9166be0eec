# The soak scenario in its short form: bounded in time and operations.
from __future__ import annotations

import os

import pytest

from actors.kernel.debug import UNMERGE_WARNING
from ksmlab.scenario import load_scenario, run_scenario

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(240)]

SECONDS = float(os.environ.get("KSMLAB_SOAK_SECONDS_TEST", 12))


@pytest.mark.parametrize("seed", [11, 12])
async def test_soak_short(tmp_path, seed):
    """Fork/write/exit/swap/OOM under a running ksmd: every check and invariant holds, no leak.

    Today's kernel with the proposed fix of the race ksmlab found in it: without the fix a
    fork now and then miscounts ksm_zero_pages, as the real kernel does
    (docs/bugs/zero-pages-fork.md), and the invariant check rightly says so."""
    res = await run_scenario(load_scenario("soak"), args={"seconds": SECONDS, "ops": 600},
                             seed=seed, run_dir=str(tmp_path / "soak"), variants=("fix:zero-pages-fork",))
    # The one report today's kernel itself can give here (docs/bugs/README.md, "Findings"):
    # remove_stable_node's WARN for a swap-cached KSM page faulted back after
    # MADV_UNMERGEABLE. Anything else, or any failed check before the last, fails the test.
    other = [r for r in res["reports"] if not (r["kind"] == "warning" and r["title"].startswith(UNMERGE_WARNING))]
    assert not other, [r["text"] for r in other]
    if not res["ok"]:   # only the final "no reports" check may have failed, on that warning
        assert res["reports"] and res["failed"].startswith("reports: got ["), res.get("failed")
    else:
        assert res["result"]["ops"] > 20
    whats = {c["what"] for c in res["checks"]}
    assert "leaks after teardown" in whats and any("invariants" in w for w in whats)

