# `ksmlab stress` and `ksmlab replay` as a user runs them: real processes, small counts.
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from actors.kernel.variants import proposed_fixes
from ksmlab.cli import build_parser
from ksmlab.stress import (
    BUGS,
    KNOWN_FINDINGS,
    REPORT_KINDS,
    RunResult,
    RunSpec,
    report_kind,
    run_command,
    run_pool,
)
from shared_mem.segment import list_segments, sweep_stale

ROOT = pathlib.Path(__file__).resolve().parents[1]
CAMPAIGN_KINDS = {"lockdep", "hung_task", "kasan_uaf", "oops", "bad_page", "integrity", "leak", "warning"}


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


def _result(*titles: str, status: str = "reports") -> RunResult:
    return RunResult("mmput-race", 1, "/r", 1.0, ["warning"] * len(titles), list(titles), 1.0 if titles else None,
                     status)


def test_a_fixed_campaign_counts_known_findings_apart_and_everything_else():
    bug = BUGS["mmput-race"]
    known = next(iter(KNOWN_FINDINGS)) + " (pfn:0x7f, in a vma without VM_MERGEABLE)"
    assert not _result(known).detected(bug, fixed=True) and _result(known).known == [known]
    assert _result(known, "BUG: KASAN: use-after-free in anon_vma_walk").detected(bug, fixed=True)
    assert _result(status="crashed").detected(bug, fixed=True)
    assert not _result(status="ok").detected(bug, fixed=True)
    # With the variant on only the bug's own kinds count, known finding or not.
    assert not _result(known).detected(bug, fixed=False)


def test_fixed_runs_carry_the_proposed_fixes_unless_told_not_to():
    def variants(cmd: list[str]) -> list[str]:
        return [cmd[i + 1] for i, a in enumerate(cmd) if a == "--variant"]

    assert proposed_fixes() and all(v.startswith("fix:") for v in proposed_fixes())
    assert variants(run_command("mmput-race", 1, RunSpec(fixed=True, time_limit=5), "/r")) == proposed_fixes()
    assert variants(run_command("mmput-race", 1, RunSpec(fixed=True, time_limit=5, proposed=False), "/r")) == []
    assert variants(run_command("mmput-race", 1, RunSpec(time_limit=5), "/r")) == ["mmput-race"]


def test_a_campaign_without_the_fork_server_says_so_to_each_run():
    assert "--no-fork-server" not in run_command("mmput-race", 1, RunSpec(time_limit=5), "/r")
    assert "--no-fork-server" in run_command("mmput-race", 1, RunSpec(time_limit=5, fork_server=False), "/r")
    a = build_parser().parse_args(["stress", "--bug", "mmput-race", "--no-fork-server"])
    assert a.no_fork_server


