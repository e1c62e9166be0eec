# Lock validation for the ksmlab lock model: the parts of kernel/locking/lockdep.c and
# kernel/hung_task.c that a model of mm/ksm.c needs, and the reports they print.
#
# lockdep thinks in lock *classes*, not instances: every mmap_lock is one class, so the
# graph stays small (n_classes x n_classes) however many mm's exist. An edge A -> B
# means "some context once took B while holding A". The edge set lives in the run's
# shared state segment, so an order seen in ksmd and the opposite order seen later in
# an exiting task are connected even though they ran in different processes. Each new
# edge is checked before it is added: if B already reaches A, the new edge closes a
# cycle, and that is reported *when the order first happens*, not when the deadlock
# does (check_noncircular() in the kernel). Like the kernel, the validator switches
# itself off after its first report (debug_locks_off()), so a run has at most one splat,
# and trylock acquisitions add no edge to the lock they take (a trylock cannot wait).
#
# Same-class nesting (two page locks, two ptl's) is not an edge here; the kernel needs
# annotations (subclasses, nest_lock) for that, and the model orders such locks by index.
#
# find_hung() is the other half: a pure function over a contexts snapshot (who waits
# for what since when, who holds what) that prints what khungtaskd prints with
# CONFIG_PROVE_LOCKING: "INFO: task comm:pid blocked for more than N seconds." and
# debug_show_all_locks(). Where the kernel can only show stacks, we also have the
# wait-for graph, so a real deadlock is spelled out as its cycle of contexts.
#
# The report texts keep the kernel's line shapes (print_circular_bug(),
# print_circular_lock_scenario(), lockdep_print_held_locks()) so they read like the
# real thing; the usage letters are fixed per kind since the model has no irq states.
from __future__ import annotations

import struct
from collections import deque

MAX_LOCK_DEPTH = 16  # current->held_locks[] in the kernel is 48 deep; ours is smaller

# Per edge we keep who recorded it first: pid, tid, chain length, actor, site, chain.
_EDGE = struct.Struct("<qqq32s48s" + "iii" * MAX_LOCK_DEPTH)
EDGE_RECORD_SIZE = (_EDGE.size + 7) & ~7

_RW_USAGE = "{++++}"
_EXCL_USAGE = "{+.+.}"

CIRCULAR_TITLE = "WARNING: possible circular locking dependency detected"


def usage(kind_or_mode: str) -> str:
    """Usage letters shown after a lock name: {++++} for rwsems, {+.+.} otherwise."""
    return _RW_USAGE if kind_or_mode in ("rwsem", "read", "write") else _EXCL_USAGE


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _fit(s: str | None, n: int) -> bytes:
    return (s or "").encode("utf-8", "replace")[:n]


class DepGraph:
    """The class dependency graph, stored in a shared buffer.

    `matrix` holds one byte per (from, to) class pair; a record per pair holds who
    recorded that edge first. Readers may test edges without a lock (a byte is either
    0 or 1); writers hold the lockdep graph lock.
    """

    def __init__(self, buf: memoryview, matrix_off: int, records_off: int, n: int) -> None:
        self.n = n
        self.matrix = buf[matrix_off : matrix_off + n * n]
        self._buf = buf
        self._records_off = records_off

    def has(self, a: int, b: int) -> bool:
        return bool(self.matrix[a * self.n + b])

    def path(self, src: int, dst: int) -> list[int] | None:
        """Shortest class path src -> ... -> dst (BFS, as the kernel does), or None."""
        n = self.n
        prev: dict[int, int] = {src: src}
        todo = deque([src])
        while todo:
            u = todo.popleft()
            row = bytes(self.matrix[u * n : (u + 1) * n])
            for v in range(n):
                if row[v] and v not in prev:
                    prev[v] = u
                    if v == dst:
                        out = [v]
                        while out[-1] != src:
                            out.append(prev[out[-1]])
                        return out[::-1]
                    todo.append(v)
        return None

    def add(
        self,
        a: int,
        b: int,
        actor: str,
        pid: int,
        tid: int,
        site: str | None,
        chain: list[tuple[int, int, int]],
    ) -> None:
        chain = chain[:MAX_LOCK_DEPTH]
        flat: list[int] = []
        for entry in chain:
            flat.extend(entry)
        flat.extend([0] * (3 * (MAX_LOCK_DEPTH - len(chain))))
        off = self._records_off + (a * self.n + b) * EDGE_RECORD_SIZE
        _EDGE.pack_into(
            self._buf, off, pid, tid, len(chain), _fit(actor, 32), _fit(site, 48), *flat
        )
        self.matrix[a * self.n + b] = 1  # published after its record

    def record(self, a: int, b: int) -> dict:
        off = self._records_off + (a * self.n + b) * EDGE_RECORD_SIZE
        vals = _EDGE.unpack_from(self._buf, off)
        pid, tid, nchain, actor, site = vals[:5]
        flat = vals[5:]
        chain = [tuple(flat[3 * i : 3 * i + 3]) for i in range(min(nchain, MAX_LOCK_DEPTH))]
        return {
            "actor": _text(actor),
            "pid": pid,
            "tid": tid,
            "site": _text(site) or None,
            "chain": chain,
        }

    def edges(self) -> list[tuple[int, int]]:
        n = self.n
        m = bytes(self.matrix)
        return [(a, b) for a in range(n) for b in range(n) if m[a * n + b]]

    def release(self) -> None:
        self.matrix.release()


