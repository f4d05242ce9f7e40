"""The engine on CUDA (Triton backend, CUDA graphs): skipped without a GPU.

fp32: greedy tokens identical to transformers in every engine mode, synchronous and async scheduling;
bf16: logits within tolerance of an fp32 reference; CUDA graphs (decode only, or piecewise for steps with
prompts too) and eager mode agree.
"""

from __future__ import annotations

import pytest
import torch
from test_greedy_vs_transformers import MAX_NEW, MODES, TEXTS, _reference
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokenmill import LLM, SamplingParams
from tokenmill.bench.jit_watch import JitWatch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def case(tiny_model_dirs):
    model_dir = tiny_model_dirs["qwen3"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer.encode(t) for t in TEXTS]
    return model_dir, prompts, _reference(model_dir, prompts)


@pytest.mark.parametrize("cudagraph_mode", ["FULL_DECODE_ONLY", "FULL_AND_PIECEWISE"])
def test_start_up_compiles_every_kernel_variant_a_run_needs(case, cudagraph_mode):
    """Start-up (profile run with sampler warm-up, GEMM tuning, graph capture) leaves nothing for Triton to
    compile while serving: prefills, chunked prefills, mixed and decode steps, greedy, one temperature for the
    batch, a temperature per row and top-p rows."""
    model_dir, prompts, _ = case
    llm = LLM(str(model_dir), device="cuda", dtype="bfloat16", max_num_batched_tokens=32, max_num_seqs=8,
              compilation_config={"cudagraph_mode": cudagraph_mode})
    params = [SamplingParams(temperature=0.0, max_tokens=10), SamplingParams(temperature=0.8, max_tokens=10),
              SamplingParams(temperature=1.2, max_tokens=10), SamplingParams(temperature=0.9, top_p=0.8,
                                                                           max_tokens=10)]
    with JitWatch() as watch:
        for batch in ([prompts[0]], prompts, prompts * 2):
            outputs = llm.generate(batch, [params[i % 4] for i in range(len(batch))], use_tqdm=False)
            assert all(len(o.outputs[0].token_ids) > 0 for o in outputs)
    assert watch.compiles == [], "\n".join(f"{c.kernel}: {c.variant}" for c in watch.compiles)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("eager", [False, True])
def test_fp32_greedy_matches_transformers_on_cuda(case, mode, eager):
    model_dir, prompts, expected = case
    kwargs = {"async_scheduling": False, **MODES[mode]}  # plain modes: synchronous (async is CUDA's default)
    llm = LLM(str(model_dir), device="cuda", dtype="float32", enforce_eager=eager, **kwargs)
    assert llm.engine.async_scheduling is mode.startswith("async_")
    assert llm.engine.attn_backend.name == "triton"
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


@pytest.mark.parametrize("mode", ["prefix_cache_on", "chunked_prefill", "async_preemption"])
def test_fp32_greedy_with_piecewise_graphs_matches_transformers(case, mode):
    """cudagraph_mode FULL_AND_PIECEWISE: steps with prompts (whole, chunked, beside decodes) replay the graphs
    between attention calls, attention eager; tokens stay identical to transformers and no KV block leaks."""
    model_dir, prompts, expected = case
    kwargs = {"async_scheduling": False, **MODES[mode]}
    llm = LLM(str(model_dir), device="cuda", dtype="float32", compilation_config={"cudagraph_mode":
                                                                                   "FULL_AND_PIECEWISE"}, **kwargs)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert llm.engine.runner.piecewise is not None and llm.engine.runner.piecewise.replays > 0
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_fp32_greedy_at_a_decode_batch_past_the_in_graph_logits_matches_transformers(case):
    """max_num_seqs 320 with graphs up to 320 rows: decode steps of 300 rows replay a graph that ends at the hidden
    states (past runner/cuda_graphs.py's MAX_GRAPH_LOGIT_ROWS) and run the LM head after it."""
    model_dir, prompts, expected = case
    copies = -(-300 // len(prompts))
    llm = LLM(str(model_dir), device="cuda", dtype="float32", max_num_seqs=320, max_cudagraph_capture_size=320)
    graphs = llm.engine.runner.graphs
    assert graphs.sizes[-1] == 320 and not graphs.logits_in_graph(1, 304) and graphs.logits_in_graph(1, 256)
    outputs = llm.generate(prompts * copies, SamplingParams(temperature=0.0, max_tokens=MAX_NEW), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected * copies
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_bf16_prefill_logits_within_tolerance(case):
    model_dir, prompts, _ = case
    llm = LLM(str(model_dir), device="cuda", dtype="bfloat16")
    engine = llm.engine
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for i, ids in enumerate(prompts[:3]):
        engine.add_request(f"p{i}", ids, SamplingParams(max_tokens=1, temperature=0.0))
    sched = engine.scheduler.schedule()
    logits, rows = engine.runner.forward_logits(sched.record)
    for row, got in zip(rows, logits, strict=True):
        ids = sched.scheduled[row].seq.prompt_token_ids
        with torch.no_grad():
            want = reference(torch.tensor([ids])).logits[0, -1]
        rel = (got.cpu().float() - want).norm() / want.norm()
        assert rel < 2e-2, f"relative error {rel:.3e}"
    engine.abort_request([f"p{i}" for i in range(3)])
