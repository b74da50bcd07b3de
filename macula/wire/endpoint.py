"""A node's end of the peer wire: the QUIC listener, the dialler and the pool of links.

``WireEndpoint`` owns the node's identity, the UDP socket it listens on (unless it runs in
client mode), the ``LinkPool`` and the counters.  Typical use::

    ep = WireEndpoint(NodeIdentity.load_or_create(data_dir), handler=MyHandler(),
                      host="127.0.0.1", port=4433, realm="default", realms={"default": None})
    await ep.start()
    link = await ep.pool.get(peer_id, ("127.0.0.1", 4434))   # dial (shared) + admission
    link.send_nowait(KIND_PUBLISH, payload)                 # one-way, batched per iteration
    reply = await link.request(KIND_FIND_NODE, query)       # request/response
    await ep.close()
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter, OrderedDict
from functools import partial
from typing import Any

from aioquic.asyncio.server import QuicServer
from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from macula import TTLCache
from macula.wire import identity as ident
from macula.wire import messages as m
from macula.wire.config import WireConfig
from macula.wire.link import (
    CLOSED,
    OPEN,
    DialError,
    LinkError,
    PeerLink,
    WireHandler,
    _Conn,
    client_configuration,
    server_configuration,
)


class WireStats:
    """Counters of one endpoint (monotonic, except the gauges computed on demand)."""

    def __init__(self) -> None:
        self.dials = 0
        self.dial_failures = 0
        self.redials = 0
        self.admitted = 0
        self.evictions = 0
        self.frames_in = 0
        self.frames_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.frames_resent_batches = 0
        self.requests_in = 0
        self.requests_out = 0
        self.request_timeouts = 0
        self.late_responses = 0
        self.handler_errors = 0
        self.pings_out = 0
        self.goaways_in = 0
        self.dead_peers = 0
        self.garbage_datagrams = 0
        self.unknown_connection_datagrams = 0
        self.drops: Counter[str] = Counter()
        self.bad_input: Counter[str] = Counter()
        self.admissions_refused: Counter[str] = Counter()
        self.closes_local: Counter[str] = Counter()
        self.closes_remote: Counter[str] = Counter()

    def count_close(self, code: int, *, local: bool) -> None:
        name = m.CLOSE_NAMES.get(code, f"0x{code:x}")
        (self.closes_local if local else self.closes_remote)[name] += 1

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in vars(self).items():
            out[k] = dict(v) if isinstance(v, Counter) else v
        return out


class _Server(QuicServer):
    """aioquic's server, counting the datagrams it would drop silently."""

    def __init__(self, *, stats: WireStats, **kw: Any) -> None:
        super().__init__(**kw)
        self._stats = stats

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        assert isinstance(data, bytes)
        cid_len = self._configuration.connection_id_length
        if len(data) < 1 + cid_len or not data[0] & 0x40:
            self._stats.garbage_datagrams += 1  # too short, or the QUIC fixed bit is clear
            return
        if not data[0] & 0x80:
            # Short header (all traffic after the handshake): the destination connection id
            # follows the first byte. Hand the datagram straight to its connection — what
            # aioquic would do after parsing the header, without parsing it.
            protocol = self._protocols.get(data[1 : 1 + cid_len])
            if protocol is None:
                self._stats.unknown_connection_datagrams += 1
                return
            protocol.datagram_received(data, addr)
            return
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=cid_len)
        except ValueError:
            self._stats.garbage_datagrams += 1
            return
        if (
            header.destination_cid not in self._protocols
            and header.packet_type != QuicPacketType.INITIAL
        ):
            self._stats.unknown_connection_datagrams += 1
            return
        super().datagram_received(data, addr)


