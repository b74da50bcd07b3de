"""Peer-wire benchmark (issue 3): macula's QUIC links against raw aioquic, in the same run.

    python tools/bench_wire.py                 # --impl both, 3 runs per figure, ~2-3 min
    python tools/bench_wire.py --impl raw      # only the raw aioquic baseline
    python tools/bench_wire.py --quick         # 1 run, small N: a smoke run (< 30 s)
    python tools/bench_wire.py --dgram 1200 --dgram 16384   # datagram sizes (default both)

Node B (the server) runs in its own process, started with the multiprocessing "spawn"
context; it listens on 127.0.0.1 port 0 and sends its port back over a pipe. Node A (the
client) runs in this process, one fresh ``asyncio.run`` and one fresh connection per run.
Both sides use the same `WireConfig` (max_datagram_size, flow-control windows, ...), and the
table's footer prints it.

Cases (64-byte messages, every message one frame of docs/FRAMES.md):

- ``throughput x1``: one message per ``send_stream_data`` (+ ``transmit()``), N messages on
  one stream; B parses the frames, counts them and answers "done" on the same stream;
  rate = N / (first write .. "done" back at A). A keeps at most ``send_window`` bytes
  written-but-unacked (see tools/wire_raw.py: a sustained rate, not an enqueue rate);
- ``throughput x100``: the same with 100 messages per write;
- ``echo p50`` / ``echo p99``: one message, B echoes it on the same stream, A waits for it;
  ``rounds`` timed round trips after ``warmup`` untimed ones;
- ``handshake p50``: time for ``connect()`` to complete (a new connection each time).

Every figure is the median over ``--runs`` runs (each run itself a p50/p99 for the latency
cases). The raw and macula runs of a case alternate (raw, macula, raw, macula, ...), so that
a noisy neighbour hurts both alike.

**What limits raw aioquic here** (2 cores, Nov 2026): node B, the receiver, is CPU-bound
in ``receive_datagram`` (one Python pass per packet: ~18 messages per 1,200-byte packet,
~250 per 16 KiB one), while A idles in ``epoll``. With the OS default UDP receive buffer
(212,992 bytes) B drops a few hundred datagrams per run (``RcvbufErrors`` in
/proc/net/snmp) and reno backs off; ``--udp-buffer 4194304`` removes the drops but the
1,200-byte batched rate *fell* (~300k vs ~500k msg/s): without loss, reno's window grows
until B's queue, not A, sets the pace. Compare impls with the same ``--udp-buffer``.

**Adding an implementation.** An impl is a module with the two functions of `Impl`
(``serve`` runs in B's process; ``run_client`` in A's) using `WireConfig` and `Case` from
tools/wire_raw.py; list it in `IMPLS`. An impl (or a case of it) that raises
``NotImplementedError`` prints as "n/a". "macula vs raw" is macula's figure as a percentage
of raw aioquic's (higher is better for msg/s, lower is better for latencies).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import multiprocessing as mp
import os
import platform
import signal
import statistics
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Protocol

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.wire_raw import Case, WireConfig

# impl name -> module implementing `Impl`
IMPLS = {"raw": "tools.wire_raw", "macula": "tools.wire_macula"}
DGRAM_SIZES = (1200, 16384)
SERVER_START_TIMEOUT = 30.0


class Impl(Protocol):
    """What bench_wire needs from a peer-wire implementation (a module will do)."""

    def serve(self, port_pipe: Connection, config: WireConfig) -> None:
        """Node B: listen on ``config.host:config.port`` (port 0: any), send
        ``("port", port)`` on ``port_pipe`` once listening, then serve until killed."""
        ...

    def run_client(self, case: Case, config: WireConfig) -> dict[str, float]:
        """Node A: run ``case`` against B at ``config.host:config.port`` and return its
        figures by name (see `METRICS`). Raise NotImplementedError for an unsupported case."""
        ...


class _Missing:
    """Stands in for an impl whose module does not exist yet: everything is n/a."""

    def __init__(self, name: str) -> None:
        self.name = name

    def serve(self, port_pipe: Connection, config: WireConfig) -> None:
        raise NotImplementedError(f"{IMPLS[self.name]} not written yet")

    def run_client(self, case: Case, config: WireConfig) -> dict[str, float]:
        raise NotImplementedError(f"{IMPLS[self.name]} not written yet")


def load_impl(name: str) -> Impl:
    try:
        mod = importlib.import_module(IMPLS[name])
    except ModuleNotFoundError as exc:
        if exc.name != IMPLS[name]:
            raise
        return _Missing(name)
    return mod  # a module is an Impl structurally


@dataclass(frozen=True)
class Metric:
    key: str  # the name run_client returns it under
    label: str  # row label suffix
    unit: str
    bar: str  # the bar for macula, in words ("" = none)
    check: Callable[[float, float | None], bool] | None  # (macula, raw) -> met


def _thr_bar(floor: float | None) -> Callable[[float, float | None], bool]:
    def check(ours: float, raw: float | None) -> bool:
        return (floor is None or ours >= floor) and (raw is None or ours >= 0.8 * raw)

    return check


# case name -> the figures it yields
METRICS: dict[str, tuple[Metric, ...]] = {
    "throughput x1": (Metric("rate", "", "msg/s", ">= 80% raw", _thr_bar(None)),),
    "throughput x100": (
        Metric("rate", "", "msg/s", ">= 150,000 and >= 80% raw", _thr_bar(150_000)),
    ),
    "echo": (
        Metric("p50", "p50", "us", "<= 400 us", lambda o, r: o <= 400),
        Metric("p99", "p99", "us", "<= 1,000 us", lambda o, r: o <= 1000),
    ),
    "handshake": (Metric("p50", "p50", "ms", "", None),),
    "restart": (
        Metric("seconds", "next send after B restarts", "s", "<= 1 s", lambda o, r: o <= 1.0),
    ),
}


def cases(quick: bool) -> list[Case]:
    if quick:
        return [
            Case("throughput x1", "throughput", messages=3_000, batch=1),
            Case("throughput x100", "throughput", messages=30_000, batch=100),
            Case("echo", "echo", rounds=500, warmup=100),
            Case("handshake", "handshake", rounds=10),
            Case("restart", "restart", rounds=1),
        ]
    return [
        Case("throughput x1", "throughput", messages=100_000, batch=1),
        Case("throughput x100", "throughput", messages=500_000, batch=100),
        Case("echo", "echo", rounds=5_000, warmup=500),
        Case("handshake", "handshake", rounds=50),
        Case("restart", "restart", rounds=1),
    ]


# --------------------------------------------------------------------------- processes


def _server_main(impl_name: str, pipe: Connection, cfg: WireConfig) -> None:
    """Body of node B's process (module level, so that "spawn" can import it)."""
    try:
        load_impl(impl_name).serve(pipe, cfg)
    except NotImplementedError as exc:
        pipe.send(("n/a", str(exc)))
    except KeyboardInterrupt:
        pass
    except BaseException:
        pipe.send(("error", traceback.format_exc()))
        raise


