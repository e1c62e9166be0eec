# Slab caches of kernel objects in shared memory, with KASAN-style checking.
#
# Every kernel object (mm_struct, vm_area_struct, anon_vma, ksm_mm_slot,
# ksm_rmap_item, ksm_stable_node, page-table page, task) lives in a fixed-size
# numpy structured array inside a shared segment. Other records refer to it by a
# handle: (generation << 32) | index, with 0 as NULL. A live record has an odd
# generation; freeing bumps it to even and poisons the record bytes with 0x6b
# (the kernel's POISON_FREE), so any later use of an old handle is detected at
# the dereference and reported like KASAN's use-after-free, naming who allocated
# and who freed the object. Allocation and free go through a per-cache free-list
# under a lock, as kmem_cache_alloc does with its own locking.
from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from shared_mem.atomic import AtomicField

NULL = 0
POISON_FREE = 0x6B

# Provenance kept per record, so a UAF report can say who allocated and who freed.
PROVENANCE = [
    ("gen", "<u8"),
    ("alloc_pid", "<i4"),
    ("free_pid", "<i4"),
    ("alloc_ns", "<i8"),
    ("free_ns", "<i8"),
    ("alloc_actor", "S16"),
    ("free_actor", "S16"),
    ("alloc_site", "S32"),
    ("free_site", "S32"),
]


# A live record's generation is odd, a freed one's even (alloc and free each add one), so
# bit 32 of a handle says whether it can name a live record at all. Every check tests it:
# a handle made from a slot's generation after the slot was freed (handle_of() racing a
# free) would otherwise equal the freed generation and pass for live, and its fields are
# the free poison.
LIVE_BIT = 1 << 32


def pack(gen: int, idx: int) -> int:
    return (gen << 32) | idx


def h_index(h: int) -> int:
    return h & 0xFFFFFFFF


def h_gen(h: int) -> int:
    return h >> 32


def fmt_handle(h: int) -> str:
    return "NULL" if h == NULL else f"{h_index(h)}#{h_gen(h)}"


def handle_id(h: int) -> int:
    """The record number of a handle, for log and event fields only.

    Never use it to index a record: it skips the generation check, so a stale handle
    would silently read whatever now lives in that slot. Dereference with
    arena.idx(h, site), which reports a use-after-free instead.
    """
    return h & 0xFFFFFFFF


class UseAfterFree(Exception):
    """Raised at the faulting dereference; .report holds the KASAN-shaped report."""

    def __init__(self, report: dict) -> None:
        super().__init__(report["title"])
        self.report = report


class BadFree(Exception):
    def __init__(self, report: dict) -> None:
        super().__init__(report["title"])
        self.report = report


class OutOfObjects(MemoryError):
    pass


