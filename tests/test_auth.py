# protocol/auth.py on its own: the seal, the sender check, the role table, and that no code
# path sends or reads a message without going through a Seal.
from __future__ import annotations

import ast
import secrets
from pathlib import Path

import pytest

from protocol import codec
from protocol.auth import Seal, new_secret, own_task_ok, read_secret, role_of, routing_id, sender_of
from protocol.codec import ProtocolError
from protocol.messages import MESSAGES, SENDERS

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def seal() -> Seal:
    return Seal(secrets.token_bytes(32))


def _errno(fn) -> str:
    with pytest.raises(ProtocolError) as e:
        fn()
    return e.value.name


def test_a_sealed_message_round_trips_and_any_change_is_eacces(seal):
    data = seal.encode(codec.request("ping", 7, "ksmd"))
    assert seal.decode(data, routing_id("ksmd", "1"))["id"] == 7
    for i in (0, 15, 16, len(data) - 1):                  # the tag, and the message itself
        bad = bytearray(data)
        bad[i] ^= 1
        assert _errno(lambda b=bytes(bad): seal.decode(b)) == "EACCES"
    assert _errno(lambda: seal.decode(data[:10])) == "EACCES"
    assert _errno(lambda: Seal(secrets.token_bytes(32)).decode(data)) == "EACCES"
    assert _errno(lambda: seal.decode(codec.encode(codec.request("ping", 7, "ksmd")))) == "EACCES"


def test_the_sender_is_its_connection_and_its_role_bounds_what_it_asks(seal):
    forged = seal.encode(codec.request("report", 1, "ksmd", kind="k", title="t", text="x"))
    assert _errno(lambda: seal.decode(forged, routing_id("cli", "9"))) == "EPERM"
    assert seal.decode(forged, routing_id("ksmd", "9"))["src"] == "ksmd"
    down = seal.encode(codec.request("shutdown", 2, "task-100"))
    assert _errno(lambda: seal.decode(down, routing_id("task-100", "9"))) == "EPERM"
    assert seal.decode(seal.encode(codec.request("shutdown", 2, "supervisor")), routing_id("supervisor", "x"))
    assert (role_of("task-105"), role_of("ksmd"), sender_of(b"task-105.abc")) == ("task", "ksmd", "task-105")


def test_every_message_type_says_who_may_send_it():
    assert set(SENDERS) == set(MESSAGES)


def test_a_task_may_name_only_itself_and_its_own_mm():
    task_of = {11: (100, 7), 12: (101, 8)}.get
    mine = {"type": "do_exit", "task": 11}
    theirs = {"type": "do_exit", "task": 12}
    assert own_task_ok("task-100", mine, task_of) and not own_task_ok("task-100", theirs, task_of)
    assert not own_task_ok("task-100", {"type": "do_exit", "task": 99}, task_of)   # no such task
    assert own_task_ok("supervisor", theirs, task_of)          # the user's program may
    assert own_task_ok("task-100", {"type": "ping"}, task_of)
    assert own_task_ok("task-100", {"type": "fault", "task": 11, "mm": 7}, task_of)
    assert not own_task_ok("task-100", {"type": "fault", "task": 11, "mm": 8}, task_of)  # another's mm


def test_the_secret_file_is_the_owners_alone(tmp_path):
    path = new_secret(str(tmp_path))
    assert Path(path).stat().st_mode & 0o777 == 0o600 and len(read_secret(path)) == 32
    with pytest.raises(FileExistsError):
        new_secret(str(tmp_path))                              # never reused, never followed
    Path(path).write_bytes(b"short")
    with pytest.raises(ValueError):
        read_secret(path)


def _codec_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr in ("encode", "decode")
                and isinstance(node.value, ast.Name) and node.value.id == "codec"):
            out.append(f"{path.name}:{node.lineno}: codec.{node.attr}")
        if isinstance(node, ast.ImportFrom) and node.module == "protocol.codec":
            out += [f"{path.name}:{node.lineno}: imports {a.name}" for a in node.names
                    if a.name in ("encode", "decode")]
    return out


def test_no_code_sends_or_reads_a_message_around_the_seal(tmp_path):
    """Only protocol/auth.py may call the codec's encode and decode: anything else would
    send unsealed messages or take unchecked ones. The checker is tried on a sample first."""
    sample = tmp_path / "sample.py"
    sample.write_text("from protocol import codec\nfrom protocol.codec import encode\ncodec.decode(b'')\n")
    assert sorted(_codec_calls(sample)) == ["sample.py:2: imports encode", "sample.py:3: codec.decode"]
    found = [hit for pkg in ("actors", "ksmlab", "protocol") for p in sorted((ROOT / pkg).rglob("*.py"))
             if p.name not in ("codec.py", "auth.py") for hit in _codec_calls(p)]
    assert not found, found
