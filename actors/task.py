# A task: one user process of the model, driven by its scenario.
#
# Its system calls (mmap, madvise, prctl, fork, ...) run here, in its own process,
# as kernel code in process context. Its loads and stores go through the MMU
# model (memory.user_access): a missing or write-protected pte is a fault request
# to the fault handler, and the task waits for the reply like a trapped CPU. The
# task keeps a private shadow of what it wrote, so `verify` can prove that
# merging, COW, unmerge and swap were invisible to it. A fatal signal (SIGKILL
# from the OOM killer) is acted on at the next safe point: the task hands its exit
# to the exit path and its process ends.
from __future__ import annotations

import os
from typing import Any

import numpy as np

from actors.base import Actor, KernelError, RemoteError
from actors.fault import VM_FAULT_SIGKILL
from actors.kernel import fork as forkops
from actors.kernel import mm as mmops
from actors.kernel import syscalls, sysfs
from actors.kernel.context import Kernel
from actors.kernel.memory import (
    FAULT_FLAG_FORCE,
    FAULT_FLAG_UNSHARE,
    FAULT_FLAG_WRITE,
    VM_FAULT_OOM,
    VM_FAULT_SIGBUS,
    VM_FAULT_SIGSEGV,
    user_access,
)
from protocol.abi import MADV_DONTNEED
from shared_mem.layout import (
    PAGE_SIZE,
    PTE_PFN_MASK,
    PTE_PRESENT,
    PTE_SPECIAL,
    PTE_SWAP,
    TIF_SIGKILL,
)

MAX_FAULT_AROUND = 256


