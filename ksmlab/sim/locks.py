# The simulator's lock space: the kernel's locks as scheduling decisions.
#
# What it models. The same lock classes as the multiprocess run (shared_mem.layout.
# lock_classes: ksm_thread_mutex, ksm_mmlist_lock, mmap_lock, ptl, the page lock bit,
# anon_vma->rwsem, zone and slab locks), with the same rules as shared_mem/locks.py:
# one holder for a mutex, spinlock or page bit; readers or one writer for an rwsem, and
# a waiting writer holds back readers that come later (rwsem_down_read_slowpath queues
# behind it); a trylock fails while anyone is queued; taking a lock you hold, or
# releasing one you do not hold, raises RuntimeError (the kernel would deadlock, or
# splat "bad unlock balance"). It satisfies actors/kernel/seams.LockSpace, so kernel
# paths cannot tell it from the OFD locks.
#
# Every acquire is a schedule op before the attempt and every release one after it
# (loom's model: the interesting interleavings are those of synchronisation). Two lock
# classes are *quiet*: zone_lock and slab_lock guard leaf critical sections that contain
# no schedule op, so a context can never be switched out while holding one; an op at
# their boundaries would only multiply schedules that differ in nothing (a partial-order
# reduction that is sound exactly because those sections are leaves; acquire() asserts
# it by raising if a context blocks on a quiet lock).
#
# Lockdep runs here too, as in shared_mem/locks.py: every blocking acquire made while
# holding locks of other classes adds the class edges held -> new to a graph of the
# schedule, and an acquire whose class already reaches a held class is a "possible
# circular locking dependency" report (kind lockdep), even when this schedule does not
# deadlock. Trylocks add no edge (they cannot wait), as in the kernel.
#
# With no scheduler (sched=None) the locks are plain and never yield: the single-threaded
# set-up of a scenario runs on them.
from __future__ import annotations

from typing import Any

from ksmlab.sim.scheduler import Scheduler, SimAbort, SimThread
from shared_mem.layout import Geometry, lock_classes
from shared_mem.lockdep import CIRCULAR_TITLE, format_circular

QUIET = frozenset({"zone_lock", "slab_lock"})


class SimLockSpace:
    def __init__(self, geo: Geometry, sched: Scheduler | None, lockdep: bool = True) -> None:
        self.sched = sched
        self._kinds = {name: kind for name, kind, _n in lock_classes(geo)}
        self._counts = {name: n for name, _k, n in lock_classes(geo)}
        self._locks: dict[tuple[str, int], Any] = {}
        self._solo = SimThread(-1, "setup", lambda: None)   # the holder in set-up mode
        # lockdep: (held class, new class) -> who first took new while holding held
        self._edges: dict[tuple[str, str], dict] = {}
        self._lockdep_on = lockdep

    def get(self, cls: str, idx: int = 0) -> Any:
        lk = self._locks.get((cls, idx))
        if lk is None:
            kind = self._kinds.get(cls)
            if kind is None:
                raise KeyError(f"unknown lock class {cls!r}")
            if not 0 <= idx < self._counts[cls]:
                raise IndexError(f"{cls}[{idx}] out of range (0..{self._counts[cls] - 1})")
            lk = (SimRWSem if kind == "rwsem" else SimLock)(self, cls, idx, cls in QUIET)
            self._locks[(cls, idx)] = lk
        return lk

    def current(self) -> SimThread:
        s = self.sched
        return self._solo if s is None or s.cur is None else s.cur

    # -- the hung-task watchdog's view of retry loops (Kernel.cond_resched) ----------------
    def no_progress(self, site: str, retries: int) -> None:
        t = self.current()
        now = self.sched.now_ns if self.sched is not None else 0
        if t.no_progress is None or t.no_progress[0] != site:
            t.no_progress = [site, now, retries]
        else:
            t.no_progress[2] = retries

    def progress(self) -> None:
        self.current().no_progress = None

    def held_locks(self) -> list[tuple[str, str, str]]:
        return [(h[0].name, h[1], h[2]) for h in self.current().held]

    # -- lockdep ------------------------------------------------------------------------------
    def check_order(self, t: SimThread, lk: _Base, mode: str, site: str | None) -> None:
        if not t.held or not self._lockdep_on or self.sched is None:
            return
        b = lk.cls
        for h in t.held:
            a = h[0].cls
            if a == b or (a, b) in self._edges:
                continue
            path = self._path(b, a)
            if path is None:
                self._edges[(a, b)] = {"actor": t.name, "pid": _pid(t), "site": site or "",
                                       "held": [x[0].name for x in t.held]}
                continue
            self._lockdep_on = False            # debug_locks_off(): one report per schedule
            self._circular(t, lk, mode, site, h, path)
            return

    def _path(self, src: str, dst: str) -> list[str] | None:
        """A path src -> ... -> dst in the class graph (breadth first), or None."""
        prev: dict[str, str | None] = {src: None}
        queue = [src]
        while queue:
            x = queue.pop(0)
            if x == dst:
                out = [x]
                while prev[out[-1]] is not None:
                    out.append(prev[out[-1]])
                return out[::-1]
            for (a, b) in self._edges:
                if a == x and b not in prev:
                    prev[b] = x
                    queue.append(b)
        return None

    def _circular(self, t: SimThread, lk: _Base, mode: str, site: str | None, h: tuple, path: list[str]) -> None:
        def ref(x: _Base, m: str, at: str | None) -> dict:
            return {"lock": x.cls, "idx": 0, "name": x.name, "kind": self._kinds[x.cls], "mode": m, "site": at}

        chain = []
        for i in range(1, len(path)):
            rec = self._edges[(path[i - 1], path[i])]
            chain.append({"lock": path[i], "kind": self._kinds[path[i]], **rec})
        held = [ref(x[0], x[1], x[2]) for x in t.held]
        text = format_circular(t.name, _pid(t), ref(lk, mode, site), ref(h[0], h[1], h[2]), held, chain)
        self.sched.fail({"kind": "lockdep", "title": CIRCULAR_TITLE, "text": text,
                         "data": {"cycle": path, "acquiring": lk.name, "holding": h[0].name}}, t)


