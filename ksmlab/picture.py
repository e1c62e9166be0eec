# Pictures of reports: one swimlane SVG per detector report of a run.
#
# What. For every report in <run>/reports.json, draw_reports() writes
# <run>/reports/report-N.svg (N = the report's index + 1): one horizontal lane per kernel
# context involved, time running left to right in seconds since the cluster booted. A lane
# shows the context's last events before the report as ticks with short labels, its lock
# holds (lock_acquired .. lock_release of one lock class and index) as bars named after the
# lock, its lock waits (lock_contended .. lock_acquired) as red hatched bars, and the
# report itself as a red marker at its time on the reporting lane. The "racing pair" is
# drawn in orange: on every other lane, the last event that touched the object the report
# is about (the freed mm of a KASAN report, the lock of a hung task or a lockdep chain, the
# pfn of a Bad page) with a line to the report marker. A header names the report and the
# object, a legend explains the marks, and the report's text is printed underneath.
#
# Why. A report says what went wrong in one context; the bug is always the interleaving
# with another one, and reading it out of merged JSON lines and a binary lock trace is
# slow work (`ksmlab log --around` helps, but is text). The picture is the kernel
# developer's whiteboard sketch of the race, "CPU0 did this while CPU1 did that", drawn
# from the run's own records, so a stress campaign can show one per bug (stress.py's
# index.html, write_campaign_index below) and a failing run prints where its pictures are.
#
# Which lanes: the reporting context; every context or actor named anywhere in the
# report's data (walked recursively: KASAN's allocating and freeing tasks, a hung task's
# context, lockdep's chain, the tasks mapping a bad page) and the lock holders its text
# names; the contexts still holding or waiting for the report's locks at its time
# (computed from the trace); and the contexts that touched the same objects (same lock
# class and index, same mm, same pfn) in the 2 s before the report. An actor name with
# several contexts (exit and its worker exit:0) resolves to the context that touched the
# object. Which events: per lane, the last 2 s before its last activity or its last 40
# events (and 40 lock bars), whichever is shorter; the racing event and the report's own
# lock waits are drawn even when older. Long idle stretches (a hung task waited 30 s) are
# cut out of the time axis and drawn as grey "time skipped" bands, so the microseconds of
# a race and the seconds around it fit one picture.
#
# No dependency beyond the standard library for the drawing: the SVG is written by hand
# (every text XML-escaped, so any browser opens it and xml.etree parses it); the run is
# read with actors.log.read_run (JSON-lines events and the numpy compact trace). Drawing
# never fails a run: draw_reports() catches every error, prints it to stderr and logs it
# as a `picture_failed` event.
from __future__ import annotations

import html
import json
import math
import os
import re
import statistics
import sys
import traceback
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actors.log import EventLog, read_run
from actors.tracebuf import KIND_ID

WINDOW_NS = 2_000_000_000          # the last 2 s of a lane ...
TICKS_PER_LANE = 40                # ... or its last 40 events, whichever is shorter
BARS_PER_LANE = 40
MAX_LANES = 10
MAX_OBJECTS = 24

LOCK_EVENTS = ("lock_acquire", "lock_contended", "lock_acquired", "lock_release")
NO_TICK = {"report", "trace_string", *LOCK_EVENTS}
# Lock classes with one instance print without "#idx", as lockdep prints them
# (shared_mem/layout.py lock_classes(): count 1).
SINGLE_LOCKS = {"ksm_thread_mutex", "ksm_mmlist_lock", "swap_lock"}
MM_LOCKS = ("mmap_lock", "ptl")        # index = the mm's index (actors/kernel/context.py)
MM_KEYS = ("mm", "child_mm", "parent_mm")
PFN_KEYS = ("pfn", "kpfn")
PFN_PAIR_EVENTS = {"wp_page_copy": ("old", "new"), "ksm_swpin_copy": ("new",)}

# Geometry (px).
WIDTH = 1280
PLOT_X0, PLOT_X1 = 210, WIDTH - 40
HEADER_H = 118
LANE_H = 118
TICK_Y0, TICK_Y1 = 62, 74      # inside a lane
BAR_Y, BAR_H, BAR_STEP, BAR_LEVELS = 80, 8, 9, 4
BREAK_W = 26
MIN_SEG_W = 48
MAX_BREAKS = 7
LAST_SHARE = 0.4               # of the plot's width at least, for the segment ending at the report

HIGHLIGHT = "#e07000"
REPORT = "#c00000"
HALO = 'stroke="white" stroke-width="2.2" stroke-opacity="0.85" paint-order="stroke"'   # text over marks
PALETTE = ("#8ecae6", "#b5e48c", "#ffd166", "#cdb4db", "#a3c4f3", "#f4acb7", "#90dbf4",
           "#d4a373", "#c7f9cc", "#ffc8dd")

Obj = tuple  # ("lock", name, idx|None) | ("mm", idx|None) | ("pfn", pfn) | (field, value|None)


def svg_name(index: int) -> str:
    """The picture of report `index` (0-based), relative to the run folder."""
    return os.path.join("reports", f"report-{index + 1}.svg")


# -- reading a run -------------------------------------------------------------------------------
def lane_of(e: dict) -> str:
    return e.get("ctx") or e.get("actor") or "?"


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


