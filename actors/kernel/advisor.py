# The scan-time advisor: ksmd tunes its own pages_to_scan after every full pass.
#
# What it models. mm/ksm.c's advisor (Stefan Roesch, "mm/ksm: add ksm advisor", v6.8):
# with advisor_mode=scan-time, the pass that just ended is timed, and the next batch size
# is the current one scaled by how far the pass was from advisor_target_scan_time,
# smoothed by an exponentially weighted moving average of the change from the pass
# before, then clamped by what ksmd's CPU use allows (between KSM_ADVISOR_MIN_CPU and
# advisor_max_cpu percent, at the cost per page the last pass measured) and by
# advisor_max_pages_to_scan. The arithmetic is the kernel's integer arithmetic, step by
# step, with its "x ? x : 1" guards, so that the same times give the same pages_to_scan.
#
# Why it is shaped so. Time comes through the Clock seam only: wall time is
# `monotonic_ns` (ktime_get) and ksmd's CPU time is `cpu_time_ns`
# (task_sched_runtime(current)), so the simulator and the tests give the advisor any
# times they like. Its state (struct advisor_ctx) lives in the shared ksm record, so a
# mode change from the sysfs writer resets what ksmd reads, as the kernel's static does.
from __future__ import annotations

from actors.kernel.context import Kernel

KSM_ADVISOR_NONE, KSM_ADVISOR_SCAN_TIME = 0, 1
KSM_ADVISOR_MIN_CPU = 10     # percent; a constant in the kernel, not a knob
EWMA_WEIGHT = 30
DEFAULT_PAGES_TO_SCAN = 100
MSEC_PER_SEC = 1000
NSEC_PER_MSEC = 1_000_000

# The advisor's unsigned long knobs: the int64 field of the ksm record holds the bit
# pattern, and a read shows it unsigned (sysfs.knob reads them through ulong_knob too).
ULONG_KNOBS = frozenset({"advisor_min_pages_to_scan", "advisor_max_pages_to_scan", "advisor_target_scan_time"})
U64 = (1 << 64) - 1
U32 = (1 << 32) - 1          # ksm_thread_pages_to_scan is an unsigned int


def ulong_knob(k: Kernel, name: str) -> int:
    return int(k.ksm[name]) & U64


def _reset_ctx(k: Kernel) -> None:
    for field in ("advisor_start_scan", "advisor_scan_time", "advisor_change", "advisor_cpu_time"):
        k.ksm[field] = 0


def set_advisor_defaults(k: Kernel) -> None:
    """A mode change: pages_to_scan back to its default, or to the advisor's minimum with
    a fresh advisor_ctx."""
    if int(k.ksm["advisor_mode"]) == KSM_ADVISOR_NONE:
        k.ksm["pages_to_scan"] = DEFAULT_PAGES_TO_SCAN
    else:
        _reset_ctx(k)
        k.ksm["pages_to_scan"] = ulong_knob(k, "advisor_min_pages_to_scan") & U32


def advisor_start_scan(k: Kernel) -> None:
    if int(k.ksm["advisor_mode"]) == KSM_ADVISOR_SCAN_TIME:
        k.ksm["advisor_start_scan"] = k.clock.monotonic_ns()


def prev_scan_time(k: Kernel, scan_time: int) -> int:
    """The last pass's time, or this one's when there was none."""
    prev = int(k.ksm["advisor_scan_time"])
    return prev if prev else scan_time


def ewma(prev: int, curr: int) -> int:
    return ((100 - EWMA_WEIGHT) * prev + EWMA_WEIGHT * curr) // 100


def scan_time_advisor(k: Kernel) -> int:
    """Set pages_to_scan from the pass that just ended; returns the new value."""
    ksm = k.ksm
    now = k.clock.monotonic_ns()
    scan_time = (now - int(ksm["advisor_start_scan"])) // NSEC_PER_MSEC // MSEC_PER_SEC
    scan_time = scan_time if scan_time > 0 else 1

    cpu_time = k.clock.cpu_time_ns()
    cpu_time_diff_ms = max(cpu_time - int(ksm["advisor_cpu_time"]), 0) // NSEC_PER_MSEC
    cpu_percent = (cpu_time_diff_ms * 100) // (scan_time * 1000) & U32
    cpu_percent = cpu_percent or 1
    last_scan_time = prev_scan_time(k, scan_time)

    # The pass's time as a percentage of the target, then of the last pass, smoothed.
    factor = ulong_knob(k, "advisor_target_scan_time") * 100 // scan_time & U64 or 1
    change = scan_time * 100 // last_scan_time or 1
    change = ewma(int(ksm["advisor_change"]), change)

    pages_to_scan = int(ksm["pages_to_scan"]) & U32
    pages = pages_to_scan * 100 // factor
    pages = pages * change // 100 & U64

    per_page_cost = pages_to_scan // cpu_percent or 1
    pages = min(pages, per_page_cost * (int(ksm["advisor_max_cpu"]) & U32))
    pages = max(pages, per_page_cost * KSM_ADVISOR_MIN_CPU)
    pages = min(pages, ulong_knob(k, "advisor_max_pages_to_scan"))

    ksm["advisor_change"] = change
    ksm["advisor_scan_time"] = scan_time
    ksm["advisor_cpu_time"] = cpu_time
    ksm["pages_to_scan"] = pages & U32
    k.ev("ksm_advisor", scan_time=scan_time, pages_to_scan=pages & U32, cpu_percent=cpu_percent)
    return pages & U32


def advisor_stop_scan(k: Kernel) -> None:
    if int(k.ksm["advisor_mode"]) == KSM_ADVISOR_SCAN_TIME:
        scan_time_advisor(k)
