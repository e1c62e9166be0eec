# ksmd's passes: ksm_do_scan() and scan_get_next_rmap_item() (actors/kernel/ksm_scan.py).
#
# mm/ksm.c merges by content in two visits: the first visit of a page only records its
# checksum in a fresh rmap_item (oldchecksum starts at 0, so every new page is
# "volatile" once); the next visit finds the checksum unchanged and searches the stable
# tree, then the unstable tree, inserting the page there or merging it with the
# identical tree page into a new KSM page. Two identical pages therefore merge during
# the second full pass: the first of them enters the unstable tree, the second merges
# with it (pages_shared=1, pages_sharing=1), and the scanned page of the pair becomes
# the KSM page. A page whose checksum changed since the previous visit is left out of
# both trees for that pass (pages_volatile). full_scans is ksm_scan.seqnr: it grows
# when the cursor wraps back to ksm_mm_head, once per pass whatever the batch sizes,
# and not at all while no mm is registered. The scan visits only present, normal ptes
# of VM_MERGEABLE vmas, and unregisters an mm that has no mergeable vma left.
from __future__ import annotations

import pytest

from actors.kernel import mm_slot
from actors.kernel.ksm_scan import ksmd_should_run
from actors.kernel.sysfs import ksm_stat
from protocol.abi import MADV_UNMERGEABLE
from shared_mem.layout import (
    MMF_VM_MERGEABLE,
    PAGE_SIZE,
    PG_FREE,
    PG_KSM,
    PTE_WRITE,
    SEQNR_MASK,
    STABLE_FLAG,
    UNSTABLE_FLAG,
)
from tests.kernel.conftest import page_of

pytestmark = [pytest.mark.timeout(30)]

STATE = ("full_scans", "rmap_items", "pages_volatile", "pages_unshared", "pages_shared",
         "pages_sharing")


def _state(h, *vals):
    return dict(zip(STATE, vals))


def test_two_identical_pages_merge_during_the_second_pass(kern):
    h = kern
    mm, a = h.area([0x5A, 0x5A])
    p0, p1 = h.pfns(mm, a, 2)
    assert p0 != p1 and p0 > 0 and p1 > 0

    h.full_scan()
    # Pass 1: one rmap_item per page, checksums recorded, nothing in either tree.
    assert h.counters(*STATE) == _state(h, 1, 2, 2, 0, 0, 0)
    assert h.pfns(mm, a, 2) == [p0, p1]
    assert h.unstable_root() == 0 and h.stable_root() == 0
    for item, pfn in zip(h.rmap_items_of(mm), (p0, p1)):
        assert h.item_field(item, "oldchecksum") == h.k.cmp.checksum(pfn)

    # Pass 2, page by page: the first page goes into the unstable tree ...
    m = h.mark()
    assert h.scan(1) == 1
    assert h.names(m)[0] == "ksm_start_scan"
    assert h.counters(*STATE) == _state(h, 1, 2, 1, 1, 0, 0)
    first = h.item_at(mm, a)
    assert h.unstable_root() == first
    assert h.item_field(first, "address") == a | UNSTABLE_FLAG | (1 & SEQNR_MASK)

    # ... and the second merges with it: the scanned page is the KSM page.
    free = h.k.alloc.nr_free()
    assert h.scan(1) == 1
    assert h.counters(*STATE) == _state(h, 1, 2, 0, 0, 1, 1)
    assert h.pfns(mm, a, 2) == [p1, p1]
    assert h.k.page_flags[p1] & PG_KSM and h.k.page_flags[p0] & PG_FREE
    assert h.k.alloc.nr_free() == free + 1
    assert int(h.km.page["mapcount"][p1]) == 2
    for i in range(2):
        assert not h.pte(mm, a + i * PAGE_SIZE) & PTE_WRITE
        assert h.item_field(h.item_at(mm, a + i * PAGE_SIZE), "address") & STABLE_FLAG
    assert h.unstable_root() == 0, "the merged tree item left the unstable tree"
    assert h.fields("ksm_stable_tree_insert", m)[0]["pfn"] == p1

    # The rest of the pass finds no page and wraps: full_scans 2.
    assert h.scan(100) == 0
    assert h.seqnr == 2
    assert h.read(mm, a, 2 * PAGE_SIZE) == bytes(page_of(0x5A)) * 2
    st = ksm_stat(h.k, mm)
    assert st["ksm_merging_pages"] == 2 and st["ksm_rmap_items"] == 2
    h.check()

    # A third pass changes nothing: both items already hang on the page's node.
    m = h.mark()
    h.full_scan()
    assert h.counters(*STATE) == _state(h, 3, 2, 0, 0, 1, 1)
    assert h.names(m) == ["ksm_start_scan", "ksm_stop_scan"]
    h.check()


