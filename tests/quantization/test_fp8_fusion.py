"""FP8 W8A8 producers that quantize for their linear (model/layers.py ``feeds``), and the opt-in FP8 LM head.

On CPU the fused path is the reference composition (norm / activation, then the same per-token quantization the
linear would run), so it must be bit-identical to the unfused path while the interface (``Fp8Tokens`` handed to
the W8A8 linears that asked for them, plain tensors to every other) is exercised; on an sm89+ GPU the same engine
test runs the Triton kernels under CUDA graphs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tokenmill.config import EngineConfig, parse_compilation_config
from tokenmill.engine.llm import LLM
from tokenmill.kernels.fp8_quant import FP8_E4M3, Fp8Tokens, quantize_fp8
from tokenmill.model.linear_method import DenseLinearMethod
from tokenmill.quantization.fp8 import Fp8LinearMethod
from tokenmill.sampling_params import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from model_helpers import load, make_prompts, rel_err, run_in_steps  # noqa: E402

UNFUSED = {"pass_config": {"fuse_norm_quant": False, "fuse_act_quant": False}}
FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def _inputs_seen(models: list[torch.nn.Module], monkeypatch: pytest.MonkeyPatch) -> dict[str, set[str]]:
    """Layer-name suffix (qkv_proj, o_proj, ...) -> the kinds of input its FP8 method's ``apply`` received."""
    names = {id(module): name.rsplit(".", 1)[-1] for model in models for name, module in model.named_modules()}
    seen: dict[str, set[str]] = {}
    apply = Fp8LinearMethod.apply

    def recording_apply(self, layer, x, bias):
        seen.setdefault(names[id(layer)], set()).add(type(x).__name__)
        return apply(self, layer, x, bias)

    monkeypatch.setattr(Fp8LinearMethod, "apply", recording_apply)
    return seen


def test_norms_and_activation_hand_fp8_tokens_to_the_w8a8_linears(tiny_llama, monkeypatch):
    fused, unfused = load(tiny_llama, quantization="fp8"), load(tiny_llama, quantization="fp8", fuse_norm_quant=False,
                                                                fuse_act_quant=False)
    prompts = make_prompts([9, 5, 14], fused.spec.vocab_size, seed=4)
    seen = _inputs_seen([fused.model, unfused.model], monkeypatch)
    got = run_in_steps(fused.model, prompts, [[4, 5, 6], [5, 0, 8]])
    # q/k/v from input_layernorm, gate/up from post_attention_layernorm, down from SiLU-and-mul; o_proj's input is
    # the attention output (no producer of ours quantizes it); lm_head stays dense.
    assert seen == {"qkv_proj": {"Fp8Tokens"}, "gate_up_proj": {"Fp8Tokens"}, "down_proj": {"Fp8Tokens"},
                    "o_proj": {"Tensor"}}
    seen.clear()
    want = run_in_steps(unfused.model, prompts, [[4, 5, 6], [5, 0, 8]])
    assert all(kinds == {"Tensor"} for kinds in seen.values()) and len(seen) == 4
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)  # the same ops in the same order on CPU


def test_only_dynamic_fp8_methods_take_fp8_tokens(tiny_llama):
    layer = load(tiny_llama, quantization="fp8").model.model.layers[0].mlp.down_proj
    x = torch.randn(3, layer.input_size)
    assert layer.accepts_fp8_tokens(x)
    assert not Fp8LinearMethod(serialized=True, static_input=True).accepts_fp8_tokens(layer, x)
    assert not DenseLinearMethod().accepts_fp8_tokens(layer, x)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not FP8_GPU, reason="needs a CUDA sm89+ GPU")])])
