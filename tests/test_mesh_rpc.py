"""RPC across nodes, sans-IO (fake clock): provider records on the wire, the provider cache,
the try-order of each strategy, result caching and the failover rules of a call."""

from __future__ import annotations

import itertools
import math
import random

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from macula.mesh.rpc import (
    STRATEGIES,
    CallPlan,
    ProviderCache,
    ProviderRecord,
    ResultCache,
    Selector,
    agreed_strategy,
    decode_provider,
    encode_provider,
)

SELF = b"\x00" * 32


def nid(i: int) -> bytes:
    return bytes([i]) * 32


def rec(i: int, **kw: object) -> ProviderRecord:
    return ProviderRecord(nid(i), (f"10.0.0.{i}", 4433), **kw)  # type: ignore[arg-type]


# -- records ----------------------------------------------------------------------------


def test_records_round_trip_through_the_wire_form() -> None:
    for r in (rec(1), ProviderRecord(nid(2), None, "lowest_latency", True, 2.5),
              ProviderRecord(nid(3), ("h", 1), "first", False, 0),
              ProviderRecord(nid(5), None, "first", False, 0, (nid(6), ("relay", 7))),
              ProviderRecord(nid(7), ("h", 2), "random", True, 0, None, 2**64 - 1)):
        assert decode_provider(encode_provider(r)) == r
    # an int cache_ttl from another implementation decodes as a float
    raw = msgspec.msgpack.encode([nid(4), ["h", 9], "random", True, 7])
    assert decode_provider(raw) == ProviderRecord(nid(4), ("h", 9), "random", True, 7.0)
    # trailing fields of a newer version are ignored
    raw = msgspec.msgpack.encode([nid(4), None, "first", False, 0.0, None, 9, "future"])
    assert decode_provider(raw) == ProviderRecord(nid(4), None, "first", False, 0.0, None, 9)


@pytest.mark.parametrize("value", [
    [b"\x01" * 31, None, "first", False, 0.0],  # short node id
    [b"\x01" * 33, None, "first", False, 0.0],  # long node id
    ["x" * 32, None, "first", False, 0.0],  # node id not bytes
    [nid(1), None, "fastest", False, 0.0],  # unknown strategy
    [nid(1), None, "first", False, -1.0],  # negative ttl
    [nid(1), None, "first", False, math.nan],
    [nid(1), None, "first", False, math.inf],
    [nid(1), None, "first", False, 0.0, [b"\x01" * 31, ["h", 1]]],  # short relay id
    [nid(1), None, "first", False, 0.0, [nid(2), ["h", 0]]],  # bad relay port
    [nid(1), None, "first", 1, 0.0],  # idempotent not a bool
    [nid(1), ["h", 0], "first", False, 0.0],  # port 0
    [nid(1), ["h", 70000], "first", False, 0.0],  # port out of range
    [nid(1), ["", 5], "first", False, 0.0],  # empty host
    [nid(1), ["h"], "first", False, 0.0],  # endpoint not a pair
    [nid(1), None, "first", False],  # too short
    [nid(1), None, "first", False, 0.0, None, -1],  # negative stamp
    [nid(1), None, "first", False, 0.0, None, "s"],  # stamp not an int
    {"node_id": nid(1)},  # a map, not an array
])
def test_malformed_records_decode_to_none(value: object) -> None:
    assert decode_provider(msgspec.msgpack.encode(value)) is None


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x95", b"garbage bytes", b"\x00"])
def test_garbage_bytes_decode_to_none(data: bytes) -> None:
    assert decode_provider(data) is None


