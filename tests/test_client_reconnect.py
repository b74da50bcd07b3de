"""Clients that heal: macula.Client, BlockingClient and ``macula sub`` after a lost node.

Real node processes (``python -m macula node``) are killed with SIGKILL and started again
on the same ``ipc://`` endpoint; the client must notice (the connection closing, or
NOT_WELCOMED when ZeroMQ reconnected silently, or silence), say HELLO again, restore its
subscriptions and registrations and re-send what the old node never acknowledged. Where the
exact sequence matters (an unacknowledged QoS 1 PUBLISH, a CALL cut off, NOT_WELCOMED
without a closed connection) the node is a hand-driven ROUTER socket speaking MCP/1.

Waits have generous deadlines (a node process takes about a second to start on a loaded
CI machine); nothing asserts on speed.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from macula.client import (
    BlockingClient,
    Client,
    ConnectionLost,
    Message,
    Reconnected,
)
from macula.control.protocol import Err, PubackReason
from tests.mesh_util import eventually
from tests.test_client import FakeNode

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


def run(fn: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await asyncio.wait_for(fn(), 60)

    return asyncio.run(main())


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


class Lines:
    """The lines of a child's stream, read by a thread, so that a wait has a deadline."""

    def __init__(self, stream: Any) -> None:
        self.queue: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.queue.put(line)
        self.queue.put("")  # end of stream

    def expect(self, prefix: str, timeout: float = 20.0) -> str:
        """The next line starting with ``prefix`` (other lines are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line starting with {prefix!r} within {timeout} s; "
                                     f"got {self.seen}") from None
            self.seen.append(line)
            if line.startswith(prefix):
                return line
            assert line, f"the stream ended before a line starting with {prefix!r}: {self.seen}"


class NodeProcess:
    """``python -m macula node`` on one ipc:// endpoint, without mesh, metrics or shards."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "macula", "node", "--endpoint", endpoint,
             "--mesh-port", "-1", "--metrics-port", "-1", "--shards", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        Lines(self.proc.stdout).expect("macula node ready", 30)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def endpoint(tmp_path: Path) -> str:
    return f"ipc://{tmp_path}/node.sock"


@pytest.fixture
def nodes(endpoint: str) -> Iterator[list[NodeProcess]]:
    """The node processes a test starts (stopped at the end); the first is running."""
    started = [NodeProcess(endpoint)]
    yield started
    for n in started:
        n.stop()


async def _start(endpoint: str) -> NodeProcess:
    return await asyncio.get_running_loop().run_in_executor(None, NodeProcess, endpoint)


# -- a real node killed and restarted --------------------------------------------------------
def test_restarted_node_subscription_registration_and_held_publish_resume(
        endpoint: str, nodes: list[NodeProcess]) -> None:
    async def main() -> None:
        lost: list[ConnectionLost] = []
        back: list[Reconnected] = []
        c = await Client.connect(endpoint, realm="r", name="healing",
                                 on_disconnect=lost.append, on_reconnect=back.append)
        sub = await c.subscribe("t/#", qos=1)
        reg = await c.register("double", lambda x: 2 * x)
        old_session = c.session_id
        await c.publish("t/before", b"0", qos=1)
        assert (await sub.get(10)).payload == b"0"

        nodes[0].kill()
        await eventually(lambda: lost, 10, what="on_disconnect after kill -9")
        # noticed by the connection closing (not by silence, not by a new node's answer)
        assert not c.connected and lost[0].code == Err.PEER_GONE, lost
        # made while the node is down: held, sent after the new HELLO, completes then
        held = asyncio.ensure_future(c.publish("t/held", b"1", qos=1, timeout=30))
        nodes.append(await _start(endpoint))
        info = await eventually(lambda: back, 20, what="on_reconnect after the restart")
        assert info[0].node_restarted is True and info[0].previous_session_id == old_session
        assert info[0].subscriptions == 1 and info[0].registrations == 1
        assert info[0].resent == 1 and c.connected and c.reconnects == 1
        assert await held is PubackReason.OK
        assert (await sub.get(10)).payload == b"1"  # the same Subscription keeps yielding

        other = await Client.connect(endpoint, realm="r", name="other")
        assert await other.publish("t/after", b"2", qos=1) is PubackReason.OK
        msg = await sub.get(10)
        assert msg == Message("t/after", b"2", 1, False, sub.sub_id)
        assert await other.call("double", 21) == 42  # the registration was restored
        assert reg.reg_id in c._regs
        assert c.duplicates == 0
        await other.close()
        await c.close()

    run(main)


