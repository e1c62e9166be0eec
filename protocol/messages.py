# The wire vocabulary of ksmlab: every message one actor may send another.
#
# In the kernel these are function calls, syscalls, wakeups and signals; here the actors are
# separate processes, so each of those crossings is a message. The schema lives in one table
# (MESSAGES) so adding a message type is a one-line edit. At import each type is compiled once
# into Field tuples (for the codec's error-reporting path) and into two generated straight-line
# validators (the fast path every valid message takes), so no per-call reflection. Failures are
# named the way the kernel names them: by errno (EINVAL, EBADMSG, ENOMEM, ...), via the stdlib
# errno module.
from __future__ import annotations

import errno as _errno
from typing import Any, NamedTuple

VERSION = 1


class _AnyType:
    """Marker for a field that accepts any msgpack-representable value."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "ANY"


ANY: Any = _AnyType()


class Opt(NamedTuple):
    """An optional field: its allowed type(s) and the default filled in on decode."""

    types: Any
    default: Any


def opt(types: Any, default: Any) -> Opt:
    """Spell an optional field in MESSAGES: ``"addr": opt(int, 0)``."""
    return Opt(types, default)


# A field spec is one of:
#   int | bool | str | bytes | float | list | dict | ANY    required, of that type
#   (int, str)                                             required, any of those types
#   opt(<type or tuple>, default)                          optional, default filled on decode
# bool and int are distinct here: an int field rejects True, a bool field rejects 1.
ENVELOPE: dict[str, Any] = {
    "v": int,  # must equal VERSION
    "type": str,  # a key of MESSAGES
    "id": int,  # request id (>= 0), echoed by the reply
    "src": str,  # sender actor name
    "ts_ns": opt(int, 0),  # sender's clock at send; 0 = not stamped
}

# fmt: off
MESSAGES: dict[str, dict[str, Any]] = {
    # generic
    "ping":          {},
    "shutdown":      {},
    "reply":         {"ok": bool, "result": opt(ANY, None), "errno": opt(int, 0), "error": opt(str, "")},
    # task syscalls (user process -> its task actor)
    "mmap":          {"length": int, "prot": int, "flags": int, "addr": opt(int, 0), "nid": opt(int, -1)},
    "munmap":        {"addr": int, "length": int},
    "mprotect":      {"addr": int, "length": int, "prot": int},
    "madvise":       {"addr": int, "length": int, "advice": int},
    "prctl":         {"option": int, "arg2": opt(int, 0), "arg3": opt(int, 0), "arg4": opt(int, 0), "arg5": opt(int, 0)},
    "memset":        {"addr": int, "value": int, "length": int, "force": opt(bool, False)},
    "write":         {"addr": int, "data": bytes, "force": opt(bool, False)},
    "read":          {"addr": int, "length": int},
    "fork":          {},
    "execve":        {},
    "mlockall":      {"flags": int},
    "munlockall":    {},
    "exit":          {"code": opt(int, 0)},
    "verify":        {},
    "ksm_stat":      {},
    "signal":        {"sig": int},
    "pagemap":       {"addr": int, "length": int},
    # page-fault handler (handle_mm_fault)
    "fault":         {"task": int, "mm": int, "addr": int, "npages": opt(int, 1), "write": bool, "flags": opt(int, 0),
                      # the trapped store, completed page by page right after each page's fault
                      "store_addr": opt(int, 0), "store_len": opt(int, 0), "store_fill": opt(int, -1),
                      "store_data": opt(bytes, b"")},
    # exit path (do_exit -> mmput)
    "do_exit":       {"task": int, "code": opt(int, 0), "reason": opt(str, "exit")},
    # OOM killer (out_of_memory)
    "out_of_memory": {"ctx": str, "nid": opt(int, -1), "task": opt(int, -1)},
    # ksmd (wake_up_interruptible(&ksm_thread_wait))
    "wakeup":        {},
    # reclaim (kswapd)
    "reclaim":       {"nr": opt(int, 32), "pfns": opt(list, []), "force": opt(bool, False)},
    # sysfs ctl (/sys/kernel/mm/ksm/*)
    "sysfs_write":   {"knob": str, "value": str, "task": opt(int, 0)},
    "sysfs_read":    {"name": str},
    # supervisor
    "actor_ready":   {"actor": str, "pid": int},
    "report":        {"kind": str, "title": str, "text": str, "data": opt(ANY, None)},
    "spawn_task":    {"task": int, "parent": opt(int, -1), "name": opt(str, "")},
    "task_exited":   {"task": int, "code": int, "pid": opt(int, 0), "reason": opt(str, "exit")},
}
# fmt: on

# Who may send each type, by role (protocol/auth.py): "task" is every task-PID actor, "cli"
# the command line's ctl/stat against a live run. A kernel context that allocates memory
# may end in reclaim or the OOM killer, and any actor may report or wake ksmd. The
# supervisor, which boots the machine and drives it for the tests, may send anything.
_KERNEL = ("supervisor", "task", "fault", "exit", "oom", "kswapd", "ksmd", "ctl")
_ANY = (*_KERNEL, "cli")
_SYSCALLS = ("mmap", "munmap", "mprotect", "madvise", "prctl", "memset", "write", "read", "fork",
             "execve", "mlockall", "munlockall", "exit", "verify", "ksm_stat", "pagemap")
SENDERS: dict[str, frozenset[str]] = {t: frozenset({"supervisor", *roles}) for t, roles in {
    "ping": _ANY,
    "shutdown": ("supervisor",),
    "reply": _ANY,
    **{t: ("supervisor",) for t in _SYSCALLS},      # the user program drives its task
    "signal": ("supervisor", "oom"),                # kill(2), and the OOM killer's SIGKILL
    "fault": ("task",),
    "do_exit": ("task", "supervisor"),
    "out_of_memory": _KERNEL,
    "wakeup": _KERNEL,
    "reclaim": _KERNEL,
    "sysfs_write": ("supervisor", "cli", "task"),
    "sysfs_read": ("supervisor", "cli", "task"),
    "actor_ready": _KERNEL,
    "report": _KERNEL,
    "spawn_task": ("task",),
    "task_exited": ("exit", "oom", "supervisor"),
}.items()}
# From a task, these fields must name the sending task itself, and its own mm where the
# message names one (a task exits itself, forks as itself, faults in its own mm).
OWN_TASK: dict[str, tuple[str, str | None]] = {"do_exit": ("task", None), "fault": ("task", "mm"),
                                               "spawn_task": ("parent", None)}


# ----------------------------------------------------------------------------------------------
# Compiled form (what the codec uses)

_BASIC = (int, bool, str, bytes, float, list, dict)
_MUTABLE = (list, dict, bytearray)


class Field(NamedTuple):
    name: str
    exact: frozenset[type] | None  # None = ANY
    required: bool
    default: Any
    copy_default: bool  # default is a list/dict: hand out a fresh copy each time
    walk: bool  # value may hold containers whose keys/leaves must be checked on encode
    type_names: str  # for error messages: "int", "int or str", "any"


class Spec(NamedTuple):
    type: str
    fields: tuple[Field, ...]
    names: frozenset[str]
    # Generated fast-path predicates (see _generate): True if msg is valid. fast_decode also
    # fills defaults (only when it returns True). False means "take the slow path", which
    # either finds the precise error or (encode side: IntEnum, tuple, ...) accepts after all.
    fast_decode: Any
    fast_encode: Any


COMPILED: dict[str, Spec] = {}


def _compile_field(name: str, spec: Any) -> Field:
    if isinstance(spec, Opt):
        types, required, default = spec.types, False, spec.default
    else:
        types, required, default = spec, True, None
    if types is ANY:
        exact = None
        names = "any"
    else:
        tup = types if isinstance(types, tuple) else (types,)
        if not tup:
            raise TypeError(f"field {name!r}: empty type tuple")
        for t in tup:
            if t not in _BASIC:
                raise TypeError(
                    f"field {name!r}: unsupported type {t!r} (use one of {_BASIC} or ANY)"
                )
        exact = frozenset(tup)
        names = " or ".join(t.__name__ for t in tup)
        if not required and type(default) not in exact:
            raise TypeError(f"field {name!r}: default {default!r} is not {names}")
    walk = exact is None or bool(exact & {list, dict})
    return Field(name, exact, required, default, isinstance(default, _MUTABLE), walk, names)


def register(type_name: str, fields: dict[str, Any]) -> None:
    """Add (or replace) a message type at runtime. Editing MESSAGES is the normal way."""
    if not isinstance(type_name, str) or not type_name:
        raise TypeError(f"message type must be a non-empty str, not {type_name!r}")
    compiled = []
    for name, spec in fields.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise TypeError(f"{type_name}: field name {name!r} is not an identifier")
        if name in ENVELOPE:
            raise TypeError(f"{type_name}: field {name!r} collides with the envelope")
        compiled.append(_compile_field(name, spec))
    fast_decode = _generate(type_name, compiled, decoding=True)
    fast_encode = _generate(type_name, compiled, decoding=False)
    MESSAGES[type_name] = dict(fields)
    COMPILED[type_name] = Spec(
        type_name, tuple(compiled), frozenset(fields), fast_decode, fast_encode
    )


_SCALARS = frozenset({type(None), bool, int, float, str, bytes})


MAX_DEPTH = 100  # nesting levels allowed inside one payload value (encode side)


def plain(value: Any, depth: int = 0) -> bool:
    """True if value is built only from exact msgpack types (None, bool, int, float, str,
    bytes, list, dict), every map key is str or bytes, and nesting stays within MAX_DEPTH:
    what the receiver can decode."""
    vt = type(value)
    if vt is dict:
        if depth >= MAX_DEPTH:
            return False
        for k, v in value.items():
            if type(k) is not str and type(k) is not bytes:
                return False
            if type(v) not in _SCALARS and not plain(v, depth + 1):
                return False
        return True
    if vt is list:
        if depth >= MAX_DEPTH:
            return False
        for v in value:  # noqa: SIM110 (a plain loop is faster than all() here)
            if type(v) not in _SCALARS and not plain(v, depth + 1):
                return False
        return True
    return vt in _SCALARS


def _generate(type_name: str, fields: list[Field], decoding: bool) -> Any:
    """Write a straight-line validator for one message type and compile it with exec.

    Only exact types pass (msgpack produces nothing else); anything unusual returns False
    and the codec's generic checker decides and words the error. The envelope's v/type/src
    checks are inlined; "type" itself was already used to pick this function."""
    ns: dict[str, Any] = {"M": object(), "plain": plain, "SCALARS": _SCALARS}
    nreq = sum(1 for f in fields if f.required)
    out = [
        "def check(msg):",
        "    g = msg.get",
        "    v = g('v')",
        "    i = g('id')",
        f"    if type(v) is not int or v != {VERSION} or type(i) is not int or i < 0:",
        "        return False",
        "    if type(g('src')) is not str:",
        "        return False",
        "    ts = g('ts_ns', M)",
        "    if ts is M:",
        f"        seen = {4 + nreq}",
        "    elif type(ts) is int:",
        f"        seen = {5 + nreq}",
        "    else:",
        "        return False",
    ]
    fills = []
    for k, f in enumerate(fields):
        x = f"x{k}"
        out.append(f"    {x} = g({f.name!r}, M)")
        if f.exact is None:
            bad = f"type({x}) not in SCALARS and not plain({x})" if not decoding else ""
        elif len(f.exact) == 1:
            (t,) = f.exact
            bad = f"type({x}) is not {t.__name__}"
            if not decoding and t in (list, dict):
                bad += f" or not plain({x})"
        else:
            ns[f"T{k}"] = f.exact
            bad = f"type({x}) not in T{k}"
            if not decoding and f.walk:
                bad += f" or (type({x}) not in SCALARS and not plain({x}))"
        if f.required:
            if f.exact is None:
                out.append(f"    if {x} is M:")
                out.append("        return False")
                if bad:
                    out.append(f"    if {bad}:")
                    out.append("        return False")
            else:  # M is not of any allowed type, so the type test also catches absence
                out.append(f"    if {bad}:")
                out.append("        return False")
        else:
            out.append(f"    if {x} is not M:")
            if bad:
                out.append(f"        if {bad}:")
                out.append("            return False")
            out.append("        seen += 1")
            ns[f"D{k}"] = f.default
            value = f"D{k}.copy()" if f.copy_default else f"D{k}"
            fills.append(f"    if {x} is M:")
            fills.append(f"        msg[{f.name!r}] = {value}")
    out.append("    if len(msg) != seen:")
    out.append("        return False")
    if decoding:
        out.append("    if ts is M:")
        out.append("        msg['ts_ns'] = 0")
        out.extend(fills)
    out.append("    return True")
    src = "\n".join(out) + "\n"
    exec(
        compile(src, f"<protocol check {type_name} {'decode' if decoding else 'encode'}>", "exec"),
        ns,
    )
    fn = ns["check"]
    fn.source = src
    return fn


ENVELOPE_FIELDS: tuple[Field, ...] = tuple(_compile_field(n, s) for n, s in ENVELOPE.items())

for _t, _f in list(MESSAGES.items()):
    register(_t, _f)
del _t, _f


# ----------------------------------------------------------------------------------------------
# errno helpers


def errno_number(err: int | str) -> int:
    """Errno number for a name ("ENOMEM") or number (12, or kernel-style -12)."""
    if isinstance(err, bool):
        raise ValueError(f"not an errno: {err!r}")
    if isinstance(err, int):
        n = -err if err < 0 else err
        if n in _errno.errorcode:
            return n
        raise ValueError(f"unknown errno number {err}")
    if isinstance(err, str):
        name = err.upper()
        n = getattr(_errno, name, None) if name.startswith("E") else None
        if isinstance(n, int) and not isinstance(n, bool):
            return n
        raise ValueError(f"unknown errno name {err!r}")
    raise ValueError(f"not an errno: {err!r}")


def errno_name(err: int | str) -> str:
    """Canonical errno name for a name or number: 12 -> "ENOMEM", "EWOULDBLOCK" -> "EAGAIN"."""
    return _errno.errorcode[errno_number(err)]


def errno_text(err: int | str, detail: str) -> str:
    """The error string carried in replies: "ENOMEM: no free page frame"."""
    return f"{errno_name(err)}: {detail}"


__all__ = [
    "ANY",
    "COMPILED",
    "ENVELOPE",
    "ENVELOPE_FIELDS",
    "MESSAGES",
    "VERSION",
    "Field",
    "Opt",
    "Spec",
    "errno_name",
    "errno_number",
    "errno_text",
    "opt",
    "register",
]
