"""Host cost per engine step of the served path, on CPU, with the MODEL REPLACED BY AN INSTANT STUB.

LABEL: this is a benchmark of host overhead only. The stub runner (``InstantRunner`` below) does no forward pass:
every sampling row gets token id 1000 + step % 1000 at once (never EOS). Everything else is the real code: the
LLMEngine step loop (scheduler, block manager, landing, stop checks), the engine-core process's output building
and msgspec encoding, and the API process's side (decode, OutputProcessor: detokenize + stream hand-off) plus
the server's SSE chunk building for every streamed request (one ``StreamingChoices`` per request, as the routes).

Three phases, same run: ``offline`` = the same requests through a plain LLMEngine built as ``bench throughput``
builds it (stream_outputs=False: no per-step outputs), so ``core`` minus ``offline`` is what serving adds to the
engine-core's step loop; ``core`` = EngineCore.step() + stats + encode per step; ``api`` = the core's encoded
messages replayed into the API side. Each is reported per step as the median over the first and the last tenth of the
steps, so a cost that grows with the tokens generated so far shows as last > first.

    python benchmarks/online_host_cost.py --batch 256 --output-len 1000 --out benchmarks/results/
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.core_messages import CoreOutputs, OutputCodec
from tokenmill.engine.core_proc import EngineCore
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.runner.model_runner import LaunchedStep
from tokenmill.sampling_params import SamplingParams


class InstantRunner:
    """Host-overhead stub (benchmark only, never in tests): no forward pass, one fixed-pattern id per sampling row."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.num_launches = 0

    def launch(self, record: Any, grammars: dict | None = None) -> LaunchedStep:
        self.num_launches += 1
        req_ids = [item.req_id for item in record.scheduled if item.samples]
        token = 1000 + self.num_launches % 1000
        return LaunchedStep(req_ids, [[] for _ in req_ids], torch.full((len(req_ids),), token, dtype=torch.int64),
                            [None] * len(req_ids))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def build_engine(args: argparse.Namespace, stream_outputs: bool = True) -> LLMEngine:
    config = EngineConfig.from_kwargs(random_weights=args.preset, device="cpu", max_num_seqs=args.batch,
                                      max_model_len=args.input_len + args.output_len + 16,
                                      max_num_batched_tokens=max(args.batch * args.input_len, 2048),
                                      num_gpu_blocks_override=args.batch * (args.input_len + args.output_len) // 16
                                      + 4 * args.batch)
    engine = LLMEngine(config, stream_outputs=stream_outputs)
    engine.detokenize_outputs = False  # as the engine-core process sets it
    engine.runner = InstantRunner(engine.runner)
    return engine


def prompt(i: int, args: argparse.Namespace) -> list[int]:
    return [(i * 7 + j) % 30000 + 100 for j in range(args.input_len)]


def offline_phase(engine: LLMEngine, args: argparse.Namespace) -> list[float]:
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    for i in range(args.num_requests):
        engine.add_request(f"r{i}", prompt(i, args), params)
    times = []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return times


def core_phase(engine: LLMEngine, args: argparse.Namespace) -> tuple[list[float], list[bytes]]:
    core = EngineCore(engine, None, None)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    reply = CoreOutputs(accepted=[], rejected=[], outputs=[])
    for i in range(args.num_requests):
        core.add(f"r{i}", prompt(i, args), params, None, time.monotonic(), reply)
    codec = OutputCodec()
    messages = [codec.encode(reply)]
    times = []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        reply = CoreOutputs(accepted=[], rejected=[], outputs=[])
        core.step(reply)
        reply.stats = core.stats()
        data = codec.encode(reply)
        times.append(time.perf_counter() - t0)
        messages.append(data)
    return times, messages


async def api_phase(engine: LLMEngine, messages: list[bytes], args: argparse.Namespace) -> list[float]:
    """Replay the core's messages into the API side: the output processor (detokenize, one cumulative output
    per progressed request on its stream) and, per request, the chat route's real SSE generator consuming its
    stream (request record, choice deltas, SSE framing). Per step: dispatch + one event-loop pass of them all."""
    from tokenmill.engine.async_llm import RequestStream
    from tokenmill.server.metrics import ServerMetrics

    codec = OutputCodec()
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    loop = asyncio.get_running_loop()
    ctx = SimpleNamespace(tokenizer=engine.tokenizer, model_name="bench",
                          metrics=ServerMetrics("bench", _snapshot_type()))
    register, dispatch = _output_side(engine)
    sizes = []

    async def consume(events: Any) -> None:
        size = 0
        async for event in events:
            size += len(event)
        sizes.append(size)

    consumers = []
    for i in range(args.num_requests):
        stream = RequestStream(f"r{i}", loop, _NoAbort())
        register(stream, prompt(i, args), params)
        consumers.append(asyncio.ensure_future(consume(_chat_events(ctx, stream, params))))
    await asyncio.sleep(0)
    times = []
    for data in messages[1:]:  # the first one only acknowledges the adds
        t0 = time.perf_counter()
        dispatch(codec.decode(data))
        await asyncio.sleep(0)  # every woken consumer runs once
        times.append(time.perf_counter() - t0)
    await asyncio.gather(*consumers)
    assert len(sizes) == args.num_requests and min(sizes) > 0
    return times


