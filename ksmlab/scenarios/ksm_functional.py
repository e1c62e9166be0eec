# Ports of tools/testing/selftests/mm/ksm_functional_tests.c (David Hildenbrand's
# functional tests), one scenario per test: ksm-functional-unmerge,
# -unmerge_zero_pages, -unmerge_discarded, -prot_none, -prctl, -prctl_fork, -prctl_fork_exec,
# -prctl_unmerge and -fork_ksm_merging_page_count.
#
# Each test maps 2 MiB (512 pages), fills it with one byte value, optionally
# changes its protection, enables KSM by madvise or prctl, runs ksmd for two
# full scans (ksm_start) and checks that something merged; then it unmerges in
# the test's own way and checks that no frame is mapped twice in the range (the
# C test's range_maps_duplicates() over /proc/self/pagemap; here Task.pagemap(),
# ignoring absent pages). What differs: each test is its own cluster rather
# than one process running them in a row; MADV_NOHUGEPAGE is a no-op because the
# model has no THP; /proc/self/mem writes are Task.write(..., force=True)
# (FOLL_FORCE); fork is Task.fork() and the child's exit status becomes checks
# on the child task (ksmd is paused while the fork_ksm_merging_page_count child
# reads its counter, because a model child takes a moment to start); exec is Task.execve()
# (a fresh mm, actors/kernel/exec.py); the uffd-wp test is not ported (no userfaultfd).
# Every step also checks that the tasks read back exactly
# what they wrote.
from __future__ import annotations

import errno
import struct
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from actors.cluster import Cluster, Task
from ksmlab.scenario import ScenarioContext, ScenarioSpec
from protocol.abi import (
    MADV_DONTNEED,
    MADV_MERGEABLE,
    MADV_NOHUGEPAGE,
    MADV_UNMERGEABLE,
    PAGE_SIZE,
    PR_GET_MEMORY_MERGE,
    PR_SET_MEMORY_MERGE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
)

DESCRIPTION = "ports of tools/testing/selftests/mm/ksm_functional_tests.c"
OPTIONS: dict[str, Any] = {"frames": 4096}

MiB = 1 << 20
SIZE = 2 * MiB  # 512 pages, as in the C tests

KSM_MERGE_PRCTL, KSM_MERGE_MADVISE, KSM_MERGE_NONE = "prctl", "madvise", "none"


# -- helpers ----------------------------------------------------------------------------------------
def duplicate_frames(frames: list[int]) -> list[int]:
    """Frame numbers mapped more than once (absent pages, -1, are ignored)."""
    seen = Counter(f for f in frames if f >= 0)
    return sorted(f for f, n in seen.items() if n > 1)


async def expect_no_duplicates(ctx: ScenarioContext, t: Task, addr: int, size: int, what: str) -> None:
    dups = duplicate_frames(await t.pagemap(addr, size))
    ctx.expect(f"{what}: no frame mapped twice in the range", dups[:8], [])


async def expect_invisible(ctx: ScenarioContext, tasks: list[Task], when: str) -> None:
    for t in tasks:
        v = await t.verify()
        ctx.expect(f"{when}: task {t.pid} reads back what it wrote", v["bad"], [])


async def mmap_and_merge_range(c: Cluster, ctx: ScenarioContext, t: Task, val: int, size: int,
                               prot: int, mode: str) -> int:
    """__mmap_and_merge_range(): a merged range of `size` bytes all equal to `val`."""
    # Stabilize accounting: stop and unmerge everything first.
    await c.ksm_stop()
    ctx.expect("before mapping: ksm_merging_pages", await t.ksm_merging_pages(), 0)
    addr = await t.mmap(size, prot=PROT_READ | PROT_WRITE)
    await t.madvise(addr, size, MADV_NOHUGEPAGE)
    await t.memset(addr, val, size)
    await t.mprotect(addr, size, prot)
    if mode == KSM_MERGE_PRCTL:
        await t.prctl(PR_SET_MEMORY_MERGE, 1)
    elif mode == KSM_MERGE_MADVISE:
        await t.madvise(addr, size, MADV_MERGEABLE)
    await c.ksm_start()
    if val:
        # The zero page is accounted differently (ksm_zero_pages), so it is not counted here.
        merging = await t.ksm_merging_pages()
        ctx.expect("pages got merged (ksm_merging_pages > 0)", merging > 0, True)
    return addr