class Killed(Exception):
    pass


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
        self.shadow_on = bool(cfg.get("shadow", True))
        self.shadow: dict[int, np.ndarray] = {}
        self.exiting = False
        self.stored = 0  # bytes of the current store done so far

    def setup(self) -> None:
        t = self.km.task
        ti = t.idx(self.task, "task_setup")
        self.mm = int(t.mm[ti])
        self.pid = int(t.pid[ti])
        for name in ("mmap", "munmap", "mprotect", "madvise", "prctl", "memset", "write", "read",
                     "fork", "mlockall", "munlockall", "exit", "verify", "ksm_stat", "signal", "pagemap"):
            self.handlers[name] = getattr(self, f"_on_{name}")
        path = os.path.join(self.cfg["run_dir"], "shadow", f"{self.pid}.npz")
        if self.shadow_on and os.path.exists(path):
            with np.load(path) as z:
                self.shadow = {int(a): z[a].copy() for a in z.files}
            os.unlink(path)

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
            from protocol import codec

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
            except Killed:
                raise KernelError("EINTR", "task killed by SIGKILL") from None
        return run

    def _on_signal(self, m: dict) -> None:
        if m["sig"] == 9:
            self._do_exit(128 + 9, "killed")

    def _on_exit(self, m: dict) -> dict:
        self._do_exit(m["code"], "exit")
        return {"code": m["code"]}

    # -- memory access -------------------------------------------------------------------------
    def _fault(self, addr: int, npages: int, flags: int, **store: Any) -> int:
        """Fault npages from addr; a store passed along completes page by page in the
        handler (returns the bytes it stored), as the trapped instruction would."""
        r = self.call("fault", "fault", task=self.task, mm=self.mm, addr=addr & ~(PAGE_SIZE - 1),
                      npages=npages, write=bool(flags & FAULT_FLAG_WRITE), flags=flags, **store)
        ret = r["ret"]
        if ret & (VM_FAULT_SIGKILL | VM_FAULT_SIGSEGV | VM_FAULT_SIGBUS | VM_FAULT_OOM):
            # The handler may have completed the store on the pages before the one that
            # failed: those bytes are in memory, so they count (and go into the shadow).
            self.stored += int(r.get("stored", 0))
        if ret & VM_FAULT_SIGKILL or self.killed():
            raise Killed()
        if ret & VM_FAULT_SIGSEGV:
            raise KernelError("EFAULT", f"SIGSEGV at {addr:#x}")
        if ret & VM_FAULT_SIGBUS:
            raise KernelError("EFAULT", f"SIGBUS at {addr:#x}")
        if ret & VM_FAULT_OOM:
            raise KernelError("ENOMEM", f"out of memory faulting {addr:#x}")
        return int(r.get("stored", 0))

    def access(self, addr: int, length: int, write: bool, src: Any = None, force: bool = False) -> bytes:
        if length < 0:
            raise KernelError("EINVAL", "negative length")
        k = self.k
        dst = None if write else np.empty(length, dtype=np.uint8)
        done = self.stored = 0
        flags = (FAULT_FLAG_WRITE if write else 0) | (FAULT_FLAG_FORCE if force else 0)
        if force and write:
            flags |= FAULT_FLAG_UNSHARE
        while done < length:
            s = src if isinstance(src, int) or src is None else src[done:]
            d = None if dst is None else dst[done:]
            n, fault_addr = user_access(k, self.mm, addr + done, length - done, write, s, d, force)
            done += n
            self.stored = done
            if fault_addr < 0:
                break
            end = addr + length
            npages = min(MAX_FAULT_AROUND, (end - (fault_addr & ~(PAGE_SIZE - 1)) + PAGE_SIZE - 1) // PAGE_SIZE)
            if not write:
                self._fault(fault_addr, npages, flags)
                continue
            # The rest of the store that falls into the pages being faulted goes along.
            upto = min(end, (fault_addr & ~(PAGE_SIZE - 1)) + npages * PAGE_SIZE)
            store: dict[str, Any] = {"store_addr": fault_addr, "store_len": upto - fault_addr}
            if isinstance(src, int):
                store["store_fill"] = src
            else:
                off = fault_addr - addr
                store["store_data"] = src[off:off + upto - fault_addr].tobytes()
            done += self._fault(fault_addr, npages, flags, **store)
            self.stored = done
        if dst is not None and done and self.shadow_on:
            self._check_read(addr, dst[:done])
        return b"" if dst is None else dst.tobytes()

    # -- integrity: every load returns what this task stored ------------------------------------
    def _check_read(self, addr: int, got: np.ndarray) -> None:
        """Compare the bytes a user load returned with the shadow (zeros where the task
        stored nothing); a difference is an integrity report, whatever the caller does."""
        off, n = 0, len(got)
        shadow = self.shadow
        while off < n:
            a = addr + off
            page = a & ~(PAGE_SIZE - 1)
            po = a - page
            m = min(PAGE_SIZE - po, n - off)
            want = shadow.get(page)
            g = got[off:off + m]
            if g.any() if want is None else not np.array_equal(g, want[po:po + m]):
                self._integrity_report(page, po, g, None if want is None else want[po:po + m], n)
            off += m

    def _integrity_report(self, page: int, po: int, got: np.ndarray, want: np.ndarray | None, n: int) -> None:
        from actors.kernel import debug

        seen = self.__dict__.setdefault("_integrity_seen", set())
        if page in seen or len(seen) >= 32:
            return
        k = self.k
        if debug.vma_is_shared(k, self.mm, page):
            return      # MAP_SHARED: another process may have stored there
        seen.add(page)
        i = int(np.flatnonzero(got != (0 if want is None else want))[0])
        w, g = int(0 if want is None else want[i]), int(got[i])
        at = page + po + i
        with k.ptl(self.mm):
            pte = mmops.read_pte(k, self.mm, page)
        title = (f"ksmlab: integrity: task-{self.pid} read {n:#x} bytes at {at:#x}: "
                 f"expected {w:#04x}, got {g:#04x}")
        lines = [title, f"pte: {pte:016x}"]
        data: dict[str, Any] = {"task": self.pid, "addr": at, "expected": w, "got": g, "pte": pte,
                                "how": "read"}
        if pte & PTE_PRESENT and not pte & PTE_SPECIAL:
            pfn = pte & PTE_PFN_MASK
            lines += debug.dump_page(k, pfn, "user load returned bytes the task never stored")
            data.update(debug.page_data(k, pfn))
        elif pte & PTE_PRESENT:
            lines.append("the zero page")
        lines.append(f"bytes differ from offset {po + i} of the page; the task stored "
                     f"{'nothing' if want is None else 'other bytes'} there")
        self.report("integrity", title, "\n".join(lines) + "\n", data)

    def populate(self, start: int, length: int, write: bool) -> None:
        flags = FAULT_FLAG_WRITE if write else 0
        for a in range(start, start + length, MAX_FAULT_AROUND * PAGE_SIZE):
            n = min(MAX_FAULT_AROUND, (start + length - a) // PAGE_SIZE)
            self._fault(a, n, flags)

    def _shadow_store(self, addr: int, data: Any, length: int) -> None:
        if not self.shadow_on:
            return
        off = 0
        while off < length:
            a = addr + off
            page = a & ~(PAGE_SIZE - 1)
            po = a - page
            n = min(PAGE_SIZE - po, length - off)
            buf = self.shadow.get(page)
            if buf is None:
                buf = self.shadow[page] = np.zeros(PAGE_SIZE, dtype=np.uint8)
            if isinstance(data, int):
                buf[po:po + n] = data
            else:
                buf[po:po + n] = data[off:off + n]
            off += n

    def _shadow_drop(self, start: int, end: int) -> None:
        for a in [a for a in self.shadow if start <= a < end]:
            del self.shadow[a]

    def _on_memset(self, m: dict) -> dict:
        value = m["value"] & 0xFF
        try:
            self.access(m["addr"], m["length"], True, value, m["force"])
        finally:  # a store that failed part way (ENOMEM, SIGSEGV) still wrote its prefix
            self._shadow_store(m["addr"], value, self.stored)
        return {"written": m["length"]}

    def _on_write(self, m: dict) -> dict:
        data = np.frombuffer(m["data"], dtype=np.uint8)
        try:
            self.access(m["addr"], len(data), True, data, m["force"])
        finally:
            self._shadow_store(m["addr"], data, self.stored)
        return {"written": len(data)}

    def _on_read(self, m: dict) -> bytes:
        return self.access(m["addr"], m["length"], False)

    # -- system calls --------------------------------------------------------------------------
    def _on_mmap(self, m: dict) -> int:
        start = _syscall(syscalls.sys_mmap, self.k, self.mm, m["length"], m["prot"], m["flags"], m["addr"],
                         m["nid"])
        self._shadow_drop(start, start + m["length"])   # MAP_FIXED replaced what was there
        return start

    def _on_munmap(self, m: dict) -> int:
        r = _syscall(syscalls.sys_munmap, self.k, self.mm, m["addr"], m["length"])
        self._shadow_drop(m["addr"], m["addr"] + m["length"])
        return r

    def _on_mprotect(self, m: dict) -> int:
        return _syscall(syscalls.sys_mprotect, self.k, self.mm, m["addr"], m["length"], m["prot"])

    def _on_madvise(self, m: dict) -> int:
        try:
            return _syscall(syscalls.sys_madvise, self.k, self.mm, m["addr"], m["length"], m["advice"])
        finally:
            if m["advice"] == MADV_DONTNEED:
                self._shadow_drop(m["addr"], m["addr"] + m["length"])

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
        k = self.k
        t = self.km.task
        ti = t.idx(self.task, "fork")
        child = t.alloc(site="copy_process")
        ci = t.idx(child, "copy_process")
        pid = k.alloc_pid()
        t.pid[ci] = pid
        t.parent[ci] = self.task
        t.nid[ci] = t.nid[ti]
        t.comm[ci] = t.comm[ti]
        t.oom_score_adj[ci] = t.oom_score_adj[ti]
        try:
            t.mm[ci] = forkops.dup_mmap(k, self.mm, child)
        except Exception:
            t.free(child, site="copy_process:fail")
            raise
        t.state[ci] = 1
        if self.shadow_on:
            d = os.path.join(self.cfg["run_dir"], "shadow")
            os.makedirs(d, exist_ok=True)
            np.savez(os.path.join(d, f"{pid}.npz"), **{str(a): v for a, v in self.shadow.items()})
        k.ev("sched_process_fork", parent_pid=self.pid, child_pid=pid, child_task=ci)
        self.call("supervisor", "spawn_task", task=child, parent=self.task, name=f"task-{pid}")
        return {"pid": pid, "task": child}

    # -- introspection -------------------------------------------------------------------------
    def _mapped_pages(self) -> list[tuple[int, int, int]]:
        """(address, pte, vm_flags) of every page of every vma (kernel view, no faults)."""
        k = self.k
        km = self.km
        out = []
        for vma in mmops.vmas(k, self.mm):
            vi = km.vma.idx(vma, "pagemap_read")
            s, e, f = int(km.vma.start[vi]), int(km.vma.end[vi]), int(km.vma.flags[vi])
            for a, ptes, n in mmops.pte_ranges(k, self.mm, s, e):
                for j in range(n):
                    out.append((a + j * PAGE_SIZE, 0 if ptes is None else int(ptes[j]), f))
        return out

    def _page_bytes(self, pte: int) -> np.ndarray:
        if pte & PTE_PRESENT:
            return self.km.frames[pte & PTE_PFN_MASK]
        if pte & PTE_SWAP and self.km.swap is not None:
            slot = pte & PTE_PFN_MASK
            cached = int(self.km.swap_cache[slot]) - 1  # still in the swap cache?
            return self.km.frames[cached] if cached >= 0 else self.km.swap[slot]
        return np.zeros(PAGE_SIZE, dtype=np.uint8)

    def _on_verify(self, m: dict) -> dict:
        """Every page reads back exactly what this task wrote (zeros where it wrote nothing)."""
        k = self.k
        lock = k.mmap_lock(self.mm, "verify")
        lock.down_read()
        bad = []
        checked = 0
        try:
            with k.ptl(self.mm):
                for addr, pte, _f in self._mapped_pages():
                    want = self.shadow.get(addr)
                    got = self._page_bytes(pte)
                    ok = not got.any() if want is None else np.array_equal(got, want)
                    checked += 1
                    if not ok and len(bad) < 16:
                        i = int(np.flatnonzero(got != (want if want is not None else 0))[0])
                        bad.append({"addr": addr, "offset": i, "pte": pte,
                                    "want": int(0 if want is None else want[i]), "got": int(got[i])})
        finally:
            lock.up_read()
        if bad:
            b0 = bad[0]
            title = (f"ksmlab: integrity: task-{self.pid} verify at {b0['addr'] + b0['offset']:#x}: "
                     f"expected {b0['want']:#04x}, got {b0['got']:#04x} ({len(bad)} page(s) differ)")
            text = title + "\n" + "\n".join(
                f"  addr {b['addr']:#x}+{b['offset']}: wrote {b['want']:#04x}, reads {b['got']:#04x} (pte {b['pte']:#x})"
                for b in bad) + "\n"
            self.report("integrity", title, text, {"task": self.pid, "bad": bad, "how": "verify"})
        return {"checked": checked, "bad": bad}

    def _on_pagemap(self, m: dict) -> list[int]:
        """Frame number per page of [addr, addr+length), -1 when not present (no faults)."""
        k = self.k
        out = []
        with k.ptl(self.mm):
            for _a, ptes, n in mmops.pte_ranges(k, self.mm, m["addr"], m["addr"] + m["length"]):
                for j in range(n):
                    pte = 0 if ptes is None else int(ptes[j])
                    out.append(pte & PTE_PFN_MASK if pte & PTE_PRESENT else -1)
        return out

    def _on_ksm_stat(self, m: dict) -> dict:
        k = self.k
        lock = k.mmap_lock(self.mm, "ksm_stat")
        lock.down_read()
        try:
            return sysfs.ksm_stat(k, self.mm)
        finally:
            lock.up_read()

