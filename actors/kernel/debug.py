# Detectors that fire where broken state is used (DESIGN.md "Detection and reports").
#
# mm/page_alloc.c's free_pages_prepare()/check_new_page() and mm/memory.c's
# print_bad_pte(), shaped like the kernel's messages:
#
#   BUG: Bad page state in process kswapd  pfn:0x1f      a frame freed (refcount 0) that is
#                                                         still mapped, in the swap cache, ...,
#                                                         or allocated while not clean
#   BUG: Bad page map in process task-101  pte:... pmd:... a present pte whose frame is free or
#                                                         not a mapped anonymous/KSM page, or a
#                                                         pte the page's rmap walk cannot reach
#
# plus the run=2 completion check (seed 002's rule: once KSM_RUN_UNMERGE completed, no KSM
# page is mapped and no stable node is left). Each report goes through KernelMemory.on_report,
# the hook the arenas' KASAN reports use (Actor.report in an actor, Cluster._add_report in the
# supervisor). A bad page is reported once per frame (a bit in page.dbg, shared by every
# actor); like the kernel (which taints and goes on), the run continues, and a frame that was
# bad when freed is kept off the free lists (PAGE_DBG_LEAKED) so it cannot be handed out again.
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from actors.kernel import mm as mmops
from actors.kernel.hlist import items_of_node
from shared_mem.arena import UseAfterFree, fmt_handle
from shared_mem.atomic import AtomicField
from shared_mem.layout import (
    PAGE_MASK,
    PAGE_SHIFT,
    PG_ACTIVE,
    PG_ANON,
    PG_DIRTY,
    PG_FREE,
    PG_KSM,
    PG_MLOCKED,
    PG_REFERENCED,
    PG_RESERVED,
    PG_SWAPCACHE,
    PG_UPTODATE,
    PTE_PFN_MASK,
    PTE_PRESENT,
    PTE_SPECIAL,
    PTRS_PER_PTE,
    VM_MERGEABLE,
    VM_SHARED,
)

if TYPE_CHECKING:
    from actors.kernel.context import Kernel

PAGE_DBG_BAD_STATE = 1 << 0    # "Bad page state" reported for this frame
PAGE_DBG_BAD_MAP = 1 << 1      # "Bad page map" reported for a pte of this frame
PAGE_DBG_RMAP = 1 << 2         # "rmap walk missed a pte" reported for this frame
PAGE_DBG_LEAKED = 1 << 3       # bad at free: kept off the free lists for good

# A swap-in that read run != KSM_RUN_UNMERGE just before run=2 was stored may still map the
# KSM page after the unmerger passed its mm (the kernel has the same window). A survivor
# whose last such swap-in decided within this many ns before run=2 began is excused.
SWAPIN_RACE_NS = 1_000_000_000

_FLAG_NAMES = ((PG_ANON, "anon"), (PG_KSM, "ksm"), (PG_SWAPCACHE, "swapcache"),
               (PG_UPTODATE, "uptodate"), (PG_MLOCKED, "mlocked"), (PG_DIRTY, "dirty"),
               (PG_RESERVED, "reserved"), (PG_REFERENCED, "referenced"), (PG_FREE, "buddy"),
               (PG_ACTIVE, "active"))


def flag_names(f: int) -> str:
    return "|".join(n for bit, n in _FLAG_NAMES if f & bit)


def _dbg(k: Kernel) -> AtomicField:
    a = k.__dict__.get("_page_dbg")
    if a is None:
        a = k.__dict__["_page_dbg"] = AtomicField(k.km.page["dbg"])
    return a


def claim(k: Kernel, pfn: int, bit: int) -> bool:
    """True the first time anyone claims bit for pfn (test_and_set_bit across actors)."""
    return not _dbg(k).set_bits(pfn, bit) & bit


def is_leaked(k: Kernel, pfn: int) -> bool:
    return bool(int(k.km.page["dbg"][pfn]) & PAGE_DBG_LEAKED)


