"""Acceptance 3 (test part): under a bounded concurrent load the server merges requests (mean batch size > 1).

The throughput comparison against batch-1 serving lives in benchmarks/modelserver_batching.py.
"""

from __future__ import annotations

import httpx
import numpy as np
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families
from skimage import data

from tokenmill.modelserver import processing

CONCURRENCY = 8
REQUESTS = 24


def batch_histogram(server: str, model: str) -> tuple[float, float]:
    """(sum, count) of tokenmill_model_batch_size for ``model``."""
    text = httpx.get(f"http://{server}/metrics", timeout=10).text
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "tokenmill_model_batch_size":
            continue
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            if sample.name.endswith("_sum"):
                total += sample.value
            elif sample.name.endswith("_count"):
                count += sample.value
    return total, count


def test_concurrent_requests_are_merged(server):
    rows = np.concatenate([processing.preprocess_image(data.chelsea())[None],
                           processing.preprocess_image(data.astronaut())[None]])
    sum_before, count_before = batch_histogram(server, "classifier")
    with triton.InferenceServerClient(url=server, concurrency=CONCURRENCY) as client:
        handles, expected = [], []
        for i in range(REQUESTS):
            tensor = triton.InferInput("images", [1, 3, 224, 224], "FP32")
            tensor.set_data_from_numpy(rows[i % 2 : i % 2 + 1])
            handles.append(client.async_infer("classifier", [tensor]))
            expected.append(i % 2)
        logits = [h.get_result().as_numpy("logits") for h in handles]
    sum_after, count_after = batch_histogram(server, "classifier")
    samples, executions = sum_after - sum_before, count_after - count_before
    assert samples == REQUESTS
    assert samples / executions > 1.0, f"mean batch size {samples / executions:.2f}"
    # Merged requests get their own rows back: chelsea rows agree with each other, astronaut rows too.
    by_image = {k: np.concatenate([lg for lg, e in zip(logits, expected, strict=True) if e == k]) for k in (0, 1)}
    for block in by_image.values():
        np.testing.assert_allclose(block, np.broadcast_to(block[0], block.shape), atol=1e-3)
    assert by_image[0][0].argmax() != by_image[1][0].argmax()


def test_metrics_exposes_counters(server):
    text = httpx.get(f"http://{server}/metrics", timeout=10).text
    for name in ("tokenmill_model_inference_count_total", "tokenmill_model_request_failure_total",
                 "tokenmill_model_queue_seconds_bucket", "tokenmill_model_compute_seconds_bucket",
                 "tokenmill_model_batch_size_bucket"):
        assert name in text
