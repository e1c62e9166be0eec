# Workload descriptions shared by the real-kernel runner (ksmlab.realkernel) and the model
# runner: which processes exist, which content each of their pages holds, the exact bytes of
# each content, and the KSM counters the kernel should report once ksmd has converged.
from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from actors.cluster import Cluster
from actors.waits import within
from protocol.abi import MADV_MERGEABLE, MADV_NOHUGEPAGE, MAP_ANONYMOUS, MAP_PRIVATE
from shared_mem.layout import PTRS_PER_PTE

PAGE_SIZE = 4096

#: Content id 0 is the all-zero page.
ZERO = 0


@lru_cache(maxsize=4096)
def page_bytes(cid: int) -> bytes:
    """Deterministic PAGE_SIZE bytes for content id ``cid`` (0 -> all zero bytes).

    For ``cid > 0`` the first 8 bytes are ``cid`` as a little-endian u64 (so two ids never
    produce the same page, and never the zero page); the rest is ``numpy.random.default_rng(cid)``.
    """
    if cid < 0:
        raise ValueError(f"content id must be >= 0, got {cid}")
    if cid == ZERO:
        return bytes(PAGE_SIZE)
    head = cid.to_bytes(8, "little")
    return head + np.random.default_rng(cid).bytes(PAGE_SIZE - 8)


def content_counters(n: int, max_page_sharing: int = 256) -> tuple[int, int, int]:
    """(shared, sharing, unshared) for one content present in ``n`` pages after convergence.

    This is ``assert_ksm_pages_count()`` of tools/testing/selftests/mm/ksm_tests.c, plus the
    unshared leftover: when ``n % mps == 1`` the last page finds every stable dup full and no
    partner in the unstable tree, so it sits in the unstable tree (pages_unshared) forever.
    """
    mps = max_page_sharing
    if mps < 2:
        raise ValueError("max_page_sharing must be >= 2")
    if n <= 0:
        return 0, 0, 0
    if n == 1:
        return 0, 0, 1
    if n % mps in (0, 1):
        shared = n // mps
        sharing = shared * (mps - 1)
        return shared, sharing, n % mps
    shared = n // mps + 1
    return shared, n - shared, 0


@dataclass(frozen=True)
class Workload:
    """Per process, per page: a content id (0 = zero page, >0 = content shared by equal ids)."""

    name: str
    processes: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        procs = tuple(tuple(int(c) for c in p) for p in self.processes)
        for p in procs:
            if not p:
                raise ValueError(f"{self.name}: every process needs at least one page")
            if min(p) < 0:
                raise ValueError(f"{self.name}: content ids must be >= 0")
        object.__setattr__(self, "processes", procs)

    @property
    def n_procs(self) -> int:
        return len(self.processes)

    @property
    def total_pages(self) -> int:
        return sum(len(p) for p in self.processes)

    def content_counts(self) -> Counter[int]:
        """Number of pages holding each content id, counted across all processes."""
        c: Counter[int] = Counter()
        for p in self.processes:
            c.update(p)
        return c

    def page_bytes(self, cid: int) -> bytes:
        """Deterministic 4096 bytes of content ``cid`` (see module-level ``page_bytes``)."""
        return page_bytes(cid)

    def process_image(self, index: int) -> bytes:
        """The full memory image (len = pages * PAGE_SIZE) of process ``index``."""
        return b"".join(page_bytes(c) for c in self.processes[index])

    def expected(self, max_page_sharing: int = 256, use_zero_pages: bool = False) -> dict[str, int]:
        """Counters the kernel reports after convergence (smart_scan off, merge_across_nodes=1).

        Keys: pages_shared, pages_sharing, pages_unshared, ksm_zero_pages, stable_node_chains,
        stable_node_dups. A content needing more than one KSM page (more than
        ``max_page_sharing`` copies) lives in a stable-node chain with one dup per KSM page.
        With ``use_zero_pages`` every zero page (even a lone one) is replaced by the zero page and
        counts only in ksm_zero_pages.
        """
        out = {
            "pages_shared": 0,
            "pages_sharing": 0,
            "pages_unshared": 0,
            "ksm_zero_pages": 0,
            "stable_node_chains": 0,
            "stable_node_dups": 0,
        }
        for cid, n in sorted(self.content_counts().items()):
            if cid == ZERO and use_zero_pages:
                out["ksm_zero_pages"] += n
                continue
            shared, sharing, unshared = content_counters(n, max_page_sharing)
            out["pages_shared"] += shared
            out["pages_sharing"] += sharing
            out["pages_unshared"] += unshared
            if shared >= 2:
                out["stable_node_chains"] += 1
                out["stable_node_dups"] += shared
        return out