def test_kill_without_reconnect_raises_in_the_iterator(
        endpoint: str, nodes: list[NodeProcess]) -> None:
    async def main() -> None:
        c = await Client.connect(endpoint, realm="r", reconnect=False)
        sub = await c.subscribe("t/#")
        nodes[0].kill()

        async def drain() -> None:
            async for _ in sub:
                pass

        with pytest.raises(ConnectionLost):
            await asyncio.wait_for(drain(), 15)
        assert c.closed is not None
        with pytest.raises(ConnectionLost):
            await c.publish("t/x", b"x", qos=1)

    run(main)


def test_blocking_client_reconnects_and_its_subscription_keeps_yielding(
        endpoint: str, nodes: list[NodeProcess]) -> None:
    with BlockingClient(endpoint, realm="b") as c:
        sub = c.subscribe("b/#", qos=1)
        nodes[0].kill()
        nodes.append(NodeProcess(endpoint))
        with BlockingClient(endpoint, realm="b") as pub:
            # until the subscriber is back, the new node answers NO_SUBSCRIBERS
            deadline = time.monotonic() + 20
            while pub.publish("b/1", b"back", qos=1) is not PubackReason.OK:
                assert time.monotonic() < deadline, "the subscriber did not come back"
                time.sleep(0.05)
            assert sub.get(10).payload == b"back"
        assert c.client.reconnects == 1


# -- the node's side driven by hand ------------------------------------------------------------
async def _fake_session(fake: FakeNode, session_id: int = 7) -> None:
    hello = (await fake.recv(10))[0]
    assert hello[0] == 1, hello
    fake.send([2, hello[1], session_id, {"heartbeat_ms": 60_000, "liveness": 3}, session_id])


async def _connected(fake: FakeNode, **options: Any) -> Client:
    """A client of ``fake`` (realm ``r``) with session 7 open."""
    connecting = asyncio.ensure_future(Client.connect(fake.endpoint, realm="r", **options))
    await _fake_session(fake, 7)
    return await connecting


def test_not_welcomed_on_the_same_connection_means_reconnect() -> None:
    """ZeroMQ reconnected silently to a new node: the PING is answered NOT_WELCOMED."""
    async def main() -> None:
        fake = FakeNode()
        try:
            back: list[Reconnected] = []
            c = await _connected(fake, on_reconnect=back.append)
            subscribing = asyncio.ensure_future(c.subscribe("s/#", qos=1))
            sub_cmd = (await fake.recv())[0]
            fake.send([11, sub_cmd[1], 1, 1])
            sub = await subscribing
            pinging = asyncio.ensure_future(c.ping())
            ping = (await fake.recv())[0]
            assert ping[0] == 4
            fake.send([3, 0, int(Err.NOT_WELCOMED), "PING before HELLO: send HELLO first"])
            await _fake_session(fake, 8)  # a new connection says HELLO
            again = await fake.recv()
            assert again[0][:3] == [10, again[0][1], "s/#"] and again[0][3] == 1
            fake.send([11, again[0][1], 5, 1])
            assert again[1][0] == 4  # the held PING, sent again
            fake.send([5, again[1][1]])
            await asyncio.wait_for(pinging, 10)
            await eventually(lambda: back, 10, what="on_reconnect")
            assert back[0].session_id == 8 and back[0].node_restarted is True
            assert sub.sub_id == 5
            fake.send([16, 5, 1, 1, "s/x", b"after", False])  # did 1 again: a new session
            assert (await sub.get(10)).payload == b"after"
            await c.close(timeout=0.1)
        finally:
            fake.close()

    run(main)


