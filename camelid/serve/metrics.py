"""`GET /metrics` in Prometheus' text format, from a registry of the app's own (two apps in one
process never share counters).

- camelid_requests_total{route, status}: every HTTP answer, refusals by the middlewares
  included; `route` is the route's template (/v1/models/{name}), "unmatched" for any other path
  (a client cannot make one label per path it invents).
- camelid_queue_sequences / camelid_running_sequences {model}: read from each scheduler when
  scraped.
- camelid_generated_tokens_total {model}: tokens generated.
- camelid_time_to_first_token_seconds / camelid_time_per_output_token_seconds {model}:
  histograms, from a request's arrival in the queue to its first token, and between a request's
  later tokens.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
UNMATCHED = "unmatched"


class _SchedulerCollector:
    """Queue length, running rows and tokens generated, read from the schedulers at scrape time."""

    def __init__(self, models):
        self.models = models

    def collect(self):
        queued = GaugeMetricFamily("camelid_queue_sequences", "Sequences waiting for a batch slot", labels=["model"])
        running = GaugeMetricFamily("camelid_running_sequences", "Sequences being generated", labels=["model"])
        tokens = CounterMetricFamily("camelid_generated_tokens", "Tokens generated", labels=["model"])
        for m in self.models:
            s = m.scheduler.stats()
            queued.add_metric([m.name], s["queued_sequences"])
            running.add_metric([m.name], s["running_sequences"])
            tokens.add_metric([m.name], s["generated_tokens"])
        yield from (queued, running, tokens)


class Metrics:
    """The app's metrics; `observer(name)` gives a scheduler its latency callbacks."""

    def __init__(self, models):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("camelid_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=self.registry)
        self.ttft = Histogram("camelid_time_to_first_token_seconds", "From a request's arrival to its first token",
                              ["model"], buckets=TTFT_BUCKETS, registry=self.registry)
        self.per_token = Histogram("camelid_time_per_output_token_seconds", "Between a request's later tokens",
                                   ["model"], buckets=TOKEN_BUCKETS, registry=self.registry)
        self.registry.register(_SchedulerCollector(models))

    def observer(self, model: str) -> "LatencyObserver":
        return LatencyObserver(self.ttft.labels(model), self.per_token.labels(model))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LatencyObserver:
    """Called by the scheduler thread with each job's token steps (`Scheduler.observers`)."""

    def __init__(self, ttft, per_token):
        self.ttft, self.per_token = ttft, per_token

    def tokens(self, job: Any, now: float) -> None:
        if job.first_token_at is None:
            job.first_token_at = now
            self.ttft.observe(now - job.created)
        else:
            self.per_token.observe(now - job.last_token_at)
        job.last_token_at = now


class RequestCounter:
    """ASGI middleware: count every answer by route template and status."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [0]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or UNMATCHED
            self.metrics.requests.labels(path, str(status[0] or 500)).inc()
