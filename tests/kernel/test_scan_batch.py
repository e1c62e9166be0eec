# The vectorized scan (ksm_scan.ksm_do_scan_batch, `--scan batch`) against the exact one.
#
# The batch scan collects a run of pages under one mmap_lock, checksums them in one numpy
# pass and decides on arrays which need cmp_and_merge_page() at all; the rest of the
# kernel's work is the exact scan's, in the same order. So the two must agree after
# every batch: the same counters, the same per-mm ksm_stat, the same frame under every
# pte (which page became the KSM page is part of the answer). The workloads here are
# the cases where an array decision could go wrong: pages a fork shares (a reference
# held for a later page of the run would fail an earlier page's write_protect_page()),
# pages that change between passes, duplicates within one run, zero pages, smart scan,
# max_page_sharing chains, and an mm that goes away between batches.
from __future__ import annotations

import random

import pytest

from actors.kernel import ksm_scan, syscalls, tree, unstable_tree
from actors.kernel.rmap import unstable_root
from actors.kernel.stable_tree import stable_root
from actors.kernel.sysfs import ksm_stat
from shared_mem.layout import PAGE_SIZE, UNSTABLE_FLAG, Geometry
from tests.kernel.conftest import SMALL

pytestmark = [pytest.mark.timeout(60)]


def _build(h, seed: int) -> list[tuple[int, int, int]]:
    """Three mms of 48 pages from a 9-content alphabet (zero pages among them), a fork of
    the first, then the same writes in both kernels; returns (mm, addr, npages) areas."""
    rnd = random.Random(seed)
    areas = []
    for _ in range(3):
        contents = [rnd.choice([0, 1, 2, 3, 4, 5, 6, 7, 8]) for _ in range(48)]
        mm, a = h.area(contents)
        areas.append((mm, a, 48))
    child = h.fork(areas[0][0])
    areas.append((child, areas[0][1], 48))
    return areas


def _writes(h, areas, rnd: random.Random, n: int) -> None:
    for _ in range(n):
        mm, a, npages = rnd.choice(areas)
        h.write_page(mm, a + rnd.randrange(npages) * PAGE_SIZE, rnd.choice([1, 2, 9, 10]))


def _shape(a, root) -> tuple:
    """Every node of a tree in order, with its links and colour: the tree's exact shape."""
    return tuple(
        (n, int(a.left[a.idx(n)]), int(a.right[a.idx(n)]), int(a.rb_color[a.idx(n)])) for n in tree.walk(a, root)
    )


def _picture(h, areas, mode: str = "batch") -> tuple:
    c = h.counters()
    stats = tuple(tuple(sorted(ksm_stat(h.k, mm).items())) for mm, _, _ in areas)
    frames = tuple(tuple(h.pfns(mm, a, n)) for mm, a, n in areas)
    return c, stats, frames, _trees(h, mode)


def _trees(h, mode: str = "batch") -> tuple:
    """Both trees' shapes; with mode "vector", the unstable tree's items in order only:
    the vector scan lays each run's unstable tree out anew (unstable_build.py)."""
    unstable = unstable_root(h.k, 0)
    if mode == "vector":
        return _shape(h.km.stable_node, stable_root(h.k, 0)), tuple(tree.walk(h.km.rmap_item, unstable))
    return _shape(h.km.stable_node, stable_root(h.k, 0)), _shape(h.km.rmap_item, unstable)


