"""The mesh (issue 7) against its bars: pub/sub and RPC between node processes, one table.

    python tools/bench_mesh.py                 # 3 runs per figure, ~5 min
    python tools/bench_mesh.py --quick         # 1 run, shorter cases (~1 min)
    python tools/bench_mesh.py --json out.json --shards 0

Nodes are ``macula node`` subprocesses on 127.0.0.1 joined over QUIC, started with
:class:`macula.demo.LocalMesh` (node A first, node B with ``--seed`` = A's mesh address).
Every publisher, subscriber, caller and provider is a separate process speaking raw MCP/1
with pyzmq (control/SPEC.md), as in tools/bench_node_quick.py, so that the figures are the
nodes' and the mesh's, not a client library's; case b uses ``macula.Client`` (its rate is
low). Realm ``default``, QoS 0, 64-byte payloads.

Cases, each for two settings of the nodes (environment of the node processes): ``defaults``
(what ``macula node`` does today) and ``plan`` (the original plan's defaults: subscriber
cache TTL 60 s, minimum discovery interval 5 s, i.e. ``MACULA_MESH_CACHE_TTL=60``,
``MACULA_MESH_MIN_INTERVAL=5``; a used answer is refreshed once it is ``refresh_after`` =
``min_interval`` old):

a. **throughput**: N = 300,000 PUBLISHes in ZeroMQ messages of 1,000 from a publisher on A;
   a subscriber on B (``bench/tp/#``) counts EVENTs from its first to its last arrival.
   *Flood*: the publisher sends as fast as node A takes them; the figures are the msg/s
   delivered at B and the share of the N that arrived (node A drops the QoS 0 messages its
   link to B cannot take: mesh ``drops_total`` ``backpressure``), so that a rate bought with
   drops is visible. Bar: >= 150,000 msg/s delivered. *Paced*: the publisher offers
   ``--offered`` msg/s (default 150,000, the bar) in bodies of 1,000; bar: 100 % delivered
   in every run (not only in the median run).
b. **steady discovery load**: 100 topics whose subscribers on B are already known to A
   (warm-up until B has seen every topic), then publishing at 2,000 msg/s over them for 60 s
   (``--quick``: 10 s): A's ``dht_lookups_total`` delta per 1,000 messages, and per anchor
   per refresh interval (delta / anchors of the 100 topics / (seconds / refresh interval)).
   Bar: at most 1 lookup per anchor per refresh interval. The two settings run side by side
   (two meshes at once: the figure is a count, not a timing, and 2,000 msg/s is light), so
   that three runs fit in the budget.
c. **latency**: one PUBLISH per ZeroMQ message at 1,000 msg/s for 5 s (``--quick``: 2 s) on
   A, each payload carrying ``time.monotonic_ns()`` (CLOCK_MONOTONIC, shared by all
   processes); the subscriber on B records arrival - send: p50 and p99 µs. Bar: p50 <= 1 ms.
d. **RPC**: 2,000 (``--quick``: 500) sequential CALLs from a caller on A to an echo provider
   on B: round trip p50 and p99 µs. Bar: p50 <= 1 ms.

Each figure is the median of ``--runs`` runs (``--quick``: 1); the runs column lists every
run. Warm-ups (probes until traffic crosses, calls until the provider is found) are not
timed. The machine has 2 cores: both nodes, their shards (``--shards``, default 0: matching
in the node process) and the client processes share them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import signal
import statistics
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from multiprocessing.queues import Queue as MpQueue
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zmq

from macula.config import NodeConfig
from macula.demo import LocalMesh
from macula.mesh.discovery import topic_anchors
from tools.mcp_raw import SIG, dec, enc, open_session
from tools.mcp_raw import close_session as _close
from tools.mcp_raw import request as _request

_open = open_session
PAD = b"x" * 55  # 1 tag byte + 8 time bytes + 55 = 64-byte payloads
STAMP = struct.Struct("<q")
CTX = mp.get_context("spawn")  # no inherited zmq contexts or event loops


@dataclass(frozen=True)
class Settings:
    name: str
    env: dict[str, str]

    def refresh_interval(self) -> float:
        """Seconds after which a used discovery answer is looked up again."""
        cfg = NodeConfig.load(None, {**os.environ, **self.env})
        after = getattr(cfg, "mesh_refresh_after", None)
        return float(after) if after else float(cfg.mesh_min_interval)


SETTINGS = (
    Settings("defaults", {}),
    Settings("plan", {"MACULA_MESH_CACHE_TTL": "60", "MACULA_MESH_MIN_INTERVAL": "5"}),
)


def _stats(endpoint: str) -> dict[str, Any]:
    ctx, sock = _open(endpoint, "bench-stats")
    try:
        stats = _request(sock, [30, 7], 31)[2]
    finally:
        _close(ctx, sock)
    return stats if isinstance(stats, dict) else {}


def _mesh(stats: dict[str, Any], key: str) -> int:
    m = stats.get("mesh")
    return int(m.get(key, 0) or 0) if isinstance(m, dict) else 0


def _events(sock: zmq.Socket[bytes], timeout_ms: int) -> list[list[Any]] | None:
    """The EVENTs of the next body, or None after ``timeout_ms`` of silence."""
    if not sock.poll(timeout_ms):
        return None
    return [c for c in dec.decode(sock.recv_multipart()[1]) if c[0] == 16]


def _probe_until(sock: zmq.Socket[bytes], topic: str, warm: MpEvent, what: str) -> None:
    deadline = time.monotonic() + 20
    while not warm.is_set():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: no probe reached the subscriber in 20 s")
        sock.send_multipart([SIG, enc.encode([[14, topic, b"P"]])])
        warm.wait(0.05)
    time.sleep(0.2)  # probes in flight arrive before the data


# -- a. throughput -------------------------------------------------------------------------
TP_TOPIC = "bench/tp/data"


def _tp_sub(endpoint: str, n: int, ready: MpEvent, warm: MpEvent, out: MpQueue[Any]) -> None:
    ctx, sock = _open(endpoint, "tp-sub")
    _request(sock, [10, 2, "bench/tp/#", 0], 11)
    ready.set()
    got = 0
    first = last = 0.0
    deadline = time.monotonic() + 60
    while got < n and time.monotonic() < deadline:
        evs = _events(sock, 3000 if got else 1000)
        if evs is None:
            if got:
                break
            continue
        now = time.perf_counter()
        for ev in evs:
            if ev[5][:1] == b"D":
                if not got:
                    first = now
                got += 1
            else:
                warm.set()
        if got:
            last = now
    out.put((got, last - first))
    _close(ctx, sock)


def _tp_pub(endpoint: str, n: int, batch: int, rate: int, warm: MpEvent) -> None:
    ctx, sock = _open(endpoint, "tp-pub")
    _probe_until(sock, TP_TOPIC, warm, "throughput")
    body = enc.encode([[14, TP_TOPIC, b"D" + PAD + b"12345678"]] * batch)
    t0 = time.monotonic()
    for i in range(n // batch):
        if rate:  # paced: body i leaves at i * batch / rate
            wait = t0 + i * batch / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        sock.send_multipart([SIG, body])
    _request(sock, [30, 9], 31)  # everything before it was taken by node A
    _close(ctx, sock)


def throughput(mesh: LocalMesh, n: int, rate: int = 0) -> tuple[tuple[float, float], str]:
    """Delivered msg/s at B and the share of the N messages B received (``rate`` 0: the
    publisher sends as fast as node A takes them, else it is paced at ``rate`` msg/s)."""
    a, b = mesh.nodes
    ready, warm = CTX.Event(), CTX.Event()
    out: MpQueue[Any] = CTX.Queue()
    sub = CTX.Process(target=_tp_sub, args=(b.endpoint, n, ready, warm, out))
    sub.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("throughput: the subscriber did not start")
        pub = CTX.Process(target=_tp_pub, args=(a.endpoint, n, 1000, rate, warm))
        pub.start()
        got, elapsed = out.get(timeout=180)
        pub.join(30)
    finally:
        _reap(sub)
    delivered = got / elapsed if elapsed > 0 else 0.0
    return (delivered, 100 * got / n), f"received {got:,}/{n:,} in {elapsed:.3f} s"


# -- c. latency ----------------------------------------------------------------------------
LAT_TOPIC = "bench/lat/data"


def _lat_sub(endpoint: str, n: int, ready: MpEvent, warm: MpEvent, out: MpQueue[Any]) -> None:
    ctx, sock = _open(endpoint, "lat-sub")
    _request(sock, [10, 2, "bench/lat/#", 0], 11)
    ready.set()
    lat: list[int] = []
    deadline = time.monotonic() + 60
    while len(lat) < n and time.monotonic() < deadline:
        evs = _events(sock, 3000 if lat else 1000)
        if evs is None:
            if lat:
                break
            continue
        now = time.monotonic_ns()
        for ev in evs:
            p = ev[5]
            if p[:1] == b"D":
                lat.append(now - STAMP.unpack_from(p, 1)[0])
            else:
                warm.set()
    out.put(lat)
    _close(ctx, sock)


def _lat_pub(endpoint: str, n: int, rate: int, warm: MpEvent) -> None:
    ctx, sock = _open(endpoint, "lat-pub")
    _probe_until(sock, LAT_TOPIC, warm, "latency")
    t0 = time.monotonic()
    for i in range(n):
        wait = t0 + i / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        payload = b"D" + STAMP.pack(time.monotonic_ns()) + PAD
        sock.send_multipart([SIG, enc.encode([[14, LAT_TOPIC, payload]])])
    _request(sock, [30, 9], 31)
    _close(ctx, sock)


def latency(mesh: LocalMesh, rate: int, seconds: float) -> tuple[tuple[float, float], str]:
    a, b = mesh.nodes
    n = int(rate * seconds)
    ready, warm = CTX.Event(), CTX.Event()
    out: MpQueue[Any] = CTX.Queue()
    sub = CTX.Process(target=_lat_sub, args=(b.endpoint, n, ready, warm, out))
    sub.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("latency: the subscriber did not start")
        pub = CTX.Process(target=_lat_pub, args=(a.endpoint, n, rate, warm))
        pub.start()
        lat = sorted(out.get(timeout=180))
        pub.join(30)
    finally:
        _reap(sub)
    if not lat:
        raise RuntimeError("latency: nothing was delivered")
    p50, p99 = _pct(lat, 0.5) / 1e3, _pct(lat, 0.99) / 1e3
    return (p50, p99), f"{len(lat):,}/{n:,} delivered, p50 {p50:.0f} µs, p99 {p99:.0f} µs"


# -- d. RPC --------------------------------------------------------------------------------
PROCEDURE = "bench.echo"


def _provider(endpoint: str, ready: MpEvent, stop: MpEvent) -> None:
    ctx, sock = _open(endpoint, "rpc-provider")
    _request(sock, [20, 2, PROCEDURE], 21)
    ready.set()
    while not stop.is_set():
        if not sock.poll(100):
            continue
        cmds = dec.decode(sock.recv_multipart()[1])
        replies = [[27, c[1], c[4]] for c in cmds if c[0] == 26]
        if replies:
            sock.send_multipart([SIG, enc.encode(replies)])
    _close(ctx, sock)


def _call(sock: zmq.Socket[bytes], rid: int, arg: int) -> list[Any]:
    sock.send_multipart([SIG, enc.encode([[24, rid, PROCEDURE, arg, 5000]])])
    while True:
        if not sock.poll(10_000):
            raise TimeoutError(f"call {rid}: no answer in 10 s")
        for c in dec.decode(sock.recv_multipart()[1]):
            if c[0] in (25, 3) and c[1] == rid:
                return list(c)


def rpc(mesh: LocalMesh, calls: int) -> tuple[tuple[float, float], str]:
    a, b = mesh.nodes
    ready, stop = CTX.Event(), CTX.Event()
    prov = CTX.Process(target=_provider, args=(b.endpoint, ready, stop))
    prov.start()
    ctx, sock = _open(a.endpoint, "rpc-caller")
    try:
        if not ready.wait(30):
            raise RuntimeError("rpc: the provider did not start")
        rid = 0
        deadline = time.monotonic() + 20
        while True:  # warm-up: until the provider on B is found from A
            rid += 1
            reply = _call(sock, rid, rid)
            if reply[0] == 25:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"rpc: no call reached the provider in 20 s: {reply}")
            time.sleep(0.05)
        times: list[int] = []
        failed = 0
        for _ in range(calls):
            rid += 1
            t0 = time.perf_counter_ns()
            reply = _call(sock, rid, rid)
            times.append(time.perf_counter_ns() - t0)
            failed += reply[0] != 25 or reply[2] != rid
    finally:
        _close(ctx, sock)
        stop.set()
        _reap(prov)
    times.sort()
    p50, p99 = _pct(times, 0.5) / 1e3, _pct(times, 0.99) / 1e3
    if failed:
        raise RuntimeError(f"rpc: {failed} of {calls} calls failed")
    return (p50, p99), f"{calls:,} calls, p50 {p50:.0f} µs, p99 {p99:.0f} µs"


# -- b. steady discovery load --------------------------------------------------------------
STEADY_TOPICS = [f"bench/steady/{i}" for i in range(100)]


@dataclass
class Steady:
    lookups: int
    messages: int
    delivered: int
    seconds: float
    anchors: int
    refresh: float

    @property
    def per_1000(self) -> float:
        return self.lookups / self.messages * 1000 if self.messages else float("nan")

    @property
    def per_anchor_interval(self) -> float:
        return self.lookups / self.anchors / (self.seconds / self.refresh)


async def _steady_one(mesh: LocalMesh, settings: Settings, seconds: float,
                      rate: int) -> Steady:
    from macula.client import Client

    a, b = mesh.nodes
    seen: set[str] = set()
    delivered = 0

    def on_msg(msg: Any) -> None:
        nonlocal delivered
        seen.add(msg.topic)
        delivered += 1

    sub = await Client.connect(b.endpoint, name="steady-sub")
    pub = await Client.connect(a.endpoint, name="steady-pub")
    try:
        await sub.subscribe("bench/steady/+", callback=on_msg)
        deadline = time.monotonic() + 30
        while len(seen) < len(STEADY_TOPICS):  # warm-up: every route known to A
            if time.monotonic() > deadline:
                raise RuntimeError(f"steady ({settings.name}): B saw {len(seen)} of "
                                   f"{len(STEADY_TOPICS)} topics in 30 s of warm-up")
            for t in STEADY_TOPICS:
                pub.publish_nowait(t, PAD)
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.3)
        before = _mesh(await pub.stats(), "dht_lookups_total")
        delivered = 0
        t0 = time.monotonic()
        sent = 0
        nt = len(STEADY_TOPICS)
        while (now := time.monotonic()) < t0 + seconds:
            due = int((now - t0) * rate)
            for i in range(sent, due):
                pub.publish_nowait(STEADY_TOPICS[i % nt], PAD)
            sent = max(sent, due)
            await asyncio.sleep(0.01)
        elapsed = time.monotonic() - t0
        after = _mesh(await pub.stats(), "dht_lookups_total")
        await asyncio.sleep(0.5)
    finally:
        await pub.close()
        await sub.close()
    anchors = len({x for t in STEADY_TOPICS for x in topic_anchors(t)})
    return Steady(after - before, sent, delivered, elapsed, anchors, settings.refresh_interval())


def steady(meshes: Sequence[tuple[Settings, LocalMesh]], seconds: float,
           rate: int) -> list[Steady]:
    async def both() -> list[Steady]:
        return list(await asyncio.gather(*(_steady_one(m, s, seconds, rate)
                                           for s, m in meshes)))

    return asyncio.run(both())


# -- plumbing ------------------------------------------------------------------------------
def _pct(sorted_values: Sequence[int], q: float) -> float:
    return float(sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))])


def _reap(proc: Any) -> None:
    proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join(5)


@dataclass
class Row:
    case: str
    settings: str
    unit: str
    bar: str
    check: Callable[[float], bool] | None = field(default=None, repr=False)
    every_run: bool = False  # the bar holds for every run, not only for the median
    runs: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def median(self) -> float | None:
        return statistics.median(self.runs) if self.runs else None

    @property
    def met(self) -> bool | None:
        m = self.median
        if m is None or self.check is None:
            return None
        return all(map(self.check, self.runs)) if self.every_run else self.check(m)

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("check")
        d["median"] = self.median
        d["met"] = self.met
        return d


def _fmt(v: float, unit: str) -> str:
    if unit == "msg/s":
        return f"{v:,.0f}"
    if unit == "%":
        return f"{v:.1f}"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.2f}"


def format_table(rows: list[Row]) -> str:
    header = ("case", "settings", "median", "runs", "unit", "bar", "met")
    lines: list[tuple[str, ...]] = [header]
    for r in rows:
        med = r.median
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        lines.append((r.case, r.settings, "-" if med is None else _fmt(med, r.unit),
                      " / ".join(_fmt(x, r.unit) for x in r.runs) or "failed",
                      r.unit, r.bar or "-", met))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True))
                   + " |")
        if n == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> list[Row]:
    runs = 1 if args.quick else args.runs
    n = 300_000
    lat_seconds = 2.0 if args.quick else 5.0
    calls = 500 if args.quick else 2000
    steady_seconds = args.steady_seconds or (10.0 if args.quick else 60.0)
    rows: list[Row] = []
    chosen = [s for s in SETTINGS if s.name in args.settings]
    for s in chosen:
        flood = Row("a. throughput A → B, flood, delivered", s.name, "msg/s", "≥ 150,000",
                    lambda v: v >= 150_000)
        flood_share = Row("a. throughput A → B, flood, share delivered", s.name, "%", "")
        paced = Row(f"a. throughput A → B, paced at {args.offered:,}/s, delivered", s.name,
                    "msg/s", "")
        paced_share = Row(f"a. throughput A → B, paced at {args.offered:,}/s, share "
                          "delivered", s.name, "%", "100 in every run",
                          lambda v: v >= 100.0, every_run=True)
        l50 = Row("c. latency A → B at 1,000 msg/s, p50", s.name, "µs", "≤ 1,000",
                  lambda v: v <= 1000)
        l99 = Row("c. latency A → B at 1,000 msg/s, p99", s.name, "µs", "")
        r50 = Row("d. RPC A → B, sequential, p50", s.name, "µs", "≤ 1,000",
                  lambda v: v <= 1000)
        r99 = Row("d. RPC A → B, sequential, p99", s.name, "µs", "")
        _say(f"== {s.name} {s.env or ''}: starting 2 nodes")
        with LocalMesh(2, shards=args.shards, env=s.env) as mesh:
            for k in range(runs):
                steps: list[tuple[str, Callable[[], str]]] = [
                    ("throughput flood", partial(_tp, mesh, n, 0, flood, flood_share)),
                    ("throughput paced", partial(_tp, mesh, n, args.offered, paced,
                                                 paced_share)),
                    ("latency", partial(_two, latency, (mesh, 1000, lat_seconds), l50, l99)),
                    ("rpc", partial(_two, rpc, (mesh, calls), r50, r99)),
                ]
                for name, step in steps:
                    try:
                        note = step()
                    except (RuntimeError, TimeoutError, OSError) as exc:
                        note = f"FAILED: {exc}"
                    _say(f"  run {k + 1} {name}: {note}")
        rows += [flood, flood_share, paced, paced_share, l50, l99, r50, r99]
    per1k = {s.name: Row("b. steady, 100 known topics: DHT lookups per 1,000 msgs", s.name,
                         "lookups", "") for s in chosen}
    per_int = {s.name: Row("b. steady: lookups per anchor per refresh interval", s.name,
                           "lookups", "≤ 1", lambda v: v <= 1.0) for s in chosen}
    _say(f"== steady discovery load ({', '.join(s.name for s in chosen)} side by side, "
         f"{steady_seconds:g} s per run)")
    meshes = [(s, LocalMesh(2, shards=args.shards, env=s.env)) for s in chosen]
    try:
        for _, m in meshes:
            m.start()
        for k in range(runs):
            try:
                results = steady(meshes, steady_seconds, args.steady_rate)
            except (RuntimeError, TimeoutError, OSError) as exc:
                _say(f"  run {k + 1} steady: FAILED: {exc}")
                continue
            for (s, _), r in zip(meshes, results, strict=True):
                per1k[s.name].runs.append(r.per_1000)
                per_int[s.name].runs.append(r.per_anchor_interval)
                note = (f"{r.lookups} lookups, {r.messages:,} msgs ({r.delivered:,} delivered) "
                        f"in {r.seconds:.1f} s, {r.anchors} anchors, refresh every "
                        f"{r.refresh:g} s")
                per_int[s.name].notes.append(note)
                _say(f"  run {k + 1} steady {s.name}: {note}")
    finally:
        for _, m in meshes:
            m.stop()
    for s in chosen:
        rows += [per1k[s.name], per_int[s.name]]
    return rows


def _tp(mesh: LocalMesh, n: int, offered: int, rate_row: Row, share_row: Row) -> str:
    (rate, share), note = throughput(mesh, n, offered)
    rate_row.runs.append(rate)
    share_row.runs.append(share)
    rate_row.notes.append(note)
    return f"{rate:,.0f} msg/s ({note})"


def _two(case: Callable[..., tuple[tuple[float, float], str]], args: tuple[Any, ...],
         r50: Row, r99: Row) -> str:
    (p50, p99), note = case(*args)
    r50.runs.append(p50)
    r99.runs.append(p99)
    r50.notes.append(note)
    return note


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 run, shorter cases")
    ap.add_argument("--shards", type=int, default=0,
                    help="delivery shard processes per node (default 0: in the node)")
    ap.add_argument("--settings", nargs="+", default=[s.name for s in SETTINGS],
                    choices=[s.name for s in SETTINGS])
    ap.add_argument("--steady-seconds", type=float, default=None,
                    help="length of case b (default 60; --quick 10)")
    ap.add_argument("--steady-rate", type=int, default=2000, help="msg/s in case b")
    ap.add_argument("--offered", type=int, default=150_000,
                    help="msg/s the paced publisher of case a offers (default 150000)")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # so that `finally` stops the nodes
    t0 = time.monotonic()
    try:
        rows = run(args)
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    runs = 1 if args.quick else args.runs
    print(f"# bench_mesh: machine {platform.machine()}, {os.cpu_count()} cores shared by 2 "
          f"node processes (shards={args.shards}) and every client process; Python "
          f"{platform.python_version()}; load {os.getloadavg()[0]:.2f}; medians of {runs} "
          f"run(s); {time.monotonic() - t0:.0f} s")
    print(f"# settings: defaults = macula node's; plan = "
          f"{' '.join(f'{k}={v}' for k, v in SETTINGS[1].env.items())}")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"machine": {"arch": platform.machine(), "cores": os.cpu_count(),
                                   "python": platform.python_version()},
                       "runs": runs, "shards": args.shards,
                       "settings": {s.name: s.env for s in SETTINGS},
                       "rows": [r.as_json() for r in rows]}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
