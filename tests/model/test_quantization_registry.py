"""The weight-format registry: config.json's quantization_config picks a QuantizationConfig by quant_method."""

from __future__ import annotations

import pytest

from tokenmill.model.linear_method import (
    DenseLinearMethod,
    QuantizationConfig,
    QuantizationRegistry,
    linear_method_for,
    quantization_config_from_hf,
)


class HalfDense(QuantizationConfig):
    """A format that keeps the LM head dense and gives every other layer its own method object."""

    def __init__(self, bits: int) -> None:
        self.bits = bits

    @classmethod
    def from_config(cls, config: dict) -> HalfDense:
        if config.get("bits") not in (4, 8):
            raise ValueError(f"bits must be 4 or 8; got {config.get('bits')!r}")
        return cls(config["bits"])

    def get_linear_method(self, layer_prefix: str) -> DenseLinearMethod:
        return DenseLinearMethod()


def test_registered_formats_are_found_by_name_and_parse_their_config():
    registry = QuantizationRegistry(plugin_package="tokenmill.no_such_package")
    registry.register("half-dense")(HalfDense)
    assert registry.names() == ["half-dense"]
    config = registry.get("half-dense").from_config({"quant_method": "half-dense", "bits": 4})
    assert config.bits == 4 and HalfDense.quant_method == "half-dense"
    assert isinstance(linear_method_for(config, "model.layers.0.mlp.down_proj"), DenseLinearMethod)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("half-dense")(type("Other", (QuantizationConfig,), {}))
    with pytest.raises(ValueError, match="quantization method 'awq' is not supported; supported: half-dense"):
        registry.get("awq")


def test_dense_checkpoints_have_no_quantization_config_and_unknown_ones_are_refused():
    assert quantization_config_from_hf(None) is None
    assert isinstance(linear_method_for(None, "lm_head"), DenseLinearMethod)
    with pytest.raises(ValueError, match="quantization method 'made-up' is not supported"):
        quantization_config_from_hf({"quant_method": "made-up"})
    with pytest.raises(ValueError, match="has no quant_method"):
        quantization_config_from_hf({"bits": 4})
