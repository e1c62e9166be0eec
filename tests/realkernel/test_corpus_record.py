# The recorded corpus is what this machine's kernel does: re-recording a few entries gives
# the same numbers (ksmlab/corpus.py; the replay on the model is tests/kernel/test_corpus.py).
# Where ksmd stands when a recording reads the counters (pages_scanned, full_scans) differs
# from one recording to the next, and with smart_scan so do unshared and volatile (unique
# pages in a skip streak count as volatile): those are compared by the replay, which stops
# the model at the recorded page, not here.
from __future__ import annotations

import pytest

from ksmlab.corpus import STEP_KEYS, load, record

pytestmark = [pytest.mark.realkernel, pytest.mark.timeout(300)]
MOVING = ("pages_unshared", "pages_volatile")


def _fixed_part(e: dict) -> dict:
    out = {k: v for k, v in e.items() if k not in STEP_KEYS}
    if e["knobs"]["smart_scan"]:
        out["kernel"] = {k: v for k, v in e["kernel"].items() if k not in MOVING}
    return out


def test_recording_again_gives_the_stored_numbers(tmp_path):
    stored = {e["seed"]: e for e in load()["entries"]}
    again = record([1, 2, 3, 8, 39], tmp_path / "corpus.json", log=lambda s: None)
    for e in again["entries"]:
        assert _fixed_part(e) == _fixed_part(stored[e["seed"]]), e["seed"]
