"""Sentiment on ONNX Runtime's CPU EP: the backend called directly vs served, and served under 16 -> 256 clients.

Part 1 (direct): one InferenceSession on every core, with spinning threads (ORT's default for a lone caller) and
without, runs the MiniLM sentiment graph on ``--batch-sizes`` copies of the benchmark sentence: sentences/s per
batch size; the best of all is the reference.
Part 2 (served): ``tokenmill serve-models`` over the same graph (dynamic batching up to ``--max-batch-size``,
``--workers`` HTTP processes with the cores split between their sessions) gets one sentence per
``POST /v1/sentiment/sentiment`` from closed-loop clients at each ``--concurrency``. Reported: served/direct and the
throughput at the last concurrency over the first (issue 26: >= 0.8 of direct on 16 cores; no collapse = >= 0.9).

The graph: ``--onnx FILE`` (fp32, e.g. from ``tokenmill export``), or ``--graph FILE`` written by
``--strip-weights``: the same graph with its weight matrices left out (a few hundred KB instead of 90 MB, so it
fits the device transfer) and refilled here with seeded random values of each matrix's recorded scale (timing only:
ORT's CPU kernels do not depend on the values). Without either, the bundled model is exported (this CPU box).
    python benchmarks/modelserver_ort_served.py --strip-weights .modelserver_carry/sentiment_graph.onnx
    python benchmarks/modelserver_ort_served.py --graph .modelserver_carry/sentiment_graph.onnx \
        --tokenizer-dir .modelserver_carry/minilm --workers 4
Loopback only, bounded by --seconds per level. Writes modelserver_ort_served_*.json to $OUT or benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import yaml
from modelserver_common import Server, drive, ensure_repository, write_result

SENTENCE = "The film was a delight from start to finish, and I would gladly watch it again."
RANDOM_MARK = "tokenmill:random std="  # doc_string of a weight left out by --strip-weights


def strip_weights(src: Path, dst: Path) -> None:
    """Copy ``src`` without its float matrices (ndim >= 2): each keeps its shape and its std in the doc string."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    for tensor in model.graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT and len(tensor.dims) >= 2:
            std = float(numpy_helper.to_array(tensor).std())
            tensor.ClearField("raw_data")
            tensor.ClearField("float_data")
            tensor.doc_string = f"{RANDOM_MARK}{std:.6g}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    print(f"wrote {dst} ({dst.stat().st_size / 1e3:.0f} KB, from {src.stat().st_size / 1e6:.1f} MB)")


def fill_weights(src: Path, dst: Path, seed: int = 0) -> Path:
    """The inverse of ``strip_weights``: every left-out matrix gets seeded normal values of its recorded std."""
    import onnx
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)
    model = onnx.load(str(src))
    for tensor in model.graph.initializer:
        if tensor.doc_string.startswith(RANDOM_MARK):
            std = float(tensor.doc_string.removeprefix(RANDOM_MARK))
            values = rng.normal(0.0, std, size=tuple(tensor.dims)).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    onnx.save(model, str(dst))
    return dst


def direct(path: Path, tokenizer, batch_sizes: list[int], min_seconds: float, spinning: bool) -> list[dict]:
    """Sentences/s of one session on every core, per batch size (``spinning``: ORT's lone-caller default, best on
    idle cores; without it a host shared with other jobs does better)."""
    from tokenmill.modelserver.backends import OrtBackend
    from tokenmill.modelserver.processing import tokenize

    backend = OrtBackend(path, instances=1, device="cpu", spinning=spinning)
    rows = []
    for batch in batch_sizes:
        feeds = tokenize(tokenizer, [SENTENCE] * batch)
        for _ in range(2):
            backend.run(feeds)
        times, start = [], time.perf_counter()
        while len(times) < 5 or time.perf_counter() - start < min_seconds:
            t0 = time.perf_counter()
            backend.run(feeds)
            times.append(time.perf_counter() - t0)
        p50 = statistics.median(times)
        rows.append({"spinning": spinning, "batch_size": batch, "seq_len": int(feeds["input_ids"].shape[1]),
                     "iterations": len(times), "p50_ms": round(p50 * 1e3, 3), "sentences_per_s": round(batch / p50, 1)})
        print(f"direct ORT spinning {'on ' if spinning else 'off'} batch {batch:>4}: "
              f"{rows[-1]['sentences_per_s']:>9.1f} sentences/s  p50 {p50 * 1e3:.2f} ms", flush=True)
    return rows


