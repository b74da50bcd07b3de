"""Helpers for the wire tests: a raw aioquic client that speaks (or breaks) the protocol by
hand, and a real peer process (tests/peers/wire_peer.py)."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from macula import BatchEncoder, FrameDecoder
from macula.wire import identity as ident
from macula.wire import messages as m

ROOT = Path(__file__).resolve().parent.parent


class RawClient(QuicConnectionProtocol):
    """A QUIC client on one bidirectional stream that writes whatever bytes it is told."""

    def __init__(self, quic: QuicConnection, stream_handler: Any = None) -> None:
        super().__init__(quic, stream_handler)
        self.frames: asyncio.Queue[bytes] = asyncio.Queue()
        self.decoder = FrameDecoder()
        self.terminated: asyncio.Future[tuple[int, str]] = self._loop.create_future()
        self.sid = -1

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            for f in self.decoder.feed(event.data):
                self.frames.put_nowait(f)
        elif isinstance(event, events.ConnectionTerminated) and not self.terminated.done():
            self.terminated.set_result((event.error_code, event.reason_phrase))

    def write(self, data: bytes) -> None:
        self._quic.send_stream_data(self.sid, data)
        self.transmit()

    def write_msg(self, msg: Any) -> None:
        enc = BatchEncoder()
        enc.append(msg)
        self.write(enc.flush())

    async def next_msg(self, timeout: float = 5.0) -> Any:
        """The next message from the server; ConnectionError if it closes the connection."""
        get = asyncio.ensure_future(self.frames.get())
        done, _ = await asyncio.wait({get, self.terminated}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if get not in done:
            get.cancel()
            if self.terminated.done():
                raise ConnectionError(f"closed by the server: {self.terminated.result()}")
            raise TimeoutError("no message from the server")
        return m.HANDSHAKE_DECODER.decode(get.result())

    async def closed_with(self, timeout: float = 5.0) -> int:
        code, _ = await asyncio.wait_for(asyncio.shield(self.terminated), timeout)
        return code


async def raw_connect(port: int, alpn: str = m.ALPN) -> tuple[RawClient, asyncio.BaseTransport]:
    loop = asyncio.get_running_loop()
    config = QuicConfiguration(is_client=True, alpn_protocols=[alpn], verify_mode=ssl.CERT_NONE)
    quic = QuicConnection(configuration=config)
    transport, proto = await loop.create_datagram_endpoint(
        lambda: RawClient(quic), local_addr=("127.0.0.1", 0)
    )
    proto.connect(("127.0.0.1", port))
    await asyncio.wait_for(proto.wait_connected(), 5)
    proto.sid = quic.get_next_available_stream_id()
    return proto, transport


async def raw_admit(
    client: RawClient,
    me: ident.NodeIdentity,
    server_id: bytes,
    realm: str = "default",
    secret: bytes | None = None,
) -> m.Welcome:
    """Do the admission handshake by hand; returns WELCOME (raises if the server refuses)."""
    nonce = ident.new_nonce()
    client.write_msg(m.Hello(m.VERSION, me.node_id, me.public_key, realm, nonce, None))
    ch = await client.next_msg()
    assert isinstance(ch, m.Challenge), ch
    transcript = ident.hello_transcript(
        server_id=server_id, client_id=me.node_id, realm=realm,
        server_nonce=ch.server_nonce, client_nonce=nonce,
    )
    proof = None if secret is None else ident.realm_proof(secret, transcript)
    client.write_msg(m.Auth(ident.sign_hello(me, transcript), proof))
    welcome = await client.next_msg()
    assert isinstance(welcome, m.Welcome), welcome
    return welcome


class PeerProcess:
    """tests/peers/wire_peer.py in its own process."""

    def __init__(self, data_dir: Path, port: int = 0, realm: str = "default",
                 secret: bytes | None = None) -> None:
        args = [sys.executable, str(ROOT / "tests" / "peers" / "wire_peer.py"), str(data_dir),
                str(port), realm]
        if secret is not None:
            args.append(secret.hex())
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        assert line and line[0] == "ready", line
        self.node_id = bytes.fromhex(line[1])
        self.port = int(line[2])

    async def next_line(self, timeout: float = 5.0) -> str:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)
        return line.strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
