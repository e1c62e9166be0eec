# An actor never outlives its supervisor, even one that died while the actor was starting.
#
# PR_SET_PDEATHSIG is set by the entry module before anything heavy loads, and an actor
# whose parent is no longer the supervisor that spawned it (KSMLAB_SUPERVISOR_PID) exits
# at once: the supervisor died before the prctl could take effect. (The SIGKILL of a
# running supervisor is tests/actors/test_robustness.py's.)
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from actors.pdeath import SUPERVISOR_PID_ENV

pytestmark = [pytest.mark.timeout(30)]


@pytest.mark.parametrize("entry", ["actors.main", "actors.kcov"])
def test_an_actor_whose_supervisor_is_already_gone_exits_at_once(tmp_path, entry):
    env = {**os.environ, SUPERVISOR_PID_ENV: "1"}          # not our parent: "the supervisor died"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", entry, str(tmp_path / "no-such-cluster.json"), "ksmd", "ksmd"],
                       capture_output=True, text=True, env=env, timeout=20)
    # Had it gone on, it would have failed on the missing cluster.json (exit 1, a traceback).
    assert (r.returncode, r.stderr) == (0, ""), r.stderr[-1000:]
    assert time.monotonic() - t0 < 10


def test_an_actor_whose_supervisor_is_alive_goes_on(tmp_path):
    env = {**os.environ, SUPERVISOR_PID_ENV: str(os.getpid())}
    r = subprocess.run([sys.executable, "-m", "actors.main", str(tmp_path / "no-such-cluster.json"), "ksmd", "ksmd"],
                       capture_output=True, text=True, env=env, timeout=20)
    assert r.returncode == 1 and "no-such-cluster.json" in r.stderr
