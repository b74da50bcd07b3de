"""The composition root: one node built from a :class:`~macula.config.NodeConfig`.

A node is the control plane (broker + ZeroMQ driver, optionally delivery shards), the mesh
(``macula.mesh.service.Mesh``: QUIC endpoint, DHT, pub/sub and RPC across nodes; off with
``mesh_port = -1``) and the metrics endpoint, all on one asyncio loop. The broker calls the
mesh for every local PUBLISH, (un)subscription, registration and remote CALL
(``Broker.mesh``); the mesh hands messages from other nodes to the broker
(``Broker.inject``) and asks the control driver to flush afterwards.

- :class:`Node`: ``await node.start()`` / ``await node.stop()`` on a running loop.
- :func:`run`: what ``macula node`` does: start, print one ready line, stop cleanly on
  SIGINT/SIGTERM (every session gets BYE with SHUTDOWN).
- :class:`NodeThread`: a node on its own loop in a background thread, for tests, tools and
  embedding (``with NodeThread(cfg) as n: n.endpoint``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from macula.config import NodeConfig, host_port
from macula.control.broker import Broker
from macula.control.server import ControlServer, CurveSettings
from macula.mesh.service import Mesh, MeshConfig
from macula.metrics import LoopMonitor, MetricsServer, make_registry
from macula.shards.pool import ShardPool
from macula.wire import NodeIdentity

SHARD_BACKLOG = 2  # batches a shard may have unanswered before the node stops reading clients
SHARD_STALL = 2.0  # but a shard silent this long (seconds) is hung: read on


class Node:
    def __init__(self, config: NodeConfig | None = None) -> None:
        self.config = config = config or NodeConfig()
        self.broker = Broker(
            config.limits, realms=config.realms, allow_any_realm=config.allow_any_realm
        )
        curve = None
        if config.curve_secret_key_file or config.curve_allow_dir:
            if not (config.curve_secret_key_file and config.curve_allow_dir):
                raise ValueError("CURVE needs both curve_secret_key_file and curve_allow_dir")
            curve = CurveSettings(config.curve_secret_key_file, config.curve_allow_dir)
        if config.shards < 0:
            raise ValueError("shards must be >= 0 (0: match and fan out in the node process)")
        self.shards: ShardPool | None = None
        if config.shards > 0:
            self.shards = ShardPool(self.broker, config.shards)
            self.broker.fanout = self.shards
        self.mesh: Mesh | None = None
        self._tmp_dir: str | None = None
        if config.mesh_port >= 0 or config.client_mode:
            self.mesh = self._make_mesh(config)
            self.broker.mesh = self.mesh
        self.server = ControlServer(
            self.broker,
            config.endpoints,
            curve=curve,
            sndhwm=config.sndhwm,
            rcvhwm=config.rcvhwm,
            tick_interval=config.tick_interval,
            io_threads=config.io_threads,
            shards=self.shards,
            gate=self._may_read,
        )
        if self.mesh is not None:
            self.mesh.on_uncongested = self.server.resume
        self.monitor = LoopMonitor()
        self.server.loop_lag = self.monitor.lag
        self.registry = make_registry(self.broker.stats)
        self.metrics: MetricsServer | None = None
        if config.metrics_port >= 0:
            self.metrics = MetricsServer(
                self.registry, config.metrics_host, config.metrics_port, self.ready
            )
        self._stopping = False
        self._shards_behind_since: float | None = None

    def _may_read(self) -> bool:
        """The control driver's gate: read clients only while what they send can go on —
        the mesh's links are not congested and no delivery shard has ``SHARD_BACKLOG``
        batches unanswered (the ZeroMQ high-water marks then hold the clients back; nothing
        piles up in the node) — unless that shard has not answered for ``SHARD_STALL``
        seconds (hung: reading on lets the pool find it and restart it)."""
        if self.mesh is not None and not self.mesh.may_read():
            return False
        shards = self.shards
        if shards is not None:
            if any(sh.up and sh.outstanding >= SHARD_BACKLOG for sh in shards.shards):
                now = time.monotonic()
                if self._shards_behind_since is None:
                    self._shards_behind_since = now
                if now - self._shards_behind_since < SHARD_STALL:
                    return False
                # not one answer for SHARD_STALL s: the shard is hung, not busy; read on,
                # and the pool kills it once it has max_backlog batches unanswered
            else:
                self._shards_behind_since = None
        return True

    def _make_mesh(self, config: NodeConfig) -> Mesh:
        if (config.mesh_host in ("0.0.0.0", "::", "") and not config.mesh_advertise
                and not config.client_mode):
            raise ValueError(f"mesh_host {config.mesh_host!r} listens on every address: set "
                             "mesh_advertise to the host:port other nodes dial")
        data_dir = config.data_dir
        if not data_dir:
            data_dir = self._tmp_dir = tempfile.mkdtemp(prefix="macula-node-")
        identity = NodeIdentity.load_or_create(data_dir)
        # a node whose identity existed already is a restart: its clients may come back
        restarted = not identity.created
        mc = MeshConfig(
            host=config.mesh_host,
            port=max(config.mesh_port, 0),
            advertise=host_port(config.mesh_advertise, "mesh_advertise")
            if config.mesh_advertise else None,
            client_mode=config.client_mode,
            seeds=[host_port(s, "seeds") for s in config.seeds],
            network=config.mesh_network,
            network_secret=config.mesh_secret.encode() if config.mesh_secret else None,
            cache_ttl=config.mesh_cache_ttl,
            min_interval=config.mesh_min_interval,
            record_ttl=config.mesh_record_ttl,
            ack_timeout=config.mesh_ack_timeout,
            qos1_ttl=config.mesh_qos1_ttl,
            max_outbox_bytes=config.mesh_outbox_bytes,
            max_pending=config.mesh_max_pending,
            restore_grace=config.mesh_restore_grace if restarted else 0.0,
        )
        return Mesh(self.broker, identity, mc, flush=self._flush_control)

    def _flush_control(self) -> None:
        self.server.flush_output(asyncio.get_running_loop().time())  # a no-op once stopped

    @property
    def mesh_address(self) -> str:
        """``host:port`` of the mesh endpoint, ``client`` (client mode) or ``off``."""
        if self.mesh is None:
            return "off"
        addr = self.mesh.listen_address
        return f"{addr[0]}:{addr[1]}" if addr is not None else "client"

    @property
    def node_id(self) -> str:
        return self.mesh.node_id.hex() if self.mesh is not None else ""

    def ready(self) -> bool:
        return self.server.running and not self._stopping

    @property
    def endpoints(self) -> list[str]:
        """The bound control endpoints (``tcp://host:0`` resolved to the real port)."""
        return list(self.server.bound)

    @property
    def metrics_port(self) -> int | None:
        return self.metrics.port if self.metrics is not None else None

    async def start(self) -> None:
        if self.shards is not None:
            await self.shards.start()
        try:
            if self.mesh is not None:
                await self.mesh.start()
            await self.server.start()
        except BaseException:
            if self.mesh is not None:
                await self.mesh.stop()
            if self.shards is not None:
                await self.shards.stop()
            self._remove_tmp()
            raise
        if self.mesh is not None:
            await self.mesh.join()
        self.monitor.start()
        if self.metrics is not None:
            await self.metrics.start()

    async def stop(self) -> None:
        self._stopping = True
        self.monitor.stop()
        await self.server.stop()
        if self.mesh is not None:
            await self.mesh.stop()
        if self.shards is not None:
            await self.shards.stop()
        if self.metrics is not None:
            await self.metrics.stop()
        self._remove_tmp()

    def _remove_tmp(self) -> None:
        if self._tmp_dir is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(self._tmp_dir)
            self._tmp_dir = None

    def stats(self) -> dict[str, Any]:
        return self.broker.stats()


async def run(config: NodeConfig, out: TextIO = sys.stdout) -> int:
    """Run until SIGINT or SIGTERM; print ``macula node ready ...`` once serving. Log
    lines (peers lost, gone, back: docs/MESH.md) go to stderr unless logging is set up."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    node = Node(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await node.start()
    print(
        f"macula node ready endpoints={','.join(node.endpoints)} mesh={node.mesh_address} "
        f"node_id={node.node_id or '-'} "
        f"metrics={node.metrics_port if node.metrics_port is not None else 'off'}",
        file=out,
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await node.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    print("macula node stopped", file=out, flush=True)
    return 0


class NodeThread:
    """A :class:`Node` on its own event loop in a daemon thread.

    ``start()`` returns once the node serves; ``call(fn)`` runs ``fn(node)`` on the node's
    loop and returns its result (use it to read ``stats()`` or the broker safely).
    """

    def __init__(self, config: NodeConfig | None = None) -> None:
        self.config = config or NodeConfig()
        self.node: Node | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None

    def start(self) -> NodeThread:
        """Start the node (once; a started NodeThread returns itself)."""
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._main, name="macula-node", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        if self.node is None:
            raise RuntimeError("node did not start within 30 s")
        return self

    def _main(self) -> None:
        asyncio.run(self._amain())

    async def _amain(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            node = Node(self.config)
            await node.start()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self.node = node
        self._ready.set()
        await self._stop.wait()
        await node.stop()

    @property
    def endpoint(self) -> str:
        assert self.node is not None
        return self.node.endpoints[0]

    def call(self, fn: Callable[[Node], Any]) -> Any:
        assert self._loop is not None and self.node is not None
        node = self.node

        async def job() -> Any:
            return fn(node)

        return asyncio.run_coroutine_threadsafe(job(), self._loop).result(30)

    def stats(self) -> dict[str, Any]:
        return self.call(lambda n: n.stats())  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)
            self._loop = None

    def __enter__(self) -> NodeThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
