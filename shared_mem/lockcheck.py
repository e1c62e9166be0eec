# What the lock space checks as a context takes and drops locks, and its one report.
#
# The checks cost nothing on the common path: a context that holds no lock takes one
# without any of them. When it already holds something, _pre_acquire() runs before the
# new lock is taken: taking a lock the context already holds raises (for OFD locks it
# would silently succeed, in the kernel it deadlocks: "possible recursive locking"), and
# each class pair (held, new) that the lockdep matrix does not know yet is validated
# under the graph lock (_lockdep_add): if the new class already reaches the held one,
# the new edge would close a cycle and that is the report, "possible circular locking
# dependency", made when the order first happens, whether or not a deadlock follows.
# Trylocks add no edge (they cannot wait). Pushing a lock beyond MAX_LOCK_DEPTH, and a
# context that stops being one with locks still held, are reported the same way.
#
# Like the kernel's debug_locks_off(), the first report switches validation off for the
# whole run: it is stored in the state segment (so lockdep_report() returns it from any
# process) and delivered to this process's report hook, or to stderr when there is none.
# The graph itself and the report texts are lockdep.py's.
from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import msgpack

from shared_mem.lockdep import CIRCULAR_TITLE, format_circular, format_depth_overflow
from shared_mem.lockstate import (
    _H_DEBUG,
    _H_NREPORTS,
    _H_REPLEN,
    _MODE,
    _REPORT_BYTES,
    _SETLK,
    _SETLKW,
    _fcntl,
)

if TYPE_CHECKING:
    from shared_mem.lockspace import LockSpace, _Ctx
    from shared_mem.ofdlocks import _Lock


def _pre_acquire(sp: LockSpace, ctx: _Ctx, lk: _Lock, mode: int, site: str | None) -> None:
    """Called only when the context already holds something (never on the common
    single-lock path): catch recursion, and validate any new class edges."""
    b = lk._cid
    n = sp._ncls
    m = sp._matrix
    new = False
    for h in ctx.held:
        o = h[0]
        if o is lk:
            raise RuntimeError(
                f"possible recursive locking detected: {ctx.actor}/{ctx.pid} is trying "
                f"to acquire {sp._display(b, lk._idx)} ({_MODE[mode]}) which it "
                f"already holds ({_MODE[h[1]]}); in the kernel this deadlocks"
            )
        if o._cid != b and not m[o._cid * n + b]:
            new = True
    if new and sp._q[_H_DEBUG]:
        _lockdep_add(sp, ctx, lk, mode, site)


def _lockdep_add(sp: LockSpace, ctx: _Ctx, lk: _Lock, mode: int, site: str | None) -> None:
    g = sp._graph
    b = lk._cid
    report = None
    _fcntl(ctx.fd, _SETLKW, sp._fl_graph[0])
    try:
        if not sp._q[_H_DEBUG]:
            return
        chain = [(h[0]._cid, h[0]._idx, h[1]) for h in ctx.held]
        for h in ctx.held:
            a = h[0]._cid
            if a == b or g.has(a, b):
                continue
            path = g.path(b, a)
            if path is None:
                g.add(a, b, ctx.actor, ctx.pid, ctx.tid, site, chain)
                continue
            report = _circular(sp, ctx, lk, mode, site, h, path)
            sp._q[_H_DEBUG] = 0  # debug_locks_off(): one report per run
            _store_report(sp, *report)
            break
    finally:
        _fcntl(ctx.fd, _SETLK, sp._fl_graph[1])
    if report is not None:
        _deliver(sp, *report)


def _ref(sp: LockSpace, lk: _Lock, mode: int, site: str | None) -> dict:
    return {
        "lock": lk._name,
        "idx": lk._idx,
        "name": sp._display(lk._cid, lk._idx),
        "kind": lk._kind,
        "mode": _MODE[mode],
        "site": site,
    }


def _refs(sp: LockSpace, held: list) -> list[dict]:
    return [_ref(sp, h[0], h[1], h[3]) for h in held]


def _circular(
    sp: LockSpace, ctx: _Ctx, lk: _Lock, mode: int, site: str | None, h: tuple, path: list[int],
) -> tuple[str, str, str, dict]:
    chain = []
    for k in range(1, len(path)):
        rec = sp._graph.record(path[k - 1], path[k])
        chain.append(
            {
                "lock": sp._names[path[k]],
                "kind": sp._kinds[path[k]],
                "actor": rec["actor"],
                "pid": rec["pid"],
                "tid": rec["tid"],
                "site": rec["site"],
                "held": [sp._display(c, i) for c, i, _ in rec["chain"]],
            }
        )
    acquiring = _ref(sp, lk, mode, site)
    holding = _ref(sp, h[0], h[1], h[3])
    held = _refs(sp, ctx.held)
    text = format_circular(ctx.actor, ctx.pid, acquiring, holding, held, chain)
    data = {
        "actor": ctx.actor,
        "pid": ctx.pid,
        "tid": ctx.tid,
        "acquiring": acquiring,
        "holding": holding,
        "held": held,
        "cycle": [sp._names[c] for c in path],
        "chain": chain,
    }
    return "lockdep", CIRCULAR_TITLE, text, data


def _depth_overflow(sp: LockSpace, ctx: _Ctx) -> None:
    held = _refs(sp, ctx.held)
    text = format_depth_overflow(ctx.actor, ctx.pid, held)
    data = {"actor": ctx.actor, "pid": ctx.pid, "held": held}
    _report_once(sp, ctx, "lockdep", "BUG: MAX_LOCK_DEPTH too low!", text, data)


def _report_once(sp: LockSpace, ctx: _Ctx, kind: str, title: str, text: str, data: dict) -> None:
    _fcntl(ctx.fd, _SETLKW, sp._fl_graph[0])
    try:
        on = bool(sp._q[_H_DEBUG])
        if on:
            sp._q[_H_DEBUG] = 0
            _store_report(sp, kind, title, text, data)
    finally:
        _fcntl(ctx.fd, _SETLK, sp._fl_graph[1])
    if on:
        _deliver(sp, kind, title, text, data)


def _store_report(sp: LockSpace, kind: str, title: str, text: str, data: dict) -> None:
    raw = msgpack.packb({"kind": kind, "title": title, "text": text, "data": data})
    if len(raw) > _REPORT_BYTES:
        raw = msgpack.packb({"kind": kind, "title": title, "text": text[:16000], "data": {}})
    sp._mv[sp._report_off : sp._report_off + len(raw)] = raw
    sp._q[_H_REPLEN] = len(raw)
    sp._q[_H_NREPORTS] += 1


def _deliver(sp: LockSpace, kind: str, title: str, text: str, data: dict) -> None:
    fn = sp._report_hook
    if fn is None:
        sys.stderr.write(text + "\n")
    else:
        fn(kind, title, text, data)
