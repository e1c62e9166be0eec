# The supervisor and the scenario API.
#
# A Cluster is "init + boot": it creates the run's shared kernel memory and locks,
# starts every kernel actor as its own OS process, watches them, collects their
# reports, and tears everything down (processes, /dev/shm segments, sockets) on
# stop, on Ctrl-C, and when any actor dies unexpectedly - that ends the run with
# a report. A hung-task watchdog turns a deadlock into a report and the end of the
# run instead of a hang. Scenarios drive it through an async API that mirrors the
# system calls (Task.mmap, .madvise, .memset, .fork, ...), sysfs (sysfs_read /
# sysfs_write by file name) and waits on KSM's own counters (wait_full_scans).
from __future__ import annotations

import asyncio
import contextlib
import errno as errno_mod
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from actors import pdeath, zygote
from actors.boot import boot_kernel
from actors.entry import actor_main
from actors.kernel import fork as forkops
from actors.kernel import sysfs
from actors.kernel.context import Kernel
from actors.kernel.invariants import check_invariants, leaks_after_teardown
from actors.kernel.ksm_scan import SCAN_MODES
from actors.kernel.schedule import PlanSpec, check_points
from actors.kernel.variants import Variants
from actors.log import EventLog
from actors.registry import KERNEL_ACTORS
from actors.waits import within
from protocol import auth, codec, endpoints
from protocol.abi import MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE
from protocol.codec import ProtocolError
from shared_mem.layout import Geometry, check_fits
from shared_mem.locks import IMPLS, find_hung
from shared_mem.segment import sweep_stale

SIGNAMES = {getattr(signal, n): n for n in dir(signal) if n.startswith("SIG") and not n.startswith("SIG_")}


TRACED_COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "full_scans",
                   "stable_node_chains", "ksm_zero_pages")


class ClusterError(Exception):
    pass


class ClusterCrashed(ClusterError):
    """The run ended early: an actor died or a watchdog fired. .reports says why."""

    def __init__(self, msg: str, reports: list[dict]) -> None:
        super().__init__(msg)
        self.reports = reports


class SyscallFailed(OSError):
    """An error return of a modelled syscall or sysfs write; .errno is the kernel's errno."""


@dataclass
class ClusterOptions:
    frames: int = 4096
    nodes: int = 1
    seed: int | None = None
    variants: tuple[str, ...] = ()
    delays: dict[str, float] = field(default_factory=dict)
    run_dir: str | None = None
    runs_root: str = "runs"
    trace_locks: bool = True
    ksm_tracepoints: bool = True       # the per-page KSM events (log.KSM_PAGE_TRACEPOINTS)
    shadow: bool = True
    hung_task_timeout: float = 10.0
    oom_reaper_delay: float = 0.2
    max_tasks: int = 64
    max_mms: int = 64
    va_pages: int = 1 << 18
    swap_slots: int = 0
    boot_timeout: float = 60.0
    echo_reports: bool = False
    sched: str = "pct"                 # schedule plan strategy: pct | random | none
    depth: int = 3                     # PCT depth d
    stop_on_report: bool = False       # end the run at its first report (stress campaigns)
    scenario: dict[str, Any] = field(default_factory=dict)  # name and args, for replay
    coverage: str | None = None        # folder for kernel-path coverage data (ksmlab.kcov)
    time_limit: float | None = None    # the scenario's deadline in seconds (None: its default)
    chaos: float = 0.0                 # chaos events a second: SIGSTOP an actor, SIGKILL an idle task
    scan: str = "batch"                # ksmd's ksm_do_scan: batch (vectorized runs) | exact (per page)
    locks: str = "word"                # lock implementation: word (shared-word CAS) | ofd (OFD byte locks)
    fork_server: bool = True           # fork actors from a server that has imported them (actors/zygote.py)

    def geometry(self) -> Geometry:
        return Geometry(nr_frames=self.frames, nr_nodes=self.nodes, max_tasks=self.max_tasks,
                        max_mms=self.max_mms, va_pages=self.va_pages, nr_swap_slots=self.swap_slots)

    def check(self) -> Geometry:
        """Every option checked before anything is created: ValueError (EINVAL) for a value
        no run can have, OSError(ENOMEM) for a machine this host cannot hold."""
        geo = self.geometry()
        for name in ("hung_task_timeout", "boot_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)!r}")
        if self.time_limit is not None and not 0 < self.time_limit < float("inf"):
            raise ValueError(f"time_limit must be a positive number of seconds, not {self.time_limit!r}")
        if not 0 <= self.chaos <= 100:
            raise ValueError(f"chaos must be 0..100 events per second, not {self.chaos!r}")
        if not self.oom_reaper_delay >= 0:
            raise ValueError(f"oom_reaper_delay must not be negative, not {self.oom_reaper_delay!r}")
        bad = {p: v for p, v in self.delays.items() if not 0 <= v < float("inf")}
        if bad:
            raise ValueError(f"delays must be finite and not negative: {bad}")
        if self.scan not in SCAN_MODES:
            raise ValueError(f"scan must be one of {sorted(SCAN_MODES)}, not {self.scan!r}")
        if self.locks not in IMPLS:
            raise ValueError(f"locks must be one of {sorted(IMPLS)}, not {self.locks!r}")
        Variants(self.variants)
        check_points(self.delays)
        PlanSpec(seed=0, strategy=self.sched, depth=self.depth)
        check_fits(geo)
        return geo


