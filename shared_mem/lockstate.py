# The lock space's shared state: what each byte of the lock file and each word of the
# lock state segment means.
#
# A run has one lock file (under /dev/shm) and one state segment. In the lock file, byte 0
# guards the context table, byte 1 the lockdep graph, then one liveness byte per context
# slot (held by the slot's owner for as long as it lives, so a slot whose owner died reads
# as free), then the lock instances: one byte per mutex, spinlock or page bit, two per
# rwsem (its rw byte and the byte its waiting writer queues on). A byte is locked with an
# OFD flock record (_flock()), F_OFD_SETLK to try and F_OFD_SETLKW to wait.
#
# The state segment is int64 words: a header (magic, version, class count, slots, the
# lockdep on/off word, the report count and length), then one row per context slot
# (state, pid, tid, the lock it waits for and since when, the held-lock count and its
# (key, since) pairs, and the two words of a wait that is no lock wait), the per-context
# strings (actor name, wait site, held sites, no-progress site), the lockdep matrix and
# edge records, one "writer waiting" byte per rwsem, and room for the run's one lockdep
# report. A held or awaited lock is one word: class << 40 | index << 8 | mode, with
# _SITEF set when a site string was stored for it. _layout() computes every offset from
# the lock classes, so every process that attaches finds the same places.
#
# These names keep their leading underscore: they are shared by the lock modules
# (ofdlocks.py, lockspace.py, lockcheck.py) and by nobody else.
from __future__ import annotations

import errno
import fcntl
import os
import struct

from shared_mem.lockdep import EDGE_RECORD_SIZE, MAX_LOCK_DEPTH

MUTEX, SPIN, RWSEM, BIT = "mutex", "spin", "rwsem", "bit"
_KINDS = (MUTEX, SPIN, RWSEM, BIT)

_fcntl = fcntl.fcntl
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

# Word locks (wordlocks.py): one int32 word per mutex, spinlock or page bit, two per rwsem
# (its state and its writer's owner id), after the report area.
# State segment: int64 header, int64 context table, per-context strings, lockdep graph,
# one "writer waiting" byte per rwsem instance, and room for the first lockdep report.
_MAGIC = 0x6B736D6C6F636B31  # "ksmlock1"
_H_MAGIC, _H_VERSION, _H_NCLS, _H_MAXCTX, _H_DEBUG, _H_NREPORTS, _H_REPLEN = range(7)
_HDR_WORDS = 16
_C_STATE, _C_PID, _C_TID, _C_WAIT, _C_WSINCE, _C_HELDN, _C_HELD = range(7)
_CTX_WORDS = 48  # 6 words + (key, since) per held lock, then the words below, padded
# The two padding words after the held stack: a wait that is not a lock wait (a retry
# loop without progress, a wait_event), published by no_progress(): since when, and
# (retries << 4 | kind). 0 since = none.
_C_KWAIT, _C_KWINFO = _C_HELD + 2 * MAX_LOCK_DEPTH, _C_HELD + 2 * MAX_LOCK_DEPTH + 1
# Then the slot's claim generation (part of the owner id a word lock records, so a lock
# held by a dead context is never mistaken for one held by the slot's next owner) and the
# word lock a context is about to take (key | mode, written before its compare-and-swap
# and cleared after the push, like a robust futex list's op_pending).
_C_GEN, _C_PEND = _C_KWINFO + 1, _C_KWINFO + 2
assert _C_PEND < _CTX_WORDS
KWAIT_RETRY, KWAIT_EVENT = 1, 2  # cond_resched() retry loop (state R), wait_event (state D)
_ACTOR_LEN, _SITE_LEN, _KWAIT_LEN = 32, 48, 96
# actor, wait site, held sites, then the no-progress site (a call chain, so longer)
_CSTR_BYTES = _ACTOR_LEN + (1 + MAX_LOCK_DEPTH) * _SITE_LEN + _KWAIT_LEN
_KWAIT_SOFF = _ACTOR_LEN + (1 + MAX_LOCK_DEPTH) * _SITE_LEN
_REPORT_BYTES = 32768


def _flock(kind: int, off: int) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, off, 1, 0)


def _align(n: int, a: int = 8) -> int:
    return (n + a - 1) // a * a


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
    lay["words"] = pos
    word_off = []
    w = 0
    for _name, kind, count in classes:
        word_off.append(w)
        w += count * (2 if kind == RWSEM else 1)
    lay["word_off"] = word_off
    pos = _align(pos + 4 * w)
    lay["size"] = _align(pos, 4096)
    return lay

