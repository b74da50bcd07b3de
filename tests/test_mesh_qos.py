"""QoS 1 between nodes, sans-IO (fake clock): the outbox keeps and re-sends until
acknowledged, within bounds of time and bytes; the inbox delivers each message once per
(origin, incarnation). Includes a lossy-link simulation: no loss and
no duplicate delivered, whatever is dropped."""

from __future__ import annotations

import random

import pytest

from macula.mesh.qos import Inbox, MessageIds, Outbox

A = b"\x01" * 32


def test_unacknowledged_messages_are_resent_with_the_same_id_until_the_ttl() -> None:
    out: Outbox[str] = Outbox(ack_timeout=1.0, ttl=3.5)
    m1, m2 = out.send("a", 10, now=0), out.send("b", 10, now=0.5)
    assert (m1, m2) == (1, 2)
    assert out.due(0.9) == ([], [])
    assert out.due(1.0) == ([(1, "a")], [])
    assert out.ack([2]) == 1  # b acknowledged: never re-sent
    assert out.due(2.0) == ([(1, "a")], [])
    assert out.due(3.0) == ([(1, "a")], [])  # no bound on attempts: only on time
    assert out.due(3.6) == ([], ["a"])  # older than the ttl: dropped, counted
    assert len(out) == 0 and out.bytes == 0
    assert out.counters == {"sent": 2, "resent": 3, "acked": 1, "expired": 1, "refused": 0,
                            "unknown_acks": 0, "nacked": 0}


def test_the_outbox_is_bounded_in_messages_and_bytes() -> None:
    out: Outbox[int] = Outbox(max_inflight=2)
    assert out.send(1, 1, 0) is not None and out.send(2, 1, 0) is not None
    assert out.send(3, 1, 0) is None
    assert out.counters["refused"] == 1
    out.ack([1, 99])
    assert out.counters["unknown_acks"] == 1
    assert out.send(3, 1, 0) is not None
    small: Outbox[int] = Outbox(max_bytes=100)
    assert small.send(1, 60, 0) is not None
    assert small.send(2, 60, 0) is None  # 120 bytes would be over
    small.ack([1])
    assert small.send(2, 60, 0) is not None and small.bytes == 60


def test_an_unreachable_node_keeps_its_messages_and_gets_them_all_when_it_returns() -> None:
    out: Outbox[str] = Outbox(ack_timeout=1.0, ttl=60.0)
    for i in range(5):
        out.send(f"m{i}", 1, now=i)
    out.ack([2])
    assert out.hold(30.0) == []  # nothing re-sent, nothing lost while it is away
    assert len(out) == 4
    # a link to it came up: everything, in id order, with a new deadline
    assert out.resend_all(40.0) == [(1, "m0"), (3, "m2"), (4, "m3"), (5, "m4")]
    assert out.next_deadline() == 41.0
    assert out.hold(61.5) == ["m0"]  # sent at 0 and never acknowledged: the ttl counts
    with pytest.raises(ValueError):
        Outbox(ack_timeout=0)


def test_a_refused_message_stays_and_the_low_mark_follows_acknowledgements() -> None:
    out: Outbox[str] = Outbox(ack_timeout=1.0)
    for i in range(4):
        out.send(str(i), 1, now=0)
    assert out.low() == 1
    out.ack([1, 3])
    assert out.low() == 2
    out.nack([2], now=0.5)  # the receiver had no room: again after ack_timeout
    assert out.due(1.0) == ([(4, "3")], [])
    assert out.due(1.5) == ([(2, "1")], [])
    out.ack([2, 4])
    assert out.low() == 5 and len(out) == 0  # nothing in flight: the next id


def test_outboxes_of_one_incarnation_never_give_an_id_twice() -> None:
    """An outbox dropped (its node gone, nothing in flight) and made again for the same
    node must go on from where the ids were: the receiver forgot the ids below the low
    mark it was told and takes any of them for a repeat."""
    ids = MessageIds()
    first: Outbox[str] = Outbox(ids=ids)
    assert [first.send(x, 1, 0) for x in "ab"] == [1, 2]
    first.ack([1, 2])
    assert first.low() == 3
    again: Outbox[str] = Outbox(ids=ids)  # the same node, later
    assert again.low() == 3 and again.send("c", 1, 0) == 3
    inbox = Inbox()
    st = inbox.origin(A, 1, 3)  # the receiver was told "below 3 is done"
    assert st is not None and inbox.accept(st, 3)  # a new message, delivered


def test_the_inbox_delivers_each_message_once_per_incarnation() -> None:
    inbox = Inbox()
    st = inbox.origin(A, 100, 1)
    assert st is not None
    assert inbox.accept(st, 1) is True
    assert inbox.accept(st, 1) is False
    other = inbox.origin(b"\x02" * 32, 7, 1)
    assert other is not None and inbox.accept(other, 1) is True  # another origin, same id
    # the origin restarted: its ids start at 1 again and are new messages, not repeats
    st2 = inbox.origin(A, 200, 1)
    assert st2 is not None and inbox.accept(st2, 1) is True
    # a late frame of the old incarnation is stale: dropped
    assert inbox.origin(A, 100, 1) is None
    assert inbox.counters == {"delivered": 3, "duplicates": 1, "stale": 1, "forgotten": 0,
                              "incarnations": 1}


def test_the_inbox_forgets_below_the_senders_low_mark_and_redelivers_refused() -> None:
    inbox = Inbox()
    st = inbox.origin(A, 1, 1)
    assert st is not None
    for mid in range(1, 101):
        assert inbox.accept(st, mid)
    st = inbox.origin(A, 1, 90)  # the sender has 90.. still in flight
    assert st is not None and len(st.seen) == 11
    assert inbox.accept(st, 5) is False  # below the mark: done before, not delivered again
    assert inbox.accept(st, 95) is False
    assert inbox.accept(st, 101) is True
    inbox.refused(st, 101)  # no room for it here: the re-send must be delivered
    assert inbox.accept(st, 101) is True


@pytest.mark.parametrize("seed", range(20))
def test_a_lossy_link_loses_nothing_and_duplicates_nothing(seed: int) -> None:
    rnd = random.Random(seed)
    out: Outbox[int] = Outbox(ack_timeout=0.1, ttl=1000)
    inbox = Inbox()
    delivered: list[int] = []
    wire: list[tuple[float, int, int]] = []  # (arrival, mid, item) in flight to the receiver
    acks: list[tuple[float, int]] = []  # (arrival, mid) in flight back
    now = 0.0
    for item in range(200):
        mid = out.send(item, 1, now)
        assert mid is not None
        if rnd.random() > 0.3:  # 30% of sends are lost
            wire.append((now + rnd.uniform(0.001, 0.05), mid, item))
    while len(out) and now < 100:
        now += 0.01
        for arrival, mid, item in [w for w in wire if w[0] <= now]:
            wire.remove((arrival, mid, item))
            st = inbox.origin(A, 1, out.low())
            assert st is not None
            if inbox.accept(st, mid):
                delivered.append(item)
            if rnd.random() > 0.3:  # 30% of acks are lost
                acks.append((now + rnd.uniform(0.001, 0.05), mid))
        for arrival, mid in [a for a in acks if a[0] <= now]:
            acks.remove((arrival, mid))
            out.ack([mid])
        resend, expired = out.due(now)
        assert expired == []
        for mid, item in resend:
            if rnd.random() > 0.3:
                wire.append((now + rnd.uniform(0.001, 0.05), mid, item))
    assert sorted(delivered) == list(range(200))  # every message, each once
    assert inbox.counters["duplicates"] > 0  # lost acks did cause re-sends
