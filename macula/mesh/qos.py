"""QoS 1 between nodes, sans-IO: the sender's outbox and the receiver's de-duplication.

The publishing node gives every QoS 1 message it forwards to a remote node a message id
(unique per sending node, increasing). The receiving node acknowledges a message after it
handed it to its local subscribers; the sender re-sends it when no acknowledgement came in
``ack_timeout`` (``max_attempts`` sends at most, then the message is dropped and counted);
the receiver remembers the ids it delivered for ``dedup_ttl`` seconds (bounded, LRU) and
acknowledges a repeated id again without delivering it twice.

``Outbox`` is per remote node; ``Inbox`` is per receiving node (keys: origin node id and
message id). No sockets and no clocks: every call takes ``now``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

from macula import TTLCache

T = TypeVar("T")


@dataclass
class _Entry(Generic[T]):
    item: T
    deadline: float
    attempts: int


class Outbox(Generic[T]):
    """Unacknowledged QoS 1 messages to one remote node, in send order."""

    def __init__(self, *, ack_timeout: float = 2.0, max_attempts: int = 5,
                 max_inflight: int = 10_000) -> None:
        if ack_timeout <= 0 or max_attempts < 1 or max_inflight < 1:
            raise ValueError("ack_timeout > 0, max_attempts >= 1 and max_inflight >= 1")
        self.ack_timeout = ack_timeout
        self.max_attempts = max_attempts
        self.max_inflight = max_inflight
        self._next_mid = 1
        self._inflight: OrderedDict[int, _Entry[T]] = OrderedDict()
        self.counters = {"sent": 0, "resent": 0, "acked": 0, "expired": 0, "refused": 0,
                         "unknown_acks": 0}

    def __len__(self) -> int:
        return len(self._inflight)

    def send(self, item: T, now: float) -> int | None:
        """A message id for ``item`` (send it with that id), or None when ``max_inflight``
        messages already wait for acknowledgements (refused, counted: the caller keeps it)."""
        if len(self._inflight) >= self.max_inflight:
            self.counters["refused"] += 1
            return None
        mid = self._next_mid
        self._next_mid += 1
        self._inflight[mid] = _Entry(item, now + self.ack_timeout, 1)
        self.counters["sent"] += 1
        return mid

    def ack(self, mids: list[int]) -> int:
        """Acknowledged ids; returns how many were in flight."""
        done = 0
        for mid in mids:
            if self._inflight.pop(mid, None) is not None:
                done += 1
            else:
                self.counters["unknown_acks"] += 1
        self.counters["acked"] += done
        return done

    def due(self, now: float) -> tuple[list[tuple[int, T]], list[T]]:
        """``(resend, expired)``: messages to send again now (same ids), and messages that
        used up their attempts (dropped from the outbox, counted)."""
        resend: list[tuple[int, T]] = []
        expired: list[T] = []
        inflight = self._inflight
        # entries are kept in deadline order (sent in time order; a re-sent one moves to
        # the end with the latest deadline), so this stops at the first one not due: the
        # cost is the due entries, not everything in flight
        while inflight:
            mid, e = next(iter(inflight.items()))
            if e.deadline > now:
                break
            if e.attempts >= self.max_attempts:
                del inflight[mid]
                expired.append(e.item)
                self.counters["expired"] += 1
                continue
            e.attempts += 1
            e.deadline = now + self.ack_timeout
            inflight.move_to_end(mid)
            resend.append((mid, e.item))
            self.counters["resent"] += 1
        return resend, expired

    def resend_all(self, now: float) -> list[tuple[int, T]]:
        """Everything in flight, e.g. after the link to the node was re-established."""
        out = []
        for mid, e in self._inflight.items():
            e.deadline = now + self.ack_timeout
            out.append((mid, e.item))
        return out

    def next_deadline(self) -> float | None:
        if not self._inflight:
            return None
        return next(iter(self._inflight.values())).deadline  # the earliest (deadline order)


class Inbox:
    """Which (origin, message id) pairs this node already delivered."""

    def __init__(self, *, dedup_ttl: float = 60.0, max_entries: int = 1_000_000) -> None:
        self._seen: TTLCache = TTLCache(max_entries, dedup_ttl)
        self.counters = {"delivered": 0, "duplicates": 0}

    def accept(self, origin: bytes, mid: int, now: float) -> bool:
        """True the first time (deliver it, then acknowledge); False for a repeat
        (acknowledge it again, do not deliver)."""
        key = (origin, mid)
        if self._seen.get(key, None, now=now) is not None:
            self.counters["duplicates"] += 1
            return False
        self._seen.put(key, True, now=now)
        self.counters["delivered"] += 1
        return True
