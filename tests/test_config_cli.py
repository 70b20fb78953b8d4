"""Configuration precedence and the fanout command line, against real nodes."""

from __future__ import annotations

import subprocess
import sys

import jwt
import pytest

from conftest import SECRET
from fanout.server import config


def test_precedence_file_env_flags(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text('[node]\nport = 7100\nmax_delay_ms = 20\nlog_level = "DEBUG"\n')
    cfg = config.load(str(path), env={"FANOUT_PORT": "7200", "FANOUT_RING_SIZE": "64"},
                      overrides={"port": 7300, "ring_size": None})
    assert (cfg.port, cfg.max_delay_ms, cfg.ring_size, cfg.log_level) == (7300, 20.0, 64, "DEBUG")
    assert config.load(str(path), env={}).port == 7100


@pytest.mark.parametrize("values,message", [
    ({"porty": 1}, "unknown setting 'porty'"),
    ({"port": "abc"}, "port must be int"),
    ({"ring_size": 0}, "ring_size must be >= 1"),
    ({"loop": "tokio"}, "loop must be"),
    ({"ping_interval_ms": 5000, "idle_timeout_ms": 4000}, "idle_timeout_ms must be longer"),
])
def test_bad_settings_are_named(values, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(None, env={}, overrides=values)


def test_bad_toml_is_reported(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("port = = 3")
    with pytest.raises(config.ConfigError, match="bad.toml"):
        config.load(str(path), env={})


def run_cli(*args, timeout=30, env=None):
    import os
    return subprocess.run([sys.executable, "-m", "fanout", *args], capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, "FANOUT_SECRET": SECRET, **(env or {})})


def listen(*args) -> subprocess.Popen:
    """``fanout listen ARGS`` in the background, its output piped (text)."""
    import os
    return subprocess.Popen([sys.executable, "-m", "fanout", "listen", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "FANOUT_SECRET": SECRET})


def rest(listener: subprocess.Popen, timeout: float = 20) -> tuple[str, str]:
    """The rest of a listener's output once it exits: (stdout, stderr). Read
    through the same file object as its readline()s: communicate() would read
    the pipe beneath it and miss what they buffered."""
    stdout = listener.stdout.read()
    listener.wait(timeout)
    return stdout, listener.stderr.read()


def test_token_command():
    out = run_cli("token", "--user", "u1", "--rooms", "a,b", "--ttl", "60")
    assert out.returncode == 0, out.stderr
    claims = jwt.decode(out.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "u1" and claims["rooms"] == ["a", "b"]


def test_node_refuses_bad_flag_value():
    out = run_cli("node", "--ring-size", "0")
    assert out.returncode == 2 and "ring_size must be >= 1" in out.stderr


def test_listen_and_say(node):
    listener = listen("lobby", "--port", str(node.port),
                      "--count", "2", "--user", "watcher")
    try:
        assert "joined lobby" in listener.stdout.readline()
        for text in ("hello there", "second"):
            out = run_cli("say", "lobby", text, "--port", str(node.port), "--user", "speaker")
            assert out.returncode == 0, out.stderr
            assert "sent to lobby as seq" in out.stdout
        stdout, stderr = listener.communicate(timeout=20)
    finally:
        listener.kill()
    assert listener.returncode == 0, stderr
    assert "speaker: hello there" in stdout and "speaker: second" in stdout


def test_say_reports_unreachable_node():
    out = run_cli("say", "lobby", "x", "--port", "1")
    assert out.returncode == 1 and "fanout say:" in out.stderr


def test_node_reports_a_taken_port(node):
    out = run_cli("node", "--port", str(node.port), "--admin-port", "0", timeout=30)
    assert out.returncode == 1
    assert "cannot serve on" in out.stderr and "Address already in use" in out.stderr


def test_node_runs_on_the_loop_it_is_given(node, node_loop):
    # The node logs its loop's module when it listens: uvloop, or asyncio.unix_events.
    assert f"(loop {node_loop}" in node.log()


def _publish(node, item: dict) -> None:
    import json
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{node.admin_port}/v1/publish", data=json.dumps(item).encode(),
        headers={"Authorization": f"Bearer {node.api_key}",
                 "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def test_listen_and_say_with_one_token_and_what_listen_shows(start_node):
    """One dev token for both: listen and say log in as different device
    classes, so neither kicks the other (DUPLICATE_LOGIN). listen shows each
    message's kind and priority, the online count, and a binary payload or
    a terminal escape safely; and which user it is, so that a push to that
    user is easy to send (and shows)."""
    import time
    node = start_node("--presence-interval-ms", "100")
    shared = run_cli("token", "--user", "alice").stdout.strip()
    listener = listen("lobby", "--port", str(node.port),
                      "--count", "5", "--token", shared)
    try:
        assert "joined lobby" in listener.stdout.readline()
        # Who it is, from the token: the user a push must name to show here.
        assert listener.stdout.readline() == (
            "-- as user alice (device class cli-listen): a push to user alice shows here "
            "as [@alice ...]\n")
        out = run_cli("say", "lobby", "hello", "--port", str(node.port), "--token", shared)
        assert out.returncode == 0, out.stderr
        _publish(node, {"room": "lobby", "kind": "gift", "priority": 5, "sender": "svc",
                        "payload_b64": "AP8Q"})              # 00 ff 10
        _publish(node, {"room": "lobby", "kind": "system", "payload": "\x1b[2Jboom"})
        _publish(node, {"user": "alice", "kind": "system", "sender": "host",
                        "payload": "to alice"})
        time.sleep(1.0)                   # a Presence frame or more, and the watcher's look
        out = run_cli("say", "lobby", "bye", "--port", str(node.port), "--token", shared,
                      "--device-class", "other")
        assert out.returncode == 0, out.stderr
        stdout, stderr = rest(listener)
    finally:
        listener.kill()
    assert listener.returncode == 0, stderr
    assert "DUPLICATE_LOGIN" not in stdout + stderr
    assert "#1 chat] alice: hello" in stdout, stdout
    assert "#2 gift p5] svc: <3 bytes> 00 ff 10" in stdout, stdout
    assert "#3 system] " in stdout and "'\\x1b[2Jboom'" in stdout and "\x1b" not in stdout
    assert "[@alice #1 system] host: to alice" in stdout, stdout
    assert "#4 chat] alice: bye" in stdout, stdout
    assert "-- [lobby] online: " in stdout, stdout


def test_listen_and_say_flags_have_help_and_defaults():
    for command in ("listen", "say", "token"):
        out = run_cli(command, "--help")
        assert out.returncode == 0
        for flag in ("--user", "--secret") + (("--port", "--device-class", "--token")
                                              if command != "token" else ("--ttl", "--rooms")):
            # the flag's entry under "options:", up to the next flag's
            entry = out.stdout.split("\n  " + flag + " ", 1)[1].split("\n  --", 1)[0]
            assert "default" in entry or "required" in entry, (command, flag, out.stdout)


def test_version_matches_the_project():
    import tomllib
    from pathlib import Path

    import fanout
    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert project["project"]["version"] == fanout.__version__
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"fanout {fanout.__version__}"


@pytest.mark.parametrize("args,env,words", [
    (("token", "--user", ""), {}, "fanout token: --user must not be empty"),
    (("token", "--user", "a", "--ttl", "0"), {}, "fanout token: --ttl must be more than 0"),
    (("token", "--user", "a", "--rooms", ","), {}, "fanout token: --rooms names no room"),
    (("say", "r", "x", "--user", ""), {}, "fanout say: --user must not be empty"),
    (("node",), {"FANOUT_PORT": "abc"}, "fanout node: environment: port must be int"),
    (("token", "--user", "a"), {"FANOUT_PORT": "abc", "FANOUT_ADMIN_PORT": "x"}, None),
    (("listen", "r"), {"FANOUT_PORT": "abc"}, "argument --port: not a port number: 'abc'"),
    (("load",), {"FANOUT_ADMIN_PORT": "x"}, "argument --admin-port: not a port number"),
    (("drain", "--admin-port", "70000"), {}, "not a port number (0..65535)"),
    (("cluster", "--nodes", "0"), {}, "fanout cluster: --nodes and --routers must be"),
    (("node", "--port", "99999"), {}, "fanout node: port must be <= 65535"),
    (("node", "--port", "0", "--admin-port", "70000"), {}, "admin_port must be <= 65535"),
    (("demo", "--http-port", "99999"), {}, "argument --http-port: not a port number"),
])
def test_bad_input_gets_one_line_not_a_traceback(args, env, words):
    out = run_cli(*args, env=env)
    assert "Traceback" not in out.stderr, out.stderr
    if words is None:                  # a bad variable another command reads is no error here
        assert out.returncode == 0, out.stderr
        return
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert words in out.stderr, out.stderr


def test_say_names_the_address_nothing_listens_on():
    out = run_cli("say", "lobby", "x", "--port", "1")
    assert out.returncode == 1
    assert "nothing listens on 127.0.0.1:1" in out.stderr, out.stderr


def test_listen_reports_a_reconnect_and_the_new_epoch(start_node):
    """A node restart on the same port: listen reconnects by itself, resumes,
    and says so, and says the room's epoch changed (a new node's seqs)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    first = start_node(port=port)
    listener = listen("lobby", "--port", str(port), "--count", "1")
    try:
        joined = listener.stdout.readline()
        assert "joined lobby" in joined
        first.stop()
        second = start_node(port=port)
        assert second.port == port
        # The drain's Kick spreads reconnects over drain_jitter_ms (5 s).
        lines = [listener.stdout.readline()]
        while not lines[-1].startswith("-- reconnected") and lines[-1]:
            lines.append(listener.stdout.readline())
        out = run_cli("say", "lobby", "after the restart", "--port", str(port))
        assert out.returncode == 0, out.stderr
        stdout, stderr = rest(listener, 30)
        lines += stdout.splitlines()
    finally:
        listener.kill()
    assert listener.returncode == 0, stderr
    assert any(line.startswith("-- reconnected and resumed (1 reconnect") for line in lines), lines
    old_epoch = joined.split("(epoch ")[1].rstrip(")\n")
    assert any(f"epoch changed: {old_epoch} -> " in line for line in lines), lines
    assert any("after the restart" in line for line in lines), lines


def test_events_says_it_waits_for_an_unreachable_nats():
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "fanout", "events", "--nats",
                             f"nats://127.0.0.1:{port}", "--count", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ))
    lines = []
    try:
        while len(lines) < 20 and "no NATS answers" not in "".join(lines):
            lines.append(proc.stderr.readline())   # other lines may come first (logging)
    finally:
        proc.kill()
        proc.wait(10)
    assert f"no NATS answers at nats://127.0.0.1:{port} yet; waiting" in "".join(lines), lines


def test_listen_shows_the_grant_and_the_heartbeat_search(start_node, tmp_path):
    """listen --network --heartbeat-file: the grant as the node gave it, and
    the search of that network stepping up while the room is quiet, kept in
    the file. Short heartbeats: the node's default 300 ms, and the network
    known from the file to hold 300 ms so far."""
    import json
    import re
    import time
    node = start_node("--presence-interval-ms", "0", "--ping-interval-ms", "300",
                      "--idle-timeout-ms", "900", "--ping-interval-min-ms", "100",
                      "--ping-interval-max-ms", "5000")
    beats = tmp_path / "heartbeat.json"
    beats.write_text(json.dumps({"wifi:test": {"interval_ms": 300, "good_ms": 300,
                                               "locked": False}}))
    listener = listen("lobby", "--port", str(node.port),
                      "--count", "1", "--network", "wifi:test", "--heartbeat-file", str(beats))
    try:
        assert "joined lobby" in listener.stdout.readline()
        time.sleep(3.0)                 # quiet: probes of 300 ms, three answered, a step
        out = run_cli("say", "lobby", "done", "--port", str(node.port))
        assert out.returncode == 0, out.stderr
        stdout, stderr = rest(listener)
    finally:
        listener.kill()
    assert listener.returncode == 0, stderr
    grant = re.search(r"-- heartbeat: the node wants a ping at least every ([\d.]+) s and cuts a "
                      r"connection silent for ([\d.]+) s \(a Hello may ask for 0.1 s to 5 s\)",
                      stdout)
    assert grant, stdout
    assert float(grant[2]) == 3 * float(grant[1])        # the node's ratio, 900 : 300
    assert ("-- heartbeat [wifi:test]: pinging every 0.3 s, searching: steps up after 3 "
            "answered probes") in stdout, stdout
    assert "-- heartbeat [wifi:test]: 0.3 s held; trying 0.45 s" in stdout, stdout
    saved = json.loads(beats.read_text())["wifi:test"]
    assert saved["interval_ms"] >= 450 and not saved["locked"]


def test_listen_says_when_a_dead_link_locks_the_heartbeat(capsys):
    """The lock (a dead link needs an impaired path: tests/test_weak_network.py
    runs one; here the tuner is told, and listen's status line follows)."""
    from fanout.cli import _Status
    from fanout.client import Client

    client = Client("127.0.0.1", 1, "t", network="cell:1", heartbeat_step_after=1)
    status = _Status(client, "r", "e")
    tuner = client.heartbeat
    tuner.granted(20_000, 5000, 300_000)
    status.report()
    tuner.probe_answered(20_000, 300_000)
    status.report()
    tuner.dead_link()
    status.report()
    status.report()                                      # said once
    assert capsys.readouterr().out.splitlines() == [
        "-- heartbeat [cell:1]: pinging every 20 s, searching: steps up after 1 answered probes",
        "-- heartbeat [cell:1]: 20 s held; trying 30 s",
        "-- heartbeat [cell:1]: dead link at 30 s; back to 20 s, locked"]


def test_the_readme_walkthrough_shows_what_it_says(node):
    """The README's quick start and its admin API examples, as a new user runs
    them: its listener (the user it names), its `say`, then every publish and
    push body it gives, with the key. The listener prints each, and the lines
    the README quotes; the push reaches it because it names the listener's
    user (a push to a made-up listen-PID user would show nothing)."""
    import json
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    room, user = re.search(r"\.venv/bin/fanout listen (\S+) --user (\S+)", readme).groups()
    said = re.search(r'\.venv/bin/fanout say (\S+) "([^"]+)"', readme)
    using = readme.split("## Using it", 1)[1].split("\n## ", 1)[0]
    bodies = [json.loads(b) for b in re.findall(r"-d '(\{.*?\})'", using)]
    assert said[1] == room and any(b.get("user") == user for b in bodies), bodies
    for curl in re.findall(r"curl [^\n]*", using):     # the 415 and $KEY of issue 12
        assert "Content-Type: application/json" in curl and "$FANOUT_API_KEY" in curl, curl
    quoted = re.findall(r"The listener(?:, \w+,)? prints `(\[[^`]+\][^`]*)`", using)
    assert len(quoted) == 2, quoted
    listener = listen(room, "--user", user, "--port",
                      str(node.port), "--count", str(1 + len(bodies)))
    try:
        assert f"joined {room}" in listener.stdout.readline()
        assert f"-- as user {user} " in listener.stdout.readline()
        out = run_cli("say", room, said[2], "--port", str(node.port))
        assert out.returncode == 0, out.stderr
        for body in bodies:
            _publish(node, body)
        stdout, stderr = rest(listener)
    finally:
        listener.kill()
    assert listener.returncode == 0, stderr
    assert re.search(rf"\[{room} #1 chat\] say-\d+: {said[2]}\n", stdout), stdout
    for line in quoted:               # '#N' in the README: whatever seq it got
        pattern = re.escape(line).replace("\\#N", "#\\d+").replace("\\ ", " ")
        assert re.search(pattern, stdout), (line, stdout)
