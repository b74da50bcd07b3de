"""The sans-IO broker (macula.control.broker) driven directly, with a fake clock.

Every message goes through the real protocol encoder and the broker's real decoder; every
answer is decoded as a client would (``protocol.decode_node_body``). No sockets, no sleeps.
"""

from __future__ import annotations

import random
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from macula.control import protocol as p
from macula.control.broker import Broker, Limits
from macula.control.protocol import Code, Err

E = p.Event


class Harness:
    def __init__(self, limits: Limits | None = None, **kw: Any) -> None:
        self.b = Broker(limits or Limits(), rng=random.Random(7), **kw)
        self.now = 0.0

    def send(self, ident: bytes, *cmds: list[Any], now: float | None = None) -> None:
        if now is not None:
            self.now = now
        self.b.receive(ident, p.encode_message(list(cmds)), self.now)

    def raw(self, ident: bytes, frames: list[bytes]) -> None:
        self.b.receive(ident, frames, self.now)

    def tick(self, now: float) -> None:
        self.now = now
        self.b.tick(now)

    def out(self) -> dict[bytes, list[Any]]:
        res: dict[bytes, list[Any]] = {}
        for ident, body in self.b.take_direct():
            res.setdefault(ident, []).extend(p.decode_node_body(body))
        for s in self.b.take_dirty():
            while (body := self.b.next_body(s)) is not None:
                res.setdefault(s.identity, []).extend(p.decode_node_body(body))
        return res

    def hello(self, ident: bytes, realm: str = "r", secret: str = "", hb: int = 0) -> p.Welcome:
        self.send(ident, [1, 1, realm, ident.decode(), secret, hb])
        got = self.out()[ident]
        assert isinstance(got[0], p.Welcome), got
        return got[0]

    def sub(self, ident: bytes, flt: str, qos: int = 0) -> int:
        self.send(ident, [10, 5, flt, qos])
        got = self.out()[ident]
        assert isinstance(got[0], p.Suback), got
        return got[0].sub_id


def errors(cmds: list[Any]) -> list[tuple[int, int]]:
    return [(c.ref, c.code) for c in cmds if isinstance(c, p.Error)]


def events(cmds: list[Any]) -> list[p.Event]:
    return [c for c in cmds if isinstance(c, p.Event)]


# --- sessions ---------------------------------------------------------------------------


def test_hello_welcomes_with_limits_and_commands_before_hello_are_refused() -> None:
    h = Harness()
    h.send(b"x", [10, 3, "a", 0])
    assert errors(h.out()[b"x"]) == [(3, Err.NOT_WELCOMED)]
    w = h.hello(b"A", hb=1000)
    assert w.session_id == 1 and w.limits["heartbeat_ms"] == 1000
    assert w.limits["max_payload"] == Limits().max_payload
    h.send(b"A", [1, 9, "r", "again"])
    assert errors(h.out()[b"A"]) == [(9, Err.ALREADY_WELCOMED)]
    assert h.b.errors["NOT_WELCOMED"] == 1 and h.b.errors["ALREADY_WELCOMED"] == 1


def test_welcome_carries_the_node_incarnation_the_same_for_every_session() -> None:
    h, other = Harness(), Harness()
    a, b = h.hello(b"A"), h.hello(b"B")
    assert a.incarnation == b.incarnation == h.b.incarnation
    assert 0 < a.incarnation < 2**53
    assert other.hello(b"A").incarnation != a.incarnation  # a restarted node: a new one


def test_hello_and_commands_in_one_batch() -> None:
    h = Harness()
    h.send(b"A", [1, 1, "r", "a"], [10, 2, "t", 0], [14, "t", b"x"])
    got = h.out()[b"A"]
    assert [type(c) for c in got] == [p.Welcome, p.Suback, p.Event]


