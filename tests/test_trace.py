# The inspection tools on runs: the compact trace, `ksmlab log` and `ksmlab trace`.
#
# The Trace Event Format checks are the format's own rules (Google's "Trace Event
# Format"): the fields each phase needs, every async "b" closed by one "e" of the same
# category and id, both ends of every flow, every pid and tid named by metadata, and
# timestamps that never go back on a track. They run on a real cluster run and on a
# simulated schedule whose interleaving is known (seed 003's race), where the exported
# spans must show ksmd holding mmap_lock while the exit path frees the mm.
from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import subprocess
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from actors.kernel.variants import Variants
from actors.log import EventLog, read_events, read_run
from actors.tracebuf import TraceBuffer, read_frames
from ksmlab import cli, live, logview, trace
from ksmlab.scenario import load_scenario, run_scenario
from ksmlab.sim.scenarios import SCENARIOS
from ksmlab.sim.search import minimize, replay, search
from ksmlab.sim.world import World
from tests.helpers import log_args

pytestmark = [pytest.mark.timeout(180)]

NEEDS = {"b": {"cat", "id", "name", "ts", "pid", "tid"}, "e": {"cat", "id", "ts", "pid", "tid"},
         "s": {"cat", "id", "name", "ts", "pid", "tid"}, "f": {"cat", "id", "name", "ts", "pid", "tid"},
         "X": {"name", "ts", "dur", "pid", "tid"}, "i": {"name", "ts", "pid", "tid", "s"},
         "C": {"name", "ts", "pid", "args"}, "M": {"name", "pid", "args"}}


def check_trace_format(doc: dict) -> Counter:
    """Every rule of the format this exporter relies on; returns the count per phase."""
    evs = doc["traceEvents"]
    phases = Counter(e["ph"] for e in evs)
    assert set(phases) <= set(NEEDS), phases
    procs = {e["pid"] for e in evs if e["ph"] == "M" and e["name"] == "process_name"}
    threads = {(e["pid"], e["tid"]) for e in evs if e["ph"] == "M" and e["name"] == "thread_name"}
    spans: dict[tuple, list[dict]] = defaultdict(list)
    flows: dict[str, list[str]] = defaultdict(list)
    last: dict[tuple, float] = {}
    for e in evs:
        missing = NEEDS[e["ph"]] - set(e)
        assert not missing, f"{e['ph']} event without {missing}: {e}"
        if e["ph"] == "M":
            continue
        assert e["pid"] in procs, f"pid {e['pid']} has no process_name"
        if e["ph"] != "C":
            assert (e["pid"], e["tid"]) in threads, f"tid {e['tid']} of pid {e['pid']} has no thread_name"
            track = (e["pid"], e["tid"])
            assert e["ts"] >= last.get(track, float("-inf")), f"time goes back on {track}: {e}"
            last[track] = e["ts"]
        if e["ph"] == "i":
            assert e["s"] in ("t", "p", "g")
        if e["ph"] in "be":
            spans[(e["cat"], e["id"])].append(e)
        if e["ph"] in "sf":
            flows[e["id"]].append(e["ph"])
    for key, pair in spans.items():
        assert [x["ph"] for x in pair] == ["b", "e"], f"span {key} is {[x['ph'] for x in pair]}"
        assert pair[1]["ts"] >= pair[0]["ts"] and pair[0]["name"] == pair[1]["name"]
    for fid, ends in flows.items():
        assert sorted(ends) == ["f", "s"], f"flow {fid} has ends {ends}"
    return phases


# -- a real run ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("inspect") / "run")
    res = asyncio.run(run_scenario(load_scenario("ksm-tests-M"), run_dir=d, seed=5))
    assert res["ok"], res.get("failed")
    return d


def test_lock_records_are_compact_and_carry_context_and_site(run_dir):
    logs = os.path.join(run_dir, "logs")
    traces = [f for f in os.listdir(logs) if f.endswith(".trace")]
    assert traces
    recs = sum(len(read_frames(os.path.join(logs, f))) for f in traces)
    size = sum(os.path.getsize(os.path.join(logs, f)) for f in traces)
    assert recs > 300 and size / recs < 16, f"{size / recs:.1f} bytes per lock record"
    evs = read_events(run_dir)
    locks = [e for e in evs if e["event"] == "lock_acquired"]
    assert locks and all(e["ctx"] for e in locks)
    assert any(e.get("site") == "ksm_scan_thread" and e["actor"] == "ksmd" for e in locks)
    # No JSON line is a lock event any more: they all went to the compact trace.
    json_only, _ = read_run(run_dir)
    assert not [e for e in json_only if e["event"].startswith("lock_")]


