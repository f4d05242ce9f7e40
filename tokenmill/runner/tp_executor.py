"""TPExecutor: tensor-parallel model execution — rank 0 in the engine process, ranks 1..N-1 as spawned workers.

Each step rank 0 sends the scheduler's step record (engine/step_record.py: plain data) to every worker over its
pipe; every rank applies it to its own persistent batch, builds and uploads the same inputs and runs the same
``ModelRunner.run_model`` (a captured CUDA graph for decode batches, collectives inside, captured on all ranks in the
same order), and rank 0 samples. A dead rank raises,
also while rank 0 waits on the GPU for a collective its peer will never join.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from tokenmill.attention.backend import AttentionBackend, get_attention_backend
from tokenmill.config import EngineConfig
from tokenmill.distributed.context import ParallelContext, create_parallel_context
from tokenmill.engine.step_record import StepRecord
from tokenmill.engine.threads import set_engine_threads
from tokenmill.model.loader import check_tensor_parallel, load_model
from tokenmill.runner.inputs import ModelInputs
from tokenmill.runner.linear_tuning import tune_rank_linears
from tokenmill.runner.model_runner import LaunchedStep, ModelRunner

logger = logging.getLogger(__name__)

# NVLink multicast stays off in every rank (see the device notes); harmless on CPU.
_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class TensorParallelError(RuntimeError):
    """A tensor-parallel rank died or failed; the engine cannot continue."""


def _rank_device(device: str, rank: int) -> str:
    """Rank r runs on the r-th GPU after the one the engine was given (cuda:1 → ranks on cuda:1, cuda:2, ...)."""
    if not device.startswith("cuda"):
        return device
    base = int(device.partition(":")[2] or 0)
    return f"cuda:{base + rank}"


def _worker_main(rank: int, config: EngineConfig, store_path: str, conn: Connection, parent_pid: int,
                 timeout_s: float) -> None:
    """Entry point of ranks 1..N-1: join the group, load this rank's shard, then serve commands until 'stop'."""
    mc = config.model
    tp = config.runner.tensor_parallel_size
    device = _rank_device(mc.device, rank)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    try:
        conn.send(("started", None))  # imports done: rank 0 may now block in the rendezvous
        ctx = create_parallel_context(rank, tp, Path(store_path), device, timeout_s, config.runner.custom_all_reduce)
        # With async scheduling the next step may read tokens in flight from rank 0's sampled ids.
        share_sampled_ids = config.runner.schedules_async(device.startswith("cuda"))
        backend = get_attention_backend(config.runner.attention_backend, device)
        loaded = load_model(mc, backend, parallel=ctx, device=device)
        if device.startswith("cuda"):  # as rank 0 does after loading: one thread (engine/threads.py says why)
            set_engine_threads(on_cpu=False)
        tune_rank_linears(loaded.model, config, device)  # this rank's partition shapes, before capture
        runner = ModelRunner(loaded.model, device, mc.torch_dtype, config.cache.kv_cache_spec(
            loaded.model.num_kv_heads, loaded.model.head_dim, mc.torch_dtype), set(), samples=False)
        conn.send(("ready", None))
        while True:
            while not conn.poll(1.0):
                if os.getppid() != parent_pid:  # the engine died without saying stop
                    return
            op, payload = conn.recv()
            if op == "stop":
                _close_rank(runner, ctx)
                return
            if op == "alloc":
                runner.allocate_kv_cache(payload)
            elif op == "profile":
                runner.profile_run(*payload)
            elif op == "capture":
                runner.capture_graphs(*payload)
            elif op == "step":  # the same forward and logits as rank 0 (the logits' all-gather needs every rank)
                with torch.inference_mode():
                    inputs = runner.prepare_inputs(payload)
                    runner.run_model(inputs)
                    runner.prev_sampled = None  # rank 0's sampled ids, which the next step may read (async)
                    if share_sampled_ids and inputs.sample_rows:
                        runner.prev_sampled = torch.empty(inputs.sample_indices.shape[0], dtype=torch.int64,
                                                          device=runner.device)
                        ctx.broadcast(runner.prev_sampled)
            else:
                raise ValueError(f"unknown tensor-parallel command {op!r}; expected alloc, profile, capture, step "
                                 "or stop")
    except (EOFError, BrokenPipeError):
        return  # the engine closed our pipe: it is shutting down or gone
    except Exception as exc:
        logger.exception("tensor-parallel rank %d failed", rank)
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        except (BrokenPipeError, OSError):
            logger.warning("rank %d could not report its failure: the engine's pipe is closed", rank)
        raise


