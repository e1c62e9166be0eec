"""ksmd speed: ksmlab's ksmd against this machine's real ksmd, on the same workload, in one run.

    sudo .venv/bin/python bench/bench_ksmd.py [--scale 1.0] [--procs 4] [--dup 0.5]
                                              [--steady-passes 3] [--only kernel|ksmlab]
                                              [--smart-scan 0|1] [--scan batch|exact|vector]
                                              [--locks word|ofd] [--run2] [--json]
    sudo .venv/bin/python bench/bench_ksmd.py --matrix [--json]   # the workload matrix
    .venv/bin/python bench/bench_ksmd.py --core [--json]           # the numpy core alone

The workload (issue 3, item 8): 8192 distinct pages x 8 copies + 65536 unique pages (512 MiB,
131072 pages at --scale 1), dealt over --procs processes and shuffled (ksmlab.workloads.mix).
--dup R makes R of the pages copies (8 of each content) and the rest unique (0.5 is the
mix above); --matrix runs 64 MiB, 512 MiB and 2 GiB x 1, 4 and 16 tasks x 0, 50 and 90%
duplicates (MATRIX below). --run2 also times run=2 (unmerge everything) once converged.
--json prints one JSON object per workload on its own line:

  {"workload": {...}, "kernel": {"converge_s", "pass1_pps", "steady_pps", "cpu_s", "unmerge_s"},
   "ksmlab": {the same, "scan", "locks"}, "ratio": {"converge", "pass1", "steady"}}

where a ratio above 1 means ksmlab is faster (converge: kernel time / ksmlab time). --core
measures the comparison core (shared_mem/pagecmp.py) on 512 MiB of random frames: checksum
and compare GB/s against numpy's plain copy of the same bytes.
Both sides run it with pages_to_scan=1000, sleep_millisecs=0, max_page_sharing=256,
use_zero_pages=0, smart_scan=--smart-scan. Each process maps MAP_PRIVATE|MAP_ANONYMOUS,
MADV_NOHUGEPAGE, writes every page, MADV_MERGEABLE; then run=1 and the counters are polled
(sysfs on the kernel, the shared ksm record on ksmlab) to time every full scan:

  converge  seconds from run=1 until pages_shared/sharing/unshared first equal the expected
            values (8192 / 57344 / 65536 at --scale 1)
  pass 1    pages/s of the first full scan (checksums only: every page is new)
  pass 2    pages/s of the second (unstable-tree inserts and the merges)
  steady    pages/s over passes 3 .. 2+--steady-passes (everything already merged or unshared)

and the ratio ksmlab/kernel of each. ksmlab runs with trace_locks=False and shadow=False: the
per-lock events and the tasks' shadow copies are debugging aids, not part of the kernel's
work (the locks themselves are all still taken). Its per-page KSM tracepoints
(ksm_merge_one_page, ...; actors/log.KSM_PAGE_TRACEPOINTS) are off unless --ksm-tracepoints,
as the real ksmd's are unless tracing is enabled; every other event is still logged. Without shadows Task.verify cannot run, so
the bench reads every page back through the tasks instead (--no-readback skips that).

The real-kernel side needs root and a writable /sys/kernel/mm/ksm; it saves and restores
every knob (ksmlab.realkernel.KsmKnobs) and refuses to measure if another process has
mergeable memory. To profile ksmlab's ksmd, set KSMLAB_KSMD_PROFILE=/path/to/file.prof: the
ksmd process then runs under cProfile and dumps its stats there when it stops.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

try:
    from ksmlab import realkernel as rk
    from ksmlab.workloads import Workload, ksmlab_cluster_options, ksmlab_load, mix, page_bytes
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ksmlab import realkernel as rk
    from ksmlab.workloads import Workload, ksmlab_cluster_options, ksmlab_load, mix, page_bytes

PAGE = 4096
FULL_DISTINCT, FULL_COPIES, FULL_UNIQUE = 8192, 8, 65536
KNOBS = {"pages_to_scan": 1000, "sleep_millisecs": 0, "max_page_sharing": 256, "use_zero_pages": 0}


# (MiB, tasks, duplicate ratio): every size at 4 tasks and 50%, then the task and ratio
# axes at 512 MiB
MATRIX = [(64, 4, 0.5), (512, 4, 0.5), (2048, 4, 0.5), (512, 1, 0.5), (512, 16, 0.5),
          (512, 64, 0.5), (512, 4, 0.0), (512, 4, 0.9)]


def bench_workload(scale: float, procs: int, dup: float = 0.5) -> Workload:
    total = round((FULL_DISTINCT * FULL_COPIES + FULL_UNIQUE) * scale)
    distinct = round(total * dup) // FULL_COPIES
    unique = max(1, round((total - distinct * FULL_COPIES) / procs))
    return mix(
        f"ksmd-bench-{total * PAGE >> 20}MiB-{procs}t-{round(dup * 100)}dup",
        procs,
        dup_contents=distinct,
        copies_per_content=FULL_COPIES,
        unique_per_proc=unique,
        zero_per_proc=0,
        seed=8,
    )


def build_images(w: Workload) -> list[bytes]:
    """w.process_image(i) for every process, generating each content's bytes once."""
    cache: dict[int, bytes] = {}

    def get(cid: int) -> bytes:
        b = cache.get(cid)
        if b is None:
            b = cache[cid] = page_bytes.__wrapped__(cid)
        return b

    return [b"".join(get(c) for c in p) for p in w.processes]


