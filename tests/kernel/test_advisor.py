# The scan-time advisor (actors/kernel/advisor.py) against mm/ksm.c's arithmetic.
#
# Each test times a pass with the fake clock: the first batch starts it
# (advisor_start_scan), the clock and ksmd's CPU time move, and the rest of the pass ends
# it (advisor_stop_scan -> scan_time_advisor). The expected values are worked out by hand
# from the kernel's integer formulas, written next to each assertion.
from __future__ import annotations

from actors.kernel import sysfs

SEC = 1_000_000_000
MS = 1_000_000


def _timed_pass(kern, seconds: float, cpu_ms: int) -> None:
    kern.scan(1)                          # the pass starts: advisor_start_scan()
    kern.clock.ns += int(seconds * SEC)
    kern.clock.cpu_ns += cpu_ms * MS
    kern.full_scan()                      # ... and ends: advisor_stop_scan()


def _advisor(kern) -> list[dict]:
    return kern.fields("ksm_advisor")


def _scan_time_mode(kern, **knobs: int) -> None:
    for name, value in knobs.items():
        sysfs.store(kern.k, name, str(value))
    sysfs.store(kern.k, "advisor_mode", "scan-time")


def test_two_passes_follow_the_kernel_formula(kern):
    kern.area([1, 2, 3, 4])
    _scan_time_mode(kern)                 # pages_to_scan = advisor_min_pages_to_scan = 500
    assert sysfs.show(kern.k, "pages_to_scan") == "500"
    # Pass 1: 10 s, 5 s of CPU. cpu% = 5000*100/10000 = 50; factor = 200*100/10 = 2000;
    # change = ewma(0, 10*100/10) = 30; pages = 500*100/2000*30/100 = 7;
    # per_page_cost = 500/50 = 10; clamped to [10*10, 10*70]: 100.
    _timed_pass(kern, 10, 5000)
    assert _advisor(kern) == [{"scan_time": 10, "pages_to_scan": 100, "cpu_percent": 50}]
    assert sysfs.show(kern.k, "pages_to_scan") == "100"
    # Pass 2: 5 s, 2.5 s of CPU. cpu% = 50; factor = 4000; change = ewma(30, 5*100/10) = 36;
    # pages = 100*100/4000*36/100 = 0; per_page_cost = 100/50 = 2; raised to 2*10: 20.
    _timed_pass(kern, 5, 2500)
    assert _advisor(kern)[-1] == {"scan_time": 5, "pages_to_scan": 20, "cpu_percent": 50}
    assert int(kern.k.ksm["advisor_change"]) == 36


def test_a_slow_pass_grows_the_batch_up_to_advisor_max_pages_to_scan(kern):
    kern.area([1, 2])
    _scan_time_mode(kern, advisor_target_scan_time=1, advisor_max_pages_to_scan=1000)
    # 10 s against a 1 s target, 1 s of CPU: cpu% = 10; factor = 1*100/10 = 10;
    # pages = 500*100/10*30/100 = 1500; per_page_cost = 50, range [500, 3500]: 1500;
    # then advisor_max_pages_to_scan: 1000.
    _timed_pass(kern, 10, 1000)
    assert _advisor(kern)[-1]["pages_to_scan"] == 1000


def test_advisor_max_cpu_caps_the_batch(kern):
    kern.area([1, 2])
    _scan_time_mode(kern, advisor_target_scan_time=1, advisor_max_cpu=20)
    # As above but max_cpu 20: per_page_cost 50 * 20 = 1000 caps 1500.
    _timed_pass(kern, 10, 1000)
    assert _advisor(kern)[-1]["pages_to_scan"] == 1000


def test_a_pass_under_a_second_counts_as_one_second_and_idle_cpu_as_one_percent(kern):
    kern.area([1, 2])
    _scan_time_mode(kern)
    # scan_time 0 -> 1; cpu% 0 -> 1; factor = 20000; change = 30; pages = 500*100/20000 = 2,
    # *30/100 = 0; per_page_cost = 500; range [5000, 35000]: 5000; max_pages 30000: 5000.
    _timed_pass(kern, 0.2, 0)
    assert _advisor(kern)[-1] == {"scan_time": 1, "pages_to_scan": 5000, "cpu_percent": 1}


def test_without_the_advisor_a_pass_leaves_pages_to_scan_alone(kern):
    kern.area([1, 2])
    sysfs.store(kern.k, "pages_to_scan", "123")
    _timed_pass(kern, 10, 5000)
    assert _advisor(kern) == []
    assert sysfs.show(kern.k, "pages_to_scan") == "123"


def test_a_mode_change_resets_the_advisor_state(kern):
    kern.area([1, 2])
    _scan_time_mode(kern)
    _timed_pass(kern, 10, 5000)
    assert int(kern.k.ksm["advisor_scan_time"]) == 10
    sysfs.store(kern.k, "advisor_mode", "none")
    assert sysfs.show(kern.k, "pages_to_scan") == "100"       # DEFAULT_PAGES_TO_SCAN
    sysfs.store(kern.k, "advisor_mode", "scan-time")
    assert sysfs.show(kern.k, "pages_to_scan") == "500"
    assert [int(kern.k.ksm[f]) for f in ("advisor_scan_time", "advisor_change", "advisor_cpu_time")] == [0, 0, 0]
    # The first pass after the reset has no previous pass (change = ewma(0, 100) = 30
    # again), and its CPU time counts from zero, as the kernel's zeroed advisor_ctx does:
    # 10 s of CPU in 10 s is 100%; per_page_cost = 5; pages = 7, raised to 5*10 = 50.
    _timed_pass(kern, 10, 5000)
    assert _advisor(kern)[-1] == {"scan_time": 10, "pages_to_scan": 50, "cpu_percent": 100}
