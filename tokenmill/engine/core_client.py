"""EngineCoreClient: the API process's side of the engine-core process (core_proc.py).

It offers what the server uses of AsyncLLM (add_request → RequestStream of cumulative RequestOutputs, abort,
snapshot, health, shutdown), but the engine runs in another process: requests go out over a ZeroMQ PUSH
socket, and one asyncio task on the server's event loop reads the core's per-step messages, decodes each
sequence's new tokens to text (IncrementalDetokenizer, here instead of in the step loop) and feeds the streams.
Engine death (a crash message, or the process gone) fails every stream, calls ``on_dead`` (/health 503,
non-zero exit) as the thread-backed AsyncLLM does.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import pickle
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.engine.async_llm import EngineDeadError, EngineQueueFullError, EngineSnapshot, RequestStream
from tokenmill.engine.core_messages import STAT_FIELDS, CoreOutputs, OutputCodec, SeqDelta
from tokenmill.engine.core_proc import CoreAddresses, ReadyInfo, run_engine_core
from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

POLL_MS = 500  # how often the reader checks that the core process is alive while no message comes


@dataclass
class _Sequence:
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class _Request:
    stream: RequestStream
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[_Sequence]
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    finished: bool = False

    def output(self) -> RequestOutput:
        """The cumulative output, in O(1) per sequence: ``token_ids`` and ``logprobs`` are the sequence's own
        append-only lists, not copies (a copy per step made the API process O(tokens so far) per step, in the
        copying and in the collector's traversals of the copies). While the request runs they may grow after this
        output was made, so a consumer reads them when it gets the output (the server does, before its next
        await); a finished output's lists no longer change."""
        completions = [
            CompletionOutput(
                index=i,
                text=seq.detokenizer.output_text(seq.finish_reason is not None) if seq.detokenizer else "",
                token_ids=seq.token_ids,
                finish_reason=seq.finish_reason,
                logprobs=seq.logprobs,
                stop_reason=seq.stop_reason,
            )
            for i, seq in enumerate(self.sequences)
        ]
        return RequestOutput(self.stream.request_id, self.prompt, self.prompt_token_ids, completions,
                             finished=self.finished, metrics=self.metrics, num_cached_tokens=self.num_cached_tokens)


class OutputProcessor:
    """The API side's per-request state: the core's new token ids → detokenized text → one cumulative
    RequestOutput per progressed request on its stream. Plain (no sockets), so it is measured on its own
    (benchmarks/online_host_cost.py)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, _Request] = {}  # accepted by the core and not finished

    def new_state(self, stream: RequestStream, prompt: str | None, prompt_token_ids: list[int],
                  params: SamplingParams) -> _Request:
        hf = self.tokenizer.hf if self.tokenizer is not None else None
        return _Request(stream, prompt, prompt_token_ids, [
            _Sequence(IncrementalDetokenizer(hf, prompt_token_ids, params) if hf is not None else None,
                      logprobs=[] if params.logprobs is not None else None)
            for _ in range(params.n)
        ], RequestMetrics(arrival_time=time.monotonic()))

    def process(self, deltas: list[SeqDelta]) -> None:
        touched: dict[str, _Request] = {}
        requests = self.requests
        for delta in deltas:
            state = requests.get(delta.request_id)
            if state is not None:
                _apply(state, delta)
                touched[delta.request_id] = state
        for request_id, state in touched.items():
            if state.finished:
                del requests[request_id]
            state.stream.put(state.output())


class EngineCoreClient:
    def __init__(self, config: Any, *, max_waiting_requests: int | None = None,
                 fault_after_steps: int | None = None, log_level: str = "info",
                 on_dead: Callable[[BaseException], None] | None = None) -> None:
        import zmq

        self.config = config
        self.on_dead = on_dead
        self.snapshot = EngineSnapshot()
        self.error: BaseException | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="tokenmill-core-")
        base = Path(self._tmp.name)
        self.addresses = CoreAddresses(f"ipc://{base / 'requests'}", f"ipc://{base / 'outputs'}",
                                       f"ipc://{base / 'ready'}")
        self._zmq = zmq.Context()
        self._requests = self._zmq.socket(zmq.PUSH)
        self._requests.bind(self.addresses.requests)
        self._send_lock = threading.Lock()  # shutdown() runs in a worker thread
        self._codec = OutputCodec()
        self._pending: dict[str, tuple[asyncio.Future, _Request]] = {}
        self._outputs: OutputProcessor | None = None  # made once the tokenizer is known (start_process)
        self._stopping = False
        self._reader: asyncio.Task | None = None
        spawn = multiprocessing.get_context("spawn")
        self.process = spawn.Process(target=run_engine_core, name="tokenmill-engine-core",
                                     args=(config, self.addresses, max_waiting_requests, fault_after_steps, log_level))
        self.info: ReadyInfo | None = None

    # ---- start-up (before the event loop) -------------------------------------------------------------------
    def start_process(self, timeout: float | None = None) -> ReadyInfo:
        """Start the core and wait until its engine is loaded; raises its load error (ValueError ...)."""
        import zmq

        ready = self._zmq.socket(zmq.PULL)
        ready.bind(self.addresses.ready)
        self.process.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not ready.poll(POLL_MS):
                if not self.process.is_alive():
                    raise RuntimeError(f"the engine-core process exited with {self.process.exitcode} while loading")
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"the engine core did not load within {timeout}s")
            answer = pickle.loads(ready.recv())
        finally:
            ready.close(linger=0)
        if isinstance(answer, BaseException):
            self.process.join(10)
            raise answer
        self.info = answer
        self._outputs = OutputProcessor(answer.tokenizer)
        return answer

    @property
    def model_name(self) -> str:
        return self._info.model_name

    @property
    def tokenizer(self) -> Any:
        return self._info.tokenizer

    @property
    def max_model_len(self) -> int:
        return self._info.max_model_len

    @property
    def num_kv_cache_tokens(self) -> int:
        return self._info.num_kv_cache_tokens

    @property
    def _info(self) -> ReadyInfo:
        if self.info is None:
            raise RuntimeError("EngineCoreClient.start_process() has not run")
        return self.info

    @property
    def is_healthy(self) -> bool:
        return self.error is None and self._reader is not None and not self._reader.done() and self.process.is_alive()

    # ---- the event loop side ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Start reading the core's outputs on the running event loop (the app's lifespan calls this)."""
        if self.info is None:
            self.start_process()
        if self._reader is not None:
            raise RuntimeError("EngineCoreClient.start() was called twice")
        self._reader = asyncio.get_running_loop().create_task(self._read_outputs())
        self._reader.add_done_callback(self._reader_done)

    def _reader_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("the engine-core output reader failed", exc_info=task.exception())
            self._fail(task.exception())

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask the core to stop, wait for it (then terminate it); pending requests get EngineDeadError."""
        self._stopping = True
        if self.process.is_alive():
            try:
                self._send(("shutdown",))
            except EngineDeadError:
                pass
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(5)
        with self._send_lock:
            self._requests.close(linger=0)
        self._tmp.cleanup()

    async def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                          prompt: str | None = None) -> RequestStream:
        """Queue a request and wait until the core accepted it (ValueError / EngineQueueFullError /
        EngineDeadError otherwise)."""
        if self.error is not None or self._stopping or not self.process.is_alive():
            raise EngineDeadError(self._dead_message())
        loop = asyncio.get_running_loop()
        stream = RequestStream(request_id, loop, self)
        ids = list(prompt_token_ids)
        state = self._processor.new_state(stream, prompt, ids, params)
        accepted = loop.create_future()
        self._send(("add", request_id, ids, params, prompt, state.metrics.arrival_time))
        self._pending[request_id] = (accepted, state)
        try:
            await asyncio.shield(accepted)
        except asyncio.CancelledError:
            stream.abort()  # the caller went away while we waited: the request must not run unobserved
            raise
        return stream

    @property
    def _processor(self) -> OutputProcessor:
        if self._outputs is None:
            raise RuntimeError("EngineCoreClient.start_process() has not run")
        return self._outputs

    def abort(self, request_id: str) -> None:
        if self._outputs is not None:
            self._outputs.requests.pop(request_id, None)
        if self.error is None and not self._stopping:
            try:
                self._send(("abort", [request_id]))
            except EngineDeadError:
                pass  # nothing left to abort: the reader fails every stream once it sees the process gone

    def _send(self, message: tuple) -> None:
        """Never blocks the event loop: a PUSH socket whose peer is gone would block a plain send forever."""
        import zmq

        with self._send_lock:
            try:
                self._requests.send(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL), zmq.NOBLOCK)
            except zmq.Again:
                raise EngineDeadError("the engine-core process does not take messages (it is gone)") from None

    async def _read_outputs(self) -> None:
        import zmq
        import zmq.asyncio

        ctx = zmq.asyncio.Context.shadow(self._zmq)
        sock = ctx.socket(zmq.PULL)
        sock.bind(self.addresses.outputs)
        try:
            while True:
                # Every read goes through the asyncio socket: ZeroMQ's fd is edge-triggered, so a read behind
                # its back (a plain shadow socket) can leave the loop waiting for the poll timeout.
                if not await sock.poll(POLL_MS):
                    if not self.process.is_alive():
                        self._fail(EngineDeadError(f"the engine-core process exited with {self.process.exitcode}")
                                   if self._stopping else
                                   RuntimeError(f"the engine-core process died (exit code {self.process.exitcode})"))
                        return
                    continue
                message = self._codec.decode(await sock.recv())
                if message.dead is not None:
                    self._fail(RuntimeError(f"engine core: {message.dead}"))
                    return
                self._dispatch(message)
        finally:
            sock.close(linger=0)

    def _dispatch(self, message: CoreOutputs) -> None:
        for request_id in message.accepted:
            future, state = self._pending.pop(request_id, (None, None))
            if future is None:
                continue
            if state.stream.finished:  # aborted while waiting for the ack (stream.abort sent the abort already)
                continue
            self._processor.requests[request_id] = state
            if not future.done():
                future.set_result(None)
        for request_id, kind, text in message.rejected:
            future, _ = self._pending.pop(request_id, (None, None))
            if future is not None and not future.done():
                future.set_exception(EngineQueueFullError(text) if kind == "queue_full"
                                     else ValueError(text) if kind == "invalid" else RuntimeError(text))
        if message.outputs:
            self._processor.process(message.outputs)
        if message.stats:
            fixed, per_pos = message.stats[: len(STAT_FIELDS)], message.stats[len(STAT_FIELDS) :]
            self.snapshot = EngineSnapshot(**{name: _stat(name, v) for name, v in zip(STAT_FIELDS, fixed, strict=True)},
                                           spec_decode_accepted_per_pos=[int(n) for n in per_pos])

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        if not isinstance(exc, EngineDeadError):
            logger.error("the engine loop died: %s", exc)
            if self.on_dead is not None:
                try:
                    self.on_dead(exc)
                except Exception:  # noqa: BLE001 - failing every pending request below matters more
                    logger.exception("the on_dead callback failed")
        dead = EngineDeadError(self._dead_message())
        for future, _ in self._pending.values():
            if not future.done():
                future.set_exception(dead)
        self._pending.clear()
        if self._outputs is not None:
            for state in self._outputs.requests.values():
                state.stream.put(EngineDeadError(self._dead_message()))
            self._outputs.requests.clear()

    def _dead_message(self) -> str:
        if self.error is None:
            return "the engine is shutting down" if self._stopping else "the engine-core process is gone"
        return f"the engine loop died: {self.error}"


def _apply(state: _Request, delta: SeqDelta) -> None:
    seq = state.sequences[delta.index]
    seq.token_ids += delta.new_token_ids
    if seq.detokenizer is not None and delta.new_token_ids:
        seq.detokenizer.update(delta.new_token_ids)  # the core already stopped on stop strings; this cuts the text
    if delta.new_logprobs is not None and seq.logprobs is not None:
        seq.logprobs += [{int(tid): Logprob(lp, int(rank) if rank >= 0 else None) for tid, lp, rank in entry}
                         for entry in delta.new_logprobs]
    seq.finish_reason = delta.finish_reason
    seq.stop_reason = delta.stop_reason
    state.num_cached_tokens = delta.num_cached_tokens
    if delta.request_finished:
        state.finished = True
        if delta.times is not None:
            m = state.metrics
            (m.arrival_time, m.first_scheduled_time, m.first_token_time, m.last_token_time,
             m.finished_time) = delta.times


def _stat(name: str, value: float) -> float | int:
    return value if name == "kv_cache_usage" else int(value)