class RunView:
    """A run's events indexed for drawing: JSON events by lane, the compact trace with
    per-row lane keys, the lane -> actor table and the boot time."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.events, self.trace = read_run(run_dir)
        self.info = _read_json(os.path.join(run_dir, "cluster.json")) or {}
        self.ts = [int(e.get("ts_ns", 0)) for e in self.events]
        self.by_lane: dict[str, list[dict]] = {}
        self.actor_of: dict[str, str] = {}
        self.pid_of: dict[str, int] = {}
        for e in self.events:
            if e.get("event") == "report" and "t_s" in e:
                continue        # the supervisor's copy of a report is not a lane event
            lab = lane_of(e)
            self.by_lane.setdefault(lab, []).append(e)
            self.actor_of.setdefault(lab, e.get("actor", "?"))
            if _int(e.get("pid")) is not None:
                self.pid_of.setdefault(lab, e["pid"])
        tr = self.trace
        rec = tr.rec
        self.t_ts = rec["ts_ns"]
        self.t_pid = tr.pid.astype(np.int64)
        self.t_key = (self.t_pid << 16) | rec["ctx"].astype(np.int64)
        self.keys_of: dict[str, list[int]] = {}
        for k in np.unique(self.t_key).tolist():
            pid, c = k >> 16, k & 0xFFFF
            lab = tr.s(pid, c) or tr.actors.get(pid, "?")
            self.keys_of.setdefault(lab, []).append(k)
            self.actor_of.setdefault(lab, tr.actors.get(pid, "?"))
            self.pid_of.setdefault(lab, pid)
        self.rev = {p: {s: i for i, s in tab.items()} for p, tab in tr.strings.items()}
        self.labels_of_actor: dict[str, list[str]] = {}
        for lab, actor in self.actor_of.items():
            self.labels_of_actor.setdefault(actor, []).append(lab)
        self.boot_ns = self._boot()

    def _boot(self) -> int:
        # t_s of a report is time.monotonic() - t_boot in the supervisor, taken just before
        # it logs the report: ts_ns - t_s of that event is the boot time, to the ms.
        est = [int(e["ts_ns"]) - round(float(e["t_s"]) * 1e9) for e in self.events
               if e.get("event") == "report" and e.get("actor") == "supervisor" and "t_s" in e]
        if est:
            return int(statistics.median(est))
        for e in self.events:
            if e.get("event") == "boot":
                return int(e["ts_ns"])
        firsts = [t for t in (self.ts[:1] + self.t_ts[:1].tolist()) if t]
        return min(firsts) if firsts else 0

    def secs(self, ts: int) -> float:
        return (ts - self.boot_ns) / 1e9

    def trace_events(self, rows: Any) -> list[dict]:
        return self.trace.to_events([int(r) for r in rows])

    def lane_rows(self, label: str) -> np.ndarray:
        keys = self.keys_of.get(label)
        if not keys or not len(self.t_key):
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(np.isin(self.t_key, keys))

    def lock_name_mask(self, names: set[str]) -> np.ndarray:
        rec = self.trace.rec
        m = np.zeros(len(rec), dtype=bool)
        for p, rev in self.rev.items():
            ids = [rev[n] for n in names if n in rev]
            if ids:
                m |= (self.t_pid == p) & np.isin(rec["name"], ids)
        return m & (rec["kind"] <= KIND_ID["lock_release"])

    def touch_mask(self, objs: list[Obj]) -> np.ndarray:
        """Trace rows (lock records) that touch one of the objects."""
        rec = self.trace.rec
        m = np.zeros(len(rec), dtype=bool)
        for o in objs:
            if o[0] == "lock":
                names, idx = {o[1]}, o[2]
            elif o[0] == "mm" and o[1] is not None:
                names, idx = set(MM_LOCKS), o[1]
            elif o[0] == "pfn":
                names, idx = {"page_lock"}, o[1]
            else:
                continue
            mo = self.lock_name_mask(names)
            if idx is not None:
                mo &= rec["idx"] == idx
            m |= mo
        return m


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# -- what a report is about ----------------------------------------------------------------------
def _walk(obj: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, (*path, k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _walk(v, (*path, i))
    else:
        yield path, obj


def report_objects(rep: dict) -> tuple[list[Obj], list[Obj]]:
    """(primary, all): the objects the report is about (the racing pair is drawn for the
    primary ones) and every object its data names."""
    data = rep.get("data") if isinstance(rep.get("data"), dict) else {}
    primary: list[Obj] = []
    out: list[Obj] = []

    def add(o: Obj, main: bool = False) -> None:
        if main and o not in primary:
            primary.append(o)
        if o not in out and len(out) < MAX_OBJECTS:
            out.append(o)

    cache = data.get("cache")
    if isinstance(cache, str):
        h = data.get("handle")
        idx = _int(h[0]) if isinstance(h, list | tuple) and h else None
        add(("mm" if cache == "mm" else cache, idx), True)
    for key in ("waiting", "acquiring", "holding"):
        w = data.get(key)
        if isinstance(w, dict) and isinstance(w.get("lock"), str):
            add(("lock", w["lock"], _int(w.get("idx"))), True)
    for step in data.get("cycle") or []:
        if isinstance(step, dict) and isinstance(step.get("lock"), str):
            add(("lock", step["lock"], _int(step.get("idx"))), True)
    if _int(data.get("pfn")) is not None:
        add(("pfn", data["pfn"]), True)
    for s in (data.get("survivors") or [])[:4]:
        if isinstance(s, dict) and _int(s.get("pfn")) is not None:
            add(("pfn", s["pfn"]), True)
    for p in (data.get("pages") or [])[:4]:
        if _int(p) is not None:
            add(("pfn", p), True)
    if _int(data.get("mm")) is not None:
        add(("mm", data["mm"]), True)
    # Everything else the data names.
    for d in _dicts(data):
        if isinstance(d.get("lock"), str):
            add(("lock", d["lock"], _int(d.get("idx"))))
            if d["lock"] in MM_LOCKS and _int(d.get("idx")) is not None:
                add(("mm", d["idx"]))
        for k in PFN_KEYS:
            if _int(d.get(k)) is not None:
                add(("pfn", d[k]))
        if _int(d.get("mm")) is not None:
            add(("mm", d["mm"]))
        for n in (d.get("stable_nodes") or [])[:8] if isinstance(d.get("stable_nodes"), list) else []:
            if _int(n) is not None:
                add(("stable_node", n))
    if not primary:
        primary = out[:3]
    return primary, out


def _dicts(obj: Any) -> Iterator[dict]:
    if isinstance(obj, dict):
        yield obj
        for v in obj.values():
            yield from _dicts(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _dicts(v)


def lock_display(name: str, idx: Any) -> str:
    return name if name in SINGLE_LOCKS or idx is None else f"{name}#{idx}"


def obj_desc(o: Obj) -> str:
    if o[0] == "lock":
        return f"lock {lock_display(o[1], o[2])}" if o[2] is not None else f"lock class {o[1]}"
    if o[0] == "pfn":
        return f"pfn {o[1]:#x}"
    if o[1] is None:
        return f"any {o[0]} (NULL handle)"
    return f"{o[0]} {o[1]}"


def touches(e: dict, o: Obj) -> bool:
    """Does event e (a JSON event or a trace record as read_events() shapes it) touch o?"""
    kind = o[0]
    ev = e.get("event", "")
    if kind == "lock":
        return ev in LOCK_EVENTS and e.get("lock") == o[1] and (o[2] is None or e.get("idx") == o[2])
    if kind == "mm":
        if o[1] is None:
            return any(_int(e.get(k)) is not None for k in MM_KEYS)
        if ev in LOCK_EVENTS:
            return e.get("lock") in MM_LOCKS and e.get("idx") == o[1]
        return any(_int(e.get(k)) == o[1] for k in MM_KEYS)
    if kind == "pfn":
        if ev in LOCK_EVENTS:
            return e.get("lock") == "page_lock" and e.get("idx") == o[1]
        keys = PFN_KEYS + PFN_PAIR_EVENTS.get(ev, ())
        return any(_int(e.get(k)) == o[1] for k in keys)
    if o[1] is None:
        return _int(e.get(kind)) is not None
    return _int(e.get(kind)) == o[1]


def _touches_any(e: dict, objs: list[Obj]) -> bool:
    return e.get("event") not in ("report", "trace_string") and any(touches(e, o) for o in objs)


# -- the model of one picture ----------------------------------------------------------------------
@dataclass
class Bar:
    kind: str                # hold | wait
    lock: str                # display name
    t0: int
    t1: int
    mode: str = ""
    site: str = ""
    open_start: bool = False  # began before what the lane shows (clipped)
    open_end: bool = False    # still held / still waiting at the report
    main: bool = False        # a lock the report is about
    level: int = 0


@dataclass
class Lane:
    label: str
    actor: str
    pid: int | None
    roles: list[str] = field(default_factory=list)
    ticks: list[dict] = field(default_factory=list)
    bars: list[Bar] = field(default_factory=list)
    racing: dict | None = None
    reporter: bool = False


@dataclass
class Picture:
    index: int
    total: int
    rep: dict
    t_ns: int
    reporter: str
    primary: list[Obj]
    lanes: list[Lane]
    run: RunView


def report_time(run: RunView, rep: dict) -> tuple[int, dict | None]:
    """The report's time (ns) and the reporting actor's own `report` event, if logged."""
    t_s = rep.get("t_s")
    want = run.boot_ns + round(float(t_s) * 1e9) if isinstance(t_s, int | float) else None
    title = rep.get("title")
    own = [e for e in run.events if e.get("event") == "report" and e.get("title") == title and "t_s" not in e]
    sup = [e for e in run.events if e.get("event") == "report" and e.get("title") == title and "t_s" in e]

    def near(es: list[dict]) -> dict | None:
        if not es:
            return None
        if want is None:
            return es[0]
        return min(es, key=lambda e: abs(int(e["ts_ns"]) - want))

    e = near(own)
    if e is not None and (want is None or abs(int(e["ts_ns"]) - want) < 5_000_000_000):
        return int(e["ts_ns"]), e
    s = near(sup)
    if s is not None:
        return int(s["ts_ns"]), None
    if want is not None:
        return want, None
    last = max(run.ts[-1:] + run.t_ts[-1:].tolist(), default=run.boot_ns)
    return int(last), None


def _last_touch(run: RunView, label: str, objs: list[Obj], t: int, mask: np.ndarray | None,
                since: int = 0) -> dict | None:
    """The lane's last event in [since, t] touching one of the objects (the racing one)."""
    best = None
    evs = run.by_lane.get(label, [])
    for e in reversed(evs):
        ts = int(e.get("ts_ns", 0))
        if ts > t:
            continue
        if ts < since:
            break
        if _touches_any(e, objs):
            best = e
            break
    if mask is not None and len(mask):
        rows = run.lane_rows(label)
        if len(rows):
            hit = rows[mask[rows] & (run.t_ts[rows] <= t) & (run.t_ts[rows] >= since)]
            if len(hit) and (best is None or int(run.t_ts[hit[-1]]) > int(best.get("ts_ns", 0))):
                best = run.trace_events([hit[-1]])[0]
    return best


