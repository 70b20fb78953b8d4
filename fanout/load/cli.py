"""The command and the run: :func:`config_from_args` and :func:`main` for
``fanout load``, and :func:`run`, which carries a run through its phases
(start the workers; connect and join; publish through the warm-up and the
measured window; drain) and hands the collected numbers to the report.
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
import time

from .config import LoadConfig, LoadError, numeric_host, plan
from .fleet import Fleet
from .publisher import Publisher
from .report import Progress, build_result, cpu_self, merge, proc_cpu, summary
from .verify import error_counts

__all__ = ["config_from_args", "main", "run"]


def run(cfg: LoadConfig) -> dict:
    """Carry out one load run and return its result (the JSON document).

    Rates are over the measured window (``duration_s``, after the warm-up);
    totals cover the whole run including the drain. Main keys:

    * ``ok``: no gap, reorder or divergence, every viewer joined, and (when
      publishing) ``deliveries >= expected_deliveries``;
    * ``published``: ``offered``, ``accepted``, ``accepted_per_s``,
      ``by_kind``, ``rejected`` (by reason), ``request_ms_mean``;
    * ``deliveries`` (messages received by all viewers), ``expected_deliveries``
      (accepted messages x live members, per room), ``deliveries_per_s``,
      ``frames_per_s`` (all frames), ``batch_frames_per_s``,
      ``messages_per_batch``, ``wire_bytes_per_s``, ``wire_bytes_per_msg``
      (frame bytes read, control frames included, TCP/IP headers not);
    * ``latency_ms``: ``p50``, ``p99``, ``p999``, ``max``, ``mean``,
      ``samples`` and ``histogram`` (``[value_ns, count]`` pairs), publish
      (publisher's clock, just before the HTTP request) to receive;
    * ``gaps``, ``missing_messages``, ``reorders``, ``divergences``,
      ``node_gaps`` (Gap frames), ``slow_consumer_cuts``, ``errors``
      (``"kick:REASON"``, ``"error:REASON"``, ``"connect:ERRNO"``, ``"eof"``
      ... with counts, retried refusals included), ``ended`` (how viewers that
      ended did);
    * ``connect``: ``connects_per_s``, ``time_to_all_joined_s``, ``joined``,
      ``failed``, ``retries``;
    * ``cpu``: ``loadgen_s`` (workers + driver), ``workers_window_cores`` (and
      user/sys split), ``publisher_s``, ``node_s`` and ``node_window_cores``
      (with ``node_pid``);
    * ``check``: the method (:data:`~fanout.load.verify.CHECK_METHOD`) and its counts
      (``verified_viewers``, ``unverified_viewers``, ``cut_viewers``, ...);
    * ``config``, ``viewers``, ``viewers_joined``, ``processes``,
      ``decoded_viewers``, ``drain``, ``workers``, ``node_at_window_end``
      (the node's ``/readyz``: its degradation level), ``node_loop_lag``
      (the node's event-loop lag over the window, :func:`lag_window`).

    :raises LoadError: a worker failed, or no viewer could join.
    :raises ValueError: a bad configuration.
    """
    cfg.validate()
    host = numeric_host(cfg.host, cfg.port)
    admin_host = cfg.admin_host or cfg.host
    found = preflight(cfg, host, admin_host)
    if cfg.progress:
        print(f"fanout load: {found}", file=sys.stderr, flush=True)
    specs = plan(cfg, host)
    fleet = Fleet(specs)
    progress = Progress(cfg)
    publisher: Publisher | None = None
    driver_cpu0 = cpu_self()
    try:
        progress.update("starting workers", {})
        fleet.start()
        node_cpu_start = proc_cpu(cfg.node_pid)

        # ---- connect and join
        progress.update("connecting", {})
        t_connect = time.monotonic()
        fleet.send_all("start")
        deadline = t_connect + cfg.join_timeout
        while True:
            fleet.pump(0.1)
            merged = merge(fleet.latest)
            progress.update(None, merged)
            settled = all(s is not None and s["joined"] + s["connect_failed"] >= s["viewers"]
                          for s in fleet.latest)
            if settled or time.monotonic() > deadline:
                break
        joined_snap = merge(fleet.request("snap"))
        if joined_snap["joined"] == 0:
            raise LoadError(f"no viewer joined: {error_counts(joined_snap) or 'no errors seen'}")

        # ---- publish: warm-up, then the measured window
        length = cfg.warmup + cfg.duration
        if cfg.rate > 0:
            publisher = Publisher(cfg, admin_host, length)
            progress.publisher = publisher
            publisher.start()
        t_pub = time.monotonic()
        progress.ends_at = t_pub + length
        progress.update("warm-up" if cfg.warmup else "measuring", joined_snap)
        _wait(fleet, progress, t_pub + cfg.warmup, publisher)
        fleet.send_all("reset_latency")
        win_a = merge(fleet.request("snap"))
        node_a = proc_cpu(cfg.node_pid)
        lag_a = _node_lag(admin_host, cfg.admin_port) if cfg.admin_port else None
        pub_a = publisher.accepted if publisher else 0
        progress.update("measuring", win_a)
        _wait(fleet, progress, t_pub + length, publisher)
        if publisher is not None:
            publisher.stop()
            publisher.join(15)
        win_b = merge(fleet.request("snap"))
        node_b = proc_cpu(cfg.node_pid)
        node_state = _node_state(admin_host, cfg.admin_port) if cfg.rate > 0 else None
        lag_b = _node_lag(admin_host, cfg.admin_port) if lag_a else None
        pub_b = publisher.accepted if publisher else 0
        if publisher is not None and publisher.error:
            raise LoadError(f"publisher failed: {publisher.error}")

        # ---- drain: every accepted message to every live viewer
        progress.update("draining", win_b)
        drained = _drain(fleet, progress, cfg, publisher)
        finals = fleet.request("final")
        node_cpu_end = proc_cpu(cfg.node_pid)
    finally:
        progress.close()
        if publisher is not None and publisher.is_alive():
            publisher.stop()
            publisher.join(5)
        fleet.stop()
    result = build_result(cfg, specs, finals, joined_snap, win_a, win_b, pub_a, pub_b,
                          publisher, drained, driver_cpu0,
                          (node_cpu_start, node_a, node_b, node_cpu_end))
    result["node_at_window_end"] = node_state
    result["node_loop_lag"] = lag_window(lag_a, lag_b) if lag_a and lag_b else None
    return result


#: How long the reachability checks wait for an answer, seconds.
PREFLIGHT_TIMEOUT = 3.0


def preflight(cfg: LoadConfig, host: str, admin_host: str) -> str:
    """Check, before starting any worker, that a node takes connections on
    the client port and (when publishing) that its admin API answers and
    takes the key; a viewer fleet would otherwise retry a closed port with
    backoff for half a minute. Returns what it found, as one line.

    :raises LoadError: saying what was found instead.
    """
    where = f"{host}:{cfg.port}"
    try:
        socket.create_connection((host, cfg.port), timeout=PREFLIGHT_TIMEOUT).close()
    except ConnectionRefusedError:
        raise LoadError(f"nothing listens on {where} (connection refused): start a node "
                        "(`fanout node`) or give its --host and --port") from None
    except TimeoutError:
        raise LoadError(f"{where} did not answer within {PREFLIGHT_TIMEOUT:g} s "
                        "(a firewall, or a wrong address?)") from None
    except OSError as exc:
        raise LoadError(f"cannot connect to {where}: {exc.strerror or exc}") from None
    found = f"a node takes connections on {where}"
    if cfg.rate <= 0:
        return found
    admin = f"{admin_host}:{cfg.admin_port}"
    conn = http.client.HTTPConnection(admin_host, cfg.admin_port, timeout=PREFLIGHT_TIMEOUT)
    try:
        # An empty batch: refused as 400 with a good key, 401 with a bad one.
        conn.request("POST", "/v1/publish", body=b'{"messages": []}',
                     headers={"Authorization": f"Bearer {cfg.api_key}",
                              "Content-Type": "application/json"})
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        raise LoadError(f"{found}, but its admin API at {admin} cannot be reached "
                        f"({getattr(exc, 'strerror', None) or exc}): give --admin-port "
                        "(and --admin-host)") from None
    finally:
        conn.close()
    if status in (401, 403):
        raise LoadError(f"{found}; its admin API at {admin} refuses the API key "
                        f"(HTTP {status}): give the node's key with --api-key")
    if status != 400:
        raise LoadError(f"{found}; {admin} answered HTTP {status} to a publish, not like a "
                        "fanout admin API")
    return f"{found}; its admin API at {admin} takes the key"


_LAG_BUCKET = "fanout_event_loop_lag_seconds_bucket{le=\""


def _node_lag(host: str, port: int) -> dict[float, float] | None:
    """The node's event-loop lag histogram (``/metrics``): cumulative
    sample counts by upper bound in seconds, or None."""
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    except (OSError, UnicodeDecodeError, http.client.HTTPException):
        return None
    finally:
        conn.close()
    out = {}
    for line in text.splitlines():
        if line.startswith(_LAG_BUCKET):
            bound, _, value = line[len(_LAG_BUCKET):].partition("\"} ")
            out[float(bound)] = float(value)
    return out or None


def lag_window(a: dict[float, float], b: dict[float, float]) -> dict:
    """The node's loop lag over the measuring window, from two histogram
    scrapes: samples, the share at or under each bound, and the p99 as the
    smallest bound that holds 99% of the samples (the histogram's
    resolution: 1, 2, 5, 10 ... ms)."""
    bounds = sorted(b)
    counts = {k: b[k] - a.get(k, 0.0) for k in bounds}
    total = counts[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return {"samples": 0}
    p99 = next((k for k in bounds if counts[k] >= 0.99 * total), float("inf"))
    return {"samples": int(total),
            "p99_at_most_ms": p99 * 1000 if p99 != float("inf") else None,
            "share_at_most_ms": {f"{k * 1000:g}": round(counts[k] / total, 4)
                                 for k in bounds if k != float("inf")}}


def _node_state(host: str, port: int) -> dict | None:
    """The node's ``/readyz`` answer (degradation level), or None."""
    conn = http.client.HTTPConnection(host, port, timeout=2)
    try:
        conn.request("GET", "/readyz")
        return json.loads(conn.getresponse().read())
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def _wait(fleet: Fleet, progress: Progress, until: float, publisher) -> None:
    while True:
        left = until - time.monotonic()
        if left <= 0:
            return
        fleet.pump(min(left, 0.1))
        progress.update(None, merge(fleet.latest))
        if publisher is not None and publisher.error:
            return


def _drain(fleet: Fleet, progress: Progress, cfg: LoadConfig, publisher) -> dict:
    """Wait until the viewers have everything (or nothing moves for a second)."""
    t0 = time.monotonic()
    last_change, last_value = t0, None
    while True:
        fleet.pump(0.1)
        merged = merge(fleet.latest)
        progress.update(None, merged)
        now = time.monotonic()
        # Batch frames only: Pongs and Presence keep coming while idle.
        value = (merged.get("deliveries", 0), merged.get("batch_frames", 0))
        if value != last_value:
            last_value, last_change = value, now
        caught_up = publisher is None or (
            merged.get("unresolved_frames", 1) == 0 and now - last_change >= 0.3
            and merged.get("batch_frames", 0) > 0)
        if caught_up or now - last_change >= 1.0 or now - t0 >= cfg.drain_timeout:
            return {"seconds": round(now - t0, 3), "complete": bool(caught_up)}


def config_from_args(args) -> LoadConfig:
    """The :class:`LoadConfig` of parsed ``fanout load`` arguments."""
    return LoadConfig(
        host=args.host, port=args.port, admin_host=args.admin_host or "",
        admin_port=args.admin_port, api_key=args.api_key, secret=args.secret,
        viewers=args.viewers, rooms=args.rooms, rate=args.rate, gift_share=args.gift_share,
        payload_bytes=args.payload_bytes, duration=args.duration, warmup=args.warmup,
        processes=args.processes, decode_every=args.decode_every,
        latency_every=args.latency_every, seed=args.seed, node_pid=args.node_pid,
        connect_window=args.connect_window, read_interval=args.read_interval_ms / 1000,
        max_retries=args.max_retries, tick=args.publish_tick_ms / 1000,
        source_addrs=args.source_addrs,
        room_prefix=args.room_prefix, progress=not args.no_progress,
        transport=args.transport, ws_path=args.ws_path, tls_ca=args.tls_ca,
        tls_server_name=args.tls_server_name)


def main(args) -> int:
    """``fanout load``: run, print a summary, write the JSON result; the exit
    code is 0 when the run passed, 3 when it did not, 1 when it could not be
    carried out and 2 for a bad configuration."""
    try:
        cfg = config_from_args(args).validate()
    except ValueError as exc:
        print(f"fanout load: {exc}", file=sys.stderr)
        return 2
    try:
        result = run(cfg)
    except LoadError as exc:
        print(f"fanout load: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=2, ensure_ascii=False)
    if args.json == "-":
        print(text)
    else:
        print(summary(result))
        if args.json:
            with open(args.json, "w") as fh:
                fh.write(text + "\n")
    return 0 if result["ok"] else 3
