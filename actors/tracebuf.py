# The compact trace: lock operations and messages as fixed binary records.
#
# What it models. The kernel's own answer to "trace every lock operation" is not printk:
# lockdep's lock_acquire/lock_contended/lock_acquired/lock_release tracepoints write fixed
# records into the per-CPU ring buffer, and trace-cmd formats them later. A run of ksmlab
# makes ~140,000 lock operations in 20 s; as JSON lines with structlog's stamps they were
# 97% of a 23 MB log folder and the most expensive thing a lock did. Here each one is a
# 32-byte record (time, context, lock class, index, mode, call site, wait), buffered per
# process and appended to <run>/logs/<actor>-<pid>.trace as zlib-compressed frames; the
# same records carry message sends and receipts (type, peer, id), which is what a trace
# viewer needs to draw flow arrows between actors.
#
# Strings (context labels, lock classes, call sites, message types, peers) are interned:
# the first use of each writes one `trace_string` event {id, s} into the process's JSON
# log, so the JSON log stays the single source of names and the binary file only numbers.
# The buffer is flushed when it fills, when the JSON log is flushed (ksmd after every
# round), before a report, and at exit; a SIGKILLed process loses at most one buffer of
# lock records, never a report or a kernel event (those stay JSON lines, written at once).
#
# read_trace() decodes a run's files into one numpy array (fast: filters work on columns)
# and to_events() turns the rows one wants into the same dicts read_events() returns.
from __future__ import annotations

import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

REC = np.dtype([("ts_ns", "<i8"), ("arg", "<i8"), ("idx", "<i4"), ("ctx", "<u2"), ("name", "<u2"),
                ("site", "<u2"), ("peer", "<u2"), ("kind", "u1"), ("mode", "u1"), ("_pad", "u1", (2,))])
assert REC.itemsize == 32

KINDS = ("lock_acquire", "lock_contended", "lock_acquired", "lock_release", "msg_send", "msg_recv")
KIND_ID = {k: i for i, k in enumerate(KINDS)}
MODES = ("excl", "read", "write", "")
MODE_ID = {m: i for i, m in enumerate(MODES)}
FRAME = struct.Struct("<II")           # compressed bytes, records
BUFFER = 4096                          # records per frame at most


class TraceBuffer:
    """One process's compact trace: record() from any thread, flush() to the file."""

    def __init__(self, path: str, intern_event: Callable[[int, str], None],
                 label_of_thread: Callable[[], str]) -> None:
        self.path = path
        self._emit_string = intern_event
        self._label = label_of_thread
        self._ids: dict[str, int] = {"": 0}
        self._buf = np.zeros(BUFFER, dtype=REC)
        self._n = 0
        self._mu = threading.Lock()
        self._tls = threading.local()
        self._file = open(path, "ab")  # noqa: SIM115 - closed by close()

    def intern(self, s: str | None) -> int:
        if not s:
            return 0
        i = self._ids.get(s)
        if i is None:
            with self._mu:
                i = self._ids.get(s)
                new = i is None
                if new:
                    i = len(self._ids)
                    if i > 0xFFFF:
                        return 0xFFFF
                    self._ids[s] = i
            if new:     # outside the lock: the JSON log's flush flushes this buffer too
                self._emit_string(i, s)
        return i

    def _ctx(self) -> int:
        c = getattr(self._tls, "ctx", None)
        if c is None:
            c = self._tls.ctx = self.intern(self._label())
        return c

    def record(self, kind: str, name: str, idx: int = 0, mode: str = "", arg: int = 0,
               site: str | None = None, peer: str | None = None) -> None:
        ctx = self._ctx()
        nm, st, pr = self.intern(name), self.intern(site), self.intern(peer)
        ts = time.monotonic_ns()
        with self._mu:
            r = self._buf[self._n]
            r["ts_ns"], r["arg"], r["idx"], r["ctx"], r["name"] = ts, arg, idx, ctx, nm
            r["site"], r["peer"], r["kind"], r["mode"] = st, pr, KIND_ID[kind], MODE_ID[mode]
            self._n += 1
            if self._n == BUFFER:
                self._write_locked()

    def pending(self) -> int:
        return self._n

    def flush(self) -> None:
        with self._mu:
            if self._n:
                self._write_locked()

    def _write_locked(self) -> None:
        raw = self._buf[:self._n].tobytes()
        z = zlib.compress(raw, 1)
        try:
            self._file.write(FRAME.pack(len(z), self._n) + z)
            self._file.flush()
        except ValueError:
            pass            # closed under us at exit
        self._n = 0

    def close(self) -> None:
        self.flush()
        try:
            self._file.close()
        except ValueError:
            pass


