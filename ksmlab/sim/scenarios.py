# The simulator's scenarios: the race-lab bugs as small, bounded programs.
#
# Each scenario is the smallest machine in which its seed's race can happen: two or
# three kernel contexts, a few pages, a bounded ksmd. Nothing in a scenario says where
# to preempt: the set-up builds the state the race needs (a registered mm with no
# rmap_items, a merged KSM page, a swapped-out KSM page), and the contexts are the
# kernel's own paths (ksm_scan_thread, do_exit, copy_process, run_store, shrink_page,
# a task's user access) running concurrently. The strategy finds the interleaving; the
# same detectors as the cluster's run report it. With the bug's variant off (today's
# kernel) a depth-first search to two preemptions must report nothing.
#
# The race-lab scenarios of the cluster (ksmlab/scenarios/) are loops over many tasks
# and seconds of wall time; these are one round of the same loop, which is what makes
# an exhaustive search possible.
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from actors.kernel import mm as mmops
from actors.kernel import sysfs
from actors.kernel.context import Kernel
from actors.kernel.fault import mm_populate
from actors.kernel.invariants import ZERO_PAGES_MISMATCH
from actors.kernel.syscalls import sys_mlockall, sys_mprotect
from actors.kernel.vmscan import shrink_page
from ksmlab.sim.world import Context, World, ksmd_body
from protocol.abi import (
    MADV_MERGEABLE,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MCL_CURRENT,
    MCL_FUTURE,
    PAGE_SIZE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
)
from shared_mem.layout import PTE_PFN_MASK, PTE_PRESENT, Geometry

ANON = MAP_PRIVATE | MAP_ANONYMOUS
RW = PROT_READ | PROT_WRITE


@dataclass(frozen=True)
class SimScenario:
    name: str
    bug: str                                 # the variant that makes it fail ("": none known)
    description: str
    setup: Callable[[World, Kernel], None]
    contexts: Callable[[World], list[Context]]
    frames: int = 64
    swap_slots: int = 0
    ci_bound: int = 2                        # the preemption bound the test suite searches to
    # A race ksmlab found in today's kernel: the report today's code gives (finding) and
    # the "fix:" variant of the fix proposed for it, under which the search must be clean.
    finding: str = ""
    fix: str = ""

    def broken(self) -> list[str] | None:
        """The variants under which this scenario must report (None: it never should)."""
        return [self.bug] if self.bug else [] if self.finding else None

    def clean(self) -> list[str]:
        """The variants under which an exhaustive search must report nothing."""
        return [self.fix] if self.fix else []

    def geometry(self) -> Geometry:
        return Geometry(nr_frames=self.frames, max_mms=6, max_vmas=32, max_anon_vmas=32, max_tasks=6,
                        va_pages=8192, nr_swap_slots=self.swap_slots)


def _knobs(k: Kernel, **kv: int) -> None:
    for name, v in kv.items():
        sysfs.store(k, name, str(v))


def _pfn_at(w: World, task: int, addr: int) -> int:
    pte = mmops.read_pte(w.kernel("setup"), w.task_mm(task), addr)
    if not pte & PTE_PRESENT:
        raise RuntimeError(f"set-up: no page at {addr:#x}")
    return pte & PTE_PFN_MASK


def _merged_task(w: World, k: Kernel, comm: str, npages: int, fill: int) -> tuple[int, int]:
    """A task with npages identical pages in a MADV_MERGEABLE area (not yet scanned)."""
    t = w.new_task(k, comm)
    a = w.mmap(k, t, npages, RW, ANON)
    w.write_pages(k, t, a, [fill] * npages)
    w.madvise(k, t, a, npages, MADV_MERGEABLE)
    w.addrs[comm] = a
    return t, a


def _merge(w: World, k: Kernel, sharing: int, stay_on: bool = False) -> None:
    """run=1 and two full ksmd passes (then run=0 unless stay_on); the set-up is wrong
    unless exactly `sharing` pages then share a KSM page."""
    _knobs(k, run=1)
    w.ksmd_passes(k, 2)
    if not stay_on:
        _knobs(k, run=0)
    got = int(k.ksm["pages_sharing"])
    if got != sharing:
        raise RuntimeError(f"set-up of {w.scenario.name}: pages_sharing {got}, expected {sharing}")


