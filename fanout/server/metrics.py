"""Prometheus metrics of one node.

Counters the node bumps itself live here as prometheus-client objects in a
per-node registry (so several nodes in one process, as in tests, don't
collide). Figures that already exist elsewhere (connections, rooms, write
backlog, loop lag) are read at scrape time from the providers registered
with :meth:`NodeMetrics.add_gauges` (and counted elsewhere, with
:meth:`NodeMetrics.add_counters`), rather than pushed from the hot path.
Nothing here runs per recipient, and nothing here knows the node.
:func:`cluster_figures` reads a cluster node's bus and router client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from .. import _core
    from ..bus.nats import NatsBus
    from ..logic.remote import RouterLogic

#: ``provider() -> [(name, help, value), ...]``, called at scrape time.
GaugeProvider = Callable[[], Iterable[tuple[str, str, float]]]

BATCH_MESSAGE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
FLUSH_DELAY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
# Wider than the flush delay's: in a cluster it holds the router -> JetStream
# -> node trip (and clock skew between hosts).
DELIVERY_LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
                            5.0)
LOOP_LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class NodeMetrics:
    """All of a node's metrics, registered in :attr:`registry`."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.connections_accepted = Counter(
            "fanout_connections_accepted", "TCP connections accepted, every port", registry=r)
        self.websocket_upgrades = Counter(
            "fanout_websocket_upgrades", "WebSocket opening handshakes accepted", registry=r)
        self.connections_refused = Counter(
            "fanout_connections_refused", "Connections refused at accept, by reason",
            ["reason"], registry=r)
        self.messages_in = Counter(
            "fanout_messages_in", "Messages accepted for broadcast, by kind", ["kind"], registry=r)
        self.degraded = Counter(
            "fanout_degraded_messages", "Messages dropped by overload control, by kind",
            ["kind"], registry=r)
        self.deliveries = Counter(
            "fanout_deliveries", "Messages handed to member sockets (messages x members)",
            registry=r)
        self.frames_written = Counter(
            "fanout_frames_written", "Batch frames handed to member sockets", registry=r)
        self.batch_bytes = Counter(
            "fanout_batch_bytes", "Batch body bytes of the frames built, before and after "
            "lz4 (frame headers not counted: compressed / raw is the ratio)",
            ["stage"], registry=r)
        self.batch_messages = Histogram(
            "fanout_batch_messages", "Messages per flushed batch",
            buckets=BATCH_MESSAGE_BUCKETS, registry=r)
        self.flush_delay = Histogram(
            "fanout_flush_delay_seconds", "Time from a batch's first message reaching the "
            "room to its frame handed to every member socket, per frame (the node's part of "
            "delivery latency)", buckets=FLUSH_DELAY_BUCKETS, registry=r)
        self.loop_lag = Histogram(
            "fanout_event_loop_lag_seconds", "How late the event loop ran a timer",
            buckets=LOOP_LAG_BUCKETS, registry=r)
        self.slow_consumers = Counter(
            "fanout_slow_consumers", "Connections cut for a write backlog over its bound",
            registry=r)
        self.kicks = Counter(
            "fanout_kicks", "Connections closed by the node with a Kick, by reason",
            ["reason"], registry=r)
        self.protocol_errors = Counter(
            "fanout_protocol_errors", "Connections closed for bad input, by reason",
            ["reason"], registry=r)
        self.auth_failures = Counter(
            "fanout_auth_failures", "Refused Hello tokens, by reason", ["reason"], registry=r)
        self.rate_limited = Counter(
            "fanout_rate_limited_messages", "Chat refused by the per-user rate limit", registry=r)
        self.degradation_level = Gauge(
            "fanout_degradation_level", "0 normal, 1 degraded, 2 overloaded", registry=r)
        self.draining = Gauge("fanout_draining", "1 while the node drains", registry=r)
        # process_*: memory, open fds against the limit, CPU seconds, start
        # time (read from /proc at scrape time; nothing on Linux-less hosts).
        ProcessCollector(registry=r)
        # Labelled children looked up once: observe_flush runs per room flush.
        self._raw_bytes = self.batch_bytes.labels("raw")
        self._wire_bytes = self.batch_bytes.labels("compressed")
        self._providers: list[GaugeProvider] = []
        self._counters: list[GaugeProvider] = []
        r.register(_Provided(self._providers, GaugeMetricFamily))
        r.register(_Provided(self._counters, CounterMetricFamily))

    def track_delivery_latency(self, hub: "_core.Hub") -> None:
        """Export ``hub``'s end-to-end delivery latency histogram: counted
        by the hub in C, once per frame (a Python histogram would cost a
        call per frame), read at scrape time."""
        hub.track_latency(DELIVERY_LATENCY_BUCKETS)
        self.registry.register(_HubLatency(hub))

    def add_gauges(self, provider: GaugeProvider) -> None:
        """Export the gauges ``provider`` returns, read at every scrape."""
        self._providers.append(provider)

    def add_counters(self, provider: GaugeProvider) -> None:
        """Export counters kept elsewhere (``provider`` returns their totals
        under names without ``_total``, which the exposition adds)."""
        self._counters.append(provider)

    def observe_flush(self, messages: int, members: int, raw: int, wire: int,
                      delay: float) -> None:
        """Called by the hub once per room flush (never per recipient)."""
        self.batch_messages.observe(messages)
        self.flush_delay.observe(delay)
        self._raw_bytes.inc(raw)
        self._wire_bytes.inc(wire)
        if members:
            self.deliveries.inc(messages * members)
            self.frames_written.inc(members)