def _layout(
    name: str, pages: list[list[int]], rng: np.random.Generator, shuffle: bool = True
) -> Workload:
    procs = []
    for p in pages:
        arr = np.asarray(p, dtype=np.int64)
        if shuffle:
            rng.shuffle(arr)
        procs.append(tuple(int(x) for x in arr))
    return Workload(name, tuple(procs))


def mix(
    name: str,
    n_procs: int,
    dup_contents: int,
    copies_per_content: int,
    unique_per_proc: int,
    zero_per_proc: int,
    seed: int,
) -> Workload:
    """Duplicated, unique and zero pages, deterministic by ``seed``.

    Content ids 1..dup_contents each get ``copies_per_content`` pages dealt round-robin across
    the processes starting at a random process (so copies spread across processes); every
    process then gets ``unique_per_proc`` pages of distinct fresh ids and ``zero_per_proc``
    zero pages; finally each process's page order is shuffled.
    """
    if n_procs < 1:
        raise ValueError("n_procs must be >= 1")
    rng = np.random.default_rng(seed)
    pages: list[list[int]] = [[] for _ in range(n_procs)]
    for cid in range(1, dup_contents + 1):
        start = int(rng.integers(n_procs))
        for k in range(copies_per_content):
            pages[(start + k) % n_procs].append(cid)
    next_id = dup_contents + 1
    for p in pages:
        p.extend(range(next_id, next_id + unique_per_proc))
        next_id += unique_per_proc
        p.extend([ZERO] * zero_per_proc)
    return _layout(name, pages, rng)


def from_counts(name: str, counts: list[dict[int, int]], seed: int) -> Workload:
    """One process per dict ``{content id: number of pages}``; page order shuffled by ``seed``."""
    rng = np.random.default_rng(seed)
    pages = [[cid for cid, n in sorted(d.items()) for _ in range(n)] for d in counts]
    return _layout(name, pages, rng)


def _intra_dup() -> Workload:
    # Heavy duplication inside each process; with max_page_sharing=8 content 1 (73 copies,
    # 73 % 8 == 1) needs a chain of 9 dups plus one leftover unshared page, content 2 (20)
    # hits the "n % mps not in {0,1}" branch, content 3 (16) the exact-multiple branch,
    # content 5 (9) the single-dup-plus-leftover case.
    uniques0 = {100 + i: 1 for i in range(20)}
    uniques1 = {200 + i: 1 for i in range(10)}
    return from_counts(
        "intra-dup-2p",
        [
            {1: 70, 2: 20, 3: 10, 4: 5, 5: 9, **uniques0},
            {1: 3, 3: 6, 6: 40, **uniques1},
        ],
        seed=3,
    )


STANDARD_MIXES: list[Workload] = [
    # 50 contents x 6 copies spread over 3 processes: pure cross-process merging.
    mix(
        "dup-only-3p",
        3,
        dup_contents=50,
        copies_per_content=6,
        unique_per_proc=0,
        zero_per_proc=0,
        seed=1,
    ),
    # duplicates + unique + zero pages over 4 processes.
    mix(
        "mixed-4p",
        4,
        dup_contents=40,
        copies_per_content=5,
        unique_per_proc=100,
        zero_per_proc=25,
        seed=2,
    ),
    _intra_dup(),
    # a wider, larger mix: 8 processes, 2800 pages.
    mix(
        "wide-8p",
        8,
        dup_contents=200,
        copies_per_content=8,
        unique_per_proc=100,
        zero_per_proc=50,
        seed=4,
    ),
]