def _open_locks(run: RunView, rows: np.ndarray) -> list[dict]:
    """Of these trace rows (one lane's, or every lane's for one lock), the last record of
    each (context, lock, index) whose kind leaves the lock held or waited for."""
    if not len(rows):
        return []
    rec = run.trace.rec
    rr = rows[::-1]
    cols = np.stack([run.t_key[rr], rec["name"][rr].astype(np.int64), rec["idx"][rr].astype(np.int64)], axis=1)
    _u, first = np.unique(cols, axis=0, return_index=True)
    last = np.sort(rr[first])
    kinds = rec["kind"][last]
    keep = last[(kinds == KIND_ID["lock_acquired"]) | (kinds == KIND_ID["lock_contended"])]
    return run.trace_events(keep)


def _open_json(evs: list[dict]) -> list[dict]:
    """_open_locks() for lock events logged as JSON lines (runs before the compact trace)."""
    last: dict[tuple, dict] = {}
    for e in evs:
        last[(e.get("lock"), e.get("idx"))] = e
    return [e for e in last.values() if e["event"] in ("lock_acquired", "lock_contended")]


def _holders(run: RunView, locks: list[Obj], t: int) -> list[tuple[str, str, dict]]:
    """(lane, "holds"|"waits", record) for each context holding or waiting for one of the
    lock objects at time t."""
    if not locks or not len(run.t_ts):
        return []
    m = run.touch_mask(locks) & (run.t_ts <= t)
    m &= np.isin(run.trace.rec["kind"], [KIND_ID[k] for k in LOCK_EVENTS])
    out = []
    for e in _open_locks(run, np.flatnonzero(m)):
        lab = e.get("ctx") or e.get("actor")
        if any(touches(e, o) for o in locks):
            out.append((lab, "holds" if e["event"] == "lock_acquired" else "waits", e))
    return out


def _touchers(run: RunView, objs: list[Obj], t: int, mask: np.ndarray | None,
              what: dict[str, Obj], since: int = 0) -> dict[str, int]:
    """{lane: last ts} of the contexts touching one of the objects in the window before t
    (and not before `since`); `what` gets the object each one touched last."""
    lo = max(t - WINDOW_NS, since)
    found: dict[str, int] = {}
    for e in run.events[bisect_left(run.ts, lo):bisect_right(run.ts, t)]:
        if e.get("event") == "report" and "t_s" in e:
            continue
        hit = next((o for o in objs if touches(e, o)), None) if e.get("event") != "trace_string" else None
        if hit is not None:
            found[lane_of(e)] = int(e["ts_ns"])
            what[lane_of(e)] = hit
    if mask is not None and len(mask):
        rows = np.flatnonzero(mask & (run.t_ts >= lo) & (run.t_ts <= t))
        if len(rows):
            keys = run.t_key[rows][::-1]
            uk, first = np.unique(keys, return_index=True)
            label_of = {k: lab for lab, ks in run.keys_of.items() for k in ks}
            for k, i in zip(uk.tolist(), first.tolist()):
                lab = label_of.get(k)
                row = rows[::-1][i]
                ts = int(run.t_ts[row])
                if lab is not None and ts > found.get(lab, -1):
                    found[lab] = ts
                    e = run.trace_events([row])[0]
                    what[lab] = next((o for o in objs if touches(e, o)), objs[0])
    return found


HELD_BY = re.compile(r"locks? held by (\S+?)/(\d+):")


def _named(rep: dict) -> list[tuple[str, str]]:
    """(name, role) for every string of the report's data (and text's lock holders) that
    may name a context or an actor."""
    out: list[tuple[str, str]] = []
    data = rep.get("data")
    for path, v in _walk(data):
        role = ".".join(str(p) for p in path if not isinstance(p, int) and p not in ("actor", "ctx"))
        if isinstance(v, str) and v:
            out.append((v, role or "reported"))
        elif path and path[-1] == "task" and _int(v) is not None:
            out.append((f"task-{v}", role))
    if isinstance(rep.get("actor"), str):
        out.append((rep["actor"], "reported"))
    for m in HELD_BY.finditer(rep.get("text") or ""):
        out.append((m.group(1), "holds locks (report text)"))
    return out


def _incarnation(run: RunView, data: dict, primary: list[Obj]) -> int:
    """When the object of a use-after-free was allocated: its index is reused (the report
    says which generation was accessed), and events name the index only, so touches from
    before the mm_alloc that preceded the recorded free belong to earlier objects."""
    free = data.get("free")
    fns = _int(free.get("ns")) if isinstance(free, dict) else None
    if fns is None or not primary or primary[0][0] != "mm" or primary[0][1] is None:
        return 0
    start = 0
    for e in run.events[:bisect_right(run.ts, fns)]:
        if e.get("event") == "mm_alloc" and _int(e.get("mm")) == primary[0][1]:
            start = int(e["ts_ns"])
    return start


