# The race-lab bugs in the simulator: found with their variant, absent from today's code.
#
# For each scenario of ksmlab/sim/scenarios.py: with the bug's fix reverted, the
# depth-first search finds a report of one of the kinds the race lab expects of that bug
# (ksmlab/stress.py BUGS), and the printed schedule replays to the same report and the
# same ops, twice; with today's code the search to two preemptions is exhaustive and
# reports nothing (the closing note quotes the counts). A race found in today's code
# (zero-pages-fork) goes the other way: today's code reports it, its proposed "fix:"
# variant is clean. The two timing races of the
# seeds are also checked interleaving by interleaving against the commits' own tables.
from __future__ import annotations

import pytest

from actors.kernel.variants import Variants
from ksmlab.sim.scenarios import SCENARIOS
from ksmlab.sim.search import minimize, replay, search
from ksmlab.sim.world import World
from ksmlab.stress import BUGS
from shared_mem.segment import list_segments

pytestmark = [pytest.mark.timeout(120)]


def world_of(name: str, variants: list[str]) -> World:
    return World(SCENARIOS[name], Variants(variants))


def replayed(name: str, schedule: str, variants: list[str] | None = None):
    """One schedule of a scenario replayed in a world of its own (closed afterwards)."""
    w = world_of(name, variants or [])
    try:
        return replay(w, schedule)
    finally:
        w.close()


def _expected_kinds(bug: str) -> tuple[str, ...]:
    b = BUGS.get(bug) or BUGS[bug.split(":")[0]]
    return b.kinds


@pytest.mark.parametrize("name", [n for n, s in SCENARIOS.items() if s.broken() is not None])
def test_the_variant_is_found_and_its_schedule_replays_exactly(name):
    sc = SCENARIOS[name]
    w = world_of(name, sc.broken())
    try:
        r = search(w, "dfs", schedules=5000, bound=2)
        assert r.first is not None, f"{name}: no report within {r.schedules} schedules"
        if sc.finding:     # found in today's kernel: its own report, not a race-lab bug's kind
            assert r.first.title == sc.finding
        else:
            assert r.first.report_kind in _expected_kinds(sc.bug), r.first.title
        a, b = replay(w, r.first.schedule), replay(w, r.first.schedule)
        assert a.failure["title"] == b.failure["title"] == r.first.title
        assert a.trace == b.trace and a.events == b.events and a.events
        small = minimize(w, r.first.schedule)
        assert replay(w, small, record=False).failure["title"] == r.first.title
    finally:
        w.close()
    assert not list_segments(w.run_id)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_todays_code_has_no_report_within_the_bound(name):
    """Today's code, or for a race found in it, today's code with the proposed fix."""
    w = world_of(name, SCENARIOS[name].clean())
    bound = SCENARIOS[name].ci_bound
    try:
        r = search(w, "dfs", schedules=20000, bound=bound)
        assert r.first is None, f"{name}: {r.first.title} with schedule {r.first.schedule}"
        assert r.exhaustive, f"{name}: {r.schedules} schedules were not enough to exhaust P={bound}"
    finally:
        w.close()


def minimal_failure(name: str):
    """The variant's first failing schedule within one preemption, minimized and replayed."""
    w = world_of(name, [SCENARIOS[name].bug])
    try:
        r = search(w, "dfs", schedules=1000, bound=1)
        return replay(w, minimize(w, r.first.schedule))
    finally:
        w.close()


def _ops(res, ctx: str) -> list[str]:
    tid = res.names.index(ctx)
    return [f"{w}({d})" if d else w for _s, t, w, d in res.trace if t == tid]


def test_mmput_race_is_seed_003s_interleaving():
    """The commit's table, as the failing schedule runs it:

        CPU0: ksmd (scan_get_next_rmap_item)      CPU1: exit of the mm's owner
        spin_lock(ksm_mmlist_lock)
        ksm_scan.mm_slot = next slot
        spin_unlock(ksm_mmlist_lock)   (2016)
        -- preempted --                           __ksm_exit: slot not at the cursor,
                                                  no rmap_items: free slot, mmdrop
                                                  exit_mmap (no mmap_lock), mmdrop: mm freed
        up_read(&mm->mmap_lock): use-after-free
    """
    res = minimal_failure("mmput-race")
    assert res.failure["title"] == "BUG: KASAN: use-after-free in up_read"
    assert res.failure["ctx"] == "ksmd"
    ksmd = _ops(res, "ksmd")
    # ksmd had dropped ksm_mmlist_lock and not yet done up_read when it lost the CPU.
    assert ksmd[-2:] == ["unlock(ksm_mmlist_lock)", "point(scan_get_next_rmap_item.before_up_read)"]
    exit_ev = [e for _s, _t, ctx, e, _f in res.events if ctx == "exit:victim"]
    assert "ksm_exit" in exit_ev and "mm_free" in exit_ev, exit_ev
    # The whole exit ran after ksmd's last op (the window) and before its up_read.
    window = max(s for s, t, _w, _d in res.trace if t == 0)
    exit_steps = [s for s, t, _w, _d in res.trace if t == 1]
    assert exit_steps and min(exit_steps) > window


