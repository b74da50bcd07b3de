"""QoS 1 between nodes, sans-IO: the sender's outbox and the receiver's de-duplication.

Identity of a message across the mesh: (origin node id, origin incarnation, message id). A
node's incarnation is new at every start (``Mesh.incarnation``: the start time in
nanoseconds, so a later start has a larger one) and message ids count up from 1 within it,
so no restart, and no forgetting of a peer, can make two messages share an identity.

The sending node keeps every QoS 1 message it forwards to a node in that node's ``Outbox``
until the receiving node acknowledges it — that is, until the receiver handed it to its
local sessions. Nothing else removes it except the documented bounds: a message older than
``ttl`` seconds is dropped and counted (``expired``); a new message beyond ``max_inflight``
messages or ``max_bytes`` bytes in flight is refused at once (the publishing client's
PUBACK says so: nothing is acknowledged that the outbox did not take). The sender re-sends
an unacknowledged message every ``ack_timeout`` while the node is reachable, and everything
in flight at once when a link to it comes up again; while it is unreachable it only waits
(``hold``), so a node that was stopped, cut off or restarted gets its messages when it
returns.

The receiving node's ``Inbox`` remembers, per origin, the ids it delivered in the origin's
current incarnation. Each PUB frame carries the sender's *low mark*: the smallest id still
in its outbox for this receiver; every id below it was acknowledged (or expired at the
sender) and will never be sent again, so the receiver forgets those — what it remembers is
bounded by the sender's outbox, not by a time window. A frame from an older incarnation of
an origin than one already seen is stale and dropped.

No sockets and no clocks: every call takes ``now``.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Entry(Generic[T]):
    item: T
    size: int
    created: float
    deadline: float


class MessageIds:
    """Message ids of one incarnation, shared by all its outboxes: an outbox dropped and
    made again for the same node never gives an id twice (the receiver forgets ids below
    the low mark and would take a re-used one for a repeat)."""

    __slots__ = ("next",)

    def __init__(self) -> None:
        self.next = 1


class Outbox(Generic[T]):
    """Unacknowledged QoS 1 messages to one remote node."""

    def __init__(self, *, ack_timeout: float = 1.0, ttl: float = 300.0,
                 max_inflight: int = 100_000, max_bytes: int = 64 << 20,
                 ids: MessageIds | None = None) -> None:
        if ack_timeout <= 0 or ttl <= 0 or max_inflight < 1 or max_bytes < 1:
            raise ValueError("ack_timeout > 0, ttl > 0, max_inflight >= 1, max_bytes >= 1")
        self.ack_timeout = ack_timeout
        self.ttl = ttl
        self.max_inflight = max_inflight
        self.max_bytes = max_bytes
        self._ids = ids or MessageIds()
        # in deadline order (sent in time order; a re-sent entry moves to the end)
        self._inflight: OrderedDict[int, _Entry[T]] = OrderedDict()
        self._order: deque[int] = deque()  # ids in send order (acknowledged ones lazily)
        self.bytes = 0
        self.counters = {"sent": 0, "resent": 0, "acked": 0, "expired": 0, "refused": 0,
                         "unknown_acks": 0, "nacked": 0}

    def __len__(self) -> int:
        return len(self._inflight)

    def send(self, item: T, size: int, now: float) -> int | None:
        """A message id for ``item`` (``size`` bytes; send it with that id), or None when
        the outbox is at ``max_inflight`` or ``max_bytes`` (refused, counted)."""
        if len(self._inflight) >= self.max_inflight or self.bytes + size > self.max_bytes:
            self.counters["refused"] += 1
            return None
        ids = self._ids
        mid = ids.next
        ids.next = mid + 1
        self._inflight[mid] = _Entry(item, size, now, now + self.ack_timeout)
        self._order.append(mid)
        self.bytes += size
        self.counters["sent"] += 1
        return mid

    def ack(self, mids: list[int]) -> int:
        """Acknowledged ids; returns how many were in flight."""
        done = 0
        inflight = self._inflight
        for mid in mids:
            e = inflight.pop(mid, None)
            if e is not None:
                done += 1
                self.bytes -= e.size
            else:
                self.counters["unknown_acks"] += 1
        self.counters["acked"] += done
        return done

    def nack(self, mids: list[int], now: float) -> None:
        """The receiver could not take these now (a full queue there): they stay, and are
        sent again after ``ack_timeout``."""
        inflight = self._inflight
        for mid in mids:
            e = inflight.get(mid)
            if e is not None:
                e.deadline = now + self.ack_timeout
                inflight.move_to_end(mid)
                self.counters["nacked"] += 1

    def low(self) -> int:
        """The smallest id still in flight (the next id when none is): the receiver may
        forget every id below it."""
        order = self._order
        inflight = self._inflight
        while order and order[0] not in inflight:
            order.popleft()
        return order[0] if order else self._ids.next

    def due(self, now: float) -> tuple[list[tuple[int, T]], list[T]]:
        """``(resend, expired)``: messages to send again now (same ids), and messages older
        than ``ttl`` (dropped from the outbox, counted)."""
        expired = self._expire(now)
        resend: list[tuple[int, T]] = []
        inflight = self._inflight
        # deadline order: this stops at the first entry not due, so the cost is the due
        # entries, not everything in flight
        while inflight:
            mid, e = next(iter(inflight.items()))
            if e.deadline > now:
                break
            e.deadline = now + self.ack_timeout
            inflight.move_to_end(mid)
            resend.append((mid, e.item))
            self.counters["resent"] += 1
        return resend, expired

    def hold(self, now: float) -> list[T]:
        """The node is unreachable: nothing is re-sent; returns what expired meanwhile."""
        return self._expire(now)

    def _expire(self, now: float) -> list[T]:
        expired: list[T] = []
        order = self._order
        inflight = self._inflight
        while order:
            e = inflight.get(order[0])
            if e is None:
                order.popleft()
                continue
            if now - e.created < self.ttl:
                break
            del inflight[order.popleft()]
            self.bytes -= e.size
            expired.append(e.item)
        self.counters["expired"] += len(expired)
        return expired

    def resend_all(self, now: float) -> list[tuple[int, T]]:
        """Everything in flight, in id order (a link to the node came up again)."""
        out = []
        inflight = self._inflight
        for mid in sorted(inflight):
            e = inflight[mid]
            e.deadline = now + self.ack_timeout
            inflight.move_to_end(mid)
            out.append((mid, e.item))
        self.counters["resent"] += len(out)
        return out

    def next_deadline(self) -> float | None:
        if not self._inflight:
            return None
        return next(iter(self._inflight.values())).deadline  # the earliest (deadline order)


@dataclass
class OriginState:
    """What a receiver remembers of one origin's current incarnation."""

    incarnation: int
    floor: int = 0  # every id below it is done (the sender's low mark)
    seen: set[int] = field(default_factory=set)
    order: deque[int] = field(default_factory=deque)  # ids in arrival order

    def advance(self, low: int) -> None:
        if low <= self.floor:
            return
        self.floor = low
        order, seen = self.order, self.seen
        while order and order[0] < low:
            seen.discard(order.popleft())


