"""Raw aioquic baseline for tools/bench_wire.py: the fastest plain-aioquic peer wire we know.

The bench compares macula's peer wire with *this* code, measured in the same run, so this
file is deliberately what a careful user would write with aioquic alone and nothing else:

- one ``aioquic.asyncio.serve`` server (node B) and ``aioquic.asyncio.connect`` clients
  (node A), ALPN ``bench/1``, a throw-away self-signed ECDSA P-256 certificate, the client
  with ``verify_mode=ssl.CERT_NONE``;
- flow control windows raised to ``max_data`` / ``max_stream_data`` (see `WireConfig`) on
  both sides, the same ``max_datagram_size`` on both sides (aioquic does not learn the
  peer's from the ``max_udp_payload_size`` transport parameter: each side sends packets of
  at most its *own* ``max_datagram_size``, so the server must be configured too);
- framing exactly as macula frames: every message is a frame (MQTT-style varint length
  prefix, docs/FRAMES.md) written with ``macula.BatchEncoder.append_raw`` and split on the
  receiver with ``macula.FrameDecoder`` (B parses frames, it does not count bytes);
- the protocol's callbacks are used directly (``quic_event_received``,
  ``send_stream_data`` + ``transmit()``), not aioquic's asyncio streams, which add a
  ``StreamReader`` copy and a task switch per read.

Protocol on one bidirectional stream (A opens it; every message is one frame):

- first frame ``b"count <n>"``: B counts the next ``n`` frames and answers ``b"done"``;
- first frame ``b"echo"``: B sends every later frame back on the same stream.

**Pacing (sustained throughput, not an enqueue rate).** ``send_stream_data`` only appends
to the stream's send buffer; ``transmit()`` sends what the congestion window allows and the
rest waits for ACKs. A writer that never waits measures how fast Python appends to a
bytearray. So A keeps the bytes *written but not yet acknowledged* on its stream
(``sender._buffer_stop - sender._buffer_start``, aioquic's ``QuicStreamSender`` drops a
prefix of its buffer when it is acked) under ``WireConfig.send_window`` bytes: after each
write + ``transmit()`` it checks that figure and, when it is over, waits on a future that
``datagram_received`` (where ACKs arrive) resolves once the figure is back under the
window. This is a private attribute of aioquic 1.7.2; `unacked_bytes` is the one place that
reads it.
"""

from __future__ import annotations

import asyncio
import datetime
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import serve as quic_serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent, StreamDataReceived
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from macula import BatchEncoder, FrameDecoder

ALPN = "bench/1"
MESSAGE = bytes(range(64))  # the 64-byte message body every case sends
CLIENT_TIMEOUT = 60.0  # seconds, per run_client call


@dataclass(frozen=True)
class WireConfig:
    """Transport settings of one bench configuration (the same for A and B)."""

    host: str = "127.0.0.1"
    port: int = 0
    max_datagram_size: int = 1200
    max_data: int = 16 * 1024 * 1024  # connection flow-control window, bytes
    max_stream_data: int = 8 * 1024 * 1024  # per-stream flow-control window, bytes
    send_window: int = 1024 * 1024  # A's cap on written-but-unacked bytes (pacing)
    congestion_control: str = "reno"  # aioquic's default
    idle_timeout: float = 30.0
    udp_buffer: int = 0  # SO_RCVBUF/SO_SNDBUF for both sockets, bytes; 0 = the OS default


@dataclass(frozen=True)
class Case:
    """One bench case: what A does over the link. ``kind`` picks the client routine."""

    name: str
    kind: str  # "throughput" | "echo" | "handshake" | "restart"
    messages: int = 0  # throughput: messages sent
    batch: int = 1  # throughput: messages per send_stream_data call
    rounds: int = 0  # echo: timed round trips; handshake: connections
    warmup: int = 0  # echo: untimed round trips first


