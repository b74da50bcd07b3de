"""The naive reference for the TTL cache: the obvious ``OrderedDict`` implementation.

``NaiveTTLCache`` has the API of ``macula.TTLCache`` and is what a Python programmer writes
first, done well: an ``OrderedDict`` key -> ``(value, deadline)`` in LRU order,
``move_to_end`` on a hit, ``popitem(last=False)`` to evict the least recently used entry,
and ``time.monotonic`` (looked up once) when no ``now=`` is given.  ``expire`` walks the
dict from the LRU end and removes the expired entries it meets, looking at no more than
``budget`` expired entries (it has no expiry order, so it may look at live ones in between:
O(entries looked at), not O(budget)).  The benchmarks check that it gives the same answers
as ours before timing both.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any


class NaiveTTLCache:
    def __init__(self, max_size: int, default_ttl: float, *, clock: Any = None) -> None:
        self.max_size = max_size
        self.default_ttl = default_ttl
        self._clock = clock or time.monotonic
        self._data: OrderedDict[Any, tuple[Any, float]] = OrderedDict()
        self.hits = self.misses = self.evictions = self.expirations = 0

    def get(self, key: Any, default: Any = None, *, now: float | None = None) -> Any:
        item = self._data.get(key)
        if item is None:
            self.misses += 1
            return default
        if now is None:
            now = self._clock()
        if now >= item[1]:
            del self._data[key]
            self.expirations += 1
            self.misses += 1
            return default
        self._data.move_to_end(key)
        self.hits += 1
        return item[0]

    def put(
        self, key: Any, value: Any, ttl: float | None = None, *, now: float | None = None
    ) -> None:
        if now is None:
            now = self._clock()
        data = self._data
        data[key] = (value, now + (self.default_ttl if ttl is None else ttl))
        data.move_to_end(key)
        if len(data) > self.max_size:
            data.popitem(last=False)
            self.evictions += 1

    def pop(self, key: Any, default: Any = None, *, now: float | None = None) -> Any:
        item = self._data.pop(key, None)
        if item is None:
            return default
        if now is None:
            now = self._clock()
        if now >= item[1]:
            self.expirations += 1
            return default
        return item[0]

    def __contains__(self, key: Any) -> bool:
        item = self._data.get(key)
        if item is None:
            return False
        if self._clock() >= item[1]:
            del self._data[key]
            self.expirations += 1
            return False
        return True

    def __len__(self) -> int:
        return len(self._data)

    def expire(self, now: float | None = None, budget: int = 1000) -> int:
        if now is None:
            now = self._clock()
        dead = []
        for key, (_, deadline) in self._data.items():
            if len(dead) >= budget:
                break
            if now >= deadline:
                dead.append(key)
        for key in dead:
            del self._data[key]
        self.expirations += len(dead)
        return len(dead)

    def keys(self, *, now: float | None = None) -> list[Any]:
        if now is None:
            now = self._clock()
        return [k for k, (_, deadline) in self._data.items() if now < deadline]

    def stats(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "expirations": self.expirations,
            "size": len(self._data),
            "max_size": self.max_size,
        }
