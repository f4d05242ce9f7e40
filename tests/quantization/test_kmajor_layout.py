"""Models served from the K-major layout (``--quant-weight-layout kmajor``): every quantized linear keeps only
the K-major repack (no GPTQ-layout copy; fused q|k|v and gate|up repacked after fusing), and the model computes
what the GPTQ layout does.

- CPU, Triton's interpreter (``TRITON_INTERPRET=1``): tiny checkpoints (rtn4 at load, GPTQ act-order group 32,
  AWQ group 32 with zero points, GPTQ 8-bit) in bf16 with ``auto`` switched to kmajor and the CUDA-only gate
  opened for the CPU; logits through GEMV-, GEMM- and dequantize-sized steps against the same checkpoint's fp32
  logits in the GPTQ layout, within twice the GPTQ layout's own bf16 error. 8-bit layers keep the GPTQ layout
  with the reason.
- GPU: the engine (CUDA graphs, piecewise prompt graphs) gives the same greedy tokens from both layouts (fp16),
  and the weights take the same bytes; fused and tensor-parallel shards repacked per rank (also under the
  interpreter).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from linear_helpers import rank_context
from test_fp8_fusion import _assert_agree_or_near_tie
from test_tensor_parallel_shards import HIDDEN, INTER, _checkpoint, _load, _method

from tokenmill.attention.torch_backend import TorchAttentionBackend
from tokenmill.cli import main
from tokenmill.config import ModelConfig
from tokenmill.kernels._triton import HAS_TRITON
from tokenmill.kernels.gemv_epilogue import PrologueRms
from tokenmill.kernels.w4_gemv import KMajorWeight
from tokenmill.model.linear import (
    MergedColumnParallelLinear,
    RowParallelLinear,
    process_weights_after_loading,
)
from tokenmill.model.loader import default_dtype, load_model
from tokenmill.quantization import linear_methods, weight_layout

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from model_helpers import make_prompts, rel_err, run_in_steps  # noqa: E402

INTERPRETED = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
requires_interpreter = pytest.mark.skipif(not INTERPRETED, reason="needs triton with TRITON_INTERPRET=1 on CPU")
requires_cuda = pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA + triton")

CHECKPOINTS = {
    "gptq4_act_order_g32": ["--method", "gptq", "--group-size", "32", "--act-order"],
    "awq4_g32": ["--method", "awq", "--group-size", "32"],
    "gptq8_g64": ["--method", "gptq", "--bits", "8", "--group-size", "64"],
}


@pytest.fixture(scope="module", params=["rtn4", *CHECKPOINTS])
def checkpoint(request, tiny_llama, tiny_llama_bf16_exact, tmp_path_factory) -> tuple[Path, str | None]:
    """(directory, --quantization): the dense tiny Llama quantized at load (bf16-exact weights: bf16 and fp32
    loads round the same values), or a checkpoint written here."""
    if request.param == "rtn4":
        return tiny_llama_bf16_exact, "rtn4"
    out = tmp_path_factory.mktemp(request.param) / "q"
    argv = ["quantize", str(tiny_llama), "--out", str(out), "--num-samples", "4", "--seq-len", "32"]
    assert main(argv + CHECKPOINTS[request.param]) == 0
    return out, None


@pytest.fixture
def kmajor_auto_on_cpu(monkeypatch):
    """``auto`` meaning kmajor, and the CPU let through the gate (every other condition still checked)."""
    monkeypatch.setattr(weight_layout, "AUTO_WEIGHT_LAYOUT", "kmajor")
    unsupported = weight_layout.kmajor_unsupported
    monkeypatch.setattr(weight_layout, "kmajor_unsupported",
                        lambda bits, group, dtype, device: unsupported(bits, group, dtype, torch.device("cuda")))


def _quantized_linears(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if getattr(m, "wna16", None) is not None]


def _param_bytes(linears: list[torch.nn.Module]) -> int:
    return sum(p.numel() * p.element_size() for m in linears for p in m.parameters())


@requires_interpreter
def test_kmajor_model_matches_the_gptq_layout(checkpoint, kmajor_auto_on_cpu, monkeypatch):
    directory, quantization = checkpoint
    kmajor = load_model(ModelConfig(model=str(directory), dtype="bfloat16", device="cpu", quantization=quantization,
                                    fuse_gemm_norm=True), TorchAttentionBackend())  # every GEMV fusion on
    linears = _quantized_linears(kmajor.model)
    four_bit = "gptq8" not in str(directory)
    for linear in linears:
        if four_bit:
            assert isinstance(linear.wna16, KMajorWeight) and linear.wna16_layout.layout == "kmajor"
            n, k = linear.wna16.out_features, linear.wna16.in_features
            assert linear.qweight.shape == (n, k // 8) and linear.scales.shape[0] == n  # only the K-major copy
        else:
            assert linear.wna16_layout.layout == "gptq" and "8-bit" in linear.wna16_layout.reason
    monkeypatch.setattr(weight_layout, "AUTO_WEIGHT_LAYOUT", "gptq")  # the same checkpoint in today's layout
    reference, gptq_bf16 = (load_model(ModelConfig(model=str(directory), dtype=dtype, device="cpu",
                                                   quantization=quantization), TorchAttentionBackend())
                            for dtype in ("float32", "bfloat16"))
    assert all(m.wna16_layout.layout == "gptq" for m in _quantized_linears(reference.model))
    numel = [sum(p.numel() for m in model for p in m.parameters()) for model in (linears,
                                                                                 _quantized_linears(reference.model))]
    assert numel[0] == numel[1]  # as many codes, scales and zero points as the GPTQ layout: one copy
    # steps of 3 rows (GEMV), 20 and 5 rows (tensor-core GEMM), then a 270-token prompt (dequantize + matmul)
    prompts = make_prompts([9, 5, 14], kmajor.spec.vocab_size, seed=4)
    steps = [[1, 1, 1], [3, 4, 13], [5, 0, 0]]
    long_prompt = make_prompts([270], kmajor.spec.vocab_size, seed=5)
    for batch, step_lens in ((prompts, steps), (long_prompt, [[270]])):
        got = run_in_steps(kmajor.model, batch, step_lens, cache_dtype=torch.bfloat16)
        want = run_in_steps(reference.model, batch, step_lens)
        today = run_in_steps(gptq_bf16.model, batch, step_lens, cache_dtype=torch.bfloat16)
        for g, w, t in zip(got, want, today, strict=True):
            assert rel_err(g, w) < max(2 * rel_err(t, w), 1e-2)  # bf16 through the model: ~2% either way
    # the GEMVs' fusions (on above, for the GEMV-sized steps: SiLU-and-mul in gate_up's epilogue, residual adds in
    # o / down's, RMSNorms in qkv / gate_up's prologues) against the separate kernels: on CPU the pair's activation
    # is torch's bf16 silu and the prologue keeps 1 / rms in fp32, so here both within bf16 rounding of fp32
    # (rtn4: 1.6% vs 1.7%); on CUDA the epilogues equal the separate kernels bit for bit (tests/kernels)
    unfused = load_model(ModelConfig(model=str(directory), dtype="bfloat16", device="cpu", quantization=quantization,
                                     fuse_gemm_act=False, fuse_gemm_norm=False), TorchAttentionBackend())
    assert all(not m.fuse_gemm_act for m in unfused.model.modules() if hasattr(m, "fuse_gemm_act"))
    fused_calls = []
    real_gemv = linear_methods.w4_gemv

    def counting_gemv(*args, **kwargs):
        fused_calls.append(sorted(k for k in ("norm", "residual", "act_mul", "next_norm")
                                  if kwargs.get(k) is not None and kwargs.get(k) is not False))
        if isinstance(kwargs.get("norm"), PrologueRms):
            fused_calls[-1].append("rms")
        return real_gemv(*args, **kwargs)

    monkeypatch.setattr(linear_methods, "w4_gemv", counting_gemv)
    got = run_in_steps(kmajor.model, prompts, steps, cache_dtype=torch.bfloat16)
    if four_bit and "act_order" not in str(directory):  # every fused kind ran (act-order layers keep the kernels)
        # o / down make the next norm's input (next_norm), qkv / gate_up scale by 1 / rms from it (rms); the
        # first qkv normalizes the embeddings itself (norm without rms)
        assert ["next_norm", "residual"] in fused_calls and ["norm"] in fused_calls
        assert ["act_mul", "norm", "rms"] in fused_calls and ["norm", "rms"] in fused_calls
    pair = run_in_steps(unfused.model, prompts, steps, cache_dtype=torch.bfloat16)
    want = run_in_steps(reference.model, prompts, steps)
    for g, p, w in zip(got, pair, want, strict=True):
        assert rel_err(g, w) < max(1.5 * rel_err(p, w), 1e-2)


@requires_cuda
def test_engine_greedy_tokens_match_the_gptq_layout(tiny_llama):
    """rtn4 at load on the GPU, each layout in its own engine: decode graphs of 1-3 and 13 rows (GEMV and GEMM),
    a 300-token prompt (dequantize + cuBLAS), same greedy tokens; weight bytes equal. fp16: in bf16 the two
    layouts' roundings differ enough to flip near-tied tokens of this random model (the same engine run on CPU
    through the interpreter: 2 of 16 sequences in bf16, none in fp16), though neither is further from fp32."""
    from tokenmill.engine.llm import LLM
    from tokenmill.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [[5, 9, 17, 3], [40, 41, 42, 43, 44, 45, 46], [7]] + [[i + 1, 2 * i + 3] for i in range(9)]
    prompts.append([(7 * i) % 200 + 1 for i in range(300)])
    runs, weight_bytes = {}, {}
    for layout in ("gptq", "kmajor"):
        llm = LLM(str(tiny_llama), device="cuda", dtype="float16", quantization="rtn4", quant_weight_layout=layout,
                  max_model_len=512, seed=0)
        model = llm.engine.model
        linears = _quantized_linears(model)
        assert all(isinstance(m.wna16, KMajorWeight) == (layout == "kmajor") for m in linears)
        weight_bytes[layout] = _param_bytes(linears)
        outs = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts[:3]]
        outs += [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        runs[layout] = outs
        llm.engine.shutdown()
    assert weight_bytes["gptq"] == weight_bytes["kmajor"]
    assert runs["gptq"] == runs["kmajor"]


@pytest.fixture
def kmajor_device(monkeypatch) -> str:
    """Where K-major layers are built: CUDA, else the CPU through Triton's interpreter (gate opened as above)."""
    if HAS_TRITON and torch.cuda.is_available():
        return "cuda"
    if not INTERPRETED:
        pytest.skip("needs CUDA + triton, or TRITON_INTERPRET=1")
    unsupported = weight_layout.kmajor_unsupported
    monkeypatch.setattr(weight_layout, "kmajor_unsupported",
                        lambda bits, group, dtype, device: unsupported(bits, group, dtype, torch.device("cuda")))
    return "cpu"


