"""The DHT across real nodes: 20 ``Dht`` nodes in one process, each with its own
``WireEndpoint`` on a loopback port, talking real QUIC (aioquic) through the peer wire.

Covered: bootstrap from one seed; every node finds every other; put/get from random nodes
(100 % correct, several publishers per key); a third of the nodes killed (their endpoints
closed) and every value still found from every survivor, with the dead gone from every
routing table (the closed endpoints said goodbye: CONNECTION_CLOSE "shutdown"); then the
same with a third of 20 nodes in another process killed with SIGKILL, found dead by silence
alone (query timeouts, dead links, failed re-dials) and evicted after two failures each; a
node that stops answering DHT requests (remote errors) is evicted the same way; a
client-mode node can put and get but never enters a routing table; garbage payloads get an
error status.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import random
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from macula.dht import DhtConfig, dht_key
from macula.dht import messages as dm
from macula.dht.driver import STATUS_BAD_REQUEST, Dht
from macula.wire import NodeIdentity, RemoteError, WireConfig, WireHandler

ROOT = Path(__file__).resolve().parent.parent
N = 20
WIRE = WireConfig(dial_timeout=1.0, redial_attempts=1, max_datagram_size=16384)
CFG = DhtConfig(query_timeout=2.0, evict_after=2)  # generous: CI machines can be busy


def run(coro_fn: Callable[[], Awaitable[Any]], timeout: float = 50.0) -> Any:
    async def main() -> Any:
        return await asyncio.wait_for(coro_fn(), timeout)

    return asyncio.run(main())


async def make_mesh(n: int, *, seed_rng: int = 1) -> list[Dht]:
    nodes = [Dht(NodeIdentity.generate(), config=CFG, wire=WIRE,
                 rng=random.Random(seed_rng + i)) for i in range(n)]
    for d in nodes:
        await d.start()
    first = nodes[0]
    for d in nodes[1:]:
        await d.bootstrap([first.seed])
    return nodes


async def close_all(nodes: list[Dht]) -> None:
    for d in nodes:
        await d.close()


def test_twenty_nodes_find_store_and_survive_losing_a_third() -> None:
    async def scenario() -> None:
        nodes = await make_mesh(N)
        rng = random.Random(7)
        try:
            ids = {d.node_id for d in nodes}
            # every node finds every other
            for d in nodes:
                targets = [o.node_id for o in nodes if o is not d]
                found = await asyncio.gather(*(d.find_node(t) for t in targets))
                for t, contacts in zip(targets, found, strict=True):
                    assert contacts and contacts[0].node_id == t
                    assert {c.node_id for c in contacts} <= ids
            # each routing table holds every other node (k = 20 > 19)
            for d in nodes:
                assert set(d.core.table) == ids - {d.node_id}

            # put / get from random nodes: 100 % correct, two publishers on some keys
            expected: dict[bytes, dict[bytes, bytes]] = {}
            for i in range(30):
                key = dht_key("test", "rpc", f"proc.{i}")
                pubs = rng.sample(nodes, 2 if i % 3 == 0 else 1)
                for p in pubs:
                    value = f"{i}@{p.node_id.hex()[:8]}".encode()
                    done = await p.put(key, value, ttl=600.0)
                    # fewer than k = 20 others: all 19 take it, and the publisher keeps a copy
                    assert (done.stored, done.failed, done.refused) == (N, 0, 0)
                    expected.setdefault(key, {})[p.node_id] = value
            for key, want in expected.items():
                for getter in rng.sample(nodes, 5):
                    recs = await getter.get_records(key)
                    assert {r.publisher: r.value for r in recs} == want
            # a publisher's new value replaces its old one
            key0 = dht_key("test", "rpc", "proc.1")
            (pub0,) = [d for d in nodes if d.node_id in expected[key0]]
            await pub0.put(key0, b"replaced", ttl=600.0)
            expected[key0][pub0.node_id] = b"replaced"
            assert await nodes[(nodes.index(pub0) + 5) % N].get(key0) == [b"replaced"]

            # kill a third (not publishers, so that nobody's records stop being theirs)
            publishers = {p for want in expected.values() for p in want}
            victims = rng.sample([d for d in nodes if d.node_id not in publishers], N // 3)
            dead = {d.node_id for d in victims}
            for d in victims:
                await d.close()
            live = [d for d in nodes if d.node_id not in dead]
            await asyncio.sleep(0.2)  # let the CONNECTION_CLOSE datagrams arrive
            for key, want in expected.items():
                for getter in live:
                    recs = await getter.get_records(key)
                    assert {r.publisher: r.value for r in recs} == want
            for d in live:
                # a stopping node says goodbye on its links (CONNECTION_CLOSE: removed at
                # once); a goodbye lost on a busy machine (UDP) leaves the contact until
                # queries to it fail evict_after (2) times: lookups of the dead ids do that
                for _ in range(3):
                    if not set(d.core.table) & dead:
                        break
                    await asyncio.gather(*(d.find_node(t) for t in dead))
                assert not set(d.core.table) & dead, "a dead contact is still in a table"
                for contacts in await asyncio.gather(*(d.find_node(t) for t in dead)):
                    assert not {c.node_id for c in contacts} & dead
            nodes = live
        finally:
            await close_all(nodes)

    run(scenario)


# A process hosting some DHT nodes, killed with SIGKILL by the test: no goodbye at all.
VICTIMS = """
import asyncio, random, sys
from macula.dht import DhtConfig
from macula.dht.driver import Dht
from macula.wire import NodeIdentity, WireConfig

