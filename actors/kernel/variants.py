# Variant switches: revert a seed fix by name to get the historical kernel back.
#
# Default behaviour is today's kernel. Each name below restores the code of one
# historical bug (see ../shared/DESIGN.md "Variants"); paths test k.variant(name)
# exactly where the seed commit changed the code.
from __future__ import annotations

from collections.abc import Iterable

VARIANTS: dict[str, tuple[int, str]] = {
    "oom-deadlock": (1 << 0, "seed 000 reverted: __ksm_exit takes ksm_thread_mutex, no ksm_test_exit"),
    "munlock-exit-hang": (1 << 1, "seeds 000+001: ksm_exit in the middle of exit_mmap, ksm_test_exit in faults"),
    "stale-stable-nodes": (1 << 2, "seed 002 reverted: no remove_all_stable_nodes, no UNMERGE tail insert/copy"),
    "mmput-race": (1 << 3, "seed 003 reverted: spin_unlock(ksm_mmlist_lock) before up_read(mmap_lock)"),
    "rmap-no-anon-vma": (1 << 4, "seed 004 reverted: rmap_item keeps no anon_vma, no search_new_forks"),
    "cve-2011-2183": (1 << 5, "2b472611a32a reverted: ksmd does not recheck an emptied mm list"),
}


class Variants:
    """The set of reverted fixes of a run (a bitmask shared by every actor)."""

    def __init__(self, names: Iterable[str] = (), mask: int = 0) -> None:
        for n in names:
            if n not in VARIANTS:
                raise ValueError(f"unknown variant {n!r}; known: {', '.join(VARIANTS)}")
            mask |= VARIANTS[n][0]
        self.mask = mask

    def reverted(self, name: str) -> bool:
        return bool(self.mask & VARIANTS[name][0])

    def names(self) -> list[str]:
        return [n for n, (bit, _doc) in VARIANTS.items() if self.mask & bit]
