"""The mesh inside real nodes (one process, one loop; real QUIC and ZeroMQ): the parts that
need a look inside a node — bad input from a peer, NOMATCH pruning, shards behind the
mesh, RPC result caching, the metrics. The 5-node tests in separate processes are in
tests/test_mesh_nodes.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest

from macula.client import Client, PubackReason, RemoteError
from macula.config import NodeConfig
from macula.control.protocol import Err
from macula.mesh import service as ms
from macula.node import Node
from macula.wire import NodeIdentity, PeerLink, WireEndpoint, WireHandler
from tests.mesh_util import eventually


def _cfg(**kw: Any) -> NodeConfig:
    base: dict[str, Any] = dict(endpoints=["tcp://127.0.0.1:0"], metrics_port=-1, mesh_port=0,
                                shards=0, tick_interval=0.02)
    base.update(kw)
    return NodeConfig(**base)


async def _until(pred: Callable[[], Any], timeout: float = 10.0,
                 what: str = "condition") -> None:
    await eventually(pred, timeout, every=0.02, what=what)


async def _visible(pub: Client, topic: str, got: list[Any]) -> None:
    """Publish probes on ``topic`` until one arrives (the subscription is routed to)."""
    for _ in range(100):
        await pub.publish(topic, b"probe", qos=1)
        await asyncio.sleep(0.1)
        if got:
            await asyncio.sleep(0.2)
            got.clear()
            return
    raise AssertionError("the subscription never became visible to the publisher")


async def _pub_sub(a: Node, b: Node, flt: str, probe: str,
                   qos: int = 0) -> tuple[Client, Client, list[bytes]]:
    """A publisher on ``a``, a subscriber to ``flt`` on ``b`` collecting payloads, once the
    subscription is routed to (probes on ``probe`` arrived)."""
    pub = await Client.connect(a.endpoints[0])
    subc = await Client.connect(b.endpoints[0])
    got: list[bytes] = []
    await subc.subscribe(flt, qos=qos, callback=lambda m: got.append(m.payload))
    await _visible(pub, probe, got)
    return pub, subc, got


async def _connect(*nodes: Node) -> list[Client]:
    """One client on each node, in order."""
    return [await Client.connect(n.endpoints[0]) for n in nodes]


async def _first_call(caller: Client, procedure: str, args: Any) -> Any:
    """Call until the provider's record is in the DHT (NO_PROVIDER until then)."""
    for _ in range(50):
        try:
            return await caller.call(procedure, args, timeout=3)
        except RemoteError as exc:
            if exc.code is not Err.NO_PROVIDER:
                raise
            await asyncio.sleep(0.1)
    raise AssertionError(f"{procedure!r} was never reached")


def _mesh(*cfgs: NodeConfig) -> Callable[[Callable[..., Awaitable[None]]], None]:
    """Run ``body(*nodes)`` with nodes started from ``cfgs`` (each later one seeded with the
    first node's mesh address), always stopping them."""

    def run(body: Callable[..., Awaitable[None]]) -> None:
        async def main() -> None:
            nodes: list[Node] = []
            try:
                for i, cfg in enumerate(cfgs):
                    if i:
                        cfg.seeds = [nodes[0].mesh_address]
                    n = Node(cfg)
                    await n.start()
                    nodes.append(n)
                await body(*nodes)
            finally:
                for n in reversed(nodes):
                    await n.stop()

        asyncio.run(main())

    return run


def test_a_node_alone_answers_no_subscribers_at_once() -> None:
    @_mesh(_cfg())
    async def body(a: Node) -> None:
        c = await Client.connect(a.endpoints[0])
        assert await c.publish("nobody/here", b"x", qos=1) is PubackReason.NO_SUBSCRIBERS
        stats = (await c.stats())["mesh"]
        assert stats["messages_forwarded_total"] == 0 and stats["pending"] == 0
        await c.close()


class _Peer(WireHandler):
    def __init__(self) -> None:
        self.msgs: list[tuple[int, bytes]] = []

    def on_message(self, link: PeerLink, kind: int, payload: bytes) -> None:
        self.msgs.append((kind, payload))


