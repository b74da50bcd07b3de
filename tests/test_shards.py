"""Delivery shards (macula.shards): real shard processes, a real node, real ZeroMQ sockets.

The shard-kill tests SIGKILL a shard process of a running node (NodeThread) and check what a
client sees: its subscriptions and registrations still work once the shard is back, an
unacknowledged QoS 1 message is delivered again (same ``did``), a QoS 1 message that was
with the dead shard reaches its subscriber and its publisher gets the PUBACK, and an
acknowledged message is never delivered again. Clients are hand-written MCP/1 DEALERs.
Waits have generous timeouts; nothing asserts on speed.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from macula.config import NodeConfig
from macula.control import protocol as p
from macula.control.broker import Limits
from macula.node import NodeThread
from macula.shards.worker import Shard
from tests.models.trie_model import matches
from tests.test_control_node import Raw as _RawBase
from tests.test_control_node import is_

SIG = p.SIGNATURE


class Raw(_RawBase):
    """The control-plane tests' hand-written MCP/1 client, plus what the shard tests need."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str) -> None:
        super().__init__(ctx, endpoint)
        self.sid = 0

    def drain(self, seconds: float) -> list[Any]:
        """Everything received within ``seconds``."""
        out, self.backlog = self.backlog, []
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            got = self.recv(left)
            if got:
                out += got
        return out

    def hello(self) -> Raw:  # type: ignore[override]
        self.sid = super().hello().session_id
        return self

    def subscribe(self, flt: str, qos: int = 0) -> int:
        self.send([10, 1, flt, qos])
        return int(self.until(is_(p.Suback))[-1].sub_id)


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    c: zmq.Context[Any] = zmq.Context()
    yield c
    c.destroy(linger=0)


def _node(shards: int = 2, metrics: bool = False, **limits: Any) -> NodeThread:
    cfg = NodeConfig(mesh_port=-1, endpoints=["tcp://127.0.0.1:0"],
                     metrics_port=0 if metrics else -1,
                     tick_interval=0.02, shards=shards, limits=Limits(**limits))
    return NodeThread(cfg).start()


def _clients(ctx: zmq.Context[Any], n: NodeThread, count: int) -> list[Raw]:
    return [Raw(ctx, n.endpoint).hello() for _ in range(count)]


def _kill_shard(n: NodeThread, index: int, sig: int = signal.SIGKILL) -> int:
    pid = int(n.stats()["shards"][index]["pid"])
    os.kill(pid, sig)
    return pid