def test_realm_secret_unknown_realm_and_session_limit() -> None:
    h = Harness(Limits(max_sessions=2), realms={"sec": "pw"}, allow_any_realm=False)
    h.send(b"A", [1, 1, "sec", "a", "nope"])
    assert errors(h.out()[b"A"]) == [(1, Err.BAD_SECRET)]
    h.send(b"A", [1, 2, "other", "a"])
    assert errors(h.out()[b"A"]) == [(2, Err.UNKNOWN_REALM)]
    h.hello(b"A", "sec", "pw")
    h.hello(b"B", "sec", "pw")
    h.send(b"C", [1, 3, "sec", "c", "pw"])
    assert errors(h.out()[b"C"]) == [(3, Err.SESSION_LIMIT)]
    assert len(h.b.sessions) == 2


def test_realms_are_isolated_for_topics_and_procedures() -> None:
    h = Harness()
    h.hello(b"A", "one")
    h.hello(b"B", "two")
    h.sub(b"A", "#")
    h.send(b"B", [20, 1, "proc"])
    h.out()
    h.send(b"B", [14, "t", b"x"])
    h.send(b"A", [24, 4, "proc"])
    got = h.out()
    assert b"B" not in got or not events(got[b"B"])
    assert errors(got[b"A"]) == [(4, Err.NO_PROVIDER)]
    assert not events(got[b"A"])


def test_heartbeat_liveness_drops_session_and_its_state() -> None:
    h = Harness(Limits(liveness=3))
    h.hello(b"A", hb=1000)
    h.hello(b"B", hb=1000)
    h.sub(b"A", "a/#")
    h.send(b"A", [20, 1, "p"])
    h.out()
    h.tick(2.9)
    h.send(b"B", [4, 7], now=2.9)
    assert h.out()[b"B"] == [p.Pong(7)]
    h.tick(3.5)  # A silent for 3.5 s > 3 heartbeats of 1 s; B spoke at 2.9
    assert set(h.b.sessions) == {b"B"}
    assert h.out()[b"A"] == [p.Bye(int(Err.HEARTBEAT_TIMEOUT), "no message for 3 heartbeats")]
    realm = h.b.realms["r"]
    assert len(realm.trie) == 0 and not realm.procedures
    assert h.b.closed_by == {"HEARTBEAT_TIMEOUT": 1}


def test_bye_closes_and_answers() -> None:
    h = Harness()
    h.hello(b"A")
    h.sub(b"A", "x")
    h.send(b"A", [6])
    assert h.out()[b"A"] == [p.Bye(int(Err.NORMAL), "bye")]
    assert not h.b.sessions and len(h.b.realms["r"].trie) == 0


# --- pub/sub ----------------------------------------------------------------------------


def test_publish_matches_wildcards_and_each_subscription_gets_its_event() -> None:
    h = Harness()
    h.hello(b"A")
    h.hello(b"P")
    s1 = h.sub(b"A", "s/+/t")
    s2 = h.sub(b"A", "s/#")
    h.send(b"P", [14, "s/k/t", b"hot"], [14, "s/k/h", b"wet"], [14, "other", b"no"])
    got = events(h.out()[b"A"])
    assert sorted((e.sub_id, e.topic) for e in got) == [(s1, "s/k/t"), (s2, "s/k/h"), (s2, "s/k/t")]
    assert all(e.qos == 0 and e.did == 0 and not e.retain for e in got)
    h.send(b"A", [12, 8, "s/#"], [12, 9, "never"])
    assert h.out()[b"A"] == [p.Unsuback(8, True), p.Unsuback(9, False)]
    h.send(b"P", [14, "s/k/h", b"wet"])
    assert b"A" not in h.out()


