"""Prometheus metrics of one server app, in a registry of its own.

A registry per app (not prometheus_client's global one) lets several apps
live in one process, as tests create them, without clashing names. Queue
depth and running requests, and each engine's scheduler and KV-cache
counters, are read from the model registry at scrape time, so they can
never drift from the truth.
"""

from __future__ import annotations

from typing import Callable, Iterable, Tuple

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "helexa"

# Seconds. The first token covers queueing and prefill, which range from
# milliseconds on a GPU to seconds on a CPU; a token gap is much shorter.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class _StateCollector:
    """Gauges computed from the live model registry on each scrape."""

    def __init__(self, state: Callable[[], Iterable[Tuple[str, int, int, bool, dict]]]) -> None:
        self._state = state

    # (metric name, engine.load() key, help)
    _ENGINE_GAUGES = (
        ("running_sequences", "running", "Sequences in the engine's running batch"),
        ("waiting_sequences", "waiting", "Sequences admitted by the engine and waiting for KV blocks or a slot"),
        ("kv_blocks_used", "kv_blocks_used", "KV-cache blocks referenced by sequences"),
        ("kv_blocks_free", "kv_blocks_free", "KV-cache blocks free (never used, or cached and idle)"),
        ("kv_blocks_cached", "kv_blocks_cached", "KV-cache blocks holding a cached prompt prefix"),
    )
    _ENGINE_COUNTERS = (
        ("prefix_cache_lookup_tokens", "prefix_cache_lookup_tokens", "Prompt tokens looked up in the prefix cache"),
        ("prefix_cache_hit_tokens", "prefix_cache_hit_tokens", "Prompt tokens served by the prefix cache"),
        ("scheduler_steps", "steps", "Batched steps run"),
        ("scheduler_preemptions", "preemptions", "Sequences preempted for KV blocks (recomputed later)"),
    )

    def collect(self):
        queue = GaugeMetricFamily(
            f"{PREFIX}_queue_depth", "Requests waiting for their turn on a model", labels=["model"]
        )
        running = GaugeMetricFamily(f"{PREFIX}_running_requests", "Requests generating now", labels=["model"])
        healthy = GaugeMetricFamily(
            f"{PREFIX}_model_healthy", "1 when the model's device is usable, 0 when it is poisoned", labels=["model"]
        )
        gauges = {m: GaugeMetricFamily(f"{PREFIX}_{m}", h, labels=["model"]) for m, _, h in self._ENGINE_GAUGES}
        counters = {m: CounterMetricFamily(f"{PREFIX}_{m}", h, labels=["model"]) for m, _, h in self._ENGINE_COUNTERS}
        hit_rate = GaugeMetricFamily(
            f"{PREFIX}_prefix_cache_hit_rate",
            "Share of looked-up prompt tokens the prefix cache served",
            labels=["model"],
        )
        batch = CounterMetricFamily(
            f"{PREFIX}_batch_size_steps", "Steps run, by sequences in the step", labels=["model", "batch_size"]
        )
        for name, waiting, busy, ok, stats in self._state():
            queue.add_metric([name], waiting)
            running.add_metric([name], busy)
            healthy.add_metric([name], 1 if ok else 0)
            for m, key, _ in self._ENGINE_GAUGES:
                if key in stats:
                    gauges[m].add_metric([name], stats[key])
            for m, key, _ in self._ENGINE_COUNTERS:
                if key in stats:
                    counters[m].add_metric([name], stats[key])
            looked = stats.get("prefix_cache_lookup_tokens", 0)
            if looked:
                hit_rate.add_metric([name], stats.get("prefix_cache_hit_tokens", 0) / looked)
            for size, steps in (stats.get("batch_size_histogram") or {}).items():
                batch.add_metric([name, str(size)], steps)
        yield queue
        yield running
        yield healthy
        yield from gauges.values()
        yield from counters.values()
        yield hit_rate
        yield batch

    def describe(self):
        return []


class ServerMetrics:
    """Counters and histograms the server updates as requests run."""

    def __init__(self, state: Callable[[], Iterable[Tuple[str, int, int, bool, dict]]]) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Finished generation requests by finish reason (stop, length, cancelled, error)",
            ["model", "endpoint", "finish_reason"],
            registry=r,
        )
        self.cancelled = Counter(
            f"{PREFIX}_cancelled_by_disconnect",
            "Generations stopped because the client disconnected",
            ["model"],
            registry=r,
        )
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "From request arrival to the first generated text (queueing included)",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "Time between generated tokens of one request",
            ["model"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "From request arrival to the end of generation",
            ["model"],
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.http = Counter(
            f"{PREFIX}_http_responses", "HTTP responses by route and status", ["route", "status"], registry=r
        )
        r.register(_StateCollector(state))

    def render(self) -> Tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
