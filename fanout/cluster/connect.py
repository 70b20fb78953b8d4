"""Connecting to NATS and provisioning what the cluster keeps in JetStream:
the history stream, the event log and the KV buckets (docs/cluster.md).

Every process (node, router, ``fanout events``) provisions on start with the
same settings; doing it twice is harmless, so no process has to start first.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable

import nats
from nats.js import api
from nats.errors import NoRespondersError, TimeoutError as NatsTimeoutError
from nats.js.errors import APIError, BadRequestError, ServiceUnavailableError

from . import subjects as S

log = logging.getLogger("fanout.cluster")


@dataclass(frozen=True)
class ClusterSettings:
    """What the cluster's streams keep; the same for every process."""
    #: Messages of history JetStream keeps per room (resume from any node
    #: reaches this far back; then an explicit Gap).
    history_per_room: int = 1024
    #: Seconds a room's history is kept; when a room's last message ages
    #: out, the room starts a new epoch.
    history_max_age_s: float = 86_400.0
    #: Seconds the event log keeps events.
    events_max_age_s: float = 7 * 86_400.0
    #: Replicas of every stream and bucket (3 on a three-server cluster).
    replicas: int = 1
    #: Seconds a router's partition lease lives without renewal: how long a
    #: dead router's rooms wait before another router takes them.
    lease_ttl_s: float = 3.0
    #: Seconds within which JetStream drops a second copy of one (room,
    #: epoch, seq): a router that lost its lease cannot overwrite a seq.
    duplicate_window_s: float = 120.0
    #: Seconds a revocation is kept: the longest token lifetime, after which
    #: every token it covers has expired (``max_token_lifetime_s``).
    revocation_ttl_s: float = 86_400.0


def _drop_unsent(nc: nats.NATS) -> None:
    """Forget what the client queued but had not yet handed to the lost
    connection. nats-py would send it on the next connection, after what
    the lost one dropped in flight: a router's append of seq n+1 stored
    while n was lost is a hole. (No public API does this; the attributes
    are nats-py's outbound buffer.)"""
    nc._pending.clear()
    nc._pending_data_size = 0


async def connect(servers: str | list[str], name: str, *,
                  on_state: Callable[[bool], Awaitable[None] | None] | None = None,
                  connect_timeout: float = 2.0, buffer_offline: bool = True) -> nats.NATS:
    """A NATS connection that reconnects forever. ``on_state(connected)`` is
    told when the connection is lost and when it is back.

    :param buffer_offline: False for a router: nothing is kept to be sent
        later. Publishes and requests while disconnected fail at once, and
        whatever was queued when the connection broke is dropped, so what
        NATS got of the old connection is a prefix of what was sent and no
        message reaches JetStream after its sender gave up on it.
    """
    if isinstance(servers, str):
        servers = [s.strip() for s in servers.split(",") if s.strip()]

    async def disconnected():
        if not buffer_offline:
            _drop_unsent(nc)
        if nc.is_closed or nc.is_draining:
            return                        # closing on purpose, not a loss
        log.warning("%s: lost the NATS connection; reconnecting", name)
        if on_state is not None:
            result = on_state(False)
            if asyncio.iscoroutine(result):
                await result

    async def reconnected():
        log.warning("%s: NATS connection back (%s)", name, nc.connected_url.netloc
                    if nc.connected_url else "?")
        if on_state is not None:
            result = on_state(True)
            if asyncio.iscoroutine(result):
                await result

    async def error(exc):
        log.debug("%s: NATS client error: %r", name, exc)

    nc = await nats.connect(
        servers=servers, name=name, connect_timeout=connect_timeout,
        allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.25,
        ping_interval=5, max_outstanding_pings=2,
        # nats-py buffers while reconnecting unless the buffer size is 0.
        **({} if buffer_offline else {"pending_size": 0}),
        disconnected_cb=disconnected, reconnected_cb=reconnected, error_cb=error)
    return nc


#: JetStream's "stream name already in use with a different configuration".
STREAM_NAME_IN_USE = 10058


async def _ensure_stream(js, config: api.StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except BadRequestError as exc:
        if exc.err_code != STREAM_NAME_IN_USE:
            raise
        # Exists with another configuration (settings changed): update it.
        await js.update_stream(config)


#: Seconds provisioning keeps retrying while JetStream is not ready yet.
PROVISION_PATIENCE = 20.0


async def _patiently(step: Callable[[], Awaitable[None]], what: str) -> None:
    """Run ``step`` until JetStream answers: creating a replicated stream on
    a cluster that just started takes longer than one request's timeout, or
    finds no JetStream leader yet. Every step is idempotent."""
    deadline = asyncio.get_running_loop().time() + PROVISION_PATIENCE
    while True:
        try:
            return await step()
        except (NatsTimeoutError, NoRespondersError, ServiceUnavailableError, APIError) as exc:
            # A cluster that just formed answers some requests with errors
            # (no meta leader yet, a stream half made): every step is
            # idempotent, so try again until the patience runs out.
            if asyncio.get_running_loop().time() > deadline:
                raise
            log.info("provisioning %s: JetStream not ready (%r); retrying", what, exc)
            await asyncio.sleep(0.25)


async def provision(js, settings: ClusterSettings) -> None:
    """Create or update the history stream, the event log and the buckets."""
    await _patiently(lambda: _provision(js, settings), "the streams and buckets")


async def _provision(js, settings: ClusterSettings) -> None:
    await _ensure_stream(js, api.StreamConfig(
        name=S.HISTORY_STREAM, subjects=[S.HISTORY_ALL],
        description="fanout room history; republished to fanout.room.> once stored",
        storage=api.StorageType.FILE, num_replicas=settings.replicas,
        max_msgs_per_subject=settings.history_per_room,
        max_age=settings.history_max_age_s, discard=api.DiscardPolicy.OLD,
        duplicate_window=min(settings.duplicate_window_s, settings.history_max_age_s),
        allow_direct=True,
        republish=api.RePublish(src=S.HISTORY_ALL, dest=S.ROOM_ALL)))
    await _ensure_stream(js, api.StreamConfig(
        name=S.EVENT_STREAM, subjects=[S.EVENTS_ALL],
        description="fanout event log: connect, disconnect, kick, and every stored message",
        storage=api.StorageType.FILE, num_replicas=settings.replicas,
        max_age=settings.events_max_age_s, discard=api.DiscardPolicy.OLD,
        sources=[api.StreamSource(name=S.HISTORY_STREAM)]))
    for bucket, ttl in ((S.LEASE_BUCKET, settings.lease_ttl_s),
                        (S.LOGIN_BUCKET, None),
                        (S.REVOCATION_BUCKET, settings.revocation_ttl_s)):
        try:
            await js.create_key_value(bucket=bucket, ttl=ttl, history=1,
                                      replicas=settings.replicas,
                                      storage=api.StorageType.FILE)
        except BadRequestError as exc:
            if exc.err_code != STREAM_NAME_IN_USE:
                raise
            # Exists (maybe made with other settings: kept as it is).


async def close_quietly(nc) -> None:
    """Close a connection on the way out, whatever its state: drained when
    connected (what was published goes out), else closed; a connection
    that is reconnecting cannot drain and its transport may be gone."""
    if nc is None or nc.is_closed:
        return
    try:
        if nc.is_connected:
            await nc.drain()
            return
    except Exception:
        pass
    try:
        await nc.close()
    except Exception:
        log.debug("closing the NATS connection failed", exc_info=True)
