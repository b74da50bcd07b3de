"""How quickly a macula.Client heals after its node is killed (SIGKILL) and restarted.

One node process (``python -m macula node``, no mesh, no shards) on an ipc:// endpoint; a
subscriber Client (QoS 1) and a publisher Client (QoS 1, one message every 10 ms, numbered)
on it. Each round kills the node, starts a new one on the same endpoint at once and
measures, from the moment the new node printed its ready line:

- ``resume``: until the subscriber receives its first message from the new node;
- ``reconnect``: until the subscriber's ``on_reconnect`` fired (subscriptions restored).

It also counts messages the subscriber's application saw twice (``duplicates``; expected 0)
and the numbers that never arrived (``lost``: QoS 1 messages the killed node had taken,
acknowledged, and not yet delivered die with it).

    python tools/bench_client_reconnect.py [--rounds 5]
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


def start_node(endpoint: str) -> tuple[subprocess.Popen[str], float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "macula", "node", "--endpoint", endpoint, "--mesh-port", "-1",
         "--metrics-port", "-1", "--shards", "0"], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("macula node ready"):
        raise SystemExit(f"the node did not start: {line!r}")
    return proc, time.monotonic()


async def main(rounds: int) -> None:
    endpoint = f"ipc://{tempfile.mkdtemp(prefix='macula-reconnect-')}/node.sock"
    node, _ = await asyncio.to_thread(start_node, endpoint)
    back: list[float] = []

    def on_reconnect(_: Reconnected) -> None:
        back.append(time.monotonic())

    sub_c = await Client.connect(endpoint, realm="b", on_reconnect=on_reconnect)
    pub_c = await Client.connect(endpoint, realm="b")
    sub = await sub_c.subscribe("seq", qos=1)
    seen: dict[int, int] = {}
    arrivals: list[tuple[float, int]] = []
    sent = 0
    stop = asyncio.Event()

    async def publish() -> None:
        nonlocal sent
        while not stop.is_set():
            n = sent
            sent += 1
            with contextlib.suppress(Exception):  # counted as lost if it never arrives
                await pub_c.publish("seq", str(n).encode(), qos=1, timeout=30)
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
            node, ready = await asyncio.to_thread(start_node, endpoint)
            deadline = time.monotonic() + 30
            while not any(t > ready for t, _ in arrivals[-50:]):
                if time.monotonic() > deadline:
                    raise SystemExit("delivery did not resume within 30 s")
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
        node.terminate()
        node.wait()
    duplicates = sum(c - 1 for c in seen.values() if c > 1)
    lost = sum(1 for n in range(sent - 50) if n not in seen)  # the last ones may be in flight
    print(f"rounds {rounds}: resume after node ready: median "
          f"{statistics.median(resumes) * 1000:.0f} ms, max {max(resumes) * 1000:.0f} ms; "
          f"subscriber reconnected: median {statistics.median(reconnects) * 1000:.0f} ms")
    print(f"messages {sent}, duplicates seen by the application {duplicates}, lost {lost}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    asyncio.run(main(parser.parse_args().rounds))
