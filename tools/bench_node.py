"""The node's speed against the control-plane issue's bars, in one table.

    python tools/bench_node.py [--runs 3] [--quick] [--fanout-only]
                               [--io-threads 1 2] [--ipc] [--fanout-procs 4]

Everything runs in separate processes: ``macula node`` (a subprocess, ephemeral port), and
each publisher, subscriber, caller and provider in its own ``multiprocessing`` process.
Payloads are 64 bytes, QoS 0. Each figure is the median of ``--runs`` runs.

Cases (the raw-pyzmq ones come from tools/bench_node_quick.py: hand-written MCP/1, so they
measure the node, not a client library):

- 1 publisher → 1 subscriber, 1,000 PUBLISH per ZeroMQ message (raw), and the same with the
  publisher using ``macula.Client.publish_nowait`` (batched automatically per loop
  iteration) and the subscriber ``async for`` over a ``Subscription``;
- 1 publisher → 1 subscriber, one PUBLISH per message (raw);
- one PUBLISH → 1,000 subscriber sockets spread over ``--fanout-procs`` processes, time from
  the send to the last arrival (CLOCK_MONOTONIC is shared by the processes); repeated for
  each ``--io-threads`` value of the node and, with ``--ipc``, over an ``ipc://`` endpoint;
- RPC round trip caller → node → provider → node → caller, p50: raw, and with
  ``macula.Client.call`` / ``Client.register`` on both sides.

The machine has 2 cores: the node, its libzmq I/O thread and every client process share
them, so fan-out in particular measures the whole machine, not the node alone.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools import bench_node_quick as q

PAYLOAD = b"x" * 64


def start_node(endpoint: str, io_threads: int) -> tuple[subprocess.Popen[str], str]:
    env = dict(os.environ, MACULA_IO_THREADS=str(io_threads))
    node = subprocess.Popen(
        [sys.executable, "-m", "macula.cli", "node", "--endpoint", endpoint,
         "--metrics-port", "-1"],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    assert node.stdout is not None
    line = node.stdout.readline()
    if "endpoints=" not in line:
        node.kill()
        raise RuntimeError(f"node did not start: {line!r}")
    return node, line.split("endpoints=")[1].split()[0].split(",")[0]


def stop_node(node: subprocess.Popen[str]) -> None:
    node.terminate()
    node.wait(10)


# -- macula.Client cases ---------------------------------------------------------------------
def client_subscriber(endpoint: str, n: int, ready: mp.Event, out: mp.Queue) -> None:  # type: ignore[type-arg]
    from macula.client import Client

    async def main() -> None:
        c = await Client.connect(endpoint, realm="bench", name="csub")
        c.queue_size = n + 1
        sub = await c.subscribe("bench/#")
        ready.set()
        got = 0
        first = last = 0.0
        while got < n:
            try:
                await sub.get(3.0)
            except TimeoutError:
                break
            last = time.perf_counter()
            if not first:
                first = last
            got += 1
        out.put((got, last - first))
        await c.close()

    asyncio.run(main())


def client_publisher(endpoint: str, n: int, chunk: int) -> None:
    from macula.client import Client

    async def main() -> None:
        c = await Client.connect(endpoint, realm="bench", name="cpub")
        pub = c.publish_nowait
        for _ in range(n // chunk):
            for _ in range(chunk):  # one loop iteration: these leave in one body
                pub("bench/topic", PAYLOAD)
            await asyncio.sleep(0)
        await c.stats()  # everything before it was processed
        await c.close()

    asyncio.run(main())


def client_throughput(endpoint: str, n: int) -> tuple[int, float]:
    ready = mp.Event()
    out: mp.Queue[tuple[int, float]] = mp.Queue()
    sub = mp.Process(target=client_subscriber, args=(endpoint, n, ready, out))
    sub.start()
    ready.wait(10)
    pub = mp.Process(target=client_publisher, args=(endpoint, n, 1000))
    pub.start()
    pub.join(120)
    got, elapsed = out.get(timeout=120)
    sub.join(10)
    return got, elapsed


def client_provider(endpoint: str, ready: mp.Event, stop: mp.Event) -> None:  # type: ignore[type-arg]
    from macula.client import Client

    async def main() -> None:
        c = await Client.connect(endpoint, realm="bench", name="cprov")
        await c.register("bench.cecho", lambda args: args)
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await c.close()

    asyncio.run(main())


def client_rpc(endpoint: str, calls: int) -> list[float]:
    from macula.client import Client

    ready, stop = mp.Event(), mp.Event()
    prov = mp.Process(target=client_provider, args=(endpoint, ready, stop))
    prov.start()
    ready.wait(30)

    async def main() -> list[float]:
        c = await Client.connect(endpoint, realm="bench", name="ccaller")
        times = []
        for i in range(calls):
            t0 = time.perf_counter()
            await c.call("bench.cecho", i)
            times.append(time.perf_counter() - t0)
        await c.close()
        return times

    try:
        return asyncio.run(main())
    finally:
        stop.set()
        prov.join(10)


# -- fan-out with C receivers ------------------------------------------------------------------
C_DIR = Path(__file__).resolve().parent.parent / "control" / "clients" / "c"


def build_c_fanout(build: str) -> Path | None:
    proc = subprocess.run(["make", "-C", str(C_DIR), f"BUILD={build}", f"{build}/macula_fanout"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  (C fan-out receiver not built: {proc.stdout}{proc.stderr})")
        return None
    return Path(build) / "macula_fanout"


def c_fanout(program: Path, endpoint: str, subscribers: int, procs: int,
             rounds: int) -> list[float]:
    """Like tools/bench_node_quick.fanout, with the receivers written in C (macula_fanout)."""
    import zmq

    ps = [subprocess.Popen([str(program), endpoint, str(subscribers // procs), str(rounds),
                            "fan/t"], stdout=subprocess.PIPE, text=True) for _ in range(procs)]
    try:
        for pr in ps:
            assert pr.stdout is not None and pr.stdout.readline().strip() == "READY"
        ctx = zmq.Context()
        pub = ctx.socket(zmq.DEALER)
        pub.connect(endpoint)
        q._hello(pub, "cfanpub")
        lat = []
        for _ in range(rounds):
            time.sleep(0.3)
            t0 = time.perf_counter()  # CLOCK_MONOTONIC, as the receivers' stamps
            pub.send_multipart([q.SIG, q.enc.encode([[14, "fan/t", PAYLOAD]])])
            results = [pr.stdout.readline().split() for pr in ps if pr.stdout is not None]
            got = sum(int(r[1]) for r in results)
            lat.append(max(float(r[2]) for r in results) - t0)
            print(f"  C fan-out: {got}/{subscribers} delivered, last after "
                  f"{lat[-1] * 1e3:.2f} ms", flush=True)
        pub.close(0)
        ctx.term()
        return lat
    finally:
        for pr in ps:
            pr.wait(30)


# -- the table ----------------------------------------------------------------------------------
def median_rate(fn: object, runs: int, label: str) -> float:
    rates = []
    for _ in range(runs):
        got, elapsed = fn()  # type: ignore[operator]
        rates.append(got / elapsed if elapsed > 0 else 0.0)
        print(f"  {label}: received {got} in {elapsed:.3f} s", flush=True)
    return statistics.median(rates)


def p50(times: list[float]) -> float:
    return sorted(times)[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smaller counts, one run")
    ap.add_argument("--fanout-only", action="store_true")
    ap.add_argument("--fanout", type=int, default=1000)
    ap.add_argument("--fanout-procs", type=int, default=4)
    ap.add_argument("--io-threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--ipc", action="store_true", help="also run fan-out over ipc://")
    args = ap.parse_args()
    runs = 1 if args.quick else args.runs
    n = 50_000 if args.quick else 300_000
    calls = 1000 if args.quick else 5000
    rows: list[tuple[str, str, str, str]] = []

    node, ep = start_node("tcp://127.0.0.1:0", 1)
    try:
        if not args.fanout_only:
            r = median_rate(lambda: q.one_run(ep, n, 1000), runs, "batched")
            rows.append(("1 pub → 1 sub, batched (1,000 PUBLISH/message)", f"{r:,.0f} msg/s",
                         "≥ 500,000", _met(r >= 500_000)))
            r = median_rate(lambda: client_throughput(ep, n), runs, "Client batched")
            rows.append(("  same through macula.Client on both sides", f"{r:,.0f} msg/s",
                         "", ""))
            r = median_rate(lambda: q.one_run(ep, max(n // 4, 10_000), 1), runs, "single")
            rows.append(("1 pub → 1 sub, one PUBLISH per message", f"{r:,.0f} msg/s",
                         "≥ 150,000", _met(r >= 150_000)))
            raw = statistics.median(p50(q.rpc(ep, calls)) for _ in range(runs))
            rows.append(("RPC round trip, p50 (raw pyzmq clients)", f"{raw * 1e6:.0f} µs",
                         "≤ 250 µs", _met(raw <= 250e-6)))
            cli = statistics.median(p50(client_rpc(ep, calls)) for _ in range(runs))
            rows.append(("RPC round trip, p50 (macula.Client call/register)",
                         f"{cli * 1e6:.0f} µs", "≤ 250 µs", _met(cli <= 250e-6)))
    finally:
        stop_node(node)

    fan_cases = [("tcp", t) for t in args.io_threads]
    if args.ipc:
        fan_cases += [("ipc", t) for t in args.io_threads]
    build = tempfile.mkdtemp()
    program = build_c_fanout(build)
    receivers = ["python"] + (["C"] if program is not None else [])
    for transport, threads in fan_cases:
        for lang in receivers:
            with tempfile.TemporaryDirectory() as tmp:
                endpoint = ("tcp://127.0.0.1:0" if transport == "tcp"
                            else f"ipc://{tmp}/node.sock")
                node, ep = start_node(endpoint, threads)
                try:
                    if lang == "C" and program is not None:
                        lats = c_fanout(program, ep, args.fanout, args.fanout_procs, runs)
                    else:
                        lats = q.fanout(ep, args.fanout, args.fanout_procs, runs)
                    lat = statistics.median(lats)
                finally:
                    stop_node(node)
            rows.append((f"1 message → {args.fanout:,} sockets ({transport}, "
                         f"io_threads={threads}, {args.fanout_procs} {lang} procs)",
                         f"{lat * 1e3:.1f} ms", "≤ 8 ms", _met(lat <= 8e-3)))

    w = max(len(r[0]) for r in rows)
    print(f"\n{'case':<{w}}  {'ours':>15}  {'bar':>10}  met")
    for case, ours, bar, met in rows:
        print(f"{case:<{w}}  {ours:>15}  {bar:>10}  {met}")
    print(f"(medians of {runs}; 64-byte payloads; {os.cpu_count()} cores shared by all processes)")
    return 0


def _met(ok: bool) -> str:
    return "yes" if ok else "NO"


if __name__ == "__main__":
    sys.exit(main())
