# Structured logs: one JSON-lines file per process, every line stamped.
#
# Each process configures structlog after it starts (never inherited across a
# fork) and writes <run_dir>/logs/<actor>-<pid>.jsonl. Every line carries the run
# id, the seed, the actor, the pid, a CLOCK_MONOTONIC nanosecond timestamp (one
# clock for every process on the host, so files merge without skew) and a
# per-process sequence number; `event` is the kernel tracepoint name where one
# exists (ksm_start_scan, ksm_merge_one_page, ksm_exit, lock_acquire, ...).
from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from collections.abc import Callable
from typing import Any

import structlog

from actors.tracebuf import Trace, read_trace

# A log file's budget: a long run (a 10-minute soak, `run idle` for an hour) must not fill
# the disk. Past it, a process keeps only the events a reader needs to know what became of
# the run, and says once how many it dropped.
LOG_CAP_BYTES = 64 << 20
# However many events a process buffers (flush_every), none stays unwritten for longer than
# this: a process killed or stuck loses at most its last FLUSH_WITHIN_NS of events.
FLUSH_WITHIN_NS = 100_000_000
# The kernel's per-page KSM tracepoints (include/trace/events/ksm.h, and ours for a new
# stable node): one or two lines per page merged or let go. A run with ksm_tracepoints off
# (the bench: the real ksmd it is compared with runs with its tracepoints off) does not
# write them; every other event, the pass markers ksm_start_scan/ksm_stop_scan included,
# is still written.
KSM_PAGE_TRACEPOINTS = frozenset({"ksm_merge_one_page", "ksm_merge_with_ksm_page", "ksm_remove_ksm_page",
                                  "ksm_remove_rmap_item", "ksm_stable_tree_insert"})
KEPT_WHEN_CAPPED = frozenset({"report", "actor_stop", "cluster_crashed", "boot", "log_capped",
                              "oom_kill", "task_exit", "bad_message"})


class _CountingWriter(structlog.WriteLogger):
    """structlog's WriteLogger counting the bytes, and without its flush per line: the
    file is flushed every `flush_every` events and at each point where what a process
    did must be on disk (a report, a handled request, the end of a ksmd round, a lock
    it may now wait on for ever). A flush per line was a write(2) per event, a quarter
    of what an event cost ksmd, and made ksmd's flush_every mean nothing."""

    written = 0

    def msg(self, message: str) -> None:
        with self._lock:
            self._write(message + "\n")
        self.written += len(message) + 1

    log = debug = info = warn = warning = err = error = critical = exception = fatal = failure = msg


class EventLog:
    """The per-process event sink: ev(event, **fields) writes one JSON line, until the
    file holds cap_bytes; then only KEPT_WHEN_CAPPED events, with one log_capped line.
    Events in `off` (tracepoints turned off) are not written at all."""

    def __init__(self, run_dir: str, actor: str, run_id: str, seed: int, flush_every: int = 1,
                 label: Callable[[], str] | None = None, cap_bytes: int = LOG_CAP_BYTES,
                 off: frozenset[str] = frozenset()) -> None:
        self.actor = actor
        self.off = off
        self.pid = os.getpid()
        logs = os.path.join(run_dir, "logs")
        os.makedirs(logs, mode=0o700, exist_ok=True)
        self.path = os.path.join(logs, f"{actor}-{self.pid}.jsonl")
        self._file = open(self.path, "a", buffering=1 << 16, encoding="utf-8")  # noqa: SIM115
        self._seq = itertools.count(1)
        self._n = 0
        self.flush_every = flush_every
        self._flush_by = time.monotonic_ns() + FLUSH_WITHIN_NS
        self.on_flush: Callable[[], None] | None = None   # the compact trace flushes with us
        base = {"run_id": run_id, "seed": seed, "actor": actor, "pid": self.pid}

        def stamp(_logger: Any, _name: str, ev: dict) -> dict:
            ev.update(base)
            ev["ts_ns"] = time.monotonic_ns()
            ev["seq"] = next(self._seq)
            if label is not None:
                ctx = label()
                if ctx != actor:
                    ev["ctx"] = ctx
            return ev

        self.cap_bytes = cap_bytes
        self.dropped = 0
        self._writer = _CountingWriter(self._file)
        self._lock = self._writer._lock  # one lock for the file's writes and its flushes
        self._logger = structlog.wrap_logger(
            self._writer,
            processors=[stamp, structlog.processors.JSONRenderer(serializer=_dumps)],
            wrapper_class=structlog.BoundLogger,
        ).bind()  # the bound logger itself, not a lazy proxy asked for it on every event

    def __call__(self, event: str, **fields: Any) -> None:
        if event in self.off:
            return
        if self._writer.written >= self.cap_bytes and event not in KEPT_WHEN_CAPPED:
            self.dropped += 1
            if self.dropped == 1:
                self._logger.msg("log_capped", cap_bytes=self.cap_bytes,
                                 why="the log file reached its budget; only reports and ends are kept")
            return
        self._logger.msg(event, **fields)
        self._n += 1
        if self._n % self.flush_every == 0 or time.monotonic_ns() >= self._flush_by:
            self.flush()

    def flush(self) -> None:
        self._flush_by = time.monotonic_ns() + FLUSH_WITHIN_NS
        if self.on_flush is not None:
            self.on_flush()
        try:
            with self._lock:
                self._file.flush()
        except ValueError:
            pass

    def close(self) -> None:
        if self.dropped:
            self._logger.msg("log_capped", dropped=self.dropped, cap_bytes=self.cap_bytes)
        self.flush()
        try:
            self._file.close()
        except ValueError:
            pass


