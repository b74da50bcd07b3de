"""One delivery shard: a worker process that matches published messages and builds EVENTs.

Run by the node as ``python -m macula.shards ENDPOINT INDEX EPOCH MAX_BATCH``. The
shard connects a DEALER (routing id ``shard_identity(INDEX)``) to the node's bus ROUTER, says
hello (``[b"H", epoch]``), then serves messages until told to stop (``[b"X"]``), until the
node's process is gone (checked every half second), or until killed.

State: the plain subscriptions of the node's sessions whose ``sid % shards == INDEX``, one
:class:`~macula.TopicTrie` per realm. A trie key is an :class:`Entry`, one per distinct
``(realm, filter)``, holding every subscription to that filter: subscribers sharing a filter
share the work of matching it (a match costs the same for 1 or 25,000 of them).

Node -> shard messages are segments, each two frames ``[kind, msgpack]``, applied in order:

- ``b"O"``: operations ``(0, sid, realm, filter, sub_id, qos)`` subscribe or change QoS,
  ``(1, sid, sub_id)`` unsubscribe, ``(2, sid)`` the session ended;
- ``b"P"``: published messages ``(realm, topic, tail, qos, seq)``; ``tail`` is the msgpack of
  ``topic, payload, retain`` made once by the node, ``seq`` > 0 for QoS 1.

The shard answers each message carrying published messages (together with any
operations-only messages before it) once (see :data:`REPLY`): per session one chunk of
finished QoS 0 EVENT commands (a precomputed per-subscription prefix + the shared tail,
joined per session and message through a cached per-topic plan, see :class:`Shard`; a chunk
is a whole body of at most MAX_BATCH commands, array header included, and travels as a
frame of its own that the node forwards to the client without copying it), and
for each QoS 1 message the number of matching subscriptions and the ``sid, sub_id`` pairs to
deliver at QoS 1 (the node owns the QoS 1 windows, so that a shard's death loses no delivery
state). The reply also carries the shard's counters (messages, matched, delivered, busy
nanoseconds, subscriptions, sessions).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import msgspec
import zmq

from macula import TopicTrie
from macula.control import protocol as p

_EVENT_HEAD = b"\x97" + bytes((int(p.Code.EVENT),))

# A reply is one frame of msgpack (below), then one frame per body of EVENT commands:
# (answered messages, [sid, n, sid, n, ...] naming the body frames that follow,
#  [(seq, matched, [sid, sub_id, ...])], (messages, matched, delivered, busy_ns,
#  subscriptions, sessions))
REPLY = tuple[
    int,
    list[int],
    list[tuple[int, int, list[int]]],
    tuple[int, int, int, int, int, int],
]
OPS = list[tuple[int, ...] | tuple[int, int, str, str, int, int]]
PUBS = list[tuple[str, str, bytes, int, int]]


def shard_identity(index: int) -> bytes:
    return b"shard-%d" % index


class Entry:
    """Every subscription (of this shard's sessions) to one filter of one realm."""

    __slots__ = ("filter", "realm", "subs")

    def __init__(self, realm: str, filter: str) -> None:
        self.realm = realm
        self.filter = filter
        self.subs: dict[Sub, None] = {}


class Sess:
    __slots__ = ("buf", "n", "sealed", "sid", "subs")

    def __init__(self, sid: int) -> None:
        self.sid = sid
        self.buf: list[bytes] = []  # this round's QoS 0 EVENT bytes, not yet joined
        self.n = 0  # EVENTs in buf
        self.sealed: list[tuple[int, bytes]] = []  # full chunks of this round
        self.subs: dict[int, Sub] = {}


class Sub:
    __slots__ = ("entry", "pre0", "qos", "sess", "sub_id")

    def __init__(self, sess: Sess, sub_id: int, qos: int, entry: Entry) -> None:
        self.sess = sess
        self.sub_id = sub_id
        self.qos = qos
        self.entry = entry
        self.pre0 = _EVENT_HEAD + p.pack_uint(sub_id) + b"\x00\x00"


# A topic's plan for QoS 0: per session, the EVENT prefixes of its matching subscriptions
# (at most max_batch per item). The EVENTs for a message are then ``tail.join(prefixes) +
# tail``: one C-level join per session, whatever its number of matching subscriptions.
Plan = tuple[list[tuple[Sess, list[bytes], int]], int]
PLAN_AT = 256  # subscriptions matched from which a topic is planned the first time it is met


class Shard:
    """The sans-IO state of a shard: ``ops`` and ``publish`` in, ``take`` out.

    A plan is made for a topic the second time it is met, or the first time when it
    matches at least ``plan_at`` subscriptions; plans are cached per ``(realm, topic)`` (at
    most ``max_plans``) and all dropped when a subscription is added or removed, so a steady
    stream of messages on known topics costs one dict look-up and one join per receiving
    session and message. A small fan-out on a topic met once (a stream of distinct topics),
    or a QoS 1 message, walks the matching subscriptions one by one (two list appends per
    delivery), which costs no more than making a plan that would not be used again.
    """

    def __init__(
        self, max_batch: int = 4096, max_plans: int = 10_000, plan_at: int = PLAN_AT
    ) -> None:
        self.max_batch = max_batch
        self.max_plans = max_plans
        self.plan_at = plan_at
        self.tries: dict[str, TopicTrie] = {}
        self.entries: dict[tuple[str, str], Entry] = {}
        self.sessions: dict[int, Sess] = {}
        self.messages = 0
        self.matched = 0
        self.delivered = 0
        self.subscriptions = 0
        self._plans: dict[tuple[str, str], Plan] = {}
        self._seen: set[tuple[str, str]] = set()  # topics met once since their plan went
        self._dirty: list[Sess] = []
        self._q1: list[tuple[int, int, list[int]]] = []

    # -- subscriptions --------------------------------------------------------------------
    def ops(self, ops: OPS) -> None:
        for op in ops:
            kind = op[0]
            if kind == 0:
                _, sid, realm, flt, sub_id, qos = op
                self.subscribe(int(sid), str(realm), str(flt), int(sub_id), int(qos))
            elif kind == 1:
                self.unsubscribe(int(op[1]), int(op[2]))
            elif kind == 2:
                self.drop_session(int(op[1]))

    def subscribe(self, sid: int, realm: str, flt: str, sub_id: int, qos: int) -> None:
        sess = self.sessions.get(sid)
        if sess is None:
            sess = self.sessions[sid] = Sess(sid)
        old = sess.subs.get(sub_id)
        if old is not None:
            old.qos = qos  # a QoS 0 plan is the same for every subscription QoS
            return
        entry = self.entries.get((realm, flt))
        if entry is None:
            entry = self.entries[(realm, flt)] = Entry(realm, flt)
            trie = self.tries.get(realm)
            if trie is None:
                trie = self.tries[realm] = TopicTrie()
            trie.add(flt, entry)
        sub = sess.subs[sub_id] = Sub(sess, sub_id, qos, entry)
        entry.subs[sub] = None
        self.subscriptions += 1
        self._plans.clear()

    def unsubscribe(self, sid: int, sub_id: int) -> None:
        sess = self.sessions.get(sid)
        sub = sess.subs.pop(sub_id, None) if sess is not None else None
        if sub is not None:
            self._forget(sub)

    def drop_session(self, sid: int) -> None:
        sess = self.sessions.pop(sid, None)
        if sess is not None:
            for sub in sess.subs.values():
                self._forget(sub)
            sess.subs.clear()

    def _forget(self, sub: Sub) -> None:
        entry = sub.entry
        del entry.subs[sub]
        self.subscriptions -= 1
        self._plans.clear()
        if not entry.subs:
            del self.entries[(entry.realm, entry.filter)]
            self.tries[entry.realm].remove(entry.filter, entry)

    # -- messages -------------------------------------------------------------------------
    def _plan(self, realm: str, topic: str, entries: list[Entry]) -> Plan:
        per: dict[Sess, list[bytes]] = {}
        total = 0
        for e in entries:
            for sub in e.subs:
                pres = per.get(sub.sess)
                if pres is None:
                    pres = per[sub.sess] = []
                pres.append(sub.pre0)
            total += len(e.subs)
        cap = self.max_batch
        items = []
        for sess, pres in per.items():
            for i in range(0, len(pres), cap):
                part = pres[i:i + cap]
                items.append((sess, part, len(part)))
        plans = self._plans
        if len(plans) >= self.max_plans:
            plans.clear()
        plan = plans[(realm, topic)] = (items, total)
        return plan

    def publish(self, pubs: PUBS) -> None:
        plans = self._plans
        seen = self._seen
        tries = self.tries
        plan_at = self.plan_at
        dirty = self._dirty
        cap = self.max_batch
        matched = delivered = 0
        for realm, topic, tail, qos, seq in pubs:
            if qos:
                targets: list[int] = []
                trie = self.tries.get(realm)
                total, built = self._direct(trie.match(topic) if trie is not None else [],
                                            tail, targets)
                matched += total
                delivered += built + len(targets) // 2
                self._q1.append((seq, total, targets))
                continue
            key = (realm, topic)
            plan = plans.get(key)
            if plan is None:
                trie = tries.get(realm)
                if trie is None:
                    continue
                entries = trie.match(topic)
                if not entries:
                    continue
                if key not in seen:
                    fan = 0
                    for e in entries:
                        fan += len(e.subs)
                    if fan < plan_at:
                        # a small fan-out on a topic met once: built directly, not planned
                        if len(seen) >= self.max_plans:
                            seen.clear()
                        seen.add(key)
                        total, built = self._direct(entries, tail, None)
                        matched += total
                        delivered += built
                        continue
                else:
                    seen.discard(key)
                plan = self._plan(realm, topic, entries)
            items, total = plan
            for sess, pres, k in items:
                buf = sess.buf
                n = sess.n + k
                if not buf:
                    if not sess.sealed:
                        dirty.append(sess)
                elif n > cap:  # a chunk holds at most max_batch EVENTs
                    sess.sealed.append((sess.n, _body(sess.n, buf)))
                    buf = sess.buf = []
                    n = k
                buf.append(pres[0] if k == 1 else tail.join(pres))
                buf.append(tail)
                sess.n = n
            matched += total
            delivered += total
        self.messages += len(pubs)
        self.matched += matched
        self.delivered += delivered

    def _direct(self, entries: list[Entry], tail: bytes,
                targets: list[int] | None) -> tuple[int, int]:
        """Build one message's EVENTs without a plan: ``(matched, EVENTs built)``. With
        ``targets`` (a QoS 1 message) the QoS 1 subscriptions are listed there instead."""
        dirty = self._dirty
        cap = self.max_batch
        matched = built = 0
        for e in entries:
            subs = e.subs
            matched += len(subs)
            for sub in subs:
                if targets is not None and sub.qos:
                    targets.append(sub.sess.sid)
                    targets.append(sub.sub_id)
                    built -= 1
                    continue
                sess = sub.sess
                buf = sess.buf
                n = sess.n
                if not buf:
                    if not sess.sealed:
                        dirty.append(sess)
                elif n >= cap:
                    sess.sealed.append((n, _body(n, buf)))
                    buf = sess.buf = []
                    n = 0
                buf.append(sub.pre0)
                buf.append(tail)
                sess.n = n + 1
        return matched, matched + built

    def take(self) -> tuple[list[tuple[int, int, bytes]], list[tuple[int, int, list[int]]]]:
        """This round's output: QoS 0 bodies ``(sid, n, body)`` (``n`` EVENTs behind the
        array header), and QoS 1 matches per message."""
        chunks: list[tuple[int, int, bytes]] = []
        for sess in self._dirty:
            sid = sess.sid
            if sess.sealed:
                chunks += [(sid, n, c) for n, c in sess.sealed]
                sess.sealed = []
            if sess.buf:
                chunks.append((sid, sess.n, _body(sess.n, sess.buf)))
                sess.buf = []
                sess.n = 0
        self._dirty = []
        q1, self._q1 = self._q1, []
        return chunks, q1


def _body(n: int, parts: list[bytes]) -> bytes:
    """A whole body: the array header of ``n`` commands, then the commands."""
    parts.insert(0, p.array_header(n))
    return b"".join(parts)


def serve(endpoint: str, index: int, epoch: int, max_batch: int) -> int:
    """The shard's main loop (blocking)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the node, which stops us
    ppid = os.getppid()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, shard_identity(index))
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(endpoint)
    sock.send_multipart([b"H", p.encode(epoch)])
    shard = Shard(max_batch)
    ops_dec: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder()
    pubs_dec = msgspec.msgpack.Decoder(PUBS)
    encode = msgspec.msgpack.Encoder().encode
    busy = 0
    recv = sock.recv_multipart
    try:
        while True:
            if not sock.poll(500):
                if os.getppid() != ppid:
                    return 0  # the node is gone
                continue
            answered = 0
            t0 = time.perf_counter_ns()
            while answered < 64:  # operations-only messages are answered together
                try:
                    frames = recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                answered += 1
                published = False
                for i in range(0, len(frames) - 1, 2):
                    kind = frames[i]
                    if kind == b"P":
                        shard.publish(pubs_dec.decode(frames[i + 1]))
                        published = True
                    elif kind == b"O":
                        shard.ops(ops_dec.decode(frames[i + 1]))
                if frames[0] == b"X":
                    return 0
                if published:  # one reply per batch of messages: the node sends it whole
                    break
            chunks, q1 = shard.take()
            heads: list[int] = []
            out: list[bytes] = [b""]
            for sid, n, chunk in chunks:
                heads += (sid, n)
                out.append(chunk)
            busy += time.perf_counter_ns() - t0
            stats = (shard.messages, shard.matched, shard.delivered, busy,
                     shard.subscriptions, len(shard.sessions))
            out[0] = encode((answered, heads, q1, stats))
            sock.send_multipart(out)
    finally:
        sock.close()
        ctx.term()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 4:
        print("usage: python -m macula.shards ENDPOINT INDEX EPOCH MAX_BATCH",
              file=sys.stderr)
        return 2
    try:
        return serve(args[0], int(args[1]), int(args[2]), int(args[3]))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
