"""The Python client of a macula node: pub/sub and RPC over MCP/1 (``control/SPEC.md``).

:class:`Client` is an asyncio client; :class:`BlockingClient` runs one on a background loop
for plain blocking code (scripts, the ``macula pub/sub/call`` commands)::

    client = await Client.connect("tcp://127.0.0.1:5555", realm="demo", name="sensor")
    sub = await client.subscribe("sensors/+/temp", qos=1)
    await client.publish("sensors/k/temp", b"21.5")          # queued; leaves this iteration
    async for msg in sub:                                    # or subscribe(..., callback=f)
        print(msg.topic, msg.payload)
    await client.register("math.add", lambda args: sum(args))
    await client.call("math.add", [2, 3])                    # 5
    await client.close()

How it works, and what it costs:

- **One DEALER socket, no zmq.asyncio.** The socket's ``FD`` is registered with the loop
  (``loop.add_reader``); one wake-up drains every waiting message with non-blocking
  ``recv`` and dispatches each command (a typed ``msgspec`` decode of the whole body, about
  100 ns a command). ZeroMQ's FD is edge-triggered, so the client re-checks ``EVENTS`` after
  every drain and every send.
- **Automatic batching.** Every command (PUBLISH, ACK, SUBSCRIBE, CALL, YIELD...) is appended
  to an outgoing list; the first append of a loop iteration schedules one flush with
  ``call_soon``. The flush encodes the list in one ``msgspec`` call per body (at most the
  node's ``max_batch`` commands each) and sends it. So a burst of ``publish`` calls in one
  iteration leaves as one ZeroMQ message and nothing ever waits on a timer: latency at low
  load is one loop iteration.
- **Ids.** Request ids (``rid``) and QoS 1 message ids (``mid``) come from one counter, so an
  ERROR's ``ref`` names exactly one outstanding request. An ERROR whose ``ref`` names none
  (for example a QoS 0 PUBLISH the node refused, ``ref`` 0) goes to ``on_error`` (default:
  logged).
- **QoS 1.** Subscriber side: an EVENT with ``qos`` 1 is acknowledged (ACK ``did``) as soon
  as it is handed to the subscription (queue or callback); its ``did`` is remembered (the
  last ``dedup_size`` ids) and a repeated ``did`` is dropped as a duplicate. A QoS 1 EVENT
  that does not fit in a full subscription queue is *not* acknowledged, so the node sends
  it again after its ``ack_timeout`` (at-least-once holds end to end). A QoS 0 EVENT that
  does not fit replaces the oldest queued one (counted in ``Subscription.dropped``).
  Publisher side: ``publish(qos=1)`` waits for the PUBACK and returns its reason.
- **Heartbeats.** The client asks for ``heartbeat_ms`` 2000 (node default with 0) and sends
  PING when it sent nothing, or received nothing, for ``heartbeat_ms / 2``; nothing received
  for ``liveness × heartbeat_ms / 2`` (3 s by default) means the node is gone.
- **Reconnection** (control/SPEC.md section 4.2). A lost node — the connection closing
  (a ZeroMQ socket monitor, at once), BYE the client did not ask for, ERROR NOT_WELCOMED
  (a restarted node reached through ZeroMQ's silent reconnect), or silence — makes the
  client open a new socket, say HELLO (back-off 0.1 s doubling to ``reconnect_max``, 1 s,
  with jitter), SUBSCRIBE and REGISTER again onto the same :class:`Subscription` and
  :class:`Registration` objects, forget the old session's delivery ids, and send again what
  it held: QoS 1 PUBLISHes without a PUBACK (same ``mid``; at most ``max_resend``) and
  requests that are safe to repeat. A CALL already sent fails with :class:`ConnectionLost`.
  ``on_disconnect`` / ``on_reconnect`` report it; ``reconnect=False`` closes instead, and
  then iterating a subscription raises :class:`ConnectionLost` rather than ending.
- **RPC.** ``args`` and results are any msgpack-encodable value; they are encoded once by
  the caller and decoded once by the provider (the node passes the bytes through). A
  handler (plain or ``async``) runs on the client's loop; an exception it raises goes back
  to the caller as ``APPLICATION_ERROR`` with ``str(exc)``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import logging
import random
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from concurrent.futures import Future as ThreadFuture
from dataclasses import dataclass
from typing import Any, Final, TypeVar, cast

import msgspec
import zmq
from zmq.utils import monitor as zmq_monitor

from macula import validate_filter, validate_topic
from macula.control import protocol as p
from macula.control.protocol import Code, Err, PubackReason

__all__ = [
    "BlockingClient",
    "BlockingSubscription",
    "Client",
    "ConnectionClosed",
    "ConnectionLost",
    "CurveKeys",
    "MaculaError",
    "Message",
    "Reconnected",
    "Registration",
    "RemoteError",
    "Subscription",
]

log = logging.getLogger("macula.client")

T = TypeVar("T")
STRATEGIES: Final = ("round_robin", "random", "first", "lowest_latency")
_MAX_ID: Final = (1 << 53) - 1
DEFAULT_HEARTBEAT_MS: Final = 2000  # asked of the node: PING after 1 s idle, gone after 3 s
RECONNECT_MIN: Final = 0.1  # first back-off (seconds), doubling with jitter ...
RECONNECT_MAX: Final = 1.0  # ... up to this
MAX_RESEND: Final = 10_000  # QoS 1 PUBLISHes held across a reconnection
_enc = msgspec.msgpack.Encoder()
_dec_any: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder()


class MaculaError(Exception):
    """Base class of the client's errors."""


class RemoteError(MaculaError):
    """The node answered ERROR: ``code`` (an :class:`Err`) and its ``message``."""

    def __init__(self, code: int, message: str) -> None:
        try:
            self.code: Err | int = Err(code)
            name = self.code.name
        except ValueError:
            self.code = code
            name = str(code)
        self.message = message
        super().__init__(f"{name}: {message}")


class ConnectionClosed(MaculaError):
    """The session is over (``close()``, or the node was lost and the client does not
    reconnect). ``code``: the :class:`Err` that says why (0 when none applies)."""

    def __init__(self, message: str, code: int = 0) -> None:
        self.code = code
        super().__init__(message)


