"""The sans-IO Kademlia core (macula.dht.core) on a fake clock and a fake network.

``FakeNet`` below is the only "network": it takes every ``SendRequest`` a core emits,
delivers it after a fixed latency to the addressed core's ``receive_request`` (unless that
node is dead, or programmed to answer garbage) and hands the reply back to
``receive_response``; timers run through ``get_timer`` / ``handle_timer``. Nothing sleeps:
time is a float that jumps from event to event.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from macula.dht import messages as dm
from macula.dht.core import (
    DhtConfig,
    DhtCore,
    KeyChanged,
    LookupDone,
    SendRequest,
    StoreDone,
)
from macula.dht.keys import dht_key
from macula.dht.messages import Contact, FindNode, FindValue, Nodes, Ping, Pong, Store

LAT = 0.01


def rid_of(rng: random.Random) -> bytes:
    return rng.getrandbits(256).to_bytes(32, "big")


def dist(a: bytes, b: bytes) -> int:
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


class FakeNet:
    """Cores addressed by port; a message takes LAT seconds each way."""

    def __init__(self, cfg: DhtConfig | None = None, seed: int = 1) -> None:
        self.cfg = cfg or DhtConfig(k=8, alpha=3, query_timeout=1.0)
        self.rng = random.Random(seed)
        self.now = 0.0
        self.nodes: dict[bytes, DhtCore] = {}
        self.contacts: dict[bytes, Contact] = {}
        self.dead: set[bytes] = set()
        self.garbage: dict[bytes, Callable[[Any], Any]] = {}
        self.events: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = 0
        self.done: dict[tuple[bytes, int], LookupDone | StoreDone] = {}
        self.sent = 0
        self.asked_dead: set[tuple[bytes, bytes]] = set()
        self.changes: list[tuple[bytes, KeyChanged]] = []  # (the holder that told, what)

    def add(self, node_id: bytes | None = None, *, client_mode: bool = False) -> DhtCore:
        nid = node_id or rid_of(self.rng)
        core = DhtCore(nid, config=self.cfg, now=self.now,
                       rng=random.Random(self.rng.random()), client_mode=client_mode)
        self.nodes[nid] = core
        self.contacts[nid] = Contact(nid, "10.0.0.1", 0 if client_mode else len(self.nodes))
        return core

    def at(self, t: float, fn: Callable[[], None]) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, fn))

    def pump(self, core: DhtCore) -> None:
        while (a := core.next_action()) is not None:
            if isinstance(a, SendRequest):
                self.sent += 1
                self._deliver(core, a)
            elif isinstance(a, KeyChanged):
                self.changes.append((core.node_id, a))
            else:
                key = a.lookup_id if isinstance(a, LookupDone) else a.op_id
                self.done[(core.node_id, key)] = a

    def _deliver(self, src: DhtCore, a: SendRequest) -> None:
        dst_id = a.contact.node_id
        sender = self.contacts[src.node_id]

        def arrive() -> None:
            dst = self.nodes.get(dst_id)
            if dst is None or dst_id in self.dead:
                self.asked_dead.add((src.node_id, dst_id))
                return  # silence: the sender's timeout fires
            reply = dst.receive_request(sender, a.msg, self.now)
            self.pump(dst)
            if dst_id in self.garbage:
                reply = self.garbage[dst_id](reply)

            def back() -> None:
                if src.node_id in self.dead:
                    return
                src.receive_response(a.rid, reply, self.now)
                self.pump(src)

            self.at(self.now + LAT, back)

        self.at(self.now + LAT, arrive)

    def run(self, until: float) -> None:
        """Process events and timers up to ``until`` (then now = until)."""
        while True:
            t_ev = self.events[0][0] if self.events else float("inf")
            t_tm, core = float("inf"), None
            for c in self.nodes.values():
                if c.node_id in self.dead:
                    continue
                t = c.get_timer()
                if t is not None and t < t_tm:
                    t_tm, core = t, c
            t = min(t_ev, t_tm)
            if t > until:
                break
            self.now = max(self.now, t)
            if t_ev <= t_tm:
                _, _, fn = heapq.heappop(self.events)
                fn()
            else:
                assert core is not None
                core.handle_timer(self.now)
                self.pump(core)
        self.now = until

    def settle(self, dt: float = 5.0) -> None:
        self.run(self.now + dt)

    # -- helpers --------------------------------------------------------------------------

    def lookup(self, core: DhtCore, target: bytes, *, want_value: bool = False,
               dt: float = 10.0, watch: bool = False) -> LookupDone:
        lid = core.start_lookup(target, want_value=want_value, now=self.now, watch=watch)
        self.pump(core)
        self.settle(dt)
        done = self.done[(core.node_id, lid)]
        assert isinstance(done, LookupDone)
        return done

    def put(self, core: DhtCore, key: bytes, value: bytes, ttl: float = 100.0) -> StoreDone:
        op = core.put(key, value, ttl, now=self.now)
        self.pump(core)
        self.settle(5.0)
        done = self.done[(core.node_id, op)]
        assert isinstance(done, StoreDone)
        return done

    def build(self, n: int) -> list[DhtCore]:
        """n nodes, each joining through the first one with a real bootstrap lookup."""
        first = self.add()
        cores = [first]
        for _ in range(n - 1):
            c = self.add()
            lid = c.bootstrap([self.contacts[first.node_id]], now=self.now)
            self.pump(c)
            self.settle(1.0)
            assert (c.node_id, lid) in self.done
            cores.append(c)
        return cores

    def live(self) -> list[bytes]:
        return [n for n in self.nodes if n not in self.dead]


def brute_closest(ids: list[bytes], target: bytes, k: int) -> list[bytes]:
    return sorted((i for i in ids if i != target), key=lambda i: dist(i, target))[:k]


# -- keys ---------------------------------------------------------------------------------


def test_dht_key_is_realm_scoped_blake3() -> None:
    from blake3 import blake3

    k = dht_key("realm", "sub", "sensors/+/temp")
    assert len(k) == 32 and k == blake3(b"realm\x00sub\x00sensors/+/temp").digest()
    assert dht_key("realm", "sub", "x") != dht_key("other", "sub", "x")
    assert dht_key("realm", "sub", "x") != dht_key("realm", "rpc", "x")
    assert dht_key("a", "b", "c\x00d") != dht_key("a", "b", "c")
    with pytest.raises(ValueError, match="U\\+0000"):
        dht_key("a\x00b", "c", "d")
    with pytest.raises(TypeError, match="realm must be str"):
        dht_key(b"r", "k", "n")  # type: ignore[arg-type]


# -- messages -----------------------------------------------------------------------------


def test_messages_round_trip_and_reject_malformed() -> None:
    c = Contact(b"\x01" * 32, "127.0.0.1", 4433)
    for msg in (Ping(1), FindNode(2, b"\x02" * 32), FindValue(3, b"\x03" * 32),
                Store(4, b"\x04" * 32, b"v", 60.0)):
        data = dm.ENCODER.encode(msg)
        assert data[1] == dm.kind_of(msg)  # fixarray, then the tag: the wire kind
        assert dm.REQUEST_DECODER.decode(data) == msg
    for rep in (Pong(1), Nodes(2, [c]), dm.Values(3, [dm.Record(b"\x05" * 32, b"x", 1.5)], [c]),
                dm.StoreAck(4, False, "size"), dm.StoreAck(5, True, "", [c])):
        assert dm.REPLY_DECODER.decode(dm.ENCODER.encode(rep)) == rep
    # an ack without the contacts field (four elements) still decodes: no contacts
    old = msgspec.msgpack.encode([dm.KIND_STORE_ACK, 6, True, ""])
    assert dm.REPLY_DECODER.decode(old) == dm.StoreAck(6, True, "", [])
    bad = [
        [dm.KIND_FIND_NODE, 1, b"short"],  # a 5-byte id
        [dm.KIND_NODES, 1, [[b"\x01" * 32, "h", 70000]]],  # port out of range
        [0x1F, 1],  # unknown tag
        "not a list",
    ]
    for b in bad:
        data = msgspec.msgpack.encode(b)
        with pytest.raises(msgspec.ValidationError):
            (dm.REPLY_DECODER if b[0] in (dm.KIND_NODES, 0x1F) else
             dm.REQUEST_DECODER).decode(data)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="alpha must be"):
        DhtConfig(alpha=0)
    with pytest.raises(ValueError, match="query_timeout must be"):
        DhtConfig(query_timeout=0)
    with pytest.raises(ValueError, match="republish_ratio"):
        DhtConfig(republish_ratio=1.0)
    with pytest.raises(ValueError, match="node_id must be 32 bytes"):
        DhtCore(b"x", now=0.0)


# -- serving requests ---------------------------------------------------------------------


def test_requests_are_answered_and_senders_added() -> None:
    rng = random.Random(3)
    core = DhtCore(rid_of(rng), config=DhtConfig(k=4), now=0.0)
    peers = [Contact(rid_of(rng), "10.0.0.2", 1000 + i) for i in range(10)]
    for i, p in enumerate(peers):
        assert core.receive_request(p, Ping(i), now=1.0) == Pong(i)
    assert 0 < len(core.table) <= 10
    target = rid_of(rng)
    reply = core.receive_request(peers[0], FindNode(77, target), now=2.0)
    assert isinstance(reply, Nodes) and reply.rid == 77
    expect = brute_closest(list(core.table), target, 5)
    expect = [i for i in expect if i != peers[0].node_id][:4]
    assert [c.node_id for c in reply.contacts] == expect  # exact, requester excluded
    key = rid_of(rng)
    ack = core.receive_request(peers[1], Store(5, key, b"hello", 30.0), now=3.0)
    expect = [i for i in brute_closest(list(core.table), key, 5) if i != peers[1].node_id][:4]
    assert (ack.rid, ack.ok, ack.reason) == (5, True, "")
    assert [c.node_id for c in ack.contacts] == expect  # like NODES: the storer's closest
    vals = core.receive_request(peers[2], FindValue(6, key), now=4.0)
    assert [(r.publisher, r.value, r.ttl) for r in vals.records] == [
        (peers[1].node_id, b"hello", 29.0)]
    assert core.receive_request(peers[2], FindValue(7, key), now=33.0).records == []
    with pytest.raises(TypeError, match="not a DHT request"):
        core.receive_request(peers[0], Pong(1), now=5.0)  # type: ignore[arg-type]


def test_client_mode_peers_are_served_but_never_added() -> None:
    rng = random.Random(4)
    core = DhtCore(rid_of(rng), now=0.0)
    client = Contact(rid_of(rng), "", 0)
    key = rid_of(rng)
    assert core.receive_request(client, Store(1, key, b"v", 10.0), now=0.0).ok
    assert core.receive_request(client, Ping(2), now=0.0) == Pong(2)
    assert client.node_id not in core.table and len(core.table) == 0
    assert core.store.get(key, 1.0)[0][0] == client.node_id  # publisher = the sender
    assert core.stats["client_mode_peers"] == 2


# -- routing-table upkeep -------------------------------------------------------------------


def fill_bucket0(net: FakeNet, core: DhtCore, n: int) -> list[bytes]:
    """n nodes in bucket 0 of ``core`` (first bit differs), each making contact."""
    ids = []
    while len(ids) < n:
        nid = rid_of(net.rng)
        if (nid[0] ^ core.node_id[0]) & 0x80:
            ids.append(nid)
            net.add(nid)
            net.now += 1.0
            core.receive_request(net.contacts[nid], Ping(0), now=net.now)
    return ids


def test_full_bucket_keeps_a_recently_seen_lrs_without_a_ping() -> None:
    net = FakeNet(DhtConfig(k=4, query_timeout=1.0, ping_after=60.0))
    core = net.add()
    ids = fill_bucket0(net, core, 5)  # the LRS was seen 4 s ago: known good
    net.pump(core)
    assert core.stats["pings_out"] == 0
    assert [i for i, _ in core.table.bucket(0)] == ids[:4]
    assert [i for i, _ in core.table.replacements(0)] == [ids[4]]
    net.now += 60.0
    fill_bucket0(net, core, 1)  # now the LRS is older than ping_after: it is pinged
    assert core.stats["pings_out"] == 1


def test_full_bucket_pings_lrs_which_stays_when_it_answers() -> None:
    net = FakeNet(DhtConfig(k=4, query_timeout=1.0, ping_after=0.0))
    core = net.add()
    ids = fill_bucket0(net, core, 5)  # the 5th finds the bucket full
    net.pump(core)  # the ping to the LRS goes out
    assert core.stats["pings_out"] == 1
    net.settle(3.0)
    assert [i for i, _ in core.table.bucket(0)] == [*ids[1:4], ids[0]]  # LRS answered: MRS
    assert [i for i, _ in core.table.replacements(0)] == [ids[4]]  # newcomer queued


def test_an_lrs_that_answered_is_pinged_again_by_the_next_newcomer() -> None:
    net = FakeNet(DhtConfig(k=1, query_timeout=1.0, ping_after=0.0))
    core = net.add()
    (a,) = fill_bucket0(net, core, 1)
    for n in range(1, 4):  # each newcomer finds the one slot taken by a, which answers
        fill_bucket0(net, core, 1)
        net.pump(core)
        net.settle(3.0)
        assert core.stats["pings_out"] == n
        assert [i for i, _ in core.table.bucket(0)] == [a]


def test_full_bucket_replaces_lrs_that_does_not_answer() -> None:
    net = FakeNet(DhtConfig(k=4, query_timeout=1.0, ping_after=0.0))
    core = net.add()
    ids = fill_bucket0(net, core, 4)
    net.dead.add(ids[0])
    fill_bucket0_extra = fill_bucket0(net, core, 1)
    net.pump(core)
    net.settle(0.5)
    assert ids[0] in core.table  # no answer yet: not decided before the timeout
    net.settle(1.0)
    assert ids[0] not in core.table
    assert fill_bucket0_extra[0] in core.table  # the newcomer was promoted
    assert core.stats["timeouts"] == 1 and core.stats["evictions"] == 1


def test_contact_evicted_after_repeated_failures_and_replacement_promoted() -> None:
    net = FakeNet(DhtConfig(k=2, alpha=1, query_timeout=1.0, evict_after=2, ping_after=0.0))
    core = net.add()
    _, b = fill_bucket0(net, core, 2)
    net.settle(0.1)
    c = fill_bucket0(net, core, 1)[0]  # queued; the LRS ping succeeds
    net.pump(core)
    net.settle(2.0)
    assert c not in core.table and [i for i, _ in core.table.replacements(0)] == [c]
    net.dead.add(b)
    net.lookup(core, b)  # first failure of b: kept
    assert b in core.table
    done = net.lookup(core, b)  # second: evicted, c promoted
    assert b not in core.table and c in core.table
    assert b not in [x.node_id for x in done.contacts]


def test_failure_count_resets_on_success() -> None:
    net = FakeNet(DhtConfig(k=4, alpha=1, query_timeout=1.0, evict_after=2))
    core = net.add()
    (a,) = fill_bucket0(net, core, 1)
    for _ in range(3):
        net.dead.add(a)
        net.lookup(core, a)  # one failure
        net.dead.discard(a)
        net.lookup(core, a)  # one success: the count starts over
    assert a in core.table


# -- lookups ------------------------------------------------------------------------------


def test_lookups_converge_to_the_exact_k_closest() -> None:
    net = FakeNet(DhtConfig(k=8, alpha=3, query_timeout=1.0))
    cores = net.build(120)
    ids = list(net.nodes)
    rng = random.Random(9)
    for _ in range(30):
        src = rng.choice(cores)
        target = rid_of(rng)
        done = net.lookup(src, target)
        want = brute_closest([i for i in ids if i != src.node_id], target, 8)
        assert [c.node_id for c in done.contacts] == want
        assert 1 <= done.rounds <= 6 and done.queries >= 8
    # every node finds every other node
    for src in rng.sample(cores, 10):
        for dst in rng.sample(ids, 10):
            if dst != src.node_id:
                assert net.lookup(src, dst).contacts[0].node_id == dst


def test_at_most_alpha_queries_in_flight_per_lookup() -> None:
    net = FakeNet(DhtConfig(k=8, alpha=3, query_timeout=1.0))
    cores = net.build(60)
    src = cores[5]
    lid = src.start_lookup(rid_of(net.rng), now=net.now)
    peak = 0
    sends: list[SendRequest] = []
    while (a := src.next_action()) is not None:
        assert isinstance(a, SendRequest)
        sends.append(a)
    assert len(sends) == 3  # alpha at once, no more
    # answer them one at a time: each answer lets at most one more go out (+ LRS pings)
    while sends:
        a = sends.pop(0)
        dst = net.nodes[a.contact.node_id]
        reply = dst.receive_request(net.contacts[src.node_id], a.msg, net.now)
        src.receive_response(a.rid, reply, net.now)
        while (b := src.next_action()) is not None:
            if isinstance(b, SendRequest) and isinstance(b.msg, FindNode):
                sends.append(b)
            elif isinstance(b, LookupDone):
                assert b.lookup_id == lid
        peak = max(peak, len(sends))
        assert len(sends) <= 3
    assert src.lookups_in_progress == 0 and peak <= 3


def test_dead_nodes_do_not_stall_lookups_and_leave_the_tables() -> None:
    net = FakeNet(DhtConfig(k=8, alpha=3, query_timeout=1.0, evict_after=1))
    cores = net.build(100)
    rng = random.Random(5)
    for c in rng.sample(cores[1:], 33):
        net.dead.add(c.node_id)
    live = net.live()
    for _ in range(20):
        src = net.nodes[rng.choice(live)]
        target = rid_of(rng)
        lid = src.start_lookup(target, now=net.now)
        net.pump(src)
        net.settle(8.0)  # a few timeouts of 1 s at most, never a stall
        done = net.done[(src.node_id, lid)]
        assert isinstance(done, LookupDone)
        got = [c.node_id for c in done.contacts]
        want = brute_closest([i for i in live if i != src.node_id], target, 8)
        assert got[0] == want[0]  # the closest live node is always found
        assert not set(got) & net.dead
        assert got == sorted(got, key=lambda i: dist(i, target))
        assert len(set(got) & set(want)) >= 5
    # every dead contact that a node asked is out of that node's table (evict_after=1)
    assert net.asked_dead
    for src, dst in net.asked_dead:
        assert dst not in net.nodes[src].table


def test_lookup_finishes_within_bounded_time_with_dead_contacts() -> None:
    net = FakeNet(DhtConfig(k=8, alpha=3, query_timeout=1.0, evict_after=3))
    cores = net.build(40)
    src = cores[0]
    target = rid_of(net.rng)
    for nid, _ in src.table.closest(target, 10):
        net.dead.add(nid)  # the 10 contacts it would ask first are all dead
    lid = src.start_lookup(target, now=net.now)
    net.pump(src)
    start = net.now
    while (src.node_id, lid) not in net.done:
        net.run(net.now + 0.05)
        assert net.now - start < 10 * 1.0  # at worst ceil(dead / alpha) timeouts + RTTs
    assert src.stats["timeouts"] >= 3
    done = net.done[(src.node_id, lid)]
    assert isinstance(done, LookupDone) and len(done.contacts) == 8
    assert not {c.node_id for c in done.contacts} & net.dead


def test_a_peer_answering_garbage_is_dropped_and_lookups_still_converge() -> None:
    net = FakeNet(DhtConfig(k=8, alpha=3, query_timeout=1.0, evict_after=2))
    cores = net.build(60)
    rng = random.Random(11)
    bad = rng.sample(cores[1:], 4)
    zero = Contact(b"\x00" * 32, "x", 1)
    kinds: list[Callable[[Any], Any]] = [
        lambda r: Pong(r.rid),  # the wrong reply type
        lambda r: Nodes(r.rid + 1, []),  # another rid
        lambda r: Nodes(r.rid, [zero] * 100),  # too many contacts
        lambda r: "garbage",
    ]
    for c, f in zip(bad, kinds, strict=True):
        net.garbage[c.node_id] = f
    honest = [i for i in net.nodes if i not in net.garbage]
    for _ in range(15):
        src = net.nodes[rng.choice(honest)]
        target = rid_of(rng)
        done = net.lookup(src, target)
        got = [c.node_id for c in done.contacts]
        want = brute_closest([i for i in honest if i != src.node_id], target, 8)
        assert got == want  # the garbage peers are skipped, nobody else is lost
    total_bad = sum(c.stats["bad_replies"] for c in net.nodes.values())
    assert total_bad > 0
    # a garbage peer that gave a node evict_after (2) bad replies is out of its table
    src = net.nodes[honest[0]]
    for g in net.garbage:
        net.lookup(src, g)
        net.lookup(src, g)
        assert g not in src.table


# -- records ------------------------------------------------------------------------------


def test_put_stores_on_the_k_closest_and_get_finds_it_from_anywhere() -> None:
    net = FakeNet(DhtConfig(k=8, alpha=3, query_timeout=1.0))
    cores = net.build(80)
    rng = random.Random(2)
    key = dht_key("realm", "sub", "sensors")
    pub = cores[3]
    done = net.put(pub, key, b"v1")
    assert done.stored == 8 and done.refused == 0 and done.failed == 0
    holders = {nid for nid, c in net.nodes.items() if c.store.get(key, net.now)}
    assert holders == set(brute_closest(list(net.nodes), key, 8))
    for src in rng.sample(cores, 20):
        d = net.lookup(src, key, want_value=True)
        assert [(r.publisher, r.value) for r in d.records] == [(pub.node_id, b"v1")]
    # a second publisher adds a value; the first publisher replaces its own
    other = cores[7]
    net.put(other, key, b"w")
    net.put(pub, key, b"v2")
    d = net.lookup(cores[50], key, want_value=True)
    assert sorted((r.publisher, r.value) for r in d.records) == sorted(
        [(pub.node_id, b"v2"), (other.node_id, b"w")])


def test_expired_values_are_never_served_and_are_reaped() -> None:
    net = FakeNet(DhtConfig(k=6, alpha=3, query_timeout=1.0, reap_interval=5.0))
    cores = net.build(30)
    key = rid_of(net.rng)
    net.put(cores[1], key, b"short", ttl=20.0)
    cores[1].unpublish(key)  # no republish
    assert net.lookup(cores[2], key, want_value=True).records
    net.run(net.now + 21.0)
    assert net.lookup(cores[2], key, want_value=True).records == []
    for c in cores:
        assert c.store.get(key, net.now) == []
    net.settle(6.0)
    assert sum(len(c.store) for c in cores) == 0  # reaped by the periodic timer
    assert sum(c.store.expired for c in cores) == 6


def test_owner_republishes_before_expiry_to_the_current_closest() -> None:
    net = FakeNet(DhtConfig(k=6, alpha=3, query_timeout=1.0, republish_ratio=0.5))
    cores = net.build(30)
    key = rid_of(net.rng)
    owner = cores[4]
    net.put(owner, key, b"kept", ttl=20.0)
    # the holders die; newcomers join closer to the key
    old = {nid for nid, c in net.nodes.items() if c.store.get(key, net.now)} - {owner.node_id}
    net.dead.update(old)
    for _ in range(10):
        c = net.add()
        c.bootstrap([net.contacts[owner.node_id]], now=net.now)
        net.pump(c)
        net.settle(0.5)
    for _ in range(8):  # well past the first ttl: republished at 10 s, 20 s, ...
        net.settle(5.0)
    assert owner.stats["republishes"] >= 3
    live = [net.nodes[i] for i in net.live() if i != owner.node_id]
    for src in live[:10]:
        d = net.lookup(src, key, want_value=True)
        assert [r.value for r in d.records] == [b"kept"]
    holders = {i for i in net.live() if net.nodes[i].store.get(key, net.now)}
    want = set(brute_closest(net.live(), key, 6))
    assert len(holders & want) >= 5  # the current closest hold it


def test_store_bounds_are_refused_and_counted() -> None:
    cfg = DhtConfig(k=4, alpha=3, query_timeout=1.0, max_keys=2, max_values_per_key=1,
                    max_value_size=8)
    net = FakeNet(cfg)
    cores = net.build(10)
    a, b = cores[1], cores[2]
    k1, k2, k3 = (rid_of(net.rng) for _ in range(3))
    assert net.put(a, k1, b"x").stored == 4
    assert net.put(a, k2, b"x").stored == 4
    # k3's holders-to-be that already keep two keys must refuse it
    targets = brute_closest(list(net.nodes), k3, 4)
    full = [t for t in targets if len({k1, k2} & set(net.nodes[t].store._keys)) == 2]
    assert full  # (seed 1: two of the four)
    before = sum(c.store.refused["keys"] for c in cores)
    d = net.put(a, k3, b"x")
    assert (d.refused, d.stored, d.failed) == (len(full), 4 - len(full), 0)
    assert sum(c.store.refused["keys"] for c in cores) - before == len(full)
    # a second publisher under k1, whose holders all keep one value (the bound) already
    d = net.put(b, k1, b"y")
    assert (d.refused, d.stored) == (4, 0)
    assert sum(c.store.refused["values_per_key"] for c in cores) == 4
    # the owner's own value under k1 was replaced, never refused
    assert net.put(a, k1, b"z").refused == 0
    with pytest.raises(ValueError, match="max_value_size"):
        a.put(k1, b"123456789", now=net.now)
    with pytest.raises(ValueError, match="ttl must be"):
        a.put(k1, b"1", -1.0, now=net.now)
    peer = net.contacts[b.node_id]
    ack = a.receive_request(peer, Store(9, k1, b"123456789", 5.0), now=net.now)
    assert (ack.rid, ack.ok, ack.reason) == (9, False, "size") and a.store.refused["size"] == 1


# -- refresh and bootstrap ----------------------------------------------------------------


def test_stale_buckets_are_refreshed_by_random_lookups() -> None:
    cfg = DhtConfig(k=6, alpha=3, query_timeout=1.0, refresh_interval=100.0, refresh_check=10.0)
    net = FakeNet(cfg)
    cores = net.build(40)
    c = cores[7]
    sent = net.sent
    refreshes = c.stats["refreshes"]
    net.run(net.now + 150.0)  # nobody talks: every bucket goes stale
    assert c.stats["refreshes"] > refreshes
    assert net.sent > sent
    assert c.table.stale_buckets(100.0, net.now) == []  # touched again by the refresh
    i = 3
    rid = c.random_id_in_bucket(i)
    assert c.table.bucket_of(rid) == i


def test_bootstrap_fills_the_table_from_one_seed() -> None:
    net = FakeNet(DhtConfig(k=8, alpha=3, query_timeout=1.0))
    cores = net.build(50)
    newcomer = net.add()
    lid = newcomer.bootstrap([net.contacts[cores[0].node_id],
                              Contact(rid_of(net.rng), "10.9.9.9", 9)], now=net.now)
    net.pump(newcomer)
    net.settle(5.0)
    done = net.done[(newcomer.node_id, lid)]
    assert isinstance(done, LookupDone)
    want = brute_closest([i for i in net.nodes if i != newcomer.node_id], newcomer.node_id, 8)
    assert [c.node_id for c in done.contacts] == want
    assert len(newcomer.table) >= 8
    # the others learned about it too (it queried them)
    assert sum(newcomer.node_id in c.table for c in cores) >= 8
    with pytest.raises(TypeError, match="seeds must be Contact"):
        newcomer.bootstrap([("127.0.0.1", 1)], now=net.now)  # type: ignore[list-item]


def test_late_and_unknown_responses_are_ignored() -> None:
    core = DhtCore(b"\x07" * 32, now=0.0)
    core.receive_response(12345, Pong(12345), now=0.0)
    core.receive_failure(999, now=0.0)
    assert core.stats["late_replies"] == 1 and core.queries_in_flight == 0


def test_bootstrap_retries_when_no_seed_answers() -> None:
    net = FakeNet(DhtConfig(k=8, alpha=3, query_timeout=1.0, bootstrap_attempts=3))
    cores = net.build(20)
    seed = cores[0]
    newcomer = net.add()
    net.dead.add(seed.node_id)  # the seed is down during the first attempt
    lid = newcomer.bootstrap([net.contacts[seed.node_id]], now=net.now)
    net.pump(newcomer)
    net.run(net.now + 0.5)  # the first query was lost; it times out at 1 s, then a retry
    net.dead.discard(seed.node_id)
    net.settle(5.0)
    done = net.done[(newcomer.node_id, lid)]
    assert isinstance(done, LookupDone) and len(done.contacts) == 8
    assert newcomer.stats["timeouts"] == 1 and len(newcomer.table) >= 8
    # and gives up after bootstrap_attempts, reporting no contacts
    lonely = net.add()
    net.dead.add(seed.node_id)
    lid = lonely.bootstrap([net.contacts[seed.node_id]], now=net.now)
    net.pump(lonely)
    net.settle(10.0)
    done = net.done[(lonely.node_id, lid)]
    assert isinstance(done, LookupDone) and done.contacts == []
    assert lonely.stats["timeouts"] == 3


# -- the store walk -----------------------------------------------------------------------


def drain(core: DhtCore) -> list[SendRequest]:
    out = []
    while (a := core.next_action()) is not None:
        assert isinstance(a, SendRequest)
        out.append(a)
    return out


def answer(net: FakeNet, src: DhtCore, sends: list[SendRequest]) -> list[Any]:
    """Deliver ``sends`` to live nodes and hand their replies back at once (no clock)."""
    replies = []
    for a in sends:
        if a.contact.node_id in net.dead:
            continue
        dst = net.nodes[a.contact.node_id]
        reply = dst.receive_request(net.contacts[src.node_id], a.msg, net.now)
        dst.next_action()  # (a full bucket's LRS ping, not delivered here)
        src.receive_response(a.rid, reply, net.now)
        replies.append(reply)
    return replies


def holders_of(net: FakeNet, key: bytes) -> set[bytes]:
    return {nid for nid, c in net.nodes.items() if c.store.get(key, net.now)}


def converged(n: int, k: int, seed: int = 1) -> tuple[FakeNet, list[DhtCore]]:
    """n nodes whose tables hold every other node (no bucket is full)."""
    net = FakeNet(DhtConfig(k=k, alpha=3, query_timeout=1.0), seed=seed)
    cores = net.build(n)
    for c in cores:
        for nid in net.nodes:
            if nid != c.node_id:
                c.table.add(nid, net.contacts[nid], net.now)
        assert len(c.table) == n - 1 and all(len(c.table.bucket(i)) < k for i in range(256))
    return net, cores


def test_store_walk_in_a_converged_network_is_one_round_of_k_stores() -> None:
    net, cores = converged(30, 20)
    rng = random.Random(6)
    for _ in range(10):
        pub = rng.choice(cores)
        key = rid_of(rng)
        want = brute_closest(list(net.nodes), key, 20)
        op = pub.put(key, b"v", 60.0, now=net.now)
        sends = drain(pub)
        # all at once, not alpha-limited: a STORE to each of the k closest but ourselves
        assert all(isinstance(a.msg, Store) for a in sends)
        assert {a.contact.node_id for a in sends} == set(want) - {pub.node_id}
        # the acks carry the storers' closest contacts, all known already: no second round
        for r in answer(net, pub, sends):
            assert r.ok and {c.node_id for c in r.contacts} <= set(net.nodes) - {pub.node_id}
            assert len(r.contacts) == 20
        done = pub.next_action()
        assert isinstance(done, StoreDone) and done.op_id == op  # no second round
        assert (done.stored, done.refused, done.failed) == (20, 0, 0)
        assert holders_of(net, key) == set(want)  # a local copy when we are one of them
        assert pub.next_action() is None and pub.queries_in_flight == 0


def test_store_walk_sends_a_store_to_a_closer_node_revealed_by_an_ack() -> None:
    net, cores = converged(30, 20, seed=2)
    rng = random.Random(8)
    key = rid_of(rng)
    want = brute_closest(list(net.nodes), key, 20)
    pub = next(c for c in cores if c.node_id not in want)
    hidden = want[0]  # the closest node to the key, unknown to the publisher
    assert pub.table.remove(hidden)
    op = pub.put(key, b"v", 60.0, now=net.now)
    first = drain(pub)
    assert hidden not in {a.contact.node_id for a in first} and len(first) == 20
    # the storers know `hidden`: their acks name it, and it gets a STORE of its own
    assert all(hidden in {c.node_id for c in r.contacts} for r in answer(net, pub, first))
    second = drain(pub)
    assert [(a.contact.node_id, type(a.msg)) for a in second] == [(hidden, Store)]
    answer(net, pub, second)
    done = pub.next_action()
    assert isinstance(done, StoreDone) and done.op_id == op
    # every one of the k closest holds it; the 21st, stored to before `hidden` was known,
    # keeps its (extra) copy too
    assert done.stored == 21 and holders_of(net, key) >= set(want)
    assert len(holders_of(net, key)) == 21


def test_store_walk_failures_do_not_stall_it() -> None:
    net, cores = converged(30, 20, seed=3)
    rng = random.Random(4)
    key = rid_of(rng)
    want = brute_closest(list(net.nodes), key, 20)
    pub = next(c for c in cores if c.node_id not in want)
    dead = set(want[:3])
    net.dead.update(dead)
    op = pub.put(key, b"v", 60.0, now=net.now)
    net.pump(pub)
    net.run(net.now + 1.0 + 4 * LAT)  # one query timeout, then a round to the next ones
    done = net.done[(pub.node_id, op)]
    assert isinstance(done, StoreDone)
    assert (done.stored, done.failed) == (20, 3)
    live = [i for i in net.nodes if i not in dead]
    assert holders_of(net, key) == set(brute_closest(live, key, 20))
    assert pub.stats["timeouts"] == 3 and pub.queries_in_flight == 0


def test_put_ends_on_exactly_the_k_closest_of_a_200_node_network() -> None:
    net = FakeNet(DhtConfig(k=8, alpha=3, query_timeout=1.0), seed=5)
    cores = net.build(200)
    rng = random.Random(12)
    sure = 0
    for _ in range(40):
        pub = rng.choice(cores)
        key = rid_of(rng)
        # the table covers the key's neighbourhood (its buckets there are not full)?
        covers = pub._table_covers(key, pub.table.closest(key, 8))
        sure += covers
        out = pub.stats["queries_out"]
        done = net.put(pub, key, b"v")
        assert (done.stored, done.refused, done.failed) == (8, 0, 0)
        # exactly: no copy left on a node that a closer one displaced
        assert holders_of(net, key) == set(brute_closest(list(net.nodes), key, 8))
        queries = pub.stats["queries_out"] - out
        if covers:
            assert queries <= 8  # one round: a STORE to each of the k closest (but us)
        else:
            assert 8 < queries <= 8 + 3 * 8  # FIND_NODE probes first, then the 8 STOREs
    assert 0 < sure < 40  # both ways were taken (seed 5: 6 of 40 keys covered)


def test_store_walk_counts_an_oversized_ack_as_a_failure() -> None:
    net, cores = converged(30, 20, seed=4)
    rng = random.Random(5)
    key = rid_of(rng)
    want = brute_closest(list(net.nodes), key, 21)
    pub = next(c for c in cores if c.node_id not in want)
    bad = want[0]
    zero = Contact(b"\x00" * 32, "x", 1)
    net.garbage[bad] = lambda r: dm.StoreAck(r.rid, True, "", [zero] * 41)  # > 2k contacts
    done = net.put(pub, key, b"v")
    assert (done.stored, done.failed) == (20, 1)  # it stored, but its ack is refused
    assert pub.stats["bad_replies"] == 1 and zero.node_id not in pub.table
    assert holders_of(net, key) == set(want)  # and the 21st closest got a STORE too


def test_a_watching_reader_is_told_of_each_change_until_its_watch_expires() -> None:
    rng = random.Random(7)
    core = DhtCore(rid_of(rng), config=DhtConfig(k=4, watch_ttl=10.0, max_watchers=2),
                   now=0.0)
    pub, reader, other, third = (Contact(rid_of(rng), "10.0.0.2", 1000 + i) for i in range(4))
    key = rid_of(rng)
    core.receive_request(pub, Store(1, key, b"v1", 60.0), now=0.0)
    assert core.next_action() is None  # nobody watches yet
    core.receive_request(reader, FindValue(2, key, True), now=1.0)  # reads and watches
    core.receive_request(other, FindValue(3, key), now=1.0)  # reads only
    core.receive_request(pub, Store(4, key, b"v2", 60.0), now=2.0)
    assert core.next_action() == KeyChanged(key, pub.node_id, b"v2", [reader])
    core.receive_request(pub, Store(5, key, b"v2", 60.0), now=3.0)  # a republish: no change
    assert core.next_action() is None
    core.receive_request(pub, Store(6, key, b"v3", 60.0), now=11.5)  # the watch expired
    assert core.next_action() is None
    # at most max_watchers per key: the oldest registration goes, counted
    for i, c in enumerate((reader, other, third)):
        core.receive_request(c, FindValue(7 + i, key, True), now=12.0)
    core.receive_request(pub, Store(10, key, b"v4", 60.0), now=13.0)
    assert core.next_action() == KeyChanged(key, pub.node_id, b"v4", [other, third])
    assert core.stats["watches_dropped"] == 1 and core.stats["changes_told"] == 3


def test_a_watching_lookup_is_told_of_a_later_put_from_any_node() -> None:
    net = FakeNet(DhtConfig(k=4, alpha=3, query_timeout=1.0))
    cores = net.build(12)
    key = dht_key("realm", "sub", "a")
    reader, writer = cores[3], cores[9]
    assert net.lookup(reader, key, want_value=True, watch=True).records == []
    net.put(writer, key, b"hello")
    told = [a for _, a in net.changes if reader.node_id in {w.node_id for w in a.watchers}]
    assert told, "no holder told the watching reader"
    assert all(a.value == b"hello" and a.publisher == writer.node_id for a in told)
    # a reader that did not ask to watch is told nothing
    other = cores[5]
    net.lookup(other, key, want_value=True)
    net.changes.clear()
    net.put(writer, key, b"again")
    assert net.changes and not any(
        other.node_id in {w.node_id for w in a.watchers} for _, a in net.changes)
