"""Throughput scenario: MiniLM sentiment (BERT-family) samples/s per batch size, backend and device; best config.

Usage: .venv/bin/python benchmarks/modelserver_bert.py [--backend onnxruntime|torch] [--device cpu|cuda]
       [--batch-sizes 1,2,4,8,16,32,64] [--seq-len 32] [--serve-seconds 10]
Part 1 times the backend directly (trtexec-like); part 2 (onnxruntime only) serves the model with dynamic
batching and drives it with one sentence per request to show served throughput. Writes results/modelserver_bert_*.json.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per sentence (short reviews are ~16-40)")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--half", action="store_true", help="torch backend: fp16 weights and activations")
    parser.add_argument("--hf-dir", type=Path, help="a copy of the MiniLM directory (default: the installed package)")
    parser.add_argument("--serve-seconds", type=float, default=10.0, help="0 skips the served part")
    parser.add_argument("--serve-concurrency", type=int, default=32)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "tokenmill-modelserver-bench")
    args = parser.parse_args()
    load_at_start = list(os.getloadavg())

    from tokenmill.modelserver.bench_model import bench_model

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    report = bench_model("sentiment", (args.backend,), args.device, batch_sizes, seq_len=args.seq_len,
                         iterations=args.iterations, warmup=2, onnx_dir=args.work_dir / "onnx",
                         hf_dir=args.hf_dir, half=args.half)
    best = max(report["results"], key=lambda r: r["throughput_per_s"])
    print(f"best: batch {best['batch_size']} -> {best['throughput_per_s']:.1f} sentences/s ({args.backend}, {args.device})")

    served = None
    if args.serve_seconds > 0 and args.backend == "onnxruntime":
        from tokenmill.modelserver import bundled, processing

        base = ensure_repository(args.work_dir / "base", ("sentiment",), hf_dir=args.hf_dir)
        max_batch = max(best["batch_size"], 2)
        config = {"max_batch_size": max_batch, "instance_count": 1,
                  "dynamic_batching": {"preferred_batch_sizes": [max_batch], "max_queue_delay_ms": 10.0,
                                       "pad_inputs": {"input_ids": 0, "attention_mask": 0}}}
        repo = variant_repository(base, args.work_dir / "bert_best", "sentiment", **config)
        feeds = processing.tokenize(bundled.load_tokenizer(args.hf_dir), ["word " * (args.seq_len - 2)])
        body, headers = binary_body(feeds)
        server = Server(repo, device=args.device)
        try:
            url = f"{server.url}/v2/models/sentiment/infer"
            asyncio.run(closed_loop(url, body, headers, 4, 2.0))
            s0, r0 = server.mean_batch_size("sentiment")
            result = asyncio.run(closed_loop(url, body, headers, args.serve_concurrency, args.serve_seconds))
            s1, r1 = server.mean_batch_size("sentiment")
            result.mean_batch_size = round((s1 - s0) / max(1.0, r1 - r0), 2)
        finally:
            server.close()
        served = {"config": config, "seq_len": int(feeds["input_ids"].shape[1]), **asdict(result)}
        print(f"served: {result.throughput_rps:.1f} sentences/s at concurrency {args.serve_concurrency},"
              f" mean batch {result.mean_batch_size}, p99 {result.p99_ms} ms")
    tag = f"{args.backend}_{args.device}" + ("_fp16" if args.half else "")
    path = write_result(f"modelserver_bert_{tag}", {
        "load_average_at_start": load_at_start,
        "note": "sentiment = all-MiniLM-L6-v2 encoder + shipped logistic head, fp32; synthetic ids of --seq-len; "
                "the host CPU is shared with other jobs (see load averages)",
        "backend_results": report["results"], "providers": report.get("providers"), "best": best, "served": served,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
