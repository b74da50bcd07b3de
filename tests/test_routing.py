"""The Kademlia routing table (RoutingTable) against its model.

tests/models/routing_model.py is the obviously-correct version (lists per bucket, closest by
sorting everything); every test here either checks an edge by hand or drives the compiled
table and the model with the same random operations and compares every answer.
"""

from __future__ import annotations

import gc
import math
import random
import weakref
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from macula import RoutingTable
from macula._ext import routing
from tests.gc_util import gc_disabled, gc_every_allocation, traced_growth
from tests.models.routing_model import ModelRoutingTable, as_int, cpl

ZERO = bytes(32)


def ident(value: int) -> bytes:
    return value.to_bytes(32, "big")


def in_bucket(self_id: bytes, b: int, low: int = 0) -> bytes:
    """An id sharing exactly b leading bits with self_id (its bits below b+1 from ``low``)."""
    s = as_int(self_id)
    mask = (1 << (255 - b)) - 1
    return ident(((s >> (255 - b)) ^ 1) << (255 - b) | (low & mask))


def snapshot(t: RoutingTable) -> Any:
    return (
        len(t),
        list(t),
        [t.bucket(i) for i in range(256)],
        [t.replacements(i) for i in range(256)],
        [t.last_seen(i) for i in t],
        t.stats(),
    )


def brute_closest(pairs: list[tuple[bytes, Any]], target: bytes, n: int) -> list[Any]:
    t = as_int(target)
    return sorted(pairs, key=lambda p: as_int(p[0]) ^ t)[:n]


# ---------------------------------------------------------------------------------------------
# Buckets


def test_constants_and_properties() -> None:
    assert (routing.ID_SIZE, routing.BUCKETS, routing.DEFAULT_BUCKET_SIZE) == (32, 256, 20)
    t = RoutingTable(ZERO)
    assert (t.self_id, t.k, t.max_replacements, len(t)) == (ZERO, 20, 20, 0)
    t = RoutingTable(b"\x01" * 32, 3, replacements=7)
    assert (t.k, t.max_replacements) == (3, 7)
    assert repr(t) == "<RoutingTable self_id=01010101.. contacts=0 k=3>"


def test_bucket_of_is_the_shared_prefix_length() -> None:
    t = RoutingTable(ZERO)
    assert t.bucket_of(b"\x80" + bytes(31)) == 0  # differs in the first bit
    assert t.bucket_of(b"\xff" * 32) == 0
    assert t.bucket_of(b"\x40" + bytes(31)) == 1
    assert t.bucket_of(b"\x01" + bytes(31)) == 7
    assert t.bucket_of(bytes(1) + b"\x80" + bytes(30)) == 8
    assert t.bucket_of(bytes(8) + b"\x80" + bytes(23)) == 64  # across a word boundary
    assert t.bucket_of(bytes(7) + b"\x01" + bytes(24)) == 63
    assert t.bucket_of(bytes(31) + b"\x01") == 255  # differs in the last bit only
    assert t.bucket_of(bytes(31) + b"\x02") == 254
    with pytest.raises(ValueError, match="own id"):
        t.bucket_of(ZERO)
    rng = random.Random(5)
    for _ in range(300):
        me, other = rng.randbytes(32), rng.randbytes(32)
        b = rng.randrange(256)
        other = in_bucket(me, b, as_int(other))
        assert RoutingTable(me).bucket_of(other) == b == cpl(me, other)


def test_add_get_contains_iter_and_bucket_order() -> None:
    t = RoutingTable(ZERO)
    a, b, c = ident(1 << 255), ident(1 << 254), ident(3 << 254)  # buckets 0, 1, 0
    assert t.add(a, "A", now=1.0) is None
    assert t.add(b, "B", now=2.0) is None
    assert t.add(c, ("h", 3), now=3.0) is None
    assert len(t) == 3
    assert a in t and c in t and ident(5) not in t and ZERO not in t
    assert t.get(c) == ("h", 3) and t.get(ident(5)) is None and t.get(ZERO) is None
    assert t.last_seen(b) == 2.0 and t.last_seen(ident(5)) is None
    assert t.bucket(0) == [(a, "A"), (c, ("h", 3))]
    assert t.bucket(1) == [(b, "B")] and t.bucket(2) == []
    assert list(t) == [a, c, b]  # bucket by bucket, LRS first
    it = iter(t)
    t.remove(a)  # iteration is over a snapshot
    assert list(it) == [a, c, b]


