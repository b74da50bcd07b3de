"""A real node (macula.node) driven over real ZeroMQ sockets by raw pyzmq DEALER clients.

Each client below speaks MCP/1 from control/SPEC.md by hand (msgspec + pyzmq), as a client in
another language would. Waits have generous timeouts; nothing asserts on speed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
import zmq.auth

from macula.config import NodeConfig
from macula.control import protocol as p
from macula.control.broker import Limits
from macula.control.protocol import Err
from macula.node import NodeThread

SIG = p.SIGNATURE


class Raw:
    """A hand-written MCP/1 client on a DEALER socket."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, **opts: Any) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        for k, v in opts.items():
            self.sock.setsockopt(getattr(zmq, k), v)
        self.sock.connect(endpoint)
        self.backlog: list[Any] = []

    def send(self, *cmds: list[Any]) -> None:
        self.sock.send_multipart([SIG, p.encode(list(cmds))])

    def recv(self, timeout: float = 5.0) -> list[Any] | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        frames = self.sock.recv_multipart()
        assert frames[0] == SIG and len(frames) == 2
        return list(p.decode_node_body(frames[1]))

    def until(self, pred: Callable[[Any], bool], timeout: float = 10.0) -> list[Any]:
        """Commands received until one satisfies ``pred`` (included); fails on timeout."""
        seen: list[Any] = []
        while True:
            if not self.backlog:
                got = self.recv(timeout)
                assert got is not None, f"timed out; received so far: {seen}"
                self.backlog = got
            while self.backlog:
                c = self.backlog.pop(0)
                seen.append(c)
                if pred(c):
                    return seen

    def events(self, n: int) -> list[p.Event]:
        out: list[p.Event] = []
        while len(out) < n:
            out += [c for c in self.until(is_(p.Event)) if isinstance(c, p.Event)]
        return out

    def hello(self, realm: str = "r", hb: int = 60_000, secret: str = "") -> p.Welcome:
        self.send([1, 1, realm, "raw", secret, hb])
        w = self.until(lambda c: True)[-1]
        assert isinstance(w, p.Welcome), w
        return w

    def close(self) -> None:
        self.sock.close(0)


def is_(tp: type[Any], **fields: Any) -> Callable[[Any], bool]:
    return lambda c: isinstance(c, tp) and all(getattr(c, k) == v for k, v in fields.items())


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    c: zmq.Context[Any] = zmq.Context()
    yield c
    c.destroy(linger=0)


def _node(**limits: Any) -> NodeThread:
    cfg = NodeConfig(
        endpoints=["tcp://127.0.0.1:0"], metrics_port=0, tick_interval=0.02, mesh_port=-1,
        limits=Limits(**limits),
    )
    return NodeThread(cfg).start()


@pytest.fixture
def node() -> Iterator[NodeThread]:
    n = _node(ack_timeout=0.2)
    yield n
    n.stop()


def test_pubsub_qos1_redelivery_and_puback(node: NodeThread, ctx: zmq.Context[Any]) -> None:
    sub, pub = Raw(ctx, node.endpoint), Raw(ctx, node.endpoint)
    sub.hello()
    pub.hello()
    sub.send([10, 1, "s/+", 1])
    sub.until(is_(p.Suback, rid=1))
    pub.send([14, "s/a", b"zero"], [14, "s/a", b"one", 1, 77])
    got = sub.until(is_(p.Event, qos=1))
    if not any(is_(p.Event, qos=0)(c) for c in got):
        got += sub.until(is_(p.Event, qos=0))
    # no order is promised across QoS levels (SPEC: ordering)
    assert sorted((e.topic, e.payload, e.qos) for e in got if isinstance(e, p.Event)) == [
        ("s/a", b"one", 1), ("s/a", b"zero", 0)]
    assert pub.until(is_(p.Puback)) == [p.Puback(77, 0)]
    did = next(e.did for e in got if is_(p.Event, qos=1)(e))
    again = sub.until(is_(p.Event, qos=1))[-1]  # not acked: redelivered with the same id
    assert again.did == did and again.payload == b"one"
    sub.send([17, did])
    sub.send([30, 2])
    stats = sub.until(is_(p.StatsReply))[-1].stats
    assert stats["redeliveries_total"] >= 1 and stats["acks_total"] == 1
    assert stats["inflight"] == 0


