"""Registers ``tokenmill bench serve | compare | plan | throughput | kv-memory`` on the top-level parser.

Heavy imports (httpx, matplotlib, rich) happen only when a bench command runs; ``throughput`` is delegated
to ``tokenmill.bench.throughput`` (offline engine bench) when that module exists.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from collections.abc import Callable
from typing import Any

THROUGHPUT_MODULE = "tokenmill.bench.throughput"


def _friendly(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn a user error (ValueError / missing file) into one line on stderr and exit status 2."""

    def wrapped(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (ValueError, FileNotFoundError) as exc:
            print(f"tokenmill bench: {exc}", file=sys.stderr)
            return 2

    return wrapped


def _serve(args: argparse.Namespace) -> int:
    from tokenmill.bench.serve import run_serve

    return run_serve(args)


def _compare(args: argparse.Namespace) -> int:
    from tokenmill.bench.compare import run_compare

    return run_compare(args)


def _plan(args: argparse.Namespace) -> int:
    from rich.console import Console

    from tokenmill.bench.console import print_plan
    from tokenmill.bench.metrics import parse_slo
    from tokenmill.bench.plan import plan_capacity
    from tokenmill.bench.results import load_json

    slo = parse_slo(args.slo) if args.slo else None
    plan = plan_capacity(load_json(args.sweep), slo, args.target_qps, args.min_good_fraction)
    print_plan(Console(), plan)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(plan.to_dict(), handle, indent=2)
    return 0 if plan.replicas is not None else 1


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", choices=["chatbot"], default=None,
                   help="chatbot: --dataset chatbot --endpoint chat, and unless given --sweep "
                        "rate=1,2,4,8,16,32,inf --slo ttft=500,tpot=50")
    t = p.add_argument_group("target")
    t.add_argument(
        "--base-url", default="http://127.0.0.1:8000", help="server root, e.g. http://127.0.0.1:8000"
    )
    t.add_argument("--model", required=True, help="model name sent in each request")
    t.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    t.add_argument("--api-key", default=None)
    t.add_argument("--timeout", type=float, default=300.0, help="whole-request limit in seconds")
    t.add_argument(
        "--ignore-eos", action="store_true", help="send ignore_eos: true and min_tokens = output length"
    )
    t.add_argument("--temperature", type=float, default=0.0)
    t.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    d = p.add_argument_group("dataset")
    d.add_argument("--dataset", choices=["random", "chatbot", "sharegpt", "shared-prefix", "jsonl"],
                   default="random", help="chatbot: ShareGPT-like lengths synthesized offline (docs/BENCHMARKING.md)")
    d.add_argument("--dataset-path", default=None, help="ShareGPT JSON or JSONL file")
    d.add_argument(
        "--tokenizer", default=None, help="HF tokenizer dir or .gguf file to make and count prompts"
    )
    d.add_argument("--num-prompts", type=int, default=100)
    d.add_argument("--random-input-len", type=int, default=128)
    d.add_argument("--random-output-len", type=int, default=128, help="also the shared-prefix output length")
    d.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths uniform in L·[1−r, 1+r]")
    d.add_argument("--output-len", type=int, default=None, help="override output length (sharegpt, jsonl)")
    d.add_argument("--prefix-num", type=int, default=4, help="shared-prefix: number of prefixes")
    d.add_argument("--prefix-questions", type=int, default=8, help="shared-prefix: questions per prefix")
    d.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: prefix length in tokens")
    d.add_argument("--prefix-question-len", type=int, default=32, help="shared-prefix: question length")
    lg = p.add_argument_group("traffic")
    lg.add_argument(
        "--request-rate", type=float, default=float("inf"), help="requests/s, or inf for all at once"
    )
    lg.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 = Poisson, < 1 burstier")
    lg.add_argument("--max-concurrency", type=int, default=None)
    lg.add_argument("--warmup", type=int, default=0, help="requests sent first and left out of the results")
    lg.add_argument(
        "--duration", type=float, default=None, help="stop sending new requests after this many s"
    )
    lg.add_argument("--seed", type=int, default=0)
    lg.add_argument("--sweep", default=None, help="concurrency=1,4,16,64 or rate=1,2,4 in one command")
    lg.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="spread requests over N client processes when one core cannot keep up (see docs)",
    )
    o = p.add_argument_group("output")
    o.add_argument("--slo", default=None, help="goodput limits in ms, e.g. ttft=500,tpot=50,e2e=10000")
    o.add_argument("--result-dir", default=".", help="folder for NAME.json, NAME.csv and NAME.html")
    o.add_argument("--result-name", default=None, help="file name stem (default bench-<date>-<time>)")
    o.add_argument("--label", default=None, help="name of this run in reports and comparisons")
    o.add_argument("--save-detailed", action="store_true", help="store per-request records in the JSON")
    o.add_argument("--no-progress", action="store_true")


def register(subparsers: Any) -> None:
    bench = subparsers.add_parser("bench", help="load-test a server, compare runs, plan capacity")
    commands = bench.add_subparsers(dest="bench_command", required=True)

    serve = commands.add_parser("serve", help="measure any OpenAI-compatible server")
    add_serve_arguments(serve)
    serve.set_defaults(func=_friendly(_serve))

    compare = commands.add_parser("compare", help="side-by-side table and HTML of bench serve results")
    compare.add_argument("runs", nargs="+", help="result JSON files; the first is the baseline")
    compare.add_argument("--output", default="bench-compare.html", help="HTML report path")
    compare.set_defaults(func=_friendly(_compare))

    plan = commands.add_parser("plan", help="replicas needed for a target rate within an SLO")
    plan.add_argument("--sweep", required=True, help="result JSON of a bench serve --sweep run")
    plan.add_argument(
        "--slo", default=None, help="ttft=MS,tpot=MS,e2e=MS (default: the SLO stored in the sweep)"
    )
    plan.add_argument("--target-qps", type=float, required=True, help="requests/s the fleet must serve")
    plan.add_argument(
        "--min-good-fraction", type=float, default=0.95, help="share of requests within the SLO"
    )
    plan.add_argument("--output", default=None, help="also write the plan as JSON here")
    plan.set_defaults(func=_friendly(_plan))

    if importlib.util.find_spec(THROUGHPUT_MODULE) is not None:
        throughput_module = importlib.import_module(THROUGHPUT_MODULE)
        throughput = commands.add_parser("throughput", help="offline engine throughput (no server)")
        throughput_module.add_arguments(throughput)
        throughput.set_defaults(func=throughput_module.run)

    from tokenmill.bench import kv_memory

    memory = commands.add_parser("kv-memory", help="paged vs contiguous KV allocation: waste, batch, throughput")
    kv_memory.add_arguments(memory)
    memory.set_defaults(func=_friendly(kv_memory.run))
