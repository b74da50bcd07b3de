"""Kademlia DHT on the peer wire (docs/DHT.md).

- ``macula.dht.core``: the sans-IO state machine (``DhtCore``), no sockets, no clock.
- ``macula.dht.store``: the bounded multi-valued record store.
- ``macula.dht.messages``: PING / FIND_NODE / FIND_VALUE / STORE and their replies.
- ``macula.dht.driver``: ``Dht``, the core run over a ``WireEndpoint`` (asyncio).
- ``macula.dht.keys``: ``dht_key(realm, kind, name)``.
"""

from macula.dht.core import DhtConfig, DhtCore, LookupDone, SendRequest, StoreDone
from macula.dht.keys import dht_key
from macula.dht.messages import Contact, Record
from macula.dht.store import RecordStore

__all__ = [
    "Contact",
    "DhtConfig",
    "DhtCore",
    "LookupDone",
    "Record",
    "RecordStore",
    "SendRequest",
    "StoreDone",
    "dht_key",
]
