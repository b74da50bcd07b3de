"""Typed interface of the batch frame codec (code: _ext/codec.pyx; format: docs/FRAMES.md)."""

from typing import Any, Generic, Literal, TypeVar, final, overload

import msgspec
from typing_extensions import Buffer

MAX_PREFIX_BYTES: int
FRAME_LIMIT_BYTES: int
DEFAULT_MAX_FRAME_BYTES: int

class FrameError(ValueError):
    """A frame over ``max_frame`` or a malformed length prefix."""

    offset: int | None
    frames: list[Any]
    def __init__(
        self, message: str, *, offset: int | None = None, frames: list[Any] | None = None
    ) -> None: ...

@final
class BatchEncoder:
    """Frames messages into one buffer for one write."""

    def __init__(
        self,
        *,
        encoder: msgspec.msgpack.Encoder | None = None,
        max_frame: int = 16777216,
        capacity: int = 4096,
    ) -> None: ...
    def append(self, msg: Any, /) -> None: ...
    def append_raw(self, data: Buffer, /) -> None: ...
    def flush(self) -> bytes: ...
    def clear(self) -> None: ...
    def __len__(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def max_frame(self) -> int: ...
    @property
    def encoder(self) -> msgspec.msgpack.Encoder: ...

_Frame = TypeVar("_Frame", bytes, memoryview)

@final
class FrameDecoder(Generic[_Frame]):
    """Splits a byte stream, fed in chunks of any size, into frames.

    ``FrameDecoder()`` is a ``FrameDecoder[bytes]``, ``FrameDecoder(views=True)`` a
    ``FrameDecoder[memoryview]``.
    """

    @overload
    def __init__(
        self: FrameDecoder[bytes], *, max_frame: int = 16777216, views: Literal[False] = False
    ) -> None: ...
    @overload
    def __init__(
        self: FrameDecoder[memoryview], *, max_frame: int = 16777216, views: Literal[True]
    ) -> None: ...
    def feed(self, data: Buffer, /) -> list[_Frame]: ...
    def reset(self) -> None: ...
    @property
    def pending(self) -> int: ...
    @property
    def max_frame(self) -> int: ...
    @property
    def views(self) -> bool: ...
    @property
    def frames(self) -> int: ...
    @property
    def bytes(self) -> int: ...
    @property
    def broken(self) -> bool: ...
