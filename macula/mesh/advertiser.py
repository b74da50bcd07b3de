"""What a node tells the mesh about its subscribers: the sans-IO advertiser.

For every realm and anchor (``discovery.filter_anchor``) where local clients subscribe, the
node keeps one DHT record ``dht_key(realm, "sub", anchor)`` whose value is this node's
``Advert`` (node id, endpoint, the filters under that anchor). The advertiser tracks local
subscriptions (counted: two clients on one filter are one filter in the record) and says
which records to put, and when:

* a new filter, or the last subscriber of a filter leaving, changes the anchor's record:
  it is put again at once (``take_puts``), debounced to at most one put per anchor per
  ``min_interval`` (the latest content wins);
* live records are republished every ``republish_every`` seconds (before the DHT's record
  TTL, ``record_ttl``, runs out);
* an anchor with no filter left gets an empty record put once (so publishers drop this
  node at their next refresh) and is then left to expire — the record TTL bounds how long
  a stale advert can live; receivers answer "no match" meanwhile, and publishers prune.

Records hold at most ``max_filters_per_record`` filters and ``max_record_bytes`` encoded
(under the DHT's value bound); beyond either, the record carries the anchor's catch-all
filter (``anchor/#``, or ``#`` for the root anchor) instead of the list, which
over-approximates (a publisher may send a topic nobody here wants, answered with "no
match") but never loses a message.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import msgspec

from macula.mesh.discovery import Advert, filter_anchor


class _Wire(msgspec.Struct, array_like=True, frozen=True):
    node_id: bytes
    endpoint: tuple[str, int] | None
    filters: list[str]
    via: tuple[bytes, tuple[str, int]] | None = None  # client mode: reach it through this
    incarnation: int = 0  # the advertising node's start (see Mesh.incarnation)
    seq: int = 0  # this record's version within that start: (incarnation, seq) grows


_ENC = msgspec.msgpack.Encoder()
_DEC = msgspec.msgpack.Decoder(_Wire)


def encode_advert(adv: Advert) -> bytes:
    return _ENC.encode(_Wire(adv.node_id, adv.endpoint, list(adv.filters), adv.via,
                             adv.incarnation, adv.seq))


def decode_advert(data: bytes) -> Advert | None:
    """None for a record that is not a well-formed advert (counted by the caller)."""
    try:
        w = _DEC.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if len(w.node_id) != 32 or (w.via is not None and len(w.via[0]) != 32):
        return None
    if not (0 <= w.incarnation < 1 << 64 and 0 <= w.seq < 1 << 64):
        return None
    return Advert(w.node_id, w.endpoint, tuple(w.filters), w.via, w.incarnation, w.seq)


def catch_all(anchor: str) -> str:
    return "#" if anchor == "" else anchor + "/#"


@dataclass
class _Record:
    filters: Counter[str] = field(default_factory=Counter)
    dirty: bool = True
    put_at: float = float("-inf")  # when it was last put
    seq: int = 0  # the version it was last put with


@dataclass(frozen=True)
class Put:
    realm: str
    anchor: str
    value: bytes  # the encoded Advert
    ttl: float


class Advertiser:
    def __init__(
        self,
        *,
        node_id: bytes,
        endpoint: tuple[str, int] | None,
        record_ttl: float = 300.0,
        republish_every: float | None = None,
        min_interval: float = 0.2,
        max_filters_per_record: int = 256,
        max_record_bytes: int = 8192,
        incarnation: int = 0,
    ) -> None:
        self.node_id = node_id
        self.incarnation = incarnation
        self._seq = 0  # versions of this start's records (one counter for all of them)
        self.endpoint = endpoint
        self.via: tuple[bytes, tuple[str, int]] | None = None  # see set_via
        self.record_ttl = record_ttl
        self.republish_every = record_ttl / 2 if republish_every is None else republish_every
        self.min_interval = min_interval
        self.max_filters = max_filters_per_record
        self.max_record_bytes = max_record_bytes
        self._records: dict[tuple[str, str], _Record] = {}
        self.counters = {"puts": 0, "overflowing_records": 0}

    def subscribe(self, realm: str, filter: str) -> bool:
        """A local subscription to ``filter`` (``$share/...`` included) in ``realm``;
        True when the filter is new here (its first subscriber)."""
        anchor = filter_anchor(filter)
        rec = self._records.setdefault((realm, anchor), _Record())
        rec.filters[filter] += 1
        if rec.filters[filter] == 1:
            rec.dirty = True
            return True
        return False

    def unsubscribe(self, realm: str, filter: str) -> bool:
        """True when that was the filter's last subscriber here."""
        anchor = filter_anchor(filter)
        rec = self._records.get((realm, anchor))
        if rec is None or rec.filters[filter] <= 0:
            return False
        rec.filters[filter] -= 1
        if rec.filters[filter] == 0:
            del rec.filters[filter]
            rec.dirty = True
            return True
        return False

    def filters(self, realm: str, anchor: str) -> list[str]:
        rec = self._records.get((realm, anchor))
        return sorted(rec.filters) if rec is not None else []

    def advert(self, realm: str, anchor: str) -> Advert:
        rec = self._records.get((realm, anchor))
        seq = rec.seq if rec is not None else 0
        filters = self.filters(realm, anchor)
        if len(filters) > self.max_filters:
            filters = [catch_all(anchor)]
        inc = self.incarnation
        adv = Advert(self.node_id, self.endpoint, tuple(filters), self.via, inc, seq)
        if len(filters) > 1 and len(encode_advert(adv)) > self.max_record_bytes:
            adv = Advert(self.node_id, self.endpoint, (catch_all(anchor),), self.via, inc, seq)
        return adv

    def set_via(self, via: tuple[bytes, tuple[str, int]] | None) -> None:
        """A client-mode node's relay changed: every record goes out again."""
        if via != self.via:
            self.via = via
            for rec in self._records.values():
                rec.dirty = True

    def take_puts(self, now: float) -> list[Put]:
        """The records to put now (changed ones, debounced; due republishes)."""
        out: list[Put] = []
        for (realm, anchor), rec in list(self._records.items()):
            changed = rec.dirty and now - rec.put_at >= self.min_interval
            due = not rec.dirty and rec.filters and now - rec.put_at >= self.republish_every
            if not (changed or due):
                continue
            if changed:  # a new version: it replaces every older one wherever it is seen
                self._seq += 1
                rec.seq = self._seq
            adv = self.advert(realm, anchor)
            if len(rec.filters) > 1 and len(adv.filters) == 1 and rec.filters.keys() != set(
                    adv.filters):
                self.counters["overflowing_records"] += 1
            out.append(Put(realm, anchor, encode_advert(adv), self.record_ttl))
            rec.put_at, rec.dirty = now, False
            if not rec.filters:  # the empty record went out once: now left to expire
                del self._records[(realm, anchor)]
            self.counters["puts"] += 1
        return out

    def next_due(self) -> float | None:
        """When ``take_puts`` next has something to do (None: nothing advertised)."""
        due: float | None = None
        for rec in self._records.values():
            t = rec.put_at + (self.min_interval if rec.dirty else self.republish_every)
            due = t if due is None else min(due, t)
        return due
