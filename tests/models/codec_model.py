"""The obviously-correct model of the batch frame codec (format: docs/FRAMES.md).

``ModelEncoder`` keeps a list of bodies and joins them at flush; ``ModelDecoder`` keeps every
byte it was given and re-parses the unconsumed part byte by byte after each feed.  Both are
written for clarity, not speed: the compiled ``BatchEncoder`` / ``FrameDecoder`` must give
byte-for-byte the same output, the same frames, and the same errors (type, message, offset).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

MAX_PREFIX = 4
FRAME_LIMIT = (1 << 28) - 1  # the most a 4-byte prefix can say
DEFAULT_MAX_FRAME = 16 * 1024 * 1024


def encode_prefix(length: int) -> bytes:
    """The Variable Byte Integer for ``length``: 7 bits a byte, least significant group
    first, the high bit set on every byte but the last."""
    if not 0 <= length <= FRAME_LIMIT:
        raise ValueError(f"frame length {length} out of range")
    out = bytearray()
    while True:
        group = length % 128
        length //= 128
        if length:
            out.append(group + 128)
        else:
            out.append(group)
            return bytes(out)


def frame(body: bytes) -> bytes:
    return encode_prefix(len(body)) + body


class ModelFrameError(ValueError):
    """The model's FrameError: same message, offset and preceding frames."""

    def __init__(self, message: str, offset: int | None, frames: list[bytes]) -> None:
        super().__init__(message)
        self.offset = offset
        self.frames = frames


class ModelEncoder:
    def __init__(
        self,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        encode: Callable[[Any], bytes] = msgspec.msgpack.encode,
    ) -> None:
        self.max_frame = max_frame
        self.encode = encode
        self.bodies: list[bytes] = []

    def _add(self, body: bytes) -> None:
        if len(body) > self.max_frame:
            raise ModelFrameError(
                f"frame of {len(body):,} bytes exceeds max_frame ({self.max_frame:,})", None, []
            )
        self.bodies.append(body)

    def append(self, msg: Any) -> None:
        self._add(self.encode(msg))

    def append_raw(self, data: Any) -> None:
        self._add(bytes(memoryview(data)))

    def flush(self) -> bytes:
        out = b"".join(frame(b) for b in self.bodies)
        self.bodies = []
        return out

    def clear(self) -> None:
        self.bodies = []

    def __len__(self) -> int:
        return len(self.bodies)

    @property
    def nbytes(self) -> int:
        return sum(len(frame(b)) for b in self.bodies)


class ModelDecoder:
    def __init__(self, *, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self.reset()

    def reset(self) -> None:
        self.stream = b""  # every byte fed
        self.consumed = 0  # bytes of it returned as frames (prefixes included)
        self.frames = 0
        self.error: str | None = None
        self.error_offset = 0

    @property
    def bytes(self) -> int:
        return len(self.stream)

    @property
    def pending(self) -> int:
        return 0 if self.error is not None else len(self.stream) - self.consumed

    @property
    def broken(self) -> bool:
        return self.error is not None

    def feed(self, data: Any) -> list[bytes]:
        if self.error is not None:
            raise ModelFrameError(
                f"decoder is broken since stream offset {self.error_offset} ({self.error}); "
                "call reset() or use a new FrameDecoder",
                self.error_offset,
                [],
            )
        self.stream += bytes(memoryview(data))
        out: list[bytes] = []
        while True:
            start = self.consumed
            # the prefix, one byte at a time
            length = 0
            size = 0
            while True:
                if start + size == len(self.stream):
                    self.frames += len(out)
                    return out  # prefix incomplete
                byte = self.stream[start + size]
                length += (byte % 128) << (7 * size)
                size += 1
                if byte < 128:
                    if byte == 0 and size > 1:
                        self._fail(start, "not in shortest form", size, out)
                    break
                if size == MAX_PREFIX:
                    self._fail(start, "more than 4 bytes", size, out)
            if length > self.max_frame:
                self.frames += len(out)
                self.error = (
                    f"frame of {length:,} bytes at stream offset {start} exceeds max_frame "
                    f"({self.max_frame:,})"
                )
                self.error_offset = start
                raise ModelFrameError(self.error, start, out)
            end = start + size + length
            if end > len(self.stream):
                self.frames += len(out)
                return out  # body incomplete
            out.append(self.stream[start + size : end])
            self.consumed = end

    def _fail(self, start: int, what: str, size: int, out: list[bytes]) -> None:
        self.frames += len(out)
        prefix = " ".join(f"{b:02x}" for b in self.stream[start : start + size])
        self.error = f"malformed length prefix at stream offset {start}: {what} ({prefix})"
        self.error_offset = start
        raise ModelFrameError(self.error, start, out)
