# Determinism of the kernel paths: the same operations on two freshly booted kernels
# give the same trace events, field for field.
#
# Nothing in actors/kernel/ may depend on anything but kernel memory and the seams
# (locks, clock, schedule points, event log): record handles are (generation, index)
# pairs allocated from per-boot free stacks, tree shapes follow from the order of inserts
# and erases alone (red-black, lib/rbtree.c),
# frames come off the free lists in order, and the only clock a path reads is the
# Kernel's (here a fake one that moves only when told). So a sequential run - areas
# mapped and advised, partial and full ksmd passes, chains under a small
# max_page_sharing, a COW write, a fork, reclaim of a KSM page to swap, an exit while
# ksmd is mid-pass, run=2 and run=1 again - must replay exactly: the event names, their
# order and every field except timestamps and pids (none today). A run in which one
# page's content makes one more merge must not produce the same sequence, or the
# comparison is vacuous.
from __future__ import annotations

import pytest

from actors.kernel.vmscan import shrink_page
from shared_mem.layout import PAGE_SIZE

pytestmark = [pytest.mark.timeout(30)]


def _workload(h, last: int = 0x23) -> dict:
    h.set("max_page_sharing", 2)
    h.set("run", 1)
    a_mm, a = h.area([0x21, 0x21, 0x21, 0x22, last])
    b_mm, b = h.area([0x21, 0x22, 0x24])
    h.full_scan()
    h.scan(3)
    h.clock.advance(2500)                      # past stable_node_chains_prune_millisecs
    h.full_scan()
    h.write_page(b_mm, b, 0x99)                # COW of a KSM page
    child = h.fork(a_mm)
    h.full_scan()
    kpfn = h.pfn(a_mm, a + 3 * PAGE_SIZE)
    shrink_page(h.k, kpfn, force=True)         # a KSM page to swap, child's pte too
    h.read(child, a, 5 * PAGE_SIZE)
    h.scan(2)
    h.mmput(b_mm)                              # slow path, ksmd mid-pass
    h.full_scan(2)
    h.set("run", 2)
    h.set("run", 1)
    h.full_scan(2)
    counters = h.counters()
    h.check()
    for mm in (child, a_mm):
        h.mmput(mm)
    h.full_scan()
    h.check()
    h.check_no_leaks()
    return counters


def test_same_operations_give_the_same_events(kernel_factory):
    runs = []
    for _ in range(2):
        h = kernel_factory()
        counters = _workload(h)
        runs.append((h.behaviour(), counters))
    (ev1, c1), (ev2, c2) = runs
    names = {e for e, _ in ev1}
    # The workload reaches the paths it means to (so the comparison is not trivial) ...
    for want in ("ksm_start_scan", "ksm_stable_tree_insert", "ksm_merge_with_ksm_page",
                 "wp_page_copy", "dup_mmap", "try_to_unmap_one", "ksm_exit", "ksm_remove_mm",
                 "ksm_remove_ksm_page", "sysfs_store", "mm_free"):
        assert want in names, want
    assert len(ev1) > 100
    # ... and both boots went exactly the same way.
    assert len(ev1) == len(ev2)
    first_diff = next((i for i, (x, y) in enumerate(zip(ev1, ev2)) if x != y), None)
    assert first_diff is None, f"event {first_diff}: {ev1[first_diff]} != {ev2[first_diff]}"
    assert c1 == c2


def test_a_different_page_gives_different_events(kernel_factory):
    h1, h2 = kernel_factory(), kernel_factory()
    _workload(h1)
    _workload(h2, last=0x24)                   # a unique page now equals one of b's
    assert h1.behaviour() != h2.behaviour()
