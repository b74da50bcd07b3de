"""The TTL cache (macula.TTLCache) against its model.

tests/models/cache_model.py is the obviously-correct version; every test here either checks
an edge by hand (with a fake clock passed as ``now=``, or a ``clock=`` callable) or drives
the compiled cache and the model with the same random operations and compares every answer.
"""

from __future__ import annotations

import gc
import itertools
import math
import pickle
import time
import weakref
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from macula import TTLCache
from macula._ext import cache as cache_mod
from tests.gc_util import gc_disabled, traced_growth
from tests.models.cache_model import ModelTTLCache


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.t


def stats(c: TTLCache[Any, Any]) -> tuple[int, int, int, int, int]:
    s = c.stats()
    return (s["hits"], s["misses"], s["evictions"], s["expirations"], s["size"])


# ---------------------------------------------------------------------------------------------
# The API, edge by edge


def test_readme_example_and_exact_expiry_boundary() -> None:
    cache: TTLCache[str, list[str]] = TTLCache(max_size=10, default_ttl=60.0)
    cache.put("route", ["node-a"], now=0.0)
    assert cache.get("route", now=59.0) == ["node-a"]
    assert cache.ttl("route", now=59.0) == 1.0
    assert cache.get("route", now=math.nextafter(60.0, 0.0)) == ["node-a"]
    assert cache.get("route", now=60.0) is None  # now >= deadline: expired
    assert stats(cache) == (2, 1, 0, 1, 0)
    assert len(cache) == 0  # the expired entry found by get was removed


def test_get_default_miss_and_hit_counting() -> None:
    c: TTLCache[str, int] = TTLCache(4, 10.0)
    assert c.get("x", now=0.0) is None
    assert c.get("x", "dflt", now=0.0) == "dflt"
    c.put("x", 0, now=0.0)
    assert c.get("x", "dflt", now=1.0) == 0  # a falsy value is still a hit
    assert c.stats() == {
        "hits": 1,
        "misses": 2,
        "evictions": 0,
        "expirations": 0,
        "size": 1,
        "max_size": 4,
    }


def test_per_put_ttl_override_and_inf() -> None:
    c: TTLCache[str, str] = TTLCache(8, 10.0)
    c.put("short", "s", 1.5, now=100.0)
    c.put("long", "l", ttl=1000, now=100.0)  # an int ttl
    c.put("dflt", "d", now=100.0)
    c.put("forever", "f", ttl=math.inf, now=100.0)
    c.put("frac", "q", ttl=Fraction(1, 4), now=100.0)  # anything with __float__
    assert c.ttl("short", now=100.0) == 1.5
    assert c.ttl("long", now=100.0) == 1000.0
    assert c.ttl("dflt", now=100.0) == 10.0
    assert c.ttl("forever", now=1e300) == math.inf
    assert c.ttl("frac", now=100.0) == 0.25
    assert c.keys(now=101.5) == ["long", "dflt", "forever"]
    assert c.get("short", now=101.5) is None and c.get("dflt", now=110.0) is None
    assert c.get("long", now=1099.0) == "l" and c.get("forever", now=1e300) == "f"


def test_re_put_refreshes_value_deadline_and_mru_position() -> None:
    c: TTLCache[str, int] = TTLCache(3, 10.0)
    for i, k in enumerate("abc"):
        c.put(k, i, now=0.0)
    c.put("a", 99, now=5.0)
    assert c.keys(now=5.0) == ["b", "c", "a"]
    assert c.get("a", now=14.0) == 99  # deadline moved to 15
    assert c.get("b", now=14.0) is None
    c.put("c", 7, ttl=100.0, now=14.0)  # another lane
    c.put("c", 8, now=14.0)  # and back to the default one
    assert c.ttl("c", now=14.0) == 10.0 and c.get("c", now=23.0) == 8
    assert len(c) == 2 and c.stats()["evictions"] == 0


def test_re_put_of_an_expired_key_replaces_it() -> None:
    c: TTLCache[str, int] = TTLCache(3, 1.0)
    c.put("a", 1, now=0.0)
    c.put("a", 2, now=5.0)  # expired at 1.0, never removed: replaced (no expiration counted)
    assert c.get("a", now=5.5) == 2
    assert stats(c) == (1, 0, 0, 0, 1)


