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

    def watch(self, learner) -> None:
        """Online learning's per-LLM series, read from `learner.llms()` at each scrape: `learn_refits_total`,
        `learn_last_refit_timestamp_seconds`, `learn_answers_remembered` and the prequential `learn_mae`,
        `learn_kendall_tau`, `learn_bound_coverage`, `learn_capped_share` over the sliding window."""
        self.registry.register(_LearnerCollector(learner))

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the text exposition format."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _LearnerCollector:
    def __init__(self, learner):
        self.learner = learner

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        llms = self.learner.llms()
        refits = CounterMetricFamily(PREFIX + "learn_refits", "Refits of each LLM's own parameters", labels=["llm"])
        gauges = {key: GaugeMetricFamily(PREFIX + name, text, labels=["llm"]) for key, name, text in (
            ("last_refit", "learn_last_refit_timestamp_seconds", "Unix time of the LLM's last refit"),
            ("answers_remembered", "learn_answers_remembered", "Answers (and prompt vectors) remembered"),
            ("mae", "learn_mae", "Prequential MAE of the predicted mean (tokens), answers not cut short"),
            ("tau", "learn_kendall_tau", "Prequential Kendall tau-b of predicted vs actual length"),
            ("coverage", "learn_bound_coverage", "Prequential share of answers within the predicted bound"),
            ("capped_share", "learn_capped_share", "Share of answers cut short by max_tokens"))}
        for llm, info in llms.items():
            refits.add_metric([llm], info["refits"])
            values = {**info["prequential"], "last_refit": info["last_refit"],
                      "answers_remembered": info["answers_remembered"]}
            for key, family in gauges.items():
                if values.get(key) is not None:
                    family.add_metric([llm], values[key])
        yield refits
        yield from gauges.values()

    def describe(self):
        return []
