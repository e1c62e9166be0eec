# cmp_and_merge_page() on rmap_items prepared by hand (actors/kernel/ksm_scan.py, merge.py).
#
# The items are made with get_next_rmap_item() on the mm's slot, in address order, the
# way scan_get_next_rmap_item() makes them, and each call gets its page from follow_page()
# (a reference ksmd drops afterwards), under ksm_thread_mutex. What mm/ksm.c promises:
#   - a fresh item (oldchecksum 0) only records the checksum: no tree, no counter moves;
#   - with the checksum unchanged and nothing in the stable tree, the item goes into the
#     unstable tree (UNSTABLE_FLAG | seqnr in its address, pages_unshared + 1);
#   - an identical page found there merges: try_to_merge_two_pages() makes the scanned
#     page the KSM page, write-protects both ptes, stable_tree_insert() gives it a node,
#     both items hang on it with STABLE_FLAG and an anon_vma reference each;
#   - an identical page found in the stable tree merges into that KSM page
#     (ksm_merge_with_ksm_page), pages_sharing + 1, the duplicate frame is freed;
#   - an item already on its page's node returns at once;
#   - write_protect_page() refuses a page with a reference besides its mappings and
#     ksmd's own (a GUP pin): mapcount + 1 != refcount, so no merge happens;
#   - with use_zero_pages, a zero-filled page is replaced by the zero page (KSM zero pte,
#     ksm_zero_pages), and a write fault on it gives the page back.
# And after a merge, a write is a COW fault (cow_ksm), invisible to the other sharers.
from __future__ import annotations

import pytest

