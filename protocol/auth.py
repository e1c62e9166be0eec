# Who may talk to a run: the run secret, the sender's connection, and what it may ask.
#
# The actors' sockets are ipc:// files in a 0700 folder, but anything that can reach them
# (another process of the same user, a socket path guessed in /tmp) could otherwise send
# `shutdown` to ksmd, `out_of_memory` to the OOM killer, a `report` "from" ksmd, or a
# `do_exit` for a guessed task handle. Three checks stop that, in this order, for every
# message an actor or the supervisor receives; a message that fails any of them changes
# nothing:
#
#  1. The run secret. The supervisor draws 32 random bytes at boot and writes them to
#     `RUN_DIR/secret` (0600); every actor reads them at start. Each message travels as a
#     16-byte keyed BLAKE2b tag of its bytes, then the bytes. A message without the right
#     tag is dropped unanswered (EACCES in the receiver's log): a stranger learns nothing,
#     not even the protocol's error replies.
#  2. The sender is its connection. Every DEALER's routing id is "NAME.SUFFIX" (a thread,
#     a pid), and the ROUTER sees that id whatever the message says; a message whose `src`
#     is not that NAME is refused with EPERM. libzmq refuses a second connection with an id
#     already in use, so a member cannot take over another's either.
#  3. What the sender may ask. SENDERS (protocol/messages.py) names the roles that may send
#     each request type (only the supervisor shuts an actor down; only a task asks for a
#     fault), and OWN_TASK the fields that, from a task, must be that task's own handle
#     (a task exits itself, faults in its own mm's name). Refused with EPERM.
#
# Check 3's object half needs the kernel's task table, so the receiving actor does it
# (own_task_ok, called with the task record's pid); checks 1 and 2 and the role half of 3
# are Seal.decode's. Every encode and decode of a message goes through a Seal:
# tests/test_auth.py fails if any other module calls the codec directly.
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from typing import Any

from protocol import codec
from protocol.codec import ProtocolError
from protocol.messages import OWN_TASK, SENDERS

TAG_LEN = 16
SECRET_LEN = 32
SECRET_FILE = "secret"


def role_of(name: str) -> str:
    """The role of an actor name: "task-105" is a task, "ksmd" is ksmd."""
    return name.split("-", 1)[0]


def routing_id(name: str, suffix: str) -> bytes:
    """The routing id a member connects with: its name, a dot, anything unique."""
    return f"{name}.{suffix}".encode()


def sender_of(peer: bytes) -> str:
    """The name a connection speaks for (the routing id up to its first dot)."""
    return peer.split(b".", 1)[0].decode("utf-8", "replace")


def new_secret(run_dir: str) -> str:
    """Draw a run secret and write it to RUN_DIR/secret, readable by its owner only."""
    path = os.path.join(run_dir, SECRET_FILE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, secrets.token_bytes(SECRET_LEN))
    finally:
        os.close(fd)
    return path


def read_secret(path: str) -> bytes:
    with open(path, "rb") as f:
        key = f.read()
    if len(key) != SECRET_LEN:
        raise ValueError(f"{path}: not a run secret ({len(key)} bytes)")
    return key


def own_task_ok(src: str, msg: dict[str, Any], task_of: Any) -> bool:
    """From a task, the OWN_TASK fields of msg must be that very task's handle (and its
    mm's): task_of(handle) is (pid, mm) of that task record, or None if it is no task."""
    if role_of(src) != "task":
        return True
    fields = OWN_TASK.get(msg["type"])
    if fields is None:
        return True
    task_field, mm_field = fields
    try:
        found = task_of(int(msg[task_field]))
        return (found is not None and found[0] == int(src.split("-", 1)[1])
                and (mm_field is None or found[1] == int(msg[mm_field])))
    except (ValueError, IndexError, LookupError, TypeError):
        return False


class Seal:
    """One run's message sealing, held by every member of the run."""

    def __init__(self, key: bytes) -> None:
        if len(key) != SECRET_LEN:
            raise ValueError("a run secret is 32 bytes")
        self._key = key

    @classmethod
    def of_run(cls, secret_path: str) -> Seal:
        return cls(read_secret(secret_path))

    def _tag(self, payload: bytes) -> bytes:
        return hashlib.blake2b(payload, key=self._key, digest_size=TAG_LEN).digest()

    def seal_bytes(self, payload: bytes) -> bytes:
        """Any bytes as a member would send them (tests seal malformed payloads with it)."""
        return self._tag(payload) + payload

    def encode(self, msg: dict[str, Any]) -> bytes:
        return self.seal_bytes(codec.encode(msg))

    def decode(self, data: bytes, peer: bytes | None = None) -> dict[str, Any]:
        """The message in data, checked: sealed with this run's secret (else EACCES),
        and, when it came through a ROUTER from peer, sent by the connection it names and
        of a type that sender's role may send (else EPERM)."""
        if len(data) < TAG_LEN or not hmac.compare_digest(data[:TAG_LEN], self._tag(data[TAG_LEN:])):
            raise ProtocolError("EACCES", "not sealed with this run's secret")
        msg = codec.decode(data[TAG_LEN:])
        if peer is not None:
            env = {k: msg[k] for k in ("id", "src", "type")}
            who = sender_of(peer)
            if msg["src"] != who:
                raise ProtocolError("EPERM", f"connection {who!r} sent a message as {msg['src']!r}", env)
            allowed = SENDERS.get(msg["type"])
            if allowed is not None and role_of(who) not in allowed:
                raise ProtocolError("EPERM", f"a {role_of(who)} may not send {msg['type']}", env)
        return msg
