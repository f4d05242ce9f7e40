"""Dynamic batching vs batch-1 serving: the EfficientNet-Lite0 classifier behind tokenmill serve-models (CPU).

Usage: .venv/bin/python benchmarks/modelserver_batching.py [--concurrency 1,4,8,16] [--seconds 10]
Each client sends one 224x224 image per request (binary tensors); the server either merges queued requests
(max_batch_size 16, preferred 4/8, max_queue_delay 5 ms or 0 ms) or runs each alone. Writes results/modelserver_batching_*.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

from modelserver_common import (
    Server,
    binary_body,
    closed_loop,
    ensure_repository,
    variant_repository,
    write_result,
)

CONFIGS = {
    "batch1": {"dynamic_batching": None, "instance_count": 1},
    "dynamic": {"dynamic_batching": {"preferred_batch_sizes": [4, 8], "max_queue_delay_ms": 5.0, "pad_inputs": {}},
                "max_batch_size": 16, "instance_count": 1},
    # Delay 0 = batch while busy: no wait at low load, merging only what queued during the previous batch.
    "dynamic_nodelay": {"dynamic_batching": {"preferred_batch_sizes": [4, 8], "max_queue_delay_ms": 0.0,
                                             "pad_inputs": {}}, "max_batch_size": 16, "instance_count": 1},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "tokenmill-modelserver-bench")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    args = parser.parse_args()
    load_at_start = list(os.getloadavg())

    from skimage import data

    from tokenmill.modelserver import processing

    base = ensure_repository(args.work_dir / "base", ("classifier",))
    body, headers = binary_body({"images": processing.preprocess_image(data.chelsea())[None]})
    results = []
    for label, overrides in CONFIGS.items():
        repo = variant_repository(base, args.work_dir / label, "classifier", **overrides)
        server = Server(repo, device=args.device)
        try:
            url = f"{server.url}/v2/models/classifier/infer"
            asyncio.run(closed_loop(url, body, headers, 2, 2.0))  # warm-up
            for concurrency in [int(c) for c in args.concurrency.split(",")]:
                samples0, runs0 = server.mean_batch_size("classifier")
                result = asyncio.run(closed_loop(url, body, headers, concurrency, args.seconds))
                samples1, runs1 = server.mean_batch_size("classifier")
                result.mean_batch_size = round((samples1 - samples0) / max(1.0, runs1 - runs0), 2)
                row = {"config": label, **asdict(result)}
                results.append(row)
                print(f"{label:>8} c={concurrency:>3}: {result.throughput_rps:7.1f} req/s  p50 {result.p50_ms:7.1f} ms"
                      f"  p99 {result.p99_ms:7.1f} ms  mean batch {result.mean_batch_size}")
        finally:
            server.close()
    speedup = {}
    for row in results:
        if row["config"] != "batch1":
            ref = next(r for r in results if r["config"] == "batch1" and r["level"] == row["level"])
            speedup.setdefault(row["config"], {})[str(row["level"])] = round(row["throughput_rps"] / ref["throughput_rps"], 2)
    print("throughput / batch1 by concurrency:", speedup)
    path = write_result("modelserver_batching", {
        "load_average_at_start": load_at_start,
        "note": "classifier = EfficientNet-Lite0 fp32 ONNX on onnxruntime CPU EP; one image per request; "
                "closed loop; the host CPU is shared with other jobs (see load averages)",
        "configs": CONFIGS, "results": results, "throughput_ratio_over_batch1": speedup,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
