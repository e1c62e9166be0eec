# Robustness of a running cluster: malformed messages to every actor, SIGKILL of any
# actor, and SIGKILL of the supervisor itself.
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio

from actors.cluster import ClusterCrashed
from actors.registry import KERNEL_ACTORS
from protocol import codec, endpoints
from protocol.abi import MADV_MERGEABLE, PAGE_SIZE
from protocol.auth import Seal, routing_id
from protocol.codec import ProtocolError
from protocol.messages import VERSION, errno_name, errno_number
from shared_mem.segment import list_segments, sweep_stale
from tests.helpers import wait_for

# --- malformed messages -------------------------------------------------------------------------

# The fuzzer is a member of the run gone bad: it seals what it sends with the run's secret
# and speaks as the supervisor (which may send every type), so each malformed message gets
# past protocol/auth.py to the codec and the handlers. Strangers are tests/actors/test_trust.py's.
FUZZ_SRC = "supervisor"

def _env(mtype: str, mid: int, **fields: Any) -> bytes:
    """A hand-packed message (the codec's encode would refuse the bad ones)."""
    return msgpack.packb({"v": VERSION, "type": mtype, "id": mid, "src": FUZZ_SRC, **fields},
                         use_bin_type=True)


# Per target: (a message missing a required field, the same kind of message with a bool
# where an int belongs). Targets not listed get a generic pair.
_BAD_BODY: dict[str, tuple[dict, dict]] = {
    "oom": ({"type": "out_of_memory", "nid": 0},
            {"type": "out_of_memory", "ctx": "fuzz", "nid": True}),
    "exit": ({"type": "do_exit", "code": 0},
             {"type": "do_exit", "task": True}),
    "fault": ({"type": "fault", "task": 1, "addr": 0, "write": False},
              {"type": "fault", "task": 1, "mm": True, "addr": 0, "write": False}),
    "ctl": ({"type": "sysfs_write", "knob": "run"},
            {"type": "sysfs_write", "knob": "run", "value": "1", "task": True}),
    "ksmd": ({"type": "signal"}, {"type": "signal", "sig": True}),
    "task": ({"type": "read", "addr": 0}, {"type": "read", "addr": True, "length": 8}),
    "supervisor": ({"type": "spawn_task", "name": "task-999"},
                   {"type": "task_exited", "task": True, "code": 0}),
}
_GENERIC = ({"type": "signal"}, {"type": "signal", "sig": True})


def _malformed(target: str, rng: random.Random) -> list[tuple[str, bytes, str, int]]:
    """(what, payload, errno name the codec gives it, id the error reply must carry)."""
    missing, boolint = _BAD_BODY.get(target.split("-")[0], _GENERIC)
    ping = codec.encode(codec.request("ping", 5, FUZZ_SRC))
    return [
        ("random bytes", rng.randbytes(64), "EBADMSG", 0),
        ("truncated msgpack", ping[:-4], "EBADMSG", 0),
        ("empty frame", b"", "EBADMSG", 0),
        ("msgpack list, not a map", msgpack.packb([1, "two", 3.0]), "EBADMSG", 0),
        ("msgpack int, not a map", msgpack.packb(7), "EBADMSG", 0),
        ("unknown message type", _env("frobnicate", 11), "EPROTO", 11),
        ("wrong protocol version", msgpack.packb({"v": 99, "type": "ping", "id": 12, "src": FUZZ_SRC}),
         "EPROTO", 12),
        ("id is a bool", msgpack.packb({"v": VERSION, "type": "ping", "id": True, "src": FUZZ_SRC}),
         "EPROTO", 0),
        ("missing field", _env(missing["type"], 13, **{k: v for k, v in missing.items()
                                                     if k != "type"}), "EINVAL", 13),
        ("bool for int", _env(boolint["type"], 14, **{k: v for k, v in boolint.items()
                                                    if k != "type"}), "EINVAL", 14),
        ("unknown field", _env("ping", 15, bogus=1), "EINVAL", 15),
        ("a type this actor does not handle", _env("verify" if target != "task" and
                                                   not target.startswith("task-") else "wakeup",
                                                   16), "EOPNOTSUPP", 16),
    ]


