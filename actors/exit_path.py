# The exit path: do_exit() -> exit_mm() -> mmput() on behalf of a dying task.
#
# A task that exits, or dies of a fatal signal, hands its exit to this actor and
# ends its process; here the task's mm is detached and mmput() runs __mmput
# (ksm_exit, exit_mmap, mmdrop). Each exit is its own worker thread, so one exit
# waiting at the __ksm_exit barrier does not hold up the others. The exit itself is
# actors/kernel/exit.py do_exit(); this shell runs it and tells the supervisor.
from __future__ import annotations

from actors.base import Actor, KernelError
from actors.kernel.exit import do_exit
from actors.kernel.fork import live_task, task_pid_nr


class ExitPath(Actor):
    role = "exit"
    concurrent = frozenset({"do_exit"})

    def setup(self) -> None:
        self.handlers["do_exit"] = self._on_do_exit

    def _on_do_exit(self, m: dict) -> dict:
        task, code, reason = m["task"], m["code"], m["reason"]
        # From the supervisor (a task killed from outside) the handle came from outside:
        # one that names no live task (it has exited already, its slot perhaps reused) is
        # kill()'s ESRCH, not a use-after-free. A task's own exit keeps the checked access.
        if m.get("src") == "supervisor" and live_task(self.km, task) is None:
            raise KernelError("ESRCH", f"do_exit: no live task {task:#x}")
        pid = task_pid_nr(self.k, task, "do_exit")
        try:
            rc = do_exit(self.k, task, code, reason)
        except BaseException:   # the task is released even if its mmput() oopsed
            self.notify("supervisor", "task_exited", task=task, code=code, pid=pid, reason=reason)
            raise
        if rc < 0:
            raise KernelError("ESRCH", f"do_exit: task {pid} is exiting already")
        self.notify("supervisor", "task_exited", task=task, code=code, pid=pid, reason=reason)
        return {"pid": pid}
