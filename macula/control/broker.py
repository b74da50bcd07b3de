"""The sans-IO broker of one node: sessions, pub/sub, retained messages, QoS 1 and RPC.

The broker never touches a socket or a clock. Its driver (``macula.control.server``) feeds it
``receive(identity, frames, now)`` for every ZeroMQ message and ``tick(now)`` from a timer,
then carries out what it asks for:

- ``take_direct()``: ``(identity, body)`` pairs to send once, best effort (errors to peers
  without a session, BYE to dropped sessions, liveness probes);
- ``take_dirty()`` then ``next_body(session)`` until ``None``: the bodies queued for each
  session, each at most ``limits.max_batch`` commands. When the socket refuses one (the
  peer is at its high-water mark) the driver hands it back with ``stalled(session, body,
  now)``; when the peer is unreachable, ``peer_gone(identity, now)``.

Subscriptions
    One :class:`~macula.TopicTrie` per realm. Its keys are :class:`Subscription` objects (a
    session's subscription to one filter) or :class:`Group` objects (one per shared
    ``(group, filter)``, holding its member subscriptions). ``match`` therefore returns the
    delivery targets directly, with no look-up per subscriber. A session with overlapping
    filters gets one EVENT per matching subscription, each naming its ``sub_id`` (MQTT 5
    allows this; the client dispatches on ``sub_id`` without matching again).

Delivery targets are local :class:`Session` objects (``offer(sub, msg, qos)``); other
nodes are reached through the :class:`MeshHook` (``broker.mesh``), not as delivery targets.

Delivery shards (``broker.fanout``, set by ``macula.shards``)
    With a :class:`Fanout` set, plain (not shared) subscriptions are not put in the realm's
    trie: they are handed to the fanout, which keeps them in shard processes that match and
    build the QoS 0 EVENTs. The broker keeps every session's subscriptions (so a restarted
    shard can be given them again), shared groups, retained messages, QoS 1 windows and RPC.
    A QoS 0 PUBLISH is passed on once (``fanout.publish``); the shards' finished EVENT bytes
    come back through :meth:`Broker.deliver` as one chunk per session. A QoS 1 PUBLISH is
    held (``_pending``) until every shard has answered with its matches
    (:meth:`Broker.finish_publish`): the QoS 1 deliveries are then queued here, where the
    in-flight state lives, and the PUBACK goes out. A repeat of a pending ``mid`` is counted
    as a duplicate and not routed again.

Encoding once
    A PUBLISH is encoded once into a *tail* (the msgpack of ``topic, payload, retain``); the
    EVENT for a subscriber is the subscriber's precomputed prefix (array header, code,
    ``sub_id``) + delivery id + QoS + that tail: one bytes concatenation per delivery, no
    msgpack encoding per subscriber. Outgoing bodies are the joined command bytes behind
    one array header.

Queues per session (all bounded; every drop counted in ``drops[reason]``)
    ``q0`` QoS 0 EVENTs, at most ``max_queue_qos0``: the oldest is dropped for a new one.
    ``q1`` replies, INVOKEs and QoS 1 EVENTs inside the in-flight window: never dropped;
    beyond ``max_queue_reliable`` the session is disconnected (SLOW_CONSUMER).
    ``pending1`` QoS 1 deliveries waiting for window space, at most ``max_pending_qos1``:
    beyond it the session takes no new QoS 1 work (the publisher's PUBACK says
    QUOTA_EXCEEDED). A session whose socket refused a body is *blocked* until its queues
    have drained completely; blocked for ``stuck_timeout`` seconds, it is disconnected
    (SLOW_CONSUMER).

Ingress
    ``receive`` is ``decode`` (checks, HELLO) then ``run``; the driver may hold decoded
    commands of a session over its share, run its control commands first
    (``split_control``) or ``refuse`` them (QoS 0 dropped and counted, the rest ERROR
    OVERLOADED).

Costs: a PUBLISH is one trie match (cached per incoming message for repeated topics) plus
one concatenation and one deque append per subscriber; ``tick`` is O(sessions + expired
in-flight entries + timed-out calls).
"""

from __future__ import annotations

import heapq
import hmac
import random
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from macula import TopicTrie, TTLCache, parse_shared, validate_filter
from macula.control import protocol as p
from macula.control.protocol import Code, Err, PubackReason

_EVENT_HEAD = b"\x97" + bytes((int(Code.EVENT),))
_CONTROL = frozenset((p.Ping, p.Ack, p.Yield, p.YieldError))
_BUSY = "the node is busy and this session is over its share: send again later"
_ERROR_HEAD = b"\x94" + bytes((int(Code.ERROR),))
_OVERLOADED_TAIL = p.pack_uint(int(Err.OVERLOADED)) + p.encode(_BUSY)
_STRATEGIES = ("round_robin", "random", "first", "lowest_latency")
_enc = p.encode


@dataclass(frozen=True)
class Limits:
    """Every bound and timer of the broker (defaults documented in docs/NODE.md)."""

    max_sessions: int = 10_000
    max_subscriptions: int = 1_000
    max_registrations: int = 100
    max_pending_calls: int = 1_000
    max_payload: int = 1 << 20
    max_message: int = 16 << 20
    max_inflight: int = 100
    max_pending_qos1: int = 1_000
    max_queue_qos0: int = 10_000
    max_queue_reliable: int = 10_000
    max_batch: int = 4_096
    max_retained: int = 10_000
    heartbeat_ms: int = 5_000
    min_heartbeat_ms: int = 100
    max_heartbeat_ms: int = 600_000
    liveness: int = 3
    ack_timeout: float = 5.0
    max_attempts: int = 5
    call_timeout: float = 10.0
    max_call_timeout: float = 300.0
    stuck_timeout: float = 10.0
    dedup_window: int = 1_000
    dedup_ttl: float = 60.0


class Fanout(Protocol):
    """Where plain subscriptions live when matching runs outside the broker (the shards)."""

    def subscribe(self, s: Session, sub: Subscription) -> None:
        """``sub`` is new, or its QoS changed."""
        ...

    def unsubscribe(self, s: Session, sub: Subscription) -> None: ...

    def session_closed(self, s: Session) -> None:
        """``s`` ended: forget all its subscriptions."""
        ...

    def publish(self, realm: str, topic: str, tail: bytes, qos: int, seq: int) -> None:
        """Route one message (``seq`` > 0 for QoS 1: answer with ``finish_publish``)."""
        ...

    def stats(self) -> list[dict[str, Any]]:
        """Figures of each shard."""
        ...


class PendingPub:
    """A QoS 1 PUBLISH waiting for the shards' matches before its PUBACK (``session``), or
    a QoS 1 message from another node waiting for them before its mesh ack (``done``)."""

    __slots__ = ("done", "groups", "mid", "msg", "ok", "session", "targets")

    def __init__(self, session: Session | None, mid: int, msg: Msg, ok: bool, targets: int,
                 done: Callable[[bool], None] | None = None,
                 groups: list[Group] | None = None) -> None:
        self.session = session
        self.mid = mid
        self.msg = msg
        self.ok = ok
        self.targets = targets
        self.done = done  # a message from another node: taken (True) or refused (False)
        self.groups = groups  # ... and the shared groups it names, served once it is taken


