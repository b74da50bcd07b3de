"""Settings of the peer wire, with their defaults (docs/WIRE.md lists them all)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WireConfig:
    # QUIC
    max_datagram_size: int = 1200  # bytes per UDP datagram; raise on loopback / jumbo frames
    max_data: int = 16 * 1024 * 1024  # connection flow-control window (bytes)
    max_stream_data: int = 8 * 1024 * 1024  # stream flow-control window (bytes)
    quic_idle_timeout: float = 30.0  # QUIC closes a connection silent for this long (s)
    # frames
    max_frame: int = 4 * 1024 * 1024  # largest frame accepted from a peer (bytes)
    # batching: at low load a frame leaves at the end of the loop iteration that queued it;
    # with flush_delay > 0, frames wait up to that long (s) unless flush_bytes are queued
    flush_delay: float = 0.0
    flush_bytes: int = 256 * 1024
    # backpressure: bytes queued or unacknowledged per link before send() waits and
    # send_nowait() drops (counted)
    send_buffer: int = 4 * 1024 * 1024
    # liveness
    keepalive_interval: float = 2.0  # a PING goes out after this long without traffic (s)
    dead_after: float = 0.5  # silence while data or a PING is unanswered -> link broken (s)
    tick: float = 0.1  # how often the pool checks liveness and idleness (s)
    handshake_timeout: float = 5.0  # admission must complete within this (s)
    # requests
    request_timeout: float = 5.0  # default per-request timeout (s)
    max_pending_requests: int = 10_000  # per link; beyond it request() raises (counted)
    max_inbound_requests: int = 10_000  # per link; beyond it the peer gets STATUS_OVERLOADED
    # the pool
    max_links: int = 1024  # links kept; at the bound the least recently used idle one goes
    link_idle_timeout: float = 300.0  # a link unused this long is closed by the reaper (s)
    dial_timeout: float = 3.0  # connect + admission (s)
    redial_attempts: int = 3  # consecutive failed dials before queued work is dropped
    backoff_initial: float = 0.1  # first wait after a failed dial (s); doubles each time
    backoff_max: float = 10.0  # longest wait between dials of a failing endpoint (s)
    backoff_table: int = 4096  # endpoints remembered for back-off (LRU beyond)