def _snapshot_type() -> Any:
    from tokenmill.engine.async_llm import EngineSnapshot

    return EngineSnapshot


def _output_side(engine: LLMEngine) -> tuple[Any, Any]:
    """(register a request, dispatch a CoreOutputs) on the API side; the fallback measures commits before
    OutputProcessor existed (the client's own dispatch then)."""
    try:
        from tokenmill.engine.core_client import OutputProcessor
    except ImportError:
        return _legacy_output_side(engine)
    processor = OutputProcessor(engine.tokenizer)

    def register(stream: Any, prompt: list[int], params: SamplingParams) -> None:
        processor.requests[stream.request_id] = processor.new_state(stream, None, prompt, params)

    return register, lambda message: processor.process(message.outputs)


def _legacy_output_side(engine: LLMEngine) -> tuple[Any, Any]:
    from tokenmill.engine.core_client import EngineCoreClient, _Request, _Sequence
    from tokenmill.engine.core_proc import ReadyInfo
    from tokenmill.engine.detokenizer import IncrementalDetokenizer
    from tokenmill.outputs import RequestMetrics

    client = EngineCoreClient(engine.config)
    client.info = ReadyInfo("bench", engine.max_model_len, 0, "cpu", engine.tokenizer)

    def register(stream: Any, prompt: list[int], params: SamplingParams) -> None:
        client._requests_by_id[stream.request_id] = _Request(
            stream, None, prompt, [_Sequence(IncrementalDetokenizer(engine.tokenizer.hf, prompt, params))],
            RequestMetrics(time.monotonic()))

    return register, client._dispatch


def _chat_events(ctx: Any, stream: Any, params: SamplingParams) -> Any:
    """The chat route's SSE generator over one stream (include_usage on, no tools)."""
    from tokenmill.server.request_log import RequestRecord

    record = RequestRecord(stream.request_id, "chat", ctx.metrics, False)
    try:
        from tokenmill.server.request_flow import Submission, _stream
        from tokenmill.server.routes_chat import ChatFormat
    except ImportError:  # commits before the shared request lifecycle
        from tokenmill.server.routes_chat import _stream as chat_stream

        return chat_stream(ctx, stream.request_id, params, stream, True, record, None)
    sub = Submission([[0]], [None], params, ChatFormat(ctx, params, None), True, True)
    return _stream(ctx, stream.request_id, sub, [stream], record)


class _NoAbort:
    def abort(self, request_id: str) -> None:
        pass


def summary(times: list[float]) -> dict[str, float]:
    tenth = max(1, len(times) // 10)

    def median_us(values: list[float]) -> float:
        return sorted(values)[len(values) // 2] * 1e6

    return {"steps": len(times), "first_tenth_median_us": median_us(times[1:tenth + 1]),
            "last_tenth_median_us": median_us(times[-tenth:]), "mean_us": sum(times) / len(times) * 1e6,
            "total_s": sum(times)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-llama3")
    parser.add_argument("--batch", type=int, default=256, help="max_num_seqs")
    parser.add_argument("--num-requests", type=int, default=None,
                        help="requests added at the start (default --batch; more: a waiting queue as at rate inf)")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=1000)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio",
                        help="the API phase's event loop (uvicorn picks uvloop when it is installed)")
    parser.add_argument("--label", default="", help="a name for this run in the JSON file name (e.g. before/after)")
    parser.add_argument("--out", default=None, help="folder for the JSON (default: print only)")
    args = parser.parse_args(argv)
    args.num_requests = args.num_requests or args.batch
    torch.set_num_threads(1)
    offline_engine = build_engine(args, stream_outputs=False)
    gc.collect()
    gc.freeze()  # as bench throughput and the engine-core process do after start-up
    offline_times = offline_phase(offline_engine, args)
    del offline_engine
    engine = build_engine(args)
    gc.collect()
    gc.freeze()
    core_times, messages = core_phase(engine, args)
    if args.loop == "uvloop":
        import uvloop

        api_times = uvloop.run(api_phase(engine, messages, args))
    else:
        api_times = asyncio.run(api_phase(engine, messages, args))
    result = {"offline": summary(offline_times), "core": summary(core_times), "api": summary(api_times)}
    tokens = args.num_requests * args.output_len
    print(f"{args.num_requests} requests (max {args.batch} running) x {args.output_len} output tokens, model = instant "
          "stub (host overhead only)")
    print(f"{'phase':>7} {'steps':>6} {'first 10% us/step':>18} {'last 10% us/step':>17} {'mean us/step':>13} "
          f"{'us/token':>9}")
    for phase, row in result.items():
        print(f"{phase:>7} {row['steps']:6d} {row['first_tenth_median_us']:18.0f} {row['last_tenth_median_us']:17.0f} "
              f"{row['mean_us']:13.0f} {row['total_s'] / tokens * 1e6:9.2f}")
    if args.out:
        record = {
            "benchmark": "online_host_cost", "label": args.label,
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), model = instant "
                      "stub: host overhead only",
            "command": shlex.join([sys.executable, *sys.argv]), "args": vars(args),
            **{phase: {**row, "us_per_token": row["total_s"] / tokens * 1e6} for phase, row in result.items()},
        }
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        name = f"online_host_cost_{args.label + '_' if args.label else ''}{dt.date.today().isoformat()}.json"
        (out / name).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
