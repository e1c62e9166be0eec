# `ksmlab trace RUN_DIR -o trace.json`: a run in the Trace Event Format.
#
# ui.perfetto.dev and chrome://tracing open the JSON object format of the Trace Event
# Format (Google's "Trace Event Format" document): {"traceEvents": [...]}. The mapping:
#
#   process track   one per actor process (pid = the actor's OS pid), named by an "M"
#                   process_name event; thread track: one per kernel context (ksmd,
#                   exit:3, ...) within it, tid numbered per process, named by thread_name
#   lock hold       an async span "b"/"e" (cat "lock") from lock_acquired to the matching
#                   lock_release of the same lock in the same context; ids are unique per
#                   hold, so a lock released out of order still closes the right span
#   lock wait       an async span (cat "lock_wait") from lock_contended to lock_acquired
#   message         a flow "s" -> "f" (cat "msg", bound to 1 µs "X" slices at both ends)
#                   from the sender's context to the receiver's, matched by (sender, id);
#                   notifications carry no id and are only the sender's slice
#   kernel event    an instant "i" on its context's track (faults, kills, knob writes,
#                   merges, ...); a report is a global instant ("s": "g")
#   counters        "C" events from the supervisor's ksm_counters samples: one counter
#                   track per KSM counter, and free frames
#
# Spans still open when a process's records end (a killed task, the end of the run) are
# closed at that process's last timestamp with args.unterminated = true, so every "b" has
# its "e". The same writer takes the simulator's schedules (ksmlab sim --replay S --trace
# FILE): one process, a thread per context, one µs per schedule op.
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from typing import Any

from actors.log import read_run
from ksmlab.sim.world import ScheduleResult

_SKIP = {"run_id", "seed", "actor", "pid", "ts_ns", "seq", "event", "ctx", "text"}
COUNTER_EVENT = "ksm_counters"


class TraceWriter:
    """Collects Trace Event Format events: named tracks, spans, flows, instants, counters."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.procs: dict[int, str] = {}
        self.threads: dict[tuple[int, str], int] = {}
        self._next_id = 0
        self._open: dict[tuple, list[tuple[str, str]]] = defaultdict(list)   # key -> [(id, name)]
        self.last_ts: dict[int, float] = {}

    def tid(self, pid: int, ctx: str, proc_name: str) -> int:
        if pid not in self.procs:
            self.procs[pid] = proc_name
        t = self.threads.get((pid, ctx))
        if t is None:
            t = self.threads[(pid, ctx)] = len([k for k in self.threads if k[0] == pid]) + 1
        return t

    def _new_id(self) -> str:
        self._next_id += 1
        return f"0x{self._next_id:x}"

    def _note(self, pid: int, ts: float) -> None:
        self.last_ts[pid] = max(self.last_ts.get(pid, ts), ts)

    def begin(self, key: tuple, cat: str, name: str, pid: int, tid: int, ts: float, args: dict | None = None) -> None:
        i = self._new_id()
        self._open[key].append((i, name))
        self.events.append({"ph": "b", "cat": cat, "name": name, "id": i, "pid": pid, "tid": tid, "ts": ts,
                            "args": args or {}})
        self._note(pid, ts)

    def end(self, key: tuple, cat: str, pid: int, tid: int, ts: float) -> bool:
        stack = self._open.get(key)
        if not stack:
            return False
        i, name = stack.pop()
        self.events.append({"ph": "e", "cat": cat, "name": name, "id": i, "pid": pid, "tid": tid, "ts": ts})
        self._note(pid, ts)
        return True

    def instant(self, name: str, pid: int, tid: int, ts: float, args: dict, scope: str = "t") -> None:
        self.events.append({"ph": "i", "s": scope, "name": name, "cat": "kernel", "pid": pid, "tid": tid,
                            "ts": ts, "args": args})
        self._note(pid, ts)

    def slice(self, name: str, cat: str, pid: int, tid: int, ts: float, args: dict | None = None) -> None:
        self.events.append({"ph": "X", "name": name, "cat": cat, "pid": pid, "tid": tid, "ts": ts, "dur": 1,
                            "args": args or {}})
        self._note(pid, ts)

    def flow(self, phase: str, fid: str, name: str, pid: int, tid: int, ts: float) -> None:
        ev = {"ph": phase, "id": fid, "cat": "msg", "name": name, "pid": pid, "tid": tid, "ts": ts}
        if phase == "f":
            ev["bp"] = "e"
        self.events.append(ev)

    def counter(self, name: str, pid: int, ts: float, values: dict[str, int]) -> None:
        self.events.append({"ph": "C", "name": name, "pid": pid, "tid": 0, "ts": ts, "args": values})

    def close_open(self) -> None:
        """Close every span still open at its process's last timestamp."""
        for key, stack in self._open.items():
            cat, pid, tid = key[0], key[1], key[2]
            while stack:
                i, name = stack.pop()
                self.events.append({"ph": "e", "cat": cat, "name": name, "id": i, "pid": pid, "tid": tid,
                                    "ts": self.last_ts.get(pid, 0.0), "args": {"unterminated": True}})

    def document(self, meta: dict[str, Any]) -> dict:
        self.close_open()
        names = [{"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": f"{n} ({pid})"}}
                 for pid, n in sorted(self.procs.items())]
        names += [{"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": ctx}}
                  for (pid, ctx), tid in sorted(self.threads.items(), key=lambda kv: (kv[0][0], kv[1]))]
        body = sorted(self.events, key=lambda e: e["ts"])
        return {"traceEvents": names + body, "displayTimeUnit": "ns", "otherData": meta}