async def _recv_reply(sock: zmq.asyncio.Socket, who: str, what: str, seal: Seal) -> dict:
    try:
        data = await asyncio.wait_for(sock.recv(), 10)
    except TimeoutError:
        raise AssertionError(f"{who} gave no reply to {what}") from None
    return seal.decode(data)


def _send_and_vanish(c: Any, n: int = 3) -> None:
    """Send garbage to the supervisor from clients that disconnect before the error reply
    can be delivered (ROUTER_MANDATORY makes that reply fail with EHOSTUNREACH).

    A monitor on the supervisor's ROUTER, read from a sync socket sharing its context,
    holds the event loop (where the supervisor serves) until the sender is really gone."""
    shadow = zmq.Context.shadow(c.zctx.underlying)
    mon_ep = f"inproc://mon-{c.run_id}"
    c.router.monitor(mon_ep, zmq.EVENT_DISCONNECTED)
    mon = shadow.socket(zmq.PAIR)
    mon.connect(mon_ep)
    try:
        for i in range(n):
            gone_ctx = zmq.Context()
            s = endpoints.connect_dealer(gone_ctx, c.endpoints["supervisor"], routing_id(FUZZ_SRC, f"gone{i}"))
            s.setsockopt(zmq.LINGER, 5000)
            s.send(c.seal.seal_bytes(b"\xc1 garbage"))   # a member's garbage: it gets an error reply
            s.close()
            gone_ctx.term()  # returns once the message is flushed to the socket
            assert mon.poll(10_000), "the supervisor's ROUTER never saw the sender go"
            mon.recv_multipart()
    finally:
        c.router.disable_monitor()
        mon.close(linger=0)


@pytest.mark.asyncio
@pytest.mark.timeout(90)
async def test_malformed_messages_get_error_replies_and_every_actor_keeps_serving(cluster_factory):
    """Every actor - each kernel actor, a task, and the supervisor's own socket - answers
    random bytes, truncated msgpack, msgpack of the wrong type, an unknown message type, a
    missing field, a bool for an int (and a few more) with an error reply carrying the
    codec's errno (EBADMSG, EPROTO, EINVAL, EOPNOTSUPP) and the request id when one could
    be read; afterwards each still answers a ping. Garbage from senders that disconnect
    before the supervisor can reply does not stop it either. Real operations through every
    actor (ctl, task, fault, ksmd, the supervisor's spawn_task on fork, exit, oom) still
    work."""
    c = await cluster_factory(frames=512)
    t = await c.spawn_task(comm="victim")
    base = await t.mmap(8 * PAGE_SIZE)
    await t.memset(base, 0x42, 8 * PAGE_SIZE)
    await t.madvise(base, 8 * PAGE_SIZE, MADV_MERGEABLE)
    await c.sysfs_write("sleep_millisecs", 0)

    targets = {name: c.endpoints[name] for name in ("supervisor", *KERNEL_ACTORS)}
    targets[t.name] = endpoints.endpoint(c.sock_dir, t.name)
    rng = random.Random(4)
    zctx = zmq.asyncio.Context()
    try:
        for name, ep in targets.items():
            sock = endpoints.connect_dealer(zctx, ep, routing_id(FUZZ_SRC, f"fuzz{name}"))
            try:
                for what, payload, ename, rid in _malformed(name, rng):
                    if ename != "EOPNOTSUPP":  # the codec itself rejects it, with this errno
                        with pytest.raises(ProtocolError) as pe:
                            codec.decode(payload)
                        assert pe.value.name == ename, f"{what}: codec says {pe.value}"
                    await sock.send(c.seal.seal_bytes(payload))
                    r = await _recv_reply(sock, name, what, c.seal)
                    assert (r["type"], r["ok"], r["src"]) == ("reply", False, name), (name, what, r)
                    assert r["errno"] == errno_number(ename), f"{name} / {what}: {r}"
                    assert r["error"].startswith(errno_name(ename) + ":"), f"{name} / {what}: {r}"
                    assert r["id"] == rid, f"{name} / {what}: reply id {r['id']}"
                # Three frames instead of one: the envelope cannot even be found.
                await sock.send_multipart([b"one", b"two"])
                r = await _recv_reply(sock, name, "two frames", c.seal)
                assert (r["ok"], r["errno"]) == (False, errno_number("EBADMSG")), (name, r)
                # Still serving: a ping answers.
                await sock.send(c.seal.encode(codec.request("ping", 99, FUZZ_SRC)))
                r = await _recv_reply(sock, name, "ping", c.seal)
                assert (r["ok"], r["id"], r["result"]) == (True, 99, {"pong": name}), (name, r)
            finally:
                sock.close(linger=0)
    finally:
        zctx.destroy(linger=0)

    # A sender that is gone before its error reply does not stop the supervisor serving.
    _send_and_vanish(c)

    # Real operations through every actor still work.
    assert await c.sysfs_write("pages_to_scan", 321) == "321"          # ctl
    assert c.sysfs_read("pages_to_scan") == "321"
    extra = await t.mmap(2 * PAGE_SIZE)                                # task
    await t.write(extra + 5, b"fault ok")                              # fault
    assert await t.read(extra, 13) == b"\0" * 5 + b"fault ok"
    await c.ksm_start()                                                # ksmd
    k = c.ksm_counters()
    assert (k["pages_shared"], k["pages_sharing"]) == (1, 7)
    child = await t.fork()                                             # supervisor: spawn_task
    assert await child.read(base, 4) == b"\x42" * 4
    await child.exit()                                                 # exit
    r = await c.request("oom", "out_of_memory", timeout=10, ctx="fuzz")  # oom
    assert (r["action"], r["pid"]) == ("kill", t.pid)
    assert await t.wait_exit(15) == {"code": 137, "reason": "killed"}
    assert c.crashed is None
    assert c.reports == [], [r["title"] for r in c.reports]