def test_shared_subscription_splits_and_retained_on_subscribe(
    node: NodeThread, ctx: zmq.Context[Any]
) -> None:
    a, b, pub = (Raw(ctx, node.endpoint) for _ in range(3))
    for c in (a, b, pub):
        c.hello()
    for c in (a, b):
        c.send([10, 1, "$share/w/jobs/#", 0])
        c.until(is_(p.Suback))
    pub.send(*[[14, "jobs/x", bytes([i])] for i in range(10)], [30, 9])
    pub.until(is_(p.StatsReply))
    got_a, got_b = a.events(5), b.events(5)
    assert not a.backlog and a.recv(0.2) is None and not b.backlog and b.recv(0.2) is None
    assert sorted(e.payload for e in got_a + got_b) == [bytes([i]) for i in range(10)]
    pub.send([14, "cfg/x", b"kept", 0, 0, True])
    late = Raw(ctx, node.endpoint)
    late.hello()
    late.send([10, 2, "cfg/#"])
    ev = late.until(is_(p.Event))[-1]
    assert (ev.topic, ev.payload, ev.retain) == ("cfg/x", b"kept", True)


def test_rpc_call_no_provider_and_provider_disconnect(
    node: NodeThread, ctx: zmq.Context[Any]
) -> None:
    caller, prov = Raw(ctx, node.endpoint), Raw(ctx, node.endpoint)
    caller.hello()
    prov.hello()  # heartbeats of 60 s: only the disconnect can explain a quick PROVIDER_GONE
    caller.send([24, 1, "nobody", [1]])
    assert caller.until(is_(p.Error)) == [p.Error(1, int(Err.NO_PROVIDER),
                                                  "no provider for 'nobody'")]
    prov.send([20, 1, "math.add"])
    prov.until(is_(p.Registered))
    caller.send([24, 2, "math.add", [2, 3], 30_000])
    inv = prov.until(is_(p.Invoke))[-1]
    assert msgspec.msgpack.decode(inv.args) == [2, 3]
    prov.send([27, inv.inv_id, 5])
    res = caller.until(is_(p.Result))[-1]
    assert res.rid == 2 and msgspec.msgpack.decode(res.result) == 5
    caller.send([24, 3, "math.add", [1, 1], 30_000])
    prov.until(is_(p.Invoke))
    prov.close()  # gone mid-call, no BYE
    err = caller.until(is_(p.Error), timeout=15)[-1]
    assert (err.ref, err.code) == (3, Err.PROVIDER_GONE)


def test_realms_do_not_see_each_other(node: NodeThread, ctx: zmq.Context[Any]) -> None:
    a, other, pub = (Raw(ctx, node.endpoint) for _ in range(3))
    a.hello("one")
    other.hello("two")
    pub.hello("one")
    a.send([10, 1, "#"])
    a.until(is_(p.Suback))
    other.send([14, "x", b"from two"])
    pub.send([14, "x", b"from one"])
    ev = a.until(is_(p.Event))[-1]
    assert ev.payload == b"from one"
    assert not a.backlog and a.recv(0.3) is None


def test_heartbeat_loss_drops_the_session(ctx: zmq.Context[Any]) -> None:
    with _node(liveness=2) as n:
        c = Raw(ctx, n.endpoint)
        c.hello(hb=100)
        c.send([10, 1, "a"], [20, 2, "p"])
        c.until(is_(p.Registered))
        bye = c.until(is_(p.Bye), timeout=10)[-1]  # silent: dropped after 2 x 100 ms
        assert bye.code == Err.HEARTBEAT_TIMEOUT
        stats = n.stats()
        assert stats["sessions"] == 0 and stats["subscriptions"] == 0
        assert stats["registrations"] == 0
        assert stats["sessions_closed_total"] == {"HEARTBEAT_TIMEOUT": 1}