def test_lru_order_after_gets_and_eviction_order() -> None:
    c: TTLCache[int, str] = TTLCache(3, 100.0)
    for k in (1, 2, 3):
        c.put(k, str(k), now=0.0)
    assert c.get(1, now=1.0) == "1"  # 1 becomes the most recently used
    assert c.keys(now=1.0) == [2, 3, 1]
    c.put(4, "4", now=1.0)  # evicts 2, the least recently used
    assert c.keys(now=1.0) == [3, 1, 4]
    c.put(5, "5", now=1.0)
    assert c.items(now=1.0) == [(1, "1"), (4, "4"), (5, "5")]
    assert c.get(2, now=1.0) is None and c.get(3, now=1.0) is None
    assert c.stats()["evictions"] == 2
    # ttl(), `in`, keys() and items() do not move entries
    c.ttl(1, now=1.0)
    c.keys(now=1.0)
    assert c.keys(now=1.0) == [1, 4, 5]


def test_eviction_takes_the_lru_entry_even_when_another_has_expired() -> None:
    c: TTLCache[str, int] = TTLCache(2, 100.0)
    c.put("old", 1, now=0.0)
    c.put("dead", 2, ttl=1.0, now=0.0)
    c.put("new", 3, now=50.0)  # "old" is the LRU entry: evicted; "dead" stays until swept
    assert c.keys(now=50.0) == ["new"] and len(c) == 2
    assert stats(c) == (0, 0, 1, 0, 2)
    assert c.expire(now=50.0) == 1 and len(c) == 1


def test_max_size_one() -> None:
    c: TTLCache[str, int] = TTLCache(1, 1.0)
    c.put("a", 1, now=0.0)
    c.put("b", 2, now=0.0)
    assert c.keys(now=0.0) == ["b"] and stats(c) == (0, 0, 1, 0, 1)
    c.put("b", 3, now=0.0)
    assert c.get("b", now=0.0) == 3


def test_pop() -> None:
    c: TTLCache[str, int] = TTLCache(4, 10.0)
    c.put("a", 1, now=0.0)
    c.put("b", 2, now=0.0)
    assert c.pop("a", now=1.0) == 1
    assert c.pop("a", now=1.0) is None and c.pop("a", "gone", now=1.0) == "gone"
    assert c.pop("b", "gone", now=10.0) == "gone"  # expired: removed, not returned
    assert len(c) == 0 and stats(c) == (0, 0, 0, 1, 0)


def test_contains_uses_the_clock_and_removes_expired() -> None:
    clock = FakeClock(0.0)
    c: TTLCache[str, int] = TTLCache(4, 10.0, clock=clock)
    c.put("a", 1)
    assert "a" in c and "b" not in c
    clock.t = 9.999
    assert "a" in c
    clock.t = 10.0
    assert "a" not in c
    assert len(c) == 0 and stats(c) == (0, 0, 0, 1, 0)
    assert c.clock is clock


def test_clock_callable_is_used_for_every_method_without_now() -> None:
    clock = FakeClock(100.0)
    c: TTLCache[str, int] = TTLCache(4, 5.0, clock=clock)
    c.put("a", 1)
    c.put("b", 2, 1.0)
    clock.t = 100.5
    assert c.get("a") == 1 and c.ttl("a") == 4.5
    assert c.keys() == ["b", "a"] and c.items() == [("b", 2), ("a", 1)]
    clock.t = 101.0
    assert c.get("b") is None and c.expire() == 0
    clock.t = 106.0
    assert c.pop("a") is None
    assert clock.calls == 9
    c.put("c", 3, now=0.0)  # now= wins over the clock
    assert clock.calls == 9 and c.ttl("c", now=1.0) == 4.0