# --- SIGKILL of one actor -------------------------------------------------------------------------

@pytest.mark.asyncio
@pytest.mark.timeout(60)
@pytest.mark.parametrize("victim", [*KERNEL_ACTORS, "task"])
async def test_sigkill_of_any_actor_ends_the_run_with_a_report(cluster_factory, victim):
    """SIGKILL of any single actor process ends the run: `crashed` is set, an actor_died
    report names the actor, its pid and SIGKILL, further API calls raise ClusterCrashed,
    every other actor process is gone, and after stop() nothing of the run is left in
    /dev/shm, the process table or the socket directory."""
    c = await cluster_factory(frames=256)
    t = await c.spawn_task()
    addr = await t.mmap(4 * PAGE_SIZE)
    await t.write(addr, b"before the kill")
    name = t.name if victim == "task" else victim
    pid = c.procs[name].pid
    assert c.crashed is None and list_segments(c.run_id)

    os.kill(pid, signal.SIGKILL)
    await wait_for(lambda: c.crashed, 15, "the cluster to notice the death")
    died = c.reports_of("actor_died")
    assert len(died) == 1, died
    rep = died[0]
    assert rep["data"] == {"actor": name, "rc": -signal.SIGKILL}
    assert f"actor {name} (pid {pid}) died unexpectedly" in rep["title"]
    assert "SIGKILL" in rep["title"]
    assert isinstance(c.crashed, ClusterCrashed) and c.crashed.reports is c.reports

    with pytest.raises(ClusterCrashed):
        await c.sysfs_write("run", 1)
    with pytest.raises(ClusterCrashed):
        await t.read(addr, 4)
    with pytest.raises(ClusterCrashed):
        await c.request("ksmd", "ping")
    with pytest.raises(ClusterCrashed):
        await c.wait_full_scans(1, timeout=10)
    with pytest.raises(ClusterCrashed):
        await c.spawn_task()
    with pytest.raises(ClusterCrashed):
        await t.wait_exit(5)
    await wait_for(lambda: all(p.poll() is not None for p in c.procs.values()), 15,
                   "every actor process to be gone")

    await c.stop()
    assert list_segments(c.run_id) == []
    assert all(p.poll() is not None for p in c.procs.values())
    assert not os.path.exists(c.sock_dir), os.listdir(c.sock_dir)
    assert _actor_pids_from_proc(c.cfg_path) == {}
    saved = json.loads(Path(c.run_dir, "reports.json").read_text())
    assert [r["kind"] for r in saved] == ["actor_died"]


