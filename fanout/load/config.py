"""What a load run is asked to do: :class:`LoadConfig` and its validation,
and :func:`plan`, which splits the viewers over worker processes and gives
each its source addresses. Also :class:`LoadError`, the one error a run
raises when it cannot be carried out."""

from __future__ import annotations

import ipaddress
import math
import socket
from dataclasses import dataclass

from ..protocol.auth import DEV_SECRET

__all__ = ["LoadConfig", "LoadError", "MAX_PER_PROCESS", "TRANSPORTS", "numeric_host", "plan"]

#: The viewers' transports (fanout._loadgen.Viewers): what each speaks on
#: the node's port.
TRANSPORTS = {"tcp": "wire frames on the client port",
              "ws": "WebSocket (RFC 6455) on the WebSocket port, one wire frame per message",
              "tls": "TLS on the tls_port, then wire frames",
              "wss": "TLS on the wss_port, then WebSocket"}

#: Most viewers one worker process holds (the open-file limit is 20,000).
MAX_PER_PROCESS = 19_000

# Viewers per source address with source_addrs="auto" (at most 254 addresses
# per process): few, so that the handshakes of a connect window spread over
# many addresses and stay under a default node's per-address caps
# (max_conns_per_ip 256, max_unauthenticated_per_ip 16).
_VIEWERS_PER_SOURCE = 16


class LoadError(RuntimeError):
    """The run could not be carried out (a worker failed, nobody joined, ...)."""


@dataclass
class LoadConfig:
    """Parameters of a load run (``fanout load --help`` describes each).

    :ivar processes: viewer worker processes; 0 picks
        ``ceil(viewers / MAX_PER_PROCESS)``.
    :ivar rate: messages per second the publisher offers in total, spread
        round-robin over the rooms; 0 is the idle mode (no publisher: viewers
        only keep their connections alive with pings).
    :ivar transport: how viewers reach the node: ``"tcp"`` (its client
        port), ``"ws"`` (its WebSocket port, path ``ws_path``), ``"tls"``
        or ``"wss"`` (its TLS ports); ``port`` is that transport's port.
        :data:`TRANSPORTS` lists them.
    :ivar tls_ca: TLS: the CA (PEM) the node's certificate must chain to,
        checked for ``tls_server_name`` (default: ``host``); "" does not
        check the certificate.
    :ivar source_addrs: ``"auto"`` binds each viewer to one of several
        loopback source addresses (16 viewers per address, at most 254 per
        process) when the node
        is on IPv4 loopback, so the node's per-address connection rate limit
        and the ephemeral port range apply per simulated client network, as
        with real viewers; ``"none"`` lets the kernel pick; or a
        comma-separated list of numeric addresses.
    """

    host: str = "127.0.0.1"
    port: int = 7000
    admin_host: str = ""                 # "": same as host
    admin_port: int = 7001
    api_key: str = ""
    secret: str = DEV_SECRET
    viewers: int = 1000
    rooms: int = 1
    rate: float = 2000.0
    gift_share: float = 0.5
    payload_bytes: int = 50
    duration: float = 10.0
    warmup: float = 2.0
    processes: int = 0
    decode_every: int = 50
    latency_every: int = 1
    seed: int = 0
    node_pid: int | None = None
    connect_window: int = 256
    read_interval: float = 0.0
    source_addrs: str = "auto"
    room_prefix: str = "load-room-"
    max_retries: int = 8
    connect_timeout: float = 10.0
    join_timeout: float = 120.0
    drain_timeout: float = 5.0
    tick: float = 0.01                   # publisher: seconds between requests
    progress: bool = True
    transport: str = "tcp"
    ws_path: str = "/ws"
    tls_ca: str = ""
    tls_server_name: str = ""

    def validate(self) -> "LoadConfig":
        """Check the values; returns self. :raises ValueError: on a bad value."""
        if self.viewers < 1:
            raise ValueError("viewers must be >= 1")
        if self.rooms < 1 or self.rooms > self.viewers:
            raise ValueError("rooms must be between 1 and the number of viewers")
        if self.rate < 0:
            raise ValueError("rate must be >= 0")
        if not 0.0 <= self.gift_share <= 1.0:
            raise ValueError("gift_share must be between 0 and 1")
        if self.payload_bytes < 8:
            raise ValueError("payload_bytes must be >= 8 (the timestamp)")
        if self.duration <= 0 or self.warmup < 0:
            raise ValueError("duration must be > 0 and warmup >= 0")
        if self.processes < 0 or self.decode_every < 1 or self.latency_every < 1:
            raise ValueError("processes must be >= 0; decode_every and latency_every >= 1")
        if self.processes and math.ceil(self.viewers / self.processes) > MAX_PER_PROCESS:
            raise ValueError(f"at most {MAX_PER_PROCESS} viewers per process: "
                             f"use at least {math.ceil(self.viewers / MAX_PER_PROCESS)} processes")
        if self.processes > self.viewers:
            raise ValueError("more processes than viewers")
        if not self.tick > 0:
            raise ValueError("publish tick must be > 0")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}")
        if self.rate > 0 and not self.api_key:
            raise ValueError("publishing needs the node's admin API key (--api-key)")
        return self

    @property
    def process_count(self) -> int:
        """Worker processes this run uses."""
        return self.processes or math.ceil(self.viewers / MAX_PER_PROCESS)

    def room_name(self, index: int) -> str:
        return f"{self.room_prefix}{index}"


def numeric_host(host: str, port: int) -> str:
    """``host`` as a numeric address (resolved when it is a name)."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0]


def _source_addrs(cfg: LoadConfig, host: str, proc: int, count: int) -> list[str]:
    mode = cfg.source_addrs.strip()
    if mode == "none" or not mode:
        return []
    if mode != "auto":
        return [a.strip() for a in mode.split(",") if a.strip()]
    addr = ipaddress.ip_address(host)
    if addr.version != 4 or not addr.is_loopback:
        return []
    k = max(1, math.ceil(count / _VIEWERS_PER_SOURCE))
    return [f"127.{1 + proc // 250}.{proc % 250}.{j + 1}" for j in range(min(k, 254))]


def plan(cfg: LoadConfig, host: str | None = None) -> list[dict]:
    """One spec per viewer worker: its slice of viewers and everything it
    needs (see :func:`~fanout.load.fleet.build_viewers`).

    :param host: the node's numeric address (default: ``cfg.host`` resolved).
    """
    host = host or numeric_host(cfg.host, cfg.port)
    procs = cfg.process_count
    base, extra = divmod(cfg.viewers, procs)
    specs, start = [], 0
    for p in range(procs):
        count = base + (1 if p < extra else 0)
        specs.append({
            "proc": p, "host": host, "port": cfg.port, "secret": cfg.secret,
            "start": start, "count": count, "rooms": cfg.rooms,
            "room_names": [cfg.room_name(r) for r in range(cfg.rooms)],
            "decode_every": cfg.decode_every, "latency_every": cfg.latency_every,
            "connect_window": cfg.connect_window, "read_interval": cfg.read_interval,
            "source_addrs": _source_addrs(cfg, host, p, count),
            "max_retries": cfg.max_retries, "connect_timeout": cfg.connect_timeout,
            "transport": cfg.transport, "ws_path": cfg.ws_path,
            "tls_ca": cfg.tls_ca, "tls_server_name": cfg.tls_server_name or cfg.host,
            "ttl": cfg.join_timeout + cfg.warmup + cfg.duration + 3600,
        })
        start += count
    return specs
