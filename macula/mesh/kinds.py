"""The mesh's message kinds on the peer wire and the statuses of its requests.

docs/MESH.md describes each; the DHT uses kinds 0x10-0x1F (docs/DHT.md)."""

from __future__ import annotations

from macula.control.protocol import Err

KIND_PUB = 0x20
KIND_ACK = 0x21
KIND_NOMATCH = 0x22
KIND_CALL = 0x23
KIND_ERROR = 0x24  # [kind, message]: a one-way message of ``kind`` was refused
KIND_RELAY = 0x25  # [origin, target, hops, kind, payload]: pass on to target
KIND_RELAY_REQ = 0x26  # request [target, hops, kind, payload]: pass on, answer with its reply
KIND_NOTIFY = 0x27  # [DHT key, publisher, record]: a record a watched key holds changed

STATUS_NO_PROVIDER = 0x30
STATUS_APPLICATION_ERROR = 0x31
STATUS_CALL_TIMEOUT = 0x32
STATUS_PROVIDER_GONE = 0x33
STATUS_BAD_CALL = 0x34
STATUS_UNREACHABLE = 0x35  # a relay has no link to the target, or the hop limit was reached

ERR_OF_STATUS = {
    STATUS_NO_PROVIDER: Err.NO_PROVIDER,
    STATUS_APPLICATION_ERROR: Err.APPLICATION_ERROR,
    STATUS_CALL_TIMEOUT: Err.CALL_TIMEOUT,
    STATUS_PROVIDER_GONE: Err.PROVIDER_GONE,
}
STATUS_OF_ERR = {v: k for k, v in ERR_OF_STATUS.items()}
