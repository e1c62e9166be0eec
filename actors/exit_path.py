# The exit path: do_exit() -> exit_mm() -> mmput() on behalf of a dying task.
#
# A task that exits, or dies of a fatal signal, hands its exit to this actor and
# ends its process; here the task's mm is detached and mmput() runs __mmput
# (ksm_exit, exit_mmap, mmdrop). Each exit is its own worker thread, so one exit
# waiting at the __ksm_exit barrier does not hold up the others.
from __future__ import annotations

from actors.base import Actor
from actors.kernel.exit import mmput
from shared_mem.layout import PF_EXITING, TASK_DEAD, TASK_EXITING


class ExitPath(Actor):
    role = "exit"
    concurrent = frozenset({"do_exit"})

    def setup(self) -> None:
        self.handlers["do_exit"] = self._on_do_exit

    def _on_do_exit(self, m: dict) -> dict:
        k = self.k
        t = self.km.task
        task = m["task"]
        ti = t.idx(task, "do_exit")
        k.current_task = task
        t.atomic("flags").set_bits(ti, PF_EXITING)
        t.state[ti] = TASK_EXITING
        pid = int(t.pid[ti])
        k.ev("sched_process_exit", task=ti, pid=pid, code=m["code"], reason=m["reason"])
        mm = int(t.mm[ti])
        t.mm[ti] = 0
        try:
            if mm:
                mmput(k, mm)
        finally:
            t.state[ti] = TASK_DEAD
            t.exit_code[ti] = m["code"]
            k.current_task = 0
            t.free(task, site="release_task")
            self.notify("supervisor", "task_exited", task=task, code=m["code"], pid=pid,
                        reason=m["reason"])
        return {"pid": pid}
