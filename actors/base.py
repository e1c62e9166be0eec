# The actor shell: one OS process per kernel thread, a thin loop around kernel paths.
#
# An actor attaches to the run's shared kernel memory and lock space, binds a
# ROUTER socket at its endpoint, and serves messages: each request type maps to a
# handler that calls plain kernel functions (actors/kernel/*). Handlers that may
# block for long (a fault waiting for memory, an exit waiting for mmap_lock) run
# in worker threads, each its own kernel context with its own lock context, the
# way several CPUs run the same kernel code at once. A malformed or unknown
# message gets an error reply and a log line; the actor keeps serving. Requests
# with id 0 are notifications and get no reply.
from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq

from actors.kernel.context import Kernel, SchedPoints
from actors.kernel.fork import live_task
from actors.kernel.schedule import PlanSpec, SchedPlan
from actors.kernel.variants import Variants
from actors.log import KSM_PAGE_TRACEPOINTS, EventLog
from actors.tracebuf import TraceBuffer
from protocol import auth, codec, endpoints
from protocol.codec import ProtocolError
from shared_mem.arena import BadFree, UseAfterFree
from shared_mem.layout import KernelMemory
from shared_mem.locks import KWAIT_EVENT, LockSpace

# Called, in order, when the actor gets SIGTERM, after it is marked stopping. A run that
# records coverage installs one (actors/kcov.py): save the data now, whatever the actor
# is blocked in (a deadlocked context never returns to its loop), and exit.
SIGTERM_HOOKS: list[Callable[[], None]] = []


class KernelError(Exception):
    """A handler's failure with a kernel errno name."""

    def __init__(self, errno_name: str, detail: str = "") -> None:
        super().__init__(f"{errno_name}: {detail}")
        self.errno_name = errno_name
        self.detail = detail


class RemoteError(OSError):
    """An error reply from another actor."""


