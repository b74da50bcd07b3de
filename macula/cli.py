"""The ``macula`` command.

It reports on the installation (``macula version``, ``macula cores``) and runs a node
(``macula node``, docs/NODE.md), runs a demo mesh of three nodes on loopback (``macula
demo``, docs/MESH.md), and talks to a node from the shell (``macula pub``, ``macula sub``,
``macula call``, through :class:`macula.client.BlockingClient`).
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from collections.abc import Sequence
from typing import Any

import macula

CORES = ("trie", "cache", "routing", "codec")
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"


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
    for opt in ("mesh_port", "mesh_host", "mesh_advertise", "data_dir", "shards"):
        value = getattr(args, opt)
        if value is not None:
            setattr(config, opt, value)
    if args.seed:
        config.seeds = list(args.seed)
    if args.client_mode:
        config.client_mode = True
    try:
        return asyncio.run(run(config))
    except ValueError as exc:
        print(f"macula node: bad configuration: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a port in use, an address not on this host, a data directory...
        print(f"macula node: cannot start: {exc}", file=sys.stderr)
        return 1


def _client(args: argparse.Namespace, **kw: Any) -> Any:
    import logging

    from macula.client import BlockingClient

    # the commands say what happened in their own words (one line each way for sub)
    logging.getLogger("macula.client").setLevel(logging.ERROR)
    name = args.name or f"macula-{args.command}"
    return BlockingClient(args.endpoint, realm=args.realm, name=name, secret=args.secret,
                          timeout=args.connect_timeout, **kw)


def _client_errors() -> tuple[type[BaseException], ...]:
    from macula.client import MaculaError

    return (MaculaError, TimeoutError, ValueError, TypeError)


def _cmd_pub(args: argparse.Namespace) -> int:
    """Publish MESSAGE (or each line of stdin) to TOPIC."""
    if args.message is not None:
        payloads = [args.message.encode()]
    else:
        payloads = [line.rstrip("\n").encode() for line in sys.stdin]
    try:
        with _client(args) as client:
            if args.qos == 0:
                client.publish_many([(args.topic, data) for data in payloads],
                                    retain=args.retain)
            for data in payloads if args.qos else []:
                reason = client.publish(args.topic, data, qos=1, retain=args.retain)
                if reason:
                    print(f"macula pub: PUBACK {reason.name}", file=sys.stderr)
            client.stats()  # a round trip: everything before it reached the node
    except _client_errors() as exc:
        print(f"macula pub: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_sub(args: argparse.Namespace) -> int:
    """Print ``topic payload`` for each message matching the filters.

    When the node is lost the client reconnects and subscribes again (one line on stderr
    each way); with ``--no-reconnect`` the command exits with status 1 instead."""
    import queue

    from macula.client import ConnectionLost, Reconnected

    received: queue.Queue[Any] = queue.Queue()

    def on_disconnect(exc: ConnectionLost) -> None:
        if args.no_reconnect:
            received.put(exc)  # ends the loop below
        else:
            print(f"macula sub: connection lost ({exc}); reconnecting", file=sys.stderr,
                  flush=True)

    def on_reconnect(info: Reconnected) -> None:
        restarted = ", the node had restarted" if info.node_restarted else ""
        print(f"macula sub: reconnected (session {info.session_id}{restarted}; "
              f"{info.subscriptions} subscriptions restored after {info.downtime:.1f} s)",
              file=sys.stderr, flush=True)

    try:
        with _client(args, reconnect=not args.no_reconnect, on_disconnect=on_disconnect,
                     on_reconnect=on_reconnect) as client:
            for filt in args.filter:
                client.subscribe(filt, qos=args.qos, callback=received.put)
            print(f"macula sub: subscribed to {', '.join(args.filter)}", file=sys.stderr,
                  flush=True)
            count = 0
            while args.count == 0 or count < args.count:
                try:
                    msg = received.get(timeout=args.timeout if args.timeout > 0 else None)
                except queue.Empty:
                    break
                if isinstance(msg, ConnectionLost):
                    print(f"macula sub: connection lost ({msg})", file=sys.stderr)
                    return 1
                text = msg.payload.decode("utf-8", "backslashreplace")
                print(f"{msg.topic} {text}" if not args.payload_only else text, flush=True)
                count += 1
    except _client_errors() as exc:
        print(f"macula sub: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_call(args: argparse.Namespace) -> int:
    """Call PROCEDURE with ARGS (JSON) and print the result as JSON."""
    import json

    try:
        call_args = json.loads(args.args) if args.args is not None else None
    except json.JSONDecodeError as exc:
        print(f"macula call: ARGS must be JSON ({exc})", file=sys.stderr)
        return 2
    try:
        with _client(args) as client:
            result = client.call(args.procedure, call_args, timeout=args.timeout)
    except _client_errors() as exc:
        print(f"macula call: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, default=lambda b: b.decode("utf-8", "backslashreplace")))
    return 0


def _client_options(p: argparse.ArgumentParser) -> None:
    import os

    p.add_argument("--endpoint", default=os.environ.get("MACULA_ENDPOINT", DEFAULT_ENDPOINT),
                   help=f"the node (default: $MACULA_ENDPOINT or {DEFAULT_ENDPOINT})")
    p.add_argument("--realm", default=os.environ.get("MACULA_REALM", "default"),
                   help="realm (default: $MACULA_REALM or 'default')")
    p.add_argument("--secret", default=os.environ.get("MACULA_SECRET"),
                   help="the realm's secret (default: $MACULA_SECRET)")
    p.add_argument("--name", default="", help="client name shown by the node")
    p.add_argument("--connect-timeout", type=float, default=5.0,
                   help="seconds to wait for the node's WELCOME")


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
    node.add_argument("--mesh-port", type=int,
                      help="QUIC port of the mesh (default 4433; 0: any free port; -1: no mesh)")
    node.add_argument("--mesh-host", help="address the mesh listens on (default 127.0.0.1)")
    node.add_argument("--mesh-advertise", help="host:port other nodes dial (default: listen)")
    node.add_argument("--seed", action="append",
                      help="host:port of a node to join the mesh through (repeatable)")
    node.add_argument("--client-mode", action="store_true",
                      help="do not listen: dial out only (behind NAT / firewalls)")
    node.add_argument("--data-dir", help="directory of the node's key (default: temporary)")
    node.add_argument("--shards", type=int,
                      help="delivery shard processes (default: the cores; 0: in the node)")
    node.set_defaults(func=_cmd_node)
    sub.add_parser("demo", help="run a 3-node mesh on loopback with live figures "
                   "(macula demo --help)")
    pub = sub.add_parser("pub", help="publish a message (or each line of stdin)")
    pub.add_argument("topic")
    pub.add_argument("message", nargs="?", help="payload (UTF-8); omitted: read stdin lines")
    pub.add_argument("--qos", type=int, choices=(0, 1), default=0)
    pub.add_argument("--retain", action="store_true", help="keep it as the retained message")
    _client_options(pub)
    pub.set_defaults(func=_cmd_pub)
    subc = sub.add_parser("sub", help="print messages matching topic filters")
    subc.add_argument("filter", nargs="+")
    subc.add_argument("--qos", type=int, choices=(0, 1), default=0)
    subc.add_argument("--count", type=int, default=0, help="exit after N messages (0: never)")
    subc.add_argument("--timeout", type=float, default=0.0,
                      help="exit after this many seconds without a message (0: never)")
    subc.add_argument("--payload-only", action="store_true", help="print payloads only")
    subc.add_argument("--no-reconnect", action="store_true",
                      help="exit with status 1 when the node is lost (default: reconnect "
                      "and subscribe again)")
    _client_options(subc)
    subc.set_defaults(func=_cmd_sub)
    call = sub.add_parser("call", help="call a procedure, print its result as JSON")
    call.add_argument("procedure")
    call.add_argument("args", nargs="?", help="arguments as JSON (default: null)")
    call.add_argument("--timeout", type=float, default=None, help="call timeout, seconds")
    _client_options(call)
    call.set_defaults(func=_cmd_call)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # the demo parses its own options (macula demo --help)
        from macula.demo import main as demo_main

        return demo_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: the clients closed on the way out; no traceback
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
