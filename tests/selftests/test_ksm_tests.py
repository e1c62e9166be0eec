# The ksm_tests.c ports (ksmlab/scenarios/ksm_tests.py): each scenario passes and reports, in
# "ksm", the counters the kernel selftest asserts; the command line reports the same in --json
# and exits non-zero, naming the expectation, when an expectation is wrong.
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from ksmlab.scenarios.ksm_tests import MPS_CASES, chain_counters, ksm_pages_count

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The numbers the kernel selftest expects (tools/testing/selftests/mm/ksm_tests.c).
EXPECTED = {
    "ksm-tests-M": {"pages_shared": 1, "pages_sharing": 9},
    "ksm-tests-U": {"pages_shared": 0, "pages_sharing": 0},
    "ksm-tests-Z0": {"pages_shared": 1, "pages_sharing": 9},
    "ksm-tests-Z1": {"pages_shared": 0, "pages_sharing": 0, "ksm_zero_pages": 10},
    "ksm-tests-N1": {"pages_shared": 1, "pages_sharing": 1},
    "ksm-tests-N0": {"pages_shared": 0, "pages_sharing": 0},
}

DEFAULT_TUNABLES = {"max_page_sharing": "256", "merge_across_nodes": "1", "sleep_millisecs": "20",
                    "pages_to_scan": "100", "run": "0", "stable_node_chains_prune_millisecs": "2000",
                    "use_zero_pages": "0"}


def _subset(d: dict, keys: dict) -> dict:
    return {k: d.get(k) for k in keys}


@pytest.mark.timeout(10)
def test_formula_matches_the_selftest_table():
    """assert_ksm_pages_count()'s two branches, with the defaults and with small limits."""
    assert ksm_pages_count(10, 256) == (1, 9)
    assert ksm_pages_count(2, 256) == (1, 1)
    assert ksm_pages_count(0, 256) == (0, 0)
    assert ksm_pages_count(10, 4) == (3, 7)   # measured on the real kernel: 3/7
    assert ksm_pages_count(9, 4) == (2, 6)    # 2/6 and one page left unshared
    assert ksm_pages_count(8, 4) == (2, 6)
    assert ksm_pages_count(10, 2) == (5, 5)
    assert chain_counters(9, 4) == {"pages_shared": 2, "pages_sharing": 6, "pages_unshared": 1,
                                    "stable_node_chains": 1, "stable_node_dups": 2}


@pytest.mark.timeout(10)
def test_fresh_zero_page_needs_two_visits():
    """A new rmap_item's oldchecksum is 0; the zero page's checksum must differ (as xxhash's
    does), or freshly faulted zero pages would skip the volatility filter and merge at once."""
    import numpy as np

    from shared_mem.pagecmp import PageCmp

    frames = np.zeros((2, 4096), dtype=np.uint8)
    cmp = PageCmp(frames)
    assert cmp.checksum(0) == cmp.zero_checksum != 0
    assert int(cmp.checksum_batch(np.array([0, 1]))[0]) == cmp.zero_checksum


@pytest.mark.asyncio
@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(set(EXPECTED) - {"ksm-tests-M"}))  # -M: through the CLI below
async def test_ksm_tests_mode(run_builtin, name):
    res = await run_builtin(name)
    assert res["ok"], res.get("failed")
    assert res["reports"] == []
    assert _subset(res["ksm"], EXPECTED[name]) == EXPECTED[name]
    assert _subset(res["result"]["asserted"], EXPECTED[name]) == EXPECTED[name]
    # ksm_restore() put every saved tunable back (a fresh cluster has the kernel defaults).
    assert res["result"]["tunables_after"] == DEFAULT_TUNABLES


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_max_page_sharing_sweep(run_builtin):
    res = await run_builtin("ksm-max-page-sharing")
    assert res["ok"], res.get("failed")
    assert res["reports"] == []
    got = res["result"]
    for mps, n in MPS_CASES:
        want = {**chain_counters(n, mps), "pages_volatile": 0}
        assert got[f"mps{mps}_n{n}"] == want, (mps, n)
    # What the real kernel reported with max_page_sharing=4 (shared, sharing, unshared).
    def triple(d: dict) -> tuple[int, int, int]:
        return d["pages_shared"], d["pages_sharing"], d["pages_unshared"]

    assert triple(got["mps4_n10"]) == (3, 7, 0)
    assert triple(got["mps4_n9"]) == (2, 6, 1)
    assert triple(got["mps4_n8"]) == (2, 6, 0)


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ksmlab.cli", "run", *args, "--no-trace-locks"],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(60)
def test_cli_json_reports_counters_at_the_last_check(tmp_path):
    p = _cli("ksm-tests-M", "--json", "--run-dir", str(tmp_path / "run"))
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["ok"] is True
    assert _subset(res["ksm"], EXPECTED["ksm-tests-M"]) == EXPECTED["ksm-tests-M"]
    assert res["checks"][-1]["what"].startswith("-M: assert_ksm_pages_count(10)")
    assert _subset(res["result"]["asserted"], EXPECTED["ksm-tests-M"]) == EXPECTED["ksm-tests-M"]
    assert res["result"]["tunables_after"] == DEFAULT_TUNABLES
    assert res["reports"] == []


@pytest.mark.timeout(60)
def test_cli_wrong_expectation_fails_and_names_it(tmp_path):
    """A port asserting for 11 pages where 10 merged: exit status 1, the expectation named."""
    wrong = tmp_path / "wrong_expectation.py"
    wrong.write_text(textwrap.dedent("""
        from ksmlab.scenarios.ksm_tests import OPTIONS, run_mode

        NAME = "ksm-tests-M-wrong"

        async def scenario(c, ctx):
            return await run_mode(c, ctx, "M", expect_count=11)
    """))
    p = _cli(str(wrong), "--run-dir", str(tmp_path / "run"))
    assert p.returncode == 1, p.stdout + p.stderr
    assert "FAIL" in p.stdout
    assert "assert_ksm_pages_count(11)" in p.stdout
    assert "'pages_sharing': 9" in p.stdout  # what the model got
    assert "'pages_sharing': 10" in p.stdout  # what the wrong expectation wanted
