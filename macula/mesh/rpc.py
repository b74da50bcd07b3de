"""RPC across nodes, sans-IO: provider records, the provider cache, the try-order of a
call, failover, and opt-in result caching.

A node with a local registration of ``procedure`` in ``realm`` puts one DHT record under
``dht_key(realm, "rpc", procedure)`` whose value is ``encode_provider(ProviderRecord)``
(the DHT keeps one value per publisher, so one record per node). A CALL with no local
provider goes to the mesh:

1. ``ProviderCache.get(realm, procedure, now)``: the providers known less than ``ttl``
   seconds ago, ``[]`` for a recent "nobody" answer (the caller answers ``NO_PROVIDER`` at
   once), or None: look the key up in the DHT, ``decode_provider`` each value (None:
   malformed, skip and count it) and ``put`` the records — an empty answer is kept
   ``negative_ttl`` seconds, so a storm of calls to a missing procedure costs one lookup.
2. ``agreed_strategy(records)``, then ``Selector.order(realm, procedure, strategy,
   records)``: the full try-order for this call.
3. ``CallPlan(order, max_attempts=3, deadline=now + timeout)``: ``next_target()`` gives the
   provider to send the request to, ``on_failure(delivered, idempotent, now)`` says whether
   to go on with the next one. The rule:

   * a failure **before delivery** (dial error, link closed with the request still unsent)
     always moves on to the next provider — the procedure did not run;
   * a failure **after delivery** (no answer in time, link lost with the request sent)
     moves on only when the provider's record says ``idempotent`` — the procedure may have
     run, and running it twice must be harmless;
   * either way at most ``max_attempts`` providers are tried, never past the deadline.

   Each node that could not be reached goes to ``ProviderCache.forget_node`` (dropped from
   every list and ignored in DHT answers for ``quarantine`` seconds, so a dead node's
   record, which lives on in the DHT until its TTL, does not cost a lookup and a failed
   attempt per call; ``readmit`` lifts that when a link to the node comes up again) and
   to ``Selector.failed`` (a penalty sample for ``lowest_latency``); a node that answers
   "no provider here" (a stale record) goes to ``ProviderCache.drop`` (out of that list
   only: it is alive); each answer's round trip goes to ``Selector.observe``.
4. ``ResultCache``: when the answering provider's record has ``cache_ttl > 0``, its result
   is kept that long under (realm, procedure, encoded args) and later identical calls are
   answered from the cache (step 1 is skipped).

Strategies (``STRATEGIES``): ``round_robin`` rotates a per-(realm, procedure) counter over
the candidates sorted by node id; ``random`` is a uniform random permutation (injected
``random.Random``); ``first`` is the candidates sorted by node id (every caller agrees on
the same provider); ``lowest_latency`` sorts by an EWMA of observed round trips, nodes
never measured first (so they get measured), ties by node id. A node demoted by
``failed`` gets traffic again when the others fail or measure slower, or after
``Selector.forget`` (call it when a new link to the node comes up).

Bounds (each has a counter at the bound): ``ProviderCache`` ``max_entries`` (LRU
eviction), ``max_providers`` per entry (records beyond it, by node id, dropped), the
quarantine ``max_quarantined`` (LRU); ``Selector`` ``max_keys`` round-robin counters and
``max_nodes`` latency entries (LRU); ``ResultCache`` ``max_entries`` (LRU),
``max_value_bytes`` per entry (larger results are not cached), ``max_ttl`` (a longer
``cache_ttl`` is cut to it). ``CallPlan.max_attempts``.

Costs: ``ProviderCache.get``/``put`` O(providers) (a dict and an ordered dict);
``forget_node`` O(lists holding the node) through a reverse index; ``Selector.order``
O(n log n) for n candidates; ``ResultCache`` O(1) (a ``TTLCache``). No sockets and no
clocks: every time-dependent call takes ``now``.

Wire form of a record: a msgpack array ``[node_id (bin 32), endpoint ([host, port] or
nil), strategy (str), idempotent (bool), cache_ttl (float or int, seconds), via ([relay
id, [host, port]] or nil), stamp (uint64)]``; the last two may be missing (nil, 0), and
trailing elements added by newer versions are ignored.
"""

