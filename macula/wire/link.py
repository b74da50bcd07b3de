"""Links between nodes: one admitted QUIC connection (``_Conn``) under one logical link
(``PeerLink``) that outlives it.

A ``PeerLink`` is what the rest of macula talks to: ``send`` / ``send_nowait`` for one-way
messages, ``request`` for request/response.  Underneath it holds at most one admitted QUIC
connection with one long-lived bidirectional stream; when that connection breaks (the peer
closed it, restarted, or stopped answering) the link dials again by itself and re-sends what
the old connection had not got acknowledged, so callers do not handle re-dials.

The path of a message, and why it is fast:

* ``send_nowait(kind, payload)`` appends one frame ``[10, kind, payload]`` to the link's
  ``BatchEncoder`` (msgpack straight into one growing buffer) and, if no flush is scheduled,
  schedules one with ``loop.call_soon``: everything queued during one loop iteration leaves
  in **one** ``send_stream_data`` call at the start of the next, and nothing waits for a
  timer at low load (``flush_delay`` > 0 trades latency for bigger writes under bulk load).
* The flush hands the bytes to aioquic and calls ``transmit()`` once.  It keeps the batch
  (bytes and stream offset) until aioquic reports the stream acknowledged past it: that is
  what is re-sent after a broken connection.
* On receipt, ``FrameDecoder`` splits the stream and each frame is decoded by one msgspec
  decoder of the tagged union (``messages.TRAFFIC_DECODER``) and dispatched by type.

Delivery guarantees: frames on one link arrive in order, each once, while its connection
lives.  When a connection breaks, frames the peer's QUIC stack had not acknowledged are sent
again on the next connection, so a frame can arrive twice if the peer received it but its
acknowledgement was lost with the connection (at least once across a re-dial); requests whose
frame was acknowledged but not answered fail with ``RequestLost`` (they may have run), others
are re-sent.  When the connection was dropped because the peer stopped answering (liveness),
requests made with ``fail_on_silence`` that were already written fail at once with
``RequestLost`` (the peer is probably dead: their callers should not wait for the re-dial);
requests not yet written wait for it.  A REQ
frame is re-sent only for a request still waiting for its answer (not for one that failed,
timed out or was answered).  Higher layers de-duplicate by their message ids.

Liveness: a PING goes out after ``keepalive_interval`` without traffic, or after
``dead_after`` while ``fail_on_silence`` requests wait; data or a PING unanswered for ``dead_after``
closes the connection (``CLOSE_NOT_ANSWERING``).

Backpressure: bytes queued in the encoder plus bytes sent but not yet acknowledged are the
link's send buffer.  Beyond ``send_buffer`` ``send()`` waits for room and ``send_nowait()``
returns False (counted as a drop).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ssl
from collections import deque
from collections.abc import Awaitable, Collection
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import msgspec
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from macula import BatchEncoder, FrameDecoder, FrameError
from macula.wire import identity as ident
from macula.wire import messages as m
from macula.wire.config import WireConfig

if TYPE_CHECKING:
    from macula.wire.endpoint import WireEndpoint

# Connection states
HANDSHAKE: Final = 0  # QUIC up (or coming up), admission in progress
OPEN: Final = 1  # admitted: traffic flows
CLOSED: Final = 2


class LinkError(Exception):
    """A link could not do what was asked (base of the wire's errors)."""


class DialError(LinkError):
    """The peer could not be reached or refused admission."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class LinkClosed(LinkError):
    """The link (or its connection, for a request already delivered) is gone."""


class RequestLost(LinkClosed):
    """The connection was lost after the request was delivered: it may have run."""


class RequestTimeout(LinkError, TimeoutError):
    """No response within the request's timeout."""


class RemoteError(LinkError):
    """The peer answered a request with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"remote error {status}: {message}")
        self.status = status
        self.message = message


class RequestRejected(Exception):
    """Raised by a request handler to answer with a chosen error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class WireHandler:
    """What a node does with traffic from its peers; override what you need.

    ``on_message`` and ``on_request`` run on the event loop for every frame: keep them short
    (hand work to a queue).  ``on_request`` returns the response bytes, or an awaitable of
    them; raising ``RequestRejected`` answers with its status, any other exception with
    ``STATUS_HANDLER_ERROR``.
    """

    def on_message(self, link: PeerLink, kind: int, payload: bytes) -> None:
        pass

    def on_messages(self, link: PeerLink, msgs: list[m.Msg]) -> None:
        """The one-way messages of one received chunk, in order (``msg.kind``,
        ``msg.payload``). Override to handle a batch at once; the default calls
        ``on_message`` for each."""
        on_message = self.on_message
        for msg in msgs:
            on_message(link, msg.kind, msg.payload)

    def on_request(self, link: PeerLink, kind: int, payload: bytes) -> bytes | Awaitable[bytes]:
        raise RequestRejected(m.STATUS_UNKNOWN_KIND, f"no handler for request kind {kind}")

    def on_link_up(self, link: PeerLink) -> None:
        pass

    def on_link_down(self, link: PeerLink, code: int, reason: str) -> None:
        pass


def _frame(msg: Any) -> bytes:
    enc = BatchEncoder()
    enc.append(msg)
    return enc.flush()


def _stream_acked(quic: QuicConnection, stream_id: int) -> int:
    """Stream offset below which the peer has acknowledged everything (aioquic internals:
    the sender discards acknowledged bytes from the start of its buffer)."""
    stream = quic._streams.get(stream_id)
    if stream is None:
        return 0
    return int(stream.sender._buffer_start)


def client_configuration(cfg: WireConfig) -> QuicConfiguration:
    # The server is authenticated by pinning: its certificate key must hash to the node id
    # we dial (checked after the TLS handshake); there is no CA, hence CERT_NONE.
    return QuicConfiguration(
        is_client=True,
        alpn_protocols=[m.ALPN],
        verify_mode=ssl.CERT_NONE,
        server_name="macula.invalid",
        max_datagram_size=cfg.max_datagram_size,
        max_data=cfg.max_data,
        max_stream_data=cfg.max_stream_data,
        idle_timeout=cfg.quic_idle_timeout,
    )


def server_configuration(identity: ident.NodeIdentity, cfg: WireConfig) -> QuicConfiguration:
    return QuicConfiguration(
        is_client=False,
        alpn_protocols=[m.ALPN],
        certificate=identity.certificate,
        private_key=identity.private_key,
        max_datagram_size=cfg.max_datagram_size,
        max_data=cfg.max_data,
        max_stream_data=cfg.max_stream_data,
        idle_timeout=cfg.quic_idle_timeout,
    )


class _Conn(QuicConnectionProtocol):
    """One QUIC connection: admission, then frames to and from its ``PeerLink``."""

    def __init__(
        self,
        quic: QuicConnection,
        stream_handler: Any = None,
        *,
        endpoint: WireEndpoint,
        expected: bytes | None = None,
    ) -> None:
        super().__init__(quic, stream_handler)
        self.endpoint = endpoint
        self.cfg = endpoint.config
        self.is_client = quic.configuration.is_client
        self.expected = expected  # the node id we dialled (client side)
        self.stream_id: int | None = None
        self.decoder = FrameDecoder(max_frame=self.cfg.max_frame)
        self.state = HANDSHAKE
        self.link: PeerLink | None = None
        self.peer_id: bytes | None = None
        self.peer_listen: tuple[str, int] | None = None
        self.realm: str | None = None
        now = self._loop.time()
        self.last_rx = now
        self.last_tx = now
        self.first_unacked_at = 0.0  # when the oldest unacknowledged batch was written
        # (end offset, bytes, request ids) of batches not yet acknowledged
        self.batches: deque[tuple[int, bytes, list[int] | None]] = deque()
        self.written = 0
        self.admitted: asyncio.Future[None] = self._loop.create_future()
        self._hello: m.Hello | None = None
        self._server_nonce = b""
        self._client_nonce = b""
        self._handshake_timer: asyncio.TimerHandle | None = None
        if not self.is_client:
            self._handshake_timer = self._loop.call_later(
                self.cfg.handshake_timeout, self._handshake_expired
            )

    # -- aioquic hooks ------------------------------------------------------------------

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        self.last_rx = self._loop.time()
        super().datagram_received(data, addr)
        link = self.link
        if link is not None and self.batches:
            self.trim()
            if link._room_waiters:
                link._wake_room()

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            if self.stream_id is None and not self.is_client:
                self.stream_id = event.stream_id
            if event.stream_id != self.stream_id:
                self.fail(m.CLOSE_PROTOCOL, "one bidirectional stream per link")
                return
            if event.data:
                self._on_data(event.data)
            if event.end_stream and self.state != CLOSED:
                self.fail(m.CLOSE_PROTOCOL, "the link's stream was ended")
        elif isinstance(event, events.HandshakeCompleted):
            if self.is_client:
                self._start_admission()
        elif isinstance(event, events.ConnectionTerminated):
            self._terminated(event.error_code, event.reason_phrase)

    def connection_lost(self, exc: Exception | None) -> None:
        self._terminated(m.CLOSE_NORMAL, "transport closed")

    # -- writing --------------------------------------------------------------------------

    def write(self, data: bytes, rids: list[int] | None = None) -> None:
        assert self.stream_id is not None
        self._quic.send_stream_data(self.stream_id, data)
        if not self.batches:
            # while batches are unacknowledged, ACKs keep last_rx fresh: the clock is read
            # only when the first one goes out
            self.first_unacked_at = self.last_tx = self._loop.time()
        n = len(data)
        self.written += n
        self.batches.append((self.written, data, rids))
        self.endpoint.stats.bytes_out += n
        self.transmit()

    def _write_handshake(self, msg: Any) -> None:
        assert self.stream_id is not None
        data = _frame(msg)
        self._quic.send_stream_data(self.stream_id, data)
        self.written += len(data)  # stream offsets count the handshake too
        self.transmit()

    def trim(self) -> None:
        """Forget batches the peer has acknowledged."""
        if self.stream_id is None:
            return
        acked = _stream_acked(self._quic, self.stream_id)
        batches = self.batches
        while batches and batches[0][0] <= acked:
            batches.popleft()
        link = self.link
        if link is not None and link._conn is self:
            link._inflight = self.written - acked if batches else 0
        if not batches:
            self.first_unacked_at = 0.0

    def unacked_batches(self) -> list[tuple[bytes, list[int] | None]]:
        self.trim()
        return [(data, rids) for _, data, rids in self.batches]

    # -- closing --------------------------------------------------------------------------

    def fail(self, code: int, reason: str) -> None:
        """Close the connection with an application error code (counted)."""
        if self.state == CLOSED:
            return
        self.endpoint.stats.count_close(code, local=True)
        self._close_now(code, reason)

    def _close_now(self, code: int, reason: str) -> None:
        self._quic.close(error_code=code, reason_phrase=reason[:200])
        self.transmit()
        self._terminated(code, reason, local=True)

    def _terminated(self, code: int, reason: str, *, local: bool = False) -> None:
        if self.state == CLOSED:
            return
        self.state = CLOSED
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        if not local:
            self.endpoint.stats.count_close(code, local=False)
        if not self.admitted.done():
            if ident.ADMIT_BAD_HELLO <= code <= ident.ADMIT_WRONG_PEER:
                self.admitted.set_exception(ident.AdmissionError(code, reason or "refused"))
            else:
                self.admitted.set_exception(
                    DialError(f"connection closed during admission: {reason or code}", code)
                )
            self.admitted.exception()  # retrieved here: a dial may have stopped waiting
        link, self.link = self.link, None
        if link is not None:
            link._conn_lost(self, code, reason)
        if self.is_client and self._transport is not None:
            # the dialler owns its UDP socket: close it once QUIC has sent its last words
            self._loop.call_later(0.05, self._transport.close)

    def _handshake_expired(self) -> None:
        if self.state == HANDSHAKE:
            self.fail(m.CLOSE_HANDSHAKE_TIMEOUT, "admission not completed in time")

    # -- admission ------------------------------------------------------------------------

    def _start_admission(self) -> None:
        """Client: the TLS handshake is done; pin the server's key, then say HELLO."""
        cert = self._quic.tls._peer_certificate
        try:
            if self.expected is None:  # a seed dialled by address: learn who it is
                self.expected = ident.server_node_id(cert)
            else:
                ident.check_server_certificate(cert, self.expected)
        except ident.AdmissionError as exc:
            self.fail(exc.code, exc.reason)
            return
        ep = self.endpoint
        self.stream_id = self._quic.get_next_available_stream_id()
        self._client_nonce = ident.new_nonce()
        self._write_handshake(
            m.Hello(
                m.VERSION,
                ep.identity.node_id,
                ep.identity.public_key,
                ep.realm,
                self._client_nonce,
                ep.listen_address,
            )
        )

    def _on_handshake_frame(self, frame: bytes) -> None:
        try:
            msg = m.HANDSHAKE_DECODER.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError):
            code = m.classify_bad(frame)
            self.endpoint.stats.bad_input[m.CLOSE_NAMES.get(code, str(code))] += 1
            self.fail(ident.ADMIT_BAD_HELLO, "malformed handshake message")
            return
        ep = self.endpoint
        try:
            if not self.is_client:
                if isinstance(msg, m.Hello) and self._hello is None:
                    if msg.version != m.VERSION:
                        raise ident.AdmissionError(
                            ident.ADMIT_BAD_HELLO, f"unsupported version {msg.version}"
                        )
                    if msg.realm not in ep.realms:
                        raise ident.AdmissionError(
                            ident.ADMIT_UNKNOWN_REALM, f"realm {msg.realm!r} is not served here"
                        )
                    self._hello = msg
                    self._server_nonce = ident.new_nonce()
                    self._write_handshake(m.Challenge(ep.identity.node_id, self._server_nonce))
                elif isinstance(msg, m.Auth) and self._hello is not None:
                    hello = self._hello
                    transcript = ident.hello_transcript(
                        server_id=ep.identity.node_id,
                        client_id=hello.node_id,
                        realm=hello.realm,
                        server_nonce=self._server_nonce,
                        client_nonce=hello.client_nonce,
                    )
                    ident.verify_hello(
                        public_key=hello.public_key,
                        node_id=hello.node_id,
                        transcript=transcript,
                        signature=msg.signature,
                    )
                    ident.check_realm_proof(ep.realms[hello.realm], transcript, msg.realm_proof)
                    self._write_handshake(m.Welcome(self.cfg.max_frame, ep.listen_address))
                    self._admit(hello.node_id, hello.realm, hello.listen)
                else:
                    raise ident.AdmissionError(
                        ident.ADMIT_BAD_HELLO, f"unexpected {type(msg).__name__} in admission"
                    )
            else:
                if isinstance(msg, m.Challenge) and not self._server_nonce:
                    if msg.server_id != self.expected:
                        raise ident.AdmissionError(
                            ident.ADMIT_WRONG_PEER, "challenge from another node id"
                        )
                    self._server_nonce = msg.server_nonce
                    transcript = ident.hello_transcript(
                        server_id=msg.server_id,
                        client_id=ep.identity.node_id,
                        realm=ep.realm,
                        server_nonce=msg.server_nonce,
                        client_nonce=self._client_nonce,
                    )
                    secret = ep.realm_secret
                    self._write_handshake(
                        m.Auth(
                            ident.sign_hello(ep.identity, transcript),
                            None if secret is None else ident.realm_proof(secret, transcript),
                        )
                    )
                elif isinstance(msg, m.Welcome) and self._server_nonce:
                    self._admit(self.expected or b"", ep.realm, msg.listen)
                else:
                    raise ident.AdmissionError(
                        ident.ADMIT_BAD_HELLO, f"unexpected {type(msg).__name__} in admission"
                    )
        except ident.AdmissionError as exc:
            ep.stats.admissions_refused[m.CLOSE_NAMES.get(exc.code, str(exc.code))] += 1
            self.fail(exc.code, exc.reason)

    def _admit(self, peer_id: bytes, realm: str, listen: tuple[str, int] | None) -> None:
        self.state = OPEN
        self.peer_id = peer_id
        self.realm = realm
        self.peer_listen = listen
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        if self.is_client:
            if not self.admitted.done():
                self.admitted.set_result(None)
        else:
            self.endpoint.stats.admitted += 1
            self.endpoint.pool._attach_inbound(self)

    # -- reading --------------------------------------------------------------------------

    def _on_data(self, data: bytes) -> None:
        stats = self.endpoint.stats
        stats.bytes_in += len(data)
        bad: FrameError | None = None
        try:
            frames = self.decoder.feed(data)
        except FrameError as exc:
            frames = exc.frames
            bad = exc
        if frames:
            if self.state == OPEN:
                self._dispatch(frames)
            else:
                for frame in frames:
                    if self.state == OPEN:
                        self._dispatch([frame])
                    elif self.state == HANDSHAKE:
                        self._on_handshake_frame(frame)
                    if self.state == CLOSED:
                        return
        if bad is not None and self.state != CLOSED:
            stats.bad_input["bad_frame"] += 1
            self.fail(m.CLOSE_BAD_FRAME, str(bad))

    def _dispatch(self, frames: list[bytes]) -> None:
        link = self.link
        if link is None:  # admitted but detached (closing): drop
            return
        stats = self.endpoint.stats
        stats.frames_in += len(frames)
        decode = m.TRAFFIC_DECODER.decode
        on_messages = self.endpoint.handler.on_messages
        Msg, Req, Resp, Ping = m.Msg, m.Req, m.Resp, m.Ping
        run: list[m.Msg] = []
        msg: Any  # dispatched on type(msg) below, which mypy does not narrow through
        for frame in frames:
            try:
                msg = decode(frame)
            except (msgspec.DecodeError, msgspec.ValidationError):
                if run:
                    on_messages(link, run)
                code = m.classify_bad(frame)
                stats.bad_input[m.CLOSE_NAMES[code]] += 1
                self.fail(code, "undecodable frame" if code != m.CLOSE_UNKNOWN_TYPE
                          else "unknown message type")
                return
            t: Any = type(msg)
            if t is Msg:
                run.append(msg)
                continue
            if run:  # keep the order of one-way messages and everything else
                on_messages(link, run)
                run = []
                if self.state == CLOSED:
                    return
            if t is Req:
                link._on_request(msg)
            elif t is Resp:
                link._on_response(msg)
            elif t is Ping:
                link._send_frame((m.T_PONG, msg.token))
            elif t is m.Pong:
                link._ping_sent_at = 0.0
            else:  # GoAway: the peer is leaving; it will close the connection
                self.endpoint.stats.goaways_in += 1
            if self.state == CLOSED:
                return
        if run:
            on_messages(link, run)