def test_bad_input_from_a_peer_is_refused_with_a_reason_and_the_node_serves_on() -> None:
    @_mesh(_cfg(), _cfg())
    async def body(a: Node, b: Node) -> None:
        assert a.mesh is not None
        pub, subc, got = await _pub_sub(a, b, "ok/#", "ok/x")
        # a peer node of the same network that sends garbage
        peer = _Peer()
        ep = WireEndpoint(NodeIdentity.generate(), handler=peer, realm="macula")
        await ep.start()
        try:
            host, port = a.mesh_address.split(":")
            link = await ep.connect_seed((host, int(port)))
            enc = msgspec.msgpack.encode
            link.send_nowait(ms.KIND_PUB, b"\xc1 not msgpack")
            link.send_nowait(ms.KIND_PUB, enc(("default", 1, 0, [[0, "a/+/b", b"x", []]])))
            link.send_nowait(ms.KIND_PUB, enc(("default", 1, 0, [[7, "", b"x", []]])))
            link.send_nowait(ms.KIND_ACK, enc("not a list"))
            link.send_nowait(0x2F, b"")
            await _until(lambda: len([k for k, _ in peer.msgs if k == ms.KIND_ERROR]) >= 5,
                         what="five ERROR replies")
            errors = [msgspec.msgpack.decode(p) for k, p in peer.msgs if k == ms.KIND_ERROR]
            assert [e[0] for e in errors] == [ms.KIND_PUB, ms.KIND_PUB, ms.KIND_PUB,
                                              ms.KIND_ACK, 0x2F]
            assert "malformed message of kind 0x20" in errors[0][1]
            assert "invalid topic 'a/+/b'" in errors[1][1]
            assert "invalid topic ''" in errors[2][1]
            assert "unknown message kind 0x2f" in errors[4][1]
            # the refused QoS 1 message is acknowledged (never re-sent) and not delivered
            acks = [msgspec.msgpack.decode(p) for k, p in peer.msgs if k == ms.KIND_ACK]
            assert [1, [7], []] in acks
            assert (await pub.stats())["mesh"]["bad_input_total"] == 5
            assert link.is_open  # the link stays up
        finally:
            await ep.close()
        # everyone else is served as before
        await pub.publish("ok/after", b"after", qos=1)
        await _until(lambda: b"after" in got, what="delivery after the bad input")
        await pub.close()
        await subc.close()


def test_nomatch_prunes_the_route_until_discovery_changes() -> None:
    # the publisher's node does not refresh (min interval 60 s): only NOMATCH can prune
    @_mesh(_cfg(mesh_min_interval=60.0), _cfg())
    async def body(a: Node, b: Node) -> None:
        pub = await Client.connect(a.endpoints[0])
        subc = await Client.connect(b.endpoints[0])
        got: list[bytes] = []
        sub = await subc.subscribe("news/#", callback=lambda m: got.append(m.payload))
        # A looks up once only: let B's record be stored first
        await _until(lambda: b.stats()["mesh"]["dht_puts_total"] >= 1, what="B advertised")
        await asyncio.sleep(0.5)
        await _visible(pub, "news/x", got)
        await subc.unsubscribe(sub)
        before = (await pub.stats())["mesh"]
        for _ in range(5):
            await pub.publish("news/x", b"after", qos=0)
            await asyncio.sleep(0.05)
        await _until(lambda: a.stats()["mesh"]["pruned_total"] >= 1, what="route pruned")
        mid = (await pub.stats())["mesh"]
        for _ in range(20):
            await pub.publish("news/x", b"again")
        await asyncio.sleep(0.3)
        after = (await pub.stats())["mesh"]
        assert got == []
        assert mid["messages_forwarded_total"] > before["messages_forwarded_total"]
        assert after["messages_forwarded_total"] == mid["messages_forwarded_total"]
        assert b.stats()["mesh"]["nomatch_sent_total"] >= 1
        await pub.close()
        await subc.close()


def test_qos1_into_a_node_with_shards_is_acked_after_the_shards_delivered() -> None:
    @_mesh(_cfg(), _cfg(shards=1))
    async def body(a: Node, b: Node) -> None:
        pub, subc, got = await _pub_sub(a, b, "jobs/+", "jobs/probe", qos=1)
        await asyncio.gather(*(pub.publish(f"jobs/{i % 3}", b"%d" % i, qos=1)
                               for i in range(300)))
        await _until(lambda: len(got) >= 300, what="300 deliveries")
        await _until(lambda: a.stats()["mesh"]["qos1_inflight"] == 0, what="all acked")
        await asyncio.sleep(0.5)
        assert sorted(int(x) for x in got) == list(range(300))
        assert a.stats()["mesh"]["qos1_resent_total"] == 0
        await pub.close()
        await subc.close()


