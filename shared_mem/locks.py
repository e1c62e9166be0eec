# Kernel locks for the ksmlab model, shared by every actor process of one run.
#
# What is modelled. mm/ksm.c takes four kinds of lock and the model must really block on
# them, across processes, with the kernel's rules:
#   - the sleeping mutex (ksm_thread_mutex, taken by ksmd and by the sysfs/exit paths);
#   - spinlocks (ksm_mmlist_lock, the page-table lock, zone->lock). In the model they
#     block like the mutex; "cannot sleep while held" is not checked;
#   - rw_semaphores (mm->mmap_lock, anon_vma->rwsem): many readers or one writer, and a
#     writer that is waiting holds back readers that come after it (rwsem_down_read_
#     slowpath() queues behind a waiting writer) so writers are not starved;
#   - the PG_locked bit of a page frame (lock_page()/trylock_page()).
# Every context keeps a held-locks stack (current->held_locks) in a shared table, with
# what it is waiting for and since when; lockdep (shared_mem/lockdep.py) checks lock
# order against a class graph kept in the same table; khungtaskd's report is built from
# a snapshot of it (find_hung).
#
# Why OFD byte-range locks. A lock instance is a byte (an rwsem is two) of one lock file
# per run, locked with fcntl(F_OFD_SETLK/F_OFD_SETLKW). The kernel drops such a lock when
# the last descriptor of its open file description goes away, so an actor that is
# SIGKILLed (our OOM killer does exactly that) cannot leave a lock held for ever. A
# POSIX semaphore (multiprocessing.Lock) has no owner and stays taken; classic POSIX
# record locks belong to the process and vanish when *any* fd of the file is closed.
# OFD locks belong to the open file description instead, which means two threads using
# one fd would share ownership and never exclude each other: so every thread that acts
# as a kernel context opens its own fd (bind_context(), kept in a threading.local), and a
# forked child drops the descriptors it inherited and must bind again. An uncontended
# lock is one non-blocking F_OFD_SETLK; only when it fails do we publish "waiting" and
# block in F_OFD_SETLKW. The kernel does no deadlock detection for OFD locks, so an
# ABBA deadlock in the model really hangs, as it would in the kernel; find_hung() is how
# it is seen.
#
# Rules the model enforces. Modes are "excl" (mutex, spinlock, page bit), "read" and
# "write" (rwsem). Releasing a lock the context does not hold, or in the wrong mode,
# raises RuntimeError (the kernel's "bad unlock balance"). Taking a lock the context
# already holds raises too: for OFD locks it would silently succeed, in the kernel it
# deadlocks; a trylock of it just fails, as mutex_trylock() by the owner does. Every
# acquire may name its call site (site="scan_get_next_rmap_item"); it shows in reports.
# lockdep_report() returns the run's splat from any process, whoever made it.
#
# A thread that ends without release_context() is reaped when its thread-local state
# goes: its fd is closed (its locks go with it) and its slot is freed, without a report.
#
# When a holder dies, its locks vanish with it. In the model that means the lock state
# the dead actor protected may be half-updated; the supervisor tears the run down when
# an actor dies unexpectedly, so nothing ever runs on that state.
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import msgpack

from shared_mem.lockdep import (
    CIRCULAR_TITLE,
    EDGE_RECORD_SIZE,
    MAX_LOCK_DEPTH,
    DepGraph,
    find_hung,
    format_circular,
    format_depth_overflow,
    format_still_held,
)
from shared_mem.segment import SHM_DIR, Segment, segment_name

__all__ = [
    "BIT",
    "MAX_LOCK_DEPTH",
    "MUTEX",
    "RWSEM",
    "SPIN",
    "BitLock",
    "LockSpace",
    "Mutex",
    "RWSem",
    "SpinLock",
    "find_hung",
]

MUTEX, SPIN, RWSEM, BIT = "mutex", "spin", "rwsem", "bit"
_KINDS = (MUTEX, SPIN, RWSEM, BIT)

EventHook = Callable[[str, str, int, str, int], Any]
ReportHook = Callable[[str, str, str, dict], Any]
SchedHook = Callable[[str, str, str], Any]

_fcntl = fcntl.fcntl
_now = time.monotonic_ns
_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_SETLKW = getattr(fcntl, "F_OFD_SETLKW", 38)
_FLOCK = struct.Struct("hhqqi4x")
_BUSY = (errno.EAGAIN, errno.EACCES)

EXCL, READ, WRITE = 1, 2, 3
_MODE = ("", "excl", "read", "write")
_SITEF = 16  # mode-word flag: a site string is stored for this entry

# Lock file bytes: table lock, lockdep graph lock, one liveness byte per context slot,
# then the lock instances (one byte each; an rwsem has its rw byte and a writer-queue byte).
_TABLE_BYTE, _GRAPH_BYTE, _LIVE_BASE = 0, 1, 8

