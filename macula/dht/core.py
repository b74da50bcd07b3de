"""The Kademlia DHT as a sans-IO state machine (aioquic's ``QuicConnection`` style).

``DhtCore`` never touches a socket or a clock. Everything that happens to it is an input
carrying ``now`` (seconds on the caller's clock); everything it wants done is an output that
the caller takes with ``next_action()``:

inputs
    ``receive_request(sender, msg, now) -> reply``   a peer's request (PING / FIND_NODE /
                                                     FIND_VALUE / STORE); returns the reply
    ``receive_response(rid, msg, now)``              the reply to our query ``rid``
    ``receive_failure(rid, now)``                    our query failed (link error, garbage)
    ``peer_gone(node_id)``                           the peer said it is stopping
    ``handle_timer(now)``                            at (or after) ``get_timer()``
commands
    ``start_lookup(target, want_value=, now=)``      -> lookup id (``LookupDone`` at the end)
    ``put(key, value, ttl, now)``                    -> op id (``StoreDone`` at the end)
    ``bootstrap(seeds, now)``                        -> id of the join's ``LookupDone``
outputs (``next_action()``)
    ``SendRequest(rid, contact, msg)``  send ``msg`` to ``contact``; answer with
                                        ``receive_response`` / ``receive_failure``
    ``LookupDone(lookup_id, target, contacts, records, rounds, queries)``
    ``StoreDone(op_id, key, stored, refused, failed)``

Per-query timeouts live here (``query_timeout``, driven by ``handle_timer``), so a whole
network of cores runs on a fake clock with no event loop (tools/simulate_dht.py).

**Routing table upkeep.** Every successful contact (a request from a dialable peer, a valid
reply) is ``RoutingTable.add``-ed. When its bucket is full the table queues the newcomer and
names the bucket's least recently seen contact (LRS). If the LRS was heard from within
``ping_after`` seconds it is known good and stays (the newcomer waits in the replacement
list, as BEP 5's "good nodes"); otherwise we PING it: if it answers it stays (moved to most
recently seen), else it is removed and the newest queued contact is promoted. (Pinging on
every newcomer would cascade: the pinged node learns of the pinger and pings its own LRS,
and so on — measured at ~500 messages per lookup in the simulation before this rule.) A contact
that fails ``evict_after`` queries in a row (failures are remembered for ``failure_memory``
seconds in a ``TTLCache``) is removed the same way. Peers in client mode (port 0) are served
but never added.

**Lookups** (FIND_NODE, FIND_VALUE) keep a shortlist sorted by XOR distance to the target,
start from the table's k closest (and, for bootstrap, the seeds), and keep ``alpha`` queries
in flight, always to the closest contacts not yet asked. A lookup ends when the ``k``
closest contacts that have not failed have all answered (queries still in flight to contacts
that have since been pushed out of the k closest are not waited for), or, for FIND_VALUE,
when ``value_quorum`` nodes have answered with records. A failed or silent contact costs one
slot until its timeout and is then skipped, so it never stalls the lookup. ``rounds`` of a
lookup is the longest chain of queries it made (a contact learned from a reply of a round-r
contact is round r + 1; the table's contacts are round 1): its latency in round trips.

**Records** (``RecordStore``): a key holds one value per publisher, each with its TTL;
STORE is refused (and counted) at a bound. ``put`` (and the owner's republish, every
``ttl * republish_ratio`` seconds until ``unpublish``) is a **store walk**: a shortlist like a
lookup's, whose k closest contacts not failed all get a STORE, and whose STORE_ACKs carry the
storer's k closest contacts to the key (as NODES does), so that a closer node revealed by an
ack joins the shortlist and gets a STORE too. When our table *covers* the key — every bucket
meeting the XOR ball around the key out to its k-th closest contact holds fewer than k
contacts, so (the table being converged) nobody closer exists — the k closest get their
STOREs at once, not alpha-limited: one round of k requests. Otherwise they are first probed
with FIND_NODE (alpha in flight, as a lookup) until the k closest have all answered, and
then stored to; storing at once to contacts far from the key would leave copies on nodes
that closer ones displace. The walk ends when the k closest not failed have all
acknowledged (a failure is skipped and the shortlist topped up from the table, as in a
lookup); this node keeps a copy when it is one of them. Expired values are never served and
are reaped every ``reap_interval``.

**Refresh and bootstrap.** Every ``refresh_check`` seconds, each non-empty bucket with no
contact seen for ``refresh_interval`` gets a lookup of a random id in its range. A bootstrap
is a lookup of our own id starting from the seeds (retried up to ``bootstrap_attempts``
times while nobody answers), then a lookup of a random id in every bucket farther than our
closest neighbour that holds fewer than k contacts; its ``LookupDone`` (our k closest)
comes when all of them are done.

Costs: a reply is O(r log s) for r contacts merged into a shortlist of s; the table's
``closest`` is O(log N) (see docs/cores/routing.md).
"""

from __future__ import annotations

