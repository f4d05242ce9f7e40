"""``tokenmill export | serve-models | bench-model``: the ONNX pipeline, the KServe v2 server, the trtexec-like bench.

Registered by tokenmill/cli.py through ``register(subparsers)``; heavy imports happen inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BUNDLED = ("classifier", "sentiment")
# `tokenmill export` exit statuses: 0 every graph passed; 1 the fp32 ONNX graph differs from PyTorch beyond --atol
# (nothing registered); 2 bad arguments; 3 a variant failed --min-top1-agreement (deleted; the fp32 model and
# the passing variants are in the repository). --keep-failed-variants keeps the file and exits 0.
EXPORT_VALIDATION_FAILED = 1
EXPORT_VARIANT_FAILED = 3


def register(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser("export", help="torch -> ONNX -> simplify -> validate -> FP16/INT8 into a model repository")
    export.add_argument("model", nargs="?", default="all", help="classifier | sentiment | all (bundled), ignored with --hf-dir")
    export.add_argument("--repository", required=True, type=Path, help="model repository directory to write into")
    export.add_argument("--hf-dir", type=Path, help="a HF BERT-family directory to export instead of a bundled model")
    export.add_argument("--head", type=Path, help="with --hf-dir: a head JSON (as trained by train_head) for logits")
    export.add_argument("--name", help="model name in the repository (default: the bundled name or the dir name)")
    export.add_argument("--version", type=int, default=1)
    export.add_argument("--variants", default="fp16,int8,int8_a16", help="comma list of fp16,int8,int8_a16 or 'none'")
    export.add_argument("--calibration-size", type=int, default=8, help="samples used to calibrate INT8")
    export.add_argument("--atol", type=float, default=1e-4, help="max |torch - onnx| allowed on fp32 outputs")
    export.add_argument("--min-top1-agreement", type=float, default=0.8,
                        help="a variant whose top-1 agreement with fp32 is below this fails: reported and deleted "
                             "(measured: sentiment INT8 0.87, classifier INT8 ~0.2, classifier INT8-A16 0.89)")
    export.add_argument("--keep-failed-variants", action="store_true",
                        help="keep the file of a variant that failed --min-top1-agreement (still reported as failed) "
                             "and exit 0; without it such a variant is deleted and export exits with status 3")
    export.set_defaults(func=run_export)

    serve = subparsers.add_parser("serve-models", help="serve a model repository over KServe v2 HTTP")
    serve.add_argument("--repository", required=True, type=Path)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start-up)")
    serve.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    # --max-body-bytes is the old name, kept so existing scripts run; `serve` calls the same limit --max-request-bytes
    serve.add_argument("--max-request-bytes", "--max-body-bytes", dest="max_request_bytes", type=int,
                       default=32 * 1024 * 1024, help="400 above this body size")
    serve.add_argument("--backend", default="config", choices=["config", "torch", "onnxruntime"],
                       help="config = each model's platform; torch serves models with a torch section "
                            "(CUDA graphs + fp16 on --device cuda)")
    serve.add_argument("--grpc-port", type=int, default=None,
                       help="also serve KServe v2 over gRPC on this port (Triton's GRPCInferenceService; off by default)")
    serve.add_argument("--workers", type=int, default=1,
                       help="HTTP worker processes sharing the port, each with its own model runtimes")
    serve.add_argument("--log-level", default="warning")
    serve.add_argument("--http", default="auto", choices=["auto", "h11", "httptools"],
                       help="uvicorn's HTTP parser (auto = httptools when installed; h11 is pure Python, slower)")
    serve.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"],
                       help="event loop (auto = uvloop when installed)")
    serve.set_defaults(func=run_serve)

    bench = subparsers.add_parser("bench-model", help="trtexec-like latency p50/p90/p99 + throughput per batch size")
    bench.add_argument("--model", default="classifier", help="classifier | sentiment | path/to/model.onnx")
    bench.add_argument("--backends", default="onnxruntime", help="comma list of onnxruntime,torch,tensorrt")
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    bench.add_argument("--batch-sizes", default="1,2,4,8")
    bench.add_argument("--seq-len", type=int, default=64, help="sequence length for text models")
    bench.add_argument("--iterations", type=int, default=20)
    bench.add_argument("--warmup", type=int, default=3)
    bench.add_argument("--onnx-dir", type=Path, help="where exported graphs are cached (default: a temp dir)")
    bench.add_argument("--hf-dir", type=Path, help="sentiment: a copy of the MiniLM directory to use instead of the package")
    bench.add_argument("--half", action="store_true", help="torch backend: run the module in fp16")
    bench.add_argument("--output", type=Path, help="write results as JSON here")
    search = bench.add_argument_group("configuration search (model-analyzer-like, against a live server)")
    search.add_argument("--search", action="store_true",
                        help="sweep max batch size x queue delay x instance count on a served model, keep the best "
                             "configuration within --latency-budget-ms and write it into the model's config.yaml")
    search.add_argument("--repository", type=Path, help="the served model repository (--model names a model in it)")
    search.add_argument("--url", help="a live serve-models over --repository (one worker); default: start one")
    search.add_argument("--latency-budget-ms", type=float, default=50.0, help="p99 budget per request")
    search.add_argument("--search-max-batch-sizes", default="8,32", help="comma list")
    search.add_argument("--search-queue-delays-ms", default="0,2", help="comma list")
    search.add_argument("--search-instance-counts", default="1,2", help="comma list")
    search.add_argument("--concurrency", default="1,8,32,64", help="closed-loop client counts, rising")
    search.add_argument("--seconds", type=float, default=5.0, help="measurement window per concurrency level")
    search.add_argument("--plot", type=Path, help="write throughput vs p99 per candidate as a PNG here")
    bench.set_defaults(func=run_bench)


def _variants(text: str) -> tuple[str, ...]:
    return () if text in ("", "none") else tuple(v.strip() for v in text.split(",") if v.strip())


def run_export(args: argparse.Namespace) -> int:
    """Exit status: see EXPORT_VALIDATION_FAILED and EXPORT_VARIANT_FAILED above."""
    from tokenmill.modelserver.export import bundled_export_spec, hf_export_spec
    from tokenmill.modelserver.pipeline import export_to_repository
    from tokenmill.modelserver.validate import ValidationError

    variants = _variants(args.variants)
    common = dict(version=args.version, variants=variants, calibration_size=args.calibration_size, atol=args.atol,
                  min_top1_agreement=args.min_top1_agreement, keep_failed_variants=args.keep_failed_variants)
    if args.hf_dir:
        jobs = [(args.name or args.hf_dir.name, lambda: hf_export_spec(args.hf_dir, args.head))]
    else:
        names = BUNDLED if args.model == "all" else (args.model,)
        if args.name and len(names) > 1:
            print("--name needs a single model, not 'all'", file=sys.stderr)
            return 2
        unknown = [name for name in names if name not in BUNDLED]
        if unknown:
            print(f"model must be one of {[*BUNDLED, 'all']} (or use --hf-dir), got {unknown[0]!r}", file=sys.stderr)
            return 2
        jobs = [(args.name or name, lambda name=name: bundled_export_spec(name)) for name in names]
    failed: list[str] = []
    for name, spec in jobs:
        try:
            report = export_to_repository(name, args.repository, spec=spec(), **common)
        except ValidationError as err:
            print(f"tokenmill export: [{name}] the fp32 ONNX graph FAILED validation: {err}", file=sys.stderr)
            return EXPORT_VALIDATION_FAILED
        failed += [f"{name} {variant}" for variant in report["failed_variants"]]
    if failed and not args.keep_failed_variants:
        print(f"tokenmill export: {len(failed)} variant(s) failed --min-top1-agreement and were not written: "
              f"{', '.join(failed)} (exit status {EXPORT_VARIANT_FAILED}; --keep-failed-variants keeps them)",
              file=sys.stderr)  # fmt: skip
        return EXPORT_VARIANT_FAILED
    return 0


def run_serve(args: argparse.Namespace) -> int:
    import os

    import uvicorn

    from tokenmill.modelserver.app import CONFIG_ENV, AnnouncingServer, ModelServerConfig, create_app

    config = ModelServerConfig(args.repository, device=args.device, max_request_bytes=args.max_request_bytes,
                               backend=args.backend, workers=args.workers,
                               grpc_address=f"{args.host}:{args.grpc_port}" if args.grpc_port else None)
    options = dict(host=args.host, port=args.port, log_level=args.log_level, http=args.http, loop=args.loop)
    if config.workers == 1:
        app = create_app(config)
        AnnouncingServer(uvicorn.Config(app, **options), app).run()
    else:  # uvicorn's supervisor spawns the workers; each rebuilds the app from the environment
        os.environ[CONFIG_ENV] = config.to_env()
        where = f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}"
        print(f"tokenmill model server: {config.workers} workers listening on http://{where} "
              "(KServe v2 under /v2)", flush=True)
        uvicorn.run("tokenmill.modelserver.app:app_from_env", factory=True, workers=config.workers, **options)
    return 0


def _numbers(text: str, kind: type) -> list:
    return [kind(v) for v in text.split(",") if v.strip()]


def run_bench_search(args: argparse.Namespace) -> int:
    import datetime as dt
    import shlex

    from tokenmill.modelserver.search import SearchSettings, plot, run_search

    if args.repository is None:
        print("--search needs --repository (the served model repository)", file=sys.stderr)
        return 2
    try:
        settings = SearchSettings(
            model=args.model, repository=args.repository, latency_budget_ms=args.latency_budget_ms,
            max_batch_sizes=_numbers(args.search_max_batch_sizes, int),
            queue_delays_ms=_numbers(args.search_queue_delays_ms, float),
            instance_counts=_numbers(args.search_instance_counts, int),
            concurrency=_numbers(args.concurrency, int), seconds=args.seconds)
    except ValueError as exc:
        print(f"tokenmill bench-model --search: {exc}", file=sys.stderr)
        return 2
    summary = run_search(settings, args.url, args.device)
    print(summary["message"])
    summary = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
               "command": shlex.join(["tokenmill", *sys.argv[1:]]), **summary}
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(summary, indent=2))
    if args.plot:
        plot(summary, args.plot)
    return 0 if summary["best"] is not None else 1


def run_bench(args: argparse.Namespace) -> int:
    if args.search:
        return run_bench_search(args)
    from tokenmill.modelserver.bench_model import bench_model

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    results = bench_model(args.model, _variants(args.backends), args.device, batch_sizes, seq_len=args.seq_len,
                          iterations=args.iterations, warmup=args.warmup, onnx_dir=args.onnx_dir, hf_dir=args.hf_dir,
                          half=args.half, log=print)
    if args.output:
        import datetime as dt

        results = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                   "command": (f"tokenmill bench-model --model {args.model} --backends {args.backends} --device "
                               f"{args.device} --batch-sizes {args.batch_sizes} --seq-len {args.seq_len} --iterations "
                               f"{args.iterations} --warmup {args.warmup}" + (" --half" if args.half else "")),
                   **results}
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2))
    return 0
