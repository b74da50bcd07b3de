"""The mesh's discovery state machine (sans-IO, fake clock): anchors, caching, rate-limited
refresh, the bounded pending queue, pruning, and bad records."""

from __future__ import annotations

import pytest

from macula.mesh.discovery import Advert, Discovery, filter_anchor, topic_anchors

ME, A, B, C = (bytes([i]) * 32 for i in range(4))


@pytest.mark.parametrize(
    ("flt", "anchor"),
    [
        ("a/b/c", "a/b/c"),
        ("a/b/+", "a/b"),
        ("a/+/c", "a"),
        ("+/b", ""),
        ("#", ""),
        ("a/#", "a"),
        ("a//b/#", "a//b"),
        ("/+", ""),
        ("$share/g/a/+/c", "a"),
        ("$SYS/#", "$SYS"),
    ],
)
def test_filter_anchor_is_the_literal_prefix(flt: str, anchor: str) -> None:
    assert filter_anchor(flt) == anchor


def test_topic_anchors_cover_every_filter_anchor_that_can_match() -> None:
    assert topic_anchors("a/b/c") == ["", "a", "a/b", "a/b/c"]
    assert topic_anchors("/x") == ["", "", "/x"]
    for flt in ("a/b/c", "a/b/+", "a/+/c", "+/b/c", "#", "a/#", "a/b/c/#"):
        assert filter_anchor(flt) in topic_anchors("a/b/c")
    with pytest.raises(ValueError):
        topic_anchors("a/+")
    with pytest.raises(ValueError):
        filter_anchor("a/#/b")


def _answer(d: Discovery[str], now: float, records: dict[str, list[Advert]]) -> list[object]:
    released: list[object] = []
    for anchor in d.take_lookups():
        released += d.lookup_done(anchor, records.get(anchor, []), now)
    return released


def test_first_publish_waits_for_discovery_then_goes_out_without_waiting() -> None:
    d: Discovery[str] = Discovery(self_id=ME)
    assert d.route("a/b", "m1", now=0.0) is None  # queued: nothing known yet
    assert sorted(d.take_lookups()) == ["", "a", "a/b"]
    assert d.route("a/b", "m2", now=0.0) is None  # still queued, no second lookup
    assert d.take_lookups() == []
    records = {"a": [Advert(A, ("h", 1), ("a/+",))], "": [Advert(B, None, ("#",))]}
    released = []
    released += d.lookup_done("", records[""], 0.01)
    assert released == []  # "a" and "a/b" still missing
    released += d.lookup_done("a", records["a"], 0.01)
    released += d.lookup_done("a/b", [], 0.01)
    assert released == [("a/b", {A, B}, ["m1", "m2"])]
    # now the route is known: publishing answers at once and costs no lookup
    assert d.route("a/b", "m3", now=0.02) == ({A, B}, ["m3"])
    assert d.take_lookups() == []
    assert d.counters["routes_hit"] == 1
    assert d.endpoint_of(A) == ("h", 1) and d.endpoint_of(B) is None


def test_only_nodes_whose_filters_match_are_targets() -> None:
    d: Discovery[str] = Discovery(self_id=ME)
    d.route("s/1/temp", "x", now=0)
    records = {
        "s": [
            Advert(A, ("h", 1), ("s/+/temp",)),
            Advert(B, ("h", 2), ("s/+/hum",)),
            Advert(C, ("h", 3), ("s/#",)),
        ],
        "": [Advert(ME, ("me", 1), ("#",))],  # our own record is never a target
    }
    assert _answer(d, 0, records) == [("s/1/temp", {A, C}, ["x"])]
    assert d.route("s/2/hum", "y", now=0) is None  # anchor "s/2/hum" etc. unknown yet
    assert _answer(d, 0, records) == [("s/2/hum", {B, C}, ["y"])]