# --- report texts -------------------------------------------------------------------
# A "ref" below is a dict describing one lock instance as held or wanted:
# {"lock": class name, "name": display name, "mode": "excl"|"read"|"write", "site": str|None}


def _lockname(ref: dict) -> str:
    name = ref.get("name") or (f"{ref['lock']}#{ref['idx']}" if ref.get("idx") else ref["lock"])
    return f"({name}){usage(ref['mode'])}"


def _at(ref: dict) -> str:
    return f", at: {ref.get('site') or ref['lock']}"


def held_lines(actor: str, pid: int, held: list[dict]) -> list[str]:
    """lockdep_print_held_locks(): "2 locks held by ksmd/1234:" and one line per lock."""
    n = len(held)
    out = [f"{n} lock{'' if n == 1 else 's'} held by {actor}/{pid}:"]
    out += [f" #{i}: {_lockname(h)}{_at(h)}" for i, h in enumerate(held)]
    return out


def format_circular(
    actor: str,
    pid: int,
    acquiring: dict,
    holding: dict,
    held: list[dict],
    chain: list[dict],
) -> str:
    """print_circular_bug() for: `actor` holds `holding`, wants `acquiring`, and the
    graph already has acquiring -> ... -> holding. `chain` lists the existing edges
    along that path, first to last, each {"lock", "kind", "actor", "pid", "held", "site"}
    naming the lock that was taken and who took it first, holding what."""
    src, tgt = acquiring["lock"], holding["lock"]
    parent = chain[-2]["lock"] if len(chain) > 1 else src
    lines = [
        "======================================================",
        CIRCULAR_TITLE,
        "------------------------------------------------------",
        f"{actor}/{pid} is trying to acquire lock:",
        f" {_lockname(acquiring)}{_at(acquiring)}",
        "but task is already holding lock:",
        f" {_lockname(holding)}{_at(holding)}",
        "which lock already depends on the new lock.",
        "the existing dependency chain (in reverse order) is:",
    ]
    for depth in range(len(chain), 0, -1):
        link = chain[depth - 1]
        under = ", ".join(link["held"]) or "nothing"
        where = f", at: {link['site']}" if link.get("site") else ""
        lines.append(
            f"-> #{depth} ({link['lock']}){usage(link['kind'])}: first taken by "
            f"{link['actor']}/{link['pid']} while holding {under}{where}"
        )
    now_under = ", ".join(h.get("name") or h["lock"] for h in held) or "nothing"
    lines.append(
        f"-> #0 ({src}){usage(acquiring['mode'])}: being taken by {actor}/{pid} "
        f"while holding {now_under}{_at(acquiring)}"
    )
    lines.append("other info that might help us debug this:")
    if parent != src:
        lines.append("Chain exists of:")
        lines.append(f"  {src} --> {parent} --> {tgt}")
    cpu1 = " " * 31
    lines += [
        " Possible unsafe locking scenario:",
        "       CPU0                    CPU1",
        "       ----                    ----",
        f"  lock({tgt});",
        f"{cpu1}lock({parent});",
        f"{cpu1}lock({tgt});",
        f"  lock({src});",
        " *** DEADLOCK ***",
    ]
    lines += held_lines(actor, pid, held)
    return "\n".join(lines)


