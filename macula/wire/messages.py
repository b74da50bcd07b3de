"""The messages of the peer wire: one msgpack array per frame, its first element the type.

Every frame on a link's stream is one of these, encoded with msgspec as a msgpack array
(``array_like``) whose first element is the integer tag below.  docs/WIRE.md is the
normative description; this module is its implementation.

Handshake (before admission; see macula/wire/identity.py for the cryptography):
    HELLO     client -> server   [1, version, node_id, public_key, realm, client_nonce, listen]
    CHALLENGE server -> client   [2, server_id, server_nonce]
    AUTH      client -> server   [3, signature, realm_proof]
    WELCOME   server -> client   [4, max_frame, listen]

Traffic (after admission, both directions):
    MSG       one-way            [10, kind, payload]
    REQ       request            [11, rid, kind, payload]
    RESP      response           [12, rid, status, payload]
    PING      liveness probe     [13, token]
    PONG      its answer         [14, token]
    GOAWAY    closing, with why  [15, code, reason]

``kind`` is the application's message type (the DHT, pub/sub and RPC layers pick theirs);
``payload`` is opaque bytes.  ``status`` 0 is success, anything else an error code with a
UTF-8 message as payload.
"""

from __future__ import annotations

from typing import Final

import msgspec

VERSION: Final = 1
ALPN: Final = "macula/1"

T_HELLO: Final = 1
T_CHALLENGE: Final = 2
T_AUTH: Final = 3
T_WELCOME: Final = 4
T_MSG: Final = 10
T_REQ: Final = 11
T_RESP: Final = 12
T_PING: Final = 13
T_PONG: Final = 14
T_GOAWAY: Final = 15


class Hello(msgspec.Struct, array_like=True, tag=T_HELLO, frozen=True, gc=False):
    version: int
    node_id: bytes
    public_key: bytes
    realm: str
    client_nonce: bytes
    # where the dialer accepts connections, or None: a node in client mode (not diallable)
    listen: tuple[str, int] | None = None


class Challenge(msgspec.Struct, array_like=True, tag=T_CHALLENGE, frozen=True, gc=False):
    server_id: bytes
    server_nonce: bytes


class Auth(msgspec.Struct, array_like=True, tag=T_AUTH, frozen=True, gc=False):
    signature: bytes
    realm_proof: bytes | None = None


class Welcome(msgspec.Struct, array_like=True, tag=T_WELCOME, frozen=True, gc=False):
    max_frame: int
    listen: tuple[str, int] | None = None


class Msg(msgspec.Struct, array_like=True, tag=T_MSG, frozen=True, gc=False):
    kind: int
    payload: bytes


class Req(msgspec.Struct, array_like=True, tag=T_REQ, frozen=True, gc=False):
    rid: int
    kind: int
    payload: bytes


class Resp(msgspec.Struct, array_like=True, tag=T_RESP, frozen=True, gc=False):
    rid: int
    status: int
    payload: bytes


class Ping(msgspec.Struct, array_like=True, tag=T_PING, frozen=True, gc=False):
    token: int


class Pong(msgspec.Struct, array_like=True, tag=T_PONG, frozen=True, gc=False):
    token: int


class GoAway(msgspec.Struct, array_like=True, tag=T_GOAWAY, frozen=True, gc=False):
    code: int
    reason: str


Handshake = Hello | Challenge | Auth | Welcome
Traffic = Msg | Req | Resp | Ping | Pong | GoAway
AnyMessage = Handshake | Traffic

TAGS: Final = frozenset(
    (T_HELLO, T_CHALLENGE, T_AUTH, T_WELCOME, T_MSG, T_REQ, T_RESP, T_PING, T_PONG, T_GOAWAY)
)

# Close codes (QUIC application error codes).  0x101-0x106 are the admission codes of
# macula/wire/identity.py (ADMIT_*).
CLOSE_NORMAL: Final = 0x0
CLOSE_BAD_FRAME: Final = 0x201  # malformed length prefix or a frame over max_frame
CLOSE_BAD_MESSAGE: Final = 0x202  # not msgpack, or wrong fields / types for its tag
CLOSE_UNKNOWN_TYPE: Final = 0x203  # a tag this version does not know
CLOSE_PROTOCOL: Final = 0x204  # a message out of order (traffic before admission, ...)
CLOSE_NOT_ANSWERING: Final = 0x205  # the peer stopped answering (local decision)
CLOSE_EVICTED: Final = 0x206  # the pool evicted an idle link (LRU or idle reaper)
CLOSE_SHUTDOWN: Final = 0x207  # the node is stopping
CLOSE_HANDSHAKE_TIMEOUT: Final = 0x208  # admission not completed in time
CLOSE_REPLACED: Final = 0x209  # a newer connection to the same peer took over

# RESP status codes
STATUS_OK: Final = 0
STATUS_UNKNOWN_KIND: Final = 1  # no handler for this request kind
STATUS_HANDLER_ERROR: Final = 2  # the handler raised
STATUS_OVERLOADED: Final = 3  # too many requests in flight on this link

CLOSE_NAMES: Final = {
    CLOSE_NORMAL: "normal",
    CLOSE_BAD_FRAME: "bad_frame",
    CLOSE_BAD_MESSAGE: "bad_message",
    CLOSE_UNKNOWN_TYPE: "unknown_type",
    CLOSE_PROTOCOL: "protocol",
    CLOSE_NOT_ANSWERING: "not_answering",
    CLOSE_EVICTED: "evicted",
    CLOSE_SHUTDOWN: "shutdown",
    CLOSE_HANDSHAKE_TIMEOUT: "handshake_timeout",
    CLOSE_REPLACED: "replaced",
    0x101: "admit_bad_hello",
    0x102: "admit_bad_identity",
    0x103: "admit_bad_signature",
    0x104: "admit_unknown_realm",
    0x105: "admit_realm_proof",
    0x106: "admit_wrong_peer",
}

ENCODER: Final = msgspec.msgpack.Encoder()
HANDSHAKE_DECODER: Final = msgspec.msgpack.Decoder(AnyMessage)
TRAFFIC_DECODER: Final = msgspec.msgpack.Decoder(Traffic)


def classify_bad(frame: bytes) -> int:
    """The close code for a frame that failed to decode: unknown tag or bad message."""
    try:
        raw = msgspec.msgpack.decode(frame)
    except msgspec.DecodeError:
        return CLOSE_BAD_MESSAGE
    if isinstance(raw, list) and raw and isinstance(raw[0], int) and raw[0] not in TAGS:
        return CLOSE_UNKNOWN_TYPE
    return CLOSE_BAD_MESSAGE
