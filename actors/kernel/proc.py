# /proc/PID files of a task's address space: pagemap and ksm_stat.
#
# What it models. fs/proc/task_mmu.c pagemap_read() reports, per virtual page, the
# frame it maps (the PFN field of a present entry) without faulting anything in; here a
# list with -1 where no page is present, read under the page table lock so a racing
# fault or merge shows either the old or the new pte, never half of one. ksm_stat
# (fs/proc/base.c proc_pid_ksm_stat) prints the mm's KSM counters and its
# merge-any/mergeable state; the numbers come from sysfs.ksm_stat(), read here under
# mmap_read_lock so the vma walk of "ksm_mergeable" sees a stable vma list.
#
# Why shaped so. Both are reads a scenario uses to watch KSM (which pages share one
# frame, how much a process profits), and both must not change what they observe: no
# fault, no accessed bit. They take the mm, not the task: the caller resolved the task.
from __future__ import annotations

from actors.kernel import mm as mmops
from actors.kernel import sysfs
from actors.kernel.context import Kernel
from shared_mem.layout import PTE_PFN_MASK, PTE_PRESENT


def pagemap_read(k: Kernel, mm: int, addr: int, length: int) -> list[int]:
    """Frame number per page of [addr, addr + length), -1 when not present (no faults)."""
    out = []
    with k.ptl(mm):
        for _a, ptes, n in mmops.pte_ranges(k, mm, addr, addr + length):
            for j in range(n):
                pte = 0 if ptes is None else int(ptes[j])
                out.append(pte & PTE_PFN_MASK if pte & PTE_PRESENT else -1)
    return out


def proc_pid_ksm_stat(k: Kernel, mm: int) -> dict[str, object]:
    """/proc/PID/ksm_stat of mm."""
    lock = k.mmap_lock(mm, "ksm_stat")
    lock.down_read()
    try:
        return sysfs.ksm_stat(k, mm)
    finally:
        lock.up_read()
