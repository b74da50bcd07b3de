"""asv benchmarks of the Kademlia routing table (macula.RoutingTable).

What is measured, and why:

* ``Closest``: ``closest(target, 20)`` (the query behind every DHT lookup step) over a table
  of 10,000 random contacts (k = 10,000, so that all of them are stored) and over a
  realistic k = 20 table filled from 100,000 random candidate ids (~300 stored), against the
  naive answer: sorting every stored id by XOR distance (the issue's reference).
* ``Add``: filling tables from empty (new contacts), offering many ids to a k = 20 table
  (full buckets: LRS returned, newcomer queued), and refreshing known contacts, against the
  naive table (a dict per bucket).
* ``Memory``: bytes per contact held by the table (tracemalloc; ids and contacts are the
  caller's and excluded), against the naive table, and the peak memory of building a
  10,000-contact table.

Data is built in ``setup`` from fixed seeds; the module is self-contained (the naive
reference is repeated here) so asv can import it from an installed macula.
"""

from __future__ import annotations

import random
import tracemalloc
from typing import Any, ClassVar

from macula import RoutingTable

SELF_ID = bytes(range(32))


def _ids(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(32) for _ in range(n)]


class _NaiveTable:
    """Buckets as dicts (insertion order = LRS first), closest = sort everything."""

    def __init__(self, self_id: bytes, k: int = 20) -> None:
        self.me = int.from_bytes(self_id, "big")
        self.k = k
        self.buckets: list[dict[bytes, Any]] = [{} for _ in range(256)]
        self.repl: list[list[tuple[bytes, Any]]] = [[] for _ in range(256)]

    def add(self, node_id: bytes, contact: Any) -> bytes | None:
        b = 256 - (int.from_bytes(node_id, "big") ^ self.me).bit_length()
        bucket = self.buckets[b]
        if node_id in bucket:
            del bucket[node_id]
            bucket[node_id] = contact
            return None
        if len(bucket) < self.k:
            bucket[node_id] = contact
            return None
        queue = self.repl[b]
        queue[:] = [e for e in queue if e[0] != node_id]
        queue.append((node_id, contact))
        if len(queue) > self.k:
            queue.pop(0)
        return next(iter(bucket))

    def closest(self, target: bytes, n: int = 20) -> list[tuple[bytes, Any]]:
        t = int.from_bytes(target, "big")
        contacts = {i: c for bucket in self.buckets for i, c in bucket.items()}
        ids = sorted(contacts, key=lambda i: int.from_bytes(i, "big") ^ t)
        return [(i, contacts[i]) for i in ids[:n]]


def _build(k: int, ids: list[bytes]) -> tuple[RoutingTable, _NaiveTable]:
    ours, naive = RoutingTable(SELF_ID, k), _NaiveTable(SELF_ID, k)
    for i, x in enumerate(ids):
        ours.add(x, ("10.0.0.1", i), now=0.0)
        naive.add(x, ("10.0.0.1", i))
    return ours, naive


class Closest:
    params = (["10k contacts, k=10000", "k=20 from 100k ids"],)
    param_names: ClassVar[list[str]] = ["table"]

    def setup(self, table: str) -> None:
        if table.startswith("10k"):
            self.ours, self.naive = _build(10_000, _ids(10_000, seed=7))
        else:
            self.ours, self.naive = _build(20, _ids(100_000, seed=8))
        rng = random.Random(1)
        self.targets = [rng.randbytes(32) for _ in range(100)]
        assert self.ours.closest(self.targets[0]) == self.naive.closest(self.targets[0])

    def time_closest_20(self, table: str) -> None:
        closest = self.ours.closest
        for t in self.targets:
            closest(t, 20)

    def time_naive_sort_closest_20(self, table: str) -> None:
        closest = self.naive.closest
        for t in self.targets[:10]:
            closest(t, 20)


class Add:
    params = ([1000, 10_000],)
    param_names: ClassVar[list[str]] = ["contacts"]

    def setup(self, contacts: int) -> None:
        self.ids = _ids(contacts, seed=9)
        self.offered = _ids(20_000, seed=10)
        self.table = RoutingTable(SELF_ID)
        for x in self.offered:
            self.table.add(x, "c", now=0.0)
        self.known = [x for x, _ in self.table.closest(bytes(32), 20)]

    def time_fill(self, contacts: int) -> None:
        add = RoutingTable(SELF_ID, contacts).add
        for x in self.ids:
            add(x, "c", 0.0)

    def time_naive_fill(self, contacts: int) -> None:
        add = _NaiveTable(SELF_ID, contacts).add
        for x in self.ids:
            add(x, "c")

    def time_offer_20k_to_k20(self, contacts: int) -> None:
        add = RoutingTable(SELF_ID).add
        for x in self.offered:
            add(x, "c", 0.0)

    def time_refresh_known(self, contacts: int) -> None:
        add = self.table.add
        for _ in range(50):
            for x in self.known:
                add(x, "c", 1.0)


class Memory:
    def setup(self) -> None:
        self.ids = _ids(10_000, seed=11)
        self.contact = ("10.0.0.1", 4433)

    def _bytes_per_contact(self, make: Any) -> float:
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            table = make()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        del table
        return held / len(self.ids)

    def track_bytes_per_contact(self) -> float:
        def make() -> RoutingTable:
            t = RoutingTable(SELF_ID, 10_000)
            for x in self.ids:
                t.add(x, self.contact, now=0.0)
            return t

        return self._bytes_per_contact(make)

    track_bytes_per_contact.unit = "bytes"  # type: ignore[attr-defined]

    def track_naive_bytes_per_contact(self) -> float:
        def make() -> _NaiveTable:
            t = _NaiveTable(SELF_ID, 10_000)
            for x in self.ids:
                t.add(x, self.contact)
            return t

        return self._bytes_per_contact(make)

    track_naive_bytes_per_contact.unit = "bytes"  # type: ignore[attr-defined]

    def peakmem_table_10k(self) -> None:
        t = RoutingTable(SELF_ID, 10_000)
        for x in self.ids:
            t.add(x, self.contact, now=0.0)
        assert len(t) == 10_000
