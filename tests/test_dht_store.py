"""The DHT record store (macula.dht.store.RecordStore) against an obviously correct model.

The model is a dict (key, publisher) -> (value, deadline) that filters by ``now`` on every
read and checks the bounds by counting live entries; a hypothesis state machine drives both
with the same puts, gets, reaps and clock moves and compares every answer.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from macula.dht.store import RecordStore

KEYS = [bytes([i]) * 32 for i in range(4)]
PUBS = [bytes([0x80 + i]) * 32 for i in range(4)]


class Model:
    def __init__(self, max_keys: int, per_key: int, size: int, max_ttl: float) -> None:
        self.max_keys, self.per_key, self.size, self.max_ttl = max_keys, per_key, size, max_ttl
        self.data: dict[tuple[bytes, bytes], tuple[bytes, float]] = {}

    def live(self, now: float) -> dict[tuple[bytes, bytes], tuple[bytes, float]]:
        return {kp: vd for kp, vd in self.data.items() if vd[1] > now}

    def put(self, key: bytes, pub: bytes, value: bytes, ttl: float, now: float) -> str:
        if len(value) > self.size:
            return "size"
        if not (ttl > 0) or math.isinf(ttl):
            return "ttl"
        live = self.live(now)
        if (key, pub) not in live:
            keys = {k for k, _ in live}
            if key not in keys and len(keys) >= self.max_keys:
                return "keys"
            if sum(1 for k, _ in live if k == key) >= self.per_key:
                return "values_per_key"
        self.data[(key, pub)] = (value, now + min(ttl, self.max_ttl))
        return ""

    def get(self, key: bytes, now: float) -> list[tuple[bytes, bytes, float]]:
        return sorted((p, v, d - now) for (k, p), (v, d) in self.live(now).items() if k == key)


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store = RecordStore(max_keys=2, max_values_per_key=2, max_value_size=4,
                                 max_ttl=50.0)
        self.model = Model(2, 2, 4, 50.0)
        self.now = 0.0

    @rule(key=st.sampled_from(KEYS), pub=st.sampled_from(PUBS),
          value=st.binary(max_size=6),
          ttl=st.one_of(st.sampled_from([-1.0, 0.0, math.inf, math.nan, 100.0]),
                        st.integers(1, 30).map(float)))
    def put(self, key: bytes, pub: bytes, value: bytes, ttl: float) -> None:
        want = self.model.put(key, pub, value, ttl, self.now)
        assert self.store.put(key, pub, value, ttl, self.now) == want

    @rule(dt=st.one_of(st.integers(0, 20).map(float), st.floats(0.0, 20.0)))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule(budget=st.one_of(st.none(), st.integers(0, 3)))
    def reap(self, budget: int | None) -> None:
        before = len(self.store)
        n = self.store.reap(self.now, budget)
        assert len(self.store) == before - n
        if budget is not None:
            assert n <= budget

    @rule(key=st.sampled_from(KEYS))
    def get(self, key: bytes) -> None:
        assert sorted(self.store.get(key, self.now)) == self.model.get(key, self.now)

    @invariant()
    def never_serves_expired(self) -> None:
        for key in KEYS:
            assert all(ttl > 0 for _, _, ttl in self.store.get(key, self.now))

    @invariant()
    def counts_agree(self) -> None:
        live = self.model.live(self.now)
        assert len(self.store) >= len(live)  # expired values may wait for the reaper
        assert self.store.keys_held >= len({k for k, _ in live})

    @rule()
    def reap_all(self) -> None:
        self.store.reap(self.now)
        live = self.model.live(self.now)
        assert len(self.store) == len(live)
        assert self.store.keys_held == len({k for k, _ in live})


TestStoreMachine = StoreMachine.TestCase


def test_bounds_are_refused_counted_and_leave_the_store_unchanged() -> None:
    s = RecordStore(max_keys=1, max_values_per_key=1, max_value_size=3, max_ttl=10.0)
    k1, k2 = KEYS[0], KEYS[1]
    p1, p2 = PUBS[0], PUBS[1]
    assert s.put(k1, p1, b"abc", 5.0, now=0.0) == ""
    assert s.put(k1, p1, b"abcd", 5.0, now=0.0) == "size"
    assert s.put(k2, p1, b"x", 5.0, now=0.0) == "keys"
    assert s.put(k1, p2, b"x", 5.0, now=0.0) == "values_per_key"
    assert s.put(k1, p1, b"x", -5.0, now=0.0) == "ttl"
    assert s.put(b"short", p1, b"x", 5.0, now=0.0) == "key"
    assert s.get(k1, 1.0) == [(p1, b"abc", 4.0)]
    assert dict(s.refused) == {"size": 1, "keys": 1, "values_per_key": 1, "ttl": 1, "key": 1}
    assert s.put(k1, p1, b"new", 5.0, now=1.0) == ""  # the publisher's replacement
    assert s.get(k1, 1.0) == [(p1, b"new", 5.0)]
    # expired values never hold a bound
    assert s.put(k2, p2, b"y", 5.0, now=6.0) == ""
    assert s.get(k1, 6.0) == [] and s.get(k2, 6.0) == [(p2, b"y", 5.0)]
    # TTLs above max_ttl are clamped
    assert s.put(k2, p2, b"y", 1e9, now=6.0) == ""
    assert s.get(k2, 6.0) == [(p2, b"y", 10.0)]


def test_reap_removes_in_deadline_order_and_skips_replaced_entries() -> None:
    s = RecordStore()
    for i, pub in enumerate(PUBS):
        s.put(KEYS[0], pub, b"v", 10.0 + i, now=0.0)
    s.put(KEYS[0], PUBS[0], b"v2", 100.0, now=0.0)  # replaced: its old deadline is stale
    assert s.reap(11.5) == 1  # PUBS[1] (deadline 11); PUBS[0] lives on
    assert sorted(p for p, _, _ in s.get(KEYS[0], 11.5)) == sorted([PUBS[0], PUBS[2], PUBS[3]])
    assert s.reap(1000.0) == 3 and len(s) == 0 and s.keys_held == 0
    assert s.expired == 4


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="max_keys must be"):
        RecordStore(max_keys=0)
    with pytest.raises(ValueError, match="max_ttl must be"):
        RecordStore(max_ttl=0.0)


def test_heap_stays_bounded_under_republishing() -> None:
    s = RecordStore()
    for t in range(10_000):
        s.put(KEYS[0], PUBS[0], b"v", 60.0, now=float(t))
    assert len(s) == 1
    assert len(s._heap) <= 2 * len(s) + 1024 + 1
