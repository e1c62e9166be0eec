# ksm_mm_slot: KSM's registration of an mm, on the circular list ksmd scans.
#
# The list is headed by ksm_mm_head (a sentinel slot allocated at boot) and, with
# the cursor ksm_scan.mm_slot, is guarded by ksm_mmlist_lock. The kernel finds a
# slot from its mm through mm_slots_hash; we keep the same lookup as a field of
# the mm record (mm->ksm_slot), changed only under ksm_mmlist_lock.
from __future__ import annotations

from actors.kernel.context import Kernel
from shared_mem.arena import NULL


def boot_init(k: Kernel) -> None:
    head = k.km.mm_slot.alloc(site="ksm_init")
    hi = k.km.mm_slot.idx(head, "ksm_init")
    k.km.mm_slot.next[hi] = head
    k.km.mm_slot.prev[hi] = head
    k.ksm["mm_head"] = head
    k.ksm["scan_slot"] = head
    k.ksm["scan_rmap_owner"] = head
    k.ksm["scan_rmap_in_slot"] = 1


def head(k: Kernel) -> int:
    return k.ks.mm_head


def next_slot(k: Kernel, slot: int) -> int:
    return int(k.km.mm_slot.next[k.km.mm_slot.idx(slot, "mm_slot.next")])


def list_empty(k: Kernel) -> bool:
    h = head(k)
    return next_slot(k, h) == h


def list_del(k: Kernel, slot: int) -> None:
    s = k.km.mm_slot
    i = s.idx(slot, "list_del")
    n, p = int(s.next[i]), int(s.prev[i])
    s.next[s.idx(p, "list_del")] = n
    s.prev[s.idx(n, "list_del")] = p
    s.next[i] = NULL
    s.prev[i] = NULL


def list_add_after(k: Kernel, slot: int, where: int) -> None:
    """list_add(&slot, &where): slot goes right after where."""
    s = k.km.mm_slot
    i, w = s.idx(slot, "list_add"), s.idx(where, "list_add")
    n = int(s.next[w])
    s.next[i] = n
    s.prev[i] = where
    s.prev[s.idx(n, "list_add")] = slot
    s.next[w] = slot


def list_add_before(k: Kernel, slot: int, where: int) -> None:
    """list_add_tail(&slot, &where): slot goes right before where."""
    s = k.km.mm_slot
    p = int(s.prev[s.idx(where, "list_add_tail")])
    list_add_after(k, slot, p)


def get_mm_slot(k: Kernel, mm: int) -> int:
    """mm_slot_lookup(mm_slots_hash, mm): caller holds ksm_mmlist_lock."""
    slot = int(k.km.mm.ksm_slot[k.km.mm.idx(mm, "get_mm_slot")])
    return slot if slot and k.km.mm_slot.valid(slot) else NULL


def hash_add(k: Kernel, mm: int, slot: int) -> None:
    k.km.mm_slot.mm[k.km.mm_slot.idx(slot, "hash_add")] = mm
    k.km.mm.ksm_slot[k.km.mm.idx(mm, "hash_add")] = slot


def hash_del(k: Kernel, slot: int) -> None:
    mm = int(k.km.mm_slot.mm[k.km.mm_slot.idx(slot, "hash_del")])
    k.km.mm.ksm_slot[k.km.mm.idx(mm, "hash_del")] = NULL


def slots(k: Kernel) -> list[int]:
    out = []
    h = head(k)
    s = next_slot(k, h)
    while s != h:
        out.append(s)
        s = next_slot(k, s)
    return out
