"""The naive reference for the TopicTrie core, and the benchmark workload.

``NaiveTrie`` is the dict-of-dicts trie a Python programmer writes first: one dict per node
mapping a level string to the child node, the subscribers of a node under the key ``None``.
It validates topics with ``str`` methods and de-duplicates keys with a dict, so it does the
same job as ``macula.TopicTrie.match`` (same answers, checked by the benchmarks).

``make_workload`` builds the benchmark's subscriptions and published topics: an IoT-style
``telemetry/<region>/<site>/<device>/<metric>`` tree with a fixed seed, and a mix of exact,
``+`` and ``#`` filters tuned so that a random published topic matches about 14 filters.
"""

from __future__ import annotations

import random
from collections.abc import Hashable
from dataclasses import dataclass

_SUBS = None  # the dict key holding a node's subscribers (levels are str, never None)


class NaiveTrie:
    """Dict-of-dicts topic trie (MQTT semantics, validation of topics in match)."""

    def __init__(self) -> None:
        self.root: dict[str | None, object] = {}
        self.size = 0

    def add(self, filter: str, key: Hashable) -> bool:
        node = self.root
        for level in filter.split("/"):
            node = node.setdefault(level, {})  # type: ignore[assignment]
        subs: dict[Hashable, None] = node.setdefault(_SUBS, {})  # type: ignore[assignment]
        if key in subs:
            return False
        subs[key] = None
        self.size += 1
        return True

    def match(self, topic: str) -> list[Hashable]:
        if not topic or "+" in topic or "#" in topic or "\x00" in topic:
            raise ValueError(f"invalid topic name {topic!r}")
        out: dict[Hashable, None] = {}
        levels = topic.split("/")
        root = self.root
        if topic[0] != "$":
            pound = root.get("#")
            if pound is not None:
                out.update(pound[_SUBS])  # type: ignore[index]
            plus = root.get("+")
            if plus is not None:
                _walk(plus, levels, 1, out)  # type: ignore[arg-type]
        child = root.get(levels[0])
        if child is not None:
            _walk(child, levels, 1, out)  # type: ignore[arg-type]
        return list(out)


def _walk(node: dict[str | None, object], levels: list[str], i: int,
          out: dict[Hashable, None]) -> None:
    pound = node.get("#")
    if pound is not None:
        out.update(pound[_SUBS])  # type: ignore[index]
    if i == len(levels):
        subs = node.get(_SUBS)
        if subs is not None:
            out.update(subs)  # type: ignore[call-overload]
        return
    plus = node.get("+")
    if plus is not None:
        _walk(plus, levels, i + 1, out)  # type: ignore[arg-type]
    child = node.get(levels[i])
    if child is not None:
        _walk(child, levels, i + 1, out)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Workload

REGIONS = 20
SITES = 25  # per region
DEVICES = 40  # per site
METRICS = (
    "temperature", "humidity", "pressure", "vibration", "rpm",
    "power", "voltage", "current", "status", "firmware",
)
# share of the subscriptions per filter shape (tuned for ~14 matching filters per topic)
SHAPES = (
    ("exact", 0.500),  # telemetry/r/s/d/m
    ("device+", 0.250),  # telemetry/r/s/d/+
    ("device#", 0.100),  # telemetry/r/s/d/#
    ("site+metric", 0.080),  # telemetry/r/s/+/m
    ("site#", 0.020),  # telemetry/r/s/#
    ("region+metric", 0.006),  # telemetry/r/+/+/m
    ("metric", 0.0004),  # telemetry/+/+/+/m
    ("elsewhere", 0.0436),  # events/..., cmd/... : never match a telemetry topic
)


@dataclass
class Workload:
    subscriptions: list[tuple[str, str]]  # (filter, key)
    topics: list[str]  # published topic names, drawn uniformly from the tree


def _region(r: int) -> str:
    return f"region-{r:02d}"


def _site(s: int) -> str:
    return f"site-{s:03d}"


def _device(d: int) -> str:
    return f"dev-{d:05d}"


def make_workload(n_subs: int = 100_000, n_topics: int = 100_000, seed: int = 20240601,
                  clients: int | None = None) -> Workload:
    """Subscriptions and topics for the match benchmark (deterministic for a given seed).

    Keys are client ids (``client-<n>``, about four subscriptions per client); the tree has
    REGIONS x SITES x DEVICES devices with len(METRICS) metrics each (200,000 topics).
    """
    rnd = random.Random(seed)
    clients = clients or max(1, n_subs // 4)

    def r() -> str:
        return _region(rnd.randrange(REGIONS))

    def s() -> str:
        return _site(rnd.randrange(SITES))

    def d() -> str:
        return _device(rnd.randrange(DEVICES))

    def m() -> str:
        return rnd.choice(METRICS)

    subs: list[tuple[str, str]] = []
    for shape, share in SHAPES:
        for _ in range(max(1, round(n_subs * share))):
            if shape == "exact":
                f = f"telemetry/{r()}/{s()}/{d()}/{m()}"
            elif shape == "device+":
                f = f"telemetry/{r()}/{s()}/{d()}/+"
            elif shape == "device#":
                f = f"telemetry/{r()}/{s()}/{d()}/#"
            elif shape == "site+metric":
                f = f"telemetry/{r()}/{s()}/+/{m()}"
            elif shape == "site#":
                f = f"telemetry/{r()}/{s()}/#"
            elif shape == "region+metric":
                f = f"telemetry/{r()}/+/+/{m()}"
            elif shape == "metric":
                f = f"telemetry/+/+/+/{m()}"
            else:
                f = rnd.choice((
                    f"events/{r()}/{s()}/{d()}/alarm",
                    f"cmd/{r()}/{s()}/{d()}/+",
                    f"events/{r()}/#",
                ))
            subs.append((f, f"client-{rnd.randrange(clients)}"))
    rnd.shuffle(subs)
    topics = [f"telemetry/{r()}/{s()}/{d()}/{m()}" for _ in range(n_topics)]
    return Workload(subs, topics)
