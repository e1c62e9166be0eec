# soak: everything at once, for a bounded time, then every invariant.
#
# Workers drive tasks that map memory with a seeded mix of duplicated, unique and
# zero pages, advise it mergeable (madvise or prctl), rewrite pages (COW on KSM
# pages), reshape areas (mprotect and madvise of part of an area split its vma;
# prctl turns whole-process merging on and off), fork, exec, exit, and allocate past
# physical memory so that kswapd swaps KSM and anonymous pages out and faults bring
# them back, or the OOM killer kills.
# Rarely, the shapes the kernel's reproducers use: LTP ksm05's short-lived task with
# an empty mergeable area, an mlockall task with a PROT_NONE guard area, and a drain
# in which every task exits and the mm list goes empty under ksmd (at half the
# checkpoints, with the workers parked, followed by a burst of short-lived tasks).
# ksmd runs flat out and run is toggled through 0, 1 and now and then 2. At
# quiescent points every live task verifies it reads back exactly what it wrote,
# and the invariants of DESIGN.md are checked; at the end every task exits, ksmd
# reaps every slot, and nothing may be leaked. Bounded: `seconds` (ctx.args or
# KSMLAB_SOAK_SECONDS, default 60 here and 12 in the test suite) and `ops`.
#
# The seed draws the NUMA node count (derive), the knobs (draw_knobs) and every
# choice of the workers, and drives the schedule plan, so a campaign of soak seeds
# covers chains, zero pages, node switches and narrow windows, and a failing seed
# can be replayed with the same draws.
from __future__ import annotations

import asyncio
import errno
import os
import random
import time
from typing import Any

from actors.cluster import Cluster, ClusterCrashed, SyscallFailed, Task
from actors.kernel import mm_slot
from ksmlab.scenario import ScenarioContext
from protocol.abi import (
    MADV_MERGEABLE,
    MADV_UNMERGEABLE,
    MCL_CURRENT,
    MCL_FUTURE,
    PAGE_SIZE,
    PR_SET_MEMORY_MERGE,
    PROT_EXEC,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
)

NAME = "soak"
DESCRIPTION = "tasks fork, write, exit, swap and get OOM-killed while ksmd merges; bounded; all invariants"
# Lock records are off: a long soak makes millions (`run soak --trace-locks` keeps them).
OPTIONS: dict[str, Any] = {"frames": 768, "swap_slots": 384, "max_tasks": 64, "max_mms": 64,
                           "trace_locks": False, "hung_task_timeout": 30.0}

CONTENTS = 24

# The knobs a seed draws, so that a campaign exercises chains and dups (small
# max_page_sharing), the zero-page merge, smart scan, per-node trees and short scan
# batches instead of only the defaults: (knob, choices).
KNOB_CHOICES: list[tuple[str, list[int]]] = [
    ("max_page_sharing", [2, 3, 4, 8, 256]),
    ("use_zero_pages", [0, 1]),
    ("smart_scan", [0, 1]),
    ("pages_to_scan", [7, 32, 100, 200, 500]),
]


def knob_seed(seed: int, args: dict[str, Any]) -> int:
    """The seed the configuration (nodes, knobs) is drawn from: the run's own, or a parent's
    (`--arg knob_seed=S`): a coverage-guided campaign keeps a configuration that reached new
    branches and varies the workload and the schedule around it."""
    return int(args.get("knob_seed", seed))


def derive(seed: int, args: dict[str, Any]) -> dict[str, Any]:
    """Cluster options drawn from the seed: a third of the runs boot two NUMA nodes."""
    return {"nodes": 2 if random.Random(knob_seed(seed, args) ^ 0x4E554D41).random() < 0.35 else 1}


def draw_knobs(seed: int, nodes: int) -> dict[str, int]:
    rng = random.Random(seed ^ 0x4B4E4F42)
    knobs = {name: rng.choice(choices) for name, choices in KNOB_CHOICES}
    if nodes > 1:
        knobs["merge_across_nodes"] = rng.choice([0, 1])
    return knobs


