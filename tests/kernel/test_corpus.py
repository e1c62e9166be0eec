# The recorded differential corpus, replayed on the model (ksmlab/corpus.py).
#
# Every entry of tests/data/differential_corpus.json is a random workload (stored by its
# seed) with the counters this machine's kernel converged to and each process's
# /proc/PID/ksm_stat, how far its ksmd had scanned then (pages_scanned, full_scans), and
# a stepped recording: the same workload with a pass cut into about four batches and the
# counters read after every batch. Here each is loaded into an in-process kernel the way
# ksmlab.realkernel loads it into real processes (one MADV_MERGEABLE area per process,
# the same knobs, run=1), scanned in ksmd's batches up to the same number of pages, and
# must stand in the same pass and give the same numbers, at the end and after every
# recorded batch. (Converging by the model's own rule is not enough: with smart_scan the
# counters keep moving as unique pages fall into skip streaks, and the kernel's snapshot
# is wherever its ksmd had got to.) CI has no writable /sys/kernel/mm/ksm; this is how
# it still checks the model against the kernel. Regenerate: `.venv/bin/python -m
# ksmlab.corpus record` (root, KSM); KSMLAB_CORPUS=FILE replays another recording (fresh
# seeds: `record --first S --n N --out FILE`).
from __future__ import annotations

import os
from pathlib import Path

import pytest

from ksmlab.corpus import KEYS, load, random_run
from tests.kernel.corpus_replay import GEO, converged_mismatch, stepped_mismatch

pytestmark = [pytest.mark.timeout(120)]

DOC = load(Path(os.environ["KSMLAB_CORPUS"])) if os.environ.get("KSMLAB_CORPUS") else load()


def test_the_corpus_is_big_enough_and_its_seeds_still_draw_the_same_workloads():
    entries = DOC["entries"]
    assert len(entries) >= 50
    for e in entries:
        w, knobs = random_run(e["seed"])
        assert (w.total_pages, knobs) == (e["pages"], e["knobs"]), f"seed {e['seed']}: the generator changed"
    kinds = {k for e in entries for k in KEYS if e["kernel"][k]}
    assert {"pages_shared", "pages_sharing", "pages_unshared", "ksm_zero_pages",
            "stable_node_chains", "stable_node_dups"} <= kinds


# All of ksmd's scans: the vectorized ones (batch is the default in a cluster) must give the
# kernel's numbers as the page-by-page one does, after every batch too.
SCANS = pytest.mark.parametrize("scan", ["exact", "batch", "vector"])


@SCANS
@pytest.mark.parametrize("entry", DOC["entries"], ids=lambda e: f"seed{e['seed']}")
def test_the_model_converges_to_the_kernels_numbers(entry, scan, kernel_factory):
    h = kernel_factory(geo=GEO, scan=scan)
    assert converged_mismatch(h, entry) is None
    h.check()


@SCANS
@pytest.mark.parametrize("entry", DOC["entries"], ids=lambda e: f"seed{e['seed']}")
def test_the_model_gives_the_kernels_numbers_after_every_batch(entry, scan, kernel_factory):
    """The stepped recording: a pass in about four batches, the counters after each one."""
    h = kernel_factory(geo=GEO, scan=scan)
    assert stepped_mismatch(h, entry) is None
    h.check()