def test_session_limit(ctx: zmq.Context[Any]) -> None:
    with _node(max_sessions=2) as n:
        first, second = Raw(ctx, n.endpoint), Raw(ctx, n.endpoint)
        first.hello()
        second.hello()
        third = Raw(ctx, n.endpoint)
        third.send([1, 4, "r", "third"])
        err = third.until(is_(p.Error))[-1]
        assert (err.ref, err.code) == (4, Err.SESSION_LIMIT)


def test_slow_consumer_drops_are_counted_and_stuck_session_disconnected(
    ctx: zmq.Context[Any],
) -> None:
    cfg = NodeConfig(mesh_port=-1, endpoints=["tcp://127.0.0.1:0"],
                     metrics_port=-1, tick_interval=0.02,
                     sndhwm=4, limits=Limits(max_queue_qos0=50, max_batch=4, stuck_timeout=0.5))
    with NodeThread(cfg) as n:
        slow = Raw(ctx, n.endpoint, RCVHWM=4, RCVBUF=4096)
        slow.hello()
        slow.send([10, 1, "big"])
        slow.until(is_(p.Suback))
        pub = Raw(ctx, n.endpoint)
        pub.hello()
        payload = b"x" * 60_000
        for _ in range(40):  # 40 x 25 x 60 kB = 60 MB never read by `slow`
            pub.send(*[[14, "big", payload]] * 25)
        pub.send([30, 1])
        pub.until(is_(p.StatsReply), timeout=30)
        pub.send([4, 1])  # keep the publisher alive while the deadline passes
        give_up = time.monotonic() + 20
        while time.monotonic() < give_up:
            st = n.stats()
            if st["sessions_closed_total"].get("SLOW_CONSUMER"):
                break
            # keep `slow` blocked: without new traffic, what is left in its queue can fit in
            # the socket buffers (kernel + ZeroMQ pipes) and it would no longer be stuck
            pub.send([4, 1], [14, "big", payload])
            time.sleep(0.05)
        assert st["sessions_closed_total"] == {"SLOW_CONSUMER": 1}, st
        assert st["drops_total"]["qos0_queue_full"] > 0
        assert st["sessions"] == 1  # the publisher is still served
        pub.send([4, 9])
        assert pub.until(is_(p.Pong, token=9))


BAD_INPUTS: list[tuple[str, list[bytes], Err]] = [
    ("garbage single frame", [b"\x00\xffgarbage"], Err.MALFORMED),
    ("three frames", [SIG, b"\x90", b"more"], Err.MALFORMED),
    ("wrong signature", [b"AMQP", b"\x90"], Err.BAD_SIGNATURE),
    ("wrong version", [b"MCP\x07", b"\x90"], Err.BAD_VERSION),
    ("invalid msgpack", [SIG, b"\xc1\xc1"], Err.INVALID_MSGPACK),
    ("str not UTF-8", [SIG, b"\x91\x93\x0e\xa1\xff\xc4\x00"], Err.INVALID_MSGPACK),
    ("body not an array", [SIG, p.encode({"a": 1})], Err.MALFORMED),
    ("unknown command", [SIG, p.encode([[250, 1]])], Err.UNKNOWN_COMMAND),
    ("missing fields", [SIG, p.encode([[10, 1]])], Err.MISSING_FIELD),
    ("wrong types", [SIG, p.encode([[10, "one", 2]])], Err.WRONG_TYPE),
    ("invalid topic", [SIG, p.encode([[14, "a/#", b"x"]])], Err.INVALID_TOPIC),
    ("invalid filter", [SIG, p.encode([[10, 1, "a/#/b"]])], Err.INVALID_FILTER),
    ("oversized payload", [SIG, p.encode([[14, "a", b"x" * 2000]])], Err.PAYLOAD_TOO_LARGE),
]


