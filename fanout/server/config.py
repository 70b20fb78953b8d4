"""Node configuration: defaults, then a TOML file, then FANOUT_* environment
variables, then command-line flags (later wins).

Every field of :class:`NodeConfig` is settable all three ways: field
``max_delay_ms`` is ``max_delay_ms = 20`` in TOML (top level or under
``[node]``), ``FANOUT_MAX_DELAY_MS=20`` in the environment and
``--max-delay-ms 20`` on the command line.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tempfile
from dataclasses import dataclass, fields
from typing import Any, Mapping

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from ..protocol import wire
from ..protocol.auth import DEV_SECRET

ENV_PREFIX = "FANOUT_"


#: Secrets and API keys shorter than this many bytes are guessable: the node warns.
MIN_SECRET_BYTES = 32


#: ``ws_port``'s default: the client port + 2 (7002 beside the default 7000,
#: 7001 being the admin API), or a free port when the client port is 0.
WS_PORT_AUTO = -2


class ConfigError(ValueError):
    pass


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a port on this machine: 127.0.0.0/8,
    ::1 or ``localhost``. Any other name or address counts as reachable."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_key_file(admin_port: int) -> str:
    """``fanout-<admin_port>.key`` in ``$XDG_RUNTIME_DIR`` (private to the
    user), else in the system temp dir: where a node on loopback writes its
    generated API key, and where ``fanout drain`` looks for it."""
    directory = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return os.path.join(directory, f"fanout-{admin_port}.key")


#: The settings that are port numbers (their minimum is each field's own).
PORT_FIELDS = ("port", "ws_port", "admin_port", "tls_port", "wss_port")
MAX_PORT = 65535


def _field(default, doc, *, minimum=None):
    return dataclasses.field(default=default, metadata={"doc": doc, "min": minimum})


@dataclass
class NodeConfig:
    host: str = _field("127.0.0.1", "address the client port binds to")
    port: int = _field(7000, "client port (0: any free port)", minimum=0)
    ws_port: int = _field(WS_PORT_AUTO, "WebSocket port for browsers, endpoint ws_path "
                          "(-2: port + 2, so 7002, or any free port when port is 0; "
                          "0: any free port; -1: off)", minimum=-2)
    ws_path: str = _field("/ws", "path of the WebSocket endpoint on ws_port")
    ws_origins: str = _field("*", "comma-separated Origin values a browser may connect from, "
                             "like https://live.example.com ('*': any; clients without Origin, "
                             "not browsers, always may)")
    secret: str = _field(DEV_SECRET, "HS256 secret that signs client tokens "
                         "(the built-in development secret only on a loopback host)")
    admin_host: str = _field("127.0.0.1", "address the admin HTTP API binds to (keep it private)")
    admin_port: int = _field(7001, "admin HTTP API port (0: any free port, -1: no admin API)", minimum=-1)
    api_key: str = _field("", "key for the admin API ('': on a loopback admin_host, use the "
                          "one in api_key_file, or generate one there; required elsewhere)")
    api_key_file: str = _field("", "where a generated API key is written, mode 0600 ('': "
                               "$XDG_RUNTIME_DIR or the temp dir, fanout-<admin port>.key)")
    # client tokens
    token_issuer: str = _field("", "tokens must carry this 'iss' ('': not checked)")
    token_audience: str = _field("", "tokens must carry this 'aud' ('': not checked)")
    token_grace_ms: int = _field(10_000, "a live connection outlives its token's exp by this "
                                 "much before Kick(TOKEN_EXPIRED)", minimum=0)
    max_token_lifetime_s: float = _field(86_400.0, "refuse tokens that expire later than this "
                                         "after their iat (or now); also how long a revocation "
                                         "is kept", minimum=1)
    loop: str = _field("uvloop", "event loop: uvloop or asyncio")
    # the cluster (docs/cluster.md)
    nats: str = _field("", "NATS URL(s) of the cluster bus, comma-separated ('': the "
                       "embedded single process, no other service)")
    node_id: str = _field("", "this node's name in the cluster ('': host-pid)")
    workers: int = _field(1, "node processes on this host sharing the client port "
                          "(SO_REUSEPORT), joined over the bus", minimum=1)
    reuse_port: int = _field(0, "1: bind the client port with SO_REUSEPORT, shared with "
                             "other processes (set by --workers)", minimum=0)
    room_release_s: float = _field(10.0, "in a cluster, stop receiving a room's traffic this "
                                   "long after its last member here left (its history stays "
                                   "in JetStream for members who come back)", minimum=0)
    rpc_timeout_ms: int = _field(2000, "how long a call to a router (publish, chat, join, "
                                 "login) waits before UNAVAILABLE", minimum=10)
    history_per_room: int = _field(1024, "messages per room the cluster keeps in JetStream "
                                   "(resume from any node reaches this far)", minimum=1)
    cluster_replicas: int = _field(1, "replicas of the cluster's streams and buckets "
                                   "(3 on a three-server NATS cluster)", minimum=1)
    log_level: str = _field("INFO", "DEBUG, INFO, WARNING or ERROR")
    # connections
    ping_interval_ms: int = _field(20_000, "how often clients should ping, unless a Hello asks "
                                   "for another interval (then clamped to the bounds below)",
                                   minimum=100)
    ping_interval_min_ms: int = _field(5_000, "the shortest ping interval a Hello may ask for "
                                       "(ping_interval_ms if that is shorter)", minimum=100)
    ping_interval_max_ms: int = _field(300_000, "the longest ping interval a Hello may ask for "
                                       "(ping_interval_ms if that is longer); the idle timeout "
                                       "scales with the interval granted, in the ratio of "
                                       "idle_timeout_ms to ping_interval_ms", minimum=100)
    idle_timeout_ms: int = _field(45_000, "close a connection silent this long", minimum=200)
    auth_timeout_ms: int = _field(3_000, "close a connection without a valid Hello after this", minimum=100)
    close_grace_ms: int = _field(2_000, "time a closing connection gets to take its last frame", minimum=0)
    max_frame: int = _field(65_536, "largest client frame body, before and after lz4", minimum=64)
    max_hello_bytes: int = _field(24_576, "largest frame before authentication: a Hello with the largest token the node accepts and its resume points fits", minimum=64)
    request_rate: float = _field(20.0, "client frames per second per connection, every type (past the burst: closed, TOO_MANY_REQUESTS)", minimum=0.1)
    request_burst: float = _field(100.0, "burst of client frames per connection", minimum=1)
    max_rooms_per_conn: int = _field(16, "rooms one connection may join (its user's channel "
                                     "not counted)", minimum=1)
    user_channels: int = _field(1, "1: every connection of a user is a member of the user's "
                                "channel '@' + user, which the admin API publishes to (pushes "
                                "to one user); 0: no user channels", minimum=0)
    max_backlog_bytes: int = _field(1 << 20, "unsent bytes after which a client is cut as slow", minimum=1024)
    max_backlog_frames: int = _field(1024, "unsent frames after which a client is cut as slow", minimum=2)
    max_connections: int = _field(19_000, "connections this node holds at most", minimum=1)
    conn_rate_per_ip: float = _field(500.0, "new connections per second per client address", minimum=0)
    conn_burst_per_ip: float = _field(2000.0, "burst of new connections per client address", minimum=1)
    # admission (the client port; see the listener)
    max_conns_per_ip: int = _field(256, "connections one client address (IPv6: one /64) may hold at once", minimum=1)
    shed_after_refusals: int = _field(50, "refusals of one IPv4 address within a second after which the kernel drops its new connections for shed_seconds (0: never)", minimum=0)
    shed_seconds: float = _field(2.0, "how long an address that floods the client port is shed", minimum=0.1)
    max_unauthenticated: int = _field(1024, "connections without a valid Hello, in total (over it the oldest is closed)", minimum=1)
    max_unauthenticated_per_ip: int = _field(16, "connections without a valid Hello per client address", minimum=1)
    fd_reserve: int = _field(256, "file descriptors client sockets never take (admin API, probes, logs)", minimum=16)
    sndbuf_bytes: int = _field(262_144, "SO_SNDBUF of client sockets, bounding kernel memory per slow client (0: kernel default)", minimum=0)
    proxy_protocol_from: str = _field("", "comma-separated networks (CIDR) whose connections must start with a PROXY v1/v2 header ('': none)")
    # TLS (docs/operations.md, "TLS"): its own ports, beside the plaintext ones
    tls_port: int = _field(-1, "TCP+TLS client port on host (-1: off, 0: any free port)", minimum=-1)
    wss_port: int = _field(-1, "WebSocket over TLS client port on host, wss://HOST:PORT/ws "
                           "(-1: off, 0: any free port)", minimum=-1)
    tls_cert: str = _field("", "PEM file: the certificate chain tls_port and wss_port serve "
                           "(fanout cert makes one for trying it)")
    tls_key: str = _field("", "PEM file: the private key of tls_cert")
    tls_mode: str = _field("auto", "auto: kernel TLS where the kernel and OpenSSL allow it, "
                           "else the core's OpenSSL; core: always the core's OpenSSL")
    admin_max_connections: int = _field(128, "admin API connections at once (over it the oldest is closed)", minimum=1)
    admin_header_timeout_ms: int = _field(5_000, "close an admin API connection without complete request headers after this", minimum=100)
    presence_interval_ms: int = _field(10_000, "how often members get the room's online count (0: never)", minimum=0)
    drain_grace_ms: int = _field(10_000, "longest a drain waits for clients to leave", minimum=0)
    drain_jitter_ms: int = _field(5_000, "spread of the reconnect delays a drain hands out", minimum=0)
    # upstream chat
    max_chat_bytes: int = _field(2048, "largest chat payload", minimum=1)
    max_publish_bytes: int = _field(65_536, "largest server-side publish payload", minimum=1)
    chat_rate: float = _field(5.0, "chat messages per second per user", minimum=0)
    chat_burst: float = _field(10.0, "chat burst per user", minimum=1)
    # broadcast
    max_delay_ms: float = _field(50.0, "longest a hot room holds a message before its flush", minimum=0)
    room_budget: float = _field(5000.0, "inbound messages per second per room before chat is sampled", minimum=1)
    chat_sample_every: int = _field(10, "over budget, keep one chat message in this many", minimum=1)
    lag_degraded_ms: float = _field(20.0, "mean event-loop lag over a second that makes the node degrade", minimum=1)
    lag_overloaded_ms: float = _field(100.0, "mean event-loop lag over a second that makes the node overloaded (not ready)", minimum=1)
    delay_degraded_ms: float = _field(500.0, "mean time a delivered message waited for its flush and write round, over a second, that makes the node degrade", minimum=1)
    delay_overloaded_ms: float = _field(3000.0, "the same delay that makes the node overloaded (not ready)", minimum=1)
    backlog_degraded_bytes: int = _field(256 << 20, "write backlog across connections that makes the node degrade", minimum=1)
    max_batch_bytes: int = _field(65_536, "flush a room's batch when it reaches this", minimum=256)
    compress_min: int = _field(64, "smallest frame body worth lz4 (0: never compress); with the dictionary one message pays", minimum=0)
    compress_level: int = _field(10, "lz4 level: 0 fast mode, 1-12 high compression", minimum=0)
    compress_dict: int = _field(1, "pre-shared lz4 dictionary id for every compressed frame (0: none; every client must hold it: docs/protocol.md section 3)", minimum=0)
    write_threads: int = _field(-1, "writer threads for large rooms' flushes (-1: one fewer than the CPUs, at least 1; 0: write on the event loop)", minimum=-1)
    write_thread_min_members: int = _field(256, "smallest room the writer threads write; smaller rooms are written on the loop at once", minimum=1)
    ring_size: int = _field(1024, "messages per room kept for resume", minimum=1)
    ring_bytes: int = _field(1 << 20, "bytes per room kept for resume", minimum=1024)
    room_idle_ttl_s: float = _field(300.0, "forget an empty, silent room's history after this", minimum=0)
    # the process
    gc_freeze: int = _field(1, "1: once started, move every object so far (modules, config) out "
                            "of the garbage collector's reach (gc.freeze), so full collections "
                            "no longer scan them", minimum=0)
    gc_thresholds: str = _field("700,10,100", "gc.set_threshold of the node process: new "
                                "objects per young collection, young collections per middle "
                                "one, middle ones per full one (0 first: no automatic GC)")

    def writer_threads(self) -> int:
        """The core's writer threads: write_threads, or for -1 one fewer
        than the CPUs this process may run on (at least one). On the 2-core
        machine the benchmarks run on, a second writer thread competed with
        the event loop and the viewers' readers and made p99 worse
        (docs/architecture.md, "Writer threads")."""
        if self.write_threads >= 0:
            return self.write_threads
        return max(1, len(os.sched_getaffinity(0)) - 1)

    def ping_bounds(self) -> tuple[int, int]:
        """(shortest, longest) ping interval in ms a Hello may ask for: the
        configured bounds, widened to take in ping_interval_ms (so a test
        node pinging every 200 ms needs no bounds of its own)."""
        return (min(self.ping_interval_min_ms, self.ping_interval_ms),
                max(self.ping_interval_max_ms, self.ping_interval_ms))

    def grant_ping(self, requested_ms: int) -> tuple[int, int]:
        """(ping interval, idle timeout) in ms for a connection whose Hello
        asked for ``requested_ms`` (0: the default). The idle timeout keeps
        the configured ratio to the interval, so a slow pinger gets as many
        lost pings' slack as everyone else."""
        if not requested_ms:
            return self.ping_interval_ms, self.idle_timeout_ms
        low, high = self.ping_bounds()
        interval = min(max(requested_ms, low), high)
        return interval, interval * self.idle_timeout_ms // self.ping_interval_ms

    def validate(self) -> "NodeConfig":
        for f in fields(self):
            minimum = f.metadata.get("min")
            value = getattr(self, f.name)
            if minimum is not None and value < minimum:
                raise ConfigError(f"{f.name} must be >= {minimum}, got {value!r}")
        for name in PORT_FIELDS:
            if getattr(self, name) > MAX_PORT:
                raise ConfigError(f"{name} must be <= {MAX_PORT}, got {getattr(self, name)}")
        if self.write_threads > 64:
            raise ConfigError(f"write_threads must be 0-64, got {self.write_threads}")
        if self.compress_level > 12:
            raise ConfigError(f"compress_level must be 0-12, got {self.compress_level}")
        if self.compress_dict and self.compress_dict not in wire.DICTIONARIES:
            raise ConfigError(f"compress_dict {self.compress_dict} is not a known dictionary "
                              f"(known: 0, {', '.join(map(str, sorted(wire.DICTIONARIES)))})")
        if self.loop not in ("uvloop", "asyncio"):
            raise ConfigError(f"loop must be 'uvloop' or 'asyncio', got {self.loop!r}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"unknown log_level {self.log_level!r}")
        if self.idle_timeout_ms <= self.ping_interval_ms:
            raise ConfigError("idle_timeout_ms must be longer than ping_interval_ms")
        if self.ping_interval_min_ms > self.ping_interval_max_ms:
            raise ConfigError("ping_interval_min_ms must not be above ping_interval_max_ms")
        if self.lag_overloaded_ms <= self.lag_degraded_ms:
            raise ConfigError("lag_overloaded_ms must be above lag_degraded_ms")
        if self.delay_overloaded_ms <= self.delay_degraded_ms:
            raise ConfigError("delay_overloaded_ms must be above delay_degraded_ms")
        if not self.secret:
            raise ConfigError("secret must not be empty")
        if self.uses_dev_secret and not is_loopback(self.host):
            raise ConfigError(f"the built-in development secret is only allowed on a loopback "
                              f"host, not {self.host!r}: set secret (FANOUT_SECRET or --secret)")
        if self.admin_port >= 0 and not self.api_key and not is_loopback(self.admin_host):
            raise ConfigError(f"admin_host {self.admin_host!r} is not loopback: set api_key "
                              "(FANOUT_API_KEY or --api-key)")
        if self.admin_max_connections >= self.fd_reserve:
            raise ConfigError("admin_max_connections must be below fd_reserve, which it draws from")
        if self.max_unauthenticated_per_ip > self.max_conns_per_ip:
            raise ConfigError("max_unauthenticated_per_ip must not exceed max_conns_per_ip")
        if not self.ws_path.startswith("/") or any(c in self.ws_path for c in " ?#"):
            raise ConfigError(f"ws_path must be a path like /ws, got {self.ws_path!r}")
        self.allowed_origins()
        self.trusted_proxies()
        self.gc_threshold_values()
        self._validate_tls()
        return self

    def ws_bind_port(self) -> int:
        """The WebSocket port to bind (-1: none). The default follows the
        client port, so that nodes on other ports, or on free ones (tests,
        benchmarks), never collide on it."""
        if self.ws_port == WS_PORT_AUTO:
            return self.port + 2 if self.port else 0
        return self.ws_port

    def allowed_origins(self) -> frozenset | None:
        """``ws_origins`` as lower-case origins, or None for any ('*')."""
        parts = [p.strip().rstrip("/").lower() for p in self.ws_origins.split(",") if p.strip()]
        if "*" in parts:
            return None
        for part in parts:
            scheme, sep, rest = part.partition("://")
            if not sep or scheme not in ("http", "https") or not rest or "/" in rest:
                raise ConfigError(f"ws_origins: {part!r} is not an origin "
                                  "(write https://live.example.com or http://127.0.0.1:8000)")
        return frozenset(parts)

    @property
    def tls_enabled(self) -> bool:
        return self.tls_port >= 0 or self.wss_port >= 0

    def _validate_tls(self) -> None:
        if self.tls_mode not in ("auto", "core"):
            raise ConfigError(f"tls_mode must be 'auto' or 'core', got {self.tls_mode!r}")
        if not self.tls_enabled:
            return
        for name in ("tls_cert", "tls_key"):
            path = getattr(self, name)
            if not path:
                raise ConfigError(f"tls_port/wss_port need {name} (a PEM file; `fanout cert` "
                                  "makes a development one)")
            if not os.path.isfile(path):
                raise ConfigError(f"{name} {path!r} is not a readable file")

    def weak_credentials(self) -> list[str]:
        """Names of the configured secrets shorter than :data:`MIN_SECRET_BYTES`."""
        return [name for name, value in (("secret", self.secret), ("api_key", self.api_key))
                if value and value != DEV_SECRET
                and len(value.encode("utf-8", "surrogateescape")) < MIN_SECRET_BYTES]

    def key_file_path(self, admin_port: int) -> str:
        """Where this node writes a generated API key, for the bound ``admin_port``."""
        return self.api_key_file or default_key_file(admin_port)

    def trusted_proxies(self) -> tuple:
        """``proxy_protocol_from`` as ``ipaddress`` networks."""
        nets = []
        for part in self.proxy_protocol_from.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                nets.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise ConfigError(f"proxy_protocol_from: {part!r} is not a network "
                                  "(write 10.0.0.0/8 or 2001:db8::/32)") from None
        return tuple(nets)

    def gc_threshold_values(self) -> tuple[int, int, int]:
        """``gc_thresholds`` as the three integers of ``gc.set_threshold``."""
        parts = self.gc_thresholds.split(",")
        try:
            values = tuple(int(p) for p in parts)
        except ValueError:
            values = ()
        if len(values) != 3 or min(values) < 0:
            raise ConfigError(f"gc_thresholds must be three integers >= 0 like '700,10,100', "
                              f"got {self.gc_thresholds!r}")
        return values

    @property
    def uses_dev_secret(self) -> bool:
        return self.secret == DEV_SECRET

    def updated(self, values: Mapping[str, Any], source: str) -> "NodeConfig":
        """A copy with ``values`` (strings are converted) applied."""
        known = {f.name: f for f in fields(self)}
        changes = {}
        for key, raw in values.items():
            f = known.get(key)
            if f is None:
                raise ConfigError(f"{source}: unknown setting {key!r}")
            changes[key] = _convert(f, raw, source)
        return dataclasses.replace(self, **changes)


def _convert(f: dataclasses.Field, raw: Any, source: str) -> Any:
    kind = type(f.default)
    if isinstance(raw, kind) and not (kind is int and isinstance(raw, bool)):
        return raw
    try:
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        return str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {f.name} must be {kind.__name__}, got {raw!r}") from None


def load(path: str | None = None, env: Mapping[str, str] | None = None,
         overrides: Mapping[str, Any] | None = None) -> NodeConfig:
    """Defaults <- TOML file at ``path`` <- environment <- ``overrides``."""
    config = NodeConfig()
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        config = config.updated(data.get("node", data), path)
    env = os.environ if env is None else env
    names = {f.name for f in fields(NodeConfig)}
    from_env = {k[len(ENV_PREFIX):].lower(): v for k, v in env.items()
                if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX):].lower() in names}
    config = config.updated(from_env, "environment")
    if overrides:
        config = config.updated({k: v for k, v in overrides.items() if v is not None},
                                "command line")
    return config.validate()
