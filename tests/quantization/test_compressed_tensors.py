"""compressed-tensors (pack-quantized W4A16 / W8A16) checkpoints served packed: ``tokenmill quantize --format
compressed-tensors`` output and a checkpoint compressed by the ``compressed-tensors`` package itself (mixed
schemes per layer, ``ignore``) give the logits of the model the package dequantizes, run by transformers."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tokenmill.cli import main
from tokenmill.model.linear_method import DenseLinearMethod, quantization_config_from_hf
from tokenmill.quantization.compressed_tensors import (
    CompressedTensorsSchemes,
    CompressedTensorsWNA16LinearMethod,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from model_helpers import hf_logits, load, make_prompts, run_in_steps  # noqa: E402

pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import PackedQuantizationCompressor, unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402

CASES = {
    "gptq4_g32": ["--method", "gptq", "--group-size", "32"],
    "rtn8_channel": ["--method", "rtn", "--bits", "8", "--group-size", "-1"],
    "awq4_g16_zero_points": ["--method", "awq", "--group-size", "16"],
}


def _read(directory: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def _package_dequantized(src: Path, dst: Path) -> Path:
    """A dense copy of a pack-quantized directory, unpacked and dequantized by the compressed-tensors package
    (act-order groups applied through weight_g_idx by hand: the package's dequantize takes contiguous groups)."""
    config = json.loads((src / "config.json").read_text())
    qconfig = config.pop("quantization_config")
    tensors, dense = _read(src), {}
    for name in [n for n in tensors if n.endswith(".weight_packed")]:
        module = name.removesuffix(".weight_packed")
        group = next(g for g in qconfig["config_groups"].values()
                     if any(t == "Linear" or (t.startswith("re:") and __import__("re").match(t[3:], module))
                            for t in g["targets"]))
        scheme = QuantizationScheme.model_validate(group)
        parts = {k.removeprefix(module + "."): tensors.pop(k) for k in list(tensors) if k.startswith(module + ".")}
        parts["weight_scale"] = parts["weight_scale"].float()
        g_idx = parts.pop("weight_g_idx", None)
        if g_idx is None:
            dense[module + ".weight"] = PackedQuantizationCompressor.decompress(parts, scheme)["weight"].float()
            continue
        shape = tuple(parts["weight_shape"].tolist())
        q = unpack_from_int32(parts["weight_packed"], scheme.weights.num_bits, shape).float()
        zp = 0.0
        if "weight_zero_point" in parts:
            zp = unpack_from_int32(parts["weight_zero_point"], scheme.weights.num_bits,
                                   (shape[0], parts["weight_scale"].shape[1]), packed_dim=0).float()[:, g_idx.long()]
        dense[module + ".weight"] = (q - zp) * parts["weight_scale"][:, g_idx.long()]
    dense.update({n: t.float() for n, t in tensors.items()})
    dst.mkdir(parents=True)
    save_file(dense, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(config))
    for file in src.glob("tokenizer*"):
        shutil.copy2(file, dst / file.name)
    return dst


def _assert_logits_match(quantized: Path, dense: Path) -> None:
    model = load(quantized)
    prompts = make_prompts([9, 5, 14], model.spec.vocab_size, seed=4)
    ours = run_in_steps(model.model, prompts, [[4, 5, 6], [5, 0, 8]])
    for got, want in zip(ours, hf_logits(dense, prompts), strict=True):
        assert (got - want).abs().max().item() < 1e-3


@pytest.mark.parametrize("case", list(CASES))
def test_quantize_writes_compressed_tensors_that_serve_like_the_package_dequantized_model(tiny_llama, tmp_path,
                                                                                        case):
    out = tmp_path / "q"
    argv = ["quantize", str(tiny_llama), "--out", str(out), "--format", "compressed-tensors", "--num-samples", "4",
            "--seq-len", "32"]
    assert main(argv + CASES[case]) == 0
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "compressed-tensors" and qconfig["format"] == "pack-quantized"
    model = load(out).model
    linear = model.model.layers[0].mlp.gate_up_proj
    assert isinstance(linear.linear_method, CompressedTensorsWNA16LinearMethod)
    assert dict(linear.named_parameters())["qweight"].dtype == torch.int32
    assert isinstance(model.lm_head.linear_method, DenseLinearMethod)
    _assert_logits_match(out, _package_dequantized(out, tmp_path / "dense"))


def _package_compress(weight: torch.Tensor, scheme: QuantizationScheme) -> dict[str, torch.Tensor]:
    """Scales / zero points by the package's own rule, then its pack-quantized compressor."""
    args = scheme.weights
    columns = weight.shape[1] if args.strategy == "channel" else args.group_size
    grouped = weight.reshape(weight.shape[0], -1, columns)
    scale, zero_point = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    state = {"weight": weight, "weight_scale": scale.to(torch.float16).float(), "weight_zero_point": zero_point}
    out = PackedQuantizationCompressor.compress(state, scheme)
    out["weight_scale"] = out["weight_scale"].to(torch.float16)
    return out


def test_checkpoint_compressed_by_the_package_with_mixed_schemes_and_ignore(tiny_llama, tmp_path):
    attn = QuantizationScheme(targets=["re:.*self_attn.*"],
                              weights=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel"))
    mlp = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=False, strategy="group", group_size=16))
    ignore = ["lm_head", "re:.*layers\\.1\\.mlp\\.down_proj"]
    tensors, packed = _read(tiny_llama), {}
    for name, tensor in tensors.items():
        module = name.removesuffix(".weight")
        if ".layers." not in name or not name.endswith("proj.weight") or module.endswith("layers.1.mlp.down_proj"):
            packed[name] = tensor
            continue
        scheme = attn if ".self_attn." in name else mlp
        packed.update({f"{module}.{k}": v for k, v in _package_compress(tensor, scheme).items()})
    out = tmp_path / "q"
    out.mkdir()
    save_file(packed, str(out / "model.safetensors"))
    config = json.loads((tiny_llama / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ignore,
        "config_groups": {"attn": attn.model_dump(mode="json"), "mlp": mlp.model_dump(mode="json")},
    }
    (out / "config.json").write_text(json.dumps(config))
    for file in tiny_llama.glob("tokenizer*"):
        shutil.copy2(file, out / file.name)
    model = load(out).model
    layers = model.model.layers
    assert layers[0].self_attn.qkv_proj.wna16.bits == 8 and layers[0].mlp.gate_up_proj.wna16.bits == 4
    assert isinstance(layers[1].mlp.down_proj.linear_method, DenseLinearMethod)
    _assert_logits_match(out, _package_dequantized(out, tmp_path / "dense"))


def _ct(groups: dict, ignore: list[str] | None = None, fmt: str = "pack-quantized") -> dict:
    return {"quant_method": "compressed-tensors", "format": fmt, "config_groups": groups, "ignore": ignore or []}


W4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}