def read_frames(path: str) -> np.ndarray:
    """Every record of one .trace file (a torn last frame is dropped)."""
    out = []
    with open(path, "rb") as f:
        data = f.read()
    off = 0
    while off + FRAME.size <= len(data):
        nz, n = FRAME.unpack_from(data, off)
        off += FRAME.size
        if off + nz > len(data):
            break
        try:
            raw = zlib.decompress(data[off:off + nz])
        except zlib.error:
            break
        off += nz
        if len(raw) != n * REC.itemsize:
            break
        out.append(np.frombuffer(raw, dtype=REC))
    return np.concatenate(out) if out else np.zeros(0, dtype=REC)


class Trace:
    """A run's compact records, merged: `rec` sorted by time, with each row's process
    (`pid`, `actor`) and every process's string table."""

    def __init__(self, rec: np.ndarray, pid: np.ndarray, actors: dict[int, str],
                 strings: dict[int, dict[int, str]]) -> None:
        self.rec, self.pid, self.actors, self.strings = rec, pid, actors, strings

    def __len__(self) -> int:
        return len(self.rec)

    def s(self, pid: int, i: int) -> str:
        return self.strings.get(pid, {}).get(int(i), "") if i else ""

    def to_events(self, rows: Iterable[int] | None = None) -> list[dict[str, Any]]:
        """The records as event dicts shaped as read_events() returns them."""
        if rows is None:
            sel, pid_col = self.rec, self.pid
        else:
            ix = np.asarray(rows if isinstance(rows, np.ndarray) else list(rows), dtype=np.int64)
            sel, pid_col = self.rec[ix], self.pid[ix]
        pids = pid_col.tolist()
        # Columns to Python lists once: indexing numpy scalars per row is ten times slower.
        ts, arg, idx = sel["ts_ns"].tolist(), sel["arg"].tolist(), sel["idx"].tolist()
        ctx, name, site, peer = sel["ctx"].tolist(), sel["name"].tolist(), sel["site"].tolist(), sel["peer"].tolist()
        kind, mode = sel["kind"].tolist(), sel["mode"].tolist()
        strings, actors = self.strings, self.actors
        empty: dict[int, str] = {}
        out = []
        for j in range(len(ts)):
            p = pids[j]
            names = strings.get(p, empty)
            k = KINDS[kind[j]]
            e: dict[str, Any] = {"event": k, "ts_ns": ts[j], "actor": actors.get(p, "?"), "pid": p,
                                 "ctx": names.get(ctx[j], "")}
            if k[0] == "l":
                e["lock"] = names.get(name[j], "")
                e["idx"] = idx[j]
                e["mode"] = MODES[mode[j]]
                if arg[j]:
                    e["wait_ns"] = arg[j]
                if site[j]:
                    e["site"] = names.get(site[j], "")
            else:
                e["type"] = names.get(name[j], "")
                e["peer"] = names.get(peer[j], "")
                e["id"] = arg[j]
            out.append(e)
        return out


def read_trace(logs: str, strings: dict[int, dict[int, str]], actors: dict[int, str]) -> Trace:
    """Merge every <actor>-<pid>.trace of a logs folder; `strings` and `actors` (by pid)
    come from the JSON logs (read_events collects them)."""
    recs, pids = [], []
    if os.path.isdir(logs):
        for name in sorted(os.listdir(logs)):
            if not name.endswith(".trace"):
                continue
            stem = name[:-len(".trace")]
            actor, _, pid_s = stem.rpartition("-")
            if not pid_s.isdigit():
                continue
            r = read_frames(os.path.join(logs, name))
            recs.append(r)
            pids.append(np.full(len(r), int(pid_s), dtype=np.int64))
            actors.setdefault(int(pid_s), actor)
    if not recs:
        return Trace(np.zeros(0, dtype=REC), np.zeros(0, dtype=np.int64), actors, strings)
    rec, pid = np.concatenate(recs), np.concatenate(pids)
    order = np.argsort(rec["ts_ns"], kind="stable")
    return Trace(rec[order], pid[order], actors, strings)