def test_page_that_changes_between_passes_is_never_merged(kern):
    h = kern
    h.set("smart_scan", 0)   # six visits of an unmerged page: smart scan would skip some
    mm, a = h.area([7, 7, 7])
    b = a + PAGE_SIZE
    h.full_scan()
    for round_ in range(3):
        h.write_page(mm, b, 0x10 + round_)   # changes again before every pass
        h.full_scan()
        c = h.counters("pages_shared", "pages_sharing", "pages_volatile", "pages_unshared")
        assert c == {"pages_shared": 1, "pages_sharing": 1, "pages_volatile": 1, "pages_unshared": 0}
        assert not h.k.page_flags[h.pfn(mm, b)] & PG_KSM
        assert h.pfn(mm, a) == h.pfn(mm, a + 2 * PAGE_SIZE)
        item = h.item_at(mm, b)
        assert not h.item_field(item, "address") & (STABLE_FLAG | UNSTABLE_FLAG)
        assert h.item_field(item, "oldchecksum") == h.k.cmp.checksum(h.pfn(mm, b))
    # Left alone for one pass, the (unique) page is stable enough for the unstable tree.
    h.full_scan()
    assert h.counters("pages_volatile", "pages_unshared") == {"pages_volatile": 0, "pages_unshared": 1}
    # Written back to the shared content: volatile for one pass, then merged into the
    # existing KSM page through the stable tree.
    h.write_page(mm, b, 7)
    h.full_scan()
    assert h.counters("pages_volatile", "pages_sharing") == {"pages_volatile": 1, "pages_sharing": 1}
    m = h.mark()
    h.full_scan()
    assert h.counters("pages_shared", "pages_sharing", "pages_volatile") == \
        {"pages_shared": 1, "pages_sharing": 2, "pages_volatile": 0}
    assert len(set(h.pfns(mm, a, 3))) == 1
    assert [f["addr"] for f in h.fields("ksm_merge_with_ksm_page", m)] == [b]
    h.check()


def test_full_scans_counts_passes_not_batches(kern):
    h = kern
    assert h.scan(100) == 0, "no mm registered: nothing to scan"
    assert h.seqnr == 0 and "ksm_start_scan" not in h.names()
    assert not ksmd_should_run(h.k)

    h.area([1, 2, 3, 4])
    h.set("run", 1)
    assert ksmd_should_run(h.k)
    m = h.mark()
    for _ in range(4):
        assert h.scan(1) == 1
        assert h.seqnr == 0, "the cursor is still inside the mm"
    assert h.scan(1) == 0      # finds no fifth page: the cursor wraps
    assert h.seqnr == 1
    assert h.scan(10) == 4     # a whole pass in one batch, which then stops at the wrap
    assert h.seqnr == 2
    assert h.names(m).count("ksm_start_scan") == 2
    assert [f["seqnr"] for f in h.fields("ksm_stop_scan", m)] == [0, 1]
    assert h.counters("pages_scanned", "full_scans") == {"pages_scanned": 8, "full_scans": 2}
    h.check()


def test_smart_scan_skips_an_unmergeable_page_more_and_more_often(kern):
    """should_skip_rmap_item(): ages 0-2 are always scanned; then each scan allows
    skip_age(age) = 1, 2, 4, 8 skips; a KSM page is never skipped."""
    h = kern
    mm, a = h.area([0x42, 0x24, 0x24])
    skipped = []
    for _ in range(14):
        before = h.counters("pages_skipped")["pages_skipped"]
        h.full_scan()
        skipped.append(h.counters("pages_skipped")["pages_skipped"] - before)
    assert skipped == [0, 0, 0, 0, 1, 0, 1, 1, 0, 1, 1, 1, 1, 0]
    assert h.item_field(h.item_at(mm, a), "age") == 14
    # A skipped visit also takes the item out of the unstable tree.
    assert h.counters("pages_unshared", "pages_shared", "pages_sharing") == \
        {"pages_unshared": 1, "pages_shared": 1, "pages_sharing": 1}
    h.full_scan()
    assert h.counters("pages_unshared", "pages_skipped") == {"pages_unshared": 0, "pages_skipped": 8}
    h.check()


