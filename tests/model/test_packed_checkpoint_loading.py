"""A checkpoint in a non-dense weight format goes through the one loading pipeline: config.json's
quantization_config picks the format, each layer gets its method, q/k/v and gate/up land in their fused shards
(packed along the input and along the output), and the model computes what the dense model on the dequantized
weights computes."""

from __future__ import annotations

import json

from linear_helpers import FakePackedMethod, dequantize, quantize
from model_helpers import load, make_prompts, rel_err, run_in_steps
from tiny_models import make_tiny_model_dir

from tokenmill.model import linear_method
from tokenmill.model.linear_method import (
    DenseLinearMethod,
    LinearMethod,
    QuantizationConfig,
    QuantizationRegistry,
)

QUANT_METHOD = "tokenmill-test-packed"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class FakePackedConfig(QuantizationConfig):
    """Every projection packed; the embedding and the LM head stay dense (as GPTQ checkpoints leave them)."""

    @classmethod
    def from_config(cls, config: dict) -> FakePackedConfig:
        return cls()

    def get_linear_method(self, layer_prefix: str) -> LinearMethod:
        if layer_prefix in ("lm_head", "model.embed_tokens"):
            return DenseLinearMethod()
        return FakePackedMethod()


def test_packed_checkpoint_matches_the_dense_model_on_its_dequantized_weights(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    registry = QuantizationRegistry(plugin_package="tokenmill.no_such_package")  # the real one stays untouched
    registry.register(QUANT_METHOD)(FakePackedConfig)
    monkeypatch.setattr(linear_method, "QUANTIZATION_REGISTRY", registry)

    source = make_tiny_model_dir(tmp_path / "src", "llama")
    state = load_file(str(source / "model.safetensors"))
    packed_state, dense_state = {}, {}
    for name, tensor in state.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.rsplit(".", 1)[-1] in PROJECTIONS:
            parts = quantize(tensor)
            packed_state.update({f"{module}.{key}": value.contiguous() for key, value in parts.items()})
            dense_state[name] = dequantize(parts["qweight"], parts["qzeros"], parts["scales"]).contiguous()
        else:
            packed_state[name] = dense_state[name] = tensor
    for directory, weights in (("packed", packed_state), ("dense", dense_state)):
        target = tmp_path / directory
        target.mkdir()
        for path in source.iterdir():
            if path.name != "model.safetensors":
                (target / path.name).write_bytes(path.read_bytes())
        save_file(weights, str(target / "model.safetensors"))
    config_path = tmp_path / "packed" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {"quant_method": QUANT_METHOD}
    config_path.write_text(json.dumps(config))

    packed, dense = load(tmp_path / "packed"), load(tmp_path / "dense")
    qkv = packed.model.model.layers[1].self_attn.qkv_proj
    assert isinstance(qkv.linear_method, FakePackedMethod) and not hasattr(qkv, "weight")
    assert qkv.qweight.shape == (64 // 8, 64 + 32 + 32) and qkv.qzeros.shape == (64 // 16, (64 + 32 + 32) // 8)
    assert isinstance(packed.model.lm_head.linear_method, DenseLinearMethod)
    prompts = make_prompts([7, 5], packed.spec.vocab_size)
    steps = [[4, 3], [3, 2]]
    want = run_in_steps(dense.model, prompts, steps)
    for got, ref in zip(run_in_steps(packed.model, prompts, steps), want, strict=True):
        assert rel_err(got, ref) < 1e-5
