"""The mesh with every node a separate ``macula node`` process: real QUIC over loopback between
the nodes, real ZeroMQ between the nodes and the clients (asyncio ``macula.Client``s in this
process), nothing mocked.

One 5-node mesh (module fixture, the default mesh settings) serves the tests that kill no
node: wildcard fan-out, a late subscriber, realms, shared subscriptions; each test uses its
own realm, so none sees another's traffic. The tests that SIGKILL a node start their own
3-node mesh with a shorter discovery interval (``MACULA_MESH_MIN_INTERVAL``).

Subscriptions reach publishers through the DHT, so a test first publishes probes until every
subscriber has heard from every publisher ("discovery sees them"); what is checked comes
after. Exactness (every message once, nothing else) is asserted for QoS 1 end to end; for
QoS 0 the tests assert no duplicate, nothing unexpected and at most 1 % lost, and print the
loss. The only time bound asserted is the issue's: a new subscriber on another node receives
within 2 s of its SUBACK (the measured times are printed). Every other wait is a generous
deadline that fails with what was seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from macula.client import Client, Message, RemoteError
from macula.control.protocol import Err, PubackReason
from tests.mesh_util import Clients, NodeProcs, eventually, run
from tests.models.trie_model import matches

ROOT = Path(__file__).resolve().parent.parent
ENV = {"PYTHONPATH": str(ROOT)}  # the node processes import this checkout's macula
KILL_ENV = {**ENV, "MACULA_MESH_MIN_INTERVAL": "0.25"}  # the kill tests' meshes
# after everything expected arrived: time for strays and duplicates to show up (longer than
# the QoS 1 re-send timeout between nodes, 1 s)
SETTLE = 1.5


class Collector:
    """What one subscription received, in order: (topic, payload, qos) and when."""

    def __init__(self) -> None:
        self.got: list[tuple[str, bytes, int]] = []
        self.times: list[float] = []

    def __call__(self, msg: Message) -> None:
        self.got.append((msg.topic, msg.payload, msg.qos))
        self.times.append(time.monotonic())

    def payloads(self, prefix: bytes | tuple[bytes, ...]) -> Counter[bytes]:
        return Counter(p for _, p, _ in self.got if p.startswith(prefix))


@pytest.fixture(scope="module")
def mesh5(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcs]:
    with NodeProcs(tmp_path_factory.mktemp("mesh5"), 5, env=ENV) as m:
        yield m


async def _mesh_stats(c: Client) -> dict[str, Any]:
    stats: dict[str, Any] = (await c.stats())["mesh"]
    return stats


async def _wait_quietly(check: Callable[[], bool], timeout: float) -> None:
    """Wait until ``check()`` or ``timeout``, without failing (the asserts come after)."""
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def _probe(pubs: dict[str, tuple[Client, list[str]]], subs: dict[str, Collector],
                 wanted: dict[str, set[str]], timeout: float = 20.0) -> None:
    """Publish ``probe|<publisher>`` (QoS 0) on each publisher's topics every 50 ms until
    every subscriber has a probe from each publisher in ``wanted[subscriber]``."""
    deadline = time.monotonic() + timeout
    while True:
        missing = {name: {p for p in wanted[name]
                          if not any(pl == f"probe|{p}".encode() for _, pl, _ in c.got)}
                   for name, c in subs.items()}
        if not any(missing.values()):
            break
        assert time.monotonic() < deadline, f"discovery never delivered these probes: {missing}"
        for pname, (client, topics) in pubs.items():
            for t in topics:
                client.publish_nowait(t, f"probe|{pname}".encode())
        await asyncio.sleep(0.05)
    for client, _ in pubs.values():
        await client.stats()  # a round trip: every probe has reached its node


# -- 1. wildcard fan-out across five nodes -----------------------------------------------------

FLEET_TOPICS = [
    "fleet/a/temp", "fleet/b/temp", "fleet/a/speed", "fleet/b/speed/x", "fleet",
    "fleet/a/temp/deep", "other/a/temp", "fleetx/a/temp", "truck/a",
]
FLEET_SUBS = {  # subscriber -> (node, filter, QoS)
    "s3": (3, "fleet/+/temp", 1),
    "s4": (4, "fleet/#", 1),
    "s5a": (5, "fleet/a/+", 0),
    "s5b": (5, "fleet/+/temp", 1),  # the same node as s5a, an overlapping filter
    "s2": (2, "fleet/b/#", 1),  # on a publishing node: local and remote deliveries
}
ROUNDS = 40  # per publisher, topic and QoS: 1,440 messages in all
DATA = (b"p1|", b"p2|")  # the payload prefixes of the numbered messages (not the probes)


def test_wildcards_across_five_nodes_exactly(mesh5: NodeProcs) -> None:
    async def main(cs: Clients) -> None:
        subs = {name: Collector() for name in FLEET_SUBS}
        for name, (node, flt, qos) in FLEET_SUBS.items():
            c = await cs.connect(node, "fleet", name)
            await c.subscribe(flt, qos=qos, callback=subs[name])
        p1 = await cs.connect(1, "fleet", "p1")
        p2 = await cs.connect(2, "fleet", "p2")
        pubs = {"p1": (p1, ["fleet/a/temp", "fleet/b/temp"]),
                "p2": (p2, ["fleet/a/temp", "fleet/b/temp"])}
        await _probe(pubs, subs, {name: {"p1", "p2"} for name in subs})
        before = {k: await _mesh_stats(c) for k, (c, _) in pubs.items()}

        published: list[tuple[str, bytes, int]] = []
        qos1: list[asyncio.Future[Any]] = []
        for i in range(ROUNDS):
            for pname, (client, _) in pubs.items():
                for qos in (0, 1):
                    items = [(t, f"{pname}|q{qos}|{t}|{i}".encode()) for t in FLEET_TOPICS]
                    published += [(t, pl, qos) for t, pl in items]
                    if qos:
                        qos1.append(asyncio.ensure_future(client.publish_many(items, qos=1)))
                    else:
                        await client.publish_many(items)
            await asyncio.sleep(0.01)  # a modest rate: about 1,800 messages/s per publisher
        reasons = [r for rs in await asyncio.gather(*qos1) for r in rs or []]
        assert len(reasons) == ROUNDS * len(pubs) * len(FLEET_TOPICS)
        # a topic somebody subscribes to is acknowledged OK; one nobody does, OK while it
        # is being discovered, NO_SUBSCRIBERS after
        for reason, t in zip(reasons, FLEET_TOPICS * ROUNDS * len(pubs), strict=True):
            ok = any(matches(flt, t) for _, flt, _ in FLEET_SUBS.values())
            assert reason in ((PubackReason.OK,) if ok else
                              (PubackReason.OK, PubackReason.NO_SUBSCRIBERS)), (t, reason)

        expected = {name: Counter(pl for t, pl, _ in published if matches(flt, t))
                    for name, (_, flt, _) in FLEET_SUBS.items()}
        expected_q1 = {name: Counter({pl: n for pl, n in e.items() if b"|q1|" in pl})
                       for name, e in expected.items()}
        qos1_subs = [n for n, (_, _, q) in FLEET_SUBS.items() if q == 1]
        await eventually(
            lambda: (all(not (expected_q1[n] - subs[n].payloads(DATA)) for n in qos1_subs)),
            20.0, what="every QoS 1 message at every QoS 1 subscriber")
        await _wait_quietly(lambda: all(not (expected[n] - subs[n].payloads(DATA))
                                        for n in subs), 3.0)
        await asyncio.sleep(SETTLE)
        after = {k: await _mesh_stats(c) for k, (c, _) in pubs.items()}

        losses = {}
        for name, (_, flt, sub_qos) in FLEET_SUBS.items():
            col = subs[name]
            got = col.payloads(DATA)  # the probes left out
            for topic, pl, _ in col.got:  # each message matches and came on its own topic
                assert matches(flt, topic), (name, topic, pl)
                assert pl.startswith(b"probe|") or pl.split(b"|")[2].decode() == topic
            assert not (got - expected[name]), (name, "unexpected or duplicated:",
                                                got - expected[name])
            assert max(got.values(), default=1) == 1, (name, "duplicates")
            if sub_qos == 1:  # QoS 1 end to end: exactly what was sent, each once
                got_q1 = Counter({pl: n for pl, n in got.items() if b"|q1|" in pl})
                assert got_q1 == expected_q1[name], (name, "missing:",
                                                     expected_q1[name] - got_q1)
                assert all(q == 1 for _, pl, q in col.got if b"|q1|" in pl), name
            else:
                assert all(q == 0 for _, _, q in col.got), name
            lost = sum((expected[name] - got).values())
            losses[name] = f"{lost}/{sum(expected[name].values())}"
            # QoS 0 (published so, or to a QoS 0 subscription): loopback, a modest rate
            assert lost <= 0.01 * sum(expected[name].values()), (name, "lost", lost)
        print(f"\nwildcards: QoS 0 lost/expected per subscriber: {losses}")

        # each publishing node forwarded each message once to each node with a matching
        # filter (n5 once for s5a and s5b), to no other node
        filters_of = {i: [flt for node, flt, _ in FLEET_SUBS.values() if node == i]
                      for i in range(1, 6)}
        for pname, me in (("p1", 1), ("p2", 2)):
            want = sum(1 for t, pl, _ in published if pl.startswith(pname.encode())
                       for i, flts in filters_of.items()
                       if i != me and any(matches(f, t) for f in flts))
            fwd = (after[pname]["messages_forwarded_total"]
                   - before[pname]["messages_forwarded_total"])
            assert fwd == want, (pname, fwd, want, after[pname])
            assert after[pname]["drops_total"] == {}, after[pname]

    run(mesh5, main)


# -- 2. a new subscriber on another node receives within 2 s -----------------------------------


def test_new_subscriber_receives_within_two_seconds(mesh5: NodeProcs) -> None:
    """Default mesh settings; the publisher's node has already cached "nobody there"."""
    async def main(cs: Clients) -> None:
        pub = await cs.connect(1, "late", "pub")
        stop = asyncio.Event()
        sent = 0

        async def publish() -> None:
            nonlocal sent
            while not stop.is_set():
                pub.publish_nowait("late/news/x", f"m{sent}".encode())
                sent += 1
                await asyncio.sleep(0.01)

        task = asyncio.ensure_future(publish())
        try:
            await asyncio.sleep(1.5)  # the publisher's node looks the topic up: nobody yet
            delays = {}
            for node, flt in ((3, "late/+/x"), (4, "late/news/#")):
                col = Collector()
                c = await cs.connect(node, "late", f"sub{node}")
                await c.subscribe(flt, callback=col)
                suback = time.monotonic()  # the SUBACK has arrived
                await eventually(lambda col=col: col.got,  # type: ignore[misc]
                                 10.0, every=0.005, what=f"a first message on n{node}")
                delays[node] = col.times[0] - suback
                assert all(t == "late/news/x" for t, _, _ in col.got)
            print("\nlate subscriber: first message after SUBACK, seconds: "
                  + ", ".join(f"n{k} {v:.3f}" for k, v in delays.items()))
            for node, delay in delays.items():
                assert delay <= 2.0, (f"n{node}: first message {delay:.2f} s after SUBACK",
                                      delays)
        finally:
            stop.set()
            await task

    run(mesh5, main)