def schedstat_ns(pid: int) -> int:
    """CPU time (ns) of the thread ``pid`` so far (/proc/PID/task/PID/schedstat)."""
    with open(f"/proc/{pid}/task/{pid}/schedstat", "rb") as f:
        return int(f.read().split()[0])


def kernel_ksmd_pid() -> int | None:
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if (p / "comm").read_text().strip() == "ksmd":
                    return int(p.name)
            except OSError:
                continue
    return None


@dataclass
class Timeline:
    """Samples (t since run=1, ksmd cpu s, full_scans, pages_scanned, shared, sharing, unshared)."""

    samples: list[tuple[float, float, int, int, int, int, int]] = field(default_factory=list)
    start_scans: int = 0
    start_scanned: int = 0

    def add(self, t: float, cpu: float, c: dict[str, int]) -> None:
        self.samples.append(
            (
                t,
                cpu,
                c["full_scans"],
                c["pages_scanned"],
                c["pages_shared"],
                c["pages_sharing"],
                c["pages_unshared"],
            )
        )

    def converged_at(self, want: tuple[int, int, int]) -> float | None:
        for s in self.samples:
            if s[4:7] == want:
                return s[0]
        return None

    def pass_ends(self) -> list[tuple[float, float, int]]:
        """(time, cpu, pages_scanned) at the first sample showing each new full scan."""
        first = self.samples[0]
        out = [(0.0, first[1], self.start_scanned)]
        seen = self.start_scans
        for s in self.samples:
            while s[2] > seen:  # several passes between two samples: they share the sample
                seen += 1
                out.append((s[0], s[1], s[3]))
        return out

    def rates(self) -> list[Pass]:
        ends = self.pass_ends()
        return [
            Pass(max(t1 - t0, 1e-9), max(c1 - c0, 1e-9), p1 - p0)
            for (t0, c0, p0), (t1, c1, p1) in itertools.pairwise(ends)
        ]


@dataclass
class Pass:
    wall: float
    cpu: float
    pages: int


@dataclass
class Result:
    side: str
    converge: float | None
    passes: list[Pass]
    final: dict[str, int]
    load_s: float
    notes: list[str] = field(default_factory=list)
    unmerge_s: float | None = None
    extra: dict = field(default_factory=dict)

    def summary(self, steady_passes: int) -> dict:
        hi = 2 + steady_passes
        cpu = sum(p.cpu for p in self.passes[:hi]) if len(self.passes) >= hi else None
        return {"converge_s": self.converge, "pass1_pps": self.rate(1, 1),
                "steady_pps": self.rate(3, hi), "cpu_s": cpu, "unmerge_s": self.unmerge_s,
                **self.extra}

    def rate(self, lo: int, hi: int, cpu: bool = False) -> float | None:
        """pages/s over passes lo..hi (1-based, inclusive): total pages / total wall (cpu) s."""
        sel = self.passes[lo - 1 : hi]
        if not sel or len(sel) < hi - lo + 1:
            return None
        return sum(p.pages for p in sel) / sum(p.cpu if cpu else p.wall for p in sel)