def _errno_of(reply: dict) -> int:
    return int(reply.get("errno") or errno_mod.EIO)


_STATE_NAMES = {"T": "stopped (SIGSTOP)", "t": "stopped by a tracer", "Z": "dead (zombie)", "X": "dead", "?": "gone"}


def proc_state(pid: int) -> str:
    """The state letter of /proc/PID/stat (R, S, D, T, Z, ...), "?" if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


CHAOS_KILL_SHARE = 0.1


class _Peer:
    """A DEALER to one actor with replies matched to requests by id."""

    def __init__(self, cluster: Cluster, name: str, ep: str) -> None:
        self.name = name
        self.seal = cluster.seal
        self.sock = endpoints.connect_dealer(cluster.zctx, ep, auth.routing_id("supervisor", "api"))
        self.pending: dict[int, asyncio.Future] = {}
        self.sent: dict[int, tuple[str, int]] = {}     # request id -> (type, monotonic ns sent)
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while True:
            data = await self.sock.recv()
            try:
                msg = self.seal.decode(data)
            except ProtocolError:
                continue
            fut = self.pending.pop(msg["id"], None)
            self.sent.pop(msg["id"], None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    def fail_all(self, exc: BaseException) -> None:
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self.pending.clear()
        self.sent.clear()

    def close(self) -> None:
        self.reader.cancel()
        self.sock.close(linger=0)


class Task:
    """A user process of the model. Methods are its system calls and memory accesses."""

    def __init__(self, cluster: Cluster, pid: int, handle: int) -> None:
        self.cluster = cluster
        self.pid = pid
        self.handle = handle
        self.name = f"task-{pid}"
        self.exited: asyncio.Future = asyncio.get_running_loop().create_future()
        self.exiting = False          # exit() was called: no longer a target for chaos

    def __repr__(self) -> str:
        return f"<Task {self.pid}>"

    async def _call(self, mtype: str, **fields: Any) -> Any:
        if self.cluster.crashed is not None:  # the run ended: say why, not "exited"
            raise self.cluster.crashed
        if self.exited.done():
            raise SyscallFailed(errno_mod.ESRCH, f"ESRCH: {self.name} has exited")
        return await self.cluster.request(self.name, mtype, **fields)

    async def mmap(self, length: int, prot: int = PROT_READ | PROT_WRITE,
                   flags: int = MAP_PRIVATE | MAP_ANONYMOUS, addr: int = 0, nid: int = -1) -> int:
        """mmap(); nid >= 0 places the area's pages on that NUMA node (numa_alloc_onnode)."""
        return await self._call("mmap", length=length, prot=prot, flags=flags, addr=addr, nid=nid)

    async def munmap(self, addr: int, length: int) -> int:
        return await self._call("munmap", addr=addr, length=length)

    async def mprotect(self, addr: int, length: int, prot: int) -> int:
        return await self._call("mprotect", addr=addr, length=length, prot=prot)

    async def madvise(self, addr: int, length: int, advice: int) -> int:
        return await self._call("madvise", addr=addr, length=length, advice=advice)

    async def prctl(self, option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
        return await self._call("prctl", option=option, arg2=arg2, arg3=arg3, arg4=arg4, arg5=arg5)

    async def memset(self, addr: int, value: int, length: int, force: bool = False) -> None:
        await self._call("memset", addr=addr, value=value, length=length, force=force)

    async def write(self, addr: int, data: bytes, force: bool = False) -> None:
        """A store; force=True writes like /proc/PID/mem (FOLL_FORCE), past PROT_NONE."""
        await self._call("write", addr=addr, data=bytes(data), force=force)

    async def read(self, addr: int, length: int) -> bytes:
        return await self._call("read", addr=addr, length=length)

    async def mlockall(self, flags: int) -> int:
        return await self._call("mlockall", flags=flags)

    async def munlockall(self) -> int:
        return await self._call("munlockall")

    async def fork(self) -> Task:
        r = await self._call("fork")
        return self.cluster._adopt(r["pid"], r["task"])

    async def execve(self) -> None:
        """execve(): a fresh address space (merge-any survives, as MMF_INIT_MASK keeps it)."""
        await self._call("execve")

    async def exit(self, code: int = 0) -> None:
        self.exiting = True
        await self._call("exit", code=code)
        await self.wait_exit()

    async def wait_exit(self, timeout: float = 30.0) -> dict:
        return await within(asyncio.shield(self.exited), timeout)

    async def verify(self) -> dict:
        return await self._call("verify")

    async def ksm_stat(self) -> dict:
        """/proc/PID/ksm_stat."""
        return await self._call("ksm_stat")

    async def ksm_merging_pages(self) -> int:
        """/proc/PID/ksm_merging_pages."""
        return int((await self.ksm_stat())["ksm_merging_pages"])

    async def pagemap(self, addr: int, length: int) -> list[int]:
        """Frame numbers of [addr, addr+length) (-1 when not present), like /proc/PID/pagemap."""
        return await self._call("pagemap", addr=addr, length=length)


class Cluster:
    """One run of ksmlab: use as `async with Cluster(frames=...) as c:`."""

    def __init__(self, **options: Any) -> None:
        opts = ClusterOptions(**options)
        opts.check()
        if opts.seed is None:
            opts.seed = secrets.randbelow(1 << 31)
        self.opts = opts
        self.variants = Variants(opts.variants)
        self.plan = PlanSpec(seed=opts.seed, strategy=opts.sched, depth=opts.depth)
        self.run_id = secrets.token_hex(4)
        self.chaos_counts = {"stops": 0, "kills": 0}
        self._chaos_killed: set[int] = set()          # os pids of tasks chaos SIGKILLed
        self.reports: list[dict] = []
        self.procs: dict[str, subprocess.Popen | zygote.ForkedProcess] = {}
        self.forks: zygote.ForkServer | None = None
        self.peers: dict[str, _Peer] = {}
        self.tasks: dict[str, Task] = {}
        self.ready: dict[str, asyncio.Future] = {}
        self.crashed: ClusterCrashed | None = None
        self.stopped = False
        self._bg: list[asyncio.Task] = []
        self.km = None
        self.locks = None
        self.t_boot = time.monotonic()

    # -- lifetime -------------------------------------------------------------------------------
    @classmethod
    async def start(cls, **options: Any) -> Cluster:
        c = cls(**options)
        await c.boot()
        return c

    async def __aenter__(self) -> Cluster:
        await self.boot()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    async def boot(self) -> None:
        opts = self.opts
        self.t_boot = time.monotonic()
        sweep_stale()
        if opts.run_dir is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            opts.run_dir = os.path.join(opts.runs_root, f"{stamp}-{self.run_id}")
        self.run_dir = os.path.abspath(opts.run_dir)
        os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
        os.chmod(self.run_dir, 0o700)
        with contextlib.suppress(FileNotFoundError):      # a reused run folder: a new secret
            os.unlink(os.path.join(self.run_dir, auth.SECRET_FILE))
        self.secret_path = auth.new_secret(self.run_dir)
        self.seal = auth.Seal.of_run(self.secret_path)
        self.sock_dir = endpoints.socket_dir(self.run_dir, self.run_id)
        self.ev = EventLog(self.run_dir, "supervisor", self.run_id, opts.seed)
        try:
            await self._boot()
        except BaseException:
            await self.stop()
            raise

    async def _boot(self) -> None:
        opts = self.opts
        self.cfg_path = os.path.join(self.run_dir, "cluster.json")
        if opts.fork_server and not opts.coverage:
            # started first: it loads the actors' modules while the kernel's memory is made
            # (forked from this process when it can be: actors/zygote.py, ForkServer)
            self.forks = zygote.ForkServer(self.cfg_path, self._actor_env(),
                                           os.path.join(self.run_dir, "logs", "zygote.stderr"), main=actor_main)
            self.ev("spawn", actor="zygote", role="zygote", os_pid=self.forks.pid, forked=self.forks.forked)
        self.km, self.locks = boot_kernel(
            opts.geometry(), self.run_id, self.variants, SCAN_MODES[opts.scan], opts.locks
        )
        self.km.set_actor("supervisor", on_report=lambda r: self._add_report(r))
        self.locks.set_report_hook(lambda kind, title, text, data: self._add_report(
            {"kind": kind, "title": title, "text": text, "data": data}))
        self.locks.bind_context("supervisor")
        self.k = Kernel(self.km, self.locks, "supervisor", ev=self.ev, variants=self.variants)
        names = ["supervisor", *KERNEL_ACTORS]
        self.endpoints = {n: endpoints.endpoint(self.sock_dir, n) for n in names}
        self.cfg = {
            "run_id": self.run_id, "run_dir": self.run_dir, "seed": opts.seed,
            "sock_dir": self.sock_dir, "km": self.km.descriptor(), "locks": self.locks.descriptor(),
            "variants": self.variants.mask, "delays": opts.delays, "trace_locks": opts.trace_locks,
            "ksm_tracepoints": opts.ksm_tracepoints, "shadow": opts.shadow, "endpoints": self.endpoints, "secret": self.secret_path,
            "oom_reaper_delay": opts.oom_reaper_delay,
            "sched": self.plan.describe(), "options": self.describe(),
            "coverage": os.path.abspath(opts.coverage) if opts.coverage else None,
        }
        with open(self.cfg_path, "w", encoding="utf-8") as f:
            json.dump(self.cfg, f, indent=1)
        self.ev("boot", options=self.describe())
        self.zctx = zmq.asyncio.Context()
        self.zctx.linger = 0
        self.router = endpoints.bind_router(self.zctx, self.endpoints["supervisor"])
        loop = asyncio.get_running_loop()
        self._bg.append(loop.create_task(self._serve()))
        self._bg.append(loop.create_task(self._watch()))
        for name in KERNEL_ACTORS:
            self._spawn(name, name)
        await self._await_ready(list(KERNEL_ACTORS))
        for name in KERNEL_ACTORS:
            self.peers[name] = _Peer(self, name, self.endpoints[name])
        self._bg.append(loop.create_task(self._watchdog()))
        if opts.chaos:
            self._bg.append(loop.create_task(self._chaos()))
        self.ev("cluster_up", actors={n: p.pid for n, p in self.procs.items()})

    async def _exit_killed_task(self, t: Task) -> None:
        """A task chaos SIGKILLed between requests: what is left of it in the kernel goes
        the way of any killed task, through the exit path (do_exit, code 137), unless an
        exit is already under way for it (the exit actor then answers ESRCH)."""
        if t.name in self.peers:
            peer = self.peers.pop(t.name)
            peer.fail_all(SyscallFailed(errno_mod.ESRCH, f"ESRCH: {t.name} was killed"))
            peer.close()
        try:
            await self.request("exit", "do_exit", timeout=60, task=t.handle, code=128 + 9, reason="killed")
        except (SyscallFailed, ClusterError, TimeoutError) as e:
            self.ev("chaos_exit_failed", task=t.name, error=str(e))
        asyncio.get_running_loop().call_later(1.0, _settle_exit, t)

    # -- chaos ----------------------------------------------------------------------------------------
    async def _chaos(self) -> None:
        """rr's chaos mode turned on the machine itself: at seeded random times an actor
        process is stopped (SIGSTOP) for 10 ms to 1 s and continued, or, one time in ten,
        a task between two requests is SIGKILLed. A stop must change nothing but timing (a
        stop past the hung-task timeout is reported as one, naming the actor); a killed
        task is an exit, as a SIGKILL from outside is in the kernel, and the run goes on.
        Counts go to self.chaos_counts and the log (chaos_stop, chaos_kill)."""
        rng = random.Random(f"chaos:{self.opts.seed}")
        while not self.stopped and self.crashed is None:
            await asyncio.sleep(rng.expovariate(self.opts.chaos))
            live = sorted(n for n, p in self.procs.items() if p.poll() is None)
            if not live or self.stopped or self.crashed is not None:
                return
            idle = [n for n in live if self._idle_task(n)]
            if idle and rng.random() < CHAOS_KILL_SHARE:
                # Only a task between requests: in user mode, as the kernel would see a
                # SIGKILL from outside; its exit is then run for it (_watch).
                name = rng.choice(idle)
                pid = self.procs[name].pid
                self.chaos_counts["kills"] += 1
                self._chaos_killed.add(pid)
                self.ev("chaos_kill", actor=name, os_pid=pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                continue
            name = rng.choice(live)
            await self._chaos_stop(name, rng.uniform(0.01, 1.0))

    async def _chaos_stop(self, name: str, pause: float) -> None:
        """SIGSTOP an actor for `pause` seconds. The SIGCONT comes from a timer thread, not
        from this loop: the stopped actor may hold a kernel lock the supervisor's own
        kernel context waits for (spawn_task allocates records), and a loop blocked on it
        would never run the line that continues the actor (the 10-minute chaos soak hung
        so, ksmd stopped for good)."""
        pid = self.procs[name].pid
        self.chaos_counts["stops"] += 1
        self.ev("chaos_stop", actor=name, os_pid=pid, seconds=round(pause, 3))
        resume = threading.Timer(pause, _sigcont, (pid,))
        resume.daemon = True
        try:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                resume.start()
            await asyncio.sleep(pause)       # the timer fires on its own, now or a moment later
        except BaseException:                # cancelled: never leave an actor stopped behind us
            resume.cancel()
            _sigcont(pid)
            raise

    def _idle_task(self, name: str) -> bool:
        """A task chaos may SIGKILL: started, no request in flight, not exiting (by its
        own exit() or an exit the kernel runs for it, as after an OOM kill); killing one
        that is on its way out would run its exit twice."""
        t = self.tasks.get(name)
        return (t is not None and name in self.peers and self.ready[name].done() and not self.peers[name].sent
                and not t.exiting and not t.exited.done() and forkops.task_running(self.km, t.handle))

    def describe(self) -> dict:
        """The full option set of the run (printed and logged so a run can be replayed)."""
        d = asdict(self.opts)
        d["variants"] = self.variants.names()
        d["run_id"] = self.run_id
        d["plan"] = self.plan.describe()
        return d

    def _actor_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p])
        env[pdeath.SUPERVISOR_PID_ENV] = str(os.getpid())
        return env

    def _spawn(self, role: str, name: str, *args: str) -> subprocess.Popen | zygote.ForkedProcess:
        self.ready[name] = asyncio.get_running_loop().create_future()
        log = os.path.join(self.run_dir, "logs", f"{name}.stderr")
        p: subprocess.Popen | zygote.ForkedProcess
        if self.forks is not None:
            p = self.forks.spawn(role, name, list(args), log)
        else:
            errf = open(log, "ab")  # noqa: SIM115
            # actors.kcov is actors.main recording coverage (only those processes load coverage.py)
            entry = "actors.kcov" if self.opts.coverage else "actors.main"
            p = subprocess.Popen(
                [sys.executable, "-m", entry, self.cfg_path, role, name, *args],
                stdin=subprocess.DEVNULL, stdout=errf, stderr=errf, env=self._actor_env(), close_fds=True,
            )
            errf.close()
        self.procs[name] = p
        self.ev("spawn", actor=name, role=role, os_pid=p.pid)
        return p

    async def _await_ready(self, names: list[str]) -> None:
        futs = [self.ready[n] for n in names]
        try:
            await within(asyncio.gather(*futs), self.opts.boot_timeout)
        except TimeoutError:
            late = [n for n in names if not self.ready[n].done()]
            raise ClusterError(f"actors did not come up in {self.opts.boot_timeout}s: {late}") from None

    async def stop(self) -> None:
        """Shut every actor down and remove every process, segment and socket of the run."""
        if self.stopped:
            return
        self.stopped = True
        with contextlib.suppress(Exception):
            self._sample_counters()    # a run shorter than the watchdog's period has one too
            self.ev("cluster_stop", reports=len(self.reports))
        for peer in list(self.peers.values()):
            with contextlib.suppress(Exception):
                peer.sock.send(self.seal.encode(codec.request("shutdown", 0, "supervisor")), zmq.NOBLOCK)
        for t in self.tasks.values():
            if not t.exited.done() and t.name in self.procs:
                with contextlib.suppress(Exception):
                    self.procs[t.name].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 3.0
        for p in self.procs.values():
            while p.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        for p in self.procs.values():
            if p.poll() is None and self.opts.coverage:
                with contextlib.suppress(ProcessLookupError):
                    p.terminate()   # the coverage data first (see _crash)
                with contextlib.suppress(Exception):
                    p.wait(timeout=0.5)
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                with contextlib.suppress(Exception):
                    p.wait(timeout=5)
        self._close_forks()
        for t in self._bg:
            t.cancel()
        for t in self._bg:
            with contextlib.suppress(BaseException):
                await t
        for peer in self.peers.values():
            peer.close()
        crashed = self.crashed or ClusterCrashed("cluster stopped", self.reports)
        for peer in self.peers.values():
            peer.fail_all(crashed)
        for t in self.tasks.values():
            if not t.exited.done():
                t.exited.set_exception(crashed)
                t.exited.exception()  # consumed: nobody may be waiting
        if getattr(self, "zctx", None) is not None:
            self.zctx.destroy(linger=0)
        if self.locks is not None:
            with contextlib.suppress(Exception):
                self.locks.release_context()
            self.locks.close()
            self.locks.unlink()
        if self.km is not None:
            self.km.close()
            self.km.unlink()
        sweep_stale(self.run_id)
        with contextlib.suppress(Exception):
            endpoints.cleanup(self.sock_dir)
        with contextlib.suppress(Exception):
            with open(os.path.join(self.run_dir, "reports.json"), "w", encoding="utf-8") as f:
                json.dump(self.reports, f, indent=1, default=str)
            self.ev.close()

    # -- the supervisor's own socket ----------------------------------------------------------------
    async def _serve(self) -> None:
        while True:
            frames = await self.router.recv_multipart()
            if len(frames) != 2:
                self.ev("bad_message", error="EBADMSG: wrong number of frames", frames=len(frames))
                if frames:
                    await self._reply(frames[0], codec.reply_err(None, "supervisor", "EBADMSG",
                                                                 "expected one frame"))
                continue
            peer, raw = frames
            try:
                msg = self.seal.decode(raw, peer)
            except ProtocolError as e:
                self.ev("bad_message", error=str(e), peer=peer.decode("latin-1"))
                if e.name != "EACCES":      # a stranger gets no answer at all
                    await self._reply(peer, codec.reply_err(e.envelope, "supervisor", e.errno, e.detail))
                continue
            if not auth.own_task_ok(msg["src"], msg, lambda h: forkops.live_task(self.km, h)):
                self.ev("bad_message", error=f"EPERM: {msg['src']} named another task in {msg['type']}")
                if msg["id"]:
                    await self._reply(peer, codec.reply_err(msg, "supervisor", "EPERM", "not your task"))
                continue
            mtype = msg["type"]
            if mtype == "ping":
                await self._reply(peer, codec.reply_ok(msg, "supervisor", {"pong": "supervisor"}))
            elif mtype == "actor_ready":
                fut = self.ready.get(msg["actor"])
                if fut is not None and not fut.done():
                    fut.set_result(msg["pid"])
            elif mtype == "report":
                self._add_report({"kind": msg["kind"], "title": msg["title"], "text": msg["text"],
                                  "data": msg["data"], "actor": msg["src"]})
            elif mtype == "task_exited":
                t = self.tasks.get(f"task-{msg['pid']}")
                if t is not None and not t.exited.done():
                    t.exited.set_result({"code": msg["code"], "reason": msg["reason"]})
            elif mtype == "spawn_task":
                asyncio.get_running_loop().create_task(self._spawn_child(peer, msg))
            elif msg["id"]:
                await self._reply(peer, codec.reply_err(
                    msg, "supervisor", "EOPNOTSUPP", f"supervisor does not handle {mtype}"))

    async def _reply(self, peer: bytes, reply: dict) -> None:
        # ROUTER_MANDATORY: a peer that went away raises EHOSTUNREACH; that must not end
        # _serve (the supervisor would stop hearing actor_ready, report, task_exited).
        try:
            await self.router.send_multipart([peer, self.seal.encode(reply)])
        except zmq.ZMQError as e:
            self.ev("reply_undeliverable", peer=peer.decode("latin-1"), error=str(e))

    async def _spawn_child(self, peer: bytes, msg: dict) -> None:
        try:
            name = msg["name"]
            pid = int(name.split("-", 1)[1])
            self._adopt(pid, msg["task"])
            reply = codec.reply_ok(msg, "supervisor", {"pid": pid})
        except Exception as e:
            reply = codec.reply_err(msg, "supervisor", "EAGAIN", str(e))
        await self._reply(peer, reply)

    def _adopt(self, pid: int, handle: int) -> Task:
        name = f"task-{pid}"
        t = self.tasks.get(name)
        if t is None:
            t = Task(self, pid, handle)
            self.tasks[name] = t
            self._spawn("task", name, str(handle))
            self.peers[name] = _Peer(self, name, endpoints.endpoint(self.sock_dir, name))
        return t

    def _add_report(self, rep: dict) -> None:
        rep.setdefault("t_s", round(time.monotonic() - self.t_boot, 3))
        self.reports.append(rep)
        with contextlib.suppress(Exception):
            self.ev("report", **{k: v for k, v in rep.items() if k != "data"})
        if self.opts.echo_reports:
            sys.stderr.write(rep["text"] if rep["text"].endswith("\n") else rep["text"] + "\n")
        if self.opts.stop_on_report and self.crashed is None and not self.stopped:
            with contextlib.suppress(RuntimeError):  # no loop: a report from teardown
                asyncio.get_running_loop().create_task(self._crash(f"stop on report: {rep['title']}"))

    # -- watching -------------------------------------------------------------------------------------
    async def _server_died(self) -> bool:
        """Whether the fork server is found dead, the run then ended with a report that
        names it. Every actor it forked dies with it (actors/zygote.py): the report is
        the server's, not that of the first of theirs that is noticed."""
        fs = self.forks
        if fs is None or fs.closing or self.stopped or self.crashed is not None or fs.proc.poll() is None:
            return False  # no server, or one we are closing, or a run that already ended
        rc = fs.proc.returncode
        how = f"killed by signal {-rc} ({SIGNAMES.get(-rc, '?')})" if rc < 0 else f"exit code {rc}"
        title = f"actor zygote (pid {fs.pid}) died unexpectedly: {how}"
        self._add_report({"kind": "actor_died", "title": title, "text": f"{title}\n",
                          "data": {"actor": "zygote", "rc": rc}})
        await self._crash(title)
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(0.02)
            if await self._server_died():
                return
            for name, p in list(self.procs.items()):
                rc = p.poll()
                if rc is None or getattr(p, "_ksmlab_seen", False):
                    continue
                # A forked actor's death may be seen before its server's, which went first
                # (the child's status comes from the server's end of the pipe).
                if isinstance(p, zygote.ForkedProcess) and await self._server_died():
                    return
                p._ksmlab_seen = True  # type: ignore[attr-defined]
                if self.stopped or self.crashed is not None:
                    continue  # torn down by us: the run already ended with its report
                t = self.tasks.get(name)
                if t is not None and rc == -signal.SIGKILL and p.pid in self._chaos_killed:
                    asyncio.get_running_loop().create_task(self._exit_killed_task(t))
                    continue
                if t is not None and rc == 0:
                    # The task ended through the exit path: requests still queued to it
                    # can never be answered (a killed task's mailbox dies with it).
                    gone = SyscallFailed(errno_mod.ESRCH, f"ESRCH: {name} has exited")
                    if name in self.peers:
                        peer = self.peers.pop(name)
                        peer.fail_all(gone)
                        peer.close()
                    # Its task_exited notice (code and reason) is normally already queued
                    # on our socket; give it a moment before settling for less.
                    asyncio.get_running_loop().call_later(1.0, _settle_exit, t)
                    continue
                how = f"killed by signal {-rc} ({SIGNAMES.get(-rc, '?')})" if rc < 0 else f"exit code {rc}"
                title = f"actor {name} (pid {p.pid}) died unexpectedly: {how}"
                errtail = ""
                with contextlib.suppress(OSError), open(
                        os.path.join(self.run_dir, "logs", f"{name}.stderr"), "rb") as f:
                    errtail = f.read()[-2000:].decode("utf-8", "replace")
                self._add_report({"kind": "actor_died", "title": title,
                                  "text": f"{title}\n{errtail}", "data": {"actor": name, "rc": rc}})
                await self._crash(title)
                return

    async def _watchdog(self) -> None:
        threshold = int(self.opts.hung_task_timeout * 1e9)
        while True:
            await asyncio.sleep(min(0.5, self.opts.hung_task_timeout / 4))
            try:
                now = time.monotonic_ns()
                hung = (find_hung(self.locks.contexts_snapshot(), threshold, now)
                        or self._unanswered(3 * threshold, now))
                self._sample_counters()
            except Exception as e:  # the snapshot must never take the supervisor down
                self.ev("watchdog_error", error=str(e))
                continue
            if hung:
                states = None
                for rep in hung:
                    kw = rep["data"].get("no_progress")
                    if kw and kw["kind"] == "wait_event":
                        # Whoever does not answer: a stopped or dead process is named.
                        states = states or self._proc_states()
                        rep["text"] += "".join(f"\n{line}" for line in self._odd_processes(states))
                        rep["data"]["states"] = states
                    self._add_report(rep)
                await self._crash(hung[0]["title"])
                return

    def _sample_counters(self) -> None:
        """The counter tracks of a trace (ksmlab trace): KSM counters and free frames."""
        c = self.ksm_counters()
        self.ev("ksm_counters", free_frames=self.nr_free_frames(),
                **{n: c[n] for n in TRACED_COUNTERS if n in c})

    def deadline_report(self, what: str, seconds: float) -> dict:
        """`what` (the scenario) ran past its deadline: a hung-task report naming what the
        supervisor still waits for and any actor process that is stopped or dead."""
        now = time.monotonic_ns()
        title = f"INFO: {what} did not finish within {seconds:g} seconds"
        waits = sorted((now - t0, peer.name, mtype, rid) for peer in self.peers.values()
                       for rid, (mtype, t0) in list(peer.sent.items()))
        lines = [title] + [f"      waiting {w / 1e9:.1f} s for {a}'s reply to {m} (request {r})"
                           for w, a, m, r in reversed(waits)]
        lines += self._odd_processes()
        rep = {"kind": "hung_task", "title": title, "text": "\n".join(lines),
               "data": {"actor": "supervisor", "deadline_s": seconds,
                        "waiting_for": [[a, m, r] for _w, a, m, r in waits]}}
        self._add_report(rep)
        return rep

    def _proc_states(self) -> dict[str, str]:
        return {name: proc_state(p.pid) for name, p in self.procs.items()}

    def _odd_processes(self, states: dict[str, str] | None = None) -> list[str]:
        states = self._proc_states() if states is None else states
        return [f"      {n} (pid {self.procs[n].pid}) is {_STATE_NAMES.get(st, st)}"
                for n, st in sorted(states.items()) if st not in ("R", "S", "D")]

    def _unanswered(self, threshold_ns: int, now: int) -> list[dict]:
        """A request of the supervisor's that got no reply for threshold_ns: an actor that
        stopped answering without waiting on a lock (stopped, spinning, lost a message),
        which the lock watchdog cannot see. Three times the hung-task timeout, so that
        what the request waits behind comes first, as the more precise report: a lock
        wait, a retry loop (one timeout), a kernel context's wait for another actor's
        reply (two). The report names every actor process that is stopped or dead."""
        late = [(now - t0, peer.name, mtype, rid) for peer in self.peers.values()
                for rid, (mtype, t0) in list(peer.sent.items()) if now - t0 > threshold_ns]
        if not late or self.stopped:
            return []
        waited, actor, mtype, rid = max(late)
        secs = threshold_ns // 1_000_000_000
        title = f"INFO: task supervisor blocked for more than {secs} seconds."
        lines = [title, f"      no reply from {actor} to {mtype} (request {rid}) for {waited / 1e9:.1f} s"]
        states = self._proc_states()
        lines += self._odd_processes(states)
        return [{"kind": "hung_task", "title": title, "text": "\n".join(lines),
                 "data": {"actor": "supervisor", "waiting_for": actor, "request": mtype, "id": rid,
                          "blocked_ns": waited, "states": states}}]

    async def _crash(self, why: str) -> None:
        if self.crashed is not None:
            return
        self.crashed = ClusterCrashed(why, self.reports)
        self.ev("cluster_crashed", why=why)
        for peer in self.peers.values():
            peer.fail_all(self.crashed)
        for fut in self.ready.values():
            if not fut.done():
                fut.set_exception(self.crashed)
                fut.exception()
        for t in self.tasks.values():
            if not t.exited.done():
                t.exited.set_exception(self.crashed)
                t.exited.exception()
        if self.opts.coverage:
            # SIGTERM first: an actor that records coverage saves it and exits at once.
            for p in self.procs.values():
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.terminate()
            await asyncio.sleep(0.5)
        for p in self.procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
        self._close_forks()

    def _close_forks(self) -> None:
        if self.forks is not None:  # a dead server's pipes are closed here too
            with contextlib.suppress(Exception):
                self.forks.close()

    # -- requests -------------------------------------------------------------------------------------
    async def request(self, actor: str, mtype: str, timeout: float | None = None, **fields: Any) -> Any:
        if self.crashed is not None:
            raise self.crashed
        if self.stopped:
            raise ClusterError("cluster is stopped")
        if actor.startswith("task-") and not self.ready[actor].done():
            await within(asyncio.shield(self.ready[actor]), self.opts.boot_timeout)
        peer = self.peers.get(actor)
        if peer is None:
            raise SyscallFailed(errno_mod.ESRCH, f"ESRCH: no actor {actor}")
        rid = next(_ids)
        fut = asyncio.get_running_loop().create_future()
        peer.pending[rid] = fut
        peer.sent[rid] = (mtype, time.monotonic_ns())
        try:
            await peer.sock.send(self.seal.encode(codec.request(mtype, rid, "supervisor", **fields)))
        except zmq.ZMQError as e:   # the peer went away meanwhile
            peer.pending.pop(rid, None)
            peer.sent.pop(rid, None)
            raise SyscallFailed(errno_mod.ESRCH, f"ESRCH: {actor}: {e}") from None
        try:
            msg = await within(fut, timeout or None)
        finally:
            peer.sent.pop(rid, None)
        if not msg["ok"]:
            raise SyscallFailed(_errno_of(msg), msg.get("error", ""))
        return msg.get("result")

    # -- scenario API -----------------------------------------------------------------------------------
    async def spawn_task(self, comm: str = "task", nid: int = -1) -> Task:
        """A new process with an empty address space (as after execve)."""
        if self.crashed is not None:
            raise self.crashed
        if self.stopped:
            raise ClusterError("cluster is stopped")
        h = forkops.new_task(self.k, comm, nid)
        task = self._adopt(forkops.task_pid_nr(self.k, h, "spawn_task"), h)
        await within(asyncio.shield(self.ready[task.name]), self.opts.boot_timeout)
        return task

    async def sysfs_write(self, knob: str, value: Any, task: Task | None = None) -> str:
        """echo VALUE > /sys/kernel/mm/ksm/KNOB (as `task` if given: it is then the OOM origin)."""
        r = await self.request("ctl", "sysfs_write", knob=knob, value=str(value),
                               task=task.handle if task else 0)
        return r["value"]

    def sysfs_read(self, name: str) -> str:
        """cat /sys/kernel/mm/ksm/NAME (a lock-free read, as in the kernel)."""
        try:
            return sysfs.show(self.k, name)
        except sysfs.SysfsError as e:
            raise SyscallFailed(getattr(errno_mod, e.errno_name), str(e)) from None

    def ksm_counters(self) -> dict[str, int]:
        """Every counter file of /sys/kernel/mm/ksm by name."""
        return sysfs.counters(self.k)

    def ksm_knobs(self) -> dict[str, int]:
        return sysfs.knobs(self.k)

    def full_scans(self) -> int:
        return int(self.k.ksm["seqnr"])

    async def wait_full_scans(self, n: int = 2, timeout: float = 60.0) -> int:
        """Wait until ksmd completed n more full scans than when called (ksm_tests' ksm_start)."""
        target = self.full_scans() + n
        deadline = time.monotonic() + timeout
        while self.full_scans() < target:
            if self.crashed is not None:
                raise self.crashed
            if time.monotonic() > deadline:
                raise TimeoutError(f"full_scans stuck at {self.full_scans()} (wanted {target}); "
                                   f"counters {self.ksm_counters()}")
            await asyncio.sleep(0.002)
        return self.full_scans()

    async def ksm_start(self, timeout: float = 60.0) -> None:
        """The kernel selftests' ksm_start(): run=1, then wait for two full scans."""
        start = self.full_scans()
        await self.sysfs_write("run", 1)
        deadline = time.monotonic() + timeout
        while self.full_scans() < start + 2:
            if self.crashed is not None:
                raise self.crashed
            if time.monotonic() > deadline:
                raise TimeoutError(f"ksm_start: full_scans {self.full_scans()} < {start + 2}")
            await asyncio.sleep(0.002)

    async def ksm_stop(self) -> None:
        """The kernel selftests' ksm_stop(): run=2."""
        await self.sysfs_write("run", 2)

    async def reclaim(self, pfns: list[int] | None = None, nr: int = 32, force: bool = False) -> dict:
        """Ask kswapd to reclaim now: the given frames, or nr frames by its clock hand."""
        return await self.request("kswapd", "reclaim", nr=nr, pfns=list(pfns or []), force=force)

    def check_invariants(self, report: bool = True) -> list[dict]:
        """Check DESIGN.md's invariants now (call when no task is mid-syscall); reports them."""
        ksm = self.k.ksm
        ksm["reclaim_paused"] = 1          # kswapd parks between pages
        deadline = time.monotonic() + 5.0
        while ksm["reclaim_paused"] != 2 and time.monotonic() < deadline:
            time.sleep(0.002)
        # An exit the OOM killer started runs on in the exit actor; wait until no address
        # space is half torn down, with ksmd held off (a batch of ksmd's may OOM-kill),
        # but without keeping ksm_thread_mutex while waiting (the 2009 exit takes it).
        while True:
            self.k.ksm_thread_mutex.lock()
            if ksm["mmput_in_flight"] == 0 or time.monotonic() > deadline:
                break
            self.k.ksm_thread_mutex.unlock()
            time.sleep(0.002)
        try:
            found = check_invariants(self.k)
        finally:
            self.k.ksm_thread_mutex.unlock()
            ksm["reclaim_paused"] = 0
        if report:
            for r in found:
                self._add_report(r)
        return found

    def check_leaks(self, report: bool = True) -> list[dict]:
        """After every task has exited and ksmd reaped their slots: nothing may be left."""
        found = leaks_after_teardown(self.k)
        if report:
            for r in found:
                self._add_report(r)
        return found

    async def wait_for(self, cond, timeout: float = 30.0, what: str = "condition") -> None:
        """Poll a condition on shared state with a deadline (never a fixed sleep)."""
        deadline = time.monotonic() + timeout
        while not cond():
            if self.crashed is not None:
                raise self.crashed
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            await asyncio.sleep(0.005)

    def nr_free_frames(self) -> int:
        return self.k.alloc.nr_free()

    def reports_of(self, kind: str) -> list[dict]:
        return [r for r in self.reports if r["kind"] == kind]


_ids = iter(range(1, 1 << 62))


def _sigcont(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


def _settle_exit(t: Task) -> None:
    if not t.exited.done():
        t.exited.set_result({"code": None, "reason": "exited"})