@pytest.mark.parametrize("config, message", [
    (_ct({"g": {"targets": ["Linear"], "weights": W4, "input_activations": {"num_bits": 8, "type": "int"}}},
         fmt="int-quantized"), "config group 'g'.*not supported; supported: pack-quantized int weights"),
    (_ct({"g": {"targets": ["Linear"], "weights": {**W4, "num_bits": 2}}}), "2 bits is not supported"),
    (_ct({"g": {"targets": ["Linear"], "weights": {**W4, "strategy": "tensor"}}}), "strategy 'tensor'"),
    (_ct({"g": {"targets": ["Linear"], "weights": {**W4, "group_size": 48}}}), "group_size 48 is not supported"),
    (_ct({}), "no config_groups"),
])
def test_unsupported_compressed_tensors_configs_say_what_is_supported(config, message):
    with pytest.raises(ValueError, match=message):
        quantization_config_from_hf(config)


def test_layer_dispatch_respects_ignore_and_refuses_split_fused_layers():
    config = quantization_config_from_hf(_ct({"g": {"targets": ["Linear"], "weights": W4}},
                                             ignore=["lm_head", "re:.*k_proj", "model.layers.1.mlp.up_proj"]))
    assert isinstance(config.get_linear_method("lm_head"), DenseLinearMethod)
    assert isinstance(config.get_linear_method("model.layers.0.mlp.down_proj"), CompressedTensorsWNA16LinearMethod)
    assert isinstance(config.get_linear_method("model.layers.0.mlp.gate_up_proj"), CompressedTensorsWNA16LinearMethod)
    with pytest.raises(ValueError, match="fused parts of model.layers.0.self_attn.qkv_proj differently"):
        config.get_linear_method("model.layers.0.self_attn.qkv_proj")
    with pytest.raises(ValueError, match="model.layers.1.mlp.gate_up_proj"):
        config.get_linear_method("model.layers.1.mlp.gate_up_proj")
    quantized_head = quantization_config_from_hf(_ct({"g": {"targets": ["Linear"], "weights": W4}}))
    with pytest.raises(ValueError, match="quantized lm_head are not supported"):
        quantized_head.get_linear_method("lm_head")


