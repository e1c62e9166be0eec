# ksmlab's wire protocol: message schema (messages), msgpack codec with validation (codec) and
# ZeroMQ endpoint/socket helpers (endpoints). Kept free of imports from the rest of ksmlab so
# every layer (shared_mem, actors, the CLI) can use it without cycles.
from .codec import (
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
from .messages import (
    ANY,
    MESSAGES,
    VERSION,
    errno_name,
    errno_number,
    errno_text,
    opt,
    register,
)

__all__ = [
    "ANY",
    "MAX_MESSAGE",
    "MESSAGES",
    "VERSION",
    "ProtocolError",
    "decode",
    "encode",
    "errno_name",
    "errno_number",
    "errno_text",
    "is_reply",
    "opt",
    "register",
    "reply_err",
    "reply_ok",
    "request",
    "unwrap_reply",
    "validate",
]