class LinkPool:
    """Links by peer node id: get-or-dial (one shared dial), LRU bound, idle reaper, back-off.

    Bound: ``config.max_links``.  A new link beyond it evicts the least recently used idle
    link (closed with CLOSE_EVICTED, counted); if none is idle, ``get`` raises LinkError
    (counted as drops["pool_full"]).  Endpoints that fail to dial are remembered in a
    ``TTLCache`` (``backoff_table`` entries, LRU) with exponential back-off; ``get`` during a
    back-off raises ``DialError`` at once.
    """

    def __init__(self, endpoint: WireEndpoint) -> None:
        self.endpoint = endpoint
        self.cfg = endpoint.config
        self._links: OrderedDict[bytes, PeerLink] = OrderedDict()
        self._backoff: TTLCache = TTLCache(self.cfg.backoff_table, self.cfg.backoff_max * 4)
        self._ticker: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    def __len__(self) -> int:
        return len(self._links)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._links

    def links(self) -> list[PeerLink]:
        return list(self._links.values())

    def peek(self, peer_id: bytes) -> PeerLink | None:
        return self._links.get(peer_id)

    def link(self, peer_id: bytes, addr: tuple[str, int] | None = None) -> PeerLink:
        """The link to ``peer_id`` (created, not yet dialled, if new); LRU-touched."""
        if len(peer_id) != ident.NODE_ID_SIZE:
            raise ValueError(f"node id must be {ident.NODE_ID_SIZE} bytes, not {len(peer_id)}")
        if peer_id == self.endpoint.identity.node_id:
            raise ValueError("cannot link to this node itself")
        link = self._links.get(peer_id)
        if link is not None and not link.closed:
            self._links.move_to_end(peer_id)
            if addr is not None and link.addr != addr:
                link.addr = addr
            link.last_used = self._loop.time()
            return link
        self._make_room()
        link = PeerLink(self.endpoint, peer_id, addr)
        self._links[peer_id] = link
        return link

    async def get(self, peer_id: bytes, addr: tuple[str, int] | None = None) -> PeerLink:
        """The connected link to ``peer_id``, dialling ``addr`` if needed (callers asking for
        the same peer at once share one dial).  Raises DialError."""
        link = self.link(peer_id, addr)
        if link.is_open:
            return link
        wait = self.backoff_remaining(peer_id)
        if wait > 0 and link._dial_task is None:
            raise DialError(f"{peer_id.hex()[:12]} failed recently; next dial in {wait:.2f} s")
        await link.connected()
        return link

    # -- bounds ---------------------------------------------------------------------------

    def _make_room(self) -> None:
        while len(self._links) >= self.cfg.max_links:
            for link in self._links.values():
                if link.idle():
                    self.evict(link, "pool full: least recently used idle link")
                    break
            else:
                self.endpoint.stats.drops["pool_full"] += 1
                raise LinkError(f"link pool full ({self.cfg.max_links} links, none idle)")

    def evict(self, link: PeerLink, reason: str) -> None:
        self.endpoint.stats.evictions += 1
        self._forget(link)
        link.close(m.CLOSE_EVICTED, reason)

    def _forget(self, link: PeerLink) -> None:
        if self._links.get(link.peer_id) is link:
            del self._links[link.peer_id]

    # -- back-off -------------------------------------------------------------------------

    def backoff_remaining(self, peer_id: bytes) -> float:
        entry = self._backoff.get(peer_id)
        if entry is None:
            return 0.0
        return max(0.0, float(entry[1]) - self._loop.time())

    def note_failure(self, peer_id: bytes) -> None:
        self.endpoint.stats.dial_failures += 1
        entry = self._backoff.get(peer_id)
        failures = 1 if entry is None else entry[0] + 1
        wait = min(self.cfg.backoff_max, self.cfg.backoff_initial * 2 ** (failures - 1))
        self._backoff.put(peer_id, (failures, self._loop.time() + wait))

    def note_success(self, peer_id: bytes) -> None:
        self._backoff.pop(peer_id)

    # -- inbound --------------------------------------------------------------------------

    def _attach_inbound(self, conn: _Conn) -> None:
        assert conn.peer_id is not None
        try:
            link = self.link(conn.peer_id, conn.peer_listen)
        except (LinkError, ValueError) as exc:
            conn.fail(m.CLOSE_PROTOCOL if isinstance(exc, ValueError) else m.CLOSE_EVICTED,
                      str(exc))
            return
        link._attach(conn)

    # -- upkeep ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._ticker is None:
            self._ticker = self._loop.call_later(self.cfg.tick, self._tick)

    def _tick(self) -> None:
        now = self._loop.time()
        idle_limit = self.cfg.link_idle_timeout
        for link in list(self._links.values()):
            link._tick(now)
            if link.idle() and now - link.last_used > idle_limit:
                self.evict(link, "idle")
        self._ticker = self._loop.call_later(self.cfg.tick, self._tick)

    def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        for link in list(self._links.values()):
            link.close(m.CLOSE_SHUTDOWN, "node stopping")
        self._links.clear()


