"""The mesh of one node: pub/sub and RPC across nodes (docs/MESH.md).

``Mesh`` joins the node's broker (``macula.control.broker``) to the other nodes. It owns the
node's QUIC ``WireEndpoint`` (docs/WIRE.md), a ``Dht`` sharing that endpoint (docs/DHT.md),
the ``Advertiser`` (what this node's clients subscribe to, as DHT records), one
``Discovery`` per realm (where a topic must go: the subscriber cache, the direct routing
table, rate-limited refresh, the bounded pending queue), a QoS 1 ``Outbox`` per remote node
and one ``Inbox``.

Publishing (``publish``, called by the broker for every PUBLISH of a local client)
    One ``Discovery.plan`` (a ``TTLCache`` hit once the topic is known) gives the nodes
    with a matching plain subscription and the shared groups elsewhere. The message's
    entry is built once from the broker's encoded tail and appended to a per-node buffer;
    at the end of the loop iteration each node's buffer leaves as one PUB frame per realm
    on its pooled link (``send_nowait``: over the send buffer the QoS 0 messages are
    dropped and counted, QoS 1 ones are re-sent by the outbox). Discovery never blocks a
    publish: a topic whose anchors are not known yet queues its messages in the bounded
    pending queue and lookups start at once; the answer releases them.

Receiving (PUB frames)
    Each message is handed to the broker (``Broker.inject``), which matches exactly against
    the local subscriptions (or the shards). A topic nothing here matches any more is named
    in a NOMATCH frame back, and the publisher drops this node from that topic's route
    until the anchors' answers change. QoS 1 messages (``mid`` > 0) are de-duplicated by
    ``(origin, incarnation, mid)`` and acknowledged (ACK frames, batched) once handed to the
    subscribers, or refused when a subscriber has no room (the sender keeps it and sends it
    again); the publisher's outbox re-sends on ``ack_timeout`` while the node is reachable,
    keeps everything for a node declared gone, and sends it all when a link comes up
    (bounded by ``qos1_ttl`` and ``max_outbox_bytes``; ``macula.mesh.qos``).

Shared subscriptions (one delivery per group per message, mesh-wide)
    Nodes advertise ``$share/<group>/<filter>`` like other filters. For each group that
    matches a topic, the publishing node picks ONE node among those with members (itself
    included) in turn (round robin over the node ids in a fixed order) and names the group
    in that node's entry; a node delivers to a group only when named (or, for its own
    clients' messages, when it picked itself). While a topic is still being discovered,
    local members take the message.

RPC
    A node advertises each procedure its clients provide as a DHT record under
    ``dht_key(realm, "rpc", procedure)`` (``macula.mesh.rpc.ProviderRecord``). A CALL with
    no local provider goes to the mesh (``macula.mesh.calls``): the provider list comes from
    a TTL cache (or one DHT lookup, shared by concurrent callers; none -> NO_PROVIDER at
    once), ordered by the registration's strategy; a failure before delivery tries the next
    provider, one after delivery only for idempotent procedures; results of registrations
    with a cache TTL are cached by the caller's node.

Nodes that die
    A link that goes down (other than by replacement or eviction) is re-dialled; if that
    fails the node is declared gone: calls avoid it, QoS 0 for it is dropped (counted), and
    QoS 1 waits in its outbox while it is probed; it keeps its routes. A node that said it
    was shutting down is forgotten: removed from every route and provider list and its older
    adverts ignored for ``dead_node_ttl`` seconds. Log lines per event, rate-limited.

Wire kinds (one-way unless noted): 0x20 PUB ``[realm, incarnation, low mark, [[mid, topic,
payload, groups]...]]``, 0x21 ACK ``[incarnation, [acknowledged mid...], [refused mid...]]``,
0x27 NOTIFY ``[DHT key, publisher, record]``, 0x22 NOMATCH ``[realm, [topic...]]``, 0x23
CALL (request) ``[realm, procedure, args, timeout_ms]`` answered with the result's msgpack
bytes or a status 0x30-0x34, 0x24 ERROR ``[kind, message]`` (a malformed one-way message
was dropped; both ends count it, the link stays up).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from macula import TopicTrie, TTLCache, parse_shared, validate_topic
from macula.control import protocol as p
from macula.dht import messages as dm
from macula.dht.core import DhtConfig, KeyChanged
from macula.dht.driver import Dht
from macula.dht.keys import dht_key
from macula.mesh.advertiser import Advertiser, decode_advert
from macula.mesh.calls import Calls
from macula.mesh.discovery import Advert, Discovery
from macula.mesh.kinds import (
    KIND_ACK,
    KIND_CALL,
    KIND_ERROR,
    KIND_NOMATCH,
    KIND_NOTIFY,
    KIND_PUB,
    KIND_RELAY,
    KIND_RELAY_REQ,
    STATUS_BAD_CALL,
    STATUS_UNREACHABLE,
)
from macula.mesh.qos import Inbox, MessageIds, OriginState, Outbox
from macula.wire import (
    LinkError,
    NodeIdentity,
    PeerLink,
    RemoteError,
    RequestRejected,
    WireConfig,
    WireEndpoint,
    WireHandler,
)
from macula.wire import messages as wm

if TYPE_CHECKING:
    from macula.control.broker import Broker, Group, Session

_MAX_ENTRIES_PER_FRAME = 4096
_BAD = object()  # a topic refused in this frame
_NO_GROUPS = b"\x90"

_enc = msgspec.msgpack.Encoder()
_PubEntry = tuple[int, str, bytes, list[tuple[str, str]]]
# [realm, incarnation, low mark, entries]
_PUB_DEC = msgspec.msgpack.Decoder(tuple[str, int, int, list[_PubEntry]])
# [incarnation of the PUBs' sender, acknowledged ids, refused ids]
_ACK_DEC = msgspec.msgpack.Decoder(tuple[int, list[int], list[int]])
_NOTIFY_DEC = msgspec.msgpack.Decoder(tuple[bytes, bytes, bytes])  # key, publisher, record
log = logging.getLogger("macula.mesh")
_NOMATCH_DEC = msgspec.msgpack.Decoder(tuple[str, list[str]])


class _ErrorMsg(msgspec.Struct, array_like=True):
    kind: int
    message: str
    target: bytes | None = None  # a refused relay: the node it could not reach


_ERROR_DEC = msgspec.msgpack.Decoder(_ErrorMsg)
_RELAY_DEC = msgspec.msgpack.Decoder(tuple[bytes, bytes, int, int, bytes])
_RELAY_REQ_DEC = msgspec.msgpack.Decoder(tuple[bytes, int, int, bytes])


@dataclass
class MeshConfig:
    """Settings of the mesh (docs/MESH.md lists them; ``NodeConfig`` fills them)."""

    host: str = "127.0.0.1"
    port: int = 4433  # 0: an ephemeral port
    advertise: tuple[str, int] | None = None  # the address others dial (default host:port)
    client_mode: bool = False  # dial out only; reachable over the links it opens
    seeds: list[tuple[str, int]] = field(default_factory=list)
    network: str = "macula"  # the wire's admission realm: nodes of one mesh share it
    network_secret: bytes | None = None
    cache_ttl: float = 60.0  # how long a discovery answer is used (s)
    min_interval: float = 1.0  # at most one lookup per anchor per this (s)
    # refresh an answer in use this old (default cache_ttl / 2: changes are pushed, NOTIFY)
    refresh_after: float | None = None
    record_ttl: float = 300.0  # TTL of this node's subscription records in the DHT (s)
    advert_interval: float = 0.2  # debounce of re-advertising a changed anchor (s)
    ack_timeout: float = 1.0  # QoS 1 re-send after this long without ACK (s)
    qos1_ttl: float = 300.0  # a QoS 1 message not acknowledged this long is lost (counted)
    max_inflight: int = 100_000  # unacknowledged QoS 1 messages per node (refused beyond)
    max_outbox_bytes: int = 64 << 20  # their bytes per node (refused beyond)
    probe_interval: float = 0.5  # dial a node that holds QoS 1 messages this often (s)
    # after a start, QoS 1 messages nothing here matches are refused (sent again later), not
    # acknowledged, for this long: the clients of a restarted node are still reconnecting
    restore_grace: float = 5.0
    max_pending: int = 100_000  # messages waiting for discovery, all topics (oldest dropped)
    max_pending_per_topic: int = 1_000
    max_routes: int = 100_000  # topics in the direct routing table (LRU)
    max_anchors: int = 100_000  # anchors in the subscriber cache (LRU)
    max_dedup_per_origin: int = 1_000_000  # received QoS 1 ids remembered per origin
    log_interval: float = 10.0  # at most one log line per node and event kind per this (s)
    provider_ttl: float = 30.0  # cached provider lists (s)
    max_call_attempts: int = 3  # providers tried per call
    result_cache_size: int = 10_000
    dead_node_ttl: float = 30.0  # adverts of a node found dead are ignored this long (s)
    bootstrap_timeout: float = 5.0
    max_hops: int = 2  # relays a message for a client-mode node may pass
    max_lookups: int = 64  # discovery lookups in flight at once (the others wait in order)
    backlog_high: int = 8 << 20  # bytes waiting for room on open links: stop reading clients
    max_backlog: int = 32 << 20  # bytes waiting per node; beyond, the oldest frames drop
    tick: float = 0.05  # upkeep timer (s)
    wire: WireConfig = field(default_factory=lambda: WireConfig(dial_timeout=2.0,
                                                                redial_attempts=2,
                                                                backoff_max=1.0))
    dht: DhtConfig = field(default_factory=lambda: DhtConfig(max_value_size=16_384,
                                                             query_timeout=1.0))


class Mesh(WireHandler):
    """The mesh component of a node (see the module docstring)."""

    def __init__(self, broker: Broker, identity: NodeIdentity, config: MeshConfig | None = None,
                 *, flush: Callable[[], None] | None = None,
                 rng: random.Random | None = None) -> None:
        self.broker = broker
        self.config = cfg = config or MeshConfig()
        self.node_id = identity.node_id
        # this start of the node: message ids and adverts are per incarnation, and a later
        # start has a larger one (so the newest advert of a node wins)
        self.incarnation = time.time_ns()
        self._flush_control = flush or (lambda: None)
        self.rng = rng or random.Random()
        self.endpoint = WireEndpoint(
            identity, handler=self, config=cfg.wire, host=cfg.host, port=cfg.port,
            realm=cfg.network, realm_secret=cfg.network_secret, client_mode=cfg.client_mode,
            advertise=cfg.advertise)
        self.dht = Dht(endpoint=self.endpoint, config=cfg.dht)
        self.dht.on_key_changed = self._key_changed
        self.advertiser = Advertiser(node_id=self.node_id, endpoint=None,
                                     record_ttl=cfg.record_ttl,
                                     min_interval=cfg.advert_interval,
                                     incarnation=self.incarnation)
        self._disc: dict[str, Discovery[tuple[bytes, int, frozenset[tuple[str, str]]]]] = {}
        # this node's plain filters per realm (the advertiser counts their subscribers):
        # a received topic none of them matches is answered with NOMATCH
        self._local: dict[str, TopicTrie] = {}
        self._addrs: OrderedDict[bytes, tuple[str, int] | None] = OrderedDict()
        # client-mode nodes: their relay (node id, address), from their records
        self._vias: OrderedDict[bytes, tuple[bytes, tuple[str, int]]] = OrderedDict()
        # nodes heard from through a relay: that relay (replies go back the same way)
        self._back: OrderedDict[bytes, bytes] = OrderedDict()
        self.via: tuple[bytes, tuple[str, int]] | None = None  # ours, in client mode
        # nodes found unreachable (or shut down): node -> the incarnation it had (0: unknown)
        self._dead: TTLCache[bytes, int] = TTLCache(100_000, cfg.dead_node_ttl)
        self._incs: OrderedDict[bytes, int] = OrderedDict()  # node -> newest incarnation seen
        # nodes that shut down: node -> its incarnation (its older records are ignored)
        self._shut: TTLCache[bytes, int] = TTLCache(100_000, cfg.dead_node_ttl)
        self._outboxes: dict[bytes, Outbox[tuple[str, bytes, bytes]]] = {}
        self._ids = MessageIds()  # QoS 1 message ids of this incarnation, for every node
        self._probed: dict[bytes, float] = {}  # unreachable node -> when it was last dialled
        self.inbox = Inbox(max_per_origin=cfg.max_dedup_per_origin)
        # node -> realm -> entries for the next PUB frame
        self._out: dict[bytes, dict[str, list[bytes]]] = {}
        # (origin, its incarnation) -> (acknowledged ids, refused ids)
        self._acks: dict[tuple[bytes, int], tuple[list[int], list[int]]] = {}
        # DHT keys of the anchors this node reads (and watches): key -> (realm, anchor)
        self._watched: OrderedDict[bytes, tuple[str, str]] = OrderedDict()
        self._logged: TTLCache[tuple[bytes, str], bool] = TTLCache(10_000, cfg.log_interval)
        self._flush_handle: asyncio.Handle | None = None
        # PUB frames waiting for room on a link, per node (bounded: max_backlog bytes)
        self._backlog: dict[bytes, deque[tuple[bytes, int]]] = {}
        self._backlog_bytes: dict[bytes, int] = {}
        self._draining: set[bytes] = set()
        # anchors waiting for a lookup slot (bounded: each anchor is in it at most once, as
        # Discovery marks it in flight; anchors are bounded by max_anchors per realm)
        self._lookup_queue: deque[tuple[str, Discovery[Any], str]] = deque()
        self._lookups_running = 0
        self.lookups_running_max = 0
        self.congested = False
        self.on_uncongested: Callable[[], None] = lambda: None
        self._group_rr: dict[tuple[str, str, str], int] = {}
        self._tasks: set[asyncio.Future[Any]] = set()
        self._checking: set[bytes] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._grace_until = 0.0  # see MeshConfig.restore_grace
        self._timer: asyncio.TimerHandle | None = None
        self._running = False
        self.lookup_times: deque[float] = deque(maxlen=1024)  # discovery latency samples (s)
        self.send_delays: deque[float] = deque(maxlen=1024)  # publish-to-send samples (s)
        self._queued_at = 0.0
        self.rpc = Calls(self)
        self.counters: Counter[str] = Counter()
        for k in ("messages_forwarded_total", "messages_received_total", "frames_out_total",
                  "frames_in_total", "nomatch_sent_total", "nomatch_received_total",
                  "acks_sent_total", "acks_received_total", "dht_lookups_total",
                  "dht_lookup_failures_total", "dht_puts_total", "calls_forwarded_total",
                  "calls_served_total", "calls_failed_over_total", "nodes_gone_total",
                  "bad_input_total", "errors_received_total", "bad_records_total",
                  "relayed_total", "relay_refused_total", "congested_total",
                  "dht_put_failures_total", "peers_lost_total", "peers_back_total",
                  "notify_sent_total", "notify_received_total", "qos1_refused_by_peer_total",
                  "peers_restarted_total", "qos1_refused_starting_total",
                  "notify_unwatched_total", "incarnations_forgotten_total",
                  "watched_keys_forgotten_total"):
            self.counters[k] = 0
        self.drops: Counter[str] = Counter()

    # -- life cycle -----------------------------------------------------------------------

    @property
    def listen_address(self) -> tuple[str, int] | None:
        return self.endpoint.listen_address

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await self.endpoint.start()
        except OSError as exc:
            cfg = self.config
            raise OSError(exc.errno, f"mesh endpoint {cfg.host}:{cfg.port}: "
                                     f"{exc.strerror or exc}") from exc
        await self.dht.start()
        self.advertiser.endpoint = self.endpoint.listen_address
        self._running = True
        self._grace_until = self._loop.time() + self.config.restore_grace
        self._timer = self._loop.call_later(self.config.tick, self._on_tick)

    async def join(self, seeds: list[tuple[str, int]] | None = None) -> int:
        """Bootstrap through ``seeds`` (default: the configured ones); returns how many
        contacts the routing table holds after. Never raises for unreachable seeds."""
        seeds = list(self.config.seeds if seeds is None else seeds)
        if not seeds:
            return 0
        with contextlib.suppress(asyncio.TimeoutError, LinkError, OSError):
            await asyncio.wait_for(self.dht.bootstrap(seeds), self.config.bootstrap_timeout)
        self._keep_via()
        return int(self.dht.stats().get("contacts", 0))

    def _keep_via(self) -> None:
        """Client mode: keep a link to one listening node (our relay) and advertise it."""
        if not self.config.client_mode:
            return
        pool = self.endpoint.pool
        if self.via is not None:
            link = pool.peek(self.via[0])
            if link is not None and link.is_open:
                link.last_used = self._now()  # never reaped as idle
                return
        for link in pool.links():
            if link.is_open and link.addr is not None:
                self.via = (link.peer_id, link.addr)
                link.last_used = self._now()
                self.advertiser.set_via(self.via)
                self.rpc.readvertise()
                return

    async def stop(self) -> None:
        self._running = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_now()
        for t in list(self._tasks):
            t.cancel()
        await self.dht.close()
        await self.endpoint.close()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    # -- the broker's hooks ---------------------------------------------------------------

    def subscribed(self, realm: str, filter: str) -> None:
        if self.advertiser.subscribe(realm, filter) and parse_shared(filter) is None:
            self._local.setdefault(realm, TopicTrie()).add(filter, filter)

    def unsubscribed(self, realm: str, filter: str) -> None:
        if self.advertiser.unsubscribe(realm, filter) and parse_shared(filter) is None:
            self._local[realm].remove(filter, filter)

    def registered(self, realm: str, procedure: str, strategy: str, idempotent: bool,
                   cache_ttl: float) -> None:
        self.rpc.advertise(realm, procedure, strategy, idempotent, cache_ttl)

    def unregistered(self, realm: str, procedure: str) -> None:
        self.rpc.withdraw(realm, procedure)

    def call(self, s: Session, rid: int, realm: str, procedure: str, args: bytes,
             timeout: float) -> None:
        self._spawn(self.rpc.call(s, rid, realm, procedure, args, timeout))

    def _discovery(self, realm: str) -> Discovery[tuple[bytes, int, frozenset[tuple[str, str]]]]:
        d = self._disc.get(realm)
        if d is None:
            cfg = self.config
            d = self._disc[realm] = Discovery(
                self_id=self.node_id, cache_ttl=cfg.cache_ttl,
                refresh_after=cfg.cache_ttl / 2 if cfg.refresh_after is None
                else cfg.refresh_after,
                min_interval=cfg.min_interval, max_anchors=cfg.max_anchors,
                max_routes=cfg.max_routes, max_pending_per_topic=cfg.max_pending_per_topic,
                max_pending=cfg.max_pending)
        return d

    def publish(self, realm: str, topic: str, payload: bytes, tail: bytes, qos: int,
                groups: list[Group]) -> tuple[int, list[Group], bool]:
        if not self._running or not self._peers():
            return 0, groups, True  # alone: nobody elsewhere to send to
        d = self._disc.get(realm) or self._discovery(realm)
        now = self.broker.now
        local_keys = frozenset((g.name, g.filter) for g in groups) if groups else frozenset()
        r = d.plan(topic, (tail, qos, local_keys), now)
        if d._to_lookup:
            self._start_lookups(realm, d)
        if r is None:  # queued until discovery answers; local group members take it
            return 1, groups, True
        rgroups = r.groups
        if not rgroups and not groups:
            targets = r.targets
            ok = self._forward(realm, targets, tail, qos, None) if targets else True
            return len(targets), groups, ok
        chosen_local, per_node = self._pick_groups(realm, rgroups, groups)
        targets = r.targets | per_node.keys() if per_node else r.targets
        ok = self._forward(realm, targets, tail, qos, per_node) if targets else True
        return len(targets), chosen_local, ok

    def _peers(self) -> bool:
        """Whether any other node is known (a contact in the DHT, or a link)."""
        core = self.dht._core
        return (core is not None and len(core.table) > 0) or len(self.endpoint.pool) > 0

    def _pick_groups(self, realm: str, rgroups: dict[tuple[str, str], list[bytes]],
                     local: list[Group] | None,
                     local_keys: frozenset[tuple[str, str]] = frozenset(),
                     ) -> tuple[list[Group], dict[bytes, list[tuple[str, str]]]]:
        """One node per matching group: in turn among the nodes with members."""
        by_key = {(g.name, g.filter): g for g in local} if local else {}
        chosen: list[Group] = []
        per_node: dict[bytes, list[tuple[str, str]]] = {}
        me = self.node_id
        for key in set(rgroups) | by_key.keys() | local_keys:
            cands = list(rgroups.get(key, ()))
            if key in by_key or key in local_keys:
                cands.append(me)
                cands.sort()
            rr_key = (realm, key[0], key[1])
            n = self._group_rr.get(rr_key, 0)
            if len(self._group_rr) > 100_000:
                self._group_rr.clear()
            self._group_rr[rr_key] = n + 1
            pick = cands[n % len(cands)]
            if pick == me:
                if key in by_key:
                    chosen.append(by_key[key])
                # else: local members took it already (pending release)
            else:
                per_node.setdefault(pick, []).append(key)
        return chosen, per_node

    def _forward(self, realm: str, targets: set[bytes] | Any, tail: bytes, qos: int,
                 per_node: dict[bytes, list[tuple[str, str]]] | None) -> bool:
        """Queue one message for ``targets``; False when a QoS 1 one was refused by a full
        outbox (the publishing client's PUBACK must not say OK then)."""
        ok = True
        body = tail[:-1]  # topic + payload (the retain flag is not forwarded)
        shared = b"\x94\x00" + body + _NO_GROUPS if not qos else b""
        out = self._out
        now = self.broker.now
        dead = self._dead if len(self._dead) else None
        skipped = 0
        for node in targets:
            # a node declared gone: QoS 0 is not sent into the void (counted); QoS 1 waits
            # in its outbox until it comes back (or the outbox's bounds count it lost)
            gone = dead is not None and node in dead
            if gone and not qos:
                self.drops["node_unreachable"] += 1
                skipped += 1
                continue
            groups_enc = _NO_GROUPS
            if per_node is not None:
                gl = per_node.get(node)
                if gl:
                    groups_enc = _enc.encode(gl)
            if qos:
                ob = self._outbox(node)
                mid = ob.send((realm, body, groups_enc), len(body) + 48, now)
                if mid is None:
                    self.drops["qos1_outbox_full"] += 1
                    ok = False
                if mid is None or gone:
                    skipped += 1
                    continue
                entry = _qos1_entry(mid, body, groups_enc)
            elif groups_enc is _NO_GROUPS:
                entry = shared
            else:
                entry = b"\x94\x00" + body + groups_enc
            by_realm = out.get(node)
            if by_realm is None:
                by_realm = out[node] = {}
            lst = by_realm.get(realm)
            if lst is None:
                by_realm[realm] = [entry]
            else:
                lst.append(entry)
        self.counters["messages_forwarded_total"] += len(targets) - skipped
        if self._flush_handle is None:
            self._schedule_flush()
        return ok

    def _outbox(self, node: bytes) -> Outbox[tuple[str, bytes, bytes]]:
        ob = self._outboxes.get(node)
        if ob is None:
            cfg = self.config
            ob = self._outboxes[node] = Outbox(ack_timeout=cfg.ack_timeout, ttl=cfg.qos1_ttl,
                                               max_inflight=cfg.max_inflight,
                                               max_bytes=cfg.max_outbox_bytes, ids=self._ids)
        return ob

    def _direct(self, node: bytes, addr: tuple[str, int] | None = None) -> PeerLink | None:
        """A link that reaches ``node`` itself: open, or one that can dial it (at ``addr``,
        else the address its records gave)."""
        pool = self.endpoint.pool
        link = pool.peek(node)
        if link is not None and not link.closed and (link.is_open or link.addr is not None):
            return link
        addr = addr or self._addrs.get(node)
        if addr is None:
            return None
        try:
            return pool.link(node, addr)
        except (LinkError, ValueError):
            return None

    def _route(self, node: bytes) -> tuple[PeerLink | None, bool]:
        """The link a message for ``node`` leaves on (None: no way), and whether that is
        the link to a relay: the node's own link, else one to the node that relays for it
        (a client-mode node), else one to the node we last heard from it through."""
        link = self._direct(node)
        if link is not None:
            return link, False
        via = self._vias.get(node)
        relay = self._direct(via[0], via[1]) if via is not None else None
        if relay is None and node in self._back:
            relay = self._direct(self._back[node])
        if relay is None or relay.peer_id == node:
            return None, False
        return relay, True

    def _frame_for(self, node: bytes, kind: int, payload: bytes,
                   relayed: bool) -> tuple[int, bytes]:
        """The kind and payload to send: as they are, or in a RELAY envelope for the relay
        of ``node``."""
        if not relayed:
            return kind, payload
        return KIND_RELAY, _enc.encode((self.node_id, node, self.config.max_hops, kind,
                                        payload))

    def _send_to(self, node: bytes, kind: int, payload: bytes) -> bool:
        """One small one-way message (ACK, NOMATCH) for ``node``; False if it cannot go."""
        link, relayed = self._route(node)
        if link is None:
            return False
        try:
            return link.send_nowait(*self._frame_for(node, kind, payload, relayed))
        except LinkError:
            return False

    def _send_pub(self, node: bytes, frame: bytes, chunk: list[bytes]) -> None:
        """A PUB frame of the entries ``chunk`` for ``node``. Over the link's send buffer it
        waits in the node's backlog (in order) until the link drains. A frame that cannot
        go counts its QoS 0 messages as dropped (``_qos0``): its QoS 1 ones are still in
        the outbox and go again."""
        if node in self._backlog:
            self._to_backlog(node, frame, _qos0(chunk))
            return
        link, relayed = self._route(node)
        if link is None:
            self.drops["unreachable"] += _qos0(chunk)
            return
        try:
            if link.buffered() < link.cfg.send_buffer and link.send_nowait(
                    *self._frame_for(node, KIND_PUB, frame, relayed)):
                self.counters["frames_out_total"] += 1
                return
        except LinkError:
            self.drops["unreachable"] += _qos0(chunk)
            return
        self._to_backlog(node, frame, _qos0(chunk))

    def _to_backlog(self, node: bytes, frame: bytes, n: int) -> None:
        bl = self._backlog.get(node)
        if bl is None:
            bl = self._backlog[node] = deque()
        bl.append((frame, n))
        size = self._backlog_bytes.get(node, 0) + len(frame)
        while size > self.config.max_backlog and len(bl) > 1:
            old, k = bl.popleft()  # drop oldest (QoS 1 ones come again from the outbox)
            size -= len(old)
            self.drops["backlog_full"] += k
        self._backlog_bytes[node] = size
        if node not in self._draining:
            self._draining.add(node)
            self._spawn(self._drain(node))
        self._check_congestion()

    async def _drain(self, node: bytes) -> None:
        try:
            while True:
                bl = self._backlog.get(node)
                if not bl:
                    break
                link, relayed = self._route(node)
                if link is None:
                    raise LinkError("no path")
                await link.drain()
                while bl and link.buffered() < link.cfg.send_buffer:
                    frame, n = bl.popleft()
                    self._backlog_bytes[node] -= len(frame)
                    link.send_nowait(*self._frame_for(node, KIND_PUB, frame, relayed))
                    self.counters["frames_out_total"] += 1
                self._check_congestion()
        except (LinkError, OSError):
            for _, n in self._backlog.get(node, ()):
                self.drops["unreachable"] += n
        finally:
            self._backlog.pop(node, None)
            self._backlog_bytes.pop(node, None)
            self._draining.discard(node)
            self._check_congestion()

    def _check_congestion(self) -> None:
        """Congested while the backlog on open links is over ``backlog_high``: the control
        driver stops reading publishers until it is under ``backlog_high / 4``."""
        pool = self.endpoint.pool
        size = 0
        for node, n in self._backlog_bytes.items():
            link = pool.peek(node)
            if link is None or link.is_open:
                size += n
        high = self.config.backlog_high
        if not self.congested and size > high:
            self.congested = True
            self.counters["congested_total"] += 1
        elif self.congested and size <= high // 4:
            self.congested = False
            self.on_uncongested()

    def may_read(self) -> bool:
        """The control driver's gate: False while the links cannot take more."""
        return not self.congested

    def _flush_now(self) -> None:
        self._flush_handle = None
        out, self._out = self._out, {}
        if out and self._loop is not None:
            # publish-to-send: how long the oldest entry of this flush waited in the node
            self.send_delays.append(self._loop.time() - self._queued_at)
        inc = p.pack_uint(self.incarnation)
        for node, by_realm in out.items():
            ob = self._outboxes.get(node)
            # the low mark: the receiver forgets the ids below it (see qos.py)
            low = p.pack_uint(ob.low() if ob is not None else 0)
            for realm, entries in by_realm.items():
                head = b"\x94" + _enc.encode(realm) + inc + low
                for i in range(0, len(entries), _MAX_ENTRIES_PER_FRAME):
                    chunk = entries[i:i + _MAX_ENTRIES_PER_FRAME]
                    frame = head + p.array_header(len(chunk)) + b"".join(chunk)
                    self._send_pub(node, frame, chunk)
        acks, self._acks = self._acks, {}
        for (node, node_inc), (mids, refused) in acks.items():
            if self._send_to(node, KIND_ACK, _enc.encode((node_inc, mids, refused))):
                self.counters["acks_sent_total"] += len(mids)

    def _schedule_flush(self) -> None:
        if self._flush_handle is None and self._loop is not None:
            self._queued_at = self._loop.time()
            self._flush_handle = self._loop.call_soon(self._flush_now)

    # -- discovery ------------------------------------------------------------------------

    def _start_lookups(self, realm: str, d: Discovery[Any]) -> None:
        """Start the anchors' lookups: at most ``max_lookups`` at once; the others wait in
        order (a burst of new topics does not become thousands of DHT lookups at once)."""
        waiting = self._lookup_queue
        for anchor in d.take_lookups():
            waiting.append((realm, d, anchor))
        while waiting and self._lookups_running < self.config.max_lookups:
            realm_, d_, anchor = waiting.popleft()
            self._lookups_running += 1
            self.lookups_running_max = max(self.lookups_running_max, self._lookups_running)
            self.counters["dht_lookups_total"] += 1
            self._spawn(self._lookup(realm_, d_, anchor))

    async def _lookup(self, realm: str, d: Discovery[Any], anchor: str) -> None:
        try:
            await self._lookup_one(realm, d, anchor)
        finally:
            self._lookups_running -= 1
            if self._lookup_queue and self._running:
                self._start_lookups(realm, d)

    async def _lookup_one(self, realm: str, d: Discovery[Any], anchor: str) -> None:
        t0 = self._now()
        key = dht_key(realm, "sub", anchor)
        self._watched[key] = (realm, anchor)
        self._watched.move_to_end(key)
        while len(self._watched) > 4 * self.config.max_anchors:
            self._watched.popitem(last=False)  # its NOTIFYs are then ignored (counted)
            self.counters["watched_keys_forgotten_total"] += 1
        try:
            values = await self.dht.get(key, watch=True)
        except (LinkError, OSError, asyncio.TimeoutError, RuntimeError):
            self.counters["dht_lookup_failures_total"] += 1
            released = d.lookup_failed(anchor, self._now())
        else:
            adverts: list[Advert] = []
            for v in values:
                if not v:
                    continue  # an empty record: that node withdrew
                adv = decode_advert(v)
                if adv is None:
                    self.counters["bad_records_total"] += 1
                    continue
                if adv.node_id == self.node_id:
                    continue
                gone = self._shut.get(adv.node_id)
                if gone is not None and adv.incarnation <= gone:
                    continue  # it shut down since: this record is from before
                self._saw_incarnation(adv.node_id, adv.incarnation)
                self._learn(adv.node_id, adv.endpoint, adv.via)
                adverts.append(adv)
            now = self._now()
            self.lookup_times.append(now - t0)
            released = d.lookup_done(anchor, adverts, now)
        if not released:
            return
        self.broker.now = self._now()
        for topic, targets, items in released:
            r = d.cached(topic, self.broker.now)
            rgroups = r.groups if r is not None else {}
            for tail, qos, local_keys in items:
                per_node: dict[bytes, list[tuple[str, str]]] | None = None
                tg: set[bytes] = targets
                if rgroups:
                    _, per_node = self._pick_groups(realm, rgroups, None, local_keys)
                    tg = targets | per_node.keys()
                if tg:
                    self._forward(realm, tg, tail, qos, per_node)

    def _learn(self, node: bytes, addr: tuple[str, int] | None,
               via: tuple[bytes, tuple[str, int]] | None = None) -> None:
        addrs = self._addrs
        if addrs.get(node) != addr or node not in addrs:
            addrs[node] = addr
            while len(addrs) > 100_000:
                addrs.popitem(last=False)
        if via is not None and via[0] != node:
            self._vias[node] = via
            if len(self._vias) > 100_000:
                self._vias.popitem(last=False)
        link = self.endpoint.pool.peek(node)
        if link is not None and addr is not None and link.addr is None:
            link.addr = addr

    # -- upkeep ---------------------------------------------------------------------------

    def _on_tick(self) -> None:
        if not self._running:
            return
        assert self._loop is not None
        now = self._now()
        self.broker.now = max(self.broker.now, now)
        if self.config.client_mode:
            self._keep_via()
        for put in self.advertiser.take_puts(now):
            self._spawn(self._put(dht_key(put.realm, "sub", put.anchor), put.value, put.ttl))
        for realm, d in self._disc.items():
            d.tick(now)
            self._start_lookups(realm, d)
        self._outbox_upkeep(now)
        self._timer = self._loop.call_later(self.config.tick, self._on_tick)

    def _outbox_upkeep(self, now: float) -> None:
        """Re-send what is due to reachable nodes; for the others only count what expired,
        and dial them now and then (``probe_interval``) so that their return is noticed."""
        for node, ob in list(self._outboxes.items()):
            if not len(ob):
                if node in self._dead:
                    del self._outboxes[node]
                    self._probed.pop(node, None)
                continue
            if self._reachable(node):
                resend, expired = ob.due(now)
                self._queue_resend(node, resend)
            else:
                expired = ob.hold(now)
                if now - self._probed.get(node, float("-inf")) >= self.config.probe_interval:
                    self._probed[node] = now
                    self._probe(node)
            if expired:
                self.drops["qos1_expired"] += len(expired)
                self._log(node, "expired", "peer %s: %d QoS 1 messages expired "
                          "unacknowledged (mesh_qos1_ttl)", len(expired))

    def _reachable(self, node: bytes) -> bool:
        """Whether a message for ``node`` can leave now: an open link to it, or to the
        relay of a client-mode node (or the node it was last heard through)."""
        pool = self.endpoint.pool
        link = pool.peek(node)
        if link is not None and link.is_open:
            return True
        via = self._vias.get(node)
        relay = via[0] if via is not None else self._back.get(node)
        if relay is None or relay == node:
            return False
        rl = pool.peek(relay)
        return rl is not None and rl.is_open

    def _probe(self, node: bytes) -> None:
        """Dial ``node`` (with the pool's back-off) unless a dial is already under way: its
        QoS 1 messages go as soon as a link comes up (``on_link_up``)."""
        if node in self._checking:
            return
        link = self._direct(node)
        if link is None or link.is_open:
            return
        self._checking.add(node)
        self._spawn(self._check(link, gone_if_it_fails=False))

    def _queue_resend(self, node: bytes, resend: list[tuple[int, tuple[str, bytes, bytes]]]
                      ) -> None:
        if not resend:
            return
        by_realm = self._out.setdefault(node, {})
        for mid, (realm, body, groups_enc) in resend:
            by_realm.setdefault(realm, []).append(_qos1_entry(mid, body, groups_enc))
        self._schedule_flush()

    async def _put(self, key: bytes, value: bytes, ttl: float) -> bool:
        self.counters["dht_puts_total"] += 1
        try:
            await self.dht.put(key, value, ttl)
        except ValueError:  # a record over the DHT's value bound (a filter of ~16 KiB)
            self.drops["record_too_large"] += 1
        except (LinkError, OSError, asyncio.TimeoutError, RuntimeError):
            self.counters["dht_put_failures_total"] += 1
        else:
            return True
        return False

    # -- pushed changes ---------------------------------------------------------------------
    #
    # A publishing node reads an anchor's records with ``watch``: every DHT node that
    # answered (this one included) tells it of each later change of a record it holds there
    # (``DhtCore`` "watches": registered in the same step as the answer, so no change is
    # missed in between) for ``watch_ttl`` seconds; the refresh of answers in use renews it.
    # The news travels as NOTIFY ``[key, publisher, record]`` from the DHT node that stored
    # the change to each watcher, which applies the record if it is newer than what it knows.

    def _key_changed(self, change: KeyChanged) -> None:
        payload: bytes | None = None
        for c in change.watchers:
            if c.node_id == self.node_id:
                self._apply_change(change.key, change.publisher, change.value, None)
                continue
            if payload is None:
                payload = _enc.encode((change.key, change.publisher, change.value))
            if c.host:
                self._learn(c.node_id, (c.host, c.port))
            if self._send_to(c.node_id, KIND_NOTIFY, payload):
                self.counters["notify_sent_total"] += 1
            else:
                self.drops["notify_unreachable"] += 1

    def _apply_change(self, key: bytes, publisher: bytes, value: bytes,
                      link: PeerLink | None) -> None:
        where = self._watched.get(key)
        if where is None:
            self.counters["notify_unwatched_total"] += 1  # not in use here any more
            return
        adv = decode_advert(value) if value else None
        if adv is None or adv.node_id != publisher:
            if link is not None:
                self._refuse(link, KIND_NOTIFY, "a NOTIFY must hold a record of its publisher")
            return
        if adv.node_id == self.node_id:
            return
        gone = self._shut.get(adv.node_id)
        if gone is not None and adv.incarnation <= gone:
            return
        self.counters["notify_received_total"] += 1
        self._learn(adv.node_id, adv.endpoint, adv.via)
        self._saw_incarnation(adv.node_id, adv.incarnation)
        realm, anchor = where
        d = self._disc.get(realm)
        if d is not None:
            d.apply_advert(anchor, adv, self._now())

    def _on_notify(self, origin: bytes, payload: bytes, link: PeerLink) -> None:
        key, publisher, value = _NOTIFY_DEC.decode(payload)
        self._apply_change(key, publisher, value, link)

    # -- the wire -------------------------------------------------------------------------

    def on_request(self, link: PeerLink, kind: int, payload: bytes) -> bytes | Awaitable[bytes]:
        if kind in dm.KINDS:
            return self.dht.on_request(link, kind, payload)
        if kind == KIND_CALL:
            return self.rpc.serve(link, payload)
        if kind == KIND_RELAY_REQ:
            return self._relay_request(link, payload)
        return super().on_request(link, kind, payload)

    def _relay_request(self, link: PeerLink, payload: bytes) -> bytes | Awaitable[bytes]:
        try:
            target, hops, kind, inner = _RELAY_REQ_DEC.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.counters["bad_input_total"] += 1
            raise RequestRejected(STATUS_BAD_CALL, f"bad relayed request: {exc}") from None
        if target == self.node_id:
            if kind != KIND_CALL:
                raise RequestRejected(STATUS_BAD_CALL, f"kind 0x{kind:x} cannot be relayed")
            return self.rpc.serve(link, inner)
        fwd = self._direct(target) if hops > 0 else None
        if fwd is None or fwd.peer_id == link.peer_id:
            self.counters["relay_refused_total"] += 1
            raise RequestRejected(STATUS_UNREACHABLE, "hop limit reached" if hops <= 0 else
                                  f"no link to {target.hex()[:12]}")
        self.counters["relayed_total"] += 1
        return self._forward_request(fwd, _enc.encode((target, hops - 1, kind, inner)))

    async def _forward_request(self, link: PeerLink, payload: bytes) -> bytes:
        try:
            return await link.request(KIND_RELAY_REQ, payload,
                                      self.broker.limits.max_call_timeout)
        except RemoteError as exc:
            raise RequestRejected(exc.status, exc.message) from None
        except (LinkError, OSError) as exc:
            raise RequestRejected(STATUS_UNREACHABLE, f"relay lost the target: {exc}") from None

    def on_messages(self, link: PeerLink, msgs: list[wm.Msg]) -> None:
        for msg in msgs:
            kind = msg.kind
            try:
                if kind == KIND_RELAY:
                    self._on_relay(link, msg.payload)
                else:
                    self._dispatch(link.peer_id, kind, msg.payload, link)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self._refuse(link, kind, f"malformed message of kind 0x{kind:x}: {exc}")
        self._flush_control()
        if self._acks:
            self._schedule_flush()

    def _dispatch(self, origin: bytes, kind: int, payload: bytes, back: PeerLink) -> None:
        """One one-way message from ``origin``, arrived on ``back`` (origin's link, or
        the link of the relay it came through)."""
        if kind == KIND_PUB:
            self._on_pub(origin, payload, back)
        elif kind == KIND_ACK:
            inc, mids, refused = _ACK_DEC.decode(payload)
            if inc != self.incarnation:
                return  # for an earlier start of this node: those ids mean nothing now
            ob = self._outboxes.get(origin)
            if ob is not None:
                ob.ack(mids)
                if refused:
                    ob.nack(refused, self._now())
            self.counters["acks_received_total"] += len(mids)
            self.counters["qos1_refused_by_peer_total"] += len(refused)
        elif kind == KIND_NOTIFY:
            self._on_notify(origin, payload, back)
        elif kind == KIND_ERROR:
            self.counters["errors_received_total"] += 1
            err = _ERROR_DEC.decode(payload)
            if err.kind == KIND_RELAY and err.target is not None:
                self._node_gone(err.target, "its relay cannot reach it")
        elif kind == KIND_NOMATCH:
            realm, topics = _NOMATCH_DEC.decode(payload)
            d = self._disc.get(realm)
            self.counters["nomatch_received_total"] += len(topics)
            if d is not None:
                now = self._now()
                for topic in topics:
                    d.prune(topic, origin, now)
        else:
            self._refuse(back, kind, f"unknown message kind 0x{kind:x}")

    def _on_relay(self, link: PeerLink, payload: bytes) -> None:
        origin, target, hops, kind, inner = _RELAY_DEC.decode(payload)
        if target == self.node_id:
            if kind == KIND_RELAY:
                self._refuse(link, KIND_RELAY, "a relayed message cannot hold another")
                return
            if origin != link.peer_id:
                self._back[origin] = link.peer_id
                if len(self._back) > 100_000:
                    self._back.popitem(last=False)
            self._dispatch(origin, kind, inner, link)
            return
        if origin != link.peer_id:
            # a relay passes on only what its sender originated: no node can speak for
            # another through it
            self.counters["relay_refused_total"] += 1
            self._refuse(link, KIND_RELAY, "a relayed message's origin must be its sender")
            return
        fwd = self._direct(target) if hops > 0 else None
        if fwd is None or fwd.peer_id == link.peer_id:
            self.counters["relay_refused_total"] += 1
            self._refuse(link, KIND_RELAY, "hop limit reached" if hops <= 0 else
                         f"no link to {target.hex()[:12]}", target)
            return
        try:
            fwd.send_nowait(KIND_RELAY, _enc.encode((origin, target, hops - 1, kind, inner)))
            self.counters["relayed_total"] += 1
        except LinkError:
            self.counters["relay_refused_total"] += 1

    def _refuse(self, link: PeerLink, kind: int, message: str,
                target: bytes | None = None) -> None:
        """Count a bad one-way message and tell its sender (it is dropped, nothing else);
        a refused relay names the ``target`` it could not reach."""
        self.counters["bad_input_total"] += 1
        err = (kind, message[:300]) if target is None else (kind, message[:300], target)
        with contextlib.suppress(LinkError):
            link.send_nowait(KIND_ERROR, _enc.encode(err))

    def _on_pub(self, origin: bytes, payload: bytes, link: PeerLink) -> None:
        realm, inc, low, entries = _PUB_DEC.decode(payload)
        self.counters["frames_in_total"] += 1
        self.counters["messages_received_total"] += len(entries)
        self._saw_incarnation(origin, inc)
        st = self.inbox.origin(origin, inc, low)
        if st is None:
            return  # from an earlier start of that node: that process is gone
        broker = self.broker
        now = self._now()
        broker.now = now
        local = self._local.get(realm)
        seen: dict[str, Any] = {}
        nomatch: list[str] = []
        acked: list[int] | None = None
        inbox = self.inbox
        for mid, topic, data, groups in entries:
            if mid and not inbox.accept(st, mid):
                if acked is None:
                    acked = self._acks_for(origin, inc)[0]
                acked.append(mid)  # a repeat: acknowledge again
                continue
            hit = seen.get(topic)
            if hit is None:
                try:
                    if local is not None:
                        hit = bool(local.match(topic))
                    else:
                        validate_topic(topic)
                        hit = False
                except (ValueError, TypeError) as exc:
                    self._refuse(link, KIND_PUB, f"invalid topic {topic[:100]!r}: {exc}")
                    hit = seen[topic] = _BAD
                else:
                    seen[topic] = hit
                    if not hit and not groups:
                        nomatch.append(topic)
            if hit is _BAD:
                if mid:  # refused for good: no point in re-sending it
                    if acked is None:
                        acked = self._acks_for(origin, inc)[0]
                    acked.append(mid)
                continue
            if mid:
                if not hit and not groups and now < self._grace_until:
                    # just started: this node's clients may still be reconnecting and
                    # subscribing again; the sender keeps the message and tries later
                    inbox.refused(st, mid)
                    self._acks_for(origin, inc)[1].append(mid)
                    self.counters["qos1_refused_starting_total"] += 1
                    continue
                broker.inject(realm, topic, data, 1, groups, _Ack(self, origin, inc, mid, st))
            elif hit or groups:
                broker.inject(realm, topic, data, 0, groups)
        if nomatch and now >= self._grace_until:  # (not while clients may still come back)
            self.counters["nomatch_sent_total"] += len(nomatch)
            self._send_to(origin, KIND_NOMATCH, _enc.encode((realm, nomatch)))

    def _acks_for(self, origin: bytes, inc: int) -> tuple[list[int], list[int]]:
        key = (origin, inc)
        a = self._acks.get(key)
        if a is None:
            a = self._acks[key] = ([], [])
        return a

    def _saw_incarnation(self, node: bytes, inc: int) -> None:
        """``node`` runs as incarnation ``inc``: a newer one than known is a restart."""
        old = self._incs.get(node)
        if old is None or inc > old:
            self._incs[node] = inc
            if len(self._incs) > 100_000:
                self._incs.popitem(last=False)
                self.counters["incarnations_forgotten_total"] += 1
            if old is not None:
                self.counters["peers_restarted_total"] += 1
                self._log(node, "restarted", "peer %s restarted (a new incarnation)")
            dead = self._dead.get(node)
            if dead is not None and dead < inc:
                self._dead.pop(node)

    def on_link_up(self, link: PeerLink) -> None:
        node = link.peer_id
        was_dead = self._dead.pop(node) is not None
        self._probed.pop(node, None)
        self.rpc.node_up(node)
        if link.addr is not None:
            self._learn(node, link.addr)
        if was_dead:
            self.counters["peers_back_total"] += 1
            self._log(node, "back", "peer %s is reachable again")
        ob = self._outboxes.get(node)
        if ob is not None and len(ob):
            # whatever waited for it goes now, in id order (the receiver de-duplicates)
            self._queue_resend(node, ob.resend_all(self._now()))

    def on_link_down(self, link: PeerLink, code: int, reason: str) -> None:
        self.dht.on_link_down(link, code, reason)
        if not self._running:
            return
        node = link.peer_id
        via = self._vias.get(node)
        relayed = via is not None and via[0] != self.node_id
        if code == wm.CLOSE_SHUTDOWN:
            self._node_gone(node, "shut down", forget=True)
        elif link.addr is None and not relayed:
            self._node_gone(node, f"link lost ({reason or code}) and no address to dial")
        elif (code not in (wm.CLOSE_REPLACED, wm.CLOSE_EVICTED, wm.CLOSE_NORMAL)
              and node not in self._checking):
            self.counters["peers_lost_total"] += 1
            self._log(node, "lost", "link to peer %s lost (%s): re-dialling",
                      reason or f"code {code}")
            self._checking.add(node)
            self._spawn(self._check(link))

    async def _check(self, link: PeerLink, gone_if_it_fails: bool = True) -> None:
        """The link broke (or its node is away): re-dial; if that fails, the node is gone
        (for now) — once: a probe of a node already gone just tries again later."""
        try:
            await link.connected()
        except (LinkError, OSError, asyncio.TimeoutError):
            if gone_if_it_fails:
                self._node_gone(link.peer_id, "re-dial failed")
        finally:
            self._checking.discard(link.peer_id)

    def _node_gone(self, node: bytes, why: str, *, forget: bool = False) -> None:
        """``node`` cannot be reached. Its QoS 1 outbox stays (it gets it when it comes
        back, or the outbox's time bound counts it lost); calls stop going there. Only a
        node that shut down (``forget``) leaves the routes: an unreachable one keeps its
        subscriptions, and QoS 1 messages for it wait in its outbox."""
        if self._dead.get(node) is not None:
            return
        self.counters["nodes_gone_total"] += 1
        self._dead.put(node, self._incs.get(node, 0))
        ob = self._outboxes.get(node)
        held = len(ob) if ob is not None else 0
        self._log(node, "gone", "peer %s declared gone (%s); %d QoS 1 messages held for it",
                  why, held)
        if forget:
            self._shut.put(node, self._incs.get(node, 0))
            for d in self._disc.values():
                d.forget_node(node)
        self.rpc.forget_node(node)

    def _log(self, node: bytes, event: str, fmt: str, *args: Any) -> None:
        """One log line per node and event kind per ``log_interval`` (the counters count
        every one)."""
        key = (node, event)
        if self._logged.get(key) is not None:
            return
        self._logged.put(key, True)
        log.warning(fmt, node.hex()[:12], *args)

    # -- figures --------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.counters)
        hits = misses = pending = dropped = pruned = 0
        for d in self._disc.values():
            c = d.counters
            hits += c["routes_hit"]
            misses += c["routes_miss"]
            dropped += c["pending_dropped"]
            pruned += c["pruned"]
            pending += d.pending
        out["route_hits_total"] = hits
        out["route_misses_total"] = misses
        out["pruned_total"] = pruned
        out["pending"] = pending
        drops = dict(self.drops)
        if dropped:
            drops["pending_full"] = dropped
        out["drops_total"] = drops
        out["qos1_inflight"] = sum(len(ob) for ob in self._outboxes.values())
        out["qos1_inflight_bytes"] = sum(ob.bytes for ob in self._outboxes.values())
        out["qos1_held"] = sum(len(ob) for n, ob in self._outboxes.items() if n in self._dead)
        out["nodes_unreachable"] = sum(1 for n in self._outboxes if n in self._dead)
        out["backlog_bytes"] = sum(self._backlog_bytes.values())
        out["lookups_in_flight"] = self._lookups_running
        out["lookups_waiting"] = len(self._lookup_queue)
        out["congested"] = int(self.congested)
        out["qos1_resent_total"] = sum(ob.counters["resent"] for ob in self._outboxes.values())
        out["duplicates_total"] = self.inbox.counters["duplicates"]
        out["stale_frames_total"] = self.inbox.counters["stale"]
        ws = self.endpoint.stats_snapshot()
        out["links"] = ws.get("links", 0)
        out["links_open"] = ws.get("links_open", 0)
        dht = self.dht.stats() if self.dht._core is not None else {}
        out["dht_queries_total"] = dht.get("queries_out", 0)
        out["dht_contacts"] = dht.get("contacts", 0)
        for name, samples in (("discovery_latency", self.lookup_times),
                              ("publish_to_send", self.send_delays)):
            xs = sorted(samples)
            out[f"{name}_p50_ms"] = round(xs[len(xs) // 2] * 1000, 3) if xs else 0.0
            out[f"{name}_p99_ms"] = round(xs[int(len(xs) * 0.99)] * 1000, 3) if xs else 0.0
        total = out["route_hits_total"] + out["route_misses_total"]
        out["route_hit_ratio"] = round(out["route_hits_total"] / total, 4) if total else 0.0
        out.update(self.rpc.stats())
        return out


def _qos0(entries: list[bytes]) -> int:
    """How many of these PUB entries are QoS 0 (an entry's second byte is its mid's first:
    0 only for QoS 0). Counted only when a frame is dropped or waits, not on every send."""
    return sum(1 for e in entries if e[1] == 0)


def _qos1_entry(mid: int, body: bytes, groups_enc: bytes) -> bytes:
    """A PUB entry ``[mid, topic, payload, groups]`` from the pre-encoded parts."""
    return b"\x94" + p.pack_uint(mid) + body + groups_enc


class _Ack:
    """Acknowledge a QoS 1 message from another node once it was handed to the local
    sessions (at once, or when the shards answered), or refuse it (no room here: the
    sender keeps it and sends it again)."""

    __slots__ = ("inc", "mesh", "mid", "origin", "state")

    def __init__(self, mesh: Mesh, origin: bytes, inc: int, mid: int,
                 state: OriginState) -> None:
        self.mesh = mesh
        self.origin = origin
        self.inc = inc
        self.mid = mid
        self.state = state

    def __call__(self, taken: bool) -> None:
        mesh = self.mesh
        acked, refused = mesh._acks_for(self.origin, self.inc)
        if taken:
            acked.append(self.mid)
        else:
            mesh.inbox.refused(self.state, self.mid)
            refused.append(self.mid)
        mesh._schedule_flush()
