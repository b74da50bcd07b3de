"""How quickly a macula.Client heals after its node is killed (SIGKILL) and restarted.

One node process (``python -m macula node``, no mesh, no shards) on an ipc:// endpoint; a
subscriber Client (QoS 1) and a publisher Client (QoS 1, one message every 10 ms, numbered)
on it. With ``--mesh`` the publisher is on a second node (the mesh on loopback, the
subscriber's node joining through it, its key kept in a data directory) that is never
killed. Each round kills the subscriber's node, starts a new one on the same endpoint at
once and measures, from the moment the new node printed its ready line:

- ``resume``: until the subscriber receives its first message from the new node;
- ``reconnect``: until the subscriber's ``on_reconnect`` fired (subscriptions restored).

It also counts messages the subscriber's application saw twice (``duplicates``; expected 0)
and those acknowledged OK that never arrived (QoS 1 messages the killed node had taken,
acknowledged, and not yet delivered die with it; published while the subscriber had no
session they are answered NO_SUBSCRIBERS and not counted).

    python tools/bench_client_reconnect.py [--rounds 5] [--mesh]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from macula.client import Client, Reconnected  # noqa: E402
from macula.control.protocol import PubackReason  # noqa: E402


def start_node(endpoint: str, *mesh: str) -> tuple[subprocess.Popen[str], float, str]:
    """A node process; when it is ready, and its mesh address (``off`` without a mesh)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "macula", "node", "--endpoint", endpoint, "--metrics-port", "-1",
         "--shards", "0", *(mesh or ("--mesh-port", "-1"))],
        stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("macula node ready"):
        raise SystemExit(f"the node did not start: {line!r}")
    address = line.split(" mesh=")[1].split()[0]
    return proc, time.monotonic(), address


async def main(rounds: int, mesh: bool) -> None:
    tmp = tempfile.mkdtemp(prefix="macula-reconnect-")
    endpoint = f"ipc://{tmp}/node.sock"
    pub_endpoint = endpoint
    sub_mesh: tuple[str, ...] = ()
    other = None
    if mesh:
        pub_endpoint = f"ipc://{tmp}/pub.sock"
        other, _, address = await asyncio.to_thread(start_node, pub_endpoint, "--mesh-port", "0")
        sub_mesh = ("--mesh-port", "0", "--seed", address, "--data-dir", f"{tmp}/sub-key")
    node, _, _ = await asyncio.to_thread(start_node, endpoint, *sub_mesh)
    back: list[float] = []

    def on_reconnect(_: Reconnected) -> None:
        back.append(time.monotonic())

    sub_c = await Client.connect(endpoint, realm="b", on_reconnect=on_reconnect)
    pub_c = await Client.connect(pub_endpoint, realm="b")
    sub = await sub_c.subscribe("seq", qos=1)
    seen: dict[int, int] = {}
    arrivals: list[tuple[float, int]] = []
    sent = 0
    acked: set[int] = set()  # PUBACK OK: a node took it for a subscriber
    stop = asyncio.Event()

    async def publish() -> None:
        nonlocal sent
        while not stop.is_set():
            n = sent
            sent += 1
            with contextlib.suppress(Exception):  # not acknowledged: not counted
                if await pub_c.publish("seq", str(n).encode(), qos=1,
                                       timeout=30) is PubackReason.OK:
                    acked.add(n)
            await asyncio.sleep(0.01)

    async def receive() -> None:
        async for msg in sub:
            n = int(msg.payload)
            seen[n] = seen.get(n, 0) + 1
            arrivals.append((time.monotonic(), n))

    tasks = [asyncio.ensure_future(publish()), asyncio.ensure_future(receive())]
    resumes, reconnects = [], []
    try:
        for _ in range(rounds):
            await asyncio.sleep(1.0)
            node.kill()
            node.wait()
            del back[:]
            node, ready, _ = await asyncio.to_thread(start_node, endpoint, *sub_mesh)
            deadline = time.monotonic() + 30
            while not any(t > ready for t, _ in arrivals[-50:]):
                if time.monotonic() > deadline:
                    raise SystemExit(
                        f"delivery did not resume within 30 s (subscriber reconnected: "
                        f"{bool(back)}, connected: {sub_c.connected}; publisher connected: "
                        f"{pub_c.connected}; round {len(resumes) + 1})")
                await asyncio.sleep(0.005)
            first = min(t for t, _ in arrivals[-50:] if t > ready)
            resumes.append(first - ready)
            reconnects.append(back[0] - ready if back else float("nan"))
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await sub_c.close()
        await pub_c.close()
        for n in (node, other):
            if n is not None:
                n.terminate()
                n.wait()
    duplicates = sum(c - 1 for c in seen.values() if c > 1)
    lost = sum(1 for n in acked if n not in seen)
    refused = sent - len(acked)
    print(f"rounds {rounds}: resume after node ready: median "
          f"{statistics.median(resumes) * 1000:.0f} ms, max {max(resumes) * 1000:.0f} ms; "
          f"subscriber reconnected: median {statistics.median(reconnects) * 1000:.0f} ms")
    print(f"messages {sent}: acknowledged OK {len(acked)} (the others NO_SUBSCRIBERS or failed: "
          f"{refused}), duplicates seen by the application {duplicates}, acknowledged but "
          f"never received {lost}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mesh", action="store_true",
                        help="the publisher on a second node of a mesh (not killed)")
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.mesh))