def test_a_busy_topic_costs_one_lookup_per_anchor_per_interval() -> None:
    d: Discovery[str] = Discovery(self_id=ME, cache_ttl=60, refresh_after=1.0, min_interval=1.0)
    d.route("t", "0", now=0)
    _answer(d, 0, {"t": [Advert(A, ("h", 1), ("t",))]})
    lookups = 0
    now = 0.0
    for i in range(10_000):  # 10,000 messages over 10 seconds
        now = i / 1000
        assert d.route("t", str(i), now=now) is not None  # never queued, never waits
        got = d.take_lookups()
        lookups += len(got)
        for anchor in got:
            d.lookup_done(anchor, [Advert(A, ("h", 1), ("t",))], now)
    # two anchors ("" and "t"), refreshed about once a second each over 10 s
    assert 2 * 9 <= lookups <= 2 * 11
    assert d.counters["lookups_started"] == lookups + 2


def test_a_changed_answer_changes_the_route_at_once() -> None:
    d: Discovery[str] = Discovery(self_id=ME, refresh_after=1.0, min_interval=0.5)
    d.route("t", "m", now=0)
    _answer(d, 0, {"t": [Advert(A, ("h", 1), ("t",))]})
    assert d.route("t", "m", now=0.5)[0] == {A}  # type: ignore[index]
    assert d.route("t", "m", now=1.5)[0] == {A}  # type: ignore[index]  # refresh starts
    _answer(d, 1.5, {"t": [Advert(B, ("h", 2), ("t",))]})  # A unsubscribed, B subscribed
    assert d.route("t", "m", now=1.6)[0] == {B}  # type: ignore[index]


def test_nodes_swapping_filters_change_the_route() -> None:
    d: Discovery[str] = Discovery(self_id=ME, refresh_after=1.0, min_interval=0.5)
    d.route("t/x", "m", now=0)
    _answer(d, 0, {"t": [Advert(A, ("h", 1), ("t/+",)), Advert(B, ("h", 2), ("t/y",))]})
    assert d.route("t/x", "m", now=0.5)[0] == {A}  # type: ignore[index]
    assert d.route("t/x", "m", now=1.5)[0] == {A}  # type: ignore[index]  # refresh starts
    # the same two filters, held by the other node each
    _answer(d, 1.5, {"t": [Advert(A, ("h", 1), ("t/y",)), Advert(B, ("h", 2), ("t/+",))]})
    assert d.route("t/x", "m", now=1.6)[0] == {B}  # type: ignore[index]


def test_prune_drops_a_node_until_the_anchor_changes() -> None:
    d: Discovery[str] = Discovery(self_id=ME, refresh_after=10, min_interval=10)
    d.route("t", "m", now=0)
    _answer(d, 0, {"t": [Advert(A, ("h", 1), ("t",)), Advert(B, ("h", 2), ("t",))]})
    d.prune("t", A, now=1)
    assert d.route("t", "m", now=2)[0] == {B}  # type: ignore[index]
    assert d.counters["pruned"] == 1


def test_answers_expire_after_the_cache_ttl() -> None:
    d: Discovery[str] = Discovery(self_id=ME, cache_ttl=5, refresh_after=5, min_interval=1)
    d.route("t", "m", now=0)
    _answer(d, 0, {"t": [Advert(A, ("h", 1), ("t",))]})
    assert d.route("t", "m", now=4.9) is not None
    d.take_lookups()  # ignore the refresh: pretend the DHT is slow
    assert d.route("t", "late", now=5.0) is None  # the answer expired: wait for a new one


def test_the_pending_queue_is_bounded_and_counts_drops() -> None:
    d: Discovery[int] = Discovery(self_id=ME, max_pending_per_topic=3, max_pending=5)
    for i in range(5):
        assert d.route("a", i, now=0) is None
    assert d.pending == 3 and d.counters["pending_dropped"] == 2  # oldest dropped
    for i in range(4):
        d.route("b", 100 + i, now=0)
    assert d.pending == 5 and d.counters["pending_dropped"] == 2 + 1 + 1
    released = _answer(d, 0, {})
    got = {topic: items for topic, _, items in released}
    # a: 2 dropped by its own bound, then its oldest (2) for the total bound; b: 100 by its own
    assert got == {"a": [3, 4], "b": [101, 102, 103]}
    assert d.pending == 0


def test_a_failed_lookup_does_not_hold_messages_forever() -> None:
    d: Discovery[str] = Discovery(self_id=ME)
    d.route("t", "m", now=0)
    released = []
    for anchor in d.take_lookups():
        released += d.lookup_failed(anchor, 0.1)
    assert released == [("t", set(), ["m"])]
    assert d.counters["lookups_failed"] == 2