def test_engine_greedy_tokens_are_the_unfused_engines(tiny_llama, device):
    """20 requests (decode batches past the FP8 GEMV's 16 rows, so the fused kernels and ``_scaled_mm`` serve them
    on the GPU, in CUDA graphs and piecewise graphs). CPU: identical by construction. GPU: the fused kernels make
    the unfused pair's roundings (tests/kernels/test_fp8_fused_quant.py), so the tokens agree; should they not, a
    request may part only where the unfused run's top two were within 0.25 nats (a near-tie of bf16 logits)."""
    common = dict(device=device, dtype="float32" if device == "cpu" else "bfloat16", quantization="fp8",
                  block_size=16, max_num_batched_tokens=256, max_num_seqs=32, seed=0)
    prompts = [p.tolist() for p in make_prompts([5 + 3 * (i % 7) for i in range(20)], 384, seed=11)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
    outs = {}
    for name, extra in (("fused", {}), ("unfused", {"compilation_config": UNFUSED})):
        llm = LLM(str(tiny_llama), **common, **extra)
        assert llm.engine.model.model.fuse_norm_quant == (name == "fused")
        outs[name] = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        del llm
    if device == "cpu":
        assert [o.token_ids for o in outs["fused"]] == [o.token_ids for o in outs["unfused"]]
    else:
        _assert_agree_or_near_tie(outs["fused"], outs["unfused"])


def _assert_agree_or_near_tie(fused_outs: list, unfused_outs: list) -> None:
    """Each request's greedy tokens equal, or parting only where the unfused run's top two were within 0.25 nats
    (a near-tie of bf16 logits); the outputs need ``logprobs=2``."""
    for fused, unfused in zip(fused_outs, unfused_outs, strict=True):
        pairs = enumerate(zip(fused.token_ids, unfused.token_ids, strict=True))  # ignore_eos: as many tokens each
        parted = next((i for i, (a, b) in pairs if a != b), None)
        if parted is not None:
            top = unfused.logprobs[parted]
            picked, want = fused.token_ids[parted], unfused.token_ids[parted]
            assert picked in top and top[want].logprob - top[picked].logprob < 0.25, (parted, top)


@pytest.mark.gpu
@pytest.mark.skipif(not FP8_GPU, reason="needs a CUDA sm89+ GPU")
def test_engine_norm_inputs_made_by_the_fp8_producers(tiny_llama, monkeypatch):
    """pass_config fuse_gemm_norm with FP8 weights on the stream GEMV's fma kind (its defaults: the tiny shapes
    have no table entry): o / down make the next norm's input and its sums, qkv / gate_up scale by 1 / rms, in
    decode batches of 1-3 rows under CUDA graphs. Both kinds of fused call run, and the greedy tokens agree with
    the unfused engine's or part only at a near-tie."""
    from tokenmill.kernels import quant_dispatch
    from tokenmill.quantization import fp8 as fp8_module

    monkeypatch.setattr(quant_dispatch, "FP8_STREAM_DEFAULT", True)
    kinds = set()
    real_gemv = fp8_module.fp8_stream_gemv

    def recording_gemv(*args, **kwargs):
        kinds.add(("next_norm" if kwargs.get("next_norm") is not None else "") +
                  ("rms" if kwargs.get("rms") is not None else ""))
        return real_gemv(*args, **kwargs)

    monkeypatch.setattr(fp8_module, "fp8_stream_gemv", recording_gemv)
    prompts = [[5, 9, 17, 3], [40, 41, 42, 43, 44, 45, 46], [7]]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=2)
    outs = {}
    for fuse in (True, False):
        kinds.clear()
        llm = LLM(str(tiny_llama), device="cuda", dtype="bfloat16", quantization="fp8", max_model_len=256,
                  max_num_seqs=3, seed=0, compilation_config={"pass_config": {"fuse_gemm_norm": fuse}})
        outs[fuse] = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        outs[fuse] += [llm.generate([p], params, use_tqdm=False)[0].outputs[0] for p in prompts]
        assert ({"next_norm", "rms"} <= kinds) == fuse, kinds
        llm.engine.shutdown()
    _assert_agree_or_near_tie(outs[True], outs[False])