def test_readd_refreshes_contact_and_moves_to_mrs() -> None:
    t = RoutingTable(ZERO, 3)
    ids = [in_bucket(ZERO, 0, i) for i in range(3)]
    for i, x in enumerate(ids):
        t.add(x, i, now=float(i))
    assert t.add(ids[0], "new", now=9.0) is None
    assert t.bucket(0) == [(ids[1], 1), (ids[2], 2), (ids[0], "new")]
    assert t.last_seen(ids[0]) == 9.0 and len(t) == 3
    # re-adding the MRS contact changes only its contact and time
    assert t.add(ids[0], "newer", now=10.0) is None
    assert t.bucket(0)[-1] == (ids[0], "newer")


def test_full_bucket_returns_lrs_and_queues_newcomer() -> None:
    t = RoutingTable(ZERO, 2, replacements=3)
    x0, x1, *news = (in_bucket(ZERO, 5, i) for i in range(7))
    t.add(x0, "x0", now=0.0)
    t.add(x1, "x1", now=1.0)
    assert t.add(news[0], "n0", now=2.0) == x0
    assert news[0] not in t and t.get(news[0]) is None
    assert t.bucket(5) == [(x0, "x0"), (x1, "x1")]
    assert t.replacements(5) == [(news[0], "n0")]
    # the caller pinged x0, it answered: touch makes it MRS; the next newcomer names x1
    assert t.touch(x0, now=3.0) is True
    assert t.add(news[1], "n1", now=4.0) == x1
    # a queued id that comes again moves to the newest end with its new contact
    assert t.add(news[0], "n0b", now=5.0) == x1
    assert t.replacements(5) == [(news[1], "n1"), (news[0], "n0b")]
    # the bound: newest kept, oldest dropped and counted
    assert t.add(news[2], "n2", now=6.0) == x1
    assert t.add(news[3], "n3", now=7.0) == x1
    assert t.replacements(5) == [(news[0], "n0b"), (news[2], "n2"), (news[3], "n3")]
    s = t.stats()
    assert (s["replacements"], s["dropped"], s["buckets_full"], s["buckets_used"]) == (3, 1, 1, 1)
    assert t.replacements(4) == [] and len(t) == 2
    # other buckets are not affected
    assert t.add(in_bucket(ZERO, 4), "other") is None and len(t) == 3


def test_no_replacement_list() -> None:
    t = RoutingTable(ZERO, 1, replacements=0)
    a, b = in_bucket(ZERO, 0, 1), in_bucket(ZERO, 0, 2)
    t.add(a, "a")
    assert t.add(b, "b") == a
    assert t.replacements(0) == [] and t.stats()["dropped"] == 1
    assert t.remove(a) and len(t) == 0 and b not in t


def test_remove_promotes_the_newest_replacement() -> None:
    t = RoutingTable(ZERO, 2)
    x0, x1, r0, r1 = (in_bucket(ZERO, 9, i) for i in range(4))
    t.add(x0, "x0", now=0.0)
    t.add(x1, "x1", now=1.0)
    t.add(r0, "r0", now=2.0)
    t.add(r1, "r1", now=3.0)
    assert t.remove(x0) is True
    assert t.bucket(9) == [(x1, "x1"), (r1, "r1")]  # promoted at the MRS end
    assert t.last_seen(r1) == 3.0  # with the time it was queued
    assert t.replacements(9) == [(r0, "r0")]
    assert t.remove(x0) is False
    # removing a queued id drops it from the replacement list (not in the table: False)
    assert t.remove(r0) is False and t.replacements(9) == []
    assert t.remove(x1) is True and t.bucket(9) == [(r1, "r1")]
    assert t.remove(ZERO) is False and t.remove(ident(77)) is False
    assert len(t) == 1


