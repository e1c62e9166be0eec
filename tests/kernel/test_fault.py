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
#
# And an access outside the user address space is EFAULT before any page table is
# indexed (a negative address once wrapped into a mapped page; issue 11).
from __future__ import annotations

import pytest

from actors.kernel import mm as mmops
from actors.kernel import syscalls
from actors.kernel.fault import UserAccessError, access_user, do_user_addr_fault
from actors.kernel.vmscan import shrink_page
from protocol.abi import MADV_MERGEABLE, PROT_READ
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


BAD_ACCESSES = [
    (-(1 << 30), 8),          # base - 1 GiB: once wrapped into the page at base
    (-PAGE_SIZE, 8),
    (-(1 << 62), 8),          # once an IndexError (an Oops in the fault actor)
    (1 << 63, 8),
    ((1 << 64) - PAGE_SIZE, 2 * PAGE_SIZE),
]


@pytest.mark.parametrize("write", [False, True])
@pytest.mark.parametrize("addr,length", BAD_ACCESSES)
def test_an_access_outside_the_address_space_is_efault_and_changes_nothing(kern, addr, length, write):
    h = kern
    mm, a = h.area([0x11, 0x22], mergeable=False)
    before = (h.read(mm, a, 2 * PAGE_SIZE), h.k.km.ptable.nr_live(), h.counters("pages_shared"))
    with pytest.raises(UserAccessError) as e:
        access_user(h.k, mm, addr, length, write, 0x55 if write else None)
    assert e.value.errno_name == "EFAULT"
    assert (h.read(mm, a, 2 * PAGE_SIZE), h.k.km.ptable.nr_live(), h.counters("pages_shared")) == before
    h.check()


def test_a_load_longer_than_the_address_space_is_efault_not_a_huge_buffer(kern):
    h = kern
    mm, a = h.area([0x11], mergeable=False)
    with pytest.raises(UserAccessError) as e:
        access_user(h.k, mm, a, 1 << 40, False)
    assert e.value.errno_name == "EFAULT"


@pytest.mark.parametrize("call,err", [
    (lambda h, mm: syscalls.sys_munmap(h.k, mm, -PAGE_SIZE, PAGE_SIZE), "EINVAL"),
    (lambda h, mm: syscalls.sys_munmap(h.k, mm, 1 << 24, 1 << 62), "EINVAL"),
    (lambda h, mm: syscalls.sys_madvise(h.k, mm, -PAGE_SIZE, PAGE_SIZE, MADV_MERGEABLE), "EINVAL"),
    (lambda h, mm: syscalls.sys_madvise(h.k, mm, 1 << 24, 1 << 62, MADV_MERGEABLE), "ENOMEM"),
    (lambda h, mm: syscalls.sys_mprotect(h.k, mm, -PAGE_SIZE, PAGE_SIZE, PROT_READ), "ENOMEM"),
])
def test_address_ranges_past_task_size_get_the_kernels_errno(kern, call, err):
    h = kern
    mm, a = h.area([0x11, 0x22], mergeable=False)
    vmas = list(mmops.vmas(h.k, mm))
    with pytest.raises(syscalls.SyscallError) as e:
        call(h, mm)
    assert e.value.errno_name == err
    assert list(mmops.vmas(h.k, mm)) == vmas and h.read(mm, a, PAGE_SIZE) == b"\x11" * PAGE_SIZE
