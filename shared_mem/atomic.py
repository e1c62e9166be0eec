# atomic_t / atomic64_t for records in shared memory.
#
# Kernel counters such as mm_users, mm_count, page refcounts and ksm_zero_pages are
# changed by several actors at once; a numpy "x[i] += 1" is a read-modify-write that
# would lose updates across processes. These helpers call the compiler's atomic
# builtins in libatomic through ctypes (~0.6 us each), on the exact address of the
# field inside the shared mapping. read() is atomic_read(): like the kernel's, a
# plain aligned 8-byte load (READ_ONCE), done through a ctypes array over the same
# memory, which is several times cheaper than a call into libatomic.
from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np

_lib = ctypes.CDLL(ctypes.util.find_library("atomic") or "libatomic.so.1")
_SEQ_CST = 5


def _fn(name: str, restype, argtypes):
    f = getattr(_lib, name)
    f.restype = restype
    f.argtypes = argtypes
    return f


_I64, _VP = ctypes.c_int64, ctypes.c_void_p
_fetch_add = _fn("__atomic_fetch_add_8", _I64, [_VP, _I64, ctypes.c_int])
_fetch_or = _fn("__atomic_fetch_or_8", _I64, [_VP, _I64, ctypes.c_int])
_fetch_and = _fn("__atomic_fetch_and_8", _I64, [_VP, _I64, ctypes.c_int])
_load = _fn("__atomic_load_8", _I64, [_VP, ctypes.c_int])
# libatomic's out-of-line compare-and-swap has no `weak` argument (that exists only on the
# __atomic_compare_exchange_n builtin): bool f(I8 *mptr, I8 *eptr, I8 newval, int smodel,
# int fmodel).
_cmpxchg = _fn(
    "__atomic_compare_exchange_8",
    ctypes.c_bool,
    [_VP, ctypes.POINTER(_I64), _I64, ctypes.c_int, ctypes.c_int],
)


class AtomicField:
    """Atomic access to one 8-byte integer field of a record array (by record index)."""

    __slots__ = ("_q", "_w", "base", "stride")

    def __init__(self, view: np.ndarray) -> None:
        if view.dtype.itemsize != 8 or view.dtype.kind not in "iu":
            raise TypeError(f"atomic fields must be 8-byte integers, not {view.dtype}")
        self.base = view.ctypes.data
        self.stride = view.strides[0] if view.ndim else 0
        if self.base % 8 or self.stride % 8:
            raise ValueError("atomic fields must be 8-byte aligned")
        # element i is word i * _w of _q (the field's records, strided, in place)
        self._w = self.stride // 8
        n = len(view) if view.ndim else 1
        self._q = (ctypes.c_int64 * ((n - 1) * self._w + 1)).from_address(self.base)

    def add_return(self, i: int, delta: int) -> int:
        """atomic64_add_return: the new value."""
        return _fetch_add(self.base + i * self.stride, delta, _SEQ_CST) + delta

    def inc_return(self, i: int) -> int:
        return _fetch_add(self.base + i * self.stride, 1, _SEQ_CST) + 1

    def dec_return(self, i: int) -> int:
        return _fetch_add(self.base + i * self.stride, -1, _SEQ_CST) - 1

    def read(self, i: int) -> int:
        """atomic_read(): READ_ONCE, a plain aligned load."""
        if i < 0:
            raise IndexError(i)
        return self._q[i * self._w]

    def read_seq_cst(self, i: int) -> int:
        return _load(self.base + i * self.stride, _SEQ_CST)

    def set_bits(self, i: int, bits: int) -> int:
        """Returns the old value (test_and_set_bit style)."""
        return _fetch_or(self.base + i * self.stride, bits, _SEQ_CST)

    def clear_bits(self, i: int, bits: int) -> int:
        return _fetch_and(self.base + i * self.stride, ~bits, _SEQ_CST)

    def cmpxchg(self, i: int, old: int, new: int) -> int:
        """Returns the value found (== old on success), like the kernel's cmpxchg."""
        expected = _I64(old)
        _cmpxchg(self.base + i * self.stride, expected, new, _SEQ_CST, _SEQ_CST)
        return expected.value

    def inc_not_zero(self, i: int) -> bool:
        """refcount_inc_not_zero / mmget_not_zero: a cmpxchg loop from the value read."""
        addr = self.base + i * self.stride
        v = self.read(i)
        while v:
            expected = _I64(v)
            if _cmpxchg(addr, expected, v + 1, _SEQ_CST, _SEQ_CST):
                return True
            v = expected.value
        return False