def test_bad_input_from_raw_sockets(ctx: zmq.Context[Any]) -> None:
    with _node(max_payload=1000) as n:
        good_sub, good_pub = Raw(ctx, n.endpoint), Raw(ctx, n.endpoint)
        good_sub.hello()
        good_pub.hello()
        good_sub.send([10, 1, "ok"])
        good_sub.until(is_(p.Suback))
        # before HELLO: any command is refused
        fresh = Raw(ctx, n.endpoint)
        fresh.send([14, "a", b"x"])
        assert fresh.until(is_(p.Error))[-1].code == Err.NOT_WELCOMED
        for i, (name, frames, code) in enumerate(BAD_INPUTS):
            bad = Raw(ctx, n.endpoint)
            bad.hello()
            before = n.stats()["errors_total"].get(code.name, 0)
            bad.sock.send_multipart(frames)
            err = bad.until(is_(p.Error))[-1]
            assert err.code == code, (name, err)
            assert n.stats()["errors_total"][code.name] == before + 1, name
            good_pub.send([14, "ok", bytes([i])])  # everyone else still served
            assert good_sub.until(is_(p.Event))[-1].payload == bytes([i]), name
            bad.send([4, i])  # and the offender's session too
            assert bad.until(is_(p.Pong))[-1].token == i, name
        assert n.stats()["errors_total"]["NOT_WELCOMED"] == 1


def test_metrics_endpoints(node: NodeThread, ctx: zmq.Context[Any]) -> None:
    c = Raw(ctx, node.endpoint)
    c.hello()
    c.send([14, "m", b"x"], [30, 1])
    c.until(is_(p.StatsReply))
    port = node.call(lambda nd: nd.metrics_port)
    base = f"http://127.0.0.1:{port}"
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    assert "macula_sessions 1.0" in text
    assert "macula_messages_in_total 1.0" in text
    assert 'macula_drops_total{reason="qos0_queue_full"} 0.0' in text
    assert urllib.request.urlopen(base + "/healthz", timeout=10).status == 200
    assert urllib.request.urlopen(base + "/readyz", timeout=10).read() == b"ready\n"
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(base + "/nope", timeout=10)
    assert exc.value.code == 404


def test_ipc_endpoint_and_realm_secret(tmp_path: Path, ctx: zmq.Context[Any]) -> None:
    ep = f"ipc://{tmp_path}/node.sock"
    cfg = NodeConfig(mesh_port=-1, endpoints=[ep], metrics_port=-1, realms={"vault": "s3"},
                     allow_any_realm=False)
    with NodeThread(cfg) as n:
        assert n.endpoint == ep
        c = Raw(ctx, ep)
        c.send([1, 1, "vault", "c", "wrong"])
        assert c.until(is_(p.Error))[-1].code == Err.BAD_SECRET
        assert c.hello("vault", secret="s3").session_id >= 1


def test_curve_allow_list(tmp_path: Path, ctx: zmq.Context[Any]) -> None:
    keys = tmp_path / "keys"
    allowed = tmp_path / "allowed"
    keys.mkdir()
    allowed.mkdir()
    _, server_secret = zmq.auth.create_certificates(str(keys), "server")
    zmq.auth.create_certificates(str(keys), "client")
    zmq.auth.create_certificates(str(keys), "stranger")
    (allowed / "client.key").write_bytes((keys / "client.key").read_bytes())
    cfg = NodeConfig(mesh_port=-1, endpoints=["tcp://127.0.0.1:0"],
                     metrics_port=-1,
                     curve_secret_key_file=server_secret, curve_allow_dir=str(allowed))
    server_public, _ = zmq.auth.load_certificate(str(keys / "server.key"))

    def client(name: str) -> Raw:
        pub, sec = zmq.auth.load_certificate(str(keys / f"{name}.key_secret"))
        assert sec is not None
        return Raw(ctx, n.endpoint, CURVE_SERVERKEY=server_public, CURVE_PUBLICKEY=pub,
                   CURVE_SECRETKEY=sec)

    with NodeThread(cfg) as n:
        good = client("client")
        assert good.hello().session_id >= 1
        stranger = client("stranger")
        stranger.send([1, 1, "r", "x"])
        assert stranger.recv(1.0) is None  # the handshake is refused: nothing gets through
        assert n.stats()["sessions"] == 1


