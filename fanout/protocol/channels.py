"""The user's channel: a room per user, named ``@`` + the user id.

Every authenticated connection of a user is a member of it from its
``AuthOk`` on (docs/protocol.md, section 5.10), so a service reaches every
device of one user with one publish, and the messages carry a seq and resume
like any room's. Room names that start with ``@`` are therefore reserved: a
connection may join only its own user's channel, and clients never chat in
one (pushes come from the admin API).
"""

from __future__ import annotations

from .auth import MAX_SUB_BYTES

__all__ = ["PREFIX", "MAX_CHANNEL_NAME", "user_channel", "is_channel"]

#: The first character of every user channel's name.
PREFIX = "@"

#: Longest channel name in UTF-8 bytes: the prefix and the longest user id.
MAX_CHANNEL_NAME = len(PREFIX) + MAX_SUB_BYTES


def user_channel(user: str) -> str:
    """The channel (room name) of ``user``."""
    return PREFIX + user


def is_channel(room: str) -> bool:
    """True if ``room`` names a user's channel (reserved)."""
    return room.startswith(PREFIX)

