"""Where a published topic must go in the mesh: the sans-IO discovery state machine.

A node advertises its clients' subscription filters in the DHT, indexed by **anchor**: the
filter's literal prefix up to its first wildcard (``sensors/+/temp`` -> ``sensors``; ``#``
and ``+/x`` -> the root anchor ``""``; a filter without wildcards is its own anchor). One
record per (realm, anchor, node) lists the node's filters under that anchor, so a publisher
can match exactly and send only to nodes with a matching filter.

A publisher of ``a/b/c`` needs the records of the anchors ``""``, ``a``, ``a/b``, ``a/b/c``
(``topic_anchors``). ``Discovery`` keeps:

* the **anchor cache**: anchor -> its records (a ``TopicTrie`` of the remote filters, keys
  = node ids, and their endpoints), each answer kept ``cache_ttl`` seconds;
* the **direct routing table**: topic -> the set of nodes to send to, computed once from
  the anchors' tries and valid until one of its anchors changes (a generation number per
  anchor) — so the per-publish cost is one ``TTLCache`` hit;
* **rate-limited refresh**: an anchor is looked up again when its answer is older than
  ``refresh_after`` (or missing), at most once per ``min_interval`` per anchor, never two
  lookups of one anchor at once; refreshes happen in the background (the old answer keeps
  serving until the new one comes);
* a **bounded pending queue**: a message for a topic whose anchors are not all known yet
  waits (``max_pending_per_topic``, ``max_pending``; at the bound the oldest is dropped
  and counted) and is released when the last missing anchor's answer arrives.

No sockets, no clocks: every method takes ``now``; lookups to start come back as anchor
names, and the caller reports answers with ``lookup_done`` / ``lookup_failed``.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from macula import TopicTrie, TTLCache, parse_shared, validate_topic

T = TypeVar("T")


def filter_anchor(filter: str) -> str:
    """The literal prefix of ``filter`` up to its first wildcard level (``$share/g/``
    stripped): ``a/b/+/c`` -> ``a/b``, ``#`` -> ``""``, ``a/b`` -> ``a/b``."""
    shared = parse_shared(filter)  # also validates
    inner = shared[1] if shared is not None else filter
    levels = inner.split("/")
    literal: list[str] = []
    for level in levels:
        if level in ("+", "#"):
            break
        literal.append(level)
    else:
        return inner
    return "/".join(literal)


def topic_anchors(topic: str) -> list[str]:
    """The anchors whose filters may match ``topic``: ``a/b`` -> ``["", "a", "a/b"]``."""
    validate_topic(topic)
    levels = topic.split("/")
    return [""] + ["/".join(levels[: i + 1]) for i in range(len(levels))]


@dataclass(frozen=True)
class Advert:
    """One node's record under one anchor: where it is and its filters there."""

    node_id: bytes
    endpoint: tuple[str, int] | None  # None: reachable only over a link it opened
    filters: tuple[str, ...]
    # a client-mode node: the node it keeps a link to, and where that one listens
    via: tuple[bytes, tuple[str, int]] | None = None
    incarnation: int = 0  # the node's start that made this record ...
    seq: int = 0  # ... and its version within that start: the larger pair wins

    @property
    def version(self) -> tuple[int, int]:
        return (self.incarnation, self.seq)


@dataclass
class _NodeAd:
    """What an anchor's answer says of one node."""

    endpoint: tuple[str, int] | None
    filters: frozenset[str]  # its valid filters under the anchor
    version: tuple[int, int]
    learned_at: float = field(default=0.0, compare=False)  # when this version arrived


@dataclass
class _Anchor:
    trie: TopicTrie = field(default_factory=TopicTrie)  # plain filters -> node ids
    # shared filters ``$share/<group>/<filter>`` -> (group, filter, node id)
    shared: TopicTrie = field(default_factory=TopicTrie)
    # what the answer said, node by node: its endpoint, (valid) filters here, version
    answer: dict[bytes, _NodeAd] = field(default_factory=dict)
    known_at: float | None = None  # when the current answer arrived (None: never)
    looked_at: float = float("-inf")  # when the last lookup started
    in_flight: bool = False
    generation: int = 0


@dataclass
class _Route:
    """A topic's targets, valid while its anchors keep the generations they had."""

    anchors: list[str]
    generations: tuple[int, ...]
    targets: set[bytes]  # nodes with a plain subscription matching the topic
    refresh_at: float  # when the first of its anchors is due for a background refresh
    # shared groups matching the topic: (group, filter) -> the nodes with members
    groups: dict[tuple[str, str], list[bytes]] = field(default_factory=dict)
    epoch: int = 0  # Discovery._epoch when the generations were last checked


