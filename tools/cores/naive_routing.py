"""The naive reference for the Kademlia routing table, and the benchmark workload.

``NaiveRoutingTable`` is the table a Python programmer writes first, done well: the own id
as an int, a list of 256 buckets, each a ``dict`` id -> [contact, seen] (insertion-ordered,
so least recently seen first; "move to the MRS end" is pop and re-insert), a list per bucket
for the replacements, the bucket index from ``(int.from_bytes(id) ^ self).bit_length()``,
and ``closest`` = the issue's reference: sort every stored id by XOR distance
(``sorted(ids, key=lambda i: int.from_bytes(i, "big") ^ t)``) and take the first n.

``make_ids`` builds random 32-byte ids from a fixed seed.
"""

from __future__ import annotations

import random
import time
from typing import Any


def make_ids(n: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(32) for _ in range(n)]


class NaiveRoutingTable:
    def __init__(self, self_id: bytes, k: int = 20, *, replacements: int | None = None) -> None:
        self.self_id = self_id
        self.me = int.from_bytes(self_id, "big")
        self.k = k
        self.rmax = k if replacements is None else replacements
        self.buckets: list[dict[bytes, list[Any]]] = [{} for _ in range(256)]
        self.repl: list[list[tuple[bytes, Any, float]]] = [[] for _ in range(256)]
        self.dropped = 0

    def bucket_of(self, node_id: bytes) -> int:
        b = 256 - (int.from_bytes(node_id, "big") ^ self.me).bit_length()
        if b == 256:
            raise ValueError("own id")
        return b

    def add(self, node_id: bytes, contact: Any, now: float | None = None) -> bytes | None:
        if now is None:
            now = time.monotonic()
        bucket = self.buckets[self.bucket_of(node_id)]
        if node_id in bucket:
            del bucket[node_id]
            bucket[node_id] = [contact, now]
            return None
        if len(bucket) < self.k:
            bucket[node_id] = [contact, now]
            return None
        queue = self.repl[self.bucket_of(node_id)]
        queue[:] = [e for e in queue if e[0] != node_id]
        queue.append((node_id, contact, now))
        if len(queue) > self.rmax:
            queue.pop(0)
            self.dropped += 1
        return next(iter(bucket))

    def closest(self, target: bytes, n: int = 20) -> list[tuple[bytes, Any]]:
        t = int.from_bytes(target, "big")
        contacts = {i: e[0] for bucket in self.buckets for i, e in bucket.items()}
        ids = sorted(contacts, key=lambda i: int.from_bytes(i, "big") ^ t)
        return [(i, contacts[i]) for i in ids[:n]]

    def __len__(self) -> int:
        return sum(len(b) for b in self.buckets)
