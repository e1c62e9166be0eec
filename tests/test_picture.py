# ksmlab/picture.py: swimlane SVGs of reports, and the stress campaign's index page.
#
# The synthetic runs are written by hand (JSON-lines logs, a reports.json, .trace files in
# actors/tracebuf.py's frame format with chosen timestamps), so each check knows exactly
# which lanes, bars and racing events the picture must have. One end-to-end test runs a
# real failing cluster (cve-2011-2183, ~3 s) and checks the hook: every report gets its
# picture, named in reports.json and in run_scenario's result.
from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import numpy as np
import pytest

from actors.tracebuf import FRAME, KIND_ID, MODE_ID, REC
from ksmlab import picture
from ksmlab.scenario import load_scenario, run_scenario

SVG = "{http://www.w3.org/2000/svg}"
B = 1_000_000_000_000          # boot, ns (CLOCK_MONOTONIC of the synthetic host)
MS = 1_000_000
S = 1_000_000_000


class FakeProcess:
    """One process's logs: JSON events and compact trace records with chosen times."""

    def __init__(self, run: Path, actor: str, pid: int) -> None:
        self.logs = run / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.actor, self.pid = actor, pid
        self.lines: list[dict] = []
        self.recs: list[tuple] = []
        self.ids: dict[str, int] = {"": 0}

    def ev(self, ts: int, event: str, ctx: str | None = None, **fields) -> None:
        e = {**fields, "event": event, "run_id": "feedf00d", "seed": 7, "actor": self.actor, "pid": self.pid,
             "ts_ns": ts, "seq": len(self.lines) + 1}
        if ctx is not None and ctx != self.actor:
            e["ctx"] = ctx
        self.lines.append(e)

    def _id(self, s: str) -> int:
        if s not in self.ids:
            self.ids[s] = len(self.ids)
            self.lines.append({"event": "trace_string", "id": self.ids[s], "s": s, "actor": self.actor,
                               "pid": self.pid, "ts_ns": 0, "seq": 0})
        return self.ids[s]

    def lock(self, ts: int, kind: str, lock: str, idx: int = 0, ctx: str | None = None, mode: str = "excl",
             site: str = "") -> None:
        self.recs.append((ts, KIND_ID[kind], self._id(lock), idx, self._id(ctx or self.actor), MODE_ID[mode],
                          self._id(site)))

    def hold(self, t0: int, t1: int | None, lock: str, idx: int = 0, ctx: str | None = None, mode: str = "excl",
             wait: int = 0) -> None:
        self.lock(t0, "lock_acquire", lock, idx, ctx, mode)
        if wait:
            self.lock(t0 + 1000, "lock_contended", lock, idx, ctx, mode)
        self.lock(t0 + 2000 + wait, "lock_acquired", lock, idx, ctx, mode)
        if t1 is not None:
            self.lock(t1, "lock_release", lock, idx, ctx, mode)

    def write(self) -> None:
        with open(self.logs / f"{self.actor}-{self.pid}.jsonl", "w", encoding="utf-8") as f:
            for e in self.lines:
                f.write(json.dumps(e) + "\n")
        if self.recs:
            rec = np.zeros(len(self.recs), dtype=REC)
            for i, (ts, kind, name, idx, ctx, mode, site) in enumerate(sorted(self.recs)):
                r = rec[i]
                r["ts_ns"], r["kind"], r["name"], r["idx"], r["ctx"], r["mode"], r["site"] = \
                    ts, kind, name, idx, ctx, mode, site
            z = zlib.compress(rec.tobytes())
            (self.logs / f"{self.actor}-{self.pid}.trace").write_bytes(FRAME.pack(len(z), len(rec)) + z)


def _run_folder(run: Path, procs: list[FakeProcess], reports: list[dict]) -> None:
    for p in procs:
        p.write()
    (run / "reports.json").write_text(json.dumps(reports))
    (run / "cluster.json").write_text(json.dumps({"run_id": "feedf00d", "seed": 7}))


def _svg(path: str) -> ET.Element:
    return ET.parse(path).getroot()      # well-formed XML, or this raises


