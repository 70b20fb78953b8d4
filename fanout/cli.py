"""The ``fanout`` command: run a node, mint tokens, try a node by hand.

    fanout node [--config FILE] [--port N] [--max-delay-ms MS] ...
    fanout node --nats nats://HOST:4222 [--workers N] ...   (a cluster node)
    fanout router --nats nats://HOST:4222                   (the cluster's logic)
    fanout cluster [--nodes 3]                              (a local cluster to try)
    fanout events --nats nats://HOST:4222                   (tail the event log)
    fanout token --user U [--rooms a,b] [--ttl S] [--iss I] [--aud A]
    fanout listen ROOM [--host H --port N] [--device-class C] [--tls --ca FILE]
                       [--network KEY] [--heartbeat-file FILE]
    fanout say ROOM TEXT [--host H --port N] [--device-class C] [--tls --ca FILE]
    fanout config --sample [--output FILE]               (every setting, as a TOML file)
    fanout cert [--dir DIR] [--name HOST ...]            (a development CA and certificate)
    fanout drain [--admin-host H --admin-port N --api-key KEY]
    fanout demo [--http-port 7080] [--room lobby] [--no-bot]   (a live room in the browser)
    fanout load [--viewers N --rooms R --rate MSGS --duration S --json FILE] ...
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys

from . import __version__
from .server import config as config_mod
from .protocol.auth import DEV_SECRET, mint


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


#: The settings a router takes (the logic's limits and the cluster's).
ROUTER_FIELDS = ("nats", "loop", "log_level", "history_per_room", "cluster_replicas",
                 "rpc_timeout_ms", "max_publish_bytes", "room_budget", "chat_sample_every",
                 "room_idle_ttl_s", "max_chat_bytes", "chat_rate", "chat_burst",
                 "max_token_lifetime_s")


def _router_parser(sub) -> None:
    p = sub.add_parser("router", help="run a router: the cluster's logic layer",
                       description="Run a router on the cluster bus. Settings as for "
                                   "`fanout node` (defaults, --config, FANOUT_*, flags).")
    p.add_argument("--config", metavar="FILE", help="TOML file (keys as below, snake_case)")
    p.add_argument("--router-id", default="", help="this router's name (default: pid-based)")
    known = {f.name: f for f in dataclasses.fields(config_mod.NodeConfig)}
    for name in ROUTER_FIELDS:
        f = known[name]
        kind = type(f.default)
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None,
                       metavar=kind.__name__.upper(),
                       help=f"{f.metadata['doc']} (default {f.default!r})")


def _port(value: str) -> int:
    """A port number, for flags whose default may come from the environment
    (a bad FANOUT_PORT is a usage error naming the value, not a traceback)."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number (0..65535): {port}")
    return port


def _secret_arg(p) -> None:
    p.add_argument("--secret", default=os.environ.get("FANOUT_SECRET", DEV_SECRET),
                   help="the node's token secret, to mint with (default $FANOUT_SECRET, else "
                        "the built-in development secret)")