from __future__ import annotations

import math
import random
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec

from macula import TTLCache

__all__ = [
    "STRATEGIES",
    "CallPlan",
    "ProviderCache",
    "ProviderRecord",
    "ResultCache",
    "Selector",
    "agreed_strategy",
    "decode_provider",
    "encode_provider",
]

STRATEGIES = ("round_robin", "random", "first", "lowest_latency")

T = TypeVar("T")


def _check_strategy(strategy: object) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    assert isinstance(strategy, str)
    return strategy


def _valid_endpoint(ep: object) -> bool:
    return (isinstance(ep, tuple) and len(ep) == 2 and isinstance(ep[0], str) and ep[0] != ""
            and isinstance(ep[1], int) and not isinstance(ep[1], bool) and 0 < ep[1] < 65536)


@dataclass(frozen=True)
class ProviderRecord:
    """One node's offer of one procedure (the DHT value; the procedure is the key).

    Validated at construction (``ValueError``/``TypeError`` naming the rule)."""

    node_id: bytes  # 32 bytes
    endpoint: tuple[str, int] | None  # None: a client-mode node, reachable over its link
    strategy: str = "round_robin"  # one of STRATEGIES
    idempotent: bool = False  # may be re-sent to another provider after delivery
    cache_ttl: float = 0.0  # seconds a result may be cached by callers; 0: not cached
    # a client-mode node: the node it keeps a link to, and where that one listens
    via: tuple[bytes, tuple[str, int]] | None = None
    # drawn anew for each advertisement (a restart, a new registration): a record with
    # another stamp is a new registration, not the stale one of a node that died; 0: unknown
    stamp: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, bytes) or len(self.node_id) != 32:
            raise ValueError("node_id must be 32 bytes")
        if self.endpoint is not None and not _valid_endpoint(self.endpoint):
            raise ValueError("endpoint must be None or (host, port), port 1..65535")
        _check_strategy(self.strategy)
        if not isinstance(self.idempotent, bool):
            raise TypeError("idempotent must be a bool")
        ttl = self.cache_ttl
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
            raise TypeError("cache_ttl must be a number of seconds")
        if not math.isfinite(ttl) or ttl < 0:
            raise ValueError("cache_ttl must be finite and >= 0")
        if (isinstance(self.stamp, bool) or not isinstance(self.stamp, int)
                or not 0 <= self.stamp < 1 << 64):
            raise ValueError("stamp must be an int in 0 .. 2**64 - 1")


class _Wire(msgspec.Struct, array_like=True, frozen=True):
    node_id: bytes
    endpoint: tuple[str, int] | None
    strategy: str
    idempotent: bool
    cache_ttl: float
    via: tuple[bytes, tuple[str, int]] | None = None
    stamp: int = 0


_ENC = msgspec.msgpack.Encoder()
_DEC = msgspec.msgpack.Decoder(_Wire)


def encode_provider(rec: ProviderRecord) -> bytes:
    return _ENC.encode(_Wire(rec.node_id, rec.endpoint, rec.strategy, rec.idempotent,
                             float(rec.cache_ttl), rec.via, rec.stamp))


def decode_provider(data: bytes) -> ProviderRecord | None:
    """The record, or None for anything malformed (the caller counts it): not msgpack,
    wrong shape or types, node id not 32 bytes, bad endpoint, unknown strategy, a
    negative or non-finite ``cache_ttl``."""
    try:
        w = _DEC.decode(data)
        if w.via is not None and (len(w.via[0]) != 32 or not _valid_endpoint(w.via[1])):
            return None
        return ProviderRecord(w.node_id, w.endpoint, w.strategy, w.idempotent, w.cache_ttl,
                              w.via, w.stamp)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError):
        return None


