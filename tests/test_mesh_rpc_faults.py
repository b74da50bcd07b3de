"""RPC across nodes when a provider's node dies: calls in flight end, the restarted node is
called again.

* The wire (two endpoints over real QUIC on loopback, in this process), requests made with
  ``fail_on_silence`` (as the mesh's calls are): one waiting on a peer that dies fails with
  ``RequestLost`` when liveness finds the peer silent, even with a keep-alive far longer
  than the test's deadline; one written to a peer that had just gone silent fails at once
  instead of waiting for the re-dial, and is not re-sent to the peer when it comes back.
* The mesh (``macula node`` processes, kill -9): calls held by the dead node's provider end
  with PROVIDER_GONE (not idempotent) or are answered by the other provider (idempotent);
  the node restarted with the same identity is called by the first call after its provider
  registers again.

No timing goals here (tools/rpc_faults.py measures them): the deadlines only bound a wait.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

from macula.client import Client, RemoteError
from macula.control.protocol import Err
from macula.wire import identity as ident
from macula.wire.config import WireConfig
from macula.wire.endpoint import WireEndpoint
from macula.wire.link import PeerLink, RequestLost, WireHandler
from tests.mesh_util import Clients, NodeProc, NodeProcs, eventually, run

# -- the wire -------------------------------------------------------------------------------

HOLD, ECHO = 3, 1  # request kinds: held for ever, answered reversed


class Server(WireHandler):
    """Holds requests of kind HOLD, answers ECHO reversed; remembers every payload."""

    def __init__(self) -> None:
        self.got: list[bytes] = []

    def on_request(self, link: PeerLink, kind: int, payload: bytes) -> bytes | Awaitable[bytes]:
        self.got.append(payload)
        if kind == HOLD:
            return asyncio.get_running_loop().create_future()  # never answered
        return payload[::-1]


def _dies_silently(ep: WireEndpoint) -> None:
    """As if its process were gone: nothing more leaves its socket (no CLOSE) and nothing
    that arrives is read."""
    transport = ep._transport
    assert transport is not None
    transport.pause_reading()  # type: ignore[attr-defined]
    transport.sendto = lambda *a, **k: None  # type: ignore[method-assign]


def _wire(fn: Any) -> Any:
    def test(*args: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args), 60))
    test.__name__ = fn.__name__
    test.__doc__ = fn.__doc__
    return test


@_wire
async def test_requests_held_by_a_peer_that_dies_fail_long_before_the_keepalive() -> None:
    """A keep-alive of 30 s alone would leave them waiting 30 s: while such requests wait,
    the link probes its peer after dead_after of silence."""
    server = WireEndpoint(ident.NodeIdentity.generate(), handler=Server())
    await server.start()
    client = WireEndpoint(ident.NodeIdentity.generate(), config=WireConfig(
        keepalive_interval=30.0, dead_after=0.3, tick=0.05, dial_timeout=20.0,
        redial_attempts=1))
    await client.start()
    try:
        link = await client.pool.get(server.identity.node_id, ("127.0.0.1", server.port))
        assert await link.request(ECHO, b"ab") == b"ba"
        held = [asyncio.ensure_future(link.request(HOLD, b"%d" % i, timeout=50,
                                                 fail_on_silence=True))
                for i in range(3)]
        await eventually(lambda: len(server.handler.got) == 4, 10, what="requests held")
        await asyncio.sleep(0.2)  # quiet: the peer acknowledged them
        _dies_silently(server)
        done = await asyncio.wait_for(asyncio.gather(*held, return_exceptions=True), 10)
        assert all(isinstance(r, RequestLost) for r in done), done
        assert client.stats.dead_peers == 1
    finally:
        await client.close()
        await server.close()


@_wire
async def test_a_request_written_to_a_silent_peer_fails_at_once_and_is_not_sent_later() -> None:
    """The request fails when liveness drops the connection, not after the re-dial; when
    the peer comes back (same identity and port) the link re-dials and what follows gets
    through, but the failed request never reaches it."""
    me = ident.NodeIdentity.generate()
    first = Server()
    server = WireEndpoint(me, handler=first)
    await server.start()
    port = server.port
    client = WireEndpoint(ident.NodeIdentity.generate(), config=WireConfig(
        keepalive_interval=30.0, dead_after=0.3, tick=0.05, dial_timeout=5.0,
        redial_attempts=5))
    await client.start()
    again: WireEndpoint | None = None
    try:
        link = await client.pool.get(me.node_id, ("127.0.0.1", port))
        assert await link.request(ECHO, b"ab") == b"ba"
        _dies_silently(server)
        await server.close()  # its port is free for the next one
        await asyncio.sleep(0.05)
        lost = asyncio.ensure_future(link.request(ECHO, b"lost", timeout=50,
                                                 fail_on_silence=True))
        await eventually(lambda: not link.is_open, 10, what="the link dropped as silent")
        second = Server()
        again = WireEndpoint(me, handler=second, port=port)  # the peer is back
        await again.start()
        with pytest.raises(RequestLost):
            await asyncio.wait_for(lost, 10)
        assert await link.request(ECHO, b"after", timeout=10) == b"retfa"
        assert second.got == [b"after"]
        assert b"lost" not in first.got
        # "lost" (failed) and "ab" (answered, its acknowledgement maybe lost) stay behind
        assert client.stats.drops["request_not_resent"] >= 1
    finally:
        await client.close()
        await server.close()
        if again is not None:
            await again.close()


# -- the mesh -------------------------------------------------------------------------------

REALM = "faults"


class Provider:
    """``0``: answer with the node's name at once; ``1``: hold the call when ``holds``."""

    def __init__(self, name: str, holds: bool) -> None:
        self.name = name
        self.holds = holds
        self.held = 0
        self._never = asyncio.Event()

    async def __call__(self, args: Any) -> str:
        if args and self.holds:
            self.held += 1
            await self._never.wait()
        return self.name