def test_a_silent_node_is_left_for_a_new_connection() -> None:
    """Nothing received for liveness x heartbeat / 2: HELLO again on a new connection."""
    async def main() -> None:
        fake = FakeNode()
        try:
            lost: list[ConnectionLost] = []
            connecting = asyncio.ensure_future(Client.connect(
                fake.endpoint, realm="r", on_disconnect=lost.append))
            hello = (await fake.recv(10))[0]
            fake.send([2, hello[1], 7, {"heartbeat_ms": 100, "liveness": 2}, 1])
            c = await connecting
            first = fake.ident
            while True:  # PINGs go unanswered until the client gives up on this connection
                cmds = await fake.recv(10)
                if cmds[0][0] == 1:
                    break
                assert cmds == [[4, 0]], cmds
            assert fake.ident != first  # a new connection
            assert [e.code for e in lost] == [Err.HEARTBEAT_TIMEOUT] and not c.connected
            fake.send([2, cmds[0][1], 8, {"heartbeat_ms": 60_000, "liveness": 3}, 1])
            await eventually(lambda: c.connected, 10, what="reconnected")
            assert c.session_id == 8
            await c.close(timeout=0.1)
        finally:
            fake.close()

    run(main)


def test_a_loss_during_the_restore_restores_everything_on_the_next_session() -> None:
    async def main() -> None:
        fake = FakeNode()
        try:
            back: list[Reconnected] = []
            c = await _connected(fake, on_reconnect=back.append)
            registering = asyncio.ensure_future(c.register("p", lambda _: 1))
            reg_cmd = (await fake.recv())[0]
            fake.send([21, reg_cmd[1], 3])
            reg = await registering
            for session in (8, 9):
                fake.send([6, int(Err.SHUTDOWN), "node shutting down"])
                await _fake_session(fake, session)
                again = await fake.recv()
                assert [cmd[:3] for cmd in again] == [[20, again[0][1], "p"]], again
            fake.send([21, again[0][1], 4])  # only the third session answers
            await eventually(lambda: back, 10, what="on_reconnect")
            assert [b.session_id for b in back] == [9] and back[0].registrations == 1
            assert reg.reg_id == 4 and c._regs == {4: reg}
            await c.close(timeout=0.1)
        finally:
            fake.close()

    run(main)


def test_unacknowledged_qos1_publish_is_resent_with_its_mid_and_calls_fail() -> None:
    async def main() -> None:
        fake = FakeNode()
        try:
            lost: list[ConnectionLost] = []
            c = await _connected(fake, on_disconnect=lost.append)
            publishing = asyncio.ensure_future(c.publish("p/1", b"x", qos=1, timeout=30))
            calling = asyncio.ensure_future(c.call("slow", 1))
            cmds = await fake.recv()
            pub = next(cmd for cmd in cmds if cmd[0] == 14)
            assert [cmd[0] for cmd in cmds] == [14, 24]
            fake.send([6, int(Err.SHUTDOWN), "node shutting down"])
            with pytest.raises(ConnectionLost):  # it may have run: not repeated
                await asyncio.wait_for(calling, 10)
            await _fake_session(fake, 8)
            again = await fake.recv()
            assert again == [pub]  # same topic, payload and mid
            fake.send([15, pub[4], 0])
            assert await asyncio.wait_for(publishing, 10) is PubackReason.OK
            assert [e.code for e in lost] == [Err.SHUTDOWN]
            assert c.resent == 1
            await c.close(timeout=0.1)
        finally:
            fake.close()

    run(main)


