# actors/kernel/page.py's put_pages() and shared_mem/frames.py's free_many(): many last
# references dropped at once (the vector scan's run of merged duplicates).
#
# What must hold: the pages end as put_page() one at a time leaves them (the same
# reference counts, the same frames freed, the free lists in the same order, so later
# allocations get the same frames), and a frame that must not be freed is refused
# before any is.
from __future__ import annotations

import pytest

from actors.kernel.page import get_page, put_page, put_pages
from shared_mem.layout import PG_FREE

pytestmark = [pytest.mark.timeout(30)]


def _frames(h, n: int) -> list[int]:
    out = [h.k.alloc.alloc() for _ in range(n)]
    assert None not in out
    for pfn in out:
        h.km.page["flags"][pfn] = 0  # a plain, unmapped frame with its one reference
    return out


def _free_list(h) -> list[int]:
    z = h.km.zones[0]
    return h.km.free_frames[int(z["first"]) : int(z["first"]) + int(z["free_top"])].tolist()


def test_put_pages_leaves_what_put_page_one_at_a_time_leaves(kernel_factory):
    pair = [kernel_factory(), kernel_factory()]
    pfns = [_frames(h, 6) for h in pair]
    for h, ps in zip(pair, pfns):
        get_page(h.k, ps[2])  # one frame keeps a reference: not freed
    for pfn in pfns[0]:
        put_page(pair[0].k, pfn)
    put_pages(pair[1].k, pfns[1])
    assert pfns[0] == pfns[1]
    assert _free_list(pair[1]) == _free_list(pair[0])
    for h, ps in zip(pair, pfns):
        assert [bool(h.km.page["flags"][p] & PG_FREE) for p in ps] == [True, True, False, True, True, True]
        assert int(h.km.page["refcount"][ps[2]]) == 1
    assert [pair[1].k.alloc.alloc() for _ in range(5)] == [pair[0].k.alloc.alloc() for _ in range(5)]


def test_free_many_refuses_a_free_frame_or_one_twice_and_frees_none(kern):
    h = kern
    a, b, c = _frames(h, 3)
    h.km.page["refcount"][[a, b, c]] = 0
    before = _free_list(h)
    with pytest.raises(RuntimeError, match="twice"):
        h.k.alloc.free_many([a, b, a])
    h.k.alloc.free(c)
    with pytest.raises(RuntimeError, match="Bad page state"):
        h.k.alloc.free_many([a, c])
    assert _free_list(h) == [*before, c]
    assert not h.km.page["flags"][a] & PG_FREE and not h.km.page["flags"][b] & PG_FREE
    h.k.alloc.free_many([a, b])
    assert _free_list(h) == [*before, c, a, b]
