# Ports of the counter-checking modes of the kernel selftest
# tools/testing/selftests/mm/ksm_tests.c: -M (merge), -U (unmerge by writing),
# -Z with use_zero_pages 0 and 1, -N with merge_across_nodes 1 and 0, plus
# ksm-max-page-sharing, which drives the test's pages-count formula with small
# max_page_sharing values.
#
# The set-up follows the C program: save the seven tunables, write run=2,
# sleep_millisecs=0, merge_across_nodes=1 and pages_to_scan=<page count>, map
# with PROT_WRITE, fill, mprotect to the test's protection, madvise, run=1,
# wait until full_scans has grown by two, check pages_shared/pages_sharing the
# way assert_ksm_pages_count() does, unmap, restore the tunables.
# What differs: each mode runs in a fresh cluster (its own "machine"); the
# model always has NUMA (numa_available() succeeds), so the tunables the C
# program only writes on NUMA systems are always written; -N uses a cluster
# with two nodes and Task.mmap(..., nid=) in place of numa_alloc_onnode(), and
# turns smart_scan off while its two pages merge (the first page is scanned
# alone for many passes first, so smart scan would mostly skip it when the
# second page arrives: the C test would be racy against it in the kernel too);
# the tests also check that merging stayed invisible to the task (verify()).
# ksm-max-page-sharing runs with smart_scan off (as the real-kernel numbers
# were measured) and reads its counters with run=0, LTP-style, so the leftover
# page of n % mps == 1 is reliably counted in pages_unshared.
from __future__ import annotations

import sys
from typing import Any

from actors.cluster import Cluster, Task
from ksmlab.scenario import ScenarioContext, ScenarioSpec, Skipped
from ksmlab.workloads import content_counters
from protocol.abi import MADV_MERGEABLE, PAGE_SIZE, PROT_READ, PROT_WRITE

DESCRIPTION = "ports of tools/testing/selftests/mm/ksm_tests.c (-M -U -Z -N) and a max_page_sharing sweep"
OPTIONS: dict[str, Any] = {"frames": 1024}

PAGE_COUNT_DEFAULT = 10

#: ksm_save_def() reads these ...
SAVED_TUNABLES = ("max_page_sharing", "merge_across_nodes", "sleep_millisecs", "pages_to_scan", "run",
                  "stable_node_chains_prune_millisecs", "use_zero_pages")
#: ... and ksm_restore() writes them back in this order.
RESTORE_ORDER = ("max_page_sharing", "merge_across_nodes", "pages_to_scan", "run", "sleep_millisecs",
                 "stable_node_chains_prune_millisecs", "use_zero_pages")


def ksm_pages_count(dupl_page_count: int, max_page_sharing: int) -> tuple[int, int]:
    """(pages_shared, pages_sharing) that assert_ksm_pages_count() accepts for n equal pages.

    Each KSM page holds at most max_page_sharing mappings. When n leaves a remainder of 0 or 1
    modulo max_page_sharing, only full KSM pages exist (a lone leftover page has nobody to merge
    with); otherwise one more, partly filled, KSM page takes the remainder.
    """
    n, mps = dupl_page_count, max_page_sharing
    if n % mps in (0, 1):
        shared = n // mps
        return shared, shared * (mps - 1)
    shared = n // mps + 1
    return shared, n - shared


async def save_tunables(c: Cluster) -> dict[str, str]:
    return {name: c.sysfs_read(name) for name in SAVED_TUNABLES}


async def restore_tunables(c: Cluster, saved: dict[str, str]) -> None:
    for name in RESTORE_ORDER:
        await c.sysfs_write(name, saved[name])


async def setup_tunables(c: Cluster, page_count: int) -> None:
    """main(): stop and unmerge, scan without sleeping, page_count pages per batch."""
    await c.sysfs_write("run", 2)
    await c.sysfs_write("sleep_millisecs", 0)
    await c.sysfs_write("merge_across_nodes", 1)
    await c.sysfs_write("pages_to_scan", page_count)


