"""`fanout demo` without a browser: what its HTTP side serves, the Origin
rule it gives its node, its gift service (the gift to the room, the receipt
to the sender's channel alone), its bot's messages, a clear refusal of a
taken port (the page itself: tests/test_browser.py)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import jwt
import pytest

from conftest import SECRET, token
from demokit import ROOM, start_demo  # noqa: F401  (a fixture)
from fanout.demo.bot import Bot
from fanout.demo.web import DemoSite, _is_loopback, caller_allowed
from fanout.protocol import fanout_pb2 as pb
from rawclient import FT, RawClient


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


def test_demo_says_its_node_ports_are_taken_not_a_traceback():
    """The README's order: `make run` is serving, then `fanout demo`, whose own
    node wants the same ports."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "fanout", "demo", "--http-port", "0",
                              "--port", str(port), "--admin-port", "0", "--no-bot"],
                             capture_output=True, text=True, timeout=30)
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert "fanout demo: cannot start its node:" in run.stderr, run.stderr
    assert f"127.0.0.1', {port}" in run.stderr and "--port, --admin-port" in run.stderr


def test_demo_finds_the_sdk_in_the_checkout_it_is_started_from(tmp_path, monkeypatch):
    """A plain `pip install .` (the README's line without make) puts the
    package in site-packages, away from clients/js: the demo then takes the
    build from the checkout it runs in, where the README starts it."""
    from fanout.demo import web

    built = tmp_path / "clients" / "js" / "dist" / "fanout.browser.js"
    assert web.default_sdk(tmp_path) == web.DEFAULT_SDK        # an editable install's
    monkeypatch.setattr(web, "DEFAULT_SDK", tmp_path / "site-packages" / web.SDK_IN_CHECKOUT)
    assert web.default_sdk(tmp_path) == web.DEFAULT_SDK        # nowhere: the warning names it
    built.parent.mkdir(parents=True)
    built.write_text("export {};\n")
    assert web.default_sdk(tmp_path) == built


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


def test_bot_welcomes_each_new_viewer_once_but_not_its_own():
    bot = Bot("http://127.0.0.1:1", "key", "lobby", seed=1)
    pushes = bot.welcome(["ann", "bot-viewer-0", "bob"])
    assert [(p["user"], p["kind"], p["sender"]) for p in pushes] == [
        ("ann", "system", "lobby"), ("bob", "system", "lobby")]
    assert "Welcome to #lobby, ann!" in pushes[0]["payload"]
    assert [p["user"] for p in bot.welcome(["ann", "bob", "cat"])] == ["cat"]


def test_tokens_and_gifts_only_for_loopback_callers():
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("127.3.2.1")
    assert not _is_loopback("192.0.2.7") and not _is_loopback(None) and not _is_loopback("")
    closed = DemoSite(ws_url="", room=ROOM, secret=SECRET)
    opened = DemoSite(ws_url="", room=ROOM, secret=SECRET, open_tokens=True)
    assert caller_allowed(closed, "127.0.0.1") and caller_allowed(closed, "::1")
    assert not caller_allowed(closed, "192.0.2.7") and not caller_allowed(closed, None)
    assert caller_allowed(opened, "192.0.2.7")           # --open-tokens


def viewer(demo, user: str, device_class: str = "", room: str | None = ROOM) -> RawClient:
    client = RawClient("127.0.0.1", demo.port)
    ok = client.hello(token(user), device_class=device_class)
    assert isinstance(ok, pb.AuthOk) and ok.channel == "@" + user, ok
    if room:
        assert isinstance(client.join(room), pb.Ack)
    return client


