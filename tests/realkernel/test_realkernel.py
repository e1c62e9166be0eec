# Checks the workload expectation model: fast arithmetic tests of Workload.expected() (always
# run), and opt-in tests (--realkernel / KSMLAB_REALKERNEL=1) that run each standard workload on
# this machine's real KSM and require the kernel's converged counters to equal the model.
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from ksmlab.realkernel import (
    COUNTERS,
    ForeignMergeableMemory,
    KernelRun,
    KsmError,
    KsmKnobs,
    _Children,
    read_counters,
    read_knobs,
    run_workload,
    run_workload_report,
)
from ksmlab.workloads import (
    PAGE_SIZE,
    STANDARD_KNOBS,
    STANDARD_MIXES,
    Workload,
    content_counters,
    from_counts,
    mix,
    page_bytes,
    run_label,
    standard_mix,
    standard_runs,
)

# ---------------------------------------------------------------------------------------------
# Workload.expected() arithmetic (no kernel needed)

# (n copies, max_page_sharing) -> (shared, sharing, unshared); the first four are the
# assert_ksm_pages_count() cases of tools/testing/selftests/mm/ksm_tests.c.
FORMULA_CASES = [
    (10, 256, (1, 9, 0)),
    (10, 4, (3, 7, 0)),
    (9, 4, (2, 6, 1)),
    (8, 4, (2, 6, 0)),
    (1, 256, (0, 0, 1)),
    (2, 256, (1, 1, 0)),
    (2, 2, (1, 1, 0)),
    (3, 2, (1, 1, 1)),
    (5, 4, (1, 3, 1)),
    (257, 256, (1, 255, 1)),
    (258, 256, (2, 256, 0)),
    (512, 256, (2, 510, 0)),
]


@pytest.mark.parametrize(("n", "mps", "want"), FORMULA_CASES)
def test_content_counters_formula(n: int, mps: int, want: tuple[int, int, int]) -> None:
    assert content_counters(n, mps) == want


@pytest.mark.parametrize(("n", "mps", "want"), FORMULA_CASES)
def test_expected_single_content(n: int, mps: int, want: tuple[int, int, int]) -> None:
    w = Workload("one", ((7,) * n,))
    e = w.expected(max_page_sharing=mps)
    assert (e["pages_shared"], e["pages_sharing"], e["pages_unshared"]) == want
    assert e["stable_node_dups"] == (want[0] if want[0] >= 2 else 0)
    assert e["stable_node_chains"] == (1 if want[0] >= 2 else 0)


def test_expected_counts_across_processes() -> None:
    w = Workload("x", ((1, 2, 3), (1, 2, 4), (1, 5, 5)))
    e = w.expected()
    # 1: 3 copies -> 1/2, 2: 2 copies -> 1/1, 5: 2 copies (same process) -> 1/1, 3 and 4 unshared
    assert e["pages_shared"] == 3
    assert e["pages_sharing"] == 4
    assert e["pages_unshared"] == 2


def test_expected_zero_pages() -> None:
    w = Workload("zeros", ((0,) * 10,))  # ksm_tests -Z -p 10
    assert w.expected(use_zero_pages=False)["pages_shared"] == 1
    assert w.expected(use_zero_pages=False)["pages_sharing"] == 9
    e = w.expected(use_zero_pages=True)
    assert (e["pages_shared"], e["pages_sharing"], e["pages_unshared"]) == (0, 0, 0)
    assert e["ksm_zero_pages"] == 10
    lone = Workload("lone", ((0, 1),))
    assert lone.expected(use_zero_pages=False)["pages_unshared"] == 2
    e = lone.expected(use_zero_pages=True)
    assert (e["pages_unshared"], e["ksm_zero_pages"]) == (1, 1)


def test_expected_rejects_bad_mps() -> None:
    with pytest.raises(ValueError):
        Workload("w", ((1, 1),)).expected(max_page_sharing=1)


def test_page_bytes() -> None:
    assert page_bytes(0) == bytes(PAGE_SIZE)
    pages = [page_bytes(c) for c in range(1, 200)]
    assert all(len(p) == PAGE_SIZE for p in pages)
    assert len({p[:8] for p in pages}) == len(pages)
    assert all(any(p) for p in pages)
    assert page_bytes(5) == Workload("w", ((5,),)).page_bytes(5)
    page_bytes.cache_clear()
    assert page_bytes(5) == pages[4]


def test_process_image() -> None:
    w = Workload("w", ((3, 0, 3),))
    img = w.process_image(0)
    assert img == page_bytes(3) + bytes(PAGE_SIZE) + page_bytes(3)


