"""What tests read from a node's admin port: one metric, readiness."""

from __future__ import annotations

import urllib.error
import urllib.request


def metric(node, name: str) -> float:
    """The first sample of metric ``name`` in the node's ``/metrics``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{node.admin_port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")


def ready_status(node) -> int:
    """The HTTP status of ``/readyz``: 200 ready, 503 not."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.admin_port}/readyz",
                                    timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