# State segment: int64 header, int64 context table, per-context strings, lockdep graph,
# one "writer waiting" byte per rwsem instance, and room for the first lockdep report.
_MAGIC = 0x6B736D6C6F636B31  # "ksmlock1"
_H_MAGIC, _H_VERSION, _H_NCLS, _H_MAXCTX, _H_DEBUG, _H_NREPORTS, _H_REPLEN = range(7)
_HDR_WORDS = 16
_C_STATE, _C_PID, _C_TID, _C_WAIT, _C_WSINCE, _C_HELDN, _C_HELD = range(7)
_CTX_WORDS = 40  # 6 words + (key, since) per held lock, padded
# The two padding words after the held stack: a wait that is not a lock wait (a retry
# loop without progress, a wait_event), published by no_progress(): since when, and
# (retries << 4 | kind). 0 since = none.
_C_KWAIT, _C_KWINFO = _C_HELD + 2 * MAX_LOCK_DEPTH, _C_HELD + 2 * MAX_LOCK_DEPTH + 1
assert _C_KWINFO < _CTX_WORDS
KWAIT_RETRY, KWAIT_EVENT = 1, 2  # cond_resched() retry loop (state R), wait_event (state D)
_ACTOR_LEN, _SITE_LEN, _KWAIT_LEN = 32, 48, 96
# actor, wait site, held sites, then the no-progress site (a call chain, so longer)
_CSTR_BYTES = _ACTOR_LEN + (1 + MAX_LOCK_DEPTH) * _SITE_LEN + _KWAIT_LEN
_KWAIT_SOFF = _ACTOR_LEN + (1 + MAX_LOCK_DEPTH) * _SITE_LEN
_REPORT_BYTES = 32768


def _flock(kind: int, off: int) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, off, 1, 0)


def _unbound() -> RuntimeError:
    return RuntimeError("this thread is not a kernel context: call LockSpace.bind_context() first")


def _align(n: int, a: int = 8) -> int:
    return (n + a - 1) // a * a


class _Ctx:
    """One kernel context (a thread acting as a task): its fd, slot and held stack."""

    __slots__ = ("__weakref__", "actor", "base", "fd", "fin", "held", "id", "pid", "sbase", "tid")


def _reap_ctx(sp: LockSpace, slot: int, fd: int, pid: int) -> None:
    # Runs on release_context(), close(), thread exit (its threading.local dies) and, in
    # a forked child, for every context inherited from the parent: there it only closes
    # the duplicated fd, which leaves the parent's locks alone.
    if os.getpid() == pid and not sp._closed:
        base = sp._ctx_base + slot * _CTX_WORDS
        sp._q[base + _C_WAIT] = 0
        sp._q[base + _C_KWAIT] = 0
        sp._q[base + _C_STATE] = 0  # before the liveness byte goes (see _claim_slot)
    with contextlib.suppress(OSError):
        os.close(fd)