def _client_args(p, role: str) -> None:
    """The connection flags of ``listen`` and ``say``. Each command has a
    user and a device class of its own by default, so a listener and a
    sayer never take each other's login (one per user and device class)."""
    p.add_argument("--host", default=os.environ.get("FANOUT_CONNECT_HOST", "127.0.0.1"),
                   help="node address (default $FANOUT_CONNECT_HOST, else 127.0.0.1)")
    # A string default: argparse converts it with _port only for this command.
    p.add_argument("--port", type=_port, default=os.environ.get("FANOUT_PORT", "7000"),
                   help="node client port (default $FANOUT_PORT, else 7000)")
    p.add_argument("--token", help="a JWT to connect with (e.g. from `fanout token`); "
                                   "default: mint one for --user with --secret")
    p.add_argument("--user", default=f"{role}-{os.getpid()}",
                   help=f"user to mint a token for (default {role}-PID)")
    p.add_argument("--device-class", default=f"cli-{role}",
                   help=f"device class to log in as: one login per user and device class, "
                        f"a newer one replaces the older (default cli-{role})")
    _secret_arg(p)
    p.add_argument("--tls", action="store_true",
                   help="connect with TLS (to the node's tls_port), verifying its certificate")
    p.add_argument("--ca", metavar="FILE", default=os.environ.get("FANOUT_CA") or None,
                   help="CA file (PEM) to trust for --tls instead of the system's; implies "
                        "--tls (e.g. ca.pem from `fanout cert`)")
    p.add_argument("--server-name", default=None,
                   help="host name to verify the certificate against (default: --host)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fanout",
                                     description=__doc__.split("\n")[0].replace("``", "`"))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _node_parser(sub)
    _router_parser(sub)

    p = sub.add_parser("cluster", help="start a local cluster to try: nats-server, "
                                       "router(s) and nodes on consecutive ports")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--routers", type=int, default=1)
    p.add_argument("--base-port", type=_port, default=7100,
                   help="node i serves clients on BASE+2i and its admin API on BASE+2i+1")
    p.add_argument("--nats-port", type=_port, default=4222, help="0: any free port")
    p.add_argument("--loop", default="uvloop")

    p = sub.add_parser("events", help="tail the cluster's event log (JSON lines)")
    p.add_argument("--nats", default=os.environ.get("FANOUT_NATS", "nats://127.0.0.1:4222"))
    p.add_argument("--from-start", action="store_true", help="from the oldest event kept")
    p.add_argument("--count", type=int, default=0, help="exit after N events (0: never)")

    p = sub.add_parser("token", help="mint a development token")
    p.add_argument("--user", required=True, help="the user (the token's 'sub'; required)")
    p.add_argument("--rooms", default="*",
                   help="'*' or comma-separated room names (default '*': every room)")
    p.add_argument("--ttl", type=float, default=3600.0,
                   help="seconds until expiry (default 3600)")
    p.add_argument("--iss", default="",
                   help="issuer claim, for a node with token_issuer (default: none)")
    p.add_argument("--aud", default="",
                   help="audience claim, for a node with token_audience (default: none)")
    _secret_arg(p)

    p = sub.add_parser("listen", help="join a room and print its messages",
                       description="Join ROOM and print every message (its seq, kind, "
                                   "priority, sender and payload; binary payloads in hex), "
                                   "gaps, reconnects, epoch changes, the online count, the "
                                   "ping interval the node granted and the adaptive "
                                   "heartbeat's steps and locks.")
    p.add_argument("room", help="the room to join")
    p.add_argument("--count", type=int, default=0, help="exit after N messages (default 0: never)")
    p.add_argument("--network", default="", metavar="KEY",
                   help="the network this device is on, e.g. 'wifi:home' or 'cell:46001': the "
                        "adaptive heartbeat learns the longest ping interval per key "
                        "(default '': one unnamed network)")
    p.add_argument("--heartbeat-file", default=None, metavar="FILE",
                   help="a JSON file to keep what the heartbeat learnt per network across "
                        "runs (default: none, kept in memory for this run only)")
    _client_args(p, "listen")

    p = sub.add_parser("say", help="send one chat message to a room")
    p.add_argument("room", help="the room (joined first, as chat needs)")
    p.add_argument("text", help="the message (UTF-8)")
    _client_args(p, "say")

    p = sub.add_parser("config", help="write a sample node configuration (TOML)",
                       description="Write every node setting with its default and doc, "
                                   "commented out, as a TOML file for `fanout node --config`.")
    p.add_argument("--sample", action="store_true", required=True,
                   help="the sample (the only form there is; required so that a later "
                        "`fanout config` can show the effective settings)")
    p.add_argument("--output", "-o", metavar="FILE", default="-",
                   help="where to write it (default '-': stdout)")

    p = sub.add_parser("cert", help="make a development CA and a certificate for trying TLS",
                       description="Write ca.pem, ca-key.pem, cert.pem and key.pem to --dir: a "
                                   "new CA and a certificate it signed for localhost, 127.0.0.1 "
                                   "and ::1 (and every --name). For trying TLS locally only.")
    p.add_argument("--dir", default="fanout-tls", help="where to write (default ./fanout-tls)")
    p.add_argument("--name", action="append", default=[], metavar="HOST",
                   help="another host name or IP address for the certificate (repeatable)")
    p.add_argument("--days", type=int, default=825, help="validity (default 825 days)")

    p = sub.add_parser("drain", help="gracefully drain a node through its admin API",
                       description="Ask a node to drain: it stops taking clients and "
                                   "publishes, moves its clients away, then exits.")
    p.add_argument("--admin-host", default="127.0.0.1",
                   help="address of the node's admin API (default 127.0.0.1)")
    p.add_argument("--admin-port", type=_port,
                   default=os.environ.get("FANOUT_ADMIN_PORT", "7001"),
                   help="its port (default $FANOUT_ADMIN_PORT, else 7001)")
    p.add_argument("--api-key", default=os.environ.get("FANOUT_API_KEY", ""),
                   help="the node's admin API key (default $FANOUT_API_KEY, else the key "
                        "file a node on loopback wrote for that port)")
    _load_parser(sub)
    _demo_parser(sub)
    return parser


