"""macula: a self-organizing mesh of services.

The compiled cores are re-exported here; see ``docs/`` for what each one does.
"""

from __future__ import annotations

__version__ = "0.1.0.dev0"

try:
    from macula._ext.cache import TTLCache
    from macula._ext.codec import BatchEncoder, FrameDecoder, FrameError
    from macula._ext.routing import RoutingTable
    from macula._ext.trie import TopicTrie, parse_shared, validate_filter, validate_topic
except ImportError as exc:  # pragma: no cover - exercised by tests/test_package.py in a subprocess
    raise ImportError(
        "macula's compiled extensions are not built (" + str(exc) + "). "
        "Install the package with `pip install .` (or `pip install -e .` for development), "
        "or build them in place with `python setup.py build_ext --inplace`."
    ) from None

__all__ = [
    "BatchEncoder",
    "BlockingClient",
    "Client",
    "FrameDecoder",
    "FrameError",
    "RoutingTable",
    "TTLCache",
    "TopicTrie",
    "__version__",
    "parse_shared",
    "validate_filter",
    "validate_topic",
]


def __getattr__(name: str) -> object:
    # The clients import pyzmq; load them on first use so that ``import macula`` stays fast.
    if name in ("Client", "BlockingClient"):
        from macula import client

        return getattr(client, name)
    raise AttributeError(f"module 'macula' has no attribute {name!r}")