async def main():
    seed = (bytes.fromhex(sys.argv[1]), (sys.argv[2], int(sys.argv[3])))
    wire = WireConfig(dial_timeout=1.0, redial_attempts=1, max_datagram_size=16384)
    nodes = [Dht(NodeIdentity.generate(), config=DhtConfig(query_timeout=1.0), wire=wire,
                 rng=random.Random(i)) for i in range(int(sys.argv[4]))]
    for d in nodes:
        await d.start()
        await d.bootstrap([seed])
    for d in nodes:
        nid, (host, port) = d.seed
        print(nid.hex(), host, port, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_nodes_killed_without_a_word_are_evicted_by_failures() -> None:
    """A third of the nodes run in another process, killed with SIGKILL: the survivors learn
    it only from silence (no shutdown notice); values stay available and the dead leave
    every table after two failed queries each (evict_after = 2)."""

    async def scenario() -> None:
        nodes = await make_mesh(13, seed_rng=200)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        host, port = nodes[0].endpoint.listen_address or ("", 0)
        proc = subprocess.Popen(
            [sys.executable, "-c", VICTIMS, nodes[0].node_id.hex(), host, str(port), "7"],
            stdout=subprocess.PIPE, env=env, text=True)
        try:
            assert proc.stdout is not None
            loop = asyncio.get_running_loop()
            dead = set()
            for _ in range(7):
                line = await loop.run_in_executor(None, proc.stdout.readline)
                dead.add(bytes.fromhex(line.split()[0]))
            ids = {d.node_id for d in nodes} | dead
            for d in nodes:  # everyone learns everyone
                await asyncio.gather(*(d.find_node(t) for t in ids if t != d.node_id))
                assert set(d.core.table) == ids - {d.node_id}
            keys = [dht_key("test", "sub", f"k{i}") for i in range(12)]
            for i, key in enumerate(keys):
                done = await nodes[i % 13].put(key, b"v%d" % i, ttl=600.0)
                assert done.stored == N and done.failed == 0
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            for i, key in enumerate(keys):  # still found, from every survivor
                got = await asyncio.gather(*(d.get(key) for d in nodes))
                assert got == [[b"v%d" % i]] * len(nodes)
            for _ in range(CFG.evict_after):  # lookups that ask everyone, the dead included
                await asyncio.gather(*(d.find_node(os.urandom(32)) for d in nodes))
            for d in nodes:
                assert not set(d.core.table) & dead, "a dead contact is still in a table"
                assert d.core.stats["failures"] >= len(dead)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            await close_all(nodes)

    run(scenario)


def test_a_node_that_stops_answering_is_evicted_by_failures() -> None:
    async def scenario() -> None:
        nodes = await make_mesh(6, seed_rng=50)
        try:
            mute = nodes[3]
            # it stays connected but no longer serves DHT requests (status 1 for every one)
            mute.endpoint.handler = WireHandler()
            asker = nodes[0]
            assert mute.node_id in asker.core.table
            for _ in range(CFG.evict_after):
                contacts = await asker.find_node(mute.node_id)
                assert mute.node_id not in {c.node_id for c in contacts}
            assert mute.node_id not in asker.core.table
            assert asker.core.stats["failures"] >= CFG.evict_after
        finally:
            await close_all(nodes)

    run(scenario)


def test_client_mode_node_puts_and_gets_but_is_never_routed_to() -> None:
    async def scenario() -> None:
        nodes = await make_mesh(5, seed_rng=80)
        client = Dht(NodeIdentity.generate(), config=CFG, wire=WIRE, client_mode=True)
        await client.start()
        try:
            assert client.contact.port == 0
            with pytest.raises(ValueError, match="client mode"):
                _ = client.seed
            # a bare (host, port) seed: its node id is learnt from its certificate
            contacts = await client.bootstrap([nodes[0].endpoint.listen_address,
                                               ("127.0.0.1", 9)])  # the 2nd is unreachable
            assert {c.node_id for c in contacts} == {d.node_id for d in nodes}
            key = dht_key("test", "sub", "a/b")
            done = await client.put(key, b"from-client", ttl=60.0)
            assert done.stored == len(nodes)  # it keeps no copy itself
            assert await nodes[2].get(key) == [b"from-client"]
            assert await client.get(key) == [b"from-client"]
            for d in nodes:
                assert client.node_id not in d.core.table
            assert sum(d.core.stats["client_mode_peers"] for d in nodes) > 0
        finally:
            await client.close()
            await close_all(nodes)

    run(scenario)


def test_garbage_dht_requests_get_an_error_status() -> None:
    async def scenario() -> None:
        a, b = await make_mesh(2, seed_rng=90)
        try:
            link = await a.endpoint.pool.get(b.node_id, b.endpoint.listen_address)
            with pytest.raises(RemoteError) as err:
                await link.request(dm.KIND_FIND_NODE, b"\xc1garbage")
            assert err.value.status == STATUS_BAD_REQUEST
            with pytest.raises(RemoteError) as err:  # a PING payload under the STORE kind
                await link.request(dm.KIND_STORE, dm.ENCODER.encode(dm.Ping(1)))
            assert err.value.status == STATUS_BAD_REQUEST
            reply = await link.request(dm.KIND_PING, dm.ENCODER.encode(dm.Ping(42)))
            assert dm.REPLY_DECODER.decode(reply) == dm.Pong(42)
            assert b.core.stats["requests_in"] >= 1
        finally:
            await close_all([a, b])

    run(scenario)


def test_the_docs_example_runs() -> None:
    text = (ROOT / "docs" / "DHT.md").read_text()
    block = text.split("```python\n")[1].split("```")[0]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "docs/DHT.md", "exec"), {"__name__": "docs_example"})
    assert out.getvalue().splitlines() == ["3 [b'provider record']", "True"]