_SPACES: weakref.WeakSet[LockSpace] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for sp in list(_SPACES):
        sp._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class LockSpace:
    """All kernel locks of one run."""

    def __init__(self, desc: dict, seg: Segment, owner: bool) -> None:
        self._desc = desc
        self._seg = seg
        self._owner = owner
        self._closed = False
        self.run_id: str = desc["run_id"]
        self._lock_path: str = desc["lock_path"]
        self._maxctx: int = desc["max_contexts"]
        classes = [tuple(c) for c in desc["classes"]]
        self._names = [c[0] for c in classes]
        self._kinds = [c[1] for c in classes]
        self._counts = [int(c[2]) for c in classes]
        self._cid = {name: i for i, name in enumerate(self._names)}
        self._ncls = n = len(classes)
        lay = _layout(classes, self._maxctx)
        self._ctx_base = lay["ctx"] // 8
        self._cstr = lay["cstr"]
        self._rwf = lay["rwf"]
        self._report_off = lay["report"]
        self._lock_off = lay["lock_off"]
        self._mv = memoryview(seg.buf)
        self._q = self._mv.cast("q")
        self._graph = DepGraph(self._mv, lay["matrix"], lay["records"], n)
        self._matrix = self._graph.matrix
        self._locks: list[list[Any]] = [[None] * c for c in self._counts]
        self._tls = threading.local()
        self._ctxs: weakref.WeakValueDictionary[int, _Ctx] = weakref.WeakValueDictionary()
        self._hook: EventHook | None = None
        self._sched: SchedHook | None = None
        self._report_hook: ReportHook | None = None
        self._probe = os.open(self._lock_path, os.O_RDWR | os.O_CLOEXEC)
        self._fl_table = (_flock(fcntl.F_WRLCK, _TABLE_BYTE), _flock(fcntl.F_UNLCK, _TABLE_BYTE))
        self._fl_graph = (_flock(fcntl.F_WRLCK, _GRAPH_BYTE), _flock(fcntl.F_UNLCK, _GRAPH_BYTE))
        _SPACES.add(self)

    # --- setup ---------------------------------------------------------------------

    @classmethod
    def create(
        cls, run_id: str, classes: list[tuple[str, str, int]], max_contexts: int = 256
    ) -> LockSpace:
        classes = [(str(c), str(k), int(n)) for c, k, n in classes]
        names = [c[0] for c in classes]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate lock class in {names}")
        for name, kind, n in classes:
            if kind not in _KINDS:
                raise ValueError(f"lock class {name}: unknown kind {kind!r}")
            if n < 1:
                raise ValueError(f"lock class {name}: needs at least one instance")
        lock_path = os.path.join(SHM_DIR, segment_name(run_id, "locks"))
        state_name = segment_name(run_id, "lockstate")
        os.close(os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            seg = Segment.create(state_name, _layout(classes, max_contexts)["size"])
        except BaseException:
            os.unlink(lock_path)
            raise
        q = memoryview(seg.buf).cast("q")
        q[_H_VERSION] = 1
        q[_H_NCLS] = len(classes)
        q[_H_MAXCTX] = max_contexts
        q[_H_DEBUG] = 1
        q[_H_MAGIC] = _MAGIC
        q.release()
        desc = {
            "version": 1,
            "run_id": run_id,
            "lock_path": lock_path,
            "state_name": state_name,
            "classes": [list(c) for c in classes],
            "max_contexts": max_contexts,
            "owner_pid": os.getpid(),
        }
        return cls(desc, seg, owner=True)

    @classmethod
    def attach(cls, desc: dict) -> LockSpace:
        seg = Segment.attach(desc["state_name"])
        if memoryview(seg.buf)[:8].cast("q")[0] != _MAGIC:
            seg.close()
            raise ValueError(f"{desc['state_name']} is not a ksmlab lock state segment")
        return cls(dict(desc), seg, owner=False)

    def descriptor(self) -> dict:
        return dict(self._desc)

    # --- contexts ------------------------------------------------------------------

    def bind_context(self, actor: str) -> int:
        """Make the calling thread a kernel context named `actor`; returns its id."""
        if self._closed:
            raise RuntimeError("LockSpace is closed")
        ctx = getattr(self._tls, "ctx", None)
        if ctx is not None:
            ctx.actor = actor
            self._put_str(ctx.sbase, _ACTOR_LEN, actor)
            return ctx.id
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            slot = self._claim_slot(fd, actor)
        except BaseException:
            os.close(fd)
            raise
        ctx = _Ctx()
        ctx.id, ctx.fd, ctx.actor, ctx.held = slot, fd, actor, []
        ctx.pid, ctx.tid = os.getpid(), threading.get_native_id()
        ctx.base = self._ctx_base + slot * _CTX_WORDS
        ctx.sbase = self._cstr + slot * _CSTR_BYTES
        ctx.fin = weakref.finalize(ctx, _reap_ctx, self, slot, fd, ctx.pid)
        self._ctxs[slot] = ctx
        self._tls.ctx = ctx
        return slot

    def _claim_slot(self, fd: int, actor: str) -> int:
        q = self._q
        _fcntl(fd, _SETLKW, self._fl_table[0])
        try:
            for slot in range(self._maxctx):
                base = self._ctx_base + slot * _CTX_WORDS
                if q[base + _C_STATE] and self._alive(slot):
                    continue
                # Free, or its owner died. A slot whose owner is between clearing the
                # state word and dropping its liveness byte fails here and is skipped.
                try:
                    _fcntl(fd, _SETLK, _flock(fcntl.F_WRLCK, _LIVE_BASE + slot))
                except OSError as e:
                    if e.errno in _BUSY:
                        continue
                    raise
                q[base + _C_PID] = os.getpid()
                q[base + _C_TID] = threading.get_native_id()
                q[base + _C_WAIT] = 0
                q[base + _C_KWAIT] = 0
                q[base + _C_HELDN] = 0
                self._put_str(self._cstr + slot * _CSTR_BYTES, _ACTOR_LEN, actor)
                q[base + _C_STATE] = 1
                return slot
            raise RuntimeError(f"LockSpace: all {self._maxctx} context slots are in use")
        finally:
            _fcntl(fd, _SETLK, self._fl_table[1])

    def _alive(self, slot: int) -> bool:
        r = _fcntl(self._probe, _GETLK, _flock(fcntl.F_WRLCK, _LIVE_BASE + slot))
        return _FLOCK.unpack(r)[0] != fcntl.F_UNLCK

    def release_context(self) -> None:
        """The calling thread stops being a kernel context; its slot becomes free."""
        ctx = getattr(self._tls, "ctx", None)
        if ctx is None:
            return
        if ctx.held and not self._closed:
            held = self._refs(ctx.held)
            text = format_still_held(ctx.actor, ctx.pid, held)
            title = f"WARNING: {ctx.actor}/{ctx.pid} still has locks held!"
            self._report_once(ctx, "lockdep", title, text, {"actor": ctx.actor, "held": held})
        del self._tls.ctx
        self._ctxs.pop(ctx.id, None)
        ctx.fin()  # clears the slot, then closes the fd: its OFD locks go with it

    def _after_fork(self) -> None:
        for ctx in list(self._ctxs.values()):
            ctx.fin()  # pid differs: only closes the inherited duplicate fd
        self._ctxs.clear()
        self._tls.__dict__.clear()
        self._owner = False

    # --- hooks and lookup ----------------------------------------------------------

    def set_event_hook(self, fn: EventHook | None) -> None:
        """fn(event, lock class, idx, mode, wait_ns) for lock_acquire, lock_contended,
        lock_acquired and lock_release in this process; None turns events off."""
        self._hook = fn

    def set_sched_hook(self, fn: SchedHook | None) -> None:
        """fn(context label, lock class, op) at every acquire (before it, "acquire") and
        every release (after it, "release") of this process: where a schedule plan
        delays a context. None (the default) costs one attribute test per lock op."""
        self._sched = fn

    def set_report_hook(self, fn: ReportHook | None) -> None:
        """fn(kind, title, text, data) for lockdep reports made in this process."""
        self._report_hook = fn

    def get(self, cls: str, idx: int = 0) -> Any:
        cid = self._cid[cls]
        lst = self._locks[cid]
        if idx < 0:
            raise IndexError(f"{cls}: instance {idx} out of range")
        try:
            lk = lst[idx]
        except IndexError:
            raise IndexError(f"{cls}: instance {idx} out of range 0..{len(lst) - 1}") from None
        if lk is None:
            lk = lst[idx] = _KIND_CLASS[self._kinds[cid]](self, cid, idx)
        return lk

    def _display(self, cid: int, idx: int) -> str:
        return self._names[cid] if self._counts[cid] == 1 else f"{self._names[cid]}#{idx}"

    # --- inspection ----------------------------------------------------------------

    def held_locks(self) -> list[tuple[str, int, str]]:
        ctx = getattr(self._tls, "ctx", None)
        if ctx is None:
            return []
        return [(h[0]._name, h[0]._idx, _MODE[h[1]]) for h in ctx.held]

    def contexts_snapshot(self) -> list[dict]:
        """Every live context with what it waits for and holds. Read without locking,
        like debug_show_all_locks(): an entry may be caught mid-update."""
        q = self._q
        out = []
        for slot in range(self._maxctx):
            base = self._ctx_base + slot * _CTX_WORDS
            if not q[base + _C_STATE] or not self._alive(slot):
                continue
            sbase = self._cstr + slot * _CSTR_BYTES
            w = q[base + _C_WAIT]
            waiting = self._entry(w, q[base + _C_WSINCE], sbase, 0) if w else None
            held = []
            for k in range(min(q[base + _C_HELDN], MAX_LOCK_DEPTH)):
                e = self._entry(
                    q[base + _C_HELD + 2 * k], q[base + _C_HELD + 2 * k + 1], sbase, k + 1
                )
                if e is not None:
                    held.append(e)
            kwait = None
            ksince = q[base + _C_KWAIT]
            if ksince:
                info = q[base + _C_KWINFO]
                kwait = {
                    "site": self._get_str(sbase + _KWAIT_SOFF, _KWAIT_LEN),
                    "since_ns": ksince,
                    "retries": info >> 4,
                    "kind": "retry" if info & 0xF == KWAIT_RETRY else "wait_event",
                }
            out.append(
                {
                    "ctx": slot,
                    "actor": self._get_str(sbase, _ACTOR_LEN),
                    "pid": q[base + _C_PID],
                    "tid": q[base + _C_TID],
                    "waiting": waiting,
                    "held": held,
                    "kwait": kwait,
                }
            )
        return out

    # --- waits that are not lock waits -------------------------------------------------

    def no_progress(self, site: str, retries: int, kind: int = KWAIT_RETRY) -> None:
        """Publish that the calling context is in `site` without making progress:
        the first call (retries == 0) stamps "since now" and the site, later calls only
        update the retry count. The hung-task watchdog reads it from the snapshot."""
        ctx = getattr(self._tls, "ctx", None)
        if ctx is None:
            raise _unbound()
        q = self._q
        if retries == 0 or not q[ctx.base + _C_KWAIT]:
            q[ctx.base + _C_KWAIT] = 0
            self._put_str(ctx.sbase + _KWAIT_SOFF, _KWAIT_LEN, site)
            q[ctx.base + _C_KWINFO] = (retries << 4) | kind
            q[ctx.base + _C_KWAIT] = _now()  # published after its site
        else:
            q[ctx.base + _C_KWINFO] = (retries << 4) | kind

    def progress(self) -> None:
        """The calling context left its no-progress wait (or made progress)."""
        ctx = getattr(self._tls, "ctx", None)
        if ctx is not None:
            self._q[ctx.base + _C_KWAIT] = 0

    def _entry(self, word: int, since: int, sbase: int, site_slot: int) -> dict | None:
        cid, idx, mode = word >> 40, (word >> 8) & 0xFFFFFFFF, word & 0xF
        if not (0 <= cid < self._ncls and 1 <= mode <= 3):
            return None  # torn read
        site = None
        if word & _SITEF:
            site = self._get_str(sbase + _ACTOR_LEN + site_slot * _SITE_LEN, _SITE_LEN) or None
        return {
            "lock": self._names[cid],
            "idx": idx,
            "mode": _MODE[mode],
            "since_ns": since,
            "site": site,
            "name": self._display(cid, idx),
        }

    def lockdep_report(self) -> dict | None:
        """The run's lockdep report ({"kind","title","text","data"}), if any was made."""
        n = self._q[_H_REPLEN]
        if not n:
            return None
        return msgpack.unpackb(bytes(self._mv[self._report_off : self._report_off + n]))

    def lockdep_edges(self) -> list[tuple[str, str]]:
        return [(self._names[a], self._names[b]) for a, b in self._graph.edges()]

    # --- teardown ------------------------------------------------------------------

    def close(self) -> None:
        """Release every context of this process (their locks go too) and unmap."""
        if self._closed:
            return
        for ctx in list(self._ctxs.values()):
            ctx.fin()
        self._ctxs.clear()
        self._tls.__dict__.clear()
        self._closed = True
        _SPACES.discard(self)
        self._graph.release()
        self._q.release()
        self._mv.release()
        with contextlib.suppress(OSError):
            os.close(self._probe)
        self._seg.close()

    def unlink(self) -> None:
        """Owner only (a no-op elsewhere): remove the lock file and the state segment."""
        if not self._owner:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._lock_path)
        self._seg.unlink()

    # --- held stack ----------------------------------------------------------------

    def _push(self, ctx: _Ctx, lk: _Lock, mode: int, site: str | None) -> None:
        held = ctx.held
        n = len(held)
        now = _now()
        held.append((lk, mode, now, site))
        if n < MAX_LOCK_DEPTH:
            q = self._q
            w = ctx.base + _C_HELD + 2 * n
            if site is None:
                q[w] = lk._key | mode
            else:
                self._put_str(ctx.sbase + _ACTOR_LEN + (n + 1) * _SITE_LEN, _SITE_LEN, site)
                q[w] = lk._key | mode | _SITEF
            q[w + 1] = now
            q[ctx.base + _C_HELDN] = n + 1
        else:
            self._depth_overflow(ctx)

    def _pop_slow(self, ctx: _Ctx, lk: _Lock, mode: int) -> None:
        held = ctx.held
        for i in range(len(held) - 1, -1, -1):
            if held[i][0] is lk:
                if held[i][1] != mode:
                    raise RuntimeError(
                        f"{ctx.actor}/{ctx.pid}: releasing {self._display(lk._cid, lk._idx)} "
                        f"for {_MODE[mode]} but it is held for {_MODE[held[i][1]]}"
                    )
                del held[i]
                self._sync_held(ctx)
                return
        raise RuntimeError(
            f"bad unlock balance detected: {ctx.actor}/{ctx.pid} is trying to release lock "
            f"({self._display(lk._cid, lk._idx)}) but does not hold it"
        )

    def _sync_held(self, ctx: _Ctx) -> None:
        q = self._q
        held = ctx.held[:MAX_LOCK_DEPTH]
        q[ctx.base + _C_HELDN] = 0
        for k, (lk, mode, since, site) in enumerate(held):
            w = ctx.base + _C_HELD + 2 * k
            if site is None:
                q[w] = lk._key | mode
            else:
                self._put_str(ctx.sbase + _ACTOR_LEN + (k + 1) * _SITE_LEN, _SITE_LEN, site)
                q[w] = lk._key | mode | _SITEF
            q[w + 1] = since
        q[ctx.base + _C_HELDN] = len(held)

    def _put_str(self, off: int, size: int, s: str) -> None:
        raw = s.encode("utf-8", "replace")[: size - 1]
        self._mv[off] = len(raw)
        self._mv[off + 1 : off + 1 + len(raw)] = raw

    def _get_str(self, off: int, size: int) -> str:
        n = min(self._mv[off], size - 1)
        return bytes(self._mv[off + 1 : off + 1 + n]).decode("utf-8", "replace")

    # --- waiting -------------------------------------------------------------------

    def _set_wait(self, ctx: _Ctx, lk: _Lock, mode: int, site: str | None, since: int) -> None:
        q = self._q
        q[ctx.base + _C_WSINCE] = since
        if site is None:
            q[ctx.base + _C_WAIT] = lk._key | mode
        else:
            self._put_str(ctx.sbase + _ACTOR_LEN, _SITE_LEN, site)
            q[ctx.base + _C_WAIT] = lk._key | mode | _SITEF

    def _block(
        self, ctx: _Ctx, lk: _Lock, mode: int, site: str | None, fl: bytes, err: OSError
    ) -> int:
        """The non-blocking attempt failed: publish the wait, then sleep on the lock."""
        if err.errno not in _BUSY:
            raise err
        since = _now()
        hook = self._hook
        if hook is not None:
            hook("lock_contended", lk._name, lk._idx, _MODE[mode], 0)
        self._set_wait(ctx, lk, mode, site, since)
        try:
            _fcntl(ctx.fd, _SETLKW, fl)
        finally:
            self._q[ctx.base + _C_WAIT] = 0
        return _now() - since

    def _block_reader(self, ctx: _Ctx, lk: RWSem, site: str | None) -> int:
        """A writer is queued: wait until it is through the queue byte, then take rw."""
        since = _now()
        hook = self._hook
        if hook is not None:
            hook("lock_contended", lk._name, lk._idx, "read", 0)
        self._set_wait(ctx, lk, READ, site, since)
        fd = ctx.fd
        try:
            try:
                _fcntl(fd, _SETLKW, lk._qr)
            finally:
                _fcntl(fd, _SETLK, lk._qu)  # unlocking what we do not hold is a no-op
            _fcntl(fd, _SETLKW, lk._fr)
        finally:
            self._q[ctx.base + _C_WAIT] = 0
        return _now() - since

    def _block_writer(self, ctx: _Ctx, lk: RWSem, site: str | None) -> int:
        """Queue as the waiting writer (one at a time, on the queue byte), raise the
        writer-waiting flag so new readers hold back, then wait for readers to drain."""
        since = _now()
        hook = self._hook
        told = False
        self._set_wait(ctx, lk, WRITE, site, since)
        fd = ctx.fd
        try:
            try:
                _fcntl(fd, _SETLK, lk._qw)
            except OSError as e:
                if e.errno not in _BUSY:
                    raise
                if hook is not None:
                    hook("lock_contended", lk._name, lk._idx, "write", 0)
                    told = True
                _fcntl(fd, _SETLKW, lk._qw)
            try:
                lk._b[lk._flag] = 1
                if hook is not None and not told:
                    hook("lock_contended", lk._name, lk._idx, "write", 0)
                _fcntl(fd, _SETLKW, lk._fw)
            finally:
                lk._b[lk._flag] = 0
                _fcntl(fd, _SETLK, lk._qu)
        finally:
            self._q[ctx.base + _C_WAIT] = 0
        return _now() - since

    # --- lockdep -------------------------------------------------------------------

    def _pre_acquire(self, ctx: _Ctx, lk: _Lock, mode: int, site: str | None) -> None:
        """Called only when the context already holds something (never on the common
        single-lock path): catch recursion, and validate any new class edges."""
        b = lk._cid
        n = self._ncls
        m = self._matrix
        new = False
        for h in ctx.held:
            o = h[0]
            if o is lk:
                raise RuntimeError(
                    f"possible recursive locking detected: {ctx.actor}/{ctx.pid} is trying "
                    f"to acquire {self._display(b, lk._idx)} ({_MODE[mode]}) which it "
                    f"already holds ({_MODE[h[1]]}); in the kernel this deadlocks"
                )
            if o._cid != b and not m[o._cid * n + b]:
                new = True
        if new and self._q[_H_DEBUG]:
            self._lockdep_add(ctx, lk, mode, site)

    def _lockdep_add(self, ctx: _Ctx, lk: _Lock, mode: int, site: str | None) -> None:
        g = self._graph
        b = lk._cid
        report = None
        _fcntl(ctx.fd, _SETLKW, self._fl_graph[0])
        try:
            if not self._q[_H_DEBUG]:
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
                report = self._circular(ctx, lk, mode, site, h, path)
                self._q[_H_DEBUG] = 0  # debug_locks_off(): one report per run
                self._store_report(*report)
                break
        finally:
            _fcntl(ctx.fd, _SETLK, self._fl_graph[1])
        if report is not None:
            self._deliver(*report)

    def _ref(self, lk: _Lock, mode: int, site: str | None) -> dict:
        return {
            "lock": lk._name,
            "idx": lk._idx,
            "name": self._display(lk._cid, lk._idx),
            "kind": lk._kind,
            "mode": _MODE[mode],
            "site": site,
        }

    def _refs(self, held: list) -> list[dict]:
        return [self._ref(h[0], h[1], h[3]) for h in held]

    def _circular(
        self, ctx: _Ctx, lk: _Lock, mode: int, site: str | None, h: tuple, path: list[int]
    ) -> tuple[str, str, str, dict]:
        chain = []
        for k in range(1, len(path)):
            rec = self._graph.record(path[k - 1], path[k])
            chain.append(
                {
                    "lock": self._names[path[k]],
                    "kind": self._kinds[path[k]],
                    "actor": rec["actor"],
                    "pid": rec["pid"],
                    "tid": rec["tid"],
                    "site": rec["site"],
                    "held": [self._display(c, i) for c, i, _ in rec["chain"]],
                }
            )
        acquiring = self._ref(lk, mode, site)
        holding = self._ref(h[0], h[1], h[3])
        held = self._refs(ctx.held)
        text = format_circular(ctx.actor, ctx.pid, acquiring, holding, held, chain)
        data = {
            "actor": ctx.actor,
            "pid": ctx.pid,
            "tid": ctx.tid,
            "acquiring": acquiring,
            "holding": holding,
            "held": held,
            "cycle": [self._names[c] for c in path],
            "chain": chain,
        }
        return "lockdep", CIRCULAR_TITLE, text, data

    def _depth_overflow(self, ctx: _Ctx) -> None:
        held = self._refs(ctx.held)
        text = format_depth_overflow(ctx.actor, ctx.pid, held)
        data = {"actor": ctx.actor, "pid": ctx.pid, "held": held}
        self._report_once(ctx, "lockdep", "BUG: MAX_LOCK_DEPTH too low!", text, data)

    def _report_once(self, ctx: _Ctx, kind: str, title: str, text: str, data: dict) -> None:
        _fcntl(ctx.fd, _SETLKW, self._fl_graph[0])
        try:
            on = bool(self._q[_H_DEBUG])
            if on:
                self._q[_H_DEBUG] = 0
                self._store_report(kind, title, text, data)
        finally:
            _fcntl(ctx.fd, _SETLK, self._fl_graph[1])
        if on:
            self._deliver(kind, title, text, data)

    def _store_report(self, kind: str, title: str, text: str, data: dict) -> None:
        raw = msgpack.packb({"kind": kind, "title": title, "text": text, "data": data})
        if len(raw) > _REPORT_BYTES:
            raw = msgpack.packb({"kind": kind, "title": title, "text": text[:16000], "data": {}})
        self._mv[self._report_off : self._report_off + len(raw)] = raw
        self._q[_H_REPLEN] = len(raw)
        self._q[_H_NREPORTS] += 1

    def _deliver(self, kind: str, title: str, text: str, data: dict) -> None:
        fn = self._report_hook
        if fn is None:
            sys.stderr.write(text + "\n")
        else:
            fn(kind, title, text, data)


