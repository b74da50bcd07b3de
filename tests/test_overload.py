"""Overload isolation (issue 11): one client flooding a node does not take the node down.

A real ``macula node`` process (2 delivery shards, its mesh alone) flooded by an unpaced raw
MCP/1 client (bodies of 2,000 QoS 0 PUBLISHes sent as fast as the socket takes them), while another
session pings and publishes QoS 1 and a probe reads ``/metrics``; then, in-process nodes for
a slow consumer and for ``/metrics`` while the node's loop is stuck. Deadlines are generous
(they wait for an event); nothing asserts on speed.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import zmq

from macula.config import NodeConfig
from macula.control import protocol as p
from macula.control.broker import Limits
from macula.control.protocol import Err
from macula.demo import LocalMesh
from macula.node import NodeThread

SIG = p.SIGNATURE
FLOOD_BODY = p.encode([[14, "flood/x", b"f" * 20]] * 2000)


class Raw:
    """A hand-written MCP/1 client on a DEALER socket."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, **opts: Any) -> None:
        self.sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        for k, v in opts.items():
            self.sock.setsockopt(getattr(zmq, k), v)
        self.sock.connect(endpoint)

    def send(self, *cmds: list[Any]) -> None:
        self.sock.send_multipart([SIG, p.encode(list(cmds))])

    def until(self, pred: Callable[[Any], bool], timeout: float) -> Any:
        """The first command satisfying ``pred`` within ``timeout`` s, else None."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000) + 1):
                break
            for c in p.decode_node_body(self.sock.recv_multipart()[1]):
                if pred(c):
                    return c
        return None

    def hello(self, name: str, hb: int = 60_000) -> None:
        self.send([1, 1, "r", name, "", hb])
        assert isinstance(self.until(lambda c: True, 10), p.Welcome)


def is_(tp: type[Any], **fields: Any) -> Callable[[Any], bool]:
    return lambda c: isinstance(c, tp) and all(getattr(c, k) == v for k, v in fields.items())


def get(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        body: bytes = r.read()
        return body


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def metric(text: bytes, name: str) -> float:
    for line in text.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@dataclass
class FloodRun:
    """What was seen while one client flooded a node process."""

    pongs: list[Any] = field(default_factory=list)  # the other session's PONGs (None: none)
    pubacks: list[Any] = field(default_factory=list)
    flooder_pong: Any = None
    scrapes_ok: int = 0
    scrape_errors: list[str] = field(default_factory=list)
    rss_max: int = 0
    bodies_sent: int = 0
    final: bytes = b""


@pytest.fixture(scope="module")
def flood() -> Iterator[FloodRun]:
    """One node process; a flooder for ~6 s; meanwhile the checks below sample what happens."""
    run = FloodRun()
    with LocalMesh(1, shards=2, node_args=["--metrics-port", "0"]) as mesh:
        node = mesh.nodes[0]
        url = f"http://127.0.0.1:{node.ready['metrics']}/metrics"
        ctx: zmq.Context[Any] = zmq.Context()
        stop = threading.Event()
        flooder = Raw(ctx, node.endpoint, SNDHWM=10)
        flooder.hello("flooder")
        ping_now, got_pong = threading.Event(), threading.Event()

        def flood_loop() -> None:  # owns the flooder's socket
            sock = flooder.sock
            pinged = False
            while not stop.is_set():
                body = FLOOD_BODY
                if ping_now.is_set() and not pinged:
                    body = p.encode([[4, 77]])  # behind what it sent; it goes on flooding
                try:
                    sock.send_multipart([SIG, body], zmq.NOBLOCK)
                    run.bodies_sent += 1
                    pinged = pinged or body is not FLOOD_BODY
                except zmq.Again:
                    sock.poll(10, zmq.POLLOUT)
                while sock.poll(0):
                    for c in p.decode_node_body(sock.recv_multipart()[1]):
                        if isinstance(c, p.Pong) and c.token == 77:
                            run.flooder_pong = c
                            got_pong.set()

        def probe_loop() -> None:
            while not stop.is_set():
                try:
                    get(url, 10)
                    run.scrapes_ok += 1
                except OSError as exc:
                    run.scrape_errors.append(repr(exc))
                run.rss_max = max(run.rss_max, rss(node.proc.pid))
                stop.wait(0.1)

        threads = [threading.Thread(target=flood_loop, daemon=True),
                   threading.Thread(target=probe_loop, daemon=True)]
        try:
            for t in threads:
                t.start()
            other = Raw(ctx, node.endpoint)
            other.hello("other")
            time.sleep(1.5)  # the flood builds up
            for i in range(1, 6):
                other.send([4, i])
                run.pongs.append(other.until(is_(p.Pong, token=i), 15))
                other.send([14, "other/t", b"x", 1, i])
                run.pubacks.append(other.until(is_(p.Puback, mid=i), 15))
            # the flooder's own PING, behind what it sent: answered while it still floods
            ping_now.set()
            got_pong.wait(20)
            run.final = get(url, 30)
        finally:
            stop.set()
            for t in threads:
                t.join(10)
            ctx.destroy(linger=0)
    return run


def test_a_flood_starves_no_ping_no_publish_and_not_metrics(flood: FloodRun) -> None:
    """Another session's PINGs and QoS 1 PUBLISHes are answered during the flood, the
    flooder's own PING (sent behind its data) too, and /metrics answers throughout."""
    assert flood.bodies_sent > 100  # there was a flood
    assert all(isinstance(x, p.Pong) for x in flood.pongs), flood.pongs
    assert all(isinstance(x, p.Puback) and x.reason == p.PubackReason.NO_SUBSCRIBERS
               for x in flood.pubacks), flood.pubacks
    assert isinstance(flood.flooder_pong, p.Pong)
    assert flood.scrapes_ok >= 5 and not flood.scrape_errors, flood.scrape_errors