async def allocate_memory(t: Task, value: int, length: int, prot: int = PROT_READ | PROT_WRITE,
                          nid: int = -1) -> int:
    """Map write-only, fill with value, then switch to the test's protection."""
    addr = await t.mmap(length, prot=PROT_WRITE, nid=nid)
    await t.memset(addr, value, length)
    await t.mprotect(addr, length, prot)
    return addr


async def ksm_merge_pages(c: Cluster, t: Task, addr: int, length: int) -> None:
    """madvise(MADV_MERGEABLE), run=1, then at least two full scans (merging needs two visits)."""
    await t.madvise(addr, length, MADV_MERGEABLE)
    await c.sysfs_write("run", 1)
    await c.wait_full_scans(2)


async def expect_invisible(ctx: ScenarioContext, tasks: list[Task], when: str) -> None:
    for t in tasks:
        v = await t.verify()
        ctx.expect(f"{when}: task {t.pid} reads back what it wrote", v["bad"], [])


async def assert_ksm_pages_count(c: Cluster, ctx: ScenarioContext, what: str, dupl_page_count: int,
                                 **extra: int) -> dict[str, int]:
    mps = int(c.sysfs_read("max_page_sharing"))
    shared, sharing = ksm_pages_count(dupl_page_count, mps)
    ctx.expect_counters(f"{what}: assert_ksm_pages_count({dupl_page_count}) with max_page_sharing {mps}",
                        pages_shared=shared, pages_sharing=sharing, **extra)
    return dict(ctx.last_ksm or {})


# -- the modes ------------------------------------------------------------------------------------
async def check_ksm_merge(c: Cluster, ctx: ScenarioContext, page_count: int,
                          expect_count: int | None = None) -> dict[str, int]:
    """-M: page_count pages of '*' merge into shared 1 / sharing page_count-1."""
    t = await c.spawn_task(comm="ksm_tests")
    length = page_count * PAGE_SIZE
    addr = await allocate_memory(t, ord("*"), length)
    await ksm_merge_pages(c, t, addr, length)
    await expect_invisible(ctx, [t], "merged")
    got = await assert_ksm_pages_count(c, ctx, "-M", page_count if expect_count is None else expect_count)
    await t.munmap(addr, length)
    return got


async def check_ksm_unmerge(c: Cluster, ctx: ScenarioContext) -> dict[str, int]:
    """-U: two merged pages each get a byte written; one more full scan and nothing is shared."""
    t = await c.spawn_task(comm="ksm_tests")
    page_count = 2
    length = page_count * PAGE_SIZE
    addr = await allocate_memory(t, ord("*"), length)
    await ksm_merge_pages(c, t, addr, length)
    await t.memset(addr, ord("-"), 1)
    await t.memset(addr + PAGE_SIZE, ord("+"), 1)
    # ksm_tests.c's ksm_do_scan(1) waits for full_scans to grow by one; if a pass was in
    # progress and had already visited these pages, that increment comes from a pass
    # that saw them before the writes. Two increments guarantee one whole pass after
    # them (the kernel's test has the same race, in a window seldom open; seeded plans
    # that slow ksmd open it).
    await c.wait_full_scans(2)
    await expect_invisible(ctx, [t], "after the COW writes")
    got = await assert_ksm_pages_count(c, ctx, "-U", 0)
    await t.munmap(addr, length)
    return got


