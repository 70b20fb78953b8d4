"""The load generator: ``fanout load``.

Drives a node the way a live room does: thousands of viewers that
authenticate, join and read exactly like real clients, and a publisher that
pushes chat and gifts through the admin API at a fixed rate. It checks what
every viewer received and reports deliveries/s, frames/s, bytes on the wire
per delivered message, publish-to-receive latency, gaps, reorders,
divergences and slow-consumer cuts, as a live terminal view and a JSON result.

Processes:

* **viewer workers** (:mod:`.fleet`): the viewers are spread over worker
  processes (spawned with :mod:`multiprocessing`), at most
  :data:`~.config.MAX_PER_PROCESS` each because a process can hold only about
  19.9k sockets here. Each worker runs one :class:`fanout._loadgen.Viewers`:
  raw sockets and one epoll loop in C (``fanout/_loadgen.pxd`` describes the
  data flow and the checking method);
* **the driver** (the process that calls :func:`run`): plans the run
  (:mod:`.config`), shows progress and builds the result (:mod:`.report`,
  checked by :mod:`.verify`); the **publisher** (:mod:`.publisher`) is a
  thread of it that POSTs protobuf batches to ``/v1/publish``. Every payload
  starts with the 8-byte little-endian ``CLOCK_REALTIME`` ns timestamp taken
  just before its request is sent (:func:`fanout.load.corpus.stamp`), followed
  by corpus text (:mod:`fanout.load.corpus`).

Phases (:func:`run`, in :mod:`.cli`): connect and join every viewer
(``time_to_all_joined_s``); publish for ``warmup + duration`` seconds,
measuring only after the warm-up; then drain, waiting until every accepted
message has reached every live viewer (or ``drain_timeout``), and verify
every viewer's stream.

Use it from Python with :func:`run`::

    from fanout.load import LoadConfig, run
    result = run(LoadConfig(port=7000, admin_port=7001, api_key="k",
                            viewers=1000, rate=2000, duration=10))
    print(result["deliveries_per_s"], result["latency_ms"]["p99"])
"""

from .cli import run
from .config import LoadConfig, LoadError, plan
from .fleet import build_viewers

__all__ = ["LoadConfig", "LoadError", "run", "plan", "build_viewers"]