@dataclass
class Server:
    impl: str
    proc: BaseProcess | None
    port: int | None  # None: n/a
    note: str = ""


def start_server(impl_name: str, cfg: WireConfig) -> Server:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_server_main, args=(impl_name, child, cfg), name=f"B-{impl_name}", daemon=True
    )
    proc.start()
    child.close()
    try:
        if not parent.poll(SERVER_START_TIMEOUT):
            raise RuntimeError(f"{impl_name} server did not report a port")
        kind, value = parent.recv()
    except (EOFError, RuntimeError):
        stop_server(Server(impl_name, proc, None))
        raise
    if kind == "port":
        return Server(impl_name, proc, int(value))
    stop_server(Server(impl_name, proc, None))
    if kind == "n/a":
        return Server(impl_name, None, None, value)
    raise RuntimeError(f"{impl_name} server failed:\n{value}")


def stop_server(server: Server) -> None:
    proc = server.proc
    if proc is None:
        return
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    server.proc = None


# --------------------------------------------------------------------------- measuring


@dataclass
class Result:
    impl: str
    case: str
    dgram: int
    metric: Metric
    samples: list[float]
    note: str = ""  # why there is no figure ("n/a", "error: ...")

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None


def measure(
    impls: list[str], dgram: int, base: WireConfig, runs: int, quick: bool, log: bool
) -> list[Result]:
    cfg = dataclasses.replace(base, max_datagram_size=dgram)
    servers: dict[str, Server] = {}
    results: list[Result] = []
    try:
        for name in impls:
            servers[name] = start_server(name, cfg)
        for case in cases(quick):
            by_impl = {
                name: {m.key: Result(name, case.name, dgram, m, []) for m in METRICS[case.name]}
                for name in impls
            }
            for run in range(runs):
                for name in impls:
                    server, res = servers[name], by_impl[name]
                    if server.port is None:
                        for r in res.values():
                            r.note = "n/a"
                        continue
                    if any(r.note for r in res.values()):
                        continue
                    try:
                        figs = load_impl(name).run_client(
                            case, dataclasses.replace(cfg, port=server.port)
                        )
                    except NotImplementedError:
                        note = "n/a"
                    except Exception as exc:
                        note = f"error: {type(exc).__name__}: {exc}"[:60]
                        traceback.print_exc()
                    else:
                        note = ""
                        for key, r in res.items():
                            r.samples.append(figs[key])
                    if note:
                        for r in res.values():
                            r.note = note
                    if log:
                        shown = note or ", ".join(f"{k}={v:,.1f}" for k, v in figs.items())
                        print(
                            f"  [{dgram}] {name} {case.name} run {run + 1}: {shown}",
                            file=sys.stderr,
                            flush=True,
                        )
            for name in impls:
                results.extend(by_impl[name].values())
    finally:
        for server in servers.values():
            stop_server(server)
    return results


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if unit == "msg/s" else f"{v:,.1f}"


