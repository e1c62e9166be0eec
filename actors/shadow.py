# The integrity shadow of a task: what it stored, so that every load can be checked.
#
# Not kernel logic: a checker beside the model, like a test's expected values. A task
# keeps a private copy of every byte it stored, page by page (zeros where it stored
# nothing); munmap, MAP_FIXED and MADV_DONTNEED drop the pages they discard. Each load
# is compared with it (check_read), and `verify` compares every mapped page as the
# kernel holds it (frame, swap cache or swap slot) without faulting anything. Merging,
# COW, unmerge and swap must be invisible to the task: a difference is an "integrity"
# report with the pte and the page dump. A fork hands the parent's shadow to the child
# through a file (save/load), read once by the child's process at start.
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from actors.kernel import debug
from actors.kernel import mm as mmops
from actors.kernel.context import Kernel
from shared_mem.layout import PAGE_SIZE, PTE_PFN_MASK, PTE_PRESENT, PTE_SPECIAL, PTE_SWAP

Report = Callable[[str, str, str, Any], None]   # (kind, title, text, data)


def shadow_path(run_dir: str, pid: int) -> str:
    return os.path.join(run_dir, "shadow", f"{pid}.npz")


class Shadow:
    """The bytes one task stored, by page address; `on` False keeps nothing."""

    def __init__(self, on: bool = True) -> None:
        self.on = on
        self.pages: dict[int, np.ndarray] = {}
        self._seen: set[int] = set()     # pages already reported by check_read

    # -- fork: parent to child -----------------------------------------------------------------
    def save(self, path: str) -> None:
        if self.on:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            np.savez(path, **{str(a): v for a, v in self.pages.items()})

    def load(self, path: str) -> None:
        if self.on and os.path.exists(path):
            with np.load(path) as z:
                self.pages = {int(a): z[a].copy() for a in z.files}
            os.unlink(path)

    # -- stores and discards -------------------------------------------------------------------
    def store(self, addr: int, data: Any, length: int) -> None:
        """The task stored `length` bytes of data (uint8 array or an int fill) at addr."""
        if not self.on:
            return
        off = 0
        while off < length:
            a = addr + off
            page = a & ~(PAGE_SIZE - 1)
            po = a - page
            n = min(PAGE_SIZE - po, length - off)
            buf = self.pages.get(page)
            if buf is None:
                buf = self.pages[page] = np.zeros(PAGE_SIZE, dtype=np.uint8)
            if isinstance(data, int):
                buf[po:po + n] = data
            else:
                buf[po:po + n] = data[off:off + n]
            off += n

    def drop(self, start: int, end: int) -> None:
        for a in [a for a in self.pages if start <= a < end]:
            del self.pages[a]

    # -- checks --------------------------------------------------------------------------------
    def check_read(self, k: Kernel, mm: int, pid: int, addr: int, got: np.ndarray,
                   report: Report) -> None:
        """Compare the bytes a user load returned with the shadow (zeros where the task
        stored nothing); a difference is an integrity report, whatever the caller does."""
        if not self.on:
            return
        off, n = 0, len(got)
        shadow = self.pages
        while off < n:
            a = addr + off
            page = a & ~(PAGE_SIZE - 1)
            po = a - page
            m = min(PAGE_SIZE - po, n - off)
            want = shadow.get(page)
            g = got[off:off + m]
            if g.any() if want is None else not np.array_equal(g, want[po:po + m]):
                self._integrity_report(k, mm, pid, page, po, g,
                                       None if want is None else want[po:po + m], n, report)
            off += m

    def _integrity_report(self, k: Kernel, mm: int, pid: int, page: int, po: int, got: np.ndarray,
                          want: np.ndarray | None, n: int, report: Report) -> None:
        seen = self._seen
        if page in seen or len(seen) >= 32:
            return
        if debug.vma_is_shared(k, mm, page):
            return      # MAP_SHARED: another process may have stored there
        seen.add(page)
        i = int(np.flatnonzero(got != (0 if want is None else want))[0])
        w, g = int(0 if want is None else want[i]), int(got[i])
        at = page + po + i
        with k.ptl(mm):
            pte = mmops.read_pte(k, mm, page)
        title = (f"ksmlab: integrity: task-{pid} read {n:#x} bytes at {at:#x}: "
                 f"expected {w:#04x}, got {g:#04x}")
        lines = [title, f"pte: {pte:016x}"]
        data: dict[str, Any] = {"task": pid, "addr": at, "expected": w, "got": g, "pte": pte,
                                "how": "read"}
        if pte & PTE_PRESENT and not pte & PTE_SPECIAL:
            pfn = pte & PTE_PFN_MASK
            lines += debug.dump_page(k, pfn, "user load returned bytes the task never stored")
            data.update(debug.page_data(k, pfn))
        elif pte & PTE_PRESENT:
            lines.append("the zero page")
        lines.append(f"bytes differ from offset {po + i} of the page; the task stored "
                     f"{'nothing' if want is None else 'other bytes'} there")
        report("integrity", title, "\n".join(lines) + "\n", data)

    def verify(self, k: Kernel, mm: int, pid: int, report: Report) -> dict:
        """Every page reads back exactly what this task wrote (zeros where it wrote nothing)."""
        lock = k.mmap_lock(mm, "verify")
        lock.down_read()
        bad = []
        checked = 0
        try:
            with k.ptl(mm):
                for addr, pte, _f in _mapped_pages(k, mm):
                    want = self.pages.get(addr)
                    got = _page_bytes(k, pte)
                    ok = not got.any() if want is None else np.array_equal(got, want)
                    checked += 1
                    if not ok and len(bad) < 16:
                        i = int(np.flatnonzero(got != (want if want is not None else 0))[0])
                        bad.append({"addr": addr, "offset": i, "pte": pte,
                                    "want": int(0 if want is None else want[i]), "got": int(got[i])})
        finally:
            lock.up_read()
        if bad:
            b0 = bad[0]
            title = (f"ksmlab: integrity: task-{pid} verify at {b0['addr'] + b0['offset']:#x}: "
                     f"expected {b0['want']:#04x}, got {b0['got']:#04x} ({len(bad)} page(s) differ)")
            text = title + "\n" + "\n".join(
                f"  addr {b['addr']:#x}+{b['offset']}: wrote {b['want']:#04x}, reads {b['got']:#04x} (pte {b['pte']:#x})"
                for b in bad) + "\n"
            report("integrity", title, text, {"task": pid, "bad": bad, "how": "verify"})
        return {"checked": checked, "bad": bad}


def _mapped_pages(k: Kernel, mm: int) -> list[tuple[int, int, int]]:
    """(address, pte, vm_flags) of every page of every vma (kernel view, no faults)."""
    km = k.km
    out = []
    for vma in mmops.vmas(k, mm):
        vi = km.vma.idx(vma, "pagemap_read")
        s, e, f = int(km.vma.start[vi]), int(km.vma.end[vi]), int(km.vma.flags[vi])
        for a, ptes, n in mmops.pte_ranges(k, mm, s, e):
            for j in range(n):
                out.append((a + j * PAGE_SIZE, 0 if ptes is None else int(ptes[j]), f))
    return out


def _page_bytes(k: Kernel, pte: int) -> np.ndarray:
    km = k.km
    if pte & PTE_PRESENT:
        return km.frames[pte & PTE_PFN_MASK]
    if pte & PTE_SWAP and km.swap is not None:
        slot = pte & PTE_PFN_MASK
        cached = int(km.swap_cache[slot]) - 1  # still in the swap cache?
        return km.frames[cached] if cached >= 0 else km.swap[slot]
    return np.zeros(PAGE_SIZE, dtype=np.uint8)
