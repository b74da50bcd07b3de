"""The DHT on the peer wire: ``Dht`` runs a ``DhtCore`` over a ``WireEndpoint``'s links.

The driver is thin glue (docs/DHT.md):

* the core's ``SendRequest(rid, contact, msg)`` becomes one task: get the link
  (``LinkPool.get(node_id, (host, port))``, dialling if needed), ``link.request(kind,
  msgpack(msg), timeout)``, decode the reply, then ``core.receive_response`` — or
  ``core.receive_failure`` for a dial error, a remote error, a timeout or an undecodable
  reply. The core's own per-query timeout (``query_timeout``) decides first; the wire's
  request timeout is set a second later so that the link does not leak the request.
* a peer's request (``WireHandler.on_request`` with a kind in 0x10-0x1F) is decoded and
  answered by ``core.receive_request`` synchronously; the sender is the link's
  authenticated peer id at its advertised listen address (``link.addr``; none: client mode).
* one ``loop.call_at`` timer follows ``core.get_timer()``.
* a link closed by its peer with ``shutdown`` (the peer is stopping) removes the peer from
  the routing table at once (``core.peer_gone``).

The clock is ``loop.time()``. Everything else — lookups, retries, eviction, records,
republish, refresh — is the core's.

Seeds for ``bootstrap`` are ``(node_id, (host, port))`` pairs (the wire pins the peer by
that id when it dials), or bare ``(host, port)`` addresses, dialled with
``WireEndpoint.connect_seed``, which takes the node id from the server's certificate.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import msgspec

from macula.dht import messages as dm
from macula.dht.core import (
    DhtConfig,
    DhtCore,
    KeyChanged,
    LookupDone,
    SendRequest,
    StoreDone,
)
from macula.dht.messages import Contact, Record
from macula.wire import (
    AdmissionError,
    LinkError,
    NodeIdentity,
    PeerLink,
    RequestRejected,
    WireConfig,
    WireEndpoint,
    WireHandler,
)
from macula.wire import messages as wm

#: the RESP status for a DHT request that cannot be decoded (application range)
STATUS_BAD_REQUEST = 0x10


class Dht(WireHandler):
    """A DHT node: a ``WireEndpoint`` (its own, or one passed in) and a ``DhtCore``.

    ::

        dht = Dht(NodeIdentity.generate(), port=0)
        await dht.start()
        await dht.bootstrap([(seed_id, ("10.0.0.1", 4433))])
        await dht.put(dht_key("realm", "sub", "sensors"), b"...", ttl=600)
        values = await dht.get(dht_key("realm", "sub", "sensors"))
        await dht.close()

    With ``endpoint=`` the endpoint's own handler must pass DHT request kinds
    (``messages.KINDS``) to ``Dht.on_request`` and link-downs to ``Dht.on_link_down``.
    """

    def __init__(
        self,
        identity: NodeIdentity | None = None,
        *,
        endpoint: WireEndpoint | None = None,
        config: DhtConfig | None = None,
        wire: WireConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        realm: str = "default",
        realm_secret: bytes | None = None,
        client_mode: bool = False,
        advertise: tuple[str, int] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if endpoint is None:
            if identity is None:
                raise TypeError("Dht needs an identity or an endpoint")
            endpoint = WireEndpoint(identity, handler=self, config=wire, host=host, port=port,
                                    realm=realm, realm_secret=realm_secret,
                                    client_mode=client_mode, advertise=advertise)
            self._owns_endpoint = True
        else:
            self._owns_endpoint = False
        self.endpoint = endpoint
        self.config = config or DhtConfig()
        self._rng = rng
        self._core: DhtCore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._waiters: dict[int, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._wire_timeout = self.config.query_timeout + 1.0
        # told when a value this node holds changed and some nodes watch its key (the layer
        # above delivers the news: the DHT has no one-way messages of its own)
        self.on_key_changed: Callable[[KeyChanged], None] = lambda change: None

    # -- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        if self._owns_endpoint:
            await self.endpoint.start()
        self._core = DhtCore(self.endpoint.identity.node_id, config=self.config,
                             now=loop.time(), rng=self._rng,
                             client_mode=self.endpoint.listen_address is None)
        self._arm()

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for t in list(self._tasks):
            t.cancel()
        for fut in self._waiters.values():
            if not fut.done():
                fut.cancel()
        self._waiters.clear()
        if self._owns_endpoint:
            await self.endpoint.close()
        self._core = None

    @property
    def core(self) -> DhtCore:
        if self._core is None:
            raise RuntimeError("the DHT is not started (await dht.start())")
        return self._core

    @property
    def node_id(self) -> bytes:
        return self.endpoint.identity.node_id

    @property
    def contact(self) -> Contact:
        """This node as a contact (port 0 in client mode)."""
        addr = self.endpoint.listen_address
        return Contact(self.node_id, addr[0], addr[1]) if addr else Contact(self.node_id, "", 0)

    @property
    def seed(self) -> tuple[bytes, tuple[str, int]]:
        """This node as a bootstrap seed for others."""
        addr = self.endpoint.listen_address
        if addr is None:
            raise ValueError("a node in client mode cannot be a seed")
        return (self.node_id, addr)

    def stats(self) -> dict[str, int]:
        return self.core.snapshot_stats()

    # -- the API --------------------------------------------------------------------------

    async def bootstrap(
        self, seeds: Iterable[tuple[bytes, tuple[str, int]] | tuple[str, int]]
    ) -> list[Contact]:
        """Join through ``seeds``: a self-lookup, then a refresh of the farther buckets.
        Returns our k closest neighbours. A seed is ``(node_id, (host, port))``, or a bare
        ``(host, port)`` whose node id is learnt by dialling it
        (``WireEndpoint.connect_seed``: the id of the certificate's key); a bare seed that
        cannot be reached is skipped."""
        contacts = []
        for seed in seeds:
            if isinstance(seed[0], bytes):
                nid, (host, port) = seed
                contacts.append(Contact(nid, host, port))
            else:
                host, port = seed
                try:
                    link = await self.endpoint.connect_seed((host, port))
                except (LinkError, AdmissionError, OSError, asyncio.TimeoutError):
                    continue
                contacts.append(Contact(link.peer_id, host, port))
        lid = self.core.bootstrap(contacts, self._now())
        done: LookupDone = await self._wait(lid)
        return done.contacts

    async def find_node(self, node_id: bytes) -> list[Contact]:
        """The k nodes closest to ``node_id`` (it first, if it is up), nearest first."""
        lid = self.core.start_lookup(node_id, now=self._now())
        done: LookupDone = await self._wait(lid)
        return done.contacts

    async def get_records(self, key: bytes, *, watch: bool = False) -> list[Record]:
        """The live records under ``key``: one per publisher. ``watch``: the nodes that
        answered report later changes (``on_key_changed``, see ``DhtCore``)."""
        lid = self.core.start_lookup(key, want_value=True, now=self._now(), watch=watch)
        done: LookupDone = await self._wait(lid)
        return done.records

    async def get(self, key: bytes, *, watch: bool = False) -> list[bytes]:
        """The values under ``key`` (one per publisher; [] if none)."""
        return [r.value for r in await self.get_records(key, watch=watch)]

    async def put(self, key: bytes, value: bytes, ttl: float | None = None) -> StoreDone:
        """Store ``value`` under ``key`` (as this node's value there) on the key's k closest
        nodes; it is republished until ``unpublish(key)``. Returns the store's tally."""
        op = self.core.put(key, value, ttl, now=self._now())
        done: StoreDone = await self._wait(op)
        return done

    def unpublish(self, key: bytes) -> bool:
        return self.core.unpublish(key)

    # -- wire handler ---------------------------------------------------------------------

    def on_request(self, link: PeerLink, kind: int, payload: bytes) -> bytes | Awaitable[bytes]:
        if kind not in dm.KINDS or self._core is None:
            return super().on_request(link, kind, payload)
        try:
            msg = dm.REQUEST_DECODER.decode(payload)
        except msgspec.DecodeError as exc:
            raise RequestRejected(STATUS_BAD_REQUEST, f"bad DHT request: {exc}") from None
        if dm.kind_of(msg) != kind:
            raise RequestRejected(STATUS_BAD_REQUEST, "DHT request kind and tag differ")
        addr = link.addr
        sender = (Contact(link.peer_id, addr[0], addr[1]) if addr is not None
                  else Contact(link.peer_id, "", 0))
        reply = self._core.receive_request(sender, msg, self._now())
        self._pump()
        return dm.ENCODER.encode(reply)

    def on_link_down(self, link: PeerLink, code: int, reason: str) -> None:
        if code == wm.CLOSE_SHUTDOWN and self._core is not None:
            self._core.peer_gone(link.peer_id)

    # -- the glue -------------------------------------------------------------------------

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    async def _wait(self, op_id: int) -> Any:
        assert self._loop is not None
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._waiters[op_id] = fut
        self._pump()
        try:
            return await fut
        finally:
            self._waiters.pop(op_id, None)

    def _pump(self) -> None:
        core = self._core
        if core is None:
            return
        loop = self._loop
        assert loop is not None
        while (a := core.next_action()) is not None:
            if type(a) is SendRequest:
                task = loop.create_task(self._request(a))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif type(a) is KeyChanged:
                self.on_key_changed(a)
            else:
                key = a.lookup_id if type(a) is LookupDone else a.op_id  # type: ignore[union-attr]
                fut = self._waiters.get(key)
                if fut is not None and not fut.done():
                    fut.set_result(a)
        self._arm()

    async def _request(self, a: SendRequest) -> None:
        c = a.contact
        reply: Any = None
        try:
            link = self.endpoint.pool.peek(c.node_id)
            if link is None or not link.is_open:
                link = await self.endpoint.pool.get(c.node_id, (c.host, c.port))
            data = await link.request(dm.kind_of(a.msg), dm.ENCODER.encode(a.msg),
                                      self._wire_timeout)
            reply = dm.REPLY_DECODER.decode(data)
        except (LinkError, AdmissionError, OSError, asyncio.TimeoutError, ValueError,
                msgspec.DecodeError):
            reply = None
        core = self._core
        if core is None:
            return
        if reply is None:
            core.receive_failure(a.rid, self._now())
        else:
            core.receive_response(a.rid, reply, self._now())
        self._pump()

    def _arm(self) -> None:
        core = self._core
        loop = self._loop
        if core is None or loop is None:
            return
        when = core.get_timer()
        if when is None:
            return
        if self._timer is not None:
            if self._timer_at == when:
                return
            self._timer.cancel()
        self._timer_at = when
        self._timer = loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._core is not None:
            self._core.handle_timer(self._now())
            self._pump()