def emit(k: Kernel, rep: dict) -> None:
    """Deliver a report like the arenas' KASAN reports (and log it as an event)."""
    k.ev(rep["kind"], title=rep["title"], **{f: v for f, v in rep["data"].items()
                                               if isinstance(v, int | str | bool)})
    hook = getattr(k.km, "on_report", None)
    if hook is not None:
        hook(rep)


def _process(k: Kernel) -> str:
    return k.actor.split(":", 1)[0]


def _task_of_mm(k: Kernel, mm: int) -> str:
    km = k.km
    if not km.mm.valid(mm):
        return "?"
    owner = int(km.mm.owner[km.mm.idx(mm, "bad_page:owner")])
    if owner and km.task.valid(owner):
        return f"task-{int(km.task.pid[km.task.idx(owner, 'bad_page:owner')])}"
    return "?"


def _stable_node_line(k: Kernel, pfn: int) -> str:
    km = k.km
    f = int(km.page["flags"][pfn])
    mapping = int(km.page["mapping"][pfn])
    if not f & PG_KSM:
        return ""
    if not mapping:
        return "ksm: no stable node (unhooked)"
    sn = km.stable_node
    if not sn.valid(mapping):
        return f"ksm: stable node {fmt_handle(mapping)} is freed"
    ni = sn.idx(mapping, "dump_page")
    return (f"ksm: stable node {ni} kpfn:{int(sn.kpfn[ni]):#x} rmap_hlist_len:{int(sn.rmap_hlist_len[ni])}"
            f"{'' if int(sn.kpfn[ni]) == pfn else ' (points at another frame)'}")


def dump_page(k: Kernel, pfn: int, reason: str) -> list[str]:
    """dump_page(): the struct page fields and why it was dumped."""
    p = k.km.page
    f = int(p["flags"][pfn])
    lines = [
        f"page: refcount:{int(p['refcount'][pfn])} mapcount:{int(p['mapcount'][pfn])} "
        f"mapping:{int(p['mapping'][pfn]):016x} index:{int(p['index'][pfn]):#x} pfn:{pfn:#x}",
        f"flags: {f:#x}({flag_names(f)})",
    ]
    if f & PG_SWAPCACHE:
        lines.append(f"swap: entry {int(p['private'][pfn])}")
    sn = _stable_node_line(k, pfn)
    if sn:
        lines.append(sn)
    lines.append(f"page dumped because: {reason}")
    return lines


def page_data(k: Kernel, pfn: int) -> dict[str, Any]:
    p = k.km.page
    return {"pfn": pfn, "flags": int(p["flags"][pfn]), "refcount": int(p["refcount"][pfn]),
            "mapcount": int(p["mapcount"][pfn]), "mapping": int(p["mapping"][pfn]),
            "index": int(p["index"][pfn]), "ksm": bool(int(p["flags"][pfn]) & PG_KSM)}


# -- Bad page state -------------------------------------------------------------------------------
def bad_page(k: Kernel, pfn: int, reason: str, where: str = "", bit: int = PAGE_DBG_BAD_STATE) -> bool:
    """bad_page(): report once per frame; True if this call reported."""
    if not claim(k, pfn, bit):
        return False
    title = f"BUG: Bad page state in process {_process(k)}  pfn:{pfn:#x}"
    lines = [title, *dump_page(k, pfn, reason)]
    if where:
        lines.append(f"in {where} ({k.actor}, pid {k.pid})")
    lines.append("Disabling lock debugging due to kernel taint")
    data = page_data(k, pfn)
    data.update(reason=reason, where=where, actor=k.actor)
    emit(k, {"kind": "bad_page", "title": title, "text": "\n".join(lines) + "\n", "data": data})
    return True