# -- seed 003 and CVE-2011-2183: an mm with no rmap_items exits under a scanning ksmd ---------------
def _exit_under_scan_setup(w: World, k: Kernel) -> None:
    _knobs(k, sleep_millisecs=0, pages_to_scan=4)
    t = w.new_task(k, "victim")
    a = w.mmap(k, t, 2, RW, ANON)            # mergeable but never touched: a slot, no rmap_items
    w.madvise(k, t, a, 2, MADV_MERGEABLE)
    _knobs(k, run=1)


def _exit_under_scan(w: World) -> list[Context]:
    t = w.tasks["victim"]
    return [Context("ksmd", ksmd_body(w, 3), service=True),
            Context("exit:victim", lambda k: w.exit(k, t), task=t)]


# -- seed 000: run=2 under memory pressure, the OOM victim's exit needs ksm_thread_mutex --------------
def _oom_setup(w: World, k: Kernel) -> None:
    _knobs(k, sleep_millisecs=0, pages_to_scan=64)
    _merged_task(w, k, "merger", 8, 0x4B)
    _merge(w, k, 7)
    hog = w.new_task(k, "hog")               # a KSM user too: its exit goes through __ksm_exit
    free = int(sum(int(z["nr_free"]) for z in w.km.zones))
    n = free - 2                            # run=2 needs 7 new pages: only the hog's exit has them
    a = w.mmap(k, hog, n, RW, ANON)
    w.write_pages(k, hog, a, [0x10 + i % 200 for i in range(n)])
    w.madvise(k, hog, a, n, MADV_MERGEABLE)


def _oom_contexts(w: World) -> list[Context]:
    hog = w.tasks["hog"]
    return [Context("ctl:run=2", lambda k: sysfs.store(k, "run", "2")),
            Context("hog", lambda k: w.park(k, hog), service=True, task=hog)]


# -- seeds 000+001: an mlockall() task with a PROT_NONE area exits ---------------------------------
def _munlock_setup(w: World, k: Kernel) -> None:
    _knobs(k, sleep_millisecs=0, pages_to_scan=16)
    t, _a = _merged_task(w, k, "locker", 4, 0x5A)
    w.mmap(k, t, 2, PROT_NONE, ANON)         # a guard area, never touched
    k.current_task = t
    for start, length, write in sys_mlockall(k, w.task_mm(t), MCL_CURRENT | MCL_FUTURE):
        mm_populate(k, w.task_mm(t), start, length, write)
    _merge(w, k, 3, stay_on=True)


def _munlock_contexts(w: World) -> list[Context]:
    t = w.tasks["locker"]
    return [Context("ksmd", ksmd_body(w, 2), service=True),
            Context("exit:locker", lambda k: w.exit(k, t), task=t)]


# -- seed 004: fork copies a KSM pte that no rmap_item knows, then reclaim unmaps the page ------------
def _rmap_setup(w: World, k: Kernel) -> None:
    _knobs(k, sleep_millisecs=0, pages_to_scan=16)
    _merged_task(w, k, "parent", 2, 0x33)
    _merge(w, k, 1)


def _rmap_contexts(w: World) -> list[Context]:
    p = w.tasks["parent"]
    kpfn = _pfn_at(w, p, w.addrs["parent"])
    return [Context("parent:fork", lambda k: w.fork(k, p) and None, task=p),
            Context("kswapd", lambda k: w.reclaim_pfn(k, kpfn) and None)]


# -- seed 002 cause 2: a fork during run=2 registers the child behind the unmerger's cursor ----------
def _enter_setup(w: World, k: Kernel) -> None:
    _knobs(k, sleep_millisecs=0, pages_to_scan=16)
    _merged_task(w, k, "q", 2, 0x73)
    _merged_task(w, k, "r", 2, 0x73)
    _merge(w, k, 3, stay_on=True)


