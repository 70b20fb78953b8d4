"""A bot that makes the demo room look alive: chat and gifts published
through the node's admin API (as a platform's services would), a welcome
notice pushed to each new viewer's channel, and a few viewers connected
over TCP so the online count is more than one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from urllib.parse import quote

import aiohttp

from ..client import Client
from ..protocol.auth import mint

log = logging.getLogger("fanout.demo.bot")

SENDERS = ["mia", "kenji", "ana", "lucas", "priya", "tom", "sofia", "wei", "omar", "lena"]
CHAT = [
    "hello everyone 👋", "first time here!", "this stream is great", "lol", "😂😂😂",
    "what song is this?", "GG", "let's go!!!", "greetings from Lisbon", "so smooth",
    "can you say hi to my friend?", "❤️❤️", "wow", "how long have you been streaming?",
    "that was close", "10/10", "hahaha", "nice one", "🔥🔥🔥", "good evening from Osaka",
]
#: (name, weight): cheap gifts are common, big ones rare.
GIFTS = [("rose", 10), ("heart", 8), ("star", 5), ("rocket", 2), ("crown", 1), ("fireworks", 1)]
#: How often the bot looks for viewers to welcome; the users it remembers.
WELCOME_EVERY_S = 1.0
MAX_GREETED = 10_000
VIEWER_PREFIX = "bot-viewer-"


class Bot:
    """Publishes to ``room`` through the admin API at ``admin_url`` with
    ``api_key``: chat about ``rate`` times a second, a gift every few chats.
    With ``viewers`` > 0 it also keeps that many TCP viewers in the room."""

    def __init__(self, admin_url: str, api_key: str, room: str, *, rate: float = 2.0,
                 gift_every: int = 4, viewers: int = 0, node: tuple[str, int] | None = None,
                 secret: str = "", seed: int | None = None) -> None:
        self.admin_url = admin_url.rstrip("/")
        self.api_key = api_key
        self.room = room
        self.rate = rate
        self.gift_every = gift_every
        self.viewers = viewers
        self.node = node
        self.secret = secret
        self.random = random.Random(seed)
        self.published = 0
        self.greeted: set[str] = set()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks.append(asyncio.ensure_future(self._publish_loop()))
        self._tasks.append(asyncio.ensure_future(self._welcome_loop()))
        for i in range(self.viewers if self.node else 0):
            self._tasks.append(asyncio.ensure_future(self._viewer(i)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    def next_message(self) -> dict:
        """The next message to publish: a chat line, or every ``gift_every``-th a gift."""
        sender = self.random.choice(SENDERS)
        if self.published % self.gift_every == self.gift_every - 1:
            names, weights = zip(*GIFTS)
            gift = self.random.choices(names, weights)[0]
            count = self.random.choice([1, 1, 1, 2, 3, 5, 10]) if gift in ("rose", "heart") else 1
            payload = json.dumps({"gift": gift, "count": count})
            return {"room": self.room, "kind": "gift", "sender": sender, "payload": payload}
        return {"room": self.room, "kind": "chat", "sender": sender,
                "payload": self.random.choice(CHAT)}

    async def _publish_loop(self) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            while True:
                message = self.next_message()
                try:
                    async with http.post(f"{self.admin_url}/v1/publish", json=message) as r:
                        if r.status != 200:
                            log.warning("bot publish: HTTP %d %s", r.status, await r.text())
                except aiohttp.ClientError as exc:
                    log.warning("bot publish: %s", exc)
                self.published += 1
                # Irregular, like people: exponential gaps around the rate.
                await asyncio.sleep(min(3.0, self.random.expovariate(self.rate)))

    def welcome(self, users: list[str]) -> list[dict]:
        """The pushes for the users in ``users`` not yet welcomed (nor the
        bot's own viewers); they count as welcomed from now on."""
        new = [u for u in users if u not in self.greeted and not u.startswith(VIEWER_PREFIX)]
        if len(self.greeted) + len(new) > MAX_GREETED:
            self.greeted.clear()            # a demo's memory stays small
        self.greeted.update(new)
        return [{"user": user, "kind": "system", "sender": self.room,
                 "payload": f"Welcome to #{self.room}, {user}! Send a gift: "
                            "its receipt comes here, for you only."} for user in new]

    async def _welcome_loop(self) -> None:
        # The room's first page of users (100) is enough for a demo. A user
        # listed is already a member of its channel (since its AuthOk), so
        # the push reaches the page.
        headers = {"Authorization": f"Bearer {self.api_key}"}
        presence = f"{self.admin_url}/v1/rooms/{quote(self.room, safe='')}/presence"
        async with aiohttp.ClientSession(headers=headers) as http:
            while True:
                try:
                    async with http.get(presence) as r:
                        users = (await r.json())["users"] if r.status == 200 else []
                    pushes = self.welcome(users)
                    if pushes:
                        async with http.post(f"{self.admin_url}/v1/publish",
                                             json={"messages": pushes}) as r:
                            if r.status != 200:
                                log.warning("bot welcome: HTTP %d %s", r.status, await r.text())
                except aiohttp.ClientError as exc:
                    log.warning("bot welcome: %s", exc)
                await asyncio.sleep(WELCOME_EVERY_S)

    async def _viewer(self, i: int) -> None:
        host, port = self.node
        user = f"{VIEWER_PREFIX}{i}"
        token = mint(self.secret, user)
        async with Client(host, port, token, device_id=user, client_name="fanout-demo-bot",
                          token_refresher=lambda: mint(self.secret, user)) as client:
            await client.join(self.room)
            async for _ in client:      # read everything, or it piles up in the SDK
                pass
