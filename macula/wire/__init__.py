"""The peer wire: QUIC links between macula nodes (see ``docs/WIRE.md``)."""
