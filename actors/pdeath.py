# The first thing an actor process does: tie its life to the supervisor's.
#
# prctl(PR_SET_PDEATHSIG, SIGKILL) makes the kernel kill this process when its parent,
# the supervisor, dies. Set late, it leaves a window: an actor still importing numpy and
# zmq (a third of a second) when the supervisor is SIGKILLed would live on, orphaned, with
# the run's segments mapped. So the entry modules (actors/main.py, actors/kcov.py) call
# die_with_parent() before their other imports, and it then checks the parent is still the
# supervisor that spawned it (passed in the environment): if the supervisor died before
# the prctl, getppid() is already someone else and the actor exits at once. This module
# imports nothing heavy for that reason.
from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1
SUPERVISOR_PID_ENV = "KSMLAB_SUPERVISOR_PID"


def set_pdeathsig(sig: int = signal.SIGKILL) -> None:
    """prctl(PR_SET_PDEATHSIG): the kernel sends sig to this process when its parent dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def die_with(parent: int, sig: int = signal.SIGKILL) -> None:
    """Get sig when `parent` dies; exit now if it already has (this process's parent is
    someone else since)."""
    set_pdeathsig(sig)
    if os.getppid() != parent:
        os._exit(0)


def die_with_parent() -> None:
    """Die with the supervisor; exit now if it is already gone."""
    want = os.environ.get(SUPERVISOR_PID_ENV)
    if want:
        die_with(int(want))
    else:
        set_pdeathsig()
