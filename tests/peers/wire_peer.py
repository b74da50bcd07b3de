"""A real peer process for the wire tests: an endpoint that echoes and reports what it gets.

    python tests/peers/wire_peer.py DATA_DIR PORT [REALM [SECRET_HEX]]

Prints ``ready <node_id hex> <port>`` once listening, then ``msg <kind> <payload hex>`` for
every one-way message; answers requests by echoing the payload reversed.  Stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from macula.wire.endpoint import WireEndpoint
from macula.wire.identity import NodeIdentity
from macula.wire.link import PeerLink, WireHandler


class Echo(WireHandler):
    def on_message(self, link: PeerLink, kind: int, payload: bytes) -> None:
        sys.stdout.write(f"msg {kind} {payload.hex()}\n")
        sys.stdout.flush()

    def on_request(self, link: PeerLink, kind: int, payload: bytes) -> bytes:
        return payload[::-1]


async def main() -> None:
    data_dir, port = sys.argv[1], int(sys.argv[2])
    realm = sys.argv[3] if len(sys.argv) > 3 else "default"
    secret = bytes.fromhex(sys.argv[4]) if len(sys.argv) > 4 else None
    ident = NodeIdentity.load_or_create(data_dir)
    ep = WireEndpoint(ident, handler=Echo(), port=port, realm=realm, realm_secret=secret)
    await ep.start()
    print(f"ready {ident.node_id.hex()} {ep.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await ep.close()


if __name__ == "__main__":
    asyncio.run(main())
