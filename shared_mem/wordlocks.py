# The kernel's lock primitives as words in shared memory: Mutex, SpinLock, BitLock, RWSem.
#
# Same four kinds, same rules and the same API as ofdlocks.py, at the cost of a kernel
# lock: the uncontended path is one compare-and-swap on a 32-bit word of the run's lock
# state segment (and one exchange or add to release), as mutex_lock() and down_read()
# are one atomic on the owner or count word; only a context that finds the word taken
# publishes its wait (the hung-task watchdog reads it) and sleeps in futex(FUTEX_WAIT)
# on the word (futex.py). A lock file byte per instance (the OFD design) costs two
# syscalls a lock even when nobody else wants it; these cost none.
#
# What the OFD design guaranteed and this one keeps:
#
# * A SIGKILLed holder does not hold a lock for ever. An exclusive word holds its
#   owner's id (context slot + 1, and the slot's claim generation, lockstate.py), an
#   rwsem's second word its writer's. A sleeper wakes every RECHECK_S to look at the
#   owner; if that context is dead (its liveness byte in the lock file is free, or its
#   slot was claimed again since), the sleeper takes the lock over, as a robust futex's
#   next owner gets FUTEX_OWNER_DIED. Readers are a count, not owners: a context writes
#   the lock it is about to take in its row (_C_PEND) before the compare-and-swap, and an
#   rwsem waiter that finds more readers counted than live contexts holding or about to
#   take it for read lowers the count to the live ones. The held stacks in the shared
#   context table make that census possible; up_read() drops the count before it pops
#   its held entry, so the census never counts fewer readers than there are.
# * A waiting writer is not starved by readers that keep coming: the rwsem word counts
#   its queued writers, and a reader that finds any queued (or a writer in) sleeps.
# * Lockdep, the held-lock tables, the published waits, the event and schedule hooks,
#   "bad unlock balance" and trylock-by-the-owner-fails: all as in ofdlocks.py (they
#   live in lockspace.py and lockcheck.py and do not care what a lock is made of).
#
# Exclusive word: owner id in bits 0..15, SLEEPERS (1 << 16) once anyone sleeps on it.
# The unlock exchanges 0 in and wakes one sleeper if the bit was set; the woken context
# takes the lock with the bit set again, since others may still sleep (Drepper's
# "mutex 2"). RWSem word: readers in bits 0..15, WRITER (1 << 16), SLEEPERS (1 << 17),
# queued writers in bits 18..25; a release that may let anyone in wakes all sleepers,
# who race again (there are a few contexts per lock, not thousands).
from __future__ import annotations

import ctypes
import time
from typing import TYPE_CHECKING

from shared_mem.futex import (
    SEQ_CST,
    WAKE_ALL,
    cas32,
    fetch_add32,
    fetch_and32,
    futex_wait,
    futex_wake,
    xchg32,
)
from shared_mem.lockcheck import _pre_acquire
from shared_mem.lockdep import MAX_LOCK_DEPTH
from shared_mem.lockstate import (
    _C_HELDN,
    _C_PEND,
    _C_WAIT,
    _MODE,
    BIT,
    EXCL,
    MUTEX,
    READ,
    RWSEM,
    SPIN,
    WRITE,
)
from shared_mem.ofdlocks import _RWGuard

if TYPE_CHECKING:
    from shared_mem.lockspace import LockSpace, _Ctx

_now = time.monotonic_ns

RECHECK_S = 0.05  # how often a sleeper looks at whether the holder still lives

X_OWNER, X_SLEEPERS = 0xFFFF, 1 << 16
RW_READERS, RW_WRITER, RW_SLEEPERS = 0xFFFF, 1 << 16, 1 << 17
RW_QUNIT, RW_QUEUED = 1 << 18, 0xFF << 18
RW_BLOCKS_READER = RW_WRITER | RW_QUEUED


def _unbound() -> RuntimeError:
    return RuntimeError("this thread is not a kernel context: call LockSpace.bind_context() first")


def _cas(lk: _WordLock, ctx: _Ctx, old: int, new: int) -> bool:
    """Compare-and-swap the lock's word; on failure ctx.e holds the value found."""
    ctx.e.value = old
    return cas32(lk._addr, ctx.pe, new, SEQ_CST, SEQ_CST)


