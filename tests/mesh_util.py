"""Helpers for the mesh integration tests: ``macula node`` processes joined over loopback QUIC.

:class:`NodeProcs` starts real ``python -m macula node`` subprocesses (ephemeral control and
mesh ports, no metrics, no shard processes, one data directory each): node 1 first, then
the others at once with ``--seed`` = node 1's mesh address, and waits for each one's
``macula node ready ...`` line. Every process runs in its own session (process group) so
that ``stop()`` can end it and anything it started; ``stop()`` runs on every way out of
the fixture or ``with`` block. A node's stderr goes to a file in its data directory; its
tail is part of every error about that node.

The async helpers below poll with generous deadlines: nothing here asserts on speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from macula.client import Client

READY = "macula node ready "
READY_TIMEOUT = 30.0  # seconds a node may take to print its ready line (2 busy cores)


@dataclass
class NodeProc:
    """One running node: its process and what its ready line said."""

    index: int  # 1-based, as in the tests' n1..n5
    proc: subprocess.Popen[bytes]
    endpoint: str  # the control endpoint (tcp://127.0.0.1:PORT)
    mesh: str  # host:port of its QUIC endpoint
    node_id: str  # hex
    data_dir: Path

    def stderr_tail(self, n: int = 3000) -> str:
        try:
            return (self.data_dir / "stderr.txt").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL (no goodbye to its peers) and reap."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


def _parse_ready(line: str) -> dict[str, str]:
    fields = dict(part.split("=", 1) for part in line[len(READY):].split() if "=" in part)
    for key in ("endpoints", "mesh", "node_id"):
        if key not in fields:
            raise AssertionError(f"ready line without {key}=: {line!r}")
    return fields


class NodeProcs:
    """``n`` node processes in one mesh (see the module docstring)."""

    def __init__(self, base: Path, n: int, env: Mapping[str, str] | None = None) -> None:
        if n < 1:
            raise ValueError("a mesh needs at least one node")
        self.base = base
        self.n = n
        self.env = dict(os.environ)
        for key in [k for k in self.env if k.startswith("MACULA_")]:
            del self.env[key]  # the caller's settings would change what is tested
        self.env.update(env or {})
        self.nodes: list[NodeProc] = []
        self._procs: list[subprocess.Popen[bytes]] = []  # every process started, for stop()

    def __enter__(self) -> NodeProcs:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __getitem__(self, index: int) -> NodeProc:
        """Node ``index`` (1-based: ``mesh[1]`` is n1)."""
        return self.nodes[index - 1]

    def start(self) -> NodeProcs:
        try:
            first = self._spawn(1, [])
            self.nodes.append(self._ready(1, first))
            seed = self.nodes[0].mesh
            rest = [(i, self._spawn(i, [seed])) for i in range(2, self.n + 1)]
            for i, (proc, data_dir) in rest:
                self.nodes.append(self._ready(i, (proc, data_dir)))
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, i: int, seeds: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
        data_dir = self.base / f"n{i}"
        data_dir.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "macula", "node", "--endpoint", "tcp://127.0.0.1:0",
                "--metrics-port", "-1", "--mesh-port", "0", "--shards", "0",
                "--data-dir", str(data_dir)]
        for s in seeds:
            args += ["--seed", s]
        with open(data_dir / "stderr.txt", "wb") as err:
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err,
                                    stdin=subprocess.DEVNULL, env=self.env,
                                    start_new_session=True)
        self._procs.append(proc)
        return proc, data_dir

    def _ready(self, i: int, spawned: tuple[subprocess.Popen[bytes], Path]) -> NodeProc:
        proc, data_dir = spawned
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + READY_TIMEOUT
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            readable, _, _ = select.select([fd], [], [], left)
            if not readable:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
        line = buf.split(b"\n", 1)[0].decode(errors="replace")
        if not line.startswith(READY):
            proc.poll()
            tail = (data_dir / "stderr.txt").read_text(errors="replace")[-3000:]
            raise AssertionError(f"node {i} did not become ready (exit code {proc.returncode},"
                                 f" stdout {buf!r}); stderr:\n{tail}")
        f = _parse_ready(line)
        return NodeProc(i, proc, f["endpoints"].split(",")[0], f["mesh"], f["node_id"],
                        data_dir)

    def stop(self) -> None:
        """SIGTERM every node still running, then SIGKILL whatever is left after 10 s."""
        procs = self._procs
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        for proc in procs:
            if proc.stdout is not None:
                proc.stdout.close()

    def describe(self) -> str:
        """Each node's state and the end of its stderr (for failure messages)."""
        return "\n".join(f"n{nd.index} {nd.mesh} alive={nd.alive}:\n{nd.stderr_tail(1500)}"
                         for nd in self.nodes)


async def eventually(check: Callable[[], Any], timeout: float, every: float = 0.1,
                     what: str = "condition") -> Any:
    """Call ``check()`` (awaiting its result if it is awaitable) until it returns something
    truthy, which is returned; AssertionError naming ``what`` (and the last value) after
    ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        got = check()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return got
        if loop.time() >= deadline:
            raise AssertionError(f"{what}: not within {timeout} s (last: {got!r})")
        await asyncio.sleep(every)


class Clients:
    """The clients of one test, all closed when it ends, however it ends: a client left
    open keeps its ZeroMQ context alive, and terminating that context at interpreter exit
    would hang pytest."""

    def __init__(self, mesh: NodeProcs) -> None:
        self.mesh = mesh
        self.clients: list[Client] = []

    async def connect(self, node: int, realm: str, name: str) -> Client:
        """A client of node ``node`` (1-based) in ``realm``."""
        c = await Client.connect(self.mesh[node].endpoint, realm=realm, name=name)
        self.clients.append(c)
        return c

    async def close_all(self) -> None:
        # a client of a killed node waits its whole timeout for a BYE that never comes
        await asyncio.gather(*(c.close(timeout=0.3) for c in self.clients),
                             return_exceptions=True)


def run(mesh: NodeProcs, test: Callable[[Clients], Awaitable[Any]],
        timeout: float = 60.0) -> Any:
    """Run ``test(clients)`` on a fresh loop: failing (not hanging) after ``timeout``,
    closing every client it made on every way out."""
    async def main() -> Any:
        clients = Clients(mesh)
        try:
            return await asyncio.wait_for(test(clients), timeout)
        finally:
            await clients.close_all()

    return asyncio.run(main())
