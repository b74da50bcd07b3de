"""Overload isolation (issue 11): one unpaced publisher must not take its node out of the mesh.

    python tools/bench_flood.py                 # 3 runs of 30 s, QoS 0 flood (~2.5 min)
    python tools/bench_flood.py --qos 1         # the flood is QoS 1 PUBLISHes
    python tools/bench_flood.py --quick         # 1 run of 10 s

Two ``macula node`` processes on 127.0.0.1 (:class:`macula.demo.LocalMesh`: node B seeded
with A's mesh address; the nodes' defaults, ``--shards`` to change them, metrics on). Every
client is a separate process speaking raw MCP/1 with pyzmq (control/SPEC.md):

- **flooder** on A: bodies of 1,000 PUBLISHes (``flood/data``, 64-byte payloads, QoS 0, or
  QoS 1 with fresh mids: ``--qos 1``) sent as fast as its socket takes them, reading and
  discarding what the node sends back; once a second it sends a PING and records how long
  the PONG takes (the flooder's view of the node's liveness: a client declares the node
  gone after ``liveness × heartbeat_ms`` = 15 s of silence).
- **slow reader** on A: subscribed to ``flood/#``, reads 100 EVENTs a second; records the
  age of the data it gets (each flood body carries its send time) and whether the node
  told it SLOW_CONSUMER.
- **paced publisher** on A: 100 QoS 1 PUBLISHes a second on ``bench/lat/data`` (payload:
  the send time), recording PUBACKs; **subscriber** on B (QoS 1, ACKs each EVENT) records
  the latency of every message (CLOCK_MONOTONIC is shared by the processes) and which ones
  arrived.
- **probe** (this process, a thread): ``GET /metrics`` on A every 100 ms (10 s timeout),
  the slowest answer; node A's resident memory (``/proc/PID/status`` VmRSS of the node
  process) sampled every 100 ms.
- at the end, ``macula_mesh_nodes_gone_total`` of both nodes (the mesh's count of peers it
  declared gone) and A's sessions closed by reason.

Each figure is the median of ``--runs`` runs (every run is listed). The machine has 2 cores:
both nodes, their shards and the five client processes share them.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import struct
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.queues import Queue as MpQueue
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

import zmq

from macula.demo import LocalMesh
from tools.mcp_raw import SIG, dec, enc, open_session
from tools.mcp_raw import close_session as _close
from tools.mcp_raw import request as _request

_open = partial(open_session, heartbeat_ms=5000, rcvhwm=1000)
STAMP = struct.Struct("<q")
PAD = b"x" * 55  # 1 tag byte + 8 time bytes + 55 = 64-byte payloads
CTX = mp.get_context("spawn")
LAT_TOPIC = "bench/lat/data"
FLOOD_TOPIC = "flood/data"


def _now_ns() -> int:
    return time.monotonic_ns()


# -- the processes ---------------------------------------------------------------------------
def _subscriber(endpoint: str, ready: MpEvent, warm: MpEvent, stop: MpEvent,
                out: MpQueue[Any]) -> None:
    """On B: QoS 1 subscription to the paced topic; latency of each message, ACKs."""
    ctx, sock = _open(endpoint, "lat-sub")
    _request(sock, [10, 2, "bench/lat/#", 1], 11)
    ready.set()
    lat: dict[int, int] = {}  # seq -> latency ns (first arrival)
    last_ping = time.monotonic()
    byes: list[Any] = []
    while not stop.is_set():
        if time.monotonic() - last_ping > 1.0:
            sock.send_multipart([SIG, enc.encode([[4, 0]])])
            last_ping = time.monotonic()
        if not sock.poll(100):
            continue
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            now = _now_ns()
            acks = []
            for c in dec.decode(frames[1]):
                if c[0] == 16:
                    if c[3] == 1:
                        acks.append([17, c[2]])
                    payload = c[5]
                    if payload[:1] == b"D":
                        seq = STAMP.unpack_from(payload, 9)[0]
                        lat.setdefault(seq, now - STAMP.unpack_from(payload, 1)[0])
                    else:
                        warm.set()
                elif c[0] == 6:
                    byes.append(c[1])
            if acks:
                sock.send_multipart([SIG, enc.encode(acks)])
    out.put(("sub", lat, byes))
    _close(ctx, sock)


def _paced(endpoint: str, rate: int, warm: MpEvent, go: MpEvent, stop: MpEvent,
           out: MpQueue[Any]) -> None:
    """On A: ``rate`` QoS 1 PUBLISHes a second, payload = send time + sequence number."""
    ctx, sock = _open(endpoint, "paced-pub")
    deadline = time.monotonic() + 30
    while not warm.is_set():  # probes until the subscriber on B gets one
        if time.monotonic() > deadline:
            out.put(("paced", 0, {}, "no probe reached the subscriber in 30 s"))
            _close(ctx, sock)
            return
        sock.send_multipart([SIG, enc.encode([[14, LAT_TOPIC, b"P"]])])
        warm.wait(0.05)
    time.sleep(0.3)
    go.set()
    acks: dict[int, int] = {}  # mid -> reason
    sent_at: dict[int, int] = {}
    puback_max = 0
    t0 = time.monotonic()
    i = 0
    while not stop.is_set():
        wait = t0 + i / rate - time.monotonic()
        if wait > 0 and sock.poll(wait * 1000):
            pass
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            now = _now_ns()
            for c in dec.decode(frames[1]):
                if c[0] == 15 and c[1] not in acks:
                    acks[c[1]] = c[2]
                    puback_max = max(puback_max, now - sent_at.get(c[1], now))
        if time.monotonic() < t0 + i / rate:
            continue
        i += 1
        t = _now_ns()
        sent_at[i] = t
        payload = b"D" + STAMP.pack(t) + STAMP.pack(i) + PAD[:47]
        sock.send_multipart([SIG, enc.encode([[14, LAT_TOPIC, payload, 1, i]])])
    end = time.monotonic() + 3
    while len(acks) < i and time.monotonic() < end:
        if sock.poll(100):
            now = _now_ns()
            for c in dec.decode(sock.recv_multipart()[1]):
                if c[0] == 15 and c[1] not in acks:
                    acks[c[1]] = c[2]
                    puback_max = max(puback_max, now - sent_at.get(c[1], now))
    out.put(("paced", i, acks, f"puback max {puback_max / 1e6:.0f} ms"))
    _close(ctx, sock)


def _flooder(endpoint: str, qos: int, go: MpEvent, stop: MpEvent, out: MpQueue[Any]) -> None:
    """On A: bodies of 1,000 PUBLISHes as fast as the socket takes them, PING once a second."""
    ctx, sock = _open(endpoint, "flooder", heartbeat_ms=5000)
    go.wait(60)
    sent = 0
    mid = 0
    pongs: list[float] = []
    ping_at: dict[int, float] = {}
    token = 0
    last_ping = 0.0
    last_recv = time.monotonic()
    silent_max = 0.0
    byes: list[Any] = []
    errors = 0
    pending: list[bytes] | None = None
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN | zmq.POLLOUT)
    while not stop.is_set() and not byes:
        now = time.monotonic()
        silent_max = max(silent_max, now - last_recv)
        if now - last_ping >= 1.0 and pending is None:
            token += 1
            ping_at[token] = now
            pending = [SIG, enc.encode([[4, token]])]
            last_ping = now
        if pending is None:
            stamp = STAMP.pack(_now_ns())
            if qos:
                cmds = []
                for _ in range(1000):
                    mid += 1
                    cmds.append([14, FLOOD_TOPIC, b"F" + stamp + PAD, 1, mid])
            else:
                cmds = [[14, FLOOD_TOPIC, b"F" + stamp + PAD]] * 1000
            pending = [SIG, enc.encode(cmds)]
        events = dict(poller.poll(100))
        if events.get(sock, 0) & zmq.POLLIN:
            for _ in range(100):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                last_recv = time.monotonic()
                for c in dec.decode(frames[1]):
                    if c[0] == 5 and c[1] in ping_at:
                        pongs.append(last_recv - ping_at.pop(c[1]))
                    elif c[0] == 6:
                        byes.append(c[1])
                    elif c[0] == 3:
                        errors += 1
        if events.get(sock, 0) & zmq.POLLOUT and pending is not None:
            try:
                sock.send_multipart(pending, zmq.NOBLOCK)
                if len(pending[1]) > 100:
                    sent += 1000
                pending = None
            except zmq.Again:
                pass
    never = [time.monotonic() - t for t in ping_at.values()]
    out.put(("flood", sent, max(pongs + never, default=0.0), silent_max, byes, errors))
    sock.close(0)
    ctx.term()


def _slow_reader(endpoint: str, ready: MpEvent, stop: MpEvent, out: MpQueue[Any]) -> None:
    """On A: subscribed to the flood, reading 100 EVENTs a second; the age of what it gets."""
    ctx, sock = _open(endpoint, "slow-reader", heartbeat_ms=5000)
    sock.setsockopt(zmq.RCVHWM, 10)
    _request(sock, [10, 2, "flood/#", 0], 11)
    ready.set()
    ages: list[float] = []
    byes: list[Any] = []
    last_ping = time.monotonic()
    got = 0
    while not stop.is_set() and not byes:
        if time.monotonic() - last_ping > 1.0:
            sock.send_multipart([SIG, enc.encode([[4, 0]])])
            last_ping = time.monotonic()
        if not sock.poll(100):
            continue
        cmds = dec.decode(sock.recv_multipart()[1])
        for c in cmds:
            if c[0] == 16 and c[5][:1] == b"F":  # the age of the data as it is used
                ages.append((_now_ns() - STAMP.unpack_from(c[5], 1)[0]) / 1e9)
                got += 1
                time.sleep(0.01)
                if time.monotonic() - last_ping > 1.0:
                    sock.send_multipart([SIG, enc.encode([[4, 0]])])
                    last_ping = time.monotonic()  # 100 EVENTs a second
                if stop.is_set():
                    break
            elif c[0] == 6 or (c[0] == 3 and c[2] == 8):  # BYE, or NOT_WELCOMED to a PING
                byes.append(c[1] if c[0] == 6 else "closed")
    out.put(("slow", max(ages, default=0.0), len(ages), byes))
    sock.close(0)
    ctx.term()


# -- the probe -------------------------------------------------------------------------------
class Probe(threading.Thread):
    """GET /metrics every 100 ms (the slowest answer), and the node process's VmRSS."""

    def __init__(self, port: int, pid: int) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.pid = pid
        self.halt = threading.Event()
        self.slowest = 0.0
        self.failures = 0
        self.rss_max = 0
        self.scrapes = 0

    def run(self) -> None:
        while not self.halt.is_set():
            t0 = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=10) as r:
                    r.read()
                self.scrapes += 1
            except OSError:
                self.failures += 1
            self.slowest = max(self.slowest, time.monotonic() - t0)
            self.rss_max = max(self.rss_max, rss_of(self.pid))
            self.halt.wait(max(0.0, 0.1 - (time.monotonic() - t0)))


def rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def scrape(port: int, timeout: float = 30) -> dict[str, float]:
    """``name{labels}`` -> value of a node's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


# -- one run ---------------------------------------------------------------------------------
@dataclass
class Result:
    figures: dict[str, float]
    note: str


def one_run(args: argparse.Namespace, seconds: float) -> Result:
    env = {"MACULA_SHARDS": str(args.shards)} if args.shards is not None else {}
    with LocalMesh(2, shards=None, env=env, node_args=["--metrics-port", "0"]) as mesh:
        a, b = mesh.nodes
        a_port, b_port = int(a.ready["metrics"]), int(b.ready["metrics"])
        rss0 = rss_of(a.proc.pid)
        out: MpQueue[Any] = CTX.Queue()
        ready, warm, go, stop, stop_sub = (CTX.Event() for _ in range(5))
        procs = [CTX.Process(target=_subscriber, args=(b.endpoint, ready, warm, stop_sub, out))]
        procs[0].start()
        if not ready.wait(30):
            raise RuntimeError("the subscriber did not start")
        slow_ready = CTX.Event()
        if args.slow_reader:
            procs.append(CTX.Process(target=_slow_reader,
                                     args=(a.endpoint, slow_ready, stop, out)))
            procs[-1].start()
            if not slow_ready.wait(30):
                raise RuntimeError("the slow reader did not start")
        procs.append(CTX.Process(target=_paced, args=(a.endpoint, args.rate, warm, go, stop,
                                                      out)))
        procs[-1].start()
        if not go.wait(40):
            raise RuntimeError("the paced publisher did not get through to B")
        gone0 = {n: scrape(p).get("macula_mesh_nodes_gone_total", 0.0)
                 for n, p in (("a", a_port), ("b", b_port))}
        probe = Probe(a_port, a.proc.pid)
        probe.start()
        procs.append(CTX.Process(target=_flooder, args=(a.endpoint, args.qos, go, stop, out)))
        procs[-1].start()
        time.sleep(seconds)
        stop.set()
        time.sleep(3)  # the last paced messages arrive
        stop_sub.set()
        results: dict[str, Any] = {}
        for _ in range(len(procs)):
            item = out.get(timeout=60)
            results[item[0]] = item[1:]
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        probe.halt.set()
        probe.join(15)
        ma, mb = scrape(a_port), scrape(b_port)
        try:
            ctx, sock = _open(a.endpoint, "stats")
            st = _request(sock, [30, 9], 31)[2]
            _close(ctx, sock)
            mesh_congested = int(st.get("mesh", {}).get("congested_total", 0))
        except (RuntimeError, TimeoutError):
            mesh_congested = -1
    lat_d, _ = results["sub"][0], results["sub"][1]
    sent, acks, pnote = results["paced"]
    lat = sorted(lat_d.values())
    if not lat:
        raise RuntimeError(f"the subscriber on B got nothing ({pnote})")
    flood_sent, pong_max, silent_max, flood_byes, flood_errors = results["flood"]
    closed = {k.split('reason="')[1].rstrip('"}'): int(v) for k, v in ma.items()
              if k.startswith("macula_sessions_closed_total{")}
    fig = {
        "lat_p50_ms": _pct(lat, 0.5) / 1e6,
        "lat_p99_ms": _pct(lat, 0.99) / 1e6,
        "lat_max_ms": lat[-1] / 1e6,
        "lost_qos1": float(sent - len(lat_d)),
        "rss_mb": probe.rss_max / 2**20,
        "metrics_max_s": probe.slowest,
        "metrics_failed": float(probe.failures),
        "gone_b": mb.get("macula_mesh_nodes_gone_total", 0.0) - gone0["b"],
        "gone_a": ma.get("macula_mesh_nodes_gone_total", 0.0) - gone0["a"],
        "flood_msgs_per_s": ma.get("macula_messages_in_total", 0.0) / seconds,
        "pong_max_s": pong_max,
        "flooder_silent_max_s": silent_max,
    }
    note = (f"paced {sent} sent, {len(lat_d)} at B, pubacks {len(acks)} ({pnote}); "
            f"RSS {rss0 / 2**20:.0f} -> {probe.rss_max / 2**20:.0f} MB; /metrics {probe.scrapes} "
            f"scrapes, {probe.failures} failed; flooder sent {flood_sent:,}, "
            f"errors {flood_errors}, BYE {flood_byes}; A closed sessions {closed}; "
            f"A drops {_labels(ma, 'macula_drops_total')}; A gated "
            f"{ma.get('macula_ingress_gated_total', 0):.0f} times, parked "
            f"{ma.get('macula_ingress_parked_total', 0):.0f}, refused "
            f"{ma.get('macula_ingress_refused_total', 0):.0f}, loop lag max (last 10-20 s) "
            f"{ma.get('macula_loop_lag_seconds', 0):.3f} s, mesh congested {mesh_congested} "
            f"times, mesh drops {_labels(ma, 'macula_mesh_drops_total')}, mesh QoS 1 re-sent "
            f"{ma.get('macula_mesh_qos1_resent_total', 0):.0f}")
    if "slow" in results:
        age, n, byes = results["slow"]
        fig["slow_age_max_s"] = age
        note += f"; slow reader: {n} EVENTs, oldest {age:.1f} s, BYE {byes}"
    return Result(fig, note)


def _labels(m: dict[str, float], name: str) -> dict[str, int]:
    return {k[len(name) + 1:-1]: int(v) for k, v in m.items()
            if k.startswith(name + "{") and v}


def _pct(values: Sequence[int], q: float) -> float:
    return float(values[min(len(values) - 1, int(q * len(values)))])


BARS = {
    "lat_p99_ms": ("normal subscriber on B, p99 latency", "ms", "≤ 100", lambda v: v <= 100),
    "lat_p50_ms": ("normal subscriber on B, p50 latency", "ms", "", None),
    "lat_max_ms": ("normal subscriber on B, max latency", "ms", "", None),
    "lost_qos1": ("paced QoS 1 messages not received at B", "msgs", "0", lambda v: v == 0),
    "gone_b": ("node B: peers declared gone", "count", "0", lambda v: v == 0),
    "gone_a": ("node A: peers declared gone", "count", "0", lambda v: v == 0),
    "rss_mb": ("node A RSS, max", "MB", "≤ 150", lambda v: v <= 150),
    "metrics_max_s": ("A /metrics slowest answer", "s", "≤ 1", lambda v: v <= 1),
    "metrics_failed": ("A /metrics failed scrapes", "count", "0", lambda v: v == 0),
    "flood_msgs_per_s": ("flood taken by A (messages_in / s)", "msg/s", "", None),
    "pong_max_s": ("flooder: slowest PONG", "s", "", None),
    "flooder_silent_max_s": ("flooder: longest silence from A", "s", "< 15", lambda v: v < 15),
    "slow_age_max_s": ("slow reader: oldest data received", "s", "", None),
}


@dataclass
class Row:
    key: str
    runs: list[float] = field(default_factory=list)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=30.0, help="flood length per run")
    ap.add_argument("--quick", action="store_true", help="1 run of 10 s")
    ap.add_argument("--qos", type=int, choices=(0, 1), default=0, help="QoS of the flood")
    ap.add_argument("--rate", type=int, default=100, help="paced publisher, msg/s")
    ap.add_argument("--shards", type=int, default=None,
                    help="MACULA_SHARDS of the nodes (default: the node's default)")
    ap.add_argument("--no-slow-reader", dest="slow_reader", action="store_false")
    args = ap.parse_args(argv)
    runs, seconds = (1, 10.0) if args.quick else (args.runs, args.seconds)
    rows = {k: Row(k) for k in BARS}
    for k in range(runs):
        try:
            r = one_run(args, seconds)
        except (RuntimeError, TimeoutError, OSError) as exc:
            print(f"run {k + 1}: FAILED: {exc}", file=sys.stderr, flush=True)
            continue
        for key, v in r.figures.items():
            rows[key].runs.append(v)
        print(f"run {k + 1}: {r.note}", file=sys.stderr, flush=True)
        print("  " + ", ".join(f"{key} {v:.3g}" for key, v in r.figures.items()),
              file=sys.stderr, flush=True)
    print(f"flood QoS {args.qos}, {seconds:g} s, {runs} run(s), shards "
          f"{args.shards if args.shards is not None else 'default'}, pid {os.getpid()}")
    lines = [("figure", "median", "runs", "unit", "bar", "met")]
    for key, (label, unit, bar, check) in BARS.items():
        r = rows[key]
        if not r.runs:
            continue
        med = statistics.median(r.runs)
        met = "-" if check is None else ("yes" if check(med) else "NO")
        lines.append((label, f"{med:,.3g}" if med < 1000 else f"{med:,.0f}",
                      " / ".join(f"{v:,.3g}" if v < 1000 else f"{v:,.0f}" for v in r.runs),
                      unit, bar or "-", met))
    widths = [max(len(line[i]) for line in lines) for i in range(6)]
    for n, line in enumerate(lines):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return 0


if __name__ == "__main__":
    sys.exit(main())