# --- SIGKILL of the supervisor --------------------------------------------------------------------

def _ksmlab(*args: str, timeout: float = 30, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ksmlab.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def _actor_pids_from_proc(cfg_path: str) -> dict[int, str]:
    """pid -> actor name of every process running `actors.main <cfg_path> ...`: the fork
    server is "zygote", and an actor it forked has the server's command line and its own
    name as its comm (actors/zygote.py)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            argv = Path("/proc", d, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv if a]
        if "actors.main" in args:
            i = args.index("actors.main")
            if args[i + 1:i + 2] == [cfg_path]:
                name = args[i + 3]
                if name == "zygote":
                    with contextlib.suppress(OSError):
                        comm = Path("/proc", d, "comm").read_text().strip()
                        name = "zygote" if comm.startswith("python") else comm
                out[int(d)] = name
    return out


def _gone(pid: int) -> bool:
    """The process has exited (no /proc entry, or a zombie nobody reaped yet)."""
    try:
        stat = Path("/proc", str(pid), "stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


@pytest.mark.timeout(60)
def test_sigkill_of_the_supervisor_takes_every_actor_down_and_sweep_cleans_up(tmp_path):
    """`ksmlab run idle` SIGKILLed once its run is up: every actor process of the run exits
    by itself (PR_SET_PDEATHSIG), and `ksmlab sweep` then removes the run's /dev/shm
    segments, printing each one it removed."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "KSMLAB_IDLE_SECONDS": "60"}
    out = open(tmp_path / "out.txt", "wb")  # noqa: SIM115
    sup = subprocess.Popen([sys.executable, "-m", "ksmlab.cli", "run", "idle", "--json",
                            "--run-dir", str(run_dir)], stdout=out, stderr=subprocess.STDOUT,
                           env=env)
    out.close()
    run_id = None
    pids: dict[int, str] = {}
    try:
        cfg_path = run_dir / "cluster.json"
        deadline = time.monotonic() + 40
        while True:  # up = cluster.json written and `ksmlab stat` sees two tasks merged
            assert sup.poll() is None, (tmp_path / "out.txt").read_text()
            if cfg_path.exists():
                st = _ksmlab("stat", "--run", str(run_dir))
                if st.returncode == 0 and "pages_sharing:31\n" in st.stdout:
                    break
            assert time.monotonic() < deadline, "the idle run did not come up"
            time.sleep(0.1)
        cfg = json.loads(cfg_path.read_text())
        run_id = cfg["run_id"]
        segments = list_segments(run_id)
        assert segments and all(s.startswith(f"ksmlab_{sup.pid}_{run_id}_") for s in segments)
        pids = _actor_pids_from_proc(str(cfg_path))
        from_logs = {int(f.stem.rsplit("-", 1)[1]): f.stem.rsplit("-", 1)[0]
                     for f in (run_dir / "logs").glob("*.jsonl")}
        assert from_logs.pop(sup.pid) == "supervisor"
        assert list(pids.values()).count("zygote") == 1  # the fork server, which has no log
        assert {p: n for p, n in pids.items() if n != "zygote"} == from_logs
        assert set(pids.values()) == {*KERNEL_ACTORS, "task-100", "task-101", "zygote"}

        os.kill(sup.pid, signal.SIGKILL)
        assert sup.wait(10) == -signal.SIGKILL
        deadline = time.monotonic() + 15
        while not all(_gone(p) for p in pids):
            assert time.monotonic() < deadline, \
                f"actors outlived their supervisor: {[pids[p] for p in pids if not _gone(p)]}"
            time.sleep(0.02)
        assert list_segments(run_id) == segments  # nobody cleaned up yet

        sw = _ksmlab("sweep")
        assert sw.returncode == 0, sw.stderr
        removed = {line.split(" ", 1)[1] for line in sw.stdout.splitlines()
                   if line.startswith("removed ")}
        assert set(segments) <= removed, sw.stdout
        assert list_segments(run_id) == []
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait(10)
        for p in pids:
            if not _gone(p):
                os.kill(p, signal.SIGKILL)
        if run_id is not None:
            sweep_stale(run_id)
