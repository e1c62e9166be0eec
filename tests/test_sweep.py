# `ksmlab sweep` removes only what dead runs left behind.
from __future__ import annotations

import os
import shutil

import pytest

from ksmlab import live


@pytest.mark.timeout(30)
def test_sweep_removes_only_dead_run_socket_dirs():
    """A dead run's /tmp/ksmlab-<run id> socket folder goes; other ksmlab-* folders stay."""
    dead = "/tmp/ksmlab-0badc0de"
    other = "/tmp/ksmlab-not-a-run"
    try:
        os.makedirs(dead, exist_ok=True)
        os.makedirs(other, exist_ok=True)
        open(os.path.join(dead, "ksmd.sock"), "w").close()
        open(os.path.join(other, "precious.txt"), "w").close()
        assert live.sweep_socket_dirs(dry_run=True) and os.path.exists(dead)
        removed = live.sweep_socket_dirs()
        assert dead in removed and not os.path.exists(dead)
        assert other not in removed and os.path.exists(os.path.join(other, "precious.txt"))
    finally:
        shutil.rmtree(dead, ignore_errors=True)
        shutil.rmtree(other, ignore_errors=True)
