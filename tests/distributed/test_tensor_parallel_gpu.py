"""Tensor parallelism on GPUs: NCCL ranks, Triton attention, CUDA graphs captured on every rank.

Skipped below two GPUs. fp32 greedy tokens must equal transformers with graphs, eagerly, with and without async
scheduling (rank 0 broadcasts its sampled ids for the next step's placeholders); bf16 logits
must stay within tolerance of TP=1; a rank killed while rank 0 waits on the GPU must raise, not hang.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from tiny_models import make_tiny_model_dir, transformers_greedy
from transformers import AutoTokenizer

from tokenmill import LLM, SamplingParams

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")

MAX_NEW = 12
TEXTS = [
    "The quick brown fox",
    "Paris is the capital of France. Continuous batching keeps the GPU busy; paged attention",
    "Unicode: café, naïve, Straße, 東京",
]
ENGINE_ARGS = dict(device="cuda", max_model_len=256, max_num_seqs=8)


@pytest.fixture(scope="module")
def model_case(tmp_path_factory):
    model_dir = make_tiny_model_dir(tmp_path_factory.mktemp("tp_gpu"), "llama", num_key_value_heads=2)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer.encode(t) for t in TEXTS]
    return model_dir, prompts, transformers_greedy(model_dir, prompts, MAX_NEW)


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("eager, async_scheduling, custom_all_reduce",
                         [(False, True, False), (False, False, False), (True, True, False), (False, True, True)])
def test_fp32_greedy_matches_transformers_with_two_ranks(model_case, eager, async_scheduling, custom_all_reduce):
    model_dir, prompts, expected = model_case
    llm = LLM(str(model_dir), dtype="float32", tensor_parallel_size=2, enforce_eager=eager,
              async_scheduling=async_scheduling, custom_all_reduce=custom_all_reduce, **ENGINE_ARGS)
    try:
        assert llm.engine.attn_backend.name == "triton"
        assert llm.engine.async_scheduling is async_scheduling
        assert (llm.engine.runner.ctx.custom is not None) is custom_all_reduce
        assert (llm.engine.runner.graphs is None) is eager
        assert _greedy(llm, prompts) == expected
        assert _greedy(llm, prompts * 3) == expected * 3  # decode batches of 9: a padded graph size
    finally:
        llm.engine.shutdown()
    # The worker stopped by itself (a kill after the grace period would leave -9): its communicator closed
    # after its CUDA graphs were dropped, which NCCL's abort waits for.
    assert [worker.exitcode for worker in llm.engine.runner.workers] == [0]


def test_bf16_decode_logits_within_tolerance_of_one_rank(model_case):
    model_dir, prompts, _ = model_case
    logits = []
    for tp in (1, 2):
        llm = LLM(str(model_dir), dtype="bfloat16", tensor_parallel_size=tp, async_scheduling=False, **ENGINE_ARGS)
        engine = llm.engine
        try:
            for i, ids in enumerate(prompts):
                engine.add_request(f"r{i}", ids, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
            engine.step()  # prefill
            sched = engine.scheduler.schedule()  # a decode step: the captured graph runs it
            assert all(item.num_tokens == 1 for item in sched.scheduled)
            logits.append(engine.runner.forward_logits(sched.record)[0].float().cpu())
        finally:
            engine.shutdown()
    # bf16 rounds each rank's partial sums before the all-reduce: a few bf16 ulps of the largest logit.
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=0.03 * logits[0].abs().max().item())
    assert (logits[1].argmax(-1) == logits[0].argmax(-1)).float().mean() >= 2 / 3


# Rank 0 is left with a collective kernel that never ends, so each failure runs in its own process (as a server
# would: it exits non-zero after a rank failure). The stopped worker cannot take the step, so rank 0 is surely
# waiting on the GPU when the worker is killed (or, with "stop", never answers).
_FAILURE_SCRIPT = """
import os, signal, sys, threading, time
from tokenmill import LLM, SamplingParams
from tokenmill.runner.tp_executor import TensorParallelError
llm = LLM(sys.argv[1], dtype="bfloat16", tensor_parallel_size=2, device="cuda", max_model_len=256, max_num_seqs=8)
engine = llm.engine
engine.runner.timeout_s = 10.0
engine.add_request("a", [5, 6, 7, 8], SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
engine.step()
worker = engine.runner.workers[0]
os.kill(worker.pid, signal.SIGSTOP)
if sys.argv[2] == "kill":
    threading.Timer(1.0, os.kill, (worker.pid, signal.SIGKILL)).start()
started = time.monotonic()
try:
    while engine.has_unfinished_requests():
        engine.step()
except TensorParallelError as exc:
    print(f"RAISED after {time.monotonic() - started:.1f} s: {exc}", flush=True)
    os.kill(worker.pid, signal.SIGKILL)
    os._exit(0)
print("NO ERROR", flush=True)
os._exit(1)
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("failure, message", [("kill", "rank 1 .* exited"), ("stop", "did not finish in 10 s")])
def test_a_failed_rank_raises_while_rank0_waits_on_the_gpu(model_case, failure, message):
    model_dir, _, _ = model_case
    run = subprocess.run([sys.executable, "-c", _FAILURE_SCRIPT, str(model_dir), failure],
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    match = re.search(r"RAISED after ([\d.]+) s: (.*)", run.stdout)
    assert match and re.search(message, match.group(2)), run.stdout
    assert float(match.group(1)) < 30
