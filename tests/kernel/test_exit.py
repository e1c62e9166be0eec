# The exit path meets KSM: mmput -> __mmput -> ksm_exit/__ksm_exit, exit_mmap, mmdrop
# (actors/kernel/exit.py, ksm_mm.py) and ksmd's reaping in scan_get_next_rmap_item().
#
# Today's __ksm_exit() never takes ksm_thread_mutex. Under ksm_mmlist_lock it looks at
# the mm's slot:
#   - fast path: the slot is not the scan cursor and has no rmap_items: it is unhashed,
#     unlinked and freed at once, MMF_VM_MERGEABLE is cleared and the slot's mm_count
#     reference is dropped (mmdrop) before exit_mmap runs;
#   - slow path: the slot has rmap_items (or is the cursor): it is moved to just after
#     the cursor (left in place if it is the cursor), and mmap_write_lock/unlock is the
#     barrier against ksmd; the mm_struct lives on with the slot's mm_count reference,
#     and ksmd, finding mm_users == 0 (ksm_test_exit), frees the rmap_items, the slot,
#     and drops that last reference (the mm is freed then).
# A merged mm that exits leaves the counters consistent at every step: its rmap_items
# stay on the stable nodes until ksmd reaps them, a KSM page whose last mapping went
# with the exit becomes a stale node removed when met, and in the end nothing is left.
from __future__ import annotations

import errno

import pytest

from actors.kernel import mm_slot
from actors.kernel.exit import do_exit
from actors.kernel.fork import new_task, task_running
from shared_mem.layout import MMF_VM_MERGEABLE, PAGE_SIZE, PF_EXITING, PG_FREE

pytestmark = [pytest.mark.timeout(30)]


def _mi(h, mm):
    return h.km.mm.idx(mm)


def _count(h, mm):
    return int(h.km.mm.count[_mi(h, mm)])


def test_fast_path_frees_the_slot_at_once(kern):
    h = kern
    mm, _a = h.area([1, 2])                  # registered, never scanned: no rmap_items
    slot = h.slot_of(mm)
    assert slot and _count(h, mm) == 2
    mi = _mi(h, mm)
    m = h.mark()
    h.mmput(mm)
    names = h.names(m)
    assert h.fields("ksm_exit", m) == [{"mm": mi, "path": "fast"}]
    drops = h.fields("mmdrop", m)
    assert [(d["site"], d["mm_count"]) for d in drops] == [("__ksm_exit:mmdrop", 1), ("__mmput", 0)]
    assert names.index("ksm_exit") < names.index("exit_mmap") < names.index("mm_free")
    assert not h.km.mm_slot.valid(slot) and mm_slot.list_empty(h.k)
    assert not h.km.mm.valid(mm)
    assert h.km.mm_slot.nr_live() == 1, "only ksm_mm_head"
    h.check()
    h.check_no_leaks()
    assert h.scan(100) == 0 and h.seqnr == 0


def test_slow_path_moves_the_slot_after_the_cursor_and_ksmd_frees_it(kern):
    h = kern
    h.set("smart_scan", 0)
    a_mm, _a = h.area([0x11, 0x22])
    c_mm, _c = h.area([0x33, 0x34])
    b_mm, _b = h.area([0x11])
    slots = [h.slot_of(x) for x in (a_mm, c_mm, b_mm)]
    assert mm_slot.slots(h.k) == slots
    h.full_scan()                            # every mm now has rmap_items
    assert h.scan(1) == 1                    # pass 2 has started: the cursor is inside a_mm
    assert int(h.k.ksm["scan_slot"]) == slots[0]

    ci = _mi(h, c_mm)
    m = h.mark()
    h.mmput(c_mm)
    assert h.fields("ksm_exit", m) == [{"mm": ci, "path": "barrier"}]
    assert mm_slot.slots(h.k) == [slots[0], slots[1], slots[2]], "c was already right after a"
    assert h.km.mm.valid(c_mm) and int(h.km.mm.users[ci]) == 0 and _count(h, c_mm) == 1
    assert int(h.km.mm.ksm_rmap_items[ci]) == 2 and h.counters("rmap_items")["rmap_items"] == 5
    assert int(h.km.mm.rss_anon[ci]) == 0, "exit_mmap zapped the pages"
    h.check()

    # ksmd: the rest of a_mm, then c_mm (exiting: reaped), then b_mm merges with a_mm.
    m = h.mark()
    h.full_scan()
    assert h.fields("ksm_remove_mm", m) == [{"mm": ci, "exiting": True}]
    names = h.names(m)
    assert names.index("ksm_remove_mm") < names.index("mm_free") < names.index("ksm_stable_tree_insert")
    assert not h.km.mm.valid(c_mm) and not h.km.mm_slot.valid(slots[1])
    assert mm_slot.slots(h.k) == [slots[0], slots[2]]
    assert h.counters("rmap_items", "pages_shared", "pages_sharing") == \
        {"rmap_items": 3, "pages_shared": 1, "pages_sharing": 1}
    h.check()