def test_a_campaign_forks_its_runs_unless_told_to_spawn_them(tmp_path):
    """The run fork server (ksmlab/runfork.py) runs what `python -m ksmlab.cli ARGV` would,
    its result on stdout and its errors on stderr, in files; --spawn-runs, or a campaign
    for another interpreter, starts each run as its own."""
    assert build_parser().parse_args(["stress", "--bug", "mmput-race", "--spawn-runs"]).spawn_runs
    for spec in (RunSpec(runs_root=str(tmp_path), fork_runs=False),
                 RunSpec(runs_root=str(tmp_path), python="/nonexistent/python3")):
        with run_pool(spec, 1) as (_, forker):
            assert forker is None
    with run_pool(RunSpec(runs_root=str(tmp_path / "runs")), 2) as (_, forker):
        assert forker is not None
        ok, bad = (forker.fork(argv, str(tmp_path / f"{n}.out"), str(tmp_path / f"{n}.err"))
                   for n, argv in enumerate((["scenarios"], ["run", "--no-such-option"])))
        assert ok.wait(timeout=60) == 0 and bad.wait(timeout=60) == 2
    assert "default" in (tmp_path / "0.out").read_text() and (tmp_path / "0.err").read_text() == ""
    assert "unrecognized arguments: --no-such-option" in (tmp_path / "1.err").read_text()
    assert forker.server.proc.returncode == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_a_campaign_killed_mid_run_leaves_nothing_behind(tmp_path, sig):
    """SIGKILL of the campaign: its run server dies with it (PR_SET_PDEATHSIG), the run
    gets SIGTERM from that death. Ctrl-C: the campaign starts no other run and closes the
    server, which SIGTERMs the run. Either way the run stops its cluster: no process,
    segment or socket folder of it is left."""
    root = tmp_path / "runs"
    p = subprocess.Popen([sys.executable, "-m", "ksmlab.cli", "stress", "--bug", "mmput-race", "--fixed",
                          "--runs", "3", "--time-limit", "30", "--seed", "700", "--runs-root", str(root)],
                         cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        cfg = None
        while cfg is None or not any(cfg.parent.joinpath("logs").glob("task-*")):
            assert time.monotonic() < deadline and p.poll() is None, "the run never started its tasks"
            time.sleep(0.05)
            cfg = next(root.glob("*/cluster.json"), None)
        c = json.loads(cfg.read_text())
        # The run's cluster forked its fork server from the run, and that server and
        # every actor still carry the run's config path (actors/proctitle.py): the
        # search below is the one that would find a leftover.
        sup = next(cfg.parent.joinpath("logs").glob("supervisor-*.jsonl")).read_text().splitlines()
        zyg = next(json.loads(e) for e in sup if '"role":"zygote"' in e.replace(" ", ""))
        assert zyg["forked"] is True
        naming = _procs_naming(str(cfg))
        assert zyg["os_pid"] in naming and len(naming) >= 7, naming  # server, its actors and tasks
    finally:
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    assert p.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130), err
    assert len(list(root.glob("*/cluster.json"))) == 1  # no other run was started
    deadline = time.monotonic() + 30
    try:
        while _procs_naming(str(root)) or list_segments(c["run_id"]) or os.path.exists(c["sock_dir"]):
            assert time.monotonic() < deadline, (_procs_naming(str(root)), list_segments(c["run_id"]))
            time.sleep(0.1)
    finally:  # what a failure left, so that it fails this test only
        for pid in _procs_naming(str(root)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        sweep_stale(run_id=c["run_id"])
        shutil.rmtree(c["sock_dir"], ignore_errors=True)


def _procs_naming(text: str) -> list[int]:
    """Processes whose command line contains text (a run's actors name its folder)."""
    out = []
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and text.encode() in pathlib.Path("/proc", d, "cmdline").read_bytes():
                out.append(int(d))
        except OSError:
            pass
    return out


def test_bad_campaign_arguments_exit_2():
    assert _ksmlab("stress", "--bug", "no-such-bug", "--runs", "1").returncode == 2
    assert _ksmlab("stress", "--bug", "mmput-race", "--runs", "0").returncode == 2
    for rate in ("0", "-1", "101"):
        r = _ksmlab("stress", "--bug", "mmput-race", "--runs", "1", "--chaos", rate)
        assert r.returncode == 2 and "EINVAL: --chaos" in r.stderr, (rate, r.stderr)
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
    assert (tmp_path / "runs" / "runfork.stderr").read_text() == ""  # the runs were forked, and said nothing
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


@pytest.mark.timeout(200)
def test_a_chaos_campaign_on_todays_kernel_survives_its_stops_and_kills(tmp_path):
    """stress --chaos: every run under chaos (cluster.json records the rate), the stops
    and kills counted per bug; today's kernel still reports nothing: a stopped actor only
    changes timing, and a killed task is an exit."""
    r = _ksmlab("stress", "--bug", "cve-2011-2183", "--fixed", "--chaos", "3", "--runs", "1", "--time-limit", "6",
                "--seed", "610", "--runs-root", str(tmp_path / "runs"), "--json")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    s = out["bugs"]["cve-2011-2183"]
    assert s["detected"] == 0 and s["report_kinds"] == [], s
    assert out["chaos"] == 3.0 and s["chaos"]["stops"] + s["chaos"]["kills"] >= 1, s
    cfg = json.loads((pathlib.Path(s["run_dirs"][0]) / "cluster.json").read_text())
    assert cfg["options"]["chaos"] == 3.0
    assert r.returncode == 0


@pytest.mark.timeout(200)
def test_coverage_of_a_run_names_the_kernel_functions_it_reached(tmp_path):
    cov = tmp_path / "cov"
    r = _ksmlab("run", "cve-2011-2183", "--seed", "7", "--arg", "seconds=3", "--json", "--coverage", str(cov),
                "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-2000:]
    c = _ksmlab("cover", str(cov), "--json")
    assert c.returncode == 0, c.stderr
    out = json.loads(c.stdout)
    rows = {f"{x['module']}.{x['name']}": x for x in out["functions"]}
    # ksmd's scan and the exit path ran in their own processes; their coverage is here.
    assert rows["ksm_scan.scan_get_next_rmap_items"]["lines_hit"] > 0  # the batch scan's collector
    assert rows["ksm_mm.__ksm_exit"]["lines_hit"] > 0
    # ... and what this workload never does is reported as not reached.
    assert rows["vmscan.shrink_page"]["lines_hit"] == 0
    # The same data by mm/ksm.c's own names (docs/ksm-functions.md).
    ksm_c = {x["kernel"]: x["status"] for x in out["mm_ksm_c"]}
    assert ksm_c["scan_get_next_rmap_item"] == "reached"
    assert ksm_c["rmap_walk_ksm"] == "never reached"
    assert _ksmlab("cover", str(tmp_path / "empty")).returncode == 2


@pytest.mark.timeout(300)
def test_guided_campaign_keeps_seeds_that_reach_new_arcs(tmp_path):
    r = _ksmlab("stress", "--bug", "cve-2011-2183", "--fixed", "--scenario", "soak", "--guided", "--runs", "3",
                "--time-limit", "4", "--seed", "900", "--coverage", str(tmp_path / "cov"),
                "--runs-root", str(tmp_path / "runs"), "--json")
    # A fixed soak may meet the kernel's own remove_stable_node warning (docs/bugs/README.md,
    # "Findings"): then the campaign exits 1, having found something. Either way it reports.
    assert r.returncode in (0, 1), r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out["bugs"]["cve-2011-2183"]["report_kinds"]) <= {"warning"}, out["bugs"]
    g = out["growth"]
    assert [row["seed"] for row in g] == [900, 901, 902]
    assert g[0]["new_arcs"] > 0 and out["corpus"][0] == 900     # the first run always adds arcs
    assert g[-1]["total_arcs"] >= g[0]["total_arcs"]
    assert all(row["parent"] is None or row["parent"] in out["corpus"] for row in g)
    assert out["coverage"]["reached"] > 0