def _tasks_named(run: RunView, named: list[tuple[str, str]], objs: list[Obj], t: int) -> dict[str, str]:
    """For each task the report names (task-N): its mm joins the objects (the mm_alloc
    that was made for it), and the context that forked it (sched_process_fork, at any
    time before the report) is returned as {lane: task}."""
    pids = {}
    for name, _role in named:
        m = re.fullmatch(r"task-(\d+)", name)
        if m and len(pids) < 4:
            pids[int(m.group(1))] = name
    out: dict[str, str] = {}
    if not pids:
        return out
    for e in run.events[:bisect_right(run.ts, t)]:
        ev = e.get("event")
        if ev == "mm_alloc" and _int(e.get("task_pid")) in pids and _int(e.get("mm")) is not None:
            if ("mm", e["mm"]) not in objs and len(objs) < MAX_OBJECTS:
                objs.append(("mm", e["mm"]))
        elif ev == "sched_process_fork" and _int(e.get("child_pid")) in pids:
            out[lane_of(e)] = pids[e["child_pid"]]
    return out


def _resolve(run: RunView, name: str, t: int, touched: dict[str, int]) -> str | None:
    """The lane a name in a report means: a context label as it is; an actor with one
    context, that one; an actor with several (exit and its worker exit:0), the one that
    touched the report's objects last, else the one active last before the report."""
    labs = run.labels_of_actor.get(name)
    if not labs or len(labs) == 1:
        return name if name in run.by_lane or name in run.keys_of else (labs[0] if labs else None)
    hit = [lab for lab in labs if lab in touched]
    if hit:
        return max(hit, key=lambda lab: touched[lab])

    def last(lab: str) -> int:
        evs = [int(e["ts_ns"]) for e in run.by_lane.get(lab, []) if int(e["ts_ns"]) <= t]
        rows = run.lane_rows(lab)
        tr = [int(run.t_ts[r]) for r in rows[run.t_ts[rows] <= t][-1:]] if len(rows) else []
        return max(evs[-1:] + tr, default=-1)

    return max(labs, key=last)


def build_picture(run: RunView, index: int, reports: list[dict]) -> Picture:
    """What to draw for report `index`: its time and reporting lane, the lanes involved
    (see the module comment for which, in that order) with their ticks, bars and racing
    events."""
    rep = reports[index]
    t, own = report_time(run, rep)
    data = rep.get("data") if isinstance(rep.get("data"), dict) else {}
    primary, objs = report_objects(rep)
    named = _named(rep)
    forked = _tasks_named(run, named, objs, t)
    pmask = run.touch_mask(primary) if len(run.t_ts) else None
    amask = run.touch_mask(objs) if len(run.t_ts) else None
    what: dict[str, Obj] = {}
    since = _incarnation(run, data, primary)
    touched = _touchers(run, objs, t, amask, what, since)

    if rep.get("kind") == "hung_task" and isinstance(data.get("actor"), str):
        reporter = data["actor"]
    elif own is not None:
        reporter = lane_of(own)
    else:
        reporter = None
        for name in (data.get("actor"), rep.get("actor")):
            if isinstance(name, str):
                reporter = _resolve(run, name, t, touched)
                if reporter:
                    break
        reporter = reporter or str(data.get("actor") or rep.get("actor") or "supervisor")

    order: list[str] = []
    roles: dict[str, list[str]] = {}

    def add(lab: str | None, role: str) -> None:
        if not lab:
            return
        if lab not in roles:
            if len(order) >= MAX_LANES:
                return
            order.append(lab)
            roles[lab] = []
        if role and role not in roles[lab] and len(roles[lab]) < 3:
            roles[lab].append(role)

    add(reporter, "reported")
    locks = [o for o in objs if o[0] == "lock"]
    held = _holders(run, locks, t)
    for lab, how, e in held:
        add(lab, f"{how} {lock_display(e['lock'], e['idx'])}")
    for name, role in named:
        add(_resolve(run, name, t, touched), role)
    for lab, task in forked.items():
        add(lab, f"forked {task}")
    for lab in sorted(touched, key=lambda lab: -touched[lab]):
        add(lab, "touched " + obj_desc(what[lab]))

    main_locks = {(o[1], o[2]) for o in primary if o[0] == "lock"}
    lanes = []
    for lab in order:
        lane = Lane(lab, run.actor_of.get(lab, lab.split(":")[0]), run.pid_of.get(lab), roles[lab],
                    reporter=lab == reporter)
        _fill_lane(run, lane, t, main_locks)
        if lane.reporter:
            _bars_from_data(lane, data, t)
        else:
            lane.racing = _last_touch(run, lab, primary, t, pmask, since)
        lanes.append(lane)
    return Picture(index, len(reports), rep, t, reporter, primary, lanes, run)


def _bars_from_data(lane: Lane, data: dict, t: int) -> None:
    """The reporting context's wait and holds as the report states them (a hung task's
    `waiting`, its `held` locks with their since_ns), when the trace lost or never had
    them (a killed process's last trace buffer)."""
    have = {(b.kind, b.lock) for b in lane.bars if b.open_end}
    w = data.get("waiting")
    items = [("wait", w)] if isinstance(w, dict) else []
    items += [("hold", h) for h in data.get("held") or [] if isinstance(h, dict)]
    for kind, d in items:
        since = _int(d.get("since_ns"))
        if not isinstance(d.get("lock"), str) or since is None or since > t:
            continue
        disp = lock_display(d["lock"], _int(d.get("idx")))
        if (kind, disp) not in have:
            lane.bars.append(Bar(kind, disp, since, t, str(d.get("mode") or ""), str(d.get("site") or ""),
                                 open_end=True, main=True))
    lane.bars.sort(key=lambda b: b.t0)


def _fill_lane(run: RunView, lane: Lane, t: int, main_locks: set[tuple]) -> None:
    evs = [e for e in run.by_lane.get(lane.label, []) if int(e.get("ts_ns", 0)) <= t]
    rows = run.lane_rows(lane.label)
    rows = rows[run.t_ts[rows] <= t] if len(rows) else rows
    lasts = ([int(evs[-1]["ts_ns"])] if evs else []) + ([int(run.t_ts[rows[-1]])] if len(rows) else [])
    if not lasts:
        return
    last = max(lasts)
    lo = last - WINDOW_NS
    ticks = [e for e in evs if int(e["ts_ns"]) >= lo and e.get("event") not in NO_TICK]
    capped_ticks = len(ticks) > TICKS_PER_LANE
    ticks = ticks[-TICKS_PER_LANE:]
    # Lock records of the lane: trace rows and (runs logged before the compact trace) JSON.
    before = rows[run.t_ts[rows] < lo] if len(rows) else rows
    inside = rows[run.t_ts[rows] >= lo] if len(rows) else rows
    start = _open_locks(run, before) + _open_json([e for e in evs if e.get("event") in LOCK_EVENTS
                                                   and int(e["ts_ns"]) < lo])
    locks = run.trace_events(inside) + [e for e in evs if e.get("event") in LOCK_EVENTS and int(e["ts_ns"]) >= lo]
    locks.sort(key=lambda e: int(e["ts_ns"]))
    bars = _bars(start, locks, t, main_locks)
    capped_bars = len(bars) > BARS_PER_LANE
    if capped_bars:
        keep = sorted(bars, key=lambda b: (not (b.open_end or b.main), -b.t1))[:BARS_PER_LANE]
        bars = sorted(keep, key=lambda b: b.t0)
    lane_lo = lo
    if capped_ticks and ticks:
        lane_lo = max(lane_lo, int(ticks[0]["ts_ns"]))
    if capped_bars:
        firsts = [b.t0 for b in bars if not (b.open_end or b.main)]
        if firsts:
            lane_lo = max(lane_lo, min(firsts))
    lane.ticks = [e for e in ticks if int(e["ts_ns"]) >= lane_lo]
    out = []
    for b in bars:
        if b.t1 < lane_lo and not b.main:
            continue
        if b.t0 < lane_lo and not b.main:
            b.t0, b.open_start = lane_lo, True
        out.append(b)
    lane.bars = out


