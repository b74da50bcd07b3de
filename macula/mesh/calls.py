"""RPC across nodes, the I/O half (docs/MESH.md, "RPC across nodes").

``Calls`` belongs to a node's ``Mesh``: it advertises the procedures local clients provide
(DHT records under ``dht_key(realm, "rpc", procedure)``), calls providers on other nodes for
CALLs without a local provider (cached provider lists, strategies, failover, result cache:
the sans-IO parts are ``macula.mesh.rpc``), and serves CALLs from other nodes through the
broker (``Broker.invoke``). Client-mode providers are reached through their relay
(RELAY_REQ).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import msgspec

from macula.control.protocol import Err
from macula.dht.keys import dht_key
from macula.mesh import rpc
from macula.mesh.kinds import (
    ERR_OF_STATUS,
    KIND_CALL,
    KIND_RELAY_REQ,
    STATUS_APPLICATION_ERROR,
    STATUS_BAD_CALL,
    STATUS_NO_PROVIDER,
    STATUS_OF_ERR,
    STATUS_UNREACHABLE,
)
from macula.wire import (
    DialError,
    LinkClosed,
    LinkError,
    PeerLink,
    RemoteError,
    RequestLost,
    RequestRejected,
    RequestTimeout,
)

if TYPE_CHECKING:
    from macula.control.broker import Session
    from macula.mesh.service import Mesh

_enc = msgspec.msgpack.Encoder()
_CALL_DEC = msgspec.msgpack.Decoder(tuple[str, str, msgspec.Raw, int])


class Calls:
    """RPC across nodes: advertising providers, calling remote ones, serving calls."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        cfg = mesh.config
        self.providers = rpc.ProviderCache(self_id=mesh.node_id, ttl=cfg.provider_ttl,
                                           negative_ttl=0.5)
        self.selector = rpc.Selector(rng=mesh.rng)
        self.results = rpc.ResultCache(max_entries=cfg.result_cache_size)
        self._lookups: dict[tuple[str, str], asyncio.Future[list[rpc.ProviderRecord]]] = {}
        self._local: dict[tuple[str, str], tuple[str, bool, float]] = {}  # ours
        self._fetched: dict[tuple[str, str], float] = {}  # when each list was looked up
        self._last_stamp = 0  # of this node's latest provider record
        self.counters: Counter[str] = Counter()

    def advertise(self, realm: str, procedure: str, strategy: str, idempotent: bool,
                  cache_ttl: float) -> None:
        self._local[(realm, procedure)] = (strategy, idempotent, cache_ttl)
        # a stamp no earlier advertisement of this node had, before or after a restart
        # (only ever compared for equality: clocks need not agree between nodes)
        self._last_stamp = max(time.time_ns(), self._last_stamp + 1) & ((1 << 64) - 1)
        rec = rpc.ProviderRecord(self.mesh.node_id, self.mesh.listen_address, strategy,
                                 idempotent, cache_ttl, self.mesh.via, self._last_stamp)
        key = dht_key(realm, "rpc", procedure)
        self.mesh._spawn(self.mesh._put(key, rpc.encode_provider(rec),
                                        self.mesh.config.record_ttl))

    def readvertise(self) -> None:
        """Put every local provider record again (client mode: the relay changed)."""
        for (realm, procedure), (strategy, idem, ttl) in list(self._local.items()):
            self.advertise(realm, procedure, strategy, idem, ttl)

    def withdraw(self, realm: str, procedure: str) -> None:
        self._local.pop((realm, procedure), None)
        key = dht_key(realm, "rpc", procedure)
        # an empty value replaces ours on the storing nodes, then it is no longer republished
        self.mesh._spawn(self._withdraw(key))

    async def _withdraw(self, key: bytes) -> None:
        await self.mesh._put(key, b"", 60.0)
        with contextlib.suppress(RuntimeError):
            self.mesh.dht.unpublish(key)

    def forget_node(self, node: bytes) -> None:
        """The node is gone: its records are ignored as long as the mesh remembers it dead,
        except new registrations (it restarted; ``ProviderRecord.stamp``)."""
        self.providers.forget_node(node, self.mesh._now(), self.mesh.config.dead_node_ttl)

    def node_up(self, node: bytes) -> None:
        """A link to ``node`` came up (it restarted, or is reachable again): its records
        count again at once, and ``lowest_latency`` measures it afresh."""
        self.providers.readmit(node, self.mesh._now())
        self.selector.forget(node)

    def _cached_providers(self, realm: str, procedure: str) -> list[rpc.ProviderRecord] | None:
        """The cached provider list (refreshed in the background once it is
        ``min_interval`` old, so that new providers are seen soon), or None: look it up."""
        mesh = self.mesh
        now = mesh._now()
        key = (realm, procedure)
        cached = self.providers.get(realm, procedure, now)
        if cached is not None and now - self._fetched.get(key, now) >= \
                mesh.config.min_interval and key not in self._lookups:
            mesh._spawn(self._refresh(realm, procedure))
        return cached

    async def _refresh(self, realm: str, procedure: str) -> None:
        with contextlib.suppress(Exception):  # counted in _fetch; the old list stays
            await self._fetch(realm, procedure)

    async def _fetch(self, realm: str, procedure: str) -> list[rpc.ProviderRecord]:
        """One DHT lookup of the providers, shared by concurrent callers."""
        mesh = self.mesh
        key = (realm, procedure)
        fut = self._lookups.get(key)
        if fut is None:
            assert mesh._loop is not None
            fut = mesh._loop.create_future()
            self._lookups[key] = fut
            try:
                mesh.counters["dht_lookups_total"] += 1
                values = await mesh.dht.get(dht_key(realm, "rpc", procedure))
                recs = []
                for v in values:
                    rec = rpc.decode_provider(v) if v else None
                    if rec is None:
                        if v:
                            mesh.counters["bad_records_total"] += 1
                        continue
                    if (mesh._dead.get(rec.node_id) is not None
                            and not self.providers.is_new(rec, mesh._now())):
                        continue
                    mesh._learn(rec.node_id, rec.endpoint, rec.via)
                    recs.append(rec)
                fut.set_result(self.providers.put(realm, procedure, recs, mesh._now()))
                if len(self._fetched) >= 10_000:
                    self._fetched.clear()
                self._fetched[key] = mesh._now()
            except Exception as exc:  # handed to every waiter
                mesh.counters["dht_lookup_failures_total"] += 1
                fut.set_exception(exc)
            finally:
                self._lookups.pop(key, None)
        return list(await asyncio.shield(fut))

    async def call(self, s: Session, rid: int, realm: str, procedure: str, args: bytes,
                   timeout: float) -> None:
        mesh = self.mesh
        broker = mesh.broker
        loop = mesh._loop
        assert loop is not None
        deadline = loop.time() + timeout
        self.counters["calls_forwarded_total"] += 1
        try:
            try:
                recs = self._cached_providers(realm, procedure)
                if recs is None:
                    recs = await asyncio.wait_for(self._fetch(realm, procedure), timeout)
            except asyncio.TimeoutError:
                broker.call_done(s, rid, None, Err.CALL_TIMEOUT, "the call timed out")
                return
            except (LinkError, OSError, RuntimeError) as exc:
                broker.call_done(s, rid, None, Err.NO_PROVIDER,
                                 f"provider lookup for {procedure!r} failed: {exc}")
                return
            if not recs:
                broker.call_done(s, rid, None, Err.NO_PROVIDER,
                                 f"no provider for {procedure!r} in the mesh")
                return
            strategy = rpc.agreed_strategy(recs)
            cache_ttl = min(r.cache_ttl for r in recs)
            if cache_ttl > 0:
                hit = self.results.get(realm, procedure, args, loop.time())
                if hit is not None:
                    broker.call_done(s, rid, hit)
                    return
            plan = rpc.CallPlan(self._healthy_first(
                self.selector.order(realm, procedure, strategy, recs)),
                max_attempts=mesh.config.max_call_attempts, deadline=deadline)
            payload = _enc.encode((realm, procedure, msgspec.Raw(args or b"\xc0"),
                                   int(timeout * 1000)))
            code, last = Err.NO_PROVIDER, "no provider answered"
            while (rec := plan.next_target(loop.time())) is not None:
                t0 = loop.time()
                try:
                    data = await self._attempt(realm, procedure, rec, payload, deadline)
                except _Failed as f:
                    if f.final or not plan.on_failure(f.delivered, rec.idempotent, loop.time()):
                        if plan.gave_up == "deadline":
                            break
                        broker.call_done(s, rid, None, f.code, f.message)
                        return
                    self.counters["calls_failed_over_total"] += 1
                    if f.code is not Err.CALL_TIMEOUT:  # what the caller hears if none is left
                        code, last = f.code, f.message
                    continue
                self.selector.observe(rec.node_id, loop.time() - t0)
                if cache_ttl > 0:
                    self.results.put(realm, procedure, args, data, cache_ttl, loop.time())
                broker.call_done(s, rid, data)
                return
            if plan.gave_up == "deadline":
                broker.call_done(s, rid, None, Err.CALL_TIMEOUT, "the call timed out")
            else:
                broker.call_done(s, rid, None, code, last)
        except asyncio.CancelledError:
            if not s.closed:
                broker.call_done(s, rid, None, Err.SHUTDOWN, "node stopping")
            raise
        finally:
            mesh._flush_control()

    def _healthy_first(self, order: list[rpc.ProviderRecord]) -> list[rpc.ProviderRecord]:
        """``order`` with the providers whose link is down (lost, not back yet: the node
        may be dead) moved to the end, in their order: a call waits for a re-dial only
        when no other provider is left."""
        pool = self.mesh.endpoint.pool
        up: list[rpc.ProviderRecord] = []
        down: list[rpc.ProviderRecord] = []
        for rec in order:
            link = pool.peek(rec.node_id)
            (down if link is not None and link.connected_once and not link.is_open
             else up).append(rec)
        if not (up and down):
            return order
        self.counters["providers_down_last_total"] += len(down)
        return up + down

    async def _attempt(self, realm: str, procedure: str, rec: rpc.ProviderRecord,
                       payload: bytes, deadline: float) -> bytes:
        """One try of a call at ``rec``'s node (through its relay for a client-mode node).
        Raises ``_Failed`` saying whether the call may have been delivered, whether no
        other provider may be tried, and what the caller is told."""
        mesh = self.mesh
        loop = mesh._loop
        assert loop is not None
        pool = mesh.endpoint.pool
        delivered = False
        try:
            link = pool.peek(rec.node_id)
            kind, body = KIND_CALL, payload
            if (link is None or not link.is_open) and rec.endpoint is None:
                via = rec.via or mesh._vias.get(rec.node_id)  # its relay
                if via is None:
                    raise DialError("a client-mode provider without a relay")
                link = pool.peek(via[0])
                if link is None or not link.is_open:
                    link = await asyncio.wait_for(pool.get(via[0], via[1]),
                                                  deadline - loop.time())
                kind = KIND_RELAY_REQ
                body = _enc.encode((rec.node_id, mesh.config.max_hops, KIND_CALL, payload))
            elif link is None or not link.is_open:
                link = await asyncio.wait_for(pool.get(rec.node_id, rec.endpoint),
                                              deadline - loop.time())
            delivered = True  # from here a failure may be after delivery
            # a silent provider's node is probably dead: the call ends (or fails over) at once
            return await link.request(kind, body, deadline - loop.time(), fail_on_silence=True)
        except RemoteError as exc:
            if exc.status == STATUS_NO_PROVIDER:
                # a stale record (the node restarted, or its provider left without a
                # withdrawal): the node is alive, only this list forgets it; it never
                # reached an application, so another provider may be tried
                self.providers.drop(realm, procedure, rec.node_id, loop.time())
                raise _Failed(False, False, Err.NO_PROVIDER, exc.message) from None
            if exc.status == STATUS_UNREACHABLE:  # its relay cannot reach it
                self.providers.forget_node(rec.node_id, loop.time())
                raise _Failed(False, False, Err.NO_PROVIDER, exc.message) from None
            err = ERR_OF_STATUS.get(exc.status)
            if err is None:
                raise _Failed(True, False, Err.NO_PROVIDER, exc.message) from None
            # PROVIDER_GONE may go to another provider (if idempotent); the others are final
            raise _Failed(True, err is not Err.PROVIDER_GONE, err, exc.message) from None
        except (RequestTimeout, asyncio.TimeoutError):
            self.selector.failed(rec.node_id)
            raise _Failed(delivered, not delivered or deadline <= loop.time(),
                          Err.CALL_TIMEOUT, "the call timed out") from None
        except (LinkClosed, DialError, LinkError, OSError) as exc:
            self.selector.failed(rec.node_id)
            after = isinstance(exc, RequestLost)  # delivered, then the connection went
            if not after:
                self.providers.forget_node(rec.node_id, loop.time())
            raise _Failed(after, False, Err.PROVIDER_GONE,
                          f"provider unreachable: {exc}") from None

    def serve(self, link: PeerLink, payload: bytes) -> Awaitable[bytes]:
        """A CALL from another node for a local provider."""
        mesh = self.mesh
        try:
            realm, procedure, args, timeout_ms = _CALL_DEC.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            mesh.counters["bad_input_total"] += 1
            raise RequestRejected(STATUS_BAD_CALL, f"bad CALL: {exc}") from None
        loop = mesh._loop
        assert loop is not None
        fut: asyncio.Future[bytes] = loop.create_future()

        def done(result: bytes | None, err: Err | None, message: str) -> None:
            if fut.done():
                return
            if result is not None:
                fut.set_result(result)
            else:
                assert err is not None
                fut.set_exception(RequestRejected(
                    STATUS_OF_ERR.get(err, STATUS_APPLICATION_ERROR), message))

        broker = mesh.broker
        broker.now = loop.time()
        timeout = (timeout_ms / 1000.0) if timeout_ms > 0 else broker.limits.call_timeout
        if not broker.invoke(realm, procedure, bytes(args), timeout, done):
            raise RequestRejected(STATUS_NO_PROVIDER, f"no provider for {procedure!r} here")
        self.counters["calls_served_total"] += 1
        mesh._flush_control()
        return fut  # the wire answers when it is done (no task per call)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.counters)
        out["result_cache_hits_total"] = self.results.counters.get("hits", 0)
        return out


class _Failed(Exception):
    """One attempt of a call failed (``Calls._attempt``)."""

    def __init__(self, delivered: bool, final: bool, code: Err, message: str) -> None:
        super().__init__(message)
        self.delivered = delivered  # the provider may have got the call
        self.final = final  # answer the caller now: no other provider is tried
        self.code = code
        self.message = message