def test_cve_2011_2183_is_the_emptied_list_interleaving():
    """    CPU0: ksmd                                 CPU1: exit of the last mm
        list_empty(&ksm_mm_head)? no
        -- preempted --                           __ksm_exit: last slot, no rmap_items: freed
        spin_lock(ksm_mmlist_lock)
        slot = ksm_mm_head.next (the head)
        mm = slot->mm (NULL): NULL pointer dereference
    """
    res = minimal_failure("cve-2011-2183")
    assert res.failure["title"].startswith("BUG: kernel NULL pointer dereference, mm in scan_get_next_rmap_item")
    ksmd = _ops(res, "ksmd")
    i = ksmd.index("point(scan_get_next_rmap_item.before_cursor_advance)")
    assert ksmd[i + 1] == "lock(ksm_mmlist_lock)"
    # ksmd lost the CPU at its spin_lock, and the whole exit (its __ksm_exit fast path
    # included) ran before ksmd took the lock and moved the cursor onto the head.
    steps0 = [s for s, t, _w, _d in res.trace if t == 0]
    lock_step = steps0[i + 1]
    after = steps0[i + 2]
    exit_steps = [s for s, t, _w, _d in res.trace if t == 1]
    assert exit_steps and all(lock_step < s < after for s in exit_steps)
    assert "ksm_exit" in [e for _s, _t, ctx, e, _f in res.events if ctx == "exit:victim"]


@pytest.mark.parametrize("strategy", ["pct", "random"])
def test_sampling_strategies_find_the_seed_races_too(strategy):
    for name in ("cve-2011-2183", "stale-stable-nodes", "stale-stable-nodes-swapin"):
        w = world_of(name, [SCENARIOS[name].bug])
        try:
            r = search(w, strategy, seed=3, schedules=2000)
            assert r.first is not None, f"{strategy} found nothing in {name} within {r.schedules} schedules"
        finally:
            w.close()


def test_the_same_seed_gives_the_same_events_twice():
    """trio's test: a seeded run is a function of its seed (here pct's, on a real scenario)."""
    from ksmlab.sim.strategies import PCT

    w = world_of("stale-stable-nodes", ["stale-stable-nodes:enter-behind-cursor"])
    try:
        runs = [w.run(PCT(seed, 3, 400), record=True) for seed in (5, 5, 6)]
    finally:
        w.close()
    a, b, c = runs
    assert a.events and a.events == b.events and a.trace == b.trace
    assert (a.failure or {}).get("title") == (b.failure or {}).get("title")
    assert c.trace != a.trace          # another seed is another schedule


def test_reclaim_against_exit_rechecks_the_anon_vma_under_its_lock():
    """A model race the soak found (KASAN in anon_vma_walk), kept as a scenario:

        CPU0: kswapd (shrink_page -> try_to_unmap)   CPU1: exit of the page's only mapper
        page locked, in the swap cache, mapped
        page->mapping -> anon_vma A
        down_read(A's lock)  -- preempted --
                                                     exit_mmap: zap the pte (mapcount 0)
                                                     unlink the vma; A has no vmas: free A
        (took A's slot lock) walk A's vma list: use-after-free, before the fix

    folio_lock_anon_vma_read() takes the lock of the slot (typesafe by RCU) and checks
    under it that the page is still mapped: here it is not, so kswapd walks nothing.
    """
    res = replayed("reclaim-exit", "v1:7>1")
    assert res.failure is None, res.failure
    kswapd = _ops(res, "kswapd")
    assert "down_read(anon_vma_lock[0])" in kswapd
    down = next(s for s, t, wh, _d in res.trace if t == 0 and wh == "down_read")
    exit_steps = [s for s, t, _w, _d in res.trace if t == 1]
    # The whole exit, the mm's (and so the anon_vma's) free included, ran inside
    # kswapd's window, before it had the lock.
    assert exit_steps and min(exit_steps) > down
    assert "mm_free" in [e for _s, _t, ctx, e, _f in res.events if ctx == "exit:t"]


def test_reclaim_against_a_vma_split_finds_the_page_in_one_half_or_the_other():
    """A model race a fixed guided soak found (Bad page map: "the rmap walk of this anon
    page missed 1 of 1 pte(s)", in a vma with no anon_vma), kept as a scenario:

        CPU0: kswapd (shrink_page -> try_to_unmap)   CPU1: mprotect of part of the vma
        page locked, in the swap cache, mapped
        down_read(anon_vma)  -- preempted --
                                                     down_write(mmap_lock)
                                                     split: the old vma ends at addr
                                                     down_write(anon_vma) -- preempted --
        walk: no vma on the list covers the page     (the new upper vma not yet linked)

    Before the fix vma_split() shrank the old vma first and linked the new one after, so
    schedule v1:7>1,11>0 missed the pte. Now, as __split_vma does, the new vma joins the
    anon_vma first and the old one shrinks under the anon_vma's write lock: the same
    schedule walks to the page."""
    res = replayed("reclaim-split", "v1:7>1,11>0")
    assert res.failure is None, res.failure
    assert any(e == "try_to_unmap_one" for _s, _t, ctx, e, _f in res.events if ctx == "kswapd")
    # (No schedule within two preemptions reports: test_todays_code_has_no_report_within_the_bound.)
