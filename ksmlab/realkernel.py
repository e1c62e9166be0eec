# Runs a ksmlab Workload on this machine's real kernel KSM (/sys/kernel/mm/ksm): one forked
# process per workload process maps and fills its pages, madvises them MERGEABLE, and the
# parent drives ksmd until the counters converge. KsmKnobs saves and restores every sysfs knob
# so a run (or a crash in one) leaves the machine's KSM configuration as it found it.
#
# Foreign mergeable memory: `run=2` unmerges everything, so pages_shared/pages_sharing must
# read 0 right after it (else KsmError). Other processes with MADV_MERGEABLE/PR_SET_MEMORY_MERGE
# memory would still be scanned once `run=1`, and their pages can merge with ours (zero pages,
# for instance), so their contribution cannot be subtracted. run_workload therefore refuses to
# measure: it raises ForeignMergeableMemory if such a process exists before the run, appears
# during it, or if the global rmap_item total differs from the sum of our children's
# /proc/PID/ksm_stat ksm_rmap_items at the end.
from __future__ import annotations

import contextlib
import mmap
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import NoReturn

from actors import pdeath
from ksmlab.workloads import CONVERGENCE_KEYS, Workload

KSM_SYSFS = Path("/sys/kernel/mm/ksm")

#: Read-only statistics files (the ones present on the running kernel are read).
COUNTERS: tuple[str, ...] = (
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "pages_scanned",
    "pages_skipped",
    "full_scans",
    "stable_node_chains",
    "stable_node_dups",
    "ksm_zero_pages",
    "general_profit",
)


# Knobs that return EBUSY while KSM pages exist: restored right after run=2.
_EBUSY_KNOBS = ("merge_across_nodes", "max_page_sharing")

_MADV_MERGEABLE = getattr(mmap, "MADV_MERGEABLE", 12)
_MADV_NOHUGEPAGE = getattr(mmap, "MADV_NOHUGEPAGE", 15)


class KsmError(RuntimeError):
    """The real kernel's KSM could not be driven or measured as required."""


class ForeignMergeableMemory(KsmError):
    """Processes other than the workload's have KSM-mergeable memory; counters would be mixed."""

    def __init__(self, message: str, pids: list[int]) -> None:
        super().__init__(message)
        self.pids = pids


# ---------------------------------------------------------------------------------------------
# sysfs access


def _parse(name: str, text: str) -> str:
    text = text.strip()
    if name == "advisor_mode" or ("[" in text and "]" in text):
        # "[none] scan-time" -> "none"
        start = text.find("[")
        end = text.find("]", start)
        if start >= 0 and end > start:
            return text[start + 1 : end]
    return text


def read_knob(name: str, root: Path = KSM_SYSFS) -> str:
    """Current value of one file in ``root`` (bracketed choice lists reduced to the choice)."""
    return _parse(name, (root / name).read_text())


def write_knob(name: str, value: int | str, root: Path = KSM_SYSFS) -> None:
    """Write ``value`` to ``root/name`` (raises OSError with the kernel's errno on refusal)."""
    fd = os.open(root / name, os.O_WRONLY)
    try:
        os.write(fd, f"{value}\n".encode())
    finally:
        os.close(fd)


def _is_writable(path: Path) -> bool:
    # root passes access(W_OK) even on 0444 sysfs files; opening for write is the real test
    # (kernfs refuses files without a store method with EACCES, a ro mount with EROFS).
    if not path.is_file() or not (path.stat().st_mode & 0o222):
        return False
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError:
        return False
    os.close(fd)
    return True


def ksm_available(root: Path = KSM_SYSFS) -> bool:
    """True when ``root/run`` exists and can be opened for writing."""
    return _is_writable(root / "run")


def writable_knobs(root: Path = KSM_SYSFS) -> list[str]:
    """Names of every writable file in ``root`` (sorted)."""
    return sorted(p.name for p in root.iterdir() if p.is_file() and p.stat().st_mode & 0o222)


def read_knobs(root: Path = KSM_SYSFS) -> dict[str, str]:
    """Snapshot of every writable knob."""
    return {name: read_knob(name, root) for name in writable_knobs(root)}


def read_counters(root: Path = KSM_SYSFS) -> dict[str, int]:
    """Every read-only statistics file in ``root`` as an int."""
    out: dict[str, int] = {}
    for p in sorted(root.iterdir()):
        if not p.is_file() or p.stat().st_mode & 0o222:
            continue
        try:
            out[p.name] = int(p.read_text().strip())
        except (OSError, ValueError):
            continue
    return out


