"""RPC across nodes when a provider's node dies and comes back: how long callers wait.

    python tools/rpc_faults.py              # 3 runs, medians (about 30 s)
    python tools/rpc_faults.py --runs 1 --json out.json

Three ``macula node`` processes on 127.0.0.1 (:class:`macula.demo.LocalMesh`, no shards):
A (the seed), B and C. The clients live in this process (``macula.Client``), one per role:

* on B a provider of ``rpcf.hold`` (not idempotent) and of ``rpcf.idem`` (idempotent); on C
  a provider of ``rpcf.idem`` only. Called with ``0`` a handler answers at once with its
  node's name; called with ``1`` B's handlers hold the call (they never answer) while C's
  answers at once.
* on A the caller. It first calls until both procedures answered (B's and C's ``idem``).

Three phases, B killed with SIGKILL (its process group: no goodbye on the wire) in 1 and 3:

1. **quiet**: A starts 4 calls ``rpcf.hold(1)`` and 6 calls ``rpcf.idem(1)`` (round robin
   over B and C: 3 reach B and are held, 3 are answered by C), timeout 20 s each; once B's
   handlers hold 7 calls B is killed, and nothing else is sent. Figures: seconds from the
   kill until each held call ends, and how (not idempotent: PROVIDER_GONE expected;
   idempotent: answered by C expected). Then, while A's link to B is down (B not yet
   counted gone), 4 calls ``rpcf.idem(0)`` one after the other: the slowest one's seconds.
2. **restart**: once A counted B gone (``nodes_gone_total``), B is started again on the same
   port and data directory (same node id; it joins through A, or C with ``--restart-seed
   c``), its provider registers ``rpcf.hold`` again, and A
   calls ``rpcf.hold(0)`` in a loop (each call with a 2 s timeout, the next 10 ms after one
   fails) until one succeeds: seconds from REGISTER's reply to that success.
3. **busy**: 4 calls ``rpcf.hold(1)`` held at the restarted B, B killed again, and A starts
   5 more calls ``rpcf.hold(1)`` 0, 50, ..., 200 ms after the kill (before it can have
   noticed): seconds from the kill until each call ends, and how.

Each figure is the median over ``--runs`` runs of a fresh mesh (the per-run figure is the
slowest call of the run, for 1 and 3). The machine's 2 cores are shared by the three nodes
and this process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from macula.client import Client, RemoteError
from macula.demo import LocalMesh, MeshNode, _ready_line, parse_ready

REALM = "default"
HOLD_CALLS = 4  # rpcf.hold(1) in flight at B when it dies
IDEM_CALLS = 6  # rpcf.idem(1): round robin, half held at B
DURING_CALLS = 4  # rpcf.idem(0), one after the other, once the in-flight calls ended
LATE_CALLS = 5  # rpcf.hold(1) sent 0, 50, ..., 200 ms after the kill


class Provider:
    """The handlers of one node's provider client; ``held`` counts calls being held."""

    def __init__(self, name: str, holds: bool) -> None:
        self.name = name
        self.holds = holds
        self.held = 0
        self.never = asyncio.Event()  # never set: a held call waits on it

    async def handler(self, args: Any) -> str:
        if args and self.holds:
            self.held += 1
            await self.never.wait()
        return self.name


async def _until(what: str, check: Any, timeout: float, every: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = await check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout} s")
        await asyncio.sleep(every)


async def _answers(caller: Client, procedure: str, want: set[str]) -> bool:
    """Call ``procedure`` until every name in ``want`` answered once."""
    seen: set[str] = set()
    deadline = time.monotonic() + 30
    while seen < want:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{procedure}: only {seen} of {want} answered within 30 s")
        try:
            seen.add(await caller.call(procedure, 0, timeout=2.0))
        except RemoteError:
            await asyncio.sleep(0.05)
    return True


