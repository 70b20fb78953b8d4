"""The bus: where an encoded message crosses from the logic layer to the
nodes that hold the room."""

from .local import Bus, LocalBus

__all__ = ["Bus", "LocalBus"]
