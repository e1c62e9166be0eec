# Reaching a running cluster from another process: `ksmlab stat` and `ksmlab ctl`.
#
# A run folder holds cluster.json (segment names, socket endpoints, supervisor
# pid). Reading /sys/kernel/mm/ksm is a lock-free read of the shared ksm record,
# so stat attaches the kernel segment and reads it; a knob write is a message to
# the run's sysfs/ctl actor, which applies the kernel's store handler.
from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from typing import Any

from actors.kernel import sysfs
from protocol import auth, codec, endpoints
from shared_mem.layout import KernelMemory
from shared_mem.segment import list_segments, owned_by_us, pid_alive


class NoRun(Exception):
    pass


def _owner_pid(cfg: dict) -> int:
    name = next(iter(cfg["km"]["segs"].values()))
    return int(name.split("_")[1])


def find_run(run_dir: str | None, root: str = "runs") -> dict:
    """The cluster.json of a live run (the newest under ./runs if none is named)."""
    cands = [run_dir] if run_dir else sorted(glob.glob(os.path.join(root, "*")), key=os.path.getmtime,
                                             reverse=True)
    for d in cands:
        path = os.path.join(d, "cluster.json")
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
        if pid_alive(_owner_pid(cfg)) and list_segments(cfg["run_id"]):
            return cfg
        if run_dir:
            raise NoRun(f"the run in {run_dir} is not running")
    raise NoRun("no running cluster found (start one with ./run.sh or name its folder with --run)")


@contextlib.contextmanager
def attach(cfg: dict) -> Iterator[KernelMemory]:
    km = KernelMemory.attach(cfg["km"])
    try:
        yield km
    finally:
        km.close()


def sysfs_files(km: KernelMemory) -> dict[str, str]:
    class _View:  # sysfs.show() only reads k.ksm
        ksm = km.ksm[0]

    out = {}
    for name in sysfs.ALL_FILES:
        out[name] = sysfs.show(_View, name)  # type: ignore[arg-type]
    return out


def sysfs_write(cfg: dict, knob: str, value: str, timeout: float = 60.0) -> str:
    ctx = endpoints.make_context()
    try:
        seal = auth.Seal.of_run(cfg["secret"])
        s = endpoints.connect_dealer(ctx, cfg["endpoints"]["ctl"], auth.routing_id("cli", str(os.getpid())))
        s.send(seal.encode(codec.request("sysfs_write", 1, "cli", knob=knob, value=str(value))))
        if not s.poll(int(timeout * 1000)):
            raise TimeoutError("the ctl actor did not answer")
        msg = seal.decode(s.recv())
        return codec.unwrap_reply(msg)["value"]
    finally:
        ctx.destroy(linger=0)


class Console:
    """A run's terminal: log lines, and one status line that a terminal redraws in place.

    On a terminal the status line lives at the bottom of stderr (carriage return, erase
    line) and a log line first erases it, prints, then draws it again, so checks and
    counters never interleave; anywhere else (a pipe, CI) both are plain lines.
    """

    def __init__(self, out: Any = None, err: Any = None) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.tty = self.err.isatty()
        self.status_text = ""

    def line(self, text: str) -> None:
        if self.tty and self.status_text:
            self.err.write("\r\x1b[K")
            self.err.flush()
        self.out.write(text + "\n")
        self.out.flush()
        if self.tty and self.status_text:
            self.err.write(self.status_text)
            self.err.flush()

    def status(self, text: str) -> None:
        if self.tty:
            self.status_text = text
            self.err.write("\r\x1b[K" + text)
        else:
            self.err.write(text + "\n")
        self.err.flush()

    def done(self) -> None:
        if self.tty and self.status_text:
            self.err.write("\n")
            self.err.flush()
        self.status_text = ""


async def status_loop(booted: list, console: Console | None = None, peak: dict | None = None,
                      every: float = 1.0) -> None:
    """Live KSM statistics while a scenario runs; `peak` keeps every sysfs file (counters
    and knobs) as it stood when pages_sharing was highest."""
    console = console or Console()
    t0 = time.monotonic()
    while True:
        await asyncio.sleep(every)
        if not booted:
            continue
        c = booted[0]
        if c.stopped or c.km is None:
            return
        k = c.ksm_counters()
        if peak is not None and k["pages_sharing"] > peak.get("pages_sharing", -1):
            peak.clear()
            peak.update({**c.ksm_knobs(), **k, "_t_s": round(time.monotonic() - t0, 1)})
        console.status(
            f"[{time.monotonic() - t0:6.1f}s] full_scans {k['full_scans']} shared {k['pages_shared']} "
            f"sharing {k['pages_sharing']} unshared {k['pages_unshared']} volatile {k['pages_volatile']} "
            f"zero {k['ksm_zero_pages']} free frames {c.nr_free_frames()}/{c.opts.frames}")


_RUN_ID = re.compile(r"^[0-9a-f]{8}$")


def sweep_socket_dirs(dry_run: bool = False, skipped: list[str] | None = None) -> list[str]:
    """Socket folders /tmp/ksmlab-<run id> of runs that have no segments left.

    Only folders named with a run id (8 hex digits) are considered, and only their
    *.sock files are removed, then the folder if that leaves it empty: anything else
    someone keeps under a similar name is left alone.
    """
    out = []
    for d in glob.glob(endpoints.FALLBACK_PREFIX + "*"):
        rid = d[len(endpoints.FALLBACK_PREFIX):]
        if not _RUN_ID.match(rid) or not os.path.isdir(d) or os.path.islink(d) or list_segments(rid):
            continue
        if not owned_by_us(d):
            if skipped is not None:
                skipped.append(f"{d}: owned by uid {os.lstat(d).st_uid}, not by us")
            continue
        if not dry_run:
            endpoints.cleanup(d)
        out.append(d)
    return out


def describe(cfg: dict) -> dict[str, Any]:
    return {"run_id": cfg["run_id"], "run_dir": cfg["run_dir"], "seed": cfg["seed"]}
