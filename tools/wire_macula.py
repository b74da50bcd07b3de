"""macula's peer wire for tools/bench_wire.py, doing what tools/wire_raw.py does with raw aioquic.

Node B is a ``WireEndpoint`` whose handler counts one-way messages (kind ``K_DATA``) and
answers requests by echoing; node A is a ``WireEndpoint`` with a pooled ``PeerLink`` to B.
Both use the same QUIC settings as the raw baseline (flow-control windows, datagram size,
UDP buffers) through ``macula.wire.WireConfig``.

Cases, with the same batching as the raw baseline:

* throughput x1 / x100: A calls ``link.send_nowait`` 1 or 100 times, then ``link.flush()``
  (one ``send_stream_data`` per batch, as raw does) and ``await link.drain(send_window)``
  (the same pacing: written-but-unacknowledged bytes under the window). A first sends a
  request ``K_EXPECT`` with the count; B answers ``done <n>`` with a one-way message once it
  has counted n data messages, so lost messages show up as a failure, not a wrong rate.
* echo: ``await link.request(K_ECHO, message)`` round trips (request/response with
  correlation ids, the public API), p50 and p99.
* handshake: a fresh dial + admission (QUIC + TLS + HELLO/CHALLENGE/AUTH/WELCOME) to B with
  ``pool.get``, p50.
* restart: B is killed (SIGKILL) and started again on the same port with the same key; A
  then calls ``link.request`` once, doing nothing else: the time until the response arrives
  (the link notices the dead connection, re-dials and re-sends by itself).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import socket
import tempfile
import time
from multiprocessing.connection import Connection
from typing import Any

from macula.wire import NodeIdentity, PeerLink, WireEndpoint, WireHandler
from macula.wire import WireConfig as MaculaWireConfig
from macula.wire.messages import Msg
from tools.wire_raw import MESSAGE, Case, WireConfig

K_DATA, K_EXPECT, K_ECHO, K_DONE = 1, 2, 3, 4
CLIENT_TIMEOUT = 60.0


def _config(cfg: WireConfig) -> MaculaWireConfig:
    return MaculaWireConfig(
        max_datagram_size=cfg.max_datagram_size,
        max_data=cfg.max_data,
        max_stream_data=cfg.max_stream_data,
        quic_idle_timeout=cfg.idle_timeout,
        send_buffer=max(4 * cfg.send_window, 4 * 1024 * 1024),
    )


def _set_udp_buffer(transport: Any, cfg: WireConfig) -> None:
    if cfg.udp_buffer and transport is not None:
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, cfg.udp_buffer)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, cfg.udp_buffer)


class _Counter(WireHandler):
    def __init__(self) -> None:
        self.count = 0
        self.target = -1

    def on_messages(self, link: PeerLink, msgs: list[Msg]) -> None:
        # a batch of one-way messages at once, as the pub/sub layer takes them
        before = self.count
        self.count += len(msgs)
        if before < self.target <= self.count:
            link.send_nowait(K_DONE, b"done %d" % self.count)

    def on_request(self, link: PeerLink, kind: int, payload: bytes) -> bytes:
        if kind == K_EXPECT:
            self.count, self.target = 0, int(payload)
            return b"ok"
        return payload


def _key_dir(cfg: WireConfig) -> str:
    return os.path.join(tempfile.gettempdir(), f"macula-bench-wire-b-{os.getuid()}")


def serve(port_pipe: Connection, cfg: WireConfig) -> None:
    """Node B: listen, send ``("port", port)`` and ``("id", node_id)``, serve until killed."""

    async def main() -> None:
        ident = NodeIdentity.load_or_create(_key_dir(cfg))
        ep = WireEndpoint(ident, handler=_Counter(), config=_config(cfg), host=cfg.host,
                          port=cfg.port)
        await ep.start()
        _set_udp_buffer(ep._transport, cfg)
        port_pipe.send(("port", ep.port))
        await asyncio.Event().wait()

    asyncio.run(main())


class _Client(WireHandler):
    def __init__(self) -> None:
        self.done: asyncio.Future[bytes] | None = None

    def on_message(self, link: PeerLink, kind: int, payload: bytes) -> None:
        if kind == K_DONE and self.done is not None and not self.done.done():
            self.done.set_result(payload)


async def _throughput(ep: WireEndpoint, link: PeerLink, h: _Client, case: Case,
                      cfg: WireConfig) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    h.done = loop.create_future()
    n, batch, window = case.messages, case.batch, cfg.send_window
    send, flush, drain, buffered = link.send_nowait, link.flush, link.drain, link.buffered
    t0 = time.perf_counter()
    await link.request(K_EXPECT, b"%d" % n)
    sent = 0
    while sent < n:
        k = min(batch, n - sent)
        for _ in range(k):
            send(K_DATA, MESSAGE)
        flush()
        sent += k
        if buffered() >= window:
            await drain(window)
    answer = await h.done
    elapsed = time.perf_counter() - t0
    if answer != b"done %d" % n:
        raise AssertionError(f"B answered {answer!r}")
    return {"rate": n / elapsed}


async def _echo(link: PeerLink, case: Case) -> dict[str, float]:
    samples: list[float] = []
    request = link.request
    for i in range(case.warmup + case.rounds):
        t0 = time.perf_counter()
        reply = await request(K_ECHO, MESSAGE)
        if i >= case.warmup:
            samples.append(time.perf_counter() - t0)
        if reply != MESSAGE:
            raise AssertionError("echo mismatch")
    samples.sort()
    return {
        "p50": samples[len(samples) // 2] * 1e6,
        "p99": samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1e6,
    }


async def _handshake(ep: WireEndpoint, server_id: bytes, case: Case,
                     cfg: WireConfig) -> dict[str, float]:
    samples: list[float] = []
    for _ in range(case.rounds):
        t0 = time.perf_counter()
        link = await ep.pool.get(server_id, (cfg.host, cfg.port))
        samples.append(time.perf_counter() - t0)
        ep.pool.evict(link, "next round")
        await asyncio.sleep(0.005)
    samples.sort()
    return {"p50": samples[len(samples) // 2] * 1e3}


def _restart_server(cfg: WireConfig, key_dir: str, port: int) -> tuple[Any, int]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve_at, args=(child, cfg, key_dir, port), daemon=True)
    proc.start()
    if not parent.poll(30):
        proc.kill()
        raise TimeoutError("restart server did not start")
    _, real_port = parent.recv()
    return proc, real_port


def _serve_at(pipe: Connection, cfg: WireConfig, key_dir: str, port: int) -> None:
    async def main() -> None:
        ident = NodeIdentity.load_or_create(key_dir)
        ep = WireEndpoint(ident, handler=_Counter(), config=_config(cfg), host=cfg.host,
                          port=port)
        await ep.start()
        pipe.send(("port", ep.port))
        await asyncio.Event().wait()

    asyncio.run(main())


async def _restart(ep: WireEndpoint, case: Case, cfg: WireConfig) -> dict[str, float]:
    key_dir = tempfile.mkdtemp(prefix="macula-restart-")
    proc, port = _restart_server(cfg, key_dir, 0)
    server_id = NodeIdentity.load_or_create(key_dir).node_id
    try:
        link = await ep.pool.get(server_id, (cfg.host, port))
        assert await link.request(K_ECHO, MESSAGE) == MESSAGE
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        proc, _ = _restart_server(cfg, key_dir, port)
        t0 = time.perf_counter()
        reply = await link.request(K_ECHO, MESSAGE, timeout=10)  # the caller does nothing else
        elapsed = time.perf_counter() - t0
        assert reply == MESSAGE
        return {"seconds": elapsed}
    finally:
        proc.kill()


async def run_client_async(case: Case, cfg: WireConfig) -> dict[str, float]:
    h = _Client()
    ep = WireEndpoint(NodeIdentity.generate(), handler=h, config=_config(cfg), host=cfg.host)
    await ep.start()
    try:
        if case.kind == "restart":
            return await _restart(ep, case, cfg)
        server_id = NodeIdentity.load_or_create(_key_dir(cfg)).node_id
        if case.kind == "handshake":
            return await _handshake(ep, server_id, case, cfg)
        link = await ep.pool.get(server_id, (cfg.host, cfg.port))
        if link._conn is not None:
            _set_udp_buffer(link._conn._transport, cfg)
        if case.kind == "throughput":
            return await _throughput(ep, link, h, case, cfg)
        if case.kind == "echo":
            return await _echo(link, case)
        raise NotImplementedError(case.kind)
    finally:
        await ep.close()


def run_client(case: Case, cfg: WireConfig) -> dict[str, float]:
    return asyncio.run(asyncio.wait_for(run_client_async(case, cfg), CLIENT_TIMEOUT))
