"""`fanout demo` for the tests: a process on fixed loopback ports (so a
restart comes back where its clients left it), publishing through its
admin API, and a proxy in front of its WebSocket port that can cut every
connection."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import API_KEY, SECRET
from fanout._testbase import Proc

ROOM = "lobby"
# A restart drains: the page is told to come back within the jitter, and the
# drain does not wait long for it to leave.
DEMO_ENV = {"FANOUT_SECRET": SECRET, "FANOUT_DRAIN_JITTER_MS": "200",
            "FANOUT_DRAIN_GRACE_MS": "2000", "FANOUT_PRESENCE_INTERVAL_MS": "500"}
WAIT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Demo:
    """A `fanout demo` process on fixed loopback ports, so that a restart
    comes back where the page left it."""

    def __init__(self, tmp_path: Path, loop: str, *extra: str) -> None:
        self.http_port, self.port, self.ws_port, self.admin_port = (free_port() for _ in range(4))
        self.argv = [sys.executable, "-m", "fanout", "demo", "--loop", loop,
                     "--http-port", self.http_port, "--port", self.port,
                     "--ws-port", self.ws_port, "--admin-port", self.admin_port,
                     "--api-key", API_KEY, "--log-level", "INFO", *extra]
        self.tmp_path = tmp_path
        self.proc: Proc | None = None
        self.starts = 0
        self.start()

    def start(self) -> None:
        self.starts += 1
        self.proc = Proc(self.argv, "demo", env={**os.environ, **DEMO_ENV},
                         log_path=self.tmp_path / f"demo-{self.starts}.log")
        self.url = self.proc.wait_line(r"fanout demo: open (http://\S+)", WAIT).group(1)

    def stop(self) -> int:
        return self.proc.stop(signal.SIGTERM, timeout=15)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/ws"

    def publish(self, kind: str, payload: str, sender: str = "tester") -> int:
        return self._publish({"room": ROOM, "kind": kind, "payload": payload, "sender": sender})

    def push(self, user: str, payload: str, kind: str = "system", sender: str = "tester") -> int:
        """A push to ``user``'s channel; its seq there."""
        return self._publish({"user": user, "kind": kind, "payload": payload, "sender": sender})

    def _publish(self, message: dict) -> int:
        body = json.dumps(message).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.admin_port}/v1/publish", data=body, method="POST",
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())["seq"]

    def gift(self, body, tok: str | None = None) -> tuple[int, dict]:
        """POST /gift as the page does (``body``: JSON-able, or raw bytes);
        the status and the JSON reply, an error's too."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if tok is not None:
            headers["Authorization"] = f"Bearer {tok}"
        request = urllib.request.Request(self.url + "gift", data=data, method="POST",
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read())

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:]
                         for p in sorted(self.tmp_path.glob("demo-*.log")))


class CutProxy:
    """A TCP proxy on 127.0.0.1 in front of the node's WebSocket port whose
    connections the test can cut: ``cut()`` resets every connection and
    refuses new ones until ``restore()``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.accepted = 0
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self.accepted += 1
                self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def cut(self) -> None:
        # shutdown first: a close alone leaves the thread blocked in accept()
        # holding the socket, which would go on accepting.
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            # Linger 0: a reset, as when a network path dies; SHUT_RD wakes
            # the pump blocked in recv(), which holds the socket open.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            try:
                s.shutdown(socket.SHUT_RD)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.cut()


@pytest.fixture
def start_demo(tmp_path, node_loop, request):
    demos: list[Demo] = []

    def start(*extra: str) -> Demo:
        demo = Demo(tmp_path, node_loop, *extra)
        demos.append(demo)
        return demo

    yield start
    for demo in demos:
        demo.stop()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for demo in demos:
            sys.stderr.write(f"--- demo log ---\n{demo.log()}\n")
