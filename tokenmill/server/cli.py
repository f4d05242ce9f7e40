"""``tokenmill serve [MODEL]``: command-line flags → EngineConfig + ServerConfig → engine, app, uvicorn.

Engine flags are shared with ``tokenmill generate`` (engine/cli.py); the server flags follow vLLM's names.
"""

from __future__ import annotations

import argparse
import logging
import os

# Test hook for the engine-death acceptance test: the engine loop raises after this many steps.
FAULT_ENV = "TOKENMILL_TEST_FAULT_AFTER_STEPS"
API_KEY_ENV = "TOKENMILL_API_KEY"


def register(subparsers: argparse._SubParsersAction) -> None:
    from tokenmill.engine.cli import add_engine_arguments

    parser = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_engine_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (logged at startup)")
    parser.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (also ${API_KEY_ENV})")
    parser.add_argument("--secure-metrics", action="store_true", help="/metrics needs the API key too")
    parser.add_argument("--served-model-name", default=None, help="model name in the API (default: from the model)")
    parser.add_argument("--chat-template", default=None, help="Jinja chat template: a file path or the template itself")
    parser.add_argument("--max-waiting-requests", type=int, default=None,
                        help="answer 429 when this many requests are already waiting (default: unbounded)")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds in-flight requests may take to finish after SIGTERM")
    parser.add_argument("--max-request-bytes", type=int, default=10 * 1024 * 1024, help="413 above this body size")
    parser.add_argument("--log-prompts", action="store_true", help="include prompt text in the per-request log lines")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--enable-auto-tool-choice", action="store_true",
                        help='tool_choice "auto": parse tool calls from the model\'s output (needs a parser)')
    parser.add_argument("--tool-call-parser", default=None, choices=["hermes", "qwen", "llama3_json", "mistral"],
                        help="tool-call format of the model family (default: implied by the chat template)")
    parser.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                        help="run the engine core in its own process (default); --no-engine-process: a thread of "
                             "the API process (one GIL for HTTP and the step loop)")
    parser.add_argument("--engine-death-grace", type=float, default=2.0, help=argparse.SUPPRESS)
    parser.set_defaults(func=run)


def build_configs(args: argparse.Namespace):
    """(EngineConfig, ServerConfig) from parsed arguments; raises ValueError on bad values."""
    from tokenmill.config import EngineConfig
    from tokenmill.engine.cli import engine_kwargs
    from tokenmill.server.config import ServerConfig

    kwargs = engine_kwargs(args)
    kwargs.update(
        served_model_name=args.served_model_name,
        chat_template=args.chat_template,
        max_waiting_requests=args.max_waiting_requests,
    )
    engine_config = EngineConfig.from_kwargs(**kwargs)
    server_config = ServerConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None,
        secure_metrics=args.secure_metrics,
        drain_timeout=args.drain_timeout,
        engine_death_grace=args.engine_death_grace,
        max_request_bytes=args.max_request_bytes,
        log_prompts=args.log_prompts,
        log_level=args.log_level,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=args.tool_call_parser,
    )
    return engine_config, server_config


def _fault_after_steps() -> int | None:
    value = os.environ.get(FAULT_ENV)
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{FAULT_ENV} must be a positive integer; got {value!r}")
    return int(value)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from tokenmill.server.app import build_app
    from tokenmill.server.lifecycle import TokenmillServer

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger = logging.getLogger("tokenmill.server")
    try:
        engine_config, server_config = build_configs(args)
        fault_after = _fault_after_steps()
    except ValueError as exc:
        logger.error("invalid configuration: %s", exc)
        return 2
    try:
        async_llm = _start_engine(args, engine_config, fault_after)
    except (ValueError, FileNotFoundError) as exc:
        logger.error("could not load the model: %s", exc)
        return 2
    if fault_after is not None:
        logger.warning("test hook %s=%d: the engine loop will crash on purpose", FAULT_ENV, fault_after)
    app = build_app(async_llm, server_config)
    uv_config = uvicorn.Config(
        app,
        host=server_config.host,
        port=server_config.port,
        log_level=server_config.log_level,
        access_log=False,  # one line per request comes from server/request_log.py instead
        timeout_graceful_shutdown=1,  # the drain already waited for in-flight requests
        lifespan="on",
    )
    where = f"its own process (pid {async_llm.process.pid})" if args.engine_process else "a thread"
    message = (
        f"model {async_llm.model_name!r} loaded: max_model_len={async_llm.max_model_len}, "
        f"KV cache {async_llm.num_kv_cache_tokens} tokens, device={engine_config.model.device}, "
        f"engine core in {where}, api key {'required' if server_config.api_key else 'not required'}"
    )
    server = TokenmillServer(uv_config, app.state.ctx.lifecycle, message)
    server.run()
    lifecycle = app.state.ctx.lifecycle
    if lifecycle.exit_code:
        logger.error("exiting with status %d: %s", lifecycle.exit_code, lifecycle.exit_reason)
    return lifecycle.exit_code


def _start_engine(args: argparse.Namespace, engine_config, fault_after: int | None):
    """The engine front the app serves, loaded: an EngineCoreClient (engine in its own process) or an AsyncLLM
    (engine thread in this process). Raises ValueError / FileNotFoundError when the model cannot load."""
    max_waiting = engine_config.scheduler.max_waiting_requests
    if args.engine_process:
        from tokenmill.engine.core_client import EngineCoreClient

        client = EngineCoreClient(engine_config, max_waiting_requests=max_waiting, fault_after_steps=fault_after,
                                  log_level=args.log_level)
        client.start_process()
        return client
    from tokenmill.engine.async_llm import AsyncLLM
    from tokenmill.engine.gc_heap import freeze_startup_heap
    from tokenmill.engine.llm_engine import LLMEngine

    engine = LLMEngine(engine_config, load_progress=True)
    freeze_startup_heap()  # this process serves one engine for its life
    return AsyncLLM(engine, max_waiting_requests=max_waiting, fault_after_steps=fault_after)