def _enter_contexts(w: World) -> list[Context]:
    r = w.tasks["r"]
    return [Context("ctl:run=2", lambda k: sysfs.store(k, "run", "2")),
            Context("r:fork", lambda k: w.fork(k, r) and None, task=r)]


# -- seed 002 causes 1 and 3: a KSM page in the swap cache when run=2 comes ------------------------------
def _swapcache_setup(w: World, k: Kernel) -> None:
    _knobs(k, sleep_millisecs=0, pages_to_scan=16)
    q, a = _merged_task(w, k, "q", 2, 0x60)
    _merge(w, k, 1)
    kpfn = _pfn_at(w, q, a)
    res = shrink_page(k, kpfn, True, async_write=True)    # unmapped, written, still swap-cached
    if res == "freed":
        raise RuntimeError("set-up: the KSM page left the swap cache")
    w.addrs["q"] = a


def _swapin_contexts(w: World) -> list[Context]:
    q = w.tasks["q"]
    a = w.addrs["q"]
    return [Context("ctl:run=2", lambda k: sysfs.store(k, "run", "2")),
            Context("q:read", lambda k: w.access(k, w.task_mm(q), a, 2 * PAGE_SIZE, False) and None, task=q)]


def _old_nodes_contexts(w: World) -> list[Context]:
    return [Context("ctl:run=2", lambda k: sysfs.store(k, "run", "2"))]


# -- no seed: ksmd merging while one sharer exits, one writes, and reclaim takes the KSM page --------
def _mix_setup(w: World, k: Kernel) -> None:
    _knobs(k, sleep_millisecs=0, pages_to_scan=4)
    _merged_task(w, k, "a", 2, 0x21)
    _merged_task(w, k, "b", 2, 0x21)
    _merge(w, k, 3, stay_on=True)


def _mix_contexts(w: World) -> list[Context]:
    a, b = w.tasks["a"], w.tasks["b"]
    addr = w.addrs["b"]
    return [Context("ksmd", ksmd_body(w, 2), service=True),
            Context("exit:a", lambda k: w.exit(k, a), task=a),
            Context("b:write", lambda k: w.access(k, w.task_mm(b), addr, 1, True, 0x22), task=b)]


# -- no seed: reclaim unmaps a task's anonymous page while the task exits ---------------------------
def _reclaim_exit_setup(w: World, k: Kernel) -> None:
    t = w.new_task(k, "t")
    a = w.mmap(k, t, 2, RW, ANON)
    w.write_pages(k, t, a, [0x41, 0x42])
    w.addrs["t"] = a


def _reclaim_exit_contexts(w: World) -> list[Context]:
    t = w.tasks["t"]
    pfn = _pfn_at(w, t, w.addrs["t"])
    return [Context("kswapd", lambda k: w.reclaim_pfn(k, pfn) and None),
            Context("exit:t", lambda k: w.exit(k, t), task=t)]


# -- no seed: reclaim unmaps a page of an area whose vma mprotect splits ----------------------------
def _reclaim_split_setup(w: World, k: Kernel) -> None:
    t = w.new_task(k, "t")
    a = w.mmap(k, t, 3, RW, ANON)
    w.write_pages(k, t, a, [0x51, 0x52, 0x53])
    w.addrs["t"] = a


def _reclaim_split_contexts(w: World) -> list[Context]:
    t = w.tasks["t"]
    a = w.addrs["t"]
    pfn = _pfn_at(w, t, a + 2 * PAGE_SIZE)
    # mprotect of the middle page splits the vma twice; the page reclaimed is in the top part.
    return [Context("kswapd", lambda k: w.reclaim_pfn(k, pfn) and None),
            Context("t:mprotect", lambda k: sys_mprotect(k, w.task_mm(t), a + PAGE_SIZE, PAGE_SIZE,
                                                         PROT_READ) and None, task=t)]


