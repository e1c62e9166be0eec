# The kernel harness: one small booted kernel in this process, no actors, no sockets.
#
# tests/kernel/ calls the kernel paths of actors/kernel/ directly, the way each actor's
# thread would, but all from one kernel context of the test process: boot_kernel()
# creates the run's shared memory and lock space, a Kernel is made over them whose
# event log is a Python list (what structlog.testing.capture_logs gives for the actors'
# logs: one (event, fields) pair per trace event) and whose clock is a fake one that
# moves only when a kernel path sleeps or a test calls advance() (chain pruning, which
# depends on stable_node_chains_prune_millisecs, is then reproducible). Detector reports
# (KASAN, bad page, lockdep) are collected in `reports`; a test that does not expect any
# leaves `allow_reports` False and the teardown fails on the first one.
#
# The helpers drive memory the way a task does: sys_mmap / sys_madvise for the areas,
# and the MMU loop of actors/task.py `access` for loads and stores - user_access() as far
# as the ptes allow, then handle_mm_fault() under mmap_read_lock (what the fault actor
# does) for the page that trapped, and again. ksmd's batch is ksm_do_scan() under
# ksm_thread_mutex, as actors/ksmd.py runs it.
#
# Teardown releases the context, closes and unlinks the lock space and kernel memory,
# and asserts that /dev/shm holds no segment of the run.
from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from actors.boot import boot_kernel
from actors.kernel import fork as forkops
from actors.kernel import ksm_scan, syscalls, sysfs
from actors.kernel import mm as mmops
from actors.kernel.context import Kernel
from actors.kernel.exit import mmput
from actors.kernel.fault import access_user
from actors.kernel.invariants import check_invariants, leaks_after_teardown
from actors.kernel.ksm_scan import SCAN_MODES
from actors.kernel.variants import Variants
from protocol.abi import MADV_MERGEABLE, MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE
from shared_mem.layout import PAGE_SIZE, PTE_PFN_MASK, PTE_PRESENT, PTE_SPECIAL, Geometry
from shared_mem.segment import list_segments

SMALL = dict(nr_frames=256, max_mms=8, max_tasks=8, max_vmas=64, max_anon_vmas=64,
             va_pages=8192, nr_swap_slots=64)
# Fields that are not part of a run's behaviour (none of the kernel's events carry them
# today; excluded anyway, so that a determinism test compares behaviour only).
VOLATILE_FIELDS = frozenset({"ts", "ts_ns", "pid", "timestamp", "time", "delay_ms"})


class FakeClock:
    """A Clock seam that advances only when slept on or told to (nanoseconds)."""

    def __init__(self, start_ns: int = 1_000_000_000) -> None:
        self.ns = start_ns
        self.cpu_ns = 0          # ksmd's CPU time: set by the tests that need it

    def monotonic(self) -> float:
        return self.ns / 1e9

    def monotonic_ns(self) -> int:
        return self.ns

    def cpu_time_ns(self) -> int:
        return self.cpu_ns

    def sleep(self, seconds: float) -> None:
        self.ns += int(seconds * 1e9)

    def advance(self, ms: float) -> None:
        self.ns += int(ms * 1_000_000)


def page_of(content: int | bytes | np.ndarray) -> np.ndarray:
    """A page's bytes: an int fills the page, shorter bytes are zero-padded."""
    if isinstance(content, int):
        return np.full(PAGE_SIZE, content, dtype=np.uint8)
    buf = np.zeros(PAGE_SIZE, dtype=np.uint8)
    b = np.frombuffer(bytes(content), dtype=np.uint8) if not isinstance(content, np.ndarray) else content
    buf[:len(b)] = b
    return buf


