# fork(): dup_mmap() and ksm_fork().
#
# The child gets a copy of every vma and pte: anonymous pages become shared
# copy-on-write (both ptes write-protected, mapcount and refcount raised), KSM
# pages are simply mapped once more, and each child vma joins its parent vma's
# anon_vma (the 2009 layout of seed 004), which is how try_to_unmap_ksm's
# search_new_forks pass finds the child's ptes of a KSM page before ksmd has
# given the child any rmap_item. ksm_fork() registers the child with KSM when
# the parent is mergeable, with its KSM counters starting at zero.
#
# Task records. alloc_task() is the one place a task record is made (dup_task_struct
# and alloc_pid): the identity (pid, parent, comm, node), nothing runnable yet.
# copy_process() is fork() around dup_mmap(): the parent's comm, node and oom_score_adj,
# the child's mm, and only then TASK_RUNNING, so the OOM killer never picks a child
# without an address space; a dup_mmap() that fails frees the record and the error goes
# on. new_task() is the other way a user process comes to be, an empty address space as
# after execve() (the supervisor's spawn_task). Starting the child's process and copying
# what the parent's shell keeps (its integrity shadow) is the caller's business.
from __future__ import annotations

import numpy as np

from actors.kernel import debug, ksm_mm, swap
from actors.kernel import mm as mmops
from actors.kernel.context import Kernel
from actors.kernel.memory import is_ksm_zero_pte
from actors.kernel.syscalls import SyscallError
from shared_mem.arena import OutOfObjects
from shared_mem.layout import (
    MMF_VM_MERGE_ANY,
    PAGE_SHIFT,
    PF_EXITING,
    PTE_PFN_MASK,
    PTE_PRESENT,
    PTE_SPECIAL,
    PTE_SWAP,
    PTE_WRITE,
    TASK_RUNNING,
    VM_LOCKED,
    VM_SHARED,
    KernelMemory,
)

TASK_COMM_LEN = 16


def alloc_task(k: Kernel, comm: str | bytes, nid: int, parent: int = 0,
               site: str = "copy_process") -> int:
    """A new task record with a fresh pid, not yet running (state TASK_FREE, no mm).
    site: the allocation site a later use-after-free report names."""
    t = k.km.task
    h = t.alloc(site=site)
    i = t.idx(h, site)
    t.pid[i] = k.alloc_pid()
    t.parent[i] = parent
    t.comm[i] = (comm.encode() if isinstance(comm, str) else bytes(comm))[:TASK_COMM_LEN]
    t.nid[i] = nid
    return h


def task_pid_nr(k: Kernel, task: int, site: str = "task_pid_nr") -> int:
    return int(k.km.task.pid[k.km.task.idx(task, site)])


def live_task(km: KernelMemory, task: int) -> tuple[int, int] | None:
    """(pid, mm) of the task record `task` names, or None if it names no live task: for
    handles that came from outside, which must not make a use-after-free report."""
    pid, mm = km.task.peek(task, "pid"), km.task.peek(task, "mm")
    return None if pid is None or mm is None else (pid, mm)


def task_running(km: KernelMemory, task: int) -> bool:
    """The task record `task` names is live and not in do_exit (read without a checked
    access, as live_task: for the supervisor's view of tasks it does not run)."""
    flags = km.task.peek(task, "flags")
    return flags is not None and not int(flags) & PF_EXITING


def copy_process(k: Kernel, parent: int) -> int:
    """fork(): a copy of the parent task with a copy of its mm; returns the child's handle.
    A full task table is EAGAIN (the kernel's max_threads), no mm record left ENOMEM; both
    are refused before anything is changed."""
    t = k.km.task
    pi = t.idx(parent, "fork")
    try:
        child = alloc_task(k, t.comm[pi], int(t.nid[pi]), parent)
    except OutOfObjects:
        raise SyscallError("EAGAIN", f"fork: task table full (max_tasks {k.km.geo.max_tasks})") from None
    ci = t.idx(child, "copy_process")
    t.oom_score_adj[ci] = t.oom_score_adj[pi]
    try:
        t.mm[ci] = dup_mmap(k, int(t.mm[pi]), child)
    except Exception:
        t.free(child, site="copy_process:fail")
        raise
    t.state[ci] = TASK_RUNNING
    k.ev("sched_process_fork", parent_pid=int(t.pid[pi]), child_pid=int(t.pid[ci]), child_task=ci)
    return child


