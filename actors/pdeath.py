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


def die_with_parent() -> None:
    """Die with the supervisor; exit now if it is already gone."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass
    want = os.environ.get(SUPERVISOR_PID_ENV)
    if want and os.getppid() != int(want):
        os._exit(0)