def _start_cli(*extra: str) -> tuple[subprocess.Popen[str], str]:
    env = dict(os.environ, MACULA_ENDPOINTS="tcp://127.0.0.1:0", MACULA_METRICS_PORT="-1",
               MACULA_MESH_PORT="0")
    proc = subprocess.Popen([sys.executable, "-m", "macula.cli", "node", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("macula node ready "), line + proc.stderr.read()  # type: ignore[union-attr]
    return proc, line.split("endpoints=")[1].split()[0]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_node_stops_cleanly_on_signal(sig: signal.Signals, ctx: zmq.Context[Any]) -> None:
    proc, endpoint = _start_cli()
    try:
        c = Raw(ctx, endpoint)
        c.hello()
        proc.send_signal(sig)
        bye = c.until(is_(p.Bye), timeout=20)[-1]
        assert bye.code == Err.SHUTDOWN
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "macula node stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_node_refuses_bad_config(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text('endpoints = ["tcp://127.0.0.1:0"]\nmax_sesions = 3\n')
    proc = subprocess.run([sys.executable, "-m", "macula.cli", "node", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "unknown configuration key 'max_sesions'" in proc.stderr


def test_cli_node_refuses_a_wildcard_mesh_host_without_an_advertised_address() -> None:
    env = dict(os.environ, MACULA_ENDPOINTS="tcp://127.0.0.1:0", MACULA_METRICS_PORT="-1")
    proc = subprocess.run([sys.executable, "-m", "macula", "node", "--mesh-host", "0.0.0.0",
                           "--shards", "0"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("macula node: bad configuration: mesh_host '0.0.0.0' listens "
                                   "on every address: set mesh_advertise to the host:port "
                                   "other nodes dial")


def test_cli_node_says_why_it_cannot_start_when_its_mesh_port_is_taken() -> None:
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    env = dict(os.environ, MACULA_ENDPOINTS="tcp://127.0.0.1:0", MACULA_METRICS_PORT="-1")
    try:
        proc = subprocess.run([sys.executable, "-m", "macula", "node", "--mesh-port", str(port),
                               "--shards", "0"], capture_output=True, text=True, timeout=60,
                              env=env)
    finally:
        taken.close()
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"macula node: cannot start: [Errno 98] mesh endpoint "
                                   f"127.0.0.1:{port}: Address already in use")


def test_config_file_then_environment(tmp_path: Path) -> None:
    f = tmp_path / "node.toml"
    f.write_text(
        'endpoints = ["tcp://127.0.0.1:7000"]\nmetrics_port = 9999\nallow_any_realm = false\n'
        '[realms]\nprod = "pw"\n[limits]\nmax_sessions = 5\nack_timeout = 2\n'
    )
    cfg = NodeConfig.load(f, env={"MACULA_METRICS_PORT": "0", "MACULA_MAX_INFLIGHT": "7"})
    assert cfg.endpoints == ["tcp://127.0.0.1:7000"] and cfg.metrics_port == 0
    assert cfg.realms == {"prod": "pw"} and cfg.allow_any_realm is False
    assert (cfg.limits.max_sessions, cfg.limits.max_inflight) == (5, 7)
    assert cfg.limits.ack_timeout == 2.0
    with pytest.raises(ValueError, match=r"limits\.max_sessions: expected int"):
        NodeConfig.from_dict({"limits": {"max_sessions": "many"}})
    with pytest.raises(ValueError, match="MACULA_LIVENESS: expected int"):
        NodeConfig.load(env={"MACULA_LIVENESS": "x"})
    env_cfg = NodeConfig.load(env={"MACULA_REALMS": "a=1,b=", "MACULA_ALLOW_ANY_REALM": "no"})
    assert env_cfg.realms == {"a": "1", "b": ""} and env_cfg.allow_any_realm is False