# -- 4. realms stay apart across nodes ---------------------------------------------------------


def test_realms_stay_apart_across_nodes(mesh5: NodeProcs) -> None:
    """The issue's case (realm "a" on n3, realm "b" on n4, the same filter, a realm-"a"
    publisher on n1), plus: n3 and n4 each also have a subscriber of the other realm (so a
    node demultiplexes realms it receives both of), n5 only a realm-"b" one (so n1 must
    not send there), and a realm-"b" publisher on n2 (so realm "b" works at all)."""
    async def main(cs: Clients) -> None:
        subs = {  # name -> (node, realm, filter)
            "a3": (3, "a", "room/+/t"), "b4": (4, "b", "room/+/t"),
            "b3": (3, "b", "room/#"), "a4": (4, "a", "room/#"), "b5": (5, "b", "room/+/t"),
        }
        cols = {name: Collector() for name in subs}
        for name, (node, realm, flt) in subs.items():
            c = await cs.connect(node, realm, name)
            await c.subscribe(flt, qos=1, callback=cols[name])
        pa = await cs.connect(1, "a", "pub-a")
        pb = await cs.connect(2, "b", "pub-b")
        await _probe({"a": (pa, ["room/1/t"]), "b": (pb, ["room/1/t"])}, cols,
                     {name: {realm} for name, (_, realm, _) in subs.items()})
        fwd0 = (await _mesh_stats(pa))["messages_forwarded_total"]
        items = {r: [(f"room/{i % 3}/t", f"{r}|{i}".encode()) for i in range(100)]
                 for r in "ab"}
        assert not any(await pa.publish_many(items["a"], qos=1) or [1])
        assert not any(await pb.publish_many(items["b"], qos=1) or [1])
        want = {r: Counter(pl for _, pl in items[r]) for r in "ab"}
        await eventually(lambda: all(not (want[realm] - cols[name].payloads(f"{realm}|".encode()))
                                     for name, (_, realm, _) in subs.items()),
                         15.0, what="each realm's messages in that realm")
        await asyncio.sleep(SETTLE)
        for name, (_, realm, _) in subs.items():
            other = "b" if realm == "a" else "a"
            got = cols[name]
            assert got.payloads(f"{realm}|".encode()) == want[realm], name
            # nothing from the other realm, probes included
            assert not got.payloads((f"{other}|".encode(), f"probe|{other}".encode())), (
                name, got.got)
        # n1 sent its realm-"a" messages to n3 and n4 once each, not to n5
        fwd = (await _mesh_stats(pa))["messages_forwarded_total"] - fwd0
        assert fwd == 2 * len(items["a"]), fwd

    run(mesh5, main)