class MeshHook(Protocol):
    """What the broker tells the mesh (``macula.mesh.service.Mesh``) and asks of it."""

    def subscribed(self, realm: str, filter: str) -> None:
        """A local session subscribed to ``filter`` (new subscription)."""
        ...

    def unsubscribed(self, realm: str, filter: str) -> None: ...

    def publish(self, realm: str, topic: str, payload: bytes, tail: bytes, qos: int,
                groups: list[Group]) -> tuple[int, list[Group], bool]:
        """Forward a local client's message to the nodes that want it. ``groups`` are the
        local shared groups matching the topic; returns (how many nodes it went to, or 1
        while discovery is pending; the groups to deliver to here; False when a QoS 1
        message could not be taken for some node, so its PUBACK must not say OK)."""
        ...

    def registered(self, realm: str, procedure: str, strategy: str, idempotent: bool,
                   cache_ttl: float) -> None:
        """The first local provider of ``procedure`` registered."""
        ...

    def unregistered(self, realm: str, procedure: str) -> None:
        """The last local provider of ``procedure`` went."""
        ...

    def call(self, s: Session, rid: int, realm: str, procedure: str, args: bytes,
             timeout: float) -> None:
        """No local provider: call a remote one; answer with ``Broker.call_done``."""
        ...

    def stats(self) -> dict[str, Any]: ...


class RemoteCaller:
    """The caller of an invocation that came from another node (in place of a Session):
    its answer goes to ``done(result, None, "")`` (the result's msgpack bytes) or
    ``done(None, code, message)``, not through an encoded command."""

    __slots__ = ("calls", "closed", "done")

    def __init__(self, done: Callable[[bytes | None, Err | None, str], None]) -> None:
        self.calls: set[int] = set()
        self.closed = False
        self.done = done


class Msg:
    """One published message, encoded once: ``tail`` = msgpack of topic, payload, retain."""

    __slots__ = ("qos", "tail", "topic")

    def __init__(self, topic: str, tail: bytes, qos: int) -> None:
        self.topic = topic
        self.tail = tail
        self.qos = qos


class Subscription:
    """A session's subscription to one filter (a trie key, or a member of a group)."""

    __slots__ = ("filter", "group", "inner", "pre", "pre0", "qos", "sink", "sub_id")

    def __init__(
        self, sink: Session, sub_id: int, filter: str, inner: str, qos: int, group: Group | None
    ) -> None:
        self.sink = sink
        self.sub_id = sub_id
        self.filter = filter
        self.inner = inner
        self.qos = qos
        self.group = group
        self.pre = _EVENT_HEAD + p.pack_uint(sub_id)
        self.pre0 = self.pre + b"\x00\x00"


class Group:
    """A shared subscription ``$share/<name>/<filter>``: one member gets each message."""

    __slots__ = ("filter", "members", "name", "rr")

    def __init__(self, name: str, filter: str) -> None:
        self.name = name
        self.filter = filter
        self.members: list[Subscription] = []
        self.rr = 0


class Registration:
    __slots__ = ("procedure", "reg_id", "session")

    def __init__(self, reg_id: int, session: Session, procedure: str) -> None:
        self.reg_id = reg_id
        self.session = session
        self.procedure = procedure


class Procedure:
    __slots__ = ("cache_ttl", "idempotent", "regs", "rr", "strategy")

    def __init__(self, strategy: str, idempotent: bool = False, cache_ttl: float = 0.0) -> None:
        self.strategy = strategy
        self.idempotent = idempotent
        self.cache_ttl = cache_ttl
        self.regs: list[Registration] = []
        self.rr = 0


class Realm:
    """Everything a session can see: topics, retained messages, procedures."""

    __slots__ = ("groups", "name", "procedures", "retained", "trie")

    def __init__(self, name: str) -> None:
        self.name = name
        self.trie = TopicTrie()
        self.groups: dict[tuple[str, str], Group] = {}
        self.retained: dict[str, Msg] = {}
        self.procedures: dict[str, Procedure] = {}


class Inflight:
    __slots__ = ("attempts", "body", "deadline", "msg", "sub")

    def __init__(self, sub: Subscription, msg: Msg, body: bytes, deadline: float) -> None:
        self.sub = sub
        self.msg = msg
        self.body = body
        self.attempts = 1
        self.deadline = deadline


class PendingCall:
    __slots__ = ("caller", "deadline", "inv_id", "provider", "rid")

    def __init__(
        self, inv_id: int, caller: Session | RemoteCaller, rid: int, provider: Session,
        deadline: float,
    ) -> None:
        self.inv_id = inv_id
        self.caller = caller
        self.rid = rid
        self.provider = provider
        self.deadline = deadline


class Session:
    """One welcomed client."""

    def __init__(
        self, broker: Broker, identity: bytes, sid: int, realm: Realm, name: str,
        heartbeat_ms: int, now: float,
    ) -> None:
        lim = broker.limits
        self.broker = broker
        self.identity = identity
        self.sid = sid
        self.realm = realm
        self.name = name
        self.heartbeat_ms = heartbeat_ms
        self.hb_timeout = heartbeat_ms / 1000.0 * lim.liveness
        self.last_seen = now
        self.subs: dict[str, Subscription] = {}
        self.subs_by_id: dict[int, Subscription] = {}
        self.next_sub_id = 1
        self.q0: deque[bytes] = deque()
        # whole bodies of QoS 0 EVENTs built by a shard (bytes, or a buffer such as a
        # zmq.Frame that the driver sends without copying), with their number of EVENTs
        self.qs: deque[tuple[int, Any]] = deque()
        self.qs_n = 0  # EVENTs in qs
        self.q1: deque[bytes] = deque()
        self.pending1: deque[tuple[Subscription, Msg]] = deque()
        self.inflight: dict[int, Inflight] = {}
        self.next_did = 1
        self.stalled_body: bytes | None = None
        self.stalled_since: float | None = None
        self.dirty = False
        self.closed = False
        self.regs: dict[int, Registration] = {}
        self.calls: set[int] = set()  # invocations this session is waiting for (caller)
        self.remote_calls = 0  # calls of this session out in the mesh
        self.invocations: set[int] = set()  # invocations this session must answer (provider)
        self.dedup: TTLCache[int, int] = TTLCache(lim.dedup_window, lim.dedup_ttl)

    # -- deliveries -----------------------------------------------------------------------
    def offer(self, sub: Subscription, msg: Msg, qos: int) -> bool:
        """Queue ``msg`` for ``sub``; False when a QoS 1 delivery cannot be taken."""
        b = self.broker
        if qos == 0:
            q0 = self.q0
            if len(q0) >= b.limits.max_queue_qos0:
                q0.popleft()
                b.drops["qos0_queue_full"] += 1
            q0.append(sub.pre0 + msg.tail)
        elif len(self.inflight) < b.limits.max_inflight:
            self._send1(sub, msg)
        elif len(self.pending1) < b.limits.max_pending_qos1:
            self.pending1.append((sub, msg))
        else:
            return False
        b.messages_out += 1
        if not self.dirty:
            self.dirty = True
            b._dirty.append(self)
        return True

    def _send1(self, sub: Subscription, msg: Msg) -> None:
        did = self.next_did
        self.next_did = did + 1
        body = sub.pre + p.pack_uint(did) + b"\x01" + msg.tail
        b = self.broker
        self.inflight[did] = Inflight(sub, msg, body, b.now + b.limits.ack_timeout)
        self.q1.append(body)

    def reply(self, command: bytes) -> None:
        """Queue an encoded command (never dropped)."""
        self.q1.append(command)
        if not self.dirty:
            self.dirty = True
            self.broker._dirty.append(self)

    def queued(self) -> int:
        return len(self.q0) + self.qs_n + len(self.q1) + len(self.pending1)

    def room1(self) -> int:
        """How many more QoS 1 deliveries ``offer`` would take now."""
        lim = self.broker.limits
        return (max(0, lim.max_inflight - len(self.inflight))
                + max(0, lim.max_pending_qos1 - len(self.pending1)))


