# Physical memory: the page-frame allocator over the shared frames.
#
# One free stack of frame numbers per NUMA node (a zone), under zone_lock[nid],
# standing in for the buddy allocator. Frame 0 is the zero page (PG_reserved),
# never freed. alloc_page() returning None is what sends the caller to the OOM
# killer; the allocator itself never blocks.
from __future__ import annotations

from typing import Any

import numpy as np

from shared_mem.layout import PG_FREE, PG_RESERVED, PG_UPTODATE, KernelMemory

ZERO_PFN = 0


def boot_init(km: KernelMemory) -> None:
    """Creator only: every frame free except the zero page."""
    geo = km.geo
    n = geo.nr_frames
    km.page[:] = 0
    km.page["flags"] = PG_FREE
    km.page["nid"] = np.arange(n) * geo.nr_nodes // n
    km.page["flags"][ZERO_PFN] = PG_RESERVED | PG_UPTODATE
    km.page["refcount"][ZERO_PFN] = 1
    km.frames[ZERO_PFN] = 0
    for nid in range(geo.nr_nodes):
        pfns = np.flatnonzero(km.page["nid"] == nid)
        pfns = pfns[pfns != ZERO_PFN]
        z = km.zones[nid]
        z["first"], z["last"] = int(pfns[0]), int(pfns[-1])
        # Stack grows down from 'first' slot: pop gives the lowest pfn first.
        km.free_frames[z["first"]: z["first"] + len(pfns)] = pfns[::-1]
        z["free_top"] = len(pfns)
        z["nr_free"] = len(pfns)
        z["low_watermark"] = max(2, len(pfns) // 32)
        z["high_watermark"] = max(4, len(pfns) // 16)
    km.ksm["zero_pfn"] = ZERO_PFN


class FrameAllocator:
    """alloc_pages()/free_pages() for one attached KernelMemory."""

    def __init__(self, km: KernelMemory, locks: Any) -> None:
        self.km = km
        self.zone_locks = [locks.get("zone_lock", nid) for nid in range(km.geo.nr_nodes)]
        self.nr_nodes = km.geo.nr_nodes
        self._flags = km.page["flags"]
        self._ref = km.page["refcount"]
        self._gen = km.page["gen"]
        # check_new_page() reports through this (pfn, flags, refcount, mapcount) hook.
        self.on_bad_page: Any = None

    def alloc(self, nid: int = -1, strict: bool = False) -> int | None:
        """One frame (contents undefined, refcount 1); None when memory is exhausted.

        nid < 0 means any node (local first is node 0). strict confines to nid (MPOL_BIND).
        """
        order = [nid] if strict and nid >= 0 else self._fallback(nid)
        for n in order:
            pfn = self._pop(n)
            if pfn is not None:
                return pfn
        return None

    def _fallback(self, nid: int) -> list[int]:
        start = nid if nid >= 0 else 0
        return [(start + i) % self.nr_nodes for i in range(self.nr_nodes)]

    def _pop(self, nid: int) -> int | None:
        z = self.km.zones[nid]
        lock = self.zone_locks[nid]
        bad: list[tuple[int, int, int, int]] = []
        lock.lock()
        try:
            while True:
                top = int(z["free_top"])
                if top == 0:
                    return None
                pfn = int(self.km.free_frames[int(z["first"]) + top - 1])
                z["free_top"] = top - 1
                z["nr_free"] = top - 1
                # check_new_page(): a free frame is exactly PG_FREE with no references;
                # one that is not is reported and dropped (leaked), and we take the next.
                f, r, m = int(self._flags[pfn]), int(self._ref[pfn]), int(self.km.page["mapcount"][pfn])
                if f == PG_FREE and r == 0 and m == 0:
                    break
                bad.append((pfn, f, r, m))
            self._flags[pfn] = 0
            self._ref[pfn] = 1
            self.km.page["mapcount"][pfn] = 0
            self.km.page["mapping"][pfn] = 0
            self.km.page["index"][pfn] = 0
            self.km.page["private"][pfn] = 0
            self.km.page["ksm_swpin_ns"][pfn] = 0
        finally:
            lock.unlock()
            if bad and self.on_bad_page is not None:
                for b in bad:
                    self.on_bad_page(*b)
        return pfn

    def free(self, pfn: int) -> None:
        """__free_pages(): the frame goes back to its node's free list."""
        self._check_free(pfn)
        self._push_free(int(self.km.page["nid"][pfn]), [pfn])

    def free_many(self, pfns: list[int]) -> None:
        """free() of each frame in turn, under one hold of each zone's lock: the free
        lists end as that many free() calls leave them. A frame that must not be freed
        (or one given twice) is refused before any is freed."""
        by_nid: dict[int, list[int]] = {}
        for pfn in pfns:
            self._check_free(pfn)
            by_nid.setdefault(int(self.km.page["nid"][pfn]), []).append(pfn)
        if len(set(pfns)) != len(pfns):
            raise RuntimeError("BUG: Bad page state: a frame freed twice in one free_many()")
        for nid, group in by_nid.items():
            self._push_free(nid, group)

    def _check_free(self, pfn: int) -> None:
        if self._flags[pfn] & (PG_FREE | PG_RESERVED):
            raise RuntimeError(f"BUG: Bad page state: freeing pfn {pfn} with flags {int(self._flags[pfn]):#x}")

    def _push_free(self, nid: int, pfns: list[int]) -> None:
        """The frames (of node nid, checked) go on its free list, in order."""
        z = self.km.zones[nid]
        lock = self.zone_locks[nid]
        lock.lock()
        try:
            # element by element: free() of one frame, on every munmap, exit and COW,
            # must not pay numpy's fancy-indexing for a list of one
            flags, gen, stack = self._flags, self._gen, self.km.free_frames
            top = int(z["free_top"])
            first = int(z["first"]) + top
            for n, pfn in enumerate(pfns):
                flags[pfn] = PG_FREE
                gen[pfn] += 1
                stack[first + n] = pfn
            z["free_top"] = top + len(pfns)
            z["nr_free"] = top + len(pfns)
        finally:
            lock.unlock()

    def nr_free(self, nid: int = -1) -> int:
        if nid >= 0:
            return int(self.km.zones[nid]["nr_free"])
        return int(self.km.zones["nr_free"].sum())