def test_fp8_lm_head_is_opt_in_and_close_to_the_dense_head(tiny_llama):
    """``quantize_lm_head``: e4m3 per vocabulary row, logits the product of the dequantized operands (fp32
    emulation on CPU, to 1e-5). Logit tolerance against the dense head on the same hidden states: relative
    (Frobenius) error <= 0.05 and max |delta| <= 0.3 x the logits' standard deviation over 7 x 384 logits (e4m3's
    2^-4 relative rounding of both operands, averaged over the 64-wide hidden size; measured 0.036 and 0.17)."""
    dense = load(tiny_llama, quantization="fp8")
    fp8 = load(tiny_llama, quantization="fp8", quantize_lm_head=True)
    assert dense.model.lm_head.weight.dtype == torch.float32  # the default stays dense, as vLLM
    head = fp8.model.lm_head
    assert head.weight.dtype == FP8_E4M3 and head.weight_scale.shape == (fp8.spec.vocab_size,)
    hidden = torch.randn(7, fp8.spec.hidden_size, generator=torch.Generator().manual_seed(5))
    got, want = fp8.model.compute_logits(hidden), dense.model.compute_logits(hidden)
    xq, xs = quantize_fp8(hidden, dim=-1)
    exact = (xq.double() * xs) @ (head.weight.double() * head.weight_scale.double()[:, None]).t()
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
    err, worst = rel_err(got, want), (got - want).abs().max().item() / want.std().item()
    assert err <= 0.05 and worst <= 0.3, (err, worst)
    assert err > 1e-4  # the head really was rounded


@pytest.mark.gpu
@pytest.mark.skipif(not FP8_GPU, reason="needs a CUDA sm89+ GPU")
@pytest.mark.parametrize("rows", [1, 12, 40])
def test_fp8_lm_head_on_the_gpu_is_the_product_of_its_operands(tiny_llama, rows):
    """The FP8 head on CUDA: the FP8-weight GEMV's rows (bf16 hidden states) and ``_scaled_mm``'s (hidden states
    quantized per token) against the fp64 product of the same operands (1e-2: bf16 output, fp32 accumulation)."""
    from tokenmill.attention.torch_backend import TorchAttentionBackend
    from tokenmill.config import ModelConfig
    from tokenmill.model import load_model

    loaded = load_model(ModelConfig(model=str(tiny_llama), dtype="bfloat16", device="cuda", quantization="fp8",
                                    quantize_lm_head=True), TorchAttentionBackend())
    head = loaded.model.lm_head
    hidden = torch.randn(rows, loaded.spec.hidden_size, device="cuda").to(torch.bfloat16)
    got = loaded.model.compute_logits(hidden)
    if head.linear_method.gemv_choice(head, rows, hidden.device, hidden.dtype) is None:
        xq, xs = quantize_fp8(hidden, dim=-1)
        x = xq.double() * xs.double()
    else:
        x = hidden.double()
    want = x @ (head.weight.double() * head.weight_scale.double()[:, None]).t()
    assert got.dtype == torch.bfloat16 and got.shape == (rows, loaded.spec.vocab_size)
    assert rel_err(got, want) <= 1e-2


def test_quantize_lm_head_refusals(tiny_llama, tiny_model_dirs):
    with pytest.raises(ValueError, match="served dense"):
        load(tiny_llama, quantize_lm_head=True)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        load(tiny_model_dirs["qwen2"], quantization="fp8", quantize_lm_head=True)


def test_pass_config_is_read_from_compilation_config():
    config = EngineConfig.from_kwargs(device="cpu", compilation_config=UNFUSED)
    assert not config.model.fuse_norm_quant and not config.model.fuse_act_quant
    assert EngineConfig.from_kwargs(device="cpu").model.fuse_norm_quant  # on by default, as vLLM's O2
    assert parse_compilation_config('{"pass_config": {"fuse_act_quant": false}}') == {"fuse_act_quant": False}
    with pytest.raises(ValueError, match="pass_config keys \\['enable_fusion'\\] are not supported"):
        parse_compilation_config({"pass_config": {"enable_fusion": True}})
    with pytest.raises(ValueError, match="true or false"):
        parse_compilation_config({"pass_config": {"fuse_norm_quant": "yes"}})


def test_fp8_tokens_go_through_the_linear_as_the_linear_would_quantize(tiny_llama):
    """A W8A8 layer's output from ``Fp8Tokens`` equals its output from the activations it was made from."""
    layer = load(tiny_llama, quantization="fp8").model.model.layers[1].self_attn.qkv_proj
    x = torch.randn(4, layer.input_size, generator=torch.Generator().manual_seed(2))
    tokens = Fp8Tokens(*quantize_fp8(x, dim=-1), x.dtype)
    assert torch.equal(layer(tokens), layer(x))
