"""Quick throughput check of one node: one publisher -> one subscriber, separate processes.

    python tools/bench_node_quick.py [--n 200000] [--batch 1000 1] [--runs 3]
                                     [--fanout 1000] [--calls 5000]

Starts ``macula node`` in a subprocess (ephemeral port), a subscriber process and a
publisher process, both raw pyzmq DEALERs speaking MCP/1 (control/SPEC.md). The subscriber
times from its first to its last EVENT; the figure is the median over runs of
received / elapsed. Batched mode sends ``--batch`` PUBLISH commands per ZeroMQ message;
``--batch 1`` is one PUBLISH per message. Payloads are 64 bytes, QoS 0. The node's
numbers received are printed, so that a rate bought with drops is visible. Then: one
PUBLISH to ``--fanout`` subscriber sockets (spread over ``--fanout-procs`` processes; the
time from the send to the last arrival, CLOCK_MONOTONIC being shared by all processes),
and ``--calls`` sequential RPC round trips caller -> node -> provider -> node -> caller.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import msgspec
import zmq

SIG = b"MCP\x01"
enc = msgspec.msgpack.Encoder()
dec = msgspec.msgpack.Decoder()


def session(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, name: str, *,
            sndhwm: int = 0, rcvhwm: int = 0) -> zmq.Socket[bytes]:
    """A DEALER connected to ``endpoint`` with its session open (HELLO answered by WELCOME);
    a high-water mark of 0 leaves ZeroMQ's default."""
    sock = ctx.socket(zmq.DEALER)
    if sndhwm:
        sock.setsockopt(zmq.SNDHWM, sndhwm)
    if rcvhwm:
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
    sock.connect(endpoint)
    sock.send_multipart([SIG, enc.encode([[1, 1, "bench", name, "", 60_000]])])
    reply = dec.decode(sock.recv_multipart()[1])
    assert reply[0][0] == 2, reply
    return sock


def events_in(body: bytes) -> int:
    """The number of commands in a body, read from its array header (no decoding)."""
    b = body[0]
    if b & 0xF0 == 0x90:
        return b & 0x0F
    if b == 0xDC:
        return int.from_bytes(body[1:3], "big")
    return int.from_bytes(body[1:5], "big")


def open_subscribers(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str,
                     filters: list[list[str]], name: str,
                     ) -> tuple[list[zmq.Socket[bytes]], zmq.Poller]:
    """One DEALER per entry of ``filters``, opening its session and subscribing to those
    filters in one message; returns (the sockets, a poller of them) once every SUBACK came."""
    socks = []
    for i, flts in enumerate(filters):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.RCVHWM, 100_000)
        s.connect(endpoint)
        s.send_multipart([SIG, enc.encode(
            [[1, 1, "bench", f"{name}{i}", "", 60_000]]
            + [[10, 2 + j, f, 0] for j, f in enumerate(flts)])])
        socks.append(s)
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    want = sum(len(f) for f in filters)
    acked = 0
    while acked < want:  # WELCOME + the SUBACKs
        for s, _ in poller.poll(10_000):
            cmds = dec.decode(s.recv_multipart()[1])
            acked += sum(1 for c in cmds if c[0] == 11)
    return socks, poller


def subscriber(endpoint: str, n: int, ready: mp.Event, out: mp.Queue) -> None:  # type: ignore[type-arg]
    ctx = zmq.Context()
    sock = session(ctx, endpoint, "sub", rcvhwm=100_000)
    sock.send_multipart([SIG, enc.encode([[10, 2, "bench/#", 0]])])
    assert dec.decode(sock.recv_multipart()[1])[0][0] == 11
    ready.set()
    got = 0
    first = last = 0.0
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while got < n:
        if not poller.poll(3000):
            break
        body = sock.recv_multipart()[1]
        cmds = dec.decode(body)
        now = time.perf_counter()
        if not first:
            first = now
        last = now
        got += sum(1 for c in cmds if c[0] == 16)
    out.put((got, last - first))
    sock.close(0)
    ctx.term()


