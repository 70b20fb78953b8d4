"""The demo's gift service: a viewer's gift goes to the room, and a receipt
to the viewer alone, through the user's channel (docs/protocol.md 5.10).

A platform's gift service would charge the viewer first; the demo only
shows the two messages that follow: the gift, published to the room with the
viewer as its sender, then a receipt pushed to every device of that viewer
(kind system), which the room never sees.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..protocol.errors import ReasonError
from ..protocol.channels import is_channel
from .bot import GIFTS

#: The gifts a viewer may send: the ones the page draws and the bot sends.
GIFT_NAMES = frozenset(name for name, _ in GIFTS)
MAX_COUNT = 99
#: The receipts' sender, as the page shows it.
SENDER = "gift-service"


class GiftError(ValueError):
    """The request names no valid gift; the message says what is wrong."""


@dataclass(frozen=True)
class Gift:
    room: str
    gift: str
    count: int


def parse(body: Any, default_room: str) -> Gift:
    """A gift request's body, ``{"gift": NAME, "count": N, "room": ROOM}``
    (``count`` 1 when absent, ``room`` the demo's)."""
    if not isinstance(body, dict):
        raise GiftError("the body must be a JSON object: {\"gift\": NAME, \"count\": N}")
    unknown = sorted(set(body) - {"gift", "count", "room"})
    if unknown:
        raise GiftError(f"unknown field {unknown[0]!r} (gift, count, room)")
    gift = body.get("gift")
    if gift not in GIFT_NAMES:
        raise GiftError(f"gift must be one of {', '.join(sorted(GIFT_NAMES))}")
    count = body.get("count", 1)
    # bool is an int in Python; true is not a count.
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_COUNT:
        raise GiftError(f"count must be an integer from 1 to {MAX_COUNT}")
    room = body.get("room", default_room)
    if not isinstance(room, str) or not room:
        raise GiftError("room must be a non-empty string")
    # A gift into "@someone" would land in that user's channel as a push.
    if is_channel(room):
        raise GiftError("room names a user's channel; gifts go to rooms")
    return Gift(room, gift, count)


async def send(node, user: str, gift: Gift) -> dict:
    """Publish ``user``'s gift to its room, then push the receipt to
    ``user``'s channel. ``node``: a fanout Node (publish, push).

    :returns: ``{"room", "seq", "receipt_seq"}``; ``receipt_seq`` is None
        (and ``receipt_error`` says why) when the gift went out but the
        receipt could not, as on a node with user channels off.
    :raises fanout.protocol.errors.ReasonError: the gift itself was refused (the node's Rejected).
    """
    payload = json.dumps({"gift": gift.gift, "count": gift.count})
    seq = await node.publish(gift.room, "gift", payload, sender=user)
    receipt = json.dumps({"receipt": "gift", "gift": gift.gift, "count": gift.count,
                          "room": gift.room, "room_seq": seq})
    reply: dict = {"room": gift.room, "seq": seq, "receipt_seq": None}
    try:
        reply["receipt_seq"] = await node.push(user, "system", receipt, sender=SENDER)
    except ReasonError as exc:
        reply["receipt_error"] = str(exc)
    return reply