def test_rpc_results_are_cached_per_arguments_when_the_registration_allows() -> None:
    @_mesh(_cfg(), _cfg())
    async def body(a: Node, b: Node) -> None:
        caller = await Client.connect(a.endpoints[0])
        prov = await Client.connect(b.endpoints[0])
        calls: list[Any] = []

        def square(x: int) -> int:
            calls.append(x)
            return x * x

        await prov.register("square", square, cache_ttl=30.0)
        await prov.register("square_fresh", square)
        assert await _first_call(caller, "square", 3) == 9
        calls.clear()
        assert [await caller.call("square", 4) for _ in range(3)] == [16, 16, 16]
        assert calls == [4]  # one invocation, two answers from the cache
        assert await caller.call("square", 5) == 25
        assert calls == [4, 5]
        assert [await caller.call("square_fresh", 4) for _ in range(2)] == [16, 16]
        assert calls == [4, 5, 4, 4]
        stats = (await caller.stats())["mesh"]
        assert stats["result_cache_hits_total"] >= 2
        with pytest.raises(RemoteError) as err:
            await caller.call("nothing.here", 1, timeout=5)
        assert err.value.code is Err.NO_PROVIDER
        await caller.close()
        await prov.close()


def test_metrics_serve_the_mesh_figures() -> None:
    @_mesh(_cfg(metrics_port=0), _cfg())
    async def body(a: Node, b: Node) -> None:
        pub, subc, got = await _pub_sub(a, b, "m/#", "m/x")
        for i in range(100):
            pub.publish_nowait("m/x", b"%d" % i)
        await _until(lambda: len(got) >= 100, what="100 deliveries")
        reader, writer = await asyncio.open_connection("127.0.0.1", a.metrics_port)
        writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
        text = (await reader.read()).decode().split("\r\n\r\n", 1)[1]
        writer.close()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, v = line.rpartition(" ")
                values[name] = float(v)
        assert values["macula_mesh_messages_forwarded_total"] >= 100
        assert values["macula_mesh_route_hits_total"] >= 99
        assert 0 < values["macula_mesh_route_hit_ratio"] <= 1
        assert values["macula_mesh_dht_queries_total"] >= 1
        assert values["macula_mesh_dht_lookups_total"] >= 1
        assert values["macula_mesh_discovery_latency_p50_ms"] > 0
        assert values["macula_mesh_publish_to_send_p50_ms"] >= 0
        assert values["macula_mesh_links_open"] >= 1
        assert values["macula_node_resident_bytes"] > 1e6
        await pub.close()
        await subc.close()


def test_a_client_mode_node_is_reached_through_its_relay() -> None:
    # A and B listen; C is in client mode (cannot be dialled) and keeps a link to A
    @_mesh(_cfg(), _cfg(), _cfg(client_mode=True))
    async def body(a: Node, b: Node, c: Node) -> None:
        assert a.mesh is not None and b.mesh is not None and c.mesh is not None
        assert c.mesh_address == "client"
        assert c.mesh.via is not None and c.mesh.via[0] == a.mesh.node_id
        pub = await Client.connect(b.endpoints[0])
        subc = await Client.connect(c.endpoints[0])
        got: list[bytes] = []
        await subc.subscribe("cm/#", qos=1, callback=lambda m: got.append(m.payload))
        await subc.register("cm.echo", lambda x: ["echo", x])
        await _visible(pub, "cm/probe", got)
        assert await _first_call(pub, "cm.echo", 0) == ["echo", 0]
        # C's DHT traffic dialled B, so the two could talk on that link; once it goes
        # (idle links are reaped; here both ends drop it and C forgets B's address), B
        # can only reach C through A, and C answers B through A too
        for x, y in ((b, c), (c, b)):
            assert x.mesh is not None and y.mesh is not None
            link = x.mesh.endpoint.pool.peek(y.mesh.node_id)
            if link is not None:
                x.mesh.endpoint.pool.evict(link, "test: as if reaped")
        c.mesh._addrs.pop(b.mesh.node_id, None)
        await asyncio.sleep(0.2)
        relayed = a.stats()["mesh"]["relayed_total"]
        await asyncio.gather(*(pub.publish(f"cm/{i % 4}", b"%d" % i, qos=1)
                               for i in range(200)))
        await _until(lambda: len(got) >= 200, what="200 relayed deliveries")
        assert await pub.call("cm.echo", 7, timeout=3) == ["echo", 7]
        await _until(lambda: b.stats()["mesh"]["qos1_inflight"] == 0, what="acks came back")
        await asyncio.sleep(0.3)
        assert sorted(int(x) for x in got) == list(range(200))
        # B cannot dial C: the messages, the call and C's acknowledgements went through A
        assert a.stats()["mesh"]["relayed_total"] >= relayed + 3
        await pub.close()
        await subc.close()