def test_the_flooders_excess_is_parked_then_refused_and_counted(flood: FloodRun) -> None:
    """What the flooder sends beyond its share is not silently queued: parked (bounded),
    then refused and counted."""
    assert metric(flood.final, "macula_ingress_parked_total") > 0
    assert metric(flood.final, "macula_ingress_refused_total") > 0
    assert metric(flood.final, 'macula_drops_total{reason="ingress_throttled"}') > 0


def test_node_memory_stays_bounded_under_a_flood(flood: FloodRun) -> None:
    # what one peer can make the node hold: rcvhwm (100) bodies in ZeroMQ + park_max (4)
    # bodies parked, here ~100 x 40 kB, on top of a ~50 MB process
    assert 0 < flood.rss_max < 200 * 2**20, flood.rss_max / 2**20
    assert metric(flood.final, "macula_ingress_parked_messages") <= 4


def test_a_consumer_that_reads_but_never_catches_up_is_counted_and_dropped() -> None:
    """It reads now and then, so its socket is not full all the time; it is still behind
    for good: blocked (counted), QoS 0 dropped (counted), closed as SLOW_CONSUMER after
    stuck_timeout."""
    cfg = NodeConfig(mesh_port=-1, endpoints=["tcp://127.0.0.1:0"], metrics_port=-1,
                     shards=0, tick_interval=0.02, sndhwm=2,
                     limits=Limits(max_queue_qos0=50, max_batch=4, stuck_timeout=1.0))
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        with NodeThread(cfg) as n:
            slow = Raw(ctx, n.endpoint, RCVHWM=1, RCVBUF=4096)
            slow.hello("slow")
            slow.send([10, 1, "big"])
            assert slow.until(is_(p.Suback), 10)
            pub = Raw(ctx, n.endpoint)
            pub.hello("pub")
            payload = b"x" * 50_000
            st = n.stats()
            end = time.monotonic() + 20
            i = 0
            while not st["sessions_closed_total"] and time.monotonic() < end:
                pub.send(*[[14, "big", payload]] * 20)  # 20 MB/s offered
                # the slow consumer reads one body (at most 4 EVENTs) every 50 ms
                if slow.sock.poll(50):
                    slow.sock.recv_multipart()
                i += 1
                if i % 5 == 0:
                    st = n.stats()
            # (its BYE is sent best effort: its pipe is full, so it is usually lost)
            assert st["sessions_closed_total"] == {"SLOW_CONSUMER": 1}, st
            assert st["blocked_total"] >= 1
            assert st["drops_total"]["qos0_queue_full"] > 0
    finally:
        ctx.destroy(linger=0)