def test_resend_bound_fails_the_excess_publishes_clearly() -> None:
    async def main() -> None:
        fake = FakeNode()
        try:
            c = await _connected(fake, max_resend=1)
            first = asyncio.ensure_future(c.publish("p/1", b"a", qos=1, timeout=30))
            second = asyncio.ensure_future(c.publish("p/2", b"b", qos=1, timeout=30))
            assert len(await fake.recv()) == 2
            fake.send([6, int(Err.SLOW_CONSUMER), "too slow"])
            with pytest.raises(ConnectionLost, match="max_resend"):
                await asyncio.wait_for(second, 10)
            assert c.resend_dropped == 1
            with pytest.raises(ConnectionLost, match="max_resend"):  # still reconnecting
                await c.publish("p/3", b"c", qos=1)
            await _fake_session(fake, 8)
            again = await fake.recv()
            assert [cmd[1] for cmd in again] == ["p/1"]
            fake.send([15, again[0][4], 0])
            assert await asyncio.wait_for(first, 10) is PubackReason.OK
            await c.close(timeout=0.1)
        finally:
            fake.close()

    run(main)


# -- macula sub ---------------------------------------------------------------------------------
def _sub(*args: str) -> tuple[subprocess.Popen[str], Lines, Lines]:
    proc = subprocess.Popen([sys.executable, "-m", "macula", "sub", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    return proc, Lines(proc.stdout), Lines(proc.stderr)


def test_macula_sub_keeps_receiving_across_a_node_restart(
        endpoint: str, nodes: list[NodeProcess]) -> None:
    proc, out, err = _sub("t", "--count", "2", "--qos", "1", "--endpoint", endpoint,
                          "--realm", "sh")
    try:
        err.expect("macula sub: subscribed")
        with BlockingClient(endpoint, realm="sh") as pub:
            assert pub.publish("t", b"one", qos=1) is PubackReason.OK
        assert out.expect("t ") == "t one\n"
        nodes[0].kill()
        assert "connection lost" in err.expect("macula sub: ")
        nodes.append(NodeProcess(endpoint))
        assert "reconnected" in err.expect("macula sub: ")
        with BlockingClient(endpoint, realm="sh") as pub:
            assert pub.publish("t", b"two", qos=1) is PubackReason.OK
        assert out.expect("t ") == "t two\n"
        assert proc.wait(15) == 0
        lines = err.seen + list(iter(lambda: err.queue.get(timeout=5), ""))
        assert [ln.split(" (")[0].split(" to ")[0] for ln in lines] == [
            "macula sub: subscribed", "macula sub: connection lost",
            "macula sub: reconnected"], lines  # one line each way, nothing else
    finally:
        proc.kill()
        proc.wait()


def test_macula_sub_no_reconnect_exits_non_zero(endpoint: str, nodes: list[NodeProcess]) -> None:
    proc, _, err = _sub("t", "--no-reconnect", "--endpoint", endpoint)
    try:
        err.expect("macula sub: subscribed")
        nodes[0].kill()
        assert "connection lost" in err.expect("macula sub: ")
        assert proc.wait(15) == 1
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("command", [["sub", "t"], ["pub", "t"]])
def test_ctrl_c_ends_sub_and_pub_with_130_and_no_traceback(
        endpoint: str, nodes: list[NodeProcess], command: list[str]) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "macula", *command, "--endpoint", endpoint],
                            text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env())
    try:
        err = Lines(proc.stderr)
        if command[0] == "sub":
            err.expect("macula sub: subscribed")
        else:  # pub reads its messages from stdin: interrupted while waiting for a line
            assert proc.stdin is not None
            proc.stdin.write("one\n")
            proc.stdin.flush()
            time.sleep(1.0)  # let it import and block on the next line (either way: no traceback)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 130
        rest = "".join(iter(lambda: err.queue.get(timeout=5), ""))
        assert "Traceback" not in rest, rest
    finally:
        proc.kill()
        proc.wait()
