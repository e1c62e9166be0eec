# Tests for protocol.codec / protocol.messages: every message type round-trips, every kind of
# malformed input is refused with the right errno name, and nothing but ProtocolError ever
# escapes decode() (checked with a seeded fuzz loop over random and mutated messages).
from __future__ import annotations

import enum
import errno
import pickle
import random
from typing import Any

import msgpack
import pytest

from protocol import codec, messages
from protocol.codec import (
    MAX_MESSAGE,
    ProtocolError,
    decode,
    encode,
    is_reply,
    reply_err,
    reply_ok,
    request,
    unwrap_reply,
    validate,
)
from protocol.messages import ANY, MESSAGES, VERSION, Opt, errno_name, errno_number, errno_text

SAMPLES: dict[Any, Any] = {
    int: 0x7F00_0000_1000,
    bool: True,
    str: "task.3",
    bytes: b"\x00\xffpage",
    float: 1.5,
    list: [1, "a", None],
    dict: {"k": [1, 2], "b": b"x"},
}
ANY_SAMPLE = {"nested": [1, b"x", None, {"deep": 2.5}], "flag": False}


def _sample(spec: Any) -> Any:
    types = spec.types if isinstance(spec, Opt) else spec
    if types is ANY:
        return ANY_SAMPLE
    if isinstance(types, tuple):
        types = types[0]
    return SAMPLES[types]


def full_message(mtype: str, mid: int = 7) -> dict[str, Any]:
    fields = {name: _sample(spec) for name, spec in MESSAGES[mtype].items()}
    return request(mtype, mid, "tester", ts_ns=123456789, **fields)


def minimal_message(mtype: str) -> dict[str, Any]:
    fields = {
        name: _sample(spec) for name, spec in MESSAGES[mtype].items() if not isinstance(spec, Opt)
    }
    return request(mtype, 1, "tester", **fields)


def raw(obj: Any) -> bytes:
    """Pack without validation, to hand-craft bad messages."""
    return msgpack.packb(obj, use_bin_type=True)


def expect(data: Any, name: str) -> ProtocolError:
    with pytest.raises(ProtocolError) as ei:
        decode(data)
    assert ei.value.name == name, str(ei.value)
    assert ei.value.errno == getattr(errno, name)
    assert str(ei.value).startswith(name + ": ")
    return ei.value


def _deep(n: int) -> Any:
    v: Any = 0
    for _ in range(n):
        v = [v]
    return v


# -- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("mtype", sorted(MESSAGES))
def test_roundtrip_every_type_all_fields(mtype: str) -> None:
    msg = full_message(mtype)
    data = encode(msg)
    assert isinstance(data, bytes)
    assert decode(data) == msg


@pytest.mark.parametrize("mtype", sorted(MESSAGES))
def test_roundtrip_every_type_defaults_filled(mtype: str) -> None:
    msg = minimal_message(mtype)
    before = dict(msg)
    out = decode(encode(msg))
    assert msg == before, "encode must not mutate its argument"
    assert out["ts_ns"] == 0
    for name, spec in MESSAGES[mtype].items():
        if isinstance(spec, Opt):
            assert out[name] == spec.default
        else:
            assert out[name] == msg[name]


def test_listed_types_and_defaults() -> None:
    required = {
        "ping", "shutdown", "reply", "mmap", "munmap", "mprotect", "madvise", "prctl", "memset",
        "write", "read", "fork", "mlockall", "munlockall", "exit", "verify", "ksm_stat",
        "signal", "pagemap", "fault", "do_exit", "out_of_memory", "wakeup", "sysfs_write",
        "sysfs_read", "actor_ready", "report", "spawn_task", "task_exited",
    }  # fmt: skip
    assert required <= set(MESSAGES)
    assert VERSION == 1
    m = decode(encode(request("mmap", 3, "task.1", length=4096, prot=3, flags=0x22)))
    assert (m["addr"], m["nid"]) == (0, -1)
    m = decode(encode(request("fault", 4, "task.1", task=1, mm=2, addr=4096, write=False)))
    assert (m["npages"], m["flags"]) == (1, 0)
    m = decode(encode(request("do_exit", 5, "sup", task=1)))
    assert (m["code"], m["reason"]) == (0, "exit")
    m = decode(encode(request("prctl", 6, "task.1", option=67)))
    assert [m[f"arg{i}"] for i in range(2, 6)] == [0, 0, 0, 0]


