# A user access and the page fault behind it: the MMU loop and do_user_addr_fault().
#
# What it models. A load or store of a user task runs in three layers. access_user() is
# the CPU executing the instruction: memory.user_access() does what the ptes allow and
# stops at the first page it cannot use (absent, or write-protected for a store). That
# page traps; the fault (`fault`, below) is arch/x86/mm/fault.c do_user_addr_fault():
# mmap_read_lock, then per page fatal_signal_pending() (a task being killed gives up,
# VM_FAULT_SIGKILL), vma_lookup() (no vma: VM_FAULT_SIGSEGV) and handle_mm_fault(). Then
# the instruction restarts and access_user() goes on where it stopped.
#
# Why shaped so. Three choices keep the loop exact and cheap, and all of them hold in
# both worlds that run it:
#
#   - fault-around: one fault covers up to MAX_FAULT_AROUND pages from the trapping one
#     to the end of the access (one round trip to the fault handler actor, not one per
#     page), each page still a full handle_mm_fault();
#   - the trapped store travels with the fault (Store): right after each page's
#     handle_mm_fault(), still under mmap_read_lock, the part of the store that falls in
#     that page is done, as the restarted instruction would do it. A page is thus never
#     faulted in but not yet written where ksmd could see it (and merge the empty page);
#   - `fault` is a callable the caller supplies, with do_user_addr_fault's shape minus
#     k and mm: (page address, npages, flags, store) -> (pages done, VM_FAULT_* ret,
#     bytes stored). A task actor passes one that sends the fault message and waits for
#     the reply, as a trapped CPU waits; the simulator (or any in-process caller: the
#     default, None) calls do_user_addr_fault() in the same context.
#
# Errors: one convention, fault_error(). A fault that fails raises UserAccessError with
# the errno the system call returns: EFAULT for VM_FAULT_SIGSEGV and VM_FAULT_SIGBUS,
# ENOMEM for VM_FAULT_OOM; Killed (EINTR, a subclass) for VM_FAULT_SIGKILL or whenever the
# current task has a fatal signal pending after the fault. A negative length is EINVAL.
# The caller maps UserAccessError to its own error (the task actor: a KernelError reply
# with errno_name and detail). How much reached memory is reported by `progress(n)`,
# called each time the count of bytes done grows, so that whatever ends an access (one
# of these errors, a use-after-free report, a lost reply) the caller knows the prefix
# that was stored: bytes a failed store wrote are in memory and count (the task's shadow
# keeps them).
#
# mm_populate() is the same faulting for MAP_POPULATE / mlock: every page of a range,
# MAX_FAULT_AROUND pages per fault, no store.
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from actors.kernel import mm as mmops
from actors.kernel.context import Kernel
from actors.kernel.memory import (
    FAULT_FLAG_FORCE,
    FAULT_FLAG_UNSHARE,
    FAULT_FLAG_WRITE,
    VM_FAULT_ERROR,
    VM_FAULT_OOM,
    VM_FAULT_SIGBUS,
    VM_FAULT_SIGSEGV,
    handle_mm_fault,
    user_access,
)
from shared_mem.layout import PAGE_SIZE

VM_FAULT_SIGKILL = 0x10000  # ours: the faulting task has a fatal signal pending
MAX_FAULT_AROUND = 256      # pages one fault may cover
_PAGE_MASK = ~(PAGE_SIZE - 1)


class Store:
    """The part of a task's store that lies in the pages being faulted.

    addr, length: the bytes still to store; fill >= 0: a memset value, else data: the
    bytes (uint8 array or bytes). `stored` counts what complete() has done so far.
    """

    def __init__(self, addr: int, length: int, fill: int = -1,
                 data: bytes | np.ndarray | None = None) -> None:
        self.addr = addr
        self.fill = fill
        if data is not None and len(data) == 0:
            data = None
        if isinstance(data, bytes | bytearray | memoryview):
            data = np.frombuffer(data, dtype=np.uint8)
        self.data: np.ndarray | None = data
        if data is not None:
            self.length = len(data)
        else:
            self.length = length if fill >= 0 else 0
        self.stored = 0

    def __bool__(self) -> bool:
        return self.length > 0

    def complete(self, k: Kernel, mm: int, page: int, force: bool) -> bool:
        """Store the bytes that fall in [page, page + PAGE_SIZE); False if the pte changed again."""
        start = max(page, self.addr + self.stored)
        end = min(page + PAGE_SIZE, self.addr + self.length)
        if start >= end:
            return True
        if start != self.addr + self.stored:
            return False  # a gap: the caller resumes from where the store stopped
        off = start - self.addr
        src = self.fill if self.data is None else self.data[off:]
        n, fault_addr = user_access(k, mm, start, end - start, True, src, None, force)
        self.stored += n
        return fault_addr < 0


