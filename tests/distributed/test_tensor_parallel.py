"""Tensor parallelism on CPU: 2 gloo ranks (rank 0 in the engine, one spawned worker) on tiny random Llamas.

Greedy tokens must equal TP=1 and transformers, logits must agree to 1e-5 relative, shutdown must leave no
child process, and a rank killed mid-run must make the engine raise instead of hanging.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys

import pytest
import torch
from tiny_models import make_tiny_model_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokenmill import LLM, SamplingParams
from tokenmill.config import RunnerConfig
from tokenmill.runner.tp_executor import TensorParallelError

MAX_NEW = 10
TEXTS = [
    "The quick brown fox",
    "Paris is the capital of France. Continuous batching keeps the GPU busy; paged attention",
    "Unicode: café, naïve, Straße, 東京",
]
ENGINE_ARGS = dict(device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=64, block_size=8)


def _transformers_greedy(model_dir, prompts: list[list[int]]) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    outputs = []
    for ids in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=eos)
        new = out[0, len(ids):].tolist()
        outputs.append(new[: new.index(eos) + 1] if eos in new else new)
    return outputs


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
    tp2.engine.runner.shutdown()
    _assert_reaped(pids)


def test_greedy_tokens_match_tp1_and_transformers(tp_case):
    model_dir, prompts, tp1, tp2 = tp_case
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)
    want = [o.outputs[0].token_ids for o in tp1.generate(prompts, params, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in tp2.generate(prompts, params, use_tqdm=False)]
    assert got == want
    assert got == _transformers_greedy(model_dir, prompts)


def test_logits_match_tp1(tp_case):
    _, prompts, tp1, tp2 = tp_case
    logits = []
    for llm in (tp1, tp2):
        engine = llm.engine
        for i, ids in enumerate(prompts):
            engine.add_request(f"logits-{i}", ids, SamplingParams(temperature=0.0, max_tokens=4))
        sched = engine.scheduler.schedule()
        assert len(sched.scheduled) == len(prompts)
        logits.append(engine.runner.forward_logits(sched)[0])
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
        engine.runner.shutdown()
    _assert_reaped([worker.pid])


def test_generate_cli_with_two_ranks_prints_the_tp1_text(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / "m", "llama")
    base = [sys.executable, "-m", "tokenmill", "generate", str(model_dir), "--device", "cpu", "--dtype", "float32",
            "--prompt", "The quick brown fox", "--max-tokens", "6"]
    runs = [subprocess.run(base + extra, capture_output=True, text=True, timeout=180)
            for extra in ([], ["--tensor-parallel-size", "2"])]
    for run in runs:
        assert run.returncode == 0, run.stderr
    assert "### The quick brown fox" in runs[1].stdout
    assert runs[1].stdout == runs[0].stdout
    assert "tensor parallel: 2 ranks (gloo)" in runs[1].stderr


def test_heads_not_divisible_by_ranks_fail_at_startup_and_leave_no_worker(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / "m", "llama")
    before = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) must be divisible by tensor_parallel_size \(3\)"):
        LLM(str(model_dir), tensor_parallel_size=3, **ENGINE_ARGS)
    assert {p.pid for p in multiprocessing.active_children()} == before
