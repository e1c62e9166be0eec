# The OOM killer and the OOM reaper.
#
# out_of_memory requests are served one at a time (the kernel's oom_lock); a kill
# marks the victim and sends it SIGKILL (a signal message: the task acts on it at
# its next safe point, like a fatal signal delivered on return to user mode); the
# reaper frees the victim's anonymous memory after OOM_REAPER_DELAY in a thread.
from __future__ import annotations

import time

from actors.base import Actor
from actors.kernel.oom import oom_reap_task, out_of_memory
from shared_mem.arena import handle_id


class OomKiller(Actor):
    role = "oom"

    def setup(self) -> None:
        self.handlers["out_of_memory"] = self._on_oom
        self.reaper_delay = float(self.cfg.get("oom_reaper_delay", 0.2))
        self.oom_mms: list[int] = []  # victims' pinned mms until the reaper is done

    def _on_oom(self, m: dict) -> dict:
        k = self.k
        res = out_of_memory(k, self.oom_mms)
        if res["action"] == "kill":
            self.notify(f"task-{res['pid']}", "signal", sig=9)
            if self.variants.reverted("oom-deadlock"):
                # 2009 had no OOM reaper: only the victim's own exit frees its memory.
                k.ev("oom_reaper_absent", mm=handle_id(res["mm"]))
            else:
                self.pool.submit(self._reap, res["mm"])
            res = {**res, "victim": handle_id(res["victim"])}
        elif res["action"] == "none":
            title = "Kernel panic - not syncing: System is deadlocked on memory"
            self.report("oom_panic", title, f"Out of memory and no killable processes...\n{title}\n",
                        {"requester": m["ctx"]})
        return res

    def _reap(self, mm: int) -> None:
        time.sleep(self.reaper_delay)
        if mm:
            oom_reap_task(self.k, mm, self.oom_mms)
        self.ev.flush()
