"""Discovery across the mesh: how fast a subscription is reached, and what it costs.

    python tools/bench_discovery.py              # 3 runs, ~2.5 min
    python tools/bench_discovery.py --quick      # 1 run, shorter (~40 s)

Three ``macula node`` processes on loopback (:class:`macula.demo.LocalMesh`, no shards), all
clients ``macula.Client`` in this process:

a. **convergence**: a publisher on node 1 publishes QoS 0 on ``conv/<k>/x`` every 5 ms
   (the topic is known to node 1 before anyone subscribes: its anchors' answers are cached,
   empty). A client on node 3 subscribes to ``conv/<k>/#``; the figure is the time from its
   SUBACK to the first message it receives. Then it unsubscribes, waits 0.5 s and subscribes
   again (the chaos run's "resubscribe"): the same time again. ``--trials`` of each per run.
b. **steady cost**: ``--anchors`` topics ``steady/<i>/x``, each with a subscriber on node 2,
   published round robin at 1,000 msg/s from node 1 for ``--seconds``: node 1's DHT queries
   (``dht_queries_total``, the requests it sent to peers) and DHT lookups per anchor in use
   per second. A topic ``a/b`` uses the anchors ``""``, ``a``, ``a/b``.

Medians of ``--runs``. The same tool runs against any checkout (``PYTHONPATH=<checkout>``),
which is how the before/after figures in docs/MESH.md were taken.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from macula.client import Client
from macula.demo import LocalMesh


async def _stats(c: Client) -> dict[str, Any]:
    st: dict[str, Any] = (await c.stats())["mesh"]
    return st


async def _first_after(c: Client, flt: str, timeout: float) -> float:
    """Subscribe ``c`` to ``flt``: seconds from the SUBACK to the first message."""
    got = asyncio.Event()
    sub = await c.subscribe(flt, qos=0, callback=lambda m: got.set())
    t0 = time.monotonic()
    try:
        await asyncio.wait_for(got.wait(), timeout)
        return time.monotonic() - t0
    except asyncio.TimeoutError:
        return float("inf")
    finally:
        await c.unsubscribe(sub)


async def convergence(mesh: LocalMesh, trials: int) -> tuple[list[float], list[float]]:
    pub = await Client.connect(mesh.nodes[0].endpoint, realm="bench")
    sub = await Client.connect(mesh.nodes[2].endpoint, realm="bench")
    stop = asyncio.Event()
    keys = [f"conv/{k}/x" for k in range(trials)]

    async def publish() -> None:
        while not stop.is_set():
            for t in keys:
                pub.publish_nowait(t, b"c")
            await asyncio.sleep(0.005)

    task = asyncio.create_task(publish())
    first: list[float] = []
    again: list[float] = []
    try:
        await asyncio.sleep(2.0)  # node 1 knows every topic (and that nobody subscribes)
        for k in range(trials):
            first.append(await _first_after(sub, f"conv/{k}/#", 10.0))
            await asyncio.sleep(0.5)
            again.append(await _first_after(sub, f"conv/{k}/#", 10.0))
    finally:
        stop.set()
        await task
        await pub.close()
        await sub.close()
    return first, again


async def steady(mesh: LocalMesh, anchors: int, seconds: float) -> tuple[float, float]:
    pub = await Client.connect(mesh.nodes[0].endpoint, realm="bench")
    sub = await Client.connect(mesh.nodes[1].endpoint, realm="bench")
    seen: set[str] = set()
    for i in range(anchors):
        await sub.subscribe(f"steady/{i}/#", qos=0, callback=lambda m: seen.add(m.topic))
    topics = [f"steady/{i}/x" for i in range(anchors)]
    deadline = time.monotonic() + 30
    while len(seen) < anchors and time.monotonic() < deadline:  # warm-up: every route known
        for t in topics:
            pub.publish_nowait(t, b"w")
        await asyncio.sleep(0.1)
    if len(seen) < anchors:
        raise RuntimeError(f"only {len(seen)} of {anchors} topics reached node 2")
    in_use = len({""} | {f"steady/{i}" for i in range(anchors)} | set(topics)) + 1  # + "steady"
    before = await _stats(pub)
    t0 = time.monotonic()
    n = 0
    while time.monotonic() - t0 < seconds:
        for _ in range(10):
            pub.publish_nowait(topics[n % anchors], b"s")
            n += 1
        await asyncio.sleep(0.01)
    after = await _stats(pub)
    dt = time.monotonic() - t0
    await pub.close()
    await sub.close()
    q = (after["dht_queries_total"] - before["dht_queries_total"]) / in_use / dt
    lk = (after["dht_lookups_total"] - before["dht_lookups_total"]) / in_use / dt
    return q, lk


def _one(v: float) -> str:
    return "never" if v == float("inf") else f"{v * 1000:.0f} ms"


def _ms(xs: Sequence[float]) -> str:
    xs = sorted(xs)
    if not xs:
        return "-"
    return f"median {_one(statistics.median(xs))}, worst {_one(xs[-1])}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--trials", type=int, default=5, help="subscriptions timed per run")
    ap.add_argument("--anchors", type=int, default=100, help="topics in the steady case")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of the steady case")
    ap.add_argument("--quick", action="store_true", help="1 run, 3 trials, 10 s steady")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.trials, args.seconds = 1, 3, 10.0
    firsts: list[float] = []
    agains: list[float] = []
    queries: list[float] = []
    lookups: list[float] = []
    import macula
    print(f"macula from {macula.__file__}", flush=True)
    for run in range(args.runs):
        with LocalMesh(3, shards=0) as mesh:
            f, a = asyncio.run(convergence(mesh, args.trials))
            q, lk = asyncio.run(steady(mesh, args.anchors, args.seconds))
        firsts += f
        agains += a
        queries.append(q)
        lookups.append(lk)
        print(f"run {run + 1}: new subscription {_ms(f)}; re-subscription {_ms(a)}; "
              f"DHT queries {q:.3f} and lookups {lk:.3f} per anchor per second", flush=True)
    print(f"\nnew subscription reached from another node: {_ms(firsts)} "
          f"({len(firsts)} trials)")
    print(f"re-subscription after 0.5 s: {_ms(agains)} ({len(agains)} trials)")
    print(f"steady cost at node 1 ({args.anchors} topics at 1,000 msg/s): "
          f"{statistics.median(queries):.3f} DHT queries and "
          f"{statistics.median(lookups):.3f} lookups per anchor in use per second "
          f"(median of {len(queries)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