def _demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="a live room in the browser: an embedded node, the demo page, a bot",
        description="Start an embedded node with its WebSocket port on, serve the demo page "
                    "and the JavaScript SDK over HTTP, and print the URL to open. Node "
                    "settings beyond these flags come from --config and FANOUT_* variables.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address of every port (default 127.0.0.1; the dev secret and "
                        "the /token endpoint are for loopback only)")
    p.add_argument("--http-port", type=_port, default=7080,
                   help="the page's port (default 7080, 0: any free port)")
    p.add_argument("--port", type=_port, default=7000, help="node TCP client port (default 7000)")
    p.add_argument("--ws-port", type=_port, default=None,
                   help="node WebSocket port (default: --port + 2, so 7002)")
    p.add_argument("--admin-port", type=_port, default=7001, help="admin API port (default 7001)")
    p.add_argument("--api-key", default=os.environ.get("FANOUT_API_KEY", ""),
                   help="admin API key (default $FANOUT_API_KEY, else generated)")
    p.add_argument("--secret", default=None,
                   help="token secret (default $FANOUT_SECRET, else the dev secret)")
    p.add_argument("--config", metavar="FILE", help="node settings (TOML, as for fanout node)")
    p.add_argument("--room", default="lobby", help="the page's room (default lobby)")
    p.add_argument("--user", default="",
                   help="the user every page gets a token for (default: a random one each)")
    p.add_argument("--bot", action=argparse.BooleanOptionalAction, default=True,
                   help="publish chat and gifts through the admin API, welcome new viewers "
                        "(default on)")
    p.add_argument("--bot-rate", type=float, default=2.0,
                   help="bot messages per second (default 2)")
    p.add_argument("--bot-viewers", type=int, default=5,
                   help="TCP viewers the bot keeps in the room (default 5)")
    p.add_argument("--open-tokens", action="store_true",
                   help="answer /token and /gift from any address, not only loopback")
    p.add_argument("--sdk", default="", help="the SDK's browser build "
                   "(default clients/js/dist/fanout.browser.js in the checkout)")
    p.add_argument("--loop", default="uvloop", help="uvloop or asyncio")
    p.add_argument("--log-level", default="WARNING")


