# /sys/kernel/mm/ksm: every knob with its default, parsing and error codes, and every
# counter with the kernel's definition.
#
# Store handlers follow mm/ksm.c: kstrtouint/kstrtobool parsing (EINVAL on junk),
# run > 2 is EINVAL, run=2 unmerges everything under ksm_thread_mutex with the writing
# task as the OOM origin (oom.set_current_oom_origin, the task given to store())
# and on failure leaves run=0 and returns the error, merge_across_nodes and
# max_page_sharing give EBUSY while pages are shared or a stable node is still in
# use (remove_all_stable_nodes, seed 002), pages_to_scan is EINVAL while the
# scan-time advisor drives it. Reads are lock-free, as in the kernel.
from __future__ import annotations

from collections.abc import Callable

from actors.kernel import debug
from actors.kernel import mm as mmops
from actors.kernel.advisor import ULONG_KNOBS, set_advisor_defaults, ulong_knob
from actors.kernel.context import Kernel
from actors.kernel.ksm_mm import mm_flags, wake_ksmd
from actors.kernel.ksm_scan import (
    KSM_RUN_MERGE,
    KSM_RUN_STOP,
    KSM_RUN_UNMERGE,
    unmerge_and_remove_all_rmap_items,
)
from actors.kernel.oom import clear_current_oom_origin, set_current_oom_origin
from actors.kernel.stable_tree import remove_all_stable_nodes
from actors.kernel.syscalls import _ERRNO
from shared_mem.layout import MMF_VM_MERGE_ANY, VM_MERGEABLE

PAGE_SIZE = 4096
RMAP_ITEM_SIZE = 64  # sizeof(struct ksm_rmap_item) on 64-bit

ADVISOR_MODES = ("none", "scan-time")

KNOB_DEFAULTS: dict[str, int] = {
    "run": 0,
    "pages_to_scan": 100,
    "sleep_millisecs": 20,
    "merge_across_nodes": 1,
    "max_page_sharing": 256,
    "use_zero_pages": 0,
    "smart_scan": 1,
    "stable_node_chains_prune_millisecs": 2000,
    "advisor_mode": 0,
    "advisor_max_cpu": 70,
    "advisor_min_pages_to_scan": 500,
    "advisor_max_pages_to_scan": 30000,
    "advisor_target_scan_time": 200,
}

COUNTERS = (
    "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "pages_scanned",
    "pages_skipped", "full_scans", "stable_node_chains", "stable_node_dups", "ksm_zero_pages",
    "general_profit",
)

KNOBS = tuple(KNOB_DEFAULTS)
ALL_FILES = tuple(sorted(KNOBS + COUNTERS))


class SysfsError(Exception):
    def __init__(self, errno_name: str, msg: str = "") -> None:
        super().__init__(f"{errno_name}: {msg}" if msg else errno_name)
        self.errno_name = errno_name


def boot_init(k: Kernel) -> None:
    for name, v in KNOB_DEFAULTS.items():
        k.ksm[name] = v
    k.ksm["nr_node_ids"] = 1


# -- parsing like lib/kstrtox.c ----------------------------------------------------------
def _strip(buf: str) -> str:
    return buf[:-1] if buf.endswith("\n") else buf


def kstrtoul(buf: str, bits: int = 64) -> int:
    s = _strip(buf)
    if s.startswith("+"):
        s = s[1:]
    if not s or not s.isdigit():
        raise SysfsError("EINVAL", f"not an unsigned number: {buf!r}")
    v = int(s, 10)
    if v >= 1 << bits:
        raise SysfsError("ERANGE", f"{buf!r} out of range")
    return v


def kstrtoint(buf: str) -> int:
    s = _strip(buf)
    neg = s.startswith("-")
    v = kstrtoul(s[1:] if neg else s, 31)
    return -v if neg else v


def kstrtobool(buf: str) -> int:
    s = _strip(buf).lower()
    if s[:1] in ("y", "1") or s in ("on",):
        return 1
    if s[:1] in ("n", "0") or s in ("off",):
        return 0
    raise SysfsError("EINVAL", f"not a boolean: {buf!r}")


def _einval(fn: Callable[[str], int]) -> Callable[[str], int]:
    def parse(buf: str) -> int:
        try:
            return fn(buf)
        except SysfsError as e:
            raise SysfsError("EINVAL", str(e)) from None
    return parse


_uint = _einval(lambda b: kstrtoul(b, 32))


# -- reads ---------------------------------------------------------------------------------
def counters(k: Kernel) -> dict[str, int]:
    ksm = k.ksm
    shared, sharing, unshared = int(ksm["pages_shared"]), int(ksm["pages_sharing"]), int(ksm["pages_unshared"])
    rmap_items = int(ksm["rmap_items"])
    zero = int(ksm["ksm_zero_pages"])
    return {
        "pages_shared": shared,
        "pages_sharing": sharing,
        "pages_unshared": unshared,
        "pages_volatile": max(0, rmap_items - shared - sharing - unshared),
        "pages_scanned": int(ksm["pages_scanned"]),
        "pages_skipped": int(ksm["pages_skipped"]),
        "full_scans": int(ksm["seqnr"]),
        "stable_node_chains": int(ksm["stable_node_chains"]),
        "stable_node_dups": int(ksm["stable_node_dups"]),
        "ksm_zero_pages": zero,
        "general_profit": (sharing + zero) * PAGE_SIZE - rmap_items * RMAP_ITEM_SIZE,
    }


