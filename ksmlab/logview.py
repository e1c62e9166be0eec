# `ksmlab log`: a run's merged timeline, printed as trace-cmd prints a trace.
#
#   ksmd-1234     [ksmd]      12.345678: ksm_merge_one_page: mm=3(pid 107) addr=0x1000000 pfn=0x2a
#   exit-1230     [exit:2]    12.345901: lock_contended: ksm_mmlist_lock excl at __ksm_exit
#
# comm-pid, the kernel context in brackets (the model's CPU: one per actor thread),
# seconds since the first event, the event, its fields: addresses and pfns in hex, page
# and vma flags decoded, an mm shown with the pid of the task that owns it. The sources
# are the per-process JSON-lines logs and the compact lock/message trace
# (actors/tracebuf.py); lock and message records are hidden unless --locks (or a filter
# that asks for them: --lock, --around), and they are filtered as numpy columns before
# any is turned into a line, so a long soak's logs merge and filter in seconds.
#
# --around N shows what led to report N (1 = the first in reports.json): every event
# of the contexts the report names (the reporter, and any context or actor named in its
# data: KASAN's allocating and freeing tasks, a hung task's lock holders, lockdep's
# chain) in the window before it, lock operations included. --columns prints one column
# per actor (VOPR style), read top to bottom.
from __future__ import annotations

import argparse
import fnmatch
import glob
import json
import os
import re
import shutil
import sys
from collections import Counter
from typing import Any

import numpy as np

from actors.kernel.debug import flag_names
from actors.log import read_run
from actors.tracebuf import KIND_ID, Trace
from shared_mem.layout import (
    VM_EXEC,
    VM_LOCKED,
    VM_MAYREAD,
    VM_MAYSHARE,
    VM_MAYWRITE,
    VM_MERGEABLE,
    VM_READ,
    VM_SHARED,
    VM_WRITE,
)

_STAMP = {"run_id", "seed", "actor", "pid", "ts_ns", "seq", "event", "ctx"}
_HEX_KEYS = {"addr", "address", "start", "end", "vm_start", "vm_end", "store_addr", "fault_addr", "pte", "kpfn",
             "pfn", "old_pfn", "new_pfn", "page", "kpage"}
_PAGE_FLAG_KEYS = {"flags", "page_flags"}
_VM_FLAGS = ((VM_READ, "read"), (VM_WRITE, "write"), (VM_EXEC, "exec"), (VM_SHARED, "shared"),
             (VM_MAYREAD, "mayread"), (VM_MAYWRITE, "maywrite"), (VM_MAYSHARE, "mayshare"),
             (VM_LOCKED, "locked"), (VM_MERGEABLE, "mergeable"))
AROUND_S = 2.0           # how far back --around looks
LEAF_LOCKS = frozenset({"slab_lock", "zone_lock"})   # taken by everyone: no sign of a race
HELD_BY = re.compile(r"\d+ locks? held by ([\w:.-]+)/\d+:")


def vm_flag_names(f: int) -> str:
    return "|".join(n for bit, n in _VM_FLAGS if f & bit) or "0"


def newest_run(root: str = "runs") -> str | None:
    runs = [d for d in glob.glob(os.path.join(root, "**", "logs"), recursive=True) if os.path.isdir(d)]
    return os.path.dirname(max(runs, key=os.path.getmtime)) if runs else None


def _match(value: str, patterns: list[str] | None) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(value, p) for p in patterns)


