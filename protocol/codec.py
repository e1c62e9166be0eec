# msgpack codec with schema validation for every ksmlab message.
#
# Every message between actors passes through encode() on the way out and decode() on the way
# in, so both check the message against protocol.messages and fail with ProtocolError named by
# errno, never with a msgpack/KeyError/TypeError. The layering of errors:
#
#   EMSGSIZE  larger than MAX_MESSAGE (checked before unpacking / after packing)
#   EBADMSG   not a message at all: not msgpack, truncated, trailing bytes, not a map,
#             non-str keys, bad UTF-8
#   EPROTO    a map but not our envelope: missing/ill-typed v/type/id/src/ts_ns, wrong
#             version, unknown type, negative id
#   EINVAL    envelope fine, body wrong: missing required field, unknown field, wrong type
#             (bool and int are distinct), value msgpack cannot carry (encode side)
#
# Speed: each message type has two straight-line validators generated once from the schema
# (messages.Spec.fast_decode / fast_encode), so a valid message costs one dict lookup and a
# handful of `type(x) is int` tests, and packing reuses one msgpack.Packer per thread. Only
# invalid or unusual messages (IntEnum values, tuples, nested payloads with odd keys) go
# through the generic checker below, which also words the error.
from __future__ import annotations

import reprlib
import threading
from typing import Any

import msgpack

from .messages import (
    COMPILED,
    ENVELOPE_FIELDS,
    MAX_DEPTH,
    VERSION,
    Field,
    errno_number,
    errno_text,
    plain,
)
from .messages import errno_name as _errno_name

MAX_MESSAGE = 64 * 1024 * 1024  # bytes, both directions

_MISSING = object()
_unpackb = msgpack.unpackb
# One Packer per thread: reusing its buffer halves packing time versus msgpack.packb(), and a
# Packer must not be shared between threads.
_local = threading.local()


def _packer() -> msgpack.Packer:
    p = _local.__dict__.get("packer")
    if p is None:
        p = _local.packer = msgpack.Packer(use_bin_type=True)
    return p


_SCALARS = frozenset({type(None), bool, int, float, str, bytes, bytearray, memoryview})
_TS_FIELD = next(f for f in ENVELOPE_FIELDS if f.name == "ts_ns")
# Encode-side leniency: values that msgpack packs into the same wire type as the exact type.
_ENCODE_ALIASES: dict[type, tuple[type, ...]] = {
    bytes: (bytes, bytearray, memoryview),
    list: (list, tuple),
}


class ProtocolError(Exception):
    """A message that violates the protocol, named by errno.

    .name    "EBADMSG", "EPROTO", "EINVAL", "EMSGSIZE", ...
    .errno   the number for .name
    .detail  human-readable reason
    .envelope  {"id", "src", "type"} of the offending message when decode got that far
               (so a reply_err can echo the request id), else None
    .peer    routing id of the sender when received through endpoints.router_recv, else None
    """

    peer: bytes | None

    def __init__(
        self, errno_name: str | int, detail: str, envelope: dict[str, Any] | None = None
    ) -> None:
        name = _errno_name(errno_name)
        super().__init__(name, detail)
        self.name = name
        self.errno = errno_number(name)
        self.detail = detail
        self.envelope = envelope
        self.peer = None

    def __str__(self) -> str:
        return f"{self.name}: {self.detail}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name, self.detail, self.envelope))


def _ext_hook(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} is not used by this protocol")


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 40
_repr.maxlist = _repr.maxdict = _repr.maxtuple = 4
_repr.maxlevel = 2


def _describe(value: Any) -> str:
    """Short 'type value' text for error messages; never reprs a whole 64 MiB payload."""
    try:
        r = _repr.repr(value)
    except Exception:
        r = "?"
    return f"{type(value).__name__} {r}"


def _slow_type_ok(value: Any, field: Field, encoding: bool) -> bool:
    """Type check for values whose exact type is not in field.exact (rare / error path)."""
    if not encoding:
        return False  # msgpack only produces exact types
    vt = type(value)
    for t in field.exact:  # type: ignore[union-attr]
        if t is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return True  # IntEnum, IntFlag
        elif t is bool:
            continue  # bool cannot be subclassed
        elif issubclass(vt, _ENCODE_ALIASES.get(t, (t,))):
            return True
    return False