def read_ksm_stat(pid: int) -> dict[str, int | str]:
    """/proc/PID/ksm_stat as a dict (numbers as int, yes/no as str); {} if unreadable."""
    out: dict[str, int | str] = {}
    try:
        text = Path(f"/proc/{pid}/ksm_stat").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, val = line.replace(":", " ").partition(" ")
        val = val.strip()
        out[key] = int(val) if val.lstrip("-").isdigit() else val
    return out


def foreign_mergeable_pids(exclude: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """Pids (other than ``exclude`` and ourselves) whose memory KSM may scan."""
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid == me or pid in exclude:
            continue
        st = read_ksm_stat(pid)
        if (
            st.get("ksm_mergeable") == "yes"
            or st.get("ksm_merge_any") == "yes"
            or st.get("ksm_rmap_items", 0)
        ):
            found.append(pid)
    return sorted(found)


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Defer SIGINT (delivered on exit) so a Ctrl-C cannot cut a knob restore in half."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class KsmKnobs:
    """Saves every writable knob in ``root`` on enter and restores all of them on exit.

    The restore also runs on exceptions and KeyboardInterrupt (SIGINT is deferred during it).
    Order: ``run=2`` (unmerge all, so the EBUSY knobs can change), merge_across_nodes and
    max_page_sharing, advisor_mode=none (pages_to_scan is EINVAL otherwise), the other knobs,
    the saved advisor_mode, and ``run`` last. Only knobs whose value differs are written.
    """

    def __init__(self, root: Path = KSM_SYSFS) -> None:
        self.root = root
        self.saved: dict[str, str] = {}

    def __enter__(self) -> KsmKnobs:
        self.saved = read_knobs(self.root)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.restore()

    def __getitem__(self, name: str) -> str:
        return read_knob(name, self.root)

    def __setitem__(self, name: str, value: int | str) -> None:
        self.set(name, value)

    def set(self, name: str, value: int | str) -> None:
        """Write a knob, skipping the write when it already holds ``value`` (avoids EBUSY)."""
        if name != "run" and read_knob(name, self.root) == str(value):
            return
        try:
            write_knob(name, value, self.root)
        except OSError as e:
            raise KsmError(f"cannot set {name}={value}: {e}") from e

    def read_counters(self) -> dict[str, int]:
        return read_counters(self.root)

    def _write_run(self, value: int) -> None:
        for attempt in range(5):
            try:
                write_knob("run", value, self.root)
                return
            except InterruptedError:
                continue
            except OSError:
                # run=2 can fail with ENOMEM/ERESTARTSYS while unmerging; retry briefly.
                if attempt == 4:
                    raise
                time.sleep(0.05)

    def restore(self) -> None:
        """Put every saved knob back (see class docstring for the order)."""
        if not self.saved:
            return
        errors: list[str] = []

        def put(name: str, value: str) -> None:
            try:
                if read_knob(name, self.root) != value:
                    write_knob(name, value, self.root)
            except OSError as e:
                errors.append(f"{name}={value}: {e}")

        with _sigint_blocked():
            try:
                self._write_run(2)
            except OSError as e:
                errors.append(f"run=2: {e}")
            for name in _EBUSY_KNOBS:
                if name in self.saved:
                    put(name, self.saved[name])
            if "advisor_mode" in self.saved:
                put("advisor_mode", "none")
            late = ("advisor_mode", "run", *_EBUSY_KNOBS)
            for name, value in self.saved.items():
                if name not in late:
                    put(name, value)
            if "advisor_mode" in self.saved:
                put("advisor_mode", self.saved["advisor_mode"])
            if "run" in self.saved:
                put("run", self.saved["run"])
        if errors:
            raise KsmError("could not restore KSM knobs: " + "; ".join(errors))


# ---------------------------------------------------------------------------------------------
# worker processes


def _child_main(image: bytes, ready_w: int, done_r: int, close_fds: list[int]) -> NoReturn:
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we go
        pdeath.set_pdeathsig()
        for fd in close_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        # MAP_PRIVATE|MAP_ANONYMOUS: mmap.mmap(-1, n) alone is MAP_SHARED, which KSM never merges.
        m = mmap.mmap(
            -1,
            len(image),
            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
        m.madvise(_MADV_NOHUGEPAGE)
        m[:] = image  # writes (faults in) every page, zero pages included
        m.madvise(_MADV_MERGEABLE)
        os.write(ready_w, b"R")
        while os.read(done_r, 64):  # EOF when the parent closes (or dies)
            pass
    except BaseException as e:
        code = 1
        with contextlib.suppress(BaseException):
            os.write(ready_w, b"E" + repr(e).encode()[:400])
    finally:
        os._exit(code)


class _Children:
    """Forks one worker per process image; never leaves one behind."""

    def __init__(self, images: list[bytes]) -> None:
        self.images = images
        self.pids: list[int] = []
        self.ready_fds: dict[int, int] = {}  # fd -> child index
        self.ready_seen: set[int] = set()     # ready fds already waited on
        self.done_w: int | None = None

    def start(self, deadline: float | None = None) -> None:
        """Fork the workers. With a deadline, each must be ready (its area advised
        MERGEABLE) before the next is forked: the kernel's mm list, which is ksmd's scan
        order, is then the workers' order, as it is in the model, so that which copies a
        chain's dups pair up is the same on both sides."""
        done_r, done_w = os.pipe()
        self.done_w = done_w
        try:
            for i, image in enumerate(self.images):
                ready_r, ready_w = os.pipe()
                close_in_child = [done_w, ready_r, *self.ready_fds]
                pid = os.fork()
                if pid == 0:  # pragma: no cover - child
                    _child_main(image, ready_w, done_r, close_in_child)
                os.close(ready_w)
                self.pids.append(pid)
                self.ready_fds[ready_r] = i
                if deadline is not None:
                    self.wait_ready(deadline)
        finally:
            os.close(done_r)

    def wait_ready(self, deadline: float) -> None:
        pending = {fd: i for fd, i in self.ready_fds.items() if fd not in self.ready_seen}
        self.ready_seen.update(pending)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(pending)} worker(s) not ready before the deadline")
            rlist, _, _ = select.select(list(pending), [], [], min(left, 0.5))
            for fd in rlist:
                msg = os.read(fd, 512)
                idx = pending.pop(fd)
                if msg[:1] != b"R":
                    why = msg[1:].decode(errors="replace") if msg else "exited without a word"
                    raise KsmError(f"worker {idx} (pid {self.pids[idx]}) failed: {why}")

    def check_alive(self) -> None:
        for i, pid in enumerate(self.pids):
            got, status = os.waitpid(pid, os.WNOHANG)
            if got:
                self.pids[i] = -1
                raise KsmError(f"worker {i} (pid {pid}) died early (status {status:#x})")

    def live_pids(self) -> list[int]:
        return [p for p in self.pids if p > 0]

    def stop(self, grace: float) -> None:
        """Tell workers to exit, wait up to ``grace`` s, SIGKILL stragglers, reap all."""
        if self.done_w is not None:
            os.close(self.done_w)
            self.done_w = None
        for fd in list(self.ready_fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.ready_fds.clear()
        end = time.monotonic() + grace
        live = set(self.live_pids())
        while live and time.monotonic() < end:
            for pid in list(live):
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG)[0] == 0:
                        continue
                live.discard(pid)
            if live:
                time.sleep(0.005)
        for pid in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in live:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.pids = [-1] * len(self.pids)


# ---------------------------------------------------------------------------------------------
# the runner


@dataclass
class KernelRun:
    """Everything measured by one ``run_workload_report``."""

    workload: str
    counters: dict[str, int]
    knobs: dict[str, str]
    proc_stats: list[dict[str, int | str]] = field(default_factory=list)
    converge_scans: int = 0  # full_scans at the converged snapshot
    snapshots: int = 0
    wall_seconds: float = 0.0
    #: The global ksm_zero_pages left after run=2 emptied KSM before the run: zero pages the
    #: kernel's fork race has leaked into the counter for good (docs/bugs/zero-pages-fork.md).
    zero_page_residue: int = 0
    #: The counters after the first run=2, before any page of this run was scanned: the
    #: cumulative ones (pages_scanned, full_scans) of this run are the difference.
    start_counters: dict[str, int] = field(default_factory=dict)
    #: With ``steps=True``: the counters after every ksmd batch (read with run=0, so at a
    #: batch boundary), pages_scanned and full_scans counted from start_counters.
    steps: list[dict[str, int]] = field(default_factory=list)


def without_zero_page_residue(counters: dict[str, int], residue: int) -> dict[str, int]:
    """The counters as this run made them: ``residue`` leaked KSM zero pages taken out of
    ``ksm_zero_pages`` and of ``general_profit``, which counts each of them as a saved page.
    run=2 does not clear a leaked count, so after one fork race on this boot every later
    absolute reading would be off by it."""
    if not residue:
        return counters
    out = dict(counters)
    out["ksm_zero_pages"] = out.get("ksm_zero_pages", 0) - residue
    if "general_profit" in out:
        out["general_profit"] -= residue * mmap.PAGESIZE
    return out


def _wait_counter(root: Path, name: str, done: Callable[[int], bool], deadline: float,
                  kids: _Children, what: str, poll_s: float = 0.001) -> int:
    """Poll /sys/kernel/mm/ksm/NAME until done(value); returns the value. The workers are
    checked now and then (one that died would leave us waiting on a scan for nothing)."""
    polls = 0
    while True:
        v = int((root / name).read_text())
        if done(v):
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} stuck at {v} ({what})")
        polls += 1
        if polls % max(1, int(0.05 / poll_s)) == 0:
            kids.check_alive()
        time.sleep(poll_s)