def _respawn(mesh: LocalMesh, node: MeshNode, seed: str) -> MeshNode:
    """Start ``node`` again: same data directory (node id) and mesh port."""
    port = node.mesh.rsplit(":", 1)[1]
    out_path = node.out_path + ".2"
    cmd = [sys.executable, "-m", "macula.cli", "node", "--endpoint", "tcp://127.0.0.1:0",
           "--metrics-port", "-1", "--mesh-port", port, "--data-dir", node.data_dir,
           "--seed", seed]
    env = dict(os.environ, MACULA_SHARDS="0")
    with open(out_path, "wb") as out, open(node.err_path, "ab") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                                start_new_session=True)
    again = MeshNode(node.index, proc, node.data_dir, out_path, node.err_path)
    mesh.nodes[node.index - 1] = again
    deadline = time.monotonic() + 30
    while (line := _ready_line(out_path)) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"restarted node {node.index} not ready: {again.stderr_tail()}")
        time.sleep(0.02)
    again.ready = parse_ready(line)
    return again


async def _nodes_gone(client: Client) -> int:
    stats = await client.stats()
    return int(stats.get("mesh", {}).get("nodes_gone_total", 0))


async def one_run(run: int, restart_seed: str = "a") -> dict[str, Any]:
    clients: list[Client] = []
    mesh = LocalMesh(3, shards=0)
    mesh.start()
    try:
        a, b, c = mesh.nodes

        async def connect(node: MeshNode, name: str) -> Client:
            cl = await Client.connect(node.endpoint, realm=REALM, name=name)
            clients.append(cl)
            return cl

        caller = await connect(a, "caller")
        ends: list[tuple[str, float, str]] = []  # (label, monotonic end, outcome)

        async def timed(label: str) -> None:
            procedure = label.split("/")[0]
            try:
                outcome = "answered by " + await caller.call(procedure, 1, timeout=20.0)
            except RemoteError as exc:
                outcome = getattr(exc.code, "name", str(exc.code))
            except Exception as exc:  # reported as its type, not hidden
                outcome = type(exc).__name__
            ends.append((label, time.monotonic(), outcome))

        async def kill(node: MeshNode, late: int) -> float:
            """SIGKILL ``node``, start ``late`` calls 50 ms apart, wait for every call;
            returns the instant of the kill."""
            os.killpg(node.proc.pid, signal.SIGKILL)
            t_kill = time.monotonic()
            node.proc.wait()
            for _ in range(late):  # sent to the dead node before A can know it is dead
                tasks.append(asyncio.ensure_future(timed("rpcf.hold/late")))
                await asyncio.sleep(0.05)
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
            tasks.clear()
            return t_kill

        def since(t_kill: float, label: str) -> list[tuple[str, float, str]]:
            return [(p, round(t - t_kill, 3), o) for p, t, o in ends if t >= t_kill and p == label]

        # 1. B dies with calls in flight and nothing else going on
        pb, pc = Provider("B", holds=True), Provider("C", holds=False)
        on_b = await connect(b, "provider-b")
        on_c = await connect(c, "provider-c")
        await on_b.register("rpcf.hold", pb.handler)
        await on_b.register("rpcf.idem", pb.handler, idempotent=True)
        await on_c.register("rpcf.idem", pc.handler, idempotent=True)
        await _answers(caller, "rpcf.hold", {"B"})
        await _answers(caller, "rpcf.idem", {"B", "C"})
        tasks = [asyncio.ensure_future(timed("rpcf.hold/quiet")) for _ in range(HOLD_CALLS)]
        tasks += [asyncio.ensure_future(timed("rpcf.idem/quiet")) for _ in range(IDEM_CALLS)]

        async def held(p: Provider, n: int) -> bool:
            return p.held >= n

        async def placed() -> bool:  # held at B, and C's share answered
            return (pb.held >= HOLD_CALLS + IDEM_CALLS // 2
                    and sum(1 for p, _, _ in ends if p == "rpcf.idem/quiet") >= IDEM_CALLS // 2)

        await _until("calls held at B and answered by C", placed, 10)
        gone_before = await _nodes_gone(caller)
        t_kill = await kill(b, 0)
        hold, idem = since(t_kill, "rpcf.hold/quiet"), since(t_kill, "rpcf.idem/quiet")
        during: list[tuple[float, str]] = []  # new idempotent calls while B's link is down
        for _ in range(DURING_CALLS):
            t0 = time.monotonic()
            try:
                who = "answered by " + await caller.call("rpcf.idem", 0, timeout=20.0)
            except RemoteError as exc:
                who = getattr(exc.code, "name", str(exc.code))
            during.append((round(time.monotonic() - t0, 3), who))
        during_gone = await _nodes_gone(caller) > gone_before  # B was not yet gone: valid

        async def gone() -> bool:
            return await _nodes_gone(caller) > gone_before

        await _until("A counts B gone", gone, 30, every=0.1)
        t_gone = time.monotonic() - t_kill

        # 2. B restarts (same node id and port) and its provider registers again
        with contextlib.suppress(Exception):
            await on_b.close(timeout=0.2)
        b2 = _respawn(mesh, b, (a if restart_seed == "a" else c).mesh)
        on_b2 = await connect(b2, "provider-b2")
        pb2 = Provider("B2", holds=True)
        await on_b2.register("rpcf.hold", pb2.handler)
        t_reg = time.monotonic()
        tries: Counter[str] = Counter()
        while True:
            try:
                who = await caller.call("rpcf.hold", 0, timeout=2.0)
                break
            except RemoteError as exc:
                tries[getattr(exc.code, "name", str(exc.code))] += 1
                await asyncio.sleep(0.01)
            if time.monotonic() - t_reg > 60:
                raise RuntimeError(f"the restarted provider was not called within 60 s: {tries}")
        restart = time.monotonic() - t_reg

        # 3. B dies again with calls in flight, and calls keep coming
        tasks = [asyncio.ensure_future(timed("rpcf.hold/busy")) for _ in range(HOLD_CALLS)]
        await _until("calls held at B again", lambda: held(pb2, HOLD_CALLS), 10)
        t_kill = await kill(b2, LATE_CALLS)
        return {
            "run": run,
            "quiet_not_idempotent": hold,
            "quiet_idempotent": idem,
            "down_idempotent_calls": during,
            "down_calls_ended_after_b_gone": during_gone,
            "b_gone_at": round(t_gone, 3),
            "restart_register_to_call": round(restart, 3),
            "restart_answered_by": who,
            "restart_failed_tries": dict(tries),
            "busy_in_flight": since(t_kill, "rpcf.hold/busy"),
            "busy_sent_after_the_kill": since(t_kill, "rpcf.hold/late"),
        }
    finally:
        for cl in clients:
            with contextlib.suppress(Exception):
                await cl.close(timeout=0.2)
        mesh.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", help="write every run's figures to this file")
    ap.add_argument("--restart-seed", choices=("a", "c"), default="a",
                    help="the node the restarted B joins through (default a, the caller's)")
    args = ap.parse_args(argv)
    runs = []
    for i in range(1, args.runs + 1):
        r = asyncio.run(one_run(i, args.restart_seed))
        runs.append(r)
        print(json.dumps(r), flush=True)
    def slowest(key: str) -> list[float]:
        return [max(t for _, t, _ in r[key]) for r in runs]

    rows = [
        ("1. in flight, not idempotent: kill -> last call ends (s)",
         slowest("quiet_not_idempotent")),
        ("1. in flight, idempotent: kill -> last call ends (s)", slowest("quiet_idempotent")),
        ("1. then new idempotent calls, B's link down: slowest call (s)",
         [max(t for t, _ in r["down_idempotent_calls"]) for r in runs]),
        ("   kill -> A counts B gone (s)", [r["b_gone_at"] for r in runs]),
        ("2. restarted provider: REGISTER -> first call answered (s)",
         [r["restart_register_to_call"] for r in runs]),
        ("3. in flight, calls keep coming: kill -> last call ends (s)",
         slowest("busy_in_flight")),
        ("3. sent 0-0.2 s after the kill: kill -> last call ends (s)",
         slowest("busy_sent_after_the_kill")),
    ]
    keys = ("quiet_not_idempotent", "quiet_idempotent", "busy_in_flight",
            "busy_sent_after_the_kill")
    outcomes = {k: dict(Counter(o for r in runs for _, _, o in r[k])) for k in keys}
    outcomes["down_idempotent_calls"] = dict(Counter(o for r in runs
                                                     for _, o in r["down_idempotent_calls"]))
    print()
    print(f"{'figure':66} {'median':>7}  runs")
    for name, xs in rows:
        print(f"{name:66} {statistics.median(xs):7.3f}  {' / '.join(f'{x:.3f}' for x in xs)}")
    print(f"outcomes: {outcomes}")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