def test_metrics_answer_while_the_nodes_loop_is_stuck() -> None:
    """The loop busy for 4 s (a long GC pause, a big batch): /metrics still answers, with
    the last figures and their age."""
    cfg = NodeConfig(mesh_port=-1, endpoints=["tcp://127.0.0.1:0"], metrics_port=0, shards=0)
    with NodeThread(cfg) as n:
        assert n.node is not None and n.node.metrics_port is not None
        url = f"http://127.0.0.1:{n.node.metrics_port}/metrics"
        assert metric(get(url, 10), "macula_sessions") == 0
        loop = n._loop
        assert loop is not None
        loop.call_soon_threadsafe(time.sleep, 4.0)
        time.sleep(0.2)  # the loop is in the sleep now
        body = get(url, 3.0)
        assert metric(body, "macula_sessions") == 0
        assert metric(body, "macula_metrics_age_seconds") >= 0.0
        time.sleep(4.0)
        # afterwards the loop's lateness shows
        assert metric(get(url, 10), "macula_loop_lag_seconds") >= 1.0


def test_a_hung_shard_does_not_stop_the_node_reading_its_clients() -> None:
    """The node stops reading while a shard has a batch unanswered; a shard that never
    answers (stopped) must not stop it for good: after SHARD_STALL it reads on."""
    cfg = NodeConfig(mesh_port=-1, endpoints=["tcp://127.0.0.1:0"], metrics_port=-1,
                     shards=2, tick_interval=0.02)
    ctx: zmq.Context[Any] = zmq.Context()
    pid = 0
    try:
        with NodeThread(cfg) as n:
            pub, other = Raw(ctx, n.endpoint), Raw(ctx, n.endpoint)
            pub.hello("pub")
            other.hello("other")
            pid = int(n.stats()["shards"][0]["pid"])
            os.kill(pid, signal.SIGSTOP)
            for _ in range(3):  # batches for the stopped shard: the node stops reading
                pub.send([14, "t/x", b"to the stopped shard"])
                time.sleep(0.3)
            other.send([4, 5])
            assert isinstance(other.until(is_(p.Pong, token=5), 20), p.Pong)
            os.kill(pid, signal.SIGKILL)
            pid = 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
        ctx.destroy(linger=0)


def test_refused_input_gets_coded_answers_and_control_commands_still_run() -> None:
    """What the driver refuses (a session over its share, its park full): QoS 0 dropped and
    counted, QoS 1 and requests answered ERROR OVERLOADED with their ids, PING answered."""
    from macula.control.broker import Broker

    b = Broker()
    b.receive(b"id", [SIG, p.encode([[1, 1, "r", "n", "", 0]])], 0.0)
    s = b.sessions[b"id"]
    b.take_dirty()
    while b.next_body(s) is not None:  # the WELCOME
        pass
    cmds = p.decode_commands(p.encode([[14, "t", b"a", 1, 7], [14, "t", b"b"], [4, 3],
                                       [10, 4, "t/#"], [14, "t", b"c", 1, 8]]))
    b.refuse(s, cmds)
    assert b.take_dirty() == [s]
    out = list(p.decode_node_body(b.next_body(s)))
    errors = {(c.ref, c.code) for c in out if isinstance(c, p.Error)}
    assert errors == {(7, Err.OVERLOADED), (4, Err.OVERLOADED), (8, Err.OVERLOADED)}
    assert p.Pong(3) in out
    assert b.drops["ingress_throttled"] == 1 and b.errors["OVERLOADED"] == 3
    assert b.messages_in == 0 and not s.subs  # nothing was routed or subscribed
