# The exit path: do_exit -> mmput -> __mmput -> ksm_exit, exit_mmap, mmdrop.
#
# Today's order (seed 001 reverted seed 000's move of ksm_exit into the middle of
# exit_mmap): ksm_exit() runs before exit_mmap(); exit_mmap() unmaps everything
# under mmap_read_lock, sets MMF_OOM_SKIP, then frees vmas and page tables under
# mmap_write_lock. mm_count keeps the mm_struct alive for KSM's slot after that;
# the last mmdrop() frees it (a generation bump: later use is a reported UAF).
# The 2016 kernel's exit_mmap took no mmap_lock at all; the mmput-race variant
# restores that, which is what let ksmd's late up_read touch a freed mm (seed 003).
# The munlock-exit-hang variant restores the kernel between seeds 000 and 001: ksm_exit
# in the middle of exit_mmap (after the pages are zapped, before the page tables go),
# ksm_test_exit() in the fault paths (memory.py), and munlock_vma_pages_all() faulting
# absent pages in through __get_user_pages: on a PROT_NONE area of an mlockall() task the
# fault backs out (mm_users is 0) and munlock retries for ever (docs/bugs/munlock-exit-hang.md).
#
# do_exit() is kernel/exit.c's, reduced to what KSM meets: PF_EXITING, the
# sched_process_exit event, exit_mm() (task->mm cleared first, then mmput(), so the OOM
# killer no longer sees the mm through the task while __mmput runs), then the zombie and
# release_task() at once (nobody waits for our tasks: the record is freed, a later use of
# the handle is a reported use-after-free). It runs in the exit context with `current`
# the dying task, and whatever mmput() raises the task is dead and released all the same.
# It returns the pid; telling the supervisor is the caller's business.
from __future__ import annotations

import errno

from actors.kernel import ksm_mm
from actors.kernel import mm as mmops
from actors.kernel.context import Kernel
from actors.kernel.memory import (
    FAULT_FLAG_REMOTE,
    FAULT_FLAG_WRITE,
    VM_FAULT_ERROR,
    handle_mm_fault,
    zap_page_range,
)
from shared_mem.layout import (
    MMF_OOM_SKIP,
    PAGE_SIZE,
    PF_EXITING,
    PG_MLOCKED,
    PTE_PFN_MASK,
    PTE_PRESENT,
    PTE_SPECIAL,
    PTE_WRITE,
    TASK_DEAD,
    TASK_EXITING,
    VM_LOCKED,
    VM_SHARED,
    VM_WRITE,
)

_MUNLOCK_GUP_SITE = "__get_user_pages<-__mlock_vma_pages_range<-munlock_vma_pages_all<-exit_mmap"


def _gup_follow_page(k: Kernel, mm: int, addr: int, write: bool) -> int:
    """follow_page() as __get_user_pages used it: the page mapped at addr (the zero page
    counts), or -1 when absent, or not writable for a write (FOLL_WRITE): fault it."""
    with k.ptl(mm, "follow_page"):
        pte = mmops.read_pte(k, mm, addr)
    if not pte & PTE_PRESENT or (write and not pte & PTE_WRITE):
        return -1
    return 0 if pte & PTE_SPECIAL else pte & PTE_PFN_MASK


def _munlock_vma_pages_2009(k: Kernel, mm: int, vma: int) -> None:
    """2.6.31's __mlock_vma_pages_range(vma, start, end, 0): munlock through
    __get_user_pages with GUP_FLAGS_IGNORE_VMA_PERMISSIONS, which faults in every page it
    does not find - PROT_NONE ones too - and loops while follow_page() finds nothing:

        while (!(page = follow_page(vma, start, foll_flags))) {
            ret = handle_mm_fault(mm, vma, start, write ? FAULT_FLAG_WRITE : 0);
            if (ret & VM_FAULT_ERROR) ...return;
            cond_resched();
        }
    """
    km = k.km
    vi = km.vma.idx(vma, "__mlock_vma_pages_range")
    start, end = int(km.vma.start[vi]), int(km.vma.end[vi])
    write = (int(km.vma.flags[vi]) & (VM_WRITE | VM_SHARED)) == VM_WRITE  # break COW
    flags = FAULT_FLAG_REMOTE | (FAULT_FLAG_WRITE if write else 0)
    for addr in range(start, end, PAGE_SIZE):
        pfn = _gup_follow_page(k, mm, addr, write)
        while pfn < 0:
            ret = handle_mm_fault(k, vma, addr, flags)
            if ret & VM_FAULT_ERROR:
                k.progress()
                k.ev("munlock_gup_error", mm=km.mm.idx(mm, "munlock"), addr=addr, ret=ret)
                return
            k.cond_resched(_MUNLOCK_GUP_SITE)
            pfn = _gup_follow_page(k, mm, addr, write)
        k.progress()
        if pfn:
            k.page_flags[pfn] &= ~PG_MLOCKED  # munlock_vma_page()


