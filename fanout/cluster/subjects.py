"""Every NATS name the cluster uses, in one table (docs/cluster.md shows it).

Room names are arbitrary UTF-8, and NATS subject tokens may not hold ``.``,
``*``, ``>`` or whitespace, so a room appears in a subject as its *token*:
the base64url encoding of its UTF-8 bytes, without padding. A router owns
rooms and users by *partition*: a stable hash of the name, so every node
sends a room's requests to the same router.
"""

from __future__ import annotations

import base64
import zlib

#: Room messages as nodes receive them: republished by the history stream
#: once stored, so a node never sees a message JetStream did not keep.
ROOM = "fanout.room.{}"
#: Where a router appends a room's messages (the history stream's subjects).
HISTORY = "fanout.hist.{}"
HISTORY_ALL = "fanout.hist.>"
ROOM_ALL = "fanout.room.>"
#: Requests to the router owning a partition: fanout.rpc.<partition>.<op>.
RPC = "fanout.rpc.{}.{}"
#: Requests any router answers (a queue group): revocations.
RPC_ANY = "fanout.rpc.any.{}"
ROUTER_QUEUE = "fanout-routers"
#: Commands every node acts on (kick, disconnect, revoke).
CONTROL = "fanout.ctl"
#: Per-room member counts of each node.
PRESENCE = "fanout.presence.{}"
#: The admin API's scatter-gather questions to every node.
ADMIN_PRESENCE = "fanout.admin.presence"
#: A node's overload level, for the routers' chat budgets.
DEGRADATION = "fanout.degrade"
#: The event log: fanout.events.<kind> (connect, disconnect, kick).
EVENTS = "fanout.events.{}"
EVENTS_ALL = "fanout.events.>"

#: The JetStream stream holding every room's history (subjects HISTORY_ALL).
HISTORY_STREAM = "FANOUT_HISTORY"
#: The event log stream: EVENTS_ALL, plus every stored room message
#: (sourced from the history stream).
EVENT_STREAM = "FANOUT_EVENTS"
#: KV buckets: router partition leases, logins, revocations.
LEASE_BUCKET = "fanout_leases"
LOGIN_BUCKET = "fanout_logins"
REVOCATION_BUCKET = "fanout_revocations"

#: Message headers a router sets on every room message.
H_EPOCH = "Fanout-Epoch"
H_SEQ = "Fanout-Seq"
H_SAMPLED = "Fanout-Sampled"
#: Set by JetStream on a republished message: its stream sequence.
H_STREAM_SEQ = "Nats-Sequence"
H_MSG_ID = "Nats-Msg-Id"

#: Default number of partitions rooms and users are spread over.
PARTITIONS = 16


def token(name: str) -> str:
    """The subject token of a room or user name."""
    return base64.urlsafe_b64encode(name.encode("utf-8")).rstrip(b"=").decode("ascii")


def untoken(tok: str) -> str:
    """Inverse of :func:`token`."""
    return base64.urlsafe_b64decode(tok + "=" * (-len(tok) % 4)).decode("utf-8")


def partition(name: str, partitions: int = PARTITIONS) -> int:
    """Which router partition owns a room or user."""
    return zlib.crc32(name.encode("utf-8")) % partitions


def room_subject(room: str) -> str:
    return ROOM.format(token(room))


def history_subject(room: str) -> str:
    return HISTORY.format(token(room))


def room_of(subject: str) -> str:
    """The room of a ROOM or HISTORY subject."""
    return untoken(subject.rsplit(".", 1)[1])
