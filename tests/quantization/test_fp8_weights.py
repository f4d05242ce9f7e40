"""FP8 W8A8 weights on CPU (emulated): quantize/dequantize, the linear against its dequantized operands, and whole
models (``--quantization fp8`` on a dense checkpoint; quant_method "fp8" and compressed-tensors float-quantized
checkpoints, dynamic and static activations) against transformers running the dequantized weights with the
same activation rounding (forward pre-hooks), so logits agree to fp32 accumulation order."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tokenmill.engine.llm import LLM
from tokenmill.kernels.fp8_quant import FP8_E4M3, FP8_E4M3_MAX, quantize_fp8, quantize_fp8_static
from tokenmill.model.linear_method import quantization_config_from_hf
from tokenmill.quantization.fp8 import fp8_linear
from tokenmill.quantization.fp8_checkpoint import write_fp8_checkpoint
from tokenmill.sampling_params import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from model_helpers import load, make_prompts, run_in_steps  # noqa: E402


def test_quantize_fp8_per_tensor_and_per_row_round_trip():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 40, generator=gen) * torch.logspace(-2, 2, 6)[:, None]
    x[2] = 0.0  # a zero row keeps a finite scale
    q, s = quantize_fp8(x, dim=-1)
    assert q.dtype == FP8_E4M3 and s.shape == (6, 1) and torch.isfinite(s).all() and (s > 0).all()
    assert torch.allclose(q.float() * s, x, rtol=2**-4, atol=0)  # rows scaled to their own max: all normal
    assert (q.float().abs().amax(dim=1)[[0, 1, 3, 4, 5]] == FP8_E4M3_MAX).all()
    qt, st = quantize_fp8(x)
    assert st.shape == () and qt.float().abs().max() == FP8_E4M3_MAX
    saturated = quantize_fp8_static(torch.tensor([1e6, -1e6, 1.0]), torch.tensor(1.0))
    assert saturated.float().tolist() == [448.0, -448.0, 1.0]


@pytest.mark.parametrize("static", [False, True])
def test_fp8_linear_is_the_product_of_its_dequantized_operands(static):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 64, generator=gen)
    w, w_scale = quantize_fp8(torch.randn(48, 64, generator=gen) * 0.1, dim=1)
    bias = torch.randn(48, generator=gen)
    input_scale = torch.tensor(x.abs().max().item() / FP8_E4M3_MAX) if static else None
    out = fp8_linear(x, w, w_scale.view(-1), bias, input_scale)
    x2 = x.reshape(-1, 64)
    xq, xs = quantize_fp8(x2, dim=-1) if not static else (quantize_fp8_static(x2, input_scale), input_scale)
    want = (xq.double() * xs.double()) @ (w.double() * w_scale.double()).t() + bias.double()
    assert out.shape == (3, 5, 48)
    torch.testing.assert_close(out.reshape(-1, 48).double(), want, rtol=1e-5, atol=1e-5)
    assert (out.reshape(-1, 48) - x2 @ (w.float() * w_scale).t() - bias).abs().max() > 1e-4  # x was rounded


def _fake_quant_reference(directory: Path, dequantized: dict[str, torch.Tensor], input_scales: dict | None):
    """transformers on ``directory``'s dense weights replaced by ``dequantized``, with every decoder linear's input
    rounded to e4m3 the way the served model rounds it (per token, or by the static scale)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, tensor in dequantized.items():
            model.get_parameter(name).copy_(tensor)

    def hook_for(name):
        def hook(_module, args):
            x = args[0]
            if input_scales is None:
                q, s = quantize_fp8(x.reshape(-1, x.shape[-1]), dim=-1)
            else:
                s = input_scales[name]
                q = quantize_fp8_static(x.reshape(-1, x.shape[-1]), s)
            return ((q.float() * s).reshape(x.shape),)
        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            module.register_forward_pre_hook(hook_for(name))
    return model


def _reference_logits(model, prompts):
    with torch.no_grad():
        return [model(p[None]).logits[0] for p in prompts]


def _check_fp8_model(loaded, reference, dense_dir):
    layer = loaded.model.model.layers[0]
    for linear in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        assert linear.weight.dtype == FP8_E4M3 and linear.weight_scale.shape == (linear.weight.shape[0],)
    assert loaded.model.lm_head.weight.dtype == torch.float32  # the LM head stays dense
    prompts = make_prompts([9, 5, 14], loaded.spec.vocab_size, seed=4)
    ours = run_in_steps(loaded.model, prompts, [[4, 5, 6], [5, 0, 8]])
    from model_helpers import hf_logits

    dense = hf_logits(dense_dir, prompts)
    for got, want, unquantized in zip(ours, _reference_logits(reference, prompts), dense, strict=True):
        assert (got - want).abs().max().item() < 1e-3
        assert (got - unquantized).abs().max().item() > 1e-2  # FP8 really rounded something


def test_quantization_fp8_quantizes_a_dense_checkpoint_per_channel(tiny_llama):
    loaded = load(tiny_llama, quantization="fp8")
    _check_fp8_model(loaded, _fake_quant_reference(tiny_llama, _per_channel_dequantized(tiny_llama), None), tiny_llama)