class Arena:
    """A kmem_cache of one record type.

    `meta` is the provenance array (parallel to `rec`); fields of `rec` are exposed as
    attributes (e.g. arena.users[i]) for speed. `atomic(name)` gives atomic access to an
    8-byte field. The free list is a stack in shared memory, guarded by `lock`.
    """

    def __init__(
        self,
        name: str,
        rec: np.ndarray,
        meta: np.ndarray,
        free_stack: np.ndarray,
        hdr: np.ndarray,
        lock: Any = None,
    ) -> None:
        self.name = name
        self.rec = rec
        self.meta = meta
        self.gen = meta["gen"]
        # The same generations as a ctypes array over the shared memory (record i at word
        # i * _gw): idx() runs on every dereference, and a ctypes item read is a plain int.
        self._gw = self.gen.strides[0] // 8 if len(meta) else 1
        self._gq = (ctypes.c_uint64 * max(1, (len(meta) - 1) * self._gw + 1)).from_address(
            self.gen.ctypes.data)
        self.free_stack = free_stack
        self.hdr = hdr  # [free_top, nr_live, nr_alloc_total]
        self.lock = lock
        self.capacity = len(rec)
        self._bytes = rec.view(np.uint8).reshape(self.capacity, rec.dtype.itemsize)
        self._atomics: dict[str, AtomicField] = {}
        # provenance field views, looked up once (alloc/free run on every rmap_item)
        self._m = {f: meta[f] for f in meta.dtype.names}
        for field in rec.dtype.names:
            if not hasattr(self, field):
                setattr(self, field, rec[field])
        self.actor = "?"
        # actors/kernel/tree.py's link journal for this process's optimistic tree walks.
        self.journal: set[int] | None = None
        self.on_report: Callable[[dict], None] | None = None
        # Who and when, for the provenance a report prints: the process and the system
        # clock here; the simulator's current context and virtual clock there.
        self.pid_of: Callable[[], int] = os.getpid
        self.clock_ns: Callable[[], int] = time.monotonic_ns

    # -- set-up -------------------------------------------------------------------
    def format(self) -> None:
        """First-time initialisation by the creator: every record free."""
        self.gen[:] = 0
        self._bytes[:] = POISON_FREE
        self.free_stack[:] = np.arange(self.capacity - 1, -1, -1, dtype=self.free_stack.dtype)
        self.hdr[:] = 0
        self.hdr[0] = self.capacity

    def atomic(self, field: str) -> AtomicField:
        a = self._atomics.get(field)
        if a is None:
            a = self._atomics[field] = AtomicField(self.rec[field])
        return a

    # -- allocation -----------------------------------------------------------------
    def alloc(self, site: str = "", zero: bool = True) -> int:
        lock = self.lock
        if lock is not None:
            lock.lock()
        try:
            top = int(self.hdr[0])
            if top == 0:
                raise OutOfObjects(f"kmem_cache {self.name}: no free objects ({self.capacity})")
            i = int(self.free_stack[top - 1])
            self.hdr[0] = top - 1
            self.hdr[1] += 1
            self.hdr[2] += 1
            g = int(self.gen[i]) + 1
        finally:
            if lock is not None:
                lock.unlock()
        # Popped, so ours alone, but not live until the generation says so: it is made
        # (zeroed, its provenance written) first, so that an observer walking the live
        # records (an invariant check, a watchdog, peek()) never sees the free poison of
        # its last life as values.
        if zero:
            self._bytes[i] = 0
        m = self._m
        m["alloc_pid"][i] = self.pid_of()
        m["alloc_ns"][i] = self.clock_ns()
        m["alloc_actor"][i] = self.actor.encode()[:16]
        m["alloc_site"][i] = site.encode()[:32]
        self.gen[i] = g
        return pack(g, i)

    def alloc_many(self, n: int, site: str = "") -> np.ndarray:
        """alloc() of up to n records under one hold of the allocator lock: the handles,
        fewer than n (none, even) when the cache runs out, as n calls of alloc() would
        give before the first OutOfObjects. Each record is made (zeroed, its provenance
        written) before its generation makes it live, as in alloc()."""
        lock = self.lock
        if lock is not None:
            lock.lock()
        try:
            top = int(self.hdr[0])
            got = min(max(n, 0), top)
            # alloc() pops from the top: the same records, in the same order
            ii = self.free_stack[top - got:top][::-1].astype(np.int64)
            self.hdr[0] = top - got
            self.hdr[1] += got
            self.hdr[2] += got
        finally:
            if lock is not None:
                lock.unlock()
        if not got:
            return np.zeros(0, dtype=np.int64)
        g = self.gen[ii].astype(np.int64) + 1
        self._bytes[ii] = 0
        m = self._m
        m["alloc_pid"][ii] = self.pid_of()
        m["alloc_ns"][ii] = self.clock_ns()
        m["alloc_actor"][ii] = self.actor.encode()[:16]
        m["alloc_site"][ii] = site.encode()[:32]
        self.gen[ii] = g.astype(self.gen.dtype)
        return (g << 32) | ii

    def free(self, h: int, site: str = "") -> None:
        i = h_index(h)
        if not h & LIVE_BIT or i >= self.capacity or int(self.gen[i]) != h_gen(h):
            rep = self._report(h, "double-free" if i < self.capacity else "invalid-free", site)
            raise BadFree(rep)
        m = self._m
        m["free_pid"][i] = self.pid_of()
        m["free_ns"][i] = self.clock_ns()
        m["free_actor"][i] = self.actor.encode()[:16]
        m["free_site"][i] = site.encode()[:32]
        # Dead first, poisoned next, reusable last: an observer that read the generation
        # live and then the fields re-checks the generation (peek) and so never takes the
        # poison for values, and no allocator can have the record while it is poisoned.
        self.gen[i] = h_gen(h) + 1
        self._bytes[i] = POISON_FREE
        lock = self.lock
        if lock is not None:
            lock.lock()
        try:
            top = int(self.hdr[0])
            self.free_stack[top] = i
            self.hdr[0] = top + 1
            self.hdr[1] -= 1
        finally:
            if lock is not None:
                lock.unlock()

    # -- dereference ----------------------------------------------------------------
    def idx(self, h: int, site: str = "") -> int:
        """Index of a live record; a stale or NULL handle is a reported bug."""
        i = h & 0xFFFFFFFF
        if i < self.capacity and h & LIVE_BIT and self._gq[i * self._gw] == h >> 32:
            return i
        raise UseAfterFree(self._report(h, "use-after-free" if h != NULL else "null-ptr-deref", site))

    def idx_many(self, hs: np.ndarray, site: str = "") -> np.ndarray:
        """idx() of many handles at once (a vectorized scan's batch): all must be live."""
        hs = np.asarray(hs, dtype=np.int64)
        ok = self.valid_many(hs)
        if not ok.all():
            self.idx(int(hs[~ok][0]), site)  # the report of the first bad one
        return hs & 0xFFFFFFFF

    def valid_many(self, hs: np.ndarray) -> np.ndarray:
        """valid() of many handles at once."""
        hs = np.asarray(hs, dtype=np.int64)
        i = hs & 0xFFFFFFFF
        # An index past the end reads the last record's generation, which the range test
        # then refuses: one gather and no boolean indexing, which for the few handles of a
        # tree level cost more than the test itself. (Not gen.take(): on this strided field
        # it copies the whole column first.)
        g = self.gen[np.minimum(i, self.capacity - 1)] if self.capacity else np.zeros(i.shape, np.uint64)
        return (g == (hs >> 32).astype(np.uint64)) & (hs & LIVE_BIT != 0) & (i < self.capacity)

    def valid(self, h: int) -> bool:
        i = h & 0xFFFFFFFF
        return bool(h & LIVE_BIT) and i < self.capacity and self._gq[i * self._gw] == h >> 32

    def typesafe_idx(self, h: int) -> int:
        """The slot h names, live or freed: SLAB_TYPESAFE_BY_RCU. A stale pointer to such
        a record still points at a record of the same type, so its embedded lock may be
        taken; the caller must then check that the record is the one it wanted
        (folio_lock_anon_vma_read). Never for reading or writing the record's fields."""
        i = h_index(h)
        if h <= 0 or i >= self.capacity:
            raise UseAfterFree(self._report(h, "null-ptr-deref" if h == NULL else "use-after-free", "typesafe_idx"))
        return i

    def peek(self, h: int, field: str, col: int | None = None) -> int | None:
        """One field of the record h names (element `col` of an array field), or None if
        h is stale: for observers outside the kernel paths (debug checks, the watchdog)
        reading records another process may free at any moment. The generation is checked
        before and after the read, as a seqlock reader does, so a value from a record freed
        meanwhile is never returned and a stale handle is never a use-after-free report."""
        if not self.valid(h):
            return None
        f = self.rec[field]
        v = int(f[h & 0xFFFFFFFF] if col is None else f[h & 0xFFFFFFFF, col])
        return v if self.valid(h) else None

    def peek_many(self, hs: np.ndarray, field: str, cols: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """peek() of many handles: (values, which handles were live across the read).

        A value is 0 where its handle was stale before or after the read."""
        hs = np.asarray(hs, dtype=np.int64)
        ok = self.valid_many(hs)
        i = np.where(ok, hs & 0xFFFFFFFF, 0)
        f = self.rec[field]
        v = f[i] if cols is None else f[i, cols]
        ok &= self.valid_many(hs)
        return np.where(ok, v, 0), ok

    def live_indices(self) -> np.ndarray:
        return np.flatnonzero(self.gen & 1)

    def nr_live(self) -> int:
        return int(self.hdr[1])

    def handle_of(self, i: int) -> int:
        return pack(int(self.gen[i]), i)

    # -- reports --------------------------------------------------------------------
    def _report(self, h: int, kind: str, site: str) -> dict:
        i = h_index(h)
        if kind == "null-ptr-deref":
            title = f"BUG: kernel NULL pointer dereference, {self.name} in {site or '?'}"
            text = f"{title}\n{self.actor}/{self.pid_of()} dereferenced a NULL {self.name} handle\n"
            rep = {"kind": "null-ptr-deref", "title": title, "text": text,
                   "data": {"cache": self.name, "actor": self.actor, "site": site}}
        else:
            m = self.meta[i] if i < self.capacity else None
            title = f"BUG: KASAN: {kind} in {site or '?'}"
            lines = [
                "=" * 66,
                title,
                f"Access to {self.name} {fmt_handle(h)} by task {self.actor}/{self.pid_of()}",
            ]
            data: dict[str, Any] = {"cache": self.name, "handle": [i, h_gen(h)], "site": site,
                                    "actor": self.actor, "pid": self.pid_of()}
            if m is not None:
                cur = int(m["gen"])
                lines.append(f"The object is now generation {cur} ({'live, reused' if cur & 1 else 'free'}).")
                lines.append("")
                lines.append(f"Allocated by task {m['alloc_actor'].decode()}/{int(m['alloc_pid'])}:")
                lines.append(f" {m['alloc_site'].decode() or '?'} at {int(m['alloc_ns'])} ns")
                lines.append("")
                lines.append(f"Freed by task {m['free_actor'].decode()}/{int(m['free_pid'])}:")
                lines.append(f" {m['free_site'].decode() or '?'} at {int(m['free_ns'])} ns")
                data.update(
                    gen_now=cur,
                    alloc={"actor": m["alloc_actor"].decode(), "pid": int(m["alloc_pid"]),
                           "site": m["alloc_site"].decode(), "ns": int(m["alloc_ns"])},
                    free={"actor": m["free_actor"].decode(), "pid": int(m["free_pid"]),
                          "site": m["free_site"].decode(), "ns": int(m["free_ns"])},
                )
            lines.append("=" * 66)
            rep = {"kind": "kasan", "title": title, "text": "\n".join(lines) + "\n", "data": data}
        if self.on_report is not None:
            self.on_report(rep)
        return rep