def test_touch_reorders_and_stamps() -> None:
    t = RoutingTable(ZERO)
    ids = [in_bucket(ZERO, 0, i) for i in range(4)]
    for i, x in enumerate(ids):
        t.add(x, i, now=float(i))
    assert t.touch(ids[1], now=10.0) is True
    assert [p[0] for p in t.bucket(0)] == [ids[0], ids[2], ids[3], ids[1]]
    assert t.last_seen(ids[1]) == 10.0
    assert t.touch(ids[1], now=11.0) and t.last_seen(ids[1]) == 11.0  # already MRS
    assert t.touch(ident(3), now=1.0) is False
    assert t.touch(ZERO) is False
    assert t.touch(ids[0]) and t.last_seen(ids[0]) is not None  # monotonic clock


def test_own_id_is_never_stored() -> None:
    me = bytes(range(32))
    t = RoutingTable(me)
    t.add(in_bucket(me, 3), "x")
    before = snapshot(t)
    with pytest.raises(ValueError, match=r"own id \(self_id\)"):
        t.add(me, "me")
    with pytest.raises(ValueError, match="own id"):
        t.add(bytes(bytearray(me)), "me")  # an equal object
    assert snapshot(t) == before
    assert me not in t and t.get(me) is None and t.last_seen(me) is None
    assert all(p[0] != me for p in t.closest(me, 10))
    assert t.closest(me, 10) == [(in_bucket(me, 3), "x")]


def test_stale_buckets_with_a_fake_clock() -> None:
    t = RoutingTable(ZERO)
    t.add(in_bucket(ZERO, 0, 1), "a", now=100.0)
    t.add(in_bucket(ZERO, 0, 2), "b", now=50.0)  # later call, older time: max counts
    t.add(in_bucket(ZERO, 3), "c", now=40.0)
    t.add(in_bucket(ZERO, 200), "d", now=10.0)
    assert t.stale_buckets(60.0, now=150.0) == [3, 200]
    assert t.stale_buckets(50.0, now=150.0) == [3, 200]  # 100 is not older than 150 - 50
    assert t.stale_buckets(49.0, now=150.0) == [0, 3, 200]
    assert t.stale_buckets(0, now=10.0) == []
    assert t.stale_buckets(0, now=10.5) == [200]
    t.touch(in_bucket(ZERO, 200), now=149.0)
    assert t.stale_buckets(60.0, now=150.0) == [3]
    assert t.stale_buckets(1e9) == []  # monotonic clock
    assert RoutingTable(ZERO).stale_buckets(0.0, now=1e9) == []  # empty buckets never


# ---------------------------------------------------------------------------------------------
# closest


def test_closest_exact_against_sorting() -> None:
    rng = random.Random(11)
    for me in (ZERO, rng.randbytes(32)):
        t = RoutingTable(me, 1000)
        pairs = []
        for i in range(600):
            x = (
                rng.randbytes(32)
                if i % 3
                else in_bucket(me, rng.randrange(256), rng.getrandbits(256))
            )
            if x not in t:
                t.add(x, i)
                pairs.append((x, i))
        for _ in range(40):
            target = rng.choice([rng.randbytes(32), me, rng.choice(pairs)[0], ZERO])
            for n in (1, 2, 20, 33, 200):
                assert t.closest(target, n) == brute_closest(pairs, target, n)
        assert t.closest(pairs[0][0], 1) == [pairs[0]]  # a stored id is nearest to itself


