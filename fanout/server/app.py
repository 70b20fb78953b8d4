"""The composition root: the one place that wires a node together,
config -> metrics -> bus -> logic -> node -> admin API, and runs it.

Nothing else constructs these parts or chooses between implementations, so
a deployment that needs another bus or logic (a cluster) changes this file
and adds its own, behind the :class:`~fanout.bus.Bus` and
:class:`~fanout.logic.Logic` interfaces.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import signal
import socket

from ..bus.base import Bus
from ..bus.local import LocalBus
from ..logic.admission import ChatAdmission
from ..logic.base import Logic
from ..logic.local import LocalLogic
from ..logic.logins import LoginRegistry
from ..logic.revocations import Revocations
from ..logic.sequencer import Sequencer
from . import keyfile
from .admin import AdminServer
from .config import MIN_SECRET_BYTES, NodeConfig
from .metrics import NodeMetrics, cluster_figures
from .node import Node

log = logging.getLogger("fanout.app")


def local_logic(config: NodeConfig, bus: Bus, metrics: NodeMetrics | None = None) -> LocalLogic:
    """The embedded logic with the limits of ``config``."""
    return LocalLogic(
        bus,
        sequencer=Sequencer(max_publish_bytes=config.max_publish_bytes,
                            room_budget=config.room_budget,
                            chat_sample_every=config.chat_sample_every,
                            idle_ttl=config.room_idle_ttl_s, metrics=metrics),
        admission=ChatAdmission(max_chat_bytes=config.max_chat_bytes,
                                chat_rate=config.chat_rate, chat_burst=config.chat_burst,
                                metrics=metrics),
        logins=LoginRegistry(),
        revocations=Revocations(config.max_token_lifetime_s))


def node_id(config: NodeConfig) -> str:
    return config.node_id or f"{socket.gethostname()}-{os.getpid()}"


def cluster_parts(config: NodeConfig) -> tuple[Bus, Logic]:
    """A cluster node's bus and logic: NATS, and the routers behind it."""
    from ..bus.nats import NatsBus
    from ..cluster.connect import ClusterSettings
    from ..logic.remote import RouterLogic
    timeout = config.rpc_timeout_ms / 1000
    bus = NatsBus(config.nats, node_id=node_id(config), request_timeout=timeout,
                  settings=ClusterSettings(history_per_room=config.history_per_room,
                                           replicas=config.cluster_replicas,
                                           revocation_ttl_s=config.max_token_lifetime_s),
                  presence_ttl=max(5.0, 3 * config.presence_interval_ms / 1000))
    return bus, RouterLogic(bus, timeout=timeout)


