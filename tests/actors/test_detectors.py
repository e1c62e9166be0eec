# The general detectors (actors/kernel/debug.py, Task's read check): each fires on a
# deliberately broken state, and stays quiet on today's code.
#
#   bad_page   free of a mapped page, allocation of a dirty free frame, a pte to a freed
#              frame used by the MMU / zap, an rmap walk that cannot reach a pte, KSM
#              state surviving run=2
#   integrity  a task load returning bytes the task never stored
from __future__ import annotations

import secrets

import numpy as np
import pytest

from actors.kernel import debug, sysfs
from actors.kernel import mm as mmops
from actors.kernel.context import Kernel
from actors.kernel.memory import (
    FAULT_FLAG_WRITE,
    handle_mm_fault,
    put_page,
    user_access,
    zap_page_range,
)
from actors.kernel.stable_tree import alloc_stable_node, folio_set_stable_node
from actors.kernel.variants import Variants
from protocol.abi import PAGE_SIZE
from shared_mem.layout import (
    PG_DIRTY,
    PG_KSM,
    PTE_PFN_MASK,
    VM_MAYREAD,
    VM_MAYWRITE,
    VM_MERGEABLE,
    VM_READ,
    VM_WRITE,
    Geometry,
)
from tests.helpers import ksm_page_then_fork, wait_for

pytestmark = [pytest.mark.timeout(120)]

START = 0x40000


# -- a booted kernel memory, no processes --------------------------------------------------------------
@pytest.fixture
def kern():
    from actors.boot import boot_kernel

    km, locks = boot_kernel(Geometry(nr_frames=64, max_mms=4, max_tasks=4, va_pages=1024),
                            secrets.token_hex(4), Variants())
    reports: list[dict] = []
    km.set_actor("test", on_report=reports.append)
    locks.bind_context("test")
    k = Kernel(km, locks, "test")
    k.reports = reports
    try:
        yield k
    finally:
        locks.release_context()
        locks.close()
        locks.unlink()
        km.close()
        km.unlink()


def _faulted_page(k: Kernel, npages: int = 1) -> tuple[int, int, list[int]]:
    """An mm with one anonymous vma at START whose pages are faulted in: (mm, vma, pfns)."""
    mm = mmops.mm_alloc(k, 0)
    vma = mmops.vma_new(k, mm, START, START + npages * PAGE_SIZE,
                        VM_READ | VM_WRITE | VM_MAYREAD | VM_MAYWRITE, START >> 12)
    pfns = []
    for i in range(npages):
        assert handle_mm_fault(k, vma, START + i * PAGE_SIZE, FAULT_FLAG_WRITE) == 0
        pfns.append(mmops.read_pte(k, mm, START + i * PAGE_SIZE) & PTE_PFN_MASK)
    return mm, vma, pfns


def _kinds(k: Kernel) -> list[str]:
    return [r["kind"] for r in k.reports]


def test_clean_paths_report_nothing(kern):
    k = kern
    mm, _vma, _pfns = _faulted_page(k, 4)
    buf = np.empty(4 * PAGE_SIZE, dtype=np.uint8)
    assert user_access(k, mm, START, 4 * PAGE_SIZE, True, src=7) == (4 * PAGE_SIZE, -1)
    assert user_access(k, mm, START, 4 * PAGE_SIZE, False, dst=buf) == (4 * PAGE_SIZE, -1)
    free = k.alloc.nr_free()
    assert zap_page_range(k, mm, START, START + 4 * PAGE_SIZE) == 4
    assert k.alloc.nr_free() == free + 4
    # A read fault maps the zero page (a special pte of the reserved frame 0).
    vma = mmops.vma_lookup(k, mm, START)
    assert handle_mm_fault(k, vma, START, 0) == 0
    assert user_access(k, mm, START, 64, False, dst=buf) == (64, -1)
    assert k.reports == []


def test_freeing_a_mapped_page_is_bad_page_state_and_the_frame_is_leaked(kern):
    """put_page() dropping the last reference of a page that is still mapped."""
    k = kern
    _mm, _vma, (pfn,) = _faulted_page(k)
    free = k.alloc.nr_free()
    put_page(k, pfn)                              # the mapping's reference, wrongly dropped
    assert _kinds(k) == ["bad_page"]
    r = k.reports[0]
    assert r["title"] == f"BUG: Bad page state in process test  pfn:{pfn:#x}"
    assert "page dumped because: nonzero mapcount" in r["text"]
    assert "mapcount:1" in r["text"] and "flags: " in r["text"] and "(anon|" in r["text"]
    assert k.alloc.nr_free() == free, "a bad page is not returned to the free lists"
    assert debug.is_leaked(k, pfn)