def agreed_strategy(records: Sequence[ProviderRecord]) -> str:
    """The strategy callers use for a procedure whose providers may disagree: the most
    common one among ``records``; a tie goes to the strategy of the lowest node id among
    the tied (deterministic, so every caller picks the same). ``ValueError`` when empty."""
    if not records:
        raise ValueError("agreed_strategy needs at least one record")
    votes = Counter(r.strategy for r in records)
    top = max(votes.values())
    return min((r for r in records if votes[r.strategy] == top),
               key=lambda r: r.node_id).strategy


# -- the provider cache -----------------------------------------------------------------


@dataclass
class _Providers:
    records: tuple[ProviderRecord, ...]
    fetched_at: float
    ttl: float


_MAX_STAMPS = 256  # stamps remembered per quarantined node (ProviderCache.forget_node)


def _new_stamp(stamps: frozenset[int], r: ProviderRecord) -> bool:
    """``r`` carries a stamp other than those ``stamps`` lists (none listed: no record of
    the node counts as new)."""
    return bool(stamps) and r.stamp != 0 and r.stamp not in stamps


class ProviderCache:
    """(realm, procedure) -> the remote providers the DHT gave, for ``ttl`` seconds.

    ``self_id`` (this node) is never kept: the local provider is the broker's business.
    At ``max_entries`` the least recently used entry is evicted (``evicted``)."""

    def __init__(
        self,
        *,
        self_id: bytes,
        ttl: float = 30.0,
        negative_ttl: float = 2.0,
        max_entries: int = 10_000,
        max_providers: int = 256,
        quarantine: float = 5.0,
        max_quarantined: int = 10_000,
    ) -> None:
        if not (ttl > 0 and negative_ttl >= 0 and quarantine >= 0):
            raise ValueError("ttl must be > 0, negative_ttl and quarantine >= 0")
        if max_entries < 1 or max_providers < 1 or max_quarantined < 1:
            raise ValueError("max_entries, max_providers and max_quarantined must be >= 1")
        self.self_id = self_id
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self.max_providers = max_providers
        self.quarantine = quarantine
        self._entries: OrderedDict[tuple[str, str], _Providers] = OrderedDict()
        self._index: dict[bytes, set[tuple[str, str]]] = {}  # node id -> keys listing it
        self._quarantined: TTLCache | None = (
            TTLCache(max_quarantined, quarantine) if quarantine > 0 else None)
        self.counters: dict[str, int] = {
            "hits": 0, "misses": 0, "expired": 0, "puts": 0, "negative_puts": 0,
            "evicted": 0, "duplicates": 0, "truncated": 0, "quarantined_dropped": 0,
            "forgotten": 0, "invalidated": 0, "readmitted": 0, "dropped": 0, "stamps_dropped": 0,
        }

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, realm: str, procedure: str, now: float) -> list[ProviderRecord] | None:
        """The providers (``[]``: the DHT recently had none), or None: missing or expired,
        look the DHT up and ``put`` the answer."""
        key = (realm, procedure)
        e = self._entries.get(key)
        if e is None:
            self.counters["misses"] += 1
            return None
        if now - e.fetched_at >= e.ttl:
            self._remove(key)
            self.counters["expired"] += 1
            self.counters["misses"] += 1
            return None
        self._entries.move_to_end(key)
        self.counters["hits"] += 1
        return list(e.records)

    def put(self, realm: str, procedure: str, records: Iterable[ProviderRecord],
            now: float) -> list[ProviderRecord]:
        """Keep a DHT answer; returns what was kept (sorted by node id): without this
        node, duplicates of a node id (the first wins), quarantined nodes, and beyond
        ``max_providers``. An empty result is kept ``negative_ttl`` seconds (not at all
        when that is 0)."""
        seen: dict[bytes, ProviderRecord] = {}
        for r in records:
            if not isinstance(r, ProviderRecord):
                raise TypeError(f"records must be ProviderRecord, not {type(r).__name__}")
            if r.node_id == self.self_id:
                continue
            if r.node_id in seen:
                self.counters["duplicates"] += 1
                continue
            if self._quarantined is not None and not self._counts(r, now):
                self.counters["quarantined_dropped"] += 1
                continue
            seen[r.node_id] = r
        kept = sorted(seen.values(), key=lambda r: r.node_id)
        if len(kept) > self.max_providers:
            self.counters["truncated"] += len(kept) - self.max_providers
            kept = kept[: self.max_providers]
        key = (realm, procedure)
        self._remove(key)
        if not kept:
            self.counters["negative_puts"] += 1
            if self.negative_ttl == 0:
                return kept
            ttl = self.negative_ttl
        else:
            self.counters["puts"] += 1
            ttl = self.ttl
        while len(self._entries) >= self.max_entries:
            old = next(iter(self._entries))
            self._remove(old)
            self.counters["evicted"] += 1
        self._entries[key] = _Providers(tuple(kept), now, ttl)
        for r in kept:
            self._index.setdefault(r.node_id, set()).add(key)
        return kept

    def forget_node(self, node_id: bytes, now: float, ttl: float | None = None) -> int:
        """``node_id`` died or its link failed: drop it from every list (a list left empty
        is dropped, so the next call looks the DHT up again) and ignore its records in
        answers for ``ttl`` seconds (default ``quarantine``) — the records it had then: a
        record with a stamp this cache did not see listed for it is a new registration
        (the node restarted) and counts; when none was listed, every record of the node is
        ignored. Returns how many lists held it."""
        keys = self._index.pop(node_id, set())
        q = self._quarantined
        if q is not None:
            stamps = {r.stamp for key in keys for r in self._entries[key].records
                      if r.node_id == node_id and r.stamp}
            old = q.get(node_id, None, now=now)
            if old:  # it was forgotten before: keep ignoring what it had then
                stamps |= old
            elif old is not None:  # every record of the node was ignored: so it stays
                stamps = set()
            if len(stamps) > _MAX_STAMPS:
                # a node that keeps flapping: bounded, counted; a stale record whose stamp
                # was dropped counts again (one failed attempt, then failover), never worse
                self.counters["stamps_dropped"] += len(stamps) - _MAX_STAMPS
                stamps = set(sorted(stamps)[:_MAX_STAMPS])
            q.put(node_id, frozenset(stamps), ttl, now=now)
        for key in keys:
            e = self._entries[key]
            rest = tuple(r for r in e.records if r.node_id != node_id)
            if rest:
                e.records = rest
            else:
                del self._entries[key]
        self.counters["forgotten"] += len(keys)
        return len(keys)

    def _counts(self, r: ProviderRecord, now: float) -> bool:
        assert self._quarantined is not None
        stamps: frozenset[int] | None = self._quarantined.get(r.node_id, None, now=now)
        return stamps is None or _new_stamp(stamps, r)

    def is_new(self, r: ProviderRecord, now: float) -> bool:
        """``r`` is a registration its node made after it was forgotten (a stamp other than
        those listed for it then): the node restarted, whatever other tables still say."""
        q = self._quarantined
        if q is None:
            return False
        stamps: frozenset[int] | None = q.get(r.node_id, None, now=now)
        return stamps is not None and _new_stamp(stamps, r)

    def readmit(self, node_id: bytes, now: float) -> bool:
        """``node_id`` is reachable again (a new link to it came up): lift its quarantine,
        so that its records count in the next answer. True if it was quarantined."""
        q = self._quarantined
        if q is None or q.pop(node_id, None, now=now) is None:
            return False
        self.counters["readmitted"] += 1
        return True

    def drop(self, realm: str, procedure: str, node_id: bytes, now: float) -> bool:
        """``node_id`` answered that it has no provider of ``procedure`` (its record is
        stale): drop it from that list only; a list left empty becomes the negative answer
        (kept ``negative_ttl``, so a stale record costs one lookup and one attempt per
        ``negative_ttl``, not one per call). True if the list held it."""
        key = (realm, procedure)
        e = self._entries.get(key)
        if e is None:
            return False
        rest = tuple(r for r in e.records if r.node_id != node_id)
        if len(rest) == len(e.records):
            return False
        self.counters["dropped"] += 1
        if rest:
            e.records = rest
            keys = self._index.get(node_id)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._index[node_id]
        else:
            self._remove(key)
            if self.negative_ttl > 0:
                self._entries[key] = _Providers((), now, self.negative_ttl)
        return True

    def invalidate(self, realm: str, procedure: str) -> bool:
        """Drop one entry (the next call looks it up); True if there was one."""
        if self._remove((realm, procedure)):
            self.counters["invalidated"] += 1
            return True
        return False

    def _remove(self, key: tuple[str, str]) -> bool:
        e = self._entries.pop(key, None)
        if e is None:
            return False
        for r in e.records:
            keys = self._index.get(r.node_id)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._index[r.node_id]
        return True

    def stats(self) -> dict[str, Any]:
        q = self._quarantined
        return dict(self.counters, entries=len(self._entries), nodes=len(self._index),
                    quarantined=0 if q is None else len(q),
                    quarantine_evicted=0 if q is None else q.stats()["evictions"])