def free_page_prepare(k: Kernel, pfn: int, where: str = "put_page") -> bool:
    """free_pages_prepare(): False (and a report) when the frame must not be freed."""
    p = k.km.page
    f = int(p["flags"][pfn])
    if f & PG_FREE:
        reason = "PageBuddy: freeing a free page (double free)"
    elif f & PG_RESERVED:
        reason = "PAGE_FLAGS_CHECK_AT_FREE flag(s) set: reserved"
    elif int(p["mapcount"][pfn]) != 0:
        reason = "nonzero mapcount"
    elif int(p["refcount"][pfn]) != 0:
        reason = "nonzero _refcount"
    elif f & PG_SWAPCACHE:
        reason = "PAGE_FLAGS_CHECK_AT_FREE flag(s) set: swapcache"
    elif k.km.swap is not None and f & PG_ANON and _in_swap_cache(k, pfn):
        reason = "freed while the swap cache still points at it"
    else:
        return True
    bad_page(k, pfn, reason, where)
    if not f & PG_FREE:
        _dbg(k).set_bits(pfn, PAGE_DBG_LEAKED)   # the kernel leaks a bad page
    return False


def _in_swap_cache(k: Kernel, pfn: int) -> bool:
    slot = int(k.km.page["private"][pfn])
    sc = k.km.swap_cache
    return 0 <= slot < len(sc) and int(sc[slot]) == pfn + 1


def check_new_page(k: Kernel, pfn: int, flags: int, ref: int, mapc: int) -> None:
    """check_new_page(): the allocator popped a frame that was not clean (report it)."""
    if flags & ~PG_FREE or not flags & PG_FREE:
        reason = f"PAGE_FLAGS_CHECK_AT_PREP flag(s) set: {flag_names(flags & ~PG_FREE) or 'not free'}"
    elif ref:
        reason = "nonzero _refcount"
    else:
        reason = "nonzero mapcount"
    bad_page(k, pfn, reason + f" (refcount {ref}, mapcount {mapc} on the free list)", "alloc_pages")
    _dbg(k).set_bits(pfn, PAGE_DBG_LEAKED)   # dropped from the free list for good


# -- Bad page map -----------------------------------------------------------------------------------
def pte_page_ok(k: Kernel, pfn: int) -> bool:
    """The frame a present, non-special pte maps must be a live, mapped anon or KSM page."""
    f = int(k.page_flags[pfn])
    return not f & PG_FREE and bool(f & (PG_ANON | PG_KSM)) and int(k.km.page["mapcount"][pfn]) > 0


def _pmd(k: Kernel, mm: int, addr: int) -> int:
    km = k.km
    if not km.mm.valid(mm):
        return 0
    pgi = (addr >> PAGE_SHIFT) // PTRS_PER_PTE
    row = km.pgd[km.mm.idx(mm, "print_bad_pte")]
    return int(row[pgi]) if pgi < len(row) else 0


def _vma_line(k: Kernel, mm: int, addr: int) -> str:
    km = k.km
    try:
        vma = mmops.vma_lookup(k, mm, addr) if km.mm.valid(mm) else 0
    except Exception:   # a racing munmap: the line is only informative
        vma = 0
    if not vma or not km.vma.valid(vma):
        return f"addr:{addr:016x} (no vma)"
    vi = km.vma.idx(vma, "print_bad_pte")
    return (f"addr:{addr:016x} vm_flags:{int(km.vma.flags[vi]):08x} "
            f"anon_vma:{int(km.vma.anon_vma[vi]):016x} vma:[{int(km.vma.start[vi]):#x}-{int(km.vma.end[vi]):#x}]")


