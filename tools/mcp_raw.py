"""A raw MCP/1 session on a pyzmq DEALER (control/SPEC.md), for the benchmarks that measure
the node rather than a client library (tools/bench_mesh.py, tools/bench_flood.py)."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import msgspec
import zmq

SIG = b"MCP\x01"
enc = msgspec.msgpack.Encoder()
dec = msgspec.msgpack.Decoder()


def open_session(endpoint: str, name: str, *, heartbeat_ms: int = 60_000,
                 rcvhwm: int = 100_000, sndhwm: int = 1000,
                 welcome_timeout: float = 10.0) -> tuple[zmq.Context[Any], zmq.Socket[bytes]]:
    """A new context and DEALER with a session open in realm ``default`` (HELLO → WELCOME);
    RuntimeError when no WELCOME comes within ``welcome_timeout`` seconds."""
    ctx: zmq.Context[Any] = zmq.Context()
    sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, rcvhwm)
    sock.setsockopt(zmq.SNDHWM, sndhwm)
    sock.connect(endpoint)
    sock.send_multipart([SIG, enc.encode([[1, 1, "default", name, "", heartbeat_ms]])])
    if not sock.poll(int(welcome_timeout * 1000)):
        raise RuntimeError(f"{name}: no WELCOME from {endpoint} in {welcome_timeout:g} s")
    reply = dec.decode(sock.recv_multipart()[1])
    if reply[0][0] != 2:
        raise RuntimeError(f"{name}: no WELCOME from {endpoint}: {reply}")
    return ctx, sock


def request(sock: zmq.Socket[bytes], command: list[Any], want: int,
            timeout: float = 10.0) -> list[Any]:
    """Send one command, return the first reply with code ``want`` (others are skipped);
    RuntimeError on an ERROR, TimeoutError after ``timeout`` seconds."""
    sock.send_multipart([SIG, enc.encode([command])])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sock.poll(1000):
            continue
        for c in dec.decode(sock.recv_multipart()[1]):
            if c[0] == want:
                return list(c)
            if c[0] == 3:
                raise RuntimeError(f"node error for {command[:3]}: {c}")
    raise TimeoutError(f"no reply {want} to {command[:3]}")


def close_session(ctx: zmq.Context[Any], sock: zmq.Socket[bytes]) -> None:
    """BYE (best effort: a full pipe drops it) and close."""
    with contextlib.suppress(zmq.ZMQError):
        sock.send_multipart([SIG, enc.encode([[6, 40, "bye"]])], zmq.NOBLOCK)
    sock.close(0)
    ctx.term()