def test_closest_edges() -> None:
    t = RoutingTable(ZERO)
    assert t.closest(ZERO) == [] and t.closest(ident(9), 0) == []
    ids = [ident(1 << i) for i in range(0, 256, 17)]
    for x in ids:
        t.add(x, x.hex())
    everything = brute_closest([(x, x.hex()) for x in ids], ident(7), 100)
    assert t.closest(ident(7), 100) == everything and len(everything) == len(ids)
    assert t.closest(ident(7), len(ids)) == everything
    assert t.closest(ident(7), 0) == []
    assert t.closest(ident(7), 10**30) == everything
    assert t.closest(ident(7)) == everything[:20]
    # the default n is 20
    t2 = RoutingTable(ZERO, 100)
    for i in range(1, 50):
        t2.add(ident(i), i)
    assert [c for _, c in t2.closest(ZERO)] == list(range(1, 21))
    assert [c for _, c in t2.closest(ident(48), 3)] == [48, 49, 32]  # distances 0, 1, 16


def test_closest_large_table() -> None:
    rng = random.Random(3)
    t = RoutingTable(rng.randbytes(32), 10_000)
    pairs = [(rng.randbytes(32), i) for i in range(10_000)]
    for x, c in pairs:
        assert t.add(x, c) is None
    assert len(t) == 10_000
    for _ in range(5):
        target = rng.randbytes(32)
        assert t.closest(target, 20) == brute_closest(pairs, target, 20)
    assert t.closest(target, 10_000) == brute_closest(pairs, target, 10_000)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_ids() -> None:
    t = RoutingTable(ZERO)
    t.add(ident(5), "five", now=1.0)
    before = snapshot(t)
    calls = {
        "add": lambda x: t.add(x, "c"),
        "touch": t.touch,
        "remove": t.remove,
        "get": t.get,
        "last_seen": t.last_seen,
        "bucket_of": t.bucket_of,
        "closest": t.closest,
        "in": lambda x: x in t,
    }
    for name, call in calls.items():
        for bad in (bytes(31), bytes(33), b""):
            with pytest.raises(ValueError, match=r"must be 32 bytes \(a 256-bit id\), not"):
                call(bad)
        for bad in (bytearray(32), memoryview(bytes(32)), "x" * 32, 5, None, [0] * 32):
            with pytest.raises(TypeError, match="must be bytes, not"):
                call(bad)
        assert snapshot(t) == before, name
    with pytest.raises(ValueError, match="node_id must be 32 bytes"):
        t.add(b"short", "c")
    with pytest.raises(TypeError, match="target must be bytes, not bytearray"):
        t.closest(bytearray(32))

    class Id(bytes):
        pass

    assert t.add(Id(ident(6)), "six") is None  # bytes subclasses are bytes
    assert t.get(ident(6)) == "six" and Id(ident(5)) in t


def test_bad_options_and_arguments() -> None:
    for bad_k in (0, -1):
        with pytest.raises(ValueError, match=r"k must be in \[1, 2,147,483,647\], not"):
            RoutingTable(ZERO, bad_k)
    with pytest.raises(ValueError, match="k must be in"):
        RoutingTable(ZERO, 2**31)
    for bad_type in (2.0, "3", True, None):
        with pytest.raises(TypeError, match="k must be an int, not"):
            RoutingTable(ZERO, bad_type)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"replacements must be in \[0,"):
        RoutingTable(ZERO, replacements=-1)
    with pytest.raises(TypeError, match="replacements must be an int"):
        RoutingTable(ZERO, replacements=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="self_id must be bytes"):
        RoutingTable(bytearray(32))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="self_id must be 32 bytes"):
        RoutingTable(bytes(20))
    with pytest.raises(TypeError):
        RoutingTable(ZERO, 20, 20)  # type: ignore[misc]  # replacements is keyword-only

    t = RoutingTable(ZERO, 2)
    for i in range(4):
        t.add(in_bucket(ZERO, 0, i), i, now=float(i))
    before = snapshot(t)
    with pytest.raises(ValueError, match="n must be >= 0, not -1"):
        t.closest(ZERO, -1)
    for bad_n in (1.0, "2", None, True):
        with pytest.raises(TypeError, match="n must be an int, not"):
            t.closest(ZERO, bad_n)  # type: ignore[arg-type]
    for bad_now in ("1", [1], True):
        with pytest.raises(TypeError, match=r"now must be a number \(seconds\) or None"):
            t.add(in_bucket(ZERO, 0, 9), "x", now=bad_now)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="now must be a number"):
            t.touch(in_bucket(ZERO, 0, 0), now=bad_now)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="now must not be NaN"):
        t.add(in_bucket(ZERO, 1), "x", now=math.nan)
    with pytest.raises(ValueError, match="now must not be NaN"):
        t.touch(in_bucket(ZERO, 0, 0), now=math.nan)
    for bad_i in (-1, 256):
        with pytest.raises(ValueError, match=r"bucket index must be in \[0, 255\], not"):
            t.bucket(bad_i)
        with pytest.raises(ValueError, match="bucket index must be in"):
            t.replacements(bad_i)
    with pytest.raises(TypeError, match="bucket index must be an int, not float"):
        t.bucket(1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="older_than must be >= 0, not -1"):
        t.stale_buckets(-1)
    with pytest.raises(ValueError, match="older_than must be >= 0"):
        t.stale_buckets(math.nan)
    with pytest.raises(TypeError, match="older_than must be a number"):
        t.stale_buckets("5")  # type: ignore[arg-type]
    assert snapshot(t) == before
    assert t.closest(ZERO, 2) == brute_closest(t.bucket(0), ZERO, 2)


