# `ksmlab stress` and `ksmlab replay` as a user runs them: real processes, small counts.
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from ksmlab.stress import BUGS, REPORT_KINDS, report_kind

ROOT = pathlib.Path(__file__).resolve().parents[1]
CAMPAIGN_KINDS = {"lockdep", "hung_task", "kasan_uaf", "oops", "bad_page", "integrity", "leak"}


def _ksmlab(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ksmlab.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, stdin=subprocess.DEVNULL)


def test_report_kinds_map_onto_the_campaign_kinds():
    assert set(REPORT_KINDS.values()) <= CAMPAIGN_KINDS
    for bug in BUGS.values():
        assert set(bug.kinds) <= CAMPAIGN_KINDS
    assert report_kind({"kind": "invariant", "title": "BUG: Bad page state"}) == "bad_page"
    assert report_kind({"kind": "invariant", "title": "BUG: leak after teardown"}) == "leak"
    assert report_kind({"kind": "kasan", "title": "BUG: KASAN: use-after-free in up_read"}) == "kasan_uaf"


def test_bad_campaign_arguments_exit_2():
    assert _ksmlab("stress", "--bug", "no-such-bug", "--runs", "1").returncode == 2
    assert _ksmlab("stress", "--bug", "mmput-race", "--runs", "0").returncode == 2
    r = _ksmlab("replay", "/nonexistent/run")
    assert r.returncode == 2 and "not a run folder" in r.stderr


@pytest.mark.timeout(300)
def test_stress_finds_mmput_race_and_replay_reproduces_it(tmp_path):
    r = _ksmlab("stress", "--bug", "mmput-race", "--runs", "2", "--time-limit", "30", "--seed", "500",
                "--runs-root", str(tmp_path / "runs"), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    s = out["bugs"]["mmput-race"]
    assert s["fixed"] is False and s["runs"] == 2
    assert s["detected"] >= 1, s
    assert "kasan_uaf" in s["report_kinds"]
    assert s["median_s_to_detect"] is not None and s["median_s_to_detect"] < 30
    assert len(s["run_dirs"]) == 2 and all(os.path.isdir(d) for d in s["run_dirs"])
    # The failing run records its seed and plan; replay runs it again with both.
    failing = s["failing_runs"][0]
    with open(os.path.join(failing, "cluster.json")) as f:
        recorded = json.load(f)["options"]
    rp = _ksmlab("replay", failing, "--run-dir", str(tmp_path / "replay"), "--json")
    res = json.loads(rp.stdout.strip().splitlines()[-1])
    assert res["seed"] == recorded["seed"]
    assert res["options"]["plan"] == recorded["plan"]
    assert res["options"]["variants"] == ["mmput-race"]
    assert any(rep["kind"] == "kasan" for rep in res["reports"]), [rep["title"] for rep in res["reports"]]


@pytest.mark.timeout(200)
def test_fixed_campaign_reports_nothing(tmp_path):
    r = _ksmlab("stress", "--bug", "cve-2011-2183", "--fixed", "--runs", "1", "--time-limit", "6",
                "--seed", "600", "--runs-root", str(tmp_path / "runs"), "--json")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    s = out["bugs"]["cve-2011-2183"]
    assert s["fixed"] is True and s["detected"] == 0 and s["report_kinds"] == [], s
    assert r.returncode == 0