class ConnectionLost(ConnectionClosed):
    """The connection to the node was lost: the node stopped or restarted, went silent, said
    BYE, or answered NOT_WELCOMED. An operation that may already have reached the old node
    (a CALL) fails with it; with ``reconnect=False`` everything does, and iterating a
    subscription raises it instead of ending."""


@dataclass(frozen=True)
class CurveKeys:
    """CURVE keys (Z85 text or 32 raw bytes): the node's public key and the client's pair."""

    server_public: bytes
    public: bytes
    secret: bytes


@dataclass(frozen=True, slots=True)
class Message:
    """A delivered EVENT."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    sub_id: int


@dataclass(frozen=True)
class Reconnected:
    """What ``on_reconnect`` receives once a new session has restored everything."""

    session_id: int
    """The new session's id."""
    previous_session_id: int
    """The id of the session that was lost."""
    node_restarted: bool | None
    """Whether the node's incarnation changed (None: the node does not send one)."""
    downtime: float
    """Seconds from noticing the loss to the restored session."""
    subscriptions: int
    """Subscriptions restored (SUBSCRIBE again, same :class:`Subscription` objects)."""
    registrations: int
    """Registrations restored (REGISTER again, same :class:`Registration` objects)."""
    resent: int
    """Held requests sent again: QoS 1 PUBLISHes (same ``mid``) and others."""


Handler = Callable[[Any], Any]
MessageCallback = Callable[[Message], Any]
DisconnectCallback = Callable[[ConnectionLost], Any]
ReconnectCallback = Callable[[Reconnected], Any]


class Subscription:
    """One SUBSCRIBE: ``async for msg in sub`` (unless made with a callback).

    The object outlives reconnections: the client subscribes again after a new HELLO and
    this object keeps yielding (``sub_id`` becomes the new session's id)."""

    def __init__(
        self, client: Client, filter: str, sub_id: int, qos: int,
        callback: MessageCallback | None, maxsize: int, requested_qos: int,
    ) -> None:
        self.client = client
        self.filter = filter
        self.sub_id = sub_id
        self.qos = qos
        self.requested_qos = requested_qos
        self.callback = callback
        self.maxsize = maxsize
        self.dropped = 0
        self.active = True
        self._error: MaculaError | None = None
        self._queue: collections.deque[Message] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    def _offer(self, msg: Message) -> bool:
        """Hand a message over; False when it did not fit (QoS 1: not acknowledged)."""
        cb = self.callback
        if cb is not None:
            result = cb(msg)
            if inspect.isawaitable(result):
                self.client._spawn(result)
            return True
        q = self._queue
        if len(q) >= self.maxsize:
            if msg.qos:
                return False
            q.popleft()
            self.dropped += 1
        q.append(msg)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)
        return True

    def _end(self, error: MaculaError | None = None) -> None:
        """No more messages: unsubscribed or closed (``error`` None or a plain
        ConnectionClosed: iteration ends), or failed (iteration raises ``error``)."""
        self.active = False
        self._error = error
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.get()
        except ConnectionLost:
            raise
        except ConnectionClosed:
            raise StopAsyncIteration from None

    async def get(self, timeout: float | None = None) -> Message:
        """The next message; TimeoutError after ``timeout`` seconds. Once the subscription
        has ended and its queue is empty: ConnectionClosed (unsubscribed, client closed),
        ConnectionLost (the node was lost and the client does not reconnect) or the
        RemoteError that refused it again after a reconnect."""
        if self.callback is not None:
            raise MaculaError("this subscription delivers to its callback, not by iteration")
        while not self._queue:
            if not self.active:
                if self._error is not None:
                    raise self._error
                raise ConnectionClosed(f"subscription {self.filter!r} has ended")
            self._waiter = self.client._loop.create_future()
            await asyncio.wait_for(self._waiter, timeout)
        return self._queue.popleft()

    def get_nowait(self) -> Message | None:
        return self._queue.popleft() if self._queue else None

    async def unsubscribe(self) -> bool:
        return await self.client.unsubscribe(self)


@dataclass(eq=False)
class Registration:
    """A procedure this client provides (restored with a new ``reg_id`` after a reconnect)."""

    procedure: str
    reg_id: int
    handler: Handler
    strategy: str = "round_robin"
    idempotent: bool = False
    cache_ttl_ms: int = 0
    active: bool = True


class _Pending:
    """An outstanding request: its future, what runs on the reply, and how it survives a lost
    connection (``command``: sent again after the next HELLO when ``resend`` or never sent)."""

    __slots__ = ("command", "fut", "on_reply", "resend", "sent")

    def __init__(self, fut: asyncio.Future[Any], on_reply: Callable[[Any], Any] | None,
                 command: tuple[Any, ...], resend: bool, sent: bool) -> None:
        self.fut = fut
        self.on_reply = on_reply
        self.command = command
        self.resend = resend
        self.sent = sent


_OPENING, _OPEN, _LOST = 0, 1, 2


