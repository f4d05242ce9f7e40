"""The engine-core process: owns one LLMEngine (with TP, rank 0's; the other ranks are its children) and runs
its step loop with nothing else in the process, so the API process's HTTP, JSON and detokenizing never share a
GIL with scheduling and the model.

Loop turn: take every queued message from the API process (adds, aborts, shutdown) → apply → one engine step
→ send ONE message with every request's new token ids (core_messages.CoreOutputs). Text is decoded in the API
process; the core decodes only requests that have stop strings, because stopping must happen here: checking
them in the core keeps token ids, usage and KV use identical to the in-process engine (no tokens generated
past a stop while an abort travels back), and costs nothing for requests without stop strings.

The process ignores SIGINT/SIGTERM (the API process drains and then sends "shutdown") and exits when its
parent is gone. A crash is reported as CoreOutputs(dead=...) and the process exits with status 1.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import time
from dataclasses import dataclass
from typing import Any

from tokenmill.engine.core_loop_stats import CoreLoopStats
from tokenmill.engine.core_messages import STAT_FIELDS, CoreOutputs, OutputCodec, SeqDelta
from tokenmill.engine.gc_heap import freeze_startup_heap

logger = logging.getLogger("tokenmill.engine.core")

POLL_MS = 1000  # idle wake-up to notice a dead parent
# Test hook: seconds the core sleeps after each step, so tests that need a request still running while they act
# do not race an engine that has become fast (as the fault hook, read from the environment the core inherits).
STEP_DELAY_ENV = "TOKENMILL_TEST_STEP_DELAY_S"
STEP_TRACE_ENV = "TOKENMILL_STEP_TRACE"  # a file path: each step turn of the loop as JSON lines (core_loop_stats.py)


@dataclass
class CoreAddresses:
    """ZeroMQ ipc endpoints, bound by the API process (unique per server: a temp directory)."""

    requests: str  # API → core
    outputs: str  # core → API (CoreOutputs)
    ready: str  # core → API, once: pickled ReadyInfo or the load error


@dataclass
class ReadyInfo:
    model_name: str
    max_model_len: int
    num_kv_cache_tokens: int
    device: str
    tokenizer: Any  # tokenmill Tokenizer (HF fast tokenizers pickle)


class InjectedEngineFault(RuntimeError):
    """Raised by the test hook ``fault_after_steps`` to simulate an engine crash."""


def run_engine_core(config: Any, addresses: CoreAddresses, max_waiting_requests: int | None,
                    fault_after_steps: int | None, log_level: str) -> None:
    """Process entry point (multiprocessing spawn target)."""
    import zmq

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parent = os.getppid()
    ctx = zmq.Context()
    ready = ctx.socket(zmq.PUSH)
    ready.connect(addresses.ready)
    try:
        engine = _load_engine(config)
    except BaseException as exc:  # noqa: BLE001 - the API process reports it and exits 2
        ready.send(pickle.dumps(exc if isinstance(exc, ValueError | FileNotFoundError) else RuntimeError(repr(exc))))
        ready.close(linger=5000)
        ctx.term()
        raise SystemExit(2) from None
    inbox = ctx.socket(zmq.PULL)
    inbox.connect(addresses.requests)
    outbox = ctx.socket(zmq.PUSH)
    outbox.connect(addresses.outputs)
    ready.send(pickle.dumps(ReadyInfo(engine.model_name, engine.max_model_len, engine.num_kv_cache_tokens,
                                      engine.config.model.device, engine.tokenizer)))
    ready.close(linger=5000)
    core = EngineCore(engine, max_waiting_requests, fault_after_steps)
    code = 0
    try:
        core.serve(inbox, outbox, parent)
    except BaseException as exc:  # noqa: BLE001 - any crash must reach every waiting client
        logger.exception("engine loop died")
        outbox.send(OutputCodec().encode(CoreOutputs(dead=f"{type(exc).__name__}: {exc}")))
        code = 1
    finally:
        engine.shutdown()
        for sock in (inbox, outbox):
            sock.close(linger=2000)
        ctx.term()
    raise SystemExit(code)


def _load_engine(config: Any) -> Any:
    import torch

    from tokenmill.engine.llm_engine import LLMEngine
    from tokenmill.engine.threads import set_engine_threads

    if config.model.device == "cpu":  # the forward pass's own team, sized before the first parallel region
        set_engine_threads(on_cpu=True)
    engine = LLMEngine(config, load_progress=True)  # on a GPU it sizes the team itself, after loading
    logger.info("engine core: torch CPU threads %d%s", torch.get_num_threads(),
                " (OMP_NUM_THREADS)" if os.environ.get("OMP_NUM_THREADS") else "")
    engine.detokenize_outputs = False  # text is the API process's job; stop strings are still checked here
    # This process holds one engine for its whole life. Measured on CPU, 128 x 512 -> 128 with a tiny model: GC
    # pauses 0.51 s -> 0.04 s per run.
    freeze_startup_heap()
    return engine


class EngineCore:
    """The step loop over an LLMEngine's public surface, speaking CoreOutputs."""

    def __init__(self, engine: Any, max_waiting_requests: int | None, fault_after_steps: int | None) -> None:
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.fault_after_steps = fault_after_steps
        self.num_steps = 0
        self.step_delay_s = float(os.environ.get(STEP_DELAY_ENV) or 0)
        # Loop time by part, engine.step() time by kind of step, Triton compiles while serving: logged when the
        # loop ends (gpu_online_vs_offline.py keeps that line and the compile warnings).
        self.loop_stats = CoreLoopStats(os.environ.get(STEP_TRACE_ENV) or None)
        # request id -> per sequence index: output token ids already sent (-1: its finish was sent)
        self._sent: dict[str, list[int]] = {}
        self._codec = OutputCodec()
        engine.output_builder = self.deltas

    def serve(self, inbox: Any, outbox: Any, parent: int) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(inbox, zmq.POLLIN)
        clock = time.perf_counter
        spent = self.loop_stats.loop_seconds
        self.loop_stats.watch_jit()
        try:
            while True:
                if os.getppid() != parent:
                    logger.warning("the API process is gone; the engine core exits")
                    return
                t0 = clock()
                if not self.engine.has_unfinished_requests() and not poller.poll(POLL_MS):
                    spent["idle"] += clock() - t0
                    continue
                t1 = clock()
                messages = []
                while True:
                    try:
                        messages.append(pickle.loads(inbox.recv(zmq.NOBLOCK)))
                    except zmq.Again:
                        break
                reply = CoreOutputs(accepted=[], rejected=[], outputs=[])
                if not self.apply(messages, reply):
                    return
                t2 = clock()
                stepped = self.engine.has_unfinished_requests()
                if stepped:
                    self.step(reply)
                t3 = clock()
                reply.stats = self.stats()
                if messages or reply.outputs:
                    outbox.send(self._codec.encode(reply), copy=False)
                t4 = clock()
                spent["idle"] += t1 - t0
                spent["inbox"] += t2 - t1
                spent["step"] += t3 - t2
                spent["send"] += t4 - t3
                if stepped:
                    self.loop_stats.record_turn(t0, t1 - t0, t2 - t1, t3 - t2, t4 - t3, len(messages))
        finally:
            self.loop_stats.stop_jit()
            logger.info("%s", self.loop_stats.summary_line())
            self.loop_stats.write_trace()

    def apply(self, messages: list[tuple], reply: CoreOutputs) -> bool:
        """In arrival order (an abort sent right after its add must find it); False on shutdown."""
        for message in messages:
            kind = message[0]
            if kind == "shutdown":
                return False
            if kind == "add":
                self.add(*message[1:], reply=reply)
            elif kind == "abort":
                live = [rid for rid in message[1] if self._sent.pop(rid, None) is not None]
                if live:
                    self.engine.abort_request(live)
        return True

    def add(self, request_id: str, prompt_token_ids: list[int], params: Any, prompt: str | None,
            arrival_time: float, reply: CoreOutputs) -> None:
        try:
            self.engine.validate_prompt(prompt_token_ids, params)  # a bad request gets its 400 even under load
            waiting = int(self.engine.get_stats().num_waiting)
            if self.max_waiting_requests is not None and waiting >= self.max_waiting_requests:
                reply.rejected.append([request_id, "queue_full",
                                       f"the server is at capacity: {waiting} requests are waiting "
                                       f"(max_waiting_requests={self.max_waiting_requests}); retry later"])
                return
            self.engine.add_request(request_id, prompt_token_ids, params, prompt=prompt, arrival_time=arrival_time)
        except ValueError as exc:
            reply.rejected.append([request_id, "invalid", str(exc)])
            return
        except Exception as exc:  # noqa: BLE001 - one bad request must not take the loop down
            logger.exception("engine rejected request %s with an unexpected error", request_id)
            reply.rejected.append([request_id, "internal", f"{type(exc).__name__}: {exc}"])
            return
        self._sent[request_id] = [0] * params.n
        reply.accepted.append(request_id)

    def step(self, reply: CoreOutputs) -> None:
        t0 = time.perf_counter()
        deltas = self.engine.step()  # lists of SeqDelta: the engine calls self.deltas per request that progressed
        self.loop_stats.record_step(time.perf_counter() - t0, self.engine.in_flight)
        self.num_steps += 1
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        if self.fault_after_steps is not None and self.num_steps >= self.fault_after_steps:
            raise InjectedEngineFault(f"test hook: injected engine fault after {self.num_steps} steps")
        for request_deltas in deltas:
            reply.outputs += request_deltas

    def deltas(self, request: Any) -> list[SeqDelta]:
        """The engine's output builder here: each sequence's tokens not sent yet, O(new tokens), read from the
        engine's Request without building a cumulative RequestOutput (which copies every token so far)."""
        request_id = request.request_id
        sent = self._sent.get(request_id)
        if sent is None:  # aborted meanwhile
            return []
        sequences = request.sequences
        if len(sequences) == 1:  # n == 1, nearly every request: the same delta with less bookkeeping
            return self._single_delta(request, sequences[0], sent)
        request_finished = request.finished
        num_cached = max(seq.num_cached_tokens for seq in sequences)
        times = _times(request.metrics) if request_finished else None
        out = []
        for seq in sequences:
            done = sent[seq.index]
            if done < 0:  # its finish was already sent (another sequence of the request is still running)
                continue
            finished = seq.status.finished
            new_ids = seq.token_ids[seq.prompt_len + done:]
            if not new_ids and not finished:
                continue
            sent[seq.index] = -1 if finished else done + len(new_ids)
            logprobs = seq.logprobs
            out.append(SeqDelta(
                request_id=request_id, index=seq.index, new_token_ids=new_ids,
                finish_reason=seq.status.value if finished else None, stop_reason=seq.stop_reason,
                new_logprobs=_plain_logprobs(logprobs[done:]) if logprobs else None,
                request_finished=request_finished, num_cached_tokens=num_cached, times=times,
            ))
        if request_finished:
            del self._sent[request_id]
        return out

    def _single_delta(self, request: Any, seq: Any, sent: list[int]) -> list[SeqDelta]:
        """``deltas`` for a request of one sequence (it runs for every request on every step: kept lean)."""
        done = sent[0]
        finished = seq.status.finished
        new_ids = seq.token_ids[len(seq.prompt_token_ids) + done:]
        if not new_ids and not finished:
            return []
        if finished:
            del self._sent[request.request_id]
        else:
            sent[0] = done + len(new_ids)
        logprobs = seq.logprobs
        # Positional, in SeqDelta's field order.
        return [SeqDelta(request.request_id, 0, new_ids, seq.status.value if finished else None, seq.stop_reason,
                         _plain_logprobs(logprobs[done:]) if logprobs else None, finished, seq.num_cached_tokens,
                         _times(request.metrics) if finished else None)]

    def stats(self) -> list[float]:
        stats = self.engine.get_stats()
        values = {name: getattr(stats, name, 0) for name in STAT_FIELDS}
        values["num_steps"] = self.num_steps
        return [float(values[name]) for name in STAT_FIELDS] + [float(n) for n in stats.spec_decode_accepted_per_pos]


def _plain_logprobs(entries: list[dict]) -> list[list[list[float]]]:
    return [[[tid, lp.logprob, lp.rank if lp.rank is not None else -1] for tid, lp in entry.items()]
            for entry in entries]


def _times(metrics: Any) -> list[float | None] | None:
    if metrics is None:
        return None
    return [metrics.arrival_time, metrics.first_scheduled_time, metrics.first_token_time, metrics.last_token_time,
            metrics.finished_time]
