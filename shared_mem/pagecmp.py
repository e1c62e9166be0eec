# The vectorized comparison core: page checksums, equality and memcmp order.
#
# mm/ksm.c decides equality only with memcmp_pages(); its checksum (xxhash, cut to
# 32 bits) just filters volatile pages: a page enters the unstable tree only when
# its checksum did not change since ksmd's previous visit. Ours is a linear hash of
# the page's 512 little-endian words with fixed odd multipliers (each multiply is a
# bijection mod 2^64, so any single-word change always changes the 64-bit sum; the
# fold to 32 bits keeps that only with probability 1 - 2^-32, like xxhash's cut),
# computed page by page, or for many pages in one numpy pass (checksum_batch).
# memcmp_pages() and pages_identical() are libc's memcmp() on the two frames in
# place (through ctypes: no copy, no numpy temporaries), which is the kernel's
# byte order by definition; memcmp_words() is the same order computed with numpy
# on big-endian 64-bit words, kept as the reference the tests compare against.
from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np

from shared_mem.layout import PAGE_SIZE

WORDS = PAGE_SIZE // 8
_K = (np.random.default_rng(0x6B736D).integers(1, 2**63, WORDS, dtype=np.uint64) | np.uint64(1))
# Like xxhash's, the checksum of an all-zero page is not 0: a new rmap_item starts with
# oldchecksum 0, so a zero page must not look "unchanged" on its very first visit (the
# kernel needs two visits before any page, zero pages included, can merge).
_SEED = 0x9E3779B1

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
_memcmp = _libc.memcmp
_memcmp.restype = ctypes.c_int
_memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]


