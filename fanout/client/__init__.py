"""The asyncio client SDK: connect, authenticate, join, read, chat, and
resume across reconnects with explicit gaps."""

from .sdk import (REQUEST_TIMEOUT, AuthError, Client, ClientError, ConnectionLostError,
                  Event, KickedError, RequestError, TokenRefresher)

__all__ = ["Client", "ClientError", "AuthError", "RequestError", "KickedError",
           "ConnectionLostError", "Event", "TokenRefresher", "REQUEST_TIMEOUT"]