def _close_rank(runner: ModelRunner, ctx: ParallelContext) -> None:
    """Drop the runner's CUDA graphs, then close the rank's communicator: NCCL's abort waits until every graph
    that captured one of its collectives is destroyed."""
    runner.graphs = None
    gc.collect()
    if not ctx.close():
        logger.warning("rank %d: closing the communicator did not finish in time; left to process exit", ctx.rank)


def _stop_workers(workers: list[Any], conns: list[Connection], timeout_s: float) -> None:
    """Ask every worker to stop, wait, and kill stragglers."""
    for conn in conns:
        try:
            conn.send(("stop", None))
        except (BrokenPipeError, OSError):
            logger.debug("a tensor-parallel worker pipe was already closed at shutdown")
    for proc in workers:
        proc.join(timeout_s)
        if proc.is_alive():
            logger.warning("tensor-parallel worker pid %d did not stop in %.0f s; killing it", proc.pid, timeout_s)
            proc.kill()
            proc.join(timeout_s)
    for conn in conns:
        conn.close()


def _stop_workers_and_remove(workers: list[Any], conns: list[Connection], tmpdir: str, timeout_s: float) -> None:
    """The garbage-collection path: stop the workers, then remove the rendezvous directory."""
    _stop_workers(workers, conns, timeout_s)
    shutil.rmtree(tmpdir, ignore_errors=True)