@pytest.mark.parametrize("batch", [1, 5, 17, 100, 1000])
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("mode", ["batch", "vector"])
def test_the_batch_scan_gives_the_exact_scans_numbers_and_frames_after_every_batch(
    kernel_factory, seed, batch, mode
):
    pair = [kernel_factory(scan="exact"), kernel_factory(scan=mode)]
    for h in pair:
        h.set("max_page_sharing", 3)  # chains and dups in a small workload
        h.set("use_zero_pages", seed % 2)
        h.set("smart_scan", 1)
    areas = [_build(h, seed) for h in pair]
    rnds = [random.Random(seed * 7), random.Random(seed * 7)]
    for step in range(max(30, 800 // batch)):  # at least four passes of the 192 pages
        for h, ar, rnd in zip(pair, areas, rnds):
            if step % max(6, 200 // batch) == 5:
                _writes(h, ar, rnd, 4)  # COW breaks of KSM pages, volatile pages
            h.scan(batch)
        exact, vect = (_picture(h, ar, mode) for h, ar in zip(pair, areas))
        assert vect[0] == exact[0], f"step {step}: counters differ"
        assert vect[1] == exact[1], f"step {step}: ksm_stat differs"
        assert vect[2] == exact[2], f"step {step}: a pte maps a different frame"
        assert vect[3] == exact[3], f"step {step}: a tree has another shape"
    assert pair[0].counters()["full_scans"] >= 2
    assert pair[0].counters()["pages_sharing"] > 0
    for h in pair:
        h.check()


@pytest.mark.parametrize("mode", ["batch", "vector"])
def test_an_mm_that_exits_between_batches_ends_the_same_way(kernel_factory, mode):
    pair = [kernel_factory(scan="exact"), kernel_factory(scan=mode)]
    areas = [_build(h, 5) for h in pair]
    for h in pair:
        h.scan(60)
    for h, ar in zip(pair, areas):
        h.mmput(ar[1][0])
    for _ in range(12):
        for h in pair:
            h.scan(23)
        assert pair[0].counters() == pair[1].counters()
        assert _trees(pair[0], mode) == _trees(pair[1], mode)
    for h in pair:
        h.check()


@pytest.mark.parametrize("scan", ["exact", "batch", "vector"])
def test_a_page_a_fork_shares_later_in_the_run_does_not_hold_up_an_earlier_merge(kernel_factory, scan):
    """
    mm A maps Y at a0 and P (content X) at a1; its fork C shares both, then writes X
    into a0, which COWs to its own page Q. In C's run, Q meets A's unstable-tree item
    for P and the two merge; P is also C's page at a1, later in the same run. If the
    run still held its reference on P, write_protect_page(P) would count one too many
    (mapcount 2 + ksmd's 1 + the run's 1) and refuse: the batch scan lets P go and
    looks it up again at its turn.

        ksmd, C's run [a0, a1]                   the page P
        ----------------------                   ----------
        follow_page(a0) = Q, follow_page(a1) = P refcount 2 (A, C) + 1 (the run)
        cmp_and_merge_page(a0): tree item A@a1
          try_to_merge_two_pages(Q, P)           needs refcount == 2 + 1
    """
    h = kernel_factory(scan=scan)
    a_mm, a = h.area([0x59, 0x58])
    c_mm = h.fork(a_mm)
    h.madvise(c_mm, a, 2)
    h.write_page(c_mm, a, 0x58)
    q, p = h.pfns(c_mm, a, 2)
    assert h.pfns(a_mm, a, 2)[1] == p and q != p
    h.full_scan(2)
    # Q became the KSM page of A@a1 and C@a0 in pass 2; C@a1 (P) joined it in that pass too.
    assert h.pfns(a_mm, a + PAGE_SIZE, 1) == [q]
    assert h.pfns(c_mm, a, 2) == [q, q]
    assert h.counters("pages_shared", "pages_sharing") == {"pages_shared": 1, "pages_sharing": 2}
    h.check()


def test_a_report_out_of_one_page_ends_the_batch_and_gives_the_runs_references_back(
    kernel_factory, monkeypatch
):
    """An oops raised by cmp_and_merge_page (as a reverted fix's KASAN report is) ends the
    batch as it ends ksm_do_scan: the pages before it count as scanned, and no page of the
    run keeps the reference the run took."""
    h = kernel_factory(scan="batch")
    mm, a = h.area(list(range(1, 13)))  # 12 distinct pages: all candidates on pass 2
    h.full_scan()
    calls = []
    real = ksm_scan.cmp_and_merge_page

    def oops_on_the_fifth(k, pfn, item, checksum=None):
        calls.append(pfn)
        if len(calls) == 5:
            raise RuntimeError("BUG: injected oops")
        return real(k, pfn, item, checksum)

    monkeypatch.setattr(ksm_scan, "cmp_and_merge_page", oops_on_the_fifth)
    before = h.counters()["pages_scanned"]
    with pytest.raises(RuntimeError, match="injected oops"):
        h.scan(100)
    assert h.counters()["pages_scanned"] == before + 4
    rc, mc = h.km.page["refcount"], h.km.page["mapcount"]
    assert [int(rc[p]) for p in h.pfns(mm, a, 12)] == [int(mc[p]) for p in h.pfns(mm, a, 12)]
    monkeypatch.undo()
    h.full_scan()  # the scan goes on from the page after the oops
    h.check()


def test_a_page_unmapped_between_the_run_and_its_turn_still_leaves_the_unstable_tree(
    kernel_factory, monkeypatch
):
    """A page a fork shares is looked up again at its turn (get_mergeable_page). If it is
    gone by then, its rmap_item must still leave the unstable tree in this pass, as the
    kernel's cmp_and_merge_page takes it out: otherwise the next pass finds it two passes
    old ("BUG: unstable rmap_item ... age 2 > 1", which a soak met)."""
    h = kernel_factory(scan="batch")
    a_mm, a = h.area([0x41])
    h.fork(a_mm)  # the child maps the same frame: mapcount 2, not kept by the run
    h.full_scan(2)  # pass 2 put A's item into the unstable tree
    item = h.item_at(a_mm, a)
    assert h.item_field(item, "address") & UNSTABLE_FLAG
    gone = iter([True])
    real = ksm_scan.get_mergeable_page
    monkeypatch.setattr(
        ksm_scan, "get_mergeable_page", lambda k, it: -1 if next(gone, False) else real(k, it)
    )
    h.full_scan()  # pass 3: A's page "unmapped" at its turn
    assert not h.item_field(item, "address") & UNSTABLE_FLAG
    monkeypatch.undo()
    h.full_scan(2)
    h.check()


@pytest.mark.parametrize("mode, walked", [("batch", 64), ("vector", 0)])
def test_a_steady_pass_over_unique_pages_walks_no_page_by_page_in_the_vector_scan(
    kernel_factory, monkeypatch, mode, walked
):
    """64 distinct pages, passes 1 and 2 done: pass 3 finds every page unchanged and in
    neither tree. The batch scan sends each through cmp_and_merge_page(); the vector scan
    descends the trees for the run at once and builds the run's unstable tree at once
    (unstable_build.py) without it. Both end with the same items in the same order."""
    trees = []
    for scan in ("exact", mode):
        h = kernel_factory(scan=scan)
        h.area(list(range(1, 65)))
        h.full_scan(2)
        calls: list[int] = []

        def counted(k, pfn, item, ck=None, calls=calls, real=ksm_scan.cmp_and_merge_page):
            calls.append(pfn)
            return real(k, pfn, item, ck)

        monkeypatch.setattr(ksm_scan, "cmp_and_merge_page", counted)
        h.full_scan()
        monkeypatch.undo()
        assert h.counters()["pages_unshared"] == 64
        trees.append(_trees(h, mode))
        h.check()
    assert len(calls) == walked
    assert trees[0] == trees[1] and len(trees[1][1]) == 64


@pytest.mark.parametrize("batch", [64, 250])
def test_the_vector_scan_builds_the_exact_scans_trees_over_many_unique_pages(kernel_factory, batch):
    """Many candidates in one run, held back and built into the unstable tree at the
    run's end, while their twins merge with them before that (twin groups) and merges
    with older tree items erase nodes mid-run. 3 mms of 200 pages, mostly unique, a
    quarter duplicates: after every batch of passes 2 to 4 the stable tree has the exact
    scan's shape, the unstable tree its items in its order, and the counters agree."""
    rnd = random.Random(batch)
    contents = [bytes([1 + i % 251, 1 + i // 251, rnd.randrange(256)]) for i in range(600)]
    for i in rnd.sample(range(600), 150):
        contents[i] = contents[rnd.randrange(600)]
    geo = Geometry(**{**SMALL, "nr_frames": 1024})
    pair = [kernel_factory(geo=geo, scan="exact"), kernel_factory(geo=geo, scan="vector")]
    for h in pair:
        for m in range(3):
            h.area(contents[m * 200 : (m + 1) * 200])
        h.full_scan()
    for step in range(3 * 600 // batch):
        for h in pair:
            h.scan(batch)
        assert _trees(pair[1], "vector") == _trees(pair[0], "vector"), f"batch {step}: a tree differs"
        assert pair[1].counters() == pair[0].counters()
    assert pair[0].counters()["full_scans"] >= 3 and pair[0].counters()["pages_sharing"] > 0
    for h in pair:
        h.check()


def _lists(h, mms) -> tuple:
    """Every mm's rmap_list: the address (with its flags) and smart scan's age of each
    item, in list order."""
    return tuple(tuple((h.item_field(i, "address"), h.item_field(i, "age")) for i in h.rmap_items_of(mm))
                 for mm in mms)


@pytest.mark.parametrize("mode", ["batch", "vector"])
def test_smart_scan_ages_and_skips_the_exact_scans_items_pass_after_pass(kernel_factory, mode):
    """A steady pass takes a page table's items by following the list, and decides smart
    scan's skips for them on arrays (should_skip_rmap_items): over enough passes that the
    unmergeable pages are skipped 1, 2, 4 and 8 passes at a time, with KSM pages (which do
    not age), pages written meanwhile and batches that end mid-table, every item's age and
    skips, the counters (pages_skipped) and ksm_stat stay the exact scan's."""
    pair = [kernel_factory(scan="exact"), kernel_factory(scan=mode)]
    mms = []
    for h in pair:
        h.set("smart_scan", 1)
        mm, a = h.area([100 + i for i in range(40)] + [3] * 6 + [4] * 6)
        mms.append((mm, a))
    rnds = [random.Random(5), random.Random(5)]
    for step in range(70):
        for h, (mm, a), rnd in zip(pair, mms, rnds):
            if step % 9 == 4:
                h.write_page(mm, a + rnd.randrange(52) * PAGE_SIZE, 150 + step)
            h.scan(23)
        got = [tuple((h.item_field(i, "address"), h.item_field(i, "age"), h.item_field(i, "remaining_skips"))
                     for i in h.rmap_items_of(mm)) for h, (mm, _) in zip(pair, mms)]
        assert got[1] == got[0], f"batch {step}: an item's address, age or skips differ"
        assert pair[1].counters() == pair[0].counters(), f"batch {step}: counters differ"
        assert ksm_stat(pair[1].k, mms[1][0]) == ksm_stat(pair[0].k, mms[0][0])
    assert pair[0].counters()["pages_skipped"] > 100
    assert max(pair[0].item_field(i, "remaining_skips") for i in pair[0].rmap_items_of(mms[0][0])) >= 4
    for h in pair:
        h.check()


@pytest.mark.parametrize("mode", ["batch", "vector"])
def test_new_rmap_items_are_listed_and_counted_as_the_exact_scan_lists_them(kernel_factory, mode):
    """The vector scan allocates a page table's new rmap_items at once and links them at
    the cursor (get_next_rmap_items_new): after a first pass, a new area between two
    scanned ones (its items go in the middle of the list), a fork (its pages are KSM pages,
    which smart scan does not age) and more passes, every mm's rmap_list, ksm_stat and the
    counters are the exact scan's."""
    pair = [kernel_factory(scan="exact"), kernel_factory(scan=mode)]
    mms, holes, kids = [], {}, {}
    for h in pair:
        h.set("smart_scan", 1)
        mm, a = h.area([1 + i % 5 for i in range(40)])
        h.area([7] * 8 + list(range(20, 36)), mm=mm)
        syscalls.sys_munmap(h.k, mm, a + 10 * PAGE_SIZE, 12 * PAGE_SIZE)  # a hole, never scanned
        holes[h] = a + 10 * PAGE_SIZE
        mms.append(mm)
    for step in range(6):
        for h, mm in zip(pair, mms):
            if step == 2:
                gap = h.mmap(mm, 12)
                assert gap == holes[h] and h.item_at(mm, gap + 12 * PAGE_SIZE)  # items above it
                for i in range(12):
                    h.write_page(mm, gap + i * PAGE_SIZE, 40 + i % 3)
                h.madvise(mm, gap, 12)
            if step == 3:
                kids[h] = h.fork(mm)
            h.scan(37)
        both = [[mm, kids[h]] if h in kids else [mm] for h, mm in zip(pair, mms)]
        assert _lists(pair[1], both[1]) == _lists(pair[0], both[0]), f"batch {step}: a list differs"
        assert [ksm_stat(pair[1].k, m) for m in both[1]] == [ksm_stat(pair[0].k, m) for m in both[0]]
        assert pair[1].counters() == pair[0].counters(), f"batch {step}: counters differ"
    for h in pair:
        h.check()


@pytest.mark.parametrize("mode", ["exact", "batch", "vector"])
def test_a_scan_out_of_rmap_items_ends_each_batch_at_the_first_page_without_one(kernel_factory, mode):
    """kmem_cache_zalloc(__GFP_NORETRY) failing: the scan stops at the page it could not
    give an item, every batch, and goes on from there once items are freed. 70 pages and
    room for 50 items: each batch says rmap_item_alloc_fail once and scans no page past
    the 50th; once the 20 pages without items are unmapped the pass ends, and the next
    one frees the items of pages unmapped below the cursor."""
    geo = Geometry(**{**SMALL, "max_rmap_items": 50})
    h = kernel_factory(geo=geo, scan=mode)
    mm, a = h.area([1 + i for i in range(70)])
    for n in range(4):
        m = h.mark()
        h.scan(64)
        assert h.counters()["rmap_items"] == 50
        assert h.names(m).count("rmap_item_alloc_fail") == 1, f"batch {n}"
        assert len(h.rmap_items_of(mm)) == 50
        assert [h.item_field(i, "address") & ~(PAGE_SIZE - 1) for i in h.rmap_items_of(mm)] == [
            a + i * PAGE_SIZE for i in range(50)]
    assert h.seqnr == 0
    syscalls.sys_munmap(h.k, mm, a + 50 * PAGE_SIZE, 20 * PAGE_SIZE)
    h.full_scan()
    assert h.counters()["rmap_items"] == 50
    syscalls.sys_munmap(h.k, mm, a, 30 * PAGE_SIZE)
    h.full_scan()
    assert h.counters()["rmap_items"] == 20
    h.check()


def test_a_found_node_whose_path_changed_is_not_walked_to_again_from_the_root(kernel_factory, monkeypatch):
    """Pass 2 of pages whose twins an earlier run put in the unstable tree, in runs where
    unique pages join the tree meanwhile (inserts and rotations on the found nodes'
    paths): each twin's descent found its partner, and its turn goes on from the first
    changed link without the kernel's walk, so the search takes one get_mergeable_page()
    per merge (the partner's page, with its locks) and the counters are the exact scan's."""
    rnd = random.Random(11)
    uniq = [bytes([1 + i % 251, 1 + i // 251, 7]) for i in range(300)]
    twins = [bytes([1 + i % 251, 200, 9]) for i in range(60)]
    first = twins + uniq[:140]
    second = twins[:]
    rnd.shuffle(second)
    second = [p for pair in zip(second, uniq[140:200]) for p in pair] + uniq[200:]
    geo = Geometry(**{**SMALL, "nr_frames": 1024})
    got = {}
    for scan in ("exact", "vector"):
        h = kernel_factory(geo=geo, scan=scan)
        h.area(first)
        h.area(second)
        h.full_scan()
        calls: list[int] = []

        def counted(k, item, calls=calls, real=unstable_tree.get_mergeable_page):
            calls.append(item)
            return real(k, item)

        monkeypatch.setattr(unstable_tree, "get_mergeable_page", counted)
        while h.counters()["full_scans"] < 2:
            h.scan(100)
        monkeypatch.undo()
        got[scan] = (h.counters(), len(calls))
        h.check()
    assert got["vector"][0] == got["exact"][0] and got["exact"][0]["pages_shared"] == 60
    assert got["vector"][1] == 60, "one partner page a merge"
    assert got["exact"][1] > 5 * 60, "the kernel's walks"
