# LockSpace: every kernel lock of one run, and the kernel contexts that take them.
#
# A kernel context is a thread acting as a task (an actor's main thread, each worker
# thread). bind_context() makes the calling thread one: it opens its own descriptor of
# the run's lock file (an OFD lock's owner is the open file description, ofdlocks.py) and
# claims a row of the shared context table under the table lock, holding the row's
# liveness byte for as long as it lives. Like current->held_locks, the row shows the
# locks the context holds (pushed and popped by every lock and unlock, with since when
# and the call site) and the lock it waits for; no_progress() publishes a wait that is no
# lock wait (a retry loop, a wait_event). contexts_snapshot() reads every live row without
# locking, as debug_show_all_locks() does, and lockdep.find_hung() turns it into
# khungtaskd's report.
#
# A context ends with release_context() (a report if it still holds locks), with close(),
# or when its thread ends and its thread-local state is collected: its row is cleared and
# its descriptor closed, and with the descriptor its OFD locks go. A forked child drops
# the descriptors it inherited without touching the parent's rows, and must bind again.
#
# Per process, three hooks: an event hook sees every lock_acquire, lock_contended,
# lock_acquired and lock_release (the logs); a sched hook runs at every acquire and
# release (where a schedule plan delays a context); a report hook gets lockdep's report.
# Locks are made on first get(cls, idx), one object per instance and process.
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import msgpack

from shared_mem.futex import cas32 as _cas32
from shared_mem.lockcheck import _depth_overflow, _refs, _report_once
from shared_mem.lockdep import MAX_LOCK_DEPTH, DepGraph, format_still_held
from shared_mem.lockstate import (
    _ACTOR_LEN,
    _BUSY,
    _C_GEN,
    _C_HELD,
    _C_HELDN,
    _C_KWAIT,
    _C_KWINFO,
    _C_PEND,
    _C_PID,
    _C_STATE,
    _C_TID,
    _C_WAIT,
    _C_WSINCE,
    _CSTR_BYTES,
    _CTX_WORDS,
    _FLOCK,
    _GETLK,
    _GRAPH_BYTE,
    _H_DEBUG,
    _H_MAGIC,
    _H_MAXCTX,
    _H_NCLS,
    _H_REPLEN,
    _H_VERSION,
    _KINDS,
    _KWAIT_LEN,
    _KWAIT_SOFF,
    _LIVE_BASE,
    _MAGIC,
    _MODE,
    _SETLK,
    _SETLKW,
    _SITE_LEN,
    _SITEF,
    _TABLE_BYTE,
    KWAIT_RETRY,
    _fcntl,
    _flock,
    _layout,
)
from shared_mem.ofdlocks import _KIND_CLASS as _OFD_CLASSES
from shared_mem.ofdlocks import _Lock, _unbound
from shared_mem.segment import SHM_DIR, Segment, segment_name
from shared_mem.wordlocks import _KIND_CLASS as _WORD_CLASSES
from shared_mem.wordlocks import RW_QUEUED, RW_QUNIT, RW_READERS, RW_WRITER

# What a lock instance is made of: a word in the state segment (the default: one atomic
# when uncontended, wordlocks.py) or a byte of the lock file (ofdlocks.py, two syscalls a
# lock; kept to measure against and as the reference the word locks were checked on).
IMPLS = {"word": _WORD_CLASSES, "ofd": _OFD_CLASSES}
_SLOT_BITS, _GEN_MASK = 11, 0x1F  # an owner id is (generation << 11) | (slot + 1): 16 bits

_now = time.monotonic_ns

# (event, lock class, index, mode, wait ns, call site or None)
EventHook = Callable[[str, str, int, str, int, str | None], Any]
ReportHook = Callable[[str, str, str, dict], Any]
SchedHook = Callable[[str, str, str], Any]


