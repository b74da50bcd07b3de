"""``macula demo``: a mesh of local nodes with live traffic, measured second by second.

    macula demo [--seconds 10] [--nodes 3] [--rate 20000] [--shards 0] [--quiet]
    python -m macula.demo ...                    # the same

What it does:

1. :class:`LocalMesh` starts ``--nodes`` ``macula node`` subprocesses on 127.0.0.1, each with
   its own temporary data directory, an ephemeral control port and an ephemeral QUIC mesh
   port: node 1 first, then the others at once with ``--seed`` = node 1's mesh address. It
   waits for each node's ``macula node ready ...`` line (a node that exits or stays silent
   past the timeout is a :class:`MeshStartError` naming the node, its exit code and the end
   of its stderr).
2. Clients in this process (asyncio :class:`macula.client.Client`, realm ``default``):
   wildcard subscribers on node 2 (``demo/sensors/+/temp``) and on node 3 (``demo/#``),
   publishers on node 1 and node 3 (``--rate`` messages/s each, paced in 10 ms ticks; every
   fifth message is a ``demo/lights/...`` topic that only ``demo/#`` matches), an RPC
   provider (``demo.add``) on node 3 and a caller on node 1 making sequential calls. The
   roles of "node 3" are the last node's (with ``--nodes 2``, node 2 has both subscribers;
   with more, the nodes between only relay the DHT). Every payload carries its send time
   (``time.monotonic_ns``, one stamp per 10 ms batch, taken before it is built) and its
   origin node, so the subscribers measure delivery latency and count what crossed the
   mesh.
3. Warm-up: remote subscriptions reach publishers through the DHT (about 1-2 s); the demo
   publishes probes until every subscriber has heard from every publisher node (at most
   ``WARMUP_TIMEOUT`` seconds), then measures for ``--seconds``.
4. One line per second: messages/s delivered, delivery latency p50/p99, the publishing
   nodes' subscriber-cache hit ratio (mesh ``route_hits_total`` / (hits + misses) from
   STATS), DHT queries/s (all nodes), calls/s and call p50. Then a summary: published,
   delivered per subscriber node and origin (against what was expected), latency, calls,
   and each node's mesh counters for the measured period.

Honesty: exit 1 when a subscriber node received nothing from another node, when a call
failed or returned a wrong sum, or when the warm-up never saw traffic cross. Every child
process is stopped (SIGTERM, then SIGKILL of its process group after ``STOP_TIMEOUT``) and
the temporary directories removed on every way out, Ctrl-C and SIGTERM included. SIGKILL
of the demo itself cannot be caught: its nodes would then keep running.

Costs and bounds: the nodes run in their own sessions (``start_new_session``), so a Ctrl-C
in the terminal reaches only the demo, which then stops them in order. The nodes run
without delivery shard processes (``--shards 0``, ``MACULA_SHARDS``): on 2 cores, with 3
nodes and the clients on them, one shard per node measured worse (20,000 msg/s per
publisher: delivery p50 3.6 vs 2.5 ms, p99 69 vs 8.5 ms; calls 446/s vs 562/s). Latencies
are kept in ``array('q')`` (8 bytes each: 10 s at the default rate is 720,000 deliveries,
about 6 MB). The payload is 16 bytes. The machine is shared: nodes and this process's
clients compete for the same cores, so the figures are those of the whole mesh on one
machine, clients included (a call's latency includes waiting for this process's loop,
which also receives every delivered message).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = [
    "LocalMesh",
    "MeshNode",
    "MeshStartError",
    "main",
    "parse_ready",
]

READY_PREFIX: Final = "macula node ready "
READY_TIMEOUT: Final = 30.0  # seconds a node may take to print its ready line
STOP_TIMEOUT: Final = 10.0  # seconds a node may take to stop after SIGTERM
WARMUP_TIMEOUT: Final = 8.0  # seconds for traffic to cross the mesh before measuring
DRAIN: Final = 0.5  # seconds to wait for messages in flight after the last publish
TICK: Final = 0.01  # publisher pacing tick, seconds
SUB_FILTERS: Final = ("demo/sensors/+/temp", "demo/#")
PROCEDURE: Final = "demo.add"
# payload: send time (monotonic ns), origin node index (1-based), sequence number
PAYLOAD: Final = struct.Struct("<qHxxI")


class MeshStartError(RuntimeError):
    """A node of a :class:`LocalMesh` did not start (the message names it and says why)."""


def parse_ready(line: str) -> dict[str, str]:
    """The ``key=value`` fields of a ``macula node ready ...`` line.

    ``parse_ready("macula node ready endpoints=tcp://127.0.0.1:5 mesh=127.0.0.1:6")``
    -> ``{"endpoints": "tcp://127.0.0.1:5", "mesh": "127.0.0.1:6"}``. ValueError if the
    line is not a ready line or a field has no ``=``.
    """
    if not line.startswith(READY_PREFIX):
        raise ValueError(f"not a ready line (must start with {READY_PREFIX!r}): {line!r}")
    fields: dict[str, str] = {}
    for item in line[len(READY_PREFIX):].split():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"ready line field {item!r} is not key=value")
        fields[key] = value
    if not fields.get("endpoints"):
        raise ValueError(f"ready line has no endpoints= field: {line!r}")
    return fields


@dataclass
class MeshNode:
    """One node process of a :class:`LocalMesh` (``index`` counts from 1)."""

    index: int
    proc: subprocess.Popen[bytes]
    data_dir: str
    out_path: str
    err_path: str
    ready: dict[str, str] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        """The first control endpoint (``tcp://127.0.0.1:PORT``)."""
        return self.ready["endpoints"].split(",")[0]

    @property
    def mesh(self) -> str:
        """The mesh address (``host:port``), or ``off`` / ``client``."""
        return self.ready.get("mesh", "off")

    @property
    def node_id(self) -> str:
        return self.ready.get("node_id", "")

    def stderr_tail(self, limit: int = 2000) -> str:
        try:
            with open(self.err_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - limit))
                text = fh.read().decode("utf-8", "replace").strip()
        except OSError:
            return ""
        return text