class TPExecutor(ModelRunner):
    """A ModelRunner whose model is rank 0's shard; ``loaded`` carries the tokenizer and model facts."""

    def __init__(self, config: EngineConfig, attn_backend: AttentionBackend, timeout_s: float = 60.0,
                 load_timeout_s: float = 1800.0) -> None:
        mc = config.model
        self.world_size = config.runner.tensor_parallel_size
        self.timeout_s = timeout_s
        on_cuda = mc.device.startswith("cuda")
        if on_cuda:
            os.environ.update(_NCCL_ENV)  # inherited by the spawned workers
            last = _rank_device(mc.device, self.world_size - 1)
            if int(last.partition(":")[2]) >= torch.cuda.device_count():
                raise ValueError(f"tensor_parallel_size ({self.world_size}) on {mc.device} needs GPUs up to {last}; "
                                 f"{torch.cuda.device_count()} are visible")
            torch.cuda.set_device(torch.device(_rank_device(mc.device, 0)))  # NCCL binds rank 0 to the current GPU
        if config.runner.custom_all_reduce and not on_cuda:
            raise ValueError("custom_all_reduce shares CUDA buffers between GPUs; it needs --device cuda")
        check_tensor_parallel(mc, self.world_size)  # fail before starting any process
        self._tmpdir = tempfile.mkdtemp(prefix="tokenmill-tp-")
        store_path = Path(self._tmpdir) / "rendezvous"
        spawn = mp.get_context("spawn")
        self.workers: list[Any] = []
        self.conns: list[Connection] = []
        self._finalizer = weakref.finalize(self, _stop_workers_and_remove, self.workers, self.conns, self._tmpdir, 10.0)
        for rank in range(1, self.world_size):
            parent_end, child_end = spawn.Pipe()
            proc = spawn.Process(target=_worker_main, name=f"tokenmill-tp-rank{rank}", daemon=True,
                                 args=(rank, config, str(store_path), child_end, os.getpid(), timeout_s))
            proc.start()
            child_end.close()
            self.workers.append(proc)
            self.conns.append(parent_end)
        try:
            self._wait_for("started", load_timeout_s)
            self.ctx: ParallelContext = create_parallel_context(0, self.world_size, store_path,
                                                                _rank_device(mc.device, 0), timeout_s,
                                                                config.runner.custom_all_reduce)
            self.loaded = load_model(mc, attn_backend, parallel=self.ctx, device=mc.device)
            tune_rank_linears(self.loaded.model, config, mc.device)
            self._wait_for("ready", load_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        super().__init__(self.loaded.model, mc.device, mc.torch_dtype, config.cache.kv_cache_spec(
            self.loaded.model.num_kv_heads, self.loaded.model.head_dim, mc.torch_dtype), set(self.loaded.eos_token_ids))
        # The engine schedules a step while the previous one runs: every rank needs rank 0's sampled ids.
        self.share_sampled_ids = config.runner.schedules_async(on_cuda)
        logger.info("tensor parallel: %d ranks (%s), worker pids %s", self.world_size,
                    "nccl" if on_cuda else "gloo", [p.pid for p in self.workers])

    # ---- worker protocol -------------------------------------------------------------------------
    def _wait_for(self, expected: str, timeout_s: float) -> None:
        """Wait until every worker says ``expected`` ('started': imported; 'ready': shard loaded), watching for deaths."""
        for rank, (proc, conn) in enumerate(zip(self.workers, self.conns, strict=True), start=1):
            waited = 0.0
            while not conn.poll(1.0):
                waited += 1.0
                if not proc.is_alive():
                    raise TensorParallelError(f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code "
                                              f"{proc.exitcode} before it was {expected}")
                if waited >= timeout_s:
                    raise TensorParallelError(f"tensor-parallel rank {rank} was not {expected} after {timeout_s:.0f} s")
            op, detail = conn.recv()
            if op != expected:
                raise TensorParallelError(f"tensor-parallel rank {rank} failed before it was {expected}: {detail}")

    def check_workers(self) -> None:
        """Raise TensorParallelError naming every worker that has exited or reported an error."""
        problems = []
        for rank, (proc, conn) in enumerate(zip(self.workers, self.conns, strict=True), start=1):
            if not proc.is_alive():
                problems.append(f"rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}")
            elif conn.poll(0):
                try:
                    problems.append(f"rank {rank} (pid {proc.pid}) reported {conn.recv()[1]}")
                except (EOFError, OSError):  # it died between the two checks: its end of the pipe is gone
                    problems.append(f"rank {rank} (pid {proc.pid}) exited (its pipe closed)")
        if problems:
            raise TensorParallelError("tensor-parallel worker failure: " + "; ".join(problems)
                                      + "; the engine cannot continue")

    def _send(self, op: str, payload: Any) -> None:
        self.check_workers()
        for rank, conn in enumerate(self.conns, start=1):
            try:
                conn.send((op, payload))
            except (BrokenPipeError, OSError) as exc:
                raise TensorParallelError(f"cannot reach tensor-parallel rank {rank}: {exc}") from exc

    def _collective(self, fn: Any, *args: Any) -> Any:
        """Run rank 0's part of a collective step; a failure names the dead ranks when there are any."""
        try:
            return fn(*args)
        except RuntimeError as exc:
            if isinstance(exc, TensorParallelError):
                raise
            self.check_workers()
            raise TensorParallelError(f"tensor-parallel collective failed on rank 0: {exc}") from exc

    def shutdown(self) -> None:
        """Stop every worker (killing it after a grace period), close rank 0's communicator, then remove the
        rendezvous directory (a communicator still open would keep polling it); safe to call twice."""
        if self._finalizer.detach() is None:
            return
        started = time.monotonic()
        _stop_workers(self.workers, self.conns, 10.0)
        workers_s = time.monotonic() - started
        if hasattr(self, "ctx"):  # after the workers: nothing can be in flight between ranks now
            _close_rank(self, self.ctx)
        shutil.rmtree(self._tmpdir, ignore_errors=True)
        logger.info("tensor parallel stopped: workers in %.1f s, all in %.1f s", workers_s,
                    time.monotonic() - started)

    # ---- ModelRunner overrides -------------------------------------------------------------------
    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._send("alloc", num_blocks)
        super().allocate_kv_cache(num_blocks)

    def profile_run(self, num_tokens: int, num_sampled: int, max_seq_len: int | None = None) -> None:
        self._send("profile", (num_tokens, num_sampled, max_seq_len))
        self._collective(super().profile_run, num_tokens, num_sampled, max_seq_len)

    def capture_graphs(self, max_batch: int, max_model_len: int, query_lens: tuple[int, ...] = (1,)) -> None:
        """Every rank captures the same ladder in the same order, so the collectives inside pair up."""
        self._send("capture", (max_batch, max_model_len, query_lens))
        self._collective(super().capture_graphs, max_batch, max_model_len, query_lens)

    def prepare_inputs(self, record: StepRecord) -> ModelInputs:
        self._send("step", record)
        return super().prepare_inputs(record)

    def run_model(self, inputs: ModelInputs) -> torch.Tensor:
        return self._collective(super().run_model, inputs)

    def launch(self, record: StepRecord, grammars: dict[str, Any] | None = None,
               before_sampling: Callable[[], None] | None = None) -> LaunchedStep:
        """Rank 0 samples; with async scheduling its ids go to every rank (the next step may read tokens in flight
        from them). On GPUs a dead peer leaves rank 0's collective kernel waiting forever: the result watches."""
        launched = self._collective(super().launch, record, grammars, before_sampling)
        if self.share_sampled_ids and launched.req_ids:
            self._collective(self.ctx.broadcast, launched.token_ids)
        deadline = time.monotonic() + self.timeout_s

        def watch() -> None:  # a stopped or deadlocked rank is alive but never joins: the deadline catches it
            self.check_workers()
            if time.monotonic() > deadline:
                raise TensorParallelError(f"a tensor-parallel step did not finish in {self.timeout_s:.0f} s; a rank "
                                          "is stuck and the engine cannot continue")

        launched.watch = watch
        return launched