def _layout(classes: list, max_contexts: int) -> dict:
    n = len(classes)
    lock_off = []
    rwf = []
    off = _align(_LIVE_BASE + max_contexts, 16)
    nrw = 0
    for _name, kind, count in classes:
        lock_off.append(off)
        off += count * (2 if kind == RWSEM else 1)
        rwf.append(nrw)
        nrw += count if kind == RWSEM else 0
    lay = {"lock_off": lock_off}
    pos = _HDR_WORDS * 8
    lay["ctx"] = pos
    pos += max_contexts * _CTX_WORDS * 8
    lay["cstr"] = pos
    pos = _align(pos + max_contexts * _CSTR_BYTES)
    lay["matrix"] = pos
    pos = _align(pos + n * n)
    lay["records"] = pos
    pos = _align(pos + n * n * EDGE_RECORD_SIZE)
    lay["rwf_base"] = pos
    lay["rwf"] = [pos + r for r in rwf]
    pos = _align(pos + nrw)
    lay["report"] = pos
    pos += _REPORT_BYTES
    lay["size"] = _align(pos, 4096)
    return lay


class _Lock:
    __slots__ = ("_b", "_cid", "_fu", "_fw", "_idx", "_key", "_kind", "_name", "_sp", "_tls")

    def __init__(self, sp: LockSpace, cid: int, idx: int) -> None:
        self._sp = sp
        self._tls = sp._tls
        self._b = sp._mv
        self._cid = cid
        self._idx = idx
        self._name = sp._names[cid]
        self._kind = sp._kinds[cid]
        self._key = (cid << 40) | (idx << 8)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._sp._display(self._cid, self._idx)}>"