def test_bad_values_get_precise_codes() -> None:
    h = Harness(Limits(max_payload=4, max_subscriptions=1))
    h.hello(b"A")
    h.send(b"A", [14, "a/+", b"x", 0, 3], [14, "a", b"12345", 0, 4], [14, "a", b"x", 2, 5],
           [14, "a", b"x", 1, 0], [10, 6, "a/#/b"], [10, 7, "a", 2], [10, 8, "$share//a"])
    assert errors(h.out()[b"A"]) == [
        (3, Err.INVALID_TOPIC), (4, Err.PAYLOAD_TOO_LARGE), (5, Err.BAD_VALUE),
        (0, Err.BAD_VALUE), (6, Err.INVALID_FILTER), (7, Err.BAD_VALUE),
        (8, Err.INVALID_FILTER),
    ]
    h.sub(b"A", "one")
    h.send(b"A", [10, 9, "two"])
    assert errors(h.out()[b"A"]) == [(9, Err.SUBSCRIPTION_LIMIT)]
    assert h.b.errors["BAD_VALUE"] == 3


def test_retained_store_delivery_delete_and_bound() -> None:
    h = Harness(Limits(max_retained=2))
    h.hello(b"P")
    h.send(b"P", [14, "r/a", b"1", 0, 0, True], [14, "r/b", b"2", 1, 1, True],
           [14, "r/c", b"3", 1, 2, True])
    assert h.out()[b"P"] == [p.Puback(1, 16), p.Puback(2, 151)]
    assert h.b.drops["retained_full"] == 1
    h.hello(b"A")
    h.send(b"A", [10, 3, "r/+", 1])
    got = h.out()[b"A"]
    assert isinstance(got[0], p.Suback)
    ev = sorted(events(got), key=lambda e: e.topic)
    assert [(e.topic, e.payload, e.retain, e.qos) for e in ev] == [
        ("r/a", b"1", True, 0), ("r/b", b"2", True, 1)]
    h.send(b"P", [14, "r/a", b"", 0, 0, True])  # empty payload deletes (and is delivered)
    live = events(h.out()[b"A"])
    assert [(e.topic, e.payload, e.retain) for e in live] == [("r/a", b"", False)]
    h.hello(b"B")
    h.send(b"B", [10, 4, "r/#"], [10, 5, "$share/g/r/#"])
    assert [e.topic for e in events(h.out()[b"B"])] == ["r/b"]  # not for the shared one


def test_shared_subscription_round_robin_and_member_leaving() -> None:
    h = Harness()
    for m in (b"A", b"B", b"C", b"P"):
        h.hello(m)
    for m in (b"A", b"B", b"C"):
        h.sub(m, "$share/g/jobs/#", qos=1)
    h.send(b"P", *[[14, "jobs/x", bytes([i])] for i in range(6)])
    got = h.out()
    assert {m: len(events(got[m])) for m in (b"A", b"B", b"C")} == {b"A": 2, b"B": 2, b"C": 2}
    # QoS 1 in flight at C when C leaves goes to another member
    h.send(b"P", [14, "jobs/y", b"q", 1, 1], [14, "jobs/y", b"r", 1, 2],
           [14, "jobs/y", b"s", 1, 3])
    got = h.out()
    at_c = [e.payload for e in events(got[b"C"])]
    assert len(at_c) == 1
    h.send(b"C", [6])
    got = h.out()
    moved = events(got.get(b"A", [])) + events(got.get(b"B", []))
    assert [e.payload for e in moved] == at_c
    h.send(b"A", [6])
    h.send(b"B", [6])
    h.out()
    assert len(h.b.realms["r"].trie) == 0 and not h.b.realms["r"].groups
    h.send(b"P", [14, "jobs/z", b"", 1, 9])
    assert h.out()[b"P"] == [p.Puback(9, 16)]