def test_default_clock_agrees_with_time_monotonic() -> None:
    for _ in range(1000):
        before = time.monotonic()
        ours = cache_mod.monotonic()
        after = time.monotonic()
        assert before <= ours <= after
    c: TTLCache[str, int] = TTLCache(4, 30.0)
    start = time.monotonic()
    c.put("k", 1)
    left = c.ttl("k")
    assert left is not None and 0.0 < left <= 30.0
    assert 30.0 - left <= time.monotonic() - start + 1e-9
    assert c.get("k") == 1 and "k" in c and c.keys() == ["k"]
    c.put("gone", 2, ttl=1e-9)
    time.sleep(0.001)
    assert c.get("gone") is None  # expired by the real clock
    # an entry put at a fake time 0.0 is long expired by the real clock
    c.put("fake", 3, now=0.0)
    assert "fake" not in c


def test_expire_budget_semantics_and_return_value() -> None:
    c: TTLCache[int, int] = TTLCache(100, 10.0)
    for i in range(10):
        c.put(i, i, now=float(i))  # deadlines 10 .. 19
    c.put(100, 0, ttl=1.0, now=5.0)  # deadline 6: another lane, expires first
    c.put(101, 0, ttl=1.0, now=12.0)  # deadline 13
    assert c.expire(now=5.9) == 0
    assert c.expire(now=14.0, budget=0) == 0
    assert c.expire(now=14.0, budget=2) == 2  # 100 (deadline 6), then 0 (deadline 10)
    assert 100 not in c.keys(now=0.0) and 0 not in c.keys(now=0.0)
    assert c.expire(14.0, 3) == 3  # 1, 2, 3 (deadlines 11, 12, 13) ...
    assert c.keys(now=0.0) == [4, 5, 6, 7, 8, 9, 101]  # ... 101 (also 13, put later) is left
    assert c.expire(14.0, 100) == 2  # 101 and 4; only what has expired
    assert c.expire(now=14.0) == 0
    assert len(c) == 5 and c.stats()["expirations"] == 7
    # equal deadlines: earliest put first
    d: TTLCache[str, int] = TTLCache(10, 5.0)
    d.put("x", 1, now=0.0)
    d.put("y", 1, ttl=10.0, now=-5.0)
    d.put("z", 1, now=0.0)
    assert d.expire(now=5.0, budget=1) == 1 and d.keys(now=0.0) == ["y", "z"]
    assert d.expire(now=5.0, budget=1) == 1 and d.keys(now=0.0) == ["z"]


def test_expire_with_a_clock_that_goes_back() -> None:
    c: TTLCache[str, int] = TTLCache(10, 10.0)
    c.put("late", 1, now=100.0)  # deadline 110
    c.put("early", 2, now=0.0)  # deadline 10: sorted in before "late"
    c.put("mid", 3, now=50.0)
    assert c.expire(now=60.0, budget=1) == 1
    assert c.keys(now=0.0) == ["late", "mid"]
    assert c.expire(now=200.0, budget=5) == 2 and len(c) == 0


def test_len_counts_expired_entries_until_removed() -> None:
    c: TTLCache[int, int] = TTLCache(10, 1.0)
    for i in range(5):
        c.put(i, i, now=0.0)
    assert len(c) == 5  # all expired at 1.0, none removed yet
    assert c.keys(now=2.0) == [] and len(c) == 5  # keys() skips, does not remove
    assert c.get(0, now=2.0) is None and len(c) == 4
    assert c.expire(now=2.0) == 4 and len(c) == 0


def test_clear_keeps_counters_and_the_cache_works_after() -> None:
    c: TTLCache[int, int] = TTLCache(3, 1.0)
    for i in range(5):
        c.put(i, i, ttl=float(i + 1), now=0.0)
    c.get(4, now=0.0)
    c.clear()
    assert len(c) == 0 and c.keys(now=0.0) == [] and c.expire(now=100.0) == 0
    assert stats(c) == (1, 0, 2, 0, 0)
    for i in range(5):
        c.put(i, i, now=0.0)
    assert c.keys(now=0.0) == [2, 3, 4]


