"""``tokenmill bench-model --search``: a model-analyzer-like search for one model's serving configuration.

For each candidate (max batch size x queue delay x instance count) the model's ``config.yaml`` is rewritten and the
live server reloads it (``POST /v2/repository/models/{m}/load``, Triton's model-control call); closed-loop load at
rising concurrency measures throughput and p99. A candidate's score is its best throughput whose p99 stays within
the latency budget. The best candidate is written back into ``config.yaml`` and loaded; when none meets the
budget the original configuration is restored and the search fails, naming the lowest p99 it saw.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from tokenmill.modelserver.loadgen import LoadResult, ServerProcess, drive
from tokenmill.modelserver.model_config import ModelConfig

SENTENCE = "The film was a delight from start to finish, and I would gladly watch it again."


@dataclass(frozen=True)
class Candidate:
    max_batch_size: int
    max_queue_delay_ms: float
    instance_count: int

    @property
    def label(self) -> str:
        return f"batch {self.max_batch_size}, delay {self.max_queue_delay_ms:g} ms, {self.instance_count} inst"


@dataclass
class CandidateResult:
    candidate: Candidate
    levels: list[LoadResult] = field(default_factory=list)
    error: str | None = None  # the candidate could not be configured or loaded

    def best_within(self, budget_ms: float) -> LoadResult | None:
        ok = [r for r in self.levels if r.failed == 0 and r.p99_ms <= budget_ms]
        return max(ok, key=lambda r: r.throughput_rps, default=None)


@dataclass
class SearchSettings:
    model: str
    repository: Path
    latency_budget_ms: float
    max_batch_sizes: list[int]
    queue_delays_ms: list[float]
    instance_counts: list[int]
    concurrency: list[int]
    seconds: float = 5.0
    client_procs: int = 2

    def __post_init__(self) -> None:
        if self.latency_budget_ms <= 0:
            raise ValueError(f"--latency-budget-ms must be > 0; got {self.latency_budget_ms}")
        if self.seconds <= 0:
            raise ValueError(f"--seconds must be > 0; got {self.seconds}")
        for name in ("max_batch_sizes", "queue_delays_ms", "instance_counts", "concurrency"):
            values = getattr(self, name)
            if not values or any(v < 0 for v in values):
                raise ValueError(f"{name.replace('_', '-')} must be a non-empty list of non-negative numbers; "
                                 f"got {values}")
        if any(c < 1 for c in self.concurrency):
            raise ValueError(f"concurrency levels must be >= 1; got {self.concurrency}")
        if not (self.repository / self.model / "config.yaml").is_file():
            raise ValueError(f"no {self.repository / self.model / 'config.yaml'}: --repository must be the live "
                             "server's model repository and --model one of its models")

    def candidates(self) -> list[Candidate]:
        return [Candidate(b, d, i) for b, d, i in
                itertools.product(self.max_batch_sizes, self.queue_delays_ms, self.instance_counts)]


def task_request(config: ModelConfig, rng: np.random.Generator) -> tuple[str, bytes, dict[str, str]]:
    """One representative request for the model's task: a sentence, a PNG, or random input tensors."""
    if config.task.kind == "text_classification":
        return (f"/v1/sentiment/{config.name}", json.dumps({"text": SENTENCE}).encode(),
                {"Content-Type": "application/json"})
    if config.task.kind == "image_classification":
        from tokenmill.modelserver import processing

        image = rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
        return f"/v1/classify/{config.name}", processing.encode_png(image), {"Content-Type": "image/png"}
    from tokenmill.modelserver.tensors import datatype_of

    feeds = {}
    for spec in config.inputs:
        shape = [1, *(16 if d == -1 else d for d in spec.dims)] if config.max_batch_size > 0 else \
            [16 if d == -1 else d for d in spec.dims]
        feeds[spec.name] = (rng.standard_normal(shape) if spec.dtype.kind == "f" else rng.integers(0, 2, shape)
                            ).astype(spec.dtype)
    inputs = [{"name": k, "shape": list(v.shape), "datatype": datatype_of(v),
               "parameters": {"binary_data_size": v.nbytes}} for k, v in feeds.items()]
    header = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}}).encode()
    body = header + b"".join(np.ascontiguousarray(v).tobytes() for v in feeds.values())
    return (f"/v2/models/{config.name}/infer", body,
            {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"})


def candidate_config(raw: dict[str, Any], candidate: Candidate) -> dict[str, Any]:
    """The model's config.yaml with the candidate's batching and instances (validated like the server does)."""
    out = copy.deepcopy(raw)
    out["max_batch_size"] = candidate.max_batch_size
    out["instance_count"] = candidate.instance_count
    batching = dict(out.get("dynamic_batching") or {})
    batching["max_queue_delay_ms"] = candidate.max_queue_delay_ms
    batching["preferred_batch_sizes"] = [b for b in batching.get("preferred_batch_sizes", [])
                                         if b <= candidate.max_batch_size] or [candidate.max_batch_size]
    out["dynamic_batching"] = batching
    ModelConfig.from_dict(out)  # raises ValueError with the reason (e.g. beyond a torch model's graph ladder)
    return out


class LiveModel:
    """The model's config file on disk and the live server that reloads it."""

    def __init__(self, url: str, repository: Path, model: str) -> None:
        self.url, self.model = url.rstrip("/"), model
        self.path = repository / model / "config.yaml"
        self.original = yaml.safe_load(self.path.read_text())

    def apply(self, raw: dict[str, Any]) -> None:
        self.path.write_text(yaml.safe_dump(raw, sort_keys=False))
        reply = httpx.post(f"{self.url}/v2/repository/models/{self.model}/load", timeout=600)
        if reply.status_code != 200:
            raise RuntimeError(f"the server could not load the configuration: {reply.text[:500]}")

    def restore(self) -> None:
        self.apply(self.original)


def search(settings: SearchSettings, url: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every candidate on the live server at ``url``; write the best one (or restore the original)."""
    live = LiveModel(url, settings.repository, settings.model)
    rng = np.random.default_rng(0)
    results: list[CandidateResult] = []
    log(f"{'candidate':>36} {'clients':>7} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'fail':>5}")
    for candidate in settings.candidates():
        result = CandidateResult(candidate)
        results.append(result)
        try:
            raw = candidate_config(live.original, candidate)
            live.apply(raw)
        except (ValueError, RuntimeError) as exc:
            result.error = str(exc)
            log(f"{candidate.label:>36} skipped: {exc}")
            continue
        path, body, headers = task_request(ModelConfig.from_dict(raw), rng)
        drive(live.url + path, body, headers, 2, min(1.0, settings.seconds), 1)  # warm-up: graphs, caches
        for clients in settings.concurrency:
            level = drive(live.url + path, body, headers, clients, settings.seconds,
                          procs=min(settings.client_procs, clients))
            result.levels.append(level)
            log(f"{candidate.label:>36} {clients:>7} {level.throughput_rps:>9.1f} {level.p50_ms:>8.2f} "
                f"{level.p99_ms:>8.2f} {level.failed:>5}")
            if level.failed or level.p99_ms > settings.latency_budget_ms:
                break  # more clients only queue longer
    scored = [(r, r.best_within(settings.latency_budget_ms)) for r in results]
    scored = [(r, best) for r, best in scored if best is not None]
    summary: dict[str, Any] = {
        "model": settings.model, "latency_budget_ms": settings.latency_budget_ms,
        "candidates": [{"candidate": asdict(r.candidate), "error": r.error,
                        "levels": [asdict(level) for level in r.levels]} for r in results],
    }
    if not scored:
        live.restore()
        seen = [level.p99_ms for r in results for level in r.levels if level.failed == 0]
        summary["best"] = None
        summary["message"] = (f"no configuration kept p99 within {settings.latency_budget_ms:g} ms (lowest p99 seen: "
                              f"{min(seen):.1f} ms); the original configuration was restored" if seen else
                              "no configuration could be measured; the original configuration was restored")
        return summary
    winner, level = max(scored, key=lambda pair: (pair[1].throughput_rps, -pair[1].p99_ms))
    live.apply(candidate_config(live.original, winner.candidate))
    summary["best"] = {"candidate": asdict(winner.candidate), "concurrency": level.level,
                       "throughput_rps": level.throughput_rps, "p99_ms": level.p99_ms}
    summary["message"] = (f"best: {winner.candidate.label}: {level.throughput_rps:.1f} req/s at {level.level:g} "
                          f"clients, p99 {level.p99_ms:.1f} ms; written to {live.path}")
    return summary



def plot(summary: dict[str, Any], path: Path) -> None:
    """Throughput vs p99 per candidate, the budget as a vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for entry in summary["candidates"]:
        if not entry["levels"]:
            continue
        c = Candidate(**entry["candidate"])
        ax.plot([lv["p99_ms"] for lv in entry["levels"]], [lv["throughput_rps"] for lv in entry["levels"]],
                marker="o", label=c.label)
    ax.axvline(summary["latency_budget_ms"], color="red", linestyle="--", label="latency budget")
    ax.set_xlabel("p99 latency (ms)")
    ax.set_ylabel("throughput (req/s)")
    ax.set_title(f"{summary['model']}: serving configurations (points = concurrency levels)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_search(settings: SearchSettings, url: str | None, device: str, log: Callable[[str], None] = print
               ) -> dict[str, Any]:
    """Against ``url`` (a live server over ``settings.repository``), or a server started here for the search."""
    if url is not None:
        return search(settings, url, log)
    server = ServerProcess(settings.repository, device=device)
    try:
        return search(settings, server.url, log)
    finally:
        server.close()