# -- 6. a shared subscription across nodes -----------------------------------------------------


def test_shared_subscription_across_nodes(mesh5: NodeProcs) -> None:
    async def main(cs: Clients) -> None:
        members = {3: Collector(), 4: Collector()}
        for node, col in members.items():
            c = await cs.connect(node, "share", f"worker{node}")
            await c.subscribe("$share/g/jobs/#", qos=1, callback=col)
        pub = await cs.connect(1, "share", "pub")
        # one member takes each probe: probe until both have taken some
        await _probe({"p": (pub, ["jobs/build"])}, {f"n{k}": v for k, v in members.items()},
                     {"n3": {"p"}, "n4": {"p"}})
        n = 200  # half on a topic the publisher's node has not looked up yet
        jobs = [(("jobs/build", "jobs/test/unit")[i % 2], f"job|{i}".encode())
                for i in range(n)]
        fwd0 = (await _mesh_stats(pub))["messages_forwarded_total"]
        reasons = await pub.publish_many(jobs, qos=1)
        assert reasons is not None and not any(reasons)

        def union() -> Counter[bytes]:  # a job taken twice counts 2
            return members[3].payloads(b"job|") + members[4].payloads(b"job|")

        await eventually(lambda: (len(union()) == n), 15.0,
                         what=f"all {n} jobs delivered")
        await asyncio.sleep(SETTLE)
        got3, got4 = members[3].payloads(b"job|"), members[4].payloads(b"job|")
        assert union() == Counter(pl for _, pl in jobs)  # every job exactly once overall
        assert not (got3.keys() & got4.keys())
        assert got3 and got4, (len(got3), len(got4))
        # n1 sent each job to one node only
        assert (await _mesh_stats(pub))["messages_forwarded_total"] - fwd0 == n
        print(f"\nshared: n3 took {len(got3)}, n4 took {len(got4)} of {n}")

    run(mesh5, main)