def _lanes(root: ET.Element) -> dict[str, ET.Element]:
    return {g.get("data-lane"): g for g in root.iter(f"{SVG}g") if g.get("class") == "lane"}


def _texts(el: ET.Element) -> str:
    return "\n".join("".join(t.itertext()) for t in el.iter(f"{SVG}text"))


KASAN_TITLE = "BUG: KASAN: use-after-free in up_read"


def kasan_run(run: Path) -> None:
    """ksmd up_reads mm 2's mmap_lock after the exit worker freed mm 2; task-100 mapped it;
    the supervisor allocated it; fault:0 did unrelated work on mm 7 (no lane for it)."""
    data = {"cache": "mm", "handle": [2, 1], "site": "up_read", "actor": "ksmd", "pid": 20, "gen_now": 3,
            "alloc": {"actor": "supervisor", "pid": 10, "site": "mm_alloc", "ns": B + 500 * MS},
            "free": {"actor": "exit", "pid": 30, "site": "__mmdrop", "ns": B + 1980 * MS}}
    text = f"{'=' * 66}\n{KASAN_TITLE}\nAccess to mm 2#1 by task ksmd/20\n"
    sup = FakeProcess(run, "supervisor", 10)
    sup.ev(B + 5 * MS, "boot")
    sup.ev(B + 500 * MS, "mm_alloc", mm=2)
    sup.ev(B + 2000 * MS, "report", kind="kasan", title=KASAN_TITLE, text=text, t_s=2.0)
    ksmd = FakeProcess(run, "ksmd", 20)
    ksmd.ev(B + 1950 * MS, "ksm_start_scan", seqnr=3, rmap_entries=0)
    ksmd.hold(B + 1951 * MS, None, "ksm_thread_mutex")
    ksmd.hold(B + 1960 * MS, None, "mmap_lock", 2, mode="read")          # held across the free
    ksmd.ev(B + 1961 * MS, "sched_point", point="scan_get_next_rmap_item.after_unlock")
    ksmd.ev(B + 2000 * MS - 200_000, "report", kind="kasan", title=KASAN_TITLE, text=text, data=data)
    ex = FakeProcess(run, "exit", 30)
    ex.ev(B + 1969 * MS, "msg_recv", type="do_exit", peer="task-100")     # main thread: lane "exit"
    ex.ev(B + 1970 * MS, "mmput", ctx="exit:0", mm=2, mm_users=0)
    ex.hold(B + 1972 * MS, B + 1974 * MS, "ksm_mmlist_lock", ctx="exit:0", wait=500_000)
    ex.hold(B + 1975 * MS, B + 1977 * MS, "mmap_lock", 2, ctx="exit:0")
    ex.ev(B + 1980 * MS, "mm_free", ctx="exit:0", mm=2)
    ex.ev(B + 1981 * MS, "sched_process_exit", ctx="exit:0", task=1, code=0, reason="exit")
    task = FakeProcess(run, "task-100", 40)
    task.ev(B + 1500 * MS, "mmap", mm=2, start=0x1000000, length=16384)
    task.ev(B + 1968 * MS, "msg_send", type="do_exit", peer="exit")
    fault = FakeProcess(run, "fault", 50)
    fault.ev(B + 1990 * MS, "do_swap_page", ctx="fault:0", mm=7, pfn=99)
    report = {"kind": "kasan", "title": KASAN_TITLE, "text": text, "data": data, "actor": "ksmd", "t_s": 2.0}
    _run_folder(run, [sup, ksmd, ex, task, fault], [report])


