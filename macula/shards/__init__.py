"""Delivery shards: matching and fan-out in worker processes behind a ZeroMQ ROUTER/DEALER bus.

- :mod:`macula.shards.worker`: one shard process (its trie, matching, EVENT building);
- :mod:`macula.shards.pool`: the node's side (processes, bus, batching, restarts, figures).

See docs/ARCHITECTURE.md ("Delivery shards") for the processes and the path of one message.
"""

from __future__ import annotations

from macula.shards.pool import ShardPool

__all__ = ["ShardPool"]
