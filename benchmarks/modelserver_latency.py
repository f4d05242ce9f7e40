"""Latency scenario: classifier p99 under Poisson load, and the load at which p99 crosses a stated budget.

Usage: .venv/bin/python benchmarks/modelserver_latency.py [--rates 2,5,10,15,20,30] [--budget-ms 250] [--seconds 15]
Open-loop arrivals (latency includes queueing), dynamic batching on (max_queue_delay 5 ms). Writes results/modelserver_latency_*.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

from modelserver_batching import CONFIGS
from modelserver_common import (
    Server,
    binary_body,
    ensure_repository,
    open_loop,
    variant_repository,
    write_result,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="2,5,10,15,20,30")
    parser.add_argument("--budget-ms", type=float, default=250.0)
    parser.add_argument("--stated-rate", type=float, default=10.0, help="the load whose p99 is reported")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "tokenmill-modelserver-bench")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    args = parser.parse_args()
    load_at_start = list(os.getloadavg())

    from skimage import data

    from tokenmill.modelserver import processing

    base = ensure_repository(args.work_dir / "base", ("classifier",))
    repo = variant_repository(base, args.work_dir / "dynamic", "classifier", **CONFIGS["dynamic"])
    body, headers = binary_body({"images": processing.preprocess_image(data.chelsea())[None]})
    rates = sorted({float(r) for r in args.rates.split(",")} | {args.stated_rate})
    results = []
    server = Server(repo, device=args.device)
    try:
        url = f"{server.url}/v2/models/classifier/infer"
        asyncio.run(open_loop(url, body, headers, 5.0, 2.0))  # warm-up
        for rate in rates:
            samples0, runs0 = server.mean_batch_size("classifier")
            result = asyncio.run(open_loop(url, body, headers, rate, args.seconds))
            samples1, runs1 = server.mean_batch_size("classifier")
            result.mean_batch_size = round((samples1 - samples0) / max(1.0, runs1 - runs0), 2)
            results.append(asdict(result))
            print(f"rate {rate:6.1f}/s: achieved {result.throughput_rps:6.1f}/s  p50 {result.p50_ms:7.1f} ms"
                  f"  p99 {result.p99_ms:8.1f} ms  mean batch {result.mean_batch_size}")
            if result.p99_ms > 4 * args.budget_ms:
                break  # far past the budget: higher rates only grow the queue
    finally:
        server.close()
    stated = next(r for r in results if r["level"] == args.stated_rate)
    over = [r for r in results if r["p99_ms"] > args.budget_ms]
    under = [r for r in results if r["p99_ms"] <= args.budget_ms]
    crossing = {
        "budget_ms": args.budget_ms,
        "highest_rate_within_budget": max((r["level"] for r in under), default=None),
        "lowest_rate_over_budget": min((r["level"] for r in over), default=None),
    }
    print(f"p99 at {args.stated_rate}/s: {stated['p99_ms']} ms; budget {args.budget_ms} ms crossed between "
          f"{crossing['highest_rate_within_budget']} and {crossing['lowest_rate_over_budget']} req/s")
    path = write_result("modelserver_latency", {
        "load_average_at_start": load_at_start,
        "note": "classifier = EfficientNet-Lite0 fp32 ONNX, onnxruntime CPU EP, one image per request, "
                "Poisson arrivals; the host CPU is shared with other jobs (see load averages)",
        "config": CONFIGS["dynamic"], "stated_rate": args.stated_rate, "p99_at_stated_rate_ms": stated["p99_ms"],
        "crossing": crossing, "results": results,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
