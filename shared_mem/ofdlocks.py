# The kernel's lock primitives over OFD byte-range locks: Mutex, SpinLock, BitLock, RWSem.
#
# mm/ksm.c takes four kinds of lock, and the model really blocks on each, across
# processes: the sleeping mutex (ksm_thread_mutex); spinlocks (ksm_mmlist_lock, the page
# table lock, zone->lock), which here block like the mutex and are not checked for
# sleeping while held; rw_semaphores (mmap_lock, anon_vma->rwsem); and the PG_locked bit
# of a page frame (lock_page()/trylock_page()).
#
# Each lock instance is a byte of the run's lock file (two for an rwsem, lockstate.py)
# locked with fcntl F_OFD_SETLK / F_OFD_SETLKW. An OFD lock belongs to an open file
# description and the kernel drops it when the last descriptor of that description
# closes: an actor the OOM killer SIGKILLs cannot leave a lock taken for ever, which a
# POSIX semaphore (no owner) would, and closing some other fd of the file does not drop
# it, which classic POSIX record locks would. The price is that two threads on one fd
# would share ownership, so every kernel context has a descriptor of its own
# (LockSpace.bind_context()). The kernel detects no deadlock between OFD locks: an ABBA
# deadlock of the model hangs as the kernel's would, and the hung-task watchdog is how it
# is seen. If a holder dies, its locks vanish with it and the state they protected may be
# half-updated; the supervisor ends the run when an actor dies, so nothing runs on it.
#
# The fast path is what the per-page kernel paths pay almost every time: one non-blocking
# F_OFD_SETLK, a push onto the context's held stack, and the hooks only when installed
# (one attribute test each). Only when the try fails does a context publish what it waits
# for and block in F_OFD_SETLKW (_block). An rwsem adds a writer queue so a waiting writer
# is not starved (RWSem's docstring; _block_reader/_block_writer). Modes are "excl"
# (mutex, spinlock, page bit), "read" and "write". Unlocking a lock not held, or in the
# wrong mode, raises ("bad unlock balance"); trylock of a lock the context holds fails, as
# mutex_trylock() by the owner does. Every acquire may name its call site, which reports
# show. The checks on nested acquires are lockcheck.py's; the held stack and the context
# table, lockspace.py's.
from __future__ import annotations

import fcntl
import time
from typing import TYPE_CHECKING, Any

from shared_mem.lockcheck import _pre_acquire
from shared_mem.lockdep import MAX_LOCK_DEPTH
from shared_mem.lockstate import (
    _BUSY,
    _C_HELDN,
    _C_WAIT,
    _MODE,
    _SETLK,
    _SETLKW,
    BIT,
    EXCL,
    MUTEX,
    READ,
    RWSEM,
    SPIN,
    WRITE,
    _fcntl,
    _flock,
)

if TYPE_CHECKING:
    from shared_mem.lockspace import LockSpace, _Ctx

_now = time.monotonic_ns


def _unbound() -> RuntimeError:
    return RuntimeError("this thread is not a kernel context: call LockSpace.bind_context() first")


def _block(
    sp: LockSpace, ctx: _Ctx, lk: _Lock, mode: int, site: str | None, fl: bytes, err: OSError,
) -> int:
    """The non-blocking attempt failed: publish the wait, then sleep on the lock."""
    if err.errno not in _BUSY:
        raise err
    since = _now()
    hook = sp._hook
    if hook is not None:
        hook("lock_contended", lk._name, lk._idx, _MODE[mode], 0, site)
    sp._set_wait(ctx, lk, mode, site, since)
    try:
        _fcntl(ctx.fd, _SETLKW, fl)
    finally:
        sp._q[ctx.base + _C_WAIT] = 0
    return _now() - since


def _block_reader(sp: LockSpace, ctx: _Ctx, lk: RWSem, site: str | None) -> int:
    """A writer is queued: wait until it is through the queue byte, then take rw."""
    since = _now()
    hook = sp._hook
    if hook is not None:
        hook("lock_contended", lk._name, lk._idx, "read", 0, site)
    sp._set_wait(ctx, lk, READ, site, since)
    fd = ctx.fd
    try:
        try:
            _fcntl(fd, _SETLKW, lk._qr)
        finally:
            _fcntl(fd, _SETLK, lk._qu)  # unlocking what we do not hold is a no-op
        _fcntl(fd, _SETLKW, lk._fr)
    finally:
        sp._q[ctx.base + _C_WAIT] = 0
    return _now() - since


