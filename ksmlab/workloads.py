# Workload descriptions shared by the real-kernel runner (ksmlab.realkernel) and the model
# runner: which processes exist, which content each of their pages holds, the exact bytes of
# each content, and the KSM counters the kernel should report once ksmd has converged.
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

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


def standard_mix(name: str) -> Workload:
    """The STANDARD_MIXES entry called ``name``."""
    for w in STANDARD_MIXES:
        if w.name == name:
            return w
    raise KeyError(name)
