"""Issue 8, "How it is shown": the fuzz harness (bench/fuzz.py) as a tool,
in a small run. It drives a real node process with stateful sessions and
malformed input over many connections, beside a pinging canary, and the
oracle must hold: 0 crashes, 0 hangs, 0 tracebacks, every close with a
defined reason, every canary ping answered. The full run (>= 1,000,000
inputs) is `python bench/fuzz.py --inputs 1000000`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fuzz_small_run_holds_the_oracle(tmp_path):
    out = tmp_path / "fuzz.json"
    proc = subprocess.run([sys.executable, "bench/fuzz.py", "--inputs", "20000", "--seed", "8",
                           "--concurrency", "48", "--json", str(out),
                           "--log", str(tmp_path / "node.log")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.exists(), proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["inputs"] >= 20000
    assert r["crashes"] == 0 and r["node_exit_status"] is not None
    assert r["hangs"] == 0, r["violation_examples"]
    assert r["tracebacks"] == 0 and r["internal_errors"] == 0, r["log_lines"]
    assert r["violations"] == {}, r["violation_examples"]
    assert r["bad_server_frames"] == 0
    assert r["canary"]["unanswered"] == 0 and r["canary"]["closed"] is None
    assert r["canary"]["count"] > 0
    # The run reached deep into sessions and through the malformed paths.
    assert r["closes"].get("answered", 0) > 0
    assert sum(n for k, n in r["closes"].items() if k != "answered") > 0
    assert r["ok"] is True and proc.returncode == 0