def test_trace_export_follows_the_format(run_dir, tmp_path):
    doc = trace.from_run(run_dir)
    phases = check_trace_format(doc)
    assert phases["b"] > 100 and phases["s"] > 0 and phases["C"] > 0 and phases["i"] > 0
    names = {e["args"]["name"] for e in doc["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}
    assert "ksmd" in names and any(n.startswith("fault:") for n in names)


def test_log_prints_trace_cmd_lines_and_filters(run_dir, capsys):
    assert logview.main(log_args(run=run_dir, event=["ksm_merge_one_page"], limit=3)) == 0
    out = capsys.readouterr().out.splitlines()
    assert out and all(": ksm_merge_one_page: " in ln and "[" in ln for ln in out)
    assert all("pfn=0x" in ln for ln in out)                  # pfns in hex
    assert any("(pid " in ln for ln in out)                   # an mm as its task
    assert logview.main(log_args(run=run_dir, limit=200)) == 0
    assert "lock_" not in capsys.readouterr().out            # lock records hidden by default
    assert logview.main(log_args(run=run_dir, lock=["ksm_thread_mutex"], limit=20)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all("ksm_thread_mutex" in ln and ": lock_" in ln for ln in lines)
    assert logview.main(log_args(run=run_dir, since=0.0, until=0.5, json=True)) == 0
    evs = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    t0 = logview.Timeline(run_dir).t0
    assert evs and all(e["ts_ns"] - t0 <= 0.5e9 for e in evs)


def test_log_around_a_missing_report_is_einval(run_dir, capsys):
    assert logview.main(log_args(run=run_dir, around=1)) == 2
    assert "EINVAL" in capsys.readouterr().err


# -- a simulated schedule with a known interleaving ------------------------------------------------------
def test_sim_trace_shows_ksmd_holding_mmap_lock_while_the_exit_frees_the_mm():
    w = World(SCENARIOS["mmput-race"], Variants(["mmput-race"]))
    try:
        r = search(w, "dfs", schedules=1000, bound=1)
        sched = minimize(w, r.first.schedule)
        res = replay(w, sched)
    finally:
        w.close()
    doc = trace.from_schedule(res, "mmput-race", sched)
    check_trace_format(doc)
    tids = {e["args"]["name"]: e["tid"] for e in doc["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}
    evs = doc["traceEvents"]
    hold = [e for e in evs if e["ph"] in "be" and e["name"] == "mmap_lock[0]" and e["tid"] == tids["ksmd"]]
    b, e = hold[-2], hold[-1]
    assert e["args"].get("unterminated")        # ksmd never got to its up_read: the UAF hit first
    exit_ts = [x["ts"] for x in evs if x.get("tid") == tids["exit:victim"] and x["ph"] != "M"]
    assert exit_ts and all(b["ts"] < t for t in exit_ts)
    freed = [x for x in evs if x["ph"] == "i" and x["name"] == "mm_free"]
    assert freed and freed[0]["tid"] == tids["exit:victim"] and freed[0]["ts"] > b["ts"]
    assert any(x["ph"] == "i" and x["name"] == "report" and x["s"] == "g" for x in evs)


def test_a_torn_trace_frame_is_dropped(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    ev = EventLog(str(tmp_path), "ksmd", "r", 1)
    tb = TraceBuffer(ev.path[:-6] + ".trace", lambda i, s: ev("trace_string", id=i, s=s), lambda: "ksmd")
    for i in range(10):
        tb.record("lock_acquired", "ptl", i, "excl", 0, "follow_page")
    tb.flush()
    tb.record("lock_release", "ptl", 1, "excl", 0, "follow_page")
    tb.close()
    ev.close()
    path = ev.path[:-6] + ".trace"
    with open(path, "ab") as f:
        f.write(b"\x10\x00\x00\x00\x01\x00")              # half a frame header: a kill mid-write
    assert len(read_frames(path)) == 11
    evs = read_events(str(tmp_path))
    assert [e["site"] for e in evs if e["event"].startswith("lock_")] == ["follow_page"] * 11


@pytest.mark.skipif(shutil.which("trace_processor_shell") is None,
                    reason="trace_processor_shell is not on PATH (the perfetto SQL check needs it)")
def test_perfetto_loads_the_trace(run_dir, tmp_path):
    out = tmp_path / "t.json"
    out.write_text(json.dumps(trace.from_run(run_dir)))
    # Perfetto's own importer must find what the format checks above count: message
    # slices with their flow arrows, lock spans, and one named thread per context.
    q = ("select (select count(*) from slice) as slices, (select count(*) from flow) as flows, "
         "(select count(*) from slice where name like 'msg%' or category = 'msg') as msgs, "
         "(select count(distinct name) from thread where name is not null) as threads;")
    r = subprocess.run(["trace_processor_shell", "-q", "/dev/stdin", str(out)], input=q, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    last = [ln for ln in r.stdout.splitlines() if ln.strip()][-1]
    slices, flows, msgs, threads = (int(x.strip().strip('"')) for x in last.split(","))
    t = trace.from_run(run_dir)
    want_flows = sum(1 for e in t["traceEvents"] if e.get("ph") == "s")
    assert slices > 0 and msgs > 0 and threads >= 2, r.stdout
    assert flows == want_flows, (flows, want_flows)


def test_around_a_report_shows_both_sides_of_the_race(tmp_path, capsys):
    """CVE-2011-2183 in the cluster: --around 1 must show ksmd's side (its list check and
    cursor move) and the exit's side (__ksm_exit taking ksm_mmlist_lock, the fast path)."""
    d = str(tmp_path / "cve")
    res = asyncio.run(run_scenario(load_scenario("cve-2011-2183"), run_dir=d, seed=2,
                                   variants=("cve-2011-2183",), stop_on_report=True, args={"seconds": 40}))
    assert res["reports"], "the variant run found nothing in 40 s"
    assert logview.main(log_args(run=d, around=1)) == 0
    out = capsys.readouterr().out
    head, *lines = out.splitlines()
    assert "NULL pointer dereference" in head
    ksmd = [ln for ln in lines if ln.lstrip().startswith("ksmd-")]
    exits = [ln for ln in lines if ln.lstrip().startswith("exit-")]
    assert any("lock_acquired: ksm_mmlist_lock excl at scan_get_next_rmap_item" in ln for ln in ksmd)
    assert any("ksm_mmlist_lock excl at __ksm_exit" in ln for ln in exits)
    assert any("ksm_exit:" in ln and "path=fast" in ln for ln in exits)
    assert lines[-1].lstrip().startswith("ksmd-") and ": report: " in lines[-1]


# -- what a run prints ----------------------------------------------------------------------------------
class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_status_line_is_redrawn_around_log_lines_on_a_terminal():
    out, err = io.StringIO(), _Tty()
    c = live.Console(out, err)
    c.status("[ 1.0s] sharing 0")
    c.line("ok 1 - merged")
    c.status("[ 2.0s] sharing 9")
    c.done()
    assert out.getvalue() == "ok 1 - merged\n"
    assert err.getvalue() == ("\r\x1b[K[ 1.0s] sharing 0" "\r\x1b[K" "[ 1.0s] sharing 0"
                              "\r\x1b[K[ 2.0s] sharing 9" "\n")
    plain_out, plain_err = io.StringIO(), io.StringIO()
    p = live.Console(plain_out, plain_err)
    p.status("[ 1.0s] sharing 0")
    p.line("ok 1 - merged")
    assert plain_err.getvalue() == "[ 1.0s] sharing 0\n" and plain_out.getvalue() == "ok 1 - merged\n"


def test_a_variant_that_reproduces_its_bug_is_an_expected_failure():
    res = {"options": {"variants": ["mmput-race"]}, "reports": [{"kind": "kasan", "title": "BUG: KASAN"}]}
    assert cli.expected_failure(res) == "kasan_uaf"
    other = {"options": {"variants": ["mmput-race"]}, "reports": [{"kind": "hung_task", "title": "INFO"}]}
    assert cli.expected_failure(other) is None                 # not the bug it reverts
    today = {"options": {"variants": []}, "reports": [{"kind": "kasan", "title": "BUG: KASAN"}]}
    assert cli.expected_failure(today) is None


def test_a_log_past_its_budget_keeps_reports_and_says_what_it_dropped(tmp_path):
    """A long run cannot fill the disk: past cap_bytes a process's log keeps only the
    events that say what became of the run (a report among them), and says how many it
    dropped, once when it starts dropping and again at the end."""
    ev = EventLog(str(tmp_path), "ksmd", "r1", 1, cap_bytes=2000)
    for i in range(500):
        ev("ksm_merge_one_page", pfn=i, pages=3)
    ev("report", kind="kasan", title="BUG: KASAN: use-after-free in up_read")
    ev.close()
    lines = [json.loads(x) for x in Path(ev.path).read_text().splitlines()]
    assert Path(ev.path).stat().st_size < 3000
    capped = [e for e in lines if e["event"] == "log_capped"]
    assert len(capped) == 2 and capped[-1]["dropped"] == 500 - sum(e["event"] == "ksm_merge_one_page" for e in lines)
    assert lines[-2]["event"] == "report" and lines[-2]["title"].endswith("in up_read")
