"""Prometheus metrics of one app (its own registry, so several apps in a process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("recsys_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram(
            "recsys_request_seconds", "request latency by route", ["route"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.rows = Counter("recsys_rows_scored", "rows scored by the model", registry=r)
        self.batch_rows = Histogram("recsys_batch_rows", "rows per forward pass", buckets=_ROW_BUCKETS, registry=r)
        self.batch_requests = Histogram(
            "recsys_batch_requests", "requests merged into one forward pass", buckets=_ROW_BUCKETS, registry=r
        )
        self.forward_seconds = Histogram(
            "recsys_forward_seconds", "time of one forward pass", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("recsys_queue_depth", "requests waiting for the model", registry=r)
        self.in_flight = Gauge(
            "recsys_in_flight", "scoring requests being handled (counted against --max-in-flight)", registry=r
        )
        self.rejected = Counter("recsys_rejected", "requests refused before scoring, by reason", ["reason"], registry=r)
        self.model_info = Gauge("recsys_model_info", "the model version served (value 1)", ["version"], registry=r)
        self.reloads = Counter("recsys_model_reloads", "model reload attempts by result", ["result"], registry=r)

    def set_model(self, version: str) -> None:
        self.model_info.clear()
        self.model_info.labels(version=version).set(1)
