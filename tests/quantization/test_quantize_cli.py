"""``tokenmill quantize`` end to end on a tiny random Llama: the directory follows the GPTQ / AWQ conventions,
the dequantized copy loads in transformers, and the run prints the per-layer error table."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from tokenmill.cli import main
from tokenmill.quantization.checkpoint import dequantize_checkpoint

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def _quantize(tiny_llama, out, *flags):
    argv = ["quantize", str(tiny_llama), "--out", str(out), "--num-samples", "4", "--seq-len", "32", *flags]
    assert main(argv) == 0


def _tensors(directory):
    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


@pytest.mark.parametrize("method,bits,extra", [("gptq", 4, ["--act-order"]), ("gptq", 8, []), ("rtn", 4, []),
                                               ("awq", 4, [])])
def test_quantize_writes_the_checkpoint_convention(tiny_llama, tmp_path, capsys, method, bits, extra):
    out = tmp_path / method
    _quantize(tiny_llama, out, "--method", method, "--bits", str(bits), "--group-size", "32", *extra)
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in printed and "mean" in printed
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == ("awq" if method == "awq" else "gptq")
    assert qc["bits"] == bits and qc["group_size"] == 32
    assert (out / "tokenizer.json").is_file()
    tensors = _tensors(out)
    per_word = 32 // bits
    for layer in range(2):
        for linear in LINEARS:
            prefix = f"model.layers.{layer}.{linear}"
            assert f"{prefix}.weight" not in tensors
            qweight, scales = tensors[f"{prefix}.qweight"], tensors[f"{prefix}.scales"]
            in_f = 128 if linear == "mlp.down_proj" else 64
            assert qweight.dtype == torch.int32 and scales.dtype == torch.float16
            if method == "awq":
                assert qweight.shape[0] == in_f and scales.shape == (in_f // 32, qweight.shape[1] * 8)
                assert f"{prefix}.g_idx" not in tensors
            else:
                assert qweight.shape[0] == in_f // per_word and scales.shape == (in_f // 32, qweight.shape[1])
                g_idx = tensors[f"{prefix}.g_idx"]
                assert sorted(g_idx.tolist()) == sorted(i // 32 for i in range(in_f))
    assert "model.embed_tokens.weight" in tensors and "lm_head.weight" in tensors


def test_dequantized_copy_runs_in_transformers(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "gptq"
    _quantize(tiny_llama, out, "--method", "gptq", "--group-size", "32")
    dense = dequantize_checkpoint(out, tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(str(dense), dtype=torch.float32).eval()
    original = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    ids = torch.tensor([[5, 60, 7, 99, 12, 42]])
    with torch.no_grad():
        got, want = model(ids).logits, original(ids).logits
    rel = ((got - want).norm() / want.norm()).item()
    assert 0.0 < rel < 0.5  # quantized: close to the original, not equal


def test_quantize_rejects_bad_options(tiny_llama, tiny_model_dirs, tmp_path, capsys):
    for flags, message in [(["--method", "awq", "--bits", "8"], "AWQ checkpoints hold 4-bit"),
                           (["--group-size", "48"], "does not divide"),
                           (["--method", "rtn", "--act-order"], "--act-order applies"),
                           (["--method", "awq", "--lm-head"], "keeps the LM head dense"),
                           (["--method", "fp8", "--lm-head"], "serve with --quantize-lm-head")]:
        with pytest.raises(SystemExit):
            _quantize(tiny_llama, tmp_path / "bad", *flags)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _quantize(tiny_model_dirs["qwen2"], tmp_path / "tied", "--method", "rtn", "--lm-head")
    assert "ties its LM head to the input embedding table" in capsys.readouterr().err