def test_gift_goes_to_the_room_and_its_receipt_to_the_sender_alone(start_demo):
    demo = start_demo("--no-bot")
    ann, ann_phone, bob = (viewer(demo, "ann", "web"), viewer(demo, "ann", "mobile", room=None),
                           viewer(demo, "bob"))
    status, reply = demo.gift({"gift": "rocket", "count": 2}, token("ann"))
    assert status == 200, reply
    assert reply == {"room": ROOM, "seq": 1, "receipt_seq": 1}
    gift = ("gift", "ann", {"gift": "rocket", "count": 2})
    receipt = ("system", "gift-service",
               {"receipt": "gift", "gift": "rocket", "count": 2, "room": ROOM, "room_seq": 1})

    def seen(client: RawClient, count: int) -> dict:
        return {(m.room, m.seq): (pb.Kind.Name(m.kind).lower(), m.sender, json.loads(m.payload))
                for m in client.messages(count)}

    # the sender's connections: the gift in the room, the receipt on every device
    assert seen(ann, 2) == {(ROOM, 1): gift, ("@ann", 1): receipt}
    assert seen(ann_phone, 1) == {("@ann", 1): receipt}
    # another viewer: the gift, and no receipt on its channel (its first push is seq 1)
    assert seen(bob, 1) == {(ROOM, 1): gift}
    assert demo.push("bob", '{"notice": "next"}') == 1
    assert seen(bob, 1) == {("@bob", 1): ("system", "tester", {"notice": "next"})}
    # a gift without a count is one, into the demo's room
    status, reply = demo.gift({"gift": "rose"}, token("bob"))
    assert (status, reply) == (200, {"room": ROOM, "seq": 2, "receipt_seq": 2})
    assert seen(bob, 2)[("@bob", 2)][2]["count"] == 1
    assert seen(ann, 1) == {(ROOM, 2): ("gift", "bob", {"gift": "rose", "count": 1})}
    ann.send(FT.PING, pb.Ping(nonce=7))
    assert ann.expect(FT.PONG).nonce == 7            # and nothing on ann's channel


def test_gift_refuses_bad_requests_clearly(start_demo):
    demo = start_demo("--no-bot")
    good = token("ann")
    refused = [
        (None, {"gift": "rose"}, 401, "AUTH_MISSING", "Authorization: Bearer"),
        (token("ann", secret="not-the-node-secret-0123456789abcdef"), {"gift": "rose"},
         401, "AUTH_INVALID", "signature"),
        (token("ann", ttl=-60), {"gift": "rose"}, 401, "AUTH_EXPIRED", "expired"),
        (good, b"rose", 400, "BAD_REQUEST", "not JSON"),
        (good, b"\xff\xfe", 400, "BAD_REQUEST", "not JSON"),
        (good, ["rose"], 400, "BAD_REQUEST", "JSON object"),
        (good, {"gift": "diamond"}, 400, "BAD_REQUEST", "gift must be one of"),
        (good, {"gift": "rose", "count": 0}, 400, "BAD_REQUEST", "count must be"),
        (good, {"gift": "rose", "count": 100}, 400, "BAD_REQUEST", "count must be"),
        (good, {"gift": "rose", "count": "3"}, 400, "BAD_REQUEST", "count must be"),
        (good, {"gift": "rose", "count": True}, 400, "BAD_REQUEST", "count must be"),
        (good, {"gift": "rose", "sender": "bob"}, 400, "BAD_REQUEST", "unknown field 'sender'"),
        (good, {"gift": "rose", "room": ""}, 400, "BAD_REQUEST", "room must be"),
        # a gift must not become a push into someone's channel
        (good, {"gift": "rose", "room": "@bob"}, 400, "BAD_REQUEST", "user's channel"),
        (good, {"gift": "rose", "room": "r" * 200}, 400, "BAD_REQUEST", "room name longer"),
        (token("ann", rooms=["elsewhere"]), {"gift": "rose"}, 403, "ROOM_FORBIDDEN",
         "does not allow"),
        (good, {"gift": "rose", "room": "x" * 2000}, 413, "PAYLOAD_TOO_LARGE", "at most 1024"),
    ]
    for tok, body, status, code, message in refused:
        got = demo.gift(body, tok)
        assert got[0] == status and got[1]["error"]["code"] == code, (body, got)
        assert message in got[1]["error"]["message"], (body, got)
    with pytest.raises(urllib.error.HTTPError) as info:
        get(demo.url + "gift")
    assert info.value.code == 405
    # none of them published or pushed anything
    assert demo.publish("chat", "first") == 1
    assert demo.push("ann", "first") == 1 and demo.push("bob", "first") == 1