async def check_ksm_zero_page_merge(c: Cluster, ctx: ScenarioContext, page_count: int,
                                    use_zero_pages: bool) -> dict[str, int]:
    """-Z: zero-filled pages merge with each other (z=0) or with the zero page (z=1)."""
    await c.sysfs_write("use_zero_pages", int(use_zero_pages))
    t = await c.spawn_task(comm="ksm_tests")
    length = page_count * PAGE_SIZE
    addr = await allocate_memory(t, 0, length)
    await ksm_merge_pages(c, t, addr, length)
    await expect_invisible(ctx, [t], "merged")
    if use_zero_pages:
        # Zero pages are replaced by the kernel's zero page, which no stable node tracks:
        # they show up in ksm_zero_pages only.
        got = await assert_ksm_pages_count(c, ctx, "-Z -z 1", 0, ksm_zero_pages=page_count)
    else:
        got = await assert_ksm_pages_count(c, ctx, "-Z -z 0", page_count)
    await t.munmap(addr, length)
    return got


async def check_ksm_numa_merge(c: Cluster, ctx: ScenarioContext, merge_across_nodes: bool) -> dict[str, int]:
    """-N: one page of '*' on each of two nodes: merged only when merge_across_nodes=1."""
    if c.opts.nodes < 2:
        raise Skipped("At least 2 NUMA nodes must be available")
    await c.sysfs_write("merge_across_nodes", int(merge_across_nodes))
    # The first page spends its two full scans (and every scan ksmd, with sleep_millisecs=0,
    # runs before the second page is advised) alone and unmergeable: smart scan ages it and
    # then skips it on most passes, so the two pages might not meet in the unstable tree
    # within the second page's two scans. Turn smart scan off while they merge, as LTP's
    # ksm0x tests do.
    smart_scan = c.sysfs_read("smart_scan")
    await c.sysfs_write("smart_scan", 0)
    t = await c.spawn_task(comm="ksm_tests")
    a = await t.mmap(PAGE_SIZE, nid=0)
    b = await t.mmap(PAGE_SIZE, nid=1)
    await t.memset(a, ord("*"), PAGE_SIZE)
    await t.memset(b, ord("*"), PAGE_SIZE)
    await ksm_merge_pages(c, t, a, PAGE_SIZE)
    await ksm_merge_pages(c, t, b, PAGE_SIZE)
    await expect_invisible(ctx, [t], "merged")
    if merge_across_nodes:
        got = await assert_ksm_pages_count(c, ctx, "-N -m 1", 2)
    else:
        got = await assert_ksm_pages_count(c, ctx, "-N -m 0", 0)
    await t.munmap(a, PAGE_SIZE)
    await t.munmap(b, PAGE_SIZE)
    await c.sysfs_write("smart_scan", smart_scan)
    return got


async def run_mode(c: Cluster, ctx: ScenarioContext, mode: str, **kw: Any) -> dict[str, Any]:
    """main(): save, set up, run one mode, restore."""
    page_count = int(ctx.args.get("page_count", PAGE_COUNT_DEFAULT))
    saved = await save_tunables(c)
    await setup_tunables(c, page_count)
    if mode == "M":
        got = await check_ksm_merge(c, ctx, page_count, **kw)
    elif mode == "U":
        got = await check_ksm_unmerge(c, ctx)
    elif mode in ("Z0", "Z1"):
        got = await check_ksm_zero_page_merge(c, ctx, page_count, mode == "Z1")
    elif mode in ("N0", "N1"):
        got = await check_ksm_numa_merge(c, ctx, mode == "N1")
    else:
        raise ValueError(f"unknown ksm_tests mode {mode!r}")
    await restore_tunables(c, saved)
    return {"asserted": got, "tunables_after": {name: c.sysfs_read(name) for name in SAVED_TUNABLES}}


# -- max_page_sharing sweep -----------------------------------------------------------------------
#: (max_page_sharing, pages of one content): both branches of the formula, with and without a
#: leftover page that stays in the unstable tree.
MPS_CASES = ((4, 8), (4, 9), (4, 10), (2, 9), (2, 10))


def chain_counters(n: int, mps: int) -> dict[str, int]:
    """Every counter the kernel shows once n equal pages converged under max_page_sharing mps."""
    shared, sharing, unshared = content_counters(n, mps)
    chained = shared >= 2
    return {"pages_shared": shared, "pages_sharing": sharing, "pages_unshared": unshared,
            "stable_node_chains": int(chained), "stable_node_dups": shared if chained else 0}


