"""The gateway's Prometheus metrics (`GET /metrics`), one registry per gateway so that several in one process (tests,
benchmarks) keep their counts apart. Names follow Prometheus conventions (`_total` and `_seconds` suffixes)."""

from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)

__all__ = ["Metrics"]

PREFIX = "lenpred_gateway_"
#: Priority buckets in tokens: answers run from a few tokens to several thousand, plus aging credit.
PRIORITY_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, float("inf"))
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, float("inf"))
PREDICTION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, float("inf"))


class Metrics:
    """`requests_total{endpoint,status}`, `prediction_seconds` (queueing in the micro-batcher included),
    `prediction_batch_size`, `priority`, `upstream_errors_total{kind}` (connect, timeout, reset, status_5xx,
    shutdown), `log_queue_depth`, `log_write_errors_total`, `log_records_total`, `requests_in_flight`."""

    def __init__(self, log_depth=None):
        disable_created_metrics()  # no `_created` series per counter (as vLLM does); process-wide
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter(PREFIX + "requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.prediction_seconds = Histogram(PREFIX + "prediction_seconds",
                                            "Time to a length prediction, waiting for its batch included",
                                            buckets=PREDICTION_BUCKETS, registry=r)
        self.batch_size = Histogram(PREFIX + "prediction_batch_size", "Prompts per model call of the micro-batcher",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.priority = Histogram(PREFIX + "priority", "Priority sent upstream (lower runs first)",
                                  buckets=PRIORITY_BUCKETS, registry=r)
        self.upstream_errors = Counter(PREFIX + "upstream_errors", "Upstream failures, by kind", ["kind"],
                                       registry=r)
        self.in_flight = Gauge(PREFIX + "requests_in_flight", "Requests being served", registry=r)
        self.log_records = Counter(PREFIX + "log_records", "Records handed to the request log", registry=r)
        self.log_errors = Counter(PREFIX + "log_write_errors", "Failed writes to the request log (retried)",
                                  registry=r)
        depth = Gauge(PREFIX + "log_queue_depth", "Log records not yet written", registry=r)
        depth.set_function(log_depth or (lambda: 0))

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the text exposition format."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
