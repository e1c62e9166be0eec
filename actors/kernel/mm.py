# mm_struct, vmas, anon_vmas and page tables: the parts of mm/ that KSM leans on.
#
# Models mm/mmap.c (find_vma, vma split/insert/remove), kernel/fork.c's mm
# lifetime (mm_alloc, mmgrab/mmdrop; mmput lives in exit.py), and mm/rmap.c's
# anon_vma in its 2009 shape (one anon_vma per vma, a list of the vmas that share
# it, a ksm refcount; freed when both are empty), which is the layout seed 004
# walks. All pte changes happen under the mm's ptl, like the kernel's page table
# lock; vma list changes under mmap_lock held for write.
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from shared_mem.arena import NULL
from shared_mem.layout import (
    PAGE_SHIFT,
    PAGE_SIZE,
    PTRS_PER_PTE,
    VM_LOCKED,
)

if TYPE_CHECKING:
    from actors.kernel.context import Kernel

MMAP_MIN_ADDR = 0x10000


def task_size(k: Kernel) -> int:
    """TASK_SIZE: the top of every mm's user address space."""
    return k.km.geo.va_pages * PAGE_SIZE


def access_ok(k: Kernel, addr: int, length: int) -> bool:
    """access_ok(): [addr, addr + length) lies inside the user address space. A negative
    address is a huge unsigned one, so it is never inside."""
    return addr >= 0 and length >= 0 and addr + length <= task_size(k)
MMAP_BASE = 0x1000000


class VmaError(Exception):
    def __init__(self, errno_name: str, msg: str = "") -> None:
        super().__init__(f"{errno_name}: {msg}")
        self.errno_name = errno_name


# -- mm lifetime -------------------------------------------------------------------------
def mm_alloc(k: Kernel, owner: int = 0, nid: int = -1) -> int:
    km = k.km
    mm = km.mm.alloc(site="mm_alloc")
    i = km.mm.idx(mm, "mm_alloc")
    km.mm.users[i] = 1
    km.mm.count[i] = 1
    km.mm.owner[i] = owner
    km.mm.mmap_base[i] = MMAP_BASE
    km.mm.lock_idx[i] = i
    km.mm.nid[i] = nid
    km.pgd[i, :] = NULL
    # The owner's pid, so that a log shows an mm as the task it belongs to.
    pid = int(km.task.pid[km.task.idx(owner, "mm_alloc")]) if owner else 0
    k.ev("mm_alloc", mm=i, task_pid=pid)
    return mm


def mmgrab(k: Kernel, mm: int) -> None:
    i = k.km.mm.idx(mm, "mmgrab")
    k.km.mm.atomic("count").inc_return(i)


def mmdrop(k: Kernel, mm: int, site: str = "mmdrop") -> None:
    """Drop an mm_count reference; the last one frees the mm_struct."""
    km = k.km
    i = km.mm.idx(mm, site)
    c = km.mm.atomic("count").dec_return(i)
    k.ev("mmdrop", mm=i, mm_count=c, site=site)
    if c == 0:
        __mmdrop(k, mm)
    elif c < 0:
        raise RuntimeError(f"BUG: mm_count underflow on mm {i} in {site}")


def __mmdrop(k: Kernel, mm: int) -> None:
    km = k.km
    i = km.mm.idx(mm, "__mmdrop")
    if km.mm.pgtables[i]:
        k.ev("bad_mm_state", mm=i, pgtables=int(km.mm.pgtables[i]))
    km.pgd[i, :] = NULL
    km.mm.free(mm, site="__mmdrop")
    k.ev("mm_free", mm=i)


def ksm_test_exit(k: Kernel, mm: int) -> bool:
    """mm_users == 0: the mm is exiting, KSM must back off its page tables."""
    i = k.km.mm.idx(mm, "ksm_test_exit")
    return k.km.mm.atomic("users").read(i) == 0


# -- vmas --------------------------------------------------------------------------------
def vmas(k: Kernel, mm: int):
    """Iterate the mm's vma handles in address order (caller holds mmap_lock)."""
    km = k.km
    v = km.mm.mmap[km.mm.idx(mm, "vma_iter")]
    while v:
        yield int(v)
        v = km.vma.next[km.vma.idx(v, "vma_iter")]


