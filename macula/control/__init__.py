"""The ZeroMQ control plane: protocol, sans-IO broker and its asyncio driver.

The protocol is specified in ``control/SPEC.md``.
"""

from __future__ import annotations

from macula.control.broker import Broker, Limits
from macula.control.protocol import SIGNATURE, Code, Err

__all__ = ["SIGNATURE", "Broker", "Code", "Err", "Limits"]
