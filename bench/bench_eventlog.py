"""What one structured event costs the process that logs it (actors/log.EventLog).

ksmd logs one or two events per page it merges; at the kernel's rate that is the cost
that decides whether the per-page tracepoints can stay on. Prints microseconds per event
for a ksmd-like log (flush every 4096 events), an actor's (flush every event), and an
event whose tracepoint is turned off (ksm_tracepoints=False), each best of --repeat.

    .venv/bin/python bench/bench_eventlog.py [--events N] [--repeat R] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from actors.log import KSM_PAGE_TRACEPOINTS, EventLog


def per_event_us(flush_every: int, off: frozenset[str], n: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="ksmlab-evbench-") as d:
            log = EventLog(d, "ksmd", "bench", 0, flush_every=flush_every, label=lambda: "ksmd", off=off)
            t = time.perf_counter()
            for i in range(n):
                log("ksm_merge_one_page", pfn=i, kpfn=12345, mm=3, addr=0x1000000 + i * 4096, err=0)
            best = min(best, (time.perf_counter() - t) / n * 1e6)
            log.close()
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.events < 1 or a.repeat < 1:
        ap.error("--events and --repeat must be at least 1")
    rows = {
        "ksmd (flush_every 4096)": per_event_us(4096, frozenset(), a.events, a.repeat),
        "actor (flush_every 1)": per_event_us(1, frozenset(), a.events, a.repeat),
        "tracepoint off": per_event_us(4096, KSM_PAGE_TRACEPOINTS, a.events, a.repeat),
    }
    if a.json:
        print(json.dumps({"events": a.events, "us_per_event": {k: round(v, 3) for k, v in rows.items()}}))
    else:
        for k, v in rows.items():
            print(f"{k:26} {v:8.2f} us/event")
    return 0


if __name__ == "__main__":
    sys.exit(main())
