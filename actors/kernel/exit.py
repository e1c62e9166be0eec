# The exit path: do_exit -> mmput -> __mmput -> ksm_exit, exit_mmap, mmdrop.
#
# Today's order (seed 001 reverted seed 000's move of ksm_exit into the middle of
# exit_mmap): ksm_exit() runs before exit_mmap(); exit_mmap() unmaps everything
# under mmap_read_lock, sets MMF_OOM_SKIP, then frees vmas and page tables under
# mmap_write_lock. mm_count keeps the mm_struct alive for KSM's slot after that;
# the last mmdrop() frees it (a generation bump: later use is a reported UAF).
# The 2016 kernel's exit_mmap took no mmap_lock at all; the mmput-race variant
# restores that, which is what let ksmd's late up_read touch a freed mm (seed 003).
from __future__ import annotations

from actors.kernel import ksm_mm
from actors.kernel import mm as mmops
from actors.kernel.context import Kernel
from actors.kernel.memory import zap_page_range
from shared_mem.layout import MMF_OOM_SKIP, VM_LOCKED


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
            vi = vma & 0xFFFFFFFF
            if km.vma.flags[vi] & VM_LOCKED:
                # munlock_vma_pages_all(): today it only clears the lock, it faults nothing in.
                km.vma.flags[vi] &= ~VM_LOCKED
            k.point("exit_mmap.unmap_vma")
            zapped += zap_page_range(k, mm, int(km.vma.start[vi]), int(km.vma.end[vi]))
    finally:
        if not nolock:
            lock.up_read()
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
    k.ev("exit_mmap", mm=mm & 0xFFFFFFFF, zapped=zapped)
    return zapped


def __mmput(k: Kernel, mm: int) -> None:
    ksm_mm.ksm_exit(k, mm)
    k.point("__mmput.after_ksm_exit")
    exit_mmap(k, mm)
    mmops.mmdrop(k, mm, site="__mmput")


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