def format_depth_overflow(actor: str, pid: int, held: list[dict]) -> str:
    lines = [
        "BUG: MAX_LOCK_DEPTH too low!",
        "turning off the locking correctness validator.",
        f"depth: {len(held)}  max: {MAX_LOCK_DEPTH}!",
    ]
    return "\n".join(lines + held_lines(actor, pid, held))


def format_still_held(actor: str, pid: int, held: list[dict]) -> str:
    lines = [
        "====================================",
        f"WARNING: {actor}/{pid} still has locks held!",
        "------------------------------------",
    ]
    return "\n".join(lines + held_lines(actor, pid, held))


# --- hung tasks ---------------------------------------------------------------------


def _secs(ns: int) -> str:
    return str(ns // 1_000_000_000) if ns % 1_000_000_000 == 0 else f"{ns / 1e9:g}"


def _same(a: dict, b: dict) -> bool:
    return a["lock"] == b["lock"] and a["idx"] == b["idx"]


def _blockers(c: dict, snapshot: list[dict]) -> list[tuple[dict, str]]:
    """Contexts that `c` waits for, with how: a holder of a conflicting mode, or (for a
    reader) a writer already queued on the same rwsem, which readers must not pass."""
    w = c["waiting"]
    out = []
    for o in snapshot:
        if o["ctx"] == c["ctx"]:
            continue
        if any(_same(h, w) and (w["mode"] != "read" or h["mode"] != "read") for h in o["held"]):
            out.append((o, "held by"))
        elif (
            w["mode"] == "read"
            and o["waiting"]
            and _same(o["waiting"], w)
            and o["waiting"]["mode"] == "write"
        ):
            out.append((o, "queued behind waiting writer"))
    return out


def _find_cycle(start: dict, snapshot: list[dict]) -> list[tuple[dict, str, dict]] | None:
    """First wait-for cycle reachable from `start`: [(waiter, how, blocker), ...]."""
    by_ctx = {c["ctx"]: c for c in snapshot}
    stack: list[tuple[dict, str, dict]] = []
    on_stack: dict[int, int] = {}
    done: set[int] = set()

    def visit(c: dict) -> list | None:
        on_stack[c["ctx"]] = len(stack)
        if c["waiting"]:
            for o, how in _blockers(c, snapshot):
                stack.append((c, how, o))
                if o["ctx"] in on_stack:
                    return stack[on_stack[o["ctx"]] :]
                if o["ctx"] not in done and o["ctx"] in by_ctx:
                    found = visit(o)
                    if found:
                        return found
                stack.pop()
        del on_stack[c["ctx"]]
        done.add(c["ctx"])
        return None

    return visit(start)


def show_all_locks(snapshot: list[dict]) -> list[str]:
    """debug_show_all_locks(): every context that holds something."""
    lines = ["Showing all locks held in the system:"]
    for c in snapshot:
        if c["held"]:
            lines += held_lines(c["actor"], c["pid"], c["held"])
    lines.append("=============================================")
    return lines


def _hung_no_progress(c: dict, threshold_ns: int, now_ns: int, all_locks: list[str]) -> dict:
    """The report for a context that waits without a lock: a retry loop that makes no
    progress (cond_resched() between attempts) or a wait_event() that is never woken.
    Its site is a call chain "inner<-caller<-...", printed as the trace."""
    kw = c["kwait"]
    blocked = now_ns - kw["since_ns"]
    title = (
        f"INFO: task {c['actor']}:{c['pid']} blocked for more than "
        f"{_secs(threshold_ns)} seconds."
    )
    frames = [f for f in kw["site"].split("<-") if f]
    retry = kw["kind"] == "retry"
    how = (f"is retrying without progress ({kw['retries']} retries, cond_resched)" if retry
           else "is waiting for an event that does not come (wait_event)")
    lines = [
        title,
        f"      blocked for {blocked // 1_000_000} ms",
        f"task:{c['actor']} state:{'R' if retry else 'D'} pid:{c['pid']} tid:{c['tid']} "
        f"ctx:{c['ctx']}",
        f"{c['actor']}/{c['pid']} {how} in {frames[0] if frames else kw['site']}",
        "Call Trace:",
        " <TASK>",
        *[f" {f}" for f in frames],
        " </TASK>",
        *held_lines(c["actor"], c["pid"], c["held"]),
        *all_locks,
    ]
    data = {
        "ctx": c["ctx"],
        "actor": c["actor"],
        "pid": c["pid"],
        "tid": c["tid"],
        "waiting": None,
        "no_progress": dict(kw),
        "site": frames[0] if frames else kw["site"],
        "trace": frames,
        "held": [dict(h) for h in c["held"]],
        "blocked_ns": blocked,
        "threshold_ns": threshold_ns,
        "cycle": None,
        "in_cycle": False,
    }
    return {"kind": "hung_task", "title": title, "text": "\n".join(lines), "data": data}


def find_hung(snapshot: list[dict], threshold_ns: int, now_ns: int) -> list[dict]:
    """One hung_task report per context waiting longer than threshold_ns: for a lock,
    or without one (a retry loop making no progress; a wait_event, such as a wait for
    another actor's reply, after twice threshold_ns; the snapshot's "kwait", published
    by LockSpace.no_progress()).

    `snapshot` is LockSpace.contexts_snapshot(); `now_ns` is time.monotonic_ns() at (or
    after) the snapshot. Each report is {"kind": "hung_task", "title", "text", "data"}.
    """
    reports = []
    all_locks = show_all_locks(snapshot)
    for c in sorted(snapshot, key=lambda c: c["ctx"]):
        w = c["waiting"]
        kw = c.get("kwait")
        # A wait for an event (a reply from another actor) gets twice the time: what
        # it waits behind (a lock wait, a retry loop over there) is reported first.
        limit = threshold_ns * (2 if kw and kw["kind"] == "wait_event" else 1)
        if (not w or now_ns - w["since_ns"] <= threshold_ns) and kw and \
                now_ns - kw["since_ns"] > limit:
            reports.append(_hung_no_progress(c, limit, now_ns, all_locks))
            continue
        if not w or now_ns - w["since_ns"] <= threshold_ns:
            continue
        blocked = now_ns - w["since_ns"]
        title = (
            f"INFO: task {c['actor']}:{c['pid']} blocked for more than "
            f"{_secs(threshold_ns)} seconds."
        )
        lines = [
            title,
            f"      blocked for {blocked // 1_000_000} ms",
            f"task:{c['actor']} state:D pid:{c['pid']} tid:{c['tid']} ctx:{c['ctx']}",
            f"{c['actor']}/{c['pid']} is waiting for lock:",
            f" {_lockname(w)}{_at(w)}, mode: {w['mode']}",
            *all_locks,
        ]
        cycle = _find_cycle(c, snapshot)
        data = {
            "ctx": c["ctx"],
            "actor": c["actor"],
            "pid": c["pid"],
            "tid": c["tid"],
            "waiting": dict(w),
            "blocked_ns": blocked,
            "threshold_ns": threshold_ns,
            "cycle": None,
            "in_cycle": False,
        }
        if cycle:
            lines.append("Wait-for cycle (deadlock):")
            for waiter, how, blocker in cycle:
                ww = waiter["waiting"]
                lines.append(
                    f" {waiter['actor']}/{waiter['pid']} waits for {_lockname(ww)} "
                    f"[{ww['mode']}], {how} {blocker['actor']}/{blocker['pid']}"
                )
            lines.append(" *** DEADLOCK ***")
            data["cycle"] = [
                {
                    "ctx": waiter["ctx"],
                    "actor": waiter["actor"],
                    "pid": waiter["pid"],
                    "lock": waiter["waiting"]["lock"],
                    "idx": waiter["waiting"]["idx"],
                    "mode": waiter["waiting"]["mode"],
                    "how": how,
                    "blocked_by": blocker["ctx"],
                }
                for waiter, how, blocker in cycle
            ]
            data["in_cycle"] = any(step[0]["ctx"] == c["ctx"] for step in cycle)
        reports.append(
            {"kind": "hung_task", "title": title, "text": "\n".join(lines), "data": data}
        )
    # The most precise report first: lock waits (they name the holder), then retry loops,
    # then waits for an event (a reply), which are often only the far end of one of those.
    return sorted(reports, key=_hung_rank)


def _hung_rank(rep: dict) -> int:
    kw = rep["data"].get("no_progress")
    return 0 if kw is None else 1 if kw["kind"] == "retry" else 2
