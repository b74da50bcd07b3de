"""The node's side of the delivery shards: processes, the ROUTER bus, batching, restarts.

:class:`ShardPool` is the broker's :class:`~macula.control.broker.Fanout`. It starts N worker
processes (``python -m macula.shards``), each joined by a DEALER to one ROUTER the
node binds on an ``ipc://`` endpoint in a private temporary directory. Session ``sid`` lives
on shard ``sid % N``.

Batching
    What the broker asks for during one loop iteration is collected, then sent by
    :meth:`flush` (which the control server calls before it sends to clients): at most one
    ZeroMQ message per shard per iteration. Published messages form *runs*: a run is encoded
    once (msgpack of ``(realm, topic, tail, qos, seq)`` entries, where ``tail`` already holds
    the message's bytes as every EVENT carries them) and the same bytes go to every shard.
    A subscription change cuts the run, so that each shard applies operations and messages
    in the order the node saw them. The node's work per PUBLISH is therefore one tuple
    append, its share of one encode, and nothing per subscriber.

Replies
    Each shard answers every message with the finished QoS 0 EVENT bytes per session (handed
    to :meth:`Broker.deliver`; the control server then sends each session one body) and, per
    QoS 1 message, its matches. A QoS 1 message is complete when every shard has answered it
    (:meth:`Broker.finish_publish` queues the QoS 1 deliveries and sends the PUBACK).

Failures
    :meth:`check` (on every timer tick) notices a shard process that exited (``Popen.poll``)
    and starts a new one (the same routing id; the ROUTER has ``ROUTER_HANDOVER``). When it
    says hello, it is given the subscriptions of its sessions again (the broker keeps them),
    then every QoS 1 message it had not answered. QoS 0 messages sent to the dead process,
    or published while it was down, are lost for its sessions (at most once; counted per
    shard as ``missed``); QoS 1 deliveries already made are in the broker's windows and are
    redelivered by the usual ``ack_timeout`` rule if they were not acknowledged, never if they
    were.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, cast

import msgspec
import zmq

from macula.control.broker import Broker, Session, Subscription
from macula.shards.worker import REPLY, shard_identity

_reply_dec = msgspec.msgpack.Decoder(REPLY)
_encode = msgspec.msgpack.Encoder().encode
_P = b"P"
_O = b"O"


def _sub_op(s: Session, sub: Subscription) -> tuple[int, int, str, str, int, int]:
    """The operation giving a shard ``sub`` (new, or its QoS changed)."""
    return (0, s.sid, s.realm.name, sub.inner, sub.sub_id, sub.qos)


class ShardProc:
    """The node's record of one shard."""

    __slots__ = (
        "backoff",
        "busy_ns",
        "delivered",
        "epoch",
        "frames",
        "ident",
        "index",
        "matched",
        "messages",
        "missed",
        "ops",
        "outstanding",
        "proc",
        "restarts",
        "retry_at",
        "sessions",
        "started",
        "subscriptions",
        "up",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.ident = shard_identity(index)
        self.proc: subprocess.Popen[bytes] | None = None
        self.epoch = 0
        self.up = False
        self.started = 0.0
        self.backoff = 0.0  # seconds to wait before the next start (a shard dying young)
        self.retry_at = 0.0  # when to start it again (0: not scheduled)
        self.frames: list[bytes] = []  # this iteration's segments, in order
        self.ops: list[tuple[Any, ...]] = []  # operations not yet put in a segment
        self.outstanding = 0  # messages sent and not yet answered (the queue depth)
        self.restarts = 0
        self.missed = 0  # published messages this shard never got (it was down)
        self.messages = self.matched = self.delivered = self.busy_ns = 0
        self.subscriptions = self.sessions = 0


class _Q1:
    __slots__ = ("entry", "matched", "targets", "waiting")

    def __init__(self, entry: tuple[str, str, bytes, int, int], waiting: set[int]) -> None:
        self.entry = entry
        self.waiting = waiting
        self.matched = 0
        self.targets: list[int] = []


class ShardPool:
    """N shard processes behind a ROUTER; implements the broker's ``Fanout``."""

    def __init__(
        self,
        broker: Broker,
        count: int,
        *,
        start_timeout: float = 30.0,
        max_backlog: int = 1000,
        python: str = sys.executable,
    ) -> None:
        if count < 1:
            raise ValueError("a shard pool needs at least one shard")
        self.broker = broker
        self.count = count
        self.start_timeout = start_timeout
        self.max_backlog = max_backlog
        self.python = python
        self.shards = [ShardProc(i) for i in range(count)]
        self.on_output: Callable[[float], None] = lambda now: None
        self.running = False
        self._run: list[tuple[str, str, bytes, int, int]] = []
        self._ops_pending: list[ShardProc] = []
        self._q1: dict[int, _Q1] = {}
        self._dir = ""
        self.endpoint = ""
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._sock: zmq.Socket[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1
        self._scheduled = False
        self._all_up: asyncio.Event | None = None

    # -- life cycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Bind the bus, start every shard, and return once all said hello."""
        loop = self._loop = asyncio.get_running_loop()
        self._dir = tempfile.mkdtemp(prefix="macula-shards-")
        self.endpoint = f"ipc://{self._dir}/bus"
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context(io_threads=1)
        self._ctx = ctx
        sock = self._sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.endpoint)
        self._fd = cast(int, sock.getsockopt(zmq.FD))
        loop.add_reader(self._fd, self._on_readable)
        self.running = True
        self._all_up = asyncio.Event()
        for sh in self.shards:
            self._spawn(sh)
        try:
            await asyncio.wait_for(self._all_up.wait(), self.start_timeout)
        except asyncio.TimeoutError:
            await self.stop()
            raise RuntimeError(
                f"delivery shards did not start within {self.start_timeout} s") from None

    async def stop(self) -> None:
        """Tell every shard to stop, wait a little, kill what is left, close the bus."""
        if not self.running:
            return
        self.running = False
        loop = self._loop
        sock = self._sock
        assert loop is not None and sock is not None
        loop.remove_reader(self._fd)
        for sh in self.shards:
            if sh.up:
                with contextlib.suppress(zmq.ZMQError):
                    sock.send_multipart([sh.ident, b"X", b""], zmq.NOBLOCK)
            elif sh.proc is not None and sh.proc.poll() is None:
                sh.proc.kill()  # still starting: it holds nothing
        deadline = time.monotonic() + 2.0
        for sh in self.shards:
            proc = sh.proc
            if proc is None:
                continue
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            sh.up = False
        sock.close(0)
        if self._ctx is not None:
            self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _spawn(self, sh: ShardProc) -> None:
        sh.epoch += 1
        sh.up = False
        sh.outstanding = 0
        sh.messages = sh.matched = sh.delivered = sh.busy_ns = 0  # this process's figures
        sh.subscriptions = sh.sessions = 0
        sh.frames = []
        sh.ops = []
        sh.started = time.monotonic()
        sh.proc = subprocess.Popen(
            [self.python, "-m", "macula.shards", self.endpoint, str(sh.index),
             str(sh.epoch), str(self.broker.limits.max_batch)],
            stdin=subprocess.DEVNULL,
        )

    def check(self, now: float) -> None:
        """Restart every shard process that exited (called on the node's timer).

        A process that dies within a second of its start is restarted after a back-off
        (0.1 s, doubling up to 5 s), so that a shard that cannot start does not spin."""
        if not self.running:
            return
        self._recheck()
        mono = time.monotonic()
        for sh in self.shards:
            proc = sh.proc
            if proc is None or proc.poll() is None:
                continue
            sh.up = False
            if sh.retry_at == 0.0:  # just found dead
                young = mono - sh.started < 1.0
                sh.backoff = (min(sh.backoff * 2, 5.0) if sh.backoff else 0.1) if young else 0.0
                sh.retry_at = mono + sh.backoff
            if mono >= sh.retry_at:
                sh.retry_at = 0.0
                sh.restarts += 1
                self._spawn(sh)

    def pids(self) -> list[int]:
        return [sh.proc.pid if sh.proc is not None else 0 for sh in self.shards]

    # -- Fanout (called by the broker) ----------------------------------------------------
    def subscribe(self, s: Session, sub: Subscription) -> None:
        self._op(s.sid, _sub_op(s, sub))

    def unsubscribe(self, s: Session, sub: Subscription) -> None:
        self._op(s.sid, (1, s.sid, sub.sub_id))

    def session_closed(self, s: Session) -> None:
        if s.subs:
            self._op(s.sid, (2, s.sid))

    def _op(self, sid: int, op: tuple[Any, ...]) -> None:
        if self._run:
            self._cut()
        sh = self.shards[sid % self.count]
        if not sh.ops:
            self._ops_pending.append(sh)
        sh.ops.append(op)

    def publish(self, realm: str, topic: str, tail: bytes, qos: int, seq: int) -> None:
        if self._ops_pending:
            self._close_ops()
        entry = (realm, topic, tail, qos, seq)
        self._run.append(entry)
        if seq:
            self._q1[seq] = _Q1(entry, {sh.index for sh in self.shards})

    def _close_ops(self) -> None:
        for sh in self._ops_pending:
            sh.frames += (_O, _encode(sh.ops))
            sh.ops = []
        self._ops_pending = []

    def _cut(self) -> None:
        """Encode the current run of messages once; every shard gets the same bytes."""
        run = self._run
        body = _encode(run)
        for sh in self.shards:
            if sh.up:
                sh.frames += (_P, body)
            else:  # QoS 1 messages are kept in _q1 and given to it when it is back
                sh.missed += sum(1 for e in run if not e[3])
        self._run = []

    def flush(self) -> None:
        """Send each shard this iteration's segments as one message."""
        if self._run:
            self._cut()
        if self._ops_pending:
            self._close_ops()
        sock = self._sock
        if sock is None:
            return
        for sh in self.shards:
            frames = sh.frames
            if not frames:
                continue
            sh.frames = []
            if not sh.up:
                continue
            if sh.outstanding >= self.max_backlog and sh.proc is not None:
                sh.proc.kill()  # hung: check() restarts it and gives it its state again
                sh.up = False
                continue
            try:
                sock.send(sh.ident, zmq.SNDMORE | zmq.NOBLOCK)
                sock.send_multipart(frames, zmq.NOBLOCK)
                sh.outstanding += 1
            except zmq.ZMQError:  # gone: check() will restart it
                sh.up = False
        self._recheck()

    def _recheck(self) -> None:
        """The ZeroMQ FD is edge-triggered and reset by sends: look for waiting replies."""
        sock = self._sock
        if self._scheduled or sock is None or not self.running or self._loop is None:
            return
        if cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            self._scheduled = True
            self._loop.call_soon(self._on_readable)

    # -- replies --------------------------------------------------------------------------
    def _on_readable(self) -> None:
        self._scheduled = False
        sock = self._sock
        loop = self._loop
        if sock is None or loop is None or not self.running:
            return
        n = 0
        while n < 256:
            try:  # Frames, not bytes: the bodies inside are sent on without a copy
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            n += 1
            ident = frames[0].bytes
            try:
                sh = self.shards[int(ident[6:])]
            except (ValueError, IndexError):
                continue
            if frames[1].bytes == b"H":
                self._hello(sh, msgspec.msgpack.decode(frames[2].bytes))
            else:
                self._reply(sh, frames)
            self.on_output(loop.time())  # a reply is a batch: send it before the next
        if n >= 256 and not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._on_readable)
        self._recheck()

    def _hello(self, sh: ShardProc, epoch: int) -> None:
        if epoch != sh.epoch:
            return
        self.flush()  # what was meant for the dead process is dropped; the rest goes out
        sh.up = True
        ops: list[tuple[Any, ...]] = []
        n = self.count
        for s in self.broker.by_sid.values():
            if s.sid % n == sh.index:
                ops += [_sub_op(s, sub) for sub in s.subs.values() if sub.group is None]
        frames = [_O, _encode(ops)]
        again = [q.entry for q in self._q1.values() if sh.index in q.waiting]
        if again:
            frames += (_P, _encode(again))
        sh.frames = frames
        self.flush()
        all_up = self._all_up
        if all_up is not None and all(x.up for x in self.shards):
            all_up.set()

    def _reply(self, sh: ShardProc, frames: list[zmq.Frame]) -> None:
        answered, heads, q1, stats = _reply_dec.decode(frames[1].buffer)
        sh.outstanding = max(0, sh.outstanding - answered)
        (sh.messages, sh.matched, sh.delivered, sh.busy_ns, sh.subscriptions,
         sh.sessions) = stats
        broker = self.broker
        deliver = broker.deliver
        for i in range(0, len(heads), 2):
            deliver(heads[i], heads[i + 1], frames[2 + (i >> 1)])
        if q1:
            pending = self._q1
            index = sh.index
            for seq, matched, targets in q1:
                q = pending.get(seq)
                if q is None or index not in q.waiting:
                    continue  # answered before (by the process that died)
                q.waiting.discard(index)
                q.matched += matched
                q.targets += targets
                if not q.waiting:
                    del pending[seq]
                    broker.finish_publish(seq, q.matched, q.targets)

    # -- figures --------------------------------------------------------------------------
    def stats(self) -> list[dict[str, Any]]:
        return [
            {
                "shard": sh.index,
                "up": int(sh.up),
                "pid": sh.proc.pid if sh.proc is not None else 0,
                "restarts_total": sh.restarts,
                "queue_depth": sh.outstanding,
                "busy_seconds_total": sh.busy_ns / 1e9,
                "messages_total": sh.messages,
                "matched_total": sh.matched,
                "delivered_total": sh.delivered,
                "missed_total": sh.missed,
                "subscriptions": sh.subscriptions,
                "sessions": sh.sessions,
            }
            for sh in self.shards
        ]

