# The two things a lock word needs from the machine: 32-bit atomics on shared memory and
# the futex system call.
#
# A word lock (wordlocks.py) is a 32-bit word in the run's lock state segment, which
# every actor process maps. Its fast path is one compare-and-swap, as the kernel's
# mutex_lock() fast path is one atomic_long_try_cmpxchg_acquire(); only a context that
# finds the word taken sleeps, in futex(FUTEX_WAIT) on that word, and an unlock that
# sees the sleepers bit wakes it with FUTEX_WAKE. The futexes are shared ones (no
# FUTEX_PRIVATE_FLAG): the word lives in a MAP_SHARED mapping of several processes, and
# the kernel keys such a futex by the page and offset, not by the address.
#
# The atomics are the compiler's builtins in libatomic through ctypes, called without
# argtypes on prebuilt arguments (a c_void_p address per lock, a c_int32 "expected" per
# kernel context), which is what makes them cheaper than the OFD fcntl() they replace:
# about 0.4 us a call against 0.8 us a syscall. A futex wait releases the GIL (ctypes
# does for every foreign call), so the other threads of an actor run on while one sleeps.
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform

_atomic = ctypes.CDLL(ctypes.util.find_library("atomic") or "libatomic.so.1")
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)

SEQ_CST = 5

# bool __atomic_compare_exchange_4(int32 *mem, int32 *expected, int32 new, int s, int f):
# on failure *expected is the value found.
cas32 = _atomic.__atomic_compare_exchange_4
cas32.restype = ctypes.c_bool
# int32 __atomic_exchange_4(int32 *mem, int32 new, int order): the old value.
xchg32 = _atomic.__atomic_exchange_4
xchg32.restype = ctypes.c_int32
# int32 __atomic_fetch_add_4 / _and_4(int32 *mem, int32 v, int order): the old value.
fetch_add32 = _atomic.__atomic_fetch_add_4
fetch_add32.restype = ctypes.c_int32
fetch_and32 = _atomic.__atomic_fetch_and_4
fetch_and32.restype = ctypes.c_int32

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "riscv64": 98, "ppc64le": 221, "s390x": 238}
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
WAKE_ALL = 0x7FFFFFFF


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _nr_futex() -> int:
    machine = platform.machine()
    try:
        return _SYS_FUTEX[machine]
    except KeyError:
        raise OSError(errno.ENOSYS, f"futex: no syscall number known for {machine}") from None


_NR = _nr_futex()


def futex_wait(addr: int, expected: int, timeout_s: float) -> bool:
    """Sleep while the 32-bit word at addr holds `expected`, at most timeout_s.

    Returns False on timeout, True otherwise (woken, the value had already changed, or
    a signal): the caller re-reads the word in every case."""
    ts = _Timespec(int(timeout_s), int((timeout_s % 1) * 1e9))
    r = _syscall(
        ctypes.c_long(_NR), ctypes.c_void_p(addr), ctypes.c_int(_FUTEX_WAIT),
        ctypes.c_int32(expected), ctypes.byref(ts), ctypes.c_void_p(0), ctypes.c_int(0),
    )
    if r == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.ETIMEDOUT:
        return False
    if err in (errno.EAGAIN, errno.EINTR):
        return True
    raise OSError(err, f"futex(FUTEX_WAIT): {os.strerror(err)}")


def futex_wake(addr: int, n: int = 1) -> int:
    """Wake up to n contexts sleeping on the word at addr; returns how many woke."""
    r = _syscall(
        ctypes.c_long(_NR), ctypes.c_void_p(addr), ctypes.c_int(_FUTEX_WAKE),
        ctypes.c_int(n), ctypes.c_void_p(0), ctypes.c_void_p(0), ctypes.c_int(0),
    )
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"futex(FUTEX_WAKE): {os.strerror(err)}")
    return int(r)
