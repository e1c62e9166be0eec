# The simulated kernel memory of one run: page frames, struct page, and the slab
# caches of mm/ksm.c's objects, all in shared segments that every actor maps.
#
# Field names follow the kernel structures they model: struct page / folio,
# mm_struct, vm_area_struct, anon_vma (the 2009 layout of seed 004: one anon_vma
# per vma with a list of the vmas that share it), ksm_mm_slot, ksm_rmap_item,
# ksm_stable_node, the ksm_scan cursor and the counters behind /sys/kernel/mm/ksm.
# Page tables are two-level: a per-mm pgd array of handles to page-table pages of
# PTRS_PER_PTE int64 ptes, so exit_mmap's free_pgtables really frees something.
from __future__ import annotations

import errno
import gc
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from shared_mem.arena import PROVENANCE, Arena
from shared_mem.segment import SHM_DIR, Segment, segment_name

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1)
PTRS_PER_PTE = 512
MAX_NUMNODES = 8

# --- pte bits (our own encoding of an x86-like pte in an int64) -------------------
PTE_PFN_MASK = (1 << 40) - 1       # frame number, or swap slot when PTE_SWAP
PTE_PRESENT = 1 << 56
PTE_WRITE = 1 << 57
PTE_DIRTY = 1 << 58
PTE_SWAP = 1 << 59                 # not present; low bits are the swap slot
PTE_SPECIAL = 1 << 60              # zero page mapping (pte_special)
PTE_ACCESSED = 1 << 61

# --- struct page flags ------------------------------------------------------------
PG_ANON = 1 << 0
PG_KSM = 1 << 1                    # folio->mapping carries the stable node ("PageKsm")
PG_SWAPCACHE = 1 << 2
PG_UPTODATE = 1 << 3
PG_MLOCKED = 1 << 4
PG_DIRTY = 1 << 5
PG_RESERVED = 1 << 6               # the zero page
PG_REFERENCED = 1 << 7
PG_FREE = 1 << 8                   # in the buddy allocator
PG_ACTIVE = 1 << 9

# --- vm_flags -----------------------------------------------------------------------
VM_READ = 1 << 0
VM_WRITE = 1 << 1
VM_EXEC = 1 << 2
VM_SHARED = 1 << 3
VM_MAYREAD = 1 << 4
VM_MAYWRITE = 1 << 5
VM_MAYSHARE = 1 << 7
VM_LOCKED = 1 << 13
VM_IO = 1 << 14
VM_DONTEXPAND = 1 << 18
VM_HUGETLB = 1 << 22
VM_PFNMAP = 1 << 10
VM_MIXEDMAP = 1 << 28
VM_NOHUGEPAGE = 1 << 30
VM_MERGEABLE = 1 << 31
VM_DROPPABLE = 1 << 40

# --- mm->flags ------------------------------------------------------------------------
MMF_OOM_SKIP = 1 << 21
MMF_UNSTABLE = 1 << 22
MMF_VM_MERGEABLE = 1 << 16
MMF_VM_MERGE_ANY = 1 << 30

# --- task state -----------------------------------------------------------------------
TASK_FREE, TASK_RUNNING, TASK_EXITING, TASK_DEAD = 0, 1, 2, 3
TIF_MEMDIE = 1 << 0                # OOM victim
TIF_SIGKILL = 1 << 1               # fatal signal pending
PF_EXITING = 1 << 2
PF_OOM_ORIGIN = 1 << 3

# --- rmap_item->address flags (mm/ksm.c) --------------------------------------------
SEQNR_MASK = 0x0FF
UNSTABLE_FLAG = 0x100
STABLE_FLAG = 0x200

# --- stable node roles ----------------------------------------------------------------
STABLE_NODE_CHAIN = -1024          # rmap_hlist_len of a chain head
NODE_REGULAR, NODE_CHAIN, NODE_DUP, NODE_MIGRATE = 0, 1, 2, 3


