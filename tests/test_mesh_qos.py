"""QoS 1 between nodes, sans-IO (fake clock): the outbox re-sends until acknowledged, within
bounds; the inbox delivers each message once. Includes a lossy-link simulation: no loss and
no duplicate delivered, whatever is dropped."""

from __future__ import annotations

import random

import pytest

from macula.mesh.qos import Inbox, Outbox

A = b"\x01" * 32


def test_unacknowledged_messages_are_resent_with_the_same_id_then_expire() -> None:
    out: Outbox[str] = Outbox(ack_timeout=1.0, max_attempts=3)
    m1, m2 = out.send("a", now=0), out.send("b", now=0.5)
    assert (m1, m2) == (1, 2)
    assert out.due(0.9) == ([], [])
    assert out.due(1.0) == ([(1, "a")], [])
    assert out.ack([2]) == 1  # b acknowledged: never re-sent
    assert out.due(2.0) == ([(1, "a")], [])  # attempt 3
    assert out.due(3.0) == ([], ["a"])  # no attempts left: dropped, counted
    assert len(out) == 0
    assert out.counters == {"sent": 2, "resent": 2, "acked": 1, "expired": 1, "refused": 0,
                            "unknown_acks": 0}


def test_the_outbox_is_bounded() -> None:
    out: Outbox[int] = Outbox(max_inflight=2)
    assert out.send(1, 0) is not None and out.send(2, 0) is not None
    assert out.send(3, 0) is None
    assert out.counters["refused"] == 1
    out.ack([1, 99])
    assert out.counters["unknown_acks"] == 1
    assert out.send(3, 0) is not None


def test_resend_all_after_a_new_link_and_next_deadline() -> None:
    out: Outbox[str] = Outbox(ack_timeout=2.0)
    out.send("x", 0)
    out.send("y", 1)
    assert out.next_deadline() == 2.0
    assert out.resend_all(5.0) == [(1, "x"), (2, "y")]
    assert out.next_deadline() == 7.0
    with pytest.raises(ValueError):
        Outbox(ack_timeout=0)


def test_the_inbox_delivers_each_message_once_within_its_memory() -> None:
    inbox = Inbox(dedup_ttl=10.0)
    assert inbox.accept(A, 1, now=0) is True
    assert inbox.accept(A, 1, now=5) is False
    assert inbox.accept(b"\x02" * 32, 1, now=5) is True  # another origin, same id
    assert inbox.counters == {"delivered": 2, "duplicates": 1}


@pytest.mark.parametrize("seed", range(20))
def test_a_lossy_link_loses_nothing_and_duplicates_nothing(seed: int) -> None:
    rnd = random.Random(seed)
    out: Outbox[int] = Outbox(ack_timeout=0.1, max_attempts=50)
    inbox = Inbox(dedup_ttl=1000)
    delivered: list[int] = []
    wire: list[tuple[float, int, int]] = []  # (arrival, mid, item) in flight to the receiver
    acks: list[tuple[float, int]] = []  # (arrival, mid) in flight back
    now = 0.0
    for item in range(200):
        mid = out.send(item, now)
        assert mid is not None
        if rnd.random() > 0.3:  # 30% of sends are lost
            wire.append((now + rnd.uniform(0.001, 0.05), mid, item))
    while len(out) and now < 100:
        now += 0.01
        for arrival, mid, item in [w for w in wire if w[0] <= now]:
            wire.remove((arrival, mid, item))
            if inbox.accept(A, mid, now):
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
