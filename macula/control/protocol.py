"""The macula control protocol (MCP/1) as Python values: codes, commands, encode and decode.

The wire format is defined in ``control/SPEC.md``; this module is its executable form. A
message is two ZeroMQ frames from a client's DEALER (three at the node's ROUTER, the routing
identity first): the 4-byte signature ``b"MCP\\x01"`` and one msgpack body. The body is an
array of commands; a command is an array whose first element is its integer code.

Decoding is one ``msgspec`` pass over the body into ``array_like`` structs tagged by that
code (about 85 ns per PUBLISH on this machine). Only when that pass fails does
:func:`decode_commands` take the slow path, re-reading the body generically and each command
on its own, so that every bad command gets the precise error code the spec names and every
good command in the same batch still runs.

Opaque values (RPC arguments and results) are ``msgspec.Raw``: the node never decodes them,
it copies their bytes from CALL to INVOKE and from YIELD to RESULT.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, Final, Union

import msgspec

SIGNATURE: Final = b"MCP\x01"
"""The first frame of every message: ASCII ``MCP`` then the protocol version, 1."""
MAGIC: Final = b"MCP"
VERSION: Final = 1

NIL: Final = msgspec.Raw(b"\xc0")
"""A msgpack nil, the default RPC argument and result."""


class Code(IntEnum):
    """Command codes (the first element of every command)."""

    HELLO = 1
    WELCOME = 2
    ERROR = 3
    PING = 4
    PONG = 5
    BYE = 6
    SUBSCRIBE = 10
    SUBACK = 11
    UNSUBSCRIBE = 12
    UNSUBACK = 13
    PUBLISH = 14
    PUBACK = 15
    EVENT = 16
    ACK = 17
    REGISTER = 20
    REGISTERED = 21
    UNREGISTER = 22
    UNREGISTERED = 23
    CALL = 24
    RESULT = 25
    INVOKE = 26
    YIELD = 27
    YIELD_ERROR = 28
    STATS = 30
    STATS_REPLY = 31


class Err(IntEnum):
    """Error codes carried by ERROR (and BYE); the table in control/SPEC.md explains each."""

    MALFORMED = 1
    BAD_SIGNATURE = 2
    BAD_VERSION = 3
    INVALID_MSGPACK = 4
    UNKNOWN_COMMAND = 5
    MISSING_FIELD = 6
    WRONG_TYPE = 7
    NOT_WELCOMED = 8
    ALREADY_WELCOMED = 9
    INVALID_TOPIC = 10
    INVALID_FILTER = 11
    PAYLOAD_TOO_LARGE = 12
    BAD_VALUE = 13
    MESSAGE_TOO_LARGE = 14
    NOT_ALLOWED = 15
    UNKNOWN_REALM = 20
    BAD_SECRET = 21
    SESSION_LIMIT = 22
    SUBSCRIPTION_LIMIT = 23
    REGISTRATION_LIMIT = 24
    CALL_LIMIT = 25
    OVERLOADED = 26
    NO_PROVIDER = 30
    CALL_TIMEOUT = 31
    PROVIDER_GONE = 32
    APPLICATION_ERROR = 33
    STRATEGY_MISMATCH = 34
    UNKNOWN_INVOCATION = 35
    UNKNOWN_DELIVERY = 36
    NORMAL = 40
    HEARTBEAT_TIMEOUT = 41
    SLOW_CONSUMER = 42
    SHUTDOWN = 43
    PEER_GONE = 44
    INTERNAL = 50


class PubackReason(IntEnum):
    """The reason field of PUBACK."""

    OK = 0
    NO_SUBSCRIBERS = 16
    QUOTA_EXCEEDED = 151


# --- client -> node ---------------------------------------------------------------------


class Hello(msgspec.Struct, array_like=True, tag=1, gc=False):
    rid: int
    realm: str
    name: str
    secret: str = ""
    heartbeat_ms: int = 0


class Ping(msgspec.Struct, array_like=True, tag=4, gc=False):
    token: int = 0


class Bye(msgspec.Struct, array_like=True, tag=6, gc=False):
    code: int = 0
    message: str = ""


class Subscribe(msgspec.Struct, array_like=True, tag=10, gc=False):
    rid: int
    filter: str
    qos: int = 0


class Unsubscribe(msgspec.Struct, array_like=True, tag=12, gc=False):
    rid: int
    filter: str


class Publish(msgspec.Struct, array_like=True, tag=14, gc=False):
    topic: str
    payload: bytes
    qos: int = 0
    mid: int = 0
    retain: bool = False


class Ack(msgspec.Struct, array_like=True, tag=17, gc=False):
    did: int


class Register(msgspec.Struct, array_like=True, tag=20, gc=False):
    rid: int
    procedure: str
    strategy: str = "round_robin"
    idempotent: bool = False  # a call may be retried on another node after delivery
    cache_ttl_ms: int = 0  # callers on other nodes may cache results this long (0: never)


class Unregister(msgspec.Struct, array_like=True, tag=22, gc=False):
    rid: int
    reg_id: int


class Call(msgspec.Struct, array_like=True, tag=24, gc=False):
    rid: int
    procedure: str
    args: msgspec.Raw = NIL
    timeout_ms: int = 0


class Yield(msgspec.Struct, array_like=True, tag=27, gc=False):
    inv_id: int
    result: msgspec.Raw = NIL


class YieldError(msgspec.Struct, array_like=True, tag=28, gc=False):
    inv_id: int
    message: str = ""


class Stats(msgspec.Struct, array_like=True, tag=30, gc=False):
    rid: int


ClientCommand = Union[  # noqa: UP007 - msgspec needs a runtime Union object
    Hello,
    Ping,
    Bye,
    Subscribe,
    Unsubscribe,
    Publish,
    Ack,
    Register,
    Unregister,
    Call,
    Yield,
    YieldError,
    Stats,
]

CLIENT_TYPES: Final[dict[int, type[Any]]] = {
    int(Code.HELLO): Hello,
    int(Code.PING): Ping,
    int(Code.BYE): Bye,
    int(Code.SUBSCRIBE): Subscribe,
    int(Code.UNSUBSCRIBE): Unsubscribe,
    int(Code.PUBLISH): Publish,
    int(Code.ACK): Ack,
    int(Code.REGISTER): Register,
    int(Code.UNREGISTER): Unregister,
    int(Code.CALL): Call,
    int(Code.YIELD): Yield,
    int(Code.YIELD_ERROR): YieldError,
    int(Code.STATS): Stats,
}

# The field an ERROR answering a bad command of this code refers to (its position).
_REF_FIELD: Final[dict[int, int]] = {
    1: 1, 10: 1, 12: 1, 20: 1, 22: 1, 24: 1, 30: 1, 14: 4, 17: 1, 27: 1, 28: 1,
}

# --- node -> client ---------------------------------------------------------------------


class Welcome(msgspec.Struct, array_like=True, tag=2, gc=False):
    rid: int
    session_id: int
    limits: dict[str, int]
    incarnation: int = 0  # the node process's random id (0: an older node without it)


class Error(msgspec.Struct, array_like=True, tag=3, gc=False):
    ref: int
    code: int
    message: str


class Pong(msgspec.Struct, array_like=True, tag=5, gc=False):
    token: int = 0


class Suback(msgspec.Struct, array_like=True, tag=11, gc=False):
    rid: int
    sub_id: int
    qos: int


class Unsuback(msgspec.Struct, array_like=True, tag=13, gc=False):
    rid: int
    existed: bool


class Puback(msgspec.Struct, array_like=True, tag=15, gc=False):
    mid: int
    reason: int


class Event(msgspec.Struct, array_like=True, tag=16, gc=False):
    sub_id: int
    did: int
    qos: int
    topic: str
    payload: bytes
    retain: bool


class Registered(msgspec.Struct, array_like=True, tag=21, gc=False):
    rid: int
    reg_id: int


class Unregistered(msgspec.Struct, array_like=True, tag=23, gc=False):
    rid: int
    existed: bool


class Result(msgspec.Struct, array_like=True, tag=25, gc=False):
    rid: int
    result: msgspec.Raw = NIL


class Invoke(msgspec.Struct, array_like=True, tag=26, gc=False):
    inv_id: int
    reg_id: int
    procedure: str
    args: msgspec.Raw = NIL


class StatsReply(msgspec.Struct, array_like=True, tag=31):
    rid: int
    stats: dict[str, Any]


NodeCommand = Union[  # noqa: UP007
    Welcome,
    Error,
    Pong,
    Bye,
    Suback,
    Unsuback,
    Puback,
    Event,
    Registered,
    Unregistered,
    Result,
    Invoke,
    StatsReply,
]

# --- encoding ---------------------------------------------------------------------------

_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode
"""msgpack-encode any value (structs, tuples, Raw...)."""

_client_decoder: msgspec.msgpack.Decoder[list[ClientCommand]] = msgspec.msgpack.Decoder(
    list[ClientCommand]
)
_node_decoder: msgspec.msgpack.Decoder[list[NodeCommand]] = msgspec.msgpack.Decoder(
    list[NodeCommand]
)
_one_decoders: dict[int, msgspec.msgpack.Decoder[Any]] = {
    code: msgspec.msgpack.Decoder(tp) for code, tp in CLIENT_TYPES.items()
}
_any_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder()


def array_header(n: int) -> bytes:
    """The msgpack header of an array of ``n`` elements."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def pack_uint(n: int) -> bytes:
    """The msgpack encoding of a non-negative int (shortest form)."""
    if n < 0x80:
        return bytes((n,))
    return _encoder.encode(n)