def self_signed() -> tuple[Any, Any]:
    """A fresh ECDSA P-256 key and a self-signed certificate for it (valid one day)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def quic_config(cfg: WireConfig, *, is_client: bool) -> QuicConfiguration:
    qc = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[ALPN],
        max_datagram_size=cfg.max_datagram_size,
        max_data=cfg.max_data,
        max_stream_data=cfg.max_stream_data,
        congestion_control_algorithm=cfg.congestion_control,
        idle_timeout=cfg.idle_timeout,
    )
    if is_client:
        qc.verify_mode = ssl.CERT_NONE
        qc.server_name = "localhost"
    else:
        qc.private_key, qc.certificate = self_signed()
    return qc


def set_udp_buffer(transport: Any, cfg: WireConfig) -> None:
    """Apply ``cfg.udp_buffer`` to the UDP socket of an asyncio datagram transport."""
    if cfg.udp_buffer:
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, cfg.udp_buffer)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, cfg.udp_buffer)


def frame(body: bytes) -> bytes:
    enc = BatchEncoder()
    enc.append_raw(body)
    return enc.flush()


# --------------------------------------------------------------------------- node B


class _ServerStream:
    __slots__ = ("decoder", "left", "mode")

    def __init__(self) -> None:
        self.decoder: FrameDecoder[bytes] = FrameDecoder()
        self.mode = ""  # "" until the first frame, then "count" or "echo"
        self.left = 0


class ServerProtocol(QuicConnectionProtocol):
    """Node B: counts or echoes frames, per stream, as the stream's first frame asks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._streams: dict[int, _ServerStream] = {}
        self._enc = BatchEncoder()

    def quic_event_received(self, event: QuicEvent) -> None:
        if not isinstance(event, StreamDataReceived):
            return
        sid = event.stream_id
        st = self._streams.get(sid)
        if st is None:
            st = self._streams[sid] = _ServerStream()
        frames = st.decoder.feed(event.data)
        if not frames:
            return
        if not st.mode:
            first = frames[0]
            if first.startswith(b"count "):
                st.mode, st.left = "count", int(first[6:])
            elif first == b"echo":
                st.mode = "echo"
            else:
                raise ValueError(f"unknown command frame {first[:20]!r}")
            frames = frames[1:]
        if st.mode == "count":
            if frames:
                st.left -= len(frames)
                if st.left <= 0:
                    # the decoder's own counters, so that A can check nothing was lost
                    dec = st.decoder
                    self._quic.send_stream_data(sid, frame(b"done %d %d" % (dec.frames, dec.bytes)))
        else:
            enc = self._enc
            for f in frames:
                enc.append_raw(f)
            if len(enc):
                self._quic.send_stream_data(sid, enc.flush())
        # transmit() is called by datagram_received after the events are processed.


def serve(port_pipe: Connection, cfg: WireConfig) -> None:
    """Node B's process body: listen, send ``("port", port)`` on the pipe, run until killed."""

    async def main() -> None:
        server = await quic_serve(
            cfg.host,
            cfg.port,
            configuration=quic_config(cfg, is_client=False),
            create_protocol=ServerProtocol,
        )
        transport: Any = server._transport
        set_udp_buffer(transport, cfg)
        port = transport.get_extra_info("sockname")[1]
        port_pipe.send(("port", port))
        await asyncio.Event().wait()

    asyncio.run(main())


# --------------------------------------------------------------------------- node A


def unacked_bytes(proto: QuicConnectionProtocol, sid: int) -> int:
    """Bytes written on stream ``sid`` and not yet acknowledged (aioquic 1.7.2 internals)."""
    sender = proto._quic._streams[sid].sender
    return int(sender._buffer_stop - sender._buffer_start)