def find_vma(k: Kernel, mm: int, addr: int) -> int:
    """First vma with end > addr, or NULL (the vmas() walk, written out: a hot path)."""
    km = k.km
    vma = km.vma
    vend, vnext = vma.end, vma.next
    v = int(km.mm.mmap[km.mm.idx(mm, "find_vma")])
    while v:
        vi = vma.idx(v, "find_vma")
        if vend[vi] > addr:
            return v
        v = int(vnext[vi])
    return NULL


def vma_lookup(k: Kernel, mm: int, addr: int) -> int:
    v = find_vma(k, mm, addr)
    if v and k.km.vma.start[k.km.vma.idx(v, "vma_lookup")] <= addr:
        return v
    return NULL


def _link_vma(k: Kernel, mm: int, new: int) -> None:
    km = k.km
    mi = km.mm.idx(mm, "vma_link")
    ni = km.vma.idx(new, "vma_link")
    start = km.vma.start[ni]
    prev = NULL
    for v in vmas(k, mm):
        if km.vma.start[km.vma.idx(v, "vma_link")] > start:
            break
        prev = v
    if prev:
        pi = km.vma.idx(prev, "vma_link")
        km.vma.next[ni] = km.vma.next[pi]
        km.vma.next[pi] = new
    else:
        km.vma.next[ni] = km.mm.mmap[mi]
        km.mm.mmap[mi] = new
    km.mm.map_count[mi] += 1


def _unlink_vma(k: Kernel, mm: int, vma: int) -> None:
    km = k.km
    mi = km.mm.idx(mm, "vma_unlink")
    prev = NULL
    for v in vmas(k, mm):
        if v == vma:
            nxt = km.vma.next[km.vma.idx(v, "vma_unlink")]
            if prev:
                km.vma.next[km.vma.idx(prev, "vma_unlink")] = nxt
            else:
                km.mm.mmap[mi] = nxt
            km.mm.map_count[mi] -= 1
            return
        prev = v
    raise RuntimeError("vma not on mm list")


def vma_new(k: Kernel, mm: int, start: int, end: int, flags: int, pgoff: int, nid: int = -1) -> int:
    km = k.km
    v = km.vma.alloc(site="vm_area_alloc")
    vi = km.vma.idx(v, "vm_area_alloc")
    km.vma.nid[vi] = nid
    km.vma.mm[vi] = mm
    km.vma.start[vi] = start
    km.vma.end[vi] = end
    km.vma.flags[vi] = flags
    km.vma.pgoff[vi] = pgoff
    _link_vma(k, mm, v)
    return v


def anon_vma_link(k: Kernel, av: int, vma: int) -> None:
    km = k.km
    ai = km.anon_vma.idx(av, "anon_vma_link")
    vi = km.vma.idx(vma, "anon_vma_link")
    with k.anon_vma_lock(av).write():
        km.vma.anon_vma[vi] = av
        km.vma.anon_next[vi] = km.anon_vma.head[ai]
        km.anon_vma.head[ai] = vma
        km.anon_vma.nr_vmas[ai] += 1


def anon_vma_unlink(k: Kernel, vma: int) -> None:
    """Take the vma off its anon_vma's list; free the anon_vma when nothing holds it."""
    km = k.km
    vi = km.vma.idx(vma, "anon_vma_unlink")
    av = int(km.vma.anon_vma[vi])
    if not av:
        return
    ai = km.anon_vma.idx(av, "anon_vma_unlink")
    with k.anon_vma_lock(av).write():
        prev = NULL
        cur = int(km.anon_vma.head[ai])
        while cur:
            nxt = int(km.vma.anon_next[km.vma.idx(cur, "anon_vma_unlink")])
            if cur == vma:
                if prev:
                    km.vma.anon_next[km.vma.idx(prev, "anon_vma_unlink")] = nxt
                else:
                    km.anon_vma.head[ai] = nxt
                km.anon_vma.nr_vmas[ai] -= 1
                break
            prev, cur = cur, nxt
        km.vma.anon_vma[vi] = NULL
        empty = km.anon_vma.nr_vmas[ai] == 0 and km.anon_vma.atomic("refcount").read(ai) == 0
    if empty:
        km.anon_vma.free(av, site="anon_vma_free")


