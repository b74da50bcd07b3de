"""Realm-scoped DHT keys.

Every key in the DHT is 32 bytes: ``blake3(realm || 0x00 || kind || 0x00 || name)`` with the
three parts UTF-8 encoded. The zero separators make the encoding unambiguous: ``realm`` and
``kind`` may not contain U+0000 (``ValueError``); ``name`` comes last and may hold anything.
Two realms can never share a key, and neither can two kinds (``"sub"``, ``"rpc"``, ...) of
the same name.
"""

from __future__ import annotations

from blake3 import blake3

KEY_SIZE = 32


def dht_key(realm: str, kind: str, name: str) -> bytes:
    """The 32-byte DHT key of ``name`` of ``kind`` in ``realm``."""
    for label, part in (("realm", realm), ("kind", kind), ("name", name)):
        if not isinstance(part, str):
            raise TypeError(f"{label} must be str, not {type(part).__name__}")
    if "\x00" in realm or "\x00" in kind:
        raise ValueError("realm and kind must not contain U+0000 (the key's separator)")
    data = b"\x00".join((realm.encode(), kind.encode(), name.encode()))
    return bytes(blake3(data).digest())