class KernelHarness:
    def __init__(
        self, geo: Geometry | None = None, variants: Variants | None = None, scan: str | None = None
    ) -> None:
        self.run_id = "k" + secrets.token_hex(5)
        self.geo = geo or Geometry(**SMALL)
        self.variants = variants or Variants()
        # ksmd's scan: exact (page by page, the kernel's shape) unless a test asks, or
        # KSMLAB_TEST_SCAN=batch runs the whole directory on the vectorized scan.
        mode = SCAN_MODES[scan or os.environ.get("KSMLAB_TEST_SCAN", "exact")]
        self.km, self.locks = boot_kernel(self.geo, self.run_id, self.variants, mode)
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.reports: list[dict] = []
        self.allow_reports = False
        self.km.set_actor("ktest", on_report=self.reports.append)
        self.locks.set_report_hook(
            lambda kind, title, text, data: self.reports.append(
                {"kind": kind, "title": title, "text": text, "data": data}))
        self.locks.bind_context("ktest")
        self.clock = FakeClock()
        self.k = Kernel(self.km, self.locks, "ktest", ev=self._ev, variants=self.variants,
                        clock=self.clock, pid=1)

    def _ev(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    def close(self) -> None:
        try:
            self.locks.release_context()
        finally:
            self.k = None  # type: ignore[assignment]
            self.locks.close()
            self.locks.unlink()
            self.km.close()
            self.km.unlink()

    # -- events ----------------------------------------------------------------------------
    def mark(self) -> int:
        return len(self.events)

    def names(self, since: int = 0) -> list[str]:
        return [e for e, _ in self.events[since:]]

    def fields(self, name: str, since: int = 0) -> list[dict[str, Any]]:
        return [f for e, f in self.events[since:] if e == name]

    def behaviour(self) -> list[tuple[str, tuple]]:
        """The event sequence without timing fields, comparable across boots."""
        return [(e, tuple(sorted((n, v) for n, v in f.items() if n not in VOLATILE_FIELDS)))
                for e, f in self.events]

    # -- address spaces --------------------------------------------------------------------
    def new_mm(self) -> int:
        return mmops.mm_alloc(self.k)

    def mmap(self, mm: int, npages: int, prot: int = PROT_READ | PROT_WRITE) -> int:
        return syscalls.sys_mmap(self.k, mm, npages * PAGE_SIZE, prot, MAP_PRIVATE | MAP_ANONYMOUS)

    def madvise(self, mm: int, addr: int, npages: int, advice: int = MADV_MERGEABLE) -> None:
        syscalls.sys_madvise(self.k, mm, addr, npages * PAGE_SIZE, advice)

    def access(self, mm: int, addr: int, length: int, write: bool, src: Any = None) -> bytes:
        """A task's load or store, its faults served in place (fault.access_user)."""
        return access_user(self.k, mm, addr, length, write, src) or b""

    def write_page(self, mm: int, addr: int, content: int | bytes | np.ndarray) -> None:
        self.access(mm, addr, PAGE_SIZE, True, page_of(content))

    def read(self, mm: int, addr: int, length: int = PAGE_SIZE) -> bytes:
        return self.access(mm, addr, length, False)

    def area(self, contents: list, mm: int | None = None, mergeable: bool = True) -> tuple[int, int]:
        """An anonymous area of len(contents) pages, each stored with its content, then
        advised MADV_MERGEABLE: (mm, address)."""
        mm = self.new_mm() if mm is None else mm
        addr = self.mmap(mm, len(contents))
        for i, c in enumerate(contents):
            self.write_page(mm, addr + i * PAGE_SIZE, c)
        if mergeable:
            self.madvise(mm, addr, len(contents))
        return mm, addr

    def pte(self, mm: int, addr: int) -> int:
        return mmops.read_pte(self.k, mm, addr)

    def pfn(self, mm: int, addr: int) -> int:
        """The frame a present, normal pte maps; -1 otherwise."""
        pte = self.pte(mm, addr)
        if not pte & PTE_PRESENT or pte & PTE_SPECIAL:
            return -1
        return pte & PTE_PFN_MASK

    def pfns(self, mm: int, addr: int, npages: int) -> list[int]:
        return [self.pfn(mm, addr + i * PAGE_SIZE) for i in range(npages)]

    def fork(self, mm: int) -> int:
        return forkops.dup_mmap(self.k, mm, 0)

    def mmput(self, mm: int) -> None:
        mmput(self.k, mm)

    # -- ksmd and sysfs --------------------------------------------------------------------
    def scan(self, npages: int) -> int:
        """One ksmd batch of at most npages pages."""
        with self.k.ksm_thread_mutex:
            return ksm_scan.SCAN_FUNCS[int(self.k.ksm["scan_mode"])](self.k, npages)

    def full_scan(self, passes: int = 1) -> None:
        """Finish the current pass (a whole one from the list head), `passes` times."""
        for _ in range(passes):
            before = self.seqnr
            self.scan(1 << 30)
            assert self.seqnr == before + 1, "ksm_do_scan did not complete a pass"

    @property
    def seqnr(self) -> int:
        return int(self.k.ksm["seqnr"])

    def counters(self, *names: str) -> dict[str, int]:
        c = sysfs.counters(self.k)
        c["rmap_items"] = int(self.k.ksm["rmap_items"])
        return {n: c[n] for n in names} if names else c

    def set(self, knob: str, value: int | str) -> None:
        sysfs.store(self.k, knob, f"{value}\n")

    # -- KSM objects -----------------------------------------------------------------------
    def unstable_root(self, nid: int = 0) -> int:
        return int(self.k.ks.root_unstable[nid])

    def stable_root(self, nid: int = 0) -> int:
        return int(self.k.ks.root_stable[nid])

    def slot_of(self, mm: int) -> int:
        """The mm's ksm_mm_slot (0 when it is not registered)."""
        from actors.kernel import mm_slot

        with self.k.ksm_mmlist_lock:
            return mm_slot.get_mm_slot(self.k, mm)

    def rmap_items_of(self, mm: int) -> list[int]:
        """The slot's rmap_list, in address order."""
        km = self.km
        slot = self.slot_of(mm)
        out = []
        item = int(km.mm_slot.rmap_list[km.mm_slot.idx(slot)]) if slot else 0
        while item:
            out.append(item)
            item = int(km.rmap_item.rmap_next[km.rmap_item.idx(item)])
        return out

    def item_at(self, mm: int, addr: int) -> int:
        ri = self.km.rmap_item
        for item in self.rmap_items_of(mm):
            if int(ri.address[ri.idx(item)]) & ~(PAGE_SIZE - 1) == addr:
                return item
        return 0

    def item_field(self, item: int, name: str) -> int:
        ri = self.km.rmap_item
        return int(getattr(ri, name)[ri.idx(item)])

    def node_field(self, node: int, name: str) -> int:
        sn = self.km.stable_node
        return int(getattr(sn, name)[sn.idx(node)])

    # -- checks ----------------------------------------------------------------------------
    def check(self) -> None:
        """The invariants hold and no detector reported."""
        with self.k.ksm_thread_mutex:
            bad = check_invariants(self.k)
        assert bad == [], "\n".join(r["text"] for r in bad)
        assert self.reports == [], [r["title"] for r in self.reports]

    def check_no_leaks(self) -> None:
        bad = leaks_after_teardown(self.k)
        assert bad == [], "\n".join(r["text"] for r in bad)


@pytest.fixture
def kernel_factory() -> Iterator[Any]:
    """make(geo=None, variants=(), scan=None) -> KernelHarness; every kernel made is torn
    down after."""
    made: list[KernelHarness] = []

    def make(
        geo: Geometry | None = None, variants: tuple[str, ...] = (), scan: str | None = None
    ) -> KernelHarness:
        h = KernelHarness(geo, Variants(variants), scan)
        made.append(h)
        return h

    yield make
    problems = []
    for h in made:
        h.close()   # release_context() reports locks still held, before the check below
        if list_segments(h.run_id):
            problems.append(f"segments left behind: {list_segments(h.run_id)}")
        if not h.allow_reports and h.reports:
            problems.append(f"unexpected reports: {[r['title'] for r in h.reports]}")
    assert not problems, problems


@pytest.fixture
def kern(kernel_factory) -> KernelHarness:
    """One freshly booted small kernel (256 frames, 64 swap slots, today's code)."""
    return kernel_factory()