def bad_pte(k: Kernel, mm: int, addr: int, pte: int, where: str, reason: str = "") -> bool:
    """print_bad_pte(): a present pte whose frame is free or not a mapped page (once per frame)."""
    pfn = pte & PTE_PFN_MASK
    if not pfn < k.km.geo.nr_frames:
        reason = reason or "pfn beyond the end of memory"
        pfn_ok = False
    else:
        pfn_ok = True
        f = int(k.page_flags[pfn])
        if not reason:
            if f & PG_FREE:
                reason = "pte maps a free frame (freed while mapped)"
            elif not f & (PG_ANON | PG_KSM):
                reason = "pte maps a frame that is not an anonymous or KSM page (freed and reused?)"
            else:
                reason = "pte maps a page whose mapcount is not positive"
        if not claim(k, pfn, PAGE_DBG_BAD_MAP):
            return False
    title = f"BUG: Bad page map in process {_process(k)}  pte:{pte:016x} pmd:{_pmd(k, mm, addr):016x}"
    lines = [title]
    if pfn_ok:
        lines += dump_page(k, pfn, reason)
    else:
        lines.append(f"page dumped because: {reason}")
    lines.append(_vma_line(k, mm, addr) + f" mm:{_task_of_mm(k, mm)}")
    lines.append(f"in {where} ({k.actor}, pid {k.pid})")
    data = page_data(k, pfn) if pfn_ok else {"pfn": pfn}
    data.update(pte=pte, addr=addr, task=_task_of_mm(k, mm), reason=reason, where=where, actor=k.actor)
    emit(k, {"kind": "bad_page", "title": title, "text": "\n".join(lines) + "\n", "data": data})
    return True


# -- who maps a frame (slow path: whole page-table arena) ----------------------------------------------
def mappers_of(k: Kernel, pfn: int) -> list[tuple[int, int, int]]:
    """(mm handle, address, pte) of every present, non-special pte of a live mm mapping pfn.

    An observer: nothing pins the page tables or the mms it finds, and an exit may free
    them while it looks (run=2's completion check races the exit of an OOM victim). So it
    reads as a seqlock reader does: a handle is made from the slot's generation first,
    the pte is read with peek(), and whatever is no longer live afterwards is left out,
    never dereferenced through idx() (that would be the checker's own use-after-free)."""
    km = k.km
    pt = km.ptable
    mask = PTE_PRESENT | PTE_SPECIAL | PTE_PFN_MASK
    hits = np.argwhere((pt.pte & mask) == (PTE_PRESENT | pfn))
    out = []
    for ti, j in hits:
        ti, j = int(ti), int(j)
        h = pt.handle_of(ti)
        pte = pt.peek(h, "pte", j)
        if pte is None:
            continue
        owners = [(km.mm.handle_of(int(mi)), int(pgi)) for mi, pgi in np.argwhere(km.pgd == h)]
        if pt.peek(h, "pte", j) != pte or (pte & mask) != (PTE_PRESENT | pfn):
            continue
        out += [(mm, (pgi * PTRS_PER_PTE + j) << PAGE_SHIFT, pte) for mm, pgi in owners if km.mm.valid(mm)]
    return out