from actors.kernel.ksm_scan import cmp_and_merge_page
from actors.kernel.memory import follow_page, get_page, is_ksm_zero_pte, put_page
from actors.kernel.rmap import Link, get_next_rmap_item
from actors.kernel.sysfs import ksm_stat
from shared_mem.layout import (
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

COUNTS = ("rmap_items", "pages_unshared", "pages_shared", "pages_sharing", "pages_volatile")


def _items(h, mm, addr, npages):
    """get_next_rmap_item() for each page, linked in address order on the mm's slot."""
    slot = h.slot_of(mm)
    assert slot, "MADV_MERGEABLE registered the mm"
    link, items = Link(slot, True), []
    for i in range(npages):
        item = get_next_rmap_item(h.k, slot, link, addr + i * PAGE_SIZE)
        assert item
        items.append(item)
        link = Link(item, False)
    assert h.rmap_items_of(mm) == items
    return items


def _cmp(h, mm, addr, item):
    """ksmd's step for one page: follow_page() under mmap_lock, then cmp_and_merge_page."""
    k = h.k
    with k.mmap_lock(mm).read():
        pfn = follow_page(k, mm, addr)
    assert pfn > 0
    with k.ksm_thread_mutex:
        try:
            cmp_and_merge_page(k, pfn, item)
        finally:
            put_page(k, pfn)
    return pfn


def _c(h):
    return h.counters(*COUNTS)


def test_cmp_and_merge_page_walks_checksum_unstable_stable(kern):
    h = kern
    mm, a = h.area([0x61, 0x61, 0x61])
    addrs = [a + i * PAGE_SIZE for i in range(3)]
    pfns = h.pfns(mm, a, 3)
    i0, i1, i2 = _items(h, mm, a, 3)
    assert _c(h) == dict(rmap_items=3, pages_unshared=0, pages_shared=0, pages_sharing=0, pages_volatile=3)

    # A fresh item: the checksum is recorded, nothing else.
    m = h.mark()
    _cmp(h, mm, addrs[0], i0)
    assert h.item_field(i0, "oldchecksum") == h.k.cmp.checksum(pfns[0]) != 0
    assert h.item_field(i0, "address") == addrs[0]
    assert h.unstable_root() == 0 and _c(h)["pages_unshared"] == 0
    assert h.names(m) == []

    # Checksum unchanged: into the unstable tree.
    _cmp(h, mm, addrs[0], i0)
    assert h.item_field(i0, "address") == addrs[0] | UNSTABLE_FLAG | (h.seqnr & SEQNR_MASK)
    assert h.unstable_root() == i0
    assert _c(h)["pages_unshared"] == 1

    # The second identical page: checksum first, then the unstable hit merges the pair.
    _cmp(h, mm, addrs[1], i1)
    assert _c(h)["pages_shared"] == 0
    free = h.k.alloc.nr_free()
    m = h.mark()
    _cmp(h, mm, addrs[1], i1)
    kpfn = pfns[1]
    assert h.pfns(mm, a, 2) == [kpfn, kpfn]
    assert h.k.page_flags[kpfn] & PG_KSM and h.k.page_flags[pfns[0]] & PG_FREE
    assert h.k.alloc.nr_free() == free + 1
    node = int(h.km.page["mapping"][kpfn])
    assert h.stable_root() == node and h.node_field(node, "kpfn") == kpfn
    assert h.node_field(node, "rmap_hlist_len") == 2
    vma_av = int(h.km.vma.anon_vma[h.km.vma.idx(int(h.km.mm.mmap[h.km.mm.idx(mm)]))])
    for item, addr in ((i0, addrs[0]), (i1, addrs[1])):
        assert h.item_field(item, "address") == addr | STABLE_FLAG
        assert h.item_field(item, "head") == node
        assert h.item_field(item, "anon_vma") == vma_av
        assert not h.pte(mm, addr) & PTE_WRITE
    assert int(h.km.anon_vma.refcount[h.km.anon_vma.idx(vma_av)]) == 2
    assert h.unstable_root() == 0
    assert _c(h) == dict(rmap_items=3, pages_unshared=0, pages_shared=1, pages_sharing=1, pages_volatile=1)
    names = h.names(m)
    assert names.count("ksm_merge_one_page") == 2 and names.count("ksm_stable_tree_insert") == 1
    assert [f["err"] for f in h.fields("ksm_merge_one_page", m)] == [0, 0]

    # The third: found in the stable tree and merged into the KSM page.
    _cmp(h, mm, addrs[2], i2)
    m = h.mark()
    _cmp(h, mm, addrs[2], i2)
    assert h.pfn(mm, addrs[2]) == kpfn and h.k.page_flags[pfns[2]] & PG_FREE
    assert h.fields("ksm_merge_with_ksm_page", m) == [
        {"kpfn": kpfn, "pfn": pfns[2], "rmap_item": h.km.rmap_item.idx(i2), "mm": h.km.mm.idx(mm),
         "addr": addrs[2]}]
    assert "ksm_stable_tree_insert" not in h.names(m)
    assert h.node_field(node, "rmap_hlist_len") == 3
    assert _c(h) == dict(rmap_items=3, pages_unshared=0, pages_shared=1, pages_sharing=2, pages_volatile=0)
    assert ksm_stat(h.k, mm)["ksm_merging_pages"] == 3

    # Already on its page's node: nothing to do.
    m = h.mark()
    before = _c(h)
    _cmp(h, mm, addrs[0], i0)
    assert h.names(m) == [] and _c(h) == before
    assert h.read(mm, a, 3 * PAGE_SIZE) == bytes(page_of(0x61)) * 3
    h.check()


def test_a_pinned_page_is_not_write_protected_or_merged(kern):
    h = kern
    mm, a = h.area([0x70, 0x70])
    i0, i1 = _items(h, mm, a, 2)
    for _ in range(2):
        _cmp(h, mm, a, i0)
    _cmp(h, mm, a + PAGE_SIZE, i1)
    p1 = h.pfn(mm, a + PAGE_SIZE)
    get_page(h.k, p1)                    # a GUP pin, e.g. O_DIRECT in flight
    m = h.mark()
    _cmp(h, mm, a + PAGE_SIZE, i1)
    fails = h.fields("ksm_write_protect_fail", m)
    assert fails and fails[0]["pfn"] == p1 and fails[0]["why"] == "extra reference"
    assert fails[0]["refcount"] == fails[0]["mapcount"] + 2
    assert not h.k.page_flags[p1] & PG_KSM and h.pte(mm, a + PAGE_SIZE) & PTE_WRITE
    assert h.counters("pages_shared", "pages_unshared") == {"pages_shared": 0, "pages_unshared": 1}
    put_page(h.k, p1)                    # the I/O completes
    _cmp(h, mm, a + PAGE_SIZE, i1)
    assert h.counters("pages_shared", "pages_sharing") == {"pages_shared": 1, "pages_sharing": 1}
    h.check()


def test_write_to_a_merged_page_copies_it(kern):
    h = kern
    a_mm, a = h.area([0x19])
    b_mm, b = h.area([0x19])
    h.full_scan(2)
    kpfn = h.pfn(a_mm, a)
    assert kpfn == h.pfn(b_mm, b) and h.k.page_flags[kpfn] & PG_KSM
    cow = int(h.k.ksm["cow_ksm"])
    h.access(b_mm, b + 100, 1, True, 0x77)
    assert int(h.k.ksm["cow_ksm"]) == cow + 1
    new = h.pfn(b_mm, b)
    assert new != kpfn and not h.k.page_flags[new] & PG_KSM and h.pte(b_mm, b) & PTE_WRITE
    want = bytearray(page_of(0x19))
    assert h.read(a_mm, a) == bytes(want)
    want[100] = 0x77
    assert h.read(b_mm, b) == bytes(want)
    assert int(h.km.page["mapcount"][kpfn]) == 1
    # The counters move only when ksmd next visits the copied page.
    assert h.counters("pages_shared", "pages_sharing") == {"pages_shared": 1, "pages_sharing": 1}
    h.full_scan()
    assert h.counters("pages_shared", "pages_sharing", "pages_volatile") == \
        {"pages_shared": 1, "pages_sharing": 0, "pages_volatile": 1}
    assert ksm_stat(h.k, b_mm)["ksm_merging_pages"] == 0
    h.check()


def test_use_zero_pages_maps_the_zero_page_for_empty_pages(kern):
    h = kern
    h.set("use_zero_pages", 1)
    mm, a = h.area([0, 0, 0x31])
    rss = int(h.km.mm.rss_anon[h.km.mm.idx(mm)])
    free = h.k.alloc.nr_free()
    h.full_scan(2)
    for addr in (a, a + PAGE_SIZE):
        assert is_ksm_zero_pte(h.pte(mm, addr))
    assert h.counters("ksm_zero_pages", "pages_shared", "pages_sharing") == \
        {"ksm_zero_pages": 2, "pages_shared": 0, "pages_sharing": 0}
    assert ksm_stat(h.k, mm)["ksm_zero_pages"] == 2
    assert int(h.km.mm.rss_anon[h.km.mm.idx(mm)]) == rss - 2
    assert h.k.alloc.nr_free() == free + 2
    assert h.read(mm, a, 2 * PAGE_SIZE) == bytes(2 * PAGE_SIZE)
    h.check()
    h.write_page(mm, a, 0x01)            # the COW fault from the KSM zero page
    assert not is_ksm_zero_pte(h.pte(mm, a)) and h.pfn(mm, a) > 0
    assert h.counters("ksm_zero_pages")["ksm_zero_pages"] == 1
    assert ksm_stat(h.k, mm)["ksm_zero_pages"] == 1
    h.check()