def test_garbage_records_are_ignored() -> None:
    d: Discovery[str] = Discovery(self_id=ME)
    d.route("a/b", "m", now=0)
    bad = [
        Advert(A, ("h", 1), ("a/#/x", "", "\x00", "a/+")),  # only "a/+" is valid
        Advert(B, ("h", 2), ("zzz/+",)),  # belongs to another anchor
    ]
    released = _answer(d, 0, {"a": bad})
    assert released == [("a/b", {A}, ["m"])]


def test_tick_restarts_lookups_that_rate_limiting_held_back() -> None:
    d: Discovery[str] = Discovery(self_id=ME, cache_ttl=2, refresh_after=2, min_interval=5)
    d.route("t", "m", now=0)
    _answer(d, 0, {"t": [Advert(A, ("h", 1), ("t",))]})
    assert d.route("t", "late", now=3) is None  # expired, and the limit holds the lookup
    assert d.take_lookups() == []
    d.tick(now=5)
    assert sorted(d.take_lookups()) == ["", "t"]


def test_a_new_version_of_an_identical_record_undoes_a_prune() -> None:
    """A subscriber that left and came back re-advertises the same filters: the publisher
    pruned it meanwhile (NOMATCH) and must send to it again (the old code compared the
    filters only, so the prune outlived the re-subscription)."""
    d: Discovery[str] = Discovery(self_id=ME, refresh_after=1.0, min_interval=0.5)
    d.route("t", "m", now=0)
    _answer(d, 0, {"t": [Advert(A, ("h", 1), ("t",), None, 5, 1)]})
    d.prune("t", A, now=0.5)
    assert d.route("t", "m", now=0.6)[0] == set()  # type: ignore[index]
    d.route("t", "m", now=1.5)  # a refresh starts
    _answer(d, 1.5, {"t": [Advert(A, ("h", 1), ("t",), None, 5, 3)]})  # same filters, newer
    assert d.route("t", "m", now=1.6)[0] == {A}  # type: ignore[index]
    # a restart (a new incarnation) is newer than any version of the old one
    d.prune("t", A, now=1.7)
    assert d.apply_advert("t", Advert(A, ("h", 1), ("t",), None, 6, 1), now=1.8) is False
    assert d.route("t", "m", now=1.9)[0] == {A}  # type: ignore[index]


def test_a_pushed_record_changes_routes_at_once_and_older_copies_do_not_undo_it() -> None:
    d: Discovery[str] = Discovery(self_id=ME, refresh_after=30.0, min_interval=1.0)
    d.route("t/x", "m", now=0)
    _answer(d, 0, {"t": []})
    assert d.route("t/x", "m", now=0.1)[0] == set()  # type: ignore[index]
    # B subscribes and pushes its record (NOTIFY): no lookup needed
    assert d.apply_advert("t", Advert(B, ("h", 2), ("t/#",), None, 9, 1), now=0.2)
    assert d.route("t/x", "m", now=0.3)[0] == {B}  # type: ignore[index]
    assert d.take_lookups() == []
    # a stale copy from a DHT node that missed the update does not take it back ...
    assert d.apply_advert("t", Advert(B, ("h", 2), ("t/x",), None, 9, 0), now=0.4) is False
    d.route("t/x", "m", now=31)  # a refresh starts
    assert sorted(d.take_lookups()) == ["", "t", "t/x"]
    for anchor in ("", "t/x"):
        d.lookup_done(anchor, [], now=31)
    d.lookup_done("t", [Advert(B, ("h", 2), ("t/x",), None, 9, 0)], now=31)
    assert d.route("t/x", "m", now=31.1)[0] == {B}  # type: ignore[index]
    # ... but its newer empty record does (B left)
    d.apply_advert("t", Advert(B, ("h", 2), (), None, 9, 2), now=32)
    assert d.route("t/x", "m", now=32.1)[0] == set()  # type: ignore[index]
    # pushes for anchors this node does not use are ignored
    assert d.apply_advert("zzz", Advert(C, ("h", 3), ("zzz",), None, 1, 1), now=33) is False
    assert d.counters["pushed"] == 2
