"""One entry point: ``tokenmill serve | generate | bench | gateway | export | serve-models | quantize | eval | distill``.

Each area registers its own subcommands through a ``register(subparsers)`` function in its ``cli`` module,
so this file stays a thin table and importing it pulls in no heavy dependency.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# Modules that provide ``register(subparsers)``; each adds one or more subcommands.
SUBCOMMAND_MODULES = (
    "tokenmill.engine.cli",  # generate
    "tokenmill.server.cli",  # serve
    "tokenmill.bench.cli",  # bench serve | compare | plan | throughput
    "tokenmill.gateway.cli",  # gateway
    "tokenmill.modelserver.cli",  # export | bench-model | serve-models
    "tokenmill.quantization.cli",  # quantize | eval perplexity
    "tokenmill.distill.cli",  # distill
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="tokenmill inference toolbox")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        if importlib.util.find_spec(name) is None:  # an area not built yet contributes no command
            continue
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except ValueError as exc:  # configuration and input errors: a sentence for the user, not a traceback
        parser.exit(2, f"tokenmill {args.command}: error: {exc}\n")
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