def check_rmap_walk(k: Kernel, pfn: int, visited: set[tuple[int, int]], where: str, held_refs: int = 1) -> bool:
    """After a complete rmap walk (page locked) left the page mapped: every pte mapping it
    must have been reachable. Returns True if it reported.

    Ptes a walk may legitimately not have seen are excluded by two guards: the number of
    ptes found must equal page_mapcount (nothing was being mapped or unmapped meanwhile), and
    nobody but the caller (held_refs) and the swap cache may hold a reference (a merge into a
    KSM page holds one from stable_tree_search until its rmap_item is on the stable node).
    """
    km = k.km
    found = mappers_of(k, pfn)
    mapc = int(km.page["mapcount"][pfn])
    f = int(km.page["flags"][pfn])
    ref = int(km.page["refcount"][pfn])
    if len(found) != mapc or ref != mapc + held_refs + (1 if f & PG_SWAPCACHE else 0):
        k.ev("rmap_check_skipped", pfn=pfn, ptes=len(found), mapcount=mapc, refcount=ref)
        return False
    missed = [(mm, addr, pte) for mm, addr, pte in found if (mm, addr) not in visited]
    if missed and f & PG_KSM:
        # KSM's rmap reaches a pte only through an rmap_item: a child forked after the merge
        # whose parent's item at that address is gone (COW, unmerge) maps the page unseen
        # until ksmd scans it - the kernel's behaviour too. Only a pte the design promises
        # (seed 004) counts as missed.
        keep = []
        for m in missed:
            r = _ksm_rmap_reaches(k, pfn, m[0], m[1])
            if r is None:
                k.ev("rmap_check_skipped", pfn=pfn, why="mmap_lock busy")
                return False
            if r:
                keep.append(m)
            else:
                k.ev("rmap_miss_excused", pfn=pfn, addr=m[1], why="no rmap_item for this address")
        missed = keep
    if not missed or not claim(k, pfn, PAGE_DBG_RMAP):
        return False
    mm, addr, pte = missed[0]
    reason = (f"{where}: the rmap walk of this {'KSM' if f & PG_KSM else 'anon'} page missed "
              f"{len(missed)} of {mapc} pte(s)")
    title = f"BUG: Bad page map in process {_process(k)}  pte:{pte:016x} pmd:{_pmd(k, mm, addr):016x}"
    lines = [title, *dump_page(k, pfn, reason)]
    for mm2, addr2, _pte in missed[:16]:
        lines.append("missed: " + _vma_line(k, mm2, addr2) + f" mm:{_task_of_mm(k, mm2)}")
    lines.append(f"visited: {len(visited)} (mm, address) pair(s)")
    lines.append(f"in {where} ({k.actor}, pid {k.pid})")
    data = page_data(k, pfn)
    data.update(pte=pte, addr=addr, reason=reason, where=where, actor=k.actor,
                missed=[{"task": _task_of_mm(k, m), "addr": a} for m, a, _p in missed])
    emit(k, {"kind": "bad_page", "title": title, "text": "\n".join(lines) + "\n", "data": data})
    return True


def _anon_root(k: Kernel, mm: int, addr: int) -> int | None:
    """The anon_vma family (root) of mm's vma at addr; None if mmap_lock is busy (we hold a
    page lock: only a trylock, which lockdep does not order)."""
    km = k.km
    if not km.mm.valid(mm):
        return None
    lock = k.mmap_lock(mm, "rmap_check")
    if not lock.down_read_trylock(site="rmap_check"):
        return None
    try:
        vma = mmops.vma_lookup(k, mm, addr)
        if not vma:
            return 0
        av = int(km.vma.anon_vma[km.vma.idx(vma, "rmap_check")])
        if not av or not km.anon_vma.valid(av):
            return 0
        root = int(km.anon_vma.root[km.anon_vma.idx(av, "rmap_check")])
        return root or av
    finally:
        lock.up_read()


def _ksm_rmap_reaches(k: Kernel, pfn: int, mm: int, addr: int) -> bool | None:
    """Must the KSM rmap reach (mm, addr)? Yes when an rmap_item of the page's stable node
    records addr in an mm whose vma there is of the same anon_vma family as mm's vma: the
    walk then finds it through that anon_vma (search_new_forks). None: undecidable now."""
    km = k.km
    node = int(km.page["mapping"][pfn])
    if not node or not km.stable_node.valid(node):
        return False
    ri = km.rmap_item
    item_mms = [int(ri.mm[ri.idx(it, "rmap_check")]) for it in items_of_node(k, node)
                if int(ri.address[ri.idx(it, "rmap_check")]) & PAGE_MASK == addr]
    if not item_mms:
        return False
    mine = _anon_root(k, mm, addr)
    if mine is None:
        return None
    for imm in item_mms:
        theirs = mine if imm == mm else _anon_root(k, imm, addr)
        if theirs is None:
            return None
        if theirs and theirs == mine:
            return True
    return False


