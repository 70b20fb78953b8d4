"""Node configuration: defaults, then a TOML file, then FANOUT_* environment
variables, then command-line flags (later wins).

Every field of :class:`NodeConfig` is settable all three ways: field
``max_delay_ms`` is ``max_delay_ms = 20`` in TOML (top level or under
``[node]``), ``FANOUT_MAX_DELAY_MS=20`` in the environment and
``--max-delay-ms 20`` on the command line.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from typing import Any, Mapping

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from ..protocol.auth import DEV_SECRET

ENV_PREFIX = "FANOUT_"


class ConfigError(ValueError):
    pass


def _field(default, doc, *, minimum=None):
    return dataclasses.field(default=default, metadata={"doc": doc, "min": minimum})


@dataclass
class NodeConfig:
    host: str = _field("127.0.0.1", "address the client port binds to")
    port: int = _field(7000, "client port (0: any free port)", minimum=0)
    secret: str = _field(DEV_SECRET, "HS256 secret that signs client tokens")
    admin_host: str = _field("127.0.0.1", "address the admin HTTP API binds to (keep it private)")
    admin_port: int = _field(7001, "admin HTTP API port (0: any free port, -1: no admin API)", minimum=-1)
    api_key: str = _field("", "key for the admin API ('': generate one per run and log it)")
    loop: str = _field("uvloop", "event loop: uvloop or asyncio")
    log_level: str = _field("INFO", "DEBUG, INFO, WARNING or ERROR")
    # connections
    ping_interval_ms: int = _field(20_000, "how often clients should ping", minimum=100)
    idle_timeout_ms: int = _field(45_000, "close a connection silent this long", minimum=200)
    auth_timeout_ms: int = _field(5_000, "close a connection without Hello after this", minimum=100)
    close_grace_ms: int = _field(2_000, "time a closing connection gets to take its last frame", minimum=0)
    max_frame: int = _field(65_536, "largest client frame body, before and after lz4", minimum=64)
    max_hello_bytes: int = _field(8192, "largest frame before authentication (a Hello is small)", minimum=64)
    request_rate: float = _field(20.0, "client frames per second per connection, every type (past the burst: closed, TOO_MANY_REQUESTS)", minimum=0.1)
    request_burst: float = _field(100.0, "burst of client frames per connection", minimum=1)
    max_rooms_per_conn: int = _field(16, "rooms one connection may join", minimum=1)
    max_backlog_bytes: int = _field(1 << 20, "unsent bytes after which a client is cut as slow", minimum=1024)
    max_backlog_frames: int = _field(1024, "unsent frames after which a client is cut as slow", minimum=2)
    max_connections: int = _field(19_000, "connections this node holds at most", minimum=1)
    conn_rate_per_ip: float = _field(500.0, "new connections per second per client address", minimum=0)
    conn_burst_per_ip: float = _field(2000.0, "burst of new connections per client address", minimum=1)
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
    backlog_degraded_bytes: int = _field(256 << 20, "write backlog across connections that makes the node degrade", minimum=1)
    max_batch_bytes: int = _field(65_536, "flush a room's batch when it reaches this", minimum=256)
    compress_min: int = _field(256, "smallest batch worth lz4 (0: never compress)", minimum=0)
    compress_level: int = _field(4, "lz4 level: 0 fast mode, 1-12 high compression", minimum=0)
    ring_size: int = _field(1024, "messages per room kept for resume", minimum=1)
    ring_bytes: int = _field(1 << 20, "bytes per room kept for resume", minimum=1024)
    room_idle_ttl_s: float = _field(300.0, "forget an empty, silent room's history after this", minimum=0)

    def validate(self) -> "NodeConfig":
        for f in fields(self):
            minimum = f.metadata.get("min")
            value = getattr(self, f.name)
            if minimum is not None and value < minimum:
                raise ConfigError(f"{f.name} must be >= {minimum}, got {value!r}")
        if self.compress_level > 12:
            raise ConfigError(f"compress_level must be 0-12, got {self.compress_level}")
        if self.loop not in ("uvloop", "asyncio"):
            raise ConfigError(f"loop must be 'uvloop' or 'asyncio', got {self.loop!r}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"unknown log_level {self.log_level!r}")
        if self.idle_timeout_ms <= self.ping_interval_ms:
            raise ConfigError("idle_timeout_ms must be longer than ping_interval_ms")
        if self.lag_overloaded_ms <= self.lag_degraded_ms:
            raise ConfigError("lag_overloaded_ms must be above lag_degraded_ms")
        if not self.secret:
            raise ConfigError("secret must not be empty")
        return self

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