def test_allocating_a_dirty_free_frame_is_bad_page_state(kern):
    """Somebody wrote struct page flags of a frame after it was freed (check_new_page)."""
    k = kern
    pfn = k.alloc_page()
    put_page(k, pfn)
    assert k.reports == []
    k.km.page["flags"][pfn] |= PG_DIRTY           # a late store through a stale pointer
    got = k.alloc_page()
    assert got != pfn, "the dirty frame is dropped, the next one handed out"
    assert _kinds(k) == ["bad_page"]
    assert "PAGE_FLAGS_CHECK_AT_PREP flag(s) set: dirty" in k.reports[0]["text"]


def test_pte_to_a_freed_frame_is_bad_page_map_in_the_mmu_and_in_zap(kern):
    """The rmap lost a mapping: the page is freed while a pte still maps it."""
    k = kern
    mm, _vma, (pfn,) = _faulted_page(k)
    pte = mmops.read_pte(k, mm, START)
    k.page_map.dec_return(pfn)                    # the broken state: mapcount lost a pte
    put_page(k, pfn)                              # ... so the page is freed silently
    assert k.reports == []
    buf = np.empty(16, dtype=np.uint8)
    user_access(k, mm, START, 16, False, dst=buf)   # the task's load through the stale pte
    assert _kinds(k) == ["bad_page"]
    r = k.reports[0]
    assert r["title"].startswith(f"BUG: Bad page map in process test  pte:{pte:016x} pmd:")
    assert "pte maps a free frame" in r["text"] and f"addr:{START:016x}" in r["text"]
    # zap finds the same pte: reported once per frame, and no refcount underflow.
    zap_page_range(k, mm, START, START + PAGE_SIZE)
    assert _kinds(k) == ["bad_page"]


def test_ksm_page_left_after_run2_is_reported(kern):
    """A mapped KSM page the unmerger never saw (its mm is on no KSM list)."""
    k = kern
    _mm, vma, (pfn,) = _faulted_page(k)
    k.km.vma.flags[k.km.vma.idx(vma, "test")] |= VM_MERGEABLE
    node = alloc_stable_node(k)
    k.km.stable_node.kpfn[k.km.stable_node.idx(node, "test")] = pfn
    folio_set_stable_node(k, pfn, node)
    sysfs.store(k, "run", "2")
    assert _kinds(k) == ["bad_page"]
    r = k.reports[0]
    assert r["title"].startswith(f"ksm: KSM page pfn:{pfn:#x} survives KSM_RUN_UNMERGE (mapped by ")
    assert f"at {START:#x}" in r["title"] and "stable node" in r["text"]
    assert r["data"]["survivors"][0]["pfn"] == pfn


def test_ksm_page_mapped_only_outside_mergeable_vmas_is_the_kernels_warning(kern):
    """A swap-cached KSM page faulted back after MADV_UNMERGEABLE lives in a vma run=2
    never walks: today's kernel WARNs in remove_stable_node; so do we, as a warning."""
    k = kern
    _mm, _vma, (pfn,) = _faulted_page(k)          # no VM_MERGEABLE
    node = alloc_stable_node(k)
    k.km.stable_node.kpfn[k.km.stable_node.idx(node, "test")] = pfn
    folio_set_stable_node(k, pfn, node)
    sysfs.store(k, "run", "2")
    assert _kinds(k) == ["warning"]
    assert k.reports[0]["title"].startswith(debug.UNMERGE_WARNING)
    assert k.reports[0]["data"]["pages"] == [pfn]


def test_run2_of_an_exiting_mm_is_excused(kern):
    """remove_stable_node's -EBUSY: only an exiting mm (mm_users 0) still maps the page."""
    k = kern
    mm, _vma, (pfn,) = _faulted_page(k)
    node = alloc_stable_node(k)
    k.km.stable_node.kpfn[k.km.stable_node.idx(node, "test")] = pfn
    folio_set_stable_node(k, pfn, node)
    k.km.mm.users[k.km.mm.idx(mm, "test")] = 0
    sysfs.store(k, "run", "2")
    assert k.reports == []
    assert k.km.page["flags"][pfn] & PG_KSM