class PageCmp:
    """Comparison kernels bound to one frames array (nr_frames x 4096 uint8)."""

    def __init__(self, frames: np.ndarray) -> None:
        if frames.ndim != 2 or frames.shape[1] != PAGE_SIZE or not frames.flags.c_contiguous:
            raise ValueError("frames must be a C-contiguous (nr_frames, PAGE_SIZE) uint8 array")
        self.frames = frames
        self.nr = frames.shape[0]
        self.base = frames.ctypes.data        # frame pfn starts at base + pfn * PAGE_SIZE
        self.le = frames.view("<u8")          # (nr_frames, 512) for hashing
        self.be = frames.view(">u8")          # memcmp order, 8 bytes at a time
        self.zero_checksum = self.checksum_bytes(np.zeros(PAGE_SIZE, dtype=np.uint8))

    @staticmethod
    def _fold(h: np.ndarray) -> np.ndarray:
        return ((h ^ (h >> np.uint64(32))) & np.uint64(0xFFFFFFFF)).astype(np.int64)

    def checksum(self, pfn: int) -> int:
        """calc_checksum() of one frame."""
        h = int(np.vdot(self.le[pfn], _K))  # wraps mod 2^64
        return ((h ^ (h >> 32)) & 0xFFFFFFFF) ^ _SEED

    def checksum_batch(self, pfns: np.ndarray) -> np.ndarray:
        """calc_checksum() of many frames at once.

        Runs of consecutive frames are hashed in place (a matrix-vector product over a
        view of the frames: no copy, about memory bandwidth); a scattered batch is
        gathered first, which costs a copy of every page."""
        pfns = np.asarray(pfns, dtype=np.int64)
        n = len(pfns)
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        if int(pfns.min()) < 0 or int(pfns.max()) >= self.nr:
            raise IndexError(f"pfn out of range 0..{self.nr - 1}")
        starts = np.flatnonzero(np.diff(pfns) != 1) + 1
        with np.errstate(over="ignore"):
            if len(starts) * 8 > n:
                h = self.le[pfns] @ _K
            else:
                h = np.empty(n, dtype=np.uint64)
                lo = 0
                for hi in (*starts.tolist(), n):
                    p = int(pfns[lo])
                    np.matmul(self.le[p : p + hi - lo], _K, out=h[lo:hi])
                    lo = hi
        return self._fold(h) ^ _SEED

    def identical_batch(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """pages_identical() of many pairs of frames: a bool per pair. libc memcmp on the
        frames in place, pair by pair: numpy's == would first copy both sides (a gather)
        and then write a temporary as big as an eighth of them."""
        a = np.asarray(a, dtype=np.int64)
        b = np.asarray(b, dtype=np.int64)
        if len(a) != len(b):
            raise ValueError(f"{len(a)} pages against {len(b)}")
        if len(a) and (min(int(a.min()), int(b.min())) < 0 or max(int(a.max()), int(b.max())) >= self.nr):
            raise IndexError(f"pfn out of range 0..{self.nr - 1}")
        base, cmp = self.base, _memcmp
        pa = (base + a * PAGE_SIZE).tolist()
        pb = (base + b * PAGE_SIZE).tolist()
        return np.fromiter((not cmp(x, y, PAGE_SIZE) for x, y in zip(pa, pb)), dtype=bool, count=len(a))

    def checksum_bytes(self, data: np.ndarray) -> int:
        h = int(np.dot(np.frombuffer(data.tobytes(), dtype="<u8"), _K))
        return ((h ^ (h >> 32)) & 0xFFFFFFFF) ^ _SEED

    def _check(self, a: int, b: int) -> None:
        if not (0 <= a < self.nr and 0 <= b < self.nr):
            raise IndexError(f"pfn out of range 0..{self.nr - 1}: {a}, {b}")

    def memcmp(self, a: int, b: int) -> int:
        """memcmp_pages(): -1, 0 or 1 in byte order (libc memcmp of the frames in place)."""
        if not (0 <= a < self.nr and 0 <= b < self.nr):
            self._check(a, b)
        r = _memcmp(self.base + a * PAGE_SIZE, self.base + b * PAGE_SIZE, PAGE_SIZE)
        return (r > 0) - (r < 0)

    def memcmp_words(self, a: int, b: int) -> int:
        """memcmp_pages() computed with numpy on big-endian words (the reference order)."""
        wa, wb = self.be[a], self.be[b]
        ne = wa != wb
        i = int(ne.argmax())
        if not ne[i]:
            return 0
        return -1 if wa[i] < wb[i] else 1

    def memcmp_batch(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """memcmp_pages() of frame pairs (a[i], b[i]): int8 -1, 0 or 1 each.

        The first big-endian words decide most pairs (distinct pages rarely share their
        first 8 bytes); only the ties are compared in full, a chunk of rows at a time."""
        a = np.asarray(a, dtype=np.int64)
        b = np.asarray(b, dtype=np.int64)
        if len(a) and (min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= self.nr):
            raise IndexError(f"pfn out of range 0..{self.nr - 1}")
        ka, kb = self.be[a, 0], self.be[b, 0]
        r = (ka > kb).astype(np.int8) - (ka < kb).astype(np.int8)
        tie = np.flatnonzero(r == 0)
        for s in range(0, len(tie), 2048):
            t = tie[s : s + 2048]
            wa, wb = self.be[a[t]], self.be[b[t]]
            ne = wa != wb
            first = ne.argmax(axis=1)
            rows = np.arange(len(t))
            x, y = wa[rows, first], wb[rows, first]
            r[t] = np.where(ne[rows, first], np.where(x < y, -1, 1), 0)
        return r

    def identical(self, a: int, b: int) -> bool:
        """pages_identical()."""
        if not (0 <= a < self.nr and 0 <= b < self.nr):
            self._check(a, b)
        return not _memcmp(self.base + a * PAGE_SIZE, self.base + b * PAGE_SIZE, PAGE_SIZE)

    def is_zero(self, pfn: int) -> bool:
        return not self.le[pfn].any()

    def key(self, pfn: int) -> int:
        """First 8 bytes in memcmp order: a cheap first comparison for tree walks."""
        return int(self.be[pfn, 0])