def write_repository(root: Path, graph: Path, tokenizer_dir: Path, max_batch: int, delay_ms: float) -> Path:
    from tokenmill.modelserver import bundled

    (root / "sentiment" / "1").mkdir(parents=True, exist_ok=True)
    link = root / "sentiment" / "1" / "model.onnx"
    if not link.exists():
        link.symlink_to(graph.resolve())
    config = {
        "name": "sentiment", "platform": "onnxruntime", "max_batch_size": max_batch,
        "inputs": [{"name": "input_ids", "datatype": "INT64", "dims": [-1]},
                   {"name": "attention_mask", "datatype": "INT64", "dims": [-1]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "dims": [2]}],
        "dynamic_batching": {"preferred_batch_sizes": [max_batch], "max_queue_delay_ms": delay_ms,
                             "pad_inputs": {"input_ids": 0, "attention_mask": 0}},
        "task": {"kind": "text_classification", "labels": list(bundled.SENTIMENT_LABELS),
                 "tokenizer_dir": str(tokenizer_dir.resolve())},
    }
    (root / "sentiment" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strip-weights", type=Path, help="write the weightless graph here and exit")
    parser.add_argument("--onnx", type=Path, help="an fp32 sentiment graph (default: export the bundled one)")
    parser.add_argument("--graph", type=Path, help="a graph written by --strip-weights (refilled with random values)")
    parser.add_argument("--tokenizer-dir", type=Path, help="MiniLM tokenizer directory (default: the bundled one)")
    parser.add_argument("--batch-sizes", default="1,16,32,64,128")
    parser.add_argument("--direct-seconds", type=float, default=2.0, help="minimum timing window per batch size")
    parser.add_argument("--direct-spinning", default="on,off", help="ORT thread spinning modes timed directly")
    parser.add_argument("--workers", default="1", help="HTTP worker counts, one server each (e.g. 1,4)")
    parser.add_argument("--max-batch-size", type=int, default=64, help="served max_batch_size")
    parser.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    parser.add_argument("--concurrency", default="16,64,256")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "tokenmill-modelserver-bench")
    args = parser.parse_args()
    if args.strip_weights:
        source = args.onnx or ensure_repository(args.work_dir / "base", ("sentiment",)) / "sentiment/1/model.onnx"
        strip_weights(source, args.strip_weights)
        return
    load_at_start = list(os.getloadavg())
    started = time.perf_counter()

    from tokenmill.modelserver import bundled

    tokenizer_dir = args.tokenizer_dir or bundled.minilm_dir()
    tokenizer = bundled.load_tokenizer(tokenizer_dir)
    work = Path(tempfile.mkdtemp(prefix="ort-served-", dir=args.work_dir if args.work_dir.is_dir() else None))
    if args.graph:
        graph, weights = fill_weights(args.graph, work / "sentiment_random.onnx"), "random (seeded, recorded std)"
    else:
        graph = args.onnx or ensure_repository(args.work_dir / "base", ("sentiment",)) / "sentiment/1/model.onnx"
        weights = "as in the file"
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    direct_rows = [row for mode in args.direct_spinning.split(",")
                   for row in direct(graph, tokenizer, sizes, args.direct_seconds, mode == "on")]
    best = max(direct_rows, key=lambda r: r["sentences_per_s"])
    max_batch = args.max_batch_size
    repo = write_repository(work / "repository", graph, tokenizer_dir, max_batch, args.max_queue_delay_ms)
    body, headers = json.dumps({"text": SENTENCE}).encode(), {"Content-Type": "application/json"}
    levels = [int(c) for c in args.concurrency.split(",")]
    served, summary = [], []
    print(f"{'workers':>7} {'clients':>7} {'req/s':>9} {'of direct':>9} {'p50 ms':>8} {'p99 ms':>8} {'fail':>5} "
          f"{'batch':>6}")
    for workers in [int(w) for w in args.workers.split(",")]:
        server = Server(repo, device="cpu", extra_args=["--workers", str(workers)])
        try:
            url = server.url + "/v1/sentiment/sentiment"
            drive(url, body, headers, 8, 2.0, 1)  # warm-up
            for level in levels:
                s0, r0 = server.mean_batch_size("sentiment")
                result = drive(url, body, headers, level, args.seconds, args.client_procs)
                s1, r1 = server.mean_batch_size("sentiment")
                # /metrics answers from one worker at a time: a batch size only with one worker
                result.mean_batch_size = round((s1 - s0) / max(1.0, r1 - r0), 2) if workers == 1 else None
                ratio = round(result.throughput_rps / best["sentences_per_s"], 3)
                served.append({"workers": workers, **asdict(result), "of_direct_best": ratio})
                print(f"{workers:>7} {level:>7} {result.throughput_rps:>9.1f} {ratio:>9.3f} {result.p50_ms:>8.2f} "
                      f"{result.p99_ms:>8.2f} {result.failed:>5} {str(result.mean_batch_size):>6}", flush=True)
        finally:
            server.close()
        mine = [r for r in served if r["workers"] == workers]
        summary.append({
            "workers": workers, "best_served_rps": max(r["throughput_rps"] for r in mine),
            "best_of_direct": max(r["of_direct_best"] for r in mine),
            "last_over_first": round(mine[-1]["throughput_rps"] / max(mine[0]["throughput_rps"], 1e-9), 3),
            "errors": sum(r["failed"] for r in mine),
        })
        print(f"workers {workers}: best served {summary[-1]['best_of_direct']:.3f} of direct batch "
              f"{best['batch_size']} (spinning {'on' if best['spinning'] else 'off'}); {levels[-1]} / {levels[0]} clients = {summary[-1]['last_over_first']}; "
              f"errors {summary[-1]['errors']}")
    out = write_result("modelserver_ort_served", {
        "load_average_at_start": load_at_start, "cpu_count": os.cpu_count(), "weights": weights,
        "sentence": SENTENCE, "direct": direct_rows, "direct_best": best, "served_max_batch_size": max_batch,
        "max_queue_delay_ms": args.max_queue_delay_ms, "client_procs": args.client_procs,
        "seconds_per_level": args.seconds, "served": served, "summary": summary,
        "wall_s": round(time.perf_counter() - started, 1),
        "note": "direct = one ORT CPU session, all cores, threads spinning or not (the best is the reference); served = "
                "serve-models, ORT threads split between worker processes, no spinning; one sentence per request, "
                "closed loop, load generator on the same host",
    }, out_dir=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
