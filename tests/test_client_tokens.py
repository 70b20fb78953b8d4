"""The SDK's token life (issue 8 item 5): refresh through the application's
callback before expiry, a new token after Kick(TOKEN_EXPIRED), and an end on
revocation. Against real node processes."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import pytest

from conftest import API_KEY, SECRET
from fanout.client import AuthError, Client, KickedError
from fanout.protocol import fanout_pb2 as pb
from fanout.protocol.auth import mint

pytestmark = pytest.mark.parametrize("node_loop", ["uvloop"])

GRACE_MS = 500


def _post(node, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{node.admin_port}{path}", data=json.dumps(body).encode(),
        method="POST", headers={"Authorization": f"Bearer {API_KEY}",
                                "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


async def publish(node, room: str, text: str) -> int:
    reply = await asyncio.to_thread(_post, node, "/v1/publish",
                                    {"room": room, "kind": "gift", "payload": text})
    return reply["seq"]


async def message(client: Client, timeout: float = 10) -> pb.RoomMessage:
    event = await client.next_event(timeout=timeout)
    assert isinstance(event, pb.RoomMessage), event
    return event


def test_sdk_refreshes_ahead_of_expiry(start_node):
    """Tokens of 3 s, refreshed by a sync callback: one connection outlives
    three of them, and every message arrives."""
    node = start_node("--token-grace-ms", str(GRACE_MS))
    calls = []

    def refresher() -> str:
        calls.append(time.time())
        return mint(SECRET, "rita", ttl=3)

    async def main():
        first = mint(SECRET, "rita", ttl=3)
        async with Client(node.host, node.port, first, token_refresher=refresher) as c:
            await c.join("r")
            session = c.auth.session
            deadline = time.time() + 7
            seqs = []
            while time.time() < deadline:
                seqs.append(await publish(node, "r", "tick"))
                assert (await message(c)).seq == seqs[-1]
                await asyncio.sleep(0.5)
            assert c.connected and c.auth.session == session
            assert c.stats["reconnects"] == 0
            assert c.stats["refreshes"] >= 2 and len(calls) == c.stats["refreshes"]
            assert c.token != first

    asyncio.run(main())


def test_sdk_gets_a_new_token_after_token_expired(start_node):
    """When every refresh before expiry is refused, the node kicks with
    TOKEN_EXPIRED; the SDK asks its (async) callback again, reconnects with
    the new token and resumes the room without a gap."""
    node = start_node("--token-grace-ms", str(GRACE_MS))
    now = int(time.time())
    first_exp = now + 3
    wrong = "a-secret-the-node-does-not-know-0123456789"

    async def refresher() -> str:
        await asyncio.sleep(0)
        if time.time() < first_exp:
            return mint(wrong, "sam", ttl=60)         # refused by the node
        return mint(SECRET, "sam", ttl=60)

    async def main():
        async with Client(node.host, node.port, mint(SECRET, "sam", ttl=3, issued_at=now),
                          token_refresher=refresher, backoff_min=0.05) as c:
            await c.join("r")
            one = await publish(node, "r", "before")
            assert (await message(c)).seq == one
            while c.stats["reconnects"] == 0:
                assert time.time() < first_exp + GRACE_MS / 1000 + 5, "no reconnect"
                await asyncio.sleep(0.1)
            assert c.stats["refreshes"] == 0
            two = await publish(node, "r", "after")
            got = await message(c)
            assert got.seq == two == one + 1 and c.stats["gaps"] == 0
            assert c.connected

    asyncio.run(main())


def test_sdk_without_refresher_ends_on_token_expired(start_node):
    node = start_node("--token-grace-ms", str(GRACE_MS))

    async def main():
        async with Client(node.host, node.port, mint(SECRET, "tom", ttl=2)) as c:
            await c.join("r")
            with pytest.raises(KickedError) as err:
                await c.next_event(timeout=10)
            assert err.value.reason == pb.TOKEN_EXPIRED

    asyncio.run(main())


def test_sdk_stops_on_revocation(start_node):
    """TOKEN_REVOKED ends the client (no reconnect, even with a refresher), and
    a revoked token is refused at connect with AuthError."""
    node = start_node()
    now = int(time.time())
    old = mint(SECRET, "uma", ttl=600, issued_at=now - 10)

    async def main():
        async with Client(node.host, node.port, old, backoff_min=0.05,
                          token_refresher=lambda: mint(SECRET, "uma", ttl=600)) as c:
            await c.join("r")
            reply = await asyncio.to_thread(_post, node, "/v1/users/uma/revoke",
                                            {"before": now - 5})
            assert reply["kicked"] == 1
            with pytest.raises(KickedError) as err:
                await c.next_event(timeout=10)
            assert err.value.reason == pb.TOKEN_REVOKED
            await asyncio.sleep(0.5)
            assert c.stats["reconnects"] == 0 and not c.connected
        c = Client(node.host, node.port, old)
        with pytest.raises(AuthError) as err:
            await c.connect()
        assert err.value.reason == pb.TOKEN_REVOKED

    asyncio.run(main())


def test_sdk_refresh_with_fewer_rooms_ends_the_others(start_node):
    """Client.refresh(token): the node leaves a room the new token does not
    allow; iteration yields its Error(ROOM_FORBIDDEN) and the room is no
    longer joined (nor resumed). A refused refresh raises RequestError and
    keeps the token."""
    from fanout.client import RequestError

    node = start_node()

    async def main():
        first = mint(SECRET, "vic", rooms=["a", "b"], ttl=600)
        async with Client(node.host, node.port, first) as c:
            await c.join("a")
            await c.join("b")
            with pytest.raises(RequestError) as err:
                await c.refresh(mint(SECRET, "someone-else", ttl=600))
            assert err.value.reason == pb.AUTH_INVALID and c.token == first
            narrower = mint(SECRET, "vic", rooms=["a"], ttl=600)
            await c.refresh(narrower)
            assert c.token == narrower and c.rooms == ["a"]
            event = await c.next_event(timeout=5)
            assert isinstance(event, pb.Error) and event.reason == pb.ROOM_FORBIDDEN
            assert event.room == "b"
            seq = await publish(node, "a", "still")
            assert (await message(c)).seq == seq

    asyncio.run(main())