def _bars(start: list[dict], locks: list[dict], t: int, main_locks: set[tuple]) -> list[Bar]:
    holds: dict[tuple, list[dict]] = {}
    waits: dict[tuple, dict] = {}
    for e in start:
        k = (e["lock"], e["idx"])
        if e["event"] == "lock_acquired":
            holds.setdefault(k, []).append(e)
        else:
            waits[k] = e
    bars: list[Bar] = []

    def bar(kind: str, k: tuple, e0: dict, t1: int, open_end: bool = False) -> None:
        bars.append(Bar(kind, lock_display(*k), int(e0["ts_ns"]), t1, e0.get("mode", ""), e0.get("site", ""),
                        open_end=open_end, main=k in main_locks or (k[0], None) in main_locks))

    for e in locks:
        k = (e.get("lock"), e.get("idx"))
        ev = e["event"]
        ts = int(e["ts_ns"])
        if ev == "lock_contended":
            waits[k] = e
        elif ev == "lock_acquired":
            w = waits.pop(k, None)
            if w is not None:
                bar("wait", k, w, ts)
            elif e.get("wait_ns"):
                bar("wait", k, {**e, "ts_ns": ts - int(e["wait_ns"])}, ts)
            holds.setdefault(k, []).append(e)
        elif ev == "lock_release":
            h = holds.get(k)
            if h:
                bar("hold", k, h.pop(), ts)
    for k, hs in holds.items():
        for h in hs:
            bar("hold", k, h, t, open_end=True)
    for k, w in waits.items():
        bar("wait", k, w, t, open_end=True)
    bars.sort(key=lambda b: b.t0)
    return bars


# -- the time axis (idle stretches cut out) ------------------------------------------------------------
class Axis:
    """Piecewise-linear time -> x: the instants to draw, with the largest idle gaps
    replaced by fixed-width breaks, each segment as wide as its share of time and events."""

    def __init__(self, points: list[int], x0: float, x1: float) -> None:
        pts = sorted(set(points))
        hi = pts[-1]
        if hi - pts[0] < 1000:
            pts = [hi - 1_000_000, *pts]
        lo = pts[0]
        # Cut idle gaps that are at least a quarter of their stretch, the largest compared
        # with its distance from the report first: a race's milliseconds get room next to
        # seconds of other work.
        runs = [(0, len(pts) - 1)]            # index ranges of pts, one per segment
        cuts = []
        while len(cuts) < MAX_BREAKS:
            best = None
            for r, (i, j) in enumerate(runs):
                if j <= i or pts[j] == pts[i]:
                    continue
                k = max(range(i, j), key=lambda k: pts[k + 1] - pts[k])
                g = pts[k + 1] - pts[k]
                ratio = g / (pts[j] - pts[i])
                near = g / (hi - pts[k])        # a gap close to the report first: that is the zoom
                if g >= max(200_000, 0.005 * (hi - lo)) and ratio >= 0.25 and (best is None or near > best[0]):
                    best = (near, r, k)
            if best is None:
                break
            _near, r, k = best
            i, j = runs[r]
            runs[r:r + 1] = [(i, k), (k + 1, j)]
            cuts.append((pts[k], pts[k + 1]))
        cuts.sort()
        segs, s = [], lo
        for a, b in cuts:
            segs.append([s, a])
            s = b
        segs.append([s, hi])
        for sg in segs:      # a margin, and some width for a lone instant
            pad = max((sg[1] - sg[0]) * 0.03, 20_000)
            sg[0] -= pad
            sg[1] += pad
        n = [sum(1 for p in pts if sg[0] <= p <= sg[1]) for sg in segs]
        dur = [sg[1] - sg[0] for sg in segs]
        avail = (x1 - x0) - BREAK_W * len(cuts)
        share = [0.5 * n[i] / sum(n) + 0.5 * dur[i] / sum(dur) for i in range(len(segs))]
        if len(segs) > 1 and share[-1] < LAST_SHARE:      # the report's own stretch: room to read it
            rest = sum(share[:-1])
            share = [x * (1 - LAST_SHARE) / rest for x in share[:-1]] + [LAST_SHARE]
        w = [max(MIN_SEG_W, avail * s) for s in share]
        scale = avail / sum(w)
        w = [x * scale for x in w]
        self.knots: list[tuple[float, float]] = []
        self.segments: list[tuple[float, float, float, float]] = []   # t0, t1, x0, x1
        self.breaks: list[tuple[float, float, float, float]] = []     # x0, x1, t0, t1
        x = x0
        for i, sg in enumerate(segs):
            self.knots += [(sg[0], x), (sg[1], x + w[i])]
            self.segments.append((sg[0], sg[1], x, x + w[i]))
            x += w[i]
            if i < len(cuts):
                self.breaks.append((x, x + BREAK_W, sg[1], segs[i + 1][0]))
                x += BREAK_W
        self._kt = [k[0] for k in self.knots]

    def x(self, ts: float) -> float:
        kt, kn = self._kt, self.knots
        if ts <= kt[0]:
            return kn[0][1]
        if ts >= kt[-1]:
            return kn[-1][1]
        i = bisect_right(kt, ts)
        (ta, xa), (tb, xb) = kn[i - 1], kn[i]
        return xa if tb == ta else xa + (ts - ta) / (tb - ta) * (xb - xa)


def _nice(step: float) -> float:
    e = 10 ** math.floor(math.log10(step))
    for m in (1, 2, 5, 10):
        if m * e >= step:
            return m * e
    return 10 * e


def fmt_dur(ns: float) -> str:
    if ns >= 1e9:
        return f"{ns / 1e9:.2f} s"
    if ns >= 1e6:
        return f"{ns / 1e6:.1f} ms"
    return f"{ns / 1e3:.0f} µs"


# -- SVG ---------------------------------------------------------------------------------------------
_BAD_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def esc(s: Any) -> str:
    """Text or attribute value, XML-escaped (and stripped of characters XML forbids)."""
    return html.escape(_BAD_XML.sub("?", str(s)), quote=True)


def _short(s: str, n: int) -> str:
    return s if len(s) <= n else s[:n - 1] + "…"


