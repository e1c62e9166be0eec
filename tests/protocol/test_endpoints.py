# Tests for protocol.endpoints over real ZeroMQ sockets (no mocks): private 0700 socket
# directories, the sockaddr_un length fallback to /tmp, ROUTER/DEALER round trips over ipc (and
# the tcp fallback), ROUTER_MANDATORY, bad frames reported with the sender, and cleanup.
from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator

import msgpack
import pytest
import zmq

from protocol import endpoints as E
from protocol.codec import ProtocolError, reply_err, reply_ok, request

POLL_MS = 3000


def mode(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A short base directory, so <dir>/run/sock/<actor>.sock fits in sun_path."""
    d = tempfile.mkdtemp(prefix="kp-", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def run_id() -> Iterator[str]:
    rid = "t" + uuid.uuid4().hex[:12]
    yield rid
    shutil.rmtree(E.FALLBACK_PREFIX + rid, ignore_errors=True)


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    c = E.make_context()
    try:
        yield c
    finally:
        c.destroy(linger=0)


def recv_ready(sock: zmq.Socket) -> None:
    assert sock.poll(POLL_MS, zmq.POLLIN), "timed out waiting for a message"


def test_socket_dir_is_private(short_dir: str, run_id: str) -> None:
    run_dir = os.path.join(short_dir, "run")
    d = E.socket_dir(run_dir, run_id)
    assert d == os.path.join(run_dir, "sock")
    assert mode(d) == 0o700 and mode(run_dir) == 0o700
    assert not E.is_fallback_dir(d)
    # an existing, too-open run dir is tightened
    os.chmod(run_dir, 0o755)
    os.chmod(d, 0o777)
    assert E.socket_dir(run_dir, run_id) == d
    assert mode(d) == 0o700 and mode(run_dir) == 0o700


def test_long_run_dir_falls_back_to_tmp(short_dir: str, run_id: str) -> None:
    run_dir = os.path.join(short_dir, "r" * 60, "s" * 30)
    d = E.socket_dir(run_dir, run_id)
    assert d == E.FALLBACK_PREFIX + run_id
    assert E.is_fallback_dir(d)
    assert mode(d) == 0o700 and mode(run_dir) == 0o700
    ep = E.endpoint(d, "x" * E.ACTOR_NAME_MAX)
    assert len(ep[len("ipc://") :]) <= E.SUN_PATH_MAX
    E.cleanup(d)
    assert not os.path.exists(d)


def test_fallback_refuses_planted_symlink(short_dir: str, run_id: str) -> None:
    target = os.path.join(short_dir, "elsewhere")
    os.mkdir(target)
    os.symlink(target, E.FALLBACK_PREFIX + run_id)
    try:
        with pytest.raises(FileExistsError):
            E.socket_dir(os.path.join(short_dir, "r" * 100), run_id)
    finally:
        os.unlink(E.FALLBACK_PREFIX + run_id)


def test_bad_names_are_refused(short_dir: str) -> None:
    for bad in ("", "Ksmd", "a/b", "x" * 33, "..", "tâche", "a b"):
        with pytest.raises(ValueError):
            E.endpoint(short_dir, bad)
    for bad in ("", "../x", "a/b", ".."):
        with pytest.raises(ValueError):
            E.socket_dir(os.path.join(short_dir, "run"), bad)
    with pytest.raises(ValueError):  # needs the fallback, and even that is too long
        E.socket_dir(os.path.join(short_dir, "r" * 100), "x" * 100)
    assert E.check_actor_name("task.12_a-b") == "task.12_a-b"


def test_endpoint_format(short_dir: str, run_id: str) -> None:
    d = E.socket_dir(os.path.join(short_dir, "run"), run_id)
    assert E.endpoint(d, "ksmd") == f"ipc://{d}/ksmd.sock"
    assert E.transport() == "ipc"


def test_router_dealer_roundtrip_over_ipc(short_dir: str, run_id: str, ctx: zmq.Context) -> None:
    d = E.socket_dir(os.path.join(short_dir, "run"), run_id)
    ep = E.endpoint(d, "supervisor")
    router = E.bind_router(ctx, ep)
    assert E.bound_endpoint(router) == ep
    sock_file = os.path.join(d, "supervisor.sock")
    assert stat.S_ISSOCK(os.lstat(sock_file).st_mode)
    assert mode(d) == 0o700
    dealer = E.connect_dealer(ctx, ep, b"task.1")

    E.dealer_send(dealer, request("mmap", 5, "task.1", length=8192, prot=3, flags=0x22))
    recv_ready(router)
    peer, msg = E.router_recv(router)
    assert peer == b"task.1"
    assert msg["type"] == "mmap" and msg["addr"] == 0 and msg["nid"] == -1

    E.router_send(router, peer, reply_ok(msg, "supervisor", result=0x7F0000000000))
    recv_ready(dealer)
    rep = E.dealer_recv(dealer)
    assert rep["id"] == 5 and rep["ok"] is True and rep["result"] == 0x7F0000000000

    # zero-copy receive path hands zmq.Frame objects to the parsers
    E.dealer_send(dealer, request("ping", 6, "task.1"))
    recv_ready(router)
    peer, msg = E.parse_router_frames(router.recv_multipart(copy=False))
    assert (peer, msg["type"], msg["id"]) == (b"task.1", "ping", 6)

    router.close()
    dealer.close()
    E.cleanup(d)
    assert not os.path.exists(d)
    assert os.listdir(os.path.join(short_dir, "run")) == []


def test_router_mandatory_reports_unknown_peer(
    short_dir: str, run_id: str, ctx: zmq.Context
) -> None:
    d = E.socket_dir(os.path.join(short_dir, "run"), run_id)
    router = E.bind_router(ctx, E.endpoint(d, "oom"))
    with pytest.raises(zmq.ZMQError) as ei:
        E.router_send(router, b"nobody", request("ping", 1, "oom"))
    assert ei.value.errno == errno.EHOSTUNREACH
    router.close()
    E.cleanup(d)


def test_bad_message_over_the_wire_names_the_sender(
    short_dir: str, run_id: str, ctx: zmq.Context
) -> None:
    d = E.socket_dir(os.path.join(short_dir, "run"), run_id)
    ep = E.endpoint(d, "fault")
    router = E.bind_router(ctx, ep)
    dealer = E.connect_dealer(ctx, ep, b"task.9")

    dealer.send(b"\x93\x01\x02")  # a msgpack array, not a map
    recv_ready(router)
    with pytest.raises(ProtocolError) as ei:
        E.router_recv(router)
    err = ei.value
    assert err.name == "EBADMSG" and err.peer == b"task.9" and err.envelope is None
    E.router_send(router, err.peer, reply_err(err.envelope, "fault", err.errno, err.detail))
    recv_ready(dealer)
    rep = E.dealer_recv(dealer)
    assert rep["id"] == 0 and rep["errno"] == errno.EBADMSG

    # valid envelope, bad body: the error carries the id to answer
    bad = {"v": 1, "type": "read", "id": 0x11, "src": "task.9", "addr": True, "length": 4}
    dealer.send(msgpack.packb(bad))
    recv_ready(router)
    with pytest.raises(ProtocolError) as ei:
        E.router_recv(router)
    assert ei.value.name == "EINVAL" and ei.value.envelope["id"] == 0x11

    dealer.send_multipart([b"one", b"two"])  # two payload frames
    recv_ready(router)
    with pytest.raises(ProtocolError) as ei:
        E.router_recv(router)
    assert ei.value.name == "EBADMSG" and ei.value.peer == b"task.9"

    router.send_multipart([b"task.9", b"a", b"b"])
    recv_ready(dealer)
    with pytest.raises(ProtocolError):
        E.dealer_recv(dealer)
    router.close()
    dealer.close()
    E.cleanup(d)
    assert not os.path.exists(d)


def test_tcp_fallback(
    short_dir: str, run_id: str, ctx: zmq.Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(E.TRANSPORT_ENV, "tcp")
    assert E.transport() == "tcp"
    d = E.socket_dir(os.path.join(short_dir, "run"), run_id)
    ep = E.endpoint(d, "ksmd")
    assert ep == "tcp://127.0.0.1:*"
    sock = ctx.socket(zmq.ROUTER)
    actual = E.bind(sock, ep)
    assert actual.startswith("tcp://127.0.0.1:") and not actual.endswith(":*")
    sock.close()
    router = E.bind_router(ctx, ep)
    published = E.bound_endpoint(router)
    dealer = E.connect_dealer(ctx, published, b"ctl")
    E.dealer_send(dealer, request("sysfs_read", 1, "ctl", name="pages_shared"))
    recv_ready(router)
    peer, msg = E.router_recv(router)
    assert peer == b"ctl" and msg["name"] == "pages_shared"
    router.close()
    dealer.close()
    E.cleanup(d)
    assert not os.path.exists(d)


def test_connect_dealer_refuses_bad_identity(ctx: zmq.Context) -> None:
    for bad in (b"", b"\x00abc", "str", b"x" * 256):
        with pytest.raises(ValueError):
            E.connect_dealer(ctx, "tcp://127.0.0.1:1", bad)  # type: ignore[arg-type]


def test_context_defaults() -> None:
    c = E.make_context()
    try:
        assert c.linger == 0
        s = c.socket(zmq.DEALER)
        assert s.getsockopt(zmq.LINGER) == 0
        s.close()
    finally:
        c.destroy(linger=0)


def test_cleanup_tolerates_missing_and_keeps_foreign_files(short_dir: str, run_id: str) -> None:
    E.cleanup(os.path.join(short_dir, "does-not-exist"))
    d = E.socket_dir(os.path.join(short_dir, "run"), run_id)
    open(os.path.join(d, "ksmd.sock"), "w").close()
    open(os.path.join(d, "notes.txt"), "w").close()
    E.cleanup(d)
    assert os.listdir(d) == ["notes.txt"]
