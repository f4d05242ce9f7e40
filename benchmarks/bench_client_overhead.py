"""Client overhead of ``tokenmill bench serve``: the load generator against a null server that streams instantly.

The null server (tests/bench/fake_server.py, a separate process) sends N one-token chunks with no delay, so
E2E at concurrency 1 bounds the client's per-request cost from above, and the client's own CPU time
(time.process_time of this process) is its cost alone. Writes benchmarks/results/bench_client_overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from tokenmill.bench.client import Target
from tokenmill.bench.datasets import random_dataset
from tokenmill.bench.loadgen import LoadConfig, run_loads
from tokenmill.bench.metrics import summarize

ROOT = Path(__file__).resolve().parents[1]


def _fake_server_module():
    spec = importlib.util.spec_from_file_location("fake_server", ROOT / "tests" / "bench" / "fake_server.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fake_server"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def measure(url: str, num_requests: int, tokens: int, concurrency: int) -> dict:
    target = Target(url, "null", "completions", timeout_s=60)
    requests = random_dataset(num_requests, 8, tokens, tokenizer=None, seed=0)
    load = LoadConfig(max_concurrency=concurrency, warmup=min(50, num_requests), progress=False)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    (result,) = asyncio.run(run_loads(target, requests, [load]))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    s = summarize(result.records)
    chunks = sum(len(r.token_times) for r in result.records)
    return {
        "concurrency": concurrency,
        "requests": s["num_sent"],
        "failed": s["num_failed"],
        "tokens_per_request": tokens,
        "requests_per_s": round(s["request_throughput"], 1),
        "chunks_per_s": round(chunks / s["duration_s"], 0),
        "e2e_mean_ms": round(s["e2e_ms"]["mean"], 3),
        "e2e_p99_ms": round(s["e2e_ms"]["p99"], 3),
        "ttft_mean_ms": round(s["ttft_ms"]["mean"], 3),
        "itl_mean_ms": round(s["itl_ms"]["mean"], 4),
        "client_cpu_ms_per_request": round(1000 * cpu / (num_requests + load.warmup), 3),
        "client_cpu_us_per_chunk": round(1e6 * cpu / max(1, chunks + load.warmup * tokens), 2),
        "wall_s_including_warmup": round(wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=64, help="chunks streamed per request")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument(
        "--output", default=str(ROOT / "benchmarks" / "results" / "bench_client_overhead.json")
    )
    args = parser.parse_args()
    fake = _fake_server_module()
    rows = []
    with fake.running_fake_server("--mode", "ok") as url:
        for c in (int(v) for v in args.concurrency.split(",")):
            rows.append(measure(url, args.num_requests, args.tokens, c))
            print(json.dumps(rows[-1]), flush=True)
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, python {platform.python_version()}",
        "load_average_at_end": os.getloadavg(),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "note": "null server in a separate process on 127.0.0.1; client CPU = this process only",
        "results": rows,
    }
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
