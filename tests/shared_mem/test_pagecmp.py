# The comparison core (shared_mem/pagecmp.py): checksums, memcmp order, pages_identical.
#
# memcmp_pages() decides everything KSM merges, so its order must be exactly C memcmp's,
# i.e. Python's bytes order; the checksum is only the volatility filter but must be the
# same whether computed page by page or for a whole batch, and must notice small changes.
from __future__ import annotations

import functools

import numpy as np
import pytest

from shared_mem.pagecmp import PageCmp

PAGE = 4096


def sign(x: int) -> int:
    return (x > 0) - (x < 0)


def bytes_cmp(a: bytes, b: bytes) -> int:
    return (a > b) - (a < b)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20260401)


def make(pages: list[np.ndarray | bytes]) -> PageCmp:
    fr = np.zeros((len(pages), PAGE), dtype=np.uint8)
    for i, p in enumerate(pages):
        fr[i] = np.frombuffer(bytes(p), dtype=np.uint8) if isinstance(p, bytes) else p
    return PageCmp(fr)


def random_pages(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    return [rng.integers(0, 256, PAGE, dtype=np.uint8) for _ in range(n)]


def adversarial_pages(rng: np.random.Generator) -> list[np.ndarray]:
    """Pages that differ only late, only in one byte, in 0x00 vs 0xff, in sign bits."""
    base = rng.integers(0, 256, PAGE, dtype=np.uint8)
    out = [np.zeros(PAGE, np.uint8), np.full(PAGE, 0xFF, np.uint8), base.copy()]
    for off in (0, 1, 7, 8, 9, 63, 64, 2047, 2048, PAGE - 9, PAGE - 8, PAGE - 2, PAGE - 1):
        for val in (0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF):
            p = base.copy()
            p[off] = val
            out.append(p)
    z = np.zeros(PAGE, np.uint8)
    z[PAGE - 1] = 1  # zero page but the last byte
    out.append(z)
    f = np.full(PAGE, 0xFF, np.uint8)
    f[PAGE - 1] = 0xFE  # 0xff page but the last byte
    out.append(f)
    f2 = np.full(PAGE, 0xFF, np.uint8)
    f2[0] = 0x00  # 0x00 then 0xff...: below any page starting with 0x01
    out.append(f2)
    # equal 8-byte words except one byte inside a word (big-endian word order matters)
    w = np.zeros(PAGE, np.uint8)
    w[8:16] = [0x01, 0, 0, 0, 0, 0, 0, 0x00]
    w2 = np.zeros(PAGE, np.uint8)
    w2[8:16] = [0x00, 0, 0, 0, 0, 0, 0, 0xFF]
    out += [w, w2]
    return out


def test_checksum_batch_equals_per_page(rng: np.random.Generator) -> None:
    pages = random_pages(rng, 64) + adversarial_pages(rng)
    pc = make(pages)
    pfns = np.arange(len(pages))
    batch = pc.checksum_batch(pfns)
    assert [int(x) for x in batch] == [pc.checksum(int(p)) for p in pfns]
    # any order, repeats, and a subset
    perm = rng.permutation(pfns)
    assert [int(x) for x in pc.checksum_batch(np.concatenate([perm, perm[:5]]))] == [
        pc.checksum(int(p)) for p in np.concatenate([perm, perm[:5]])
    ]
    assert len(pc.checksum_batch(np.zeros(0, dtype=np.int64))) == 0
    # runs of consecutive frames (hashed in place) mixed with scattered ones
    mixed = np.concatenate([pfns[3:40], pfns[50:52], [7], pfns[10:30][::-1], pfns[41:]])
    assert [int(x) for x in pc.checksum_batch(mixed)] == [pc.checksum(int(p)) for p in mixed]
    with pytest.raises(IndexError):
        pc.checksum_batch(np.array([0, len(pages)]))
    with pytest.raises(IndexError):
        pc.checksum_batch(np.array([-1, 0]))
    same = pc.identical_batch(mixed, mixed)
    assert same.all() and len(same) == len(mixed)
    other = np.roll(mixed, 1)
    assert pc.identical_batch(mixed, other).tolist() == [
        pc.identical(int(x), int(y)) for x, y in zip(mixed, other)
    ]
    for p in pfns:
        c = pc.checksum(int(p))
        assert 0 <= c < 2**32
        assert c == pc.checksum_bytes(pc.frames[p])


def test_every_single_byte_change_changes_the_checksum(rng: np.random.Generator) -> None:
    page = rng.integers(0, 256, PAGE, dtype=np.uint8)
    pc = make([page, page])
    c0 = pc.checksum(0)
    assert pc.checksum(1) == c0
    # every offset once (a random different value), then random (offset, value) samples
    offsets = list(range(PAGE)) + [int(x) for x in rng.integers(0, PAGE, 2000)]
    for off in offsets:
        old = int(page[off])
        new = (old + int(rng.integers(1, 256))) & 0xFF
        pc.frames[1, off] = new
        assert pc.checksum(1) != c0, f"byte {off}: {old:#x} -> {new:#x} kept the checksum"
        pc.frames[1, off] = old
    assert pc.checksum(1) == c0
    # the same on the zero page: any single non-zero byte moves it off zero_checksum
    z = make([np.zeros(PAGE, np.uint8)])
    for off in range(0, PAGE, 7):
        for val in (1, 0x80, 0xFF):
            z.frames[0, off] = val
            assert z.checksum(0) != z.zero_checksum
        z.frames[0, off] = 0
    assert z.checksum(0) == z.zero_checksum


def test_zero_checksum() -> None:
    pc = make([np.zeros(PAGE, np.uint8), np.full(PAGE, 0xFF, np.uint8)])
    assert pc.checksum(0) == pc.zero_checksum
    assert pc.checksum_bytes(np.zeros(PAGE, np.uint8)) == pc.zero_checksum
    assert int(pc.checksum_batch(np.array([0]))[0]) == pc.zero_checksum
    assert pc.checksum(1) != pc.zero_checksum
    assert pc.is_zero(0) and not pc.is_zero(1)
    # zero_checksum is a property of the hash, not of the frames it is bound to
    other = make(random_pages(np.random.default_rng(1), 2))
    assert other.zero_checksum == pc.zero_checksum


@pytest.mark.parametrize("kind", ["random", "adversarial"])
def test_memcmp_order_is_bytes_order(rng: np.random.Generator, kind: str) -> None:
    pages = random_pages(rng, 40) if kind == "random" else adversarial_pages(rng)
    if kind == "random":  # random pages differ in byte 0; add shared prefixes
        for i in range(0, 40, 4):
            cut = int(rng.integers(1, PAGE))
            pages[i + 1][:cut] = pages[i][:cut]
    pc = make(pages)
    raw = [bytes(p) for p in pages]
    n = len(pages)
    for a in range(n):
        assert pc.memcmp(a, a) == 0
        for b in range(n):
            want = bytes_cmp(raw[a], raw[b])
            got = pc.memcmp(a, b)
            assert got == want, f"memcmp({a}, {b}) = {got}, bytes order says {want}"
            assert pc.memcmp_words(a, b) == want
            assert pc.memcmp(b, a) == -got
            assert pc.identical(a, b) == (raw[a] == raw[b])
    # sorting by memcmp is sorting by bytes
    order = sorted(range(n), key=functools.cmp_to_key(pc.memcmp))
    assert [raw[i] for i in order] == sorted(raw)


def test_memcmp_last_byte_and_extremes() -> None:
    a = np.full(PAGE, 0x5A, np.uint8)
    b = a.copy()
    b[-1] = 0x5B
    zero = np.zeros(PAGE, np.uint8)
    ff = np.full(PAGE, 0xFF, np.uint8)
    pc = make([a, b, zero, ff])
    assert pc.memcmp(0, 1) == -1 and pc.memcmp(1, 0) == 1
    assert pc.memcmp(2, 3) == -1 and pc.memcmp(3, 2) == 1  # unsigned bytes: 0x00 < 0xff
    assert pc.memcmp(2, 0) == -1 and pc.memcmp(3, 0) == 1
    assert not pc.identical(0, 1)
    assert pc.identical(2, 2)


def test_identical(rng: np.random.Generator) -> None:
    p = rng.integers(0, 256, PAGE, dtype=np.uint8)
    pc = make([p, p.copy(), np.zeros(PAGE, np.uint8), np.zeros(PAGE, np.uint8)])
    assert pc.identical(0, 1) and pc.identical(1, 0)
    assert pc.identical(2, 3)
    assert not pc.identical(0, 2)
    for off in (0, 1, 8, 2048, PAGE - 8, PAGE - 1):
        old = int(pc.frames[1, off])
        pc.frames[1, off] = old ^ 0x01
        assert not pc.identical(0, 1)
        assert pc.memcmp(0, 1) != 0
        pc.frames[1, off] = old
    assert pc.identical(0, 1)


def test_out_of_range_pfn_raises() -> None:
    pc = make([np.zeros(PAGE, np.uint8)] * 3)
    for a, b in ((0, 3), (3, 0), (-1, 0), (0, -1)):
        with pytest.raises(IndexError):
            pc.memcmp(a, b)
        with pytest.raises(IndexError):
            pc.identical(a, b)


def test_rejects_bad_frames() -> None:
    with pytest.raises(ValueError):
        PageCmp(np.zeros((4, 100), np.uint8))
    with pytest.raises(ValueError):
        PageCmp(np.zeros((8, PAGE), np.uint8)[::2])
