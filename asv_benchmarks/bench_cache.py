"""asv benchmarks of the TTL cache (macula.TTLCache).

What is measured, and why:

* ``Get``: a pass of ``get`` over every key of a cache of 10,000 or 100,000 entries (hits,
  with ``now=`` and with the cache's own clock) and over as many absent keys (misses),
  against the obvious ``OrderedDict`` cache (``move_to_end`` on a hit).  This is the cost
  of every route / DHT lookup that goes through the cache.
* ``Put``: updates of existing keys, and inserts of new keys into a full cache (each one
  evicts the least recently used entry), against the same reference.
* ``Expire``: sweeping a cache whose entries have all expired (the periodic ``expire`` call).
* ``Memory``: peak memory of building a full cache, and bytes per entry (tracemalloc).

Keys are ``f"topic/{i}"`` strings built in ``setup``; the module is self-contained (the
naive reference is repeated here) so asv can import it from an installed macula.
"""

from __future__ import annotations

import tracemalloc
from collections import OrderedDict
from typing import Any, ClassVar

from macula import TTLCache

TTL = 1e9


class _Naive:
    """The OrderedDict TTL/LRU cache (tools/cores/naive_cache.py, the parts timed here)."""

    def __init__(self, max_size: int, default_ttl: float) -> None:
        self.max_size = max_size
        self.default_ttl = default_ttl
        self.data: OrderedDict[Any, tuple[Any, float]] = OrderedDict()

    def get(self, key: Any, default: Any = None, *, now: float) -> Any:
        item = self.data.get(key)
        if item is None:
            return default
        if now >= item[1]:
            del self.data[key]
            return default
        self.data.move_to_end(key)
        return item[0]

    def put(self, key: Any, value: Any, ttl: float | None = None, *, now: float) -> None:
        data = self.data
        data[key] = (value, now + (self.default_ttl if ttl is None else ttl))
        data.move_to_end(key)
        if len(data) > self.max_size:
            data.popitem(last=False)

    def expire(self, now: float, budget: int) -> int:
        dead = [k for k, (_, d) in self.data.items() if now >= d][:budget]
        for k in dead:
            del self.data[k]
        return len(dead)


def _fill(cache: Any, keys: list[str]) -> Any:
    put = cache.put
    for k in keys:
        put(k, k, now=0.0)
    return cache


class _Full:
    """Both caches filled with ``keys`` (every entry live); ``others`` are absent keys."""

    params = ([10_000, 100_000],)
    param_names: ClassVar[list[str]] = ["entries"]

    def setup(self, n: int) -> None:
        self.keys = [f"topic/{i}" for i in range(n)]
        self.others = [f"other/{i}" for i in range(n)]
        self.ours = _fill(TTLCache(n, TTL), self.keys)
        self.naive = _fill(_Naive(n, TTL), self.keys)


class Get(_Full):
    def time_hit_now(self, n: int) -> None:
        get = self.ours.get
        for k in self.keys:
            get(k, None, now=1.0)

    def time_hit_own_clock(self, n: int) -> None:
        get = self.ours.get
        for k in self.keys:
            get(k)

    def time_miss(self, n: int) -> None:
        get = self.ours.get
        for k in self.others:
            get(k, None, now=1.0)

    def time_naive_hit_now(self, n: int) -> None:
        get = self.naive.get
        for k in self.keys:
            get(k, None, now=1.0)

    def time_naive_miss(self, n: int) -> None:
        get = self.naive.get
        for k in self.others:
            get(k, None, now=1.0)


class Put(_Full):
    def setup(self, n: int) -> None:
        super().setup(n)
        self.flip = [self.others, self.keys]
        self.naive_flip = [self.others, self.keys]

    def time_update(self, n: int) -> None:
        put = self.ours.put
        for k in self.keys:
            put(k, k, now=1.0)

    def time_insert_evict(self, n: int) -> None:
        put = self.ours.put
        for k in self.flip[0]:
            put(k, k, now=1.0)
        self.flip.reverse()

    def time_naive_update(self, n: int) -> None:
        put = self.naive.put
        for k in self.keys:
            put(k, k, now=1.0)

    def time_naive_insert_evict(self, n: int) -> None:
        put = self.naive.put
        for k in self.naive_flip[0]:
            put(k, k, now=1.0)
        self.naive_flip.reverse()


class Expire:
    params = ([10_000, 100_000],)
    param_names: ClassVar[list[str]] = ["entries"]
    number = 1  # one sweep per freshly filled cache (setup runs before each repeat)
    repeat = 5
    warmup_time = 0.0

    def setup(self, n: int) -> None:
        keys = [f"topic/{i}" for i in range(n)]
        self.n = n
        self.ours = _fill(TTLCache(n, TTL), keys)
        self.naive = _fill(_Naive(n, TTL), keys)

    def time_sweep_all_expired(self, n: int) -> None:
        self.ours.expire(now=2 * TTL, budget=n)

    def time_naive_sweep_all_expired(self, n: int) -> None:
        self.naive.expire(now=2 * TTL, budget=n)


class Memory:
    params = ([100_000],)
    param_names: ClassVar[list[str]] = ["entries"]

    def setup(self, n: int) -> None:
        self.keys = [f"topic/{i}" for i in range(n)]

    def peakmem_build_full_cache(self, n: int) -> None:
        _fill(TTLCache(n, TTL), self.keys)

    def peakmem_naive_build_full_cache(self, n: int) -> None:
        _fill(_Naive(n, TTL), self.keys)

    def _per_entry(self, cache: Any) -> float:
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            _fill(cache, self.keys)
            return (tracemalloc.get_traced_memory()[0] - base) / len(self.keys)
        finally:
            tracemalloc.stop()

    def track_bytes_per_entry(self, n: int) -> float:
        return self._per_entry(TTLCache(n, TTL))

    track_bytes_per_entry.unit = "bytes"  # type: ignore[attr-defined]

    def track_naive_bytes_per_entry(self, n: int) -> float:
        return self._per_entry(_Naive(n, TTL))

    track_naive_bytes_per_entry.unit = "bytes"  # type: ignore[attr-defined]
