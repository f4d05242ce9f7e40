"""Prometheus metrics per model, registered on a registry owned by one app (no process globals).

Names follow Triton's (nv_inference_*) in spirit, prefixed tokenmill_model_ and labelled by model + version.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
TIME_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        labels = ("model", "version")
        self.requests = Counter("tokenmill_model_request_success", "Successful inference requests.", labels,
                                registry=self.registry)
        self.failures = Counter("tokenmill_model_request_failure", "Failed inference requests (bad input or model error).",
                                labels, registry=self.registry)
        self.inferences = Counter("tokenmill_model_inference_count", "Samples inferred (a batch of n counts n).", labels,
                                  registry=self.registry)
        self.executions = Counter("tokenmill_model_execution_count", "Model executions (merged batches).", labels,
                                  registry=self.registry)
        self.queue_seconds = Histogram("tokenmill_model_queue_seconds", "Time a request waited in the batcher queue.",
                                       labels, buckets=TIME_BUCKETS, registry=self.registry)
        self.compute_seconds = Histogram("tokenmill_model_compute_seconds", "Time one merged batch took to run.",
                                         labels, buckets=TIME_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("tokenmill_model_batch_size", "Samples per executed batch.", labels,
                                    buckets=BATCH_BUCKETS, registry=self.registry)