class _WordLock:
    __slots__ = ("_a", "_addr", "_cid", "_idx", "_key", "_kind", "_name", "_sp", "_tls", "_wi")

    def __init__(self, sp: LockSpace, cid: int, idx: int) -> None:
        self._sp = sp
        self._tls = sp._tls
        self._cid = cid
        self._idx = idx
        self._name = sp._names[cid]
        self._kind = sp._kinds[cid]
        self._key = (cid << 40) | (idx << 8)
        self._wi = sp._word_index(cid, idx)
        self._a = sp._words_addr + 4 * self._wi
        self._addr = ctypes.c_void_p(self._a)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._sp._display(self._cid, self._idx)}>"

    def _ctx(self) -> _Ctx:
        try:
            return self._tls.ctx
        except AttributeError:
            raise _unbound() from None

    def _before(self, ctx: _Ctx, mode: int, site: str | None) -> None:
        sp = self._sp
        if ctx.held:
            _pre_acquire(sp, ctx, self, mode, site)
        if sp._sched is not None:
            sp._sched(ctx.actor, self._name, "acquire")
        if sp._hook is not None:
            sp._hook("lock_acquire", self._name, self._idx, _MODE[mode], 0, site)

    def _after(self, ctx: _Ctx, mode: int, site: str | None, wait: int) -> None:
        sp = self._sp
        sp._push(ctx, self, mode, site)
        if sp._hook is not None:
            sp._hook("lock_acquired", self._name, self._idx, _MODE[mode], wait, site)

    def _held_by(self, ctx: _Ctx) -> bool:
        # a loop, not any(genexpr): a third of the time, and this runs on every trylock
        for h in ctx.held:  # noqa: SIM110
            if h[0] is self:
                return True
        return False

    def _trylock_done(self, ctx: _Ctx, mode: int, site: str | None) -> None:
        sp = self._sp
        if sp._sched is not None:
            sp._sched(ctx.actor, self._name, "acquire")
        sp._push(ctx, self, mode, site)
        if sp._hook is not None:
            sp._hook("lock_acquire", self._name, self._idx, _MODE[mode], 0, site)
            sp._hook("lock_acquired", self._name, self._idx, _MODE[mode], 0, site)

    def _released(self, ctx: _Ctx, mode: int, site: str | None) -> None:
        sp = self._sp
        if sp._hook is not None:
            sp._hook("lock_release", self._name, self._idx, _MODE[mode], 0, site)
        if sp._sched is not None:
            sp._sched(ctx.actor, self._name, "release")

    def _pop(self, ctx: _Ctx, mode: int) -> str | None:
        held = ctx.held
        if held and held[-1][0] is self and held[-1][1] == mode:
            site = held.pop()[3]
            if len(held) < MAX_LOCK_DEPTH:
                self._sp._q[ctx.base + _C_HELDN] = len(held)
            return site
        return self._sp._pop_slow(ctx, self, mode)

    def _sleep(self, ctx: _Ctx, v: int, bit: int) -> int:
        """Set the sleepers bit of a taken word (if need be) and sleep on it; returns
        the word's value now, or -1 after a sleep that timed out."""
        if not v & bit:
            if not _cas(self, ctx, v, v | bit):
                return ctx.e.value
            v |= bit
        if futex_wait(self._a, v, RECHECK_S):
            return self._sp._w32[self._wi]
        return -1