def expected_triplet(w: Workload) -> tuple[int, int, int]:
    e = w.expected(max_page_sharing=KNOBS["max_page_sharing"])
    return e["pages_shared"], e["pages_sharing"], e["pages_unshared"]


# --------------------------------------------------------------------------------------------
# the real kernel


def run_kernel(w: Workload, images: list[bytes], smart_scan: int, passes: int) -> Result:
    root = rk.KSM_SYSFS
    if not rk.ksm_available(root):
        raise rk.KsmError(f"{root}/run is not writable (run as root on a kernel with KSM)")
    want = expected_triplet(w)
    files = ("full_scans", "pages_scanned", "pages_shared", "pages_sharing", "pages_unshared")
    fds = {}

    def read() -> dict[str, int]:
        out = {}
        for name in files:
            fd = fds[name]
            out[name] = int(os.pread(fd, 32, 0))
        return out

    with rk.KsmKnobs(root) as knobs:
        knobs.set("run", 2)
        foreign = rk.foreign_mergeable_pids()
        if foreign:
            raise rk.ForeignMergeableMemory(
                f"other processes have mergeable memory: {foreign}", foreign
            )
        if "advisor_mode" in knobs.saved:
            knobs.set("advisor_mode", "none")
        for name, value in KNOBS.items():
            knobs.set(name, value)
        if "smart_scan" in knobs.saved:
            knobs.set("smart_scan", smart_scan)
        for name in files:
            fds[name] = os.open(root / name, os.O_RDONLY)
        kids = rk._Children(images)
        try:
            t_load = time.monotonic()
            kids.start()
            kids.wait_ready(time.monotonic() + 300)
            load_s = time.monotonic() - t_load
            ksmd = kernel_ksmd_pid()
            if ksmd is None:
                raise rk.KsmError("no ksmd kernel thread found")
            tl = Timeline()
            c0 = read()
            tl.start_scans, tl.start_scanned = c0["full_scans"], c0["pages_scanned"]
            tl.add(0.0, schedstat_ns(ksmd) / 1e9, c0)
            target = tl.start_scans + 2 + passes
            deadline = time.monotonic() + 300
            t0 = time.monotonic()
            knobs.set("run", 1)
            while True:
                c = read()
                tl.add(time.monotonic() - t0, schedstat_ns(ksmd) / 1e9, c)
                if c["full_scans"] >= target:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"kernel: full_scans {c['full_scans']} < {target}")
                time.sleep(0.001)
            knobs.set("run", 0)
            final = rk.read_counters(root)
            t_un = time.monotonic()
            knobs.set("run", 2)  # the write returns when every merge is broken
            unmerge_s = time.monotonic() - t_un
            kids.stop(grace=5.0)
        finally:
            kids.stop(grace=0.0)
            for fd in fds.values():
                os.close(fd)
    res = Result("kernel", tl.converged_at(want), tl.rates(), final, load_s, unmerge_s=unmerge_s)
    return res


# --------------------------------------------------------------------------------------------
# ksmlab


