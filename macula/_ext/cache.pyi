"""Typed interface of the TTL cache (code: _ext/cache.pyx; guide: docs/cores/cache.md)."""

from collections.abc import Callable, Hashable
from typing import Any, Generic, SupportsFloat, final, overload

from typing_extensions import TypeVar

# Unannotated TTLCache(...) is a TTLCache[Hashable, Any].
_K = TypeVar("_K", bound=Hashable, default=Hashable)
_V = TypeVar("_V", default=Any)
_D = TypeVar("_D")

def monotonic() -> float:
    """The cache's own clock reading: the value ``time.monotonic()`` would give."""

@final
class TTLCache(Generic[_K, _V]):
    """A bounded key -> value cache: a TTL per entry, LRU eviction at ``max_size``.

    Expired means ``now >= put time + ttl``. Methods without ``now=`` read ``clock()`` when
    one was given, else the monotonic clock.
    """

    def __init__(
        self,
        max_size: int,
        default_ttl: SupportsFloat,
        *,
        clock: Callable[[], SupportsFloat] | None = None,
    ) -> None: ...
    @overload
    def get(self, key: _K, *, now: SupportsFloat | None = None) -> _V | None: ...
    @overload
    def get(self, key: _K, default: _D, *, now: SupportsFloat | None = None) -> _V | _D: ...
    def put(
        self,
        key: _K,
        value: _V,
        ttl: SupportsFloat | None = None,
        *,
        now: SupportsFloat | None = None,
    ) -> None: ...
    @overload
    def pop(self, key: _K, *, now: SupportsFloat | None = None) -> _V | None: ...
    @overload
    def pop(self, key: _K, default: _D, *, now: SupportsFloat | None = None) -> _V | _D: ...
    def __contains__(self, key: object) -> bool: ...
    def ttl(self, key: _K, *, now: SupportsFloat | None = None) -> float | None: ...
    def expire(self, now: SupportsFloat | None = None, budget: int = 1000) -> int: ...
    def __len__(self) -> int: ...
    def clear(self) -> None: ...
    def keys(self, *, now: SupportsFloat | None = None) -> list[_K]: ...
    def items(self, *, now: SupportsFloat | None = None) -> list[tuple[_K, _V]]: ...
    def stats(self) -> dict[str, int]: ...
    @property
    def max_size(self) -> int: ...
    @property
    def default_ttl(self) -> float: ...
    @property
    def clock(self) -> Callable[[], SupportsFloat] | None: ...
