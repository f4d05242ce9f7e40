"""``tokenmill bench serve``: builds the workload and target from CLI args, runs it, writes JSON/CSV/HTML.

The options themselves are declared in cli.py; this file turns them into a LoadConfig list and reports.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from tokenmill.bench import datasets
from tokenmill.bench.client import Target
from tokenmill.bench.console import summary_table
from tokenmill.bench.html_report import render_serve_report
from tokenmill.bench.loadgen import LoadConfig, parse_sweep, run_loads, sweep_loads
from tokenmill.bench.metrics import SLO, parse_slo, summarize
from tokenmill.bench.results import make_document, make_metadata, make_run, save_csv, save_json
from tokenmill.bench.tokenizer import load_tokenizer


def build_dataset(
    args: argparse.Namespace, tokenizer: Any
) -> tuple[list[datasets.BenchRequest], dict[str, Any]]:
    name = args.dataset
    if name in ("sharegpt", "jsonl") and not args.dataset_path:
        raise ValueError(f"--dataset {name} needs --dataset-path FILE")
    if name == "random":
        reqs = datasets.random_dataset(
            args.num_prompts,
            args.random_input_len,
            args.random_output_len,
            args.random_range_ratio,
            tokenizer,
            args.seed,
        )
        params = {
            "input_len": args.random_input_len,
            "output_len": args.random_output_len,
            "range_ratio": args.random_range_ratio,
        }
    elif name == "chatbot":
        reqs = datasets.chatbot_dataset(args.num_prompts, tokenizer, args.seed)
        params = {"lengths": "ShareGPT-like, synthetic (lognormal)", **datasets.CHATBOT_LENGTHS}
    elif name == "shared-prefix":
        reqs = datasets.shared_prefix_dataset(
            args.prefix_num,
            args.prefix_questions,
            args.prefix_len,
            args.prefix_question_len,
            args.random_output_len,
            tokenizer,
            args.seed,
        )
        params = {
            "num_prefixes": args.prefix_num,
            "questions_per_prefix": args.prefix_questions,
            "prefix_len": args.prefix_len,
            "question_len": args.prefix_question_len,
            "output_len": args.random_output_len,
        }
    elif name == "sharegpt":
        reqs = datasets.sharegpt_dataset(
            args.dataset_path, args.num_prompts, tokenizer, args.output_len, args.seed
        )
        params = {"path": args.dataset_path, "output_len": args.output_len}
    else:
        reqs = datasets.jsonl_dataset(args.dataset_path, args.num_prompts, tokenizer, args.output_len or 128)
        params = {"path": args.dataset_path, "default_output_len": args.output_len or 128}
    description = {
        "name": name,
        **params,
        "num_requests": len(reqs),
        "tokenizer": args.tokenizer,
        "prompt_len_unit": "tokens" if tokenizer is not None else "words (server usage replaces)",
    }
    return reqs, description


def _label(load: LoadConfig, sweep_param: str | None) -> str:
    rate = "inf" if math.isinf(load.request_rate) else f"{load.request_rate:g}"
    if sweep_param == "concurrency":
        return f"concurrency={load.max_concurrency}"
    if sweep_param == "rate":
        return f"rate={rate}"
    return f"rate={rate}, concurrency={load.max_concurrency or 'unlimited'}"


# ``--profile NAME``: settings it implies, and those it fills in only when not given.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "chatbot": {
        "set": {"endpoint": "chat"},
        "unless_given": {"sweep": "rate=1,2,4,8,16,32,inf", "slo": "ttft=500,tpot=50"},
    },
}


def apply_profile(args: argparse.Namespace) -> None:
    """A profile sets its fields; the chatbot dataset replaces only the default (random) one, so a real ShareGPT
    file still works with it."""
    name = getattr(args, "profile", None)
    if name is None:
        return
    profile = PROFILES[name]
    for key, value in profile["set"].items():
        setattr(args, key, value)
    for key, value in profile["unless_given"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dataset == "random":
        args.dataset = "chatbot"


def run_serve(args: argparse.Namespace, console: Console | None = None) -> int:
    console = console or Console(stderr=False)
    apply_profile(args)
    slo = parse_slo(args.slo) if args.slo else SLO()
    target = Target(
        base_url=args.base_url,
        model=args.model,
        endpoint=args.endpoint,
        api_key=args.api_key,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        timeout_s=args.timeout,
        extra_body=json.loads(args.extra_body) if args.extra_body else {},
    )
    requests, dataset = build_dataset(args, load_tokenizer(args.tokenizer))
    base = LoadConfig(
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        warmup=args.warmup,
        duration_s=args.duration,
        seed=args.seed,
        progress=not args.no_progress,
    )
    sweep = None
    loads = [base]
    if args.sweep:
        param, values = parse_sweep(args.sweep)
        loads, sweep = sweep_loads(base, param, values), {"param": param, "values": values}
    results = asyncio.run(run_loads(target, requests, loads, args.client_processes))

    runs, records = [], []
    for result in results:
        summary = summarize(result.records, slo, result.num_not_sent)
        label = _label(result.load, sweep and sweep["param"])
        runs.append(
            make_run(label, result.load.describe(), summary, result.records if args.save_detailed else None)
        )
        records.append(result.records)
    target_meta = {
        "base_url": args.base_url,
        "model": args.model,
        "endpoint": args.endpoint,
        "ignore_eos": args.ignore_eos,
        "client_processes": args.client_processes,
        "timeout_s": args.timeout,
    }
    document = make_document(make_metadata(target_meta, dataset, args.label), sweep, runs)

    console.print(
        summary_table([r["label"] for r in runs], [r["summary"] for r in runs], "tokenmill bench serve")
    )
    name = args.result_name or f"bench-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out_dir = Path(args.result_dir)
    paths = [save_json(document, out_dir / f"{name}.json"), save_csv(document, out_dir / f"{name}.csv")]
    html_path = out_dir / f"{name}.html"
    html_path.write_text(render_serve_report(document, records), encoding="utf-8")
    paths.append(html_path)
    console.print("Wrote " + ", ".join(str(p) for p in paths))
    return 0
