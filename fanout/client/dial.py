"""Racing node addresses: staggered TCP (and TLS) connects, first one wins.

Mars dials up to three addresses 2.5 s apart and keeps the first that
connects: on a weak network one dead or distant address then costs 2.5 s,
not a whole connect timeout. Only the transport handshake is raced, never
the Hello: two Hellos of one user and device class would log in twice, and
the later login kicks the earlier with ``DUPLICATE_LOGIN``.
"""

from __future__ import annotations

import asyncio
import socket
import ssl as ssl_mod

__all__ = ["Candidate", "resolve", "race"]

#: (address to connect to, port, the endpoint's host name for TLS and logs)
Candidate = tuple[str, int, str]


async def resolve(endpoints: list[tuple[str, int]], dns: bool) -> list[Candidate]:
    """Every address to try, in endpoint order. With ``dns`` each host name
    becomes all its A/AAAA records (a name that does not resolve is
    skipped; if none resolves, the names themselves are tried, so the error
    is the connect's)."""
    if not dns:
        return [(host, port, host) for host, port in endpoints]
    loop = asyncio.get_running_loop()
    out: list[Candidate] = []
    for host, port in endpoints:
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            continue
        seen = set()
        for _family, _type, _proto, _name, addr in infos:
            if addr[0] not in seen:
                seen.add(addr[0])
                out.append((addr[0], port, host))
    return out or [(host, port, host) for host, port in endpoints]


async def race(candidates: list[Candidate], *, fan: int, stagger: float,
               ssl: ssl_mod.SSLContext | None = None, server_hostname: str | None = None):
    """Connect to up to ``fan`` of ``candidates``, starting the next one
    ``stagger`` seconds after the previous (at once if the previous failed).

    :returns: ``(reader, writer, candidate)`` of the first to connect; the
        others are cancelled, or closed if they connected too.
    :raises OSError: every attempt failed (the last attempt's error).
    """
    pending: dict[asyncio.Task, Candidate] = {}
    todo = list(candidates[:max(1, fan)])
    error: BaseException | None = None
    try:
        while todo or pending:
            if todo:
                cand = todo.pop(0)
                kwargs = {}
                if ssl is not None:
                    kwargs = {"ssl": ssl, "server_hostname": server_hostname or cand[2]}
                task = asyncio.ensure_future(asyncio.open_connection(cand[0], cand[1], **kwargs))
                pending[task] = cand
            done, _ = await asyncio.wait(pending, timeout=stagger if todo else None,
                                         return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                cand = pending.pop(task)
                if task.exception() is None:
                    reader, writer = task.result()
                    return reader, writer, cand
                error = task.exception()
        raise error if error is not None else OSError("no address to connect to")
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
            for task in pending:
                if not task.cancelled() and task.exception() is None:
                    task.result()[1].transport.abort()     # a loser that connected too