def _default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, bytes):
        return o.decode("latin-1")
    if isinstance(o, set | frozenset | tuple):
        return list(o)
    return repr(o)


# One encoder for every line: json.dumps() with any option builds a new JSONEncoder per call.
_ENCODER = json.JSONEncoder(default=_default, separators=(",", ":"))


def _dumps(obj: Any, **kw: Any) -> str:
    return _ENCODER.encode(obj)


def _jsonl(path: str) -> list[dict]:
    """The objects of a JSON-lines file. Parsed as one array when it can be (one call of
    the C decoder instead of one a line: a fifth faster on a 10-minute soak's logs), line
    by line when a process killed mid-write left a torn last line."""
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f.read().split("\n") if line.strip()]
    try:
        return json.loads("[" + ",".join(lines) + "]")
    except json.JSONDecodeError:
        out = []
        for line in lines:
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out


def read_json_events(run_dir: str) -> tuple[list[dict], dict[int, dict[int, str]], dict[int, str]]:
    """The JSON-lines events of a run, merged by (ts_ns, pid, seq), without the compact
    trace's string table; also that table ({pid: {id: string}}) and {pid: actor}."""
    logs = os.path.join(run_dir, "logs")
    out: list[dict] = []
    strings: dict[int, dict[int, str]] = {}
    actors: dict[int, str] = {}
    if not os.path.isdir(logs):
        return out, strings, actors
    for name in os.listdir(logs):
        if not name.endswith(".jsonl"):
            continue
        for e in _jsonl(os.path.join(logs, name)):
            if e.get("event") == "trace_string":
                strings.setdefault(int(e.get("pid", 0)), {})[int(e["id"])] = e["s"]
                continue
            actors.setdefault(int(e.get("pid", 0)), e.get("actor", "?"))
            out.append(e)
    out.sort(key=lambda e: (e.get("ts_ns", 0), e.get("pid", 0), e.get("seq", 0)))
    return out, strings, actors


def read_run(run_dir: str) -> tuple[list[dict], Trace]:
    """A run's JSON events and its compact trace (lock operations, messages)."""
    events, strings, actors = read_json_events(run_dir)
    return events, read_trace(os.path.join(run_dir, "logs"), strings, actors)


def read_events(run_dir: str, trace: bool = True) -> list[dict]:
    """Every event of a run as dicts, merged into one timeline by time: the JSON events and
    (trace=True) the compact trace's lock and message records."""
    events, tr = read_run(run_dir)
    if not trace or not len(tr):
        return events
    merged = events + tr.to_events()
    merged.sort(key=lambda e: (e.get("ts_ns", 0), e.get("pid", 0), e.get("seq", 0)))
    return merged