def knob(k: Kernel, name: str) -> int:
    return ulong_knob(k, name) if name in ULONG_KNOBS else int(k.ksm[name])


def knobs(k: Kernel) -> dict[str, int]:
    return {name: knob(k, name) for name in KNOBS}


def show(k: Kernel, name: str) -> str:
    """The text `cat /sys/kernel/mm/ksm/NAME` prints (without the newline)."""
    if name == "advisor_mode":
        cur = int(k.ksm["advisor_mode"])
        return " ".join(f"[{m}]" if i == cur else m for i, m in enumerate(ADVISOR_MODES))
    if name in KNOB_DEFAULTS:
        return str(knob(k, name))
    if name in COUNTERS:
        return str(counters(k)[name])
    raise SysfsError("ENOENT", f"/sys/kernel/mm/ksm/{name}: no such file")


# -- writes ----------------------------------------------------------------------------------
def store(k: Kernel, name: str, buf: str, task: int = 0) -> None:
    """Write buf to a knob with the kernel's validation; raises SysfsError.

    task: the user task doing the write (0: none). A run write by a live task runs in
    its context (k.current_task): its fatal signal stops run=2's allocations, and during
    run=2 it is the OOM origin (oom.set_current_oom_origin).
    """
    if name in COUNTERS:
        raise SysfsError("EACCES", f"/sys/kernel/mm/ksm/{name} is read-only")
    handler = _STORES.get(name)
    if handler is None:
        raise SysfsError("ENOENT", f"/sys/kernel/mm/ksm/{name}: no such file")
    if task and name == "run" and k.km.task.valid(task):
        prev, k.current_task = k.current_task, task
        try:
            handler(k, buf)
        finally:
            k.current_task = prev
    else:
        handler(k, buf)
    k.ev("sysfs_store", knob=name, value=_strip(buf))


def _wake(k: Kernel) -> None:
    wake_ksmd(k)


def run_store(k: Kernel, buf: str) -> None:
    flags = _uint(buf)
    if flags > KSM_RUN_UNMERGE:
        raise SysfsError("EINVAL", "run must be 0, 1 or 2")
    err = 0
    k.ksm_thread_mutex.lock(site="run_store")
    try:
        if int(k.ksm["run"]) != flags:
            if flags & KSM_RUN_UNMERGE:
                k.ksm["unmerge_start_ns"] = k.clock.monotonic_ns()   # before run=2 is seen
            k.ksm["run"] = flags
            if flags & KSM_RUN_UNMERGE:
                set_current_oom_origin(k, k.current_task)
                try:
                    err = unmerge_and_remove_all_rmap_items(k)
                finally:
                    clear_current_oom_origin(k, k.current_task)
                if err:
                    k.ksm["run"] = KSM_RUN_STOP
                else:
                    # Seed 002's rule, checked where it must hold: nothing of KSM is left.
                    debug.check_unmerged(k)
    finally:
        k.ksm_thread_mutex.unlock()
    if flags & KSM_RUN_MERGE:
        _wake(k)
    if err:
        raise SysfsError(_ERRNO.get(err, "EINVAL"), "unmerge failed; run set to 0")


def pages_to_scan_store(k: Kernel, buf: str) -> None:
    if k.ksm["advisor_mode"] != 0:
        raise SysfsError("EINVAL", "pages_to_scan is set by the scan-time advisor")
    k.ksm["pages_to_scan"] = _uint(buf)


def sleep_millisecs_store(k: Kernel, buf: str) -> None:
    k.ksm["sleep_millisecs"] = _uint(buf)
    _wake(k)


def _store_busy_knob(k: Kernel, name: str, value: int) -> None:
    k.ksm_thread_mutex.lock(site="busy_knob_store")
    try:
        if int(k.ksm[name]) != value:
            if k.ksm["pages_shared"]:
                raise SysfsError("EBUSY", f"{name}: pages are shared (write 2 to run first)")
            if not k.variant("stale-stable-nodes:old-nodes") and remove_all_stable_nodes(k):
                raise SysfsError("EBUSY", f"{name}: a stable node is still in use")
            k.ksm[name] = value
            if name == "merge_across_nodes":
                k.ksm["nr_node_ids"] = 1 if value else k.km.geo.nr_nodes
    finally:
        k.ksm_thread_mutex.unlock()


