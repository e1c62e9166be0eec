# run=2: unmerge_and_remove_all_rmap_items() (actors/kernel/ksm_scan.py, sysfs.py).
#
# Writing 2 to /sys/kernel/mm/ksm/run takes ksm_thread_mutex and walks every slot:
# break_ksm() on every KSM mapping of every mergeable vma (an UNSHARE fault: each
# address gets its own copy, contents unchanged), remove_trailing_rmap_items() frees
# all rmap_items, slots of exiting mms are freed (with their mm_count reference), the
# other slots stay registered, remove_all_stable_nodes() empties the stable tree (seed
# 002) and seqnr - full_scans - restarts at 0. Afterwards every KSM counter is zero, no
# mapped page is PageKsm, and ksmd does not run (run & 1 is clear); run=1 merges again.
# The test runs the sysfs store and the function itself (under the mutex) alike; with
# the store, debug.check_unmerged() also checks nothing of KSM survived (no report).
from __future__ import annotations

import pytest

from actors.kernel import mm_slot
from actors.kernel.ksm_scan import ksmd_should_run, unmerge_and_remove_all_rmap_items
from shared_mem.layout import PAGE_SIZE, PG_KSM, PTE_WRITE
from tests.kernel.conftest import page_of

pytestmark = [pytest.mark.timeout(30)]

ZERO = {n: 0 for n in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                       "rmap_items", "full_scans", "stable_node_chains", "stable_node_dups")}
X, Y, Z = 0x78, 0x79, 0x7A


@pytest.mark.parametrize("how", ["sysfs", "direct"])
def test_run2_breaks_every_merge_and_frees_everything(kern, how):
    h = kern
    k = h.k
    h.set("max_page_sharing", 3)                   # x's five mappings need a chain
    h.set("run", 1)
    a_mm, a = h.area([X, X, Y, Z])
    b_mm, b = h.area([X, Y])
    c_mm, _c = h.area([X, X])
    h.full_scan(2)
    assert h.counters("pages_shared", "pages_sharing", "pages_unshared", "stable_node_chains") == \
        {"pages_shared": 3, "pages_sharing": 4, "pages_unshared": 1, "stable_node_chains": 1}
    h.mmput(c_mm)                                  # exits with its slot still listed
    ci = h.km.mm.idx(c_mm)
    assert h.km.mm.valid(c_mm)
    sa, sb = h.slot_of(a_mm), h.slot_of(b_mm)
    h.check()

    m = h.mark()
    if how == "sysfs":
        h.set("run", 2)
        assert int(k.ksm["run"]) == 2 and not ksmd_should_run(k)
    else:
        with k.ksm_thread_mutex:
            assert unmerge_and_remove_all_rmap_items(k) == 0
    assert h.counters(*ZERO) == ZERO
    assert h.km.stable_node.nr_live() == 0 and h.km.rmap_item.nr_live() == 0
    assert h.stable_root() == 0
    # Every address has its own, non-KSM page again, with its contents.
    pages = h.pfns(a_mm, a, 4) + h.pfns(b_mm, b, 2)
    assert len(set(pages)) == 6 and all(p > 0 for p in pages)
    assert not any(k.page_flags[p] & PG_KSM for p in pages)
    assert not any(int(h.km.page["mapcount"][p]) != 1 for p in pages)
    assert not h.pte(a_mm, a) & PTE_WRITE, "an UNSHARE fault maps the copy read-only"
    assert h.read(a_mm, a, 4 * PAGE_SIZE) == b"".join(bytes(page_of(v)) for v in (X, X, Y, Z))
    assert h.read(b_mm, b, 2 * PAGE_SIZE) == b"".join(bytes(page_of(v)) for v in (X, Y))
    # The exiting mm's slot went with its last reference; the others stay registered.
    assert {"mm": ci, "mm_count": 0, "site": "run=2:mmdrop"} in h.fields("mmdrop", m)
    assert not h.km.mm.valid(c_mm)
    assert mm_slot.slots(k) == [sa, sb]
    assert "ksm_remove_mm" not in h.names(m)
    h.check()

    # run=1: the same mms merge again from scratch.
    h.set("run", 1)
    assert ksmd_should_run(k)
    h.full_scan(2)
    assert h.counters("pages_shared", "pages_sharing", "pages_unshared", "full_scans") == \
        {"pages_shared": 2, "pages_sharing": 3, "pages_unshared": 1, "full_scans": 2}
    h.write_page(a_mm, a, 0x01)                    # and COW still works
    assert h.read(b_mm, b) == bytes(page_of(X))
    h.check()
