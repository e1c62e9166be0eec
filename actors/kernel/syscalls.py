# The system calls a task makes: mmap, munmap, mprotect, madvise, prctl, mlockall.
#
# Each runs in the calling task's own process, takes its mm's mmap_lock the way the
# kernel does (write for anything that changes vmas, read for MADV_DONTNEED), and
# reports errors with the kernel's errno: madvise processes the mapped parts of a
# range and then returns ENOMEM for an unmapped gap, and turns a per-vma ENOMEM
# into EAGAIN ("ksm: the mm interface to ksm", seed 001); prctl checks its unused
# arguments are zero (EINVAL).
from __future__ import annotations

from actors.kernel import ksm_mm
from actors.kernel import mm as mmops
from actors.kernel.context import Kernel
from actors.kernel.memory import zap_page_range
from protocol.abi import (
    MADV_DONTNEED,
    MADV_HUGEPAGE,
    MADV_MERGEABLE,
    MADV_NOHUGEPAGE,
    MADV_NORMAL,
    MADV_UNMERGEABLE,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    MCL_CURRENT,
    MCL_FUTURE,
    MCL_ONFAULT,
    PR_GET_MEMORY_MERGE,
    PR_SET_MEMORY_MERGE,
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
)
from shared_mem.arena import handle_id
from shared_mem.layout import (
    MMF_VM_MERGE_ANY,
    PAGE_SIZE,
    PTE_WRITE,
    VM_EXEC,
    VM_LOCKED,
    VM_MAYREAD,
    VM_MAYSHARE,
    VM_MAYWRITE,
    VM_NOHUGEPAGE,
    VM_READ,
    VM_SHARED,
    VM_WRITE,
)


class SyscallError(Exception):
    def __init__(self, errno_name: str, msg: str = "") -> None:
        super().__init__(f"{errno_name}: {msg}" if msg else errno_name)
        self.errno_name = errno_name


_ERRNO = {-12: "ENOMEM", -11: "EAGAIN", -14: "EFAULT", -4: "EINTR", -512: "EINTR", -16: "EBUSY", -22: "EINVAL"}


