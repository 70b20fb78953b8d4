"""The deployment kit: `fanout config --sample`, deploy/fanout.service and
deploy/Dockerfile, checked against the command line they drive."""

from __future__ import annotations

import configparser
import dataclasses
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from fanout._testbase.process import WS_RE
from fanout.cli import build_parser
from fanout.server import config
from fanout.server.configsample import SECRETS

ROOT = Path(__file__).resolve().parent.parent
SETTING = re.compile(r"^# ([a-z_0-9]+) = (.*)$")


def _sample(tmp_path: Path) -> Path:
    path = tmp_path / "node.toml"
    out = subprocess.run([sys.executable, "-m", "fanout", "config", "--sample", "-o", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert f"fanout node --config {path}" in out.stdout
    return path


def test_sample_lists_every_setting_and_loads_as_the_defaults(tmp_path):
    path = _sample(tmp_path)
    text = path.read_text()
    names = {f.name for f in dataclasses.fields(config.NodeConfig)}
    listed = {m.group(1) for line in text.splitlines() if (m := SETTING.match(line))}
    assert listed == names - set(SECRETS)
    for name in SECRETS:
        assert f"FANOUT_{name.upper()}" in text
    # As written (all commented) and with every setting uncommented, it loads
    # to the defaults: each default is written as valid TOML of its type.
    assert config.load(str(path), env={}) == config.NodeConfig()
    opened = tmp_path / "all.toml"
    opened.write_text("\n".join(
        f"{m.group(1)} = {m.group(2)}" if (m := SETTING.match(line)) and m.group(1) in names
        else line for line in text.splitlines()))
    assert config.load(str(opened), env={}) == config.NodeConfig()
    # Never over an existing file.
    again = subprocess.run([sys.executable, "-m", "fanout", "config", "--sample", "-o",
                            str(path)], capture_output=True, text=True, timeout=30)
    assert again.returncode == 1 and "cannot write" in again.stderr


def test_a_node_starts_with_the_sample(tmp_path, start_node):
    path = _sample(tmp_path)
    text = path.read_text().replace('# ws_path = "/ws"', 'ws_path = "/from-the-file"', 1)
    assert "from-the-file" in text
    path.write_text(text)
    node = start_node("--config", str(path))
    # the file's setting took effect
    assert node.proc.wait_line(WS_RE, 10).group(3) == "/from-the-file"


def _command(argv: list[str]) -> tuple[str, ...]:
    assert Path(argv[0]).name == "fanout", argv
    args = build_parser().parse_args(argv[1:])
    return args.command, args.config


def test_systemd_unit_runs_a_node_with_the_sample_config():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(ROOT / "deploy" / "fanout.service")
    service = unit["Service"]
    assert _command(shlex.split(service["ExecStart"])) == ("node", "/etc/fanout/node.toml")
    assert service["KillSignal"] == "SIGTERM"                 # the node's drain
    grace = config.NodeConfig().drain_grace_ms / 1000
    assert float(service["TimeoutStopSec"]) > grace
    assert service["User"] != "root" and "EnvironmentFile" in service
    text = (ROOT / "deploy" / "fanout.service").read_text()
    assert "fanout config --sample -o /etc/fanout/node.toml" in text


def test_dockerfile_runs_a_node_with_the_sample_config():
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert _command(cmd) == ("node", "/etc/fanout/node.toml")
    assert "fanout config --sample -o /etc/fanout/node.toml" in text
    assert re.search(r"^USER fanout$", text, re.M)
    # Off loopback the node needs both secrets from the environment.
    assert "FANOUT_HOST=0.0.0.0" in text and "FANOUT_SECRET" in text and "FANOUT_API_KEY" in text
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and "**/*.so" in ignore
