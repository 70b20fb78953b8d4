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


def test_token_command():
    out = run_cli("token", "--user", "u1", "--rooms", "a,b", "--ttl", "60")
    assert out.returncode == 0, out.stderr
    claims = jwt.decode(out.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "u1" and claims["rooms"] == ["a", "b"]


def test_node_refuses_bad_flag_value():
    out = run_cli("node", "--ring-size", "0")
    assert out.returncode == 2 and "ring_size must be >= 1" in out.stderr


def test_listen_and_say(node):
    import os
    listener = subprocess.Popen(
        [sys.executable, "-m", "fanout", "listen", "lobby", "--port", str(node.port),
         "--count", "2", "--user", "watcher"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "FANOUT_SECRET": SECRET})
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