def encode_message(commands: list[Any]) -> list[bytes]:
    """The two frames a client sends: the signature and the body."""
    return [SIGNATURE, _encoder.encode(commands)]


class BadCommand(msgspec.Struct, gc=False):
    """A command the node cannot run: the error to answer with."""

    ref: int
    code: Err
    message: str


def decode_commands(body: bytes) -> list[Any]:
    """Decode a client body into commands; a bad command becomes a :class:`BadCommand`.

    Raises :class:`ProtocolError` when the body as a whole is unusable (not msgpack, not an
    array). The fast path is one typed decode; the slow path runs only on failure.
    """
    try:
        return _client_decoder.decode(body)
    except msgspec.ValidationError:
        pass
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(Err.INVALID_MSGPACK, f"body is not valid msgpack: {exc}") from None
    try:
        items = _any_decoder.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # str with invalid UTF-8
        raise ProtocolError(Err.INVALID_MSGPACK, f"body is not valid msgpack: {exc}") from None
    if not isinstance(items, list):
        raise ProtocolError(Err.MALFORMED, "body must be an array of commands")
    return [_decode_one(item, i) for i, item in enumerate(items)]


def _decode_one(item: Any, index: int) -> Any:
    if not isinstance(item, list) or not item:
        return BadCommand(0, Err.MALFORMED, f"command {index} must be a non-empty array")
    code = item[0]
    if type(code) is not int or code not in CLIENT_TYPES:
        return BadCommand(0, Err.UNKNOWN_COMMAND, f"command {index}: unknown command {code!r}")
    pos = _REF_FIELD.get(code, 0)
    ref = item[pos] if 0 < pos < len(item) and type(item[pos]) is int else 0
    try:
        return _one_decoders[code].decode(_encoder.encode(item))
    except msgspec.ValidationError as exc:
        text = str(exc)
        name = Code(code).name
        if "at least length" in text:
            return BadCommand(ref, Err.MISSING_FIELD, f"{name}: missing field ({text})")
        return BadCommand(ref, Err.WRONG_TYPE, f"{name}: wrong type ({text})")


def decode_node_body(body: bytes) -> list[NodeCommand]:
    """Decode a body sent by the node (what a client does)."""
    return _node_decoder.decode(body)


class ProtocolError(Exception):
    """A whole message is unusable; ``code`` is the :class:`Err` to answer with."""

    def __init__(self, code: Err, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def error_body(ref: int, code: Err, message: str) -> bytes:
    """A body holding one ERROR command."""
    return _encoder.encode(((int(Code.ERROR), ref, int(code), message),))


def check_signature(frame: bytes) -> None:
    """Raise :class:`ProtocolError` unless ``frame`` is this protocol's signature."""
    if frame == SIGNATURE:
        return
    if len(frame) == 4 and frame[:3] == MAGIC:
        raise ProtocolError(
            Err.BAD_VERSION, f"protocol version {frame[3]} is not supported (this node: {VERSION})"
        )
    raise ProtocolError(Err.BAD_SIGNATURE, "first frame must be the signature b'MCP\\x01'")