def test_properties_and_repr() -> None:
    c: TTLCache[str, int] = TTLCache(7, 2.5)
    assert (c.max_size, c.default_ttl, c.clock) == (7, 2.5, None)
    c.put("a", 1, now=0.0)
    assert repr(c) == "<TTLCache size=1 max_size=7 default_ttl=2.5>"
    assert TTLCache[str, int] is not None  # subscriptable for annotations
    with pytest.raises(TypeError):
        pickle.dumps(c)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="max_size must be an int >= 1, not 0"):
        TTLCache(0, 1.0)
    with pytest.raises(ValueError, match="max_size must be an int >= 1, not -5"):
        TTLCache(-5, 1.0)
    for bad in (1.0, "3", None, True):
        with pytest.raises(TypeError, match=f"max_size must be an int, not {type(bad).__name__}"):
            TTLCache(bad, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_size must be at most"):
        TTLCache(2**64, 1.0)
    for bad_ttl in (0, 0.0, -1.0, math.nan, -math.inf):
        with pytest.raises(ValueError, match="default_ttl must be a positive number of seconds"):
            TTLCache(1, bad_ttl)
    for bad_type in ("1", None, True, [1]):
        with pytest.raises(TypeError, match="default_ttl must be a number of seconds, not"):
            TTLCache(1, bad_type)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="default_ttl is too large"):
        TTLCache(1, 10**400)
    with pytest.raises(TypeError, match="clock must be a callable or None, not float"):
        TTLCache(1, 1.0, clock=1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        TTLCache(1, 1.0, None)  # type: ignore[call-arg]  # clock is keyword-only
    assert TTLCache(1, math.inf).default_ttl == math.inf


def test_bad_arguments_leave_the_cache_unchanged() -> None:
    c: TTLCache[Any, int] = TTLCache(2, 10.0)
    c.put("a", 1, now=0.0)
    c.put("b", 2, now=0.0)
    before = (c.items(now=0.0), c.stats())
    with pytest.raises(TypeError, match="unhashable type"):
        c.put(["list"], 3, now=0.0)
    with pytest.raises(TypeError, match="unhashable type"):
        c.get({}, now=0.0)
    with pytest.raises(TypeError, match="unhashable type"):
        c.pop(set(), now=0.0)
    with pytest.raises(TypeError, match="unhashable type"):
        assert [] in c
    with pytest.raises(TypeError, match="unhashable type"):
        c.ttl(bytearray(), now=0.0)
    for bad_ttl in (0, -1.0, math.nan):
        with pytest.raises(ValueError, match="ttl must be a positive number of seconds"):
            c.put("c", 3, bad_ttl, now=0.0)
    with pytest.raises(TypeError, match="ttl must be a number of seconds, not str"):
        c.put("c", 3, "5", now=0.0)  # type: ignore[arg-type]
    for bad_now in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="now must be a finite number of seconds"):
            c.get("a", now=bad_now)
        with pytest.raises(ValueError, match="now must be a finite number of seconds"):
            c.put("c", 3, now=bad_now)
    with pytest.raises(TypeError, match="now must be a number of seconds, not str"):
        c.get("a", now="0")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="now must be a number of seconds, not bool"):
        c.expire(now=True)
    with pytest.raises(ValueError, match="budget must be an int >= 0, not -1"):
        c.expire(now=0.0, budget=-1)
    with pytest.raises(TypeError, match="budget must be an int, not float"):
        c.expire(now=0.0, budget=1.0)  # type: ignore[arg-type]
    assert (c.items(now=0.0), c.stats()) == before
    # a failed put with a new ttl leaves no lane behind: expire still sees only real entries
    c.put("c", 3, now=0.0)
    assert c.keys(now=0.0) == ["b", "c"] and c.expire(now=100.0) == 2


def test_clock_returning_bad_values() -> None:
    for value, exc, msg in (
        ("soon", TypeError, "clock\\(\\) must return a number of seconds, not str"),
        (math.nan, ValueError, "clock\\(\\) must return a finite number of seconds"),
    ):
        c: TTLCache[str, int] = TTLCache(2, 1.0, clock=lambda value=value: value)  # type: ignore[misc]
        with pytest.raises(exc, match=msg):
            c.put("a", 1)
        with pytest.raises(exc, match=msg):
            c.get("a")
        assert len(c) == 0
    c = TTLCache(2, 1.0, clock=lambda: 1)  # an int is fine
    c.put("a", 1)
    assert c.ttl("a") == 1.0