def _load_parser(sub) -> None:
    p = sub.add_parser(
        "load", help="drive a node with many viewers and a publisher; measure and check",
        description="Connect --viewers viewers (raw sockets + epoll in C, spread over "
                    "processes of at most 19,000), publish --rate messages/s through the "
                    "admin API, and report deliveries/s, frames/s, wire bytes per message, "
                    "publish-to-receive latency, gaps, reorders and slow-consumer cuts. "
                    "--rate 0 holds idle connections. Exit status: 0 all checks passed, "
                    "3 a check failed, 1 the run failed, 2 bad arguments.")
    env = os.environ.get
    p.add_argument("--host", default=env("FANOUT_CONNECT_HOST", "127.0.0.1"),
                   help="node address (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=env("FANOUT_PORT", "7000"),
                   help="the node's port for --transport: its client port for tcp, its "
                        "WebSocket port for ws, its TLS ports for tls and wss (default "
                        "$FANOUT_PORT, else 7000)")
    # fanout.load.config.TRANSPORTS, spelled out: importing fanout.load here
    # would load the load tool for every command
    p.add_argument("--transport", choices=("tcp", "ws", "tls", "wss"), default="tcp",
                   help="tcp: wire frames on the client port; ws: WebSocket, one wire frame "
                        "per message, masked requests; tls, wss: the same over TLS on the "
                        "node's tls_port / wss_port (default tcp)")
    p.add_argument("--ws-path", default="/ws", help="WebSocket endpoint path (default /ws)")
    p.add_argument("--tls-ca", default="", metavar="PEM",
                   help="tls/wss: check the node's certificate against this CA (default: "
                        "not checked)")
    p.add_argument("--tls-server-name", default="",
                   help="tls/wss: the name sent as SNI and checked (default: --host)")
    p.add_argument("--admin-host", default="", help="admin API address (default: --host)")
    p.add_argument("--admin-port", type=_port, default=env("FANOUT_ADMIN_PORT", "7001"),
                   help="admin API port (default $FANOUT_ADMIN_PORT, else 7001)")
    p.add_argument("--api-key", default=env("FANOUT_API_KEY", ""),
                   help="admin API key, needed to publish (default $FANOUT_API_KEY, else "
                        "the key file a node on loopback wrote for --admin-port)")
    p.add_argument("--secret", default=env("FANOUT_SECRET", DEV_SECRET),
                   help="the node's token secret (default $FANOUT_SECRET, else the dev secret)")
    p.add_argument("--viewers", type=int, default=1000, help="viewer connections (default 1000)")
    p.add_argument("--rooms", type=int, default=1,
                   help="rooms; viewer i joins room i %% rooms (default 1)")
    p.add_argument("--rate", type=float, default=2000.0,
                   help="messages/s published in total, 0 for idle (default 2000)")
    p.add_argument("--gift-share", type=float, default=0.5,
                   help="fraction of messages that are gifts, the rest chat (default 0.5)")
    p.add_argument("--payload-bytes", type=int, default=50,
                   help="payload size incl. the 8-byte timestamp (default 50)")
    p.add_argument("--duration", type=float, default=10.0,
                   help="measured seconds, after the warm-up (default 10)")
    p.add_argument("--warmup", type=float, default=2.0,
                   help="seconds of publishing before measuring (default 2)")
    p.add_argument("--publish-tick-ms", type=float, default=10.0,
                   help="the publisher sends what is due every this many ms, in one request "
                        "(default 10; 1000 / rate: each message on its own, when it is due)")
    p.add_argument("--processes", type=int, default=0,
                   help="viewer processes (default ceil(viewers / 19000))")
    p.add_argument("--decode-every", type=int, default=50,
                   help="inflate and check every message of 1 viewer in N (default 50)")
    p.add_argument("--latency-every", type=int, default=1,
                   help="record the latency of 1 decoded message in N (default 1)")
    p.add_argument("--connect-window", type=int, default=256,
                   help="most viewers connecting at once (default 256)")
    p.add_argument("--read-interval-ms", type=float, default=0.0,
                   help="read viewers that are not decoded in rounds this far apart, so one "
                        "read can take several frames (default 0: at once, like a client)")
    p.add_argument("--max-retries", type=int, default=8,
                   help="reconnects of a viewer refused before it joined, with the "
                        "protocol's backoff (default 8)")
    p.add_argument("--source-addrs", default="auto",
                   help="'auto' (1000 viewers per 127.x source address on loopback), "
                        "'none', or a comma-separated address list")
    p.add_argument("--room-prefix", default="load-room-", help="room names are PREFIX<index>")
    p.add_argument("--json", metavar="FILE", help="write the JSON result here ('-': stdout)")
    p.add_argument("--node-pid", type=int, help="also report this node process's CPU use")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no live terminal view")


def _mint_token(args) -> int:
    rooms = "*" if args.rooms == "*" else [r for r in args.rooms.split(",") if r]
    problem = ("--user must not be empty" if not args.user else
               "--ttl must be more than 0 seconds" if not args.ttl > 0 else
               "--rooms names no room (use '*' for every room)" if not rooms else
               "--secret must not be empty" if not args.secret else "")
    if problem:
        print(f"fanout token: {problem}", file=sys.stderr)
        return 2
    extra = {k: v for k, v in (("iss", args.iss), ("aud", args.aud)) if v}
    print(mint(args.secret, args.user, rooms=rooms, ttl=args.ttl, **extra))
    return 0