class WireEndpoint:
    """A node's QUIC endpoint: listener (unless ``client_mode``), dialler, pool, counters."""

    def __init__(
        self,
        identity: ident.NodeIdentity,
        *,
        handler: WireHandler | None = None,
        config: WireConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        realm: str = "default",
        realm_secret: bytes | None = None,
        realms: dict[str, bytes | None] | None = None,
        client_mode: bool = False,
        advertise: tuple[str, int] | None = None,
    ) -> None:
        self.identity = identity
        self.handler = handler or WireHandler()
        self.config = config or WireConfig()
        self.host = host
        self.port = port
        self.realm = realm  # the realm this node joins when it dials
        self.realm_secret = realm_secret
        # realms accepted from dialers (name -> secret or None for an open realm)
        self.realms = dict(realms) if realms is not None else {realm: realm_secret}
        self.client_mode = client_mode
        self._advertise = advertise
        self.stats = WireStats()
        self.pool: LinkPool
        self._transport: asyncio.DatagramTransport | None = None
        self._server: _Server | None = None
        self._started = False

    @property
    def listen_address(self) -> tuple[str, int] | None:
        """Where peers dial this node (None in client mode)."""
        if self.client_mode or self._transport is None:
            return None
        if self._advertise is not None:
            return self._advertise
        return (self.host, self.port)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.pool = LinkPool(self)
        if not self.client_mode:
            server = _Server(
                stats=self.stats,
                configuration=server_configuration(self.identity, self.config),
                create_protocol=partial(_Conn, endpoint=self),
            )
            transport, _ = await loop.create_datagram_endpoint(
                lambda: server, local_addr=(self.host, self.port)
            )
            self._server = server
            self._transport = transport
            self.port = transport.get_extra_info("sockname")[1]
        self.pool.start()
        self._started = True

    def stats_snapshot(self) -> dict[str, Any]:
        """The counters, plus the gauges: links in the pool and how many are connected."""
        out = self.stats.snapshot()
        links = self.pool.links() if self._started else []
        out["links"] = len(links)
        out["links_open"] = sum(1 for link in links if link.is_open)
        out["links_buffered_bytes"] = sum(link.buffered() for link in links)
        return out

    async def connect_seed(self, addr: tuple[str, int]) -> PeerLink:
        """Dial an endpoint whose node id is not known yet (a bootstrap seed): the id is
        taken from the server's certificate, and the link joins the pool under it."""
        conn = await self.dial(None, addr)
        assert conn.expected is not None
        link = self.pool.link(conn.expected, addr)
        link._attach(conn)
        return link

    async def dial(self, peer_id: bytes | None, addr: tuple[str, int]) -> _Conn:
        """A new admitted connection to ``peer_id`` at ``addr`` (no pooling: see LinkPool);
        ``peer_id`` None accepts whichever node answers (see ``connect_seed``)."""
        loop = asyncio.get_running_loop()
        self.stats.dials += 1
        infos = await loop.getaddrinfo(addr[0], addr[1], type=socket.SOCK_DGRAM)
        family, _, _, _, sockaddr = infos[0]
        local = ("0.0.0.0", 0) if family == socket.AF_INET else ("::", 0)
        quic = QuicConnection(configuration=client_configuration(self.config))
        transport, conn = await loop.create_datagram_endpoint(
            lambda: _Conn(quic, endpoint=self, expected=peer_id), local_addr=local, family=family
        )
        conn.connect(sockaddr)
        try:
            await asyncio.wait_for(asyncio.shield(conn.admitted), self.config.dial_timeout)
        except asyncio.TimeoutError:
            conn.fail(m.CLOSE_HANDSHAKE_TIMEOUT, "dial timed out")
            transport.close()
            raise DialError(
                f"dial to {addr} timed out after {self.config.dial_timeout} s"
            ) from None
        except BaseException:
            if conn.state != CLOSED:
                conn.fail(m.CLOSE_NORMAL, "dial abandoned")
            transport.close()
            raise
        assert conn.state == OPEN
        return conn

    async def close(self) -> None:
        """Close every link (GOAWAY-free: QUIC CONNECTION_CLOSE with CLOSE_SHUTDOWN), stop."""
        if not self._started:
            return
        self._started = False
        self.pool.close()
        if self._server is not None:
            for proto in set(self._server._protocols.values()):
                if isinstance(proto, _Conn) and proto.state != CLOSED:
                    proto.fail(m.CLOSE_SHUTDOWN, "node stopping")
            self._server._protocols.clear()
        await asyncio.sleep(0)  # let the CONNECTION_CLOSE datagrams leave
        if self._transport is not None:
            self._transport.close()
            self._transport = None