def get_anon_vma(k: Kernel, av: int) -> None:
    """hold_anon_vma(): the ksm reference of seed 004."""
    k.km.anon_vma.atomic("refcount").inc_return(k.km.anon_vma.idx(av, "hold_anon_vma"))


def put_anon_vma(k: Kernel, av: int) -> None:
    """drop_anon_vma(): free when the count and the vma list are both empty."""
    km = k.km
    ai = km.anon_vma.idx(av, "drop_anon_vma")
    with k.anon_vma_lock(av).write():
        c = km.anon_vma.atomic("refcount").dec_return(ai)
        empty = c == 0 and km.anon_vma.nr_vmas[ai] == 0
    if empty:
        km.anon_vma.free(av, site="drop_anon_vma")


def anon_vma_prepare(k: Kernel, vma: int) -> int:
    """Give the vma an anon_vma before its first anonymous page (under mmap_lock)."""
    km = k.km
    vi = km.vma.idx(vma, "anon_vma_prepare")
    av = int(km.vma.anon_vma[vi])
    if av:
        return av
    mm = int(km.vma.mm[vi])
    with k.ptl(mm):
        av = int(km.vma.anon_vma[vi])
        if av:
            return av
        av = km.anon_vma.alloc(site="anon_vma_alloc")
        ai = km.anon_vma.idx(av, "anon_vma_prepare")
        km.anon_vma.root[ai] = av
        km.anon_vma.lock_idx[ai] = ai
    anon_vma_link(k, av, vma)
    return av


def vma_split(k: Kernel, mm: int, vma: int, addr: int) -> int:
    """__split_vma(): split at addr; returns the new upper vma. Caller holds mmap write lock.

    In the kernel's order: the new vma joins the anon_vma (anon_vma_clone) while the old
    one still covers [addr, end), and only then, under the anon_vma's write lock
    (vma_prepare), does the old one shrink. An rmap walk, which holds the anon_vma for
    read, so finds every page of the range in one vma or the other (perhaps in both for
    a moment), never in neither: reclaim would otherwise miss the ptes of [addr, end)."""
    km = k.km
    vi = km.vma.idx(vma, "split_vma")
    start, end = int(km.vma.start[vi]), int(km.vma.end[vi])
    if not start < addr < end:
        raise ValueError("split outside vma")
    pgoff = int(km.vma.pgoff[vi]) + ((addr - start) >> PAGE_SHIFT)
    new = vma_new(k, mm, addr, end, int(km.vma.flags[vi]), pgoff, int(km.vma.nid[vi]))
    av = int(km.vma.anon_vma[vi])
    if av:
        anon_vma_link(k, av, new)
        with k.anon_vma_lock(av).write():
            km.vma.end[vi] = addr
    else:
        km.vma.end[vi] = addr
    return new


def vma_remove(k: Kernel, mm: int, vma: int) -> None:
    _unlink_vma(k, mm, vma)
    anon_vma_unlink(k, vma)
    k.km.vma.free(vma, site="remove_vma")


def split_range(k: Kernel, mm: int, start: int, end: int) -> list[int]:
    """Split vmas so that [start, end) is covered by whole vmas; return them in order.

    Raises VmaError('ENOMEM') if part of the range is unmapped, after splitting the rest
    (callers that must process mapped parts first use walk_range instead).
    """
    km = k.km
    out = []
    for v in list(vmas(k, mm)):
        vi = km.vma.idx(v, "vma_modify")
        vs, ve = int(km.vma.start[vi]), int(km.vma.end[vi])
        if ve <= start or vs >= end:
            continue
        if vs < start:
            v = vma_split(k, mm, v, start)
            vs = start
        if ve > end:
            vma_split(k, mm, v, end)
        out.append(v)
    return out