def cluster_figures(metrics: NodeMetrics, bus: "NatsBus", logic: "RouterLogic") -> None:
    """Export a cluster node's bus and router-client figures (counted by
    them once per message or call, read here at scrape time)."""

    def gauges():
        yield "fanout_bus_connected", "1 while the cluster bus (NATS) is connected", \
            float(bus.connected)
        yield "fanout_router_reachable", "1 while the routers answered the last call", \
            float(logic.reachable)

    def counters():
        yield ("fanout_bus_messages_received", "Room messages received from the bus "
               "(only rooms with members here: interest-based delivery)", bus.messages_received)
        yield ("fanout_bus_bytes_received", "Bytes of room messages received from the bus",
               bus.bytes_received)
        yield ("fanout_bus_holes_filled", "Missed room messages recovered from the history "
               "stream (one per hole)", bus.holes_filled)
        yield ("fanout_bus_holes_lost", "Holes the history stream could no longer fill "
               "(members got a Gap)", bus.holes_lost)
        yield ("fanout_router_unavailable", "Logic calls refused UNAVAILABLE (no router "
               "answered, or the bus was down)", logic.unavailable_calls)
    metrics.add_gauges(gauges)
    metrics.add_counters(counters)


class _Provided:
    """A prometheus collector over registered providers of one metric type."""

    def __init__(self, providers: list[GaugeProvider], family) -> None:
        self._providers = providers
        self._family = family

    def describe(self):
        return []

    def collect(self):
        for provider in self._providers:
            for name, doc, value in provider():
                yield self._family(name, doc, value=value)


class _HubLatency:
    """fanout_delivery_latency_seconds, from the hub's counts (Hub.track_latency)."""

    def __init__(self, hub: "_core.Hub") -> None:
        self._hub = hub

    def describe(self):
        return []

    def collect(self):
        bounds, counts, total = self._hub.latency_histogram()
        buckets = [(floatToGoString(b), c) for b, c in zip(bounds, counts)]
        buckets.append(("+Inf", counts[-1]))
        yield HistogramMetricFamily(
            "fanout_delivery_latency_seconds", "Time from a frame's oldest message's "
            "acceptance (its server_ts_ms: this node's logic, or the router in a cluster) to "
            "the frame handed to every member socket, per frame (end to end within the "
            "cluster; across hosts it includes their clocks' skew)",
            buckets=buckets, sum_value=total)
