"""QoS 1 across nodes survives a killed link: no loss, no duplicate delivered.

Two real nodes (QUIC over loopback, ZeroMQ clients) in one process; a publisher on node A
streams numbered QoS 1 messages to a subscriber on node B, and the test kills the QUIC
connection between the nodes several times mid-stream:

* ``close``: the connection is closed at once (CONNECTION_CLOSE; what an idle-killing
  middlebox or a crashed peer's stack amounts to), frames in flight are lost;
* ``silent``: the dialler's UDP socket is closed without a word; the peer hears nothing
  and the liveness check has to find out.

Either way the link re-dials, re-sends what QUIC had not acknowledged, the publisher's
outbox re-sends what B had not acknowledged, and B's inbox drops repeats: the subscriber
sees every message exactly once.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from macula.client import Client
from macula.config import NodeConfig
from macula.control.broker import Limits
from macula.node import Node
from tests.mesh_util import eventually

N = 1500
KILLS_AT = (300, 700, 1100)


def _cfg(**kw: Any) -> NodeConfig:
    return NodeConfig(endpoints=["tcp://127.0.0.1:0"], metrics_port=-1, mesh_port=0, shards=0,
                      tick_interval=0.02, mesh_ack_timeout=0.3,
                      limits=Limits(ack_timeout=0.5, max_attempts=50), **kw)


def _kill(a: Node, b: Node, how: str) -> bool:
    """Kill the connection between the nodes; ``silent``: close the dialling side's own UDP
    socket (the listener's socket is shared by all its connections and stays)."""
    assert a.mesh is not None and b.mesh is not None
    for x, y in ((a, b), (b, a)):
        assert x.mesh is not None and y.mesh is not None
        link = x.mesh.endpoint.pool.peek(y.mesh.node_id)
        conn = link._conn if link is not None else None
        if conn is None:
            continue
        if how == "close":
            conn.fail(0x205, "test: link killed")
            return True
        if conn.is_client:
            assert conn._transport is not None
            conn._transport.close()
            return True
    return False


@pytest.mark.parametrize("how", ["close", "silent"])
def test_qos1_across_a_killed_link_no_loss_no_duplicate(how: str) -> None:
    async def main() -> None:
        a = Node(_cfg())
        await a.start()
        b = Node(_cfg(seeds=[a.mesh_address]))
        await b.start()
        try:
            pub = await Client.connect(a.endpoints[0])
            subc = await Client.connect(b.endpoints[0])
            got: list[int] = []
            await subc.subscribe("orders/#", qos=1,
                                 callback=lambda m: got.append(int(m.payload)))
            # discovery: publish probes until B's subscription is routed to
            probe = 0
            while not got:
                probe += 1
                await pub.publish("orders/probe", b"-1", qos=1)
                await asyncio.sleep(0.1)
                assert probe < 100, "B's subscription never became visible"
            await eventually(lambda: len(got) >= 1, 5, every=0.02)
            got.clear()
            await asyncio.sleep(0.5)  # late probes
            got.clear()
            kills = 0
            pending: list[asyncio.Future[Any]] = []
            for i in range(N):
                pending.append(asyncio.ensure_future(
                    pub.publish(f"orders/{i % 7}", str(i).encode(), qos=1)))
                if i in KILLS_AT:
                    await asyncio.sleep(0.01)
                    await eventually(lambda: _kill(a, b, how), 10, every=0.02)  # once one is up
                    kills += 1
                if i % 50 == 49:
                    await asyncio.sleep(0)
            await asyncio.gather(*pending)
            await eventually(lambda: len(set(got)) >= N, 30, every=0.02)
            await asyncio.sleep(1.0)  # room for late re-sends: they must not be delivered
            assert kills == len(KILLS_AT)
            assert sorted(got) == list(range(N)), (
                f"missing {sorted(set(range(N)) - set(got))[:10]}, "
                f"{len(got) - len(set(got))} duplicates")
            assert a.mesh is not None and b.mesh is not None
            stats_a = a.stats()["mesh"]
            wire = a.mesh.endpoint.stats
            # the kills really cost something that had to be made good
            assert wire.redials + b.mesh.endpoint.stats.redials >= 1
            assert stats_a["qos1_inflight"] == 0
            await pub.close()
            await subc.close()
        finally:
            await b.stop()
            await a.stop()

    asyncio.run(main())
