"""Run a coroutine from a plain callback without paying for a task when it
does not need one.

A session handles client frames in the socket's read callback. Its handlers
are coroutines because the logic may be a network service, but the embedded
logic answers without ever suspending. :func:`start` runs a coroutine up to
its first suspension right away: if it finishes there, no task or loop turn
was spent; if it suspends, the rest of it continues in an
:class:`asyncio.Task`.

Unlike Python 3.12's eager tasks, the part before the first suspension runs
with no current task: ``asyncio.current_task()`` is None there and
``asyncio.timeout()`` refuses to run. Code reached from a session handler (a
Logic or Bus implementation) therefore bounds its waits with
``asyncio.wait_for``, or suspends before it enters a task-scoped context.
"""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine


class _Rest:
    """The remainder of a coroutine already started: an awaitable that hands
    each future the coroutine is waiting on to the task that awaits it."""

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Coroutine, first: Any) -> None:
        self._coro = coro
        self._first = first

    def __await__(self):
        coro, pending = self._coro, self._first
        while True:
            try:
                sent = yield pending
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:         # cancellation, or the future failed
                try:
                    pending = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    pending = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


async def _finish(coro: Coroutine, first: Any) -> Any:
    return await _Rest(coro, first)


def start(coro: Coroutine) -> asyncio.Task | None:
    """Run ``coro`` until it first suspends.

    :returns: None when it completed (its result is discarded; exceptions it
        raised propagate to the caller), else the task that runs the rest.
    """
    try:
        first = coro.send(None)
    except StopIteration:
        return None
    return asyncio.ensure_future(_finish(coro, first))


def spawn(coro: Coroutine, what: str, logger) -> None:
    """Run ``coro`` for its effect (:func:`start`); a failure, now or later,
    is logged as ``what`` instead of raised."""
    try:
        task = start(coro)
    except Exception:
        logger.exception("%s failed", what)
        return
    if task is not None:
        task.add_done_callback(lambda t: _log_failure(t, what, logger))


def _log_failure(task: asyncio.Task, what: str, logger) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("%s failed", what, exc_info=task.exception())
