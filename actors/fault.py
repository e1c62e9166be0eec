# The page-fault handler: handle_mm_fault() on behalf of a trapped task.
#
# A task whose load/store finds no usable pte sends a fault request and waits for
# the reply, as a CPU trapped in the fault handler would. Each request runs in its
# own worker thread (its own kernel context), so a fault waiting for memory does
# not hold up other tasks' faults. mmap_read_lock is taken per request and every
# page is a full handle_mm_fault(); the fault gives up early if the task was killed.
from __future__ import annotations

from actors.base import Actor
from actors.kernel import mm as mmops
from actors.kernel.memory import VM_FAULT_ERROR, VM_FAULT_SIGSEGV, handle_mm_fault
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
        lock = k.mmap_lock(mm, "do_user_addr_fault")
        lock.down_read()
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
        finally:
            lock.up_read()
            k.current_task = 0
        return {"done": done, "ret": ret}