# -- the try-order ------------------------------------------------------------------------


class Selector:
    """The try-order of one call by strategy; latency figures for ``lowest_latency``."""

    def __init__(
        self,
        *,
        rng: random.Random | None = None,
        alpha: float = 0.3,
        failure_penalty: float = 10.0,
        max_keys: int = 10_000,
        max_nodes: int = 10_000,
    ) -> None:
        if not 0 < alpha <= 1:
            raise ValueError("alpha (the EWMA weight of a new sample) must be in (0, 1]")
        if not (math.isfinite(failure_penalty) and failure_penalty > 0):
            raise ValueError("failure_penalty must be a finite number of seconds > 0")
        if max_keys < 1 or max_nodes < 1:
            raise ValueError("max_keys and max_nodes must be >= 1")
        self.rng = rng if rng is not None else random.Random()
        self.alpha = alpha
        self.failure_penalty = failure_penalty
        self.max_keys = max_keys
        self.max_nodes = max_nodes
        self._rr: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._rtt: OrderedDict[bytes, float] = OrderedDict()  # node id -> EWMA seconds
        self.counters: dict[str, int] = {
            "orders": 0, "bad_strategy": 0, "bad_samples": 0, "observed": 0, "failed": 0,
            "rr_evicted": 0, "latency_evicted": 0,
        }

    def order(self, realm: str, procedure: str, strategy: str,
              candidates: Sequence[ProviderRecord]) -> list[ProviderRecord]:
        """Every candidate once, in the order to try them (a new list)."""
        try:
            _check_strategy(strategy)
        except ValueError:
            self.counters["bad_strategy"] += 1
            raise
        self.counters["orders"] += 1
        by_id = sorted(candidates, key=lambda r: r.node_id)
        if not by_id:
            return by_id
        if strategy == "first":
            return by_id
        if strategy == "random":
            return self.rng.sample(by_id, len(by_id))
        if strategy == "round_robin":
            key = (realm, procedure)
            n = self._rr.pop(key, 0)
            while len(self._rr) >= self.max_keys:
                self._rr.popitem(last=False)
                self.counters["rr_evicted"] += 1
            self._rr[key] = n + 1
            i = n % len(by_id)
            return by_id[i:] + by_id[:i]
        rtt = self._rtt  # lowest_latency: unmeasured (-1) first, then by EWMA; sort is stable
        return sorted(by_id, key=lambda r: rtt.get(r.node_id, -1.0))

    def observe(self, node_id: bytes, rtt_seconds: float) -> None:
        """A measured round trip (request sent -> answer) to ``node_id``."""
        if (isinstance(rtt_seconds, bool) or not isinstance(rtt_seconds, (int, float))
                or not math.isfinite(rtt_seconds) or rtt_seconds < 0):
            self.counters["bad_samples"] += 1
            raise ValueError(f"rtt_seconds must be a finite number >= 0, not {rtt_seconds!r}")
        self.counters["observed"] += 1
        self._sample(node_id, float(rtt_seconds))

    def failed(self, node_id: bytes) -> None:
        """A call to ``node_id`` failed: counts as a ``failure_penalty`` sample."""
        self.counters["failed"] += 1
        self._sample(node_id, self.failure_penalty)

    def forget(self, node_id: bytes) -> None:
        """Drop ``node_id``'s figure: it counts as never measured again (goes first)."""
        self._rtt.pop(node_id, None)

    def latency(self, node_id: bytes) -> float | None:
        """The EWMA round trip of ``node_id`` (None: never measured); does not touch LRU."""
        return self._rtt.get(node_id)

    def _sample(self, node_id: bytes, value: float) -> None:
        old = self._rtt.pop(node_id, None)
        while len(self._rtt) >= self.max_nodes:
            self._rtt.popitem(last=False)
            self.counters["latency_evicted"] += 1
        self._rtt[node_id] = value if old is None else old + self.alpha * (value - old)

    def stats(self) -> dict[str, Any]:
        return dict(self.counters, rr_keys=len(self._rr), nodes=len(self._rtt))


