# Where actors meet: ZeroMQ endpoint naming for one ksmlab run, plus the thin socket helpers
# every actor uses.
#
# Each actor binds (or is reached at) one endpoint. Normally that is an ipc:// socket file in a
# private 0700 directory of the run, so only this user can talk to the simulated kernel. Linux
# limits a unix socket path to 107 bytes (sockaddr_un.sun_path), so a deep run directory falls
# back to /tmp/ksmlab-<run_id>. Where libzmq has no ipc transport, endpoints become
# tcp://127.0.0.1:* and the kernel picks a free port at bind time: bind() returns the real
# endpoint and the binding actor must publish it (e.g. in its actor_ready message or a file).
#
# Footguns handled here (reference/testing-and-tracing.md 3.1): one Context per process created
# after start with linger 0, so ctx.term() never hangs on unsent messages; ROUTER_MANDATORY so
# a reply to a dead peer raises EHOSTUNREACH instead of vanishing; a stable routing id on
# each DEALER so the ROUTER side knows who is talking.
from __future__ import annotations

import contextlib
import os
import re
import stat
from typing import Any

import zmq

from .codec import ProtocolError, decode, encode

SOCK_SUBDIR = "sock"
FALLBACK_PREFIX = "/tmp/ksmlab-"  # + run_id
SUN_PATH_MAX = 107  # usable bytes of sockaddr_un.sun_path (108 with the NUL)
ACTOR_NAME_MAX = 32
TRANSPORT_ENV = "KSMLAB_ZMQ_TRANSPORT"  # "tcp" forces the tcp fallback (tests, exotic libzmq)

_ACTOR_RE = re.compile(rf"[a-z0-9_.-]{{1,{ACTOR_NAME_MAX}}}")
_RUN_ID_RE = re.compile(r"[A-Za-z0-9_.-]+")
_SOCK_SUFFIX = ".sock"


def transport() -> str:
    """ "ipc" normally; "tcp" if libzmq lacks ipc or $KSMLAB_ZMQ_TRANSPORT=tcp."""
    if os.environ.get(TRANSPORT_ENV, "").lower() == "tcp" or not zmq.has("ipc"):
        return "tcp"
    return "ipc"


def check_actor_name(actor: str) -> str:
    """Actor names are file names and routing ids: [a-z0-9_.-]{1,32}, not "." or ".."."""
    if not isinstance(actor, str) or not _ACTOR_RE.fullmatch(actor) or actor in (".", ".."):
        raise ValueError(f"bad actor name {actor!r}: want [a-z0-9_.-], 1..{ACTOR_NAME_MAX} chars")
    return actor


def _longest_ipc_path(sock_dir: str) -> int:
    return len(os.fsencode(sock_dir)) + 1 + ACTOR_NAME_MAX + len(_SOCK_SUFFIX)


def _private_dir(path: str, *, parents: bool) -> None:
    """Create path as a 0700 directory owned by us, or make an existing one so.

    Refuses a symlink or a directory owned by someone else (matters for the /tmp fallback,
    where another user could have planted the name first)."""
    try:
        if parents:
            os.makedirs(path, mode=0o700)
        else:
            os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a directory")
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path} is owned by uid {st.st_uid}, not us")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)


def socket_dir(run_dir: str, run_id: str) -> str:
    """Create and return the private directory for this run's ipc socket files.

    <run_dir>/sock (0700, run_dir made 0700 too) unless the longest endpoint path there would
    exceed 107 bytes; then /tmp/ksmlab-<run_id> (0700). The returned path is absolute."""
    if not isinstance(run_id, str) or not _RUN_ID_RE.fullmatch(run_id) or run_id in (".", ".."):
        raise ValueError(f"bad run id {run_id!r}: want [A-Za-z0-9_.-]+")
    run_dir = os.path.abspath(run_dir)
    _private_dir(run_dir, parents=True)
    sock_dir = os.path.join(run_dir, SOCK_SUBDIR)
    if _longest_ipc_path(sock_dir) > SUN_PATH_MAX:
        sock_dir = FALLBACK_PREFIX + run_id
        if _longest_ipc_path(sock_dir) > SUN_PATH_MAX:
            raise ValueError(f"run id {run_id!r} too long for an ipc path even under /tmp")
    _private_dir(sock_dir, parents=False)
    return sock_dir


def is_fallback_dir(sock_dir: str) -> bool:
    """True if sock_dir is a /tmp/ksmlab-<run_id> fallback made by socket_dir()."""
    return os.path.abspath(sock_dir).startswith(FALLBACK_PREFIX)


def endpoint(sock_dir: str, actor: str) -> str:
    """The endpoint actor binds: "ipc://<sock_dir>/<actor>.sock".

    With the tcp transport this is "tcp://127.0.0.1:*" (any free port): whoever binds it must
    publish what bind() returns, and peers connect to that published string."""
    check_actor_name(actor)
    if transport() == "tcp":
        return "tcp://127.0.0.1:*"
    path = os.path.join(os.path.abspath(sock_dir), actor + _SOCK_SUFFIX)
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise ValueError(f"ipc path {path!r} is longer than {SUN_PATH_MAX} bytes")
    return "ipc://" + path


