"""Who holds the client port's connection slots: how many each source
address holds, and the unauthenticated connections in arrival order with
their handshake deadlines.

Pure bookkeeping, O(1) per event; the listener decides what to do with a
full budget or a passed deadline.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from typing import Hashable


def address_key(host: str) -> str:
    """The unit per-address limits count by: an IPv4 address, or an IPv6
    /64 (one subscriber's prefix; counting single IPv6 addresses would let
    one host use 2**64 of them)."""
    if ":" not in host:
        return host
    if host.startswith("::ffff:") and "." in host:
        return host[7:]                        # IPv4-mapped: the IPv4 client
    try:
        return ipaddress.IPv6Address(host.partition("%")[0]).packed[:8].hex() + "::/64"
    except ValueError:
        return host


class Slots:
    """:param max_per_address: connections one address may hold at once.
    :param max_unauthenticated: connections without a Hello, in total.
    :param max_unauthenticated_per_address: the same, per address.
    """

    __slots__ = ("max_per_address", "max_unauthenticated", "max_unauthenticated_per_address",
                 "_held", "_unauth", "_unauth_held")

    def __init__(self, *, max_per_address: int, max_unauthenticated: int,
                 max_unauthenticated_per_address: int) -> None:
        self.max_per_address = max_per_address
        self.max_unauthenticated = max_unauthenticated
        self.max_unauthenticated_per_address = max_unauthenticated_per_address
        self._held: dict[str, int] = {}                     # address -> connections
        self._unauth_held: dict[str, int] = {}              # address -> unauthenticated
        # owner -> (address, deadline); arrival order is deadline order, so
        # the oldest and the next to expire are both at the front.
        self._unauth: OrderedDict[Hashable, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._unauth)

    @property
    def addresses(self) -> int:
        """Addresses holding at least one connection."""
        return len(self._held)

    def held(self, key: str) -> int:
        return self._held.get(key, 0)

    def unauthenticated_held(self, key: str) -> int:
        return self._unauth_held.get(key, 0)

    def over_address_limit(self, key: str) -> bool:
        return (self._held.get(key, 0) >= self.max_per_address
                or self._unauth_held.get(key, 0) >= self.max_unauthenticated_per_address)

    @property
    def unauthenticated_full(self) -> bool:
        return len(self._unauth) >= self.max_unauthenticated

    def add(self, owner: Hashable, key: str, deadline: float) -> None:
        """A new connection from ``key``, unauthenticated until ``deadline``."""
        held = self._held
        held[key] = held.get(key, 0) + 1
        unauth_held = self._unauth_held
        unauth_held[key] = unauth_held.get(key, 0) + 1
        self._unauth[owner] = (key, deadline)

    def authenticated(self, owner: Hashable) -> None:
        """``owner`` sent a valid Hello; idempotent."""
        entry = self._unauth.pop(owner, None)
        if entry is not None:
            self._drop_unauth(entry[0])

    def release(self, owner: Hashable, key: str) -> None:
        """``owner``'s connection is gone (every path: once per :meth:`add`)."""
        entry = self._unauth.pop(owner, None)
        if entry is not None:
            self._drop_unauth(entry[0])
        _decrement(self._held, key)

    def pop_oldest(self) -> Hashable | None:
        """Take the oldest unauthenticated connection off the budget."""
        if not self._unauth:
            return None
        owner, (key, _) = self._unauth.popitem(last=False)
        self._drop_unauth(key)
        return owner

    def next_deadline(self) -> float | None:
        if not self._unauth:
            return None
        return self._unauth[next(iter(self._unauth))][1]

    def pop_expired(self, now: float) -> list:
        """Take every connection whose deadline has passed off the budget."""
        out = []
        unauth = self._unauth
        while unauth:
            owner = next(iter(unauth))
            key, deadline = unauth[owner]
            if deadline > now:
                break
            del unauth[owner]
            self._drop_unauth(key)
            out.append(owner)
        return out

    def _drop_unauth(self, key: str) -> None:
        _decrement(self._unauth_held, key)


def _decrement(counts: dict[str, int], key: str) -> None:
    # Counts of zero are removed: the dicts hold only addresses with connections.
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
