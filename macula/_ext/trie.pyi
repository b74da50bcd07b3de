"""Type stubs for macula._ext.trie (compiled from _ext/trie.pyx): the MQTT topic filter index."""

from collections.abc import Hashable, Iterator
from typing import Any, TypedDict, final

MAX_TOPIC_BYTES: int

class TrieStats(TypedDict):
    subscriptions: int
    filters: int
    keys: int
    nodes: int
    edges: int
    node_capacity: int
    edge_capacity: int
    key_capacity: int
    c_bytes: int

def validate_topic(topic: str) -> None:
    """Raise ValueError (naming the MQTT rule broken) unless ``topic`` is a valid topic name."""

def validate_filter(filter: str) -> None:
    """Raise ValueError (naming the rule broken) unless ``filter`` is a valid topic filter."""

def parse_shared(filter: str) -> tuple[str, str] | None:
    """``(group, inner_filter)`` for ``$share/<group>/<filter>``, ``None`` for a plain filter."""

@final
class TopicTrie:
    """Index of MQTT topic filters -> subscription keys; ``match(topic)`` finds the keys."""

    def __init__(self) -> None: ...
    def add(self, filter: str, key: Hashable) -> bool:
        """Subscribe ``key`` to ``filter``; True if the pair is new."""
    def remove(self, filter: str, key: Hashable) -> bool:
        """Unsubscribe ``key`` from ``filter``; True if it was subscribed."""
    def remove_key(self, key: Hashable) -> int:
        """Remove every subscription of ``key``; how many there were."""
    def match(self, topic: str) -> list[Any]:
        """Distinct keys subscribed to a filter that matches ``topic`` (order unspecified)."""
    def match_filters(self, topic: str) -> list[str]:
        """The subscribed filters that match ``topic`` (each once; order unspecified)."""
    def subscribers(self, filter: str) -> list[Any]:
        """Keys subscribed to exactly ``filter``."""
    def filters_of(self, key: Hashable) -> list[str]:
        """Filters ``key`` is subscribed to."""
    def clear(self) -> None: ...
    @property
    def node_count(self) -> int: ...
    def stats(self) -> TrieStats: ...
    def __len__(self) -> int: ...
    def __contains__(self, filter: object) -> bool: ...
    def __iter__(self) -> Iterator[str]: ...
