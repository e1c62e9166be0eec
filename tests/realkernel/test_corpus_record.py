# The recorded corpus is what this machine's kernel does: re-recording a few entries gives
# the same numbers (ksmlab/corpus.py; the replay on the model is tests/kernel/test_corpus.py).
from __future__ import annotations

import pytest

from ksmlab.corpus import load, record

pytestmark = [pytest.mark.realkernel, pytest.mark.timeout(300)]


def test_recording_again_gives_the_stored_numbers(tmp_path):
    stored = {e["seed"]: e for e in load()["entries"]}
    again = record([1, 2, 3, 8, 39], tmp_path / "corpus.json", log=lambda s: None)
    for e in again["entries"]:
        assert e == stored[e["seed"]], e["seed"]
