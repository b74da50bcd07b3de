"""The peer wire: QUIC links between macula nodes (see ``docs/WIRE.md``)."""

from macula.wire.config import WireConfig
from macula.wire.endpoint import LinkPool, WireEndpoint, WireStats
from macula.wire.identity import AdmissionError, IdentityError, NodeIdentity
from macula.wire.link import (
    DialError,
    LinkClosed,
    LinkError,
    PeerLink,
    RemoteError,
    RequestLost,
    RequestRejected,
    RequestTimeout,
    WireHandler,
)

__all__ = [
    "AdmissionError",
    "DialError",
    "IdentityError",
    "LinkClosed",
    "LinkError",
    "LinkPool",
    "NodeIdentity",
    "PeerLink",
    "RemoteError",
    "RequestLost",
    "RequestRejected",
    "RequestTimeout",
    "WireConfig",
    "WireEndpoint",
    "WireHandler",
    "WireStats",
]
