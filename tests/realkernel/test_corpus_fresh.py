# Fresh seeds, recorded on this machine's kernel now and replayed on the model at once:
# the checked-in corpus (tests/kernel/test_corpus.py) could have been fitted to; seeds
# nobody has seen cannot. KSMLAB_FRESH_SEEDS=N sets how many (default 8); the first
# seed is random and printed, so a mismatch can be recorded again with
# `python -m ksmlab.corpus record --first S --n N --out FILE` and replayed with
# KSMLAB_CORPUS=FILE pytest tests/kernel/test_corpus.py.
from __future__ import annotations

import os
import secrets

import pytest

from ksmlab.corpus import record
from tests.kernel.conftest import KernelHarness
from tests.kernel.corpus_replay import GEO, converged_mismatch, stepped_mismatch

pytestmark = [pytest.mark.realkernel, pytest.mark.timeout(900)]


def test_fresh_random_seeds_give_the_kernels_numbers_on_the_model(tmp_path):
    n = int(os.environ.get("KSMLAB_FRESH_SEEDS", "8"))
    first = 1_000_000 + secrets.randbelow(1_000_000)
    print(f"fresh seeds {first}..{first + n - 1}")
    doc = record(list(range(first, first + n)), tmp_path / "fresh.json", log=lambda s: None)
    wrong = []
    for entry in doc["entries"]:
        for replay in (converged_mismatch, stepped_mismatch):
            h = KernelHarness(GEO)
            try:
                wrong.append(replay(h, entry))
            finally:
                h.close()
    wrong = [w for w in wrong if w]
    assert not wrong, f"{len(wrong)} of {2 * n} replays differ (first seed {first}):\n" + "\n".join(wrong)
