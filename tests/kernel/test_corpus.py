# The recorded differential corpus, replayed on the model (ksmlab/corpus.py).
#
# Every entry of tests/data/differential_corpus.json is a random workload (stored by its
# seed) with the counters this machine's kernel converged to and each process's
# /proc/PID/ksm_stat, and how far its ksmd had scanned then (pages_scanned, full_scans).
# Here each is loaded into an in-process kernel the way ksmlab.realkernel loads it into
# real processes (one MADV_MERGEABLE area per process, the same knobs, pages_to_scan
# max(100, pages), run=1), scanned in ksmd's batches up to the same number of pages, and
# must stand in the same pass and give the same numbers. (Converging by the model's own rule is not
# enough: with smart_scan the counters keep moving as unique pages fall into skip streaks,
# and the kernel's snapshot is wherever its ksmd had got to.) CI has no writable /sys/kernel/mm/ksm; this is how it still checks the model
# against the kernel. Regenerate: `.venv/bin/python -m ksmlab.corpus record` (root, KSM).
from __future__ import annotations

import pytest

from actors.kernel.sysfs import ksm_stat
from ksmlab.corpus import KEYS, STAT_KEYS, load, random_run
from ksmlab.workloads import Workload, page_bytes
from shared_mem.layout import PAGE_SIZE, Geometry
from tests.kernel.conftest import KernelHarness

pytestmark = [pytest.mark.timeout(120)]

DOC = load()
GEO = Geometry(nr_frames=1024, max_mms=8, max_tasks=8, max_vmas=64, max_anon_vmas=64, va_pages=8192)


def scan_like_the_kernel(h: KernelHarness, w: Workload, knobs: dict[str, int], scanned: int) -> tuple[dict, list[dict]]:
    """Load w as ksmlab.realkernel does, then run ksmd's batches (ksm_do_scan of
    pages_to_scan) until as many pages are scanned as the kernel's ksmd had: its snapshot
    falls between two batches, so this stops where it stood (a batch that ends on the last
    page of a pass leaves the pass counted only by the next batch, in both)."""
    mms = []
    for pages in w.processes:
        mm = h.new_mm()
        a = h.mmap(mm, len(pages))
        for j, cid in enumerate(pages):
            h.write_page(mm, a + j * PAGE_SIZE, page_bytes(cid))
        h.madvise(mm, a, len(pages))
        mms.append(mm)
    for knob, value in {**knobs, "pages_to_scan": max(100, w.total_pages), "sleep_millisecs": 0}.items():
        h.set(knob, value)
    h.set("run", 1)
    batch = max(100, w.total_pages)
    for _ in range(100_000):
        if h.counters()["pages_scanned"] >= scanned:
            break
        h.scan(batch)
    return h.counters(), [ksm_stat(h.k, mm) for mm in mms]


def test_the_corpus_is_big_enough_and_its_seeds_still_draw_the_same_workloads():
    entries = DOC["entries"]
    assert len(entries) >= 50
    for e in entries:
        w, knobs = random_run(e["seed"])
        assert (w.total_pages, knobs) == (e["pages"], e["knobs"]), f"seed {e['seed']}: the generator changed"
    kinds = {k for e in entries for k in KEYS if e["kernel"][k]}
    assert {"pages_shared", "pages_sharing", "pages_unshared", "ksm_zero_pages",
            "stable_node_chains", "stable_node_dups"} <= kinds


@pytest.mark.parametrize("entry", DOC["entries"], ids=lambda e: f"seed{e['seed']}")
def test_the_model_converges_to_the_kernels_numbers(entry, kernel_factory):
    w, knobs = random_run(entry["seed"])
    h = kernel_factory(geo=GEO)
    got, stats = scan_like_the_kernel(h, w, knobs, entry["pages_scanned"])
    assert (got["pages_scanned"], got["full_scans"]) == (entry["pages_scanned"], entry["full_scans"]), knobs
    assert {k: got[k] for k in KEYS} == entry["kernel"], knobs
    assert [{k: int(s[k]) for k in STAT_KEYS} for s in stats] == entry["ksm_stat"], knobs
    h.check()