def test_a_bad_record_is_refused_at_construction_with_the_rule() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        ProviderRecord(b"x", None)
    with pytest.raises(ValueError, match="round_robin, random, first, lowest_latency"):
        ProviderRecord(nid(1), None, "fastest")
    with pytest.raises(ValueError, match=">= 0"):
        ProviderRecord(nid(1), None, cache_ttl=-0.5)
    with pytest.raises(TypeError, match="idempotent"):
        ProviderRecord(nid(1), None, idempotent="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="port"):
        ProviderRecord(nid(1), ("h", True))
    for bad in (-1, 2**64, True):
        with pytest.raises(ValueError, match="stamp"):
            ProviderRecord(nid(1), None, stamp=bad)


def test_agreed_strategy_is_the_majority_then_the_lowest_node_id() -> None:
    rs = [rec(5, strategy="first"), rec(2, strategy="random"), rec(9, strategy="first")]
    assert agreed_strategy(rs) == "first"
    tie = [rec(5, strategy="first"), rec(2, strategy="random")]
    assert agreed_strategy(tie) == agreed_strategy(tie[::-1]) == "random"
    with pytest.raises(ValueError):
        agreed_strategy([])


# -- the provider cache -----------------------------------------------------------------


def test_the_cache_answers_for_ttl_seconds_then_asks_for_a_lookup() -> None:
    c = ProviderCache(self_id=SELF, ttl=30.0)
    assert c.get("r", "p", now=0) is None
    kept = c.put("r", "p", [rec(3), rec(1), rec(3, strategy="first"), ProviderRecord(SELF, None)],
                 now=0)
    assert kept == [rec(1), rec(3)]  # own id and the duplicate dropped, sorted by id
    assert c.get("r", "p", now=29.9) == [rec(1), rec(3)]
    assert c.get("r", "other", now=1) is None
    assert c.get("r2", "p", now=1) is None
    assert c.get("r", "p", now=30.0) is None  # expired at fetched_at + ttl
    assert c.get("r", "p", now=1) is None  # and removed
    s = c.stats()
    assert (s["hits"], s["expired"], s["duplicates"], s["entries"]) == (1, 1, 1, 0)


def test_the_returned_list_is_a_copy() -> None:
    c = ProviderCache(self_id=SELF)
    c.put("r", "p", [rec(1)], now=0)
    got = c.get("r", "p", now=0)
    assert got is not None
    got.clear()
    assert c.get("r", "p", now=0) == [rec(1)]


def test_an_empty_answer_is_kept_negative_ttl_seconds() -> None:
    c = ProviderCache(self_id=SELF, negative_ttl=2.0)
    assert c.put("r", "p", [ProviderRecord(SELF, None)], now=0) == []
    assert c.get("r", "p", now=1.9) == []  # NO_PROVIDER at once, no lookup
    assert c.get("r", "p", now=2.0) is None
    off = ProviderCache(self_id=SELF, negative_ttl=0)
    off.put("r", "p", [], now=0)
    assert off.get("r", "p", now=0) is None
    assert off.counters["negative_puts"] == 1


def test_the_cache_is_bounded_lru() -> None:
    c = ProviderCache(self_id=SELF, max_entries=2)
    c.put("r", "a", [rec(1)], now=0)
    c.put("r", "b", [rec(2)], now=0)
    assert c.get("r", "a", now=1) is not None  # a is now the most recently used
    c.put("r", "c", [rec(3)], now=1)
    assert len(c) == 2
    assert c.get("r", "b", now=1) is None  # b was evicted
    assert c.get("r", "a", now=1) == [rec(1)] and c.get("r", "c", now=1) == [rec(3)]
    assert c.counters["evicted"] == 1
    c.put("r", "c", [rec(4)], now=2)  # replacing an entry evicts nothing
    assert c.counters["evicted"] == 1
    assert c.stats()["nodes"] == 2  # the reverse index holds nodes 1 and 4 only


def test_max_providers_truncates_by_node_id() -> None:
    c = ProviderCache(self_id=SELF, max_providers=2)
    assert c.put("r", "p", [rec(9), rec(3), rec(5)], now=0) == [rec(3), rec(5)]
    assert c.counters["truncated"] == 1


def test_forget_node_drops_it_everywhere_and_quarantines_it() -> None:
    c = ProviderCache(self_id=SELF, quarantine=5.0)
    c.put("r", "a", [rec(1), rec(2)], now=0)
    c.put("r", "b", [rec(2)], now=0)
    c.put("s", "a", [rec(3)], now=0)
    assert c.forget_node(nid(2), now=1) == 2
    assert c.get("r", "a", now=1) == [rec(1)]
    assert c.get("r", "b", now=1) is None  # left empty: dropped, look the DHT up again
    assert c.get("s", "a", now=1) == [rec(3)]
    # the DHT still has node 2's record: ignored while quarantined
    assert c.put("r", "b", [rec(2)], now=2) == []
    assert c.get("r", "b", now=2) == []  # the negative answer
    assert c.put("r", "b", [rec(2)], now=6.0) == [rec(2)]  # quarantine over
    assert c.forget_node(nid(7), now=7) == 0
    s = c.stats()
    assert (s["forgotten"], s["quarantined_dropped"]) == (2, 1)
    no_q = ProviderCache(self_id=SELF, quarantine=0)
    no_q.put("r", "a", [rec(1)], now=0)
    no_q.forget_node(nid(1), now=0)
    assert no_q.put("r", "a", [rec(1)], now=0) == [rec(1)]
    small = ProviderCache(self_id=SELF, max_quarantined=1)
    small.forget_node(nid(1), now=0)
    small.forget_node(nid(2), now=0)  # the quarantine is bounded: node 1 leaves it
    assert small.put("r", "a", [rec(1), rec(2)], now=0) == [rec(1)]
    assert small.stats()["quarantine_evicted"] == 1


def test_a_forgotten_nodes_new_registration_counts_its_old_records_do_not() -> None:
    """A node that died and restarted advertises with new stamps: those count at once,
    while the records it had when it was forgotten (alive in the DHT until their TTL) and
    unstamped ones stay out for the quarantine."""
    c = ProviderCache(self_id=SELF, quarantine=5.0)
    old_p, old_q = rec(2, stamp=100), rec(2, stamp=101)
    c.put("r", "p", [rec(1), old_p], now=0)
    c.put("r", "q", [old_q], now=0)
    c.forget_node(nid(2), now=1, ttl=30.0)
    new_p = rec(2, stamp=200)
    assert not c.is_new(old_p, now=2) and c.is_new(new_p, now=2)
    assert not c.is_new(rec(2, stamp=0), now=2)  # unstamped (an older node): not known new
    assert not c.is_new(rec(1, stamp=5), now=2)  # not forgotten at all
    assert c.put("r", "p", [rec(1), old_p], now=2) == [rec(1)]
    assert c.put("r", "p", [rec(1), new_p], now=2) == [rec(1), new_p]
    assert c.put("r", "q", [old_q], now=2) == []
    assert c.put("r", "q", [rec(2)], now=2) == []  # stamp 0 while quarantined
    # it dies again: what it had the first time stays out too, and so does new_p
    c.forget_node(nid(2), now=3, ttl=30.0)
    assert c.put("r", "p", [old_p, new_p], now=4) == []
    assert c.put("r", "p", [rec(2, stamp=300)], now=4) == [rec(2, stamp=300)]
    assert c.put("r", "q", [old_q], now=33.0) == [old_q]  # the given ttl, not quarantine
    # a node forgotten with nothing listed: every record of it is out
    c.forget_node(nid(3), now=40)
    assert c.put("r", "z", [rec(3, stamp=7)], now=41) == []
    assert not c.is_new(rec(3, stamp=7), now=41)
    c.forget_node(nid(3), now=42)  # and stays so when forgotten again
    c.put("r", "y", [rec(4)], now=42)
    assert c.put("r", "z", [rec(3, stamp=8)], now=43) == []


def test_a_node_that_links_up_again_is_readmitted_at_once() -> None:
    c = ProviderCache(self_id=SELF, quarantine=5.0)
    c.put("r", "p", [rec(1), rec(2)], now=0)
    c.forget_node(nid(2), now=1)
    assert c.put("r", "p", [rec(1), rec(2)], now=2) == [rec(1)]  # quarantined
    assert c.readmit(nid(2), now=2) is True
    assert c.put("r", "p", [rec(1), rec(2)], now=2) == [rec(1), rec(2)]
    assert c.readmit(nid(2), now=3) is False  # not quarantined any more
    c.forget_node(nid(3), now=3)
    assert c.readmit(nid(3), now=9) is False  # its quarantine had run out
    assert c.stats()["readmitted"] == 1


def test_a_stale_record_is_dropped_from_its_list_only() -> None:
    """A node answered NO_PROVIDER for one procedure: it stays in the others' lists and is
    not quarantined; a list it leaves empty is the negative answer for negative_ttl."""
    c = ProviderCache(self_id=SELF, negative_ttl=0.5)
    c.put("r", "p", [rec(1), rec(2)], now=0)
    c.put("r", "q", [rec(2)], now=0)
    c.put("r", "s", [rec(2)], now=0)
    assert c.drop("r", "p", nid(2), now=1) is True
    assert c.get("r", "p", now=1) == [rec(1)]
    assert c.get("r", "q", now=1) == [rec(2)]
    assert c.drop("r", "q", nid(2), now=1) is True
    assert c.get("r", "q", now=1.4) == []  # NO_PROVIDER without a lookup...
    assert c.get("r", "q", now=1.5) is None  # ...for negative_ttl
    assert c.put("r", "q", [rec(2)], now=2) == [rec(2)]  # a new answer takes it: no quarantine
    assert c.drop("r", "p", nid(2), now=2) is False  # not in that list any more
    assert c.drop("r", "nothing", nid(2), now=2) is False
    c.forget_node(nid(2), now=3)  # the reverse index still knew where it was listed
    assert c.get("r", "s", now=3) is None and c.get("r", "q", now=3) is None
    assert c.stats()["dropped"] == 2


def test_invalidate_and_bad_input() -> None:
    c = ProviderCache(self_id=SELF)
    c.put("r", "p", [rec(1)], now=0)
    assert c.invalidate("r", "p") is True
    assert c.invalidate("r", "p") is False
    assert c.get("r", "p", now=0) is None
    assert c.counters["invalidated"] == 1 and c.stats()["nodes"] == 0
    with pytest.raises(TypeError, match="ProviderRecord"):
        c.put("r", "p", [b"raw"], now=0)  # type: ignore[list-item]
    with pytest.raises(ValueError):
        ProviderCache(self_id=SELF, ttl=0)
    with pytest.raises(ValueError):
        ProviderCache(self_id=SELF, max_entries=0)


# -- the try-order ----------------------------------------------------------------------


def test_round_robin_rotates_per_procedure() -> None:
    sel = Selector()
    cands = [rec(3), rec(1), rec(2)]
    firsts = [sel.order("r", "p", "round_robin", cands)[0].node_id for _ in range(6)]
    assert firsts == [nid(1), nid(2), nid(3)] * 2
    assert sel.order("r", "p", "round_robin", cands) == [rec(1), rec(2), rec(3)]
    assert sel.order("r", "q", "round_robin", cands)[0] == rec(1)  # its own counter


def test_round_robin_counters_are_bounded_lru() -> None:
    sel = Selector(max_keys=2)
    cands = [rec(1), rec(2)]
    sel.order("r", "a", "round_robin", cands)
    sel.order("r", "b", "round_robin", cands)
    sel.order("r", "a", "round_robin", cands)  # a used last
    sel.order("r", "c", "round_robin", cands)  # evicts b
    assert sel.stats()["rr_keys"] == 2 and sel.counters["rr_evicted"] == 1
    assert sel.order("r", "b", "round_robin", cands)[0] == rec(1)  # b starts over
    assert sel.order("r", "a", "round_robin", cands)[0] == rec(1)  # a kept its turn (3rd)


def test_random_with_a_seeded_rng_covers_every_provider_and_order() -> None:
    sel = Selector(rng=random.Random(7))
    cands = [rec(1), rec(2), rec(3)]
    orders = {tuple(r.node_id[0] for r in sel.order("r", "p", "random", cands))
              for _ in range(300)}
    assert orders == set(itertools.permutations([1, 2, 3]))
    again = Selector(rng=random.Random(7))
    assert again.order("r", "p", "random", cands) == Selector(
        rng=random.Random(7)).order("r", "p", "random", cands)


def test_first_is_stable_whatever_the_answer_order() -> None:
    sel = Selector()
    a = sel.order("r", "p", "first", [rec(3), rec(1), rec(2)])
    b = sel.order("r", "p", "first", [rec(2), rec(3), rec(1)])
    assert a == b == [rec(1), rec(2), rec(3)]


def test_lowest_latency_prefers_the_fastest_and_measures_the_unmeasured_first() -> None:
    sel = Selector(alpha=0.5, failure_penalty=10.0)
    cands = [rec(1), rec(2), rec(3), rec(4)]
    sel.observe(nid(1), 0.050)
    sel.observe(nid(2), 0.010)
    order = [r.node_id[0] for r in sel.order("r", "p", "lowest_latency", cands)]
    assert order == [3, 4, 2, 1]  # never measured (by id), then fastest first
    sel.observe(nid(3), 0.020)
    sel.observe(nid(4), 0.020)
    assert [r.node_id[0] for r in sel.order("r", "p", "lowest_latency", cands)] == [2, 3, 4, 1]
    sel.observe(nid(2), 0.110)  # EWMA: 0.010 + 0.5 * (0.110 - 0.010) = 0.060
    assert sel.latency(nid(2)) == pytest.approx(0.060)
    assert [r.node_id[0] for r in sel.order("r", "p", "lowest_latency", cands)] == [3, 4, 1, 2]
    sel.failed(nid(3))  # 0.020 + 0.5 * (10 - 0.020): demoted behind everyone
    assert [r.node_id[0] for r in sel.order("r", "p", "lowest_latency", cands)] == [4, 1, 2, 3]
    sel.forget(nid(3))  # a new link: measured again first
    assert sel.order("r", "p", "lowest_latency", cands)[0] == rec(3)
    assert sel.counters["failed"] == 1 and sel.counters["observed"] == 5


def test_the_latency_table_is_bounded_lru() -> None:
    sel = Selector(max_nodes=2)
    sel.observe(nid(1), 0.1)
    sel.observe(nid(2), 0.2)
    sel.observe(nid(1), 0.1)  # 1 sampled last
    sel.failed(nid(3))  # evicts 2
    assert sel.latency(nid(2)) is None and sel.latency(nid(1)) is not None
    assert sel.counters["latency_evicted"] == 1 and sel.stats()["nodes"] == 2


def test_selector_bad_input() -> None:
    sel = Selector()
    with pytest.raises(ValueError, match="round_robin, random, first, lowest_latency"):
        sel.order("r", "p", "fastest", [rec(1)])
    assert sel.counters["bad_strategy"] == 1
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="rtt_seconds"):
            sel.observe(nid(1), bad)
    assert sel.counters["bad_samples"] == 3 and sel.latency(nid(1)) is None
    assert sel.order("r", "p", "round_robin", []) == []
    with pytest.raises(ValueError, match="alpha"):
        Selector(alpha=0)