# -- 3. a subscriber node dies: publishers stop sending to it ----------------------------------


def test_dead_subscriber_node_is_dropped(tmp_path: Path) -> None:
    with NodeProcs(tmp_path, 3, env=KILL_ENV) as mesh:
        async def main(cs: Clients) -> None:
            live, doomed = Collector(), Collector()
            c2 = await cs.connect(2, "gone", "live")
            c3 = await cs.connect(3, "gone", "doomed")
            await c2.subscribe("both/#", qos=1, callback=live)
            await c3.subscribe("both/#", qos=1, callback=doomed)
            await c3.subscribe("only3/#", qos=1, callback=doomed)
            pub = await cs.connect(1, "gone", "pub")
            await _probe({"p": (pub, ["both/x", "only3/x"])}, {"live": live, "doomed": doomed},
                         {"live": {"p"}, "doomed": {"p"}})
            # a probe on both/x may have satisfied the wait above first: only3/x's own
            # route must be known too before the kill (else nothing is forwarded anyway)
            deadline = time.monotonic() + 20
            while not any(t == "only3/x" for t, _, _ in doomed.got):
                assert time.monotonic() < deadline, "only3/x never reached n3"
                pub.publish_nowait("only3/x", b"probe|p")
                await asyncio.sleep(0.05)
            stop = asyncio.Event()

            async def publish() -> None:  # QoS 0 on both topics, every 10 ms
                i = 0
                while not stop.is_set():
                    pub.publish_nowait("both/x", f"b|{i}".encode())
                    pub.publish_nowait("only3/x", f"o|{i}".encode())
                    i += 1
                    await asyncio.sleep(0.01)

            task = asyncio.ensure_future(publish())
            try:
                await asyncio.sleep(0.3)
                gone0 = (await _mesh_stats(pub))["nodes_gone_total"]
                mesh[3].kill()
                killed_at = time.monotonic()
                live_at_kill = len(live.got)
                await eventually(lambda: _gone_above(pub, gone0), 15.0, every=0.2,
                                 what="n1 counting n3 as gone")
                noticed = time.monotonic() - killed_at
            finally:
                stop.set()
                await task
            assert len(live.got) > live_at_kill  # n2 kept receiving meanwhile

            # only the dead node's topic now: nothing is forwarded any more, across refreshes
            # of the discovery answer (every 0.25 s here)
            f0 = (await _mesh_stats(pub))["messages_forwarded_total"]
            for i in range(100):
                pub.publish_nowait("only3/x", f"after|{i}".encode())
                await asyncio.sleep(0.01)
            st = await _mesh_stats(pub)
            assert st["messages_forwarded_total"] == f0, st
            # and n2 still gets everything, exactly once
            batch = [("both/y", f"late|{i}".encode()) for i in range(100)]
            reasons = await pub.publish_many(batch, qos=1)
            assert reasons is not None and not any(reasons)
            want = Counter(pl for _, pl in batch)
            await eventually(lambda: (not (want - live.payloads(b"late|"))), 15.0,
                             what="n2 receiving after n3 died")
            await asyncio.sleep(SETTLE)
            assert live.payloads(b"late|") == want
            print(f"\ndead subscriber: n1 counted n3 gone {noticed:.2f} s after SIGKILL")

        run(mesh, main)