class Inbox:
    """Which messages this node already delivered, per (origin, incarnation)."""

    def __init__(self, *, max_origins: int = 100_000, max_per_origin: int = 1_000_000) -> None:
        self.max_origins = max_origins
        self.max_per_origin = max_per_origin
        self._origins: OrderedDict[bytes, OriginState] = OrderedDict()
        self.counters = {"delivered": 0, "duplicates": 0, "stale": 0, "forgotten": 0,
                         "incarnations": 0}

    def origin(self, origin: bytes, incarnation: int, low: int) -> OriginState | None:
        """The state for a frame from ``origin`` (its ``incarnation``, its low mark), or
        None when the frame comes from an older incarnation than one already seen (stale:
        that process is gone; drop the frame)."""
        st = self._origins.get(origin)
        if st is None or incarnation > st.incarnation:
            if st is not None:
                self.counters["incarnations"] += 1
            st = self._origins[origin] = OriginState(incarnation)
            while len(self._origins) > self.max_origins:
                self._origins.popitem(last=False)
                self.counters["forgotten"] += 1
        elif incarnation < st.incarnation:
            self.counters["stale"] += 1
            return None
        self._origins.move_to_end(origin)
        st.advance(low)
        return st

    def accept(self, st: OriginState, mid: int) -> bool:
        """True the first time (deliver it, then acknowledge); False for a repeat or an id
        below the sender's low mark (acknowledge it again, do not deliver)."""
        if mid < st.floor or mid in st.seen:
            self.counters["duplicates"] += 1
            return False
        st.seen.add(mid)
        st.order.append(mid)
        if len(st.seen) > self.max_per_origin:  # the sender's low mark does not move
            st.seen.discard(st.order.popleft())
            self.counters["forgotten"] += 1
        self.counters["delivered"] += 1
        return True

    def refused(self, st: OriginState, mid: int) -> None:
        """``mid`` could not be delivered (refused): its re-send must be delivered."""
        if mid in st.seen:
            st.seen.discard(mid)
            self.counters["delivered"] -= 1
