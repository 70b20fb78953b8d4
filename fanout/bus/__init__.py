"""The bus: where a message crosses from the logic layer to the nodes that
hold its room. :class:`Bus` is the interface (:mod:`.base`);
:class:`LocalBus` the embedded, in-process one."""

from .base import Bus, Handler
from .local import LocalBus

__all__ = ["Bus", "Handler", "LocalBus"]
