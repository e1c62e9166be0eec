# Probes, on the running kernel, of races that ksmlab's model found in today's mm/ksm.c.
#
# A finding of the model is only a finding about Linux once the real kernel shows it. Each
# probe here drives the real /sys/kernel/mm/ksm with the interleaving the simulator printed
# (`./run.sh sim NAME`), opened wide by a workload rather than by a debugger, and returns
# what it measured; it saves and restores every knob (KsmKnobs) and reaps every child.
#
# zero_pages_fork (docs/bugs/zero-pages-fork.md): dup_mm() copies the parent's
# mm->ksm_zero_pages with its memcpy before dup_mmap() takes the parent's mmap_lock, and
# copy_present_pte() never counts the KSM zero ptes it copies. A second thread of the
# parent that breaks KSM zero ptes (each write fault on one decrements the parent's
# counter) between the two leaves the child counting zero pages it does not map. The
# probe's writer is a numpy store over every page, run in a thread with the GIL released,
# so it faults while the main thread forks; each child unmerges its whole area, after which
# its /proc/self/ksm_stat must read ksm_zero_pages 0, and reports what it reads.
#
# The probe has a cost on the kernel it proves the race on: ksm_fork() adds the child's
# inherited count to the global ksm_zero_pages, so every excess stays in the global counter
# until reboot (run=2 does not clear it). It therefore stops at the first child that shows
# the race unless asked for more, and ksmlab.realkernel subtracts that residue from the
# counters of its later runs.
from __future__ import annotations

import mmap
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ksmlab.realkernel import (
    KSM_SYSFS,
    KsmError,
    KsmKnobs,
    ksm_available,
    read_counters,
    read_ksm_stat,
)

_MADV_MERGEABLE = getattr(mmap, "MADV_MERGEABLE", 12)
_MADV_UNMERGEABLE = getattr(mmap, "MADV_UNMERGEABLE", 13)


@dataclass
class ZeroForkResult:
    forks: int = 0                     # children forked while the writer broke zero ptes
    miscounted: list[int] = field(default_factory=list)   # each such child's count after unmerge
    merged_before: int = 0             # the parent's ksm_zero_pages when the forks began
    global_before: int = 0             # /sys/kernel/mm/ksm/ksm_zero_pages before and after
    global_after: int = 0
    seconds: float = 0.0

    @property
    def leaked(self) -> int:
        return self.global_after - self.global_before


def _own_zero_pages() -> int:
    return int(read_ksm_stat(os.getpid()).get("ksm_zero_pages", 0))


def zero_pages_fork(npages: int = 2048, max_forks: int = 2000, stop_after: int = 1,
                    timeout: float = 60.0, root: Path = KSM_SYSFS) -> ZeroForkResult:
    """Fork up to ``max_forks`` times while a thread breaks KSM zero ptes; stop after
    ``stop_after`` children show a nonzero ksm_zero_pages once their area is unmerged."""
    if npages < 1 or max_forks < 1 or stop_after < 1:
        raise ValueError("npages, max_forks and stop_after must be at least 1")
    if not ksm_available(root):
        raise KsmError(f"{root}/run is not writable")
    t0 = time.monotonic()
    deadline = t0 + timeout
    res = ZeroForkResult()
    size = npages * mmap.PAGESIZE
    with KsmKnobs(root) as knobs:
        knobs.set("run", 2)
        if "advisor_mode" in knobs.saved:
            knobs.set("advisor_mode", "none")
        knobs.set("use_zero_pages", 1)
        knobs.set("pages_to_scan", max(100, 2 * npages))
        knobs.set("sleep_millisecs", 0)
        res.global_before = read_counters(root).get("ksm_zero_pages", 0)
        area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        pages = np.frombuffer(area, dtype=np.uint8).reshape(npages, mmap.PAGESIZE)
        stop = threading.Event()
        writer = threading.Thread(target=_break_zero_ptes, args=(pages, stop), daemon=True)
        try:
            pages[:, :] = 0                       # every page present, all of it zero
            area.madvise(_MADV_MERGEABLE)
            knobs.set("run", 1)
            while _own_zero_pages() < npages // 2:
                if time.monotonic() > deadline:
                    raise KsmError("ksmd merged too few zero pages before the timeout")
                time.sleep(0.01)
            res.merged_before = _own_zero_pages()
            writer.start()
            while res.forks < max_forks and len(res.miscounted) < stop_after and time.monotonic() < deadline:
                got = _fork_and_count(area)
                res.forks += 1
                if got:
                    res.miscounted.append(got)
        finally:
            stop.set()
            if writer.is_alive():
                writer.join()
            del pages
            area.close()
            knobs.set("run", 2)
            res.global_after = read_counters(root).get("ksm_zero_pages", 0)
    res.seconds = time.monotonic() - t0
    return res


def _break_zero_ptes(pages: np.ndarray, stop: threading.Event) -> None:
    """Write a zero into the first byte of every page, over and over: on a KSM zero pte
    each store is a write fault that replaces it (numpy runs the loop without the GIL)."""
    col = pages[:, 0]
    while not stop.is_set():
        col[:] = 0


def _fork_and_count(area: mmap.mmap) -> int:
    """One fork; the child unmerges the area and sends back its ksm_zero_pages."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                  # the child: no Python beyond the minimum
        try:
            os.close(r)
            area.madvise(_MADV_UNMERGEABLE)
            os.write(w, str(_own_zero_pages()).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            text = f.read()
    finally:
        os.waitpid(pid, 0)
    if not text:
        raise KsmError("a probe child died before it reported its count")
    return int(text)