def _args(e: dict) -> dict:
    return {k: v for k, v in e.items() if k not in _SKIP}


def from_run(run_dir: str) -> dict:
    """The Trace Event Format document of a cluster run's logs."""
    events, tr = read_run(run_dir)
    w = TraceWriter()
    merged = events + tr.to_events()
    merged.sort(key=lambda e: (e.get("ts_ns", 0), e.get("pid", 0), e.get("seq", 0)))
    t0 = merged[0]["ts_ns"] if merged else 0
    sends: dict[tuple[str, int], tuple[int, int, float, str]] = {}
    for e in merged:
        pid, actor = int(e.get("pid", 0)), e.get("actor", "?")
        ctx = e.get("ctx") or actor
        tid = w.tid(pid, ctx, actor)
        ts = (e["ts_ns"] - t0) / 1000.0
        name = e.get("event", "")
        lock = f"{e.get('lock')}[{e.get('idx', 0)}]" if name.startswith("lock_") else ""
        if name == "lock_contended":
            w.begin(("lock_wait", pid, tid, lock), "lock_wait", f"wait {lock}", pid, tid, ts,
                    {"mode": e.get("mode"), "site": e.get("site")})
        elif name == "lock_acquired":
            w.end(("lock_wait", pid, tid, lock), "lock_wait", pid, tid, ts)
            w.begin(("lock", pid, tid, lock), "lock", lock, pid, tid, ts, {"mode": e.get("mode"), "site": e.get("site")})
        elif name == "lock_release":
            w.end(("lock", pid, tid, lock), "lock", pid, tid, ts)
        elif name == "lock_acquire":
            continue
        elif name == "msg_send":
            w.slice(f"send {e.get('type')}", "msg", pid, tid, ts, {"to": e.get("peer"), "id": e.get("id")})
            if e.get("id"):
                sends[(actor, int(e["id"]))] = (pid, tid, ts, str(e.get("type")))
        elif name == "msg_recv":
            w.slice(f"recv {e.get('type')}", "msg", pid, tid, ts, {"from": e.get("peer"), "id": e.get("id")})
            src = sends.pop((str(e.get("peer")), int(e.get("id") or 0)), None)
            if src is not None:
                fid = f"msg:{e.get('peer')}:{e.get('id')}"
                w.flow("s", fid, src[3], src[0], src[1], src[2])
                w.flow("f", fid, src[3], pid, tid, ts)
        elif name == COUNTER_EVENT:
            vals = {k: int(v) for k, v in _args(e).items() if isinstance(v, int)}
            w.counter("free frames", pid, ts, {"free_frames": vals.pop("free_frames", 0)})
            for k, v in vals.items():
                w.counter(k, pid, ts, {k: v})
        elif name == "trace_string":
            continue
        else:
            w.instant(name, pid, tid, ts, _args(e), "g" if name == "report" else "t")
    return w.document({"run_dir": os.path.abspath(run_dir), "source": "ksmlab cluster run"})


def from_schedule(res: ScheduleResult, scenario: str, schedule: str) -> dict:
    """The Trace Event Format document of one simulated schedule: a thread per context,
    one µs per op, lock holds from each acquire op to its release op."""
    w = TraceWriter()
    pid = 1
    tids = [w.tid(pid, n, f"sim {scenario}") for n in res.names]
    for step, t, what, detail in res.trace:
        tid, ts = tids[t], float(step)
        if what in ("lock", "down_read", "down_write"):
            w.begin(("lock", pid, tid, detail), "lock", detail, pid, tid, ts, {"op": what})
        elif what in ("trylock", "down_read_trylock", "down_write_trylock"):
            w.instant(f"{what}({detail})", pid, tid, ts, {})
        elif what in ("unlock", "up_read", "up_write"):
            if not w.end(("lock", pid, tid, detail), "lock", pid, tid, ts):
                w.instant(f"{what}({detail})", pid, tid, ts, {"note": "held since a trylock"})
        elif what == "wait":
            w.instant(f"wait {detail}", pid, tid, ts, {})
        else:
            w.instant(f"{what}({detail})" if detail else what, pid, tid, ts, {})
    for step, _t_ns, ctx, ev, fields in res.events:
        if ctx in res.names:
            w.instant(ev, pid, tids[res.names.index(ctx)], float(step) + 0.5, dict(fields))
    if res.failure is not None:
        ctx = res.failure.get("ctx", "")
        tid = tids[res.names.index(ctx)] if ctx in res.names else tids[0]
        w.instant("report", pid, tid, float(res.failure.get("step", res.steps)) + 0.9,
                  {"kind": res.failure.get("kind"), "title": res.failure.get("title")}, "g")
    return w.document({"source": "ksmlab sim", "scenario": scenario, "schedule": schedule})


def main(a: argparse.Namespace) -> int:
    if not os.path.isdir(os.path.join(a.run, "logs")):
        print(f"ksmlab trace: ENOENT: {a.run} has no logs folder", file=sys.stderr)
        return 2
    doc = from_run(a.run)
    out = a.output or os.path.join(a.run, "trace.json")
    with open(out, "w", encoding="utf-8") as f:
        # dumps, not dump: json.dump streams through the pure-Python encoder, ten times slower.
        f.write(json.dumps(doc, separators=(",", ":"), default=str))
    print(f"{out}: {len(doc['traceEvents'])} trace events; open it in https://ui.perfetto.dev")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run folder")
    p.add_argument("-o", "--output", help="where to write (default: RUN/trace.json)")