class Client:
    """An asyncio MCP/1 client. Make one with ``await Client.connect(...)``."""

    def __init__(self, endpoint: str, *, curve: CurveKeys | None = None,
                 context: zmq.Context[Any] | None = None, queue_size: int = 10_000,
                 dedup_size: int = 10_000, reconnect: bool = True,
                 reconnect_min: float = RECONNECT_MIN, reconnect_max: float = RECONNECT_MAX,
                 max_resend: int = MAX_RESEND) -> None:
        if not 0 < reconnect_min <= reconnect_max:
            raise ValueError("need 0 < reconnect_min <= reconnect_max (seconds)")
        if max_resend < 0:
            raise ValueError("max_resend must be >= 0")
        self.endpoint = endpoint
        self._loop = asyncio.get_running_loop()
        self._own_ctx = context is None
        self._ctx: zmq.Context[Any] = context if context is not None else zmq.Context()
        self._curve = curve
        self.reconnect = reconnect
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.max_resend = max_resend
        self.queue_size = queue_size
        self.session_id = 0
        self.node_incarnation = 0
        self.limits: dict[str, int] = {}
        self.on_error: Callable[[RemoteError], Any] = _log_error
        self.on_disconnect: DisconnectCallback | None = None
        self.on_reconnect: ReconnectCallback | None = None
        self.closed: ConnectionClosed | None = None
        # counters (docs/NODE.md "When a node or a link fails")
        self.duplicates = 0
        self.disconnects = 0
        self.reconnects = 0
        self.resent = 0
        self.resend_dropped = 0
        self.lost_while_disconnected = 0
        self._state = _OPENING
        self._held_pubs = 0  # QoS 1 PUBLISHes waiting for the next session
        self._hello: tuple[str, str, str, int] = ("", "", "", 0)
        self._reconnect_task: asyncio.Task[None] | None = None
        self._attempt: asyncio.Future[None] | None = None
        self._closing = False
        self._gen = 0
        self._out: list[tuple[Any, ...]] = []
        self._flush_scheduled = False
        self._retry: asyncio.TimerHandle | None = None
        self._next = 0
        # id -> _Pending; its on_reply runs as the reply is dispatched, before the next
        # command of the same body (an EVENT right after its SUBACK needs the Subscription to
        # exist already).
        self._pending: dict[int, _Pending] = {}
        self._subs: dict[int, Subscription] = {}
        self._by_filter: dict[str, Subscription] = {}
        self._regs: dict[int, Registration] = {}  # by the current session's reg_id
        self._registrations: list[Registration] = []  # what a reconnection restores
        self._seen: set[int] = set()
        self._seen_order: collections.deque[int] = collections.deque()
        self._dedup_size = dedup_size
        self._tasks: set[asyncio.Task[Any]] = set()
        self._hb_timer: asyncio.TimerHandle | None = None
        self._last_sent = self._last_recv = self._loop.time()
        self._bye: asyncio.Future[None] | None = None
        self._max_batch = 4096
        self._open_socket()

    # -- the socket -------------------------------------------------------------------------
    def _open_socket(self) -> None:
        """A new DEALER (a new connection, so a new session) and its monitor socket, which
        reports the connection closing (a node killed or stopped) at once."""
        sock: zmq.Socket[bytes] = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RECONNECT_IVL, max(1, int(self.reconnect_min * 1000)))
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, max(1, int(self.reconnect_max * 1000)))
        curve = self._curve
        if curve is not None:
            sock.curve_serverkey = curve.server_public
            sock.curve_publickey = curve.public
            sock.curve_secretkey = curve.secret
        mon = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sock.connect(self.endpoint)
        self._gen += 1
        self._sock = sock
        self._mon = mon
        self._fd = cast(int, sock.getsockopt(zmq.FD))
        self._loop.add_reader(self._fd, self._on_readable)
        self._loop.add_reader(cast(int, mon.getsockopt(zmq.FD)), self._on_monitor)
        # ZeroMQ signals its FD only when a pipe goes from empty to readable, and a pipe is
        # "empty" only once a read found it so: read once now, or the FD never fires.
        self._on_monitor()

    def _close_socket(self) -> None:
        sock, mon = self._sock, self._mon
        if sock.closed:
            return
        self._loop.remove_reader(self._fd)
        with contextlib.suppress(zmq.ZMQError):
            self._loop.remove_reader(cast(int, mon.getsockopt(zmq.FD)))
            sock.disable_monitor()
        mon.close(0)
        sock.close(0)
        self._gen += 1

    def _on_monitor(self) -> None:
        mon = self._mon
        while not mon.closed:
            try:
                event = zmq_monitor.recv_monitor_message(mon, zmq.NOBLOCK)
            except zmq.ZMQError:  # zmq.Again included: nothing more now
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._disconnected()
                return

    def _disconnected(self) -> None:
        if self._state == _OPEN:
            self._lose(ConnectionLost("the connection to the node closed (node stopped or "
                                      "restarted)", int(Err.PEER_GONE)))
        elif self._attempt is not None and not self._attempt.done():
            self._attempt.set_result(None)

    # -- opening and closing ---------------------------------------------------------------
    @classmethod
    async def connect(
        cls, endpoint: str, *, realm: str = "default", name: str = "", secret: str | None = None,
        curve: CurveKeys | None = None, heartbeat_ms: int = DEFAULT_HEARTBEAT_MS,
        timeout: float = 10.0, queue_size: int = 10_000, reconnect: bool = True,
        on_disconnect: DisconnectCallback | None = None,
        on_reconnect: ReconnectCallback | None = None,
        reconnect_max: float = RECONNECT_MAX, max_resend: int = MAX_RESEND,
    ) -> Client:
        """Connect and open a session (HELLO → WELCOME); RemoteError if the node refuses,
        TimeoutError if no node answers within ``timeout`` (the first connection is not
        retried).

        Afterwards, with ``reconnect`` (the default), a lost node (connection closed, BYE,
        NOT_WELCOMED, silence for ``liveness × heartbeat_ms / 2``) is reconnected with
        back-off from 0.1 s doubling to ``reconnect_max`` seconds (with jitter); the client
        says HELLO again, restores its subscriptions and registrations and re-sends held
        requests (QoS 1 PUBLISHes with their ``mid``, at most ``max_resend`` of them).
        ``on_disconnect(ConnectionLost)`` and ``on_reconnect(Reconnected)`` report it.
        ``reconnect=False``: the first loss closes the client; pending operations and
        iterators raise :class:`ConnectionLost`."""
        if not isinstance(realm, str) or not isinstance(name, str):
            raise TypeError("realm and name must be str")
        if not 1 <= len(realm.encode()) <= 255:
            raise ValueError("realm must be 1 to 255 UTF-8 bytes")
        if heartbeat_ms < 0:
            raise ValueError("heartbeat_ms must be >= 0 (0: the node's default)")
        self = cls(endpoint, curve=curve, queue_size=queue_size, reconnect=reconnect,
                   reconnect_max=max(reconnect_max, RECONNECT_MIN), max_resend=max_resend)
        self.on_disconnect = on_disconnect
        self.on_reconnect = on_reconnect
        self._hello = (realm, name, secret or "", heartbeat_ms)
        try:
            welcome = await self._say_hello(timeout)
        except TimeoutError:
            self._shutdown(ConnectionClosed("connect failed"))
            raise TimeoutError(f"no node answered HELLO at {endpoint} within {timeout} s") from None
        except BaseException:
            self._shutdown(ConnectionClosed("connect failed"))
            raise
        self._opened(welcome)
        return self

    async def _say_hello(self, timeout: float | None) -> p.Welcome:
        """HELLO on the current socket (sent even while not open); the WELCOME."""
        rid = self._new_id()
        command = (int(Code.HELLO), rid, *self._hello)
        fut = self._add_pending(rid, None, command, resend=False, sent=True)
        self._out.append(command)
        self._flush()
        try:
            return cast(p.Welcome, await asyncio.wait_for(fut, timeout))
        finally:
            self._pending.pop(rid, None)

    def _opened(self, welcome: p.Welcome) -> None:
        self.session_id = welcome.session_id
        self.node_incarnation = welcome.incarnation
        self.limits = dict(welcome.limits)
        self._max_batch = max(1, self.limits.get("max_batch", 4096))
        self._state = _OPEN
        self._last_sent = self._last_recv = self._loop.time()
        self._schedule_heartbeat()

    @property
    def connected(self) -> bool:
        """Whether a session is open now (False while reconnecting and once closed)."""
        return self._state == _OPEN and self.closed is None

    async def close(self, timeout: float = 2.0) -> None:
        """Say BYE, wait (up to ``timeout``) for the node's BYE, close the socket."""
        if self.closed is not None:
            return
        self._closing = True
        if self._state == _OPEN:
            self._bye = self._loop.create_future()
            self._queue((int(Code.BYE), int(Err.NORMAL), "bye"))
            with contextlib.suppress(asyncio.TimeoutError, ConnectionClosed):
                await asyncio.wait_for(asyncio.shield(self._bye), timeout)
        self._shutdown(ConnectionClosed("client closed", int(Err.NORMAL)))

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _shutdown(self, reason: ConnectionClosed) -> None:
        if self.closed is not None:
            return
        self.closed = reason
        if self._state == _OPEN:
            with contextlib.suppress(Exception):
                self._flush()
        self._close_socket()
        for h in (self._hb_timer, self._retry):
            if h is not None:
                h.cancel()
        task = self._reconnect_task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        for entry in self._pending.values():
            if not entry.fut.done():
                entry.fut.set_exception(type(reason)(str(reason), reason.code))
        self._pending.clear()
        if self._bye is not None and not self._bye.done():
            self._bye.set_result(None)
        for sub in self._subs.values():
            sub._end(reason)
        for sub in self._by_filter.values():
            if sub.active:
                sub._end(reason)
        if self._own_ctx:
            self._ctx.term()

    # -- losing the node and reconnecting ---------------------------------------------------
    def _lose(self, reason: ConnectionLost) -> None:
        """The session is gone. Reconnect (unless told not to or closing); meanwhile calls
        that may have reached the node fail, requests that are safe to repeat are held."""
        if self.closed is not None or self._state != _OPEN:
            return
        self.disconnects += 1
        log.warning("lost the node at %s: %s", self.endpoint, reason)
        if self._closing or not self.reconnect:
            self._notify(self.on_disconnect, reason)
            self._shutdown(reason)
            return
        self._state = _LOST
        self._lost_at = self._loop.time()
        if self._hb_timer is not None:
            self._hb_timer.cancel()
        self._close_socket()
        self.lost_while_disconnected += sum(1 for c in self._out if c[0] == 14 and not c[3])
        self._out.clear()
        held = 0
        for entry in list(self._pending.values()):
            if entry.fut.done():
                continue
            if entry.resend or not entry.sent:
                entry.sent = False
                if entry.command[0] == 14:
                    held += 1
                    if held > self.max_resend:
                        self.resend_dropped += 1
                        entry.sent = True  # not held: not counted in _held_pubs
                        entry.fut.set_exception(ConnectionLost(
                            f"{reason} (QoS 1 PUBLISH not kept: over max_resend "
                            f"{self.max_resend})", reason.code))
            else:
                entry.fut.set_exception(ConnectionLost(str(reason), reason.code))
        self._held_pubs = min(held, self.max_resend)
        self._notify(self.on_disconnect, reason)
        self._reconnect_task = asyncio.ensure_future(
            self._reconnect_loop(self.session_id, self.node_incarnation))

    async def _reconnect_loop(self, previous: int, incarnation: int) -> None:
        try:
            await self._reconnect(previous, incarnation)
        except Exception as exc:  # a bug or a dead context: say so and stop, never hang
            log.exception("reconnecting to %s failed", self.endpoint)
            self._shutdown(ConnectionLost(f"reconnecting failed: {exc!r}", int(Err.INTERNAL)))

    async def _reconnect(self, previous: int, incarnation: int) -> None:
        delay = self.reconnect_min
        said = ""
        while self.closed is None:
            self._open_socket()
            attempt: asyncio.Future[Any] = self._loop.create_future()
            self._attempt = attempt  # set when this connection closes again
            hello: asyncio.Future[Any] = asyncio.ensure_future(self._say_hello(None))
            hello.add_done_callback(_retrieved)  # failures are handled below or moot
            done, _ = await asyncio.wait({hello, attempt}, timeout=max(3.0, self._silence_limit()),
                                         return_when=asyncio.FIRST_COMPLETED)
            if hello in done and hello.exception() is None:
                break
            failure = hello.exception() if hello in done else None
            hello.cancel()
            self._close_socket()
            if failure is not None and str(failure) != said:  # once per kind of refusal
                said = str(failure)
                log.warning("reconnecting to %s: %s", self.endpoint, failure)
            if not done:
                continue  # no WELCOME in time (node down or mute): a fresh connection at once
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, self.reconnect_max)
        else:
            return
        self._opened(hello.result())
        self._restore(previous, incarnation)

    def _restore(self, previous: int, incarnation: int) -> None:
        """After the new WELCOME: subscribe and register again, then send what was held."""
        self._seen.clear()  # delivery ids are per session
        self._seen_order.clear()
        restoring: list[tuple[int, asyncio.Future[Any], Subscription | Registration]] = []
        self._subs.clear()
        for sub in list(self._by_filter.values()):
            rid = self._new_id()
            fut = self._add_pending(rid, functools.partial(self._resubscribed, sub),
                                    (int(Code.SUBSCRIBE), rid, sub.filter, sub.requested_qos),
                                    resend=False)
            restoring.append((rid, fut, sub))
        self._registrations = regs = [r for r in self._registrations if r.active]
        self._regs.clear()
        for reg in regs:
            rid = self._new_id()
            fut = self._add_pending(rid, functools.partial(self._reregistered, reg),
                                    (int(Code.REGISTER), rid, reg.procedure, reg.strategy,
                                     reg.idempotent, reg.cache_ttl_ms), resend=False)
            restoring.append((rid, fut, reg))
        resent = 0
        self._held_pubs = 0
        for entry in list(self._pending.values()):
            if not entry.sent and not entry.fut.done():
                entry.sent = True
                resent += 1
                self._queue(entry.command)
        self.resent += resent
        restarted = (None if not (incarnation and self.node_incarnation)
                     else incarnation != self.node_incarnation)
        info = functools.partial(Reconnected, self.session_id, previous, restarted,
                                 self._loop.time() - self._lost_at, len(self._by_filter),
                                 len(regs), resent)
        self._spawn(self._restored(restoring, info))

    async def _restored(
            self, restoring: list[tuple[int, asyncio.Future[Any], Subscription | Registration]],
            info: Callable[[], Reconnected]) -> None:
        """Wait for the SUBACKs and REGISTEREDs, then report the reconnection. One the new
        session refuses ends that subscription (its iterator raises the RemoteError) or
        drops that registration, and goes to ``on_error``."""
        results = await asyncio.gather(*(fut for _, fut, _ in restoring),
                                       return_exceptions=True)
        for rid, _, _ in restoring:
            self._pending.pop(rid, None)
        if any(isinstance(r, ConnectionClosed) for r in results) or not self.connected:
            return  # lost again meanwhile: the next reconnection restores
        for (_, _, what), result in zip(restoring, results, strict=True):
            if isinstance(result, RemoteError):
                if isinstance(what, Subscription):
                    self._by_filter.pop(what.filter, None)
                    what._end(result)
                else:
                    what.active = False
                self.on_error(result)
        self.reconnects += 1
        self._notify(self.on_reconnect, info())

    def _resubscribed(self, sub: Subscription, reply: p.Suback) -> None:
        sub.sub_id = reply.sub_id
        sub.qos = reply.qos
        self._subs[reply.sub_id] = sub

    def _reregistered(self, reg: Registration, reply: p.Registered) -> None:
        reg.reg_id = reply.reg_id
        self._regs[reply.reg_id] = reg

    def _notify(self, callback: Callable[[Any], Any] | None, arg: Any) -> None:
        if callback is None:
            return
        try:
            result = callback(arg)
        except Exception:
            log.exception("an on_disconnect/on_reconnect callback failed")
            return
        if inspect.isawaitable(result):
            self._spawn(result)

    def _silence_limit(self) -> float:
        """Seconds without anything from the node after which it is considered gone."""
        hb = self.limits.get("heartbeat_ms", 5000) / 1000
        return self.limits.get("liveness", 3) * hb / 2

    # -- pub/sub ----------------------------------------------------------------------------
    async def subscribe(
        self, filter: str, qos: int = 0, callback: MessageCallback | None = None,
        timeout: float = 10.0,
    ) -> Subscription:
        """SUBSCRIBE; retained messages follow. With ``callback`` each message is passed to
        it (an ``async`` callback runs as a task); otherwise iterate the subscription."""
        validate_filter(filter)
        _check_qos(qos)
        if callback is not None and not callable(callback):
            raise TypeError("callback must be callable")
        def on_suback(suback: p.Suback) -> Subscription:
            sub = self._by_filter.get(filter)
            if sub is None:
                sub = Subscription(self, filter, suback.sub_id, suback.qos, callback,
                                   self.queue_size, qos)
                self._by_filter[filter] = sub
            else:  # the same filter again: the node kept its sub_id and replaced its QoS
                sub.qos = suback.qos
                sub.requested_qos = qos
                if callback is not None:
                    sub.callback = callback
            sub.sub_id = suback.sub_id
            self._subs[sub.sub_id] = sub
            return sub

        return cast(Subscription, await self._request(
            Code.SUBSCRIBE, filter, qos, timeout=timeout, on_reply=on_suback))

    async def unsubscribe(self, sub: Subscription | str, timeout: float = 10.0) -> bool:
        """UNSUBSCRIBE (a Subscription or its filter string); whether it existed."""
        filt = sub.filter if isinstance(sub, Subscription) else sub
        if not isinstance(filt, str):
            raise TypeError("unsubscribe takes a Subscription or a filter string")
        reply = await self._request(Code.UNSUBSCRIBE, filt, timeout=timeout)
        assert isinstance(reply, p.Unsuback)
        s = self._by_filter.pop(filt, None)
        if s is not None:
            self._subs.pop(s.sub_id, None)
            s._end()
        return reply.existed

    def publish_nowait(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Queue a QoS 0 PUBLISH (no round trip); it leaves with this iteration's batch.
        While reconnecting it is dropped and counted (``lost_while_disconnected``)."""
        self._check_open()
        validate_topic(topic)
        self._queue((14, topic, _payload(payload), 0, 0, bool(retain)))

    async def publish(
        self, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
        timeout: float = 10.0,
    ) -> PubackReason | None:
        """PUBLISH. QoS 0: queued, returns None. QoS 1: waits for PUBACK, returns its reason
        (raises RemoteError if the node refused the PUBLISH). A QoS 1 PUBLISH without its
        PUBACK when the node is lost is sent again, same ``mid``, after the reconnection
        (``timeout`` covers the whole wait)."""
        _check_qos(qos)
        if qos == 0:
            self.publish_nowait(topic, payload, retain)
            return None
        self._check_open()
        validate_topic(topic)
        data = _payload(payload)
        puback = await self._request_mid(topic, data, retain, timeout)
        return PubackReason(puback.reason)

    async def publish_many(
        self, items: Iterable[tuple[str, bytes]], qos: int = 0, retain: bool = False,
        timeout: float = 10.0,
    ) -> list[PubackReason] | None:
        """Queue many PUBLISHes at once (they share bodies). QoS 1: waits for every PUBACK."""
        _check_qos(qos)
        self._check_open()
        checked = []
        for topic, payload in items:
            validate_topic(topic)
            checked.append((topic, _payload(payload)))
        if qos == 0:
            r = bool(retain)
            if self._state != _OPEN:
                self.lost_while_disconnected += len(checked)
                return None
            self._out.extend((14, t, d, 0, 0, r) for t, d in checked)
            self._schedule_flush()
            return None
        acks = await asyncio.gather(
            *(self._request_mid(t, d, retain, timeout) for t, d in checked))
        return [PubackReason(a.reason) for a in acks]

    # -- RPC --------------------------------------------------------------------------------
    async def call(self, procedure: str, args: Any = None, timeout: float | None = None) -> Any:
        """CALL ``procedure`` with ``args`` (any msgpack value); its result, or RemoteError
        (NO_PROVIDER, CALL_TIMEOUT, PROVIDER_GONE, APPLICATION_ERROR...). A CALL sent
        before the node was lost fails with ConnectionLost (it may have run: it is not
        repeated); one made while reconnecting waits for the new session."""
        _check_procedure(procedure)
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be > 0 seconds (None: the node's call_timeout)")
        raw = msgspec.Raw(_encode_value(args))
        timeout_ms = 0 if timeout is None else max(1, int(timeout * 1000))
        wait = (timeout if timeout is not None
                else self.limits.get("call_timeout_ms", 10_000) / 1000) + 5.0
        reply = await self._request(Code.CALL, procedure, raw, timeout_ms, timeout=wait,
                                    resend=False)
        assert isinstance(reply, p.Result)
        return _dec_any.decode(reply.result)

    async def register(
        self, procedure: str, handler: Handler, strategy: str = "round_robin",
        timeout: float = 10.0, *, idempotent: bool = False, cache_ttl: float = 0.0,
    ) -> Registration:
        """REGISTER ``procedure``; ``handler(args)`` (plain or async) answers each call.

        ``strategy`` picks among providers (across the mesh too); ``idempotent`` lets a
        caller's node retry a call on another provider after it was delivered (link lost,
        timeout); ``cache_ttl`` (seconds) lets callers' nodes cache results per arguments."""
        _check_procedure(procedure)
        if not callable(handler):
            raise TypeError("handler must be callable")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
        if not isinstance(idempotent, bool):
            raise TypeError("idempotent must be a bool")
        if not 0 <= cache_ttl <= 86_400:
            raise ValueError("cache_ttl must be between 0 and 86400 seconds")
        ttl_ms = int(cache_ttl * 1000)
        def on_registered(reply: p.Registered) -> Registration:
            reg = self._regs.get(reply.reg_id)
            if reg is None or reg.procedure != procedure or not reg.active:
                reg = Registration(procedure, reply.reg_id, handler, strategy, idempotent,
                                   ttl_ms)
                self._regs[reg.reg_id] = reg
                self._registrations.append(reg)
            else:  # the same procedure again: the node kept its reg_id; the new handler wins
                reg.handler = handler
            return reg

        return cast(Registration, await self._request(
            Code.REGISTER, procedure, strategy, idempotent, ttl_ms,
            timeout=timeout, on_reply=on_registered))

    async def unregister(self, reg: Registration, timeout: float = 10.0) -> bool:
        """UNREGISTER; whether the node had it. Not restored after a reconnect."""
        self._check_open()
        reg.active = False
        if reg in self._registrations:
            self._registrations.remove(reg)
        if self._state != _OPEN:  # the next session never gets it
            return self._regs.pop(reg.reg_id, None) is reg
        try:
            reply = await self._request(Code.UNREGISTER, reg.reg_id, timeout=timeout,
                                        resend=False)
        except ConnectionLost:
            if self.closed is not None:
                raise
            return True  # lost on the way: the new session does not have it
        assert isinstance(reply, p.Unregistered)
        if self._regs.get(reg.reg_id) is reg:
            del self._regs[reg.reg_id]
        return reply.existed

    async def stats(self, timeout: float = 10.0) -> dict[str, Any]:
        """The node's STATS figures."""
        reply = await self._request(Code.STATS, timeout=timeout)
        assert isinstance(reply, p.StatsReply)
        return reply.stats

    async def ping(self, timeout: float = 10.0) -> float:
        """Round trip of a PING, in seconds."""
        t0 = self._loop.time()
        await self._request(Code.PING, timeout=timeout)
        return self._loop.time() - t0

    # -- requests ---------------------------------------------------------------------------
    def _new_id(self) -> int:
        self._next = self._next + 1 if self._next < _MAX_ID else 1
        return self._next

    async def _request(self, code: Code, *fields: Any, timeout: float,
                       on_reply: Callable[[Any], Any] | None = None,
                       resend: bool = True) -> Any:
        self._check_open()
        rid = self._new_id()
        return await self._await_reply(rid, (int(code), rid, *fields), timeout,
                                       f"no answer to {code.name} within {timeout} s",
                                       on_reply, resend)

    async def _request_mid(self, topic: str, data: bytes, retain: bool,
                           timeout: float) -> p.Puback:
        mid = self._new_id()
        if self._state != _OPEN:
            if self._held_pubs >= self.max_resend:
                self.resend_dropped += 1
                raise ConnectionLost(f"reconnecting to the node, and {self.max_resend} QoS 1 "
                                     "PUBLISHes (max_resend) are already held",
                                     int(Err.PEER_GONE))
            self._held_pubs += 1
        return cast(p.Puback, await self._await_reply(
            mid, (14, topic, data, 1, mid, bool(retain)), timeout,
            f"no PUBACK within {timeout} s", None, True))

    def _add_pending(self, rid: int, on_reply: Callable[[Any], Any] | None,
                     command: tuple[Any, ...], resend: bool, sent: bool = False
                     ) -> asyncio.Future[Any]:
        """Record a request; it is sent now when the session is open (else it is held)."""
        fut: asyncio.Future[Any] = self._loop.create_future()
        entry = _Pending(fut, on_reply, command, resend, sent)
        self._pending[rid] = entry
        if not sent and self._state == _OPEN:
            entry.sent = True
            self._queue(command)
        return fut

    async def _await_reply(self, rid: int, command: tuple[Any, ...], timeout: float,
                           late: str, on_reply: Callable[[Any], Any] | None,
                           resend: bool) -> Any:
        """Send ``command`` (or hold it until reconnected) and wait for the reply naming
        ``rid`` (TimeoutError: ``late``)."""
        fut = self._add_pending(rid, on_reply, command, resend)
        timer = self._loop.call_later(timeout, _expire, fut, late)
        try:
            return await fut
        finally:
            timer.cancel()
            entry = self._pending.pop(rid, None)
            if entry is not None and not entry.sent and entry.command[0] == 14:
                self._held_pubs -= 1  # gave up (timeout) while held

    def _check_open(self) -> None:
        if self.closed is not None:
            raise type(self.closed)(f"the session is closed ({self.closed})", self.closed.code)

    # -- output -----------------------------------------------------------------------------
    def _queue(self, command: tuple[Any, ...]) -> None:
        if self._state != _OPEN:  # lost: ACKs, YIELDs, PINGs belong to the old session
            if command[0] == 14:
                self.lost_while_disconnected += 1
            return
        self._out.append(command)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self._out:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._retry = None
        out = self._out
        if not out or self._sock.closed:
            return
        send = self._sock.send
        step = self._max_batch
        i = 0
        try:
            while i < len(out):
                body = _enc.encode(out[i:i + step])
                send(p.SIGNATURE, zmq.SNDMORE | zmq.NOBLOCK)
                send(body)
                i += step
        except zmq.Again:  # our send HWM: try again shortly
            self._retry = self._loop.call_later(0.001, self._flush)
        del out[:i]
        self._last_sent = self._loop.time()
        self._recheck()

    # -- input ------------------------------------------------------------------------------
    def _recheck(self) -> None:
        sock = self._sock
        if (self.closed is None and not sock.closed
                and cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN):
            self._loop.call_soon(self._on_readable)

    def _on_readable(self) -> None:
        if self.closed is not None or self._sock.closed:
            return
        gen = self._gen
        sock = self._sock
        recv = sock.recv
        for _ in range(1000):
            try:
                sig = recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            frames = [sig]
            while sock.getsockopt(zmq.RCVMORE):
                frames.append(recv())
            self._last_recv = self._loop.time()
            if len(frames) != 2 or frames[0] != p.SIGNATURE:
                log.warning("ignoring a malformed message from the node (%d frames)", len(frames))
                continue
            try:
                commands = p.decode_node_body(frames[1])
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.warning("ignoring an undecodable body from the node: %s", exc)
                continue
            for cmd in commands:
                self._dispatch(cmd)
                if self._gen != gen or self.closed is not None:
                    return  # the session ended or was lost: the rest is the old session's
        else:
            self._loop.call_soon(self._on_readable)
        if self._out:  # ACKs and YIELDs leave now, not one iteration later
            self._flush()
        else:
            self._recheck()

    def _dispatch(self, cmd: Any) -> None:
        t = type(cmd)
        if t is p.Event:
            self._on_event(cmd)
        elif t is p.Invoke:
            self._on_invoke(cmd)
        elif t is p.Error:
            self._on_error(cmd)
        elif t is p.Puback:
            self._resolve(cmd.mid, cmd)
        elif t is p.Bye:
            text = f"the node said BYE: {_err_name(cmd.code)} {cmd.message}".strip()
            if self._bye is not None:
                self._shutdown(ConnectionClosed(text, cmd.code))
            else:
                self._lose(ConnectionLost(text, cmd.code))
        elif t is p.Pong:
            if cmd.token:
                self._resolve(cmd.token, cmd)
        else:  # WELCOME, SUBACK, UNSUBACK, REGISTERED, UNREGISTERED, RESULT, STATS_REPLY
            self._resolve(cmd.rid, cmd)

    def _resolve(self, rid: int, value: Any) -> None:
        entry = self._pending.get(rid)
        if entry is not None and not entry.fut.done():
            on_reply = entry.on_reply
            entry.fut.set_result(on_reply(value) if on_reply is not None else value)

    def _on_error(self, err: p.Error) -> None:
        if err.code == Err.NOT_WELCOMED and self._state == _OPEN:
            # the node does not know this session: it restarted and ZeroMQ reconnected
            self._lose(ConnectionLost(f"the node no longer knows this session "
                                      f"(NOT_WELCOMED: {err.message})", int(Err.NOT_WELCOMED)))
            return
        exc = RemoteError(err.code, err.message)
        entry = self._pending.get(err.ref) if err.ref else None
        if entry is not None and not entry.fut.done():
            entry.fut.set_exception(exc)
        else:
            self.on_error(exc)

    def _on_event(self, ev: p.Event) -> None:
        sub = self._subs.get(ev.sub_id)
        did = ev.did
        if ev.qos and did and did in self._seen:
            self.duplicates += 1
            return
        if sub is None:  # after UNSUBSCRIBE: "EVENTs already queued may still arrive"
            if ev.qos and did:
                self._out.append((17, did))
            return
        msg = Message(ev.topic, ev.payload, ev.qos, ev.retain, ev.sub_id)
        if not sub._offer(msg):
            return  # QoS 1 that did not fit: not acknowledged, the node sends it again
        if ev.qos and did:
            self._out.append((17, did))
            self._seen.add(did)
            self._seen_order.append(did)
            if len(self._seen_order) > self._dedup_size:
                self._seen.discard(self._seen_order.popleft())

    def _on_invoke(self, inv: p.Invoke) -> None:
        reg = self._regs.get(inv.reg_id)
        if reg is None:
            self._queue((28, inv.inv_id, f"procedure {inv.procedure!r} is not registered here"))
            return
        try:
            args = _dec_any.decode(inv.args)
            result = reg.handler(args)
        except Exception as exc:
            self._queue((28, inv.inv_id, str(exc) or type(exc).__name__))
            return
        if inspect.isawaitable(result):
            self._spawn(self._finish_invoke(inv.inv_id, result))
        else:
            self._yield(inv.inv_id, result)

    async def _finish_invoke(self, inv_id: int, result: Awaitable[Any]) -> None:
        try:
            value = await result
        except Exception as exc:
            self._queue((28, inv_id, str(exc) or type(exc).__name__))
            return
        self._yield(inv_id, value)

    def _yield(self, inv_id: int, value: Any) -> None:
        try:
            raw = msgspec.Raw(_encode_value(value))
        except TypeError as exc:
            self._queue((28, inv_id, f"result is not msgpack-encodable: {exc}"))
            return
        if self.closed is None:
            self._queue((27, inv_id, raw))

    def _spawn(self, aw: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(aw)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a subscription callback failed", exc_info=task.exception())

    # -- heartbeats -------------------------------------------------------------------------
    def _schedule_heartbeat(self) -> None:
        hb = self.limits.get("heartbeat_ms", 5000) / 1000
        self._hb_timer = self._loop.call_later(hb / 4, self._on_heartbeat)

    def _on_heartbeat(self) -> None:
        """Every heartbeat/4: PING after heartbeat/2 without sending or without receiving;
        the node is gone after ``liveness × heartbeat / 2`` without receiving anything."""
        if self.closed is not None or self._state != _OPEN:
            return
        now = self._loop.time()
        hb = self.limits.get("heartbeat_ms", 5000) / 1000
        silent = now - self._last_recv
        if silent > self._silence_limit():
            self._lose(ConnectionLost(f"the node is gone (nothing received for {silent:.1f} s)",
                                      int(Err.HEARTBEAT_TIMEOUT)))
            return
        if now - self._last_sent >= hb / 2 or silent >= hb / 2:
            self._queue((int(Code.PING), 0))
        self._hb_timer = self._loop.call_later(hb / 4, self._on_heartbeat)


# -- helpers ----------------------------------------------------------------------------------
def _retrieved(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _expire(fut: asyncio.Future[Any], message: str) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError(message))


def _log_error(exc: RemoteError) -> None:
    log.warning("the node reported an error: %s", exc)


def _err_name(code: int) -> str:
    try:
        return Err(code).name
    except ValueError:
        return str(code)


def _check_qos(qos: int) -> None:
    if type(qos) is not int:
        raise TypeError(f"qos must be int, not {type(qos).__name__}")
    if qos not in (0, 1):
        raise ValueError(f"qos must be 0 or 1, not {qos}")


def _check_procedure(procedure: str) -> None:
    if not isinstance(procedure, str):
        raise TypeError(f"procedure must be str, not {type(procedure).__name__}")
    if not 1 <= len(procedure) <= 1024 or "\x00" in procedure:
        raise ValueError("procedure must be 1 to 1024 characters without U+0000")


def _payload(payload: Any) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, (bytearray, memoryview)):
        return bytes(payload)
    raise TypeError(f"payload must be bytes, not {type(payload).__name__} "
                    "(encode text first, e.g. text.encode())")


