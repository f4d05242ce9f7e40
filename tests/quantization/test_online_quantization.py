"""``--quantization``: a dense checkpoint quantized at load (rtn4, int8) serves packed weights whose logits equal
the RTN-dequantized model run by transformers; a pre-quantized checkpoint's format is read from config.json and
a --quantization that contradicts it, or that cannot quantize a dense model, fails with a sentence saying why."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from tokenmill.cli import main
from tokenmill.engine.llm import LLM
from tokenmill.quantization.packing import rtn_quantize
from tokenmill.sampling_params import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from model_helpers import hf_logits, load, make_prompts, run_in_steps  # noqa: E402

ONLINE = {"rtn4": (4, 128), "int8": (8, -1)}


def _rtn_reference_dir(tiny: Path, out: Path, bits: int, group: int, head: bool = False) -> Path:
    """The tiny model with every decoder linear (and with ``head`` the LM head) replaced by its RTN-dequantized
    weight (fp32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and (".layers." in name or (head and name == "lm_head")):
                w = module.weight
                module.weight.copy_(rtn_quantize(w, bits, min(group, w.shape[1]) if group > 0 else -1, True)
                                    .dequantize())
    model.save_pretrained(str(out))
    for file in tiny.glob("tokenizer*"):
        shutil.copy2(file, out / file.name)
    return out


@pytest.mark.parametrize("method", list(ONLINE))
def test_online_quantization_matches_rtn_dequantized_model(tiny_llama, tmp_path, method):
    bits, group = ONLINE[method]
    loaded = load(tiny_llama, quantization=method)
    layer = loaded.model.model.layers[0]
    for linear in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        params = dict(linear.named_parameters())
        assert "weight" not in params and params["qweight"].dtype == torch.int32 and linear.wna16.bits == bits
    prompts = make_prompts([9, 5, 14], loaded.spec.vocab_size, seed=4)
    ours = run_in_steps(loaded.model, prompts, [[4, 5, 6], [5, 0, 8]])
    reference = hf_logits(_rtn_reference_dir(tiny_llama, tmp_path / "ref", bits, group), prompts)
    dense = hf_logits(tiny_llama, prompts)
    for got, want, unquantized in zip(ours, reference, dense, strict=True):
        assert (got - want).abs().max().item() < 1e-3
        assert (got - unquantized).abs().max().item() > 1e-3  # the weights really were rounded


@pytest.mark.parametrize("method", list(ONLINE))
def test_quantize_lm_head_rounds_the_head_too(tiny_llama, tmp_path, method):
    """``--quantize-lm-head`` with rtn4 / int8: the LM head keeps packed codes like the decoder linears, and the
    logits equal transformers' on the model whose head is RTN-dequantized too (1e-3, fp32)."""
    bits, group = ONLINE[method]
    loaded = load(tiny_llama, quantization=method, quantize_lm_head=True)
    head = loaded.model.lm_head
    assert "weight" not in dict(head.named_parameters()) and head.wna16.bits == bits
    prompts = make_prompts([9, 5, 14], loaded.spec.vocab_size, seed=4)
    ours = run_in_steps(loaded.model, prompts, [[4, 5, 6], [5, 0, 8]])
    reference = hf_logits(_rtn_reference_dir(tiny_llama, tmp_path / "ref", bits, group, head=True), prompts)
    dense_head = hf_logits(_rtn_reference_dir(tiny_llama, tmp_path / "ref_dense_head", bits, group), prompts)
    for got, want, unrounded_head in zip(ours, reference, dense_head, strict=True):
        assert (got - want).abs().max().item() < 1e-3
        assert (got - unrounded_head).abs().max().item() > 1e-3  # the head really was rounded


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA + triton")
@pytest.mark.parametrize("layout", ["gptq", "kmajor"])
@pytest.mark.parametrize("rows", [1, 12, 40])
def test_quantized_lm_head_on_the_gpu_is_the_product_of_its_operands(tiny_llama_256, layout, rows):
    """The rtn4 head on CUDA (the W4A16 GEMV / GEMM the tuner picks for its shape) against the fp64 product of the
    bf16 hidden states and the dequantized head (1e-2: bf16 output, fp32 accumulation)."""
    from safetensors.torch import load_file

    from tokenmill.attention.torch_backend import TorchAttentionBackend
    from tokenmill.config import ModelConfig
    from tokenmill.model import load_model

    loaded = load_model(ModelConfig(model=str(tiny_llama_256), dtype="bfloat16", device="cuda", quantization="rtn4",
                                    quant_weight_layout=layout, quantize_lm_head=True), TorchAttentionBackend())
    assert loaded.model.lm_head.wna16_layout.layout == layout
    dense = load_file(next(tiny_llama_256.glob("*.safetensors")))["lm_head.weight"].to(torch.bfloat16)
    deq = rtn_quantize(dense.float(), 4, 128, True).dequantize().double().cuda()
    hidden = torch.randn(rows, loaded.spec.hidden_size, device="cuda").to(torch.bfloat16)
    got = loaded.model.compute_logits(hidden)
    want = hidden.double() @ deq.t()
    assert got.dtype == torch.bfloat16 and got.shape == (rows, loaded.spec.vocab_size)
    assert ((got.double() - want).norm() / want.norm()).item() <= 1e-2


def test_online_quantization_serves_greedy_tokens_of_the_engine_modes(tiny_llama):
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = [[5, 9, 17, 3], [40, 41, 42, 43, 44, 45, 46]]
    runs = []
    for prefix_caching in (True, False):
        llm = LLM(str(tiny_llama), device="cpu", dtype="float32", block_size=4, quantization="rtn4",
                  enable_prefix_caching=prefix_caching)
        runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
    assert runs[0] == runs[1] and all(len(t) == 6 for t in runs[0])


@pytest.fixture(scope="module")
def gptq_dir(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("online_gptq") / "q"
    argv = ["quantize", str(tiny_llama), "--out", str(out), "--method", "rtn", "--group-size", "32"]
    assert main(argv) == 0
    return out


def test_checkpoint_format_is_read_from_config_and_a_matching_flag_is_accepted(gptq_dir):
    for flag in (None, "gptq", "GPTQ"):
        linear = load(gptq_dir, quantization=flag).model.model.layers[0].mlp.down_proj
        assert type(linear.linear_method).__name__ == "GPTQLinearMethod"


@pytest.mark.parametrize("flag, message", [
    ("awq", "does not match the checkpoint, which is quantized as 'gptq'.*--quantization gptq"),
    ("rtn4", "does not match the checkpoint"),
    ("nf4", "'nf4' is not supported; supported: .*gptq.*int8.*rtn4"),
])
def test_flag_contradicting_the_checkpoint_is_a_clear_error(gptq_dir, flag, message):
    with pytest.raises(ValueError, match=message):
        load(gptq_dir, quantization=flag)


def test_quantize_lm_head_on_a_checkpoint_format_is_refused(gptq_dir):
    with pytest.raises(ValueError, match="supported for fp8, rtn4, int8; this model is served as 'gptq'"):
        load(gptq_dir, quantize_lm_head=True)


def test_checkpoint_only_format_on_a_dense_model_names_the_online_methods(tiny_llama):
    with pytest.raises(ValueError, match="--quantization awq needs a checkpoint quantized in that format.*int8, rtn4"):
        load(tiny_llama, quantization="awq")


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA + triton")])])
@pytest.mark.parametrize("method", list(ONLINE))
def test_online_quantization_in_bf16_matches_the_cpu_fp32_model(tiny_llama_bf16_exact, method, device):
    """bf16 quantized at load: on CUDA served by the Triton W4A16/W8A16 kernels, on CPU by the bf16 CPU path.

    On bf16-exact weights both loads hold the same codes; on the plain fp32 checkpoint they do not (the bf16 cast
    moves values across rounding boundaries: 0.13 relative logit error for rtn4 on CPU alone, vs 0.017 here).
    """
    from tokenmill.attention.torch_backend import TorchAttentionBackend
    from tokenmill.config import ModelConfig
    from tokenmill.model import load_model
    from tokenmill.quantization.perplexity import window_logits

    ids = torch.tensor([5, 9, 17, 3, 40, 41, 42, 43, 44, 45, 46, 7])
    logits = []
    for where, dtype in ((device, "bfloat16"), ("cpu", "float32")):
        config = ModelConfig(model=str(tiny_llama_bf16_exact), dtype=dtype, device=where, quantization=method)
        model = load_model(config, TorchAttentionBackend()).model
        assert model.model.layers[0].mlp.down_proj.wna16.qweight.device.type == where
        logits.append(window_logits(model, ids.to(where), block_size=4).float().cpu())
    assert ((logits[0] - logits[1]).norm() / logits[1].norm()).item() < 3e-2
