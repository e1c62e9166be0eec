# fork of a mergeable mm: dup_mmap() -> ksm_fork() (actors/kernel/fork.py, ksm_mm.py),
# and what ksmd then does with the child's KSM pages (cmp_and_merge_page).
#
# ksm_fork() registers the child with __ksm_enter() - its slot goes just behind the
# scan cursor - with ksm_merging_pages and ksm_rmap_items at zero (the selftests'
# "ksm_merging_pages is not inherited after fork") and adds the KSM zero pages the child
# inherited to the global ksm_zero_pages. No rmap_items are copied. The child maps the
# parent's KSM pages (mapcount grows); when ksmd first visits such a page it is already
# KSM, so there is no checksum round: stable_tree_search() returns the page itself and
# the child's item is appended to its node at once, even past max_page_sharing (the
# bypass: no warning for a KSM fork). A KSM page that only such a child still maps
# (both original sharers left it) has a stable node with no rmap_item: mm/ksm.c's
# __is_page_sharing_candidate() refuses to merge new pages into it ("the underlying
# tree_page of the other sharer is going to be freed soon") until the child's own item
# is appended; the model did not, until the test below found it.
from __future__ import annotations

import pytest

from actors.kernel import exec as execops
from actors.kernel import ksm_mm, mm_slot
from actors.kernel import mm as mmops
from actors.kernel.fork import copy_process, new_task
from actors.kernel.memory import is_ksm_zero_pte
from actors.kernel.syscalls import SyscallError
from actors.kernel.sysfs import ksm_stat
from shared_mem.layout import MMF_VM_MERGE_ANY, MMF_VM_MERGEABLE, PAGE_SIZE, Geometry
from tests.kernel.conftest import SMALL

pytestmark = [pytest.mark.timeout(30)]


def test_fork_registers_the_child_with_zero_ksm_counters(kern):
    h = kern
    h.set("max_page_sharing", 2)
    parent, a = h.area([0x2E, 0x2E, 0x3F])
    h.full_scan(2)
    kpfn = h.pfn(parent, a)
    assert ksm_stat(h.k, parent)["ksm_merging_pages"] == 2
    node = int(h.km.page["mapping"][kpfn])
    assert h.node_field(node, "rmap_hlist_len") == 2, "the node is full"

    h.scan(1)                                 # cursor inside the parent
    m = h.mark()
    child = h.fork(parent)
    assert [f["mm"] for f in h.fields("ksm_enter", m)] == [h.km.mm.idx(child)]
    assert int(h.km.mm.flags[h.km.mm.idx(child)]) & MMF_VM_MERGEABLE
    assert mm_slot.slots(h.k) == [h.slot_of(child), h.slot_of(parent)], "behind the cursor"
    st = ksm_stat(h.k, child)
    assert st["ksm_merging_pages"] == 0 and st["ksm_rmap_items"] == 0
    assert h.pfns(child, a, 2) == [kpfn, kpfn] and int(h.km.page["mapcount"][kpfn]) == 4
    h.check()

    h.full_scan()                             # the rest of the parent's pass
    assert h.rmap_items_of(child) == []
    m = h.mark()
    h.full_scan()                             # the child's first visit
    assert h.counters("pages_shared", "pages_sharing") == {"pages_shared": 1, "pages_sharing": 3}
    assert h.node_field(node, "rmap_hlist_len") == 4
    assert "warning" not in h.names(m), "a KSM fork may go past max_page_sharing"
    assert ksm_stat(h.k, child)["ksm_merging_pages"] == 2
    assert h.counters("stable_node_chains")["stable_node_chains"] == 0
    h.check()

    h.write_page(child, a + PAGE_SIZE, 0x2E)  # the child's COW does not touch the parent
    assert h.pfn(child, a + PAGE_SIZE) != kpfn and h.pfn(parent, a + PAGE_SIZE) == kpfn
    h.check()


def test_forked_ksm_zero_pages_are_counted_globally(kern):
    h = kern
    h.set("use_zero_pages", 1)
    parent, a = h.area([0, 0, 0x01])
    h.full_scan(2)
    assert h.counters("ksm_zero_pages")["ksm_zero_pages"] == 2
    child = h.fork(parent)
    assert all(is_ksm_zero_pte(h.pte(child, a + i * PAGE_SIZE)) for i in range(2))
    assert h.counters("ksm_zero_pages")["ksm_zero_pages"] == 4
    assert ksm_stat(h.k, child)["ksm_zero_pages"] == 2
    h.check()
    h.mmput(child)                            # zap of the KSM zero ptes gives them back
    assert h.counters("ksm_zero_pages")["ksm_zero_pages"] == 2
    h.check()