def merge_across_nodes_store(k: Kernel, buf: str) -> None:
    try:
        v = kstrtoul(buf)
    except SysfsError:
        raise
    if v > 1:
        raise SysfsError("EINVAL", "merge_across_nodes must be 0 or 1")
    _store_busy_knob(k, "merge_across_nodes", v)


def max_page_sharing_store(k: Kernel, buf: str) -> None:
    v = kstrtoint(buf)
    if v < 2:
        raise SysfsError("EINVAL", "max_page_sharing must be >= 2")
    if int(k.ksm["max_page_sharing"]) == v:
        return
    _store_busy_knob(k, "max_page_sharing", v)


def _store_bool(k: Kernel, name: str, buf: str) -> None:
    k.ksm[name] = kstrtobool(buf)


def _store_uint(k: Kernel, name: str, buf: str, minimum: int = 0, store_bits: int = 64) -> None:
    """`err = kstrtoul(buf, 10, &value); if (err) return -EINVAL;` then a store into a
    variable of store_bits bits: an unsigned int knob keeps the low 32 bits of the value,
    as C's assignment does (advisor_max_cpu=4294967301 reads back 5 on the real kernel)."""
    try:
        v = kstrtoul(buf)
    except SysfsError as e:
        raise SysfsError("EINVAL", str(e)) from None
    if v < minimum:
        raise SysfsError("EINVAL", f"{name} must be >= {minimum}")
    v &= (1 << store_bits) - 1
    k.ksm[name] = v - (1 << 64) if v >= 1 << 63 else v     # the bit pattern (see knob())


def advisor_mode_store(k: Kernel, buf: str) -> None:
    s = _strip(buf)
    if s not in ADVISOR_MODES:
        raise SysfsError("EINVAL", f"advisor_mode must be one of {', '.join(ADVISOR_MODES)}")
    mode = ADVISOR_MODES.index(s)
    if int(k.ksm["advisor_mode"]) != mode:
        k.ksm["advisor_mode"] = mode
        set_advisor_defaults(k)


def stable_node_chains_prune_millisecs_store(k: Kernel, buf: str) -> None:
    k.ksm["stable_node_chains_prune_millisecs"] = _uint(buf)


# The kernel's other *_store() handlers, each one kstrtobool/kstrtoul and a store (one
# function per file, under the kernel's name, so that coverage names what ran).
def use_zero_pages_store(k: Kernel, buf: str) -> None:
    _store_bool(k, "use_zero_pages", buf)


def smart_scan_store(k: Kernel, buf: str) -> None:
    _store_bool(k, "smart_scan", buf)


def advisor_max_cpu_store(k: Kernel, buf: str) -> None:
    _store_uint(k, "advisor_max_cpu", buf, store_bits=32)   # an unsigned int


def advisor_min_pages_to_scan_store(k: Kernel, buf: str) -> None:
    _store_uint(k, "advisor_min_pages_to_scan", buf)


def advisor_max_pages_to_scan_store(k: Kernel, buf: str) -> None:
    _store_uint(k, "advisor_max_pages_to_scan", buf)


def advisor_target_scan_time_store(k: Kernel, buf: str) -> None:
    _store_uint(k, "advisor_target_scan_time", buf, 1)


_STORES: dict[str, Callable[[Kernel, str], None]] = {
    "run": run_store,
    "pages_to_scan": pages_to_scan_store,
    "sleep_millisecs": sleep_millisecs_store,
    "merge_across_nodes": merge_across_nodes_store,
    "max_page_sharing": max_page_sharing_store,
    "use_zero_pages": use_zero_pages_store,
    "smart_scan": smart_scan_store,
    "stable_node_chains_prune_millisecs": stable_node_chains_prune_millisecs_store,
    "advisor_mode": advisor_mode_store,
    "advisor_max_cpu": advisor_max_cpu_store,
    "advisor_min_pages_to_scan": advisor_min_pages_to_scan_store,
    "advisor_max_pages_to_scan": advisor_max_pages_to_scan_store,
    "advisor_target_scan_time": advisor_target_scan_time_store,
}


def ksm_stat(k: Kernel, mm: int) -> dict[str, object]:
    """/proc/PID/ksm_stat of one mm."""
    km = k.km
    i = km.mm.idx(mm, "ksm_stat")
    rmap_items = int(km.mm.ksm_rmap_items[i])
    merging = int(km.mm.ksm_merging_pages[i])
    zero = int(km.mm.ksm_zero_pages[i])
    mergeable = any(km.vma.flags[km.vma.idx(v, "ksm_process_mergeable")] & VM_MERGEABLE
                    for v in mmops.vmas(k, mm))
    return {
        "ksm_rmap_items": rmap_items,
        "ksm_zero_pages": zero,
        "ksm_merging_pages": merging,
        "ksm_process_profit": (merging + zero) * PAGE_SIZE - rmap_items * RMAP_ITEM_SIZE,
        "ksm_merge_any": "yes" if mm_flags(k, mm) & MMF_VM_MERGE_ANY else "no",
        "ksm_mergeable": "yes" if mergeable else "no",
    }