def publisher(endpoint: str, n: int, batch: int) -> None:
    ctx = zmq.Context()
    sock = session(ctx, endpoint, "pub", sndhwm=1000)
    payload = b"x" * 64
    body = enc.encode([[14, "bench/topic", payload]] * batch)
    for _ in range(n // batch):
        sock.send_multipart([SIG, body])
    sock.send_multipart([SIG, enc.encode([[30, 9]])])
    while True:  # wait for the STATS reply: everything before it was processed
        cmds = dec.decode(sock.recv_multipart()[1])
        if any(c[0] == 31 for c in cmds):
            break
    sock.close(0)
    ctx.term()


def one_run(endpoint: str, n: int, batch: int, sub_main: Callable[..., None] = subscriber,
            pub_main: Callable[..., None] = publisher) -> tuple[int, float]:
    """``sub_main(endpoint, n, ready, out)`` receives what ``pub_main(endpoint, n, batch)``
    publishes: (messages received, first-to-last time)."""
    ready = mp.Event()
    out: mp.Queue[tuple[int, float]] = mp.Queue()
    sub = mp.Process(target=sub_main, args=(endpoint, n, ready, out))
    sub.start()
    ready.wait(10)
    pub = mp.Process(target=pub_main, args=(endpoint, n, batch))
    pub.start()
    pub.join(120)
    got, elapsed = out.get(timeout=120)
    sub.join(10)
    return got, elapsed


def fan_subscribers(endpoint: str, filters: list[list[str]], rounds: int, ready: mp.Event,
                    out: mp.Queue) -> None:  # type: ignore[type-arg]
    """One DEALER per entry of ``filters`` (subscribed to those); per round the EVENTs
    received and the time of the last one."""
    ctx = zmq.Context()
    socks, poller = open_subscribers(ctx, endpoint, filters, "fan")
    want = sum(len(f) for f in filters)
    ready.set()
    for _ in range(rounds):
        got = 0
        last = 0.0
        while got < want:
            events = poller.poll(5000)
            if not events:
                break
            for s, _ in events:
                got += events_in(s.recv_multipart()[1])
            last = time.perf_counter()
        out.put((got, last))
    for s in socks:
        s.close(0)
    ctx.term()


def fan_rounds(endpoint: str, filters: list[list[list[str]]], topic: str, rounds: int,
               label: str) -> list[float]:
    """Per round one PUBLISH on ``topic`` to sockets in ``len(filters)`` processes (each
    process's sockets and their filters, see fan_subscribers): the time from the send to the
    last EVENT."""
    procs = len(filters)
    readies = [mp.Event() for _ in range(procs)]
    out: mp.Queue[tuple[int, float]] = mp.Queue()
    ps = [mp.Process(target=fan_subscribers, args=(endpoint, filters[k], rounds, readies[k], out))
          for k in range(procs)]
    for pr in ps:
        pr.start()
    for r in readies:
        r.wait(120)
    ctx = zmq.Context()
    pub = session(ctx, endpoint, "fanpub")
    total = sum(len(f) for per in filters for f in per)
    lat = []
    for _ in range(rounds):
        time.sleep(0.3)
        t0 = time.perf_counter()
        pub.send_multipart([SIG, enc.encode([[14, topic, b"x" * 64]])])
        results = [out.get(timeout=60) for _ in range(procs)]
        got = sum(g for g, _ in results)
        lat.append(max(t for _, t in results) - t0)
        print(f"  {label}: {got}/{total} delivered, last after {lat[-1] * 1e3:.2f} ms",
              flush=True)
    for pr in ps:
        pr.join(30)
    pub.close(0)
    ctx.term()
    return lat


def fanout(endpoint: str, subscribers: int, procs: int, rounds: int) -> list[float]:
    """One PUBLISH to ``subscribers`` sockets (one subscription each) in ``procs`` processes."""
    per_proc = [["fan/t"]] * (subscribers // procs)
    return fan_rounds(endpoint, [per_proc] * procs, "fan/t", rounds, "fan-out")


def rpc_provider(endpoint: str, ready: mp.Event) -> None:  # type: ignore[type-arg]
    ctx = zmq.Context()
    sock = session(ctx, endpoint, "provider")
    sock.send_multipart([SIG, enc.encode([[20, 2, "bench.echo"]])])
    sock.recv_multipart()
    ready.set()
    while sock.poll(3000):
        cmds = dec.decode(sock.recv_multipart()[1])
        replies = [[27, c[1], c[4]] for c in cmds if c[0] == 26]
        if replies:
            sock.send_multipart([SIG, enc.encode(replies)])
    sock.close(0)
    ctx.term()


def rpc(endpoint: str, calls: int) -> list[float]:
    ready = mp.Event()
    prov = mp.Process(target=rpc_provider, args=(endpoint, ready))
    prov.start()
    ready.wait(30)
    ctx = zmq.Context()
    sock = session(ctx, endpoint, "caller")
    times = []
    for i in range(calls):
        body = enc.encode([[24, i, "bench.echo", i]])
        t0 = time.perf_counter()
        sock.send_multipart([SIG, body])
        sock.recv_multipart()
        times.append(time.perf_counter() - t0)
    sock.close(0)
    ctx.term()
    prov.join(10)
    return times


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--batch", type=int, nargs="*", default=[1000, 1])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--fanout", type=int, default=1000, help="subscribers (0: skip)")
    ap.add_argument("--fanout-procs", type=int, default=4)
    ap.add_argument("--calls", type=int, default=5000, help="RPC calls (0: skip)")
    args = ap.parse_args()
    node = subprocess.Popen(
        [sys.executable, "-m", "macula.cli", "node", "--endpoint", "tcp://127.0.0.1:0",
         "--metrics-port", "-1", "--mesh-port", "-1"],  # the control plane alone
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert node.stdout is not None
        line = node.stdout.readline()
        endpoint = line.split("endpoints=")[1].split()[0].split(",")[0]
        for batch in args.batch:
            n = args.n if batch > 1 else max(args.n // 4, 10_000)
            rates = []
            for _ in range(args.runs):
                got, elapsed = one_run(endpoint, n, batch)
                rates.append(got / elapsed if elapsed > 0 else 0.0)
                print(f"  batch={batch}: received {got}/{n} in {elapsed:.3f} s", flush=True)
            print(f"batch={batch:5}  median {statistics.median(rates):>10,.0f} msg/s "
                  f"(runs: {', '.join(f'{r:,.0f}' for r in rates)})", flush=True)
        if args.fanout:
            lat = fanout(endpoint, args.fanout, args.fanout_procs, args.runs)
            print(f"fan-out to {args.fanout}: median {statistics.median(lat) * 1e3:.2f} ms "
                  f"until the last delivery", flush=True)
        if args.calls:
            t = sorted(rpc(endpoint, args.calls))
            print(f"RPC round trip through the node: p50 {t[len(t) // 2] * 1e6:.0f} us, "
                  f"p99 {t[int(len(t) * 0.99)] * 1e6:.0f} us ({len(t)} calls)", flush=True)
    finally:
        node.terminate()
        node.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
