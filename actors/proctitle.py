# The command line a process shows (/proc/PID/cmdline, what ps and pgrep read), rewritten.
#
# A fork server forked from a supervisor (actors/zygote.py) would show the supervisor's
# command line, and a run's processes are found by the config path in theirs
# (`actors.main CONFIG zygote ...`). The kernel reads a process's command line from its
# own memory, the argument area that exec() laid out (arg_start to arg_end, fields 48
# and 49 of /proc/self/stat), so a process may write another one there, NUL-separated
# and NUL-padded, as setproctitle(3) does. It cannot grow the area: set_cmdline() says
# whether the new one fits, and a process that means to fork such children reserves
# room by being started with a padding argument (ksmlab/runfork.py). set_comm() is the
# other half of what ps shows: the name in /proc/PID/comm (prctl PR_SET_NAME).
from __future__ import annotations

import ctypes


def _arg_area() -> tuple[int, int]:
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    # fields after ")" start at field 3 (state): arg_start is field 48, arg_end field 49
    return int(fields[48 - 3]), int(fields[49 - 3])


def capacity() -> int:
    """Bytes of the argument area, its last NUL included (0 where it cannot be read)."""
    try:
        start, end = _arg_area()
    except (OSError, IndexError, ValueError):
        return 0
    return max(0, end - start)


def encoded(argv: list[str]) -> bytes:
    return b"".join(a.encode() + b"\0" for a in argv)


def set_cmdline(argv: list[str]) -> bool:
    """Show argv as this process's command line; False (nothing written) if it does not
    fit in the argument area."""
    data = encoded(argv)
    try:
        start, end = _arg_area()
    except (OSError, IndexError, ValueError):
        return False
    if not start or len(data) > end - start:
        return False
    ctypes.memmove(start, data.ljust(end - start, b"\0"), end - start)
    return True


PR_SET_NAME = 15


def set_comm(name: str) -> None:
    """This process's name (/proc/PID/comm, at most 15 bytes), as a thread's is set."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