@dataclass
class Geometry:
    """Sizes of one run's kernel memory. Everything is fixed at boot, like a real machine."""

    nr_frames: int = 4096              # physical page frames (16 MiB)
    nr_nodes: int = 1                  # NUMA nodes; frames are split evenly among them
    max_tasks: int = 64
    max_mms: int = 64
    max_vmas: int = 2048
    max_anon_vmas: int = 2048
    va_pages: int = 1 << 18            # user address space per mm, in pages (1 GiB)
    max_ptables: int = 0               # 0 = derived from frames
    max_rmap_items: int = 0            # 0 = derived
    max_stable_nodes: int = 0          # 0 = derived
    nr_swap_slots: int = 0             # swap area size in pages (0 = no swap)

    def __post_init__(self) -> None:
        if self.nr_frames < 16:
            raise ValueError("nr_frames must be >= 16")
        if not 1 <= self.nr_nodes <= MAX_NUMNODES:
            raise ValueError(f"nr_nodes must be in 1..{MAX_NUMNODES}")
        if self.va_pages % PTRS_PER_PTE or self.va_pages < PTRS_PER_PTE:
            raise ValueError("va_pages must be a positive multiple of 512")
        if self.max_tasks < 1 or self.max_mms < 1:
            raise ValueError("max_tasks and max_mms must be at least 1")
        if self.nr_swap_slots < 0:
            raise ValueError("nr_swap_slots must not be negative")
        if not self.max_ptables:
            self.max_ptables = min(self.max_mms * (self.va_pages // PTRS_PER_PTE),
                                   2 * (self.nr_frames // PTRS_PER_PTE + 1) * 8 + 4 * self.max_mms)
        if not self.max_rmap_items:
            self.max_rmap_items = 2 * self.nr_frames + 1024
        if not self.max_stable_nodes:
            self.max_stable_nodes = self.nr_frames + 256

    @property
    def pgd_entries(self) -> int:
        return self.va_pages // PTRS_PER_PTE

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


H = "<i8"  # handle

PAGE_DT = np.dtype([
    ("flags", "<i8"), ("refcount", "<i8"), ("mapcount", "<i8"), ("mapping", H),
    ("index", "<i8"), ("private", "<i8"), ("nid", "<i8"), ("gen", "<i8"),
    # debug (actors/kernel/debug.py): PAGE_DBG_* bits (reported once, leaked bad page),
    # never reset by the allocator; and when a swap-in last mapped it as a KSM page.
    ("dbg", "<i8"), ("ksm_swpin_ns", "<i8"),
])

MM_DT = np.dtype([
    ("users", "<i8"), ("count", "<i8"), ("flags", "<i8"), ("owner", "<i8"),
    ("mmap", H), ("map_count", "<i8"), ("ksm_slot", H), ("mmap_base", "<i8"),
    ("def_flags", "<i8"), ("rss_anon", "<i8"), ("ksm_merging_pages", "<i8"),
    ("ksm_rmap_items", "<i8"), ("ksm_zero_pages", "<i8"), ("nid", "<i8"),
    ("lock_idx", "<i8"), ("pgtables", "<i8"), ("oom_refs", "<i8"),
])

VMA_DT = np.dtype([
    ("mm", H), ("start", "<i8"), ("end", "<i8"), ("flags", "<i8"), ("pgoff", "<i8"),
    ("anon_vma", H), ("next", H), ("anon_next", H), ("nid", "<i8"),
])

ANON_VMA_DT = np.dtype([
    ("refcount", "<i8"), ("head", H), ("root", H), ("nr_vmas", "<i8"), ("lock_idx", "<i8"),
])

PTABLE_DT = np.dtype([("pte", "<i8", (PTRS_PER_PTE,))])

TASK_DT = np.dtype([
    ("pid", "<i8"), ("mm", H), ("state", "<i8"), ("flags", "<i8"), ("parent", "<i8"),
    ("exit_code", "<i8"), ("oom_score_adj", "<i8"), ("nid", "<i8"), ("comm", "S16"),
])

SLOT_DT = np.dtype([("mm", H), ("next", H), ("prev", H), ("rmap_list", H)])

RMAP_DT = np.dtype([
    ("rmap_next", H), ("mm", H), ("address", "<i8"), ("oldchecksum", "<i8"),
    ("age", "<i8"), ("remaining_skips", "<i8"), ("anon_vma", H), ("nid", "<i8"),
    # unstable tree links (struct rb_node: rb_color is RB_RED 0 / RB_BLACK 1)
    ("left", H), ("right", H), ("parent", H), ("rb_color", "<i8"),
    # stable: which stable node, and the hlist through it
    ("head", H), ("hnext", H), ("hprev", H),
])

SNODE_DT = np.dtype([
    ("left", H), ("right", H), ("parent", H), ("rb_color", "<i8"),  # stable tree rb_node
    ("role", "<i8"), ("chain", H),          # for a dup: the chain it hangs on
    ("dup_next", H), ("dup_prev", H),       # hlist of dups on a chain (chain.hlist is the first)
    ("hlist", H),                           # rmap_items, or dups for a chain
    ("kpfn", "<i8"), ("rmap_hlist_len", "<i8"), ("nid", "<i8"),
    ("chain_prune_time", "<i8"), ("key", "<u8"),
])

# The single ksm record: knobs, counters, scan cursor, tree roots.
KSM_DT = np.dtype([
    # knobs (/sys/kernel/mm/ksm)
    ("run", "<i8"), ("pages_to_scan", "<i8"), ("sleep_millisecs", "<i8"),
    ("merge_across_nodes", "<i8"), ("max_page_sharing", "<i8"), ("use_zero_pages", "<i8"),
    ("smart_scan", "<i8"), ("stable_node_chains_prune_millisecs", "<i8"),
    ("advisor_mode", "<i8"), ("advisor_max_cpu", "<i8"), ("advisor_min_pages_to_scan", "<i8"),
    ("advisor_max_pages_to_scan", "<i8"), ("advisor_target_scan_time", "<i8"),
    # struct advisor_ctx (actors/kernel/advisor.py): ns, s, percent, ns
    ("advisor_start_scan", "<i8"), ("advisor_scan_time", "<i8"), ("advisor_change", "<i8"),
    ("advisor_cpu_time", "<i8"),
    # counters
    ("pages_shared", "<i8"), ("pages_sharing", "<i8"), ("pages_unshared", "<i8"),
    ("rmap_items", "<i8"), ("pages_scanned", "<i8"), ("pages_skipped", "<i8"),
    ("stable_node_chains", "<i8"), ("stable_node_dups", "<i8"), ("ksm_zero_pages", "<i8"),
    ("cow_ksm", "<i8"), ("ksm_swpin_copy", "<i8"),
    # ksm_scan cursor
    ("scan_slot", H), ("scan_address", "<i8"), ("scan_rmap_owner", H), ("scan_rmap_in_slot", "<i8"),
    ("seqnr", "<i8"),
    # trees and lists
    ("root_stable", H, (MAX_NUMNODES,)), ("root_unstable", H, (MAX_NUMNODES,)),
    ("migrate_nodes", H), ("mm_head", H), ("nr_node_ids", "<i8"),
    ("zero_checksum", "<i8"), ("zero_pfn", "<i8"), ("wake_seq", "<i8"),
    ("variants", "<i8"), ("ksmd_pid", "<i8"), ("numa_trees", "<i8"),
    ("scan_mode", "<i8"),  # ksmlab's, not a kernel knob: 0 exact (page by page), 1 batch, 2 vector
    ("swap_free", "<i8"), ("last_pid", "<i8"),
    ("reclaim_paused", "<i8"),   # debug: 1 = checker asks kswapd to park, 2 = parked
    ("unmerge_start_ns", "<i8"),  # debug: when the running/last run=2 began (debug.py)
    ("mmput_in_flight", "<i8"),   # debug: __mmput()s running (the invariant checker waits them out)
])

# Frame allocator: one free stack per NUMA node, under zone_lock[nid].
ZONE_DT = np.dtype([("free_top", "<i8"), ("nr_free", "<i8"), ("first", "<i8"), ("last", "<i8"),
                    ("low_watermark", "<i8"), ("high_watermark", "<i8")])

ARENAS: list[tuple[str, np.dtype, str]] = [
    ("mm", MM_DT, "max_mms"),
    ("vma", VMA_DT, "max_vmas"),
    ("anon_vma", ANON_VMA_DT, "max_anon_vmas"),
    ("ptable", PTABLE_DT, "max_ptables"),
    ("task", TASK_DT, "max_tasks"),
    ("mm_slot", SLOT_DT, "max_mms"),
    ("rmap_item", RMAP_DT, "max_rmap_items"),
    ("stable_node", SNODE_DT, "max_stable_nodes"),
]

# Lock classes of the run (name, kind, count-expression), for shared_mem.locks.LockSpace.
def lock_classes(geo: Geometry) -> list[tuple[str, str, int]]:
    return [
        ("ksm_thread_mutex", "mutex", 1),
        ("ksm_mmlist_lock", "spin", 1),
        ("zone_lock", "spin", geo.nr_nodes),
        ("slab_lock", "spin", len(ARENAS)),
        ("swap_lock", "spin", 1),
        ("mmap_lock", "rwsem", geo.max_mms),
        ("ptl", "spin", geo.max_mms),
        ("page_lock", "bit", geo.nr_frames),
        ("anon_vma_lock", "rwsem", geo.max_anon_vmas),
    ]


def _align(n: int, a: int = 64) -> int:
    return (n + a - 1) // a * a


class _Carver:
    """Lays out numpy arrays one after another in a segment."""

    def __init__(self) -> None:
        self.off = 0
        self.items: list[tuple[str, np.dtype, tuple[int, ...], int]] = []

    def add(self, name: str, dtype: Any, shape: tuple[int, ...]) -> None:
        dt = np.dtype(dtype)
        self.off = _align(self.off)
        self.items.append((name, dt, shape, self.off))
        self.off += dt.itemsize * int(np.prod(shape))

    def views(self, buf: Any) -> dict[str, np.ndarray]:
        out = {}
        for name, dt, shape, off in self.items:
            n = int(np.prod(shape))
            out[name] = np.frombuffer(buf, dtype=dt, count=n, offset=off).reshape(shape)
        return out


def _meta_dtype() -> np.dtype:
    return np.dtype(PROVENANCE)


# What a run costs besides its segments: the kernel actors' processes, about 35 MiB each
# (bench/bench_capacity.py), with room for a few tasks.
PROCESS_OVERHEAD = 12 * (40 << 20)


def shared_bytes(geo: Geometry) -> int:
    """The bytes of shared memory a run of this geometry maps: records, frames, swap."""
    return _plan(geo).off + (geo.nr_frames + geo.nr_swap_slots) * PAGE_SIZE


def _mem_available(meminfo: str) -> int:
    with open(meminfo, encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError(errno.ENOENT, f"{meminfo} has no MemAvailable line")


def check_fits(geo: Geometry, shm_dir: str = SHM_DIR, meminfo: str = "/proc/meminfo") -> None:
    """Refuse up front (ENOMEM) a machine this machine cannot hold: the segments are sparse
    files, so a too large one would boot and fail only once its frames are touched, with
    the host swapping or its OOM killer choosing. Every frame is counted as if used."""
    need = shared_bytes(geo)
    st = os.statvfs(shm_dir)
    shm_free = st.f_bavail * st.f_frsize
    if need > shm_free:
        raise OSError(errno.ENOMEM, f"{geo.nr_frames} frames and {geo.nr_swap_slots} swap slots need "
                      f"{need / 2**30:.2f} GiB of {shm_dir}, which has {shm_free / 2**30:.2f} GiB free")
    avail = _mem_available(meminfo)
    if need + PROCESS_OVERHEAD > avail:
        raise OSError(errno.ENOMEM, f"{geo.nr_frames} frames and {geo.nr_swap_slots} swap slots need "
                      f"{(need + PROCESS_OVERHEAD) / 2**30:.2f} GiB of memory with the actors' processes; "
                      f"{avail / 2**30:.2f} GiB is available")


def _plan(geo: Geometry) -> _Carver:
    c = _Carver()
    c.add("ksm", KSM_DT, (1,))
    c.add("zones", ZONE_DT, (geo.nr_nodes,))
    c.add("free_frames", "<i8", (geo.nr_frames,))
    c.add("page", PAGE_DT, (geo.nr_frames,))
    c.add("pgd", "<i8", (geo.max_mms, geo.pgd_entries))
    c.add("swap_map", "<i8", (max(geo.nr_swap_slots, 1),))
    c.add("swap_cache", "<i8", (max(geo.nr_swap_slots, 1),))
    meta = _meta_dtype()
    for name, dt, cap_attr in ARENAS:
        cap = getattr(geo, cap_attr)
        c.add(f"{name}.rec", dt, (cap,))
        c.add(f"{name}.meta", meta, (cap,))
        c.add(f"{name}.free", "<i8", (cap,))
        c.add(f"{name}.hdr", "<i8", (4,))
    return c


@dataclass
class KernelMemory:
    """All shared kernel state of a run, as numpy views. Create once, attach everywhere."""

    geo: Geometry
    run_id: str
    segs: dict[str, Segment] = field(default_factory=dict)
    owner: bool = False

    def __post_init__(self) -> None:
        self.v: dict[str, np.ndarray] = {}
        self.arenas: dict[str, Arena] = {}
        self.actor = "?"
        self.on_report: Any = None

    # -- lifetime ----------------------------------------------------------------------
    @classmethod
    def create(cls, geo: Geometry, run_id: str) -> KernelMemory:
        check_fits(geo)
        km = cls(geo, run_id, owner=True)
        plan = _plan(geo)
        try:
            km.segs["kernel"] = Segment.create(segment_name(run_id, "kernel"), plan.off)
            km.segs["frames"] = Segment.create(segment_name(run_id, "frames"), geo.nr_frames * PAGE_SIZE)
            if geo.nr_swap_slots:
                km.segs["swap"] = Segment.create(segment_name(run_id, "swap"), geo.nr_swap_slots * PAGE_SIZE)
        except BaseException:
            km.unlink()
            raise
        km._map(plan)
        for a in km.arenas.values():
            a.format()
        return km

    def descriptor(self) -> dict[str, Any]:
        return {"geo": self.geo.to_dict(), "run_id": self.run_id,
                "segs": {k: s.name for k, s in self.segs.items()}}

    @classmethod
    def attach(cls, desc: dict[str, Any]) -> KernelMemory:
        km = cls(Geometry(**desc["geo"]), desc["run_id"])
        for k, name in desc["segs"].items():
            km.segs[k] = Segment.attach(name)
        km._map(_plan(km.geo))
        return km

    def _map(self, plan: _Carver) -> None:
        self.v = plan.views(self.segs["kernel"].buf)
        self.ksm = self.v["ksm"]
        self.zones = self.v["zones"]
        self.free_frames = self.v["free_frames"]
        self.page = self.v["page"]
        self.pgd = self.v["pgd"]
        self.swap_map = self.v["swap_map"]
        self.swap_cache = self.v["swap_cache"]
        self.frames = np.frombuffer(self.segs["frames"].buf, dtype=np.uint8).reshape(
            self.geo.nr_frames, PAGE_SIZE)
        self.swap = None
        if "swap" in self.segs:
            self.swap = np.frombuffer(self.segs["swap"].buf, dtype=np.uint8).reshape(
                self.geo.nr_swap_slots, PAGE_SIZE)
        for name, _dt, _cap in ARENAS:
            self.arenas[name] = Arena(name, self.v[f"{name}.rec"], self.v[f"{name}.meta"],
                                      self.v[f"{name}.free"], self.v[f"{name}.hdr"])
        self.mm = self.arenas["mm"]
        self.vma = self.arenas["vma"]
        self.anon_vma = self.arenas["anon_vma"]
        self.ptable = self.arenas["ptable"]
        self.task = self.arenas["task"]
        self.mm_slot = self.arenas["mm_slot"]
        self.rmap_item = self.arenas["rmap_item"]
        self.stable_node = self.arenas["stable_node"]

    def set_locks(self, locks: Any) -> None:
        for i, (name, _dt, _cap) in enumerate(ARENAS):
            self.arenas[name].lock = locks.get("slab_lock", i)

    def set_actor(self, actor: str, on_report: Any = None) -> None:
        # Detectors outside the arenas (actors/kernel/debug.py) report through the same hook.
        self.actor = actor
        self.on_report = on_report
        for a in self.arenas.values():
            a.actor = actor
            a.on_report = on_report

    def set_identity(self, pid_of: Any, clock_ns: Any) -> None:
        """Where the arenas' provenance (alloc/free pid and time) comes from."""
        for a in self.arenas.values():
            a.pid_of = pid_of
            a.clock_ns = clock_ns

    def close(self) -> None:
        # Drop every numpy view before unmapping (mmap refuses while exports exist).
        self.v = {}
        self.arenas = {}
        for attr in ("ksm", "zones", "free_frames", "page", "pgd", "swap_map", "swap_cache", "frames", "swap",
                     "mm", "vma", "anon_vma", "ptable", "task", "mm_slot", "rmap_item", "stable_node"):
            self.__dict__.pop(attr, None)
        gc.collect()
        for s in self.segs.values():
            s.close()

    def unlink(self) -> None:
        for s in self.segs.values():
            s.unlink()
