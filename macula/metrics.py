"""Prometheus metrics of a node, and the HTTP endpoint serving them with health checks.

With delivery shards, each shard's figures are served with a ``shard`` label
(``macula_shard_queue_depth{shard="0"}``...): the node's record of its queue depth, up/down
and restarts, and the figures the shard sends with every reply (busy time, messages,
matches, deliveries, subscriptions).

The broker keeps plain integer counters (no locks or label look-ups on the hot path); a
custom collector reads ``Broker.stats()`` at scrape time, so the figures served on
``/metrics`` are exactly those a client gets with STATS. Each node has its own
``CollectorRegistry``: two nodes in one process do not mix their figures.

The HTTP server is a few lines of asyncio on a loop in its own thread, so that it answers
while the node's loop is busy (the figures themselves are still collected on the node's
loop; see :class:`MetricsServer`): ``GET /metrics`` (Prometheus text format), ``GET
/healthz`` (200 while the process serves) and ``GET /readyz`` (200 once the control socket
is bound and until shutdown begins, else 503). :class:`LoopMonitor` measures how late the
node's loop runs its timers (``macula_loop_lag_seconds``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# stats key -> (metric name without _total, kind, help, label name for dict values)
_SPEC: tuple[tuple[str, str, str, str, str], ...] = (
    ("sessions", "macula_sessions", "gauge", "Client sessions open", ""),
    ("sessions_opened_total", "macula_sessions_opened", "counter", "Sessions welcomed", ""),
    ("sessions_closed_total", "macula_sessions_closed", "counter", "Sessions closed", "reason"),
    ("realms", "macula_realms", "gauge", "Realms with state on this node", ""),
    ("subscriptions", "macula_subscriptions", "gauge", "Subscriptions held", ""),
    ("registrations", "macula_registrations", "gauge", "RPC registrations held", ""),
    ("retained", "macula_retained_messages", "gauge", "Retained messages stored", ""),
    ("messages_in_total", "macula_messages_in", "counter", "PUBLISHes routed", ""),
    ("messages_out_total", "macula_messages_out", "counter", "EVENT deliveries queued", ""),
    ("commands_in_total", "macula_commands_in", "counter", "Commands received", ""),
    ("bytes_in_total", "macula_received_bytes", "counter", "Body bytes received", ""),
    ("acks_total", "macula_acks", "counter", "QoS 1 deliveries acknowledged", ""),
    ("redeliveries_total", "macula_redeliveries", "counter", "QoS 1 redeliveries", ""),
    ("duplicates_total", "macula_duplicate_publishes", "counter", "QoS 1 PUBLISH repeats", ""),
    ("calls_total", "macula_calls", "counter", "CALLs received", ""),
    ("calls_ok_total", "macula_calls_ok", "counter", "CALLs answered with RESULT", ""),
    ("calls_pending", "macula_calls_pending", "gauge", "CALLs waiting for a provider", ""),
    ("inflight", "macula_inflight_messages", "gauge", "QoS 1 deliveries awaiting ACK", ""),
    ("queued_qos0", "macula_queued_qos0_messages", "gauge", "QoS 0 EVENTs queued", ""),
    ("queued_reliable", "macula_queued_reliable_commands", "gauge", "Replies queued", ""),
    ("queued_pending_qos1", "macula_queued_qos1_messages", "gauge",
     "QoS 1 deliveries waiting for window space", ""),
    ("stalled_sessions", "macula_stalled_sessions", "gauge", "Sessions at their HWM", ""),
    ("blocked_total", "macula_sessions_blocked", "counter",
     "Times a session's socket was full (ZeroMQ SNDHWM reached: it became blocked)", ""),
    ("blocked_seconds_max", "macula_blocked_seconds_max", "gauge",
     "How long the longest-blocked session has been behind (0: none)", ""),
    ("ingress_parked", "macula_ingress_parked_messages", "gauge",
     "Messages of sessions over their ingress share, waiting", ""),
    ("ingress_parked_total", "macula_ingress_parked", "counter",
     "Messages parked because their session was over its ingress share", ""),
    ("ingress_refused_total", "macula_ingress_refused", "counter",
     "Messages refused because their session was over its share and its park was full", ""),
    ("ingress_gated_total", "macula_ingress_gated", "counter",
     "Times the node stopped reading clients (mesh links or shards behind)", ""),
    ("loop_lag_seconds", "macula_loop_lag_seconds", "gauge",
     "Largest lateness of the node's event loop over the last 10 to 20 s", ""),
    ("drops_total", "macula_drops", "counter", "Messages dropped, by reason", "reason"),
    ("messages_from_mesh_refused_total", "macula_messages_from_mesh_refused", "counter",
     "QoS 1 messages from other nodes refused for want of room (the sender re-sends)", ""),
    ("errors_total", "macula_errors", "counter", "ERRORs sent, by code name", "code"),
)


# per-shard stats key -> (metric name without _total, kind, help)
_SHARD_SPEC: tuple[tuple[str, str, str, str], ...] = (
    ("up", "macula_shard_up", "gauge", "1 while the shard process serves"),
    ("restarts_total", "macula_shard_restarts", "counter", "Shard processes restarted"),
    ("queue_depth", "macula_shard_queue_depth", "gauge",
     "Messages sent to the shard and not yet answered"),
    ("busy_seconds_total", "macula_shard_busy_seconds", "counter",
     "Time the shard process spent matching and building (this process)"),
    ("messages_total", "macula_shard_messages", "counter",
     "Published messages matched by the shard (this process)"),
    ("matched_total", "macula_shard_matched", "counter",
     "Subscriptions matched (this process)"),
    ("delivered_total", "macula_shard_delivered", "counter",
     "EVENT deliveries built or routed (this process)"),
    ("missed_total", "macula_shard_missed", "counter",
     "Published messages the shard never got (it was down)"),
    ("subscriptions", "macula_shard_subscriptions", "gauge", "Subscriptions in the shard"),
    ("sessions", "macula_shard_sessions", "gauge", "Sessions with subscriptions in the shard"),
)


# mesh stats key -> (metric name without _total, kind, help, label for dict values)
_MESH_SPEC: tuple[tuple[str, str, str, str, str], ...] = (
    ("messages_forwarded_total", "macula_mesh_messages_forwarded", "counter",
     "Messages sent to other nodes (one per node)", ""),
    ("messages_received_total", "macula_mesh_messages_received", "counter",
     "Messages received from other nodes", ""),
    ("frames_out_total", "macula_mesh_pub_frames_out", "counter", "PUB frames sent", ""),
    ("route_hits_total", "macula_mesh_route_hits", "counter",
     "Publishes routed from the subscriber cache", ""),
    ("route_misses_total", "macula_mesh_route_misses", "counter",
     "Publishes that needed discovery (queued or recomputed)", ""),
    ("route_hit_ratio", "macula_mesh_route_hit_ratio", "gauge",
     "Subscriber-cache hit ratio since start", ""),
    ("dht_lookups_total", "macula_mesh_dht_lookups", "counter",
     "DHT lookups started by the mesh (anchors, providers)", ""),
    ("dht_queries_total", "macula_mesh_dht_queries", "counter",
     "DHT queries sent to other nodes", ""),
    ("dht_puts_total", "macula_mesh_dht_puts", "counter", "DHT records put", ""),
    ("dht_contacts", "macula_mesh_dht_contacts", "gauge", "Contacts in the routing table", ""),
    ("discovery_latency_p50_ms", "macula_mesh_discovery_latency_p50_ms", "gauge",
     "Median DHT lookup time of the last 1,024 discovery lookups (ms)", ""),
    ("discovery_latency_p99_ms", "macula_mesh_discovery_latency_p99_ms", "gauge",
     "99th percentile of the same (ms)", ""),
    ("publish_to_send_p50_ms", "macula_mesh_publish_to_send_p50_ms", "gauge",
     "Median wait of a forwarded message in the node before its frame is written (ms)", ""),
    ("publish_to_send_p99_ms", "macula_mesh_publish_to_send_p99_ms", "gauge",
     "99th percentile of the same (ms)", ""),
    ("pending", "macula_mesh_pending_messages", "gauge",
     "Messages waiting for discovery", ""),
    ("qos1_inflight", "macula_mesh_qos1_inflight", "gauge",
     "QoS 1 messages sent to other nodes and not acknowledged", ""),
    ("qos1_resent_total", "macula_mesh_qos1_resent", "counter",
     "QoS 1 messages re-sent to other nodes", ""),
    ("duplicates_total", "macula_mesh_duplicates", "counter",
     "Repeated QoS 1 messages from other nodes (not delivered again)", ""),
    ("nomatch_sent_total", "macula_mesh_nomatch_sent", "counter",
     "Topics answered with NOMATCH", ""),
    ("pruned_total", "macula_mesh_routes_pruned", "counter",
     "Routes pruned after a NOMATCH", ""),
    ("nodes_gone_total", "macula_mesh_nodes_gone", "counter", "Nodes found dead", ""),
    ("links_open", "macula_mesh_links_open", "gauge", "Open links to other nodes", ""),
    ("calls_forwarded_total", "macula_mesh_calls_forwarded", "counter",
     "Calls sent to providers on other nodes", ""),
    ("calls_served_total", "macula_mesh_calls_served", "counter",
     "Calls from other nodes served here", ""),
    ("calls_failed_over_total", "macula_mesh_calls_failed_over", "counter",
     "Calls retried on another provider", ""),
    ("bad_input_total", "macula_mesh_bad_input", "counter",
     "Malformed mesh frames or messages from peers", ""),
    ("drops_total", "macula_mesh_drops", "counter", "Mesh messages dropped, by reason", "reason"),
    ("peers_lost_total", "macula_mesh_peers_lost", "counter",
     "Links to other nodes that broke (re-dialled)", ""),
    ("peers_back_total", "macula_mesh_peers_back", "counter",
     "Nodes declared gone that became reachable again", ""),
    ("peers_restarted_total", "macula_mesh_peers_restarted", "counter",
     "Other nodes seen with a new incarnation (restarted)", ""),
    ("nodes_unreachable", "macula_mesh_nodes_unreachable", "gauge",
     "Nodes declared gone for which QoS 1 messages are held", ""),
    ("qos1_held", "macula_mesh_qos1_held", "gauge",
     "QoS 1 messages held for nodes declared gone", ""),
    ("qos1_inflight_bytes", "macula_mesh_qos1_inflight_bytes", "gauge",
     "Bytes of QoS 1 messages not yet acknowledged by other nodes", ""),
    ("qos1_refused_by_peer_total", "macula_mesh_qos1_refused_by_peer", "counter",
     "QoS 1 messages another node refused for want of room (sent again later)", ""),
    ("notify_sent_total", "macula_mesh_notify_sent", "counter",
     "Changed records pushed to the nodes that watch their anchor", ""),
    ("notify_received_total", "macula_mesh_notify_received", "counter",
     "Changed records pushed by other nodes", ""),
    ("stale_frames_total", "macula_mesh_stale_frames", "counter",
     "PUB frames from an earlier incarnation of their origin (dropped)", ""),
)


def _rss_bytes() -> float:
    """Resident memory of this process (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return float(int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return 0.0


def _family(kind: str, name: str, doc: str,
            labels: list[str] | None) -> CounterMetricFamily | GaugeMetricFamily:
    if kind == "counter":
        return CounterMetricFamily(name, doc, labels=labels)
    return GaugeMetricFamily(name, doc, labels=labels)


class BrokerCollector(Collector):
    """Turns a ``stats()`` callable into Prometheus metric families at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        return list(self._families(self._stats()))

    def _families(self, stats: dict[str, Any]) -> Iterator[Metric]:
        yield from self._plain(_SPEC, stats)
        shards = stats.get("shards")
        if shards:
            yield from self._shard_families(shards)
        mesh = stats.get("mesh")
        if mesh:
            yield from self._plain(_MESH_SPEC, mesh)
        rss = GaugeMetricFamily("macula_node_resident_bytes",
                                "Resident memory of the node process")
        rss.add_metric([], _rss_bytes())
        yield rss

    def _plain(self, spec: tuple[tuple[str, str, str, str, str], ...],
               stats: dict[str, Any]) -> Iterator[Metric]:
        for key, name, kind, doc, label in spec:
            value = stats.get(key, 0)
            family = _family(kind, name, doc, [label] if label else None)
            if label:
                for lv, v in sorted(value.items()):
                    family.add_metric([lv.lower()], float(v))
            else:
                family.add_metric([], float(value))
            yield family

    def _shard_families(self, shards: list[dict[str, Any]]) -> Iterator[Metric]:
        for key, name, kind, doc in _SHARD_SPEC:
            family = _family(kind, name, doc, ["shard"])
            for sh in shards:
                family.add_metric([str(sh["shard"])], float(sh.get(key, 0)))
            yield family


def make_registry(stats: Callable[[], dict[str, Any]]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(stats))
    return registry


class LoopMonitor:
    """How late the node's event loop runs a timer: a callback every ``interval`` seconds
    records its lateness. ``lag()`` is the largest lateness of the last 10 to 20 s."""

    def __init__(self, interval: float = 0.1, window: float = 10.0) -> None:
        self.interval = interval
        self.window = window
        self._due = 0.0
        self._cur = 0.0  # largest lag of this window
        self._prev = 0.0  # of the previous window
        self._window_end = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        now = loop.time()
        self._window_end = now + self.window
        self._due = now + self.interval
        self._handle = loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        late = max(0.0, now - self._due)
        if now >= self._window_end:
            self._prev, self._cur = self._cur, 0.0
            self._window_end = now + self.window
        self._cur = max(self._cur, late)
        self._due = now + self.interval
        self._handle = loop.call_at(self._due, self._tick)

    def lag(self) -> float:
        return max(self._cur, self._prev)


class MetricsServer:
    """``/metrics``, ``/healthz``, ``/readyz`` over HTTP/1.0, served by a thread of its own.

    The HTTP side (accepting, reading requests, writing answers) runs on an event loop in a
    daemon thread, so that it answers while the node's loop is busy. The figures are
    collected on the node's loop (``call_soon_threadsafe``: ``Broker.stats()`` is never read
    from another thread); when the node's loop does not run the collection within
    ``fresh_timeout`` seconds, the last collected figures are served, with
    ``macula_metrics_age_seconds`` saying how old they are (503 if there are none yet).
    """

    def __init__(
        self, registry: CollectorRegistry, host: str, port: int, ready: Callable[[], bool],
        *, fresh_timeout: float = 0.5,
    ) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self.ready = ready
        self.fresh_timeout = fresh_timeout
        # the collection asked of the node's loop and not run yet: at most one at a time,
        # however many scrapes come while the loop is busy (HTTP thread only)
        self._pending: concurrent.futures.Future[None] | None = None
        self._node_loop: asyncio.AbstractEventLoop | None = None
        self._http_loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._last: bytes | None = None
        self._last_at = 0.0
        self._lock = threading.Lock()

    async def start(self) -> None:
        self._node_loop = asyncio.get_running_loop()
        started: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._main, args=(started,),
                                        name="macula-metrics", daemon=True)
        self._thread.start()
        self.port = await asyncio.wrap_future(started)
        self._refresh()

    def _main(self, started: concurrent.futures.Future[int]) -> None:
        loop = self._http_loop = asyncio.new_event_loop()
        try:
            server = loop.run_until_complete(
                asyncio.start_server(self._handle, self.host, self.port))
        except OSError as exc:
            started.set_exception(exc)
            loop.close()
            return
        started.set_result(server.sockets[0].getsockname()[1])
        try:
            loop.run_forever()
        finally:
            server.close()
            loop.run_until_complete(server.wait_closed())
            loop.close()

    async def stop(self) -> None:
        loop, thread = self._http_loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            await asyncio.get_running_loop().run_in_executor(None, thread.join, 5.0)
        self._thread = None

    def _refresh(self) -> None:
        """On the node's loop: collect the figures now."""
        body = generate_latest(self.registry)
        with self._lock:
            self._last = body
            self._last_at = time.monotonic()

    async def _metrics(self) -> bytes | None:
        """On the HTTP thread: fresh figures, or the last ones when the node is too busy."""
        node = self._node_loop
        if node is not None and not node.is_closed():
            fut = self._pending
            if fut is None or fut.done():
                fut = self._pending = concurrent.futures.Future()

                def collect(done: concurrent.futures.Future[None] = fut) -> None:
                    try:
                        self._refresh()
                    finally:
                        done.set_result(None)

                with contextlib.suppress(RuntimeError):  # the node's loop closed meanwhile
                    node.call_soon_threadsafe(collect)
            # waits without cancelling: a later scrape may still use that collection
            await asyncio.wait({asyncio.wrap_future(fut)}, timeout=self.fresh_timeout)
        with self._lock:
            body, at = self._last, self._last_at
        if body is None:
            return None
        age = time.monotonic() - at
        return body + (
            "# HELP macula_metrics_age_seconds Age of these figures (the node's loop was busy)\n"
            "# TYPE macula_metrics_age_seconds gauge\n"
            f"macula_metrics_age_seconds {age:.3f}\n").encode()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            while (await asyncio.wait_for(reader.readline(), 5.0)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else ""
            ctype = "text/plain; charset=utf-8"
            if parts[:1] != ["GET"]:
                status, body = "405 Method Not Allowed", b"GET only\n"
            elif path == "/metrics":
                figures = await self._metrics()
                if figures is None:
                    status, body = "503 Service Unavailable", b"no figures yet\n"
                else:
                    status, body, ctype = "200 OK", figures, CONTENT_TYPE_LATEST
            elif path == "/healthz":
                status, body = "200 OK", b"ok\n"
            elif path == "/readyz":
                ok = self.ready()
                status = "200 OK" if ok else "503 Service Unavailable"
                body = b"ready\n" if ok else b"not ready\n"
            else:
                status, body = "404 Not Found", b"not found\n"
            head = (
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