class ClientProtocol(QuicConnectionProtocol):
    """Node A: frames arriving on a stream resolve that stream's waiter; ACKs wake the writer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._decoders: dict[int, FrameDecoder[bytes]] = {}
        self.on_frames: Callable[[int, list[bytes]], None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._drain_sid = 0
        self._drain_below = 0

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            dec = self._decoders.get(event.stream_id)
            if dec is None:
                dec = self._decoders[event.stream_id] = FrameDecoder()
            frames = dec.feed(event.data)
            if frames and self.on_frames is not None:
                self.on_frames(event.stream_id, frames)
        else:
            super().quic_event_received(event)

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        super().datagram_received(data, addr)
        w = self._drain
        if w is not None and unacked_bytes(self, self._drain_sid) < self._drain_below:
            self._drain = None
            if not w.done():
                w.set_result(None)

    async def drain(self, sid: int, below: int) -> None:
        """Wait until stream ``sid`` has fewer than ``below`` unacknowledged bytes."""
        if unacked_bytes(self, sid) < below:
            return
        self._drain_sid, self._drain_below = sid, below
        self._drain = asyncio.get_running_loop().create_future()
        await self._drain


async def _throughput(proto: ClientProtocol, case: Case, cfg: WireConfig) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    quic = proto._quic
    sid = quic.get_next_available_stream_id()
    done: asyncio.Future[bytes] = loop.create_future()

    def on_frames(s: int, frames: list[bytes]) -> None:
        if s == sid and frames[-1].startswith(b"done") and not done.done():
            done.set_result(frames[-1])

    proto.on_frames = on_frames
    enc = BatchEncoder(capacity=case.batch * (len(MESSAGE) + 1) + 64)
    send, transmit, drain = quic.send_stream_data, proto.transmit, proto.drain
    window = cfg.send_window
    n, batch = case.messages, case.batch
    t0 = time.perf_counter()
    command = frame(b"count %d" % n)
    send(sid, command)
    sent = 0
    while sent < n:
        k = min(batch, n - sent)
        for _ in range(k):
            enc.append_raw(MESSAGE)
        send(sid, enc.flush())
        transmit()
        sent += k
        await drain(sid, window)
    answer = await done
    elapsed = time.perf_counter() - t0
    # B's decoder saw the command frame and exactly n frames of 1 + len(MESSAGE) bytes
    expected = b"done %d %d" % (n + 1, len(command) + n * len(frame(MESSAGE)))
    if answer != expected:
        raise AssertionError(f"B answered {answer!r}, expected {expected!r}")
    return {"rate": n / elapsed}


async def _echo(proto: ClientProtocol, case: Case, cfg: WireConfig) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    quic = proto._quic
    sid = quic.get_next_available_stream_id()
    waiter: list[asyncio.Future[None]] = []

    def on_frames(s: int, frames: list[bytes]) -> None:
        if s == sid and waiter and not waiter[0].done():
            waiter[0].set_result(None)

    proto.on_frames = on_frames
    quic.send_stream_data(sid, frame(b"echo"))
    msg = frame(MESSAGE)
    samples: list[float] = []
    for i in range(case.warmup + case.rounds):
        fut = loop.create_future()
        waiter[:] = [fut]
        t0 = time.perf_counter()
        quic.send_stream_data(sid, msg)
        proto.transmit()
        await fut
        if i >= case.warmup:
            samples.append(time.perf_counter() - t0)
    samples.sort()
    return {
        "p50": samples[len(samples) // 2] * 1e6,
        "p99": samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1e6,
    }


async def _handshake(case: Case, cfg: WireConfig) -> dict[str, float]:
    samples: list[float] = []
    for _ in range(case.rounds):
        qc = quic_config(cfg, is_client=True)
        t0 = time.perf_counter()
        async with connect(cfg.host, cfg.port, configuration=qc) as proto:
            samples.append(time.perf_counter() - t0)
            proto.close()
    samples.sort()
    return {"p50": samples[len(samples) // 2] * 1e3}


async def run_client_async(case: Case, cfg: WireConfig) -> dict[str, float]:
    if case.kind == "handshake":
        return await _handshake(case, cfg)
    if case.kind not in ("throughput", "echo"):
        raise NotImplementedError(f"raw aioquic has no {case.kind!r} case")
    qc = quic_config(cfg, is_client=True)
    async with connect(cfg.host, cfg.port, configuration=qc, create_protocol=ClientProtocol) as p:
        assert isinstance(p, ClientProtocol)
        set_udp_buffer(p._transport, cfg)
        if case.kind == "throughput":
            return await _throughput(p, case, cfg)
        return await _echo(p, case, cfg)


def run_client(case: Case, cfg: WireConfig) -> dict[str, float]:
    """Node A: run ``case`` against the server at ``cfg.host:cfg.port``; named figures.

    Gives up with ``TimeoutError`` after ``CLIENT_TIMEOUT`` seconds (a lost link must not
    hang the bench).
    """
    return asyncio.run(asyncio.wait_for(run_client_async(case, cfg), CLIENT_TIMEOUT))
