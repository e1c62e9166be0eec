# Variant switches: revert a seed fix by name to get the historical kernel back.
#
# Default behaviour is today's kernel. Each name below restores the code of one
# historical bug (see ../shared/DESIGN.md "Variants"); paths test k.variant(name)
# exactly where the seed commit changed the code. A name starting "fix:" goes the other
# way: it applies a fix that today's kernel does not have, for a race found in today's
# code (docs/bugs/zero-pages-fork.md), so that "fixed" can be shown as well as "broken".
from __future__ import annotations

from collections.abc import Iterable

VARIANTS: dict[str, tuple[int, str]] = {
    "oom-deadlock": (1 << 0, "seed 000 reverted: __ksm_exit takes ksm_thread_mutex, no ksm_test_exit"),
    "munlock-exit-hang": (1 << 1, "seeds 000+001: ksm_exit in the middle of exit_mmap, ksm_test_exit in faults"),
    "mmput-race": (1 << 3, "seed 003 reverted: spin_unlock(ksm_mmlist_lock) before up_read(mmap_lock)"),
    "rmap-no-anon-vma": (1 << 4, "seed 004 reverted: rmap_item keeps no anon_vma, no search_new_forks"),
    "cve-2011-2183": (1 << 5, "2b472611a32a reverted: ksmd does not recheck an emptied mm list"),
    # Seed 002 names four causes; each is its own switch, and the group name reverts all four.
    "stale-stable-nodes:old-nodes": (1 << 6, "seed 002 cause 1: no remove_all_stable_nodes (run=2, knob switch)"),
    "stale-stable-nodes:enter-behind-cursor": (1 << 2, "seed 002 cause 2: __ksm_enter behind the cursor during run=2"),
    "stale-stable-nodes:swapin-no-copy": (1 << 7, "seed 002 cause 3: swap-in during run=2 maps the KSM page again"),
    "stale-stable-nodes:copy-not-uptodate": (1 << 8, "seed 002's extra fix: copy from a !PageUptodate swap page"),
    # Not a revert: a fix today's kernel lacks, for a race ksmlab found in it (a "fix:" name).
    "fix:zero-pages-fork": (1 << 9, "proposed: dup_mmap counts the KSM zero ptes it copies "
                                    "instead of the parent's counter read before mmap_lock"),
}

# Group names: one name for several switches (the whole of one commit).
GROUPS: dict[str, tuple[str, ...]] = {
    "stale-stable-nodes": tuple(n for n in VARIANTS if n.startswith("stale-stable-nodes:")),
}


def proposed_fixes() -> list[str]:
    """The "fix:" switches: ksmlab's proposed fixes for races it found in today's kernel."""
    return [n for n in VARIANTS if n.startswith("fix:")]


def known() -> list[str]:
    """Every name --variant accepts."""
    return [*VARIANTS, *GROUPS]


class Variants:
    """The set of reverted fixes of a run (a bitmask shared by every actor)."""

    def __init__(self, names: Iterable[str] = (), mask: int = 0) -> None:
        for n in names:
            if n not in VARIANTS and n not in GROUPS:
                raise ValueError(f"unknown variant {n!r}; known: {', '.join(known())}")
            mask |= _bits(n)
        self.mask = mask

    def reverted(self, name: str) -> bool:
        """Is this fix reverted (for a group: any of its fixes)?"""
        return bool(self.mask & _bits(name))

    def names(self) -> list[str]:
        """The reverted fixes, a whole group by its group name."""
        out = [g for g, members in GROUPS.items() if self.mask & _bits(g) == _bits(g)]
        covered = {m for g in out for m in GROUPS[g]}
        return out + [n for n, (bit, _doc) in VARIANTS.items() if self.mask & bit and n not in covered]


def _bits(name: str) -> int:
    if name in GROUPS:
        m = 0
        for n in GROUPS[name]:
            m |= VARIANTS[n][0]
        return m
    return VARIANTS[name][0]