class App:
    """A node and everything around it, wired from ``config``.

    :param bus, logic: replace the embedded defaults (an in-process
        :class:`~fanout.bus.LocalBus` and :func:`local_logic` on it).
    """

    def __init__(self, config: NodeConfig, *, bus: Bus | None = None,
                 logic: Logic | None = None) -> None:
        self.config = config
        self.metrics = NodeMetrics()
        if bus is None and logic is None and config.nats:
            bus, logic = cluster_parts(config)
            cluster_figures(self.metrics, bus, logic)
        self.bus = bus if bus is not None else LocalBus()
        self.logic = logic if logic is not None else local_logic(config, self.bus, self.metrics)
        self.node = Node(config, metrics=self.metrics, bus=self.bus, logic=self.logic)
        self.api_key = config.api_key or secrets.token_urlsafe(32)
        self.admin = (AdminServer(self.node, config, self.metrics.registry, self.api_key)
                      if config.admin_port >= 0 else None)
        #: Where the generated API key was written (None: it was configured).
        self.api_key_file: str | None = None
        self._closed = False

    async def start(self) -> None:
        """Start every part; the node accepts clients when this returns. If a
        part fails to start (a port taken), what did start is stopped."""
        try:
            await self.bus.start()
            await self.logic.start()
            await self.node.start()
            if self.admin is not None:
                await self.admin.start()
            if self.admin is not None and not self.config.api_key:
                # The key goes to a file only this user can read, never to
                # the log (logs are shipped and read widely).
                path = self.config.key_file_path(self.admin.address[1])
                kept = keyfile.read_key(path) if self.config.admin_port > 0 else ""
                if kept:
                    self.api_key = self.admin.api_key = kept
                else:
                    keyfile.write_key(path, self.api_key)
                self.api_key_file = path
        except BaseException:
            await self.stop(grace=0)
            raise
        cfg = self.config
        if cfg.uses_dev_secret:
            log.warning("using the built-in development secret: anyone can mint tokens; "
                        "set FANOUT_SECRET (or --secret) for anything but development")
        for name in cfg.weak_credentials():
            log.warning("%s is shorter than %d bytes: it can be guessed; use a longer random one",
                        name, MIN_SECRET_BYTES)
        if self.api_key_file is not None:
            # Generated once per admin port and kept: the same key on every run.
            log.warning("no api_key configured; the admin API key generated for this port "
                        "is kept in %s", self.api_key_file)

    async def serve_forever(self) -> None:
        """Until the node has drained (SIGTERM, ``POST /v1/drain``), then close."""
        await self.node.serve_forever()
        await self._close()

    async def stop(self, *, grace: float | None = None) -> None:
        """A drain with ``grace`` seconds for clients to leave, then close."""
        await self.node.drain(grace)
        await self._close()

    async def _close(self) -> None:
        # After the node's drain: the admin API first (it answered probes and
        # metrics until the drain was over), then the logic, then the bus.
        if self._closed:
            return
        self._closed = True
        if self.admin is not None:
            await self.admin.close()
        if self.api_key_file is not None and self.config.admin_port == 0:
            # A key for a port picked at random is of no use to the next
            # run; one for a fixed port is kept for it (keyfile.py).
            keyfile.remove_key(self.api_key_file, self.api_key)
        await self.logic.close()
        await self.bus.close()


def install_loop(kind: str) -> None:
    if kind == "uvloop":
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


#: ``fanout node``'s exit status after a drain that closed connections still
#: holding data they were sent (0 after a clean one).
EXIT_UNCLEAN_DRAIN = 3


def tune_gc(config: NodeConfig) -> None:
    """The node process's garbage collector: its thresholds, and (with
    ``gc_freeze``) everything allocated by start-up frozen, so the full
    collections a node still makes scan only what it allocated since (its
    sessions and rooms), not the ~100k objects of the modules it imported.
    Process-wide, so ``fanout node`` does it, never an :class:`App`
    embedded in another program (or the tests)."""
    gc.set_threshold(*config.gc_threshold_values())
    if config.gc_freeze:
        gc.collect()
        gc.freeze()


async def _serve(config: NodeConfig) -> int:
    app = App(config)
    await app.start()
    tune_gc(config)
    if app.admin is not None:
        host, port = app.admin.address
        print_generated_key(app)
        print(f"fanout admin API listening on {host}:{port}", flush=True)
    if app.node.ws_address is not None:
        # Before the "listening" line, which tools wait for (both are bound).
        host, port = app.node.ws_address
        print(f"fanout node WebSocket on ws://{_url_host(host)}:{port}{config.ws_path}",
              flush=True)
    if app.node.tls_address is not None:
        host, port = app.node.tls_address
        print(f"fanout node TLS on {host}:{port}", flush=True)
    if app.node.wss_address is not None:
        host, port = app.node.wss_address
        print(f"fanout node WebSocket over TLS on wss://{_url_host(host)}:{port}"
              f"{config.ws_path}", flush=True)
    host, port = app.node.address
    print(f"fanout node listening on {host}:{port}", flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, app.node.start_drain)
    await app.serve_forever()
    return EXIT_UNCLEAN_DRAIN if app.node.undelivered else 0


def print_generated_key(app: App) -> None:
    """The key a node generated, on stdout for the developer who started it
    (their terminal, not the log). Only a node on loopback generates one;
    anywhere else ``api_key`` is required and never printed."""
    if app.api_key_file is not None:
        print(f"fanout admin API key: {app.api_key} (generated for loopback, kept in "
              f"{app.api_key_file}; set api_key or FANOUT_API_KEY to choose one)", flush=True)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def run(config: NodeConfig) -> int:
    """Run a node until SIGINT/SIGTERM or an admin drain (``fanout node``).
    Returns the exit status: 0, or EXIT_UNCLEAN_DRAIN."""
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_loop(config.loop)
    return asyncio.run(_serve(config))
