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
# faulted-in but not yet written where ksmd could see it. The fault itself is
# actors/kernel/fault.py do_user_addr_fault(); this shell runs it for the message's task.
from __future__ import annotations

from actors.base import Actor
from actors.kernel.fault import Store, do_user_addr_fault


class FaultHandler(Actor):
    role = "fault"
    concurrent = frozenset({"fault"})

    def setup(self) -> None:
        self.handlers["fault"] = self._on_fault

    def _on_fault(self, m: dict) -> dict:
        k = self.k
        store = Store(m["store_addr"], m["store_len"], m["store_fill"], m["store_data"])
        k.current_task = m["task"]   # the fault runs in the trapped task's context
        try:
            done, ret, stored = do_user_addr_fault(k, m["mm"], m["addr"], m["npages"], m["flags"],
                                                   store)
        finally:
            k.current_task = 0
        return {"done": done, "ret": ret, "stored": stored}