def test_smart_scan_ages_a_page_from_the_first_pass_after_cow(kern):
    """Issue 10 cause 1: after a write breaks COW on a merged page, its rmap_item still
    carries STABLE_FLAG on the next visit; mm/ksm.c's should_skip_rmap_item() only spares
    a KSM folio, so that visit ages the item too and the first skip comes one pass earlier
    than if the stable flag spared it."""
    h = kern
    mm, a = h.area([0x61, 0x61])
    h.full_scan(2)                             # merged: both ptes map one KSM page
    assert h.counters("pages_sharing")["pages_sharing"] == 1
    h.write_page(mm, a, 0x62)                  # COW: a is an anon page, its item still stable
    assert h.item_field(h.item_at(mm, a), "address") & STABLE_FLAG
    skipped = []
    for _ in range(6):
        before = h.counters("pages_skipped")["pages_skipped"]
        h.full_scan()
        skipped.append(h.counters("pages_skipped")["pages_skipped"] - before)
    # ages 2 -> 3 (first pass after COW), 3 -> 4 (allows 1 skip), skip, 5: allows 2, skip, skip
    assert skipped == [0, 0, 1, 0, 1, 1]
    h.check()


def test_pages_across_mms_merge_and_are_counted_per_mm(kern):
    h = kern
    a_mm, a = h.area([0x33, 0x44])
    b_mm, b = h.area([0x44, 0x33, 0x55])
    h.full_scan(2)
    assert h.counters("pages_shared", "pages_sharing", "pages_unshared") == \
        {"pages_shared": 2, "pages_sharing": 2, "pages_unshared": 1}
    assert h.pfn(a_mm, a) == h.pfn(b_mm, b + PAGE_SIZE)
    assert h.pfn(a_mm, a + PAGE_SIZE) == h.pfn(b_mm, b)
    assert ksm_stat(h.k, a_mm)["ksm_merging_pages"] == 2
    assert ksm_stat(h.k, b_mm)["ksm_merging_pages"] == 2
    assert ksm_stat(h.k, b_mm)["ksm_rmap_items"] == 3
    h.check()


def test_only_present_pages_of_mergeable_vmas_are_scanned(kern):
    h = kern
    mm, a = h.area([9, 9])                           # mergeable
    _, b = h.area([9, 9], mm=mm, mergeable=False)    # same content, not advised
    c = h.mmap(mm, 3)
    h.madvise(mm, c, 3)
    h.write_page(mm, c, 9)
    h.read(mm, c + PAGE_SIZE)                        # a read fault maps the zero page
    h.full_scan(2)                                   # c + 2 pages: never touched
    assert h.counters("rmap_items") == {"rmap_items": 3}
    assert sorted(int(h.item_field(i, "address")) & ~(PAGE_SIZE - 1)
                  for i in h.rmap_items_of(mm)) == [a, a + PAGE_SIZE, c]
    assert h.counters("pages_shared", "pages_sharing") == {"pages_shared": 1, "pages_sharing": 2}
    for addr in (b, b + PAGE_SIZE):
        assert not h.k.page_flags[h.pfn(mm, addr)] & PG_KSM
    assert h.pfn(mm, c + PAGE_SIZE) == -1
    h.check()


def test_mm_without_mergeable_vmas_is_unregistered_by_the_scan(kern):
    h = kern
    mm, a = h.area([3, 3, 3])
    h.full_scan(2)
    assert h.counters("pages_shared", "pages_sharing") == {"pages_shared": 1, "pages_sharing": 2}
    slot = h.slot_of(mm)
    count = int(h.km.mm.count[h.km.mm.idx(mm)])
    assert count == 2, "mm_users' reference and the slot's mmgrab"

    h.madvise(mm, a, 3, MADV_UNMERGEABLE)            # breaks the merges, keeps the items
    assert len(set(h.pfns(mm, a, 3))) == 3
    assert h.counters("rmap_items")["rmap_items"] == 3
    m = h.mark()
    h.full_scan()
    assert h.fields("ksm_remove_mm", m) == [{"mm": h.km.mm.idx(mm), "exiting": False}]
    assert not h.km.mm_slot.valid(slot) and h.slot_of(mm) == 0
    assert mm_slot.list_empty(h.k)
    assert not int(h.km.mm.flags[h.km.mm.idx(mm)]) & MMF_VM_MERGEABLE
    assert int(h.km.mm.count[h.km.mm.idx(mm)]) == count - 1
    assert h.counters("rmap_items", "pages_shared", "pages_sharing") == \
        {"rmap_items": 0, "pages_shared": 0, "pages_sharing": 0}
    assert h.read(mm, a, 3 * PAGE_SIZE) == bytes(page_of(3)) * 3
    h.check()