def _token(args) -> str:
    return args.token or mint(args.secret, args.user)


def _refresher(args):
    """A token minted here can be minted again when it expires; a given one cannot."""
    return None if args.token else (lambda: mint(args.secret, args.user))


def _tls_options(args) -> dict:
    if not (args.tls or args.ca):
        return {}
    return {"tls": True, "ca": args.ca, "server_hostname": args.server_name}


#: The most payload bytes ``fanout listen`` shows of a binary payload.
SHOW_BYTES = 256


def show_payload(payload: bytes) -> str:
    """A payload as one safe line: UTF-8 text as it is, text with control
    characters (a terminal escape, a newline) as a Python literal, anything
    else as hex, cut at SHOW_BYTES."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        shown = payload[:SHOW_BYTES].hex(" ")
        more = f" ... ({len(payload)} bytes)" if len(payload) > SHOW_BYTES else ""
        return f"<{len(payload)} bytes> {shown}{more}"
    return text if text.isprintable() else repr(text)


def _secs(ms: int) -> str:
    return f"{ms / 1000:g} s"


class _Status:
    """What ``fanout listen`` reports besides messages: reconnects, epoch
    changes, the online count, the ping interval the node granted and the
    adaptive heartbeat's steps and locks, each printed when it changes."""

    def __init__(self, client, room: str, epoch: str) -> None:
        self.client, self.room = client, room
        self.epoch, self.reconnects, self.online = epoch, 0, None
        self.grant: tuple | None = None
        self.beat: tuple[int, bool] = (0, False)    # the tuner's (interval_ms, locked)

    def heartbeat(self) -> None:
        auth = self.client.auth
        if auth is not None:
            grant = (auth.ping_interval_ms, auth.idle_timeout_ms, auth.ping_interval_min_ms,
                     auth.ping_interval_max_ms)
            if grant != self.grant:
                self.grant = grant
                # "at least": the grant is a ceiling; the tuner may ping more often (it
                # starts low, searching upwards).
                print(f"-- heartbeat: the node wants a ping at least every {_secs(grant[0])} "
                      f"and cuts a connection silent for {_secs(grant[1])} (a Hello may ask "
                      f"for {_secs(grant[2])} to {_secs(grant[3])})", flush=True)
        tuner = self.client.heartbeat
        if tuner is None:
            return
        beat = (tuner.interval_ms, tuner.locked)
        if beat == self.beat or not beat[0]:      # 0: not granted yet on a new network
            return
        (was, was_locked), (now, locked) = self.beat, beat
        self.beat = beat
        name = f"-- heartbeat [{tuner.network or 'unnamed network'}]"
        if not was:
            state = ("locked (found earlier)" if locked else
                     f"searching: steps up after {tuner.step_after} answered probes")
            print(f"{name}: pinging every {_secs(now)}, {state}", flush=True)
        elif locked and (not was_locked or now < was):
            print(f"{name}: dead link at {_secs(was)}; back to {_secs(now)}, locked",
                  flush=True)
        elif now > was:
            print(f"{name}: {_secs(was)} held; trying {_secs(now)}", flush=True)

    def report(self) -> None:
        self.heartbeat()
        reconnects = self.client.stats["reconnects"]
        if reconnects != self.reconnects:
            self.reconnects = reconnects
            print(f"-- reconnected and resumed ({reconnects} reconnect(s) so far)", flush=True)
        cursor = self.client.cursor(self.room)
        if cursor is not None and cursor[0] != self.epoch:
            # '': a node that resumed us before the room had an epoch there
            # (it was new on that node); the seqs restarted all the same.
            new = cursor[0] or "(none yet: the room is new on this node)"
            print(f"-- [{self.room}] epoch changed: {self.epoch or '(none)'} -> {new} "
                  "(the room's seqs restarted)", flush=True)
            self.epoch = cursor[0]
        online = self.client.online(self.room)
        if online is not None and online != self.online:
            self.online = online
            print(f"-- [{self.room}] online: {online}", flush=True)

    async def watch(self, every: float = 0.5) -> None:
        while True:
            await asyncio.sleep(every)
            self.report()