def _page_align(n: int) -> int:
    return (n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def prot_to_vm(prot: int) -> int:
    f = 0
    if prot & PROT_READ:
        f |= VM_READ
    if prot & PROT_WRITE:
        f |= VM_WRITE
    if prot & PROT_EXEC:
        f |= VM_EXEC
    return f


def _check_range(k: Kernel, addr: int, length: int, outside: str) -> int:
    """The end of [addr, addr + length) page-aligned; EINVAL for a misaligned start or a
    negative length, `outside` (the call's own errno) for a range past TASK_SIZE."""
    if addr & (PAGE_SIZE - 1) or length < 0:
        raise SyscallError("EINVAL", "address not page aligned or negative length")
    end = addr + _page_align(length)
    if not mmops.access_ok(k, addr, end - addr):
        raise SyscallError(outside, f"[{addr:#x}, {end:#x}) is outside the user address space")
    return end


def sys_mmap(k: Kernel, mm: int, length: int, prot: int, flags: int, addr: int = 0, nid: int = -1) -> int:
    """mmap(); nid >= 0 binds the new area to that NUMA node (like numa_alloc_onnode)."""
    if length <= 0:
        raise SyscallError("EINVAL", "length must be > 0")
    if not flags & MAP_ANONYMOUS:
        raise SyscallError("EINVAL", "only anonymous mappings are modelled (MAP_ANONYMOUS)")
    if bool(flags & MAP_PRIVATE) == bool(flags & MAP_SHARED):
        raise SyscallError("EINVAL", "exactly one of MAP_PRIVATE and MAP_SHARED")
    length = _page_align(length)
    vmflags = prot_to_vm(prot) | VM_MAYREAD | VM_MAYWRITE
    if flags & MAP_SHARED:
        vmflags |= VM_SHARED | VM_MAYSHARE
    lock = k.mmap_lock(mm, "sys_mmap")
    lock.down_write(site="sys_mmap")
    try:
        mi = k.km.mm.idx(mm, "do_mmap")
        vmflags |= int(k.km.mm.def_flags[mi])
        if flags & MAP_FIXED:
            if addr & (PAGE_SIZE - 1) or addr < mmops.MMAP_MIN_ADDR or addr + length > k.km.geo.va_pages * PAGE_SIZE:
                raise SyscallError("EINVAL", "bad MAP_FIXED address")
            _munmap_locked(k, mm, addr, addr + length)
            start = addr
        else:
            start = mmops.get_unmapped_area(k, mm, length)
        vmflags = ksm_mm.ksm_vma_flags(k, mm, vmflags)
        if nid >= k.km.geo.nr_nodes:
            raise SyscallError("EINVAL", f"no NUMA node {nid}")
        vma = mmops.vma_new(k, mm, start, start + length, vmflags, start >> 12, nid)
    except mmops.VmaError as e:
        raise SyscallError(e.errno_name, str(e)) from None
    finally:
        lock.up_write()
    k.ev("mmap", mm=handle_id(mm), start=start, length=length, vm_flags=vmflags, vma=handle_id(vma))
    # mm_populate(): a PROT_NONE area cannot be faulted in; mmap still succeeds (the
    # kernel ignores populate errors), so an MCL_FUTURE task can map guard areas.
    if (flags & MAP_POPULATE or vmflags & VM_LOCKED) and vmflags & (VM_READ | VM_WRITE):
        k.wakeups.populate(start, length, bool(vmflags & VM_WRITE))
    return start


def _munmap_locked(k: Kernel, mm: int, start: int, end: int) -> None:
    for vma in mmops.split_range(k, mm, start, end):
        vi = k.km.vma.idx(vma, "do_vmi_munmap")
        zap_page_range(k, mm, int(k.km.vma.start[vi]), int(k.km.vma.end[vi]))
        mmops.vma_remove(k, mm, vma)


def sys_munmap(k: Kernel, mm: int, addr: int, length: int) -> int:
    if length <= 0:
        raise SyscallError("EINVAL", "length must be > 0")
    end = _check_range(k, addr, length, "EINVAL")   # do_vmi_munmap: start > TASK_SIZE - len
    lock = k.mmap_lock(mm, "sys_munmap")
    lock.down_write(site="sys_munmap")
    try:
        _munmap_locked(k, mm, addr, end)
    finally:
        lock.up_write()
    k.ev("munmap", mm=handle_id(mm), start=addr, end=end)
    return 0


def sys_mprotect(k: Kernel, mm: int, addr: int, length: int, prot: int) -> int:
    end = _check_range(k, addr, length, "ENOMEM")   # no vma there
    if prot & ~(PROT_READ | PROT_WRITE | PROT_EXEC):
        raise SyscallError("EINVAL", "unknown prot bits")
    lock = k.mmap_lock(mm, "sys_mprotect")
    lock.down_write(site="sys_mprotect")
    try:
        if mmops.range_has_gaps(k, mm, addr, end):
            raise SyscallError("ENOMEM", "range not fully mapped")
        new = prot_to_vm(prot)
        for vma in mmops.split_range(k, mm, addr, end):
            vi = k.km.vma.idx(vma, "mprotect_fixup")
            old = int(k.km.vma.flags[vi])
            k.km.vma.flags[vi] = (old & ~(VM_READ | VM_WRITE | VM_EXEC)) | new
            if old & VM_WRITE and not new & VM_WRITE:
                _wrprotect_range(k, mm, int(k.km.vma.start[vi]), int(k.km.vma.end[vi]))
    finally:
        lock.up_write()
    k.ev("mprotect", mm=handle_id(mm), start=addr, end=end, prot=prot)
    return 0


def _wrprotect_range(k: Kernel, mm: int, start: int, end: int) -> None:
    with k.ptl(mm):
        for _a, ptes, _n in mmops.pte_ranges(k, mm, start, end):
            if ptes is not None:
                ptes &= ~PTE_WRITE


_MADV_KNOWN = {MADV_NORMAL, MADV_DONTNEED, MADV_MERGEABLE, MADV_UNMERGEABLE, MADV_HUGEPAGE, MADV_NOHUGEPAGE}


def sys_madvise(k: Kernel, mm: int, addr: int, length: int, advice: int) -> int:
    if advice not in _MADV_KNOWN:
        raise SyscallError("EINVAL", f"advice {advice} not supported")
    if addr & (PAGE_SIZE - 1) or length < 0 or addr < 0:
        # A negative start is a huge unsigned one: start + len wraps (EINVAL).
        raise SyscallError("EINVAL", "start not page aligned, negative, or negative length")
    end = addr + _page_align(length)
    if end == addr:
        return 0
    if not mmops.access_ok(k, addr, end - addr):
        raise SyscallError("ENOMEM", f"[{addr:#x}, {end:#x}) is outside the user address space")
    write = advice in (MADV_MERGEABLE, MADV_UNMERGEABLE, MADV_HUGEPAGE, MADV_NOHUGEPAGE)
    lock = k.mmap_lock(mm, "sys_madvise")
    lock.down_write(site="sys_madvise") if write else lock.down_read(site="sys_madvise")
    unmapped = False
    try:
        unmapped = mmops.range_has_gaps(k, mm, addr, end)
        if write:
            vmas = mmops.split_range(k, mm, addr, end)
        else:
            vmas = []
            for v in mmops.vmas(k, mm):
                vi = k.km.vma.idx(v, "madvise_walk_vmas")
                if k.km.vma.end[vi] > addr and k.km.vma.start[vi] < end:
                    vmas.append(v)
        for vma in vmas:
            vi = k.km.vma.idx(vma, "madvise_walk_vmas")
            vs, ve = max(addr, int(k.km.vma.start[vi])), min(end, int(k.km.vma.end[vi]))
            if advice in (MADV_MERGEABLE, MADV_UNMERGEABLE):
                err = ksm_mm.ksm_madvise(k, vma, vs, ve, advice)
                if err:
                    name = _ERRNO.get(err, "EINVAL")
                    raise SyscallError("EAGAIN" if name == "ENOMEM" else name, "ksm_madvise failed")
            elif advice == MADV_DONTNEED:
                if k.km.vma.flags[vi] & VM_LOCKED:
                    raise SyscallError("EINVAL", "MADV_DONTNEED on a locked vma")
                zap_page_range(k, mm, vs, ve)
            elif advice == MADV_NOHUGEPAGE:
                k.km.vma.flags[vi] |= VM_NOHUGEPAGE
            elif advice == MADV_HUGEPAGE:
                k.km.vma.flags[vi] &= ~VM_NOHUGEPAGE
    finally:
        lock.up_write() if write else lock.up_read()
    k.ev("madvise", mm=handle_id(mm), start=addr, end=end, advice=advice, unmapped=unmapped)
    if unmapped:
        raise SyscallError("ENOMEM", "part of the range is not mapped (the mapped parts were advised)")
    return 0


def sys_prctl(k: Kernel, mm: int, option: int, arg2: int, arg3: int, arg4: int, arg5: int) -> int:
    if option == PR_SET_MEMORY_MERGE:
        if arg3 or arg4 or arg5:
            raise SyscallError("EINVAL", "unused prctl arguments must be 0")
        lock = k.mmap_lock(mm, "prctl")
        lock.down_write(site="sys_prctl")
        try:
            err = ksm_mm.ksm_enable_merge_any(k, mm) if arg2 else ksm_mm.ksm_disable_merge_any(k, mm)
        finally:
            lock.up_write()
        if err:
            raise SyscallError(_ERRNO.get(err, "EINVAL"), "PR_SET_MEMORY_MERGE")
        k.ev("prctl", option="PR_SET_MEMORY_MERGE", value=int(bool(arg2)))
        return 0
    if option == PR_GET_MEMORY_MERGE:
        if arg2 or arg3 or arg4 or arg5:
            raise SyscallError("EINVAL", "unused prctl arguments must be 0")
        return int(bool(ksm_mm.mm_flags(k, mm) & MMF_VM_MERGE_ANY))
    raise SyscallError("EINVAL", f"prctl option {option} not modelled")


def sys_mlockall(k: Kernel, mm: int, flags: int) -> list[tuple[int, int, bool]]:
    """Returns the (start, length, writable) ranges the caller must fault in (populate)."""
    if not flags or flags & ~(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) or flags == MCL_ONFAULT:
        raise SyscallError("EINVAL", "bad mlockall flags")
    todo = []
    lock = k.mmap_lock(mm, "mlockall")
    lock.down_write(site="sys_mlockall")
    try:
        mi = k.km.mm.idx(mm, "apply_mlockall_flags")
        if flags & MCL_FUTURE:
            k.km.mm.def_flags[mi] |= VM_LOCKED
        else:
            k.km.mm.def_flags[mi] &= ~VM_LOCKED
        if flags & MCL_CURRENT:
            for vma in mmops.vmas(k, mm):
                vi = k.km.vma.idx(vma, "apply_mlockall_flags")
                k.km.vma.flags[vi] |= VM_LOCKED
                vf = int(k.km.vma.flags[vi])
                # PROT_NONE areas are locked but cannot be faulted in (seed 001's case).
                if vf & (VM_READ | VM_WRITE) and not flags & MCL_ONFAULT:
                    todo.append((int(k.km.vma.start[vi]), int(k.km.vma.end[vi]) - int(k.km.vma.start[vi]),
                                 bool(vf & VM_WRITE)))
    finally:
        lock.up_write()
    k.ev("mlockall", mm=handle_id(mm), flags=flags)
    return todo


def sys_munlockall(k: Kernel, mm: int) -> int:
    lock = k.mmap_lock(mm, "munlockall")
    lock.down_write(site="sys_munlockall")
    try:
        k.km.mm.def_flags[k.km.mm.idx(mm, "apply_mlockall_flags")] &= ~VM_LOCKED
        for vma in mmops.vmas(k, mm):
            k.km.vma.flags[k.km.vma.idx(vma, "apply_mlockall_flags")] &= ~VM_LOCKED
    finally:
        lock.up_write()
    return 0

