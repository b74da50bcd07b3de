"""asv benchmarks of the topic trie (macula.TopicTrie) against a dict-of-dicts trie.

What is measured, and why:

* ``Match``: ``match`` (distinct keys) and ``match_filters`` of 10,000 published topics
  against 10,000 or 100,000 subscriptions over an IoT-style tree
  ``telemetry/<region>/<site>/<device>/<metric>`` (exact, ``+`` and ``#`` filters; about 14
  matching subscriptions per topic at 100,000), beside the dict-of-dicts trie a Python
  programmer writes first.  This is the work every published message costs a node.
* ``Build``: adding the subscriptions to an empty trie, and removing them all again.
* ``Memory``: bytes per subscription (tracemalloc, which sees the trie's PyMem arrays), and
  ``peakmem_`` of a built trie.

The module is self-contained (the workload and the naive trie are repeated here, compact) so
asv can import it from an installed macula; tools/cores/naive_trie.py is the documented copy.
"""

from __future__ import annotations

import gc
import random
import tracemalloc
from typing import ClassVar

from macula import TopicTrie

METRICS = ("temperature", "humidity", "pressure", "vibration", "rpm",
           "power", "voltage", "current", "status", "firmware")
SHAPES = (("exact", 0.5), ("device+", 0.25), ("device#", 0.1), ("site+metric", 0.08),
          ("site#", 0.02), ("region+metric", 0.006), ("metric", 0.0004), ("elsewhere", 0.0436))


def _workload(n_subs: int, n_topics: int, seed: int = 20240601):
    rnd = random.Random(seed)
    clients = max(1, n_subs // 4)

    def r() -> str:
        return f"region-{rnd.randrange(20):02d}"

    def s() -> str:
        return f"site-{rnd.randrange(25):03d}"

    def d() -> str:
        return f"dev-{rnd.randrange(40):05d}"

    def m() -> str:
        return rnd.choice(METRICS)

    subs = []
    for shape, share in SHAPES:
        for _ in range(max(1, round(n_subs * share))):
            f = {
                "exact": lambda: f"telemetry/{r()}/{s()}/{d()}/{m()}",
                "device+": lambda: f"telemetry/{r()}/{s()}/{d()}/+",
                "device#": lambda: f"telemetry/{r()}/{s()}/{d()}/#",
                "site+metric": lambda: f"telemetry/{r()}/{s()}/+/{m()}",
                "site#": lambda: f"telemetry/{r()}/{s()}/#",
                "region+metric": lambda: f"telemetry/{r()}/+/+/{m()}",
                "metric": lambda: f"telemetry/+/+/+/{m()}",
                "elsewhere": lambda: f"events/{r()}/{s()}/{d()}/alarm",
            }[shape]()
            subs.append((f, f"client-{rnd.randrange(clients)}"))
    rnd.shuffle(subs)
    topics = [f"telemetry/{r()}/{s()}/{d()}/{m()}" for _ in range(n_topics)]
    return subs, topics


class _NaiveTrie:
    """Dict-of-dicts trie; subscribers of a node under the key None."""

    def __init__(self) -> None:
        self.root: dict = {}

    def add(self, filter: str, key: str) -> None:
        node = self.root
        for level in filter.split("/"):
            node = node.setdefault(level, {})
        node.setdefault(None, {})[key] = None

    def match(self, topic: str) -> list:
        if not topic or "+" in topic or "#" in topic or "\x00" in topic:
            raise ValueError(topic)
        out: dict = {}
        levels = topic.split("/")
        root = self.root
        if topic[0] != "$":
            if "#" in root:
                out.update(root["#"][None])
            if "+" in root:
                self._walk(root["+"], levels, 1, out)
        if levels[0] in root:
            self._walk(root[levels[0]], levels, 1, out)
        return list(out)

    def _walk(self, node: dict, levels: list, i: int, out: dict) -> None:
        if "#" in node:
            out.update(node["#"][None])
        if i == len(levels):
            out.update(node.get(None, ()))
            return
        if "+" in node:
            self._walk(node["+"], levels, i + 1, out)
        if levels[i] in node:
            self._walk(node[levels[i]], levels, i + 1, out)


class Match:
    params = ([10_000, 100_000],)
    param_names: ClassVar[list[str]] = ["subscriptions"]
    timeout = 120

    def setup(self, n: int) -> None:
        subs, self.topics = _workload(n, 10_000)
        self.trie = TopicTrie()
        self.naive = _NaiveTrie()
        for f, k in subs:
            self.trie.add(f, k)
            self.naive.add(f, k)

    def time_match(self, n: int) -> None:
        match = self.trie.match
        for t in self.topics:
            match(t)

    def time_match_filters(self, n: int) -> None:
        match = self.trie.match_filters
        for t in self.topics:
            match(t)

    def time_naive_match(self, n: int) -> None:
        match = self.naive.match
        for t in self.topics:
            match(t)


class Build:
    params = ([10_000, 100_000],)
    param_names: ClassVar[list[str]] = ["subscriptions"]
    timeout = 120

    def setup(self, n: int) -> None:
        self.subs, _ = _workload(n, 1)
        self.full = TopicTrie()
        for f, k in self.subs:
            self.full.add(f, k)

    def time_add_all(self, n: int) -> None:
        t = TopicTrie()
        for f, k in self.subs:
            t.add(f, k)

    def time_naive_add_all(self, n: int) -> None:
        t = _NaiveTrie()
        for f, k in self.subs:
            t.add(f, k)

    def time_add_then_remove_all(self, n: int) -> None:
        t = TopicTrie()
        for f, k in self.subs:
            t.add(f, k)
        for f, k in self.subs:
            t.remove(f, k)

    def peakmem_built_trie(self, n: int) -> None:
        t = TopicTrie()
        for f, k in self.subs:
            t.add(f, k)


class Memory:
    timeout = 120

    def setup(self) -> None:
        self.subs, _ = _workload(100_000, 1)

    def _per_sub(self, cls: type) -> float:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        t = cls()
        for f, k in self.subs:
            t.add(f, k)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del t
        return (after - before) / len(self.subs)

    def track_bytes_per_subscription(self) -> float:
        return self._per_sub(TopicTrie)

    track_bytes_per_subscription.unit = "bytes"  # type: ignore[attr-defined]

    def track_naive_bytes_per_subscription(self) -> float:
        return self._per_sub(_NaiveTrie)

    track_naive_bytes_per_subscription.unit = "bytes"  # type: ignore[attr-defined]