class _ExclusiveLock(_Lock):
    """mutex / spinlock / PG_locked: one byte, exclusive."""

    __slots__ = ()

    def __init__(self, sp: LockSpace, cid: int, idx: int) -> None:
        super().__init__(sp, cid, idx)
        off = sp._lock_off[cid] + idx
        self._fw = _flock(fcntl.F_WRLCK, off)
        self._fu = _flock(fcntl.F_UNLCK, off)

    def lock(self, site: str | None = None) -> None:
        sp = self._sp
        try:
            ctx = self._tls.ctx
        except AttributeError:
            raise _unbound() from None
        if ctx.held:
            sp._pre_acquire(ctx, self, EXCL, site)
        if sp._sched is not None:
            sp._sched(ctx.actor, self._name, "acquire")
        hook = sp._hook
        if hook is not None:
            hook("lock_acquire", self._name, self._idx, "excl", 0)
        wait = 0
        try:
            _fcntl(ctx.fd, _SETLK, self._fw)
        except OSError as e:
            wait = sp._block(ctx, self, EXCL, site, self._fw, e)
        sp._push(ctx, self, EXCL, site)
        if hook is not None:
            hook("lock_acquired", self._name, self._idx, "excl", wait)

    def trylock(self, site: str | None = None) -> bool:
        sp = self._sp
        try:
            ctx = self._tls.ctx
        except AttributeError:
            raise _unbound() from None
        for h in ctx.held:
            if h[0] is self:
                return False  # mutex_trylock() by the owner fails too
        if sp._sched is not None:
            sp._sched(ctx.actor, self._name, "acquire")
        try:
            _fcntl(ctx.fd, _SETLK, self._fw)
        except OSError as e:
            if e.errno in _BUSY:
                return False
            raise
        sp._push(ctx, self, EXCL, site)
        hook = sp._hook
        if hook is not None:
            hook("lock_acquire", self._name, self._idx, "excl", 0)
            hook("lock_acquired", self._name, self._idx, "excl", 0)
        return True

    def unlock(self) -> None:
        sp = self._sp
        try:
            ctx = self._tls.ctx
        except AttributeError:
            raise _unbound() from None
        held = ctx.held
        if held and held[-1][0] is self:
            held.pop()
            if len(held) < MAX_LOCK_DEPTH:
                sp._q[ctx.base + _C_HELDN] = len(held)
        else:
            sp._pop_slow(ctx, self, EXCL)
        _fcntl(ctx.fd, _SETLK, self._fu)
        hook = sp._hook
        if hook is not None:
            hook("lock_release", self._name, self._idx, "excl", 0)
        if sp._sched is not None:
            sp._sched(ctx.actor, self._name, "release")

    def __enter__(self) -> _ExclusiveLock:
        self.lock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unlock()