@dataclass
class _Pending(Generic[T]):
    items: deque[T]
    missing: set[str]


class Discovery(Generic[T]):
    """Routes of one realm; ``T`` is whatever the caller queues per message."""

    def __init__(
        self,
        *,
        self_id: bytes,
        cache_ttl: float = 60.0,
        refresh_after: float | None = None,
        min_interval: float = 1.0,
        max_anchors: int = 100_000,
        max_routes: int = 100_000,
        max_pending_per_topic: int = 1_000,
        max_pending: int = 100_000,
    ) -> None:
        if cache_ttl <= 0 or min_interval < 0:
            raise ValueError("cache_ttl must be > 0 and min_interval >= 0")
        self.self_id = self_id
        self.cache_ttl = cache_ttl
        self.refresh_after = cache_ttl / 2 if refresh_after is None else refresh_after
        self.min_interval = min_interval
        self.max_anchors = max_anchors
        self.max_pending_per_topic = max_pending_per_topic
        self.max_pending = max_pending
        self._anchors: OrderedDict[str, _Anchor] = OrderedDict()
        # topic -> (generations of its anchors, targets)
        self._routes: TTLCache = TTLCache(max_routes, cache_ttl)
        self._pending: OrderedDict[str, _Pending[T]] = OrderedDict()
        self._epoch = 0  # bumped whenever any anchor's answer changes (or one is evicted)
        self._pending_count = 0
        self._to_lookup: list[str] = []
        self.counters: dict[str, int] = {
            "routes_hit": 0,
            "routes_miss": 0,
            "lookups_started": 0,
            "lookups_failed": 0,
            "pending_dropped": 0,
            "pending_released": 0,
            "anchors_evicted": 0,
            "pruned": 0,
            "nodes_forgotten": 0,
            "pushed": 0,
        }

    # -- publishing ---------------------------------------------------------------------

    def route(self, topic: str, item: T, now: float) -> tuple[set[bytes], list[T]] | None:
        """Where ``item`` (a message for ``topic``) goes.

        Returns ``(targets, [item])`` when every anchor of the topic is known (targets may
        be empty: nobody elsewhere subscribes), or None when the item was queued until the
        missing anchors are known. Either way, ``take_lookups()`` then holds the anchors
        to look up now (missing ones, and stale ones for a background refresh).
        """
        r = self.plan(topic, item, now)
        return None if r is None else (r.targets, [item])

    def plan(self, topic: str, item: T, now: float) -> _Route | None:
        """Like ``route``, returning the whole route (``targets`` and shared ``groups``)."""
        r: _Route | None = self._routes.get(topic, None, now=now)
        if r is not None and (r.epoch == self._epoch
                              or self._generations(r.anchors) == r.generations):
            r.epoch = self._epoch  # no answer changed since: the next check is one compare
            self.counters["routes_hit"] += 1
            if now >= r.refresh_at:
                self._refresh_stale(r.anchors, now)
                # while lookups are in flight the due time stays past: look again shortly,
                # not on every publish
                r.refresh_at = max(self._refresh_at(r.anchors), now + 0.05)
                self._routes.put(topic, r, now=now)
            return r
        self.counters["routes_miss"] += 1
        anchors = topic_anchors(topic)
        missing = {a for a in anchors if not self._known(a, now)}
        self._refresh_stale(anchors, now)
        if missing:
            self._queue(topic, item, missing)
            return None
        return self._new_route(topic, anchors, now)

    def cached(self, topic: str, now: float) -> _Route | None:
        """The current route of ``topic`` if one is cached and valid (no side effects)."""
        r: _Route | None = self._routes.get(topic, None, now=now)
        if r is not None and self._generations(r.anchors) == r.generations:
            return r
        return None

    def endpoint_of(self, node_id: bytes) -> tuple[str, int] | None:
        """The endpoint a node advertised (any anchor); None if unknown or client mode."""
        for anchor in self._anchors.values():
            entry = anchor.answer.get(node_id)
            if entry is not None and entry.endpoint is not None:
                return entry.endpoint
        return None

    def take_lookups(self) -> list[str]:
        """Anchors the caller must look up now (each is marked in flight)."""
        out, self._to_lookup = self._to_lookup, []
        return out

    # -- answers -------------------------------------------------------------------------

    def lookup_done(
        self, anchor: str, adverts: Iterable[Advert], now: float
    ) -> list[tuple[str, set[bytes], list[T]]]:
        """Record an anchor's answer; returns the released queues as
        ``(topic, targets, items)`` for topics that now have all their anchors.

        Versions decide per node: a record older than the one already known for that node
        (a DHT copy that missed an update, or an update pushed by ``apply_advert`` since)
        does not replace it; a node missing from the answer is dropped unless its record
        was pushed after this lookup started."""
        a = self._anchor(anchor)
        a.in_flight = False
        fresh: dict[bytes, _NodeAd] = {}
        for adv in adverts:
            if adv.node_id == self.self_id:
                continue
            ad = self._node_ad(anchor, adv, now)
            old = fresh.get(adv.node_id)
            if old is None or ad.version > old.version:
                fresh[adv.node_id] = ad
        answer: dict[bytes, _NodeAd] = {}
        for node, ad in a.answer.items():
            new = fresh.get(node)
            if new is None:
                if ad.learned_at > a.looked_at:
                    answer[node] = ad  # pushed after the lookup started: newer than it
            elif ad.version > new.version:
                answer[node] = ad
        for node, ad in fresh.items():
            if node not in answer:
                answer[node] = ad
        answer = {n: ad for n, ad in answer.items() if ad.filters}
        # routes depend on which node has which filter, at which version: compare that, not
        # the filter set alone (two nodes swapping filters leaves it the same), and a new
        # version of the same filters undoes a prune
        changed = a.known_at is None or answer != a.answer
        a.known_at = now
        self._set_answer(a, answer, changed)
        return self._release(anchor, now)

    def apply_advert(self, anchor: str, adv: Advert, now: float) -> bool:
        """A node pushed its record under ``anchor`` (NOTIFY): take it if the anchor is in
        use here and the record is newer than what is known of that node. Returns whether
        the routes changed."""
        a = self._anchors.get(anchor)
        if a is None or a.known_at is None or adv.node_id == self.self_id:
            return False
        old = a.answer.get(adv.node_id)
        if old is not None and old.version >= adv.version:
            return False
        self.counters["pushed"] += 1
        ad = self._node_ad(anchor, adv, now)
        answer = dict(a.answer)
        if ad.filters:
            answer[adv.node_id] = ad
        else:
            answer.pop(adv.node_id, None)
        changed = old is None or old.filters != ad.filters
        self._set_answer(a, answer, True)
        return changed

    @staticmethod
    def _node_ad(anchor: str, adv: Advert, now: float) -> _NodeAd:
        kept: set[str] = set()
        for f in adv.filters:
            try:
                if filter_anchor(f) != anchor:
                    continue  # a record that does not belong here: ignored
                kept.add(f)
            except (ValueError, TypeError):
                continue  # garbage from a peer does not poison the cache
        return _NodeAd(adv.endpoint, frozenset(kept), adv.version, now)

    def _set_answer(self, a: _Anchor, answer: dict[bytes, _NodeAd], bump: bool) -> None:
        """Install ``answer``; ``bump``: it differs from the one installed, so the tries
        are rebuilt and the routes through this anchor recomputed (a prune made under an
        older version is undone). Without ``bump`` the tries already hold it."""
        if not bump:
            a.answer = answer
            return
        trie = TopicTrie()
        shared_trie = TopicTrie()
        for nid, ad in answer.items():
            for f in ad.filters:
                sh = parse_shared(f)
                if sh:
                    shared_trie.add(sh[1], (sh[0], sh[1], nid))
                else:
                    trie.add(f, nid)
        a.trie, a.shared, a.answer = trie, shared_trie, answer
        a.generation += 1
        self._epoch += 1

    def lookup_failed(self, anchor: str, now: float) -> list[tuple[str, set[bytes], list[T]]]:
        """A lookup failed: an anchor never known counts as empty (so queued messages are
        not held forever); a known one keeps its old answer until the next refresh."""
        self.counters["lookups_failed"] += 1
        a = self._anchor(anchor)
        a.in_flight = False
        if a.known_at is None:
            return self.lookup_done(anchor, (), now)
        return []

    def prune(self, topic: str, node_id: bytes, now: float) -> None:
        """``node_id`` said it has no subscriber for ``topic`` any more: stop sending it
        this topic until the anchors' answers change."""
        r: _Route | None = self._routes.get(topic, None, now=now)
        if r is None:
            return
        hit = node_id in r.targets
        if hit:
            r.targets = r.targets - {node_id}  # a new set: released lists keep theirs
        for key, nodes in list(r.groups.items()):
            if node_id in nodes:
                hit = True
                rest = [n for n in nodes if n != node_id]
                if rest:
                    r.groups[key] = rest
                else:
                    del r.groups[key]
        if hit:
            self._routes.put(topic, r, now=now)
            self.counters["pruned"] += 1

    def forget_node(self, node_id: bytes) -> bool:
        """``node_id`` is gone (it shut down): drop it from every anchor's answer, so that
        no route sends to it until an answer names it again. Returns whether any anchor
        knew it."""
        found = False
        for a in self._anchors.values():
            if node_id not in a.answer:
                continue
            found = True
            answer = dict(a.answer)
            del answer[node_id]
            self._set_answer(a, answer, True)
        if found:
            self.counters["nodes_forgotten"] += 1
        return found

    # -- internals ------------------------------------------------------------------------

    def _anchor(self, name: str) -> _Anchor:
        a = self._anchors.get(name)
        if a is None:
            while len(self._anchors) >= self.max_anchors:
                self._anchors.popitem(last=False)
                self.counters["anchors_evicted"] += 1
                self._epoch += 1
            a = self._anchors[name] = _Anchor()
        else:
            self._anchors.move_to_end(name)
        return a

    def _known(self, name: str, now: float) -> bool:
        a = self._anchors.get(name)
        return a is not None and a.known_at is not None and now - a.known_at < self.cache_ttl

    def _generations(self, anchors: list[str]) -> tuple[int, ...]:
        out = []
        for name in anchors:
            a = self._anchors.get(name)
            out.append(-1 if a is None else a.generation)
        return tuple(out)

    def _refresh_stale(self, anchors: list[str], now: float) -> None:
        for name in anchors:
            a = self._anchor(name)
            if a.in_flight:
                continue
            fresh = a.known_at is not None and now - a.known_at < self.refresh_after
            if fresh or now - a.looked_at < self.min_interval:
                continue
            a.in_flight = True
            a.looked_at = now
            self.counters["lookups_started"] += 1
            self._to_lookup.append(name)

    def _new_route(self, topic: str, anchors: list[str], now: float) -> _Route:
        targets: set[bytes] = set()
        groups: dict[tuple[str, str], list[bytes]] = {}
        for name in anchors:
            a = self._anchors.get(name)
            if a is None:
                continue
            if len(a.trie):
                targets.update(a.trie.match(topic))
            if len(a.shared):
                for group, flt, nid in a.shared.match(topic):
                    groups.setdefault((group, flt), []).append(nid)
        for nodes in groups.values():
            nodes.sort()  # every publisher sees the same order
        r = _Route(anchors, self._generations(anchors), targets, self._refresh_at(anchors),
                   groups, self._epoch)
        self._routes.put(topic, r, now=now)
        return r

    def _refresh_at(self, anchors: list[str]) -> float:
        """When the first of these anchors' answers becomes due for a refresh."""
        due = float("inf")
        for name in anchors:
            a = self._anchors.get(name)
            if a is None or a.known_at is None:
                return float("-inf")
            due = min(due, a.known_at + self.refresh_after)
        return due

    def tick(self, now: float) -> None:
        """Start the lookups that queued messages still wait for (when rate limiting held
        them back at publish time)."""
        for p in self._pending.values():
            self._refresh_stale(sorted(p.missing), now)

    def _queue(self, topic: str, item: T, missing: set[str]) -> None:
        p = self._pending.get(topic)
        if p is None:
            p = self._pending[topic] = _Pending(deque(), set(missing))
        else:
            p.missing |= missing
        if len(p.items) >= self.max_pending_per_topic:
            p.items.popleft()
            self._pending_count -= 1
            self.counters["pending_dropped"] += 1
        p.items.append(item)
        self._pending_count += 1
        while self._pending_count > self.max_pending:
            # drop the oldest message of the oldest waiting topic
            old_topic, old = next(iter(self._pending.items()))
            old.items.popleft()
            self._pending_count -= 1
            self.counters["pending_dropped"] += 1
            if not old.items:
                del self._pending[old_topic]

    def _release(self, anchor: str, now: float) -> list[tuple[str, set[bytes], list[T]]]:
        out: list[tuple[str, set[bytes], list[T]]] = []
        for topic in list(self._pending):
            p = self._pending[topic]
            p.missing.discard(anchor)
            p.missing = {a for a in p.missing if not self._known(a, now)}
            if p.missing:
                continue
            del self._pending[topic]
            targets = self._new_route(topic, topic_anchors(topic), now).targets
            items = list(p.items)
            self._pending_count -= len(items)
            self.counters["pending_released"] += len(items)
            out.append((topic, targets, items))
        return out

    @property
    def pending(self) -> int:
        return self._pending_count

    def stats(self) -> dict[str, Any]:
        return dict(self.counters, anchors=len(self._anchors), pending=self._pending_count,
                    routes=len(self._routes))