def test_mix_deterministic_and_shaped() -> None:
    a = mix(
        "m", 4, dup_contents=10, copies_per_content=3, unique_per_proc=5, zero_per_proc=2, seed=9
    )
    b = mix(
        "m", 4, dup_contents=10, copies_per_content=3, unique_per_proc=5, zero_per_proc=2, seed=9
    )
    c = mix(
        "m", 4, dup_contents=10, copies_per_content=3, unique_per_proc=5, zero_per_proc=2, seed=8
    )
    assert a == b
    assert a != c
    assert a.n_procs == 4
    assert a.total_pages == 10 * 3 + 4 * 5 + 4 * 2
    counts = a.content_counts()
    assert counts[0] == 8
    assert all(counts[cid] == 3 for cid in range(1, 11))
    assert sum(1 for cid, n in counts.items() if cid > 10 and n == 1) == 20
    # copies are spread: each duplicated content lives in 3 different processes
    for cid in range(1, 11):
        assert sum(1 for p in a.processes if cid in p) == 3


def test_from_counts() -> None:
    w = from_counts("f", [{1: 3, 2: 1}, {1: 2}], seed=0)
    assert sorted(w.processes[0]) == [1, 1, 1, 2]
    assert w.processes[1] == (1, 1)


def test_standard_mixes_shape() -> None:
    names = [w.name for w in STANDARD_MIXES]
    assert len(names) >= 3
    assert len(set(names)) == len(names)
    assert set(STANDARD_KNOBS) == set(names)
    for w in STANDARD_MIXES:
        assert 100 <= w.total_pages <= 5000
    intra = standard_mix("intra-dup-2p")
    mps = STANDARD_KNOBS["intra-dup-2p"]["max_page_sharing"]
    assert max(intra.content_counts().values()) > mps




@pytest.mark.parametrize("run", standard_runs(), ids=run_label)
def test_expected_conserves_pages(run: tuple[Workload, dict[str, int]]) -> None:
    w, knobs = run
    e = w.expected(**knobs)
    accounted = sum(e[k] for k in ("pages_shared", "pages_sharing", "pages_unshared"))
    assert accounted + e["ksm_zero_pages"] == w.total_pages


# ---------------------------------------------------------------------------------------------
# Real kernel (opt-in)

MODEL_KEYS = (
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "ksm_zero_pages",
    "stable_node_chains",
    "stable_node_dups",
)


def _run(w: Workload, **knobs: int) -> KernelRun:
    try:
        return run_workload_report(w, timeout=30, **knobs)
    except ForeignMergeableMemory as e:
        pytest.skip(f"cannot measure: {e}")


@pytest.mark.realkernel
@pytest.mark.timeout(60)
@pytest.mark.parametrize("run", standard_runs(), ids=run_label)
def test_standard_mix_matches_kernel(
    run: tuple[Workload, dict[str, int]], record_property: pytest.RecordProperty
) -> None:
    w, knobs = run
    t0 = time.monotonic()
    r = _run(w, **knobs)
    wall = time.monotonic() - t0
    want = w.expected(**knobs)
    got = {k: r.counters[k] for k in MODEL_KEYS}
    record_property("counters", got)
    record_property("wall_seconds", round(wall, 3))
    print(f"{run_label(run)}: pages={w.total_pages} got={got} wall={wall:.2f}s")
    assert (got["pages_shared"], got["pages_sharing"], got["pages_unshared"]) == (
        want["pages_shared"],
        want["pages_sharing"],
        want["pages_unshared"],
    )
    assert got == want
    assert r.counters["pages_volatile"] == 0
    # per-process view agrees: every KSM-mapped page of ours is shared or sharing
    merging = sum(int(s["ksm_merging_pages"]) for s in r.proc_stats)
    assert merging == want["pages_shared"] + want["pages_sharing"]
    assert sum(int(s["ksm_zero_pages"]) for s in r.proc_stats) == want["ksm_zero_pages"]
    assert wall < 20


# single-content workloads of the kernel's own ksm_tests.c (-M, -Z) and formula cases
KERNEL_TEST_CASES = [
    ("merge-10", (1,) * 10, {}),
    ("zero-10-uzp0", (0,) * 10, {"use_zero_pages": 0}),
    ("zero-10-uzp1", (0,) * 10, {"use_zero_pages": 1}),
    ("n10-mps4", (1,) * 10, {"max_page_sharing": 4}),
    ("n9-mps4", (1,) * 9, {"max_page_sharing": 4}),
    ("n8-mps4", (1,) * 8, {"max_page_sharing": 4}),
    ("n5-mps4", (1,) * 5, {"max_page_sharing": 4}),
    ("n3-mps2", (1,) * 3, {"max_page_sharing": 2}),
]