def format_results(results: list[Result]) -> str:
    raw = {(r.case, r.dgram, r.metric.key): r.median for r in results if r.impl == "raw"}
    header = ("impl", "case", "dgram", "median", "unit", "runs", "macula vs raw", "bar", "met")
    lines: list[tuple[str, ...]] = [header]
    for r in results:
        label = f"{r.case} {r.metric.label}".strip()
        med = r.median
        ref = raw.get((r.case, r.dgram, r.metric.key))
        vs = met = bar = "-"
        if r.impl != "raw":
            bar = r.metric.bar or "-"
            if med is not None and ref:
                vs = f"{100 * med / ref:.0f}%"
            if med is not None and r.metric.check is not None:
                met = "yes" if r.metric.check(med, ref) else "NO"
        runs = " / ".join(_fmt(s, r.metric.unit) for s in r.samples) or r.note
        lines.append(
            (
                r.impl,
                label,
                str(r.dgram),
                r.note if med is None else _fmt(med, r.metric.unit),
                r.metric.unit,
                runs,
                vs,
                bar,
                met,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |")
        if n == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=("raw", "macula", "both"), default="both")
    parser.add_argument("--quick", action="store_true", help="1 run, small N (smoke run)")
    parser.add_argument("--runs", type=int, default=None, help="runs per figure (default 3)")
    parser.add_argument("--dgram", type=int, action="append", help="max_datagram_size (repeatable)")
    parser.add_argument(
        "--send-window",
        type=int,
        default=WireConfig.send_window,
        help="A's cap on unacked bytes per stream (pacing)",
    )
    parser.add_argument(
        "--udp-buffer",
        type=int,
        default=WireConfig.udp_buffer,
        help="SO_RCVBUF/SO_SNDBUF of both sockets (0: OS default)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every run")
    args = parser.parse_args(argv)
    impls = ["raw", "macula"] if args.impl == "both" else [args.impl]
    runs = args.runs or (1 if args.quick else 3)
    base = WireConfig(send_window=args.send_window, udp_buffer=args.udp_buffer)
    results: list[Result] = []
    signal.signal(signal.SIGTERM, _interrupt)  # so that `finally` stops node B on SIGTERM too
    try:
        for dgram in args.dgram or DGRAM_SIZES:
            results.extend(measure(impls, dgram, base, runs, args.quick, args.verbose))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(format_results(results))
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, load {os.getloadavg()[0]:.2f}; medians of {runs} "
        f"run(s); A and B in separate processes on {base.host}"
    )
    print(
        f"config: max_data {base.max_data:,}, max_stream_data {base.max_stream_data:,}, "
        f"send_window {base.send_window:,}, udp_buffer {base.udp_buffer or 'OS default'}, "
        f"congestion control {base.congestion_control}, "
        f"64-byte messages, 1-byte length prefix"
    )
    missed = [
        r
        for r in results
        if r.impl != "raw"
        and r.median is not None
        and r.metric.check is not None
        and not r.metric.check(
            r.median,
            next(
                (
                    x.median
                    for x in results
                    if x.impl == "raw"
                    and x.case == r.case
                    and x.dgram == r.dgram
                    and x.metric.key == r.metric.key
                ),
                None,
            ),
        )
    ]
    if missed:
        print(
            f"{len(missed)} bar(s) not met: "
            + ", ".join(f"{r.case} {r.metric.label} @{r.dgram}".strip() for r in missed)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
