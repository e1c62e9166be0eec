# A task: one user process of the model, driven by its scenario.
#
# Its system calls (mmap, madvise, prctl, fork, ...) run here, in its own process,
# as kernel code in process context. Its loads and stores are kernel/fault.py
# access_user() (the MMU model): a missing or write-protected pte is a fault request
# to the fault handler, and the task waits for the reply like a trapped CPU. The
# task keeps a private shadow of what it wrote (actors/shadow.py), so `verify` can
# prove that merging, COW, unmerge and swap were invisible to it. A fatal signal
# (SIGKILL from the OOM killer) is acted on at the next safe point: the task hands
# its exit to the exit path and its process ends.
from __future__ import annotations

from typing import Any

import numpy as np

from actors.base import Actor, KernelError, RemoteError
from actors.kernel import exec as execops
from actors.kernel import fork as forkops
from actors.kernel import proc, syscalls
from actors.kernel.context import Kernel
from actors.kernel.fault import Store, UserAccessError, access_user, mm_populate
from actors.kernel.memory import FAULT_FLAG_WRITE
from actors.shadow import Shadow, shadow_path
from protocol import codec
from protocol.abi import MADV_DONTNEED
from shared_mem.layout import TIF_SIGKILL


def _syscall(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except syscalls.SyscallError as e:
        raise KernelError(e.errno_name, str(e)) from None


class Task(Actor):
    role = "task"

    def __init__(self, cfg: dict[str, Any], name: str, task: str) -> None:
        super().__init__(cfg, name)
        self.task = int(task)
        self.shadow = Shadow(bool(cfg.get("shadow", True)))
        self.exiting = False
        self.stored = 0  # bytes of the current store done so far

    def setup(self) -> None:
        t = self.km.task
        ti = t.idx(self.task, "task_setup")
        self.mm = int(t.mm[ti])
        self.pid = int(t.pid[ti])
        for name in ("mmap", "munmap", "mprotect", "madvise", "prctl", "memset", "write", "read",
                     "fork", "execve", "mlockall", "munlockall", "exit", "verify", "ksm_stat", "signal",
                     "pagemap"):
            self.handlers[name] = getattr(self, f"_on_{name}")
        self.shadow.load(shadow_path(self.cfg["run_dir"], self.pid))   # a fork's parent's

    def kernel_setup(self, k: Kernel) -> None:
        k.current_task = self.task

    # -- signals and exit ----------------------------------------------------------------------
    def killed(self) -> bool:
        t = self.km.task
        return t.valid(self.task) and bool(t.flags[t.idx(self.task, "fatal_signal_pending")] & TIF_SIGKILL)

    def _do_exit(self, code: int, reason: str) -> None:
        if self.exiting:
            return
        self.exiting = True
        try:
            self.call("exit", "do_exit", task=self.task, code=code, reason=reason)
        except (RemoteError, KernelError) as e:
            # The exit path oopsed (it reported why); this task is gone all the same.
            self.ev("do_exit_failed", error=str(e))
        finally:
            self.stopping = True

    def _run_handler(self, handler: Any, peer: bytes, msg: dict) -> None:
        if self.exiting:
            if msg["id"]:
                self._reply(peer, codec.reply_err(msg, self.name, "ESRCH", "task has exited"))
            return
        try:
            super()._run_handler(self._guard(handler), peer, msg)
        finally:
            if self.killed() and not self.exiting:
                self._do_exit(128 + 9, "killed")

    def _guard(self, handler: Any) -> Any:
        def run(msg: dict) -> Any:
            try:
                return handler(msg)
            except UserAccessError as e:   # killed (EINTR), EFAULT, ENOMEM, EINVAL
                raise KernelError(e.errno_name, e.detail) from None
        return run

    def _on_signal(self, m: dict) -> None:
        if m["sig"] == 9:
            self._do_exit(128 + 9, "killed")

    def _on_exit(self, m: dict) -> dict:
        self._do_exit(m["code"], "exit")
        return {"code": m["code"]}

    # -- memory access -------------------------------------------------------------------------
    def _fault(self, addr: int, npages: int, flags: int, store: Store | None) -> tuple[int, int, int]:
        """The trap (kernel/fault.py FaultFn): a fault request to the fault handler, the
        trapped store along with it; waits for the reply (pages done, ret, bytes stored)."""
        s = {} if store is None else {
            "store_addr": store.addr, "store_len": store.length, "store_fill": store.fill,
            "store_data": b"" if store.data is None else store.data.tobytes()}
        r = self.call("fault", "fault", task=self.task, mm=self.mm, addr=addr, npages=npages,
                      write=bool(flags & FAULT_FLAG_WRITE), flags=flags, **s)
        return int(r.get("done", 0)), r["ret"], int(r.get("stored", 0))

    def _progress(self, n: int) -> None:
        self.stored = n

    def access(self, addr: int, length: int, write: bool, src: Any = None, force: bool = False) -> bytes:
        data = access_user(self.k, self.mm, addr, length, write, src, force, fault=self._fault,
                           progress=self._progress)
        if data:
            got = np.frombuffer(data, dtype=np.uint8)
            self.shadow.check_read(self.k, self.mm, self.pid, addr, got, self.report)
        return data or b""

    def populate(self, start: int, length: int, write: bool) -> None:
        mm_populate(self.k, self.mm, start, length, write, fault=self._fault)

    def _on_memset(self, m: dict) -> dict:
        value = m["value"] & 0xFF
        try:
            self.access(m["addr"], m["length"], True, value, m["force"])
        finally:  # a store that failed part way (ENOMEM, SIGSEGV) still wrote its prefix
            self.shadow.store(m["addr"], value, self.stored)
        return {"written": m["length"]}

    def _on_write(self, m: dict) -> dict:
        data = np.frombuffer(m["data"], dtype=np.uint8)
        try:
            self.access(m["addr"], len(data), True, data, m["force"])
        finally:
            self.shadow.store(m["addr"], data, self.stored)
        return {"written": len(data)}

    def _on_read(self, m: dict) -> bytes:
        return self.access(m["addr"], m["length"], False)

    # -- system calls --------------------------------------------------------------------------
    def _on_mmap(self, m: dict) -> int:
        start = _syscall(syscalls.sys_mmap, self.k, self.mm, m["length"], m["prot"], m["flags"], m["addr"],
                         m["nid"])
        self.shadow.drop(start, start + m["length"])   # MAP_FIXED replaced what was there
        return start

    def _on_munmap(self, m: dict) -> int:
        r = _syscall(syscalls.sys_munmap, self.k, self.mm, m["addr"], m["length"])
        self.shadow.drop(m["addr"], m["addr"] + m["length"])
        return r

    def _on_mprotect(self, m: dict) -> int:
        return _syscall(syscalls.sys_mprotect, self.k, self.mm, m["addr"], m["length"], m["prot"])

    def _on_madvise(self, m: dict) -> int:
        try:
            return _syscall(syscalls.sys_madvise, self.k, self.mm, m["addr"], m["length"], m["advice"])
        finally:
            if m["advice"] == MADV_DONTNEED:
                self.shadow.drop(m["addr"], m["addr"] + m["length"])

    def _on_prctl(self, m: dict) -> int:
        return _syscall(syscalls.sys_prctl, self.k, self.mm, m["option"], m["arg2"], m["arg3"],
                        m["arg4"], m["arg5"])

    def _on_mlockall(self, m: dict) -> int:
        for start, length, writable in _syscall(syscalls.sys_mlockall, self.k, self.mm, m["flags"]):
            self.populate(start, length, writable)
        return 0

    def _on_munlockall(self, m: dict) -> int:
        return _syscall(syscalls.sys_munlockall, self.k, self.mm)

    def _on_fork(self, m: dict) -> dict:
        child = _syscall(forkops.copy_process, self.k, self.task)
        pid = forkops.task_pid_nr(self.k, child, "fork")
        self.shadow.save(shadow_path(self.cfg["run_dir"], pid))   # before the child starts
        self.call("supervisor", "spawn_task", task=child, parent=self.task, name=f"task-{pid}")
        return {"pid": pid, "task": child}

    def _on_execve(self, m: dict) -> int:
        mm = execops.do_execve(self.k, self.task)
        if mm < 0:
            raise KernelError("ENOMEM", "execve: no mm_slot for the new mm")
        self.mm = mm
        self.shadow.drop(0, 1 << 64)        # the old address space is gone
        return 0

    # -- introspection -------------------------------------------------------------------------
    def _on_verify(self, m: dict) -> dict:
        return self.shadow.verify(self.k, self.mm, self.pid, self.report)

    def _on_pagemap(self, m: dict) -> list[int]:
        return proc.pagemap_read(self.k, self.mm, m["addr"], m["length"])

    def _on_ksm_stat(self, m: dict) -> dict:
        return proc.proc_pid_ksm_stat(self.k, self.mm)