def _per_channel_dequantized(directory: Path) -> dict[str, torch.Tensor]:
    """Each decoder linear's weight rounded to e4m3 per output channel, as --quantization fp8 does, dequantized."""
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    dequantized = {}
    for name, module in dense.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            q, s = quantize_fp8(module.weight.detach(), dim=1)
            dequantized[f"{name}.weight"] = q.float() * s
    return dequantized


def _calibration(vocab: int) -> list[list[int]]:
    return [p.tolist() for p in make_prompts([12, 7], vocab, seed=9)]


def _static_scales(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = load_file(str(directory / "model.safetensors"))
    return {k.removesuffix(".input_scale"): v.reshape(()) for k, v in state.items() if k.endswith(".input_scale")}


def _fused_max(scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """q/k/v (gate/up) share one input and so, served fused, the largest of their static scales."""
    out = dict(scales)
    for name in scales:
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            leaf = name.rsplit(".", 1)[1]
            if leaf in group:
                parent = name.rsplit(".", 1)[0]
                out[name] = max(scales[f"{parent}.{m}"] for m in group)
    return out


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_fp8_checkpoint_loads_and_matches_its_dequantized_model(tiny_llama, tmp_path, static):
    vocab = load(tiny_llama).spec.vocab_size
    ckpt = tmp_path / "fp8"
    dequantized = write_fp8_checkpoint(tiny_llama, ckpt, "fp8", "tensor", _calibration(vocab) if static else None)
    assert quantization_config_from_hf({"quant_method": "fp8"}).serialized
    loaded = load(ckpt)
    scales = _fused_max(_static_scales(ckpt)) if static else None
    _check_fp8_model(loaded, _fake_quant_reference(tiny_llama, dequantized, scales), tiny_llama)
    if static:
        assert loaded.model.model.layers[0].self_attn.qkv_proj.input_scale.item() > 0


@pytest.mark.parametrize(("strategy", "static"), [("channel", False), ("tensor", True)])
def test_compressed_tensors_float_quantized_checkpoint(tiny_llama, tmp_path, strategy, static):
    pytest.importorskip("tokenmill.quantization.compressed_tensors", reason="the dispatcher comes with i20-quant2")
    vocab = load(tiny_llama).spec.vocab_size
    ckpt = tmp_path / "ct"
    dequantized = write_fp8_checkpoint(tiny_llama, ckpt, "compressed-tensors", strategy,
                                       _calibration(vocab) if static else None)
    loaded = load(ckpt)
    scales = _fused_max(_static_scales(ckpt)) if static else None
    _check_fp8_model(loaded, _fake_quant_reference(tiny_llama, dequantized, scales), tiny_llama)


@pytest.mark.parametrize(("config", "match"), [
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "block-wise"),
    ({"quant_method": "fp8", "activation_scheme": "per-group"}, "activation_scheme"),
])
def test_unsupported_fp8_configs_say_what_is_supported(config, match):
    with pytest.raises(ValueError, match=match):
        quantization_config_from_hf(config)


def test_engine_with_fp8_weights_gives_the_reference_greedy_tokens(tiny_llama):
    """The engine (chunked prefill, batched decode) with --quantization fp8 emits the tokens transformers picks on
    the dequantized, activation-rounded model."""
    reference = _fake_quant_reference(tiny_llama, _per_channel_dequantized(tiny_llama), None)
    llm = LLM(str(tiny_llama), device="cpu", dtype="float32", quantization="fp8", block_size=4,
              max_num_batched_tokens=8)
    prompts = [p.tolist() for p in make_prompts([11, 4, 17], llm.engine.model.vocab_size, seed=2)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            want = reference.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                      pad_token_id=0)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == want


@pytest.mark.parametrize(("fmt", "scheme"), [("compressed-tensors", "dynamic"), ("fp8", "static")])
def test_quantize_cli_writes_an_fp8_checkpoint_that_serves(tiny_llama, tmp_path, capsys, fmt, scheme):
    """``tokenmill quantize --method fp8``: the default (compressed-tensors, per-channel weights, dynamic
    activations: llm-compressor's FP8_DYNAMIC) and vLLM's quant_method fp8 with static input scales load and
    match transformers on the same rounded weights and activations."""
    import json

    from safetensors.torch import load_file

    from tokenmill.cli import main

    out = tmp_path / fmt
    argv = ["quantize", str(tiny_llama), "--method", "fp8", "--activation-scheme", scheme, "--out", str(out),
            "--num-samples", "2", "--seq-len", "16"]
    assert main(argv + ([] if fmt == "compressed-tensors" else ["--format", "fp8"])) == 0
    assert "wrote FP8" in capsys.readouterr().out
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == fmt and (out / "tokenizer.json").is_file()
    state = load_file(str(out / "model.safetensors"))
    dequantized = {k: state[k].float() * state[k.replace(".weight", ".weight_scale")].float().reshape(
        (-1, 1) if fmt == "compressed-tensors" else ()) for k in state if k.endswith("proj.weight")}
    assert all(state[k].dtype == FP8_E4M3 for k in dequantized)
    scales = _fused_max(_static_scales(out)) if scheme == "static" else None
    _check_fp8_model(load(out), _fake_quant_reference(tiny_llama, dequantized, scales), tiny_llama)


def test_quantize_cli_fp8_refuses_4bit_options(tiny_llama, tmp_path, capsys):
    from tokenmill.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", str(tiny_llama), "--method", "fp8", "--group-size", "32", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "--group-size" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
