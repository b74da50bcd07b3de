"""The C client (control/clients/c) against a real node, with Python clients on the other
side: it subscribes and receives, publishes to a Python subscriber, calls a procedure a
Python client registered, and serves a procedure a Python client calls.

The C program is built with its Makefile into a temporary directory. A missing compiler,
``make``, ``pkg-config``, libzmq or msgpack-c fails this test (CI installs them; see
.ci/run) rather than skipping it.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from macula.client import BlockingClient, Message
from macula.config import NodeConfig
from macula.control.broker import Limits
from macula.control.protocol import PubackReason
from macula.node import NodeThread
from tests.test_client_reconnect import Lines, NodeProcess

C_DIR = Path(__file__).resolve().parent.parent / "control" / "clients" / "c"
INSTALL = "apt-get install build-essential pkg-config libzmq3-dev libmsgpack-dev"


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for tool in ("make", "cc", "pkg-config"):
        if shutil.which(tool) is None:
            pytest.fail(f"`{tool}` is not installed; the C client needs it ({INSTALL})")
    build = tmp_path_factory.mktemp("c-client")
    proc = subprocess.run(["make", "-C", str(C_DIR), f"BUILD={build}"], capture_output=True,
                          text=True, timeout=120)
    if proc.returncode != 0:
        pytest.fail(f"building the C client failed ({INSTALL}):\n{proc.stdout}\n{proc.stderr}")
    return build / "macula_test"


@pytest.fixture
def node() -> Iterator[NodeThread]:
    cfg = NodeConfig(mesh_port=-1, endpoints=["tcp://127.0.0.1:0"],
                     metrics_port=-1, limits=Limits())
    with NodeThread(cfg) as n:
        yield n


def test_c_client_pubsub_and_rpc_both_ways(program: Path, node: NodeThread) -> None:
    with BlockingClient(node.endpoint, realm="c", name="py") as py:
        out = py.subscribe("c/out", qos=1)
        py.register("py.add", lambda a: a[0] + a[1])
        proc = subprocess.Popen([str(program), node.endpoint, "c"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            lines: list[str] = []

            def expect(prefix: str) -> str:
                line = proc.stdout.readline() if proc.stdout else ""
                lines.append(line)
                assert line.startswith(prefix), (lines, proc.stderr and proc.stderr.read())
                return line.strip()

            expect("READY session=")
            assert py.publish("c/in", b"hello from python", qos=1) is PubackReason.OK
            py.publish("c/in", b"second")
            assert expect("RECEIVED ") == "RECEIVED c/in hello from python qos=1"
            assert expect("RECEIVED ") == "RECEIVED c/in second qos=0"
            got = [out.get(10) for _ in range(3)]
            assert sorted(got, key=lambda m: m.payload) == [
                Message("c/out", b"echo:hello from python", 0, False, out.sub.sub_id),
                Message("c/out", b"echo:qos1", 1, False, out.sub.sub_id),
                Message("c/out", b"echo:second", 0, False, out.sub.sub_id),
            ]
            assert expect("CALL ") == "CALL py.add 5"
            assert "no provider" in expect("NO_PROVIDER ")
            expect("SERVING")
            assert py.call("c.mul", [6, 7], timeout=10) == 42
            expect("SERVED")
            assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()  # reap it and close its pipes
        stats = py.stats()
        assert stats["calls_ok_total"] == 2
        assert stats["sessions_closed_total"].get("NORMAL", 0) == 1  # the C client's BYE


def test_c_client_reconnects_after_its_node_is_killed_and_restarted(
        program: Path, tmp_path: Path) -> None:
    """kill -9 of the C client's node, a new node on the same endpoint: the C client
    notices, says HELLO again, subscribes and registers again; a QoS 1 publish it makes
    while the node is down waits for the new session and gets its PUBACK."""
    endpoint = f"ipc://{tmp_path}/node.sock"
    nodes = [NodeProcess(endpoint)]
    proc = subprocess.Popen([str(program), endpoint, "c", "reconnect"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out = Lines(proc.stdout)
        out.expect("READY session=")
        with BlockingClient(endpoint, realm="c") as py:
            assert py.publish("c/r", b"first", qos=1) is PubackReason.OK
            assert out.expect("RECEIVED ") == "RECEIVED first\n"
        nodes[0].kill()
        assert out.expect("LOST ")
        nodes.append(NodeProcess(endpoint))
        out.expect("BACK session=")
        assert out.expect("HELD_PUBACK ") == "HELD_PUBACK 16\n"  # NO_SUBSCRIBERS, from the new node
        with BlockingClient(endpoint, realm="c") as py:
            assert py.call("c.one", None, timeout=10) == 1  # registered again
            deadline = time.monotonic() + 20
            while py.publish("c/r", b"last", qos=1) is not PubackReason.OK:
                assert time.monotonic() < deadline, "the C client did not subscribe again"
                time.sleep(0.05)
            assert out.expect("RECEIVED ") == "RECEIVED last\n"
            assert out.expect("DONE ") == "DONE reconnects=1\n"
            assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        for n in nodes:
            n.stop()