async def run_ksmlab_async(
    w: Workload, images: list[bytes], smart_scan: int, passes: int, readback: bool, poll: float,
    scan: str = "batch", locks: str = "word", run2: bool = False, ksm_tracepoints: bool = False,
) -> Result:
    from actors.cluster import Cluster

    want = expected_triplet(w)
    run_dir = tempfile.mkdtemp(prefix="ksmd-bench-")
    opts = ksmlab_cluster_options(
        w, run_dir=run_dir, trace_locks=False, shadow=False, hung_task_timeout=120.0, sched="none",
        scan=scan, locks=locks, ksm_tracepoints=ksm_tracepoints,
    )
    c = Cluster(**opts)
    notes = [f"run folder {run_dir}", f"frames {opts['frames']}, va_pages {opts['va_pages']}"]
    extra: dict = {"scan": scan, "locks": locks, "ksm_tracepoints": ksm_tracepoints}
    try:
        t_boot = time.monotonic()
        await c.boot()
        extra["boot_s"] = round(time.monotonic() - t_boot, 3)
        for name, value in {**KNOBS, "smart_scan": smart_scan}.items():
            await c.sysfs_write(name, value)
        t_spawn = time.monotonic()
        probe = await c.spawn_task(comm="spawn-probe")  # what every campaign run pays per task
        extra["spawn_s"] = round(time.monotonic() - t_spawn, 3)
        await probe.exit()
        t_load = time.monotonic()
        loaded = await ksmlab_load(c, w, images=images)
        load_s = time.monotonic() - t_load
        ksmd = c.procs["ksmd"].pid
        tl = Timeline()
        c0 = c.ksm_counters()
        tl.start_scans, tl.start_scanned = c0["full_scans"], c0["pages_scanned"]
        tl.add(0.0, schedstat_ns(ksmd) / 1e9, c0)
        target = tl.start_scans + 2 + passes
        t0 = time.monotonic()
        await c.sysfs_write("run", 1)
        deadline = t0 + 3600
        while True:
            cur = c.ksm_counters()
            tl.add(time.monotonic() - t0, schedstat_ns(ksmd) / 1e9, cur)
            if cur["full_scans"] >= target:
                break
            if c.crashed is not None:
                raise c.crashed
            if time.monotonic() > deadline:
                raise TimeoutError(f"ksmlab: full_scans {cur['full_scans']} < {target}")
            await asyncio.sleep(poll)
        await c.sysfs_write("run", 0)
        final = c.ksm_counters()
        extra["shm_mib"] = round(shm_bytes(c.run_id) / 2**20, 1)
        extra["ksmd_rss_mib"] = round(vm_hwm_kib(ksmd) / 1024, 1)
        unmerge_s = None
        if run2:
            t_un = time.monotonic()
            await c.sysfs_write("run", 2)  # as in the kernel, returns when all is unmerged
            unmerge_s = time.monotonic() - t_un
            after = c.ksm_counters()
            if after["pages_shared"] or after["pages_sharing"]:
                raise RuntimeError(f"ksmlab: run=2 left {after['pages_shared']} KSM pages")
        if readback:
            t_rb = time.monotonic()
            bad = 0
            for i, (t, addr) in enumerate(loaded):
                img = images[i]
                step = 8 << 20
                for off in range(0, len(img), step):
                    got = await t.read(addr + off, min(step, len(img) - off))
                    if got != img[off : off + step]:
                        bad += 1
            notes.append(
                f"read-back of every page: {'OK' if not bad else f'{bad} BAD chunks'} "
                f"({time.monotonic() - t_rb:.1f}s)"
            )
            if bad:
                raise RuntimeError("ksmlab: merged memory reads back wrong")
        if c.reports:
            raise RuntimeError(f"ksmlab reports: {[r['title'] for r in c.reports]}")
    finally:
        await c.stop()
    return Result("ksmlab", tl.converged_at(want), tl.rates(), final, load_s, notes,
                  unmerge_s=unmerge_s, extra=extra)


def shm_bytes(run_id: str) -> int:
    """Bytes of the run's shared memory: page frames, kernel records, lock words."""
    return sum(p.stat().st_size for p in Path("/dev/shm").iterdir() if run_id in p.name)