def test_qos1_window_ack_redelivery_and_attempts() -> None:
    h = Harness(Limits(max_inflight=2, max_pending_qos1=1, ack_timeout=1.0, max_attempts=2))
    h.hello(b"A", hb=60_000)
    h.hello(b"P", hb=60_000)
    h.sub(b"A", "q", qos=1)
    h.send(b"P", *[[14, "q", bytes([i]), 1, i + 1] for i in range(4)])
    got = h.out()
    assert [x.reason for x in got[b"P"]] == [0, 0, 0, 151]  # 2 in flight, 1 pending, 1 refused
    first = events(got[b"A"])
    assert [(e.did, e.payload) for e in first] == [(1, b"\x00"), (2, b"\x01")]
    assert h.b.drops["qos1_queue_full"] == 1
    h.send(b"A", [17, 1])
    assert [(e.did, e.payload) for e in events(h.out()[b"A"])] == [(3, b"\x02")]
    h.tick(1.5)  # did 2 and 3 unacked past the timeout: sent again, same ids
    again = events(h.out()[b"A"])
    assert sorted(e.did for e in again) == [2, 3] and h.b.redeliveries == 2
    h.send(b"A", [17, 2], [17, 2])  # a repeated ack is counted, not answered
    assert b"A" not in h.out()
    assert h.b.errors["UNKNOWN_DELIVERY"] == 1
    h.tick(3.0)  # did 3 has had its 2 attempts
    assert b"A" not in h.out()
    assert h.b.drops["qos1_expired"] == 1 and not h.b.sessions[b"A"].inflight


def test_qos1_publisher_dedup_by_message_id() -> None:
    h = Harness()
    h.hello(b"A")
    h.hello(b"P")
    h.sub(b"A", "d", qos=1)
    h.send(b"P", [14, "d", b"x", 1, 42])
    h.send(b"P", [14, "d", b"x", 1, 42])
    got = h.out()
    assert got[b"P"] == [p.Puback(42, 0), p.Puback(42, 0)]
    assert len(events(got[b"A"])) == 1 and h.b.duplicates == 1


def test_qos0_queue_drops_oldest_and_counts() -> None:
    h = Harness(Limits(max_queue_qos0=3))
    h.hello(b"A")
    h.hello(b"P")
    h.sub(b"A", "t")
    h.send(b"P", *[[14, "t", bytes([i])] for i in range(5)])
    assert [e.payload for e in events(h.out()[b"A"])] == [b"\x02", b"\x03", b"\x04"]
    assert h.b.drops["qos0_queue_full"] == 2


def test_stalled_session_is_disconnected_after_stuck_timeout() -> None:
    h = Harness(Limits(stuck_timeout=2.0))
    h.hello(b"A", hb=60_000)
    h.hello(b"P", hb=60_000)
    h.sub(b"A", "t")
    h.send(b"P", [14, "t", b"x"])
    (s,) = [s for s in h.b.take_dirty() if s.identity == b"A"]
    body = h.b.next_body(s)
    assert body is not None
    h.b.stalled(s, body, 1.0)  # the driver's socket said EAGAIN
    h.tick(2.5)
    assert b"A" in h.b.sessions
    assert h.b.take_dirty() == [s] and h.b.next_body(s) == body  # handed back first
    h.b.stalled(s, body, 2.5)
    h.tick(3.1)
    assert b"A" not in h.b.sessions and h.b.closed_by == {"SLOW_CONSUMER": 1}
    assert h.out()[b"A"][-1].code == Err.SLOW_CONSUMER


def test_outgoing_bodies_hold_at_most_max_batch_commands() -> None:
    h = Harness(Limits(max_batch=10))
    h.hello(b"A")
    h.hello(b"P")
    h.sub(b"A", "t")
    h.send(b"P", *[[14, "t", b"x"]] * 25)
    (s,) = [s for s in h.b.take_dirty() if s.identity == b"A"]
    sizes = []
    while (body := h.b.next_body(s)) is not None:
        sizes.append(len(p.decode_node_body(body)))
    assert sizes == [10, 10, 5]


def test_stats_reply() -> None:
    h = Harness()
    h.hello(b"A")
    h.sub(b"A", "t")
    h.send(b"A", [14, "t", b"x"], [30, 3])
    reply = next(c for c in h.out()[b"A"] if isinstance(c, p.StatsReply))
    assert reply.rid == 3
    assert reply.stats["sessions"] == 1 and reply.stats["subscriptions"] == 1
    assert reply.stats["messages_in_total"] == 1


