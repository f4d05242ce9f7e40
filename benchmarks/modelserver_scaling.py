"""Served scaling: the task endpoints under 16 → 256 closed-loop clients, one or more server builds in one run.

Usage: .venv/bin/python benchmarks/modelserver_scaling.py [--model sentiment|classifier] [--concurrency 16,64]
       [--seconds 8] [--client aiohttp|httpx] [--client-procs 2] [--server this:--http-workers 2 ...]
       [--baseline-root /work/main]
Each ``--server`` is ``LABEL:EXTRA ARGS`` for ``tokenmill serve-models`` (run from this checkout);
``--baseline-root`` adds a server started from another checkout (e.g. main) so A/B share one run and one load.
Requests: sentiment = one sentence per ``POST /v1/sentiment/{m}``; classifier = one photo (``--image jpeg|png``,
640 x 427, see ``web_photo``) per ``/v1/classify/{m}`` with top-5 back.
The load generator runs in ``--client-procs`` processes (raw keep-alive HTTP/1.1 on asyncio) so the client is not
the limit; ``--client httpx --client-procs 1`` reproduces the older single-process httpx client. Loopback only, bounded by --seconds.
Writes results/modelserver_scaling_*.json with date, machine, command and load averages.
"""

from __future__ import annotations

import argparse
import os
import shlex
import tempfile
from dataclasses import asdict
from pathlib import Path

from modelserver_common import (
    ROOT,
    Server,
    drive,
    ensure_repository,
    tiny_classifier_repository,
    variant_repository,
    web_photo,
    write_result,
)

SENTENCE = "The film was a delight from start to finish, and I would gladly watch it again."


def task_request(model: str, image: str = "jpeg") -> tuple[str, bytes, dict]:
    if model == "sentiment":
        import json

        return "/v1/sentiment/sentiment", json.dumps({"text": SENTENCE}).encode(), {"Content-Type": "application/json"}
    return "/v1/classify/classifier?top_k=5", web_photo(image), {"Content-Type": f"image/{image}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sentiment", choices=["sentiment", "classifier"])
    parser.add_argument("--concurrency", default="16,64")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--client", default="raw", choices=["raw", "aiohttp", "httpx"])
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--server", action="append", default=[],
                        help="LABEL:EXTRA serve-models ARGS (repeatable); default one server labelled 'this'")
    parser.add_argument("--baseline-root", type=Path, help="also serve from this checkout (label 'baseline')")
    parser.add_argument("--base-repository", type=Path,
                        help="take the model from this repository instead of exporting the bundled one (e.g. a "
                             "tiny BERT exported with `tokenmill export --hf-dir`, to time the front end alone)")
    parser.add_argument("--image", default="jpeg", choices=["jpeg", "png"], help="classifier request body format")
    parser.add_argument("--tiny-classifier", action="store_true",
                        help="classifier: serve a near-zero-compute model of the same tensors (times the front end)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-queue-delay-ms", type=float, default=5.0)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "tokenmill-modelserver-bench")
    args = parser.parse_args()
    load_at_start = list(os.getloadavg())
    levels = [int(c) for c in args.concurrency.split(",")]

    if args.tiny_classifier and args.model != "classifier":
        raise SystemExit("--tiny-classifier needs --model classifier")
    if args.tiny_classifier:
        base = tiny_classifier_repository(args.work_dir / "tiny_classifier")
    else:
        base = args.base_repository or ensure_repository(args.work_dir / "base", (args.model,))
    batching = {"preferred_batch_sizes": [args.max_batch_size], "max_queue_delay_ms": args.max_queue_delay_ms}
    if args.model == "sentiment":
        batching["pad_inputs"] = {"input_ids": 0, "attention_mask": 0}
    config = {"max_batch_size": args.max_batch_size, "instance_count": 1, "dynamic_batching": batching}
    repo = variant_repository(base, args.work_dir / f"scaling_{args.model}", args.model, **config)
    path, body, headers = task_request(args.model, args.image)

    servers = [(label, shlex.split(extra), ROOT) for label, _, extra in (s.partition(":") for s in args.server)]
    servers = servers or [("this", [], ROOT)]
    if args.baseline_root:
        servers.insert(0, ("baseline", [], args.baseline_root.resolve()))
    rows = []
    print(f"{'server':>14} {'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'fail':>5} {'batch':>6} "
          f"{'cpu ms/req':>8}")
    for label, extra, root in servers:
        server = Server(repo, device=args.device, extra_args=extra, root=root)
        try:
            url = server.url + path
            drive(url, body, headers, 4, 2.0, 1, args.client)  # warm-up
            for level in levels:
                s0, r0 = server.mean_batch_size(args.model)
                cpu0 = server.cpu_seconds()
                result = drive(url, body, headers, level, args.seconds, args.client_procs, args.client)
                cpu_ms = (server.cpu_seconds() - cpu0) * 1000 / max(1, result.requests)
                s1, r1 = server.mean_batch_size(args.model)
                result.mean_batch_size = round((s1 - s0) / max(1.0, r1 - r0), 2)
                rows.append({"server": label, "server_args": extra, "root": str(root), **asdict(result),
                             "server_cpu_ms_per_request": round(cpu_ms, 2)})
                print(f"{label:>14} {level:>7} {result.throughput_rps:>8.1f} {result.p50_ms:>8.1f} "
                      f"{result.p99_ms:>8.1f} {result.failed:>5} {result.mean_batch_size:>6} {cpu_ms:>8.2f}")
        finally:
            server.close()
    ratios = {}
    for label, _, _ in servers:
        mine = {r["level"]: r["throughput_rps"] for r in rows if r["server"] == label}
        if len(levels) > 1 and mine.get(levels[0]):
            ratios[label] = round(mine[levels[-1]] / mine[levels[0]], 3)
    print("throughput at", levels[-1], "/ at", levels[0], "clients:", ratios)
    out = write_result(f"modelserver_scaling_{args.model}", {
        "load_average_at_start": load_at_start, "model": args.model, "config": config, "client": args.client,
        "image": f"{args.image}, {len(body)} bytes" if args.model == "classifier" else None,
        "base_repository": str(args.base_repository) if args.base_repository else None,
        "tiny_classifier": args.tiny_classifier,
        "client_procs": args.client_procs, "seconds": args.seconds, "results": rows,
        "scaling_ratio_last_over_first": ratios,
        "note": "closed loop, one item per request over the task endpoint; client and server share this host's "
                "cores, so compare servers within one file only",
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
