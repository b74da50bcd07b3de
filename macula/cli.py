"""The ``macula`` command.

It reports on the installation (``macula version``, ``macula cores``) and runs a node
(``macula node``, docs/NODE.md); the demo mesh and the pub/sub/call helpers join it as they
are built (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from collections.abc import Sequence

import macula

CORES = ("trie", "cache", "routing", "codec")


def _cmd_version(_: argparse.Namespace) -> int:
    print(f"macula {macula.__version__} (Python {platform.python_version()})")
    return 0


def _cmd_cores(_: argparse.Namespace) -> int:
    """List the compiled cores and run a one-line self-check of each."""
    trie = macula.TopicTrie()
    trie.add("a/+/c", "k")
    cache = macula.TTLCache(4, 1.0)
    cache.put("k", 1, now=0.0)
    table = macula.RoutingTable(bytes(32))
    table.add(b"\x80" + bytes(31), "contact")
    enc = macula.BatchEncoder()
    enc.append_raw(b"x")
    checks = {
        "trie": trie.match("a/b/c") == ["k"],
        "cache": cache.get("k", now=0.5) == 1,
        "routing": table.closest(bytes(32), 1)[0][1] == "contact",
        "codec": [bytes(f) for f in macula.FrameDecoder().feed(enc.flush())] == [b"x"],
    }
    ok = True
    for core in CORES:
        mod = importlib.import_module(f"macula._ext.{core}")
        status = "ok" if checks[core] else "FAILED"
        ok = ok and checks[core]
        print(f"{core:8} {status:6} {mod.__file__}")
    return 0 if ok else 1


def _cmd_node(args: argparse.Namespace) -> int:
    """Run a node until SIGINT/SIGTERM (config file, then MACULA_* variables, then flags)."""
    import asyncio

    from macula.config import NodeConfig
    from macula.node import run

    try:
        config = NodeConfig.load(args.config)
    except (OSError, ValueError) as exc:
        print(f"macula node: bad configuration: {exc}", file=sys.stderr)
        return 2
    if args.endpoint:
        config.endpoints = list(args.endpoint)
    if args.metrics_port is not None:
        config.metrics_port = args.metrics_port
    return asyncio.run(run(config))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="macula", description="macula: a self-organizing mesh of services"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("version", help="print the version").set_defaults(func=_cmd_version)
    sub.add_parser("cores", help="list the compiled cores and self-check them").set_defaults(
        func=_cmd_cores
    )
    node = sub.add_parser("node", help="run a node (control plane and metrics)")
    node.add_argument("--config", help="TOML configuration file (default: $MACULA_CONFIG)")
    node.add_argument(
        "--endpoint", action="append", help="control endpoint (repeatable; tcp:// or ipc://)"
    )
    node.add_argument(
        "--metrics-port", type=int, help="metrics HTTP port (0: any free port, -1: off)"
    )
    node.set_defaults(func=_cmd_node)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