# --- RPC --------------------------------------------------------------------------------


def _rpc(strategy: str = "round_robin") -> tuple[Harness, dict[bytes, int]]:
    h = Harness(Limits(call_timeout=2.0))
    regs = {}
    for m in (b"C", b"X", b"Y"):
        h.hello(m, hb=60_000)
    for m in (b"X", b"Y"):
        h.send(m, [20, 1, "add", strategy])
        (r,) = h.out()[m]
        assert isinstance(r, p.Registered)
        regs[m] = r.reg_id
    return h, regs


def test_call_invoke_yield_result_passes_values_through() -> None:
    h, regs = _rpc()
    h.send(b"C", [24, 11, "add", [1, 2], 0])
    got = h.out()
    (inv,) = got[b"X"]
    assert isinstance(inv, p.Invoke) and inv.reg_id == regs[b"X"] and inv.procedure == "add"
    assert msgspec.msgpack.decode(inv.args) == [1, 2]
    h.send(b"X", [27, inv.inv_id, {"sum": 3}])
    (res,) = h.out()[b"C"]
    assert isinstance(res, p.Result) and res.rid == 11
    assert msgspec.msgpack.decode(res.result) == {"sum": 3}
    assert h.b.calls_ok == 1 and not h.b._calls


@pytest.mark.parametrize(("strategy", "expect"), [
    ("round_robin", [b"X", b"Y", b"X", b"Y"]), ("first", [b"X"] * 4)])
def test_provider_strategies(strategy: str, expect: list[bytes]) -> None:
    h, _ = _rpc(strategy)
    chosen = []
    for i in range(4):
        h.send(b"C", [24, i + 1, "add"])
        chosen += [m for m, cmds in h.out().items() if any(isinstance(c, p.Invoke) for c in cmds)]
    assert chosen == expect


def test_random_strategy_uses_every_provider() -> None:
    h, _ = _rpc("random")
    chosen = set()
    for i in range(40):
        h.send(b"C", [24, i + 1, "add"])
        chosen |= {m for m, cmds in h.out().items() if any(isinstance(c, p.Invoke) for c in cmds)}
    assert chosen == {b"X", b"Y"}


def test_rpc_errors_no_provider_timeout_provider_gone_application_error() -> None:
    h, _ = _rpc()
    h.send(b"C", [24, 1, "missing"])
    assert errors(h.out()[b"C"]) == [(1, Err.NO_PROVIDER)]
    h.send(b"C", [24, 2, "add", None, 500])  # to X; 0.5 s timeout
    h.send(b"C", [24, 3, "add"])  # to Y; default 2 s
    got = h.out()
    inv_x = got[b"X"][0].inv_id
    h.tick(0.6)
    assert errors(h.out()[b"C"]) == [(2, Err.CALL_TIMEOUT)]
    h.send(b"X", [27, inv_x, 5])  # late: counted, no answer
    assert b"C" not in h.out() and h.b.errors["UNKNOWN_INVOCATION"] == 1
    h.send(b"Y", [6])  # Y leaves mid-call: C learns at once
    assert errors(h.out()[b"C"]) == [(3, Err.PROVIDER_GONE)]
    h.send(b"C", [24, 4, "add"])
    inv = h.out()[b"X"][0].inv_id
    h.send(b"X", [28, inv, "boom"])
    assert h.out()[b"C"] == [p.Error(4, int(Err.APPLICATION_ERROR), "boom")]
    h.send(b"X", [20, 5, "add", "first"], [22, 6, 999])
    assert h.out()[b"X"] == [p.Error(5, int(Err.STRATEGY_MISMATCH),
                                     "'add' is registered with strategy 'round_robin'"),
                             p.Unregistered(6, False)]