def test_kasan_picture_lanes_bars_and_racing_pair(tmp_path):
    run = tmp_path / "run"
    kasan_run(run)
    paths = picture.draw_reports(str(run))
    assert paths == [str(run / "reports" / "report-1.svg")]
    root = _svg(paths[0])
    lanes = _lanes(root)
    # The reporter, KASAN's allocating and freeing contexts ("exit" resolves to the worker
    # that touched mm 2), and the task that touched mm 2; not the unrelated fault worker.
    assert set(lanes) == {"ksmd", "supervisor", "exit:0", "task-100"}
    assert KASAN_TITLE in _texts(root)
    # Lock holds as bars named after the lock; the open one runs to the report.
    holds = {r.get("data-lock") for r in lanes["exit:0"].iter(f"{SVG}rect") if r.get("class") == "hold"}
    assert {"mmap_lock#2", "ksm_mmlist_lock"} <= holds
    assert "mmap_lock#2" in {r.get("data-lock") for r in lanes["ksmd"].iter(f"{SVG}rect") if r.get("class") == "hold"}
    waits = [r for r in lanes["exit:0"].iter(f"{SVG}rect") if r.get("class") == "wait"]
    assert [w.get("data-lock") for w in waits] == ["ksm_mmlist_lock"]
    # The racing pair: the free of mm 2, highlighted, linked to the report marker on ksmd.
    racing = [g for g in lanes["exit:0"].iter(f"{SVG}g") if g.get("class") == "racing"]
    assert [g.get("data-event") for g in racing] == ["mm_free"]
    assert not [g for g in lanes["ksmd"].iter(f"{SVG}g") if g.get("class") == "racing"]
    assert len([p for p in root.iter(f"{SVG}path") if p.get("class") == "race-link"]) == 3
    marker = [g for g in root.iter(f"{SVG}g") if g.get("class") == "report"]
    assert [g.get("data-lane") for g in marker] == ["ksmd"]
    assert "1.9998 s" in _texts(marker[0])     # seconds since boot, at ksmd's own report
    # reports.json names the picture, relative to the run folder.
    saved = json.loads((run / "reports.json").read_text())
    assert saved[0]["svg"] == os.path.join("reports", "report-1.svg")


HUNG_TITLE = "INFO: task exit:0:30 blocked for more than 30 seconds. <&> \"quoted\""


def test_hung_task_picture_holder_wait_and_skipped_time(tmp_path):
    """exit:0 waits 32 s for ksm_thread_mutex (its trace buffer lost the contended record:
    the report's since_ns draws the wait); ctl:0 took the mutex at 2.5 s and loops."""
    run = tmp_path / "run"
    data = {"ctx": 7, "actor": "exit:0", "pid": 30, "tid": 31,
            "waiting": {"lock": "ksm_thread_mutex", "idx": 0, "mode": "excl", "since_ns": B + 3 * S,
                        "site": "__ksm_exit", "name": "ksm_thread_mutex"},
            "blocked_ns": 32 * S, "threshold_ns": 30 * S, "cycle": None, "in_cycle": False}
    text = f"{HUNG_TITLE}\nShowing all locks held in the system:\n2 locks held by ctl:0/60:\n"
    sup = FakeProcess(run, "supervisor", 10)
    sup.ev(B + 35 * S, "report", kind="hung_task", title=HUNG_TITLE, text=text, t_s=35.0)
    ex = FakeProcess(run, "exit", 30)
    ex.ev(B + 2900 * MS, "mmput", ctx="exit:0", mm=1, mm_users=0)
    ex.lock(B + 3 * S, "lock_acquire", "ksm_thread_mutex", ctx="exit:0")
    ctl = FakeProcess(run, "ctl", 60)
    ctl.ev(B + 2400 * MS, "sysfs_store", ctx="ctl:0", knob="run", value="2")
    ctl.hold(B + 2500 * MS, None, "ksm_thread_mutex", ctx="ctl:0")
    ctl.hold(B + 2600 * MS, None, "mmap_lock", 0, ctx="ctl:0", mode="read")
    for i in range(300):
        ctl.ev(B + 5 * S + i * 100 * MS, "mm_page_alloc_oom", ctx="ctl:0", site="do_anonymous_page")
    report = {"kind": "hung_task", "title": HUNG_TITLE, "text": text, "data": data, "t_s": 35.0}
    _run_folder(run, [sup, ex, ctl], [report])

    path = picture.draw_report(str(run), 0)
    root = _svg(path)
    lanes = _lanes(root)
    assert set(lanes) == {"exit:0", "ctl:0"}
    assert HUNG_TITLE in _texts(root)
    waits = [r for r in lanes["exit:0"].iter(f"{SVG}rect") if r.get("class") == "wait"]
    assert [w.get("data-lock") for w in waits] == ["ksm_thread_mutex"]
    holds = {r.get("data-lock") for r in lanes["ctl:0"].iter(f"{SVG}rect") if r.get("class") == "hold"}
    assert {"ksm_thread_mutex", "mmap_lock#0"} <= holds
    racing = [g for g in lanes["ctl:0"].iter(f"{SVG}g") if g.get("class") == "racing"]
    assert [g.get("data-event") for g in racing] == ["lock_acquired"]
    # ctl:0's last 40 events are its last 2 s (20 ticks); the idle stretch between the
    # mutex taken at 2.5 s and that window is cut out of the axis.
    ticks = [t for t in lanes["ctl:0"].iter(f"{SVG}line") if t.get("class") == "tick"]
    assert 18 <= len(ticks) <= 21
    assert [r for r in root.iter(f"{SVG}rect") if r.get("class") == "break"]
    assert "holds ksm_thread_mutex" in _texts(lanes["ctl:0"])