async def max_page_sharing_sweep(c: Cluster, ctx: ScenarioContext) -> dict[str, Any]:
    """Each case: n pages of '*' in one task, max_page_sharing mps, two full scans.

    smart_scan is off here, as in the real-kernel measurements, so that a leftover page keeps
    its place in the unstable tree on every visit instead of being skipped (and counted as
    volatile). The counters are read with run=0, as LTP does, so that ksmd sits between two
    batches and no rmap_item is caught between leaving the old unstable tree and joining the new.
    """
    saved = await save_tunables(c)
    saved_smart = c.sysfs_read("smart_scan")
    await c.sysfs_write("smart_scan", 0)
    t = await c.spawn_task(comm="ksm_tests")
    out: dict[str, Any] = {}
    for mps, n in MPS_CASES:
        await setup_tunables(c, n)
        await c.sysfs_write("max_page_sharing", mps)
        length = n * PAGE_SIZE
        addr = await allocate_memory(t, ord("*"), length)
        await ksm_merge_pages(c, t, addr, length)
        await expect_invisible(ctx, [t], f"mps={mps} n={n}")
        shared, sharing = ksm_pages_count(n, mps)
        want = chain_counters(n, mps)
        # The selftest's formula and the per-content model must agree.
        ctx.expect(f"mps={mps} n={n}: formula", (shared, sharing),
                   (want["pages_shared"], want["pages_sharing"]))
        await c.sysfs_write("run", 0)
        ctx.expect_counters(f"mps={mps} n={n}: assert_ksm_pages_count({n}) with chains and dups",
                            **want, pages_volatile=0)
        out[f"mps{mps}_n{n}"] = {k: ctx.last_ksm[k] for k in [*want, "pages_volatile"]} if ctx.last_ksm else {}
        await t.munmap(addr, length)
    await c.sysfs_write("run", 2)
    await restore_tunables(c, saved)
    await c.sysfs_write("smart_scan", saved_smart)
    return out


# -- registration ----------------------------------------------------------------------------------
def _spec(name: str, description: str, mode: str, **options: Any) -> ScenarioSpec:
    async def fn(c: Cluster, ctx: ScenarioContext) -> dict[str, Any]:
        return await run_mode(c, ctx, mode)

    return ScenarioSpec(name, description, {**OPTIONS, **options}, fn, sys.modules[__name__])


async def _mps(c: Cluster, ctx: ScenarioContext) -> dict[str, Any]:
    return await max_page_sharing_sweep(c, ctx)


SCENARIOS = [
    _spec("ksm-tests-M", "ksm_tests -M -p 10: 10 pages of '*' -> shared 1, sharing 9", "M"),
    _spec("ksm-tests-U", "ksm_tests -U: 2 merged pages, a byte written to each, one more scan -> 0/0", "U"),
    _spec("ksm-tests-Z0", "ksm_tests -Z -p 10 -z 0: 10 zero pages merge with each other -> 1/9", "Z0"),
    _spec("ksm-tests-Z1", "ksm_tests -Z -p 10 -z 1: 10 zero pages -> the zero page: 0/0, ksm_zero_pages 10",
          "Z1"),
    _spec("ksm-tests-N1", "ksm_tests -N -m 1: one '*' page on each of 2 nodes -> 1/1", "N1", nodes=2),
    _spec("ksm-tests-N0", "ksm_tests -N -m 0: one '*' page on each of 2 nodes, per-node trees -> 0/0", "N0",
          nodes=2),
    ScenarioSpec("ksm-max-page-sharing",
                 "assert_ksm_pages_count() with max_page_sharing 4 (8, 9, 10 pages) and 2 (9, 10 pages): "
                 "chains, dups and the leftover unshared page",
                 dict(OPTIONS), _mps, sys.modules[__name__]),
]
