# Runs trust only their own members (protocol/auth.py): each message the issue found a
# local process could send, sent to a live cluster, must change nothing.
#
#   - a stranger (no run secret): `shutdown` to ksmd, `out_of_memory` to the OOM killer
#     with memory free, a `report` "from ksmd" to the supervisor, a `do_exit` of a guessed
#     task handle: dropped unanswered, each logged as EACCES;
#   - a message sealed with another run's secret: the same;
#   - a member speaking for another (connection "cli", src "ksmd"): EPERM;
#   - a member asking what its role may not (the command line shutting ksmd down): EPERM;
#   - a task exiting another task: EPERM, and the other task lives on.
# Afterwards every actor still serves and the run has no report.
from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from protocol import codec, endpoints
from protocol.auth import Seal, routing_id
from protocol.messages import errno_number

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(90)]


def _raw(mtype: str, mid: int, src: str, **fields) -> bytes:
    return codec.encode(codec.request(mtype, mid, src, **fields))


async def _answer(sock: zmq.asyncio.Socket, seal: Seal, wait: float) -> dict | None:
    if not await sock.poll(int(wait * 1000)):
        return None
    return seal.decode(await sock.recv())


def _bad_messages(c, actor: str) -> list[dict]:
    """The bad_message events the actor logged (its own JSON log)."""
    out = []
    for p in sorted(Path(c.run_dir, "logs").glob(f"{actor}-*.jsonl")):
        out += [e for e in map(json.loads, p.read_text().splitlines()) if e.get("event") == "bad_message"]
    return out


async def test_strangers_impostors_and_overreaching_members_change_nothing(cluster_factory):
    c = await cluster_factory(frames=512)
    victim = await c.spawn_task(comm="victim")
    other = await c.spawn_task(comm="other")
    areas = {}
    for t in (victim, other):
        areas[t.name] = await t.mmap(4096)
        await t.write(areas[t.name], b"alive")
    stranger = Seal(secrets.token_bytes(32))             # another run's secret
    zctx = zmq.asyncio.Context()
    try:
        async def send(actor: str, data: bytes, ident: bytes) -> dict | None:
            sock = endpoints.connect_dealer(zctx, c.endpoints.get(actor) or endpoints.endpoint(c.sock_dir, actor), ident)
            try:
                await sock.send(data)
                return await _answer(sock, c.seal, 1.0)
            finally:
                sock.close(linger=0)

        # A stranger: unsealed, or sealed with someone else's secret. No answer at all.
        strange = [
            ("ksmd", _raw("shutdown", 1, "supervisor")),
            ("oom", _raw("out_of_memory", 2, "ksmd", ctx="ksmd", nid=0)),
            ("supervisor", _raw("report", 0, "ksmd", kind="kasan", title="BUG: KASAN: forged", text="x")),
            ("exit", _raw("do_exit", 3, "supervisor", task=victim.handle, code=0)),
        ]
        for actor, raw in strange:
            for data in (raw, stranger.seal_bytes(raw)):
                assert await send(actor, data, routing_id("supervisor", "x")) is None, actor
        assert {e["error"].split(":")[0] for a in ("ksmd", "oom", "exit", "supervisor")
                for e in _bad_messages(c, a)} == {"EACCES"}

        # Members overstepping: sealed, but speaking for another, or asking beyond their role.
        r = await send("supervisor", c.seal.encode(codec.request(
            "report", 4, "ksmd", kind="kasan", title="BUG: KASAN: forged", text="x")), routing_id("cli", "1"))
        assert r is None or (r["ok"], r["errno"]) == (False, errno_number("EPERM"))   # a notify: id 4 is echoed
        r = await send("ksmd", c.seal.encode(codec.request("shutdown", 5, "cli")), routing_id("cli", "1"))
        assert (r["ok"], r["errno"], r["id"]) == (False, errno_number("EPERM"), 5), r
        r = await send("exit", c.seal.encode(codec.request("do_exit", 6, victim.name, task=other.handle)),
                       routing_id(victim.name, "x"))
        assert (r["ok"], r["errno"], r["id"]) == (False, errno_number("EPERM"), 6), r
    finally:
        zctx.destroy(linger=0)

    # Nothing happened: every actor serves, both tasks live with their memory, no report.
    for actor in ("ksmd", "oom", "exit", "fault", "ctl", "kswapd"):
        assert (await c.request(actor, "ping", timeout=10))["pong"] == actor
    for t in (victim, other):
        assert not t.exited.done()
        assert await t.read(areas[t.name], 5) == b"alive"
    await asyncio.sleep(0)
    assert c.reports == [], [r["title"] for r in c.reports]
    assert c.crashed is None