async def finish(c: Cluster, t: Task, addr: int, size: int) -> None:
    """Each test ends with ksm_stop() and munmap()."""
    await c.ksm_stop()
    await t.munmap(addr, size)


# -- the tests ------------------------------------------------------------------------------------
async def test_unmerge(c: Cluster, ctx: ScenarioContext) -> dict:
    t = await c.spawn_task(comm="ksm_functional")
    addr = await mmap_and_merge_range(c, ctx, t, 0xCF, SIZE, PROT_READ | PROT_WRITE, KSM_MERGE_MADVISE)
    merged = dict(ctx.last_ksm or {})
    await t.madvise(addr, SIZE, MADV_UNMERGEABLE)
    await expect_invisible(ctx, [t], "after MADV_UNMERGEABLE")
    await expect_no_duplicates(ctx, t, addr, SIZE, "after MADV_UNMERGEABLE")
    await finish(c, t, addr, SIZE)
    return {"merged": merged}


async def test_unmerge_zero_pages(c: Cluster, ctx: ScenarioContext) -> dict:
    t = await c.spawn_task(comm="ksm_functional")
    # ksm_use_zero_pages(): zero pages are replaced by the zero page, counted per mm.
    await c.sysfs_write("use_zero_pages", 1)
    addr = await mmap_and_merge_range(c, ctx, t, 0x00, SIZE, PROT_READ | PROT_WRITE, KSM_MERGE_MADVISE)
    pages = SIZE // PAGE_SIZE
    ctx.expect("ksm_zero_pages after merging", (await t.ksm_stat())["ksm_zero_pages"], pages)
    await t.madvise(addr, SIZE // 2, MADV_UNMERGEABLE)
    ctx.expect("ksm_zero_pages after MADV_UNMERGEABLE of the first half",
               (await t.ksm_stat())["ksm_zero_pages"], pages // 2)
    # A store into each page of the other half takes it off the zero page by a write fault.
    for offs in range(SIZE // 2, SIZE, PAGE_SIZE):
        await t.write(addr + offs, struct.pack("<I", offs))
    await expect_invisible(ctx, [t], "after the write faults")
    stat = await t.ksm_stat()
    ctx.expect_counters("global ksm_zero_pages after unmerge and write faults", ksm_zero_pages=0)
    ctx.expect("ksm_zero_pages after the write faults", stat["ksm_zero_pages"], 0)
    await expect_no_duplicates(ctx, t, addr, SIZE, "KSM zero pages unmerged")
    await finish(c, t, addr, SIZE)
    return {}


async def test_unmerge_discarded(c: Cluster, ctx: ScenarioContext) -> dict:
    t = await c.spawn_task(comm="ksm_functional")
    addr = await mmap_and_merge_range(c, ctx, t, 0xCF, SIZE, PROT_READ | PROT_WRITE, KSM_MERGE_MADVISE)
    # Discard the first half, leaving pte_none() entries, then unmerge the whole range.
    await t.madvise(addr, SIZE // 2, MADV_DONTNEED)
    await t.madvise(addr, SIZE, MADV_UNMERGEABLE)
    await expect_invisible(ctx, [t], "after MADV_DONTNEED + MADV_UNMERGEABLE")
    frames = await t.pagemap(addr, SIZE)
    ctx.expect("discarded half is not present", sum(f >= 0 for f in frames[: len(frames) // 2]), 0)
    await expect_no_duplicates(ctx, t, addr, SIZE, "after MADV_UNMERGEABLE")
    await finish(c, t, addr, SIZE)
    return {}


async def test_prot_none(c: Cluster, ctx: ScenarioContext) -> dict:
    t = await c.spawn_task(comm="ksm_functional")
    addr = await mmap_and_merge_range(c, ctx, t, 0x11, SIZE, PROT_NONE, KSM_MERGE_MADVISE)
    # A unique int at the start of each page of the first half, through /proc/self/mem:
    # FOLL_FORCE writes past PROT_NONE and unshares the KSM page.
    for i in range(0, SIZE // 2, PAGE_SIZE):
        await t.write(addr + i, struct.pack("<i", i), force=True)
    # The other half is unshared by MADV_UNMERGEABLE on the PROT_NONE vma.
    await t.madvise(addr + SIZE // 2, SIZE // 2, MADV_UNMERGEABLE)
    await expect_invisible(ctx, [t], "after the forced writes and MADV_UNMERGEABLE")
    await expect_no_duplicates(ctx, t, addr, SIZE, "after the forced writes and MADV_UNMERGEABLE")
    await finish(c, t, addr, SIZE)
    return {}


async def _prctl_errno(t: Task, *args: int) -> str:
    try:
        await t.prctl(*args)
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    return "no error"


async def test_prctl(c: Cluster, ctx: ScenarioContext) -> dict:
    t = await c.spawn_task(comm="ksm_functional")
    ctx.expect("PR_SET_MEMORY_MERGE=1", await t.prctl(PR_SET_MEMORY_MERGE, 1), 0)
    ctx.expect("PR_GET_MEMORY_MERGE after setting 1", await t.prctl(PR_GET_MEMORY_MERGE), 1)
    ctx.expect("PR_SET_MEMORY_MERGE=0", await t.prctl(PR_SET_MEMORY_MERGE, 0), 0)
    ctx.expect("PR_GET_MEMORY_MERGE after setting 0", await t.prctl(PR_GET_MEMORY_MERGE), 0)
    # prctl_set_memory_merge() and prctl_get_memory_merge() reject nonzero unused arguments.
    ctx.expect("PR_SET_MEMORY_MERGE with arg3=1", await _prctl_errno(t, PR_SET_MEMORY_MERGE, 1, 1), "EINVAL")
    ctx.expect("PR_SET_MEMORY_MERGE with arg5=1", await _prctl_errno(t, PR_SET_MEMORY_MERGE, 1, 0, 0, 1),
               "EINVAL")
    ctx.expect("PR_GET_MEMORY_MERGE with arg2=1", await _prctl_errno(t, PR_GET_MEMORY_MERGE, 1), "EINVAL")
    ctx.expect("PR_GET_MEMORY_MERGE after the rejected calls", await t.prctl(PR_GET_MEMORY_MERGE), 0)
    return {}


async def _prctl_child(c: Cluster, ctx: ScenarioContext, exec_: bool) -> dict:
    """test_prctl_fork() and test_prctl_fork_exec(): the child of a PR_SET_MEMORY_MERGE
    parent (after an exec too: MMF_INIT_MASK keeps MMF_VM_MERGE_ANY and ksm_execve()
    registers the new mm) reports merge-any and merges what it maps, without madvise
    (the C tests' test_child_ksm)."""
    parent = await c.spawn_task(comm="ksm_functional")
    await c.ksm_stop()  # init_global_file_handles()
    ctx.expect("PR_SET_MEMORY_MERGE=1", await parent.prctl(PR_SET_MEMORY_MERGE, 1), 0)
    child = await parent.fork()
    if exec_:
        await child.execve()          # ksm_fork_exec_child
    when = "after exec" if exec_ else "child"
    ctx.expect(f"{when}: PR_GET_MEMORY_MERGE", await child.prctl(PR_GET_MEMORY_MERGE), 1)
    addr = await mmap_and_merge_range(c, ctx, child, 0xCF, SIZE, PROT_READ | PROT_WRITE, KSM_MERGE_NONE)
    await expect_invisible(ctx, [parent, child], "child merged" + (" after exec" if exec_ else ""))
    merged = dict(ctx.last_ksm or {})
    await finish(c, child, addr, SIZE)
    await child.exit(0)
    ctx.expect("PR_SET_MEMORY_MERGE=0 in the parent", await parent.prctl(PR_SET_MEMORY_MERGE, 0), 0)
    return {"child_merged": merged}


async def test_prctl_fork(c: Cluster, ctx: ScenarioContext) -> dict:
    return await _prctl_child(c, ctx, exec_=False)


async def test_prctl_fork_exec(c: Cluster, ctx: ScenarioContext) -> dict:
    return await _prctl_child(c, ctx, exec_=True)


async def test_prctl_unmerge(c: Cluster, ctx: ScenarioContext) -> dict:
    t = await c.spawn_task(comm="ksm_functional")
    addr = await mmap_and_merge_range(c, ctx, t, 0xCF, SIZE, PROT_READ | PROT_WRITE, KSM_MERGE_PRCTL)
    # PR_SET_MEMORY_MERGE=0 unmerges every vma, like MADV_UNMERGEABLE would.
    ctx.expect("PR_SET_MEMORY_MERGE=0", await t.prctl(PR_SET_MEMORY_MERGE, 0), 0)
    await expect_invisible(ctx, [t], "after PR_SET_MEMORY_MERGE=0")
    await expect_no_duplicates(ctx, t, addr, SIZE, "after PR_SET_MEMORY_MERGE=0")
    await finish(c, t, addr, SIZE)
    return {}


async def test_fork_ksm_merging_page_count(c: Cluster, ctx: ScenarioContext) -> dict:
    t = await c.spawn_task(comm="ksm_functional")
    addr = await mmap_and_merge_range(c, ctx, t, 0xCF, SIZE, PROT_READ | PROT_WRITE, KSM_MERGE_MADVISE)
    parent_merging = await t.ksm_merging_pages()
    # The C child reads its counter microseconds after fork(), long before ksmd (which
    # queued it behind the scan cursor) gets to it. A model child is a new OS process
    # that needs a moment to start, time in which ksmd could visit it and legitimately
    # merge its inherited KSM pages; so ksmd is paused (run=0, merges kept) across the
    # fork and the read, to look at the counter as ksm_fork() left it.
    await c.sysfs_write("run", 0)
    child = await t.fork()
    ctx.expect("child: ksm_merging_pages right after fork (not inherited)", await child.ksm_merging_pages(), 0)
    ctx.expect("child: ksm_rmap_items right after fork", (await child.ksm_stat())["ksm_rmap_items"], 0)
    await c.sysfs_write("run", 1)
    await child.exit(0)
    await expect_invisible(ctx, [t], "after the child exited")
    await finish(c, t, addr, SIZE)
    return {"parent_ksm_merging_pages": parent_merging}


# -- registration ------------------------------------------------------------------------------------
_TESTS: list[tuple[str, str, Callable[[Cluster, ScenarioContext], Awaitable[dict]]]] = [
    ("unmerge", "merge 2 MiB of 0xcf, MADV_UNMERGEABLE: no frame mapped twice", test_unmerge),
    ("unmerge_zero_pages", "use_zero_pages=1: ksm_zero_pages 512 -> 256 after unmerging half -> 0 after "
     "write faults", test_unmerge_zero_pages),
    ("unmerge_discarded", "MADV_DONTNEED half of a merged range, then MADV_UNMERGEABLE it all",
     test_unmerge_discarded),
    ("prot_none", "merge while PROT_NONE; /proc/self/mem writes to half, MADV_UNMERGEABLE the other half",
     test_prot_none),
    ("prctl", "PR_SET/GET_MEMORY_MERGE values; EINVAL on nonzero unused arguments", test_prctl),
    ("prctl_fork", "MMF_VM_MERGE_ANY is inherited over fork and the child merges", test_prctl_fork),
    ("prctl_fork_exec", "MMF_VM_MERGE_ANY survives fork and exec (MMF_INIT_MASK, ksm_execve)",
     test_prctl_fork_exec),
    ("prctl_unmerge", "PR_SET_MEMORY_MERGE=0 unmerges", test_prctl_unmerge),
    ("fork_ksm_merging_page_count", "a child's ksm_merging_pages is 0 right after fork",
     test_fork_ksm_merging_page_count),
]

SCENARIOS = [ScenarioSpec(f"ksm-functional-{name}", f"ksm_functional_tests {name}: {descr}", dict(OPTIONS), fn,
                          sys.modules[__name__]) for name, descr, fn in _TESTS]