def _adder(node: int) -> Callable[[list[int]], list[int]]:
    """math.add of the provider on ``node``: the sum, and who answered."""
    return lambda args: [node, args[0] + args[1]]


async def _gone_above(c: Client, n: int) -> bool:
    return bool((await _mesh_stats(c))["nodes_gone_total"] > n)


# -- 5. RPC across nodes, failing over when a provider's node dies -----------------------------


def test_rpc_across_nodes_with_failover(tmp_path: Path) -> None:
    with NodeProcs(tmp_path, 3, env=KILL_ENV) as mesh:
        async def main(cs: Clients) -> None:
            caller = await cs.connect(1, "rpc", "caller")
            # an unknown procedure: NO_PROVIDER at once, not a timeout (30 s allowed)
            t0 = time.monotonic()
            with pytest.raises(RemoteError) as exc:
                await caller.call("nobody.here", [1], timeout=30)
            assert exc.value.code == Err.NO_PROVIDER, exc.value
            unknown_s = time.monotonic() - t0
            providers = {}
            for node in (2, 3):
                c = await cs.connect(node, "rpc", f"provider{node}")
                await c.register("math.add", _adder(node))
                providers[node] = c
            # the caller's node refreshes a provider list in use every min_interval: both
            # providers are called soon even if the first list held only one of them

            async def call(i: int) -> int:
                node, total = await caller.call("math.add", [i, 1], timeout=3)
                assert total == i + 1
                return int(node)

            seen: set[int] = set()

            async def both_answer() -> bool:
                with contextlib.suppress(RemoteError):  # NO_PROVIDER until registered
                    seen.add(await call(0))
                return seen == {2, 3}

            await eventually(both_answer, 20.0, every=0.05, what="answers from both providers")
            last = await call(1)
            mesh[last].kill()
            survivor = 5 - last
            outcomes: list[int | str] = []
            for i in range(2, 22):  # a few failures right at the kill, then only successes
                try:
                    outcomes.append(await call(i))
                except RemoteError as e:
                    outcomes.append(getattr(e.code, "name", str(e.code)))
            print(f"\nrpc failover: killed n{last}; outcomes {outcomes}; unknown procedure "
                  f"answered in {unknown_s:.3f} s")
            failures = [k for k, o in enumerate(outcomes) if not isinstance(o, int)]
            assert len(failures) <= 3 and all(k < 6 for k in failures), outcomes
            assert outcomes[6:] == [survivor] * (len(outcomes) - 6), outcomes
            with pytest.raises(RemoteError) as exc:
                await caller.call("nobody.here", [1], timeout=30)
            assert exc.value.code == Err.NO_PROVIDER, exc.value

        run(mesh, main)

