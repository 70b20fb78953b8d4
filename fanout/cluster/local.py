"""``fanout cluster``: a whole cluster on this machine, for trying it by
hand: a nats-server with JetStream, a router and N nodes on consecutive
ports. It prints their addresses; Ctrl-C stops them all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

from .natsproc import NatsServer


def _spawn(args: list[str], log_path: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fanout", *args],
                            stdout=open(log_path, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_line(path: str, needle: str, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path, "r", errors="replace") as fh:
                if needle in fh.read():
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}; see {path}")
        time.sleep(0.05)
    raise RuntimeError(f"no {needle!r} in {path} after {timeout:g} s")


def run(*, nodes: int, base_port: int, routers: int, nats_port: int, loop: str) -> int:
    workdir = tempfile.mkdtemp(prefix="fanout-cluster-")
    nats = NatsServer(port=nats_port or 0, store_dir=os.path.join(workdir, "jetstream"),
                      log_file=os.path.join(workdir, "nats.log"))
    os.makedirs(nats.store_dir, exist_ok=True)
    procs: list[subprocess.Popen] = []
    try:
        nats.start()
        print(f"nats      {nats.url}  (monitoring http://127.0.0.1:{nats.monitor_port})",
              flush=True)
        for i in range(routers):
            log = os.path.join(workdir, f"router-{i}.log")
            proc = _spawn(["router", "--nats", nats.url, "--loop", loop,
                           "--router-id", f"router-{i}"], log)
            procs.append(proc)
            _wait_line(log, "fanout router", proc)
            print(f"router    router-{i}  (log {log})", flush=True)
        for i in range(nodes):
            port, admin, ws = base_port + 3 * i, base_port + 3 * i + 1, base_port + 3 * i + 2
            log = os.path.join(workdir, f"node-{i}.log")
            proc = _spawn(["node", "--nats", nats.url, "--port", str(port),
                           "--admin-port", str(admin), "--ws-port", str(ws),
                           "--node-id", f"node-{i}",
                           "--loop", loop], log)
            procs.append(proc)
            _wait_line(log, "fanout node listening", proc)
            print(f"node      node-{i}  clients 127.0.0.1:{port}  admin 127.0.0.1:{admin}  "
                  f"ws://127.0.0.1:{ws}/ws  "
                  f"(log {log})", flush=True)
        print(f"logs and JetStream data in {workdir}; Ctrl-C stops everything", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
        # Ctrl-C stops everything even when SIGINT came in ignored (a shell
        # starts background jobs that way, and Python then keeps it ignored).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        while True:
            for proc in procs:
                if proc.poll() is not None:
                    print(f"a process exited with {proc.returncode}; stopping the cluster",
                          file=sys.stderr)
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:
        print(f"fanout cluster: {exc}", file=sys.stderr)
        return 1
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        nats.stop()