# (page address, npages, flags, store) -> (pages done, VM_FAULT_* ret, bytes stored)
FaultFn = Callable[[int, int, int, Store | None], tuple[int, int, int]]


def do_user_addr_fault(k: Kernel, mm: int, addr: int, npages: int, flags: int,
                       store: Store | None) -> tuple[int, int, int]:
    """Fault npages pages from the page-aligned addr for k.current_task, completing the
    trapped store page by page. Returns (pages done, VM_FAULT_* of the page that
    stopped it or 0, bytes of the store done)."""
    lock = k.mmap_lock(mm, "do_user_addr_fault")
    lock.down_read(site="do_user_addr_fault")
    done, ret = 0, 0
    try:
        for i in range(npages):
            if k.fatal_signal_pending():
                ret = VM_FAULT_SIGKILL
                break
            a = addr + i * PAGE_SIZE
            vma = mmops.vma_lookup(k, mm, a)
            if not vma:
                ret = VM_FAULT_SIGSEGV
                break
            ret = handle_mm_fault(k, vma, a, flags)
            if ret & VM_FAULT_ERROR:
                break
            ret = 0
            done += 1
            # The trapping instruction completes now, before the next page faults,
            # so no freshly faulted page sits empty for ksmd to see.
            if store and not store.complete(k, mm, a, bool(flags & FAULT_FLAG_FORCE)):
                break
    finally:
        lock.up_read()
    return done, ret, store.stored if store else 0


class UserAccessError(Exception):
    """A user access that cannot complete; errno_name is what the system call returns."""

    def __init__(self, errno_name: str, detail: str = "") -> None:
        super().__init__(f"{errno_name}: {detail}")
        self.errno_name = errno_name
        self.detail = detail


class Killed(UserAccessError):
    """The task has a fatal signal pending: the access ends, the task will exit."""

    def __init__(self) -> None:
        super().__init__("EINTR", "task killed by SIGKILL")


def fault_error(k: Kernel, ret: int, addr: int) -> None:
    """Raise the error a fault's VM_FAULT_* ret (at user address addr) ends the access with."""
    if ret & VM_FAULT_SIGKILL or k.fatal_signal_pending():
        raise Killed()
    if ret & VM_FAULT_SIGSEGV:
        raise UserAccessError("EFAULT", f"SIGSEGV at {addr:#x}")
    if ret & VM_FAULT_SIGBUS:
        raise UserAccessError("EFAULT", f"SIGBUS at {addr:#x}")
    if ret & VM_FAULT_OOM:
        raise UserAccessError("ENOMEM", f"out of memory faulting {addr:#x}")


_FAILED = VM_FAULT_SIGKILL | VM_FAULT_SIGSEGV | VM_FAULT_SIGBUS | VM_FAULT_OOM


def _fault_in(k: Kernel, fault: FaultFn, addr: int, npages: int, flags: int,
              store: Store | None = None, progress: Callable[[int], None] | None = None,
              done: int = 0) -> int:
    """One trap: fault npages from addr's page; returns the bytes of the store done."""
    _pages, ret, stored = fault(addr & _PAGE_MASK, npages, flags, store)
    if ret & _FAILED and progress is not None:
        # The handler may have completed the store on the pages before the one that
        # failed: those bytes are in memory, so they count.
        progress(done + stored)
    fault_error(k, ret, addr)
    return stored


def _direct(k: Kernel, mm: int) -> FaultFn:
    def fault(addr: int, npages: int, flags: int, store: Store | None) -> tuple[int, int, int]:
        return do_user_addr_fault(k, mm, addr, npages, flags, store)
    return fault