# -- run=2 completed ------------------------------------------------------------------------------------
def check_unmerged(k: Kernel) -> list[dict]:
    """After KSM_RUN_UNMERGE succeeded (ksm_thread_mutex held): nothing of KSM may be left.

    Excused, as in the kernel: KSM pages still mapped only by exiting mms (mm_users 0:
    ksm_exit took them off the list, exit_mmap has not zapped yet - remove_stable_node's
    -EBUSY), the stable nodes that then could not be removed, and a KSM page a swap-in
    decided to map just before run=2 was stored (SWAPIN_RACE_NS).
    """
    km = k.km
    ksm = k.ksm
    start = int(ksm["unmerge_start_ns"])
    flags = km.page["flags"]
    survivors: list[tuple[int, list[tuple[int, int, int]]]] = []
    warned: list[tuple[int, list[tuple[int, int, int]]]] = []
    excused = 0
    cand = np.flatnonzero(((flags & (PG_KSM | PG_FREE)) == PG_KSM) & (km.page["mapcount"] > 0))
    for pfn in cand:
        pfn = int(pfn)
        lock = k.page_lock(pfn)
        lock.lock(site="check_unmerged")    # waits out a swap-in mapping this page right now
        try:
            if (int(flags[pfn]) & (PG_KSM | PG_FREE)) != PG_KSM:
                continue
            # An mm may be freed by its exit while this looks (nothing here pins it).
            live = [(mm, a, pte) for mm, a, pte in mappers_of(k, pfn) if (km.mm.peek(mm, "users") or 0) > 0]
            t = int(km.page["ksm_swpin_ns"][pfn])
        finally:
            lock.unlock()
        if not live:
            excused += 1
        elif all((f := vma_flags_at(k, mm, a)) is None or not f & VM_MERGEABLE for mm, a, _p in live):
            # Mapped only where run=2 never looks (no VM_MERGEABLE): a swap-cached KSM page
            # faulted back after MADV_UNMERGEABLE, as today's kernel allows. The kernel
            # meets it in remove_stable_node() as WARN_ON_ONCE(folio_mapped()): report it
            # as that warning, not as a KSM page the unmerge missed. A mapping whose vma
            # cannot be read right now (its mm is exiting or unmapping) is not guessed at.
            excused += 1
            warned.append((pfn, live))
        elif t and start - SWAPIN_RACE_NS < t < start:
            excused += 1
            k.ev("unmerge_survivor_excused", pfn=pfn, why="swap-in raced with run=2")
        else:
            survivors.append((pfn, live))
    lines: list[str] = []
    data: dict[str, Any] = {"survivors": [], "stable_nodes": [], "actor": k.actor}
    for pfn, live in survivors[:16]:
        f = int(flags[pfn])
        lines.append(f"KSM page pfn:{pfn:#x} flags:{f:#x}({flag_names(f)}) refcount:{int(km.page['refcount'][pfn])} "
                     f"mapcount:{int(km.page['mapcount'][pfn])}; {_stable_node_line(k, pfn)}")
        for mm, addr, _pte in live[:8]:
            lines.append(f"  mapped by {_task_of_mm(k, mm)} at {addr:#x}")
        data["survivors"].append({"pfn": pfn, "mapped_by": [[_task_of_mm(k, m), a] for m, a, _p in live]})
    sn = km.stable_node
    nodes = [int(i) for i in sn.live_indices()]
    if nodes and not excused:
        for ni in nodes[:16]:
            lines.append(f"stable node {ni} role:{int(sn.role[ni])} kpfn:{int(sn.kpfn[ni]):#x} "
                         f"rmap_hlist_len:{int(sn.rmap_hlist_len[ni])}")
        data["stable_nodes"] = nodes
    counters = {c: int(ksm[c]) for c in ("pages_shared", "pages_sharing", "pages_unshared", "rmap_items")}
    if any(counters.values()):
        lines.append("counters: " + " ".join(f"{n}:{v}" for n, v in counters.items()))
        data["counters"] = counters
    zero = {}
    for mi in km.mm.live_indices():
        # peek(): an mm being forked or freed right now is skipped, never read half-made.
        h = km.mm.handle_of(int(mi))
        n, users = km.mm.peek(h, "ksm_zero_pages"), km.mm.peek(h, "users")
        if n and users is not None and users > 0:
            zero[_task_of_mm(k, h)] = n
    if zero:
        lines.append("KSM zero pages still mapped: " + ", ".join(f"{t}:{n}" for t, n in zero.items()))
        data["ksm_zero_pages"] = zero
    out = [_unmerge_warning(k, warned)] if warned else []
    if not lines:
        return out
    if survivors:
        pfn, live = survivors[0]
        what = (f"KSM page pfn:{pfn:#x} survives KSM_RUN_UNMERGE "
                f"(mapped by {_task_of_mm(k, live[0][0])} at {live[0][1]:#x})")
    elif data["stable_nodes"]:
        what = f"stable node {nodes[0]} survives KSM_RUN_UNMERGE"
    else:
        what = "KSM state survives KSM_RUN_UNMERGE"
    left = [f"{len(survivors)} KSM page(s)" if survivors else "",
            f"{len(data['stable_nodes'])} stable node(s)" if data["stable_nodes"] else ""]
    title = f"ksm: {what}" + (f"; left: {', '.join(x for x in left if x)}" if any(left) else "")
    text = "\n".join([title, *lines, f"in run_store ({k.actor}, pid {k.pid})"]) + "\n"
    data["ms_after_start"] = (k.clock.monotonic_ns() - start) // 1_000_000 if start else -1
    rep = {"kind": "bad_page", "title": title, "text": text, "data": data}
    emit(k, rep)
    return [*out, rep]