def _wait_batch(root: Path, scanned: int, deadline: float, kids: _Children) -> None:
    """Until ksmd has scanned a page past `scanned` (a batch has begun; run=0 then waits
    for it to end, since run_store takes ksm_thread_mutex)."""
    _wait_counter(root, "pages_scanned", lambda v: v != scanned, deadline, kids, "no batch ran", 0.0002)


def _wait_full_scans(root: Path, target: int, deadline: float, kids: _Children) -> int:
    return _wait_counter(root, "full_scans", lambda v: v >= target, deadline, kids, f"< {target}")


def run_workload_report(
    w: Workload,
    *,
    smart_scan: int = 0,
    use_zero_pages: int = 0,
    max_page_sharing: int = 256,
    merge_across_nodes: int = 1,
    pages_to_scan: int | None = None,
    sleep_millisecs: int = 0,
    stable_scans: int = 2,
    timeout: float = 60.0,
    root: Path = KSM_SYSFS,
    steps: bool = False,
    max_steps: int = 400,
) -> KernelRun:
    """Run ``w`` on the real kernel until the counters converge; see ``run_workload``.

    steps: stop ksmd after every batch (run=1 until a batch begins, then run=0, which
    waits for it to end) and keep every snapshot in ``KernelRun.steps``; the run ends when
    the CONVERGENCE_KEYS have not moved for ``stable_scans`` full scans (and at least two
    passes are done), or after ``max_steps`` snapshots."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    if not ksm_available(root):
        raise KsmError(f"{root}/run is not writable")
    images = [w.process_image(i) for i in range(w.n_procs)]
    if pages_to_scan is None:
        pages_to_scan = max(100, w.total_pages)
    with KsmKnobs(root) as knobs:
        knobs.set("run", 2)
        c0 = read_counters(root)
        if c0.get("pages_shared", 0) or c0.get("pages_sharing", 0):
            raise KsmError(f"KSM pages remain after run=2: {c0}")
        foreign = foreign_mergeable_pids()
        if foreign:
            raise ForeignMergeableMemory(
                f"other processes have KSM-mergeable memory: {foreign}", foreign
            )
        if "advisor_mode" in knobs.saved:
            knobs.set("advisor_mode", "none")
        if "merge_across_nodes" in knobs.saved:  # CONFIG_NUMA only
            knobs.set("merge_across_nodes", merge_across_nodes)
        elif merge_across_nodes != 1:
            raise KsmError("this kernel has no merge_across_nodes knob")
        knobs.set("max_page_sharing", max_page_sharing)
        knobs.set("use_zero_pages", use_zero_pages)
        if "smart_scan" in knobs.saved:
            knobs.set("smart_scan", smart_scan)
        elif smart_scan:
            raise KsmError("this kernel has no smart_scan knob")
        knobs.set("pages_to_scan", pages_to_scan)
        knobs.set("sleep_millisecs", sleep_millisecs)
        used = read_knobs(root)

        kids = _Children(images)
        try:
            with _sigint_blocked():  # no Ctrl-C between a fork and recording its pid
                kids.start(deadline)
            kids.wait_ready(deadline)
            start = int((root / "full_scans").read_text())

            def snapshot() -> dict[str, int]:
                knobs.set("run", 0)  # the kernel's tests read with ksmd stopped
                return read_counters(root)

            stepped: list[dict[str, int]] = []
            if steps:
                cur = ref = read_counters(root)
                while len(stepped) < max_steps:
                    knobs.set("run", 1)
                    _wait_batch(root, cur["pages_scanned"], deadline, kids)
                    cur = snapshot()
                    step = {k: cur[k] - c0.get(k, 0) if k in ("pages_scanned", "full_scans") else cur[k]
                            for k in cur}
                    stepped.append(without_zero_page_residue(step, c0.get("ksm_zero_pages", 0)))
                    if any(cur.get(k) != ref.get(k) for k in CONVERGENCE_KEYS):
                        ref = cur
                    elif cur["full_scans"] >= max(ref["full_scans"] + stable_scans, start + 2):
                        break
                n_snap = len(stepped)
            else:
                knobs.set("run", 1)
                _wait_full_scans(root, start + 2, deadline, kids)
                prev = snapshot()
                n_snap = 1
                while True:
                    knobs.set("run", 1)
                    _wait_full_scans(root, prev["full_scans"] + stable_scans, deadline, kids)
                    cur = snapshot()
                    n_snap += 1
                    if all(cur.get(k) == prev.get(k) for k in CONVERGENCE_KEYS):
                        break
                    prev = cur
            # still run=0: per-process view, and the foreign-memory cross-check
            mine = set(kids.live_pids())
            stats = [read_ksm_stat(pid) for pid in kids.live_pids()]
            foreign = foreign_mergeable_pids(exclude=mine)
            own_items = sum(int(s.get("ksm_rmap_items", 0)) for s in stats)
            total_items = sum(
                cur.get(k, 0)
                for k in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile")
            )
            if foreign or (stats and own_items != total_items):
                raise ForeignMergeableMemory(
                    f"foreign KSM activity: pids {foreign}, rmap_items {total_items} "
                    f"vs ours {own_items}",
                    foreign,
                )
            knobs.set("run", 2)
            kids.stop(grace=5.0)
        finally:
            kids.stop(grace=0.0)  # no-op after a clean stop; kills everything on errors
    return KernelRun(
        workload=w.name,
        counters=without_zero_page_residue(cur, c0.get("ksm_zero_pages", 0)),
        zero_page_residue=c0.get("ksm_zero_pages", 0),
        start_counters=c0,
        knobs=used,
        proc_stats=stats,
        converge_scans=cur["full_scans"],
        snapshots=n_snap,
        wall_seconds=time.monotonic() - t0,
        steps=stepped,
    )


def run_workload(
    w: Workload,
    *,
    smart_scan: int = 0,
    use_zero_pages: int = 0,
    max_page_sharing: int = 256,
    merge_across_nodes: int = 1,
    pages_to_scan: int | None = None,
    sleep_millisecs: int = 0,
    stable_scans: int = 2,
    timeout: float = 60.0,
    root: Path = KSM_SYSFS,
) -> dict[str, int]:
    """Run ``w`` on this machine's KSM and return the converged counters (read with run=0).

    Steps: save all knobs; ``run=2``; check no KSM pages remain and no other process has
    mergeable memory; set the knobs (``pages_to_scan`` defaults to max(100, total pages));
    fork one worker per process (MAP_PRIVATE|MAP_ANONYMOUS, MADV_NOHUGEPAGE, fill,
    MADV_MERGEABLE); once all are ready ``run=1``; wait for 2 full scans, then until the
    CONVERGENCE_KEYS are equal across snapshots ``stable_scans`` full scans apart; ``run=2``;
    stop and reap the workers; restore every knob. Raises TimeoutError after ``timeout`` s,
    KsmError / ForeignMergeableMemory otherwise; workers are killed on any error.
    """
    return run_workload_report(
        w,
        smart_scan=smart_scan,
        use_zero_pages=use_zero_pages,
        max_page_sharing=max_page_sharing,
        merge_across_nodes=merge_across_nodes,
        pages_to_scan=pages_to_scan,
        sleep_millisecs=sleep_millisecs,
        stable_scans=stable_scans,
        timeout=timeout,
        root=root,
    ).counters
