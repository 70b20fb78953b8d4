"""The logic layer: where a seq is assigned (:mod:`.sequencer`), per-user
admission (:mod:`.admission`) and the login registry (:mod:`.logins`),
behind the :class:`Logic` interface (:mod:`.base`) a node uses.
:class:`LocalLogic` is the embedded implementation."""

from .base import MAX_ROOM_NAME, Logic, Rejected, RoomHead, check_room_name
from .local import LocalLogic

__all__ = ["Logic", "LocalLogic", "Rejected", "RoomHead", "check_room_name", "MAX_ROOM_NAME"]