def test_stats_and_clear() -> None:
    t = RoutingTable(ZERO, 1, replacements=1)
    t.add(in_bucket(ZERO, 0, 1), "a")
    t.add(in_bucket(ZERO, 0, 2), "b")
    t.add(in_bucket(ZERO, 0, 3), "c")
    t.add(in_bucket(ZERO, 7), "d")
    s = t.stats()
    assert {k: v for k, v in s.items() if k != "bytes"} == {
        "contacts": 2,
        "k": 1,
        "max_replacements": 1,
        "buckets_used": 2,
        "buckets_full": 2,
        "replacements": 1,
        "dropped": 1,
    }
    assert s["bytes"] > 0
    t.clear()
    assert len(t) == 0 and list(t) == [] and t.replacements(0) == [] and t.stats()["dropped"] == 0
    assert t.add(in_bucket(ZERO, 0, 1), "again") is None and t.closest(ZERO) == [
        (in_bucket(ZERO, 0, 1), "again")
    ]


# ---------------------------------------------------------------------------------------------
# References, cycles, re-entry


class Contact:
    def __init__(self, name: str) -> None:
        self.name = name


def test_contacts_are_released_after_remove_clear_replace_and_drop() -> None:
    t = RoutingTable(ZERO, 1, replacements=1)
    a, b, c = Contact("a"), Contact("b"), Contact("c")
    refs = [weakref.ref(o) for o in (a, b, c)]
    ida, idb, idc = (in_bucket(ZERO, 0, i) for i in range(3))
    t.add(ida, a)
    t.add(idb, b)  # queued
    del a, b
    assert refs[0]() is not None and refs[1]() is not None
    t.add(idc, c)  # queued; b dropped
    assert refs[1]() is None
    t.remove(ida)  # c promoted
    assert refs[0]() is None and t.get(idc) is c
    t.add(idc, "replaced")  # refresh drops the old contact
    del c
    assert refs[2]() is None
    d = Contact("d")
    ref_d = weakref.ref(d)
    t.add(idb, d)
    del d
    t.clear()
    assert ref_d() is None
    # and a table that goes away lets go of everything
    t = RoutingTable(ZERO)
    e = Contact("e")
    ref_e = weakref.ref(e)
    t.add(ida, e)
    t.closest(ZERO)
    del e, t
    assert ref_e() is None