def test_register_options_for_the_mesh_are_checked() -> None:
    h = Harness(Limits())
    h.hello(b"X", hb=60_000)
    h.send(b"X", [20, 1, "a", "lowest_latency", True, 1500])  # fine: mesh-wide options
    h.send(b"X", [20, 2, "b", "round_robin", False, -1])
    h.send(b"X", [20, 3, "c", "round_robin", "yes", 0])
    h.send(b"X", [20, 4, "d", "fastest"])
    got = h.out()[b"X"]
    assert isinstance(got[0], p.Registered)
    assert got[1] == p.Error(2, int(Err.BAD_VALUE), "cache_ttl_ms must be >= 0")
    assert isinstance(got[2], p.Error) and got[2].code == int(Err.WRONG_TYPE)
    assert got[3] == p.Error(4, int(Err.BAD_VALUE), "strategy must be one of round_robin, "
                             "random, first, lowest_latency")
    (realm,) = h.b.realms.values()
    proc = realm.procedures["a"]
    assert (proc.strategy, proc.idempotent, proc.cache_ttl) == ("lowest_latency", True, 1.5)


def test_lowest_latency_takes_local_providers_in_turn() -> None:
    h, _ = _rpc("lowest_latency")
    chosen = []
    for i in range(4):
        h.send(b"C", [24, i + 1, "add"])
        chosen += [m for m, cmds in h.out().items() if any(isinstance(c, p.Invoke) for c in cmds)]
    assert chosen == [b"X", b"Y", b"X", b"Y"]


def test_unregister_last_provider_means_no_provider() -> None:
    h, regs = _rpc()
    h.send(b"X", [22, 1, regs[b"X"]])
    h.send(b"Y", [22, 1, regs[b"Y"]])
    h.out()
    h.send(b"C", [24, 9, "add"])
    assert errors(h.out()[b"C"]) == [(9, Err.NO_PROVIDER)]


# --- bad input at the broker ------------------------------------------------------------


@pytest.mark.parametrize(("frames", "code"), [
    ([b"MCP\x01"], Err.MALFORMED),
    ([b"MCP\x01", b"\x90", b"extra"], Err.MALFORMED),
    ([b"HTTP", b"\x90"], Err.BAD_SIGNATURE),
    ([b"MCP\x02", b"\x90"], Err.BAD_VERSION),
    ([b"MCP\x01", b"\xc1"], Err.INVALID_MSGPACK),
    ([b"MCP\x01", b"\x05"], Err.MALFORMED),
    ([b"MCP\x01", p.encode([[99, 1]])], Err.UNKNOWN_COMMAND),
    ([b"MCP\x01", p.encode([[10, 1]])], Err.MISSING_FIELD),
    ([b"MCP\x01", p.encode([[10, 1, 5]])], Err.WRONG_TYPE),
    ([b"MCP\x01", p.encode([[14, "t", "text, not bin"]])], Err.WRONG_TYPE),
])
def test_bad_messages_get_their_code_and_the_session_survives(
    frames: list[bytes], code: Err
) -> None:
    h = Harness()
    h.hello(b"A")
    h.sub(b"A", "t")
    h.raw(b"A", frames)
    assert errors(h.out()[b"A"])[0][1] == code
    assert h.b.errors[code.name] == 1
    h.send(b"A", [14, "t", b"ok"])
    assert [e.payload for e in events(h.out()[b"A"])] == [b"ok"]


def test_bad_command_in_a_batch_does_not_stop_the_good_ones() -> None:
    h = Harness()
    h.hello(b"A")
    h.sub(b"A", "t")
    h.send(b"A", [14, "t", b"1"], [10, "bad", "t"], [14, "t", b"2"])
    got = h.out()[b"A"]
    assert [e.payload for e in events(got)] == [b"1", b"2"]
    assert errors(got) == [(0, Err.WRONG_TYPE)]


def test_oversized_message_is_refused() -> None:
    h = Harness(Limits(max_message=100))
    h.hello(b"A")
    h.send(b"A", [14, "t", b"x" * 200])
    assert errors(h.out()[b"A"]) == [(0, Err.MESSAGE_TOO_LARGE)]


