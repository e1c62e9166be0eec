# LTP ksm01 (ksmlab/scenarios/ltp_ksm01.py): the four phases give LTP's table of counters
# (read with run=0), the children read back their data after each phase and after run=2, and
# everything is 0 after run=2 and run=0.
from __future__ import annotations

import pytest

from ksmlab.scenarios.ltp_ksm01 import (
    DEFAULT_SIZE_MB,
    OPTIONS,
    PAGES_PER_MB,
    expected_table,
    frames_needed,
)


@pytest.mark.asyncio
@pytest.mark.timeout(90)
async def test_ltp_ksm01_default_size(run_builtin):
    res = await run_builtin("ltp-ksm01")
    assert res["ok"], res.get("failed")
    assert res["reports"] == []
    p = DEFAULT_SIZE_MB * PAGES_PER_MB * 3
    assert res["result"]["pages"] == p == 6144
    table = expected_table(p)
    for phase, seen in enumerate(res["result"]["phases"]):
        want = {k: v for k, v in table[phase].items() if k.startswith("pages_") and k != "pages_to_scan"}
        assert {k: seen[k] for k in want} == want, phase
    # The last check is the one after run=0: nothing shared, nothing left in the trees.
    last = res["checks"][-1]
    assert last["what"] == "run=0: counters" and last["ok"]
    assert (res["ksm"]["pages_shared"], res["ksm"]["pages_sharing"], res["ksm"]["pages_unshared"],
            res["ksm"]["pages_volatile"]) == (0, 0, 0, 0)
    # Every child verified its memory after every phase and after run=2.
    verified = [c for c in res["checks"] if "verifies memory content" in c["what"]]
    assert len(verified) == 3 * 4 and all(c["ok"] for c in verified)


@pytest.mark.timeout(10)
def test_ltp_ksm01_sizes_and_frames():
    """The default fits its OPTIONS; LTP's own size (128 MB, P = 98304) needs far more frames."""
    assert OPTIONS["frames"] >= frames_needed(DEFAULT_SIZE_MB) > 3 * DEFAULT_SIZE_MB * PAGES_PER_MB
    assert frames_needed(128) > 128 * PAGES_PER_MB * 3 == 98304
    assert expected_table(98304)[3] == {"pages_shared": 1, "pages_sharing": 98302, "pages_volatile": 0,
                                        "pages_unshared": 1, "sleep_millisecs": 0, "pages_to_scan": 98304}