#: Knobs (keyword arguments accepted by both ``Workload.expected`` and
#: ``ksmlab.realkernel.run_workload``) each standard mix is meant to be run with.
STANDARD_KNOBS: dict[str, dict[str, int]] = {
    "dup-only-3p": {},
    "mixed-4p": {},
    "intra-dup-2p": {"max_page_sharing": 8},
    "wide-8p": {},
}

#: Extra (mix name, knobs) runs worth checking against the kernel.
STANDARD_VARIANTS: list[tuple[str, dict[str, int]]] = [
    ("mixed-4p", {"use_zero_pages": 1}),
]


def standard_runs() -> list[tuple[Workload, dict[str, int]]]:
    """Every (workload, knobs) pair the kernel and the model are compared on."""
    runs = [(w, STANDARD_KNOBS[w.name]) for w in STANDARD_MIXES]
    runs += [(standard_mix(name), knobs) for name, knobs in STANDARD_VARIANTS]
    return runs


def run_label(run: tuple[Workload, dict[str, int]]) -> str:
    """A short id for a (workload, knobs) pair, e.g. mixed-4p-use_zero_pages=1."""
    w, knobs = run
    return w.name + "".join(f"-{k}={v}" for k, v in sorted(knobs.items()))


def standard_mix(name: str) -> Workload:
    """The STANDARD_MIXES entry called ``name``."""
    for w in STANDARD_MIXES:
        if w.name == name:
            return w
    raise KeyError(name)


# ---------------------------------------------------------------------------------------------
# The same workload on ksmlab (the model), for differential checks against the real kernel.

#: Counters that must be identical across two snapshots for a run to count as converged
#: (the same rule on the real kernel, ksmlab.realkernel, and on the model).
CONVERGENCE_KEYS: tuple[str, ...] = (
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "ksm_zero_pages",
    "stable_node_chains",
    "stable_node_dups",
)

#: Bytes per Task.write request while loading a process image (pages stay whole).
LOAD_CHUNK = 8 << 20


