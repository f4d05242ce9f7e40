"""Prometheus metrics with vLLM's names and meanings, prefixed ``tokenmill:`` and labelled ``model_name``.

Each app owns a CollectorRegistry (two apps in one process never collide). Engine-wide gauges and counters are
read from AsyncLLM's snapshot at scrape time; per-request histograms are observed by server/request_log.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tokenmill.engine.async_llm import EngineSnapshot

PREFIX = "tokenmill:"

# Bucket edges follow vLLM's so dashboards' quantiles behave the same.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)


class _EngineCollector(Collector):
    """Exposes the engine snapshot as gauges and counters at scrape time."""

    def __init__(self, model_name: str, snapshot: Callable[[], EngineSnapshot]) -> None:
        self._model_name = model_name
        self._snapshot = snapshot

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
        family.add_metric([self._model_name], value)
        return family

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
        family.add_metric([self._model_name], value)
        return family

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        yield self._gauge("num_requests_running", "Requests in the running batch.", snap.num_running)
        yield self._gauge("num_requests_waiting", "Requests waiting to be scheduled.", snap.num_waiting)
        yield self._gauge("kv_cache_usage_perc", "KV cache usage (1 means 100 percent).", snap.kv_cache_usage)
        yield self._counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                            snap.prefix_cache_queries)
        yield self._counter("prefix_cache_hits", "Prompt tokens served from the prefix cache.", snap.prefix_cache_hits)
        yield self._counter("num_preemptions", "Sequences preempted (recomputed later).", snap.num_preemptions)
        yield self._counter("prompt_tokens", "Prompt tokens accepted by the engine.", snap.prompt_tokens)
        yield self._counter("generation_tokens", "Tokens generated.", snap.generation_tokens)
        yield self._counter("engine_steps", "Engine steps run; each step batches every scheduled request.",
                            snap.num_steps)
        yield from self._spec_decode(snap)

    def _spec_decode(self, snap: EngineSnapshot) -> Iterator[Metric]:
        """Speculative decoding's acceptance counters (vLLM's names; zero without speculation)."""
        yield self._counter("spec_decode_num_drafts", "Verification rows (drafts proposed and verified).",
                            snap.spec_decode_num_drafts)
        yield self._counter("spec_decode_num_draft_tokens", "Draft tokens proposed.", snap.spec_decode_num_draft_tokens)
        yield self._counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                            snap.spec_decode_num_accepted_tokens)
        family = CounterMetricFamily(PREFIX + "spec_decode_num_accepted_tokens_per_pos",
                                     "Draft tokens accepted, by position in the draft.", labels=["model_name", "position"])
        for position, count in enumerate(snap.spec_decode_accepted_per_pos):
            family.add_metric([self._model_name, str(position)], count)
        yield family


class ServerMetrics:
    def __init__(self, model_name: str, snapshot: Callable[[], EngineSnapshot]) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineCollector(model_name, snapshot))
        labels = ["model_name"]
        self.request_success = Counter(
            PREFIX + "request_success", "Finished requests by finish reason.", ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds", "Time to first token.", labels, buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            PREFIX + "inter_token_latency_seconds", "Time between consecutive output tokens.", labels,
            buckets=ITL_BUCKETS, registry=self.registry,
        )
        self.e2e_request_latency = Histogram(
            PREFIX + "e2e_request_latency_seconds", "Arrival to last token.", labels,
            buckets=REQUEST_LATENCY_BUCKETS, registry=self.registry,
        )
        self.request_queue_time = Histogram(
            PREFIX + "request_queue_time_seconds", "Time waiting before first scheduled.", labels,
            buckets=REQUEST_LATENCY_BUCKETS, registry=self.registry,
        )

        # The per-token observations' labelled children, looked up once (labels() costs ~1 us per call).
        self._ttft = self.time_to_first_token.labels(model_name)
        self._inter_token = self.inter_token_latency.labels(model_name)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def observe_finished(self, finished_reason: str) -> None:
        self.request_success.labels(self.model_name, finished_reason).inc()

    def observe_ttft(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def observe_inter_token(self, seconds: float, count: int = 1) -> None:
        child = self._inter_token
        for _ in range(count):
            child.observe(seconds)

    def observe_e2e(self, seconds: float) -> None:
        self.e2e_request_latency.labels(self.model_name).observe(seconds)

    def observe_queue_time(self, seconds: float) -> None:
        self.request_queue_time.labels(self.model_name).observe(seconds)