def bind(sock: zmq.Socket, ep: str) -> str:
    """Bind sock to ep and return the endpoint actually bound (the real port for tcp ...:*)."""
    sock.bind(ep)
    return bound_endpoint(sock)


def bound_endpoint(sock: zmq.Socket) -> str:
    """The endpoint sock was last bound/connected to, as a str."""
    last = sock.getsockopt(zmq.LAST_ENDPOINT)
    return last.decode() if isinstance(last, bytes) else str(last)


def cleanup(sock_dir: str) -> None:
    """Remove the run's socket files (they survive SIGKILL of the binder), then the directory
    itself if that leaves it empty. Missing files or directory are fine."""
    try:
        names = os.listdir(sock_dir)
    except FileNotFoundError:
        return
    for name in names:
        if name.endswith(_SOCK_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(sock_dir, name))
    with contextlib.suppress(FileNotFoundError, OSError):
        os.rmdir(sock_dir)


# ----------------------------------------------------------------------------------------------
# sockets


def make_context() -> zmq.Context:
    """A new zmq.Context with linger 0. Create exactly one per process, after the process
    started (never inherit one across fork); destroy it with ctx.destroy(linger=0)."""
    ctx = zmq.Context()
    ctx.linger = 0
    return ctx


def bind_router(ctx: zmq.Context, ep: str) -> zmq.Socket:
    """A ROUTER bound to ep with ROUTER_MANDATORY=1 (sending to an unknown or gone peer raises
    zmq.ZMQError EHOSTUNREACH). Real endpoint: bound_endpoint(sock). Works for zmq.asyncio
    contexts too."""
    sock = ctx.socket(zmq.ROUTER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.bind(ep)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


RECONNECT_IVL_MS, RECONNECT_IVL_MAX_MS = 2, 100


def connect_dealer(ctx: zmq.Context, ep: str, identity: bytes) -> zmq.Socket:
    """A DEALER with routing id `identity` (1..255 bytes, not starting with NUL, which libzmq
    reserves for generated ids) connected to ep. Works for zmq.asyncio contexts too."""
    if not isinstance(identity, bytes) or not 0 < len(identity) <= 255 or identity[0] == 0:
        raise ValueError(f"bad routing id {identity!r}")
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, identity)
        # A peer is often connected to before it has bound (a task the supervisor just
        # forked): libzmq's default first retry comes 100 ms later, which was most of a
        # task's start. Retry soon, backing off to the default for a peer that stays away.
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        sock.connect(ep)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


# Framing: one message = one frame of msgpack. A DEALER sends [payload]; the ROUTER sees
# [peer_routing_id, payload] and replies with the same two frames. No empty delimiter frame.


def router_send(sock: zmq.Socket, peer: bytes, msg: dict[str, Any], flags: int = 0) -> None:
    """Encode msg and send it to peer through a ROUTER."""
    sock.send_multipart([peer, encode(msg)], flags)


def router_recv(sock: zmq.Socket, flags: int = 0) -> tuple[bytes, dict[str, Any]]:
    """Receive (peer, msg) on a ROUTER. A bad message raises ProtocolError whose .peer says
    who sent it (and .envelope, when known, the id to answer with reply_err)."""
    return parse_router_frames(sock.recv_multipart(flags))


def parse_router_frames(frames: list[Any]) -> tuple[bytes, dict[str, Any]]:
    """(peer, msg) from ROUTER frames; for callers that receive themselves (zmq.asyncio)."""
    peer = bytes(frames[0]) if frames else b""
    if len(frames) != 2:
        err = ProtocolError("EBADMSG", f"expected 2 frames [peer, payload], got {len(frames)}")
        err.peer = peer
        raise err
    try:
        return peer, decode(_frame_bytes(frames[1]))
    except ProtocolError as err:
        err.peer = peer
        raise


def dealer_send(sock: zmq.Socket, msg: dict[str, Any], flags: int = 0) -> None:
    """Encode msg and send it through a DEALER."""
    sock.send(encode(msg), flags)


def dealer_recv(sock: zmq.Socket, flags: int = 0) -> dict[str, Any]:
    """Receive one msg on a DEALER; bad input raises ProtocolError."""
    return parse_dealer_frames(sock.recv_multipart(flags))


def parse_dealer_frames(frames: list[Any]) -> dict[str, Any]:
    """msg from DEALER frames; for callers that receive themselves (zmq.asyncio)."""
    if len(frames) != 1:
        raise ProtocolError("EBADMSG", f"expected 1 frame [payload], got {len(frames)}")
    return decode(_frame_bytes(frames[0]))


def _frame_bytes(frame: Any) -> bytes:
    return frame if type(frame) is bytes else bytes(frame)  # zmq.Frame when copy=False


__all__ = [
    "ACTOR_NAME_MAX",
    "FALLBACK_PREFIX",
    "SUN_PATH_MAX",
    "TRANSPORT_ENV",
    "bind",
    "bind_router",
    "bound_endpoint",
    "check_actor_name",
    "cleanup",
    "connect_dealer",
    "dealer_recv",
    "dealer_send",
    "endpoint",
    "is_fallback_dir",
    "make_context",
    "parse_dealer_frames",
    "parse_router_frames",
    "router_recv",
    "router_send",
    "socket_dir",
    "transport",
]