def test_relays_refuse_beyond_the_hop_limit_and_unknown_targets() -> None:
    @_mesh(_cfg(), _cfg(client_mode=True))
    async def body(a: Node, c: Node) -> None:
        assert a.mesh is not None and c.mesh is not None
        peer = _Peer()
        ep = WireEndpoint(NodeIdentity.generate(), handler=peer, realm="macula")
        await ep.start()
        try:
            host, port = a.mesh_address.split(":")
            link = await ep.connect_seed((host, int(port)))
            enc = msgspec.msgpack.encode
            pub = enc(("default", [[0, "x/y", b"z", []]]))
            me = ep.identity.node_id
            link.send_nowait(ms.KIND_RELAY, enc((me, c.mesh.node_id, 0, ms.KIND_PUB, pub)))
            link.send_nowait(ms.KIND_RELAY, enc((me, b"\x07" * 32, 2, ms.KIND_PUB, pub)))
            spoofed = (b"\x08" * 32, c.mesh.node_id, 2, ms.KIND_PUB, pub)  # not the sender
            link.send_nowait(ms.KIND_RELAY, enc(spoofed))
            await _until(lambda: len(peer.msgs) >= 3, what="three refusals")
            errors = [msgspec.msgpack.decode(p)[1] for k, p in peer.msgs if k == ms.KIND_ERROR]
            assert errors[0] == "hop limit reached"
            assert errors[1].startswith("no link to 070707")
            assert errors[2] == "a relayed message's origin must be its sender"
            assert a.stats()["mesh"]["relay_refused_total"] == 3
            with pytest.raises(Exception, match="hop limit reached"):
                await link.request(ms.KIND_RELAY_REQ,
                                   enc((c.mesh.node_id, 0, ms.KIND_CALL, b"\xc0")))
        finally:
            await ep.close()


def test_a_flood_is_held_back_not_dropped_when_the_link_is_full() -> None:
    # a small send buffer and backlog bound make the link the bottleneck at once
    @_mesh(_cfg(), _cfg())
    async def body(a: Node, b: Node) -> None:
        assert a.mesh is not None
        a.mesh.endpoint.config.send_buffer = 32 << 10
        a.mesh.config.backlog_high = 64 << 10
        pub, subc, got = await _pub_sub(a, b, "flood/#", "flood/x")
        n = 30_000
        for i in range(0, n, 1000):
            await pub.publish_many([("flood/x", b"%06d" % j + b"." * 100)
                                    for j in range(i, i + 1000)])
        await _until(lambda: len(got) >= n, 60, what=f"{n} deliveries")
        await asyncio.sleep(0.2)
        assert sorted(got) == [b"%06d" % j + b"." * 100 for j in range(n)]
        stats = a.stats()["mesh"]
        assert stats["congested_total"] >= 1  # the driver did stop reading the publisher
        assert stats["drops_total"] == {}
        assert stats["backlog_bytes"] == 0 and stats["congested"] == 0
        await pub.close()
        await subc.close()


def test_a_provider_registered_later_is_seen_within_the_refresh_interval() -> None:
    @_mesh(_cfg(), _cfg(), _cfg())
    async def body(a: Node, b: Node, c: Node) -> None:
        caller, pb, pc = await _connect(a, b, c)
        await pb.register("who", lambda _: "b")
        assert await _first_call(caller, "who", None) == "b"
        await pc.register("who", lambda _: "c")  # A's node has B's list cached now
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        seen = set()
        while "c" not in seen:
            seen.add(await caller.call("who", None, timeout=2))
            assert loop.time() - t0 < 10, "the new provider was never called"
            await asyncio.sleep(0.05)
        print(f"\nnew provider called {loop.time() - t0:.2f} s after it registered")
        for cl in (caller, pb, pc):
            await cl.close()


