# The page-fault handler: handle_mm_fault() on behalf of a trapped task.
#
# A task whose load/store finds no usable pte sends a fault request and waits for
# the reply, as a CPU trapped in the fault handler would. Each request runs in its
# own worker thread (its own kernel context), so a fault waiting for memory does
# not hold up other tasks' faults. mmap_read_lock is taken per request and every
# page is a full handle_mm_fault(); the fault gives up early if the task was killed.
# A request may cover a run of pages (fault-around, to save round trips); the
# trapped store travels with it and is completed page by page right after each
# page's fault, as the faulting instruction would be, so a page never sits
# faulted-in but not yet written where ksmd could see it.
from __future__ import annotations

import numpy as np

from actors.base import Actor
from actors.kernel import mm as mmops
from actors.kernel.memory import (
    FAULT_FLAG_FORCE,
    VM_FAULT_ERROR,
    VM_FAULT_SIGSEGV,
    handle_mm_fault,
    user_access,
)
from shared_mem.layout import PAGE_SIZE

VM_FAULT_SIGKILL = 0x10000  # ours: the faulting task has a fatal signal pending


class FaultHandler(Actor):
    role = "fault"
    concurrent = frozenset({"fault"})

    def setup(self) -> None:
        self.handlers["fault"] = self._on_fault

    def _on_fault(self, m: dict) -> dict:
        k = self.k
        k.current_task = m["task"]
        mm, addr, n, flags = m["mm"], m["addr"], m["npages"], m["flags"]
        store = _Store(m)
        lock = k.mmap_lock(mm, "do_user_addr_fault")
        lock.down_read(site="do_user_addr_fault")
        done, ret = 0, 0
        try:
            for i in range(n):
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
            k.current_task = 0
        return {"done": done, "ret": ret, "stored": store.stored if store else 0}


class _Store:
    """The part of a task's store that lies in the pages being faulted."""

    def __init__(self, m: dict) -> None:
        self.addr = m["store_addr"]
        self.fill = m["store_fill"]
        self.data = np.frombuffer(m["store_data"], dtype=np.uint8) if m["store_data"] else None
        if self.data is not None:
            self.length = len(self.data)
        else:
            self.length = m["store_len"] if self.fill >= 0 else 0
        self.stored = 0

    def __bool__(self) -> bool:
        return self.length > 0

    def complete(self, k, mm: int, page: int, force: bool) -> bool:
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
