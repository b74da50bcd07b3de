"""macula.Client and macula.BlockingClient against a real node over real ZeroMQ sockets.

Most tests run a real node (NodeThread). Where the behaviour under test is the client's own
side of the protocol (one batch per loop iteration, duplicate deliveries, a full queue,
heartbeat loss) the peer is a hand-driven ROUTER socket in the test speaking MCP/1, so that
the test controls exactly what the client receives. Waits have generous timeouts; nothing
asserts on speed.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
import zmq
import zmq.auth

import macula
from macula.client import (
    BlockingClient,
    Client,
    ConnectionClosed,
    ConnectionLost,
    CurveKeys,
    Message,
    RemoteError,
)
from macula.config import NodeConfig
from macula.control import protocol as p
from macula.control.broker import Limits
from macula.control.protocol import Err, PubackReason
from macula.node import NodeThread

T = TypeVar("T")
SIG = p.SIGNATURE


def run(fn: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await asyncio.wait_for(fn(), 60)

    return asyncio.run(main())


def _node(**kw: Any) -> NodeThread:
    limits = kw.pop("limits", Limits(ack_timeout=0.2))
    cfg = NodeConfig(mesh_port=-1, endpoints=["tcp://127.0.0.1:0"],
                     metrics_port=-1, tick_interval=0.02,
                     limits=limits, **kw)
    return NodeThread(cfg).start()


@pytest.fixture(scope="module")
def node() -> Iterator[NodeThread]:
    n = _node()
    yield n
    n.stop()


class FakeNode:
    """A ROUTER socket driven by the test: receives the client's messages, answers by hand."""

    def __init__(self) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.ident = b""

    async def recv(self, timeout: float = 5.0) -> list[Any]:
        """The commands of the next message (polling without blocking the loop)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.sock.poll(0):
            assert asyncio.get_running_loop().time() < deadline, "no message from the client"
            await asyncio.sleep(0.002)
        frames = self.sock.recv_multipart()
        assert len(frames) == 3 and frames[1] == SIG, frames
        self.ident = frames[0]
        return list(msgspec.msgpack.decode(frames[2]))

    def send(self, *commands: Any) -> None:
        self.sock.send_multipart([self.ident, SIG, p.encode(list(commands))])

    async def welcome(self, **limits: int) -> None:
        hello = (await self.recv())[0]
        assert hello[0] == 1
        self.send([2, hello[1], 7, {"heartbeat_ms": 60_000, "liveness": 3, **limits}])

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


async def _with_fake(body: Callable[[FakeNode, Client], Awaitable[None]],
                     reconnect: bool = True, **limits: int) -> None:
    fake = FakeNode()
    try:
        connecting = asyncio.ensure_future(
            Client.connect(fake.endpoint, realm="r", reconnect=reconnect))
        await fake.welcome(**limits)
        client = await connecting
        assert client.session_id == 7
        try:
            await body(fake, client)
        finally:
            await client.close(timeout=0.1)
    finally:
        fake.close()


# -- pub/sub ---------------------------------------------------------------------------------------
def test_subscribe_iterate_publish_qos0_and_qos1(node: NodeThread) -> None:
    async def main() -> None:
        sub_c = await Client.connect(node.endpoint, realm="r", name="sub")
        pub_c = await Client.connect(node.endpoint, realm="r", name="pub")
        assert sub_c.limits["max_batch"] == 4096 and sub_c.session_id != pub_c.session_id
        sub = await sub_c.subscribe("t/+", qos=1)
        assert sub.qos == 1 and sub.sub_id > 0
        assert await pub_c.publish("t/a", b"zero") is None
        assert await pub_c.publish("t/b", b"one", qos=1) is PubackReason.OK
        got = sorted([await sub.get(5), await sub.get(5)], key=lambda m: m.payload)
        assert got == [Message("t/b", b"one", 1, False, sub.sub_id),
                       Message("t/a", b"zero", 0, False, sub.sub_id)]
        assert await pub_c.publish("nobody/here", b"x", qos=1) is PubackReason.NO_SUBSCRIBERS
        await asyncio.sleep(0.5)  # past the node's ack_timeout: the ACK must have gone out
        stats = await sub_c.stats()
        assert stats["acks_total"] >= 1 and stats["inflight"] == 0
        assert stats["redeliveries_total"] == 0
        await sub_c.close()
        await pub_c.close()

    run(main)


def test_async_for_ends_when_unsubscribed_and_unsubscribe_reports_existence(
    node: NodeThread,
) -> None:
    async def main() -> None:
        c = await Client.connect(node.endpoint, realm="r2")
        sub = await c.subscribe("x/#")
        await c.publish_many([("x/1", b"1"), ("x/2", b"2"), ("x/3", b"3")])
        got: list[bytes] = []
        async for msg in sub:
            got.append(msg.payload)
            if len(got) == 3:
                assert await sub.unsubscribe() is True
        assert got == [b"1", b"2", b"3"]  # one QoS level: in publish order
        assert await c.unsubscribe("x/#") is False
        await c.close()

    run(main)


def test_callbacks_plain_and_async_and_retained_messages(node: NodeThread) -> None:
    async def main() -> None:
        c = await Client.connect(node.endpoint, realm="r3")
        await c.publish("cfg/a", b"kept", qos=1, retain=True)
        plain: list[Message] = []
        done = asyncio.Event()
        later: list[Message] = []

        async def slow(msg: Message) -> None:
            await asyncio.sleep(0)
            later.append(msg)
            done.set()

        await c.subscribe("cfg/#", callback=plain.append)
        await c.subscribe("cfg/+", callback=slow)
        await asyncio.wait_for(done.wait(), 5)
        assert [(m.topic, m.payload, m.retain) for m in plain] == [("cfg/a", b"kept", True)]
        assert [(m.topic, m.retain) for m in later] == [("cfg/a", True)]
        with pytest.raises(macula.client.MaculaError, match="callback"):
            await (await c.subscribe("cfg/b", callback=plain.append)).get()
        await c.close()

    run(main)


def test_publishes_of_one_loop_iteration_leave_in_one_message() -> None:
    async def body(fake: FakeNode, c: Client) -> None:
        for i in range(5):
            c.publish_nowait("a/b", bytes([i]))
        await c.publish_many([("a/c", b"x"), ("a/d", b"y")])
        cmds = await fake.recv()
        assert [cmd[0] for cmd in cmds] == [14] * 7
        assert [cmd[2] for cmd in cmds[:5]] == [bytes([i]) for i in range(5)]
        assert not fake.sock.poll(100)  # nothing else was sent

    run(lambda: _with_fake(body))


def test_bodies_are_split_at_the_nodes_max_batch() -> None:
    async def body(fake: FakeNode, c: Client) -> None:
        await c.publish_many([("a", bytes([i])) for i in range(7)])
        sizes = [len(await fake.recv()), len(await fake.recv()), len(await fake.recv())]
        assert sizes == [3, 3, 1]

    run(lambda: _with_fake(body, max_batch=3))


def test_qos1_duplicates_are_dropped_and_acked_once() -> None:
    async def body(fake: FakeNode, c: Client) -> None:
        subscribing = asyncio.ensure_future(c.subscribe("s", qos=1))
        rid = (await fake.recv())[0][1]
        fake.send([11, rid, 4, 1])
        sub = await subscribing
        ev = [16, 4, 9, 1, "s", b"p", False]
        fake.send(ev, ev)  # a redelivery: same did
        fake.send(ev)
        assert (await sub.get(5)).payload == b"p"
        acks = [cmd for cmd in await fake.recv() if cmd[0] == 17]
        assert acks == [[17, 9]]
        await asyncio.sleep(0.1)
        assert sub.get_nowait() is None and c.duplicates == 2
        assert not fake.sock.poll(100)  # no second ACK

    run(lambda: _with_fake(body))


def test_full_queue_drops_oldest_qos0_and_leaves_qos1_unacknowledged() -> None:
    async def body(fake: FakeNode, c: Client) -> None:
        c.queue_size = 2
        subscribing = asyncio.ensure_future(c.subscribe("s", qos=1))
        rid = (await fake.recv())[0][1]
        fake.send([11, rid, 1, 1])
        sub = await subscribing
        fake.send([16, 1, 0, 0, "s", b"a", False], [16, 1, 0, 0, "s", b"b", False],
                  [16, 1, 0, 0, "s", b"c", False], [16, 1, 5, 1, "s", b"q", False])
        await asyncio.sleep(0.2)
        assert sub.dropped == 1
        assert [(await sub.get(1)).payload, (await sub.get(1)).payload] == [b"b", b"c"]
        assert not fake.sock.poll(100)  # the QoS 1 EVENT did not fit: no ACK
        fake.send([16, 1, 5, 1, "s", b"q", False])  # the node's redelivery now fits
        assert (await sub.get(5)).payload == b"q"
        assert [cmd for cmd in await fake.recv() if cmd[0] == 17] == [[17, 5]]

    run(lambda: _with_fake(body))


# -- RPC -------------------------------------------------------------------------------------------
def test_register_and_call_plain_async_and_failing_handlers(node: NodeThread) -> None:
    async def main() -> None:
        prov = await Client.connect(node.endpoint, realm="rpc")
        caller = await Client.connect(node.endpoint, realm="rpc")

        async def slow_echo(args: Any) -> Any:
            await asyncio.sleep(0.01)
            return {"echo": args}

        def fail(args: Any) -> Any:
            raise ValueError(f"cannot do {args}")

        reg = await prov.register("math.add", lambda a: a[0] + a[1])
        await prov.register("echo", slow_echo, strategy="first")
        await prov.register("fail", fail)
        assert await caller.call("math.add", [2, 3]) == 5
        results = await asyncio.gather(*(caller.call("echo", i) for i in range(20)))
        assert results == [{"echo": i} for i in range(20)]
        assert await caller.call("echo") == {"echo": None}
        with pytest.raises(RemoteError) as err:
            await caller.call("fail", 7)
        assert err.value.code is Err.APPLICATION_ERROR and err.value.message == "cannot do 7"
        with pytest.raises(RemoteError) as err:
            await caller.call("nobody")
        assert err.value.code is Err.NO_PROVIDER
        with pytest.raises(RemoteError) as err:
            await caller.register("echo", slow_echo, strategy="random")
        assert err.value.code is Err.STRATEGY_MISMATCH
        assert await prov.unregister(reg) is True
        with pytest.raises(RemoteError, match="NO_PROVIDER"):
            await caller.call("math.add", [1, 1])
        await prov.close()
        await caller.close()

    run(main)


def test_call_timeout_and_provider_gone(node: NodeThread) -> None:
    async def main() -> None:
        prov = await Client.connect(node.endpoint, realm="rpc2")
        caller = await Client.connect(node.endpoint, realm="rpc2")
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def hang(args: Any) -> None:
            await never

        await prov.register("hang", hang)
        with pytest.raises(RemoteError) as err:
            await caller.call("hang", timeout=0.2)
        assert err.value.code is Err.CALL_TIMEOUT
        pending = asyncio.ensure_future(caller.call("hang", timeout=30))
        await asyncio.sleep(0.2)
        await prov.close()
        with pytest.raises(RemoteError) as err:
            await pending
        assert err.value.code is Err.PROVIDER_GONE
        never.cancel()
        await caller.close()

    run(main)


# -- sessions --------------------------------------------------------------------------------------
def test_refused_hello_raises_with_the_nodes_code() -> None:
    n = _node(realms={"locked": "s3cret"}, allow_any_realm=False)
    try:
        async def main() -> None:
            with pytest.raises(RemoteError) as err:
                await Client.connect(n.endpoint, realm="other")
            assert err.value.code is Err.UNKNOWN_REALM
            with pytest.raises(RemoteError) as err:
                await Client.connect(n.endpoint, realm="locked", secret="wrong")
            assert err.value.code is Err.BAD_SECRET
            c = await Client.connect(n.endpoint, realm="locked", secret="s3cret")
            assert (await c.stats())["sessions"] == 1
            await c.close()

        run(main)
    finally:
        n.stop()


def test_heartbeats_keep_an_idle_session_alive() -> None:
    n = _node(limits=Limits(min_heartbeat_ms=100, liveness=2))
    try:
        async def main() -> None:
            c = await Client.connect(n.endpoint, realm="r", heartbeat_ms=100)
            assert c.limits["heartbeat_ms"] == 100
            await asyncio.sleep(1.0)  # five times the node's 200 ms silence limit
            assert c.closed is None
            stats = await c.stats()
            assert stats["sessions"] == 1
            assert stats["sessions_closed_total"].get("HEARTBEAT_TIMEOUT", 0) == 0
            await c.close()

        run(main)
    finally:
        n.stop()


def test_silent_node_is_detected_and_pings_are_sent() -> None:
    async def body(fake: FakeNode, c: Client) -> None:
        sub = await asyncio.wait_for(_subscribed(fake, c), 5)
        cmds = await fake.recv()  # within heartbeat_ms / 2
        assert cmds == [[4, 0]]
        await asyncio.sleep(0.5)  # liveness 2 x 100 ms / 2 without a PONG
        assert isinstance(c.closed, ConnectionLost) and c.closed.code == Err.HEARTBEAT_TIMEOUT
        with pytest.raises(ConnectionLost):  # reconnect=False: not a silent end
            [m async for m in sub]
        with pytest.raises(ConnectionLost):
            await c.publish("a", b"x")

    run(lambda: _with_fake(body, reconnect=False, heartbeat_ms=100, liveness=2))


async def _subscribed(fake: FakeNode, c: Client) -> Any:
    subscribing = asyncio.ensure_future(c.subscribe("s"))
    rid = (await fake.recv())[0][1]
    fake.send([11, rid, 1, 0])
    return await subscribing


def test_node_shutdown_without_reconnect_fails_iteration_and_requests() -> None:
    n = _node()

    async def main() -> None:
        c = await Client.connect(n.endpoint, realm="r", reconnect=False)
        sub = await c.subscribe("a")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, n.stop)
        with pytest.raises(ConnectionLost, match="SHUTDOWN"):  # not a silent end
            [m async for m in sub]
        assert c.closed is not None and c.closed.code == Err.SHUTDOWN
        with pytest.raises(ConnectionLost, match="SHUTDOWN"):
            await c.call("x")
        await c.close()  # closing a closed client is a no-op

    run(main)


def test_curve_client(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    allowed = tmp_path / "allowed"
    keys.mkdir()
    allowed.mkdir()
    server_pub_file, server_secret = zmq.auth.create_certificates(str(keys), "node")
    _client_pub, client_secret = zmq.auth.create_certificates(str(allowed), "client")
    server_pub, _ = zmq.auth.load_certificate(server_pub_file)
    pub, sec = zmq.auth.load_certificate(client_secret)
    assert sec is not None
    n = _node(curve_secret_key_file=server_secret, curve_allow_dir=str(allowed))
    try:
        async def main() -> None:
            c = await Client.connect(n.endpoint, realm="r", curve=CurveKeys(server_pub, pub, sec))
            await c.register("one", lambda _: 1)
            assert await c.call("one") == 1
            await c.close()
            stranger_pub, stranger_sec = zmq.curve_keypair()
            with pytest.raises(TimeoutError):
                await Client.connect(n.endpoint, realm="r", timeout=0.5,
                                     curve=CurveKeys(server_pub, stranger_pub, stranger_sec))

        run(main)
    finally:
        n.stop()


# -- bad use ---------------------------------------------------------------------------------------
def test_bad_arguments_raise_clear_errors_and_the_session_continues(node: NodeThread) -> None:
    async def main() -> None:
        c = await Client.connect(node.endpoint, realm="bad")
        with pytest.raises(ValueError, match="qos must be 0 or 1"):
            await c.publish("a", b"x", qos=2)
        with pytest.raises(TypeError, match="qos must be int"):
            await c.subscribe("a", qos="1")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="wildcards"):
            await c.publish("a/+", b"x")
        with pytest.raises(TypeError, match="payload must be bytes"):
            await c.publish("a", "text")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="last level"):
            await c.subscribe("a/#/b")
        with pytest.raises(ValueError, match="strategy must be one of"):
            await c.register("p", lambda a: a, strategy="fastest")
        with pytest.raises(TypeError, match="handler must be callable"):
            await c.register("p", 42)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="procedure must be"):
            await c.call("")
        with pytest.raises(TypeError, match="not msgpack-encodable"):
            await c.call("p", object())
        with pytest.raises(ValueError, match="realm must be"):
            await Client.connect(node.endpoint, realm="")
        big = b"x" * (c.limits["max_payload"] + 1)
        with pytest.raises(RemoteError) as err:
            await c.publish("a", big, qos=1)
        assert err.value.code is Err.PAYLOAD_TOO_LARGE
        assert await c.ping() >= 0  # the session is still usable
        await c.close()
        with pytest.raises(ConnectionClosed, match="closed"):
            await c.subscribe("a")

    run(main)


def test_unattributable_errors_go_to_on_error(node: NodeThread) -> None:
    async def main() -> None:
        c = await Client.connect(node.endpoint, realm="bad2")
        seen: list[RemoteError] = []
        c.on_error = seen.append
        c._queue((14, "a", b"x" * (c.limits["max_payload"] + 1)))  # QoS 0: ref 0
        await c.ping()
        assert [e.code for e in seen] == [Err.PAYLOAD_TOO_LARGE]
        await c.close()

    run(main)


# -- blocking --------------------------------------------------------------------------------------
def test_blocking_client(node: NodeThread) -> None:
    assert macula.Client is Client and macula.BlockingClient is BlockingClient
    with BlockingClient(node.endpoint, realm="blk", name="a") as a, \
            BlockingClient(node.endpoint, realm="blk", name="b") as b:
        sub = a.subscribe("b/#", qos=1)
        a.register("double", lambda x: 2 * x)
        assert b.publish("b/1", b"one", qos=1) is PubackReason.OK
        assert b.publish_many([("b/2", b"two"), ("b/3", b"three")]) is None
        assert [sub.get(5).payload for _ in range(3)] == [b"one", b"two", b"three"]
        assert b.call("double", 21) == 42
        with pytest.raises(RemoteError, match="NO_PROVIDER"):
            b.call("triple", 1)
        with pytest.raises(TimeoutError):
            sub.get(0.1)
        assert sub.unsubscribe() is True
        assert list(sub) == []
        assert b.stats()["sessions"] >= 2
    with pytest.raises(ConnectionClosed):
        a.call("double", 1)


# -- the shell commands ----------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "macula.cli", *args], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def test_shell_pub_sub_and_call(node: NodeThread) -> None:
    ep = ["--endpoint", node.endpoint, "--realm", "shell"]
    sub = _cli("sub", "news/#", "--count", "3", *ep)
    assert sub.stderr is not None
    assert "subscribed to news/#" in sub.stderr.readline()
    one = _cli("pub", "news/a", "hello", "--qos", "1", *ep)
    assert one.communicate(timeout=30) == ("", "") and one.returncode == 0
    lines = _cli("pub", "news/b", *ep)
    assert lines.communicate("two\nthree\n", timeout=30)[1] == "" and lines.returncode == 0
    out, _ = sub.communicate(timeout=30)
    assert sub.returncode == 0
    assert out.splitlines() == ["news/a hello", "news/b two", "news/b three"]

    with BlockingClient(node.endpoint, realm="shell") as provider:
        provider.register("math.add", lambda a: a[0] + a[1])
        call = _cli("call", "math.add", "[2, 3]", *ep)
        assert call.communicate(timeout=30) == ("5\n", "") and call.returncode == 0
        missing = _cli("call", "math.sub", "[2, 3]", *ep)
        out, err = missing.communicate(timeout=30)
        assert missing.returncode == 1 and "NO_PROVIDER" in err
        bad = _cli("call", "math.add", "[2,", *ep)
        out, err = bad.communicate(timeout=30)
        assert bad.returncode == 2 and "ARGS must be JSON" in err


def test_shell_reports_an_absent_node() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _cli("pub", "a", "x", "--endpoint", f"tcp://127.0.0.1:{port}",
                "--connect-timeout", "0.5")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and f"no node answered HELLO at tcp://127.0.0.1:{port}" in err


def test_readme_using_a_node_example_runs_as_written(node: NodeThread) -> None:
    import contextlib
    import io

    from tests.test_readme import python_blocks

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Using a node", 1)[1].split("\n## ", 1)[0]
    (block,) = python_blocks(section)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block.replace("tcp://127.0.0.1:5555", node.endpoint), "README", "exec"),
             {"__name__": "readme_example"})
    assert out.getvalue().splitlines() == ["sensors/k/temp b'21.5'", "5"]
