"""Adaptive heartbeat: the longest ping interval a network tolerates.

A carrier's NAT forgets a silent TCP mapping after anything from 30 s to
30 min, and then drops the connection's packets without a word. Pinging at
the shortest interval any network tolerates keeps every phone's radio
awake far more than most networks need; pinging too rarely loses the
connection silently. The tuner searches, per network, for the longest
interval that survives (the rules are docs/protocol.md, section 5.6,
"Client guidance"):

1. **Start safe**: an unknown network starts at ``start_ms`` (the SDK's
   ``heartbeat_start``, 20 s by default: the node's default interval),
   within the node's bounds.
2. **Probe**: a Ping sent after a full interval of silence in both
   directions (80% of it will do: the last Pong's round trip eats into
   it) is a probe; its Pong is a success. Pings sent while data
   flows say nothing about the NAT and are not counted.
3. **Step up**: after ``step_after`` successful probes in a row the
   interval grows by ``step_factor``, up to the node's maximum and to the
   connection's grant. While searching, the Hello asks for the next step
   (the current interval times ``step_factor``) and the client pings at its
   current interval, more often than granted: one step needs no reconnect,
   and the node's idle timeout follows what the client may do next rather
   than the node's maximum (with the defaults, a searching client's dead
   connection is cut after 2.25 x 1.5 = 3.4 current intervals, not the 675 s
   of a 300 s maximum). A step past the grant waits for the next connection,
   whose Hello asks for it: a connection climbs one step. Once locked, the
   Hello asks for the interval itself.
4. **Back off and lock**: a dead link (a Ping unanswered, or nothing
   received for the idle timeout; not a reset, not a Kick) steps back to the
   last interval that succeeded and locks: no more stepping up on this
   network. A dead link while locked steps back once more (to the node's
   minimum at most).
5. **Remember**: the state is kept per network key in a
   :class:`HeartbeatStore`, in memory and optionally in a small JSON file.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

__all__ = ["HeartbeatStore", "HeartbeatTuner", "DEFAULT_STORE"]

log = logging.getLogger(__name__)

_UINT32_MAX = 0xFFFFFFFF


class HeartbeatStore:
    """What the tuners learnt, per network key: ``{"interval_ms", "good_ms",
    "locked"}``. In memory; with ``path``, loaded from and saved to a JSON
    file (written whole, through a temporary file, on every change: a change
    is at most one per probe, minutes apart on a real network)."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self._networks: dict[str, dict] = {}
        if path is not None and os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
                if isinstance(data, dict):
                    self._networks = {k: v for k, v in data.items() if isinstance(v, dict)}
            except (OSError, ValueError) as exc:
                # A lost file costs a new search, not the connection.
                log.warning("heartbeat store %s unreadable (%s); starting afresh", path, exc)

    def get(self, network: str) -> dict | None:
        state = self._networks.get(network)
        return dict(state) if state is not None else None

    def put(self, network: str, state: dict) -> None:
        self._networks[network] = dict(state)
        if self.path is None:
            return
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            fd, tmp = tempfile.mkstemp(prefix=".heartbeat-", dir=directory)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self._networks, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot save heartbeat store %s: %s", self.path, exc)


#: The store clients share when they are given none: in memory, per process.
DEFAULT_STORE = HeartbeatStore()


class HeartbeatTuner:
    """The search of one network (rules in the module docstring).

    :param store: where the state of ``network`` is kept.
    :param network: the key the application gives for the network it is
        on (``"wifi:home"``, ``"cell:46001"``); ``""`` is a network too.
    :param step_after: successful probes in a row before stepping up.
    :param step_factor: how much a step multiplies the interval by (> 1).
    :param start_ms: the safe interval an unknown network starts at.
    """

    def __init__(self, store: HeartbeatStore, network: str = "", *, step_after: int = 3,
                 step_factor: float = 1.5, start_ms: int = 20_000) -> None:
        if step_after < 1 or step_factor <= 1:
            raise ValueError("need step_after >= 1 and step_factor > 1")
        self.store = store
        self.network = network
        self.step_after = step_after
        self.step_factor = step_factor
        self.start_ms = start_ms
        state = store.get(network) or {}
        #: Current interval in ms; 0 until the first AuthOk (the node's default).
        self.interval_ms = int(state.get("interval_ms", 0))
        #: The longest interval with a successful probe (0: none yet).
        self.good_ms = int(state.get("good_ms", 0))
        self.locked = bool(state.get("locked", False))
        self.successes = 0                      # probes in a row at interval_ms
        self._min_ms = 0
        self._max_ms = 0

    def request_ms(self) -> int:
        """What the next Hello asks for: the interval found, once locked;
        while searching, the next step from the current interval (from
        ``start_ms`` on a new network), within the node's maximum once known
        (the node clamps a request to its bounds anyway)."""
        if self.locked and self.interval_ms:
            return self.interval_ms
        return min(self._step(self.interval_ms or self.start_ms), _UINT32_MAX)

    def granted(self, interval_ms: int, min_ms: int, max_ms: int) -> float:
        """Take a connection's AuthOk; returns the seconds to ping at (the
        current interval, never above the grant)."""
        self._min_ms, self._max_ms = min_ms, max_ms
        if not self.interval_ms:
            self.interval_ms = self.start_ms
            if min_ms and max_ms:
                self.interval_ms = min(max(self.interval_ms, min_ms), max_ms)
            self._save()
        elif min_ms and max_ms and not min_ms <= self.interval_ms <= max_ms:
            self.interval_ms = min(max(self.interval_ms, min_ms), max_ms)
            self._save()
        self.successes = 0
        return min(self.interval_ms, interval_ms) / 1000

    def probe_answered(self, interval_ms: int, grant_ms: int) -> float:
        """A probe at ``interval_ms`` was answered; returns the (maybe
        longer) seconds to ping at from now on, within ``grant_ms``."""
        self.good_ms = max(self.good_ms, interval_ms)
        if self.locked or interval_ms < self.interval_ms:
            self._save()
            return min(self.interval_ms, grant_ms) / 1000
        self.successes += 1
        if self.successes >= self.step_after:
            # Never past this connection's grant: the node would cut a
            # client pinging more rarely. The next Hello asks for the step.
            stepped = min(self._step(self.interval_ms), grant_ms)
            if stepped > self.interval_ms:
                log.debug("heartbeat %r: %d ms held %d times; trying %d ms", self.network,
                          self.interval_ms, self.successes, stepped)
                self.interval_ms = stepped
            self.successes = 0
        self._save()
        return min(self.interval_ms, grant_ms) / 1000

    def dead_link(self) -> None:
        """A dead link was detected: back off and lock."""
        if not self.locked and self.good_ms and self.good_ms < self.interval_ms:
            backed = self.good_ms
        else:
            backed = int(self.interval_ms / self.step_factor)
        if self._min_ms:
            backed = max(backed, self._min_ms)
        log.info("heartbeat %r: dead link at %d ms; %d ms from now on (locked)", self.network,
                 self.interval_ms, backed)
        self.interval_ms = max(1, backed)
        self.good_ms = min(self.good_ms, self.interval_ms)
        self.locked = True
        self.successes = 0
        self._save()

    def _step(self, interval_ms: int) -> int:
        stepped = int(interval_ms * self.step_factor)
        return min(stepped, self._max_ms) if self._max_ms else stepped

    def _save(self) -> None:
        self.store.put(self.network, {"interval_ms": self.interval_ms, "good_ms": self.good_ms,
                                      "locked": self.locked})
