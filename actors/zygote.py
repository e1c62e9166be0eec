# The fork server: actor processes forked from one that has already imported them.
#
# An actor started as `python -m actors.main ...` spends about 0.35 s of its start in
# the interpreter loading numpy, zmq, structlog and the kernel modules, before it maps a
# single segment; a stress campaign pays that for ksmd, the exit, OOM and fault actors
# and every task of every run. Android's zygote, and multiprocessing's "forkserver"
# start method, pay it once: a server process imports everything, and each new process
# is a fork() of it, which shares those pages copy-on-write and starts in milliseconds.
# Here the server is `python -m actors.main CONFIG zygote zygote`, one per cluster; the
# supervisor writes one JSON line a spawn to its stdin (role, name, arguments, the file
# for the child's stdout and stderr) and reads the child's pid back, and later its exit
# status, from the server's stdout.
#
# Why the server and not the supervisor forks: by the time it spawns a task the
# supervisor has a zmq context (with its I/O threads) and an asyncio loop, neither of
# which survives fork(). The server has no thread (OPENBLAS_NUM_THREADS=1 before numpy
# loads) and no socket; it forks before any of the child's kernel state exists, so the
# child builds its segments, lock context and sockets as a spawned actor does.
#
# What is kept from spawned actors:
# * Death with the supervisor: the server dies with it (PR_SET_PDEATHSIG, actors/pdeath.py),
#   and every child dies with the server (the same prctl, then a check that its parent is
#   still the server, as die_with_parent() does). A server whose stdin closes kills what
#   children it still has and exits.
# * Identity: the child's command line is the server's, `actors.main CONFIG zygote ...`,
#   so a search for a run's processes by its config path finds them all; its name
#   (/proc/PID/comm, what ps and top show) is the actor's, as a kernel thread's is.
# * Exit statuses: the server is the children's parent, so it reaps them and reports each
#   status (Popen's returncode convention: -N for signal N). ForkedProcess gives the
#   supervisor the part of subprocess.Popen it uses (pid, poll, wait, send_signal,
#   terminate, kill).
#
# Runs that record coverage (actors/kcov.py) still spawn each actor: coverage.py must be
# started before the kernel modules are imported.
#
# The loop is not the actors' alone: serve() forks a child to call any main(argv), and a
# stress campaign forks its runs the same way (ksmlab/runfork.py), each in a session of
# its own and SIGTERMed, not SIGKILLed, when the campaign goes, so that it can stop its
# cluster. ForkServer.fork() may be called from several threads (a campaign's --jobs).
from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable

from actors import pdeath, proctitle

ROLE = "zygote"
START_TIMEOUT_S = 30.0
FORK_HERE = False  # set by a process whose clusters should fork their servers from it


# -- the server -------------------------------------------------------------------------------
def serve(main: Callable[[list[str]], int | None], eof_signal: int = signal.SIGKILL,
          deathsig: int = signal.SIGKILL, grace_s: float = 30.0) -> None:
    """The server's loop: fork a child per request line, each to call main(its argv),
    reap them, report pids and statuses, until stdin closes. Then each child still there
    gets eof_signal once (SIGKILL for actors; SIGTERM lets a campaign's run clean up, and
    SIGKILL follows after grace_s), and each child gets deathsig if the server dies."""
    rep = os.dup(1)
    os.dup2(2, 1)  # a stray print must not land in the replies
    req = 0
    os.set_blocking(req, False)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    children: set[int] = set()
    me = os.getpid()

    def say(msg: dict) -> None:
        os.write(rep, (json.dumps(msg) + "\n").encode())

    say({"ready": me})
    buf = b""
    eof = False
    signalled: set[int] = set()
    eof_at = 0.0
    while not eof or children:
        if eof:  # the supervisor is gone or done: nothing of the run may outlive it
            late = time.monotonic() - eof_at > grace_s
            for pid in children - (set() if late else signalled):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL if late else eof_signal)
                signalled.add(pid)
        try:
            ready, _, _ = select.select([wake_r] if eof else [req, wake_r], [], [], 1.0)
        except InterruptedError:
            ready = [wake_r]
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 512)
        _reap(children, say)
        if req in ready and not eof:
            chunk = os.read(req, 65536)
            eof = not chunk
            eof_at = time.monotonic()
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                spec = json.loads(line)
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    _child(spec, me, (req, rep, wake_r, wake_w), main, deathsig)
                children.add(pid)
                say({"spawned": spec["name"], "pid": pid})
    os._exit(0)