def ksmlab_cluster_options(w: Workload, **cluster_opts: Any) -> dict[str, Any]:
    """Cluster options sized for ``w``: enough frames (pages + headroom), mms and address space.

    Explicit ``cluster_opts`` win; ``frames`` and ``va_pages`` are only raised, never lowered.
    """
    opts = dict(cluster_opts)
    need = w.total_pages + max(1024, w.total_pages // 16)
    opts["frames"] = max(int(opts.get("frames", 0)), need)
    biggest = max(len(p) for p in w.processes)
    # the first mmap lands at 16 MiB (MMAP_BASE); keep a page table of slack after it
    va = (0x1000000 // PAGE_SIZE) + biggest + PTRS_PER_PTE
    va = -(-va // PTRS_PER_PTE) * PTRS_PER_PTE
    opts["va_pages"] = max(int(opts.get("va_pages", 1 << 18)), va)
    opts["max_tasks"] = max(int(opts.get("max_tasks", 64)), w.n_procs + 8)
    opts["max_mms"] = max(int(opts.get("max_mms", 64)), w.n_procs + 8)
    return opts


async def ksmlab_load(
    c: Any, w: Workload, chunk: int = LOAD_CHUNK, images: list[bytes] | None = None
) -> list[tuple[Any, int]]:
    """Start one Task per workload process, as realkernel's workers do, on a booted Cluster.

    Each task: mmap(MAP_PRIVATE|MAP_ANONYMOUS), MADV_NOHUGEPAGE, writes every page's bytes
    (zero pages included, in ``chunk``-byte stores), MADV_MERGEABLE. Returns [(task, addr)].
    Tasks are loaded concurrently (each is its own process). ``images`` (one per process,
    as ``w.process_image(i)``) saves rebuilding them when the caller has them already.
    """
    chunk = max(PAGE_SIZE, chunk // PAGE_SIZE * PAGE_SIZE)

    async def one(i: int) -> tuple[Any, int]:
        t = await c.spawn_task(comm=f"{w.name[:10]}-{i}")
        n = len(w.processes[i]) * PAGE_SIZE
        addr = await t.mmap(n, flags=MAP_PRIVATE | MAP_ANONYMOUS)
        await t.madvise(addr, n, MADV_NOHUGEPAGE)
        image = memoryview(images[i] if images is not None else w.process_image(i))
        for off in range(0, n, chunk):
            await t.write(addr + off, image[off : off + chunk])
        await t.madvise(addr, n, MADV_MERGEABLE)
        return t, addr

    return list(await asyncio.gather(*(one(i) for i in range(w.n_procs))))


async def ksmlab_converge(
    c: Any, *, stable_scans: int = 2, timeout: float = 120.0
) -> tuple[dict[str, int], int]:
    """realkernel.run_workload's convergence rule on a Cluster: ``run=1``, at least 2 full
    scans, then snapshots (read with ``run=0``, like LTP) ``stable_scans`` full scans apart
    until CONVERGENCE_KEYS agree. Returns (counters, snapshots taken)."""
    deadline = time.monotonic() + timeout

    def left() -> float:
        t = deadline - time.monotonic()
        if t <= 0:
            raise TimeoutError(f"ksmlab did not converge in {timeout}s: {c.ksm_counters()}")
        return t

    async def snapshot() -> dict[str, int]:
        await c.sysfs_write("run", 0)
        return c.ksm_counters()

    start = c.full_scans()
    await c.sysfs_write("run", 1)
    await c.wait_full_scans(start + 2 - c.full_scans(), timeout=left())
    prev = await snapshot()
    n = 1
    while True:
        await c.sysfs_write("run", 1)
        await c.wait_full_scans(prev["full_scans"] + stable_scans - c.full_scans(), timeout=left())
        cur = await snapshot()
        n += 1
        if all(cur[k] == prev[k] for k in CONVERGENCE_KEYS):
            return cur, n
        prev = cur


async def run_on_ksmlab(
    w: Workload,
    *,
    smart_scan: int = 0,
    use_zero_pages: int = 0,
    max_page_sharing: int = 256,
    pages_to_scan: int | None = None,
    merge_across_nodes: int = 1,
    sleep_millisecs: int = 0,
    stable_scans: int = 2,
    timeout: float = 120.0,
    **cluster_opts: Any,
) -> dict[str, int]:
    """Run ``w`` on ksmlab exactly as ``ksmlab.realkernel.run_workload`` runs it on the kernel.

    Boots a Cluster (``cluster_opts`` go to it; frames, va_pages, max_tasks and max_mms are
    raised to fit ``w``), sets the knobs (``pages_to_scan`` defaults to max(100, total pages),
    ``sleep_millisecs`` 0), loads one Task per process (``ksmlab_load``), then applies the same
    convergence rule (``ksmlab_converge``) and returns every /sys/kernel/mm/ksm counter as read
    with ``run=0``. Every task must read back exactly what it wrote (``Task.verify``) and the
    run must produce no report; otherwise RuntimeError. The cluster is always stopped.
    """
    if pages_to_scan is None:
        pages_to_scan = max(100, w.total_pages)
    if not cluster_opts.get("shadow", True):
        raise ValueError("run_on_ksmlab verifies every task: it needs shadow=True")
    opts = ksmlab_cluster_options(w, **cluster_opts)
    c = Cluster(**opts)
    try:
        await c.boot()
        knobs = {
            "merge_across_nodes": merge_across_nodes,
            "max_page_sharing": max_page_sharing,
            "use_zero_pages": use_zero_pages,
            "smart_scan": smart_scan,
            "pages_to_scan": pages_to_scan,
            "sleep_millisecs": sleep_millisecs,
        }
        for name, value in knobs.items():
            if c.sysfs_read(name) != str(value):
                await c.sysfs_write(name, value)
        loaded = await ksmlab_load(c, w)
        counters, _ = await within(ksmlab_converge(c, stable_scans=stable_scans, timeout=timeout), timeout + 5)
        bad = []
        for t, _addr in loaded:
            v = await t.verify()
            if v["bad"]:
                bad.append((t.pid, v["bad"][:4]))
        if bad:
            raise RuntimeError(f"{w.name}: merging was visible to the tasks: {bad}")
        if c.reports:
            titles = [r.get("title") for r in c.reports]
            raise RuntimeError(f"{w.name}: ksmlab produced reports: {titles}")
        return counters
    finally:
        await c.stop()