def _walk(value: Any, where: str, env: dict[str, Any] | None, depth: int = 0) -> None:
    """Encode side, slow path: nested map keys must be str/bytes (decode uses strict_map_key),
    every leaf a msgpack type and nesting within MAX_DEPTH, so whatever we send the receiver
    can decode. Subclasses (IntEnum, namedtuple, OrderedDict) are accepted here; msgpack
    packs them as their base type."""
    if isinstance(value, (dict, list, tuple)) and depth >= MAX_DEPTH:
        raise ProtocolError("EINVAL", f"{where}: nested deeper than {MAX_DEPTH} levels", env)
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, bytes)):
                raise ProtocolError("EINVAL", f"{where}: map key {_describe(k)} is not str", env)
            if type(v) not in _SCALARS:
                _walk(v, f"{where}[{k!r}]", env, depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            if type(v) not in _SCALARS:
                _walk(v, f"{where}[{i}]", env, depth + 1)
    elif not isinstance(value, (int, float, str, bytes, bytearray, memoryview)) and (
        value is not None
    ):
        raise ProtocolError("EINVAL", f"{where}: {_describe(value)} is not msgpack-encodable", env)


def _check(msg: Any, fill: bool) -> dict[str, Any]:
    """Validate msg in place; with fill=True also insert defaults of absent optional fields."""
    if type(msg) is not dict and (fill or not isinstance(msg, dict)):
        raise ProtocolError("EBADMSG", f"message is {type(msg).__name__}, not a map")
    n = len(msg)
    # -- envelope -------------------------------------------------------------------------
    v = msg.get("v", _MISSING)
    t = msg.get("type", _MISSING)
    mid = msg.get("id", _MISSING)
    src = msg.get("src", _MISSING)
    if mid is _MISSING or src is _MISSING or t is _MISSING or v is _MISSING:
        missing = [k for k in ("v", "type", "id", "src") if k not in msg]
        raise _fail(msg, fill, "EPROTO", f"missing envelope field {', '.join(missing)}")
    if type(v) is not int and (fill or not isinstance(v, int) or isinstance(v, bool)):
        raise _fail(msg, fill, "EPROTO", f"field v: expected int, got {_describe(v)}")
    if v != VERSION:
        raise _fail(msg, fill, "EPROTO", f"protocol version {v}, expected {VERSION}")
    if type(t) is not str:
        raise _fail(msg, fill, "EPROTO", f"field type: expected str, got {_describe(t)}")
    spec = COMPILED.get(t)
    if spec is None:
        raise _fail(msg, fill, "EPROTO", f"unknown message type {t!r}")
    if type(mid) is not int and (fill or not isinstance(mid, int) or isinstance(mid, bool)):
        raise _fail(msg, fill, "EPROTO", f"field id: expected int, got {_describe(mid)}")
    if mid < 0:
        raise _fail(msg, fill, "EPROTO", f"field id: {mid} is negative")
    if type(src) is not str:
        raise _fail(msg, fill, "EPROTO", f"field src: expected str, got {_describe(src)}")
    seen = 4
    ts = msg.get("ts_ns", _MISSING)
    if ts is _MISSING:
        if fill:
            msg["ts_ns"] = 0
    else:
        if type(ts) is not int and not _slow_type_ok(ts, _TS_FIELD, not fill):
            raise _fail(msg, fill, "EPROTO", f"field ts_ns: expected int, got {_describe(ts)}")
        seen = 5
    # -- body -----------------------------------------------------------------------------
    for field in spec.fields:
        val = msg.get(field.name, _MISSING)
        if val is _MISSING:
            if field.required:
                raise _fail(msg, fill, "EINVAL", f"{t}: missing required field {field.name!r}")
            if fill:
                d = field.default
                msg[field.name] = d.copy() if field.copy_default else d
            continue
        seen += 1
        exact = field.exact
        if exact is not None and type(val) not in exact and not _slow_type_ok(val, field, not fill):
            raise _fail(
                msg,
                fill,
                "EINVAL",
                f"{t}.{field.name}: expected {field.type_names}, got {_describe(val)}",
            )
        if not fill and field.walk and type(val) not in _SCALARS and not plain(val):
            _walk(val, f"{t}.{field.name}", _env(msg))
    if seen != n:
        for k in msg:
            if type(k) is not str:
                raise _fail(msg, fill, "EINVAL", f"non-str map key {_describe(k)}")
            if k not in spec.names and k != "ts_ns" and k not in ("v", "type", "id", "src"):
                raise _fail(msg, fill, "EINVAL", f"{t}: unknown field {k!r}")
    return msg


def _fail(msg: dict[Any, Any], fill: bool, name: str, detail: str) -> ProtocolError:
    """Build the error for a failed check. On decode, a non-str key anywhere at the top level
    outranks whatever else is wrong: the map is not one of ours at all (EBADMSG)."""
    if fill:
        for k in msg:
            if type(k) is not str:
                return ProtocolError("EBADMSG", f"non-str map key {_describe(k)}")
    return ProtocolError(name, detail, _env(msg))


def _env(msg: Any) -> dict[str, Any] | None:
    """The parts of the envelope that are usable for an error reply, if any."""
    if not isinstance(msg, dict):
        return None
    mid = msg.get("id")
    if type(mid) is not int or mid < 0:
        return None
    src = msg.get("src")
    t = msg.get("type")
    return {
        "id": mid,
        "src": src if type(src) is str else "",
        "type": t if type(t) is str else "",
    }


def encode(msg: dict[str, Any]) -> bytes:
    """Validate an outgoing message and pack it. Raises ProtocolError; never mutates msg."""
    try:
        if type(msg) is dict:
            t = msg.get("type")
            spec = COMPILED.get(t) if type(t) is str else None
            if spec is None or not spec.fast_encode(msg):
                _check(msg, False)
        else:
            _check(msg, False)
    except RecursionError:
        raise ProtocolError("EINVAL", "value nested too deeply", _env(msg)) from None
    try:
        data = _packer().pack(msg)
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError("EINVAL", f"cannot pack: {e}", _env(msg)) from None
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(
            "EMSGSIZE", f"message is {len(data)} bytes, limit {MAX_MESSAGE}", _env(msg)
        )
    return data


def decode(data: bytes) -> dict[str, Any]:
    """Unpack and validate an incoming message; optional fields get their defaults.

    Raises ProtocolError (EMSGSIZE/EBADMSG/EPROTO/EINVAL) and nothing else."""
    dt = type(data)
    if dt is bytes or dt is bytearray:
        size = len(data)
    elif dt is memoryview:
        size = data.nbytes
    else:
        raise ProtocolError("EINVAL", f"decode() needs bytes, got {type(data).__name__}")
    if size > MAX_MESSAGE:
        raise ProtocolError("EMSGSIZE", f"message is {size} bytes, limit {MAX_MESSAGE}")
    try:
        msg = _unpackb(data, raw=False, strict_map_key=True, ext_hook=_ext_hook)
    except Exception as e:
        raise _unpack_error(e, size) from None
    if type(msg) is dict:
        t = msg.get("type")
        spec = COMPILED.get(t) if type(t) is str else None
        if spec is not None and spec.fast_decode(msg):
            return msg
    return _check(msg, True)


def _unpack_error(e: Exception, size: int) -> ProtocolError:
    if size == 0:
        return ProtocolError("EBADMSG", "empty message")
    if isinstance(e, msgpack.ExtraData):
        return ProtocolError("EBADMSG", "trailing bytes after msgpack data")
    if isinstance(e, msgpack.StackError):
        return ProtocolError("EBADMSG", "msgpack data nested too deeply")
    if isinstance(e, msgpack.FormatError):
        return ProtocolError("EBADMSG", "not msgpack data (reserved byte 0xc1)")
    if isinstance(e, UnicodeDecodeError):
        return ProtocolError("EBADMSG", "msgpack str is not valid UTF-8")
    text = str(e)
    if "not allowed for map key" in text:
        return ProtocolError("EBADMSG", f"non-str map key ({text.split(' is not')[0]})")
    if "incomplete" in text:
        return ProtocolError("EBADMSG", "truncated msgpack data")
    if "exceeds max_" in text:  # a length prefix larger than what is left of the buffer
        return ProtocolError("EBADMSG", f"truncated msgpack data ({text})")
    return ProtocolError("EBADMSG", f"bad msgpack data: {text or type(e).__name__}")


def validate(msg: dict[str, Any]) -> dict[str, Any]:
    """Check an already-decoded (or hand-built) message and fill defaults in place."""
    return _check(msg, True)


# ----------------------------------------------------------------------------------------------
# building messages


def request(type: str, id: int, src: str, **fields: Any) -> dict[str, Any]:
    """A new message: request("mmap", 7, "task.3", length=4096, prot=3, flags=0x22)."""
    msg = {"v": VERSION, "type": type, "id": id, "src": src}
    msg.update(fields)
    return msg


def reply_ok(req: dict[str, Any], src: str, result: Any = None) -> dict[str, Any]:
    """Successful reply to req, echoing its id."""
    return {
        "v": VERSION,
        "type": "reply",
        "id": req["id"],
        "src": src,
        "ok": True,
        "result": result,
    }


def reply_err(req: dict[str, Any] | None, src: str, err: int | str, detail: str) -> dict[str, Any]:
    """Failed reply to req (None -> id 0): errno number plus "ENAME: detail" text."""
    return {
        "v": VERSION,
        "type": "reply",
        "id": 0 if req is None else req["id"],
        "src": src,
        "ok": False,
        "errno": errno_number(err),
        "error": errno_text(err, detail),
    }


def is_reply(msg: dict[str, Any]) -> bool:
    return type(msg) is dict and msg.get("type") == "reply"


def unwrap_reply(msg: dict[str, Any]) -> Any:
    """The result of an ok reply; an error reply raises OSError(errno, "ENAME: detail")."""
    if msg["ok"]:
        return msg.get("result")
    raise OSError(msg.get("errno", 0), msg.get("error", ""))


__all__ = [
    "MAX_MESSAGE",
    "ProtocolError",
    "decode",
    "encode",
    "is_reply",
    "reply_err",
    "reply_ok",
    "request",
    "unwrap_reply",
    "validate",
]
