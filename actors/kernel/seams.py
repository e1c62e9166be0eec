# The seams: everything a kernel path may use besides kernel memory, as Protocols.
#
# What it models. A kernel path in mm/ksm.c reaches outside its data structures for a
# handful of services: locks (mutex, spinlock, rw_semaphore, the page lock bit, the
# anon_vma rwsem), a clock (jiffies, schedule_timeout), schedule points (cond_resched,
# preemption), memory pressure (alloc_pages' slow path: direct reclaim, then the OOM
# killer), wakeups (wake_up_interruptible(&ksm_thread_wait), mm_populate), the trace
# event log, and `current`. ksmlab's kernel paths (actors/kernel/) take all of these
# from their Kernel context and from nowhere else, so two different worlds can supply
# them:
#
#   - the multiprocess actors (actors/base.py): OFD byte-range locks shared by every
#     process, the system clock, zmq notifications to ksmd and to the OOM killer;
#   - the deterministic simulator (ksmlab/sim/): cooperative locks whose every acquire
#     and release is a scheduling decision, a virtual clock, and in-process wakeups.
#
# Why Protocols and not base classes: the OFD locks live in shared_mem (below the
# kernel layer) and the simulator's in ksmlab (above it); neither should import the
# other to inherit. A structural type states the contract once, here, and mypy or a
# reader checks each side against it (trio's Clock, h11's state machine behind plain
# calls, are the models). SystemClock and NoWakeups are the defaults a Kernel gets.
from __future__ import annotations

import time
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from actors.kernel.context import Kernel


@runtime_checkable
class ExclusiveLock(Protocol):
    """mutex, spinlock, PG_locked: one holder; taking it again is a deadlock (raises)."""

    def lock(self, site: str | None = None) -> None: ...
    def trylock(self, site: str | None = None) -> bool: ...
    def unlock(self) -> None: ...
    def __enter__(self) -> Any: ...
    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class RWSemaphore(Protocol):
    """mmap_lock, anon_vma->rwsem: many readers or one writer; a waiting writer holds
    back later readers."""

    def down_read(self, site: str | None = None) -> None: ...
    def down_write(self, site: str | None = None) -> None: ...
    def down_read_trylock(self, site: str | None = None) -> bool: ...
    def down_write_trylock(self, site: str | None = None) -> bool: ...
    def up_read(self) -> None: ...
    def up_write(self) -> None: ...
    def read(self, site: str | None = None) -> AbstractContextManager[Any]: ...
    def write(self, site: str | None = None) -> AbstractContextManager[Any]: ...


@runtime_checkable
class LockSpace(Protocol):
    """The run's locks by class and index (shared_mem.layout.lock_classes), and the
    per-context wait table the hung-task watchdog reads."""

    def get(self, cls: str, idx: int = 0) -> Any: ...
    def no_progress(self, site: str, retries: int) -> None: ...
    def progress(self) -> None: ...


@runtime_checkable
class Clock(Protocol):
    """ktime_get() and schedule_timeout(): the only time a kernel path may read or spend."""

    def monotonic(self) -> float: ...
    def monotonic_ns(self) -> int: ...
    def cpu_time_ns(self) -> int: ...   # task_sched_runtime(current): this context's CPU time
    def sleep(self, seconds: float) -> None: ...


@runtime_checkable
class SchedPoint(Protocol):
    """A named place where the scheduler may run someone else (actors/kernel/schedule.py
    SCHED_POINTS)."""

    def __call__(self, k: Kernel, name: str) -> None: ...


@runtime_checkable
class MemoryPressure(Protocol):
    """alloc_pages' slow path: direct reclaim (pages freed), then out_of_memory()."""

    def reclaim(self, k: Kernel, nid: int) -> int: ...
    def out_of_memory(self, k: Kernel, nid: int) -> None: ...


@runtime_checkable
class Wakeups(Protocol):
    """Wakeups a kernel path sends to other kernel threads."""

    def wake_ksmd(self) -> None: ...
    def populate(self, start: int, length: int, write: bool) -> None: ...


@runtime_checkable
class EventLog(Protocol):
    """trace_*(): one structured event (name and fields) in the context's log."""

    def __call__(self, event: str, **fields: Any) -> None: ...


class SystemClock:
    """The real clock, for the multiprocess actors."""

    def monotonic(self) -> float:
        return time.monotonic()

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()

    def cpu_time_ns(self) -> int:
        return time.thread_time_ns()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class NoWakeups:
    """A context nobody listens to (boot, tests of a single path)."""

    def wake_ksmd(self) -> None:
        return None

    def populate(self, start: int, length: int, write: bool) -> None:
        return None


SYSTEM_CLOCK = SystemClock()
NO_WAKEUPS = NoWakeups()
