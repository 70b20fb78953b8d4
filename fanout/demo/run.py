"""``fanout demo``: an embedded node (WebSocket on), the page, the bot."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from pathlib import Path

from aiohttp import web

from ..server import config as config_mod
from ..server.app import App, install_loop, print_generated_key
from .bot import Bot
from .web import DemoSite, default_sdk, make_app

log = logging.getLogger("fanout.demo")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def origins(host: str, http_port: int) -> str:
    """The Origin values a browser sends for the page: the address it was
    opened at, and localhost's names for it."""
    names = {_url_host(host)}
    if config_mod.is_loopback(host):
        names |= {"127.0.0.1", "localhost", "[::1]"}
    return ",".join(sorted(f"http://{name}:{http_port}" for name in names))


#: Node settings the demo changes from a node's defaults (FANOUT_* variables
#: still win): the online count every 2 s, not 10.
DEMO_NODE_DEFAULTS = {"presence_interval_ms": "2000"}


async def serve(args) -> int:
    """Run until SIGINT/SIGTERM. ``args`` are ``fanout demo``'s."""
    host = args.host
    # The site learns the node's secret and WebSocket port once the node is
    # up; the page's port is bound first, as the node's Origin check needs it.
    demo = DemoSite(ws_url="", room=args.room, secret="", user=args.user,
                    open_tokens=args.open_tokens,
                    sdk_path=Path(args.sdk) if args.sdk else default_sdk())
    runner = web.AppRunner(make_app(demo), access_log=None)
    await runner.setup()
    try:
        sock = socket.create_server((host, args.http_port))
    except OSError as exc:
        await runner.cleanup()
        raise SystemExit(f"fanout demo: cannot serve the page on {host}:{args.http_port}: "
                         f"{exc}") from None
    await web.SockSite(runner, sock).start()
    http_port = sock.getsockname()[1]
    try:
        env = {**{config_mod.ENV_PREFIX + k.upper(): v for k, v in DEMO_NODE_DEFAULTS.items()},
               **os.environ}
        cfg = config_mod.load(args.config, env=env, overrides={
            "host": host, "port": args.port, "ws_port": args.ws_port,
            "admin_host": host, "admin_port": args.admin_port, "api_key": args.api_key,
            "ws_origins": origins(host, http_port), "loop": args.loop,
            "secret": args.secret})
    except config_mod.ConfigError as exc:
        await runner.cleanup()
        raise SystemExit(f"fanout demo: {exc}") from None
    app = App(cfg)
    try:
        await app.start()
    except OSError as exc:         # typically: `fanout node` already serves these ports
        await runner.cleanup()
        raise SystemExit(f"fanout demo: cannot start its node: {exc} (a node runs there? "
                         "stop it, or give the demo other ports: --port, --admin-port)") from None
    except BaseException:
        await runner.cleanup()
        raise
    if app.node.ws_address is None:
        await app.stop(grace=0)
        await runner.cleanup()
        raise SystemExit("fanout demo: the page needs the node's WebSocket port (ws_port -1)")
    ws_port = app.node.ws_address[1]
    demo.ws_url = f"ws://{_url_host(host)}:{ws_port}{cfg.ws_path}"
    demo.secret, demo.issuer, demo.audience = cfg.secret, cfg.token_issuer, cfg.token_audience
    demo.node = app.node                 # the gift service publishes and pushes through it
    bot = None
    if app.admin is None:
        print("fanout demo: no admin API (admin_port -1), so no bot", flush=True)
    else:
        admin_host, admin_port = app.admin.address
        print_generated_key(app)
        print(f"fanout admin API listening on {admin_host}:{admin_port}", flush=True)
    if args.bot and app.admin is not None:
        node_host, node_port = app.node.address
        bot = Bot(f"http://{_url_host(admin_host)}:{admin_port}", app.api_key, args.room,
                  rate=args.bot_rate, viewers=args.bot_viewers, node=(node_host, node_port),
                  secret=cfg.secret)
        bot.start()
    print(f"fanout node listening on {_url_host(host)}:{app.node.address[1]}", flush=True)
    print(f"fanout node WebSocket on {demo.ws_url}", flush=True)
    if not demo.sdk_path.is_file():
        print(f"fanout demo: WARNING: no SDK browser build at {demo.sdk_path}: the page "
              "cannot connect (start the demo in the source checkout, or give --sdk "
              "clients/js/dist/fanout.browser.js; build it with: cd clients/js && npm ci && "
              "npm run build)", flush=True)
    print(f"fanout demo: open http://{_url_host(host)}:{http_port}/"
          f"{'  (the bot is publishing)' if bot else ''}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if bot is not None:
        await bot.stop()
    # The node drains first: its viewers get SERVER_SHUTDOWN with a delay
    # to come back after, then the page's server goes.
    await app.stop()
    await runner.cleanup()
    return 0


def run(args) -> int:
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_loop(args.loop)
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 130
