# The ksm_functional_tests.c ports (ksmlab/scenarios/ksm_functional.py): every test passes,
# which includes "no frame mapped twice" after each kind of unmerge and "the task reads back
# what it wrote" at each step; the counters the C tests look at are checked here as well.
from __future__ import annotations

import pytest

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

NAMES = ["unmerge", "unmerge_zero_pages", "unmerge_discarded", "prot_none", "prctl", "prctl_fork",
         "prctl_fork_exec", "prctl_unmerge", "fork_ksm_merging_page_count"]


def _checks(res: dict) -> dict[str, object]:
    return {c["what"]: c["got"] for c in res["checks"]}


@pytest.mark.parametrize("name", NAMES)
async def test_functional(run_builtin, name):
    res = await run_builtin(f"ksm-functional-{name}")
    assert res["ok"], res.get("failed")
    assert "skipped" not in res
    assert res["reports"] == []
    assert all(c["ok"] for c in res["checks"])
    checks = _checks(res)
    if name not in ("prctl",):
        # __mmap_and_merge_range() found merged pages (or the zero page took them).
        merged_checks = [w for w in checks if w.startswith("pages got merged")]
        assert merged_checks or name == "unmerge_zero_pages"
    if name in ("unmerge", "unmerge_discarded", "prot_none", "prctl_unmerge", "unmerge_zero_pages"):
        assert any("no frame mapped twice" in w for w in checks), checks
    if name == "unmerge_zero_pages":
        assert checks["ksm_zero_pages after merging"] == 512
        assert checks["ksm_zero_pages after MADV_UNMERGEABLE of the first half"] == 256
        assert checks["ksm_zero_pages after the write faults"] == 0
        assert res["ksm"]["ksm_zero_pages"] == 0
    if name == "prctl":
        assert checks["PR_GET_MEMORY_MERGE after setting 1"] == 1
        assert checks["PR_GET_MEMORY_MERGE after setting 0"] == 0
        assert checks["PR_SET_MEMORY_MERGE with arg3=1"] == "EINVAL"
        assert checks["PR_GET_MEMORY_MERGE with arg2=1"] == "EINVAL"
    if name == "prctl_fork":
        assert checks["child: PR_GET_MEMORY_MERGE"] == 1
        merged = res["result"]["child_merged"]
        # 512 equal pages with max_page_sharing 256: two KSM pages in a chain.
        assert (merged["pages_shared"], merged["pages_sharing"]) == (2, 510)
    if name == "prctl_fork_exec":
        assert checks["after exec: PR_GET_MEMORY_MERGE"] == 1
        merged = res["result"]["child_merged"]
        assert (merged["pages_shared"], merged["pages_sharing"]) == (2, 510)
    if name == "fork_ksm_merging_page_count":
        assert checks["child: ksm_merging_pages right after fork (not inherited)"] == 0
        assert res["result"]["parent_ksm_merging_pages"] == 512
