"""The JavaScript client SDK's tests (clients/js/test/, Node's test runner):
the wire vectors, the lz4 decoder, and end-to-end runs against real nodes
over WebSocket, which the JS tests start with this interpreter
(``python -m fanout node`` from the repository root, on node_loop)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
JS = ROOT / "clients" / "js"


def test_js_sdk(node_loop):
    node = shutil.which("node")
    assert node, "Node.js is not installed (the JS SDK tests need it)"
    assert (JS / "node_modules" / ".installed").exists(), \
        "clients/js/node_modules is missing: run `make js-deps` (make test does)"
    env = dict(os.environ, FANOUT_PYTHON=sys.executable, FANOUT_TEST_LOOP=node_loop)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    proc = subprocess.run([node, "--test", "clients/js/test/"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    summary = [line for line in proc.stdout.splitlines()
               if line.startswith(("not ok", "# pass", "# fail", "# cancelled"))]
    if proc.returncode != 0:
        pytest.fail("node --test clients/js/test/ failed:\n" + "\n".join(summary)
                    + "\n\n" + proc.stdout[-20000:] + proc.stderr[-5000:], pytrace=False)
    assert "# fail 0" in proc.stdout and "# pass " in proc.stdout, proc.stdout[-2000:]
