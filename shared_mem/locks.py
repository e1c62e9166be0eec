# Kernel locks for the ksmlab model, shared by every actor process of one run.
#
# mm/ksm.c's locks really block here, across processes, with the kernel's rules: the
# sleeping mutex, spinlocks, rw_semaphores whose waiting writer holds back later readers,
# and a page's PG_locked bit. Each is a byte range of one lock file per run, taken with
# Linux OFD locks, so a SIGKILLed holder cannot keep a lock; each kernel context (thread)
# has its own descriptor and a row of a shared table with its held locks and its wait,
# from which lockdep validates lock order and the hung-task watchdog reports.
#
# A lock instance is a 32-bit word of the state segment (wordlocks.py: one atomic when
# nobody else wants it, a futex sleep when someone does), or, in a run made with
# impl="ofd", a byte of the lock file (ofdlocks.py); the classes exported here are the
# word locks. The model is these modules, bottom up; this one gathers their public
# names, so callers import everything from shared_mem.locks:
#
#   lockdep.py    the class dependency graph, the report texts, find_hung() (pure)
#   lockstate.py  the byte map of the lock file and the word map of the state segment
#   lockcheck.py  what is checked when a context that holds locks takes another, and the
#                 run's one lockdep report
#   futex.py      32-bit atomics and futex(2)
#   ofdlocks.py   Mutex, SpinLock, BitLock, RWSem on OFD byte locks
#   wordlocks.py  the same four on shared words: the fast path, futex sleeps, the writer
#                 queue, taking over from dead owners
#   lockspace.py  LockSpace: locks by class and index, kernel contexts, held stacks and
#                 published waits, the snapshot the watchdog reads
from __future__ import annotations

from shared_mem.lockdep import MAX_LOCK_DEPTH, find_hung
from shared_mem.lockspace import IMPLS, EventHook, LockSpace, ReportHook, SchedHook
from shared_mem.lockstate import (
    BIT,
    EXCL,
    KWAIT_EVENT,
    KWAIT_RETRY,
    MUTEX,
    READ,
    RWSEM,
    SPIN,
    WRITE,
)
from shared_mem.wordlocks import BitLock, Mutex, RWSem, SpinLock

__all__ = [
    "BIT",
    "EXCL",
    "IMPLS",
    "KWAIT_EVENT",
    "KWAIT_RETRY",
    "MAX_LOCK_DEPTH",
    "MUTEX",
    "READ",
    "RWSEM",
    "SPIN",
    "WRITE",
    "BitLock",
    "EventHook",
    "LockSpace",
    "Mutex",
    "RWSem",
    "ReportHook",
    "SchedHook",
    "SpinLock",
    "find_hung",
]
