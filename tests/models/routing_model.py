"""The obviously-correct model of the Kademlia routing table (guide: docs/cores/routing.md).

Ids are Python ints once checked; a bucket is a plain list of ``[node_id, contact, seen]``,
least recently seen first; a replacement list is a list of ``(node_id, contact, seen)``,
oldest first; ``closest`` sorts every stored contact by XOR distance.  Written for clarity,
not speed: the compiled ``RoutingTable`` must give the same answer to every call.
"""

from __future__ import annotations

from typing import Any

ID_BYTES = 32
ID_BITS = 256


def as_int(node_id: bytes) -> int:
    return int.from_bytes(node_id, "big")


def cpl(a: bytes, b: bytes) -> int:
    """Leading bits shared by two ids (256 when equal)."""
    return ID_BITS - (as_int(a) ^ as_int(b)).bit_length()


class ModelRoutingTable:
    def __init__(self, self_id: bytes, k: int = 20, *, replacements: int | None = None) -> None:
        self.self_id = self_id
        self.k = k
        self.max_replacements = k if replacements is None else replacements
        self.buckets: list[list[list[Any]]] = [[] for _ in range(ID_BITS)]
        self.repl: list[list[tuple[bytes, Any, float]]] = [[] for _ in range(ID_BITS)]
        self.dropped = 0

    def bucket_of(self, node_id: bytes) -> int:
        i = cpl(node_id, self.self_id)
        if i == ID_BITS:
            raise ValueError("own id")
        return i

    def _find(self, node_id: bytes) -> tuple[list[list[Any]], int] | None:
        bucket = self.buckets[self.bucket_of(node_id)]
        for i, entry in enumerate(bucket):
            if entry[0] == node_id:
                return bucket, i
        return None

    def add(self, node_id: bytes, contact: Any, now: float) -> bytes | None:
        b = self.bucket_of(node_id)
        bucket = self.buckets[b]
        found = self._find(node_id)
        if found is not None:
            _, i = found
            bucket.pop(i)
            bucket.append([node_id, contact, now])
            return None
        if len(bucket) < self.k:
            bucket.append([node_id, contact, now])
            return None
        queue = self.repl[b]
        queue[:] = [e for e in queue if e[0] != node_id]
        if self.max_replacements == 0:
            self.dropped += 1
        else:
            queue.append((node_id, contact, now))
            if len(queue) > self.max_replacements:
                queue.pop(0)
                self.dropped += 1
        return bucket[0][0]  # type: ignore[no-any-return]

    def touch(self, node_id: bytes, now: float) -> bool:
        if node_id == self.self_id:
            return False
        found = self._find(node_id)
        if found is None:
            return False
        bucket, i = found
        entry = bucket.pop(i)
        entry[2] = now
        bucket.append(entry)
        return True

    def remove(self, node_id: bytes) -> bool:
        if node_id == self.self_id:
            return False
        b = self.bucket_of(node_id)
        self.repl[b] = [e for e in self.repl[b] if e[0] != node_id]
        found = self._find(node_id)
        if found is None:
            return False
        bucket, i = found
        bucket.pop(i)
        if self.repl[b]:
            nid, contact, seen = self.repl[b].pop()
            bucket.append([nid, contact, seen])
        return True

    def clear(self) -> None:
        self.buckets = [[] for _ in range(ID_BITS)]
        self.repl = [[] for _ in range(ID_BITS)]
        self.dropped = 0

    def get(self, node_id: bytes) -> Any:
        found = None if node_id == self.self_id else self._find(node_id)
        return None if found is None else found[0][found[1]][1]

    def last_seen(self, node_id: bytes) -> float | None:
        found = None if node_id == self.self_id else self._find(node_id)
        return None if found is None else found[0][found[1]][2]  # type: ignore[no-any-return]

    def contains(self, node_id: bytes) -> bool:
        return node_id != self.self_id and self._find(node_id) is not None

    def entries(self) -> list[list[Any]]:
        return [e for bucket in self.buckets for e in bucket]

    def ids(self) -> list[bytes]:
        return [e[0] for e in self.entries()]

    def __len__(self) -> int:
        return sum(len(b) for b in self.buckets)

    def bucket(self, i: int) -> list[tuple[bytes, Any]]:
        return [(e[0], e[1]) for e in self.buckets[i]]

    def replacements(self, i: int) -> list[tuple[bytes, Any]]:
        return [(e[0], e[1]) for e in self.repl[i]]

    def closest(self, target: bytes, n: int) -> list[tuple[bytes, Any]]:
        t = as_int(target)
        ranked = sorted(self.entries(), key=lambda e: as_int(e[0]) ^ t)
        return [(e[0], e[1]) for e in ranked[:n]]

    def stale_buckets(self, older_than: float, now: float) -> list[int]:
        return [
            i
            for i, bucket in enumerate(self.buckets)
            if bucket and max(e[2] for e in bucket) < now - older_than
        ]

    def stats(self) -> dict[str, int]:
        return {
            "contacts": len(self),
            "k": self.k,
            "max_replacements": self.max_replacements,
            "buckets_used": sum(1 for b in self.buckets if b),
            "buckets_full": sum(1 for b in self.buckets if len(b) >= self.k),
            "replacements": sum(len(q) for q in self.repl),
            "dropped": self.dropped,
        }