@given(
    ids=st.lists(st.integers(1, 255), unique=True, max_size=12),
    strategy=st.sampled_from(STRATEGIES),
    samples=st.lists(st.tuples(st.integers(1, 255), st.floats(0, 5)), max_size=20),
    calls=st.integers(1, 4),
    seed=st.integers(0, 1000),
)
def test_order_is_always_a_permutation_of_the_candidates(
    ids: list[int], strategy: str, samples: list[tuple[int, float]], calls: int, seed: int
) -> None:
    sel = Selector(rng=random.Random(seed), max_nodes=8)
    for i, rtt in samples:
        sel.observe(nid(i), rtt)
    cands = [rec(i) for i in ids]
    for _ in range(calls):
        order = sel.order("r", "p", strategy, cands)
        assert sorted(order, key=lambda r: r.node_id) == sorted(cands, key=lambda r: r.node_id)
    if strategy in ("first", "lowest_latency"):  # deterministic: same answer for any input order
        assert sel.order("r", "p", strategy, cands[::-1]) == sel.order("r", "p", strategy, cands)


# -- result caching -----------------------------------------------------------------------


def test_results_are_cached_for_their_ttl() -> None:
    rc = ResultCache()
    assert rc.get("r", "p", b"\x92\x02\x03", now=0) is None
    assert rc.put("r", "p", b"\x92\x02\x03", b"\x05", ttl=10.0, now=0) is True
    assert rc.get("r", "p", b"\x92\x02\x03", now=9.9) == b"\x05"
    assert rc.get("r", "p", b"\x92\x02\x04", now=1) is None  # other args
    assert rc.get("r", "q", b"\x92\x02\x03", now=1) is None  # other procedure
    assert rc.get("s", "p", b"\x92\x02\x03", now=1) is None  # other realm
    assert rc.get("r", "p", b"\x92\x02\x03", now=10.0) is None  # expired
    assert (rc.counters["hits"], rc.counters["misses"]) == (1, 5)