# --- property: deliveries equal a naive model -------------------------------------------


def _matches(flt: str, topic: str) -> bool:
    f, t = flt.split("/"), topic.split("/")
    if topic.startswith("$") and f[0] in ("+", "#"):
        return False
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


_levels = st.sampled_from(["a", "b", ""])
_topics = st.lists(_levels, min_size=1, max_size=3).map("/".join)
_filters = st.lists(st.sampled_from(["a", "b", "", "+"]), min_size=1, max_size=3).map(
    "/".join) | _topics.map(lambda t: t + "/#") | st.just("#")
_ops = st.lists(st.one_of(
    st.tuples(st.just("sub"), st.sampled_from([b"A", b"B"]), _filters),
    st.tuples(st.just("unsub"), st.sampled_from([b"A", b"B"]), _filters),
    st.tuples(st.just("pub"), st.just(b"P"), _topics),
), max_size=40)


@settings(max_examples=150)
@given(_ops)
def test_deliveries_match_a_naive_model(ops: list[tuple[str, bytes, str]]) -> None:
    h = Harness()
    for m in (b"A", b"B", b"P"):
        h.hello(m)
    model: dict[bytes, set[str]] = {b"A": set(), b"B": set()}
    for op, who, arg in ops:
        if op == "sub":
            h.send(who, [10, 1, arg])
            if arg:  # the empty filter is invalid
                model[who].add(arg)
        elif op == "unsub":
            h.send(who, [12, 1, arg])
            model[who].discard(arg)
        else:
            h.send(who, [14, arg, b"m"])
        got = h.out()
        if not arg and op != "unsub":
            assert errors(got[who])[0][1] == (Err.INVALID_FILTER if op == "sub"
                                              else Err.INVALID_TOPIC)
        elif op == "pub":
            for m in (b"A", b"B"):
                subs = h.b.sessions[m].subs
                by_id = {s.sub_id: s.filter for s in subs.values()}
                seen = sorted(by_id[e.sub_id] for e in events(got.get(m, [])))
                assert seen == sorted(f for f in model[m] if _matches(f, arg)), (m, arg)
    assert len(h.b.realms["r"].trie) == len(model[b"A"]) + len(model[b"B"])


def test_event_type_is_the_spec_layout() -> None:
    """An EVENT built from prefix + tail is byte-identical to the encoded array."""
    h = Harness()
    h.hello(b"A")
    h.hello(b"P")
    sid = h.sub(b"A", "t", 1)
    h.send(b"P", [14, "t", b"\x00\xff", 1, 300])
    (s,) = [s for s in h.b.take_dirty() if s.identity == b"A"]
    body = h.b.next_body(s)
    assert body == p.encode([[int(Code.EVENT), sid, 1, 1, "t", b"\x00\xff", False]])


_mp_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=6), max_leaves=20)


@settings(max_examples=150)
@given(st.one_of(
    st.binary(max_size=64),
    st.lists(st.lists(_mp_values, max_size=7).map(
        lambda c: [c[0] if c and type(c[0]) is int else 14, *c[1:]] if c else c
    ), max_size=5).map(p.encode),
))
def test_any_body_is_answered_or_run_and_the_session_survives(body: bytes) -> None:
    """Fuzz: arbitrary bytes and arbitrary command-shaped arrays never break the broker."""
    h = Harness(Limits(max_payload=64))
    h.hello(b"A")
    h.sub(b"A", "t")
    h.hello(b"P")
    h.raw(b"P", [p.SIGNATURE, body])
    h.out()
    if b"P" in h.b.sessions:  # unless the fuzz sent BYE, P is still served
        h.send(b"P", [4, 5])
        assert p.Pong(5) in h.out()[b"P"]
    h.send(b"A", [14, "t", b"still"])
    assert [e.payload for e in events(h.out()[b"A"]) if e.payload == b"still"] == [b"still"]