def _wait_restarted(n: NodeThread, index: int, old_pid: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        sh = n.stats()["shards"][index]
        if sh["up"] and sh["pid"] != old_pid and sh["restarts_total"] >= 1:
            return
        time.sleep(0.02)
    raise AssertionError(f"shard {index} was not restarted: {n.stats()['shards']}")


def _wait_subscriptions(n: NodeThread, want: list[int], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while [sh["subscriptions"] for sh in n.stats()["shards"]] != want:
        assert time.monotonic() < end, n.stats()["shards"]
        time.sleep(0.02)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as fh:  # a zombie not yet reaped counts as gone
        return fh.read().split(") ")[1][0] == "Z"


def test_shard_kill_restores_subscriptions_and_registrations(ctx: zmq.Context[Any]) -> None:
    with _node(shards=2) as n:
        subs = _clients(ctx, n, 4)  # session ids alternate between the two shards
        pub, caller = _clients(ctx, n, 2)
        assert {s.sid % 2 for s in subs} == {0, 1}
        ids = {s.sid: (s.subscribe("k/+"), s.subscribe("k/#")) for s in subs}
        prov = next(s for s in subs if s.sid % 2 == 0)
        prov.send([20, 2, "echo"])
        reg_id = prov.until(is_(p.Registered))[-1].reg_id
        _wait_subscriptions(n, [4, 4])  # the shards' figures come with their replies

        old = _kill_shard(n, 0)
        _wait_restarted(n, 0, old)
        _wait_subscriptions(n, [4, 4])  # given back to the new process

        pub.send([14, "k/x", b"after"])
        for s in subs:  # every session, on both shards, gets one EVENT per subscription
            got = [e for e in s.until(is_(p.Event)) if isinstance(e, p.Event)]
            if len(got) < 2:
                got += [e for e in s.until(is_(p.Event)) if isinstance(e, p.Event)]
            assert sorted(e.sub_id for e in got) == sorted(ids[s.sid])
            assert all(e.payload == b"after" for e in got)
        caller.send([24, 3, "echo", [1, 2], 10_000])  # the provider's registration stands
        inv = prov.until(is_(p.Invoke))[-1]
        assert inv.reg_id == reg_id
        prov.send([27, inv.inv_id, "ok"])
        res = caller.until(is_(p.Result))[-1]
        assert msgspec.msgpack.decode(res.result) == "ok"
        stats = n.stats()
        assert stats["subscriptions"] == 8 and stats["sessions"] == 6
        assert [sh["restarts_total"] for sh in stats["shards"]] == [1, 0]


def test_qos1_redelivered_after_shard_kill_and_never_after_ack(ctx: zmq.Context[Any]) -> None:
    with _node(shards=2, ack_timeout=0.5) as n:
        clients = _clients(ctx, n, 3)
        sub = next(c for c in clients if c.sid % 2 == 1)
        pub = next(c for c in clients if c is not sub)
        sub.subscribe("q/#", qos=1)
        index = sub.sid % 2

        pub.send([14, "q/1", b"acked", 1, 1])
        first = sub.until(is_(p.Event))[-1]
        assert (first.payload, first.qos) == (b"acked", 1)
        sub.send([17, first.did])
        assert pub.until(is_(p.Puback))[-1] == p.Puback(1, 0)
        pub.send([14, "q/2", b"unacked", 1, 2])
        second = sub.until(is_(p.Event))[-1]
        assert second.payload == b"unacked"
        assert pub.until(is_(p.Puback))[-1] == p.Puback(2, 0)

        # a QoS 1 message goes to the shard while it is stopped, then the shard is killed:
        # the restarted shard must be given it again
        pid = _kill_shard(n, index, signal.SIGSTOP)
        pub.send([14, "q/3", b"with the dead shard", 1, 3])
        pub.send([30, 4])
        pub.until(is_(p.StatsReply))  # the node has handed it to the (stopped) shard
        os.kill(pid, signal.SIGKILL)
        _wait_restarted(n, index, pid)

        assert pub.until(is_(p.Puback), timeout=15)[-1] == p.Puback(3, 0)
        seen = sub.drain(2.0)  # four ack timeouts
        events = [e for e in seen if isinstance(e, p.Event)]
        third = [e for e in events if e.payload == b"with the dead shard"]
        assert third and third[0].qos == 1
        assert any(e.did == second.did and e.payload == b"unacked" for e in events)
        assert all(e.did != first.did and e.payload != b"acked" for e in events)
        for did in {e.did for e in events}:
            sub.send([17, did])
        assert all(e.did != first.did for e in sub.drain(1.0) if isinstance(e, p.Event))
        sub.send([30, 5])
        stats = sub.until(is_(p.StatsReply))[-1].stats
        assert stats["inflight"] == 0 and stats["acks_total"] >= 3


def test_per_shard_metrics_and_stats(ctx: zmq.Context[Any]) -> None:
    with _node(shards=2, metrics=True) as n:
        subs = _clients(ctx, n, 4)
        for s in subs:
            s.subscribe("m/+")
            s.subscribe("m/#")
        pub = _clients(ctx, n, 1)[0]
        pub.send(*[[14, "m/a", bytes([i])] for i in range(5)])
        for s in subs:
            got: list[Any] = []
            while len(got) < 10:
                got += [e for e in s.until(is_(p.Event)) if isinstance(e, p.Event)]
        shards = n.stats()["shards"]
        assert [sh["messages_total"] for sh in shards] == [5, 5]  # every shard sees each
        assert [sh["delivered_total"] for sh in shards] == [20, 20]
        assert [sh["matched_total"] for sh in shards] == [20, 20]
        assert all(sh["busy_seconds_total"] > 0 and sh["queue_depth"] == 0 for sh in shards)
        port = n.call(lambda nd: nd.metrics_port)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        lines = text.decode().splitlines()
        assert 'macula_shard_up{shard="0"} 1.0' in lines
        assert 'macula_shard_restarts_total{shard="1"} 0.0' in lines
        assert 'macula_shard_delivered_total{shard="1"} 20.0' in lines
        assert 'macula_shard_matched_total{shard="0"} 20.0' in lines
        assert 'macula_shard_queue_depth{shard="1"} 0.0' in lines
        assert 'macula_shard_subscriptions{shard="0"} 4.0' in lines
        assert any(x.startswith('macula_shard_busy_seconds_total{shard="1"}') for x in lines)
        assert "macula_messages_out_total 40.0" in lines


def test_operations_and_messages_keep_their_order(ctx: zmq.Context[Any]) -> None:
    with _node(shards=2) as n:
        a, b = _clients(ctx, n, 2)
        # subscribe and publish in one body: the subscription is in place first
        a.send([10, 1, "o/x"], [14, "o/x", b"1"], [12, 2, "o/x"], [14, "o/x", b"2"],
               [10, 3, "o/x", 0], [14, "o/x", b"3"], [30, 4])
        got = a.until(is_(p.StatsReply))
        got += a.drain(0.5)
        assert [e.payload for e in got if isinstance(e, p.Event)] == [b"1", b"3"]
        # a session that ends takes its subscriptions with it, in its shard too
        b.subscribe("o/#")
        b.send([6, 0, ""])
        b.until(is_(p.Bye))
        end = time.monotonic() + 10
        while sum(sh["subscriptions"] for sh in n.stats()["shards"]) != 1:
            assert time.monotonic() < end, n.stats()["shards"]
            time.sleep(0.02)


def test_shards_zero_matches_in_the_node(ctx: zmq.Context[Any]) -> None:
    with _node(shards=0) as n:
        assert n.call(lambda nd: nd.shards) is None
        a, pub = _clients(ctx, n, 2)
        a.subscribe("z/#")
        pub.send([14, "z/1", b"here"])
        assert a.until(is_(p.Event))[-1].payload == b"here"
        assert "shards" not in n.stats()


def test_node_stop_ends_the_shard_processes() -> None:
    n = _node(shards=3)
    pids = [int(sh["pid"]) for sh in n.stats()["shards"]]
    assert len(set(pids)) == 3 and not any(_gone(pid) for pid in pids)
    n.stop()
    assert all(_gone(pid) for pid in pids)


def test_config_shards() -> None:
    assert NodeConfig.load(env={"MACULA_SHARDS": "3"}).shards == 3
    assert NodeConfig().shards == len(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match="shards: expected int"):
        NodeConfig.from_dict({"shards": "many"})
    cfg = NodeConfig(mesh_port=-1, endpoints=["tcp://127.0.0.1:0"],
                     metrics_port=-1, shards=-1)
    with pytest.raises(ValueError, match="shards must be >= 0"):
        NodeThread(cfg).start()


# -- the shard's state machine, without processes ------------------------------------------
def _events(chunks: list[tuple[int, int, bytes]]) -> dict[int, list[p.Event]]:
    out: dict[int, list[p.Event]] = {}
    for sid, count, body in chunks:  # whole bodies, array header included
        cmds = p.decode_node_body(body)
        assert len(cmds) == count and all(isinstance(c, p.Event) for c in cmds)
        out.setdefault(sid, []).extend(c for c in cmds if isinstance(c, p.Event))
    return out


def test_shard_builds_events_and_shares_filters() -> None:
    sh = Shard(max_batch=3)
    tail = p.encode(("a/b", b"pay", False))[1:]
    for sid in (1, 2, 3):
        sh.subscribe(sid, "r", "a/+", 7, 0)
    sh.subscribe(1, "r", "a/#", 8, 1)
    sh.subscribe(2, "other", "a/+", 9, 0)  # another realm sees nothing of "r"
    assert len(sh.entries) == 3 and sh.subscriptions == 5
    sh.publish([("r", "a/b", tail, 0, 0)] * 2 + [("r", "a/b", tail, 1, 5)])
    chunks, q1 = sh.take()
    ev = _events(chunks)
    assert sorted(ev) == [1, 2, 3]
    assert [len(ev[s]) for s in (1, 2, 3)] == [5, 3, 3]  # sid 1: 3 + 2 at QoS 0
    assert max(k for _, k, _ in chunks) <= 3
    assert {(e.sub_id, e.qos, e.did, e.topic, e.payload) for e in ev[2]} == {
        (7, 0, 0, "a/b", b"pay")}
    assert q1 == [(5, 4, [1, 8])]  # 4 matches, one to deliver at QoS 1 (by the node)
    assert sh.take() == ([], [])
    sh.unsubscribe(1, 8)
    sh.drop_session(2)
    sh.drop_session(99)
    sh.unsubscribe(3, 12345)
    assert sh.subscriptions == 2 and len(sh.entries) == 1 and "a/#" not in sh.tries["r"]
    sh.subscribe(3, "r", "a/+", 7, 1)  # same sub_id: only the QoS changes
    assert sh.subscriptions == 2
    sh.publish([("r", "a/b", tail, 1, 6)])
    chunks, q1 = sh.take()
    assert sorted(_events(chunks)) == [1] and q1 == [(6, 2, [3, 7])]


_FILTERS = ["a/b", "a/+", "a/#", "+/b", "#", "c/+", "+/+"]
_TOPICS = ["a/b", "a/c", "c/b", "c/d", "a"]


@settings(max_examples=60)
@given(
    subs=st.lists(st.tuples(st.integers(1, 4), st.sampled_from(_FILTERS), st.integers(0, 1)),
                  max_size=12),
    rounds=st.lists(st.lists(st.tuples(st.sampled_from(_TOPICS), st.integers(0, 1)),
                             min_size=1, max_size=6), min_size=1, max_size=4),
    unsub=st.lists(st.integers(0, 11), max_size=3),
    max_batch=st.integers(1, 5),
    plan_at=st.sampled_from([1, 3, 256]),
)
def test_shard_matches_a_naive_model(
    subs: list[tuple[int, str, int]], rounds: list[list[tuple[str, int]]], unsub: list[int],
    max_batch: int, plan_at: int,
) -> None:
    """Whatever the path (direct, plan made, plan reused, QoS 1, chunks split at max_batch),
    each session gets one EVENT per matching subscription and message, in message order."""
    sh = Shard(max_batch=max_batch, plan_at=plan_at)
    live: dict[tuple[int, int], tuple[str, int]] = {}
    for i, (sid, flt, qos) in enumerate(subs):
        sh.subscribe(sid, "r", flt, i + 1, qos)
        live[(sid, i + 1)] = (flt, qos)
    seq = 0
    for n, batch in enumerate(rounds):
        if n == 1:  # change the subscriptions between rounds: plans must follow
            for j in unsub:
                key = next((k for k in sorted(live) if k[1] == j + 1), None)
                if key is not None:
                    sh.unsubscribe(*key)
                    del live[key]
        pubs = []
        for m, (topic, qos) in enumerate(batch):
            seq += qos
            pubs.append(("r", topic, p.encode((topic, bytes([m]), False))[1:], qos,
                         seq if qos else 0))
        sh.publish(pubs)
        chunks, q1 = sh.take()
        assert all(k <= max_batch for _, k, _ in chunks)
        got = {sid: [(e.payload[0], e.sub_id) for e in evs]
               for sid, evs in _events(chunks).items()}
        want: dict[int, list[tuple[int, int]]] = {}
        want_q1 = []
        for m, (topic, qos) in enumerate(batch):
            hits = sorted(k for k, (flt, _) in live.items() if matches(flt, topic))
            for sid, sub_id in hits:
                if not (qos and live[(sid, sub_id)][1]):
                    want.setdefault(sid, []).append((m, sub_id))
            if qos:
                want_q1.append((len(hits), sorted((sid, sub_id) for sid, sub_id in hits
                                                  if live[(sid, sub_id)][1])))
        # per session: the messages in order, each with one EVENT per matching subscription
        for events in got.values():
            assert [m for m, _ in events] == sorted(m for m, _ in events)
        assert {sid: sorted(v) for sid, v in got.items()} == want
        assert [(m, sorted(zip(t[::2], t[1::2], strict=True))) for _, m, t in q1] == want_q1