def test_ksm_page_kept_only_by_an_unscanned_fork_takes_no_new_sharer(kern):
    h = kern
    a_mm, a = h.area([0x5E])
    b_mm, b = h.area([0x5E])
    h.full_scan(2)
    kpfn = h.pfn(a_mm, a)
    node = int(h.km.page["mapping"][kpfn])
    d_mm, d = h.area([0x5E])                  # a third copy: its checksum pass first
    h.full_scan()
    child = h.fork(a_mm)                      # the child maps the KSM page, unscanned
    h.write_page(a_mm, a, 0x01)               # both sharers leave it
    h.write_page(b_mm, b, 0x02)
    h.full_scan()
    # a and b leave the node (rmap_hlist_len 0) before d is searched: the node is no
    # sharing candidate, so d goes to the unstable tree; the child's visit then appends
    # its item (the fork bypass) and the node counts as shared again.
    assert h.counters("pages_shared", "pages_sharing", "pages_unshared") == \
        {"pages_shared": 1, "pages_sharing": 0, "pages_unshared": 1}
    assert h.pfn(d_mm, d) != kpfn and h.pfn(child, a) == kpfn
    assert h.node_field(node, "rmap_hlist_len") == 1
    h.full_scan()                             # now d joins the child's KSM page
    assert h.counters("pages_shared", "pages_sharing", "pages_unshared") == \
        {"pages_shared": 1, "pages_sharing": 1, "pages_unshared": 2}   # a's, b's copies
    assert h.pfn(d_mm, d) == kpfn
    h.check()


def test_exec_keeps_merge_any_and_registers_the_new_mm(kern):
    """bprm_mm_init(): the new mm gets the old one's flags & MMF_INIT_MASK (merge-any
    included) and ksm_execve() puts it on the KSM list; the old mm is put."""
    h = kern
    k = h.k
    task = new_task(k, "exec-me")
    old = int(k.km.task.mm[k.km.task.idx(task, "t")])
    ksm_mm.ksm_enable_merge_any(k, old)
    mm = execops.do_execve(k, task)
    assert mm != old and int(k.km.task.mm[k.km.task.idx(task, "t")]) == mm
    assert ksm_mm.mm_flags(k, mm) & MMF_VM_MERGE_ANY and ksm_mm.mm_flags(k, mm) & MMF_VM_MERGEABLE
    assert h.slot_of(mm)
    plain = new_task(k, "plain")
    pm = execops.do_execve(k, plain)
    assert not ksm_mm.mm_flags(k, pm) & (MMF_VM_MERGE_ANY | MMF_VM_MERGEABLE)


def test_with_the_proposed_fix_the_child_counts_the_zero_ptes_it_was_given(kernel_factory):
    """fix:zero-pages-fork counts the KSM zero ptes copy_pte_range copies, so a zero pte the
    parent lost after the counter was read no longer leaves the child counting it
    (docs/bugs/zero-pages-fork.md; the interleaving itself is tests/sim's zero-pages-fork)."""
    h = kernel_factory(variants=("fix:zero-pages-fork",))
    h.set("use_zero_pages", 1)
    parent, _a = h.area([0, 0, 0x01])
    h.full_scan(2)
    child = h.fork(parent)
    assert ksm_stat(h.k, child)["ksm_zero_pages"] == 2
    assert h.counters("ksm_zero_pages")["ksm_zero_pages"] == 4
    h.check()


@pytest.mark.parametrize("limit,err", [({"max_tasks": 2}, "EAGAIN"), ({"max_mms": 2}, "ENOMEM")])
def test_fork_past_a_table_is_refused_and_changes_nothing(kernel_factory, limit, err):
    """copy_process() with every task record in use is EAGAIN (the kernel's max_threads
    check); with every mm_struct in use, ENOMEM. No half-made child, the parent untouched
    (issue 11, "Limits")."""
    h = kernel_factory(geo=Geometry(**{**SMALL, **limit}))
    parent = new_task(h.k, "parent")
    new_task(h.k, "filler")
    mm = int(h.k.km.task.mm[h.k.km.task.idx(parent, "test")])
    h.mmap(mm, 2)
    before = (h.k.km.task.nr_live(), h.k.km.mm.nr_live(), list(mmops.vmas(h.k, mm)))
    with pytest.raises(SyscallError) as e:
        copy_process(h.k, parent)
    assert e.value.errno_name == err
    assert (h.k.km.task.nr_live(), h.k.km.mm.nr_live(), list(mmops.vmas(h.k, mm))) == before
