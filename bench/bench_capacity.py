# How big a run this machine holds: frames (shared memory) and tasks (processes).
#
# Boots one cluster with many frames, spawns tasks, and measures in the same run:
# boot time, the shared-memory footprint, the time to spawn a task process, and the
# proportional memory (PSS) of one actor process. Prints the limits they imply for
# this machine (RAM, /dev/shm size).
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time

from actors.cluster import Cluster
from protocol.abi import PAGE_SIZE


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


async def main(frames: int, tasks: int) -> None:
    run_dir = tempfile.mkdtemp(prefix="ksmlab-cap-")
    t0 = time.monotonic()
    c = Cluster(frames=frames, max_tasks=tasks + 8, max_mms=tasks + 8, trace_locks=False,
                shadow=False, run_dir=run_dir, sched="none")
    await c.boot()
    boot = time.monotonic() - t0
    try:
        shm = sum(os.path.getsize(f"/dev/shm/{n}") for n in os.listdir("/dev/shm") if c.run_id in n)
        t1 = time.monotonic()
        ts = [await c.spawn_task() for _ in range(tasks)]
        spawn = (time.monotonic() - t1) / tasks
        # every task touches 16 pages, so the page tables and frames are really used
        for t in ts:
            a = await t.mmap(16 * PAGE_SIZE)
            await t.memset(a, 1, 16 * PAGE_SIZE)
        task_pss = sum(pss_kib(c.procs[t.name].pid) for t in ts) / tasks
        actor_pss = {n: pss_kib(c.procs[n].pid) for n in ("ksmd", "fault", "exit", "oom", "ctl", "kswapd")}
        mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        shm_total = shutil.disk_usage("/dev/shm").total
        print(f"frames {frames} ({frames * PAGE_SIZE >> 20} MiB): boot {boot:.2f} s, "
              f"shared memory {shm >> 20} MiB ({shm / frames:.0f} B per frame incl. records)")
        print(f"tasks {tasks}: spawn {spawn * 1000:.0f} ms per task, PSS {task_pss / 1024:.1f} MiB per task process")
        print("kernel actors PSS (MiB): " + ", ".join(f"{n} {v / 1024:.1f}" for n, v in actor_pss.items()))
        print(f"machine: RAM {mem_total >> 30} GiB, /dev/shm {shm_total >> 30} GiB")
        print(f"=> frames limit ~{int(shm_total * 0.9 / (shm / frames)):,} (/dev/shm), "
              f"tasks limit ~{int(mem_total * 0.6 / (task_pss * 1024)):,} (60% of RAM at this PSS)")
    finally:
        await c.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=1 << 20)
    ap.add_argument("--tasks", type=int, default=64)
    a = ap.parse_args()
    asyncio.run(main(a.frames, a.tasks))