class _ExclusiveLock(_WordLock):
    """mutex / spinlock / PG_locked: one word holding its owner's id."""

    __slots__ = ()

    def lock(self, site: str | None = None) -> None:
        ctx = self._ctx()
        self._before(ctx, EXCL, site)
        wait = 0
        ctx.e.value = 0
        if not cas32(self._addr, ctx.pe, ctx.me, SEQ_CST, SEQ_CST):
            wait = self._block(ctx, site)
        self._after(ctx, EXCL, site, wait)

    def _block(self, ctx: _Ctx, site: str | None) -> int:
        sp = self._sp
        since = _now()
        if sp._hook is not None:
            sp._hook("lock_contended", self._name, self._idx, "excl", 0, site)
        sp._set_wait(ctx, self, EXCL, site, since)
        me = ctx.me | X_SLEEPERS
        try:
            v = sp._w32[self._wi]
            while True:
                if v == 0:
                    if _cas(self, ctx, 0, me):
                        break
                    v = ctx.e.value
                    continue
                v = self._sleep(ctx, v, X_SLEEPERS)
                if v < 0:  # a whole RECHECK_S asleep: is the holder still there?
                    if self._take_over(ctx, sp._w32[self._wi], me):
                        break
                    v = sp._w32[self._wi]
        finally:
            sp._q[ctx.base + _C_WAIT] = 0
        return _now() - since

    def trylock(self, site: str | None = None) -> bool:
        ctx = self._ctx()
        if self._held_by(ctx):
            return False  # mutex_trylock() by the owner fails too
        ctx.e.value = 0
        if not cas32(self._addr, ctx.pe, ctx.me, SEQ_CST, SEQ_CST):
            v = ctx.e.value  # taken: but by a context that still lives?
            if not self._take_over(ctx, v, ctx.me | (v & X_SLEEPERS)):
                return False
        self._trylock_done(ctx, EXCL, site)
        return True

    def _take_over(self, ctx: _Ctx, v: int, new: int) -> bool:
        """Take the word from a dead owner (a robust futex's FUTEX_OWNER_DIED): False if
        the word is free, its owner lives, or it moved meanwhile."""
        return bool(v) and not self._sp._owner_alive(v & X_OWNER) and _cas(self, ctx, v, new)

    def unlock(self) -> None:
        ctx = self._ctx()
        site = self._pop(ctx, EXCL)
        old = xchg32(self._addr, 0, SEQ_CST)
        if old & X_SLEEPERS:
            futex_wake(self._a, 1)
        if old & X_OWNER != ctx.me:
            raise RuntimeError(
                f"{ctx.actor}/{ctx.pid}: {self._sp._display(self._cid, self._idx)} was owned by "
                f"{old & X_OWNER:#x}, not by this context ({ctx.me:#x}), when it unlocked it"
            )
        self._released(ctx, EXCL, site)

    def _release_word(self, mode: int) -> None:
        """Let go of the word without the held stack (a context leaving with it held)."""
        if xchg32(self._addr, 0, SEQ_CST) & X_SLEEPERS:
            futex_wake(self._a, 1)

    def __enter__(self) -> _ExclusiveLock:
        self.lock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unlock()


class Mutex(_ExclusiveLock):
    """A sleeping mutex (ksm_thread_mutex)."""

    __slots__ = ()


class SpinLock(_ExclusiveLock):
    """A spinlock (ksm_mmlist_lock, ptl, zone->lock); sleeps like a mutex in the model."""

    __slots__ = ()


class BitLock(_ExclusiveLock):
    """PG_locked of one page frame: lock_page() / trylock_page() / unlock_page()."""

    __slots__ = ()


