"""The DHT's messages: msgpack arrays (msgspec ``array_like`` structs) carried in the peer
wire's REQ/RESP frames (docs/WIRE.md), one request kind per message type.

    request (wire kind = tag)                    reply (the RESP payload)
    PING       0x10 [0x10, rid]                  PONG      0x18 [0x18, rid]
    FIND_NODE  0x11 [0x11, rid, target]          NODES     0x19 [0x19, rid, contacts]
    FIND_VALUE 0x12 [0x12, rid, key]             VALUES    0x1A [0x1A, rid, records, contacts]
    STORE      0x13 [0x13, rid, key, value, ttl] STORE_ACK 0x1B [0x1B, rid, ok, reason,
                                                                   contacts]

    contact = [node_id (bin 32), host (str), port (int)]
    record  = [publisher (bin 32), value (bin), ttl (float: seconds left at the sender)]

STORE_ACK's ``contacts`` (the storer's k closest contacts to the key, the requester
excluded, as in NODES) let ``put`` walk toward the key while it stores; the field is optional
on decoding (an ack of four elements has none).

``rid`` is the requester's query id, echoed by the reply (a reply with another rid is a bad
reply). The sender of a request is the authenticated peer of the link, so messages do not
name it; the publisher of a STORE is that peer's node id. docs/DHT.md is the full guide.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec

KIND_PING: Final = 0x10
KIND_FIND_NODE: Final = 0x11
KIND_FIND_VALUE: Final = 0x12
KIND_STORE: Final = 0x13
KIND_PONG: Final = 0x18
KIND_NODES: Final = 0x19
KIND_VALUES: Final = 0x1A
KIND_STORE_ACK: Final = 0x1B
KINDS: Final = range(0x10, 0x20)  # the request kinds reserved for the DHT on the wire

NodeId = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
MAX_REPLY_CONTACTS: Final = 256  # a reply with more contacts is refused at decoding
MAX_REPLY_RECORDS: Final = 4096


class Contact(msgspec.Struct, array_like=True, frozen=True):
    """A node and where to dial it. ``port == 0``: the node runs in client mode (it cannot be
    dialled) and is never put in a routing table."""

    node_id: NodeId
    host: Annotated[str, msgspec.Meta(max_length=255)]
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)]

    @property
    def dialable(self) -> bool:
        return self.port != 0


class Record(msgspec.Struct, array_like=True, frozen=True):
    """One publisher's value under a key, with the seconds it has left."""

    publisher: NodeId
    value: bytes
    ttl: float


class Ping(msgspec.Struct, array_like=True, frozen=True, tag=KIND_PING):
    rid: int


class FindNode(msgspec.Struct, array_like=True, frozen=True, tag=KIND_FIND_NODE):
    rid: int
    target: NodeId


class FindValue(msgspec.Struct, array_like=True, frozen=True, tag=KIND_FIND_VALUE):
    rid: int
    key: NodeId
    # also: tell me when a value under ``key`` changes here (``KeyChanged``), for a while
    watch: bool = False


class Store(msgspec.Struct, array_like=True, frozen=True, tag=KIND_STORE):
    rid: int
    key: NodeId
    value: bytes
    ttl: float


class Pong(msgspec.Struct, array_like=True, frozen=True, tag=KIND_PONG):
    rid: int


class Nodes(msgspec.Struct, array_like=True, frozen=True, tag=KIND_NODES):
    rid: int
    contacts: Annotated[list[Contact], msgspec.Meta(max_length=MAX_REPLY_CONTACTS)]


class Values(msgspec.Struct, array_like=True, frozen=True, tag=KIND_VALUES):
    rid: int
    records: Annotated[list[Record], msgspec.Meta(max_length=MAX_REPLY_RECORDS)]
    contacts: Annotated[list[Contact], msgspec.Meta(max_length=MAX_REPLY_CONTACTS)]


class StoreAck(msgspec.Struct, array_like=True, frozen=True, tag=KIND_STORE_ACK):
    rid: int
    ok: bool
    reason: str = ""
    # the storer's k closest contacts to the key (the requester excluded), as in NODES
    contacts: Annotated[list[Contact], msgspec.Meta(max_length=MAX_REPLY_CONTACTS)] = []


Request = Ping | FindNode | FindValue | Store
Reply = Pong | Nodes | Values | StoreAck

#: the reply type each request expects
REPLY_OF: Final[dict[type, type]] = {
    Ping: Pong,
    FindNode: Nodes,
    FindValue: Values,
    Store: StoreAck,
}

REQUEST_DECODER: Final = msgspec.msgpack.Decoder(Request)
REPLY_DECODER: Final = msgspec.msgpack.Decoder(Reply)
ENCODER: Final = msgspec.msgpack.Encoder()


def kind_of(msg: Request) -> int:
    """The wire request kind of a request message (its tag)."""
    return _KIND[type(msg)]


_KIND: Final[dict[type, int]] = {
    Ping: KIND_PING,
    FindNode: KIND_FIND_NODE,
    FindValue: KIND_FIND_VALUE,
    Store: KIND_STORE,
}