class LocalMesh:
    """``nodes`` ``macula node`` processes on this machine, joined into one mesh.

    ``with LocalMesh(3) as mesh: mesh.nodes[0].endpoint`` — node 1 starts first, the others
    join with ``--seed`` = node 1's mesh address. ``env`` is added to every node's
    environment (``MACULA_*`` settings), ``node_args`` to every node's command line and
    ``args_per_node[i]`` to node i+1's. ``shards`` sets ``MACULA_SHARDS`` (None: the node's
    default). Temporary directories live under ``tmp_dir`` (default: the system's).
    Starting raises :class:`MeshStartError` after stopping whatever had started; ``stop()``
    is idempotent and always removes the directories.
    """

    def __init__(
        self,
        nodes: int = 3,
        *,
        shards: int | None = 0,
        env: Mapping[str, str] | None = None,
        node_args: Sequence[str] = (),
        args_per_node: Sequence[Sequence[str]] | None = None,
        ready_timeout: float = READY_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
        tmp_dir: str | None = None,
        python: str = sys.executable,
    ) -> None:
        if type(nodes) is not int or nodes < 1:
            raise ValueError(f"nodes must be an int >= 1, not {nodes!r}")
        if shards is not None and shards < 0:
            raise ValueError(f"shards must be >= 0 or None, not {shards!r}")
        if args_per_node is not None and len(args_per_node) != nodes:
            raise ValueError(f"args_per_node needs one entry per node ({nodes}), "
                             f"got {len(args_per_node)}")
        self.count = nodes
        self.shards = shards
        self.env = dict(env or {})
        self.node_args = list(node_args)
        self.args_per_node = [list(a) for a in args_per_node] if args_per_node else None
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.tmp_dir = tmp_dir
        self.python = python
        self.root: str | None = None
        self.nodes: list[MeshNode] = []

    # -- starting ------------------------------------------------------------------------
    def start(self) -> LocalMesh:
        if self.root is not None:
            raise RuntimeError("this LocalMesh was started already")
        self.root = tempfile.mkdtemp(prefix="macula-demo-", dir=self.tmp_dir)
        try:
            first = self._spawn(1, [])
            self._wait_ready([first])
            seed = first.mesh
            seeds = [] if seed in ("off", "client", "") else ["--seed", seed]
            rest = [self._spawn(i, seeds) for i in range(2, self.count + 1)]
            self._wait_ready(rest)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, index: int, seeds: list[str]) -> MeshNode:
        assert self.root is not None
        data_dir = os.path.join(self.root, f"node{index}")
        os.mkdir(data_dir, 0o700)
        out_path = os.path.join(self.root, f"node{index}.out")
        err_path = os.path.join(self.root, f"node{index}.err")
        cmd = [self.python, "-m", "macula.cli", "node",
               "--endpoint", "tcp://127.0.0.1:0", "--metrics-port", "-1",
               "--mesh-port", "0", "--data-dir", data_dir, *seeds, *self.node_args]
        if self.args_per_node is not None:
            cmd += self.args_per_node[index - 1]
        env = dict(os.environ)
        env.update(self.env)
        if self.shards is not None:
            env["MACULA_SHARDS"] = str(self.shards)
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            # own session: a Ctrl-C in the terminal reaches only us, and we stop the nodes
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    env=env, start_new_session=True)
        node = MeshNode(index, proc, data_dir, out_path, err_path)
        self.nodes.append(node)
        return node

    def _wait_ready(self, waiting: list[MeshNode]) -> None:
        deadline = time.monotonic() + self.ready_timeout
        left = list(waiting)
        while left:
            for node in list(left):
                line = _ready_line(node.out_path)
                if line is not None:
                    try:
                        node.ready = parse_ready(line)
                    except ValueError as exc:
                        raise MeshStartError(f"node {node.index}: {exc}") from None
                    left.remove(node)
                    continue
                rc = node.proc.poll()
                if rc is not None:
                    raise MeshStartError(
                        f"node {node.index} exited with code {rc} before it was ready"
                        f"{_tail(node.stderr_tail())}")
            if left and time.monotonic() > deadline:
                node = left[0]
                raise MeshStartError(
                    f"node {node.index} printed no ready line within {self.ready_timeout:g} s"
                    f"{_tail(node.stderr_tail())}")
            if left:
                time.sleep(0.02)

    # -- stopping ------------------------------------------------------------------------
    def stop(self, timeout: float | None = None) -> list[int | None]:
        """SIGTERM every node (last first), wait up to ``timeout`` (default: the
        constructor's ``stop_timeout``) for all, SIGKILL the process group of any still
        running, remove the directories. Returns the exit codes in node order (negative:
        killed by that signal)."""
        if timeout is None:
            timeout = self.stop_timeout
        for node in reversed(self.nodes):
            if node.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    node.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            try:
                node.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(node.proc.pid, signal.SIGKILL)  # the node and its shards
                node.proc.wait()
        for node in self.nodes:
            # children the node left behind in its session (e.g. a shard it did not stop)
            for pid in _session_members(node.proc.pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
        return [node.proc.returncode for node in self.nodes]

    def __enter__(self) -> LocalMesh:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _ready_line(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(READY_PREFIX) and line.endswith("\n"):
                    return line.strip()
    except OSError:
        return None
    return None


def _tail(text: str) -> str:
    return f"; its stderr ends with:\n{text}" if text else " (no stderr)"


def _session_members(sid: int) -> list[int]:
    """Processes whose session id is ``sid`` (Linux /proc; [] elsewhere)."""
    out = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # fields after the ")" that closes the command name: state ppid pgrp session ...
        rest = stat[stat.rfind(b")") + 2:].split()
        if len(rest) > 3 and int(rest[3]) == sid and int(name) != sid:
            out.append(int(name))
    return out


# -- the traffic ----------------------------------------------------------------------------
@dataclass
class _Sub:
    node: int
    filter: str
    by_origin: dict[int, int] = field(default_factory=dict)
    window: array[int] = field(default_factory=lambda: array("q"))
    latencies: array[int] = field(default_factory=lambda: array("q"))
    measuring: bool = False
    seen: set[int] = field(default_factory=set)  # origins heard from (warm-up)

    def on_message(self, payload: bytes) -> None:
        sent, origin, _seq = PAYLOAD.unpack_from(payload)
        self.seen.add(origin)
        if self.measuring:
            self.window.append(time.monotonic_ns() - sent)
            self.by_origin[origin] = self.by_origin.get(origin, 0) + 1


@dataclass
class _Pub:
    node: int
    topics: list[str]
    sent: int = 0
    by_topic: dict[str, int] = field(default_factory=dict)


@dataclass
class _Calls:
    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    window: array[int] = field(default_factory=lambda: array("q"))
    latencies: array[int] = field(default_factory=lambda: array("q"))


def _quantile(sorted_ns: Sequence[int], q: float) -> float:
    """The q-quantile of sorted nanoseconds, in ms (nan when empty)."""
    if not sorted_ns:
        return float("nan")
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1e6


def _ms(v: float) -> str:
    return "-" if v != v else f"{v:.2f} ms"


MESH_KEYS: Final = ("messages_forwarded_total", "messages_received_total", "route_hits_total",
                    "route_misses_total", "dht_lookups_total", "dht_queries_total",
                    "calls_forwarded_total", "calls_served_total")


def _mesh(stats: Mapping[str, Any]) -> dict[str, int]:
    m = stats.get("mesh")
    if not isinstance(m, Mapping):
        return dict.fromkeys(MESH_KEYS, 0)
    return {k: int(m.get(k, 0) or 0) for k in MESH_KEYS}


class _Demo:
    def __init__(self, mesh: LocalMesh, args: argparse.Namespace) -> None:
        self.mesh = mesh
        self.args = args
        n = len(mesh.nodes)
        self.n_sub_a = min(2, n)  # "node 2"
        self.n_last = n  # "node 3"
        self.subs = [_Sub(self.n_sub_a, SUB_FILTERS[0]), _Sub(self.n_last, SUB_FILTERS[1])]
        self.pubs = [_Pub(1, self._topics(1)), _Pub(self.n_last, self._topics(self.n_last))]
        if self.pubs[0].node == self.pubs[1].node:
            self.pubs.pop()
        self.calls = _Calls()
        self.running = True
        self.clients: list[Any] = []

    @staticmethod
    def _topics(node: int) -> list[str]:
        temps = [f"demo/sensors/n{node}-{k}/temp" for k in range(4)]
        return [*temps, f"demo/lights/n{node}-0/state"]  # every 5th: only demo/# matches

    def say(self, text: str) -> None:
        if not self.args.quiet:
            print(text, flush=True)

    async def connect(self, node: int, name: str) -> Any:
        from macula.client import Client

        c = await Client.connect(self.mesh.nodes[node - 1].endpoint, realm="default",
                                 name=name, timeout=10.0)
        self.clients.append(c)
        return c

    async def run(self) -> int:
        args = self.args
        ctl = [await self.connect(n.index, f"demo-stats-{n.index}") for n in self.mesh.nodes]
        for s in self.subs:
            c = await self.connect(s.node, f"demo-sub-{s.node}")
            c.queue_size = 1_000_000
            await c.subscribe(s.filter, callback=lambda m, s=s: s.on_message(m.payload))
        prov = await self.connect(self.n_last, "demo-provider")
        await prov.register(PROCEDURE, lambda a: a[0] + a[1])
        caller = await self.connect(1, "demo-caller")
        pub_clients = [await self.connect(p.node, f"demo-pub-{p.node}") for p in self.pubs]
        self.say(f"clients: subscribers node {self.subs[0].node} ({self.subs[0].filter}) and "
                 f"node {self.subs[1].node} ({self.subs[1].filter}); publishers on node(s) "
                 f"{', '.join(str(p.node) for p in self.pubs)} at {args.rate:,} msg/s each; "
                 f"{PROCEDURE} provided on node {self.n_last}, called from node 1")

        # warm-up: probes until every subscriber heard from every publisher node and a call
        # went through
        problem = await self._warm_up(pub_clients, caller)
        if problem:
            print(f"macula demo: {problem}", file=sys.stderr, flush=True)
            return 1

        await asyncio.sleep(0.3)  # probes still in flight are not counted as measured
        before = [_mesh(await c.stats()) for c in ctl]
        for s in self.subs:
            s.measuring = True
        t_start = time.monotonic()
        tasks = [asyncio.ensure_future(self._publish(c, p, t_start))
                 for c, p in zip(pub_clients, self.pubs, strict=True)]
        tasks.append(asyncio.ensure_future(self._call_loop(caller)))
        self.say(f"{'t':>4} {'delivered/s':>12} {'lat p50':>9} {'lat p99':>9} {'cache hit':>9} "
                 f"{'DHT q/s':>8} {'calls/s':>8} {'call p50':>9}")
        prev = before
        delivered_prev = 0
        try:
            for sec in range(1, args.seconds + 1):
                await asyncio.sleep(max(0.0, t_start + sec - time.monotonic()))
                now_stats = [_mesh(s) for s in await asyncio.gather(*(c.stats() for c in ctl))]
                self._second(sec, prev, now_stats, delivered_prev)
                delivered_prev = sum(sum(s.by_origin.values()) for s in self.subs)
                prev = now_stats
        finally:
            self.running = False
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        elapsed = time.monotonic() - t_start
        await asyncio.sleep(DRAIN)  # messages in flight
        for s in self.subs:
            s.measuring = False
            s.latencies.extend(s.window)
            s.window = array("q")
        self.calls.latencies.extend(self.calls.window)
        after = [_mesh(await c.stats()) for c in ctl]
        return self._summary(elapsed, before, after)

    async def _warm_up(self, pub_clients: list[Any], caller: Any) -> str | None:
        deadline = time.monotonic() + WARMUP_TIMEOUT
        want = {p.node for p in self.pubs}
        seq = 0
        while time.monotonic() < deadline:
            for c, p in zip(pub_clients, self.pubs, strict=True):
                for topic in p.topics:
                    c.publish_nowait(topic, PAYLOAD.pack(time.monotonic_ns(), p.node, seq))
                seq += 1
            await asyncio.sleep(0.1)
            if all(want <= s.seen for s in self.subs):
                break
        else:
            missing = [f"node {s.node} heard from node(s) {sorted(s.seen) or 'none'} of "
                       f"{sorted(want)}" for s in self.subs if not want <= s.seen]
            return ("no traffic crossed the mesh within "
                    f"{WARMUP_TIMEOUT:g} s of warm-up: {'; '.join(missing)}")
        from macula.client import MaculaError

        while True:
            try:
                r = await caller.call(PROCEDURE, [20, 22], timeout=2.0)
                if r != 42:
                    return f"{PROCEDURE}([20, 22]) returned {r!r}, not 42"
                return None
            except (MaculaError, TimeoutError) as exc:
                if time.monotonic() > deadline:
                    return f"no call reached the provider on node {self.n_last}: {exc}"
                await asyncio.sleep(0.1)

    async def _publish(self, client: Any, pub: _Pub, t0: float) -> None:
        rate = self.args.rate
        topics = pub.topics
        nt = len(topics)
        pack = PAYLOAD.pack
        node = pub.node
        publish = client.publish_nowait
        by_topic = pub.by_topic
        counts = [0] * nt
        burst = max(1, rate // 10)
        position = 0  # messages the schedule has passed (sent or skipped)
        try:
            while self.running:
                due = int((time.monotonic() - t0) * rate)
                # a stalled loop skips what it missed beyond 0.1 s instead of bursting it
                position = max(position, due - burst)
                now = time.monotonic_ns()
                for i in range(position, due):
                    k = i % nt
                    publish(topics[k], pack(now, node, i & 0xFFFFFFFF))
                    counts[k] += 1
                position = max(position, due)
                await asyncio.sleep(TICK)
        finally:
            for k, t in enumerate(topics):
                by_topic[t] = counts[k]
            pub.sent = sum(counts)

    async def _call_loop(self, caller: Any) -> None:
        from macula.client import MaculaError

        calls = self.calls
        i = 0
        while self.running:
            i += 1
            t0 = time.monotonic_ns()
            try:
                r = await caller.call(PROCEDURE, [i, 1], timeout=5.0)
            except (MaculaError, TimeoutError) as exc:
                calls.failed += 1
                if len(calls.errors) < 5:
                    calls.errors.append(str(exc))
                continue
            calls.window.append(time.monotonic_ns() - t0)
            if r == i + 1:
                calls.ok += 1
            else:
                calls.failed += 1
                if len(calls.errors) < 5:
                    calls.errors.append(f"{PROCEDURE}([{i}, 1]) returned {r!r}")

    def _second(self, sec: int, prev: list[dict[str, int]], now: list[dict[str, int]],
                delivered_prev: int) -> None:
        lat: list[int] = []
        for s in self.subs:
            lat.extend(s.window)
            s.latencies.extend(s.window)
            s.window = array("q")
        lat.sort()
        delivered = sum(sum(s.by_origin.values()) for s in self.subs)
        pub_nodes = {p.node for p in self.pubs}
        hits = sum(now[i - 1]["route_hits_total"] - prev[i - 1]["route_hits_total"]
                   for i in pub_nodes)
        misses = sum(now[i - 1]["route_misses_total"] - prev[i - 1]["route_misses_total"]
                     for i in pub_nodes)
        queries = sum(b["dht_queries_total"] - a["dht_queries_total"]
                      for a, b in zip(prev, now, strict=True))
        cw = sorted(self.calls.window)
        self.calls.latencies.extend(self.calls.window)
        self.calls.window = array("q")
        ratio = f"{100 * hits / (hits + misses):.1f}%" if hits + misses else "-"
        self.say(f"{sec:>3}s {delivered - delivered_prev:>12,} {_ms(_quantile(lat, 0.5)):>9} "
                 f"{_ms(_quantile(lat, 0.99)):>9} {ratio:>9} {queries:>8,} {len(cw):>8,} "
                 f"{_ms(_quantile(cw, 0.5)):>9}")

    def _expected(self, sub: _Sub, origin: int) -> int:
        from macula import TopicTrie

        trie = TopicTrie()
        trie.add(sub.filter, "s")
        return sum(n for p in self.pubs if p.node == origin
                   for t, n in p.by_topic.items() if trie.match(t))

    def _summary(self, elapsed: float, before: list[dict[str, int]],
                 after: list[dict[str, int]]) -> int:
        problems: list[str] = []
        print(f"summary: {len(self.mesh.nodes)} nodes, {elapsed:.1f} s measured")
        for p in self.pubs:
            print(f"  published on node {p.node}: {p.sent:,} ({p.sent / elapsed:,.0f} msg/s)")
        lat: list[int] = []
        for s in self.subs:
            got = sum(s.by_origin.values())
            exp = sum(self._expected(s, p.node) for p in self.pubs)
            parts = []
            for p in self.pubs:
                where = "local" if p.node == s.node else "across the mesh"
                parts.append(f"from node {p.node} ({where}): {s.by_origin.get(p.node, 0):,} of "
                             f"{self._expected(s, p.node):,}")
            print(f"  delivered on node {s.node} ({s.filter}): {got:,} of {exp:,} expected; "
                  f"{'; '.join(parts)}")
            remote = sum(n for o, n in s.by_origin.items() if o != s.node)
            if remote == 0:
                problems.append(f"node {s.node} received nothing from another node")
            lat.extend(s.latencies)
        lat.sort()
        print(f"  delivery latency: p50 {_ms(_quantile(lat, 0.5))}, p99 "
              f"{_ms(_quantile(lat, 0.99))} ({len(lat):,} messages)")
        cl = sorted(self.calls.latencies)
        c = self.calls
        print(f"  calls node 1 -> node {self.n_last}: {c.ok:,} ok, {c.failed:,} failed "
              f"({c.ok / elapsed:,.0f}/s); p50 {_ms(_quantile(cl, 0.5))}, p99 "
              f"{_ms(_quantile(cl, 0.99))}")
        if c.ok == 0:
            problems.append("no call succeeded")
        if c.failed:
            problems.append(f"{c.failed} call(s) failed: {'; '.join(c.errors)}")
        print("  mesh counters during the run (per node):")
        print(f"    {'node':>4} {'forwarded':>10} {'received':>10} {'route hits':>11} "
              f"{'misses':>7} {'DHT lookups':>11} {'DHT queries':>11} {'calls fwd':>9} "
              f"{'served':>7}")
        for i, (a, b) in enumerate(zip(before, after, strict=True), 1):
            d = [b[k] - a[k] for k in MESH_KEYS]
            print(f"    {i:>4} {d[0]:>10,} {d[1]:>10,} {d[2]:>11,} {d[3]:>7,} {d[4]:>11,} "
                  f"{d[5]:>11,} {d[6]:>9,} {d[7]:>7,}")
        for problem in problems:
            print(f"macula demo: FAILED: {problem}", file=sys.stderr, flush=True)
        if not problems:
            print("ok: messages and calls crossed the mesh", flush=True)
        return 1 if problems else 0

    async def close(self) -> None:
        for c in self.clients:
            with contextlib.suppress(Exception):
                await c.close(timeout=0.5)


async def _amain(mesh: LocalMesh, args: argparse.Namespace) -> int:
    demo = _Demo(mesh, args)
    try:
        return await demo.run()
    finally:
        await demo.close()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="macula demo",
        description="Start a mesh of local nodes, run pub/sub and RPC across it, and print "
                    "what it measures each second.")
    p.add_argument("--seconds", type=int, default=10, help="measured seconds (default 10)")
    p.add_argument("--nodes", type=int, default=3, help="nodes to start, >= 2 (default 3)")
    p.add_argument("--rate", type=int, default=20_000,
                   help="messages/s per publisher (default 20000)")
    p.add_argument("--shards", type=int, default=0,
                   help="delivery shard processes per node (default 0: in the node)")
    p.add_argument("--node-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for every 'macula node' (repeatable, "
                        "e.g. --node-arg=--config=node.toml)")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; 0 when messages and calls crossed the mesh, 1 otherwise, 2 for bad
    options."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, low in (("seconds", 1), ("nodes", 2), ("rate", 1), ("shards", 0)):
        if getattr(args, name) < low:
            parser.error(f"--{name} must be >= {low}, not {getattr(args, name)}")
    old = None
    with contextlib.suppress(ValueError):  # not the main thread: SIGTERM keeps its handler
        old = signal.signal(signal.SIGTERM, _interrupt)
    mesh = LocalMesh(args.nodes, shards=args.shards, node_args=args.node_arg)
    try:
        if not args.quiet:
            print(f"starting {args.nodes} nodes ...", flush=True)
        t0 = time.monotonic()
        mesh.start()
        if not args.quiet:
            for node in mesh.nodes:
                print(f"  node {node.index}: control {node.endpoint}, mesh {node.mesh}, "
                      f"id {node.node_id[:16]}{'...' if node.node_id else ''}", flush=True)
            print(f"  ready in {time.monotonic() - t0:.1f} s", flush=True)
        return asyncio.run(_amain(mesh, args))
    except MeshStartError as exc:
        print(f"macula demo: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("macula demo: interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        mesh.stop()
        if old is not None:
            signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":
    sys.exit(main())