class Mutex(_ExclusiveLock):
    """A sleeping mutex (ksm_thread_mutex)."""

    __slots__ = ()


class SpinLock(_ExclusiveLock):
    """A spinlock (ksm_mmlist_lock, ptl, zone->lock); blocks like a mutex in the model."""

    __slots__ = ()


class BitLock(_ExclusiveLock):
    """PG_locked of one page frame: lock_page() / trylock_page() / unlock_page()."""

    __slots__ = ()


class _RWGuard:
    __slots__ = ("_sem", "_site", "_write")

    def __init__(self, sem: RWSem, write: bool, site: str | None) -> None:
        self._sem, self._write, self._site = sem, write, site

    def __enter__(self) -> RWSem:
        if self._write:
            self._sem.down_write(self._site)
        else:
            self._sem.down_read(self._site)
        return self._sem

    def __exit__(self, *exc: object) -> None:
        if self._write:
            self._sem.up_write()
        else:
            self._sem.up_read()


class RWSem(_Lock):
    """A reader/writer semaphore (mmap_lock, anon_vma->rwsem).

    Two bytes: `rw` is locked shared by readers and exclusive by a writer; `queue` is
    held exclusive by the one writer currently waiting, which also raises a shared
    "writer waiting" flag. Readers that find the flag up wait on `queue` (shared) until
    that writer owns `rw`, then wait on `rw` for it to finish: a waiting writer is not
    starved by readers that keep coming. Readers already waiting on `rw`, and readers
    that read the flag just before it went up, may still go first (in the kernel, too,
    readers queued before the writer are woken before it). Several writers queue on
    `queue` one at a time.
    """

    __slots__ = ("_flag", "_fr", "_qr", "_qu", "_qw", "_rg", "_wg")

    def __init__(self, sp: LockSpace, cid: int, idx: int) -> None:
        super().__init__(sp, cid, idx)
        off = sp._lock_off[cid] + 2 * idx
        self._fr = _flock(fcntl.F_RDLCK, off)
        self._fw = _flock(fcntl.F_WRLCK, off)
        self._fu = _flock(fcntl.F_UNLCK, off)
        self._qr = _flock(fcntl.F_RDLCK, off + 1)
        self._qw = _flock(fcntl.F_WRLCK, off + 1)
        self._qu = _flock(fcntl.F_UNLCK, off + 1)
        self._flag = sp._rwf[cid] + idx
        self._rg = _RWGuard(self, False, None)
        self._wg = _RWGuard(self, True, None)

    def down_read(self, site: str | None = None) -> None:
        sp = self._sp
        try:
            ctx = self._tls.ctx
        except AttributeError:
            raise _unbound() from None
        if ctx.held:
            sp._pre_acquire(ctx, self, READ, site)
        if sp._sched is not None:
            sp._sched(ctx.actor, self._name, "acquire")
        hook = sp._hook
        if hook is not None:
            hook("lock_acquire", self._name, self._idx, "read", 0)
        wait = 0
        if self._b[self._flag]:
            wait = sp._block_reader(ctx, self, site)
        else:
            try:
                _fcntl(ctx.fd, _SETLK, self._fr)
            except OSError as e:
                wait = sp._block(ctx, self, READ, site, self._fr, e)
        sp._push(ctx, self, READ, site)
        if hook is not None:
            hook("lock_acquired", self._name, self._idx, "read", wait)

    def down_write(self, site: str | None = None) -> None:
        sp = self._sp
        try:
            ctx = self._tls.ctx
        except AttributeError:
            raise _unbound() from None
        if ctx.held:
            sp._pre_acquire(ctx, self, WRITE, site)
        if sp._sched is not None:
            sp._sched(ctx.actor, self._name, "acquire")
        hook = sp._hook
        if hook is not None:
            hook("lock_acquire", self._name, self._idx, "write", 0)
        wait = 0
        if self._b[self._flag]:
            wait = sp._block_writer(ctx, self, site)
        else:
            try:
                _fcntl(ctx.fd, _SETLK, self._fw)
            except OSError as e:
                if e.errno not in _BUSY:
                    raise
                wait = sp._block_writer(ctx, self, site)
        sp._push(ctx, self, WRITE, site)
        if hook is not None:
            hook("lock_acquired", self._name, self._idx, "write", wait)

    def _try(self, mode: int, fl: bytes, site: str | None) -> bool:
        sp = self._sp
        try:
            ctx = self._tls.ctx
        except AttributeError:
            raise _unbound() from None
        for h in ctx.held:
            if h[0] is self:
                return False
        if self._b[self._flag]:
            return False  # like the kernel: trylock fails while anyone is queued
        if sp._sched is not None:
            sp._sched(ctx.actor, self._name, "acquire")
        try:
            _fcntl(ctx.fd, _SETLK, fl)
        except OSError as e:
            if e.errno in _BUSY:
                return False
            raise
        sp._push(ctx, self, mode, site)
        hook = sp._hook
        if hook is not None:
            hook("lock_acquire", self._name, self._idx, _MODE[mode], 0)
            hook("lock_acquired", self._name, self._idx, _MODE[mode], 0)
        return True

    def down_read_trylock(self, site: str | None = None) -> bool:
        return self._try(READ, self._fr, site)

    def down_write_trylock(self, site: str | None = None) -> bool:
        return self._try(WRITE, self._fw, site)

    def _up(self, mode: int) -> None:
        sp = self._sp
        try:
            ctx = self._tls.ctx
        except AttributeError:
            raise _unbound() from None
        held = ctx.held
        if held and held[-1][0] is self and held[-1][1] == mode:
            held.pop()
            if len(held) < MAX_LOCK_DEPTH:
                sp._q[ctx.base + _C_HELDN] = len(held)
        else:
            sp._pop_slow(ctx, self, mode)
        _fcntl(ctx.fd, _SETLK, self._fu)
        hook = sp._hook
        if hook is not None:
            hook("lock_release", self._name, self._idx, _MODE[mode], 0)
        if sp._sched is not None:
            sp._sched(ctx.actor, self._name, "release")

    def up_read(self) -> None:
        self._up(READ)

    def up_write(self) -> None:
        self._up(WRITE)

    def read(self, site: str | None = None) -> _RWGuard:
        return self._rg if site is None else _RWGuard(self, False, site)

    def write(self, site: str | None = None) -> _RWGuard:
        return self._wg if site is None else _RWGuard(self, True, site)


_KIND_CLASS = {MUTEX: Mutex, SPIN: SpinLock, RWSEM: RWSem, BIT: BitLock}