def _page(content: int) -> bytes:
    return content.to_bytes(4, "little") * (PAGE_SIZE // 4)


class _Gone(Exception):
    pass


class Soak:
    def __init__(self, c: Cluster, ctx: ScenarioContext, seed: int, seconds: float, max_ops: int) -> None:
        self.c = c
        self.ctx = ctx
        self.rng = random.Random(seed)
        self.deadline = time.monotonic() + seconds
        self.max_ops = max_ops
        self.ops = 0
        self.tasks: list[Task] = []
        self.areas: dict[int, list[tuple[int, int]]] = {}
        self.stats: dict[str, int] = {}
        self.running = asyncio.Event()
        self.running.set()
        self.busy = 0
        self.idle = asyncio.Event()
        self.advisor_rate: int | None = None    # pages_to_scan before the advisor took over
        self.held: dict[int, int] = {}          # pid -> workers operating on that task now
        self.gone: set[int] = set()             # pids of tasks killed under us

    def count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    async def call(self, t: Task, coro: Any) -> Any:
        try:
            return await coro
        except SyscallFailed as e:
            if t.exited.done() or e.errno in (errno.ESRCH, errno.EINTR):   # OOM-killed meanwhile
                self.drop(t)
                raise _Gone() from None
            if e.errno in (errno.EAGAIN, errno.ENOMEM):
                # Out of memory is an answer the kernel gives under pressure (MADV_UNMERGEABLE
                # returns EAGAIN when breaking COW cannot get a page): count it, go on.
                self.count(f"{errno.errorcode[e.errno]}")
                raise _Gone() from None
            raise

    def drop(self, t: Task) -> None:
        self.gone.add(t.pid)
        if t in self.tasks:
            self.tasks.remove(t)
            self.count("killed_or_gone")

    async def new_task(self) -> Task:
        t = await self.c.spawn_task(comm="soak")
        self.tasks.append(t)
        self.areas[t.pid] = []
        return t

    async def map_and_fill(self, t: Task, npages: int = 0) -> None:
        npages = npages or self.rng.choice([8, 16, 32, 64])
        addr = await self.call(t, t.mmap(npages * PAGE_SIZE))
        data = bytearray()
        hog = npages > 64
        for _ in range(npages):
            r = 1.0 if hog else self.rng.random()
            data += _page(0) if r < 0.2 else _page(self.rng.randrange(1, CONTENTS)) if r < 0.8 \
                else _page(self.rng.randrange(1 << 20, 1 << 30))
        await self.call(t, t.write(addr, bytes(data)))
        if self.rng.random() < 0.8:
            await self.call(t, t.madvise(addr, npages * PAGE_SIZE, MADV_MERGEABLE))
        self.areas[t.pid].append((addr, npages))
        self.count("mmap")

    async def short_lived(self) -> None:
        """LTP ksm05's task: an empty mergeable area (a slot without rmap_items, the
        __ksm_exit fast path), a short life, then exit while ksmd scans."""
        t = await self.c.spawn_task(comm="ksm05")
        n = self.rng.choice([1, 4, 16]) * PAGE_SIZE
        try:
            a = await t.mmap(n)
            await t.madvise(a, n, MADV_MERGEABLE)
            await asyncio.sleep(self.rng.uniform(0, 0.05))
            await t.exit()
        except SyscallFailed:
            pass                       # OOM-killed meanwhile
        self.count("short_lived")

    async def mlocked(self) -> None:
        """A task that mlockall(MCL_CURRENT|MCL_FUTURE)s and has a PROT_NONE area (a guard
        page, as cryptsetup has): its exit munlocks areas it could never fault in."""
        t = await self.new_task()
        await self.call(t, t.mlockall(MCL_CURRENT | MCL_FUTURE))
        await self.map_and_fill(t, self.rng.choice([4, 8]))
        await self.call(t, t.mmap(self.rng.choice([1, 4]) * PAGE_SIZE, prot=PROT_NONE))
        self.count("mlocked")

    async def drain(self, burst: int = 2) -> None:
        """Every task exits, then `burst` short-lived tasks one after another: the mm list
        goes empty under ksmd again and again (LTP ksm05's loop; CVE-2011-2183's last mm
        exiting while ksmd looks at the list)."""
        # Take the whole list at once: while one exit is awaited, another worker may pick,
        # exit or drop any task still listed.
        victims = self.tasks[:]
        self.tasks.clear()
        for t in victims:
            try:
                await self.call(t, t.exit())
            except _Gone:
                pass
        for _ in range(burst):
            await self.short_lived()
        self.count("drain")

    async def execve(self) -> None:
        """A task no other worker is using execs: exec_mmap's mmput of the old mm runs
        __ksm_exit on it, and the new mm is registered at once when merge-any came along
        (ksm_execve). The task is off the list meanwhile, since its old areas vanish under
        any worker that would still write to them (EFAULT). It then maps and fills a new
        area and is back on the list."""
        free = [t for t in self.tasks if not self.held.get(t.pid)]
        if not free:
            return
        t = self.rng.choice(free)
        self.tasks.remove(t)
        try:
            await self.call(t, t.execve())
        except _Gone:
            if t.pid not in self.gone:       # ENOMEM: the exec failed, the old mm stays
                self.tasks.append(t)
            raise
        self.areas[t.pid] = []
        self.count("execve")
        self.tasks.append(t)
        await self.map_and_fill(t)

    async def rare(self) -> None:
        r = self.rng.random()
        if r < 0.45:
            await self.short_lived()
        elif r < 0.65 and len(self.tasks) < 12:
            await self.mlocked()
        elif r < 0.85:
            await self.execve()
        elif self.busy == 1:           # only when no other worker holds a task
            await self.drain()

    async def step(self) -> None:
        rng = self.rng
        if rng.random() < 0.06:
            await self.rare()
            return
        if len(self.tasks) < 3 or (len(self.tasks) < 10 and rng.random() < 0.1):
            t = await self.new_task()
            if rng.random() < 0.3:
                await self.call(t, t.prctl(PR_SET_MEMORY_MERGE, 1))
            await self.map_and_fill(t)
            return
        t = rng.choice(self.tasks)
        self.held[t.pid] = self.held.get(t.pid, 0) + 1     # execve() leaves it alone
        try:
            await self.on_task(t)
        finally:
            self.held[t.pid] -= 1

    async def on_task(self, t: Task) -> None:
        rng = self.rng
        areas = self.areas.get(t.pid) or []
        r = rng.random()
        if r < 0.05:
            # A memory hog: unique pages past what is free, for kswapd and the OOM killer.
            await self.map_and_fill(t, 96 + self.rng.randrange(96))
            self.count("hog")
        elif r < 0.25 or not areas:
            await self.map_and_fill(t)
        elif r < 0.55:
            addr, npages = rng.choice(areas)
            off = rng.randrange(npages) * PAGE_SIZE + rng.randrange(PAGE_SIZE - 8)
            await self.call(t, t.write(addr + off, rng.randbytes(8)))
            self.count("write")
        elif r < 0.65:
            addr, npages = rng.choice(areas)
            await self.call(t, t.read(addr, npages * PAGE_SIZE))
            self.count("read")
        elif r < 0.72 and len(self.tasks) < 12:
            child = await self.call(t, t.fork())
            self.tasks.append(child)
            self.areas[child.pid] = list(areas)
            self.count("fork")
        elif r < 0.80:
            addr, npages = areas.pop(rng.randrange(len(areas)))
            await self.call(t, t.munmap(addr, npages * PAGE_SIZE))
            self.count("munmap")
        elif r < 0.84:
            addr, npages = rng.choice(areas)
            await self.call(t, t.madvise(addr, npages * PAGE_SIZE, MADV_UNMERGEABLE))
            self.count("unmerge")
        elif r < 0.87:
            await self.reshape(t, rng.choice(areas))
        elif r < 0.88:
            # /proc/PID/ksm_stat, as ksm tools read it while the task runs.
            await self.call(t, t.ksm_stat())
            self.count("ksm_stat")
        elif r < 0.93 and len(self.tasks) > 2:
            self.tasks.remove(t)
            await self.call(t, t.exit())
            self.count("exit")
        else:
            await self.knob()

    async def reshape(self, t: Task, area: tuple[int, int]) -> None:
        """Part of an area changes: its vma splits (mprotect adds PROT_EXEC and takes it
        away again, so that another worker's write stays legal; or madvise of a
        sub-range), or the whole process's merging is switched
        (PR_SET_MEMORY_MERGE 0 unmerges every area: ksm_disable_merge_any)."""
        addr, npages = area
        first = self.rng.randrange(npages)
        n = self.rng.randrange(1, npages - first + 1)
        sub, length = addr + first * PAGE_SIZE, n * PAGE_SIZE
        r = self.rng.random()
        if r < 0.4:
            await self.call(t, t.mprotect(sub, length, PROT_READ | PROT_WRITE | PROT_EXEC))
            await self.call(t, t.mprotect(sub, length, PROT_READ | PROT_WRITE))
            self.count("mprotect")
        elif r < 0.8:
            advice = MADV_MERGEABLE if self.rng.random() < 0.5 else MADV_UNMERGEABLE
            await self.call(t, t.madvise(sub, length, advice))
            self.count("madvise_part")
        else:
            await self.call(t, t.prctl(PR_SET_MEMORY_MERGE, int(self.rng.random() < 0.5)))
            self.count("prctl")

    async def tune(self) -> None:
        """A knob that needs no empty KSM, written while ksmd runs: zero-page merging and
        smart scan on or off, the chain prune interval, or the scan-time advisor switched
        on with its limits (it then tunes pages_to_scan after each pass) or off again
        (which resets pages_to_scan, so the seed's rate is written back)."""
        rng, c = self.rng, self.c
        r = rng.random()
        if r < 0.3:
            name = rng.choice(["use_zero_pages", "smart_scan"])
            await c.sysfs_write(name, 1 - int(c.sysfs_read(name)))
        elif r < 0.5:
            name = "stable_node_chains_prune_millisecs"
            await c.sysfs_write(name, rng.choice([0, 10, 2000]))
        elif self.advisor_rate is None:
            name = "advisor_mode"
            rate = self.advisor_rate = int(c.sysfs_read("pages_to_scan"))
            for knob, value in (("advisor_max_cpu", rng.choice([10, 70])),
                                ("advisor_min_pages_to_scan", rate),
                                ("advisor_max_pages_to_scan", max(rate, 30000)),
                                ("advisor_target_scan_time", rng.choice([1, 200]))):
                await c.sysfs_write(knob, value)
            await c.sysfs_write("advisor_mode", "scan-time")     # on until the next such tune
        else:
            name = "advisor_mode_none"
            await c.sysfs_write("advisor_mode", "none")
            await c.sysfs_write("pages_to_scan", self.advisor_rate)
            self.advisor_rate = None
        self.count(f"tune_{name}")

    async def knob(self) -> None:
        if self.rng.random() < 0.3:
            await self.tune()
            return
        r = self.rng.random()
        value = 2 if r < 0.15 else 0 if r < 0.35 else 1
        unmerged = False
        try:
            await self.c.sysfs_write("run", value)
            unmerged = value == 2
        except SyscallFailed as e:   # run=2 may fail with ENOMEM under pressure: run is then 0
            self.count(f"run{value}_{e.strerror or e.errno}")
        self.count(f"run{value}")
        if unmerged and self.rng.random() < 0.5:
            # The knobs that may only change once nothing is shared (seed 002's switch of
            # merge_across_nodes after run=2 among them); EBUSY is the kernel's answer when
            # something is still shared.
            name = "merge_across_nodes" if self.c.opts.nodes > 1 and self.rng.random() < 0.6 \
                else "max_page_sharing"
            new = (1 - int(self.c.sysfs_read(name)) if name == "merge_across_nodes"
                   else self.rng.choice(KNOB_CHOICES[0][1]))
            try:
                await self.c.sysfs_write(name, new)
                self.count(f"{name}={new}")
            except SyscallFailed as e:
                self.count(f"{name}_{errno.errorcode.get(e.errno, e.errno)}")
        if value != 1:
            await self.c.sysfs_write("run", 1)

    async def worker(self) -> None:
        while time.monotonic() < self.deadline and self.ops < self.max_ops:
            await self.running.wait()
            self.busy += 1
            try:
                self.ops += 1
                await self.step()
            except _Gone:
                pass
            finally:
                self.busy -= 1
                if self.busy == 0:
                    self.idle.set()

    async def quiesce(self) -> None:
        self.running.clear()
        while self.busy:
            self.idle.clear()
            await self.idle.wait()

    async def checkpoint(self, when: str) -> None:
        """All workers parked: every task verifies, then the invariants."""
        await self.quiesce()
        try:
            for t in list(self.tasks):
                try:
                    v = await self.call(t, t.verify())
                except _Gone:
                    continue
                self.ctx.expect(f"{when}: task {t.pid} reads back what it wrote", v["bad"], [])
            found = self.c.check_invariants()
            self.ctx.expect(f"{when}: invariants", [r["title"] for r in found], [])
            self.count("checkpoint")
            # With every worker parked, now and then the whole machine drains: only here
            # can the mm list really go empty (a worker's own drain races the others).
            if self.rng.random() < 0.5:
                await self.drain(burst=self.rng.choice([4, 8, 16]))
        finally:
            self.running.set()


def soak_seconds(args: dict[str, Any]) -> float:
    return float(args.get("seconds", os.environ.get("KSMLAB_SOAK_SECONDS", 60)))


def time_limit(args: dict[str, Any]) -> float:
    """The run's deadline: the load, then checkpoints and a teardown that may take minutes."""
    return 2 * soak_seconds(args) + 180


async def scenario(c: Cluster, ctx: ScenarioContext) -> dict:
    seconds = soak_seconds(ctx.args)
    max_ops = int(ctx.args.get("ops", 100_000))
    s = Soak(c, ctx, c.opts.seed, seconds, max_ops)
    knobs = draw_knobs(knob_seed(c.opts.seed, ctx.args), c.opts.nodes)
    ctx.log(f"soak: seed {c.opts.seed} draws nodes {c.opts.nodes}, knobs {knobs}")
    c.ev("soak_knobs", nodes=c.opts.nodes, **knobs)
    for name, value in knobs.items():
        await c.sysfs_write(name, value)
    await c.sysfs_write("sleep_millisecs", 0)
    await c.sysfs_write("run", 1)
    workers = [asyncio.create_task(s.worker()) for _ in range(3)]
    try:
        while any(not w.done() for w in workers):
            done, _ = await asyncio.wait(workers, timeout=max(1.0, seconds / 4))
            for w in done:
                if w.exception() is not None:
                    raise w.exception()  # type: ignore[misc]
            if any(not w.done() for w in workers):
                await s.checkpoint(f"t+{s.ops} ops")
    except ClusterCrashed:
        raise
    finally:
        for w in workers:
            w.cancel()
    await s.checkpoint("end of load")
    ctx.log(f"soak: {s.ops} operations: {dict(sorted(s.stats.items()))}")
    # Teardown: every task exits, ksmd reaps every slot, nothing may be left.
    for t in list(s.tasks):
        try:
            await s.call(t, t.exit())
        except _Gone:
            pass
    await c.sysfs_write("run", 1)
    await c.wait_for(lambda: mm_slot.list_empty(c.k), 60, "ksmd to reap every mm_slot")
    await c.wait_for(lambda: c.km.mm.nr_live() == 0, 30, "every mm to be freed")
    leaks = c.check_leaks()
    ctx.expect("leaks after teardown", [r["text"] for r in leaks], [])
    ctx.expect("reports", [r["title"] for r in c.reports], [])
    return {"ops": s.ops, "stats": s.stats}