def test_a_cycle_through_a_contact_is_collectable() -> None:
    def make() -> tuple[weakref.ref[Contact], weakref.ref[Contact]]:
        t = RoutingTable(ZERO, 1)
        c, q = Contact("c"), Contact("q")
        c.table = t  # type: ignore[attr-defined]  # table -> contact -> table
        q.table = (t,)  # type: ignore[attr-defined]  # through a queued replacement and a tuple
        t.add(in_bucket(ZERO, 0, 1), c)
        t.add(in_bucket(ZERO, 0, 2), q)
        return weakref.ref(c), weakref.ref(q)

    with gc_disabled():
        ref_c, ref_q = make()
        assert ref_c() is not None and ref_q() is not None  # kept alive by the cycles alone
        gc.collect()
        assert ref_c() is None and ref_q() is None


def test_a_finaliser_may_use_the_table_once_its_call_is_done() -> None:
    t = RoutingTable(ZERO)
    x, y = in_bucket(ZERO, 0, 1), in_bucket(ZERO, 1)
    seen: list[Any] = []

    class Hook:
        def __del__(self) -> None:
            seen.append(t.add(y, "from __del__"))
            seen.append(t.remove(x))

    t.add(x, Hook())
    t.add(x, "plain")  # releases the Hook after the table is consistent again
    assert seen == [None, True]
    assert list(t) == [y] and t.get(y) == "from __del__"


def test_a_finaliser_that_modifies_the_table_during_a_call_is_refused() -> None:
    t = RoutingTable(ZERO, 1000)
    for i in range(1, 200):
        t.add(ident(i << 100), i)
    seen: list[BaseException] = []

    class Trap:
        def __init__(self) -> None:
            self.me = self

        def __del__(self) -> None:
            try:
                t.add(ident(7), "trap")
            except BaseException as exc:
                seen.append(exc)

    closest = t.closest
    Trap()
    with gc_every_allocation():
        out = closest(ZERO, 150)  # allocates tuples: a collection runs the finaliser
    gc.collect()
    assert len(seen) == 1 and isinstance(seen[0], RuntimeError)
    assert "modified while one of its calls is running" in str(seen[0])
    assert len(out) == 150 and ident(7) not in t and len(t) == 199


def test_no_leak_over_many_cycles() -> None:
    rng = random.Random(8)
    ids = [rng.randbytes(32) for _ in range(400)]
    t = RoutingTable(ZERO, 4, replacements=2)

    def cycle() -> None:
        for i, x in enumerate(ids):
            t.add(x, ("h", i))
        for x in ids[::3]:
            t.touch(x)
            t.closest(x, 10)
        for x in ids[::2]:
            t.remove(x)
        [t.bucket(i) for i in range(10)]
        t.clear()

    grown = traced_growth(cycle, warmup=5, settle=1, rounds=30)
    assert grown < 10_000, grown


# ---------------------------------------------------------------------------------------------
# Random operations against the model

SELVES = [ZERO, b"\xff" * 32, bytes(range(32)), bytes(range(100, 132))]
BUCKETS_USED = [0, 1, 2, 63, 64, 200, 254, 255]
LOWS = [0, 1, 2**60, 2**200 + 5, 2**254 - 1, 12345678901234567890, 3 << 120, 2**255 - 1]


