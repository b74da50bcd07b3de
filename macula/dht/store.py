"""The record store of one DHT node: multi-valued records with a TTL per value, bounded.

A key (32 bytes) holds values from many publishers; a publisher's new value under a key
replaces its previous one (and its deadline). Every value has its own deadline
``now + ttl``; a value is expired when ``now >= deadline`` and is then never served
(``get`` filters it) and is removed by ``reap`` or when its key is next written.

Bounds (each refusal is counted in ``refused[reason]`` and the store is unchanged):

==================  =========================================================
``size``            value longer than ``max_value_size`` bytes
``keys``            a new key while ``max_keys`` keys are held
``values_per_key``  a new publisher under a key holding ``max_values_per_key``
``ttl``             ttl not a finite number > 0 (above ``max_ttl`` it is clamped)
``key``             key not 32 bytes
==================  =========================================================

Bounds count live values only: before refusing for ``keys`` or ``values_per_key`` the
store drops what has expired, so expired values never hold a bound (nor give one a pass: a
publisher whose previous value has expired counts as a new one). A replacement of a live
value (same key and publisher) is never refused for a bound.

Costs: ``put`` O(log V) (a heap push), ``get`` O(values of the key), ``reap`` O(log V) per
removed value. Expiry order is one heap of (deadline, key, publisher) with lazy deletion: an
entry whose value was replaced since is skipped; the heap is rebuilt when stale entries
outnumber live ones.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter

KEY_SIZE = 32


class RecordStore:
    """key -> publisher -> (value, deadline), bounded; the clock is the caller's ``now``."""

    def __init__(
        self,
        *,
        max_keys: int = 100_000,
        max_values_per_key: int = 256,
        max_value_size: int = 1024,
        max_ttl: float = 86_400.0,
    ) -> None:
        for name, v in (("max_keys", max_keys), ("max_values_per_key", max_values_per_key),
                        ("max_value_size", max_value_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, not {v!r}")
        if not (max_ttl > 0):
            raise ValueError(f"max_ttl must be > 0, not {max_ttl!r}")
        self.max_keys = max_keys
        self.max_values_per_key = max_values_per_key
        self.max_value_size = max_value_size
        self.max_ttl = float(max_ttl)
        self._keys: dict[bytes, dict[bytes, tuple[bytes, float]]] = {}
        self._heap: list[tuple[float, bytes, bytes]] = []
        self._values = 0
        self.refused: Counter[str] = Counter()
        self.expired = 0  # values removed because their deadline passed

    # -- queries --------------------------------------------------------------------------

    def __len__(self) -> int:
        """Values held, expired ones not yet removed included."""
        return self._values

    @property
    def keys_held(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def get(self, key: bytes, now: float) -> list[tuple[bytes, bytes, float]]:
        """Live values of ``key`` as (publisher, value, seconds left), oldest publisher
        first; [] if none."""
        vals = self._keys.get(key)
        if not vals:
            return []
        return [(p, v, d - now) for p, (v, d) in vals.items() if d > now]

    def value(self, key: bytes, publisher: bytes, now: float) -> bytes | None:
        """``publisher``'s live value under ``key``, or None."""
        vals = self._keys.get(key)
        if not vals:
            return None
        got = vals.get(publisher)
        return got[0] if got is not None and got[1] > now else None

    # -- updates --------------------------------------------------------------------------

    def put(self, key: bytes, publisher: bytes, value: bytes, ttl: float, now: float) -> str:
        """Store ``publisher``'s ``value`` under ``key`` for ``ttl`` seconds. Returns "" when
        stored, else the reason of the refusal (counted)."""
        if type(key) is not bytes or len(key) != KEY_SIZE:
            return self._refuse("key")
        if len(value) > self.max_value_size:
            return self._refuse("size")
        try:
            ttl = float(ttl)
        except (TypeError, ValueError):
            return self._refuse("ttl")
        if not (ttl > 0) or math.isinf(ttl):
            return self._refuse("ttl")
        ttl = min(ttl, self.max_ttl)
        vals = self._keys.get(key)
        if (vals is not None and len(self._keys) >= self.max_keys
                and all(d <= now for _, d in vals.values())):
            self.reap(now)  # a key with nothing live left passes the key bound as a new one
            vals = self._keys.get(key)
        if vals is None:
            if len(self._keys) >= self.max_keys:
                self.reap(now)
                if len(self._keys) >= self.max_keys:
                    return self._refuse("keys")
            vals = self._keys[key] = {}
        elif len(vals) >= self.max_values_per_key and (
                publisher not in vals or vals[publisher][1] <= now):
            self._drop_expired(key, vals, now)
            if len(vals) >= self.max_values_per_key:
                return self._refuse("values_per_key")
        deadline = now + ttl
        if publisher not in vals:
            self._values += 1
        vals[publisher] = (bytes(value), deadline)
        heapq.heappush(self._heap, (deadline, key, publisher))
        if len(self._heap) > 2 * self._values + 1024:
            self._rebuild_heap()
        return ""

    def reap(self, now: float, budget: int | None = None) -> int:
        """Remove values whose deadline is <= now (at most ``budget``); returns how many."""
        heap = self._heap
        keys = self._keys
        removed = 0
        while heap and heap[0][0] <= now and (budget is None or removed < budget):
            deadline, key, pub = heapq.heappop(heap)
            vals = keys.get(key)
            if vals is None:
                continue
            cur = vals.get(pub)
            if cur is None or cur[1] != deadline:
                continue  # replaced since (or removed): a stale heap entry
            del vals[pub]
            if not vals:
                del keys[key]
            removed += 1
        self._values -= removed
        self.expired += removed
        return removed

    # -- internals ------------------------------------------------------------------------

    def _refuse(self, reason: str) -> str:
        self.refused[reason] += 1
        return reason

    def _drop_expired(self, key: bytes, vals: dict[bytes, tuple[bytes, float]],
                      now: float) -> None:
        dead = [p for p, (_, d) in vals.items() if d <= now]
        for p in dead:
            del vals[p]
        self._values -= len(dead)
        self.expired += len(dead)

    def _rebuild_heap(self) -> None:
        self._heap = [(d, k, p) for k, vals in self._keys.items() for p, (_, d) in vals.items()]
        heapq.heapify(self._heap)

    def stats(self) -> dict[str, int]:
        out = {"keys": len(self._keys), "values": self._values, "expired": self.expired}
        for reason in ("size", "keys", "values_per_key", "ttl", "key"):
            out[f"refused_{reason}"] = self.refused[reason]
        return out