class Timeline:
    """A run's events, ready to filter and print."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.events, self.trace = read_run(run_dir)
        firsts = [e["ts_ns"] for e in self.events[:1]] + ([int(self.trace.rec["ts_ns"][0])] if len(self.trace) else [])
        self.t0 = min(firsts) if firsts else 0
        self.mm_pid: dict[int, int] = {}
        for e in self.events:
            if e.get("event") == "mm_alloc" and e.get("task_pid"):
                self.mm_pid[int(e["mm"])] = int(e["task_pid"])
        self.reports = _load_reports(run_dir)

    def secs(self, ts_ns: int) -> float:
        return (ts_ns - self.t0) / 1e9

    # -- formatting -----------------------------------------------------------------------------
    def value(self, key: str, v: Any) -> str:
        if isinstance(v, bool) or not isinstance(v, int):
            return json.dumps(v, separators=(",", ":")) if isinstance(v, dict | list) else str(v)
        if key == "mm":
            pid = self.mm_pid.get(v)
            return f"{v}(pid {pid})" if pid else str(v)
        if key in _PAGE_FLAG_KEYS:
            return flag_names(v) or "0"
        if key == "vm_flags":
            return vm_flag_names(v)
        if v >= 0 and (key in _HEX_KEYS or key.endswith("pfn") or key.endswith("addr")):
            return hex(v)
        return str(v)

    def line(self, e: dict) -> str:
        name = e.get("event", "")
        actor, pid, ctx = e.get("actor", "?"), e.get("pid", 0), e.get("ctx") or e.get("actor", "?")
        if name.startswith("lock_"):
            body = f"{e.get('lock')}{'[' + str(e['idx']) + ']' if e.get('idx') else ''} {e.get('mode')}"
            if e.get("site"):
                body += f" at {e['site']}"
            if e.get("wait_ns"):
                body += f" waited {e['wait_ns'] / 1e6:.3f} ms"
        elif name.startswith("msg_"):
            arrow = "->" if name == "msg_send" else "<-"
            body = f"{e.get('type')} {arrow} {e.get('peer')}" + (f" id={e['id']}" if e.get("id") else "")
        else:
            body = " ".join(f"{k}={self.value(k, v)}" for k, v in e.items()
                            if k not in _STAMP and k not in ("text",))
        return f"{actor + '-' + str(pid):>16} [{ctx:^12}] {self.secs(e['ts_ns']):12.6f}: {name}: {body}"

    # -- selecting ---------------------------------------------------------------------------------
    def select(self, a: argparse.Namespace) -> list[dict]:
        since = None if a.since is None else self.t0 + int(a.since * 1e9)
        until = None if a.until is None else self.t0 + int(a.until * 1e9)
        ctxs: set[str] | None = None
        if a.around is not None:
            rep = self.report(a.around)
            ts = self.report_ts(rep)
            ctxs = self.involved(rep)
            until = ts + 1
            since = max(since or 0, self.window_start(rep, ts))
        want_locks = a.locks or a.lock or a.around is not None
        out = [e for e in self.events if self._keep(e, a, since, until, ctxs)]
        if a.around is not None:
            # The report itself closes the window, even when its reporter (the supervisor's
            # watchdog, for a hung task) is none of the contexts it is about.
            rep_ev = next((e for e in self.events if e.get("event") == "report"
                           and e.get("title") == rep.get("title")), None)
            if rep_ev is not None and all(e is not rep_ev for e in out):
                out.append(rep_ev)
                out.sort(key=lambda e: (e.get("ts_ns", 0), e.get("pid", 0), e.get("seq", 0)))
        if want_locks and len(self.trace):
            out += self.trace.to_events(self._trace_rows(a, since, until, ctxs))
            out.sort(key=lambda e: (e.get("ts_ns", 0), e.get("pid", 0), e.get("seq", 0)))
        return out

    def _keep(self, e: dict, a: argparse.Namespace, since: int | None, until: int | None,
              ctxs: set[str] | None) -> bool:
        ts = e.get("ts_ns", 0)
        if (since is not None and ts < since) or (until is not None and ts > until):
            return False
        if ctxs is not None and (e.get("ctx") or e.get("actor")) not in ctxs and e.get("actor") not in ctxs:
            return False
        if ctxs is not None and e.get("event") == "trace_string":
            return False
        if a.lock:
            return False          # --lock: lock records only
        if not _match(e.get("event", ""), a.event) or not _match(e.get("actor", ""), a.actor):
            return False
        if a.pid is not None and a.pid not in (e.get("pid"), e.get("child_pid"), e.get("task_pid"),
                                               self.mm_pid.get(e.get("mm", -1))):
            return False
        if a.mm is not None and e.get("mm") != a.mm:
            return False
        if a.pfn is not None and a.pfn not in {v for k, v in e.items() if k.endswith("pfn") and isinstance(v, int)}:
            return False
        return not a.grep or a.grep in json.dumps(e, separators=(",", ":"), default=str)

    def _trace_rows(self, a: argparse.Namespace, since: int | None, until: int | None,
                    ctxs: set[str] | None) -> np.ndarray:
        tr: Trace = self.trace
        rec = tr.rec
        keep = np.ones(len(rec), dtype=bool)
        if since is not None:
            keep &= rec["ts_ns"] >= since
        if until is not None:
            keep &= rec["ts_ns"] <= until
        if a.pid is not None:
            keep &= tr.pid == a.pid
        if a.mm is not None or a.pfn is not None:
            keep &= False         # lock records name no mm or pfn
        # Name filters go per process, on the interned ids.
        for pid in np.unique(tr.pid[keep]) if keep.any() else []:
            pid = int(pid)
            rows = tr.pid == pid
            actor = tr.actors.get(pid, "?")
            if not _match(actor, a.actor):
                keep &= ~rows
                continue
            names = tr.strings.get(pid, {})
            if ctxs is not None:
                # A report names an actor ("exit"); its workers' contexts ("exit:0") count.
                ok = [i for i, s in names.items() if s in ctxs or s.split(":")[0] in ctxs]
                keep &= ~rows | np.isin(rec["ctx"], ok)
                if not a.lock:      # the leaf locks everyone takes say nothing about a race
                    leaf = [i for i, s in names.items() if s in LEAF_LOCKS]
                    keep &= ~rows | ~np.isin(rec["name"], leaf)
            if a.lock:
                ok = [i for i, s in names.items() if _match(s, a.lock)]
                keep &= ~rows | (np.isin(rec["name"], ok) & (rec["kind"] <= KIND_ID["lock_release"]))
            if a.event:
                ok_k = [i for n, i in KIND_ID.items() if _match(n, a.event)]
                keep &= ~rows | np.isin(rec["kind"], ok_k)
        return np.flatnonzero(keep)

    # -- reports -------------------------------------------------------------------------------------
    def report(self, n: int) -> dict:
        if not 1 <= n <= len(self.reports):
            raise LookupError(f"no report {n}: the run has {len(self.reports)} report(s)")
        return self.reports[n - 1]

    def report_ts(self, rep: dict) -> int:
        """When the report was made: its event in the reporting actor's log (same title)."""
        for e in self.events:
            if e.get("event") == "report" and e.get("title") == rep.get("title") and e.get("actor") != "supervisor":
                return int(e["ts_ns"])
        for e in self.events:
            if e.get("event") == "report" and e.get("title") == rep.get("title"):
                return int(e["ts_ns"])
        return self.t0 + int(float(rep.get("t_s", 0)) * 1e9)

    def contexts(self) -> set[str]:
        """Every kernel context label and actor name of the run."""
        known = {e.get("ctx") for e in self.events if e.get("ctx")} | {e.get("actor") for e in self.events}
        tr = self.trace
        for pid in np.unique(tr.pid):
            pid = int(pid)
            ids = np.unique(tr.rec["ctx"][tr.pid == pid])
            known |= {tr.s(pid, i) for i in ids}
        known.discard("")
        return known

    def involved(self, rep: dict) -> set[str]:
        """The contexts a report is about: who reported it, whoever its data names, and the
        contexts that last took, just before it, a lock the reporter took (the other side of
        a race on that lock: the exit that emptied ksm_mm_head, the holder of a mutex)."""
        known = self.contexts()
        found = {rep.get("actor", "")}
        for e in self.events:
            if e.get("event") == "report" and e.get("title") == rep.get("title"):
                found.add(e.get("ctx") or e.get("actor", ""))

        def walk(v: Any) -> None:
            if isinstance(v, str):
                for s in (v, v.split("/")[0]):
                    if s in known:
                        found.add(s)
            elif isinstance(v, dict):
                for x in v.values():
                    walk(x)
            elif isinstance(v, list | tuple):
                for x in v:
                    walk(x)
        walk(rep.get("data", {}))
        # lockdep_print_held_locks() lines of the report text name the holders of locks.
        for m in HELD_BY.finditer(rep.get("text", "")):
            if m.group(1) in known:
                found.add(m.group(1))
        found.discard("")
        found.discard("supervisor")
        return found | self._lock_neighbours(found, self.report_ts(rep))

    def window_start(self, rep: dict, ts: int) -> int:
        """AROUND_S before the report, or earlier: from just before the oldest wait the
        report names (a hung task blocked for longer than the window)."""
        start = ts - int(AROUND_S * 1e9)
        waits: list[int] = []

        def walk(v: Any) -> None:
            if isinstance(v, dict):
                for k, x in v.items():
                    if k == "since_ns" and isinstance(x, int) and x > 0:
                        waits.append(x)
                    else:
                        walk(x)
            elif isinstance(v, list):
                for x in v:
                    walk(x)
        walk(rep.get("data", {}))
        return min([start, *(w - int(0.5e9) for w in waits)])

    def _lock_neighbours(self, found: set[str], ts: int, keep: int = 2) -> set[str]:
        tr = self.trace
        rec = tr.rec
        rows = np.flatnonzero((rec["ts_ns"] >= ts - int(AROUND_S * 1e9)) & (rec["ts_ns"] <= ts)
                              & (rec["kind"] == KIND_ID["lock_acquired"]))
        evs = [e for e in tr.to_events(rows) if e["lock"] not in LEAF_LOCKS]

        def mine(e: dict) -> bool:
            return e["ctx"] in found or e["ctx"].split(":")[0] in found
        taken = {(e["lock"], e["idx"]) for e in evs if mine(e)}
        last: dict[str, int] = {}
        for e in evs:
            if not mine(e) and (e["lock"], e["idx"]) in taken:
                last[e["ctx"]] = e["ts_ns"]
        return set(sorted(last, key=last.get)[-keep:])