def munlock_vma_pages_all(k: Kernel, mm: int, vma: int) -> None:
    """Clear VM_LOCKED. Today it faults nothing in; 2009's faulted every page in first."""
    if k.variant("munlock-exit-hang"):
        _munlock_vma_pages_2009(k, mm, vma)
    k.km.vma.flags[k.km.vma.idx(vma, "munlock_vma_pages_all")] &= ~VM_LOCKED


def exit_mmap(k: Kernel, mm: int) -> int:
    """Tear down the address space; returns the number of ptes zapped."""
    km = k.km
    nolock = k.variant("mmput-race")
    lock = k.mmap_lock(mm, "exit_mmap")
    if not nolock:
        lock.down_read(site="exit_mmap")
    zapped = 0
    try:
        for vma in list(mmops.vmas(k, mm)):
            vi = km.vma.idx(vma, "exit_mmap")
            if km.vma.flags[vi] & VM_LOCKED:
                munlock_vma_pages_all(k, mm, vma)
            k.point("exit_mmap.unmap_vma")
            zapped += zap_page_range(k, mm, int(km.vma.start[vi]), int(km.vma.end[vi]))
    finally:
        if not nolock:
            lock.up_read()
    if k.variant("munlock-exit-hang"):
        # Seed 000: "move the ksm_exit callout from just before exit_mmap, to the middle
        # of exit_mmap: after the mm's pages have been freed, but before its page tables
        # and vma structures have been freed" (reverted by seed 001).
        ksm_mm.ksm_exit(k, mm)
    ksm_mm.set_mm_flag(k, mm, MMF_OOM_SKIP)
    k.point("exit_mmap.before_free_pgtables")
    if not nolock:
        lock.down_write(site="exit_mmap")
    try:
        for vma in list(mmops.vmas(k, mm)):
            mmops.vma_remove(k, mm, vma)
        mmops.free_pgtables(k, mm)
    finally:
        if not nolock:
            lock.up_write()
    k.ev("exit_mmap", mm=km.mm.idx(mm, "exit_mmap"), zapped=zapped)
    return zapped


def __mmput(k: Kernel, mm: int) -> None:
    # Debug bookkeeping, not the kernel's: an address space half torn down (ptes zapped,
    # swap entries not yet freed, __mmput's mm_count reference not yet dropped) breaks
    # the conservation laws the invariant checker tests, so it waits until none is.
    inflight = k.ksm_atomic["mmput_in_flight"]
    inflight.inc_return(0)
    try:
        if not k.variant("munlock-exit-hang"):  # seed 001: ksm_exit before exit_mmap again
            ksm_mm.ksm_exit(k, mm)
            k.point("__mmput.after_ksm_exit")
        exit_mmap(k, mm)
        mmops.mmdrop(k, mm, site="__mmput")
    finally:
        inflight.dec_return(0)


def mmput(k: Kernel, mm: int) -> None:
    """Drop an mm_users reference; the last one tears the address space down."""
    i = k.km.mm.idx(mm, "mmput")
    users = k.km.mm.atomic("users").dec_return(i)
    k.ev("mmput", mm=i, mm_users=users)
    if users == 0:
        __mmput(k, mm)
    elif users < 0:
        raise RuntimeError(f"BUG: mm_users underflow on mm {i}")


def mmget_not_zero(k: Kernel, mm: int) -> bool:
    return k.km.mm.atomic("users").inc_not_zero(k.km.mm.idx(mm, "mmget_not_zero"))


def do_exit(k: Kernel, task: int, code: int, reason: str) -> int:
    """The task exits with `code` (reason: "exit", "killed", ...): its mm is put and its
    record released. Returns its pid, or -ESRCH when the task is in do_exit already (a
    second fatal signal to a dying task changes nothing)."""
    t = k.km.task
    ti = t.idx(task, "do_exit")
    if t.atomic("flags").set_bits(ti, PF_EXITING) & PF_EXITING:
        k.ev("do_exit_exiting", task=ti, pid=int(t.pid[ti]), reason=reason)
        return -errno.ESRCH
    k.current_task = task
    t.state[ti] = TASK_EXITING
    pid = int(t.pid[ti])
    k.ev("sched_process_exit", task=ti, pid=pid, code=code, reason=reason)
    mm = int(t.mm[ti])   # exit_mm(): detach, then drop the reference
    t.mm[ti] = 0
    try:
        if mm:
            mmput(k, mm)
    finally:
        t.state[ti] = TASK_DEAD
        t.exit_code[ti] = code
        k.current_task = 0
        t.free(task, site="release_task")
    return pid