def _kind_name(kind: int) -> str:
    from .protocol import fanout_pb2 as pb

    try:
        return pb.Kind.Name(kind).lower()
    except ValueError:
        return f"kind-{kind}"


def _whoami(client, device_class: str) -> str:
    """Who ``fanout listen`` is logged in as, and where a push to that user
    shows: its default user is made up (listen-PID), and a push to any
    other user never reaches it."""
    user = client.auth.user if client.auth is not None else "?"
    where = (f"a push to user {user} shows here as [{client.channel} ...]" if client.channel
             else "this node has user channels off")
    return f"-- as user {user} (device class {device_class}): {where}"


async def _listen(args) -> int:
    from .client import Client

    async with Client(args.host, args.port, _token(args), device_id="cli",
                      device_class=args.device_class, token_refresher=_refresher(args),
                      network=args.network, heartbeat_file=args.heartbeat_file,
                      **_tls_options(args)) as client:
        ack = await client.join(args.room)
        print(f"joined {args.room} at seq {ack.seq} (epoch {ack.epoch})", flush=True)
        print(_whoami(client, args.device_class), flush=True)
        status = _Status(client, args.room, ack.epoch)
        status.report()
        watcher = asyncio.create_task(status.watch())
        seen = 0
        try:
            async for event in client:
                status.report()
                if event.DESCRIPTOR.name == "Gap":
                    print(f"[{event.room}] GAP: messages {event.from_seq}..{event.to_seq} "
                          "are gone", flush=True)
                    continue
                priority = f" p{event.priority}" if event.priority else ""
                print(f"[{event.room} #{event.seq} {_kind_name(event.kind)}{priority}] "
                      f"{event.sender}: {show_payload(event.payload)}", flush=True)
                seen += 1
                if args.count and seen >= args.count:
                    break
        finally:
            watcher.cancel()
    return 0


async def _say(args) -> int:
    from .client import Client

    async with Client(args.host, args.port, _token(args), device_id="cli",
                      device_class=args.device_class, reconnect=False,
                      **_tls_options(args)) as client:
        await client.join(args.room)
        ack = await client.say(args.room, args.text.encode("utf-8"))
        print(f"sent to {args.room} as seq {ack.seq}", flush=True)
    return 0


#: The extra that brings the tools' dependencies (pyproject.toml).
TOOLS_EXTRA = "pip install 'fanout-im[tools]'"


def _cert(args) -> int:
    from . import devcert

    try:
        import cryptography  # noqa: F401
    except ImportError:
        print(f"fanout cert: needs the cryptography package: {TOOLS_EXTRA}", file=sys.stderr)
        return 2

    try:
        made = devcert.make(args.dir, [*devcert.DEFAULT_NAMES, *args.name], days=args.days)
    except OSError as exc:
        print(f"fanout cert: cannot write to {args.dir}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote a development CA and a certificate for "
          f"{', '.join(dict.fromkeys([*devcert.DEFAULT_NAMES, *args.name]))}:\n"
          f"  {made.ca}       the CA: clients trust this\n"
          f"  {made.cert}     the node's certificate (tls_cert)\n"
          f"  {made.key}      its key (tls_key)\n"
          f"  {made.ca_key}   the CA's key (keep it, or delete it)\n"
          f"try it:\n"
          f"  fanout node --tls-port 7443 --wss-port 7444 --tls-cert {made.cert} "
          f"--tls-key {made.key}\n"
          f"  fanout listen lobby --port 7443 --ca {made.ca}\n"
          f"development only: anyone with ca-key.pem can sign certificates this CA vouches for",
          flush=True)
    return 0