def vma_flags_at(k: Kernel, mm: int, addr: int) -> int | None:
    """vm_flags of the vma at addr (0: no vma there), or None when the caller cannot
    tell: the mm is gone or being freed, or its mmap_lock is busy (an exit or a munmap
    in progress). Nothing here pins the mm (mm_users may reach 0 and the exit free it
    while this looks), so every field is read with the arena's seqlock-style peek: a
    record freed meanwhile gives None, never a use-after-free report of the checker's own."""
    km = k.km
    try:
        lock = k.mmap_lock(mm, "check_unmerged")
    except UseAfterFree:          # freed already: the checker's race, not a kernel bug
        return None
    if not lock.down_read_trylock(site="check_unmerged"):
        return None
    try:
        v = km.mm.peek(mm, "mmap")
        for _ in range(km.geo.max_vmas):
            if v is None:
                return None
            if not v:
                return 0
            # A freed vma (its mm's exit got there first) peeks as None; so does a reused slot.
            start, end, flags, nxt = (km.vma.peek(v, f) for f in ("start", "end", "flags", "next"))
            if None in (start, end, flags, nxt):
                return None
            if end > addr:
                return int(flags) if start <= addr else 0
            v = nxt
        return None
    finally:
        lock.up_read()


UNMERGE_WARNING = "WARNING: mm/ksm.c: remove_stable_node: KSM page still mapped after KSM_RUN_UNMERGE"


def _unmerge_warning(k: Kernel, warned: list[tuple[int, list[tuple[int, int, int]]]]) -> dict:
    pfn, _live = warned[0]
    title = f"{UNMERGE_WARNING} (pfn:{pfn:#x}, in a vma without VM_MERGEABLE)"
    lines = [title]
    for p, lv in warned[:16]:
        lines.append(f"KSM page pfn:{p:#x}; {_stable_node_line(k, p)}")
        lines += [f"  mapped by {_task_of_mm(k, mm)} at {a:#x}" for mm, a, _pte in lv[:8]]
    lines.append(f"in run_store ({k.actor}, pid {k.pid})")
    rep = {"kind": "warning", "title": title, "text": "\n".join(lines) + "\n",
           "data": {"pages": [p for p, _lv in warned], "actor": k.actor}}
    emit(k, rep)
    return rep


def vma_is_shared(k: Kernel, mm: int, addr: int) -> bool:
    vma = mmops.vma_lookup(k, mm, addr)
    return bool(vma) and bool(int(k.km.vma.flags[k.km.vma.idx(vma, "integrity")]) & VM_SHARED)
