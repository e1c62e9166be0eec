"""ksmd's kernel paths alone: the bench's workload scanned in one process, no cluster.

bench_ksmd.py times ksmd as a process of a running cluster, against the real ksmd. This
times the same scan functions called directly (tests/kernel's harness: the same shared
records, locks and numpy core, one kernel context, events kept in memory), so that a
change to a kernel path can be timed without the cluster's noise, and profiled:

    .venv/bin/python bench/bench_scan_inprocess.py [--scale S] [--scan vector] [--passes N]
        [--batch PAGES] [--smart-scan 0|1] [--profile PASS] [--top N] [--sort KEY] [--callers NAME] [--callees NAME]

--batch is pages_to_scan per ksm_do_scan call (1000, as the bench's knobs; 0: a whole
pass in one call). --profile P prints cProfile's top functions of pass P.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
from bench_ksmd import KNOBS, bench_workload

from shared_mem.layout import PAGE_SIZE, PTRS_PER_PTE, Geometry
from tests.kernel.conftest import KernelHarness


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=0.25, help="workload size (1.0 = 512 MiB)")
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--dup", type=float, default=0.5)
    ap.add_argument("--scan", choices=("exact", "batch", "vector"), default="vector")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--batch", type=int, default=KNOBS["pages_to_scan"])
    ap.add_argument("--smart-scan", type=int, default=0, choices=(0, 1), help="as bench_ksmd.py's (default 0)")
    ap.add_argument("--profile", type=int, metavar="PASS", help="profile this pass")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--sort", default="tottime", choices=("tottime", "cumulative", "ncalls"),
                    help="cProfile's order for --profile")
    ap.add_argument("--callers", metavar="NAME", help="with --profile: who calls functions matching NAME")
    ap.add_argument("--callees", metavar="NAME", help="with --profile: what functions matching NAME call")
    a = ap.parse_args()
    if a.scale <= 0 or a.procs < 1 or not 0 <= a.dup < 1 or a.passes < 1 or a.batch < 0:
        ap.error("--scale > 0, --procs >= 1, 0 <= --dup < 1, --passes >= 1, --batch >= 0")
    w = bench_workload(a.scale, a.procs, a.dup)
    npages = sum(len(p) for p in w.processes)
    per_mm = max(len(p) for p in w.processes)
    geo = Geometry(nr_frames=npages + 8192, max_mms=a.procs + 4, max_tasks=a.procs + 4, max_vmas=64,
                   max_anon_vmas=64, va_pages=(per_mm // PTRS_PER_PTE + 8) * PTRS_PER_PTE, nr_swap_slots=64)
    h = KernelHarness(geo=geo, scan=a.scan)
    try:
        for knob, v in {**KNOBS, "smart_scan": a.smart_scan}.items():
            h.set(knob, v)
        t = time.perf_counter()
        for p in w.processes:
            mm = h.new_mm()
            addr = h.mmap(mm, len(p))
            for i, cid in enumerate(p):
                h.write_page(mm, addr + i * PAGE_SIZE, np.frombuffer(w.page_bytes(cid), dtype=np.uint8))
            h.madvise(mm, addr, len(p))
        print(f"{w.name}: {npages} pages in {a.procs} mms, --scan {a.scan}, batch {a.batch or 'a pass'}; "
              f"filled in {time.perf_counter() - t:.1f} s")
        for n in range(1, a.passes + 1):
            prof = cProfile.Profile() if a.profile == n else None
            before = h.seqnr
            t = time.perf_counter()
            if prof is not None:
                prof.enable()
            while h.seqnr == before:
                h.scan(a.batch or 1 << 30)
            if prof is not None:
                prof.disable()
            dt = time.perf_counter() - t
            print(f"pass {n}: {dt:8.3f} s {npages / dt:12,.0f} pages/s" + ("  (profiled)" if prof else ""))
            if prof is not None:
                st = pstats.Stats(prof, stream=sys.stdout).sort_stats(a.sort)
                st.print_stats(a.top)
                if a.callers:
                    st.print_callers(a.callers)
                if a.callees:
                    st.print_callees(a.callees)
        c = h.counters("pages_shared", "pages_sharing", "pages_unshared")
        print(f"counters {c}")
    finally:
        h.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