def vm_hwm_kib(pid: int) -> int:
    """Peak resident set of a process (its own pages and the shared ones it touched)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


# --------------------------------------------------------------------------------------------
# report


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def report(w: Workload, results: list[Result], passes: int) -> None:
    want = expected_triplet(w)
    print(
        f"\nworkload {w.name}: {w.n_procs} processes, {w.total_pages} pages "
        f"({w.total_pages * PAGE / 2**20:.0f} MiB); expect shared/sharing/unshared {want}"
    )
    print(f"knobs: {KNOBS}; load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    cols = ("converge s", "pass1 p/s", "pass2 p/s", "steady p/s", "p1 p/cpu-s", "steady p/cpu-s")
    print(f"{'':8}" + "".join(f"{c:>15}" for c in cols))
    rows = {}
    hi = 2 + passes
    for r in results:
        rows[r.side] = (
            r.converge,
            r.rate(1, 1),
            r.rate(2, 2),
            r.rate(3, hi),
            r.rate(1, 1, cpu=True),
            r.rate(3, hi, cpu=True),
        )
        fmts = (".3f",) + (",.0f",) * 5
        print(f"{r.side:8}" + "".join(f"{_f(v, f):>15}" for v, f in zip(rows[r.side], fmts)))
    if "kernel" in rows and "ksmlab" in rows:
        k, m = rows["kernel"], rows["ksmlab"]
        ratio = [None if a is None or b is None else b / a for a, b in zip(k, m)]
        fmts = (".1f",) + (".4f",) * 5
        print(
            f"{'ratio':8}"
            + "".join(f"{_f(v, f):>15}" for v, f in zip(ratio, fmts))
            + "   (ksmlab/kernel: time for converge, speed for the rest)"
        )
    for r in results:
        got = (r.final["pages_shared"], r.final["pages_sharing"], r.final["pages_unshared"])
        ok = "OK" if got == want else "MISMATCH"
        per = ", ".join(f"{p.pages / p.wall:,.0f}" for p in r.passes)
        print(f"  {r.side}: final {got} {ok}; load {r.load_s:.1f}s; wall pages/s per pass: {per}")
        for n in r.notes:
            print(f"    {n}")
    print("p/s = pages_scanned per wall second; p/cpu-s = per second of ksmd CPU time "
          "(schedstat), which a busy machine disturbs less.")
    mine = [r for r in results if r.side == "ksmlab"]
    if mine:
        print("ksmlab ran with trace_locks=False and shadow=False: lock events and the tasks' shadow "
              "copies are debugging aids (every kernel lock is still taken); its per-page KSM "
              f"tracepoints were {'on' if mine[0].extra.get('ksm_tracepoints') else 'off'} (--ksm-tracepoints).")


def ratios(k: dict, m: dict) -> dict:
    """> 1: ksmlab is faster (converge: kernel time / ksmlab time; rates: ksmlab / kernel)."""
    def div(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else round(a / b, 4)

    return {"converge": div(k["converge_s"], m["converge_s"]),
            "pass1": div(m["pass1_pps"], k["pass1_pps"]),
            "steady": div(m["steady_pps"], k["steady_pps"])}


def bench_core(mib: int = 512, repeat: int = 3) -> dict:
    """The comparison core alone: checksum and compare GB/s against a plain numpy copy."""
    import numpy as np

    from shared_mem.pagecmp import PageCmp

    n = mib << 8
    frames = np.frombuffer(np.random.default_rng(8).bytes(n * PAGE), dtype=np.uint8).reshape(n, PAGE).copy()
    pc = PageCmp(frames)
    dst = np.empty_like(frames)
    everything = np.arange(n)
    half = n // 2
    a, b = np.arange(half), np.arange(half, 2 * half)
    scattered = np.random.default_rng(9).permutation(n)[: n // 8]

    def best(fn, nbytes: int) -> float:
        t = min(_timed(fn) for _ in range(repeat))
        return nbytes / t / 1e9

    out = {
        "bytes": n * PAGE,
        "copy_gbps": best(lambda: np.copyto(dst, frames), n * PAGE),
        "checksum_gbps": best(lambda: pc.checksum_batch(everything), n * PAGE),
        "checksum_scattered_gbps": best(lambda: pc.checksum_batch(scattered), len(scattered) * PAGE),
        "compare_gbps": best(lambda: pc.identical_batch(a, b), 2 * half * PAGE),
    }
    out["checksum_vs_copy"] = round(out["checksum_gbps"] / out["copy_gbps"], 3)
    out["compare_vs_copy"] = round(out["compare_gbps"] / out["copy_gbps"], 3)
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_workload(w: Workload, args: argparse.Namespace) -> dict:
    t = time.monotonic()
    images = build_images(w)
    print(f"built {w.total_pages} pages of images in {time.monotonic() - t:.1f}s", flush=True)
    results = []
    if args.only != "ksmlab":
        try:
            results.append(run_kernel(w, images, args.smart_scan, args.steady_passes))
        except rk.KsmError as e:
            print(f"kernel side skipped: {e}")
        print("kernel done", flush=True)
    if args.only != "kernel":
        results.append(
            asyncio.run(
                run_ksmlab_async(
                    w, images, args.smart_scan, args.steady_passes, not args.no_readback, args.poll,
                    args.scan, args.locks, args.run2, args.ksm_tracepoints,
                )
            )
        )
    report(w, results, args.steady_passes)
    sides = {r.side: r.summary(args.steady_passes) for r in results}
    line = {"workload": {"name": w.name, "pages": w.total_pages, "mib": w.total_pages * PAGE >> 20,
                         "tasks": w.n_procs, "dup": args.dup_of.get(w.name, 0.5)},
            "kernel": sides.get("kernel"), "ksmlab": sides.get("ksmlab"),
            "ratio": ratios(sides["kernel"], sides["ksmlab"]) if len(sides) == 2 else None}
    if "kernel" in sides and "ksmlab" in sides:
        r = line["ratio"]
        print(f"ratio (>1: ksmlab faster): converge {r['converge']}, pass1 {r['pass1']}, "
              f"steady {r['steady']}")
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="workload size (1.0 = 512 MiB)")
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--dup", type=float, default=0.5, help="share of the pages that are copies")
    ap.add_argument("--steady-passes", type=int, default=3)
    ap.add_argument("--smart-scan", type=int, default=0, choices=(0, 1))
    ap.add_argument("--only", choices=("kernel", "ksmlab"))
    ap.add_argument("--no-readback", action="store_true")
    ap.add_argument("--poll", type=float, default=0.002, help="ksmlab counter poll interval (s)")
    ap.add_argument("--scan", choices=("batch", "exact", "vector"), default="batch", help="ksmlab's scan")
    ap.add_argument("--locks", choices=("word", "ofd"), default="word", help="ksmlab's locks")
    ap.add_argument("--run2", action="store_true", help="also time run=2 once converged")
    ap.add_argument("--ksm-tracepoints", action="store_true",
                    help="log ksmlab's per-page KSM tracepoints (off by default, as the kernel's are)")
    ap.add_argument("--matrix", action="store_true", help="the workload matrix (MATRIX)")
    ap.add_argument("--core", action="store_true", help="only the numpy comparison core")
    ap.add_argument("--json", action="store_true", help="one JSON object per workload")
    ap.add_argument("--plot", metavar="PNG", help="draw the scaling figure of the runs (needs the "
                    "'plot' extra: pip install -e '.[plot]')")
    ap.add_argument("--from-json", metavar="FILE", help="draw (--plot) or tabulate (--table) the JSON "
                    "lines of an earlier run instead of running anything")
    ap.add_argument("--table", action="store_true", help="with --from-json: a markdown table")
    args = ap.parse_args()
    if not 0 <= args.dup < 1 or args.procs < 1 or args.scale <= 0:
        ap.error("--dup must be in [0, 1), --procs and --scale positive")

    if args.from_json:
        lines = [json.loads(ln) for ln in Path(args.from_json).read_text().splitlines()
                 if ln.startswith('{"workload"') and '"ratio"' in ln]
        if args.table:
            print(markdown_table(lines))
        if args.plot:
            plot(lines, args.plot)
        return
    if args.core:
        core = bench_core()
        print(f"numpy core on {core['bytes'] >> 20} MiB: copy {core['copy_gbps']:.2f} GB/s, "
              f"checksum {core['checksum_gbps']:.2f} GB/s ({core['checksum_vs_copy']:.2f} x copy), "
              f"scattered checksum {core['checksum_scattered_gbps']:.2f} GB/s, "
              f"compare {core['compare_gbps']:.2f} GB/s ({core['compare_vs_copy']:.2f} x copy)")
        if args.json:
            print(json.dumps({"workload": {"name": "numpy-core"}, "core": core}))
        return
    specs = MATRIX if args.matrix else [(512 * args.scale, args.procs, args.dup)]
    args.dup_of = {}
    lines = []
    for mib, procs, dup in specs:
        w = bench_workload(mib / 512, procs, dup)
        args.dup_of[w.name] = dup
        lines.append(run_workload(w, args))
    if args.json:
        for line in lines:
            print(json.dumps(line))
    if args.plot:
        plot(lines, args.plot)


def markdown_table(lines: list[dict]) -> str:
    def f(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    head = ("| MiB | tasks | dup | kernel converge s | ksmlab converge s | kernel pass 1 p/s | "
            "ksmlab pass 1 p/s | kernel steady p/s | ksmlab steady p/s | ratio converge / pass 1 / "
            "steady | kernel run=2 s | ksmlab run=2 s | ksmlab shm MiB | ksmd RSS MiB | boot s | spawn s |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for ln in lines:
        w, k, m, r = ln["workload"], ln.get("kernel") or {}, ln.get("ksmlab") or {}, ln.get("ratio") or {}
        out.append(
            f"| {w['mib']} | {w['tasks']} | {round(w['dup'] * 100)}% | {f(k.get('converge_s'), '.2f')} | "
            f"{f(m.get('converge_s'), '.1f')} | {f(k.get('pass1_pps'), ',.0f')} | {f(m.get('pass1_pps'), ',.0f')} | "
            f"{f(k.get('steady_pps'), ',.0f')} | {f(m.get('steady_pps'), ',.0f')} | "
            f"{f(r.get('converge'), '.3f')} / {f(r.get('pass1'), '.3f')} / {f(r.get('steady'), '.3f')} | "
            f"{f(k.get('unmerge_s'), '.2f')} | {f(m.get('unmerge_s'), '.1f')} | {f(m.get('shm_mib'), '.0f')} | "
            f"{f(m.get('ksmd_rss_mib'), '.0f')} | {f(m.get('boot_s'), '.2f')} | {f(m.get('spawn_s'), '.2f')} |"
        )
    return "\n".join(out)


def plot(lines: list[dict], path: str) -> None:
    """Converge time and ksmd memory against pages, tasks and duplicates (log scales)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("--plot needs matplotlib: .venv/bin/pip install -e '.[plot]'")
    base = {"pages": 131072, "tasks": 4, "dup": 0.5}
    axes = [("pages", "pages (4 KiB)"), ("tasks", "tasks"), ("dup", "duplicate share")]
    fig, ax = plt.subplots(2, 3, figsize=(13, 7))
    for col, (key, label) in enumerate(axes):
        pts = sorted((ln for ln in lines if all(ln["workload"][k] == v for k, v in base.items() if k != key)),
                     key=lambda ln: ln["workload"][key])
        xs = [ln["workload"][key] for ln in pts]
        for side, style in (("kernel", "o-"), ("ksmlab", "s-")):
            ys = [(ln.get(side) or {}).get("converge_s") for ln in pts]
            if any(y is not None for y in ys):
                ax[0][col].plot(xs, ys, style, label=side)
        mem = [(ln.get("ksmlab") or {}).get("shm_mib") for ln in pts]
        rss = [(ln.get("ksmlab") or {}).get("ksmd_rss_mib") for ln in pts]
        ax[1][col].plot(xs, mem, "s-", label="ksmlab shared memory")
        ax[1][col].plot(xs, rss, "^-", label="ksmlab ksmd peak RSS")
        ax[0][col].set_title(f"converge time vs {label}")
        ax[1][col].set_title(f"memory vs {label}")
        ax[1][col].set_xlabel(label)
        ax[0][col].set_ylabel("seconds")
        ax[1][col].set_ylabel("MiB")
        for a in (ax[0][col], ax[1][col]):
            if key != "dup":
                a.set_xscale("log", base=2)
            a.grid(True, alpha=0.3)
            a.legend(fontsize=8)
        ax[0][col].set_yscale("log")
    fig.suptitle("bench/bench_ksmd.py --matrix: the real ksmd and ksmlab's on the same workloads")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