def access_user(k: Kernel, mm: int, addr: int, length: int, write: bool,
                src: np.ndarray | int | None = None, force: bool = False,
                fault: FaultFn | None = None,
                progress: Callable[[int], None] | None = None) -> bytes | None:
    """A load (returns the bytes) or a store of src (uint8 array, or an int fill for
    memset; returns None) of [addr, addr + length) in mm, faulting what traps.

    force: FOLL_FORCE (ptrace, /proc/PID/mem): a store unshares a write-protected page.
    fault: how a trap is served (None: do_user_addr_fault here). progress(n): the bytes
    done so far, each time that grows. Raises UserAccessError (see the module comment).
    """
    if progress is not None:
        progress(0)
    if length < 0:
        raise UserAccessError("EINVAL", "negative length")
    if not mmops.access_ok(k, addr, length):
        # Before any page table is indexed: a negative address must not wrap into one.
        raise UserAccessError("EFAULT", f"[{addr:#x}, +{length:#x}) is outside the user address space")
    if fault is None:
        fault = _direct(k, mm)
    dst = None if write else np.empty(length, dtype=np.uint8)
    done = 0
    flags = (FAULT_FLAG_WRITE if write else 0) | (FAULT_FLAG_FORCE if force else 0)
    if force and write:
        flags |= FAULT_FLAG_UNSHARE
    end = addr + length
    last_trap = -1
    try:
        while done < length:
            s = src if isinstance(src, int) or src is None else src[done:]
            d = None if dst is None else dst[done:]
            n, fault_addr = user_access(k, mm, addr + done, length - done, write, s, d, force)
            done += n
            if progress is not None:
                progress(done)
            if fault_addr < 0:
                break
            done += _trap(k, fault, addr, end, fault_addr, flags, write, src, progress, done,
                          again=fault_addr == last_trap)
            last_trap = fault_addr
    finally:
        k.progress()
    return None if dst is None else dst.tobytes()


def _trap(k: Kernel, fault: FaultFn, addr: int, end: int, fault_addr: int, flags: int, write: bool,
          src: np.ndarray | int | None, progress: Callable[[int], None] | None, done: int,
          again: bool) -> int:
    """Serve one trap of access_user(); returns the bytes of the store it completed.

    again: the same address trapped twice with nothing copied in between. A load is copied
    only after its whole fault-around batch is in, so under reclaim the trapping page can be
    gone again by then, every time (a livelock the kernel cannot have: it maps one anonymous
    page per trap and the instruction retries at once). So a repeated trap faults that one
    page, and each repeat is a cond_resched() the no-progress watchdog sees."""
    page = fault_addr & _PAGE_MASK
    npages = min(MAX_FAULT_AROUND, (end - page + PAGE_SIZE - 1) // PAGE_SIZE)
    if again:
        k.cond_resched("access_user")
        npages = 1
    else:
        k.progress()
    if not write:
        return _fault_in(k, fault, fault_addr, npages, flags, None, progress, done)
    # The rest of the store that falls into the pages being faulted goes along.
    upto = min(end, page + npages * PAGE_SIZE)
    if isinstance(src, int):
        store = Store(fault_addr, upto - fault_addr, fill=src)
    else:
        off = fault_addr - addr
        store = Store(fault_addr, upto - fault_addr, data=src[off:off + upto - fault_addr])
    stored = _fault_in(k, fault, fault_addr, npages, flags, store, progress, done)
    if progress is not None:
        progress(done + stored)
    return stored


def mm_populate(k: Kernel, mm: int, start: int, length: int, write: bool,
                fault: FaultFn | None = None) -> None:
    """Fault in every page of [start, start + length) of mm (MAP_POPULATE, mlock);
    raises UserAccessError like access_user()."""
    if fault is None:
        fault = _direct(k, mm)
    flags = FAULT_FLAG_WRITE if write else 0
    for a in range(start, start + length, MAX_FAULT_AROUND * PAGE_SIZE):
        n = min(MAX_FAULT_AROUND, (start + length - a) // PAGE_SIZE)
        _fault_in(k, fault, a, n, flags)
