"""A whole Kademlia network in one process: N ``DhtCore`` state machines on a simulated
network (latency distribution, loss, churn) and a fake clock (issue 4).

    python tools/simulate_dht.py                      # N = 10,000 (the bars)
    python tools/simulate_dht.py --nodes 100000 --lookups 1000 --records 300
    python tools/simulate_dht.py --nodes 2000 --quick # a smoke run (seconds)

**The network.** A heap-based discrete-event loop: a message is delivered after a latency
drawn from a log-normal distribution (median ``--latency``, default 40 ms; sigma 0.5, so
p99 ≈ 3.2 × median), and lost with probability ``--loss`` (each direction on its own). A
dead node is silent. Per-query timeouts are the cores' own (``query_timeout`` 1 s here,
driven by ``get_timer`` / ``handle_timer``): there is no asyncio at all. Messages are
passed as the decoded objects (the wire encoding is tested elsewhere).

**Routing tables are pre-seeded** from the sorted id list: for every node and every bucket
i, up to k nodes drawn at random from the ids that share exactly i leading bits with it
(what a long-running Kademlia network converges to). Building 10,000 tables through 10,000
real bootstraps would cost ~10 lookups each (self-lookup + bucket refresh) — ~4 M queries,
several minutes on its own — and would measure the join order rather than the DHT. Nodes
that join during the churn phase do bootstrap through the network (self-lookup and refresh
of the farther buckets, from one random live seed), so joins are exercised for real.

**Phases.**

1. *No churn*: ``--lookups`` FIND_NODE lookups of existing node ids from random nodes,
   started over 60 s. Success = the target is the first contact of the result.
2. *Churn*: ``--records`` records (TTL ``--ttl``, 1 h) are put by stable publishers
   (publishers are never replaced, so their records are republished at ttl/2 as the
   protocol says; a record whose owner leaves is meant to expire). Over one TTL,
   ``--churn`` (20 %) of the other nodes leave (silently) at random times, each replaced
   by a newcomer that bootstraps. At 6 checkpoints every record is looked up
   (FIND_VALUE) from a random live node: availability = found / asked.

Bucket refresh (``refresh_interval``) is off in the simulation: in a 1 h run every
pre-seeded bucket would go stale at the same instant. Dead contacts leave the tables by
the failure rule (``evict_after`` = 2 consecutive failures) and by the full-bucket ping.

Figures (2 cores, Python 3.11) are in docs/DHT.md.
"""

from __future__ import annotations

import argparse
import bisect
import gc
import heapq
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from macula.dht.core import DhtConfig, DhtCore, LookupDone, SendRequest, StoreDone
from macula.dht.messages import Contact

_REQ = 0
_RESP = 1
_TIMER = 2
_CALL = 3


