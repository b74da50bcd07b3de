"""Chaos harness: real ``macula node`` processes in network namespaces, real faults, QoS 1 ledger.

``python tools/chaos.py`` (root; needs ``ip`` from iproute2 and ``nft`` from nftables) runs
every scenario three times and prints, per scenario, the medians of: messages sent,
acknowledged (PUBACK OK), refused (other PUBACK reasons), received, lost (acknowledged and
owed to the subscriber, never received), duplicated (seen by the application more than
once) and the time until delivery resumed after the fault. docs/CHAOS.md is the guide.

What it builds, per scenario run (nothing in the root network namespace):

- a namespace ``mchaos-<run>-sw`` holding a bridge, and one namespace per node
  (``mchaos-<run>-n1`` ...), each joined to the bridge by a veth pair; the node's end is
  ``mc0`` with the address ``10.213.0.<i>/24``, which exists only inside these namespaces;
- ``ip netns exec <ns> python -m macula node`` per namespace, its mesh (QUIC) on
  ``10.213.0.<i>:4433``, node 1 the seed of the others, a persistent ``--data-dir`` (a
  restarted node keeps its identity) and its control plane on ``ipc:///tmp/mchaos-<run>/
  n<i>.sock``: the clients run in this process, in the root namespace, and reach their node
  through the file system, so a fault hits only the mesh traffic between the nodes;
- a publisher (``macula.client.Client``) on node 1 publishing numbered QoS 1 messages at a
  fixed rate, every PUBACK recorded, and a subscriber on node 3 recording every sequence
  number it receives.

Timeline: start the nodes, wait for their ready lines; subscribe; publish probes until one
crosses the mesh (the route exists); publish ``pre`` seconds; the fault; ``post`` seconds;
stop publishing; wait for the PUBACKs; drain (wait until every owed message arrived, at most
``drain`` seconds); read STATS of every node; tear everything down.

"Delivery resumes after the fault ends" is the time from the end of the fault until the
first message *published after the fault ended* is received by the subscriber.

Every loop is bounded in count and time; a scenario run that overruns its budget is
stopped and reported as failed; namespaces, processes and files are removed on every exit
(``finally`` and ``atexit``); ``--cleanup`` removes the leftovers of runs whose harness
process is gone (for example after ``kill -9`` of the harness).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import inspect
import json
import logging
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final, TextIO

PREFIX: Final = "mchaos"  # every namespace and temporary directory starts with it
SUBNET: Final = "10.213.0"  # node i is 10.213.0.<i>/24, inside its namespace only
MESH_PORT: Final = 4433
BRIDGE: Final = "br0"  # in the switch namespace
DEV: Final = "mc0"  # a node's end of its veth pair, in its namespace
TMP_ROOT: Final = "/tmp"
TOPIC: Final = "chaos/seq"
NFT_TABLE: Final = "mchaos"
READY_PREFIX: Final = "macula node ready "
RESUBSCRIBE_GRACE: Final = 0.1  # s before an UNSUBSCRIBE whose messages may be in flight
CMD_TIMEOUT: Final = 15.0  # s for one ip / nft command
STOP_TIMEOUT: Final = 5.0  # s for a node to exit after SIGTERM
STATS_TIMEOUT: Final = 3.0  # s for a node's STATS at the end of a run
MAGIC: Final = b"C"  # counted message: b"C" + seq (8 bytes big-endian)
PROBE: Final = b"W"  # warm-up probe: not counted


class ChaosError(RuntimeError):
    """The harness could not set up or run a scenario (not a finding about macula)."""


# -- environment ------------------------------------------------------------------------------
def check_environment() -> list[str]:
    """What is missing to run the harness here ([] when it can run)."""
    problems = []
    if sys.platform != "linux":
        problems.append(f"network namespaces need Linux (this is {sys.platform})")
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        problems.append("network namespaces need root (run as root or with sudo)")
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            problems.append(f"'{tool}' not found (apt-get install {package})")
    return problems


def sh(*args: str, check: bool = True, timeout: float = CMD_TIMEOUT) -> str:
    """Run one command (no shell); its stdout. ChaosError with its stderr if it fails."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        raise ChaosError(f"{' '.join(args)}: no exit within {timeout:g} s") from None
    if check and done.returncode != 0:
        raise ChaosError(f"{' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


# -- topology ---------------------------------------------------------------------------------
_LIVE: set[Topology] = set()  # torn down at exit whatever happens


class Topology:
    """The namespaces of one scenario run: a switch (a bridge) and ``nodes`` node namespaces.

    ``create()`` builds them, ``destroy()`` kills every process left in them, deletes them
    and removes the run's directory (``tmp``: data directories, ipc sockets, node logs).
    """

    def __init__(self, nodes: int = 3, run_id: str | None = None) -> None:
        if not 1 <= nodes <= 200:
            raise ValueError(f"nodes must be 1..200, not {nodes}")
        self.nodes = nodes
        self.run_id = run_id or secrets.token_hex(3)
        self.name = f"{PREFIX}-{self.run_id}"
        self.tmp = os.path.join(TMP_ROOT, self.name)
        self.created: list[str] = []

    @property
    def switch(self) -> str:
        return f"{self.name}-sw"

    def ns(self, i: int) -> str:
        return f"{self.name}-n{i}"

    @staticmethod
    def addr(i: int) -> str:
        return f"{SUBNET}.{i}"

    def endpoint(self, i: int) -> str:
        return f"ipc://{self.tmp}/n{i}.sock"

    def create(self) -> Topology:
        os.makedirs(self.tmp, mode=0o700)
        with open(os.path.join(self.tmp, "owner.pid"), "w") as fh:
            fh.write(str(os.getpid()))
        _LIVE.add(self)
        sw = self.switch
        self._add_ns(sw)
        sh("ip", "-n", sw, "link", "set", "lo", "up")
        sh("ip", "-n", sw, "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "-n", sw, "link", "set", BRIDGE, "up")
        for i in range(1, self.nodes + 1):
            ns = self.ns(i)
            self._add_ns(ns)
            port = f"n{i}"
            sh("ip", "-n", sw, "link", "add", port, "type", "veth", "peer", "name", DEV,
               "netns", ns)
            sh("ip", "-n", sw, "link", "set", port, "master", BRIDGE)
            sh("ip", "-n", sw, "link", "set", port, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", DEV)
            sh("ip", "-n", ns, "link", "set", DEV, "up")
        return self

    def _add_ns(self, ns: str) -> None:
        sh("ip", "netns", "add", ns)
        self.created.append(ns)

    def destroy(self) -> None:
        for ns in reversed(self.created):
            _kill_namespace(ns)
        self.created.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)
        _LIVE.discard(self)

    # -- faults on the network ----------------------------------------------------------------
    def link_cmd(self, i: int, up: bool) -> list[str]:
        return ["ip", "-n", self.ns(i), "link", "set", DEV, "up" if up else "down"]

    def loss_cmds(self, i: int, percent: int) -> list[list[str]]:
        """nft commands dropping ``percent`` % of node i's packets both ways, at random."""
        if not 0 < percent <= 100:
            raise ValueError(f"loss percent must be 1..100, not {percent}")
        ns = ["ip", "netns", "exec", self.ns(i), "nft"]
        return [
            [*ns, "add", "table", "inet", NFT_TABLE],
            [*ns, f"add chain inet {NFT_TABLE} in {{ type filter hook input priority -10 ; }}"],
            [*ns, f"add chain inet {NFT_TABLE} out {{ type filter hook output priority -10 ; }}"],
            [*ns, f"add rule inet {NFT_TABLE} in iifname {DEV} numgen random mod 100 < {percent} "
                  "counter drop"],
            [*ns, f"add rule inet {NFT_TABLE} out oifname {DEV} numgen random mod 100 "
                  f"< {percent} counter drop"],
        ]

    def unloss_cmd(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.ns(i), "nft", "delete", "table", "inet", NFT_TABLE]

    def loss_counters(self, i: int) -> dict[str, int]:
        """Packets the loss rules dropped so far in node i's namespace ({} without rules)."""
        out = sh("ip", "netns", "exec", self.ns(i), "nft", "-j", "list", "table", "inet",
                 NFT_TABLE, check=False)
        drops: dict[str, int] = {}
        with contextlib.suppress(ValueError, TypeError, KeyError):
            for item in json.loads(out)["nftables"]:
                rule = item.get("rule")
                if rule is None:
                    continue
                for expr in rule["expr"]:
                    if "counter" in expr:
                        drops[rule["chain"]] = int(expr["counter"]["packets"])
        return drops


def _kill_namespace(ns: str) -> None:
    """SIGKILL every process in ``ns``, then delete it (missing: nothing to do)."""
    pids = sh("ip", "netns", "pids", ns, check=False).split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + 5
    while pids and time.monotonic() < deadline:
        pids = sh("ip", "netns", "pids", ns, check=False).split()
        if pids:
            time.sleep(0.05)
    sh("ip", "netns", "del", ns, check=False)


def cleanup_leftovers(force: bool = False) -> list[str]:
    """Remove the namespaces and directories of runs whose harness process is gone (all
    ``mchaos-*`` ones with ``force``); the names removed."""
    removed = []
    runs: dict[str, list[str]] = {}
    if shutil.which("ip") is not None:
        for line in sh("ip", "netns", "list", check=False).splitlines():
            name = line.split()[0] if line.strip() else ""
            if name.startswith(PREFIX + "-"):
                runs.setdefault(name.rsplit("-", 1)[0], []).append(name)
    with contextlib.suppress(OSError):
        for entry in os.listdir(TMP_ROOT):
            if entry.startswith(PREFIX + "-"):
                runs.setdefault(entry, [])
    for run, names in sorted(runs.items()):
        tmp = os.path.join(TMP_ROOT, run)
        if not force and _owner_alive(tmp):
            continue
        for ns in sorted(names, key=lambda n: n.endswith("-sw")):  # the switch last
            _kill_namespace(ns)
            removed.append(ns)
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _owner_alive(tmp: str) -> bool:
    try:
        with open(os.path.join(tmp, "owner.pid")) as fh:
            pid = int(fh.read().strip())
    except (OSError, ValueError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@atexit.register
def _teardown_all() -> None:
    for topo in list(_LIVE):
        topo.destroy()


# -- nodes ------------------------------------------------------------------------------------
class NodeProc:
    """One ``macula node`` in its namespace; restartable with the same identity and endpoint.

    The process runs in its own session (process group = its pid), so signals reach the node
    and its delivery shards together, like a machine that stops or dies.
    """

    def __init__(self, topo: Topology, index: int, *, shards: int = 0,
                 extra_args: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        self.topo = topo
        self.index = index
        self.shards = shards
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.data_dir = os.path.join(topo.tmp, f"n{index}")
        self.out_path = os.path.join(topo.tmp, f"n{index}.out")
        self.err_path = os.path.join(topo.tmp, f"n{index}.err")
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.stopped = False
        self._out_offset = 0

    @property
    def endpoint(self) -> str:
        return self.topo.endpoint(self.index)

    def command(self) -> list[str]:
        topo = self.topo
        seeds = [] if self.index == 1 else ["--seed", f"{topo.addr(1)}:{MESH_PORT}"]
        return ["ip", "netns", "exec", topo.ns(self.index), sys.executable, "-m", "macula",
                "node", "--endpoint", self.endpoint, "--metrics-port", "-1",
                "--mesh-host", topo.addr(self.index), "--mesh-port", str(MESH_PORT),
                "--data-dir", self.data_dir, "--shards", str(self.shards), *seeds,
                *self.extra_args]

    def start(self) -> None:
        """Start the process (the ready line is awaited by :meth:`wait_ready`)."""
        if self.proc is not None and self.proc.poll() is None:
            raise ChaosError(f"node {self.index} is running already")
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):  # a socket file left by kill -9
            os.unlink(self.endpoint[len("ipc://"):])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_macula_root(), env.get("PYTHONPATH", "")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(self.env)
        self._out_offset = os.path.getsize(self.out_path) if os.path.exists(self.out_path) else 0
        with open(self.out_path, "ab") as out, open(self.err_path, "ab") as err:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=err, env=env, start_new_session=True)
        self.starts += 1
        self.stopped = False

    async def wait_ready(self, timeout: float) -> float:
        """Wait for this start's ready line; the loop time it was seen. ChaosError if the
        process exits first or prints none within ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self._ready_line() is not None:
                return loop.time()
            rc = self.proc.poll() if self.proc is not None else -1
            if rc is not None:
                raise ChaosError(f"node {self.index} exited with {rc} before it was ready"
                                 f"{self.err_tail()}")
            if loop.time() > deadline:
                raise ChaosError(f"node {self.index} printed no ready line within "
                                 f"{timeout:g} s{self.err_tail()}")
            await asyncio.sleep(0.02)

    def _ready_line(self) -> str | None:
        try:
            with open(self.out_path, "rb") as fh:
                fh.seek(self._out_offset)
                for raw in fh:
                    line = raw.decode("utf-8", "replace")
                    if line.startswith(READY_PREFIX) and line.endswith("\n"):
                        return line.strip()
        except OSError:
            return None
        return None

    def err_tail(self, limit: int = 1500) -> str:
        try:
            with open(self.err_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - limit))
                text = fh.read().decode("utf-8", "replace").strip()
        except OSError:
            return ""
        return f"; its stderr ends with:\n{text}" if text else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the node's process group (the node and its shards)."""
        if self.proc is None:
            raise ChaosError(f"node {self.index} was never started")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        if sig == signal.SIGSTOP:
            self.stopped = True
        elif sig == signal.SIGCONT:
            self.stopped = False

    def kill(self) -> None:
        """kill -9 the node and its shards; returns once the node process is reaped."""
        if self.proc is None:
            return
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(STOP_TIMEOUT)
        self.stopped = False

    def terminate(self) -> None:
        """SIGTERM (SIGCONT first if stopped), SIGKILL after STOP_TIMEOUT."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.stopped:
            self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()


def _macula_root() -> str:
    """The directory the harness imports macula from (the nodes must run the same code)."""
    import macula

    return os.path.dirname(os.path.dirname(os.path.abspath(macula.__file__)))


# -- traffic ----------------------------------------------------------------------------------
def _client_options() -> dict[str, Any]:
    """Turn on the client's reconnecting by itself when this macula's ``Client.connect`` has
    an option for it (a boolean parameter named ``*reconnect*``); nothing otherwise (a client
    that always reconnects needs no option)."""
    from macula.client import Client

    return {name: True for name, param in inspect.signature(Client.connect).parameters.items()
            if "reconnect" in name and isinstance(param.default, bool)}


def client_reconnects() -> str:
    """What the first output line says about the client reconnecting by itself."""
    opts = _client_options()
    if opts:
        return "turned on with " + ", ".join(f"{k}=True" for k in opts)
    return "no option for it in Client.connect (reconnects only if it always does)"


class Ledger:
    """Every numbered message: when it was published, its PUBACK, how often it arrived."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.sent = 0
        self.sent_at = array("d", bytes(8 * capacity))
        self.outcome: list[str | None] = [None] * capacity
        self.recv_count = array("I", bytes(4 * capacity))
        self.first_recv = array("d", bytes(8 * capacity))
        self.foreign = 0  # payloads that are not ours (must stay 0)
        self.out_of_range = 0  # sequence numbers never sent (must stay 0)

    def received(self, seq: int, now: float) -> None:
        if not 0 <= seq < self.sent:
            self.out_of_range += 1
            return
        if self.recv_count[seq] == 0:
            self.first_recv[seq] = now
        self.recv_count[seq] += 1


def payload(seq: int) -> bytes:
    return MAGIC + seq.to_bytes(8, "big")


@dataclass
class Settings:
    """One scenario run's knobs (``python tools/chaos.py --help`` names them)."""

    nodes: int = 3
    rate: float = 1000.0  # messages per second
    pre: float = 2.0  # s of traffic before the fault
    post: float = 8.0  # s of traffic after the fault
    drain: float = 10.0  # s at most to wait for owed messages after publishing stopped
    duration: float | None = None  # fault duration (None: the scenario's own)
    shards: int = 0  # each node's delivery shards
    node_env: dict[str, str] = field(default_factory=dict)  # MACULA_* settings of every node
    loss_percent: int = 30
    restarts: int = 5  # restart-third: restarts in the fault's duration
    kill_down: float = 1.0  # kill9: seconds between kill -9 and the restart
    puback_timeout: float = 10.0
    max_inflight: int = 20_000  # publisher: un-acknowledged PUBLISHes at most
    startup_timeout: float = 30.0
    warmup_timeout: float = 30.0
    client_timeout: float = 5.0
    # the subscriber's heartbeat_ms (None: the scenario's choice, see Scenario.sub_heartbeat_ms)
    sub_heartbeat_ms: int | None = None


@dataclass
class Result:
    """The figures of one scenario run (times in seconds)."""

    scenario: str
    fault_duration: float
    run_id: str = ""
    error: str | None = None
    sent: int = 0
    acknowledged: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    received: int = 0  # distinct sequence numbers received
    deliveries: int = 0  # EVENTs the application saw (received + extra copies)
    lost: int = 0  # acknowledged, owed, never received
    lost_by_phase: dict[str, int] = field(default_factory=dict)
    duplicated: int = 0  # sequence numbers the application saw more than once
    resume: float | None = None
    # owed, answered PUBACK NO_SUBSCRIBERS although the subscriber was subscribed, never
    # received: not "acknowledged", but lost to the application all the same
    no_subscribers_lost: int = 0
    not_owed: int = 0  # published while the subscriber had no subscription
    not_owed_received: int = 0
    received_unacknowledged: int = 0
    latency_p50_ms: float | None = None  # publish -> first receipt, published before the fault
    latency_p99_ms: float | None = None
    fault_latency_p50_ms: float | None = None  # the same, published during the fault
    fault_latency_p99_ms: float | None = None
    fault: dict[str, float] = field(default_factory=dict)  # start/end since traffic start
    subscriber_session: str = "open"
    client_log: dict[str, int] = field(default_factory=dict)  # the clients' log lines, counted
    client_reconnects: str = ""  # whether the client was asked to reconnect by itself
    wall_seconds: float = 0.0
    events: list[str] = field(default_factory=list)
    counters: dict[str, Any] = field(default_factory=dict)


class _CountingHandler(logging.Handler):
    """Counts the ``macula.client`` log lines of a run (an error the node reported...)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.lines[record.getMessage()[:200]] += 1


class Run:
    """One scenario run: topology, nodes, publisher, subscriber, ledger, fault times."""

    def __init__(self, settings: Settings, fault_duration: float) -> None:
        self.s = settings
        self.fault_duration = fault_duration
        self.sub_heartbeat_ms = 0  # the subscriber client's heartbeat_ms (0: its default)
        self.topo = Topology(settings.nodes)
        self.nodes = [NodeProc(self.topo, i, shards=settings.shards, env=settings.node_env)
                      for i in range(1, settings.nodes + 1)]
        horizon = settings.pre + fault_duration + settings.post + 60.0
        self.ledger = Ledger(int(settings.rate * horizon) + 16)
        self.loop = asyncio.get_running_loop()
        self.t0 = 0.0  # loop time the counted traffic started
        self.fault_start = self.fault_end = 0.0
        self.not_owed: list[tuple[float, float]] = []  # publish-time windows
        self.events: list[str] = []
        self.pub: Any = None
        self.sub_client: Any = None
        self.sub: Any = None
        self.sub_node = settings.nodes  # the subscriber's node (the faulted one)
        self.inflight: set[asyncio.Future[Any]] = set()
        self.not_sent = 0
        self.warm = asyncio.Event()
        self.session_end: str | None = None
        self.client_log = _CountingHandler()

    def note(self, text: str) -> None:
        t = self.loop.time() - self.t0 if self.t0 else 0.0
        self.events.append(f"{t:+8.3f}s {text}")

    def node(self, i: int) -> NodeProc:
        return self.nodes[i - 1]

    # -- set-up ---------------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(self.topo.create)
        first = self.nodes[0]
        first.start()
        await first.wait_ready(self.s.startup_timeout)
        for n in self.nodes[1:]:
            n.start()
        for n in self.nodes[1:]:
            await n.wait_ready(self.s.startup_timeout)
        from macula.client import Client

        opts = _client_options()
        hb = {"heartbeat_ms": self.sub_heartbeat_ms} if self.sub_heartbeat_ms else {}
        self.sub_client = await Client.connect(
            self.node(self.sub_node).endpoint, name="chaos-sub", timeout=self.s.client_timeout,
            **opts, **hb)
        await self.subscribe()
        self.pub = await Client.connect(self.node(1).endpoint, name="chaos-pub",
                                        timeout=self.s.client_timeout, **opts)

    async def subscribe(self) -> None:
        self.sub = await self.sub_client.subscribe(TOPIC, qos=1, callback=self.on_message)

    def on_message(self, msg: Any) -> None:
        data: bytes = msg.payload
        if data[:1] == MAGIC and len(data) == 9:
            self.ledger.received(int.from_bytes(data[1:], "big"), self.loop.time())
        elif data[:1] == PROBE:
            self.warm.set()
        else:
            self.ledger.foreign += 1

    async def warm_up(self) -> None:
        """Publish probes (QoS 1, not counted) until one reaches the subscriber."""
        deadline = self.loop.time() + self.s.warmup_timeout
        while not self.warm.is_set():
            if self.loop.time() > deadline:
                raise ChaosError(f"no probe crossed the mesh from node 1 to node "
                                 f"{self.sub_node} within {self.s.warmup_timeout:g} s")
            await self.pub.publish(TOPIC, PROBE, qos=1, timeout=self.s.puback_timeout)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.warm.wait(), 0.2)

    # -- traffic --------------------------------------------------------------------------
    async def publish_until(self, stop: asyncio.Event) -> None:
        """Publish numbered QoS 1 messages at ``rate`` until ``stop`` (or the ledger is
        full); every PUBACK (or its absence) goes to the ledger."""
        led, rate = self.ledger, self.s.rate
        start = self.loop.time()
        while not stop.is_set() and led.sent < led.capacity:
            now = self.loop.time()
            due = min(int((now - start) * rate) + 1, led.capacity) - led.sent - self.not_sent
            for _ in range(max(0, due)):
                if len(self.inflight) >= self.s.max_inflight:
                    self.not_sent += 1
                    continue
                seq = led.sent
                led.sent += 1
                led.sent_at[seq] = now
                fut = asyncio.ensure_future(self.pub.publish(
                    TOPIC, payload(seq), qos=1, timeout=self.s.puback_timeout))
                self.inflight.add(fut)
                fut.add_done_callback(lambda f, seq=seq: self._puback(seq, f))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.005)

    def _puback(self, seq: int, fut: asyncio.Future[Any]) -> None:
        self.inflight.discard(fut)
        if fut.cancelled():
            self.ledger.outcome[seq] = "cancelled"
            return
        exc = fut.exception()
        if exc is None:
            reason = fut.result()
            self.ledger.outcome[seq] = getattr(reason, "name", str(reason))
        else:
            code = getattr(exc, "code", None)
            name = getattr(code, "name", None) or (str(code) if code else "")
            self.ledger.outcome[seq] = f"{type(exc).__name__}{':' + name if name else ''}"

    def watch_session(self) -> None:
        """Note the moment the subscriber's session closes (once)."""
        closed = getattr(self.sub_client, "closed", None)
        if closed is not None and self.session_end is None:
            self.session_end = str(closed)
            self.note(f"subscriber session closed: {closed}")

    async def drain(self) -> None:
        """Wait (at most ``drain`` s) until every owed acknowledged message arrived."""
        led = self.ledger
        missing = [s for s in range(led.sent) if led.outcome[s] == "OK" and self.owed(s)
                   and led.recv_count[s] == 0]
        deadline = self.loop.time() + self.s.drain
        while missing and self.loop.time() < deadline:
            await asyncio.sleep(0.1)
            missing = [s for s in missing if led.recv_count[s] == 0]
            self.watch_session()

    def owed(self, seq: int) -> bool:
        t = self.ledger.sent_at[seq]
        return not any(a <= t <= b for a, b in self.not_owed)

    # -- the end --------------------------------------------------------------------------
    async def node_counters(self) -> dict[str, Any]:
        from macula.client import Client

        async def one(n: NodeProc) -> dict[str, Any]:
            if not n.alive():
                return {"error": "not running"}
            try:
                c = await Client.connect(n.endpoint, name="chaos-stats", timeout=STATS_TIMEOUT)
                try:
                    stats: dict[str, Any] = await c.stats(timeout=STATS_TIMEOUT)
                finally:
                    await c.close(timeout=1.0)
            except Exception as exc:  # reported, never fatal: the run's figures stand
                return {"error": f"{type(exc).__name__}: {exc}"}
            return _summary_counters(stats)

        got = await asyncio.gather(*(one(n) for n in self.nodes))
        return {f"n{n.index}": c | {"starts": n.starts} for n, c in zip(self.nodes, got,
                                                                         strict=True)}

    async def close(self) -> None:
        for c in (self.pub, self.sub_client):
            if c is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(c.close(timeout=1.0), 2.0)
        for n in reversed(self.nodes):
            await asyncio.to_thread(n.terminate)
        await asyncio.to_thread(self.topo.destroy)

    def result(self, name: str) -> Result:
        led = self.ledger
        r = Result(scenario=name, fault_duration=self.fault_duration, sent=led.sent,
                   run_id=self.topo.run_id)
        refused: Counter[str] = Counter()
        lost_by_phase: Counter[str] = Counter()
        lat: list[float] = []
        fault_lat: list[float] = []
        resume_at: float | None = None
        for s in range(led.sent):
            out = led.outcome[s]
            t = led.sent_at[s]
            got = led.recv_count[s]
            if got:
                r.received += 1
                r.deliveries += got
                if got > 1:
                    r.duplicated += 1
                if t < self.fault_start:
                    lat.append(led.first_recv[s] - t)
                elif t < self.fault_end:
                    fault_lat.append(led.first_recv[s] - t)
                if t >= self.fault_end and (resume_at is None or led.first_recv[s] < resume_at):
                    resume_at = led.first_recv[s]
            if not self.owed(s):
                r.not_owed += 1
                r.not_owed_received += bool(got)
                if out == "OK":
                    r.acknowledged += 1
                elif out is not None:
                    refused[out] += 1
                continue
            if out == "OK":
                r.acknowledged += 1
                if not got:
                    r.lost += 1
                    phase = ("before" if t < self.fault_start else
                             "during" if t < self.fault_end else "after")
                    lost_by_phase[phase] += 1
            else:
                refused[out or "no answer"] += 1
                r.received_unacknowledged += bool(got)
                r.no_subscribers_lost += out == "NO_SUBSCRIBERS" and not got
        if self.not_sent:
            refused["not sent (publisher at max_inflight)"] = self.not_sent
        r.refused = dict(refused)
        r.lost_by_phase = {k: lost_by_phase.get(k, 0) for k in ("before", "during", "after")}
        r.resume = None if resume_at is None else round(resume_at - self.fault_end, 3)
        r.latency_p50_ms, r.latency_p99_ms = _percentiles_ms(lat)
        r.fault_latency_p50_ms, r.fault_latency_p99_ms = _percentiles_ms(fault_lat)
        r.fault = {"start": round(self.fault_start - self.t0, 3),
                   "end": round(self.fault_end - self.t0, 3)}
        r.subscriber_session = self.session_end or "open"
        r.client_log = dict(self.client_log.lines)
        r.client_reconnects = client_reconnects()
        r.events = list(self.events)
        if led.foreign or led.out_of_range:
            r.events.append(f"unexpected payloads: {led.foreign} foreign, "
                            f"{led.out_of_range} out of range")
        return r


def _percentiles_ms(xs: list[float]) -> tuple[float | None, float | None]:
    """p50 and p99 of ``xs`` (seconds) in ms; (None, None) when empty."""
    if not xs:
        return None, None
    xs.sort()
    return round(xs[len(xs) // 2] * 1000, 2), round(xs[int(len(xs) * 0.99)] * 1000, 2)


def _summary_counters(stats: dict[str, Any]) -> dict[str, Any]:
    """The node figures worth a line: mesh drops by reason, re-sends, duplicates, links."""
    mesh = stats.get("mesh") or {}
    out: dict[str, Any] = {}
    for key in ("drops_total", "qos1_resent_total", "duplicates_total", "qos1_inflight",
                "nodes_gone_total", "links_open", "pending"):
        if key in mesh:
            out[f"mesh.{key}"] = mesh[key]
    for key in ("drops", "drops_total", "redeliveries", "redeliveries_total", "sessions"):
        if key in stats:
            out[key] = stats[key]
    return out


# -- faults -----------------------------------------------------------------------------------
# A fault starts at once, lasts its duration, and sets run.fault_start / run.fault_end (loop
# time). It never raises for a finding about macula, only for a harness failure.

async def fault_resubscribe(run: Run, duration: float) -> None:
    """The subscriber unsubscribes, waits ``duration``, subscribes to the same filter again.
    The fault ends at the new SUBACK; messages published from RESUBSCRIBE_GRACE before the
    UNSUBSCRIBE until then are not owed to it (reported as ``not_owed``)."""
    run.fault_start = run.loop.time()
    run.note("UNSUBSCRIBE")
    await run.sub_client.unsubscribe(TOPIC, timeout=run.s.client_timeout)
    await asyncio.sleep(duration)
    run.note("SUBSCRIBE again")
    await run.subscribe()
    run.fault_end = run.loop.time()
    run.not_owed.append((run.fault_start - RESUBSCRIBE_GRACE, run.fault_end))
    run.note("SUBACK")


async def fault_sigstop(run: Run, duration: float) -> None:
    n = run.node(run.sub_node)
    run.fault_start = run.loop.time()
    n.signal(signal.SIGSTOP)
    run.note(f"SIGSTOP node {n.index}")
    await asyncio.sleep(duration)
    n.signal(signal.SIGCONT)
    run.fault_end = run.loop.time()
    run.note(f"SIGCONT node {n.index}")


async def fault_linkdown(run: Run, duration: float) -> None:
    i = run.sub_node
    run.fault_start = run.loop.time()
    await asyncio.to_thread(sh, *run.topo.link_cmd(i, up=False))
    run.note(f"link of node {i} down")
    await asyncio.sleep(duration)
    await asyncio.to_thread(sh, *run.topo.link_cmd(i, up=True))
    run.fault_end = run.loop.time()
    run.note(f"link of node {i} up")


async def fault_loss(run: Run, duration: float) -> None:
    i, pct = run.sub_node, run.s.loss_percent
    run.fault_start = run.loop.time()
    for cmd in run.topo.loss_cmds(i, pct):
        await asyncio.to_thread(sh, *cmd)
    run.note(f"{pct} % loss both ways on node {i}")
    await asyncio.sleep(duration)
    drops = await asyncio.to_thread(run.topo.loss_counters, i)
    await asyncio.to_thread(sh, *run.topo.unloss_cmd(i))
    run.fault_end = run.loop.time()
    run.note(f"loss rules removed (packets dropped: {drops})")


async def fault_restart_third(run: Run, duration: float) -> None:
    """kill -9 and restart node 2 (no clients) ``restarts`` times, evenly over ``duration``."""
    if run.s.nodes < 3:
        raise ChaosError("restart-third needs 3 nodes")
    n = run.node(2)
    times = max(1, run.s.restarts)
    run.fault_start = run.loop.time()
    for k in range(times):
        at = run.fault_start + k * duration / times
        await asyncio.sleep(max(0.0, at - run.loop.time()))
        await asyncio.to_thread(n.kill)
        run.note(f"kill -9 node 2 ({k + 1}/{times})")
        n.start()
        await n.wait_ready(run.s.startup_timeout)
        run.note("node 2 ready")
    await asyncio.sleep(max(0.0, run.fault_start + duration - run.loop.time()))
    run.fault_end = run.loop.time()


async def fault_kill9(run: Run, duration: float) -> None:
    """kill -9 the subscriber's node, restart it after ``kill_down`` s with the same data
    directory and endpoint; the fault ends when it is ready. The subscriber's client must
    reconnect by itself (nothing here reconnects it)."""
    n = run.node(run.sub_node)
    run.fault_start = run.loop.time()
    await asyncio.to_thread(n.kill)
    run.note(f"kill -9 node {n.index}")
    await asyncio.sleep(duration)
    n.start()
    run.fault_end = await n.wait_ready(run.s.startup_timeout)
    run.note(f"node {n.index} restarted and ready")


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    duration: float  # the fault's default duration (s)
    fault: Callable[[Run, float], Awaitable[None]]
    # the subscriber client's heartbeat_ms (0: the client's default). sigstop measures what
    # the MESH keeps while the subscriber's node is paused, so the subscriber's session must
    # outlive the pause: with the default (silence for 3 s = node gone) the client starts a
    # new, clean session, and what the old one held is lost with it (sigstop-reconnect
    # shows that case; persistent sessions are the durability issue's)
    sub_heartbeat_ms: int = 0


SCENARIOS: Final = {s.name: s for s in (
    Scenario("resubscribe", "subscriber resubscribes after {d:g} s", 0.5, fault_resubscribe),
    Scenario("sigstop", "subscriber's node SIGSTOP {d:g} s", 10.0, fault_sigstop,
             sub_heartbeat_ms=30_000),
    Scenario("sigstop-reconnect", "subscriber's node SIGSTOP {d:g} s, its client reconnecting "
             "(new clean session)", 10.0, fault_sigstop),
    Scenario("linkdown", "netns link of the subscriber's node down {d:g} s", 20.0,
             fault_linkdown),
    Scenario("loss", "{loss} % packet loss both ways for {d:g} s", 20.0, fault_loss),
    Scenario("restart-third", "a third node restarted {restarts} times in {d:g} s", 60.0,
             fault_restart_third),
    Scenario("kill9", "subscriber's node kill -9 and restart after {d:g} s "
             "(client reconnects itself)", 1.0, fault_kill9),
)}


def title(scenario: Scenario, settings: Settings) -> str:
    """The scenario's description with this run's duration, loss and restarts."""
    return scenario.title.format(d=fault_duration(scenario, settings),
                                 loss=settings.loss_percent, restarts=settings.restarts)


def fault_duration(scenario: Scenario, settings: Settings) -> float:
    if scenario.name == "kill9":
        return settings.kill_down if settings.duration is None else settings.duration
    return scenario.duration if settings.duration is None else settings.duration


def run_budget(name: str, settings: Settings, duration: float) -> float:
    """Seconds a scenario run may take in all before it is stopped as failed."""
    s = settings
    restarts = {"restart-third": s.restarts, "kill9": 1}.get(name, 0)
    return (2 * s.startup_timeout + s.warmup_timeout + s.pre + duration + s.post
            + s.puback_timeout + s.drain + (4 + restarts) * STOP_TIMEOUT + 30.0
            + restarts * s.startup_timeout)


async def run_scenario_async(name: str, settings: Settings) -> Result:
    """Run scenario ``name`` once (fresh namespaces and nodes) and return its figures.
    A harness failure comes back as ``Result.error``; the namespaces are always removed."""
    scenario = SCENARIOS[name]
    duration = fault_duration(scenario, settings)
    wall = time.monotonic()
    run = Run(settings, duration)
    run.sub_heartbeat_ms = (settings.sub_heartbeat_ms if settings.sub_heartbeat_ms is not None
                            else scenario.sub_heartbeat_ms)
    client_logger = logging.getLogger("macula.client")
    client_logger.addHandler(run.client_log)
    propagate, client_logger.propagate = client_logger.propagate, False
    error: str | None = None
    budget = run_budget(name, settings, duration)
    try:
        await asyncio.wait_for(_drive(run, scenario, duration), budget)
    except asyncio.TimeoutError:  # not the builtin before Python 3.11
        error = f"the run overran its budget of {budget:.0f} s"
    except ChaosError as exc:
        error = str(exc)
    except Exception as exc:  # a harness failure: reported with the figures gathered so far
        error = f"{type(exc).__name__}: {exc}"
    finally:
        counters: dict[str, Any] = {}
        if error is None:
            with contextlib.suppress(Exception):
                counters = await asyncio.wait_for(run.node_counters(), 2 * STATS_TIMEOUT + 2)
        await run.close()
        client_logger.removeHandler(run.client_log)
        client_logger.propagate = propagate
    result = run.result(name)
    result.error = error
    result.counters = counters
    result.wall_seconds = round(time.monotonic() - wall, 1)
    return result


async def _drive(run: Run, scenario: Scenario, duration: float) -> None:
    s = run.s
    await run.start()
    await run.warm_up()
    run.t0 = run.loop.time()
    run.note("traffic starts")
    stop = asyncio.Event()
    publisher = asyncio.ensure_future(run.publish_until(stop))
    watcher = asyncio.ensure_future(_watch(run, stop))
    try:
        await asyncio.sleep(s.pre)
        await scenario.fault(run, duration)
        await asyncio.sleep(s.post)
    finally:
        stop.set()
        await publisher
        await watcher
    run.note(f"traffic stops ({run.ledger.sent} sent)")
    if run.inflight:
        await asyncio.wait(set(run.inflight), timeout=s.puback_timeout + 1)
    await run.drain()
    run.watch_session()
    run.note("drained")


async def _watch(run: Run, stop: asyncio.Event) -> None:
    while not stop.is_set():
        run.watch_session()
        await asyncio.sleep(0.05)


def run_scenario(name: str, settings: Settings | None = None) -> Result:
    """Blocking :func:`run_scenario_async` (its own event loop)."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r} (known: {', '.join(SCENARIOS)})")
    return asyncio.run(run_scenario_async(name, settings or Settings()))


# -- report -----------------------------------------------------------------------------------
def _median(values: Iterable[float | None]) -> float | None:
    """Median, a missing value (never happened) counting as larger than any other."""
    xs = [float("inf") if v is None else float(v) for v in values]
    if not xs:
        return None
    m = statistics.median_low(xs) if len(xs) % 2 == 0 else statistics.median(xs)
    return None if m == float("inf") else m


def _count(v: float | None) -> int | None:
    return None if v is None else int(v)


def summarize(results: list[Result]) -> dict[str, Any]:
    ok = [r for r in results if r.error is None]
    out: dict[str, Any] = {"runs": len(results), "failed_runs": len(results) - len(ok)}
    if not ok:
        return out
    for key in ("sent", "acknowledged", "received", "lost", "duplicated", "not_owed",
                "no_subscribers_lost"):
        out[key] = _count(_median(getattr(r, key) for r in ok))
    for key in ("latency_p50_ms", "fault_latency_p99_ms"):
        out[key] = _median(getattr(r, key) for r in ok)
    out["resume"] = _median(r.resume for r in ok)
    out["refused"] = _count(_median(sum(r.refused.values()) for r in ok))
    reasons = sorted({k for r in ok for k in r.refused})
    out["refused_by_reason"] = {k: _count(_median(r.refused.get(k, 0) for r in ok))
                                for k in reasons}
    out["lost_per_run"] = [r.lost for r in ok]
    out["duplicated_per_run"] = [r.duplicated for r in ok]
    out["resume_per_run"] = [r.resume for r in ok]
    return out


def _fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "never"
    if float(v).is_integer() and not unit:
        return f"{int(v):,}"
    return f"{v:.2f}{unit}" if unit else f"{v:,.1f}"


def print_result(r: Result, index: int, runs: int, verbose: bool, file: TextIO) -> None:
    head = f"-- {r.scenario} run {index}/{runs} ({r.wall_seconds:.0f} s)"
    if r.error is not None:
        print(f"{head}: FAILED: {r.error}", file=file, flush=True)
    else:
        lost = ", ".join(f"{k} {v}" for k, v in r.lost_by_phase.items())
        refused = ", ".join(f"{k} {v:,}" for k, v in r.refused.items()) or "none"
        print(f"{head}: fault {r.fault['start']:.1f}-{r.fault['end']:.1f} s\n"
              f"   sent {r.sent:,}  acknowledged {r.acknowledged:,}  refused/no PUBACK: "
              f"{refused}\n"
              f"   received {r.received:,} (deliveries {r.deliveries:,})  LOST {r.lost:,} "
              f"({lost})  DUPLICATED {r.duplicated:,}  resume "
              f"{_fmt(r.resume, ' s')}\n"
              f"   PUBACK NO_SUBSCRIBERS while subscribed, never received: "
              f"{r.no_subscribers_lost:,}\n"
              f"   not owed (unsubscribed) {r.not_owed:,} (received {r.not_owed_received:,})"
              f"  latency before the fault p50/p99 {_fmt(r.latency_p50_ms, ' ms')}/"
              f"{_fmt(r.latency_p99_ms, ' ms')}, of those published during it "
              f"{_fmt(r.fault_latency_p50_ms, ' ms')}/{_fmt(r.fault_latency_p99_ms, ' ms')}\n"
              f"   subscriber session: {r.subscriber_session}",
              file=file, flush=True)
        for line, count in r.client_log.items():
            print(f"   client log x{count}: {line}", file=file, flush=True)
        for node, c in r.counters.items():
            print(f"   {node}: {json.dumps(c, sort_keys=True)}", file=file, flush=True)
    if verbose or r.error is not None:
        for e in r.events:
            print(f"      {e}", file=file, flush=True)


def print_table(summary: dict[str, dict[str, Any]], settings: Settings, runs: int,
                file: TextIO) -> None:
    print(f"\nmacula chaos: {settings.nodes} nodes, QoS 1, {settings.rate:g} msg/s, "
          f"medians of {runs} run(s); resume = time from the end of the fault until the first "
          "message published after it ended is received", file=file)
    print("| scenario | sent | acknowledged | refused | received | acknowledged but lost "
          "| duplicates seen by the app | delivery resumes after the fault ends | lost per run "
          "| NO_SUBSCRIBERS while subscribed, lost | failed runs |", file=file)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|", file=file)
    for name, m in summary.items():
        what = title(SCENARIOS[name], settings)
        if "sent" not in m:
            print(f"| {what} | | | | | | | | | | {m['failed_runs']} |", file=file)
            continue
        print(f"| {what} | {_fmt(m['sent'])} | {_fmt(m['acknowledged'])} | "
              f"{_fmt(m['refused'])} | "
              f"{_fmt(m['received'])} | {_fmt(m['lost'])} | {_fmt(m['duplicated'])} | "
              f"{_fmt(m['resume'], ' s')} | {m['lost_per_run']} | "
              f"{_fmt(m['no_subscribers_lost'])} | {m['failed_runs']} |", file=file)


# -- command line -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    ap = argparse.ArgumentParser(
        prog="python tools/chaos.py",
        description="Chaos harness: macula nodes in network namespaces under faults "
                    "(docs/CHAOS.md). Needs root, ip (iproute2) and nft (nftables).")
    ap.add_argument("--scenario", action="append", choices=list(SCENARIOS),
                    help="scenario to run (repeatable; default: all)")
    ap.add_argument("--runs", type=int, default=3, help="runs per scenario (median of them)")
    ap.add_argument("--duration", type=float, default=None,
                    help="fault duration in s for every scenario chosen (default: each "
                         "scenario's own; kill9: the time the node stays dead)")
    ap.add_argument("--rate", type=float, default=d.rate, help="QoS 1 messages per second")
    ap.add_argument("--pre", type=float, default=d.pre, help="s of traffic before the fault")
    ap.add_argument("--post", type=float, default=d.post, help="s of traffic after the fault")
    ap.add_argument("--drain", type=float, default=d.drain,
                    help="s at most to wait for owed messages once publishing stopped")
    ap.add_argument("--shards", type=int, default=d.shards, help="delivery shards per node")
    ap.add_argument("--node-env", action="append", default=[], metavar="MACULA_X=VALUE",
                    help="a setting of every node (docs/NODE.md), e.g. "
                         "MACULA_TICK_INTERVAL=0.02 (repeatable)")
    ap.add_argument("--loss", type=int, default=d.loss_percent, dest="loss_percent",
                    help="loss scenario: percent of packets dropped each way")
    ap.add_argument("--restarts", type=int, default=d.restarts,
                    help="restart-third: restarts of node 2 within the fault duration")
    ap.add_argument("--json", action="store_true",
                    help="print one JSON document (every run, the medians) on stdout at the "
                         "end; the rest goes to stderr")
    ap.add_argument("--verbose", action="store_true", help="print each run's timeline")
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    ap.add_argument("--cleanup", action="store_true",
                    help="remove leftovers (namespaces, processes, /tmp/mchaos-*) of runs "
                         "whose harness is gone, then exit")
    ap.add_argument("--force", action="store_true",
                    help="with --cleanup: also those of runs still going")
    return ap


def _check_args(args: argparse.Namespace) -> str | None:
    if not 1 <= args.runs <= 100:
        return "--runs must be 1..100"
    if not 0 < args.rate <= 100_000:
        return "--rate must be in (0, 100000]"
    if args.duration is not None and not 0 <= args.duration <= 3600:
        return "--duration must be 0..3600"
    for opt in ("pre", "post", "drain"):
        if not 0 <= getattr(args, opt) <= 3600:
            return f"--{opt} must be 0..3600"
    if not 0 <= args.shards <= 16:
        return "--shards must be 0..16"
    if not 1 <= args.loss_percent <= 100:
        return "--loss must be 1..100"
    if not 1 <= args.restarts <= 100:
        return "--restarts must be 1..100"
    for item in args.node_env:
        key, eq, _ = item.partition("=")
        if not eq or not key.startswith("MACULA_"):
            return f"--node-env takes MACULA_NAME=VALUE, not {item!r}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        for s in SCENARIOS.values():
            print(f"{s.name:14} {title(s, Settings())}")
        return 0
    problem = _check_args(args)
    if problem:
        print(f"chaos: {problem}", file=sys.stderr)
        return 2
    missing = check_environment()
    if missing:
        print("chaos: cannot run here: " + "; ".join(missing), file=sys.stderr)
        return 2
    if args.cleanup:
        for name in cleanup_leftovers(force=args.force):
            print(f"removed {name}")
        return 0
    cleanup_leftovers()  # those of harnesses that died
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    settings = Settings(rate=args.rate, pre=args.pre, post=args.post, drain=args.drain,
                        duration=args.duration, shards=args.shards,
                        loss_percent=args.loss_percent, restarts=args.restarts,
                        node_env=dict(item.partition("=")[::2] for item in args.node_env))
    names = args.scenario or list(SCENARIOS)
    import macula

    human = sys.stderr if args.json else sys.stdout  # --json: stdout is the JSON alone
    print(f"macula {macula.__version__} from {_macula_root()}; client reconnecting by "
          f"itself: {client_reconnects()}; {settings.nodes} nodes, shards "
          f"{settings.shards}, {settings.rate:g} msg/s, {settings.pre:g} s before and "
          f"{settings.post:g} s after the fault"
          + "".join(f", {k}={v}" for k, v in settings.node_env.items()), file=human, flush=True)
    all_results: dict[str, list[Result]] = {}
    try:
        for name in names:
            for i in range(1, args.runs + 1):
                r = run_scenario(name, settings)
                all_results.setdefault(name, []).append(r)
                print_result(r, i, args.runs, args.verbose, human)
    except KeyboardInterrupt:
        _teardown_all()
        print("chaos: interrupted; its namespaces and processes are removed", file=sys.stderr)
        return 130
    summary = {name: summarize(rs) for name, rs in all_results.items()}
    print_table(summary, settings, args.runs, human)
    if args.json:
        print(json.dumps({"settings": asdict(settings), "summary": summary,
                          "runs": {n: [asdict(r) for r in rs] for n, rs in all_results.items()}},
                         indent=1))
    failed = sum(m["failed_runs"] for m in summary.values())
    return 1 if failed else 0


def _exit_on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
