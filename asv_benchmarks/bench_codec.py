"""asv benchmarks of the batch frame codec (macula.BatchEncoder / macula.FrameDecoder).

What is measured, and why:

* ``Encode``: framing a batch of the issue's message (a small msgspec Struct with a 64-byte
  payload) or of 64-byte raw frames, then flushing it into one buffer, against the naive
  Python loop (msgpack encode + ``struct.pack('>I', n)`` + list append, ``b"".join``).  This
  is the cost every published message pays before its write.
* ``Decode``: splitting a stream of such frames fed in 1,200-byte chunks (one QUIC packet's
  payload) and 64 KiB chunks (a large socket read), as bytes and as memoryviews, against a
  naive ``bytearray`` + ``struct.unpack_from`` decoder.  This is the cost every received
  message pays before msgpack decoding.
* ``LargeFrames``: frames of 256 KiB assembled from 64 KiB chunks (one copy) and 64 KiB
  frames inside 1 MiB chunks (``views=True``: no copy), the bulk-transfer case.
* ``Memory``: bytes per frame on the wire (the varint prefix against a 4-byte one), and the
  bytes a decoder holds for a partial frame whose prefix announces far more than has arrived
  (it must grow with the data, not with the claim).

Data is built in ``setup`` from fixed seeds; the module is self-contained (the naive
references are repeated here) so asv can import it from an installed macula.
"""

from __future__ import annotations

import random
import struct
import tracemalloc
from typing import ClassVar

import msgspec

from macula import BatchEncoder, FrameDecoder


class Msg(msgspec.Struct, array_like=True):
    topic: str
    qos: int
    mid: int
    payload: bytes


def _messages(n: int, seed: int) -> list[Msg]:
    rng = random.Random(seed)
    return [
        Msg(
            f"telemetry/site{rng.randrange(20)}/dev{rng.randrange(500)}/temperature",
            rng.randrange(3),
            rng.randrange(1, 65536),
            rng.randbytes(64),
        )
        for _ in range(n)
    ]


_LENGTH = struct.Struct(">I")


def _naive_frame(bodies: list[bytes]) -> bytes:
    parts: list[bytes] = []
    add = parts.append
    pack = _LENGTH.pack
    for body in bodies:
        add(pack(len(body)))
        add(body)
    return b"".join(parts)


class _NaiveDecoder:
    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        buf = self.buf
        buf += data
        out = []
        pos, n = 0, len(buf)
        view = memoryview(buf)
        while n - pos >= 4:
            (length,) = _LENGTH.unpack_from(buf, pos)
            end = pos + 4 + length
            if end > n:
                break
            out.append(view[pos + 4 : end].tobytes())
            pos = end
        view.release()
        del buf[:pos]
        return out


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


class Encode:
    params = ([1, 100, 1000],)
    param_names: ClassVar[list[str]] = ["batch"]

    def setup(self, batch: int) -> None:
        self.msgs = _messages(batch, seed=1)
        self.raws = [bytes([i % 256]) * 64 for i in range(batch)]
        self.enc = BatchEncoder()
        self.msgpack = msgspec.msgpack.Encoder()

    def time_append_flush(self, batch: int) -> None:
        append = self.enc.append
        for m in self.msgs:
            append(m)
        self.enc.flush()

    def time_naive_append_join(self, batch: int) -> None:
        encode, pack = self.msgpack.encode, _LENGTH.pack
        parts: list[bytes] = []
        add = parts.append
        for m in self.msgs:
            body = encode(m)
            add(pack(len(body)))
            add(body)
        b"".join(parts)

    def time_append_raw_flush(self, batch: int) -> None:
        append = self.enc.append_raw
        for r in self.raws:
            append(r)
        self.enc.flush()

    def time_naive_raw_join(self, batch: int) -> None:
        _naive_frame(self.raws)


class Decode:
    params = ([1200, 65536], [False, True])
    param_names: ClassVar[list[str]] = ["chunk", "views"]

    def setup(self, chunk: int, views: bool) -> None:
        msgs = _messages(10_000, seed=2)
        enc = BatchEncoder()
        for m in msgs:
            enc.append(m)
        self.chunks = _chunks(enc.flush(), chunk)
        encode = msgspec.msgpack.Encoder().encode
        self.naive_chunks = _chunks(_naive_frame([encode(m) for m in msgs]), chunk)

    def time_feed(self, chunk: int, views: bool) -> None:
        feed = FrameDecoder(views=views).feed
        for c in self.chunks:
            feed(c)

    def time_naive_feed(self, chunk: int, views: bool) -> None:
        feed = _NaiveDecoder().feed
        for c in self.naive_chunks:
            feed(c)

    def peakmem_feed(self, chunk: int, views: bool) -> None:
        dec = FrameDecoder(views=views)
        kept = [dec.feed(c) for c in self.chunks]  # every frame alive at the end
        assert sum(map(len, kept)) == 10_000


class LargeFrames:
    params = (["256KiB/64KiB", "64KiB/1MiB", "64KiB/1MiB views"],)
    param_names: ClassVar[list[str]] = ["frame/chunk"]

    def setup(self, case: str) -> None:
        frame, chunk = (256 * 1024, 64 * 1024) if case.startswith("256") else (65536, 1 << 20)
        self.views = case.endswith("views")
        bodies = [bytes([i]) * frame for i in range(32)]
        enc = BatchEncoder()
        for b in bodies:
            enc.append_raw(b)
        self.chunks = _chunks(enc.flush(), chunk)
        self.naive_chunks = _chunks(_naive_frame(bodies), chunk)

    def time_feed(self, case: str) -> None:
        feed = FrameDecoder(views=self.views).feed
        for c in self.chunks:
            feed(c)

    def time_naive_feed(self, case: str) -> None:
        feed = _NaiveDecoder().feed
        for c in self.naive_chunks:
            feed(c)


class Memory:
    def setup(self) -> None:
        self.msgs = _messages(1000, seed=3)

    def track_wire_bytes_per_frame(self) -> float:
        enc = BatchEncoder()
        for m in self.msgs:
            enc.append(m)
        return len(enc.flush()) / len(self.msgs)

    track_wire_bytes_per_frame.unit = "bytes"  # type: ignore[attr-defined]

    def track_naive_wire_bytes_per_frame(self) -> float:
        encode = msgspec.msgpack.Encoder().encode
        return len(_naive_frame([encode(m) for m in self.msgs])) / len(self.msgs)

    track_naive_wire_bytes_per_frame.unit = "bytes"  # type: ignore[attr-defined]

    def track_partial_frame_bytes_held(self) -> int:
        """Memory held after a prefix announcing 100 MB and 1 KB of body."""
        dec = FrameDecoder(max_frame=(1 << 28) - 1)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            dec.feed(bytes([0x80, 0xC2, 0xD7, 0x2F]) + bytes(1000))  # 100,000,000
            return tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()

    track_partial_frame_bytes_held.unit = "bytes"  # type: ignore[attr-defined]
