"""Child processes: any command (``Proc``) and a ``fanout node`` (``NodeProcess``)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

LISTEN_RE = r"fanout node listening on (\S+):(\d+)"
ADMIN_RE = r"fanout admin API listening on (\S+):(\d+)"
WS_RE = r"fanout node WebSocket on ws://(\S+):(\d+)(/\S*)"
TLS_RE = r"fanout node TLS on (\S+):(\d+)"
WSS_RE = r"fanout node WebSocket over TLS on wss://(\S+):(\d+)(/\S*)"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (from /proc);
    NaN once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError):
        return float("nan")


def children(pid: int) -> list[int]:
    """The pids of process ``pid``'s children (from /proc)."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class Proc:
    """A child process whose stdout lines a thread collects (``wait_line``)
    and whose stderr goes to a log file: ``log_path``, kept after the process
    ends (for a failed test's report), or an unnamed one that ``stop`` drops.

    stderr is a file the child writes itself rather than a pipe read by a
    thread, so ``log()`` already holds every line the process has written
    when a test asserts on it right after the event that logs it.
    """

    def __init__(self, argv: list, name: str, *, env: dict | None = None,
                 cwd: str | Path | None = None, log_path: Path | None = None) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = log_path
        self._err = open(log_path, "ab") if log_path is not None else tempfile.TemporaryFile()
        self.lines: list[str] = []
        self._cv = threading.Condition()
        self.popen = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=self._err,
                                      text=True, cwd=cwd, env=env)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.popen.stdout:
            with self._cv:
                self.lines.append(line.rstrip("\n"))
                self._cv.notify_all()

    def wait_line(self, pattern: str, timeout: float) -> re.Match:
        """The first stdout line so far or within ``timeout`` s that matches."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cv:
            while True:
                for line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or self.popen.poll() is not None and seen == len(self.lines):
                    tail = "\n".join(self.log().splitlines()[-20:])
                    raise RuntimeError(f"{self.name}: no line matching {pattern!r} "
                                       f"(exit {self.popen.poll()}); stderr:\n{tail}")
                self._cv.wait(min(left, 0.2))

    def json_line(self, timeout: float) -> dict:
        return json.loads(self.wait_line(r"^\{.*\}$", timeout).group(0))

    def log(self) -> str:
        """What the process wrote to stderr so far."""
        if self.log_path is not None:
            return Path(self.log_path).read_text(errors="replace")
        if self._err.closed:
            return ""
        # pread leaves the file offset alone: the child shares it and appends there.
        fd = self._err.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def send_signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu(self) -> float:
        """User + system CPU seconds so far (from /proc)."""
        return cpu_seconds(self.pid)

    def rss_kib(self) -> int:
        """Resident set (VmRSS), KiB: the process's user-space memory."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError(f"{self.name}: no VmRSS (exited?)")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send ``sig`` (SIGKILL after ``timeout`` s); the exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._err.close()
        return self.popen.returncode


class NodeProcess:
    """A ``fanout node`` process, started on ``port`` (0: a free one) with its
    admin API on a free port; returns once both listen. ``command`` runs
    ``fanout``: this interpreter's ``-m fanout`` unless a script is named.
    """

    def __init__(self, flags: list[str], *, api_key: str, port: int = 0,
                 env: dict | None = None, cwd: str | Path | None = None,
                 log_path: Path | None = None, command: list[str] | None = None,
                 timeout: float = 30.0) -> None:
        if "--ws-port" not in flags:
            # a free one: a node restarted on its old client port must not
            # need its old WebSocket port (port + 2) too
            flags = ["--ws-port", "0", *flags]
        argv = [*(command or [sys.executable, "-m", "fanout"]), "node", "--port", str(port),
                "--admin-port", "0", "--api-key", api_key, *flags]
        self.api_key = api_key
        self.command = shlex.join(argv)
        self.proc = Proc(argv, "node", env=env, cwd=cwd, log_path=log_path)
        try:
            self.admin_port = int(self.proc.wait_line(ADMIN_RE, timeout).group(2))
            m = self.proc.wait_line(LISTEN_RE, timeout)
        except RuntimeError:
            self.proc.stop()
            raise
        self.host, self.port = m.group(1), int(m.group(2))
        # printed before the "listening" line, when the WebSocket port is on
        ws = next(filter(None, (re.search(WS_RE, line) for line in self.proc.lines)), None)
        self.ws_port = int(ws.group(2)) if ws else None
        self.ws_path = ws.group(3) if ws else None
        tls = next(filter(None, (re.search(TLS_RE, line) for line in self.proc.lines)), None)
        self.tls_port = int(tls.group(2)) if tls else None
        wss = next(filter(None, (re.search(WSS_RE, line) for line in self.proc.lines)), None)
        self.wss_port = int(wss.group(2)) if wss else None

    @property
    def log_path(self) -> Path | None:
        return self.proc.log_path

    def log(self) -> str:
        return self.proc.log()

    def rss_kib(self) -> int:
        return self.proc.rss_kib()

    def alive(self) -> bool:
        return self.proc.alive()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        return self.proc.stop(sig, timeout)
