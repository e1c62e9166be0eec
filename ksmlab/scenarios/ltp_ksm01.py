# Port of LTP testcases/kernel/mem/ksm/ksm01.c, i.e. create_same_memory() of
# ksm_test.h: three "children" each map `size` MB in 1 MB units, advise them
# MADV_MERGEABLE, then go through four fill phases while ksmd merges:
#
#   phase   child 0   child 1                      child 2
#   1       'c'       'a'                          'a'
#   2       'c'       'b'                          'a'
#   3       'd'       'd'                          'd'
#   4       'd'       'd', last byte of last page 'e'   'd'
#
# After each phase the parent waits for three more full scans, checks run == 1,
# writes run=0 for the duration of the counter checks (so that no rmap_item is
# caught between the old and the new unstable tree) and checks pages_shared,
# pages_sharing, pages_volatile, pages_unshared, sleep_millisecs and
# pages_to_scan against LTP's table, with P = size * 256 * 3 pages and
# max_page_sharing = P; then each child verifies its memory. Finally run=2 (all
# counters 0, the children still read their data) and run=0.
#
# What differs: the children are model tasks driven by the scenario instead of
# forked processes stopping themselves with SIGSTOP; the default size is 8 MB
# per child (P = 6144) instead of LTP's 128 MB, to keep the run short; pass
# args={"size_mb": N} (and enough frames) for other sizes; the children store
# in 64 KiB pieces (see STORE_CHUNK). Like today's LTP,
# the test saves and restores run, sleep_millisecs and max_page_sharing, forces
# merge_across_nodes=1 and turns smart_scan off (the phases rewrite pages that
# ksmd already visited, so smart scan would skip them for longer than the
# test waits).
from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from actors.cluster import Cluster, Task
from ksmlab.scenario import ScenarioContext
from protocol.abi import MADV_MERGEABLE, PAGE_SIZE

NAME = "ltp-ksm01"
DESCRIPTION = "LTP ksm01: 3 tasks x size MB, four fill phases, the LTP counter table, run=2, run=0"

MB = 1 << 20
PAGES_PER_MB = MB // PAGE_SIZE
NUM = 3
UNIT_MB = 1
DEFAULT_SIZE_MB = 8
#: The children store in 64 KiB pieces. The model's fault path populates (or COW-copies) every
#: page a store will touch before the store writes them, so within one store a page holds stale
#: content (zeros, or the old KSM page's bytes) for as long as the whole store takes; the
#: kernel faults and writes one page at a time. Small stores keep that window short, so ksmd
#: does not merge transient contents (a merge racing a store can leave a second KSM page of
#: the final content in a stable chain, which the LTP counts would then show).
STORE_CHUNK = 16 * PAGE_SIZE


def frames_needed(size_mb: int, num: int = NUM) -> int:
    """Every page unmerged at once (phase COWs and run=2), plus room for the kernel's own use."""
    return size_mb * PAGES_PER_MB * num + 2048


OPTIONS: dict[str, Any] = {"frames": frames_needed(DEFAULT_SIZE_MB)}

# (data byte, whole area mergeable?) per phase, per child: ksm_data0/1/2 of create_same_memory().
PHASES: tuple[tuple[tuple[str, bool], ...], ...] = (
    (("c", True), ("c", True), ("d", True), ("d", True)),
    (("a", True), ("b", True), ("d", True), ("d", False)),
    (("a", True), ("a", True), ("d", True), ("d", True)),
)


def expected_table(p: int) -> list[dict[str, int]]:
    """LTP's ksm_group_check() arguments for the four phases."""
    def row(shared: int, sharing: int, unshared: int) -> dict[str, int]:
        return {"pages_shared": shared, "pages_sharing": sharing, "pages_volatile": 0,
                "pages_unshared": unshared, "sleep_millisecs": 0, "pages_to_scan": p}
    return [row(2, p - 2, 0), row(3, p - 3, 0), row(1, p - 1, 0), row(1, p - 2, 1)]


class Child:
    """One create_ksm_child(): size MB in unit-MB mappings."""

    def __init__(self, num: int, task: Task, size_mb: int, unit_mb: int) -> None:
        self.num = num
        self.task = task
        self.unit = unit_mb * MB
        self.total_unit = size_mb // unit_mb
        self.memory: list[int] = []

    async def allocate(self) -> None:
        for _ in range(self.total_unit):
            addr = await self.task.mmap(self.unit)
            await self.task.madvise(addr, self.unit, MADV_MERGEABLE)
            self.memory.append(addr)

    async def memset(self, phase: int) -> None:
        """ksm_child_memset(): every byte the phase's value, maybe the very last one 'e'."""
        data, whole = PHASES[self.num][phase]
        for addr in self.memory:
            for off in range(0, self.unit, STORE_CHUNK):
                await self.task.memset(addr + off, ord(data), min(STORE_CHUNK, self.unit - off))
        if not whole:
            await self.task.memset(self.memory[-1] + self.unit - 1, ord("e"), 1)

    async def verify(self, phase: int) -> list[tuple[int, int, str]]:
        """verify(): (unit, offset, byte) of the first few bytes that differ from the phase's data."""
        data, whole = PHASES[self.num][phase]
        bad: list[tuple[int, int, str]] = []
        for j, addr in enumerate(self.memory):
            got = np.frombuffer(await self.task.read(addr, self.unit), dtype=np.uint8)
            want = np.full(self.unit, ord(data), dtype=np.uint8)
            if not whole and j == self.total_unit - 1:
                want[-1] = ord("e")
            for i in np.flatnonzero(got != want)[:4]:
                bad.append((j, int(i), chr(int(got[i]))))
        return bad


