"""Prometheus metrics of ``fmforge serve`` (names prefixed ``fmforge:``, labelled by model), one registry per
server so several servers in one process (tests) never share counters."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = reg = CollectorRegistry()
        self.ttft = Histogram("fmforge:time_to_first_token_seconds", "Time from arrival to the first token",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=reg)
        self.itl = Histogram("fmforge:inter_token_latency_seconds", "Time between consecutive tokens",
                             ["model"], buckets=_LATENCY_BUCKETS, registry=reg)
        self.e2e = Histogram("fmforge:e2e_request_latency_seconds", "Time from arrival to the last token",
                             ["model"], buckets=_LATENCY_BUCKETS, registry=reg)
        self.prompt_tokens = Counter("fmforge:prompt_tokens", "Prompt tokens processed", ["model"], registry=reg)
        self.generation_tokens = Counter("fmforge:generation_tokens", "Tokens generated", ["model"], registry=reg)
        self.running = Gauge("fmforge:num_requests_running", "Sequences in the running batch", ["model"],
                             registry=reg)
        self.waiting = Gauge("fmforge:num_requests_waiting", "Sequences waiting for admission", ["model"],
                             registry=reg)
        self.requests = Counter("fmforge:requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=reg)

    def engine_hook(self, model: str):
        """A callback for ``Engine.on_step`` that keeps the running/waiting gauges current."""
        running, waiting = self.running.labels(model), self.waiting.labels(model)

        def update(engine) -> None:
            n_running, n_waiting = engine.load()
            running.set(n_running)
            waiting.set(n_waiting)
        return update

    def render(self) -> bytes:
        return generate_latest(self.registry)
