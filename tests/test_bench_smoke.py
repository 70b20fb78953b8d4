"""Keeps bench/fanout_socketpairs.py from rotting: a tiny run must complete
and report every variant. It never asserts on speed (shared, noisy CI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "fanout_socketpairs.py"


@pytest.mark.timeout(60)
def test_fanout_socketpairs_bench_runs(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--members", "50", "--rounds", "5",
         "--repeat", "1", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    variants = result["variants"]
    assert {"engine", "naive", "c", "c_send"} <= variants.keys()
    for name, v in variants.items():
        assert v["writes_per_s"] > 0, name
        assert v["errors"] == 0, name
    assert variants["engine"]["failures"] == 0
    assert result["params"] == {"members": 50, "frame_bytes": 2048, "rounds": 5, "repeat": 1}
    assert set(result["ratios"]) == {"engine/c", "engine/c_send", "engine/naive"}


@pytest.mark.timeout(60)
def test_fanout_socketpairs_ws_kind_runs(tmp_path):
    """--ws: the engine with WebSocket members; the run itself checks that
    every member got the frame in exactly one binary message."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--members", "20", "--rounds", "3",
         "--repeat", "1", "--ws", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    ws = result["variants"]["engine_ws"]
    assert ws["writes_per_s"] > 0 and ws["failures"] == 0 and ws["errors"] == 0
    assert {"engine/engine_ws", "engine_ws/c_send"} <= set(result["ratios"])