def test_a_zero_ttl_is_not_cached_and_max_ttl_caps() -> None:
    rc = ResultCache(max_ttl=60.0)
    assert rc.put("r", "p", b"a", b"x", ttl=0, now=0) is False
    assert rc.get("r", "p", b"a", now=0) is None
    assert rc.counters["not_cached"] == 1 and len(rc) == 0
    rc.put("r", "p", b"a", b"x", ttl=1e9, now=0)
    assert rc.get("r", "p", b"a", now=59.9) == b"x"
    assert rc.get("r", "p", b"a", now=60.0) is None


def test_the_result_cache_is_bounded() -> None:
    rc = ResultCache(max_entries=2, max_value_bytes=8)
    rc.put("r", "p", b"1", b"a", ttl=5, now=0)
    rc.put("r", "p", b"2", b"b", ttl=5, now=0)
    assert rc.get("r", "p", b"1", now=1) == b"a"  # 1 used last
    rc.put("r", "p", b"3", b"c", ttl=5, now=1)
    assert rc.get("r", "p", b"2", now=1) is None
    assert rc.counters["evictions"] == 1 and rc.stats()["entries"] == 2
    assert rc.put("r", "p", b"1234", b"56789", ttl=5, now=1) is False  # 9 bytes > 8
    assert rc.counters["too_large"] == 1
    assert rc.put("r", "p", b"4", b"d", ttl=1, now=1) is True
    assert rc.expire(now=100) == 2