def tick_label(e: dict) -> str:
    ev = e.get("event", "?")
    if ev == "msg_send":
        return f"→{e.get('peer', '')} {e.get('type', '')}"
    if ev == "msg_recv":
        return f"←{e.get('peer', '')} {e.get('type', '')}"
    if ev == "sched_point":
        return "pt " + str(e.get("point", "")).split(".")[-1]
    if ev in LOCK_EVENTS:
        return f"{ev.removeprefix('lock_')} {lock_display(e.get('lock', '?'), e.get('idx'))}"
    for k in MM_KEYS:
        if _int(e.get(k)) is not None:
            return f"{ev} mm{e[k]}"
    for k in PFN_KEYS:
        if _int(e.get(k)) is not None:
            return f"{ev} {e[k]:#x}"
    return ev


def _tip(run: RunView, e: dict) -> str:
    skip = {"run_id", "seed", "ts_ns", "seq", "event", "text", "data"}
    rest = " ".join(f"{k}={v}" for k, v in e.items() if k not in skip)
    return _short(f"{run.secs(int(e.get('ts_ns', 0))):.6f} s  {e.get('event')}  {rest}", 400)


def _colour(lock: str) -> str:
    name = lock.split("#")[0]
    return PALETTE[sum(name.encode()) % len(PALETTE)]


def render(pic: Picture) -> str:
    """The picture as an SVG document (a string)."""
    run, rep = pic.run, pic.rep
    lanes = pic.lanes
    points = [pic.t_ns]
    for ln in lanes:
        points += [int(e["ts_ns"]) for e in ln.ticks]
        for b in ln.bars:
            points += [b.t0, b.t1]
        if ln.racing is not None:
            points.append(int(ln.racing["ts_ns"]))
    ax = Axis(points, PLOT_X0, PLOT_X1)
    lanes_y0 = HEADER_H
    lanes_y1 = lanes_y0 + LANE_H * max(1, len(lanes))
    text_lines = [ln for ln in str(rep.get("text") or "").splitlines() if ln.strip()][:30]
    height = lanes_y1 + 40 + 14 * len(text_lines) + 20
    o: list[str] = []
    w = o.append
    w('<?xml version="1.0" encoding="UTF-8"?>')
    w(f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
      f'viewBox="0 0 {WIDTH} {height}" font-family="DejaVu Sans Mono, Menlo, Consolas, monospace" font-size="10">')
    w(f"<title>{esc(rep.get('kind', '?'))}: {esc(rep.get('title', ''))}</title>")
    w('<defs><pattern id="hatch" patternUnits="userSpaceOnUse" width="6" height="6" '
      'patternTransform="rotate(45)"><rect width="6" height="6" fill="#ffe0e0"/>'
      f'<line x1="0" y1="0" x2="0" y2="6" stroke="{REPORT}" stroke-width="2.2"/></pattern></defs>')
    w(f'<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="white"/>')
    # Header.
    info = run.info
    w(f'<text class="title" x="12" y="22" font-size="15" font-weight="bold" fill="{REPORT}">'
      f"{esc(rep.get('kind', '?'))}: {esc(_short(str(rep.get('title', '')), 150))}</text>")
    sub = (f"report {pic.index + 1} of {pic.total} · run {info.get('run_id', '?')} · seed {info.get('seed', '?')}"
           f" · at {run.secs(pic.t_ns):.3f} s since boot · reported by {pic.reporter}")
    w(f'<text x="12" y="40" font-size="11">{esc(sub)}</text>')
    about = ", ".join(obj_desc(x) for x in pic.primary[:6]) or "(no object in the report's data)"
    w(f'<text x="12" y="56" font-size="11">{esc("about: " + about)}</text>')
    _legend(w, 12, 74)
    # Time skipped.
    for bx0, bx1, t0, t1 in ax.breaks:
        w(f'<rect class="break" x="{bx0:.1f}" y="{lanes_y0}" width="{bx1 - bx0:.1f}" height="{lanes_y1 - lanes_y0}" '
          f'fill="#eeeeee"><title>{esc(f"{fmt_dur(t1 - t0)} without events skipped")}</title></rect>')
        w(f'<text x="{(bx0 + bx1) / 2:.1f}" y="{lanes_y1 + 30}" font-size="8" text-anchor="middle" '
          f'fill="#777">+{esc(fmt_dur(t1 - t0))}</text>')
    # Lanes.
    lane_y = {}
    for i, ln in enumerate(lanes):
        y0 = lanes_y0 + i * LANE_H
        lane_y[ln.label] = y0
        _lane(w, run, ax, ln, y0, i)
    # The report marker and the racing pair.
    xr = ax.x(pic.t_ns)
    yr = lane_y.get(pic.reporter, lanes_y0) + (TICK_Y0 + TICK_Y1) / 2
    w(f'<line x1="{xr:.1f}" y1="{HEADER_H - 12}" x2="{xr:.1f}" y2="{lanes_y1}" stroke="{REPORT}" '
      'stroke-width="1" stroke-dasharray="4,3"/>')
    for ln in lanes:
        if ln.racing is None:
            continue
        xe = ax.x(int(ln.racing["ts_ns"]))
        ye = lane_y[ln.label] + (TICK_Y0 + TICK_Y1) / 2
        mx = (xe + xr) / 2
        w(f'<path class="race-link" d="M{xe:.1f},{ye:.1f} C{mx:.1f},{ye:.1f} {mx:.1f},{yr:.1f} {xr:.1f},{yr:.1f}" '
          f'fill="none" stroke="{HIGHLIGHT}" stroke-width="1.6" stroke-dasharray="5,3"/>')
    anchor = "end" if xr > (PLOT_X0 + PLOT_X1) / 2 else "start"
    tx = xr - 6 if anchor == "end" else xr + 6
    w(f'<g class="report" data-lane="{esc(pic.reporter)}">'
      f'<polygon points="{xr:.1f},{yr - 8:.1f} {xr + 7:.1f},{yr:.1f} {xr:.1f},{yr + 8:.1f} {xr - 7:.1f},{yr:.1f}" '
      f'fill="{REPORT}" stroke="black" stroke-width="0.8"><title>{esc(rep.get("title", ""))}</title></polygon>'
      f'<text x="{tx:.1f}" y="{HEADER_H - 14}" text-anchor="{anchor}" font-size="11" font-weight="bold" '
      f'fill="{REPORT}">{esc(_short(str(rep.get("title", "")), 110))} ({run.secs(pic.t_ns):.4f} s)</text></g>')
    # The axis.
    ya = lanes_y1 + 4
    w(f'<line x1="{PLOT_X0}" y1="{ya}" x2="{PLOT_X1}" y2="{ya}" stroke="black"/>')
    last_x = -1e9
    for t0, t1, sx0, sx1 in ax.segments:
        width = sx1 - sx0
        step = _nice(max((t1 - t0) / max(1.0, width / 95), 1))
        dec = max(1, min(6, math.ceil(-math.log10(step / 1e9) - 1e-9)))
        k = math.ceil((t0 - run.boot_ns) / step)
        while True:
            ts = run.boot_ns + k * step
            if ts > t1:
                break
            x = ax.x(ts)
            if x - last_x >= 70:
                w(f'<line x1="{x:.1f}" y1="{ya}" x2="{x:.1f}" y2="{ya + 5}" stroke="black"/>')
                w(f'<text x="{x:.1f}" y="{ya + 16}" font-size="9" text-anchor="middle">'
                  f"{(ts - run.boot_ns) / 1e9:.{dec}f}</text>")
                last_x = x
            k += 1
    w(f'<text x="{PLOT_X0 - 30}" y="{ya + 16}" font-size="9" text-anchor="end">s since boot</text>')
    # The report's text.
    y = lanes_y1 + 52
    for line in text_lines:
        w(f'<text x="12" y="{y}" font-size="10" fill="#333" xml:space="preserve">{esc(_short(line, 200))}</text>')
        y += 14
    w("</svg>")
    return "\n".join(o) + "\n"


