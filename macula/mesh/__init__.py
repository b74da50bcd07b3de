"""The mesh: pub/sub and RPC across nodes (docs/ARCHITECTURE.md)."""