def test_result_cache_bad_input() -> None:
    rc = ResultCache()
    with pytest.raises(ValueError, match="ttl"):
        rc.put("r", "p", b"a", b"x", ttl=-1, now=0)
    with pytest.raises(ValueError, match="ttl"):
        rc.put("r", "p", b"a", b"x", ttl=math.nan, now=0)
    with pytest.raises(TypeError, match="bytes"):
        rc.put("r", "p", [1], b"x", ttl=1, now=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bytes"):
        rc.get("r", "p", "a", now=0)  # type: ignore[arg-type]
    assert rc.stats()["entries"] == 0


# -- one call -----------------------------------------------------------------------------


def test_a_failure_before_delivery_always_moves_on() -> None:
    plan = CallPlan([rec(1), rec(2), rec(3)])
    assert plan.next_target() == rec(1)
    assert plan.on_failure(delivered=False, idempotent=False) is True
    assert plan.next_target() == rec(2)
    assert plan.on_failure(delivered=False, idempotent=False) is True
    assert plan.next_target() == rec(3)
    assert plan.on_failure(delivered=False, idempotent=False) is False
    assert plan.gave_up == "exhausted" and plan.next_target() is None
    assert plan.counters == {"attempts": 3, "failed_before_delivery": 3,
                             "failed_after_delivery": 0}


def test_a_failure_after_delivery_moves_on_only_when_idempotent() -> None:
    plan = CallPlan([rec(1), rec(2)])
    plan.next_target()
    assert plan.on_failure(delivered=True, idempotent=False) is False
    assert plan.gave_up == "delivered" and plan.next_target() is None
    plan = CallPlan([rec(1), rec(2)])
    plan.next_target()
    assert plan.on_failure(delivered=True, idempotent=True) is True
    assert plan.next_target() == rec(2)
    assert plan.stats()["failed_after_delivery"] == 1 and plan.stats()["gave_up"] is None


def test_max_attempts_bounds_the_tries() -> None:
    plan = CallPlan([rec(i) for i in range(1, 6)], max_attempts=2)
    assert plan.next_target() == rec(1)
    assert plan.on_failure(False, False) is True
    assert plan.next_target() == rec(2)
    assert plan.on_failure(False, True) is False
    assert plan.gave_up == "max_attempts" and plan.attempts == 2
    with pytest.raises(ValueError, match="max_attempts"):
        CallPlan([rec(1)], max_attempts=0)


def test_no_provider_and_the_deadline() -> None:
    empty: CallPlan[ProviderRecord] = CallPlan([])
    assert empty.next_target() is None and empty.gave_up == "no_provider"
    plan = CallPlan([rec(1), rec(2)], deadline=10.0)
    assert plan.remaining(4.0) == 6.0 and plan.remaining(11.0) == 0.0
    assert plan.next_target(now=0) == rec(1)
    assert plan.on_failure(False, False, now=10.0) is False
    assert plan.gave_up == "deadline"
    late = CallPlan([rec(1)], deadline=1.0)
    assert late.next_target(now=1.0) is None and late.gave_up == "deadline"
    with pytest.raises(TypeError, match="now="):
        CallPlan([rec(1)], deadline=1.0).next_target()
    assert CallPlan([rec(1)]).remaining(5.0) is None


def test_the_plan_refuses_out_of_order_reports() -> None:
    plan = CallPlan([rec(1), rec(2)])
    with pytest.raises(RuntimeError):
        plan.on_failure(False, False)
    plan.next_target()
    with pytest.raises(RuntimeError):
        plan.next_target()


def test_a_whole_call_across_the_pieces() -> None:
    """Lookup answer -> cache -> order -> plan: node 2 is down (dial error), node 1 answers;
    node 2 is then skipped by the next call without a new lookup."""
    cache = ProviderCache(self_id=SELF)
    sel = Selector()
    values = [encode_provider(rec(i, strategy="first")) for i in (2, 1)] + [b"junk"]
    decoded = [decode_provider(v) for v in values]
    records = [r for r in decoded if r is not None]
    assert len(records) == 2
    cache.put("r", "p", records, now=0)
    cands = cache.get("r", "p", now=0)
    assert cands is not None
    plan = CallPlan(sel.order("r", "p", agreed_strategy(cands), cands), deadline=5.0)
    first = plan.next_target(now=0)
    assert first == rec(1, strategy="first")
    assert plan.on_failure(delivered=False, idempotent=first.idempotent, now=0.1)
    cache.forget_node(first.node_id, now=0.1)
    sel.failed(first.node_id)
    assert plan.next_target(now=0.1) == rec(2, strategy="first")
    assert cache.get("r", "p", now=0.2) == [rec(2, strategy="first")]