@pytest.mark.realkernel
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("name", "pages", "knobs"), KERNEL_TEST_CASES, ids=[c[0] for c in KERNEL_TEST_CASES]
)
def test_kernel_formula_cases(name: str, pages: tuple[int, ...], knobs: dict[str, int]) -> None:
    w = Workload(name, (pages,))
    r = _run(w, **knobs)
    assert {k: r.counters[k] for k in MODEL_KEYS} == w.expected(**knobs)


@pytest.mark.realkernel
@pytest.mark.timeout(30)
def test_run_workload_returns_every_counter() -> None:
    w = Workload("tiny", ((1, 1, 2), (1, 3)))
    try:
        c = run_workload(w, timeout=20)
    except ForeignMergeableMemory as e:
        pytest.skip(f"cannot measure: {e}")
    assert set(COUNTERS) <= set(c)
    assert (c["pages_shared"], c["pages_sharing"], c["pages_unshared"]) == (1, 2, 2)
    # left behind: nothing merged any more
    now = read_counters()
    assert now["pages_shared"] == now["pages_sharing"] == 0


def _scribble(k: KsmKnobs) -> None:
    k["run"] = 2
    if "advisor_mode" in k.saved:
        k["advisor_mode"] = "scan-time" if k.saved["advisor_mode"] == "none" else "none"
        k["advisor_mode"] = "none"  # pages_to_scan is EINVAL under the advisor
    k["sleep_millisecs"] = 7
    k["pages_to_scan"] = 1234
    k["max_page_sharing"] = 5
    k["use_zero_pages"] = 1 - int(k.saved["use_zero_pages"])
    if "smart_scan" in k.saved:
        k["smart_scan"] = 1 - int(k.saved["smart_scan"])
    k["stable_node_chains_prune_millisecs"] = 1111
    k["run"] = 1


@pytest.mark.realkernel
@pytest.mark.timeout(30)
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_knobs_restored_on_exception(exc: type[BaseException]) -> None:
    before = read_knobs()
    with pytest.raises(exc), KsmKnobs() as k:
        _scribble(k)
        assert read_knobs() != before
        raise exc("boom")
    assert read_knobs() == before


@pytest.mark.realkernel
@pytest.mark.timeout(30)
def test_knobs_restored_while_pages_are_shared() -> None:
    """Leaving KsmKnobs while KSM pages exist: max_page_sharing needs run=2 first (EBUSY)."""
    before = read_knobs()
    w = Workload("held", ((1,) * 20,))
    kids = _Children([w.process_image(0)])
    try:
        with KsmKnobs() as k:
            k["run"] = 2
            k["max_page_sharing"] = 3
            k["sleep_millisecs"] = 0
            if "advisor_mode" in k.saved:
                k["advisor_mode"] = "none"
            k["pages_to_scan"] = 100
            kids.start()
            kids.wait_ready(time.monotonic() + 10)
            k["run"] = 1
            deadline = time.monotonic() + 10
            while read_counters()["pages_shared"] < 7 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert read_counters()["pages_shared"] == 7  # 20 % 3 == 2 -> 20 // 3 + 1
            # leave the block with the pages still merged and the workers alive
        assert read_knobs() == before
        assert read_counters()["pages_shared"] == 0
    finally:
        kids.stop(grace=2.0)


@pytest.mark.realkernel
@pytest.mark.timeout(30)
def test_timeout_kills_workers() -> None:
    w = standard_mix("wide-8p")
    with pytest.raises(TimeoutError):
        run_workload(w, timeout=0.001)
    # the autouse fixtures check that no worker survived and every knob is back


@pytest.mark.realkernel
@pytest.mark.timeout(30)
def test_bad_knob_value_raises_and_restores() -> None:
    with pytest.raises(KsmError):
        run_workload(Workload("w", ((1, 1),)), max_page_sharing=1, timeout=10)


@pytest.mark.realkernel
@pytest.mark.timeout(30)
def test_timeout_while_scanning_kills_workers() -> None:
    # ksmd asleep for 100 s after each 1-page batch: the 2 full scans never come
    w = standard_mix("dup-only-3p")
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        run_workload(w, pages_to_scan=1, sleep_millisecs=100_000, timeout=1.0)
    assert time.monotonic() - t0 < 10


@pytest.mark.realkernel
@pytest.mark.timeout(30)
def test_keyboard_interrupt_during_run_restores_everything() -> None:
    w = standard_mix("dup-only-3p")
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_workload(w, pages_to_scan=1, sleep_millisecs=100_000, timeout=20)
    finally:
        timer.cancel()
    assert read_counters()["pages_shared"] == 0