def _load_reports(run_dir: str) -> list[dict]:
    try:
        with open(os.path.join(run_dir, "reports.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return []


def _columns(tl: Timeline, events: list[dict]) -> list[str]:
    lanes = sorted({e.get("ctx") or e.get("actor", "?") for e in events})
    width = max(24, (shutil.get_terminal_size((160, 40)).columns - 14) // max(1, len(lanes)) - 1)
    out = [f"{'seconds':>12} " + " ".join(f"{x[:width]:<{width}}" for x in lanes)]
    for e in events:
        lane = lanes.index(e.get("ctx") or e.get("actor", "?"))
        text = tl.line(e).split(": ", 1)[1]
        cells = [" " * width] * len(lanes)
        cells[lane] = f"{text[:width]:<{width}}"
        out.append(f"{tl.secs(e['ts_ns']):12.6f} " + " ".join(cells))
    return out


def main(a: argparse.Namespace) -> int:
    run = a.run or newest_run()
    if not run or not os.path.isdir(os.path.join(run, "logs")):
        print("ksmlab log: ENOENT: no run folder with logs found", file=sys.stderr)
        return 2
    tl = Timeline(run)
    try:
        events = tl.select(a)
    except LookupError as e:
        print(f"ksmlab log: EINVAL: {e}", file=sys.stderr)
        return 2
    if a.limit:
        events = events[:a.limit]
    if a.summary:
        counts = Counter((e.get("actor", "?"), e.get("event", "")) for e in events)
        for (actor, name), n in sorted(counts.items()):
            print(f"{n:9} {actor:16} {name}")
        return 0
    if a.json:
        for e in events:
            print(json.dumps(e, separators=(",", ":"), default=str))
        return 0
    if a.around is not None:
        rep = tl.report(a.around)
        print(f"# report {a.around}: {rep.get('title')}  (contexts: {', '.join(sorted(tl.involved(rep)))})")
    lines = _columns(tl, events) if a.columns else [tl.line(e) for e in events]
    try:
        for ln in lines:
            print(ln)
    except BrokenPipeError:
        return 0
    return 0


def add_arguments(lg: argparse.ArgumentParser) -> None:
    lg.add_argument("run", nargs="?", help="run folder (default: the newest under ./runs)")
    lg.add_argument("--event", action="append", help="only these event names (repeatable, glob)")
    lg.add_argument("--actor", action="append", help="only these actors (repeatable, glob)")
    lg.add_argument("--pid", type=int, help="only events of this process (or about this task pid)")
    lg.add_argument("--mm", type=int, help="only events about this mm (its record index)")
    lg.add_argument("--pfn", type=lambda s: int(s, 0), help="only events about this pfn (0x.. or decimal)")
    lg.add_argument("--lock", action="append", help="only lock records of these lock classes (glob)")
    lg.add_argument("--since", type=float, help="seconds from the first event")
    lg.add_argument("--until", type=float, help="seconds from the first event")
    lg.add_argument("--around", type=int, metavar="REPORT", help="what led to report N (1 = the first)")
    lg.add_argument("--locks", action="store_true", help="show lock and message records too")
    lg.add_argument("--columns", action="store_true", help="one column per context, top to bottom")
    lg.add_argument("--grep", help="substring anywhere in the event")
    lg.add_argument("--json", action="store_true", help="print JSON lines (for jq)")
    lg.add_argument("--summary", action="store_true", help="count events per actor and name")
    lg.add_argument("--limit", type=int, default=0)
