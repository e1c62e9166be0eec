# execve(): the task gets a new, empty address space; a few mm flags survive.
#
# What it models. fs/exec.c builds the new mm in bprm_mm_init(): mm_alloc() copies the
# caller's mm->flags masked by MMF_INIT_MASK (include/linux/sched/coredump.h), which since
# "mm/ksm: support fork/exec for prctl" (Stefan Roesch, 2023) includes MMF_VM_MERGE_ANY,
# and ksm_execve() registers the new mm with KSM when that flag came along. Then
# exec_mmap() installs it and mmput()s the old one. So a process that did
# prctl(PR_SET_MEMORY_MERGE, 1) keeps merging after fork + exec, which is what
# ksm_functional_tests' test_prctl_fork_exec checks. Only the mm matters here: no files,
# no binary, no credentials.
from __future__ import annotations

from actors.kernel import ksm_mm
from actors.kernel import mm as mmops
from actors.kernel.context import Kernel
from actors.kernel.exit import mmput
from shared_mem.layout import MMF_VM_MERGE_ANY

# The mm flags an exec keeps (the KSM part of MMF_INIT_MASK; the rest is not modelled).
MMF_INIT_MASK = MMF_VM_MERGE_ANY


def ksm_execve(k: Kernel, mm: int) -> int:
    """Register the new mm with KSM if merge-any came along (0 or -ENOMEM)."""
    if ksm_mm.mm_flags(k, mm) & MMF_VM_MERGE_ANY:
        return ksm_mm.__ksm_enter(k, mm)
    return 0


def do_execve(k: Kernel, task: int) -> int:
    """Give `task` a fresh mm (bprm_mm_init, exec_mmap); returns the new mm handle."""
    t = k.km.task
    ti = t.idx(task, "do_execve")
    old = int(t.mm[ti])
    oi = k.km.mm.idx(old, "bprm_mm_init")
    mm = mmops.mm_alloc(k, task, int(k.km.mm.nid[oi]))
    k.km.mm.flags[k.km.mm.idx(mm, "bprm_mm_init")] = int(k.km.mm.flags[oi]) & MMF_INIT_MASK
    err = ksm_execve(k, mm)
    if err:
        mmops.mmdrop(k, mm, site="bprm_mm_init:fail")
        return err
    t.mm[ti] = mm
    k.ev("sched_process_exec", task=ti, pid=int(t.pid[ti]), old_mm=k.km.mm.idx(old, "exec_mmap"),
         mm=k.km.mm.idx(mm, "exec_mmap"))
    mmput(k, old)
    return mm