class PeerLink:
    """The logical link to one peer; survives its connections (see the module docstring)."""

    def __init__(
        self,
        endpoint: WireEndpoint,
        peer_id: bytes,
        addr: tuple[str, int] | None,
    ) -> None:
        self.endpoint = endpoint
        self.cfg = endpoint.config
        self.peer_id = peer_id
        self.addr = addr  # where to dial the peer; None: it cannot be dialled (client mode)
        self.realm = endpoint.realm
        self._loop = asyncio.get_running_loop()
        self._enc = BatchEncoder(max_frame=self.cfg.max_frame)
        self._conn: _Conn | None = None
        self._resend: list[tuple[bytes, list[int] | None]] = []
        self._resend_bytes = 0
        self._inflight = 0  # bytes written on the connection and not yet acknowledged
        self._limit = self.cfg.send_buffer
        self._unflushed_rids: list[int] = []
        self._flush_handle: asyncio.Handle | asyncio.TimerHandle | None = None
        self._pending: dict[int, tuple[asyncio.Future[bytes], asyncio.TimerHandle]] = {}
        self._fail_on_silence: set[int] = set()  # pending rids asking to fail fast
        self._next_rid = 1
        self._room_waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._connect_waiters: list[asyncio.Future[None]] = []
        self._dial_task: asyncio.Task[None] | None = None
        self._inbound = 0
        self._ping_sent_at = 0.0
        self._ping_token = 0
        self.connected_once = False
        self.closed = False
        self.close_reason = ""
        self.last_used = self._loop.time()

    def __repr__(self) -> str:
        state = "open" if self.is_open else ("closed" if self.closed else "down")
        return f"<PeerLink {self.peer_id.hex()[:12]} {self.addr} {state}>"

    # -- state ----------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._conn is not None and self._conn.state == OPEN

    def buffered(self) -> int:
        """Bytes queued or sent but not acknowledged (the send buffer's fill; the
        acknowledged part is accounted as ACKs arrive)."""
        return self._enc.nbytes + self._inflight + self._resend_bytes

    @property
    def pending_requests(self) -> int:
        return len(self._pending)

    async def connected(self) -> None:
        """Wait until the link has an admitted connection (dialling if needed)."""
        if self.closed:
            raise LinkClosed(f"link closed: {self.close_reason}")
        if self.is_open:
            return
        if self.addr is None:
            raise LinkClosed("the peer cannot be dialled (client mode) and is not connected")
        fut: asyncio.Future[None] = self._loop.create_future()
        self._connect_waiters.append(fut)
        self._ensure_dial()
        await fut

    # -- sending --------------------------------------------------------------------------

    def send_nowait(self, kind: int, payload: bytes) -> bool:
        """Queue a one-way message; False (and a counted drop) if the send buffer is full."""
        if self._try_send(kind, payload):
            return True
        self.endpoint.stats.drops["backpressure"] += 1
        return False

    async def send(self, kind: int, payload: bytes) -> None:
        """Queue a one-way message, waiting while the send buffer is full."""
        while not self._try_send(kind, payload):
            await self.drain(self._limit)

    def _try_send(self, kind: int, payload: bytes) -> bool:
        if self.closed:
            raise LinkClosed(f"link closed: {self.close_reason}")
        if self._enc.nbytes + self._inflight + self._resend_bytes >= self._limit:
            return False
        self._enc.append((m.T_MSG, kind, payload))
        if self._flush_handle is None:  # the first frame of this loop iteration
            self.last_used = self._loop.time()  # the pool's idle reaper counts from here
            self._schedule_flush()
        elif self._enc.nbytes >= self.cfg.flush_bytes:
            self._write_out()
        return True

    async def request(self, kind: int, payload: bytes, timeout: float | None = None, *,
                      fail_on_silence: bool = False) -> bytes:
        """Send a request and wait for its response bytes.

        Raises ``RequestTimeout``, ``RemoteError`` (the peer answered with an error status),
        ``LinkClosed`` or ``DialError``. ``fail_on_silence``: while it waits, the peer is
        probed after ``dead_after`` of silence (not ``keepalive_interval``), and if the
        connection is dropped as not answering once the request was written, it fails at
        once with ``RequestLost`` instead of waiting for the re-dial (for callers with
        somewhere else to go, such as RPC calls with another provider).
        """
        if self.closed:
            raise LinkClosed(f"link closed: {self.close_reason}")
        if len(self._pending) >= self.cfg.max_pending_requests:
            self.endpoint.stats.drops["too_many_requests"] += 1
            raise LinkError(f"{len(self._pending)} requests already in flight on this link")
        while self.buffered() >= self._limit:
            await self.drain(self._limit)
        rid = self._next_rid
        self._next_rid = rid + 1
        fut: asyncio.Future[bytes] = self._loop.create_future()
        timer = self._loop.call_later(
            self.cfg.request_timeout if timeout is None else timeout, self._timeout, rid
        )
        self._pending[rid] = (fut, timer)
        if fail_on_silence:
            self._fail_on_silence.add(rid)
        self._enc.append((m.T_REQ, rid, kind, payload))
        self._unflushed_rids.append(rid)
        self.endpoint.stats.requests_out += 1
        self.last_used = self._loop.time()
        if self._flush_handle is None:
            self._schedule_flush()
        try:
            return await fut
        finally:
            entry = self._pending.pop(rid, None)
            if entry is not None:
                entry[1].cancel()
            if fail_on_silence:
                self._fail_on_silence.discard(rid)

    def _send_frame(self, frame: tuple[Any, ...]) -> None:
        """Queue a control frame (responses, pings), never refused."""
        self._enc.append(frame)
        if self._flush_handle is None:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        delay = self.cfg.flush_delay
        if delay <= 0 or self._enc.nbytes >= self.cfg.flush_bytes:
            self._flush_handle = self._loop.call_soon(self._flush)
        else:
            self._flush_handle = self._loop.call_later(delay, self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        self._write_out()

    def _write_out(self) -> None:
        conn = self._conn
        if conn is None or conn.state != OPEN:
            if not self.closed and (self._enc.nbytes or self._resend):
                self._ensure_dial()
            return
        if self._resend:
            resend, self._resend = self._resend, []
            self._resend_bytes = 0
            for data, rids in resend:
                conn.write(data, rids)
                self._inflight += len(data)
            self.endpoint.stats.frames_resent_batches += len(resend)
        if self._enc.nbytes:
            rids = self._unflushed_rids or None
            if rids is not None:
                self._unflushed_rids = []
            self.endpoint.stats.frames_out += len(self._enc)
            data = self._enc.flush()
            self._inflight += len(data)
            conn.write(data, rids)

    def _wake_room(self) -> None:
        waiters = self._room_waiters
        buffered = self.buffered()
        for _ in range(len(waiters)):
            below, fut = waiters.popleft()
            if fut.done():
                continue
            if buffered < below:
                fut.set_result(None)
            else:
                waiters.append((below, fut))

    def flush(self) -> None:
        """Write what is queued now, instead of at the end of this loop iteration (a
        scheduled flush stays scheduled: cheaper than cancelling and re-scheduling it)."""
        self._write_out()

    async def drain(self, below: int | None = None) -> None:
        """Wait until the send buffer holds fewer than ``below`` bytes (default: half of
        ``send_buffer``), like ``asyncio.StreamWriter.drain``."""
        limit = self.cfg.send_buffer // 2 if below is None else below
        if self.buffered() < limit:
            return
        fut: asyncio.Future[None] = self._loop.create_future()
        self._room_waiters.append((limit, fut))
        await fut

    # -- requests and responses -----------------------------------------------------------

    def _timeout(self, rid: int) -> None:
        entry = self._pending.pop(rid, None)
        if entry is not None and not entry[0].done():
            self.endpoint.stats.request_timeouts += 1
            entry[0].set_exception(RequestTimeout(f"no response from {self.peer_id.hex()[:12]}"))

    def _on_response(self, msg: m.Resp) -> None:
        entry = self._pending.pop(msg.rid, None)
        if entry is None:
            self.endpoint.stats.late_responses += 1
            return
        fut, timer = entry
        timer.cancel()
        if fut.done():
            return
        if msg.status == m.STATUS_OK:
            fut.set_result(msg.payload)
        else:
            fut.set_exception(RemoteError(msg.status, msg.payload.decode("utf-8", "replace")))

    def _on_request(self, msg: m.Req) -> None:
        stats = self.endpoint.stats
        stats.requests_in += 1
        if self._inbound >= self.cfg.max_inbound_requests:
            stats.drops["overloaded"] += 1
            self._respond(msg.rid, m.STATUS_OVERLOADED, b"too many requests in flight")
            return
        try:
            result = self.endpoint.handler.on_request(self, msg.kind, msg.payload)
        except RequestRejected as exc:
            self._respond(msg.rid, exc.status, exc.message.encode())
            return
        except Exception as exc:
            stats.handler_errors += 1
            self._respond(msg.rid, m.STATUS_HANDLER_ERROR, repr(exc).encode())
            return
        if inspect.isawaitable(result):
            self._inbound += 1
            task: asyncio.Future[bytes] = asyncio.ensure_future(result)
            task.add_done_callback(partial(self._answered, msg.rid))
        else:
            self._respond(msg.rid, m.STATUS_OK, result)

    def _answered(self, rid: int, task: asyncio.Future[bytes]) -> None:
        self._inbound -= 1
        if self.closed:
            return
        if task.cancelled():
            self._respond(rid, m.STATUS_HANDLER_ERROR, b"cancelled")
            return
        exc = task.exception()
        if exc is None:
            self._respond(rid, m.STATUS_OK, task.result())
        elif isinstance(exc, RequestRejected):
            self._respond(rid, exc.status, exc.message.encode())
        else:
            self.endpoint.stats.handler_errors += 1
            self._respond(rid, m.STATUS_HANDLER_ERROR, repr(exc).encode())

    def _respond(self, rid: int, status: int, payload: bytes) -> None:
        if not isinstance(payload, bytes | bytearray | memoryview):
            status, payload = m.STATUS_HANDLER_ERROR, b"handler returned non-bytes"
            self.endpoint.stats.handler_errors += 1
        self.last_used = self._loop.time()  # answering a peer is using the link
        self._send_frame((m.T_RESP, rid, status, payload))

    # -- connections ----------------------------------------------------------------------

    def _attach(self, conn: _Conn) -> None:
        """Make ``conn`` (admitted) the link's connection."""
        old = self._conn
        conn.link = self
        self._conn = conn
        if conn.realm is not None:
            self.realm = conn.realm
        if conn.peer_listen is not None and self.addr is None:
            self.addr = conn.peer_listen
        if old is not None and old.state != CLOSED:
            # A newer connection took over (both ends dialled at once, or the peer came back
            # before we noticed): keep what the old one had not delivered, then retire it.
            self._resend.extend(old.unacked_batches())
            self._resend_bytes = sum(len(data) for data, _ in self._resend)
            old.link = None
            old.fail(m.CLOSE_REPLACED, "a newer connection to this peer took over")
        self._inflight = 0
        if self.connected_once:
            self.endpoint.stats.redials += 1
        self.connected_once = True
        for fut in self._connect_waiters:
            if not fut.done():
                fut.set_result(None)
        self._connect_waiters.clear()
        if self._enc.nbytes or self._resend:
            self._write_out()
        self.endpoint.handler.on_link_up(self)

    def _conn_lost(self, conn: _Conn, code: int, reason: str) -> None:
        if conn is not self._conn:
            return
        self._conn = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        unacked = conn.unacked_batches()
        self._resend = unacked + self._resend
        self._inflight = 0
        # requests not written yet, or unacknowledged (re-sent on the next connection), wait;
        # the others may have run and fail, and so do the written ones asking to fail fast
        # when the peer went silent (dead, or cut off): not for them the re-dial's timeouts
        keep = set(self._unflushed_rids)
        for _, rids in self._resend:
            if rids:
                keep.update(rids)
        silent = code == m.CLOSE_NOT_ANSWERING
        if silent and self._fail_on_silence:
            keep -= self._fail_on_silence - set(self._unflushed_rids)
        lost = [r for r in self._pending if r not in keep]
        for rid in lost:
            fut, timer = self._pending.pop(rid)
            timer.cancel()
            if not fut.done():
                fut.set_exception(RequestLost(
                    f"no answer from the peer: it may have received the request ({reason})"
                    if silent else
                    f"connection lost after the request was delivered ({reason})"))
        # A REQ frame is re-sent only for a request still waiting for its answer: one that
        # failed, timed out or was answered (its acknowledgement lost) must not run again.
        self._resend = self._without_requests(self._resend, self._pending.keys())
        self._resend_bytes = sum(len(data) for data, _ in self._resend)
        self.endpoint.handler.on_link_down(self, code, reason)
        if self.closed:
            return
        if self.addr is None:
            self._give_up(LinkClosed(f"connection lost and the peer cannot be dialled: {reason}"))
            self.endpoint.pool._forget(self)
        elif self._resend or self._enc.nbytes or self._pending or self._connect_waiters:
            self._ensure_dial()

    def _without_requests(self, batches: list[tuple[bytes, list[int] | None]],
                          waiting: Collection[int]) -> list[tuple[bytes, list[int] | None]]:
        """``batches`` without the REQ frames of requests not in ``waiting`` (counted:
        drops["request_not_resent"])."""
        out: list[tuple[bytes, list[int] | None]] = []
        dropped = 0
        for data, rids in batches:
            if not rids or all(rid in waiting for rid in rids):
                out.append((data, rids))
                continue
            enc = BatchEncoder(max_frame=self.cfg.max_frame)
            kept: list[int] = []
            for frame in FrameDecoder(max_frame=self.cfg.max_frame).feed(data):
                msg = m.TRAFFIC_DECODER.decode(frame)  # our own frames: they decode
                if type(msg) is m.Req:
                    if msg.rid not in waiting:
                        dropped += 1
                        continue
                    kept.append(msg.rid)
                enc.append_raw(frame)
            if len(enc):
                out.append((enc.flush(), kept or None))
        if dropped:
            self.endpoint.stats.drops["request_not_resent"] += dropped
        return out

    def _ensure_dial(self) -> None:
        if self._dial_task is None and not self.closed and self.addr is not None:
            self._dial_task = self._loop.create_task(self._dial_loop())

    async def _dial_loop(self) -> None:
        pool = self.endpoint.pool
        attempts = 0
        try:
            while not self.closed:
                wait = pool.backoff_remaining(self.peer_id)
                if wait > 0:
                    await asyncio.sleep(wait)
                assert self.addr is not None
                try:
                    conn = await self.endpoint.dial(self.peer_id, self.addr)
                except (DialError, ident.AdmissionError, OSError, asyncio.TimeoutError) as exc:
                    attempts += 1
                    pool.note_failure(self.peer_id)
                    refused = isinstance(exc, ident.AdmissionError)
                    if refused or attempts >= self.cfg.redial_attempts:
                        code = exc.code if isinstance(exc, ident.AdmissionError) else None
                        self._give_up(DialError(f"cannot reach {self.peer_id.hex()[:12]} at "
                                                f"{self.addr}: {exc}", code))
                        return
                    continue
                pool.note_success(self.peer_id)
                if self.closed:
                    conn.fail(m.CLOSE_NORMAL, "link closed while dialling")
                    return
                self._attach(conn)
                return
        finally:
            self._dial_task = None

    def _give_up(self, exc: LinkError) -> None:
        """Dialling failed for good: fail waiters and requests, drop queued frames (counted)."""
        stats = self.endpoint.stats
        dropped = len(self._enc) + len(self._resend)
        if dropped:
            stats.drops["unreachable"] += dropped
        self._enc.clear()
        self._resend.clear()
        self._resend_bytes = 0
        self._inflight = 0
        self._unflushed_rids.clear()
        for waiting in self._connect_waiters:
            if not waiting.done():
                waiting.set_exception(exc)
        self._connect_waiters.clear()
        for fut, timer in self._pending.values():
            timer.cancel()
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()
        for _, waiter in self._room_waiters:
            if not waiter.done():
                waiter.set_exception(exc)
        self._room_waiters.clear()

    # -- liveness (called by the pool's ticker) -----------------------------------------

    def _tick(self, now: float) -> None:
        conn = self._conn
        if conn is None or conn.state != OPEN:
            return
        cfg = self.cfg
        if conn.batches:
            conn.trim()
        # waiting for an answer since: the oldest unacknowledged write or the PING, unless
        # the peer was heard from later
        since = 0.0
        if conn.batches or self._ping_sent_at:
            since = max(conn.first_unacked_at if conn.batches else 0.0, self._ping_sent_at,
                        conn.last_rx)
        if since and now - since > cfg.dead_after:
            self.endpoint.stats.dead_peers += 1
            self._ping_sent_at = 0.0
            conn.fail(m.CLOSE_NOT_ANSWERING, f"no answer for {now - since:.2f} s")
            return
        quiet = now - max(conn.last_rx, conn.last_tx)
        # while fail_on_silence requests wait for answers, a silent peer is found out
        # within about 2 x dead_after, not keepalive_interval + dead_after
        probe = min(cfg.dead_after, cfg.keepalive_interval) if self._fail_on_silence \
            else cfg.keepalive_interval
        if not self._ping_sent_at and quiet > probe:
            self._ping_token += 1
            self._ping_sent_at = now
            self.endpoint.stats.pings_out += 1
            self._send_frame((m.T_PING, self._ping_token))

    def idle(self) -> bool:
        return (
            not self._pending
            and not self._enc.nbytes
            and not self._resend
            and self._inbound == 0
            and (self._conn is None or not self._conn.batches)
        )

    # -- closing --------------------------------------------------------------------------

    def close(self, code: int = m.CLOSE_NORMAL, reason: str = "closed") -> None:
        """Close the link: pending requests fail, queued frames are flushed if connected."""
        if self.closed:
            return
        if self.is_open and (self._enc.nbytes or self._resend):
            self._write_out()
        self.closed = True
        self.close_reason = reason
        if self._dial_task is not None:
            self._dial_task.cancel()
        self._give_up(LinkClosed(f"link closed: {reason}"))
        conn, self._conn = self._conn, None
        if conn is not None and conn.state != CLOSED:
            conn.link = None
            if code == m.CLOSE_NORMAL:
                self.endpoint.stats.count_close(code, local=True)
                conn._close_now(code, reason)
            else:
                conn.fail(code, reason)
        with contextlib.suppress(Exception):
            self.endpoint.handler.on_link_down(self, code, reason)