def _encode_value(value: Any) -> bytes:
    try:
        return _enc.encode(value)
    except TypeError as exc:
        raise TypeError(f"value is not msgpack-encodable: {exc}") from None


# -- blocking wrapper ------------------------------------------------------------------------
class BlockingSubscription:
    """A subscription of a :class:`BlockingClient`: ``for msg in sub`` or ``sub.get()``."""

    def __init__(self, owner: BlockingClient, sub: Subscription) -> None:
        self._owner = owner
        self.sub = sub

    @property
    def filter(self) -> str:
        return self.sub.filter

    @property
    def qos(self) -> int:
        return self.sub.qos

    def get(self, timeout: float | None = None) -> Message:
        """The next message; TimeoutError after ``timeout``; at the end as
        :meth:`Subscription.get` (ConnectionClosed, ConnectionLost, RemoteError)."""
        return self._owner._run(self.sub.get(timeout))

    def __iter__(self) -> Iterator[Message]:
        """Messages until unsubscribed or closed; raises ConnectionLost if the node is lost
        and the client does not reconnect."""
        while True:
            try:
                yield self.get()
            except ConnectionLost:
                raise
            except ConnectionClosed:
                return

    def unsubscribe(self) -> bool:
        return self._owner._run(self.sub.unsubscribe())