def test_drawing_never_fails_the_caller(tmp_path, capsys):
    run = tmp_path / "run"
    kasan_run(run)
    (run / "reports.json").write_text(json.dumps(["not a report", {"kind": "oops", "title": "x"}]))
    paths = picture.draw_reports(str(run))
    assert paths == [str(run / "reports" / "report-2.svg")]       # the broken entry is skipped
    assert "could not draw the picture of report 1" in capsys.readouterr().err
    logged = [json.loads(line) for f in (run / "logs").glob("picture-*.jsonl") for line in f.read_text().splitlines()]
    assert [e["event"] for e in logged] == ["picture_failed"] and logged[0]["report"] == 1
    assert picture.draw_reports(str(tmp_path / "no-such-run")) == []


def test_campaign_index_embeds_the_first_failing_runs_picture(tmp_path):
    root = tmp_path / "campaign"
    run = root / "mmput-race-variant-5"
    kasan_run(run)
    picture.draw_reports(str(run))
    out = {"bugs": {
        "mmput-race": {"fixed": False, "runs": 4, "detected": 2, "first_seed": 5, "median_s_to_detect": 2.0,
                       "report_kinds": ["kasan_uaf"], "failing_runs": [str(run)], "run_dirs": [str(run)]},
        "cve-2011-2183": {"fixed": False, "runs": 1, "detected": 0, "first_seed": None,
                          "median_s_to_detect": None, "report_kinds": [], "failing_runs": [], "run_dirs": []}},
        "seed": 5, "sched": "pct", "depth": 3, "seconds": 12.5, "scenario": None}
    path = picture.write_campaign_index(out, str(root))
    assert path == str(root / "index.html")
    page = Path(path).read_text()
    assert "<td>4</td><td>2</td><td>50%</td><td>2.00 s</td><td>kasan_uaf</td>" in page
    assert "src='mmput-race-variant-5/reports/report-1.svg'" in page
    assert "No failing run." in page and KASAN_TITLE in page


@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_a_real_failing_run_gets_a_picture_per_report(tmp_path):
    res = await run_scenario(load_scenario("cve-2011-2183"), run_dir=str(tmp_path / "r"), seed=2,
                             variants=("cve-2011-2183",), stop_on_report=True, args={"seconds": 20})
    assert res["reports"], res.get("failed")
    saved = json.loads(Path(res["run_dir"], "reports.json").read_text())
    assert len(saved) == len(res["reports"])
    for i, (r, s) in enumerate(zip(res["reports"], saved)):
        assert r["svg"] == s["svg"] == os.path.join("reports", f"report-{i + 1}.svg")
        root = _svg(os.path.join(res["run_dir"], s["svg"]))
        assert s["title"] in _texts(root)
        assert "ksmd" in _lanes(root)
