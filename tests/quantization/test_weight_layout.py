"""``--quant-weight-layout``: which layout a weight-only linear keeps (quantization/weight_layout.py), checked on
CPU without any kernel: gptq as asked, kmajor where the K-major kernels take the weight (else an error naming
why), auto = AUTO_WEIGHT_LAYOUT falling back per layer with the reason; the flag, the config checks and the
hand-over from the format's config to each layer's method."""

from __future__ import annotations

import argparse

import pytest
import torch

from tokenmill.config import ModelConfig
from tokenmill.engine.cli import add_engine_arguments, engine_kwargs
from tokenmill.model.linear_method import QUANTIZATION_REGISTRY, linear_method_for, resolve_quantization
from tokenmill.quantization import weight_layout
from tokenmill.quantization.weight_layout import LayoutChoice, choose_weight_layout

CUDA, CPU = torch.device("cuda"), torch.device("cpu")  # torch.device needs no GPU: only its type is read
BF16 = torch.bfloat16


@pytest.fixture
def with_triton(monkeypatch):
    monkeypatch.setattr(weight_layout, "HAS_TRITON", True)


@pytest.mark.parametrize("group", [16, 32, 64, 128, 256, 4096])
def test_kmajor_where_the_kernels_take_the_weight(with_triton, group):
    assert choose_weight_layout("kmajor", 4, group, BF16, CUDA) == LayoutChoice("kmajor")
    assert choose_weight_layout("kmajor", 4, group, torch.float16, CUDA) == LayoutChoice("kmajor")


@pytest.mark.parametrize("bits,group,dtype,device,why", [
    (8, 128, BF16, CUDA, "8-bit"),
    (4, 128, BF16, CPU, "on cpu"),
    (4, 128, torch.float32, CUDA, "float32 activations"),
    (4, 96, BF16, CUDA, "group size 96"),  # 12 words: not a power of two
    (4, 8, BF16, CUDA, "group size 8"),  # one word a group: below tl.dot's K of 16
    (4, 14336, BF16, CUDA, "group size 14336"),  # one group over Llama-3-8B's down_proj input
])
def test_kmajor_refuses_what_the_kernels_cannot_serve(with_triton, bits, group, dtype, device, why):
    with pytest.raises(ValueError, match=why):
        choose_weight_layout("kmajor", bits, group, dtype, device)
    assert choose_weight_layout("gptq", bits, group, dtype, device) == LayoutChoice("gptq")


def test_kmajor_needs_triton(monkeypatch):
    monkeypatch.setattr(weight_layout, "HAS_TRITON", False)
    with pytest.raises(ValueError, match="triton is not installed"):
        choose_weight_layout("kmajor", 4, 128, BF16, CUDA)


def test_auto_is_kmajor_and_falls_back_per_layer(with_triton, monkeypatch):
    # the H100 A/B of 2026-12-07 (gpu_quantized_e2e_kmajor_h100_2026-12-07.json) put kmajor ahead at batch 1 and 64
    assert weight_layout.AUTO_WEIGHT_LAYOUT == "kmajor"
    assert choose_weight_layout("auto", 4, 128, BF16, CUDA) == LayoutChoice("kmajor")
    monkeypatch.setattr(weight_layout, "AUTO_WEIGHT_LAYOUT", "gptq")
    assert choose_weight_layout("auto", 4, 128, BF16, CUDA) == LayoutChoice("gptq")
    monkeypatch.setattr(weight_layout, "AUTO_WEIGHT_LAYOUT", "kmajor")
    fallback = choose_weight_layout("auto", 8, 128, BF16, CUDA)
    assert fallback.layout == "gptq" and "8-bit" in fallback.reason
    assert "on cpu" in choose_weight_layout("auto", 4, 128, BF16, CPU).reason
    with pytest.raises(ValueError, match="must be one of"):
        choose_weight_layout("marlin", 4, 128, BF16, CUDA)


def test_model_config_checks_the_layout():
    assert ModelConfig(device="cpu").quant_weight_layout == "auto"
    with pytest.raises(ValueError, match="must be one of auto, gptq, kmajor"):
        ModelConfig(device="cpu", quant_weight_layout="marlin")
    with pytest.raises(ValueError, match="CUDA GPUs only"):
        ModelConfig(device="cpu", quant_weight_layout="kmajor")


def test_cli_flag_reaches_the_engine_arguments():
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert engine_kwargs(parser.parse_args(["--quant-weight-layout", "kmajor"]))["quant_weight_layout"] == "kmajor"
    assert engine_kwargs(parser.parse_args([]))["quant_weight_layout"] == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["--quant-weight-layout", "marlin"])


def test_the_layout_goes_from_the_format_to_each_quantized_layer():
    with pytest.raises(ValueError, match="served dense"):
        resolve_quantization(None, None, "kmajor")
    assert resolve_quantization(None, None, "gptq") is None  # today's behaviour: nothing to lay out
    config = resolve_quantization(None, "rtn4", "kmajor")
    assert linear_method_for(config, "model.layers.0.mlp.down_proj").weight_layout == "kmajor"
    assert linear_method_for(config, "lm_head").__class__.__name__ == "DenseLinearMethod"
    gptq = QUANTIZATION_REGISTRY.get("gptq").from_config({"bits": 4, "group_size": 32, "desc_act": True})
    assert linear_method_for(resolve_quantization(gptq, None, "gptq"), "model.layers.0.self_attn.qkv_proj") \
        .weight_layout == "gptq"


def test_gguf_refuses_an_explicit_kmajor_layout():
    from tokenmill.quantization.gguf import GGUFLinearMethod

    method = GGUFLinearMethod("Q4_0")
    method.set_weight_layout("auto")  # auto and gptq: the GGUF blocks' own layout
    with pytest.raises(ValueError, match="GGUF Q4_0"):
        method.set_weight_layout("kmajor")


def test_kmajor_with_no_four_bit_linear_is_refused_after_loading(caplog):
    """FP8 (or any format without a weight-only 4/8-bit linear) has no layout to choose: an explicit kmajor fails
    once the model is built; auto and gptq say nothing. A model whose linears chose logs one line."""
    from torch import nn

    from tokenmill.quantization.weight_layout import report_weight_layouts

    plain = nn.Sequential(nn.Linear(4, 4))
    report_weight_layouts(plain, "auto")
    with pytest.raises(ValueError, match="this model has none"):
        report_weight_layouts(plain, "kmajor")
    layer = nn.Linear(4, 4)
    layer.wna16_layout = LayoutChoice("gptq", "8-bit weights (the K-major kernels take 4-bit)")
    with caplog.at_level("INFO", logger="tokenmill.quantization.weight_layout"):
        report_weight_layouts(nn.Sequential(layer), "auto")
    assert "1 gptq linears (gptq layout kept for: 8-bit weights" in caplog.text
