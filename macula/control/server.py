"""The asyncio ZeroMQ driver of the control plane: a ROUTER socket feeding the broker.

Thin glue around :class:`~macula.control.broker.Broker` (which holds all the logic):

- **Socket**: one ROUTER with ``ROUTER_MANDATORY`` (a send to a gone peer raises
  EHOSTUNREACH instead of vanishing), bounded ``SNDHWM``/``RCVHWM``, ``MAXMSGSIZE`` (a peer
  sending more than twice ``max_message`` is disconnected by libzmq; between the two the
  broker answers MESSAGE_TOO_LARGE), bound to every configured ``tcp://`` / ``ipc://``
  endpoint. Optional CURVE: the node's key pair and an allow-list directory of client public
  keys, enforced by ``zmq.auth``'s authenticator.
- **Reading**: the socket is a plain pyzmq socket whose ``FD`` is registered with the event
  loop (``loop.add_reader``), not a ``zmq.asyncio`` socket: one wake-up drains up to
  ``burst`` messages (or ``burst_commands`` commands, so that the bounded outgoing queues are
  flushed before they fill, or ``read_slice`` seconds of work, so that timers, the mesh and
  the rest of the loop run between batches) with non-blocking ``recv`` calls and no Future
  per message. The ZeroMQ FD is edge-triggered, so after every burst and every flush the
  driver re-checks ``EVENTS & POLLIN`` and reschedules itself when more is waiting.
- **Ingress share** (overload isolation): the input work (decode + run) of each session is
  timed per window (``tick_interval``). While more than one session sent in the window, a
  session that used more than ``ingress_share`` of it is over its share: its messages are
  *parked* (at most ``park_max`` per session, run first, in order, once it has credit again)
  and beyond that *refused* (``Broker.refuse``: QoS 0 dropped and counted, QoS 1 and
  requests answered ERROR OVERLOADED). Its PINGs, ACKs and YIELDs run at once either way
  (``Broker.split_control``). A ROUTER cannot stop reading one peer; what it can bound is
  the work and memory one peer costs, and ``rcvhwm`` bounds what ZeroMQ holds for it.
- **Writing**: after each burst (and each timer tick) every session with queued output gets
  its bodies (at most ``max_batch`` commands each) sent with ``NOBLOCK``; a body refused at
  the high-water mark is handed back to the broker (``stalled``), which keeps it, applies
  the slow-consumer policy and disconnects the session past ``stuck_timeout`` (the session
  stays blocked until its queues drained, so ``sndhwm`` bodies are all that can sit in
  ZeroMQ unseen). So outgoing traffic is batched per peer per loop iteration, without a
  timer or sleep (no added latency at low load).
- **Time**: ``loop.time()`` is the ``now`` given to the broker; a timer calls
  ``broker.tick(now)`` every ``tick_interval`` seconds.
- **Shards** (optional, ``macula.shards.ShardPool``): before each flush to clients the
  driver flushes what the broker gave the shards during this iteration (one message per
  shard), and each timer tick lets the pool restart a shard process that died. The pool
  calls back ``flush_output`` after it handed the shards' EVENTs to the broker.
- **Backpressure** (``gate``): while what clients send cannot go on (the node's links to
  other nodes are congested, a delivery shard is behind: ``Node._may_read``), the driver
  stops reading clients; ZeroMQ's high-water marks then hold the publishers back.
  ``resume()`` reads again (the mesh calls it; the driver also re-checks the gate after
  every shard reply and every tick).
- **Disconnects**: ZeroMQ does not tell a ROUTER when a peer goes. The driver records the
  socket file descriptor a new peer's first message came from (``zmq.SRCFD``), watches the
  socket monitor for ``EVENT_DISCONNECTED`` on that descriptor, then probes the identity
  with an empty body; EHOSTUNREACH means gone (its calls fail at once, its subscriptions
  go). A probe that still gets through is repeated on the next ticks; heartbeats catch the
  rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import zmq
import zmq.backend
from zmq.utils.monitor import parse_monitor_message

from macula.control.broker import Broker, Session
from macula.control.protocol import SIGNATURE

_EMPTY_BODY = b"\x90"
# pyzmq's sugar Socket.send/recv re-check keyword options on every call; the backend
# methods they wrap do the same work in about half the time (~140 ns a frame).
_raw_send: Any = getattr(zmq.backend.Socket, "send", None)
_raw_recv: Any = getattr(zmq.backend.Socket, "recv", None)


class ShardBus(Protocol):
    """What the driver needs of a shard pool (``macula.shards.ShardPool``)."""

    on_output: Any

    def flush(self) -> None: ...

    def check(self, now: float) -> None: ...


@dataclass(frozen=True)
class CurveSettings:
    """CURVE for the control socket: the node's secret key file and the allow-list."""

    secret_key_file: str
    allow_dir: str