def _config_sample(args) -> int:
    from .server.configsample import sample

    text = sample()
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    try:
        with open(args.output, "x") as fh:     # never over an operator's file
            fh.write(text)
    except OSError as exc:
        print(f"fanout config: cannot write {args.output}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    print(f"wrote {args.output}; start a node with it: fanout node --config {args.output}")
    return 0


def _generated_key(admin_port: int) -> str:
    """The key a node on loopback generated for ``admin_port``, if its file is there."""
    try:
        with open(config_mod.default_key_file(admin_port)) as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _drain(args) -> int:
    import json
    import urllib.error
    import urllib.request

    host = f"[{args.admin_host}]" if ":" in args.admin_host else args.admin_host
    where = f"{host}:{args.admin_port}"
    api_key = args.api_key or _generated_key(args.admin_port)
    if not api_key:
        print("fanout drain: no API key; pass --api-key or set FANOUT_API_KEY", file=sys.stderr)
        return 1
    request = urllib.request.Request(f"http://{where}/v1/drain", method="POST",
                                     headers={"Authorization": f"Bearer {api_key}"})
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
        from .server.app import run

        overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_mod.NodeConfig)}
        try:
            cfg = config_mod.load(args.config, overrides=overrides)
        except config_mod.ConfigError as exc:
            print(f"fanout node: {exc}", file=sys.stderr)
            return 2
        if cfg.workers > 1:
            from .server.workers import run as run_workers
            return run_workers(cfg, sys.argv[2:] if argv is None else argv[1:])
        if cfg.nats:
            try:
                from .cluster.natsproc import binary  # noqa: F401  (the extra is there)
                import nats  # noqa: F401
            except ImportError:
                print("fanout node: --nats needs the cluster extra: pip install "
                      "'fanout-im[cluster]'", file=sys.stderr)
                return 2
        try:
            return run(cfg)        # 3 after a drain that left data undelivered
        except config_mod.ConfigError as exc:     # found at start: the key file
            print(f"fanout node: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:     # typically: the port is taken
            print(f"fanout node: cannot serve on {cfg.host}:{cfg.port} "
                  f"(admin {cfg.admin_host}:{cfg.admin_port}): {exc}", file=sys.stderr)
            return 1
    if args.command == "router":
        from .router.run import run as run_router

        overrides = {name: getattr(args, name) for name in ROUTER_FIELDS}
        try:
            cfg = config_mod.load(args.config, overrides=overrides)
        except config_mod.ConfigError as exc:
            print(f"fanout router: {exc}", file=sys.stderr)
            return 2
        if not cfg.nats:
            print("fanout router: --nats is required (the cluster bus)", file=sys.stderr)
            return 2
        return run_router(cfg, router_id=args.router_id)
    if args.command == "cluster":
        from .cluster.local import run as run_cluster

        if args.nodes < 1 or args.routers < 1:
            print("fanout cluster: --nodes and --routers must be at least 1", file=sys.stderr)
            return 2
        return run_cluster(nodes=args.nodes, base_port=args.base_port, routers=args.routers,
                           nats_port=args.nats_port, loop=args.loop)
    if args.command == "events":
        from .cluster.events import run as run_events
        return run_events(args.nats, since_start=args.from_start, count=args.count)
    if args.command == "token":
        return _mint_token(args)
    if args.command == "drain":
        return _drain(args)
    if args.command == "cert":
        return _cert(args)
    if args.command == "config":
        return _config_sample(args)
    if args.command == "demo":
        from .demo.run import run as run_demo
        return run_demo(args)
    if args.command == "load":
        from .load.cli import main as load_main

        # As for drain: the key a node on loopback generated for that port.
        args.api_key = args.api_key or _generated_key(args.admin_port)
        try:
            return load_main(args)
        except KeyboardInterrupt:
            return 130
    runner = _listen if args.command == "listen" else _say
    if not args.token and not args.user:
        print(f"fanout {args.command}: --user must not be empty", file=sys.stderr)
        return 2
    try:
        return asyncio.run(runner(args))
    except KeyboardInterrupt:
        return 130
    except ConnectionRefusedError:
        print(f"fanout {args.command}: nothing listens on {args.host}:{args.port} "
              "(is a node running there? `fanout node` serves 7000)", file=sys.stderr)
        return 1
    except (OSError, Exception) as exc:  # surface a one-line reason, not a traceback
        if os.environ.get("FANOUT_DEBUG"):
            raise
        print(f"fanout {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
