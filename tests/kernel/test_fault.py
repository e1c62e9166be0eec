# The user access loop (access_user) under reclaim: every trap ends in progress.
#
# A load is copied only after its fault-around batch is in. Reclaim that takes the
# trapping page back before the copy made the same trap repeat for ever (a soak seed
# spun 100 s in do_swap_page, 2026-12-02). The kernel maps one anonymous page per trap
# and the instruction retries at once; the loop now faults just the trapping page on a
# repeated trap, and publishes the repeat for the no-progress watchdog.
#
#     task (access_user)                          reclaim
#     load traps at A: fault A..A+3 in
#                                                 swaps A out again
#     load traps at A again: fault A alone
#     copies A, traps at A+1 ...
from __future__ import annotations

from actors.kernel.fault import access_user, do_user_addr_fault
from actors.kernel.vmscan import shrink_page
from shared_mem.layout import PAGE_SIZE


def test_a_load_whose_page_reclaim_takes_back_still_completes(kern):
    h = kern
    mm, a = h.area([0x11, 0x22, 0x33, 0x44], mergeable=False)
    for i in range(4):
        assert shrink_page(h.k, h.pfn(mm, a + i * PAGE_SIZE), force=True) == "freed"
    calls: list[tuple[int, int]] = []

    def fault(addr, npages, flags, store):
        calls.append((addr, npages))
        assert len(calls) < 50, f"the load makes no progress: {calls[:8]}"
        got = do_user_addr_fault(h.k, mm, addr, npages, flags, store)
        if npages > 1:      # reclaim takes the trapping page back before the copy
            shrink_page(h.k, h.pfn(mm, addr), force=True)
        return got

    mark = h.mark()
    data = access_user(h.k, mm, a, 4 * PAGE_SIZE, False, fault=fault)
    assert data == b"".join(bytes([c]) * PAGE_SIZE for c in (0x11, 0x22, 0x33, 0x44))
    assert calls[:2] == [(a, 4), (a, 1)]       # the repeat faults the trapping page alone
    stuck = h.fields("no_progress", mark)
    assert stuck and {f["site"] for f in stuck} == {"access_user"}
    assert h.names(mark).count("progress") == len(stuck)   # each published wait ended
    h.check()
