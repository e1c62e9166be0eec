# Swap entries: the swap area, swap_free/swap_duplicate and do_swap_page.
#
# (Reclaim and swap-in are built in the lifecycle work; until a run is booted with
# swap slots, no pte ever holds a swap entry and none of this is reached.)
from __future__ import annotations

from actors.kernel.context import Kernel


def swap_free(k: Kernel, slot: int) -> None:
    raise RuntimeError(f"BUG: swap entry {slot} found but this run has no swap area")


def swap_duplicate(k: Kernel, slot: int) -> None:
    raise RuntimeError(f"BUG: swap entry {slot} found but this run has no swap area")


def do_swap_page(k: Kernel, mm: int, vma: int, addr: int, pte: int, flags: int) -> int:
    raise RuntimeError(f"BUG: swap pte {pte:#x} at {addr:#x} but this run has no swap area")