# -- result caching -----------------------------------------------------------------------


class ResultCache:
    """(realm, procedure, encoded args) -> encoded result, opt-in per registration (the
    provider record's ``cache_ttl``; 0 = not cached). A ``TTLCache``: per-entry TTL, LRU at
    ``max_entries`` (counted in ``evictions``). Results whose args + result exceed
    ``max_value_bytes`` are not cached (``too_large``); a ``cache_ttl`` above ``max_ttl``
    is cut to it."""

    def __init__(self, *, max_entries: int = 10_000, max_value_bytes: int = 1 << 16,
                 max_ttl: float = 3600.0) -> None:
        if max_entries < 1 or max_value_bytes < 0:
            raise ValueError("max_entries must be >= 1 and max_value_bytes >= 0")
        if not (math.isfinite(max_ttl) and max_ttl > 0):
            raise ValueError("max_ttl must be a finite number of seconds > 0")
        self.max_value_bytes = max_value_bytes
        self.max_ttl = max_ttl
        self._cache: TTLCache = TTLCache(max_entries, max_ttl)
        self.counters: dict[str, int] = {
            "hits": 0, "misses": 0, "stored": 0, "not_cached": 0, "too_large": 0,
            "evictions": 0,
        }

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, realm: str, procedure: str, args: bytes, now: float) -> bytes | None:
        if not isinstance(args, bytes):
            raise TypeError(f"args must be bytes (the encoded arguments), not "
                            f"{type(args).__name__}")
        hit: bytes | None = self._cache.get((realm, procedure, args), None, now=now)
        self.counters["hits" if hit is not None else "misses"] += 1
        return hit

    def put(self, realm: str, procedure: str, args: bytes, result: bytes, ttl: float,
            now: float) -> bool:
        """Keep ``result`` for ``ttl`` seconds (the record's ``cache_ttl``); False when it
        was not kept (ttl 0, too large)."""
        if not isinstance(args, bytes) or not isinstance(result, bytes):
            raise TypeError("args and result must be bytes")
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
            raise TypeError("ttl must be a number of seconds")
        if not math.isfinite(ttl) or ttl < 0:
            raise ValueError(f"ttl must be finite and >= 0, not {ttl!r}")
        if ttl == 0:
            self.counters["not_cached"] += 1
            return False
        if len(args) + len(result) > self.max_value_bytes:
            self.counters["too_large"] += 1
            return False
        before = self._cache.stats()["evictions"]
        self._cache.put((realm, procedure, args), result, min(float(ttl), self.max_ttl),
                        now=now)
        self.counters["evictions"] += self._cache.stats()["evictions"] - before
        self.counters["stored"] += 1
        return True

    def expire(self, now: float, budget: int = 1000) -> int:
        """Remove up to ``budget`` expired results (for a periodic task)."""
        return self._cache.expire(now, budget)

    def stats(self) -> dict[str, Any]:
        return dict(self.counters, entries=len(self._cache))