def test_a_new_scheme_plugs_in_with_one_registration():
    schemes = CompressedTensorsSchemes([])

    @schemes.register
    class FloatWeights:
        description = "float-quantized"

        def matches(self, weights, input_activations, fmt):
            return fmt == "float-quantized"

        def linear_method(self, weights, input_activations, fmt):
            return DenseLinearMethod()

    assert isinstance(schemes.find({"type": "float"}, None, "float-quantized", "g"), FloatWeights)
    with pytest.raises(ValueError, match="supported: float-quantized"):
        schemes.find(W4, None, "pack-quantized", "g")


def test_older_act_order_group_checkpoint_with_weight_g_idx_loads(tiny_llama, tmp_path):
    """compressed-tensors < 0.20 wrote GPTQ act-order as actorder "group" + weight_g_idx: repack a GPTQ act-order
    checkpoint into that layout (the package's packer) and match its dequantized model."""
    from compressed_tensors.compressors import pack_to_int32

    from tokenmill.quantization.checkpoint import dequantize_checkpoint
    from tokenmill.quantization.packing import from_gptq

    gptq = tmp_path / "gptq"
    assert main(["quantize", str(tiny_llama), "--out", str(gptq), "--method", "gptq", "--group-size", "16",
                 "--act-order", "--no-sym", "--num-samples", "4", "--seq-len", "32"]) == 0
    tensors, converted = _read(gptq), {}
    for name in [n for n in tensors if n.endswith(".qweight")]:
        module = name.removesuffix(".qweight")
        qw = from_gptq({s: tensors.pop(f"{module}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx")}, 4)
        converted[f"{module}.weight_packed"] = pack_to_int32((qw.codes - 8).to(torch.int8), 4)
        converted[f"{module}.weight_scale"] = qw.scales.t().contiguous().half()
        converted[f"{module}.weight_zero_point"] = pack_to_int32((qw.zeros.t() - 8).to(torch.int8), 4, packed_dim=0)
        converted[f"{module}.weight_shape"] = torch.tensor(list(qw.codes.shape))
        converted[f"{module}.weight_g_idx"] = qw.g_idx
    converted.update(tensors)
    out = tmp_path / "ct"
    out.mkdir()
    save_file(converted, str(out / "model.safetensors"))
    config = json.loads((gptq / "config.json").read_text())
    weights = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 16,
               "actorder": "group"}
    config["quantization_config"] = _ct({"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"])
    (out / "config.json").write_text(json.dumps(config))
    for file in gptq.glob("tokenizer*"):
        shutil.copy2(file, out / file.name)
    assert load(out).model.model.layers[0].mlp.down_proj.wna16_perm is not None  # act-order really permutes
    _assert_logits_match(out, dequantize_checkpoint(gptq, tmp_path / "dense"))
