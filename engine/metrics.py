"""Prometheus metrics of one server, under vLLM's metric names with a `quantlab:` prefix.

A dashboard built for vLLM ports by replacing `vllm:` with `quantlab:`; every series carries vLLM's
`model_name` label. Engine-wide state (running/waiting requests, KV usage, prefix-cache and preemption
totals) is read from `AsyncLLM.stats()` at scrape time, so it can never drift from the engine; what only
the server sees (tokens delivered, latencies, finish reasons, rejections) is counted as requests pass.
Each app has its own `CollectorRegistry`, so two servers in one process (tests) never share counters.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "quantlab:"

# vLLM's buckets (vllm/v1/metrics/loggers.py), so histogram quantiles compare across the two.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)


class _EngineCollector:
    """Reads the engine's own counters and gauges on every scrape."""

    def __init__(self, stats: Callable[[], object], model_name: str):
        self._stats, self._model = stats, model_name

    def collect(self):
        s = self._stats()
        rows = (
            (GaugeMetricFamily, "num_requests_running", "Requests in the engine's running batch.", s.num_running),
            (GaugeMetricFamily, "num_requests_waiting", "Requests waiting for admission.", s.num_waiting),
            (GaugeMetricFamily, "kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", s.kv_cache_usage),
            (CounterMetricFamily, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries),
            (CounterMetricFamily, "prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits),
            (CounterMetricFamily, "num_preemptions", "Sequences preempted to free KV blocks.", s.num_preemptions_total),
        )
        for family, name, doc, value in rows:
            metric = family(PREFIX + name, doc, labels=["model_name"])
            metric.add_metric([self._model], float(value))
            yield metric


class ServerMetrics:
    """The registry behind GET /metrics and the counters the request handlers feed."""

    def __init__(self, stats: Callable[[], object], model_name: str):
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self.model_name = model_name
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of admitted sequences.", labels, registry=r).labels(model_name)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated and delivered.", labels, registry=r).labels(model_name)
        self._success = Counter(PREFIX + "request_success", "Sequences finished, by reason (stop, length, abort).",
                                labels + ["finished_reason"], registry=r)
        self._rejected = Counter(PREFIX + "request_rejected", "HTTP requests refused before reaching the engine, by status.",
                                 labels + ["status"], registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Arrival to first generated token.", labels,
                              buckets=TTFT_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between successive tokens of a sequence.",
                             labels, buckets=ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to finish of a sequence.", labels,
                             buckets=REQUEST_BUCKETS, registry=r).labels(model_name)
        self.queue = Histogram(PREFIX + "request_queue_time_seconds", "Arrival to first scheduling.", labels,
                               buckets=REQUEST_BUCKETS, registry=r).labels(model_name)
        r.register(_EngineCollector(stats, model_name))

    def finished(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()

    def rejected(self, status: int) -> None:
        self._rejected.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of everything above."""
        return generate_latest(self.registry)

    def sequence(self, count_prompt: bool = True) -> SequenceMetrics:
        return SequenceMetrics(self, count_prompt)


class SequenceMetrics:
    """Feeds the server metrics from one engine request's cumulative outputs (one sequence, n=1)."""

    def __init__(self, metrics: ServerMetrics, count_prompt: bool = True):
        self._m, self._count_prompt = metrics, count_prompt
        self.num_tokens = 0
        self.prompt_tokens = 0
        self.finish_reason: str | None = None
        self._admitted = False
        self._last_token_time: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def output(self, out) -> None:
        """Count the tokens new in `out` (a RequestOutput) and, when it is the last, its latencies."""
        now = time.monotonic()
        if self.done:
            return
        if not self._admitted:
            self._admitted = True
            self.prompt_tokens = len(out.prompt_token_ids)
            if self._count_prompt:
                self._m.prompt_tokens.inc(self.prompt_tokens)
        completion = out.outputs[0]
        new = len(completion.token_ids) - self.num_tokens
        if new > 0:
            self._m.generation_tokens.inc(new)
            if self._last_token_time is not None:
                for _ in range(new):
                    self._m.itl.observe((now - self._last_token_time) / new)
            self.num_tokens, self._last_token_time = len(completion.token_ids), now
        if out.finished:
            self._finish(completion.finish_reason or "stop", out.metrics)

    def abort(self) -> None:
        """The server gave up on the sequence (client gone, timeout, shutdown)."""
        if not self.done:
            self.finish_reason = "abort"
            self._m.finished("abort")

    def _finish(self, reason: str, m) -> None:
        self.finish_reason = reason
        self._m.finished(reason)
        if m.first_token_time is not None:
            self._m.ttft.observe(m.first_token_time - m.arrival_time)
        if m.first_scheduled_time is not None:
            self._m.queue.observe(m.first_scheduled_time - m.arrival_time)
        if m.finished_time is not None:
            self._m.e2e.observe(m.finished_time - m.arrival_time)
