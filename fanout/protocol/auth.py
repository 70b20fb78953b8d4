"""Client authentication: HS256 JWTs carrying the user and the rooms they may join.

Claims:

* ``sub``: the user id (required, non-empty string);
* ``exp``: expiry, unix seconds (required);
* ``rooms``: ``"*"`` for any room, or a list of room names (default ``"*"``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt

from . import fanout_pb2 as pb
from .errors import ReasonError

#: Used when no secret is configured, so the quick start works out of the box.
#: The node logs a warning whenever it runs with it.
DEV_SECRET = "fanout-development-secret-do-not-use-in-production"

ALGORITHM = "HS256"


class AuthError(ReasonError):
    """A token was refused; ``reason`` is the wire Reason code."""


@dataclass(frozen=True, slots=True)
class Claims:
    user: str
    expires_at: float
    rooms: frozenset[str] | None  # None: every room

    def may_join(self, room: str) -> bool:
        return self.rooms is None or room in self.rooms


def verify(token: str, secret: str, *, leeway: float = 0.0) -> Claims:
    """Check ``token``'s signature and expiry and return its claims.

    :raises AuthError: AUTH_MISSING, AUTH_EXPIRED or AUTH_INVALID.
    """
    if not token:
        raise AuthError(pb.AUTH_MISSING, "hello carries no token")
    try:
        data = jwt.decode(token, secret, algorithms=[ALGORITHM], leeway=leeway,
                          options={"require": ["sub", "exp"]})
    except jwt.ExpiredSignatureError:
        raise AuthError(pb.AUTH_EXPIRED, "token has expired") from None
    except jwt.InvalidSignatureError:
        raise AuthError(pb.AUTH_INVALID, "token signature does not verify") from None
    except jwt.InvalidTokenError as exc:
        raise AuthError(pb.AUTH_INVALID, f"invalid token: {exc}") from None
    user = data["sub"]
    if not isinstance(user, str) or not user:
        raise AuthError(pb.AUTH_INVALID, "token 'sub' must be a non-empty string")
    rooms = data.get("rooms", "*")
    if rooms == "*":
        allowed = None
    elif isinstance(rooms, list) and all(isinstance(r, str) for r in rooms):
        allowed = frozenset(rooms)
    else:
        raise AuthError(pb.AUTH_INVALID, "token 'rooms' must be '*' or a list of names")
    return Claims(user=user, expires_at=float(data["exp"]), rooms=allowed)


def mint(secret: str, user: str, *, rooms: list[str] | str = "*", ttl: float = 3600.0) -> str:
    """Issue a token (for development and tests; production tokens come from
    the platform's own auth service with the same claims)."""
    if not user:
        raise ValueError("user must be non-empty")
    now = int(time.time())
    claims = {"sub": user, "iat": now, "exp": now + int(ttl),
              "rooms": rooms if rooms == "*" else list(rooms)}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)