def _block_writer(sp: LockSpace, ctx: _Ctx, lk: RWSem, site: str | None) -> int:
    """Queue as the waiting writer (one at a time, on the queue byte), raise the
    writer-waiting flag so new readers hold back, then wait for readers to drain."""
    since = _now()
    hook = sp._hook
    told = False
    sp._set_wait(ctx, lk, WRITE, site, since)
    fd = ctx.fd
    try:
        try:
            _fcntl(fd, _SETLK, lk._qw)
        except OSError as e:
            if e.errno not in _BUSY:
                raise
            if hook is not None:
                hook("lock_contended", lk._name, lk._idx, "write", 0, site)
                told = True
            _fcntl(fd, _SETLKW, lk._qw)
        try:
            lk._b[lk._flag] = 1
            if hook is not None and not told:
                hook("lock_contended", lk._name, lk._idx, "write", 0, site)
            _fcntl(fd, _SETLKW, lk._fw)
        finally:
            lk._b[lk._flag] = 0
            _fcntl(fd, _SETLK, lk._qu)
    finally:
        sp._q[ctx.base + _C_WAIT] = 0
    return _now() - since


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
            _pre_acquire(sp, ctx, self, EXCL, site)
        if sp._sched is not None:
            sp._sched(ctx.actor, self._name, "acquire")
        hook = sp._hook
        if hook is not None:
            hook("lock_acquire", self._name, self._idx, "excl", 0, site)
        wait = 0
        try:
            _fcntl(ctx.fd, _SETLK, self._fw)
        except OSError as e:
            wait = _block(sp, ctx, self, EXCL, site, self._fw, e)
        sp._push(ctx, self, EXCL, site)
        if hook is not None:
            hook("lock_acquired", self._name, self._idx, "excl", wait, site)

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
            hook("lock_acquire", self._name, self._idx, "excl", 0, site)
            hook("lock_acquired", self._name, self._idx, "excl", 0, site)
        return True

    def unlock(self) -> None:
        sp = self._sp
        try:
            ctx = self._tls.ctx
        except AttributeError:
            raise _unbound() from None
        held = ctx.held
        if held and held[-1][0] is self:
            site = held.pop()[3]
            if len(held) < MAX_LOCK_DEPTH:
                sp._q[ctx.base + _C_HELDN] = len(held)
        else:
            site = sp._pop_slow(ctx, self, EXCL)
        _fcntl(ctx.fd, _SETLK, self._fu)
        hook = sp._hook
        if hook is not None:
            hook("lock_release", self._name, self._idx, "excl", 0, site)
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
    """`with sem.read():` / `with sem.write():` for either lock implementation."""

    __slots__ = ("_sem", "_site", "_write")

    def __init__(self, sem: Any, write: bool, site: str | None) -> None:
        self._sem, self._write, self._site = sem, write, site

    def __enter__(self) -> Any:
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
            _pre_acquire(sp, ctx, self, READ, site)
        if sp._sched is not None:
            sp._sched(ctx.actor, self._name, "acquire")
        hook = sp._hook
        if hook is not None:
            hook("lock_acquire", self._name, self._idx, "read", 0, site)
        wait = 0
        if self._b[self._flag]:
            wait = _block_reader(sp, ctx, self, site)
        else:
            try:
                _fcntl(ctx.fd, _SETLK, self._fr)
            except OSError as e:
                wait = _block(sp, ctx, self, READ, site, self._fr, e)
        sp._push(ctx, self, READ, site)
        if hook is not None:
            hook("lock_acquired", self._name, self._idx, "read", wait, site)

    def down_write(self, site: str | None = None) -> None:
        sp = self._sp
        try:
            ctx = self._tls.ctx
        except AttributeError:
            raise _unbound() from None
        if ctx.held:
            _pre_acquire(sp, ctx, self, WRITE, site)
        if sp._sched is not None:
            sp._sched(ctx.actor, self._name, "acquire")
        hook = sp._hook
        if hook is not None:
            hook("lock_acquire", self._name, self._idx, "write", 0, site)
        wait = 0
        if self._b[self._flag]:
            wait = _block_writer(sp, ctx, self, site)
        else:
            try:
                _fcntl(ctx.fd, _SETLK, self._fw)
            except OSError as e:
                if e.errno not in _BUSY:
                    raise
                wait = _block_writer(sp, ctx, self, site)
        sp._push(ctx, self, WRITE, site)
        if hook is not None:
            hook("lock_acquired", self._name, self._idx, "write", wait, site)

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
            hook("lock_acquire", self._name, self._idx, _MODE[mode], 0, site)
            hook("lock_acquired", self._name, self._idx, _MODE[mode], 0, site)
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
            site = held.pop()[3]
            if len(held) < MAX_LOCK_DEPTH:
                sp._q[ctx.base + _C_HELDN] = len(held)
        else:
            site = sp._pop_slow(ctx, self, mode)
        _fcntl(ctx.fd, _SETLK, self._fu)
        hook = sp._hook
        if hook is not None:
            hook("lock_release", self._name, self._idx, _MODE[mode], 0, site)
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