def range_has_gaps(k: Kernel, mm: int, start: int, end: int) -> bool:
    km = k.km
    cur = start
    for v in vmas(k, mm):
        vi = km.vma.idx(v, "range_has_gaps")
        vs, ve = int(km.vma.start[vi]), int(km.vma.end[vi])
        if ve <= cur:
            continue
        if vs > cur:
            return True
        cur = ve
        if cur >= end:
            return False
    return cur < end


def get_unmapped_area(k: Kernel, mm: int, length: int) -> int:
    km = k.km
    mi = km.mm.idx(mm, "get_unmapped_area")
    limit = km.geo.va_pages * PAGE_SIZE
    cur = int(km.mm.mmap_base[mi])
    for v in vmas(k, mm):
        vi = km.vma.idx(v, "get_unmapped_area")
        vs, ve = int(km.vma.start[vi]), int(km.vma.end[vi])
        if ve <= cur:
            continue
        if vs - cur >= length:
            break
        cur = max(cur, ve)
    if cur + length > limit:
        raise VmaError("ENOMEM", "address space exhausted")
    return cur


def linear_page_index(k: Kernel, vma: int, addr: int) -> int:
    vi = k.km.vma.idx(vma, "linear_page_index")
    return int(k.km.vma.pgoff[vi]) + ((addr - int(k.km.vma.start[vi])) >> PAGE_SHIFT)


def vma_is_locked(k: Kernel, vma: int) -> bool:
    return bool(k.km.vma.flags[k.km.vma.idx(vma, "vma_is_locked")] & VM_LOCKED)


# -- page tables -------------------------------------------------------------------------
def pte_table(k: Kernel, mm: int, addr: int, alloc: bool = False) -> tuple[np.ndarray | None, int]:
    """The pte array covering addr and the index in it (caller holds ptl if alloc)."""
    km = k.km
    mi = km.mm.idx(mm, "pte_offset")
    vpn = addr >> PAGE_SHIFT
    pgi = vpn // PTRS_PER_PTE
    if pgi >= km.geo.pgd_entries:
        return None, 0
    pt = int(km.pgd[mi, pgi])
    if not pt:
        if not alloc:
            return None, 0
        pt = km.ptable.alloc(site="pte_alloc")
        km.pgd[mi, pgi] = pt
        km.mm.pgtables[mi] += 1
    return km.ptable.pte[km.ptable.idx(pt, "pte_offset")], vpn % PTRS_PER_PTE


def read_pte(k: Kernel, mm: int, addr: int) -> int:
    """The pte at addr, 0 when there is no page table (pte_table() without the row view)."""
    km = k.km
    vpn = addr >> PAGE_SHIFT
    pgi = vpn // PTRS_PER_PTE
    pgd = km.pgd
    if pgi >= pgd.shape[1]:
        return 0
    pt = int(pgd[km.mm.idx(mm, "pte_offset"), pgi])
    if not pt:
        return 0
    return int(km.ptable.pte[km.ptable.idx(pt, "pte_offset"), vpn % PTRS_PER_PTE])


def pte_ranges(k: Kernel, mm: int, start: int, end: int, alloc: bool = False):
    """Yield (address, pte array view) chunks covering [start, end) page by page table."""
    addr = start
    while addr < end:
        ptes, i = pte_table(k, mm, addr, alloc)
        span_end = min(end, ((addr >> PAGE_SHIFT) // PTRS_PER_PTE + 1) * PTRS_PER_PTE * PAGE_SIZE)
        n = (span_end - addr) >> PAGE_SHIFT
        yield addr, (None if ptes is None else ptes[i:i + n]), n
        addr = span_end


def free_pgtables(k: Kernel, mm: int) -> None:
    km = k.km
    mi = km.mm.idx(mm, "free_pgtables")
    row = km.pgd[mi]
    for pgi in np.flatnonzero(row):
        pt = int(row[pgi])
        if km.ptable.pte[km.ptable.idx(pt, "free_pgtables")].any():
            k.ev("bad_pgtable", mm=mi, pgi=int(pgi))
        km.ptable.free(pt, site="free_pgtables")
        row[pgi] = NULL
        km.mm.pgtables[mi] -= 1
