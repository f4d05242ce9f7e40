"""Tensor parallelism on CPU: 2 gloo ranks (rank 0 in the engine, one spawned worker) on tiny random Llamas.

Greedy tokens must equal TP=1 and transformers, logits must agree to 1e-5 relative, shutdown must leave no
child process, and a rank killed mid-run must make the engine raise instead of hanging.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch
from tiny_models import make_tiny_model_dir, transformers_greedy
from transformers import AutoTokenizer

from tokenmill import LLM, SamplingParams
from tokenmill.config import RunnerConfig
from tokenmill.model.weights import LazySlice, iter_safetensors_slices
from tokenmill.runner.tp_executor import TensorParallelError

MAX_NEW = 10
TEXTS = [
    "The quick brown fox",
    "Paris is the capital of France. Continuous batching keeps the GPU busy; paged attention",
    "Unicode: café, naïve, Straße, 東京",
]
ENGINE_ARGS = dict(device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=64, block_size=8)


def _assert_reaped(pids: list[int]) -> None:
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# kv2: KV heads split 1 per rank; kv1: the single KV head replicated on both ranks; qwen2: q/k/v biases and a
# tied LM head (vocab-parallel embedding shared with the head).
CASES = {"llama_kv2": ("llama", 2), "llama_kv1": ("llama", 1), "qwen2_kv2": ("qwen2", 2)}


@pytest.fixture(scope="module", params=list(CASES))
def tp_case(request, tmp_path_factory):
    arch, kv_heads = CASES[request.param]
    model_dir = make_tiny_model_dir(tmp_path_factory.mktemp(request.param), arch, num_key_value_heads=kv_heads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer.encode(t) for t in TEXTS]
    tp1 = LLM(str(model_dir), **ENGINE_ARGS)
    tp2 = LLM(str(model_dir), tensor_parallel_size=2, **ENGINE_ARGS)
    yield model_dir, prompts, tp1, tp2
    pids = [p.pid for p in tp2.engine.runner.workers]
    tp2.engine.shutdown()
    _assert_reaped(pids)


def test_greedy_tokens_match_tp1_and_transformers(tp_case):
    model_dir, prompts, tp1, tp2 = tp_case
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)
    want = [o.outputs[0].token_ids for o in tp1.generate(prompts, params, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in tp2.generate(prompts, params, use_tqdm=False)]
    assert got == want
    assert got == transformers_greedy(model_dir, prompts, MAX_NEW)


def test_async_scheduling_with_two_ranks_gives_the_same_tokens(tmp_path):
    """Rank 0 schedules step N+1 before reading step N's ids; the worker fills the placeholders from rank 0's
    broadcast of them."""
    model_dir = make_tiny_model_dir(tmp_path / "m", "llama")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer.encode(t) for t in TEXTS]
    llm = LLM(str(model_dir), tensor_parallel_size=2, async_scheduling=True, **ENGINE_ARGS)
    try:
        assert llm.engine.async_scheduling and llm.engine.runner.share_sampled_ids
        params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert got == transformers_greedy(model_dir, prompts, MAX_NEW)
    finally:
        llm.engine.shutdown()


def test_logits_match_tp1(tp_case):
    _, prompts, tp1, tp2 = tp_case
    logits = []
    for llm in (tp1, tp2):
        engine = llm.engine
        for i, ids in enumerate(prompts):
            engine.add_request(f"logits-{i}", ids, SamplingParams(temperature=0.0, max_tokens=4))
        sched = engine.scheduler.schedule()
        assert len(sched.scheduled) == len(prompts)
        logits.append(engine.runner.forward_logits(sched.record)[0])
        engine.abort_request([f"logits-{i}" for i in range(len(prompts))])
    assert logits[1].shape == (len(prompts), tp1.engine.model.vocab_size)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5 * logits[0].abs().max().item())


def test_each_rank_holds_a_shard_not_the_whole_model(tp_case):
    _, _, tp1, tp2 = tp_case
    full = sum(p.numel() for p in tp1.engine.model.parameters())
    shard = sum(p.numel() for p in tp2.engine.model.parameters())
    assert shard < 0.6 * full


def test_tensor_parallel_size_is_validated():
    with pytest.raises(ValueError, match="tensor_parallel_size must be between 1 and 64"):
        RunnerConfig(tensor_parallel_size=0)


@pytest.mark.timeout(120)
def test_killed_rank_makes_generation_raise(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / "m", "llama")
    llm = LLM(str(model_dir), tensor_parallel_size=2, **ENGINE_ARGS)
    engine = llm.engine
    worker = engine.runner.workers[0]
    try:
        engine.add_request("a", [5, 6, 7, 8], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
        engine.step()
        engine.step()
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(30)
        # Rank 0 alone inside a collective: gloo sees the closed peer and raises instead of waiting forever.
        with pytest.raises(RuntimeError):
            engine.runner.model.model.embed_tokens(torch.tensor([1, 2, 3]))
        with pytest.raises(TensorParallelError, match="rank 1"):
            while engine.has_unfinished_requests():
                engine.step()
        with pytest.raises(TensorParallelError):  # stays failed; never hangs on the dead rank
            engine.step()
    finally:
        engine.shutdown()
    _assert_reaped([worker.pid])


def test_generate_cli_runs_with_two_ranks(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / "m", "llama")
    run = subprocess.run(
        [sys.executable, "-m", "tokenmill", "generate", str(model_dir), "--device", "cpu", "--dtype", "float32",
         "--prompt", "The quick brown fox", "--max-tokens", "6", "--tensor-parallel-size", "2"],
        capture_output=True, text=True, timeout=180,
    )
    assert run.returncode == 0, run.stderr
    assert "### The quick brown fox" in run.stdout
    assert "tensor parallel: 2 ranks (gloo)" in run.stderr


@pytest.mark.timeout(180)
def test_server_with_a_dead_rank_answers_503_and_exits_nonzero(tmp_path):
    pytest.importorskip("fastapi", reason="the server extra is not installed (the GPU box has no fastapi)")
    model_dir = make_tiny_model_dir(tmp_path / "m", "llama")
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tokenmill", "serve", str(model_dir), "--host", "127.0.0.1", "--port", "0",
             "--device", "cpu", "--dtype", "float32", "--tensor-parallel-size", "2", *_SERVE_ARGS],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        url = _wait_for_log(proc, log_path, _URL_RE).group(1)
        worker_pid = int(_wait_for_log(proc, log_path, _PIDS_RE).group(1))
        body = {"model": "m", "prompt": "The quick", "max_tokens": 3, "temperature": 0.0}
        assert httpx.post(url + "/v1/completions", json=body, timeout=120).status_code == 200
        os.kill(worker_pid, signal.SIGKILL)
        failed = httpx.post(url + "/v1/completions", json=body, timeout=120)
        assert failed.status_code >= 500 and failed.json()["error"]["code"] == "engine_dead", failed.text
        assert "rank 1" in failed.json()["error"]["message"]
        health = httpx.get(url + "/health", timeout=30)  # the server keeps answering for a short grace period
        assert health.status_code == 503 and health.json()["status"] == "engine_dead"
        assert proc.wait(timeout=60) != 0
        assert "tensor-parallel worker failure: rank 1" in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


_SERVE_ARGS = ["--num-kv-blocks", "64", "--block-size", "8", "--max-model-len", "256"]
_URL_RE = re.compile(r"serving at (http://127\.0\.0\.1:\d+)")
_PIDS_RE = re.compile(r"worker pids \[(\d+)\]")


def _wait_for_log(proc: subprocess.Popen, log_path, pattern: re.Pattern) -> re.Match:
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        match = pattern.search(log_path.read_text(errors="replace"))
        if match:
            return match
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
        time.sleep(0.2)
    raise AssertionError(f"{pattern.pattern!r} never appeared in the server log:\n{log_path.read_text()}")


def test_heads_not_divisible_by_ranks_fail_at_startup_and_leave_no_worker(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / "m", "llama")
    before = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) must be divisible by tensor_parallel_size \(3\)"):
        LLM(str(model_dir), tensor_parallel_size=3, **ENGINE_ARGS)
    assert {p.pid for p in multiprocessing.active_children()} == before


def test_custom_all_reduce_is_refused_on_cpu(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / "m", "llama")
    with pytest.raises(ValueError, match="custom_all_reduce shares CUDA buffers"):
        LLM(str(model_dir), tensor_parallel_size=2, custom_all_reduce=True, **ENGINE_ARGS)


def test_safetensors_matrices_are_read_slice_by_slice(tmp_path):
    from safetensors.torch import load_file

    model_dir = make_tiny_model_dir(tmp_path / "m", "llama")
    full = load_file(str(model_dir / "model.safetensors"))
    seen = 0
    for name, item in iter_safetensors_slices(model_dir):
        if full[name].dim() < 2:
            assert isinstance(item, torch.Tensor) and torch.equal(item, full[name])
            continue
        assert isinstance(item, LazySlice) and item.shape == tuple(full[name].shape)
        torch.testing.assert_close(item.narrow(0, 1, 2), full[name][1:3], rtol=0, atol=0)
        torch.testing.assert_close(item.narrow(1, 3, 5), full[name][:, 3:8], rtol=0, atol=0)
        seen += 1
    assert seen == 2 + 2 * 7  # embed + lm_head + per layer q, k, v, o, gate, up, down


def test_random_weights_preset_generates_with_two_ranks(tmp_path):
    tokenizer_dir = make_tiny_model_dir(tmp_path / "m", "llama")
    llm = LLM(None, random_weights="tiny-llama", tokenizer=str(tokenizer_dir), tensor_parallel_size=2,
              **ENGINE_ARGS)
    try:
        out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                           use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4
        assert all(0 <= t < 49152 for t in out[0].outputs[0].token_ids)
    finally:
        llm.engine.shutdown()