# -- small clusters ------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_reclaim_of_forked_ksm_page_reports_nothing_today(cluster_factory):
    c = await cluster_factory(frames=256, swap_slots=64)
    t, child, a, n, kpfn = await ksm_page_then_fork(c)
    r = await c.reclaim(pfns=[kpfn], force=True)
    assert r["results"][str(kpfn)] == "freed"
    assert await child.read(a, n) == b"x" * n and await t.read(a, n) == b"x" * n
    await c.sysfs_write("run", 2)
    assert (await t.verify())["bad"] == [] and (await child.verify())["bad"] == []
    assert c.check_invariants() == []
    assert c.reports == [], [r["title"] for r in c.reports]


@pytest.mark.asyncio
async def test_rmap_no_anon_vma_reclaim_reports_the_missed_ptes(cluster_factory):
    """Seed 004 reverted: try_to_unmap_ksm cannot reach the forked child's ptes."""
    c = await cluster_factory(frames=256, swap_slots=64, variants=("rmap-no-anon-vma",))
    _t, child, a, _n, kpfn = await ksm_page_then_fork(c)
    r = await c.reclaim(pfns=[kpfn], force=True)
    assert r["results"][str(kpfn)] == "still_mapped"
    await wait_for(lambda: c.reports_of("bad_page"), 10, "kswapd's bad_page report")
    rep = c.reports_of("bad_page")[0]
    assert rep["title"].startswith("BUG: Bad page map in process kswapd  pte:")
    assert "try_to_unmap: the rmap walk of this KSM page missed 4 of 4 pte(s)" in rep["text"]
    assert [m["task"] for m in rep["data"]["missed"]] == [child.name] * 4
    assert sorted(m["addr"] for m in rep["data"]["missed"]) == [a + i * PAGE_SIZE for i in range(4)]


@pytest.mark.asyncio
async def test_integrity_read_of_bytes_the_task_never_stored(cluster_factory):
    c = await cluster_factory(frames=256)
    t = await c.spawn_task()
    a = await t.mmap(2 * PAGE_SIZE)
    await t.memset(a, 0x11, 2 * PAGE_SIZE)
    assert await t.read(a, 2 * PAGE_SIZE) == b"\x11" * 2 * PAGE_SIZE
    assert c.reports == []
    pfn = (await t.pagemap(a, 2 * PAGE_SIZE))[1]
    c.km.frames[pfn, 100] = 0x99                  # the broken state: a stray store into the frame
    got = await t.read(a + PAGE_SIZE, 200)        # the read still returns what it found
    assert got[100] == 0x99
    await wait_for(lambda: c.reports_of("integrity"), 10, "the task's integrity report")
    rep = c.reports_of("integrity")[0]
    assert rep["title"] == (f"ksmlab: integrity: {t.name} read 0xc8 bytes at {a + PAGE_SIZE + 100:#x}: "
                            "expected 0x11, got 0x99")
    assert f"pfn:{pfn:#x}" in rep["text"] and rep["data"]["ksm"] is False
    v = await t.verify()
    assert len(v["bad"]) == 1
    await wait_for(lambda: len(c.reports_of("integrity")) == 2, 10, "verify's integrity report")


@pytest.mark.asyncio
async def test_store_that_faults_part_way_keeps_the_shadow_exact(cluster_factory):
    """A store fault that completes page 0 and then hits a hole (SIGSEGV) stored page 0:
    the task's shadow must have it, or every later read is a false integrity report (the
    model bug behind the memory_corruption report of an oom-deadlock soak, where the
    failure was ENOMEM after the allocation retries ran out)."""
    import errno

    c = await cluster_factory(frames=256)
    t = await c.spawn_task()
    a = await t.mmap(2 * PAGE_SIZE)
    await t.munmap(a + PAGE_SIZE, PAGE_SIZE)
    with pytest.raises(OSError) as e:
        await t.memset(a, 0x22, 2 * PAGE_SIZE)
    assert e.value.errno == errno.EFAULT
    assert await t.read(a, PAGE_SIZE) == b"\x22" * PAGE_SIZE
    assert (await t.verify())["bad"] == []
    assert c.reports == [], [r["title"] for r in c.reports]