import bisect
import heapq
import random
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from macula import RoutingTable, TTLCache
from macula.dht.messages import (
    Contact,
    FindNode,
    FindValue,
    Nodes,
    Ping,
    Pong,
    Record,
    Request,
    Store,
    StoreAck,
    Values,
)
from macula.dht.store import RecordStore

ID_SIZE = 32

# query purposes
_LOOKUP = 0
_PING = 1  # the least-recently-seen check of a full bucket
_STORE = 2

# shortlist states
_NEW = 0
_INFLIGHT = 1
_DONE = 2
_FAILED = 3
# store-walk states (besides _NEW and _FAILED)
_PROBING = 4  # FIND_NODE in flight (a contact beyond the store radius)
_PROBED = 5  # answered the FIND_NODE: alive, not stored to yet
_STORING = 6  # STORE in flight
_STORED = 7  # acknowledged (stored or refused)
_SELF = 8  # this node: it keeps a copy at the end if it is one of the k closest


@dataclass(frozen=True)
class DhtConfig:
    """Parameters of the DHT (docs/DHT.md lists them with their reasons)."""

    k: int = 20  # bucket size, replication factor, lookup width
    alpha: int = 3  # queries in flight per lookup
    query_timeout: float = 2.0  # seconds before a query counts as failed
    evict_after: int = 2  # consecutive failures that remove a contact from the table
    ping_after: float = 900.0  # a full bucket's LRS seen within this long is kept unpinged
    failure_memory: float = 600.0  # seconds a contact's failure count is remembered
    failure_table: int = 4096  # contacts whose failures are remembered (LRU beyond)
    replacements: int = 20  # replacement list bound per bucket
    bootstrap_attempts: int = 3  # self-lookups tried when no seed answers
    value_quorum: int = 1  # FIND_VALUE ends after this many nodes answered with records
    refresh_interval: float = 3600.0  # a bucket with nobody seen for this long is refreshed
    refresh_check: float = 600.0  # how often buckets are checked for staleness
    reap_interval: float = 60.0  # how often expired records are removed
    republish_ratio: float = 0.5  # the owner republishes after ttl * ratio
    default_ttl: float = 3600.0
    max_ttl: float = 86_400.0  # longer TTLs are clamped to this by the storing node
    max_keys: int = 100_000
    max_values_per_key: int = 256
    max_value_size: int = 1024
    watch_ttl: float = 90.0  # a FIND_VALUE with ``watch`` is told of changes this long (s)
    max_watchers: int = 256  # per key (the oldest registration goes beyond)
    max_watched_keys: int = 100_000  # keys with watchers (the least recently watched goes)

    def __post_init__(self) -> None:
        for name in ("k", "alpha", "evict_after", "failure_table", "value_quorum",
                     "bootstrap_attempts",
                     "max_keys", "max_values_per_key", "max_value_size", "max_watchers",
                     "max_watched_keys"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, not {v!r}")
        if self.replacements < 0:
            raise ValueError(f"replacements must be >= 0, not {self.replacements!r}")
        if not (isinstance(self.ping_after, int | float) and self.ping_after >= 0):
            raise ValueError(f"ping_after must be a number >= 0, not {self.ping_after!r}")
        for name in ("query_timeout", "failure_memory", "refresh_interval", "refresh_check",
                     "reap_interval", "default_ttl", "max_ttl", "watch_ttl"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and v > 0):
                raise ValueError(f"{name} must be a number > 0, not {v!r}")
        if not (0 < self.republish_ratio < 1):
            raise ValueError(f"republish_ratio must be in (0, 1), not {self.republish_ratio!r}")


# -- outputs ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendRequest:
    rid: int
    contact: Contact
    msg: Request


@dataclass(frozen=True, slots=True)
class LookupDone:
    lookup_id: int
    target: bytes
    contacts: list[Contact]  # the k closest that answered, nearest first
    records: list[Record]  # FIND_VALUE: one per publisher (the longest-lived seen)
    rounds: int  # longest chain of queries (round trips)
    queries: int  # queries sent by this lookup


@dataclass(frozen=True, slots=True)
class StoreDone:
    op_id: int
    key: bytes
    stored: int  # nodes that acknowledged (this node included when it keeps a copy)
    refused: int  # nodes that refused (a bound)
    failed: int  # nodes that did not answer


@dataclass(frozen=True, slots=True)
class KeyChanged:
    """A value this node holds changed (new, or different from before): tell the nodes that
    read ``key`` here lately and asked to be told (FIND_VALUE ``watch``). This node itself
    is among ``watchers`` (node id ``DhtCore.node_id``) when its own lookups watched."""

    key: bytes
    publisher: bytes
    value: bytes
    watchers: list[Contact]


Action = SendRequest | LookupDone | StoreDone | KeyChanged


# -- internal state -------------------------------------------------------------------------


class _Query:
    __slots__ = ("contact", "deadline", "lookup", "msg", "op", "purpose", "rid")

    def __init__(self, rid: int, contact: Contact, msg: Request, deadline: float,
                 purpose: int) -> None:
        self.rid = rid
        self.contact = contact
        self.msg = msg
        self.deadline = deadline
        self.purpose = purpose
        self.lookup: _Lookup | None = None
        self.op: _StoreOp | None = None


class _Entry:
    __slots__ = ("contact", "depth", "state")

    def __init__(self, contact: Contact, depth: int) -> None:
        self.contact = contact
        self.depth = depth
        self.state = _NEW


class _Lookup:
    __slots__ = ("cands", "done", "entries", "failed", "inflight", "join", "lid", "notify",
                 "queries", "records", "rounds", "target", "tint", "value_nodes", "want_value",
                 "watch")

    def __init__(self, lid: int, target: bytes, want_value: bool, notify: bool) -> None:
        self.watch = False
        self.lid = lid
        self.target = target
        self.tint = int.from_bytes(target, "big")
        self.want_value = want_value
        self.notify = notify
        self.cands: list[tuple[int, bytes]] = []  # (distance, node id), nearest first
        self.entries: dict[bytes, _Entry] = {}
        self.inflight = 0
        self.failed = 0
        self.records: dict[bytes, Record] = {}
        self.value_nodes = 0
        self.rounds = 0
        self.queries = 0
        self.join: _Join | None = None
        self.done = False


class _Join:
    """A bootstrap: the self-lookup, then a refresh of every bucket farther than our closest
    neighbour that holds fewer than k contacts."""

    __slots__ = ("attempts", "contacts", "lid", "pending", "queries", "rounds", "seeds")

    def __init__(self, lid: int, seeds: list[Contact]) -> None:
        self.lid = lid
        self.seeds = seeds
        self.attempts = 1
        self.contacts: list[Contact] = []
        self.pending = -1  # -1: the self-lookup is still running
        self.queries = 0
        self.rounds = 0


class _StoreOp:
    """A store walk: a shortlist like a lookup's, whose k closest get STOREs."""

    __slots__ = ("cands", "done", "edge", "entries", "failed", "key", "kint", "nfailed",
                 "notify", "op_id", "probes", "refused", "stored", "sure", "ttl",
                 "value", "waiting")

    def __init__(self, op_id: int, key: bytes, value: bytes, ttl: float, notify: bool) -> None:
        self.op_id = op_id
        self.key = key
        self.kint = int.from_bytes(key, "big")
        self.value = value
        self.ttl = ttl
        self.notify = notify
        self.cands: list[tuple[int, bytes]] = []  # (distance, node id), nearest first
        self.entries: dict[bytes, _Entry] = {}
        self.sure = False  # the k closest not failed get STOREs (else: probe them first)
        self.edge = -1  # distance of the k-th closest at the last step (-1: fewer than k)
        self.waiting = 0  # queries out to the k closest at the last step
        self.probes = 0  # FIND_NODEs in flight
        self.failed = 0  # STOREs that failed
        self.nfailed = 0  # contacts that failed (STORE or FIND_NODE)
        self.stored = 0
        self.refused = 0
        self.done = False


class _Published:
    __slots__ = ("gen", "ttl", "value")

    def __init__(self, value: bytes, ttl: float, gen: int) -> None:
        self.value = value
        self.ttl = ttl
        self.gen = gen


def _check_id(name: str, value: object) -> bytes:
    if type(value) is not bytes:
        raise TypeError(f"{name} must be bytes, not {type(value).__name__}")
    if len(value) != ID_SIZE:
        raise ValueError(f"{name} must be {ID_SIZE} bytes, not {len(value)}")
    return value


class DhtCore:
    """One node's Kademlia state: routing table, lookups, record store, republish, refresh."""

    def __init__(
        self,
        node_id: bytes,
        *,
        config: DhtConfig | None = None,
        now: float,
        rng: random.Random | None = None,
        client_mode: bool = False,
    ) -> None:
        self.node_id = _check_id("node_id", node_id)
        self.config = cfg = config or DhtConfig()
        self.client_mode = client_mode
        self._rng = rng or random.Random()
        self.table = RoutingTable(node_id, cfg.k, replacements=cfg.replacements)
        self.store = RecordStore(
            max_keys=cfg.max_keys,
            max_values_per_key=cfg.max_values_per_key,
            max_value_size=cfg.max_value_size,
            max_ttl=cfg.max_ttl,
        )
        self._failures: TTLCache[bytes, int] = TTLCache(cfg.failure_table, cfg.failure_memory)
        self._queries: dict[int, _Query] = {}
        self._deadlines: list[tuple[float, int]] = []
        self._next_id = 1
        self._lookups: dict[int, _Lookup] = {}
        self._pinging: set[bytes] = set()
        self._actions: deque[Action] = deque()
        self._published: dict[bytes, _Published] = {}
        # key -> node id -> (the watcher, until when): see "watches" below
        self._watches: OrderedDict[bytes, OrderedDict[bytes, tuple[Contact, float]]] = (
            OrderedDict())
        self._republish: list[tuple[float, bytes, int]] = []
        self._next_reap = now + cfg.reap_interval
        self._next_refresh = now + cfg.refresh_check
        self.stats: dict[str, int] = dict.fromkeys(
            ("requests_in", "queries_out", "replies_in", "timeouts", "failures", "bad_replies",
             "late_replies", "evictions", "pings_out", "lookups", "stores", "republishes",
             "refreshes", "client_mode_peers", "changes_told", "watches_dropped"), 0)

    # -- outputs --------------------------------------------------------------------------

    def next_action(self) -> Action | None:
        """The next thing to do, or None."""
        return self._actions.popleft() if self._actions else None

    def get_timer(self) -> float | None:
        """When ``handle_timer`` must next be called (never None: reaping is periodic)."""
        heap = self._deadlines
        queries = self._queries
        while heap and heap[0][1] not in queries:
            heapq.heappop(heap)  # answered already
        t = min(self._next_reap, self._next_refresh)
        if heap and heap[0][0] < t:
            t = heap[0][0]
        if self._republish and self._republish[0][0] < t:
            t = self._republish[0][0]
        return t

    # -- commands -------------------------------------------------------------------------

    def start_lookup(self, target: bytes, *, want_value: bool = False, now: float,
                     seeds: list[Contact] | None = None, watch: bool = False) -> int:
        """Start an iterative FIND_NODE (or FIND_VALUE) lookup; returns its id. A
        ``LookupDone`` with that id follows (possibly at once). ``watch`` (FIND_VALUE): the
        nodes that answer, this one included, report later changes of the key's values for
        ``watch_ttl`` seconds (``KeyChanged``)."""
        _check_id("target", target)
        return self._lookup(target, want_value, now, notify=True, seeds=seeds,
                            watch=watch and want_value).lid

    def bootstrap(self, seeds: list[Contact], now: float) -> int:
        """Join through ``seeds`` (contacts whose node ids are known): a lookup of our own id
        that starts from them. Returns its lookup id."""
        for s in seeds:
            if not isinstance(s, Contact):
                raise TypeError(f"seeds must be Contact, not {type(s).__name__}")
        seeds = [s for s in seeds if s.node_id != self.node_id and s.dialable]
        join = _Join(self._new_id(), seeds)
        self._lookup(self.node_id, False, now, notify=False, seeds=seeds, join=join)
        return join.lid

    def put(self, key: bytes, value: bytes, ttl: float | None = None, *, now: float) -> int:
        """Publish ``value`` under ``key`` as this node (replacing our previous value there)
        on the key's k closest nodes, and republish it until ``unpublish``. Returns the op id
        of the ``StoreDone`` that follows."""
        _check_id("key", key)
        if not isinstance(value, bytes):
            raise TypeError(f"value must be bytes, not {type(value).__name__}")
        cfg = self.config
        if len(value) > cfg.max_value_size:
            raise ValueError(f"value must be at most max_value_size ({cfg.max_value_size}) "
                             f"bytes, not {len(value)}")
        ttl = cfg.default_ttl if ttl is None else float(ttl)
        if not (0 < ttl <= cfg.max_ttl):
            raise ValueError(f"ttl must be in (0, max_ttl={cfg.max_ttl}], not {ttl}")
        gen = self._new_id()
        self._published[key] = _Published(value, ttl, gen)
        heapq.heappush(self._republish, (now + ttl * cfg.republish_ratio, key, gen))
        return self._start_store(key, value, ttl, now, notify=True)

    def unpublish(self, key: bytes) -> bool:
        """Stop republishing our value under ``key`` (the copies expire with their TTL)."""
        return self._published.pop(key, None) is not None

    def peer_gone(self, node_id: bytes) -> bool:
        """The peer announced it is stopping: forget it now (a replacement is promoted)."""
        return self._evict(node_id)

    # -- inputs ---------------------------------------------------------------------------

    def receive_request(self, sender: Contact, msg: Request, now: float) -> Any:
        """Answer a peer's request (and note the peer as a successful contact). Returns the
        reply message. ``TypeError`` for a message that is not a request."""
        t = type(msg)
        if t is FindNode:
            reply: Any = Nodes(msg.rid, self._closest_for(msg.target, sender.node_id))  # type: ignore[union-attr]
        elif t is FindValue:
            key = msg.key  # type: ignore[union-attr]
            if msg.watch:  # type: ignore[union-attr]
                self._add_watch(key, sender, now)
            recs = [Record(p, v, ttl) for p, v, ttl in self.store.get(key, now)]
            # with records, closer contacts are only useful to a lookup wanting more holders
            contacts = (self._closest_for(key, sender.node_id)
                        if not recs or self.config.value_quorum > 1 else [])
            reply = Values(msg.rid, recs, contacts)
        elif t is Store:
            assert isinstance(msg, Store)
            old = self.store.value(msg.key, sender.node_id, now)
            reason = self.store.put(msg.key, sender.node_id, msg.value, msg.ttl, now)
            if not reason and old != msg.value:
                self._changed(msg.key, sender.node_id, msg.value, now)
            reply = StoreAck(msg.rid, not reason, reason,
                             self._closest_for(msg.key, sender.node_id))
        elif t is Ping:
            reply = Pong(msg.rid)
        else:
            raise TypeError(f"not a DHT request: {t.__name__}")
        self.stats["requests_in"] += 1
        if sender.node_id != self.node_id:
            self._seen(sender, now)
        return reply

    def receive_response(self, rid: int, msg: object, now: float) -> None:
        """The reply to our query ``rid``. A reply of the wrong type, with another rid, or
        with malformed contents counts as a failure of the contact (``bad_replies``)."""
        q = self._queries.pop(rid, None)
        if q is None:
            self.stats["late_replies"] += 1
            return
        if not self._valid_reply(q, msg):
            self.stats["bad_replies"] += 1
            self._failed(q, now)
            return
        self.stats["replies_in"] += 1
        self._seen(q.contact, now)
        if q.purpose == _LOOKUP:
            lk = q.lookup
            assert lk is not None
            if not lk.done:
                self._lookup_reply(lk, q, msg, now)
        elif q.purpose == _STORE:
            op = q.op
            assert op is not None
            self._walk_reply(op, q, msg, now)
        else:  # _PING: _seen() above has moved the contact to the most recently seen end
            self._pinging.discard(q.contact.node_id)

    def receive_failure(self, rid: int, now: float) -> None:
        """Our query ``rid`` failed (link error, timeout seen by the caller, garbage)."""
        q = self._queries.pop(rid, None)
        if q is not None:
            self._failed(q, now)

    def handle_timer(self, now: float) -> None:
        """Run what is due: query timeouts, republishing, reaping, bucket refresh."""
        heap = self._deadlines
        queries = self._queries
        while heap and heap[0][0] <= now:
            _, rid = heapq.heappop(heap)
            q = queries.pop(rid, None)
            if q is not None:
                self.stats["timeouts"] += 1
                self._failed(q, now)
        cfg = self.config
        rep = self._republish
        while rep and rep[0][0] <= now:
            _, key, gen = heapq.heappop(rep)
            pub = self._published.get(key)
            if pub is None or pub.gen != gen:
                continue
            heapq.heappush(rep, (now + pub.ttl * cfg.republish_ratio, key, gen))
            self.stats["republishes"] += 1
            self._start_store(key, pub.value, pub.ttl, now, notify=False)
        if now >= self._next_reap:
            self.store.reap(now)
            self._next_reap = now + cfg.reap_interval
        if now >= self._next_refresh:
            self._next_refresh = now + cfg.refresh_check
            for i in self.table.stale_buckets(cfg.refresh_interval, now):
                self.stats["refreshes"] += 1
                self._lookup(self.random_id_in_bucket(i), False, now, notify=False)

    def random_id_in_bucket(self, i: int) -> bytes:
        """A random id sharing exactly ``i`` leading bits with ours."""
        own = int.from_bytes(self.node_id, "big")
        low = self._rng.getrandbits(255 - i) if i < 255 else 0
        v = (((own >> (255 - i)) ^ 1) << (255 - i)) | low
        return v.to_bytes(ID_SIZE, "big")

    # -- routing table --------------------------------------------------------------------

    def _seen(self, contact: Contact, now: float) -> None:
        """A successful contact: add it (or refresh it); a full bucket pings its LRS."""
        if contact.port == 0:  # client mode: never routed to
            self.stats["client_mode_peers"] += 1
            return
        nid = contact.node_id
        if len(self._failures):
            self._failures.pop(nid, now=now)
        table = self.table
        lrs = table.add(nid, contact, now)
        if lrs is not None and lrs not in self._pinging:
            target = table.get(lrs)
            seen = table.last_seen(lrs)
            if target is not None and (seen is None or now - seen >= self.config.ping_after):
                self._pinging.add(lrs)
                self.stats["pings_out"] += 1
                rid = self._new_id()
                self._send(rid, target, Ping(rid), now, _PING)

    def _failed(self, q: _Query, now: float) -> None:
        self.stats["failures"] += 1
        nid = q.contact.node_id
        if q.purpose == _PING:
            self._pinging.discard(nid)
            self._evict(nid)
        else:
            n = self._failures.get(nid, 0, now=now) + 1
            if n >= self.config.evict_after:
                self._evict(nid)
            else:
                self._failures.put(nid, n, now=now)
        if q.purpose == _LOOKUP:
            lk = q.lookup
            assert lk is not None
            lk.inflight -= 1
            e = lk.entries.get(nid)
            if e is not None:
                e.state = _FAILED
            if not lk.done:
                # top up from the table so that a dead neighbourhood cannot empty the lookup
                lk.failed += 1
                more = self.table.closest(lk.target, self.config.k + lk.failed)
                self._merge(lk, [c for _, c in more], 1)
                self._advance(lk, now)
        elif q.purpose == _STORE:
            op = q.op
            assert op is not None
            if type(q.msg) is Store:
                op.failed += 1
            else:
                op.probes -= 1
            e = op.entries.get(nid)
            if e is not None:
                e.state = _FAILED
            if not op.done:
                # top up from the table, as a lookup does
                op.nfailed += 1
                more = self.table.closest(op.key, self.config.k + op.nfailed)
                self._walk_merge(op, [c for _, c in more])
                self._walk_step(op, now)

    def _evict(self, nid: bytes) -> bool:
        self._failures.pop(nid, now=0.0)
        if self.table.remove(nid):
            self.stats["evictions"] += 1
            return True
        return False

    def _closest_for(self, target: bytes, exclude: bytes) -> list[Contact]:
        k = self.config.k
        pairs = self.table.closest(target, k + 1)
        out = [c for nid, c in pairs if nid != exclude]
        del out[k:]
        return out

    # -- queries --------------------------------------------------------------------------

    def _new_id(self) -> int:
        i = self._next_id
        self._next_id = i + 1
        return i

    def _send(self, rid: int, contact: Contact, msg: Request, now: float,
              purpose: int) -> _Query:
        deadline = now + self.config.query_timeout
        q = _Query(rid, contact, msg, deadline, purpose)
        self._queries[rid] = q
        heapq.heappush(self._deadlines, (deadline, rid))
        self.stats["queries_out"] += 1
        self._actions.append(SendRequest(rid, contact, msg))
        return q

    def _valid_reply(self, q: _Query, msg: object) -> bool:
        t = type(msg)
        qt = type(q.msg)
        if qt is FindNode:
            ok = t is Nodes
        elif qt is FindValue:
            ok = t is Values
        elif qt is Store:
            ok = t is StoreAck
        else:
            ok = t is Pong
        if not ok or msg.rid != q.rid:  # type: ignore[attr-defined]
            return False
        if t is Nodes or t is Values or t is StoreAck:
            contacts = msg.contacts  # type: ignore[attr-defined]
            if not isinstance(contacts, list) or len(contacts) > 2 * self.config.k:
                return False
            for c in contacts:
                if type(c) is not Contact:
                    return False
                nid = c.node_id
                port = c.port
                if (type(nid) is not bytes or len(nid) != ID_SIZE or type(port) is not int
                        or not 0 < port < 65536 or type(c.host) is not str):
                    return False
            if t is Values:
                recs = msg.records  # type: ignore[attr-defined]
                if not isinstance(recs, list):
                    return False
                for r in recs:
                    if (type(r) is not Record or type(r.publisher) is not bytes
                            or len(r.publisher) != ID_SIZE or type(r.value) is not bytes
                            or not isinstance(r.ttl, float | int) or not r.ttl > 0
                            or len(r.value) > self.config.max_value_size):
                        return False
        return True

    # -- lookups --------------------------------------------------------------------------

    def _lookup(self, target: bytes, want_value: bool, now: float, *, notify: bool,
                seeds: list[Contact] | None = None, join: _Join | None = None,
                watch: bool = False) -> _Lookup:
        lk = _Lookup(self._new_id(), target, want_value, notify)
        lk.join = join
        lk.watch = watch
        self._lookups[lk.lid] = lk
        self.stats["lookups"] += 1
        if watch and not self.client_mode:
            self._add_watch(target, Contact(self.node_id, "", 0), now)
        if want_value:
            for p, v, ttl in self.store.get(target, now):
                lk.records[p] = Record(p, v, ttl)
            if lk.records:
                lk.value_nodes = 1
        initial = [c for _, c in self.table.closest(target, self.config.k)]
        if seeds:
            initial.extend(seeds)
        self._merge(lk, initial, 1)
        self._advance(lk, now)
        return lk

    def _shortlist_add(self, entries: dict[bytes, _Entry], cands: list[tuple[int, bytes]],
                       target: int, contacts: list[Contact], depth: int) -> int | None:
        """Add the contacts not seen yet (nor this node, nor undiallable ones) to a lookup's
        or store walk's shortlist, kept sorted by distance to ``target``; the smallest
        distance added (None: nothing new)."""
        own = self.node_id
        nearest: int | None = None
        for c in contacts:
            nid = c.node_id
            if nid in entries or nid == own or c.port == 0:
                continue
            entries[nid] = _Entry(c, depth)
            d = int.from_bytes(nid, "big") ^ target
            bisect.insort(cands, (d, nid))
            if nearest is None or d < nearest:
                nearest = d
        return nearest

    def _merge(self, lk: _Lookup, contacts: list[Contact], depth: int) -> None:
        self._shortlist_add(lk.entries, lk.cands, lk.tint, contacts, depth)

    def _lookup_reply(self, lk: _Lookup, q: _Query, msg: Any, now: float) -> None:
        lk.inflight -= 1
        e = lk.entries[q.contact.node_id]
        e.state = _DONE
        if type(msg) is Values and msg.records:
            lk.value_nodes += 1
            recs = lk.records
            for r in msg.records:
                old = recs.get(r.publisher)
                if old is None or r.ttl > old.ttl:
                    recs[r.publisher] = r
        self._merge(lk, msg.contacts, e.depth + 1)
        self._advance(lk, now)

    def _advance(self, lk: _Lookup, now: float) -> None:
        """Send queries to the closest unasked contacts (up to alpha in flight); finish when
        the k closest not failed have all answered, or the value quorum is reached."""
        if lk.want_value and lk.value_nodes >= self.config.value_quorum:
            self._finish(lk, now)
            return
        k = self.config.k
        alpha = self.config.alpha
        entries = lk.entries
        active = 0
        waiting = 0
        for _, nid in lk.cands:
            e = entries[nid]
            st = e.state
            if st == _FAILED:
                continue
            if st == _NEW:
                if lk.inflight < alpha:
                    rid = self._new_id()
                    msg: Request = (FindValue(rid, lk.target, lk.watch) if lk.want_value
                                    else FindNode(rid, lk.target))
                    q = self._send(rid, e.contact, msg, now, _LOOKUP)
                    q.lookup = lk
                    e.state = _INFLIGHT
                    lk.inflight += 1
                    lk.queries += 1
                    if e.depth > lk.rounds:
                        lk.rounds = e.depth
                waiting += 1
            elif st == _INFLIGHT:
                waiting += 1
            active += 1
            if active >= k:
                break
        if waiting == 0:
            self._finish(lk, now)

    def _finish(self, lk: _Lookup, now: float) -> None:
        lk.done = True
        del self._lookups[lk.lid]
        k = self.config.k
        entries = lk.entries
        contacts: list[Contact] = []
        for _, nid in lk.cands:
            e = entries[nid]
            if e.state == _DONE:
                contacts.append(e.contact)
                if len(contacts) >= k:
                    break
        if lk.join is not None:
            self._join_step(lk.join, lk, contacts, now)
        elif lk.notify:
            self._actions.append(LookupDone(lk.lid, lk.target, contacts,
                                            list(lk.records.values()), lk.rounds, lk.queries))

    def _join_step(self, join: _Join, lk: _Lookup, contacts: list[Contact],
                   now: float) -> None:
        join.queries += lk.queries
        if join.pending < 0 and not contacts and join.attempts < self.config.bootstrap_attempts:
            join.attempts += 1  # nobody answered (a lost reply, a dead seed): try again
            self._lookup(self.node_id, False, now, notify=False, seeds=join.seeds, join=join)
            return
        if join.pending < 0:  # the self-lookup is done: refresh the farther buckets
            join.contacts = contacts
            join.rounds = lk.rounds
            join.pending = 0
            table = self.table
            nearest = table.bucket_of(contacts[0].node_id) if contacts else 0
            k = self.config.k
            for i in range(nearest):
                if len(table.bucket(i)) < k:
                    join.pending += 1
                    self._lookup(self.random_id_in_bucket(i), False, now, notify=False,
                                 join=join)
        else:
            join.pending -= 1
        if join.pending == 0:
            self._actions.append(LookupDone(join.lid, self.node_id, join.contacts, [],
                                            join.rounds, join.queries))

    # -- stores ---------------------------------------------------------------------------

    def _start_store(self, key: bytes, value: bytes, ttl: float, now: float, *,
                     notify: bool) -> int:
        """Start a store walk (the module docstring): STOREs to the table's k closest to
        the key that lie within the store radius, FIND_NODE probes (alpha in flight) to the
        farther ones, and the same for every closer contact the replies reveal."""
        k = self.config.k
        op = _StoreOp(self._new_id(), key, value, ttl, notify)
        self.stats["stores"] += 1
        closest = self.table.closest(key, k)
        op.sure = self._table_covers(key, closest)
        if not self.client_mode:  # we are a candidate holder ourselves
            e = _Entry(Contact(self.node_id, "", 0), 0)
            e.state = _SELF
            op.entries[self.node_id] = e
            bisect.insort(op.cands, (int.from_bytes(self.node_id, "big") ^ op.kint,
                                     self.node_id))
        self._walk_merge(op, [c for _, c in closest])
        self._walk_step(op, now)
        return op.op_id

    def _table_covers(self, key: bytes, closest: list[tuple[bytes, Contact]]) -> bool:
        """Whether our table holds every node of the network that is at least as close to
        ``key`` as its k-th closest contact, assuming the table is converged (a bucket that
        is not full holds every node of its range): true when every bucket meeting that XOR
        ball holds fewer than k contacts."""
        k = self.config.k
        table = self.table
        own = int.from_bytes(self.node_id, "big")
        kint = int.from_bytes(key, "big")
        radius = (int.from_bytes(closest[-1][0], "big") ^ kint if len(closest) >= k
                  else (1 << 256) - 1)
        p = 256 - radius.bit_length()  # the ball is the subtree of the key's first p bits
        i = 256 - (kint ^ own).bit_length()  # the key's bucket
        if p > i:  # the ball lies inside bucket i's range
            return len(table.bucket(i)) < k
        # the ball holds our own subtree of depth p: buckets p .. our closest neighbour's
        nearest = table.closest(self.node_id, 1)
        last = table.bucket_of(nearest[0][0]) if nearest else -1
        return all(len(table.bucket(j)) < k for j in range(p, last + 1))

    def _walk_merge(self, op: _StoreOp, contacts: list[Contact]) -> bool:
        """Add new contacts to the shortlist; True if one of them is among the k closest."""
        nearest = self._shortlist_add(op.entries, op.cands, op.kint, contacts, 0)
        return nearest is not None and (op.edge < 0 or nearest < op.edge)

    def _walk_reply(self, op: _StoreOp, q: _Query, msg: Any, now: float) -> None:
        nid = q.contact.node_id
        e = op.entries[nid]
        if type(msg) is StoreAck:
            e.state = _STORED
            if msg.ok:
                op.stored += 1
            else:
                op.refused += 1
            if op.done:
                return
            if not self._walk_merge(op, msg.contacts) and op.sure:
                # the k closest are unchanged (the common case): no need to walk them again
                if op.edge >= 0 and (int.from_bytes(nid, "big") ^ op.kint) > op.edge:
                    return  # an ack from outside the k closest: nothing waited for it
                op.waiting -= 1
                if op.waiting > 0:
                    return
        else:  # Nodes, the reply to a probe
            op.probes -= 1
            e.state = _PROBED
            if op.done:
                return
            self._walk_merge(op, msg.contacts)
        self._walk_step(op, now)

    def _walk_step(self, op: _StoreOp, now: float) -> None:
        """Among the k closest contacts not failed: until they are sure (the table covered
        the key, or they all answered a probe) probe the unasked ones, alpha in flight;
        then STORE to every one not stored to. Done when all k have acknowledged; then keep
        a copy here if we are one of them."""
        k = self.config.k
        entries = op.entries
        top: list[_Entry] = []
        edge = -1
        unsure = 0  # contacts not probed yet, or probes out
        for d, nid in op.cands:
            e = entries[nid]
            st = e.state
            if st == _FAILED:
                continue
            if st in (_NEW, _PROBING):
                unsure += 1
            top.append(e)
            if len(top) >= k:
                edge = d
                break
        if not op.sure and unsure == 0:
            op.sure = True  # the probes converged: the k closest are known
        sure = op.sure
        alpha = self.config.alpha
        waiting = 0
        for e in top:
            st = e.state
            if st in (_NEW, _PROBED):
                if sure:
                    self._walk_send(op, e, True, now)
                elif st == _NEW and op.probes < alpha:
                    self._walk_send(op, e, False, now)
                waiting += 1
            elif st in (_PROBING, _STORING):
                waiting += 1
        op.waiting = waiting
        op.edge = edge
        if waiting:
            return
        op.done = True
        for e in top:
            if e.state == _SELF:
                old = self.store.value(op.key, self.node_id, now)
                if self.store.put(op.key, self.node_id, op.value, op.ttl, now):
                    op.refused += 1
                else:
                    op.stored += 1
                    if old != op.value:
                        self._changed(op.key, self.node_id, op.value, now)
        if op.notify:
            self._actions.append(StoreDone(op.op_id, op.key, op.stored, op.refused, op.failed))

    def _walk_send(self, op: _StoreOp, e: _Entry, store: bool, now: float) -> None:
        rid = self._new_id()
        msg: Request
        if store:
            msg = Store(rid, op.key, op.value, op.ttl)
            e.state = _STORING
        else:
            msg = FindNode(rid, op.key)
            e.state = _PROBING
            op.probes += 1
        q = self._send(rid, e.contact, msg, now, _STORE)
        q.op = op

    # -- introspection --------------------------------------------------------------------

    # -- watches ---------------------------------------------------------------------------
    #
    # A node that reads a key with ``watch`` is told of every later change of the key's
    # values here (a new or different value of a publisher), for ``watch_ttl`` seconds after
    # its read: a reader that keeps reading keeps watching. Registering and answering happen
    # in one step, so no change is missed between the read and the registration. Bounded:
    # ``max_watchers`` per key (the oldest registration goes), ``max_watched_keys`` keys
    # (the least recently watched goes); both counted.

    def _add_watch(self, key: bytes, who: Contact, now: float) -> None:
        cfg = self.config
        ws = self._watches.get(key)
        if ws is None:
            ws = self._watches[key] = OrderedDict()
            while len(self._watches) > cfg.max_watched_keys:
                self._watches.popitem(last=False)
                self.stats["watches_dropped"] += 1
        else:
            self._watches.move_to_end(key)
        ws[who.node_id] = (who, now + cfg.watch_ttl)
        ws.move_to_end(who.node_id)
        while len(ws) > cfg.max_watchers:
            ws.popitem(last=False)
            self.stats["watches_dropped"] += 1

    def _changed(self, key: bytes, publisher: bytes, value: bytes, now: float) -> None:
        ws = self._watches.get(key)
        if not ws:
            return
        for nid in [n for n, (_, until) in ws.items() if until <= now]:
            del ws[nid]
        if not ws:
            del self._watches[key]
            return
        self.stats["changes_told"] += len(ws)
        self._actions.append(KeyChanged(key, publisher, value, [c for c, _ in ws.values()]))

    @property
    def lookups_in_progress(self) -> int:
        return len(self._lookups)

    @property
    def queries_in_flight(self) -> int:
        return len(self._queries)

    def snapshot_stats(self) -> dict[str, int]:
        out = dict(self.stats)
        out["contacts"] = len(self.table)
        out.update(self.store.stats())
        return out