def test_encode_accepts_intenum_and_tuple_payloads() -> None:
    class Prot(enum.IntFlag):
        READ = 1
        WRITE = 2

    msg = request("mprotect", 9, "task.1", addr=4096, length=4096, prot=Prot.READ | Prot.WRITE)
    out = decode(encode(msg))
    assert out["prot"] == 3 and type(out["prot"]) is int
    out = decode(encode(reply_ok({"id": 2}, "ksmd", result=(1, (2, 3)))))
    assert out["result"] == [1, [2, 3]]
    out = decode(encode(request("write", 1, "t", addr=0, data=bytearray(b"ab"))))
    assert out["data"] == b"ab"


def test_runtime_register_is_one_line() -> None:
    try:
        messages.register("probe", {"x": int, "tag": messages.opt(str, "none")})
        out = decode(encode(request("probe", 1, "t", x=5)))
        assert out["tag"] == "none"
        expect(raw({"v": 1, "type": "probe", "id": 1, "src": "t", "x": "5"}), "EINVAL")
    finally:
        MESSAGES.pop("probe", None)
        messages.COMPILED.pop("probe", None)


def test_mutable_defaults_are_not_shared() -> None:
    try:
        messages.register("probe2", {"items": messages.opt(list, [])})
        a = decode(encode(request("probe2", 1, "t")))
        a["items"].append(1)
        b = decode(encode(request("probe2", 2, "t")))
        assert b["items"] == []
    finally:
        MESSAGES.pop("probe2", None)
        messages.COMPILED.pop("probe2", None)


def test_register_rejects_bad_specs() -> None:
    with pytest.raises(TypeError):
        messages.register("bad", {"id": int})  # collides with envelope
    with pytest.raises(TypeError):
        messages.register("bad", {"x": set})
    with pytest.raises(TypeError):
        messages.register("bad", {"x": messages.opt(int, "zero")})
    assert "bad" not in MESSAGES


# -- malformed input: each class, right errno -------------------------------------------------

GOOD = {"v": 1, "type": "munmap", "id": 3, "src": "task.1", "addr": 4096, "length": 8192}


def with_(**kw: Any) -> dict[str, Any]:
    m = dict(GOOD)
    m.update(kw)
    return m


def without(*keys: str) -> dict[str, Any]:
    return {k: v for k, v in GOOD.items() if k not in keys}