def _restart(mesh: NodeProcs, i: int, seed: str) -> NodeProc:
    """Start node ``i`` again after a kill: same data directory (node id), same mesh port."""
    old = mesh[i]
    port = old.mesh.rsplit(":", 1)[1]
    args = [sys.executable, "-m", "macula", "node", "--endpoint", "tcp://127.0.0.1:0",
            "--metrics-port", "-1", "--mesh-port", port, "--shards", "0",
            "--data-dir", str(old.data_dir), "--seed", seed]
    with open(old.data_dir / "stderr.txt", "ab") as err:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err,
                                stdin=subprocess.DEVNULL, env=mesh.env, start_new_session=True)
    mesh._procs.append(proc)
    node = mesh._ready(i, (proc, old.data_dir))
    mesh.nodes[i - 1] = node
    return node


async def _gone(client: Client) -> int:
    return int((await client.stats())["mesh"]["nodes_gone_total"])


async def _answered_by(caller: Client, procedure: str, names: set[str]) -> None:
    seen: set[str] = set()

    async def call() -> bool:
        try:
            seen.add(await caller.call(procedure, 0, timeout=5))
        except RemoteError as exc:
            if exc.code is not Err.NO_PROVIDER:  # not advertised yet: try again
                raise
        return seen >= names

    await eventually(call, 20, every=0.05, what=f"{procedure} answered by {names}")


def test_a_killed_providers_calls_end_and_its_restarted_node_is_called_again(
        tmp_path: Path) -> None:
    with NodeProcs(tmp_path, 3) as mesh:
        async def main(cs: Clients) -> None:
            caller = await cs.connect(1, REALM, "caller")
            on2, on3 = Provider("n2", holds=True), Provider("n3", holds=False)
            p2 = await cs.connect(2, REALM, "provider-2")
            p3 = await cs.connect(3, REALM, "provider-3")
            await p2.register("f.hold", on2)
            await p2.register("f.idem", on2, idempotent=True)
            await p3.register("f.idem", on3, idempotent=True)
            await _answered_by(caller, "f.hold", {"n2"})
            await _answered_by(caller, "f.idem", {"n2", "n3"})

            async def outcome(procedure: str) -> str:
                try:
                    return str(await caller.call(procedure, 1, timeout=30))
                except RemoteError as exc:
                    return getattr(exc.code, "name", str(exc.code))

            calls = [asyncio.ensure_future(outcome("f.hold")) for _ in range(2)]
            calls += [asyncio.ensure_future(outcome("f.idem")) for _ in range(4)]
            # round robin over n2 and n3: two of the idempotent calls are held at n2
            await eventually(lambda: on2.held == 4, 10, what="4 calls held at n2")
            gone0 = await _gone(caller)
            mesh[2].kill()
            ends = await asyncio.wait_for(asyncio.gather(*calls), 10)
            assert ends[:2] == ["PROVIDER_GONE"] * 2, ends
            assert ends[2:] == ["n3"] * 4, ends  # the held two went to n3 after all

            async def counted_gone() -> bool:
                return await _gone(caller) > gone0

            await eventually(counted_gone, 20, every=0.1, what="n1 counting n2 gone")
            await p2.close(timeout=0.3)
            _restart(mesh, 2, mesh[1].mesh)
            again = await cs.connect(2, REALM, "provider-2-again")
            await again.register("f.hold", Provider("n2 again", holds=False))
            # n2 linked up to n1 when it started: the first call reaches it
            assert await caller.call("f.hold", 0, timeout=5) == "n2 again"

        run(mesh, main, timeout=90)