class EvilKey:
    """A key whose __eq__ calls back into the cache (only on a hash collision)."""

    def __init__(self, cache: TTLCache[Any, Any], name: str) -> None:
        self.cache = cache
        self.name = name

    def __hash__(self) -> int:
        return 42

    def __eq__(self, other: object) -> bool:
        self.cache.put("intruder", 0, now=0.0)
        return isinstance(other, EvilKey) and other.name == self.name


def test_reentry_from_a_key_eq_is_refused_and_the_cache_stays_consistent() -> None:
    c: TTLCache[Any, int] = TTLCache(2, 10.0)
    first = EvilKey(c, "a")
    c.put(first, 1, now=0.0)  # no collision yet: no __eq__ call
    with pytest.raises(RuntimeError, match=r"TTLCache.put\(\) called while the cache is"):
        c.put(EvilKey(c, "b"), 2, now=0.0)
    assert len(c) == 1 and c.keys(now=0.0) == [first]
    # a lookup may run user code that changes the cache: allowed (nothing is half done)
    assert c.get(EvilKey(c, "a"), now=0.0) == 1
    assert c.keys(now=0.0) == ["intruder", first]
    assert c.expire(now=20.0) == 2 and len(c) == 0


def test_finalisers_of_dropped_values_may_use_the_cache() -> None:
    c: TTLCache[str, Any] = TTLCache(1, 10.0)
    log: list[str] = []

    class Noisy:
        def __init__(self, name: str) -> None:
            self.name = name

        def __del__(self) -> None:
            log.append(self.name)
            c.put("from-del-" + self.name, None, now=0.0)

    c.put("a", Noisy("a"), now=0.0)
    c.put("b", 1, now=0.0)  # evicts "a": its finaliser puts (evicting "b")
    assert log == ["a"] and c.keys(now=0.0) == ["from-del-a"]
    c.put("c", Noisy("c"), now=0.0)
    assert c.pop("c", now=0.0) is not None  # the returned value dies here
    assert log == ["a", "c"] and c.keys(now=0.0) == ["from-del-c"]
    assert c.stats()["evictions"] == 3


# ---------------------------------------------------------------------------------------------
# Memory: entries are released, cycles are collected


class Payload:
    pass


def test_values_are_released_on_every_removal() -> None:
    box: list[TTLCache[str, Payload]] = [TTLCache(2, 10.0)]
    c = box[0]
    refs = []

    def put(key: str, ttl: float | None = None) -> None:
        p = Payload()
        refs.append(weakref.ref(p))
        box[0].put(key, p, ttl, now=0.0)

    put("evicted")
    put("popped")
    put("expired", ttl=1.0)  # evicts "evicted"
    assert refs[0]() is None
    c.pop("popped", now=0.0)
    assert refs[1]() is None
    assert c.expire(now=5.0) == 1 and refs[2]() is None
    put("replaced")
    put("replaced")
    assert refs[3]() is None
    put("got-expired", ttl=1.0)
    assert c.get("got-expired", now=5.0) is None and refs[5]() is None
    put("cleared")
    c.clear()
    assert all(r() is None for r in refs)
    put("last")
    del c
    box.clear()
    assert refs[-1]() is None  # no cycle among entries: freed without the collector


def test_cycles_through_values_and_the_clock_are_collected() -> None:
    class Holder:
        cache: Any

    def make() -> tuple[weakref.ref[Any], weakref.ref[Any]]:
        holder = Holder()
        c: TTLCache[str, Any] = TTLCache(10, 10.0, clock=lambda: 0.0 if holder else 1.0)
        holder.cache = c  # cache -> clock -> holder -> cache
        inner = Holder()
        inner.cache = c
        c.put("self", inner, now=0.0)  # cache -> dict -> entry -> inner -> cache
        c.put("x", Payload(), now=0.0)
        return weakref.ref(c), weakref.ref(inner)

    with gc_disabled():
        ref_cache, ref_inner = make()
        assert ref_cache() is not None  # kept alive by the cycles alone
        gc.collect()
        assert ref_cache() is None and ref_inner() is None


