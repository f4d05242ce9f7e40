"""``tokenmill bench`` registers serve, compare, plan, and throughput exactly when its module exists."""

from __future__ import annotations

import argparse
import importlib.util

from tokenmill.bench.cli import THROUGHPUT_MODULE
from tokenmill.cli import build_parser


def _bench_commands() -> set[str]:
    parser = build_parser()
    top = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    bench = top.choices["bench"]
    sub = next(a for a in bench._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def test_bench_subcommands() -> None:
    commands = _bench_commands()
    assert {"serve", "compare", "plan"} <= commands
    assert ("throughput" in commands) == (importlib.util.find_spec(THROUGHPUT_MODULE) is not None)


def test_serve_defaults_parse() -> None:
    args = build_parser().parse_args(["bench", "serve", "--model", "m"])
    assert args.request_rate == float("inf") and args.burstiness == 1.0 and args.dataset == "random"
    assert args.base_url == "http://127.0.0.1:8000" and args.endpoint == "completions"
