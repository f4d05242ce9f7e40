"""The gateway's own Prometheus metrics, in a per-gateway registry (two gateways in one process never collide).

Names share the model server's ``tokenmill:`` prefix with a ``gateway_`` stem; deploy/grafana reads them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tokenmill:gateway_requests", "Requests answered by the gateway.",
            ["model", "routed_model", "status"], registry=r,
        )  # fmt: skip
        self.routed = Counter(
            "tokenmill:gateway_routed_requests", "Routing decisions: requested model → model that served it.",
            ["requested_model", "routed_model", "reason"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "tokenmill:gateway_request_latency_seconds", "Gateway end-to-end latency (to the last byte).",
            ["routed_model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.retries = Counter(
            "tokenmill:gateway_retries", "Requests re-sent to another replica before their first byte.",
            ["model"], registry=r,
        )  # fmt: skip
        self.fallbacks = Counter(
            "tokenmill:gateway_fallbacks",
            "Requests served by a model's fallback.",
            ["model", "fallback"],
            registry=r,
        )
        self.stream_errors = Counter(
            "tokenmill:gateway_stream_errors",
            "Streams cut by a backend after their first byte.",
            ["model"],
            registry=r,
        )
        self.ejections = Counter(
            "tokenmill:gateway_replica_ejections",
            "Replicas taken out of rotation.",
            ["model", "reason"],
            registry=r,
        )
        self.readmissions = Counter(
            "tokenmill:gateway_replica_readmissions", "Ejected replicas put back.", ["model"], registry=r
        )
        self.restarts = Counter(
            "tokenmill:gateway_replica_restarts", "Managed replica processes restarted after exiting.",
            ["model"], registry=r,
        )  # fmt: skip
        self.replicas = Gauge(
            "tokenmill:gateway_replicas", "Replicas per model and state.", ["model", "state"], registry=r
        )
        self.desired_replicas = Gauge(
            "tokenmill:gateway_desired_replicas",
            "The autoscaler's target replica count.",
            ["model"],
            registry=r,
        )
        self.scale_events = Counter(
            "tokenmill:gateway_scale_events", "Autoscaler decisions that changed the replica count.",
            ["model", "direction", "reason"], registry=r,
        )  # fmt: skip
        self.pool_load = Gauge(
            "tokenmill:gateway_pool_load", "Waiting + running requests summed over a pool's replicas.",
            ["model"], registry=r,
        )  # fmt: skip
        self.queued = Gauge(
            "tokenmill:gateway_queued_requests", "Requests held at the gateway waiting for a replica (cold start).",
            ["model"], registry=r,
        )  # fmt: skip
        self.stream_resumes = Counter(
            "tokenmill:gateway_stream_resumes",
            "Streams cut mid-way that another replica continued (outcome=resumed) or could not (outcome=failed).",
            ["model", "outcome"], registry=r,
        )  # fmt: skip
        self.model_serving = Gauge(
            "tokenmill:gateway_model_serving",
            "1 when the model's pool can serve now (a ready replica, or scaled to zero and able to start one).",
            ["model"], registry=r,
        )  # fmt: skip
        self.failed_replicas = Counter(
            "tokenmill:gateway_replica_failures",
            "Managed replicas given up on after exiting max_start_failures times in a row before becoming ready.",
            ["model"], registry=r,
        )  # fmt: skip
        self.rate_limited = Counter(
            "tokenmill:gateway_rate_limited",
            "Requests refused with 429 by a key's rate limit.",
            ["key"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
