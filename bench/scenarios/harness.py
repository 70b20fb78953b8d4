"""What the scenarios run on: the repository's paths, the node under
measurement, child processes started from the repository root, C builds of
the peers, and the machine's description recorded with every result."""

from __future__ import annotations

import http.client
import os
import platform
import subprocess
import sys
from pathlib import Path

from fanout import _testbase

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".venv" / "bin"
PY = str(BIN / "python") if (BIN / "python").exists() else sys.executable
FANOUT = str(BIN / "fanout")
BUILD = ROOT / "build"
SECRET = "bench-secret-not-for-production-use-0123"
API_KEY = "bench-api-key-not-for-production-0123456789"


def build_c(name: str) -> Path:
    """Compile bench/peers/NAME.c into build/NAME when the source is newer."""
    src = ROOT / "bench" / "peers" / f"{name}.c"
    out = BUILD / name
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        BUILD.mkdir(exist_ok=True)
        subprocess.run(["cc", "-O2", "-Wall", "-o", str(out), str(src)], check=True)
    return out


class Proc(_testbase.Proc):
    """A child process run from the repository root, where
    ``python -m bench.peers.NAME`` finds the peers."""

    def __init__(self, argv: list, name: str, env: dict | None = None) -> None:
        super().__init__(argv, name, env=env, cwd=ROOT)


class Node(_testbase.NodeProcess):
    """A ``fanout node`` process on free ports, with ``settings`` as flags
    (``max_delay_ms=100`` -> ``--max-delay-ms 100``); ``command`` runs
    ``fanout`` some other way (the stall tracer)."""

    def __init__(self, command: list[str] | None = None, **settings) -> None:
        flags = ["--secret", SECRET, "--log-level", "WARNING"]
        for key, value in settings.items():
            flags += ["--" + key.replace("_", "-"), str(value)]
        super().__init__(flags, api_key=API_KEY, cwd=ROOT, command=command or [FANOUT])
        self.settings = settings

    def metrics_text(self) -> str:
        """The node's ``/metrics`` page."""
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=30)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        return text

    def labeled(self, name: str, text: str | None = None) -> dict[str, float]:
        """One metric's samples by their label text (``'{kind="chat"}'``),
        from ``text`` or a fresh scrape."""
        out = {}
        for line in (text if text is not None else self.metrics_text()).splitlines():
            if line.startswith(name + "{"):
                labels, _, value = line[len(name):].rpartition(" ")
                out[labels] = float(value)
        return out

    def metrics(self) -> dict[str, float]:
        """The node's Prometheus counters, summed over labels."""
        text = self.metrics_text()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{", 1)[0]
            label = name_labels[len(name):]
            if name == "fanout_batch_bytes_total":
                name += ":" + ("raw" if 'stage="raw"' in label else "compressed")
            try:
                out[name] = out.get(name, 0.0) + float(value)
            except ValueError:
                pass
        return out


def delta(after: dict, before: dict, key: str) -> float:
    """How much a counter of two ``Node.metrics()`` scrapes grew."""
    return after.get(key, 0.0) - before.get(key, 0.0)


def machine() -> dict:
    """The machine and the checkout a result is measured on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import uvloop
        uv = uvloop.__version__
    except ImportError:
        uv = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=ROOT).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, cwd=ROOT).stdout.strip())
    except OSError:
        commit, dirty = None, None
    import resource
    return {
        "cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
        "uvloop": uv, "kernel": platform.release(),
        "loadavg_at_start": os.getloadavg()[0],
        "open_file_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "commit": commit, "uncommitted_changes": dirty,
    }
