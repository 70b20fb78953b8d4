"""The ``fanout`` command: run a node, mint tokens, try a node by hand.

    fanout node [--config FILE] [--port N] [--max-delay-ms MS] ...
    fanout token --user U [--rooms a,b] [--ttl S]
    fanout listen ROOM [--host H --port N]
    fanout say ROOM TEXT [--kind chat]
    fanout drain [--admin-host H --admin-port N --api-key KEY]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys

from . import config as config_mod
from .auth import DEV_SECRET, mint


def _node_parser(sub) -> None:
    p = sub.add_parser("node", help="run a fan-out node",
                       description="Run a node. Settings come from defaults, then --config, "
                                   "then FANOUT_* environment variables, then these flags.")
    p.add_argument("--config", metavar="FILE", help="TOML file (keys as below, snake_case)")
    for f in dataclasses.fields(config_mod.NodeConfig):
        kind = type(f.default)
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind,
                       default=None, metavar=kind.__name__.upper(),
                       help=f"{f.metadata['doc']} (default {f.default!r})"
                       if f.name != "secret" else f.metadata["doc"])


def _client_args(p) -> None:
    p.add_argument("--host", default=os.environ.get("FANOUT_CONNECT_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("FANOUT_PORT", "7000")))
    p.add_argument("--token", help="JWT; default: mint one with --user and the node secret")
    p.add_argument("--user", default=f"cli-{os.getpid()}")
    p.add_argument("--secret", default=os.environ.get("FANOUT_SECRET", DEV_SECRET))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fanout", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _node_parser(sub)

    p = sub.add_parser("token", help="mint a development token")
    p.add_argument("--user", required=True)
    p.add_argument("--rooms", default="*", help="'*' or comma-separated room names")
    p.add_argument("--ttl", type=float, default=3600.0, help="seconds until expiry")
    p.add_argument("--secret", default=os.environ.get("FANOUT_SECRET", DEV_SECRET))

    p = sub.add_parser("listen", help="join a room and print its messages")
    p.add_argument("room")
    p.add_argument("--count", type=int, default=0, help="exit after N messages (0: never)")
    _client_args(p)

    p = sub.add_parser("say", help="send one chat message to a room")
    p.add_argument("room")
    p.add_argument("text")
    _client_args(p)

    p = sub.add_parser("drain", help="gracefully drain a node through its admin API",
                       description="Ask a node to drain: it stops taking clients and "
                                   "publishes, moves its clients away, then exits.")
    p.add_argument("--admin-host", default="127.0.0.1",
                   help="address of the node's admin API (default 127.0.0.1)")
    p.add_argument("--admin-port", type=int,
                   default=int(os.environ.get("FANOUT_ADMIN_PORT", "7001")),
                   help="its port (default $FANOUT_ADMIN_PORT, else 7001)")
    p.add_argument("--api-key", default=os.environ.get("FANOUT_API_KEY", ""),
                   help="the node's admin API key (default $FANOUT_API_KEY)")
    return parser


def _token(args) -> str:
    return args.token or mint(args.secret, args.user)


async def _listen(args) -> int:
    from .client import Client

    async with Client(args.host, args.port, _token(args), device_id="cli") as client:
        ack = await client.join(args.room)
        print(f"joined {args.room} at seq {ack.seq} (epoch {ack.epoch})", flush=True)
        seen = 0
        async for event in client:
            if event.DESCRIPTOR.name == "Gap":
                print(f"[{event.room}] GAP: messages {event.from_seq}..{event.to_seq} "
                      "are gone", flush=True)
                continue
            text = event.payload.decode("utf-8", "replace")
            print(f"[{event.room} #{event.seq}] {event.sender}: {text}", flush=True)
            seen += 1
            if args.count and seen >= args.count:
                break
    return 0


async def _say(args) -> int:
    from .client import Client

    async with Client(args.host, args.port, _token(args), device_id="cli",
                      reconnect=False) as client:
        await client.join(args.room)
        ack = await client.say(args.room, args.text.encode("utf-8"))
        print(f"sent to {args.room} as seq {ack.seq}", flush=True)
    return 0


def _drain(args) -> int:
    import json
    import urllib.error
    import urllib.request

    host = f"[{args.admin_host}]" if ":" in args.admin_host else args.admin_host
    where = f"{host}:{args.admin_port}"
    if not args.api_key:
        print("fanout drain: no API key; pass --api-key or set FANOUT_API_KEY", file=sys.stderr)
        return 1
    request = urllib.request.Request(f"http://{where}/v1/drain", method="POST",
                                     headers={"Authorization": f"Bearer {args.api_key}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        try:
            error = json.loads(exc.read())["error"]
            detail = f"{error['code']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            detail = exc.reason
        print(f"fanout drain: {where} answered {exc.code}: {detail}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"fanout drain: cannot reach the admin API at {where}: {reason}", file=sys.stderr)
        return 1
    if status != 202:
        print(f"fanout drain: {where} answered {status}, expected 202", file=sys.stderr)
        return 1
    print(f"node at {where} is draining; it exits when its clients have left", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "node":
        from .node import run

        overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_mod.NodeConfig)}
        try:
            cfg = config_mod.load(args.config, overrides=overrides)
        except config_mod.ConfigError as exc:
            print(f"fanout node: {exc}", file=sys.stderr)
            return 2
        try:
            run(cfg)
        except OSError as exc:     # typically: the port is taken
            print(f"fanout node: cannot serve on {cfg.host}:{cfg.port} "
                  f"(admin {cfg.admin_host}:{cfg.admin_port}): {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "token":
        rooms = "*" if args.rooms == "*" else [r for r in args.rooms.split(",") if r]
        print(mint(args.secret, args.user, rooms=rooms, ttl=args.ttl))
        return 0
    if args.command == "drain":
        return _drain(args)
    runner = _listen if args.command == "listen" else _say
    try:
        return asyncio.run(runner(args))
    except KeyboardInterrupt:
        return 130
    except (OSError, Exception) as exc:  # surface a one-line reason, not a traceback
        if os.environ.get("FANOUT_DEBUG"):
            raise
        print(f"fanout {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