class _Ctx:
    """One kernel context (a thread acting as a task): its fd, slot and held stack."""

    __slots__ = (
        "__weakref__", "actor", "base", "e", "fd", "fin", "held", "id", "me", "pe", "pid", "sbase",
        "sites", "tid",
    )


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
        self.impl: str = desc.get("impl", "word")
        self._classes = IMPLS[self.impl]
        self._word_off = lay["word_off"]
        self._mv = memoryview(seg.buf)
        self._q = self._mv.cast("q")
        self._w32 = self._mv[lay["words"] : lay["size"]].cast("i")
        anchor = ctypes.c_char.from_buffer(seg.buf)
        self._words_addr = ctypes.addressof(anchor) + lay["words"]
        del anchor  # an address, not an export: close() can still unmap
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
        cls,
        run_id: str,
        classes: list[tuple[str, str, int]],
        max_contexts: int = 256,
        impl: str = "word",
    ) -> LockSpace:
        classes = [(str(c), str(k), int(n)) for c, k, n in classes]
        if impl not in IMPLS:
            raise ValueError(f"lock impl {impl!r}: not one of {sorted(IMPLS)}")
        if not 1 <= max_contexts < (1 << _SLOT_BITS) - 1:
            raise ValueError(f"max_contexts {max_contexts}: 1..{(1 << _SLOT_BITS) - 2}")
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
            "impl": impl,
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
        ctx.me = ((self._q[ctx.base + _C_GEN] & _GEN_MASK) << _SLOT_BITS) | (slot + 1)
        ctx.e = ctypes.c_int32(0)
        ctx.pe = ctypes.byref(ctx.e)
        ctx.sites = [None] * (1 + MAX_LOCK_DEPTH)
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
                q[base + _C_PEND] = 0
                # A new generation: word locks a dead owner of this slot still holds name
                # the old one, so they read as the dead's, not as ours (wordlocks.py).
                q[base + _C_GEN] = (q[base + _C_GEN] % _GEN_MASK) + 1
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
            held = _refs(self, ctx.held)
            text = format_still_held(ctx.actor, ctx.pid, held)
            title = f"WARNING: {ctx.actor}/{ctx.pid} still has locks held!"
            _report_once(self, ctx, "lockdep", title, text, {"actor": ctx.actor, "held": held})
            if self.impl == "word":  # an OFD lock goes with the descriptor below
                for h in reversed(ctx.held):
                    h[0]._release_word(h[1])
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
            lk = lst[idx] = self._classes[self._kinds[cid]](self, cid, idx)
        return lk

    def _word_index(self, cid: int, idx: int) -> int:
        return self._word_off[cid] + idx * (2 if self._kinds[cid] == "rwsem" else 1)

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
        self._w32.release()
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
                if ctx.sites[n + 1] is not site:  # the same call site as last time: stored
                    self._put_str(ctx.sbase + _ACTOR_LEN + (n + 1) * _SITE_LEN, _SITE_LEN, site)
                    ctx.sites[n + 1] = site
                q[w] = lk._key | mode | _SITEF
            q[w + 1] = now
            q[ctx.base + _C_HELDN] = n + 1
        else:
            _depth_overflow(self, ctx)

    def _pop_slow(self, ctx: _Ctx, lk: _Lock, mode: int) -> str | None:
        """Release out of order: returns the site the lock was taken at."""
        return self._drop_held(ctx, self._find_held(ctx, lk, mode))

    def _find_held(self, ctx: _Ctx, lk: _Lock, mode: int) -> int:
        """Where lk is on the held stack (the top first), or the unlock-balance error."""
        held = ctx.held
        for i in range(len(held) - 1, -1, -1):
            if held[i][0] is lk:
                if held[i][1] != mode:
                    raise RuntimeError(
                        f"{ctx.actor}/{ctx.pid}: releasing {self._display(lk._cid, lk._idx)} "
                        f"for {_MODE[mode]} but it is held for {_MODE[held[i][1]]}"
                    )
                return i
        raise RuntimeError(
            f"bad unlock balance detected: {ctx.actor}/{ctx.pid} is trying to release lock "
            f"({self._display(lk._cid, lk._idx)}) but does not hold it"
        )

    def _drop_held(self, ctx: _Ctx, i: int) -> str | None:
        held = ctx.held
        site = held[i][3]
        del held[i]
        if i == len(held):
            if i < MAX_LOCK_DEPTH:
                self._q[ctx.base + _C_HELDN] = i
        else:
            self._sync_held(ctx)
        return site

    # --- word locks: owners that died ------------------------------------------------

    def _owner_alive(self, owner: int) -> bool:
        slot = (owner & ((1 << _SLOT_BITS) - 1)) - 1
        if not 0 <= slot < self._maxctx:
            return False
        base = self._ctx_base + slot * _CTX_WORDS
        q = self._q
        if not q[base + _C_STATE] or (q[base + _C_GEN] & _GEN_MASK) != owner >> _SLOT_BITS:
            return False
        return self._alive(slot)

    def _live_rows(self) -> list[int]:
        q = self._q
        rows = []
        for slot in range(self._maxctx):
            base = self._ctx_base + slot * _CTX_WORDS
            if q[base + _C_STATE] and self._alive(slot):
                rows.append(base)
        return rows

    def _recover_rwsem(self, lk: Any, ctx: _Ctx) -> None:
        """An rwsem waiter slept RECHECK_S: give back what dead contexts hold of lk.

        A census of the live contexts: readers holding it or about to (held stack or
        pending word), writers holding it or about to, writers waiting for it. Each count
        in the word is lowered to its census, never raised; every live context shows up
        in the census before it changes the word and stays in it until after."""
        q = self._q
        w = self._w32
        readers = writers = queued = 0
        rk, wk = lk._key | 2, lk._key | 3  # READ, WRITE
        for base in self._live_rows():
            n = min(q[base + _C_HELDN], MAX_LOCK_DEPTH)
            words = [q[base + _C_HELD + 2 * j] & ~_SITEF for j in range(n)]
            if base != ctx.base:  # the caller is about to take it: not in the way
                words.append(q[base + _C_PEND] & ~_SITEF)
            readers += words.count(rk)
            writers += words.count(wk)
            if q[base + _C_WAIT] & ~_SITEF == wk:
                queued += 1
        v = w[lk._wi]
        new = v
        if v & RW_WRITER and not writers:
            owner = w[lk._wi + 1]
            if not owner or not self._owner_alive(owner):
                new &= ~RW_WRITER
        if (v & RW_READERS) > readers:
            new -= (v & RW_READERS) - readers
        if (v & RW_QUEUED) // RW_QUNIT > queued:
            new -= ((v & RW_QUEUED) // RW_QUNIT - queued) * RW_QUNIT
        if new != v:
            _cas32(ctypes.c_void_p(lk._a), ctypes.byref(ctypes.c_int32(v)), new, 5, 5)

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
                ctx.sites[k + 1] = site
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