# -- found in today's kernel: a fork while a KSM zero pte is broken (docs/bugs/zero-pages-fork.md) -----
def _zero_fork_setup(w: World, k: Kernel) -> None:
    _knobs(k, sleep_millisecs=0, pages_to_scan=16, use_zero_pages=1)
    t = w.new_task(k, "z")
    a = w.mmap(k, t, 2, RW, ANON)
    w.write_pages(k, t, a, [0, 0])
    w.madvise(k, t, a, 2, MADV_MERGEABLE)
    w.addrs["z"] = a
    _knobs(k, run=1)
    w.ksmd_passes(k, 2)
    _knobs(k, run=0)
    if int(k.ksm["ksm_zero_pages"]) != 2:
        raise RuntimeError(f"set-up of zero-pages-fork: ksm_zero_pages {int(k.ksm['ksm_zero_pages'])}, expected 2")


def _zero_fork_contexts(w: World) -> list[Context]:
    z = w.tasks["z"]
    addr = w.addrs["z"]
    return [Context("z:fork", lambda k: w.fork(k, z) and None, task=z),
            Context("z:write", lambda k: w.access(k, w.task_mm(z), addr, 1, True, 0x5A), task=z)]


SCENARIOS: dict[str, SimScenario] = {s.name: s for s in (
    SimScenario("mmput-race", "mmput-race",
                "seed 003: the owner of a registered mm with no rmap_items exits while ksmd walks it",
                _exit_under_scan_setup, _exit_under_scan),
    SimScenario("cve-2011-2183", "cve-2011-2183",
                "2b472611a32a: the last registered mm exits between ksmd's list_empty() and its cursor move",
                _exit_under_scan_setup, _exit_under_scan),
    SimScenario("oom-deadlock", "oom-deadlock",
                "seed 000: run=2 needs memory, the OOM victim is a KSM user whose exit needs ksm_thread_mutex",
                _oom_setup, _oom_contexts, frames=48),
    SimScenario("munlock-exit-hang", "munlock-exit-hang",
                "seeds 000+001: an mlockall() task with a PROT_NONE area exits",
                _munlock_setup, _munlock_contexts),
    SimScenario("rmap-no-anon-vma", "rmap-no-anon-vma",
                "seed 004: a fork maps a KSM page no rmap_item knows of; reclaim must unmap the child too",
                _rmap_setup, _rmap_contexts, swap_slots=16),
    SimScenario("stale-stable-nodes", "stale-stable-nodes:enter-behind-cursor",
                "seed 002 cause 2: a fork during run=2 registers the child behind the unmerger",
                _enter_setup, _enter_contexts),
    SimScenario("stale-stable-nodes-swapin", "stale-stable-nodes:swapin-no-copy",
                "seed 002 cause 3: a swap-in during run=2 maps the swap-cached KSM page again",
                _swapcache_setup, _swapin_contexts, swap_slots=16),
    SimScenario("ksm-mix", "",
                "no seed: one sharer of a KSM page exits and another writes to it while ksmd scans",
                _mix_setup, _mix_contexts, ci_bound=1),
    SimScenario("stale-stable-nodes-old-nodes", "stale-stable-nodes:old-nodes",
                "seed 002 cause 1: run=2 leaves the stable node of a swap-cached KSM page",
                _swapcache_setup, _old_nodes_contexts, swap_slots=16),
    SimScenario("reclaim-exit", "",
                "no seed: kswapd's anon rmap walk while the page's last mapper exits and frees the anon_vma",
                _reclaim_exit_setup, _reclaim_exit_contexts, swap_slots=16),
    SimScenario("reclaim-split", "",
                "no seed: kswapd's anon rmap walk while mprotect splits the page's vma",
                _reclaim_split_setup, _reclaim_split_contexts, swap_slots=16),
    SimScenario("zero-pages-fork", "",
                "found in today's kernel: a thread breaks a KSM zero pte while another forks",
                _zero_fork_setup, _zero_fork_contexts,
                finding=ZERO_PAGES_MISMATCH, fix="fix:zero-pages-fork"),
)}

# The variant each race-lab bug name selects in `ksmlab sim NAME --variant NAME`.
BUG_SCENARIO: dict[str, str] = {s.bug: s.name for s in SCENARIOS.values() if s.bug}
BUG_SCENARIO["stale-stable-nodes"] = "stale-stable-nodes"
