"""GPTQ / AWQ checkpoints served by tokenmill from their packed weights: logits equal the dequantized model run
by transformers (fp32, within 1e-3), greedy tokens equal the dequantized model's in the engine, weights stay
packed in memory; a checkpoint packed here loop by loop from the format description loads too."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_packing import naive_awq_rows, naive_gptq_qweight

from tokenmill.cli import main
from tokenmill.engine.llm import LLM
from tokenmill.quantization.checkpoint import dequantize_checkpoint
from tokenmill.sampling_params import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from model_helpers import hf_logits, load, make_prompts, run_in_steps  # noqa: E402

LOGIT_TOL = 1e-3
CASES = {
    "gptq4_act_order_g32": ["--method", "gptq", "--group-size", "32", "--act-order"],
    "gptq8_g64": ["--method", "gptq", "--bits", "8", "--group-size", "64"],
    "gptq4_one_group_asym": ["--method", "gptq", "--group-size", "-1", "--no-sym"],
    "awq4_g32": ["--method", "awq", "--group-size", "32"],
    "gptq4_g32_lm_head": ["--method", "gptq", "--group-size", "32", "--lm-head"],
}


@pytest.fixture(scope="module", params=list(CASES))
def quantized(request, tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    argv = ["quantize", str(tiny_llama), "--out", str(out / "q"), "--num-samples", "4", "--seq-len", "32"]
    assert main(argv + CASES[request.param]) == 0
    return out / "q", dequantize_checkpoint(out / "q", out / "dense")


def _assert_logits_match(quantized_dir: Path, dense_dir: Path) -> None:
    model = load(quantized_dir)
    prompts = make_prompts([9, 5, 14], model.spec.vocab_size, seed=4)
    ours = run_in_steps(model.model, prompts, [[4, 5, 6], [5, 0, 8]])
    reference = hf_logits(dense_dir, prompts)
    for got, want in zip(ours, reference, strict=True):
        assert (got - want).abs().max().item() < LOGIT_TOL


def test_logits_match_dequantized_model_in_transformers(quantized):
    _assert_logits_match(*quantized)


def test_weights_stay_packed(quantized):
    model = load(quantized[0]).model
    layer = model.model.layers[0]
    for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        params = dict(linear.named_parameters())
        assert "weight" not in params and params["qweight"].dtype == torch.int32
        assert linear.wna16.bits in (4, 8)
        assert params["qweight"].numel() * 32 == linear.input_size * linear.output_size * linear.wna16.bits
    asked = "lm_head" in quantized[0].parent.name  # the fixture's directory is named after its CASES key
    head_packed = json.loads((quantized[0] / "config.json").read_text())["quantization_config"].get("lm_head", False)
    assert head_packed == asked  # --lm-head writes lm_head: true, and only then
    assert ("weight" not in dict(model.lm_head.named_parameters())) == asked


def test_greedy_tokens_match_dequantized_model(quantized):
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [[5, 9, 17, 3], [40, 41, 42, 43, 44, 45, 46], [7]]
    runs = []
    for directory in quantized:
        llm = LLM(str(directory), device="cpu", dtype="float32", block_size=4)
        runs.append([out.outputs[0].token_ids for out in llm.generate(prompts, params, use_tqdm=False)])
    assert runs[0] == runs[1] and all(len(tokens) == 8 for tokens in runs[0])


def _reading_order(name: str) -> tuple:
    """Checkpoint names with q before k, v and gate before up (the first of a shared input draws its perm)."""
    order = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "o_proj": 3, "gate_proj": 4, "up_proj": 5, "down_proj": 6}
    parts = name.split(".")
    layer = int(parts[2]) if ".layers." in name else -1
    return (layer, order.get(parts[-2], 9), name)


def _pack_by_hand(tiny_llama: Path, out: Path, method: str, group: int, lm_head: bool = False) -> Path:
    """Quantize each linear asymmetrically with a random act-order grouping (GPTQ) or plain groups (AWQ), pack
    with the loop packers of test_packing.py, and write the checkpoint + its dense reference. ``lm_head``: the
    LM head packed too (GPTQModel's ``lm_head: true``)."""
    gen = torch.Generator().manual_seed(11)
    with safe_open(str(tiny_llama / "model.safetensors"), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    packed, dense = {}, {}
    perm = torch.arange(0)
    for name, weight in sorted(tensors.items(), key=lambda item: _reading_order(item[0])):
        quantized = (".layers." in name and name.endswith("proj.weight")) or (lm_head and name == "lm_head.weight")
        if not quantized:
            packed[name] = dense[name] = weight
            continue
        out_f, in_f = weight.shape
        # One act-order permutation per input: q/k/v and gate/up read the same activations.
        reader = name.split(".")[-2]
        if method == "gptq" and reader not in ("k_proj", "v_proj", "up_proj"):
            perm = torch.randperm(in_f, generator=gen)
        elif method != "gptq":
            perm = torch.arange(in_f)
        g_idx = torch.empty(in_f, dtype=torch.int32)
        g_idx[perm] = torch.arange(in_f, dtype=torch.int32) // group
        codes = torch.empty(out_f, in_f, dtype=torch.int32)
        scales = torch.empty(in_f // group, out_f)
        zeros = torch.empty(in_f // group, out_f, dtype=torch.int32)
        for g in range(in_f // group):
            cols = (g_idx == g).nonzero()[:, 0]
            w = weight[:, cols]
            lo, hi = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
            scales[g] = ((hi - lo) / 15).half().float()
            zeros[g] = torch.round(-lo / scales[g]).int().clamp(1, 15)
            codes[:, cols] = (torch.round(w / scales[g][:, None]) + zeros[g][:, None]).clamp(0, 15).int()
        module = name.removesuffix(".weight")
        if method == "gptq":
            packed[f"{module}.qweight"] = naive_gptq_qweight(codes, 4)
            packed[f"{module}.qzeros"] = naive_gptq_qweight(zeros - 1, 4).t().contiguous()
            packed[f"{module}.g_idx"] = g_idx
        else:
            packed[f"{module}.qweight"] = naive_awq_rows(codes.t())
            packed[f"{module}.qzeros"] = naive_awq_rows(zeros)
        packed[f"{module}.scales"] = scales.half()
        dense[name] = ((codes - zeros[g_idx.long()].t()) * scales[g_idx.long()].t()).float()
    config = json.loads((tiny_llama / "config.json").read_text())
    for directory, weights in ((out / "q", packed), (out / "dense", dense)):
        directory.mkdir(parents=True)
        save_file(weights, str(directory / "model.safetensors"))
        for file in tiny_llama.iterdir():
            if file.suffix == ".json" and file.name != "config.json":
                shutil.copy2(file, directory / file.name)
    qc = ({"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": True, "sym": False, "lm_head": lm_head}
          if method == "gptq" else {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                    "version": "gemm"})
    (out / "q" / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
    (out / "dense" / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_checkpoint_packed_from_the_format_description_loads(tiny_llama, tmp_path, method):
    out = _pack_by_hand(tiny_llama, tmp_path, method, group=16)
    _assert_logits_match(out / "q", out / "dense")


def test_gptq_checkpoint_with_a_quantized_lm_head_loads(tiny_llama, tmp_path):
    """GPTQModel's ``lm_head: true`` (vLLM reads it as lm_head_quantized): the head stays packed and the logits
    equal transformers' on the dequantized model, whose head differs from the original's."""
    out = _pack_by_hand(tiny_llama, tmp_path, "gptq", group=16, lm_head=True)
    head = load(out / "q").model.lm_head
    assert "weight" not in dict(head.named_parameters()) and head.wna16.bits == 4
    _assert_logits_match(out / "q", out / "dense")
    with safe_open(str(out / "dense" / "model.safetensors"), framework="pt") as dense, \
            safe_open(str(tiny_llama / "model.safetensors"), framework="pt") as original:
        assert not torch.equal(dense.get_tensor("lm_head.weight"), original.get_tensor("lm_head.weight"))


def test_unsupported_formats_fail_at_load_with_what_is_supported(tiny_llama, tmp_path):
    from tokenmill.model.linear_method import quantization_config_from_hf

    for qc, message in [({"quant_method": "gptq", "bits": 3}, "supported: 4 and 8 bits"),
                        ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "gptq_v2"}, "'gptq' \\(v1\\)"),
                        ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "supported: 'gemm'"),
                        ({"quant_method": "bitsandbytes"}, "not supported; supported: awq, .*gptq")]:
        with pytest.raises(ValueError, match=message):
            quantization_config_from_hf(qc)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA + triton")
def test_quantized_model_on_gpu_matches_dequantized_model(quantized):
    """bf16 on CUDA: the Triton W4A16/W8A16 kernel path against the dense dequantized model's cuBLAS path."""
    from tokenmill.attention.torch_backend import TorchAttentionBackend
    from tokenmill.config import ModelConfig
    from tokenmill.model import load_model
    from tokenmill.quantization.perplexity import window_logits

    logits = []
    for directory in quantized:
        config = ModelConfig(model=str(directory), dtype="bfloat16", device="cuda")
        model = load_model(config, TorchAttentionBackend()).model
        ids = torch.tensor([5, 9, 17, 3, 40, 41, 42, 43, 44, 45, 46, 7], device="cuda")
        logits.append(window_logits(model, ids, block_size=4))
    rel = ((logits[0] - logits[1]).norm() / logits[1].norm()).item()
    assert rel < 3e-2  # bf16 rounding of activations along two different kernels