def test_exit_moves_a_later_slot_to_just_after_the_cursor(kern):
    h = kern
    a_mm, _a = h.area([0x41, 0x42])
    b_mm, _b = h.area([0x43])
    c_mm, _c = h.area([0x44])
    sa, sb, sc = (h.slot_of(x) for x in (a_mm, b_mm, c_mm))
    assert mm_slot.slots(h.k) == [sa, sb, sc]
    h.full_scan()
    h.scan(1)                                # cursor inside a_mm
    ci = _mi(h, c_mm)
    h.mmput(c_mm)
    assert mm_slot.slots(h.k) == [sa, sc, sb], "list_move right after the cursor"
    m = h.mark()
    h.scan(2)                                # a's second page, then c is reaped
    assert h.fields("ksm_remove_mm", m) == [{"mm": ci, "exiting": True}]
    assert int(h.k.ksm["scan_slot"]) == sb and h.seqnr == 1
    assert mm_slot.slots(h.k) == [sa, sb]
    h.full_scan()
    h.check()


def test_exit_of_the_mm_at_the_cursor_leaves_the_slot_for_ksmd(kern):
    h = kern
    mm, _a = h.area([0x51, 0x52])
    slot = h.slot_of(mm)
    h.scan(1)                                # pass 1, cursor inside mm
    assert int(h.k.ksm["scan_slot"]) == slot
    mi = _mi(h, mm)
    m = h.mark()
    h.mmput(mm)
    assert h.fields("ksm_exit", m) == [{"mm": mi, "path": "barrier"}]
    assert mm_slot.slots(h.k) == [slot] and int(h.k.ksm["scan_slot"]) == slot
    assert h.km.mm.valid(mm) and _count(h, mm) == 1
    h.check()
    m = h.mark()
    assert h.scan(100) == 0                  # nothing left to scan in the exiting mm
    assert h.fields("ksm_remove_mm", m) == [{"mm": mi, "exiting": True}]
    assert h.names(m)[-1] == "ksm_stop_scan" and h.seqnr == 1
    assert mm_slot.list_empty(h.k) and not h.km.mm.valid(mm)
    assert h.counters("rmap_items")["rmap_items"] == 0
    h.check()
    h.check_no_leaks()


def test_mmput_of_merged_mms_keeps_the_counters_consistent(kern):
    h = kern
    a_mm, a = h.area([0x66, 0x67])
    b_mm, b = h.area([0x66, 0x67])
    h.full_scan(2)
    kpfns = h.pfns(a_mm, a, 2)
    assert h.pfns(b_mm, b, 2) == kpfns
    full = {"pages_shared": 2, "pages_sharing": 2, "rmap_items": 4}
    assert h.counters(*full) == full
    h.check()

    h.mmput(b_mm)                            # slow path: b's items still on the nodes
    assert h.counters(*full) == full
    assert int(h.k.ksm["mmput_in_flight"]) == 0, "the invariant checker would wait for ever"
    assert [int(h.km.page["mapcount"][p]) for p in kpfns] == [1, 1]
    assert h.km.mm.valid(b_mm) and int(h.km.mm.users[_mi(h, b_mm)]) == 0
    assert int(h.km.mm.flags[_mi(h, b_mm)]) & MMF_VM_MERGEABLE, "cleared only by ksmd's reaping"
    h.check()

    h.full_scan()                            # ksmd reaps b: a's pages stay KSM pages
    assert h.counters(*full) == {"pages_shared": 2, "pages_sharing": 0, "rmap_items": 2}
    assert not h.km.mm.valid(b_mm)
    assert h.read(a_mm, a, 2 * PAGE_SIZE) == bytes([0x66]) * PAGE_SIZE + bytes([0x67]) * PAGE_SIZE
    h.check()

    h.mmput(a_mm)                            # the last mappings go: the KSM pages are freed
    assert all(h.k.page_flags[p] & PG_FREE for p in kpfns)
    assert h.counters(*full) == {"pages_shared": 2, "pages_sharing": 0, "rmap_items": 2}
    h.check()

    m = h.mark()
    h.full_scan()                            # reaping a meets the stale nodes
    assert sorted(f["pfn"] for f in h.fields("ksm_remove_ksm_page", m)) == sorted(kpfns)
    assert h.counters(*full) == {"pages_shared": 0, "pages_sharing": 0, "rmap_items": 0}
    assert h.km.stable_node.nr_live() == 0 and h.stable_root() == 0
    assert mm_slot.list_empty(h.k)
    h.check()
    h.check_no_leaks()


def test_do_exit_of_a_task_already_in_do_exit_changes_nothing(kern):
    """A second fatal signal to a dying task (chaos SIGKILLs a task whose exit is under
    way): do_exit sees PF_EXITING already set, answers -ESRCH and leaves the task to the
    exit that runs it; that exit then releases it once."""
    t = new_task(kern.k, "victim")
    assert task_running(kern.km, t)
    ti = kern.km.task.idx(t)
    kern.km.task.atomic("flags").set_bits(ti, PF_EXITING)      # the first exit has begun
    mm = int(kern.km.task.mm[ti])
    assert not task_running(kern.km, t)
    assert do_exit(kern.k, t, 137, "killed") == -errno.ESRCH
    assert int(kern.km.task.mm[ti]) == mm and kern.km.task.valid(t)     # untouched
    assert kern.names()[-1] == "do_exit_exiting"
    kern.km.task.atomic("flags").clear_bits(ti, PF_EXITING)
    pid = int(kern.km.task.pid[ti])
    assert do_exit(kern.k, t, 0, "exit") == pid and not kern.km.task.valid(t)