class Broker:
    """The node's control-plane state machine. See the module docstring for the contract."""

    def __init__(
        self,
        limits: Limits | None = None,
        *,
        realms: Mapping[str, str] | None = None,
        allow_any_realm: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self.secrets: dict[str, str] = dict(realms or {})
        self.allow_any_realm = allow_any_realm
        self.rng = rng or random.Random()
        # sent in WELCOME: a client that reconnects can tell a restarted node (1 … 2^53-1)
        self.incarnation = random.SystemRandom().getrandbits(53) or 1
        self.now = 0.0
        self.realms: dict[str, Realm] = {}
        self.sessions: dict[bytes, Session] = {}
        self.by_sid: dict[int, Session] = {}
        self.fanout: Fanout | None = None
        self.mesh: MeshHook | None = None
        # the control driver's ingress figures (parked / refused input), merged into stats()
        self.ingress_stats: Callable[[], dict[str, Any]] | None = None
        self.mesh_in = 0  # messages from other nodes
        self.mesh_refused = 0  # ... refused for want of room (not lost: the sender re-sends)
        self._pending: dict[int, PendingPub] = {}
        self._next_seq = 1
        self._dirty: list[Session] = []
        self._stalled: list[Session] = []
        self._direct: list[tuple[bytes, bytes]] = []
        self._to_close: list[tuple[Session, Err, str]] = []
        self._next_sid = 1
        self._next_reg = 1
        self._next_inv = 1
        self._calls: dict[int, PendingCall] = {}
        self._call_heap: list[tuple[float, int]] = []
        # counters
        self.messages_in = 0
        self.messages_out = 0
        self.acked = 0
        self.redeliveries = 0
        self.duplicates = 0
        self.calls_total = 0
        self.calls_ok = 0
        self.bytes_in = 0
        self.commands_in = 0
        self.sessions_opened = 0
        self.blocked_total = 0  # times a session's socket refused a body (it became blocked)
        self.closed_by: dict[str, int] = {}
        self.drops: dict[str, int] = dict.fromkeys(
            ("qos0_queue_full", "qos1_queue_full", "qos1_expired", "retained_full",
             "session_closed", "no_group_member", "ingress_throttled"), 0)
        self.errors: dict[str, int] = {e.name: 0 for e in Err}
        self._handlers: dict[type[Any], Callable[[Session, Any], None]] = {
            p.Ping: self._on_ping,
            p.Bye: self._on_bye,
            p.Subscribe: self._on_subscribe,
            p.Unsubscribe: self._on_unsubscribe,
            p.Ack: self._on_ack,
            p.Register: self._on_register,
            p.Unregister: self._on_unregister,
            p.Call: self._on_call,
            p.Yield: self._on_yield,
            p.YieldError: self._on_yield_error,
            p.Stats: self._on_stats,
            p.Hello: self._on_second_hello,
        }

    # -- input ----------------------------------------------------------------------------
    def receive(self, identity: bytes, frames: list[bytes], now: float) -> None:
        """One ZeroMQ message from ``identity`` (the frames after the routing identity)."""
        got = self.decode(identity, frames, now)
        if got is not None:
            self.run(*got)

    def decode(self, identity: bytes, frames: list[bytes],
               now: float) -> tuple[Session, list[Any]] | None:
        """The first half of :meth:`receive`: check and decode one message (a session is
        opened by its HELLO here). None when nothing is left to run (answered already)."""
        self.now = now
        session = self.sessions.get(identity)
        if session is not None:
            session.last_seen = now
        try:
            if len(frames) != 2:
                raise p.ProtocolError(
                    Err.MALFORMED, f"a message has 2 frames (signature, body), got {len(frames)}"
                )
            if frames[0] != p.SIGNATURE:
                p.check_signature(frames[0])
            body = frames[1]
            self.bytes_in += len(body)
            if len(body) > self.limits.max_message:
                raise p.ProtocolError(
                    Err.MESSAGE_TOO_LARGE,
                    f"body of {len(body)} bytes exceeds max_message {self.limits.max_message}",
                )
            commands = p.decode_commands(body)
        except p.ProtocolError as exc:
            self._error_to(identity, session, 0, exc.code, exc.message)
            return None
        self.commands_in += len(commands)
        if session is None:
            session = self._welcome_first(identity, commands, now)
            if session is None:
                return None
        return session, commands

    def run(self, session: Session, commands: list[Any]) -> None:
        """The second half of :meth:`receive`: carry out decoded commands of ``session``."""
        self._run(session, commands)
        if len(session.q1) > self.limits.max_queue_reliable:
            self._to_close.append((session, Err.SLOW_CONSUMER, "reliable queue overflow"))
        self._process_closes()

    def split_control(self, commands: list[Any]) -> tuple[list[Any], list[Any]]:
        """(the commands that must not wait behind a session's data, the others): PING,
        ACK, YIELD and YIELD_ERROR (they are cheap and free resources), in order."""
        urgent = [c for c in commands if type(c) in _CONTROL]
        if not urgent:
            return urgent, commands
        return urgent, [c for c in commands if type(c) not in _CONTROL]

    def refuse(self, s: Session, commands: list[Any]) -> None:
        """``s`` sent more than its share while the node was busy (the driver's ingress
        credit): its PUBLISHes are not routed. QoS 0 ones are dropped and counted
        (``ingress_throttled``); QoS 1 ones, and requests, get ERROR ``OVERLOADED`` (the
        client may send them again later); control commands run."""
        dropped = errors = 0
        q1 = s.q1
        pack = p.pack_uint
        for cmd in commands:
            t = type(cmd)
            if t is p.Publish:
                if cmd.qos:  # ERROR (ref = mid, OVERLOADED): one concatenation, no encoding
                    q1.append(_ERROR_HEAD + pack(cmd.mid) + _OVERLOADED_TAIL)
                    errors += 1
                else:
                    dropped += 1
            elif t in _CONTROL or t is p.BadCommand or t is p.Bye:
                self._run(s, [cmd])
            else:
                ref = getattr(cmd, "rid", 0)
                self._error(s, ref if type(ref) is int else 0, Err.OVERLOADED, _BUSY)
        self.drops["ingress_throttled"] += dropped
        if errors:
            self.errors["OVERLOADED"] += errors
            if not s.dirty:
                s.dirty = True
                self._dirty.append(s)
            if len(q1) > self.limits.max_queue_reliable:
                self._to_close.append((s, Err.SLOW_CONSUMER, "reliable queue overflow"))
        self._process_closes()

    def _run(self, s: Session, commands: list[Any]) -> None:
        publish = p.Publish
        handlers = self._handlers
        cache: dict[str, list[Any]] = {}
        for cmd in commands:
            if s.closed:
                return
            if type(cmd) is publish:
                self._publish(s, cmd, cache)
            elif type(cmd) is p.BadCommand:
                self._error(s, cmd.ref, cmd.code, cmd.message)
            else:
                if type(cmd) in (p.Subscribe, p.Unsubscribe):
                    cache.clear()
                handlers[type(cmd)](s, cmd)

    def _welcome_first(self, identity: bytes, commands: list[Any], now: float) -> Session | None:
        """A message from a peer without a session: it must start with HELLO."""
        if not commands:
            self._error_to(identity, None, 0, Err.NOT_WELCOMED, "send HELLO first")
            return None
        first = commands[0]
        if type(first) is p.BadCommand:
            self._error_to(identity, None, first.ref, first.code, first.message)
            return None
        if type(first) is not p.Hello:
            ref = getattr(first, "rid", 0)
            self._error_to(identity, None, ref if type(ref) is int else 0, Err.NOT_WELCOMED,
                           f"{Code(_code_of(first)).name} before HELLO: send HELLO first")
            return None
        session = self._hello(identity, first, now)
        if session is not None:
            del commands[0]
        return session

    def _hello(self, identity: bytes, h: p.Hello, now: float) -> Session | None:
        lim = self.limits
        rid = h.rid
        if not (0 < len(h.realm.encode()) <= 255):
            self._error_to(identity, None, rid, Err.BAD_VALUE, "realm: 1 to 255 UTF-8 bytes")
            return None
        if len(h.name) > 255:
            self._error_to(identity, None, rid, Err.BAD_VALUE, "name: at most 255 characters")
            return None
        secret = self.secrets.get(h.realm)
        if secret is None:
            if not self.allow_any_realm:
                self._error_to(identity, None, rid, Err.UNKNOWN_REALM,
                               f"realm {h.realm!r} is not served by this node")
                return None
        elif secret and not hmac.compare_digest(secret.encode(), h.secret.encode()):
            self._error_to(identity, None, rid, Err.BAD_SECRET,
                           f"wrong secret for realm {h.realm!r}")
            return None
        if len(self.sessions) >= lim.max_sessions:
            self._error_to(identity, None, rid, Err.SESSION_LIMIT,
                           f"node at max_sessions ({lim.max_sessions})")
            return None
        hb = h.heartbeat_ms or lim.heartbeat_ms
        hb = min(max(hb, lim.min_heartbeat_ms), lim.max_heartbeat_ms)
        realm = self.realms.get(h.realm)
        if realm is None:
            realm = self.realms[h.realm] = Realm(h.realm)
        s = Session(self, identity, self._next_sid, realm, h.name, hb, now)
        self._next_sid += 1
        self.sessions[identity] = s
        self.by_sid[s.sid] = s
        self.sessions_opened += 1
        s.reply(_enc((int(Code.WELCOME), rid, s.sid, self.welcome_limits(s), self.incarnation)))
        return s

    def welcome_limits(self, s: Session) -> dict[str, int]:
        lim = self.limits
        return {
            "heartbeat_ms": s.heartbeat_ms,
            "liveness": lim.liveness,
            "max_payload": lim.max_payload,
            "max_message": lim.max_message,
            "max_subscriptions": lim.max_subscriptions,
            "max_inflight": lim.max_inflight,
            "max_registrations": lim.max_registrations,
            "max_pending_calls": lim.max_pending_calls,
            "max_batch": lim.max_batch,
            "ack_timeout_ms": int(lim.ack_timeout * 1000),
            "call_timeout_ms": int(lim.call_timeout * 1000),
        }

    # -- errors ---------------------------------------------------------------------------
    def _error(self, s: Session | RemoteCaller, ref: int, code: Err, message: str) -> None:
        self.errors[code.name] += 1
        if isinstance(s, RemoteCaller):
            s.done(None, code, message)
        else:
            s.reply(_enc((int(Code.ERROR), ref, int(code), message)))

    def _error_to(self, identity: bytes, s: Session | None, ref: int, code: Err, msg: str) -> None:
        if s is not None:
            self._error(s, ref, code, msg)
            return
        self.errors[code.name] += 1
        self._direct.append((identity, p.error_body(ref, code, msg)))

    # -- pub/sub --------------------------------------------------------------------------
    def _publish(self, s: Session, cmd: p.Publish, cache: dict[str, list[Any]]) -> None:
        topic = cmd.topic
        payload = cmd.payload
        qos = cmd.qos
        realm = s.realm
        if len(payload) > self.limits.max_payload:
            self._error(s, cmd.mid, Err.PAYLOAD_TOO_LARGE,
                        f"payload of {len(payload)} bytes exceeds max_payload "
                        f"{self.limits.max_payload}")
            return
        if qos != 0:
            if qos != 1 or cmd.mid <= 0:
                self._error(s, cmd.mid, Err.BAD_VALUE,
                            "qos must be 0 or 1; a QoS 1 PUBLISH needs a mid > 0")
                return
            prev = s.dedup.get(cmd.mid, None, now=self.now)
            if prev is not None:
                self.duplicates += 1
                if prev >= 0:  # else still pending at the shards: its PUBACK will come
                    s.reply(_enc((int(Code.PUBACK), cmd.mid, prev)))
                return
        targets = cache.get(topic)
        if targets is None:
            try:
                targets = realm.trie.match(topic)
            except (ValueError, TypeError) as exc:
                self._error(s, cmd.mid, Err.INVALID_TOPIC, str(exc))
                return
            cache[topic] = targets
        self.messages_in += 1
        tail = _enc((topic, payload, False))[1:]
        msg = Msg(topic, tail, qos)
        ok = True
        mesh = self.mesh
        groups: list[Group] = []
        for t in targets:
            if type(t) is Subscription:
                q = qos if qos <= t.qos else t.qos
                if not t.sink.offer(t, msg, q):
                    self.drops["qos1_queue_full"] += 1
                    ok = False
            elif mesh is not None:
                groups.append(t)
            elif not self._offer_group(t, msg, qos):
                ok = False
        remote = 0
        if mesh is not None:
            remote, groups, taken = mesh.publish(realm.name, topic, payload, tail, qos, groups)
            ok = ok and taken
            for g in groups:
                if not self._offer_group(g, msg, qos):
                    ok = False
        if cmd.retain:
            ok = self._retain(realm, topic, payload, tail, qos) and ok
        fan = self.fanout
        if fan is not None:  # plain subscriptions are matched by the shards
            if not qos:
                fan.publish(realm.name, topic, tail, 0, 0)
                return
            s.dedup.put(cmd.mid, -1, now=self.now)
            self._hold(fan, realm.name, PendingPub(s, cmd.mid, msg, ok, len(targets) + remote))
            return
        if qos:
            self._puback(s, cmd.mid, ok, bool(targets or remote))

    def _hold(self, fan: Fanout, realm_name: str, pp: PendingPub) -> None:
        """Route a QoS 1 message through the shards; ``finish_publish`` completes ``pp``."""
        seq = self._next_seq
        self._next_seq = seq + 1
        self._pending[seq] = pp
        fan.publish(realm_name, pp.msg.topic, pp.msg.tail, 1, seq)

    def _puback(self, s: Session, mid: int, ok: bool, matched: bool) -> None:
        """Answer (and remember, for a repeated ``mid``) a QoS 1 PUBLISH."""
        if ok:
            reason = PubackReason.OK if matched else PubackReason.NO_SUBSCRIBERS
        else:
            reason = PubackReason.QUOTA_EXCEEDED
        s.dedup.put(mid, int(reason), now=self.now)
        s.reply(_enc((int(Code.PUBACK), mid, int(reason))))

    def inject(self, realm_name: str, topic: str, payload: bytes, qos: int,
               groups: list[tuple[str, str]],
               done: Callable[[bool], None] | None = None) -> None:
        """A message from another node: deliver it to the local plain subscriptions that
        match and to the named shared ``groups`` (the publishing node chose this node for
        them). Never forwarded to other nodes.

        For QoS 1 (with ``done``) the message is taken whole or not at all: when a matching
        QoS 1 subscription, or every member of a named group, has no room for it, nothing
        is delivered and ``done(False)`` says so (counted, ``messages_from_mesh_refused``; the
        sending node keeps it and sends it again later); else ``done(True)`` once it was
        handed to the subscribers (at once, or when the shards answered)."""
        self.mesh_in += 1
        realm = self.realms.get(realm_name)
        if realm is None:
            if done is not None:
                done(True)  # nobody here can want it: nothing to wait for
            return
        tail = _enc((topic, payload, False))[1:]
        msg = Msg(topic, tail, qos)
        fan = self.fanout
        named: list[Group] = []
        for key in groups:
            g = realm.groups.get(key)
            if g is not None:
                named.append(g)
            else:  # its members left since the publishing node picked this node
                self.drops["no_group_member"] += 1
        subs = None
        if fan is None:
            subs = [t for t in realm.trie.match(topic) if type(t) is Subscription]
        if qos and done is not None and not self._has_room(subs or (), named):
            self.mesh_refused += 1
            done(False)
            return
        if subs:
            for t in subs:
                if not t.sink.offer(t, msg, qos if qos <= t.qos else t.qos):
                    self.drops["qos1_queue_full"] += 1
        if fan is not None:
            if qos and done is not None:
                self._hold(fan, realm_name, PendingPub(None, 0, msg, True, 0, done, named))
                return
            fan.publish(realm_name, topic, tail, 0, 0)
        for g in named:
            self._offer_group(g, msg, qos)
        if done is not None:
            done(True)

    @staticmethod
    def _has_room(subs: Iterable[Subscription], groups: list[Group]) -> bool:
        """Whether every QoS 1 subscription in ``subs`` (a session counted once per
        subscription) and some member of each group can take one more QoS 1 message."""
        need: dict[Session, int] = {}
        for t in subs:
            if t.qos:
                need[t.sink] = need.get(t.sink, 0) + 1
        for s, n in need.items():
            if s.room1() < n:
                return False
        for g in groups:
            if g.members and not any(m.qos == 0 or m.sink.room1() > 0 for m in g.members):
                return False
        return True

    def deliver(self, sid: int, n: int, body: Any) -> None:
        """A whole body of ``n`` QoS 0 EVENTs built by a shard for session ``sid``.

        ``body`` is bytes or any buffer (a ``zmq.Frame``): when nothing else is queued for
        the session it is sent exactly as it is, else its commands join the next body."""
        s = self.by_sid.get(sid)
        if s is None or s.closed:
            self.drops["session_closed"] += n
            return
        qs = s.qs
        bound = self.limits.max_queue_qos0
        while qs and s.qs_n + n + len(s.q0) > bound:
            k = qs.popleft()[0]  # drop the oldest, a chunk at a time
            s.qs_n -= k
            self.drops["qos0_queue_full"] += k
        qs.append((n, body))
        s.qs_n += n
        self.messages_out += n
        if not s.dirty:
            s.dirty = True
            self._dirty.append(s)

    def finish_publish(self, seq: int, matched: int, targets: list[int]) -> None:
        """Every shard answered QoS 1 PUBLISH ``seq``: ``matched`` subscriptions in all, and
        ``targets`` = flat ``sid, sub_id`` pairs of those to deliver at QoS 1."""
        pp = self._pending.pop(seq, None)
        if pp is None:
            return
        ok = pp.ok
        msg = pp.msg
        by_sid = self.by_sid
        subs: list[Subscription] = []
        for i in range(0, len(targets), 2):
            s = by_sid.get(targets[i])
            sub = s.subs_by_id.get(targets[i + 1]) if s is not None else None
            if s is None or sub is None or s.closed or sub.group is not None:
                continue  # gone (or unsubscribed) since the shard matched
            subs.append(sub)
        if pp.done is not None:  # from another node: all or nothing (see inject)
            if not self._has_room(subs, pp.groups or []):
                self.mesh_refused += 1
                pp.done(False)
                return
            for g in pp.groups or ():
                self._offer_group(g, msg, 1)
        for sub in subs:
            if not sub.sink.offer(sub, msg, 1):
                self.drops["qos1_queue_full"] += 1
                ok = False
        if pp.done is not None:
            pp.done(True)
        pub = pp.session
        if pub is not None and not pub.closed:
            self._puback(pub, pp.mid, ok, bool(matched + pp.targets))

    def _offer_group(self, g: Group, msg: Msg, qos: int) -> bool:
        members = g.members
        n = len(members)
        for _ in range(n):
            sub = members[g.rr % n]
            g.rr += 1
            if sub.sink.offer(sub, msg, qos if qos <= sub.qos else sub.qos):
                return True
        self.drops["qos1_queue_full" if n else "no_group_member"] += 1
        return False

    def _retain(self, realm: Realm, topic: str, payload: bytes, tail: bytes, qos: int) -> bool:
        store = realm.retained
        if not payload:
            store.pop(topic, None)
            return True
        if topic not in store and len(store) >= self.limits.max_retained:
            self.drops["retained_full"] += 1
            return False
        store[topic] = Msg(topic, tail[:-1] + b"\xc3", qos)
        return True

    def _on_subscribe(self, s: Session, cmd: p.Subscribe) -> None:
        flt = cmd.filter
        if cmd.qos not in (0, 1):
            self._error(s, cmd.rid, Err.BAD_VALUE, "qos must be 0 or 1")
            return
        try:
            shared = parse_shared(flt)
            inner = shared[1] if shared else flt
            if not shared:
                validate_filter(flt)
        except ValueError as exc:
            self._error(s, cmd.rid, Err.INVALID_FILTER, str(exc))
            return
        realm = s.realm
        old = s.subs.get(flt)
        if old is not None:  # re-subscribe: MQTT replaces the subscription's options
            old.qos = cmd.qos
            if self.fanout is not None and old.group is None:
                self.fanout.subscribe(s, old)
            s.reply(_enc((int(Code.SUBACK), cmd.rid, old.sub_id, cmd.qos)))
            if shared is None:
                self._send_retained(old)
            return
        if len(s.subs) >= self.limits.max_subscriptions:
            self._error(s, cmd.rid, Err.SUBSCRIPTION_LIMIT,
                        f"at max_subscriptions ({self.limits.max_subscriptions})")
            return
        group = None
        if shared is not None:
            key = shared
            group = realm.groups.get(key)
            if group is None:
                group = realm.groups[key] = Group(shared[0], inner)
                realm.trie.add(inner, group)
        sub = Subscription(s, s.next_sub_id, flt, inner, cmd.qos, group)
        s.next_sub_id += 1
        s.subs[flt] = sub
        s.subs_by_id[sub.sub_id] = sub
        if group is not None:
            group.members.append(sub)
        elif self.fanout is not None:
            self.fanout.subscribe(s, sub)
        else:
            realm.trie.add(inner, sub)
        if self.mesh is not None:
            self.mesh.subscribed(realm.name, flt)
        s.reply(_enc((int(Code.SUBACK), cmd.rid, sub.sub_id, cmd.qos)))
        if group is None:
            self._send_retained(sub)

    def _send_retained(self, sub: Subscription) -> None:
        store = sub.sink.realm.retained
        if not store:
            return
        one = TopicTrie()
        one.add(sub.inner, 0)
        for topic, msg in list(store.items()):
            if one.match(topic):
                sub.sink.offer(sub, msg, msg.qos if msg.qos <= sub.qos else sub.qos)

    def _on_unsubscribe(self, s: Session, cmd: p.Unsubscribe) -> None:
        sub = s.subs.pop(cmd.filter, None)
        if sub is not None:
            del s.subs_by_id[sub.sub_id]
            if sub.group is None and self.fanout is not None:
                self.fanout.unsubscribe(s, sub)
            else:
                self._drop_sub(s.realm, sub)
            if self.mesh is not None:
                self.mesh.unsubscribed(s.realm.name, sub.filter)
        s.reply(_enc((int(Code.UNSUBACK), cmd.rid, sub is not None)))

    def _drop_sub(self, realm: Realm, sub: Subscription) -> None:
        g = sub.group
        if g is None:
            realm.trie.remove(sub.inner, sub)
            return
        g.members.remove(sub)
        if not g.members:
            realm.trie.remove(g.filter, g)
            del realm.groups[(g.name, g.filter)]

    def _on_ack(self, s: Session, cmd: p.Ack) -> None:
        if s.inflight.pop(cmd.did, None) is None:
            self.errors["UNKNOWN_DELIVERY"] += 1  # late or repeated ack: counted, not answered
            return
        self.acked += 1
        self._fill_window(s)

    def _fill_window(self, s: Session) -> None:
        pending = s.pending1
        room = self.limits.max_inflight - len(s.inflight)
        while pending and room > 0:
            sub, msg = pending.popleft()
            s._send1(sub, msg)
            room -= 1
        if not s.dirty and s.q1:
            s.dirty = True
            self._dirty.append(s)

    # -- RPC ------------------------------------------------------------------------------
    def _on_register(self, s: Session, cmd: p.Register) -> None:
        name = cmd.procedure
        if not name or len(name) > 1024 or "\x00" in name:
            self._error(s, cmd.rid, Err.BAD_VALUE, "procedure: 1 to 1024 characters, no NUL")
            return
        if cmd.strategy not in _STRATEGIES:
            self._error(s, cmd.rid, Err.BAD_VALUE,
                        f"strategy must be one of {', '.join(_STRATEGIES)}")
            return
        procs = s.realm.procedures
        proc = procs.get(name)
        if proc is not None and proc.strategy != cmd.strategy:
            self._error(s, cmd.rid, Err.STRATEGY_MISMATCH,
                        f"{name!r} is registered with strategy {proc.strategy!r}")
            return
        for reg in s.regs.values():
            if reg.procedure == name:  # idempotent
                s.reply(_enc((int(Code.REGISTERED), cmd.rid, reg.reg_id)))
                return
        if len(s.regs) >= self.limits.max_registrations:
            self._error(s, cmd.rid, Err.REGISTRATION_LIMIT,
                        f"at max_registrations ({self.limits.max_registrations})")
            return
        if cmd.cache_ttl_ms < 0:
            self._error(s, cmd.rid, Err.BAD_VALUE, "cache_ttl_ms must be >= 0")
            return
        if proc is None:
            proc = procs[name] = Procedure(cmd.strategy, cmd.idempotent, cmd.cache_ttl_ms / 1000)
            if self.mesh is not None:
                self.mesh.registered(s.realm.name, name, proc.strategy, proc.idempotent,
                                     proc.cache_ttl)
        reg = Registration(self._next_reg, s, name)
        self._next_reg += 1
        proc.regs.append(reg)
        s.regs[reg.reg_id] = reg
        s.reply(_enc((int(Code.REGISTERED), cmd.rid, reg.reg_id)))

    def _on_unregister(self, s: Session, cmd: p.Unregister) -> None:
        reg = s.regs.pop(cmd.reg_id, None)
        if reg is not None:
            self._drop_reg(s.realm, reg)
        s.reply(_enc((int(Code.UNREGISTERED), cmd.rid, reg is not None)))

    def _drop_reg(self, realm: Realm, reg: Registration) -> None:
        proc = realm.procedures[reg.procedure]
        proc.regs.remove(reg)
        if not proc.regs:
            del realm.procedures[reg.procedure]
            if self.mesh is not None:
                self.mesh.unregistered(realm.name, reg.procedure)

    def _on_call(self, s: Session, cmd: p.Call) -> None:
        self.calls_total += 1
        lim = self.limits
        if cmd.timeout_ms < 0:
            self._error(s, cmd.rid, Err.BAD_VALUE, "timeout_ms must be >= 0")
            return
        proc = s.realm.procedures.get(cmd.procedure)
        if len(s.calls) + s.remote_calls >= lim.max_pending_calls:
            self._error(s, cmd.rid, Err.CALL_LIMIT,
                        f"at max_pending_calls ({lim.max_pending_calls})")
            return
        timeout = cmd.timeout_ms / 1000.0 if cmd.timeout_ms else lim.call_timeout
        timeout = min(timeout, lim.max_call_timeout)
        if proc is None:
            if self.mesh is None:
                self._error(s, cmd.rid, Err.NO_PROVIDER, f"no provider for {cmd.procedure!r}")
                return
            s.remote_calls += 1
            self.mesh.call(s, cmd.rid, s.realm.name, cmd.procedure, bytes(cmd.args), timeout)
            return
        self._invoke(s, cmd.rid, self._pick(proc), cmd.args, self.now + timeout)

    def _pick(self, proc: Procedure) -> Registration:
        regs = proc.regs
        if proc.strategy == "random":
            return regs[self.rng.randrange(len(regs))]
        if proc.strategy == "first":
            return regs[0]
        reg = regs[proc.rr % len(regs)]  # round_robin; lowest_latency: all local, in turn
        proc.rr += 1
        return reg

    def _invoke(self, caller: Session | RemoteCaller, rid: int, reg: Registration,
                args: Any, deadline: float) -> None:
        lim = self.limits
        inv = self._next_inv
        self._next_inv += 1
        s = caller
        provider = reg.session
        self._calls[inv] = PendingCall(inv, s, rid, provider, deadline)
        heapq.heappush(self._call_heap, (deadline, inv))
        s.calls.add(inv)
        provider.invocations.add(inv)
        provider.reply(_enc((int(Code.INVOKE), inv, reg.reg_id, reg.procedure, args)))
        if provider.queued() > lim.max_queue_reliable:
            self._to_close.append((provider, Err.SLOW_CONSUMER, "reliable queue overflow"))

    def invoke(self, realm_name: str, procedure: str, args: bytes, timeout: float,
               done: Callable[[bytes | None, Err | None, str], None]) -> bool:
        """A call from another node for a local provider: False when there is none here.
        ``done(result, None, "")`` or ``done(None, code, message)`` answers it (see
        :class:`RemoteCaller`)."""
        realm = self.realms.get(realm_name)
        proc = realm.procedures.get(procedure) if realm is not None else None
        if proc is None:
            return False
        self.calls_total += 1
        timeout = min(timeout, self.limits.max_call_timeout)
        self._invoke(RemoteCaller(done), 0, self._pick(proc), msgspec.Raw(args),
                     self.now + timeout)
        self._process_closes()
        return True

    def call_done(self, s: Session, rid: int, result: bytes | None, code: Err = Err.NO_PROVIDER,
                  message: str = "") -> None:
        """The mesh finished a call of ``s``: ``result`` (msgpack bytes), or an error."""
        s.remote_calls -= 1
        if s.closed:
            return
        if result is not None:
            self.calls_ok += 1
            s.reply(_enc((int(Code.RESULT), rid, msgspec.Raw(result))))
        else:
            self._error(s, rid, code, message)

    def _finish_call(self, s: Session, inv_id: int) -> PendingCall | None:
        call = self._calls.get(inv_id)
        if call is None or call.provider is not s:
            self.errors["UNKNOWN_INVOCATION"] += 1  # late (timed out) or not this provider's
            return None
        del self._calls[inv_id]
        s.invocations.discard(inv_id)
        call.caller.calls.discard(inv_id)
        return call

    def _on_yield(self, s: Session, cmd: p.Yield) -> None:
        call = self._finish_call(s, cmd.inv_id)
        if call is not None:
            self.calls_ok += 1
            caller = call.caller
            if isinstance(caller, RemoteCaller):
                caller.done(bytes(cmd.result), None, "")
            else:
                caller.reply(_enc((int(Code.RESULT), call.rid, cmd.result)))

    def _on_yield_error(self, s: Session, cmd: p.YieldError) -> None:
        call = self._finish_call(s, cmd.inv_id)
        if call is not None:
            self._error(call.caller, call.rid, Err.APPLICATION_ERROR, cmd.message)

    # -- session commands -----------------------------------------------------------------
    def _on_ping(self, s: Session, cmd: p.Ping) -> None:
        s.reply(_enc((int(Code.PONG), cmd.token)))

    def _on_second_hello(self, s: Session, cmd: p.Hello) -> None:
        self._error(s, cmd.rid, Err.ALREADY_WELCOMED, "this connection already has a session")

    def _on_bye(self, s: Session, cmd: p.Bye) -> None:
        self._to_close.append((s, Err.NORMAL, "bye"))
        s.closed = True

    def _on_stats(self, s: Session, cmd: p.Stats) -> None:
        s.reply(_enc((int(Code.STATS_REPLY), cmd.rid, self.stats())))

    # -- closing --------------------------------------------------------------------------
    def _process_closes(self) -> None:
        while self._to_close:
            s, code, message = self._to_close.pop()
            self.close(s, code, message)

    def close(self, s: Session, code: Err, message: str) -> None:
        """Drop a session: its subscriptions, registrations and calls go with it."""
        if self.sessions.get(s.identity) is not s:
            return
        del self.sessions[s.identity]
        self.by_sid.pop(s.sid, None)
        s.closed = True
        self.closed_by[code.name] = self.closed_by.get(code.name, 0) + 1
        realm = s.realm
        fan = self.fanout
        mesh = self.mesh
        for sub in s.subs.values():
            if fan is None or sub.group is not None:
                self._drop_sub(realm, sub)
            if mesh is not None:
                mesh.unsubscribed(realm.name, sub.filter)
        if fan is not None:
            fan.session_closed(s)
        for reg in s.regs.values():
            self._drop_reg(realm, reg)
        for inv in list(s.invocations):  # this session was the provider
            call = self._calls.pop(inv)
            call.caller.calls.discard(inv)
            if call.caller is not s:
                self._error(call.caller, call.rid, Err.PROVIDER_GONE,
                            "the provider disconnected during the call")
        for inv in list(s.calls):  # this session was the caller: forget it, ignore the YIELD
            gone = self._calls.pop(inv, None)
            if gone is not None:
                gone.provider.invocations.discard(inv)
        # QoS 1 work for shared subscriptions goes to the group's other members
        lost = len(s.q0) + s.qs_n
        for item in [(f.sub, f.msg) for f in s.inflight.values()] + list(s.pending1):
            sub, msg = item
            if sub.group is not None and sub.group.members:
                self._offer_group(sub.group, msg, 1)
            else:
                lost += 1
        self.drops["session_closed"] += lost
        s.q0.clear()
        s.qs.clear()
        s.qs_n = 0
        s.q1.clear()
        s.pending1.clear()
        s.inflight.clear()
        s.subs.clear()
        s.subs_by_id.clear()
        s.regs.clear()
        if code not in (Err.PEER_GONE,):
            self._direct.append((s.identity, _enc(((int(Code.BYE), int(code), message),))))

    def peer_gone(self, identity: bytes, now: float) -> None:
        """The driver learnt that the peer behind ``identity`` is disconnected."""
        self.now = now
        s = self.sessions.get(identity)
        if s is not None:
            self.close(s, Err.PEER_GONE, "peer disconnected")

    def close_all(self, code: Err = Err.SHUTDOWN, message: str = "node shutting down") -> None:
        for s in list(self.sessions.values()):
            self.close(s, code, message)

    # -- timers ---------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Heartbeat liveness, QoS 1 redelivery, call timeouts, stuck sessions."""
        self.now = now
        lim = self.limits
        for s in list(self.sessions.values()):
            if now - s.last_seen > s.hb_timeout:
                self.close(s, Err.HEARTBEAT_TIMEOUT,
                           f"no message for {lim.liveness} heartbeats")
                continue
            if s.stalled_since is not None and now - s.stalled_since > lim.stuck_timeout:
                self.close(s, Err.SLOW_CONSUMER, f"blocked for over {lim.stuck_timeout} s")
                continue
            if s.inflight:
                self._redeliver(s, now)
            if len(s.q1) > lim.max_queue_reliable:
                self.close(s, Err.SLOW_CONSUMER, "reliable queue overflow")
        heap = self._call_heap
        while heap and heap[0][0] <= now:
            _, inv = heapq.heappop(heap)
            call = self._calls.pop(inv, None)
            if call is None:
                continue
            call.caller.calls.discard(inv)
            call.provider.invocations.discard(inv)
            self._error(call.caller, call.rid, Err.CALL_TIMEOUT, "the call timed out")
        self._process_closes()

    def _redeliver(self, s: Session, now: float) -> None:
        lim = self.limits
        expired = []
        for did, f in s.inflight.items():
            if f.deadline > now:
                break
            expired.append(did)
        for did in expired:
            f = s.inflight.pop(did)
            if f.attempts >= lim.max_attempts:
                self.drops["qos1_expired"] += 1
                continue
            f.attempts += 1
            f.deadline = now + lim.ack_timeout
            s.inflight[did] = f
            self.redeliveries += 1
            s.reply(f.body)
        if expired:
            self._fill_window(s)

    # -- output ---------------------------------------------------------------------------
    def take_direct(self) -> list[tuple[bytes, bytes]]:
        out, self._direct = self._direct, []
        return out

    def take_dirty(self) -> list[Session]:
        """Sessions with something to send: those stalled before first, then the dirty."""
        out = self._stalled + self._dirty
        self._stalled = []
        self._dirty = []
        return out

    def next_body(self, s: Session) -> Any:
        """The next body to send to ``s`` (at most ``max_batch`` commands), or None.

        A body is ``bytes``, or a shard's body buffer passed on as it is (see ``deliver``)."""
        if s.closed:
            return None
        body = s.stalled_body
        if body is not None:
            s.stalled_body = None
            return body
        q1, q0 = s.q1, s.q0
        n1, n0, ns = len(q1), len(q0), s.qs_n
        if n1 + n0 + ns == 0:
            s.dirty = False
            s.stalled_since = None  # caught up: everything queued went into the socket
            return None
        cap = self.limits.max_batch
        qs = s.qs
        if n1 + n0 == 0 and ns:  # a shard's body goes as it is
            k, body = qs.popleft()
            s.qs_n -= k
            return body
        if n1 + n0 + ns <= cap:
            items: list[Any] = list(q1)
            items += q0
            q1.clear()
            q0.clear()
            if ns:
                items += [_commands(k, c) for k, c in qs]
                qs.clear()
                s.qs_n = 0
            return p.array_header(n1 + n0 + ns) + b"".join(items)
        take1 = min(n1, cap)
        items = [q1.popleft() for _ in range(take1)]
        items += [q0.popleft() for _ in range(min(n0, cap - take1))]
        count = len(items)
        while qs and (count + qs[0][0] <= cap or count == 0):  # a shard's body is whole
            k, body = qs.popleft()
            s.qs_n -= k
            items.append(_commands(k, body))
            count += k
        return p.array_header(count) + b"".join(items)

    def stalled(self, s: Session, body: bytes, now: float) -> None:
        """The socket refused ``body`` (peer at its high-water mark): keep it for later. A
        session stays *blocked* (``stalled_since``) until its queues are empty
        (``next_body`` found nothing): a consumer that reads but never catches up is as
        slow as one that does not read at all."""
        s.stalled_body = body
        self._stalled.append(s)
        if s.stalled_since is None:
            s.stalled_since = now
            self.blocked_total += 1

    # -- figures --------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Every counter and gauge (the STATS reply and the metrics both read this)."""
        sessions = self.sessions.values()
        return {
            "sessions": len(self.sessions),
            "sessions_opened_total": self.sessions_opened,
            "sessions_closed_total": dict(self.closed_by),
            "realms": len(self.realms),
            "subscriptions": sum(len(s.subs) for s in sessions),
            "registrations": sum(len(s.regs) for s in sessions),
            "retained": sum(len(r.retained) for r in self.realms.values()),
            "messages_in_total": self.messages_in,
            "messages_out_total": self.messages_out,
            "commands_in_total": self.commands_in,
            "bytes_in_total": self.bytes_in,
            "acks_total": self.acked,
            "redeliveries_total": self.redeliveries,
            "duplicates_total": self.duplicates,
            "calls_total": self.calls_total,
            "calls_ok_total": self.calls_ok,
            "calls_pending": len(self._calls),
            "inflight": sum(len(s.inflight) for s in sessions),
            "queued_qos0": sum(len(s.q0) + s.qs_n for s in sessions),
            "queued_reliable": sum(len(s.q1) for s in sessions),
            "queued_pending_qos1": sum(len(s.pending1) for s in sessions),
            "stalled_sessions": sum(1 for s in sessions if s.stalled_since is not None),
            "blocked_total": self.blocked_total,
            "blocked_seconds_max": max((self.now - s.stalled_since for s in sessions
                                        if s.stalled_since is not None), default=0.0),
            "messages_from_mesh_total": self.mesh_in,
            "messages_from_mesh_refused_total": self.mesh_refused,
            "drops_total": dict(self.drops),
            "errors_total": {k: v for k, v in self.errors.items() if v},
            **(self.ingress_stats() if self.ingress_stats is not None else {}),
            **({"shards": self.fanout.stats()} if self.fanout is not None else {}),
            **({"mesh": self.mesh.stats()} if self.mesh is not None else {}),
        }


def _commands(n: int, body: Any) -> memoryview:
    """The commands of a whole body of ``n`` commands: what follows its array header."""
    return memoryview(body)[1 if n < 16 else 3 if n < 0x10000 else 5:]


def _code_of(cmd: Any) -> int:
    info = msgspec.inspect.type_info(type(cmd))
    tag = getattr(info, "tag", 0)
    return tag if isinstance(tag, int) else 0


__all__ = ["Broker", "Fanout", "Limits", "Msg", "Session", "Subscription"]
