"""DHT speed over real QUIC on loopback (issue 4): get and put latency with 30 nodes.

    python tools/bench_dht.py              # 30 nodes, 300 puts and 300 gets, 3 runs
    python tools/bench_dht.py --quick      # 1 run, 100 operations

All nodes are ``Dht`` instances (macula.dht.driver) in this process, each with its own
``WireEndpoint`` on its own loopback UDP port, on one asyncio loop: every request crosses
aioquic and the peer wire for real (encryption, framing, admission done once per pair).
The mesh is built by bootstrapping every node from the first, then one round of
``find_node`` so that the links are up (connection set-up is not part of the figures).

- ``get``: ``await dht.get(key)`` from a node that does **not** hold the key (with 30 nodes
  and k = 20, 10 nodes do not), until the values are returned: a FIND_VALUE lookup,
  alpha = 3 queries out, done at the first reply carrying records.
- ``put``: ``await dht.put(key, value)``, until every STORE is acknowledged: a store walk
  (docs/DHT.md) — STOREs to the k = 20 closest known contacts at once when the routing
  table covers the key (else FIND_NODE first), acks naming closer nodes add STOREs; 19
  others + a local copy when the publisher is one of them.

Operations run one after the other (the loop also finishes the previous operation's late
replies, which is counted in the next one). Figures: p50 / p99 per run, the median over
``--runs`` runs. The reference figures (~0.8 ms get, ~12.5 ms put) are the issue's, for a
popular pure-Python Kademlia over plain UDP on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
from multiprocessing.connection import Connection

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from macula.dht import DhtConfig, dht_key
from macula.dht.driver import Dht
from macula.wire import NodeIdentity, WireConfig


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


WIRE = WireConfig(max_datagram_size=16384)


async def _start_nodes(n: int, seed: tuple[bytes, tuple[str, int]] | None,
                       rng_base: int) -> list[Dht]:
    nodes = [Dht(NodeIdentity.generate(), wire=WIRE, rng=random.Random(rng_base + i))
             for i in range(n)]
    for d in nodes:
        await d.start()
    for i, d in enumerate(nodes):
        if seed is not None:
            await d.bootstrap([seed])
        elif i > 0:
            await d.bootstrap([nodes[0].seed])
    return nodes


def _worker(conn: Connection, n: int, seed: tuple[bytes, tuple[str, int]],
            rng_base: int) -> None:
    """A process hosting ``n`` nodes until told to stop."""

    async def serve() -> None:
        nodes = await _start_nodes(n, seed, rng_base)
        conn.send([d.seed for d in nodes])
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        loop.add_reader(conn.fileno(), lambda: stop.done() or stop.set_result(None))
        await stop
        for d in nodes:
            await d.close()

    asyncio.run(serve())


async def one_run(n: int, ops: int, seed: int, procs: int) -> dict[str, tuple[float, float]]:
    """One run: this process hosts the node that operates (and, with procs = 1, all the
    others); procs - 1 worker processes host the rest."""
    cfg = DhtConfig()
    local_n = n if procs == 1 else 1
    nodes = await _start_nodes(local_n, None, seed * 1000)
    me = nodes[0]
    workers = []
    remote: list[tuple[bytes, tuple[str, int]]] = []
    ctx = mp.get_context("spawn")
    try:
        per = [(n - local_n) // (procs - 1) + (1 if i < (n - local_n) % (procs - 1) else 0)
               for i in range(procs - 1)] if procs > 1 else []
        for i, count in enumerate(per):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(child, count, me.seed, seed * 1000 + 100 * i))
            p.start()
            workers.append((p, parent))
        for _, parent in workers:
            remote.extend(await asyncio.get_running_loop().run_in_executor(None, parent.recv))
        everyone = [d.node_id for d in nodes] + [nid for nid, _ in remote]
        assert len(everyone) == n
        # bring the operating node's links up, and let it learn the whole mesh
        for _ in range(2):
            await asyncio.gather(*(me.find_node(nid) for nid in everyone if nid != me.node_id))

        def holders(key: bytes) -> list[bytes]:
            t = int.from_bytes(key, "big")
            return sorted(everyone, key=lambda i: int.from_bytes(i, "big") ^ t)[: cfg.k]

        keys = []
        i = 0
        while len(keys) < ops:  # keys the operating node does not hold
            key = dht_key("bench", "rpc", f"{seed}.{i}")
            i += 1
            if me.node_id not in holders(key):
                keys.append(key)
        put_ms = []
        for j, key in enumerate(keys):
            t0 = time.perf_counter()
            done = await me.put(key, b"provider-%d" % j, ttl=3600.0)
            put_ms.append((time.perf_counter() - t0) * 1e3)
            assert done.stored == cfg.k and done.failed == 0, done
            await asyncio.sleep(0.002)  # let the late ACK datagrams of this one go by
        get_ms = []
        for j, key in enumerate(keys):
            assert key not in me.core.store
            t0 = time.perf_counter()
            values = await me.get(key)
            get_ms.append((time.perf_counter() - t0) * 1e3)
            assert values == [b"provider-%d" % j], values
            await asyncio.sleep(0.002)
        return {"get": (pct(get_ms, 0.5), pct(get_ms, 0.99)),
                "put": (pct(put_ms, 0.5), pct(put_ms, 0.99))}
    finally:
        for _, parent in workers:
            parent.send("stop")
        for p, _ in workers:
            p.join(10)
        for d in nodes:
            await d.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="DHT get/put latency over real QUIC")
    ap.add_argument("--nodes", type=int, default=30)
    ap.add_argument("--ops", type=int, default=300)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--procs", type=int, action="append",
                    help="processes hosting the nodes (repeatable; default: 1 and 3)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.ops, args.runs = 100, 1
    procs_list = args.procs or [1, 3]
    bars = {"get": (0.8, 0.8), "put": (5.0, 12.5)}
    print(f"# DHT over QUIC on loopback: {args.nodes} nodes, {args.ops} operations per run, "
          f"median of {args.runs} run(s); {os.cpu_count()} cores; "
          f"Python {sys.version.split()[0]}")
    print()
    print("| operation | nodes hosted in | p50 | p99 | bar (p50) | reference | met |")
    print("|---|---|---|---|---|---|---|")
    for procs in procs_list:
        runs = [asyncio.run(one_run(args.nodes, args.ops, seed, procs))
                for seed in range(args.runs)]
        where = "1 process" if procs == 1 else f"{procs} processes"
        for op, label in (("get", "get (a non-holder)"), ("put", "put (k = 20 closest)")):
            p50 = statistics.median(r[op][0] for r in runs)
            p99 = statistics.median(r[op][1] for r in runs)
            bar, ref = bars[op]
            print(f"| {label} | {where} | {p50:.2f} ms | {p99:.2f} ms | <= {bar} ms | "
                  f"~{ref} ms | {'yes' if p50 <= bar else 'no'} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
