"""Prometheus metrics of one server, in its own ``CollectorRegistry`` (never the global one, so
several servers in one process, as in tests, keep separate counts).

Exposition follows the Prometheus text format 0.0.4 through ``prometheus_client``. Request
metrics are updated by the engine as events happen; the per-expert series (utilisation, tokens,
masked, quarantined) are read from the engine at scrape time by a custom collector.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

# Seconds; serving a tiny model on CPU spans milliseconds to tens of seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    """Counters, gauges and histograms of one server; ``render()`` gives the /metrics body."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("moekit_requests", "Completion requests by outcome "
                                "(ok, rejected = 429, cancelled = client went away, error)", ["status"], registry=r)
        self.bad_requests = Counter("moekit_bad_requests", "Requests answered 4xx for bad input", registry=r)
        self.tokens_generated = Counter("moekit_tokens_generated", "Completion tokens generated", registry=r)
        self.queue_depth = Gauge("moekit_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.active = Gauge("moekit_active_sequences", "Sequences in the running batch", registry=r)
        self.latency = Histogram("moekit_request_latency_seconds", "Time from arrival to the last token",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("moekit_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.quarantines = Counter("moekit_quarantine_events", "Times experts were quarantined after NaN/Inf outputs",
                                   registry=r)
        self._engine: Any | None = None

    def attach(self, engine: Any) -> None:
        """Export ``engine.expert_snapshot()`` per layer and expert at every scrape."""
        self._engine = engine
        self.registry.register(_ExpertCollector(engine))

    # ------------------------------------------------------------------ engine hooks
    def request_finished(self, status: str, latency_s: float | None) -> None:
        self.requests.labels(status=status).inc()
        if latency_s is not None:
            self.latency.observe(latency_s)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def tokens(self, n: int) -> None:
        self.tokens_generated.inc(n)

    def set_load(self, queue_depth: int, active: int) -> None:
        self.queue_depth.set(queue_depth)
        self.active.set(active)

    def quarantine_event(self) -> None:
        self.quarantines.inc()

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text exposition."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if self._engine is not None:
            self.set_load(self._engine.queue_depth, self._engine.active)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _ExpertCollector:
    """Per-layer, per-expert series read from the engine when scraped."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        util = GaugeMetricFamily("moekit_expert_utilization",
                                 "Share of routed token assignments each expert received since start",
                                 labels=["layer", "expert"])
        tokens = CounterMetricFamily("moekit_expert_tokens", "Token assignments each expert received",
                                     labels=["layer", "expert"])
        masked = GaugeMetricFamily("moekit_expert_masked", "1 when the expert is out of service (masked)",
                                   labels=["layer", "expert"])
        quarantined = GaugeMetricFamily("moekit_expert_quarantined",
                                        "1 when the expert was masked automatically after NaN/Inf outputs",
                                        labels=["layer", "expert"])
        masked_count = GaugeMetricFamily("moekit_masked_experts", "Masked experts per layer", labels=["layer"])
        for layer in self.engine.expert_snapshot():
            name, masked_set, quarantined_set = layer["name"], set(layer["masked"]), set(layer["quarantined"])
            for e in range(layer["num_experts"]):
                labels = [name, str(e)]
                util.add_metric(labels, layer["utilization"][e])
                tokens.add_metric(labels, layer["tokens_per_expert"][e])
                masked.add_metric(labels, float(e in masked_set))
                quarantined.add_metric(labels, float(e in quarantined_set))
            masked_count.add_metric([name], len(masked_set))
        yield from (util, tokens, masked, quarantined, masked_count)