def new_task(k: Kernel, comm: str | bytes, nid: int = -1) -> int:
    """A running user process with an empty address space on node nid (as after execve)."""
    t = k.km.task
    h = alloc_task(k, comm, nid, site="spawn_task")
    ti = t.idx(h, "spawn_task")
    t.mm[ti] = mmops.mm_alloc(k, h, nid)
    t.state[ti] = TASK_RUNNING
    return h


def dup_mmap(k: Kernel, oldmm: int, owner: int) -> int:
    """Create the child's mm as a copy of oldmm; returns the new mm handle."""
    km = k.km
    oi = km.mm.idx(oldmm, "dup_mmap")
    try:
        mm = mmops.mm_alloc(k, owner, int(km.mm.nid[oi]))
    except OutOfObjects:
        raise SyscallError("ENOMEM", f"fork: no free mm_struct (max_mms {km.geo.max_mms})") from None
    mi = km.mm.idx(mm, "dup_mmap")
    # MMF_INIT_MASK: merge-any survives fork; the rest is per-mm.
    km.mm.flags[mi] = int(km.mm.flags[oi]) & MMF_VM_MERGE_ANY
    km.mm.mmap_base[mi] = km.mm.mmap_base[oi]
    # dup_mm()'s memcpy: the parent's counter, read before dup_mmap() takes its mmap_lock,
    # so a KSM zero pte ksmd places or a fault breaks in between is miscounted in the
    # child for good (docs/bugs/zero-pages-fork.md). The proposed fix counts what is copied.
    counted = k.variant("fix:zero-pages-fork")
    if not counted:
        km.mm.ksm_zero_pages[mi] = km.mm.ksm_zero_pages[oi]
    lock = k.mmap_lock(oldmm, "dup_mmap")
    lock.down_write()
    try:
        for vma in list(mmops.vmas(k, oldmm)):
            vi = km.vma.idx(vma, "dup_mmap")
            start, end = int(km.vma.start[vi]), int(km.vma.end[vi])
            flags = int(km.vma.flags[vi]) & ~VM_LOCKED  # mlock is not inherited
            new = mmops.vma_new(k, mm, start, end, flags, int(km.vma.pgoff[vi]), int(km.vma.nid[vi]))
            av = int(km.vma.anon_vma[vi])
            if av:
                mmops.anon_vma_link(k, av, new)
            zero = _copy_ptes(k, oldmm, mm, start, end, bool(flags & VM_SHARED))
            if counted:
                km.mm.ksm_zero_pages[mi] += zero
        err = ksm_mm.ksm_fork(k, mm, oldmm)
        if err:
            k.ev("ksm_fork_failed", err=err)
    finally:
        lock.up_write()
    k.ev("dup_mmap", parent_mm=oi, child_mm=mi)
    return mm


def _copy_ptes(k: Kernel, src: int, dst: int, start: int, end: int, shared: bool) -> int:
    """copy_pte_range() for one vma; returns how many KSM zero ptes it copied."""
    km = k.km
    zero = 0
    di = km.mm.idx(dst, "copy_pte_range")
    with k.ptl(src), k.ptl(dst):
        chunks = list(mmops.pte_ranges(k, src, start, end))
        for addr, sptes, _n in chunks:
            if sptes is None or not sptes.any():
                continue
            dptes, j = mmops.pte_table(k, dst, addr, alloc=True)
            for off in np.flatnonzero(sptes):
                pte = int(sptes[off])
                if pte & PTE_PRESENT and not pte & PTE_SPECIAL:
                    pfn = pte & PTE_PFN_MASK
                    if not debug.pte_page_ok(k, pfn):
                        # copy_present_pte() with vm_normal_page() == NULL: print_bad_pte(),
                        # and the child gets no copy of a mapping to a frame nobody owns.
                        debug.bad_pte(k, src, addr + (int(off) << PAGE_SHIFT), pte, "copy_pte_range")
                        continue
                    k.page_ref.inc_return(pfn)
                    k.page_map.inc_return(pfn)
                    km.mm.atomic("rss_anon").inc_return(di)
                    if not shared and pte & PTE_WRITE:
                        pte &= ~PTE_WRITE   # copy-on-write in both
                        sptes[off] = pte
                elif pte & PTE_SWAP:
                    swap.swap_duplicate(k, pte & PTE_PFN_MASK, "copy_pte_range")
                    k.ev("fork_swap_entry", mm=di, slot=pte & PTE_PFN_MASK)
                else:
                    zero += is_ksm_zero_pte(pte)
                dptes[j + int(off)] = pte
    return zero
