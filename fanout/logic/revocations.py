"""Token revocation: "every token of this user issued before T is refused".

One entry per user, the latest T. A token is covered when its ``iat`` is
before T, or when it has no ``iat`` (it cannot show it is newer).

Entries are kept ``ttl`` seconds after their T, where ``ttl`` is the
longest token lifetime the node accepts (``max_token_lifetime_s``): every
token with an ``iat`` before T has expired by then, so the entry has nothing
left to refuse. (A token without ``iat`` is refused only while the entry
lives; mint tokens with ``iat`` to make them revocable for their whole life.)
Memory is therefore one small entry per user revoked within the last ttl.
"""

from __future__ import annotations

import time
from typing import Callable


def covers(before: float, issued_at: int | None) -> bool:
    """Whether a revocation of tokens issued before ``before`` covers a token
    issued at ``issued_at`` (None: the token has no ``iat``)."""
    return issued_at is None or issued_at < before


class Revocations:
    """:param ttl: seconds an entry is kept after its ``before``.
    :param clock: wall-clock seconds (``iat`` and ``before`` are unix times).
    """

    def __init__(self, ttl: float, clock: Callable[[], float] = time.time) -> None:
        self.ttl = ttl
        self._clock = clock
        self._before: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._before)

    def revoke(self, user: str, before: float) -> None:
        """Refuse ``user``'s tokens issued before ``before``; an earlier
        revocation of the user is widened, never narrowed."""
        if before + self.ttl <= self._clock():
            return                      # every token it covers has expired already
        if before > self._before.get(user, float("-inf")):
            self._before[user] = before

    def before(self, user: str) -> float | None:
        """The user's revocation time, or None."""
        return self._before.get(user)

    def revoked(self, user: str, issued_at: int | None) -> bool:
        before = self._before.get(user)
        if before is None:
            return False
        if before + self.ttl <= self._clock():
            del self._before[user]
            return False
        return covers(before, issued_at)

    def sweep(self) -> None:
        """Forget entries older than ``ttl``."""
        horizon = self._clock() - self.ttl
        for user in [u for u, before in self._before.items() if before <= horizon]:
            del self._before[user]
