"""The node's speed against the control-plane issue's bars, in one table.

    python tools/bench_node.py [--runs 3] [--quick] [--fanout-only] [--wide-only]
                               [--io-threads 1 2] [--ipc] [--fanout-procs 4]
                               [--shards 0 1 2 4] [--wide-procs 2]

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

Delivery shards (issue 6), for each ``--shards`` value (0: matching in the node process):

- one PUBLISH → 25,000 subscriptions over 250 sockets (one session each, in
  ``--wide-procs`` receiving processes, default 2: one per core), time from the send to the
  last of the 25,000 EVENTs (the receivers count EVENTs from each body's array header).
  MCP/1 gives a session one subscription per filter string, so 100 subscriptions per socket
  are 100 distinct filters that all match the 13-level topic (level i of filter j is ``+``
  when bit i of j is set). "1 filter set": every socket subscribes the same 100 filters
  (each filter shared by 250 subscribers); "50 filter sets": sockets in 50 groups of 5, each
  group its own 100 filters (5,000 filters, 500 subscriptions per set). The bar: ≤ 10 ms,
  and the two cases within 1.5× of each other;
- one publisher → 100 subscriber sockets (4 processes, one subscription each), 100,000
  PUBLISH in messages of 100: EVENTs delivered per second (first to last arrival); then
  30,000 PUBLISH each on a topic of its own (``load/<i>``, subscribers on ``load/+``), so
  that every message is matched afresh instead of through a shard's cached plan.

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


def start_node(endpoint: str, io_threads: int,
               shards: int | None = None) -> tuple[subprocess.Popen[str], str]:
    env = dict(os.environ, MACULA_IO_THREADS=str(io_threads), MACULA_MESH_PORT="-1")
    if shards is not None:
        env["MACULA_SHARDS"] = str(shards)
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
        pub = q.session(ctx, endpoint, "cfanpub")
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


# -- delivery shards: 25,000 subscriptions, one publisher -> many subscribers -----------------
WIDE_TOPIC = "f/a/n/o/u/t/a/b/c/d/e/g/h"
_LEVELS = WIDE_TOPIC.split("/")


def wide_filter(j: int) -> str:
    """Filter ``j`` of those matching WIDE_TOPIC: level i is ``+`` when bit i of j is set."""
    return "/".join("+" if j >> i & 1 else lv for i, lv in enumerate(_LEVELS))


def wide_fanout(endpoint: str, sets: int, procs: int, rounds: int,
                sockets: int = 250, per_socket: int = 100) -> list[float]:
    """One PUBLISH to ``sockets`` x ``per_socket`` subscriptions; ``sets`` filter sets."""
    per_set = sockets // sets
    subs = [[wide_filter((i // per_set) * per_socket + j) for j in range(per_socket)]
            for i in range(sockets)]
    return q.fan_rounds(endpoint, [subs[k::procs] for k in range(procs)], WIDE_TOPIC, rounds,
                        f"25k ({sets} filter sets)")


def load_subscribers(endpoint: str, count: int, expect: int, flt: str, ready: mp.Event,
                     out: mp.Queue) -> None:  # type: ignore[type-arg]
    import zmq

    ctx = zmq.Context()
    socks, poller = q.open_subscribers(ctx, endpoint, [[flt]] * count, "load")
    ready.set()
    got = 0
    first = last = 0.0
    want = count * expect
    while got < want:
        events = poller.poll(3000)
        if not events:
            break
        for s, _ in events:
            while True:
                try:
                    body = s.recv_multipart(zmq.NOBLOCK)[1]
                except zmq.Again:
                    break
                got += q.events_in(body)
        last = time.perf_counter()
        if not first:
            first = last
    out.put((got, first, last))
    for s in socks:
        s.close(0)
    ctx.term()


def one_to_many(endpoint: str, subscribers: int = 100, procs: int = 4, n: int = 100_000,
                batch: int = 100, distinct: bool = False) -> tuple[int, float]:
    """One publisher, ``subscribers`` sockets: EVENTs delivered and first-to-last time.
    ``distinct``: every message has a topic of its own (``load/<i>``, subscribers on
    ``load/+``), so each is matched afresh (no cached plan); else all go to ``load/t``."""
    readies = [mp.Event() for _ in range(procs)]
    out: mp.Queue[tuple[int, float, float]] = mp.Queue()
    flt = "load/+" if distinct else "load/t"
    ps = [mp.Process(target=load_subscribers,
                     args=(endpoint, subscribers // procs, n, flt, readies[k], out))
          for k in range(procs)]
    for pr in ps:
        pr.start()
    for r in readies:
        r.wait(60)
    import zmq

    ctx = zmq.Context()
    pub = q.session(ctx, endpoint, "loadpub")
    body = q.enc.encode([[14, "load/t", PAYLOAD]] * batch)
    for i in range(n // batch):
        if distinct:
            body = q.enc.encode([[14, f"load/{i * batch + j}", PAYLOAD] for j in range(batch)])
        pub.send_multipart([q.SIG, body])
    results = [out.get(timeout=120) for _ in range(procs)]
    for pr in ps:
        pr.join(30)
    pub.close(0)
    ctx.term()
    got = sum(r[0] for r in results)
    return got, max(r[2] for r in results) - min(r[1] for r in results)


def shard_rows(args: argparse.Namespace, runs: int) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    wide: dict[int, tuple[float, float]] = {}
    for shards in args.shards:
        node, ep = start_node("tcp://127.0.0.1:0", 1, shards)
        try:
            one = statistics.median(wide_fanout(ep, 1, args.wide_procs, runs))
            fifty = statistics.median(wide_fanout(ep, 50, args.wide_procs, runs))
        finally:
            stop_node(node)
        wide[shards] = (one, fifty)
    # The throughput cases run one node per shard count side by side (an idle node costs
    # nothing) and take turns, run by run, so that a change in the machine's load during the
    # bench does not favour one shard count.
    nodes = {shards: start_node("tcp://127.0.0.1:0", 1, shards) for shards in args.shards}
    same: dict[int, list[float]] = {k: [] for k in args.shards}
    own: dict[int, list[float]] = {k: [] for k in args.shards}
    try:
        for _ in range(runs):
            for shards, (_, ep) in nodes.items():
                got, elapsed = one_to_many(ep)
                same[shards].append(got / elapsed)
                print(f"  shards={shards} 1 pub → 100 subs: {got} EVENTs in {elapsed:.3f} s",
                      flush=True)
                got, elapsed = one_to_many(ep, n=30_000, distinct=True)
                own[shards].append(got / elapsed)
                print(f"  shards={shards}   every message its own topic: {got} EVENTs in "
                      f"{elapsed:.3f} s", flush=True)
    finally:
        for node, _ in nodes.values():
            stop_node(node)
    r1 = statistics.median(same[1]) if 1 in same else 0.0
    d1 = statistics.median(own[1]) if 1 in own else 0.0
    for shards in args.shards:
        one, fifty = wide[shards]
        ratio = max(one, fifty) / min(one, fifty)
        rows.append((f"shards={shards}: 1 message → 25,000 subs, 1 filter set",
                     f"{one * 1e3:.1f} ms", "≤ 10 ms", _met(one <= 10e-3)))
        rows.append((f"shards={shards}: 1 message → 25,000 subs, 50 filter sets",
                     f"{fifty * 1e3:.1f} ms", f"≤ {1.5 * one * 1e3:.1f} ms",
                     _met(ratio <= 1.5)))
        for label, rates, base in (("1 pub → 100 subs, EVENTs delivered", same[shards], r1),
                                   ("  same, every message its own topic", own[shards], d1)):
            r = statistics.median(rates)
            gain = f"× {r / base:.2f} vs 1" if shards == 2 and base else ""
            rows.append((f"shards={shards}: {label}", f"{r:,.0f} msg/s", gain,
                         _met(r >= base) if gain else ""))
    return rows


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
    ap.add_argument("--shards", type=int, nargs="+", default=[0, 1, 2, 4],
                    help="delivery shard counts for the shard cases (0: in the node)")
    ap.add_argument("--wide-only", action="store_true", help="only the delivery shard cases")
    ap.add_argument("--wide-procs", type=int, default=2,
                    help="receiving processes for the 25,000-subscription cases")
    ap.add_argument("--control-shards", type=int, default=None,
                    help="MACULA_SHARDS for the control-plane cases (default: the node's)")
    args = ap.parse_args()
    runs = 1 if args.quick else args.runs
    n = 50_000 if args.quick else 300_000
    calls = 1000 if args.quick else 5000
    rows: list[tuple[str, str, str, str]] = []
    if args.wide_only:
        return _print(shard_rows(args, runs), runs)

    node, ep = start_node("tcp://127.0.0.1:0", 1, args.control_shards)
    try:
        if not args.fanout_only:
            r = median_rate(lambda: q.one_run(ep, n, 1000), runs, "batched")
            rows.append(("1 pub → 1 sub, batched (1,000 PUBLISH/message)", f"{r:,.0f} msg/s",
                         "≥ 500,000", _met(r >= 500_000)))
            r = median_rate(lambda: q.one_run(ep, n, 1000, client_subscriber, client_publisher),
                            runs, "Client batched")
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
                node, ep = start_node(endpoint, threads, args.control_shards)
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
    if not args.fanout_only:
        rows += shard_rows(args, runs)
    return _print(rows, runs)


def _print(rows: list[tuple[str, str, str, str]], runs: int) -> int:
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