def test_lowest_latency_providers_are_preferred_across_nodes() -> None:
    @_mesh(_cfg(), _cfg(), _cfg())
    async def body(a: Node, b: Node, c: Node) -> None:
        caller, fast, slow = await _connect(a, b, c)

        async def slow_answer(_: Any) -> str:
            await asyncio.sleep(0.03)
            return "slow"

        await fast.register("lat", lambda _: "fast", strategy="lowest_latency")
        await slow.register("lat", slow_answer, strategy="lowest_latency")
        seen: list[str] = []
        for _ in range(100):  # until both records are in the DHT and both were measured
            try:
                seen.append(await caller.call("lat", None, timeout=2))
            except RemoteError:
                await asyncio.sleep(0.1)
            if "fast" in seen and "slow" in seen:
                break
        assert {"fast", "slow"} <= set(seen), seen  # unmeasured providers are tried
        later = [await caller.call("lat", None, timeout=2) for _ in range(30)]
        assert later.count("fast") >= 28, later  # then the measured-fastest one is used
        print(f"\nwarm-up answers {seen}, then {later.count('fast')} of 30 from the fast one")
        for cl in (caller, fast, slow):
            await cl.close()


def test_a_subscriber_node_that_restarts_receives_again(tmp_path: Any) -> None:
    async def main() -> None:
        a = Node(_cfg())
        await a.start()
        port = _free_udp_port()

        def b_cfg() -> NodeConfig:  # the same identity and address after the restart
            return _cfg(seeds=[a.mesh_address], data_dir=str(tmp_path / "b"), mesh_port=port)

        b = Node(b_cfg())
        await b.start()
        b_id = b.node_id
        try:
            pub, subc, got = await _pub_sub(a, b, "up/#", "up/probe")
            stop_publishing = asyncio.Event()

            async def publish_all_along() -> None:
                i = 0
                while not stop_publishing.is_set():
                    pub.publish_nowait("up/x", b"%d" % i)
                    i += 1
                    await asyncio.sleep(0.01)

            publisher = asyncio.ensure_future(publish_all_along())
            await _until(lambda: len(got) >= 10, what="deliveries before the restart")
            await subc.close()
            await b.stop()  # graceful: A hears the goodbye and forgets B
            await _until(lambda: a.stats()["mesh"]["nodes_gone_total"] >= 1, what="B gone")
            b = Node(b_cfg())
            await b.start()
            assert b.node_id == b_id
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            subc = await Client.connect(b.endpoints[0])
            again: list[bytes] = []
            await subc.subscribe("up/#", callback=lambda m: again.append(m.payload))
            await _until(lambda: again, 15, what="deliveries after the restart")
            print(f"\nreceiving again {loop.time() - t0:.2f} s after the restart")
            stop_publishing.set()
            await publisher
            await pub.close()
            await subc.close()
        finally:
            await b.stop()
            await a.stop()

    asyncio.run(main())


def _free_udp_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_burst_of_new_topics_runs_a_bounded_number_of_lookups_at_once() -> None:
    @_mesh(_cfg(), _cfg())
    async def body(a: Node, b: Node) -> None:
        assert a.mesh is not None
        pub, subc, got = await _pub_sub(a, b, "burst/#", "burst/probe")
        n = 2000  # 2,000 new topics: 4,000 anchors nobody looked up yet
        await pub.publish_many([(f"burst/{i}/x", b"%d" % i) for i in range(n)])
        await _until(lambda: len(got) >= n, 60, what=f"{n} deliveries")
        assert sorted(int(x) for x in got) == list(range(n))
        assert 1 < a.mesh.lookups_running_max <= a.mesh.config.max_lookups
        stats = a.stats()["mesh"]
        assert stats["dht_lookups_total"] >= 2 * n
        assert stats["lookups_in_flight"] == 0 and stats["lookups_waiting"] == 0
        assert stats["pending"] == 0 and stats["drops_total"] == {}
        await pub.close()
        await subc.close()


def test_errors_of_a_remote_provider_reach_the_caller_with_their_code() -> None:
    @_mesh(_cfg(), _cfg())
    async def body(a: Node, b: Node) -> None:
        caller, prov = await _connect(a, b)

        def fail(_: Any) -> None:
            raise ValueError("no such account")

        async def slow(_: Any) -> str:
            await asyncio.sleep(5)
            return "too late"

        await prov.register("fail", fail)
        await prov.register("slow", slow)
        with pytest.raises(RemoteError) as err:
            await _first_call(caller, "fail", 1)
        assert err.value.code is Err.APPLICATION_ERROR
        assert err.value.message == "no such account"
        with pytest.raises(RemoteError) as err:
            await caller.call("slow", None, timeout=0.5)
        assert err.value.code is Err.CALL_TIMEOUT
        for cl in (caller, prov):
            await cl.close()
