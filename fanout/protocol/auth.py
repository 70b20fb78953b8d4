"""Client authentication: HS256 JWTs carrying the user and the rooms they may join.

Claims (docs/protocol.md, "Tokens"), all checked strictly: a claim of the
wrong type is ``AUTH_INVALID``, never a guess.

* ``sub``: the user id, a non-empty string of at most :data:`MAX_SUB_BYTES`
  UTF-8 bytes (kept per connection);
* ``exp``: expiry, integer unix seconds (required);
* ``rooms``: ``"*"`` for every room, or a list of at most
  :data:`MAX_TOKEN_ROOMS` room names. Missing: no room at all;
* ``iat``, ``nbf``: integer unix seconds, optional. ``iat`` is what a
  revocation ("tokens issued before T") compares with;
* ``iss``, ``aud``: checked only when the verifier is given an issuer or an
  audience.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt

from . import fanout_pb2 as pb
from . import hs256
from .errors import ReasonError

#: Used when no secret is configured, so the quick start works out of the box.
#: The node accepts it only on a loopback address, and warns whenever it runs with it.
DEV_SECRET = "fanout-development-secret-do-not-use-in-production"

ALGORITHM = "HS256"

#: Longest user id (``sub``), in UTF-8 bytes.
MAX_SUB_BYTES = 128
#: Most room names a ``rooms`` list may hold.
MAX_TOKEN_ROOMS = 100
#: Longest room name, UTF-8 bytes: the same rule as ``fanout.logic.base.MAX_ROOM_NAME``
#: (the protocol layer does not import the logic).
MAX_ROOM_NAME_BYTES = 128
#: Times beyond this (about the year 36800) are not times: they overflow the
#: wire's millisecond fields and every clock.
_MAX_TIME = 1 << 40


class AuthError(ReasonError):
    """A token was refused; ``reason`` is the wire Reason code."""


@dataclass(frozen=True, slots=True)
class Claims:
    user: str
    expires_at: int                 # unix seconds
    rooms: frozenset[str] | None    # None: every room ("*")
    issued_at: int | None = None    # unix seconds; None: the token has no iat

    def may_join(self, room: str) -> bool:
        return self.rooms is None or room in self.rooms


def _invalid(message: str) -> AuthError:
    return AuthError(pb.AUTH_INVALID, message)


def _time_claim(data: dict, name: str, *, required: bool = False) -> int | None:
    value = data.get(name)
    if value is None:
        if required or name in data:
            raise _invalid(f"token has no '{name}'" if name not in data
                           else f"token '{name}' must be an integer")
        return None
    # bool is an int in Python, and JSON true would read as 1: refuse it.
    if type(value) is not int:
        raise _invalid(f"token '{name}' must be an integer (unix seconds)")
    if not 0 <= value < _MAX_TIME:
        raise _invalid(f"token '{name}' is out of range")
    return value


def _utf8_len(text: str, what: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:         # JSON allows lone surrogates ("\ud800")
        raise _invalid(f"token '{what}' is not valid Unicode") from None


def _rooms(data: dict) -> frozenset[str] | None:
    if "rooms" not in data:
        return frozenset()                       # fails closed: no room
    rooms = data["rooms"]
    if rooms == "*":
        return None
    if not isinstance(rooms, list):
        raise _invalid("token 'rooms' must be '*' or a list of room names")
    if len(rooms) > MAX_TOKEN_ROOMS:
        raise _invalid(f"token 'rooms' lists more than {MAX_TOKEN_ROOMS} rooms")
    for room in rooms:
        if not isinstance(room, str) or not 0 < _utf8_len(room, "rooms") <= MAX_ROOM_NAME_BYTES:
            raise _invalid(f"token 'rooms' holds a name that is not 1-{MAX_ROOM_NAME_BYTES} "
                           "bytes of text")
    return frozenset(rooms)


def verify(token: str, secret: str, *, issuer: str = "", audience: str = "",
           max_lifetime: float | None = None, leeway: float = 0.0,
           now: float | None = None) -> Claims:
    """Check ``token``'s signature and claims and return them.

    :param issuer, audience: when non-empty, the token's ``iss`` must equal
        ``issuer`` and its ``aud`` must be ``audience`` or a list holding it.
    :param max_lifetime: when set, refuse a token whose ``exp`` is more than
        this many seconds after its ``iat``, or after ``now``.
    :param leeway: seconds of clock skew allowed on ``exp`` and ``nbf``.
    :raises AuthError: AUTH_MISSING, AUTH_EXPIRED or AUTH_INVALID, with a
        one-line message (never another exception, whatever the token holds).
    """
    if not token:
        raise AuthError(pb.AUTH_MISSING, "hello carries no token")
    try:
        # The header, the algorithm and the signature, by PyJWT's rules
        # (hs256.py); the claims are checked below, strictly and without
        # PyJWT's type coercions.
        data = hs256.decode(token, secret)
    except hs256.SignatureError:
        raise _invalid("token signature does not verify") from None
    except hs256.TokenError as exc:
        raise _invalid(f"invalid token: {exc}") from None
    return _claims(data, issuer=issuer, audience=audience, max_lifetime=max_lifetime,
                   leeway=leeway, now=time.time() if now is None else now)


def _claims(data: dict, *, issuer: str, audience: str, max_lifetime: float | None,
            leeway: float, now: float) -> Claims:
    user = data.get("sub")
    if not isinstance(user, str) or not user:
        raise _invalid("token 'sub' must be a non-empty string")
    if _utf8_len(user, "sub") > MAX_SUB_BYTES:
        raise _invalid(f"token 'sub' is longer than {MAX_SUB_BYTES} bytes")
    exp = _time_claim(data, "exp", required=True)
    iat = _time_claim(data, "iat")
    nbf = _time_claim(data, "nbf")
    if issuer and data.get("iss") != issuer:
        raise _invalid("token 'iss' is not this node's issuer")
    if audience:
        aud = data.get("aud")
        if not (aud == audience or isinstance(aud, list) and audience in aud):
            raise _invalid("token 'aud' does not name this node's audience")
    rooms = _rooms(data)
    if exp <= now - leeway:
        raise AuthError(pb.AUTH_EXPIRED, "token has expired")
    if nbf is not None and nbf > now + leeway:
        raise _invalid("token is not valid yet ('nbf')")
    if max_lifetime is not None and exp - min(now, iat if iat is not None else now) > max_lifetime:
        raise _invalid(f"token lives longer than this node accepts ({max_lifetime:g} s)")
    return Claims(user=user, expires_at=exp, rooms=rooms, issued_at=iat)


def mint(secret: str, user: str, *, rooms: list[str] | str = "*", ttl: float = 3600.0,
         issued_at: int | None = None, **extra) -> str:
    """Issue a token (for development and tests; production tokens come from
    the platform's own auth service with the same claims).

    It always carries ``iat`` (so a revocation can tell it from a newer
    token) and ``rooms``: ``"*"``, or the list given. ``extra`` adds claims
    (``iss``, ``aud``).
    """
    if not user:
        raise ValueError("user must be non-empty")
    now = int(time.time()) if issued_at is None else issued_at
    claims = {"sub": user, "iat": now, "exp": now + int(ttl),
              "rooms": rooms if rooms == "*" else list(rooms), **extra}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)
