# CVE-2011-2183 (LTP ksm05): the mm list emptied under ksmd at the start of a scan.
from __future__ import annotations

import pytest

from actors.log import read_events
from ksmlab.scenario import load_scenario, run_scenario

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]


async def test_emptied_list_is_rechecked(tmp_path):
    """Today ksmd re-checks the cursor after the advance and returns; the kernel lives.

        ksmd                                 exit path
        list_empty()? no
        [window]                             __ksm_exit fast path: last slot freed
        cursor = head->next == head  -> return NULL (no scan this time)
    """
    res = await run_scenario(load_scenario("cve-2011-2183"), run_dir=str(tmp_path / "r"), seed=21,
                             args={"seconds": 8})
    assert res["ok"], (res.get("failed"), [r["title"] for r in res["reports"]])
    # The window was really reached: ksmd saw the list emptied under it.
    assert any(e["event"] == "ksm_scan_list_emptied" and e["actor"] == "ksmd"
               for e in read_events(res["run_dir"]))


async def test_without_the_fix_ksmd_dereferences_the_list_head(tmp_path):
    """Fix reverted: ksmd takes ksm_mm_head for an mm_slot and uses its NULL mm."""
    res = await run_scenario(load_scenario("cve-2011-2183"), run_dir=str(tmp_path / "r"), seed=22,
                             variants=("cve-2011-2183",), stop_on_report=True, args={"seconds": 30})
    null = [r for r in res["reports"] if r["kind"] == "null-ptr-deref"]
    assert null, [r["title"] for r in res["reports"]]
    assert "NULL pointer dereference" in null[0]["title"]
    assert null[0]["data"]["actor"] == "ksmd"