@pytest.mark.parametrize("world_size", [2])  # (one rank: the whole-model test above)
@pytest.mark.parametrize("fmt", ["gptq4", "awq"])
def test_fused_and_tensor_parallel_shards_repack_per_rank(kmajor_device, fmt, world_size):
    """Fused gate|up (column-parallel) and row-parallel down of GPTQ / AWQ checkpoints (group 16) loaded per rank,
    each rank's part repacked K-major after loading; the ranks' sum at 1, 5 and 300 rows (GEMV, GEMM, dequantize)
    equals the dense product within bf16 rounding."""
    gen = torch.Generator().manual_seed(world_size + 5)
    (gate, gate_w), (up, up_w), (down, down_w) = (_checkpoint(fmt, INTER, HIDDEN, gen),
                                                  _checkpoint(fmt, INTER, HIDDEN, gen),
                                                  _checkpoint(fmt, HIDDEN, INTER, gen))
    layers = []
    for rank in range(world_size):
        ctx = rank_context(rank, world_size)
        methods = [_method(fmt), _method(fmt)]
        for method in methods:
            method.set_weight_layout("kmajor")
        with default_dtype(torch.bfloat16), torch.device(kmajor_device):
            gate_up = MergedColumnParallelLinear(HIDDEN, {"gate": INTER, "up": INTER}, linear_method=methods[0],
                                                 parallel=ctx)
            down_proj = RowParallelLinear(INTER, HIDDEN, linear_method=methods[1], parallel=ctx)
        _load(gate_up, {k: v.to(kmajor_device) for k, v in gate.items()}, "gate")
        _load(gate_up, {k: v.to(kmajor_device) for k, v in up.items()}, "up")
        _load(down_proj, {k: v.to(kmajor_device) for k, v in down.items()})
        process_weights_after_loading(gate_up)
        process_weights_after_loading(down_proj)
        assert isinstance(gate_up.wna16, KMajorWeight) and isinstance(down_proj.wna16, KMajorWeight)
        assert gate_up.qweight.shape == (2 * INTER // world_size, HIDDEN // 8)
        assert down_proj.qweight.shape == (HIDDEN, INTER // world_size // 8)
        layers.append((gate_up, down_proj))
    for rows in (1, 5, 300):
        x = torch.randn(rows, HIDDEN, generator=gen)
        want = F.linear(F.silu(F.linear(x, gate_w)) * F.linear(x, up_w), down_w)
        total = torch.zeros_like(want)
        for gate_up, down_proj in layers:
            g, u = gate_up(x.to(torch.bfloat16).to(kmajor_device)).float().chunk(2, dim=-1)
            h = (F.silu(g) * u).to(torch.bfloat16)
            total += down_proj.linear_method.apply(down_proj, h, None).float().cpu()
        assert rel_err(total, want) < 3e-2, rows


@requires_cuda
@pytest.mark.parametrize("quantization,layout", [("rtn4", "kmajor"), ("fp8", "auto")])
def test_engine_gate_up_epilogue_gives_the_unfused_tokens(tiny_llama, quantization, layout, monkeypatch):
    """The gate|up GEMV's SiLU-and-mul epilogue (pass_config fuse_gemm_act, on by default) against the unfused pair
    in the engine (CUDA graphs of 1-3 rows: the W4 K-major GEMV, the FP8 stream GEMV where sm89+): the layer's
    fused call serves a decode row, equal to the pair, and the engine gives the same greedy tokens either way."""
    from tokenmill.engine.llm import LLM
    from tokenmill.kernels import quant_dispatch
    from tokenmill.kernels.activation import silu_and_mul_triton
    from tokenmill.sampling_params import SamplingParams

    if quantization == "fp8":
        if torch.cuda.get_device_capability() < (8, 9):
            pytest.skip("FP8 needs sm89+")
        # the tiny shapes have no table entry: the stream GEMV's defaults, whose fma kind (1-4 rows) has the epilogue
        monkeypatch.setattr(quant_dispatch, "FP8_STREAM_DEFAULT", True)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = [[5, 9, 17, 3], [40, 41, 42, 43, 44, 45, 46], [7]]
    runs = {}
    for fuse in (True, False):
        llm = LLM(str(tiny_llama), device="cuda", dtype="bfloat16", quantization=quantization,
                  quant_weight_layout=layout, max_model_len=256, seed=0,
                  compilation_config={"pass_config": {"fuse_gemm_act": fuse}})
        gate_up = llm.engine.model.model.layers[0].mlp.gate_up_proj
        with torch.inference_mode():  # the fused kernel serves a decode row (not a silent fallback to the pair)
            x = torch.randn(1, gate_up.input_size, device="cuda", dtype=torch.bfloat16)
            fused = gate_up.silu_and_mul(x)
            assert fused is not None and torch.equal(fused, silu_and_mul_triton(gate_up(x)))
        runs[fuse] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        runs[fuse] += [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts[:1]]
        llm.engine.shutdown()
    assert runs[True] == runs[False]


@requires_cuda
def test_norm_inputs_made_by_the_producers_on_cuda(tiny_llama_bf16_exact, monkeypatch):
    """pass_config fuse_gemm_norm on the GPU: o / down make the next norm's input and its sums (the two-slot ring),
    qkv / gate_up scale by 1 / rms. Steps of 1-3 rows over several forwards (the ring reused, never reset): logits
    within 1.5x the unfused kernels' error against fp32 (the GPTQ layout's, dense dequantized) and the ring's
    down_proj slot zeroed after each forward. Then the engine (CUDA graphs) gives the unfused greedy tokens, or
    parts only at a near-tie."""
    from tokenmill.engine.llm import LLM
    from tokenmill.sampling_params import SamplingParams

    def load(dtype: str, layout: str, fuse: bool):
        monkeypatch.setattr(weight_layout, "AUTO_WEIGHT_LAYOUT", layout)
        return load_model(ModelConfig(model=str(tiny_llama_bf16_exact), dtype=dtype, device="cuda",
                                      quantization="rtn4", fuse_gemm_norm=fuse), TorchAttentionBackend())

    fused, unfused, reference = load("bfloat16", "kmajor", True), load("bfloat16", "kmajor", False), load(
        "float32", "gptq", False)
    kinds = []
    real_gemv = linear_methods.w4_gemv

    def counting_gemv(*args, **kwargs):
        kinds.append(("next_norm" in kwargs, isinstance(kwargs.get("norm"), PrologueRms)))
        return real_gemv(*args, **kwargs)

    monkeypatch.setattr(linear_methods, "w4_gemv", counting_gemv)
    prompts = make_prompts([9, 6, 14], fused.spec.vocab_size, seed=6)
    steps = [[1, 1, 1], [2, 1, 3], [1, 2, 1], [1, 1, 3], [4, 1, 6]]
    got = run_in_steps(fused.model, prompts, steps, cache_dtype=torch.bfloat16)
    assert (True, False) in kinds and (False, True) in kinds  # the producers' epilogue and the consumers' scale
    assert torch.all(fused.model.model._norm_sums.ring[0] == 0)  # down_proj zeroed o_proj's slot for the next
    monkeypatch.setattr(linear_methods, "w4_gemv", real_gemv)
    pair = run_in_steps(unfused.model, prompts, steps, cache_dtype=torch.bfloat16)
    want = run_in_steps(reference.model, prompts, steps)
    for g, p, w in zip(got, pair, want, strict=True):
        assert rel_err(g, w) < max(1.5 * rel_err(p, w), 1e-2)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=2)
    engine_prompts = [[5, 9, 17, 3], [40, 41, 42, 43, 44, 45, 46], [7]]
    runs = {}
    for fuse in (True, False):
        llm = LLM(str(tiny_llama_bf16_exact), device="cuda", dtype="bfloat16", quantization="rtn4",
                  quant_weight_layout="kmajor", max_model_len=256, max_num_seqs=3, seed=0,
                  compilation_config={"pass_config": {"fuse_gemm_norm": fuse}})
        runs[fuse] = [o.outputs[0] for o in llm.generate(engine_prompts, params, use_tqdm=False)]
        runs[fuse] += [llm.generate([p], params, use_tqdm=False)[0].outputs[0] for p in engine_prompts]
        llm.engine.shutdown()
    _assert_agree_or_near_tie(runs[True], runs[False])