class Sim:
    def __init__(self, n: int, *, cfg: DhtConfig, seed: int, latency: float, loss: float,
                 sigma: float = 0.5) -> None:
        self.cfg = cfg
        self.rng = random.Random(seed)
        self.now = 0.0
        self.latency = latency
        self.sigma = sigma
        self.loss = loss
        self.cores: list[DhtCore] = []
        self.contacts: list[Contact] = []
        self.alive: list[bool] = []
        self.index: dict[bytes, int] = {}
        self.sched: list[float] = []
        self.heap: list[tuple[float, int, int, Any, Any, Any]] = []
        self.seq = 0
        self.waiting: dict[tuple[int, int], Callable[[Any], None]] = {}
        self.messages = 0
        self.lost = 0
        for _ in range(n):
            self.add_node()

    # -- nodes ----------------------------------------------------------------------------

    def add_node(self) -> int:
        i = len(self.cores)
        nid = self.rng.getrandbits(256).to_bytes(32, "big")
        core = DhtCore(nid, config=self.cfg, now=self.now,
                       rng=random.Random(self.rng.getrandbits(64)))
        self.cores.append(core)
        self.contacts.append(Contact(nid, "10.0.0.1", 4433))
        self.alive.append(True)
        self.index[nid] = i
        self.sched.append(math.inf)
        self.reschedule(i)
        return i

    def kill(self, i: int) -> None:
        self.alive[i] = False
        del self.index[self.cores[i].node_id]

    def live(self) -> list[int]:
        return [i for i, a in enumerate(self.alive) if a]

    def preseed(self) -> None:
        """Fill every table from the sorted id list (see the module docstring)."""
        k = self.cfg.k
        ints = sorted((int.from_bytes(c.node_id, "big"), i) for i, c in enumerate(self.cores))
        keys = [v for v, _ in ints]
        rng = self.rng
        for core in self.cores:
            own = int.from_bytes(core.node_id, "big")
            table = core.table
            for b in range(256):
                shift = 255 - b
                lo = ((own >> shift) ^ 1) << shift
                a = bisect.bisect_left(keys, lo)
                z = bisect.bisect_left(keys, lo + (1 << shift))
                picks = rng.sample(range(a, z), k) if z - a > k else list(range(a, z))
                for p in picks:
                    j = ints[p][1]
                    table.add(self.contacts[j].node_id, self.contacts[j], 0.0)
                # stop when no other id shares b + 1 bits with us
                mine = (own >> shift) << shift
                if bisect.bisect_left(keys, mine + (1 << shift)) - bisect.bisect_left(
                        keys, mine) <= 1:
                    break

    # -- events ---------------------------------------------------------------------------

    def push(self, t: float, kind: int, a: Any, b: Any = None, c: Any = None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, a, b, c))

    def delay(self) -> float:
        return self.latency * math.exp(self.rng.gauss(0.0, self.sigma))

    def reschedule(self, i: int) -> None:
        t = self.cores[i].get_timer()
        if t is not None and t < self.sched[i]:
            self.sched[i] = t
            self.push(t, _TIMER, i)

    def pump(self, i: int) -> None:
        core = self.cores[i]
        rng = self.rng
        loss = self.loss
        while (a := core.next_action()) is not None:
            if type(a) is SendRequest:
                self.messages += 1
                dst = self.index.get(a.contact.node_id)
                if dst is None:
                    continue  # gone: the sender's timeout fires
                if loss and rng.random() < loss:
                    self.lost += 1
                    continue
                self.push(self.now + self.delay(), _REQ, i, dst, a)
            else:
                key = a.lookup_id if type(a) is LookupDone else a.op_id  # type: ignore[union-attr]
                cb = self.waiting.pop((i, key), None)
                if cb is not None:
                    cb(a)
        self.reschedule(i)

    def call_at(self, t: float, fn: Callable[[], None]) -> None:
        self.push(t, _CALL, fn)

    def run(self, until: float) -> None:
        heap = self.heap
        cores = self.cores
        alive = self.alive
        sched = self.sched
        rng = self.rng
        while heap and heap[0][0] <= until:
            t, _, kind, a, b, c = heapq.heappop(heap)
            self.now = t
            if kind == _REQ:
                if not alive[b]:
                    continue
                reply = cores[b].receive_request(self.contacts[a], c.msg, t)
                self.pump(b)
                self.messages += 1
                if self.loss and rng.random() < self.loss:
                    self.lost += 1
                    continue
                self.push(t + self.delay(), _RESP, a, c.rid, reply)
            elif kind == _RESP:
                if not alive[a]:
                    continue
                cores[a].receive_response(b, c, t)
                self.pump(a)
            elif kind == _TIMER:
                if sched[a] != t or not alive[a]:
                    continue
                sched[a] = math.inf
                cores[a].handle_timer(t)
                self.pump(a)
            else:
                a()
        self.now = until

    # -- operations -------------------------------------------------------------------------

    def lookup(self, i: int, target: bytes, want_value: bool,
               done: Callable[[LookupDone], None]) -> None:
        lid = self.cores[i].start_lookup(target, want_value=want_value, now=self.now)
        self.waiting[(i, lid)] = done
        self.pump(i)

    def put(self, i: int, key: bytes, value: bytes, ttl: float,
            done: Callable[[StoreDone], None]) -> None:
        op = self.cores[i].put(key, value, ttl, now=self.now)
        self.waiting[(i, op)] = done
        self.pump(i)

    def join(self, seed: int) -> int:
        i = self.add_node()
        self.cores[i].bootstrap([self.contacts[seed]], now=self.now)
        self.pump(i)
        return i


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--lookups", type=int, default=2_000)
    ap.add_argument("--records", type=int, default=1_000)
    ap.add_argument("--churn", type=float, default=0.2, help="fraction replaced over one TTL")
    ap.add_argument("--ttl", type=float, default=3600.0)
    ap.add_argument("--latency", type=float, default=0.040, help="median one-way (s)")
    ap.add_argument("--loss", type=float, default=0.0, help="per-message loss probability")
    ap.add_argument("--churn-loss", type=float, default=0.01,
                    help="loss during the churn phase")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="2,000 nodes, fewer operations")
    ap.add_argument("--no-churn", action="store_true", help="phase 1 (lookups) only")
    args = ap.parse_args(argv)
    if args.quick:
        args.nodes, args.lookups, args.records = 2000, 300, 200
    cfg = DhtConfig(query_timeout=1.0, refresh_interval=1e12, refresh_check=1e12,
                    reap_interval=60.0)
    t0 = time.perf_counter()
    sim = Sim(args.nodes, cfg=cfg, seed=args.seed, latency=args.latency, loss=args.loss)
    sim.preseed()
    # millions of long-lived objects (tables, contacts): keep the cyclic collector from
    # re-scanning them (the event objects die by reference counting)
    gc.freeze()
    gc.set_threshold(200_000, 50, 1000)
    t_build = time.perf_counter() - t0
    sizes = [len(c.table) for c in sim.cores]
    rng = random.Random(args.seed + 1)

    # -- phase 1: lookups without churn ---------------------------------------------------
    t1 = time.perf_counter()
    results: list[tuple[bool, int, int]] = []
    n = args.nodes
    for _ in range(args.lookups):
        src, dst = rng.randrange(n), rng.randrange(n)
        while dst == src:
            dst = rng.randrange(n)
        target = sim.cores[dst].node_id

        def start(src: int = src, target: bytes = target) -> None:
            sim.lookup(src, target, False, lambda d, target=target: results.append(
                (bool(d.contacts) and d.contacts[0].node_id == target, d.rounds, d.queries)))

        sim.call_at(rng.uniform(0.0, 60.0), start)
    msgs0 = sim.messages
    sim.run(120.0)
    t_lookups = time.perf_counter() - t1
    ok = sum(r[0] for r in results)
    rounds = [r[1] for r in results]
    queries = [r[2] for r in results]
    lookup_msgs = (sim.messages - msgs0) / max(1, len(results))

    found: list[int] = []
    asked = [0]
    value_rounds: list[int] = []
    stored: list[int] = []
    records: list[tuple[bytes, bytes]] = []
    leaving: list[int] = []
    t2 = time.perf_counter()
    if not args.no_churn:
        # -- phase 2: records under churn --------------------------------------------------
        sim.loss = args.churn_loss
        base = sim.now
        publishers = rng.sample(range(n), min(n // 4, max(1, args.records // 4)))
        stable = set(publishers)
        for r in range(args.records):
            pub = publishers[r % len(publishers)]
            key = rng.getrandbits(256).to_bytes(32, "big")
            value = b"value-%d" % r
            records.append((key, value))

            def put(pub: int = pub, key: bytes = key, value: bytes = value) -> None:
                sim.put(pub, key, value, args.ttl, lambda d: stored.append(d.stored))

            sim.call_at(base + rng.uniform(0.0, 10.0), put)
        sim.run(base + 30.0)
        churners = [i for i in range(n) if i not in stable]
        leaving.extend(rng.sample(churners, int(args.churn * n)))
        start_churn = sim.now
        for i in leaving:
            def replace(i: int = i) -> None:
                sim.kill(i)
                sim.join(_random_live(sim, rng))

            sim.call_at(start_churn + rng.uniform(0.0, args.ttl), replace)
        checkpoints = [start_churn + args.ttl * f for f in (1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0)]
        for cp in checkpoints:
            sim.run(cp - 0.001)
            for key, value in records:
                src = _random_live(sim, rng)
                asked[0] += 1

                def got(d: LookupDone, value: bytes = value) -> None:
                    found.append(int(any(r.value == value for r in d.records)))
                    value_rounds.append(d.rounds)

                sim.lookup(src, key, True, got)
            sim.run(cp + 30.0)
    t_churn = time.perf_counter() - t2
    avail = sum(found) / max(1, asked[0])
    total = time.perf_counter() - t0
    evictions = sum(c.stats["evictions"] for c in sim.cores)
    live = sim.live()
    dead_left = sum(1 for i in live for nid in sim.cores[i].table if nid not in sim.index)
    contacts_left = sum(len(sim.cores[i].table) for i in live)

    print(f"# Kademlia simulation: N = {n:,}, k = {cfg.k}, alpha = {cfg.alpha}, seed {args.seed}")
    print(f"# latency log-normal median {args.latency * 1000:.0f} ms (sigma {sim.sigma}), "
          f"query timeout {cfg.query_timeout} s; Python {sys.version.split()[0]}")
    print(f"# tables pre-seeded in {t_build:.1f} s: contacts per node median "
          f"{statistics.median(sizes):.0f} (min {min(sizes)}, max {max(sizes)})")
    print()
    print("| figure | value | bar |")
    print("|---|---|---|")
    print(f"| lookups without churn (loss {args.loss:.0%}) | {len(results):,} | - |")
    print(f"| lookup success rate | {ok / max(1, len(results)):.2%} | 100% |")
    print(f"| rounds per lookup: median / p99 | {statistics.median(rounds):.0f} / "
          f"{pct(rounds, 0.99):.0f} | median <= 4 |")
    print(f"| queries per lookup: median / p99 | {statistics.median(queries):.0f} / "
          f"{pct(queries, 0.99):.0f} | - |")
    print(f"| messages per lookup (requests + replies, mean) | {lookup_msgs:.1f} | - |")
    if args.no_churn:
        print(f"| wall time: build / lookups / total | {t_build:.0f} s / {t_lookups:.0f} s / "
              f"{total:.0f} s | - |")
        return 0
    print(f"| records put (ttl {args.ttl:.0f} s, republished at ttl/2) | {len(records):,}, "
          f"stored on median {statistics.median(stored) if stored else 0:.0f} nodes | - |")
    print(f"| churn: nodes replaced over one ttl (loss {args.churn_loss:.0%}) | "
          f"{len(leaving):,} ({args.churn:.0%}) | 20% |")
    print(f"| value availability under churn (6 checkpoints) | {avail:.2%} "
          f"({sum(found):,} / {asked[0]:,}) | >= 99% |")
    print(f"| FIND_VALUE rounds: median / p99 | {statistics.median(value_rounds):.0f} / "
          f"{pct(value_rounds, 0.99):.0f} | - |")
    print(f"| dead contacts left in live tables at the end | {dead_left:,} of "
          f"{contacts_left:,} ({dead_left / max(1, contacts_left):.1%}); evictions "
          f"{evictions:,} | - |")
    print(f"| messages simulated / lost | {sim.messages:,} / {sim.lost:,} | - |")
    print(f"| wall time: build / lookups / churn / total | {t_build:.0f} s / "
          f"{t_lookups:.0f} s / {t_churn:.0f} s / {total:.0f} s | < 300 s at N = 10,000 |")
    return 0


def _random_live(sim: Sim, rng: random.Random) -> int:
    while True:
        i = rng.randrange(len(sim.cores))
        if sim.alive[i]:
            return i


if __name__ == "__main__":
    raise SystemExit(main())
