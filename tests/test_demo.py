"""`fanout demo` without a browser: what its HTTP side serves, the Origin
rule it gives its node, its bot's messages, a clear refusal of a taken port
(the page itself: tests/test_browser.py)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request

import jwt

from conftest import SECRET
from demokit import ROOM, start_demo  # noqa: F401  (a fixture)
from fanout.demo.bot import Bot
from fanout.demo.web import _is_loopback


def get(url: str) -> tuple[int, dict, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, dict(response.headers), response.read()


def upgrade(port: int, origin: str | None) -> str:
    """The status line a WebSocket upgrade to the node gets."""
    headers = ["GET /ws HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket",
               "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
               "Sec-WebSocket-Version: 13"] + ([f"Origin: {origin}"] if origin else [])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(("\r\n".join(headers) + "\r\n\r\n").encode())
        return s.recv(4096).split(b"\r\n", 1)[0].decode()


def test_demo_serves_the_page_the_sdk_and_tokens(start_demo):
    demo = start_demo("--no-bot", "--user", "zoe")
    status, headers, body = get(demo.url)
    assert status == 200 and b'src="/static/demo.js"' in body
    status, headers, body = get(demo.url + "sdk/fanout.browser.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert b"Client" in body and b"export" in body
    config = json.loads(get(demo.url + "config.json")[2])
    assert config == {"ws_url": demo.ws_url, "room": ROOM, "user": "zoe"}
    reply = json.loads(get(demo.url + "token?user=ann")[2])
    claims = jwt.decode(reply["token"], SECRET, algorithms=["HS256"])
    assert reply["user"] == claims["sub"] == "ann" and claims["rooms"] == "*"
    assert abs(reply["expires_ms"] - claims["exp"] * 1000) < 1000
    assert json.loads(get(demo.url + "token")[2])["user"] == "zoe"    # --user


def test_demo_node_takes_the_pages_origin_only(start_demo):
    demo = start_demo("--no-bot")
    page_origin = demo.url.rstrip("/")
    assert upgrade(demo.ws_port, page_origin).startswith("HTTP/1.1 101")
    assert upgrade(demo.ws_port, f"http://localhost:{demo.http_port}").startswith("HTTP/1.1 101")
    assert upgrade(demo.ws_port, None).startswith("HTTP/1.1 101")        # not a browser
    refused = upgrade(demo.ws_port, "http://evil.example")
    assert refused.split()[1].startswith("4"), refused


def test_demo_refuses_a_taken_port_clearly():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "fanout", "demo", "--http-port", str(port),
                              "--no-bot"], capture_output=True, text=True, timeout=30)
    assert run.returncode != 0
    assert f"cannot serve the page on 127.0.0.1:{port}" in run.stderr


def test_bot_sends_chat_and_every_fourth_a_gift():
    bot = Bot("http://127.0.0.1:1", "key", "lobby", seed=1)
    kinds = []
    for _ in range(12):
        message = bot.next_message()
        bot.published += 1
        kinds.append(message["kind"])
        assert message["room"] == "lobby" and message["sender"] and message["payload"]
        if message["kind"] == "gift":
            gift = json.loads(message["payload"])
            assert gift["gift"] and gift["count"] >= 1
    assert kinds == ["chat", "chat", "chat", "gift"] * 3


def test_tokens_only_for_loopback_callers():
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("127.3.2.1")
    assert not _is_loopback("192.0.2.7") and not _is_loopback(None) and not _is_loopback("")
