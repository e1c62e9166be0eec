# ksmd: ksm_scan_thread() as a process.
#
# Each round takes ksm_thread_mutex, scans pages_to_scan pages if ksmd should run
# (run=1 and some mm registered), drops the mutex and sleeps sleep_millisecs; a
# wakeup message (a knob write, the first __ksm_enter) cuts the sleep short, as
# wake_up_interruptible(&ksm_iter_wait / &ksm_thread_wait) does.
#
# KSMLAB_KSMD_PROFILE=FILE in the environment runs every ksm_do_scan() batch under
# cProfile and dumps the stats to FILE when ksmd stops (bench/bench_ksmd.py).
from __future__ import annotations

import cProfile
import os
import time

from actors.base import Actor
from actors.kernel.ksm_scan import SCAN_FUNCS, ksm_scan_thread_round, ksmd_should_run


class Ksmd(Actor):
    role = "ksmd"

    def setup(self) -> None:
        self.handlers["wakeup"] = self._on_wakeup
        self.next_scan = 0.0
        self.k.ksm["ksmd_pid"] = os.getpid()
        self.prof_path = os.environ.get("KSMLAB_KSMD_PROFILE") or None
        self.prof = None
        if self.prof_path:
            self.prof = cProfile.Profile()

    def flush_every(self) -> int:
        return 4096

    def _on_wakeup(self, msg: dict) -> None:
        self.next_scan = 0.0

    def poll_timeout_ms(self) -> int:
        if not ksmd_should_run(self.k):
            return 100
        return max(0, int((self.next_scan - time.monotonic()) * 1000))

    def tick(self) -> None:
        k = self.k
        if time.monotonic() < self.next_scan or not ksmd_should_run(k):
            return
        if self.prof is None:
            ksm_scan_thread_round(k)
        else:
            scan = SCAN_FUNCS[int(k.ksm["scan_mode"])]
            ksm_scan_thread_round(k, lambda k, n: self.prof.runcall(scan, k, n))
        self.ev.flush()
        self.next_scan = time.monotonic() + int(k.ksm["sleep_millisecs"]) / 1000.0

    def close(self) -> None:
        if self.prof is not None:
            try:
                self.prof.dump_stats(self.prof_path)
            except OSError as e:
                self.ev("profile_dump_failed", path=self.prof_path, error=str(e))
        super().close()