async def _check(c: Cluster, ctx: ScenarioContext, what: str, run: int, want: dict[str, int]) -> None:
    """final_group_check(): run first, then everything else with ksmd stopped (run=0)."""
    ctx.expect(f"{what}: run", int(c.sysfs_read("run")), run)
    run_orig = c.sysfs_read("run")
    await c.sysfs_write("run", 0)
    got = {name: int(c.sysfs_read(name)) for name in want}
    ctx.expect(f"{what}: counters", got, want)
    await c.sysfs_write("run", run_orig)


async def _verify_children(ctx: ScenarioContext, children: list[Child], phase: int, when: str) -> None:
    bad = await asyncio.gather(*(ch.verify(phase) for ch in children))
    for ch, b in zip(children, bad):
        ctx.expect(f"{when}: child {ch.num} verifies memory content", b, [])
    checks = await asyncio.gather(*(ch.task.verify() for ch in children))
    for ch, v in zip(children, checks):
        ctx.expect(f"{when}: child {ch.num} reads back what it wrote", v["bad"], [])


async def scenario(c: Cluster, ctx: ScenarioContext) -> dict[str, Any]:
    size_mb = int(ctx.args.get("size_mb", DEFAULT_SIZE_MB))
    unit_mb = int(ctx.args.get("unit_mb", UNIT_MB))
    if size_mb < 1 or unit_mb < 1 or size_mb % unit_mb:
        raise ValueError(f"size {size_mb} MB must be a positive multiple of the unit {unit_mb} MB")
    need = frames_needed(size_mb)
    if c.opts.frames < need:
        raise ValueError(f"ltp-ksm01 with size {size_mb} MB needs frames >= {need} (have {c.opts.frames})")
    p = size_mb * PAGES_PER_MB * NUM

    # tst_test .save_restore and setup().
    saved = {name: c.sysfs_read(name) for name in
             ("run", "sleep_millisecs", "max_page_sharing", "merge_across_nodes", "smart_scan")}
    await c.sysfs_write("merge_across_nodes", 1)
    await c.sysfs_write("smart_scan", 0)

    tasks = [await c.spawn_task(comm=f"ksm01-child{i}") for i in range(NUM)]
    children = [Child(i, t, size_mb, unit_mb) for i, t in enumerate(tasks)]
    await asyncio.gather(*(ch.allocate() for ch in children))

    # KSM merging...
    await c.sysfs_write("run", 2)
    await c.sysfs_write("max_page_sharing", p)
    await c.sysfs_write("run", 1)
    await c.sysfs_write("pages_to_scan", p)
    await c.sysfs_write("sleep_millisecs", 0)

    table = expected_table(p)
    seen: list[dict[str, int]] = []
    for phase in range(4):
        if phase:
            # The children resume: check the previous phase's data, then write the next.
            await _verify_children(ctx, children, phase - 1, f"phase {phase}")
        await asyncio.gather(*(ch.memset(phase) for ch in children))
        # ksm_group_check(): wait_ksmd_full_scan() waits for three more full scans.
        await c.wait_full_scans(3)
        await _check(c, ctx, f"phase {phase + 1}", 1, table[phase])
        seen.append({k: int(ctx.last_ksm[k]) for k in table[phase] if k in ctx.last_ksm} if ctx.last_ksm else {})

    # KSM unmerging...
    await c.sysfs_write("run", 2)
    await _verify_children(ctx, children, 3, "after run=2")
    zeros = {"pages_shared": 0, "pages_sharing": 0, "pages_volatile": 0, "pages_unshared": 0,
             "sleep_millisecs": 0, "pages_to_scan": p}
    await _check(c, ctx, "run=2", 2, zeros)
    # stop KSM.
    await c.sysfs_write("run", 0)
    await _check(c, ctx, "run=0", 0, zeros)

    for t in tasks:
        await t.exit(0)
    # tst_test cleanup: restore what was saved.
    for name in ("max_page_sharing", "merge_across_nodes", "smart_scan", "sleep_millisecs", "run"):
        await c.sysfs_write(name, saved[name])
    return {"pages": p, "phases": seen}
