"""The asyncio client SDK: connect, authenticate, join, read, chat, and
resume across reconnects with explicit gaps; built for weak networks
(adaptive heartbeat, reconnect ladder, racing addresses)."""

from .sdk import (REQUEST_TIMEOUT, AuthError, Client, ClientError, ConnectionLostError,
                  Event, KickedError, RequestError, TokenRefresher)
from .heartbeat import HeartbeatStore, HeartbeatTuner

__all__ = ["Client", "ClientError", "AuthError", "RequestError", "KickedError",
           "ConnectionLostError", "Event", "TokenRefresher", "REQUEST_TIMEOUT",
           "HeartbeatStore", "HeartbeatTuner"]
