"""Issue 8 items 5, 6 and 11 (API key): tokens end when they expire, claims
are strict, revocation reaches live connections, and the node refuses to
start with guessable credentials. Against real node processes on loopback.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request

import jwt
import pytest

from conftest import API_KEY, SECRET, token
from fanout._testbase.process import ADMIN_RE, LISTEN_RE, Proc
from fanout.protocol import fanout_pb2 as pb
from fanout.protocol.auth import DEV_SECRET, mint
from fanout.server import config
from rawclient import FT, RawClient

uvloop_only = pytest.mark.parametrize("node_loop", ["uvloop"])

GRACE_MS = 500


def claims_token(secret: str = SECRET, **claims) -> str:
    """A token with exactly ``claims`` (mint() always adds iat and rooms)."""
    return jwt.encode(claims, secret, algorithm="HS256")


def admin(node, method: str, path: str, body=None, *, key: str = API_KEY,
          raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Authorization": f"Bearer {key}"}
    if data:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(f"http://127.0.0.1:{node.admin_port}{path}", data=data,
                                     method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def publish(node, room: str, text: str) -> int:
    status, body = admin(node, "POST", "/v1/publish",
                         {"room": room, "kind": "gift", "payload": text})
    assert status == 200, body
    return body["seq"]


def connect(node, tok: str, *, device_class: str = "") -> tuple[RawClient, pb.AuthOk]:
    c = RawClient(node.host, node.port)
    ok = c.hello(tok, device_class=device_class)
    assert isinstance(ok, pb.AuthOk), ok
    return c, ok


def ping(c: RawClient, nonce: int = 1) -> None:
    """The connection is alive: a Pong comes back (skipping broadcasts)."""
    c.send(FT.PING, pb.Ping(nonce=nonce))
    while True:
        ftype, msg = c.next(5) or (None, None)
        assert ftype is not None, "no Pong: the connection is gone"
        if ftype == FT.PONG:
            assert msg.nonce == nonce
            return


def refresh(c: RawClient, tok: str, req_id: int):
    """Send Refresh; the Ack or Error with ``req_id`` (other frames before it kept)."""
    c.send(FT.REFRESH, pb.Refresh(req_id=req_id, token=tok))
    seen = []
    while True:
        item = c.next(5)
        assert item is not None, f"no reply to Refresh {req_id}; saw {seen}"
        ftype, msg = item
        if ftype in (FT.ACK, FT.ERROR) and msg.req_id == req_id:
            return msg, seen
        seen.append(item)


def node_with_grace(start_node, *flags):
    return start_node("--token-grace-ms", str(GRACE_MS), "--chat-rate", "1000",
                      "--chat-burst", "1000", *flags)


# ---------------------------------------------------------------- expiry

def test_a_3s_token_ends_the_connection_at_exp_plus_grace(start_node):
    """Item 5: a token with a 3 s lifetime does not keep its connection alive:
    Kick(TOKEN_EXPIRED) arrives by exp + grace + 1 s (the sweep's precision),
    and after it the client receives nothing and cannot chat."""
    node = node_with_grace(start_node)
    now = int(time.time())
    tok = mint(SECRET, "brief", ttl=3, issued_at=now)
    exp = now + 3
    c, ok = connect(node, tok)
    assert ok.token_expires_ms == exp * 1000
    assert c.join("live").room == "live"
    c.chat("live", b"before")
    assert c.expect(FT.ACK).seq >= 1                     # chatting works while valid
    publish(node, "live", "gift-before")
    kick, kicked_at = None, None
    while kick is None:
        item = c.next(exp + GRACE_MS / 1000 + 3 - time.time())
        assert item is not None, "no Kick: the expired token kept the connection"
        if item[0] == FT.KICK:
            kick, kicked_at = item[1], time.time()
    assert kick.reason == pb.TOKEN_EXPIRED
    assert kicked_at >= exp + GRACE_MS / 1000 - 0.05      # not before exp + grace
    # The sweep runs once a second; 0.3 s of slack for the loop and this test.
    assert kicked_at <= exp + GRACE_MS / 1000 + 1.0 + 0.3, kicked_at - exp
    publish(node, "live", "gift-after")
    try:
        c.chat("live", b"after")
    except OSError:
        pass                                             # already closed: fine
    after = c.until_closed(timeout=5)
    assert after == [], f"received after the Kick: {after}"


def test_refresh_extends_the_connection(start_node):
    """Item 5: Refresh before exp replaces the token: the connection outlives
    the first token's exp + grace, still receiving and chatting."""
    node = node_with_grace(start_node)
    now = int(time.time())
    c, ok = connect(node, mint(SECRET, "keeper", ttl=3, issued_at=now))
    c.join("live")
    reply, _ = refresh(c, mint(SECRET, "keeper", ttl=60), req_id=7)
    assert reply.DESCRIPTOR.name == "Ack" and reply.req_id == 7
    time.sleep(max(0.0, now + 3 + GRACE_MS / 1000 + 1.5 - time.time()))
    ping(c)
    seq = publish(node, "live", "still here")
    got = c.messages(1)
    assert got[0].seq == seq
    c.chat("live", b"me too", req_id=9)
    assert c.expect(FT.ACK).req_id == 9
    c.close()


@uvloop_only
def test_bad_refreshes_are_refused_and_the_old_token_still_ends(start_node):
    """Item 5: a Refresh for another user, an expired one, a badly signed one,
    a garbage one and an empty one each get Error{req_id, reason}; the
    connection stays (Pong) on its old token, and ends at that token's exp."""
    node = node_with_grace(start_node)
    now = int(time.time())
    c, _ = connect(node, mint(SECRET, "carol", ttl=3, issued_at=now))
    bad = [
        (mint(SECRET, "mallory", ttl=60), pb.AUTH_INVALID),
        (mint(SECRET, "carol", ttl=-10), pb.AUTH_EXPIRED),
        (mint("another-secret-that-is-long-enough-000", "carol", ttl=60), pb.AUTH_INVALID),
        ("not.a.jwt", pb.AUTH_INVALID),
        ("", pb.AUTH_MISSING),
        (claims_token(sub="carol", exp=now + 60, rooms="*", iat="yesterday"), pb.AUTH_INVALID),
    ]
    for req_id, (tok, reason) in enumerate(bad, start=10):
        reply, _ = refresh(c, tok, req_id)
        assert reply.DESCRIPTOR.name == "Error", reply
        assert (reply.req_id, pb.Reason.Name(reply.reason)) == (req_id, pb.Reason.Name(reason))
        ping(c, req_id)
    frames = c.until_closed(timeout=now + 3 + GRACE_MS / 1000 + 3 - time.time())
    kicks = [m for t, m in frames if t == FT.KICK]
    assert [k.reason for k in kicks] == [pb.TOKEN_EXPIRED]


@uvloop_only
def test_refresh_with_fewer_rooms_leaves_the_others(start_node):
    """Item 5: the refreshed token's rooms apply from then on: a room it no
    longer allows is left, with Error{ROOM_FORBIDDEN, room}, before the Ack."""
    node = node_with_grace(start_node)
    c, _ = connect(node, mint(SECRET, "dora", rooms=["a", "b"], ttl=60))
    c.join("a", req_id=1)
    c.join("b", req_id=2)
    reply, before = refresh(c, mint(SECRET, "dora", rooms=["a"], ttl=60), req_id=3)
    assert reply.DESCRIPTOR.name == "Ack"
    errors = [m for t, m in before if t == FT.ERROR]
    assert [(e.reason, e.room, e.req_id) for e in errors] == [(pb.ROOM_FORBIDDEN, "b", 0)]
    publish(node, "b", "not for dora")
    seq = publish(node, "a", "for dora")
    got = c.messages(1)
    assert [(m.room, m.seq) for m in got] == [("a", seq)]
    c.send(FT.JOIN, pb.Join(req_id=4, room="b"))
    assert c.expect(FT.ERROR).reason == pb.ROOM_FORBIDDEN
    c.close()


# ---------------------------------------------------------------- strict claims

@uvloop_only
def test_a_token_without_rooms_grants_no_room(start_node):
    """Item 5: a missing rooms claim grants nothing (it granted every room)."""
    node = start_node()
    now = int(time.time())
    c, _ = connect(node, claims_token(sub="norooms", exp=now + 60, iat=now))
    reply = c.join("anything")
    assert isinstance(reply, pb.Error) and reply.reason == pb.ROOM_FORBIDDEN
    c.close()
    c, _ = connect(node, claims_token(sub="allrooms", exp=now + 60, rooms="*"))
    assert isinstance(c.join("anything"), pb.Ack)
    c.close()


def _refused(node, tok: str) -> int:
    c = RawClient(node.host, node.port)
    c.send(FT.HELLO, pb.Hello(token=tok))
    frames = c.until_closed()
    c.close()
    errors = [m for t, m in frames if t == FT.ERROR]
    assert len(errors) == 1 and not [t for t, _ in frames if t == FT.AUTH_OK], frames
    return errors[0].reason


@uvloop_only
def test_claim_types_are_strict_and_refusals_are_quiet(start_node):
    """Item 5: exp as a string, a bool, a float, 10**400; iat/nbf not
    integers; sub empty, not a string, over 128 bytes; rooms malformed: each
    is AUTH_INVALID with no traceback. 200 tries of exp = 10**400 add at most
    a handful of (throttled) log lines, not one per try."""
    node = start_node()
    now = int(time.time())
    bad = {
        "exp string": dict(sub="u", exp=str(now + 60), rooms="*"),
        "exp bool": dict(sub="u", exp=True, rooms="*"),
        "exp float": dict(sub="u", exp=now + 60.5, rooms="*"),
        "exp huge": dict(sub="u", exp=10**400, rooms="*"),
        "exp null": dict(sub="u", exp=None, rooms="*"),
        "no exp": dict(sub="u", rooms="*"),
        "exp too far": dict(sub="u", exp=now + 10 * 86_400, rooms="*"),
        "iat string": dict(sub="u", exp=now + 60, iat="now", rooms="*"),
        "iat huge": dict(sub="u", exp=now + 60, iat=-(10**400), rooms="*"),
        "nbf bool": dict(sub="u", exp=now + 60, nbf=False, rooms="*"),
        "nbf future": dict(sub="u", exp=now + 60, nbf=now + 30, rooms="*"),
        "sub empty": dict(sub="", exp=now + 60, rooms="*"),
        "sub number": dict(sub=7, exp=now + 60, rooms="*"),
        "sub long": dict(sub="x" * 129, exp=now + 60, rooms="*"),
        "rooms string": dict(sub="u", exp=now + 60, rooms="lobby"),
        "rooms numbers": dict(sub="u", exp=now + 60, rooms=[1, 2]),
        "rooms empty name": dict(sub="u", exp=now + 60, rooms=[""]),
        "rooms long name": dict(sub="u", exp=now + 60, rooms=["r" * 129]),
        "rooms too many": dict(sub="u", exp=now + 60, rooms=[f"r{i}" for i in range(101)]),
    }
    for name, claims in bad.items():
        reason = _refused(node, claims_token(**claims))
        assert reason == pb.AUTH_INVALID, (name, pb.Reason.Name(reason))
    huge = claims_token(sub="u", exp=10**400, rooms="*")
    lines_before = len(node.log().splitlines())
    for _ in range(200):
        assert _refused(node, huge) == pb.AUTH_INVALID
    time.sleep(1.2)                                  # a sweep logs its auth-failure burst
    log = node.log()
    assert "Traceback" not in log and "internal error" not in log
    added = len(log.splitlines()) - lines_before
    assert added <= 10, f"{added} log lines for 200 bad tokens:\n{log}"
    # ...and the node still serves a good token
    c, _ = connect(node, token("fine"))
    c.close()


@uvloop_only
def test_issuer_and_audience_when_configured(start_node):
    """Item 5: with token_issuer / token_audience set, a token must carry a
    matching iss and aud (aud may be a list holding it)."""
    node = start_node("--token-issuer", "https://auth.example", "--token-audience", "fanout")
    now = int(time.time())
    base = dict(sub="ivy", exp=now + 60, iat=now, rooms="*")
    for claims in (base, {**base, "iss": "https://auth.example"},
                   {**base, "aud": "fanout"}, {**base, "iss": "https://evil.example",
                                               "aud": "fanout"},
                   {**base, "iss": "https://auth.example", "aud": ["other"]},
                   {**base, "iss": "https://auth.example", "aud": 7}):
        assert _refused(node, claims_token(**claims)) == pb.AUTH_INVALID, claims
    for aud in ("fanout", ["other", "fanout"]):
        c, _ = connect(node, claims_token(**base, iss="https://auth.example", aud=aud))
        c.close()
    # Without the settings, iss and aud are not checked.
    plain = start_node()
    c, _ = connect(plain, claims_token(**base, iss="anyone", aud="anything"))
    c.close()


# ---------------------------------------------------------------- revocation

@uvloop_only
def test_revoke_kicks_live_connections_and_refuses_reconnect_and_refresh(start_node):
    """Item 5: POST /v1/users/{user}/revoke {"before": T} kicks the user's
    live connections holding a token issued before T with Kick(TOKEN_REVOKED),
    refuses those tokens at Hello and at Refresh (Error TOKEN_REVOKED), and
    leaves newer tokens and other users alone."""
    node = start_node()
    now = int(time.time())
    old = mint(SECRET, "eve", ttl=600, issued_at=now - 100)
    new = mint(SECRET, "eve", ttl=600, issued_at=now)
    stale, _ = connect(node, old, device_class="phone")
    fresh, _ = connect(node, new, device_class="web")
    other, _ = connect(node, mint(SECRET, "frank", ttl=600, issued_at=now - 100))
    status, body = admin(node, "POST", "/v1/users/eve/revoke", {"before": now - 50})
    assert status == 200 and body == {"user": "eve", "before": now - 50, "kicked": 1}, body
    frames = stale.until_closed()
    assert [(t, m.reason) for t, m in frames] == [(FT.KICK, pb.TOKEN_REVOKED)]
    ping(fresh)
    ping(other)
    # Reconnecting with the revoked token, or a token without iat, is refused.
    assert _refused(node, old) == pb.TOKEN_REVOKED
    assert _refused(node, claims_token(sub="eve", exp=now + 60, rooms="*")) == pb.TOKEN_REVOKED
    # Refreshing to a revoked token is refused, and the connection stays.
    reply, _ = refresh(fresh, mint(SECRET, "eve", ttl=600, issued_at=now - 60), req_id=5)
    assert reply.DESCRIPTOR.name == "Error" and reply.reason == pb.TOKEN_REVOKED
    ping(fresh)
    reply, _ = refresh(fresh, mint(SECRET, "eve", ttl=600, issued_at=now - 40), req_id=6)
    assert reply.DESCRIPTOR.name == "Ack"
    # A revocation "up to now" (no body) catches the rest, then a later token works.
    status, body = admin(node, "POST", "/v1/users/eve/revoke")
    assert status == 200 and body["kicked"] == 1 and body["before"] >= now
    assert [m.reason for t, m in fresh.until_closed()] == [pb.TOKEN_REVOKED]
    later = mint(SECRET, "eve", ttl=600, issued_at=int(body["before"]) + 1)
    connect(node, later)[0].close()
    other.close()


@uvloop_only
def test_revoke_endpoint_checks_its_input(start_node):
    """The revoke endpoint refuses what it cannot mean: a non-number before,
    a bool, a time beyond max_token_lifetime_s, unknown fields; needs the key."""
    node = start_node()
    for body in ({"before": "yesterday"}, {"before": True}, {"before": time.time() + 10**7},
                 {"before": -1}, {"until": 5}, [1]):
        status, reply = admin(node, "POST", "/v1/users/eve/revoke", body)
        assert status == 400 and reply["error"]["code"] == "BAD_REQUEST", (body, reply)
    status, _ = admin(node, "POST", "/v1/users/eve/revoke", {}, key="wrong")
    assert status == 403
    status, reply = admin(node, "POST", "/v1/users/" + "u" * 129 + "/revoke", {})
    assert status == 400


# ---------------------------------------------------------------- secrets and keys

def _run_node(*flags, env_extra=None, timeout=30):
    env = {k: v for k, v in os.environ.items()
           if k not in ("FANOUT_SECRET", "FANOUT_API_KEY", "FANOUT_HOST", "FANOUT_ADMIN_HOST")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "fanout", "node", "--port", "0", *flags],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_dev_secret_off_loopback_refuses_to_start_with_one_line():
    """Item 6: with the development secret, a client port bound to anything
    but loopback refuses to start: exit status 2 and one line on stderr."""
    out = _run_node("--host", "0.0.0.0", "--admin-port", "-1")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "development secret" in lines[0], out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_admin_off_loopback_needs_an_api_key_with_one_line():
    """Item 11: an admin API bound off loopback needs an api_key."""
    out = _run_node("--secret", SECRET, "--admin-host", "0.0.0.0", "--admin-port", "0")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "api_key" in lines[0], out.stderr


@pytest.mark.parametrize("host,ok", [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("", False), ("10.0.0.5", False),
    ("fanout.example", False),
])
def test_which_hosts_count_as_loopback(host, ok):
    settings = {"host": host, "admin_port": -1}
    if ok:
        assert config.load(None, env={}, overrides=settings).secret == DEV_SECRET
    else:
        with pytest.raises(config.ConfigError, match="development secret"):
            config.load(None, env={}, overrides=settings)
        assert config.load(None, env={}, overrides={**settings, "secret": SECRET}).host == host


@uvloop_only
def test_short_secret_and_api_key_warn_once(start_node):
    """Item 6: secrets and API keys shorter than 32 bytes get one WARNING line each."""
    node = start_node("--secret", "short-secret", "--api-key", "short-key")
    log = node.log()
    assert log.count("secret is shorter than 32 bytes") == 1, log
    assert log.count("api_key is shorter than 32 bytes") == 1, log
    quiet = start_node()
    assert "shorter than 32 bytes" not in quiet.log()


@uvloop_only
def test_generated_api_key_goes_to_a_private_file_not_the_log(tmp_path, node_loop):
    """Item 11: with no api_key on loopback, the node writes a generated key to
    $XDG_RUNTIME_DIR/fanout-<admin port>.key, mode 0600, logs the path and
    never the key; `fanout drain` finds it there; the file goes with the node."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if k != "FANOUT_API_KEY"}
    env.update(FANOUT_SECRET=SECRET, XDG_RUNTIME_DIR=str(runtime))
    proc = Proc([sys.executable, "-m", "fanout", "node", "--loop", node_loop, "--port", "0",
                 "--admin-port", "0"], "node", env=env, log_path=tmp_path / "node.log")
    try:
        admin_port = int(proc.wait_line(ADMIN_RE, 30).group(2))
        proc.wait_line(LISTEN_RE, 30)
        path = runtime / f"fanout-{admin_port}.key"
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == 0o600, oct(mode)
        key = path.read_text().strip()
        assert len(key) >= 32
        # stdout (the developer's terminal) shows it beside the listening lines
        assert proc.wait_line(r"fanout admin API key: (\S+)", 5).group(1) == key
        log = proc.log()
        assert key not in log and str(path) in log, log
        request = urllib.request.Request(f"http://127.0.0.1:{admin_port}/v1/rooms/x",
                                         headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
        drain = subprocess.run([sys.executable, "-m", "fanout", "drain", "--admin-port",
                                str(admin_port)], capture_output=True, text=True, timeout=30,
                               env=env)
        assert drain.returncode == 0, drain.stderr
        assert proc.wait(20) == 0
        assert not path.exists()
    finally:
        proc.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@uvloop_only
def test_a_generated_key_is_stable_on_a_fixed_admin_port(tmp_path, node_loop):
    """A developer's key stays the same from run to run on one admin port:
    the file outlives the node and the next node takes the key from it, but
    only from a file this user owns that nobody else can read."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if k != "FANOUT_API_KEY"}
    env.update(FANOUT_SECRET=SECRET, XDG_RUNTIME_DIR=str(runtime))
    admin_port = _free_port()
    path = runtime / f"fanout-{admin_port}.key"

    def run_once() -> str:
        proc = Proc([sys.executable, "-m", "fanout", "node", "--loop", node_loop,
                     "--port", "0", "--admin-port", admin_port], "node", env=env)
        try:
            key = proc.wait_line(r"fanout admin API key: (\S+)", 30).group(1)
            proc.wait_line(LISTEN_RE, 30)
            assert key not in proc.log()
            request = urllib.request.Request(f"http://127.0.0.1:{admin_port}/v1/rooms/x",
                                             headers={"Authorization": f"Bearer {key}"})
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 200
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
            return key
        finally:
            proc.stop()

    first = run_once()
    assert path.read_text().strip() == first
    assert run_once() == first
    path.chmod(0o644)                  # readable by others: not trusted, replaced
    third = run_once()
    assert third != first and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_read_key_trusts_only_a_private_regular_file(tmp_path):
    from fanout.server import keyfile

    good = tmp_path / "good"
    keyfile.write_key(str(good), "k" * 43)
    assert keyfile.read_key(str(good)) == "k" * 43
    link = tmp_path / "link"
    link.symlink_to(good)
    assert keyfile.read_key(str(link)) == ""
    short = tmp_path / "short"
    keyfile.write_key(str(short), "k" * 8)
    assert keyfile.read_key(str(short)) == ""
    assert keyfile.read_key(str(tmp_path / "missing")) == ""


def test_api_key_file_setting_and_a_planted_file(tmp_path):
    """The key file is written under a new name and renamed into place, so
    whatever was at the path (another user's file, a symlink) is replaced,
    never written through."""
    from fanout.server import keyfile

    target = tmp_path / "elsewhere"
    target.write_text("precious\n")
    link = tmp_path / "fanout.key"
    link.symlink_to(target)
    keyfile.write_key(str(link), "k" * 40)
    assert target.read_text() == "precious\n"
    assert not link.is_symlink() and link.read_text() == "k" * 40 + "\n"
    assert stat.S_IMODE(link.stat().st_mode) == 0o600
    with pytest.raises(config.ConfigError, match="cannot write"):
        keyfile.write_key(str(tmp_path / "missing-dir" / "k"), "k")