def _legend(w: Any, x: float, y: float) -> None:
    items = [
        (lambda c: f'<line x1="{c}" y1="{y - 8}" x2="{c}" y2="{y + 2}" stroke="#444"/>', "event"),
        (lambda c: f'<line x1="{c}" y1="{y - 9}" x2="{c}" y2="{y + 3}" stroke="{HIGHLIGHT}" stroke-width="3"/>'
                   f'<circle cx="{c}" cy="{y - 3}" r="3.5" fill="{HIGHLIGHT}"/>', "racing: last touch of the object"),
        (lambda c: f'<rect x="{c - 4}" y="{y - 7}" width="26" height="8" fill="{PALETTE[0]}" stroke="#333" '
                   'stroke-width="0.6"/>', "lock held"),
        (lambda c: f'<rect x="{c - 4}" y="{y - 7}" width="26" height="8" fill="url(#hatch)" stroke="{REPORT}"/>',
         "lock wait"),
        (lambda c: f'<polygon points="{c},{y - 9} {c + 6},{y - 3} {c},{y + 3} {c - 6},{y - 3}" fill="{REPORT}"/>',
         "report"),
        (lambda c: f'<rect x="{c - 4}" y="{y - 9}" width="20" height="12" fill="#eeeeee"/>', "idle time cut out"),
    ]
    w('<g class="legend" font-size="10">')
    cx = x + 6
    for glyph, label in items:
        w(glyph(cx))
        w(f'<text x="{cx + 28}" y="{y}">{esc(label)}</text>')
        cx += 44 + 6.2 * len(label)
    w("</g>")


def _lane(w: Any, run: RunView, ax: Axis, ln: Lane, y0: float, i: int) -> None:
    w(f'<g class="lane" data-lane="{esc(ln.label)}">')
    w(f'<rect x="0" y="{y0}" width="{WIDTH}" height="{LANE_H}" fill="{"#f7f7f7" if i % 2 else "#ffffff"}" '
      'fill-opacity="0.6"/>')
    w(f'<line x1="0" y1="{y0 + LANE_H}" x2="{WIDTH}" y2="{y0 + LANE_H}" stroke="#dddddd"/>')
    colour = REPORT if ln.reporter else "black"
    w(f'<text class="lane-label" x="10" y="{y0 + 66}" font-size="12" font-weight="bold" fill="{colour}">'
      f"{esc(_short(ln.label, 24))}</text>")
    who = f"{ln.actor}" + (f"/{ln.pid}" if ln.pid is not None else "")
    w(f'<text x="10" y="{y0 + 80}" font-size="9" fill="#555">{esc(_short(who, 30))}</text>')
    for j, role in enumerate(ln.roles[:2]):
        w(f'<text x="10" y="{y0 + 93 + 11 * j}" font-size="8.5" fill="#555">{esc(_short(role, 34))}</text>')
    w(f'<line x1="{PLOT_X0}" y1="{y0 + TICK_Y1}" x2="{PLOT_X1}" y2="{y0 + TICK_Y1}" stroke="#cccccc"/>')
    # Lock bars, stacked by nesting.
    ends = [-1e9] * BAR_LEVELS
    for b in ln.bars:
        x0, x1 = ax.x(b.t0), ax.x(b.t1)
        lvl = next((k for k in range(BAR_LEVELS) if ends[k] <= x0), BAR_LEVELS - 1)
        ends[lvl] = max(ends[lvl], x1 + 1)
        y = y0 + BAR_Y + lvl * BAR_STEP
        wd = max(1.5, x1 - x0)
        tip = (f"{'held' if b.kind == 'hold' else 'waited for'} {b.lock} {b.mode} "
               f"{run.secs(b.t0):.6f}..{run.secs(b.t1):.6f} s ({fmt_dur(b.t1 - b.t0)})"
               + (f" at {b.site}" if b.site else "") + (" (before the window)" if b.open_start else "")
               + (" (still at the report)" if b.open_end else ""))
        if b.kind == "hold":
            w(f'<rect class="hold" data-lock="{esc(b.lock)}" x="{x0:.1f}" y="{y}" width="{wd:.1f}" height="{BAR_H}" '
              f'fill="{_colour(b.lock)}" stroke="{"black" if b.main else "#333"}" '
              f'stroke-width="{1.4 if b.main else 0.5}"><title>{esc(tip)}</title></rect>')
        else:
            w(f'<rect class="wait" data-lock="{esc(b.lock)}" x="{x0:.1f}" y="{y}" width="{wd:.1f}" height="{BAR_H}" '
              f'fill="url(#hatch)" stroke="{REPORT}" stroke-width="0.8"><title>{esc(tip)}</title></rect>')
        label = ("◀" if b.open_start else "") + (b.lock if b.kind == "hold" else f"wait {b.lock}")
        if wd >= 4.6 * len(label) + 4:
            w(f'<text x="{x0 + 2:.1f}" y="{y + 6.5}" font-size="7.5" fill="{"#700" if b.kind == "wait" else "#111"}"'
              f' {HALO} pointer-events="none">{esc(label)}</text>')
    # Event ticks, labelled where there is room.
    last_lx = -1e9
    racing_ts = int(ln.racing["ts_ns"]) if ln.racing is not None else None
    racing_x = ax.x(racing_ts) if racing_ts is not None else -1e9
    for e in ln.ticks:
        ts = int(e["ts_ns"])
        if ts == racing_ts and ln.racing is not None and ln.racing.get("event") == e.get("event"):
            continue           # drawn below, highlighted
        x = ax.x(ts)
        w(f'<line class="tick" data-event="{esc(e.get("event", ""))}" x1="{x:.1f}" y1="{y0 + TICK_Y0}" '
          f'x2="{x:.1f}" y2="{y0 + TICK_Y1}" stroke="#444" stroke-width="1"><title>{esc(_tip(run, e))}</title></line>')
        if x - last_lx >= 10 and abs(x - racing_x) >= 12:
            w(_tick_text(x, y0, _short(tick_label(e), 20), "#222"))
            last_lx = x
    if ln.racing is not None:
        e = ln.racing
        x = ax.x(int(e["ts_ns"]))
        w(f'<g class="racing" data-event="{esc(e.get("event", ""))}"><title>{esc("racing: " + _tip(run, e))}</title>'
          f'<line x1="{x:.1f}" y1="{y0 + TICK_Y0 - 4}" x2="{x:.1f}" y2="{y0 + TICK_Y1 + 2}" stroke="{HIGHLIGHT}" '
          f'stroke-width="3"/><circle cx="{x:.1f}" cy="{y0 + (TICK_Y0 + TICK_Y1) / 2:.1f}" r="4" fill="{HIGHLIGHT}"/>'
          f"{_tick_text(x, y0, _short(tick_label(e), 24), HIGHLIGHT, bold=True)}</g>")
    w("</g>")