class RoutingMachine(RuleBasedStateMachine):
    """Adds, touches, removes, clears and every query, on a small id space (8 buckets, at most
    8 ids each, k of 1 to 3) so that buckets fill and replacement lists overflow."""

    @initialize(
        me=st.sampled_from(SELVES),
        k=st.integers(1, 3),
        replacements=st.sampled_from([None, 0, 1, 2]),
    )
    def start(self, me: bytes, k: int, replacements: int | None) -> None:
        self.me = me
        self.table = RoutingTable(me, k, replacements=replacements)
        self.model = ModelRoutingTable(me, k, replacements=replacements)
        self.serial = 0

    ids = st.builds(
        lambda me, b, low: in_bucket(me, b, low),
        st.sampled_from(SELVES),
        st.sampled_from(BUCKETS_USED),
        st.sampled_from(LOWS),
    )

    def node(self, data: st.DataObject) -> bytes:
        b = data.draw(st.sampled_from(BUCKETS_USED))
        return in_bucket(self.me, b, data.draw(st.sampled_from(LOWS)))

    @rule(data=st.data(), now=st.integers(0, 100))
    def add(self, data: st.DataObject, now: int) -> None:
        x = self.node(data)
        self.serial += 1
        contact = ("h", self.serial)
        assert self.table.add(x, contact, now=float(now)) == self.model.add(x, contact, now)

    @rule(now=st.integers(0, 100))
    def add_self(self, now: int) -> None:
        with pytest.raises(ValueError):
            self.table.add(self.me, "me", now=float(now))

    @rule(data=st.data(), now=st.integers(0, 100))
    def touch(self, data: st.DataObject, now: int) -> None:
        x = self.node(data)
        assert self.table.touch(x, now=float(now)) == self.model.touch(x, now)

    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        x = self.node(data)
        assert self.table.remove(x) == self.model.remove(x)

    @precondition(lambda self: len(self.model) > 0)
    @rule(data=st.data())
    def remove_stored(self, data: st.DataObject) -> None:
        x = data.draw(st.sampled_from(self.model.ids()))
        assert self.table.remove(x) is self.model.remove(x) is True

    @rule()
    def clear_sometimes(self) -> None:
        if self.serial % 7 == 0:
            self.table.clear()
            self.model.clear()

    @rule(data=st.data(), other=ids, n=st.integers(0, 12), kind=st.integers(0, 3))
    def closest(self, data: st.DataObject, other: bytes, n: int, kind: int) -> None:
        target = [self.me, other, self.node(data), bytes(32)][kind]
        assert self.table.closest(target, n) == self.model.closest(target, n)

    @rule(data=st.data())
    def lookups(self, data: st.DataObject) -> None:
        x = self.node(data)
        assert self.table.get(x) == self.model.get(x)
        assert self.table.last_seen(x) == self.model.last_seen(x)
        assert (x in self.table) == self.model.contains(x)
        assert self.table.bucket_of(x) == self.model.bucket_of(x)

    @rule(older_than=st.integers(0, 60), now=st.integers(0, 160))
    def stale(self, older_than: int, now: int) -> None:
        got = self.table.stale_buckets(float(older_than), now=float(now))
        assert got == self.model.stale_buckets(older_than, now)

    @rule(bad=st.sampled_from([bytes(31), bytearray(32), "x", None]))
    def bad_id(self, bad: Any) -> None:
        with pytest.raises((TypeError, ValueError)):
            self.table.add(bad, "x")
        with pytest.raises((TypeError, ValueError)):
            self.table.remove(bad)

    @invariant()
    def same_state(self) -> None:
        assert len(self.table) == len(self.model)
        assert list(self.table) == self.model.ids()
        for b in BUCKETS_USED:
            assert self.table.bucket(b) == self.model.bucket(b)
            assert self.table.replacements(b) == self.model.replacements(b)
        stats = self.table.stats()
        del stats["bytes"]
        assert stats == self.model.stats()
        # a bucket with room has no replacements; table and queues are disjoint
        queued = {x for b in BUCKETS_USED for x, _ in self.table.replacements(b)}
        assert not queued & set(self.table)
        for b in BUCKETS_USED:
            if self.table.replacements(b):
                assert len(self.table.bucket(b)) == self.table.k


TestRoutingMachine = RoutingMachine.TestCase


@given(
    me=st.binary(min_size=32, max_size=32),
    ids=st.lists(st.binary(min_size=32, max_size=32), max_size=120, unique=True),
    target=st.binary(min_size=32, max_size=32),
    n=st.integers(0, 130),
)
def test_closest_random_against_the_model(
    me: bytes, ids: list[bytes], target: bytes, n: int
) -> None:
    t, m = RoutingTable(me, 200), ModelRoutingTable(me, 200)
    for i, x in enumerate(ids):
        if x == me:
            continue
        assert t.add(x, i, now=0.0) == m.add(x, i, 0.0)
    assert t.closest(target, n) == m.closest(target, n)
