"""GPU end to end: sentiment (MiniLM) and classifier (EfficientNet-Lite0) served by `serve-models --device cuda`.

Both run on the torch backend (fp16, one CUDA graph per batch/sequence bucket) behind the same dynamic batcher
and HTTP front end as on CPU. In one run: the backend alone (the ceiling, host copies included) per batch size,
then the served throughput and p50/p99 per concurrency for each ``--workers`` count (server and load generator
on the same host, loopback only). Weights are the real architectures with seeded random values unless
``--weights pretrained`` finds the checkpoints: timing does not depend on the values.

Prepare on the CPU box (tokenizer + MiniLM config + the efficientnet_lite_pytorch code, under 1 MB):
    python benchmarks/gpu_modelserver.py --prepare .modelserver_carry
Run on the GPU box (fastapi/uvicorn/pydantic/starlette installed from carried wheels; no onnxruntime-gpu needed):
    python benchmarks/gpu_modelserver.py --carry .modelserver_carry
``--device cpu`` runs the same script eagerly on CPU as a smoke test. Writes JSON to $OUT or benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import yaml
from modelserver_common import ROOT, Server, drive, ensure_repository, machine, web_photo

sys.path.insert(0, str(ROOT))  # this checkout's tokenmill, also when run as `python benchmarks/gpu_modelserver.py`

SENTENCE = "The film was a delight from start to finish, and I would gladly watch it again."
TEXT_LADDER = [1, 2, 4, 8, 16, 32, 64, 128]
IMAGE_LADDER = [1, 2, 4, 8, 16, 32, 64]


def prepare(carry: Path) -> None:
    """Copy what the GPU box lacks and the script needs into ``carry`` (an ignored directory the lead carries)."""
    import efficientnet_lite_pytorch

    from tokenmill.modelserver import bundled

    (carry / "minilm").mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (bundled.minilm_dir() / name).exists():
            shutil.copy(bundled.minilm_dir() / name, carry / "minilm" / name)
    package = Path(efficientnet_lite_pytorch.__file__).parent
    shutil.copytree(package, carry / "python" / package.name, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (carry / "images").mkdir(exist_ok=True)
    for fmt in ("jpeg", "png"):  # the classifier's request bodies (the GPU box has no scikit-image)
        (carry / "images" / f"rocket.{fmt}").write_bytes(web_photo(fmt))
    from modelserver_ort_served import strip_weights

    strip_weights(ensure_repository(Path(tempfile.gettempdir()) / "tokenmill-modelserver-bench" / "base",
                                    ("sentiment",)) / "sentiment/1/model.onnx", carry / "sentiment_graph.onnx")
    size = sum(p.stat().st_size for p in carry.rglob("*") if p.is_file())
    print(f"prepared {carry} ({size / 1e6:.2f} MB): minilm config + tokenizer, efficientnet_lite_pytorch, "
          "rocket.jpeg/png, the weightless sentiment ONNX graph")


def write_repository(root: Path, carry: Path, weights: str, delay_ms: float,
                     names: tuple[str, ...] = ("sentiment", "classifier")) -> Path:
    """A repository of ``names`` on the torch platform (no ONNX files: the torch backend builds from config)."""
    from tokenmill.modelserver import bundled

    minilm = str(carry / "minilm")
    models = {
        "sentiment": {
            "name": "sentiment", "platform": "torch", "max_batch_size": TEXT_LADDER[-1],
            "inputs": [{"name": "input_ids", "datatype": "INT64", "dims": [-1]},
                       {"name": "attention_mask", "datatype": "INT64", "dims": [-1]}],
            "outputs": [{"name": "logits", "datatype": "FP32", "dims": [2]}],
            "dynamic_batching": {"preferred_batch_sizes": [], "max_queue_delay_ms": delay_ms,
                                 "pad_inputs": {"input_ids": 0, "attention_mask": 0}},
            "task": {"kind": "text_classification", "labels": list(bundled.SENTIMENT_LABELS), "tokenizer_dir": minilm},
            "torch": {"model": "sentiment", "weights": weights, "hf_dir": minilm, "dtype": "float16",
                      "batch_sizes": TEXT_LADDER, "seq_lengths": [16, 32, 64, 128]},
        },
        "classifier": {
            "name": "classifier", "platform": "torch", "max_batch_size": IMAGE_LADDER[-1],
            "inputs": [{"name": "images", "datatype": "FP32", "dims": [3, bundled.IMAGE_SIZE, bundled.IMAGE_SIZE]}],
            "outputs": [{"name": "logits", "datatype": "FP32", "dims": [1000]}],
            "dynamic_batching": {"preferred_batch_sizes": [], "max_queue_delay_ms": delay_ms},
            "task": {"kind": "image_classification", "labels_file": "labels.txt", "top_k": 5},
            "torch": {"model": "classifier", "weights": weights, "dtype": "float16", "batch_sizes": IMAGE_LADDER},
        },
    }
    for name in names:
        (root / name / "1").mkdir(parents=True, exist_ok=True)
        (root / name / "config.yaml").write_text(yaml.safe_dump(models[name], sort_keys=False))
    if "classifier" in names:
        (root / "classifier" / "labels.txt").write_text("\n".join(bundled.imagenet_labels()) + "\n")
    return root


def backend_ceiling(repo: Path, device: str, tokenizer, iterations: int, sizes: list[int],
                    names: tuple[str, ...], image_inputs: tuple[str, ...] = ("uint8", "float32")) -> list[dict]:
    """Each model's backend alone, as the server calls it (numpy in, numpy out), per batch size; the classifier
    with uint8 pixels (what /v1/classify sends: normalised on the device) and with float32 tensors (/v2 infer)."""
    import torch

    from tokenmill.modelserver import processing
    from tokenmill.modelserver.model_config import ModelConfig
    from tokenmill.modelserver.torch_backend import TorchServingBackend, build_module

    rows = []
    rng = np.random.default_rng(0)
    cases = [(name, kind) for name in names for kind in (image_inputs if name == "classifier" else ("ids",))]
    for name, kind in cases:
        config = ModelConfig.load(repo / name / "config.yaml")
        start = time.perf_counter()
        backend = TorchServingBackend(build_module(config.torch), config, device)
        setup_s = time.perf_counter() - start
        for batch in [b for b in sizes if b <= config.max_batch_size]:
            if name == "sentiment":
                feeds = processing.tokenize(tokenizer, [SENTENCE] * batch)
            elif kind == "uint8":
                feeds = {"images": rng.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)}
            else:
                feeds = {"images": rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)}
            for _ in range(3):
                backend.run(feeds)
            times = []
            for _ in range(iterations):
                t0 = time.perf_counter()
                backend.run(feeds)
                times.append(time.perf_counter() - t0)
            p50 = statistics.median(times)
            rows.append({"model": name, "input": kind, "batch_size": batch, "p50_ms": round(p50 * 1e3, 3),
                         "items_per_s": round(batch / p50, 1), "cuda_graphs": bool(backend.graphs),
                         "graph_error": backend.graph_error, "graphs": len(backend.graphs),
                         "setup_s": round(setup_s, 1), "seq_len": int(feeds["input_ids"].shape[1]) if name == "sentiment"
                         else None})
            r = rows[-1]
            print(f"backend {name:>10} {kind:>7} batch {batch:>4}: {r['items_per_s']:>10.1f}/s  p50 {r['p50_ms']:.3f} ms"
                  f"  graphs {r['graphs']}", flush=True)
        del backend
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def workloads(parts: set[str], carry: Path, images: tuple[str, ...] = ("jpeg", "png")
              ) -> list[tuple[str, str, bytes, dict, int]]:
    """(label, path, body, headers, items per request) for each served workload of ``parts``."""
    out = []
    if "sentiment" in parts:
        out += [("sentiment x1", "/v1/sentiment/sentiment", json.dumps({"text": SENTENCE}).encode(),
                 {"Content-Type": "application/json"}, 1),
                ("sentiment x64", "/v1/sentiment/sentiment", json.dumps({"text": [SENTENCE] * 64}).encode(),
                 {"Content-Type": "application/json"}, 64)]
    if "classifier" in parts:
        # A real 640 x 427 photograph (--prepare writes it), as JPEG (52 KB) and PNG (313 KB): top-5 back.
        for fmt in images:
            image = carry / "images" / f"rocket.{fmt}"
            if not image.exists():
                raise SystemExit(f"{image} is missing: rerun --prepare on the CPU box and carry it")
            out.append((f"classifier {fmt}", "/v1/classify/classifier?top_k=5", image.read_bytes(),
                        {"Content-Type": f"image/{fmt}"}, 1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare", type=Path, help="write the carry directory here and exit (CPU box)")
    parser.add_argument("--carry", type=Path, default=ROOT / ".modelserver_carry")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--weights", default="random", choices=["random", "pretrained"])
    parser.add_argument("--workers", default="1,4", help="HTTP worker counts to serve with, one server each")
    parser.add_argument("--parts", default="ceiling,sentiment,classifier",
                        help="comma list of ceiling (backends alone), sentiment, classifier (served)")
    parser.add_argument("--concurrency", default="16,64,256")
    parser.add_argument("--classifier-concurrency", default="16,32,64,256")
    parser.add_argument("--batch-concurrency", default="4,16", help="concurrency for 64-sentence requests")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--client-procs", type=int, default=6)
    parser.add_argument("--max-queue-delay-ms", type=float, default=1.0)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--ceiling-batch-sizes", default="1,8,64,128", help="backend-alone batch sizes")
    parser.add_argument("--ceiling-image-inputs", default="uint8,float32",
                        help="classifier inputs timed alone: uint8 pixels (/v1/classify) and/or float32 (/v2 infer)")
    parser.add_argument("--images", default="jpeg,png", help="classifier request bodies to serve")
    args = parser.parse_args()
    if args.prepare:
        prepare(args.prepare)
        return
    if not (args.carry / "minilm" / "tokenizer.json").exists():
        raise SystemExit(f"{args.carry} has no minilm/tokenizer.json: run --prepare on the CPU box and carry it")
    missing = [m for m in ("fastapi", "uvicorn", "starlette", "pydantic") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"missing {missing}: install the carried wheels first (pip install --no-deps .whl/*.whl)")
    sys.path.insert(0, str(args.carry / "python"))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(args.carry / "python"), os.environ.get("PYTHONPATH", "")])
    started = time.perf_counter()
    load_at_start = list(os.getloadavg())

    from tokenmill.modelserver import bundled

    tokenizer = bundled.load_tokenizer(args.carry / "minilm")
    parts = set(args.parts.split(","))
    unknown = parts - {"ceiling", "sentiment", "classifier"}
    if unknown:
        raise SystemExit(f"--parts: unknown {sorted(unknown)}; pick from ceiling, sentiment, classifier")
    names = tuple(n for n in ("sentiment", "classifier") if n in parts) or ("sentiment", "classifier")
    repo = write_repository(Path(tempfile.mkdtemp(prefix="tokenmill-gpu-models-")), args.carry.resolve(),
                            args.weights, args.max_queue_delay_ms, names)
    ceiling = []
    if "ceiling" in parts:
        ceiling = backend_ceiling(repo, args.device, tokenizer, args.iterations,
                                  [int(b) for b in args.ceiling_batch_sizes.split(",")], names,
                                  tuple(args.ceiling_image_inputs.split(",")))
    served: list[dict] = []
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"gpu_modelserver_{args.device}_{dt.datetime.now(dt.UTC).strftime('%Y-%m-%d_%H%M')}.json"

    def save() -> None:  # after each stage, so a run cut by its time limit still leaves what it measured
        payload = {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "machine": machine(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "device": args.device,
            "weights": args.weights, "load_average_at_start": load_at_start, "load_average_now": list(os.getloadavg()),
            "wall_s": round(time.perf_counter() - started, 1), "max_queue_delay_ms": args.max_queue_delay_ms,
            "client_procs": args.client_procs, "seconds_per_level": args.seconds, "parts": sorted(parts),
            "images": {fmt: len((args.carry / "images" / f"rocket.{fmt}").read_bytes()) for fmt in ("jpeg", "png")
                       if (args.carry / "images" / f"rocket.{fmt}").exists()},
            "backend_ceiling": ceiling, "served": served,
            "note": "torch backend fp16 + CUDA graphs per bucket; ceiling = backend.run() on numpy inputs (host "
                    "copies included); served = closed loop over the task endpoints, server and clients on one host; "
                    "server_cpu_ms_per_request = all server processes' CPU / requests; mean_batch_size with 1 worker only",
        }
        path.write_text(json.dumps(payload, indent=2))

    save()
    work = workloads(parts, args.carry, tuple(args.images.split(",")))
    print(f"{'workers':>7} {'workload':>18} {'clients':>7} {'req/s':>9} {'items/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'fail':>5} {'batch':>6} {'cpu ms/req':>10}")
    for workers in [int(w) for w in args.workers.split(",")] if work else []:
        server = Server(repo, device=args.device, extra_args=["--backend", "torch", "--workers", str(workers)])
        try:
            for label, path_, body, headers, items in work:
                model = label.split()[0]
                levels = (args.batch_concurrency if items > 1 else args.classifier_concurrency
                          if model == "classifier" else args.concurrency)
                drive(server.url + path_, body, headers, 8, 2.0, 2)  # warm-up: every worker, both models
                for level in [int(c) for c in levels.split(",")]:
                    s0, r0 = server.mean_batch_size(model)
                    cpu0 = server.cpu_seconds()
                    result = drive(server.url + path_, body, headers, level, args.seconds, args.client_procs)
                    cpu_ms = (server.cpu_seconds() - cpu0) * 1000 / max(1, result.requests)
                    s1, r1 = server.mean_batch_size(model)
                    # /metrics answers from one worker at a time: a batch size only with one worker
                    result.mean_batch_size = round((s1 - s0) / max(1.0, r1 - r0), 2) if workers == 1 else None
                    row = {"workers": workers, "workload": label, "items_per_request": items, **asdict(result),
                           "items_per_s": round(result.throughput_rps * items, 1),
                           "server_cpu_ms_per_request": round(cpu_ms, 3)}
                    served.append(row)
                    print(f"{workers:>7} {label:>18} {level:>7} {result.throughput_rps:>9.1f} {row['items_per_s']:>9.1f}"
                          f" {result.p50_ms:>8.2f} {result.p99_ms:>8.2f} {result.failed:>5}"
                          f" {str(result.mean_batch_size):>6} {cpu_ms:>10.3f}", flush=True)
        finally:
            server.close()
        save()
    save()
    print(f"wrote {path} ({round(time.perf_counter() - started, 1)} s)")


if __name__ == "__main__":
    main()