class BlockingClient:
    """A :class:`Client` on its own event loop in a daemon thread, with blocking methods.

    ``BlockingClient(endpoint, realm=..., name=...)`` connects at once; use it as a context
    manager or call ``close()``. Handlers and callbacks (``on_disconnect``,
    ``on_reconnect`` too) run on the client's thread. Reconnection as :meth:`Client.connect`.
    """

    def __init__(self, endpoint: str, *, realm: str = "default", name: str = "",
                 secret: str | None = None, curve: CurveKeys | None = None,
                 heartbeat_ms: int = DEFAULT_HEARTBEAT_MS, timeout: float = 10.0,
                 reconnect: bool = True, on_disconnect: DisconnectCallback | None = None,
                 on_reconnect: ReconnectCallback | None = None,
                 reconnect_max: float = RECONNECT_MAX, max_resend: int = MAX_RESEND) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="macula-client", daemon=True)
        self._thread.start()
        try:
            self.client: Client = self._run(Client.connect(
                endpoint, realm=realm, name=name, secret=secret, curve=curve,
                heartbeat_ms=heartbeat_ms, timeout=timeout, reconnect=reconnect,
                on_disconnect=on_disconnect, on_reconnect=on_reconnect,
                reconnect_max=reconnect_max, max_resend=max_resend))
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Awaitable[T]) -> T:
        problem = None
        if threading.current_thread() is self._thread:
            problem = MaculaError("a BlockingClient method was called from its own thread")
        elif self._loop.is_closed():
            problem = ConnectionClosed("the client is closed")
        if problem is not None:
            if inspect.iscoroutine(coro):
                coro.close()
            raise problem
        fut: ThreadFuture[T] = asyncio.run_coroutine_threadsafe(_as_coro(coro), self._loop)
        return fut.result()

    def subscribe(self, filter: str, qos: int = 0,
                  callback: MessageCallback | None = None) -> BlockingSubscription:
        return BlockingSubscription(self, self._run(self.client.subscribe(filter, qos, callback)))

    def unsubscribe(self, sub: BlockingSubscription | str) -> bool:
        target = sub.sub if isinstance(sub, BlockingSubscription) else sub
        return self._run(self.client.unsubscribe(target))

    def publish(self, topic: str, payload: bytes, qos: int = 0,
                retain: bool = False) -> PubackReason | None:
        return self._run(self.client.publish(topic, payload, qos, retain))

    def publish_many(self, items: Iterable[tuple[str, bytes]], qos: int = 0,
                     retain: bool = False) -> list[PubackReason] | None:
        return self._run(self.client.publish_many(list(items), qos, retain))

    def call(self, procedure: str, args: Any = None, timeout: float | None = None) -> Any:
        return self._run(self.client.call(procedure, args, timeout))

    def register(self, procedure: str, handler: Handler, strategy: str = "round_robin", *,
                 idempotent: bool = False, cache_ttl: float = 0.0) -> Registration:
        return self._run(self.client.register(procedure, handler, strategy,
                                              idempotent=idempotent, cache_ttl=cache_ttl))

    def unregister(self, reg: Registration) -> bool:
        return self._run(self.client.unregister(reg))

    def stats(self) -> dict[str, Any]:
        return self._run(self.client.stats())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(MaculaError):
            self._run(self.client.close())
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _as_coro(aw: Awaitable[T]) -> T:
    return await aw