MALFORMED: list[tuple[str, Any, str]] = [
    ("empty", b"", "EBADMSG"),
    ("random bytes", b"\xc1\xc1\xc1garbage", "EBADMSG"),
    ("truncated", raw(GOOD)[:-3], "EBADMSG"),
    ("truncated header", b"\xdf\x00", "EBADMSG"),
    ("trailing garbage", raw(GOOD) + b"\x00", "EBADMSG"),
    ("two messages", raw(GOOD) + raw(GOOD), "EBADMSG"),
    ("array not map", raw(list(GOOD.values())), "EBADMSG"),
    ("scalar not map", raw(42), "EBADMSG"),
    ("nil", raw(None), "EBADMSG"),
    ("int key", raw({**GOOD, 5: 1}), "EBADMSG"),
    ("bytes key", raw({**GOOD, b"addr2": 1}), "EBADMSG"),
    ("bytes envelope key", raw({**without("v"), b"v": 1}), "EBADMSG"),
    ("invalid utf8", raw(GOOD).replace(b"task.1", b"task\xff\xfe"), "EBADMSG"),
    ("ext type", raw(with_(addr=msgpack.ExtType(3, b"xx"))), "EBADMSG"),
    ("deep nesting", b"\x91" * 100_000 + b"\x00", "EBADMSG"),
    ("missing v", raw(without("v")), "EPROTO"),
    ("missing type", raw(without("type")), "EPROTO"),
    ("missing id", raw(without("id")), "EPROTO"),
    ("missing src", raw(without("src")), "EPROTO"),
    ("wrong version", raw(with_(v=2)), "EPROTO"),
    ("version as bool", raw(with_(v=True)), "EPROTO"),
    ("version as str", raw(with_(v="1")), "EPROTO"),
    ("unknown type", raw(with_(type="teleport")), "EPROTO"),
    ("type not str", raw(with_(type=7)), "EPROTO"),
    ("negative id", raw(with_(id=-1)), "EPROTO"),
    ("id as bool", raw(with_(id=True)), "EPROTO"),
    ("id as float", raw(with_(id=3.0)), "EPROTO"),
    ("src as bytes", raw(with_(src=b"task.1")), "EPROTO"),
    ("ts_ns as float", raw(with_(ts_ns=1.5)), "EPROTO"),
    ("missing required field", raw(without("length")), "EINVAL"),
    ("unknown field", raw(with_(color="red")), "EINVAL"),
    ("wrong type str for int", raw(with_(addr="4096")), "EINVAL"),
    ("bool for int", raw(with_(addr=True)), "EINVAL"),
    ("float for int", raw(with_(addr=4096.0)), "EINVAL"),
    ("nil for int", raw(with_(addr=None)), "EINVAL"),
    (
        "int for bool",
        raw({"v": 1, "type": "reply", "id": 1, "src": "x", "ok": 1}),
        "EINVAL",
    ),
    (
        "str for bytes",
        raw({"v": 1, "type": "write", "id": 1, "src": "x", "addr": 0, "data": "abc"}),
        "EINVAL",
    ),
    ("oversized", b"\x00" * (MAX_MESSAGE + 1), "EMSGSIZE"),
]


