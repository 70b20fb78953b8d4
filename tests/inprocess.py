"""A whole node (the composition root's App) in the test's own event loop,
on real loopback sockets: for tests that look inside the node."""

from __future__ import annotations

import contextlib

from conftest import SECRET
from fanout.server import config
from fanout.server.app import App


@contextlib.asynccontextmanager
async def local_app(*, bus=None, logic=None, grace: float = 0.5, **settings):
    """``async with local_app(room_budget=10) as app:`` -> a started App."""
    cfg = config.load(None, env={}, overrides={"port": 0, "admin_port": -1, "secret": SECRET,
                                               **settings})
    app = App(cfg, bus=bus, logic=logic)
    await app.start()
    try:
        yield app
    finally:
        await app.stop(grace=grace)