def _reap(children: set[int], say: Callable[[dict], None]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if not pid:
            return
        children.discard(pid)
        with contextlib.suppress(OSError):  # a supervisor that stopped reading
            say({"exit": pid, "rc": os.waitstatus_to_exitcode(status)})


def _child(spec: dict, server: int, fds: tuple[int, ...], main: Callable[[list[str]], int | None],
           deathsig: int) -> None:
    """The forked child: its own stdio (one file, or spec["err"] apart), its own session
    if asked, tied to the server's life, then main(spec["argv"]); its return is the exit
    status."""
    rc = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(spec["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        err = os.open(spec["err"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if spec.get("err") else out
        os.dup2(null, 0)  # the server's request pipe was fd 0
        os.dup2(out, 1)
        os.dup2(err, 2)
        for fd in {null, out, err, *fds} - {0, 1, 2}:
            os.close(fd)
        if spec.get("session"):
            os.setsid()  # a process group of its own, for killpg(), as start_new_session
        pdeath.die_with(server, deathsig)
        proctitle.set_comm(spec["name"])
        rc = main(spec["argv"]) or 0
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()  # a file now, block-buffered: the last line may be a result
            sys.stderr.flush()
        os._exit(rc)


# -- the supervisor's end -----------------------------------------------------------------------
class ForkServerError(RuntimeError):
    pass


class ForkServer:
    """The supervisor's handle on its fork server (cmd: the server's command line, by
    default a cluster's actor server for cfg_path). Threads may fork through it at once.

    With `main` (the children's entry point), a supervisor that can fork the server
    from itself does (forked is then True): no interpreter start and no imports, where a
    server of its own spends 0.3 s. It can when it has no thread but this one (fork()
    copies only the calling thread, and a lock another held would stay held in the
    copy) and its argument area can take the server's command line (actors/proctitle.py:
    a run's processes are found by the config path in theirs). Only a process that says
    so tries (FORK_HERE): a campaign's runs, whose run server reserves the room
    (ksmlab/runfork.py). Any other supervisor (a `ksmlab run` from a shell, a test's
    cluster) spawns its server, whatever its threads and command line happen to be."""

    def __init__(self, cfg_path: str, env: dict[str, str], stderr_path: str, cmd: list[str] | None = None,
                 main: Callable[[list[str]], int | None] | None = None) -> None:
        self.cfg_path = cfg_path
        env = dict(env)
        env["OPENBLAS_NUM_THREADS"] = "1"  # no thread in the process that forks
        argv = cmd or [sys.executable, "-m", "actors.main", cfg_path, ROLE, ROLE]
        self.forked = (main is not None and FORK_HERE and _single_threaded()
                       and len(proctitle.encoded(argv)) <= proctitle.capacity())
        if self.forked:
            self.proc: subprocess.Popen | _ServerChild = _fork_server(argv, env, stderr_path, main)
        else:
            with open(stderr_path, "ab") as errf:
                self.proc = subprocess.Popen(
                    argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errf, env=env, close_fds=True,
                )
        self._out = self.proc.stdout.fileno()
        os.set_blocking(self._out, False)
        self._buf = b""
        self._lock = threading.Lock()
        self._send = threading.Lock()
        self.rc: dict[int, int] = {}
        self.live: set[int] = set()
        self._spawned: dict[str, list[int]] = {}
        self.dead = self.closing = False  # closing: close() has begun
        self.ready: int | None = None
        self.pid = self.proc.pid  # it imports while the supervisor boots: spawn() waits for it

    def spawn(self, role: str, name: str, args: list[str], log: str) -> ForkedProcess:
        """An actor: actor_main(CONFIG ROLE NAME ARGS), stdout and stderr to log."""
        return self.fork(name, [self.cfg_path, role, name, *args], log)

    def fork(self, name: str, argv: list[str], log: str, err: str | None = None,
             session: bool = False) -> ForkedProcess:
        """A child that calls the server's main(argv), named name (/proc/PID/comm; the
        server answers by it, so it must not be one another thread forks at the same
        time), its stdout to log and its stderr to err (None: log too), in a session of
        its own if asked."""
        self._wait_for(lambda: self.ready is not None, START_TIMEOUT_S, "start")
        spec = {"name": name, "argv": list(argv), "log": log, "err": err, "session": session}
        try:
            with self._send:
                self.proc.stdin.write((json.dumps(spec) + "\n").encode())
                self.proc.stdin.flush()
        except (BrokenPipeError, ValueError) as e:
            raise ForkServerError(f"fork server (pid {self.pid}) is gone: {e}") from None
        self._wait_for(lambda: bool(self._spawned.get(name)), START_TIMEOUT_S, f"fork {name}")
        with self._lock:
            pid = self._spawned[name].pop(0)
            if pid not in self.rc:  # not already reaped (its exit can come in the same read)
                self.live.add(pid)
        return ForkedProcess(self, pid)

    def _wait_for(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if self.dead:
                raise ForkServerError(f"fork server (pid {self.pid}) died before: {what}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise ForkServerError(f"fork server (pid {self.pid}) did not answer in {timeout}s: {what}")
            select.select([self._out], [], [], min(left, 0.1))
            self.pump()

    def pump(self) -> None:
        """Take in what the server has said (pids, statuses), without blocking."""
        with self._lock:
            while not self.dead:
                try:
                    chunk = os.read(self._out, 65536)
                except BlockingIOError:
                    break
                if not chunk:
                    self._server_gone()
                    break
                self._buf += chunk
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                msg = json.loads(line)
                if "exit" in msg:
                    self.rc[msg["exit"]] = msg["rc"]
                    self.live.discard(msg["exit"])
                elif "spawned" in msg:
                    self._spawned.setdefault(msg["spawned"], []).append(msg["pid"])
                elif "ready" in msg:
                    self.ready = msg["ready"]

    def _server_gone(self) -> None:
        # Its children die with it (PR_SET_PDEATHSIG); init reaps them. Once a child's
        # pid no longer names a live process of ours it counts as SIGKILLed.
        self.dead = True
        self.proc.wait()

    def returncode(self, pid: int) -> int | None:
        self.pump()
        if pid in self.rc:
            return self.rc[pid]
        if self.dead and not _alive(pid):
            self.rc[pid] = -signal.SIGKILL
            self.live.discard(pid)
            return self.rc[pid]
        return None

    def close(self, timeout: float = 5.0) -> None:
        """End the server: it SIGKILLs any child still there, reaps them and exits; what
        it said before it went (the statuses of children that ended) is taken in. Once
        only: a second call finds the pipes closed."""
        if self.closing:
            return
        self.closing = True
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.pump()
        self.dead = True
        for pid in list(self.live):  # a child it could not reap before it went
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.proc.stdout.close()


def _single_threaded() -> bool:
    try:
        return threading.active_count() == 1 and len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def _fork_server(argv: list[str], env: dict[str, str], stderr_path: str,
                 main: Callable[[list[str]], int | None]) -> _ServerChild:
    """Fork the server from this process: the child makes itself what `argv` started
    with `env` would be (its stdio the pipes and stderr_path, no other descriptor, the
    signal dispositions of a new interpreter, argv as its command line, dead with this
    process), then serves."""
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    errfd = os.open(stderr_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    parent = os.getpid()
    sys.stdout.flush()  # what this process buffered is its own to write, not the child's
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(req_r, 0)
            os.dup2(rep_w, 1)
            os.dup2(errfd, 2)
            for fd in [int(f) for f in os.listdir("/proc/self/fd")]:  # what close_fds=True does
                if fd > 2:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            _like_a_new_interpreter(argv, env)
            pdeath.die_with(parent)
            serve(main)
        except BaseException:
            with contextlib.suppress(Exception):
                traceback.print_exc()
        os._exit(1)
    for fd in (req_r, rep_w, errfd):
        os.close(fd)
    return _ServerChild(pid, req_w, rep_r)


def _like_a_new_interpreter(argv: list[str], env: dict[str, str]) -> None:
    signal.set_wakeup_fd(-1)
    for sig in signal.valid_signals():
        h = signal.getsignal(sig)
        if h not in (signal.SIG_DFL, signal.SIG_IGN, None, signal.default_int_handler):
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    os.environ.clear()
    os.environ.update(env)
    proctitle.set_cmdline(argv)
    proctitle.set_comm(os.path.basename(argv[0]))


class _ServerChild:
    """What ForkServer uses of subprocess.Popen, for a server this process forked."""

    def __init__(self, pid: int, stdin_fd: int, stdout_fd: int) -> None:
        self.pid = pid
        self.args = ("fork", pid)
        self.stdin = os.fdopen(stdin_fd, "wb")
        self.stdout = os.fdopen(stdout_fd, "rb")
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by someone else: gone, its status unknown
                self.returncode = -signal.SIGKILL
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        return _wait(self.poll, self.args, timeout, lambda: time.sleep(0.005))

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)


def _wait(poll: Callable[[], int | None], args: tuple, timeout: float | None, nap: Callable[[], None]) -> int:
    """Popen.wait() on poll(): its status, or TimeoutExpired after `timeout` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while (rc := poll()) is None:
        if deadline is not None and time.monotonic() >= deadline:
            raise subprocess.TimeoutExpired(args, timeout)
        nap()
    return rc


def _alive(pid: int) -> bool:
    """pid is a process that has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


class ForkedProcess:
    """An actor forked by the fork server: what the supervisor uses of subprocess.Popen."""

    def __init__(self, server: ForkServer, pid: int) -> None:
        self.server, self.pid = server, pid
        self.args = ("fork", pid)

    @property
    def returncode(self) -> int | None:
        return self.server.rc.get(self.pid)

    def poll(self) -> int | None:
        return self.server.returncode(self.pid)

    def wait(self, timeout: float | None = None) -> int:
        def nap() -> None:  # until the server says something (a status), or 50 ms
            with contextlib.suppress(ValueError, OSError):
                select.select([self.server._out], [], [], 0.05)
        return _wait(self.poll, self.args, timeout, nap)

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # never a pid that may have been reused
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