def test_no_growth_over_many_cycles() -> None:
    c: TTLCache[str, bytes] = TTLCache(100, 1.0)
    keys = [f"k{i}" for i in range(300)]
    clock = itertools.count()

    def cycle() -> None:
        t = float(next(clock))  # one second later each cycle
        for i, k in enumerate(keys):
            c.put(k, b"v", ttl=1.0 + (i % 3), now=t)
            c.get(keys[i // 2], now=t)
        c.expire(now=t + 2.5, budget=50)
        c.pop(keys[0], now=t)

    grown = traced_growth(cycle, warmup=20, settle=1, rounds=200)
    assert grown < 10_000, grown


# ---------------------------------------------------------------------------------------------
# Random operations against the model

KEYS = st.sampled_from(["a", "b", "c", "d", "e", "f", 1, 2, (3, "t")])
TTLS = st.one_of(st.none(), st.sampled_from([0.5, 1.0, 3.0, 10.0, math.inf]))


class CacheMachine(RuleBasedStateMachine):
    """put / get / pop / contains / len / expire / keys / items / ttl / stats / clear, with a
    fake clock that mostly moves forward (sometimes back), on the cache and the model."""

    @initialize(max_size=st.integers(1, 6), default_ttl=st.sampled_from([1.0, 2.5, 10.0]))
    def start(self, max_size: int, default_ttl: float) -> None:
        self.clock = FakeClock(1000.0)
        self.cache: TTLCache[Any, Any] = TTLCache(max_size, default_ttl, clock=self.clock)
        self.model = ModelTTLCache(max_size, default_ttl)

    @property
    def now(self) -> float:
        return self.clock.t

    @rule(dt=st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.5, 3.0, 7.0]))
    def advance(self, dt: float) -> None:
        self.clock.t += dt

    @rule(dt=st.sampled_from([0.5, 2.0]))
    def go_back(self, dt: float) -> None:
        self.clock.t -= dt

    @rule(key=KEYS, value=st.integers(), ttl=TTLS, explicit=st.booleans())
    def put(self, key: Any, value: int, ttl: float | None, explicit: bool) -> None:
        self.model.put(key, value, ttl, self.now)
        if explicit:
            self.cache.put(key, value, ttl, now=self.now)
        else:
            self.cache.put(key, value, ttl)

    @rule(key=KEYS)
    def get(self, key: Any) -> None:
        assert self.cache.get(key, "miss") == self.model.get(key, "miss", self.now)

    @rule(key=KEYS)
    def pop(self, key: Any) -> None:
        assert self.cache.pop(key, "gone", now=self.now) == self.model.pop(key, "gone", self.now)

    @rule(key=KEYS)
    def contains(self, key: Any) -> None:
        assert (key in self.cache) == self.model.contains(key, self.now)

    @rule(key=KEYS)
    def ttl(self, key: Any) -> None:
        assert self.cache.ttl(key, now=self.now) == self.model.ttl(key, self.now)

    @rule(budget=st.integers(0, 4))
    def expire(self, budget: int) -> None:
        assert self.cache.expire(self.now, budget) == self.model.expire(self.now, budget)

    @rule()
    def keys_and_items(self) -> None:
        assert self.cache.keys() == self.model.keys(self.now)
        assert self.cache.items(now=self.now) == self.model.items(self.now)

    @precondition(lambda self: len(self.model) > 0)
    @rule()
    def clear(self) -> None:
        self.cache.clear()
        self.model.clear()

    @rule(bad=st.sampled_from([[], {}, set()]))
    def unhashable(self, bad: Any) -> None:
        with pytest.raises(TypeError):
            self.cache.put(bad, 1)

    @invariant()
    def same_state(self) -> None:
        if not hasattr(self, "cache"):
            return
        assert len(self.cache) == len(self.model)
        assert self.cache.stats() == self.model.stats()
        # every entry held, expired or not, in LRU order (a time before every put)
        assert self.cache.keys(now=-1e9) == self.model.order


TestCacheMachine = CacheMachine.TestCase