class ControlServer:
    """Runs a :class:`Broker` behind a ZeroMQ ROUTER on the running asyncio loop."""

    def __init__(
        self,
        broker: Broker,
        endpoints: list[str],
        *,
        curve: CurveSettings | None = None,
        sndhwm: int = 100,
        rcvhwm: int = 100,
        tick_interval: float = 0.05,
        burst: int = 512,
        burst_commands: int = 4096,
        read_slice: float = 0.01,
        ingress_share: float = 0.5,
        park_max: int = 4,
        io_threads: int = 1,
        shards: ShardBus | None = None,
        gate: Callable[[], bool] | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one control endpoint is needed")
        self.broker = broker
        self.endpoints = list(endpoints)
        self.bound: list[str] = []
        self.curve = curve
        self.sndhwm = sndhwm
        self.rcvhwm = rcvhwm
        self.tick_interval = tick_interval
        self.burst = burst
        self.burst_commands = burst_commands
        self.read_slice = read_slice  # seconds of input work per wake-up, at most
        self._share = ingress_share * tick_interval  # seconds per window per session
        self.park_max = park_max
        self._used: dict[bytes, float] = {}  # this window: identity -> seconds of input work
        self._parked: dict[bytes, deque[tuple[Session, list[Any]]]] = {}
        self.parked_total = 0
        self.refused_total = 0
        self.gated_total = 0
        self.io_threads = io_threads
        self.shards = shards
        self.gate = gate  # False: do not read clients now (the mesh or shards are behind)
        broker.ingress_stats = self.stats
        self.loop_lag: Callable[[], float] | None = None  # the node's LoopMonitor.lag
        self._gated = False
        if shards is not None:
            shards.on_output = self.flush_output
        self.send_errors = 0
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._sock: zmq.Socket[bytes] | None = None
        self._mon: zmq.Socket[bytes] | None = None
        self._auth: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._fd_peer: dict[int, bytes] = {}
        self._fds = (-1, -1)
        self._suspects: dict[bytes, int] = {}
        self._scheduled = False
        self.running = False

    # -- life cycle -----------------------------------------------------------------------
    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context(io_threads=self.io_threads)
        self._ctx = ctx
        sock = ctx.socket(zmq.ROUTER)
        self._sock = sock
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, self.sndhwm)
        sock.setsockopt(zmq.RCVHWM, self.rcvhwm)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * self.broker.limits.max_message + 4096)
        if self.curve is not None:
            from zmq.auth import load_certificate
            from zmq.auth.thread import ThreadAuthenticator

            auth = ThreadAuthenticator(ctx)
            auth.start()
            auth.configure_curve(domain="*", location=self.curve.allow_dir)
            self._auth = auth
            public, secret = load_certificate(self.curve.secret_key_file)
            if secret is None:
                raise ValueError(f"{self.curve.secret_key_file} holds no secret key")
            sock.curve_server = True
            sock.curve_publickey = public
            sock.curve_secretkey = secret
        self._mon = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        for ep in self.endpoints:
            sock.bind(_wildcard_port(ep))
            last = sock.getsockopt(zmq.LAST_ENDPOINT)
            self.bound.append(last.decode() if isinstance(last, bytes) else str(last))
        self._fds = (cast(int, sock.getsockopt(zmq.FD)), cast(int, self._mon.getsockopt(zmq.FD)))
        loop.add_reader(self._fds[0], self._on_readable)
        loop.add_reader(self._fds[1], self._on_monitor)
        self._timer = loop.call_later(self.tick_interval, self._on_tick)
        self.running = True
        self._on_readable()
        self._on_monitor()

    async def stop(self) -> None:
        """Say BYE (SHUTDOWN) to every session, then close the sockets."""
        if not self.running:
            return
        self.running = False
        loop = self._loop
        assert loop is not None and self._sock is not None and self._mon is not None
        if self._timer is not None:
            self._timer.cancel()
        loop.remove_reader(self._fds[0])
        loop.remove_reader(self._fds[1])
        self.broker.close_all()
        self._flush(loop.time())
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self._mon.close(linger=0)
        self._sock.close(linger=100)
        if self._auth is not None:
            self._auth.stop()
        if self._ctx is not None:
            self._ctx.term()

    # -- events ---------------------------------------------------------------------------
    def _on_readable(self) -> None:
        self._scheduled = False
        if not self.running:
            return
        if self.gate is not None and not self.gate():
            self._gated = True  # resume() reads again
            self.gated_total += 1
            return
        sock = self._sock
        loop = self._loop
        assert sock is not None and loop is not None
        broker = self.broker
        sessions = broker.sessions
        now = loop.time()
        clock = time.perf_counter
        start = clock()
        deadline = start + self.read_slice
        if self._parked:  # at most half the slice: the socket is read on every wake-up
            self._drain_parked(start + self.read_slice / 2)
        recv = _raw_recv.__get__(sock) if _raw_recv is not None else sock.recv
        getopt = sock.getsockopt
        rcvmore = zmq.RCVMORE
        used = self._used
        parked = self._parked
        share = self._share
        n = 0
        budget = broker.commands_in + self.burst_commands
        full = False
        t = clock()  # one clock read per message: its work is the time since the last one
        while n < self.burst and broker.commands_in < budget:
            if t > deadline:
                full = True
                break
            try:
                ident = recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            n += 1
            frames: list[bytes] = []
            fd = -1
            if ident in sessions:
                while getopt(rcvmore):
                    frames.append(recv())
            elif getopt(rcvmore):
                first = sock.recv(copy=False)
                with contextlib.suppress(zmq.ZMQError):
                    fd = int(first.get(zmq.SRCFD))
                frames.append(first.bytes)
                while getopt(rcvmore):
                    frames.append(recv())
            got = broker.decode(ident, frames, now)
            spent = used.get(ident, 0.0)
            if got is not None:
                s, commands = got
                if (parked and ident in parked) or (spent > share and len(used) > 1):
                    self._park(s, commands)
                else:
                    broker.run(s, commands)
            t0, t = t, clock()
            used[ident] = spent + t - t0
            if fd >= 0 and ident in sessions:
                self._fd_peer[fd] = ident
        self._flush(now)
        self._recheck(force=full or n >= self.burst or broker.commands_in >= budget
                      or bool(self._parked and not self._all_over_share()))

    # -- ingress credit ---------------------------------------------------------------------
    def _over_share(self, ident: bytes) -> bool:
        """While another session also sent during this window, a session may use at most
        ``ingress_share`` of the window's time for its input."""
        used = self._used
        return len(used) > 1 and used.get(ident, 0.0) > self._share

    def _all_over_share(self) -> bool:
        return all(self._over_share(i) for i in self._parked)

    def _park(self, s: Session, commands: list[Any]) -> None:
        """``s`` is over its share: its control commands run now, the rest waits (at most
        ``park_max`` messages per session); beyond that it is refused (``Broker.refuse``)."""
        broker = self.broker
        urgent, rest = broker.split_control(commands)
        if urgent:
            broker.run(s, urgent)
        if not rest:
            return
        q = self._parked.get(s.identity)
        if q is None:
            q = self._parked[s.identity] = deque()
        if len(q) < self.park_max:
            q.append((s, rest))
            self.parked_total += 1
        else:
            broker.refuse(s, rest)
            self.refused_total += 1

    def _drain_parked(self, deadline: float) -> None:
        """Run parked input of the sessions that have credit again, oldest first."""
        clock = time.perf_counter
        broker = self.broker
        used = self._used
        for ident in list(self._parked):
            q = self._parked[ident]
            while q and not self._over_share(ident) and clock() < deadline:
                s, commands = q.popleft()
                t0 = clock()
                if not s.closed:
                    broker.run(s, commands)
                used[ident] = used.get(ident, 0.0) + clock() - t0
            if not q:
                del self._parked[ident]

    def parked(self) -> int:
        """Messages parked now (all sessions)."""
        return sum(len(q) for q in self._parked.values())

    def stats(self) -> dict[str, Any]:
        """The driver's figures (merged into the broker's STATS by the node)."""
        return {
            "ingress_parked": self.parked(),
            "ingress_parked_total": self.parked_total,
            "ingress_refused_total": self.refused_total,
            "ingress_gated_total": self.gated_total,
            **({"loop_lag_seconds": self.loop_lag()} if self.loop_lag is not None else {}),
        }

    def resume(self) -> None:
        """The gate may be open again: read what waits."""
        if self._gated and (self.gate is None or self.gate()):
            self._gated = False
            self._recheck(force=True)

    def _recheck(self, force: bool = False) -> None:
        sock = self._sock
        if self._scheduled or sock is None or not self.running:
            return
        if force or cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            self._scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._on_readable)

    def _on_tick(self) -> None:
        loop = self._loop
        assert loop is not None
        if not self.running:
            return
        now = loop.time()
        self._used = {}  # a new ingress window
        mon = self._mon
        if mon is not None and cast(int, mon.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            self._on_monitor()  # the FD is edge-triggered: never rely on it alone
        for ident in list(self._suspects):
            self._probe(ident, now)
        if self.shards is not None:
            self.shards.check(now)
        self.broker.tick(now)
        self._flush(now)
        self.resume()
        self._recheck(force=bool(self._parked))
        self._timer = loop.call_later(self.tick_interval, self._on_tick)

    def _on_monitor(self) -> None:
        mon = self._mon
        loop = self._loop
        assert mon is not None and loop is not None
        while True:
            try:
                msg = mon.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            except zmq.ZMQError:  # closed during stop
                return
            event = parse_monitor_message(msg)
            if event["event"] == zmq.EVENT_DISCONNECTED:
                ident = self._fd_peer.pop(int(event["value"]), None)
                if ident is not None and ident in self.broker.sessions:
                    self._suspects[ident] = 0
                    self._probe(ident, loop.time())
        self._flush(loop.time())
        self._recheck()

    def _probe(self, ident: bytes, now: float) -> None:
        """Send an empty body; EHOSTUNREACH proves the peer gone."""
        sock = self._sock
        assert sock is not None
        if ident not in self.broker.sessions:
            self._suspects.pop(ident, None)
            return
        try:
            sock.send_multipart([ident, SIGNATURE, _EMPTY_BODY], zmq.NOBLOCK)
        except zmq.Again:
            pass
        except zmq.ZMQError:
            self._suspects.pop(ident, None)
            self.broker.peer_gone(ident, now)
            return
        tries = self._suspects.get(ident, 0) + 1
        if tries > 5:
            self._suspects.pop(ident, None)
        else:
            self._suspects[ident] = tries

    # -- output ---------------------------------------------------------------------------
    def flush_output(self, now: float) -> None:
        """Send what the broker has queued (the shard pool calls this after a reply)."""
        if self.running:
            self._flush(now)
            self.resume()

    def _flush(self, now: float) -> None:
        sock = self._sock
        assert sock is not None
        broker = self.broker
        if self.shards is not None:
            self.shards.flush()
        send = _raw_send.__get__(sock) if _raw_send is not None else sock.send
        more = zmq.SNDMORE | zmq.NOBLOCK
        for ident, direct in broker.take_direct():
            try:
                send(ident, more)
                send(SIGNATURE, zmq.SNDMORE)
                send(direct)
            except zmq.ZMQError:
                self.send_errors += 1
        for s in broker.take_dirty():
            ident = s.identity
            while True:
                body = broker.next_body(s)
                if body is None:
                    break
                try:
                    send(ident, more)
                except zmq.Again:
                    broker.stalled(s, body, now)
                    break
                except zmq.ZMQError:
                    broker.peer_gone(ident, now)
                    break
                send(SIGNATURE, zmq.SNDMORE)
                send(body)


def _wildcard_port(endpoint: str) -> str:
    """``tcp://host:0`` binds an ephemeral port (ZeroMQ spells it ``*``)."""
    if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
        return endpoint[:-1] + "*"
    return endpoint
