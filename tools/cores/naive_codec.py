"""The naive reference for the batch frame codec, and the benchmark workload.

``NaiveEncoder`` is the framing loop a Python programmer writes first, done well: one
``msgspec.msgpack.Encoder`` and one ``struct.Struct(">I")`` built once, each message encoded
to ``bytes``, its 4-byte big-endian length packed, both appended to a list, and the list
joined at flush.  (The benchmark times the same steps inlined in its loop, without the
method call per message, to give the reference its best chance.)

``NaiveDecoder`` keeps a ``bytearray``, appends each chunk, reads lengths with
``struct.unpack_from``, copies each frame out through a memoryview (the faster of the obvious
ways) and deletes the consumed prefix of the buffer once per feed.

They speak a 4-byte length prefix (the simplest framing, msgspec's asyncio-kv example)
rather than macula's 1-4 byte varint: that is the cheapest prefix to write in Python, so the
reference is not slowed down by our format.  The benchmarks check that both sides carry the
same bodies.

``make_messages`` builds the issue's message: a small ``Struct`` (topic, qos, message id)
with a 64-byte payload, from a fixed seed.
"""

from __future__ import annotations

import random
import struct
from typing import Any

import msgspec


class Msg(msgspec.Struct, array_like=True):
    """The benchmark's message (about 100 bytes of msgpack)."""

    topic: str
    qos: int
    mid: int
    payload: bytes


def make_messages(n: int, seed: int = 2) -> list[Msg]:
    rng = random.Random(seed)
    sites = [f"site{i}" for i in range(20)]
    metrics = ["temperature", "humidity", "pressure", "co2"]
    return [
        Msg(
            topic=f"telemetry/{rng.choice(sites)}/dev{rng.randrange(500)}/{rng.choice(metrics)}",
            qos=rng.randrange(3),
            mid=rng.randrange(1, 65536),
            payload=rng.randbytes(64),
        )
        for _ in range(n)
    ]


_LENGTH = struct.Struct(">I")


class NaiveEncoder:
    def __init__(self) -> None:
        self.encode = msgspec.msgpack.Encoder().encode
        self.pack = _LENGTH.pack
        self._parts: list[bytes] = []

    def append(self, msg: Any) -> None:
        body = self.encode(msg)
        self._parts.append(self.pack(len(body)))
        self._parts.append(body)

    def append_raw(self, data: bytes) -> None:
        self._parts.append(self.pack(len(data)))
        self._parts.append(data)

    def flush(self) -> bytes:
        out = b"".join(self._parts)
        self._parts = []
        return out


class NaiveDecoder:
    def __init__(self, max_frame: int = 16 * 1024 * 1024) -> None:
        self._buf = bytearray()
        self._max_frame = max_frame
        self._unpack_from = _LENGTH.unpack_from

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        out = []
        pos = 0
        n = len(buf)
        unpack_from = self._unpack_from
        view = memoryview(buf)  # slices of it copy once (bytes(buf[a:b]) copies twice)
        while n - pos >= 4:
            (length,) = unpack_from(buf, pos)
            if length > self._max_frame:
                view.release()
                raise ValueError(f"frame of {length} bytes exceeds max_frame")
            end = pos + 4 + length
            if end > n:
                break
            out.append(view[pos + 4 : end].tobytes())
            pos = end
        view.release()
        del buf[:pos]
        return out