# -- one outgoing call ------------------------------------------------------------------


class CallPlan(Generic[T]):
    """The failover state of one outgoing call (``T``: usually ``ProviderRecord``).

    ``next_target(now)`` -> the provider to try (None: give up, see ``gave_up``); after a
    failed attempt ``on_failure(delivered, idempotent, now)`` -> True: call
    ``next_target`` again; False: give up. Before delivery the next provider is always
    tried; after delivery only for an idempotent procedure (pass the tried provider's
    ``idempotent``). At most ``max_attempts`` attempts, none started at or past
    ``deadline`` (``now`` may be omitted only without a deadline). ``gave_up``: None while
    going on, else ``"no_provider"`` (empty order), ``"delivered"`` (failed after delivery,
    not idempotent), ``"exhausted"`` (every provider tried), ``"max_attempts"``,
    ``"deadline"``. A success needs no call: the plan is simply dropped.
    """

    __slots__ = ("_in_attempt", "attempts", "counters", "deadline", "gave_up",
                 "max_attempts", "order")

    def __init__(self, order: Iterable[T], *, max_attempts: int = 3,
                 deadline: float | None = None) -> None:
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int):
            raise TypeError("max_attempts must be an int")
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if deadline is not None and not math.isfinite(deadline):
            raise ValueError("deadline must be finite (or None)")
        self.order: list[T] = list(order)
        self.max_attempts = max_attempts
        self.deadline = deadline
        self.attempts = 0
        self.gave_up: str | None = None
        self.counters: dict[str, int] = {
            "attempts": 0, "failed_before_delivery": 0, "failed_after_delivery": 0}
        self._in_attempt = False

    def remaining(self, now: float) -> float | None:
        """Seconds left before the deadline (>= 0), None without one: the timeout to give
        the request of this attempt."""
        return None if self.deadline is None else max(0.0, self.deadline - now)

    def next_target(self, now: float | None = None) -> T | None:
        """The provider to send the request to now, or None (``gave_up`` says why)."""
        if self._in_attempt:
            raise RuntimeError("an attempt is outstanding: report on_failure() first")
        if self.gave_up is None:
            self.gave_up = self._stop_reason(now)
        if self.gave_up is not None:
            return None
        target = self.order[self.attempts]
        self.attempts += 1
        self.counters["attempts"] += 1
        self._in_attempt = True
        return target

    def on_failure(self, delivered: bool, idempotent: bool, now: float | None = None) -> bool:
        """The attempt failed; ``delivered``: the request had left (it may have run).
        True: try ``next_target()``; False: give up."""
        if not self._in_attempt:
            raise RuntimeError("on_failure() without an outstanding attempt")
        self._in_attempt = False
        self.counters["failed_after_delivery" if delivered else "failed_before_delivery"] += 1
        if delivered and not idempotent:
            self.gave_up = "delivered"
        else:
            self.gave_up = self._stop_reason(now)
        return self.gave_up is None

    def _stop_reason(self, now: float | None) -> str | None:
        if not self.order:
            return "no_provider"
        if self.attempts >= len(self.order):
            return "exhausted"
        if self.attempts >= self.max_attempts:
            return "max_attempts"
        if self.deadline is not None:
            if now is None:
                raise TypeError("now= is needed for a plan with a deadline")
            if now >= self.deadline:
                return "deadline"
        return None

    def stats(self) -> dict[str, Any]:
        return dict(self.counters, gave_up=self.gave_up)
