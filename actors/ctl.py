# sysfs/ctl: writes to /sys/kernel/mm/ksm/* with the kernel's store handlers.
#
# Writes run in worker threads (run=2 may take a while under ksm_thread_mutex and
# must not stop reads); reads are lock-free snapshots of the shared counters. A
# write may name the task doing it: during run=2 that task is the OOM origin.
from __future__ import annotations

from actors.base import Actor, KernelError
from actors.kernel import sysfs


class Ctl(Actor):
    role = "ctl"
    concurrent = frozenset({"sysfs_write"})

    def setup(self) -> None:
        self.handlers["sysfs_write"] = self._on_write
        self.handlers["sysfs_read"] = self._on_read

    def _on_write(self, m: dict) -> dict:
        try:
            sysfs.store(self.k, m["knob"], m["value"], task=m["task"])
        except sysfs.SysfsError as e:
            raise KernelError(e.errno_name, str(e)) from None
        return {"knob": m["knob"], "value": sysfs.show(self.k, m["knob"])}

    def _on_read(self, m: dict) -> str:
        try:
            return sysfs.show(self.k, m["name"])
        except sysfs.SysfsError as e:
            raise KernelError(e.errno_name, str(e)) from None