@pytest.mark.parametrize(("case", "data", "name"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_input(case: str, data: bytes, name: str) -> None:
    expect(data, name)


def test_decode_non_bytes_is_protocol_error() -> None:
    for bad in ("text", None, 17, [b"x"]):
        with pytest.raises(ProtocolError) as ei:
            decode(bad)  # type: ignore[arg-type]
        assert ei.value.name == "EINVAL"


def test_decode_accepts_buffers() -> None:
    data = encode(GOOD)
    assert decode(bytearray(data)) == decode(memoryview(data)) == decode(data)


def test_error_carries_envelope_for_reply() -> None:
    err = expect(raw(with_(addr="x", id=41)), "EINVAL")
    assert err.envelope == {"id": 41, "src": "task.1", "type": "munmap"}
    rep = decode(encode(reply_err(err.envelope, "ksmd", err.errno, err.detail)))
    assert rep["id"] == 41 and rep["errno"] == errno.EINVAL
    assert rep["error"].startswith("EINVAL: munmap.addr")
    assert expect(raw(42), "EBADMSG").envelope is None


@pytest.mark.parametrize(
    ("msg", "name"),
    [
        ([1, 2], "EBADMSG"),
        (without("src"), "EPROTO"),
        (with_(type="nope"), "EPROTO"),
        (with_(v=0), "EPROTO"),
        (with_(addr=False), "EINVAL"),
        (with_(length=None), "EINVAL"),
        (with_(extra=1), "EINVAL"),
        ({**GOOD, 3: 4}, "EINVAL"),
        (reply_ok(GOOD, "x", result={1: "int key"}), "EINVAL"),
        (reply_ok(GOOD, "x", result={"a": [{(1, 2): 0}]}), "EINVAL"),
        (reply_ok(GOOD, "x", result={"a": {1, 2}}), "EINVAL"),
        (reply_ok(GOOD, "x", result=object()), "EINVAL"),
        (with_(addr=1 << 70), "EINVAL"),
        (reply_ok(GOOD, "x", result=_deep(600)), "EINVAL"),
        (reply_ok(GOOD, "x", result=_deep(5000)), "EINVAL"),
    ],
)
def test_encode_rejects_invalid(msg: Any, name: str) -> None:
    try:
        before = repr(msg)
    except RecursionError:
        before = None
    with pytest.raises(ProtocolError) as ei:
        encode(msg)
    assert ei.value.name == name, str(ei.value)
    if before is not None:
        assert repr(msg) == before, "encode must not mutate its argument"


def test_encode_oversized() -> None:
    msg = request("write", 1, "t", addr=0, data=bytes(MAX_MESSAGE))
    with pytest.raises(ProtocolError) as ei:
        encode(msg)
    assert ei.value.name == "EMSGSIZE"
    # the per-thread packer is still usable after a failure
    assert decode(encode(GOOD)) == {**GOOD, "ts_ns": 0}


def test_validate_fills_defaults_in_place() -> None:
    m = request("exit", 1, "task.1")
    assert validate(m) is m and m["code"] == 0


# -- ProtocolError, errno and reply helpers ---------------------------------------------------


def test_protocol_error_shape() -> None:
    e = ProtocolError("EBADMSG", "truncated msgpack data")
    assert isinstance(e, Exception)
    assert (e.name, e.errno, e.detail) == ("EBADMSG", errno.EBADMSG, "truncated msgpack data")
    assert str(e) == "EBADMSG: truncated msgpack data"
    assert ProtocolError(errno.EPROTO, "x").name == "EPROTO"
    e2 = pickle.loads(pickle.dumps(ProtocolError("EINVAL", "d", {"id": 1, "src": "", "type": ""})))
    assert (e2.name, e2.detail, e2.envelope["id"]) == ("EINVAL", "d", 1)


def test_errno_helpers() -> None:
    assert errno_number("ENOMEM") == errno.ENOMEM
    assert errno_number("enomem") == errno.ENOMEM
    assert errno_number(errno.EBUSY) == errno.EBUSY
    assert errno_number(-errno.EBUSY) == errno.EBUSY  # kernel-style -EBUSY
    assert errno_name(errno.EINVAL) == "EINVAL"
    assert errno_name("EWOULDBLOCK") == "EAGAIN"
    assert errno_text("EBUSY", "ksmd running") == "EBUSY: ksmd running"
    for bad in ("ENOTATHING", "errorcode", 99999, True, 1.0):
        with pytest.raises(ValueError):
            errno_number(bad)  # type: ignore[arg-type]


def test_reply_helpers() -> None:
    req = decode(encode(request("read", 12, "task.2", addr=0, length=4)))
    ok = decode(encode(reply_ok(req, "task.2", result=b"abcd")))
    assert is_reply(ok) and not is_reply(req) and not is_reply([])  # type: ignore[arg-type]
    assert ok["id"] == 12 and ok["ok"] is True and unwrap_reply(ok) == b"abcd"
    bad = decode(encode(reply_err(req, "fault", "EFAULT", "bad address 0x0")))
    assert bad["ok"] is False and bad["errno"] == errno.EFAULT
    assert bad["error"] == "EFAULT: bad address 0x0"
    with pytest.raises(OSError) as ei:
        unwrap_reply(bad)
    assert ei.value.errno == errno.EFAULT
    anon = decode(encode(reply_err(None, "sup", errno.EPROTO, "garbage")))
    assert anon["id"] == 0 and anon["error"] == "EPROTO: garbage"
    with pytest.raises(ValueError):
        reply_err(req, "x", "ENOTATHING", "nope")


# -- fuzz: only ProtocolError may escape -----------------------------------------------------


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    k = rng.randrange(12 if depth < 2 else 8)
    return [
        lambda: rng.randrange(-(1 << 63), 1 << 64),
        lambda: rng.random() * 1e9,
        lambda: rng.choice([True, False, None]),
        lambda: "".join(rng.choice("abcé\x00") for _ in range(rng.randrange(6))),
        lambda: rng.randbytes(rng.randrange(6)),
        lambda: rng.choice(list(MESSAGES)),
        lambda: rng.choice([0, 1, -1, VERSION + 1]),
        lambda: rng.choice(["v", "type", "id", "src", "addr"]),
        lambda: [_random_value(rng, depth + 1) for _ in range(rng.randrange(3))],
        lambda: {str(_random_value(rng, 2)): _random_value(rng, depth + 1) for _ in range(2)},
        lambda: {rng.randrange(5): 1},
        lambda: msgpack.ExtType(rng.randrange(128), b"x"),
    ][k]()


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(5)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(pos, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[min(pos, len(b) - 1)] = rng.randrange(256)
        elif op == 2:
            b = b[:pos]
        elif op == 3:
            b[pos:pos] = rng.randbytes(rng.randrange(1, 4))
        elif op == 4 and b:
            del b[pos : pos + rng.randrange(1, 4)]
    return bytes(b)


def _mutate_dict(rng: random.Random, msg: dict[str, Any]) -> dict[Any, Any]:
    m: dict[Any, Any] = dict(msg)
    for _ in range(rng.randrange(1, 3)):
        op = rng.randrange(3)
        keys = list(m)
        if op == 0 and keys:
            del m[rng.choice(keys)]
        elif op == 1 and keys:
            m[rng.choice(keys)] = _random_value(rng)
        else:
            m[rng.choice(["extra", "v", "ts_ns", 7, b"k", "type"])] = _random_value(rng)
    return m


def _decode_only_protocol_errors(data: bytes) -> dict[str, Any] | None:
    try:
        out = decode(data)
    except ProtocolError as e:
        assert e.name in {"EBADMSG", "EPROTO", "EINVAL", "EMSGSIZE"}
        return None
    # anything decode accepts must re-encode and round-trip unchanged ...
    assert decode(encode(out)) == out
    # ... and the generated fast path must agree with the generic checker
    again = msgpack.unpackb(data, raw=False, strict_map_key=True)
    assert codec._check(again, True) == out
    return out


def test_fuzz_only_protocol_error_escapes() -> None:
    rng = random.Random(0x4B534D)
    valid = [encode(full_message(t)) for t in MESSAGES] + [
        encode(minimal_message(t)) for t in MESSAGES
    ]
    dicts = [full_message(t) for t in MESSAGES] + [minimal_message(t) for t in MESSAGES]
    accepted = 0
    for _ in range(3000):
        _decode_only_protocol_errors(rng.randbytes(rng.randrange(0, 64)))
    for _ in range(6000):
        if _decode_only_protocol_errors(_mutate_bytes(rng, rng.choice(valid))) is not None:
            accepted += 1
    for _ in range(4000):
        m = _mutate_dict(rng, rng.choice(dicts))
        try:
            data = raw(m)
        except (TypeError, ValueError, OverflowError):
            continue
        _decode_only_protocol_errors(data)
        try:  # encode must also refuse with ProtocolError only, agreeing with the slow path
            encode(m)
        except ProtocolError:
            continue
        codec._check(m, False)
    assert accepted > 0  # some mutations (e.g. of a value's bits) stay valid


def test_protocol_imports_nothing_else_from_the_project() -> None:
    import ast
    import pathlib

    pkg = pathlib.Path(codec.__file__).parent
    for path in pkg.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [] if node.level else [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top not in {"actors", "shared_mem", "ksmlab", "scenarios", "bench"}, (
                    f"{path.name} imports {name}"
                )
