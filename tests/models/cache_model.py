"""The obviously-correct model of the TTL cache (macula.TTLCache; guide: docs/cores/cache.md).

A plain dict key -> [value, deadline, seq] and a list of keys in LRU order (least recently
used first).  Every operation is the sentence of the documentation written as code, with
linear scans where the compiled cache keeps orders; the compiled ``TTLCache`` must give the
same answers, the same statistics and the same orders.  Time is always passed as ``now``.
"""

from __future__ import annotations

from typing import Any


class ModelTTLCache:
    def __init__(self, max_size: int, default_ttl: float) -> None:
        self.max_size = max_size
        self.default_ttl = default_ttl
        self.data: dict[Any, list[Any]] = {}  # key -> [value, deadline, seq]
        self.order: list[Any] = []  # LRU first
        self.seq = 0
        self.hits = self.misses = self.evictions = self.expirations = 0

    def _drop(self, key: Any) -> list[Any]:
        self.order.remove(key)
        return self.data.pop(key)

    def _to_mru(self, key: Any) -> None:
        self.order.remove(key)
        self.order.append(key)

    def _expired(self, key: Any, now: float) -> bool:
        """Removes and counts the entry when it has expired (``now >= deadline``)."""
        if now >= self.data[key][1]:
            self._drop(key)
            self.expirations += 1
            return True
        return False

    def put(self, key: Any, value: Any, ttl: float | None, now: float) -> None:
        self.seq += 1
        deadline = now + (self.default_ttl if ttl is None else ttl)
        if key in self.data:
            self.data[key] = [value, deadline, self.seq]
            self._to_mru(key)
            return
        self.data[key] = [value, deadline, self.seq]
        self.order.append(key)
        if len(self.data) > self.max_size:
            self._drop(self.order[0])
            self.evictions += 1

    def get(self, key: Any, default: Any, now: float) -> Any:
        if key not in self.data or self._expired(key, now):
            self.misses += 1
            return default
        self.hits += 1
        self._to_mru(key)
        return self.data[key][0]

    def pop(self, key: Any, default: Any, now: float) -> Any:
        if key not in self.data:
            return default
        value, deadline, _ = self._drop(key)
        if now >= deadline:
            self.expirations += 1
            return default
        return value

    def contains(self, key: Any, now: float) -> bool:
        return key in self.data and not self._expired(key, now)

    def ttl(self, key: Any, now: float) -> float | None:
        if key not in self.data or self._expired(key, now):
            return None
        return float(self.data[key][1] - now)

    def expire(self, now: float, budget: int) -> int:
        """The ``budget`` expired entries with the earliest (deadline, put sequence)."""
        expired = sorted(
            (deadline, seq, key) for key, (_, deadline, seq) in self.data.items() if now >= deadline
        )
        for _, _, key in expired[:budget]:
            self._drop(key)
        self.expirations += min(budget, len(expired))
        return min(budget, len(expired))

    def __len__(self) -> int:
        return len(self.data)

    def clear(self) -> None:
        self.data.clear()
        self.order.clear()

    def keys(self, now: float) -> list[Any]:
        return [k for k in self.order if now < self.data[k][1]]

    def items(self, now: float) -> list[tuple[Any, Any]]:
        return [(k, self.data[k][0]) for k in self.order if now < self.data[k][1]]

    def stats(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "expirations": self.expirations,
            "size": len(self.data),
            "max_size": self.max_size,
        }