class RWSem(_WordLock):
    """A reader/writer semaphore (mmap_lock, anon_vma->rwsem): a count word and the
    writer's owner word. A reader gets in while no writer holds or waits for it; a
    writer when nobody holds it; waiting writers are counted in the word."""

    __slots__ = ("_rg", "_wg")

    def __init__(self, sp: LockSpace, cid: int, idx: int) -> None:
        super().__init__(sp, cid, idx)
        self._rg = _RWGuard(self, False, None)
        self._wg = _RWGuard(self, True, None)

    def down_read(self, site: str | None = None) -> None:
        self._down(READ, site)

    def down_write(self, site: str | None = None) -> None:
        self._down(WRITE, site)

    def _down(self, mode: int, site: str | None) -> None:
        ctx = self._ctx()
        self._before(ctx, mode, site)
        sp = self._sp
        q = sp._q
        q[ctx.base + _C_PEND] = self._key | mode
        # a reader gets in while no writer holds or waits; a writer while nobody holds it
        busy, add = (RW_BLOCKS_READER, 1) if mode == READ else (~RW_SLEEPERS, RW_WRITER)
        wait = 0
        v = sp._w32[self._wi]
        while not v & busy:
            if _cas(self, ctx, v, v + add):
                break
            v = ctx.e.value  # another reader came or went: try again
        else:
            wait = self._block(ctx, mode, site)
        if mode == WRITE:
            sp._w32[self._wi + 1] = ctx.me
        self._after(ctx, mode, site, wait)
        q[ctx.base + _C_PEND] = 0

    def _block(self, ctx: _Ctx, mode: int, site: str | None) -> int:
        sp = self._sp
        since = _now()
        sp._set_wait(ctx, self, mode, site, since)
        write = mode == WRITE
        try:
            if write:
                fetch_add32(self._addr, RW_QUNIT, SEQ_CST)
            # Told once queued: a reader that comes after this event finds the writer
            # counted in the word and waits behind it, as the OFD writer's flag makes it.
            if sp._hook is not None:
                sp._hook("lock_contended", self._name, self._idx, _MODE[mode], 0, site)
            v = sp._w32[self._wi]
            while True:
                if write:
                    if not v & (RW_WRITER | RW_READERS):
                        if _cas(self, ctx, v, (v - RW_QUNIT) | RW_WRITER):
                            break
                        v = ctx.e.value
                        continue
                elif not v & RW_BLOCKS_READER:
                    if _cas(self, ctx, v, v + 1):
                        break
                    v = ctx.e.value
                    continue
                v = self._sleep(ctx, v, RW_SLEEPERS)
                if v < 0:
                    sp._recover_rwsem(self, ctx)
                    v = sp._w32[self._wi]
        finally:
            sp._q[ctx.base + _C_WAIT] = 0
        return _now() - since

    def _try(self, mode: int, site: str | None) -> bool:
        ctx = self._ctx()
        if self._held_by(ctx):
            return False
        sp = self._sp
        q = sp._q
        q[ctx.base + _C_PEND] = self._key | mode
        recovered = False
        try:
            v = sp._w32[self._wi]
            while True:
                # Like the kernel: a trylock fails while anyone holds it for write or waits
                # to (and a write trylock while anyone holds it). Before failing, once: is
                # what is in the way held by the dead? (a census only for a write trylock,
                # which the model's hot paths do not take)
                busy = v & ~RW_SLEEPERS if mode == WRITE else v & RW_BLOCKS_READER
                if busy:
                    if recovered or not (
                        (v & RW_WRITER and not sp._owner_alive(sp._w32[self._wi + 1]))
                        or mode == WRITE
                    ):
                        return False
                    recovered = True
                    sp._recover_rwsem(self, ctx)
                    v = sp._w32[self._wi]
                    continue
                new = v | RW_WRITER if mode == WRITE else v + 1
                if _cas(self, ctx, v, new):
                    break
                v = ctx.e.value
            if mode == WRITE:
                sp._w32[self._wi + 1] = ctx.me
            self._trylock_done(ctx, mode, site)
        finally:
            q[ctx.base + _C_PEND] = 0
        return True

    def down_read_trylock(self, site: str | None = None) -> bool:
        return self._try(READ, site)

    def down_write_trylock(self, site: str | None = None) -> bool:
        return self._try(WRITE, site)

    def _held_at(self, ctx: _Ctx, mode: int) -> int:
        held = ctx.held
        if held and held[-1][0] is self and held[-1][1] == mode:
            return len(held) - 1
        return self._sp._find_held(ctx, self, mode)

    def up_read(self) -> None:
        ctx = self._ctx()
        sp = self._sp
        i = self._held_at(ctx, READ)
        old = fetch_add32(self._addr, -1, SEQ_CST)
        if not old & RW_READERS:
            fetch_add32(self._addr, 1, SEQ_CST)
            raise RuntimeError(
                f"{ctx.actor}/{ctx.pid}: up_read of {sp._display(self._cid, self._idx)} "
                f"with no reader counted (word {old:#x})"
            )
        if old & RW_SLEEPERS and (old & RW_READERS) == 1:
            fetch_and32(self._addr, ~RW_SLEEPERS, SEQ_CST)
            futex_wake(self._a, WAKE_ALL)
        self._released(ctx, READ, sp._drop_held(ctx, i))

    def up_write(self) -> None:
        ctx = self._ctx()
        sp = self._sp
        i = self._held_at(ctx, WRITE)
        sp._w32[self._wi + 1] = 0
        old = fetch_and32(self._addr, ~(RW_WRITER | RW_SLEEPERS), SEQ_CST)
        if old & RW_SLEEPERS:
            futex_wake(self._a, WAKE_ALL)
        self._released(ctx, WRITE, sp._drop_held(ctx, i))

    def _release_word(self, mode: int) -> None:
        if mode == WRITE:
            self._sp._w32[self._wi + 1] = 0
            fetch_and32(self._addr, ~RW_WRITER, SEQ_CST)
        else:
            fetch_add32(self._addr, -1, SEQ_CST)
        futex_wake(self._a, WAKE_ALL)

    def read(self, site: str | None = None) -> _RWGuard:
        return self._rg if site is None else _RWGuard(self, False, site)

    def write(self, site: str | None = None) -> _RWGuard:
        return self._wg if site is None else _RWGuard(self, True, site)


_KIND_CLASS = {MUTEX: Mutex, SPIN: SpinLock, RWSEM: RWSem, BIT: BitLock}
