# Replaying a corpus entry (ksmlab/corpus.py) on an in-process model kernel: shared by
# tests/kernel/test_corpus.py (the checked-in corpus, in CI) and
# tests/realkernel/test_corpus_fresh.py (fresh seeds recorded on this machine's kernel).
# Each returns None when the model gives the kernel's numbers, else what differed.
from __future__ import annotations

from actors.kernel.sysfs import ksm_stat
from ksmlab.corpus import KEYS, STAT_KEYS, STEP_KEYS, random_run, step_pages
from ksmlab.workloads import Workload, page_bytes
from shared_mem.layout import PAGE_SIZE, Geometry
from tests.kernel.conftest import KernelHarness

GEO = Geometry(nr_frames=1024, max_mms=8, max_tasks=8, max_vmas=64, max_anon_vmas=64, va_pages=8192)


def load_like_the_kernel(h: KernelHarness, w: Workload, knobs: dict[str, int], pages_to_scan: int) -> list[int]:
    """Load w as ksmlab.realkernel does (one MADV_MERGEABLE area per process, the same
    knobs, run=1); returns the mms."""
    mms = []
    for pages in w.processes:
        mm = h.new_mm()
        a = h.mmap(mm, len(pages))
        for j, cid in enumerate(pages):
            h.write_page(mm, a + j * PAGE_SIZE, page_bytes(cid))
        h.madvise(mm, a, len(pages))
        mms.append(mm)
    for knob, value in {**knobs, "pages_to_scan": pages_to_scan, "sleep_millisecs": 0}.items():
        h.set(knob, value)
    h.set("run", 1)
    return mms


def scan_to(h: KernelHarness, batch: int, scanned: int, passes: int) -> dict[str, int]:
    """ksmd's batches (ksm_do_scan of `batch` pages) until the model stands where the
    kernel's ksmd stood: its snapshot falls between two batches (run=0 waits for a batch
    to end), and the number of batches is told by pages scanned and passes ended. (A
    batch that ends on the last page of a pass leaves the pass counted only by the next
    batch, in both, and that batch may scan nothing: the same pages scanned then stand
    for two places, one pass apart.)"""
    for _ in range(100_000):
        c = h.counters()
        if c["pages_scanned"] > scanned or (c["pages_scanned"] == scanned and c["full_scans"] >= passes):
            return c
        h.scan(batch)
    raise AssertionError(f"the model did not reach {scanned} pages scanned")


def converged_mismatch(h: KernelHarness, entry: dict) -> str | None:
    """The converged snapshot: the same pass, counters and per-process ksm_stat."""
    w, knobs = random_run(entry["seed"])
    batch = max(100, w.total_pages)
    mms = load_like_the_kernel(h, w, knobs, batch)
    got = scan_to(h, batch, entry["pages_scanned"], entry["full_scans"])
    stats = [{k: int(s[k]) for k in STAT_KEYS} for s in (ksm_stat(h.k, mm) for mm in mms)]
    want = ((entry["pages_scanned"], entry["full_scans"]), entry["kernel"], entry["ksm_stat"])
    have = ((got["pages_scanned"], got["full_scans"]), {k: got[k] for k in KEYS}, stats)
    return None if have == want else f"seed {entry['seed']} {knobs}: kernel {want}, model {have}"


def stepped_mismatch(h: KernelHarness, entry: dict) -> str | None:
    """The stepped recording: every counter after every recorded batch."""
    w, knobs = random_run(entry["seed"])
    steps = entry["steps"]
    if steps["pages_to_scan"] != step_pages(w) or steps["columns"] != list(STEP_KEYS + KEYS):
        return f"seed {entry['seed']}: the stepped recording's layout changed"
    load_like_the_kernel(h, w, knobs, steps["pages_to_scan"])
    for i, want in enumerate(steps["at"]):
        c = scan_to(h, steps["pages_to_scan"], want[0], want[1])
        got = [c[k] for k in steps["columns"]]
        if got != want:
            return (f"seed {entry['seed']} {knobs}, step {i} of {len(steps['at'])}: kernel "
                    f"{dict(zip(steps['columns'], want))}, model {dict(zip(steps['columns'], got))}")
    return None
