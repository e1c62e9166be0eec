# The vectorized comparison core: page checksums, equality and memcmp order.
#
# mm/ksm.c decides equality only with memcmp_pages(); its checksum (xxhash, cut to
# 32 bits) just filters volatile pages: a page enters the unstable tree only when
# its checksum did not change since ksmd's previous visit. Ours is a linear hash of
# the page's 512 little-endian words with fixed odd multipliers (each multiply is a
# bijection mod 2^64, so any single-word change always changes the sum), computed
# for a whole scan batch in one numpy pass straight from the shared frames.
# memcmp order is byte order: comparing big-endian 64-bit words gives the same
# answer as memcmp, 8 bytes at a time.
from __future__ import annotations

import numpy as np

from shared_mem.layout import PAGE_SIZE

WORDS = PAGE_SIZE // 8
_K = (np.random.default_rng(0x6B736D).integers(1, 2**63, WORDS, dtype=np.uint64) | np.uint64(1))


class PageCmp:
    """Comparison kernels bound to one frames array (nr_frames x 4096 uint8)."""

    def __init__(self, frames: np.ndarray) -> None:
        self.frames = frames
        self.le = frames.view("<u8")          # (nr_frames, 512) for hashing
        self.be = frames.view(">u8")          # memcmp order, 8 bytes at a time
        self.zero_checksum = self.checksum_bytes(np.zeros(PAGE_SIZE, dtype=np.uint8))

    @staticmethod
    def _fold(h: np.ndarray) -> np.ndarray:
        return ((h ^ (h >> np.uint64(32))) & np.uint64(0xFFFFFFFF)).astype(np.int64)

    def checksum(self, pfn: int) -> int:
        """calc_checksum() of one frame."""
        h = np.dot(self.le[pfn], _K)  # wraps mod 2^64
        return int((int(h) ^ (int(h) >> 32)) & 0xFFFFFFFF)

    def checksum_batch(self, pfns: np.ndarray) -> np.ndarray:
        """calc_checksum() of many frames at once (one pass over the batch)."""
        if len(pfns) == 0:
            return np.zeros(0, dtype=np.int64)
        with np.errstate(over="ignore"):
            h = self.le[pfns] @ _K
        return self._fold(h)

    def checksum_bytes(self, data: np.ndarray) -> int:
        h = int(np.dot(np.frombuffer(data.tobytes(), dtype="<u8"), _K))
        return (h ^ (h >> 32)) & 0xFFFFFFFF

    def memcmp(self, a: int, b: int) -> int:
        """memcmp_pages(): <0, 0, >0 in byte order."""
        wa, wb = self.be[a], self.be[b]
        ne = wa != wb
        i = int(ne.argmax())
        if not ne[i]:
            return 0
        return -1 if wa[i] < wb[i] else 1

    def identical(self, a: int, b: int) -> bool:
        """pages_identical()."""
        return bool(np.array_equal(self.le[a], self.le[b]))

    def is_zero(self, pfn: int) -> bool:
        return not self.le[pfn].any()

    def key(self, pfn: int) -> int:
        """First 8 bytes in memcmp order: a cheap first comparison for tree walks."""
        return int(self.be[pfn, 0])