def _pid(t: SimThread) -> int:
    return t.k.pid if t.k is not None else 0


class _Base:
    __slots__ = ("_sp", "cls", "name", "quiet")

    def __init__(self, sp: SimLockSpace, cls: str, idx: int, quiet: bool) -> None:
        self._sp = sp
        self.cls = cls
        self.name = cls if sp._counts[cls] == 1 else f"{cls}[{idx}]"
        self.quiet = quiet

    def __repr__(self) -> str:
        return f"<sim {self.name}>"

    def _op(self, what: str) -> None:
        s = self._sp.sched
        if s is not None and not self.quiet:
            s.op(what, self.name)

    def _wait(self, mode: str, site: str | None) -> None:
        s = self._sp.sched
        if s is None:
            raise RuntimeError(f"set-up would block on {self.name} ({mode}): nobody else can release it")
        if self.quiet:
            raise RuntimeError(f"a context blocked on quiet lock {self.name}: its critical sections "
                               "must not contain schedule ops (ksmlab/sim/locks.py)")
        s.block(self, mode, site or "")

    def _push(self, t: SimThread, mode: str, site: str | None) -> None:
        t.held.append((self, mode, site or ""))
        s = self._sp.sched
        if s is not None and t.blocked_on is not None:
            s.acquired()

    def _pop(self, t: SimThread, mode: str) -> None:
        for i in range(len(t.held) - 1, -1, -1):
            h = t.held[i]
            if h[0] is self and h[1] == mode:
                del t.held[i]
                return
        raise RuntimeError(f"bad unlock balance: {t.name} releases {self.name} ({mode}) it does not hold")

    def _aborting(self) -> bool:
        s = self._sp.sched
        return s is not None and s.aborting


