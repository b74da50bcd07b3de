"""The mesh advertiser (sans-IO, fake clock): which DHT records a node puts, and when."""

from __future__ import annotations

from macula.mesh.advertiser import Advertiser, catch_all, decode_advert, encode_advert
from macula.mesh.discovery import Advert

ME = b"\x07" * 32


def puts(a: Advertiser, now: float) -> dict[tuple[str, str], tuple[str, ...]]:
    out = {}
    for p in a.take_puts(now):
        adv = decode_advert(p.value)
        assert adv is not None and adv.node_id == ME and p.ttl == a.record_ttl
        out[(p.realm, p.anchor)] = adv.filters
    return out


def test_records_follow_subscriptions_per_realm_and_anchor() -> None:
    a = Advertiser(node_id=ME, endpoint=("10.0.0.1", 4433), min_interval=0.0)
    a.subscribe("r", "s/+/temp")
    a.subscribe("r", "s/#")
    a.subscribe("r", "s/#")  # a second client on the same filter: one filter in the record
    a.subscribe("other", "x")
    assert puts(a, 0) == {("r", "s"): ("s/#", "s/+/temp"), ("other", "x"): ("x",)}
    assert puts(a, 0.1) == {}  # nothing changed, nothing due
    a.unsubscribe("r", "s/#")  # one of two clients left: no change
    assert puts(a, 0.2) == {}
    a.unsubscribe("r", "s/#")
    assert puts(a, 0.3) == {("r", "s"): ("s/+/temp",)}
    a.unsubscribe("r", "s/+/temp")
    assert puts(a, 0.4) == {("r", "s"): ()}  # an empty record once, then left to expire
    assert puts(a, 1000) == {("other", "x"): ("x",)}  # only the live one is republished


def test_changes_are_debounced_and_republished_before_expiry() -> None:
    a = Advertiser(node_id=ME, endpoint=None, record_ttl=100, min_interval=1.0)
    a.subscribe("r", "t/1")
    assert puts(a, 0) == {("r", "t/1"): ("t/1",)}
    a.subscribe("r", "t/1/+")  # anchor t/1 again: changed within the debounce interval
    assert puts(a, 0.5) == {}
    assert a.next_due() == 1.0
    assert puts(a, 1.0) == {("r", "t/1"): ("t/1", "t/1/+")}
    assert a.next_due() == 1.0 + 50  # republish at half the record TTL
    assert puts(a, 50.9) == {}
    assert puts(a, 51.0) == {("r", "t/1"): ("t/1", "t/1/+")}


def test_an_oversized_record_carries_the_anchors_catch_all() -> None:
    a = Advertiser(node_id=ME, endpoint=None, min_interval=0, max_filters_per_record=3)
    for i in range(5):
        a.subscribe("r", f"a/+/{i}")
    assert puts(a, 0) == {("r", "a"): ("a/#",)}
    assert a.counters["overflowing_records"] == 1
    assert catch_all("") == "#"


def test_a_record_over_its_byte_bound_carries_the_catch_all() -> None:
    a = Advertiser(node_id=ME, endpoint=None, min_interval=0, max_record_bytes=400)
    a.subscribe("r", "b/" + "x" * 150)
    a.subscribe("r", "b/" + "y" * 150)
    assert puts(a, 0) == {("r", "b/" + "x" * 150): ("b/" + "x" * 150,),
                          ("r", "b/" + "y" * 150): ("b/" + "y" * 150,)}
    for i in range(3):  # three long filters under one anchor: over 400 bytes together
        a.subscribe("r", f"c/+/{i}" + "z" * 150)
    assert puts(a, 1) == {("r", "c"): ("c/#",)}
    assert a.counters["overflowing_records"] == 1


def test_advert_encoding_round_trips_and_garbage_decodes_to_none() -> None:
    adv = Advert(ME, ("h", 1), ("a/+", "#"))
    assert decode_advert(encode_advert(adv)) == adv
    for junk in (b"", b"\xc1", b"\x93\x01\x02\x03", encode_advert(Advert(b"x", None, ()))):
        assert decode_advert(junk) is None


def test_shared_subscriptions_are_advertised_under_their_inner_anchor() -> None:
    a = Advertiser(node_id=ME, endpoint=None, min_interval=0)
    a.subscribe("r", "$share/g/jobs/+")
    assert puts(a, 0) == {("r", "jobs"): ("$share/g/jobs/+",)}