class Actor:
    role = "actor"
    concurrent: frozenset[str] = frozenset()
    max_workers = 32

    def __init__(self, cfg: dict[str, Any], name: str) -> None:
        self.cfg = cfg
        self.name = name
        self.stopping = False
        self.tls = threading.local()
        self.ids = iter(range(1, 1 << 62))
        self._id_lock = threading.Lock()
        self.handlers: dict[str, Callable[[dict], Any]] = {"ping": lambda m: {"pong": self.name},
                                                           "shutdown": self._on_shutdown}

    # -- boot ---------------------------------------------------------------------------------
    def boot(self) -> None:
        cfg = self.cfg
        self.ev = EventLog(cfg["run_dir"], self.name, cfg["run_id"], cfg["seed"],
                           flush_every=self.flush_every(), label=self.context_label,
                           off=frozenset() if cfg.get("ksm_tracepoints", True) else KSM_PAGE_TRACEPOINTS)
        self.trace = TraceBuffer(self.ev.path[:-len(".jsonl")] + ".trace",
                                 lambda i, s: self.ev("trace_string", id=i, s=s), self.context_label)
        self.ev.on_flush = self.trace.flush
        self.seal = auth.Seal.of_run(cfg["secret"])
        self.km = KernelMemory.attach(cfg["km"])
        self.locks = LockSpace.attach(cfg["locks"])
        self.km.set_locks(self.locks)
        self.km.set_actor(self.name, on_report=self._arena_report)
        self.variants = Variants(mask=int(cfg.get("variants", 0)))
        spec = cfg.get("sched")
        plan = SchedPlan(PlanSpec.from_dict(spec)) if spec and spec["strategy"] != "none" else None
        self.sched = SchedPoints(cfg.get("delays", {}), plan, ev=self.ev)
        if plan is not None:
            self.locks.set_sched_hook(self.sched.lock_op)
        if cfg.get("trace_locks", True):
            self.locks.set_event_hook(self._lock_event)
        self.locks.set_report_hook(self._lock_report)
        self.zctx = endpoints.make_context()
        self.router = endpoints.bind_router(self.zctx, self.endpoint_of(self.name))
        self.inbox = self.zctx.socket(zmq.PULL)
        self.inbox.bind(f"inproc://replies-{self.name}")
        self.pool = ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix=self.name)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self.ev("actor_start", role=self.role, variants=self.variants.names())
        self.setup()
        self.notify("supervisor", "actor_ready", actor=self.name, pid=os.getpid())

    def flush_every(self) -> int:
        return 1

    def setup(self) -> None:
        """Actor-specific initialisation (after shared memory and sockets are ready)."""

    # -- per-thread kernel contexts ---------------------------------------------------------------
    @property
    def k(self) -> Kernel:
        k = getattr(self.tls, "kernel", None)
        if k is None:
            label = self.context_label()
            self.locks.bind_context(label)
            k = Kernel(self.km, self.locks, label, ev=self.ev, variants=self.variants,
                       sched=self.sched, pressure=_ActorPressure(self), wakeups=_ActorWakeups(self))
            self.kernel_setup(k)
            self.tls.kernel = k
        return k

    def context_label(self) -> str:
        """This thread's kernel context: the actor, or actor:N for its Nth worker (the
        model's CPU, shown in every event, lock record and report)."""
        th = threading.current_thread()
        return self.name if th is threading.main_thread() else f"{self.name}:{th.name.rsplit('_', 1)[-1]}"

    def kernel_setup(self, k: Kernel) -> None:
        """Hook to adjust a new kernel context."""

    def populate(self, start: int, length: int, write: bool) -> None:
        """mm_populate() of a MAP_POPULATE / VM_LOCKED mmap: only a task actor has a user
        address space to fault in (it overrides this)."""

    # -- talking to other actors ----------------------------------------------------------------
    def _dealer(self, target: str) -> zmq.Socket:
        socks = getattr(self.tls, "dealers", None)
        if socks is None:
            socks = self.tls.dealers = {}
        s = socks.get(target)
        if s is None:
            ident = auth.routing_id(self.name, f"{threading.get_ident() & 0xFFFFFF:x}")
            s = endpoints.connect_dealer(self.zctx, self.endpoint_of(target), ident)
            socks[target] = s
        return s

    def endpoint_of(self, name: str) -> str:
        ep = self.cfg["endpoints"].get(name)
        return ep if ep else endpoints.endpoint(self.cfg["sock_dir"], name)

    def next_id(self) -> int:
        with self._id_lock:
            return next(self.ids)

    def notify(self, target: str, mtype: str, **fields: Any) -> None:
        self.trace.record("msg_send", mtype, peer=target)
        try:
            self._dealer(target).send(self.seal.encode(codec.request(mtype, 0, self.name, **fields)),
                                      zmq.NOBLOCK)
        except zmq.ZMQError as e:
            self.ev("notify_failed", target=target, type=mtype, error=str(e))

    def call(self, target: str, mtype: str, timeout: float | None = None, **fields: Any) -> Any:
        """Synchronous request/reply to another actor, as a trapped CPU waits."""
        s = self._dealer(target)
        rid = self.next_id()
        self.trace.record("msg_send", mtype, arg=rid, peer=target)
        s.send(self.seal.encode(codec.request(mtype, rid, self.name, **fields)))
        # A kernel context that waits for a reply is in a wait_event() as far as the
        # hung-task watchdog goes: a target that stops answering without holding a lock
        # (SIGSTOPped, spinning, a lost message) then ends the run with a report naming
        # the wait. Inside a retry loop's published wait, that wait already counts.
        k = getattr(self.tls, "kernel", None)
        watched = k is not None and k.no_progress_site is None
        if watched:
            self.locks.no_progress(f"wait_for_reply({target}:{mtype})", 0, KWAIT_EVENT)
        try:
            return self._await_reply(s, target, mtype, rid, timeout)
        finally:
            if watched:
                self.locks.progress()

    def _await_reply(self, s: zmq.Socket, target: str, mtype: str, rid: int, timeout: float | None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.stopping:
                raise KernelError("EINTR", "actor stopping")
            left = 200 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            if s.poll(min(left, 200)):
                msg = self.seal.decode(s.recv())
                if msg.get("id") != rid:
                    continue  # a late reply to an earlier, abandoned request
                if not msg["ok"]:
                    raise RemoteError(msg.get("errno", 0), msg.get("error", ""))
                return msg.get("result")
            if deadline is not None and time.monotonic() >= deadline:
                raise KernelError("ETIMEDOUT", f"{target} did not answer {mtype}")

    def call_reclaim(self, k: Kernel, nid: int) -> int:
        """Direct reclaim: ask kswapd to free some frames now; returns how many it freed."""
        if self.name == "kswapd" or self.km.swap is None:
            return 0
        try:
            return int(self.call("kswapd", "reclaim", nr=32)["freed"])
        except (RemoteError, KernelError) as e:
            self.ev("reclaim_call_failed", error=str(e))
            return 0

    def call_oom(self, k: Kernel, nid: int) -> None:
        try:
            self.call("oom", "out_of_memory", ctx=k.actor, nid=nid, task=k.current_task)
        except (RemoteError, KernelError) as e:
            self.ev("oom_call_failed", error=str(e))

    # -- reports ----------------------------------------------------------------------------------
    def report(self, kind: str, title: str, text: str, data: Any = None) -> None:
        self.ev("report", kind=kind, title=title, text=text, data=data)
        self.ev.flush()
        sys.stderr.write(text if text.endswith("\n") else text + "\n")
        self.notify("supervisor", "report", kind=kind, title=title, text=text, data=data or {})

    def _arena_report(self, rep: dict) -> None:
        self.report(rep["kind"], rep["title"], rep["text"], rep.get("data"))

    def _lock_report(self, kind: str, title: str, text: str, data: dict) -> None:
        self.report(kind, title, text, data)

    def _lock_event(self, event: str, lock: str, idx: int, mode: str, wait_ns: int, site: str | None) -> None:
        self.trace.record(event, lock, idx, mode, wait_ns, site)
        if event == "lock_contended":
            # This context may now block for ever (a deadlock the watchdog reports from
            # another process): what it did up to here must be on disk, its events and
            # the trace (ev.flush flushes both).
            self.ev.flush()

    # -- the loop ---------------------------------------------------------------------------------
    def poll_timeout_ms(self) -> int:
        return 100

    def tick(self) -> None:
        """Periodic work between messages (ksmd's scanning)."""

    def on_oops(self) -> None:
        """After an oops in tick(): locks this context still holds stay held, like a
        task that died in the kernel; release nothing, but stop the periodic work."""
        self.tick = lambda: None  # type: ignore[method-assign]

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.inbox, zmq.POLLIN)
        while not self.stopping:
            try:
                events = dict(poller.poll(self.poll_timeout_ms()))
            except zmq.ZMQError as e:
                if e.errno == zmq.EINTR if hasattr(zmq, "EINTR") else False:
                    continue
                raise
            if self.inbox in events:
                while True:
                    try:
                        frames = self.inbox.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._send_frames(frames)
            if self.router in events:
                for _ in range(64):
                    try:
                        frames = self.router.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._dispatch(frames)
            if not self.stopping:
                try:
                    self.tick()
                except Exception as e:  # a BUG in background kernel work: oops, keep going
                    tb = traceback.format_exc()
                    title = f"Oops: {type(e).__name__}: {e} in {self.name}"
                    self.report("oops", title, f"{title}\n{tb}", {})
                    self.on_oops()
        self.ev("actor_stop")

    def _send_frames(self, frames: list[bytes]) -> None:
        try:
            self.router.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError as e:
            self.ev("reply_undeliverable", error=str(e))

    def _reply(self, peer: bytes, msg: dict) -> None:
        data = self.seal.encode(msg)
        if threading.current_thread() is threading.main_thread():
            self._send_frames([peer, data])
        else:
            push = getattr(self.tls, "push", None)
            if push is None:
                push = self.tls.push = self.zctx.socket(zmq.PUSH)
                push.connect(f"inproc://replies-{self.name}")
            push.send_multipart([peer, data])

    def _dispatch(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self.ev("bad_message", error="EBADMSG: wrong number of frames", frames=len(frames))
            if frames:
                self._reply(frames[0], codec.reply_err(None, self.name, "EBADMSG", "expected one frame"))
            return
        peer, raw = frames
        try:
            msg = self.seal.decode(raw, peer)
        except ProtocolError as e:
            self.ev("bad_message", error=str(e), peer=peer.decode("latin-1"), size=len(raw))
            if e.name != "EACCES":          # a stranger gets no answer at all (protocol/auth.py)
                self._reply(peer, codec.reply_err(e.envelope, self.name, e.errno, e.detail))
            return
        if not auth.own_task_ok(msg["src"], msg, lambda h: live_task(self.km, h)):
            self.ev("bad_message", error=f"EPERM: {msg['src']} named another task in {msg['type']}")
            if msg["id"]:
                self._reply(peer, codec.reply_err(msg, self.name, "EPERM", "not your task"))
            return
        mtype = msg["type"]
        self.trace.record("msg_recv", mtype, arg=int(msg.get("id") or 0), peer=str(msg.get("src", "")))
        if mtype == "reply":
            self.ev("stray_reply", peer=peer.decode("latin-1"), id=msg["id"])
            return
        handler = self.handlers.get(mtype)
        if handler is None:
            self.ev("bad_message", error=f"EOPNOTSUPP: {self.role} does not handle {mtype}")
            if msg["id"]:
                self._reply(peer, codec.reply_err(msg, self.name, "EOPNOTSUPP",
                                                  f"{self.role} does not handle {mtype}"))
            return
        if mtype in self.concurrent:
            self.pool.submit(self._run_handler, handler, peer, msg)
        else:
            self._run_handler(handler, peer, msg)

    def _run_handler(self, handler: Callable[[dict], Any], peer: bytes, msg: dict) -> None:
        try:
            result = handler(msg)
            reply = codec.reply_ok(msg, self.name, result)
        except KernelError as e:
            reply = codec.reply_err(msg, self.name, e.errno_name, e.detail)
        except (UseAfterFree, BadFree) as e:
            reply = codec.reply_err(msg, self.name, "EFAULT", e.report["title"])
        except RemoteError as e:
            reply = codec.reply_err(msg, self.name, e.errno or "EIO", str(e))
        except Exception as e:  # a bug in a kernel path: oops, report, keep serving
            tb = traceback.format_exc()
            title = f"Oops: {type(e).__name__}: {e} in {self.name} handling {msg['type']}"
            self.report("oops", title, f"{title}\n{tb}", {"type": msg["type"]})
            reply = codec.reply_err(msg, self.name, "EIO", str(e)[:500])
        if msg["id"]:
            self._reply(peer, reply)
        self.ev.flush()

    def _on_shutdown(self, msg: dict) -> dict:
        self.stopping = True
        return {"stopping": self.name}

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.stopping = True
        for hook in SIGTERM_HOOKS:
            hook()

    # -- teardown ---------------------------------------------------------------------------------
    def close(self) -> None:
        try:
            self.pool.shutdown(wait=False, cancel_futures=True)
        except Exception:
            pass
        try:
            self.zctx.destroy(linger=0)
        except Exception:
            pass
        try:
            self.locks.release_context()
            self.locks.close()
        except Exception:
            pass
        try:
            self.km.close()
        except Exception:
            pass
        self.trace.close()
        self.ev.close()


class _ActorPressure:
    """alloc_pages' slow path of an actor's kernel contexts: direct reclaim is a request
    to kswapd, out_of_memory one to the OOM killer (seams.MemoryPressure)."""

    def __init__(self, actor: Actor) -> None:
        self.actor = actor

    def reclaim(self, k: Kernel, nid: int) -> int:
        return self.actor.call_reclaim(k, nid)

    def out_of_memory(self, k: Kernel, nid: int) -> None:
        self.actor.call_oom(k, nid)


class _ActorWakeups:
    """seams.Wakeups over zmq: ksmd gets a wakeup message; mm_populate() faults the range
    in through the task actor's own access path (tasks install it, see task.py)."""

    def __init__(self, actor: Actor) -> None:
        self.actor = actor

    def wake_ksmd(self) -> None:
        self.actor.notify("ksmd", "wakeup")

    def populate(self, start: int, length: int, write: bool) -> None:
        self.actor.populate(start, length, write)