def _tick_text(x: float, y0: float, s: str, fill: str, bold: bool = False) -> str:
    y = y0 + TICK_Y0 - 3
    weight = ' font-weight="bold"' if bold else ""
    return (f'<text x="{x + 1:.1f}" y="{y:.1f}" font-size="8.5" fill="{fill}"{weight} {HALO} '
            f'transform="rotate(-35 {x + 1:.1f} {y:.1f})">{esc(s)}</text>')


# -- entry points --------------------------------------------------------------------------------------
def draw_report(run_dir: str, index: int, reports: list[dict] | None = None,
                run: RunView | None = None) -> str:
    """Draw report `index` (0-based) of the run; returns the SVG's path. Raises on error."""
    if reports is None:
        reports = _read_json(os.path.join(run_dir, "reports.json")) or []
    run = run if run is not None else RunView(run_dir)
    svg = render(build_picture(run, index, reports))
    path = os.path.join(run_dir, svg_name(index))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(svg)
    os.replace(tmp, path)
    return path


def draw_reports(run_dir: str) -> list[str]:
    """A picture of every report of the run: reports/report-N.svg, and each reports.json
    entry gets its "svg" (relative to the run folder). Returns the paths written. Never
    raises: a failure is printed to stderr and logged as a `picture_failed` event."""
    written: list[str] = []
    try:
        reports = _read_json(os.path.join(run_dir, "reports.json"))
        if not isinstance(reports, list) or not reports:
            return written
        run = RunView(run_dir)
        for i in range(len(reports)):
            try:
                written.append(draw_report(run_dir, i, reports, run))
                reports[i]["svg"] = svg_name(i)
            except Exception as e:
                _failed(run_dir, i, e)
        _prune(run_dir, len(reports))
        tmp = os.path.join(run_dir, "reports.json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(reports, f, indent=1, default=str)
        os.replace(tmp, os.path.join(run_dir, "reports.json"))
    except Exception as e:
        _failed(run_dir, None, e)
    return written


def _prune(run_dir: str, n: int) -> None:
    """Pictures of an earlier run in the same folder that this run has no report for."""
    d = os.path.join(run_dir, "reports")
    for name in os.listdir(d) if os.path.isdir(d) else []:
        m = re.fullmatch(r"report-(\d+)\.svg", name)
        if m and int(m.group(1)) > n:
            os.remove(os.path.join(d, name))


def _failed(run_dir: str, index: int | None, e: BaseException) -> None:
    what = "the pictures" if index is None else f"the picture of report {index + 1}"
    try:
        sys.stderr.write(f"ksmlab: picture: could not draw {what}: {type(e).__name__}: {e}\n")
        info = _read_json(os.path.join(run_dir, "cluster.json")) or {}
        log = EventLog(run_dir, "picture", str(info.get("run_id", "?")), int(info.get("seed") or 0))
        log("picture_failed", report=None if index is None else index + 1, error=f"{type(e).__name__}: {e}",
            traceback=traceback.format_exc(limit=6))
        log.close()
    except Exception:
        pass


# -- the campaign page -----------------------------------------------------------------------------------
def write_campaign_index(out: dict, root: str) -> str | None:
    """<root>/index.html for a stress campaign's result (stress.main's `out`): per bug the
    runs, detected, rate, median time to detect, report kinds, and the first picture of its
    first failing run. Returns the path, or None (printed to stderr) when it cannot."""
    try:
        return _write_index(out, root)
    except Exception as e:
        sys.stderr.write(f"ksmlab: picture: could not write the campaign index: {type(e).__name__}: {e}\n")
        return None


def _write_index(out: dict, root: str) -> str:
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "index.html")
    bugs = out.get("bugs") or {}
    rows, sections = [], []
    for name, s in bugs.items():
        runs, hit = int(s.get("runs") or 0), int(s.get("detected") or 0)
        med = s.get("median_s_to_detect")
        rate = f"{100 * hit / runs:.0f}%" if runs else "-"
        rows.append(
            f"<tr><td><a href='#{esc(_anchor(name))}'>{esc(name)}</a></td><td>{'fixed' if s.get('fixed') else 'variant'}"
            f"</td><td>{runs}</td><td>{hit}</td><td>{rate}</td><td>{'-' if med is None else f'{med:.2f} s'}</td>"
            f"<td>{esc(', '.join(s.get('report_kinds') or []) or '-')}</td>"
            f"<td>{esc(s.get('first_seed') if s.get('first_seed') is not None else '-')}</td></tr>")
        sec = [f"<h2 id='{esc(_anchor(name))}'>{esc(name)}</h2>"]
        failing = s.get("failing_runs") or []
        if not failing:
            sec.append("<p>No failing run.</p>")
        else:
            rd = failing[0]
            rel = os.path.relpath(rd, root)
            reps = _read_json(os.path.join(rd, "reports.json")) or []
            sec.append(f"<p>First failing run: <a href='{esc(rel)}/'>{esc(rel)}</a> "
                       f"(<code>ksmlab replay {esc(rd)}</code>)</p>")
            first = next((r for r in reps if isinstance(r, dict) and r.get("svg")), None)
            if first is not None:
                src = os.path.join(rel, first["svg"])
                sec.append(f"<p>{esc(first.get('kind', ''))}: {esc(first.get('title', ''))}</p>"
                           f"<p><a href='{esc(src)}'><img src='{esc(src)}' alt='{esc(first.get('title', ''))}' "
                           "style='max-width:100%;border:1px solid #ccc'></a></p>")
            else:
                titles = "; ".join(str(r.get("title", "")) for r in reps if isinstance(r, dict))
                sec.append(f"<p>No picture ({esc(titles) or 'no reports.json'}).</p>")
        sections.append("\n".join(sec))
    meta = (f"seed {out.get('seed')} · sched {out.get('sched')}/{out.get('depth')} · "
            f"{out.get('seconds')} s" + (f" · scenario {out.get('scenario')}" if out.get("scenario") else ""))
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>ksmlab stress campaign</title>\n"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}td:first-child{text-align:left}"
        "</style></head><body>\n"
        f"<h1>ksmlab stress campaign</h1>\n<p>{esc(meta)}</p>\n"
        "<table><tr><th>bug</th><th>kernel</th><th>runs</th><th>detected</th><th>rate</th>"
        "<th>median time to detect</th><th>report kinds</th><th>first seed</th></tr>\n"
        + "\n".join(rows) + "\n</table>\n" + "\n".join(sections) + "\n</body></html>\n")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, path)
    return os.path.abspath(path)


def _anchor(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)




def attach_pictures(run_dir: str | None, reports: list[dict]) -> None:
    """Draw the run's reports and give each entry of `reports` (the run's reports, in
    reports.json order) its "svg". Never raises (run_scenario calls it at every run's end)."""
    if not run_dir or not reports:
        return
    try:
        written = set(draw_reports(run_dir))
        for i, r in enumerate(reports):
            if os.path.join(run_dir, svg_name(i)) in written:
                r["svg"] = svg_name(i)
    except Exception as e:
        _failed(run_dir, None, e)