class SimLock(_Base):
    """mutex, spinlock, page bit."""

    __slots__ = ("owner",)

    def __init__(self, sp: SimLockSpace, cls: str, idx: int, quiet: bool) -> None:
        super().__init__(sp, cls, idx, quiet)
        self.owner: SimThread | None = None

    def lock(self, site: str | None = None) -> None:
        t = self._sp.current()
        if self._aborting():
            raise SimAbort()
        if self.owner is t:
            raise RuntimeError(f"possible recursive locking: {t.name} takes {self.name} it already holds")
        self._sp.check_order(t, self, "excl", site)
        self._op("lock")
        while self.owner is not None:
            self._wait("excl", site)
        self.owner = t
        self._push(t, "excl", site)

    def trylock(self, site: str | None = None) -> bool:
        t = self._sp.current()
        if self._aborting():
            raise SimAbort()
        if self.owner is t:
            return False
        self._op("trylock")
        if self.owner is not None:
            return False
        self.owner = t
        self._push(t, "excl", site)
        return True

    def unlock(self) -> None:
        if self._aborting():
            return
        t = self._sp.current()
        if self.owner is not t:
            raise RuntimeError(f"bad unlock balance: {t.name} releases {self.name} held by "
                               f"{self.owner.name if self.owner else 'nobody'}")
        self._pop(t, "excl")
        self.owner = None
        s = self._sp.sched
        if s is not None:
            s.wake_waiters(self)
        self._op("unlock")

    def __enter__(self) -> SimLock:
        self.lock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unlock()


class _Guard:
    __slots__ = ("sem", "site", "write")

    def __init__(self, sem: SimRWSem, write: bool, site: str | None) -> None:
        self.sem, self.write, self.site = sem, write, site

    def __enter__(self) -> SimRWSem:
        (self.sem.down_write if self.write else self.sem.down_read)(self.site)
        return self.sem

    def __exit__(self, *exc: object) -> None:
        (self.sem.up_write if self.write else self.sem.up_read)()


class SimRWSem(_Base):
    """mmap_lock, anon_vma->rwsem."""

    __slots__ = ("readers", "waiting_writers", "writer")

    def __init__(self, sp: SimLockSpace, cls: str, idx: int, quiet: bool) -> None:
        super().__init__(sp, cls, idx, quiet)
        self.readers: list[SimThread] = []
        self.writer: SimThread | None = None
        self.waiting_writers = 0

    def _holds(self, t: SimThread) -> bool:
        return self.writer is t or t in self.readers

    def down_read(self, site: str | None = None) -> None:
        t = self._sp.current()
        if self._aborting():
            raise SimAbort()
        if self._holds(t):
            raise RuntimeError(f"possible recursive locking: {t.name} takes {self.name} it already holds")
        self._sp.check_order(t, self, "read", site)
        self._op("down_read")
        while self.writer is not None or self.waiting_writers:
            self._wait("read", site)
        self.readers.append(t)
        self._push(t, "read", site)

    def down_write(self, site: str | None = None) -> None:
        t = self._sp.current()
        if self._aborting():
            raise SimAbort()
        if self._holds(t):
            raise RuntimeError(f"possible recursive locking: {t.name} takes {self.name} it already holds")
        self._sp.check_order(t, self, "write", site)
        self._op("down_write")
        if self.writer is not None or self.readers:
            self.waiting_writers += 1
            try:
                while self.writer is not None or self.readers:
                    self._wait("write", site)
            finally:
                self.waiting_writers -= 1
        self.writer = t
        self._push(t, "write", site)

    def _try(self, write: bool, site: str | None) -> bool:
        t = self._sp.current()
        if self._aborting():
            raise SimAbort()
        if self._holds(t) or self.waiting_writers:
            return False
        self._op("down_write_trylock" if write else "down_read_trylock")
        if self.writer is not None or (write and self.readers) or self.waiting_writers:
            return False
        if write:
            self.writer = t
        else:
            self.readers.append(t)
        self._push(t, "write" if write else "read", site)
        return True

    def down_read_trylock(self, site: str | None = None) -> bool:
        return self._try(False, site)

    def down_write_trylock(self, site: str | None = None) -> bool:
        return self._try(True, site)

    def _up(self, write: bool) -> None:
        if self._aborting():
            return
        t = self._sp.current()
        if write:
            if self.writer is not t:
                raise RuntimeError(f"bad unlock balance: {t.name} up_write({self.name}) without holding it")
            self.writer = None
        else:
            if t not in self.readers:
                raise RuntimeError(f"bad unlock balance: {t.name} up_read({self.name}) without holding it")
            self.readers.remove(t)
        self._pop(t, "write" if write else "read")
        s = self._sp.sched
        if s is not None:
            s.wake_waiters(self)
        self._op("up_write" if write else "up_read")

    def up_read(self) -> None:
        self._up(False)

    def up_write(self) -> None:
        self._up(True)

    def read(self, site: str | None = None) -> _Guard:
        return _Guard(self, False, site)

    def write(self, site: str | None = None) -> _Guard:
        return _Guard(self, True, site)
