"""``tokenmill gateway --config gateway.yaml``: one OpenAI-compatible endpoint in front of model pools.

Registers the subcommand with the top-level parser in ``tokenmill/cli.py``; imports stay light until run.
"""

from __future__ import annotations

import argparse
import logging
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "gateway",
        help="route several models behind one OpenAI API (load balancing, failover, autoscaling)",
        description="Serve one OpenAI-compatible API in front of managed or external model pools.",
    )
    parser.add_argument("--config", required=True, help="gateway YAML file (see docs/GATEWAY.md)")
    parser.add_argument("--host", default=None, help="override the config's host")
    parser.add_argument("--port", type=int, default=None, help="override the config's port")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--shutdown-timeout", type=float, default=30.0,
        help="seconds open requests and streams get to finish after SIGTERM before the gateway exits",
    )  # fmt: skip
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from tokenmill.gateway.app import build_app
    from tokenmill.gateway.config import GatewayConfigError, load_config
    from tokenmill.gateway.gateway import Gateway

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # httpx logs every backend call (health checks included) at INFO: keep that for --log-level debug.
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.log_level == "debug" else logging.WARNING)
    try:
        config = load_config(args.config)
        if args.host is not None:
            config.host = args.host
        if args.port is not None:
            config.port = args.port
        gateway = Gateway(config)
    except (GatewayConfigError, ValueError) as err:
        print(f"tokenmill gateway: {err}", file=sys.stderr)
        return 2
    app = build_app(gateway)
    logging.getLogger("tokenmill.gateway").info("listening on http://%s:%d", config.host, config.port)
    uvicorn.run(
        app, host=config.host, port=config.port, log_level=args.log_level, access_log=False,
        timeout_graceful_shutdown=args.shutdown_timeout,
    )  # fmt: skip
    return 0
