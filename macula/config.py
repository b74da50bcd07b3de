"""Node configuration: a dataclass filled from defaults, a TOML file, then ``MACULA_*`` variables.

Precedence, lowest first: the defaults below (all documented in docs/NODE.md), the TOML file
(``macula node --config FILE`` or ``MACULA_CONFIG``), then environment variables. File
layout::

    endpoints = ["tcp://127.0.0.1:5555", "ipc:///run/macula/control.sock"]
    metrics_port = 9464
    allow_any_realm = false
    shards = 2          # delivery shard processes (default: the cores; 0: in the node)
    [realms]            # name = secret ("" for none)
    default = ""
    billing = "s3cret"
    [limits]            # any field of macula.control.broker.Limits
    max_sessions = 5000

Environment: ``MACULA_ENDPOINTS`` and ``MACULA_SEEDS`` (comma-separated), ``MACULA_REALMS``
(``name=secret,...``), ``MACULA_<FIELD>`` for every other top-level field and every limit
(``MACULA_METRICS_PORT``, ``MACULA_MAX_SESSIONS``, ``MACULA_ACK_TIMEOUT``...). Unknown keys
and values of the wrong type raise ``ValueError`` naming them: a typo never silently falls
back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from macula.control.broker import Limits

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def default_shards() -> int:
    """The number of cores this process may use (the default number of delivery shards)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass
class NodeConfig:
    """Everything ``macula node`` needs. See docs/NODE.md for each field."""

    endpoints: list[str] = field(default_factory=lambda: ["tcp://127.0.0.1:5555"])
    realms: dict[str, str] = field(default_factory=dict)
    allow_any_realm: bool = True
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    curve_secret_key_file: str = ""
    curve_allow_dir: str = ""
    sndhwm: int = 100  # bodies per client queued in ZeroMQ (docs/NODE.md, "Overload")
    rcvhwm: int = 100
    tick_interval: float = 0.05
    io_threads: int = 1
    shards: int = field(default_factory=default_shards)
    # the mesh (docs/MESH.md): QUIC between nodes, the DHT, pub/sub and RPC across nodes
    mesh_host: str = "127.0.0.1"
    mesh_port: int = 4433  # UDP port of the QUIC endpoint; 0: ephemeral; -1: no mesh
    mesh_advertise: str = ""  # "host:port" other nodes dial (default mesh_host:mesh_port)
    seeds: list[str] = field(default_factory=list)  # "host:port" of nodes to join through
    client_mode: bool = False  # dial out only; reachable through the links this node opens
    data_dir: str = ""  # holds node.key (the identity); "": a temporary one per run
    mesh_network: str = "macula"  # nodes admit only peers of the same network name
    mesh_secret: str = ""  # and, if set, the same network secret
    mesh_cache_ttl: float = 60.0  # subscriber cache: how long a discovery answer is used
    mesh_min_interval: float = 1.0  # at most one DHT lookup per anchor per interval
    mesh_record_ttl: float = 300.0  # TTL of this node's records in the DHT
    mesh_ack_timeout: float = 1.0  # QoS 1 between nodes: re-send after this long
    mesh_qos1_ttl: float = 300.0  # QoS 1 between nodes: kept for an absent node this long
    mesh_outbox_bytes: int = 64 << 20  # QoS 1 between nodes: bytes in flight per node
    mesh_restore_grace: float = 5.0  # after a restart, refuse (not lose) unmatched QoS 1
    mesh_max_pending: int = 100_000  # messages waiting for discovery (oldest dropped)
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
    ) -> NodeConfig:
        """Defaults, then the TOML file at ``path`` (or ``$MACULA_CONFIG``), then ``env``."""
        env = os.environ if env is None else env
        path = path or env.get("MACULA_CONFIG") or None
        data: dict[str, Any] = {}
        if path:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        cfg = cls.from_dict(data)
        return cfg.with_env(env)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NodeConfig:
        cfg = cls()
        limits: dict[str, Any] = {}
        for key, value in data.items():
            if key == "limits":
                if not isinstance(value, Mapping):
                    raise ValueError("[limits] must be a table")
                for lk, lv in value.items():
                    limits[lk] = _check(f"limits.{lk}", _limit_default(lk), lv)
            elif key == "realms":
                if not isinstance(value, Mapping) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in value.items()
                ):
                    raise ValueError("[realms] must map realm names to secret strings")
                cfg.realms = dict(value)
            elif key in _TOP:
                setattr(cfg, key, _check(key, getattr(cfg, key), value))
            else:
                raise ValueError(f"unknown configuration key {key!r}")
        cfg.limits = dataclasses.replace(cfg.limits, **limits)
        return cfg

    def with_env(self, env: Mapping[str, str]) -> NodeConfig:
        cfg = dataclasses.replace(self)
        limits: dict[str, Any] = {}
        for name, raw in env.items():
            if not name.startswith("MACULA_") or name == "MACULA_CONFIG":
                continue
            key = name[len("MACULA_"):].lower()
            if key in ("endpoints", "seeds"):
                setattr(cfg, key, [e.strip() for e in raw.split(",") if e.strip()])
            elif key == "realms":
                cfg.realms = dict(_realm_pair(item) for item in raw.split(",") if item.strip())
            elif key in _TOP:
                setattr(cfg, key, _parse(name, getattr(cfg, key), raw))
            elif key in _LIMITS:
                limits[key] = _parse(name, _limit_default(key), raw)
        cfg.limits = dataclasses.replace(cfg.limits, **limits)
        return cfg


_TOP = {f.name for f in dataclasses.fields(NodeConfig)} - {"limits", "realms"}
_LIMITS = {f.name for f in dataclasses.fields(Limits)}


def _limit_default(name: str) -> Any:
    if name not in _LIMITS:
        raise ValueError(f"unknown limit {name!r}")
    return getattr(Limits(), name)


def _check(key: str, default: Any, value: Any) -> Any:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, list):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ValueError(f"{key}: expected {type(default).__name__}, got {value!r}")
    return value


def _parse(name: str, default: Any, raw: str) -> Any:
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes", "on")
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, int):
            return int(raw)
    except ValueError:
        raise ValueError(f"{name}: expected {type(default).__name__}, got {raw!r}") from None
    return raw


def _realm_pair(item: str) -> tuple[str, str]:
    name, _, secret = item.strip().partition("=")
    return name, secret


def host_port(value: str, what: str = "address") -> tuple[str, int]:
    """``"host:port"`` (``"[v6]:port"`` too) as a pair; ValueError naming ``what``."""
    host, sep, port = value.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what}: expected host:port, got {value!r}")
    return host, int(port)
